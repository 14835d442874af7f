//! The run's record: what was measured (`results.json`, the source of truth) and the
//! Markdown tables made from it (`results.md`, printed at the end, pasted in BENCHMARKS.md).
//!
//! Each figure is printed beside its ratio to the best peer (Envoy, HAProxy, nginx) of the
//! same run: `figure ÷ best peer's figure`. Lower is better for latency, CPU and memory (the
//! best peer is the lowest), higher for throughput (the best peer is the highest).
//!
//! A run of `--mode http,mtls` is two reports, one per mode (`Saved::Runs`), and the
//! Markdown adds "the cost of mTLS": per scenario, the mTLS figure beside the HTTP one and
//! the difference (`mtls_cost`). Two results.json of separate runs, one of each mode, give
//! the same section (`--report A --report B`).

use super::load::{BulkReport, LoadReport, Percentiles};
use super::scenarios::Kind;
use super::{Mode, Plan};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulk: Option<BulkReport>,
    /// Proxy CPU time (utime + stime) during the step, by side.
    pub cpu_ms: BTreeMap<String, f64>,
    /// Peak RSS during the step, by side.
    pub rss_peak_kib: BTreeMap<String, u64>,
    /// The most connections open between the pair (on the server side's inbound port) during
    /// the step: with HTTP/2 between the proxies, one per server port, whatever the app opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pair_connections: Option<u64>,
    /// Each round's latency percentiles, in order (`load.latency_us` is all rounds merged).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rounds_latency_us: Vec<Percentiles>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl StepResult {
    /// A latency percentile for the tables, in µs: the median over rounds when there are at
    /// least three (a burst from a neighbour spoils one round, not the figure; a stall the
    /// proxy causes itself shows in every round and stays), else the merged histogram's.
    pub fn percentile(&self, pick: fn(&Percentiles) -> f64) -> Option<f64> {
        let load = self.load.as_ref()?;
        if self.rounds_latency_us.len() < 3 {
            return Some(pick(&load.latency_us));
        }
        let mut v: Vec<f64> = self.rounds_latency_us.iter().map(pick).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        Some(if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        })
    }

    /// Both proxies' CPU milliseconds per 1,000 answered requests (warm-up included on both
    /// sides of the division).
    pub fn cpu_per_1k(&self) -> Option<f64> {
        let l = self.load.as_ref()?;
        if self.cpu_ms.is_empty() || l.total_requests == 0 {
            return None;
        }
        Some(self.cpu_ms.values().sum::<f64>() * 1000.0 / l.total_requests as f64)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioReport {
    pub name: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// RSS by side once the proxies had started and carried the smoke test, before load.
    pub rss_idle_kib: BTreeMap<String, u64>,
    /// RSS by side after the last step.
    pub rss_end_kib: BTreeMap<String, u64>,
    /// open_1000, open_5000, closed, bulk_up, bulk_down; in HTTP mode grpc_open_1000,
    /// grpc_open_5000, grpc_closed.
    pub steps: BTreeMap<String, StepResult>,
    /// Why the gRPC steps did not run (HTTP mode), when they did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_error: Option<String>,
    /// mTLS mode: what the check of the pair's mutual TLS saw (the peers' probes, Muon's
    /// TLS counters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls_check: Option<String>,
}

impl ScenarioReport {
    pub fn new(kind: Kind) -> ScenarioReport {
        ScenarioReport {
            name: kind,
            error: None,
            rss_idle_kib: BTreeMap::new(),
            rss_end_kib: BTreeMap::new(),
            steps: BTreeMap::new(),
            grpc_error: None,
            mtls_check: None,
        }
    }

    /// Merges one more round of a step into what the scenario has for it. A failed round
    /// makes the step failed.
    pub fn add_round(&mut self, key: &str, mut round: StepResult) {
        if let Some(l) = &round.load {
            round.rounds_latency_us.push(l.latency_us.clone());
        }
        let Some(have) = self.steps.get_mut(key) else {
            self.steps.insert(key.to_string(), round);
            return;
        };
        if have.error.is_some() {
            return;
        }
        if round.error.is_some() {
            *have = round;
            return;
        }
        have.rounds_latency_us.append(&mut round.rounds_latency_us);
        if let (Some(a), Some(b)) = (have.load.as_mut(), round.load.as_ref()) {
            if let Err(e) = a.merge(b) {
                have.error = Some(format!("{e:#}"));
            }
        }
        if let (Some(a), Some(b)) = (have.bulk.as_mut(), round.bulk.as_ref()) {
            a.merge(b);
        }
        for (side, ms) in round.cpu_ms {
            *have.cpu_ms.entry(side).or_default() += ms;
        }
        have.pair_connections = have.pair_connections.max(round.pair_connections);
        for (side, kib) in round.rss_peak_kib {
            let e = have.rss_peak_kib.entry(side).or_default();
            *e = (*e).max(kib);
        }
    }

    /// Drops what only merging needed (the histograms) before the results are written.
    pub fn finish(&mut self) {
        for s in self.steps.values_mut() {
            if let Some(l) = s.load.as_mut() {
                l.histogram_ns = Vec::new();
            }
        }
    }

    pub fn fail(&mut self, why: String) {
        if self.error.is_none() {
            self.error = Some(why);
        }
    }

    fn step(&self, key: &str) -> Option<&StepResult> {
        self.steps.get(key).filter(|s| s.error.is_none())
    }

    fn latency(&self, key: &str) -> Option<&LoadReport> {
        self.step(key)?.load.as_ref()
    }

    /// Peak RSS per proxy over the load steps of one family (gRPC or not): the larger side.
    fn rss_load_kib(&self, grpc: bool) -> Option<u64> {
        self.steps
            .iter()
            .filter(|(k, _)| k.starts_with("grpc_") == grpc)
            .flat_map(|(_, s)| s.rss_peak_kib.values().copied())
            .max()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory_gib: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub date_utc: String,
    pub command: String,
    pub quick: bool,
    pub mode: super::Mode,
    pub machine: Machine,
    pub muon_version: String,
    /// 1-minute load average when the run started, and what else was busy.
    pub load_at_start: f64,
    pub busy_at_start: Vec<String>,
}

impl Meta {
    pub fn collect(mode: Mode, quick: bool) -> Meta {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines().find_map(|l| {
                    l.strip_prefix("MemTotal:")?
                        .split_whitespace()
                        .next()?
                        .parse::<f64>()
                        .ok()
                })
            })
            .map(|kib| (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0)
            .unwrap_or(0.0);
        Meta {
            date_utc: stamp("%Y-%m-%d %H:%M UTC"),
            command: format!("cargo xtask {}", args.join(" ")),
            quick,
            mode,
            machine: Machine {
                cores: std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(0),
                cpu_model,
                kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
                memory_gib,
            },
            muon_version: git_version(),
            load_at_start: loadavg(),
            busy_at_start: busy_processes(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub meta: Meta,
    pub versions: BTreeMap<String, String>,
    pub plan: Plan,
    pub scenarios: Vec<ScenarioReport>,
    pub load_at_end: f64,
    pub elapsed_s: f64,
}

impl RunReport {
    pub fn new(
        meta: Meta,
        versions: BTreeMap<String, String>,
        plan: Plan,
        scenarios: Vec<ScenarioReport>,
        elapsed_s: f64,
    ) -> Self {
        RunReport {
            meta,
            versions,
            plan,
            scenarios,
            load_at_end: loadavg(),
            elapsed_s,
        }
    }
}

/// What a results.json holds: one run (one mode), or the runs of `--mode http,mtls`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Saved {
    Runs { runs: Vec<RunReport> },
    One(Box<RunReport>),
}

impl From<Vec<RunReport>> for Saved {
    fn from(mut runs: Vec<RunReport>) -> Saved {
        if runs.len() == 1 {
            Saved::One(Box::new(runs.remove(0)))
        } else {
            Saved::Runs { runs }
        }
    }
}

/// The runs in a results.json.
pub fn read(path: &Path) -> anyhow::Result<Vec<RunReport>> {
    use anyhow::Context;
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let saved: Saved = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a results.json", path.display()))?;
    Ok(match saved {
        Saved::One(r) => vec![*r],
        Saved::Runs { runs } => runs,
    })
}

/// `date -u` in a format (no clock crate for one timestamp).
pub fn stamp(format: &str) -> String {
    Command::new("date")
        .arg("-u")
        .arg(format!("+{format}"))
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown-time".into())
}

pub(super) fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// What else kept the CPUs busy while the run started (it makes the figures noisy): every
/// process that used at least 10% of a core over one second, by name.
fn busy_processes() -> Vec<String> {
    let sample = || -> BTreeMap<i32, (String, u64)> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return BTreeMap::new();
        };
        dir.flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
            .filter_map(|pid| {
                Some((
                    pid,
                    (super::procs::comm(pid)?, super::procs::cpu_ticks(pid)?),
                ))
            })
            .collect()
    };
    let before = sample();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let after = sample();
    let hz = super::procs::clock_ticks();
    let me = std::process::id() as i32;
    let mut busy: BTreeMap<String, f64> = BTreeMap::new();
    for (pid, (comm, t1)) in &after {
        let t0 = before.get(pid).map_or(0, |(_, t)| *t);
        let share = t1.saturating_sub(t0) as f64 / hz;
        if *pid != me && share >= 0.1 {
            *busy.entry(comm.clone()).or_default() += share;
        }
    }
    busy.into_iter()
        .map(|(c, share)| format!("{c} ({:.0}% of a core)", share * 100.0))
        .collect()
}

fn git_version() -> String {
    let root = crate::util::workspace_root();
    let out = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(&root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let head = out(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty =
        out(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    format!(
        "{head}{}",
        if dirty { " (uncommitted changes)" } else { "" }
    )
}

/// Lower or higher is better.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Better {
    Lower,
    Higher,
}

/// The best peer's value of a figure (None when no peer has one).
fn best_peer(
    r: &RunReport,
    better: Better,
    f: &dyn Fn(&ScenarioReport) -> Option<f64>,
) -> Option<f64> {
    let vals = r
        .scenarios
        .iter()
        .filter(|s| s.name.is_peer())
        .filter_map(f);
    match better {
        Better::Lower => vals.fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.min(v)))),
        Better::Higher => vals.fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v)))),
    }
}

