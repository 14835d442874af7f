//! Every flag of `muon-control`, parsed and checked in one place (clap, with `MUON_CONTROL_*`
//! environment fallbacks).

use clap::{Parser, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Muon's control plane: serves discovery to sidecars and the management API to operators.
#[derive(Debug, Clone, Parser)]
#[command(name = "muon-control", version)]
pub struct Args {
    /// gRPC address: Discovery, Management and reflection.
    #[arg(long, env = "MUON_CONTROL_GRPC_ADDR", default_value = "0.0.0.0:15010")]
    pub grpc_addr: SocketAddr,
    /// HTTP address for /metrics (Prometheus) and /ready.
    #[arg(
        long,
        env = "MUON_CONTROL_METRICS_ADDR",
        default_value = "0.0.0.0:15014"
    )]
    pub metrics_addr: SocketAddr,
    /// Where applied objects are stored (created if missing).
    #[arg(
        long,
        env = "MUON_CONTROL_DATA_DIR",
        default_value = "/var/lib/muon-control"
    )]
    pub data_dir: PathBuf,
    /// A directory of *.yaml files (multi-document) to watch; its objects are read-only
    /// through the API.
    #[arg(long, env = "MUON_CONTROL_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,
    /// Read Services, EndpointSlices, Pods, Nodes, HTTPRoutes, GRPCRoutes and Muon's custom
    /// resources from the Kubernetes API (in-cluster configuration, else KUBECONFIG); its
    /// objects are read-only through the API.
    #[arg(long, env = "MUON_CONTROL_KUBERNETES")]
    pub kubernetes: bool,
    /// The Kubernetes API at a plain URL without credentials (`kubectl proxy`, tests), e.g.
    /// http://127.0.0.1:8001; implies --kubernetes.
    #[arg(long, env = "MUON_CONTROL_KUBERNETES_API")]
    pub kubernetes_api: Option<String>,
    /// With the Kubernetes source: the Secret (NAMESPACE/NAME) holding the CA's root that
    /// every replica signs with (keys ca.crt and ca.key), created from this control plane's
    /// CA when absent. Default: muon-ca in $POD_NAMESPACE, else in muon-system.
    #[arg(long, env = "MUON_CONTROL_CA_SECRET", value_name = "NAMESPACE/NAME")]
    pub ca_secret: Option<String>,
    /// The control plane's own namespace (the downward API's metadata.namespace).
    #[arg(long, hide = true, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
    /// The SPIFFE trust domain of workload identities.
    #[arg(
        long,
        env = "MUON_CONTROL_TRUST_DOMAIN",
        default_value = "cluster.local"
    )]
    pub trust_domain: String,
    /// Push after the registry has been quiet this long (e.g. 100ms).
    #[arg(long, env = "MUON_CONTROL_DEBOUNCE", default_value = "100ms", value_parser = duration)]
    pub debounce: Duration,
    /// Push at the latest this long after the first change of a burst.
    #[arg(long, env = "MUON_CONTROL_DEBOUNCE_MAX", default_value = "1s", value_parser = duration)]
    pub debounce_max: Duration,
    #[arg(
        long,
        env = "MUON_CONTROL_LOG_FORMAT",
        value_enum,
        default_value = "human"
    )]
    pub log_format: LogFormat,
    /// Log filter (tracing-subscriber EnvFilter syntax).
    #[arg(long, env = "MUON_CONTROL_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Service virtual IPs must lie in one of these prefixes (repeatable, or comma-separated
    /// in the environment). Without any, any routable unicast address is accepted.
    #[arg(long, env = "MUON_CONTROL_SERVICE_CIDR", value_delimiter = ',')]
    pub service_cidr: Vec<String>,
    /// The largest object accepted, in bytes (its JSON form).
    #[arg(long, env = "MUON_CONTROL_MAX_OBJECT_BYTES", default_value_t = 1 << 20)]
    pub max_object_bytes: usize,
    /// The largest apply accepted, in bytes (every object of it together).
    #[arg(long, env = "MUON_CONTROL_MAX_APPLY_BYTES", default_value_t = 8 << 20)]
    pub max_apply_bytes: usize,
    /// Open connections on the gRPC port at most; past it, new ones are closed on accept.
    #[arg(long, env = "MUON_CONTROL_MAX_CONNECTIONS", default_value_t = 20_000)]
    pub max_connections: usize,
    /// Open connections on the gRPC port from one address at most.
    #[arg(
        long,
        env = "MUON_CONTROL_MAX_CONNECTIONS_PER_SOURCE",
        default_value_t = 1_000
    )]
    pub max_connections_per_source: usize,
    /// A new gRPC connection must send its HTTP/2 preface within this.
    #[arg(long, env = "MUON_CONTROL_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub handshake_timeout: Duration,
    /// A unary management call (Apply, Get, List, Delete, ListProxies) must finish within
    /// this; streams (discovery, Watch) are not bounded.
    #[arg(long, env = "MUON_CONTROL_CALL_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub call_timeout: Duration,
    /// Accept plaintext gRPC too (besides TLS), trusting its callers as anyone: for tests,
    /// benchmarks and a control plane no one else can reach. Never in a shared cluster.
    #[arg(long, env = "MUON_CONTROL_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,
    /// The CA's certificate (PEM; an intermediate may be followed by its chain to the root),
    /// instead of the root generated on first start; with --ca-key.
    #[arg(long, env = "MUON_CONTROL_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The CA's private key (PEM), with --ca-cert.
    #[arg(long, env = "MUON_CONTROL_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// More roots sidecars trust (PEM), e.g. the next root during a CA rotation.
    #[arg(long, env = "MUON_CONTROL_EXTRA_ROOTS")]
    pub extra_roots: Option<PathBuf>,
    /// The lifetime of workload certificates (sidecars renew at about half of it).
    #[arg(long, env = "MUON_CONTROL_CERT_TTL", default_value = "24h", value_parser = duration)]
    pub cert_ttl: Duration,
    /// More names (DNS names or IPs) the control plane's own certificate carries, besides
    /// its addresses (repeatable), e.g. its Kubernetes service name.
    #[arg(long, env = "MUON_CONTROL_TLS_SAN", value_delimiter = ',')]
    pub tls_san: Vec<String>,
    /// Discovery responses with more bytes of resources than this are sent in parts.
    #[arg(long, hide = true, default_value_t = muon_api::DISCOVERY_SPLIT_BYTES)]
    pub discovery_split_bytes: usize,

    // The admission webhook (sidecar injection); off unless --webhook-addr is given.
    /// HTTPS address of the admission webhook (`POST /inject`), e.g. 0.0.0.0:15017.
    #[arg(long, env = "MUON_CONTROL_WEBHOOK_ADDR", requires_all = ["webhook_cert", "webhook_key"])]
    pub webhook_addr: Option<SocketAddr>,
    /// The webhook's serving certificate chain (PEM), signed by the webhook configuration's
    /// caBundle.
    #[arg(long, env = "MUON_CONTROL_WEBHOOK_CERT", requires = "webhook_addr")]
    pub webhook_cert: Option<PathBuf>,
    /// The webhook certificate's private key (PEM).
    #[arg(long, env = "MUON_CONTROL_WEBHOOK_KEY", requires = "webhook_addr")]
    pub webhook_key: Option<PathBuf>,
    /// The image injected sidecars run (it holds muon-proxy and muon-init).
    #[arg(long, env = "MUON_CONTROL_PROXY_IMAGE", default_value_t = muon_inject::Template::default().proxy_image)]
    pub proxy_image: String,
    /// Where injected sidecars reach this control plane (host:port, over TLS).
    #[arg(long, env = "MUON_CONTROL_SIDECAR_CONTROL_PLANE", default_value = muon_inject::template::DEFAULT_CONTROL_PLANE)]
    pub sidecar_control_plane: String,
    /// The sidecar mode unless a pod's muon.io/sidecar-mode says otherwise: native or classic.
    #[arg(long, env = "MUON_CONTROL_SIDECAR_MODE", default_value = "native")]
    pub sidecar_mode: String,
}

