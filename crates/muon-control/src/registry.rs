//! The registry: every object from every source, merged, and the data-plane view computed
//! from them.
//!
//! Writers (the management API, the config directory, later Kubernetes) change objects under
//! one lock; an API change is on disk (the store) before it is visible. Each change bumps the
//! registry version and wakes the debouncer, which waits for a quiet period (`--debounce`,
//! at most `--debounce-max` after the first change of a burst), recomputes the resources every
//! sidecar may subscribe to, and publishes them as one immutable [`Snapshot`] through a
//! `watch`: a reader only ever sees the newest snapshot, which is what coalesces pushes.
//!
//! A resource keeps its version until its content changes, so a stream can send exactly the
//! resources that changed since what it sent last.

use crate::convert;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};
use bytes::Bytes;
use muon_api::v1;
use muon_api::v1::kinds::{PerKind, ResourceKind};
use muon_core::resource::{Kind, Object, ObjectKey, Spec, WorkloadSpec};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, watch, Mutex};
use tracing::{debug, info, warn};

/// Where an object came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// The management API (persisted in the store).
    Api,
    /// The `--config-dir` directory; read-only through the API.
    File,
    /// The Kubernetes API (not yet implemented; the seam for it is [`Registry::replace_source`]).
    Kubernetes,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Api => "api",
            Source::File => "file",
            Source::Kubernetes => "kubernetes",
        }
    }
}

/// An object with what the registry knows about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub object: Object,
    /// Increases with every change of this object.
    pub generation: u64,
    pub source: Source,
}

/// A change, for the management API's Watch.
#[derive(Debug, Clone)]
pub struct Event {
    pub deleted: bool,
    pub stored: Stored,
    pub version: u64,
}

/// Why a change was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// The object belongs to another source (e.g. a file of `--config-dir`).
    #[error("{0}")]
    NotOwned(String),
    #[error("could not store the change: {0}")]
    Store(#[from] StoreError),
}

/// The result of an apply or a delete: each object with `created`, `configured`,
/// `unchanged` or `deleted`, and the registry version after it.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub results: Vec<(ObjectKey, &'static str)>,
    pub version: u64,
}

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

struct Inner {
    version: u64,
    /// Objects per source. The merged view lets a read-only source (file, Kubernetes) win over
    /// the API for the same key.
    sources: BTreeMap<Source, BTreeMap<ObjectKey, Stored>>,
}

impl Inner {
    fn merged(&self) -> BTreeMap<&ObjectKey, &Stored> {
        let mut m = BTreeMap::new();
        for objects in self.sources.values() {
            for (k, s) in objects {
                m.insert(k, s);
            }
        }
        m
    }

    /// The source other than the API that owns `key`, if any.
    fn owner_other_than_api(&self, key: &ObjectKey) -> Option<Source> {
        self.sources
            .iter()
            .find(|(src, objs)| **src != Source::Api && objs.contains_key(key))
            .map(|(src, _)| *src)
    }
}

pub struct Registry {
    inner: Mutex<Inner>,
    store: Store,
    trust_domain: String,
    metrics: Arc<Metrics>,
    /// The registry version, bumped by every change; the debouncer watches it.
    changed: watch::Sender<u64>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    events: broadcast::Sender<Event>,
}

/// Watchers that fall this far behind are told to restart.
const EVENT_BUFFER: usize = 1024;

