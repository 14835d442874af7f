//! `cargo xtask bench control-plane`: how fast `muon-control` gets one endpoint change to every
//! sidecar, how many bytes that costs, and the control plane's memory and CPU meanwhile.
//!
//! One process plays the whole mesh. It starts the release `muon-control` on loopback with a
//! temporary data dir, fills it through `Management.Apply` (services, then workloads, in
//! batches), and opens N simulated proxies: real discovery streams
//! (proto/muon/v1/discovery.proto) spread over a few HTTP/2 connections, each subscribing to
//! every kind with "*" and ACKing every response, as a sidecar does. Once every proxy has its
//! initial sync, it changes one Workload's address at a time (so exactly one service's
//! endpoints change) and measures, per proxy, the time from sending the Apply to the proxy's
//! ACK of the response that carries the change. All timestamps are taken in this process.
//!
//! The proxies decode only a response's envelope (kind, version, nonce; resource names of
//! small responses) and keep resources as raw bytes: client and server share the machine, and
//! decoding every endpoint 1,000 times over would take CPU from the control plane under test.
//! The encoded size is still exact (the raw bytes re-encode to the same length).
//!
//! The control plane is killed (by pid) and its temporary directory removed on every way out,
//! errors and Ctrl-C included ([`ControlPlane`]'s drop guard).

use crate::util;
use anyhow::{anyhow, bail, ensure, Context, Result};
use muon_api::v1::{self, kinds, DiscoveryRequest};
use serde_json::json;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};

/// The whole run, build excluded.
const RUN_DEADLINE: Duration = Duration::from_secs(300);
const READY_DEADLINE: Duration = Duration::from_secs(30);
const LOAD_DEADLINE: Duration = Duration::from_secs(120);
const SYNC_DEADLINE: Duration = Duration::from_secs(120);
const CHANGE_DEADLINE: Duration = Duration::from_secs(30);
/// Objects per `Management.Apply` call while loading the mesh.
const APPLY_BATCH: usize = 500;
/// Same limit as the server: a full endpoints state of a big mesh is several MB.
const MAX_MESSAGE: usize = 64 << 20;
/// Responses with at most this many resources have their names decoded (to check that a
/// change's response carries the changed service); bigger ones are initial states.
const NAMES_KEPT: usize = 8;
const NAMESPACE: &str = "bench";
/// p99 target from issue 3, item 8.
const TARGET_P99: Duration = Duration::from_secs(1);
/// The server's default, included in every change's latency.
const DEBOUNCE: &str = "100ms";

/// Index of `endpoints` in `kinds::ALL`.
const ENDPOINTS: usize = 1;

#[derive(clap::Args, Debug, Clone)]
pub struct CpBenchArgs {
    /// Simulated proxies, one discovery stream each [default: 1000; --quick: 200].
    #[arg(long)]
    proxies: Option<usize>,
    /// Services, one VIP and port each [default: 500; --quick: 100].
    #[arg(long)]
    services: Option<usize>,
    /// Endpoints (Workloads), spread evenly over the services [default: 5000; --quick: 1000].
    #[arg(long)]
    endpoints: Option<usize>,
    /// Endpoint changes to measure, one after another [default: 20; --quick: 5].
    #[arg(long)]
    changes: Option<usize>,
    /// HTTP/2 connections the proxies are spread over (the server allows about 200 concurrent
    /// streams on one connection).
    #[arg(long, default_value_t = 10)]
    connections: usize,
    /// A small run with the --quick defaults above; explicit flags still win.
    #[arg(long)]
    quick: bool,
    /// Results directory [default: <target>/bench/control-plane-<UTC time>/].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Use the release muon-control already built instead of building it.
    #[arg(long)]
    no_build: bool,
    /// Also measure a real sidecar (release muon-proxy) synced with the loaded mesh: its RSS
    /// with `--discovery-mode all` and with `on-demand`.
    #[arg(long)]
    sidecars: bool,
}

/// The size of the run, with every default resolved and checked.
#[derive(Debug, Clone, serde::Serialize)]
struct Plan {
    proxies: usize,
    services: usize,
    endpoints: usize,
    changes: usize,
    connections: usize,
}

impl Plan {
    fn from_args(a: &CpBenchArgs) -> Result<Plan> {
        let pick = |v: Option<usize>, full: usize, quick: usize| {
            v.unwrap_or(if a.quick { quick } else { full })
        };
        let plan = Plan {
            proxies: pick(a.proxies, 1000, 200),
            services: pick(a.services, 500, 100),
            endpoints: pick(a.endpoints, 5000, 1000),
            changes: pick(a.changes, 20, 5),
            connections: a.connections,
        };
        let mut problems = Vec::new();
        if plan.proxies == 0 {
            problems.push("--proxies must be at least 1");
        }
        if plan.services == 0 || plan.services > 1 << 20 {
            problems.push("--services must be 1 to 1048576");
        }
        if plan.endpoints < plan.services || plan.endpoints > 1 << 23 {
            problems.push("--endpoints must be at least --services (every service gets one) and at most 8388608");
        }
        if plan.changes == 0 {
            problems.push("--changes must be at least 1");
        }
        if plan.connections == 0 || plan.connections > plan.proxies {
            problems.push("--connections must be 1 to --proxies");
        }
        ensure!(problems.is_empty(), "{}", problems.join("; "));
        Ok(plan)
    }
}

