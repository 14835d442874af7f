//! `cargo xtask demo`: a shop in a local lab. A client calls orders by name; orders checks
//! stock with inventory over HTTP/1.1 JSON and charges through payment over gRPC (each two
//! replicas, in two zones). Every hop is captured by iptables and carried by sidecars (HTTP
//! between them over pooled HTTP/2), and the demo shows the answers, each sidecar's counters
//! and access-log lines, then HTTP routing: a canary HTTPRoute splitting orders v1/v2 90/10
//! (and by header), and the ingress gateway routing by path from the host; then identity: a
//! sidecar's certificate, access-log lines naming both SPIFFE ids, an AuthorizationPolicy that
//! lets orders call inventory and denies the client, and STRICT mutual TLS refusing a pod
//! outside the mesh; then resilience ([`resilience`]): a failing replica hidden by retries and
//! outlier detection, a slow one avoided by peak-EWMA, and locality with failover when a zone
//! goes down.

mod resilience;

use crate::util;
use anyhow::{bail, Context, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const LAB: &str = "demo";
const REQUESTS: usize = 6;
/// Requests sent through the canary route to show the split.
const CANARY_REQUESTS: usize = 200;

/// orders v1/v2 at 90/10, and every request with `x-canary: always` to v2.
const CANARY: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: orders-canary, namespace: default}
spec:
  parentRefs: [{name: orders, port: 8080}]
  rules:
    - matches: [{headers: [{name: x-canary, value: always}]}]
      backendRefs: [{name: orders-v2, port: 8080}]
    - backendRefs:
        - {name: orders, port: 8080, weight: 90}
        - {name: orders-v2, port: 8080, weight: 10}
"#;

/// The ingress gateway's routes: /orders to orders, /stock to inventory.
const EDGE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop-edge, namespace: default}
spec:
  parentRefs: [{name: edge, kind: Gateway}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /orders}}]
      backendRefs: [{name: orders, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /stock}}]
      backendRefs: [{name: inventory, port: 8080}]
"#;

/// Only orders may call inventory.
const INVENTORY_CALLERS: &str = r#"apiVersion: muon.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: inventory-callers, namespace: default}
spec:
  selector: {matchLabels: {app: inventory}}
  action: ALLOW
  rules:
    - from: [{source: {principals: ["cluster.local/ns/default/sa/orders"]}}]
"#;

/// orders takes mutual TLS only.
const ORDERS_STRICT: &str = r#"apiVersion: muon.io/v1alpha1
kind: PeerAuthentication
metadata: {name: orders-strict, namespace: default}
spec:
  selector: {matchLabels: {app: orders}}
  mtls: {mode: STRICT}
"#;

