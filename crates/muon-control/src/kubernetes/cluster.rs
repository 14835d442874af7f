//! What the Kubernetes source knows of the cluster, and the Muon objects it derives: pure
//! state, no I/O, so every rule here is tested without an API server.
//!
//! The watchers (`super`) turn each Kubernetes object into a small summary ([`PodInfo`],
//! [`SliceInfo`], ...) and hand it here as an [`Update`]. Each update marks what it touches as
//! dirty, and [`Cluster::flush`] converts only the dirty things and returns the objects that
//! really changed, so one changed EndpointSlice costs work proportional to that slice:
//!
//! - a Pod becomes a `Workload` (address, labels, service account → identity, locality from
//!   its node's topology labels, meshed when it runs Muon's sidecar), ready when the
//!   EndpointSlices listing it say so;
//! - an EndpointSlice changes the readiness of the pods it lists (and resolves named target
//!   ports of its Service);
//! - a Node's topology labels change the locality of the pods on it;
//! - a Service (with a cluster IP) becomes a Muon `Service` with the same selector;
//! - HTTPRoutes, GRPCRoutes and Muon's own kinds arrive already converted ([`super::convert`]).
//!
//! A relist (`Init`, `InitApply`..., `InitDone`) is buffered and swapped in at `InitDone`, so
//! until then the last good state keeps serving; objects missing from the relist are removed.

use muon_core::resource::{
    Kind, LocalitySpec, Metadata, Object, ObjectKey, ServicePortSpec, ServiceSpec, Spec,
    WorkloadSpec,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;

/// A namespaced name.
pub type Key = (String, String);

/// One event of one resource's watcher, its object already summarised.
#[derive(Debug, Clone)]
pub enum Event<K, T> {
    /// A relist starts: what follows until `InitDone` is the complete set.
    Init,
    InitApply(K, T),
    InitDone,
    Apply(K, T),
    Delete(K),
}

/// An event for one of the resources the source watches.
#[derive(Debug, Clone)]
pub enum Update {
    Service(Event<Key, ServiceInfo>),
    Slice(Event<Key, SliceInfo>),
    Pod(Event<Key, PodInfo>),
    /// Keyed by node name (nodes have no namespace).
    Node(Event<String, LocalitySpec>),
    /// A namespace, and whether it opted in to injection (`muon.io/inject=enabled`).
    Namespace(Event<String, bool>),
    /// Routes and Muon's own kinds: one Muon object each (`None`: the object did not convert
    /// and is left out). Boxed: an object is much larger than the other summaries.
    Object(Kind, Box<Event<ObjectKey, Option<Object>>>),
}

/// What the source keeps of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    pub labels: BTreeMap<String, String>,
    /// The cluster IPs; empty for a headless or ExternalName Service (left out: Muon routes
    /// by virtual IP).
    pub vips: Vec<String>,
    pub ports: Vec<ServicePortInfo>,
    pub selector: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortInfo {
    pub name: Option<String>,
    pub port: u32,
    pub target: TargetPort,
    /// Muon's protocol name from `appProtocol`; `None`: sidecars detect it.
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u32),
    /// A container port name, resolved through the Service's EndpointSlices.
    Named(String),
}

/// What the source keeps of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SliceInfo {
    /// `kubernetes.io/service-name`.
    pub service: Option<String>,
    /// The pods it lists (by name, in the slice's namespace) and whether each is ready.
    pub pods: BTreeMap<String, EndpointState>,
    /// Port name → number, as the endpoints controller resolved them.
    pub ports: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EndpointState {
    /// `conditions.ready` (absent: ready, as the API says to read it). A terminating pod is
    /// not ready, even while it is still `serving`.
    pub ready: bool,
    /// The endpoint's `zone`: the pod's zone when its node's labels are not known.
    pub zone: Option<String>,
}

/// What the source keeps of a Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub labels: BTreeMap<String, String>,
    /// `status.podIP`; a pod without one (pending, host network, finished) is no Workload.
    pub ip: Option<String>,
    pub service_account: String,
    pub node: Option<String>,
    /// It runs Muon's sidecar (a container or native sidecar named `muon-proxy`).
    pub meshed: bool,
    /// Its `Ready` condition, used while no EndpointSlice lists it.
    pub ready: bool,
    /// It has a deletion timestamp.
    pub terminating: bool,
}

