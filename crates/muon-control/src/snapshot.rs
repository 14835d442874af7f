//! The data-plane view: what every sidecar may subscribe to, computed from the registry's
//! objects as one immutable [`Snapshot`] per debounced change.
//!
//! A resource keeps its version (and its shared encoding) until its content changes, and a
//! snapshot names what changed since the previous ones, so a stream can send exactly the
//! resources that changed since what it sent last.

use crate::convert;
use crate::metrics::Metrics;
use crate::model::Stored;
use bytes::Bytes;
use muon_api::v1;
use muon_api::v1::kinds::{PerKind, ResourceKind};
use muon_core::resource::{Kind, ObjectKey, Spec, WorkloadSelector, WorkloadSpec};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

/// One data-plane resource, shared by every stream that sends it.
#[derive(Debug)]
pub struct Resource {
    /// The registry version at which this resource last changed.
    pub version: u64,
    pub proto: v1::Resource,
    /// `proto`, encoded once for every stream that sends it.
    pub encoded: Bytes,
}

impl Resource {
    fn new(version: u64, name: String, kind: v1::resource::Kind) -> Resource {
        let proto = v1::Resource {
            name,
            version: version.to_string(),
            kind: Some(kind),
        };
        let encoded = prost::Message::encode_to_vec(&proto).into();
        Resource {
            version,
            proto,
            encoded,
        }
    }
}

/// The names of each kind that one snapshot added, changed or removed.
#[derive(Debug, Default)]
pub struct Changes {
    /// The [`Snapshot::seq`] of the snapshot these changes produced.
    pub seq: u64,
    pub names: PerKind<BTreeSet<String>>,
}

/// How many snapshots' [`Changes`] a snapshot remembers. A stream waiting for an ACK skips
/// the snapshots published meanwhile; within this many it still compares only what changed.
const HISTORY: usize = 16;

/// The data-plane view at one registry version. Immutable; replaced as a whole.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub version: u64,
    /// Counts snapshots: each is one more than its predecessor's.
    pub seq: u64,
    /// When the oldest change in this snapshot happened (for the push latency metric).
    pub changed_at: Option<Instant>,
    /// Per kind: resource name → resource.
    pub kinds: PerKind<BTreeMap<String, Arc<Resource>>>,
    /// The changes that produced the last [`HISTORY`] snapshots, oldest first; the last one
    /// produced this snapshot.
    pub history: VecDeque<Arc<Changes>>,
}

impl Snapshot {
    /// The names of `kind` added, changed or removed after snapshot `seq`, or `None` when
    /// this snapshot does not remember that far back (then everything must be compared).
    pub fn changed_since(&self, seq: u64, kind: ResourceKind) -> Option<BTreeSet<&str>> {
        let oldest = self.history.front().map_or(self.seq, |c| c.seq);
        if seq > self.seq || seq + 1 < oldest {
            return None;
        }
        Some(
            self.history
                .iter()
                .filter(|c| c.seq > seq)
                .flat_map(|c| c.names[kind].iter().map(String::as_str))
                .collect(),
        )
    }
}

