//! Resilience end to end: retries and their budget, outlier detection, peak-EWMA, locality
//! failover, circuit breaking and injected faults, in real labs. The apps are the demo
//! shop's `reflect`, told to fail or be slow with its fault flags (`--fail-rate`,
//! `--delay-ms`, and `/admin/faults` at run time); the load comes from
//! tests/clients/http_load.py in the client pod, through its sidecar.

use muon_tests::{eventually, output_text, Lab};
use serde_json::Value;
use std::time::Duration;

/// The demo app's `reflect` role on 8080, with extra flags.
fn reflect(flags: &str) -> String {
    let flags: String = flags
        .split_whitespace()
        .map(|f| format!(", \"{f}\""))
        .collect();
    format!(
        r#"["{}", "reflect", "--port", "8080"{flags}]"#,
        muon_tests::demo_shop().display()
    )
}

/// `count` requests to `url` from the client pod, `concurrency` at a time.
fn load(lab: &Lab, url: &str, count: usize, concurrency: usize) -> Value {
    lab.client_json(
        "client",
        "http_load.py",
        &[
            "--url",
            url,
            "--count",
            &count.to_string(),
            "--concurrency",
            &concurrency.to_string(),
        ],
    )
}

fn served(v: &Value, pod: &str) -> u64 {
    v["pods"][pod].as_u64().unwrap_or(0)
}

/// A count of `muon_resilience_events_total` in the client's sidecar.
fn events(lab: &Lab, service: &str, event: &str) -> f64 {
    lab.metric(
        "client",
        "muon_resilience_events_total",
        &[("service", service), ("event", event)],
    )
}

/// What the app of `pod` counted (`/admin/stats`: served, failed, delayed).
fn app_stats(lab: &Lab, pod: &str) -> Value {
    let body = lab
        .curl(pod, "http://127.0.0.1:8080/admin/stats")
        .expect("the app's stats");
    serde_json::from_str(body.trim()).expect("stats json")
}

#[track_caller]
fn apply(lab: &Lab, yaml: &str) {
    let out = lab.ctl_with_file(&["apply"], yaml);
    assert!(out.status.success(), "{}", output_text(&out));
}

/// Waits until the client's sidecar has the service's traffic settings: the service's
/// entry in its config dump (compact JSON) contains `needle`.
fn wait_for_traffic(lab: &Lab, service: &str, needle: &str) {
    eventually(
        "the traffic policy to reach the client",
        Duration::from_secs(20),
        || {
            let out = lab.ctl(&["config-dump", "client"]);
            let text = output_text(&out);
            let dump: Value = serde_json::from_str(&text).ok()?;
            let found = dump
                .pointer("/table/services")
                .and_then(|s| s.as_array())
                .into_iter()
                .flatten()
                .any(|s| s["name"].as_str() == Some(service) && s.to_string().contains(needle));
            found.then_some(())
        },
    );
}

const WEB: &str = "http://web:8080/";

/// A route of `kind` to `service` that retries 503 (and 502 for HTTP) twice, and the
/// service's retry budget.
fn retry_policy(kind: &str, service: &str, port: u16, backoff: &str, budget: &str) -> String {
    let codes = match kind {
        "GRPCRoute" => "[503]",
        _ => "[502, 503]",
    };
    format!(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: {kind}
metadata: {{name: {service}}}
spec:
  parentRefs: [{{name: {service}, kind: Service, port: {port}}}]
  rules:
    - backendRefs: [{{name: {service}, port: {port}}}]
      retry: {{codes: {codes}, attempts: 2, backoff: {backoff}}}
---
apiVersion: gateway.networking.x-k8s.io/v1alpha1
kind: XBackendTrafficPolicy
metadata: {{name: {service}}}
spec:
  targetRefs: [{{group: "", kind: Service, name: {service}}}]
  retryConstraint: {budget}
"#
    )
}

/// Sends a few requests until the client's sidecar has retried once: the route is in force.
fn wait_for_retries(lab: &Lab, service: &str, mut send: impl FnMut()) {
    eventually("the retry route", Duration::from_secs(20), || {
        (events(lab, service, "retry") > 0.0 || {
            send();
            false
        })
        .then_some(())
    });
}

