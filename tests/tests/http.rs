//! HTTP in the mesh, end to end: real labs, real sidecars, and clients written elsewhere
//! (curl, Python grpcio and websockets, raw sockets) in the pods.

use muon_tests::{eventually, metric_sum, output_text, Lab};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The demo app's `reflect` role: answers with what it received.
fn reflect(port: u16) -> String {
    format!(
        r#"["{}", "reflect", "--port", "{port}"]"#,
        muon_tests::demo_shop().display()
    )
}

fn python(script: &str, args: &str) -> String {
    format!(
        r#"["{}", "{}", {args}]"#,
        muon_tests::python(),
        muon_tests::clients().join(script).display()
    )
}

#[track_caller]
fn json(text: &str) -> Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text:?}"))
}

fn curl_i(lab: &Lab, pod: &str, args: &[&str]) -> (u16, BTreeMap<String, String>, String) {
    lab.curl_i(pod, args)
}

#[track_caller]
fn get(lab: &Lab, pod: &str, url: &str) -> Value {
    let (out, err, ok) = lab.curl_with(pod, &[url]);
    assert!(ok, "curl {url}: {err}");
    json(&out)
}

/// Request events (not connection events) from a pod's sidecar log.
fn requests(lab: &Lab, pod: &str) -> Vec<Value> {
    lab.access_log(pod)
        .into_iter()
        .filter(|e| e["message"] == "request")
        .collect()
}

