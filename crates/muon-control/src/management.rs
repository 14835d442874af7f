//! The `Management` service (proto/muon/v1/management.proto): apply, delete, get and list
//! objects, list connected proxies, watch changes.
//!
//! Registry errors become gRPC statuses here and only here: invalid objects are
//! `INVALID_ARGUMENT` (the message names kind, namespace, name, field and reason, one problem
//! per line), unknown objects `NOT_FOUND`, objects owned by another source
//! `FAILED_PRECONDITION`, a store whose disk is full `RESOURCE_EXHAUSTED`, a store that cannot
//! write for another reason `UNAVAILABLE`. Every call needs an administrator (see `auth`):
//! `UNAUTHENTICATED` without a certificate, `PERMISSION_DENIED` for a workload's. A store error's message says what failed (file,
//! step, the data directory); nothing was changed and the previous objects keep serving.

use crate::convert::{object_from_proto, object_to_proto};
use crate::discovery::Proxies;
use crate::model::Stored;
use crate::registry::{Outcome, Registry, RegistryError};
use muon_api::v1;
use muon_core::resource::{Kind, ObjectKey, DEFAULT_NAMESPACE};
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

pub struct ManagementService {
    registry: Arc<Registry>,
    proxies: Arc<Proxies>,
    shutdown: watch::Receiver<bool>,
    /// Owns the tasks calls start (writes, watches): the server waits for them at shutdown.
    tasks: TaskTracker,
}

impl ManagementService {
    pub fn new(
        registry: Arc<Registry>,
        proxies: Arc<Proxies>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        ManagementService {
            registry,
            proxies,
            shutdown,
            tasks: TaskTracker::new(),
        }
    }

    /// Starts the tasks of calls on `tasks` (the server's, which it waits for).
    pub fn with_tasks(mut self, tasks: TaskTracker) -> Self {
        self.tasks = tasks;
        self
    }
}

fn status(e: RegistryError) -> Status {
    match e {
        RegistryError::Invalid(m) => Status::invalid_argument(m),
        RegistryError::NotFound(m) => Status::not_found(m),
        RegistryError::NotOwned(m) => Status::failed_precondition(m),
        RegistryError::Store(e) => {
            warn!(error = %e, "could not store a change");
            let message = format!("could not store the change: {e}");
            if e.is_out_of_space() {
                Status::resource_exhausted(message)
            } else {
                Status::unavailable(message)
            }
        }
    }
}

fn parse_kind(kind: &str) -> Result<Kind, Status> {
    Kind::parse(kind).ok_or_else(|| {
        Status::invalid_argument(format!(
            "unknown kind {kind:?}; expected one of {}",
            Kind::ALL.map(Kind::as_str).join(", ")
        ))
    })
}

fn key(kind: &str, namespace: &str, name: &str) -> Result<ObjectKey, Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{kind}: name is required"
        )));
    }
    Ok(ObjectKey {
        kind: parse_kind(kind)?,
        namespace: if namespace.is_empty() {
            DEFAULT_NAMESPACE.to_string()
        } else {
            namespace.to_string()
        },
        name: name.to_string(),
    })
}

fn refs(o: Outcome) -> Vec<v1::ObjectRef> {
    o.results
        .into_iter()
        .map(|(k, result)| v1::ObjectRef {
            kind: k.kind.as_str().to_string(),
            namespace: k.namespace,
            name: k.name,
            result: result.to_string(),
        })
        .collect()
}

/// A page of List is cut after this many bytes of objects (objects are at most
/// `--max-object-bytes` each, so a page stays far below the message limit).
const LIST_PAGE_BYTES: usize = 4 << 20;

