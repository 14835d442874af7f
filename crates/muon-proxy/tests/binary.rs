//! The real `muon-proxy` binary: health, metrics, admin and the loop guard on loopback, and
//! capture plus drain inside a throwaway network namespace (`muon-proxy-t*`, deleted on
//! drop) with its own iptables REDIRECT rules. The host's network is never touched.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_muon-proxy");

/// A running proxy whose stdout (the JSON log) is collected line by line.
struct Proxy {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// The stdout reader; joined once the proxy exited, so every line it wrote is in `lines`.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    fn start(args: &[&str]) -> Proxy {
        let mut child = Command::new(BIN)
            .args(args)
            .args(["--log-format", "json"])
            .env_remove("MUON_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn muon-proxy");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Proxy {
            child,
            lines,
            reader: Some(reader),
        }
    }

    fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The process is gone but the reader may still be behind (a busy host):
                // read the pipe to its end before anyone looks at the log.
                if let Some(reader) = self.reader.take() {
                    reader.join().unwrap();
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "proxy still running after {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The JSON access events logged so far.
    fn access_events(&self) -> Vec<Value> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "access")
            .collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Only our own child, by its id.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 exchange; `None` when nothing answers.
fn http(addr: SocketAddr, method: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: proxy\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split(' ').nth(1)?.parse().ok()?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_table(dir: &std::path::Path, json: &str) -> String {
    let path = dir.join("table.json");
    std::fs::write(&path, json).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn binary_serves_health_metrics_admin_and_refuses_direct_connections() {
    let dir = tempfile::tempdir().unwrap();
    let table = write_table(
        dir.path(),
        r#"{"services":[{"name":"web","namespace":"shop","vips":["198.19.0.1"],
            "ports":[{"port":80,"targetPort":8080}],"endpoints":[{"ip":"198.18.0.2","pod":"web-0"}]}]}"#,
    );
    let [out, inb, health, admin] = [(); 4].map(|_| free_port());
    let addr = |p: u16| format!("127.0.0.1:{p}");
    let (out_s, in_s, health_s, admin_s) = (addr(out), addr(inb), addr(health), addr(admin));
    let mut proxy = Proxy::start(&[
        "--outbound-addr",
        &out_s,
        "--inbound-addr",
        &in_s,
        "--health-addr",
        &health_s,
        "--admin-addr",
        &admin_s,
        "--table-file",
        &table,
        "--pod-name",
        "client-0",
        "--pod-namespace",
        "shop",
    ]);
    let health: SocketAddr = health_s.parse().unwrap();
    let admin: SocketAddr = admin_s.parse().unwrap();

    wait_for("/ready", Duration::from_secs(10), || {
        http(health, "GET", "/ready").is_some_and(|(s, _)| s == 200)
    });
    assert_eq!(http(health, "GET", "/live").unwrap().0, 200);
    assert_eq!(http(admin, "GET", "/ready").unwrap().0, 200);
    assert_eq!(http(health, "GET", "/nope").unwrap().0, 404);
    assert_eq!(http(health, "GET", "/config_dump").unwrap().0, 404);
    assert_eq!(http(admin, "GET", "/drain").unwrap().0, 405);

    let (status, dump) = http(admin, "GET", "/config_dump").unwrap();
    assert_eq!(status, 200);
    let dump: Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["version"], 1);
    assert_eq!(dump["table"]["services"][0]["name"], "web");
    assert_eq!(dump["flags"]["idle_timeout"], "1h");
    assert_eq!(dump["flags"]["outbound_addrs"][0], out_s.as_str());

    // Nobody redirected this connection: the loop guard closes it without forwarding.
    for port in [out, inb] {
        let mut direct = TcpStream::connect(("127.0.0.1", port)).unwrap();
        direct
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(
            direct.read(&mut buf).unwrap_or(0),
            0,
            "direct connection closed"
        );
    }
    wait_for("loop metrics", Duration::from_secs(5), || {
        let (_, text) = http(health, "GET", "/metrics").unwrap();
        text.contains(r#"muon_tcp_connections_closed_total{direction="outbound",outcome="loop"} 1"#)
            && text.contains(
                r#"muon_tcp_connections_closed_total{direction="inbound",outcome="loop"} 1"#,
            )
    });
    let (_, metrics) = http(health, "GET", "/metrics").unwrap();
    for name in [
        "muon_tcp_connections_opened_total",
        "muon_tcp_connections_closed_total",
        "muon_tcp_connections_open",
        "muon_tcp_bytes_total",
        "muon_table_services 1",
        r#"muon_table_reloads_total{result="ok"} 1"#,
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }

    // An invalid table is rejected; the last good one keeps serving.
    std::fs::write(&table, "{not json").unwrap();
    wait_for("reload error", Duration::from_secs(5), || {
        let (_, text) = http(health, "GET", "/metrics").unwrap();
        text.contains(r#"muon_table_reloads_total{result="error"} 1"#)
    });
    let (_, dump) = http(admin, "GET", "/config_dump").unwrap();
    assert!(dump.contains("198.19.0.1"));
    assert_eq!(http(health, "GET", "/ready").unwrap().0, 200);

    let events = proxy.access_events();
    let looped = events
        .iter()
        .find(|e| e["direction"] == "outbound")
        .expect("outbound access event");
    assert_eq!(looped["outcome"], "loop");
    assert_eq!(looped["message"], "connection closed");
    assert_eq!(looped["level"], "INFO");
    assert_eq!(looped["dst"], out_s.as_str());
    assert_eq!(looped["service"], "");
    assert_eq!(looped["endpoint"], "");
    assert_eq!(looped["proxy_pod"], "client-0");
    assert_eq!(looped["proxy_namespace"], "shop");
    for field in ["src", "pod", "bytes_sent", "bytes_received", "duration_ms"] {
        assert!(looped.get(field).is_some(), "{field} missing from {looped}");
    }

    // Admin drain with nothing open: exits at once, cleanly.
    assert_eq!(http(admin, "POST", "/drain").unwrap().0, 200);
    assert!(proxy.wait_exit(Duration::from_secs(5)).success());
}

#[test]
fn every_flag_problem_is_reported_and_the_start_fails() {
    let out = Command::new(BIN)
        .args([
            "--workers",
            "0",
            "--log-format",
            "xml",
            "--idle-timeout",
            "soon",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for flag in ["--workers", "--log-format", "--idle-timeout"] {
        assert!(stderr.contains(flag), "{flag} missing from {stderr}");
    }
}

#[test]
fn port_in_use_fails_the_start() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_s = taken.local_addr().unwrap().to_string();
    let [inb, health, admin] = [(); 3].map(|_| format!("127.0.0.1:{}", free_port()));
    let out = Command::new(BIN)
        .args(["--outbound-addr", &taken_s, "--inbound-addr", &inb])
        .args(["--health-addr", &health, "--admin-addr", &admin])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&taken_s));
}

