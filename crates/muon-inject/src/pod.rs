//! One pod: decide (opted out? hostNetwork? already injected?) and, if it is to be meshed,
//! add muon-init, the sidecar, their volumes and annotations. The containers are built here,
//! in one place, so the CLI and the webhook add exactly the same thing.

use crate::annotations::{self, Settings, DEFAULT_PROXY_MEMORY, DEFAULT_PROXY_MEMORY_LIMIT};
use crate::template::*;
use muon_core::ports;
use serde_json::{json, Map, Value};

/// What happened to a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodOutcome {
    /// Muon was added, in this mode.
    Injected(SidecarMode),
    /// It carries `muon.io/status`: left as it is.
    AlreadyInjected,
    /// `muon.io/inject: disabled` (annotation or label).
    Disabled,
    /// `hostNetwork: true`: capture would redirect the node's traffic, so it is left alone.
    HostNetwork,
}

/// The Kubernetes default when a pod does not say.
const DEFAULT_GRACE_SECONDS: u64 = 30;
/// A classic sidecar keeps serving this long after the pod is told to stop (its preStop),
/// so the app can finish its in-flight requests and the calls they make; then it drains.
const CLASSIC_DRAIN_DELAY_SECONDS: u64 = 5;

/// What `muon.io/inject` says on this metadata (annotation first, then label): `Some(true)`
/// for `enabled`, `Some(false)` for `disabled`.
pub fn inject_choice(meta: &Map<String, Value>) -> Result<Option<bool>, String> {
    for field in ["annotations", "labels"] {
        match meta.get(field).and_then(|m| m.get(ANNOTATION_INJECT)) {
            None => continue,
            Some(Value::String(s)) if s == "enabled" => return Ok(Some(true)),
            Some(Value::String(s)) if s == "disabled" => return Ok(Some(false)),
            Some(other) => {
                return Err(format!(
                    "{} {ANNOTATION_INJECT}: {other} is not \"enabled\" or \"disabled\"",
                    &field[..field.len() - 1]
                ))
            }
        }
    }
    Ok(None)
}

/// Injects one pod given its metadata and spec (a Pod's, or a workload's pod template's).
/// Nothing is changed unless the outcome is `Injected`.
pub fn inject_pod(
    meta: &mut Map<String, Value>,
    spec: &mut Map<String, Value>,
    template: &Template,
) -> Result<PodOutcome, Vec<String>> {
    let annotations = match meta.get("annotations") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(vec!["metadata.annotations is not a map".into()]),
    };
    if annotations.contains_key(ANNOTATION_STATUS) {
        return Ok(PodOutcome::AlreadyInjected);
    }
    if inject_choice(meta).map_err(|e| vec![e])? == Some(false) {
        return Ok(PodOutcome::Disabled);
    }
    if spec.get("hostNetwork") == Some(&Value::Bool(true)) {
        return Ok(PodOutcome::HostNetwork);
    }
    let mut problems = Vec::new();
    if let Err(e) = template.check() {
        problems.push(e);
    }
    let settings = match annotations::settings(&annotations, template) {
        Ok(s) => Some(s),
        Err(e) => {
            problems.extend(e);
            None
        }
    };
    check_spec(spec, &mut problems);
    let grace = match spec.get("terminationGracePeriodSeconds") {
        None | Some(Value::Null) => DEFAULT_GRACE_SECONDS,
        Some(v) => v.as_u64().unwrap_or_else(|| {
            problems.push(format!(
                "spec.terminationGracePeriodSeconds: {v} is not a number of seconds"
            ));
            DEFAULT_GRACE_SECONDS
        }),
    };
    let Some(settings) = settings.filter(|_| problems.is_empty()) else {
        return Err(problems);
    };

    let mode = settings.mode;
    let (delay, drain) = match mode {
        SidecarMode::Native => (0, grace),
        SidecarMode::Classic => {
            let delay = CLASSIC_DRAIN_DELAY_SECONDS.min(grace / 2);
            (delay, grace - delay)
        }
    };
    let init = init_container(template, &settings);
    let proxy = proxy_container(template, &settings, delay, drain);
    let (init_names, container_names) = match mode {
        SidecarMode::Native => {
            prepend(spec, "initContainers", vec![init, proxy]);
            (vec![INIT_CONTAINER, PROXY_CONTAINER], vec![])
        }
        SidecarMode::Classic => {
            prepend(spec, "initContainers", vec![init]);
            prepend(spec, "containers", vec![proxy]);
            (vec![INIT_CONTAINER], vec![PROXY_CONTAINER])
        }
    };
    append(spec, "volumes", volumes());

    let annotations = object_at(meta, "annotations");
    let mut prometheus = false;
    if !annotations.keys().any(|k| k.starts_with("prometheus.io/")) {
        // The app's own scrape settings win; without any, Prometheus scrapes the sidecar.
        annotations.insert("prometheus.io/scrape".into(), "true".into());
        annotations.insert(
            "prometheus.io/port".into(),
            ports::HEALTH.to_string().into(),
        );
        annotations.insert("prometheus.io/path".into(), "/metrics".into());
        prometheus = true;
    }
    let status = json!({
        "version": DEFAULT_TAG,
        "mode": mode.as_str(),
        "image": template.proxy_image,
        "initContainers": init_names,
        "containers": container_names,
        "volumes": [TOKEN_VOLUME, CA_VOLUME, STATE_VOLUME],
        "prometheus": prometheus,
    });
    annotations.insert(ANNOTATION_STATUS.into(), status.to_string().into());
    Ok(PodOutcome::Injected(mode))
}

