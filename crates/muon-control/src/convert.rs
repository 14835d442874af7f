//! The one place where Muon's objects meet the proto: user objects to and from the
//! management API's `Object`, and user objects to the data plane's resources.

use crate::model::Stored;
use muon_api::json::{json_from_struct, struct_from_json};
use muon_api::v1;
use muon_core::resource::policy::{self, Action, MtlsMode};
use muon_core::resource::{
    selector_matches, AuthorizationPolicySpec, BackendRef, BackendTrafficPolicySpec, Filter,
    GrpcRouteSpec, HeaderMatch, HeaderModifier, HeaderValue, HttpRouteSpec, Invalid, Kind,
    Metadata, Object, ParentRef, PathModifier, PeerAuthenticationSpec, Problem, Retry, ServiceSpec,
    Traffic, TrafficPolicySpec, WorkloadSelector, WorkloadSpec, DEFAULT_NAMESPACE,
};
use std::net::IpAddr;

/// A management API object to a validated user object. `index` names it when its envelope
/// is unusable.
pub fn object_from_proto(o: &v1::Object, index: usize) -> Result<Object, Invalid> {
    let Some(meta) = &o.metadata else {
        return Err(Invalid(vec![Problem {
            object: format!("{} (object {})", o.kind, index + 1),
            field: "metadata".into(),
            reason: "is required".into(),
        }]));
    };
    let metadata = Metadata {
        name: meta.name.clone(),
        namespace: if meta.namespace.is_empty() {
            DEFAULT_NAMESPACE.to_string()
        } else {
            meta.namespace.clone()
        },
        labels: meta.labels.clone().into_iter().collect(),
    };
    let spec = o
        .spec
        .as_ref()
        .map(json_from_struct)
        .unwrap_or(serde_json::Value::Null);
    Object::from_parts(&o.api_version, &o.kind, metadata, &spec)
}

pub fn object_to_proto(s: &Stored) -> v1::Object {
    let o = &s.object;
    v1::Object {
        api_version: o.kind().api_version().to_string(),
        kind: o.kind().as_str().to_string(),
        metadata: Some(v1::Metadata {
            name: o.metadata.name.clone(),
            namespace: o.metadata.namespace.clone(),
            labels: o.metadata.labels.clone().into_iter().collect(),
            generation: s.generation,
            source: s.source.as_str().to_string(),
        }),
        spec: struct_from_json(&o.spec_json()),
    }
}

/// `<name>.<namespace>`: how resources and references name a service.
pub fn qualified(name: &str, namespace: &str) -> String {
    format!("{name}.{namespace}")
}

/// IPs in their canonical text form, so `2001:DB8::1` and `2001:db8::1` are one address.
fn canonical_ip(s: &str) -> String {
    s.parse::<IpAddr>()
        .map(|ip| ip.to_string())
        .unwrap_or_else(|_| s.to_string())
}

/// The policies that target one service: every TrafficPolicy (a field set by an earlier one,
/// in namespace/name order, wins) and the first XBackendTrafficPolicy.
#[derive(Default)]
pub struct TrafficPolicies<'a> {
    pub traffic: Vec<&'a TrafficPolicySpec>,
    pub backend: Option<&'a BackendTrafficPolicySpec>,
}

impl TrafficPolicies<'_> {
    /// What the data plane gets; `None` when no policy targets the service (the defaults).
    fn resource(&self, namespace: &str) -> Option<v1::Traffic> {
        if self.traffic.is_empty() && self.backend.is_none() {
            return None;
        }
        let mut merged = Traffic::default();
        for t in &self.traffic {
            let t = t.traffic();
            merged.load_balancer = merged.load_balancer.or(t.load_balancer);
            merged.locality = merged.locality.or(t.locality);
            merged.outlier_detection = merged.outlier_detection.or(t.outlier_detection);
            merged.circuit_breaker = merged.circuit_breaker.or(t.circuit_breaker);
            merged.faults = merged.faults.or(t.faults);
        }
        let retry = self.backend.and_then(|b| b.retry_constraint.as_ref());
        let mut res = muon_api::traffic::to_proto(&merged, retry);
        // Faults name routes as users do; the data plane knows them by resource name.
        if let Some(f) = &mut res.faults {
            f.routes = f
                .routes
                .iter()
                .flat_map(|r| {
                    [
                        route_name(Kind::HttpRoute, r, namespace),
                        route_name(Kind::GrpcRoute, r, namespace),
                    ]
                })
                .collect();
        }
        Some(res)
    }
}

