//! Network namespaces and the commands that shape them.
//!
//! The lab drives `ip` (iproute2) rather than netlink directly: every step is then a command a
//! user can read in the log and replay by hand. Probes (is the sidecar ready? is the app
//! listening?) run in a short-lived thread that has joined the pod's namespace with `setns`,
//! which changes only that thread.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Runs a command to completion; a non-zero exit is an error that carries its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS…` in the host's view (namespace management only, never host interfaces).
pub fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// `ip -n NS ARGS…`: configure inside a namespace.
pub fn ip_in(ns: &str, args: &[&str]) -> Result<String> {
    run(Command::new("ip").arg("-n").arg(ns).args(args))
}

pub fn exists(ns: &str) -> bool {
    netns_path(ns).exists()
}

pub fn netns_path(ns: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(ns)
}

/// Every namespace whose name is `name` or starts with `prefix`.
pub fn list_matching(name: &str, prefix: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    let mut out: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n == name || n.starts_with(prefix))
        .collect();
    out.sort();
    out
}

pub fn add(ns: &str) -> Result<()> {
    ip(&["netns", "add", ns])?;
    ip_in(ns, &["link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes a namespace (its interfaces go with it) and its /etc/netns directory.
pub fn delete(ns: &str) -> Result<()> {
    if exists(ns) {
        // Another `down` may remove it first; only a namespace that is still there is an error.
        if let Err(e) = ip(&["netns", "delete", ns]) {
            if exists(ns) {
                return Err(e);
            }
        }
    }
    let etc = etc_dir(ns);
    if etc.exists() {
        std::fs::remove_dir_all(&etc).with_context(|| format!("removing {}", etc.display()))?;
    }
    Ok(())
}

/// `ip netns exec` bind-mounts the files of this directory over /etc for processes it starts.
pub fn etc_dir(ns: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(ns)
}

/// Pids of every process whose network namespace is `ns`.
pub fn pids(ns: &str) -> Vec<i32> {
    let Ok(out) = run(Command::new("ip").args(["netns", "pids", ns])) else {
        return Vec::new();
    };
    out.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Sets a per-namespace sysctl (`net.*` keys are per network namespace).
pub fn sysctl(ns: &str, key: &str, value: &str) -> Result<()> {
    run(Command::new("ip")
        .args(["netns", "exec", ns, "sysctl", "-qw"])
        .arg(format!("{key}={value}")))
    .map(|_| ())
}

/// Runs `f` on a thread that has joined namespace `ns`.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = netns_path(ns);
    let name = ns.to_string();
    std::thread::spawn(move || -> Result<T> {
        let file = std::fs::File::open(&path)
            .with_context(|| format!("network namespace {name} does not exist"))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("cannot enter network namespace {name}"))?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("probe thread for {ns} panicked"))?
}

/// A minimal HTTP/1.0 GET, enough for /ready and /metrics; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no HTTP status from {addr}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// GET inside a namespace.
pub fn http_get_in(ns: &str, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let path = path.to_string();
    in_netns(ns, move || http_get(addr, &path, Duration::from_secs(2)))
}

/// Can a TCP connection to `addr` be opened from inside `ns`?
pub fn can_connect_in(ns: &str, addr: SocketAddr) -> bool {
    in_netns(ns, move || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
        Ok(())
    })
    .is_ok()
}
