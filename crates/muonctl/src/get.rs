//! `muonctl get services|workloads|endpoints|routes|grpcroutes|gateways|authorizationpolicies|
//! peerauthentications|proxies [NAME] [-n NS] [-o table|yaml|json]` (`policies` is
//! `authorizationpolicies`).
//!
//! Objects come from `Management.List` (or `Get` with a NAME) and print as a table, or as
//! the envelope users apply (`apiVersion`, `kind`, `metadata`, `spec`) in YAML or JSON.
//! `endpoints` is a computed view, worked out here from the same data the control plane
//! uses: for every Service, the Workloads of its namespace whose labels include all of its
//! selector. `proxies` is `Management.ListProxies` (see also `proxy-status`).

use crate::control::{self, Conn, Target};
use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use muon_api::json::json_from_struct;
use muon_api::v1::{GetRequest, ListRequest, Object};
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Yaml,
    Json,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// services | workloads | endpoints | routes | grpcroutes | gateways |
    /// authorizationpolicies (policies) | peerauthentications | proxies
    pub what: String,
    /// One object by name (all of them without it).
    pub name: Option<String>,
    /// Only this namespace (default: every namespace).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// The management API's kind for a word the user typed.
pub fn kind_for(what: &str) -> Result<&'static str> {
    Ok(match what.to_ascii_lowercase().as_str() {
        "service" | "services" | "svc" => "Service",
        "workload" | "workloads" | "wl" => "Workload",
        "route" | "routes" | "httproute" | "httproutes" => "HTTPRoute",
        "grpcroute" | "grpcroutes" => "GRPCRoute",
        "gateway" | "gateways" | "gw" => "Gateway",
        "policy" | "policies" | "authorizationpolicy" | "authorizationpolicies" | "authz" => {
            "AuthorizationPolicy"
        }
        "peerauthentication" | "peerauthentications" | "peerauthn" | "pa" => "PeerAuthentication",
        "trafficpolicy" | "trafficpolicies" | "tp" => "TrafficPolicy",
        "xbackendtrafficpolicy"
        | "xbackendtrafficpolicies"
        | "backendtrafficpolicy"
        | "backendtrafficpolicies"
        | "btp" => "XBackendTrafficPolicy",
        other => bail!(
            "unknown kind {other:?}: use services, workloads, endpoints, routes, grpcroutes, gateways, authorizationpolicies, peerauthentications, trafficpolicies, xbackendtrafficpolicies or proxies"
        ),
    })
}

pub fn get(target: &Target, args: GetArgs) -> Result<i32> {
    match args.what.to_ascii_lowercase().as_str() {
        "proxies" | "proxy" => return crate::proxy_status::list(target, args.output),
        "endpoints" | "endpoint" | "ep" => return endpoints(target, &args),
        _ => {}
    }
    let kind = kind_for(&args.what)?;
    let objects = control::block_on(async {
        let mut conn = control::connect(target).await?;
        let objects = match &args.name {
            Some(name) => {
                let request = GetRequest {
                    kind: kind.into(),
                    namespace: args.namespace.clone().unwrap_or_else(|| "default".into()),
                    name: name.clone(),
                };
                vec![
                    conn.call("get", |mut c| {
                        let request = request.clone();
                        async move { c.get(request).await }
                    })
                    .await?,
                ]
            }
            None => list_all(&mut conn, kind, &args.namespace.clone().unwrap_or_default()).await?,
        };
        anyhow::Ok(objects)
    })??;
    print!("{}", render(kind, &objects, args.output)?);
    Ok(0)
}

/// Every object of `kind` in `namespace` ("" for all), page by page.
async fn list_all(conn: &mut Conn, kind: &str, namespace: &str) -> Result<Vec<Object>> {
    let mut objects = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = ListRequest {
            kind: kind.into(),
            namespace: namespace.into(),
            page_token,
        };
        let resp = conn
            .call("get", |mut c| {
                let request = request.clone();
                async move { c.list(request).await }
            })
            .await?;
        objects.extend(resp.objects);
        if resp.next_page_token.is_empty() {
            return Ok(objects);
        }
        page_token = resp.next_page_token;
    }
}

