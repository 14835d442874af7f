//! Outbound: the local app connected to some `VIP:port` and iptables sent it here.
//!
//! Original destination → service lookup in the current routes → endpoint by round robin
//! (falling through to the next endpoint when a connect fails) → `endpoint.ip:targetPort`.
//! A destination no service claims passes through to where the app was going (or, with
//! `--outbound-policy registry-only`, is refused); a service without endpoints gets its
//! client closed.
//!
//! On demand (`--discovery-mode on-demand`) a service's endpoints may not be known yet: the
//! first connection to it subscribes and waits, up to `--connect-timeout`, for the answer
//! (`discovery::on_demand`), then looks the destination up again. Once answered, the lookup
//! is the same lock-free read as always.

use crate::accesslog::Record;
use crate::config::OutboundPolicy;
use crate::routes::Target;
use crate::{balance, tcp, Direction, Outcome, Shared};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;
use tracing::debug;

/// Proxies one outbound connection whose original destination is `rec.dst`.
pub async fn handle(shared: &Shared, mut client: TcpStream, rec: &mut Record) -> Outcome {
    let mut target = lookup(shared, rec.dst);
    let miss = target
        .as_ref()
        .filter(|t| !t.endpoints_known)
        .map(|t| t.service.clone());
    if let (Some(service), Some(on_demand)) = (miss, &shared.on_demand) {
        on_demand.wait(&service, shared.connect_timeout).await;
        target = lookup(shared, rec.dst);
    }

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

/// The target of `dst` in the current routes, cloned out so that the table guard is not held
/// across awaits.
fn lookup(shared: &Shared, dst: SocketAddr) -> Option<Arc<Target>> {
    shared
        .routes
        .load()
        .as_ref()
        .and_then(|routes| routes.lookup(dst).cloned())
}
