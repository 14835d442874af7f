//! Endpoint choice, per request (HTTP) or per connection (TCP):
//!
//! - which endpoints may be picked: the nearest locality level whose share of healthy
//!   (not ejected) endpoints is at least `failoverBelow`, together with the nearer levels
//!   ([`Backends::levels`] sorts them zone < region < cloud < other clouds); another cloud
//!   only when nothing nearer is healthy, unless the policy spills across clouds. The level in
//!   use is recomputed at most every [`DEPTH_REFRESH`] and at once after an ejection;
//! - among them, by the service's algorithm: power of two choices over a peak-sensitive
//!   moving average of latency times the requests in flight (`PeakEWMA`, the default; after
//!   Finagle's and linkerd2-proxy's), power of two choices over requests in flight
//!   (`LeastRequest`), or weighted round robin. Every algorithm draws in proportion to the
//!   endpoints' weights, and never picks an ejected endpoint or one this request already
//!   tried while another is left.
//!
//! An endpoint without a latency sample yet is given the balancer's running mean (the
//! neutral estimate), not zero, so a new endpoint is not flooded.
//!
//! Picking never locks and never allocates: a few atomic loads, two random draws and two
//! binary searches over the cumulative weights.

use crate::endpoint::{now_ns, BalancerState, EndpointState};
use crate::model::Algorithm;
use std::future::Future;
use std::sync::atomic::Ordering;

/// Locality levels: same zone, same region, same cloud, another cloud.
pub const LEVELS: usize = 4;
/// The level of endpoints in another cloud.
pub const OTHER_CLOUD: usize = 3;
/// How long a computed locality level is used before it is computed again.
pub const DEPTH_REFRESH: u64 = 100_000_000;
/// Redraws when a draw lands on an endpoint that cannot be used.
const REDRAWS: usize = 4;

/// Where a client runs, to rank endpoints by distance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locality {
    pub zone: Option<std::sync::Arc<str>>,
    pub region: Option<std::sync::Arc<str>>,
    pub cloud: Option<std::sync::Arc<str>>,
}

impl Locality {
    /// The level of an endpoint at `ep`, seen from here (0 = nearest).
    pub fn level(&self, ep: &Locality) -> usize {
        let same = |a: &Option<std::sync::Arc<str>>, b: &Option<std::sync::Arc<str>>| matches!((a, b), (Some(a), Some(b)) if a == b);
        let known = |a: &Option<std::sync::Arc<str>>| a.is_some();
        if known(&self.cloud) && known(&ep.cloud) && !same(&self.cloud, &ep.cloud) {
            return OTHER_CLOUD;
        }
        if !known(&self.zone) && !known(&self.region) {
            return 0; // where this client runs is unknown: no preference
        }
        if same(&self.zone, &ep.zone) {
            0
        } else if same(&self.region, &ep.region) {
            1
        } else {
            2
        }
    }
}

/// What a balancer picks from: endpoints sorted by level, their cumulative weights, and
/// where each level ends.
pub trait Candidates {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn state(&self, i: usize) -> &EndpointState;
    /// `cumulative(i)` = the sum of the weights of endpoints `0..=i`.
    fn cumulative(&self, i: usize) -> u64;
    /// `ends[l]`: one past the last endpoint of level `l` (levels are contiguous).
    fn ends(&self) -> &[usize; LEVELS];
}

/// The choices of one request: the endpoints it already tried (skipped while others are
/// left).
#[derive(Debug, Default, Clone)]
pub struct Tried {
    list: [usize; 16],
    len: usize,
}

impl Tried {
    pub fn add(&mut self, i: usize) {
        if self.len < self.list.len() {
            self.list[self.len] = i;
            self.len += 1;
        }
    }