/// Objects of one resource, with the buffer of a relist in progress.
#[derive(Debug)]
struct Table<K, T> {
    items: HashMap<K, T>,
    relisting: Option<HashMap<K, T>>,
}

impl<K, T> Default for Table<K, T> {
    fn default() -> Self {
        Table {
            items: HashMap::new(),
            relisting: None,
        }
    }
}

/// One object that changed: its key, what it was and what it is.
type Changed<K, T> = (K, Option<T>, Option<T>);

impl<K: Clone + Eq + Hash, T: Clone + PartialEq> Table<K, T> {
    fn apply(&mut self, event: Event<K, T>) -> Vec<Changed<K, T>> {
        match event {
            Event::Init => {
                self.relisting = Some(HashMap::new());
                Vec::new()
            }
            Event::InitApply(k, v) => {
                // Without a preceding Init (it cannot happen), take it as an Apply.
                match &mut self.relisting {
                    Some(buffer) => {
                        buffer.insert(k, v);
                        Vec::new()
                    }
                    None => self.apply(Event::Apply(k, v)),
                }
            }
            Event::InitDone => {
                let Some(next) = self.relisting.take() else {
                    return Vec::new();
                };
                let old = std::mem::replace(&mut self.items, next);
                let mut out = Vec::new();
                for (k, v) in &self.items {
                    let before = old.get(k);
                    if before != Some(v) {
                        out.push((k.clone(), before.cloned(), Some(v.clone())));
                    }
                }
                for (k, v) in old {
                    if !self.items.contains_key(&k) {
                        out.push((k, Some(v), None));
                    }
                }
                out
            }
            Event::Apply(k, v) => {
                let before = self.items.insert(k.clone(), v.clone());
                if before.as_ref() == Some(&v) {
                    Vec::new()
                } else {
                    vec![(k, before, Some(v))]
                }
            }
            Event::Delete(k) => match self.items.remove(&k) {
                Some(before) => vec![(k, Some(before), None)],
                None => Vec::new(),
            },
        }
    }
}

/// The objects that changed since the last flush.
#[derive(Debug, Default, PartialEq)]
pub struct Delta {
    pub upserts: Vec<Object>,
    pub removals: Vec<ObjectKey>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removals.is_empty()
    }
}

/// The cluster as the source sees it.
#[derive(Debug, Default)]
pub struct Cluster {
    services: Table<Key, ServiceInfo>,
    slices: Table<Key, SliceInfo>,
    pods: Table<Key, PodInfo>,
    nodes: Table<String, LocalitySpec>,
    /// Namespace → labelled `muon.io/inject=enabled`.
    namespaces: Table<String, bool>,
    objects: HashMap<Kind, Table<ObjectKey, Option<Object>>>,
    /// Pod → the slices listing it and what each says.
    endpoints: HashMap<Key, BTreeMap<String, EndpointState>>,
    /// Node name → its pods, so a node's new labels reach exactly them.
    pods_by_node: HashMap<String, BTreeSet<Key>>,
    /// Service → its slices, for named target ports.
    slices_by_service: HashMap<Key, BTreeSet<String>>,
    /// Namespace → how many of its pods run Muon's sidecar.
    meshed: BTreeMap<String, usize>,
    dirty_pods: BTreeSet<Key>,
    dirty_services: BTreeSet<Key>,
    dirty_objects: BTreeSet<ObjectKey>,
    /// What the last flushes produced, by key: what the registry has from this source.
    sent: HashMap<ObjectKey, Object>,
}

