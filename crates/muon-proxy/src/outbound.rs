//! Outbound: the local app connected to some `VIP:port` and iptables sent it here.
//!
//! Two steps. [`plan`] decides, from the table alone and without I/O, what the connection is:
//! a destination no service claims passes through to where the app was going (or, with
//! `--outbound-policy registry-only`, is refused); a service port declared `tcp`, `opaque` or
//! `tls` is carried as opaque bytes to one of its endpoints without waiting for a byte; one
//! declared `http`, `http2` or `grpc` is served as HTTP; an undeclared one is detected from
//! its first bytes ([`crate::detect`], bounded by `--detect-timeout`), and [`after_sniff`]
//! decides again. [`handle`] carries the plan out: connect (round robin, falling through to
//! the next endpoint when a connect fails) and copy, or serve HTTP (`crate::http`), where
//! every request is routed and balanced on its own.
//!
//! On demand (`--discovery-mode on-demand`) a service's endpoints may not be known yet: the
//! plan says so, the first connection to it subscribes and waits, up to `--connect-timeout`,
//! for the answer (`discovery::on_demand`), then plans again. Once answered, the lookup is the
//! same lock-free read as always.

use crate::accesslog::Record;
use crate::config::OutboundPolicy;
use crate::detect::{self, Detected, Prefixed};
use crate::http::{self, ConnCx, ConnKind};
use crate::table::{Backends, Table, Target};
use crate::tcp::{self, ConnectError};
use crate::{balance, Direction, Outcome, Shared};
use bytes::BytesMut;
use muon_core::Protocol;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::debug;

/// What to do with one outbound connection.
#[derive(Debug)]
pub enum Plan {
    /// No service claims the destination: forward to it as it is.
    Passthrough,
    /// Refused without connecting anywhere.
    Refuse(Outcome),
    /// A service whose endpoints are not known yet (on demand): subscribe, then plan again.
    Subscribe(Arc<str>),
    /// Bytes, unexamined, to an endpoint of the service port.
    Opaque(Arc<Target>),
    /// Declared HTTP: served as HTTP. `h2`: HTTP/2 only (declared `http2` or `grpc`);
    /// otherwise the first bytes say HTTP/1.1 or HTTP/2.
    Http { target: Arc<Target>, h2: bool },
    /// Undeclared: the first bytes decide ([`after_sniff`]).
    Detect(Arc<Target>),
}

/// How a connection is carried once its first bytes are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carry {
    Opaque,
    Http(::http::Version),
    /// Declared HTTP, and the client said nothing in time: closed.
    Close,
}

/// After sniffing: HTTP is served as HTTP; TLS, other protocols and clients that say nothing
/// (server-first protocols) are carried as opaque bytes, unless the port was declared HTTP.
pub fn after_sniff(detected: Detected, declared_http: bool) -> Carry {
    match (detected, declared_http) {
        (Detected::Http1, _) => Carry::Http(::http::Version::HTTP_11),
        (Detected::Http2, _) => Carry::Http(::http::Version::HTTP_2),
        (Detected::Timeout, true) => Carry::Close,
        // hyper answers what is not HTTP with 400.
        (Detected::Tls | Detected::Opaque, true) => Carry::Http(::http::Version::HTTP_11),
        (_, false) => Carry::Opaque,
    }
}

/// Decides what a connection to `dst` is. `subscribe`: a service with unknown endpoints is
/// to be subscribed to (false once that was tried: then it is planned with what is known).
pub fn plan(
    table: Option<&Table>,
    dst: SocketAddr,
    policy: OutboundPolicy,
    subscribe: bool,
) -> Plan {
    match table.and_then(|t| t.lookup(dst)) {
        None if policy == OutboundPolicy::RegistryOnly => Plan::Refuse(Outcome::RefusedUnknown),
        None => Plan::Passthrough,
        Some(t) if subscribe && !t.backends.known => Plan::Subscribe(t.service.clone()),
        Some(t) => match t.protocol {
            Some(Protocol::Tcp | Protocol::Opaque | Protocol::Tls) => Plan::Opaque(t.clone()),
            Some(Protocol::Http) => Plan::Http {
                target: t.clone(),
                h2: false,
            },
            Some(Protocol::Http2 | Protocol::Grpc) => Plan::Http {
                target: t.clone(),
                h2: true,
            },
            None => Plan::Detect(t.clone()),
        },
    }
}

