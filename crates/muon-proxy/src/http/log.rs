//! One access event per HTTP request (target `access`, message "request"), and its metrics.
//!
//! A [`RequestLog`] is filled in as the request goes (route, endpoint, status) and finished
//! by the response body when it ends, so the duration and the byte counts cover the whole
//! exchange. Counters were resolved when the table was compiled ([`RequestStats`]).

use crate::metrics::RequestStats;
use crate::{Direction, PodInfo};
use http::HeaderMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::time::Instant;

/// The status logged for a request the client gave up on before the answer came.
pub const CLIENT_CANCELLED: u16 = 499;

/// What the access event says about one request.
#[derive(Debug)]
pub struct RequestLog {
    pub direction: Direction,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub protocol: &'static str,
    pub method: http::Method,
    pub authority: String,
    pub path: String,
    pub request_id: String,
    /// `name.namespace` of the service the request was for (or the gateway's).
    pub service: Option<Arc<str>>,
    /// The route resource that matched ("" when the service has no routes).
    pub route: Option<Arc<str>>,
    pub endpoint: Option<SocketAddr>,
    pub pod: Option<Arc<str>>,
    pub status: u16,
    pub grpc_status: Option<u32>,
    /// Set when the proxy answered itself (the `x-muon-error` reason) or the exchange failed.
    pub error: Option<&'static str>,
    /// The authorization decision (`allow`, `deny`; "" when no policy applies) and the
    /// policy that made it (inbound; see `policy::Decision`).
    pub authz: &'static str,
    pub policy: Option<Arc<str>>,
    /// Request body bytes forwarded (shared with the request body).
    pub sent: Arc<AtomicU64>,
    pub bytes_received: u64,
    pub started: Instant,
    pub stats: Option<Arc<RequestStats>>,
    pub me: PodInfo,
    /// The SPIFFE ids of both ends, when mutual TLS named them (outbound: this sidecar's and
    /// the endpoint's; inbound: the peer's and this sidecar's), and the TLS in use.
    pub identities: crate::tls::Identities,
    /// For the identity metric (`muon_mesh_identity_total`).
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl RequestLog {
    /// Reads `grpc-status` from trailers (or from the headers of a trailers-only answer).
    pub fn grpc_status_from(&mut self, headers: &HeaderMap) {
        if let Some(code) = headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
        {
            self.grpc_status = Some(code);
        }
    }

    /// Writes the event and counts the request (as dropping it does).
    pub fn finish(self: Box<Self>) {}
}

impl Drop for RequestLog {
    /// A log dropped before any answer was given is a request the client cancelled (its
    /// connection or stream went away while the proxy waited upstream): it is written too,
    /// with nginx's status 499 (nothing was sent) and error `client-cancelled`.
    fn drop(&mut self) {
        if self.status == 0 {
            self.status = CLIENT_CANCELLED;
            self.error.get_or_insert("client-cancelled");
        }
        let elapsed = self.started.elapsed();
        if let Some(stats) = &self.stats {
            stats.record(self.status, elapsed);
        }
        if let Some(m) = &self.metrics {
            m.identified(self.direction, &self.identities, "request");
        }
        let duration_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        let bytes_sent = self.sent.load(Ordering::Relaxed);
        let written = crate::jsonlog::access("request", |l| {
            l.str("direction", self.direction.as_str());
            l.display("src", Some(self.src));
            l.display("dst", Some(self.dst));
            l.str("protocol", self.protocol);
            l.str("method", self.method.as_str());
            l.str("authority", &self.authority);
            l.str("path", &self.path);
            l.u64("status", u64::from(self.status));
            l.display("grpc_status", self.grpc_status);
            l.str("route", self.route.as_deref().unwrap_or(""));
            l.str("service", self.service.as_deref().unwrap_or(""));
            l.display("endpoint", self.endpoint);
            l.str("pod", self.pod.as_deref().unwrap_or(""));
            l.u64("duration_ms", duration_ms);
            l.u64("bytes_sent", bytes_sent);
            l.u64("bytes_received", self.bytes_received);
            l.str("request_id", &self.request_id);
            l.str("error", self.error.unwrap_or(""));
            l.str("authz", self.authz);
            l.str("policy", self.policy.as_deref().unwrap_or(""));
            self.identities.log(l);
            l.str("proxy_pod", &self.me.pod);
            l.str("proxy_namespace", &self.me.namespace);
        });
        if written {
            return;
        }
        tracing::info!(
            target: "access",
            direction = self.direction.as_str(),
            src = %self.src,
            dst = %self.dst,
            protocol = self.protocol,
            method = self.method.as_str(),
            authority = %self.authority,
            path = %self.path,
            status = self.status,
            grpc_status = %OrEmpty(self.grpc_status),
            route = self.route.as_deref().unwrap_or(""),
            service = self.service.as_deref().unwrap_or(""),
            endpoint = %OrEmpty(self.endpoint),
            pod = self.pod.as_deref().unwrap_or(""),
            duration_ms,
            bytes_sent,
            bytes_received = self.bytes_received,
            request_id = %self.request_id,
            error = self.error.unwrap_or(""),
            authz = self.authz,
            policy = self.policy.as_deref().unwrap_or(""),
            src_identity = self.identities.src.as_deref().unwrap_or(""),
            dst_identity = self.identities.dst.as_deref().unwrap_or(""),
            tls_version = self.identities.version,
            tls_cipher = self.identities.cipher,
            proxy_pod = &*self.me.pod,
            proxy_namespace = &*self.me.namespace,
            "request"
        );
    }
}

/// Displays a value, or nothing.
struct OrEmpty<T>(Option<T>);

impl<T: fmt::Display> fmt::Display for OrEmpty<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => Ok(()),
        }
    }
}
