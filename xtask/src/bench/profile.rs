//! `cargo xtask bench --profile`: where a proxy's time goes under load, with `perf`.
//!
//! For each scenario (default: Muon alone), the pair carries the open-loop load at 5,000
//! requests/s twice:
//! 1. `perf stat` on each side counts CPU time, context switches and system calls by kind;
//!    divided by the requests in the window (the rate is fixed, so that is rate × window),
//!    they give the cost *per request*, which is what a fix should move;
//! 2. `perf record` (999 Hz, DWARF call graphs) samples both proxies; the report groups the
//!    samples into kernel network stack, system-call entry, scheduler, copies, allocator,
//!    runtime (tokio) and the proxy's own code, and lists the top symbols.
//!
//! Everything lands in the run's directory: `profile.md` (printed), the raw `perf stat`
//! output, `perf-<scenario>.data` and the `perf report` text.

use super::peers;
use super::procs;
use super::scenarios::{Kind, Running};
use super::Env;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const RATE: u32 = 5000;
const CONNECTIONS: usize = 50;

/// Counted per request by `perf stat`; those the kernel lacks are left out.
const EVENTS: &[&str] = &[
    "task-clock",
    "context-switches",
    "cpu-migrations",
    "page-faults",
    "raw_syscalls:sys_enter",
    "syscalls:sys_enter_read",
    "syscalls:sys_enter_write",
    "syscalls:sys_enter_readv",
    "syscalls:sys_enter_writev",
    "syscalls:sys_enter_recvfrom",
    "syscalls:sys_enter_sendto",
    "syscalls:sys_enter_recvmsg",
    "syscalls:sys_enter_sendmsg",
    "syscalls:sys_enter_epoll_wait",
    "syscalls:sys_enter_epoll_pwait",
    "syscalls:sys_enter_epoll_ctl",
    "syscalls:sys_enter_futex",
    "syscalls:sys_enter_splice",
    "syscalls:sys_enter_clock_gettime",
];

pub fn run(env: &Env, kinds: &[Kind], quick: bool, mode: super::Mode) -> Result<()> {
    if which_perf().is_none() {
        bail!("perf is not installed (Debian package linux-perf)");
    }
    let window = if quick { 5.0 } else { 15.0 };
    let events = available_events();
    let mut md = format!(
        "### Profile — {}\n\nOpen loop at {RATE} requests/s over {CONNECTIONS} connections, 1 KiB answers; `perf stat` and `perf record` over {window}s windows in steady load. Per request = count ÷ ({RATE} × window).\n",
        super::report::stamp("%Y-%m-%d %H:%M UTC")
    );
    for &kind in kinds {
        if kind == Kind::Direct {
            continue;
        }
        println!("== profiling {}", kind.name());
        let bin = match kind.peer() {
            Some(p) => Some(peers::install(p, &env.bench_bin)?),
            None => None,
        };
        let mut running = Running::start(env, kind, mode, bin.as_ref())?;
        let section = profile_one(env, &mut running, &events, window)
            .with_context(|| format!("profiling {}", kind.name()))?;
        drop(running);
        md.push_str(&section);
    }
    std::fs::write(env.out.join("profile.md"), &md)?;
    println!("\n{md}");
    println!("wrote {}/profile.md", env.out.display());
    Ok(())
}

fn which_perf() -> Option<&'static str> {
    ["/usr/bin/perf", "/usr/local/bin/perf"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

fn available_events() -> Vec<&'static str> {
    let list = Command::new("perf")
        .arg("list")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    EVENTS
        .iter()
        .copied()
        .filter(|e| !e.contains(':') || list.contains(&format!("{e} ")))
        .collect()
}

