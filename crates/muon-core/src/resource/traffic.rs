//! Resilience: how a client's sidecar spreads, retries and sheds requests to a service.
//!
//! - `HTTPRoute` `spec.rules[].retry` (the Gateway API's `HTTPRouteRetry`): which answers are
//!   retried, how often, with what backoff ([`Retry`], on the route's rule).
//! - `gateway.networking.x-k8s.io/v1alpha1` `XBackendTrafficPolicy`: the retry budget of a
//!   service ([`BackendTrafficPolicySpec`]).
//! - `muon.io/v1alpha1` `TrafficPolicy`: what no standard covers — the balancing algorithm,
//!   locality failover, outlier detection, circuit breaking and fault injection
//!   ([`TrafficPolicySpec`]).
//!
//! Every field has a default, so a policy names only what it changes. Validation names the
//! field and the reason, as for every kind.

use super::{parse_duration, Check};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The Gateway API's experimental group and version (XBackendTrafficPolicy).
pub const GATEWAY_X_API_VERSION: &str = "gateway.networking.x-k8s.io/v1alpha1";

/// What a policy applies to: a Service of its own namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    /// `""` (core) or `muon.io`; either names the same Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub kind: String,
    pub name: String,
}

fn validate_targets(check: &mut Check<'_>, targets: &[TargetRef]) {
    if targets.is_empty() {
        check.fail("spec.targetRefs", "needs at least one target (a Service)");
    }
    for (i, t) in targets.iter().enumerate() {
        let field = format!("spec.targetRefs[{i}]");
        if t.kind != "Service" {
            check.fail(
                format!("{field}.kind"),
                format!("must be Service, got {:?}", t.kind),
            );
        }
        if let Some(g) = t.group.as_deref() {
            if !g.is_empty() && g != super::MUON_GROUP {
                check.fail(
                    format!("{field}.group"),
                    format!("must be \"\" (core) or \"muon.io\" for a Service, got {g:?}"),
                );
            }
        }
        check.dns_label(&format!("{field}.name"), &t.name);
    }
}

/// A duration field: parsed, and within `min..=max` when given.
fn duration(check: &mut Check<'_>, field: &str, value: &str, min: Duration) -> Option<Duration> {
    match parse_duration(value) {
        Err(reason) => {
            check.fail(field, reason);
            None
        }
        Ok(d) if d < min => {
            check.fail(field, format!("must be at least {min:?}, got {value}"));
            None
        }
        Ok(d) => Some(d),
    }
}

fn percent(check: &mut Check<'_>, field: &str, value: i64) {
    if !(0..=100).contains(&value) {
        check.fail(
            field,
            format!("must be a percentage from 0 to 100, got {value}"),
        );
    }
}

fn non_negative(check: &mut Check<'_>, field: &str, value: i64) {
    if value < 0 {
        check.fail(field, format!("must not be negative, got {value}"));
    }
}

// ---------------------------------------------------------------------------------------------
// HTTPRoute retry

/// `spec.rules[].retry`: retry an answer with one of `codes` up to `attempts` times, waiting
/// `backoff` (with jitter, doubling) between tries. Connect failures are always retried,
/// whatever the route says.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retry {
    /// HTTP statuses to retry (400–599). 503 also retries gRPC `UNAVAILABLE`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<i64>,
    /// Retries after the first try (default 2, at most 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<i64>,
    /// The first wait between tries (default 25ms); each next wait doubles, up to 10 times it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
}

pub const DEFAULT_RETRY_ATTEMPTS: u32 = 2;
pub const MAX_RETRY_ATTEMPTS: i64 = 10;
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(25);

impl Retry {
    pub fn attempts(&self) -> u32 {
        self.attempts.map_or(DEFAULT_RETRY_ATTEMPTS, |a| {
            a.clamp(0, MAX_RETRY_ATTEMPTS) as u32
        })
    }

    pub fn backoff(&self) -> Duration {
        self.backoff
            .as_deref()
            .and_then(|b| parse_duration(b).ok())
            .unwrap_or(DEFAULT_RETRY_BACKOFF)
    }
}

