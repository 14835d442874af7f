//! The scenarios: one lab per scenario, each a client pod and a server pod, and the same
//! server app (`demo-shop echo`, 1 KiB answers, on 8080; the bulk server on 9000; in HTTP
//! mode also `demo-shop echo-grpc`, 1 KiB gRPC answers, on 8081).
//!
//! - `direct`: `sidecar: false`, no capture, no proxy: the baseline.
//! - `muon`: `sidecar: true`: the lab's own muon-init and muon-proxy in each pod. The client
//!   calls the service's virtual IP, as an app in the mesh would. The service declares 8080
//!   `tcp` in L4 mode and `http` in HTTP mode (and 8081 `grpc`). In L4 and HTTP modes the
//!   lab has no control plane (`controlPlane: false`: the sidecars read the lab's static
//!   table), so the sidecars have no mesh certificates and are plaintext between them, as
//!   the peers are; the smoke test checks that they counted no mTLS connection.
//! - `envoy`, `haproxy`, `nginx`: `sidecar: false` pods in which the harness runs muon-init
//!   itself (as root) and starts the peer as UID 1337 on each side (see `peers`).
//!
//! `--mode mtls` runs the labs of `--mode http` (labs `bench-<name>-mtls`, so both modes can
//! be up at once). The peers get the run's test certificates (see `pki`) and must pass
//! `check_peer_mtls` once at start; Muon's lab keeps its control plane, from which the
//! sidecars take their own mesh certificates, and the smoke test fails the scenario unless
//! their metrics show mTLS connections between them.
//!
//! A `Running` scenario owns its lab and its peer processes: dropping it stops the peers (by
//! process group) and runs `muonctl lab down`, on success, on error and on panic alike.

use super::peers::{self, Peer, PeerBin, Proto, Side, SideCtx};
use super::pki::{self, TestPki};
use super::procs::{self, Background};
use super::tlsprobe::ProbeReport;
use super::{Env, Mode};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const HTTP_PORT: u16 = 8080;
pub const BULK_PORT: u16 = 9000;
/// The gRPC echo server (HTTP mode).
pub const GRPC_PORT: u16 = 8081;
/// The proxy user every sidecar runs as (muon-init's default exclusion).
const PROXY_UID: &str = "1337";
const PROXY_UID_NUM: u32 = 1337;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Direct,
    Muon,
    Envoy,
    Haproxy,
    Nginx,
    /// Not a lab of this module: the gray-failure scenario of HTTP mode (see `gray`).
    GrayFailure,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Direct,
        Kind::Muon,
        Kind::Envoy,
        Kind::Haproxy,
        Kind::Nginx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Muon => "muon",
            Kind::Envoy => "envoy",
            Kind::Haproxy => "haproxy",
            Kind::Nginx => "nginx",
            Kind::GrayFailure => "gray-failure",
        }
    }

    pub fn peer(self) -> Option<Peer> {
        match self {
            Kind::Envoy => Some(Peer::Envoy),
            Kind::Haproxy => Some(Peer::Haproxy),
            Kind::Nginx => Some(Peer::Nginx),
            Kind::Direct | Kind::Muon | Kind::GrayFailure => None,
        }
    }

    pub fn is_peer(self) -> bool {
        self.peer().is_some()
    }

    /// The scenario in a mode, as the run names its lab and directories: `envoy`, or
    /// `envoy-mtls` in mTLS mode (so that `--mode http,mtls` has both up at once).
    pub fn label(self, mode: Mode) -> String {
        match mode {
            Mode::Mtls => format!("{}-mtls", self.name()),
            Mode::L4 | Mode::Http => self.name().to_string(),
        }
    }

    pub fn lab(self, mode: Mode) -> String {
        format!("bench-{}", self.label(mode))
    }
}

