//! Shutdown as a first-class path, after tokio's mini-redis (`server.rs`, `shutdown.rs`).
//!
//! One `watch` channel carries the phase: `Serving` → `Draining` (listeners stop accepting,
//! `/ready` says 503, open connections carry on) → `Closing` (the drain deadline passed: the
//! connections still open are cut). Knowing when every connection is done is the job of the
//! `JoinSet`s that own the tasks (see `listen` and `server`), not of this module.

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serving,
    Draining,
    Closing,
}

/// The sending side, held by the server (and the admin `/drain` handler).
#[derive(Debug)]
pub struct Drain {
    tx: watch::Sender<Phase>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    pub fn new() -> Self {
        Drain {
            tx: watch::Sender::new(Phase::Serving),
        }
    }

    /// Starts draining; returns false when already draining or closing.
    pub fn start(&self) -> bool {
        self.advance(Phase::Draining)
    }

    /// Cuts the remaining connections.
    pub fn close(&self) -> bool {
        self.advance(Phase::Closing)
    }

    fn advance(&self, to: Phase) -> bool {
        self.tx.send_if_modified(|p| {
            let moved = *p < to;
            if moved {
                *p = to;
            }
            moved
        })
    }

    pub fn phase(&self) -> Phase {
        *self.tx.borrow()
    }

    pub fn watch(&self) -> Watch {
        Watch {
            rx: self.tx.subscribe(),
        }
    }
}

/// The receiving side: one per task that must react.
#[derive(Debug, Clone)]
pub struct Watch {
    rx: watch::Receiver<Phase>,
}

impl Watch {
    /// Resolves once draining has started (or the `Drain` is gone).
    pub async fn draining(&mut self) {
        self.reached(Phase::Draining).await
    }

    /// Resolves once connections must be cut (or the `Drain` is gone).
    pub async fn closing(&mut self) {
        self.reached(Phase::Closing).await
    }

    async fn reached(&mut self, phase: Phase) {
        // An error means the sender was dropped: the server is gone, so stop too.
        let _ = self.rx.wait_for(|p| *p >= phase).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    /// Far longer than a phase change takes: a bound against a hang, not a timing check.
    const WAIT: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn phases_only_move_forward() {
        let d = Drain::new();
        let mut w = d.watch();
        assert!(d.start());
        assert!(!d.start());
        tokio::time::timeout(WAIT, w.draining())
            .await
            .expect("a watcher sees the drain start");
        assert!(d.close());
        assert!(!d.start());
        assert_eq!(d.phase(), Phase::Closing);
        tokio::time::timeout(WAIT, w.closing())
            .await
            .expect("a watcher sees the close");
    }
}
