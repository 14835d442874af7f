//! On-demand endpoints (`--discovery-mode on-demand`): the sidecar holds every service (VIPs
//! and ports, small, needed to map a destination to a service) but the endpoints of only the
//! services its app actually talks to.
//!
//! The data path meets this module only on a miss: `outbound` finds a target whose
//! endpoints were never answered ([`crate::routes::Target::endpoints_known`] is false), calls
//! [`OnDemand::wait`], and reads the routes again. The first such connection to a service
//! adds its name here and wakes the discovery client, which sends
//! `resource_names_subscribe: [name]` for `endpoints` on the open stream (or lists it in the
//! initial request of the next stream). Later connections to the same service, until the
//! answer, wait on the same subscription. When a response names the service (its endpoints,
//! or the name as removed: the control plane answers every subscribed name), the client
//! publishes the new routes first and then releases the waiters, so a released connection
//! always finds the answer in the table. Every wait is bounded by the caller's deadline.
//!
//! Once answered, a service's targets are compiled with `endpoints_known` set, and its
//! connections never come here again: the subscribed case stays lock-free.

use crate::metrics::Metrics;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// The names subscribed on demand, shared by the data path (on a miss), the discovery
/// client and the admin API.
pub struct OnDemand {
    inner: Mutex<Inner>,
    /// Wakes the discovery client when `unsent` has names (a permit is kept when it is busy).
    wake: Notify,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Every name subscribed: listed again in the initial request of every new stream.
    subscribed: BTreeSet<String>,
    /// Subscribed, not yet sent on the current stream.
    unsent: Vec<String>,
    /// Subscribed and not answered yet: released (the value becomes `true`) by [`OnDemand::answered`].
    waiting: HashMap<String, watch::Sender<bool>>,
}

impl OnDemand {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        OnDemand {
            inner: Mutex::new(Inner::default()),
            wake: Notify::new(),
            metrics,
        }
    }

    /// Data path, on a miss: subscribes to `name`'s endpoints unless that was done already,
    /// then waits up to `timeout` for the answer. Returns at once when the name was answered
    /// already (the caller raced with the answer: the routes now have it). No lock is held
    /// while waiting.
    pub async fn wait(&self, name: &str, timeout: Duration) {
        let mut answer = {
            let mut inner = self.lock();
            if let Some(pending) = inner.waiting.get(name) {
                pending.subscribe()
            } else if inner.subscribed.contains(name) {
                return;
            } else {
                inner.subscribed.insert(name.to_owned());
                inner.unsent.push(name.to_owned());
                let (tx, rx) = watch::channel(false);
                inner.waiting.insert(name.to_owned(), tx);
                self.metrics.on_demand_subscription();
                self.wake.notify_one();
                tracing::debug!(service = name, "subscribing to endpoints on demand");
                rx
            }
        };
        // `changed` fails when the sender is dropped: released either way.
        if tokio::time::timeout(timeout, answer.changed())
            .await
            .is_err()
        {
            tracing::debug!(
                service = name,
                ?timeout,
                "no answer to the on-demand subscription in time"
            );
        }
    }

    /// Discovery client: the names to send now on the open stream.
    pub fn take_unsent(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().unsent)
    }

    /// Discovery client, at the start of a stream: every name subscribed, for the initial
    /// request of `endpoints` (nothing is left to send separately).
    pub fn resubscribe(&self) -> Vec<String> {
        let mut inner = self.lock();
        inner.unsent.clear();
        inner.subscribed.iter().cloned().collect()
    }

    /// Resolves when names may be waiting to be sent.
    pub async fn unsent(&self) {
        self.wake.notified().await
    }

    /// Discovery client, after the routes with the answer were published: releases whoever
    /// waits for these names.
    pub fn answered<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let mut inner = self.lock();
        if inner.waiting.is_empty() {
            return;
        }
        for name in names {
            if let Some(tx) = inner.waiting.remove(name) {
                tx.send_replace(true);
            }
        }
    }

    /// Names subscribed in an earlier life (the saved state): listed in the next stream's
    /// initial request, not counted as new subscriptions.
    pub fn restore(&self, names: impl IntoIterator<Item = String>) {
        let mut inner = self.lock();
        inner.subscribed.extend(names);
    }

    /// Every name subscribed, sorted (for `/config_dump`).
    pub fn subscribed(&self) -> Vec<String> {
        self.lock().subscribed.iter().cloned().collect()
    }

    /// Names subscribed whose answer has not arrived yet, sorted.
    pub fn pending(&self) -> Vec<String> {
        let inner = self.lock();
        let mut names: Vec<String> = inner.waiting.keys().cloned().collect();
        names.sort();
        names
    }

    /// A panic while the lock was held leaves plain sets behind: use them as they are.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Far longer than any step here takes: a bound against a hang, not a timing check.
    const WAIT: Duration = Duration::from_secs(10);

    /// How many connections wait for `name`'s answer right now.
    fn waiters(od: &OnDemand, name: &str) -> usize {
        od.lock()
            .waiting
            .get(name)
            .map_or(0, watch::Sender::receiver_count)
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_subscription_and_are_released_by_the_answer() {
        let metrics = Arc::new(Metrics::new());
        let od = Arc::new(OnDemand::new(metrics.clone()));
        let long = Duration::from_secs(30);
        let a = tokio::spawn({
            let od = od.clone();
            async move { od.wait("web.shop", long).await }
        });
        let b = tokio::spawn({
            let od = od.clone();
            async move { od.wait("web.shop", long).await }
        });
        // The client is woken and finds exactly one name to send.
        tokio::time::timeout(WAIT, od.unsent())
            .await
            .expect("the client is woken");
        // Both misses wait on the one subscription before it is answered.
        tokio::time::timeout(WAIT, async {
            while waiters(&od, "web.shop") < 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("both connections wait for the answer");
        assert_eq!(od.take_unsent(), ["web.shop"]);
        assert_eq!(od.pending(), ["web.shop"]);
        od.answered(["web.shop"]);
        tokio::time::timeout(WAIT, async {
            a.await.unwrap();
            b.await.unwrap();
        })
        .await
        .expect("the answer releases both");
        assert!(od.pending().is_empty());
        // Answered: a later miss (a race with the publish) returns at once, sends nothing.
        tokio::time::timeout(WAIT, od.wait("web.shop", long))
            .await
            .expect("an answered name does not wait");
        assert!(od.take_unsent().is_empty());
        assert_eq!(od.resubscribe(), ["web.shop"]);
        assert!(metrics
            .encode()
            .contains("muon_discovery_on_demand_subscriptions_total 1"));
    }

    #[tokio::test]
    async fn an_unanswered_subscription_gives_up_at_the_deadline() {
        let od = OnDemand::new(Arc::new(Metrics::new()));
        let started = std::time::Instant::now();
        tokio::time::timeout(WAIT, od.wait("gone.shop", Duration::from_millis(50)))
            .await
            .expect("the wait ends at its own deadline");
        assert!(started.elapsed() >= Duration::from_millis(50));
        // Still pending, and listed again by the next stream.
        assert_eq!(od.pending(), ["gone.shop"]);
        assert_eq!(od.resubscribe(), ["gone.shop"]);
        assert!(od.take_unsent().is_empty());
    }
}
