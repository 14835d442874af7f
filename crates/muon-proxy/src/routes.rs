//! The outbound lookup table: virtual IP:port → service target, compiled once per table
//! version and published with `ArcSwapOption`, so the data path reads it without a lock.
//!
//! `None` means "no table yet": the proxy is not ready. The writer is `discovery` (the table
//! file or the control-plane client); readers are `outbound` and `admin`.

use crate::balance::RoundRobin;
use arc_swap::ArcSwapOption;
use muon_core::ServiceTable;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

pub type SharedRoutes = Arc<ArcSwapOption<Routes>>;

/// One endpoint of a target, ready to dial.
#[derive(Debug)]
pub struct Backend {
    pub ip: IpAddr,
    pub pod: Arc<str>,
}

/// One service port: where its connections go.
#[derive(Debug)]
pub struct Target {
    /// `name.namespace`, for logs.
    pub service: Arc<str>,
    pub target_port: u16,
    pub backends: Vec<Backend>,
    /// Shared by every VIP of this service port.
    pub rr: RoundRobin,
    /// `backends` is what the source says (possibly none). False only in on-demand mode for
    /// a service whose endpoints were never subscribed: `outbound` subscribes first.
    pub endpoints_known: bool,
}

/// Where a table came from, for `/config_dump`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// `--table-file` (or no source at all: the empty table).
    #[default]
    File,
    /// The control plane's discovery stream.
    ControlPlane,
    /// The state saved in `--state-dir`, loaded because the control plane was unreachable.
    Saved,
}

/// A compiled service table.
#[derive(Debug, Default)]
pub struct Routes {
    /// Counts tables published by this process (1 = the first).
    pub version: u64,
    /// The table as loaded, for `/config_dump`.
    pub table: ServiceTable,
    pub source: Source,
    /// From the control plane: every kind's version and resources, as `/config_dump` shows it.
    pub resources: Option<serde_json::Value>,
    by_dst: HashMap<SocketAddr, Arc<Target>>,
}

impl Routes {
    /// Compiles a validated table (`ServiceTable::from_json` guarantees each VIP:port is
    /// claimed once; should two claim it anyway, the first wins).
    pub fn new(version: u64, table: ServiceTable) -> Self {
        Self::compile(version, table, |_| true)
    }

    /// [`Routes::new`], where `known("name.namespace")` says whether the source has answered
    /// for that service's endpoints (see `discovery::on_demand`).
    pub fn compile(version: u64, table: ServiceTable, known: impl Fn(&str) -> bool) -> Self {
        let mut by_dst = HashMap::new();
        for svc in &table.services {
            let service: Arc<str> = format!("{}.{}", svc.name, svc.namespace).into();
            let endpoints_known = known(&service);
            for port in &svc.ports {
                let target = Arc::new(Target {
                    service: service.clone(),
                    target_port: port.target_port,
                    backends: svc
                        .endpoints
                        .iter()
                        .map(|e| Backend {
                            ip: e.ip,
                            pod: e.pod.as_str().into(),
                        })
                        .collect(),
                    rr: RoundRobin::default(),
                    endpoints_known,
                });
                for vip in &svc.vips {
                    by_dst
                        .entry(SocketAddr::new(*vip, port.port))
                        .or_insert_with(|| target.clone());
                }
            }
        }
        Routes {
            version,
            table,
            source: Source::File,
            resources: None,
            by_dst,
        }
    }

    /// Records where the table came from.
    pub fn with_source(mut self, source: Source, resources: Option<serde_json::Value>) -> Self {
        self.source = source;
        self.resources = resources;
        self
    }

    pub fn lookup(&self, dst: SocketAddr) -> Option<&Arc<Target>> {
        self.by_dst.get(&dst)
    }

    pub fn services(&self) -> usize {
        self.table.services.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_vip_of_a_port_shares_one_target() {
        let table = ServiceTable::from_json(
            br#"{"services":[{"name":"web","namespace":"shop",
                "vips":["198.19.0.1","2001:db8::1"],
                "ports":[{"port":80,"targetPort":8080},{"port":443,"targetPort":8443}],
                "endpoints":[{"ip":"198.18.0.2","pod":"web-0"}]}]}"#,
        )
        .unwrap();
        let routes = Routes::new(1, table);
        let v4 = routes.lookup("198.19.0.1:80".parse().unwrap()).unwrap();
        let v6 = routes.lookup("[2001:db8::1]:80".parse().unwrap()).unwrap();
        assert!(Arc::ptr_eq(v4, v6));
        assert_eq!(&*v4.service, "web.shop");
        assert_eq!(v4.target_port, 8080);
        assert_eq!(&*v4.backends[0].pod, "web-0");
        let tls = routes.lookup("198.19.0.1:443".parse().unwrap()).unwrap();
        assert_eq!(tls.target_port, 8443);
        assert!(routes.lookup("198.19.0.1:81".parse().unwrap()).is_none());
        assert_eq!(routes.services(), 1);
        assert!(v4.endpoints_known);
        let on_demand = Routes::compile(2, routes.table.clone(), |name| name != "web.shop");
        assert!(
            !on_demand
                .lookup("198.19.0.1:80".parse().unwrap())
                .unwrap()
                .endpoints_known
        );
    }
}