/// The objects after `token` (the key of the last object of the previous page,
/// `Kind/namespace/name`), up to `limit` bytes, and the next page's token ("" at the end).
/// Objects come in key order, so a page boundary survives changes between pages.
fn page(
    objects: &[Stored],
    token: &str,
    limit: usize,
) -> Result<(Vec<v1::Object>, String), Status> {
    let after = match token {
        "" => None,
        t => {
            let mut parts = t.splitn(3, '/');
            let (Some(kind), Some(namespace), Some(name)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(Status::invalid_argument(format!(
                    "page_token {t:?} is not one this server gave"
                )));
            };
            Some(key(kind, namespace, name)?)
        }
    };
    let mut out = Vec::new();
    let mut bytes = 0;
    let mut last = None;
    for s in objects
        .iter()
        .filter(|s| after.as_ref().is_none_or(|a| s.object.key() > *a))
    {
        let o = object_to_proto(s);
        let n = prost::Message::encoded_len(&o);
        if !out.is_empty() && bytes + n > limit {
            let k: ObjectKey = last.unwrap_or_else(|| s.object.key());
            return Ok((out, format!("{}/{}/{}", k.kind, k.namespace, k.name)));
        }
        bytes += n;
        out.push(o);
        last = Some(s.object.key());
    }
    Ok((out, String::new()))
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

type WatchStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::WatchEvent, Status>> + Send>>;

/// Runs a registry write on a task of its own, so that a dropped request (client deadline,
/// disconnect) cannot cancel it between the durable write and the in-memory commit.
async fn run_to_completion<T: Send + 'static>(
    tasks: &TaskTracker,
    write: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, Status> {
    tasks
        .spawn(write)
        .await
        .map_err(|e| Status::internal(format!("the registry write failed: {e}")))
}

#[tonic::async_trait]
impl v1::management_server::Management for ManagementService {
    async fn apply(
        &self,
        request: Request<v1::ApplyRequest>,
    ) -> Result<Response<v1::ApplyResponse>, Status> {
        crate::auth::require_admin(&request)?;
        let req = request.into_inner();
        if req.objects.is_empty() {
            return Err(Status::invalid_argument("apply: no objects given"));
        }
        // Validate everything first and report every problem of every object.
        let mut objects = Vec::with_capacity(req.objects.len());
        let mut problems = Vec::new();
        for (i, o) in req.objects.iter().enumerate() {
            match object_from_proto(o, i) {
                Ok(o) => objects.push(o),
                Err(invalid) => problems.push(invalid.to_string()),
            }
        }
        if !problems.is_empty() {
            return Err(Status::invalid_argument(problems.join("\n")));
        }
        // Run to completion even if the caller goes away: once the store has the change on
        // disk, the registry must take it too (a half-finished apply would be undone on disk
        // by the next one).
        let registry = self.registry.clone();
        let dry_run = req.dry_run;
        let outcome = run_to_completion(&self.tasks, async move {
            registry.apply(objects, dry_run).await
        })
        .await?
        .map_err(status)?;
        if !req.dry_run {
            for (k, result) in &outcome.results {
                info!(object = %k, result, version = outcome.version, "applied");
            }
        }
        let version = outcome.version;
        Ok(Response::new(v1::ApplyResponse {
            applied: refs(outcome),
            version,
        }))
    }

    async fn delete(
        &self,
        request: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::DeleteResponse>, Status> {
        crate::auth::require_admin(&request)?;
        let req = request.into_inner();
        if req.objects.is_empty() {
            return Err(Status::invalid_argument("delete: no objects given"));
        }
        let keys = req
            .objects
            .iter()
            .map(|r| key(&r.kind, &r.namespace, &r.name))
            .collect::<Result<Vec<_>, _>>()?;
        let registry = self.registry.clone();
        let outcome = run_to_completion(&self.tasks, async move { registry.delete(keys).await })
            .await?
            .map_err(status)?;
        for (k, _) in &outcome.results {
            info!(object = %k, version = outcome.version, "deleted");
        }
        let version = outcome.version;
        Ok(Response::new(v1::DeleteResponse {
            deleted: refs(outcome),
            version,
        }))
    }

    async fn get(&self, request: Request<v1::GetRequest>) -> Result<Response<v1::Object>, Status> {
        crate::auth::require_admin(&request)?;
        let req = request.into_inner();
        let k = key(&req.kind, &req.namespace, &req.name)?;
        match self.registry.get(&k).await {
            Some(s) => Ok(Response::new(object_to_proto(&s))),
            None => Err(Status::not_found(format!("{k} not found"))),
        }
    }

    async fn list(
        &self,
        request: Request<v1::ListRequest>,
    ) -> Result<Response<v1::ListResponse>, Status> {
        crate::auth::require_admin(&request)?;
        let req = request.into_inner();
        let kind = match req.kind.as_str() {
            "" => None,
            k => Some(parse_kind(k)?),
        };
        let ns = (!req.namespace.is_empty()).then_some(req.namespace.as_str());
        let (objects, version) = self.registry.list(kind, ns).await;
        let (page, next_page_token) = page(&objects, &req.page_token, LIST_PAGE_BYTES)?;
        Ok(Response::new(v1::ListResponse {
            objects: page,
            version,
            next_page_token,
        }))
    }

    async fn list_proxies(
        &self,
        request: Request<v1::ListProxiesRequest>,
    ) -> Result<Response<v1::ListProxiesResponse>, Status> {
        crate::auth::require_admin(&request)?;
        let version = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
        let proxies = self
            .proxies
            .list()
            .into_iter()
            .map(|p| v1::ProxyStatus {
                id: p.node.id,
                pod: p.node.pod,
                namespace: p.node.namespace,
                service_account: p.node.service_account,
                proxy_version: p.node.version,
                connected_at: Some(timestamp(p.connected_at)),
                kinds: p
                    .kinds
                    .iter()
                    .filter(|(_, k)| k.subscribed)
                    .map(|(kind, k)| v1::KindStatus {
                        type_url: kind.type_url().to_string(),
                        sent_version: version(k.sent_version),
                        acked_version: version(k.acked_version),
                        state: k.state().to_string(),
                        last_error: k.last_error(),
                        last_nack_at: k.last_nack_at.map(timestamp),
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(v1::ListProxiesResponse { proxies }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<v1::WatchRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        crate::auth::require_admin(&request)?;
        let req = request.into_inner();
        let kind = match req.kind.as_str() {
            "" => None,
            k => Some(parse_kind(k)?),
        };
        let mut events = self.registry.events();
        let mut shutdown = self.shutdown.clone();
        let (tx, rx) = mpsc::channel(64);
        self.tasks.spawn(async move {
            loop {
                let event = tokio::select! {
                    e = events.recv() => e,
                    _ = tx.closed() => return,
                    _ = shutdown.changed() => return,
                };
                let event = match event {
                    Ok(e) => e,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::resource_exhausted(format!(
                                "watch fell {n} events behind; list and watch again"
                            ))))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if kind.is_some_and(|k| k != event.stored.object.kind()) {
                    continue;
                }
                let msg = v1::WatchEvent {
                    r#type: if event.deleted { "deleted" } else { "applied" }.to_string(),
                    object: Some(object_to_proto(&event.stored)),
                    version: event.version,
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
