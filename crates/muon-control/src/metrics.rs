//! Prometheus metrics of the control plane, served as text on `--metrics-addr` `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabels {
    type_url: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    result: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// Every metric `muon-control` exposes.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub proxies_connected: Gauge,
    pushes: Family<TypeLabels, Counter>,
    push_bytes: Family<TypeLabels, Counter>,
    push_latency: Histogram,
    nacks: Family<TypeLabels, Counter>,
    compared: Family<TypeLabels, Counter>,
    objects: Family<KindLabels, Gauge>,
    /// Open connections on the gRPC port.
    pub grpc_connections: Gauge,
    refused: Family<ReasonLabels, Counter>,
    certificates: Family<CertLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("muon_control");
        let proxies_connected = Gauge::default();
        registry.register(
            "proxies_connected",
            "Sidecars with an open discovery stream",
            proxies_connected.clone(),
        );
        let pushes = Family::<TypeLabels, Counter>::default();
        registry.register(
            "pushes",
            "Discovery responses sent, by resource kind",
            pushes.clone(),
        );
        let push_bytes = Family::<TypeLabels, Counter>::default();
        registry.register(
            "push_bytes",
            "Encoded bytes of discovery responses sent, by resource kind",
            push_bytes.clone(),
        );
        let push_latency = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        registry.register(
            "push_latency_seconds",
            "Time from a registry change to the push that carries it",
            push_latency.clone(),
        );
        let nacks = Family::<TypeLabels, Counter>::default();
        registry.register(
            "nacks",
            "Discovery responses sidecars rejected, by resource kind",
            nacks.clone(),
        );
        let compared = Family::<TypeLabels, Counter>::default();
        registry.register(
            "discovery_compared_resources",
            "Resources discovery streams compared with what they had sent, to find what to push",
            compared.clone(),
        );
        let objects = Family::<KindLabels, Gauge>::default();
        registry.register(
            "objects",
            "Objects in the registry, by kind",
            objects.clone(),
        );
        let grpc_connections = Gauge::default();
        registry.register(
            "grpc_connections",
            "Open connections on the gRPC port (sidecars and operators)",
            grpc_connections.clone(),
        );
        let refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "gRPC connections closed on accept, by the limit they hit",
            refused.clone(),
        );
        let certificates = Family::<CertLabels, Counter>::default();
        registry.register(
            "certificates",
            "Certificate requests: issued, or refused and why",
            certificates.clone(),
        );
        Metrics {
            certificates,
            grpc_connections,
            refused,
            registry,
            proxies_connected,
            pushes,
            push_bytes,
            push_latency,
            nacks,
            compared,
            objects,
        }
    }

    pub fn pushed(&self, type_url: &'static str, bytes: usize, latency: Option<Duration>) {
        self.pushes.get_or_create(&TypeLabels { type_url }).inc();
        self.push_bytes
            .get_or_create(&TypeLabels { type_url })
            .inc_by(bytes as u64);
        if let Some(l) = latency {
            self.push_latency.observe(l.as_secs_f64());
        }
    }

    pub fn nacked(&self, type_url: &'static str) {
        self.nacks.get_or_create(&TypeLabels { type_url }).inc();
    }

    pub fn compared(&self, type_url: &'static str, resources: usize) {
        self.compared
            .get_or_create(&TypeLabels { type_url })
            .inc_by(resources as u64);
    }

    pub fn certificate(&self, result: &'static str, reason: &'static str) {
        self.certificates
            .get_or_create(&CertLabels { result, reason })
            .inc();
    }

    pub fn connection_refused(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn set_objects(&self, kind: &'static str, n: usize) {
        self.objects
            .get_or_create(&KindLabels { kind })
            .set(n as i64);
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_have_the_documented_names() {
        let m = Metrics::new();
        m.pushed("endpoints", 10, Some(Duration::from_millis(5)));
        m.nacked("routes");
        m.compared("services", 3);
        m.set_objects("Service", 2);
        m.connection_refused("max-connections");
        let text = m.encode();
        for name in [
            "muon_control_proxies_connected ",
            "muon_control_pushes_total{type_url=\"endpoints\"} 1",
            "muon_control_push_bytes_total{type_url=\"endpoints\"} 10",
            "muon_control_push_latency_seconds_count 1",
            "muon_control_nacks_total{type_url=\"routes\"} 1",
            "muon_control_discovery_compared_resources_total{type_url=\"services\"} 3",
            "muon_control_objects{kind=\"Service\"} 2",
            "muon_control_grpc_connections 0",
            "muon_control_connections_refused_total{reason=\"max-connections\"} 1",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
