//! Sources of objects besides the management API.
//!
//! The config directory sends its complete set of objects whenever it changes, through
//! [`Registry::replace_source`]; the registry merges it with the API's objects and marks them
//! read-only through the API. The Kubernetes source (`crate::kubernetes`) knows what changed
//! and sends only that, through [`Registry::update_source`].
//!
//! The config directory: every `*.yaml` / `*.yml` file (multi-document) directly in
//! `--config-dir`, polled every second. A file that does not parse or validate is logged and
//! ignored, and its last good objects stay; a file that is removed takes its objects with it.

use crate::model::Source;
use crate::registry::Registry;
use muon_core::resource::{Invalid, Object};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Parses one multi-document YAML file into validated objects; every problem at once, each
/// prefixed with the file and document number.
pub fn parse_yaml(file: &str, text: &str) -> Result<Vec<Object>, String> {
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = match <serde_json::Value as serde::Deserialize>::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                problems.push(format!("{file}: document {}: {e}", i + 1));
                // The YAML stream cannot be resynchronised after a syntax error.
                break;
            }
        };
        if value.is_null() {
            continue; // an empty document, e.g. a trailing `---`
        }
        match Object::from_json(&value, i) {
            Ok(o) => objects.push(o),
            Err(Invalid(ps)) => problems.extend(
                ps.iter()
                    .map(|p| format!("{file}: document {}: {p}", i + 1)),
            ),
        }
    }
    if problems.is_empty() {
        Ok(objects)
    } else {
        Err(problems.join("\n"))
    }
}

/// What the watcher remembers of one file.
struct FileState {
    text: String,
    /// The objects of the last version that was valid.
    objects: Vec<Object>,
}

/// Polls `dir` until `shutdown`, sending the directory's objects to the registry on change.
pub async fn watch_config_dir(
    dir: PathBuf,
    registry: Arc<Registry>,
    mut shutdown: watch::Receiver<bool>,
) {
    info!(dir = %dir.display(), "watching the config directory");
    let mut files: BTreeMap<PathBuf, FileState> = BTreeMap::new();
    let mut interval = tokio::time::interval(POLL_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first = true;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => return,
        }
        let dir2 = dir.clone();
        let listed = tokio::task::spawn_blocking(move || read_dir(&dir2)).await;
        let current = match listed {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                warn!(dir = %dir.display(), error = %e, "cannot read the config directory; keeping its last objects");
                continue;
            }
            Err(_) => continue,
        };
        let mut changed = first;
        first = false;
        files.retain(|path, _| {
            let keep = current.contains_key(path);
            if !keep {
                info!(file = %path.display(), "config file removed");
                changed = true;
            }
            keep
        });
        for (path, text) in current {
            if files.get(&path).is_some_and(|f| f.text == text) {
                continue;
            }
            let name = path.display().to_string();
            match parse_yaml(&name, &text) {
                Ok(objects) => {
                    info!(file = %name, objects = objects.len(), "config file loaded");
                    files.insert(path, FileState { text, objects });
                    changed = true;
                }
                Err(problems) => {
                    warn!(file = %name, "config file refused; keeping its last good objects:\n{problems}");
                    let objects = files.remove(&path).map(|f| f.objects).unwrap_or_default();
                    files.insert(path, FileState { text, objects });
                }
            }
        }
        if changed {
            let mut all: BTreeMap<_, Object> = BTreeMap::new();
            for (path, f) in &files {
                for o in &f.objects {
                    if all.insert(o.key(), o.clone()).is_some() {
                        warn!(file = %path.display(), object = %o.key(), "defined in more than one config file; the last file (by name) wins");
                    }
                }
            }
            registry
                .replace_source(Source::File, all.into_values().collect())
                .await;
        }
    }
}

/// The YAML files directly in `dir` and their contents.
fn read_dir(dir: &Path) -> std::io::Result<BTreeMap<PathBuf, String>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let yaml = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
        if !yaml || !path.is_file() {
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                out.insert(path, text);
            }
            Err(e) => warn!(file = %path.display(), error = %e, "cannot read config file"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_documents_parse_and_problems_name_file_and_document() {
        let text = "\
apiVersion: muon.io/v1alpha1
kind: Service
metadata: {name: web}
spec: {vips: [198.19.0.1], ports: [{port: 80}], selector: {app: web}}
---
apiVersion: muon.io/v1alpha1
kind: Workload
metadata: {name: web-1, labels: {app: web}}
spec: {address: 198.18.0.2}
---
";
        assert_eq!(parse_yaml("a.yaml", text).unwrap().len(), 2);
        let bad = text.replace("198.18.0.2", "nope");
        let err = parse_yaml("a.yaml", &bad).unwrap_err();
        assert!(
            err.starts_with("a.yaml: document 2: Workload default/web-1: spec.address:"),
            "{err}"
        );
    }
}
