//! `muonctl install` and `deploy/`, checked offline with the real tools: every manifest
//! passes strict schema validation (kubernetes-validate, unknown fields fail), `helm template`
//! of the chart renders the same objects as `muonctl install`, `helm lint --strict` passes,
//! the checked-in CRDs are what the Rust types generate, the CRD schemas are structural, the
//! Dockerfiles build binaries the workspace has, the Grafana dashboard uses only metrics Muon
//! exports, and bad flags and values get clear errors.
//!
//! No cluster runs here; these are the checks that stand in for `kubectl apply`. The tools
//! come from `$MUON_K8S_TOOLS` (helm) and `$MUON_TEST_PYTHON` (a venv with
//! kubernetes-validate), both set up by `cargo xtask test`.

use base64::Engine as _;
use serde::Deserialize as _;
use serde_json::{json, Value as Json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_muonctl");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn chart() -> PathBuf {
    repo().join("deploy/helm/muon")
}

fn tool(var: &str, default: &str, name: &str) -> PathBuf {
    let path = PathBuf::from(std::env::var(var).unwrap_or_else(|_| default.to_string()));
    let path = if name.is_empty() {
        path
    } else {
        path.join(name)
    };
    assert!(
        path.exists(),
        "{} is missing: `cargo xtask test` installs it (or set {var})",
        path.display()
    );
    path
}

fn python() -> PathBuf {
    tool("MUON_TEST_PYTHON", "/opt/muon-ci/venv/bin/python", "")
}

/// `helm` with its cache, config and data in a temporary directory.
fn helm(home: &Path, args: &[&str]) -> Output {
    let helm = tool("MUON_K8S_TOOLS", "/opt/muon-ci/k8s-tools", "helm");
    Command::new(helm)
        .args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .output()
        .expect("running helm")
}

fn muonctl(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("MUON_HUB")
        .env_remove("MUON_TAG")
        .output()
        .expect("running muonctl")
}