pub fn service_resource(
    meta: &Metadata,
    s: &ServiceSpec,
    policies: Option<&TrafficPolicies<'_>>,
) -> v1::Service {
    v1::Service {
        traffic: policies.and_then(|p| p.resource(&meta.namespace)),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        vips: s.vips.iter().map(|v| canonical_ip(v)).collect(),
        ports: s
            .ports
            .iter()
            .map(|p| v1::ServicePort {
                port: p.port,
                target_port: p.target_port(),
                protocol: p
                    .protocol()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_default(),
                name: p.name.clone().unwrap_or_default(),
            })
            .collect(),
    }
}

/// A service's endpoints: the Workloads of its namespace whose labels match its selector.
pub fn endpoints_resource<'a>(
    meta: &Metadata,
    s: &ServiceSpec,
    workloads: impl Iterator<Item = (&'a Metadata, &'a WorkloadSpec)>,
    trust_domain: &str,
) -> v1::Endpoints {
    v1::Endpoints {
        service: meta.name.clone(),
        namespace: meta.namespace.clone(),
        endpoints: workloads
            .filter(|(wm, _)| selector_matches(&s.selector, &wm.labels))
            .map(|(wm, w)| v1::Endpoint {
                address: canonical_ip(&w.address),
                workload: wm.name.clone(),
                weight: w.weight,
                locality: Some(v1::Locality {
                    zone: w.locality.zone.clone(),
                    region: w.locality.region.clone(),
                    cloud: w.locality.cloud.clone(),
                }),
                identity: format!(
                    "spiffe://{trust_domain}/ns/{}/sa/{}",
                    wm.namespace, w.service_account
                ),
                ready: w.ready,
                meshed: w.meshed,
            })
            .collect(),
    }
}

/// The resource name of a route: HTTPRoutes are `name.namespace`, GRPCRoutes
/// `grpcroute/name.namespace`, so the two kinds never collide.
pub fn route_name(kind: Kind, name: &str, namespace: &str) -> String {
    match kind {
        Kind::GrpcRoute => format!("grpcroute/{}", qualified(name, namespace)),
        _ => qualified(name, namespace),
    }
}

fn parent_refs(ns: &str, parents: &[ParentRef]) -> Vec<v1::ParentRef> {
    parents
        .iter()
        .map(|p| v1::ParentRef {
            kind: p.kind.clone(),
            name: qualified(&p.name, p.namespace.as_deref().unwrap_or(ns)),
            port: p.port.unwrap_or(0),
            section_name: p.section_name.clone().unwrap_or_default(),
        })
        .collect()
}

fn backend(ns: &str, b: &BackendRef) -> v1::BackendRef {
    v1::BackendRef {
        service: qualified(&b.name, b.namespace.as_deref().unwrap_or(ns)),
        port: b.port.unwrap_or(0),
        weight: b.weight,
    }
}

fn header_matches(h: &[HeaderMatch]) -> Vec<v1::HeaderMatch> {
    h.iter()
        .map(|h| v1::HeaderMatch {
            name: h.name.clone(),
            value: h.value.clone(),
            r#type: h.kind.clone(),
        })
        .collect()
}

fn header_modifier(m: &HeaderModifier) -> v1::HeaderModifier {
    let pairs = |v: &[HeaderValue]| {
        v.iter()
            .map(|h| v1::Header {
                name: h.name.clone(),
                value: h.value.clone(),
            })
            .collect()
    };
    v1::HeaderModifier {
        set: pairs(&m.set),
        add: pairs(&m.add),
        remove: m.remove.clone(),
    }
}

fn path_modifier(p: &PathModifier) -> v1::PathModifier {
    v1::PathModifier {
        r#type: p.kind.clone(),
        value: p.value().to_string(),
    }
}

