//! The `Discovery` service: one bidirectional stream per sidecar (proto/muon/v1/discovery.proto).
//!
//! Each stream is one task (no thread) that owns its state and waits on three things: the
//! sidecar's requests, the registry's newest snapshot (a `watch`, so there is never a queue of
//! intermediate states), and room in its one-slot outgoing channel. A response is built only
//! when it can be sent, from the newest snapshot, so a sidecar that does not read falls
//! behind by at most one response and then gets the latest state.
//!
//! Per kind, a stream remembers which version of each resource it sent, and sends only the
//! resources whose version changed plus the names that disappeared. To find them it compares
//! only the names the snapshots since its last comparison changed ([`Snapshot::changed_since`]),
//! so a change costs each stream work in proportion to the change, not to the mesh; it
//! compares everything only on its first response, after a subscription change, or when it
//! fell further behind than the snapshots remember. Responses carry each resource's shared
//! encoding (`wire`), never a copy.
//!
//! At most one push per kind waits for its ACK; further changes are folded into the next
//! push once it arrives (a subscription change is answered at once). A NACK records the
//! error and leaves the sidecar's acked version alone.

use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::snapshot::{Resource, Snapshot};
use bytes::Bytes;
use muon_api::v1::kinds::{self, PerKind, ResourceKind};
use muon_api::v1::{self, DiscoveryRequest};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};
use tokio::sync::{mpsc, watch};
use tokio_util::task::TaskTracker;
use tonic::{Status, Streaming};
use tracing::{debug, info, warn};

/// `muon.v1.DiscoveryResponse` with each `Resource` as its encoded bytes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EncodedResponse {
    #[prost(string, tag = "1")]
    pub type_url: String,
    #[prost(string, tag = "2")]
    pub version_info: String,
    #[prost(string, tag = "3")]
    pub nonce: String,
    /// Encoded `muon.v1.Resource`s.
    #[prost(bytes = "bytes", repeated, tag = "4")]
    pub resources: Vec<Bytes>,
    #[prost(string, repeated, tag = "5")]
    pub removed_resources: Vec<String>,
    /// More parts follow (a response larger than [`muon_api::DISCOVERY_SPLIT_BYTES`]).
    #[prost(bool, tag = "6")]
    pub continues: bool,
}

/// What `ListProxies` shows of one kind of one stream.
#[derive(Debug, Clone, Default)]
pub struct KindStatus {
    pub subscribed: bool,
    pub sent_version: Option<u64>,
    pub acked_version: Option<u64>,
    /// A response is waiting for its ACK, or a change has not been sent yet.
    pub pending: bool,
    /// The resources the sidecar refused and has not accepted a version of since (nor seen
    /// deleted): name → its reason.
    pub rejected: BTreeMap<String, String>,
    /// A whole response refused (no resource named), until a later one is ACKed.
    pub response_error: Option<String>,
    pub last_nack_at: Option<SystemTime>,
}

impl KindStatus {
    /// SYNCED, STALE or NACKED, as `ListProxies` reports it: NACKED while any resource the
    /// sidecar refused is still refused.
    pub fn state(&self) -> &'static str {
        if !self.rejected.is_empty() || self.response_error.is_some() {
            "NACKED"
        } else if self.pending || self.sent_version != self.acked_version {
            "STALE"
        } else {
            "SYNCED"
        }
    }

    /// Why, for LAST ERROR: every resource still refused, `name: reason`.
    pub fn last_error(&self) -> String {
        let mut parts: Vec<String> = self.response_error.iter().cloned().collect();
        parts.extend(self.rejected.iter().map(|(n, r)| format!("{n}: {r}")));
        parts.join("; ")
    }

    /// Applies the sidecar's answer to a response that carried `names`.
    fn answered(&mut self, names: &[String], err: Option<&v1::ErrorDetail>) {
        match err {
            None => {
                for n in names {
                    self.rejected.remove(n);
                }
                self.response_error = None;
            }
            Some(e) if e.resources.is_empty() => {
                self.response_error = Some(e.message.clone());
                self.last_nack_at = Some(SystemTime::now());
            }
            Some(e) => {
                // Whatever the response carried and the sidecar did not refuse, it took.
                for n in names.iter().filter(|n| !e.resources.contains(n)) {
                    self.rejected.remove(n);
                }
                for n in &e.resources {
                    self.rejected.insert(n.clone(), reason_of(&e.message, n));
                }
                self.response_error = None;
                self.last_nack_at = Some(SystemTime::now());
            }
        }
    }
}

