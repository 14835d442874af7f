//! The gray-failure scenario (`--mode http`: run after the comparison, or alone with
//! `--scenarios gray-failure`): one service, two replicas of `demo-shop echo`, one of which
//! (`server-gray`) holds 10% of its answers 50 ms (`--delay-ms 50 --delay-rate 0.1`). It
//! answers, never fails: only a balancer that watches latency or requests in flight can
//! move traffic away from it. Three configurations, each a lab of its own (client pod and
//! the two replicas), all up at once and visited in turn every round:
//!
//! - Muon, `traffic: {loadBalancer: {algorithm: PeakEWMA}}` (the service's traffic policy,
//!   in the lab's static table), with outlier detection at its defaults;
//! - Muon, the same with `RoundRobin`: the baseline a latency-blind balancer gets;
//! - Envoy: the client side balances the replicas with `LEAST_REQUEST` and outlier detection
//!   at its defaults (see `peers::envoy_gray_client_config`); each replica has the usual
//!   server-side Envoy.
//!
//! The client is the open-loop generator at 1,000 requests/s; answers carry `x-pod` (the
//! replica's pod name), which it counts, so the report gives each replica's share next to
//! the client's percentiles. A p99 under 50 ms needs fewer than 1% of all requests delayed,
//! i.e. under 10% of them sent to the gray replica.

use super::load::LoadReport;
use super::peers::{self, Peer, PeerBin, Proto, Side, SideCtx};
use super::procs::{self, Background};
use super::report::Meta;
use super::scenarios::{captured, last_lines, wait_listening, GRPC_PORT, HTTP_PORT};
use super::Env;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const FAST: &str = "server-fast";
pub const GRAY: &str = "server-gray";
const DELAY_MS: u64 = 50;
const DELAY_RATE: f64 = 0.1;
const RATE: u32 = 1000;
const CONNECTIONS: usize = 10;
const PROXY_UID: &str = "1337";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Config {
    MuonPeakEwma,
    MuonRoundRobin,
    Envoy,
}

impl Config {
    pub const ALL: [Config; 3] = [Config::MuonPeakEwma, Config::MuonRoundRobin, Config::Envoy];

    pub fn name(self) -> &'static str {
        match self {
            Config::MuonPeakEwma => "muon PeakEWMA",
            Config::MuonRoundRobin => "muon RoundRobin",
            Config::Envoy => "envoy LEAST_REQUEST + outlier detection",
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Config::MuonPeakEwma => "muon-peak-ewma",
            Config::MuonRoundRobin => "muon-round-robin",
            Config::Envoy => "envoy",
        }
    }

    pub fn lab(self) -> &'static str {
        match self {
            Config::MuonPeakEwma => "bench-gray-ewma",
            Config::MuonRoundRobin => "bench-gray-rr",
            Config::Envoy => "bench-gray-envoy",
        }
    }

    fn algorithm(self) -> Option<&'static str> {
        match self {
            Config::MuonPeakEwma => Some("PeakEWMA"),
            Config::MuonRoundRobin => Some("RoundRobin"),
            Config::Envoy => None,
        }
    }
}

/// The lab's topology for a configuration.
pub fn topology(config: Config, bin: &Path) -> String {
    let shop = bin.join("demo-shop").display().to_string();
    let sidecar = config != Config::Envoy;
    let (control_plane, traffic) = match config.algorithm() {
        Some(alg) => (
            "# Plaintext between the sidecars: no control plane, the lab's static table.\ncontrolPlane: false\n",
            format!("    traffic: {{loadBalancer: {{algorithm: {alg}}}, outlierDetection: {{}}}}\n"),
        ),
        None => ("", String::new()),
    };
    format!(
        r#"# cargo xtask bench: gray failure, {name}
ipv6: false
{control_plane}pods:
  - name: client
    labels: {{app: client}}
    sidecar: {sidecar}
  - name: {FAST}
    labels: {{app: server}}
    sidecar: {sidecar}
    command: ["{shop}", "echo", "--port", "{HTTP_PORT}", "--size", "1024"]
  - name: {GRAY}
    labels: {{app: server}}
    sidecar: {sidecar}
    command: ["{shop}", "echo", "--port", "{HTTP_PORT}", "--size", "1024", "--delay-ms", "{DELAY_MS}", "--delay-rate", "{DELAY_RATE}"]
services:
  - name: server
    selector: {{app: server}}
    ports:
      - {{port: {HTTP_PORT}, protocol: http}}
{traffic}"#,
        name = config.name()
    )
}

