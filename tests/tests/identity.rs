//! Identity end to end (issue 9): sidecars certified by the lab's control plane, mutual TLS
//! between them (nothing of the apps on the wire), endpoints that must present the identity
//! the control plane gave them, certificates renewed under load, and a control plane that
//! lets no app in.

use muon_tests::{eventually, metric_sum, output_text, python, Lab};
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn reflect(port: u16) -> String {
    format!(
        r#"["{}", "reflect", "--port", "{port}"]"#,
        muon_tests::demo_shop().display()
    )
}

/// The lab's bridge namespace, where every pod's traffic crosses.
fn bridge_netns(lab: &Lab) -> String {
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("/run/muon/lab/{}/state.json", lab.name)).unwrap(),
    )
    .unwrap();
    state["bridgeNetns"].as_str().unwrap().to_string()
}

/// A packet capture on the lab's bridge, stopped (by pid) when dropped.
struct Capture {
    child: std::process::Child,
    file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Capture {
    fn start(lab: &Lab) -> Capture {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bridge.pcap");
        let log = dir.path().join("tcpdump.log");
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &bridge_netns(lab),
                "tcpdump",
                // As root (writing into this test's directory), on every port of the
                // bridge; no filter expression (with `-w`, a `tcp` filter on the cooked
                // link type caught nothing here).
                "-Z",
                "root",
                "--immediate-mode",
                "-i",
                "any",
                "-U",
                "-s",
                "0",
                "-w",
            ])
            .arg(&file)
            .stdout(Stdio::null())
            // Into a file, not a pipe: a pipe nobody reads any more would kill tcpdump
            // (SIGPIPE) at its next message.
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("run tcpdump (cargo xtask test installs it)");
        // tcpdump says "listening on any" once it captures.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            if said.contains("listening on") {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("tcpdump exited ({status}): {said}");
            }
            assert!(Instant::now() < deadline, "tcpdump did not start: {said}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Capture {
            child,
            file,
            _dir: dir,
        }
    }

    /// Stops the capture and returns what it caught.
    fn stop(mut self) -> Vec<u8> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        // Packets still on their way through the bridge.
        std::thread::sleep(Duration::from_millis(500));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let _ = self.child.wait();
        std::fs::read(&self.file).unwrap()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A metric's sum, 0 while the metric does not exist yet (a family appears with its first
