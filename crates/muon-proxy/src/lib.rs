//! Muon's sidecar proxy: the transparent data plane of one pod.
//!
//! The data path, one module per stage:
//!
//! ```text
//! app ─► iptables REDIRECT ─► listen (accept, SO_ORIGINAL_DST, loop guard, overload)
//!          ├─ outbound: plan (table lookup; on demand, a first miss subscribes and waits)
//!          │            ─► balance ─► tcp::connect(endpoint) ─► tcp::relay
//!          └─ inbound:  plan ─► policy (authorize) ─► tcp::connect(app, source 127.0.0.6 /
//!                       ::6) ─► tcp::relay (authorized again at every policy change)
//!        every connection ends in accesslog::finish (one `access` event + metrics)
//! ```
//!
//! Around it: `discovery` turns what the control plane sends into the [`model`], compiles it
//! into a [`table`] (on a thread of its own; swapped atomically, read without locks) and
//! carries per-endpoint state across tables ([`endpoint`]); `admin` serves health, metrics
//! and the admin API, `drain` coordinates shutdown, `server` wires it all together and
//! `config` turns flags into a validated [`config::Config`].
#![forbid(unsafe_code)]

pub mod accesslog;
pub mod admin;
pub mod balance;
pub mod config;
pub mod detect;
pub mod discovery;
pub mod drain;
pub mod endpoint;
pub mod gateway;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod jsonlog;
pub mod listen;
pub mod logwriter;
pub mod metrics;
pub mod model;
pub mod outbound;
pub mod policy;
pub mod route;
pub mod server;
pub mod table;
pub mod tcp;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Which listener a connection arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the local app to somewhere else (port 15001).
    Outbound,
    /// From somewhere else to the local app (port 15006).
    Inbound,
    /// From outside the mesh into it (`--mode gateway`, `--listen`).
    Gateway,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
            Direction::Gateway => "gateway",
        }
    }
}

/// How a connection ended: one label value per kind, shared by the access log and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Both directions reached EOF.
    Ok,
    /// The upstream refused or the connect failed (every endpoint tried).
    ConnectError,
    /// The (last) connect attempt did not finish within `--connect-timeout`.
    ConnectTimeout,
    /// No byte in either direction for `--idle-timeout`.
    IdleTimeout,
    /// The destination is a known service without endpoints.
    NoEndpoints,
    /// The connection was not redirected (or points back at the proxy): refused.
    Loop,
    /// `--max-connections` were already open: accepted and closed at once.
    Overloaded,
    /// Still open when the drain deadline passed: closed by the proxy.
    DrainTimeout,
    /// A read or write failed mid-stream (reset, broken pipe, ...).
    Error,
    /// `--outbound-policy registry-only` and no service claims the destination: refused.
    RefusedUnknown,
    /// An authorization policy denied it: closed before the app was reached, or when a
    /// policy change no longer allowed it.
    Denied,
    /// Not the mesh's mutual TLS to a port in STRICT mode (PeerAuthentication): closed.
    MtlsRequired,
}

impl Outcome {
    pub const ALL: [Outcome; 12] = [
        Outcome::Ok,
        Outcome::ConnectError,
        Outcome::ConnectTimeout,
        Outcome::IdleTimeout,
        Outcome::NoEndpoints,
        Outcome::Loop,
        Outcome::Overloaded,
        Outcome::DrainTimeout,
        Outcome::Error,
        Outcome::RefusedUnknown,
        Outcome::Denied,
        Outcome::MtlsRequired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ConnectError => "connect_error",
            Outcome::ConnectTimeout => "connect_timeout",
            Outcome::IdleTimeout => "idle_timeout",
            Outcome::NoEndpoints => "no_endpoints",
            Outcome::Loop => "loop",
            Outcome::Overloaded => "overloaded",
            Outcome::DrainTimeout => "drain_timeout",
            Outcome::Error => "error",
            Outcome::RefusedUnknown => "refused_unknown",
            Outcome::Denied => "denied",
            Outcome::MtlsRequired => "mtls_required",
        }
    }
}

/// The pod this proxy serves, stamped on every access event.
#[derive(Debug, Clone, Default)]
pub struct PodInfo {
    pub pod: Arc<str>,
    pub namespace: Arc<str>,
}

/// Everything a connection task reads. Built once; shared by `Arc`; nothing in it is
/// mutated on the per-connection path except atomics.
pub struct Shared {
    pub table: table::SharedTable,
    pub metrics: Arc<metrics::Metrics>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// What to do with destinations no service claims.
    pub outbound_policy: config::OutboundPolicy,
    /// `--discovery-mode on-demand` with a control plane: where a connection to a service
    /// whose endpoints are not known yet subscribes and waits. Touched only on that miss.
    pub on_demand: Option<Arc<discovery::on_demand::OnDemand>>,
    pub pod: PodInfo,
    /// One permit per open proxied connection, across both directions.
    pub limit: Arc<Semaphore>,
    /// HTTP limits.
    pub http: config::HttpConfig,
    /// Request bodies up to this size are kept for a retry (`--retry-buffer-bytes`).
    pub retry_buffer_bytes: usize,
    /// Gateway mode: `name.namespace` of the Gateway whose routes are served.
    pub gateway: Option<Arc<str>>,
    /// Mirrored requests in flight (at most [`http::forward::MAX_MIRRORS`]; more are not
    /// mirrored).
    pub mirrors: std::sync::atomic::AtomicUsize,
    /// The request counters of inbound requests to ports no service names.
    pub inbound_stats: Arc<metrics::RequestStats>,
    /// Shutdown: listeners stop on `draining`, HTTP connections close gracefully.
    pub drain: Arc<drain::Drain>,
    /// Gateway mode with `--tls-cert`: TLS for the gateway's clients.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Bumped by discovery when a new table changes this pod's policies: open inbound
    /// connections are checked again (`inbound`).
    pub authz_changes: Arc<tokio::sync::watch::Sender<u64>>,
    /// With a mesh certificate: mutual TLS with the other sidecars.
    pub mesh: Option<Arc<tls::MeshTls>>,
}

impl Shared {
    pub fn new(
        config: &config::Config,
        table: table::SharedTable,
        metrics: Arc<metrics::Metrics>,
    ) -> Self {
        let inbound_stats = metrics.request_stats(Direction::Inbound, "", "");
        let on_demand = (config.control_plane.is_some()
            && config.discovery_mode == config::DiscoveryMode::OnDemand)
            .then(|| Arc::new(discovery::on_demand::OnDemand::new(metrics.clone())));
        Shared {
            table,
            metrics,
            on_demand,
            connect_timeout: config.connect_timeout,
            idle_timeout: config.idle_timeout,
            outbound_policy: config.outbound_policy,
            pod: PodInfo {
                pod: config.pod_name.as_str().into(),
                namespace: config.pod_namespace.as_str().into(),
            },
            limit: Arc::new(Semaphore::new(config.max_connections)),
            http: config.http.clone(),
            retry_buffer_bytes: config.retry_buffer_bytes,
            gateway: config.gateway.as_ref().map(|g| g.gateway.as_str().into()),
            mirrors: Default::default(),
            inbound_stats,
            drain: Arc::new(drain::Drain::new()),
            tls: None,
            authz_changes: Arc::new(tokio::sync::watch::Sender::new(0)),
            mesh: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_listed_in_declaration_order() {
        // `metrics` indexes its pre-resolved counters by `outcome as usize`.
        for (i, o) in Outcome::ALL.into_iter().enumerate() {
            assert_eq!(o as usize, i, "{o:?}");
        }
    }
}