/// The lab's topology for a scenario.
pub fn topology(kind: Kind, bin: &Path, mode: Mode) -> String {
    let sidecar = kind == Kind::Muon;
    let bench = bin.join("muon-bench").display().to_string();
    let shop = bin.join("demo-shop").display().to_string();
    // mTLS mode runs HTTP mode's labs: TLS is between the proxies, not in the topology.
    let (protocol, grpc_app, grpc_port) = match mode {
        Mode::L4 => ("tcp", String::new(), String::new()),
        Mode::Http | Mode::Mtls => (
            "http",
            format!("{shop} echo-grpc --port {GRPC_PORT} --size 1024 & "),
            format!("      - {{port: {GRPC_PORT}, protocol: grpc}}\n"),
        ),
    };
    // The lab's control plane certifies every sidecar, and certified sidecars do mTLS with
    // each other. In L4 and HTTP modes Muon's sidecars must be plaintext between them, as
    // the peers are: no control plane, the lab's static table (the same services, ports and
    // meshed endpoints), no certificates. mTLS mode keeps the control plane.
    let control_plane = if sidecar && mode != Mode::Mtls {
        "# Plaintext between the sidecars: no control plane, so no mesh certificates.\ncontrolPlane: false\n"
    } else {
        ""
    };
    format!(
        r#"# cargo xtask bench: scenario {name}
ipv6: false
{control_plane}pods:
  - name: client
    labels: {{app: client}}
    sidecar: {sidecar}
  - name: server
    labels: {{app: server}}
    sidecar: {sidecar}
    command: ["/bin/sh", "-c", "{bench} bench bulk-server --port {BULK_PORT} & {grpc_app}exec {shop} echo --port {HTTP_PORT} --size 1024"]
services:
  - name: server
    selector: {{app: server}}
    ports:
      - {{port: {HTTP_PORT}, protocol: {protocol}}}
{grpc_port}      - {{port: {BULK_PORT}, protocol: tcp}}
"#,
        name = kind.name()
    )
}

/// What a pair carries on a port in a mode.
pub fn proto_for(mode: Mode, port: u16) -> Proto {
    match mode {
        Mode::L4 => Proto::Tcp,
        Mode::Http | Mode::Mtls if port == GRPC_PORT => Proto::Grpc,
        Mode::Http | Mode::Mtls if port == BULK_PORT => Proto::Tcp,
        Mode::Http | Mode::Mtls => Proto::Http,
    }
}

/// A peer pair: its two processes and the port it forwards to.
struct PeerPair {
    bin: PeerBin,
    port: u16,
    client: Background,
    server: Background,
}

/// A scenario whose lab is up and whose proxies are ready.
pub struct Running {
    pub kind: Kind,
    pub lab: String,
    pub mode: Mode,
    muonctl: PathBuf,
    bench_bin: PathBuf,
    dir: PathBuf,
    run_dir: PathBuf,
    pub server_ip: Ipv4Addr,
    pub vip: Ipv4Addr,
    /// The proxies' pids by side ("client", "server"); empty for direct.
    pub proxies: BTreeMap<String, Vec<i32>>,
    peer: Option<PeerPair>,
    /// mTLS mode: the certificates the peers' sides get.
    pki: Option<TestPki>,
    /// mTLS mode: what `check_peer_mtls` (peers) or the smoke test (Muon) saw.
    pub mtls_check: Option<String>,
}

impl Running {
    /// Brings the scenario up in a mode: lab, capture, peers; then checks traffic flows
    /// through them (and, in mTLS mode, that the pair does mutual TLS).
    pub fn start(env: &Env, kind: Kind, mode: Mode, peer_bin: Option<&PeerBin>) -> Result<Running> {
        let lab = kind.lab(mode);
        let label = kind.label(mode);
        let dir = env.out.join("scenarios").join(&label);
        let pki = match mode {
            Mode::Mtls => Some(env.pki.clone().context("mTLS mode without a test PKI")?),
            Mode::L4 | Mode::Http => None,
        };
        std::fs::create_dir_all(&dir)?;
        // Leftovers of an interrupted run hold the name.
        if Path::new("/run/muon/lab").join(&lab).exists() {
            procs::lab_down(&env.muonctl, &lab);
        }
        let topo = dir.join("topology.yaml");
        std::fs::write(&topo, topology(kind, &env.bench_bin, mode))?;
        procs::register_lab(&env.muonctl, &lab);
        let mut running = Running {
            kind,
            lab: lab.clone(),
            mode,
            muonctl: env.muonctl.clone(),
            bench_bin: env.bench_bin.clone(),
            run_dir: env
                .bench_bin
                .parent()
                .unwrap_or(Path::new("/run/muon/bench"))
                .join("run")
                .join(&label),
            dir,
            server_ip: Ipv4Addr::UNSPECIFIED,
            vip: Ipv4Addr::UNSPECIFIED,
            proxies: BTreeMap::new(),
            peer: None,
            pki,
            mtls_check: None,
        };
        let (ok, out, err) = procs::run_bounded(
            Command::new(&env.muonctl)
                .args(["lab", "up", "-f"])
                .arg(&topo)
                .args(["--name", &lab, "--detach", "--timeout", "60s", "--bin-dir"])
                .arg(&env.lab_bins),
            Duration::from_secs(120),
        )?;
        std::fs::write(running.dir.join("lab-up.log"), format!("{out}{err}"))?;
        if !ok {
            bail!("muonctl lab up failed: {}", last_lines(&err, 8));
        }
        running.read_status()?;
        if let Some(bin) = peer_bin {
            running.start_peer(bin.clone())?;
        }
        running.smoke()?;
        if running.pki.is_some() && running.peer.is_some() {
            running.mtls_check = Some(running.check_peer_mtls()?);
        }
        if running.pki.is_some() && kind == Kind::Muon {
            // The smoke test has checked them; what they say, for the report.
            let c = running.muon_http_counters()?;
            running.mtls_check = Some(format!(
                "muon_tls_connections_total{{result=\"ok\"}}: client sidecar outbound {}, server sidecar inbound {}",
                c.client_tls_ok, c.server_tls_ok
            ));
        }
        Ok(running)
    }