fn two_replicas(tag: &str, a: &str, b: &str, traffic: &str) -> Lab {
    Lab::up(
        tag,
        &format!(
            r#"
pods:
  - name: client
  - name: web-a
    labels: {{app: web}}
    command: {a}
  - name: web-b
    labels: {{app: web}}
    command: {b}
services:
  - name: web
    selector: {{app: web}}
    ports: [{{port: 8080, protocol: http}}]
    traffic: {traffic}
"#,
            a = reflect(a),
            b = reflect(b),
        ),
    )
}

#[test]
fn retries_on_503_hide_a_replica_that_fails_half_its_requests() {
    let lab = two_replicas(
        "retry",
        "--fail-rate 0.5",
        "",
        "{loadBalancer: {algorithm: RoundRobin}}",
    );
    // Half of web-a's answers are 503: a quarter of all requests fail without retries.
    let before = load(&lab, WEB, 200, 4);
    assert!(
        before["statuses"]["503"].as_u64().unwrap_or(0) > 20,
        "{before}"
    );

    apply(
        &lab,
        &retry_policy(
            "HTTPRoute",
            "web",
            8080,
            "5ms",
            "{budget: {percent: 50, interval: 10s}, minRetryRate: {count: 10, interval: 1s}}",
        ),
    );
    eventually("the retry route", Duration::from_secs(20), || {
        let probe = load(&lab, WEB, 40, 2);
        (probe["failed"] == 0).then_some(())
    });
    let failures_before = app_stats(&lab, "web-a")["failed"].as_u64().unwrap();
    let retries_before = events(&lab, "web.default", "retry");

    let run = load(&lab, WEB, 2000, 4);
    assert_eq!(run["total"], 2000, "{run}");
    assert_eq!(run["failed"], 0, "no failed request out of 2,000: {run}");
    // It was the retries: web-a kept failing, and each failure was retried.
    let failed = app_stats(&lab, "web-a")["failed"].as_u64().unwrap() - failures_before;
    let retries = events(&lab, "web.default", "retry") - retries_before;
    assert!(failed > 200, "web-a failed {failed} requests");
    assert!(
        retries >= failed as f64,
        "{retries} retries for {failed} failures"
    );
    assert!(events(&lab, "web.default", "retry-success") > 0.0);
    eprintln!("2000 requests, 0 failed; web-a failed {failed} tries, {retries} retries");
}

#[test]
fn the_retry_budget_caps_retries_and_the_rest_fail_fast() {
    let lab = two_replicas(
        "budget",
        "--fail-rate 1",
        "",
        "{loadBalancer: {algorithm: RoundRobin}}",
    );
    apply(
        &lab,
        &retry_policy(
            "HTTPRoute",
            "web",
            8080,
            "1ms",
            "{budget: {percent: 20, interval: 10s}, minRetryRate: {count: 3, interval: 1s}}",
        ),
    );
    wait_for_retries(&lab, "web.default", || {
        load(&lab, WEB, 10, 1);
    });
    let retries_before = events(&lab, "web.default", "retry");
    let exhausted_before = events(&lab, "web.default", "budget-exhausted");

    let n = 1000u32;
    let run = load(&lab, WEB, n as usize, 4);
    let seconds = run["seconds"].as_f64().unwrap();
    let retries = events(&lab, "web.default", "retry") - retries_before;
    let exhausted = events(&lab, "web.default", "budget-exhausted") - exhausted_before;
    // 20% of the requests of the last 10 s, plus 3 per second (the window may still hold
    // the warm-up's requests: at most 50 more).
    let allowed = 0.2 * f64::from(n + 50) + 3.0 * (seconds + 10.0);
    assert!(retries <= allowed, "{retries} retries > {allowed} allowed");
    // The budget was used, and what it refused failed at once, with web-a's 503.
    assert!(retries >= 0.15 * f64::from(n), "{retries} retries");
    assert!(exhausted > 0.0, "the budget never ran out");
    let failed = run["statuses"]["503"].as_u64().unwrap_or(0);
    assert!(
        failed > 0 && failed as f64 <= exhausted,
        "{run} exhausted {exhausted}"
    );
    eprintln!("{n} requests in {seconds} s: {retries} retries (at most {allowed}), {failed} failed fast, {exhausted} refused by the budget");
}