fn stdout_ok(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn stderr_failed(what: &str, out: Output) -> String {
    assert!(
        !out.status.success(),
        "{what} should have failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every non-empty document of a multi-document YAML text.
fn documents(yaml: &str) -> Vec<Json> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|doc| Json::deserialize(doc).expect("YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// Objects keyed by (kind, namespace, name): comparisons that ignore order.
fn by_key(objects: Vec<Json>) -> BTreeMap<String, Json> {
    let mut out = BTreeMap::new();
    for o in objects {
        let key = format!(
            "{} {}/{}",
            o["kind"].as_str().unwrap_or("?"),
            o["metadata"]["namespace"].as_str().unwrap_or(""),
            o["metadata"]["name"].as_str().unwrap_or("?")
        );
        assert!(out.insert(key.clone(), o).is_none(), "{key} twice");
    }
    out
}

fn assert_same_objects(left_name: &str, left: &str, right_name: &str, right: &str) {
    let (l, r) = (by_key(documents(left)), by_key(documents(right)));
    let lk: Vec<_> = l.keys().collect();
    let rk: Vec<_> = r.keys().collect();
    assert_eq!(
        lk, rk,
        "{left_name} and {right_name} render different objects"
    );
    for (key, lo) in &l {
        assert!(
            lo == &r[key],
            "{key} differs:\n{left_name}: {}\n{right_name}: {}",
            serde_json::to_string_pretty(lo).unwrap(),
            serde_json::to_string_pretty(&r[key]).unwrap()
        );
    }
}

/// `kubernetes_validate --strict` on files: (success, its report).
fn validate(files: &[&Path]) -> (bool, String) {
    let out = Command::new(python())
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(files)
        .output()
        .expect("running kubernetes_validate");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), report)
}

fn assert_valid(file: &Path, objects: usize) {
    let (ok, report) = validate(&[file]);
    assert!(ok, "{} does not validate:\n{report}", file.display());
    let passed = report.lines().filter(|l| l.contains(" passed ")).count();
    assert_eq!(passed, objects, "{report}");
}

/// A webhook certificate, key and CA made by `muonctl install` itself, as PEM files.
struct Certs {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

fn certs() -> Certs {
    let yaml = stdout_ok("muonctl install", muonctl(&["install"]));
    let objects = documents(&yaml);
    let secret = objects
        .iter()
        .find(|o| o["kind"] == "Secret")
        .expect("a Secret");
    let dir = tempfile::tempdir().unwrap();
    let write = |field: &str, file: &str| {
        let pem = base64::engine::general_purpose::STANDARD
            .decode(secret["data"][field].as_str().unwrap())
            .unwrap();
        let path = dir.path().join(file);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let (cert, key, ca) = (
        write("tls.crt", "tls.crt"),
        write("tls.key", "tls.key"),
        write("ca.crt", "ca.crt"),
    );
    Certs {
        _dir: dir,
        cert,
        key,
        ca,
    }
}

impl Certs {
    fn flags(&self) -> Vec<String> {
        vec![
            "--webhook-cert".into(),
            self.cert.display().to_string(),
            "--webhook-key".into(),
            self.key.display().to_string(),
            "--webhook-ca".into(),
            self.ca.display().to_string(),
        ]
    }

    fn helm_values(&self) -> Vec<String> {
        vec![
            "--set-file".into(),
            format!("webhook.cert={}", self.cert.display()),
            "--set-file".into(),
            format!("webhook.key={}", self.key.display()),
            "--set-file".into(),
            format!("webhook.ca={}", self.ca.display()),
        ]
    }
}

fn install_with(certs: &Certs, extra: &[&str]) -> String {
    let mut args = vec!["install".to_string()];
    args.extend(certs.flags());
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    stdout_ok("muonctl install", muonctl(&args))
}

fn helm_template(home: &Path, certs: &Certs, extra: &[&str]) -> String {
    let chart = chart().display().to_string();
    let mut args: Vec<String> = [
        "template",
        "muon",
        &chart,
        "--namespace",
        "muon-system",
        "--include-crds",
        "--set",
        "namespace.create=true",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(certs.helm_values());
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    stdout_ok("helm template", helm(home, &args))
}

#[test]
fn install_output_passes_strict_kubernetes_validation() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs();
    for (extra, objects) in [(vec![], 16), (vec!["--replicas", "1"], 15)] {
        let file = dir.path().join("install.yaml");
        std::fs::write(&file, install_with(&certs, &extra)).unwrap();
        assert_valid(&file, objects);
    }
}

#[test]
fn strict_validation_refuses_an_unknown_field_the_negative_control() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certs();
    let mut objects = documents(&install_with(&certs, &[]));
    let deployment = objects
        .iter_mut()
        .find(|o| o["kind"] == "Deployment")
        .unwrap();
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] =
        json!({"path": "/ready", "port": 15014});
    let crd = objects
        .iter_mut()
        .find(|o| o["kind"] == "CustomResourceDefinition")
        .unwrap();
    crd["spec"]["scopee"] = json!("Namespaced");
    let yaml: String = objects
        .iter()
        .map(|o| format!("---\n{}", serde_norway::to_string(o).unwrap()))
        .collect();
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, yaml).unwrap();
    let (ok, report) = validate(&[&file]);
    assert!(!ok, "{report}");
    assert!(report.contains("'httpGett' was unexpected"), "{report}");
    assert!(report.contains("'scopee' was unexpected"), "{report}");
    let failed = report.lines().filter(|l| l.starts_with("ERROR")).count();
    assert_eq!(failed, 2, "{report}");
}

#[test]
fn helm_template_renders_what_muonctl_install_prints() {
    let home = tempfile::tempdir().unwrap();
    let certs = certs();
    // The defaults.
    let install = install_with(&certs, &[]);
    let helm = helm_template(home.path(), &certs, &[]);
    assert_same_objects("muonctl install", &install, "helm template", &helm);
    // Every flag and its value.
    let install = install_with(
        &certs,
        &[
            "--hub",
            "registry.example:5000/mesh",
            "--tag",
            "1.2.3-rc.1",
            "--replicas",
            "3",
            "--trust-domain",
            "prod.example",
        ],
    );
    let helm = helm_template(
        home.path(),
        &certs,
        &[
            "--set",
            "image.hub=registry.example:5000/mesh",
            "--set",
            "image.tag=1.2.3-rc.1",
            "--set",
            "replicas=3",
            "--set",
            "trustDomain=prod.example",
        ],
    );
    assert!(helm.contains("registry.example:5000/mesh/muon-proxy:1.2.3-rc.1"));
    assert_same_objects("muonctl install", &install, "helm template", &helm);
    // One replica: neither renders a PodDisruptionBudget.
    let install = install_with(&certs, &["--replicas", "1"]);
    let helm = helm_template(home.path(), &certs, &["--set", "replicas=1"]);
    assert!(!install.contains("PodDisruptionBudget"));
    assert_same_objects("muonctl install", &install, "helm template", &helm);
}

#[test]
fn install_is_deterministic_given_the_certificates() {
    let certs = certs();
    assert_eq!(install_with(&certs, &[]), install_with(&certs, &[]));
}

#[test]
fn the_rendered_chart_and_every_manifest_in_deploy_pass_strict_validation() {
    let home = tempfile::tempdir().unwrap();
    // The chart as `helm install` renders it: generated certificates, no Namespace.
    let chart = chart().display().to_string();
    let rendered = stdout_ok(
        "helm template",
        helm(
            home.path(),
            &[
                "template",
                "muon",
                &chart,
                "--namespace",
                "muon-system",
                "--include-crds",
            ],
        ),
    );
    let objects = documents(&rendered);
    assert_eq!(objects.len(), 15, "{rendered}");
    let secret = objects.iter().find(|o| o["kind"] == "Secret").unwrap();
    let webhook = objects
        .iter()
        .find(|o| o["kind"] == "MutatingWebhookConfiguration")
        .unwrap();
    assert_eq!(
        webhook["webhooks"][0]["clientConfig"]["caBundle"], secret["data"]["ca.crt"],
        "the caBundle is the CA of the generated certificate"
    );
    let file = home.path().join("rendered.yaml");
    std::fs::write(&file, &rendered).unwrap();
    assert_valid(&file, 15);
    // Helm's generated certificate passes the checks muonctl makes of given ones (chain to
    // the CA, the service's name, the key).
    let mut flags = vec!["install".to_string()];
    for (field, flag) in [
        ("tls.crt", "--webhook-cert"),
        ("tls.key", "--webhook-key"),
        ("ca.crt", "--webhook-ca"),
    ] {
        let pem = base64::engine::general_purpose::STANDARD
            .decode(secret["data"][field].as_str().unwrap())
            .unwrap();
        let path = home.path().join(field);
        std::fs::write(&path, pem).unwrap();
        flags.extend([flag.to_string(), path.display().to_string()]);
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    stdout_ok("muonctl install with helm's certificate", muonctl(&flags));

    // Every plain manifest under deploy/ (the chart's templates are checked rendered above).
    let mut manifests = Vec::new();
    let mut stack = vec![repo().join("deploy")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path.file_name().unwrap() != "templates" {
                    stack.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml")
                && !["Chart.yaml", "values.yaml"]
                    .contains(&path.file_name().unwrap().to_str().unwrap())
            {
                manifests.push(path);
            }
        }
    }
    assert!(
        manifests.iter().any(|p| p.ends_with("crds/muon.yaml")),
        "{manifests:?}"
    );
    for m in &manifests {
        let n = documents(&std::fs::read_to_string(m).unwrap()).len();
        assert_valid(m, n);
    }
}

#[test]
fn helm_lint_passes_strictly() {
    let home = tempfile::tempdir().unwrap();
    let chart = chart().display().to_string();
    let out = stdout_ok(
        "helm lint",
        helm(
            home.path(),
            &["lint", "--strict", &chart, "--namespace", "muon-system"],
        ),
    );
    assert!(out.contains("0 chart(s) failed"), "{out}");
    assert!(
        !out.contains("[WARNING]") && !out.contains("[ERROR]"),
        "{out}"
    );
}

/// `deploy/helm/muon/crds/muon.yaml` is what `muonctl install --crds-only` prints;
/// `MUON_UPDATE_GOLDEN=1` rewrites it.
#[test]
fn the_checked_in_crds_are_generated_from_the_rust_types() {
    let generated = stdout_ok(
        "muonctl install --crds-only",
        muonctl(&["install", "--crds-only"]),
    );
    let path = chart().join("crds/muon.yaml");
    if std::env::var_os("MUON_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap();
    assert!(
        checked_in == generated,
        "{} is stale: regenerate it with\n  cargo run -p muonctl -- install --crds-only > \
         deploy/helm/muon/crds/muon.yaml\n(or MUON_UPDATE_GOLDEN=1 cargo test -p muonctl --test install)",
        path.display()
    );
    // And `muonctl install` carries the same CRDs.
    let full = documents(&stdout_ok("muonctl install", muonctl(&["install"])));
    let crds: Vec<Json> = full
        .into_iter()
        .filter(|o| o["kind"] == "CustomResourceDefinition")
        .collect();
    assert_eq!(crds, documents(&generated));
}

/// Kubernetes' rules for structural schemas, checked independently of the generator.
fn check_structural(node: &Json, path: &str, problems: &mut Vec<String>) {
    let Some(o) = node.as_object() else {
        problems.push(format!("{path}: not an object"));
        return;
    };
    let typed = o.contains_key("type")
        || o.get("x-kubernetes-int-or-string") == Some(&json!(true))
        || o.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
    if !typed {
        problems.push(format!("{path}: no type"));
    }
    if let Some(t) = o.get("type") {
        if !["object", "array", "string", "integer", "number", "boolean"]
            .contains(&t.as_str().unwrap_or(""))
        {
            problems.push(format!("{path}: type {t}"));
        }
    }
    for bad in [
        "$ref", "$schema", "oneOf", "anyOf", "allOf", "not", "const", "nullable",
    ] {
        if o.contains_key(bad) {
            problems.push(format!("{path}: {bad}"));
        }
    }
    if o.contains_key("properties") && o.contains_key("additionalProperties") {
        problems.push(format!(
            "{path}: properties and additionalProperties together"
        ));
    }
    match o.get("additionalProperties") {
        None => {}
        Some(Json::Object(_)) => {
            check_structural(&o["additionalProperties"], &format!("{path}.*"), problems)
        }
        Some(other) => problems.push(format!("{path}: additionalProperties: {other}")),
    }
    if let Some(props) = o.get("properties").and_then(Json::as_object) {
        for (k, v) in props {
            check_structural(v, &format!("{path}.{k}"), problems);
        }
    }
    if let Some(items) = o.get("items") {
        check_structural(items, &format!("{path}[]"), problems);
    }
    if o.get("type") == Some(&json!("array")) && !o.contains_key("items") {
        problems.push(format!("{path}: an array without items"));
    }
}

#[test]
fn crd_schemas_are_structural_and_cover_every_muon_kind() {
    let crds = documents(&stdout_ok(
        "muonctl install --crds-only",
        muonctl(&["install", "--crds-only"]),
    ));
    let names: BTreeSet<&str> = crds
        .iter()
        .map(|c| c["metadata"]["name"].as_str().unwrap())
        .collect();
    for want in [
        "services.muon.io",
        "workloads.muon.io",
        "authorizationpolicies.muon.io",
        "peerauthentications.muon.io",
    ] {
        assert!(names.contains(want), "{want} missing from {names:?}");
    }
    let mut problems = Vec::new();
    for crd in &crds {
        let name = crd["metadata"]["name"].as_str().unwrap();
        assert_eq!(crd["spec"]["group"], "muon.io");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        let v = &crd["spec"]["versions"][0];
        assert_eq!(
            (v["name"].as_str(), v["served"].as_bool()),
            (Some("v1alpha1"), Some(true))
        );
        check_structural(&v["schema"]["openAPIV3Schema"], name, &mut problems);
        // The spec is what muon-core parses, field for field (camelCase, as serde names them).
        let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["type"], "object", "{name}");
    }
    assert!(problems.is_empty(), "{problems:#?}");
    let authz = crds
        .iter()
        .find(|c| c["spec"]["names"]["kind"] == "AuthorizationPolicy")
        .unwrap();
    let source = &authz["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"]["rules"]["items"]["properties"]["from"]["items"]["properties"]["source"];
    assert!(
        source["properties"]["notPrincipals"].is_object(),
        "{source}"
    );
}

#[test]
fn bad_flags_get_clear_errors() {
    let certs = certs();
    let err = stderr_failed(
        "bad flags",
        muonctl(&[
            "install",
            "--replicas",
            "0",
            "--hub",
            "Bad Hub",
            "--tag=-x",
            "--trust-domain",
            "Not_A_Domain",
        ]),
    );
    for want in [
        "--hub: \"Bad Hub\" is not an image registry",
        "--tag: \"-x\" is not an image tag",
        "--replicas: must be at least 1",
        "--trust-domain: ",
    ] {
        assert!(err.contains(want), "{want} missing from {err}");
    }
    let err = stderr_failed(
        "a tag in --hub",
        muonctl(&["install", "--hub", "ghcr.io/muon:1.0"]),
    );
    assert!(err.contains("give it with --tag"), "{err}");

    let cert = certs.cert.display().to_string();
    let err = stderr_failed(
        "--webhook-cert alone",
        muonctl(&["install", "--webhook-cert", &cert]),
    );
    assert!(
        err.contains("--webhook-key") && err.contains("--webhook-ca"),
        "{err}"
    );

    // A key that is not the certificate's, a CA that did not sign it, a file that is no PEM.
    let other = certs_from_another_install();
    let key = other.key.display().to_string();
    let (ca, own_ca, own_key) = (
        other.ca.display().to_string(),
        certs.ca.display().to_string(),
        certs.key.display().to_string(),
    );
    let cases = [
        (
            vec![&cert, &key, &own_ca],
            "--webhook-key is not the key of this certificate",
        ),
        (
            vec![&cert, &own_key, &ca],
            "not usable by the API server for muon-control.muon-system.svc",
        ),
        (
            vec![&own_key, &own_key, &own_ca],
            "holds no PEM certificate",
        ),
        (
            vec![&cert, &own_ca, &own_ca],
            "--webhook-key: not a PEM private key",
        ),
    ];
    for (files, want) in cases {
        let err = stderr_failed(
            want,
            muonctl(&[
                "install",
                "--webhook-cert",
                files[0],
                "--webhook-key",
                files[1],
                "--webhook-ca",
                files[2],
            ]),
        );
        assert!(err.contains(want), "{want} missing from {err}");
    }
    let err = stderr_failed(
        "a missing file",
        muonctl(&[
            "install",
            "--webhook-cert",
            "/nonexistent/tls.crt",
            "--webhook-key",
            &own_key,
            "--webhook-ca",
            &own_ca,
        ]),
    );
    assert!(
        err.contains("--webhook-cert /nonexistent/tls.crt: cannot read it"),
        "{err}"
    );
}

fn certs_from_another_install() -> Certs {
    certs()
}

#[test]
fn bad_helm_values_get_clear_errors() {
    let home = tempfile::tempdir().unwrap();
    let chart = chart().display().to_string();
    let template = |extra: &[&str]| {
        let mut args = vec!["template", "muon", &chart];
        args.extend_from_slice(extra);
        stderr_failed(
            &format!("helm template {extra:?}"),
            helm(home.path(), &args),
        )
    };
    let err = template(&["--namespace", "default"]);
    assert!(
        err.contains("Muon installs into the namespace muon-system, not \"default\""),
        "{err}"
    );
    let err = template(&["-n", "muon-system", "--set", "replicas=0"]);
    assert!(err.contains("replicas") && err.contains("minimum"), "{err}");
    let err = template(&["-n", "muon-system", "--set", "image.hub=Bad Hub"]);
    assert!(err.contains("image.hub") || err.contains("hub"), "{err}");
    let err = template(&["-n", "muon-system", "--set", "replica=3"]);
    assert!(err.contains("replica"), "{err}");
    let err = template(&["-n", "muon-system", "--set", "webhook.cert=x"]);
    assert!(
        err.contains("webhook.cert, webhook.key and webhook.ca go together"),
        "{err}"
    );
}

/// The chart's version, its images' default tag and muonctl's default `--tag` are the
/// workspace's version.
#[test]
fn the_charts_version_is_the_workspaces() {
    let chart: Json =
        serde_norway::from_str(&std::fs::read_to_string(chart().join("Chart.yaml")).unwrap())
            .unwrap();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(chart["version"], version);
    assert_eq!(chart["appVersion"], version);
    let install = stdout_ok("muonctl install", muonctl(&["install"]));
    assert!(install.contains(&format!("ghcr.io/muon-mesh/muon-control:{version}")));
}

/// The Dockerfiles build binaries that exist in the workspace, and run them as non-root.
#[test]
fn dockerfiles_build_the_workspaces_binaries_as_non_root() {
    let metadata = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(repo())
        .output()
        .unwrap();
    let metadata: Json = serde_json::from_slice(&metadata.stdout).expect("cargo metadata");
    let mut bins = BTreeMap::new();
    for p in metadata["packages"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            if t["kind"].as_array().unwrap().contains(&json!("bin")) {
                bins.insert(
                    t["name"].as_str().unwrap().to_string(),
                    p["name"].as_str().unwrap().to_string(),
                );
            }
        }
    }
    for (file, want, uid) in [
        ("proxy.Dockerfile", ["muon-proxy", "muon-init"], "1337"),
        ("control.Dockerfile", ["muon-control", "muonctl"], "1338"),
    ] {
        let text = std::fs::read_to_string(repo().join("deploy/docker").join(file)).unwrap();
        for bin in want {
            let package = bins
                .get(bin)
                .unwrap_or_else(|| panic!("{file}: no binary {bin} in the workspace"));
            assert!(
                text.contains(&format!("-p {package}")),
                "{file} builds {package}"
            );
            assert!(
                text.contains(&format!("target/release/{bin} ")),
                "{file} copies {bin}"
            );
        }
        let last_user = text
            .lines()
            .rfind(|l| l.starts_with("USER "))
            .unwrap_or_else(|| panic!("{file}: no USER"));
        assert_eq!(last_user, format!("USER {uid}:{uid}"), "{file}");
        assert!(
            text.lines().filter(|l| l.starts_with("FROM ")).count() >= 2,
            "{file} is multi-stage"
        );
    }
}

/// Metric and label names Muon registers: the `register("…")` calls and the label structs
/// of both metrics modules (the control plane's with its `muon_control` prefix).
fn exported_metrics() -> (BTreeSet<String>, BTreeSet<String>) {
    let register = regex::Regex::new(r#"register\(\s*"([a-z0-9_]+)""#).unwrap();
    let label_struct = regex::Regex::new(r"(?s)struct \w+Labels \{(.*?)\}").unwrap();
    let field = regex::Regex::new(r"(?m)^\s*(?:pub )?([a-z_]+):").unwrap();
    let mut metrics = BTreeSet::new();
    let mut labels = BTreeSet::from(["le".to_string()]);
    for (file, prefix) in [
        ("crates/muon-proxy/src/metrics.rs", ""),
        ("crates/muon-control/src/metrics.rs", "muon_control_"),
    ] {
        let text = std::fs::read_to_string(repo().join(file)).unwrap();
        for c in register.captures_iter(&text) {
            metrics.insert(format!("{prefix}{}", &c[1]));
        }
        for s in label_struct.captures_iter(&text) {
            for f in field.captures_iter(&s[1]) {
                labels.insert(f[1].to_string());
            }
        }
    }
    (metrics, labels)
}

#[test]
fn the_grafana_dashboard_uses_only_metrics_muon_exports() {
    let (metrics, labels) = exported_metrics();
    assert!(metrics.contains("muon_http_requests"), "{metrics:?}");
    assert!(
        metrics.contains("muon_control_proxies_connected"),
        "{metrics:?}"
    );
    let text = std::fs::read_to_string(repo().join("deploy/grafana/muon-mesh.json")).unwrap();
    let dashboard: Json = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "muon-mesh");
    let name = regex::Regex::new(r"\bmuon_[a-z0-9_]+").unwrap();
    let matcher = regex::Regex::new(r#"([a-z_]+)\s*(?:=|!=|=~|!~)\s*""#).unwrap();
    let by = regex::Regex::new(r"by \(([a-z_, ]+)\)").unwrap();
    let mut exprs = 0;
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            exprs += 1;
            for m in name.find_iter(expr) {
                let m = m.as_str();
                let base = ["_bucket", "_sum", "_count", "_total"]
                    .iter()
                    .find_map(|s| m.strip_suffix(s))
                    .unwrap_or(m);
                assert!(metrics.contains(base), "{m} in {expr:?} is not exported");
                used.insert(base.to_string());
            }
            let label_uses = matcher.captures_iter(expr).map(|c| c[1].to_string()).chain(
                by.captures_iter(expr).flat_map(|c| {
                    c[1].split(',')
                        .map(|l| l.trim().to_string())
                        .collect::<Vec<_>>()
                }),
            );
            for l in label_uses {
                assert!(labels.contains(&l), "label {l} in {expr:?} is not exported");
            }
        }
    }
    assert!(exprs >= 20, "{exprs} queries");
    assert!(used.len() >= 20, "{used:?}");
}