pub fn run(keep: bool) -> Result<()> {
    util::require_root("the lab creates network namespaces and iptables rules inside them")?;
    crate::setup::ensure_packages()?;
    let bins = util::build_bins()?;
    let muonctl = bins.join("muonctl");
    let workdir = PathBuf::from("/run/muon/demo");
    std::fs::create_dir_all(&workdir)?;
    std::fs::set_permissions(&workdir, std::fs::Permissions::from_mode(0o755))?;
    // The apps run as an unprivileged user, who may not be able to read the build tree.
    let app = workdir.join("demo-shop");
    std::fs::copy(bins.join("demo-shop"), &app).context("copying demo-shop")?;
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755))?;
    let topology = workdir.join("shop.yaml");
    let host_port = free_port()?;
    std::fs::write(&topology, topology_yaml(&app, host_port))?;

    // A demo left over from an earlier `--keep` would hold the name.
    if Path::new("/run/muon/lab").join(LAB).exists() {
        println!("removing the demo lab left from an earlier run");
        ctl(&muonctl, &["lab", "down", LAB])?;
    }
    println!("== starting the lab (topology {})", topology.display());
    let up = ctl(
        &muonctl,
        &[
            "lab",
            "up",
            "-f",
            &topology.display().to_string(),
            "--name",
            LAB,
            "--detach",
        ],
    );
    if let Err(e) = up {
        bail!("the lab did not come up: {e:#}");
    }
    let result = show(&muonctl)
        .and_then(|()| routing(&muonctl, &workdir, host_port))
        .and_then(|()| identity(&muonctl, &workdir))
        .and_then(|()| resilience::run(&muonctl, &workdir));
    if keep && result.is_ok() {
        println!("\n== the mesh is still up");
        println!("  muonctl is {}", muonctl.display());
        println!("  call orders:      muonctl lab exec {LAB} client -- curl -s http://orders:8080/orders/widget");
        println!("  the canary:       muonctl lab exec {LAB} client -- curl -s -H 'x-canary: always' http://orders:8080/orders/widget");
        println!("  from this host:   curl -s http://127.0.0.1:{host_port}/orders/widget   (the ingress gateway)");
        println!("  the routes:       muonctl --lab {LAB} get routes");
        println!("  the policies:     muonctl --lab {LAB} get authorizationpolicies; muonctl --lab {LAB} get peerauthentications");
        println!("  a certificate:    muonctl lab exec {LAB} orders --user 0 -- curl -s http://127.0.0.1:15000/certs");
        println!("  faults:           muonctl lab exec {LAB} inventory-b -- curl -s -X POST 'http://127.0.0.1:8080/admin/faults?fail-rate=0.5'");
        println!("  a sidecar's view: muonctl --lab {LAB} config-dump orders   (endpoints: latency, ejections)");
        println!("  a zone down:      muonctl lab stop {LAB} inventory-a --sidecar; muonctl lab restart {LAB} inventory-a --sidecar");
        println!("  see the pods:     muonctl lab status {LAB}");
        println!("  the mesh's state: muonctl --lab {LAB} proxy-status; muonctl --lab {LAB} get endpoints");
        println!("  sidecar log:      muonctl lab logs {LAB} orders --sidecar");
        println!("  stop it:          muonctl lab down {LAB}");
        return Ok(());
    }
    println!("\n== tearing down");
    let down = ctl(&muonctl, &["lab", "down", LAB]);
    result.and(down)
}

/// A port on the host's loopback that is free now, for the gateway's hostPort.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

fn topology_yaml(app: &Path, host_port: u16) -> String {
    let app = app.display();
    format!(
        r#"# The demo shop: client -> orders (v1, and a v2 canary) -> inventory (HTTP/1.1 JSON) and
# payment (gRPC), each two replicas in two zones, and an ingress gateway reachable from the
# host. outsider has no sidecar: a pod outside the mesh.
pods:
  - name: client
    labels: {{app: client}}
    zone: zone-a
  - name: outsider
    sidecar: false
    command: ["sleep", "infinity"]
  - name: orders
    labels: {{app: orders}}
    zone: zone-a
    command: ["{app}", "orders", "--port", "8080", "--inventory", "inventory:8080", "--payment", "payment:9090"]
  - name: orders-v2
    labels: {{app: orders-v2}}
    serviceAccount: orders
    zone: zone-b
    command: ["{app}", "orders", "--port", "8080", "--inventory", "inventory:8080", "--payment", "payment:9090", "--version", "v2"]
  - name: inventory-a
    labels: {{app: inventory}}
    serviceAccount: inventory
    zone: zone-a
    command: ["{app}", "inventory", "--port", "8080"]
  - name: inventory-b
    labels: {{app: inventory}}
    serviceAccount: inventory
    zone: zone-b
    command: ["{app}", "inventory", "--port", "8080"]
  - name: payment-a
    labels: {{app: payment}}
    serviceAccount: payment
    zone: zone-a
    command: ["{app}", "payment", "--port", "9090"]
  - name: payment-b
    labels: {{app: payment}}
    serviceAccount: payment
    zone: zone-b
    command: ["{app}", "payment", "--port", "9090"]
services:
  - name: orders
    selector: {{app: orders}}
    ports: [{{port: 8080, protocol: http}}]
  - name: orders-v2
    selector: {{app: orders-v2}}
    ports: [{{port: 8080, protocol: http}}]
  - name: inventory
    selector: {{app: inventory}}
    ports: [{{port: 8080, protocol: http}}]
  - name: payment
    selector: {{app: payment}}
    ports: [{{port: 9090, protocol: grpc}}]
gateway:
  name: edge
  hostPort: {host_port}
"#
    )
}

