//! The proxy's own model of the mesh: what a sidecar keeps of the control plane's resources
//! (or of the `--table-file`), checked and converted once, before anything is compiled.
//!
//! `discovery::convert` builds these from `muon.v1` resources (and rejects what cannot be
//! used, which the client NACKs); `discovery::file` builds them from a `ServiceTable`. The
//! data path never sees them: `table::compile` turns them into the lookup tables it reads.

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
