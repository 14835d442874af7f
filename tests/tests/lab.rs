//! The lab itself: topology errors, `down` leaving nothing behind, two labs side by side, and
//! a `lab up` stopped (by a signal or by `lab down`) or killed while it is coming up.

use muon_tests::{
    eventually, muonctl, netns_with_prefix, output_text, process_alive, DownOnDrop, Lab,
};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

const TWO_PODS: &str = r#"
pods:
  - name: client
  - name: web
    labels: {app: web}
    command: ["python3", "-m", "http.server", "8080"]
services:
  - name: web
    selector: {app: web}
    ports: [{port: 8080}]
"#;

fn assert_gone(name: &str, pids: &[i64]) {
    let prefix = format!("muon-{name}");
    let left: Vec<String> = netns_with_prefix(&prefix)
        .into_iter()
        .filter(|n| n == &prefix || n.starts_with(&format!("{prefix}.")))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    let etc: Vec<String> = std::fs::read_dir("/etc/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(&format!("{prefix}.")))
                .collect()
        })
        .unwrap_or_default();
    assert!(etc.is_empty(), "/etc/netns entries left behind: {etc:?}");
    assert!(
        !Path::new("/run/muon/lab").join(name).exists(),
        "state dir left behind"
    );
    for pid in pids {
        assert!(!process_alive(*pid), "process {pid} left behind");
    }
}

fn pids_of(lab: &Lab) -> Vec<i64> {
    let st = lab.status();
    let pods = st["pods"].as_array().unwrap().clone();
    let pids: Vec<i64> = pods
        .iter()
        .flat_map(|p| [p["appPid"].as_i64(), p["sidecarPid"].as_i64()])
        .flatten()
        .collect();
    assert_eq!(
        pids.len(),
        5,
        "the control plane, two apps and two sidecars: {st}"
    );
    pids
}

#[test]
fn lab_down_leaves_no_namespace_interface_or_process() {
    let lab = Lab::up("down", TWO_PODS);
    let pids = pids_of(&lab);
    assert_eq!(
        netns_with_prefix(&format!("muon-{}.", lab.name)).len(),
        3,
        "client, web and the control plane"
    );
    assert!(pids.iter().all(|p| process_alive(*p)));
    let out = lab.down();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_gone(&lab.name, &pids);
}

#[test]
fn lab_down_cleans_up_after_a_killed_supervisor() {
    muon_tests::require_root();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.yaml");
    std::fs::write(&file, TWO_PODS).unwrap();
    let name = Lab::unique_name("sup");
    let _lab = DownOnDrop(name.clone());
    // A foreground `lab up` is the lab's supervisor.
    let mut sup = muonctl()
        .args(["lab", "up", "--name", &name, "-f"])
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let sup_pid = i64::from(sup.id());
    // Whatever happens below, the supervisor does not outlive the test.
    let _guard = KillOnDrop(sup_pid);
    let state = Path::new("/run/muon/lab").join(&name).join("state.json");
    let pids: Vec<i64> = eventually("the lab to be up", Duration::from_secs(60), || {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).ok()?).ok()?;
        let pids: Vec<i64> = v["pods"]
            .as_array()?
            .iter()
            .flat_map(|p| [p["appPid"].as_i64(), p["sidecarPid"].as_i64()])
            .flatten()
            .collect();
        (pids.len() == 5).then_some(pids)
    });
    sup.kill().unwrap();
    sup.wait().unwrap();
    assert!(!process_alive(sup_pid), "the supervisor should be gone");
    let out = muonctl().args(["lab", "down", &name]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_gone(&name, &pids);
}

/// Kills a process when dropped, also when the test panics.
struct KillOnDrop(i64);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if process_alive(self.0) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &self.0.to_string()])
                .status();
        }
    }
}