fn duration(s: &str) -> Result<Duration, String> {
    muon_core::duration::parse_flag(s)
}

/// The checked configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub config_dir: Option<PathBuf>,
    /// The Kubernetes source, with `--kubernetes` or `--kubernetes-api`.
    pub kubernetes: Option<crate::kubernetes::ApiServer>,
    /// The Secret (namespace, name) holding the CA's root, with the Kubernetes source.
    pub ca_secret: (String, String),
    pub trust_domain: String,
    pub debounce: Duration,
    pub debounce_max: Duration,
    pub log_format: LogFormat,
    pub log_level: String,
    pub service_cidrs: Vec<muon_core::net::Cidr>,
    pub max_object_bytes: usize,
    pub max_apply_bytes: usize,
    pub discovery_split_bytes: usize,
    pub connections: crate::gate::Limits,
    pub call_timeout: Duration,
    pub insecure_plaintext: bool,
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    pub extra_roots: Option<PathBuf>,
    pub cert_ttl: Duration,
    pub tls_sans: Vec<String>,
    /// The admission webhook, when `--webhook-addr` is given.
    pub webhook: Option<crate::webhook::WebhookConfig>,
}

impl Config {
    /// Checks the flags together; every problem is reported at once.
    pub fn from_args(a: Args) -> anyhow::Result<Config> {
        let mut problems = Vec::new();
        if let Err(e) = muon_core::resource::check_dns_subdomain(&a.trust_domain) {
            problems.push(format!("--trust-domain: {e}"));
        }
        if a.debounce.is_zero() || a.debounce_max < a.debounce {
            problems.push(format!(
                "--debounce ({:?}) must be above zero and at most --debounce-max ({:?})",
                a.debounce, a.debounce_max
            ));
        }
        let mut service_cidrs = Vec::new();
        for c in &a.service_cidr {
            match muon_core::net::Cidr::parse(c.trim()) {
                Ok(c) => service_cidrs.push(c),
                Err(e) => problems.push(format!("--service-cidr: {e}")),
            }
        }
        // Below this, ordinary objects would not fit; above the message limit, an object
        // could not be sent at all.
        let limit = muon_api::MAX_MESSAGE_BYTES / 2;
        if a.max_object_bytes < 4096 || a.max_object_bytes > limit {
            problems.push(format!(
                "--max-object-bytes {} must be from 4096 to {limit}",
                a.max_object_bytes
            ));
        }
        if a.max_apply_bytes < a.max_object_bytes || a.max_apply_bytes > limit {
            problems.push(format!(
                "--max-apply-bytes {} must be from --max-object-bytes to {limit}",
                a.max_apply_bytes
            ));
        }
        if a.max_connections == 0 || a.max_connections_per_source == 0 {
            problems.push(
                "--max-connections and --max-connections-per-source must be at least 1".into(),
            );
        }
        if a.cert_ttl < Duration::from_secs(60) {
            problems.push(format!(
                "--cert-ttl {} is too short: at least 1m",
                muon_core::duration::format(a.cert_ttl)
            ));
        }
        if a.handshake_timeout.is_zero() || a.call_timeout.is_zero() {
            problems.push("--handshake-timeout and --call-timeout must be above zero".into());
        }
        let kubernetes = kubernetes_config(&a, &mut problems);
        let ca_secret = ca_secret(&a, &mut problems);
        let webhook = webhook_config(&a, &mut problems);
        if !problems.is_empty() {
            anyhow::bail!("invalid flags:\n  {}", problems.join("\n  "));
        }
        Ok(Config {
            grpc_addr: a.grpc_addr,
            metrics_addr: a.metrics_addr,
            data_dir: a.data_dir,
            config_dir: a.config_dir,
            kubernetes,
            ca_secret,
            trust_domain: a.trust_domain,
            debounce: a.debounce,
            debounce_max: a.debounce_max,
            log_format: a.log_format,
            log_level: a.log_level,
            service_cidrs,
            max_object_bytes: a.max_object_bytes,
            max_apply_bytes: a.max_apply_bytes,
            discovery_split_bytes: a.discovery_split_bytes.max(1),
            connections: crate::gate::Limits {
                max_connections: a.max_connections,
                max_per_source: a.max_connections_per_source,
                handshake_timeout: a.handshake_timeout,
            },
            call_timeout: a.call_timeout,
            insecure_plaintext: a.insecure_plaintext,
            ca_cert: a.ca_cert,
            ca_key: a.ca_key,
            extra_roots: a.extra_roots,
            cert_ttl: a.cert_ttl,
            tls_sans: a.tls_san,
            webhook,
        })
    }

