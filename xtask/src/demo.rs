//! `cargo xtask demo`: a three-service shop in a local lab. A client calls orders by name;
//! orders asks inventory (two replicas in two zones). Every hop is captured by iptables and
//! carried by sidecars, and the demo shows the answers, each sidecar's connection counters
//! and their access-log lines.

use crate::util;
use anyhow::{bail, Context, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const LAB: &str = "demo";
const REQUESTS: usize = 6;

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
    std::fs::write(&topology, topology_yaml(&app))?;

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
    let result = show(&muonctl);
    if keep && result.is_ok() {
        println!("\n== the mesh is still up");
        println!("  muonctl is {}", muonctl.display());
        println!("  call orders:      muonctl lab exec {LAB} client -- curl -s http://orders:8080/orders/widget");
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

fn topology_yaml(app: &Path) -> String {
    let app = app.display();
    format!(
        r#"# The demo shop: client -> orders -> inventory (two replicas, two zones).
pods:
  - name: client
    labels: {{app: client}}
    zone: zone-a
  - name: orders
    labels: {{app: orders}}
    zone: zone-a
    command: ["{app}", "orders", "--port", "8080", "--inventory", "inventory:8080"]
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
services:
  - name: orders
    selector: {{app: orders}}
    ports: [{{port: 8080, protocol: http}}]
  - name: inventory
    selector: {{app: inventory}}
    ports: [{{port: 8080, protocol: http}}]
"#
    )
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
    println!("\n== {REQUESTS} requests: client -> http://orders:8080/orders/widget (orders then calls http://inventory:8080)");
    let mut inventory_pods = std::collections::BTreeSet::new();
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
        match v["inventory"]["pod"].as_str() {
            Some(p) if ok => {
                inventory_pods.insert(p.to_string());
            }
            _ => bail!("request {i} failed: {body}"),
        }
    }
    println!("\n== which sidecars carried them (connections opened, from each sidecar's /metrics)");
    let mut all_counted = true;
    for pod in ["client", "orders", "inventory-a", "inventory-b"] {
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
        let out = counter(&metrics, "outbound");
        let inb = counter(&metrics, "inbound");
        println!("  {pod:<12} outbound {out:>3}   inbound {inb:>3}");
        let expected = match pod {
            "client" => out >= REQUESTS as u64,
            "orders" => inb >= REQUESTS as u64 && out >= REQUESTS as u64,
            _ => inb >= 1,
        };
        all_counted &= expected;
    }
    println!("\n== the control plane's view: every sidecar and what it has ACKed");
    let (_, status) = ctl_output(muonctl, &["--lab", LAB, "proxy-status"])?;
    for line in status.lines() {
        println!("  {line}");
    }
    println!("\n== access log (orders' sidecar, one line per connection)");
    let (_, log) = ctl_output(muonctl, &["lab", "logs", LAB, "orders", "--sidecar"])?;
    for line in log
        .lines()
        .filter(|l| l.contains("\"access\""))
        .take(2 * REQUESTS)
    {
        println!("  {}", summarize_access(line));
    }
    println!(
        "\ninventory answers came from: {}",
        inventory_pods.into_iter().collect::<Vec<_>>().join(", ")
    );
    if !all_counted {
        bail!("a sidecar did not count the connections it should have carried");
    }
    Ok(())
}

fn counter(metrics: &str, direction: &str) -> u64 {
    let needle = format!("direction=\"{direction}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("muon_tcp_connections_opened_total") && l.contains(&needle))
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
