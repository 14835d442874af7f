//! Inbound: a peer connected to this pod's `IP:port` and iptables sent it here.
//!
//! [`plan`] looks the destination up in the table's inbound ports (which service this port
//! serves, with what protocol): a port declared `tcp`, `opaque` or `tls` is copied to the app
//! without waiting for a byte; any other port is detected from its first bytes (a peer
//! sidecar speaks HTTP/2 to an HTTP port whatever its app spoke), and HTTP is served by
//! `crate::http::inbound`, which gives the app the protocol the client app used.
//!
//! The app is reached at the original destination (the pod IP and port it was addressed to)
//! from source 127.0.0.6 (IPv6: `::6`), which muon-init leaves uncaptured, so the app sees
//! the connection arrive over `lo` and an app bound to localhost stays private.
//!
//! Connections copied as bytes are authorized ([`crate::policy`]) before the app is reached,
//! and again whenever this pod's policies change (`Shared::authz_changes`): a denied one is
//! closed. HTTP requests are authorized one by one in `crate::http::inbound`.

use crate::accesslog::Record;
use crate::detect::{self, Detected, Prefixed};
use crate::endpoint::EndpointState;
use crate::http::{self, ConnCx, ConnKind};
use crate::policy;
use crate::table::{InboundPort, Table};
use crate::tcp::{self, ConnectError};
use crate::{Direction, Outcome, Shared};
use bytes::BytesMut;
use muon_core::ports::{INBOUND_SOURCE_V4, INBOUND_SOURCE_V6};
use muon_core::Protocol;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::debug;

/// The source address for connections to the app at `dst`.
pub fn source_for(dst: SocketAddr) -> SocketAddr {
    match dst {
        SocketAddr::V4(_) => SocketAddr::from((INBOUND_SOURCE_V4, 0)),
        SocketAddr::V6(_) => SocketAddr::from((INBOUND_SOURCE_V6, 0)),
    }
}

/// What to do with one inbound connection; `port` is the service port it is for, when a
/// service sends here.
#[derive(Debug)]
pub enum Plan {
    /// Bytes to the app, at once.
    Opaque { port: Option<Arc<InboundPort>> },
    /// The first bytes decide: HTTP is served as HTTP, the rest copied. `declared_http`:
    /// the port is declared HTTP (so a peer is expected to speak first, up to the header
    /// read timeout, instead of the detection timeout).
    Detect {
        port: Option<Arc<InboundPort>>,
        declared_http: bool,
    },
}

/// Decides what a connection to this pod's `dst` is.
pub fn plan(table: Option<&Table>, dst: SocketAddr) -> Plan {
    let port = table.and_then(|t| t.inbound(dst)).cloned();
    match port.as_ref().and_then(|p| p.protocol) {
        Some(Protocol::Tcp | Protocol::Opaque | Protocol::Tls) => Plan::Opaque { port },
        Some(Protocol::Http | Protocol::Http2 | Protocol::Grpc) => Plan::Detect {
            port,
            declared_http: true,
        },
        None => Plan::Detect {
            port,
            declared_http: false,
        },
    }
}

/// Proxies one inbound connection whose original destination is `rec.dst`.
pub async fn handle(shared: &Arc<Shared>, client: TcpStream, rec: &mut Record) -> Outcome {
    let table = shared.table.load();
    let decided = plan(table.as_deref(), rec.dst);
    let strict = table
        .as_deref()
        .is_some_and(|t| t.authz().mtls_mode(rec.dst.port()) == crate::policy::Mtls::Strict);
    drop(table);
    // With a mesh certificate, a peer sidecar's mutual TLS is looked for first, whatever the
    // port declares: it speaks first (its ClientHello), with Muon's ALPN.
    if let Some(mesh) = shared.mesh.as_ref().filter(|m| m.ready()) {
        return mesh_first(shared, mesh, client, rec, decided, strict).await;
    }
    if strict {
        return refuse_plaintext(shared, rec);
    }
    plaintext(shared, client, rec, decided, BytesMut::new()).await
}