fn profile_one(env: &Env, r: &mut Running, events: &[&str], window: f64) -> Result<String> {
    let name = r.kind.name();
    let load_for = window + 3.0;
    let args = super::load_args(
        r.http_target().to_string(),
        Some(RATE),
        CONNECTIONS,
        load_for,
        0.0,
    );
    let sides = side_pids(r);

    // 1. perf stat, one per side, while the load runs.
    let stats = with_load(r, &args, load_for, || {
        perf_stat(env, name, "rr", &sides, events, window)
    })?;

    // 2. perf record over both sides.
    let data = env.out.join(format!("perf-{name}.data"));
    let all_pids: Vec<String> = sides.iter().map(|(_, p)| p.clone()).collect();
    with_load(r, &args, load_for, || {
        let (ok, _, err) = procs::run_bounded(
            Command::new("perf")
                .args([
                    "record",
                    "-q",
                    "-F",
                    "999",
                    "--call-graph",
                    "dwarf,16384",
                    "-o",
                ])
                .arg(&data)
                .args([
                    "-p",
                    &all_pids.join(","),
                    "--",
                    "sleep",
                    &window.to_string(),
                ]),
            Duration::from_secs_f64(window + 60.0),
        )?;
        if !ok {
            bail!("perf record failed: {}", err.trim());
        }
        Ok(())
    })?;
    // Reported now, while the lab's copy of the binary is still there for the symbols.
    let self_report = perf_report(
        &data,
        &[
            "--no-children",
            "--sort",
            "dso,sym",
            "-g",
            "none",
            "--percent-limit",
            "0.2",
        ],
    )?;
    std::fs::write(
        env.out.join(format!("perf-report-{name}.txt")),
        &self_report,
    )?;
    let children_report = perf_report(
        &data,
        &[
            "--children",
            "--sort",
            "sym",
            "-g",
            "none",
            "--percent-limit",
            "2",
        ],
    )?;
    std::fs::write(
        env.out.join(format!("perf-report-{name}-children.txt")),
        &children_report,
    )?;

    let mut md = summarise(name, window, &stats, &self_report);
    // 3. (L4 only: an HTTP proxy carries no raw TCP stream.)
    if r.mode == super::Mode::L4 {
        md.push_str(&profile_bulk(env, r, events, window, load_for)?);
    }
    Ok(md)
}

/// `perf stat` under one TCP stream (server to client): the cost per megabyte.
fn profile_bulk(
    env: &Env,
    r: &mut Running,
    events: &[&str],
    window: f64,
    load_for: f64,
) -> Result<String> {
    let name = r.kind.name();
    r.use_port(super::scenarios::BULK_PORT)?;
    // Peers with a configured upstream were restarted for the bulk port: new pids.
    let sides = side_pids(r);
    let bulk_args: Vec<String> = [
        "bulk",
        "--addr",
        &r.bulk_target().to_string(),
        "--direction",
        "down",
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(["--duration".to_string(), format!("{load_for}s")])
    .collect();
    let (bulk_stats, bulk) = std::thread::scope(|s| -> Result<_> {
        let gen = s.spawn(|| {
            r.run_tool::<super::load::BulkReport>(
                &bulk_args,
                Duration::from_secs_f64(load_for + 30.0),
            )
        });
        std::thread::sleep(Duration::from_millis(1500));
        let stats = perf_stat(env, name, "bulk", &sides, events, window);
        let bulk = gen
            .join()
            .map_err(|_| anyhow::anyhow!("the bulk thread panicked"))??;
        Ok((stats?, bulk))
    })?;

    Ok(summarise_bulk(window, &bulk_stats, bulk.mb_per_s))
}

/// Each side's pids, comma-separated for `perf -p`.
fn side_pids(r: &Running) -> Vec<(String, String)> {
    r.proxies
        .iter()
        .map(|(side, pids)| {
            (
                side.clone(),
                pids.iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            )
        })
        .collect()
}

/// `perf stat` on each side's pids for `window` seconds, concurrently.
fn perf_stat(
    env: &Env,
    name: &str,
    what: &str,
    sides: &[(String, String)],
    events: &[&str],
    window: f64,
) -> Result<BTreeMap<String, BTreeMap<String, f64>>> {
    let mut children = Vec::new();
    for (side, pids) in sides {
        let file = env.out.join(format!("perf-stat-{name}-{what}-{side}.csv"));
        let child = Command::new("perf")
            .args(["stat", "-x", ",", "-o"])
            .arg(&file)
            .arg("-e")
            .arg(events.join(","))
            .args(["-p", pids, "--", "sleep", &window.to_string()])
            .spawn()
            .context("starting perf stat")?;
        children.push((side.clone(), file, child));
    }
    let mut out = BTreeMap::new();
    for (side, file, mut child) in children {
        child.wait()?;
        out.insert(
            side,
            parse_stat(&std::fs::read_to_string(&file).unwrap_or_default()),
        );
    }
    Ok(out)
}

/// Runs the generator in the client pod on a thread while `f` measures, then waits for it.
fn with_load<T>(
    r: &Running,
    args: &[String],
    secs: f64,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    std::thread::scope(|s| {
        let gen = s.spawn(|| {
            r.run_tool::<super::load::LoadReport>(args, Duration::from_secs_f64(secs + 30.0))
        });
        // Into steady load before the window opens.
        std::thread::sleep(Duration::from_millis(1500));
        let measured = f();
        let report = gen
            .join()
            .map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
        if report.errors + report.unsent > 0 {
            bail!(
                "the load had {} errors: {:?}",
                report.errors + report.unsent,
                report.first_error
            );
        }
        measured
    })
}

fn perf_report(data: &Path, args: &[&str]) -> Result<String> {
    let (ok, out, err) = procs::run_bounded(
        Command::new("perf")
            .arg("report")
            .arg("-i")
            .arg(data)
            .args(["--stdio"])
            .args(args),
        Duration::from_secs(600),
    )?;
    if !ok {
        bail!("perf report failed: {}", err.trim());
    }
    Ok(out)
}

/// `perf stat -x ,` lines: value,unit,event,...
fn parse_stat(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let v = f.first()?.trim().parse::<f64>().ok()?;
            Some((f.get(2)?.trim().to_string(), v))
        })
        .collect()
}

