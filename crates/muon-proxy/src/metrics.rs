//! Prometheus metrics, exposed as text on the health port's `/metrics`.
//!
//! Counter handles are resolved once at start (per direction and outcome) or when a table is
//! compiled (per service and route), so the data path only touches atomics: no label lookup,
//! no lock, no hashing per connection or request.

use crate::{Direction, Outcome};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::fmt::Write;

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
    table_services: Gauge,
    reloads_ok: Counter,
    reloads_error: Counter,
    discovery_connected: Gauge,
    discovery_updates: Family<UpdateLabels, Counter>,
    discovery_reconnects: Counter,
    on_demand_subscriptions: Counter,
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
            table_services,
            reloads_ok,
            reloads_error,
            discovery_connected,
            discovery_updates,
            discovery_reconnects,
            on_demand_subscriptions,
        }
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
        let text = m.encode();
        for want in [
            r#"muon_tcp_connections_opened_total{direction="outbound"} 1"#,
            r#"muon_tcp_connections_opened_total{direction="inbound"} 0"#,
            r#"muon_tcp_connections_closed_total{direction="outbound",outcome="loop"} 1"#,
            r#"muon_tcp_connections_open{direction="inbound"} 0"#,
            r#"muon_tcp_bytes_total{direction="inbound",flow="sent"} 7"#,
            r#"muon_tcp_bytes_total{direction="outbound",flow="received"} 0"#,
            "muon_table_services 3",
            r#"muon_table_reloads_total{result="ok"} 1"#,
            r#"muon_table_reloads_total{result="error"} 0"#,
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
    }
}
