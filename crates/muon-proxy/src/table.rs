//! The data path's lookup tables, compiled from the [`Mesh`] model once per change and
//! published with `ArcSwapOption`, so connections and requests read them without a lock.
//!
//! - outbound: a virtual IP:port → its service port ([`Target`]): protocol, endpoints;
//! - inbound: one of this pod's IP:port → the service port it serves ([`InboundPort`]);
//! - by name: every service, for backend references;
//! - authorization: the policies that apply to this pod ([`Authz`]), asked per inbound
//!   connection and request.
//!
//! `None` means "no table yet": the proxy is not ready. The writer is `discovery` (on a
//! thread of its own, never on the runtime); readers are `outbound`, `inbound` and `admin`.
//! Endpoint and balancer state is not in here: it lives in [`endpoint::Registry`] and is
//! carried into every new table, so a republish resets nothing.

use crate::balance::{self, Candidates, LevelPolicy, Locality, Tried, LEVELS};
use crate::endpoint::{self, BalancerState, EndpointKey, EndpointState, Outcome};
use crate::metrics::{Metrics, RequestStats, ResilienceStats};
use crate::model::{EndpointDef, Mesh, PortDef, TrafficDef};
use crate::policy::Authz;
use crate::route::{Filter, RouteDef, Router, RouterBuilder};
use crate::Direction;
use arc_swap::ArcSwapOption;
use muon_core::Protocol;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

pub type SharedTable = Arc<ArcSwapOption<Table>>;

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

/// One endpoint, ready to dial, and its live state.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub pod: Arc<str>,
    pub identity: Arc<str>,
    pub weight: u32,
    pub zone: Option<Arc<str>>,
    /// Its locality level seen from this pod (0: same zone; see `balance::LEVELS`).
    pub level: u8,
    pub meshed: bool,
    pub state: Arc<EndpointState>,
}

/// A service's endpoints at one target port: what a balancer picks from.
#[derive(Debug)]
pub struct Backends {
    /// `name.namespace`.
    pub service: Arc<str>,
    /// The service port, and what it declares.
    pub port: u16,
    pub protocol: Option<Protocol>,
    pub target_port: u16,
    /// Sorted by locality level, nearest first (stable: the source's order within a level).
    pub endpoints: Vec<Endpoint>,
    /// `cumulative[i]`: the sum of the weights of `endpoints[..=i]`.
    cumulative: Vec<u64>,
    /// `ends[l]`: one past the last endpoint of level `l`.
    ends: [usize; LEVELS],
    /// `endpoints` is what the source says (possibly none). False only on demand for a
    /// service whose endpoints were never subscribed: `outbound` subscribes first.
    pub known: bool,
    pub balancer: Arc<BalancerState>,
    pub traffic: Arc<TrafficDef>,
    pub stats: Arc<ResilienceStats>,
}

impl Candidates for Backends {
    fn len(&self) -> usize {
        self.endpoints.len()
    }
    fn state(&self, i: usize) -> &EndpointState {
        &self.endpoints[i].state
    }
    fn cumulative(&self, i: usize) -> u64 {
        self.cumulative[i]
    }
    fn ends(&self) -> &[usize; LEVELS] {
        &self.ends
    }
}

impl Backends {
    /// The endpoint for the next request (or connection), skipping those in `tried`.
    pub fn pick(&self, tried: &Tried) -> Option<usize> {
        let l = &self.traffic.locality;
        let i = balance::pick(
            self,
            &self.balancer,
            self.traffic.algorithm,
            LevelPolicy {
                enabled: l.enabled,
                failover_below: l.failover_below,
                spill_across_clouds: l.spill_across_clouds,
            },
            tried,
        )?;
        if let Some(c) = self
            .stats
            .locality
            .get(usize::from(self.endpoints[i].level))
        {
            c.inc();
        }
        Some(i)
    }

    /// Counts what endpoint `i` did, for outlier detection; ejects it when it crossed a
    /// threshold and fewer than `maxEjectionPercent` of the endpoints are ejected.
    pub fn record(&self, i: usize, outcome: Outcome) {
        let Some(o) = &self.traffic.outliers else {
            return;
        };
        let Some(ep) = self.endpoints.get(i) else {
            return;
        };
        let Some(length) = ep.state.record(outcome, o) else {
            return;
        };
        let now = endpoint::now_ns();
        let ejected = self
            .endpoints
            .iter()
            .filter(|e| e.state.ejected(now))
            .count();
        if (ejected + 1) * 100 > self.endpoints.len() * o.max_ejection_percent as usize {
            return;
        }
        ep.state.eject(length);
        self.balancer.refresh_depth();
        self.stats.ejection.inc();
        tracing::info!(
            service = %self.service,
            endpoint = %ep.addr,
            pod = %ep.pod,
            seconds = length.as_secs_f64(),
            ?outcome,
            "endpoint ejected by outlier detection"
        );
    }
}