#[test]
fn outlier_detection_ejects_a_killed_replica_and_takes_it_back_after_its_ejection() {
    let lab = two_replicas(
        "outlier",
        "",
        "",
        "{loadBalancer: {algorithm: RoundRobin}, outlierDetection: {consecutive5xx: 5, consecutiveConnectFailures: 3, baseEjectionTime: 3s, maxEjectionPercent: 50}}",
    );
    wait_for_traffic(&lab, "web", "\"algorithm\":\"RoundRobin\"");
    let warm = load(&lab, WEB, 40, 2);
    assert!(
        served(&warm, "web-a") > 0 && served(&warm, "web-b") > 0,
        "{warm}"
    );

    let inbound_b = || {
        lab.metric(
            "web-b",
            "muon_http_requests_total",
            &[("direction", "inbound")],
        )
    };
    let before_kill = inbound_b();
    lab.kill9("web-b", false);
    // web-b's sidecar answers for its app (connect failed): the client's sidecar tries
    // web-a instead, and ejects web-b after 3 such answers.
    let run = load(&lab, WEB, 200, 2);
    assert_eq!(run["failed"], 0, "{run}");
    assert_eq!(served(&run, "web-a"), 200, "{run}");
    // At most 5 requests reached web-b after its app died (3 ejected it; 2 were in
    // flight meanwhile).
    let tried_b = inbound_b() - before_kill;
    assert!(
        tried_b <= 5.0,
        "web-b got {tried_b} requests after its app died"
    );
    assert!(
        events(&lab, "web.default", "ejection") >= 1.0,
        "web-b was not ejected"
    );
    let dump = output_text(&lab.ctl(&["config-dump", "client"]));
    assert!(
        dump.contains("\"ejected\":true") || dump.contains("\"ejected\": true"),
        "{dump}"
    );
    eprintln!("web-b got {tried_b} requests after its app died");

    // web-b recovers; once its ejection ends it gets traffic again.
    lab.restart("web-b", false);
    let back = eventually("web-b back in rotation", Duration::from_secs(30), || {
        let v = load(&lab, WEB, 20, 1);
        (served(&v, "web-b") > 0).then_some(v)
    });
    assert_eq!(back["failed"], 0, "{back}");
}

#[test]
fn peak_ewma_sends_a_slow_replica_under_10_percent_and_round_robin_about_half() {
    let lab = two_replicas("ewma", "", "--delay-ms 50", "{}");
    let warm = load(&lab, WEB, 50, 2);
    assert_eq!(warm["failed"], 0, "{warm}");
    let ewma = load(&lab, WEB, 400, 2);
    let slow = served(&ewma, "web-b") as f64 / 400.0;
    assert!(
        slow < 0.10,
        "PeakEWMA sent {slow:.3} of requests to the slow replica: {ewma}"
    );

    apply(
        &lab,
        r#"
apiVersion: muon.io/v1alpha1
kind: TrafficPolicy
metadata: {name: web, namespace: default}
spec:
  targetRefs: [{kind: Service, name: web}]
  loadBalancer: {algorithm: RoundRobin}
"#,
    );
    wait_for_traffic(&lab, "web", "\"algorithm\":\"RoundRobin\"");
    let rr = load(&lab, WEB, 200, 2);
    let half = served(&rr, "web-b") as f64 / 200.0;
    assert!(
        (0.4..=0.6).contains(&half),
        "RoundRobin sent {half:.3} to the slow replica: {rr}"
    );
    eprintln!("slow replica's share: PeakEWMA {slow:.3}, RoundRobin {half:.3}");
}

