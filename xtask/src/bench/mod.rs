//! `cargo xtask bench`: Muon against Envoy, HAProxy and nginx, and against no proxy at all,
//! side by side in one run, on the lab's real iptables capture.
//!
//! One lab per scenario (see `scenarios`), all up at once; then each measurement step runs
//! over every scenario before the next step starts, so that the scenarios compared in a
//! table were measured minutes apart, not a quarter of an hour. The steps:
//!
//! 1. idle RSS of every proxy, before any load;
//! 2. open loop at 1,000 and 5,000 requests/s (HTTP/1.1 keep-alive, 1 KiB answers), with
//!    latency corrected for coordinated omission, the proxies' CPU time and peak RSS;
//! 3. closed loop: maximum requests/s;
//! 4. one TCP stream each way: MB/s (L4 mode only);
//! 5. in HTTP mode, gRPC unary calls (see `grpc`): open loop at 1,000 and 5,000 calls/s and
//!    the closed loop, against `demo-shop echo-grpc`.
//!
//! `--mode l4` declares the service ports `tcp` and runs the peers as TCP proxies; `--mode
//! http` declares them `http` (and the gRPC port `grpc`) and runs the peers in their HTTP
//! modes (see `peers`); `--mode mtls` is HTTP mode with mutual TLS between the two proxies
//! of every pair (the peers with certificates from a test CA the run makes, see `pki`; Muon
//! with its own mesh certificates). `--mode http,mtls` brings both modes' labs up at once and
//! every step visits them in turn, so the report's "cost of mTLS" compares figures taken
//! seconds apart.
//!
//! The load generator is this binary (`xtask bench load|grpc-load|bulk|bulk-server`),
//! built in release mode and run inside the client pod. Results go to
//! `bench-results/<time>/` as `results.json` and `results.md` (see `report`).

mod gray;
mod grpc;
mod load;
mod peers;
mod pki;
mod procs;
mod profile;
mod report;
mod scenarios;
mod tlsprobe;

use crate::util;
use anyhow::{bail, Context, Result};
use report::{Meta, RunReport, ScenarioReport, StepResult};
use scenarios::{Kind, Running};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the pods find the binaries the harness runs in them (world-readable).
const BENCH_ROOT: &str = "/run/muon/bench";

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    tool: Option<Tool>,
    /// A short run (under 3 minutes; 4 in HTTP or mTLS mode, 7 for both): the same steps,
    /// shorter.
    #[arg(long)]
    quick: bool,
    /// What the proxies carry: l4 (TCP forwarding), http (HTTP/1.1 from the app, HTTP/2
    /// between the proxies, and gRPC) or mtls (http with mutual TLS between the proxies).
    /// `http,mtls` runs both side by side and reports the cost of mTLS.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "l4")]
    mode: Vec<Mode>,
    /// Profile Muon under load with perf instead of comparing (writes profile.md).
    #[arg(long)]
    profile: bool,
    /// Only these scenarios (comma-separated). direct always runs in a comparison: every
    /// latency is reported against it. `gray-failure` (HTTP mode, run by default there):
    /// two replicas, one slow on 10% of its answers, balanced by Muon's PeakEWMA and
    /// RoundRobin and Envoy's LEAST_REQUEST; alone, it runs without the comparison.
    #[arg(long, value_enum, value_delimiter = ',')]
    scenarios: Vec<Kind>,
    /// Results directory (default: bench-results/<UTC time>/ in the workspace).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Use the release binaries already built instead of building them.
    #[arg(long)]
    no_build: bool,
    /// Print the tables of an earlier run from its results.json, and do nothing else. Given
    /// twice, an HTTP run's and an mTLS run's, it also prints the cost of mTLS between them.
    #[arg(long, value_name = "RESULTS_JSON")]
    report: Vec<PathBuf>,
    /// Take muon-proxy, muon-init and muon-control from this directory instead of the release
    /// build (the lab's --bin-dir), e.g. to measure a candidate fix against the same peers.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

