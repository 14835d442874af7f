//! The embedded persistent store of objects applied through the management API.
//!
//! One snapshot file, `<data-dir>/objects.json`, rewritten on every change: written to a
//! temporary file, fsynced, renamed over the old one, and the directory fsynced, before the
//! apply is acknowledged. A rename is atomic, so after a crash (even `kill -9` or a power cut
//! once fsync returned) the file holds either the old or the new state, never a mix, and a
//! multi-object apply is all or nothing on disk too. A file that cannot be read is a hard
//! error at start: silently starting empty would delete the mesh's configuration.
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
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let io = |source| StoreError::Io {
            path: tmp.clone(),
            source,
        };
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io)?;
        // The rename is durable only once the directory entry is.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| StoreError::Io {
                path: self.dir.clone(),
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
    fn a_corrupt_store_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE), b"{\"format\":1,\"vers").unwrap();
        let err = Store::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is corrupt"), "{err}");
        assert!(err.contains("refusing to start"), "{err}");
    }
}