fn filters(ns: &str, filters: &[Filter]) -> Vec<v1::RouteFilter> {
    use v1::route_filter::Kind as F;
    filters
        .iter()
        .filter_map(|f| {
            let kind = if let Some(m) = &f.request_header_modifier {
                F::RequestHeaderModifier(header_modifier(m))
            } else if let Some(m) = &f.response_header_modifier {
                F::ResponseHeaderModifier(header_modifier(m))
            } else if let Some(r) = &f.request_redirect {
                F::RequestRedirect(v1::RequestRedirect {
                    scheme: r.scheme.clone().unwrap_or_default(),
                    hostname: r.hostname.clone().unwrap_or_default(),
                    path: r.path.as_ref().map(path_modifier),
                    port: r.port.unwrap_or(0),
                    status_code: r.status_code,
                })
            } else if let Some(r) = &f.url_rewrite {
                F::UrlRewrite(v1::UrlRewrite {
                    hostname: r.hostname.clone().unwrap_or_default(),
                    path: r.path.as_ref().map(path_modifier),
                })
            } else if let Some(m) = &f.request_mirror {
                let (numerator, denominator) = m.share();
                F::RequestMirror(v1::RequestMirror {
                    backend: Some(backend(ns, &m.backend_ref)),
                    numerator,
                    denominator,
                })
            } else {
                // Validation admits no other filter.
                return None;
            };
            Some(v1::RouteFilter { kind: Some(kind) })
        })
        .collect()
}

fn millis(d: Option<std::time::Duration>) -> u64 {
    d.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub fn route_resource(meta: &Metadata, r: &HttpRouteSpec) -> v1::Route {
    let ns = &meta.namespace;
    v1::Route {
        name: meta.name.clone(),
        namespace: ns.clone(),
        kind: Kind::HttpRoute.as_str().to_string(),
        parent_refs: parent_refs(ns, &r.parent_refs),
        hostnames: r.hostnames.clone(),
        rules: r
            .rules
            .iter()
            .map(|rule| v1::RouteRule {
                name: rule.name.clone().unwrap_or_default(),
                matches: rule
                    .matches
                    .iter()
                    .map(|m| v1::RouteMatch {
                        path_type: m.path.as_ref().map(|p| p.kind.clone()).unwrap_or_default(),
                        path_value: m.path.as_ref().map(|p| p.value.clone()).unwrap_or_default(),
                        method: m.method.clone().unwrap_or_default(),
                        headers: header_matches(&m.headers),
                        query_params: header_matches(&m.query_params),
                        ..Default::default()
                    })
                    .collect(),
                backends: rule.backend_refs.iter().map(|b| backend(ns, b)).collect(),
                timeout_ms: millis(rule.timeouts.as_ref().and_then(|t| t.request())),
                backend_timeout_ms: millis(
                    rule.timeouts.as_ref().and_then(|t| t.backend_request()),
                ),
                filters: filters(ns, &rule.filters),
                retry: rule.retry.as_ref().map(retry),
            })
            .collect(),
    }
}

fn retry(r: &Retry) -> v1::RetryPolicy {
    v1::RetryPolicy {
        codes: r.codes.iter().map(|&c| c.clamp(0, 599) as u32).collect(),
        attempts: r.attempts(),
        backoff_ms: millis(Some(r.backoff())),
    }
}

pub fn grpc_route_resource(meta: &Metadata, r: &GrpcRouteSpec) -> v1::Route {
    let ns = &meta.namespace;
    v1::Route {
        name: meta.name.clone(),
        namespace: ns.clone(),
        kind: Kind::GrpcRoute.as_str().to_string(),
        parent_refs: parent_refs(ns, &r.parent_refs),
        hostnames: r.hostnames.clone(),
        rules: r
            .rules
            .iter()
            .map(|rule| v1::RouteRule {
                name: rule.name.clone().unwrap_or_default(),
                matches: rule
                    .matches
                    .iter()
                    .map(|m| v1::RouteMatch {
                        headers: header_matches(&m.headers),
                        grpc_type: m
                            .method
                            .as_ref()
                            .map(|g| g.kind.clone())
                            .unwrap_or_default(),
                        grpc_service: m
                            .method
                            .as_ref()
                            .and_then(|g| g.service.clone())
                            .unwrap_or_default(),
                        grpc_method: m
                            .method
                            .as_ref()
                            .and_then(|g| g.method.clone())
                            .unwrap_or_default(),
                        ..Default::default()
                    })
                    .collect(),
                backends: rule.backend_refs.iter().map(|b| backend(ns, b)).collect(),
                filters: filters(ns, &rule.filters),
                retry: rule.retry.as_ref().map(retry),
                ..Default::default()
            })
            .collect(),
    }
}

/// The resource name of a policy: `authz/name.namespace` for an AuthorizationPolicy,
/// `peerauthn/name.namespace` for a PeerAuthentication.
pub fn policy_name(kind: Kind, name: &str, namespace: &str) -> String {
    match kind {
        Kind::PeerAuthentication => format!("peerauthn/{}", qualified(name, namespace)),
        _ => format!("authz/{}", qualified(name, namespace)),
    }
}

/// Which workloads a policy applies to, as the data plane gets it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Names in the policy's namespace, sorted.
    pub workloads: Vec<String>,
    /// No selector: every workload of the namespace (of the mesh, in the root namespace).
    pub all: bool,
}

