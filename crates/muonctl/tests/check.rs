//! `muonctl check` against a fake API server: the objects of an install are rendered by
//! `muonctl install` itself (so the test follows what install writes), given the status
//! fields a cluster adds, and served read-only at the paths a real API server uses. A
//! healthy install passes every check; each broken one FAILs (or warns) on the line that
//! names the problem.

use bytes::Bytes;
use http_body_util::Full;
use serde::Deserialize as _;
use serde_json::{json, Value as Json};
use std::convert::Infallible;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

const BIN: &str = env!("CARGO_BIN_EXE_muonctl");

/// The objects a cluster holds, served at their API paths, and the requests it got.
#[derive(Clone, Default)]
struct FakeApi {
    objects: Arc<Vec<Json>>,
    /// Paths the caller may not read (403, as RBAC answers).
    forbidden: Arc<Vec<String>>,
    requests: Arc<Mutex<Vec<String>>>,
}

/// `/api/v1` or `/apis/<group>/<version>`, the collection and the object's own path.
fn paths(o: &Json) -> (String, String) {
    let av = o["apiVersion"].as_str().unwrap();
    let root = if av.contains('/') {
        format!("/apis/{av}")
    } else {
        format!("/api/{av}")
    };
    let plural = format!("{}s", o["kind"].as_str().unwrap().to_lowercase());
    let collection = match o["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{root}/namespaces/{ns}/{plural}"),
        None => format!("{root}/{plural}"),
    };
    let item = format!("{collection}/{}", o["metadata"]["name"].as_str().unwrap());
    (collection, item)
}

fn decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// Whether `o`'s labels match an equality `labelSelector` (`a=b,c=d`).
fn selected(o: &Json, selector: &str) -> bool {
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        let (k, v) = term.split_once('=').unwrap();
        o["metadata"]["labels"][k] == v
    })
}

impl FakeApi {
    fn answer(&self, method: &str, path: &str, query: &str) -> (u16, Json) {
        self.requests
            .lock()
            .unwrap()
            .push(format!("{method} {path}?{query}"));
        if method != "GET" {
            return (405, status(405, "MethodNotAllowed", "check only reads"));
        }
        if self.forbidden.iter().any(|f| f == path) {
            return (
                403,
                status(403, "Forbidden", "user \"dev\" cannot get this"),
            );
        }
        if path == "/version" {
            return (
                200,
                json!({"major": "1", "minor": "34", "gitVersion": "v1.34.1",
                       "gitCommit": "0", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
                       "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"}),
            );
        }
        if let Some(o) = self.objects.iter().find(|o| paths(o).1 == path) {
            return (200, o.clone());
        }
        let selector = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("labelSelector="))
            .map(decode)
            .unwrap_or_default();
        let plural = path.rsplit('/').next().unwrap_or("");
        let known = ["pods", "endpointslices", "namespaces"].contains(&plural)
            || self.objects.iter().any(|o| paths(o).0 == path);
        if known {
            let items: Vec<Json> = self
                .objects
                .iter()
                .filter(|o| paths(o).0 == path && selected(o, &selector))
                .cloned()
                .collect();
            return (
                200,
                json!({"apiVersion": "v1", "kind": "List",
                       "metadata": {"resourceVersion": "1"}, "items": items}),
            );
        }
        (404, status(404, "NotFound", &format!("{path} not found")))
    }

    /// Serves on 127.0.0.1 from a thread of its own; returns the URL.
    fn start(&self) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        listener.set_nonblocking(true).unwrap();
        let api = self.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let api = api.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let (code, body) = api.answer(
                                req.method().as_str(),
                                req.uri().path(),
                                req.uri().query().unwrap_or(""),
                            );
                            async move {
                                Ok::<_, Infallible>(
                                    hyper::Response::builder()
                                        .status(code)
                                        .header("content-type", "application/json")
                                        .body(Full::new(Bytes::from(body.to_string())))
                                        .unwrap(),
                                )
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
        url
    }
}