/// Proxies one outbound connection whose original destination is `rec.dst`.
pub async fn handle(shared: &Arc<Shared>, client: TcpStream, rec: &mut Record) -> Outcome {
    let plan_now = |subscribe| {
        let table = shared.table.load();
        plan(table.as_deref(), rec.dst, shared.outbound_policy, subscribe)
    };
    let mut decided = plan_now(shared.on_demand.is_some());
    if let (Plan::Subscribe(service), Some(on_demand)) = (&decided, &shared.on_demand) {
        on_demand.wait(service, shared.connect_timeout).await;
        decided = plan_now(false);
    }
    match decided {
        Plan::Refuse(outcome) => {
            debug!(dst = %rec.dst, "registry-only: no service claims this destination; refused");
            outcome
        }
        Plan::Passthrough => match tcp::connect(rec.dst, None, shared.connect_timeout).await {
            Ok(mut upstream) => {
                rec.endpoint = Some(rec.dst);
                relay(shared, client, &mut upstream, rec).await
            }
            Err(e) => {
                debug!(error = %e, "passthrough connect failed");
                e.outcome()
            }
        },
        Plan::Opaque(target) => opaque(shared, client, &target, rec).await,
        Plan::Http { target, h2: true } => {
            rec.service = Some(target.service.clone());
            let cx = ConnCx::new(
                shared.clone(),
                rec,
                ::http::Version::HTTP_2,
                ConnKind::Outbound(target),
            );
            http::serve(client, cx, rec, shared.drain.watch()).await
        }
        Plan::Http { target, h2: false } => {
            sniffed(
                shared,
                client,
                target,
                rec,
                shared.http.header_read_timeout,
                true,
            )
            .await
        }
        Plan::Detect(target) => {
            sniffed(
                shared,
                client,
                target,
                rec,
                shared.http.detect_timeout,
                false,
            )
            .await
        }
        // Only returned when asked to subscribe, which the second plan is not.
        Plan::Subscribe(_) => Outcome::NoEndpoints,
    }
}

/// Reads the first bytes (up to `wait`), then carries the connection as they say.
async fn sniffed(
    shared: &Arc<Shared>,
    mut client: TcpStream,
    target: Arc<Target>,
    rec: &mut Record,
    wait: std::time::Duration,
    declared_http: bool,
) -> Outcome {
    let mut buf = BytesMut::new();
    let detected = match detect::sniff(&mut client, &mut buf, wait).await {
        Ok(d) => d,
        Err(e) => {
            debug!(error = %e, "reading the first bytes failed");
            return Outcome::Error;
        }
    };
    // The sniffed bytes are replayed, and counted, as the connection goes on.
    let client = Prefixed::new(buf.freeze(), client);
    match after_sniff(detected, declared_http) {
        Carry::Opaque => opaque(shared, client, &target, rec).await,
        Carry::Http(version) => {
            rec.service = Some(target.service.clone());
            let cx = ConnCx::new(shared.clone(), rec, version, ConnKind::Outbound(target));
            http::serve(client, cx, rec, shared.drain.watch()).await
        }
        Carry::Close => Outcome::IdleTimeout,
    }
}