/// Where a matched rule sends requests.
#[derive(Debug)]
pub struct RuleTarget {
    /// The route's resource name ("" for a service port's default rule: no route).
    pub route: Arc<str>,
    pub backends: Vec<WeightedBackend>,
    /// Sum of the backends' weights (0: the rule has nowhere to send requests).
    pub total_weight: u64,
    /// The backends of the rule's `RequestMirror` filters, in filter order.
    pub mirrors: Vec<Option<Arc<Backends>>>,
    pub stats: Arc<RequestStats>,
}

/// One backendRef of a rule, resolved.
#[derive(Debug)]
pub struct WeightedBackend {
    /// `name.namespace`, as the rule names it.
    pub service: Arc<str>,
    /// `None`: no such service or port (its share of requests gets 500).
    pub backends: Option<Arc<Backends>>,
    pub weight: u32,
}

impl RuleTarget {
    /// The backend for a draw in `0..total_weight` (weighted choice).
    pub fn pick(&self, draw: u64) -> Option<&WeightedBackend> {
        let mut left = draw;
        self.backends.iter().find(|b| {
            let w = u64::from(b.weight);
            match left < w {
                true => true,
                false => {
                    left -= w;
                    false
                }
            }
        })
    }
}

/// One service port: what a connection to one of its virtual IPs gets.
#[derive(Debug)]
pub struct Target {
    /// `name.namespace`, for logs.
    pub service: Arc<str>,
    pub port: u16,
    /// Declared; `None`: detect.
    pub protocol: Option<Protocol>,
    pub backends: Arc<Backends>,
    /// The HTTPRoutes (or GRPCRoutes) attached to this port; `None`: requests go to the
    /// service itself ([`Target::default`]).
    pub router: Option<Arc<Router<RuleTarget>>>,
    /// The rule requests follow when no route is attached: every request to `backends`.
    pub default: Arc<RuleTarget>,
}

/// One port of this pod that a service sends traffic to.
#[derive(Debug)]
pub struct InboundPort {
    pub service: Arc<str>,
    pub protocol: Option<Protocol>,
    /// This pod's name in the service's endpoints.
    pub pod: Arc<str>,
    pub stats: Arc<RequestStats>,
    /// The app at this port: its connection pool, shared by every inbound connection.
    pub app: Arc<EndpointState>,
}

/// A service as the table holds it (for backend references and `/config_dump`).
#[derive(Debug)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub qualified: Arc<str>,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<PortDef>,
    /// Per port, in the order of `ports`.
    pub targets: Vec<Arc<Target>>,
}

impl Service {
    /// The service's port `port`.
    pub fn target(&self, port: u16) -> Option<&Arc<Target>> {
        self.targets.iter().find(|t| t.port == port)
    }
}

/// A compiled table.
#[derive(Debug, Default)]
pub struct Table {
    /// Counts tables published by this process (1 = the first).
    pub version: u64,
    pub source: Source,
    /// Sorted by qualified name.
    services: Vec<Arc<Service>>,
    by_name: HashMap<Arc<str>, Arc<Service>>,
    by_dst: HashMap<SocketAddr, Arc<Target>>,
    inbound: HashMap<SocketAddr, Arc<InboundPort>>,
    /// By Gateway `name.namespace`: the routes attached to it.
    gateways: HashMap<String, Arc<Router<RuleTarget>>>,
    /// The authorization and peer authentication policies of this pod.
    authz: Arc<Authz>,
}

/// What a compile needs besides the model.
pub struct Context<'a> {
    pub version: u64,
    pub source: Source,
    /// This pod's addresses: their ports in a service's endpoints are the inbound table.
    pub local_ips: &'a [IpAddr],
    /// Where the request counters are resolved.
    pub metrics: &'a Metrics,
    /// This pod's name and namespace: which policies apply to it.
    pub pod_name: &'a str,
    pub pod_namespace: &'a str,
    /// Where this pod runs: endpoints are ranked by distance from it.
    pub locality: &'a Locality,
}