fn status(code: u16, reason: &str, message: &str) -> Json {
    json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn documents(yaml: &str) -> Vec<Json> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|doc| Json::deserialize(doc).expect("YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// What `muonctl install` writes, as the API server returns it: with the status a running
/// control plane has (CRDs established, 2 of 2 replicas available, a ready endpoint), plus
/// a namespace labelled for injection with an injected pod, a finished Job pod and a
/// hostNetwork pod (neither needs a sidecar).
fn healthy() -> Vec<Json> {
    let out = Command::new(BIN)
        .args(["install", "--replicas", "2"])
        .env_remove("MUON_HUB")
        .env_remove("MUON_TAG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut objects = documents(&String::from_utf8(out.stdout).unwrap());
    for o in &mut objects {
        match o["kind"].as_str().unwrap() {
            "CustomResourceDefinition" => {
                o["status"] = json!({
                    "acceptedNames": o["spec"]["names"].clone(),
                    "conditions": [
                        {"type": "NamesAccepted", "status": "True"},
                        {"type": "Established", "status": "True"},
                    ],
                    "storedVersions": ["v1alpha1"],
                })
            }
            "Deployment" => {
                o["status"] = json!({"replicas": 2, "readyReplicas": 2, "availableReplicas": 2})
            }
            _ => {}
        }
    }
    objects.push(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "muon-control-x7k2p", "namespace": "muon-system",
                     "labels": {"kubernetes.io/service-name": "muon-control"}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["10.1.0.5"], "conditions": {"ready": true}},
            {"addresses": ["10.1.0.6"], "conditions": {"ready": false}},
        ],
    }));
    objects.push(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"muon.io/inject": "enabled"}},
    }));
    objects.push(pod(
        "web-1",
        json!({"muon.io/status": "{}"}),
        json!({}),
        "Running",
    ));
    objects.push(pod("migrate-9", json!({}), json!({}), "Succeeded"));
    let mut node_agent = pod("agent-1", json!({}), json!({}), "Running");
    node_agent["spec"]["hostNetwork"] = json!(true);
    objects.push(node_agent);
    objects.push(pod(
        "legacy-1",
        json!({}),
        json!({"muon.io/inject": "disabled"}),
        "Running",
    ));
    objects
}

fn pod(name: &str, annotations: Json, labels: Json, phase: &str) -> Json {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "annotations": annotations, "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "shop/app:1"}]},
        "status": {"phase": phase},
    })
}

fn find<'a>(objects: &'a mut [Json], kind: &str, name: &str) -> &'a mut Json {
    objects
        .iter_mut()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// Runs `muonctl check` against a fake cluster holding `objects`: exit code, stdout, and the
/// requests the API server got.
fn check(objects: Vec<Json>) -> (i32, String, Vec<String>) {
    check_forbidden(objects, &[])
}

fn check_forbidden(objects: Vec<Json>, forbidden: &[&str]) -> (i32, String, Vec<String>) {
    let api = FakeApi {
        objects: Arc::new(objects),
        forbidden: Arc::new(forbidden.iter().map(|f| f.to_string()).collect()),
        ..Default::default()
    };
    let url = api.start();
    let out = muonctl(&["check", "--api", &url]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.stderr.is_empty(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let requests = api.requests.lock().unwrap().clone();
    (out.status.code().unwrap(), stdout, requests)
}

fn muonctl(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .expect("running muonctl")
}

/// The check lines (the summary after the blank line is not one).
fn lines(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .take_while(|l| !l.is_empty())
        .collect::<Vec<_>>()
}

fn line<'a>(stdout: &'a str, prefix: &str) -> &'a str {
    lines(stdout)
        .into_iter()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in\n{stdout}"))
}

#[test]
fn a_healthy_install_passes_every_check_with_only_gets() {
    let objects = healthy();
    let crds = objects
        .iter()
        .filter(|o| o["kind"] == "CustomResourceDefinition")
        .count();
    assert!(crds > 3);
    let (code, out, requests) = check(objects);
    assert_eq!(code, 0, "{out}");
    for l in lines(&out) {
        assert!(l.starts_with("ok   "), "not ok: {l}\n{out}");
    }
    assert_eq!(
        lines(&out)
            .iter()
            .filter(|l| l.contains(": present and established"))
            .count(),
        crds,
        "{out}"
    );
    line(&out, "ok   api-server: reachable, Kubernetes v1.34.1");
    line(&out, "ok   namespace muon-system: exists");
    line(
        &out,
        "ok   deployment muon-system/muon-control: 2 of 2 replicas available",
    );
    line(&out, "ok   version: control plane and muonctl are");
    line(
        &out,
        "ok   service muon-system/muon-control: 1 ready endpoints",
    );
    line(
        &out,
        "ok   webhook muon-sidecar-injector: calls service muon-system/muon-control",
    );
    line(&out, "ok   webhook failurePolicy: Ignore");
    line(&out, "ok   webhook caBundle: is the CA of the certificate in Secret muon-system/muon-webhook-tls");
    line(
        &out,
        "ok   injection: namespaces labelled muon.io/inject=enabled: shop",
    );
    // web-1 only: the finished, hostNetwork and opted-out pods need no sidecar.
    line(&out, "ok   pods in shop: all 1 have the sidecar");
    assert!(out.contains("0 warn, 0 FAIL"), "{out}");
    assert!(
        requests.iter().all(|r| r.starts_with("GET ")),
        "{requests:?}"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("GET /api/v1/namespaces?")
                && r.contains("labelSelector=muon.io%2Finject%3Denabled")),
        "{requests:?}"
    );
}

