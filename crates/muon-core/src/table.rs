//! The static service table: which virtual IPs and ports belong to which service, and the
//! endpoints behind each. It is the format of the proxy's `--table-file` (tests, and a lab
//! with `controlPlane: false`) and nothing more: the control plane sends resources instead.

use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

/// Every service a sidecar knows about.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceTable {
    #[serde(default)]
    pub services: Vec<ServiceEntry>,
}

/// One service: its virtual IPs, its ports and the endpoints (pods) behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntry {
    pub name: String,
    pub namespace: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Balancing, locality, outlier detection, circuit breaking and faults: the fields of
    /// a TrafficPolicy's spec (without `targetRefs`), and `retryConstraint` as in an
    /// XBackendTrafficPolicy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<crate::resource::Traffic>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_constraint: Option<crate::resource::traffic::RetryConstraint>,
}

/// A service port and the port on the endpoint it maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    pub target_port: u16,
    /// Declared; absent: the sidecar detects it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
}

/// One instance behind a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// The pod (or workload) name, for logs and metrics.
    pub pod: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud: Option<String>,
    /// Its share relative to the others (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Runs a Muon sidecar.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub meshed: bool,
}

/// The application protocol a port speaks, as declared. `tcp` and `opaque` are carried as
/// bytes without looking at them; `tls` is passed through untouched; `http`, `http2` and
/// `grpc` are proxied as HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Http,
    Http2,
    Grpc,
    Tls,
    Opaque,
}

impl Protocol {
    pub const ALL: [Protocol; 6] = [
        Protocol::Tcp,
        Protocol::Http,
        Protocol::Http2,
        Protocol::Grpc,
        Protocol::Tls,
        Protocol::Opaque,
    ];

    /// A protocol by the name users write (`http`, `grpc`, …).
    pub fn parse(name: &str) -> Option<Protocol> {
        Self::ALL.into_iter().find(|p| p.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
            Protocol::Tls => "tls",
            Protocol::Opaque => "opaque",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    #[error("service table is not valid JSON: {0}")]
    Parse(String),
    #[error("service {service}: {reason}")]
    Invalid { service: String, reason: String },
}

impl ServiceTable {
    /// Parses and validates a table; a table that fails validation is never returned.
    pub fn from_json(bytes: &[u8]) -> Result<Self, TableError> {
        let table: ServiceTable =
            serde_json::from_slice(bytes).map_err(|e| TableError::Parse(e.to_string()))?;
        table.validate()?;
        Ok(table)
    }

    pub fn to_json(&self) -> String {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks the invariants the proxy relies on: ports are non-zero and every
    /// virtual IP:port belongs to exactly one service.
    pub fn validate(&self) -> Result<(), TableError> {
        let mut seen: HashSet<SocketAddr> = HashSet::new();
        for svc in &self.services {
            let invalid = |reason: String| TableError::Invalid {
                service: format!("{}.{}", svc.name, svc.namespace),
                reason,
            };
            if svc.name.is_empty() {
                return Err(invalid("name is empty".into()));
            }
            if let Some(t) = &svc.traffic {
                t.check(&format!("service {}.{}", svc.name, svc.namespace))
                    .map_err(|e| invalid(e.to_string()))?;
            }
            for p in &svc.ports {
                if p.port == 0 || p.target_port == 0 {
                    return Err(invalid(format!("port {} maps to 0", p.port)));
                }
                for vip in &svc.vips {
                    if !seen.insert(SocketAddr::new(*vip, p.port)) {
                        return Err(invalid(format!("{vip}:{} is claimed twice", p.port)));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, vip: &str, port: u16) -> ServiceEntry {
        ServiceEntry {
            name: name.into(),
            namespace: "default".into(),
            vips: vec![vip.parse().unwrap()],
            ports: vec![ServicePort {
                port,
                target_port: port,
                protocol: Some(Protocol::Http),
            }],
            endpoints: vec![Endpoint {
                ip: "198.18.0.2".parse().unwrap(),
                pod: "a".into(),
                zone: None,
                region: None,
                cloud: None,
                weight: None,
                meshed: true,
            }],
            traffic: None,
            retry_constraint: None,
        }
    }

    #[test]
    fn table_round_trips_through_json() {
        let t = ServiceTable {
            services: vec![svc("web", "198.19.0.1", 80)],
        };
        assert_eq!(ServiceTable::from_json(t.to_json().as_bytes()).unwrap(), t);
    }

    #[test]
    fn duplicate_vip_port_is_rejected() {
        let t = ServiceTable {
            services: vec![svc("a", "198.19.0.1", 80), svc("b", "198.19.0.1", 80)],
        };
        let err = ServiceTable::from_json(t.to_json().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("claimed twice"), "{err}");
    }

    #[test]
    fn unknown_field_is_rejected() {
        let err = ServiceTable::from_json(br#"{"services":[],"extra":1}"#).unwrap_err();
        assert!(matches!(err, TableError::Parse(_)));
    }
}
