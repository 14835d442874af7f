//! The real `muonctl` against control planes that fail the way real ones do, over real
//! loopback sockets: a silent server (accepts TCP, never answers), a listener whose accept
//! queue is full (the connect never completes), a connection cut after the apply went through
//! to a real `muon-control` (the answer is lost), and a real `muon-control` whose data
//! directory, a small tmpfs, is full.
//!
//! Every muonctl run has a generous deadline that only guards against a hang; no test
//! asserts how fast anything is.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const MUONCTL: &str = env!("CARGO_BIN_EXE_muonctl");
/// Only a guard against a hang: with `--timeout 1s` every run ends long before.
const HANG: Duration = Duration::from_secs(60);

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs muonctl against `cp` with small time limits, killing it (and failing) if it hangs.
fn muonctl(cp: &str, args: &[&str]) -> Run {
    let mut child = Command::new(MUONCTL)
        .args([
            "--control-plane",
            cp,
            "--timeout",
            "1s",
            "--connect-timeout",
            "1s",
        ])
        .args(args)
        .env_remove("MUON_CONTROL_PLANE")
        .env_remove("MUON_LAB")
        .env_remove("MUON_TIMEOUT")
        .env_remove("MUON_CONNECT_TIMEOUT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + HANG;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("muonctl {args:?} against {cp} hung");
        }
        thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

const WEB: &str = "\
apiVersion: muon.io/v1alpha1
kind: Service
metadata: {name: web}
spec: {vips: [198.19.0.1], ports: [{port: 80}], selector: {app: web}}
";

fn manifest(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

fn service(name: &str, vip: &str) -> String {
    format!(
        "apiVersion: muon.io/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{vips: [{vip}], ports: [{{port: 80}}], selector: {{app: {name}}}}}\n"
    )
}

/// A frozen control plane: accepts every TCP connection and holds it without a byte back.
struct SilentServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<Mutex<Vec<TcpStream>>>,
}

impl SilentServer {
    fn start() -> SilentServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (stop.clone(), accepted.clone());
        thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => a.lock().unwrap().push(conn),
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        SilentServer {
            addr,
            stop,
            accepted,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for SilentServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[test]
fn get_apply_and_proxy_status_against_a_silent_server_end_with_what_timed_out() {
    let server = SilentServer::start();
    let cp = server.url();
    let dir = tempfile::tempdir().unwrap();
    let web = manifest(dir.path(), "web.yaml", WEB);
    let no_answer = |what: &str| {
        format!(
            "muonctl: no answer from the control plane at {cp} within 1s ({what}); is it overloaded? --timeout raises the limit"
        )
    };

    for (args, what) in [
        (vec!["get", "services"], "get"),
        (vec!["get", "service", "web"], "get"),
        (vec!["proxy-status"], "proxy-status"),
    ] {
        let r = muonctl(&cp, &args);
        assert!(!r.ok, "{args:?}: {}", r.stdout);
        assert_eq!(r.stderr.trim(), no_answer(what), "{args:?}");
    }

    let r = muonctl(&cp, &["apply", "-f", &web]);
    assert!(!r.ok);
    assert_eq!(
        r.stderr.trim(),
        format!(
            "{}; the apply may have been stored: check with `muonctl get service web -n default`",
            no_answer("apply")
        )
    );
    let r = muonctl(&cp, &["delete", "service", "web"]);
    assert!(!r.ok);
    assert_eq!(
        r.stderr.trim(),
        format!(
            "{}; the delete may have been done: check with `muonctl get service web -n default`",
            no_answer("delete")
        )
    );
    // It really was the silent server that held them: each run connected.
    assert!(server.accepted.lock().unwrap().len() >= 5);
}

#[test]
fn a_connect_that_never_completes_ends_with_the_connect_timeout() {
    // A listener with a backlog of 0 whose accept queue is full: Linux drops further SYNs,
    // so a connect neither succeeds nor fails.
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    listener
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let _filler = TcpStream::connect(addr).unwrap();
    let cp = format!("http://{addr}");
    let r = muonctl(&cp, &["get", "services"]);
    assert!(!r.ok);
    assert_eq!(
        r.stderr.trim(),
        format!("muonctl: no connection to the control plane at {cp} within 1s (is the address right and muon-control running? --connect-timeout raises the limit)")
    );
}

/// The directory the binaries were built into (muon-control is beside muonctl).
fn muon_control_bin() -> PathBuf {
    let dir = match std::env::var_os("MUON_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(MUONCTL).parent().unwrap().to_path_buf(),
    };
    let bin = dir.join("muon-control");
    assert!(
        bin.is_file(),
        "{} is missing: build the binaries first (cargo build --workspace --bins)",
        bin.display()
    );
    bin
}

/// A real `muon-control` process on a loopback port, killed on drop.
struct ControlPlane {
    child: std::process::Child,
    addr: SocketAddr,
}

impl ControlPlane {
    fn start(data_dir: &Path) -> ControlPlane {
        // A port that was free a moment ago; muon-control fails at once if it is taken.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new(muon_control_bin())
            .args(["--grpc-addr", &addr.to_string()])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--insecure-plaintext")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut cp = ControlPlane { child, addr };
        let deadline = Instant::now() + HANG;
        loop {
            if let Some(status) = cp.child.try_wait().unwrap() {
                panic!("muon-control exited at start: {status}");
            }
            if muonctl(&cp.url(), &["get", "services"]).ok {
                return cp;
            }
            assert!(Instant::now() < deadline, "muon-control did not come up");
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy to `upstream` that reads the server's HTTP/2 frames and, on the first
/// `cut` connections, drops the first HEADERS frame (a unary call's answer, sent only once
/// the handler has finished) and closes both sides instead: the request went through and was
/// carried out, and its answer is lost.
struct CuttingProxy {
    addr: SocketAddr,
    cut: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl CuttingProxy {
    fn start(upstream: SocketAddr, cut_first: usize) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (counter, stopped) = (cut.clone(), stop.clone());
        thread::spawn(move || {
            let mut seen = 0;
            while !stopped.load(Ordering::SeqCst) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                client.set_nonblocking(false).unwrap();
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let cut_this = seen < cut_first;
                seen += 1;
                let counter = counter.clone();
                let (mut c_read, mut s_write) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                thread::spawn(move || {
                    let _ = std::io::copy(&mut c_read, &mut s_write);
                    let _ = s_write.shutdown(Shutdown::Write);
                });
                thread::spawn(move || server_to_client(server, client, cut_this, &counter));
            }
        });
        CuttingProxy { addr, cut, stop }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn server_to_client(mut server: TcpStream, mut client: TcpStream, cut: bool, cuts: &AtomicUsize) {
    let mut head = [0u8; 9];
    loop {
        if server.read_exact(&mut head).is_err() {
            let _ = client.shutdown(Shutdown::Write);
            return;
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        if server.read_exact(&mut payload).is_err() {
            let _ = client.shutdown(Shutdown::Write);
            return;
        }
        const HEADERS: u8 = 0x1;
        if cut && head[3] == HEADERS {
            cuts.fetch_add(1, Ordering::SeqCst);
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
            return;
        }
        if client.write_all(&head).is_err() || client.write_all(&payload).is_err() {
            return;
        }
    }
}

#[test]
fn a_lost_apply_answer_is_applied_once_more_or_says_it_may_have_been_stored() {
    let data = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(data.path());
    let dir = tempfile::tempdir().unwrap();

    // The first connection loses the answer; the second is fine: muonctl applies again and
    // the second answer tells the truth (the first attempt had stored the object).
    let proxy = CuttingProxy::start(cp.addr, 1);
    let web = manifest(dir.path(), "web.yaml", WEB);
    let r = muonctl(&proxy.url(), &["apply", "-f", &web]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(proxy.cut.load(Ordering::SeqCst), 1, "the answer was cut");
    assert_eq!(r.stdout, "service/web.default unchanged\n");
    assert!(
        r.stderr.starts_with(&format!(
            "muonctl: the connection to the control plane at {} broke before it answered the apply (",
            proxy.url()
        )) && r.stderr.trim_end().ends_with(
            "); applying again on a new connection (objects the first attempt stored show as unchanged)"
        ),
        "{}",
        r.stderr
    );

    // Every connection loses its answer: muonctl says the apply may have been stored, and
    // how to check; it was.
    let proxy = CuttingProxy::start(cp.addr, usize::MAX);
    let two = manifest(
        dir.path(),
        "two.yaml",
        &format!(
            "{}---\n{}",
            service("api", "198.19.0.2"),
            service("db", "198.19.0.3")
        ),
    );
    let r = muonctl(&proxy.url(), &["apply", "-f", &two]);
    assert!(!r.ok, "{}", r.stdout);
    assert_eq!(proxy.cut.load(Ordering::SeqCst), 2, "once and once more");
    let last = r
        .stderr
        .trim()
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned();
    assert!(
        last.starts_with(&format!(
            "muonctl: the connection to the control plane at {} broke before it answered (apply): ",
            proxy.url()
        )) && last.ends_with(
            "; the apply may have been stored: check with `muonctl get services -n default`"
        ),
        "{}",
        r.stderr
    );
    let r = muonctl(&cp.url(), &["get", "services"]);
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout.contains("api ") && r.stdout.contains("db "),
        "{}",
        r.stdout
    );

    // A read whose answer is lost is simply asked again.
    let proxy = CuttingProxy::start(cp.addr, 1);
    let r = muonctl(&proxy.url(), &["get", "service", "web"]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(proxy.cut.load(Ordering::SeqCst), 1);
    assert!(r.stdout.contains("web "), "{}", r.stdout);
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// A tmpfs mounted on a directory of ours, unmounted on drop (also when the test panics).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "muon-test",
            ])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount tmpfs on {}: {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Busy: detach it now, the kernel frees it once nothing uses it.
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Fills the file system of `dir` with one file, until it has no space left.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![0u8; 4096];
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
    path
}

#[test]
fn a_full_data_dir_is_reported_as_such_and_the_last_good_objects_keep_serving() {
    assert!(
        is_root(),
        "this test mounts a tmpfs and must run as root (CI runs it as root)"
    );
    let base = tempfile::tempdir().unwrap();
    let data = base.path().join("data");
    let _tmpfs = Tmpfs::mount(&data, "256k");
    let cp = ControlPlane::start(&data);
    let url = cp.url();
    let dir = tempfile::tempdir().unwrap();

    let web = manifest(dir.path(), "web.yaml", WEB);
    let r = muonctl(&url, &["apply", "-f", &web]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.stdout, "service/web.default created\n");

    let filler = fill(&data);
    let api = manifest(dir.path(), "api.yaml", &service("api", "198.19.0.2"));
    let r = muonctl(&url, &["apply", "-f", &api]);
    assert!(!r.ok, "{}", r.stdout);
    assert_eq!(
        r.stderr.trim(),
        format!(
            "muonctl: apply failed: could not store the change: no space left on the control plane's data dir ({}) while writing objects.json.tmp; nothing was changed, the previous objects keep serving",
            data.display()
        )
    );
    assert!(
        !data.join("objects.json.tmp").exists(),
        "the temporary file was removed"
    );
    // The earlier object still serves, the refused one is not there, and a delete fails the
    // same way without deleting.
    let r = muonctl(&url, &["get", "services"]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("web "), "{}", r.stdout);
    assert!(!r.stdout.contains("api "), "{}", r.stdout);
    let r = muonctl(&url, &["delete", "service", "web"]);
    assert!(!r.ok);
    assert!(
        r.stderr
            .contains("no space left on the control plane's data dir"),
        "{}",
        r.stderr
    );
    assert!(muonctl(&url, &["get", "service", "web"]).ok);

    // With space again, the same apply goes through.
    std::fs::remove_file(filler).unwrap();
    let r = muonctl(&url, &["apply", "-f", &api]);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.stdout, "service/api.default created\n");
    drop(cp);
}
