//! Kubernetes objects → the summaries the [`super::cluster`] keeps, and routes and Muon's
//! custom resources → Muon objects. Pure functions; the only place that reads Kubernetes
//! types.

use super::cluster::{
    EndpointState, Key, PodInfo, ServiceInfo, ServicePortInfo, SliceInfo, TargetPort,
};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::DynamicObject;
use muon_core::resource::{
    Kind, LocalitySpec, Object, ObjectKey, DEFAULT_NAMESPACE, DEFAULT_SERVICE_ACCOUNT,
    GATEWAY_API_GROUP,
};
use serde_json::{json, Value as Json};

/// The label the endpoints controller puts on each EndpointSlice.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";

fn key(meta: &ObjectMeta) -> Option<Key> {
    let name = meta.name.clone()?;
    let ns = meta
        .namespace
        .clone()
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
    Some((ns, name))
}

/// Muon's protocol for a Service port's `appProtocol` (standard names, IANA service names
/// and the `kubernetes.io/` ones); unknown or absent: sidecars detect it.
pub fn app_protocol(app: &str) -> Option<&'static str> {
    match app.to_ascii_lowercase().as_str() {
        "http" | "kubernetes.io/ws" => Some("http"),
        "http2" | "h2c" | "kubernetes.io/h2c" => Some("http2"),
        "grpc" => Some("grpc"),
        "https" | "tls" | "kubernetes.io/wss" => Some("tls"),
        "tcp" => Some("tcp"),
        "opaque" => Some("opaque"),
        _ => None,
    }
}

/// The ports a Service's `muon.io/opaque-ports` annotation names (`3306,6379` or
/// `4000-4100`): carried as opaque bytes, never detected or parsed as HTTP. Entries that are
/// not ports are left out (and logged).
fn opaque_ports(meta: &ObjectMeta) -> Vec<std::ops::RangeInclusive<u32>> {
    let Some(value) = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get("muon.io/opaque-ports"))
    else {
        return Vec::new();
    };
    let port = |s: &str| {
        s.trim()
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .map(u32::from)
    };
    value
        .split(',')
        .filter(|e| !e.trim().is_empty())
        .filter_map(|e| {
            let range = match e.split_once('-') {
                Some((a, b)) => port(a).zip(port(b)).filter(|(a, b)| a <= b),
                None => port(e).map(|p| (p, p)),
            };
            if range.is_none() {
                tracing::warn!(service = ?meta.name, entry = e, "muon.io/opaque-ports: not a port or a range of ports; left out");
            }
            range.map(|(a, b)| a..=b)
        })
        .collect()
}

pub fn service(s: &Service) -> Option<(Key, ServiceInfo)> {
    let key = key(&s.metadata)?;
    let spec = s.spec.clone().unwrap_or_default();
    let headless = |ip: &String| ip.is_empty() || ip == "None";
    let mut vips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if vips.is_empty() {
        vips.extend(spec.cluster_ip.clone());
    }
    vips.retain(|ip| !headless(ip));
    if spec.type_.as_deref() == Some("ExternalName") {
        vips.clear();
    }
    let opaque = opaque_ports(&s.metadata);
    let ports = spec
        .ports
        .unwrap_or_default()
        .into_iter()
        // Muon carries TCP; UDP and SCTP ports are not its business.
        .filter(|p| p.protocol.as_deref().is_none_or(|x| x == "TCP"))
        .filter_map(|p| {
            let port = u32::try_from(p.port).ok()?;
            let target = match p.target_port {
                None => TargetPort::Number(port),
                Some(IntOrString::Int(n)) => TargetPort::Number(u32::try_from(n).ok()?),
                Some(IntOrString::String(name)) => match name.parse::<u32>() {
                    Ok(n) => TargetPort::Number(n),
                    Err(_) => TargetPort::Named(name),
                },
            };
            Some(ServicePortInfo {
                name: p.name.filter(|n| !n.is_empty()),
                port,
                target,
                protocol: match opaque.iter().any(|r| r.contains(&port)) {
                    true => Some("opaque".to_string()),
                    false => p
                        .app_protocol
                        .as_deref()
                        .and_then(app_protocol)
                        .map(str::to_string),
                },
            })
        })
        .collect();
    Some((
        key,
        ServiceInfo {
            labels: s.metadata.labels.clone().unwrap_or_default(),
            vips,
            ports,
            selector: spec.selector.unwrap_or_default(),
        },
    ))
}