impl Cluster {
    /// Takes one event in; nothing is converted until [`Cluster::flush`].
    pub fn apply(&mut self, update: Update) {
        match update {
            Update::Service(e) => {
                for (key, _, _) in self.services.apply(e) {
                    self.dirty_services.insert(key);
                }
            }
            Update::Slice(e) => {
                for (key, before, after) in self.slices.apply(e) {
                    self.slice_changed(&key, before, after);
                }
            }
            Update::Pod(e) => {
                for (key, before, after) in self.pods.apply(e) {
                    let was = before.as_ref().is_some_and(|p| p.meshed);
                    let is = after.as_ref().is_some_and(|p| p.meshed);
                    if was && !is {
                        if let Some(n) = self.meshed.get_mut(&key.0) {
                            *n -= 1;
                            if *n == 0 {
                                self.meshed.remove(&key.0);
                            }
                        }
                    } else if is && !was {
                        *self.meshed.entry(key.0.clone()).or_default() += 1;
                    }
                    let old_node = before.and_then(|p| p.node);
                    let new_node = after.and_then(|p| p.node);
                    if old_node != new_node {
                        if let Some(n) = old_node {
                            if let Some(set) = self.pods_by_node.get_mut(&n) {
                                set.remove(&key);
                                if set.is_empty() {
                                    self.pods_by_node.remove(&n);
                                }
                            }
                        }
                        if let Some(n) = new_node {
                            self.pods_by_node.entry(n).or_default().insert(key.clone());
                        }
                    }
                    self.dirty_pods.insert(key);
                }
            }
            Update::Node(e) => {
                for (node, _, _) in self.nodes.apply(e) {
                    if let Some(pods) = self.pods_by_node.get(&node) {
                        self.dirty_pods.extend(pods.iter().cloned());
                    }
                }
            }
            Update::Namespace(e) => {
                self.namespaces.apply(e);
            }
            Update::Object(kind, e) => {
                for (key, _, _) in self.objects.entry(kind).or_default().apply(*e) {
                    self.dirty_objects.insert(key);
                }
            }
        }
    }

    /// The namespaces with a pod that runs Muon's sidecar: where it needs the trust bundle.
    /// The namespaces that need the trust bundle: those with meshed pods, and those that
    /// opted in to injection (so the bundle is there before their first injected pod, which
    /// mounts it, starts).
    pub fn meshed_namespaces(&self) -> BTreeSet<String> {
        let opted_in = self
            .namespaces
            .items
            .iter()
            .filter(|(_, on)| **on)
            .map(|(ns, _)| ns);
        self.meshed.keys().chain(opted_in).cloned().collect()
    }

    fn slice_changed(&mut self, key: &Key, before: Option<SliceInfo>, after: Option<SliceInfo>) {
        let (ns, slice) = key;
        let empty = SliceInfo::default();
        let old = before.as_ref().unwrap_or(&empty);
        let new = after.as_ref().unwrap_or(&empty);
        for (pod, state) in &old.pods {
            if new.pods.get(pod) == Some(state) {
                continue;
            }
            let pod_key = (ns.clone(), pod.clone());
            if let Some(states) = self.endpoints.get_mut(&pod_key) {
                states.remove(slice);
                if states.is_empty() {
                    self.endpoints.remove(&pod_key);
                }
            }
            self.dirty_pods.insert(pod_key);
        }
        for (pod, state) in &new.pods {
            if old.pods.get(pod) == Some(state) {
                continue;
            }
            let pod_key = (ns.clone(), pod.clone());
            self.endpoints
                .entry(pod_key.clone())
                .or_default()
                .insert(slice.clone(), state.clone());
            self.dirty_pods.insert(pod_key);
        }
        if old.service != new.service || old.ports != new.ports {
            if let Some(svc) = &old.service {
                let svc_key = (ns.clone(), svc.clone());
                if let Some(set) = self.slices_by_service.get_mut(&svc_key) {
                    set.remove(slice);
                    if set.is_empty() {
                        self.slices_by_service.remove(&svc_key);
                    }
                }
                self.dirty_services.insert(svc_key);
            }
            if let Some(svc) = &new.service {
                let svc_key = (ns.clone(), svc.clone());
                self.slices_by_service
                    .entry(svc_key.clone())
                    .or_default()
                    .insert(slice.clone());
                self.dirty_services.insert(svc_key);
            }
        }
    }

