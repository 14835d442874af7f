//! The injection library as its users see it: files and objects in, injected objects out.
//! The golden file `testdata/shop.injected.yaml` is what `muonctl inject` prints for
//! `testdata/shop.yaml`; review changes to it in the diff, regenerate it with
//! `MUON_UPDATE_GOLDEN=1 cargo test -p muon-inject --test inject`.

use muon_inject::patch;
use muon_inject::{inject_object, inject_pod_object, inject_yaml, Outcome, SidecarMode, Template};
use serde_json::{json, Value};
use std::path::Path;

fn pod(annotations: Value, spec_extra: Value) -> Value {
    let mut spec = json!({"containers": [{"name": "app", "image": "app:1"}]});
    for (k, v) in spec_extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ns", "annotations": annotations},
        "spec": spec,
    })
}

fn injected(v: &Value) -> (Value, Outcome) {
    inject_pod_object(v, &Template::default()).expect("injects")
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .map(|l| l.iter().map(|c| c["name"].as_str().unwrap()).collect())
        .unwrap_or_default()
}

fn container<'a>(spec: &'a Value, list: &str, name: &str) -> &'a Value {
    spec[list]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {list}"))
}

fn args(c: &Value) -> Vec<String> {
    c["args"]
        .as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn a_pod_gets_muon_init_and_a_native_sidecar_before_its_own_init_containers() {
    let p = pod(
        json!({}),
        json!({"initContainers": [{"name": "setup", "image": "s:1"}]}),
    );
    let (out, outcome) = injected(&p);
    assert_eq!(outcome, Outcome::Injected(SidecarMode::Native));
    let spec = &out["spec"];
    assert_eq!(
        names(&spec["initContainers"]),
        ["muon-init", "muon-proxy", "setup"]
    );
    assert_eq!(
        names(&spec["containers"]),
        ["app"],
        "the app's containers are untouched"
    );
    assert_eq!(spec["containers"], p["spec"]["containers"]);
    let proxy = container(spec, "initContainers", "muon-proxy");
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(
        proxy["startupProbe"]["httpGet"],
        json!({"path": "/ready", "port": 15020, "scheme": "HTTP"})
    );
    assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(proxy["readinessProbe"]["httpGet"]["port"], 15020);
    let sc = &proxy["securityContext"];
    assert_eq!(sc["runAsUser"], 1337);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"], json!({"drop": ["ALL"]}));
    assert!(proxy.get("lifecycle").is_none());
    let init = container(spec, "initContainers", "muon-init");
    assert_eq!(
        init["securityContext"]["capabilities"],
        json!({"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]})
    );
    assert_eq!(init["securityContext"]["privileged"], false);
    // Downward-API identity of the pod.
    let env: Vec<(&str, &str)> = proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?,
                e["valueFrom"]["fieldRef"]["fieldPath"].as_str()?,
            ))
        })
        .collect();
    assert_eq!(
        env,
        [
            ("POD_NAME", "metadata.name"),
            ("POD_NAMESPACE", "metadata.namespace"),
            ("POD_IP", "status.podIPs"),
            ("POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ]
    );
    // The projected token, audience muon-ca, at /var/run/secrets/muon/tokens/muon-ca.
    let token = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "muon-token")
        .unwrap();
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"],
        json!({"audience": "muon-ca", "expirationSeconds": 3600, "path": "muon-ca"})
    );
    assert!(proxy["volumeMounts"]
        .as_array()
        .unwrap()
        .contains(&json!({"name": "muon-token", "mountPath": "/var/run/secrets/muon/tokens", "readOnly": true})));
    // Annotations: Prometheus scraping and the status.
    let a = &out["metadata"]["annotations"];
    assert_eq!(a["prometheus.io/scrape"], "true");
    assert_eq!(a["prometheus.io/port"], "15020");
    assert_eq!(a["prometheus.io/path"], "/metrics");
    let status: Value = serde_json::from_str(a["muon.io/status"].as_str().unwrap()).unwrap();
    assert_eq!(status["mode"], "native");
    assert_eq!(status["initContainers"], json!(["muon-init", "muon-proxy"]));
    assert_eq!(status["image"], "ghcr.io/muon-mesh/muon-proxy:0.1.0");
    // The proxy drains for the pod's whole grace period (30s by default).
    assert!(
        args(proxy).contains(&"--drain-timeout=30s".to_string()),
        "{:?}",
        args(proxy)
    );
    assert!(args(proxy)
        .contains(&"--control-plane=https://muon-control.muon-system.svc:15010".to_string()));
}

