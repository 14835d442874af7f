//! The scenarios: one lab per scenario, each a client pod and a server pod, and the same
//! server app (`demo-shop echo`, 1 KiB answers, on 8080; the bulk server on 9000; in HTTP
//! mode also `demo-shop echo-grpc`, 1 KiB gRPC answers, on 8081).
//!
//! - `direct`: `sidecar: false`, no capture, no proxy: the baseline.
//! - `muon`: `sidecar: true`: the lab's own muon-init and muon-proxy in each pod. The client
//!   calls the service's virtual IP, as an app in the mesh would. The service declares 8080
//!   `tcp` in L4 mode and `http` in HTTP mode (and 8081 `grpc`).
//! - `envoy`, `haproxy`, `nginx`: `sidecar: false` pods in which the harness runs muon-init
//!   itself (as root) and starts the peer as UID 1337 on each side (see `peers`).
//!
//! A `Running` scenario owns its lab and its peer processes: dropping it stops the peers (by
//! process group) and runs `muonctl lab down`, on success, on error and on panic alike.

use super::peers::{self, Peer, PeerBin, Proto, Side, SideCtx};
use super::procs::{self, Background};
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
        }
    }

    pub fn peer(self) -> Option<Peer> {
        match self {
            Kind::Envoy => Some(Peer::Envoy),
            Kind::Haproxy => Some(Peer::Haproxy),
            Kind::Nginx => Some(Peer::Nginx),
            Kind::Direct | Kind::Muon => None,
        }
    }

    pub fn is_peer(self) -> bool {
        self.peer().is_some()
    }

    pub fn lab(self) -> String {
        format!("bench-{}", self.name())
    }
}

/// The lab's topology for a scenario.
pub fn topology(kind: Kind, bin: &Path, mode: Mode) -> String {
    let sidecar = kind == Kind::Muon;
    let bench = bin.join("muon-bench").display().to_string();
    let shop = bin.join("demo-shop").display().to_string();
    let (protocol, grpc_app, grpc_port) = match mode {
        Mode::L4 | Mode::Mtls => ("tcp", String::new(), String::new()),
        Mode::Http => (
            "http",
            format!("{shop} echo-grpc --port {GRPC_PORT} --size 1024 & "),
            format!("      - {{port: {GRPC_PORT}, protocol: grpc}}\n"),
        ),
    };
    format!(
        r#"# cargo xtask bench: scenario {name}
ipv6: false
pods:
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
        Mode::L4 | Mode::Mtls => Proto::Tcp,
        Mode::Http if port == GRPC_PORT => Proto::Grpc,
        Mode::Http if port == BULK_PORT => Proto::Tcp,
        Mode::Http => Proto::Http,
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
    mode: Mode,
    muonctl: PathBuf,
    bench_bin: PathBuf,
    dir: PathBuf,
    run_dir: PathBuf,
    pub server_ip: Ipv4Addr,
    pub vip: Ipv4Addr,
    /// The proxies' pids by side ("client", "server"); empty for direct.
    pub proxies: BTreeMap<String, Vec<i32>>,
    peer: Option<PeerPair>,
}

impl Running {
    /// Brings the scenario up: lab, capture, peers; then checks traffic flows through them.
    pub fn start(env: &Env, kind: Kind, peer_bin: Option<&PeerBin>) -> Result<Running> {
        let lab = kind.lab();
        let dir = env.out.join("scenarios").join(kind.name());
        std::fs::create_dir_all(&dir)?;
        // Leftovers of an interrupted run hold the name.
        if Path::new("/run/muon/lab").join(&lab).exists() {
            procs::lab_down(&env.muonctl, &lab);
        }
        let topo = dir.join("topology.yaml");
        std::fs::write(&topo, topology(kind, &env.bench_bin, env.mode))?;
        procs::register_lab(&env.muonctl, &lab);
        let mut running = Running {
            kind,
            lab: lab.clone(),
            mode: env.mode,
            muonctl: env.muonctl.clone(),
            bench_bin: env.bench_bin.clone(),
            run_dir: env
                .bench_bin
                .parent()
                .unwrap_or(Path::new("/run/muon/bench"))
                .join("run")
                .join(kind.name()),
            dir,
            server_ip: Ipv4Addr::UNSPECIFIED,
            vip: Ipv4Addr::UNSPECIFIED,
            proxies: BTreeMap::new(),
            peer: None,
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
        Ok(running)
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
            let pids = wait_listening(&self.lab, side, bg, pair.bin.peer, &self.dir)?;
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
        let ctx = SideCtx {
            side,
            dir: &dir,
            server_ip: self.server_ip,
            port,
            proto: proto_for(self.mode, port),
            grpc_port: GRPC_PORT,
        };
        let (cfg, argv) = peers::prepare(bin, &ctx)?;
        // Kept with the run's results.
        let keep = self.dir.join(format!(
            "{}-{}-port{port}-{}.{}",
            bin.peer.name(),
            side.as_str(),
            ctx.proto.as_str(),
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
    /// in HTTP mode, Muon must have carried them as HTTP requests over HTTP/2 between the
    /// sidecars.
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
        let http_mode = self.kind == Kind::Muon && self.mode == Mode::Http;
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
        }
        Ok(())
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
        let (ok, out, err) = procs::run_bounded(
            Command::new(&self.muonctl).args([
                "lab",
                "exec",
                &self.lab,
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

    /// Runs `muon-bench bench ARGS` in the client pod as its app user; parses its JSON.
    pub fn run_tool<T: serde::de::DeserializeOwned>(
        &self,
        args: &[String],
        limit: Duration,
    ) -> Result<T> {
        let (ok, out, err) = procs::run_bounded(
            Command::new(&self.muonctl)
                .args(["lab", "exec", &self.lab, "client", "--"])
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

/// Waits until the side's proxy listens on its port; returns its pids: the processes in the
/// pod named like the peer *and* in the process group this harness started.
fn wait_listening(
    lab: &str,
    side: Side,
    bg: &mut Background,
    peer: Peer,
    dir: &Path,
) -> Result<Vec<i32>> {
    let netns = format!("muon-{lab}.{}", side.as_str());
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
            let log = dir.join(format!("{}-{}.log", peer.name(), side.as_str()));
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            bail!(
                "{} ({} side) exited at start: {}",
                peer.name(),
                side.as_str(),
                last_lines(&text, 8)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{} ({} side) not listening on {} after 20s",
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
            assert!(kind.lab().len() <= 20);
        }
    }
}