/// A port in STRICT mode takes only the mesh's mutual TLS: anything else is closed.
fn refuse_plaintext(shared: &Shared, rec: &Record) -> Outcome {
    shared.metrics.tls(Direction::Inbound, "plaintext-refused");
    debug!(src = %rec.src, dst = %rec.dst, "not mutual TLS to a STRICT port: closed");
    Outcome::MtlsRequired
}

/// A connection that may be a peer sidecar's mutual TLS: terminated when it is (the peer's
/// identity goes into `rec.peer`), else served as plaintext with the bytes read so far.
async fn mesh_first(
    shared: &Arc<Shared>,
    mesh: &Arc<crate::tls::MeshTls>,
    mut client: TcpStream,
    rec: &mut Record,
    decided: Plan,
    strict: bool,
) -> Outcome {
    let wait = match &decided {
        Plan::Detect {
            declared_http: true,
            ..
        } => shared.http.header_read_timeout,
        _ => shared.http.detect_timeout,
    };
    let mut buf = BytesMut::new();
    let detected = match detect::sniff(&mut client, &mut buf, wait).await {
        Ok(d) => d,
        Err(e) => {
            debug!(error = %e, "reading the first bytes failed");
            return Outcome::Error;
        }
    };
    if detected == Detected::Tls {
        let alpn = match detect::read_client_hello(&mut client, &mut buf, wait).await {
            Ok(a) => a.unwrap_or_default(),
            Err(e) => {
                debug!(error = %e, "reading the ClientHello failed");
                return Outcome::Error;
            }
        };
        if alpn
            .iter()
            .any(|p| crate::tls::Inner::from_alpn(p).is_some())
        {
            let stream = Prefixed::new(buf.freeze(), client);
            let (tls, peer, inner) = match mesh.accept(stream).await {
                Ok(accepted) => accepted,
                Err(e) => {
                    shared.metrics.tls(Direction::Inbound, e.reason());
                    debug!(src = %rec.src, error = %e, "mutual TLS from a peer failed");
                    return Outcome::Error;
                }
            };
            shared.metrics.tls(Direction::Inbound, "ok");
            rec.identities = crate::tls::Identities {
                src: Some(peer.id.clone()),
                dst: mesh.own_id(),
                version: peer.version,
                cipher: peer.cipher,
            };
            rec.peer = Some(Arc::new(peer));
            let port = match decided {
                Plan::Opaque { port } | Plan::Detect { port, .. } => port,
            };
            name(rec, port.as_ref());
            return match inner {
                crate::tls::Inner::Tcp => opaque(shared, tls, rec).await,
                crate::tls::Inner::Http2 => {
                    let kind = ConnKind::Inbound {
                        port,
                        local: Arc::new(EndpointState::default()),
                    };
                    let cx = ConnCx::new(shared.clone(), rec, ::http::Version::HTTP_2, kind);
                    http::serve(tls, cx, rec, shared.drain.watch()).await
                }
            };
        }
    }
    if strict {
        return refuse_plaintext(shared, rec);
    }
    plaintext(shared, client, rec, decided, buf).await
}