fn cell(v: Option<f64>, best: Option<f64>, fmt: &dyn Fn(f64) -> String) -> String {
    match v {
        None => "—".into(),
        Some(v) => match best {
            // A ratio of a negative figure (an added latency below the noise) means nothing.
            Some(b) if b > 0.0 && v >= 0.0 && v.is_finite() => {
                format!("{} ({:.2}×)", fmt(v), v / b)
            }
            _ => fmt(v),
        },
    }
}

/// The run as Markdown: a header, then one table per figure family.
pub fn markdown(r: &RunReport) -> String {
    let mut md = String::new();
    let m = &r.meta;
    let http = m.mode != Mode::L4;
    let _ = writeln!(
        md,
        "### {} — {}{}",
        mode_title(m.mode),
        m.date_utc,
        if m.quick { " (quick)" } else { "" }
    );
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "- machine: {} cores, {}, Linux {}, {} GiB",
        m.machine.cores, m.machine.cpu_model, m.machine.kernel, m.machine.memory_gib
    );
    let _ = writeln!(md, "- command: `{}`", m.command);
    let versions: Vec<String> = r.versions.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(md, "- versions: {}", versions.join("; "));
    let busy = if m.busy_at_start.is_empty() {
        "nothing busy".to_string()
    } else {
        m.busy_at_start.join(", ")
    };
    let _ = writeln!(
        md,
        "- load average {:.2} at start, {:.2} at end; other processes at start: {busy}",
        m.load_at_start, r.load_at_end
    );
    let p = &r.plan;
    if http {
        let _ = writeln!(
            md,
            "- workload: HTTP/1.1 keep-alive GET from the app, 1 KiB answers, client pod → server pod through two proxies (one per pod, each on one thread) in their HTTP modes: HTTP/2 between the pair for Muon (service port `protocol: http`), Envoy and HAProxy, HTTP/1.1 keep-alive pools for nginx (no HTTP/2 upstream in `proxy_pass`); open loop {}s per rate after {}s warm-up, latency from the intended send time (coordinated omission corrected); closed loop {}s over {} connections; no bulk step (an HTTP proxy carries no raw TCP stream)",
            p.latency_s, p.warmup_s, p.saturation_s, p.saturation_connections
        );
        let _ = writeln!(
            md,
            "- gRPC: unary calls (64-byte request, 1 KiB answer, `grpc-status: 0` in trailers) to `demo-shop echo-grpc`, HTTP/2 from the app to the app over {} connections (port `protocol: grpc` for Muon); same durations",
            p.grpc_connections
        );
        if m.mode == Mode::Mtls {
            let _ = writeln!(
                md,
                "- mTLS: TLS 1.3 between the two proxies of each pair, the app's hops plaintext; the peers with ECDSA P-256 certificates from one test CA, URI SAN `spiffe://cluster.local/ns/bench/sa/<client|server>`: Envoy checks the other side's URI SAN on both sides; HAProxy and nginx check the chain on both sides and the server's DNS SAN on the client side (neither can match a URI SAN); Muon uses its own mesh certificates from its control plane"
            );
            let checks: Vec<String> = r
                .scenarios
                .iter()
                .filter_map(|s| Some(format!("{}: {}", s.name.name(), s.mtls_check.as_ref()?)))
                .collect();
            if !checks.is_empty() {
                let _ = writeln!(
                    md,
                    "- mTLS checks at start (GETs to the server side from the client pod as the proxy's user): {}",
                    checks.join("; ")
                );
            }
        }
    } else {
        let _ = writeln!(
            md,
            "- workload: HTTP/1.1 keep-alive GET, 1 KiB answers, client pod → server pod through two proxies (one per pod, each on one thread); open loop {}s per rate after {}s warm-up, latency from the intended send time (coordinated omission corrected); closed loop {}s over {} connections; bulk: one TCP stream for {}s each way",
            p.latency_s, p.warmup_s, p.saturation_s, p.saturation_connections, p.bulk_s
        );
    }
    if m.mode != Mode::Mtls {
        let _ = writeln!(
            md,
            "- plaintext between the two proxies of every pair: Muon's lab has no control plane in this mode (`controlPlane: false`, the sidecars read the lab's static table), so its sidecars have no mesh certificates"
        );
    }
    let _ = writeln!(
        md,
        "- ratio in parentheses: figure ÷ best peer's (Envoy, HAProxy, nginx) in this run"
    );
    if p.rounds >= 3 {
        let _ = writeln!(
            md,
            "- every step ran in {} rounds, each visiting every scenario in turn; latency percentiles are the median over rounds (all rounds merged: results.json), throughput and CPU are totals over all rounds",
            p.rounds
        );
    }
    // What the hop between the pair looked like under the most app connections.
    let mut pools = Vec::new();
    for (label, key) in [
        (
            format!(
                "HTTP/1.1 at {} connections",
                p.rates.last().map_or(0, |r| r.1)
            ),
            p.rates.last().map(|r| format!("open_{}", r.0)),
        ),
        (
            format!(
                "gRPC at {} streams over {} connections",
                p.grpc_rates.last().map_or(0, |r| r.1),
                p.grpc_connections
            ),
            p.grpc_rates.last().map(|r| format!("grpc_open_{}", r.0)),
        ),
    ] {
        let Some(key) = key else { continue };
        let counts: Vec<String> = r
            .scenarios
            .iter()
            .filter(|s| s.name != Kind::Direct)
            .filter_map(|s| {
                Some(format!(
                    "{} {}",
                    s.name.name(),
                    s.step(&key)?.pair_connections?
                ))
            })
            .collect();
        if !counts.is_empty() {
            pools.push(format!("{label}: {}", counts.join(", ")));
        }
    }
    if !pools.is_empty() {
        let _ = writeln!(
            md,
            "- most connections open between the two proxies during the busiest open-loop step, counted on the server side's inbound port{}: {}",
            if p.grpc_rates.is_empty() {
                ""
            } else {
                " (an idle pooled connection of the HTTP port counts in the gRPC step too)"
            },
            pools.join("; ")
        );
    }
    for s in r.scenarios.iter().filter(|s| s.error.is_some()) {
        let _ = writeln!(
            md,
            "- **{} {}**: {}",
            s.name.name(),
            if s.steps.is_empty() {
                "did not run"
            } else {
                "is incomplete"
            },
            s.error.as_deref().unwrap_or("")
        );
    }

    for &(rate, conns) in &p.rates {
        latency_table(
            &mut md,
            r,
            &format!("open_{rate}"),
            &format!("Added latency at {rate} requests/s ({conns} connections), ms"),
            false,
        );
    }

    let _ = writeln!(md);
    let _ = writeln!(md, "#### Throughput and cost");
    let _ = writeln!(md);
    // (header, which way is better, the figure, decimals)
    let mut columns: Vec<Column> = vec![(
        "max rps".into(),
        Better::Higher,
        Box::new(|s| Some(s.latency("closed")?.achieved_rps)),
        0,
    )];
    if p.bulk_s > 0.0 {
        columns.push((
            "bulk up MB/s".into(),
            Better::Higher,
            Box::new(|s| Some(s.step("bulk_up")?.bulk.as_ref()?.mb_per_s)),
            0,
        ));
        columns.push((
            "bulk down MB/s".into(),
            Better::Higher,
            Box::new(|s| Some(s.step("bulk_down")?.bulk.as_ref()?.mb_per_s)),
            0,
        ));
    }
    for &(rate, _) in &p.rates {
        let key = format!("open_{rate}");
        columns.push((
            format!("CPU ms / 1k req at {rate} rps"),
            Better::Lower,
            Box::new(move |s| s.step(&key)?.cpu_per_1k()),
            1,
        ));
    }
    columns.push((
        "RSS idle MiB".into(),
        Better::Lower,
        Box::new(|s| mib(s.rss_idle_kib.values().copied().max()?)),
        1,
    ));
    columns.push((
        "RSS under load MiB".into(),
        Better::Lower,
        Box::new(|s| mib(s.rss_load_kib(false)?)),
        1,
    ));
    figure_table(&mut md, r, &columns, false);
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "CPU is both proxies of the pair together (utime + stime from /proc, warm-up included); RSS is per proxy, the larger of the two sides; \"idle\" is after start-up and a short smoke test, before the load."
    );

    if !p.grpc_rates.is_empty() {
        for s in r.scenarios.iter().filter(|s| s.grpc_error.is_some()) {
            let _ = writeln!(md);
            let _ = writeln!(
                md,
                "- **{} did not run the gRPC steps**: {}",
                s.name.name(),
                short(s.grpc_error.as_deref().unwrap_or(""), 80)
            );
        }
        for &(rate, streams) in &p.grpc_rates {
            latency_table(
                &mut md,
                r,
                &format!("grpc_open_{rate}"),
                &format!(
                    "gRPC unary: added latency at {rate} calls/s ({streams} streams over {} HTTP/2 connections), ms",
                    p.grpc_connections
                ),
                true,
            );
        }
        let _ = writeln!(md);
        let _ = writeln!(md, "#### gRPC unary: throughput and cost");
        let _ = writeln!(md);
        let mut columns: Vec<Column> = vec![(
            format!("max calls/s ({} streams)", p.grpc_saturation_streams),
            Better::Higher,
            Box::new(|s| Some(s.latency("grpc_closed")?.achieved_rps)),
            0,
        )];
        for &(rate, _) in &p.grpc_rates {
            let key = format!("grpc_open_{rate}");
            columns.push((
                format!("CPU ms / 1k calls at {rate}/s"),
                Better::Lower,
                Box::new(move |s| s.step(&key)?.cpu_per_1k()),
                1,
            ));
        }
        columns.push((
            "RSS under gRPC load MiB".into(),
            Better::Lower,
            Box::new(|s| mib(s.rss_load_kib(true)?)),
            1,
        ));
        figure_table(&mut md, r, &columns, true);
        let _ = writeln!(md);
        let _ = writeln!(
            md,
            "HAProxy and nginx forward to one configured port, so they were restarted on the gRPC port before these steps (their idle RSS is the table above's); Envoy and Muon serve both ports with the same processes. nginx's `grpc_pass` is HTTP/2 upstream but takes one upstream connection per call in flight."
        );
    }
    md
}

