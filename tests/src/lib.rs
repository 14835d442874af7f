//! Harness for Muon's end-to-end tests: real labs (network namespaces, iptables capture,
//! sidecar processes) driven through the real `muonctl`, and real clients (curl) inside pods.
//!
//! Each test gets a lab with a unique name, removed when the handle drops, also when the test
//! panics. The binaries come from `$MUON_BIN_DIR` (set by `cargo xtask test`), or from the
//! target directory this test binary was built into.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Where muonctl, muon-proxy, muon-init and demo-shop are.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MUON_BIN_DIR") {
        return PathBuf::from(d);
    }
    // target/debug/deps/<test binary> -> target/debug
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("target dir")
}

pub fn muonctl() -> Command {
    let path = bin_dir().join("muonctl");
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first (cargo build --bins), or run `cargo xtask test`",
        path.display()
    );
    Command::new(path)
}

/// The end-to-end tests need root: say so plainly instead of failing obscurely.
pub fn require_root() {
    assert!(
        nix_is_root(),
        "end-to-end tests create network namespaces and must run as root (CI runs them as root)"
    );
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

pub fn kernel_has_ipv6() -> bool {
    Path::new("/proc/net/if_inet6").exists()
}

/// For a test that needs IPv6: true when the kernel has it. Without it the test fails,
/// rather than passing without testing, unless `MUON_TEST_WITHOUT` lists `ipv6` outside CI
/// (a developer's machine booted with `ipv6.disable=1`): then false, and the caller skips.
pub fn require_ipv6() -> bool {
    if kernel_has_ipv6() {
        return true;
    }
    let listed =
        std::env::var("MUON_TEST_WITHOUT").is_ok_and(|v| v.split(',').any(|w| w.trim() == "ipv6"));
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false");
    assert!(
        listed && !ci,
        "the kernel has no IPv6 (no /proc/net/if_inet6; boot without ipv6.disable=1); this test \
         needs it{}",
        if ci {
            " (CI must have it: MUON_TEST_WITHOUT is ignored when CI is set)"
        } else {
            " (or set MUON_TEST_WITHOUT=ipv6 to skip it on this machine)"
        }
    );
    eprintln!("no IPv6 in this kernel: skipped, as MUON_TEST_WITHOUT=ipv6 asks");
    false
}

/// demo-shop, copied where the pods' unprivileged users can execute it.
pub fn demo_shop() -> PathBuf {
    let dir = PathBuf::from("/run/muon/test-bin");
    std::fs::create_dir_all(&dir).expect("create /run/muon/test-bin");
    for d in ["/run/muon", "/run/muon/test-bin"] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let to = dir.join(format!("demo-shop-{}", std::process::id()));
    if !to.exists() {
        let tmp = dir.join(format!(
            ".demo-shop-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::copy(bin_dir().join("demo-shop"), &tmp).expect("copy demo-shop");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::rename(&tmp, &to).expect("rename demo-shop");
    }
    to
}

/// The Python interpreter of the test clients (a virtualenv with grpcio and websockets, made
/// by `cargo xtask test`), readable by every pod's user.
pub fn python() -> String {
    let python =
        std::env::var("MUON_TEST_PYTHON").unwrap_or_else(|_| "/opt/muon-ci/venv/bin/python".into());
    assert!(
        Path::new(&python).exists(),
        "{python} is missing: `cargo xtask test` creates it (python3 -m venv + pip install grpcio websockets)"
    );
    python
}

/// The test clients and servers (`tests/clients/*.py`), copied where the pods' unprivileged
/// users can read them (a checkout in a private temporary directory is not).
pub fn clients() -> PathBuf {
    let dir = PathBuf::from(format!("/run/muon/test-bin/clients-{}", std::process::id()));
    if !dir.join(".complete").exists() {
        std::fs::create_dir_all(&dir).expect("create the clients directory");
        for d in ["/run/muon", "/run/muon/test-bin"] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients");
        for entry in std::fs::read_dir(&src).expect("tests/clients") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "py") {
                let to = dir.join(path.file_name().expect("name"));
                std::fs::copy(&path, &to).expect("copy a client");
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644))
                    .expect("chmod");
            }
        }
        std::fs::write(dir.join(".complete"), b"").expect("mark");
    }
    dir
}

/// A running lab, removed on drop.
pub struct Lab {
    pub name: String,
    _dir: tempfile::TempDir,
}

