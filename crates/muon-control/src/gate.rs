//! The gRPC port's front door: every accepted connection passes [`Gate::admit`] before
//! tonic sees it, so a flood of connections costs a refused socket each, not a task, buffers
//! and a slot among the real clients.
//!
//! - At most `max_connections` open at once, and `max_per_source` from one address: past
//!   either, a new connection is closed at once (counted, and logged at most once a second),
//!   while the ones already open — sidecars' streams, operators' calls — go on.
//! - A connection must finish its TLS handshake and send its HTTP/2 preface within
//!   `handshake_timeout`: a client that connects and says nothing (or too little) holds its
//!   slot no longer than that. Handshakes run on tasks of their own. The caller a client
//!   certificate names (see `auth`) is found once, here.
//! - An accept that fails for lack of file descriptors waits a moment instead of spinning.
//!
//! Idle HTTP/2 connections that did complete their handshake are the server's keepalive
//! pings' business (see `server`).

use crate::metrics::Metrics;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tokio_stream::Stream;
use tracing::warn;

/// The HTTP/2 client preface (RFC 9113 §3.4) is this long.
const PREFACE_BYTES: usize = 24;
/// After an accept error (EMFILE and the like), the pause before the next accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_per_source: usize,
    pub handshake_timeout: Duration,
}

/// Why a connection was refused (the metric's `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total,
    PerSource,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Total => "max-connections",
            Refusal::PerSource => "max-connections-per-source",
        }
    }
}

/// Counts open connections, in total and per source address.
pub struct Gate {
    limits: Limits,
    open: Mutex<Open>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Open {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
    last_warning: Option<Instant>,
}

impl Gate {
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Arc<Gate> {
        Arc::new(Gate {
            limits,
            open: Mutex::new(Open::default()),
            metrics,
        })
    }

    /// A ticket for one more connection from `source`, or why not.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Ticket, Refusal> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let from = open.by_source.get(&source).copied().unwrap_or(0);
        let refused = if open.total >= self.limits.max_connections {
            Some(Refusal::Total)
        } else if from >= self.limits.max_per_source {
            Some(Refusal::PerSource)
        } else {
            None
        };
        if let Some(why) = refused {
            let now = Instant::now();
            if open
                .last_warning
                .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
            {
                open.last_warning = Some(now);
                warn!(
                    %source,
                    open = open.total,
                    from_source = from,
                    limit = why.as_str(),
                    "refusing gRPC connections (logged at most once a second)"
                );
            }
            drop(open);
            self.metrics.connection_refused(why.as_str());
            return Err(why);
        }
        open.total += 1;
        *open.by_source.entry(source).or_default() += 1;
        self.metrics.grpc_connections.set(open.total as i64);
        Ok(Ticket {
            gate: self.clone(),
            source,
        })
    }

    fn release(&self, source: IpAddr) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                open.by_source.remove(&source);
            }
        }
        self.metrics.grpc_connections.set(open.total as i64);
    }
}

/// One admitted connection's place; given back when the connection is dropped.
pub struct Ticket {
    gate: Arc<Gate>,
    source: IpAddr,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.gate.release(self.source);
    }
}

/// How the gRPC port speaks: TLS (with an optional client certificate) and, with
/// `--insecure-plaintext`, plaintext too (told apart by the first byte).
#[derive(Clone)]
pub struct Security {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub plaintext: bool,
    /// Certificates name callers in this trust domain.
    pub trust_domain: Arc<str>,
}

/// The admitted connections of a listener, for `serve_with_incoming`: each is accepted,
/// admitted by the gate, and shakes hands (TLS, within the handshake timeout) on a task of
/// its own, so a slow handshake never holds up the next connection.
pub struct Incoming {
    listener: TcpListener,
    gate: Arc<Gate>,
    security: Security,
    handshakes: tokio::task::JoinSet<Option<Conn>>,
    backoff: Option<Pin<Box<Sleep>>>,
}

impl Incoming {
    pub fn new(listener: TcpListener, gate: Arc<Gate>, security: Security) -> Incoming {
        Incoming {
            listener,
            gate,
            security,
            handshakes: tokio::task::JoinSet::new(),
            backoff: None,
        }
    }
}

