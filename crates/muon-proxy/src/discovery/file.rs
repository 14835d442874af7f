//! The table file source (`--table-file`): a JSON `ServiceTable`, polled for changes and
//! re-read on SIGHUP. A table that fails to read or validate is rejected with an error log
//! and the last good table keeps serving. Tests and a lab with `controlPlane: false` use it.
//!
//! The file is read and compiled on the discovery worker thread, like control-plane
//! responses; the runtime only keeps the time.

use super::{Publisher, Worker};
use crate::model::{EndpointDef, Mesh, PortDef, ServiceDef, TrafficDef};
use crate::table::Source;
use muon_core::{ServiceTable, TableError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::signal::unix::Signal;
use tracing::{info, warn};

/// How often the table file's metadata is checked.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Invalid { path: PathBuf, source: TableError },
}

/// What changed since the last look at the file.
#[derive(Debug)]
pub enum Change {
    Unchanged,
    Missing(std::io::Error),
    Loaded(ServiceTable),
    Rejected(LoadError),
}

/// A table file and what it looked like when last read.
#[derive(Debug)]
pub struct TableFile {
    path: PathBuf,
    seen: Option<Fingerprint>,
}

/// Changes if the file is rewritten in place (size, mtime) or replaced by rename (inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
    ino: u64,
}

impl TableFile {
    pub fn new(path: PathBuf) -> Self {
        TableFile { path, seen: None }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the file when it changed, or unconditionally with `force` (SIGHUP).
    ///
    /// Plain blocking I/O: the file is small and local, and a blocking thread pool would
    /// cost the idle sidecar more memory than these microseconds.
    pub fn poll(&mut self, force: bool) -> Change {
        use std::os::unix::fs::MetadataExt;
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) => {
                self.seen = None;
                return Change::Missing(e);
            }
        };
        let now = Fingerprint {
            len: meta.len(),
            modified: meta.modified().ok(),
            ino: meta.ino(),
        };
        if !force && self.seen == Some(now) {
            return Change::Unchanged;
        }
        self.seen = Some(now);
        let path = self.path.clone();
        match std::fs::read(&self.path) {
            Err(source) => Change::Rejected(LoadError::Read { path, source }),
            Ok(bytes) => match ServiceTable::from_json(&bytes) {
                Ok(table) => Change::Loaded(table),
                Err(source) => Change::Rejected(LoadError::Invalid { path, source }),
            },
        }
    }
}

/// The model a static table describes.
pub fn mesh(table: &ServiceTable) -> Mesh {
    let mut mesh = Mesh::default();
    for svc in &table.services {
        let name = format!("{}.{}", svc.name, svc.namespace);
        mesh.services.insert(
            name.clone(),
            ServiceDef {
                name: svc.name.clone(),
                namespace: svc.namespace.clone(),
                vips: svc.vips.clone(),
                ports: svc
                    .ports
                    .iter()
                    .map(|p| PortDef {
                        port: p.port,
                        target_port: p.target_port,
                        protocol: p.protocol,
                        name: String::new(),
                    })
                    .collect(),
                // Validated with the table.
                traffic: Arc::new(
                    TrafficDef::from_proto(Some(&muon_api::traffic::to_proto(
                        &svc.traffic.clone().unwrap_or_default(),
                        svc.retry_constraint.as_ref(),
                    )))
                    .unwrap_or_default(),
                ),
            },
        );
        let endpoints = svc
            .endpoints
            .iter()
            .map(|e| EndpointDef {
                ip: e.ip,
                pod: e.pod.as_str().into(),
                identity: "".into(),
                weight: e.weight.unwrap_or(1).max(1),
                zone: e.zone.as_deref().map(Into::into),
                region: e.region.as_deref().map(Into::into),
                cloud: e.cloud.as_deref().map(Into::into),
                meshed: e.meshed,
            })
            .collect();
        mesh.endpoints.insert(name, endpoints);
    }
    mesh
}

/// The file source's state, owned by the worker thread.
pub struct FileSource {
    publisher: Publisher,
    file: Option<TableFile>,
    missing: bool,
}

impl FileSource {
    pub fn new(publisher: Publisher) -> Self {
        FileSource {
            publisher,
            file: None,
            missing: false,
        }
    }

