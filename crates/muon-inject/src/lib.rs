//! Muon's sidecar injection, the one library behind `muonctl inject` and the control plane's
//! admission webhook: Kubernetes objects in, the same objects with Muon's capture init
//! container (`muon-init`) and sidecar (`muon-proxy`) out. Pure functions over
//! `serde_json::Value`; no I/O, no Kubernetes client.
//!
//! - [`template`]: the settings of an injector (image, control plane, default mode) and the
//!   names everyone agrees on;
//! - [`annotations`]: a pod's `muon.io/*` annotations, checked, as flags and resources;
//! - [`pod`]: one pod: decide, then add the containers, volumes and annotations;
//! - [`workload`]: where each kind keeps its pod template, and `List`s;
//! - [`yaml`]: multi-document files, untouched documents copied byte for byte;
//! - [`patch`]: the RFC 6902 patch between two values (the webhook's answer).
#![forbid(unsafe_code)]

pub mod annotations;
pub mod patch;
pub mod pod;
pub mod template;
pub mod workload;
pub mod yaml;

pub use pod::PodOutcome;
pub use template::{proxy_image, SidecarMode, Template};
pub use workload::{inject_object, ObjectReport, Outcome};
pub use yaml::{inject_yaml, DocumentReport, InjectError, Injected};

use serde_json::Value;

/// A Pod (as the webhook receives it): the injected pod and what happened. An unchanged pod
/// comes back equal to `pod`.
pub fn inject_pod_object(
    pod: &Value,
    template: &Template,
) -> Result<(Value, Outcome), Vec<String>> {
    let mut out = pod.clone();
    if out.get("kind").is_none() {
        // AdmissionReview objects carry their kind, but be lenient with ones that do not.
        if let Value::Object(m) = &mut out {
            m.insert("kind".into(), "Pod".into());
        }
    }
    let reports = inject_object(&mut out, template)?;
    let outcome = reports.first().map_or(Outcome::NotAWorkload, |r| r.outcome);
    if !outcome.changed() {
        return Ok((pod.clone(), outcome));
    }
    if pod.get("kind").is_none() {
        if let Value::Object(m) = &mut out {
            m.remove("kind");
        }
    }
    Ok((out, outcome))
}
