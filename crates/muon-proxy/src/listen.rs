//! The capture listeners: bind, accept, recover the original destination, refuse loops,
//! shed overload, and hand each connection to `outbound` or `inbound` in a task of its own.
//!
//! Each listener task owns the tasks of its connections (a `JoinSet`): when draining starts
//! it drops the socket, stops accepting and returns only once every connection is done, so
//! the server knows when the drain is complete.

use crate::accesslog::{self, Record};
use crate::drain;
use crate::{gateway, inbound, outbound, tcp, Direction, Outcome, Shared};
use prometheus_client::metrics::gauge::Gauge;
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

/// Pending-connection queue length per listening socket.
const BACKLOG: i32 = 1024;
/// How long connections cut at the drain deadline get to log and close before their tasks
/// are aborted (an aborted connection still writes its access event, see [`connection`]).
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Pause after a failed accept (e.g. out of file descriptors) instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
#[error("bind {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub source: io::Error,
}

/// Binds one listening socket. IPv6 sockets are IPV6_V6ONLY so that `0.0.0.0` and `[::]`
/// are separate sockets and every accepted socket has one address family.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    let err = |source| BindError { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true).map_err(err)?;
    }
    socket.set_reuse_address(true).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(BACKLOG).map_err(err)?;
    TcpListener::from_std(socket.into()).map_err(err)
}

