//! Traffic capture end to end: real iptables rules from muon-init in pod namespaces, real
//! sidecars, and plain curl as the client app.

use muon_tests::{eventually, Lab};
use std::time::Duration;

/// client (curl) -> web service (python http.server) with sidecars on both sides. The port
/// is declared `tcp`: these tests are about capture and the opaque path (HTTP has its own,
/// tests/tests/http.rs).
fn web_lab(tag: &str, extra_client: &str, extra_web: &str) -> Lab {
    Lab::up(
        tag,
        &format!(
            r#"
pods:
  - name: client
    labels: {{app: client}}
{extra_client}
  - name: web
    labels: {{app: web}}
    command: ["python3", "-m", "http.server", "8080", "--bind", "::"]
{extra_web}
services:
  - name: web
    selector: {{app: web}}
    ports:
      - port: 8080
        protocol: tcp
"#
        ),
    )
}

const OPENED: &str = "muon_tcp_connections_opened_total";

#[test]
fn outbound_and_inbound_capture_carry_curl_to_a_service_name() {
    let lab = web_lab("cap", "", "");
    for name in ["web", "web.default", "web.default.svc.cluster.local"] {
        let body = lab.curl("client", &format!("http://{name}:8080/")).unwrap();
        assert!(
            body.contains("Directory listing"),
            "unexpected answer via {name}: {body}"
        );
    }
    assert_eq!(
        lab.metric("client", OPENED, &[("direction", "outbound")]),
        3.0
    );
    assert_eq!(lab.metric("web", OPENED, &[("direction", "inbound")]), 3.0);
    // Bytes were counted both ways on both sidecars.
    for (pod, dir) in [("client", "outbound"), ("web", "inbound")] {
        let sent = lab.metric(
            pod,
            "muon_tcp_bytes_total",
            &[("direction", dir), ("flow", "sent")],
        );
        let recv = lab.metric(
            pod,
            "muon_tcp_bytes_total",
            &[("direction", dir), ("flow", "received")],
        );
        assert!(
            sent > 0.0 && recv > sent,
            "{pod}: sent {sent} received {recv}"
        );
    }
    // One access-log event per connection, naming the service and the endpoint chosen.
    let web_ip = lab.pod_ip("web");
    let log = eventually(
        "3 access log events on the client",
        Duration::from_secs(5),
        || {
            let l = lab.access_log("client");
            (l.len() >= 3).then_some(l)
        },
    );
    let e = &log[0];
    let f = if e["fields"].is_object() {
        &e["fields"]
    } else {
        e
    };
    assert_eq!(f["direction"], "outbound", "{e}");
    assert_eq!(f["service"], "web.default", "{e}");
    assert_eq!(f["endpoint"], format!("{web_ip}:8080"), "{e}");
    assert_eq!(f["outcome"], "ok", "{e}");
    assert_eq!(
        f["dst"],
        format!("{}:8080", lab.service_vip("web", false)),
        "{e}"
    );
}

#[test]
fn excluded_ports_bypass_the_proxy() {
    // web serves the excluded port 8080 and, as the positive control, port 8081, which is
    // captured like any other.
    let lab = Lab::up(
        "excl",
        r#"
pods:
  - name: client
    labels: {app: client}
    initArgs: ["--exclude-outbound-ports=8080"]
  - name: web
    labels: {app: web}
    command: ["sh", "-c", "python3 -m http.server 8081 --bind :: & exec python3 -m http.server 8080 --bind ::"]
    initArgs: ["--exclude-inbound-ports=8080"]
services:
  - name: web
    selector: {app: web}
    ports:
      - {port: 8080, protocol: tcp}
      - {port: 8081, protocol: tcp}
"#,
    );
    let web_ip = lab.pod_ip("web");
    let body = lab
        .curl("client", &format!("http://{web_ip}:8080/"))
        .unwrap();
    assert!(body.contains("Directory listing"));
    assert_eq!(
        lab.metric("client", OPENED, &[]),
        0.0,
        "client sidecar saw an excluded port"
    );
    assert_eq!(
        lab.metric("web", OPENED, &[]),
        0.0,
        "web sidecar saw an excluded port"
    );
    // The control: the same call to a port that is not excluded moves the same counters on
    // both sidecars, so the zeros above are the exclusion, not a metric that never moves.
    let body = lab
        .curl("client", &format!("http://{web_ip}:8081/"))
        .unwrap();
    assert!(body.contains("Directory listing"));
    assert_eq!(
        lab.metric("client", OPENED, &[("direction", "outbound")]),
        1.0
    );
    assert_eq!(lab.metric("web", OPENED, &[("direction", "inbound")]), 1.0);
    // And the excluded port still bypasses both.
    lab.curl("client", &format!("http://{web_ip}:8080/"))
        .unwrap();
    assert_eq!(lab.metric("client", OPENED, &[]), 1.0);
    assert_eq!(lab.metric("web", OPENED, &[]), 1.0);
}

