//! Flags and environment in, one validated [`Config`] out.
//!
//! Every flag is read as text by clap (so a bad value does not stop parsing) and then checked
//! here, in one place, collecting every problem before reporting them together. Nothing else
//! in the crate reads the environment.

use clap::Parser;
use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The command line as typed: text only, validated by [`Config::from_args`].
#[derive(Debug, Clone, Parser)]
#[command(
    name = "muon-proxy",
    version,
    about = "Muon's proxy: the transparent sidecar of one pod (TCP, HTTP/1.1, HTTP/2, gRPC), or the mesh's gateway",
    args_override_self = true
)]
pub struct Args {
    /// sidecar: the transparent proxy of one pod (capture listeners). gateway: the edge,
    /// taking traffic from outside the mesh on --listen and routing it by the HTTPRoutes
    /// attached to --gateway.
    #[arg(long, env = "MUON_MODE", default_value = "sidecar")]
    pub mode: String,
    /// Gateway mode: the listeners for clients outside the mesh, comma-separated.
    #[arg(long, env = "MUON_LISTEN", default_value = "")]
    pub listen: String,
    /// Gateway mode: whose routes to serve, as NAME.NAMESPACE of a Gateway object.
    #[arg(long, env = "MUON_GATEWAY", default_value = "")]
    pub gateway: String,
    /// Gateway mode: a PEM certificate chain; with --tls-key, --listen terminates TLS.
    #[arg(long, env = "MUON_TLS_CERT")]
    pub tls_cert: Option<String>,
    /// Gateway mode: the PEM private key of --tls-cert.
    #[arg(long, env = "MUON_TLS_KEY")]
    pub tls_key: Option<String>,
    /// Outbound capture listeners, comma-separated. IPv6 entries are bound with IPV6_V6ONLY
    /// and skipped with a warning when the host has no IPv6.
    #[arg(
        long,
        env = "MUON_OUTBOUND_ADDR",
        default_value = "0.0.0.0:15001,[::]:15001"
    )]
    pub outbound_addr: String,
    /// Inbound capture listeners, comma-separated (same rules as --outbound-addr).
    #[arg(
        long,
        env = "MUON_INBOUND_ADDR",
        default_value = "0.0.0.0:15006,[::]:15006"
    )]
    pub inbound_addr: String,
    /// Pod-facing health and metrics server: /live, /ready, /metrics.
    #[arg(long, env = "MUON_HEALTH_ADDR", default_value = "0.0.0.0:15020")]
    pub health_addr: String,
    /// Admin server: /config_dump, /ready, /drain. Keep it on loopback.
    #[arg(long, env = "MUON_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: String,
    /// Service table (JSON, muon_core::ServiceTable). Re-read when it changes and on SIGHUP.
    /// Without it the table is empty and every outbound connection passes through.
    #[arg(long, env = "MUON_TABLE_FILE")]
    pub table_file: Option<String>,
    /// Deadline for each upstream connect attempt (e.g. 500ms, 5s, 1m).
    #[arg(long, env = "MUON_CONNECT_TIMEOUT", default_value = "5s")]
    pub connect_timeout: String,
    /// Close a connection after this long without a byte in either direction.
    #[arg(long, env = "MUON_IDLE_TIMEOUT", default_value = "1h")]
    pub idle_timeout: String,
    /// On SIGTERM/SIGINT or /drain, how long open connections may take to finish.
    #[arg(long, env = "MUON_DRAIN_TIMEOUT", default_value = "20s")]
    pub drain_timeout: String,
    /// Open proxied connections allowed across both directions; beyond it, accept and close.
    #[arg(long, env = "MUON_MAX_CONNECTIONS", default_value = "10000")]
    pub max_connections: String,
    /// Runtime threads: 1 runs a single-threaded runtime (smallest footprint).
    #[arg(long, env = "MUON_WORKERS", default_value = "1")]
    pub workers: String,
    /// Log output: human or json (one JSON object per line).
    #[arg(long, env = "MUON_LOG_FORMAT", default_value = "human")]
    pub log_format: String,
    /// Log level or tracing EnvFilter directives, e.g. `info` or `info,access=off`.
    #[arg(long, env = "MUON_LOG", default_value = "info")]
    pub log_level: String,
    /// This pod's name, stamped on access logs as proxy_pod.
    #[arg(long, env = "POD_NAME", default_value = "")]
    pub pod_name: String,
    /// This pod's namespace, stamped on access logs as proxy_namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "")]
    pub pod_namespace: String,
    /// The control plane's discovery address, e.g. http://198.18.0.2:15010. Replaces
    /// --table-file (the two cannot be combined).
    #[arg(long, env = "MUON_CONTROL_PLANE")]
    pub control_plane: Option<String>,
    /// Where the last good tables from the control plane are saved, and loaded from when the
    /// control plane cannot be reached at start.
    #[arg(long, env = "MUON_STATE_DIR", default_value = "/var/lib/muon-proxy")]
    pub state_dir: String,
    /// all: subscribe to every service, endpoints, route and policy. on-demand: every service,
    /// route and policy, but a service's endpoints only once a connection goes to it.
    #[arg(long, env = "MUON_DISCOVERY_MODE", default_value = "all")]
    pub discovery_mode: String,
    /// allow-any: destinations no service claims pass through. registry-only: refused.
    #[arg(long, env = "MUON_OUTBOUND_POLICY", default_value = "allow-any")]
    pub outbound_policy: String,
    /// The mesh's trust bundle (PEM): the roots the control plane's certificate chains to.
    /// Required with an `https://` --control-plane.
    #[arg(long, env = "MUON_CA_BUNDLE")]
    pub ca_bundle: Option<String>,
    /// A join token (from `muonctl token create`) to get this sidecar's first certificate
    /// with; with a certificate, the sidecar does mutual TLS with the other sidecars.
    #[arg(long, env = "MUON_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// A file holding the join token (read at every attempt), instead of --join-token.
    #[arg(long, env = "MUON_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<String>,
    /// A file holding a projected Kubernetes ServiceAccount token (audience `muon-ca`; read
    /// at every attempt): the credential for the first certificate on Kubernetes, which the
    /// control plane checks with a TokenReview. Injection sets it.
    #[arg(long, env = "MUON_KUBERNETES_TOKEN_FILE")]
    pub kubernetes_token_file: Option<String>,
    /// The certificate lifetime to ask for (the CA caps it; default: the CA's).
    #[arg(long, env = "MUON_CERT_TTL")]
    pub cert_ttl: Option<String>,
    /// This pod's service account, sent to the control plane.
    #[arg(long, env = "POD_SERVICE_ACCOUNT", default_value = "")]
    pub service_account: String,
    /// This pod's zone, sent to the control plane.
    #[arg(long, env = "POD_ZONE", default_value = "")]
    pub zone: String,
    /// This pod's region, sent to the control plane.
    #[arg(long, env = "POD_REGION", default_value = "")]
    pub region: String,
    /// This pod's cloud (or network), sent to the control plane; endpoints in another
    /// cloud are used only when nothing nearer is healthy.
    #[arg(long, env = "POD_CLOUD", default_value = "")]
    pub cloud: String,
    /// Request bodies up to this size are kept so that a failed try can be retried; a larger
    /// body is sent once.
    #[arg(long, env = "MUON_RETRY_BUFFER_BYTES", default_value_t = 64 * 1024)]
    pub retry_buffer_bytes: usize,
    /// This pod's IP addresses (comma-separated), sent to the control plane.
    #[arg(long, env = "POD_IP", default_value = "")]
    pub pod_ip: String,
    /// How long to wait for a client's first bytes on a port whose protocol is not declared
    /// before treating the connection as opaque (server-first protocols send nothing).
    #[arg(long, env = "MUON_DETECT_TIMEOUT", default_value = "100ms")]
    pub detect_timeout: String,
    /// Largest request header section (request line and every header) accepted; larger
    /// gets 431.
    #[arg(long, env = "MUON_MAX_HEADER_BYTES", default_value = "65536")]
    pub max_header_bytes: String,
    /// An HTTP/1 client must send a request's whole header section within this (slowloris
    /// protection); also how long an idle keep-alive connection is kept.
    #[arg(long, env = "MUON_HEADER_READ_TIMEOUT", default_value = "10s")]
    pub header_read_timeout: String,
    /// Concurrent streams per HTTP/2 connection the proxy accepts.
    #[arg(long, env = "MUON_HTTP2_MAX_STREAMS", default_value = "1000")]
    pub http2_max_concurrent_streams: String,
    /// HTTP/2 streams a client may reset before the proxy accepts them, before it closes
    /// the connection (rapid reset, CVE-2023-44487).
    #[arg(long, env = "MUON_HTTP2_MAX_PENDING_RESETS", default_value = "20")]
    pub http2_max_pending_resets: String,
}