/// Binds every address of one listener. A wildcard or loopback IPv6 address is skipped,
/// with a warning, when the host has no IPv6; any other failure is an error.
pub fn bind_all(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, BindError> {
    let mut out = Vec::with_capacity(addrs.len());
    let mut skipped = None;
    for &addr in addrs {
        match bind(addr) {
            Ok(l) => out.push(l),
            Err(e) if ipv6_unavailable(&e) => {
                warn!(%addr, error = %e.source, "IPv6 unavailable on this host; not listening there");
                skipped = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    match (out.is_empty(), skipped) {
        (true, Some(e)) => Err(e),
        _ => Ok(out),
    }
}

fn ipv6_unavailable(e: &BindError) -> bool {
    let ip = e.addr.ip();
    let generic = ip.is_unspecified() || ip.is_loopback();
    match e.source.raw_os_error() {
        Some(libc::EAFNOSUPPORT) => e.addr.is_ipv6(),
        Some(libc::EADDRNOTAVAIL) => e.addr.is_ipv6() && generic,
        _ => false,
    }
}

/// The destination the client asked for before iptables redirected it (SO_ORIGINAL_DST,
/// or IP6T_SO_ORIGINAL_DST for an IPv6 socket). `None` when the connection was not
/// redirected (no conntrack entry).
pub fn original_dst(stream: &TcpStream, local: SocketAddr) -> Option<SocketAddr> {
    let sock = SockRef::from(stream);
    let got = match local {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    };
    match got {
        Ok(addr) => addr.as_socket(),
        Err(e) => {
            debug!(error = %e, "no original destination");
            None
        }
    }
}

/// True when forwarding to `dst` would come straight back to this listener: the connection
/// was not redirected (`dst` is the accepted socket's own address), or `dst` is this
/// listener's port on an address of this host.
pub fn is_loop(dst: SocketAddr, local: SocketAddr) -> bool {
    dst == local || (dst.port() == local.port() && is_local_ip(dst.ip()))
}

/// Whether `ip` belongs to this host: the kernel lets us bind only to local addresses.
fn is_local_ip(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || UdpSocket::bind((ip, 0)).is_ok()
}

/// Accepts on `listener` until draining starts, then waits for its connections to finish.
pub async fn serve(
    listener: TcpListener,
    direction: Direction,
    shared: Arc<Shared>,
    drain: drain::Watch,
) {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    info!(direction = direction.as_str(), %addr, "listening");
    let mut conns = JoinSet::new();
    let mut stop = drain.clone();
    loop {
        tokio::select! {
            biased;
            () = stop.draining() => break,
            Some(done) = conns.join_next(), if !conns.is_empty() => reap(done),
            accepted = listener.accept() => match accepted {
                Ok((stream, src)) => {
                    if let Some(task) = admit(&shared, direction, stream, src) {
                        let drain = drain.clone();
                        conns.spawn(connection(shared.clone(), task, drain));
                    }
                }
                Err(e) => {
                    warn!(direction = direction.as_str(), error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);
    info!(
        direction = direction.as_str(),
        %addr,
        open = conns.len(),
        "stopped accepting; waiting for connections"
    );
    // After the drain deadline, connections get CLOSE_GRACE to notice and log; the ones
    // whose tasks did not get to run by then (a busy host) are aborted here and awaited, so
    // their access events are written before this listener reports done.
    let mut closing = drain;
    let grace = async {
        closing.closing().await;
        tokio::time::sleep(CLOSE_GRACE).await;
    };
    tokio::pin!(grace);
    loop {
        tokio::select! {
            done = conns.join_next() => match done {
                Some(done) => reap(done),
                None => break,
            },
            () = &mut grace => {
                warn!(direction = direction.as_str(), open = conns.len(), "connections still open after the close grace; aborting them");
                conns.shutdown().await;
                break;
            }
        }
    }
}

fn reap(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            error!(error = %e, "connection task panicked");
        }
    }
}

/// An admitted connection, holding its slot until it ends.
pub struct Admitted {
    stream: TcpStream,
    rec: Record,
    _permit: tokio::sync::OwnedSemaphorePermit,
    _open: OpenGuard,
}

/// Runs the cheap checks right in the accept loop: loops and overload are answered by
/// closing at once, without a task.
fn admit(
    shared: &Shared,
    direction: Direction,
    stream: TcpStream,
    src: SocketAddr,
) -> Option<Admitted> {
    let local = match stream.local_addr() {
        Ok(a) => a,
        Err(e) => {
            debug!(error = %e, "accepted socket already gone");
            return None;
        }
    };
    // Not redirected (no conntrack entry): the destination was this very socket. A gateway
    // listener is not a capture: its clients connect to it.
    let dst = match direction {
        Direction::Gateway => local,
        _ => original_dst(&stream, local).unwrap_or(local),
    };
    admit_to(shared, direction, stream, src, local, dst)
}

/// [`admit`] once the original destination `dst` is known: counts the connection, refuses
/// a loop, sheds overload, or returns the connection with its slot held.
pub fn admit_to(
    shared: &Shared,
    direction: Direction,
    stream: TcpStream,
    src: SocketAddr,
    local: SocketAddr,
    dst: SocketAddr,
) -> Option<Admitted> {
    let metrics = shared.metrics.direction(direction);
    metrics.opened.inc();
    let rec = Record::new(direction, src, dst);
    if direction != Direction::Gateway && is_loop(dst, local) {
        accesslog::finish(shared, &rec, Outcome::Loop);
        return None;
    }
    let Ok(permit) = shared.limit.clone().try_acquire_owned() else {
        accesslog::finish(shared, &rec, Outcome::Overloaded);
        return None;
    };
    tcp::set_nodelay(&stream);
    Some(Admitted {
        stream,
        rec,
        _permit: permit,
        _open: OpenGuard::new(&metrics.open),
    })
}

/// One connection, start to access log. Cut short when the drain deadline passes.
///
/// Exactly one access event per connection, even when the task never gets to finish: at the
/// drain deadline the listener gives connections [`CLOSE_GRACE`] to notice and then
/// aborts what is left. On a busy host a task may not have been polled by then; its
/// [`Unfinished`] guard logs it as `drain_timeout` when the aborted future is dropped.
pub async fn connection(shared: Arc<Shared>, conn: Admitted, mut drain: drain::Watch) {
    let Admitted {
        stream,
        rec,
        _permit,
        _open,
    } = conn;
    let mut unfinished = Unfinished {
        shared: &shared,
        rec,
        done: false,
    };
    let rec = &mut unfinished.rec;
    let outcome = {
        let handled = async {
            match rec.direction {
                Direction::Outbound => outbound::handle(&shared, stream, rec).await,
                Direction::Inbound => inbound::handle(&shared, stream, rec).await,
                Direction::Gateway => gateway::handle(&shared, stream, rec).await,
            }
        };
        tokio::select! {
            outcome = handled => outcome,
            () = drain.closing() => Outcome::DrainTimeout,
        }
    };
    unfinished.finish(outcome);
}

/// A connection whose access event is still to be written.
struct Unfinished<'a> {
    shared: &'a Shared,
    rec: Record,
    done: bool,
}

impl Unfinished<'_> {
    fn finish(mut self, outcome: Outcome) {
        self.done = true;
        accesslog::finish(self.shared, &self.rec, outcome);
    }
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        // Only an aborted task drops an unfinished connection, and only the drain aborts.
        if !self.done {
            accesslog::finish(self.shared, &self.rec, Outcome::DrainTimeout);
        }
    }
}

/// Counts a connection in the `open` gauge for as long as it lives, even if its task is
/// aborted.
struct OpenGuard(Gauge);

impl OpenGuard {
    fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        OpenGuard(gauge.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_guard_refuses_unredirected_and_self_pointing_destinations() {
        let local: SocketAddr = "127.0.0.1:15001".parse().unwrap();
        assert!(is_loop(local, local));
        assert!(is_loop("127.0.0.9:15001".parse().unwrap(), local));
        assert!(is_loop("0.0.0.0:15001".parse().unwrap(), local));
        assert!(is_loop(
            "[::1]:15001".parse().unwrap(),
            "[::1]:15001".parse().unwrap()
        ));
        // Same port elsewhere (198.51.100.0/24 is TEST-NET-2, never local) is fine.
        assert!(!is_loop("198.51.100.7:15001".parse().unwrap(), local));
        assert!(!is_loop("127.0.0.1:8080".parse().unwrap(), local));
    }
}