#[test]
fn the_apps_own_prometheus_annotations_are_kept() {
    let p = pod(
        json!({"prometheus.io/scrape": "true", "prometheus.io/port": "9090"}),
        json!({}),
    );
    let (out, _) = injected(&p);
    let a = &out["metadata"]["annotations"];
    assert_eq!(a["prometheus.io/port"], "9090");
    assert!(a.get("prometheus.io/path").is_none());
}

#[test]
fn classic_mode_puts_the_proxy_first_and_holds_the_app_until_it_is_ready() {
    for (p, template) in [
        (
            pod(
                json!({"muon.io/sidecar-mode": "classic"}),
                json!({"terminationGracePeriodSeconds": 60}),
            ),
            Template::default(),
        ),
        (
            pod(json!({}), json!({"terminationGracePeriodSeconds": 60})),
            Template {
                mode: SidecarMode::Classic,
                ..Template::default()
            },
        ),
    ] {
        let (out, outcome) = inject_pod_object(&p, &template).unwrap();
        assert_eq!(outcome, Outcome::Injected(SidecarMode::Classic));
        let spec = &out["spec"];
        assert_eq!(names(&spec["initContainers"]), ["muon-init"]);
        assert_eq!(names(&spec["containers"]), ["muon-proxy", "app"]);
        let proxy = container(spec, "containers", "muon-proxy");
        assert!(proxy.get("restartPolicy").is_none());
        assert_eq!(
            proxy["lifecycle"]["postStart"]["exec"]["command"],
            json!([
                "/usr/local/bin/muon-init",
                "--wait-ready=127.0.0.1:15020",
                "--wait-timeout=5m"
            ])
        );
        // Keeps serving 5s while the app finishes, then drains for the rest of the grace.
        assert_eq!(
            proxy["lifecycle"]["preStop"],
            json!({"sleep": {"seconds": 5}})
        );
        assert!(args(proxy).contains(&"--drain-timeout=55s".to_string()));
    }
    // A short grace period: half of it as the pause.
    let p = pod(
        json!({"muon.io/sidecar-mode": "classic"}),
        json!({"terminationGracePeriodSeconds": 4}),
    );
    let (out, _) = injected(&p);
    let proxy = container(&out["spec"], "containers", "muon-proxy");
    assert_eq!(
        proxy["lifecycle"]["preStop"],
        json!({"sleep": {"seconds": 2}})
    );
    assert!(args(proxy).contains(&"--drain-timeout=2s".to_string()));
}

#[test]
fn annotations_become_muon_init_flags_and_proxy_settings() {
    let p = pod(
        json!({
            "muon.io/exclude-inbound-ports": "22, 9090",
            "muon.io/exclude-outbound-ports": "5432,6379",
            "muon.io/exclude-outbound-cidrs": "169.254.169.254, 10.1.0.0/16",
            "muon.io/proxy-cpu": "300m",
            "muon.io/proxy-memory": "200Mi",
            "muon.io/proxy-log-level": "debug",
        }),
        json!({}),
    );
    let (out, _) = injected(&p);
    let init = container(&out["spec"], "initContainers", "muon-init");
    assert_eq!(
        args(init),
        [
            "--exclude-inbound-ports=22,9090",
            "--exclude-outbound-ports=5432,6379",
            "--exclude-outbound-cidrs=169.254.169.254/32,10.1.0.0/16",
        ]
    );
    let proxy = container(&out["spec"], "initContainers", "muon-proxy");
    assert_eq!(
        proxy["resources"],
        json!({"requests": {"cpu": "300m", "memory": "200Mi"}, "limits": {"memory": "200Mi"}})
    );
    assert!(args(proxy).contains(&"--log-level=debug".to_string()));
    // Without annotations, muon-init runs with its defaults.
    let (out, _) = injected(&pod(json!({}), json!({})));
    assert!(container(&out["spec"], "initContainers", "muon-init")
        .get("args")
        .is_none());
}