#[test]
fn two_labs_run_side_by_side_with_the_same_addresses() {
    let a = Lab::up("sidea", TWO_PODS);
    let b = Lab::up("sideb", TWO_PODS);
    assert_eq!(a.pod_ip("web"), b.pod_ip("web"));
    for lab in [&a, &b] {
        lab.curl("client", "http://web:8080/").unwrap();
        assert_eq!(
            lab.metric(
                "web",
                "muon_tcp_connections_opened_total",
                &[("direction", "inbound")]
            ),
            1.0
        );
    }
    drop(a);
    // b is untouched by a's removal.
    b.curl("client", "http://web:8080/").unwrap();
}

#[test]
fn the_app_runs_unprivileged_with_its_pod_environment() {
    let lab = Lab::up("env", TWO_PODS);
    let out = lab.exec(
        "client",
        &["sh", "-c", "id -u; echo $POD_NAME $POD_NAMESPACE $POD_IP"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let ip = lab.pod_ip("client");
    assert_eq!(text.trim(), format!("1000\nclient default {ip}"));
    // The sidecar runs as the proxy's UID.
    let pid = lab.pod("web")["sidecarPid"].as_i64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(uid.split_whitespace().nth(1) == Some("1337"), "{uid}");
}

#[test]
fn a_bad_topology_is_refused_with_file_line_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, "pods:\n  - name: web\n    replica: 2\n").unwrap();
    let out = muonctl()
        .args(["lab", "up", "--detach", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:3:5: pods[0]: unknown field `replica`",
            file.display()
        )),
        "{err}"
    );
    assert!(
        !Path::new("/run/muon/lab/bad").exists(),
        "nothing may be created for a bad file"
    );
}

#[test]
fn a_pod_that_does_not_start_fails_up_and_leaves_nothing() {
    muon_tests::require_root();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.yaml");
    std::fs::write(
        &file,
        "pods:\n  - name: web\n    labels: {app: web}\n    command: [\"sh\", \"-c\", \"echo boom; exit 3\"]\nservices:\n  - name: web\n    selector: {app: web}\n    ports: [{port: 8080}]\n",
    )
    .unwrap();
    let name = Lab::unique_name("fail");
    let _lab = DownOnDrop(name.clone());
    let out = muonctl()
        .args(["lab", "up", "--detach", "--name", &name, "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the app of pod web exited during start-up") && err.contains("boom"),
        "{err}"
    );
    assert_gone(&name, &[]);
}

#[test]
fn a_second_up_with_the_same_name_is_refused_and_leaves_the_first_lab_alone() {
    muon_tests::require_root();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.yaml");
    std::fs::write(&file, TWO_PODS).unwrap();
    let name = Lab::unique_name("twice");
    let _lab = DownOnDrop(name.clone());
    let up = || {
        muonctl()
            .args(["lab", "up", "--detach", "--name", &name, "-f"])
            .arg(&file)
            .spawn()
            .unwrap()
    };
    // Both at once: exactly one may win the name.
    let (mut a, mut b) = (up(), up());
    let (ra, rb) = (a.wait().unwrap(), b.wait().unwrap());
    assert!(
        ra.success() != rb.success(),
        "exactly one `up` wins: {ra} / {rb}"
    );
    let status = muonctl()
        .args(["lab", "status", &name, "-o", "json"])
        .output()
        .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let sidecars: Vec<&str> = st[0]["pods"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["sidecar"].as_str())
        .collect();
    assert_eq!(
        sidecars.iter().filter(|s| **s == "ready").count(),
        2,
        "the winner's lab is intact: {st}"
    );
    let out = muonctl().args(["lab", "down", &name]).output().unwrap();
    assert!(out.status.success());
}

/// Two pods and a service whose app starts listening only after a minute: `lab up` is then
/// still waiting for it, with every namespace and process made, for as long as a test needs.
const SLOW_POD: &str = r#"
pods:
  - name: client
  - name: web
    labels: {app: web}
    command: ["sh", "-c", "sleep 120; exec python3 -m http.server 8080"]
services:
  - name: web
    selector: {app: web}
    ports: [{port: 8080}]