/// An object as users write it.
pub fn envelope(o: &Object) -> Value {
    let meta = o.metadata.clone().unwrap_or_default();
    let mut metadata = json!({"name": meta.name, "namespace": meta.namespace});
    if !meta.labels.is_empty() {
        let labels: std::collections::BTreeMap<_, _> = meta.labels.iter().collect();
        metadata["labels"] = json!(labels);
    }
    if meta.generation != 0 {
        metadata["generation"] = json!(meta.generation);
    }
    if !meta.source.is_empty() {
        metadata["source"] = json!(meta.source);
    }
    json!({
        "apiVersion": o.api_version,
        "kind": o.kind,
        "metadata": metadata,
        "spec": o.spec.as_ref().map_or(json!({}), json_from_struct),
    })
}

/// YAML documents separated by `---`, or a JSON list, or a table.
pub fn render(kind: &str, objects: &[Object], format: Format) -> Result<String> {
    let values: Vec<Value> = objects.iter().map(envelope).collect();
    match format {
        Format::Json => Ok(serde_json::to_string_pretty(&values)? + "\n"),
        Format::Yaml => yaml(&values),
        Format::Table => Ok(table(kind, &values)),
    }
}

pub fn yaml(values: &[Value]) -> Result<String> {
    let docs = values
        .iter()
        .map(serde_norway::to_string)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(docs.join("---\n"))
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn list(v: &Value, f: impl Fn(&Value) -> String) -> String {
    let items: Vec<String> = v
        .as_array()
        .map(|a| a.iter().map(f).collect())
        .unwrap_or_default();
    if items.is_empty() {
        "-".into()
    } else {
        items.join(",")
    }
}

fn map(v: &Value) -> String {
    let items: Vec<String> = v
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k}={}", s(v))).collect())
        .unwrap_or_default();
    if items.is_empty() {
        "-".into()
    } else {
        items.join(",")
    }
}

/// A policy's selector (`matchLabels`), or `*` for every workload of its namespace.
fn selector(v: &Value) -> String {
    match v {
        Value::Null => "*".into(),
        v => map(&v["matchLabels"]),
    }
}

