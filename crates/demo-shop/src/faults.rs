//! Faults an app injects into its own answers, so the demo can make one replica fail or slow
//! down without a restart: a share of requests answered 503 (gRPC: `UNAVAILABLE`), a share
//! delayed. `--fail-rate`, `--delay-ms` and `--delay-rate` set them at start;
//! `/admin/faults?fail-rate=..&delay-ms=..&delay-rate=..` changes them while the app runs and
//! `/admin/stats` counts what was served. The admin paths are never faulted or counted.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What the app does to its answers.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Settings {
    /// The share of requests answered with an error, 0 to 1.
    pub fail_rate: f64,
    /// Latency added to the delayed requests.
    pub delay_ms: u64,
    /// The share of requests delayed, 0 to 1.
    pub delay_rate: f64,
}

/// Changes to [`Settings`], from flags or a query string: only what was named changes.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Changes {
    fail_rate: Option<f64>,
    delay_ms: Option<u64>,
    delay_rate: Option<f64>,
}

impl Changes {
    /// Sets `key` (`fail-rate`, `delay-ms` or `delay-rate`); `Ok(false)` when the key is not
    /// one of them.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool, String> {
        let rate = |v: &str| match v.parse::<f64>() {
            Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
            _ => Err(format!("{key} must be a fraction from 0 to 1, got {v:?}")),
        };
        match key {
            "fail-rate" => self.fail_rate = Some(rate(value)?),
            "delay-rate" => self.delay_rate = Some(rate(value)?),
            "delay-ms" => {
                let ms = value.parse::<u64>().map_err(|_| {
                    format!("{key} must be a whole number of milliseconds, got {value:?}")
                })?;
                // Bounded, so a typo cannot park a request for hours.
                if ms > 60_000 {
                    return Err(format!("{key} must be at most 60000, got {ms}"));
                }
                self.delay_ms = Some(ms);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// `fail-rate=0.5&delay-ms=50`; every problem at once.
    pub fn from_query(query: &str) -> Result<Changes, String> {
        let mut changes = Changes::default();
        let mut problems = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match changes.set(key, value) {
                Ok(true) => {}
                Ok(false) => problems.push(format!(
                    "unknown parameter {key:?} (expected fail-rate, delay-ms, delay-rate)"
                )),
                Err(e) => problems.push(e),
            }
        }
        match problems.is_empty() {
            true => Ok(changes),
            false => Err(problems.join("; ")),
        }
    }

    /// `s` with these changes. A delay named without a rate delays every request, as
    /// `--delay-ms` alone does.
    pub fn apply(&self, mut s: Settings) -> Settings {
        if let Some(r) = self.fail_rate {
            s.fail_rate = r;
        }
        if let Some(ms) = self.delay_ms {
            s.delay_ms = ms;
            s.delay_rate = 1.0;
        }
        if let Some(r) = self.delay_rate {
            s.delay_rate = r;
        }
        s
    }
}

/// What to do to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Decision {
    pub fail: bool,
    pub delay: Option<Duration>,
}

/// The decision for one request, given two uniform draws in `0..1`.
pub fn decide(s: &Settings, fail_draw: f64, delay_draw: f64) -> Decision {
    Decision {
        fail: fail_draw < s.fail_rate,
        delay: (s.delay_ms > 0 && delay_draw < s.delay_rate)
            .then(|| Duration::from_millis(s.delay_ms)),
    }
}

/// The app's faults and counters, shared by its connections (atomics: no lock on the
/// request path).
#[derive(Debug)]
pub struct Faults {
    fail_rate: AtomicU64,
    delay_ms: AtomicU64,
    delay_rate: AtomicU64,
    rng: AtomicU64,
    served: AtomicU64,
    failed: AtomicU64,
    delayed: AtomicU64,
}

