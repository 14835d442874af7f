//! Authorization policies end to end: AuthorizationPolicy and PeerAuthentication applied
//! through `muonctl`, pushed by the control plane, enforced by the server-side sidecar on
//! HTTP requests (403 naming the policy) and TCP connections (closed, open ones too), and
//! lifted again when the policy is deleted.
//!
//! Identity rules (principals, namespaces) are unit-tested in `muon_proxy::policy`; here a
//! principals-only ALLOW is shown to deny a caller that has no identity (plaintext, from a
//! pod without a sidecar).

use muon_tests::{eventually, metric_sum, output_text, Lab};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(15);

fn reflect(port: u16) -> String {
    format!(
        r#"["{}", "reflect", "--port", "{port}"]"#,
        muon_tests::demo_shop().display()
    )
}

/// A test server from `tests/clients` serving on `port`.
fn serve(script: &str, port: u16) -> String {
    format!(
        r#"["{}", "{}", "serve", "--port", "{port}"]"#,
        muon_tests::python(),
        muon_tests::clients().join(script).display()
    )
}

fn policy_lab() -> Lab {
    Lab::up(
        "policy",
        &format!(
            r#"
pods:
  - name: client
  - name: outsider
    sidecar: false
    command: ["sleep", "infinity"]
  - name: web
    labels: {{app: web}}
    command: {web}
  - name: smtp
    labels: {{app: smtp}}
    command: {smtp}
  - name: grpc
    labels: {{app: grpc}}
    command: {grpc}
services:
  - name: web
    selector: {{app: web}}
    ports: [{{port: 8080, protocol: http}}]
  - name: smtp
    selector: {{app: smtp}}
    ports: [{{port: 2525, protocol: tcp}}]
  - name: grpc
    selector: {{app: grpc}}
    ports: [{{port: 9090, protocol: grpc}}]
"#,
            web = reflect(8080),
            smtp = serve("banner.py", 2525),
            grpc = serve("grpc_echo.py", 9090),
        ),
    )
}

fn curl_i(lab: &Lab, pod: &str, args: &[&str]) -> (u16, BTreeMap<String, String>, String) {
    lab.curl_i(pod, args)
}

fn status(lab: &Lab, pod: &str, args: &[&str]) -> u16 {
    curl_i(lab, pod, args).0
}

#[track_caller]
fn apply(lab: &Lab, yaml: &str) {
    let out = lab.ctl_with_file(&["apply"], yaml);
    assert!(out.status.success(), "apply: {}", output_text(&out));
}

#[track_caller]
fn ctl_ok(lab: &Lab, args: &[&str]) -> String {
    let out = lab.ctl(args);
    assert!(out.status.success(), "{args:?}: {}", output_text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The access events of `pod`'s sidecar with `message` ("request" or "connection closed").
fn events(lab: &Lab, pod: &str, message: &str) -> Vec<Value> {
    lab.access_log(pod)
        .into_iter()
        .filter(|e| e["message"] == message)
        .collect()
}

const DENY_ADMIN: &str = r#"
apiVersion: muon.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-admin}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
    - from: [{source: {principals: ["cluster.local/ns/default/sa/client"]}}]
      to: [{operation: {paths: ["/admin/*"]}}]
"#;

const ALLOW_GET: &str = r#"
apiVersion: muon.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-get}
spec:
  selector: {matchLabels: {app: web}}
  rules:
    - to: [{operation: {ports: ["8080"], methods: ["GET", "HEAD"]}}]
"#;