fn protocols_lab() -> Lab {
    Lab::up(
        "proto",
        &format!(
            r#"
pods:
  - name: client
  - name: web
    labels: {{app: web}}
    replicas: 2
    command: {web}
  - name: plain
    labels: {{app: plain}}
    sidecar: false
    command: {web}
  - name: grpc-a
    labels: {{app: grpc, slot: a}}
    command: {grpc}
  - name: grpc-b
    labels: {{app: grpc, slot: b}}
    command: {grpc}
  - name: ws
    labels: {{app: ws}}
    command: {ws}
# Round robin where a test counts on a few requests reaching every replica (peak-EWMA,
# the default, may rightly keep them on the faster one).
services:
  - name: web
    selector: {{app: web}}
    ports: [{{port: 8080, protocol: http}}]
    traffic: {{loadBalancer: {{algorithm: RoundRobin}}}}
  - name: web-auto
    selector: {{app: web}}
    ports: [{{port: 8080}}]
  - name: plain
    selector: {{app: plain}}
    ports: [{{port: 8080, protocol: http}}]
  - name: empty
    selector: {{app: nothing}}
    ports: [{{port: 8080, protocol: http}}]
  - name: grpc
    selector: {{app: grpc}}
    ports: [{{port: 9090, protocol: grpc}}]
    traffic: {{loadBalancer: {{algorithm: RoundRobin}}}}
  - name: grpc-b
    selector: {{slot: b}}
    ports: [{{port: 9090, protocol: grpc}}]
  - name: grpc-empty
    selector: {{app: nothing}}
    ports: [{{port: 9090, protocol: grpc}}]
  - name: ws
    selector: {{app: ws}}
    ports: [{{port: 8765, protocol: http}}]
"#,
            web = reflect(8080),
            grpc = python("grpc_echo.py", r#""serve", "--port", "9090""#),
            ws = python("ws_echo.py", r#""serve", "--port", "8765""#),
        ),
    )
}

#[test]
fn http1_h2c_grpc_and_websockets_cross_the_mesh_over_pooled_http2() {
    let lab = protocols_lab();

    // HTTP/1.1 from the app: its sidecar carries it to the meshed endpoint over HTTP/2, and
    // the server-side sidecar gives the app HTTP/1.1 again, with the same headers.
    let (status, _, body) = curl_i(
        &lab,
        "client",
        &[
            "-H",
            "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "-H",
            "b3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1",
            "-H",
            "Connection: keep-alive, x-hop",
            "-H",
            "x-hop: 1",
            "-H",
            "Keep-Alive: timeout=5",
            "http://web:8080/seen?x=1",
        ],
    );
    assert_eq!(status, 200, "{body}");
    let seen = json(&body);
    assert_eq!(seen["version"], "HTTP/1.1", "{seen}");
    assert_eq!(seen["query"], "x=1");
    let h = &seen["headers"];
    assert_eq!(
        h["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    assert_eq!(
        h["b3"],
        "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"
    );
    assert_eq!(h["host"], "web:8080");
    assert_eq!(h["x-request-id"].as_str().map(str::len), Some(36), "{h}");
    for hop in ["x-hop", "keep-alive", "x-muon-orig-proto"] {
        assert!(h.get(hop).is_none(), "{hop} reached the app: {h}");
    }
    let served_by = seen["pod"].as_str().unwrap().to_string();
    let inbound = eventually(
        "the request on the server side",
        Duration::from_secs(5),
        || {
            requests(&lab, &served_by)
                .into_iter()
                .find(|e| e["path"] == "/seen?x=1")
        },
    );
    assert_eq!(inbound["direction"], "inbound");
    assert_eq!(
        inbound["protocol"], "HTTP/2",
        "between the sidecars: {inbound}"
    );
    assert_eq!(inbound["service"], "web.default");

    // HTTP/2 with prior knowledge from the app reaches the app as HTTP/2; the port's protocol
    // can also be left to detection (web-auto), for both.
    for url in ["http://web:8080/h2", "http://web-auto:8080/h2"] {
        let (out, err, ok) = lab.curl_with("client", &["--http2-prior-knowledge", url]);
        assert!(ok, "{err}");
        assert_eq!(json(&out)["version"], "HTTP/2.0", "{url}: {out}");
    }
    assert_eq!(
        get(&lab, "client", "http://web-auto:8080/h1")["version"],
        "HTTP/1.1"
    );

    // Balanced per request: one keep-alive connection from the app reaches both replicas (the
    // gRPC calls below show the same for one HTTP/2 connection; curl 7.88 cannot reuse an h2c
    // connection for several URLs).
    let urls: Vec<String> = (0..8).map(|i| format!("http://web:8080/lb/{i}")).collect();
    let mut args = vec!["-w", "\n"];
    args.extend(urls.iter().map(String::as_str));
    let opened_before = lab.metric(
        "client",
        "muon_tcp_connections_opened_total",
        &[("direction", "outbound")],
    );
    let (out, err, ok) = lab.curl_with("client", &args);
    assert!(ok, "{err}");
    let pods: std::collections::BTreeSet<String> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| json(l)["pod"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(pods.len(), 2, "8 requests on one connection: {pods:?}");
    let opened = lab.metric(
        "client",
        "muon_tcp_connections_opened_total",
        &[("direction", "outbound")],
    ) - opened_before;
    assert_eq!(opened, 1.0, "curl reused its connection (keep-alive)");

    // Bodies: chunked uploads and Expect: 100-continue, whole.
    let file = muon_tests::clients().join("upload.bin");
    std::fs::write(&file, vec![b'x'; 3 * 1024 * 1024]).unwrap();
    let data = format!("@{}", file.display());
    for extra in [
        ["-H", "Transfer-Encoding: chunked"],
        ["-H", "Expect: 100-continue"],
    ] {
        let mut args = extra.to_vec();
        args.extend(["--data-binary", &data, "http://web:8080/upload"]);
        let (status, _, body) = curl_i(&lab, "client", &args);
        assert_eq!(status, 200, "{extra:?}: {body}");
        assert_eq!(json(&body)["bodyBytes"], 3 * 1024 * 1024, "{extra:?}");
    }

    // A destination without a sidecar gets the app's own protocol, straight from the client's.
    let seen = get(&lab, "client", "http://plain:8080/");
    assert_eq!(seen["version"], "HTTP/1.1");
    assert!(seen["headers"].get("x-muon-orig-proto").is_none(), "{seen}");

    // A service without endpoints: the proxy answers, and says so.
    let (status, headers, body) = curl_i(&lab, "client", &["http://empty:8080/"]);
    assert_eq!(status, 503, "{body}");
    assert_eq!(headers["x-muon-error"], "no-healthy-endpoints");

    // gRPC: unary calls on one channel spread over both replicas; every kind of stream; a
    // message over 16 MiB; the server's status kept; the proxy's own status for a service
    // without endpoints.
    let target = "grpc:9090";
    let unary = lab.client_json(
        "client",
        "grpc_echo.py",
        &["call", "--target", target, "unary", "--count", "20"],
    );
    assert_eq!(unary["ok"], 20, "{unary}");
    let spread: Vec<&str> = unary["pods"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(spread, ["grpc-a", "grpc-b"], "{unary}");
    for (mode, n) in [
        ("server-stream", "50"),
        ("client-stream", "50"),
        ("bidi", "50"),
    ] {
        let r = lab.client_json(
            "client",
            "grpc_echo.py",
            &["call", "--target", target, mode, "--n", n],
        );
        assert_eq!(r["ok"], 50, "{mode}: {r}");
    }
    let size = (17 * 1024 * 1024).to_string();
    let big = lab.client_json(
        "client",
        "grpc_echo.py",
        &["call", "--target", target, "big", "--size", &size],
    );
    assert_eq!(big["bytes"], 17 * 1024 * 1024, "{big}");
    let fail = lab.client_json(
        "client",
        "grpc_echo.py",
        &["call", "--target", target, "fail"],
    );
    assert_eq!(fail["code"], "FAILED_PRECONDITION", "{fail}");
    let none = lab.client_json(
        "client",
        "grpc_echo.py",
        &["call", "--target", "grpc-empty:9090", "status"],
    );
    assert_eq!(none["code"], "UNAVAILABLE", "{none}");
    assert_eq!(none["details"], "no-healthy-endpoints", "{none}");

    // A GRPCRoute sends one method with one header to one replica.
    let route = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: pin}
spec:
  parentRefs: [{name: grpc}]
  rules:
    - matches:
        - method: {service: muon.test.Echo, method: Unary}
          headers: [{name: x-pin, value: b}]
      backendRefs: [{name: grpc-b, port: 9090}]
    - backendRefs: [{name: grpc, port: 9090}]
"#;
    let out = lab.ctl_with_file(&["apply"], route);
    assert!(out.status.success(), "{}", output_text(&out));
    eventually(
        "the GRPCRoute to pin calls",
        Duration::from_secs(15),
        || {
            let r = lab.client_json(
                "client",
                "grpc_echo.py",
                &[
                    "call",
                    "--target",
                    target,
                    "--metadata",
                    "x-pin=b",
                    "unary",
                    "--count",
                    "10",
                ],
            );
            (r["pods"].as_object().unwrap().keys().collect::<Vec<_>>() == ["grpc-b"]).then_some(())
        },
    );
    let r = lab.client_json(
        "client",
        "grpc_echo.py",
        &["call", "--target", target, "unary", "--count", "20"],
    );
    assert_eq!(
        r["pods"].as_object().unwrap().len(),
        2,
        "other calls still spread: {r}"
    );

    // WebSocket: the upgrade goes through, then bytes both ways on one connection.
    let ws = lab.client_json(
        "client",
        "ws_echo.py",
        &["call", "--url", "ws://ws:8765/chat", "--count", "5"],
    );
    assert_eq!(ws["ok"], 5, "{ws}");
    assert_eq!(ws["pod"], "ws");

    // One access event per request, with the fields the issue names.
    let e = eventually("the access event of /seen", Duration::from_secs(10), || {
        requests(&lab, "client")
            .into_iter()
            .find(|e| e["path"] == "/seen?x=1")
    });
    let e = &e;
    for (field, want) in [
        ("direction", "outbound"),
        ("method", "GET"),
        ("authority", "web:8080"),
        ("protocol", "HTTP/1.1"),
        ("service", "web.default"),
        ("route", ""),
    ] {
        assert_eq!(e[field], want, "{field}: {e}");
    }
    assert_eq!(e["status"], 200);
    assert!(e["endpoint"].as_str().unwrap().ends_with(":8080"), "{e}");
    assert!(e["pod"].as_str().unwrap().starts_with("web-"), "{e}");
    assert_eq!(
        e["request_id"], inbound["request_id"],
        "one request id on both sides"
    );
    assert!(
        e["duration_ms"].is_u64() && e["bytes_received"].as_u64() > Some(0),
        "{e}"
    );
    let grpc_event = eventually(
        "the gRPC call's access event",
        Duration::from_secs(10),
        || {
            requests(&lab, "client")
                .into_iter()
                .find(|e| e["path"] == "/muon.test.Echo/Fail")
        },
    );
    assert_eq!(grpc_event["grpc_status"], "9", "{grpc_event}");

    // Metrics: requests by service, route and status class; a latency histogram per service.
    let m = lab.metrics("client");
    let ok = metric_sum(
        &m,
        "muon_http_requests_total",
        &[
            ("direction", "outbound"),
            ("service", "web.default"),
            ("status_class", "2xx"),
        ],
    );
    assert!(ok >= 10.0, "{ok}");
    let unavailable = metric_sum(
        &m,
        "muon_http_requests_total",
        &[("service", "empty.default"), ("status_class", "5xx")],
    );
    assert_eq!(unavailable, 1.0);
    let pinned = metric_sum(
        &m,
        "muon_http_requests_total",
        &[
            ("service", "grpc.default"),
            ("route", "grpcroute/pin.default"),
        ],
    );
    assert!(pinned >= 10.0, "{pinned}");
    let count = metric_sum(
        &m,
        "muon_http_request_duration_seconds_count",
        &[("direction", "outbound"), ("service", "web.default")],
    );
    assert!(count >= ok, "{count}");
}

fn routing_lab() -> Lab {
    Lab::up(
        "route",
        &format!(
            r#"
pods:
  - name: client
  - name: web
    labels: {{app: web}}
    command: {web}
  - name: web-v2
    labels: {{app: web-v2}}
    command: {web}
  - name: shadow
    labels: {{app: shadow}}
    command: {web}
services:
  - name: web
    selector: {{app: web}}
    ports: [{{port: 8080, protocol: http}}]
  - name: web-v2
    selector: {{app: web-v2}}
    ports: [{{port: 8080, protocol: http}}]
  - name: shadow
    selector: {{app: shadow}}
    ports: [{{port: 8080, protocol: http}}]
"#,
            web = reflect(8080),
        ),
    )
}

const ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web}
spec:
  parentRefs: [{name: web, port: 8080}]
  rules:
    # Precedence: an Exact path wins over every prefix, then the longest prefix, then a
    # method, then the most headers, then the most query params (written out of order).
    - matches: [{path: {type: PathPrefix, value: /p}}]
      filters:
        - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-rule, value: prefix-p}]}}
      backendRefs: [{name: web, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /p/longer}}]
      filters:
        - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-rule, value: prefix-longer}]}}
      backendRefs: [{name: web, port: 8080}]
    - matches: [{path: {type: Exact, value: /p/longer/exact}}]
      filters:
        - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-rule, value: exact}]}}
      backendRefs: [{name: web, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /p}, method: POST}]
      filters:
        - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-rule, value: method}]}}
      backendRefs: [{name: web, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /p}, headers: [{name: x-a, value: "1"}]}]
      filters:
        - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-rule, value: one-header}]}}
      backendRefs: [{name: web, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /p}, headers: [{name: x-a, value: "1"}, {name: x-b, value: "2"}]}]
      filters:
        - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-rule, value: two-headers}]}}
      backendRefs: [{name: web, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /p}, headers: [{name: x-a, value: "1"}], queryParams: [{name: q, value: "1"}]}]
      filters:
        - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-rule, value: header-and-query}]}}
      backendRefs: [{name: web, port: 8080}]
    # A canary by header, and a 90/10 split by weight, to another service.
    - matches: [{path: {type: PathPrefix, value: /split}, headers: [{name: x-canary, value: "yes"}]}]
      backendRefs: [{name: web-v2, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /split}}]
      backendRefs: [{name: web, port: 8080, weight: 90}, {name: web-v2, port: 8080, weight: 10}]
    # Regular expressions.
    - matches: [{path: {type: RegularExpression, value: "/items/[0-9]+"}}]
      backendRefs: [{name: web-v2, port: 8080}]
    # Filters.
    - matches: [{path: {type: PathPrefix, value: /headers}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: x-set, value: "set"}]
            add: [{name: x-added, value: "added"}]
            remove: [x-secret]
        - type: ResponseHeaderModifier
          responseHeaderModifier:
            add: [{name: x-served-by, value: muon}]
            remove: [content-type]
      backendRefs: [{name: web, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /old}}]
      filters:
        - type: RequestRedirect
          requestRedirect: {hostname: shop.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}, statusCode: 301}
    - matches: [{path: {type: PathPrefix, value: /api}}]
      filters:
        - type: URLRewrite
          urlRewrite: {hostname: api.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
      backendRefs: [{name: web, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /mirrored}}]
      filters:
        - type: RequestMirror
          requestMirror: {backendRef: {name: shadow, port: 8080}}
      backendRefs: [{name: web, port: 8080}]
    # Timeouts: the whole request, and each request to a backend.
    - matches: [{path: {type: PathPrefix, value: /delay}}]
      timeouts: {request: 2s}
      backendRefs: [{name: web, port: 8080}]
    - matches: [{path: {type: PathPrefix, value: /backend-delay}}]
      timeouts: {request: 10s, backendRequest: 1s}
      filters:
        - type: URLRewrite
          urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /delay}}
      backendRefs: [{name: web, port: 8080}]