/// What the process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The transparent proxy of one pod: capture listeners, inbound and outbound.
    Sidecar,
    /// The mesh's edge: `--listen`, routing by a Gateway's routes.
    Gateway,
}

/// The gateway's settings.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayConfig {
    pub listen: Vec<SocketAddr>,
    /// `name.namespace` of the Gateway whose routes are served.
    pub gateway: String,
    /// Certificate chain and key files (both or neither).
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// HTTP limits, one set for every listener.
#[derive(Debug, Clone, Serialize)]
pub struct HttpConfig {
    #[serde(serialize_with = "ser_duration")]
    pub detect_timeout: Duration,
    pub max_header_bytes: usize,
    #[serde(serialize_with = "ser_duration")]
    pub header_read_timeout: Duration,
    pub http2_max_concurrent_streams: u32,
    pub http2_max_pending_resets: usize,
}

/// Which resources the discovery client subscribes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiscoveryMode {
    /// `*` for every kind.
    All,
    /// `*` for services, routes and policies; endpoints by name, the first time an outbound
    /// connection goes to their service (`discovery::on_demand`).
    OnDemand,
}

/// What happens to an outbound connection no service claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutboundPolicy {
    /// Pass it through to its original destination.
    AllowAny,
    /// Refuse it (`refused_unknown`).
    RegistryOnly,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// The effective configuration. Serialised as-is by the admin `/config_dump`.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub mode: Mode,
    /// Set in gateway mode.
    pub gateway: Option<GatewayConfig>,
    pub http: HttpConfig,
    pub outbound_addrs: Vec<SocketAddr>,
    pub inbound_addrs: Vec<SocketAddr>,
    pub health_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub table_file: Option<PathBuf>,
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub drain_timeout: Duration,
    pub max_connections: usize,
    pub workers: usize,
    pub log_format: LogFormat,
    pub log_level: String,
    pub pod_name: String,
    pub pod_namespace: String,
    /// The control plane's address (`http://host:port`), when tables come from it.
    pub control_plane: Option<String>,
    pub state_dir: PathBuf,
    pub discovery_mode: DiscoveryMode,
    pub outbound_policy: OutboundPolicy,
    pub service_account: String,
    pub zone: String,
    pub region: String,
    pub cloud: String,
    pub retry_buffer_bytes: usize,
    pub pod_ips: Vec<std::net::IpAddr>,
    /// Roots of the control plane's TLS (`--ca-bundle`).
    pub ca_bundle: Option<PathBuf>,
    /// Where the join token comes from, when this sidecar gets a mesh certificate.
    #[serde(skip)]
    pub join_token: Option<JoinToken>,
    #[serde(serialize_with = "ser_opt_duration")]
    pub cert_ttl: Option<Duration>,
}