fn summarise_bulk(
    window: f64,
    stats: &BTreeMap<String, BTreeMap<String, f64>>,
    mb_per_s: f64,
) -> String {
    let mb = mb_per_s * window;
    let mut md = format!(
        "\nOne TCP stream, server to client, {mb_per_s:.0} MB/s: per MB moved, by side:\n\n| side | CPU ms | syscalls | reads | writes | context switches |\n| --- | --- | --- | --- | --- | --- |\n"
    );
    for (side, m) in stats {
        let get = |k: &str| m.get(k).copied().unwrap_or(0.0);
        let reads = get("syscalls:sys_enter_read")
            + get("syscalls:sys_enter_recvfrom")
            + get("syscalls:sys_enter_readv");
        let writes = get("syscalls:sys_enter_write")
            + get("syscalls:sys_enter_sendto")
            + get("syscalls:sys_enter_writev");
        let _ = writeln!(
            md,
            "| {side} | {:.3} | {:.1} | {:.1} | {:.1} | {:.2} |",
            get("task-clock") / mb,
            get("raw_syscalls:sys_enter") / mb,
            reads / mb,
            writes / mb,
            get("context-switches") / mb
        );
    }
    md
}

/// One line of `perf report --sort dso,sym`: percentage, dso, symbol.
fn parse_report(text: &str) -> Vec<(f64, String, String)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let l = l.trim();
            let (pct, rest) = l.split_once('%')?;
            let pct = pct.trim().parse::<f64>().ok()?;
            let rest = rest.trim();
            let (dso, sym) = rest
                .split_once("  ")
                .map(|(d, s)| (d.trim(), s.trim()))
                .unwrap_or((rest, ""));
            let sym = sym
                .trim_start_matches("[k] ")
                .trim_start_matches("[.] ")
                .to_string();
            Some((pct, dso.to_string(), sym))
        })
        .collect()
}

/// Where a sample's time goes, by symbol and shared object.
fn category(dso: &str, sym: &str) -> &'static str {
    let kernel = dso.contains("kernel");
    let any = |keys: &[&str]| keys.iter().any(|k| sym.contains(k));
    if kernel {
        if any(&[
            "copy_user",
            "copy_to_iter",
            "copy_from_iter",
            "memcpy",
            "memmove",
            "rep_mov",
            "copyout",
            "copyin",
        ]) {
            "kernel: copying bytes"
        } else if any(&[
            "schedule",
            "switch",
            "wake",
            "enqueue",
            "dequeue",
            "pick_next",
            "update_curr",
            "futex",
            "idle",
            "_raw_spin_unlock_irq",
        ]) {
            // Without a PMU (VMs), perf samples on a timer and charges the time spent with
            // interrupts off to where they are turned back on: the unlock_irq* symbols.
            "kernel: scheduler, wake-ups (and IRQ-off time)"
        } else if any(&[
            "ep_",
            "epoll",
            "poll",
            "entry_SYSCALL",
            "syscall",
            "__x64_sys",
            "do_syscall",
            "fdget",
            "fput",
            "__fget",
        ]) {
            "kernel: system-call entry, epoll"
        } else if any(&[
            "tcp",
            "ip_",
            "ipv4",
            "sk_",
            "skb",
            "sock",
            "nf_",
            "ipt_",
            "nft_",
            "conntrack",
            "dev_",
            "veth",
            "br_",
            "netif",
            "napi",
            "inet",
            "__kfree_skb",
            "net_rx",
            "softirq",
            "neigh",
            "fib_",
            "lock_sock",
            "release_sock",
        ]) {
            "kernel: TCP/IP, netfilter, veth"
        } else {
            "kernel: other"
        }
    } else if any(&[
        "malloc", "free", "realloc", "calloc", "_int_", "tcache", "arena",
    ]) {
        "user: allocator"
    } else if any(&["memcpy", "memmove", "memset"]) {
        "user: memcpy"
    } else if any(&["tokio::", "mio::", "parking_lot", "std::sync"]) {
        "user: tokio runtime"
    } else if any(&["muon_proxy", "muon_core"]) {
        "user: muon-proxy code"
    } else if any(&["tracing", "prometheus"]) {
        "user: tracing, metrics"
    } else {
        "user: other (std, libc, envoy/haproxy/nginx internals)"
    }
}