/// The HTTP part: a canary route (90/10 and by header), then the gateway routing by path.
fn routing(muonctl: &Path, workdir: &Path, host_port: u16) -> Result<()> {
    println!("\n== a canary HTTPRoute: orders v1/v2 at 90/10, and x-canary: always to v2");
    let file = workdir.join("orders-canary.yaml");
    std::fs::write(&file, CANARY)?;
    for line in CANARY.lines() {
        println!("  | {line}");
    }
    ctl(
        muonctl,
        &["--lab", LAB, "apply", "-f", &file.display().to_string()],
    )?;
    // The route reaches the client's sidecar within moments (pushes are debounced).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let v = orders_version(muonctl, &["-H", "x-canary: always"])?;
        if v.as_deref() == Some("v2") {
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!("the canary route did not reach the client's sidecar");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // One curl, many requests on one keep-alive connection: each request is balanced and
    // routed on its own.
    let url = format!("http://orders:8080/orders/widget?n=[1-{CANARY_REQUESTS}]");
    let (ok, out) = ctl_output(
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
            "60",
            "-w",
            "\n",
            &url,
        ],
    )?;
    if !ok {
        bail!("the canary requests failed: {out}");
    }
    let mut split = std::collections::BTreeMap::<String, usize>::new();
    for line in out.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        *split
            .entry(v["version"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    let total: usize = split.values().sum();
    println!("  {total} requests, one connection from the app:");
    for (version, n) in &split {
        println!(
            "    orders {version}: {n:>4}  ({:.1}%)",
            100.0 * *n as f64 / total.max(1) as f64
        );
    }
    let canary = orders_version(muonctl, &["-H", "x-canary: always"])?;
    println!(
        "  with x-canary: always -> orders {}",
        canary.as_deref().unwrap_or("?")
    );
    if total != CANARY_REQUESTS || split.get("v2").copied().unwrap_or(0) == 0 {
        bail!("the canary split looks wrong: {split:?}");
    }

    println!("\n== the ingress gateway, from this host: routes by path (/orders -> orders, /stock -> inventory)");
    let file = workdir.join("shop-edge.yaml");
    std::fs::write(&file, EDGE)?;
    ctl(
        muonctl,
        &["--lab", LAB, "apply", "-f", &file.display().to_string()],
    )?;
    let mut shown = 0;
    for path in ["/orders/widget", "/stock/gadget", "/admin"] {
        let url = format!("http://127.0.0.1:{host_port}{path}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        let (code, body) = loop {
            let out = Command::new("curl")
                .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}", &url])
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
            // Until the route arrives every path is 404 (no route); /admin stays 404.
            if code != "404" || path == "/admin" || std::time::Instant::now() > deadline {
                break (code.to_string(), body.trim().to_string());
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        };
        println!("  curl http://127.0.0.1:{host_port}{path}  -> {code} {body}");
        if (path == "/admin") == (code == "404") {
            shown += 1;
        }
    }
    if shown != 3 {
        bail!("the gateway did not route as its HTTPRoute says");
    }

    println!("\n== access log of the client's sidecar (one event per HTTP request; last 3)");
    let (_, log) = ctl_output(muonctl, &["lab", "logs", LAB, "client", "--sidecar"])?;
    let requests: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"access\"") && l.contains("\"request\""))
        .collect();
    for line in requests.iter().rev().take(3).rev() {
        println!("  {}", summarize_request(line));
    }
    Ok(())
}