/// The credential for a first certificate: a join token, or the file it is read from, or a
/// file holding a Kubernetes ServiceAccount token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinToken {
    Value(String),
    File(PathBuf),
    KubernetesFile(PathBuf),
}

impl JoinToken {
    /// The token (a file is read now: it may have been replaced).
    pub fn read(&self) -> std::io::Result<String> {
        match self {
            JoinToken::Value(t) => Ok(t.clone()),
            JoinToken::File(p) | JoinToken::KubernetesFile(p) => {
                std::fs::read_to_string(p).map(|t| t.trim().to_owned())
            }
        }
    }
}

fn ser_opt_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&format_duration(*d)),
        None => s.serialize_none(),
    }
}

/// Every problem found in the flags, reported together.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid configuration:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

/// Upper bound for --workers: more threads than this is a typo, not a sidecar.
const MAX_WORKERS: usize = 256;

impl Config {
    /// Where this pod runs (empty flags: unknown).
    pub fn locality(&self) -> crate::balance::Locality {
        let known = |s: &str| (!s.is_empty()).then(|| s.into());
        crate::balance::Locality {
            zone: known(&self.zone),
            region: known(&self.region),
            cloud: known(&self.cloud),
        }
    }

    /// Validates the raw flags. Never stops at the first problem.
    pub fn from_args(args: Args) -> Result<Config, ConfigError> {
        let mut p = Problems::default();
        let outbound_addrs = p.check("--outbound-addr", parse_addrs(&args.outbound_addr));
        let inbound_addrs = p.check("--inbound-addr", parse_addrs(&args.inbound_addr));
        let health_addr = p.check("--health-addr", parse_addr(&args.health_addr));
        let admin_addr = p.check("--admin-addr", parse_addr(&args.admin_addr));
        let table_file = match args.table_file.as_deref() {
            None => Some(None),
            Some("") => p.fail("--table-file", "must not be empty when set".into()),
            Some(path) => Some(Some(PathBuf::from(path))),
        };
        let connect_timeout = p.check("--connect-timeout", parse_positive(&args.connect_timeout));
        let idle_timeout = p.check("--idle-timeout", parse_positive(&args.idle_timeout));
        let drain_timeout = p.check("--drain-timeout", parse_duration(&args.drain_timeout));
        let max_connections = p.check(
            "--max-connections",
            parse_count(
                &args.max_connections,
                1,
                tokio::sync::Semaphore::MAX_PERMITS,
            ),
        );
        let workers = p.check("--workers", parse_count(&args.workers, 1, MAX_WORKERS));
        let log_format = match args.log_format.as_str() {
            "human" => Some(LogFormat::Human),
            "json" => Some(LogFormat::Json),
            other => p.fail(
                "--log-format",
                format!("{other:?} is not one of: human, json"),
            ),
        };
        let log_level = match tracing_subscriber::EnvFilter::try_new(&args.log_level) {
            Ok(_) => Some(args.log_level.clone()),
            Err(e) => p.fail("--log-level", format!("{:?}: {e}", args.log_level)),
        };

        let tls_control_plane = args
            .control_plane
            .as_deref()
            .is_some_and(|c| c.trim().starts_with("https://"));
        let ca_bundle = match args.ca_bundle.as_deref().map(str::trim) {
            None | Some("") if tls_control_plane => p.fail(
                "--ca-bundle",
                "is required with an https:// --control-plane (the roots its certificate chains to)".into(),
            ),
            None | Some("") => Some(None),
            Some(path) => match std::fs::read(path) {
                Ok(pem) => match muon_api::connect::roots_from_pem(&pem) {
                    Ok(_) => Some(Some(PathBuf::from(path))),
                    Err(e) => p.fail("--ca-bundle", format!("{path}: {e}")),
                },
                Err(e) => p.fail("--ca-bundle", format!("{path}: {e}")),
            },
        };
        fn given(o: &Option<String>) -> Option<&str> {
            o.as_deref().map(str::trim).filter(|t| !t.is_empty())
        }
        let join_token = match (
            given(&args.join_token),
            given(&args.join_token_file),
            given(&args.kubernetes_token_file),
        ) {
            (Some(t), None, None) => Some(Some(JoinToken::Value(t.into()))),
            (None, Some(f), None) => Some(Some(JoinToken::File(f.into()))),
            (None, None, Some(f)) => Some(Some(JoinToken::KubernetesFile(f.into()))),
            (None, None, None) => Some(None),
            _ => p.fail(
                "--join-token",
                "give one of --join-token, --join-token-file and --kubernetes-token-file".into(),
            ),
        };
        if let (Some(Some(_)), None) = (&join_token, &args.control_plane) {
            p.fail::<()>(
                "--join-token",
                "needs --control-plane (the certificate authority)".into(),
            );
        }
        let cert_ttl = match args.cert_ttl.as_deref() {
            None => Some(None),
            Some(t) => p.check("--cert-ttl", parse_positive(t)).map(Some),
        };
        let control_plane = match args.control_plane.as_deref().map(str::trim) {
            None | Some("") => Some(None),
            Some(addr) => p.check("--control-plane", parse_control_plane(addr).map(Some)),
        };
        if let (Some(Some(_)), Some(Some(_))) = (&control_plane, &table_file) {
            p.fail::<()>(
                "--control-plane",
                "cannot be combined with --table-file: tables come from one source".into(),
            );
        }
        let state_dir = match args.state_dir.trim() {
            "" => p.fail("--state-dir", "must not be empty".into()),
            dir => Some(PathBuf::from(dir)),
        };
        let discovery_mode = match args.discovery_mode.as_str() {
            "all" => Some(DiscoveryMode::All),
            "on-demand" => Some(DiscoveryMode::OnDemand),
            other => p.fail(
                "--discovery-mode",
                format!("{other:?} is not one of: all, on-demand"),
            ),
        };
        let outbound_policy = match args.outbound_policy.as_str() {
            "allow-any" => Some(OutboundPolicy::AllowAny),
            "registry-only" => Some(OutboundPolicy::RegistryOnly),
            other => p.fail(
                "--outbound-policy",
                format!("{other:?} is not one of: allow-any, registry-only"),
            ),
        };
        let pod_ips = p.check("--pod-ip", parse_ips(&args.pod_ip));
        let mode = match args.mode.as_str() {
            "sidecar" => Some(Mode::Sidecar),
            "gateway" => Some(Mode::Gateway),
            other => p.fail(
                "--mode",
                format!("{other:?} is not one of: sidecar, gateway"),
            ),
        };
        let gateway = match mode {
            Some(Mode::Gateway) => gateway_config(&args, &mut p).map(Some),
            _ => {
                for (flag, set) in [
                    ("--listen", !args.listen.trim().is_empty()),
                    ("--gateway", !args.gateway.trim().is_empty()),
                    ("--tls-cert", args.tls_cert.is_some()),
                    ("--tls-key", args.tls_key.is_some()),
                ] {
                    if set {
                        p.fail::<()>(flag, "only applies with --mode gateway".into());
                    }
                }
                Some(None)
            }
        };
        let detect_timeout = p.check("--detect-timeout", parse_positive(&args.detect_timeout));
        let max_header_bytes = p.check(
            "--max-header-bytes",
            parse_count(&args.max_header_bytes, 1024, 16 * 1024 * 1024),
        );
        let header_read_timeout = p.check(
            "--header-read-timeout",
            parse_positive(&args.header_read_timeout),
        );
        let h2_streams = p.check(
            "--http2-max-concurrent-streams",
            parse_count(&args.http2_max_concurrent_streams, 1, 1 << 20),
        );
        let h2_resets = p.check(
            "--http2-max-pending-resets",
            parse_count(&args.http2_max_pending_resets, 1, 100_000),
        );
        let http = (|| {
            Some(HttpConfig {
                detect_timeout: detect_timeout?,
                max_header_bytes: max_header_bytes?,
                header_read_timeout: header_read_timeout?,
                http2_max_concurrent_streams: u32::try_from(h2_streams?).ok()?,
                http2_max_pending_resets: h2_resets?,
            })
        })();

        if let (Some(o), Some(i), Some(h), Some(a)) =
            (&outbound_addrs, &inbound_addrs, &health_addr, &admin_addr)
        {
            let roles: [(&str, &[SocketAddr]); 4] = [
                ("--outbound-addr", o),
                ("--inbound-addr", i),
                ("--health-addr", std::slice::from_ref(h)),
                ("--admin-addr", std::slice::from_ref(a)),
            ];
            check_overlaps(&roles, &mut p);
            if let Some(Some(g)) = &gateway {
                let roles: [(&str, &[SocketAddr]); 3] = [
                    ("--listen", &g.listen),
                    ("--health-addr", std::slice::from_ref(h)),
                    ("--admin-addr", std::slice::from_ref(a)),
                ];
                check_overlaps(&roles, &mut p);
            }
        }

        // Every field is `Some` exactly when its check passed.
        let config = (|| {
            Some(Config {
                mode: mode?,
                gateway: gateway?,
                http: http?,
                outbound_addrs: outbound_addrs?,
                inbound_addrs: inbound_addrs?,
                health_addr: health_addr?,
                admin_addr: admin_addr?,
                table_file: table_file?,
                connect_timeout: connect_timeout?,
                idle_timeout: idle_timeout?,
                drain_timeout: drain_timeout?,
                max_connections: max_connections?,
                workers: workers?,
                log_format: log_format?,
                log_level: log_level?,
                pod_name: args.pod_name,
                pod_namespace: args.pod_namespace,
                control_plane: control_plane?,
                state_dir: state_dir?,
                discovery_mode: discovery_mode?,
                outbound_policy: outbound_policy?,
                service_account: args.service_account,
                zone: args.zone,
                region: args.region,
                cloud: args.cloud,
                retry_buffer_bytes: args.retry_buffer_bytes,
                pod_ips: pod_ips?,
                ca_bundle: ca_bundle?,
                join_token: join_token?,
                cert_ttl: cert_ttl?,
            })
        })();
        match config {
            Some(config) if p.0.is_empty() => Ok(config),
            _ => Err(ConfigError { problems: p.0 }),
        }
    }
}