pub fn slice(s: &EndpointSlice) -> Option<(Key, SliceInfo)> {
    let key = key(&s.metadata)?;
    let service = s
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned();
    let mut pods = std::collections::BTreeMap::new();
    for e in &s.endpoints {
        let Some(target) = &e.target_ref else {
            continue;
        };
        if target.kind.as_deref() != Some("Pod") {
            continue;
        }
        let Some(name) = target.name.clone() else {
            continue;
        };
        let c = e.conditions.clone().unwrap_or_default();
        let ready = c.ready.unwrap_or(true) && !c.terminating.unwrap_or(false);
        // A pod listed twice (two address families) is ready when either entry is.
        let entry = pods.entry(name).or_insert_with(|| EndpointState {
            ready,
            zone: e.zone.clone().filter(|z| !z.is_empty()),
        });
        entry.ready |= ready;
    }
    let ports = s
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let port = u32::try_from(p.port?).ok()?;
            Some((p.name.clone().unwrap_or_default(), port))
        })
        .collect();
    Some((
        key,
        SliceInfo {
            service,
            pods,
            ports,
        },
    ))
}

pub fn pod(p: &Pod) -> Option<(Key, PodInfo)> {
    let key = key(&p.metadata)?;
    let spec = p.spec.clone().unwrap_or_default();
    let status = p.status.clone().unwrap_or_default();
    let finished = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
    let host_network = spec.host_network.unwrap_or(false);
    let ip = status
        .pod_ip
        .filter(|ip| !ip.is_empty() && !finished && !host_network);
    let proxy = muon_inject::template::PROXY_CONTAINER;
    let meshed = spec.containers.iter().any(|c| c.name == proxy)
        || spec
            .init_containers
            .iter()
            .flatten()
            .any(|c| c.name == proxy);
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    Some((
        key,
        PodInfo {
            labels: p.metadata.labels.clone().unwrap_or_default(),
            ip,
            service_account: spec
                .service_account_name
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_string()),
            node: spec.node_name.filter(|n| !n.is_empty()),
            meshed,
            ready,
            terminating: p.metadata.deletion_timestamp.is_some(),
        },
    ))
}

/// A namespace, and whether it opted in to injection (`muon.io/inject=enabled`).
pub fn namespace(n: &Namespace) -> Option<(String, bool)> {
    let name = n.metadata.name.clone()?;
    let on = n
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("muon.io/inject"))
        .is_some_and(|v| v == "enabled");
    Some((name, on))
}

pub fn node(n: &Node) -> Option<(String, LocalitySpec)> {
    let name = n.metadata.name.clone()?;
    let labels = n.metadata.labels.clone().unwrap_or_default();
    let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
    Some((
        name,
        LocalitySpec {
            zone: get(ZONE_LABEL),
            region: get(REGION_LABEL),
            cloud: String::new(),
        },
    ))
}

/// The key a dynamic object of `kind` has.
pub fn dynamic_key(kind: Kind, o: &DynamicObject) -> Option<ObjectKey> {
    let (namespace, name) = key(&o.metadata)?;
    Some(ObjectKey {
        kind,
        namespace,
        name,
    })
}

/// An HTTPRoute, a GRPCRoute or one of Muon's custom resources as a Muon object, validated
/// as the API validates; `Err` says why it is left out. A route is kept only when one of its
/// parents is a Service (the mesh's routes, GAMMA); routes of Gateways are not Muon's.
pub fn dynamic(kind: Kind, o: &DynamicObject) -> Result<Option<Object>, String> {
    let mut spec = o.data.get("spec").cloned().unwrap_or(Json::Null);
    if matches!(kind, Kind::HttpRoute | Kind::GrpcRoute) && !mesh_route(&mut spec) {
        return Ok(None);
    }
    let envelope = json!({
        "apiVersion": kind.api_version(),
        "kind": kind.as_str(),
        "metadata": {
            "name": o.metadata.name,
            "namespace": o.metadata.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE),
            "labels": o.metadata.labels.clone().unwrap_or_default(),
        },
        "spec": spec,
    });
    Object::from_json(&envelope, 0)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// Makes each parentRef's kind and group explicit as the Gateway API defaults them (kind