/// Left-aligned columns, two spaces apart.
pub fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn table(kind: &str, values: &[Value]) -> String {
    if values.is_empty() {
        return "no objects found\n".into();
    }
    let name = |v: &Value| s(&v["metadata"]["name"]);
    let ns = |v: &Value| s(&v["metadata"]["namespace"]);
    let mut rows: Vec<Vec<String>> = Vec::new();
    match kind {
        "Service" => {
            rows.push(
                ["NAME", "NAMESPACE", "VIPS", "PORTS", "SELECTOR"]
                    .map(String::from)
                    .to_vec(),
            );
            for v in values {
                let spec = &v["spec"];
                let ports = list(&spec["ports"], |p| {
                    let target = if p["targetPort"].is_null() {
                        p["port"].clone()
                    } else {
                        p["targetPort"].clone()
                    };
                    // Not declared: the sidecars detect it.
                    let proto = if p["protocol"].is_null() {
                        "auto".into()
                    } else {
                        s(&p["protocol"])
                    };
                    format!("{}->{}/{proto}", s(&p["port"]), s(&target))
                });
                rows.push(vec![
                    name(v),
                    ns(v),
                    list(&spec["vips"], s),
                    ports,
                    map(&spec["selector"]),
                ]);
            }
        }
        "Workload" => {
            rows.push(
                [
                    "NAME",
                    "NAMESPACE",
                    "ADDRESS",
                    "SERVICE-ACCOUNT",
                    "ZONE",
                    "READY",
                    "LABELS",
                ]
                .map(String::from)
                .to_vec(),
            );
            for v in values {
                let spec = &v["spec"];
                let ready = spec["ready"].as_bool().unwrap_or(true);
                let zone = s(&spec["locality"]["zone"]);
                rows.push(vec![
                    name(v),
                    ns(v),
                    s(&spec["address"]),
                    if spec["serviceAccount"].is_null() {
                        "default".into()
                    } else {
                        s(&spec["serviceAccount"])
                    },
                    if zone.is_empty() { "-".into() } else { zone },
                    ready.to_string(),
                    map(&v["metadata"]["labels"]),
                ]);
            }
        }
        "Gateway" => {
            rows.push(
                ["NAME", "NAMESPACE", "CLASS", "LISTENERS"]
                    .map(String::from)
                    .to_vec(),
            );
            for v in values {
                let spec = &v["spec"];
                rows.push(vec![
                    name(v),
                    ns(v),
                    s(&spec["gatewayClassName"]),
                    list(&spec["listeners"], |l| {
                        format!("{}:{}/{}", s(&l["name"]), s(&l["port"]), s(&l["protocol"]))
                    }),
                ]);
            }
        }
        "AuthorizationPolicy" => {
            rows.push(
                ["NAME", "NAMESPACE", "ACTION", "SELECTOR", "RULES"]
                    .map(String::from)
                    .to_vec(),
            );
            for v in values {
                let spec = &v["spec"];
                let action = match &spec["action"] {
                    Value::Null => "ALLOW".to_string(),
                    a => s(a),
                };
                rows.push(vec![
                    name(v),
                    ns(v),
                    action,
                    selector(&spec["selector"]),
                    spec["rules"].as_array().map_or(0, Vec::len).to_string(),
                ]);
            }
        }
        "PeerAuthentication" => {
            rows.push(
                ["NAME", "NAMESPACE", "MODE", "SELECTOR", "PORTS"]
                    .map(String::from)
                    .to_vec(),
            );
            for v in values {
                let spec = &v["spec"];
                let mode = |m: &Value| match &m["mode"] {
                    Value::Null => "UNSET".to_string(),
                    m => s(m),
                };
                let ports = spec["portLevelMtls"].as_object().map_or_else(
                    || "-".to_string(),
                    |m| {
                        m.iter()
                            .map(|(p, v)| format!("{p}:{}", mode(v)))
                            .collect::<Vec<_>>()
                            .join(",")
                    },
                );
                rows.push(vec![
                    name(v),
                    ns(v),
                    mode(&spec["mtls"]),
                    selector(&spec["selector"]),
                    ports,
                ]);
            }
        }
        "HTTPRoute" | "GRPCRoute" => {
            rows.push(
                ["NAME", "NAMESPACE", "PARENTS", "HOSTNAMES", "RULES"]
                    .map(String::from)
                    .to_vec(),
            );
            for v in values {
                let spec = &v["spec"];
                let rules = spec["rules"].as_array().map_or(0, Vec::len);
                rows.push(vec![
                    name(v),
                    ns(v),
                    list(&spec["parentRefs"], |p| s(&p["name"])),
                    list(&spec["hostnames"], s),
                    rules.to_string(),
                ]);
            }
        }
        _ => {
            rows.push(
                ["KIND", "NAME", "NAMESPACE", "GENERATION", "SOURCE"]
                    .map(String::from)
                    .to_vec(),
            );
            for v in values {
                rows.push(vec![
                    s(&v["kind"]),
                    name(v),
                    ns(v),
                    s(&v["metadata"]["generation"]),
                    s(&v["metadata"]["source"]),
                ]);
            }
        }
    }
    columns(&rows)
}