/// label set).
fn metric_or_zero(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    match text.contains(name) {
        true => metric_sum(text, name, labels),
        false => 0.0,
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn between_sidecars_only_mutual_tls_crosses_the_wire() {
    let lab = Lab::up(
        "mtls",
        &format!(
            r#"
pods:
  - name: client
  - name: outsider
    sidecar: false
  - name: web
    labels: {{app: web}}
    command: {web}
  - name: raw
    labels: {{app: raw}}
    command: {raw}
services:
  - name: web
    selector: {{app: web}}
    ports: [{{port: 8080, protocol: http}}]
  - name: raw
    selector: {{app: raw}}
    ports: [{{port: 9090, protocol: tcp}}]
"#,
            web = reflect(8080),
            raw = reflect(9090),
        ),
    );
    // Every sidecar has its identity.
    let certs: Value = serde_json::from_str(
        &lab.curl_as("client", Some(0), "http://127.0.0.1:15000/certs")
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        certs["identity"], "spiffe://cluster.local/ns/default/sa/client",
        "{certs}"
    );
    assert!(
        certs["trustBundle"]
            .as_array()
            .is_some_and(|b| !b.is_empty()),
        "{certs}"
    );

    let capture = Capture::start(&lab);
    // A positive control first: a pod without a sidecar talks plaintext to web
    // (PERMISSIVE), until the capture has seen it (tcpdump may say "listening" a moment
    // before it catches packets).
    let web_ip = lab.pod_ip("web");
    eventually(
        "the capture to see plaintext",
        Duration::from_secs(15),
        || {
            let (_, err, ok) = lab.curl_with(
                "outsider",
                &[&format!("http://{web_ip}:8080/plain-path-7f3a")],
            );
            assert!(ok, "{err}");
            std::thread::sleep(Duration::from_millis(200));
            contains(
                &std::fs::read(&capture.file).unwrap_or_default(),
                "plain-path-7f3a",
            )
            .then_some(())
        },
    );
    // HTTP (pooled HTTP/2 inside mutual TLS) and opaque TCP (inside mutual TLS).
    let (out, err, ok) = lab.curl_with(
        "client",
        &[
            "-H",
            "x-secret: mesh-header-7f3a",
            "http://web:8080/mesh-path-7f3a",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("mesh-header-7f3a"), "{out}");
    let (out, err, ok) = lab.curl_with("client", &["http://raw:9090/opaque-path-7f3a"]);
    assert!(ok, "{err}");
    assert!(out.contains("opaque-path-7f3a"), "{out}");
    // ... and one more after the mesh's traffic: the capture was live all along.
    let (_, err, ok) = lab.curl_with(
        "outsider",
        &[&format!("http://{web_ip}:8080/plain-end-7f3a")],
    );
    assert!(ok, "{err}");
    let pcap = capture.stop();
    assert!(
        contains(&pcap, "plain-end-7f3a"),
        "the capture stopped seeing plaintext"
    );
    for secret in ["mesh-header-7f3a", "mesh-path-7f3a", "opaque-path-7f3a"] {
        assert!(
            !contains(&pcap, secret),
            "{secret} crossed the bridge in plaintext"
        );
    }
    for (pod, direction) in [
        ("client", "outbound"),
        ("web", "inbound"),
        ("raw", "inbound"),
    ] {
        let ok = metric_sum(
            &lab.metrics(pod),
            "muon_tls_connections_total",
            &[("direction", direction), ("result", "ok")],
        );
        assert!(ok >= 1.0, "{pod}: {ok} mutual TLS connections {direction}");
    }
}

#[test]
fn an_endpoint_that_presents_another_identity_is_refused() {
    let lab = Lab::up(
        "wrongid",
        &format!(
            r#"
pods:
  - name: client
  - name: web
    labels: {{app: web}}
    command: {web}
services:
  - name: web
    selector: {{app: web}}
    ports: [{{port: 8080, protocol: http}}]
  - name: pay
    selector: {{app: pay}}
    ports: [{{port: 8080, protocol: http}}]
"#,
            web = reflect(8080),
        ),
    );
    // The control plane says pay's endpoint is the payments service account, at web's
    // address: web's sidecar presents web's certificate, and the client's sidecar refuses it.
    let web_ip = lab.pod_ip("web");
    let out = lab.ctl_with_file(
        &["apply"],
        &format!(
            "apiVersion: muon.io/v1alpha1\nkind: Workload\nmetadata: {{name: pay-0, labels: {{app: pay}}}}\n\
             spec: {{address: {web_ip}, serviceAccount: payments, meshed: true}}\n"
        ),
    );
    assert!(out.status.success(), "{}", output_text(&out));
    eventually(
        "the pay endpoint to reach the client",
        Duration::from_secs(15),
        || {
            let (_, _, ok) = lab.curl_with(
                "client",
                &["-o", "/dev/null", "-w", "%{http_code}", "http://pay:8080/"],
            );
            let refused = metric_or_zero(
                &lab.metrics("client"),
                "muon_tls_connections_total",
                &[("direction", "outbound"), ("result", "wrong-identity")],
            );
            (refused >= 1.0).then_some(ok)
        },
    );
    let (out, _, _) = lab.curl_with(
        "client",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://pay:8080/",
        ],
    );
    assert_eq!(out, "502", "a request to the impostor got {out}");
    // web itself is fine.
    let (_, err, ok) = lab.curl_with("client", &["http://web:8080/"]);
    assert!(ok, "{err}");
}

#[test]
fn an_app_cannot_use_the_management_api() {
    let lab = Lab::up(
        "noadmin",
        r#"
pods:
  - name: client
services: []
"#,
    );
    let py = python();
    // The copy the app's user can read (a checkout may be private to root).
    let script = muon_tests::clients().join("grpc_reflect.py");
    let script = script.to_str().unwrap();
    let cp = lab.pod("muon-control")["ip"].as_str().unwrap().to_string();
    let addr = format!("{cp}:15010");
    let bundle = format!("/run/muon/lab/{}/control/ca/trust-bundle.pem", lab.name);
    // As the app's user, over TLS without a client certificate: no management call, no
    // join token, and no discovery stream (no pod's configuration).
    for method in [
        "muon.v1.Management/List",
        "muon.v1.Management/Apply",
        "muon.v1.Identity/CreateJoinToken",
        "muon.v1.Discovery/Stream",
    ] {
        let out = lab.exec(
            "client",
            &[&py, script, "--ca", &bundle, &addr, "--call", method],
        );
        let text = output_text(&out);
        assert!(text.contains("ERROR UNAUTHENTICATED"), "{method}: {text}");
    }
    // Plaintext is not served at all.
    let out = lab.exec(
        "client",
        &[&py, script, &addr, "--call", "muon.v1.Management/List"],
    );
    assert!(!output_text(&out).contains("OK"), "{}", output_text(&out));
    // The administrator (muonctl --lab) still can.
    let out = lab.ctl(&["get", "workloads"]);
    assert!(out.status.success(), "{}", output_text(&out));
}

/// client and web, their sidecars asking for one-minute certificates (renewed every 30 s
/// or so).
fn short_lived_lab(tag: &str) -> Lab {
    Lab::up(
        tag,
        &format!(
            r#"
pods:
  - name: client
    proxyArgs: ["--cert-ttl", "1m"]
  - name: web
    labels: {{app: web}}
    command: {web}
    proxyArgs: ["--cert-ttl", "1m"]
services:
  - name: web
    selector: {{app: web}}
    ports: [{{port: 8080, protocol: http}}]
"#,
            web = reflect(8080),
        ),
    )
}

/// A Python client that sends GETs to web:8080 for `seconds` or until the file `stop`
/// exists, on fresh connections (a new handshake each) and on one kept-alive connection, and
/// prints how many were answered 200 and how many failed.
fn steady_load(seconds: u32, stop: &str) -> String {
    format!(
        r#"
import http.client, os, sys, time
end = time.time() + {seconds}
ok = bad = 0
keep = http.client.HTTPConnection("web", 8080, timeout=10)
while time.time() < end and not os.path.exists("{stop}"):
    for conn in (keep, http.client.HTTPConnection("web", 8080, timeout=10)):
        try:
            conn.request("GET", "/load")
            r = conn.getresponse(); r.read()
            ok += r.status == 200; bad += r.status != 200
        except Exception as e:
            bad += 1
            print("failed:", e, file=sys.stderr)
            keep = http.client.HTTPConnection("web", 8080, timeout=10)
    time.sleep(0.05)
print(ok, bad)
"#
    )
}

#[test]
fn certificates_renew_under_load_without_a_failed_request_and_the_root_survives_a_restart() {
    let lab = short_lived_lab("renew");
    let serial = |pod: &str| -> String {
        let certs: Value = serde_json::from_str(
            &lab.curl_as(pod, Some(0), "http://127.0.0.1:15000/certs")
                .unwrap(),
        )
        .unwrap();
        certs["serial"].as_str().unwrap_or_default().to_string()
    };
    let first = (serial("client"), serial("web"));
    // Requests on fresh connections (new TLS handshakes) and on one kept-alive connection,
    // for as long as a renewal takes (about half of 1 minute).
    let script = steady_load(45, "/nonexistent");
    let out = lab.exec("client", &["python3", "-c", &script]);
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (ok, bad): (u64, u64) = {
        let mut it = text.split_whitespace().map(|n| n.parse().unwrap());
        (it.next().unwrap(), it.next().unwrap())
    };
    eprintln!("{ok} requests answered, {bad} failed while certificates renewed");
    assert!(
        ok > 100 && bad == 0,
        "{ok} ok, {bad} failed: {}",
        output_text(&out)
    );
    let renewed = (serial("client"), serial("web"));
    assert!(
        renewed.0 != first.0 && renewed.1 != first.1,
        "not renewed: {first:?} then {renewed:?}"
    );
    for pod in ["client", "web"] {
        let issued = metric_sum(
            &lab.metrics(pod),
            "muon_identity_certificates_total",
            &[("result", "issued")],
        );
        assert!(issued >= 2.0, "{pod}: {issued} certificates");
    }

    // The control plane's root is the same after a restart, and the mesh goes on.
    let bundle = format!("/run/muon/lab/{}/control/ca/trust-bundle.pem", lab.name);
    let before = std::fs::read(&bundle).unwrap();
    lab.kill9("muon-control", false);
    lab.restart("muon-control", false);
    assert_eq!(std::fs::read(&bundle).unwrap(), before, "the root changed");
    let (_, err, ok) = lab.curl_with("client", &["http://web:8080/after-restart"]);
    assert!(ok, "{err}");
}

/// Test certificates for `openssl s_client`, made with the openssl CLI: a CA of its own,
/// and leaves signed by it or by the lab's root. World-readable (test material), so that a
/// pod's app user can read them.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Pki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    #[track_caller]
    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            output_text(&out)
        );
    }

    /// A self-signed CA `name` (`name.pem`, `name.key`) with common name `cn`.
    fn ca(&self, name: &str, cn: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-subj",
            &format!("/CN={cn}"),
            "-days",
            "30",
        ]);
    }

    /// A leaf `name` (`name.pem`, `name.key`) for SPIFFE id `id`, signed by `ca` (cert, key),
    /// valid for `days` (negative: expired since).
    fn leaf(&self, name: &str, id: &str, ca: (&str, &str), days: i32) {
        let ext = self.path(&format!("{name}.ext"));
        std::fs::write(
            &ext,
            format!(
                "subjectAltName=critical,{id}\nkeyUsage=critical,digitalSignature\n\
                 extendedKeyUsage=clientAuth,serverAuth\nbasicConstraints=critical,CA:FALSE\n"
            )
            .replace("critical,spiffe", "critical,URI:spiffe"),
        )
        .unwrap();
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            "/O=test",
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            ca.0,
            "-CAkey",
            ca.1,
            "-CAcreateserial",
            "-days",
            &days.to_string(),
            "-extfile",
            &ext,
            "-out",
            &format!("{name}.pem"),
        ]);
        for f in [format!("{name}.pem"), format!("{name}.key")] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(self.path(&f), std::fs::Permissions::from_mode(0o644))
                .unwrap();
        }
    }
}

