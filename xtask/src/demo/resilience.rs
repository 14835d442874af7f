//! The demo's resilience part: a failing replica hidden by retries and outlier detection, a
//! slow replica avoided by peak-EWMA, and locality preference with failover when a zone goes
//! down. Each step sends a batch of orders from the client (orders, in zone-a, then asks
//! inventory over HTTP/1.1 and payment over gRPC) and prints which replica answered, how many
//! orders failed, and what the replicas themselves counted (`/admin/stats`). Replicas are made
//! to fail or slow down through their `/admin/faults`, and a zone is taken down with
//! `muonctl lab stop`.
//!
//! The figures are printed, not asserted: they depend on the proxy's retries, ejections and
//! balancer draws. What fails the demo is what should never happen: a refused apply, a
//! setting that never reaches the sidecar, a replica that does not answer its admin port.

use super::{apply, ctl, ctl_output, LAB};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// Orders sent per batch.
const ORDERS: usize = 200;

/// The replicas, their zone and their app's port.
const REPLICAS: [(&str, &str, u16); 4] = [
    ("inventory-a", "zone-a", 8080),
    ("inventory-b", "zone-b", 8080),
    ("payment-a", "zone-a", 9090),
    ("payment-b", "zone-b", 9090),
];

/// Retry inventory's 503s (HTTPRoute `spec.rules[].retry`).
const INVENTORY_RETRY: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: inventory-retry, namespace: default}
spec:
  parentRefs: [{name: inventory, port: 8080}]
  rules:
    - backendRefs: [{name: inventory, port: 8080}]
      retry: {codes: [503], attempts: 2, backoff: 25ms}
"#;

/// A TrafficPolicy for `service` (named `<service>-traffic`, applied again as the sections
/// change it) with the spec's fields in `fields` (indented two spaces).
fn traffic_policy(service: &str, fields: &str) -> String {
    format!(
        "apiVersion: muon.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {service}-traffic, namespace: default}}\nspec:\n  targetRefs: [{{kind: Service, name: {service}}}]\n{fields}"
    )
}

pub fn run(muonctl: &Path, workdir: &Path) -> Result<()> {
    println!(
        "\n== resilience: every order now goes to orders v1 (zone-a); the canary route is deleted"
    );
    let canary = workdir.join("orders-canary.yaml");
    ctl(
        muonctl,
        &["--lab", LAB, "delete", "-f", &canary.display().to_string()],
    )?;
    wait_until("the canary route to leave the client's sidecar", 15, || {
        Ok(super::orders_version(muonctl, &["-H", "x-canary: always"])?.as_deref() == Some("v1"))
    })?;
    failing_replica(muonctl, workdir)?;
    slow_replica(muonctl, workdir)?;
    locality(muonctl, workdir)
}

