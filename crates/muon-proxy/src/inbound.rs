//! Inbound: a peer connected to this pod's `IP:port` and iptables sent it here.
//!
//! [`plan`] looks the destination up in the table's inbound ports (which service this port
//! serves, with what protocol); [`handle`] connects to the original destination (the app, at
//! the pod IP and port it was addressed to) from source 127.0.0.6 (IPv6: `::6`), which
//! muon-init leaves uncaptured, so the app sees the connection arrive over `lo` and an app
//! bound to localhost stays private, and copies.

use crate::accesslog::Record;
use crate::table::{InboundPort, Table};
use crate::tcp::{self, ConnectError};
use crate::{Direction, Outcome, Shared};
use muon_core::ports::{INBOUND_SOURCE_V4, INBOUND_SOURCE_V6};
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpStream;
use tracing::{debug, warn};

/// The source address for connections to the app at `dst`.
pub fn source_for(dst: SocketAddr) -> SocketAddr {
    match dst {
        SocketAddr::V4(_) => SocketAddr::from((INBOUND_SOURCE_V4, 0)),
        SocketAddr::V6(_) => SocketAddr::from((INBOUND_SOURCE_V6, 0)),
    }
}

/// What to do with one inbound connection.
#[derive(Debug)]
pub enum Plan {
    /// Bytes to the app; `port` is the service port it serves, when a service sends here.
    Opaque { port: Option<Arc<InboundPort>> },
}

/// Decides what a connection to this pod's `dst` is.
pub fn plan(table: Option<&Table>, dst: SocketAddr) -> Plan {
    let port = table.and_then(|t| t.inbound(dst)).cloned();
    Plan::Opaque { port }
}

/// Proxies one inbound connection whose original destination is `rec.dst`.
pub async fn handle(shared: &Shared, mut client: TcpStream, rec: &mut Record) -> Outcome {
    let dst = rec.dst;
    let Plan::Opaque { port } = plan(shared.table.load().as_deref(), dst);
    if let Some(port) = port {
        rec.service = Some(port.service.clone());
        rec.pod = Some(port.pod.clone());
    }
    let timeout = shared.connect_timeout;
    let connected = match tcp::connect(dst, Some(source_for(dst)), timeout).await {
        // ::6 is added to lo by muon-init; without it, connect from wherever the kernel picks.
        Err(ConnectError::Bind { addr, source })
            if dst.is_ipv6() && source.kind() == ErrorKind::AddrNotAvailable =>
        {
            if !shared.v6_source_warned.swap(true, Ordering::Relaxed) {
                warn!(%addr, "inbound IPv6 source unavailable (is muon-init's ::6 on lo?); connecting without it");
            }
            tcp::connect(dst, None, timeout).await
        }
        other => other,
    };
    let mut upstream = match connected {
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
        metrics,
        rec,
    )
    .await
}
