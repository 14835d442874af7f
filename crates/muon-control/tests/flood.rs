//! The control plane under a connection flood (issue 8): 20,000 idle connections from one
//! address are refused past the per-source limit, the ones admitted are closed at the
//! handshake timeout, and meanwhile `muonctl get` from another address still answers.
//!
//! The flood comes from two Python processes of 10,000 sockets each (one process may not
//! hold 20,000 descriptors). `FLOOD_SETTLE_SECS=N` also prints the control plane's RSS N
//! seconds after the flood (for BENCHMARKS.md).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const FLOODERS: usize = 2;
const PER_FLOODER: usize = 10_000;
const FLOOD: usize = FLOODERS * PER_FLOODER;
const PER_SOURCE: usize = 1_000;

/// The flood's source address: one no other test binds (20,000 sockets take most of its
/// ephemeral ports while they are open).
const FLOOD_SOURCE: &str = "127.0.0.113";

/// Opens N idle connections from SOURCE to the address, says `ready N`, and holds them
/// until its stdin closes.
const FLOODER: &str = r#"
import socket, sys, resource
source, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
socks = []
for i in range(n):
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(10)
    s.connect((host, port))
    socks.append(s)
print("ready", len(socks), flush=True)
sys.stdin.read()
"#;

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn muonctl() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_muon-control")).with_file_name("muonctl");
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --workspace --bins)",
        p.display()
    );
    p
}

/// GET `path` on the metrics port, the body.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// The value of a metric line starting with `prefix` (name and labels), 0 when absent.
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn eventually(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_flood_of_idle_connections_is_refused_and_operators_are_still_served() {
    use nix::sys::resource::{getrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        hard as usize > PER_FLOODER + 100,
        "the open-file hard limit ({hard}) is too low for {PER_FLOODER} sockets per process"
    );
    let dir = tempfile::tempdir().unwrap();
    let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = dir.path().join("muon-control.log");
    // A soft limit below the hard one, as a fresh service gets: muon-control raises it.
    let child = Command::new("prlimit")
        .arg(format!("--nofile=1024:{hard}"))
        .arg(env!("CARGO_BIN_EXE_muon-control"))
        .args(["--grpc-addr", &grpc.to_string()])
        .args(["--metrics-addr", &metrics.to_string()])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--max-connections-per-source", &PER_SOURCE.to_string()])
        .args(["--handshake-timeout", "3s"])
        .arg("--insecure-plaintext")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("run prlimit (util-linux)");
    let cp = Process(child);
    let pid = cp.0.id();
    eventually("muon-control ready", Duration::from_secs(20), || {
        http_get(metrics, "/ready").is_some()
    });
    let url = format!("http://{grpc}");
    let ctl = |args: &[&str]| {
        let started = Instant::now();
        let out = Command::new(muonctl())
            .args(["--control-plane", &url])
            .args(args)
            .output()
            .unwrap();
        (out, started.elapsed())
    };
    let yaml = dir.path().join("web.yaml");
    std::fs::write(
        &yaml,
        "apiVersion: muon.io/v1alpha1\nkind: Service\nmetadata: {name: web}\n\
         spec: {vips: [198.19.0.1], ports: [{port: 80}], selector: {app: web}}\n",
    )
    .unwrap();
    let (out, _) = ctl(&["apply", "-f", yaml.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rss_before = rss_kib(pid);

    // The flood: idle connections from FLOOD_SOURCE, never a byte sent.
    let flood: Vec<Process> = (0..FLOODERS)
        .map(|_| {
            let mut p = Command::new("python3")
                .args([
                    "-c",
                    FLOODER,
                    FLOOD_SOURCE,
                    "127.0.0.1",
                    &grpc.port().to_string(),
                ])
                .arg(PER_FLOODER.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut ready = String::new();
            let out = p.stdout.as_mut().unwrap();
            let mut byte = [0u8; 1];
            while out.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
                ready.push(byte[0] as char);
            }
            assert_eq!(ready, format!("ready {PER_FLOODER}"), "a flooder failed");
            Process(p)
        })
        .collect();
    let m = http_get(metrics, "/metrics").unwrap();
    let refused = metric(
        &m,
        r#"muon_control_connections_refused_total{reason="max-connections-per-source"}"#,
    );
    let open = metric(&m, "muon_control_grpc_connections");
    let rss_during = rss_kib(pid);
    eprintln!(
        "{FLOOD} connections: {refused} refused, {open} open; RSS {rss_before} KiB before, {rss_during} KiB during"
    );
    assert!(
        open <= PER_SOURCE as f64,
        "{open} open for a limit of {PER_SOURCE}"
    );
    // Connections the kernel dropped from a full accept queue never reach the gate; every
    // one that did past the limit was refused.
    assert!(refused > 0.0, "nothing refused: {m}");

    // An operator from another address is served meanwhile.
    let (out, took) = ctl(&["get", "services"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("web"));
    assert!(
        took < Duration::from_secs(5),
        "get took {took:?} during the flood"
    );

    // The admitted ones never sent a preface: closed at the handshake timeout.
    eventually(
        "the flood's admitted connections closed",
        Duration::from_secs(20),
        || {
            metric(
                &http_get(metrics, "/metrics").unwrap(),
                "muon_control_grpc_connections",
            ) < 1.0
        },
    );
    drop(flood);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("raised the open-file limit") && log.contains("refusing gRPC connections"),
        "{log}"
    );
    // Still serving after it.
    let (out, _) = ctl(&["get", "services"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("RSS after: {} KiB", rss_kib(pid));
    if let Ok(wait) = std::env::var("FLOOD_SETTLE_SECS") {
        std::thread::sleep(Duration::from_secs(wait.parse().unwrap()));
        eprintln!("RSS {wait} s after: {} KiB", rss_kib(pid));
    }
}
