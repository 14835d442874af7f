//! Outbound: the local app connected to some `VIP:port` and iptables sent it here.
//!
//! Two steps. [`plan`] decides, from the table alone and without I/O, what the connection is:
//! a destination no service claims passes through to where the app was going (or, with
//! `--outbound-policy registry-only`, is refused); a service port is carried as opaque bytes
//! to one of its endpoints. [`handle`] carries the plan out: connect (round robin, falling
//! through to the next endpoint when a connect fails) and copy.
//!
//! On demand (`--discovery-mode on-demand`) a service's endpoints may not be known yet: the
//! plan says so, the first connection to it subscribes and waits, up to `--connect-timeout`,
//! for the answer (`discovery::on_demand`), then plans again. Once answered, the lookup is the
//! same lock-free read as always.

use crate::accesslog::Record;
use crate::config::OutboundPolicy;
use crate::table::{Backends, Table, Target};
use crate::tcp::{self, ConnectError};
use crate::{balance, Direction, Outcome, Shared};
use std::net::SocketAddr;
use std::sync::Arc;
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
        Some(t) => Plan::Opaque(t.clone()),
    }
}

/// Proxies one outbound connection whose original destination is `rec.dst`.
pub async fn handle(shared: &Shared, mut client: TcpStream, rec: &mut Record) -> Outcome {
    let plan_now = |subscribe| {
        let table = shared.table.load();
        plan(table.as_deref(), rec.dst, shared.outbound_policy, subscribe)
    };
    let mut decided = plan_now(shared.on_demand.is_some());
    if let (Plan::Subscribe(service), Some(on_demand)) = (&decided, &shared.on_demand) {
        on_demand.wait(service, shared.connect_timeout).await;
        decided = plan_now(false);
    }
    let mut upstream = match decided {
        Plan::Refuse(outcome) => {
            debug!(dst = %rec.dst, "registry-only: no service claims this destination; refused");
            return outcome;
        }
        Plan::Passthrough => match tcp::connect(rec.dst, None, shared.connect_timeout).await {
            Ok(s) => {
                rec.endpoint = Some(rec.dst);
                s
            }
            Err(e) => {
                debug!(error = %e, "passthrough connect failed");
                return e.outcome();
            }
        },
        Plan::Opaque(target) => {
            rec.service = Some(target.service.clone());
            match connect_any(shared, &target.backends, rec).await {
                Ok(s) => s,
                Err(outcome) => return outcome,
            }
        }
        // Only returned when asked to subscribe, which the second plan is not.
        Plan::Subscribe(_) => return Outcome::NoEndpoints,
    };
    let metrics = shared.metrics.direction(Direction::Outbound);
    tcp::relay(
        &mut client,
        &mut upstream,
        shared.idle_timeout,
        metrics,
        rec,
    )
    .await
}

/// Connects to one of `backends`' endpoints, in round-robin order, skipping those that
/// refuse; records the one that answered.
async fn connect_any(
    shared: &Shared,
    backends: &Backends,
    rec: &mut Record,
) -> Result<TcpStream, Outcome> {
    let order = backends.balancer.rr.order(backends.endpoints.len());
    let attempt = |i: usize| {
        let addr = backends.endpoints[i].addr;
        async move {
            tcp::connect(addr, None, shared.connect_timeout)
                .await
                .inspect_err(|e: &ConnectError| debug!(error = %e, "endpoint connect failed"))
        }
    };
    match balance::first_success(order, attempt).await {
        Ok((i, s)) => {
            let ep = &backends.endpoints[i];
            rec.endpoint = Some(ep.addr);
            rec.pod = Some(ep.pod.clone());
            Ok(s)
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
        };
        Table::compile(&m, &cx, &mut Registry::default())
    }

    #[test]
    fn plans_follow_the_table_and_the_outbound_policy() {
        let t = table(None);
        let vip: SocketAddr = "198.19.0.1:80".parse().unwrap();
        let other: SocketAddr = "198.51.100.7:80".parse().unwrap();
        let allow = OutboundPolicy::AllowAny;
        assert!(
            matches!(plan(Some(&t), vip, allow, true), Plan::Opaque(t) if &*t.service == "web.shop")
        );
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
        assert!(matches!(plan(Some(&t), vip, allow, false), Plan::Opaque(_)));
        let answered = table(Some(&["web.shop"]));
        assert!(matches!(
            plan(Some(&answered), vip, allow, true),
            Plan::Opaque(_)
        ));
    }
}
