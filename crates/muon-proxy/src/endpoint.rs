//! State that outlives a table: per endpoint (in-flight requests, the latency estimate,
//! failures in a row and ejections, connection pools) and per balancer (the round-robin
//! position, the locality level in use, circuit-breaker counts, the retry budget's window).
//!
//! Tables are compiled anew for every change the control plane sends, but an endpoint that is
//! in the old table and the new one is the same endpoint: its state is looked up here by
//! (service, address, identity) when the new table is compiled, so a republish resets
//! nothing. Only the compiling thread touches [`Registry`]; the data path holds `Arc`s of the
//! states and updates them with atomics.

use crate::model::{Outliers, RetryBudget};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Nanoseconds since the first call in this process: the clock of every state here (one
/// `u64` fits an atomic; 584 years fit a `u64`).
pub fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// How fast a latency estimate forgets: a sample `DECAY_NS` old weighs 1/e of a new one.
const DECAY_NS: f64 = 10e9;

/// What identifies an endpoint across tables. An identity change makes a new endpoint: a
/// connection made for one identity is never reused for another.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub service: Arc<str>,
    pub addr: SocketAddr,
    pub identity: Arc<str>,
}

/// The live state of one endpoint.
#[derive(Debug, Default)]
pub struct EndpointState {
    /// Requests (or connections) currently sent to it.
    pub in_flight: AtomicU64,
    /// Its connections, shared by every request to it.
    pub pool: crate::http::pool::Pool,
    /// The cipher suite of the mutual TLS its connections negotiated (for access events).
    pub tls_cipher: std::sync::OnceLock<&'static str>,
    /// The peak-sensitive latency estimate, in nanoseconds (an `f64`'s bits; 0: no sample).
    ewma: AtomicU64,
    /// When `ewma` was last updated ([`now_ns`]).
    ewma_at: AtomicU64,
    /// Failures in a row, by kind, for outlier detection.
    errors_5xx: AtomicU32,
    errors_gateway: AtomicU32,
    errors_connect: AtomicU32,
    /// Ejected until this time ([`now_ns`]); 0: never ejected.
    ejected_until: AtomicU64,
    /// Ejections so far (each lasts longer); forgotten after a healthy `maxEjectionTime`.
    ejections: AtomicU32,
}

/// What one answer (or connect) told about an endpoint, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer with this status (gRPC `UNAVAILABLE` counts as 503).
    Status(u16),
    /// The request was sent and failed before an answer (reset, closed).
    Failed,
    /// Connecting failed (or the endpoint's sidecar could not reach its app).
    ConnectFailed,
}

impl EndpointState {
    /// Counts one request in flight to this endpoint until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub fn load(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The latency estimate in nanoseconds (0: none yet).
    pub fn latency(&self) -> f64 {
        f64::from_bits(self.ewma.load(Ordering::Relaxed))
    }

    /// Records one latency sample (nanoseconds): a sample above the estimate replaces it
    /// (peak), one below pulls it down as the estimate decays with time. Updates race
    /// benignly: the last writer wins, and each writer wrote a sensible estimate.
    pub fn observe(&self, rtt_ns: u64, balancer: &BalancerState) {
        let now = now_ns();
        let rtt = rtt_ns as f64;
        let prev = self.latency();
        let at = self.ewma_at.swap(now, Ordering::Relaxed);
        let next = if prev == 0.0 || rtt > prev {
            rtt
        } else {
            let w = (-(now.saturating_sub(at) as f64) / DECAY_NS).exp();
            prev * w + rtt * (1.0 - w)
        };
        self.ewma.store(next.to_bits(), Ordering::Relaxed);
        balancer.observe(rtt);
    }

    /// Peak-EWMA's cost: the estimate (the balancer's mean when there is none yet) times the
    /// requests in flight, plus one. An estimate no answer refreshed decays with time, so an
    /// endpoint once slow and then passed over is tried again in the end (a probe), rather
    /// than starved for good.
    pub fn cost(&self, now: u64, mean: f64) -> f64 {
        let latency = match self.latency() {
            l if l > 0.0 => {
                let age = now.saturating_sub(self.ewma_at.load(Ordering::Relaxed));
                l * (-(age as f64) / DECAY_NS).exp()
            }
            _ => mean,
        };
        latency.max(1.0) * (self.load() as f64 + 1.0)
    }