pub(super) fn validate_retry(check: &mut Check<'_>, field: &str, r: &Retry) {
    for (i, c) in r.codes.iter().enumerate() {
        if !(400..=599).contains(c) {
            check.fail(
                format!("{field}.codes[{i}]"),
                format!("must be an HTTP status from 400 to 599, got {c}"),
            );
        }
    }
    if let Some(a) = r.attempts {
        if !(0..=MAX_RETRY_ATTEMPTS).contains(&a) {
            check.fail(
                format!("{field}.attempts"),
                format!("must be from 0 to {MAX_RETRY_ATTEMPTS}, got {a}"),
            );
        }
    }
    if let Some(b) = &r.backoff {
        duration(check, &format!("{field}.backoff"), b, Duration::ZERO);
    }
}

// ---------------------------------------------------------------------------------------------
// XBackendTrafficPolicy

/// `XBackendTrafficPolicy` spec (Gateway API, experimental): the retry budget of the target
/// services. Other fields of the upstream type (session persistence) are not supported and
/// are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendTrafficPolicySpec {
    pub target_refs: Vec<TargetRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_constraint: Option<RetryConstraint>,
}

/// Retries may add at most `budget.percent` of the requests of the last `budget.interval`,
/// but `minRetryRate` retries are always allowed.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryConstraint {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retry_rate: Option<RetryRate>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Budget {
    /// Default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<i64>,
    /// Default 10s; 1s to 1h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryRate {
    /// Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<i64>,
    /// Default 1s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
}

/// A retry budget, defaults filled in (the Gateway API's: 20% over 10s, 3 per second).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryBudget {
    pub percent: u32,
    pub interval: Duration,
    pub min_count: u32,
    pub min_interval: Duration,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            percent: 20,
            interval: Duration::from_secs(10),
            min_count: 3,
            min_interval: Duration::from_secs(1),
        }
    }
}

impl RetryConstraint {
    /// The budget this constraint sets (valid once validated).
    pub fn budget(&self) -> RetryBudget {
        let d = RetryBudget::default();
        let dur = |s: Option<&String>, def| s.and_then(|s| parse_duration(s).ok()).unwrap_or(def);
        let b = self.budget.clone().unwrap_or_default();
        let m = self.min_retry_rate.clone().unwrap_or_default();
        RetryBudget {
            percent: b.percent.map_or(d.percent, |p| p.clamp(0, 100) as u32),
            interval: dur(b.interval.as_ref(), d.interval),
            min_count: m
                .count
                .map_or(d.min_count, |c| c.clamp(0, u32::MAX.into()) as u32),
            min_interval: dur(m.interval.as_ref(), d.min_interval),
        }
    }
}

pub(super) fn validate_backend_traffic(check: &mut Check<'_>, s: &BackendTrafficPolicySpec) {
    validate_targets(check, &s.target_refs);
    let Some(rc) = &s.retry_constraint else {
        return;
    };
    let f = "spec.retryConstraint";
    if let Some(b) = &rc.budget {
        if let Some(p) = b.percent {
            percent(check, &format!("{f}.budget.percent"), p);
        }
        if let Some(i) = &b.interval {
            let field = format!("{f}.budget.interval");
            if let Some(d) = duration(check, &field, i, Duration::from_secs(1)) {
                if d > Duration::from_secs(3600) {
                    check.fail(field, format!("must be at most 1h, got {i}"));
                }
            }
        }
    }
    if let Some(m) = &rc.min_retry_rate {
        if let Some(c) = m.count {
            non_negative(check, &format!("{f}.minRetryRate.count"), c);
        }
        if let Some(i) = &m.interval {
            duration(
                check,
                &format!("{f}.minRetryRate.interval"),
                i,
                Duration::from_millis(1),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TrafficPolicy

/// `muon.io/v1alpha1` `TrafficPolicy` spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicySpec {
    pub target_refs: Vec<TargetRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<Locality>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faults: Option<Faults>,
}

impl TrafficPolicySpec {
    /// What the policy sets (serde cannot flatten into a struct that refuses unknown
    /// fields, so the fields are listed in both).
    pub fn traffic(&self) -> Traffic {
        Traffic {
            load_balancer: self.load_balancer.clone(),
            locality: self.locality.clone(),
            outlier_detection: self.outlier_detection.clone(),
            circuit_breaker: self.circuit_breaker.clone(),
            faults: self.faults.clone(),
        }
    }
}

/// Everything a TrafficPolicy sets for a service (also the `traffic` of a `--table-file`
/// service entry).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Traffic {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<Locality>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faults: Option<Faults>,
}

/// The balancing algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Algorithm {
    /// Power of two choices over a peak-sensitive moving average of latency, times the
    /// requests in flight.
    #[default]
    PeakEwma,
    RoundRobin,
    /// Power of two choices over the requests in flight.
    LeastRequest,
}

impl Algorithm {
    pub const ALL: [Algorithm; 3] = [
        Algorithm::PeakEwma,
        Algorithm::RoundRobin,
        Algorithm::LeastRequest,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::PeakEwma => "PeakEWMA",
            Algorithm::RoundRobin => "RoundRobin",
            Algorithm::LeastRequest => "LeastRequest",
        }
    }

    pub fn parse(s: &str) -> Option<Algorithm> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    /// `PeakEWMA` (default), `RoundRobin` or `LeastRequest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
}