fn summarise(
    name: &str,
    window: f64,
    stats: &BTreeMap<String, BTreeMap<String, f64>>,
    report: &str,
) -> String {
    let requests = RATE as f64 * window;
    let mut md = format!("\n#### {name}\n\nPer request, by side (from `perf stat`):\n\n| side | CPU µs | syscalls | context switches |");
    let syscall_kinds: Vec<String> = stats
        .values()
        .flat_map(|m| m.keys())
        .filter(|k| k.starts_with("syscalls:sys_enter_"))
        .map(|k| k.trim_start_matches("syscalls:sys_enter_").to_string())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    for k in &syscall_kinds {
        let _ = write!(md, " {k} |");
    }
    let _ = write!(md, "\n| --- | --- | --- | --- |");
    for _ in &syscall_kinds {
        md.push_str(" --- |");
    }
    md.push('\n');
    for (side, m) in stats {
        let per = |k: &str| m.get(k).map(|v| v / requests);
        let f = |v: Option<f64>, scale: f64| {
            v.map(|v| format!("{:.2}", v * scale))
                .unwrap_or_else(|| "—".into())
        };
        // task-clock is in milliseconds.
        let _ = write!(
            md,
            "| {side} | {} | {} | {} |",
            f(per("task-clock"), 1000.0),
            f(per("raw_syscalls:sys_enter"), 1.0),
            f(per("context-switches"), 1.0)
        );
        for k in &syscall_kinds {
            let _ = write!(md, " {} |", f(per(&format!("syscalls:sys_enter_{k}")), 1.0));
        }
        md.push('\n');
    }

    let rows = parse_report(report);
    let mut cats: BTreeMap<&str, f64> = BTreeMap::new();
    for (pct, dso, sym) in &rows {
        *cats.entry(category(dso, sym)).or_default() += pct;
    }
    let mut cats: Vec<(&str, f64)> = cats.into_iter().collect();
    cats.sort_by(|a, b| b.1.total_cmp(&a.1));
    let _ = write!(md, "\nWhere the sampled time goes (both sides, `perf record`, symbols above 0.2%):\n\n| category | share |\n| --- | --- |\n");
    for (c, p) in &cats {
        let _ = writeln!(md, "| {c} | {p:.1}% |");
    }
    let _ = write!(
        md,
        "\nTop symbols:\n\n| share | object | symbol |\n| --- | --- | --- |\n"
    );
    for (pct, dso, sym) in rows.iter().take(25) {
        let sym: String = sym.chars().take(110).collect();
        let _ = writeln!(md, "| {pct:.2}% | {dso} | `{}` |", sym.replace('|', "\\|"));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_output_is_parsed_into_figures_and_categories() {
        let stat = "# started on x\n\n1234.5,msec,task-clock,1234,100.00,0.5,CPUs utilized\n5000,,context-switches,1,100.00,,\n";
        let m = parse_stat(stat);
        assert_eq!(m.get("task-clock"), Some(&1234.5));
        assert_eq!(m.get("context-switches"), Some(&5000.0));
        let report = "# Overhead  Shared Object  Symbol\n     5.10%  [kernel.kallsyms]  [k] copy_user_enhanced_fast_string\n     2.00%  muon-proxy         [.] tokio::runtime::io::driver::Driver::turn\n";
        let rows = parse_report(report);
        assert_eq!(rows.len(), 2);
        assert_eq!(category(&rows[0].1, &rows[0].2), "kernel: copying bytes");
        assert_eq!(category(&rows[1].1, &rows[1].2), "user: tokio runtime");
    }
}