    pub fn ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    /// When the current ejection ends ([`now_ns`]), if ejected at `now`.
    pub fn ejected_until(&self, now: u64) -> Option<u64> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        (until > now).then_some(until)
    }

    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub fn eject_until(&self, until: u64) {
        self.ejected_until.store(until, Ordering::Relaxed);
    }

    /// Counts `outcome` against the thresholds; returns the ejection's length when this
    /// outcome crossed one (the caller checks `maxEjectionPercent` and calls [`Self::eject`]).
    pub fn record(&self, outcome: Outcome, o: &Outliers) -> Option<std::time::Duration> {
        let bump = |c: &AtomicU32, hit: bool| match hit {
            true => c.fetch_add(1, Ordering::Relaxed) + 1,
            false => {
                c.store(0, Ordering::Relaxed);
                0
            }
        };
        let (five, gateway, connect) = match outcome {
            Outcome::Status(s) => ((500..600).contains(&s), matches!(s, 502..=504), false),
            Outcome::Failed => (true, true, false),
            Outcome::ConnectFailed => (false, false, true),
        };
        let n5 = bump(&self.errors_5xx, five);
        let ngw = bump(&self.errors_gateway, gateway);
        // A connect that worked resets the connect count; an answer means it connected.
        let nconn = bump(&self.errors_connect, connect);
        let crossed = |n: u32, threshold: u32| threshold > 0 && n >= threshold;
        if !(crossed(n5, o.consecutive_5xx)
            || crossed(ngw, o.consecutive_gateway_errors)
            || crossed(nconn, o.consecutive_connect_failures))
        {
            if !five && !gateway && !connect {
                self.forget_ejections(o);
            }
            return None;
        }
        let n = self.ejections.load(Ordering::Relaxed) + 1;
        Some((o.base_ejection_time * n).min(o.max_ejection_time))
    }

    /// Ejects the endpoint for `length`, from now; clears the failure counts.
    pub fn eject(&self, length: std::time::Duration) -> u64 {
        let until = now_ns().saturating_add(u64::try_from(length.as_nanos()).unwrap_or(u64::MAX));
        self.ejected_until.store(until, Ordering::Relaxed);
        self.ejections.fetch_add(1, Ordering::Relaxed);
        for c in [&self.errors_5xx, &self.errors_gateway, &self.errors_connect] {
            c.store(0, Ordering::Relaxed);
        }
        until
    }

    /// After `maxEjectionTime` without an ejection, the next one starts short again.
    fn forget_ejections(&self, o: &Outliers) {
        if self.ejections.load(Ordering::Relaxed) == 0 {
            return;
        }
        let until = self.ejected_until.load(Ordering::Relaxed);
        let calm = u64::try_from(o.max_ejection_time.as_nanos()).unwrap_or(u64::MAX);
        if now_ns() > until.saturating_add(calm) {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }
}

/// One request in flight to an endpoint (see [`EndpointState::begin`]).
#[derive(Debug)]
pub struct InFlight(Arc<EndpointState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The live state of one balancer: a service's endpoints at one target port.
#[derive(Debug, Default)]
pub struct BalancerState {
    /// Round robin's position.
    pub rr: AtomicUsize,
    /// The locality level in use, and when it was computed ([`now_ns`]); 0: compute now.
    depth: AtomicUsize,
    depth_at: AtomicU64,
    /// The mean of every latency sample (an `f64`'s bits): new endpoints' estimate.
    mean: AtomicU64,
    /// Requests in flight, and those not answered yet; connections open (circuit breaking).
    pub requests: AtomicU32,
    pub pending: AtomicU32,
    pub connections: AtomicU32,
    pub budget: RetryWindow,
}

impl BalancerState {
    pub fn depth(&self) -> (usize, u64) {
        (
            self.depth.load(Ordering::Relaxed),
            self.depth_at.load(Ordering::Relaxed),
        )
    }

    pub fn set_depth(&self, depth: usize, at: u64) {
        self.depth.store(depth, Ordering::Relaxed);
        self.depth_at.store(at.max(1), Ordering::Relaxed);
    }

    /// Makes the next pick compute the locality level again (after an ejection).
    pub fn refresh_depth(&self) {
        self.depth_at.store(0, Ordering::Relaxed);
    }

    pub fn mean_latency(&self) -> f64 {
        f64::from_bits(self.mean.load(Ordering::Relaxed))
    }

    fn observe(&self, rtt: f64) {
        let prev = self.mean_latency();
        let next = match prev {
            0.0 => rtt,
            _ => prev * 0.95 + rtt * 0.05,
        };
        self.mean.store(next.to_bits(), Ordering::Relaxed);
    }
}

/// A slot taken under a circuit-breaker limit, given back on drop.
#[derive(Debug)]
pub struct Slot(Arc<BalancerState>, fn(&BalancerState) -> &AtomicU32);

impl Slot {
    /// Takes one of `limit` slots of the counter `which`, or `None` when all are taken.
    pub fn take(
        balancer: &Arc<BalancerState>,
        which: fn(&BalancerState) -> &AtomicU32,
        limit: u32,
    ) -> Option<Slot> {
        which(balancer)
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(balancer.clone(), which))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        (self.1)(&self.0).fetch_sub(1, Ordering::Relaxed);
    }
}