impl LoadBalancer {
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
            .as_deref()
            .and_then(Algorithm::parse)
            .unwrap_or_default()
    }
}

/// Locality-aware routing: endpoints in the client's zone first, then its region, then its
/// cloud, then other clouds.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Locality {
    /// Below this percentage of healthy endpoints in the nearest level, the next level is
    /// used too (default 70; 0 keeps traffic local while one endpoint is healthy there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_below: Option<i64>,
    /// `false` (default): endpoints in another cloud are used only when nothing nearer is
    /// healthy. `true`: they are one more level, spilled into like the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spill_across_clouds: Option<bool>,
    /// `false` turns locality preference off: every endpoint is one level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

pub const DEFAULT_FAILOVER_BELOW: u32 = 70;

impl Locality {
    pub fn failover_below(&self) -> u32 {
        self.failover_below
            .map_or(DEFAULT_FAILOVER_BELOW, |p| p.clamp(0, 100) as u32)
    }
}

/// Passive health checking: an endpoint that fails in a row is taken out of the rotation for
/// a while. A threshold of 0 (or absent) turns that check off; no `outlierDetection`, no
/// ejections.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// Answers 500–599 in a row (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive5xx: Option<i64>,
    /// 502, 503 and 504 answers, and upstream failures, in a row (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<i64>,
    /// Failed connects in a row (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_connect_failures: Option<i64>,
    /// The first ejection's length (default 5s); the n-th is n times it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    /// The longest ejection (default 300s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_time: Option<String>,
    /// At most this share of a service's endpoints is ejected at once (default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<i64>,
}

/// Outlier detection with its defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outliers {
    pub consecutive_5xx: u32,
    pub consecutive_gateway_errors: u32,
    pub consecutive_connect_failures: u32,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

impl OutlierDetection {
    pub fn resolve(&self) -> Outliers {
        let n = |v: Option<i64>, d: u32| v.map_or(d, |v| v.clamp(0, u32::MAX.into()) as u32);
        let t = |v: &Option<String>, d: u64| {
            v.as_deref()
                .and_then(|s| parse_duration(s).ok())
                .unwrap_or(Duration::from_secs(d))
        };
        Outliers {
            consecutive_5xx: n(self.consecutive5xx, 5),
            consecutive_gateway_errors: n(self.consecutive_gateway_errors, 3),
            consecutive_connect_failures: n(self.consecutive_connect_failures, 3),
            base_ejection_time: t(&self.base_ejection_time, 5),
            max_ejection_time: t(&self.max_ejection_time, 300),
            max_ejection_percent: n(self.max_ejection_percent, 50).min(100),
        }
    }
}

/// Limits past which the sidecar answers 503 (`x-muon-error: overloaded`) at once instead
/// of queueing. Absent: 1024 each, as Envoy's defaults.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Connections open to the service's endpoints (TCP connections; HTTP connections of
    /// the pool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<i64>,
    /// Requests sent and not yet answered (waiting for the response's headers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<i64>,
    /// Requests in flight, answers streaming included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<i64>,
}

pub const DEFAULT_CIRCUIT_LIMIT: u32 = 1024;

/// Circuit-breaker limits with defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: DEFAULT_CIRCUIT_LIMIT,
            max_pending_requests: DEFAULT_CIRCUIT_LIMIT,
            max_requests: DEFAULT_CIRCUIT_LIMIT,
        }
    }
}