"#;

/// `muonctl lab up` on [`SLOW_POD`] in a subprocess of this test, killed on drop.
struct SlowUp {
    child: Child,
    _dir: tempfile::TempDir,
}

impl SlowUp {
    fn start(name: &str, detach: bool) -> SlowUp {
        muon_tests::require_root();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("slow.yaml");
        std::fs::write(&file, SLOW_POD).unwrap();
        let mut cmd = muonctl();
        cmd.args(["lab", "up", "--name", name, "--timeout", "300s", "-f"])
            .arg(&file);
        if detach {
            cmd.arg("--detach");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        SlowUp { child, _dir: dir }
    }

    fn pid(&self) -> i64 {
        i64::from(self.child.id())
    }

    fn signal(&self, sig: &str) {
        let st = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success(), "kill -{sig}");
    }

    /// Waits (at most a minute) for `up` to end; returns its exit code and output. (Its
    /// output is small: it fits in the pipes until it is read here.)
    fn finish(mut self) -> (Option<i32>, String) {
        use std::io::Read;
        let status = eventually("lab up to end", Duration::from_secs(60), || {
            self.child.try_wait().unwrap()
        });
        let mut text = String::new();
        if let Some(mut out) = self.child.stdout.take() {
            out.read_to_string(&mut text).unwrap();
        }
        if let Some(mut err) = self.child.stderr.take() {
            err.read_to_string(&mut text).unwrap();
        }
        (status.code(), text)
    }
}

impl Drop for SlowUp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn state_file(name: &str) -> PathBuf {
    Path::new("/run/muon/lab").join(name).join("state.json")
}

