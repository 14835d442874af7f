//! A thread of its own for the work that must not run on the data path's runtime: applying
//! responses, compiling tables, rendering `/config_dump`'s resources.
//!
//! With `--workers 1` the runtime is one thread; a table compile there, however quick, would
//! stall every connection for its duration. The worker owns its state (`T`) and runs the
//! jobs sent to it one at a time, in order; an async caller awaits the answer without
//! blocking the runtime. The thread ends when the last [`Worker`] handle is dropped.

use std::sync::mpsc;
use tokio::sync::oneshot;

type Job<T> = Box<dyn FnOnce(&mut T) + Send>;

/// A handle to the worker thread; clones share the thread.
pub struct Worker<T> {
    tx: mpsc::Sender<Job<T>>,
}

impl<T> Clone for Worker<T> {
    fn clone(&self) -> Self {
        Worker {
            tx: self.tx.clone(),
        }
    }
}

/// The job did not answer: it panicked (or the thread is gone).
#[derive(Debug, thiserror::Error)]
#[error("the discovery worker did not finish the job")]
pub struct Gone;

impl<T: Send + 'static> Worker<T> {
    /// Starts the thread, which owns `state` from now on.
    pub fn spawn(name: &str, mut state: T) -> std::io::Result<Worker<T>> {
        let (tx, rx) = mpsc::channel::<Job<T>>();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                for job in rx {
                    // A bug in one job must not end discovery: the state is only ever
                    // changed by building the new value first and swapping it in last, so
                    // what a panicking job leaves behind is still consistent.
                    let run = std::panic::AssertUnwindSafe(|| job(&mut state));
                    if std::panic::catch_unwind(run).is_err() {
                        tracing::error!("a discovery job panicked; keeping the last good state");
                    }
                }
            })?;
        Ok(Worker { tx })
    }

    /// Runs `f` on the worker thread and returns its result.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut T) -> R + Send + 'static,
    ) -> Result<R, Gone> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Box::new(move |state| {
                let _ = tx.send(f(state));
            }))
            .map_err(|_| Gone)?;
        rx.await.map_err(|_| Gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn jobs_run_in_order_off_the_runtime_thread() {
        let runtime_thread = std::thread::current().id();
        let w = Worker::spawn("test-worker", Vec::new()).unwrap();
        let ran_on = w
            .call(|v: &mut Vec<u32>| {
                v.push(1);
                std::thread::current().id()
            })
            .await
            .unwrap();
        assert_ne!(ran_on, runtime_thread);
        w.call(|v| v.push(2)).await.unwrap();
        assert_eq!(w.call(|v| v.clone()).await.unwrap(), [1, 2]);
        // A panicking job gets its caller an error, not a hang, and the worker goes on.
        assert!(w.call(|_| -> () { panic!("boom") }).await.is_err());
        assert_eq!(w.call(|v| v.len()).await.unwrap(), 2);
    }
}
