//! Kubernetes objects: where each kind keeps its pod template, and `List`s of objects. Kinds
//! without a pod template pass through untouched.

use crate::pod::{inject_choice, inject_pod, PodOutcome};
use crate::template::{SidecarMode, Template};
use serde_json::{Map, Value};

/// What happened to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Injected(SidecarMode),
    /// It (or its pod template) carries `muon.io/status`.
    AlreadyInjected,
    /// `muon.io/inject: disabled` on the object or its pod template.
    Disabled,
    /// Its pods use the node's network.
    HostNetwork,
    /// Not a kind with pods (or not an object at all): passed through.
    NotAWorkload,
}

impl Outcome {
    pub fn changed(self) -> bool {
        matches!(self, Outcome::Injected(_))
    }

    /// For messages: `injected (native)`, `already injected`, ...
    pub fn describe(self) -> String {
        match self {
            Outcome::Injected(mode) => format!("injected ({})", mode.as_str()),
            Outcome::AlreadyInjected => {
                "already injected (muon.io/status is set): unchanged".into()
            }
            Outcome::Disabled => "muon.io/inject is disabled: unchanged".into(),
            Outcome::HostNetwork => "hostNetwork pods are not injected: unchanged".into(),
            Outcome::NotAWorkload => "not a workload: unchanged".into(),
        }
    }
}

/// One object's outcome; `item` is its index in a `List` (`None` at the top level).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectReport {
    pub item: Option<usize>,
    /// `Kind namespace/name` (or `generateName*`).
    pub object: String,
    pub outcome: Outcome,
}

/// The path from an object to its pod template, by kind; `[]` is the object itself (a Pod).
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "Pod" => &[],
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return None,
    })
}

/// `Kind namespace/name` for messages.
pub fn describe(obj: &Value) -> String {
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("object");
    let meta = obj.get("metadata");
    let field = |f: &str| meta.and_then(|m| m.get(f)).and_then(Value::as_str);
    let name = match (field("name"), field("generateName")) {
        (Some(n), _) if !n.is_empty() => n.to_string(),
        (_, Some(g)) if !g.is_empty() => format!("{g}*"),
        _ => "(unnamed)".into(),
    };
    match field("namespace") {
        Some(ns) if !ns.is_empty() => format!("{kind} {ns}/{name}"),
        _ => format!("{kind} {name}"),
    }
}

/// Injects `obj` in place: a workload's pod template, or each item of a `List`. Errors are
/// prefixed with the list item they belong to.
pub fn inject_object(
    obj: &mut Value,
    template: &Template,
) -> Result<Vec<ObjectReport>, Vec<String>> {
    let is_list = obj
        .get("kind")
        .and_then(Value::as_str)
        .is_some_and(|k| k.ends_with("List"))
        && obj.get("items").is_some_and(Value::is_array);
    if !is_list {
        let object = describe(obj);
        let outcome = inject_one(obj, template)?;
        return Ok(vec![ObjectReport {
            item: None,
            object,
            outcome,
        }]);
    }
    let mut reports = Vec::new();
    let mut problems = Vec::new();
    if let Some(Value::Array(items)) = obj.get_mut("items") {
        for (i, item) in items.iter_mut().enumerate() {
            let object = describe(item);
            match inject_one(item, template) {
                Ok(outcome) => reports.push(ObjectReport {
                    item: Some(i),
                    object,
                    outcome,
                }),
                Err(e) => {
                    problems.extend(e.into_iter().map(|e| format!("items[{i}] ({object}): {e}")))
                }
            }
        }
    }
    match problems.is_empty() {
        true => Ok(reports),
        false => Err(problems),
    }
}

/// One object that is not a list.
fn inject_one(obj: &mut Value, template: &Template) -> Result<Outcome, Vec<String>> {
    let Some(path) = obj
        .get("kind")
        .and_then(Value::as_str)
        .and_then(template_path)
    else {
        return Ok(Outcome::NotAWorkload);
    };
    if !path.is_empty() {
        // A workload opted out as a whole.
        if let Some(meta) = obj.get("metadata").and_then(Value::as_object) {
            if inject_choice(meta).map_err(|e| vec![format!("metadata: {e}")])? == Some(false) {
                return Ok(Outcome::Disabled);
            }
        }
    }
    let mut at = &mut *obj;
    let mut walked = Vec::new();
    for key in path {
        walked.push(*key);
        at = match at.get_mut(*key) {
            Some(v) if v.is_object() => v,
            _ => return Err(vec![format!("{} is missing", walked.join("."))]),
        };
    }
    let Value::Object(pod) = at else {
        return Err(vec!["not an object".into()]);
    };
    let prefix = |what: &str| match path.is_empty() {
        true => what.to_string(),
        false => format!("{}.{what}", path.join(".")),
    };
    // Work on copies: an object that is not injected stays exactly as it was.
    let mut meta = match pod.get("metadata") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(vec![format!("{} is not a map", prefix("metadata"))]),
    };
    let mut spec = match pod.get("spec") {
        Some(Value::Object(s)) => s.clone(),
        _ => return Err(vec![format!("{} is missing", prefix("spec"))]),
    };
    let outcome = inject_pod(&mut meta, &mut spec, template).map_err(|e| {
        e.into_iter()
            .map(|e| match e.strip_prefix("spec.") {
                Some(rest) => format!("{}.{rest}", prefix("spec")),
                None => e,
            })
            .collect::<Vec<_>>()
    })?;
    Ok(match outcome {
        PodOutcome::Injected(mode) => {
            pod.insert("metadata".into(), Value::Object(meta));
            pod.insert("spec".into(), Value::Object(spec));
            Outcome::Injected(mode)
        }
        PodOutcome::AlreadyInjected => Outcome::AlreadyInjected,
        PodOutcome::Disabled => Outcome::Disabled,
        PodOutcome::HostNetwork => Outcome::HostNetwork,
    })
}
