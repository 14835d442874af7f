//! The control plane end to end: muon-control in its own pod, sidecars discovering services
//! from it, operators changing the mesh with muonctl, and the mesh riding out an outage.

use muon_tests::{eventually, output_text, Lab};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A client and two backend replicas with no service yet: the tests apply it themselves.
fn backends_lab(tag: &str) -> Lab {
    let app = muon_tests::demo_shop();
    Lab::up(
        tag,
        &format!(
            r#"
pods:
  - name: client
  - name: backend
    labels: {{app: backend}}
    replicas: 2
    command: ["{}", "inventory", "--port", "8080"]
services:
  - name: other
    selector: {{app: other}}
    ports: [{{port: 9090}}]
"#,
            app.display()
        ),
    )
}

const BACKEND_SERVICE: &str = r#"
apiVersion: muon.io/v1alpha1
kind: Service
metadata:
  name: backend
  namespace: default
spec:
  vips: ["198.19.0.100"]
  ports:
    - port: 8080
      protocol: http
  selector:
    app: backend
---
# Round robin, so that a handful of requests is sure to reach both endpoints (peak-EWMA,
# the default, may rightly keep them all on the faster one).
apiVersion: muon.io/v1alpha1
kind: TrafficPolicy
metadata:
  name: backend
  namespace: default
spec:
  targetRefs: [{kind: Service, name: backend}]
  loadBalancer: {algorithm: RoundRobin}
"#;

/// Which pods answered `n` requests to the backend service; None if a request failed (e.g.
/// before the sidecar has learnt of the service).
fn try_answers(lab: &Lab, n: usize) -> Option<BTreeMap<String, usize>> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let body = lab
            .curl("client", "http://198.19.0.100:8080/stock/x")
            .ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        *seen.entry(v["pod"].as_str()?.to_string()).or_default() += 1;
    }
    Some(seen)
}

/// Like [`try_answers`], for when every request must succeed.
fn answers(lab: &Lab, n: usize) -> BTreeMap<String, usize> {
    try_answers(lab, n).expect("every request to the backend service succeeds")
}

fn all_synced(lab: &Lab) -> bool {
    let proxies = lab.proxy_status();
    proxies.len() == 3
        && proxies.iter().all(|p| {
            p["kinds"]
                .as_array()
                .is_some_and(|k| k.len() == 4 && k.iter().all(|k| k["state"] == "SYNCED"))
        })
}