#[derive(clap::Subcommand, Debug)]
enum Tool {
    /// (Runs in a pod) HTTP/1.1 load: open loop with --rate, closed loop without.
    Load(load::LoadArgs),
    /// (Runs in a pod) gRPC unary calls over HTTP/2: open loop with --rate, closed loop without.
    GrpcLoad(grpc::GrpcLoadArgs),
    /// (Runs in a pod) One HTTP GET; prints the body (a sidecar's metrics).
    Get(load::GetArgs),
    /// (Runs in a pod) One TCP stream to a bulk server, up or down.
    Bulk(load::BulkArgs),
    /// (Runs in a pod) The bulk server: sink and source.
    BulkServer(load::BulkServerArgs),
    /// (Runs in a pod) One GET over TLS (with or without a client certificate) or plaintext:
    /// does a proxy's server side require mutual TLS?
    TlsProbe(tlsprobe::TlsProbeArgs),
    /// Control plane: endpoint change → every proxy's ACK, bytes per change, RSS and CPU.
    ControlPlane(crate::cpbench::CpBenchArgs),
}

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// TCP forwarding (tcp_proxy, `mode tcp`, `stream`).
    L4,
    /// HTTP/1.1 and HTTP/2 between the proxies.
    Http,
    /// Mutual TLS with SPIFFE certificates between the proxies.
    Mtls,
}

/// What every scenario needs to know about the run.
pub struct Env {
    pub muonctl: PathBuf,
    /// Where muon-proxy and muon-init are (the lab's --bin-dir).
    pub lab_bins: PathBuf,
    /// World-readable copies of what runs in pods: muon-bench, demo-shop, envoy.
    pub bench_bin: PathBuf,
    pub out: PathBuf,
    /// The run's modes: one, or http and mtls side by side.
    pub modes: Vec<Mode>,
    /// mTLS mode: the run's test CA and the certificates of the peers' two sides.
    pub pki: Option<pki::TestPki>,
}

/// How long each step runs.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    pub warmup_s: f64,
    pub latency_s: f64,
    pub saturation_s: f64,
    pub bulk_s: f64,
    /// (requests/s, connections) of the open-loop steps.
    pub rates: Vec<(u32, usize)>,
    pub saturation_connections: usize,
    /// gRPC unary (HTTP and mTLS modes; empty otherwise): (calls/s, streams) of the
    /// open-loop steps.
    #[serde(default)]
    pub grpc_rates: Vec<(u32, usize)>,
    /// The HTTP/2 connections the gRPC streams share.
    #[serde(default)]
    pub grpc_connections: usize,
    #[serde(default)]
    pub grpc_saturation_streams: usize,
    /// Each step's time is split into this many rounds, and every round visits every
    /// scenario in turn: a burst of noise from a neighbour lands on all of them, not one.
    pub rounds: usize,
}