#[test]
fn requests_stay_in_zone_and_fail_over_when_the_zone_goes() {
    let lab = Lab::up(
        "zone",
        &format!(
            r#"
pods:
  - name: client
    zone: zone-a
  - name: web-a1
    labels: {{app: web}}
    zone: zone-a
    command: {app}
  - name: web-a2
    labels: {{app: web}}
    zone: zone-a
    command: {app}
  - name: web-b1
    labels: {{app: web}}
    zone: zone-b
    command: {app}
services:
  - name: web
    selector: {{app: web}}
    ports: [{{port: 8080, protocol: http}}]
    traffic: {{outlierDetection: {{consecutiveConnectFailures: 2, baseEjectionTime: 30s, maxEjectionPercent: 100}}}}
"#,
            app = reflect(""),
        ),
    );
    wait_for_traffic(&lab, "web", "consecutiveConnectFailures");
    let local = load(&lab, WEB, 300, 2);
    assert_eq!(local["failed"], 0, "{local}");
    assert_eq!(served(&local, "web-b1"), 0, "all in zone-a: {local}");
    assert!(
        served(&local, "web-a1") > 0 && served(&local, "web-a2") > 0,
        "{local}"
    );

    // zone-a goes down while requests come, two at a time.
    let during = std::thread::scope(|s| {
        let running = s.spawn(|| {
            lab.client_json(
                "client",
                "http_load.py",
                &["--url", WEB, "--duration", "4", "--concurrency", "2"],
            )
        });
        std::thread::sleep(Duration::from_millis(1000));
        lab.kill9("web-a1", false);
        lab.kill9("web-a2", false);
        running.join().expect("the load")
    });
    // At most two requests are in flight at each of the two kills.
    assert!(
        during["failed"].as_u64().unwrap() <= 4,
        "no failure beyond those in flight: {during}"
    );
    assert!(served(&during, "web-b1") > 0, "{during}");
    let after = load(&lab, WEB, 100, 2);
    assert_eq!(after["failed"], 0, "{after}");
    assert_eq!(
        served(&after, "web-b1"),
        100,
        "failed over to zone-b: {after}"
    );
    eprintln!("in zone: {local}; failover: {during}; after: {after}");
}

#[test]
fn circuit_breaker_faults_and_bad_values_as_configured() {
    let lab = two_replicas(
        "limits",
        "",
        "",
        "{circuitBreaker: {maxPendingRequests: 2}}",
    );
    wait_for_traffic(&lab, "web", "\"maxPendingRequests\":2");

    // Past maxPendingRequests: 503 with the header, at once, not after the slow ones.
    let burst = load(&lab, "http://web:8080/delay/1500", 8, 8);
    assert_eq!(burst["statuses"]["200"], 2, "{burst}");
    assert_eq!(burst["statuses"]["503"], 6, "{burst}");
    assert_eq!(burst["errors"]["overloaded"], 6, "{burst}");
    let waited = burst["slowest_ms"]["503"].as_f64().unwrap();
    assert!(
        waited < 1000.0,
        "the excess waited {waited} ms for the slow requests"
    );
    assert!(events(&lab, "web.default", "overloaded") >= 6.0);

    // An abort fault at 20%: within 3 points over 2,000 requests.
    apply(
        &lab,
        r#"
apiVersion: muon.io/v1alpha1
kind: TrafficPolicy
metadata: {name: web, namespace: default}
spec:
  targetRefs: [{kind: Service, name: web}]
  faults: {abort: {percent: 20, status: 503}}
"#,
    );
    wait_for_traffic(&lab, "web", "abort");
    let run = load(&lab, WEB, 2000, 4);
    let aborted = run["errors"]["fault-abort"].as_u64().unwrap_or(0);
    assert_eq!(
        run["statuses"]["503"].as_u64().unwrap_or(0),
        aborted,
        "{run}"
    );
    assert!(
        (340..=460).contains(&aborted),
        "{aborted} of 2000 aborted, not 20% ± 3 points"
    );
    assert_eq!(events(&lab, "web.default", "fault-abort") as u64, aborted);

    // Bad values are refused at apply with the field, and the policy in force stays.
    for (bad, field) in [
        ("locality: {failoverBelow: 150}", "failoverBelow"),
        ("loadBalancer: {algorithm: Fastest}", "algorithm"),
        ("circuitBreaker: {maxRequests: -1}", "maxRequests"),
        ("faults: {abort: {percent: 120, status: 503}}", "percent"),
        (
            "outlierDetection: {baseEjectionTime: soon}",
            "baseEjectionTime",
        ),
    ] {
        let yaml = format!(
            "apiVersion: muon.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: web, namespace: default}}\nspec:\n  targetRefs: [{{kind: Service, name: web}}]\n  {bad}\n"
        );
        let out = lab.ctl_with_file(&["apply"], &yaml);
        assert!(!out.status.success(), "{bad} was accepted");
        assert!(
            output_text(&out).contains(field),
            "{bad}: {}",
            output_text(&out)
        );
    }
    let out = lab.ctl_with_file(
        &["apply"],
        "apiVersion: muon.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: pods}\nspec:\n  targetRefs: [{kind: Pod, name: web-a}]\n",
    );
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("targetRefs"),
        "{}",
        output_text(&out)
    );
    let still = output_text(&lab.ctl(&["get", "trafficpolicies", "web", "-o", "json"]));
    assert!(still.contains("abort"), "{still}");

    // A delay for one route only: requests it matches wait, the others do not.
    apply(
        &lab,
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: slow}
spec:
  parentRefs: [{name: web, kind: Service, port: 8080}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /slow}}]
      backendRefs: [{name: web, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: rest}
spec:
  parentRefs: [{name: web, kind: Service, port: 8080}]
  rules:
    - backendRefs: [{name: web, port: 8080}]
---
apiVersion: muon.io/v1alpha1
kind: TrafficPolicy
metadata: {name: web, namespace: default}
spec:
  targetRefs: [{kind: Service, name: web}]
  faults: {delay: {percent: 100, duration: 300ms}, routes: [slow]}
"#,
    );
    wait_for_traffic(&lab, "web", "\"delayPercent\":100");
    eventually("both routes", Duration::from_secs(20), || {
        let v = load(&lab, "http://web:8080/slow/x", 1, 1);
        (v["ok"] == 1 && v["slowest_ms"]["200"].as_f64()? >= 300.0).then_some(())
    });
    let delayed = events(&lab, "web.default", "fault-delay");
    let slow = load(&lab, "http://web:8080/slow/y", 10, 5);
    assert_eq!(slow["ok"], 10, "{slow}");
    assert!(
        slow["slowest_ms"]["200"].as_f64().unwrap() >= 300.0,
        "{slow}"
    );
    let rest = load(&lab, WEB, 50, 5);
    assert_eq!(rest["ok"], 50, "{rest}");
    assert_eq!(
        events(&lab, "web.default", "fault-delay") - delayed,
        10.0,
        "only the slow route's 10 requests were delayed"
    );
    eprintln!("overload burst: {burst}; abort fault: {aborted} of 2000; delay: {slow}");
}

