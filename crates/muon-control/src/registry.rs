//! The registry: every object from every source, merged, and the data-plane view computed
//! from them.
//!
//! Writers (the management API, the config directory, Kubernetes) change objects under
//! one lock; an API change is on disk (the store) before it is visible. Each change bumps the
//! registry version and wakes the debouncer, which waits for a quiet period (`--debounce`,
//! at most `--debounce-max` after the first change of a burst), recomputes the resources every
//! sidecar may subscribe to, and publishes them as one immutable [`Snapshot`] through a
//! `watch`: a reader only ever sees the newest snapshot, which is what coalesces pushes.
//!
//! A resource keeps its version until its content changes, so a stream can send exactly the
//! resources that changed since what it sent last.

use crate::metrics::Metrics;
pub use crate::model::{Event, Source, Stored};
use crate::rules;
pub use crate::snapshot::{resource_kind, Resource, Snapshot};
use crate::store::{Store, StoreError};
use muon_core::resource::{Kind, Object, ObjectKey};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, watch, Mutex};
use tracing::{debug, info, warn};

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
    limits: rules::Limits,
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
        limits: rules::Limits,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Registry>, StoreError> {
        let (store, loaded) = Store::open(data_dir)?;
        info!(objects = loaded.objects.len(), version = loaded.version, dir = %data_dir.display(), "store loaded");
        let inner = Inner {
            version: loaded.version,
            sources: [(Source::Api, loaded.objects)].into(),
        };
        let first = crate::snapshot::compute(
            &inner.merged(),
            inner.version,
            &Snapshot::default(),
            None,
            trust_domain,
            &metrics,
        );
        let (changed, _) = watch::channel(loaded.version);
        let (snapshot, _) = watch::channel(Arc::new(first));
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Ok(Arc::new(Registry {
            inner: Mutex::new(inner),
            store,
            trust_domain: trust_domain.to_string(),
            limits,
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
        let mut problems = rules::size_problems(&objects, &self.limits);
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
        problems.extend(rules::vip_conflicts(&after, &changed));
        problems.extend(rules::address_problems(&after, &changed, &self.limits));
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

    /// Replaces every object of a read-only source (the config directory), which sends its
    /// complete set whenever it changes. A source that knows what changed uses
    /// [`Registry::update_source`] instead.
    pub async fn replace_source(&self, source: Source, objects: Vec<Object>) {
        // Over the size limit, an object is left out (the API would refuse it too).
        let objects: Vec<Object> = objects
            .into_iter()
            .filter(|o| {
                let n = rules::object_bytes(o);
                let ok = n <= self.limits.max_object_bytes;
                if !ok {
                    warn!(object = %o.key(), bytes = n, limit = self.limits.max_object_bytes, source = source.as_str(), "object over --max-object-bytes; left out");
                }
                ok
            })
            .collect();
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

    /// Changes some objects of a read-only source by key: `upserts` are added or replaced,
    /// `removals` taken out; every other object of the source stays as it is. This is the
    /// incremental seam (the Kubernetes source): the work is proportional to the change, not
    /// to the source's size.
    pub async fn update_source(
        &self,
        source: Source,
        upserts: Vec<Object>,
        removals: Vec<ObjectKey>,
    ) {
        let mut inner = self.inner.lock().await;
        let api_has = |inner: &Inner, key: &ObjectKey| {
            inner
                .sources
                .get(&Source::Api)
                .is_some_and(|api| api.contains_key(key))
        };
        let mut changed = Vec::new();
        let mut removed = Vec::new();
        let mut shadowing = Vec::new();
        let objects = inner.sources.entry(source).or_default();
        for key in removals {
            if let Some(s) = objects.remove(&key) {
                removed.push(s);
            }
        }
        for o in upserts {
            let key = o.key();
            let n = rules::object_bytes(&o);
            if n > self.limits.max_object_bytes {
                warn!(object = %key, bytes = n, limit = self.limits.max_object_bytes, source = source.as_str(), "object over --max-object-bytes; left out");
                if let Some(s) = objects.remove(&key) {
                    removed.push(s);
                }
                continue;
            }
            let generation = match objects.get(&key) {
                Some(s) if s.object == o => continue,
                Some(s) => s.generation + 1,
                None => 1,
            };
            let stored = Stored {
                object: o,
                generation,
                source,
            };
            changed.push(stored.clone());
            shadowing.push(key.clone());
            objects.insert(key, stored);
        }
        for key in shadowing {
            if api_has(&inner, &key) {
                warn!(object = %key, source = source.as_str(), "shadows an object applied through the API");
            }
        }
        if changed.is_empty() && removed.is_empty() {
            return;
        }
        inner.version += 1;
        debug!(
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
            let snap = crate::snapshot::compute(
                &inner.merged(),
                inner.version,
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