impl Lab {
    /// A unique lab name: short, because it becomes part of namespace names.
    pub fn unique_name(tag: &str) -> String {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let mut tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_lowercase())
            .take(6)
            .collect();
        if tag.is_empty() {
            tag.push('t');
        }
        format!("t{}-{tag}{n}", std::process::id() % 100_000)
    }

    /// Writes `yaml` to a file and runs `muonctl lab up --detach` on it.
    pub fn up(tag: &str, yaml: &str) -> Lab {
        require_root();
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("topology.yaml");
        std::fs::write(&file, yaml).expect("write topology");
        let name = Self::unique_name(tag);
        let out = muonctl()
            .args(["lab", "up", "--detach", "--name", &name, "-f"])
            .arg(&file)
            .output()
            .expect("run muonctl");
        let lab = Lab { name, _dir: dir };
        assert!(
            out.status.success(),
            "lab up failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        lab
    }

    /// Runs a command in a pod as its app user.
    pub fn exec(&self, pod: &str, cmd: &[&str]) -> Output {
        self.exec_as(pod, None, cmd)
    }

    pub fn exec_as(&self, pod: &str, uid: Option<u32>, cmd: &[&str]) -> Output {
        let mut c = muonctl();
        c.args(["lab", "exec", &self.name, pod]);
        if let Some(uid) = uid {
            c.args(["--user", &uid.to_string()]);
        }
        c.arg("--").args(cmd);
        c.output().expect("run muonctl lab exec")
    }

    /// Runs curl in a pod (as its app user) with `args`; returns (stdout, stderr, success).
    pub fn curl_with(&self, pod: &str, args: &[&str]) -> (String, String, bool) {
        let mut cmd = vec!["curl", "-sS", "-g", "--max-time", "10"];
        cmd.extend_from_slice(args);
        let out = self.exec(pod, &cmd);
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            out.status.success(),
        )
    }

    /// `curl -i`: (status, headers lowercased, body).
    pub fn curl_i(
        &self,
        pod: &str,
        args: &[&str],
    ) -> (u16, std::collections::BTreeMap<String, String>, String) {
        let mut all = vec!["-i"];
        all.extend_from_slice(args);
        let (out, err, ok) = self.curl_with(pod, &all);
        assert!(ok, "curl {args:?}: {err}");
        // The last response (after a 100 Continue or a redirect's first hop).
        let text = out.replace("\r\n", "\n");
        let last = text
            .rfind("\nHTTP/")
            .map_or(text.as_str(), |i| &text[i + 1..]);
        let (head, body) = last.split_once("\n\n").unwrap_or((last, ""));
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {out:?}"));
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        (status, headers, body.to_string())
    }

    /// Runs a test client (`tests/clients/NAME`) in a pod as root (whose connections are
    /// captured like the app's) and parses the JSON line it prints last.
    pub fn client_json(&self, pod: &str, script: &str, args: &[&str]) -> Value {
        let path = clients().join(script);
        let py = python();
        let path = path.display().to_string();
        let mut cmd: Vec<&str> = vec![&py, &path];
        cmd.extend_from_slice(args);
        let out = self.exec_as(pod, Some(0), &cmd);
        let text = output_text(&out);
        assert!(
            out.status.success(),
            "{script} {args:?} in {pod} failed:\n{text}"
        );
        let last = String::from_utf8_lossy(&out.stdout)
            .lines()
            .rfind(|l| l.trim_start().starts_with('{'))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("{script} printed no JSON:\n{text}"));
        serde_json::from_str(&last).unwrap_or_else(|e| panic!("{script}: {e}: {last}"))
    }

    /// `curl -sS URL` inside a pod; Ok(body) on success, Err(curl's exit code and stderr).
    pub fn curl(&self, pod: &str, url: &str) -> Result<String> {
        self.curl_as(pod, None, url)
    }

    pub fn curl_as(&self, pod: &str, uid: Option<u32>, url: &str) -> Result<String> {
        let out = self.exec_as(pod, uid, &["curl", "-sS", "-g", "--max-time", "5", url]);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            bail!(
                "curl {url} from {pod}: exit {:?}: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        }
    }

    /// `muonctl lab status NAME -o json`, this lab's entry.
    pub fn status(&self) -> Value {
        let out = muonctl()
            .args(["lab", "status", &self.name, "-o", "json"])
            .output()
            .expect("run muonctl lab status");
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("status json");
        v[0].clone()
    }

    pub fn pod(&self, name: &str) -> Value {
        let st = self.status();
        st["pods"]
            .as_array()
            .and_then(|pods| pods.iter().find(|p| p["name"] == name).cloned())
            .unwrap_or_else(|| panic!("no pod {name} in {st}"))
    }

    pub fn pod_ip(&self, name: &str) -> String {
        self.pod(name)["ip"].as_str().expect("ip").to_string()
    }

    pub fn service_vip(&self, name: &str, v6: bool) -> String {
        let st = self.status();
        let svc = st["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == name).cloned())
            .unwrap_or_else(|| panic!("no service {name}"));
        svc[if v6 { "vip6" } else { "vip" }]
            .as_str()
            .expect("vip")
            .to_string()
    }

    /// The sidecar's Prometheus text, read as root inside the pod (root's connections to
    /// localhost are never captured).
    pub fn metrics(&self, pod: &str) -> String {
        let out = self.exec_as(
            pod,
            Some(0),
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "http://127.0.0.1:15020/metrics",
            ],
        );
        assert!(
            out.status.success(),
            "metrics of {pod}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Sum of a metric's samples whose labels include every `label="value"` given.
    pub fn metric(&self, pod: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.metrics(pod), name, labels)
    }

    /// The sidecar's log.
    pub fn sidecar_log(&self, pod: &str) -> String {
        let out = muonctl()
            .args(["lab", "logs", &self.name, pod, "--sidecar"])
            .output()
            .expect("run muonctl lab logs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Access-log events (JSON) from a pod's sidecar log.
    pub fn access_log(&self, pod: &str) -> Vec<Value> {
        access_events(&self.sidecar_log(pod))
    }

    /// A pod's app log (the gateway's proxy is its pod's app).
    pub fn app_log(&self, pod: &str) -> String {
        let out = muonctl()
            .args(["lab", "logs", &self.name, pod])
            .output()
            .expect("run muonctl lab logs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `muonctl --lab NAME ARGS…`: management commands against this lab's control plane.
    pub fn ctl(&self, args: &[&str]) -> Output {
        muonctl()
            .args(["--lab", &self.name])
            .args(args)
            .output()
            .expect("run muonctl")
    }

    /// Like [`Lab::ctl`], with `-f` reading `yaml` from a file.
    pub fn ctl_with_file(&self, args: &[&str], yaml: &str) -> Output {
        let file = self._dir.path().join(format!(
            "manifest-{}.yaml",
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::write(&file, yaml).expect("write manifest");
        let mut c = muonctl();
        c.args(["--lab", &self.name])
            .args(args)
            .arg("-f")
            .arg(&file);
        c.output().expect("run muonctl")
    }

    /// `muonctl --lab NAME proxy-status -o json`.
    pub fn proxy_status(&self) -> Vec<Value> {
        let out = self.ctl(&["proxy-status", "-o", "json"]);
        assert!(
            out.status.success(),
            "proxy-status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("proxy-status json")
    }

    /// Sends SIGKILL to a pod's app (or sidecar) and waits until it is gone.
    pub fn kill9(&self, pod: &str, sidecar: bool) {
        let pid = self.pod(pod)[if sidecar { "sidecarPid" } else { "appPid" }]
            .as_i64()
            .expect("pid");
        let st = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(st.success());
        eventually("the process to die", Duration::from_secs(5), || {
            (!process_alive(pid)).then_some(())
        });
    }

    /// `muonctl lab restart NAME POD [--sidecar]`, which waits until it is ready.
    pub fn restart(&self, pod: &str, sidecar: bool) {
        let mut c = muonctl();
        c.args(["lab", "restart", &self.name, pod]);
        if sidecar {
            c.arg("--sidecar");
        }
        let out = c.output().expect("run muonctl lab restart");
        assert!(
            out.status.success(),
            "restart {pod}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn down(&self) -> Output {
        muonctl()
            .args(["lab", "down", &self.name])
            .output()
            .expect("run muonctl lab down")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        tear_down(&self.name);
    }
}

/// Removes the lab of this name when dropped, for tests that run `muonctl lab up`
/// themselves: also when an assertion fails first.
pub struct DownOnDrop(pub String);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        tear_down(&self.0);
    }
}

/// `muonctl lab down NAME`, for drop guards: tried twice. A failure panics when the test
/// has not failed already (a lab left behind is a bug), and is printed when it has: a panic
/// while unwinding would abort the whole test binary and hide the first failure.
fn tear_down(name: &str) {
    let bin = bin_dir().join("muonctl");
    let mut problem = String::new();
    for _ in 0..2 {
        match Command::new(&bin).args(["lab", "down", name]).output() {
            Ok(out) if out.status.success() => return,
            Ok(out) => problem = output_text(&out),
            Err(e) => problem = format!("cannot run {}: {e}", bin.display()),
        }
    }
    let msg = format!("lab {name} was not removed ({problem}); run `muonctl lab down {name}`");
    if std::thread::panicking() {
        eprintln!("{msg}");
    } else {
        panic!("{msg}");
    }
}

/// The access-log events (target `access`, JSON) in a proxy's log.
pub fn access_events(log: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "access")
        .collect()
}

/// Sum of the samples of metric `name` whose labels include every `label="value"` given.
/// A metric that does not exist at all is an error, not 0: a renamed metric must fail the
/// tests that read it.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    assert!(
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .any(|l| l.split(['{', ' ']).next() == Some(name)),
        "no metric {name} in\n{text}"
    );
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.split(['{', ' ']).next() == Some(name)
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `f` until it returns Some, or panics with `what` after `timeout`.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Namespaces of this host whose name starts with `prefix`.
pub fn netns_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

pub fn process_alive(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Text of a command's stdout and stderr, for assertions.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn context<T>(r: Result<T>, what: &str) -> T {
    r.context(what.to_string())
        .unwrap_or_else(|e| panic!("{e:#}"))
}