#[test]
fn what_muon_init_and_muon_proxy_are_given_is_what_they_accept() {
    use clap::Parser;
    let p = pod(
        json!({
            "muon.io/exclude-inbound-ports": "22",
            "muon.io/exclude-outbound-ports": "5432",
            "muon.io/exclude-outbound-cidrs": "10.0.0.0/8,fd00::/8",
            "muon.io/proxy-log-level": "info,access=off",
            "muon.io/sidecar-mode": "classic",
        }),
        json!({}),
    );
    let (out, _) = injected(&p);
    let init = container(&out["spec"], "initContainers", "muon-init");
    let mut argv = vec!["muon-init".to_string()];
    argv.extend(args(init));
    let config =
        muon_init::Config::from_args(&muon_init::Args::try_parse_from(&argv).unwrap()).unwrap();
    assert_eq!(config.exclude_inbound_ports, [22]);
    assert_eq!(config.exclude_outbound_cidrs.len(), 2);
    let proxy = container(&out["spec"], "containers", "muon-proxy");
    let hook: Vec<String> = proxy["lifecycle"]["postStart"]["exec"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    let wait =
        muon_init::Config::from_args(&muon_init::Args::try_parse_from(&hook).unwrap()).unwrap();
    assert_eq!(wait.wait_ready.unwrap().addr.port(), 15020);

    // The proxy reads its trust bundle at start: give it a real one where the pod would.
    let dir = tempfile::tempdir().unwrap();
    let ca = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&ca).unwrap();
    let bundle = dir.path().join("ca.crt");
    std::fs::write(&bundle, cert.pem()).unwrap();
    let mut argv = vec!["muon-proxy".to_string()];
    for a in args(proxy) {
        argv.push(match a.strip_prefix("--ca-bundle=") {
            Some(path) => {
                assert_eq!(path, "/var/run/secrets/muon/ca/ca.crt");
                format!("--ca-bundle={}", bundle.display())
            }
            None => a,
        });
    }
    let parsed = muon_proxy::config::Args::try_parse_from(&argv).unwrap();
    let config = muon_proxy::config::Config::from_args(parsed).unwrap();
    assert_eq!(
        config.control_plane.as_deref(),
        Some("https://muon-control.muon-system.svc:15010")
    );
    assert_eq!(config.log_level, "info,access=off");
    assert_eq!(config.state_dir, Path::new("/var/lib/muon-proxy"));
    assert_eq!(config.drain_timeout, std::time::Duration::from_secs(25));
}