/// The identity part: a sidecar's certificate, both SPIFFE ids in the access log, an
/// AuthorizationPolicy (orders may call inventory, the client may not), and STRICT mutual
/// TLS refusing a pod outside the mesh.
fn identity(muonctl: &Path, workdir: &Path) -> Result<()> {
    println!("\n== identity: orders' sidecar's certificate (/certs on its admin port), from the lab's CA");
    let (ok, out) = ctl_output(
        muonctl,
        &[
            "lab",
            "exec",
            LAB,
            "orders",
            "--user",
            "0",
            "--",
            "curl",
            "-sS",
            "--max-time",
            "5",
            "http://127.0.0.1:15000/certs",
        ],
    )?;
    let certs: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
    let Some(id) = certs["identity"].as_str().filter(|_| ok) else {
        bail!("orders' sidecar has no certificate: {out}");
    };
    println!("  identity   {id}");
    println!("  serial     {}", certs["serial"].as_str().unwrap_or("?"));
    println!(
        "  valid for  {}s more (renewed at about half its lifetime)",
        certs["expiresInSeconds"]
    );
    println!(
        "  trust      {} root(s) in the bundle",
        certs["trustBundle"].as_array().map_or(0, Vec::len)
    );

    println!(
        "\n== every hop between sidecars is mutual TLS: inventory's log names both identities"
    );
    curl_from(muonctl, "client", &["http://orders:8080/orders/widget"])?;
    let mut shown = 0;
    for pod in ["inventory-a", "inventory-b"] {
        let (_, log) = ctl_output(muonctl, &["lab", "logs", LAB, pod, "--sidecar"])?;
        if let Some(line) = log
            .lines()
            .rfind(|l| l.contains("\"request\"") && l.contains("\"src_identity\":\"spiffe://"))
        {
            println!("  {}", summarize_request(line));
            shown += 1;
        }
    }
    if shown == 0 {
        bail!("no access event of inventory named the caller's identity");
    }

    println!("\n== an AuthorizationPolicy: only orders may call inventory");
    apply(
        muonctl,
        workdir,
        "inventory-callers.yaml",
        INVENTORY_CALLERS,
    )?;
    let url = "http://inventory:8080/stock/widget";
    let denied = wait_for("the policy to reach inventory", || {
        let (code, body) = curl_from(muonctl, "client", &["-w", "\n%{http_code}", url])?;
        Ok((code == "403").then_some(body))
    })?;
    println!("  client    -> {url}  -> 403 {denied}");
    let (code, body) = curl_from(
        muonctl,
        "client",
        &["-w", "\n%{http_code}", "http://orders:8080/orders/widget"],
    )?;
    println!("  client    -> orders -> inventory                -> {code} {body}");
    if code != "200" || !denied.contains("inventory-callers") {
        bail!("the policy did not decide as it says (orders got {code})");
    }
    let mut logged = false;
    for pod in ["inventory-a", "inventory-b"] {
        let (_, log) = ctl_output(muonctl, &["lab", "logs", LAB, pod, "--sidecar"])?;
        if let Some(line) = log
            .lines()
            .rfind(|l| l.contains("\"request\"") && l.contains("\"authz\":\"deny\""))
        {
            println!("  {pod}'s log: {}", summarize_request(line));
            logged = true;
        }
    }
    if !logged {
        bail!("inventory's sidecars did not log the denial");
    }

    println!("\n== STRICT mutual TLS for orders: a pod outside the mesh is refused");
    let ip = pod_ip(muonctl, "orders")?;
    let direct = format!("http://{ip}:8080/orders/widget");
    let (code, _) = curl_from(muonctl, "outsider", &["-w", "\n%{http_code}", &direct])?;
    println!("  PERMISSIVE (the default): outsider -> {direct}  -> {code}");
    apply(muonctl, workdir, "orders-strict.yaml", ORDERS_STRICT)?;
    let refused = wait_for("STRICT to reach orders", || {
        let (ok, out) = ctl_output(
            muonctl,
            &[
                "lab",
                "exec",
                LAB,
                "outsider",
                "--",
                "curl",
                "-sS",
                "--max-time",
                "5",
                &direct,
            ],
        )?;
        Ok((!ok).then(|| out.trim().to_string()))
    })?;
    println!("  STRICT:                   outsider -> {direct}  -> refused ({refused})");
    let (code, _) = curl_from(
        muonctl,
        "client",
        &["-w", "\n%{http_code}", "http://orders:8080/orders/widget"],
    )?;
    println!("  STRICT:                   client (meshed) -> http://orders:8080/orders/widget  -> {code}");
    if code != "200" {
        bail!("STRICT refused the meshed client too ({code})");
    }
    Ok(())
}