/// Resolves a backendRef to the backends it names; port 0 means `default_port`.
fn resolve(
    backends: &HashMap<(Arc<str>, u16), Arc<Backends>>,
    first_port: &HashMap<Arc<str>, u16>,
    service: &Arc<str>,
    port: u16,
    default_port: Option<u16>,
) -> Option<Arc<Backends>> {
    let port = match (port, default_port) {
        (0, Some(p)) => p,
        (0, None) => *first_port.get(service)?,
        (p, _) => p,
    };
    backends.get(&(service.clone(), port)).cloned()
}

impl Table {
    /// Compiles `mesh`. Every VIP:port is claimed by one service (checked when the services
    /// were received; should two claim it anyway, the first by name wins).
    pub fn compile(mesh: &Mesh, cx: &Context<'_>, registry: &mut endpoint::Registry) -> Table {
        let mut carry = registry.carry();
        let mut table = Table {
            version: cx.version,
            source: cx.source,
            ..Table::default()
        };
        // 1. Every service port's endpoints, by (service, service port).
        let mut backends: HashMap<(Arc<str>, u16), Arc<Backends>> = HashMap::new();
        let mut first_port: HashMap<Arc<str>, u16> = HashMap::new();
        let mut names: Vec<Arc<str>> = Vec::with_capacity(mesh.services.len());
        for (name, svc) in &mesh.services {
            let qualified: Arc<str> = name.as_str().into();
            let defs: &[EndpointDef] = mesh.endpoints.get(name).map_or(&[], Vec::as_slice);
            let known = mesh.endpoints_known(name);
            let stats = cx.metrics.resilience_stats(name);
            for port in &svc.ports {
                let mut endpoints: Vec<Endpoint> = defs
                    .iter()
                    .map(|e| {
                        let addr = SocketAddr::new(e.ip, port.target_port);
                        let state = carry.endpoint(EndpointKey {
                            service: qualified.clone(),
                            addr,
                            identity: e.identity.clone(),
                        });
                        let at = Locality {
                            zone: e.zone.clone(),
                            region: e.region.clone(),
                            cloud: e.cloud.clone(),
                        };
                        Endpoint {
                            addr,
                            pod: e.pod.clone(),
                            identity: e.identity.clone(),
                            weight: e.weight,
                            zone: e.zone.clone(),
                            level: cx.locality.level(&at) as u8,
                            meshed: e.meshed,
                            state,
                        }
                    })
                    .collect();
                endpoints.sort_by_key(|e| e.level);
                let mut ends = [0; LEVELS];
                for (i, e) in endpoints.iter().enumerate() {
                    for end in ends.iter_mut().skip(usize::from(e.level)) {
                        *end = i + 1;
                    }
                }
                let cumulative = endpoints
                    .iter()
                    .scan(0u64, |sum, e| {
                        *sum += u64::from(e.weight.max(1));
                        Some(*sum)
                    })
                    .collect();
                backends.insert(
                    (qualified.clone(), port.port),
                    Arc::new(Backends {
                        service: qualified.clone(),
                        port: port.port,
                        protocol: port.protocol,
                        target_port: port.target_port,
                        endpoints,
                        cumulative,
                        ends,
                        known,
                        balancer: carry.balancer(&qualified, port.target_port),
                        traffic: svc.traffic.clone(),
                        stats: stats.clone(),
                    }),
                );
                for e in defs.iter().filter(|e| cx.local_ips.contains(&e.ip)) {
                    let addr = SocketAddr::new(e.ip, port.target_port);
                    // Two services may send to one port of this pod: the first by name wins,
                    // unless only a later one declares the port's protocol.
                    let declared = port.protocol.is_some();
                    if table
                        .inbound
                        .get(&addr)
                        .is_some_and(|p| p.protocol.is_some() || !declared)
                    {
                        continue;
                    }
                    let app = carry.endpoint(EndpointKey {
                        service: "inbound".into(),
                        addr,
                        identity: "".into(),
                    });
                    table.inbound.insert(
                        addr,
                        Arc::new(InboundPort {
                            service: qualified.clone(),
                            protocol: port.protocol,
                            pod: e.pod.clone(),
                            stats: cx.metrics.request_stats(Direction::Inbound, name, ""),
                            app,
                        }),
                    );
                }
            }
            if let Some(p) = svc.ports.first() {
                first_port.insert(qualified.clone(), p.port);
            }
            names.push(qualified);
        }

        // 2. Routers: per service port, and per gateway, from the routes attached to them.
        let mut port_routes: BTreeMap<(Arc<str>, u16), RouterBuilder<RuleTarget>> = BTreeMap::new();
        let mut gateway_routes: BTreeMap<String, RouterBuilder<RuleTarget>> = BTreeMap::new();
        for route in mesh.routes.values() {
            for parent in &route.parents {
                if parent.gateway {
                    let targets = rule_targets(
                        route,
                        cx,
                        Direction::Gateway,
                        &parent.name,
                        None,
                        &backends,
                        &first_port,
                    );
                    gateway_routes
                        .entry(parent.name.clone())
                        .or_insert_with(|| RouterBuilder::new(true))
                        .add(route.clone(), targets);
                    continue;
                }
                let Some(svc) = mesh.services.get(&parent.name) else {
                    continue;
                };
                let qualified: Arc<str> = parent.name.as_str().into();
                let ports = svc.ports.iter().filter(|p| {
                    (parent.port == 0 || parent.port == p.port)
                        && (parent.section.is_empty() || parent.section == p.name)
                });
                for port in ports {
                    let targets = rule_targets(
                        route,
                        cx,
                        Direction::Outbound,
                        &parent.name,
                        Some(port.port),
                        &backends,
                        &first_port,
                    );
                    port_routes
                        .entry((qualified.clone(), port.port))
                        .or_insert_with(|| RouterBuilder::new(false))
                        .add(route.clone(), targets);
                }
            }
        }
        let mut routers: HashMap<(Arc<str>, u16), Arc<Router<RuleTarget>>> = port_routes
            .into_iter()
            .map(|(k, b)| (k, Arc::new(b.build())))
            .collect();
        table.gateways = gateway_routes
            .into_iter()
            .map(|(k, b)| (k, Arc::new(b.build())))
            .collect();

        // 3. The targets, each with its router or its default rule.
        for (svc, qualified) in mesh.services.values().zip(names) {
            let mut targets = Vec::with_capacity(svc.ports.len());
            for port in &svc.ports {
                let key = (qualified.clone(), port.port);
                let Some(own) = backends.get(&key).cloned() else {
                    continue;
                };
                let default = Arc::new(RuleTarget {
                    route: "".into(),
                    backends: vec![WeightedBackend {
                        service: qualified.clone(),
                        backends: Some(own.clone()),
                        weight: 1,
                    }],
                    total_weight: 1,
                    mirrors: Vec::new(),
                    stats: cx
                        .metrics
                        .request_stats(Direction::Outbound, &qualified, ""),
                });
                let target = Arc::new(Target {
                    service: qualified.clone(),
                    port: port.port,
                    protocol: port.protocol,
                    backends: own,
                    router: routers.remove(&key),
                    default,
                });
                for vip in &svc.vips {
                    table
                        .by_dst
                        .entry(SocketAddr::new(*vip, port.port))
                        .or_insert_with(|| target.clone());
                }
                targets.push(target);
            }
            let service = Arc::new(Service {
                name: svc.name.clone(),
                namespace: svc.namespace.clone(),
                qualified: qualified.clone(),
                vips: svc.vips.clone(),
                ports: svc.ports.clone(),
                targets,
            });
            table.by_name.insert(qualified, service.clone());
            table.services.push(service);
        }
        carry.finish();
        table.authz = Arc::new(Authz::compile(
            mesh.policies.values(),
            cx.pod_name,
            cx.pod_namespace,
            cx.metrics,
        ));
        table
    }

