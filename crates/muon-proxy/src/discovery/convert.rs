//! muon.v1 resources → the proxy's own model ([`crate::model`]), in one place: a `Service`
//! becomes a [`ServiceDef`], its `Endpoints` a list of [`EndpointDef`]s (routes and policies
//! are built by `route::RouteDef::from_proto` and `policy::PolicyDef::from_proto`). Each
//! resource is checked on its own; what cannot be used is returned as a reason, which the
//! client NACKs.
//!
//! Also the JSON shown by `/config_dump` for each kind (prost types have no serde).

use crate::model::{EndpointDef, PortDef, ServiceDef};
use muon_api::v1::{self, resource::Kind};
use muon_core::Protocol;
use serde_json::{json, Value};
use std::net::IpAddr;
use std::sync::Arc;

/// A service as the proxy uses it: everything but its endpoints.
pub fn service(s: &v1::Service) -> Result<ServiceDef, String> {
    if s.name.is_empty() {
        return Err("name is empty".into());
    }
    if s.vips.is_empty() {
        return Err("no virtual IP".into());
    }
    let vips = s
        .vips
        .iter()
        .map(|v| {
            v.parse::<IpAddr>()
                .map_err(|_| format!("virtual IP {v:?} is not an IP address"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ports = s.ports.iter().map(port).collect::<Result<Vec<_>, _>>()?;
    let traffic = crate::model::TrafficDef::from_proto(s.traffic.as_ref())?;
    Ok(ServiceDef {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        vips,
        ports,
        traffic: Arc::new(traffic),
    })
}

fn port(p: &v1::ServicePort) -> Result<PortDef, String> {
    let port = u16::try_from(p.port)
        .ok()
        .filter(|&n| n != 0)
        .ok_or_else(|| format!("port {} is not a port from 1 to 65535", p.port))?;
    // An unset target port means "the same port", as in Kubernetes.
    let target_port = match p.target_port {
        0 => port,
        t => u16::try_from(t)
            .map_err(|_| format!("port {port}: targetPort {t} is not a port from 1 to 65535"))?,
    };
    let protocol = match p.protocol.as_str() {
        "" => None,
        name => Some(Protocol::parse(name).ok_or_else(|| {
            format!(
                "port {port}: protocol {name:?} is not one of: tcp, http, http2, grpc, tls, opaque"
            )
        })?),
    };
    Ok(PortDef {
        port,
        target_port,
        protocol,
        name: p.name.clone(),
    })
}

/// The ready endpoints of one service. Endpoints that are not ready are left out (they
/// receive no new connections); a bad address rejects the whole resource.
pub fn endpoints(e: &v1::Endpoints) -> Result<Vec<EndpointDef>, String> {
    let mut out = Vec::with_capacity(e.endpoints.len());
    for ep in &e.endpoints {
        let ip = ep.address.parse::<IpAddr>().map_err(|_| {
            format!(
                "endpoint {:?}: address {:?} is not an IP address",
                ep.workload, ep.address
            )
        })?;
        if !ep.ready {
            continue;
        }
        let locality = |f: fn(&v1::Locality) -> &str| {
            ep.locality
                .as_ref()
                .map(f)
                .filter(|z| !z.is_empty())
                .map(Arc::from)
        };
        out.push(EndpointDef {
            ip,
            pod: ep.workload.as_str().into(),
            identity: ep.identity.as_str().into(),
            // An unset weight is the default weight, as in the Workload object.
            weight: ep.weight.max(1),
            zone: locality(|l| &l.zone),
            region: locality(|l| &l.region),
            cloud: locality(|l| &l.cloud),
            meshed: ep.meshed,
        });
    }
    Ok(out)
}

/// `/config_dump`'s view of one resource, as the control plane sent it.
pub fn dump(kind: &Kind) -> Value {
    match kind {
        Kind::Service(s) => json!({
            "name": s.name,
            "namespace": s.namespace,
            "vips": s.vips,
            "ports": s.ports.iter().map(|p| json!({
                "port": p.port, "targetPort": p.target_port, "protocol": p.protocol, "name": p.name,
            })).collect::<Vec<_>>(),
            "traffic": s.traffic.as_ref().map(|t| format!("{t:?}")),
        }),
        Kind::Endpoints(e) => json!({
            "service": e.service,
            "namespace": e.namespace,
            "endpoints": e.endpoints.iter().map(|ep| json!({
                "address": ep.address,
                "workload": ep.workload,
                "weight": ep.weight,
                "zone": ep.locality.as_ref().map(|l| l.zone.as_str()).unwrap_or_default(),
                "region": ep.locality.as_ref().map(|l| l.region.as_str()).unwrap_or_default(),
                "cloud": ep.locality.as_ref().map(|l| l.cloud.as_str()).unwrap_or_default(),
                "identity": ep.identity,
                "ready": ep.ready,
                "meshed": ep.meshed,
            })).collect::<Vec<_>>(),
        }),
        Kind::Route(r) => json!({
            "name": r.name,
            "namespace": r.namespace,
            "kind": r.kind,
            "parentRefs": r.parent_refs.iter().map(|p| json!({
                "kind": p.kind, "name": p.name, "port": p.port, "sectionName": p.section_name,
            })).collect::<Vec<_>>(),
            "hostnames": r.hostnames,
            "rules": r.rules.iter().map(|rule| json!({
                "name": rule.name,
                "matches": rule.matches.iter().map(|m| json!({
                    "pathType": m.path_type, "pathValue": m.path_value, "method": m.method,
                    "headers": m.headers.iter().map(match_json).collect::<Vec<_>>(),
                    "queryParams": m.query_params.iter().map(match_json).collect::<Vec<_>>(),
                    "grpc": (!m.grpc_type.is_empty()).then(|| json!({
                        "type": m.grpc_type, "service": m.grpc_service, "method": m.grpc_method,
                    })),
                })).collect::<Vec<_>>(),
                "backends": rule.backends.iter().map(backend_json).collect::<Vec<_>>(),
                "filters": rule.filters.iter().map(filter_json).collect::<Vec<_>>(),
                "timeoutMs": rule.timeout_ms,
                "backendTimeoutMs": rule.backend_timeout_ms,
            })).collect::<Vec<_>>(),
        }),
        Kind::Policy(p) => crate::policy::dump_proto(p),
    }
}

fn match_json(h: &v1::HeaderMatch) -> Value {
    json!({"name": h.name, "value": h.value, "type": h.r#type})
}

fn backend_json(b: &v1::BackendRef) -> Value {
    json!({"service": b.service, "port": b.port, "weight": b.weight})
}

fn filter_json(f: &v1::RouteFilter) -> Value {
    use v1::route_filter::Kind as F;
    let headers = |m: &v1::HeaderModifier| {
        let pairs = |v: &[v1::Header]| {
            v.iter()
                .map(|h| json!({"name": h.name, "value": h.value}))
                .collect::<Vec<_>>()
        };
        json!({"set": pairs(&m.set), "add": pairs(&m.add), "remove": m.remove})
    };
    let path = |p: &Option<v1::PathModifier>| {
        p.as_ref()
            .map(|p| json!({"type": p.r#type, "value": p.value}))
    };
    match &f.kind {
        Some(F::RequestHeaderModifier(m)) => {
            json!({"type": "RequestHeaderModifier", "requestHeaderModifier": headers(m)})
        }
        Some(F::ResponseHeaderModifier(m)) => {
            json!({"type": "ResponseHeaderModifier", "responseHeaderModifier": headers(m)})
        }
        Some(F::RequestRedirect(r)) => json!({"type": "RequestRedirect", "requestRedirect": {
            "scheme": r.scheme, "hostname": r.hostname, "path": path(&r.path), "port": r.port, "statusCode": r.status_code,
        }}),
        Some(F::UrlRewrite(r)) => {
            json!({"type": "URLRewrite", "urlRewrite": {"hostname": r.hostname, "path": path(&r.path)}})
        }
        Some(F::RequestMirror(m)) => json!({"type": "RequestMirror", "requestMirror": {
            "backend": m.backend.as_ref().map(backend_json), "numerator": m.numerator, "denominator": m.denominator,
        }}),
        None => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(vip: &str, port: u32, protocol: &str) -> v1::Service {
        v1::Service {
            traffic: None,
            name: "web".into(),
            namespace: "shop".into(),
            vips: vec![vip.into()],
            ports: vec![v1::ServicePort {
                port,
                target_port: 8080,
                protocol: protocol.into(),
                name: String::new(),
            }],
        }
    }

    #[test]
    fn services_with_bad_vips_ports_or_protocols_are_refused_with_the_reason() {
        let ok = service(&svc("198.19.0.1", 80, "http")).unwrap();
        assert_eq!(ok.ports[0].protocol, Some(Protocol::Http));
        assert_eq!(ok.ports[0].target_port, 8080);
        // Not declared: detected by the sidecar.
        assert_eq!(
            service(&svc("198.19.0.1", 80, "")).unwrap().ports[0].protocol,
            None
        );
        let err = service(&svc("not-an-ip", 80, "tcp")).unwrap_err();
        assert!(err.contains("not-an-ip"), "{err}");
        let err = service(&svc("198.19.0.1", 0, "tcp")).unwrap_err();
        assert!(err.contains("port 0"), "{err}");
        let err = service(&svc("198.19.0.1", 80, "quic")).unwrap_err();
        assert!(err.contains("quic"), "{err}");
    }

    #[test]
    fn endpoints_keep_only_ready_ones_with_their_identity_and_locality() {
        let e = v1::Endpoints {
            service: "web".into(),
            namespace: "shop".into(),
            endpoints: vec![
                v1::Endpoint {
                    address: "198.18.0.2".into(),
                    workload: "web-0".into(),
                    ready: true,
                    meshed: true,
                    weight: 3,
                    identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
                    locality: Some(v1::Locality {
                        zone: "a".into(),
                        ..Default::default()
                    }),
                },
                v1::Endpoint {
                    address: "198.18.0.3".into(),
                    workload: "web-1".into(),
                    ready: false,
                    ..Default::default()
                },
            ],
        };
        let eps = endpoints(&e).unwrap();
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].zone.as_deref(), Some("a"));
        assert_eq!(eps[0].region, None);
        assert_eq!(&*eps[0].pod, "web-0");
        assert_eq!(&*eps[0].identity, "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!((eps[0].weight, eps[0].meshed), (3, true));

        let mut bad = e.clone();
        bad.endpoints[0].address = "198.18.0.300".into();
        assert!(endpoints(&bad).unwrap_err().contains("198.18.0.300"));
    }
}