/// Writes `yaml` to `workdir/file`, shows it and applies it.
fn apply(muonctl: &Path, workdir: &Path, file: &str, yaml: &str) -> Result<()> {
    let path = workdir.join(file);
    std::fs::write(&path, yaml)?;
    for line in yaml.lines() {
        println!("  | {line}");
    }
    ctl(
        muonctl,
        &["--lab", LAB, "apply", "-f", &path.display().to_string()],
    )
}

/// curl in `pod` (as its app): (the last line of what it printed, the lines before).
fn curl_from(muonctl: &Path, pod: &str, args: &[&str]) -> Result<(String, String)> {
    let mut all = vec![
        "lab",
        "exec",
        LAB,
        pod,
        "--",
        "curl",
        "-sS",
        "--max-time",
        "5",
    ];
    all.extend_from_slice(args);
    let (_, out) = ctl_output(muonctl, &all)?;
    let out = out.trim_end();
    let (body, last) = out.rsplit_once('\n').unwrap_or(("", out));
    Ok((last.trim().to_string(), body.trim().to_string()))
}

/// Polls `f` for up to 15 s until it has an answer.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if std::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// A pod's address, from `muonctl lab status`.
fn pod_ip(muonctl: &Path, pod: &str) -> Result<String> {
    let (_, out) = ctl_output(muonctl, &["lab", "status", LAB, "-o", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("lab status")?;
    v[0]["pods"]
        .as_array()
        .and_then(|pods| pods.iter().find(|p| p["name"] == pod))
        .and_then(|p| p["ip"].as_str())
        .map(str::to_owned)
        .with_context(|| format!("no pod {pod} in the lab's status"))
}

/// The `version` orders answers with, for a request with extra curl arguments.
fn orders_version(muonctl: &Path, extra: &[&str]) -> Result<Option<String>> {
    let mut args = vec![
        "lab",
        "exec",
        LAB,
        "client",
        "--",
        "curl",
        "-sS",
        "--max-time",
        "5",
    ];
    args.extend_from_slice(extra);
    args.push("http://orders:8080/orders/widget");
    let (_, out) = ctl_output(muonctl, &args)?;
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
    Ok(v["version"].as_str().map(str::to_owned))
}

/// One request event as a readable line.
fn summarize_request(line: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return line.to_string();
    };
    let s = |k: &str| match &v[k] {
        serde_json::Value::String(s) if s.is_empty() => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mut line = format!(
        "{} {} {}{} -> {} route={} service={} pod={} {}ms id={}",
        s("direction"),
        s("method"),
        s("authority"),
        s("path"),
        s("status"),
        s("route"),
        s("service"),
        s("pod"),
        s("duration_ms"),
        s("request_id"),
    );
    if v["src_identity"].as_str().is_some_and(|id| !id.is_empty()) {
        line += &format!(
            " from={} to={} {}",
            s("src_identity"),
            s("dst_identity"),
            s("tls_version")
        );
    }
    if v["authz"].as_str().is_some_and(|a| !a.is_empty()) {
        line += &format!(" authz={} policy={}", s("authz"), s("policy"));
    }
    line
}

fn ctl(muonctl: &Path, args: &[&str]) -> Result<()> {
    util::status(Command::new(muonctl).args(args))
}

fn ctl_output(muonctl: &Path, args: &[&str]) -> Result<(bool, String)> {
    let out = Command::new(muonctl).args(args).output()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

fn show(muonctl: &Path) -> Result<()> {
    println!("\n== {REQUESTS} requests: client -> http://orders:8080/orders/widget (orders then calls http://inventory:8080 and gRPC payment:9090)");
    let mut inventory_pods = std::collections::BTreeSet::new();
    let mut payment_pods = std::collections::BTreeSet::new();
    for i in 1..=REQUESTS {
        let (ok, body) = ctl_output(
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
                "5",
                "http://orders:8080/orders/widget",
            ],
        )?;
        let body = body.trim();
        println!("  #{i} {body}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        match (v["inventory"]["pod"].as_str(), v["payment"]["pod"].as_str()) {
            (Some(inv), Some(pay)) if ok => {
                inventory_pods.insert(inv.to_string());
                payment_pods.insert(pay.to_string());
            }
            _ => bail!("request {i} failed: {body}"),
        }
    }
    println!(
        "\n== which sidecars carried them (from each sidecar's /metrics: HTTP requests, and TCP"
    );
    println!(
        "   connections: the app's connections, and between sidecars one pooled HTTP/2 connection)"
    );
    let mut all_counted = true;
    // Requests into each service's replicas: where they went is the balancer's choice.
    let mut into = std::collections::BTreeMap::<&str, u64>::new();
    for pod in [
        "client",
        "orders",
        "inventory-a",
        "inventory-b",
        "payment-a",
        "payment-b",
    ] {
        let (_, metrics) = ctl_output(
            muonctl,
            &[
                "lab",
                "exec",
                LAB,
                pod,
                "--user",
                "0",
                "--",
                "curl",
                "-sS",
                "http://127.0.0.1:15020/metrics",
            ],
        )?;
        let conns = |d| counter(&metrics, "muon_tcp_connections_opened_total", d);
        let reqs = |d| counter(&metrics, "muon_http_requests_total", d);
        let (out, inb) = (reqs("outbound"), reqs("inbound"));
        println!(
            "  {pod:<12} requests out {out:>3} in {inb:>3}   connections out {:>3} in {:>3}",
            conns("outbound"),
            conns("inbound")
        );
        let expected = match pod {
            "client" => out >= REQUESTS as u64,
            "orders" => inb >= REQUESTS as u64 && out >= 2 * REQUESTS as u64,
            _ => {
                *into.entry(&pod[..pod.len() - 2]).or_default() += inb;
                true
            }
        };
        all_counted &= expected;
    }
    all_counted &= into.values().all(|&n| n >= REQUESTS as u64);
    println!("\n== the control plane's view: every sidecar and what it has ACKed");
    let (_, status) = ctl_output(muonctl, &["--lab", LAB, "proxy-status"])?;
    for line in status.lines() {
        println!("  {line}");
    }
    println!("\n== access log (orders' sidecar: one event per connection, one per request)");
    let (_, log) = ctl_output(muonctl, &["lab", "logs", LAB, "orders", "--sidecar"])?;
    for line in log
        .lines()
        .filter(|l| l.contains("\"access\""))
        .take(2 * REQUESTS)
    {
        match line.contains("\"request\"") {
            true => println!("  {}", summarize_request(line)),
            false => println!("  {}", summarize_access(line)),
        }
    }
    println!(
        "\ninventory answers came from: {}; payment answers from: {}",
        inventory_pods.into_iter().collect::<Vec<_>>().join(", "),
        payment_pods.into_iter().collect::<Vec<_>>().join(", ")
    );
    println!("(orders runs in zone-a: locality preference keeps its calls in zone-a while the replicas there are healthy)");
    if !all_counted {
        bail!("a sidecar did not count the connections it should have carried");
    }
    Ok(())
}

fn counter(metrics: &str, name: &str, direction: &str) -> u64 {
    let needle = format!("direction=\"{direction}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(&needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// One access-log JSON line as a readable sentence.
fn summarize_access(line: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return line.to_string();
    };
    let f = v.get("fields").unwrap_or(&v);
    let s = |k: &str| match &f[k] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    format!(
        "{:<8} {} -> {} service={} endpoint={} pod={} sent={}B received={}B {}ms {}",
        s("direction"),
        s("src"),
        s("dst"),
        s("service"),
        s("endpoint"),
        s("pod"),
        s("bytes_sent"),
        s("bytes_received"),
        s("duration_ms"),
        s("outcome")
    )
}