    /// The run's name for this scenario in its mode (`envoy`, `envoy-mtls`).
    pub fn label(&self) -> String {
        self.kind.label(self.mode)
    }

    fn read_status(&mut self) -> Result<()> {
        let (ok, out, err) = procs::run_bounded(
            Command::new(&self.muonctl).args(["lab", "status", &self.lab, "-o", "json"]),
            Duration::from_secs(30),
        )?;
        if !ok {
            bail!("muonctl lab status failed: {}", last_lines(&err, 5));
        }
        let labs: serde_json::Value =
            serde_json::from_str(&out).context("lab status is not JSON")?;
        let lab = &labs[0];
        let pod = |name: &str| {
            lab["pods"]
                .as_array()
                .and_then(|p| p.iter().find(|p| p["name"] == name))
                .cloned()
        };
        let server = pod("server").context("no server pod in lab status")?;
        self.server_ip = server["ip"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .context("server pod has no ip")?;
        self.vip = lab["services"][0]["vip"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .context("service has no vip")?;
        if self.kind == Kind::Muon {
            for side in ["client", "server"] {
                let pid = pod(side)
                    .and_then(|p| p["sidecarPid"].as_i64())
                    .with_context(|| format!("pod {side} has no sidecarPid"))?;
                self.proxies.insert(side.into(), vec![pid as i32]);
            }
        }
        Ok(())
    }

    /// Where the client calls a port: the service VIP through Muon, the server pod otherwise.
    pub fn target(&self, port: u16) -> SocketAddr {
        match self.kind {
            Kind::Muon => SocketAddr::from((self.vip, port)),
            _ => SocketAddr::from((self.server_ip, port)),
        }
    }

    pub fn http_target(&self) -> SocketAddr {
        self.target(HTTP_PORT)
    }

    pub fn grpc_target(&self) -> SocketAddr {
        self.target(GRPC_PORT)
    }

    pub fn bulk_target(&self) -> SocketAddr {
        self.target(BULK_PORT)
    }

    /// muon-init (as root) in both pods, then the peer on each side as UID 1337.
    fn start_peer(&mut self, bin: PeerBin) -> Result<()> {
        let init = Path::new("/run/muon/lab")
            .join(&self.lab)
            .join("bin/muon-init");
        for pod in ["client", "server"] {
            let (ok, out, err) = procs::run_bounded(
                Command::new(&self.muonctl)
                    .args(["lab", "exec", &self.lab, pod, "--user", "0", "--"])
                    .arg(&init)
                    .args(["--ipv6", "off"]),
                Duration::from_secs(30),
            )?;
            std::fs::write(
                self.dir.join(format!("{pod}.init.log")),
                format!("{out}{err}"),
            )?;
            if !ok {
                bail!(
                    "muon-init in pod {pod} failed: {}",
                    last_lines(&format!("{out}{err}"), 8)
                );
            }
        }
        self.launch_pair(bin, HTTP_PORT)
    }

    fn launch_pair(&mut self, bin: PeerBin, port: u16) -> Result<()> {
        // Server side first, so the client side never forwards into nothing.
        let server = self.launch_side(&bin, Side::Server, port)?;
        let client = self.launch_side(&bin, Side::Client, port)?;
        let mut pair = PeerPair {
            bin,
            port,
            client,
            server,
        };
        for side in [Side::Server, Side::Client] {
            let bg = match side {
                Side::Server => &mut pair.server,
                Side::Client => &mut pair.client,
            };
            let pids =
                wait_listening(&self.lab, side.as_str(), side, bg, pair.bin.peer, &self.dir)?;
            self.proxies.insert(side.as_str().into(), pids);
        }
        self.peer = Some(pair);
        Ok(())
    }

    fn launch_side(&self, bin: &PeerBin, side: Side, port: u16) -> Result<Background> {
        // The proxy's own directory (pid files), writable by its user only.
        let dir = self.run_dir.join(side.as_str());
        std::fs::create_dir_all(&dir)?;
        nix::unistd::chown(&dir, Some(1337.into()), Some(1337.into()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        for d in [
            self.run_dir.as_path(),
            self.run_dir.parent().unwrap_or(&self.run_dir),
        ] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
        }
        let tls = match &self.pki {
            Some(pki) => Some(pki.install(side, &dir, PROXY_UID_NUM)?),
            None => None,
        };
        let ctx = SideCtx {
            side,
            dir: &dir,
            server_ip: self.server_ip,
            port,
            proto: proto_for(self.mode, port),
            grpc_port: GRPC_PORT,
            tls,
        };
        let (cfg, argv) = peers::prepare(bin, &ctx)?;
        // Kept with the run's results.
        let keep = self.dir.join(format!(
            "{}-{}-port{port}-{}{}.{}",
            bin.peer.name(),
            side.as_str(),
            ctx.proto.as_str(),
            if ctx.tls.is_some() { "-mtls" } else { "" },
            ext(&cfg)
        ));
        std::fs::copy(&cfg, keep)?;
        let mut cmd = Command::new(&self.muonctl);
        cmd.args([
            "lab",
            "exec",
            &self.lab,
            side.as_str(),
            "--user",
            PROXY_UID,
            "--",
        ])
        .args(&argv);
        let log = self
            .dir
            .join(format!("{}-{}.log", bin.peer.name(), side.as_str()));
        Background::spawn(
            &format!("{} ({} side)", bin.peer.name(), side.as_str()),
            &mut cmd,
            &log,
        )
    }

    /// Configured-upstream peers forward to one port: restart the pair for another.
    pub fn use_port(&mut self, port: u16) -> Result<()> {
        let Some(pair) = self.peer.take() else {
            return Ok(());
        };
        if pair.bin.peer.transparent() || pair.port == port {
            self.peer = Some(pair);
            return Ok(());
        }
        let bin = pair.bin.clone();
        drop(pair);
        let started = self.launch_pair(bin, port);
        if started.is_err() {
            // The old pair is stopped and the new one did not start: nothing to measure.
            self.proxies.clear();
        }
        started
    }

    /// A few requests must get through, and through the capture rules when there are any;
    /// in HTTP and mTLS modes, Muon must have carried them as HTTP requests over HTTP/2
    /// between the sidecars, and in mTLS mode over mutual TLS.
    fn smoke(&self) -> Result<()> {
        let args = [
            "load".to_string(),
            "--addr".into(),
            self.http_target().to_string(),
            "--rate".into(),
            "200".into(),
            "--connections".into(),
            "2".into(),
            "--warmup".into(),
            "0s".into(),
            "--duration".into(),
            "500ms".into(),
            "--expect-size".into(),
            "1024".into(),
            "--json".into(),
        ];
        self.smoke_with(&args, "HTTP")
    }

    /// The same check for the gRPC port (HTTP mode): restarts configured-upstream peers on
    /// it first.
    pub fn start_grpc(&mut self) -> Result<()> {
        self.use_port(GRPC_PORT)?;
        let args = [
            "grpc-load".to_string(),
            "--addr".into(),
            self.grpc_target().to_string(),
            "--rate".into(),
            "200".into(),
            "--connections".into(),
            "1".into(),
            "--streams".into(),
            "2".into(),
            "--warmup".into(),
            "0s".into(),
            "--duration".into(),
            "500ms".into(),
            "--expect-size".into(),
            "1024".into(),
            "--json".into(),
        ];
        self.smoke_with(&args, "gRPC")
    }

    fn smoke_with(&self, args: &[String], what: &str) -> Result<()> {
        let captured = |s: &Running| -> Result<(u64, u64)> {
            if s.kind == Kind::Direct {
                return Ok((0, 0));
            }
            Ok((
                s.captured("client", "MUON_REDIRECT")?,
                s.captured("server", "MUON_IN_REDIRECT")?,
            ))
        };
        let http_mode = self.kind == Kind::Muon && matches!(self.mode, Mode::Http | Mode::Mtls);
        let counters_before = if http_mode {
            Some(self.muon_http_counters()?)
        } else {
            None
        };
        let before = captured(self)?;
        let report: super::load::LoadReport = self.run_tool(args, Duration::from_secs(30))?;
        if report.errors > 0 || report.requests == 0 {
            bail!(
                "{what} smoke test: {} answers, {} errors ({})",
                report.requests,
                report.errors,
                report.first_error.unwrap_or_default()
            );
        }
        if self.kind != Kind::Direct {
            let after = captured(self)?;
            if after.0 <= before.0 {
                bail!("{what}: no connection went through MUON_REDIRECT in pod client: traffic bypassed the proxies");
            }
            if after.1 <= before.1 {
                bail!("{what}: no connection went through MUON_IN_REDIRECT in pod server: traffic bypassed the proxies");
            }
        }
        if self.kind == Kind::Muon && self.mode != Mode::Mtls {
            let c = self.muon_http_counters()?;
            if c.client_tls_ok > 0.0 || c.server_tls_ok > 0.0 {
                bail!(
                    "{what}: Muon's sidecars did mTLS in a plaintext mode (muon_tls_connections_total{{result=\"ok\"}}: client sidecar outbound {}, server sidecar inbound {}): the comparison with the plaintext peers would not hold",
                    c.client_tls_ok,
                    c.server_tls_ok
                );
            }
        }
        if let Some(before) = counters_before {
            let after = self.muon_http_counters()?;
            let delta = |f: fn(&MuonHttpCounters) -> f64| f(&after) - f(&before);
            // The smoke test's own first requests are outside its report: at least as many.
            if delta(|c| c.client_requests_2xx) < report.total_requests as f64 {
                bail!(
                    "{what}: the client sidecar counted {} HTTP requests (muon_http_requests_total, 2xx, outbound) for {} answers: it did not carry them as HTTP",
                    delta(|c| c.client_requests_2xx),
                    report.total_requests
                );
            }
            if delta(|c| c.server_requests_2xx) < report.total_requests as f64 {
                bail!(
                    "{what}: the server sidecar counted {} inbound HTTP requests for {} answers",
                    delta(|c| c.server_requests_2xx),
                    report.total_requests
                );
            }
            if after.client_h2_upstreams < 1.0 {
                bail!("{what}: the client sidecar opened no HTTP/2 connection to the server sidecar (muon_http_upstream_connections_total{{direction=\"outbound\",protocol=\"http2\"}} is 0)");
            }
            if self.mode == Mode::Mtls {
                self.check_muon_mtls(&after)?;
            }
        }
        Ok(())
    }

    /// mTLS mode, Muon: both sidecars must count mTLS connections between them (the client's
    /// outbound, the server's inbound handshakes that succeeded). Until this build's sidecars
    /// do mTLS, the scenario fails here and the peers still run.
    fn check_muon_mtls(&self, c: &MuonHttpCounters) -> Result<()> {
        if c.client_tls_ok < 1.0 || c.server_tls_ok < 1.0 {
            bail!(
                "Muon's sidecars did not use mTLS (no muon_tls_connections_total{{result=\"ok\"}}): is this build's mTLS on? (client sidecar outbound: {}, server sidecar inbound: {})",
                c.client_tls_ok,
                c.server_tls_ok
            );
        }
        Ok(())
    }

    /// mTLS mode, peers (once, at start, on the HTTP port): from the client pod, as the proxy
    /// user (so the connection takes the client-side proxy's path to the server side), GETs
    /// through the server-side proxy (1) with the client side's certificate: answered, TLS
    /// 1.3, the server presenting its SPIFFE id; (2) without a certificate and (3) in
    /// plaintext: not answered. Since the server side listens only for TLS and the smoke
    /// test went through its capture, the pair's own connections were mutual TLS.
    fn check_peer_mtls(&self) -> Result<String> {
        let peer = self.kind.name();
        let files = pki::SideTls::in_dir(&self.run_dir.join(Side::Client.as_str()));
        let p = |f: &Path| f.display().to_string();
        let base: Vec<String> = [
            "tls-probe",
            "--addr",
            &SocketAddr::from((self.server_ip, HTTP_PORT)).to_string(),
            "--server-name",
            &pki::dns_name(Side::Server),
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let probe = |extra: &[String]| -> Result<ProbeReport> {
            let mut args = base.clone();
            args.extend_from_slice(extra);
            self.run_tool_as(Some(PROXY_UID), &args, Duration::from_secs(30))
                .context("running the TLS probe")
        };
        let ca = ["--ca".to_string(), p(&files.ca)];
        let with_cert = [
            ca.to_vec(),
            vec![
                "--cert".into(),
                p(&files.cert),
                "--key".into(),
                p(&files.key),
            ],
        ]
        .concat();
        let with = probe(&with_cert)?;
        let server_id = pki::spiffe_id(Side::Server);
        if !with.answered() {
            bail!(
                "mTLS check: {peer}'s server side did not answer a client with the client side's certificate: {}",
                with.refusal()
            );
        }
        if with.version.as_deref() != Some("TLSv1_3") {
            bail!(
                "mTLS check: {peer}'s server side negotiated {:?}, not TLS 1.3",
                with.version
            );
        }
        if !with.peer_uris.contains(&server_id) {
            bail!(
                "mTLS check: {peer}'s server side presented {:?}, not {server_id}",
                with.peer_uris
            );
        }
        let without = probe(&ca)?;
        if without.answered() {
            bail!("mTLS check: {peer}'s server side answered a client that offered no certificate (status {:?}): it does not require mutual TLS", without.status);
        }
        let plain = probe(&["--plaintext".to_string()])?;
        if plain.answered() {
            bail!(
                "mTLS check: {peer}'s server side answered a plaintext request (status {:?})",
                plain.status
            );
        }
        let summary = format!(
            "with the client side's certificate: {} over {} ({}, ALPN {}), server certificate {server_id}; without a certificate: refused ({}); plaintext: refused ({})",
            with.status.unwrap_or(0),
            with.version.as_deref().unwrap_or("?"),
            with.cipher.as_deref().unwrap_or("?"),
            with.alpn.as_deref().unwrap_or("none"),
            super::report::short(&without.refusal(), 60),
            super::report::short(&plain.refusal(), 60),
        );
        println!("   {}: mTLS check: {summary}", self.label());
        Ok(summary)
    }

    /// Muon's HTTP counters on both sidecars (their health port, from inside each pod).
    fn muon_http_counters(&self) -> Result<MuonHttpCounters> {
        let client = self.metrics("client")?;
        let server = self.metrics("server")?;
        Ok(MuonHttpCounters {
            client_requests_2xx: metric_sum(
                &client,
                "muon_http_requests_total",
                &[("direction", "outbound"), ("status_class", "2xx")],
            ),
            server_requests_2xx: metric_sum(
                &server,
                "muon_http_requests_total",
                &[("direction", "inbound"), ("status_class", "2xx")],
            ),
            client_h2_upstreams: metric_sum(
                &client,
                "muon_http_upstream_connections_total",
                &[("direction", "outbound"), ("protocol", "http2")],
            ),
            client_tls_ok: metric_sum(
                &client,
                "muon_tls_connections_total",
                &[("direction", "outbound"), ("result", "ok")],
            ),
            server_tls_ok: metric_sum(
                &server,
                "muon_tls_connections_total",
                &[("direction", "inbound"), ("result", "ok")],
            ),
        })
    }

    /// A sidecar's `/metrics`, fetched by the generator in its pod.
    fn metrics(&self, pod: &str) -> Result<String> {
        let (ok, out, err) = procs::run_bounded(
            Command::new(&self.muonctl)
                .args(["lab", "exec", &self.lab, pod, "--"])
                .arg(self.bench_bin.join("muon-bench"))
                .args([
                    "bench",
                    "get",
                    "--addr",
                    "127.0.0.1:15020",
                    "--path",
                    "/metrics",
                ]),
            Duration::from_secs(30),
        )?;
        if !ok {
            bail!(
                "metrics of pod {pod}: {}",
                last_lines(&format!("{out}{err}"), 5)
            );
        }
        Ok(out)
    }

    /// Packets that matched the chain's REDIRECT rule: traffic really was captured.
    fn captured(&self, pod: &str, chain: &str) -> Result<u64> {
        captured(&self.muonctl, &self.lab, pod, chain)
    }

    /// Runs `muon-bench bench ARGS` in the client pod as its app user; parses its JSON.
    pub fn run_tool<T: serde::de::DeserializeOwned>(
        &self,
        args: &[String],
        limit: Duration,
    ) -> Result<T> {
        self.run_tool_as(None, args, limit)
    }

    /// `run_tool` as another user of the client pod (the proxy's, whose connections the
    /// pod does not capture).
    fn run_tool_as<T: serde::de::DeserializeOwned>(
        &self,
        user: Option<&str>,
        args: &[String],
        limit: Duration,
    ) -> Result<T> {
        let mut cmd = Command::new(&self.muonctl);
        cmd.args(["lab", "exec", &self.lab, "client"]);
        if let Some(u) = user {
            cmd.args(["--user", u]);
        }
        let (ok, out, err) = procs::run_bounded(
            cmd.arg("--")
                .arg(self.bench_bin.join("muon-bench"))
                .arg("bench")
                .args(args),
            limit,
        )?;
        if !ok {
            bail!("{}", last_lines(&format!("{out}{err}"), 6));
        }
        let line = out
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .context("the generator printed no report")?;
        serde_json::from_str(line).context("the generator's report is not valid JSON")
    }

    /// Are all the proxies still running?
    pub fn proxies_alive(&self) -> bool {
        self.proxies
            .values()
            .flatten()
            .all(|&p| procs::cpu_ticks(p).is_some())
    }

    fn teardown(&mut self) {
        if let Some(mut pair) = self.peer.take() {
            pair.client.stop();
            pair.server.stop();
        }
        if self.kind == Kind::Muon {
            for pod in ["client", "server"] {
                let log = Path::new("/run/muon/lab")
                    .join(&self.lab)
                    .join("logs")
                    .join(format!("{pod}.sidecar.log"));
                let keep = self.dir.join(format!("muon-{pod}.sidecar.log"));
                let _ = keep_sidecar_log(&log, &keep);
            }
        }
        procs::lab_down(&self.muonctl, &self.lab);
        // The peers' pid files; the configs are kept in the results directory.
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Packets of `pod` that matched `chain`'s REDIRECT rule: traffic really was captured.
pub(super) fn captured(muonctl: &Path, lab: &str, pod: &str, chain: &str) -> Result<u64> {
    let (ok, out, err) = procs::run_bounded(
        Command::new(muonctl).args([
            "lab",
            "exec",
            lab,
            pod,
            "--user",
            "0",
            "--",
            "iptables-save",
            "-c",
            "-t",
            "nat",
        ]),
        Duration::from_secs(30),
    )?;
    if !ok {
        bail!("iptables-save in pod {pod}: {}", last_lines(&err, 5));
    }
    let needle = format!("-A {chain} ");
    Ok(out
        .lines()
        .filter(|l| l.contains(&needle) && l.contains("REDIRECT"))
        .filter_map(|l| l.strip_prefix('[')?.split(':').next()?.parse::<u64>().ok())
        .sum())
}

/// Copies a sidecar's log without its access events (one per request in HTTP mode: far too
/// many to keep), at most `MAX` lines: what is left is start-up, warnings and errors.
fn keep_sidecar_log(from: &Path, to: &Path) -> Result<()> {
    use std::io::{BufRead, Write};
    const MAX: usize = 10_000;
    let reader = std::io::BufReader::new(std::fs::File::open(from)?);
    let mut out = std::io::BufWriter::new(std::fs::File::create(to)?);
    let (mut kept, mut access) = (0usize, 0u64);
    for line in reader.split(b'\n') {
        let line = line?;
        if line.windows(17).any(|w| w == b"\"target\":\"access\"") {
            access += 1;
        } else if kept < MAX {
            out.write_all(&line)?;
            out.write_all(b"\n")?;
            kept += 1;
        }
    }
    writeln!(out, "# muon bench: {access} access events left out")?;
    Ok(())
}

struct MuonHttpCounters {
    client_requests_2xx: f64,
    server_requests_2xx: f64,
    client_h2_upstreams: f64,
    /// mTLS mode: handshakes that succeeded, the client sidecar's outbound and the server
    /// sidecar's inbound (`muon_tls_connections_total{direction, result="ok"}`).
    client_tls_ok: f64,
    server_tls_ok: f64,
}

/// The sum of a metric's samples whose labels include all of `labels` (Prometheus text).
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labelset, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once('}')?,
                None if rest.starts_with(' ') => ("", rest),
                None => return None,
            };
            labels
                .iter()
                .all(|(k, v)| labelset.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.split_whitespace().next()?.parse::<f64>().ok())?
        })
        .sum()
}

fn ext(p: &Path) -> String {
    p.extension()
        .and_then(|e| e.to_str())
        .unwrap_or("conf")
        .to_string()
}

/// Waits until the side's proxy in `pod` listens on its port; returns its pids: the
/// processes in the pod named like the peer *and* in the process group this harness started.
pub(super) fn wait_listening(
    lab: &str,
    pod: &str,
    side: Side,
    bg: &mut Background,
    peer: Peer,
    dir: &Path,
) -> Result<Vec<i32>> {
    let netns = format!("muon-{lab}.{pod}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pids: Vec<i32> = procs::netns_pids(&netns)
            .into_iter()
            .filter(|&p| {
                procs::pgid_of(p) == Some(bg.pgid())
                    && procs::comm(p).as_deref() == Some(peer.comm())
            })
            .collect();
        if pids.iter().any(|&p| procs::listening(p, side.port())) {
            return Ok(pids);
        }
        if !bg.running() {
            let log = dir.join(format!("{}-{pod}.log", peer.name()));
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            bail!(
                "{} ({} side, pod {pod}) exited at start: {}",
                peer.name(),
                side.as_str(),
                last_lines(&text, 8)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{} ({} side, pod {pod}) not listening on {} after 20s",
                peer.name(),
                side.as_str(),
                side.port()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_mode_declares_http_and_grpc_ports_and_l4_keeps_tcp() {
        let bin = Path::new("/b");
        let l4 = topology(Kind::Muon, bin, Mode::L4);
        assert!(l4.contains("{port: 8080, protocol: tcp}"), "{l4}");
        assert!(!l4.contains("echo-grpc") && !l4.contains("8081"), "{l4}");
        let http = topology(Kind::Muon, bin, Mode::Http);
        assert!(http.contains("{port: 8080, protocol: http}"), "{http}");
        assert!(http.contains("{port: 8081, protocol: grpc}"), "{http}");
        assert!(http.contains("{port: 9000, protocol: tcp}"), "{http}");
        assert!(http.contains("/b/demo-shop echo-grpc --port 8081 --size 1024 & exec"));
        assert_eq!(proto_for(Mode::Http, 8080), Proto::Http);
        assert_eq!(proto_for(Mode::Http, 8081), Proto::Grpc);
        assert_eq!(proto_for(Mode::L4, 8081), Proto::Tcp);
        // mTLS mode runs HTTP mode's labs (TLS is between the proxies), except that Muon's
        // keeps the control plane that certifies its sidecars; in L4 and HTTP modes Muon's
        // sidecars have no control plane and so no certificates: plaintext, as the peers.
        let mtls = topology(Kind::Muon, bin, Mode::Mtls);
        assert!(http.contains("\ncontrolPlane: false\n"), "{http}");
        assert!(l4.contains("\ncontrolPlane: false\n"), "{l4}");
        assert!(!mtls.contains("controlPlane"), "{mtls}");
        assert_eq!(
            mtls,
            http.replace(
                "# Plaintext between the sidecars: no control plane, so no mesh certificates.\ncontrolPlane: false\n",
                ""
            )
        );
        for kind in [Kind::Direct, Kind::Envoy, Kind::Haproxy, Kind::Nginx] {
            assert_eq!(
                topology(kind, bin, Mode::Mtls),
                topology(kind, bin, Mode::Http)
            );
        }
        assert_eq!(proto_for(Mode::Mtls, 8080), Proto::Http);
        assert_eq!(proto_for(Mode::Mtls, 8081), Proto::Grpc);
        assert_eq!(Kind::Envoy.lab(Mode::Mtls), "bench-envoy-mtls");
        assert_eq!(Kind::Envoy.lab(Mode::Http), "bench-envoy");
    }

    #[test]
    fn kept_sidecar_logs_leave_the_access_events_out() {
        let dir = std::env::temp_dir().join(format!("muon-bench-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (from, to) = (dir.join("in.log"), dir.join("out.log"));
        std::fs::write(
            &from,
            "{\"level\":\"INFO\",\"message\":\"ready\"}\n{\"message\":\"request\",\"target\":\"access\"}\n{\"level\":\"WARN\",\"message\":\"upstream reset\"}\n",
        )
        .unwrap();
        keep_sidecar_log(&from, &to).unwrap();
        let kept = std::fs::read_to_string(&to).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            kept.contains("ready") && kept.contains("upstream reset"),
            "{kept}"
        );
        assert!(!kept.contains("\"target\":\"access\""), "{kept}");
        assert!(
            kept.ends_with("# muon bench: 1 access events left out\n"),
            "{kept}"
        );
    }

    #[test]
    fn metric_sums_match_every_label_given() {
        let text = "# TYPE muon_http_requests counter\n\
            muon_http_requests_total{direction=\"outbound\",service=\"s\",route=\"\",status_class=\"2xx\"} 7\n\
            muon_http_requests_total{direction=\"outbound\",service=\"t\",route=\"\",status_class=\"2xx\"} 3\n\
            muon_http_requests_total{direction=\"outbound\",service=\"s\",route=\"\",status_class=\"5xx\"} 1\n\
            muon_http_requests_total{direction=\"inbound\",service=\"s\",route=\"\",status_class=\"2xx\"} 100\n\
            muon_http_requests_total_other{direction=\"outbound\"} 50\n\
            muon_table_services 2\n";
        let out = [("direction", "outbound"), ("status_class", "2xx")];
        assert_eq!(metric_sum(text, "muon_http_requests_total", &out), 10.0);
        assert_eq!(metric_sum(text, "muon_http_requests_total", &[]), 111.0);
        assert_eq!(metric_sum(text, "muon_table_services", &[]), 2.0);
        assert_eq!(metric_sum(text, "missing", &[]), 0.0);
    }

    #[test]
    fn only_the_muon_scenario_gets_sidecars_and_every_scenario_serves_both_ports() {
        for kind in Kind::ALL {
            let t = topology(kind, Path::new("/run/muon/bench/bin"), Mode::L4);
            assert_eq!(t.contains("sidecar: true"), kind == Kind::Muon, "{kind:?}");
            assert!(t.contains("echo --port 8080 --size 1024"));
            assert!(t.contains("bulk-server --port 9000"));
            assert!(t.contains("ipv6: false"));
            for mode in [Mode::L4, Mode::Http, Mode::Mtls] {
                assert!(kind.lab(mode).len() <= 20, "{}", kind.lab(mode));
            }
        }
    }
}