/// `openssl s_client` from `pod` to `addr` sending one HTTP/1.1 GET of `path` (ALPN `alpn`
/// when given, the client certificate `cert` (PEM and key) when given); what it printed.
fn s_client(
    lab: &Lab,
    pod: &str,
    addr: &str,
    alpn: Option<&str>,
    cert: Option<(&str, &str)>,
    path: &str,
) -> String {
    let mut cmd = format!("openssl s_client -connect {addr} -ign_eof -servername web");
    if let Some(alpn) = alpn {
        cmd += &format!(" -alpn {alpn}");
    }
    if let Some((c, k)) = cert {
        cmd += &format!(" -cert {c} -key {k}");
    }
    let script = format!(
        "printf 'GET {path} HTTP/1.1\\r\\nHost: web\\r\\nConnection: close\\r\\n\\r\\n' \
         | timeout 10 {cmd} 2>&1"
    );
    output_text(&lab.exec(pod, &["sh", "-c", &script]))
}

#[test]
fn strict_mode_refuses_plaintext_and_every_tls_peer_without_a_valid_mesh_certificate() {
    let lab = Lab::up(
        "strict",
        &format!(
            r#"
pods:
  - name: client
  - name: outsider
    sidecar: false
  - name: web
    labels: {{app: web}}
    command: {web}
services:
  - name: web
    selector: {{app: web}}
    ports: [{{port: 8080, protocol: http}}]
"#,
            web = reflect(8080),
        ),
    );
    let web = format!("{}:8080", lab.pod_ip("web"));
    let direct = format!("http://{web}/plain");
    let (_, err, ok) = lab.curl_with("outsider", &[&direct]);
    assert!(
        ok,
        "PERMISSIVE (the default) serves a pod outside the mesh: {err}"
    );

    // Certificates for openssl: one from the lab's own root (valid), one from it but
    // expired, one from a CA that is not the mesh's.
    let ca_dir = format!("/run/muon/lab/{}/control/ca", lab.name);
    let root = (
        format!("{ca_dir}/root-cert.pem"),
        format!("{ca_dir}/root-key.pem"),
    );
    let pki = Pki::new();
    let id = "spiffe://cluster.local/ns/default/sa/tester";
    pki.leaf("good", id, (&root.0, &root.1), 1);
    pki.leaf("expired", id, (&root.0, &root.1), -1);
    pki.ca("foreign-ca", "not the mesh");
    let foreign_ca = (pki.path("foreign-ca.pem"), pki.path("foreign-ca.key"));
    pki.leaf("foreign", id, (&foreign_ca.0, &foreign_ca.1), 1);
    let good = (pki.path("good.pem"), pki.path("good.key"));
    let expired = (pki.path("expired.pem"), pki.path("expired.key"));
    let foreign = (pki.path("foreign.pem"), pki.path("foreign.key"));

    // A positive control: openssl with a valid mesh certificate speaks mutual TLS to web's
    // sidecar (ALPN muon/tcp: the bytes inside go to the app as they are).
    let ok_call = |c: &(String, String)| {
        s_client(
            &lab,
            "outsider",
            &web,
            Some("muon/tcp"),
            Some((&c.0, &c.1)),
            "/tls-ok",
        )
    };
    let out = ok_call(&good);
    assert!(
        out.contains("HTTP/1.1 200"),
        "a valid mesh certificate: {out}"
    );

    let applied = lab.ctl_with_file(
        &["apply"],
        r#"
apiVersion: muon.io/v1alpha1
kind: PeerAuthentication
metadata: {name: web-strict}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: STRICT}
"#,
    );
    assert!(applied.status.success(), "{}", output_text(&applied));
    eventually(
        "STRICT to refuse the outsider's plaintext",
        Duration::from_secs(15),
        || (!lab.curl_with("outsider", &[&direct]).2).then_some(()),
    );
    // The meshed client still gets through, over mutual TLS, and both sides log both ids.
    let (out, err, ok) = lab.curl_with("client", &["http://web:8080/meshed"]);
    assert!(ok && out.contains("/meshed"), "{out} {err}");
    let client_id = "spiffe://cluster.local/ns/default/sa/client";
    let web_id = "spiffe://cluster.local/ns/default/sa/web";
    for (pod, direction) in [("client", "outbound"), ("web", "inbound")] {
        let event = eventually("the request's access event", Duration::from_secs(5), || {
            lab.access_log(pod).into_iter().find(|e| {
                e["message"] == "request" && e["path"] == "/meshed" && e["direction"] == direction
            })
        });
        assert_eq!(event["src_identity"], client_id, "{pod}: {event}");
        assert_eq!(event["dst_identity"], web_id, "{pod}: {event}");
        assert_eq!(event["tls_version"], "TLSv1.3", "{pod}: {event}");
        assert!(
            event["tls_cipher"]
                .as_str()
                .is_some_and(|c| c.starts_with("TLS13_")),
            "{pod}: {event}"
        );
        assert_eq!(event["status"], 200, "{pod}: {event}");
    }
    let refused = eventually("the refusal's access event", Duration::from_secs(5), || {
        lab.access_log("web")
            .into_iter()
            .find(|e| e["message"] == "connection closed" && e["outcome"] == "mtls_required")
    });
    assert_eq!(refused["direction"], "inbound", "{refused}");

    // TLS that is not the mesh's (no ALPN), and mesh TLS without a client certificate.
    let out = s_client(&lab, "outsider", &web, None, None, "/tls-no-alpn");
    assert!(
        !out.contains("HTTP/1.1"),
        "no mesh ALPN under STRICT: {out}"
    );
    let out = s_client(
        &lab,
        "outsider",
        &web,
        Some("muon/h2"),
        None,
        "/tls-no-cert",
    );
    assert!(!out.contains("HTTP/1.1"), "no client certificate: {out}");
    assert!(
        out.contains("certificate required"),
        "no client certificate: {out}"
    );
    // A certificate from a foreign CA, and an expired one from the mesh's.
    let out = ok_call(&foreign);
    assert!(!out.contains("HTTP/1.1"), "a foreign CA: {out}");
    assert!(out.contains("unknown ca"), "a foreign CA: {out}");
    let out = ok_call(&expired);
    assert!(!out.contains("HTTP/1.1"), "an expired certificate: {out}");
    assert!(
        out.contains("certificate expired"),
        "an expired certificate: {out}"
    );
    // ... while a valid one is still served under STRICT.
    let out = ok_call(&good);
    assert!(
        out.contains("HTTP/1.1 200"),
        "a valid mesh certificate under STRICT: {out}"
    );

    let m = lab.metrics("web");
    for (result, at_least) in [
        ("plaintext-refused", 2.0),
        ("peer-no-certificate", 1.0),
        ("unknown-ca", 1.0),
        ("expired", 1.0),
        ("ok", 3.0),
    ] {
        let n = metric_or_zero(
            &m,
            "muon_tls_connections_total",
            &[("direction", "inbound"), ("result", result)],
        );
        assert!(
            n >= at_least,
            "{result}: {n} (want {at_least} at least)\n{m}"
        );
    }
}