impl Stream for Incoming {
    type Item = io::Result<Conn>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        // Accept what is waiting; each admitted connection shakes hands on its own task.
        loop {
            if let Some(pause) = &mut this.backoff {
                if pause.as_mut().poll(cx).is_pending() {
                    break;
                }
                this.backoff = None;
            }
            match this.listener.poll_accept(cx) {
                Poll::Ready(Ok((stream, peer))) => {
                    // Refused: the socket is closed as it is dropped.
                    let Ok(ticket) = this.gate.admit(peer.ip()) else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let handshake = handshake(
                        stream,
                        peer,
                        ticket,
                        this.security.clone(),
                        this.gate.limits.handshake_timeout,
                        this.gate.metrics.clone(),
                    );
                    this.handshakes.spawn(handshake);
                }
                Poll::Ready(Err(e)) => {
                    warn!(error = %e, "gRPC accept failed; pausing accepts for 50ms");
                    this.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                }
                Poll::Pending => break,
            }
        }
        loop {
            match this.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Some(conn)))) => return Poll::Ready(Some(Ok(conn))),
                // A failed handshake: its socket is closed, its ticket given back.
                Poll::Ready(Some(_)) => continue,
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// TLS (or, if allowed, plaintext) within `timeout`; `None` closes the connection.
async fn handshake(
    stream: TcpStream,
    remote: std::net::SocketAddr,
    ticket: Ticket,
    security: Security,
    timeout: Duration,
    metrics: Arc<Metrics>,
) -> Option<Conn> {
    let deadline = tokio::time::Instant::now() + timeout;
    let shake = async {
        let mut first = [0u8; 1];
        let tls_first = match stream.peek(&mut first).await {
            Ok(1) => first[0] == TLS_HANDSHAKE,
            _ => return None,
        };
        match (tls_first, &security.tls) {
            (true, Some(config)) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
                let tls = match acceptor.accept(stream).await {
                    Ok(tls) => tls,
                    Err(e) => {
                        tracing::debug!(%remote, error = %e, "gRPC TLS handshake failed");
                        metrics.connection_refused("tls-handshake");
                        return None;
                    }
                };
                let caller = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .and_then(|leaf| {
                        webpki::EndEntityCert::try_from(leaf).ok().map(|c| {
                            crate::auth::Caller::from_uris(
                                c.valid_uri_names().collect::<Vec<_>>(),
                                &security.trust_domain,
                            )
                        })
                    })
                    .unwrap_or(crate::auth::Caller::Anonymous);
                Some((Io::Tls(Box::new(tls)), caller))
            }
            (false, _) if security.plaintext => {
                Some((Io::Plain(stream), crate::auth::Caller::Insecure))
            }
            (false, _) => {
                tracing::debug!(%remote, "plaintext gRPC refused (the port speaks TLS)");
                metrics.connection_refused("plaintext");
                None
            }
            (true, None) => None,
        }
    };
    let (io, caller) = tokio::time::timeout_at(deadline, shake).await.ok()??;
    Some(Conn {
        io,
        info: crate::auth::ConnInfo { remote, caller },
        _ticket: ticket,
        handshake: Some(Box::pin(tokio::time::sleep_until(deadline))),
        read: 0,
    })
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// An admitted connection after its handshake: the stream, who it proved to be, its ticket,
/// and the deadline for the HTTP/2 preface (what is left of the handshake timeout).
pub struct Conn {
    io: Io,
    info: crate::auth::ConnInfo,
    _ticket: Ticket,
    handshake: Option<Pin<Box<Sleep>>>,
    read: usize,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = crate::auth::ConnInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if let Some(deadline) = &mut this.handshake {
            this.read += buf.filled().len() - before;
            if this.read >= PREFACE_BYTES {
                this.handshake = None;
            } else if r.is_pending() && deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 preface within the handshake timeout",
                )));
            }
        }
        r
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Raises the soft open-file limit to the hard limit (a control plane holds a socket per
/// sidecar connection); logs what it did.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open-file limit"),
            Err(e) => warn!(soft, hard, error = %e, "could not raise the open-file limit"),
        },
        Ok((soft, _)) => tracing::info!(limit = soft, "open-file limit"),
        Err(e) => warn!(error = %e, "could not read the open-file limit"),
    }
}

/// File descriptors kept for everything but gRPC connections (the store, the config
/// directory, the metrics port).
const FD_RESERVE: u64 = 256;

/// `limits` with `max_connections` lowered to what the open-file limit allows (logged), so
/// the limit is hit before the process runs out of descriptors.
pub fn within_fd_limit(mut limits: Limits) -> Limits {
    use nix::sys::resource::{getrlimit, Resource};
    if let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let room = usize::try_from(soft.saturating_sub(FD_RESERVE).max(16)).unwrap_or(usize::MAX);
        if limits.max_connections > room {
            warn!(
                max_connections = limits.max_connections,
                open_file_limit = soft,
                now = room,
                "--max-connections is above what the open-file limit allows; lowered"
            );
            limits.max_connections = room;
        }
    }
    limits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_in_total_and_per_source_and_tickets_give_back() {
        let gate = Gate::new(
            Limits {
                max_connections: 3,
                max_per_source: 2,
                handshake_timeout: Duration::from_secs(1),
            },
            Arc::new(Metrics::new()),
        );
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let a1 = gate.admit(a).unwrap();
        let _a2 = gate.admit(a).unwrap();
        assert_eq!(gate.admit(a).err(), Some(Refusal::PerSource));
        let _b1 = gate.admit(b).unwrap();
        assert_eq!(gate.admit(b).err(), Some(Refusal::Total));
        drop(a1);
        assert!(gate.admit(b).is_ok());
        let m = gate.metrics.encode();
        assert!(
            m.contains(
                r#"muon_control_connections_refused_total{reason="max-connections-per-source"} 1"#
            ),
            "{m}"
        );
    }
}