/// A network namespace of our own, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    /// Creating namespaces needs CAP_SYS_ADMIN: without root the test fails, saying so,
    /// rather than passing without testing (CI runs as root).
    fn create(tag: &str) -> Netns {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test creates a network namespace and iptables rules in it, and must run as \
             root (CI does); run `sudo -E cargo test -p muon-proxy --test binary`"
        );
        let name = format!("muon-proxy-t{}-{tag}", std::process::id());
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace (never in the host's).
    fn exec(&self, cmd: &[&str]) {
        let mut argv = vec!["ip", "netns", "exec", &self.name];
        argv.extend_from_slice(cmd);
        run(&argv);
    }
}

/// Moves the calling thread (and the processes it spawns) into namespace `name`.
fn enter_netns(name: &str) {
    let path = format!("/run/netns/{name}");
    let file = std::fs::File::open(&path).unwrap();
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    let here = std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
    assert_eq!(
        here,
        std::fs::metadata(&path).unwrap().ino(),
        "not in {path}"
    );
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(argv: &[&str]) {
    let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const VIP_PORT: &str = "7000";
const APP_PORT: u16 = 7001;

/// The capture muon-init installs, reduced to loopback: the app's connections to the
/// "service" at 127.0.0.1/::1 port 7000 go to outbound 15001; connections to the app's
/// port 7001 not coming from 127.0.0.6/::6 go to inbound 15006.
fn capture(ns: &Netns) {
    ns.exec(&["ip", "addr", "add", "::6/128", "dev", "lo"]);
    for (iptables, lo, source) in [
        ("iptables", "127.0.0.1", "127.0.0.6"),
        ("ip6tables", "::1", "::6"),
    ] {
        let app = APP_PORT.to_string();
        ns.exec(&[
            iptables,
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            lo,
            "--dport",
            VIP_PORT,
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ]);
        ns.exec(&[
            iptables,
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            lo,
            "--dport",
            &app,
            "!",
            "-s",
            source,
            "-j",
            "REDIRECT",
            "--to-ports",
            "15006",
        ]);
    }
}

const TABLE: &str = r#"{"services":[{"name":"app","namespace":"t","vips":["127.0.0.1","::1"],
    "ports":[{"port":7000,"targetPort":7001}],"endpoints":[{"ip":"127.0.0.1","pod":"app-0"}]}]}"#;

