//! HTTP in the data path: a connection detected (or declared) as HTTP/1.1 or HTTP/2 is
//! served by hyper here, and each request is proxied on its own.
//!
//! ```text
//! serve (hyper server, limits, drain) ─► per request:
//!   outbound: route (HTTPRoute/GRPCRoute of the service port) ─► forward
//!   gateway:  route (the Gateway's routes, by host)          ─► forward
//!   forward:  filters ─► weighted backend ─► endpoint (round robin)
//!             ─► upstream (pooled HTTP/2 to a meshed endpoint, the app's own protocol
//!                to one without a sidecar) ─► response filters ─► client
//!   inbound:  x-muon-orig-proto says what the client app spoke ─► upstream to the app
//! ```
//!
//! Modules: [`body`] (what moves), [`headers`] (hop-by-hop, request ids), [`errors`] (the
//! proxy's own answers), [`log`] (one access event per request), [`pool`] and
//! [`upstream`] (the client side), [`forward`], [`inbound`] (per request).

pub mod body;
pub mod errors;
pub mod forward;
pub mod headers;
pub mod inbound;
pub mod log;
pub mod path;
pub mod pool;
pub mod upstream;

use crate::accesslog::Record;
use crate::drain;
use crate::endpoint::EndpointState;
use crate::table::{InboundPort, Target};
use crate::{Direction, Outcome, Shared};
use body::ResponseBody;
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::JoinHandle;
use tracing::debug;

/// What one downstream connection is, for every request on it.
pub struct ConnCx {
    pub shared: Arc<Shared>,
    pub direction: Direction,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// `dst` as an authority, for requests that name none.
    pub authority: Arc<str>,
    /// What the client speaks on this connection.
    pub version: Version,
    /// Inbound over mutual TLS: the calling sidecar (see `accesslog::Record::peer`).
    pub peer: Option<Arc<crate::tls::Peer>>,
    pub kind: ConnKind,
    /// Bytes read from the client and written to it (the connection's access event).
    sent: AtomicU64,
    received: AtomicU64,
    /// Requests received on it.
    requests: AtomicU64,
    /// Upgraded (WebSocket) exchanges still copying; the connection waits for them.
    upgrades: Mutex<Vec<JoinHandle<()>>>,
}

/// Where requests on the connection go.
pub enum ConnKind {
    /// To a service port (as planned when the connection came; each request looks again).
    Outbound(Arc<Target>),
    /// To this pod's app; `port` when a service sends here.
    Inbound {
        port: Option<Arc<InboundPort>>,
        /// The app's connections when no service names this port (this connection's own).
        local: Arc<EndpointState>,
    },
    /// From outside the mesh, by the routes of a Gateway.
    Gateway {
        /// `https` when TLS was terminated.
        scheme: &'static str,
    },
}

impl ConnCx {
    pub fn new(shared: Arc<Shared>, rec: &Record, version: Version, kind: ConnKind) -> Arc<ConnCx> {
        Arc::new(ConnCx {
            shared,
            direction: rec.direction,
            src: rec.src,
            dst: rec.dst,
            authority: rec.dst.to_string().into(),
            version,
            peer: rec.peer.clone(),
            kind,
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            upgrades: Mutex::new(Vec::new()),
        })
    }

    /// Keeps an upgraded exchange's copy task until the connection ends.
    pub fn adopt_upgrade(&self, task: JoinHandle<()>) {
        self.upgrades
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
    }
}