"#;

#[test]
fn httproutes_match_filter_split_and_time_out_as_the_gateway_api_says() {
    let lab = routing_lab();
    let out = lab.ctl_with_file(&["apply"], ROUTES);
    assert!(out.status.success(), "{}", output_text(&out));
    // With routes attached, what no rule matches gets 404.
    eventually(
        "the routes to reach the client",
        Duration::from_secs(15),
        || {
            let (_, _, ok) = lab.curl_with(
                "client",
                &["-f", "-o", "/dev/null", "http://web:8080/nothing"],
            );
            (!ok).then_some(())
        },
    );
    let (status, headers, _) = curl_i(&lab, "client", &["http://web:8080/nothing"]);
    assert_eq!(
        (status, headers["x-muon-error"].as_str()),
        (404, "no-route")
    );

    // Precedence.
    let rule = |args: &[&str]| -> String {
        let (out, err, ok) = lab.curl_with("client", args);
        assert!(ok, "{args:?}: {err}");
        let v: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"));
        v["headers"]["x-rule"].as_str().unwrap_or("").to_string()
    };
    assert_eq!(rule(&["http://web:8080/p/longer/exact"]), "exact");
    assert_eq!(rule(&["http://web:8080/p/longer/other"]), "prefix-longer");
    assert_eq!(rule(&["http://web:8080/p/x"]), "prefix-p");
    assert_eq!(rule(&["-X", "POST", "http://web:8080/p/x"]), "method");
    assert_eq!(rule(&["-H", "x-a: 1", "http://web:8080/p/x"]), "one-header");
    assert_eq!(
        rule(&["-H", "x-a: 1", "-H", "x-b: 2", "http://web:8080/p/x"]),
        "two-headers"
    );
    assert_eq!(
        rule(&["-H", "x-a: 1", "http://web:8080/p/x?q=1"]),
        "header-and-query"
    );
    // Dot segments are resolved before matching, and the app gets the resolved path.
    let (out, err, ok) = lab.curl_with(
        "client",
        &["--path-as-is", "http://web:8080/x/../p/longer/./exact"],
    );
    assert!(ok, "{err}");
    let seen = json(&out);
    assert_eq!(
        (&seen["headers"]["x-rule"], &seen["path"]),
        (&Value::from("exact"), &Value::from("/p/longer/exact")),
        "{seen}"
    );
    let (status, _, _) = curl_i(&lab, "client", &["http://web:8080/plonger"]);
    assert_eq!(status, 404, "the prefix /p does not match /plonger");

    // Header canary and regular expressions, to another service.
    assert_eq!(
        get(&lab, "client", "http://web:8080/items/42")["pod"],
        "web-v2"
    );
    assert!(curl_i(&lab, "client", &["http://web:8080/items/4x"]).0 == 404);
    let canary = lab
        .curl_with("client", &["-H", "x-canary: yes", "http://web:8080/split"])
        .0;
    assert_eq!(json(&canary)["pod"], "web-v2");

    // 90/10 over 2,000 requests on one keep-alive connection: within ±3 points.
    // (curl's URL globbing makes the 2,000 requests, so no --globoff here.)
    let out = lab.exec(
        "client",
        &[
            "curl",
            "-sS",
            "--max-time",
            "120",
            "-w",
            "\n",
            "http://web:8080/split/[1-2000]",
        ],
    );
    assert!(out.status.success(), "{}", output_text(&out));
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let answers: Vec<String> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| json(l)["pod"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(answers.len(), 2000);
    let v2 = answers.iter().filter(|p| *p == "web-v2").count();
    let share = v2 as f64 / 20.0;
    eprintln!("the 10% backend got {share:.1}% of 2000 requests");
    assert!((7.0..=13.0).contains(&share), "{share}%");

    // Request and response header modifiers.
    let (status, headers, body) = curl_i(
        &lab,
        "client",
        &[
            "-H",
            "x-secret: 1",
            "-H",
            "x-added: mine",
            "http://web:8080/headers",
        ],
    );
    assert_eq!(status, 200);
    let h = &json(&body)["headers"];
    assert_eq!(h["x-set"], "set");
    assert_eq!(h["x-added"], "mine,added", "add appends: {h}");
    assert!(h.get("x-secret").is_none(), "{h}");
    assert_eq!(headers["x-served-by"], "muon");
    assert!(!headers.contains_key("content-type"), "{headers:?}");

    // Redirect: the proxy answers; nothing reaches a backend.
    let (status, headers, _) = curl_i(&lab, "client", &["http://web:8080/old/cart?id=7"]);
    assert_eq!(status, 301);
    assert_eq!(
        headers["location"],
        "http://shop.example:8080/new/cart?id=7"
    );

    // Rewrite: host and path prefix.
    let seen = get(&lab, "client", "http://web:8080/api/items?n=1");
    assert_eq!(
        (seen["path"].as_str(), seen["query"].as_str()),
        (Some("/v2/items"), Some("n=1"))
    );
    assert_eq!(seen["headers"]["host"], "api.internal");

    // Mirror: the shadow service gets a copy; the client gets web's answer.
    let seen = get(&lab, "client", "http://web:8080/mirrored/1");
    assert_eq!(seen["pod"], "web");
    eventually(
        "the mirrored copy at the shadow",
        Duration::from_secs(10),
        || {
            requests(&lab, "shadow")
                .into_iter()
                .find(|e| e["path"] == "/mirrored/1" && e["status"] == 200)
        },
    );

    // Timeouts answer 504 at their bound (within 10%).
    for (url, bound) in [
        ("http://web:8080/delay/5000", 2.0),
        ("http://web:8080/backend-delay/5000", 1.0),
    ] {
        let (out, err, ok) = lab.curl_with(
            "client",
            &["-o", "/dev/null", "-w", "%{http_code} %{time_total}", url],
        );
        assert!(ok, "{err}");
        let (code, took) = out.split_once(' ').unwrap();
        let took: f64 = took.parse().unwrap();
        eprintln!("{url}: {code} after {took:.3}s (bound {bound}s)");
        assert_eq!(code, "504", "{url}");
        assert!(
            took >= bound && took <= bound * 1.1,
            "{url}: {took}s for a {bound}s bound"
        );
    }
    // A client that gives up before the answer is logged as such (status 499).
    let (_, _, ok) = lab.curl_with(
        "client",
        &["--max-time", "1", "http://web:8080/delay/3000?cancelled"],
    );
    assert!(!ok, "curl should have given up");
    let cancelled = eventually(
        "the cancelled request's access event",
        Duration::from_secs(10),
        || {
            requests(&lab, "client")
                .into_iter()
                .find(|e| e["path"] == "/delay/3000?cancelled")
        },
    );
    assert_eq!(
        (&cancelled["status"], &cancelled["error"]),
        (&Value::from(499), &Value::from("client-cancelled")),
        "{cancelled}"
    );
    let fast = lab
        .curl_with(
            "client",
            &[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "http://web:8080/delay/100",
            ],
        )
        .0;
    assert_eq!(fast, "200");

    // Every sidecar took the route (ACKed).
    let m = lab.metrics("client");
    assert!(
        metric_sum(
            &m,
            "muon_http_requests_total",
            &[("route", "web.default"), ("status_class", "2xx")]
        ) >= 2000.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "muon_http_requests_total",
            &[("route", "web.default"), ("status_class", "3xx")]
        ),
        1.0
    );
}