/// A sidecar's stream is for the identity its certificate names: a node claiming another
/// namespace or service account is refused, and a missing one is filled in from the
/// certificate. Administrators may watch as anyone; a connection without a certificate may
/// not open a stream (plaintext is trusted only with `--insecure-plaintext`).
fn bind_identity(caller: &crate::auth::Caller, node: &mut v1::Node) -> Result<(), Status> {
    use crate::auth::Caller;
    match caller {
        Caller::Insecure | Caller::Admin(_) => Ok(()),
        Caller::Anonymous => Err(no_certificate()),
        Caller::Workload(id) => {
            let claims = |mine: &str, claimed: &str| claimed.is_empty() || claimed == mine;
            if !claims(&id.namespace, &node.namespace)
                || !claims(&id.service_account, &node.service_account)
            {
                return Err(Status::permission_denied(format!(
                    "the node says namespace {:?} and service account {:?}, but its certificate is {id}",
                    node.namespace, node.service_account
                )));
            }
            node.namespace = id.namespace.clone();
            node.service_account = id.service_account.clone();
            Ok(())
        }
    }
}

fn no_certificate() -> Status {
    Status::unauthenticated(
        "a discovery stream needs the sidecar's mesh certificate (Identity.Certify first)",
    )
}

/// The part of a NACK message about `name` (the sidecar joins `name: reason` with `; `).
fn reason_of(message: &str, name: &str) -> String {
    let prefix = format!("{name}: ");
    message
        .split("; ")
        .find_map(|part| part.strip_prefix(&prefix))
        .unwrap_or(message)
        .to_string()
}

#[derive(Debug, Clone)]
pub struct ProxyStatus {
    pub node: v1::Node,
    pub connected_at: SystemTime,
    pub kinds: PerKind<KindStatus>,
}

/// The connected sidecars, for `ListProxies`. Each stream updates its own entry.
#[derive(Debug, Default)]
pub struct Proxies {
    next: AtomicU64,
    streams: Mutex<BTreeMap<u64, Arc<Mutex<ProxyStatus>>>>,
}

impl Proxies {
    pub fn list(&self) -> Vec<ProxyStatus> {
        let streams = lock(&self.streams);
        streams.values().map(|s| lock(s).clone()).collect()
    }

    fn register(self: &Arc<Self>, status: ProxyStatus) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Mutex::new(status));
        lock(&self.streams).insert(id, entry.clone());
        Registration {
            proxies: self.clone(),
            id,
            entry,
        }
    }
}

/// Removes a stream from [`Proxies`] when its task ends, however it ends.
struct Registration {
    proxies: Arc<Proxies>,
    id: u64,
    entry: Arc<Mutex<ProxyStatus>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.proxies.streams).remove(&self.id);
    }
}

/// A poisoned lock only means another stream panicked while holding plain data: keep going.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Clone)]
pub struct DiscoveryService {
    registry: Arc<Registry>,
    proxies: Arc<Proxies>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    nonces: Arc<AtomicU64>,
    /// Responses above this many bytes of resources are sent in parts.
    split_bytes: usize,
    /// Owns the stream tasks: the server waits for them at shutdown.
    tasks: TaskTracker,
}

impl DiscoveryService {
    pub fn new(
        registry: Arc<Registry>,
        proxies: Arc<Proxies>,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        DiscoveryService {
            registry,
            proxies,
            metrics,
            shutdown,
            nonces: Arc::new(AtomicU64::new(1)),
            split_bytes: muon_api::DISCOVERY_SPLIT_BYTES,
            tasks: TaskTracker::new(),
        }
    }
}

impl DiscoveryService {
    /// Starts stream tasks on `tasks` (the server's, which it waits for).
    pub fn with_tasks(mut self, tasks: TaskTracker) -> Self {
        self.tasks = tasks;
        self
    }

    /// Sends responses above `bytes` of resources in parts (tests use a small value).
    pub fn with_split_bytes(mut self, bytes: usize) -> Self {
        self.split_bytes = bytes.max(1);
        self
    }