impl Selection {
    /// The workloads among `candidates` (the policy namespace's workloads, or those carrying
    /// the selector's first label) whose labels match every label of `selector`; no
    /// selector: all of them.
    pub fn of<'a>(
        selector: Option<&WorkloadSelector>,
        candidates: impl Iterator<Item = &'a Metadata>,
    ) -> Selection {
        let Some(s) = selector else {
            return Selection {
                workloads: Vec::new(),
                all: true,
            };
        };
        let mut workloads: Vec<String> = candidates
            .filter(|m| selector_matches(&s.match_labels, &m.labels))
            .map(|m| m.name.clone())
            .collect();
        workloads.sort();
        workloads.dedup();
        Selection {
            workloads,
            all: false,
        }
    }
}

fn workload_selector(s: Option<&WorkloadSelector>) -> Option<v1::WorkloadSelector> {
    s.map(|s| v1::WorkloadSelector {
        match_labels: s.match_labels.clone().into_iter().collect(),
    })
}

fn mtls_mode(m: MtlsMode) -> i32 {
    match m {
        MtlsMode::Unset => v1::MtlsMode::Unset,
        MtlsMode::Permissive => v1::MtlsMode::Permissive,
        MtlsMode::Strict => v1::MtlsMode::Strict,
    }
    .into()
}

fn policy_resource(meta: &Metadata, kind: v1::policy::Kind, selection: Selection) -> v1::Policy {
    v1::Policy {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        kind: Some(kind),
        workloads: selection.workloads,
        all_workloads: selection.all,
    }
}

/// An AuthorizationPolicy as sidecars apply it: principals without `spiffe://`, ports as
/// numbers.
pub fn authorization_resource(
    meta: &Metadata,
    p: &AuthorizationPolicySpec,
    selection: Selection,
) -> v1::Policy {
    use v1::authorization_policy::Action as A;
    let principals = |v: &[String]| {
        v.iter()
            .map(|p| policy::normalize_principal(p).to_string())
            .collect()
    };
    let rules = p
        .rules
        .iter()
        .map(|r| v1::AuthorizationRule {
            from: r
                .from
                .iter()
                .map(|f| v1::AuthorizationSource {
                    principals: principals(&f.source.principals),
                    not_principals: principals(&f.source.not_principals),
                    namespaces: f.source.namespaces.clone(),
                    not_namespaces: f.source.not_namespaces.clone(),
                })
                .collect(),
            to: r
                .to
                .iter()
                .map(|t| {
                    let o = &t.operation;
                    v1::AuthorizationOperation {
                        ports: o.port_numbers().into_iter().map(u32::from).collect(),
                        not_ports: o.not_port_numbers().into_iter().map(u32::from).collect(),
                        methods: o.methods.clone(),
                        not_methods: o.not_methods.clone(),
                        paths: o.paths.clone(),
                        not_paths: o.not_paths.clone(),
                    }
                })
                .collect(),
        })
        .collect();
    let action = match p.action() {
        Action::Allow => A::Allow,
        Action::Deny => A::Deny,
    };
    let kind = v1::policy::Kind::Authorization(v1::AuthorizationPolicy {
        selector: workload_selector(p.selector.as_ref()),
        action: action.into(),
        rules,
    });
    policy_resource(meta, kind, selection)
}

/// A PeerAuthentication as sidecars apply it.
pub fn peer_authentication_resource(
    meta: &Metadata,
    p: &PeerAuthenticationSpec,
    selection: Selection,
) -> v1::Policy {
    let kind = v1::policy::Kind::PeerAuthentication(v1::PeerAuthentication {
        selector: workload_selector(p.selector.as_ref()),
        mode: mtls_mode(p.mode()),
        port_level_mtls: p
            .port_modes()
            .into_iter()
            .map(|(port, m)| (u32::from(port), mtls_mode(m)))
            .collect(),
    });
    policy_resource(meta, kind, selection)
}