    /// The policies of this pod: what inbound connections and requests are authorized by,
    /// and each port's mTLS mode.
    pub fn authz(&self) -> &Arc<Authz> {
        &self.authz
    }

    /// The routes attached to the Gateway `name.namespace`.
    pub fn gateway(&self, name: &str) -> Option<&Arc<Router<RuleTarget>>> {
        self.gateways.get(name)
    }

    /// A table of its own (version 1, fresh endpoint state) from a static table: for tests
    /// and tools; the proxy's sources go through `discovery`.
    pub fn from_service_table(table: &muon_core::ServiceTable) -> Table {
        let cx = Context {
            version: 1,
            source: Source::File,
            local_ips: &[],
            metrics: &Metrics::new(),
            pod_name: "",
            pod_namespace: "",
            locality: &Locality::default(),
        };
        Table::compile(
            &crate::discovery::file::mesh(table),
            &cx,
            &mut endpoint::Registry::default(),
        )
    }

    /// The service port a connection to `dst` (a virtual IP:port) is for.
    pub fn lookup(&self, dst: SocketAddr) -> Option<&Arc<Target>> {
        self.by_dst.get(&dst)
    }

    /// The service port of this pod that `dst` is, if any service sends traffic there.
    pub fn inbound(&self, dst: SocketAddr) -> Option<&Arc<InboundPort>> {
        self.inbound.get(&dst)
    }