impl CircuitBreaker {
    pub fn resolve(&self) -> Limits {
        let n = |v: Option<i64>| {
            v.map_or(DEFAULT_CIRCUIT_LIMIT, |v| {
                v.clamp(0, u32::MAX.into()) as u32
            })
        };
        Limits {
            max_connections: n(self.max_connections),
            max_pending_requests: n(self.max_pending_requests),
            max_requests: n(self.max_requests),
        }
    }
}

/// Faults injected into requests to the service (chaos testing), HTTP only.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Faults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<DelayFault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<AbortFault>,
    /// Only requests that matched these HTTPRoutes (or GRPCRoutes) of the same namespace;
    /// empty: every request to the service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DelayFault {
    pub percent: i64,
    pub duration: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AbortFault {
    pub percent: i64,
    /// The status answered (200–599); gRPC callers get the matching `grpc-status`.
    pub status: i64,
}

impl Traffic {
    /// Checks every field; `prefix` is where the fields sit (`spec` for a TrafficPolicy).
    pub(crate) fn validate(&self, check: &mut Check<'_>, prefix: &str) {
        if let Some(lb) = &self.load_balancer {
            if let Some(a) = lb.algorithm.as_deref() {
                if Algorithm::parse(a).is_none() {
                    check.fail(
                        format!("{prefix}.loadBalancer.algorithm"),
                        format!(
                            "unknown algorithm {a:?}; expected one of {}",
                            Algorithm::ALL.map(Algorithm::as_str).join(", ")
                        ),
                    );
                }
            }
        }
        if let Some(l) = &self.locality {
            if let Some(p) = l.failover_below {
                percent(check, &format!("{prefix}.locality.failoverBelow"), p);
            }
        }
        if let Some(o) = &self.outlier_detection {
            let f = format!("{prefix}.outlierDetection");
            for (name, v) in [
                ("consecutive5xx", o.consecutive5xx),
                ("consecutiveGatewayErrors", o.consecutive_gateway_errors),
                ("consecutiveConnectFailures", o.consecutive_connect_failures),
            ] {
                if let Some(v) = v {
                    non_negative(check, &format!("{f}.{name}"), v);
                }
            }
            let mut times = [None, None];
            for (k, (name, v)) in [
                ("baseEjectionTime", &o.base_ejection_time),
                ("maxEjectionTime", &o.max_ejection_time),
            ]
            .into_iter()
            .enumerate()
            {
                if let Some(v) = v {
                    times[k] = duration(check, &format!("{f}.{name}"), v, Duration::from_millis(1));
                }
            }
            let resolved = o.resolve();
            let base = times[0].unwrap_or(resolved.base_ejection_time);
            let max = times[1].unwrap_or(resolved.max_ejection_time);
            if times.iter().any(Option::is_some) && max < base {
                check.fail(
                    format!("{f}.maxEjectionTime"),
                    format!("must be at least baseEjectionTime ({base:?}), got {max:?}"),
                );
            }
            if let Some(p) = o.max_ejection_percent {
                percent(check, &format!("{f}.maxEjectionPercent"), p);
            }
        }
        if let Some(c) = &self.circuit_breaker {
            let f = format!("{prefix}.circuitBreaker");
            for (name, v) in [
                ("maxConnections", c.max_connections),
                ("maxPendingRequests", c.max_pending_requests),
                ("maxRequests", c.max_requests),
            ] {
                if let Some(v) = v {
                    non_negative(check, &format!("{f}.{name}"), v);
                }
            }
        }
        if let Some(faults) = &self.faults {
            let f = format!("{prefix}.faults");
            if let Some(d) = &faults.delay {
                percent(check, &format!("{f}.delay.percent"), d.percent);
                if let Some(t) = duration(
                    check,
                    &format!("{f}.delay.duration"),
                    &d.duration,
                    Duration::ZERO,
                ) {
                    if t > Duration::from_secs(3600) {
                        check.fail(
                            format!("{f}.delay.duration"),
                            format!("must be at most 1h, got {}", d.duration),
                        );
                    }
                }
            }
            if let Some(a) = &faults.abort {
                percent(check, &format!("{f}.abort.percent"), a.percent);
                if !(200..=599).contains(&a.status) {
                    check.fail(
                        format!("{f}.abort.status"),
                        format!("must be an HTTP status from 200 to 599, got {}", a.status),
                    );
                }
            }
            for (i, r) in faults.routes.iter().enumerate() {
                check.dns_label(&format!("{f}.routes[{i}]"), r);
            }
        }
    }

