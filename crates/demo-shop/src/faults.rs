//! Faults an app can be told to have, for the demo, the tests and the benchmarks: answer a
//! share of requests with 503 (gRPC: `UNAVAILABLE`), and delay a share of them. Set by
//! flags at start and changed at run time through `/admin/faults`; `/admin/stats` counts the
//! requests served.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The app's faults, and how many requests it served. Rates are stored as parts per
/// million, so that they can change while requests come.
#[derive(Debug, Default)]
pub struct Faults {
    fail_ppm: AtomicU64,
    delay_ms: AtomicU64,
    delay_ppm: AtomicU64,
    served: AtomicU64,
    failed: AtomicU64,
    delayed: AtomicU64,
    seed: AtomicU64,
}

/// What to do with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub delay: Option<Duration>,
    pub fail: bool,
}

impl Faults {
    pub fn new() -> Faults {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()) << 32;
        Faults {
            seed: AtomicU64::new(seed | 1),
            ..Faults::default()
        }
    }

    /// Applies one `name=value` setting (a flag without its dashes, or a query parameter).
    pub fn set(&self, name: &str, value: &str) -> Result<(), String> {
        let rate = |v: &str| match v.parse::<f64>() {
            Ok(r) if (0.0..=1.0).contains(&r) => Ok((r * 1e6).round() as u64),
            _ => Err(format!("{name}: {v:?} is not a rate between 0 and 1")),
        };
        match name {
            "fail-rate" => self.fail_ppm.store(rate(value)?, Ordering::Relaxed),
            "delay-rate" => self.delay_ppm.store(rate(value)?, Ordering::Relaxed),
            "delay-ms" => {
                let ms = value
                    .parse()
                    .map_err(|_| format!("delay-ms: {value:?} is not a number of milliseconds"))?;
                self.delay_ms.store(ms, Ordering::Relaxed);
            }
            _ => return Err(format!("unknown fault setting {name:?}")),
        }
        Ok(())
    }

    /// Applies a query string of settings (`fail-rate=0.5&delay-ms=50`), all or none.
    pub fn set_query(&self, query: &str) -> Result<(), String> {
        let pairs: Vec<(&str, &str)> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| p.split_once('=').unwrap_or((p, "")))
            .collect();
        let check = Faults::default();
        for (k, v) in &pairs {
            check.set(k, v)?;
        }
        for (k, v) in pairs {
            self.set(k, v)?;
        }
        Ok(())
    }

    /// The next random number (xorshift; good enough to spread faults).
    fn random_ppm(&self) -> u64 {
        let mut x = self.seed.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.seed.store(x, Ordering::Relaxed);
        x % 1_000_000
    }

    /// Counts a request and decides its faults.
    pub fn decide(&self) -> Decision {
        self.served.fetch_add(1, Ordering::Relaxed);
        let delay_ms = self.delay_ms.load(Ordering::Relaxed);
        let delay = (delay_ms > 0 && self.random_ppm() < self.delay_ppm.load(Ordering::Relaxed))
            .then(|| Duration::from_millis(delay_ms));
        let fail = self.random_ppm() < self.fail_ppm.load(Ordering::Relaxed);
        if delay.is_some() {
            self.delayed.fetch_add(1, Ordering::Relaxed);
        }
        if fail {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        Decision { delay, fail }
    }

    pub fn settings(&self) -> serde_json::Value {
        let rate = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 / 1e6;
        serde_json::json!({
            "failRate": rate(&self.fail_ppm),
            "delayMs": self.delay_ms.load(Ordering::Relaxed),
            "delayRate": rate(&self.delay_ppm),
        })
    }

    pub fn stats(&self) -> serde_json::Value {
        serde_json::json!({
            "served": self.served.load(Ordering::Relaxed),
            "failed": self.failed.load(Ordering::Relaxed),
            "delayed": self.delayed.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_decide_about_their_share() {
        let f = Faults::new();
        f.set_query("fail-rate=0.25&delay-ms=5&delay-rate=0.5")
            .unwrap();
        let n = 20_000;
        let (mut failed, mut delayed) = (0, 0);
        for _ in 0..n {
            let d = f.decide();
            failed += usize::from(d.fail);
            delayed += usize::from(d.delay == Some(Duration::from_millis(5)));
        }
        assert!((4_500..5_500).contains(&failed), "{failed} of {n} failed");
        assert!(
            (9_400..10_600).contains(&delayed),
            "{delayed} of {n} delayed"
        );
        assert_eq!(f.stats()["served"], n);
    }

    #[test]
    fn bad_settings_change_nothing() {
        let f = Faults::new();
        f.set_query("fail-rate=0.5").unwrap();
        assert!(f.set_query("delay-ms=10&fail-rate=2").is_err());
        assert!(f.set("colour", "1").is_err());
        assert_eq!(f.settings()["failRate"], 0.5);
        assert_eq!(f.settings()["delayMs"], 0);
        // Without a delay rate a delay applies to no request; the flag sets 1 (see main).
        assert_eq!(f.decide().delay, None);
    }
}
