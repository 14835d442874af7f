//! Outbound: the local app connected to some `VIP:port` and iptables sent it here.
//!
//! Original destination → service lookup in the current routes → endpoint by round robin
//! (falling through to the next endpoint when a connect fails) → `endpoint.ip:targetPort`.
//! A destination no service claims passes through to where the app was going (or, with
//! `--outbound-policy registry-only`, is refused); a service without endpoints gets its
//! client closed.

use crate::accesslog::Record;
use crate::config::OutboundPolicy;
use crate::{balance, tcp, Direction, Outcome, Shared};
use std::net::SocketAddr;
use tokio::net::TcpStream;
use tracing::debug;

/// Proxies one outbound connection whose original destination is `rec.dst`.
pub async fn handle(shared: &Shared, mut client: TcpStream, rec: &mut Record) -> Outcome {
    // Clone the target out so the table guard is not held across awaits.
    let target = shared
        .routes
        .load()
        .as_ref()
        .and_then(|routes| routes.lookup(rec.dst).cloned());

    let mut upstream = match target {
        None if shared.outbound_policy == OutboundPolicy::RegistryOnly => {
            debug!(dst = %rec.dst, "registry-only: no service claims this destination; refused");
            return Outcome::RefusedUnknown;
        }
        None => match tcp::connect(rec.dst, None, shared.connect_timeout).await {
            Ok(s) => {
                rec.endpoint = Some(rec.dst);
                s
            }
            Err(e) => {
                debug!(error = %e, "passthrough connect failed");
                return e.outcome();
            }
        },
        Some(target) => {
            rec.service = Some(target.service.clone());
            let order = target.rr.order(target.backends.len());
            let attempt = |i: usize| {
                let addr = SocketAddr::new(target.backends[i].ip, target.target_port);
                async move {
                    tcp::connect(addr, None, shared.connect_timeout)
                        .await
                        .map(|s| (addr, s))
                        .inspect_err(|e| debug!(error = %e, "endpoint connect failed"))
                }
            };
            match balance::first_success(order, attempt).await {
                Ok((i, (addr, s))) => {
                    rec.endpoint = Some(addr);
                    rec.pod = Some(target.backends[i].pod.clone());
                    s
                }
                Err(Some(e)) => return e.outcome(),
                Err(None) => return Outcome::NoEndpoints,
            }
        }
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
