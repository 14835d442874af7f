//! Sidecar injection for Kubernetes, end to end, with no cluster: `muonctl inject` on real
//! manifests, and a real `muon-control` serving its admission webhook over HTTPS to a client
//! that checks the certificate as the API server would, applies the returned JSONPatch with
//! Python's `jsonpatch` (not Muon's code), and compares the result with what `muonctl inject`
//! prints for the same pod. Every manifest is validated offline and strictly (unknown fields
//! fail) by `kubernetes-validate` against Kubernetes 1.33.

use muon_tests::{bin_dir, muonctl, python};
use serde_json::{json, Value};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const KUBERNETES_VERSION: &str = "1.33.0";

fn shop_yaml() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/muon-inject/testdata/shop.yaml")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `kubernetes-validate --strict` on a file.
fn validate(file: &Path) -> Output {
    Command::new(python())
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "-k",
            KUBERNETES_VERSION,
        ])
        .arg(file)
        .output()
        .expect("run kubernetes_validate")
}

fn assert_valid(file: &Path) -> String {
    let out = validate(file);
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "{} did not validate:\n{said}",
        file.display()
    );
    assert!(!said.contains("ERROR"), "{said}");
    said
}

fn inject(args: &[&str], file: &Path) -> Output {
    muonctl()
        .arg("inject")
        .args(args)
        .arg("-f")
        .arg(file)
        .output()
        .expect("run muonctl inject")
}

