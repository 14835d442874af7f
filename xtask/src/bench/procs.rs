//! Processes the harness starts and watches: background commands in their own process group
//! (so the command *and* what it execs are stopped together, by that group's id only), CPU
//! time and RSS read from `/proc`, and the registry of labs and groups that a Ctrl-C or an
//! error must clean up.

use anyhow::{Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Labs brought up and process groups started by this run; torn down on Ctrl-C.
static LIVE: Mutex<Live> = Mutex::new(Live {
    labs: Vec::new(),
    groups: Vec::new(),
});

struct Live {
    labs: Vec<(PathBuf, String)>,
    groups: Vec<i32>,
}

pub fn register_lab(muonctl: &Path, name: &str) {
    if let Ok(mut l) = LIVE.lock() {
        l.labs.push((muonctl.to_path_buf(), name.to_string()));
    }
}

pub fn forget_lab(name: &str) {
    if let Ok(mut l) = LIVE.lock() {
        l.labs.retain(|(_, n)| n != name);
    }
}

/// Runs `muonctl lab down` for a lab, quietly; true when it succeeded.
pub fn lab_down(muonctl: &Path, name: &str) -> bool {
    let ok = Command::new(muonctl)
        .args(["lab", "down", name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    forget_lab(name);
    ok
}

/// On SIGINT/SIGTERM: stop our process groups, take our labs down, exit 130.
pub fn install_interrupt_cleanup() {
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        });
        eprintln!("\nbench: interrupted; stopping what this run started");
        let (labs, groups) = match LIVE.lock() {
            Ok(l) => (l.labs.clone(), l.groups.clone()),
            Err(_) => (Vec::new(), Vec::new()),
        };
        for g in groups {
            let _ = killpg(Pid::from_raw(g), Signal::SIGKILL);
        }
        for (muonctl, name) in labs {
            lab_down(&muonctl, &name);
        }
        std::process::exit(130);
    });
}

/// A command running in the background in a process group of its own. Dropping it stops the
/// whole group (SIGTERM, then SIGKILL after a grace period).
pub struct Background {
    child: Child,
}

impl Background {
    pub fn spawn(what: &str, cmd: &mut Command, log: &Path) -> Result<Background> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        if let Ok(mut l) = LIVE.lock() {
            l.groups.push(child.id() as i32);
        }
        Ok(Background { child })
    }

    /// The process group id (the id of the command we started).
    pub fn pgid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Still running?
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn stop(&mut self) {
        let pg = Pid::from_raw(self.pgid());
        if self.running() {
            let _ = killpg(pg, Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(3);
            while self.running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // The leader may be gone while something it started still runs in the group.
        let _ = killpg(pg, Signal::SIGKILL);
        let _ = self.child.wait();
        if let Ok(mut l) = LIVE.lock() {
            l.groups.retain(|&g| g != pg.as_raw());
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs a command to completion within `limit`; on overrun its process group is killed.
/// Returns (success, stdout, stderr).
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<(bool, String, String)> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    let pg = child.id() as i32;
    if let Ok(mut l) = LIVE.lock() {
        l.groups.push(pg);
    }
    // Read both pipes on threads so a chatty child never blocks on a full pipe.
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    let out_t = std::thread::spawn(move || read_all(out_pipe.as_mut()));
    let err_t = std::thread::spawn(move || read_all(err_pipe.as_mut()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = killpg(Pid::from_raw(pg), Signal::SIGKILL);
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Ok(mut l) = LIVE.lock() {
        l.groups.retain(|&g| g != pg);
    }
    let out = out_t.join().unwrap_or_default();
    let mut err = err_t.join().unwrap_or_default();
    match status {
        Some(st) => Ok((st.success(), out, err)),
        None => {
            err.push_str(&format!("\n(killed after {limit:?})"));
            Ok((false, out, err))
        }
    }
}

fn read_all<R: std::io::Read>(r: Option<&mut R>) -> String {
    let mut s = String::new();
    if let Some(r) = r {
        let _ = r.read_to_string(&mut s);
    }
    s
}

/// Clock ticks per second for /proc/PID/stat (USER_HZ).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse::<f64>().ok())
        .filter(|&t| t > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime of a whole process (every thread), in ticks; None once it is gone.
pub fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (in parentheses, which may contain spaces): state is
    // field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// A field of /proc/PID/status in KiB (VmRSS, VmHWM).
pub fn status_kib(pid: i32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The process group of a pid.
pub fn pgid_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

pub fn comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Pids inside a network namespace (`ip netns pids`).
pub fn netns_pids(netns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", netns])
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Is something in `pid`'s network namespace listening on TCP `port`?
pub fn listening(pid: i32, port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["tcp", "tcp6"].iter().any(|f| {
        std::fs::read_to_string(format!("/proc/{pid}/net/{f}"))
            .map(|t| {
                t.lines().skip(1).any(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    cols.get(1).is_some_and(|a| a.ends_with(&want)) && cols.get(3) == Some(&"0A")
                })
            })
            .unwrap_or(false)
    })
}

/// Established TCP connections in `pid`'s network namespace whose local port is `port`
/// (accepted on a listener there, or redirected to it).
pub fn established(pid: i32, port: u16) -> Option<u64> {
    let want = format!(":{port:04X}");
    let mut n = 0;
    for f in ["tcp", "tcp6"] {
        let Ok(t) = std::fs::read_to_string(format!("/proc/{pid}/net/{f}")) else {
            continue;
        };
        n += t
            .lines()
            .skip(1)
            .filter(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.get(1).is_some_and(|a| a.ends_with(&want)) && cols.get(3) == Some(&"01")
            })
            .count() as u64;
    }
    (cpu_ticks(pid).is_some()).then_some(n)
}

/// Samples the RSS of groups of pids every `period` on a thread, keeping each group's peak
/// (the group's pids summed: nginx's master and worker are one proxy), and optionally the
/// most connections established on a port in one pid's network namespace (see
/// `established`).
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Sampled>>,
}

/// Peak RSS (KiB) by group, and the most connections seen.
pub type Sampled = (BTreeMap<String, u64>, Option<u64>);

impl RssSampler {
    pub fn start(
        groups: BTreeMap<String, Vec<i32>>,
        connections: Option<(i32, u16)>,
        period: Duration,
    ) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak: BTreeMap<String, u64> = BTreeMap::new();
            let mut conns: Option<u64> = None;
            loop {
                for (name, pids) in &groups {
                    let kib: u64 = pids.iter().filter_map(|&p| status_kib(p, "VmRSS")).sum();
                    let e = peak.entry(name.clone()).or_default();
                    *e = (*e).max(kib);
                }
                if let Some((pid, port)) = connections {
                    conns = conns.max(established(pid, port));
                }
                if flag.load(Ordering::Relaxed) {
                    return (peak, conns);
                }
                std::thread::sleep(period);
            }
        });
        RssSampler {
            stop,
            handle: Some(handle),
        }
    }

    pub fn finish(mut self) -> Sampled {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