/// `--listen`, `--gateway` and the TLS files, checked together (gateway mode only).
fn gateway_config(args: &Args, p: &mut Problems) -> Option<GatewayConfig> {
    let listen = p.check("--listen", parse_addrs(&args.listen));
    let gateway = match args.gateway.trim() {
        "" => p.fail(
            "--gateway",
            "is required with --mode gateway (NAME.NAMESPACE of a Gateway)".into(),
        ),
        g if g
            .split_once('.')
            .is_some_and(|(n, ns)| !n.is_empty() && !ns.is_empty()) =>
        {
            Some(g.to_string())
        }
        g => p.fail("--gateway", format!("{g:?} is not NAME.NAMESPACE")),
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (None, None) => Some(None),
        (Some(c), Some(k)) if !c.is_empty() && !k.is_empty() => {
            Some(Some((PathBuf::from(c), PathBuf::from(k))))
        }
        _ => p.fail(
            "--tls-cert",
            "needs --tls-key (and the other way round)".into(),
        ),
    };
    Some(GatewayConfig {
        listen: listen?,
        gateway: gateway?,
        tls: tls?,
    })
}

#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check<T>(&mut self, flag: &str, r: Result<T, String>) -> Option<T> {
        r.map_err(|e| self.0.push(format!("{flag}: {e}"))).ok()
    }
    fn fail<T>(&mut self, flag: &str, e: String) -> Option<T> {
        self.0.push(format!("{flag}: {e}"));
        None
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an address like 0.0.0.0:15001 or [::]:15001"))
}