    /// A table file's `traffic` checked alone (messages name `service`).
    pub fn check(&self, service: &str) -> Result<(), super::Invalid> {
        let mut check = Check {
            object: service,
            problems: Vec::new(),
        };
        self.validate(&mut check, "traffic");
        match check.problems.is_empty() {
            true => Ok(()),
            false => Err(super::Invalid(check.problems)),
        }
    }
}

pub(super) fn validate_traffic_policy(check: &mut Check<'_>, s: &TrafficPolicySpec) {
    validate_targets(check, &s.target_refs);
    s.traffic().validate(check, "spec");
}

#[cfg(test)]
mod tests {
    use crate::resource::{Object, Spec};
    use serde_json::{json, Value};

    fn problems(v: Value) -> Vec<String> {
        match Object::from_json(&v, 0) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    fn issue_policy() -> Value {
        json!({
            "apiVersion": "muon.io/v1alpha1",
            "kind": "TrafficPolicy",
            "metadata": {"name": "inventory", "namespace": "shop"},
            "spec": {
                "targetRefs": [{"kind": "Service", "name": "inventory"}],
                "loadBalancer": {"algorithm": "PeakEWMA"},
                "locality": {"failoverBelow": 70},
                "outlierDetection": {
                    "consecutive5xx": 5, "consecutiveGatewayErrors": 3,
                    "consecutiveConnectFailures": 3, "baseEjectionTime": "5s",
                    "maxEjectionTime": "300s", "maxEjectionPercent": 50
                },
                "circuitBreaker": {"maxConnections": 1024, "maxPendingRequests": 1024, "maxRequests": 1024},
                "faults": {"delay": {"percent": 10, "duration": "100ms"}, "abort": {"percent": 5, "status": 503}}
            }
        })
    }

    #[test]
    fn the_issue_example_is_accepted_and_converts_with_its_values() {
        let o = Object::from_json(&issue_policy(), 0).unwrap();
        let Spec::TrafficPolicy(p) = &o.spec else {
            panic!("not a TrafficPolicy")
        };
        let t = muon_proxy_view(&p.traffic());
        assert_eq!(
            t,
            ("PeakEWMA", 70, 5, 3, 3, 5000, 300_000, 50, 1024, 10, 5, 503)
        );
        // The envelope round-trips.
        assert_eq!(Object::from_json(&o.to_json(), 0).unwrap(), o);
    }

    type View = (
        &'static str,
        u32,
        u32,
        u32,
        u32,
        u64,
        u64,
        u32,
        u32,
        i64,
        i64,
        i64,
    );

    fn muon_proxy_view(t: &crate::resource::Traffic) -> View {
        let o = t.outlier_detection.as_ref().unwrap().resolve();
        let c = t.circuit_breaker.as_ref().unwrap().resolve();
        let f = t.faults.as_ref().unwrap();
        (
            t.load_balancer.as_ref().unwrap().algorithm().as_str(),
            t.locality.as_ref().unwrap().failover_below(),
            o.consecutive_5xx,
            o.consecutive_gateway_errors,
            o.consecutive_connect_failures,
            o.base_ejection_time.as_millis() as u64,
            o.max_ejection_time.as_millis() as u64,
            o.max_ejection_percent,
            c.max_pending_requests,
            f.delay.as_ref().unwrap().percent,
            f.abort.as_ref().unwrap().percent,
            f.abort.as_ref().unwrap().status,
        )
    }

    #[test]
    fn bad_values_are_refused_with_their_field() {
        let mut v = issue_policy();
        v["spec"]["targetRefs"][0]["kind"] = json!("Deployment");
        v["spec"]["loadBalancer"]["algorithm"] = json!("Random");
        v["spec"]["locality"]["failoverBelow"] = json!(170);
        v["spec"]["outlierDetection"]["consecutive5xx"] = json!(-1);
        v["spec"]["outlierDetection"]["maxEjectionPercent"] = json!(101);
        v["spec"]["outlierDetection"]["baseEjectionTime"] = json!("five seconds");
        v["spec"]["circuitBreaker"]["maxPendingRequests"] = json!(-5);
        v["spec"]["faults"]["abort"]["percent"] = json!(120);
        v["spec"]["faults"]["abort"]["status"] = json!(99);
        let p = problems(v);
        let expect = [
            "spec.targetRefs[0].kind: must be Service, got \"Deployment\"",
            "spec.loadBalancer.algorithm: unknown algorithm \"Random\"; expected one of PeakEWMA, RoundRobin, LeastRequest",
            "spec.locality.failoverBelow: must be a percentage from 0 to 100, got 170",
            "spec.outlierDetection.consecutive5xx: must not be negative, got -1",
            "spec.outlierDetection.baseEjectionTime: \"five seconds\" is not a duration",
            "spec.outlierDetection.maxEjectionPercent: must be a percentage from 0 to 100, got 101",
            "spec.circuitBreaker.maxPendingRequests: must not be negative, got -5",
            "spec.faults.abort.percent: must be a percentage from 0 to 100, got 120",
            "spec.faults.abort.status: must be an HTTP status from 200 to 599, got 99",
        ];
        for e in expect {
            assert!(p.iter().any(|x| x.contains(e)), "missing {e:?} in {p:#?}");
        }
        assert_eq!(p.len(), expect.len(), "{p:#?}");
        // Unknown fields are refused too.
        let mut v = issue_policy();
        v["spec"]["loadBalancer"]["choices"] = json!(3);
        assert!(problems(v)[0].contains("unknown field `choices`"));
    }

    #[test]
    fn retry_and_budget_keep_the_gateway_api_shapes() {
        let route = json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "r", "namespace": "shop"},
            "spec": {
                "parentRefs": [{"name": "inventory", "kind": "Service"}],
                "rules": [{"backendRefs": [{"name": "inventory", "port": 8080}],
                           "retry": {"codes": [502, 503], "attempts": 2, "backoff": "25ms"}}]
            }
        });
        assert_eq!(problems(route.clone()), Vec::<String>::new());
        let mut bad = route;
        bad["spec"]["rules"][0]["retry"] = json!({"codes": [200], "attempts": 11, "backoff": "x"});
        let p = problems(bad);
        assert!(
            p[0].contains(
                "spec.rules[0].retry.codes[0]: must be an HTTP status from 400 to 599, got 200"
            ),
            "{p:?}"
        );
        assert!(
            p[1].contains("spec.rules[0].retry.attempts: must be from 0 to 10, got 11"),
            "{p:?}"
        );
        assert!(p[2].contains("spec.rules[0].retry.backoff"), "{p:?}");

        let btp = json!({
            "apiVersion": "gateway.networking.x-k8s.io/v1alpha1",
            "kind": "XBackendTrafficPolicy",
            "metadata": {"name": "inventory", "namespace": "shop"},
            "spec": {
                "targetRefs": [{"group": "", "kind": "Service", "name": "inventory"}],
                "retryConstraint": {"budget": {"percent": 20, "interval": "10s"},
                                    "minRetryRate": {"count": 10, "interval": "1s"}}
            }
        });
        let o = Object::from_json(&btp, 0).unwrap();
        let Spec::BackendTrafficPolicy(b) = &o.spec else {
            panic!()
        };
        let budget = b.retry_constraint.as_ref().unwrap().budget();
        assert_eq!(
            (
                budget.percent,
                budget.interval.as_secs(),
                budget.min_count,
                budget.min_interval.as_secs()
            ),
            (20, 10, 10, 1)
        );
        let mut bad = btp;
        bad["apiVersion"] = json!("muon.io/v1alpha1");
        bad["spec"]["retryConstraint"]["budget"]["percent"] = json!(-3);
        bad["spec"]["retryConstraint"]["budget"]["interval"] = json!("500ms");
        let p = problems(bad);
        assert!(p[0].contains("apiVersion: XBackendTrafficPolicy must have apiVersion \"gateway.networking.x-k8s.io/v1alpha1\""), "{p:?}");
        assert!(
            p[1].contains("budget.percent: must be a percentage from 0 to 100, got -3"),
            "{p:?}"
        );
        assert!(
            p[2].contains("budget.interval: must be at least 1s"),
            "{p:?}"
        );
    }
}