#[test]
fn server_first_protocols_abuse_and_100_connections_leave_the_sidecars_serving() {
    let lab = Lab::up(
        "abuse",
        &format!(
            r#"
pods:
  - name: client
    proxyArgs: ["--header-read-timeout", "2s"]
  - name: web
    labels: {{app: web}}
    command: {web}
  - name: smtp-tcp
    labels: {{app: smtp-tcp}}
    command: {banner_tcp}
  - name: smtp-auto
    labels: {{app: smtp-auto}}
    command: {banner_auto}
services:
  - name: web
    selector: {{app: web}}
    ports: [{{port: 8080, protocol: http}}]
  - name: smtp-tcp
    selector: {{app: smtp-tcp}}
    ports: [{{port: 2525, protocol: tcp}}]
  - name: smtp-auto
    selector: {{app: smtp-auto}}
    ports: [{{port: 2526}}]
"#,
            web = reflect(8080),
            banner_tcp = python("banner.py", r#""serve", "--port", "2525""#),
            banner_auto = python("banner.py", r#""serve", "--port", "2526""#),
        ),
    );
    let web = lab.service_vip("web", false);

    // A server that speaks first works on an opaque port, and on one left to detection (the
    // client's sidecar stops waiting for the client after --detect-timeout).
    for (svc, port) in [("smtp-tcp", "2525"), ("smtp-auto", "2526")] {
        let r = lab.client_json(
            "client",
            "banner.py",
            &["call", "--host", svc, "--port", port],
        );
        assert!(
            r["banner"]
                .as_str()
                .unwrap()
                .starts_with(&format!("220 {svc} ready")),
            "{svc}: {r}"
        );
        assert_eq!(r["reply"], "250 HELO x", "{svc}: {r}");
    }

    // Malformed and oversized requests get their 4xx (or a closed connection).
    let bad = lab.client_json(
        "client",
        "http_abuse.py",
        &["malformed", "--host", &web, "--port", "8080"],
    );
    assert!(bad["status"] == 400 || bad["closed"] == true, "{bad}");
    let big = lab.client_json(
        "client",
        "http_abuse.py",
        &[
            "oversized",
            "--host",
            &web,
            "--port",
            "8080",
            "--bytes",
            "100000",
        ],
    );
    assert_eq!(big["status"], 431, "{big}");
    assert_eq!(
        big["headers"]["x-muon-error"], "request-headers-too-large",
        "{big}"
    );
    let huge = lab.client_json(
        "client",
        "http_abuse.py",
        &[
            "oversized",
            "--host",
            &web,
            "--port",
            "8080",
            "--bytes",
            "2000000",
        ],
    );
    assert!(huge["status"] == 431 || huge["closed"] == true, "{huge}");
    // Slowloris: a header section that never ends is cut at --header-read-timeout.
    let slow = lab.client_json(
        "client",
        "http_abuse.py",
        &[
            "slowloris",
            "--host",
            &web,
            "--port",
            "8080",
            "--interval",
            "0.5",
            "--max",
            "20",
        ],
    );
    let closed = slow["closed_after"]
        .as_f64()
        .unwrap_or_else(|| panic!("never closed: {slow}"));
    assert!(closed < 15.0, "{slow}");

    // An HTTP/2 client that sends its preface and nothing more is sent away (GOAWAY) at
    // --header-read-timeout.
    let silent = lab.client_json(
        "client",
        "http_abuse.py",
        &["h2-silent", "--host", &web, "--port", "8080", "--max", "20"],
    );
    let closed = silent["closed_after"]
        .as_f64()
        .unwrap_or_else(|| panic!("never closed: {silent}"));
    assert!(closed < 15.0 && silent["goaway"] == true, "{silent}");

    // 100 client connections at once become a handful between the sidecars.
    let before = lab.metric(
        "web",
        "muon_tcp_connections_opened_total",
        &[("direction", "inbound")],
    );
    let script = format!(
        r#"
import socket, threading
socks = [socket.create_connection(("{web}", 8080), timeout=10) for _ in range(100)]
ok = []
def one(s, i):
    s.sendall(b"GET /many/%d HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n" % i)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    ok.append(data.startswith(b"HTTP/1.1 200"))
threads = [threading.Thread(target=one, args=(s, i)) for i, s in enumerate(socks)]
[t.start() for t in threads]
[t.join() for t in threads]
print(sum(ok))
"#
    );
    let out = lab.exec("client", &["python3", "-c", &script]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "100",
        "{}",
        output_text(&out)
    );
    let between = lab.metric(
        "web",
        "muon_tcp_connections_opened_total",
        &[("direction", "inbound")],
    ) - before;
    eprintln!("100 client connections became {between} between the sidecars");
    assert!(between <= 4.0, "{between} connections between the sidecars");

    // After all that, the sidecars still serve.
    assert_eq!(
        get(&lab, "client", "http://web:8080/still")["path"],
        "/still"
    );
}

/// A self-signed certificate for `shop.example` (openssl), in a world-readable directory.
fn certificate() -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = muon_tests::clients()
        .join(format!("tls-{:?}", std::thread::current().id()).replace(['(', ')'], ""));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=shop.example",
        ])
        .args(["-addext", "subjectAltName=DNS:shop.example"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "{}", output_text(&out));
    (cert, key)
}

