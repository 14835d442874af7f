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

use crate::accesslog::Record;
use crate::detect::{self, Detected, Prefixed};
use crate::endpoint::EndpointState;
use crate::http::{self, ConnCx, ConnKind};
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
pub async fn handle(shared: &Arc<Shared>, mut client: TcpStream, rec: &mut Record) -> Outcome {
    let decided = plan(shared.table.load().as_deref(), rec.dst);
    let (port, wait) = match decided {
        Plan::Opaque { port } => {
            name(rec, port.as_ref());
            return opaque(shared, client, rec).await;
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
    let mut buf = BytesMut::new();
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
    tcp::relay(
        &mut client,
        &mut upstream,
        shared.idle_timeout,
        Some(metrics),
        rec,
    )
    .await
}

/// Connects to the app at `dst` from 127.0.0.6 / `::6`.
async fn connect_app(dst: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    crate::http::upstream::connect_with_source(dst, Some(source_for(dst)), timeout).await
}