/// The retry budget's accounting: requests and retries in the current and the previous
/// window of `interval`; the previous window counts for the part of it still inside the
/// last `interval` (a sliding window from two counters).
#[derive(Debug, Default)]
pub struct RetryWindow {
    /// The current window's index (`now / interval`).
    epoch: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
    prev_requests: AtomicU64,
    prev_retries: AtomicU64,
}

impl RetryWindow {
    fn roll(&self, now: u64, interval: u64) -> f64 {
        let interval = interval.max(1);
        let epoch = now / interval;
        let seen = self.epoch.load(Ordering::Relaxed);
        if epoch != seen
            && self
                .epoch
                .compare_exchange(seen, epoch, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let (r, t) = (
                self.requests.swap(0, Ordering::Relaxed),
                self.retries.swap(0, Ordering::Relaxed),
            );
            // A gap of more than one window leaves nothing to remember.
            let adjacent = epoch == seen + 1;
            self.prev_requests
                .store(if adjacent { r } else { 0 }, Ordering::Relaxed);
            self.prev_retries
                .store(if adjacent { t } else { 0 }, Ordering::Relaxed);
        }
        // How much of the previous window is still inside the last `interval`.
        1.0 - (now % interval) as f64 / interval as f64
    }

    /// Counts one request (a first try).
    pub fn request(&self, budget: &RetryBudget) {
        self.roll(now_ns(), nanos(budget.interval));
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry if the budget allows: retries stay within `percent` of the requests
    /// of the last `interval`, or within the minimum rate.
    pub fn try_retry(&self, budget: &RetryBudget) -> bool {
        let interval = nanos(budget.interval);
        let keep = self.roll(now_ns(), interval);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let requests = load(&self.requests) + load(&self.prev_requests) * keep;
        let retries = load(&self.retries) + load(&self.prev_retries) * keep;
        let by_share = requests * f64::from(budget.percent) / 100.0;
        let by_rate = f64::from(budget.min_count) * interval as f64
            / nanos(budget.min_interval).max(1) as f64;
        if retries + 1.0 > by_share.max(by_rate) {
            return false;
        }
        self.retries.fetch_add(1, Ordering::Relaxed);
        true
    }
}

fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Every live state, keyed; rebuilt by each compile so that states of endpoints that left
/// are dropped once the last table using them is gone.
#[derive(Debug, Default)]
pub struct Registry {
    endpoints: HashMap<EndpointKey, Arc<EndpointState>>,
    balancers: HashMap<(Arc<str>, u16), Arc<BalancerState>>,
}

impl Registry {
    /// Starts a compile: states are taken from `self` as they are asked for, and what was
    /// not asked for is dropped by [`Carry::finish`].
    pub fn carry(&mut self) -> Carry<'_> {
        Carry {
            old: self,
            next: Registry::default(),
        }
    }

    pub fn endpoints(&self) -> usize {
        self.endpoints.len()
    }
}

/// One compile's view of the registry.
pub struct Carry<'a> {
    old: &'a mut Registry,
    next: Registry,
}