/// The endpoints view: each Service with the Workloads its selector matches.
pub fn compute_endpoints(services: &[Object], workloads: &[Object]) -> Vec<Value> {
    let workloads: Vec<Value> = workloads.iter().map(envelope).collect();
    services
        .iter()
        .map(envelope)
        .map(|svc| {
            let selector = svc["spec"]["selector"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            let ns = &svc["metadata"]["namespace"];
            let eps: Vec<Value> = workloads
                .iter()
                .filter(|w| &w["metadata"]["namespace"] == ns)
                .filter(|w| {
                    !selector.is_empty()
                        && selector
                            .iter()
                            .all(|(k, v)| w["metadata"]["labels"][k] == *v)
                })
                .map(|w| {
                    json!({
                        "workload": w["metadata"]["name"],
                        "address": w["spec"]["address"],
                        "zone": w["spec"]["locality"]["zone"],
                        "ready": w["spec"]["ready"].as_bool().unwrap_or(true),
                        "weight": w["spec"]["weight"].as_u64().unwrap_or(1),
                    })
                })
                .collect();
            json!({
                "service": svc["metadata"]["name"],
                "namespace": ns,
                "ports": svc["spec"]["ports"],
                "endpoints": eps,
            })
        })
        .collect()
}

pub fn render_endpoints(view: &[Value], format: Format) -> Result<String> {
    match format {
        Format::Json => Ok(serde_json::to_string_pretty(view)? + "\n"),
        Format::Yaml => yaml(view),
        Format::Table => {
            if view.is_empty() {
                return Ok("no services found\n".into());
            }
            let mut rows = vec![[
                "SERVICE",
                "NAMESPACE",
                "WORKLOAD",
                "ADDRESS",
                "ZONE",
                "READY",
            ]
            .map(String::from)
            .to_vec()];
            for v in view {
                let eps = v["endpoints"].as_array().cloned().unwrap_or_default();
                if eps.is_empty() {
                    rows.push(vec![s(&v["service"]), s(&v["namespace"]), "<none>".into()]);
                }
                for e in eps {
                    let zone = s(&e["zone"]);
                    rows.push(vec![
                        s(&v["service"]),
                        s(&v["namespace"]),
                        s(&e["workload"]),
                        s(&e["address"]),
                        if zone.is_empty() { "-".into() } else { zone },
                        s(&e["ready"]),
                    ]);
                }
            }
            Ok(columns(&rows))
        }
    }
}

fn endpoints(target: &Target, args: &GetArgs) -> Result<i32> {
    let namespace = args.namespace.clone().unwrap_or_default();
    let (services, workloads) = control::block_on(async {
        let mut conn = control::connect(target).await?;
        let services = list_all(&mut conn, "Service", &namespace).await?;
        let workloads = list_all(&mut conn, "Workload", &namespace).await?;
        anyhow::Ok((services, workloads))
    })??;
    let services: Vec<Object> = services
        .into_iter()
        .filter(|o| {
            args.name
                .as_ref()
                .is_none_or(|n| o.metadata.as_ref().is_some_and(|m| &m.name == n))
        })
        .collect();
    if services.is_empty() && args.name.is_some() {
        bail!(
            "no service named {:?}",
            args.name.clone().unwrap_or_default()
        );
    }
    print!(
        "{}",
        render_endpoints(&compute_endpoints(&services, &workloads), args.output)?
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest;

    const OBJECTS: &str = "\
apiVersion: muon.io/v1alpha1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  vips: [198.19.0.1]
  ports: [{port: 80, targetPort: 8080, protocol: http}]
  selector: {app: web}
---
apiVersion: muon.io/v1alpha1
kind: Workload
metadata: {name: web-0, namespace: shop, labels: {app: web}}
spec: {address: 198.18.0.2, locality: {zone: a}}
---
apiVersion: muon.io/v1alpha1
kind: Workload
metadata: {name: db-0, namespace: shop, labels: {app: db}}
spec: {address: 198.18.0.3}
---
apiVersion: muon.io/v1alpha1
kind: Workload
metadata: {name: web-x, namespace: other, labels: {app: web}}
spec: {address: 198.18.0.4}
";

    fn objects(kind: &str) -> Vec<Object> {
        manifest::parse("t.yaml", OBJECTS)
            .unwrap()
            .into_iter()
            .map(|d| d.object)
            .filter(|o| o.kind == kind)
            .collect()
    }

    #[test]
    fn policies_print_their_action_mode_selector_and_ports() {
        let docs = manifest::parse(
            "p.yaml",
            "\
apiVersion: muon.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: payment-callers, namespace: shop}
spec:
  selector: {matchLabels: {app: payment}}
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/orders]}}]}]
---
apiVersion: muon.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: shop}
spec: {action: DENY}
---
apiVersion: muon.io/v1alpha1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec:
  mtls: {mode: STRICT}
  portLevelMtls: {9090: {mode: PERMISSIVE}}
