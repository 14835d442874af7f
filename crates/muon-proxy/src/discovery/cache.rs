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

    /// Replaces the saved state atomically. Blocking I/O (write, fsync, rename): call it from
    /// a [`Writer`], never from the runtime.
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

/// Saves on a thread of its own, newest state only: the proxy's runtime never waits for the
/// disk (with one worker, an fsync there would stall every connection), and a burst of
/// updates costs one write of the last state, not one per update.
pub struct Writer {
    slot: std::sync::Arc<Slot>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Slot {
    /// The newest state not yet written, and whether the writer should stop.
    pending: std::sync::Mutex<(Option<Saved>, bool)>,
    wake: std::sync::Condvar,
}

impl Writer {
    pub fn new(cache: Cache) -> Self {
        let slot = std::sync::Arc::new(Slot::default());
        let mine = slot.clone();
        let thread = std::thread::Builder::new()
            .name("muon-cache".into())
            .spawn(move || loop {
                let next = {
                    let Ok(mut guard) = mine.pending.lock() else {
                        return;
                    };
                    while guard.0.is_none() && !guard.1 {
                        guard = match mine.wake.wait(guard) {
                            Ok(g) => g,
                            Err(_) => return,
                        };
                    }
                    match guard.0.take() {
                        Some(saved) => saved,
                        None => return, // stopping, nothing left to write
                    }
                };
                if let Err(e) = cache.save(&next) {
                    tracing::warn!(error = %e, "cannot save the tables to the state directory");
                }
            })
            .ok();
        Writer { slot, thread }
    }

    /// Queues `saved` to be written, replacing any state not yet written.
    pub fn save_latest(&self, saved: Saved) {
        if let Ok(mut guard) = self.slot.pending.lock() {
            guard.0 = Some(saved);
            self.slot.wake.notify_one();
        }
    }
}

impl Drop for Writer {
    /// Writes what is pending, then stops the thread.
    fn drop(&mut self) {
        if let Ok(mut guard) = self.slot.pending.lock() {
            guard.1 = true;
            self.slot.wake.notify_one();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
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
