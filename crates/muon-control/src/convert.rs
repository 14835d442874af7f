//! The one place where Muon's objects meet the proto: user objects to and from the
//! management API's `Object`, and user objects to the data plane's resources.

use crate::registry::Stored;
use muon_api::json::{json_from_struct, struct_from_json};
use muon_api::v1;
use muon_core::resource::{
    selector_matches, HttpRouteSpec, Invalid, Metadata, Object, Problem, ServiceSpec, WorkloadSpec,
    DEFAULT_NAMESPACE,
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

pub fn service_resource(meta: &Metadata, s: &ServiceSpec) -> v1::Service {
    v1::Service {
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

pub fn route_resource(meta: &Metadata, r: &HttpRouteSpec) -> v1::Route {
    let ns = &meta.namespace;
    v1::Route {
        name: meta.name.clone(),
        namespace: ns.clone(),
        parents: r
            .parent_refs
            .iter()
            .map(|p| qualified(&p.name, p.namespace.as_deref().unwrap_or(ns)))
            .collect(),
        hostnames: r.hostnames.clone(),
        rules: r
            .rules
            .iter()
            .map(|rule| v1::RouteRule {
                matches: rule
                    .matches
                    .iter()
                    .map(|m| v1::RouteMatch {
                        path_type: m.path.as_ref().map(|p| p.kind.clone()).unwrap_or_default(),
                        path_value: m.path.as_ref().map(|p| p.value.clone()).unwrap_or_default(),
                        method: m.method.clone().unwrap_or_default(),
                        headers: m
                            .headers
                            .iter()
                            .map(|h| v1::HeaderMatch {
                                name: h.name.clone(),
                                value: h.value.clone(),
                                r#type: h.kind.clone(),
                            })
                            .collect(),
                    })
                    .collect(),
                backends: rule
                    .backend_refs
                    .iter()
                    .map(|b| v1::BackendRef {
                        service: qualified(&b.name, b.namespace.as_deref().unwrap_or(ns)),
                        port: b.port.unwrap_or(0),
                        weight: b.weight,
                    })
                    .collect(),
                timeout_ms: rule
                    .timeouts
                    .as_ref()
                    .and_then(|t| t.request())
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
                request_headers: rule
                    .filters
                    .iter()
                    .filter_map(|f| f.request_header_modifier.as_ref())
                    .map(|m| v1::HeaderModifier {
                        set: m
                            .set
                            .iter()
                            .map(|h| (h.name.clone(), h.value.clone()))
                            .collect(),
                        add: m
                            .add
                            .iter()
                            .map(|h| (h.name.clone(), h.value.clone()))
                            .collect(),
                        remove: m.remove.clone(),
                    })
                    .collect(),
            })
            .collect(),
    }
}