/// (header, which way is better, the figure, decimals)
type Column = (
    String,
    Better,
    Box<dyn Fn(&ScenarioReport) -> Option<f64>>,
    usize,
);

/// Does a scenario have a row in the gRPC tables (it ran them, or says why not)?
fn in_grpc_tables(s: &ScenarioReport) -> bool {
    s.grpc_error.is_some() || s.steps.keys().any(|k| k.starts_with("grpc_"))
}

/// One open-loop step's added latency against direct, per scenario.
fn latency_table(md: &mut String, r: &RunReport, key: &str, title: &str, grpc: bool) {
    let direct = r
        .scenarios
        .iter()
        .find(|s| s.name == Kind::Direct && s.error.is_none());
    let _ = writeln!(md);
    let _ = writeln!(md, "#### {title}");
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "| scenario | p50 | p90 | p99 | p99.9 | achieved {} | errors |",
        if grpc { "calls/s" } else { "rps" }
    );
    let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- | --- |");
    type Pick = fn(&super::load::Percentiles) -> f64;
    let picks: [Pick; 4] = [|l| l.p50, |l| l.p90, |l| l.p99, |l| l.p999];
    let added = |s: &ScenarioReport, pick: Pick| -> Option<f64> {
        let own = s.step(key)?.percentile(pick)?;
        let base = direct?.step(key)?.percentile(pick)?;
        Some((own - base) / 1000.0)
    };
    for s in &r.scenarios {
        if (s.error.is_some() && s.steps.is_empty()) || (grpc && !in_grpc_tables(s)) {
            continue;
        }
        let mut row = format!("| {} ", s.name.name());
        let Some(l) = s.latency(key) else {
            let why = s
                .steps
                .get(key)
                .and_then(|x| x.error.clone())
                .or_else(|| s.grpc_error.clone().filter(|_| grpc))
                .unwrap_or_else(|| "not run".into());
            let _ = writeln!(md, "{row}| {} | | | | | |", short(&why, 80));
            continue;
        };
        for pick in picks {
            let text = if s.name == Kind::Direct {
                let base = s
                    .step(key)
                    .and_then(|st| st.percentile(pick))
                    .unwrap_or(0.0);
                format!("{:.3} (base)", base / 1000.0)
            } else {
                let best = best_peer(r, Better::Lower, &|p| added(p, pick));
                cell(added(s, pick), best, &|v| format!("{v:+.3}"))
            };
            let _ = write!(row, "| {text} ");
        }
        let _ = writeln!(
            md,
            "{row}| {:.0} | {} |",
            l.achieved_rps,
            l.errors + l.unsent
        );
    }
}