#[test]
fn every_workload_kind_is_injected_at_its_pod_template() {
    let template_of = |kind: &str, api: &str| -> Value {
        let pod_template = json!({"metadata": {"labels": {"app": "a"}}, "spec": {"containers": [{"name": "a", "image": "a:1"}]}});
        let spec = match kind {
            "CronJob" => {
                json!({"schedule": "* * * * *", "jobTemplate": {"spec": {"template": pod_template}}})
            }
            _ => json!({"selector": {"matchLabels": {"app": "a"}}, "template": pod_template}),
        };
        json!({"apiVersion": api, "kind": kind, "metadata": {"name": "w"}, "spec": spec})
    };
    for (kind, api, path) in [
        ("Deployment", "apps/v1", "/spec/template"),
        ("StatefulSet", "apps/v1", "/spec/template"),
        ("DaemonSet", "apps/v1", "/spec/template"),
        ("ReplicaSet", "apps/v1", "/spec/template"),
        ("Job", "batch/v1", "/spec/template"),
        ("CronJob", "batch/v1", "/spec/jobTemplate/spec/template"),
    ] {
        let original = template_of(kind, api);
        let mut obj = original.clone();
        let reports = inject_object(&mut obj, &Template::default()).unwrap();
        assert_eq!(
            reports[0].outcome,
            Outcome::Injected(SidecarMode::Native),
            "{kind}"
        );
        assert_eq!(reports[0].object, format!("{kind} w"));
        let pt = obj.pointer(path).unwrap();
        assert_eq!(
            names(&pt["spec"]["initContainers"]),
            ["muon-init", "muon-proxy"],
            "{kind}"
        );
        assert!(
            pt["metadata"]["annotations"]["muon.io/status"].is_string(),
            "{kind}"
        );
        // Only the pod template changed.
        let mut back = obj.clone();
        *back.pointer_mut(path).unwrap() = original.pointer(path).unwrap().clone();
        assert_eq!(back, original, "{kind}");
    }
}

#[test]
fn a_pod_template_without_metadata_gets_it() {
    let mut obj = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "w"},
        "spec": {"template": {"spec": {"containers": [{"name": "a", "image": "a"}]}}}});
    inject_object(&mut obj, &Template::default()).unwrap();
    assert!(obj["spec"]["template"]["metadata"]["annotations"]["muon.io/status"].is_string());
}

#[test]
fn opted_out_and_host_network_pods_are_left_alone() {
    let cases = [
        (
            pod(json!({"muon.io/inject": "disabled"}), json!({})),
            Outcome::Disabled,
        ),
        (
            {
                let mut p = pod(json!({}), json!({}));
                p["metadata"]["labels"] = json!({"muon.io/inject": "disabled"});
                p
            },
            Outcome::Disabled,
        ),
        (
            pod(json!({}), json!({"hostNetwork": true})),
            Outcome::HostNetwork,
        ),
    ];
    for (p, want) in cases {
        let (out, outcome) = injected(&p);
        assert_eq!(outcome, want);
        assert_eq!(out, p);
    }
    // A workload can opt out as a whole.
    let mut d = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "w", "annotations": {"muon.io/inject": "disabled"}},
        "spec": {"template": {"spec": {"containers": [{"name": "a", "image": "a"}]}}}});
    let before = d.clone();
    let r = inject_object(&mut d, &Template::default()).unwrap();
    assert_eq!(r[0].outcome, Outcome::Disabled);
    assert_eq!(d, before);
    // `enabled` on the pod injects; anything else is an error, not a guess.
    assert_eq!(
        injected(&pod(json!({"muon.io/inject": "enabled"}), json!({}))).1,
        Outcome::Injected(SidecarMode::Native)
    );
    let err = inject_pod_object(
        &pod(json!({"muon.io/inject": "no"}), json!({})),
        &Template::default(),
    )
    .unwrap_err();
    assert_eq!(
        err,
        ["annotation muon.io/inject: \"no\" is not \"enabled\" or \"disabled\""]
    );
}

#[test]
fn injecting_twice_changes_nothing_the_second_time() {
    let (once, _) = injected(&pod(json!({"muon.io/sidecar-mode": "classic"}), json!({})));
    let (twice, outcome) = injected(&once);
    assert_eq!(outcome, Outcome::AlreadyInjected);
    assert_eq!(twice, once);
    let text = std::fs::read_to_string(testdata("shop.yaml")).unwrap();
    let first = inject_yaml("shop.yaml", &text, &Template::default()).unwrap();
    let second = inject_yaml("shop.yaml", &first.text, &Template::default()).unwrap();
    assert_eq!(second.text, first.text, "byte for byte");
    let notes: Vec<String> = second
        .reports
        .iter()
        .filter(|r| r.object.outcome != Outcome::NotAWorkload)
        .map(|r| r.message())
        .collect();
    assert_eq!(notes, ["document 3 (Deployment shop/orders): already injected (muon.io/status is set): unchanged"]);
}