/// One configuration's lab, up, with its Envoys when it has them; dropping it takes
/// everything down.
struct GrayLab {
    config: Config,
    lab: String,
    muonctl: PathBuf,
    bench_bin: PathBuf,
    run_dir: PathBuf,
    target: SocketAddr,
    envoys: Vec<Background>,
}

impl GrayLab {
    fn start(env: &Env, config: Config, envoy: Option<&PeerBin>) -> Result<GrayLab> {
        let lab = config.lab().to_string();
        let dir = env.out.join("gray-failure").join(config.slug());
        std::fs::create_dir_all(&dir)?;
        if Path::new("/run/muon/lab").join(&lab).exists() {
            procs::lab_down(&env.muonctl, &lab);
        }
        let topo = dir.join("topology.yaml");
        std::fs::write(&topo, topology(config, &env.bench_bin))?;
        procs::register_lab(&env.muonctl, &lab);
        let mut me = GrayLab {
            config,
            lab: lab.clone(),
            muonctl: env.muonctl.clone(),
            bench_bin: env.bench_bin.clone(),
            run_dir: Path::new(super::BENCH_ROOT)
                .join("run")
                .join(format!("gray-{}", config.slug())),
            target: SocketAddr::from(([0, 0, 0, 0], HTTP_PORT)),
            envoys: Vec::new(),
        };
        let (ok, out, err) = procs::run_bounded(
            Command::new(&env.muonctl)
                .args(["lab", "up", "-f"])
                .arg(&topo)
                .args(["--name", &lab, "--detach", "--timeout", "60s", "--bin-dir"])
                .arg(&env.lab_bins),
            Duration::from_secs(120),
        )?;
        std::fs::write(dir.join("lab-up.log"), format!("{out}{err}"))?;
        if !ok {
            bail!("muonctl lab up failed: {}", last_lines(&err, 8));
        }
        let (ips, vip) = me.status()?;
        let ip = |pod: &str| ips.get(pod).copied().context("a pod has no address");
        me.target = match config {
            Config::Envoy => {
                let bin = envoy.context("Envoy is not installed")?;
                me.start_envoys(bin, &dir, &ips)?;
                // Envoy's client side sends every request to its cluster of replicas,
                // whatever the destination: any captured address will do.
                SocketAddr::from((ip(FAST)?, HTTP_PORT))
            }
            _ => SocketAddr::from((vip, HTTP_PORT)),
        };
        me.smoke()?;
        Ok(me)
    }