    /// A configuration for tests and embedding: loopback, ephemeral ports, the given data dir.
    pub fn for_tests(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            grpc_addr: ([127, 0, 0, 1], 0).into(),
            metrics_addr: ([127, 0, 0, 1], 0).into(),
            data_dir: data_dir.into(),
            config_dir: None,
            kubernetes: None,
            ca_secret: (DEFAULT_NAMESPACE.into(), DEFAULT_CA_SECRET.into()),
            trust_domain: "cluster.local".into(),
            debounce: Duration::from_millis(20),
            debounce_max: Duration::from_millis(200),
            log_format: LogFormat::Human,
            log_level: "info".into(),
            service_cidrs: Vec::new(),
            max_object_bytes: 1 << 20,
            max_apply_bytes: 8 << 20,
            discovery_split_bytes: muon_api::DISCOVERY_SPLIT_BYTES,
            connections: crate::gate::Limits {
                max_connections: 20_000,
                max_per_source: 1_000,
                handshake_timeout: Duration::from_secs(10),
            },
            call_timeout: Duration::from_secs(30),
            // In-process tests talk plaintext (and TLS when they bring credentials).
            insecure_plaintext: true,
            ca_cert: None,
            ca_key: None,
            extra_roots: None,
            cert_ttl: Duration::from_secs(24 * 3600),
            tls_sans: Vec::new(),
            webhook: None,
        }
    }
}

