//! The scenarios: one lab per scenario, each a client pod and a server pod, and the same
//! server app (`demo-shop echo`, 1 KiB answers, on 8080; the bulk server on 9000).
//!
//! - `direct`: `sidecar: false`, no capture, no proxy: the baseline.
//! - `muon`: `sidecar: true`: the lab's own muon-init and muon-proxy in each pod. The client
//!   calls the service's virtual IP, as an app in the mesh would.
//! - `envoy`, `haproxy`, `nginx`: `sidecar: false` pods in which the harness runs muon-init
//!   itself (as root) and starts the peer as UID 1337 on each side (see `peers`).
//!
//! A `Running` scenario owns its lab and its peer processes: dropping it stops the peers (by
//! process group) and runs `muonctl lab down`, on success, on error and on panic alike.

use super::peers::{self, Peer, PeerBin, Side, SideCtx};
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
    let protocol = match mode {
        Mode::L4 | Mode::Mtls => "tcp",
        Mode::Http => "http",
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
    command: ["/bin/sh", "-c", "{bench} bench bulk-server --port {BULK_PORT} & exec {shop} echo --port {HTTP_PORT} --size 1024"]
services:
  - name: server
    selector: {{app: server}}
    ports:
      - {{port: {HTTP_PORT}, protocol: {protocol}}}
      - {{port: {BULK_PORT}, protocol: tcp}}
"#,
        name = kind.name()
    )
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

    /// Where the client sends HTTP: the service VIP through Muon, the server pod otherwise.
    pub fn http_target(&self) -> SocketAddr {
        match self.kind {
            Kind::Muon => SocketAddr::from((self.vip, HTTP_PORT)),
            _ => SocketAddr::from((self.server_ip, HTTP_PORT)),
        }
    }

    pub fn bulk_target(&self) -> SocketAddr {
        match self.kind {
            Kind::Muon => SocketAddr::from((self.vip, BULK_PORT)),
            _ => SocketAddr::from((self.server_ip, BULK_PORT)),
        }
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
        };
        let (cfg, argv) = peers::prepare(bin, &ctx)?;
        // Kept with the run's results.
        let keep = self.dir.join(format!(
            "{}-{}-port{port}.{}",
            bin.peer.name(),
            side.as_str(),
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
        self.launch_pair(bin, port)
    }

    /// A few requests must get through, and through the capture rules when there are any.
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
        let report: super::load::LoadReport = self.run_tool(&args, Duration::from_secs(30))?;
        if report.errors > 0 || report.requests == 0 {
            bail!(
                "smoke test: {} answers, {} errors ({})",
                report.requests,
                report.errors,
                report.first_error.unwrap_or_default()
            );
        }
        if self.kind != Kind::Direct {
            self.check_captured("client", "MUON_REDIRECT")?;
            self.check_captured("server", "MUON_IN_REDIRECT")?;
        }
        Ok(())
    }

    /// The chain's REDIRECT rule must have matched packets: traffic really was captured.
    fn check_captured(&self, pod: &str, chain: &str) -> Result<()> {
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
        let packets: u64 = out
            .lines()
            .filter(|l| l.contains(&needle) && l.contains("REDIRECT"))
            .filter_map(|l| l.strip_prefix('[')?.split(':').next()?.parse::<u64>().ok())
            .sum();
        if packets == 0 {
            bail!("no connection went through {chain} in pod {pod}: traffic bypassed the proxies");
        }
        Ok(())
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