    /// Pod addresses by name, and the service's virtual IP.
    fn status(&self) -> Result<(BTreeMap<String, Ipv4Addr>, Ipv4Addr)> {
        let (ok, out, err) = procs::run_bounded(
            Command::new(&self.muonctl).args(["lab", "status", &self.lab, "-o", "json"]),
            Duration::from_secs(30),
        )?;
        if !ok {
            bail!("muonctl lab status failed: {}", last_lines(&err, 5));
        }
        let labs: serde_json::Value =
            serde_json::from_str(&out).context("lab status is not JSON")?;
        let ips = labs[0]["pods"]
            .as_array()
            .context("no pods in lab status")?
            .iter()
            .filter_map(|p| {
                Some((
                    p["name"].as_str()?.to_string(),
                    p["ip"].as_str()?.parse().ok()?,
                ))
            })
            .collect();
        let vip = labs[0]["services"][0]["vip"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .context("service has no vip")?;
        Ok((ips, vip))
    }

    /// muon-init in every pod, the server side of the usual Envoy pair in each replica, then
    /// the gray-failure client side in the client pod.
    fn start_envoys(
        &mut self,
        bin: &PeerBin,
        dir: &Path,
        ips: &BTreeMap<String, Ipv4Addr>,
    ) -> Result<()> {
        let init = Path::new("/run/muon/lab")
            .join(&self.lab)
            .join("bin/muon-init");
        for pod in ["client", FAST, GRAY] {
            let (ok, out, err) = procs::run_bounded(
                Command::new(&self.muonctl)
                    .args(["lab", "exec", &self.lab, pod, "--user", "0", "--"])
                    .arg(&init)
                    .args(["--ipv6", "off"]),
                Duration::from_secs(30),
            )?;
            if !ok {
                bail!(
                    "muon-init in pod {pod} failed: {}",
                    last_lines(&format!("{out}{err}"), 8)
                );
            }
        }
        let mut replicas = Vec::new();
        for pod in [FAST, GRAY] {
            let ip = *ips.get(pod).context("a replica has no address")?;
            replicas.push(SocketAddr::from((ip, HTTP_PORT)));
            let side_dir = self.side_dir(pod)?;
            let ctx = SideCtx {
                side: Side::Server,
                dir: &side_dir,
                server_ip: ip,
                port: HTTP_PORT,
                proto: Proto::Http,
                grpc_port: GRPC_PORT,
                tls: None,
            };
            let (cfg, argv) = peers::prepare(bin, &ctx)?;
            std::fs::copy(&cfg, dir.join(format!("envoy-{pod}.yaml")))?;
            self.launch(pod, Side::Server, &argv, dir)?;
        }
        let side_dir = self.side_dir("client")?;
        let cfg = side_dir.join("envoy.yaml");
        std::fs::write(&cfg, peers::envoy_gray_client_config(&replicas))?;
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644))?;
        std::fs::copy(&cfg, dir.join("envoy-client.yaml"))?;
        let argv = peers::argv(bin, &cfg, &side_dir);
        self.launch("client", Side::Client, &argv, dir)
    }

    /// A directory for one proxy's files, readable by the proxy's user.
    fn side_dir(&self, pod: &str) -> Result<PathBuf> {
        let d = self.run_dir.join(pod);
        std::fs::create_dir_all(&d)?;
        nix::unistd::chown(&d, Some(1337.into()), Some(1337.into()))?;
        for p in [d.as_path(), self.run_dir.as_path()] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
        }
        Ok(d)
    }

    fn launch(&mut self, pod: &str, side: Side, argv: &[String], dir: &Path) -> Result<()> {
        let mut cmd = Command::new(&self.muonctl);
        cmd.args(["lab", "exec", &self.lab, pod, "--user", PROXY_UID, "--"])
            .args(argv);
        let log = dir.join(format!("envoy-{pod}.log"));
        let mut bg = Background::spawn(&format!("envoy ({pod})"), &mut cmd, &log)?;
        wait_listening(&self.lab, pod, side, &mut bg, Peer::Envoy, dir)?;
        self.envoys.push(bg);
        Ok(())
    }

    /// A short load must be answered without errors, by the replicas, through the capture.
    fn smoke(&self) -> Result<()> {
        let before = captured(&self.muonctl, &self.lab, "client", "MUON_REDIRECT")?;
        let r = self.load(0.5, 0.0, 200)?;
        if r.errors > 0 || r.requests == 0 {
            bail!(
                "smoke test: {} answers, {} errors ({})",
                r.requests,
                r.errors,
                r.first_error.unwrap_or_default()
            );
        }
        if let Some(other) = r.answered_by.keys().find(|k| *k != FAST && *k != GRAY) {
            bail!("smoke test: an answer came from {other:?}, not from a replica");
        }
        if captured(&self.muonctl, &self.lab, "client", "MUON_REDIRECT")? <= before {
            bail!("smoke test: no connection went through MUON_REDIRECT in pod client: traffic bypassed the proxy");
        }
        Ok(())
    }

    /// The generator in the client pod: open loop at `rate`, answers counted by `x-pod`.
    fn load(&self, secs: f64, warmup: f64, rate: u32) -> Result<LoadReport> {
        let (ok, out, err) = procs::run_bounded(
            Command::new(&self.muonctl)
                .args(["lab", "exec", &self.lab, "client", "--"])
                .arg(self.bench_bin.join("muon-bench"))
                .args(["bench", "load", "--addr", &self.target.to_string()])
                .args(["--rate", &rate.to_string()])
                .args(["--connections", &CONNECTIONS.to_string()])
                .args(["--duration", &ms(secs)])
                .args(["--warmup", &ms(warmup)])
                .args(["--expect-size", "1024", "--count-header", "x-pod", "--json"]),
            Duration::from_secs_f64(secs + warmup + 30.0),
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
}

/// A duration in the generator's grammar (no fractions of a second).
fn ms(secs: f64) -> String {
    format!("{}ms", (secs * 1000.0).round() as u64)
}

impl Drop for GrayLab {
    fn drop(&mut self) {
        for mut e in self.envoys.drain(..) {
            e.stop();
        }
        procs::lab_down(&self.muonctl, &self.lab);
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

/// One configuration's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfigReport {
    pub config: Config,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Every round (histograms left out).
    pub rounds: Vec<LoadReport>,
    /// All rounds merged: shares and counts; percentiles of every answer together.
    pub merged: Option<LoadReport>,
}

impl ConfigReport {
    /// The median over rounds of a percentile, in ms.
    fn median_ms(&self, pick: fn(&LoadReport) -> f64) -> Option<f64> {
        let mut v: Vec<f64> = self.rounds.iter().map(pick).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        Some(
            if n % 2 == 1 {
                v[n / 2]
            } else {
                (v[n / 2 - 1] + v[n / 2]) / 2.0
            } / 1000.0,
        )
    }

    fn share(&self, pod: &str) -> Option<f64> {
        let m = self.merged.as_ref()?;
        let total: u64 = m.answered_by.values().sum();
        (total > 0).then(|| *m.answered_by.get(pod).unwrap_or(&0) as f64 / total as f64)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrayReport {
    pub meta: Meta,
    pub versions: BTreeMap<String, String>,
    pub rounds: usize,
    pub round_s: f64,
    pub warmup_s: f64,
    pub configs: Vec<ConfigReport>,
    pub load_at_end: f64,
}

/// Brings the three labs up, measures them in turn for `rounds`, writes
/// `gray-failure.{json,md}` in the run's directory and returns the Markdown.
pub fn run(
    env: &Env,
    quick: bool,
    envoy: Result<&PeerBin, String>,
    mut versions: BTreeMap<String, String>,
) -> Result<String> {
    let meta = Meta::collect(super::Mode::Http, quick);
    let (rounds, secs, warmup) = if quick { (1, 5.0, 1.0) } else { (3, 10.0, 1.0) };
    versions.insert("muon".into(), meta.muon_version.clone());
    let mut reports: Vec<ConfigReport> = Config::ALL
        .iter()
        .map(|&c| ConfigReport {
            config: c,
            name: c.name().into(),
            error: None,
            rounds: Vec::new(),
            merged: None,
        })
        .collect();
    let mut labs: Vec<(usize, GrayLab)> = Vec::new();
    for (i, &c) in Config::ALL.iter().enumerate() {
        println!("== gray failure, {}: starting lab {}", c.name(), c.lab());
        let t = Instant::now();
        let bin = match (&envoy, c) {
            (Ok(b), Config::Envoy) => Some(*b),
            (Err(e), Config::Envoy) => {
                reports[i].error = Some(format!("install: {e}"));
                continue;
            }
            _ => None,
        };
        match GrayLab::start(env, c, bin) {
            Ok(l) => {
                println!("   ready in {:.1}s", t.elapsed().as_secs_f64());
                labs.push((i, l));
            }
            Err(e) => {
                println!("   FAILED: {e:#}");
                reports[i].error = Some(format!("start: {e:#}"));
            }
        }
    }
    println!(
        "== gray failure: {RATE} requests/s over {CONNECTIONS} connections, {GRAY} delays {}% of its answers by {DELAY_MS} ms: {rounds} round(s) of {secs}s (+{warmup}s warm-up) per configuration",
        DELAY_RATE * 100.0
    );
    for round in 0..rounds {
        for (i, l) in &labs {
            match l.load(secs, warmup, RATE) {
                Ok(r) => {
                    let total: u64 = r.answered_by.values().sum::<u64>().max(1);
                    println!(
                        "   {:<40} #{} {:>6.0}/s  p50 {:>7.3} ms  p99 {:>7.3} ms  {GRAY} {:>5.1}%  errors {}",
                        l.config.name(),
                        round + 1,
                        r.achieved_rps,
                        r.latency_us.p50 / 1000.0,
                        r.latency_us.p99 / 1000.0,
                        *r.answered_by.get(GRAY).unwrap_or(&0) as f64 * 100.0 / total as f64,
                        r.errors + r.unsent
                    );
                    let rep = &mut reports[*i];
                    match &mut rep.merged {
                        Some(m) => m.merge(&r)?,
                        None => rep.merged = Some(r.clone()),
                    }
                    let mut r = r;
                    r.histogram_ns.clear();
                    rep.rounds.push(r);
                }
                Err(e) => {
                    println!("   {:<40} #{} error: {e:#}", l.config.name(), round + 1);
                    reports[*i]
                        .error
                        .get_or_insert(format!("round {}: {e:#}", round + 1));
                }
            }
        }
    }
    drop(labs);
    for r in &mut reports {
        if let Some(m) = &mut r.merged {
            m.histogram_ns.clear();
        }
    }
    let report = GrayReport {
        meta,
        versions,
        rounds,
        round_s: secs,
        warmup_s: warmup,
        configs: reports,
        load_at_end: super::report::loadavg(),
    };
    let md = markdown(&report);
    std::fs::write(
        env.out.join("gray-failure.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    std::fs::write(env.out.join("gray-failure.md"), &md)?;
    Ok(md)
}

pub fn markdown(r: &GrayReport) -> String {
    let mut md = String::new();
    let m = &r.meta;
    let _ = writeln!(
        md,
        "### Gray failure — {}{}\n",
        m.date_utc,
        if m.quick { " (quick)" } else { "" }
    );
    let _ = writeln!(
        md,
        "- machine: {} cores, {}, Linux {}, {} GiB",
        m.machine.cores, m.machine.cpu_model, m.machine.kernel, m.machine.memory_gib
    );
    let _ = writeln!(md, "- command: `{}`", m.command);
    let versions: Vec<String> = r.versions.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(md, "- versions: {}", versions.join("; "));
    let _ = writeln!(
        md,
        "- load average {:.2} at start, {:.2} at end",
        m.load_at_start, r.load_at_end
    );
    let _ = writeln!(
        md,
        "- workload: one service, two replicas of `demo-shop echo` (1 KiB answers); `{GRAY}` holds {}% of its answers {DELAY_MS} ms (`--delay-ms {DELAY_MS} --delay-rate {DELAY_RATE}`), `{FAST}` none; HTTP/1.1 keep-alive GET from the client app, open loop at {RATE} requests/s over {CONNECTIONS} connections, latency from the intended send time; {} round(s) of {}s (+{}s warm-up) per configuration, each round visiting every configuration in turn; shares from the `x-pod` header of the answers",
        DELAY_RATE * 100.0,
        r.rounds,
        r.round_s,
        r.warmup_s
    );
    let _ = writeln!(
        md,
        "- p50 and p99: the median over rounds (p99.9 and max: all rounds merged); a p99 under {DELAY_MS} ms needs under {:.0}% of the requests on `{GRAY}`\n",
        100.0 * 0.01 / DELAY_RATE
    );
    let _ = writeln!(
        md,
        "| configuration | p50 ms | p99 ms | p99.9 ms | max ms | share {FAST} | share {GRAY} | p99 per round, ms | achieved rps | errors |"
    );
    let _ = writeln!(
        md,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for c in &r.configs {
        let f = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.3}"));
        let pct = |v: Option<f64>| v.map_or("—".into(), |v| format!("{:.1}%", v * 100.0));
        let Some(merged) = &c.merged else {
            let _ = writeln!(
                md,
                "| {} | failed: {} | | | | | | | | |",
                c.name,
                super::report::short(c.error.as_deref().unwrap_or("no figures"), 120)
            );
            continue;
        };
        let per_round: Vec<String> = c
            .rounds
            .iter()
            .map(|l| format!("{:.2}", l.latency_us.p99 / 1000.0))
            .collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {} |",
            c.name,
            f(c.median_ms(|l| l.latency_us.p50)),
            f(c.median_ms(|l| l.latency_us.p99)),
            f(Some(merged.latency_us.p999 / 1000.0)),
            f(Some(merged.latency_us.max / 1000.0)),
            pct(c.share(FAST)),
            pct(c.share(GRAY)),
            per_round.join(", "),
            merged.achieved_rps,
            merged.errors + merged.unsent,
        );
    }
    let p99 = |cfg: Config| {
        r.configs
            .iter()
            .find(|c| c.config == cfg)
            .and_then(|c| c.median_ms(|l| l.latency_us.p99))
    };
    if let (Some(ewma), Some(rr), Some(envoy)) = (
        p99(Config::MuonPeakEwma),
        p99(Config::MuonRoundRobin),
        p99(Config::Envoy),
    ) {
        let yes = |b: bool| if b { "met" } else { "not met" };
        let _ = writeln!(
            md,
            "\nTargets: Muon PeakEWMA's p99 at most Envoy's: {} ({ewma:.3} against {envoy:.3} ms); at most half of Muon RoundRobin's: {} ({ewma:.3} against {:.3} ms).",
            yes(ewma <= envoy),
            yes(ewma <= rr / 2.0),
            rr / 2.0
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gray_replica_is_delayed_and_muon_labs_carry_the_algorithm() {
        let bin = Path::new("/b");
        let ewma = topology(Config::MuonPeakEwma, bin);
        assert!(
            ewma.contains("\"--delay-ms\", \"50\", \"--delay-rate\", \"0.1\"]"),
            "{ewma}"
        );
        assert_eq!(ewma.matches("--delay-ms").count(), 1, "{ewma}");
        assert!(
            ewma.contains("traffic: {loadBalancer: {algorithm: PeakEWMA}, outlierDetection: {}}")
        );
        assert!(ewma.contains("controlPlane: false") && ewma.contains("sidecar: true"));
        let rr = topology(Config::MuonRoundRobin, bin);
        assert!(rr.contains("algorithm: RoundRobin"));
        let envoy = topology(Config::Envoy, bin);
        assert!(!envoy.contains("traffic:") && !envoy.contains("sidecar: true"));
        for c in Config::ALL {
            assert!(c.lab().len() <= 20);
        }
    }

    #[test]
    fn envoy_balances_the_replicas_by_least_request_with_outlier_detection() {
        let cfg = peers::envoy_gray_client_config(&[
            "198.18.0.3:8080".parse().unwrap(),
            "198.18.0.4:8080".parse().unwrap(),
        ]);
        assert!(cfg.contains("lb_policy: LEAST_REQUEST"), "{cfg}");
        assert!(cfg.contains("outlier_detection: {}"), "{cfg}");
        assert!(cfg.contains("route: {cluster: replicas}"), "{cfg}");
        assert!(
            cfg.contains("address: 198.18.0.4, port_value: 8080"),
            "{cfg}"
        );
        assert!(cfg.contains("http2_protocol_options"), "{cfg}");
    }
}