/// inventory-b fails half its requests: seen by the client without retries, hidden with a
/// retry route and outlier detection.
fn failing_replica(muonctl: &Path, workdir: &Path) -> Result<()> {
    println!("\n== a failing replica, hidden by retries and outlier detection");
    println!("  orders runs in zone-a and would keep to the zone-a replicas (locality, below); to");
    println!("  show balancing over both zones, this section and the next turn locality off:");
    let off = "  locality: {enabled: false}\n";
    for service in ["inventory", "payment"] {
        apply(
            muonctl,
            workdir,
            &format!("{service}-traffic.yaml"),
            &traffic_policy(service, off),
        )?;
    }
    wait_for_service(muonctl, "inventory", "locality off", |t| {
        t["locality"]["enabled"] == false
    })?;
    wait_for_service(muonctl, "payment", "locality off", |t| {
        t["locality"]["enabled"] == false
    })?;
    let b = batch(muonctl, "all replicas healthy")?;
    b.print();

    println!(
        "\n  inventory-b now answers 50% of its requests 503 (POST /admin/faults?fail-rate=0.5):"
    );
    faults(muonctl, "inventory-b", "fail-rate=0.5")?;
    let before = stats(muonctl)?;
    let b = batch(muonctl, "no retries, no outlier detection")?;
    b.print();
    print_served(&before, &stats(muonctl)?, &["inventory-a", "inventory-b"]);

    println!("\n  retry 503s on inventory, and eject an endpoint after 2 gateway errors in a row:");
    apply(muonctl, workdir, "inventory-retry.yaml", INVENTORY_RETRY)?;
    let outliers = "  locality: {enabled: false}\n  outlierDetection: {consecutiveGatewayErrors: 2, consecutive5xx: 3, baseEjectionTime: 10s, maxEjectionPercent: 50}\n";
    apply(
        muonctl,
        workdir,
        "inventory-traffic.yaml",
        &traffic_policy("inventory", outliers),
    )?;
    wait_for_service(muonctl, "inventory", "outlier detection", |t| {
        t["outlierDetection"].is_object()
    })?;
    wait_until("the retry route to reach orders' sidecar", 15, || {
        Ok(config_dump(muonctl, "orders")?
            .to_string()
            .contains("inventory-retry"))
    })?;
    let before = stats(muonctl)?;
    let b = batch(muonctl, "retries + outlier detection")?;
    b.print();
    print_served(&before, &stats(muonctl)?, &["inventory-a", "inventory-b"]);
    if b.failed > 0 {
        // With two replicas a retry goes to the other one: a failed order is a 503 that was
        // not retried.
        println!(
            "      {} orders still failed: 503s of inventory-b that orders' sidecar did not retry",
            b.failed
        );
    }
    println!("  orders' sidecar's view of inventory (muonctl --lab {LAB} config-dump orders):");
    print_endpoints(muonctl, "inventory")?;

    println!("\n  inventory-b is healthy again (fail-rate=0); waiting for its ejection to end");
    faults(muonctl, "inventory-b", "fail-rate=0")?;
    let started = Instant::now();
    wait_until("inventory-b's ejection to end", 60, || {
        let eps = endpoints(muonctl, "inventory")?;
        Ok(eps.iter().all(|e| e["ejected"] == false))
    })?;
    println!(
        "  inventory-b back in rotation after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// payment-a answers 50 ms late: peak-EWMA sends it few calls, round robin half.
fn slow_replica(muonctl: &Path, workdir: &Path) -> Result<()> {
    println!("\n== a slow replica, avoided by peak-EWMA (the default balancer)");
    println!("  payment-a now answers 50 ms late (POST /admin/faults?delay-ms=50):");
    faults(muonctl, "payment-a", "delay-ms=50")?;
    // The balancer learns latencies from the calls themselves: a few calls first, so both
    // replicas have an estimate that includes the delay.
    batch_quiet(muonctl, 20)?;
    let b = batch(muonctl, "PeakEWMA")?;
    b.print();
    let ewma = endpoints(muonctl, "payment")?;
    let shown: Vec<String> = ewma
        .iter()
        .map(|e| {
            format!(
                "{} {:.1}ms",
                e["pod"].as_str().unwrap_or("?"),
                e["ewmaMs"].as_f64().unwrap_or(0.0)
            )
        })
        .collect();
    println!(
        "  latency estimates in orders' sidecar: {}",
        shown.join(", ")
    );

    println!("\n  the same with round robin:");
    apply(
        muonctl,
        workdir,
        "payment-traffic.yaml",
        &traffic_policy(
            "payment",
            "  locality: {enabled: false}\n  loadBalancer: {algorithm: RoundRobin}\n",
        ),
    )?;
    wait_for_service(muonctl, "payment", "round robin", |t| {
        t["algorithm"] == "RoundRobin"
    })?;
    let b = batch(muonctl, "RoundRobin")?;
    b.print();
    faults(muonctl, "payment-a", "delay-ms=0")?;
    Ok(())
}

/// Locality on again: orders keeps to zone-a; zone-a goes down and orders fails over to
/// zone-b; zone-a comes back.
fn locality(muonctl: &Path, workdir: &Path) -> Result<()> {
    println!(
        "\n== locality: orders (zone-a) keeps to zone-a, and fails over when zone-a goes down"
    );
    let spec = "  locality: {failoverBelow: 70}\n  outlierDetection: {consecutiveConnectFailures: 2, consecutiveGatewayErrors: 2, baseEjectionTime: 5s}\n";
    for service in ["inventory", "payment"] {
        apply(
            muonctl,
            workdir,
            &format!("{service}-traffic.yaml"),
            &traffic_policy(service, spec),
        )?;
    }
    for service in ["inventory", "payment"] {
        wait_for_service(muonctl, service, "locality on", |t| {
            t["locality"]["enabled"] == true && t["algorithm"] == "PeakEWMA"
        })?;
    }
    let b = batch(muonctl, "both zones up")?;
    b.print();

    println!("\n  zone-a goes down: the sidecars and apps of inventory-a and payment-a stop");
    for pod in ["inventory-a", "payment-a"] {
        for what in [&["--sidecar"][..], &[]] {
            let mut args = vec!["lab", "stop", LAB, pod];
            args.extend_from_slice(what);
            ctl(muonctl, &args)?;
        }
    }
    let b = batch(muonctl, "zone-a down")?;
    b.print();
    println!("  orders' sidecar's view (config-dump):");
    print_endpoints(muonctl, "inventory")?;
    print_endpoints(muonctl, "payment")?;

    println!("\n  zone-a comes back (muonctl lab restart); orders returns once the ejections end");
    for pod in ["inventory-a", "payment-a"] {
        ctl(muonctl, &["lab", "restart", LAB, pod])?;
        ctl(muonctl, &["lab", "restart", LAB, pod, "--sidecar"])?;
    }
    let started = Instant::now();
    wait_until("zone-a's ejections to end", 60, || {
        let mut all = endpoints(muonctl, "inventory")?;
        all.extend(endpoints(muonctl, "payment")?);
        Ok(all.iter().all(|e| e["ejected"] == false))
    })?;
    println!(
        "  zone-a endpoints back in rotation after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let b = batch(muonctl, "zone-a back")?;
    b.print();
    Ok(())
}

/// What a batch of orders found.
#[derive(Default)]
struct Batch {
    label: String,
    ok: usize,
    failed: usize,
    errors: BTreeMap<String, usize>,
    inventory: BTreeMap<String, usize>,
    payment: BTreeMap<String, usize>,
    elapsed: Duration,
}

impl Batch {
    fn print(&self) {
        println!(
            "  [{}] {} orders in {:.1}s: {} ok, {} failed",
            self.label,
            self.ok + self.failed,
            self.elapsed.as_secs_f64(),
            self.ok,
            self.failed
        );
        for (kind, counts) in [("inventory", &self.inventory), ("payment", &self.payment)] {
            let line: Vec<String> = REPLICAS
                .iter()
                .filter(|(pod, _, _)| pod.starts_with(kind))
                .map(|(pod, zone, _)| {
                    format!(
                        "{pod} ({zone}) {:>3}",
                        counts.get(*pod).copied().unwrap_or(0)
                    )
                })
                .collect();
            println!("      answered by  {}", line.join("   "));
        }
        for (error, n) in &self.errors {
            println!("      failed: {n:>3} x {error}");
        }
    }
}

/// Sends `ORDERS` orders from the client on one connection.
fn batch(muonctl: &Path, label: &str) -> Result<Batch> {
    let mut b = send(muonctl, ORDERS)?;
    b.label = label.to_string();
    Ok(b)
}

fn batch_quiet(muonctl: &Path, n: usize) -> Result<()> {
    send(muonctl, n).map(drop)
}

fn send(muonctl: &Path, n: usize) -> Result<Batch> {
    let url = format!("http://orders:8080/orders/widget?n=[1-{n}]");
    let started = Instant::now();
    let (_, out) = ctl_output(
        muonctl,
        &[
            "lab",
            "exec",
            LAB,
            "client",
            "--",
            "curl",
            "-sS",
            "--max-time",
            "120",
            "-w",
            "\n",
            &url,
        ],
    )?;
    let mut b = Batch {
        elapsed: started.elapsed(),
        ..Batch::default()
    };
    for line in out.lines() {
        if let Some(e) = line.strip_prefix("curl: ") {
            *b.errors.entry(format!("curl: {e}")).or_default() += 1;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let Some(e) = v["error"].as_str() {
            b.failed += 1;
            *b.errors.entry(e.to_string()).or_default() += 1;
            continue;
        }
        let inv = v["inventory"]["pod"].as_str();
        let pay = v["payment"]["pod"].as_str();
        let (Some(inv), Some(pay)) = (inv, pay) else {
            b.failed += 1;
            *b.errors
                .entry(format!("unexpected answer {line}"))
                .or_default() += 1;
            continue;
        };
        b.ok += 1;
        *b.inventory.entry(inv.to_string()).or_default() += 1;
        *b.payment.entry(pay.to_string()).or_default() += 1;
    }
    // Orders with no answer at all (curl gave up).
    b.failed = n.saturating_sub(b.ok).max(b.failed);
    Ok(b)
}

/// Changes a replica's faults through its app's `/admin/faults` (from inside its pod).
fn faults(muonctl: &Path, pod: &str, query: &str) -> Result<()> {
    let port = port_of(pod)?;
    let url = format!("http://127.0.0.1:{port}/admin/faults?{query}");
    let (ok, out) = ctl_output(
        muonctl,
        &[
            "lab",
            "exec",
            LAB,
            pod,
            "--",
            "curl",
            "-sS",
            "-f",
            "--max-time",
            "5",
            "-X",
            "POST",
            &url,
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
    if !ok || !v["faults"].is_object() {
        bail!("{pod} did not take its faults ({url}): {}", out.trim());
    }
    println!("  {pod} faults: {}", v["faults"]);
    Ok(())
}

fn port_of(pod: &str) -> Result<u16> {
    REPLICAS
        .iter()
        .find(|(p, _, _)| *p == pod)
        .map(|r| r.2)
        .with_context(|| format!("{pod} is not a replica of the demo"))
}

/// Each replica's `/admin/stats`: (requests served, requests failed on purpose).
fn stats(muonctl: &Path) -> Result<BTreeMap<String, (u64, u64)>> {
    let mut all = BTreeMap::new();
    for (pod, _, port) in REPLICAS {
        let url = format!("http://127.0.0.1:{port}/admin/stats");
        let (ok, out) = ctl_output(
            muonctl,
            &[
                "lab",
                "exec",
                LAB,
                pod,
                "--",
                "curl",
                "-sS",
                "--max-time",
                "5",
                &url,
            ],
        )?;
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
        let (Some(requests), Some(failed)) = (v["requests"].as_u64(), v["failed"].as_u64()) else {
            bail!("{pod} did not answer {url} (ok {ok}): {}", out.trim());
        };
        all.insert(pod.to_string(), (requests, failed));
    }
    Ok(all)
}

/// What the replicas themselves saw between two [`stats`]: retried attempts included.
fn print_served(
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
    pods: &[&str],
) {
    let line: Vec<String> = pods
        .iter()
        .map(|pod| {
            let (r0, f0) = before.get(*pod).copied().unwrap_or_default();
            let (r1, f1) = after.get(*pod).copied().unwrap_or_default();
            format!(
                "{pod} {} ({} answered 503)",
                r1.saturating_sub(r0),
                f1.saturating_sub(f0)
            )
        })
        .collect();
    println!(
        "      requests the replicas got (/admin/stats)  {}",
        line.join("   ")
    );
}

/// A sidecar's `/config_dump`.
fn config_dump(muonctl: &Path, pod: &str) -> Result<serde_json::Value> {
    let (ok, out) = ctl_output(muonctl, &["--lab", LAB, "config-dump", pod])?;
    if !ok {
        bail!("config-dump {pod}: {}", out.trim());
    }
    serde_json::from_str(&out).with_context(|| format!("config-dump {pod} is not JSON"))
}

/// A service as orders' sidecar has it (`table.services[]`).
fn service(muonctl: &Path, name: &str) -> Result<serde_json::Value> {
    let dump = config_dump(muonctl, "orders")?;
    dump["table"]["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .cloned()
        .with_context(|| format!("orders' sidecar does not know the service {name}"))
}

fn endpoints(muonctl: &Path, name: &str) -> Result<Vec<serde_json::Value>> {
    Ok(service(muonctl, name)?["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

fn print_endpoints(muonctl: &Path, name: &str) -> Result<()> {
    let s = service(muonctl, name)?;
    println!(
        "    {name}: algorithm {}, locality level in use: {}",
        s["traffic"]["algorithm"].as_str().unwrap_or("?"),
        s["traffic"]["locality"]["levelInUse"]
            .as_str()
            .unwrap_or("?")
    );
    for e in s["endpoints"].as_array().into_iter().flatten() {
        let state = match e["ejected"].as_bool() {
            Some(true) => format!(
                "ejected ({:.1}s left)",
                e["ejectedForSeconds"].as_f64().unwrap_or(0.0)
            ),
            _ => "healthy".to_string(),
        };
        println!(
            "      {:<12} {:<7} locality {:<6} ewma {:>6.1}ms  {:<20} ejections {}",
            e["pod"].as_str().unwrap_or("?"),
            e["zone"].as_str().unwrap_or("-"),
            e["locality"].as_str().unwrap_or("?"),
            e["ewmaMs"].as_f64().unwrap_or(0.0),
            state,
            e["ejections"]
        );
    }
    Ok(())
}

/// Waits until orders' sidecar has `service` with traffic settings for which `f` holds.
fn wait_for_service(
    muonctl: &Path,
    name: &str,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> Result<()> {
    wait_until(
        &format!("{what} for {name} to reach orders' sidecar"),
        15,
        || Ok(f(&service(muonctl, name)?["traffic"])),
    )
}

/// Polls `f` every 200 ms for up to `seconds`.
fn wait_until(what: &str, seconds: u64, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {seconds}s waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
