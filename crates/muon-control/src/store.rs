//! The embedded persistent store of objects applied through the management API.
//!
//! One snapshot file, `<data-dir>/objects.json`, rewritten on every change: written to a
//! temporary file, fsynced, renamed over the old one, and the directory fsynced, before the
//! apply is acknowledged. A rename is atomic, so after a crash (even `kill -9` or a power cut
//! once fsync returned) the file holds either the old or the new state, never a mix, and a
//! multi-object apply is all or nothing on disk too. A file that cannot be read is a hard
//! error at start: silently starting empty would delete the mesh's configuration.
//!
//! A write that fails (a full disk, above all) removes its temporary file and leaves the old
//! file as it was; the error says which file, which step and, for a full disk, that the data
//! directory has no space left, so the operator is not sent looking for a network problem.
//!
//! Cost: each change rewrites every stored object. That is fine for thousands of objects;
//! an append-only log with compaction is the step after that.

use crate::model::Stored;
use muon_core::resource::{Object, ObjectKey};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

const FILE: &str = "objects.json";
const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use data directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the store {path} is corrupt ({reason}); refusing to start rather than lose objects: \
         repair it, or move it away to start with an empty store"
    )]
    Corrupt { path: PathBuf, reason: String },
    /// Writing the new state failed before it replaced the old one: nothing changed on disk,
    /// and the temporary file is gone.
    #[error("{}", write_failed(dir, step, source))]
    Write {
        dir: PathBuf,
        /// What was being done, e.g. "writing objects.json.tmp".
        step: String,
        source: std::io::Error,
    },
    /// The new state replaced the old file, but the directory could not be synced: the change
    /// is on disk and may not survive a power cut.
    #[error(
        "syncing the data dir {dir} after replacing {FILE} failed: {source}; the change was \
         written but is not in effect, and may or may not be there after a restart"
    )]
    SyncDir {
        dir: PathBuf,
        source: std::io::Error,
    },
}

impl StoreError {
    /// The data directory's file system is full (or over its quota): the client's problem to
    /// solve, not a transient failure of the control plane.
    pub fn is_out_of_space(&self) -> bool {
        match self {
            StoreError::Write { source, .. }
            | StoreError::SyncDir { source, .. }
            | StoreError::Io { source, .. } => out_of_space(source),
            StoreError::Corrupt { .. } => false,
        }
    }
}

fn out_of_space(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

fn write_failed(dir: &Path, step: &str, e: &std::io::Error) -> String {
    let what = if out_of_space(e) {
        format!(
            "no space left on the control plane's data dir ({}) while {step}",
            dir.display()
        )
    } else {
        format!("{step} in the data dir {} failed: {e}", dir.display())
    };
    format!("{what}; nothing was changed, the previous objects keep serving")
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Snapshot {
    format: u32,
    version: u64,
    objects: Vec<Record>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    generation: u64,
    object: serde_json::Value,
}

/// What was stored: the registry version and the objects.
#[derive(Debug, Default)]
pub struct Loaded {
    pub version: u64,
    pub objects: BTreeMap<ObjectKey, Stored>,
}

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the data directory and loads what it holds.
    pub fn open(dir: &Path) -> Result<(Store, Loaded), StoreError> {
        let io = |source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        let store = Store {
            dir: dir.to_path_buf(),
        };
        // A temporary file left by a crash mid-write is never read; the rename did not happen.
        match fs::remove_file(store.tmp_path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(StoreError::Io {
                    path: store.tmp_path(),
                    source: e,
                })
            }
            _ => {}
        }
        let path = store.path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((store, Loaded::default()))
            }
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        let loaded = parse(&bytes).map_err(|reason| StoreError::Corrupt {
            path: path.clone(),
            reason,
        })?;
        Ok((store, loaded))
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    fn tmp_path(&self) -> PathBuf {
        self.dir.join(format!("{FILE}.tmp"))
    }

    /// Writes the whole state durably; returns only once it is on disk.
    pub fn save<'a>(
        &self,
        version: u64,
        objects: impl Iterator<Item = &'a Stored>,
    ) -> Result<(), StoreError> {
        let snapshot = Snapshot {
            format: FORMAT,
            version,
            objects: objects
                .map(|s| Record {
                    generation: s.generation,
                    object: s.object.to_json(),
                })
                .collect(),
        };
        // Plain data with string keys: serialisation cannot fail.
        let bytes = serde_json::to_vec(&snapshot).unwrap_or_default();
        let path = self.path();
        let tmp = self.tmp_path();
        let failed = |step: String, source| {
            // Never leave a partial file behind (it would hold a full disk's last blocks).
            let _ = fs::remove_file(&tmp);
            StoreError::Write {
                dir: self.dir.clone(),
                step,
                source,
            }
        };
        let written = File::create(&tmp).and_then(|mut f| {
            f.write_all(&bytes)?;
            f.sync_all()
        });
        if let Err(e) = written {
            return Err(failed(format!("writing {FILE}.tmp"), e));
        }
        if let Err(e) = fs::rename(&tmp, &path) {
            return Err(failed(format!("renaming {FILE}.tmp to {FILE}"), e));
        }
        // The rename is durable only once the directory entry is.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| StoreError::SyncDir {
                dir: self.dir.clone(),
                source,
            })?;
        Ok(())
    }
}