pub fn run(args: CpBenchArgs) -> Result<()> {
    let plan = Plan::from_args(&args)?;
    let mut packages = vec!["-p", "muon-control"];
    if args.sidecars {
        packages.extend(["-p", "muon-proxy"]);
    }
    if !args.no_build {
        util::status(util::cargo().args(["build", "--release"]).args(&packages))?;
    }
    let target = util::target_dir()?;
    let bin = target.join("release/muon-control");
    let proxy_bin = args.sidecars.then(|| target.join("release/muon-proxy"));
    for b in std::iter::once(&bin).chain(proxy_bin.as_ref()) {
        ensure!(
            b.is_file(),
            "{} is missing: run `cargo build --release {}` (or drop --no-build)",
            b.display(),
            packages.join(" ")
        );
    }
    let started = SystemTime::now();
    let out = args.out.clone().unwrap_or_else(|| {
        target
            .join("bench")
            .join(format!("control-plane-{}", utc_stamp(started)))
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let results = rt.block_on(async {
        let mut cp = ControlPlane::start(&bin)?;
        let outcome = tokio::select! {
            r = tokio::time::timeout(RUN_DEADLINE, measure(&plan, &mut cp, proxy_bin.as_deref())) => match r {
                Ok(r) => r,
                Err(_) => Err(anyhow!("the run took longer than {RUN_DEADLINE:?}")),
            },
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        };
        // The log goes with the temporary directory: quote it while it is still there.
        outcome.map_err(|e| match cp.log_tail(20) {
            tail if tail.is_empty() => e,
            tail => anyhow!("{e:#}\nmuon-control log (last lines):\n{tail}"),
        })
    })?;
    drop(rt);

    let machine = Machine::read();
    let command = command_line();
    let md = markdown(&plan, &results, &machine, &command, started)?;
    let js = json!({
        "date": utc_date(started),
        "command": command,
        "machine": machine,
        "plan": plan,
        "debounce": DEBOUNCE,
        "results": results.to_json(&plan)?,
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("control-plane.md"), &md)?;
    std::fs::write(
        out.join("control-plane.json"),
        serde_json::to_string_pretty(&js)? + "\n",
    )?;
    println!("{md}");
    println!(
        "results: {} and control-plane.json",
        out.join("control-plane.md").display()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The run

/// CPU ticks of the control plane and of this process at a phase boundary.
#[derive(Clone, Copy)]
struct Cpu {
    server: u64,
    client: u64,
    at: Instant,
}

impl Cpu {
    fn read(pid: u32) -> Result<Cpu> {
        Ok(Cpu {
            server: cpu_ticks(&pid.to_string())?,
            client: cpu_ticks("self")?,
            at: Instant::now(),
        })
    }
}

/// One change and what every proxy saw of it.
struct ChangeResult {
    service: String,
    version: u64,
    apply: Duration,
    /// Per proxy, from sending the Apply to the proxy's ACK of the change.
    latencies: Vec<Duration>,
    /// Encoded responses received by all proxies for this change.
    bytes: u64,
    /// Change responses that did not name the changed service (should be 0).
    missing: usize,
    /// Responses of other kinds during this change (should be 0).
    other_kinds: usize,
}

struct Results {
    load: Duration,
    objects: usize,
    sync: Duration,
    /// Bytes of the initial sync, per proxy (all kinds) and the endpoints part of it.
    sync_bytes: Vec<u64>,
    sync_endpoint_bytes: Vec<u64>,
    server_sync_bytes: u64,
    changes: Vec<ChangeResult>,
    server_change_bytes: u64,
    /// Mean server-side push latency during the change phase (its own histogram).
    server_push_latency: Option<Duration>,
    clk_tck: u64,
    cpu: [Cpu; 3],
    rss_after_load_kb: u64,
    /// A real sidecar synced with the loaded mesh: discovery mode `all`, `on-demand`.
    sidecar_rss_kb: Option<[u64; 2]>,
    /// Settled ([`SETTLE`]) after the initial sync, and after the changes: every proxy
    /// still connected.
    rss_synced_kb: u64,
    rss_after_changes_kb: u64,
    /// Settled after every proxy disconnected: the same mesh, no proxy.
    rss_proxies_gone_kb: u64,
    peak_rss_kb: [u64; 3],
    hwm_kb: u64,
}

/// How long the control plane is left alone before its steady-state RSS is read.
const SETTLE: Duration = Duration::from_secs(3);

async fn measure(plan: &Plan, cp: &mut ControlPlane, proxy_bin: Option<&Path>) -> Result<Results> {
    cp.wait_ready(READY_DEADLINE).await?;
    let sampler = Arc::new(Sampler::default());
    let mut background = JoinSet::new();
    background.spawn(sampler.clone().run(cp.pid));

    // 1. Load the mesh.
    let load_started = Instant::now();
    let mut mgmt = cp.management().await?;
    let objects = mesh_objects(plan)?;
    let mut version = 0;
    for batch in objects.chunks(APPLY_BATCH) {
        let r = tokio::time::timeout(
            LOAD_DEADLINE,
            mgmt.apply(v1::ApplyRequest {
                objects: batch.to_vec(),
                dry_run: false,
            }),
        )
        .await
        .map_err(|_| {
            anyhow!(
                "an Apply of {} objects took over {LOAD_DEADLINE:?}",
                batch.len()
            )
        })?
        .context("loading the mesh: Management.Apply")?;
        version = r.into_inner().version;
    }
    // Connect proxies only once the snapshot has every object, so that their first responses
    // are the whole mesh: one probe stream waits for it.
    let probe_channel = cp.channel().await?;
    let probe = Proxies::start(&[probe_channel], 1, "probe");
    probe
        .wait_acked(&[ENDPOINTS], version, LOAD_DEADLINE, "the probe's sync")
        .await?;
    probe.stop().await;
    let load = load_started.elapsed();
    let rss_after_load_kb = proc_status(cp.pid)?.0;
    // A real sidecar, before the simulated ones connect.
    let sidecar_rss_kb = match proxy_bin {
        Some(bin) => Some([
            sidecar_rss(bin, cp.grpc, "all").await?,
            sidecar_rss(bin, cp.grpc, "on-demand").await?,
        ]),
        None => None,
    };

    // 2. Initial sync of every proxy.
    let m0 = cp.metrics().await?;
    let cpu0 = Cpu::read(cp.pid)?;
    sampler.phase.store(1, Ordering::Relaxed);
    let mut channels = Vec::with_capacity(plan.connections);
    for _ in 0..plan.connections {
        channels.push(cp.channel().await?);
    }
    let proxies = Proxies::start(&channels, plan.proxies, "proxy");
    let all_kinds: Vec<usize> = (0..kinds::ALL.len()).collect();
    proxies
        .wait_acked(&all_kinds, version, SYNC_DEADLINE, "the initial sync")
        .await?;
    let sync = cpu0.at.elapsed();
    let cpu1 = Cpu::read(cp.pid)?;
    tokio::time::sleep(SETTLE).await;
    let rss_synced_kb = proc_status(cp.pid)?.0;
    let m1 = cp.metrics().await?;
    let mut sync_bytes = Vec::with_capacity(plan.proxies);
    let mut sync_endpoint_bytes = Vec::with_capacity(plan.proxies);
    for log in &proxies.logs {
        let got = lock(&log.received);
        let upto: Vec<_> = got.iter().filter(|r| r.version <= version).collect();
        sync_bytes.push(upto.iter().map(|r| r.bytes).sum());
        sync_endpoint_bytes.push(
            upto.iter()
                .filter(|r| r.kind == ENDPOINTS)
                .map(|r| r.bytes)
                .sum(),
        );
    }

    // 3. Changes, one at a time.
    sampler.phase.store(2, Ordering::Relaxed);
    let mut flipped = vec![false; plan.endpoints];
    let stride = (plan.endpoints / plan.changes).max(1);
    let mut changes = Vec::with_capacity(plan.changes);
    for c in 0..plan.changes {
        let w = (c * stride + c / plan.endpoints) % plan.endpoints;
        flipped[w] = !flipped[w];
        let service = format!("{}.{NAMESPACE}", service_name(w % plan.services));
        let previous = version;
        let sent = Instant::now();
        let r = mgmt
            .apply(v1::ApplyRequest {
                objects: vec![workload(plan, w, flipped[w])?],
                dry_run: false,
            })
            .await
            .with_context(|| format!("change {}: Management.Apply", c + 1))?;
        let apply = sent.elapsed();
        version = r.into_inner().version;
        ensure!(
            version > previous,
            "change {}: the Apply did not move the registry version ({version})",
            c + 1
        );
        proxies
            .wait_acked(
                &[ENDPOINTS],
                version,
                CHANGE_DEADLINE,
                &format!("change {}", c + 1),
            )
            .await?;
        changes.push(proxies.change_result(service, previous, version, sent, apply)?);
    }
    let cpu2 = Cpu::read(cp.pid)?;
    let m2 = cp.metrics().await?;
    tokio::time::sleep(SETTLE).await;
    let (rss_after_changes_kb, hwm_kb) = proc_status(cp.pid)?;
    proxies.stop().await;
    tokio::time::sleep(SETTLE).await;
    let rss_proxies_gone_kb = proc_status(cp.pid)?.0;
    background.abort_all();

    let peak = |i: usize| sampler.peak_kb[i].load(Ordering::Relaxed);
    let latency_count = m2.push_latency_count - m1.push_latency_count;
    Ok(Results {
        load,
        objects: objects.len(),
        sync,
        sync_bytes,
        sync_endpoint_bytes,
        server_sync_bytes: m1.push_bytes - m0.push_bytes,
        changes,
        server_change_bytes: m2.push_bytes - m1.push_bytes,
        server_push_latency: (latency_count > 0).then(|| {
            Duration::from_secs_f64(
                (m2.push_latency_sum - m1.push_latency_sum) / latency_count as f64,
            )
        }),
        clk_tck: clk_tck(),
        cpu: [cpu0, cpu1, cpu2],
        rss_after_load_kb,
        sidecar_rss_kb,
        rss_synced_kb,
        rss_after_changes_kb,
        rss_proxies_gone_kb,
        peak_rss_kb: [peak(0), peak(1).max(proc_status(cp.pid)?.0), peak(2)],
        hwm_kb,
    })
}

// ---------------------------------------------------------------------------------------------
// The mesh: services with one VIP each, workloads spread over them round robin.

fn service_name(j: usize) -> String {
    format!("svc-{j:05}")
}

fn mesh_objects(plan: &Plan) -> Result<Vec<v1::Object>> {
    let mut objects = Vec::with_capacity(plan.services + plan.endpoints);
    for j in 0..plan.services {
        // 172.16.0.0/12: one VIP per service, all on port 80.
        let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + j as u32);
        let name = service_name(j);
        let spec = json!({
            "vips": [vip.to_string()],
            "ports": [{"port": 80, "targetPort": 8080, "protocol": "http"}],
            "selector": {"app": name},
        });
        objects.push(object("Service", name, HashMap::new(), spec)?);
    }
    for i in 0..plan.endpoints {
        objects.push(workload(plan, i, false)?);
    }
    Ok(objects)
}

/// Workload `i` of service `i % services`; `flipped` moves it to another address, which
/// changes exactly that service's endpoints.
fn workload(plan: &Plan, i: usize, flipped: bool) -> Result<v1::Object> {
    let base = if flipped {
        Ipv4Addr::new(10, 128, 0, 1)
    } else {
        Ipv4Addr::new(10, 0, 0, 1)
    };
    let address = Ipv4Addr::from(u32::from(base) + i as u32);
    let j = i % plan.services;
    let labels = HashMap::from([("app".to_string(), service_name(j))]);
    let spec = json!({
        "address": address.to_string(),
        "serviceAccount": format!("sa-{j:05}"),
        "locality": {"zone": format!("zone-{}", i % 3)},
    });
    object("Workload", format!("wl-{i:07}"), labels, spec)
}

fn object(
    kind: &str,
    name: String,
    labels: HashMap<String, String>,
    spec: serde_json::Value,
) -> Result<v1::Object> {
    Ok(v1::Object {
        api_version: "muon.io/v1alpha1".into(),
        kind: kind.into(),
        metadata: Some(v1::Metadata {
            name,
            namespace: NAMESPACE.into(),
            labels,
            ..Default::default()
        }),
        spec: Some(muon_api::json::struct_from_json(&spec).context("a spec is a JSON object")?),
    })
}

// ---------------------------------------------------------------------------------------------
// Simulated proxies

/// A `DiscoveryResponse` with its resources left encoded (see the module comment).
#[derive(Clone, PartialEq, prost::Message)]
struct Pushed {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(string, tag = "2")]
    version_info: String,
    #[prost(string, tag = "3")]
    nonce: String,
    #[prost(bytes = "bytes", repeated, tag = "4")]
    resources: Vec<bytes::Bytes>,
    #[prost(string, repeated, tag = "5")]
    removed_resources: Vec<String>,
}

/// The name of an encoded `Resource`; the rest is skipped.
#[derive(Clone, PartialEq, prost::Message)]
struct ResourceName {
    #[prost(string, tag = "1")]
    name: String,
}

/// One response as a proxy saw it.
struct Received {
    kind: usize,
    version: u64,
    bytes: u64,
    /// Resource names, when there were at most [`NAMES_KEPT`].
    names: Vec<String>,
    acked: Instant,
}

/// What one proxy task shares with the coordinator.
#[derive(Default)]
struct ProxyLog {
    /// Per kind, the version of the last response ACKed (0: none yet).
    acked: [AtomicU64; 4],
    received: Mutex<Vec<Received>>,
    error: Mutex<Option<String>>,
}

/// A set of simulated proxies and the tasks that run them.
struct Proxies {
    logs: Vec<Arc<ProxyLog>>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Proxies {
    /// Starts `n` proxies, round robin over `channels` (one HTTP/2 connection each).
    fn start(channels: &[Channel], n: usize, prefix: &str) -> Proxies {
        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut logs = Vec::with_capacity(n);
        for i in 0..n {
            let log = Arc::new(ProxyLog::default());
            logs.push(log.clone());
            let id = format!("{prefix}-{i:05}");
            let channel = channels[i % channels.len()].clone();
            let stopped = stopped.clone();
            tasks.spawn(async move {
                if let Err(e) = proxy(&id, channel, &log, stopped.clone()).await {
                    if !*stopped.borrow() {
                        *lock(&log.error) = Some(format!("{id}: {e:#}"));
                    }
                }
            });
        }
        Proxies { logs, stop, tasks }
    }

    /// Waits until every proxy has ACKed `version` (or newer) of each of `kinds`.
    async fn wait_acked(
        &self,
        kinds: &[usize],
        version: u64,
        deadline: Duration,
        what: &str,
    ) -> Result<()> {
        let end = Instant::now() + deadline;
        loop {
            if let Some(e) = self.logs.iter().find_map(|l| lock(&l.error).clone()) {
                bail!("{what}: a proxy's stream failed: {e}");
            }
            let behind = self
                .logs
                .iter()
                .filter(|l| {
                    kinds
                        .iter()
                        .any(|&k| l.acked[k].load(Ordering::Acquire) < version)
                })
                .count();
            if behind == 0 {
                return Ok(());
            }
            if Instant::now() > end {
                bail!(
                    "{what}: {behind} of {} proxies had not ACKed version {version} after {deadline:?}",
                    self.logs.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// What every proxy saw of the change that produced `version` (sent at `sent`).
    fn change_result(
        &self,
        service: String,
        previous: u64,
        version: u64,
        sent: Instant,
        apply: Duration,
    ) -> Result<ChangeResult> {
        let mut r = ChangeResult {
            service,
            version,
            apply,
            latencies: Vec::with_capacity(self.logs.len()),
            bytes: 0,
            missing: 0,
            other_kinds: 0,
        };
        for log in &self.logs {
            let got = lock(&log.received);
            let window = got
                .iter()
                .filter(|x| x.version > previous && x.version <= version);
            let mut first = None;
            for x in window {
                r.bytes += x.bytes;
                if x.kind != ENDPOINTS {
                    r.other_kinds += 1;
                } else if first.is_none() {
                    first = Some(x);
                }
            }
            let x = first.context("a proxy ACKed a change it never received")?;
            if !x.names.contains(&r.service) {
                r.missing += 1;
            }
            r.latencies.push(x.acked.saturating_duration_since(sent));
        }
        Ok(r)
    }

    async fn stop(mut self) {
        self.stop.send_replace(true);
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(10), all)
            .await
            .is_err()
        {
            self.tasks.abort_all();
        }
    }
}

/// One simulated proxy: subscribes to every kind with "*", ACKs every response, and records
/// each response's kind, version, size and the time of its ACK.
async fn proxy(
    id: &str,
    channel: Channel,
    log: &ProxyLog,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let (tx, rx) = mpsc::channel(8);
    for (i, kind) in kinds::ALL.iter().enumerate() {
        let node = (i == 0).then(|| v1::Node {
            id: format!("{id}.{NAMESPACE}"),
            pod: id.to_string(),
            namespace: NAMESPACE.into(),
            service_account: "bench".into(),
            version: "xtask-cpbench".into(),
            ..Default::default()
        });
        tx.send(DiscoveryRequest {
            node,
            type_url: kind.to_string(),
            resource_names_subscribe: vec!["*".into()],
            ..Default::default()
        })
        .await
        .map_err(|_| anyhow!("request stream closed"))?;
    }
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_MESSAGE);
    grpc.ready()
        .await
        .map_err(|e| anyhow!("connection not ready: {e}"))?;
    let codec = tonic_prost::ProstCodec::<DiscoveryRequest, Pushed>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/muon.v1.Discovery/Stream");
    let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut inbound = grpc
        .streaming(tonic::Request::new(requests), path, codec)
        .await
        .context("opening the discovery stream")?
        .into_inner();
    loop {
        let msg = tokio::select! {
            _ = stop.changed() => return Ok(()),
            m = inbound.message() => m.context("reading the discovery stream")?,
        };
        let Some(resp) = msg else {
            bail!("the control plane ended the stream");
        };
        let bytes = prost::Message::encoded_len(&resp) as u64;
        let kind = kinds::ALL
            .iter()
            .position(|k| *k == resp.type_url)
            .with_context(|| format!("unknown type_url {:?}", resp.type_url))?;
        let version: u64 = resp
            .version_info
            .parse()
            .with_context(|| format!("version_info {:?} is not a number", resp.version_info))?;
        let names = if resp.resources.len() <= NAMES_KEPT {
            resp.resources
                .iter()
                .map(|r| <ResourceName as prost::Message>::decode(r.clone()).map(|r| r.name))
                .collect::<Result<_, _>>()
                .context("decoding a resource name")?
        } else {
            Vec::new()
        };
        tx.send(DiscoveryRequest {
            type_url: resp.type_url,
            response_nonce: resp.nonce,
            version_info: resp.version_info,
            ..Default::default()
        })
        .await
        .map_err(|_| anyhow!("request stream closed"))?;
        let acked = Instant::now();
        lock(&log.received).push(Received {
            kind,
            version,
            bytes,
            names,
            acked,
        });
        log.acked[kind].fetch_max(version, Ordering::Release);
    }
}

/// Plain data behind the lock: a panicked holder leaves nothing half-done worth refusing.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// The control-plane process

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let path =
            std::env::temp_dir().join(format!("muon-cpbench-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `muon-control` this run started; killed (by pid) on drop, then its directory removed.
struct ControlPlane {
    child: Child,
    pid: u32,
    grpc: SocketAddr,
    http: SocketAddr,
    log: PathBuf,
    /// Removed when dropped, after `drop` below has killed the process.
    _dir: TempDir,
}

impl ControlPlane {
    fn start(bin: &Path) -> Result<ControlPlane> {
        let dir = TempDir::new()?;
        let (grpc, http) = (free_port()?, free_port()?);
        let log = dir.0.join("muon-control.log");
        let log_file = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .arg("--grpc-addr")
            .arg(grpc.to_string())
            .arg("--metrics-addr")
            .arg(http.to_string())
            .arg("--data-dir")
            .arg(dir.0.join("data"))
            .args(["--debounce", DEBOUNCE, "--log-level", "warn"])
            // The streams are what is measured; their connections' TLS handshakes are not.
            .arg("--insecure-plaintext")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(ControlPlane {
            pid: child.id(),
            child,
            grpc,
            http,
            log,
            _dir: dir,
        })
    }

    async fn wait_ready(&mut self, deadline: Duration) -> Result<()> {
        let end = Instant::now() + deadline;
        loop {
            if let Some(st) = self.child.try_wait()? {
                bail!("muon-control exited at start: {st}");
            }
            if let Ok((200, _)) = http_get(self.http, "/ready").await {
                return Ok(());
            }
            if Instant::now() > end {
                bail!(
                    "muon-control was not ready on {} after {deadline:?}",
                    self.http
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn channel(&self) -> Result<Channel> {
        Endpoint::from_shared(format!("http://{}", self.grpc))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to muon-control at {}", self.grpc))
    }

    async fn management(&self) -> Result<v1::management_client::ManagementClient<Channel>> {
        Ok(
            v1::management_client::ManagementClient::new(self.channel().await?)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
    }

    async fn metrics(&self) -> Result<ServerMetrics> {
        let (status, body) = http_get(self.http, "/metrics").await?;
        ensure!(status == 200, "GET /metrics answered {status}");
        Ok(ServerMetrics::parse(&body))
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port that was free a moment ago (the server binds it right after).
/// Starts the release muon-proxy against the control plane in discovery `mode`, waits for
/// its first full sync (`/ready`) and [`SETTLE`], and reads its RSS (kB). Killed by pid after.
async fn sidecar_rss(bin: &Path, grpc: SocketAddr, mode: &str) -> Result<u64> {
    let dir = TempDir::new()?;
    let [out, inb, health, admin] = [free_port()?, free_port()?, free_port()?, free_port()?];
    let child = Command::new(bin)
        .args(["--outbound-addr", &out.to_string()])
        .args(["--inbound-addr", &inb.to_string()])
        .args(["--health-addr", &health.to_string()])
        .args(["--admin-addr", &admin.to_string()])
        .args(["--pod-name", "bench-sidecar", "--pod-namespace", NAMESPACE])
        .args(["--control-plane", &format!("http://{grpc}")])
        .args(["--discovery-mode", mode, "--log-level", "warn"])
        .arg("--state-dir")
        .arg(&dir.0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut sidecar = Kill(child);
    let end = Instant::now() + SYNC_DEADLINE;
    loop {
        if let Some(st) = sidecar.0.try_wait()? {
            bail!("muon-proxy ({mode}) exited: {st}");
        }
        if let Ok((200, _)) = http_get(health, "/ready").await {
            break;
        }
        ensure!(
            Instant::now() < end,
            "muon-proxy ({mode}) not ready within {SYNC_DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(SETTLE).await;
    Ok(proc_status(sidecar.0.id())?.0)
}

fn free_port() -> Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?)
}

/// A GET on the control plane's HTTP/1.1 port: status and body.
async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let talk = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), talk)
        .await
        .map_err(|_| anyhow!("GET {path}: no answer in 5 s"))??;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("GET {path}: not an HTTP response"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, body.to_string()))
}

/// The server's own counters that cross-check the client's figures.
#[derive(Default)]
struct ServerMetrics {
    push_bytes: u64,
    push_latency_sum: f64,
    push_latency_count: u64,
}

impl ServerMetrics {
    fn parse(text: &str) -> ServerMetrics {
        let mut m = ServerMetrics::default();
        for line in text.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let value: f64 = value.parse().unwrap_or(0.0);
            if name.starts_with("muon_control_push_bytes_total") {
                m.push_bytes += value as u64;
            } else if name == "muon_control_push_latency_seconds_sum" {
                m.push_latency_sum = value;
            } else if name == "muon_control_push_latency_seconds_count" {
                m.push_latency_count = value as u64;
            }
        }
        m
    }
}

/// The control plane's peak VmRSS per phase (load, initial sync, changes), sampled.
#[derive(Default)]
struct Sampler {
    phase: AtomicUsize,
    peak_kb: [AtomicU64; 3],
}

impl Sampler {
    async fn run(self: Arc<Self>, pid: u32) {
        loop {
            if let Ok((rss, _)) = proc_status(pid) {
                let phase = self.phase.load(Ordering::Relaxed).min(2);
                self.peak_kb[phase].fetch_max(rss, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// VmRSS and VmHWM of a process, in kB.
fn proc_status(pid: u32) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("/proc/{pid}/status has no {key}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// utime + stime of a process (`self` or a pid), in clock ticks.
fn cpu_ticks(pid: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which may contain spaces: state is field 3, utime 14.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unexpected /proc/PID/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| -> Result<u64> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .context("unexpected /proc/PID/stat")
    };
    Ok(num(11)? + num(12)?)
}

fn clk_tck() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

// ---------------------------------------------------------------------------------------------
// Report

#[derive(serde::Serialize)]
struct Machine {
    nproc: usize,
    cpu: String,
    kernel: String,
}

impl Machine {
    fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_else(|| "unknown".into()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
        }
    }
}

/// Figures derived from [`Results`], shared by the Markdown and the JSON.
struct Summary {
    p50: Duration,
    p99: Duration,
    max: Duration,
    /// Per proxy, from the Apply's answer instead of its request.
    after_p50: Duration,
    after_p99: Duration,
    /// Per change, the time until the last proxy ACKed: median and max.
    all_p50: Duration,
    all_max: Duration,
    apply_p50: Duration,
    apply_max: Duration,
    change_bytes: f64,
    change_bytes_per_proxy: f64,
    server_change_bytes: f64,
    sync_per_proxy: f64,
    sync_endpoints_per_proxy: f64,
    /// One service's endpoints resource, on average, in the initial sync.
    one_service: f64,
    proportional: bool,
    missing: usize,
    other_kinds: usize,
}

impl Results {
    fn summary(&self, plan: &Plan) -> Result<Summary> {
        // Microseconds, up to an hour.
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
        // The same, from the Apply's answer (the change is durable and versioned by then).
        let mut after = h.clone();
        for c in &self.changes {
            for l in &c.latencies {
                h.saturating_record(l.as_micros().max(1) as u64);
                after.saturating_record(l.saturating_sub(c.apply).as_micros().max(1) as u64);
            }
        }
        let us = |v: u64| Duration::from_micros(v);
        let median = |mut v: Vec<Duration>| {
            v.sort();
            (
                v.get(v.len() / 2).copied().unwrap_or_default(),
                v.last().copied().unwrap_or_default(),
            )
        };
        let (all_p50, all_max) = median(
            self.changes
                .iter()
                .map(|c| c.latencies.iter().max().copied().unwrap_or_default())
                .collect(),
        );
        let (apply_p50, apply_max) = median(self.changes.iter().map(|c| c.apply).collect());
        let n = self.changes.len().max(1) as f64;
        let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
        let change_bytes = self.changes.iter().map(|c| c.bytes).sum::<u64>() as f64 / n;
        let change_bytes_per_proxy = change_bytes / plan.proxies as f64;
        let sync_endpoints_per_proxy = mean(&self.sync_endpoint_bytes);
        let one_service = sync_endpoints_per_proxy / plan.services as f64;
        Ok(Summary {
            p50: us(h.value_at_quantile(0.5)),
            p99: us(h.value_at_quantile(0.99)),
            max: us(h.max()),
            after_p50: us(after.value_at_quantile(0.5)),
            after_p99: us(after.value_at_quantile(0.99)),
            all_p50,
            all_max,
            apply_p50,
            apply_max,
            change_bytes,
            change_bytes_per_proxy,
            server_change_bytes: self.server_change_bytes as f64 / n,
            sync_per_proxy: mean(&self.sync_bytes),
            sync_endpoints_per_proxy,
            one_service,
            // One changed service's endpoints plus the response envelope, not the mesh.
            proportional: change_bytes_per_proxy <= 2.0 * one_service + 256.0,
            missing: self.changes.iter().map(|c| c.missing).sum(),
            other_kinds: self.changes.iter().map(|c| c.other_kinds).sum(),
        })
    }

    fn cpu_seconds(&self, phase: usize, server: bool) -> (f64, f64) {
        let (a, b) = (self.cpu[phase], self.cpu[phase + 1]);
        let ticks = if server {
            b.server - a.server
        } else {
            b.client - a.client
        };
        let secs = ticks as f64 / self.clk_tck.max(1) as f64;
        let wall = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
        (secs, 100.0 * secs / wall)
    }

    /// What each connected proxy costs the control plane once synced: the settled RSS after
    /// the changes (every proxy still connected) over the settled RSS once they all left
    /// (the same mesh, the same history, no proxy), per proxy.
    fn kib_per_proxy(&self, plan: &Plan) -> f64 {
        let extra = self
            .rss_after_changes_kb
            .saturating_sub(self.rss_proxies_gone_kb);
        (extra as f64 / plan.proxies.max(1) as f64 * 10.0).round() / 10.0
    }

    fn to_json(&self, plan: &Plan) -> Result<serde_json::Value> {
        let s = self.summary(plan)?;
        let ms = |d: Duration| (d.as_secs_f64() * 1e5).round() / 100.0;
        let cpu = |phase| {
            let (server, server_pct) = self.cpu_seconds(phase, true);
            let (client, client_pct) = self.cpu_seconds(phase, false);
            json!({"server_s": server, "server_pct_of_core": server_pct,
                   "client_s": client, "client_pct_of_core": client_pct})
        };
        Ok(json!({
            "load": {"objects": self.objects, "seconds": self.load.as_secs_f64(),
                     "rss_after_kb": self.rss_after_load_kb, "peak_rss_kb": self.peak_rss_kb[0]},
            "initial_sync": {
                "seconds": self.sync.as_secs_f64(),
                "bytes_per_proxy": s.sync_per_proxy,
                "endpoint_bytes_per_proxy": s.sync_endpoints_per_proxy,
                "bytes_total_client": self.sync_bytes.iter().sum::<u64>(),
                "bytes_total_server": self.server_sync_bytes,
                "cpu": cpu(0),
                "peak_rss_kb": self.peak_rss_kb[1],
            },
            "changes": {
                "latency_ms": {"p50": ms(s.p50), "p99": ms(s.p99), "max": ms(s.max)},
                "latency_from": "Management.Apply sent",
                "latency_from_apply_answer_ms": {"p50": ms(s.after_p50), "p99": ms(s.after_p99)},
                "last_proxy_ms": {"p50": ms(s.all_p50), "max": ms(s.all_max)},
                "apply_ms": {"p50": ms(s.apply_p50), "max": ms(s.apply_max)},
                "server_push_latency_mean_ms": self.server_push_latency.map(ms),
                "bytes_per_change_all_proxies": s.change_bytes,
                "bytes_per_change_per_proxy": s.change_bytes_per_proxy,
                "server_bytes_per_change": s.server_change_bytes,
                "one_service_endpoints_bytes": s.one_service,
                "responses_without_the_changed_service": s.missing,
                "responses_of_other_kinds": s.other_kinds,
                "cpu": cpu(1),
                "peak_rss_kb": self.peak_rss_kb[2],
                "per_change": self.changes.iter().map(|c| json!({
                    "version": c.version,
                    "service": c.service,
                    "apply_ms": ms(c.apply),
                    "last_proxy_ms": ms(c.latencies.iter().max().copied().unwrap_or_default()),
                    "bytes": c.bytes,
                })).collect::<Vec<_>>(),
            },
            "server_vm_hwm_kb": self.hwm_kb,
            "sidecar_rss_kb": self.sidecar_rss_kb.map(|[all, od]| json!({"all": all, "on_demand": od})),
            "steady_state": {
                "rss_synced_kb": self.rss_synced_kb,
                "rss_after_changes_kb": self.rss_after_changes_kb,
                "rss_proxies_gone_kb": self.rss_proxies_gone_kb,
                "kib_per_proxy": self.kib_per_proxy(plan),
            },
            "targets": {"p99_under_1s": s.p99 < TARGET_P99, "bytes_proportional_to_change": s.proportional},
        }))
    }
}

fn markdown(
    plan: &Plan,
    r: &Results,
    m: &Machine,
    command: &str,
    started: SystemTime,
) -> Result<String> {
    let s = r.summary(plan)?;
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    let cpu = |phase: usize, server: bool| {
        let (secs, pct) = r.cpu_seconds(phase, server);
        format!("{secs:.2} s CPU ({pct:.0} % of a core)")
    };
    let verdict = |ok: bool| if ok { "**met**" } else { "**missed**" };
    let mut o = String::new();
    let _ = writeln!(o, "## Control plane\n");
    let _ = writeln!(
        o,
        "{} · {} × {} · Linux {} · `{command}`\n",
        utc_date(started),
        m.nproc,
        m.cpu,
        m.kernel
    );
    let _ = writeln!(
        o,
        "{} proxies (discovery streams over {} HTTP/2 connections, one client process on the \
         same machine) · {} services · {} endpoints · {} changes, one workload address each · \
         debounce {DEBOUNCE} (the default, included in every latency)\n",
        plan.proxies, plan.connections, plan.services, plan.endpoints, plan.changes
    );
    let _ = writeln!(o, "| measure | result | target |");
    let _ = writeln!(o, "| --- | --- | --- |");
    let _ = writeln!(
        o,
        "| change → ACK, per proxy, from Apply sent: p50 / p99 / max | {} / {} / {} | p99 < 1 s: {} |",
        ms(s.p50),
        ms(s.p99),
        ms(s.max),
        verdict(s.p99 < TARGET_P99)
    );
    let _ = writeln!(
        o,
        "| the same from the Apply's answer: p50 / p99 | {} / {} | |",
        ms(s.after_p50),
        ms(s.after_p99)
    );
    let _ = writeln!(
        o,
        "| change → last proxy's ACK: median / max over changes | {} / {} | |",
        ms(s.all_p50),
        ms(s.all_max)
    );
    let _ = writeln!(
        o,
        "| Management.Apply of one workload (durable write): median / max | {} / {} | |",
        ms(s.apply_p50),
        ms(s.apply_max)
    );
    if let Some(l) = r.server_push_latency {
        let _ = writeln!(
            o,
            "| server's push latency, mean (its own histogram) | {} | |",
            ms(l)
        );
    }
    let _ = writeln!(
        o,
        "| bytes per change, all proxies (server counter) | {} ({}) | |",
        size(s.change_bytes),
        size(s.server_change_bytes)
    );
    let _ = writeln!(
        o,
        "| bytes per change, per proxy / one service's endpoints | {} / {} | ∝ change, not mesh: {} |",
        size(s.change_bytes_per_proxy),
        size(s.one_service),
        verdict(s.proportional)
    );
    let _ = writeln!(
        o,
        "| initial sync per proxy (endpoints part) | {} ({}) | |",
        size(s.sync_per_proxy),
        size(s.sync_endpoints_per_proxy)
    );
    let _ = writeln!(
        o,
        "| initial sync, all proxies: time, bytes (server counter) | {:.1} s, {} ({}) | < 2 min |",
        r.sync.as_secs_f64(),
        size(r.sync_bytes.iter().sum::<u64>() as f64),
        size(r.server_sync_bytes as f64)
    );
    let _ = writeln!(
        o,
        "| control plane CPU: initial sync / changes | {} / {} | |",
        cpu(0, true),
        cpu(1, true)
    );
    let _ = writeln!(
        o,
        "| control plane RSS: loaded, idle / peak in initial sync / peak in changes / VmHWM | {} / {} / {} / {} | |",
        size(r.rss_after_load_kb as f64 * 1024.0),
        size(r.peak_rss_kb[1] as f64 * 1024.0),
        size(r.peak_rss_kb[2] as f64 * 1024.0),
        size(r.hwm_kb as f64 * 1024.0)
    );
    if let Some([all, od]) = r.sidecar_rss_kb {
        let _ = writeln!(
            o,
            "| a real sidecar (release muon-proxy) synced with the mesh, RSS: discovery `all` / `on-demand` | {} / {} | < 10 MiB idle |",
            size(all as f64 * 1024.0),
            size(od as f64 * 1024.0)
        );
    }
    let _ = writeln!(
        o,
        "| control plane RSS, settled: every proxy connected after the sync / after the changes / once they left; per connected proxy | {} / {} / {}; {:.1} KiB | < 100 KiB |",
        size(r.rss_synced_kb as f64 * 1024.0),
        size(r.rss_after_changes_kb as f64 * 1024.0),
        size(r.rss_proxies_gone_kb as f64 * 1024.0),
        r.kib_per_proxy(plan)
    );
    let _ = writeln!(
        o,
        "| bench client CPU (same machine): initial sync / changes | {} / {} | |",
        cpu(0, false),
        cpu(1, false)
    );
    let _ = writeln!(
        o,
        "| loading {} objects ({APPLY_BATCH} per Apply) until the snapshot has them | {:.1} s | |",
        r.objects,
        r.load.as_secs_f64()
    );
    if s.missing + s.other_kinds > 0 {
        let _ = writeln!(
            o,
            "\nWarning: {} change responses did not name the changed service and {} responses of \
             other kinds arrived during the changes; expected none.",
            s.missing, s.other_kinds
        );
    }
    Ok(o)
}

fn size(bytes: f64) -> String {
    if bytes >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
    } else if bytes >= 1024.0 {
        format!("{:.1} KiB", bytes / 1024.0)
    } else {
        format!("{bytes:.0} B")
    }
}

fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!("cargo xtask {}", args.join(" "))
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn utc_parts(t: SystemTime) -> (i64, u32, u32, u64, u64, u64) {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let (y, mo, d) = civil((secs / 86_400) as i64);
    let s = secs % 86_400;
    (y, mo, d, s / 3600, s / 60 % 60, s % 60)
}

/// `20250101T120000Z`, for directory names.
fn utc_stamp(t: SystemTime) -> String {
    let (y, mo, d, h, mi, s) = utc_parts(t);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z")
}

/// `2025-01-01 12:00 UTC`.
fn utc_date(t: SystemTime) -> String {
    let (y, mo, d, h, mi, _) = utc_parts(t);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02} UTC")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates_follow_the_calendar() {
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661); // 2000-02-29 01:01:01
        assert_eq!(utc_stamp(t), "20000229T010101Z");
        assert_eq!(utc_date(UNIX_EPOCH), "1970-01-01 00:00 UTC");
    }

    #[test]
    fn endpoints_index_names_the_endpoints_kind() {
        assert_eq!(kinds::ALL[ENDPOINTS], kinds::ENDPOINTS);
    }

    #[test]
    fn server_metrics_sum_push_bytes_over_kinds() {
        let m = ServerMetrics::parse(
            "muon_control_push_bytes_total{type_url=\"endpoints\"} 10\n\
             muon_control_push_bytes_total{type_url=\"services\"} 5\n\
             muon_control_push_latency_seconds_sum 0.5\n\
             muon_control_push_latency_seconds_count 2\n",
        );
        assert_eq!(m.push_bytes, 15);
        assert_eq!(m.push_latency_count, 2);
    }

    #[test]
    fn quick_sets_small_defaults_and_flags_win() {
        let args = CpBenchArgs {
            proxies: Some(50),
            services: None,
            endpoints: None,
            changes: None,
            connections: 10,
            quick: true,
            out: None,
            no_build: true,
            sidecars: false,
        };
        let p = Plan::from_args(&args).unwrap();
        assert_eq!(
            (p.proxies, p.services, p.endpoints, p.changes),
            (50, 100, 1000, 5)
        );
    }
}