impl Registry {
    /// Opens the store and builds the registry from it; the first snapshot is computed before
    /// this returns, so streams never see an empty mesh by mistake.
    pub fn open(
        data_dir: &std::path::Path,
        trust_domain: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Registry>, StoreError> {
        let (store, loaded) = Store::open(data_dir)?;
        info!(objects = loaded.objects.len(), version = loaded.version, dir = %data_dir.display(), "store loaded");
        let inner = Inner {
            version: loaded.version,
            sources: [(Source::Api, loaded.objects)].into(),
        };
        let first = compute(&inner, &Snapshot::default(), None, trust_domain, &metrics);
        let (changed, _) = watch::channel(loaded.version);
        let (snapshot, _) = watch::channel(Arc::new(first));
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Ok(Arc::new(Registry {
            inner: Mutex::new(inner),
            store,
            trust_domain: trust_domain.to_string(),
            metrics,
            changed,
            snapshot,
            events,
        }))
    }

    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.subscribe()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub async fn version(&self) -> u64 {
        self.inner.lock().await.version
    }

    pub async fn get(&self, key: &ObjectKey) -> Option<Stored> {
        let inner = self.inner.lock().await;
        inner.merged().get(key).map(|s| (*s).clone())
    }

    pub async fn list(&self, kind: Option<Kind>, namespace: Option<&str>) -> (Vec<Stored>, u64) {
        let inner = self.inner.lock().await;
        let objects = inner
            .merged()
            .into_iter()
            .filter(|(k, _)| kind.is_none_or(|kind| k.kind == kind))
            .filter(|(k, _)| namespace.is_none_or(|ns| k.namespace == ns))
            .map(|(_, s)| s.clone())
            .collect();
        (objects, inner.version)
    }

    /// Applies validated objects through the API: all or nothing, stored durably before this
    /// returns. With `dry_run`, only reports what would happen.
    pub async fn apply(
        &self,
        objects: Vec<Object>,
        dry_run: bool,
    ) -> Result<Outcome, RegistryError> {
        let mut inner = self.inner.lock().await;
        let mut problems = Vec::new();
        let mut seen = BTreeMap::new();
        for (i, o) in objects.iter().enumerate() {
            let key = o.key();
            if let Some(first) = seen.insert(key.clone(), i) {
                problems.push(format!(
                    "{key}: appears twice in one apply (objects {} and {})",
                    first + 1,
                    i + 1
                ));
            }
            if let Some(src) = inner.owner_other_than_api(&key) {
                return Err(RegistryError::NotOwned(format!(
                    "{key} comes from the {} source and cannot be changed through the API",
                    src.as_str()
                )));
            }
        }
        let api = inner.sources.entry(Source::Api).or_default().clone();
        let mut next = api.clone();
        let mut results = Vec::new();
        let mut changed = Vec::new();
        for o in objects {
            let key = o.key();
            let result = match api.get(&key) {
                None => "created",
                Some(old) if old.object == o => "unchanged",
                Some(_) => "configured",
            };
            results.push((key.clone(), result));
            if result != "unchanged" {
                let generation = api.get(&key).map_or(1, |s| s.generation + 1);
                let stored = Stored {
                    object: o,
                    generation,
                    source: Source::Api,
                };
                changed.push(stored.clone());
                next.insert(key, stored);
            }
        }
        // Cross-object rules on the state after the apply.
        let mut after = inner.merged();
        for (k, s) in &next {
            if inner.owner_other_than_api(k).is_none() {
                after.insert(k, s);
            }
        }
        problems.extend(vip_conflicts(&after, &changed));
        if !problems.is_empty() {
            return Err(RegistryError::Invalid(problems.join("\n")));
        }
        if dry_run || changed.is_empty() {
            return Ok(Outcome {
                results,
                version: inner.version,
            });
        }
        let version = inner.version + 1;
        let next = self.persist(version, next).await?;
        inner.sources.insert(Source::Api, next);
        inner.version = version;
        self.committed(&inner, changed, false);
        Ok(Outcome { results, version })
    }

    /// Deletes API objects: all or nothing.
    pub async fn delete(&self, keys: Vec<ObjectKey>) -> Result<Outcome, RegistryError> {
        let mut inner = self.inner.lock().await;
        let api = inner.sources.entry(Source::Api).or_default().clone();
        let mut next = api.clone();
        let mut removed = Vec::new();
        for key in &keys {
            if let Some(src) = inner.owner_other_than_api(key) {
                return Err(RegistryError::NotOwned(format!(
                    "{key} comes from the {} source and cannot be deleted through the API",
                    src.as_str()
                )));
            }
            match next.remove(key) {
                Some(s) => removed.push(s),
                None if removed.iter().any(|s: &Stored| &s.object.key() == key) => {}
                None => return Err(RegistryError::NotFound(format!("{key} not found"))),
            }
        }
        let version = inner.version + 1;
        let next = self.persist(version, next).await?;
        inner.sources.insert(Source::Api, next);
        inner.version = version;
        let results = keys.into_iter().map(|k| (k, "deleted")).collect();
        self.committed(&inner, removed, true);
        Ok(Outcome { results, version })
    }

    /// Replaces every object of a read-only source (the config directory, later Kubernetes).
    /// This is the seam for new sources: they send their complete set whenever it changes.
    pub async fn replace_source(&self, source: Source, objects: Vec<Object>) {
        let mut inner = self.inner.lock().await;
        let old = inner.sources.remove(&source).unwrap_or_default();
        let mut next = BTreeMap::new();
        let mut changed = Vec::new();
        for o in objects {
            let key = o.key();
            let stored = match old.get(&key) {
                Some(s) if s.object == o => s.clone(),
                prev => {
                    let s = Stored {
                        object: o,
                        generation: prev.map_or(1, |p| p.generation + 1),
                        source,
                    };
                    changed.push(s.clone());
                    s
                }
            };
            if inner
                .sources
                .get(&Source::Api)
                .is_some_and(|api| api.contains_key(&key))
            {
                warn!(object = %key, source = source.as_str(), "shadows an object applied through the API");
            }
            next.insert(key, stored);
        }
        let removed: Vec<Stored> = old
            .iter()
            .filter(|(k, _)| !next.contains_key(*k))
            .map(|(_, s)| s.clone())
            .collect();
        inner.sources.insert(source, next);
        if changed.is_empty() && removed.is_empty() {
            return;
        }
        inner.version += 1;
        info!(
            source = source.as_str(),
            changed = changed.len(),
            removed = removed.len(),
            version = inner.version,
            "source updated"
        );
        self.committed(&inner, changed, false);
        self.committed(&inner, removed, true);
    }

    async fn persist(
        &self,
        version: u64,
        next: BTreeMap<ObjectKey, Stored>,
    ) -> Result<BTreeMap<ObjectKey, Stored>, RegistryError> {
        let store = self.store.clone();
        let (result, next) = tokio::task::spawn_blocking(move || {
            let r = store.save(version, next.values());
            (r, next)
        })
        .await
        .map_err(|e| {
            RegistryError::Store(StoreError::Io {
                path: "(store task)".into(),
                source: std::io::Error::other(e.to_string()),
            })
        })?;
        result?;
        Ok(next)
    }

    /// After a change is committed: tell watchers and the debouncer.
    fn committed(&self, inner: &Inner, stored: Vec<Stored>, deleted: bool) {
        for s in stored {
            debug!(object = %s.object.key(), deleted, version = inner.version, "changed");
            let _ = self.events.send(Event {
                deleted,
                stored: s,
                version: inner.version,
            });
        }
        self.changed.send_replace(inner.version);
    }

    /// Recomputes snapshots after changes, debounced, until `shutdown` fires.
    pub async fn run_debouncer(
        self: Arc<Self>,
        debounce: Duration,
        debounce_max: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut changed = self.changed.subscribe();
        changed.mark_unchanged();
        loop {
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                _ = shutdown.changed() => return,
            }
            let first = Instant::now();
            let max = tokio::time::Instant::from_std(first + debounce_max);
            loop {
                let quiet = tokio::time::Instant::now() + debounce;
                tokio::select! {
                    r = changed.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep_until(quiet.min(max)) => break,
                }
                if tokio::time::Instant::now() >= max {
                    break;
                }
            }
            changed.mark_unchanged();
            let inner = self.inner.lock().await;
            let previous = self.snapshot();
            let started = Instant::now();
            let snap = compute(
                &inner,
                &previous,
                Some(first),
                &self.trust_domain,
                &self.metrics,
            );
            drop(inner);
            debug!(version = snap.version, took = ?started.elapsed(), "snapshot computed");
            self.snapshot.send_replace(Arc::new(snap));
        }
    }
}