    /// Converts what changed since the last flush; returns the objects that differ from what
    /// was sent (a Kubernetes object of the same key wins over a Muon CRD's).
    pub fn flush(&mut self) -> Delta {
        let mut derived: BTreeMap<ObjectKey, Option<Object>> = BTreeMap::new();
        for key in std::mem::take(&mut self.dirty_pods) {
            let object = self.workload(&key);
            derived.insert(object_key(Kind::Workload, &key), object);
        }
        for key in std::mem::take(&mut self.dirty_services) {
            let object = self.service(&key);
            derived.insert(object_key(Kind::Service, &key), object);
        }
        for key in std::mem::take(&mut self.dirty_objects) {
            if derived.contains_key(&key) {
                continue;
            }
            let name = (key.namespace.clone(), key.name.clone());
            let core = match key.kind {
                Kind::Workload => self.workload(&name),
                Kind::Service => self.service(&name),
                _ => None,
            };
            derived.insert(key, core);
        }
        let mut delta = Delta::default();
        for (key, core) in derived {
            // A derived Service or Workload shadows a Muon object of the same key.
            let object = core.or_else(|| {
                self.objects
                    .get(&key.kind)
                    .and_then(|t| t.items.get(&key))
                    .cloned()
                    .flatten()
            });
            match object {
                Some(o) => {
                    if self.sent.get(&key) != Some(&o) {
                        self.sent.insert(key, o.clone());
                        delta.upserts.push(o);
                    }
                }
                None => {
                    if self.sent.remove(&key).is_some() {
                        delta.removals.push(key);
                    }
                }
            }
        }
        delta
    }

    fn workload(&self, key: &Key) -> Option<Object> {
        let pod = self.pods.items.get(key)?;
        let ip = pod.ip.clone()?;
        let mut locality = pod
            .node
            .as_ref()
            .and_then(|n| self.nodes.items.get(n))
            .cloned()
            .unwrap_or_default();
        if locality.zone.is_empty() {
            let zone = self.endpoints.get(key).into_iter().flatten();
            if let Some(z) = zone.filter_map(|(_, e)| e.zone.clone()).next() {
                locality.zone = z;
            }
        }
        // Listed by slices: ready when any of them says so; else the pod's own condition.
        let ready = match self.endpoints.get(key) {
            Some(states) => states.values().any(|s| s.ready),
            None => pod.ready,
        } && !pod.terminating;
        let object = Object {
            metadata: Metadata {
                name: key.1.clone(),
                namespace: key.0.clone(),
                labels: pod.labels.clone(),
            },
            spec: Spec::Workload(WorkloadSpec {
                address: ip,
                ports: Vec::new(),
                service_account: pod.service_account.clone(),
                locality,
                weight: 1,
                ready,
                meshed: pod.meshed,
            }),
        };
        validated(object)
    }

    fn service(&self, key: &Key) -> Option<Object> {
        let svc = self.services.items.get(key)?;
        if svc.vips.is_empty() {
            return None;
        }
        let slices: Vec<&SliceInfo> = self
            .slices_by_service
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|s| self.slices.items.get(&(key.0.clone(), s.clone())))
            .collect();
        let ports = svc
            .ports
            .iter()
            .filter_map(|p| {
                let target = match &p.target {
                    TargetPort::Number(n) => *n,
                    // The endpoints controller names a slice's ports after the Service's.
                    TargetPort::Named(_) => {
                        let name = p.name.clone().unwrap_or_default();
                        match slices.iter().find_map(|s| s.ports.get(&name)) {
                            Some(n) => *n,
                            None => {
                                tracing::debug!(service = %format!("{}/{}", key.0, key.1), port = p.port, "named target port not resolved yet; port left out");
                                return None;
                            }
                        }
                    }
                };
                Some(ServicePortSpec {
                    port: p.port,
                    target_port: Some(target),
                    protocol: p.protocol.clone(),
                    name: p.name.clone(),
                })
            })
            .collect();
        let object = Object {
            metadata: Metadata {
                name: key.1.clone(),
                namespace: key.0.clone(),
                labels: svc.labels.clone(),
            },
            spec: Spec::Service(ServiceSpec {
                vips: svc.vips.clone(),
                ports,
                selector: svc.selector.clone(),
            }),
        };
        validated(object)
    }
}

fn object_key(kind: Kind, key: &Key) -> ObjectKey {
    ObjectKey {
        kind,
        namespace: key.0.clone(),
        name: key.1.clone(),
    }
}