",
        )
        .unwrap();
        let of = |kind: &str| -> Vec<Object> {
            docs.iter()
                .map(|d| d.object.clone())
                .filter(|o| o.kind == kind)
                .collect()
        };
        assert_eq!(
            render(
                "AuthorizationPolicy",
                &of("AuthorizationPolicy"),
                Format::Table
            )
            .unwrap(),
            "NAME             NAMESPACE  ACTION  SELECTOR     RULES\n\
             payment-callers  shop       ALLOW   app=payment  1\n\
             deny-all         shop       DENY    *            0\n"
        );
        assert_eq!(
            render(
                "PeerAuthentication",
                &of("PeerAuthentication"),
                Format::Table
            )
            .unwrap(),
            "NAME    NAMESPACE  MODE    SELECTOR  PORTS\n\
             strict  shop       STRICT  *         9090:PERMISSIVE\n"
        );
    }

    #[test]
    fn services_print_as_a_table_yaml_and_json() {
        let svcs = objects("Service");
        let t = render("Service", &svcs, Format::Table).unwrap();
        assert_eq!(
            t,
            "NAME  NAMESPACE  VIPS        PORTS          SELECTOR\n\
             web   shop       198.19.0.1  80->8080/http  app=web\n"
        );
        let y = render("Service", &svcs, Format::Yaml).unwrap();
        assert!(
            y.contains("kind: Service") && y.contains("targetPort: 8080"),
            "{y}"
        );
        // What get prints in YAML applies again.
        let back = manifest::parse("y.yaml", &y).unwrap();
        assert_eq!(back[0].object.spec, svcs[0].spec);
        let j: Value =
            serde_json::from_str(&render("Service", &svcs, Format::Json).unwrap()).unwrap();
        assert_eq!(j[0]["spec"]["ports"][0]["port"], 80);
        assert_eq!(
            render("Service", &[], Format::Table).unwrap(),
            "no objects found\n"
        );
    }

    #[test]
    fn endpoints_are_the_workloads_a_selector_matches_in_its_namespace() {
        let view = compute_endpoints(&objects("Service"), &objects("Workload"));
        assert_eq!(view.len(), 1);
        let eps = view[0]["endpoints"].as_array().unwrap();
        assert_eq!(eps.len(), 1, "{view:?}");
        assert_eq!(eps[0]["workload"], "web-0");
        let t = render_endpoints(&view, Format::Table).unwrap();
        assert!(
            t.lines()
                .nth(1)
                .unwrap()
                .starts_with("web      shop       web-0     198.18.0.2  a"),
            "{t}"
        );
    }

    #[test]
    fn kinds_accept_plural_and_short_names() {
        assert_eq!(kind_for("svc").unwrap(), "Service");
        assert_eq!(kind_for("Workloads").unwrap(), "Workload");
        assert_eq!(kind_for("routes").unwrap(), "HTTPRoute");
        assert_eq!(kind_for("policies").unwrap(), "AuthorizationPolicy");
        assert_eq!(
            kind_for("authorizationpolicies").unwrap(),
            "AuthorizationPolicy"
        );
        assert_eq!(
            kind_for("peerauthentications").unwrap(),
            "PeerAuthentication"
        );
        assert!(kind_for("pods")
            .unwrap_err()
            .to_string()
            .contains("services, workloads"));
    }
}