    /// Starts the task that serves one discovery stream; returns what it sends.
    pub(crate) fn open(
        &self,
        inbound: Streaming<DiscoveryRequest>,
        caller: crate::auth::Caller,
    ) -> Responses {
        // One slot: the stream task builds a response only when the previous one was taken.
        let (tx, rx) = mpsc::channel(1);
        let svc = self.clone();
        self.tasks.spawn(async move {
            let mut s = StreamTask {
                svc: &svc,
                caller,
                tx,
                kinds: Default::default(),
                next_kind: 0,
            };
            s.run(inbound).await;
        });
        rx
    }
}

/// What a stream task sends: responses, then possibly the error that ended the stream.
pub(crate) type Responses = mpsc::Receiver<Result<EncodedResponse, Status>>;

#[derive(Default)]
struct KindState {
    subscribed: bool,
    wildcard: bool,
    names: BTreeSet<String>,
    /// What this stream sent: the base of the next diff.
    sent: Sent,
    /// Responses waiting for an ACK.
    in_flight: Vec<InFlight>,
    /// The parts of a split response still to send (each after the previous one's ACK).
    parts: std::collections::VecDeque<Part>,
    /// The names the acknowledged parts of a split response carried, for its last part's
    /// answer.
    parts_names: Vec<String>,
    /// A response is owed regardless of changes (first subscription, subscription change).
    forced: bool,
    /// The snapshot changed since this kind was last compared.
    dirty: bool,
    /// The subscription changed: compare everything, not only what changed since `sent`.
    compare_all: bool,
    /// Names just subscribed that may not exist: answered as removed so the sidecar stops
    /// waiting for them.
    asked: BTreeSet<String>,
    /// Versions and errors (`subscribed` and `pending` are filled in when published).
    status: KindStatus,
}

impl KindState {
    /// Whether a response may be built now. The parts of a split response go first, one per
    /// ACK.
    fn ready(&self) -> bool {
        if !self.parts.is_empty() {
            return self.in_flight.is_empty();
        }
        self.subscribed && (self.forced || (self.dirty && self.in_flight.is_empty()))
    }

    /// The resources whose version differs from what was sent, the names to remove, and how
    /// many resources were compared; `sent` becomes what this diff brings the sidecar to.
    fn diff(&mut self, snap: &Arc<Snapshot>, kind: ResourceKind) -> Diff {
        let current = &snap.kinds[kind];
        let compare_all = std::mem::take(&mut self.compare_all);
        let mut d = Diff::default();
        match self.wildcard {
            true => {
                match std::mem::take(&mut self.sent) {
                    // Up to date with an earlier snapshot: when this one remembers what
                    // changed since, only those names are compared.
                    Sent::All(base) => {
                        let old = &base.kinds[kind];
                        let since = (!compare_all)
                            .then(|| snap.changed_since(base.seq, kind))
                            .flatten();
                        match since {
                            Some(names) => {
                                for name in names {
                                    d.compare(name, old.get(name), current.get(name));
                                }
                            }
                            None => {
                                for (name, res) in current {
                                    d.compare(name, old.get(name), Some(res));
                                }
                                for name in old.keys().filter(|n| !current.contains_key(*n)) {
                                    d.compare(name, old.get(name), None);
                                }
                            }
                        }
                    }
                    Sent::Named(sent) => {
                        for (name, res) in current {
                            d.compared += 1;
                            if sent.get(name) != Some(&res.version) {
                                d.changed.push(res.clone());
                            }
                        }
                        for name in sent.keys().filter(|n| !current.contains_key(*n)) {
                            d.compared += 1;
                            d.removed.push(name.clone());
                        }
                    }
                    Sent::Nothing => {
                        d.compared += current.len();
                        d.changed.extend(current.values().cloned());
                    }
                }
                self.sent = Sent::All(snap.clone());
            }
            false => {
                let mut sent = match std::mem::take(&mut self.sent) {
                    Sent::Named(sent) => sent,
                    Sent::All(base) => base.kinds[kind]
                        .iter()
                        .map(|(n, r)| (n.clone(), r.version))
                        .collect(),
                    Sent::Nothing => HashMap::new(),
                };
                // A named subscription is a few names: compare them all.
                for name in &self.names {
                    d.compared += 1;
                    match current.get(name) {
                        Some(res) => send(&mut sent, name, res, &mut d),
                        None => {
                            if sent.remove(name).is_some() {
                                d.removed.push(name.clone());
                            }
                        }
                    }
                }
                d.compared += sent.len();
                sent.retain(|n, _| {
                    let keep = self.names.contains(n);
                    if !keep {
                        d.removed.push(n.clone());
                    }
                    keep
                });
                self.sent = Sent::Named(sent);
            }
        }
        for n in std::mem::take(&mut self.asked) {
            if !current.contains_key(&n) && !d.removed.contains(&n) {
                d.removed.push(n);
            }
        }
        d.removed.sort();
        d
    }
}