/// One row per scenario, one column per figure, each with its ratio to the best peer.
fn figure_table(md: &mut String, r: &RunReport, columns: &[Column], grpc: bool) {
    let names: Vec<&str> = columns.iter().map(|c| c.0.as_str()).collect();
    let _ = writeln!(md, "| scenario | {} |", names.join(" | "));
    let _ = writeln!(md, "| --- |{}", " --- |".repeat(columns.len()));
    for s in &r.scenarios {
        if (s.error.is_some() && s.steps.is_empty()) || (grpc && !in_grpc_tables(s)) {
            continue;
        }
        let mut row = format!("| {} ", s.name.name());
        for (_, better, fig, decimals) in columns {
            let best = best_peer(r, *better, fig);
            let _ = write!(
                row,
                "| {} ",
                cell(fig(s), best, &|v| format!("{v:.decimals$}"))
            );
        }
        let _ = writeln!(md, "{row}|");
    }
}

fn mib(kib: u64) -> Option<f64> {
    (kib > 0).then(|| kib as f64 / 1024.0)
}

/// One line of at most `max` characters (and no `|`, for tables).
pub fn short(s: &str, max: usize) -> String {
    let one_line = s.replace('\n', " ").replace('|', "/");
    if one_line.chars().count() > max {
        format!("{}…", one_line.chars().take(max).collect::<String>())
    } else {
        one_line
    }
}