/// Opaque bytes to one of the target's endpoints.
async fn opaque<S>(shared: &Shared, client: S, target: &Target, rec: &mut Record) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    rec.service = Some(target.service.clone());
    let backends = &target.backends;
    // The connection's place under the service's `maxConnections`, held while it is open.
    let Some(_slot) = crate::endpoint::Slot::take(
        &backends.balancer,
        |b| &b.connections,
        backends.traffic.limits.max_connections,
    ) else {
        backends.stats.overloaded.inc();
        debug!(service = %target.service, "maxConnections reached; connection closed");
        return Outcome::Overloaded;
    };
    let (mut upstream, ep) = match connect_any(shared, backends, rec).await {
        Ok(connected) => connected,
        Err(outcome) => return outcome,
    };
    // An open connection is load on its endpoint, for LeastRequest and PeakEWMA.
    let _in_flight = ep.state.begin();
    // A meshed endpoint gets mutual TLS when this sidecar has a certificate: the bytes
    // inside are the app's, as they were.
    match (&shared.mesh, ep.meshed && !ep.identity.is_empty()) {
        (Some(mesh), true) if mesh.ready() => {
            let ip = ep.addr.ip();
            match mesh
                .connect(upstream, ip, &ep.identity, crate::tls::Inner::Tcp)
                .await
            {
                Ok(mut tls) => {
                    shared.metrics.tls(Direction::Outbound, "ok");
                    let (version, cipher) = crate::tls::negotiated(tls.get_ref().1);
                    rec.identities = crate::tls::Identities {
                        src: mesh.own_id(),
                        dst: Some(ep.identity.clone()),
                        version,
                        cipher,
                    };
                    relay(shared, client, &mut tls, rec).await
                }
                Err(e) => {
                    shared.metrics.tls(Direction::Outbound, e.reason());
                    tracing::warn!(endpoint = %ep.addr, error = %e, "mutual TLS to the endpoint failed");
                    Outcome::ConnectError
                }
            }
        }
        _ => relay(shared, client, &mut upstream, rec).await,
    }
}

async fn relay<S, U>(shared: &Shared, mut client: S, upstream: &mut U, rec: &mut Record) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let metrics = shared.metrics.direction(Direction::Outbound);
    tcp::relay(
        &mut client,
        upstream,
        shared.idle_timeout,
        Some(metrics),
        rec,
    )
    .await
}