    pub fn contains(&self, i: usize) -> bool {
        self.list[..self.len].contains(&i)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// How the locality levels are chosen.
#[derive(Debug, Clone, Copy)]
pub struct LevelPolicy {
    pub enabled: bool,
    pub failover_below: u32,
    pub spill_across_clouds: bool,
}

/// Picks an endpoint for one request (or connection).
pub fn pick<C: Candidates>(
    c: &C,
    balancer: &BalancerState,
    algorithm: Algorithm,
    levels: LevelPolicy,
    tried: &Tried,
) -> Option<usize> {
    let n = c.len();
    if n == 0 {
        return None;
    }
    let now = now_ns();
    let end = candidates_end(c, balancer, levels, now);
    let usable = |i: usize| !tried.contains(i) && !c.state(i).ejected(now);
    let chosen = match algorithm {
        Algorithm::RoundRobin => round_robin(c, balancer, end, &usable),
        Algorithm::PeakEwma | Algorithm::LeastRequest => {
            let a = draw(c, end, &usable);
            let b = a.and_then(|a| draw_other(c, end, &usable, a));
            match (a, b) {
                (Some(a), Some(b)) if a != b => {
                    let mean = balancer.mean_latency();
                    let cost = |i: usize| match algorithm {
                        Algorithm::LeastRequest => c.state(i).load() as f64 + 1.0,
                        _ => c.state(i).cost(now, mean),
                    };
                    Some(if cost(b) < cost(a) { b } else { a })
                }
                (a, b) => a.or(b),
            }
        }
    };
    // Nothing usable among the candidates (all tried or ejected): the first usable endpoint
    // anywhere, then one not tried (an ejected endpoint beats no answer), then any.
    chosen
        .or_else(|| (0..n).find(|&i| usable(i)))
        .or_else(|| (0..n).find(|&i| !tried.contains(i)))
}

/// One past the last endpoint that may be picked now: the levels in use.
fn candidates_end<C: Candidates>(
    c: &C,
    balancer: &BalancerState,
    levels: LevelPolicy,
    now: u64,
) -> usize {
    if !levels.enabled {
        return c.len();
    }
    let (depth, at) = balancer.depth();
    let depth = match now.saturating_sub(at) < DEPTH_REFRESH {
        true => depth,
        false => {
            let d = compute_depth(c, levels, now);
            balancer.set_depth(d, now);
            d
        }
    };
    c.ends()[depth.min(LEVELS - 1)]
}

/// The deepest level in use: levels are added, nearest first, until one has at least
/// `failover_below` percent of its endpoints healthy; another cloud only when nothing nearer
/// is healthy (unless spilling across clouds).
pub fn compute_depth<C: Candidates>(c: &C, levels: LevelPolicy, now: u64) -> usize {
    let ends = c.ends();
    let mut start = 0;
    let mut healthy_so_far = 0;
    let mut last_nonempty = 0;
    for (level, &end) in ends.iter().enumerate() {
        let total = end - start;
        if total > 0 {
            if level == OTHER_CLOUD && !levels.spill_across_clouds && healthy_so_far > 0 {
                return last_nonempty;
            }
            let healthy = (start..end).filter(|&i| !c.state(i).ejected(now)).count();
            healthy_so_far += healthy;
            last_nonempty = level;
            if healthy > 0 && healthy * 100 >= total * levels.failover_below as usize {
                return level;
            }
        }
        start = end;
    }
    LEVELS - 1
}

/// A weighted random endpoint among `0..end` that is usable, if one is found in a few draws.
fn draw<C: Candidates>(c: &C, end: usize, usable: &impl Fn(usize) -> bool) -> Option<usize> {
    if end == 0 {
        return None;
    }
    let total = c.cumulative(end - 1);
    for _ in 0..REDRAWS {
        let i = match total {
            0 => (crate::http::headers::random() % end as u64) as usize,
            _ => by_weight(c, end, crate::http::headers::random() % total),
        };
        if usable(i) {
            return Some(i);
        }
    }
    None
}

/// Like [`draw`], among the endpoints other than `a` (the second of two choices must be
/// another endpoint: with two endpoints, drawing the same one twice would hand a slow one a
/// quarter of the requests).
fn draw_other<C: Candidates>(
    c: &C,
    end: usize,
    usable: &impl Fn(usize) -> bool,
    a: usize,
) -> Option<usize> {
    if end < 2 || a >= end {
        return None;
    }
    let total = c.cumulative(end - 1);
    let below = if a == 0 { 0 } else { c.cumulative(a - 1) };
    let weight = c.cumulative(a) - below;
    for _ in 0..REDRAWS {
        let i = match total.checked_sub(weight) {
            Some(rest) if rest > 0 => {
                let mut point = crate::http::headers::random() % rest;
                if point >= below {
                    point += weight;
                }
                by_weight(c, end, point)
            }
            _ => {
                let i = (crate::http::headers::random() % (end as u64 - 1)) as usize;
                i + usize::from(i >= a)
            }
        };
        if i != a && usable(i) {
            return Some(i);
        }
    }
    None
}

/// The endpoint whose weight range holds `point` (`point < cumulative(end - 1)`).
fn by_weight<C: Candidates>(c: &C, end: usize, point: u64) -> usize {
    let (mut lo, mut hi) = (0, end - 1);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if c.cumulative(mid) > point {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo
}

/// Weighted round robin: the counter walks the weight ranges in turn; an unusable endpoint
/// passes its turn to the next usable one.
fn round_robin<C: Candidates>(
    c: &C,
    balancer: &BalancerState,
    end: usize,
    usable: &impl Fn(usize) -> bool,
) -> Option<usize> {
    if end == 0 {
        return None;
    }
    let total = c.cumulative(end - 1);
    let turn = balancer.rr.fetch_add(1, Ordering::Relaxed) as u64;
    let start = match total {
        0 => (turn % end as u64) as usize,
        _ => by_weight(c, end, turn % total),
    };
    (0..end).map(|k| (start + k) % end).find(|&i| usable(i))
}

/// Tries `attempt` on each index in `order` until one succeeds. Returns the winning index
/// and its value, or the last error (`None` when `order` was empty).
pub async fn first_success<T, E, F, Fut>(
    order: impl Iterator<Item = usize>,
    mut attempt: F,
) -> Result<(usize, T), Option<E>>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut last = None;
    for i in order {
        match attempt(i).await {
            Ok(v) => return Ok((i, v)),
            Err(e) => last = Some(e),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Endpoints for a unit test: (level, weight) each.
    struct Eps {
        states: Vec<Arc<EndpointState>>,
        cumulative: Vec<u64>,
        ends: [usize; LEVELS],
    }

    impl Eps {
        fn new(spec: &[(usize, u64)]) -> Eps {
            let mut ends = [0; LEVELS];
            let mut sum = 0;
            let mut cumulative = Vec::new();
            for (i, &(level, w)) in spec.iter().enumerate() {
                sum += w;
                cumulative.push(sum);
                for e in ends.iter_mut().skip(level) {
                    *e = i + 1;
                }
            }
            Eps {
                states: spec.iter().map(|_| Arc::default()).collect(),
                cumulative,
                ends,
            }
        }
    }

    impl Candidates for Eps {
        fn len(&self) -> usize {
            self.states.len()
        }
        fn state(&self, i: usize) -> &EndpointState {
            &self.states[i]
        }
        fn cumulative(&self, i: usize) -> u64 {
            self.cumulative[i]
        }
        fn ends(&self) -> &[usize; LEVELS] {
            &self.ends
        }
    }

    const LOCAL: LevelPolicy = LevelPolicy {
        enabled: true,
        failover_below: 70,
        spill_across_clouds: false,
    };

    fn shares(eps: &Eps, b: &BalancerState, alg: Algorithm, n: usize) -> Vec<usize> {
        let mut counts = vec![0; eps.len()];
        for _ in 0..n {
            let i = pick(eps, b, alg, LOCAL, &Tried::default()).unwrap();
            counts[i] += 1;
        }
        counts
    }

    #[test]
    fn weights_are_honoured_by_every_algorithm() {
        for alg in Algorithm::ALL {
            let eps = Eps::new(&[(0, 3), (0, 1)]);
            let b = BalancerState::default();
            let c = shares(&eps, &b, alg, 4000);
            // 3:1, within a few percent (P2C with equal costs keeps the draws' proportions
            // only roughly: the first of two equal draws wins).
            let share = c[0] as f64 / 4000.0;
            assert!((0.70..=0.95).contains(&share), "{alg:?}: {c:?}");
        }
        let eps = Eps::new(&[(0, 3), (0, 1)]);
        let b = BalancerState::default();
        assert_eq!(shares(&eps, &b, Algorithm::RoundRobin, 4000), [3000, 1000]);
    }

    #[test]
    fn peak_ewma_avoids_a_slow_endpoint_and_least_request_a_busy_one() {
        let eps = Eps::new(&[(0, 1), (0, 1)]);
        let b = BalancerState::default();
        eps.states[0].observe(1_000_000, &b); // 1 ms
        eps.states[1].observe(50_000_000, &b); // 50 ms
        let c = shares(&eps, &b, Algorithm::PeakEwma, 1000);
        // The two choices are two endpoints, and the fast one always wins.
        assert_eq!(c[1], 0, "{c:?}");

        let eps = Eps::new(&[(0, 1), (0, 1)]);
        eps.states[0].in_flight.store(10, Ordering::Relaxed);
        let c = shares(&eps, &b, Algorithm::LeastRequest, 1000);
        assert_eq!(c[0], 0, "{c:?}");
    }

    #[test]
    fn a_new_endpoint_gets_the_mean_not_zero() {
        let eps = Eps::new(&[(0, 1), (0, 1)]);
        let b = BalancerState::default();
        for _ in 0..10 {
            eps.states[0].observe(10_000_000, &b);
        }
        // Endpoint 1 has no sample: its cost is the mean (10 ms), not 0, so it does not win
        // every comparison; with one request in flight on it, endpoint 0 wins.
        let now = now_ns();
        let mean = b.mean_latency();
        assert!((mean - 10_000_000.0).abs() < 1.0, "{mean}");
        let (new, seen) = (eps.states[1].cost(now, mean), eps.states[0].cost(now, mean));
        assert!((new / seen - 1.0).abs() < 1e-3, "{new} vs {seen}");
        eps.states[1].in_flight.store(1, Ordering::Relaxed);
        assert!(eps.states[1].cost(now, mean) > eps.states[0].cost(now, mean));
    }

    #[test]
    fn ejected_and_tried_endpoints_are_skipped() {
        let eps = Eps::new(&[(0, 1), (0, 1), (0, 1)]);
        let b = BalancerState::default();
        eps.states[1].eject_until(now_ns() + 60_000_000_000);
        for alg in Algorithm::ALL {
            let c = shares(&eps, &b, alg, 300);
            assert_eq!(c[1], 0, "{alg:?}: {c:?}");
            let mut tried = Tried::default();
            tried.add(0);
            for _ in 0..50 {
                assert_eq!(pick(&eps, &b, alg, LOCAL, &tried), Some(2), "{alg:?}");
            }
        }
        // Everything ejected or tried: an endpoint not tried yet still beats no answer.
        let mut tried = Tried::default();
        tried.add(0);
        tried.add(2);
        assert_eq!(pick(&eps, &b, Algorithm::PeakEwma, LOCAL, &tried), Some(1));
    }

    #[test]
    fn traffic_stays_in_zone_and_spills_over_below_the_threshold() {
        // Zone: 0..4, region: 4..6, other cloud: 6.
        let eps = Eps::new(&[(0, 1), (0, 1), (0, 1), (0, 1), (1, 1), (1, 1), (3, 1)]);
        let now = now_ns();
        assert_eq!(compute_depth(&eps, LOCAL, now), 0);
        eps.states[0].eject_until(now + 60_000_000_000);
        // 3 of 4 healthy = 75% >= 70: still local.
        assert_eq!(compute_depth(&eps, LOCAL, now), 0);
        eps.states[1].eject_until(now + 60_000_000_000);
        // 50%: the region joins.
        assert_eq!(compute_depth(&eps, LOCAL, now), 1);
        for i in 2..6 {
            eps.states[i].eject_until(now + 60_000_000_000);
        }
        // Nothing healthy nearer: the other cloud.
        assert_eq!(compute_depth(&eps, LOCAL, now), 3);
        // One healthy in the region: the other cloud stays out (zone and region in use).
        eps.states[5].eject_until(0);
        assert_eq!(compute_depth(&eps, LOCAL, now), 1);
        let spill = LevelPolicy {
            spill_across_clouds: true,
            ..LOCAL
        };
        assert_eq!(compute_depth(&eps, spill, now), 3);

        // Picks follow: healthy zone, only zone endpoints.
        let eps = Eps::new(&[(0, 1), (0, 1), (1, 1), (1, 1)]);
        let b = BalancerState::default();
        let c = shares(&eps, &b, Algorithm::RoundRobin, 400);
        assert_eq!(c, [200, 200, 0, 0]);
    }

    #[test]
    fn locality_levels_rank_zone_region_cloud() {
        let at = |z: &str, r: &str, c: &str| Locality {
            zone: (!z.is_empty()).then(|| z.into()),
            region: (!r.is_empty()).then(|| r.into()),
            cloud: (!c.is_empty()).then(|| c.into()),
        };
        let me = at("a", "eu", "aws");
        assert_eq!(me.level(&at("a", "eu", "aws")), 0);
        assert_eq!(me.level(&at("b", "eu", "aws")), 1);
        assert_eq!(me.level(&at("c", "us", "aws")), 2);
        assert_eq!(me.level(&at("a", "eu", "gcp")), OTHER_CLOUD);
        assert_eq!(me.level(&at("", "", "")), 2);
        assert_eq!(at("", "", "").level(&at("b", "us", "")), 0);
    }

    #[tokio::test]
    async fn failed_attempts_move_on_until_one_succeeds() {
        let up = [false, false, true];
        let got = first_success(0..3, |i| {
            let ok = up[i];
            async move {
                if ok {
                    Ok(i * 10)
                } else {
                    Err(i)
                }
            }
        })
        .await;
        assert_eq!(got, Ok((2, 20)));
        let none: Result<(usize, ()), Option<usize>> =
            first_success(0..0, |i| async move { Err(i) }).await;
        assert_eq!(none, Err(None));
    }
}