fn parse(bytes: &[u8]) -> Result<Loaded, String> {
    let snapshot: Snapshot = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if snapshot.format != FORMAT {
        return Err(format!(
            "format {} is not supported (expected {FORMAT})",
            snapshot.format
        ));
    }
    let mut objects = BTreeMap::new();
    for (i, r) in snapshot.objects.into_iter().enumerate() {
        let object = Object::from_json(&r.object, i).map_err(|e| e.to_string())?;
        let stored = Stored {
            object,
            generation: r.generation,
            source: crate::model::Source::Api,
        };
        if objects.insert(stored.object.key(), stored).is_some() {
            return Err(format!("object {} is stored twice", i + 1));
        }
    }
    Ok(Loaded {
        version: snapshot.version,
        objects,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Source;

    fn workload(name: &str) -> Stored {
        let json = serde_json::json!({
            "apiVersion": "muon.io/v1alpha1", "kind": "Workload",
            "metadata": {"name": name, "labels": {"app": "web"}},
            "spec": {"address": "198.18.0.2"}
        });
        Stored {
            object: Object::from_json(&json, 0).unwrap(),
            generation: 3,
            source: Source::Api,
        }
    }

    #[test]
    fn saved_objects_load_again() {
        let dir = tempfile::tempdir().unwrap();
        let (store, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(loaded.version, 0);
        let objs = [workload("a"), workload("b")];
        store.save(7, objs.iter()).unwrap();
        let (_, loaded) = Store::open(dir.path()).unwrap();
        assert_eq!(loaded.version, 7);
        assert_eq!(loaded.objects.len(), 2);
        let a = loaded.objects.values().next().unwrap();
        assert_eq!(a.object, objs[0].object);
        assert_eq!(a.generation, 3);
    }

    #[test]
    fn a_failed_write_leaves_no_temporary_file_and_says_what_failed() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        // A directory where the file should be: the rename over it fails.
        fs::create_dir(dir.path().join(FILE)).unwrap();
        fs::write(dir.path().join(FILE).join("x"), b"x").unwrap();
        let err = store.save(1, [workload("a")].iter()).unwrap_err();
        assert!(!err.is_out_of_space());
        let msg = err.to_string();
        assert!(
            msg.starts_with("renaming objects.json.tmp to objects.json in the data dir"),
            "{msg}"
        );
        assert!(
            msg.ends_with("nothing was changed, the previous objects keep serving"),
            "{msg}"
        );
        assert!(!dir.path().join("objects.json.tmp").exists());
    }

    #[test]
    fn a_full_disk_is_named_as_such() {
        let err = StoreError::Write {
            dir: "/var/lib/muon-control".into(),
            step: "writing objects.json.tmp".into(),
            source: std::io::Error::from(std::io::ErrorKind::StorageFull),
        };
        assert!(err.is_out_of_space());
        assert_eq!(
            err.to_string(),
            "no space left on the control plane's data dir (/var/lib/muon-control) while \
             writing objects.json.tmp; nothing was changed, the previous objects keep serving"
        );
    }

    #[test]
    fn a_temporary_file_left_by_a_crash_is_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("objects.json.tmp"), b"{\"format\":1,").unwrap();
        Store::open(dir.path()).unwrap();
        assert!(!dir.path().join("objects.json.tmp").exists());
    }

    #[test]
    fn a_corrupt_store_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE), b"{\"format\":1,\"vers").unwrap();
        let err = Store::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is corrupt"), "{err}");
        assert!(err.contains("refusing to start"), "{err}");
    }
}