/// `Gateway`; Muon's own default is `Service`), and says whether one of them is a Service.
fn mesh_route(spec: &mut Json) -> bool {
    let Some(parents) = spec.get_mut("parentRefs").and_then(Json::as_array_mut) else {
        return false;
    };
    let mut service = false;
    for p in parents {
        let Some(p) = p.as_object_mut() else { continue };
        let kind = p
            .get("kind")
            .and_then(Json::as_str)
            .unwrap_or("Gateway")
            .to_string();
        if kind == "Service" {
            service |= p
                .get("group")
                .and_then(Json::as_str)
                .unwrap_or("")
                .is_empty();
        } else if !p.contains_key("group") {
            p.insert("group".into(), json!(GATEWAY_API_GROUP));
        }
        p.insert("kind".into(), json!(kind));
    }
    service
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from<T: serde::de::DeserializeOwned>(v: Json) -> T {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_namespace_opts_in_with_the_injection_label() {
        let ns = |labels: Json| -> Namespace {
            from(serde_json::json!({"metadata": {"name": "shop", "labels": labels}}))
        };
        assert_eq!(
            namespace(&ns(serde_json::json!({"muon.io/inject": "enabled"}))),
            Some(("shop".into(), true))
        );
        assert_eq!(
            namespace(&ns(serde_json::json!({"muon.io/inject": "disabled"}))),
            Some(("shop".into(), false))
        );
        assert_eq!(
            namespace(&ns(serde_json::json!({}))),
            Some(("shop".into(), false))
        );
    }

    #[test]
    fn opaque_ports_on_a_service_make_its_ports_opaque_whatever_their_app_protocol() {
        let s: Service = from(serde_json::json!({
            "metadata": {"name": "db", "namespace": "shop",
                         "annotations": {"muon.io/opaque-ports": "3306, 9000-9001,x,0"}},
            "spec": {"clusterIP": "10.96.0.9", "ports": [
                {"port": 3306, "appProtocol": "http"},
                {"port": 9001},
                {"port": 8080, "appProtocol": "http"}]}
        }));
        let (_, info) = service(&s).unwrap();
        let protocols: Vec<Option<&str>> =
            info.ports.iter().map(|p| p.protocol.as_deref()).collect();
        assert_eq!(protocols, [Some("opaque"), Some("opaque"), Some("http")]);
    }

    #[test]
    fn app_protocols_map_to_muons_and_unknown_ones_are_detected() {
        for (app, want) in [
            ("http", Some("http")),
            ("kubernetes.io/h2c", Some("http2")),
            ("GRPC", Some("grpc")),
            ("kubernetes.io/wss", Some("tls")),
            ("mysql", None),
        ] {
            assert_eq!(app_protocol(app), want, "{app}");
        }
    }

    #[test]
    fn pods_on_the_host_network_or_finished_have_no_address_and_the_sidecar_makes_them_meshed() {
        let pod = |spec: Json, status: Json| -> PodInfo {
            pod(&from(
                json!({"metadata": {"name": "p", "namespace": "shop"},
                               "spec": spec, "status": status}),
            ))
            .unwrap()
            .1
        };
        let running = json!({"phase": "Running", "podIP": "198.18.0.9",
                             "conditions": [{"type": "Ready", "status": "True"}]});
        let p = pod(
            json!({"containers": [{"name": "app"}],
                   "initContainers": [{"name": "muon-proxy", "restartPolicy": "Always"}]}),
            running.clone(),
        );
        assert_eq!(p.ip.as_deref(), Some("198.18.0.9"));
        assert_eq!(p.service_account, "default");
        assert!(p.meshed && p.ready && !p.terminating);
        let p = pod(
            json!({"hostNetwork": true, "containers": [{"name": "app"}]}),
            running,
        );
        assert!(p.ip.is_none() && !p.meshed);
        let p = pod(
            json!({"containers": [{"name": "app"}]}),
            json!({"phase": "Failed", "podIP": "198.18.0.9"}),
        );
        assert!(p.ip.is_none() && !p.ready);
    }

    #[test]
    fn terminating_endpoints_are_not_ready_and_absent_conditions_are() {
        let (_, s) = slice(&from(json!({
            "metadata": {"name": "web-1", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["198.18.0.3"], "targetRef": {"kind": "Pod", "name": "a"},
                 "zone": "zone-a"},
                {"addresses": ["198.18.0.4"], "targetRef": {"kind": "Pod", "name": "b"},
                 "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["198.18.0.5"]}
            ],
            "ports": [{"name": "http", "port": 8080}]
        })))
        .unwrap();
        assert_eq!(s.service.as_deref(), Some("web"));
        let ready: Vec<(&str, bool)> = s.pods.iter().map(|(p, e)| (p.as_str(), e.ready)).collect();
        assert_eq!(ready, [("a", true), ("b", false)]);
        assert_eq!(s.pods["a"].zone.as_deref(), Some("zone-a"));
        assert_eq!(s.ports["http"], 8080);
    }

    #[test]
    fn routes_are_kept_only_with_a_service_parent_and_parent_kinds_default_as_the_gateway_apis() {
        let route = |parents: Json| -> DynamicObject {
            from(
                json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": {"name": "r", "namespace": "shop"},
                "spec": {"parentRefs": parents,
                         "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]},
                "status": {"parents": []}}),
            )
        };
        assert_eq!(
            dynamic(Kind::HttpRoute, &route(json!([{"name": "edge"}]))),
            Ok(None)
        );
        let o = dynamic(
            Kind::HttpRoute,
            &route(json!([{"name": "edge"}, {"kind": "Service", "name": "web"}])),
        )
        .unwrap()
        .unwrap();
        let muon_core::resource::Spec::HttpRoute(r) = &o.spec else {
            panic!("not a route")
        };
        let kinds: Vec<&str> = r.parent_refs.iter().map(|p| p.kind.as_str()).collect();
        assert_eq!(kinds, ["Gateway", "Service"]);
        let err = dynamic(
            Kind::HttpRoute,
            &route(json!([{"kind": "Service", "name": "web", "port": 0}])),
        )
        .unwrap_err();
        assert!(
            err.contains("HTTPRoute shop/r: spec.parentRefs[0].port"),
            "{err}"
        );
    }
}