#[test]
fn the_proxys_own_connections_are_not_captured_again() {
    let lab = web_lab("own", "", "");
    let web_ip = lab.pod_ip("web");
    // A process running as the proxy's UID goes straight out: no sidecar counts it.
    let body = lab
        .curl_as("client", Some(1337), &format!("http://{web_ip}:8080/"))
        .unwrap();
    assert!(body.contains("Directory listing"));
    assert_eq!(
        lab.metric("client", OPENED, &[("direction", "outbound")]),
        0.0
    );
    // Through the mesh, each request is one outbound connection, never re-captured into a loop.
    for _ in 0..3 {
        lab.curl("client", "http://web:8080/").unwrap();
    }
    assert_eq!(
        lab.metric("client", OPENED, &[("direction", "outbound")]),
        3.0
    );
    assert_eq!(
        lab.metric("client", OPENED, &[("direction", "inbound")]),
        0.0
    );
    let loops = |pod: &str| {
        lab.metric(
            pod,
            "muon_tcp_connections_closed_total",
            &[("outcome", "loop")],
        )
    };
    for pod in ["client", "web"] {
        assert_eq!(loops(pod), 0.0, "{pod} saw its own connection again");
    }
    // The control: a connection that does loop (straight to a sidecar's own listener, which
    // nothing redirected) is counted under the same outcome, on each side.
    for (pod, port) in [("client", 15001), ("web", 15006)] {
        lab.curl(pod, &format!("http://127.0.0.1:{port}/"))
            .expect_err("the sidecar closes a connection to itself");
        assert_eq!(loops(pod), 1.0, "{pod}: the loop is counted");
    }
}

#[test]
fn localhost_stays_private_and_an_app_can_call_its_own_service() {
    let lab = web_lab("self", "", "");
    // app -> localhost is not captured.
    lab.curl("web", "http://127.0.0.1:8080/").unwrap();
    assert_eq!(lab.metric("web", OPENED, &[]), 0.0);
    // app -> its own service goes out through the outbound proxy and back in through inbound.
    lab.curl("web", "http://web:8080/").unwrap();
    assert_eq!(lab.metric("web", OPENED, &[("direction", "outbound")]), 1.0);
    assert_eq!(lab.metric("web", OPENED, &[("direction", "inbound")]), 1.0);
}

#[test]
fn ipv6_traffic_is_captured_both_ways() {
    if !muon_tests::require_ipv6() {
        return;
    }
    let lab = web_lab("six", "", "");
    assert_eq!(lab.status()["ipv6"], true);
    let vip6 = lab.service_vip("web", true);
    let body = lab
        .curl("client", &format!("http://[{vip6}]:8080/"))
        .unwrap();
    assert!(body.contains("Directory listing"));
    assert_eq!(
        lab.metric("client", OPENED, &[("direction", "outbound")]),
        1.0
    );
    assert_eq!(lab.metric("web", OPENED, &[("direction", "inbound")]), 1.0);
    // Straight to the pod's IPv6 address: passthrough outbound, IPv6 inbound capture.
    let web6 = lab.pod("web")["ipv6"]
        .as_str()
        .expect("pod ipv6")
        .to_string();
    lab.curl("client", &format!("http://[{web6}]:8080/"))
        .unwrap();
    assert_eq!(
        lab.metric("client", OPENED, &[("direction", "outbound")]),
        2.0
    );
    assert_eq!(lab.metric("web", OPENED, &[("direction", "inbound")]), 2.0);
    eventually(
        "the inbound IPv6 access event on web",
        Duration::from_secs(10),
        || {
            lab.access_log("web")
                .iter()
                .any(|e| e.to_string().contains(&format!("[{web6}]:8080")))
                .then_some(())
        },
    );
}

#[test]
fn a_killed_sidecar_breaks_connections_and_a_restarted_one_restores_them() {
    let lab = web_lab("kill", "", "");
    lab.curl("client", "http://web:8080/").unwrap();
    let pid = lab.pod("client")["sidecarPid"]
        .as_i64()
        .expect("sidecar pid");
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    eventually("the sidecar to die", Duration::from_secs(5), || {
        (!muon_tests::process_alive(pid)).then_some(())
    });
    assert_eq!(lab.pod("client")["sidecar"], "down");
    // Capture still sends the app's connection to port 15001, where nothing listens now.
    let err = lab
        .curl("client", "http://web:8080/")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("exit Some(7)"),
        "expected connection refused, got: {err}"
    );

    let out = muon_tests::muonctl()
        .args(["lab", "restart", &lab.name, "client", "--sidecar"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lab.pod("client")["sidecar"], "ready");
    let body = lab.curl("client", "http://web:8080/").unwrap();
    assert!(body.contains("Directory listing"));
}

#[test]
fn outbound_spreads_connections_over_every_endpoint() {
    let app = muon_tests::demo_shop();
    let app = app.display();
    let lab = Lab::up(
        "lb",
        &format!(
            r#"
pods:
  - name: client
  - name: inventory
    labels: {{app: inventory}}
    replicas: 2
    command: ["{app}", "inventory", "--port", "8080"]
services:
  - name: inventory
    selector: {{app: inventory}}
    ports: [{{port: 8080, protocol: tcp}}]
    traffic: {{loadBalancer: {{algorithm: RoundRobin}}}}
"#
        ),
    );
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..6 {
        let body = lab
            .curl("client", "http://inventory:8080/stock/widget")
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        *seen
            .entry(v["pod"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(seen.len(), 2, "both replicas should answer: {seen:?}");
    for pod in ["inventory-0", "inventory-1"] {
        assert!(lab.metric(pod, OPENED, &[("direction", "inbound")]) >= 1.0);
    }
}