#[test]
fn grpc_unavailable_is_retried_when_the_route_lists_503() {
    let python = |flags: &str| {
        format!(
            r#"["{}", "{}", "serve", "--port", "9090"{flags}]"#,
            muon_tests::python(),
            muon_tests::clients().join("grpc_echo.py").display()
        )
    };
    let lab = Lab::up(
        "grpcretry",
        &format!(
            r#"
pods:
  - name: client
  - name: echo-a
    labels: {{app: echo}}
    command: {a}
  - name: echo-b
    labels: {{app: echo}}
    command: {b}
services:
  - name: echo
    selector: {{app: echo}}
    ports: [{{port: 9090, protocol: grpc}}]
    traffic: {{loadBalancer: {{algorithm: RoundRobin}}}}
"#,
            a = python(r#", "--fail-rate", "0.5""#),
            b = python(""),
        ),
    );
    let call = |count: &str| {
        let py = muon_tests::python();
        let script = muon_tests::clients().join("grpc_echo.py");
        let script = script.display().to_string();
        lab.exec_as(
            "client",
            Some(0),
            &[
                &py,
                &script,
                "call",
                "--target",
                "echo:9090",
                "unary",
                "--count",
                count,
            ],
        )
    };
    // Without a retry, a call fails with UNAVAILABLE soon enough.
    eventually("the echo service", Duration::from_secs(20), || {
        call("1").status.success().then_some(())
    });
    let out = call("100");
    assert!(!out.status.success(), "100 calls without a failure");
    assert!(
        output_text(&out).contains("UNAVAILABLE"),
        "{}",
        output_text(&out)
    );

    apply(
        &lab,
        &retry_policy(
            "GRPCRoute",
            "echo",
            9090,
            "5ms",
            "{budget: {percent: 60, interval: 10s}}",
        ),
    );
    wait_for_retries(&lab, "echo.default", || {
        call("20");
    });
    let out = call("300");
    assert!(out.status.success(), "{}", output_text(&out));
    let v: Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(v["ok"], 300, "{v}");
    assert!(v["pods"]["echo-a"].as_u64().unwrap() > 0, "{v}");
    assert!(events(&lab, "echo.default", "retry") > 20.0);
}