/// (namespace, label key, label value) → the workloads with that label, in object-key order.
type WorkloadIndex<'a> = HashMap<
    (&'a str, &'a str, &'a str),
    Vec<(&'a muon_core::resource::Metadata, &'a WorkloadSpec)>,
>;

/// Computes the data-plane view; resources equal to the previous snapshot's keep their
/// version (and their shared allocation).
fn compute(
    inner: &Inner,
    previous: &Snapshot,
    changed_at: Option<Instant>,
    trust_domain: &str,
    metrics: &Metrics,
) -> Snapshot {
    let merged = inner.merged();
    let version = inner.version;
    let mut counts: HashMap<Kind, usize> = HashMap::new();
    // Workloads by namespace and label, so a service's endpoints look only at the workloads
    // that carry its selector's first label instead of every workload of the namespace.
    let mut workloads: WorkloadIndex = HashMap::new();
    for (k, s) in &merged {
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
    for (k, s) in &merged {
        let meta = &s.object.metadata;
        let name = convert::qualified(&k.name, &k.namespace);
        match &s.object.spec {
            Spec::Service(svc) => {
                put(
                    name.clone(),
                    v1::resource::Kind::Service(convert::service_resource(meta, svc)),
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
            Spec::Workload(_) | Spec::Gateway(_) => {}
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

/// The discovery kind a resource is sent as.
pub fn resource_kind(kind: &v1::resource::Kind) -> ResourceKind {
    match kind {
        v1::resource::Kind::Service(_) => ResourceKind::Services,
        v1::resource::Kind::Endpoints(_) => ResourceKind::Endpoints,
        v1::resource::Kind::Route(_) => ResourceKind::Routes,
        v1::resource::Kind::Policy(_) => ResourceKind::Policies,
    }
}

/// Two services may not claim the same virtual IP and port: a sidecar could not tell which
/// one a connection is for. Reports conflicts that involve an object being changed.
fn vip_conflicts(after: &BTreeMap<&ObjectKey, &Stored>, changed: &[Stored]) -> Vec<String> {
    let mut claims: BTreeMap<(std::net::IpAddr, u32), &ObjectKey> = BTreeMap::new();
    let mut problems = Vec::new();
    let changed: Vec<ObjectKey> = changed.iter().map(|s| s.object.key()).collect();
    for (key, s) in after {
        let Spec::Service(svc) = &s.object.spec else {
            continue;
        };
        for vip in &svc.vips {
            let Ok(ip) = vip.parse() else { continue };
            for p in &svc.ports {
                match claims.get(&(ip, p.port)) {
                    Some(other) if changed.contains(key) || changed.contains(other) => {
                        let (this, that) = if changed.contains(key) {
                            (*key, *other)
                        } else {
                            (*other, *key)
                        };
                        problems.push(format!(
                            "{this}: spec.vips: {vip} port {} is already used by {that}",
                            p.port
                        ));
                    }
                    Some(_) => {}
                    None => {
                        claims.insert((ip, p.port), key);
                    }
                }
            }
        }
    }
    problems
}