/// Connects to one of `backends`' endpoints, in round-robin order, skipping those that
/// refuse; records the one that answered.
async fn connect_any<'b>(
    shared: &Shared,
    backends: &'b Backends,
    rec: &mut Record,
) -> Result<(TcpStream, &'b crate::table::Endpoint), Outcome> {
    let mut tried = balance::Tried::default();
    let order = std::iter::from_fn(|| {
        let i = backends.pick(&tried)?;
        tried.add(i);
        Some(i)
    })
    .take(backends.endpoints.len());
    let attempt = |i: usize| {
        let addr = backends.endpoints[i].addr;
        async move {
            let started = crate::endpoint::now_ns();
            let r = tcp::connect(addr, None, shared.connect_timeout)
                .await
                .inspect_err(|e: &ConnectError| debug!(error = %e, "endpoint connect failed"));
            let ep = &backends.endpoints[i];
            match &r {
                Ok(_) => {
                    ep.state
                        .observe(crate::endpoint::now_ns() - started, &backends.balancer);
                    backends.record(i, crate::endpoint::Outcome::Status(200));
                }
                Err(_) => backends.record(i, crate::endpoint::Outcome::ConnectFailed),
            }
            r
        }
    };
    match balance::first_success(order, attempt).await {
        Ok((i, s)) => {
            let ep = &backends.endpoints[i];
            rec.endpoint = Some(ep.addr);
            rec.pod = Some(ep.pod.clone());
            Ok((s, ep))
        }
        Err(Some(e)) => Err(e.outcome()),
        Err(None) => Err(Outcome::NoEndpoints),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::Registry;
    use crate::table::{tests::mesh, Context, Source};

    fn table(answered: Option<&[&str]>) -> Table {
        let mut m = mesh();
        m.answered = answered.map(|a| a.iter().map(|s| s.to_string()).collect());
        let cx = Context {
            version: 1,
            source: Source::ControlPlane,
            local_ips: &[],
            metrics: &crate::metrics::Metrics::new(),
            pod_name: "",
            pod_namespace: "",
            locality: &Default::default(),
        };
        Table::compile(&m, &cx, &mut Registry::default())
    }

    #[test]
    fn plans_follow_the_table_and_the_outbound_policy() {
        let t = table(None);
        let vip: SocketAddr = "198.19.0.1:80".parse().unwrap();
        let other: SocketAddr = "198.51.100.7:80".parse().unwrap();
        let allow = OutboundPolicy::AllowAny;
        // Port 80 is declared http, 443 is not declared.
        assert!(
            matches!(plan(Some(&t), vip, allow, true), Plan::Http { target, h2: false } if &*target.service == "web.shop")
        );
        let undeclared: SocketAddr = "198.19.0.1:443".parse().unwrap();
        assert!(matches!(
            plan(Some(&t), undeclared, allow, true),
            Plan::Detect(_)
        ));
        assert!(matches!(
            plan(Some(&t), other, allow, true),
            Plan::Passthrough
        ));
        assert!(matches!(
            plan(Some(&t), other, OutboundPolicy::RegistryOnly, true),
            Plan::Refuse(Outcome::RefusedUnknown)
        ));
        // No table yet: nothing is known.
        assert!(matches!(plan(None, vip, allow, true), Plan::Passthrough));
    }

    #[test]
    fn unknown_endpoints_are_subscribed_once_then_planned_with_what_is_known() {
        let t = table(Some(&[]));
        let vip: SocketAddr = "198.19.0.1:80".parse().unwrap();
        let allow = OutboundPolicy::AllowAny;
        assert!(
            matches!(plan(Some(&t), vip, allow, true), Plan::Subscribe(s) if &*s == "web.shop")
        );
        assert!(matches!(
            plan(Some(&t), vip, allow, false),
            Plan::Http { .. }
        ));
        let answered = table(Some(&["web.shop"]));
        assert!(matches!(
            plan(Some(&answered), vip, allow, true),
            Plan::Http { .. }
        ));
    }

    #[test]
    fn sniffed_bytes_decide_how_a_connection_is_carried() {
        use ::http::Version;
        assert_eq!(
            after_sniff(Detected::Http1, false),
            Carry::Http(Version::HTTP_11)
        );
        assert_eq!(
            after_sniff(Detected::Http2, false),
            Carry::Http(Version::HTTP_2)
        );
        assert_eq!(after_sniff(Detected::Tls, false), Carry::Opaque);
        assert_eq!(after_sniff(Detected::Opaque, false), Carry::Opaque);
        // A server-first protocol on an undeclared port: the server's banner still flows.
        assert_eq!(after_sniff(Detected::Timeout, false), Carry::Opaque);
        assert_eq!(after_sniff(Detected::Timeout, true), Carry::Close);
        assert_eq!(
            after_sniff(Detected::Opaque, true),
            Carry::Http(Version::HTTP_11)
        );
    }

    #[test]
    fn declared_protocols_skip_detection() {
        let port = |p: Option<Protocol>| {
            let mut m = mesh();
            m.services.get_mut("web.shop").unwrap().ports[0].protocol = p;
            let cx = Context {
                version: 1,
                source: Source::ControlPlane,
                local_ips: &[],
                metrics: &crate::metrics::Metrics::new(),
                pod_name: "",
                pod_namespace: "",
                locality: &Default::default(),
            };
            let t = Table::compile(&m, &cx, &mut Registry::default());
            plan(
                Some(&t),
                "198.19.0.1:80".parse().unwrap(),
                OutboundPolicy::AllowAny,
                false,
            )
        };
        for p in [Protocol::Tcp, Protocol::Opaque, Protocol::Tls] {
            assert!(matches!(port(Some(p)), Plan::Opaque(_)), "{p:?}");
        }
        for p in [Protocol::Http2, Protocol::Grpc] {
            assert!(
                matches!(port(Some(p)), Plan::Http { h2: true, .. }),
                "{p:?}"
            );
        }
        assert!(matches!(
            port(Some(Protocol::Http)),
            Plan::Http { h2: false, .. }
        ));
        assert!(matches!(port(None), Plan::Detect(_)));
    }
}