/// The pids `up` has recorded so far.
fn recorded_pids(name: &str) -> Vec<i64> {
    let Ok(text) = std::fs::read(state_file(name)) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_slice::<Value>(&text) else {
        return Vec::new();
    };
    v["pods"]
        .as_array()
        .map(|pods| {
            pods.iter()
                .flat_map(|p| [p["appPid"].as_i64(), p["sidecarPid"].as_i64()])
                .flatten()
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `up` has started every process of [`SLOW_POD`] (the control plane, two
/// sidecars, two apps) and is waiting for web to listen.
fn wait_until_every_pod_started(name: &str) -> Vec<i64> {
    eventually("every pod started", Duration::from_secs(60), || {
        let pids = recorded_pids(name);
        (pids.len() == 5).then_some(pids)
    })
}

/// `muonctl lab status [NAME] -o json`.
fn status_json(name: Option<&str>) -> Vec<Value> {
    let mut cmd = muonctl();
    cmd.args(["lab", "status"]);
    if let Some(n) = name {
        cmd.arg(n);
    }
    let out = cmd.args(["-o", "json"]).output().unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn listed(name: &str) -> Option<Value> {
    status_json(None).into_iter().find(|l| l["name"] == name)
}

#[test]
fn a_signal_while_up_is_coming_up_removes_everything_it_made() {
    for (sig, code, detach) in [("TERM", 143, true), ("INT", 130, true), ("HUP", 129, false)] {
        let name = Lab::unique_name(&format!("sig{}", sig.to_lowercase()));
        let _lab = DownOnDrop(name.clone());
        let up = SlowUp::start(&name, detach);
        let pids = wait_until_every_pod_started(&name);
        assert_eq!(
            netns_with_prefix(&format!("muon-{name}.")).len(),
            3,
            "client, web and the control plane"
        );
        // While it comes up, `status` says so.
        let st = listed(&name).unwrap_or_else(|| panic!("{name} not listed while starting"));
        assert_eq!(st["phase"], "starting", "{st}");

        up.signal(sig);
        let (exit, out) = up.finish();
        assert_eq!(exit, Some(code), "SIG{sig}: {out}");
        assert!(
            out.contains(&format!("interrupted by SIG{sig}"))
                && out.contains("everything it created was removed"),
            "SIG{sig}: {out}"
        );
        assert_gone(&name, &pids);
        assert!(
            listed(&name).is_none(),
            "SIG{sig}: lab status still lists {name}"
        );
    }
}

#[test]
fn a_signal_right_after_up_claims_the_name_still_leaves_nothing() {
    // Stopped as early as the test can: at whatever step `up` is then, it removes what it
    // made so far.
    let name = Lab::unique_name("early");
    let _lab = DownOnDrop(name.clone());
    let up = SlowUp::start(&name, true);
    let dir = Path::new("/run/muon/lab").join(&name);
    eventually("the lab's directory", Duration::from_secs(30), || {
        dir.exists().then_some(())
    });
    up.signal("TERM");
    let (exit, out) = up.finish();
    assert_eq!(exit, Some(143), "{out}");
    assert_gone(&name, &[]);
    assert!(listed(&name).is_none(), "lab status still lists {name}");
}

#[test]
fn lab_down_while_up_is_coming_up_stops_that_up() {
    let name = Lab::unique_name("downup");
    let _lab = DownOnDrop(name.clone());
    let up = SlowUp::start(&name, true);
    let pids = wait_until_every_pod_started(&name);
    let out = muonctl().args(["lab", "down", &name]).output().unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    // `down` returns once the `up` it stopped is gone too: nothing can be made after it.
    assert!(!process_alive(up.pid()), "lab up still running after down");
    let (exit, text) = up.finish();
    assert_eq!(exit, Some(143), "{text}");
    assert_gone(&name, &pids);
}

#[test]
fn a_lab_whose_up_was_killed_shows_as_incomplete_until_down() {
    let name = Lab::unique_name("killed");
    let _lab = DownOnDrop(name.clone());
    let mut up = SlowUp::start(&name, true);
    let pids = wait_until_every_pod_started(&name);
    // SIGKILL: no handler runs, the half-made lab stays.
    up.child.kill().unwrap();
    up.child.wait().unwrap();
    drop(up);

    let st = &status_json(Some(&name))[0];
    assert_eq!(st["phase"], "incomplete", "{st}");
    let problem = st["problem"].as_str().unwrap_or_default();
    assert!(
        problem.contains("ended before the lab was ready")
            && problem.contains(&format!("muonctl lab down {name}")),
        "{st}"
    );
    assert_eq!(
        st["namespaces"].as_array().map(Vec::len),
        Some(4),
        "the bridge's and three pods' namespaces: {st}"
    );
    assert_eq!(
        listed(&name).as_ref().map(|l| &l["phase"]),
        Some(&st["phase"])
    );
    let table = muonctl().args(["lab", "status", &name]).output().unwrap();
    let table = output_text(&table);
    assert!(
        table
            .lines()
            .next()
            .is_some_and(|l| l.contains("INCOMPLETE")),
        "{table}"
    );

    let out = muonctl().args(["lab", "down", &name]).output().unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert_gone(&name, &pids);
    assert!(listed(&name).is_none());
}

#[test]
fn a_lab_directory_without_a_state_file_is_incomplete() {
    // What an `up` killed between claiming the name and writing its state leaves.
    muon_tests::require_root();
    let name = Lab::unique_name("nostate");
    let _lab = DownOnDrop(name.clone());
    let dir = Path::new("/run/muon/lab").join(&name);
    std::fs::create_dir_all(&dir).unwrap();
    // Older than an `up` at work would be.
    let st = std::process::Command::new("touch")
        .args(["-d", "1 minute ago"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(st.success());
    let st = listed(&name).unwrap_or_else(|| panic!("{name} not listed"));
    assert_eq!(st["phase"], "incomplete", "{st}");
    assert!(
        st["problem"]
            .as_str()
            .is_some_and(|p| p.contains(&format!("muonctl lab down {name}"))),
        "{st}"
    );
    let out = muonctl().args(["lab", "down", &name]).output().unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(!dir.exists());
}