/// (namespace, label key, label value) → the workloads with that label, in object-key order.
type WorkloadIndex<'a> = HashMap<
    (&'a str, &'a str, &'a str),
    Vec<(&'a muon_core::resource::Metadata, &'a WorkloadSpec)>,
>;

/// Computes the data-plane view; resources equal to the previous snapshot's keep their
/// version (and their shared allocation).
pub fn compute(
    merged: &BTreeMap<&ObjectKey, &Stored>,
    version: u64,
    previous: &Snapshot,
    changed_at: Option<Instant>,
    trust_domain: &str,
    metrics: &Metrics,
) -> Snapshot {
    let mut counts: HashMap<Kind, usize> = HashMap::new();
    // Workloads by namespace and label, so a service's endpoints look only at the workloads
    // that carry its selector's first label instead of every workload of the namespace.
    let mut workloads: WorkloadIndex = HashMap::new();
    for (k, s) in merged {
        *counts.entry(k.kind).or_default() += 1;
        if let Spec::Workload(w) = &s.object.spec {
            let meta = &s.object.metadata;
            for (key, value) in &meta.labels {
                workloads
                    .entry((k.namespace.as_str(), key.as_str(), value.as_str()))
                    .or_default()
                    .push((meta, w));
            }
        }
    }
    // The traffic policies of each service, by (namespace, service name).
    let mut traffic: HashMap<(&str, &str), convert::TrafficPolicies<'_>> = HashMap::new();
    for (k, s) in merged {
        let targets = match &s.object.spec {
            Spec::TrafficPolicy(p) => &p.target_refs,
            Spec::BackendTrafficPolicy(p) => &p.target_refs,
            _ => continue,
        };
        for t in targets {
            let entry = traffic
                .entry((k.namespace.as_str(), t.name.as_str()))
                .or_default();
            match &s.object.spec {
                Spec::TrafficPolicy(p) => entry.traffic.push(p),
                Spec::BackendTrafficPolicy(p) => {
                    entry.backend = entry.backend.or(Some(p));
                }
                _ => {}
            }
        }
    }
    for kind in Kind::ALL {
        metrics.set_objects(kind.as_str(), counts.get(&kind).copied().unwrap_or(0));
    }
    let mut snap = Snapshot {
        version,
        seq: previous.seq + 1,
        changed_at,
        kinds: Default::default(),
        history: Default::default(),
    };
    let mut changes = Changes {
        seq: snap.seq,
        names: Default::default(),
    };
    let mut put = |name: String, kind: v1::resource::Kind| {
        let of = resource_kind(&kind);
        let res = match previous.kinds[of].get(&name) {
            Some(old) if old.proto.kind.as_ref() == Some(&kind) => old.clone(),
            _ => {
                changes.names[of].insert(name.clone());
                Arc::new(Resource::new(version, name.clone(), kind))
            }
        };
        snap.kinds[of].insert(name, res);
    };
    for (k, s) in merged {
        let meta = &s.object.metadata;
        let name = convert::qualified(&k.name, &k.namespace);
        match &s.object.spec {
            Spec::Service(svc) => {
                put(
                    name.clone(),
                    v1::resource::Kind::Service(convert::service_resource(
                        meta,
                        svc,
                        traffic.get(&(k.namespace.as_str(), k.name.as_str())),
                    )),
                );
                // An empty selector selects nothing; otherwise every selected workload
                // carries its first label.
                let wl = svc.selector.iter().next().and_then(|(key, value)| {
                    workloads.get(&(k.namespace.as_str(), key.as_str(), value.as_str()))
                });
                let eps = convert::endpoints_resource(
                    meta,
                    svc,
                    wl.into_iter().flatten().copied(),
                    trust_domain,
                );
                put(name, v1::resource::Kind::Endpoints(eps));
            }
            Spec::HttpRoute(r) => {
                put(
                    name,
                    v1::resource::Kind::Route(convert::route_resource(meta, r)),
                );
            }
            Spec::GrpcRoute(r) => {
                put(
                    convert::route_name(k.kind, &k.name, &k.namespace),
                    v1::resource::Kind::Route(convert::grpc_route_resource(meta, r)),
                );
            }
            // Policies name the workloads they select, so a workload's new labels change
            // the policies that (no longer) select it.
            Spec::AuthorizationPolicy(p) => {
                let selection = selection(&workloads, &k.namespace, p.selector.as_ref());
                put(
                    convert::policy_name(k.kind, &k.name, &k.namespace),
                    v1::resource::Kind::Policy(convert::authorization_resource(meta, p, selection)),
                );
            }
            Spec::PeerAuthentication(p) => {
                let selection = selection(&workloads, &k.namespace, p.selector.as_ref());
                put(
                    convert::policy_name(k.kind, &k.name, &k.namespace),
                    v1::resource::Kind::Policy(convert::peer_authentication_resource(
                        meta, p, selection,
                    )),
                );
            }
            // Carried by the services they target.
            Spec::Workload(_)
            | Spec::Gateway(_)
            | Spec::TrafficPolicy(_)
            | Spec::BackendTrafficPolicy(_) => {}
        }
    }
    for (of, now) in snap.kinds.iter() {
        let removed = previous.kinds[of].keys().filter(|n| !now.contains_key(*n));
        changes.names[of].extend(removed.cloned());
    }
    let skip = (previous.history.len() + 1).saturating_sub(HISTORY);
    snap.history = previous.history.iter().skip(skip).cloned().collect();
    snap.history.push_back(Arc::new(changes));
    snap
}

/// The workloads of `namespace` a policy's selector selects (every workload carries its
/// first label, so only those are looked at).
fn selection(
    workloads: &WorkloadIndex,
    namespace: &str,
    selector: Option<&WorkloadSelector>,
) -> convert::Selection {
    let candidates = selector
        .and_then(|s| s.match_labels.iter().next())
        .and_then(|(key, value)| workloads.get(&(namespace, key.as_str(), value.as_str())));
    convert::Selection::of(selector, candidates.into_iter().flatten().map(|(m, _)| *m))
}

/// The discovery kind a resource is sent as.
pub fn resource_kind(kind: &v1::resource::Kind) -> ResourceKind {
    match kind {
        v1::resource::Kind::Service(_) => ResourceKind::Services,
        v1::resource::Kind::Endpoints(_) => ResourceKind::Endpoints,
        v1::resource::Kind::Route(_) => ResourceKind::Routes,
        v1::resource::Kind::Policy(_) => ResourceKind::Policies,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Source;
    use muon_core::ports::ROOT_NAMESPACE;
    use muon_core::resource::Object;
    use serde_json::{json, Value};

    fn stored(v: Value) -> Stored {
        Stored {
            object: Object::from_json(&v, 0).unwrap(),
            generation: 1,
            source: Source::Api,
        }
    }

    fn workload(name: &str, ns: &str, app: &str) -> Stored {
        stored(json!({
            "apiVersion": "muon.io/v1alpha1", "kind": "Workload",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": app, "tier": "x"}},
            "spec": {"address": "198.18.0.9"},
        }))
    }

    fn authz(name: &str, ns: &str, selector: Option<Value>) -> Stored {
        let mut spec = json!({
            "action": "DENY",
            "rules": [{
                "from": [{"source": {"principals": ["spiffe://cluster.local/ns/shop/sa/orders"]}}],
                "to": [{"operation": {"ports": ["9090"], "paths": ["/admin/*"]}}],
            }],
        });
        if let Some(s) = selector {
            spec["selector"] = json!({"matchLabels": s});
        }
        stored(json!({
            "apiVersion": "muon.io/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec,
        }))
    }

    fn compute_all(objects: &[Stored], previous: &Snapshot, version: u64) -> Snapshot {
        let keys: Vec<ObjectKey> = objects.iter().map(|s| s.object.key()).collect();
        let merged: BTreeMap<&ObjectKey, &Stored> = keys.iter().zip(objects).collect();
        compute(
            &merged,
            version,
            previous,
            None,
            "cluster.local",
            &Metrics::default(),
        )
    }

    fn policy<'a>(snap: &'a Snapshot, name: &str) -> &'a v1::Policy {
        match snap.kinds[ResourceKind::Policies]
            .get(name)
            .and_then(|r| r.proto.kind.as_ref())
        {
            Some(v1::resource::Kind::Policy(p)) => p,
            other => panic!("no policy {name}: {other:?}"),
        }
    }

    #[test]
    fn policies_name_the_workloads_their_selector_selects_and_follow_label_changes() {
        let peer_authn = stored(json!({
            "apiVersion": "muon.io/v1alpha1", "kind": "PeerAuthentication",
            "metadata": {"name": "strict", "namespace": "shop"},
            "spec": {"mtls": {"mode": "STRICT"}, "portLevelMtls": {"9090": {"mode": "PERMISSIVE"}}},
        }));
        let mut objects = vec![
            workload("payment-0", "shop", "payment"),
            workload("payment-1", "shop", "payment"),
            workload("orders-0", "shop", "orders"),
            // Same labels, another namespace: not selected by shop's policy.
            workload("payment-0", "other", "payment"),
            authz(
                "deny-admin",
                "shop",
                Some(json!({"app": "payment", "tier": "x"})),
            ),
            authz("everyone", "shop", None),
            authz("mesh", ROOT_NAMESPACE, None),
            peer_authn,
        ];
        let first = compute_all(&objects, &Snapshot::default(), 1);
        let p = policy(&first, "authz/deny-admin.shop");
        assert_eq!(p.workloads, ["payment-0", "payment-1"]);
        assert!(!p.all_workloads);
        let Some(v1::policy::Kind::Authorization(a)) = &p.kind else {
            panic!("{p:?}")
        };
        assert_eq!(a.action, i32::from(v1::authorization_policy::Action::Deny));
        assert_eq!(
            a.rules[0].from[0].principals,
            ["cluster.local/ns/shop/sa/orders"],
            "spiffe:// is taken off"
        );
        assert_eq!(a.rules[0].to[0].ports, [9090]);
        assert_eq!(a.selector.as_ref().unwrap().match_labels.len(), 2);
        for name in ["authz/everyone.shop", "authz/mesh.muon-system"] {
            let p = policy(&first, name);
            assert!(p.all_workloads && p.workloads.is_empty(), "{name}: {p:?}");
        }
        let p = policy(&first, "peerauthn/strict.shop");
        let Some(v1::policy::Kind::PeerAuthentication(pa)) = &p.kind else {
            panic!("{p:?}")
        };
        assert_eq!(pa.mode, i32::from(v1::MtlsMode::Strict));
        assert_eq!(
            pa.port_level_mtls.get(&9090),
            Some(&i32::from(v1::MtlsMode::Permissive))
        );

        // payment-1 becomes orders: the selecting policy changes (new version), the others
        // keep theirs.
        objects[1] = workload("payment-1", "shop", "orders");
        let second = compute_all(&objects, &first, 2);
        let p = policy(&second, "authz/deny-admin.shop");
        assert_eq!(p.workloads, ["payment-0"]);
        let res = |s: &Snapshot, n: &str| s.kinds[ResourceKind::Policies][n].version;
        assert_eq!(res(&second, "authz/deny-admin.shop"), 2);
        assert_eq!(res(&second, "authz/everyone.shop"), 1);
        let changed = second
            .changed_since(first.seq, ResourceKind::Policies)
            .unwrap();
        assert_eq!(changed, ["authz/deny-admin.shop"].into());
    }
}