    /// Looks at the file (always with `force`) and publishes what changed.
    fn poll(&mut self, force: bool) {
        let Some(file) = self.file.as_mut() else {
            return;
        };
        match file.poll(force) {
            Change::Unchanged => {}
            Change::Missing(e) => {
                if !self.missing || force {
                    warn!(path = %file.path().display(), error = %e, "service table file unavailable; waiting for it");
                }
                self.missing = true;
            }
            Change::Loaded(table) => {
                self.missing = false;
                self.publisher.publish(&mesh(&table), Source::File);
            }
            Change::Rejected(err) => {
                self.missing = false;
                self.publisher.reject(&err);
            }
        }
    }
}

/// Watches `file` (polling, plus SIGHUP) and publishes each good table until dropped.
/// Without a file, publishes the empty table once (every destination passes through).
pub async fn run(file: Option<PathBuf>, mut hup: Signal, worker: Worker<FileSource>) {
    let Some(path) = file else {
        let _ = worker
            .call(|s| s.publisher.publish(&Mesh::default(), Source::File))
            .await;
        while hup.recv().await.is_some() {
            info!("SIGHUP: no --table-file, nothing to reload");
        }
        return;
    };
    let shown = path.display().to_string();
    if worker
        .call(move |s| s.file = Some(TableFile::new(path)))
        .await
        .is_err()
    {
        return;
    }
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let force = tokio::select! {
            _ = tick.tick() => false,
            Some(()) = hup.recv() => {
                info!(path = %shown, "SIGHUP: re-reading the service table");
                true
            }
        };
        if worker.call(move |s| s.poll(force)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::table::SharedTable;
    use arc_swap::ArcSwapOption;
    use std::sync::Arc;

    const GOOD: &str = r#"{"services":[{"name":"web","namespace":"shop","vips":["198.19.0.1"],
        "ports":[{"port":80,"targetPort":8080}],"endpoints":[{"ip":"198.18.0.2","pod":"web-0"}]}]}"#;

    fn apply(file: &mut TableFile, publisher: &mut Publisher, force: bool) -> &'static str {
        match file.poll(force) {
            Change::Unchanged => "unchanged",
            Change::Missing(_) => "missing",
            Change::Loaded(t) => {
                publisher.publish(&mesh(&t), Source::File);
                "loaded"
            }
            Change::Rejected(e) => {
                publisher.reject(&e);
                "rejected"
            }
        }
    }

    #[test]
    fn invalid_table_file_keeps_the_last_good_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("table.json");
        let routes: SharedTable = Arc::new(ArcSwapOption::empty());
        let metrics = Arc::new(Metrics::new());
        let mut publisher = Publisher::new(routes.clone(), metrics.clone());
        let mut file = TableFile::new(path.clone());

        assert_eq!(apply(&mut file, &mut publisher, false), "missing");
        assert!(routes.load().is_none(), "no table yet: not ready");

        std::fs::write(&path, GOOD).unwrap();
        assert_eq!(apply(&mut file, &mut publisher, false), "loaded");
        assert_eq!(apply(&mut file, &mut publisher, false), "unchanged");
        let first = routes.load_full().unwrap();
        assert_eq!(first.version, 1);

        std::fs::write(&path, r#"{"services":[{"name":""}]}"#).unwrap();
        assert_eq!(apply(&mut file, &mut publisher, false), "rejected");
        assert!(Arc::ptr_eq(&routes.load_full().unwrap(), &first));
        assert_eq!(apply(&mut file, &mut publisher, false), "unchanged");
        // SIGHUP re-reads even an unchanged file (and rejects it again).
        assert_eq!(apply(&mut file, &mut publisher, true), "rejected");

        std::fs::remove_file(&path).unwrap();
        assert_eq!(apply(&mut file, &mut publisher, false), "missing");
        assert!(Arc::ptr_eq(&routes.load_full().unwrap(), &first));

        // Replaced by rename, as a careful writer does.
        let tmp = dir.path().join("table.json.tmp");
        std::fs::write(&tmp, GOOD.replace("web-0", "web-1")).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(apply(&mut file, &mut publisher, false), "loaded");
        let now = routes.load_full().unwrap();
        assert_eq!(now.version, 2);
        let target = now.lookup("198.19.0.1:80".parse().unwrap()).unwrap();
        assert_eq!(&*target.backends.endpoints[0].pod, "web-1");

        let text = metrics.encode();
        assert!(
            text.contains(r#"muon_table_reloads_total{result="ok"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"muon_table_reloads_total{result="error"} 2"#),
            "{text}"
        );
        assert!(text.contains("muon_table_services 1"), "{text}");
    }
}
