//! The discovery stream to the control plane (`--control-plane`), see
//! `proto/muon/v1/discovery.proto` for the protocol.
//!
//! One session: connect, send one request per kind (the first carries the [`Node`]) with
//! its subscription, then for every response apply it through the [`Applier`] and answer
//! with an ACK (`version_info` = the response's version) or a NACK (`version_info` = the last
//! version accepted whole, `error_detail` naming every rejected resource and why). The first
//! response of each kind on a stream is the full state of that kind.
//!
//! In on-demand mode the initial `endpoints` request names the services subscribed so far
//! (possibly none) instead of `*`, and while the stream is open the client also sends the
//! names the data path asks for ([`OnDemand`]), one `resource_names_subscribe` request as
//! they come. After applying an `endpoints` response it releases whoever waits for a name the
//! response mentions.
//!
//! When the stream fails or ends, the client waits (exponential backoff with jitter: 100 ms
//! doubling to 15 s, ±50 %) and starts a new session, which re-subscribes (on demand: every
//! name subscribed so far) and receives the full state again. Meanwhile the last good tables
//! keep serving.

use super::on_demand::OnDemand;
use super::{Applier, Worker};
use crate::config::{Config, DiscoveryMode};
use crate::metrics::Metrics;
use muon_api::v1::discovery_client::DiscoveryClient;
use muon_api::v1::{kinds, DiscoveryRequest, DiscoveryResponse, ErrorDetail, Locality, Node};
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tracing::{debug, info, warn};

/// First and largest pause between two sessions.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// Deadline for the TCP + HTTP/2 connect to the control plane.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline for the control plane to open the stream and send its first response (a
/// control plane that accepts and never answers is given up on, and tried again later).
const FIRST_RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);
/// HTTP/2 pings find a control plane that vanished without closing the connection.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests queued towards the control plane (one ACK per response; the client waits for
/// room rather than dropping an ACK).
const OUTBOX: usize = 16;

/// What the client needs from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub addr: String,
    /// How to reach it (TLS, this sidecar's certificate).
    pub cp: crate::identity::ControlPlane,
    pub node: Node,
    pub mode: DiscoveryMode,
}

impl Settings {
    pub fn from_config(config: &Config, cp: crate::identity::ControlPlane) -> Self {
        Settings {
            addr: cp.url.clone(),
            cp,
            mode: config.discovery_mode,
            node: Node {
                id: format!("{}.{}", config.pod_name, config.pod_namespace),
                pod: config.pod_name.clone(),
                namespace: config.pod_namespace.clone(),
                service_account: config.service_account.clone(),
                locality: Some(Locality {
                    zone: config.zone.clone(),
                    region: config.region.clone(),
                    cloud: config.cloud.clone(),
                }),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                ips: config.pod_ips.iter().map(|ip| ip.to_string()).collect(),
            },
        }
    }