fn mode_title(mode: Mode) -> &'static str {
    match mode {
        Mode::L4 => "L4 (TCP forwarding)",
        Mode::Http => "HTTP",
        Mode::Mtls => "mTLS",
    }
}

/// Every run's tables, one after the other; with an HTTP and an mTLS run among them, the
/// cost of mTLS between the two (the last of each).
pub fn markdown_runs(runs: &[RunReport]) -> String {
    let mut md = String::new();
    for (i, r) in runs.iter().enumerate() {
        if i > 0 {
            md.push('\n');
        }
        md.push_str(&markdown(r));
    }
    let last = |mode| runs.iter().rev().find(|r| r.meta.mode == mode);
    if let (Some(http), Some(mtls)) = (last(Mode::Http), last(Mode::Mtls)) {
        md.push('\n');
        md.push_str(&mtls_cost(http, mtls));
    }
    md
}

/// A scenario's added latency (its percentile minus direct's in the same run), in ms.
fn added_ms(r: &RunReport, s: &ScenarioReport, key: &str, pick: Pick) -> Option<f64> {
    let direct = r
        .scenarios
        .iter()
        .find(|s| s.name == Kind::Direct && s.error.is_none())?;
    let own = s.step(key)?.percentile(pick)?;
    let base = direct.step(key)?.percentile(pick)?;
    Some((own - base) / 1000.0)
}