/// An echo app on 127.0.0.1:7001 and [::1]:7001 that records its peers.
fn echo_app() -> Arc<Mutex<Vec<SocketAddr>>> {
    let peers = Arc::new(Mutex::new(Vec::new()));
    for addr in ["127.0.0.1:7001", "[::1]:7001"] {
        let l = TcpListener::bind(addr).unwrap();
        let peers = peers.clone();
        std::thread::spawn(move || {
            for mut s in l.incoming().map_while(Result::ok) {
                if let Ok(peer) = s.peer_addr() {
                    peers.lock().unwrap().push(peer);
                }
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    while let Ok(n @ 1..) = s.read(&mut buf) {
                        if s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
    }
    peers
}

fn echo(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Half-closes and waits for the other side's EOF.
fn finish(mut s: TcpStream) {
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

/// Runs `body` in a thread inside `ns`; the namespace outlives it.
fn inside(ns: &Netns, body: impl FnOnce() + Send + 'static) {
    let name = ns.name.clone();
    let result = std::thread::spawn(move || {
        enter_netns(&name);
        body();
    })
    .join();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// Starts the proxy with its default ports (the namespace is ours) and waits for /ready.
fn start_in_ns(drain_timeout: &str) -> (Proxy, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let table = write_table(dir.path(), TABLE);
    let proxy = Proxy::start(&[
        "--table-file",
        &table,
        "--drain-timeout",
        drain_timeout,
        "--pod-name",
        "app-0",
        "--pod-namespace",
        "t",
    ]);
    let health: SocketAddr = "127.0.0.1:15020".parse().unwrap();
    wait_for("/ready", Duration::from_secs(10), || {
        http(health, "GET", "/ready").is_some_and(|(s, _)| s == 200)
    });
    (proxy, dir)
}

#[test]
fn captured_connections_flow_and_sigterm_drains_before_exit() {
    let ns = Netns::create("drain");
    capture(&ns);
    inside(&ns, || {
        let peers = echo_app();
        // A deadline far beyond the test: an exit in time is the drain finishing.
        let (mut proxy, _dir) = start_in_ns("60s");
        let health: SocketAddr = "127.0.0.1:15020".parse().unwrap();

        // v4 service call: outbound (SO_ORIGINAL_DST) → app port → inbound → app.
        let mut a = connect("127.0.0.1:7000");
        echo(&mut a, b"ping");
        // v6 service call: outbound via IP6T_SO_ORIGINAL_DST.
        let mut b = connect("[::1]:7000");
        echo(&mut b, b"ping6");
        finish(b);
        // v6 straight to the app port: inbound, connected from ::6.
        let mut c = connect("[::1]:7001");
        echo(&mut c, b"in6");
        finish(c);

        proxy.signal(Signal::SIGTERM);
        let signalled = Instant::now();
        wait_for("/ready 503", Duration::from_secs(5), || {
            http(health, "GET", "/ready").is_some_and(|(s, _)| s == 503)
        });
        assert_eq!(http(health, "GET", "/live").unwrap().0, 200);
        assert!(
            proxy.child.try_wait().unwrap().is_none(),
            "exited with a connection open"
        );
        // The open connection keeps working while draining; new ones are not accepted.
        echo(&mut a, b"more");
        assert!(TcpStream::connect("127.0.0.1:7000").is_err());
        finish(a);

        let status = proxy.wait_exit(Duration::from_secs(10));
        assert!(status.success(), "{status}");
        assert!(
            signalled.elapsed() < Duration::from_secs(30),
            "waited for the 60 s deadline"
        );

        let events = proxy.access_events();
        let find = |dir: &str, dst: &str| {
            events
                .iter()
                .find(|e| e["direction"] == dir && e["dst"] == dst)
                .unwrap_or_else(|| panic!("no {dir} event to {dst} in {events:#?}"))
        };
        let a_out = find("outbound", "127.0.0.1:7000");
        assert_eq!(a_out["outcome"], "ok");
        assert_eq!(a_out["service"], "app.t");
        assert_eq!(a_out["endpoint"], "127.0.0.1:7001");
        assert_eq!(a_out["pod"], "app-0");
        assert_eq!(a_out["bytes_sent"], 8);
        assert_eq!(a_out["bytes_received"], 8);
        assert_eq!(a_out["proxy_pod"], "app-0");
        assert_eq!(a_out["proxy_namespace"], "t");
        assert_eq!(find("outbound", "[::1]:7000")["bytes_sent"], 5);
        assert_eq!(find("inbound", "127.0.0.1:7001")["outcome"], "ok");
        assert_eq!(find("inbound", "[::1]:7001")["endpoint"], "[::1]:7001");

        let peers = peers.lock().unwrap();
        // Every connection reached the app through inbound, from the proxy's source address.
        let sources: Vec<String> = peers.iter().map(|p| p.ip().to_string()).collect();
        assert_eq!(sources.len(), 3, "{sources:?}");
        assert!(
            sources.iter().all(|s| s == "127.0.0.6" || s == "::6"),
            "{sources:?}"
        );
        assert!(sources.iter().any(|s| s == "::6"), "{sources:?}");
    });
}

#[test]
fn drain_deadline_closes_what_is_still_open_and_exits_zero() {
    let ns = Netns::create("deadline");
    capture(&ns);
    inside(&ns, || {
        let _peers = echo_app();
        let (mut proxy, _dir) = start_in_ns("500ms");
        let mut a = connect("127.0.0.1:7000");
        echo(&mut a, b"stay");

        proxy.signal(Signal::SIGTERM);
        let status = proxy.wait_exit(Duration::from_secs(5));
        assert!(status.success(), "{status}");
        let mut buf = [0u8; 1];
        assert_eq!(a.read(&mut buf).unwrap_or(0), 0, "cut at the deadline");
        let events = proxy.access_events();
        assert!(
            events
                .iter()
                .any(|e| e["direction"] == "outbound" && e["outcome"] == "drain_timeout"),
            "{events:#?}"
        );
    });
}