/// A plaintext connection (or TLS that is not the mesh's), `buf` the bytes read from it so
/// far.
async fn plaintext(
    shared: &Arc<Shared>,
    mut client: TcpStream,
    rec: &mut Record,
    decided: Plan,
    mut buf: BytesMut,
) -> Outcome {
    let (port, wait) = match decided {
        Plan::Opaque { port } => {
            name(rec, port.as_ref());
            return opaque(shared, Prefixed::new(buf.freeze(), client), rec).await;
        }
        Plan::Detect {
            port,
            declared_http,
        } => {
            let wait = match declared_http {
                true => shared.http.header_read_timeout,
                false => shared.http.detect_timeout,
            };
            (port, wait)
        }
    };
    name(rec, port.as_ref());
    let detected = match detect::sniff(&mut client, &mut buf, wait).await {
        Ok(d) => d,
        Err(e) => {
            debug!(error = %e, "reading the first bytes failed");
            return Outcome::Error;
        }
    };
    let client = Prefixed::new(buf.freeze(), client);
    let version = match detected {
        Detected::Http1 => ::http::Version::HTTP_11,
        Detected::Http2 => ::http::Version::HTTP_2,
        // TLS (later: Muon's mTLS is terminated here), other protocols and clients that say
        // nothing first (server-first protocols) reach the app as bytes.
        Detected::Tls | Detected::Opaque | Detected::Timeout => {
            return opaque(shared, client, rec).await
        }
    };
    let kind = ConnKind::Inbound {
        port,
        local: Arc::new(EndpointState::default()),
    };
    let cx = ConnCx::new(shared.clone(), rec, version, kind);
    http::serve(client, cx, rec, shared.drain.watch()).await
}

fn name(rec: &mut Record, port: Option<&Arc<InboundPort>>) {
    if let Some(port) = port {
        rec.service = Some(port.service.clone());
        rec.pod = Some(port.pod.clone());
    }
}

/// Copies bytes to the app.
async fn opaque<S>(shared: &Shared, mut client: S, rec: &mut Record) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Authorization (`crate::policy`): the connection as a whole, before the app is reached.
    let peer = rec.peer.clone();
    let attrs = policy::Attrs::tcp(peer.as_deref(), rec.dst.port());
    let mut policy_changes = shared.authz_changes.subscribe();
    if !authorize(shared, rec, &attrs) {
        return Outcome::Denied;
    }
    let dst = rec.dst;
    let mut upstream = match connect_app(dst, shared.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "inbound connect failed");
            return e.outcome();
        }
    };
    rec.endpoint = Some(dst);
    let metrics = shared.metrics.direction(Direction::Inbound);
    let relay = tcp::relay(
        &mut client,
        &mut upstream,
        shared.idle_timeout,
        Some(metrics),
        rec,
    );
    // Authorization again whenever this pod's policies change: once they deny the
    // connection, it is closed.
    let (outcome, revoked) = tokio::select! {
        outcome = relay => (outcome, None),
        denied = revoked(shared, &mut policy_changes, &attrs) => (Outcome::Denied, Some(denied)),
    };
    if let Some(d) = revoked {
        debug!(src = %rec.src, dst = %rec.dst, policy = d.policy.as_deref().unwrap_or(""), "open connection denied by a policy change; closed");
        (rec.authz, rec.policy) = (d.label(), d.policy);
    }
    outcome
}

/// Decides a TCP connection by the current table's policies, into `rec`. Without a table
/// (none received yet) nothing is known to deny it.
fn authorize(shared: &Shared, rec: &mut Record, attrs: &policy::Attrs<'_>) -> bool {
    let table = shared.table.load();
    let Some(t) = table.as_ref() else {
        return true;
    };
    let d = t.authz().authorize(attrs);
    let allowed = d.allowed();
    if !allowed {
        debug!(src = %rec.src, dst = %rec.dst, policy = d.policy.as_deref().unwrap_or(""), "connection denied");
    }
    (rec.authz, rec.policy) = (d.label(), d.policy);
    allowed
}

/// Resolves with the denial once a policy change no longer allows the connection.
async fn revoked(
    shared: &Shared,
    changes: &mut tokio::sync::watch::Receiver<u64>,
    attrs: &policy::Attrs<'_>,
) -> policy::Decision {
    loop {
        if changes.changed().await.is_err() {
            // No more changes can come (the proxy is going away).
            std::future::pending::<()>().await;
        }
        if let Some(t) = shared.table.load().as_ref() {
            let d = t.authz().recheck(attrs);
            if !d.allowed() {
                return d;
            }
        }
    }
}

/// Connects to the app at `dst` from 127.0.0.6 / `::6`.
async fn connect_app(dst: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    crate::http::upstream::connect_with_source(dst, Some(source_for(dst)), timeout).await
}