fn parse_addrs(s: &str) -> Result<Vec<SocketAddr>, String> {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match parse_addr(part) {
            Ok(a) if out.contains(&a) => bad.push(format!("{a} is listed twice")),
            Ok(a) => out.push(a),
            Err(e) => bad.push(e),
        }
    }
    if out.is_empty() && bad.is_empty() {
        bad.push("at least one address is required".into());
    }
    if bad.is_empty() {
        Ok(out)
    } else {
        Err(bad.join("; "))
    }
}

/// `http://host:port` (or `https://`); a bare `host:port` gets `http://`.
fn parse_control_plane(s: &str) -> Result<String, String> {
    let url = if s.contains("://") {
        s.to_owned()
    } else {
        format!("http://{s}")
    };
    let bad = || format!("{s:?} is not an address like http://198.18.0.2:15010");
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(bad)?;
    let authority = rest.split('/').next().unwrap_or_default();
    let port = authority.rsplit_once(':').map(|(_, p)| p).ok_or_else(bad)?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 && !authority.starts_with(':') => Ok(url),
        _ => Err(bad()),
    }
}

fn parse_ips(s: &str) -> Result<Vec<std::net::IpAddr>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse() {
            Ok(ip) if !out.contains(&ip) => out.push(ip),
            Ok(_) => {}
            Err(_) => return Err(format!("{part:?} is not an IP address")),
        }
    }
    Ok(out)
}

