//! The Kubernetes source: watches the cluster (kube-rs watchers) and keeps the registry's
//! `kubernetes` objects in step with it, by key (`Registry::update_source`).
//!
//! One watcher per resource: Services, EndpointSlices, Pods, Nodes (for their topology
//! labels), HTTPRoutes and GRPCRoutes, and Muon's custom resources (`muon.io` and the
//! Gateway API's `XBackendTrafficPolicy`). Each turns what it receives into a summary
//! ([`convert`]) and sends it to one task that owns the [`cluster::Cluster`], which converts
//! only what changed; what a burst changed goes to the registry as one update.
//!
//! kube's watcher relists when a watch fails (410 Gone after a compaction, a dropped
//! connection), with backoff; a relist is buffered until it completes, so the last good state
//! keeps serving meanwhile. The first update waits until every watcher has listed once (or
//! [`INITIAL_SYNC`] has passed), so sidecars never see a half-listed cluster by mistake.
//!
//! kube stays in the control plane: muon-proxy never depends on it (a test checks).

pub mod cluster;
pub mod convert;
pub mod identity;

use crate::model::Source;
use crate::registry::Registry;
use cluster::{Cluster, Event, Update};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt;
use muon_core::resource::{Kind, GATEWAY_API_GROUP, MUON_API_VERSION, MUON_GROUP};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

/// How long the first update waits for every watcher's first list (a custom resource whose
/// CRD is not installed never lists; its watcher keeps retrying).
pub const INITIAL_SYNC: Duration = Duration::from_secs(10);
/// Updates queued from the watchers at most; a full queue makes watchers wait.
const QUEUE: usize = 1024;
/// Updates folded into one registry update at most.
const BATCH: usize = 4096;

/// Where the Kubernetes API is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiServer {
    /// In-cluster configuration, else `$KUBECONFIG` / `~/.kube/config`.
    Infer,
    /// A plain URL without credentials (`kubectl proxy`, tests).
    Url(String),
}

/// Builds the client for `api`.
pub async fn client(api: &ApiServer) -> anyhow::Result<kube::Client> {
    use anyhow::Context;
    // rustls needs a process-wide crypto provider for the API server's TLS; another may
    // already be installed, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match api {
        ApiServer::Infer => kube::Client::try_default()
            .await
            .context("the Kubernetes client (in-cluster configuration or KUBECONFIG)"),
        ApiServer::Url(url) => {
            let uri: http::Uri = url
                .parse()
                .with_context(|| format!("--kubernetes-api {url:?}"))?;
            kube::Client::try_from(kube::Config::new(uri))
                .with_context(|| format!("the Kubernetes client for {url}"))
        }
    }
}

/// One watcher's message: an update, and whether it ends a (re)list.
struct Message {
    /// The watcher's index.
    resource: usize,
    update: Update,
    listed: bool,
}

/// The custom resources the source reads: Muon's own kinds and `XBackendTrafficPolicy`,
/// with their API group, version and plural.
pub fn custom_resources() -> Vec<(Kind, &'static str, &'static str, String)> {
    let mut out: Vec<_> = Kind::ALL
        .into_iter()
        .filter(|k| k.api_version() == MUON_API_VERSION)
        .map(|k| (k, MUON_GROUP, "v1alpha1", plural(k)))
        .collect();
    out.push((
        Kind::BackendTrafficPolicy,
        "gateway.networking.x-k8s.io",
        "v1alpha1",
        plural(Kind::BackendTrafficPolicy),
    ));
    out
}

/// `services`, `authorizationpolicies`: the plural the CRDs of `muonctl install` use.
fn plural(kind: Kind) -> String {
    let lower = kind.as_str().to_ascii_lowercase();
    match lower.strip_suffix('y') {
        Some(stem) => format!("{stem}ies"),
        None => format!("{lower}s"),
    }
}