type Pick = fn(&Percentiles) -> f64;

/// One column of the cost table: (header, the figure in one run, decimals, relative).
type CostColumn = (
    String,
    Box<dyn Fn(&RunReport, &ScenarioReport) -> Option<f64>>,
    usize,
    bool,
);

/// "The cost of mTLS": per scenario, the mTLS run's figure beside the HTTP run's and the
/// difference: added latency (each against its own run's direct), CPU per request, and
/// throughput (relative).
pub fn mtls_cost(http: &RunReport, mtls: &RunReport) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "### The cost of mTLS");
    let _ = writeln!(md);
    let same_run =
        http.meta.date_utc == mtls.meta.date_utc && http.meta.command == mtls.meta.command;
    let when = if same_run {
        format!(
            "the same run (`{}`, {}): both modes' labs were up at once and every step visited them in turn",
            mtls.meta.command, mtls.meta.date_utc
        )
    } else {
        format!(
            "two runs: HTTP mode on {}, mTLS mode on {} (whatever else changed on the machine between them is in the difference)",
            http.meta.date_utc, mtls.meta.date_utc
        )
    };
    let _ = writeln!(
        md,
        "What mutual TLS between the two proxies adds to the same pair in HTTP mode, from {when}. Each cell: HTTP → mTLS (difference); latency is added latency (against each mode's direct path), CPU is both proxies' ms per 1,000 requests."
    );
    let tables = [
        ("HTTP/1.1 from the app", "open_", "closed", &mtls.plan.rates),
        (
            "gRPC unary",
            "grpc_open_",
            "grpc_closed",
            &mtls.plan.grpc_rates,
        ),
    ];
    for (title, open, closed, rates) in tables {
        if rates.is_empty() {
            continue;
        }
        let unit = if open.starts_with("grpc") {
            "calls"
        } else {
            "req"
        };
        let mut columns: Vec<CostColumn> = Vec::new();
        for &(rate, _) in rates {
            let picks: [(&str, Pick); 2] = [("p50", |l| l.p50), ("p99", |l| l.p99)];
            for (name, pick) in picks {
                let key = format!("{open}{rate}");
                columns.push((
                    format!("added {name} at {rate}/s, ms"),
                    Box::new(move |r, s| added_ms(r, s, &key, pick)),
                    3,
                    false,
                ));
            }
        }
        for &(rate, _) in rates {
            let key = format!("{open}{rate}");
            columns.push((
                format!("CPU ms / 1k {unit} at {rate}/s"),
                Box::new(move |_, s| s.step(&key)?.cpu_per_1k()),
                1,
                false,
            ));
        }
        let closed = closed.to_string();
        columns.push((
            format!("max {unit}/s"),
            Box::new(move |_, s| Some(s.latency(&closed)?.achieved_rps)),
            0,
            true,
        ));
        let _ = writeln!(md);
        let _ = writeln!(md, "#### {title}: HTTP → mTLS");
        let _ = writeln!(md);
        let names: Vec<&str> = columns.iter().map(|c| c.0.as_str()).collect();
        let _ = writeln!(md, "| scenario | {} |", names.join(" | "));
        let _ = writeln!(md, "| --- |{}", " --- |".repeat(columns.len()));
        for s in mtls.scenarios.iter().filter(|s| s.name != Kind::Direct) {
            let name = s.name.name();
            let Some(h) = http.scenarios.iter().find(|h| h.name == s.name) else {
                let _ = writeln!(
                    md,
                    "| {name} | not in the HTTP run |{}",
                    " |".repeat(columns.len() - 1)
                );
                continue;
            };
            if s.steps.is_empty() || h.steps.is_empty() {
                let why = match (&s.error, &h.error) {
                    (Some(e), _) if s.steps.is_empty() => format!("mTLS: {}", short(e, 100)),
                    (_, Some(e)) => format!("HTTP: {}", short(e, 100)),
                    _ => "not run".into(),
                };
                let _ = writeln!(md, "| {name} | {why} |{}", " |".repeat(columns.len() - 1));
                continue;
            }
            let mut row = format!("| {name} ");
            for (_, fig, decimals, relative) in &columns {
                let text = match (fig(http, h), fig(mtls, s)) {
                    (Some(a), Some(b)) if *relative && a > 0.0 => {
                        format!(
                            "{a:.decimals$} → {b:.decimals$} ({:+.0}%)",
                            (b / a - 1.0) * 100.0
                        )
                    }
                    (Some(a), Some(b)) => {
                        format!("{a:.decimals$} → {b:.decimals$} ({:+.decimals$})", b - a)
                    }
                    (Some(a), None) => format!("{a:.decimals$} → —"),
                    (None, Some(b)) => format!("— → {b:.decimals$}"),
                    (None, None) => "—".into(),
                };
                let _ = write!(row, "| {text} ");
            }
            let _ = writeln!(md, "{row}|");
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::load::Percentiles;

    fn scenario(kind: Kind, p99_us: f64, rps: f64, cpu: f64) -> ScenarioReport {
        let mut s = ScenarioReport::new(kind);
        let load = LoadReport {
            latency_us: Percentiles {
                p50: p99_us / 2.0,
                p90: p99_us,
                p99: p99_us,
                p999: p99_us,
                ..Default::default()
            },
            achieved_rps: rps,
            total_requests: 1000,
            ..Default::default()
        };
        let mut cpu_ms = BTreeMap::new();
        if kind != Kind::Direct {
            cpu_ms.insert("client".to_string(), cpu / 2.0);
            cpu_ms.insert("server".to_string(), cpu / 2.0);
        }
        s.steps.insert(
            "open_1000".into(),
            StepResult {
                load: Some(load.clone()),
                cpu_ms,
                ..Default::default()
            },
        );
        s.steps.insert(
            "closed".into(),
            StepResult {
                load: Some(load),
                ..Default::default()
            },
        );
        s
    }

    fn run(scenarios: Vec<ScenarioReport>) -> RunReport {
        RunReport {
            meta: Meta {
                date_utc: "2026-01-01 00:00 UTC".into(),
                command: "cargo xtask bench".into(),
                quick: false,
                mode: super::super::Mode::L4,
                machine: Machine {
                    cores: 2,
                    cpu_model: "cpu".into(),
                    kernel: "6".into(),
                    memory_gib: 24.0,
                },
                muon_version: "abc".into(),
                load_at_start: 0.0,
                busy_at_start: vec![],
            },
            versions: BTreeMap::new(),
            plan: Plan::new(false, super::super::Mode::L4),
            scenarios,
            load_at_end: 0.0,
            elapsed_s: 1.0,
        }
    }

    #[test]
    fn added_latency_is_against_direct_and_ratios_against_the_best_peer() {
        let r = run(vec![
            scenario(Kind::Direct, 100.0, 9000.0, 0.0),
            scenario(Kind::Muon, 150.0, 6000.0, 100.0),
            scenario(Kind::Envoy, 300.0, 4000.0, 300.0),
            scenario(Kind::Haproxy, 200.0, 5000.0, 200.0),
        ]);
        let md = markdown(&r);
        // p99: muon +0.050 ms, best peer haproxy +0.100 ms.
        assert!(
            md.contains("| muon | +0.025 (0.50×) | +0.050 (0.50×) | +0.050 (0.50×) |"),
            "{md}"
        );
        assert!(md.contains("| haproxy | +0.050 (1.00×)"), "{md}");
        assert!(
            md.contains("| direct | 0.050 (base) | 0.100 (base)"),
            "{md}"
        );
        // Throughput: higher is better, best peer is haproxy's 5000.
        assert!(md.contains("| muon | 6000 (1.20×)"), "{md}");
        // CPU per 1k requests: 100 ms over 1000 requests = 100 ms per 1k; best peer 200.
        assert!(md.contains("| 100.0 (0.50×)"), "{md}");
    }

    #[test]
    fn http_mode_has_grpc_tables_and_no_bulk_columns() {
        let mut muon = scenario(Kind::Muon, 150.0, 6000.0, 100.0);
        let mut grpc = muon.steps["open_1000"].clone();
        grpc.pair_connections = Some(1);
        muon.steps.insert("grpc_open_5000".into(), grpc.clone());
        muon.steps.insert("grpc_closed".into(), grpc);
        let mut nginx = scenario(Kind::Nginx, 200.0, 5000.0, 200.0);
        nginx.grpc_error = Some("nginx exited".into());
        let mut direct = scenario(Kind::Direct, 100.0, 9000.0, 0.0);
        let d = direct.steps["open_1000"].clone();
        direct.steps.insert("grpc_open_5000".into(), d);
        let mut r = run(vec![direct, muon, nginx]);
        r.meta.mode = super::super::Mode::Http;
        r.plan = Plan::new(false, super::super::Mode::Http);
        let md = markdown(&r);
        assert!(!md.contains("bulk up MB/s"), "{md}");
        assert!(
            md.contains("#### gRPC unary: added latency at 5000 calls/s"),
            "{md}"
        );
        assert!(md.contains("#### gRPC unary: throughput and cost"), "{md}");
        assert!(
            md.contains("**nginx did not run the gRPC steps**: nginx exited"),
            "{md}"
        );
        assert!(md.contains("| nginx | nginx exited | | | | | |"), "{md}");
        assert!(
            md.contains("gRPC at 50 streams over 2 connections: muon 1"),
            "{md}"
        );
    }

    #[test]
    fn a_run_of_both_modes_reports_the_cost_of_mtls_per_scenario() {
        let mode_run = |mode: Mode, envoy_p99: f64, envoy_cpu: f64, muon: Option<&str>| {
            let mut m = scenario(Kind::Muon, 150.0, 6000.0, 100.0);
            if let Some(why) = muon {
                m = ScenarioReport::new(Kind::Muon);
                m.fail(why.into());
            }
            let mut envoy = scenario(Kind::Envoy, envoy_p99, 4000.0, envoy_cpu);
            if mode == Mode::Mtls {
                envoy.mtls_check = Some("without a certificate: refused".into());
                envoy
                    .steps
                    .get_mut("closed")
                    .unwrap()
                    .load
                    .as_mut()
                    .unwrap()
                    .achieved_rps = 3000.0;
            }
            let mut r = run(vec![scenario(Kind::Direct, 100.0, 9000.0, 0.0), m, envoy]);
            r.meta.mode = mode;
            r.plan = Plan::new(false, mode);
            r
        };
        let http = mode_run(Mode::Http, 300.0, 300.0, None);
        let mtls = mode_run(
            Mode::Mtls,
            500.0,
            400.0,
            Some("start: Muon's sidecars did not use mTLS"),
        );
        let saved = serde_json::to_string(&Saved::from(vec![http.clone(), mtls.clone()])).unwrap();
        let back: Saved = serde_json::from_str(&saved).unwrap();
        assert!(matches!(&back, Saved::Runs { runs } if runs.len() == 2));
        // One run is saved as before: a plain RunReport.
        let one = serde_json::to_string(&Saved::from(vec![http.clone()])).unwrap();
        assert!(serde_json::from_str::<RunReport>(&one).is_ok());

        let md = markdown_runs(&[http, mtls]);
        assert!(
            md.contains("### HTTP — ") && md.contains("### mTLS — "),
            "{md}"
        );
        assert!(md.contains("- mTLS checks at start (GETs to the server side from the client pod as the proxy's user): envoy: without a certificate: refused"), "{md}");
        assert!(md.contains("### The cost of mTLS"), "{md}");
        assert!(md.contains("from the same run"), "{md}");
        assert!(
            md.contains("#### HTTP/1.1 from the app: HTTP → mTLS"),
            "{md}"
        );
        // Envoy: p99 added 0.200 → 0.400 ms; CPU 300 → 400 ms per 1k; max rps 4000 → 3000.
        assert!(
            md.contains("| envoy | 0.100 → 0.200 (+0.100) | 0.200 → 0.400 (+0.200) |"),
            "{md}"
        );
        assert!(md.contains("| 300.0 → 400.0 (+100.0) |"), "{md}");
        assert!(md.contains("| 4000 → 3000 (-25%) |"), "{md}");
        assert!(
            md.contains("| muon | mTLS: start: Muon's sidecars did not use mTLS |"),
            "{md}"
        );
    }

    #[test]
    fn with_three_rounds_or_more_the_table_takes_the_median_round() {
        let mut s = ScenarioReport::new(Kind::Muon);
        for p99 in [300.0, 30_000.0, 310.0, 320.0] {
            let load = LoadReport {
                latency_us: Percentiles {
                    p99,
                    ..Default::default()
                },
                total_requests: 10,
                requests: 10,
                duration_s: 1.0,
                ..Default::default()
            };
            s.add_round(
                "open_1000",
                StepResult {
                    load: Some(load),
                    ..Default::default()
                },
            );
        }
        let step = &s.steps["open_1000"];
        assert_eq!(step.rounds_latency_us.len(), 4);
        // The one noisy round does not move the figure: median of 300, 310, 320, 30000.
        assert_eq!(step.percentile(|l| l.p99), Some(315.0));
        assert_eq!(step.load.as_ref().map(|l| l.requests), Some(40));
    }

    #[test]
    fn a_scenario_that_did_not_start_is_reported_and_the_rest_still_print() {
        let mut failed = ScenarioReport::new(Kind::Nginx);
        failed.fail("start: nginx exited".into());
        let r = run(vec![
            scenario(Kind::Direct, 100.0, 9000.0, 0.0),
            scenario(Kind::Muon, 150.0, 6000.0, 100.0),
            failed,
        ]);
        let md = markdown(&r);
        assert!(md.contains("**nginx did not run**: start: nginx exited"));
        // No peer figures: no ratios, plain values.
        assert_eq!(
            cell(Some(-0.5), Some(0.1), &|v| format!("{v:+.3}")),
            "-0.500"
        );
        assert!(md.contains("| muon | +0.025 | +0.050 |"), "{md}");
    }
}
