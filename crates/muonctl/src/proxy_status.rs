//! `muonctl proxy-status` (and `get proxies`): every connected sidecar and, per resource
//! kind, whether it uses what the control plane sent (SYNCED), has not ACKed the newest
//! version yet (STALE) or rejected it (NACKED), from `Management.ListProxies`.
//!
//! `muonctl config-dump POD`: what a sidecar actually uses, straight from its admin
//! `/config_dump` (127.0.0.1:15000 inside the pod). In the lab (`--lab NAME`) that request
//! is made from inside the pod's network namespace.

use crate::control::{self, Target};
use crate::get::{columns, yaml, Format};
use anyhow::{bail, Context, Result};
use clap::Args;
use muon_api::v1::{kinds, ListProxiesRequest, ProxyStatus};
use serde_json::{json, Value};
use std::net::SocketAddr;

#[derive(Debug, Args)]
pub struct ProxyStatusArgs {
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

#[derive(Debug, Args)]
pub struct ConfigDumpArgs {
    /// The pod whose sidecar to ask.
    pub pod: String,
    /// The sidecar's admin address (outside a lab: where its admin port is reachable from here).
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
}

pub fn run(target: &Target, args: ProxyStatusArgs) -> Result<i32> {
    list(target, args.output)
}

pub fn list(target: &Target, format: Format) -> Result<i32> {
    let proxies = control::block_on(async {
        let mut conn = control::connect(target).await?;
        let resp = conn
            .call("proxy-status", |mut c| async move {
                c.list_proxies(ListProxiesRequest {}).await
            })
            .await?;
        anyhow::Ok(resp.proxies)
    })??;
    print!("{}", render(&proxies, format)?);
    Ok(0)
}

fn as_json(p: &ProxyStatus) -> Value {
    json!({
        "id": p.id,
        "pod": p.pod,
        "namespace": p.namespace,
        "serviceAccount": p.service_account,
        "proxyVersion": p.proxy_version,
        "connectedAt": p.connected_at.as_ref().map(|t| t.seconds),
        "kinds": p.kinds.iter().map(|k| json!({
            "typeUrl": k.type_url,
            "sentVersion": k.sent_version,
            "ackedVersion": k.acked_version,
            "state": k.state,
            "lastError": k.last_error,
            "lastNackAt": k.last_nack_at.as_ref().map(|t| t.seconds),
        })).collect::<Vec<_>>(),
    })
}

pub fn render(proxies: &[ProxyStatus], format: Format) -> Result<String> {
    let values: Vec<Value> = proxies.iter().map(as_json).collect();
    match format {
        Format::Json => Ok(serde_json::to_string_pretty(&values)? + "\n"),
        Format::Yaml => yaml(&values),
        Format::Table => Ok(table(proxies)),
    }
}

fn table(proxies: &[ProxyStatus]) -> String {
    if proxies.is_empty() {
        return "no proxies connected\n".into();
    }
    let mut header = vec!["PROXY", "POD", "NAMESPACE", "VERSION"];
    header.extend(kinds::ALL.iter().map(|k| match *k {
        kinds::SERVICES => "SERVICES",
        kinds::ENDPOINTS => "ENDPOINTS",
        kinds::ROUTES => "ROUTES",
        _ => "POLICIES",
    }));
    header.push("LAST ERROR");
    let mut rows = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
    let mut sorted: Vec<&ProxyStatus> = proxies.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    for p in sorted {
        let mut row = vec![
            p.id.clone(),
            p.pod.clone(),
            p.namespace.clone(),
            if p.proxy_version.is_empty() {
                "-".into()
            } else {
                p.proxy_version.clone()
            },
        ];
        for kind in kinds::ALL {
            let cell = match p.kinds.iter().find(|k| k.type_url == kind) {
                None => "-".to_owned(),
                Some(k) if k.acked_version.is_empty() => k.state.clone(),
                Some(k) => format!("{} ({})", k.state, k.acked_version),
            };
            row.push(cell);
        }
        let last = p
            .kinds
            .iter()
            .filter(|k| !k.last_error.is_empty())
            .max_by_key(|k| k.last_nack_at.as_ref().map(|t| (t.seconds, t.nanos)))
            .map(|k| format!("{}: {}", k.type_url, k.last_error))
            .unwrap_or_else(|| "-".into());
        row.push(last);
        rows.push(row);
    }
    columns(&rows)
}

/// `lab`: the lab the pod is in (the global `--lab`); the request is made inside the pod's
/// network namespace.
pub fn config_dump(lab: Option<&str>, args: ConfigDumpArgs) -> Result<i32> {
    let (status, body) = match lab {
        Some(lab) => {
            let state = muon_lab::LabState::load(lab)?;
            let netns = state.pod(&args.pod)?.netns.clone();
            muon_lab::netns::http_get_in(&netns, args.admin_addr, "/config_dump").with_context(
                || format!("cannot reach the sidecar of {} at {} (is it running? `muonctl lab status {lab}`)", args.pod, args.admin_addr),
            )?
        }
        None => bail!(
            "say where {} runs: --lab NAME for a pod in a lab (other platforms are not supported yet)",
            args.pod
        ),
    };
    if status != 200 {
        bail!(
            "the sidecar of {} answered {status}: {}",
            args.pod,
            body.trim()
        );
    }
    print!("{body}");
    if !body.ends_with('\n') {
        println!();
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use muon_api::v1::KindStatus;

    fn kind(type_url: &str, state: &str, acked: &str, err: &str) -> KindStatus {
        KindStatus {
            type_url: type_url.into(),
            sent_version: "7".into(),
            acked_version: acked.into(),
            state: state.into(),
            last_error: err.into(),
            last_nack_at: None,
        }
    }

    #[test]
    fn proxy_status_table_shows_each_kind_and_the_last_error() {
        let p = ProxyStatus {
            id: "client-0.shop".into(),
            pod: "client-0".into(),
            namespace: "shop".into(),
            proxy_version: "0.1.0".into(),
            kinds: vec![
                kind(
                    "services",
                    "NACKED",
                    "6",
                    "web.shop: virtual IP \"x\" is not an IP address",
                ),
                kind("endpoints", "SYNCED", "7", ""),
                kind("routes", "STALE", "", ""),
                kind("policies", "SYNCED", "7", ""),
            ],
            ..Default::default()
        };
        let t = render(&[p], Format::Table).unwrap();
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].starts_with("PROXY          POD       NAMESPACE  VERSION  SERVICES"),
            "{t}"
        );
        assert!(
            lines[1].contains("NACKED (6)")
                && lines[1].contains("SYNCED (7)")
                && lines[1].contains("STALE"),
            "{t}"
        );
        assert!(
            lines[1].ends_with("services: web.shop: virtual IP \"x\" is not an IP address"),
            "{t}"
        );
        assert_eq!(
            render(&[], Format::Table).unwrap(),
            "no proxies connected\n"
        );
    }
}