impl Plan {
    fn new(quick: bool, mode: Mode) -> Plan {
        let rates = vec![(1000, 10), (5000, 50)];
        let (grpc_rates, grpc_connections, grpc_saturation_streams) = match mode {
            Mode::Http | Mode::Mtls => (vec![(1000, 10), (5000, 50)], 2, 16),
            Mode::L4 => (Vec::new(), 0, 0),
        };
        // HTTP (and mTLS) mode carries no raw TCP stream: no bulk step.
        let bulk = mode == Mode::L4;
        if quick {
            Plan {
                warmup_s: 1.0,
                latency_s: 4.0,
                saturation_s: 4.0,
                bulk_s: if bulk { 2.0 } else { 0.0 },
                rates,
                saturation_connections: 16,
                grpc_rates,
                grpc_connections,
                grpc_saturation_streams,
                rounds: 1,
            }
        } else {
            Plan {
                warmup_s: 1.0,
                latency_s: 40.0,
                saturation_s: 16.0,
                bulk_s: if bulk { 12.0 } else { 0.0 },
                rates,
                saturation_connections: 16,
                grpc_rates,
                grpc_connections,
                grpc_saturation_streams,
                rounds: 4,
            }
        }
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    if let Some(tool) = &args.tool {
        return match tool {
            Tool::Load(a) => load::run_load(a),
            Tool::GrpcLoad(a) => grpc::run_grpc_load(a),
            Tool::Get(a) => load::run_get(a),
            Tool::Bulk(a) => load::run_bulk(a),
            Tool::BulkServer(a) => load::run_bulk_server(a),
            Tool::TlsProbe(a) => tlsprobe::run_tls_probe(a),
            Tool::ControlPlane(a) => crate::cpbench::run(a.clone()),
        };
    }
    if !args.report.is_empty() {
        let mut runs = Vec::new();
        for path in &args.report {
            runs.extend(report::read(path)?);
        }
        print!("{}", report::markdown_runs(&runs));
        return Ok(());
    }
    let modes = modes(&args.mode)?;
    if args.profile && modes.len() > 1 {
        bail!("--profile takes one --mode");
    }
    util::require_root(
        "the benchmark runs in a lab: network namespaces and iptables rules inside them",
    )?;
    // What the lab itself needs (iptables, iproute2, …), as `cargo xtask demo` does.
    crate::setup::ensure_packages()?;
    procs::install_interrupt_cleanup();
    let started = Instant::now();
    let env = prepare(&args, modes)?;
    println!("== results go to {}", env.out.display());
    if args.profile {
        let kinds = if args.scenarios.is_empty() {
            vec![Kind::Muon]
        } else {
            args.scenarios.clone()
        };
        return profile::run(&env, &kinds, args.quick, env.modes[0]);
    }
    let gray = match args.scenarios.is_empty() {
        true => env.modes == [Mode::Http],
        false => args.scenarios.contains(&Kind::GrayFailure),
    };
    if gray && env.modes != [Mode::Http] {
        bail!("gray-failure runs in --mode http only");
    }
    let mut kinds: Vec<Kind> = if args.scenarios.is_empty() {
        Kind::ALL.to_vec()
    } else {
        args.scenarios.clone()
    };
    kinds.retain(|&k| k != Kind::GrayFailure);
    if kinds.is_empty() {
        return gray_failure(&env, args.quick, started);
    }
    if !kinds.contains(&Kind::Direct) {
        kinds.insert(0, Kind::Direct);
    }
    kinds.sort();
    kinds.dedup();
    // http and mtls have the same plan: one plan for a run of both.
    let plan = Plan::new(args.quick, env.modes[0]);
    let meta = Meta::collect(env.modes[0], args.quick);
    let result = compare(&env, &kinds, &plan, meta, started);
    // Whatever happened, no bench lab stays up.
    for &mode in &env.modes {
        for k in &kinds {
            if Path::new("/run/muon/lab").join(k.lab(mode)).exists() {
                procs::lab_down(&env.muonctl, &k.lab(mode));
            }
        }
    }
    result?;
    if gray {
        gray_failure(&env, args.quick, started)?;
    }
    Ok(())
}

/// The gray-failure scenario (HTTP mode), after the comparison or on its own.
fn gray_failure(env: &Env, quick: bool, started: Instant) -> Result<()> {
    println!("== gray failure: Envoy, finding or installing it");
    let envoy = peers::install(peers::Peer::Envoy, &env.bench_bin).map_err(|e| format!("{e:#}"));
    let mut versions = BTreeMap::new();
    if let Ok(b) = &envoy {
        versions.insert("envoy".to_string(), b.version.clone());
    }
    let result = gray::run(env, quick, envoy.as_ref().map_err(Clone::clone), versions);
    for c in gray::Config::ALL {
        if Path::new("/run/muon/lab").join(c.lab()).exists() {
            procs::lab_down(&env.muonctl, c.lab());
        }
    }
    let md = result?;
    println!("\n{md}");
    println!(
        "wrote {0}/gray-failure.md and {0}/gray-failure.json ({1:.0}s)",
        env.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The run's modes in order: one, or `http,mtls` (the two share scenarios and steps).
fn modes(given: &[Mode]) -> Result<Vec<Mode>> {
    let mut modes = given.to_vec();
    modes.sort();
    modes.dedup();
    match modes.as_slice() {
        [] => Ok(vec![Mode::L4]),
        [_] | [Mode::Http, Mode::Mtls] => Ok(modes),
        _ => {
            bail!("--mode: only http,mtls can run together (l4 has other steps); run l4 on its own")
        }
    }
}

/// Builds the release binaries, copies what pods run to BENCH_ROOT and makes the run's
/// results directory (and, for mTLS mode, the test PKI in it).
fn prepare(args: &BenchArgs, modes: Vec<Mode>) -> Result<Env> {
    let target = util::target_dir()?;
    let release = target.join("release");
    if !args.no_build {
        println!("== building the benchmarked binaries (release)");
        // Two builds, so the generator's dependencies never change how the proxy is built.
        util::status(util::cargo().args([
            "build",
            "--release",
            "-p",
            "muon-proxy",
            "-p",
            "muon-init",
            "-p",
            "muon-control",
            "-p",
            "muonctl",
            "-p",
            "demo-shop",
        ]))?;
        util::status(util::cargo().args(["build", "--release", "-p", "xtask"]))?;
    }
    let bench_bin = Path::new(BENCH_ROOT).join("bin");
    std::fs::create_dir_all(&bench_bin)?;
    for d in [
        Path::new("/run/muon"),
        Path::new(BENCH_ROOT),
        bench_bin.as_path(),
    ] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    for (from, to) in [("demo-shop", "demo-shop"), ("xtask", "muon-bench")] {
        let src = release.join(from);
        if !src.is_file() {
            bail!("{} is missing: build it (drop --no-build)", src.display());
        }
        peers::copy_executable(&src, &bench_bin.join(to))?;
    }
    let lab_bins = args.bin_dir.clone().unwrap_or_else(|| release.clone());
    for path in [
        release.join("muonctl"),
        lab_bins.join("muon-proxy"),
        lab_bins.join("muon-init"),
        // The labs with a control plane (all but Muon's in L4 and HTTP modes) run it from
        // the same directory.
        lab_bins.join("muon-control"),
    ] {
        if !path.is_file() {
            bail!("{} is missing: build it (drop --no-build)", path.display());
        }
    }
    let out = match &args.out {
        Some(o) => o.clone(),
        None => util::workspace_root()
            .join("bench-results")
            .join(report::stamp("%Y%m%d-%H%M%S")),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let pki = if modes.contains(&Mode::Mtls) {
        let pki = pki::TestPki::generate().context("making the test CA and certificates")?;
        pki.write(&out.join("pki"))?;
        println!(
            "== mTLS: test CA and certificates for {} and {} in {}/pki",
            pki::spiffe_id(peers::Side::Client),
            pki::spiffe_id(peers::Side::Server),
            out.display()
        );
        Some(pki)
    } else {
        None
    };
    Ok(Env {
        muonctl: release.join("muonctl"),
        lab_bins,
        bench_bin,
        out,
        modes,
        pki,
    })
}

fn compare(env: &Env, kinds: &[Kind], plan: &Plan, meta: Meta, started: Instant) -> Result<()> {
    // One unit per scenario and mode, a scenario's modes side by side; direct once, as it has
    // no proxy (its lab is the same in HTTP and mTLS modes), in every mode's report.
    let units: Vec<(Kind, Mode)> = kinds
        .iter()
        .flat_map(|&k| {
            let modes = if k == Kind::Direct {
                &env.modes[..1]
            } else {
                &env.modes[..]
            };
            modes.iter().map(move |&m| (k, m))
        })
        .collect();
    let mut reports: Vec<ScenarioReport> =
        units.iter().map(|&(k, _)| ScenarioReport::new(k)).collect();
    let mut versions = BTreeMap::new();
    let muon = match &args_bin_dir(env) {
        Some(dir) => format!(
            "{} (muon-proxy and muon-init from {dir})",
            meta.muon_version
        ),
        None => meta.muon_version.clone(),
    };
    versions.insert("muon".to_string(), muon);

    // Peers first: an install that fails takes its scenarios out, not the run.
    let mut bins = BTreeMap::new();
    for &k in kinds {
        if let Some(peer) = k.peer() {
            println!("== {}: finding or installing it", k.name());
            match peers::install(peer, &env.bench_bin) {
                Ok(b) => {
                    versions.insert(k.name().to_string(), b.version.clone());
                    bins.insert(k, b);
                }
                Err(e) => {
                    for (i, _) in units.iter().enumerate().filter(|(_, u)| u.0 == k) {
                        reports[i].fail(format!("install: {e:#}"));
                    }
                }
            }
        }
    }

    let mut running: Vec<(usize, Running)> = Vec::new();
    for (i, &(k, mode)) in units.iter().enumerate() {
        if reports[i].error.is_some() {
            continue;
        }
        println!("== {}: starting lab {}", k.label(mode), k.lab(mode));
        let t = Instant::now();
        match Running::start(env, k, mode, bins.get(&k)) {
            Ok(r) => {
                println!("   ready in {:.1}s", t.elapsed().as_secs_f64());
                reports[i].mtls_check = r.mtls_check.clone();
                running.push((i, r));
            }
            Err(e) => {
                println!("   FAILED: {e:#}");
                reports[i].fail(format!("start: {e:#}"));
            }
        }
    }
    if !running.iter().any(|(_, r)| r.kind == Kind::Direct) {
        println!(
            "   (direct did not start: latencies are reported without the added-latency baseline)"
        );
    }

    std::thread::sleep(Duration::from_secs(1));
    for (i, r) in &running {
        reports[*i].rss_idle_kib = rss_now(&r.proxies);
    }

    let w = plan.warmup_s;
    for &(rate, conns) in &plan.rates {
        let key = format!("open_{rate}");
        let secs = plan.latency_s / plan.rounds as f64;
        println!(
            "== open loop, {rate} requests/s over {conns} connections: {} round(s) of {secs}s (+{w}s warm-up) per scenario",
            plan.rounds
        );
        for round in 0..plan.rounds {
            for (i, r) in &mut running {
                let args = load_args(r.http_target().to_string(), Some(rate), conns, secs, w);
                let step = measure(r, &args, secs + w + 30.0, Payload::Load);
                print_step(&r.label(), &format!("#{}", round + 1), &step);
                reports[*i].add_round(&key, step);
            }
        }
    }
    let secs = plan.saturation_s / plan.rounds as f64;
    println!(
        "== closed loop over {} connections: {} round(s) of {secs}s per scenario: maximum requests/s",
        plan.saturation_connections, plan.rounds
    );
    for round in 0..plan.rounds {
        for (i, r) in &mut running {
            let args = load_args(
                r.http_target().to_string(),
                None,
                plan.saturation_connections,
                secs,
                w.min(1.0),
            );
            let step = measure(r, &args, secs + 30.0, Payload::Load);
            print_step(&r.label(), &format!("#{}", round + 1), &step);
            reports[*i].add_round("closed", step);
        }
    }
    if plan.bulk_s > 0.0 {
        bulk_steps(plan, &mut running, &mut reports);
    } else {
        println!("== bulk TCP streams: skipped in HTTP and mTLS modes (the proxies carry HTTP, not raw TCP)");
    }
    if !plan.grpc_rates.is_empty() {
        grpc_steps(plan, &mut running, &mut reports);
    }
    for (i, r) in &running {
        reports[*i].rss_end_kib = rss_now(&r.proxies);
        if !r.proxies_alive() {
            reports[*i].fail("a proxy exited during the run".into());
        }
    }
    // Down with the labs before writing (they are also taken down by Drop on any error).
    drop(running);

    reports.iter_mut().for_each(ScenarioReport::finish);
    let elapsed = started.elapsed().as_secs_f64();
    // One report per mode (direct in each).
    let runs: Vec<RunReport> = env
        .modes
        .iter()
        .map(|&mode| {
            let scenarios = units
                .iter()
                .zip(&reports)
                .filter(|((k, m), _)| *m == mode || *k == Kind::Direct)
                .map(|(_, r)| r.clone())
                .collect();
            let meta = Meta {
                mode,
                ..meta.clone()
            };
            RunReport::new(meta, versions.clone(), plan.clone(), scenarios, elapsed)
        })
        .collect();
    let md = report::markdown_runs(&runs);
    std::fs::write(
        env.out.join("results.json"),
        serde_json::to_vec_pretty(&report::Saved::from(runs))?,
    )?;
    std::fs::write(env.out.join("results.md"), &md)?;
    println!("\n{md}");
    println!(
        "wrote {0}/results.md and {0}/results.json ({1:.0}s)",
        env.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One TCP stream each way (L4 mode). Configured-upstream peers are restarted for the port.
fn bulk_steps(plan: &Plan, running: &mut [(usize, Running)], reports: &mut [ScenarioReport]) {
    let secs = plan.bulk_s / plan.rounds as f64;
    println!(
        "== one TCP stream each way: {} round(s) of {secs}s per scenario",
        plan.rounds
    );
    for (i, r) in running.iter_mut() {
        if let Err(e) = r.use_port(scenarios::BULK_PORT) {
            reports[*i].fail(format!("restarting for the bulk port: {e:#}"));
        }
    }
    for round in 0..plan.rounds {
        for (i, r) in running.iter_mut() {
            if reports[*i].error.is_some() {
                continue;
            }
            for (key, dir) in [("bulk_up", "up"), ("bulk_down", "down")] {
                let args: Vec<String> = [
                    "bulk",
                    "--addr",
                    &r.bulk_target().to_string(),
                    "--direction",
                    dir,
                    "--duration",
                ]
                .iter()
                .map(|s| s.to_string())
                .chain([format!("{secs}s"), "--json".into()])
                .collect();
                let step = measure(r, &args, secs + 30.0, Payload::Bulk);
                print_step(&r.label(), &format!("#{} {dir}", round + 1), &step);
                reports[*i].add_round(key, step);
            }
        }
    }
}

/// gRPC unary calls (HTTP and mTLS modes) to the gRPC port: configured-upstream peers are
/// restarted on it and every scenario passes a gRPC smoke test first; one that does not is
/// left out of these steps only.
fn grpc_steps(plan: &Plan, running: &mut [(usize, Running)], reports: &mut [ScenarioReport]) {
    println!(
        "== gRPC unary calls to port {}: restarting configured-upstream peers on it, smoke test",
        scenarios::GRPC_PORT
    );
    let mut ready = Vec::new();
    for (i, r) in running.iter_mut() {
        match r.start_grpc() {
            Ok(()) => ready.push(*i),
            Err(e) => {
                println!("   {:<12} FAILED: {e:#}", r.label());
                reports[*i].grpc_error = Some(format!("{e:#}"));
            }
        }
    }
    let w = plan.warmup_s;
    let c = plan.grpc_connections;
    for &(rate, streams) in &plan.grpc_rates {
        let key = format!("grpc_open_{rate}");
        let secs = plan.latency_s / plan.rounds as f64;
        println!(
            "== gRPC open loop, {rate} calls/s, {streams} streams over {c} HTTP/2 connections: {} round(s) of {secs}s (+{w}s warm-up) per scenario",
            plan.rounds
        );
        for round in 0..plan.rounds {
            for (i, r) in running.iter_mut().filter(|(i, _)| ready.contains(i)) {
                let args = grpc_args(r.grpc_target().to_string(), Some(rate), c, streams, secs, w);
                let step = measure(r, &args, secs + w + 30.0, Payload::Load);
                print_step(&r.label(), &format!("#{}", round + 1), &step);
                reports[*i].add_round(&key, step);
            }
        }
    }
    let secs = plan.saturation_s / plan.rounds as f64;
    let streams = plan.grpc_saturation_streams;
    println!(
        "== gRPC closed loop, {streams} streams over {c} connections: {} round(s) of {secs}s per scenario: maximum calls/s",
        plan.rounds
    );
    for round in 0..plan.rounds {
        for (i, r) in running.iter_mut().filter(|(i, _)| ready.contains(i)) {
            let args = grpc_args(
                r.grpc_target().to_string(),
                None,
                c,
                streams,
                secs,
                w.min(1.0),
            );
            let step = measure(r, &args, secs + 30.0, Payload::Load);
            print_step(&r.label(), &format!("#{}", round + 1), &step);
            reports[*i].add_round("grpc_closed", step);
        }
    }
}

fn grpc_args(
    addr: String,
    rate: Option<u32>,
    connections: usize,
    streams: usize,
    secs: f64,
    warmup: f64,
) -> Vec<String> {
    let mut a = vec!["grpc-load".to_string(), "--addr".into(), addr];
    if let Some(r) = rate {
        a.extend(["--rate".into(), r.to_string()]);
    }
    a.extend([
        "--connections".into(),
        connections.to_string(),
        "--streams".into(),
        streams.to_string(),
        "--duration".into(),
        format!("{secs}s"),
        "--warmup".into(),
        format!("{warmup}s"),
        "--expect-size".into(),
        "1024".into(),
        "--json".into(),
    ]);
    a
}

/// The lab's binaries, when they are not the release build's.
fn args_bin_dir(env: &Env) -> Option<String> {
    (!env.lab_bins.ends_with("release")).then(|| env.lab_bins.display().to_string())
}

fn load_args(addr: String, rate: Option<u32>, conns: usize, secs: f64, warmup: f64) -> Vec<String> {
    let mut a = vec!["load".to_string(), "--addr".into(), addr];
    if let Some(r) = rate {
        a.extend(["--rate".into(), r.to_string()]);
    }
    a.extend([
        "--connections".into(),
        conns.to_string(),
        "--duration".into(),
        format!("{secs}s"),
        "--warmup".into(),
        format!("{warmup}s"),
        "--expect-size".into(),
        "1024".into(),
        "--json".into(),
    ]);
    a
}

enum Payload {
    Load,
    Bulk,
}

/// Runs one generator invocation in the scenario's client pod and measures the proxies
/// around it: CPU time (utime + stime) before and after, RSS sampled every 200 ms.
fn measure(r: &Running, args: &[String], limit_s: f64, payload: Payload) -> StepResult {
    let ticks = |pids: &Vec<i32>| {
        pids.iter()
            .filter_map(|&p| procs::cpu_ticks(p))
            .sum::<u64>()
    };
    let before: BTreeMap<String, u64> = r
        .proxies
        .iter()
        .map(|(k, v)| (k.clone(), ticks(v)))
        .collect();
    // Connections between the pair: those the server side accepted on its inbound port.
    let server_side = r
        .proxies
        .get("server")
        .and_then(|pids| pids.first())
        .map(|&pid| (pid, peers::Side::Server.port()));
    let sampler =
        procs::RssSampler::start(r.proxies.clone(), server_side, Duration::from_millis(200));
    let limit = Duration::from_secs_f64(limit_s);
    let mut step = StepResult::default();
    match payload {
        Payload::Load => match r.run_tool::<load::LoadReport>(args, limit) {
            Ok(l) => step.load = Some(l),
            Err(e) => step.error = Some(format!("{e:#}")),
        },
        Payload::Bulk => match r.run_tool::<load::BulkReport>(args, limit) {
            Ok(b) => step.bulk = Some(b),
            Err(e) => step.error = Some(format!("{e:#}")),
        },
    }
    (step.rss_peak_kib, step.pair_connections) = sampler.finish();
    let hz = procs::clock_ticks();
    for (side, pids) in &r.proxies {
        let spent = ticks(pids).saturating_sub(before.get(side).copied().unwrap_or(0));
        step.cpu_ms.insert(side.clone(), spent as f64 * 1000.0 / hz);
    }
    step
}

fn rss_now(proxies: &BTreeMap<String, Vec<i32>>) -> BTreeMap<String, u64> {
    proxies
        .iter()
        .map(|(side, pids)| {
            (
                side.clone(),
                pids.iter()
                    .filter_map(|&p| procs::status_kib(p, "VmRSS"))
                    .sum(),
            )
        })
        .collect()
}

fn print_step(name: &str, label: &str, s: &StepResult) {
    let cpu = if s.cpu_ms.is_empty() {
        "-".to_string()
    } else {
        format!("{:.0} ms", s.cpu_ms.values().sum::<f64>())
    };
    match (&s.load, &s.bulk, &s.error) {
        (_, _, Some(e)) => println!("   {name:<12} {label:<5} error: {e}"),
        (Some(l), _, _) => println!(
            "   {name:<12} {label:<5} {:>7.0}/s  p50 {:>7.3} ms  p99 {:>7.3} ms  p99.9 {:>7.3} ms  errors {}  proxy CPU {}",
            l.achieved_rps,
            l.latency_us.p50 / 1000.0,
            l.latency_us.p99 / 1000.0,
            l.latency_us.p999 / 1000.0,
            l.errors + l.unsent,
            cpu
        ),
        (_, Some(b), _) => println!("   {name:<12} {label:<5} {:>8.1} MB/s  proxy CPU {}", b.mb_per_s, cpu),
        _ => {}
    }
}