/// What a stream has sent of one kind, that the next diff is made against.
#[derive(Default)]
enum Sent {
    #[default]
    Nothing,
    /// Every resource of the kind in this snapshot, at its version there: what a wildcard
    /// subscription was brought up to date with. The snapshot is shared with every stream
    /// at the same point, so a synced wildcard stream keeps no per-resource state at all
    /// (5,000 proxies of a 5,500-resource mesh would otherwise keep 27 million entries).
    All(Arc<Snapshot>),
    /// The names sent and their versions (a named subscription: a few names).
    Named(HashMap<String, u64>),
}

/// A response sent and not answered yet.
struct InFlight {
    nonce: String,
    version: u64,
    /// The last part of its response: its ACK is the response's.
    last: bool,
    /// The resources it carried (added, changed and removed); empty when nothing was
    /// refused when it was sent (nothing to clear on its ACK).
    names: Vec<String>,
}

/// One part of a response (all of it when it was small enough).
struct Part {
    resources: Vec<Arc<Resource>>,
    removed: Vec<String>,
    version: u64,
    continues: bool,
}

/// Cuts a diff into parts of at most `limit` bytes of resources (a resource larger than the
/// limit is a part of its own); the removed names go with the last part.
fn split(
    changed: Vec<Arc<Resource>>,
    removed: Vec<String>,
    version: u64,
    limit: usize,
) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut current = Vec::new();
    let mut size = 0;
    for r in changed {
        if !current.is_empty() && size + r.encoded.len() > limit {
            parts.push(std::mem::take(&mut current));
            size = 0;
        }
        size += r.encoded.len();
        current.push(r);
    }
    parts.push(current);
    let n = parts.len();
    let mut removed = Some(removed);
    parts
        .into_iter()
        .enumerate()
        .map(|(i, resources)| Part {
            resources,
            removed: if i + 1 == n {
                removed.take().unwrap_or_default()
            } else {
                Vec::new()
            },
            version,
            continues: i + 1 < n,
        })
        .collect()
}

/// Adds `res` to the diff unless this stream already sent its version.
fn send(sent: &mut HashMap<String, u64>, name: &str, res: &Arc<Resource>, d: &mut Diff) {
    if sent.get(name) != Some(&res.version) {
        sent.insert(name.to_string(), res.version);
        d.changed.push(res.clone());
    }
}

/// What one stream owes a sidecar of one kind.
#[derive(Default)]
struct Diff {
    changed: Vec<Arc<Resource>>,
    removed: Vec<String>,
    /// Resources looked at to find the above (the cost of the diff).
    compared: usize,
}

impl Diff {
    /// One name, as sent (`old`) and as it is now.
    fn compare(&mut self, name: &str, old: Option<&Arc<Resource>>, now: Option<&Arc<Resource>>) {
        self.compared += 1;
        match (old, now) {
            (Some(o), Some(n)) if o.version == n.version => {}
            (_, Some(n)) => self.changed.push(n.clone()),
            (Some(_), None) => self.removed.push(name.to_string()),
            (None, None) => {}
        }
    }
}

struct StreamTask<'a> {
    svc: &'a DiscoveryService,
    /// Who the connection proved to be: a sidecar's stream is for its own identity.
    caller: crate::auth::Caller,
    tx: mpsc::Sender<Result<EncodedResponse, Status>>,
    kinds: PerKind<KindState>,
    /// Round robin over kinds, so one busy kind cannot starve the others.
    next_kind: usize,
}