#[test]
fn http_requests_are_denied_by_path_allowed_by_port_and_method_and_restored_on_delete() {
    let lab = policy_lab();
    let admin = "http://web:8080/admin/users";
    assert_eq!(status(&lab, "client", &[admin]), 200, "before any policy");

    // A DENY policy on the client's identity and a path: 403 naming the policy, marked as
    // the proxy's own answer; other paths pass.
    apply(&lab, DENY_ADMIN);
    eventually("the DENY policy to apply", WAIT, || {
        (status(&lab, "client", &[admin]) == 403).then_some(())
    });
    let (code, headers, body) = curl_i(&lab, "client", &[admin]);
    assert_eq!(code, 403);
    assert_eq!(
        body.trim(),
        "RBAC: access denied by policy default/deny-admin"
    );
    assert_eq!(headers["x-muon-error"], "rbac-denied");
    assert_eq!(status(&lab, "client", &["http://web:8080/public"]), 200);
    // The query is not part of the path a policy matches.
    assert_eq!(
        status(&lab, "client", &["http://web:8080/admin/x?y=1"]),
        403
    );

    // The server side's access log names the decision and the policy.
    let denied = eventually("the denied request's access event", WAIT, || {
        events(&lab, "web", "request")
            .into_iter()
            .find(|e| e["path"] == "/admin/users" && e["status"] == 403)
    });
    assert_eq!(denied["direction"], "inbound", "{denied}");
    assert_eq!(denied["authz"], "deny", "{denied}");
    assert_eq!(denied["policy"], "default/deny-admin", "{denied}");
    assert_eq!(denied["error"], "rbac-denied", "{denied}");
    // ... and both identities: the policy matched the caller's, which mutual TLS proved.
    assert_eq!(
        denied["src_identity"], "spiffe://cluster.local/ns/default/sa/client",
        "{denied}"
    );
    assert_eq!(
        denied["dst_identity"], "spiffe://cluster.local/ns/default/sa/web",
        "{denied}"
    );
    let allowed = events(&lab, "web", "request")
        .into_iter()
        .find(|e| e["path"] == "/public")
        .expect("the allowed request's event");
    assert_eq!(
        (allowed["authz"].as_str(), allowed["policy"].as_str()),
        (Some("allow"), Some("")),
        "only a DENY policy applies: allowed by none: {allowed}"
    );
    let m = lab.metrics("web");
    assert!(
        metric_sum(
            &m,
            "muon_authz_decisions_total",
            &[("decision", "deny"), ("policy", "default/deny-admin")]
        ) >= 2.0,
        "{m}"
    );

    // `muonctl get` shows it.
    let listed = ctl_ok(&lab, &["get", "authorizationpolicies"]);
    assert!(
        listed.contains("deny-admin") && listed.contains("DENY"),
        "{listed}"
    );
    let yaml = ctl_ok(&lab, &["get", "policies", "deny-admin", "-o", "yaml"]);
    assert!(yaml.contains("/admin/*"), "{yaml}");

    // Deleted: the path is reachable again.
    ctl_ok(&lab, &["delete", "authorizationpolicy", "deny-admin"]);
    eventually("the deletion to apply", WAIT, || {
        (status(&lab, "client", &[admin]) == 200).then_some(())
    });

    // An ALLOW policy for GET and HEAD on 8080: those pass, the rest is denied, and the
    // answer names the policy that did not allow it.
    apply(&lab, ALLOW_GET);
    let post = ["-X", "POST", "-d", "x", "http://web:8080/orders"];
    eventually("the ALLOW policy to apply", WAIT, || {
        (status(&lab, "client", &post) == 403).then_some(())
    });
    let (_, headers, body) = curl_i(&lab, "client", &post);
    assert_eq!(
        body.trim(),
        "RBAC: access denied: not allowed by policy default/allow-get"
    );
    assert_eq!(headers["x-muon-error"], "rbac-denied");
    assert_eq!(status(&lab, "client", &["http://web:8080/orders"]), 200);
    let get = eventually("the allowed GET's access event", WAIT, || {
        events(&lab, "web", "request")
            .into_iter()
            .find(|e| e["path"] == "/orders" && e["method"] == "GET")
    });
    assert_eq!(
        (get["authz"].as_str(), get["policy"].as_str()),
        (Some("allow"), Some("default/allow-get")),
        "{get}"
    );

    let out = lab.ctl_with_file(&["delete"], ALLOW_GET);
    assert!(out.status.success(), "delete -f: {}", output_text(&out));
    eventually("the ALLOW policy's deletion to apply", WAIT, || {
        (status(&lab, "client", &post) == 200).then_some(())
    });

    // A gRPC call gets PERMISSION_DENIED, with the message naming the policy; another
    // method of the same service passes.
    apply(
        &lab,
        r#"
apiVersion: muon.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-unary}
spec:
  selector: {matchLabels: {app: grpc}}
  action: DENY
  rules:
    - to: [{operation: {methods: ["POST"], paths: ["/muon.test.Echo/Unary"]}}]
"#,
    );
    let call = |method: &str| {
        lab.client_json(
            "client",
            "grpc_echo.py",
            &[
                "call",
                "--target",
                "grpc:9090",
                "status",
                "--method",
                method,
            ],
        )
    };
    let denied = eventually("the gRPC DENY policy to apply", WAIT, || {
        let r = call("Unary");
        (r["code"] == "PERMISSION_DENIED").then_some(r)
    });
    assert_eq!(
        denied["details"], "RBAC: access denied by policy default/deny-unary",
        "{denied}"
    );
    let other = call("Headers");
    assert_eq!(other["code"], "OK", "{other}");
    let e = eventually("the denied call's access event", WAIT, || {
        events(&lab, "grpc", "request")
            .into_iter()
            .find(|e| e["path"] == "/muon.test.Echo/Unary" && e["authz"] == "deny")
    });
    assert_eq!(e["grpc_status"], "7", "{e}");
    assert_eq!(e["policy"], "default/deny-unary", "{e}");
}