fn parse_count(s: &str, min: usize, max: usize) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a whole number from {min} to {max}")),
    }
}

use muon_core::duration::parse_flag_positive as parse_positive;
pub use muon_core::duration::{format as format_duration, parse_flag as parse_duration};

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

/// Two servers cannot share a port on overlapping addresses (port 0 means "any free port").
fn check_overlaps(roles: &[(&str, &[SocketAddr])], p: &mut Problems) {
    let overlap = |a: &SocketAddr, b: &SocketAddr| {
        a.port() != 0
            && a.port() == b.port()
            && a.is_ipv4() == b.is_ipv4()
            && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
    };
    for (i, (ra, aa)) in roles.iter().enumerate() {
        for (rb, bb) in &roles[i + 1..] {
            for a in aa.iter() {
                for b in bb.iter().filter(|b| overlap(a, b)) {
                    p.0.push(format!("{ra} {a} and {rb} {b} overlap"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Config, ConfigError> {
        let argv = std::iter::once("muon-proxy").chain(extra.iter().copied());
        Config::from_args(Args::try_parse_from(argv).unwrap())
    }

    #[test]
    fn one_credential_for_the_first_certificate() {
        let cp = ["--control-plane", "http://127.0.0.1:15010"];
        let with = |extra: &[&str]| parse(&[&cp[..], extra].concat());
        let c = with(&["--kubernetes-token-file", "/var/run/secrets/muon/token"]).unwrap();
        assert_eq!(
            c.join_token,
            Some(JoinToken::KubernetesFile(
                "/var/run/secrets/muon/token".into()
            ))
        );
        let c = with(&["--join-token-file", "/tmp/t"]).unwrap();
        assert_eq!(c.join_token, Some(JoinToken::File("/tmp/t".into())));
        let e = with(&["--join-token", "abc", "--kubernetes-token-file", "/t"]).unwrap_err();
        assert!(e.to_string().contains("give one of"), "{e}");
    }

    #[test]
    fn defaults_follow_the_well_known_ports() {
        let c = parse(&[]).unwrap();
        let ports = |v: &[SocketAddr]| v.iter().map(|a| a.port()).collect::<Vec<_>>();
        assert_eq!(ports(&c.outbound_addrs), [muon_core::ports::OUTBOUND; 2]);
        assert_eq!(ports(&c.inbound_addrs), [muon_core::ports::INBOUND; 2]);
        assert!(c.outbound_addrs[1].is_ipv6());
        assert_eq!(c.health_addr.port(), muon_core::ports::HEALTH);
        assert_eq!(
            c.admin_addr,
            SocketAddr::from(([127, 0, 0, 1], muon_core::ports::ADMIN))
        );
        assert_eq!(c.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.idle_timeout, Duration::from_secs(3600));
        assert_eq!(c.drain_timeout, Duration::from_secs(20));
        assert_eq!((c.max_connections, c.workers), (10_000, 1));
        assert_eq!(c.log_format, LogFormat::Human);
        assert_eq!(c.table_file, None);
        assert_eq!((c.mode, c.gateway.is_none()), (Mode::Sidecar, true));
        assert_eq!(c.http.detect_timeout, Duration::from_millis(100));
        assert_eq!(c.http.max_header_bytes, 65536);
        assert_eq!(c.http.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.http.http2_max_concurrent_streams, 1000);
    }

    #[test]
    fn gateway_mode_needs_its_listeners_and_gateway_and_both_tls_files() {
        let c = parse(&[
            "--mode",
            "gateway",
            "--listen",
            "0.0.0.0:8080",
            "--gateway",
            "edge.shop",
        ])
        .unwrap();
        let g = c.gateway.unwrap();
        assert_eq!(
            (g.listen.len(), g.gateway.as_str(), g.tls),
            (1, "edge.shop", None)
        );
        let err = parse(&[
            "--mode",
            "gateway",
            "--tls-cert",
            "/c.pem",
            "--gateway",
            "edge",
        ])
        .unwrap_err()
        .to_string();
        for want in [
            "--listen",
            "--gateway: \"edge\" is not NAME.NAMESPACE",
            "--tls-cert: needs --tls-key",
        ] {
            assert!(err.contains(want), "{want} missing from {err}");
        }
        let err = parse(&["--listen", "0.0.0.0:8080"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--listen: only applies with --mode gateway"),
            "{err}"
        );
        let err = parse(&["--mode", "edge", "--detect-timeout", "0s"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--mode") && err.contains("--detect-timeout"),
            "{err}"
        );
    }

    #[test]
    fn every_config_problem_is_reported_at_once() {
        let err = parse(&[
            "--outbound-addr",
            "nope",
            "--connect-timeout",
            "5 parsecs",
            "--idle-timeout",
            "0s",
            "--max-connections",
            "0",
            "--workers",
            "many",
            "--log-format",
            "xml",
            "--log-level",
            "info,foo=notalevel",
            "--table-file",
            "",
        ])
        .unwrap_err();
        let flags = [
            "--outbound-addr",
            "--connect-timeout",
            "--idle-timeout",
            "--max-connections",
            "--workers",
            "--log-format",
            "--log-level",
            "--table-file",
        ];
        assert_eq!(err.problems.len(), flags.len(), "{err}");
        for flag in flags {
            assert!(err.to_string().contains(flag), "{flag} missing from {err}");
        }
    }

    #[test]
    fn control_plane_flags_are_checked_together() {
        let c = parse(&[
            "--control-plane",
            "198.18.0.2:15010",
            "--pod-ip",
            "198.18.0.3",
        ])
        .unwrap();
        assert_eq!(c.control_plane.as_deref(), Some("http://198.18.0.2:15010"));
        assert_eq!(c.discovery_mode, DiscoveryMode::All);
        assert_eq!(c.outbound_policy, OutboundPolicy::AllowAny);
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/muon-proxy"));
        assert_eq!(
            c.pod_ips,
            ["198.18.0.3".parse::<std::net::IpAddr>().unwrap()]
        );
        let err = parse(&[
            "--control-plane",
            "http://cp:15010",
            "--table-file",
            "/t.json",
            "--discovery-mode",
            "some",
            "--outbound-policy",
            "deny",
            "--pod-ip",
            "x",
        ])
        .unwrap_err();
        for flag in [
            "--control-plane",
            "--discovery-mode",
            "--outbound-policy",
            "--pod-ip",
        ] {
            assert!(err.to_string().contains(flag), "{flag} missing from {err}");
        }
        assert!(err.to_string().contains("--table-file"), "{err}");
        assert!(parse(&["--control-plane", "http://cp"]).is_err());
        let c = parse(&[
            "--control-plane",
            "cp:15010",
            "--discovery-mode",
            "on-demand",
        ])
        .unwrap();
        assert_eq!(c.discovery_mode, DiscoveryMode::OnDemand);
    }

    #[test]
    fn overlapping_listeners_are_rejected() {
        let err = parse(&["--admin-addr", "127.0.0.1:15001"]).unwrap_err();
        assert!(err.problems[0].contains("overlap"), "{err}");
        // Different families never overlap (IPv6 listeners are V6ONLY), nor do port-0 binds.
        parse(&[
            "--outbound-addr",
            "127.0.0.1:0",
            "--inbound-addr",
            "127.0.0.1:0",
        ])
        .unwrap();
    }
}