    /// A service by `name.namespace`.
    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        self.by_name.get(name)
    }

    pub fn services(&self) -> usize {
        self.services.len()
    }

    /// `/config_dump`'s `table`: every service with its ports and endpoints, as the data path
    /// uses them (endpoints as of its first port: every port has the same endpoints).
    pub fn dump(&self) -> Value {
        let now = endpoint::now_ns();
        let services: Vec<Value> = self
            .services
            .iter()
            .map(|s| {
                let endpoints: Vec<Value> = s
                    .targets
                    .first()
                    .map(|t| t.backends.endpoints.as_slice())
                    .unwrap_or_default()
                    .iter()
                    .map(|e| {
                        let ejected_for = e
                            .state
                            .ejected_until(now)
                            .map(|until| (until - now) as f64 / 1e9);
                        json!({
                            "ip": e.addr.ip(),
                            "pod": &*e.pod,
                            "identity": &*e.identity,
                            "weight": e.weight,
                            "zone": e.zone.as_deref(),
                            "locality": level_name(usize::from(e.level)),
                            "meshed": e.meshed,
                            "ewmaMs": e.state.latency() / 1e6,
                            "inFlight": e.state.load(),
                            "ejected": ejected_for.is_some(),
                            "ejectedForSeconds": ejected_for,
                            "ejections": e.state.ejections(),
                        })
                    })
                    .collect();
                json!({
                    "name": s.name,
                    "namespace": s.namespace,
                    "vips": s.vips,
                    "ports": s.ports.iter().map(|p| json!({
                        "port": p.port,
                        "targetPort": p.target_port,
                        "protocol": p.protocol.map(Protocol::as_str),
                        "name": p.name,
                    })).collect::<Vec<_>>(),
                    "endpointsKnown": s.targets.first().is_none_or(|t| t.backends.known),
                    "traffic": s.targets.first().map(|t| dump_traffic(&t.backends)),
                    "endpoints": endpoints,
                })
            })
            .collect();
        let inbound: Vec<Value> = {
            let mut ports: Vec<_> = self.inbound.iter().collect();
            ports.sort_by_key(|(addr, _)| **addr);
            ports
                .into_iter()
                .map(|(addr, p)| {
                    json!({
                        "addr": addr.to_string(),
                        "service": &*p.service,
                        "protocol": p.protocol.map(Protocol::as_str),
                    })
                })
                .collect()
        };
        json!({ "services": services, "inbound": inbound, "authorization": self.authz.dump() })
    }
}

fn level_name(level: usize) -> &'static str {
    ["zone", "region", "cloud", "other-cloud"][level.min(LEVELS - 1)]
}

/// `/config_dump`'s view of a service's resilience settings and balancer state.
fn dump_traffic(b: &Backends) -> Value {
    let t = &b.traffic;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    json!({
        "algorithm": t.algorithm.as_str(),
        "locality": {
            "enabled": t.locality.enabled,
            "failoverBelow": t.locality.failover_below,
            "spillAcrossClouds": t.locality.spill_across_clouds,
            "levelInUse": level_name(b.balancer.depth().0),
        },
        "outlierDetection": t.outliers.map(|o| json!({
            "consecutive5xx": o.consecutive_5xx,
            "consecutiveGatewayErrors": o.consecutive_gateway_errors,
            "consecutiveConnectFailures": o.consecutive_connect_failures,
            "baseEjectionMs": ms(o.base_ejection_time),
            "maxEjectionMs": ms(o.max_ejection_time),
            "maxEjectionPercent": o.max_ejection_percent,
        })),
        "circuitBreaker": {
            "maxConnections": t.limits.max_connections,
            "maxPendingRequests": t.limits.max_pending_requests,
            "maxRequests": t.limits.max_requests,
            "connections": b.balancer.connections.load(std::sync::atomic::Ordering::Relaxed),
            "pending": b.balancer.pending.load(std::sync::atomic::Ordering::Relaxed),
            "requests": b.balancer.requests.load(std::sync::atomic::Ordering::Relaxed),
        },
        "faults": t.faults.as_ref().map(|f| json!({
            "delayPercent": f.delay_percent,
            "delayMs": ms(f.delay),
            "abortPercent": f.abort_percent,
            "abortStatus": f.abort_status.as_u16(),
            "routes": f.routes,
        })),
        "retryBudget": {
            "percent": t.budget.percent,
            "intervalMs": ms(t.budget.interval),
            "minRetryCount": t.budget.min_count,
            "minRetryIntervalMs": ms(t.budget.min_interval),
        },
    })
}