    /// The initial subscription of each kind: everything, except on demand for endpoints:
    /// the names subscribed so far.
    fn subscription(&self, type_url: &str, on_demand: Option<&OnDemand>) -> Vec<String> {
        match (self.mode, type_url) {
            (DiscoveryMode::OnDemand, kinds::ENDPOINTS) => {
                on_demand.map(OnDemand::resubscribe).unwrap_or_default()
            }
            _ => vec!["*".to_owned()],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("invalid control-plane address {0:?}: {1}")]
    Address(String, tonic::transport::Error),
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    #[error("stream: {0}")]
    Stream(#[from] tonic::Status),
    #[error("the control plane closed the stream")]
    Closed,
    #[error(transparent)]
    Worker(#[from] super::worker::Gone),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("a response could not be decoded ({0}); NACKed, keeping the last good tables")]
    Undecodable(String),
}

/// Keeps a session going for the life of the process.
pub async fn run(
    settings: Settings,
    worker: Worker<Applier>,
    metrics: Arc<Metrics>,
    on_demand: Option<Arc<OnDemand>>,
) {
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    loop {
        let err = session(
            &settings,
            &worker,
            &metrics,
            on_demand.as_deref(),
            &mut backoff,
        )
        .await;
        metrics.discovery_connected(false);
        let pause = backoff.next_pause();
        warn!(addr = %settings.addr, error = %err, retry_in = ?pause, "discovery stream down; keeping the last good tables");
        tokio::time::sleep(pause).await;
        metrics.discovery_reconnect();
    }
}

/// One stream, until it fails.
async fn session(
    settings: &Settings,
    worker: &Worker<Applier>,
    metrics: &Metrics,
    on_demand: Option<&OnDemand>,
    backoff: &mut Backoff,
) -> SessionError {
    let endpoint = match Endpoint::from_shared(settings.cp.dial_url()) {
        Ok(e) => e
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true),
        Err(e) => return SessionError::Address(settings.addr.clone(), e),
    };
    let connect = muon_api::connect::channel(endpoint, settings.cp.tls());
    let channel = match tokio::time::timeout(CONNECT_TIMEOUT * 2, connect).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return SessionError::Connect(settings.addr.clone(), error_chain(&e)),
        Err(_) => {
            return SessionError::Timeout(format!(
                "connecting to {} took more than {:?}",
                settings.addr,
                CONNECT_TIMEOUT * 2
            ))
        }
    };
    // The same limit as the control plane's: it never builds a larger message.
    let mut client = DiscoveryClient::new(channel)
        .max_decoding_message_size(muon_api::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(muon_api::MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel(OUTBOX);
    for (i, type_url) in kinds::ALL.into_iter().enumerate() {
        let req = DiscoveryRequest {
            node: (i == 0).then(|| settings.node.clone()),
            type_url: type_url.to_owned(),
            resource_names_subscribe: settings.subscription(type_url, on_demand),
            ..Default::default()
        };
        // Room for every kind: the channel is empty and larger than `kinds::ALL`.
        let _ = tx.try_send(req);
    }
    let opened = tokio::time::timeout(
        FIRST_RESPONSE_TIMEOUT,
        client.stream(ReceiverStream::new(rx)),
    );
    let mut stream = match opened.await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(status)) => return status.into(),
        Err(_) => {
            return SessionError::Timeout(format!(
                "the control plane at {} did not open the discovery stream within {FIRST_RESPONSE_TIMEOUT:?}",
                settings.addr
            ))
        }
    };
    metrics.discovery_connected(true);
    info!(addr = %settings.addr, node = %settings.node.id, "discovery stream open");
    let mut seen: HashSet<String> = HashSet::new();
    // Parts of a split response, by kind, until its last part arrives.
    let mut parts: HashMap<String, DiscoveryResponse> = HashMap::new();
    let mut answered_once = false;
    loop {
        let first_deadline = async {
            match answered_once {
                true => std::future::pending().await,
                false => tokio::time::sleep(FIRST_RESPONSE_TIMEOUT).await,
            }
        };
        let message = tokio::select! {
            m = stream.message() => m,
            () = first_deadline => {
                return SessionError::Timeout(format!(
                    "no response from the control plane at {} within {FIRST_RESPONSE_TIMEOUT:?} of subscribing",
                    settings.addr
                ));
            }
            () = unsent(on_demand) => {
                let Some(req) = on_demand.and_then(subscribe_request) else {
                    continue;
                };
                if tx.send(req).await.is_err() {
                    return SessionError::Closed;
                }
                continue;
            }
        };
        let resp = match message {
            Ok(Some(resp)) => resp,
            Ok(None) => return SessionError::Closed,
            Err(status)
                if status.code() == tonic::Code::Internal
                    || status.code() == tonic::Code::ResourceExhausted =>
            {
                // A message this sidecar cannot decode: say so on the stream (the control
                // plane logs and counts it) rather than silently reconnecting into it again.
                let nack = DiscoveryRequest {
                    error_detail: Some(ErrorDetail {
                        message: format!("cannot decode a response: {}", status.message()),
                        resources: Vec::new(),
                    }),
                    ..Default::default()
                };
                let _ = tx.send(nack).await;
                return SessionError::Undecodable(status.message().to_string());
            }
            Err(status) => return status.into(),
        };
        // A response means the control plane is really there: start the backoff over.
        backoff.reset();
        answered_once = true;
        if resp.continues {
            // One part of a larger response: kept until the last part; its ACK only says
            // that it arrived.
            let acc = parts
                .entry(resp.type_url.clone())
                .or_insert_with(|| DiscoveryResponse {
                    type_url: resp.type_url.clone(),
                    ..Default::default()
                });
            acc.resources.extend(resp.resources);
            acc.removed_resources.extend(resp.removed_resources);
            let ack = DiscoveryRequest {
                type_url: resp.type_url,
                response_nonce: resp.nonce,
                ..Default::default()
            };
            if tx.send(ack).await.is_err() {
                return SessionError::Closed;
            }
            continue;
        }
        let resp = match parts.remove(&resp.type_url) {
            Some(mut acc) => {
                acc.resources.extend(resp.resources);
                acc.removed_resources.extend(resp.removed_resources);
                acc.version_info = resp.version_info;
                acc.nonce = resp.nonce;
                acc
            }
            None => resp,
        };
        let full = seen.insert(resp.type_url.clone());
        // Off the runtime: applying and compiling may take a while on a big mesh.
        let (reply, resp) = match worker.call(move |a| (respond(a, &resp, full), resp)).await {
            Ok(r) => r,
            Err(e) => return e.into(),
        };
        if let (Some(od), kinds::ENDPOINTS) = (on_demand, resp.type_url.as_str()) {
            // After the publish in `respond`: whoever is released finds the answer.
            let mentioned = resp.resources.iter().map(|r| r.name.as_str());
            od.answered(mentioned.chain(resp.removed_resources.iter().map(String::as_str)));
        }
        if tx.send(reply).await.is_err() {
            return SessionError::Closed;
        }
    }
}

/// Resolves when the data path subscribed to names; never without on-demand subscriptions.
async fn unsent(on_demand: Option<&OnDemand>) {
    match on_demand {
        Some(od) => od.unsent().await,
        None => std::future::pending().await,
    }
}

/// The request that adds the names subscribed since the last one, if any.
fn subscribe_request(on_demand: &OnDemand) -> Option<DiscoveryRequest> {
    let names = on_demand.take_unsent();
    if names.is_empty() {
        return None;
    }
    info!(services = ?names, "subscribing to endpoints on demand");
    Some(DiscoveryRequest {
        type_url: kinds::ENDPOINTS.to_owned(),
        resource_names_subscribe: names,
        ..Default::default()
    })
}

/// Applies a response and builds its ACK or NACK (on the worker thread).
fn respond(applier: &mut Applier, resp: &DiscoveryResponse, full: bool) -> DiscoveryRequest {
    let result = applier.apply(resp, full);
    let metrics = applier.metrics().clone();
    let accepted = applier
        .state()
        .kind(&resp.type_url)
        .map(|k| k.version.clone())
        .unwrap_or_default();
    let mut req = DiscoveryRequest {
        type_url: resp.type_url.clone(),
        response_nonce: resp.nonce.clone(),
        version_info: accepted,
        ..Default::default()
    };
    match result {
        Ok(applied) if applied.rejected.is_empty() => {
            metrics.discovery_update(&resp.type_url, true);
            debug!(type_url = %resp.type_url, version = %resp.version_info, added = resp.resources.len(), removed = resp.removed_resources.len(), "applied; ACK");
        }
        Ok(applied) => {
            metrics.discovery_update(&resp.type_url, false);
            let message = applied
                .rejected
                .iter()
                .map(|r| format!("{}: {}", r.name, r.reason))
                .collect::<Vec<_>>()
                .join("; ");
            warn!(type_url = %resp.type_url, version = %resp.version_info, error = %message, "resources rejected; NACK (the rest is applied, the rejected ones keep their last good version)");
            req.error_detail = Some(ErrorDetail {
                message,
                resources: applied.rejected.into_iter().map(|r| r.name).collect(),
            });
        }
        Err(message) => {
            metrics.discovery_update(&resp.type_url, false);
            warn!(type_url = %resp.type_url, error = %message, "response rejected; NACK");
            req.error_detail = Some(ErrorDetail {
                message,
                resources: Vec::new(),
            });
        }
    }
    req
}

/// `e` and its sources, so "transport error" says what actually failed.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        cur = s.source();
    }
    out
}

/// Exponential backoff with ±50 % jitter, so sidecars that lost the control plane together
/// do not all come back in the same instant.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    seed: u64,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        // Per-process randomness without a dependency: std's hasher keys are random.
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Backoff {
            min,
            max,
            next: min,
            seed,
        }
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// The pause before the next attempt: the current step ±50 %, then the step doubles
    /// up to `max`.
    pub fn next_pause(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        // xorshift64
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let factor = 0.5 + (self.seed % 1000) as f64 / 1000.0;
        base.mul_f64(factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(15));
        let mut steps = Vec::new();
        for _ in 0..12 {
            steps.push(b.next_pause());
        }
        let ms: Vec<u128> = steps.iter().map(|d| d.as_millis()).collect();
        assert!((50..=150).contains(&ms[0]), "{ms:?}");
        assert!((100..=300).contains(&ms[1]), "{ms:?}");
        for late in &ms[9..] {
            assert!((7_500..=22_500).contains(late), "{ms:?}");
        }
        b.reset();
        assert!(b.next_pause() <= Duration::from_millis(150));
    }
}
