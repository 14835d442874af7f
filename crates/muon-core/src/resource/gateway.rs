//! `Gateway`: where traffic from outside the mesh comes in. Written as the Gateway API's
//! (`gateway.networking.k8s.io/v1`) or as Muon's own (`muon.io/v1alpha1`, the same fields).
//!
//! Routes attach to a Gateway by `parentRefs` (`kind: Gateway`); a `muon-proxy --mode
//! gateway --gateway NAME.NAMESPACE` serves the routes attached to it. The listeners
//! describe the gateway's ports for users and tools; the proxy's own `--listen` addresses,
//! certificate and key are given to it directly.

use super::Check;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::collections::BTreeSet;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewaySpec {
    /// Which implementation serves it (`muon` for Muon's gateway).
    #[serde(default = "default_class")]
    pub gateway_class_name: String,
    pub listeners: Vec<Listener>,
    /// Accepted as the Gateway API writes them; not used by Muon.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<Json>,
}

fn default_class() -> String {
    "muon".to_string()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    pub port: u32,
    /// `HTTP` or `HTTPS`.
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Json>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_routes: Option<Json>,
}

pub(super) fn validate(check: &mut Check<'_>, g: &GatewaySpec) {
    if g.listeners.is_empty() {
        check.fail("spec.listeners", "needs at least one listener");
    }
    let mut names = BTreeSet::new();
    for (i, l) in g.listeners.iter().enumerate() {
        let field = format!("spec.listeners[{i}]");
        if let Err(reason) = super::check_dns_subdomain(&l.name) {
            check.fail(format!("{field}.name"), reason);
        } else if !names.insert(l.name.as_str()) {
            check.fail(
                format!("{field}.name"),
                format!("{:?} is used twice", l.name),
            );
        }
        if let Some(h) = &l.hostname {
            let host = h.strip_prefix("*.").unwrap_or(h);
            if let Err(reason) = super::check_dns_subdomain(host) {
                check.fail(format!("{field}.hostname"), reason);
            }
        }
        check.port(&format!("{field}.port"), l.port);
        match l.protocol.as_str() {
            "HTTP" if l.tls.is_some() => check.fail(
                format!("{field}.tls"),
                "must not be set on an HTTP listener",
            ),
            "HTTP" | "HTTPS" => {}
            other => check.fail(
                format!("{field}.protocol"),
                format!("{other:?} is not supported; expected HTTP or HTTPS"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Kind, Object};
    use serde_json::json;

    #[test]
    fn a_gateway_may_be_written_as_the_gateway_apis_or_as_muons() {
        for api in ["gateway.networking.k8s.io/v1", "muon.io/v1alpha1"] {
            let o = Object::from_json(
                &json!({
                    "apiVersion": api, "kind": "Gateway",
                    "metadata": {"name": "edge", "namespace": "shop"},
                    "spec": {"listeners": [{"name": "http", "port": 8080, "protocol": "HTTP"}]}
                }),
                0,
            )
            .unwrap();
            assert_eq!(o.kind(), Kind::Gateway);
            assert_eq!(o.to_json()["spec"]["gatewayClassName"], "muon");
        }
        let err = Object::from_json(
            &json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                "metadata": {"name": "edge"},
                "spec": {"listeners": [{"name": "x", "port": 0, "protocol": "UDP"},
                                       {"name": "x", "port": 80, "protocol": "HTTP"}]}
            }),
            0,
        )
        .unwrap_err()
        .to_string();
        for want in [
            "spec.listeners[0].port",
            "spec.listeners[0].protocol: \"UDP\" is not supported",
            "spec.listeners[1].name: \"x\" is used twice",
        ] {
            assert!(err.contains(want), "{want} missing from {err}");
        }
    }
}