/// What must hold before anything is added: the lists are lists, and nothing of Muon's is
/// there already (a pod carrying Muon's containers without the status annotation was edited
/// by hand: injecting again would duplicate them).
fn check_spec(spec: &Map<String, Value>, problems: &mut Vec<String>) {
    match spec.get("containers") {
        Some(Value::Array(c)) if !c.is_empty() => {}
        _ => problems.push("spec.containers: a pod needs at least one container".into()),
    }
    for (field, ours) in [
        ("containers", &[PROXY_CONTAINER, INIT_CONTAINER][..]),
        ("initContainers", &[PROXY_CONTAINER, INIT_CONTAINER][..]),
        ("volumes", &[TOKEN_VOLUME, CA_VOLUME, STATE_VOLUME][..]),
    ] {
        match spec.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                for name in items.iter().filter_map(|i| i.get("name")?.as_str()) {
                    if ours.contains(&name) {
                        problems.push(format!(
                            "spec.{field} already has {name:?} but the pod has no \
                             {ANNOTATION_STATUS} annotation: remove it, or add the annotation \
                             if Muon is already there"
                        ));
                    }
                }
            }
            Some(_) => problems.push(format!("spec.{field} is not a list")),
        }
    }
}

/// The map at `key`, created when missing (or null).
fn object_at<'a>(m: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let slot = m.entry(key).or_insert(Value::Null);
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    match slot {
        Value::Object(o) => o,
        _ => unreachable!("just made an object"),
    }
}

fn list_at<'a>(m: &'a mut Map<String, Value>, key: &str) -> &'a mut Vec<Value> {
    let slot = m.entry(key).or_insert(Value::Null);
    if !slot.is_array() {
        *slot = Value::Array(Vec::new());
    }
    match slot {
        Value::Array(a) => a,
        _ => unreachable!("just made a list"),
    }
}

fn prepend(spec: &mut Map<String, Value>, key: &str, items: Vec<Value>) {
    let list = list_at(spec, key);
    let rest = std::mem::take(list);
    list.extend(items);
    list.extend(rest);
}

fn append(spec: &mut Map<String, Value>, key: &str, items: Vec<Value>) {
    list_at(spec, key).extend(items);
}