/// The PEM certificates in `text`, whitespace removed, for comparing.
fn pem_bodies(text: &str) -> Vec<String> {
    text.split("-----END CERTIFICATE-----")
        .filter_map(|c| c.split("-----BEGIN CERTIFICATE-----").nth(1))
        .map(|b| b.split_whitespace().collect())
        .collect()
}

/// Sets the lab's control-plane command (in the lab's state) to `base` plus `extra`, and
/// restarts it.
fn restart_control_plane(lab: &Lab, base: &[Value], extra: &[&str]) {
    let path = format!("/run/muon/lab/{}/state.json", lab.name);
    let mut state: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let pod = state["pods"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|p| p["name"] == "muon-control")
        .expect("the control plane's pod");
    let mut command = base.to_vec();
    command.extend(extra.iter().map(|a| Value::from(*a)));
    pod["command"] = Value::Array(command);
    // Atomically: muonctl (the load's `lab exec`) may be reading it.
    let tmp = format!("{path}.test");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&state).unwrap()).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    lab.restart("muon-control", false);
}

#[test]
fn a_ca_rotation_with_an_overlap_loses_no_request() {
    let lab = short_lived_lab("rotate");
    let certs = |pod: &str| -> Value {
        serde_json::from_str(
            &lab.curl_as(pod, Some(0), "http://127.0.0.1:15000/certs")
                .unwrap(),
        )
        .unwrap()
    };
    let pems = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .flat_map(|p| pem_bodies(p.as_str().unwrap()))
            .collect()
    };
    let bundle_of = |pod: &str| pems(&certs(pod)["trustBundle"]);
    // The last of the chain: the CA that signed the certificate.
    let issuer_of = |pod: &str| pems(&certs(pod)["chain"]).pop().unwrap_or_default();

    let ca_dir = format!("/run/muon/lab/{}/control/ca", lab.name);
    let old_root = std::fs::read_to_string(format!("{ca_dir}/root-cert.pem")).unwrap();
    // The new CA, and the old root, where the control plane's user can read them.
    let pki = Pki::new();
    pki.ca("new-ca", "muon rotated root");
    std::fs::write(pki.path("old-root.pem"), &old_root).unwrap();
    let control_uid = nix::unistd::Uid::from_raw(1338);
    for f in ["new-ca.pem", "new-ca.key", "old-root.pem"] {
        nix::unistd::chown(pki.path(f).as_str(), Some(control_uid), None).unwrap();
    }
    let new_root = std::fs::read_to_string(pki.path("new-ca.pem")).unwrap();
    let old_body = pem_bodies(&old_root).remove(0);
    let new_body = pem_bodies(&new_root).remove(0);
    assert_eq!(issuer_of("client"), old_body);

    // Steady load for the whole rotation: fresh connections (new handshakes, whichever CA
    // signed each side) and one kept-alive connection, until the stop file appears.
    let stop = pki.path("stop");
    let script = steady_load(300, &stop);
    let load = muon_tests::muonctl()
        .args(["lab", "exec", &lab.name, "client", "--", "python3", "-c"])
        .arg(&script)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("/run/muon/lab/{}/state.json", lab.name)).unwrap(),
    )
    .unwrap();
    let base = state["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "muon-control")
        .unwrap()["command"]
        .as_array()
        .unwrap()
        .clone();
    let wait = Duration::from_secs(90);
    // (1) The new root joins the bundle; the old CA still signs.
    restart_control_plane(&lab, &base, &["--extra-roots", &pki.path("new-ca.pem")]);
    for pod in ["client", "web"] {
        eventually(&format!("{pod} to trust the new root"), wait, || {
            bundle_of(pod).contains(&new_body).then_some(())
        });
        assert!(bundle_of(pod).contains(&old_body));
    }
    // (2) The new CA signs; the old root stays trusted.
    restart_control_plane(
        &lab,
        &base,
        &[
            "--ca-cert",
            &pki.path("new-ca.pem"),
            "--ca-key",
            &pki.path("new-ca.key"),
            "--extra-roots",
            &pki.path("old-root.pem"),
        ],
    );
    for pod in ["client", "web"] {
        eventually(
            &format!("{pod}'s certificate from the new CA"),
            wait,
            || (issuer_of(pod) == new_body).then_some(()),
        );
    }
    std::fs::write(&stop, "").unwrap();
    let out = load.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let mut it = text.split_whitespace().map(|n| n.parse::<u64>().ok());
    let (ok, bad) = (it.next().flatten(), it.next().flatten());
    eprintln!("{ok:?} requests answered, {bad:?} failed during the CA rotation");
    assert!(
        ok.is_some_and(|n| n > 100) && bad == Some(0),
        "{ok:?} ok, {bad:?} failed: {}",
        output_text(&out)
    );
    let (_, err, ok) = lab.curl_with("client", &["http://web:8080/after-rotation"]);
    assert!(ok, "{err}");
}