impl StreamTask<'_> {
    async fn run(&mut self, mut inbound: Streaming<DiscoveryRequest>) {
        let mut shutdown = self.svc.shutdown.clone();
        // Who may not open a stream at all is told so before anything is read.
        if matches!(self.caller, crate::auth::Caller::Anonymous) {
            let _ = self.tx.send(Err(no_certificate())).await;
            return;
        }
        // The first request says who the sidecar is.
        let first = tokio::select! {
            m = inbound.message() => m,
            _ = shutdown.changed() => return,
        };
        let first = match first {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                debug!(error = %e, "discovery stream ended before the first request");
                return;
            }
        };
        let Some(mut node) = first.node.clone() else {
            let _ = self
                .tx
                .send(Err(Status::invalid_argument(
                    "the first request of a discovery stream must carry `node`",
                )))
                .await;
            return;
        };
        if let Err(status) = bind_identity(&self.caller, &mut node) {
            warn!(pod = %node.pod, namespace = %node.namespace, error = %status.message(), "discovery stream refused");
            let _ = self.tx.send(Err(status)).await;
            return;
        }
        if node.id.is_empty() {
            node.id = format!("{}.{}", node.pod, node.namespace);
        }
        let registration = self.svc.proxies.register(ProxyStatus {
            node: node.clone(),
            connected_at: SystemTime::now(),
            kinds: Default::default(),
        });
        let metrics = self.svc.metrics.clone();
        metrics.proxies_connected.inc();
        info!(proxy = %node.id, version = %node.version, "proxy connected");

        let result = self
            .serve(first, &mut inbound, &registration, &mut shutdown)
            .await;
        metrics.proxies_connected.dec();
        match result {
            Ok(()) => info!(proxy = %node.id, "proxy disconnected"),
            Err(status) => {
                warn!(proxy = %node.id, error = %status.message(), "discovery stream closed");
                let _ = self.tx.try_send(Err(status));
            }
        }
    }

    async fn serve(
        &mut self,
        first: DiscoveryRequest,
        inbound: &mut Streaming<DiscoveryRequest>,
        registration: &Registration,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), Status> {
        let mut snapshots = self.svc.registry.snapshots();
        snapshots.mark_unchanged();
        self.handle(first)?;
        self.publish(registration);
        loop {
            let can_send = self.kinds.values().any(KindState::ready);
            let tx = self.tx.clone();
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    return Err(Status::unavailable("the control plane is shutting down"));
                }
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => self.handle(req)?,
                    Ok(None) => return Ok(()),
                    Err(e) => {
                        debug!(error = %e, "discovery stream read failed");
                        return Ok(());
                    }
                },
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        return Err(Status::unavailable("the control plane is shutting down"));
                    }
                    for k in self.kinds.values_mut().filter(|k| k.subscribed) {
                        k.dirty = true;
                    }
                }
                permit = tx.reserve(), if can_send => {
                    let Ok(permit) = permit else { return Ok(()) };
                    let snap = snapshots.borrow_and_update().clone();
                    if let Some(resp) = self.build(&snap) {
                        permit.send(Ok(resp));
                    }
                }
            }
            self.publish(registration);
        }
    }

    /// Applies one request: a subscription change, an ACK or a NACK.
    fn handle(&mut self, req: DiscoveryRequest) -> Result<(), Status> {
        if let (true, Some(err)) = (req.type_url.is_empty(), &req.error_detail) {
            // A sidecar that could not decode a response says so before it reconnects.
            warn!(error = %err.message, "a proxy could not decode a discovery response");
            self.svc.metrics.nacked("undecodable");
            return Ok(());
        }
        let Some(kind) = ResourceKind::from_type_url(&req.type_url) else {
            return Err(Status::invalid_argument(format!(
                "unknown type_url {:?}; expected one of {}",
                req.type_url,
                kinds::ALL.join(", ")
            )));
        };
        let k = &mut self.kinds[kind];
        if !k.subscribed {
            // The first request of a kind is answered with its full state, even when empty,
            // so the sidecar knows it is in sync.
            k.subscribed = true;
            k.forced = true;
        }
        if !req.resource_names_subscribe.is_empty() || !req.resource_names_unsubscribe.is_empty() {
            k.compare_all = true;
        }
        for name in req.resource_names_subscribe {
            if name == "*" {
                k.wildcard = true;
            } else if k.names.insert(name.clone()) {
                k.asked.insert(name);
            }
            k.forced = true;
        }
        for name in req.resource_names_unsubscribe {
            if name == "*" {
                k.wildcard = false;
            } else {
                k.names.remove(&name);
            }
            k.forced = true;
        }
        if req.response_nonce.is_empty() {
            return Ok(());
        }
        let Some(pos) = k
            .in_flight
            .iter()
            .position(|f| f.nonce == req.response_nonce)
        else {
            debug!(nonce = %req.response_nonce, "ACK/NACK of an unknown or stale nonce");
            return Ok(());
        };
        let mut sent = k.in_flight.remove(pos);
        if !sent.last {
            // A part of a split response: the sidecar applies the parts with the last one.
            k.parts_names.append(&mut sent.names);
            return Ok(());
        }
        sent.names.append(&mut k.parts_names);
        let err = req.error_detail.as_ref();
        if let Some(err) = err {
            let type_url = kind.type_url();
            warn!(type_url, version = sent.version, error = %err.message, resources = ?err.resources, "NACK");
            self.svc.metrics.nacked(type_url);
        } else {
            k.status.acked_version = Some(sent.version);
        }
        k.status.answered(&sent.names, err);
        Ok(())
    }

    /// Copies this stream's state to what `ListProxies` reads.
    fn publish(&self, registration: &Registration) {
        let mut entry = lock(&registration.entry);
        for (status, k) in entry.kinds.values_mut().zip(self.kinds.values()) {
            *status = KindStatus {
                subscribed: k.subscribed,
                pending: k.forced || k.dirty || !k.in_flight.is_empty() || !k.parts.is_empty(),
                ..k.status.clone()
            };
        }
    }

    /// Builds the next response of a ready kind, or nothing when no kind has a change.
    fn build(&mut self, snap: &Arc<Snapshot>) -> Option<EncodedResponse> {
        for i in 0..kinds::COUNT {
            let kind = ResourceKind::ALL[(self.next_kind + i) % kinds::COUNT];
            let k = &mut self.kinds[kind];
            if !k.ready() {
                continue;
            }
            let mut forced = false;
            if k.parts.is_empty() {
                forced = std::mem::take(&mut k.forced);
                k.dirty = false;
                let Diff {
                    changed,
                    removed,
                    compared,
                } = k.diff(snap, kind);
                self.svc.metrics.compared(kind.type_url(), compared);
                if changed.is_empty() && removed.is_empty() && !forced {
                    continue;
                }
                k.parts = split(changed, removed, snap.version, self.svc.split_bytes).into();
            }
            let Some(part) = k.parts.pop_front() else {
                continue;
            };
            self.next_kind = (kind.index() + 1) % kinds::COUNT;
            let nonce = self.svc.nonces.fetch_add(1, Ordering::Relaxed).to_string();
            // The names are needed only to clear refusals when the answer comes: kept only
            // while there are refusals, or another answer could bring some first.
            let names = match k.status.rejected.is_empty() && k.in_flight.is_empty() {
                true => Vec::new(),
                false => part
                    .resources
                    .iter()
                    .map(|r| r.proto.name.clone())
                    .chain(part.removed.iter().cloned())
                    .collect(),
            };
            k.in_flight.push(InFlight {
                nonce: nonce.clone(),
                version: part.version,
                last: !part.continues,
                names,
            });
            k.status.sent_version = Some(part.version);
            let resp = EncodedResponse {
                type_url: kind.type_url().to_string(),
                version_info: part.version.to_string(),
                nonce,
                resources: part.resources.iter().map(|r| r.encoded.clone()).collect(),
                removed_resources: part.removed,
                continues: part.continues,
            };
            let latency = match (forced, snap.changed_at) {
                (false, Some(at)) => Some(Instant::now().saturating_duration_since(at)),
                _ => None,
            };
            self.svc
                .metrics
                .pushed(kind.type_url(), prost::Message::encoded_len(&resp), latency);
            return Some(resp);
        }
        None
    }
}