/// Watches the cluster until `shutdown`, keeping the registry's Kubernetes objects in step,
/// and publishes `trust_bundle` (PEM) to every namespace with meshed pods
/// ([`identity::publish_bundle`]).
pub async fn run(
    client: kube::Client,
    registry: Arc<Registry>,
    trust_bundle: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let (tx, mut rx) = mpsc::channel(QUEUE);
    let mut watchers = JoinSet::new();
    let mut names: Vec<String> = Vec::new();
    let (meshed_tx, meshed_rx) = watch::channel(BTreeSet::new());
    let mut publisher = tokio::spawn(identity::publish_bundle(
        client.clone(),
        trust_bundle,
        meshed_rx,
        shutdown.clone(),
    ));

    spawn(
        &mut watchers,
        Api::<Service>::all(client.clone()),
        &mut names,
        "services",
        tx.clone(),
        |e| map(e, convert::service).map(Update::Service),
    );
    spawn(
        &mut watchers,
        Api::<EndpointSlice>::all(client.clone()),
        &mut names,
        "endpointslices",
        tx.clone(),
        |e| map(e, convert::slice).map(Update::Slice),
    );
    spawn(
        &mut watchers,
        Api::<Pod>::all(client.clone()),
        &mut names,
        "pods",
        tx.clone(),
        |e| map(e, convert::pod).map(Update::Pod),
    );
    spawn(
        &mut watchers,
        Api::<Node>::all(client.clone()),
        &mut names,
        "nodes",
        tx.clone(),
        |e| map(e, convert::node).map(Update::Node),
    );
    spawn(
        &mut watchers,
        Api::<Namespace>::all(client.clone()),
        &mut names,
        "namespaces",
        tx.clone(),
        |e| map(e, convert::namespace).map(Update::Namespace),
    );
    let mut dynamic = vec![
        (
            Kind::HttpRoute,
            GATEWAY_API_GROUP,
            "v1",
            "httproutes".to_string(),
        ),
        (
            Kind::GrpcRoute,
            GATEWAY_API_GROUP,
            "v1",
            "grpcroutes".to_string(),
        ),
    ];
    dynamic.extend(custom_resources());
    for (kind, group, version, plural) in dynamic {
        let gvk = GroupVersionKind::gvk(group, version, kind.as_str());
        let resource = ApiResource::from_gvk_with_plural(&gvk, &plural);
        let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
        let name = format!("{plural}.{group}");
        spawn(
            &mut watchers,
            api,
            &mut names,
            &name,
            tx.clone(),
            move |e| map(e, |o| dynamic_object(kind, o)).map(|e| Update::Object(kind, Box::new(e))),
        );
    }
    drop(tx);
    info!(resources = names.len(), "watching the Kubernetes API");

    let mut cluster = Cluster::default();
    let mut unlisted: BTreeSet<usize> = (0..names.len()).collect();
    let deadline = tokio::time::Instant::now() + INITIAL_SYNC;
    let mut synced = false;
    loop {
        let first = tokio::select! {
            m = rx.recv() => match m { Some(m) => Some(m), None => break },
            _ = tokio::time::sleep_until(deadline), if !synced => None,
            _ = shutdown.changed() => break,
        };
        let mut batch: Vec<Message> = first.into_iter().collect();
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        for m in batch {
            if m.listed {
                unlisted.remove(&m.resource);
            }
            cluster.apply(m.update);
        }
        if !synced {
            if !unlisted.is_empty() && tokio::time::Instant::now() < deadline {
                continue;
            }
            synced = true;
            if unlisted.is_empty() {
                info!("every Kubernetes resource listed");
            } else {
                let missing: Vec<&str> = unlisted.iter().map(|i| names[*i].as_str()).collect();
                warn!(?missing, "not every Kubernetes resource could be listed in time; serving what was (their watchers keep trying)");
            }
        }
        meshed_tx.send_if_modified(|known| {
            let now = cluster.meshed_namespaces();
            let changed = *known != now;
            *known = now;
            changed
        });
        let delta = cluster.flush();
        if !delta.is_empty() {
            registry
                .update_source(Source::Kubernetes, delta.upserts, delta.removals)
                .await;
        }
    }
    watchers.shutdown().await;
    drop(meshed_tx);
    if tokio::time::timeout(Duration::from_secs(5), &mut publisher)
        .await
        .is_err()
    {
        publisher.abort();
    }
}

fn dynamic_object(
    kind: Kind,
    o: &DynamicObject,
) -> Option<(
    muon_core::resource::ObjectKey,
    Option<muon_core::resource::Object>,
)> {
    let key = convert::dynamic_key(kind, o)?;
    match convert::dynamic(kind, o) {
        Ok(object) => Some((key, object)),
        Err(problems) => {
            warn!(object = %key, "Kubernetes object left out:\n{problems}");
            Some((key, None))
        }
    }
}

/// A kube watcher event as the cluster's, its object summarised by `f`; an object without
/// a name (never from a real API server) is dropped.
fn map<K, Key, T>(
    e: watcher::Event<K>,
    f: impl Fn(&K) -> Option<(Key, T)>,
) -> Option<Event<Key, T>> {
    Some(match e {
        watcher::Event::Init => Event::Init,
        watcher::Event::InitDone => Event::InitDone,
        watcher::Event::InitApply(o) => {
            let (k, v) = f(&o)?;
            Event::InitApply(k, v)
        }
        watcher::Event::Apply(o) => {
            let (k, v) = f(&o)?;
            Event::Apply(k, v)
        }
        watcher::Event::Delete(o) => Event::Delete(f(&o)?.0),
    })
}

/// Runs one watcher, sending its events until the receiver is gone. Errors are logged; the
/// watcher retries with backoff (relisting when its resource version expired).
fn spawn<K, F>(
    tasks: &mut JoinSet<()>,
    api: Api<K>,
    names: &mut Vec<String>,
    name: &str,
    tx: mpsc::Sender<Message>,
    to_update: F,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    F: Fn(watcher::Event<K>) -> Option<Update> + Send + 'static,
{
    let resource = names.len();
    names.push(name.to_string());
    let resource_name = name.to_string();
    tasks.spawn(async move {
        let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(event) => {
                    let listed = matches!(event, watcher::Event::InitDone);
                    let Some(update) = to_update(event) else {
                        continue;
                    };
                    let m = Message {
                        resource,
                        update,
                        listed,
                    };
                    if tx.send(m).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    warn!(resource = %resource_name, error = %e, "Kubernetes watch failed; retrying, the last state keeps serving");
                }
            }
        }
    });
}