/// The control plane's namespace when `POD_NAMESPACE` is not set.
pub const DEFAULT_NAMESPACE: &str = "muon-system";
/// The Secret holding the CA's root by default.
pub const DEFAULT_CA_SECRET: &str = "muon-ca";

/// `--ca-secret NAMESPACE/NAME`, else `muon-ca` in the control plane's namespace.
fn ca_secret(a: &Args, problems: &mut Vec<String>) -> (String, String) {
    let own = a
        .pod_namespace
        .as_deref()
        .map(str::trim)
        .filter(|ns| !ns.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE);
    let Some(flag) = &a.ca_secret else {
        return (own.to_string(), DEFAULT_CA_SECRET.to_string());
    };
    let parsed = flag.trim().split_once('/').filter(|(ns, name)| {
        muon_core::resource::check_dns_label(ns).is_ok()
            && muon_core::resource::check_dns_subdomain(name).is_ok()
    });
    match parsed {
        Some((ns, name)) => (ns.to_string(), name.to_string()),
        None => {
            problems.push(format!(
                "--ca-secret {flag:?}: must be NAMESPACE/NAME, e.g. muon-system/muon-ca"
            ));
            (own.to_string(), DEFAULT_CA_SECRET.to_string())
        }
    }
}

/// `--kubernetes` and `--kubernetes-api`: the API URL must be http(s)://host[:port], with no
/// path, query or credentials in it.
fn kubernetes_config(a: &Args, problems: &mut Vec<String>) -> Option<crate::kubernetes::ApiServer> {
    let Some(url) = &a.kubernetes_api else {
        return a.kubernetes.then_some(crate::kubernetes::ApiServer::Infer);
    };
    let url = url.trim().trim_end_matches('/');
    let checked = match url.parse::<http::Uri>() {
        Err(e) => Err(e.to_string()),
        Ok(u) if !matches!(u.scheme_str(), Some("http" | "https")) => {
            Err("must start with http:// or https://".into())
        }
        Ok(u) if u.host().is_none_or(str::is_empty) => Err("has no host".into()),
        Ok(u) if u.authority().is_some_and(|a| a.as_str().contains('@')) => {
            Err("must not carry credentials".into())
        }
        Ok(u)
            if u.path_and_query()
                .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty()) =>
        {
            Err("must have no path or query".into())
        }
        Ok(_) => Ok(()),
    };
    match checked {
        Ok(()) => Some(crate::kubernetes::ApiServer::Url(url.to_string())),
        Err(reason) => {
            problems.push(format!(
                "--kubernetes-api {url:?}: {reason} (e.g. http://127.0.0.1:8001)"
            ));
            None
        }
    }
}