fn init_container(t: &Template, s: &Settings) -> Value {
    let mut c = json!({
        "name": INIT_CONTAINER,
        "image": t.proxy_image,
        "command": [INIT_BIN],
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"cpu": "100m", "memory": "64Mi"},
        },
        "securityContext": {
            // iptables needs root in the pod's network namespace, and these two only.
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": false,
            "privileged": false,
            "allowPrivilegeEscalation": false,
            // iptables-legacy takes a lock file under /run.
            "readOnlyRootFilesystem": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    });
    if !s.init_args.is_empty() {
        c["args"] = json!(s.init_args);
    }
    c
}

fn proxy_container(t: &Template, s: &Settings, delay: u64, drain: u64) -> Value {
    let health = i64::from(ports::HEALTH);
    let get = |path: &str| json!({"path": path, "port": health, "scheme": "HTTP"});
    let (memory_request, memory_limit) = match &s.memory {
        Some(m) => (m.as_str(), m.as_str()),
        None => (DEFAULT_PROXY_MEMORY, DEFAULT_PROXY_MEMORY_LIMIT),
    };
    let field = |path: &str| json!({"fieldRef": {"apiVersion": "v1", "fieldPath": path}});
    let mut c = json!({
        "name": PROXY_CONTAINER,
        "image": t.proxy_image,
        "command": [PROXY_BIN],
        "args": [
            format!("--control-plane={}", t.control_plane_url()),
            format!("--ca-bundle={CA_DIR}/{CA_KEY}"),
            format!("--state-dir={STATE_DIR}"),
            "--log-format=json",
            format!("--log-level={}", s.log_level),
            format!("--drain-timeout={drain}s"),
        ],
        "env": [
            {"name": "POD_NAME", "valueFrom": field("metadata.name")},
            {"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")},
            {"name": "POD_IP", "valueFrom": field("status.podIPs")},
            {"name": "POD_SERVICE_ACCOUNT", "valueFrom": field("spec.serviceAccountName")},
            {"name": "MUON_KUBERNETES_TOKEN_FILE", "value": format!("{TOKEN_DIR}/{TOKEN_AUDIENCE}")},
        ],
        "ports": [{"name": "muon-health", "containerPort": health, "protocol": "TCP"}],
        "startupProbe": {
            "httpGet": get("/ready"),
            "periodSeconds": 1,
            "timeoutSeconds": 1,
            "failureThreshold": 300,
        },
        "readinessProbe": {
            "httpGet": get("/ready"),
            "periodSeconds": 2,
            "timeoutSeconds": 1,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": get("/live"),
            "periodSeconds": 10,
            "timeoutSeconds": 1,
            "failureThreshold": 3,
        },
        "resources": {
            "requests": {"cpu": s.cpu, "memory": memory_request},
            "limits": {"memory": memory_limit},
        },
        "securityContext": {
            "runAsUser": ports::PROXY_UID,
            "runAsGroup": ports::PROXY_UID,
            "runAsNonRoot": true,
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true},
            {"name": CA_VOLUME, "mountPath": CA_DIR, "readOnly": true},
            {"name": STATE_VOLUME, "mountPath": STATE_DIR},
        ],
    });
    match s.mode {
        SidecarMode::Native => {
            c["restartPolicy"] = "Always".into();
        }
        SidecarMode::Classic => {
            let mut lifecycle = json!({
                // The kubelet starts the next container once this returns.
                "postStart": {"exec": {"command": [
                    INIT_BIN,
                    format!("--wait-ready=127.0.0.1:{}", ports::HEALTH),
                    "--wait-timeout=5m",
                ]}},
            });
            if delay > 0 {
                lifecycle["preStop"] = json!({"sleep": {"seconds": delay}});
            }
            c["lifecycle"] = lifecycle;
        }
    }
    c
}

fn volumes() -> Vec<Value> {
    vec![
        json!({"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
            "audience": TOKEN_AUDIENCE,
            "expirationSeconds": 3600,
            "path": TOKEN_AUDIENCE,
        }}]}}),
        json!({"name": CA_VOLUME, "configMap": {"name": CA_CONFIGMAP}}),
        json!({"name": STATE_VOLUME, "emptyDir": {}}),
    ]
}
