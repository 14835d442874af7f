//! A service's resilience settings as users write them (`muon_core`'s TrafficPolicy fields and
//! an XBackendTrafficPolicy's `retryConstraint`) to the `muon.v1.Traffic` the data plane gets,
//! defaults filled in. The control plane converts objects with it, and the proxy converts a
//! `--table-file` entry's `traffic` with it, so both paths mean the same.

use crate::v1;
use muon_core::resource::traffic::{Algorithm, RetryConstraint, Traffic};

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `traffic` (validated) and `retry` as the data plane's resource.
pub fn to_proto(traffic: &Traffic, retry: Option<&RetryConstraint>) -> v1::Traffic {
    let algorithm = traffic
        .load_balancer
        .as_ref()
        .map_or(Algorithm::default(), |lb| lb.algorithm());
    let locality = traffic.locality.clone().unwrap_or_default();
    let limits = traffic
        .circuit_breaker
        .as_ref()
        .map(|c| c.resolve())
        .unwrap_or_default();
    let budget = retry.map(RetryConstraint::budget).unwrap_or_default();
    v1::Traffic {
        algorithm: algorithm.as_str().to_string(),
        locality: Some(v1::LocalityPolicy {
            disabled: locality.enabled == Some(false),
            failover_below: locality.failover_below(),
            spill_across_clouds: locality.spill_across_clouds.unwrap_or(false),
        }),
        outlier_detection: traffic.outlier_detection.as_ref().map(|o| {
            let o = o.resolve();
            v1::OutlierDetection {
                consecutive_5xx: o.consecutive_5xx,
                consecutive_gateway_errors: o.consecutive_gateway_errors,
                consecutive_connect_failures: o.consecutive_connect_failures,
                base_ejection_ms: ms(o.base_ejection_time),
                max_ejection_ms: ms(o.max_ejection_time),
                max_ejection_percent: o.max_ejection_percent,
            }
        }),
        circuit_breaker: Some(v1::CircuitBreaker {
            max_connections: limits.max_connections,
            max_pending_requests: limits.max_pending_requests,
            max_requests: limits.max_requests,
        }),
        faults: traffic.faults.as_ref().map(|f| {
            let pct = |p: i64| p.clamp(0, 100) as u32;
            v1::Faults {
                delay_percent: f.delay.as_ref().map_or(0, |d| pct(d.percent)),
                delay_ms: f.delay.as_ref().map_or(0, |d| {
                    muon_core::resource::parse_duration(&d.duration).map_or(0, ms)
                }),
                abort_percent: f.abort.as_ref().map_or(0, |a| pct(a.percent)),
                abort_status: f
                    .abort
                    .as_ref()
                    .map_or(0, |a| a.status.clamp(0, 599) as u32),
                routes: f.routes.clone(),
            }
        }),
        retry_budget: Some(v1::RetryBudget {
            percent: budget.percent,
            interval_ms: ms(budget.interval),
            min_count: budget.min_count,
            min_interval_ms: ms(budget.min_interval),
        }),
    }
}
