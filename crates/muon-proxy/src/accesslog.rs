//! Log output, and the one access event every connection ends with.
//!
//! The access log is a tracing event with target `access` (level info, message
//! "connection closed"); its format and destination are the subscriber's business, set up
//! here by [`init`]: human-readable or one JSON object per line on stdout (through
//! [`crate::logwriter`], so no request waits for the write), with the event's fields at the
//! top level of the object.

use crate::config::LogFormat;
use crate::{Direction, Outcome, PodInfo, Shared};
use std::fmt;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::time::Instant;
use tracing_subscriber::EnvFilter;

/// What the access event says about one connection; filled in as the connection goes.
#[derive(Debug)]
pub struct Record {
    pub direction: Direction,
    /// The client's address.
    pub src: SocketAddr,
    /// The original destination (before redirection).
    pub dst: SocketAddr,
    /// `name.namespace` of the service `dst` belongs to, if any.
    pub service: Option<Arc<str>>,
    /// The address actually connected to.
    pub endpoint: Option<SocketAddr>,
    /// The pod behind `endpoint`, if the table names it.
    pub pod: Option<Arc<str>>,
    /// Client → upstream.
    pub bytes_sent: u64,
    /// Upstream → client.
    pub bytes_received: u64,
    pub started: Instant,
    /// The authorization decision (`allow`, `deny`; "" when no policy applies) and the
    /// policy that made it (see `policy::Decision`).
    pub authz: &'static str,
    pub policy: Option<Arc<str>>,
    /// Inbound over mutual TLS: the calling sidecar, as its certificate names it (policies
    /// authorize by it). Outbound: the endpoint's, once mutual TLS checked it.
    pub peer: Option<Arc<crate::tls::Peer>>,
    /// The SPIFFE ids of both ends, when mutual TLS named them (outbound: this sidecar's and
    /// the endpoint's; inbound: the peer's and this sidecar's), and the TLS in use.
    pub identities: crate::tls::Identities,
}

impl Record {
    pub fn new(direction: Direction, src: SocketAddr, dst: SocketAddr) -> Self {
        Record {
            direction,
            src,
            dst,
            service: None,
            endpoint: None,
            pod: None,
            bytes_sent: 0,
            bytes_received: 0,
            started: Instant::now(),
            authz: "",
            policy: None,
            peer: None,
            identities: Default::default(),
        }
    }
}

/// Ends a connection: closes its metrics and writes its access event.
pub fn finish(shared: &Shared, rec: &Record, outcome: Outcome) {
    shared.metrics.closed(rec.direction, outcome);
    shared
        .metrics
        .identified(rec.direction, &rec.identities, "connection");
    emit(&shared.pod, rec, outcome);
}

fn emit(me: &PodInfo, rec: &Record, outcome: Outcome) {
    let duration_ms = u64::try_from(rec.started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let written = crate::jsonlog::access("connection closed", |l| {
        l.str("direction", rec.direction.as_str());
        l.display("src", Some(rec.src));
        l.display("dst", Some(rec.dst));
        l.str("service", rec.service.as_deref().unwrap_or(""));
        l.display("endpoint", rec.endpoint);
        l.str("pod", rec.pod.as_deref().unwrap_or(""));
        l.u64("bytes_sent", rec.bytes_sent);
        l.u64("bytes_received", rec.bytes_received);
        l.u64("duration_ms", duration_ms);
        l.str("outcome", outcome.as_str());
        l.str("authz", rec.authz);
        l.str("policy", rec.policy.as_deref().unwrap_or(""));
        rec.identities.log(l);
        l.str("proxy_pod", &me.pod);
        l.str("proxy_namespace", &me.namespace);
    });
    if written {
        return;
    }
    tracing::info!(
        target: "access",
        direction = rec.direction.as_str(),
        src = %rec.src,
        dst = %rec.dst,
        service = rec.service.as_deref().unwrap_or(""),
        endpoint = %OrEmpty(rec.endpoint),
        pod = rec.pod.as_deref().unwrap_or(""),
        bytes_sent = rec.bytes_sent,
        bytes_received = rec.bytes_received,
        duration_ms,
        outcome = outcome.as_str(),
        authz = rec.authz,
        policy = rec.policy.as_deref().unwrap_or(""),
        src_identity = rec.identities.src.as_deref().unwrap_or(""),
        dst_identity = rec.identities.dst.as_deref().unwrap_or(""),
        tls_version = rec.identities.version,
        tls_cipher = rec.identities.cipher,
        proxy_pod = &*me.pod,
        proxy_namespace = &*me.namespace,
        "connection closed"
    );
}

/// Displays an address, or nothing.
struct OrEmpty(Option<SocketAddr>);

impl fmt::Display for OrEmpty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => Ok(()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log filter {0:?}: {1}")]
    Filter(String, tracing_subscriber::filter::ParseError),
    #[error("a global logger is already installed: {0}")]
    Install(String),
}

/// The writer [`init`] installed, for [`flush`].
static WRITER: std::sync::OnceLock<crate::logwriter::LogWriter> = std::sync::OnceLock::new();

/// Waits (up to 2 s) until every line logged so far is written; call before exiting.
pub fn flush() {
    if let Some(w) = WRITER.get() {
        w.flush(std::time::Duration::from_secs(2));
    }
}

/// Installs the global subscriber. `filter` is a level or EnvFilter directives.
pub fn init(format: LogFormat, filter: &str) -> Result<(), LogError> {
    let env_filter =
        EnvFilter::try_new(filter).map_err(|e| LogError::Filter(filter.to_owned(), e))?;
    let writer = crate::logwriter::LogWriter::stdout()
        .map_err(|e| LogError::Install(format!("starting the log writer thread: {e}")))?;
    let _ = WRITER.set(writer.clone());
    if format == LogFormat::Json {
        crate::jsonlog::install(writer.clone());
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(writer)
        .with_ansi(std::io::stdout().is_terminal());
    let installed = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    installed.map_err(|e| LogError::Install(e.to_string()))
}
