//! Endpoint choice: round robin over a service's endpoints, falling through to the next one
//! when a connect fails, until every endpoint was tried once.
//!
//! The counter is one atomic per service port in the current table; picking an endpoint
//! never locks and never allocates.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    /// The order in which to try `len` endpoints for one connection: starts at the next
    /// endpoint in turn and wraps around, visiting each index exactly once.
    pub fn order(&self, len: usize) -> impl Iterator<Item = usize> {
        let start = match len {
            0 => 0,
            _ => self.next.fetch_add(1, Ordering::Relaxed) % len,
        };
        (0..len).map(move |i| (start + i) % len)
    }
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

    #[test]
    fn round_robin_visits_each_endpoint_in_turn() {
        let rr = RoundRobin::default();
        let firsts: Vec<usize> = (0..6).filter_map(|_| rr.order(3).next()).collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
        assert_eq!(rr.order(3).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(rr.order(3).collect::<Vec<_>>(), [1, 2, 0]);
        assert_eq!(rr.order(0).count(), 0);
    }

    #[tokio::test]
    async fn failed_endpoints_are_skipped_until_one_connects() {
        let rr = RoundRobin::default();
        let up = [false, false, true];
        let mut tried = Vec::new();
        let got = first_success(rr.order(up.len()), |i| {
            tried.push(i);
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
        assert_eq!(tried, [0, 1, 2]);

        // The next connection starts one further along and finds the live one first.
        tried.clear();
        let got = first_success(rr.order(up.len()), |i| {
            tried.push(i);
            let ok = up[i];
            async move {
                if ok {
                    Ok(i)
                } else {
                    Err(i)
                }
            }
        })
        .await;
        assert_eq!(got, Ok((2, 2)));
        assert_eq!(tried, [1, 2]);
    }

    #[tokio::test]
    async fn all_endpoints_down_returns_the_last_error() {
        let rr = RoundRobin::default();
        let got: Result<(usize, ()), _> =
            first_success(rr.order(2), |i| async move { Err(i) }).await;
        assert_eq!(got, Err(Some(1)));
        let none: Result<(usize, ()), Option<usize>> =
            first_success(rr.order(0), |i| async move { Err(i) }).await;
        assert_eq!(none, Err(None));
    }
}