#[test]
fn a_missing_crd_fails_naming_it() {
    let mut objects = healthy();
    let i = objects
        .iter()
        .position(|o| o["kind"] == "CustomResourceDefinition")
        .unwrap();
    let name = objects.remove(i)["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, out, _) = check(objects);
    assert_eq!(code, 1, "{out}");
    let l = line(&out, &format!("FAIL crd {name}: missing"));
    assert!(
        l.contains("muonctl install --crds-only | kubectl apply -f -"),
        "{l}"
    );
    assert!(out.contains("1 FAIL"), "{out}");
}

#[test]
fn a_crd_not_established_fails() {
    let mut objects = healthy();
    let crd = objects
        .iter_mut()
        .find(|o| o["kind"] == "CustomResourceDefinition")
        .unwrap();
    crd["status"]["conditions"][1]["status"] = json!("False");
    let name = crd["metadata"]["name"].as_str().unwrap().to_string();
    let (code, out, _) = check(objects);
    assert_eq!(code, 1, "{out}");
    line(
        &out,
        &format!("FAIL crd {name}: present but not established"),
    );
}

#[test]
fn a_deployment_with_no_available_replica_fails_and_one_short_warns() {
    let mut objects = healthy();
    find(&mut objects, "Deployment", "muon-control")["status"]["availableReplicas"] = json!(0);
    let (code, out, _) = check(objects.clone());
    assert_eq!(code, 1, "{out}");
    let l = line(
        &out,
        "FAIL deployment muon-system/muon-control: 0 of 2 replicas available",
    );
    assert!(
        l.contains("kubectl -n muon-system describe deployment muon-control"),
        "{l}"
    );

    find(&mut objects, "Deployment", "muon-control")["status"]["availableReplicas"] = json!(1);
    let (code, out, _) = check(objects);
    assert_eq!(code, 0, "{out}");
    line(
        &out,
        "warn deployment muon-system/muon-control: 1 of 2 replicas available",
    );
}

#[test]
fn a_control_plane_of_another_version_warns() {
    let mut objects = healthy();
    find(&mut objects, "Deployment", "muon-control")["spec"]["template"]["spec"]["containers"][0]
        ["image"] = json!("ghcr.io/muon-mesh/muon-control:0.0.9");
    let (code, out, _) = check(objects);
    assert_eq!(code, 0, "{out}");
    let l = line(
        &out,
        "warn version: the control plane runs \"ghcr.io/muon-mesh/muon-control:0.0.9\"",
    );
    assert!(l.contains("use muonctl 0.0.9"), "{l}");
}

#[test]
fn a_service_without_ready_endpoints_fails() {
    let mut objects = healthy();
    find(&mut objects, "EndpointSlice", "muon-control-x7k2p")["endpoints"][0]["conditions"]
        ["ready"] = json!(false);
    let (code, out, _) = check(objects);
    assert_eq!(code, 1, "{out}");
    line(
        &out,
        "FAIL service muon-system/muon-control: no ready endpoints",
    );
}

#[test]
fn a_ca_bundle_that_is_not_the_certificates_ca_fails() {
    let mut objects = healthy();
    let other = healthy();
    let other_ca = other
        .iter()
        .find(|o| o["kind"] == "MutatingWebhookConfiguration")
        .unwrap()["webhooks"][0]["clientConfig"]["caBundle"]
        .clone();
    find(
        &mut objects,
        "MutatingWebhookConfiguration",
        "muon-sidecar-injector",
    )["webhooks"][0]["clientConfig"]["caBundle"] = other_ca;
    let (code, out, _) = check(objects.clone());
    assert_eq!(code, 1, "{out}");
    let l = line(
        &out,
        "FAIL webhook caBundle: does not verify the certificate in Secret muon-system/muon-webhook-tls",
    );
    assert!(l.contains("rollout restart deployment muon-control"), "{l}");

    find(
        &mut objects,
        "MutatingWebhookConfiguration",
        "muon-sidecar-injector",
    )["webhooks"][0]["clientConfig"]["caBundle"] = json!("");
    let (code, out, _) = check(objects);
    assert_eq!(code, 1, "{out}");
    line(&out, "FAIL webhook caBundle: empty");
}

#[test]
fn a_webhook_that_fails_closed_or_calls_another_service_fails() {
    let mut objects = healthy();
    let hook = &mut find(
        &mut objects,
        "MutatingWebhookConfiguration",
        "muon-sidecar-injector",
    )["webhooks"][0];
    hook["failurePolicy"] = json!("Fail");
    hook["clientConfig"]["service"]["name"] = json!("istiod");
    let (code, out, _) = check(objects);
    assert_eq!(code, 1, "{out}");
    line(&out, "FAIL webhook failurePolicy: Fail");
    line(
        &out,
        "FAIL webhook muon-sidecar-injector: it calls service muon-system/istiod, not muon-system/muon-control",
    );
    let mut objects = healthy();
    find(
        &mut objects,
        "MutatingWebhookConfiguration",
        "muon-sidecar-injector",
    )["webhooks"][0]["clientConfig"]["service"]["port"] = json!(8443);
    let (code, out, _) = check(objects);
    assert_eq!(code, 1, "{out}");
    line(
        &out,
        "FAIL webhook muon-sidecar-injector: it calls port 8443, the Service's webhook port is 443",
    );
}

#[test]
fn an_uninjected_pod_in_a_labelled_namespace_warns_naming_it() {
    let mut objects = healthy();
    objects.push(pod("orders-1", json!({}), json!({}), "Running"));
    let (code, out, _) = check(objects);
    assert_eq!(code, 0, "a warning is not a failure: {out}");
    let l = line(&out, "warn pods in shop: 1 of 2 have no sidecar");
    assert!(l.contains("orders-1"), "{l}");
    assert!(l.contains("kubectl -n shop rollout restart"), "{l}");
}

#[test]
fn no_install_at_all_fails_on_the_namespace_and_each_object() {
    let (code, out, _) = check(vec![]);
    assert_eq!(code, 1, "{out}");
    line(&out, "FAIL namespace muon-system: does not exist");
    line(
        &out,
        "FAIL deployment muon-system/muon-control: does not exist",
    );
    line(&out, "FAIL webhook muon-sidecar-injector: does not exist");
    line(
        &out,
        "warn injection: no namespace is labelled muon.io/inject=enabled",
    );
}

#[test]
fn an_unreachable_api_server_fails_at_once() {
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = muonctl(&["check", "--api", &format!("http://127.0.0.1:{port}")]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert_eq!(lines(&stdout).len(), 1, "{stdout}");
    line(&stdout, "FAIL api-server: not reachable");
}

#[test]
fn a_kubeconfig_is_followed_to_its_current_contexts_server() {
    let api = FakeApi {
        objects: Arc::new(healthy()),
        ..Default::default()
    };
    let url = api.start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("config");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters:\n- name: fake\n  cluster:\n    server: {url}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: nobody\n\
             users:\n- name: nobody\n  user: {{}}\n"
        ),
    )
    .unwrap();
    let out = muonctl(&["check", "--kubeconfig", kubeconfig.to_str().unwrap()]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    line(&stdout, "ok   api-server: reachable, Kubernetes v1.34.1");
    assert!(!api.requests.lock().unwrap().is_empty());

    let out = muonctl(&["check", "--kubeconfig", "/nonexistent/kubeconfig"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--kubeconfig /nonexistent/kubeconfig"),
        "{stderr}"
    );
}

#[test]
fn a_secret_the_user_may_not_read_only_warns_that_the_ca_bundle_is_unchecked() {
    let (code, out, _) = check_forbidden(
        healthy(),
        &["/api/v1/namespaces/muon-system/secrets/muon-webhook-tls"],
    );
    assert_eq!(code, 0, "{out}");
    let l = line(
        &out,
        "warn webhook caBundle: cannot compare it with Secret muon-system/muon-webhook-tls: forbidden for this user",
    );
    assert!(l.contains("cannot get this"), "{l}");
}
