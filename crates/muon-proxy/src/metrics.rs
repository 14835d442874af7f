//! Prometheus metrics, exposed as text on the health port's `/metrics`.
//!
//! Counter handles are resolved once at start (per direction and outcome) or when a table is
//! compiled (per service and route), so the data path only touches atomics: no label lookup,
//! no lock, no hashing per connection or request.

use crate::{Direction, Outcome};
use prometheus_client::encoding::{
    EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

impl EncodeLabelValue for Direction {
    fn encode(&self, e: &mut LabelValueEncoder) -> std::fmt::Result {
        e.write_str(self.as_str())
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, e: &mut LabelValueEncoder) -> std::fmt::Result {
        e.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClosedLabels {
    direction: Direction,
    outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    direction: Direction,
    /// `sent` = client → upstream, `received` = upstream → client.
    flow: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpdateLabels {
    type_url: String,
    /// `ack` or `nack`.
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    direction: Direction,
    service: String,
    route: String,
    /// `2xx`…`5xx`.
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    direction: Direction,
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TlsLabels {
    direction: Direction,
    /// `ok`, or why not (`handshake`, `wrong-identity`, `no-certificate`, `not-mesh`).
    result: &'static str,
}

/// A label value shared with the connection that counts it: building the labels of a
/// request clones two `Arc`s instead of allocating two strings.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct SharedStr(std::sync::Arc<str>);

impl EncodeLabelValue for SharedStr {
    fn encode(&self, e: &mut LabelValueEncoder) -> std::fmt::Result {
        e.write_str(&self.0)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    direction: Direction,
    /// Workload identities (service accounts), so the label values stay few.
    src_identity: SharedStr,
    dst_identity: SharedStr,
    /// `request` or `connection`.
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    /// `issued` or `failed`.
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    direction: Direction,
    /// `http1` or `http2`.
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResilienceLabels {
    /// `name.namespace` of the service the requests went to.
    service: String,
    /// What happened: see [`ResilienceStats`].
    event: &'static str,
}

/// The resilience events of one service, resolved when compiling (per request: one atomic
/// add, no lookup). `muon_resilience_events_total{service, event}` with `event`:
/// `retry` (a retry sent), `retry-success` (a request that succeeded after retries),
/// `retry-failure` (one that still failed), `budget-exhausted` (a retry the budget refused),
/// `ejection` (an endpoint ejected), `overloaded` (a circuit-breaker limit answered 503),
/// `fault-delay` and `fault-abort` (injected faults), and `locality-zone`, `locality-region`,
/// `locality-cloud`, `locality-other-cloud` (requests by where the endpoint was).
#[derive(Debug)]
pub struct ResilienceStats {
    pub retry: Counter,
    pub retry_success: Counter,
    pub retry_failure: Counter,
    pub budget_exhausted: Counter,
    pub ejection: Counter,
    pub overloaded: Counter,
    pub fault_delay: Counter,
    pub fault_abort: Counter,
    /// By locality level (see `balance::LEVELS`).
    pub locality: [Counter; 4],
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthzLabels {
    direction: Direction,
    /// `allow` or `deny`.
    decision: &'static str,
    /// `namespace/name` of the policy that decided ("" when allowed because no DENY policy
    /// matched and no ALLOW policy applies; the ALLOW policies, comma-separated, when none
    /// of them allowed it). Bounded by the policies that apply to this pod.
    policy: String,
}

/// The status classes counted, in order.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Upper bounds of the latency buckets, in seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram updated with atomics only (prometheus-client's takes a lock per
/// observation). Sums are kept in microseconds.
#[derive(Clone, Debug, Default)]
pub struct LatencyHistogram(Arc<HistogramInner>);

#[derive(Debug, Default)]
struct HistogramInner {
    /// Observations per bucket (not cumulative); the last is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl LatencyHistogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.0.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.0.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.0.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        let mut cumulative = 0;
        let mut buckets = [(0.0, 0); LATENCY_BUCKETS.len() + 1];
        for (i, slot) in buckets.iter_mut().enumerate() {
            cumulative += self.0.buckets[i].load(Ordering::Relaxed);
            let upper = LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::MAX);
            *slot = (upper, cumulative);
        }
        let sum = self.0.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, cumulative, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// The request counters of one (direction, service, route), and the latency histogram of
/// its service, resolved once when a table is compiled.
#[derive(Debug)]
pub struct RequestStats {
    classes: [Counter; CLASSES.len()],
    latency: LatencyHistogram,
}

impl RequestStats {
    /// Counts a finished request.
    pub fn record(&self, status: u16, elapsed: Duration) {
        let class = usize::from(status / 100).clamp(1, CLASSES.len()) - 1;
        self.classes[class].inc();
        self.latency.observe(elapsed);
    }
}

/// Pre-resolved handles for one direction.
#[derive(Clone, Debug)]
pub struct DirectionMetrics {
    pub opened: Counter,
    pub open: Gauge,
    /// Bytes read from the client and forwarded upstream.
    pub sent: Counter,
    /// Bytes read from the upstream and forwarded to the client.
    pub received: Counter,
    /// Closed connections, in the order of [`Outcome::ALL`].
    closed: [Counter; Outcome::ALL.len()],
}

/// Every metric the proxy exposes.
pub struct Metrics {
    registry: Registry,
    outbound: DirectionMetrics,
    inbound: DirectionMetrics,
    gateway: DirectionMetrics,
    table_services: Gauge,
    reloads_ok: Counter,
    reloads_error: Counter,
    discovery_connected: Gauge,
    discovery_updates: Family<UpdateLabels, Counter>,
    discovery_reconnects: Counter,
    on_demand_subscriptions: Counter,
    requests: Family<RequestLabels, Counter>,
    latency: Family<LatencyLabels, LatencyHistogram>,
    upstream_connections: Family<UpstreamLabels, Counter>,
    authz_decisions: Family<AuthzLabels, Counter>,
    resilience: Family<ResilienceLabels, Counter>,
    tls_connections: Family<TlsLabels, Counter>,
    certificates: Family<CertLabels, Counter>,
    identities: Family<IdentityLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let opened = Family::<DirectionLabels, Counter>::default();
        let closed = Family::<ClosedLabels, Counter>::default();
        let open = Family::<DirectionLabels, Gauge>::default();
        let bytes = Family::<BytesLabels, Counter>::default();
        let table_services = Gauge::default();
        let reloads = Family::<ReloadLabels, Counter>::default();

        // prometheus-client appends `_total` to counters in the exposition.
        registry.register(
            "muon_tcp_connections_opened",
            "TCP connections accepted",
            opened.clone(),
        );
        registry.register(
            "muon_tcp_connections_closed",
            "TCP connections closed, by outcome",
            closed.clone(),
        );
        registry.register(
            "muon_tcp_connections_open",
            "TCP connections currently proxied",
            open.clone(),
        );
        registry.register(
            "muon_tcp_bytes",
            "Bytes proxied: sent = client to upstream, received = upstream to client",
            bytes.clone(),
        );
        registry.register(
            "muon_table_services",
            "Services in the current table",
            table_services.clone(),
        );
        registry.register(
            "muon_table_reloads",
            "Service table loads, by result",
            reloads.clone(),
        );

        let discovery_connected = Gauge::default();
        let discovery_updates = Family::<UpdateLabels, Counter>::default();
        let discovery_reconnects = Counter::default();
        registry.register(
            "muon_discovery_connected",
            "1 while the discovery stream to the control plane is open",
            discovery_connected.clone(),
        );
        registry.register(
            "muon_discovery_updates",
            "Discovery responses, by kind and whether they were ACKed or NACKed",
            discovery_updates.clone(),
        );
        registry.register(
            "muon_discovery_reconnects",
            "New discovery streams after the previous one failed",
            discovery_reconnects.clone(),
        );

        let on_demand_subscriptions = Counter::default();
        registry.register(
            "muon_discovery_on_demand_subscriptions",
            "Services whose endpoints were subscribed on demand (first connection to each)",
            on_demand_subscriptions.clone(),
        );

        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<LatencyLabels, LatencyHistogram>::default();
        let upstream_connections = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "muon_http_requests",
            "HTTP requests by direction, service, route and status class",
            requests.clone(),
        );
        registry.register(
            "muon_http_request_duration_seconds",
            "HTTP request latency (until the response ends) by direction and service",
            latency.clone(),
        );
        registry.register(
            "muon_http_upstream_connections",
            "HTTP connections the proxy opened to upstreams (endpoints, apps), by protocol",
            upstream_connections.clone(),
        );

        let tls_connections = Family::<TlsLabels, Counter>::default();
        registry.register(
            "muon_tls_connections",
            "Mutual TLS connections between sidecars, by direction and result",
            tls_connections.clone(),
        );
        let identities = Family::<IdentityLabels, Counter>::default();
        registry.register(
            "muon_mesh_identity",
            "Mutual TLS requests and connections by source and destination SPIFFE id",
            identities.clone(),
        );
        let certificates = Family::<CertLabels, Counter>::default();
        registry.register(
            "muon_identity_certificates",
            "Certificates this sidecar asked the control plane for: issued or failed",
            certificates.clone(),
        );

        let authz_decisions = Family::<AuthzLabels, Counter>::default();
        registry.register(
            "muon_authz_decisions",
            "Authorization decisions on connections and requests, by direction, decision and \
             the policy that made it",
            authz_decisions.clone(),
        );

        let resilience = Family::<ResilienceLabels, Counter>::default();
        registry.register(
            "muon_resilience_events",
            "Retries and their outcome, retry-budget refusals, outlier ejections, \
             circuit-breaker trips, injected faults and requests by locality, per service",
            resilience.clone(),
        );

        // One statement per lookup: `get_or_create` returns a read guard, and a second
        // lookup in the same statement would wait for the write lock forever.
        let direction = |direction: Direction| {
            let labels = DirectionLabels { direction };
            let opened = opened.get_or_create(&labels).clone();
            let open = open.get_or_create(&labels).clone();
            let flow = |flow| BytesLabels { direction, flow };
            let sent = bytes.get_or_create(&flow("sent")).clone();
            let received = bytes.get_or_create(&flow("received")).clone();
            let closed = Outcome::ALL.map(|outcome| {
                closed
                    .get_or_create(&ClosedLabels { direction, outcome })
                    .clone()
            });
            DirectionMetrics {
                opened,
                open,
                sent,
                received,
                closed,
            }
        };
        let outbound = direction(Direction::Outbound);
        let inbound = direction(Direction::Inbound);
        let gateway = direction(Direction::Gateway);
        let reloads_ok = reloads
            .get_or_create(&ReloadLabels { result: "ok" })
            .clone();
        let reloads_error = reloads
            .get_or_create(&ReloadLabels { result: "error" })
            .clone();
        Metrics {
            registry,
            outbound,
            inbound,
            gateway,
            table_services,
            reloads_ok,
            reloads_error,
            discovery_connected,
            discovery_updates,
            discovery_reconnects,
            on_demand_subscriptions,
            requests,
            latency,
            upstream_connections,
            authz_decisions,
            resilience,
            tls_connections,
            certificates,
            identities,
        }
    }

    /// Counts a request (or connection) between two identified workloads.
    pub fn identified(
        &self,
        direction: Direction,
        ids: &crate::tls::Identities,
        kind: &'static str,
    ) {
        if let (Some(src), Some(dst)) = (&ids.src, &ids.dst) {
            self.identities
                .get_or_create(&IdentityLabels {
                    direction,
                    src_identity: SharedStr(src.clone()),
                    dst_identity: SharedStr(dst.clone()),
                    kind,
                })
                .inc();
        }
    }

    /// Counts a mesh TLS connection (`ok`, or why it failed).
    pub fn tls(&self, direction: Direction, result: &'static str) {
        self.tls_connections
            .get_or_create(&TlsLabels { direction, result })
            .inc();
    }

    /// Counts a certificate request of this sidecar.
    pub fn certificate(&self, result: &'static str) {
        self.certificates
            .get_or_create(&CertLabels { result })
            .inc();
    }

    /// The counter of one authorization decision by one policy. Takes the family's lock:
    /// call it when compiling, not per decision.
    pub fn authz_decision(
        &self,
        direction: Direction,
        decision: &'static str,
        policy: &str,
    ) -> Counter {
        self.authz_decisions
            .get_or_create(&AuthzLabels {
                direction,
                decision,
                policy: policy.to_owned(),
            })
            .clone()
    }

    /// The request counters of one route of a service (`route` "" for a service's default
    /// rule). Takes the families' locks: call it when compiling, not per request.
    pub fn request_stats(
        &self,
        direction: Direction,
        service: &str,
        route: &str,
    ) -> Arc<RequestStats> {
        let latency = self
            .latency
            .get_or_create(&LatencyLabels {
                direction,
                service: service.to_owned(),
            })
            .clone();
        let classes = CLASSES.map(|status_class| {
            self.requests
                .get_or_create(&RequestLabels {
                    direction,
                    service: service.to_owned(),
                    route: route.to_owned(),
                    status_class,
                })
                .clone()
        });
        Arc::new(RequestStats { classes, latency })
    }

    /// The resilience counters of one service. Takes the family's lock: call it when
    /// compiling.
    pub fn resilience_stats(&self, service: &str) -> Arc<ResilienceStats> {
        let c = |event: &'static str| {
            self.resilience
                .get_or_create(&ResilienceLabels {
                    service: service.to_owned(),
                    event,
                })
                .clone()
        };
        Arc::new(ResilienceStats {
            retry: c("retry"),
            retry_success: c("retry-success"),
            retry_failure: c("retry-failure"),
            budget_exhausted: c("budget-exhausted"),
            ejection: c("ejection"),
            overloaded: c("overloaded"),
            fault_delay: c("fault-delay"),
            fault_abort: c("fault-abort"),
            locality: [
                c("locality-zone"),
                c("locality-region"),
                c("locality-cloud"),
                c("locality-other-cloud"),
            ],
        })
    }

    /// The counter of upstream connections of one protocol (`http1`, `http2`).
    pub fn upstream_connections(&self, direction: Direction, protocol: &'static str) -> Counter {
        self.upstream_connections
            .get_or_create(&UpstreamLabels {
                direction,
                protocol,
            })
            .clone()
    }

    pub fn discovery_connected(&self, up: bool) {
        self.discovery_connected.set(i64::from(up));
    }

    pub fn discovery_update(&self, type_url: &str, ack: bool) {
        let labels = UpdateLabels {
            type_url: type_url.to_owned(),
            result: if ack { "ack" } else { "nack" },
        };
        self.discovery_updates.get_or_create(&labels).inc();
    }

    pub fn discovery_reconnect(&self) {
        self.discovery_reconnects.inc();
    }

    pub fn on_demand_subscription(&self) {
        self.on_demand_subscriptions.inc();
    }

    pub fn direction(&self, d: Direction) -> &DirectionMetrics {
        match d {
            Direction::Outbound => &self.outbound,
            Direction::Inbound => &self.inbound,
            Direction::Gateway => &self.gateway,
        }
    }

    pub fn closed(&self, d: Direction, outcome: Outcome) {
        self.direction(d).closed[outcome as usize].inc();
    }

    pub fn table_loaded(&self, services: usize) {
        self.reloads_ok.inc();
        self.table_services
            .set(i64::try_from(services).unwrap_or(i64::MAX));
    }

    pub fn table_rejected(&self) {
        self.reloads_error.inc();
    }

    /// The OpenMetrics text exposition (served as `application/openmetrics-text`).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_text_contains_every_name() {
        let m = Metrics::new();
        m.direction(Direction::Outbound).opened.inc();
        m.direction(Direction::Inbound).sent.inc_by(7);
        m.closed(Direction::Outbound, Outcome::Loop);
        m.table_loaded(3);
        let stats = m.request_stats(Direction::Outbound, "web.shop", "canary.shop");
        stats.record(503, Duration::from_millis(7));
        stats.record(200, Duration::from_secs(20));
        let text = m.encode();
        for want in [
            r#"muon_tcp_connections_opened_total{direction="outbound"} 1"#,
            r#"muon_tcp_connections_opened_total{direction="inbound"} 0"#,
            r#"muon_tcp_connections_closed_total{direction="outbound",outcome="loop"} 1"#,
            r#"muon_tcp_connections_open{direction="inbound"} 0"#,
            r#"muon_tcp_bytes_total{direction="inbound",flow="sent"} 7"#,
            r#"muon_tcp_bytes_total{direction="outbound",flow="received"} 0"#,
            "muon_table_services 3",
            r#"muon_http_requests_total{direction="outbound",service="web.shop",route="canary.shop",status_class="5xx"} 1"#,
            r#"muon_http_request_duration_seconds_bucket{le="0.01",direction="outbound",service="web.shop"} 1"#,
            r#"muon_http_request_duration_seconds_count{direction="outbound",service="web.shop"} 2"#,
            r#"muon_table_reloads_total{result="ok"} 1"#,
            r#"muon_table_reloads_total{result="error"} 0"#,
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
    }
}