/// Serves one connection until the client is done (or the drain closes it), then records
/// its bytes in `rec`.
pub async fn serve<I>(io: I, cx: Arc<ConnCx>, rec: &mut Record, mut drain: drain::Watch) -> Outcome
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let http = &cx.shared.http;
    let io = TokioIo::new(CountedIo { io, cx: cx.clone() });
    let handler = cx.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let cx = handler.clone();
        async move { Ok::<_, Infallible>(handle(cx, req).await) }
    });
    // hyper's own limits sit above ours, so a too-large header section gets our 431 (with
    // `x-muon-error`) rather than hyper's bare one.
    let hyper_header_limit = (http.max_header_bytes * 2).max(16 * 1024);
    // A connection accepted as the drain began still gets its request answered.
    let late = cx.shared.drain.phase() != drain::Phase::Serving;
    let mut idle = false;
    // Serves `conn` until it ends; on drain or idleness, closes it gracefully (idle: within
    // a bound, it has nothing left to say).
    macro_rules! drive {
        ($conn:expr) => {{
            let conn = $conn;
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => r,
                () = drain.draining(), if !late => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
                () = idle_for(&cx) => {
                    idle = true;
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(http.header_read_timeout, conn)
                        .await
                        .unwrap_or(Ok(()))
                }
            }
        }};
    }
    let result = match cx.version {
        Version::HTTP_2 => drive!(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(http.http2_max_concurrent_streams)
                .max_pending_accept_reset_streams(http.http2_max_pending_resets)
                .max_local_error_reset_streams(1024)
                .max_header_list_size(u32::try_from(hyper_header_limit).unwrap_or(u32::MAX))
                .adaptive_window(true)
                // A client that vanished without a FIN is noticed.
                .keep_alive_interval(upstream::H2_KEEPALIVE)
                .keep_alive_timeout(upstream::H2_KEEPALIVE_TIMEOUT)
                .serve_connection(io, service)
        ),
        _ => drive!(hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(http.header_read_timeout)
            .max_buf_size(hyper_header_limit.max(8192))
            .max_headers(4096)
            .keep_alive(!late)
            .serve_connection(io, service)
            .with_upgrades()),
    };
    let upgrades = std::mem::take(&mut *cx.upgrades.lock().unwrap_or_else(|p| p.into_inner()));
    for task in upgrades {
        let _ = task.await;
    }
    rec.bytes_sent = cx.sent.load(Ordering::Relaxed);
    rec.bytes_received = cx.received.load(Ordering::Relaxed);
    match result {
        Ok(()) if idle => Outcome::IdleTimeout,
        Ok(()) => Outcome::Ok,
        Err(e) if e.is_timeout() => Outcome::IdleTimeout,
        Err(e) => {
            debug!(error = %e, "HTTP connection ended with an error");
            if e.is_parse() || e.is_incomplete_message() || e.is_closed() || e.is_canceled() {
                Outcome::Ok
            } else {
                Outcome::Error
            }
        }
    }
}

/// Resolves when the connection should close for idleness: no request within the header
/// read timeout of its start (HTTP/2 too: a preface and nothing more holds no connection
/// for long), or no byte either way for a whole `--idle-timeout` (checked once per period:
/// closed within two).
async fn idle_for(cx: &ConnCx) {
    tokio::time::sleep(cx.shared.http.header_read_timeout).await;
    if cx.requests.load(Ordering::Relaxed) == 0 {
        return;
    }
    let moved = || cx.sent.load(Ordering::Relaxed) + cx.received.load(Ordering::Relaxed);
    let mut last = moved();
    loop {
        tokio::time::sleep(cx.shared.idle_timeout).await;
        let now = moved();
        if now == last {
            return;
        }
        last = now;
    }
}

/// One request, whatever the direction.
async fn handle(cx: Arc<ConnCx>, req: Request<Incoming>) -> Response<ResponseBody> {
    cx.requests.fetch_add(1, Ordering::Relaxed);
    match &cx.kind {
        ConnKind::Outbound(planned) => forward::outbound(&cx, planned, req).await,
        ConnKind::Inbound { port, local } => inbound::request(&cx, port.as_ref(), local, req).await,
        ConnKind::Gateway { scheme } => forward::gateway(&cx, scheme, req).await,
    }
}

/// The client's stream, counting what moves into the connection's record and metrics.
struct CountedIo<I> {
    io: I,
    cx: Arc<ConnCx>,
}

impl<I: AsyncRead + Unpin> AsyncRead for CountedIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            this.cx.sent.fetch_add(n, Ordering::Relaxed);
            this.cx
                .shared
                .metrics
                .direction(this.cx.direction)
                .sent
                .inc_by(n);
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for CountedIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.cx.received.fetch_add(n as u64, Ordering::Relaxed);
            this.cx
                .shared
                .metrics
                .direction(this.cx.direction)
                .received
                .inc_by(n as u64);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
