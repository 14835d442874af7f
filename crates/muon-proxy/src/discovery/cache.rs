//! The last good tables on disk (`--state-dir`), so a sidecar restarted while the control
//! plane is unreachable can still serve.
//!
//! One file, `tables.pb`: the state as one full `DiscoveryResponse` per kind, protobuf
//! encoded, plus (on demand) the names whose endpoints were subscribed. It is written to a temporary file, synced and renamed over the old one, so a
//! crash leaves either the old or the new state, never half of one. Loading re-applies it
//! through the same checks as a live response.

use muon_api::v1::DiscoveryResponse;
use prost::Message;
use std::io::Write;
use std::path::{Path, PathBuf};

const FILE: &str = "tables.pb";

/// The saved state: every kind's last accepted resources and version.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Saved {
    #[prost(message, repeated, tag = "1")]
    pub kinds: Vec<DiscoveryResponse>,
    /// `--discovery-mode on-demand`: the endpoints names subscribed and answered, restored
    /// as subscribed (empty in `all` mode, and in files written before on-demand existed).
    #[prost(string, repeated, tag = "2")]
    pub on_demand: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a saved state: {source}")]
    Decode {
        path: PathBuf,
        source: prost::DecodeError,
    },
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    pub fn new(dir: PathBuf) -> Self {
        Cache { dir }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// Replaces the saved state atomically. Plain blocking I/O: the file is small and local,
    /// and it is written only when a response changed something.
    pub fn save(&self, saved: &Saved) -> Result<(), CacheError> {
        let path = self.path();
        let io = |source| CacheError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let bytes = saved.encode_to_vec();
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// The saved state, `Ok(None)` when nothing was saved yet.
    pub fn load(&self) -> Result<Option<Saved>, CacheError> {
        let path = self.path();
        match std::fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CacheError::Io { path, source }),
            Ok(bytes) => Saved::decode(bytes.as_slice())
                .map(Some)
                .map_err(|source| CacheError::Decode { path, source }),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::state::tests::{response, service};
    use muon_api::v1::kinds;

    #[test]
    fn saved_state_round_trips_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("sub"));
        assert!(cache.load().unwrap().is_none());
        let saved = Saved {
            kinds: vec![response(
                kinds::SERVICES,
                "7",
                vec![service("web", "198.19.0.1", 80)],
            )],
            on_demand: vec!["web.shop".into()],
        };
        cache.save(&saved).unwrap();
        assert_eq!(cache.load().unwrap().unwrap(), saved);
        assert!(!cache.dir().join("tables.pb.tmp").exists());
        std::fs::write(cache.path(), b"\xff\xff\xff").unwrap();
        assert!(matches!(cache.load(), Err(CacheError::Decode { .. })));
    }
}
