//! The proxy's own model of the mesh: what a sidecar keeps of the control plane's resources
//! (or of the `--table-file`), checked and converted once, before anything is compiled.
//!
//! `discovery::convert` builds these from `muon.v1` resources (and rejects what cannot be
//! used, which the client NACKs); `discovery::file` builds them from a `ServiceTable`. The
//! data path never sees them: `table::compile` turns them into the lookup tables it reads.

use muon_api::v1;
pub use muon_core::resource::traffic::{Algorithm, Limits, Outliers, RetryBudget};
use muon_core::Protocol;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

/// A service: everything but its endpoints. Resource name `name.namespace`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceDef {
    pub name: String,
    pub namespace: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<PortDef>,
    /// How clients spread, retry and shed requests to it.
    pub traffic: Arc<TrafficDef>,
}

/// A service's resilience settings, defaults filled in (see `muon.v1.Traffic`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TrafficDef {
    pub algorithm: Algorithm,
    pub locality: LocalityDef,
    /// `None`: no outlier detection.
    pub outliers: Option<Outliers>,
    pub limits: Limits,
    pub faults: Option<FaultsDef>,
    pub budget: RetryBudget,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalityDef {
    pub enabled: bool,
    /// Percent.
    pub failover_below: u32,
    pub spill_across_clouds: bool,
}

impl Default for LocalityDef {
    fn default() -> Self {
        LocalityDef {
            enabled: true,
            failover_below: muon_core::resource::traffic::DEFAULT_FAILOVER_BELOW,
            spill_across_clouds: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultsDef {
    pub delay_percent: u32,
    pub delay: std::time::Duration,
    pub abort_percent: u32,
    pub abort_status: http::StatusCode,
    /// Route resource names; empty: every request.
    pub routes: Vec<String>,
}

impl TrafficDef {
    /// The data plane's resource (absent: the defaults) to the model, checked.
    pub fn from_proto(t: Option<&v1::Traffic>) -> Result<TrafficDef, String> {
        let Some(t) = t else {
            return Ok(TrafficDef::default());
        };
        let algorithm = match t.algorithm.as_str() {
            "" => Algorithm::default(),
            a => Algorithm::parse(a).ok_or_else(|| format!("unknown algorithm {a:?}"))?,
        };
        let ms = std::time::Duration::from_millis;
        let locality = t
            .locality
            .as_ref()
            .map_or_else(LocalityDef::default, |l| LocalityDef {
                enabled: !l.disabled,
                failover_below: l.failover_below.min(100),
                spill_across_clouds: l.spill_across_clouds,
            });
        let outliers = t.outlier_detection.as_ref().map(|o| Outliers {
            consecutive_5xx: o.consecutive_5xx,
            consecutive_gateway_errors: o.consecutive_gateway_errors,
            consecutive_connect_failures: o.consecutive_connect_failures,
            base_ejection_time: ms(o.base_ejection_ms.max(1)),
            max_ejection_time: ms(o.max_ejection_ms.max(o.base_ejection_ms).max(1)),
            max_ejection_percent: o.max_ejection_percent.min(100),
        });
        let limits = t
            .circuit_breaker
            .as_ref()
            .map_or_else(Limits::default, |c| Limits {
                max_connections: c.max_connections,
                max_pending_requests: c.max_pending_requests,
                max_requests: c.max_requests,
            });
        let faults = match &t.faults {
            None => None,
            Some(f) => Some(FaultsDef {
                delay_percent: f.delay_percent.min(100),
                delay: ms(f.delay_ms),
                abort_percent: f.abort_percent.min(100),
                abort_status: match f.abort_percent {
                    0 => http::StatusCode::SERVICE_UNAVAILABLE,
                    _ => u16::try_from(f.abort_status)
                        .ok()
                        .and_then(|s| http::StatusCode::from_u16(s).ok())
                        .filter(|s| s.as_u16() >= 200)
                        .ok_or_else(|| {
                            format!(
                                "fault abort status {} is not an HTTP status",
                                f.abort_status
                            )
                        })?,
                },
                routes: f.routes.clone(),
            }),
        };
        let budget = t
            .retry_budget
            .as_ref()
            .map_or_else(RetryBudget::default, |b| RetryBudget {
                percent: b.percent.min(100),
                interval: ms(b.interval_ms.max(1)),
                min_count: b.min_count,
                min_interval: ms(b.min_interval_ms.max(1)),
            });
        Ok(TrafficDef {
            algorithm,
            locality,
            outliers,
            limits,
            faults,
            budget,
        })
    }
}

impl ServiceDef {
    /// `name.namespace`: how resources and references name a service.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.name, self.namespace)
    }
}

/// One service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortDef {
    pub port: u16,
    pub target_port: u16,
    /// The declared protocol; `None`: detect it from the first bytes.
    pub protocol: Option<Protocol>,
    pub name: String,
}

/// One ready endpoint of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointDef {
    pub ip: IpAddr,
    /// The workload's name, for logs and metrics.
    pub pod: Arc<str>,
    /// The SPIFFE id the endpoint presents ("" when unknown).
    pub identity: Arc<str>,
    pub weight: u32,
    pub zone: Option<Arc<str>>,
    pub region: Option<Arc<str>>,
    pub cloud: Option<Arc<str>>,
    /// Runs a Muon sidecar: sidecars carry HTTP to it over their pooled HTTP/2.
    pub meshed: bool,
}

/// Everything the tables are compiled from.
#[derive(Debug, Clone, Default)]
pub struct Mesh {
    /// By `name.namespace`.
    pub services: BTreeMap<String, ServiceDef>,
    /// By service `name.namespace`.
    pub endpoints: BTreeMap<String, Vec<EndpointDef>>,
    /// By route resource name, compiled (matchers are built once, when received).
    pub routes: BTreeMap<String, Arc<crate::route::RouteDef>>,
    /// By policy resource name (`authz/…`, `peerauthn/…`), checked and with their patterns
    /// built; `table` keeps those that apply to this pod.
    pub policies: BTreeMap<String, Arc<crate::policy::PolicyDef>>,
    /// On demand: the services whose endpoints the control plane has answered for. `None`:
    /// every service's endpoints are known.
    pub answered: Option<BTreeSet<String>>,
}

impl Mesh {
    /// Whether the endpoints of `name` ("service.namespace") are known: always, unless on
    /// demand and never answered.
    pub fn endpoints_known(&self, name: &str) -> bool {
        self.answered.as_ref().is_none_or(|a| a.contains(name))
    }
}