/// Runs Muon's own validation over a derived object (the same as the API's), so nothing the
/// API would refuse enters the registry this way; a refused object is logged and left out.
fn validated(o: Object) -> Option<Object> {
    let json = o.to_json();
    match Object::from_json(&json, 0) {
        Ok(o) => Some(o),
        Err(e) => {
            tracing::warn!(object = %o.key(), "Kubernetes object left out:\n{e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(name: &str) -> Key {
        ("shop".into(), name.into())
    }

    fn pod(node: &str, ip: &str) -> PodInfo {
        PodInfo {
            labels: [("app".to_string(), "web".to_string())].into(),
            ip: Some(ip.into()),
            service_account: "web".into(),
            node: Some(node.into()),
            meshed: true,
            ready: true,
            terminating: false,
        }
    }

    fn slice(pods: &[(&str, bool)]) -> SliceInfo {
        SliceInfo {
            service: Some("web".into()),
            pods: pods
                .iter()
                .map(|(p, ready)| {
                    let state = EndpointState {
                        ready: *ready,
                        zone: Some("zone-s".into()),
                    };
                    (p.to_string(), state)
                })
                .collect(),
            ports: BTreeMap::new(),
        }
    }

    fn names(d: &Delta) -> Vec<String> {
        d.upserts
            .iter()
            .map(|o| o.key().to_string())
            .chain(d.removals.iter().map(|k| format!("-{k}")))
            .collect()
    }

    fn ready(c: &Cluster, name: &str) -> bool {
        let key = ObjectKey {
            kind: Kind::Workload,
            namespace: "shop".into(),
            name: name.into(),
        };
        match &c.sent[&key].spec {
            Spec::Workload(w) => w.ready,
            _ => unreachable!(),
        }
    }

    fn cluster() -> Cluster {
        let mut c = Cluster::default();
        c.apply(Update::Node(Event::Apply(
            "node-a".into(),
            LocalitySpec {
                zone: "zone-a".into(),
                region: "region-1".into(),
                cloud: String::new(),
            },
        )));
        for i in 0..100 {
            c.apply(Update::Pod(Event::Apply(
                k(&format!("web-{i}")),
                pod(
                    if i < 50 { "node-a" } else { "node-b" },
                    &format!("198.18.1.{}", i + 1),
                ),
            )));
        }
        // Ten slices of ten pods each.
        for s in 0..10 {
            let pods: Vec<(String, bool)> = (0..10)
                .map(|i| (format!("web-{}", s * 10 + i), true))
                .collect();
            let pods: Vec<(&str, bool)> = pods.iter().map(|(p, r)| (p.as_str(), *r)).collect();
            c.apply(Update::Slice(Event::Apply(
                k(&format!("web-{s}")),
                slice(&pods),
            )));
        }
        let d = c.flush();
        assert_eq!(d.upserts.len(), 100);
        // node-a's pods have its zone; node-b is not known, so its pods take their endpoints'.
        let zones: BTreeSet<String> = d
            .upserts
            .iter()
            .map(|o| match &o.spec {
                Spec::Workload(w) => format!("{}/{}", w.locality.zone, w.locality.region),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(
            zones,
            ["zone-a/region-1", "zone-s/"].map(String::from).into()
        );
        c
    }

    #[test]
    fn a_namespace_is_meshed_while_one_of_its_pods_runs_the_sidecar() {
        let mut c = Cluster::default();
        let key = |ns: &str, name: &str| (ns.to_string(), name.to_string());
        let plain = PodInfo {
            meshed: false,
            ..pod("n1", "10.0.0.9")
        };
        c.apply(Update::Pod(Event::Apply(
            key("shop", "web-0"),
            pod("n1", "10.0.0.1"),
        )));
        c.apply(Update::Pod(Event::Apply(
            key("shop", "web-1"),
            pod("n1", "10.0.0.2"),
        )));
        c.apply(Update::Pod(Event::Apply(
            key("batch", "job"),
            plain.clone(),
        )));
        assert_eq!(c.meshed_namespaces(), BTreeSet::from(["shop".to_string()]));
        // The same pod again counts once; one of two gone keeps the namespace meshed.
        c.apply(Update::Pod(Event::Apply(
            key("shop", "web-0"),
            pod("n1", "10.0.0.1"),
        )));
        c.apply(Update::Pod(Event::Delete(key("shop", "web-0"))));
        assert_eq!(c.meshed_namespaces(), BTreeSet::from(["shop".to_string()]));
        // The last one losing its sidecar, or a meshed pod appearing elsewhere.
        c.apply(Update::Pod(Event::Apply(key("shop", "web-1"), plain)));
        c.apply(Update::Pod(Event::Apply(
            key("batch", "job"),
            pod("n1", "10.0.0.9"),
        )));
        assert_eq!(c.meshed_namespaces(), BTreeSet::from(["batch".to_string()]));
        // A namespace that opted in needs the bundle before its first pod; one that opted
        // out again does not.
        c.apply(Update::Namespace(Event::Apply("fresh".into(), true)));
        c.apply(Update::Namespace(Event::Apply("other".into(), false)));
        let want = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(c.meshed_namespaces(), want(&["batch", "fresh"]));
        c.apply(Update::Namespace(Event::Apply("fresh".into(), false)));
        assert_eq!(c.meshed_namespaces(), want(&["batch"]));
    }

    #[test]
    fn a_changed_slice_converts_only_the_pods_whose_endpoints_changed() {
        let mut c = cluster();
        let mut pods: Vec<(String, bool)> = (30..40).map(|i| (format!("web-{i}"), true)).collect();
        pods[3].1 = false;
        let pods: Vec<(&str, bool)> = pods.iter().map(|(p, r)| (p.as_str(), *r)).collect();
        c.apply(Update::Slice(Event::Apply(k("web-3"), slice(&pods))));
        assert_eq!(c.dirty_pods.len(), 1, "only web-33's endpoint changed");
        assert_eq!(names(&c.flush()), ["Workload shop/web-33"]);
        assert!(!ready(&c, "web-33"));
        // The same slice again changes nothing.
        c.apply(Update::Slice(Event::Apply(k("web-3"), slice(&pods))));
        assert!(c.flush().is_empty());
    }

    #[test]
    fn a_pod_left_by_its_slices_falls_back_to_its_own_readiness_and_a_node_moves_its_pods() {
        let mut c = cluster();
        c.apply(Update::Slice(Event::Delete(k("web-0"))));
        // The ten pods lost their endpoints but are ready themselves: nothing to send.
        assert!(c.flush().is_empty());
        c.apply(Update::Node(Event::Apply(
            "node-a".into(),
            LocalitySpec {
                zone: "zone-c".into(),
                ..Default::default()
            },
        )));
        assert_eq!(c.dirty_pods.len(), 50, "the pods on node-a, no others");
        assert_eq!(c.flush().upserts.len(), 50);
    }

    #[test]
    fn a_relist_keeps_the_last_state_until_it_completes_and_removes_what_it_lacks() {
        let mut c = cluster();
        c.apply(Update::Pod(Event::Init));
        for i in 1..100 {
            c.apply(Update::Pod(Event::InitApply(
                k(&format!("web-{i}")),
                pod(
                    if i < 50 { "node-a" } else { "node-b" },
                    &format!("198.18.1.{}", i + 1),
                ),
            )));
        }
        assert!(c.flush().is_empty(), "nothing changes before InitDone");
        assert_eq!(c.sent.len(), 100);
        c.apply(Update::Pod(Event::InitDone));
        assert_eq!(names(&c.flush()), ["-Workload shop/web-0"]);
    }

    #[test]
    fn a_kubernetes_service_shadows_a_muon_service_of_the_same_name() {
        let mut c = Cluster::default();
        let muon = Object::from_json(
            &serde_json::json!({"apiVersion": "muon.io/v1alpha1", "kind": "Service",
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"vips": ["198.19.0.9"], "ports": [{"port": 80}]}}),
            0,
        )
        .unwrap();
        c.apply(Update::Object(
            Kind::Service,
            Box::new(Event::Apply(muon.key(), Some(muon.clone()))),
        ));
        assert_eq!(c.flush().upserts, std::slice::from_ref(&muon));
        let info = ServiceInfo {
            labels: BTreeMap::new(),
            vips: vec!["198.19.0.1".into()],
            ports: vec![ServicePortInfo {
                name: None,
                port: 80,
                target: TargetPort::Number(8080),
                protocol: None,
            }],
            selector: [("app".to_string(), "web".to_string())].into(),
        };
        c.apply(Update::Service(Event::Apply(k("web"), info)));
        let d = c.flush();
        let Spec::Service(s) = &d.upserts[0].spec else {
            panic!()
        };
        assert_eq!(s.vips, ["198.19.0.1"]);
        c.apply(Update::Service(Event::Delete(k("web"))));
        assert_eq!(c.flush().upserts, [muon]);
    }
}
