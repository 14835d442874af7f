//! Starting and stopping the processes of a pod: the app, its sidecar and muon-init.
//!
//! Everything is started through `ip netns exec`, which both joins the pod's network
//! namespace and mounts `/etc/netns/<ns>/hosts` over `/etc/hosts`, and `setpriv`, which drops
//! to the pod's user. Processes get their own process group so that a Ctrl-C aimed at
//! `muonctl` does not reach them: the lab, not the terminal, decides when they stop.

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A plain PATH: the app runs as another user, who cannot read root's own tool directories.
pub const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How to start one process inside a pod.
pub struct Spawn<'a> {
    pub netns: &'a str,
    /// None: run as root (muon-init).
    pub uid: Option<u32>,
    pub argv: &'a [String],
    pub env: &'a BTreeMap<String, String>,
    pub cwd: &'a Path,
    pub log: &'a Path,
}

/// The `ip netns exec … setpriv …` command line for `s`, stdio not yet wired.
pub fn command(s: &Spawn<'_>) -> Result<Command> {
    let Some((program, args)) = s.argv.split_first() else {
        bail!("empty command");
    };
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", s.netns]);
    if let Some(uid) = s.uid {
        cmd.args([
            "setpriv",
            "--reuid",
            &uid.to_string(),
            "--regid",
            &uid.to_string(),
        ]);
        cmd.args(["--clear-groups", "--"]);
    }
    cmd.arg(program).args(args);
    cmd.env_clear()
        .env("PATH", SYSTEM_PATH)
        .env("LANG", "C.UTF-8");
    cmd.envs(s.env).current_dir(s.cwd);
    Ok(cmd)
}

/// Starts a long-running process with its output appended to its log; returns its pid.
pub fn spawn(s: &Spawn<'_>) -> Result<i32> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(s.log)
        .with_context(|| format!("opening {}", s.log.display()))?;
    let err = log.try_clone()?;
    let child = command(s)?
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {:?} in {}", s.argv, s.netns))?;
    // `ip netns exec` and `setpriv` exec in place, so this pid is the app's own. It is not
    // waited for here: when muonctl exits, init adopts and reaps it.
    Ok(child.id() as i32)
}

/// Runs a short command in a pod to completion, output appended to its log.
pub fn run_to_end(s: &Spawn<'_>) -> Result<()> {
    let out = command(s)?.stdin(Stdio::null()).output()?;
    let mut text = out.stdout;
    text.extend_from_slice(&out.stderr);
    std::fs::write(s.log, &text).ok();
    if !out.status.success() {
        bail!(
            "{:?} failed in {} ({}): {}",
            s.argv,
            s.netns,
            out.status,
            String::from_utf8_lossy(&text).trim()
        );
    }
    Ok(())
}

/// Is `pid` a live process (not a zombie)?
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Is `pid` a live process inside network namespace `ns`? Pids are reused: a pid recorded in
/// a state file hours ago may belong to a host process now, and the lab runs as root, so it
/// signals a recorded pid only when the process is still in the lab's namespace.
pub fn alive_in_netns(pid: i32, ns: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(proc_ns), Ok(lab_ns)) = (
        std::fs::metadata(format!("/proc/{pid}/ns/net")),
        std::fs::metadata(crate::netns::netns_path(ns)),
    ) else {
        return false;
    };
    alive(pid) && proc_ns.ino() == lab_ns.ino() && proc_ns.dev() == lab_ns.dev()
}

/// Is `pid` a running `muonctl lab up`? (The foreground supervisor runs in the host's
/// namespace, so the namespace check above does not apply to it; if it is not, nothing is
/// lost: a supervisor also stops by itself once its lab's state directory is gone.)
pub fn is_supervisor(pid: i32) -> bool {
    let exe_is_muonctl = std::fs::read_link(format!("/proc/{pid}/exe"))
        .is_ok_and(|p| p.file_name().is_some_and(|n| n == "muonctl"));
    let runs_up = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
        args.windows(2).any(|w| w[0] == b"lab" && w[1] == b"up")
    });
    alive(pid) && exe_is_muonctl && runs_up
}

/// Reaps any of our children that have exited, so they do not linger as zombies while a
/// foreground `lab up` keeps running.
pub fn reap_children() {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}

/// SIGTERM, then SIGKILL after `grace`. Returns once every pid is gone.
pub fn stop(pids: &[i32], grace: Duration) {
    for &pid in pids {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        reap_children();
        if pids.iter().all(|&p| !alive(p)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for &pid in pids {
        if alive(pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && pids.iter().any(|&p| alive(p)) {
        reap_children();
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last lines of a log, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