#[test]
fn muons_own_containers_without_the_status_are_an_error() {
    let p = pod(
        json!({}),
        json!({"initContainers": [{"name": "muon-init", "image": "x"}]}),
    );
    let err = inject_pod_object(&p, &Template::default()).unwrap_err();
    assert_eq!(err.len(), 1);
    assert!(
        err[0].starts_with("spec.initContainers already has \"muon-init\""),
        "{err:?}"
    );
}

fn testdata(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name)
}

#[test]
fn a_file_keeps_every_document_it_does_not_inject_byte_for_byte() {
    let text = std::fs::read_to_string(testdata("shop.yaml")).unwrap();
    let out = inject_yaml("shop.yaml", &text, &Template::default()).unwrap();
    let docs_in: Vec<&str> = text.split("\n---\n").collect();
    let docs_out: Vec<&str> = out.text.split("\n---\n").collect();
    assert_eq!(docs_in.len(), 5);
    assert_eq!(docs_out.len(), 5);
    for i in [0, 1, 3, 4] {
        assert_eq!(docs_in[i], docs_out[i], "document {} changed", i + 1);
    }
    assert_ne!(docs_in[2], docs_out[2]);
    let outcomes: Vec<(usize, Outcome)> = out
        .reports
        .iter()
        .map(|r| (r.document, r.object.outcome))
        .collect();
    assert_eq!(
        outcomes,
        [
            (1, Outcome::NotAWorkload),
            (2, Outcome::NotAWorkload),
            (3, Outcome::Injected(SidecarMode::Native)),
            (4, Outcome::NotAWorkload),
            (5, Outcome::NotAWorkload),
        ]
    );
    // The golden file: what `muonctl inject` prints.
    let golden = testdata("shop.injected.yaml");
    if std::env::var_os("MUON_UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &out.text).unwrap();
    }
    let want =
        std::fs::read_to_string(&golden).expect("the golden file (MUON_UPDATE_GOLDEN=1 writes it)");
    assert_eq!(
        out.text, want,
        "regenerate with MUON_UPDATE_GOLDEN=1 and review the diff"
    );
}

#[test]
fn separators_empty_documents_and_a_leading_marker_are_kept() {
    let text = "---\n# only a comment\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: a, image: a}]\n--- \nkind: Secret  # kept\n";
    let out = inject_yaml("f", text, &Template::default()).unwrap();
    assert!(
        out.text.starts_with("---\n# only a comment\n---\n"),
        "{}",
        out.text
    );
    assert!(
        out.text.ends_with("--- \nkind: Secret  # kept\n"),
        "{}",
        out.text
    );
    let back: Vec<Value> = out
        .text
        .split("---")
        .filter_map(|d| serde_norway::from_str::<Value>(d).ok())
        .filter(|v| !v.is_null())
        .collect();
    assert_eq!(back.len(), 2);
    assert!(back[0]["metadata"]["annotations"]["muon.io/status"].is_string());
}