/// The webhook's flags, checked together (the template as the library checks it).
fn webhook_config(a: &Args, problems: &mut Vec<String>) -> Option<crate::webhook::WebhookConfig> {
    let mode = muon_inject::SidecarMode::parse(&a.sidecar_mode)
        .map_err(|e| problems.push(format!("--sidecar-mode: {e}")))
        .ok()?;
    let template = muon_inject::Template {
        proxy_image: a.proxy_image.trim().to_string(),
        control_plane: a.sidecar_control_plane.trim().to_string(),
        mode,
    };
    if let Err(e) = template.check() {
        problems.push(format!("--proxy-image / --sidecar-control-plane: {e}"));
    }
    match (a.webhook_addr, &a.webhook_cert, &a.webhook_key) {
        (Some(addr), Some(cert), Some(key)) => Some(crate::webhook::WebhookConfig {
            addr,
            cert: cert.clone(),
            key: key.clone(),
            template,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_well_known_ports() {
        let c = Config::from_args(Args::parse_from(["muon-control"])).unwrap();
        assert_eq!(c.grpc_addr.port(), 15010);
        assert_eq!(c.metrics_addr.port(), 15014);
        assert_eq!(c.debounce, Duration::from_millis(100));
        assert_eq!(c.debounce_max, Duration::from_secs(1));
    }

    #[test]
    fn the_ca_secret_is_muon_ca_in_the_control_planes_namespace_unless_given() {
        let parse = |args: &[&str], pod_namespace: Option<&str>| {
            let mut a = Args::parse_from(args);
            a.pod_namespace = pod_namespace.map(str::to_string);
            Config::from_args(a)
        };
        let secret = |c: Config| c.ca_secret;
        let own = |ns: &str, name: &str| (ns.to_string(), name.to_string());
        assert_eq!(
            secret(parse(&["muon-control"], None).unwrap()),
            own("muon-system", "muon-ca")
        );
        assert_eq!(
            secret(parse(&["muon-control"], Some("mesh")).unwrap()),
            own("mesh", "muon-ca")
        );
        assert_eq!(
            secret(
                parse(
                    &["muon-control", "--ca-secret", "vault/mesh-root"],
                    Some("mesh")
                )
                .unwrap()
            ),
            own("vault", "mesh-root")
        );
        for bad in ["muon-ca", "/muon-ca", "muon-system/", "Muon/x", "a/b/c"] {
            let err = parse(&["muon-control", "--ca-secret", bad], None).unwrap_err();
            assert!(err.to_string().contains("--ca-secret"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_webhook_is_off_by_default_and_needs_its_certificate() {
        let c = Config::from_args(Args::parse_from(["muon-control"])).unwrap();
        assert!(c.webhook.is_none());
        let c = Config::from_args(Args::parse_from([
            "muon-control",
            "--webhook-addr",
            "0.0.0.0:15017",
            "--webhook-cert",
            "/etc/muon/webhook/tls.crt",
            "--webhook-key",
            "/etc/muon/webhook/tls.key",
            "--proxy-image",
            "registry.example/muon-proxy:dev",
        ]))
        .unwrap();
        let w = c.webhook.unwrap();
        assert_eq!(w.addr.port(), 15017);
        assert_eq!(w.template.proxy_image, "registry.example/muon-proxy:dev");
        assert_eq!(
            w.template.control_plane,
            "muon-control.muon-system.svc:15010"
        );
        assert!(Args::try_parse_from(["muon-control", "--webhook-addr", "0.0.0.0:15017"]).is_err());
        let err = Config::from_args(Args::parse_from([
            "muon-control",
            "--sidecar-mode",
            "sometimes",
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--sidecar-mode: \"sometimes\" is not native or classic"),
            "{err}"
        );
    }

    #[test]
    fn the_kubernetes_source_is_off_by_default_and_its_url_is_checked() {
        let parse = |args: &[&str]| {
            Config::from_args(Args::parse_from(
                std::iter::once("muon-control").chain(args.iter().copied()),
            ))
        };
        use crate::kubernetes::ApiServer;
        assert_eq!(parse(&[]).unwrap().kubernetes, None);
        assert_eq!(
            parse(&["--kubernetes"]).unwrap().kubernetes,
            Some(ApiServer::Infer)
        );
        assert_eq!(
            parse(&["--kubernetes-api", "http://127.0.0.1:8001/"])
                .unwrap()
                .kubernetes,
            Some(ApiServer::Url("http://127.0.0.1:8001".into()))
        );
        for (bad, why) in [
            ("127.0.0.1:8001", "must start with http:// or https://"),
            ("ftp://host", "must start with http:// or https://"),
            ("http://u:p@host", "must not carry credentials"),
            ("http://host/api", "must have no path or query"),
        ] {
            let err = parse(&["--kubernetes-api", bad]).unwrap_err().to_string();
            assert!(
                err.contains(&format!("--kubernetes-api {bad:?}: {why}")),
                "{err}"
            );
        }
    }

    #[test]
    fn every_bad_flag_is_reported() {
        let err = Config::from_args(Args::parse_from([
            "muon-control",
            "--trust-domain",
            "Bad Domain",
            "--debounce",
            "2s",
            "--service-cidr",
            "198.19.0.0/16,nope",
            "--max-object-bytes",
            "10",
        ]))
        .unwrap_err()
        .to_string();
        for want in [
            "--trust-domain",
            "--debounce",
            "--service-cidr: \"nope\"",
            "--max-object-bytes 10",
        ] {
            assert!(err.contains(want), "{want} missing from {err}");
        }
    }
}