fn yaml_documents(s: &str) -> Vec<Value> {
    s.split("\n---\n")
        .map(|d| serde_norway::from_str::<Value>(d).expect("YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn muonctl_inject_output_for_a_realistic_deployment_validates_strictly_and_an_unknown_field_fails()
{
    let dir = tempfile::tempdir().unwrap();
    for mode in ["native", "classic"] {
        let out = inject(&["--sidecar-mode", mode], &shop_yaml());
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(
            text(&out.stderr),
            "",
            "nothing to report on a first injection"
        );
        let file = dir.path().join(format!("shop-{mode}.yaml"));
        std::fs::write(&file, &out.stdout).unwrap();
        let said = assert_valid(&file);
        for resource in [
            "namespace/shop",
            "serviceaccount/orders",
            "deployment/orders",
            "service/orders",
            "configmap/orders",
        ] {
            assert!(
                said.contains(&format!("passed for resource {resource}")),
                "{said}"
            );
        }
        let docs = yaml_documents(&text(&out.stdout));
        let pod = &docs[2]["spec"]["template"]["spec"];
        let (list, other) = match mode {
            "native" => ("initContainers", "containers"),
            _ => ("containers", "initContainers"),
        };
        let names = |l: &str| -> Vec<String> {
            pod[l]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["name"].as_str().unwrap().to_string())
                .collect()
        };
        assert!(
            names(list).contains(&"muon-proxy".to_string()),
            "{mode}: {:?}",
            names(list)
        );
        assert!(!names(other).contains(&"muon-proxy".to_string()), "{mode}");
        assert_eq!(names("initContainers")[0], "muon-init");

        // The negative control: the same output with one unknown field in the sidecar must
        // fail, or the validation above proved nothing.
        let mut docs = docs;
        let sidecar = docs[2]["spec"]["template"]["spec"][list]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|c| c["name"] == "muon-proxy")
            .unwrap();
        sidecar["drainPolicy"] = json!("graceful");
        let bad = dir.path().join(format!("shop-{mode}-unknown-field.yaml"));
        let joined: Vec<String> = docs
            .iter()
            .map(|d| serde_norway::to_string(d).unwrap())
            .collect();
        std::fs::write(&bad, joined.join("---\n")).unwrap();
        let out = validate(&bad);
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(
            !out.status.success(),
            "an unknown field passed strict validation:\n{said}"
        );
        assert!(said.contains("'drainPolicy' was unexpected"), "{said}");
    }
}

#[test]
fn muonctl_inject_twice_changes_nothing_and_says_the_pod_is_already_injected() {
    let dir = tempfile::tempdir().unwrap();
    let once = inject(&[], &shop_yaml());
    assert!(once.status.success(), "{}", text(&once.stderr));
    let file = dir.path().join("once.yaml");
    std::fs::write(&file, &once.stdout).unwrap();
    let twice = inject(&[], &file);
    assert!(twice.status.success(), "{}", text(&twice.stderr));
    assert_eq!(
        twice.stdout, once.stdout,
        "the second injection changed the output"
    );
    let stderr = text(&twice.stderr);
    assert!(
        stderr.contains("document 3 (Deployment shop/orders): already injected"),
        "{stderr}"
    );
}

#[test]
fn muonctl_inject_refuses_malformed_yaml_naming_the_document_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\nkind: Pod\nmetadata: {name: [x\n").unwrap();
    let out = inject(&[], &file);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stdout.is_empty(),
        "nothing is printed when a document is bad"
    );
    let stderr = text(&out.stderr);
    // The parser finds the unclosed list at the end of the document.
    assert!(
        stderr.contains("bad.yaml:7: document 2: did not find expected"),
        "{stderr}"
    );
}

/// A running muon-control with its webhook on 127.0.0.1, killed (by pid) on drop.
struct Control {
    child: Child,
    url: String,
    ca: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unused_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A CA and a serving certificate for the webhook signed by it (what `muonctl install` puts in
/// the `muon-webhook-tls` Secret and the caBundle).
fn webhook_certificate(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "muon-webhook-ca");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec![
        "muon-control.muon-system.svc".to_string(),
        "127.0.0.1".to_string(),
    ])
    .unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let paths = (dir.join("ca.crt"), dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

fn start_control(extra: &[&str]) -> Control {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = webhook_certificate(dir.path());
    let port = unused_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let log = std::fs::File::create(dir.path().join("muon-control.log")).unwrap();
    let child = Command::new(bin_dir().join("muon-control"))
        .args([
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .arg("--webhook-addr")
        .arg(addr.to_string())
        .arg("--webhook-cert")
        .arg(&cert)
        .arg("--webhook-key")
        .arg(&key)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start muon-control");
    let mut control = Control {
        child,
        url: format!("https://127.0.0.1:{port}"),
        ca,
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
        let log = std::fs::read_to_string(control.dir.path().join("muon-control.log"))
            .unwrap_or_default();
        if let Ok(Some(status)) = control.child.try_wait() {
            panic!("muon-control exited ({status}):\n{log}");
        }
        assert!(
            Instant::now() < deadline,
            "the webhook never listened:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    control
}

impl Control {
    /// POSTs `body` to `path` through tests/clients/admission.py.
    fn post(&self, path: &str, body: &[u8]) -> Value {
        let file = self.dir.path().join("body");
        std::fs::write(&file, body).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/admission.py");
        let out = Command::new(python())
            .arg(script)
            .arg(format!("{}{path}", self.url))
            .arg(&self.ca)
            .arg(&file)
            .output()
            .expect("run admission.py");
        assert!(
            out.status.success(),
            "admission.py failed:\n{}",
            text(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("admission.py prints JSON")
    }
}

fn admission_review(uid: &str, pod: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller", "groups": ["system:serviceaccounts"]},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }))
    .unwrap()
}

/// A pod as a ReplicaSet creates it: no name yet, only generateName.
fn replica_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "orders-7c9f8d6b5-",
            "namespace": "shop",
            "labels": {"app.kubernetes.io/name": "orders", "pod-template-hash": "7c9f8d6b5"},
            "annotations": {"muon.io/exclude-outbound-ports": "5432", "muon.io/proxy-memory": "96Mi"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "orders-7c9f8d6b5",
                "uid": "8d3c5e6a-1b2c-4d5e-8f90-a1b2c3d4e5f6", "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": {
            "serviceAccountName": "orders",
            "initContainers": [{"name": "migrate", "image": "ghcr.io/muon-mesh/demo-shop:0.1.0", "args": ["orders", "--migrate"]}],
            "containers": [{
                "name": "orders",
                "image": "ghcr.io/muon-mesh/demo-shop:0.1.0",
                "args": ["orders", "--listen", "0.0.0.0:8080"],
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
                "resources": {"requests": {"cpu": "200m", "memory": "128Mi"}},
            }],
            "volumes": [{"name": "kube-api-access-abcde", "projected": {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}]}}],
            "terminationGracePeriodSeconds": 30,
            "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst",
        },
    })
}

#[test]
fn the_webhooks_patch_for_a_generate_name_pod_gives_what_muonctl_inject_prints() {
    let control = start_control(&["--proxy-image", "registry.example/mesh/muon-proxy:e2e"]);
    let pod = replica_pod();
    let uid = "2c5d3a3e-6c1f-4c55-9a7e-7b0b1b2f9d10";
    let out = control.post("/inject", &admission_review(uid, &pod));
    assert_eq!(out["status"], 200, "{out}");
    let review = &out["review"];
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["kind"], "AdmissionReview");
    assert_eq!(review["response"]["uid"], uid);
    assert_eq!(review["response"]["allowed"], true);
    assert_eq!(review["response"]["patchType"], "JSONPatch");
    let patched = &out["patched"];
    assert!(patched.is_object(), "no patch: {out}");

    // What Kubernetes would store validates strictly (with the name the API server generates
    // after admission: kubernetes-validate needs one).
    let mut stored = patched.clone();
    stored["metadata"]["name"] = json!("orders-7c9f8d6b5-x2k9q");
    let file = control.dir.path().join("patched.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&stored).unwrap()).unwrap();
    assert_valid(&file);

    // ... and is exactly what `muonctl inject` makes of the same pod, with the same image.
    let pod_file = control.dir.path().join("pod.yaml");
    std::fs::write(&pod_file, serde_norway::to_string(&pod).unwrap()).unwrap();
    let cli = inject(
        &["--hub", "registry.example/mesh", "--tag", "e2e"],
        &pod_file,
    );
    assert!(cli.status.success(), "{}", text(&cli.stderr));
    let printed: Value = serde_norway::from_slice(&cli.stdout).unwrap();
    assert_eq!(patched, &printed);
    let status: Value = serde_json::from_str(
        patched["metadata"]["annotations"]["muon.io/status"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(status["image"], "registry.example/mesh/muon-proxy:e2e");
    let names: Vec<&str> = patched["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["muon-init", "muon-proxy", "migrate"]);
}

#[test]
fn the_webhook_refuses_what_is_not_a_review_and_admits_an_opted_out_pod_untouched() {
    let control = start_control(&[]);
    let out = control.post("/inject", b"this is not JSON");
    assert_eq!(out["status"], 400, "{out}");
    let why = out["text"].as_str().unwrap();
    assert!(why.starts_with("the body is not JSON"), "{why}");
    assert!(
        why.contains("AdmissionReview (admission.k8s.io/v1)"),
        "{why}"
    );

    let out = control.post("/mutate", &admission_review("u-1", &replica_pod()));
    assert_eq!(out["status"], 404, "{out}");

    let mut pod = replica_pod();
    pod["metadata"]["annotations"]["muon.io/inject"] = json!("disabled");
    let out = control.post("/inject", &admission_review("u-2", &pod));
    assert_eq!(out["status"], 200, "{out}");
    let response = &out["review"]["response"];
    assert_eq!(response["uid"], "u-2");
    assert_eq!(response["allowed"], true);
    assert!(response.get("patch").is_none(), "{response}");
    assert!(out["patched"].is_null());

    // A pod that cannot be injected is still admitted (never blocked), with a warning.
    let mut pod = replica_pod();
    pod["metadata"]["annotations"]["muon.io/proxy-cpu"] = json!("a lot");
    let out = control.post("/inject", &admission_review("u-3", &pod));
    let response = &out["review"]["response"];
    assert_eq!(response["allowed"], true);
    assert!(response.get("patch").is_none(), "{response}");
    let warning = response["warnings"][0].as_str().unwrap();
    assert!(warning.contains("muon.io/proxy-cpu"), "{warning}");
}