#[test]
fn an_applied_service_spreads_traffic_and_a_deleted_endpoint_stops_getting_it() {
    let lab = backends_lab("apply");
    let out = lab.ctl_with_file(&["apply"], BACKEND_SERVICE);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("service/backend.default created"),
        "{}",
        output_text(&out)
    );
    let spread = eventually(
        "traffic over both endpoints",
        Duration::from_secs(20),
        || try_answers(&lab, 6).filter(|seen| seen.len() == 2),
    );
    assert_eq!(spread.values().sum::<usize>(), 6);

    let out = lab.ctl(&["delete", "workload", "backend-1"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let deleted = Instant::now();
    // How fast is measured by `cargo xtask bench control-plane` (target: one second); here
    // the deadline only guards against a change that never arrives.
    eventually("all traffic on backend-0", Duration::from_secs(30), || {
        try_answers(&lab, 4).filter(|seen| seen.keys().collect::<Vec<_>>() == ["backend-0"])
    });
    eprintln!(
        "traffic left the deleted endpoint after {:?}",
        deleted.elapsed()
    );
    assert!(eventually(
        "every proxy SYNCED",
        Duration::from_secs(30),
        || all_synced(&lab).then_some(true)
    ));
    // Once every sidecar has the change, the deleted endpoint gets nothing at all.
    let after = answers(&lab, 8);
    assert_eq!(after.keys().collect::<Vec<_>>(), ["backend-0"], "{after:?}");
}

#[test]
fn an_invalid_apply_is_refused_whole_with_a_clear_error() {
    let lab = backends_lab("invalid");
    let manifest = format!(
        "{BACKEND_SERVICE}---\napiVersion: muon.io/v1alpha1\nkind: Service\nmetadata: {{name: broken}}\nspec:\n  vips: [198.19.0.101]\n  ports: [{{port: 0}}]\n  selector: {{app: x}}\n"
    );
    let out = lab.ctl_with_file(&["apply"], &manifest);
    assert!(!out.status.success());
    let err = output_text(&out);
    assert!(
        err.contains("Service default/broken: spec.ports[0].port"),
        "{err}"
    );
    // All or nothing: the valid service in the same file was not stored either.
    let out = lab.ctl(&["get", "services", "-o", "json"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let services: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = services
        .iter()
        .filter_map(|s| s["metadata"]["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["other"],
        "nothing of the refused apply may be stored"
    );
}

#[test]
fn a_route_with_a_bad_regex_is_refused_at_apply_and_a_fixed_one_reaches_every_sidecar() {
    let lab = backends_lab("badre");
    assert!(lab
        .ctl_with_file(&["apply"], BACKEND_SERVICE)
        .status
        .success());
    eventually(
        "the service to reach the sidecar",
        Duration::from_secs(20),
        || try_answers(&lab, 1),
    );
    let route = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: items}
spec:
  parentRefs: [{name: backend}]
  rules:
    - matches: [{path: {type: RegularExpression, value: "/items/([0-9]+"}}]
      backendRefs: [{name: backend, port: 8080}]
"#;
    // The control plane and the sidecars compile regexes with the same code (muon-core):
    // what a sidecar would NACK is refused before it is stored, with the field and reason.
    let out = lab.ctl_with_file(&["apply"], route);
    assert!(!out.status.success(), "{}", output_text(&out));
    let text = output_text(&out);
    assert!(
        text.contains("HTTPRoute default/items")
            && text.contains("spec.rules[0].matches[0].path.value")
            && text.contains("invalid regular expression"),
        "{text}"
    );
    let listed = output_text(&lab.ctl(&["get", "routes"]));
    assert!(!listed.contains("items"), "nothing was stored: {listed}");
    assert!(all_synced(&lab), "no sidecar saw the bad route");
    assert_eq!(answers(&lab, 2).values().sum::<usize>(), 2);

    // The fixed route is stored and routes: once routes attach to a service, a path no rule
    // matches gets 404 (Gateway API), one that matches reaches the backend.
    let fixed = route.replace("([0-9]+", "([0-9]+)");
    assert!(lab.ctl_with_file(&["apply"], &fixed).status.success());
    let status = |path: &str| {
        let url = format!("http://198.19.0.100:8080{path}");
        let out = lab.exec(
            "client",
            &["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", &url],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    eventually(
        "the route to reach the client's sidecar",
        Duration::from_secs(10),
        || (status("/other") == "404").then_some(()),
    );
    assert_eq!(status("/items/7"), "200");
    eventually("every proxy SYNCED", Duration::from_secs(10), || {
        all_synced(&lab).then_some(())
    });
}

#[test]
fn the_mesh_rides_out_a_control_plane_outage_and_resyncs() {
    let lab = backends_lab("outage");
    assert!(lab
        .ctl_with_file(&["apply"], BACKEND_SERVICE)
        .status
        .success());
    eventually(
        "the service to reach the sidecar",
        Duration::from_secs(20),
        || try_answers(&lab, 2).filter(|seen| seen.len() == 2),
    );

    lab.kill9("muon-control", false);
    // Traffic continues with the tables the sidecars have.
    assert_eq!(answers(&lab, 4).len(), 2);
    let out = lab.ctl(&["proxy-status"]);
    assert!(!out.status.success(), "the control plane is down");
    assert!(
        output_text(&out).contains("cannot reach the control plane"),
        "{}",
        output_text(&out)
    );

    // A sidecar restarted during the outage serves from the tables it saved.
    lab.restart("client", true);
    assert_eq!(lab.pod("client")["sidecar"], "ready");
    assert_eq!(answers(&lab, 4).len(), 2);

    // The control plane comes back; every sidecar reconnects and is SYNCED.
    lab.restart("muon-control", false);
    eventually("every proxy SYNCED", Duration::from_secs(30), || {
        all_synced(&lab).then_some(())
    });
    assert_eq!(answers(&lab, 2).values().sum::<usize>(), 2);
}

#[test]
fn applied_objects_survive_kill_9_and_a_restart_of_the_control_plane() {
    let lab = backends_lab("durable");
    assert!(lab
        .ctl_with_file(&["apply"], BACKEND_SERVICE)
        .status
        .success());
    lab.kill9("muon-control", false);
    lab.restart("muon-control", false);
    let out = lab.ctl(&["get", "services", "backend", "-o", "json"]);
    assert!(out.status.success(), "{}", output_text(&out));
    let text = output_text(&out);
    assert!(text.contains("198.19.0.100"), "{text}");
    // The lab's own registrations survived too.
    let out = lab.ctl(&["get", "workloads", "-o", "json"]);
    let workloads: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(workloads.len(), 3, "client, backend-0, backend-1");
}

#[test]
fn a_generic_grpc_client_lists_the_services_through_reflection() {
    let lab = backends_lab("reflect");
    let python =
        std::env::var("MUON_TEST_PYTHON").unwrap_or_else(|_| "/opt/muon-ci/venv/bin/python".into());
    assert!(
        std::path::Path::new(&python).exists(),
        "{python} is missing: .ci/run creates it (python3 -m venv + pip install grpcio grpcio-reflection)"
    );
    let script = muon_tests::clients().join("grpc_reflect.py");
    let script = script.to_str().unwrap();
    let cp = lab.pod("muon-control")["ip"].as_str().unwrap().to_string();
    let addr = format!("{cp}:15010");
    // The control plane speaks TLS; the client trusts the mesh's root (no client
    // certificate: reflection is open to anyone, the management API is not).
    let bundle = format!("/run/muon/lab/{}/control/ca/trust-bundle.pem", lab.name);
    let out = lab.exec_as(
        "client",
        Some(0),
        &[&python, script, "--ca", &bundle, &addr],
    );
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    let services: Vec<&str> = text.lines().collect();
    assert!(services.contains(&"muon.v1.Management"), "{text}");
    assert!(services.contains(&"muon.v1.Discovery"), "{text}");
    let out = lab.exec_as(
        "client",
        Some(0),
        &[
            &python,
            script,
            "--ca",
            &bundle,
            &addr,
            "muon.v1.Management",
        ],
    );
    let text = output_text(&out);
    assert!(
        text.contains("muon.v1.Management/Apply")
            && text.contains("muon.v1.Management/ListProxies"),
        "{text}"
    );
}