/// `banner.py call` from `pod` to smtp: Ok(banner) or Err(what went wrong).
fn smtp_call(lab: &Lab, pod: &str) -> Result<String, String> {
    let py = muon_tests::python();
    let script = muon_tests::clients()
        .join("banner.py")
        .display()
        .to_string();
    let out = lab.exec_as(
        pod,
        Some(0),
        &[
            &py,
            &script,
            "call",
            "--host",
            "smtp",
            "--port",
            "2525",
            "--timeout",
            "5",
        ],
    );
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        false => Err(output_text(&out)),
    }
}

/// A TCP connection from `pod` to smtp held open by `tcp_hold.py`, once it is established.
struct Held {
    child: std::process::Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Held {
    fn open(lab: &Lab, pod: &str) -> Held {
        let py = muon_tests::python();
        let script = muon_tests::clients().join("tcp_hold.py");
        let mut child = Command::new(muon_tests::bin_dir().join("muonctl"))
            .args(["lab", "exec", &lab.name, pod, "--user", "0", "--"])
            .arg(&py)
            .arg(&script)
            .args(["--host", "smtp", "--port", "2525", "--timeout", "40"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tcp_hold.py");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        assert!(first.contains("\"connected\": true"), "tcp_hold: {first:?}");
        Held { child, lines }
    }

    /// Waits (at most `within`) for the connection to be closed; its report.
    fn closed(mut self, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                let rest: Vec<String> = self.lines.by_ref().map_while(Result::ok).collect();
                assert!(status.success(), "tcp_hold failed: {rest:?}");
                let last = rest.iter().rfind(|l| l.starts_with('{')).expect("report");
                return serde_json::from_str(last).expect("report json");
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("the open connection was not closed within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

const DENY_SMTP: &str = r#"
apiVersion: muon.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-smtp}
spec:
  selector: {matchLabels: {app: smtp}}
  action: DENY
  rules:
    - to: [{operation: {ports: [2525]}}]
"#;

#[test]
fn a_tcp_deny_closes_new_connections_and_open_ones_and_a_delete_restores_them() {
    let lab = policy_lab();
    smtp_call(&lab, "client").expect("smtp before any policy");
    let held = Held::open(&lab, "client");
    // Let it talk a little first: the connection is in use when the policy comes.
    std::thread::sleep(Duration::from_millis(600));

    apply(&lab, DENY_SMTP);
    let applied = Instant::now();
    let report = held.closed(Duration::from_secs(10));
    eprintln!(
        "the open connection was closed {:?} after the apply returned ({report})",
        applied.elapsed()
    );
    assert_eq!(report["closed"], true, "{report}");
    assert!(
        report["exchanged"].as_u64() > Some(0),
        "it was in use: {report}"
    );

    // New connections are closed before the app is reached.
    let err = smtp_call(&lab, "client").expect_err("a denied connection");
    assert!(err.contains("connection closed before the banner"), "{err}");

    let denied: Vec<Value> = eventually("both denials in the access log", WAIT, || {
        let d: Vec<Value> = events(&lab, "smtp", "connection closed")
            .into_iter()
            .filter(|e| e["direction"] == "inbound" && e["outcome"] == "denied")
            .collect();
        (d.len() >= 2).then_some(d)
    });
    for e in &denied {
        assert_eq!(e["authz"], "deny", "{e}");
        assert_eq!(e["policy"], "default/deny-smtp", "{e}");
    }
    // The one that was open had moved bytes; the new one reached no app.
    assert!(denied
        .iter()
        .any(|e| e["bytes_received"].as_u64() > Some(0)));
    assert!(denied
        .iter()
        .any(|e| e["endpoint"] == "" && e["bytes_received"] == 0));
    let m = lab.metrics("smtp");
    assert!(
        metric_sum(
            &m,
            "muon_tcp_connections_closed_total",
            &[("direction", "inbound"), ("outcome", "denied")]
        ) >= 2.0,
        "{m}"
    );
    assert!(
        metric_sum(
            &m,
            "muon_authz_decisions_total",
            &[("decision", "deny"), ("policy", "default/deny-smtp")]
        ) >= 2.0,
        "{m}"
    );

    ctl_ok(&lab, &["delete", "authorizationpolicy", "deny-smtp"]);
    eventually("the deletion to apply", WAIT, || {
        smtp_call(&lab, "client").ok()
    });
}

#[test]
fn a_principals_only_allow_denies_a_caller_without_identity_and_peer_authentication_shows_its_mode()
{
    let lab = policy_lab();
    let web_ip = lab.pod_ip("web");
    let direct = format!("http://{web_ip}:8080/hello");
    assert_eq!(
        status(&lab, "outsider", &[&direct]),
        200,
        "a pod outside the mesh reaches web before any policy"
    );

    apply(
        &lab,
        r#"
apiVersion: muon.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: client-only}
spec:
  selector: {matchLabels: {app: web}}
  rules:
    - from: [{source: {principals: ["cluster.local/ns/default/sa/client"]}}]
"#,
    );
    eventually("the ALLOW policy to apply", WAIT, || {
        (status(&lab, "outsider", &[&direct]) == 403).then_some(())
    });
    let (_, _, body) = curl_i(&lab, "outsider", &[&direct]);
    assert_eq!(
        body.trim(),
        "RBAC: access denied: not allowed by policy default/client-only"
    );
    // The meshed client is allowed: its sidecar speaks mutual TLS with web's, which so
    // learns its identity.
    assert_eq!(status(&lab, "client", &["http://web:8080/hello"]), 200);
    let mtls = metric_sum(
        &lab.metrics("web"),
        "muon_tls_connections_total",
        &[("direction", "inbound"), ("result", "ok")],
    );
    assert!(
        mtls >= 1.0,
        "the allowed request came over mutual TLS: {mtls}"
    );

    // PeerAuthentication: stored, listed, and the mode the sidecar computes per port shows
    // in its /config_dump.
    apply(
        &lab,
        r#"
apiVersion: muon.io/v1alpha1
kind: PeerAuthentication
metadata: {name: web-strict}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: STRICT}
  portLevelMtls: {"8080": {mode: PERMISSIVE}}
"#,
    );
    let listed = ctl_ok(&lab, &["get", "peerauthentications"]);
    assert!(
        listed.contains("web-strict") && listed.contains("8080:PERMISSIVE"),
        "{listed}"
    );
    let mtls = eventually("the mode in web's /config_dump", WAIT, || {
        let dump: Value = serde_json::from_str(&ctl_ok(&lab, &["config-dump", "web"])).ok()?;
        let mtls = dump["table"]["authorization"]["mtls"].clone();
        (mtls["default"] == "STRICT").then_some(mtls)
    });
    assert_eq!(mtls["ports"]["8080"], "PERMISSIVE", "{mtls}");
    // Not selected: the client's sidecar keeps the default.
    let dump: Value = serde_json::from_str(&ctl_ok(&lab, &["config-dump", "client"])).unwrap();
    assert_eq!(
        dump["table"]["authorization"]["mtls"]["default"],
        "PERMISSIVE"
    );

    // A bad policy is refused at apply time with the field and the reason.
    let out = lab.ctl_with_file(
        &["apply"],
        r#"
apiVersion: muon.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: bad}
spec:
  rules:
    - from: [{source: {principals: ["orders"]}}]
      to: [{operation: {methods: ["get"], paths: ["/a*b"]}}]
"#,
    );
    assert!(!out.status.success());
    let text = output_text(&out);
    for want in [
        "AuthorizationPolicy default/bad: spec.rules[0].from[0].source.principals[0]",
        "spec.rules[0].to[0].operation.methods[0]",
        "spec.rules[0].to[0].operation.paths[0]",
    ] {
        assert!(text.contains(want), "{want} missing from {text}");
    }
}