/// The targets of a route's rules for one parent: each rule's backends and mirrors
/// resolved (port 0 means `default_port`: the port the request arrived on).
fn rule_targets(
    route: &RouteDef,
    cx: &Context<'_>,
    direction: Direction,
    parent: &str,
    default_port: Option<u16>,
    backends: &HashMap<(Arc<str>, u16), Arc<Backends>>,
    first_port: &HashMap<Arc<str>, u16>,
) -> Vec<Arc<RuleTarget>> {
    let stats = cx.metrics.request_stats(direction, parent, &route.name);
    route
        .rules
        .iter()
        .map(|rule| {
            let resolved: Vec<WeightedBackend> = rule
                .backends
                .iter()
                .map(|b| WeightedBackend {
                    service: b.service.clone(),
                    backends: resolve(backends, first_port, &b.service, b.port, default_port),
                    weight: b.weight,
                })
                .collect();
            let mirrors = rule
                .filters
                .iter()
                .filter_map(|f| match f {
                    Filter::Mirror(m) => Some(resolve(
                        backends,
                        first_port,
                        &m.backend.service,
                        m.backend.port,
                        default_port,
                    )),
                    _ => None,
                })
                .collect();
            Arc::new(RuleTarget {
                route: route.name.clone(),
                total_weight: resolved.iter().map(|b| u64::from(b.weight)).sum(),
                backends: resolved,
                mirrors,
                stats: stats.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::ServiceDef;

    pub fn endpoint(ip: &str, pod: &str) -> EndpointDef {
        EndpointDef {
            ip: ip.parse().unwrap(),
            pod: pod.into(),
            identity: format!("spiffe://cluster.local/ns/shop/sa/{pod}").into(),
            weight: 1,
            zone: None,
            region: None,
            cloud: None,
            meshed: true,
        }
    }

    pub fn mesh() -> Mesh {
        let mut mesh = Mesh::default();
        mesh.services.insert(
            "web.shop".into(),
            ServiceDef {
                name: "web".into(),
                namespace: "shop".into(),
                vips: vec![
                    "198.19.0.1".parse().unwrap(),
                    "2001:db8::1".parse().unwrap(),
                ],
                ports: vec![
                    PortDef {
                        port: 80,
                        target_port: 8080,
                        protocol: Some(Protocol::Http),
                        name: String::new(),
                    },
                    PortDef {
                        port: 443,
                        target_port: 8443,
                        protocol: None,
                        name: String::new(),
                    },
                ],
                traffic: Default::default(),
            },
        );
        mesh.endpoints.insert(
            "web.shop".into(),
            vec![
                endpoint("198.18.0.2", "web-0"),
                endpoint("198.18.0.3", "web-1"),
            ],
        );
        mesh
    }

    static LOCAL: Locality = Locality {
        zone: None,
        region: None,
        cloud: None,
    };

    fn cx<'a>(version: u64, local: &'a [IpAddr], metrics: &'a Metrics) -> Context<'a> {
        Context {
            version,
            source: Source::ControlPlane,
            local_ips: local,
            metrics,
            pod_name: "web-1",
            pod_namespace: "shop",
            locality: &LOCAL,
        }
    }

    #[test]
    fn every_vip_of_a_port_shares_one_target_and_endpoint_state_survives_a_recompile() {
        let mut reg = endpoint::Registry::default();
        let t = Table::compile(&mesh(), &cx(1, &[], &Metrics::new()), &mut reg);
        let v4 = t.lookup("198.19.0.1:80".parse().unwrap()).unwrap();
        let v6 = t.lookup("[2001:db8::1]:80".parse().unwrap()).unwrap();
        assert!(Arc::ptr_eq(v4, v6));
        assert_eq!(&*v4.service, "web.shop");
        assert_eq!(v4.protocol, Some(Protocol::Http));
        assert_eq!(v4.backends.target_port, 8080);
        assert_eq!(
            v4.backends.endpoints[1].addr,
            "198.18.0.3:8080".parse().unwrap()
        );
        assert!(v4.backends.known);
        let tls = t.lookup("198.19.0.1:443".parse().unwrap()).unwrap();
        assert_eq!((tls.backends.target_port, tls.protocol), (8443, None));
        assert!(t.lookup("198.19.0.1:81".parse().unwrap()).is_none());
        assert_eq!(t.services(), 1);

        // A republish (one endpoint gone) keeps the other endpoint's state and the balancer.
        let mut next = mesh();
        next.endpoints.get_mut("web.shop").unwrap().remove(1);
        let t2 = Table::compile(&next, &cx(2, &[], &Metrics::new()), &mut reg);
        let again = t2.lookup("198.19.0.1:80".parse().unwrap()).unwrap();
        assert!(Arc::ptr_eq(
            &v4.backends.endpoints[0].state,
            &again.backends.endpoints[0].state
        ));
        assert!(Arc::ptr_eq(&v4.backends.balancer, &again.backends.balancer));
        assert_eq!(again.backends.endpoints.len(), 1);
        // Two ports × one endpoint left.
        assert_eq!(reg.endpoints(), 2);
        assert!(again.router.is_none());
        assert_eq!(again.default.total_weight, 1);
    }

    #[test]
    fn this_pods_endpoints_are_the_inbound_table() {
        let mut reg = endpoint::Registry::default();
        let local = ["198.18.0.3".parse().unwrap()];
        let t = Table::compile(&mesh(), &cx(1, &local, &Metrics::new()), &mut reg);
        let p = t.inbound("198.18.0.3:8080".parse().unwrap()).unwrap();
        assert_eq!((&*p.service, &*p.pod), ("web.shop", "web-1"));
        assert_eq!(p.protocol, Some(Protocol::Http));
        assert!(t.inbound("198.18.0.2:8080".parse().unwrap()).is_none());
        assert!(t.inbound("198.18.0.3:80".parse().unwrap()).is_none());
        assert_eq!(t.dump()["inbound"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn the_policies_of_this_pod_are_compiled_into_the_table() {
        use muon_api::v1;
        let policy = |name: &str, ns: &str, workloads: &[&str]| {
            let p = v1::Policy {
                name: name.into(),
                namespace: ns.into(),
                kind: Some(v1::policy::Kind::Authorization(v1::AuthorizationPolicy {
                    selector: None,
                    action: v1::authorization_policy::Action::Deny.into(),
                    rules: vec![v1::AuthorizationRule::default()],
                })),
                workloads: workloads.iter().map(|w| w.to_string()).collect(),
                all_workloads: workloads.is_empty(),
            };
            let def = crate::policy::PolicyDef::from_proto(&p).unwrap();
            (format!("authz/{name}.{ns}"), Arc::new(def))
        };
        let mut m = mesh();
        m.policies = [
            policy("mine", "shop", &["web-1"]),
            policy("theirs", "shop", &["web-0"]),
            policy("other-ns", "web", &[]),
        ]
        .into();
        let t = Table::compile(
            &m,
            &cx(1, &[], &Metrics::new()),
            &mut endpoint::Registry::default(),
        );
        let d = t.authz().authorize(&crate::policy::Attrs::tcp(None, 8080));
        assert_eq!(d.policy.as_deref(), Some("shop/mine"));
        let deny = &t.dump()["authorization"]["deny"];
        assert_eq!(deny.as_array().map(Vec::len), Some(1), "{deny}");
    }

    #[test]
    fn on_demand_services_without_an_answer_have_unknown_endpoints() {
        let mut reg = endpoint::Registry::default();
        let mut m = mesh();
        m.answered = Some(Default::default());
        let t = Table::compile(&m, &cx(1, &[], &Metrics::new()), &mut reg);
        assert!(
            !t.lookup("198.19.0.1:80".parse().unwrap())
                .unwrap()
                .backends
                .known
        );
        m.answered = Some(["web.shop".to_string()].into());
        let t = Table::compile(&m, &cx(2, &[], &Metrics::new()), &mut reg);
        assert!(
            t.lookup("198.19.0.1:80".parse().unwrap())
                .unwrap()
                .backends
                .known
        );
    }
}