impl Carry<'_> {
    pub fn endpoint(&mut self, key: EndpointKey) -> Arc<EndpointState> {
        if let Some(s) = self.next.endpoints.get(&key) {
            return s.clone();
        }
        let state = self.old.endpoints.remove(&key).unwrap_or_default();
        self.next.endpoints.insert(key, state.clone());
        state
    }

    pub fn balancer(&mut self, service: &Arc<str>, target_port: u16) -> Arc<BalancerState> {
        let key = (service.clone(), target_port);
        if let Some(s) = self.next.balancers.get(&key) {
            return s.clone();
        }
        let state = self.old.balancers.remove(&key).unwrap_or_default();
        self.next.balancers.insert(key, state.clone());
        state
    }

    /// Keeps exactly the states this compile asked for.
    pub fn finish(self) {
        *self.old = self.next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(addr: &str, identity: &str) -> EndpointKey {
        EndpointKey {
            service: "web.shop".into(),
            addr: addr.parse().unwrap(),
            identity: identity.into(),
        }
    }

    #[test]
    fn states_survive_a_recompile_and_leave_with_their_endpoint() {
        let mut reg = Registry::default();
        let mut c = reg.carry();
        let a = c.endpoint(key("198.18.0.2:80", "spiffe://a"));
        let b = c.endpoint(key("198.18.0.3:80", "spiffe://a"));
        let rr = c.balancer(&"web.shop".into(), 80);
        c.finish();
        a.in_flight.fetch_add(3, Ordering::Relaxed);
        rr.rr.fetch_add(1, Ordering::Relaxed);

        let mut c = reg.carry();
        let a2 = c.endpoint(key("198.18.0.2:80", "spiffe://a"));
        // Same address, other identity: another endpoint.
        let b2 = c.endpoint(key("198.18.0.3:80", "spiffe://b"));
        let rr2 = c.balancer(&"web.shop".into(), 80);
        c.finish();
        assert!(Arc::ptr_eq(&a, &a2));
        assert_eq!(a2.in_flight.load(Ordering::Relaxed), 3);
        assert!(!Arc::ptr_eq(&b, &b2));
        assert!(Arc::ptr_eq(&rr, &rr2));
        assert_eq!(rr2.rr.load(Ordering::Relaxed), 1);
        assert_eq!(reg.endpoints(), 2);
    }

    #[test]
    fn an_estimate_no_answer_refreshed_decays_so_the_endpoint_is_probed_again() {
        let b = BalancerState::default();
        let (fast, slow) = (EndpointState::default(), EndpointState::default());
        slow.observe(50_000_000, &b); // 50 ms, now
        fast.observe(1_000_000, &b); // 1 ms
        let now = now_ns();
        assert!(slow.cost(now, 0.0) > 40.0 * fast.cost(now, 0.0));
        // A minute without answers from it (the fast one keeps answering): the slow one's
        // estimate has decayed below the fast one's, and it gets the next pick.
        let later = now + 60_000_000_000;
        fast.ewma_at.store(later, Ordering::Relaxed);
        assert!(slow.cost(later, 0.0) < fast.cost(later, 0.0));
    }

    fn outliers() -> Outliers {
        Outliers {
            consecutive_5xx: 5,
            consecutive_gateway_errors: 3,
            consecutive_connect_failures: 2,
            base_ejection_time: std::time::Duration::from_secs(5),
            max_ejection_time: std::time::Duration::from_secs(12),
            max_ejection_percent: 50,
        }
    }

    #[test]
    fn failures_in_a_row_cross_a_threshold_and_ejections_grow() {
        let s = EndpointState::default();
        let o = outliers();
        // 500s: five in a row; a success in between starts over.
        for _ in 0..4 {
            assert_eq!(s.record(Outcome::Status(500), &o), None);
        }
        assert_eq!(s.record(Outcome::Status(200), &o), None);
        for _ in 0..4 {
            assert_eq!(s.record(Outcome::Status(500), &o), None);
        }
        let first = s.record(Outcome::Status(500), &o).unwrap();
        assert_eq!(first.as_secs(), 5);
        s.eject(first);
        assert!(s.ejected(now_ns()));
        // Gateway errors: three; the second ejection is twice as long, the third capped.
        for _ in 0..2 {
            assert_eq!(s.record(Outcome::Status(503), &o), None);
        }
        let second = s.record(Outcome::Status(503), &o).unwrap();
        assert_eq!(second.as_secs(), 10);
        s.eject(second);
        assert_eq!(s.record(Outcome::ConnectFailed, &o), None);
        assert_eq!(s.record(Outcome::ConnectFailed, &o).unwrap().as_secs(), 12);
    }

    #[test]
    fn the_retry_budget_caps_retries_as_a_share_of_requests() {
        let w = RetryWindow::default();
        let budget = RetryBudget {
            percent: 20,
            interval: std::time::Duration::from_secs(3600),
            min_count: 0,
            min_interval: std::time::Duration::from_secs(1),
        };
        for _ in 0..1000 {
            w.request(&budget);
        }
        let allowed = (0..1000).filter(|_| w.try_retry(&budget)).count();
        // 20% of 1000 (the previous window is empty, so the share is exact).
        assert_eq!(allowed, 200);
        // The minimum rate allows retries with no requests at all: 3 per second over 10s.
        let w = RetryWindow::default();
        let floor = RetryBudget {
            percent: 20,
            interval: std::time::Duration::from_secs(10),
            min_count: 3,
            min_interval: std::time::Duration::from_secs(1),
        };
        assert_eq!((0..100).filter(|_| w.try_retry(&floor)).count(), 30);
    }

    #[test]
    fn circuit_slots_are_limited_and_given_back() {
        let b = Arc::new(BalancerState::default());
        let a = Slot::take(&b, |b| &b.pending, 2).unwrap();
        let _b2 = Slot::take(&b, |b| &b.pending, 2).unwrap();
        assert!(Slot::take(&b, |b| &b.pending, 2).is_none());
        drop(a);
        assert!(Slot::take(&b, |b| &b.pending, 2).is_some());
    }
}
