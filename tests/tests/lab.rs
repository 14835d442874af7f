//! The lab itself: topology errors, `down` leaving nothing behind, two labs side by side.

use muon_tests::{eventually, muonctl, netns_with_prefix, process_alive, Lab};
use std::path::Path;
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