impl Faults {
    pub fn new(s: Settings) -> Faults {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()).rotate_left(32);
        let f = Faults {
            fail_rate: AtomicU64::new(0),
            delay_ms: AtomicU64::new(0),
            delay_rate: AtomicU64::new(0),
            rng: AtomicU64::new(seed),
            served: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            delayed: AtomicU64::new(0),
        };
        f.set(s);
        f
    }

    pub fn settings(&self) -> Settings {
        Settings {
            fail_rate: f64::from_bits(self.fail_rate.load(Ordering::Relaxed)),
            delay_ms: self.delay_ms.load(Ordering::Relaxed),
            delay_rate: f64::from_bits(self.delay_rate.load(Ordering::Relaxed)),
        }
    }

    pub fn set(&self, s: Settings) {
        self.fail_rate
            .store(s.fail_rate.to_bits(), Ordering::Relaxed);
        self.delay_ms.store(s.delay_ms, Ordering::Relaxed);
        self.delay_rate
            .store(s.delay_rate.to_bits(), Ordering::Relaxed);
    }

    /// Decides for one request, and counts it.
    pub fn next(&self) -> Decision {
        self.served.fetch_add(1, Ordering::Relaxed);
        let s = self.settings();
        if s.fail_rate == 0.0 && s.delay_ms == 0 {
            return Decision::default();
        }
        let d = decide(&s, self.draw(), self.draw());
        if d.fail {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        if d.delay.is_some() {
            self.delayed.fetch_add(1, Ordering::Relaxed);
        }
        d
    }

    /// A uniform draw in `0..1` (splitmix64 over a shared counter: no dependency, good
    /// enough for picking which requests fail).
    fn draw(&self) -> f64 {
        let mut z = self
            .rng
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    fn settings_json(&self) -> serde_json::Value {
        let s = self.settings();
        json!({"failRate": s.fail_rate, "delayMs": s.delay_ms, "delayRate": s.delay_rate})
    }

    /// The answer to `/admin/faults` and `/admin/stats` (any method), or `None` for every
    /// other path.
    pub fn admin(&self, path: &str, query: Option<&str>) -> Option<Response<Full<Bytes>>> {
        let pod = super::pod();
        let (status, body) = match path {
            "/admin/faults" => match Changes::from_query(query.unwrap_or("")) {
                Ok(c) => {
                    self.set(c.apply(self.settings()));
                    (
                        StatusCode::OK,
                        json!({"pod": pod, "faults": self.settings_json()}),
                    )
                }
                Err(e) => (StatusCode::BAD_REQUEST, json!({"pod": pod, "error": e})),
            },
            "/admin/stats" => (
                StatusCode::OK,
                json!({
                    "pod": pod,
                    "requests": self.served.load(Ordering::Relaxed),
                    "failed": self.failed.load(Ordering::Relaxed),
                    "delayed": self.delayed.load(Ordering::Relaxed),
                    "faults": self.settings_json(),
                }),
            ),
            _ => return None,
        };
        Some(super::reply(status, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delay_without_a_rate_delays_every_request() {
        let mut c = Changes::default();
        assert_eq!(c.set("delay-ms", "50"), Ok(true));
        let s = c.apply(Settings::default());
        assert_eq!(s.delay_rate, 1.0);
        assert_eq!(
            decide(&s, 0.99, 0.999).delay,
            Some(Duration::from_millis(50))
        );
    }

    #[test]
    fn a_named_rate_wins_over_the_delays_default() {
        let c = Changes::from_query("delay-ms=20&delay-rate=0.25").unwrap();
        let s = c.apply(Settings::default());
        assert_eq!((s.delay_ms, s.delay_rate), (20, 0.25));
        assert_eq!(decide(&s, 0.0, 0.3).delay, None);
        assert!(decide(&s, 0.0, 0.2).delay.is_some());
    }

    #[test]
    fn only_named_settings_change() {
        let before = Settings {
            fail_rate: 0.5,
            delay_ms: 10,
            delay_rate: 0.5,
        };
        let after = Changes::from_query("fail-rate=0").unwrap().apply(before);
        assert_eq!(
            after,
            Settings {
                fail_rate: 0.0,
                ..before
            }
        );
        assert_eq!(Changes::from_query("").unwrap().apply(before), before);
    }

    #[test]
    fn bad_values_are_refused_all_at_once() {
        let e = Changes::from_query("fail-rate=1.5&delay-ms=-3&color=red").unwrap_err();
        assert!(e.contains("fail-rate must be a fraction"), "{e}");
        assert!(e.contains("delay-ms must be a whole number"), "{e}");
        assert!(e.contains("unknown parameter \"color\""), "{e}");
        assert!(Changes::from_query("delay-ms=3600000").is_err());
    }

    #[test]
    fn the_fail_rate_is_the_share_of_failed_requests() {
        let f = Faults::new(Settings {
            fail_rate: 0.3,
            ..Settings::default()
        });
        let n = 20_000;
        let failed = (0..n).filter(|_| f.next().fail).count();
        let share = failed as f64 / n as f64;
        assert!((0.27..0.33).contains(&share), "{share}");
        let none = Faults::new(Settings::default());
        assert!((0..1000).all(|_| none.next() == Decision::default()));
        let all = Faults::new(Settings {
            fail_rate: 1.0,
            ..Settings::default()
        });
        assert!((0..1000).all(|_| all.next().fail));
    }
}