#[test]
fn the_gateway_takes_clients_from_outside_the_mesh_over_tls_and_routes_by_host() {
    let (cert, key) = certificate();
    let host_port = 20000 + (std::process::id() % 20000) as u16;
    let lab = Lab::up(
        "gw",
        &format!(
            r#"
pods:
  - name: outsider
    sidecar: false
  - name: web
    labels: {{app: web}}
    replicas: 2
    command: {web}
services:
  - name: web
    selector: {{app: web}}
    ports: [{{port: 8080, protocol: http}}]
    traffic: {{loadBalancer: {{algorithm: RoundRobin}}}}
gateway:
  name: edge
  hostPort: {host_port}
  tls: {{certFile: "{cert}", keyFile: "{key}"}}
"#,
            web = reflect(8080),
            cert = cert.display(),
            key = key.display(),
        ),
    );
    let route = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop}
spec:
  parentRefs: [{name: edge, kind: Gateway}]
  hostnames: [shop.example]
  rules:
    - matches: [{path: {type: PathPrefix, value: /shop}}]
      filters:
        - type: URLRewrite
          urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
      backendRefs: [{name: web, port: 8080}]
"#;
    let out = lab.ctl_with_file(&["apply"], route);
    assert!(out.status.success(), "{}", output_text(&out));
    let out = output_text(&lab.ctl(&["get", "gateways"]));
    assert!(
        out.contains("edge") && out.contains("https:8443/HTTPS"),
        "{out}"
    );

    // From the host, through the forwarded port: TLS with ALPN, the route by host.
    let resolve = format!("shop.example:{host_port}:127.0.0.1");
    let url = format!("https://shop.example:{host_port}/shop/cart");
    let curl = |extra: &[&str], url: &str| {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&cert)
            .args(["--resolve", &resolve])
            .args(extra)
            .arg(url)
            .output()
            .expect("curl");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            output_text(&out),
        )
    };
    let seen = eventually("the route at the gateway", Duration::from_secs(15), || {
        let (out, _) = curl(&[], &url);
        serde_json::from_str::<Value>(&out)
            .ok()
            .filter(|v| v["path"] == "/cart")
    });
    assert_eq!(
        seen["version"], "HTTP/2.0",
        "curl negotiated h2 over TLS: {seen}"
    );
    let (out, _) = curl(&["--http1.1"], &url);
    let seen = json(&out);
    assert_eq!(seen["version"], "HTTP/1.1");
    assert_eq!(seen["headers"]["host"], format!("shop.example:{host_port}"));
    // Requests are balanced over the replicas.
    let pods: std::collections::BTreeSet<String> = (0..6)
        .map(|_| {
            json(&curl(&[], &url).0)["pod"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(pods.len(), 2, "{pods:?}");
    // Another host, or another path, has no route.
    let (out, text) = curl(&["-i"], &format!("https://shop.example:{host_port}/admin"));
    assert!(
        out.starts_with("HTTP/2 404") && out.contains("x-muon-error: no-route"),
        "{text}"
    );

    // From a pod outside the mesh, to the gateway's own address.
    let gw_ip = lab.pod_ip("edge");
    let cert_arg = cert.display().to_string();
    let resolve_in = format!("shop.example:8443:{gw_ip}");
    let (out, err, ok) = lab.curl_with(
        "outsider",
        &[
            "--cacert",
            &cert_arg,
            "--resolve",
            &resolve_in,
            "https://shop.example:8443/shop/x",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(json(&out)["path"], "/x");

    // The gateway logs each request, and connections are counted under its own direction.
    // (Log lines are written in batches, a few milliseconds after the request.)
    let e = eventually(
        "the gateway's access event",
        Duration::from_secs(10),
        || {
            muon_tests::access_events(&lab.app_log("edge"))
                .into_iter()
                .find(|e| e["message"] == "request" && e["path"] == "/shop/x")
        },
    );
    assert_eq!(e["direction"], "gateway");
    assert_eq!(e["route"], "shop.default");
    assert_eq!(e["service"], "web.default");
    let _ = Instant::now();
}