#[test]
fn lists_are_injected_item_by_item_and_unknown_kinds_pass_through() {
    let list = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "b"}},
        {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"template": {}}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "n"},
         "spec": {"template": {"spec": {"containers": [{"name": "a", "image": "a"}]}}}},
    ]});
    let mut out = list.clone();
    let reports = inject_object(&mut out, &Template::default()).unwrap();
    let got: Vec<(Option<usize>, &str, Outcome)> = reports
        .iter()
        .map(|r| (r.item, r.object.as_str(), r.outcome))
        .collect();
    assert_eq!(
        got,
        [
            (Some(0), "ConfigMap c", Outcome::NotAWorkload),
            (Some(1), "Widget w", Outcome::NotAWorkload),
            (
                Some(2),
                "Deployment n/d",
                Outcome::Injected(SidecarMode::Native)
            ),
        ]
    );
    assert_eq!(out["items"][0], list["items"][0]);
    assert_eq!(out["items"][1], list["items"][1]);
    assert!(
        out["items"][2]["spec"]["template"]["metadata"]["annotations"]["muon.io/status"]
            .is_string()
    );
    // In a file too, with errors naming the item.
    let bad =
        "apiVersion: v1\nkind: List\nitems:\n- kind: Pod\n  metadata: {name: p}\n  spec: {}\n";
    let err = inject_yaml("l.yaml", bad, &Template::default()).unwrap_err();
    assert_eq!(
        err.problems,
        ["l.yaml:1: document 1 (List (unnamed)): items[0] (Pod p): spec.containers: a pod needs at least one container"]
    );
}

#[test]
fn bad_files_are_refused_with_every_problem_and_its_document() {
    let text = "kind: Pod\nmetadata: {name: ok}\nspec: {containers: [{name: a, image: a}]}\n---\nkind: Pod\nmetadata:\n  name: [unclosed\n---\n- just\n- a list\n---\nkind: Deployment\nmetadata: {name: d}\nspec:\n  template:\n    metadata:\n      annotations: {muon.io/proxy-cpu: lots}\n    spec: {containers: [{name: a, image: a}]}\n---\nkind: StatefulSet\nmetadata: {name: s}\nspec: {}\n";
    let err = inject_yaml("bad.yaml", text, &Template::default()).unwrap_err();
    let p = &err.problems;
    assert_eq!(p.len(), 4, "{p:#?}");
    assert!(p[0].starts_with("bad.yaml:8: document 2: "), "{}", p[0]);
    assert_eq!(
        p[1],
        "bad.yaml:9: document 3: not a Kubernetes object (a map with apiVersion and kind)"
    );
    assert_eq!(
        p[2],
        "bad.yaml:12: document 4 (Deployment d): annotation muon.io/proxy-cpu: \"lots\" is not a resource quantity like 100m or 128Mi"
    );
    assert_eq!(
        p[3],
        "bad.yaml:20: document 5 (StatefulSet s): spec.template is missing"
    );
    assert_eq!(
        inject_yaml("e.yaml", "# nothing\n", &Template::default())
            .unwrap_err()
            .problems,
        ["e.yaml: no objects in it"]
    );
}

#[test]
fn the_patch_between_a_pod_and_its_injection_gives_the_injected_pod() {
    let pods = [
        pod(json!({}), json!({})),
        pod(
            json!(null),
            json!({"initContainers": [{"name": "s", "image": "s"}], "volumes": [{"name": "v", "emptyDir": {}}]}),
        ),
        pod(
            json!({"muon.io/sidecar-mode": "classic", "a/b~c": "x"}),
            json!({}),
        ),
        {
            let mut p = pod(json!({}), json!({}));
            p["metadata"] = json!({"generateName": "web-", "namespace": "ns"});
            p
        },
    ];
    for p in pods {
        let (out, _) = injected(&p);
        let ops = patch::diff(&p, &out);
        assert!(!ops.is_empty());
        assert!(
            ops.iter().all(|o| o["op"] != "remove"),
            "injection removes nothing: {ops:#?}"
        );
        assert_eq!(patch::apply(&p, &ops).unwrap(), out);
    }
}

#[test]
fn a_pod_named_only_by_generate_name_is_injected_like_a_named_one() {
    let named = pod(json!({}), json!({}));
    let mut unnamed = named.clone();
    unnamed["metadata"] = json!({"generateName": "p-", "namespace": "ns", "annotations": {}});
    let (a, _) = injected(&named);
    let (b, _) = injected(&unnamed);
    assert_eq!(
        a["spec"], b["spec"],
        "nothing injected depends on the pod's name"
    );
}
