//! Stop requests for a running `lab up`: SIGINT, SIGTERM and SIGHUP.
//!
//! A `muonctl lab up` that is told to stop while it is still bringing the lab up must not die
//! where it stands: it would leave namespaces, processes and a state directory behind. Once
//! [`catch`] has run, these signals only record that a stop was asked for; `up` looks at the
//! record between its steps and in each of its waits ([`check`]), and on a stop removes
//! everything it made and returns [`Interrupted`]. The foreground supervisor waits on the same
//! record once the lab is up.
//!
//! Handlers, not a blocked signal mask: a blocked mask is inherited across `exec`, and the
//! pods' processes started meanwhile must still see their own SIGTERM. A handler is reset to
//! the default action by `exec`, so the pods start with default dispositions. A signal this
//! process was started with ignored (`nohup`, a shell's background job) stays ignored.

use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

/// The first stop signal received, or 0.
static RECEIVED: AtomicI32 = AtomicI32::new(0);
static CAUGHT: OnceLock<std::result::Result<(), String>> = OnceLock::new();

/// `up` was told to stop by `signal` before the lab was ready; what it had made is removed.
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {}", .0.as_str())]
pub struct Interrupted(pub Signal);

impl Interrupted {
    /// The exit code a shell gives a process killed by this signal.
    pub fn exit_code(&self) -> i32 {
        128 + self.0 as i32
    }
}

/// From now on SIGINT, SIGTERM and SIGHUP are recorded instead of ending the process.
/// Returns once the handlers are in place. Idempotent.
pub fn catch() -> Result<()> {
    CAUGHT
        .get_or_init(|| install().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
        .context("cannot catch SIGINT, SIGTERM and SIGHUP")
}

fn install() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    std::thread::Builder::new()
        .name("lab-signals".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            let _entered = rt.enter();
            let ignored = ignored_at_start();
            let catch = |kind: SignalKind, sig: Signal| -> std::io::Result<_> {
                match ignored.contains(&sig) {
                    true => Ok(None),
                    false => signal(kind).map(Some),
                }
            };
            let streams = (|| -> std::io::Result<_> {
                Ok((
                    catch(SignalKind::interrupt(), Signal::SIGINT)?,
                    catch(SignalKind::terminate(), Signal::SIGTERM)?,
                    catch(SignalKind::hangup(), Signal::SIGHUP)?,
                ))
            })();
            let (mut int, mut term, mut hup) = match streams {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            rt.block_on(async move {
                loop {
                    let sig = tokio::select! {
                        Some(_) = recv(&mut int) => Signal::SIGINT,
                        Some(_) = recv(&mut term) => Signal::SIGTERM,
                        Some(_) = recv(&mut hup) => Signal::SIGHUP,
                        else => return,
                    };
                    // The first one wins: it is the one the exit code reports.
                    let _ = RECEIVED.compare_exchange(
                        0,
                        sig as i32,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    );
                }
            });
        })
        .context("starting the signal thread")?;
    ready_rx
        .recv()
        .context("the signal thread ended before it was ready")?
}

/// The next delivery of a caught signal; never, for one left ignored.
async fn recv(s: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// Which of SIGINT, SIGTERM and SIGHUP this process was started with ignored (the `SigIgn`
/// mask of /proc/self/status: bit n-1 for signal n).
fn ignored_at_start() -> Vec<Signal> {
    ignored_in(&std::fs::read_to_string("/proc/self/status").unwrap_or_default())
}

fn ignored_in(status: &str) -> Vec<Signal> {
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .unwrap_or(0);
    [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP]
        .into_iter()
        .filter(|&sig| mask & (1 << (sig as i32 - 1)) != 0)
        .collect()
}

/// The first stop signal received since [`catch`], if any.
pub fn received() -> Option<Signal> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        n => Signal::try_from(n).ok(),
    }
}

/// An [`Interrupted`] error once a stop signal has arrived.
pub fn check() -> std::result::Result<(), Interrupted> {
    match received() {
        Some(sig) => Err(Interrupted(sig)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_ignored_at_start_are_read_from_the_sigign_mask() {
        // `nohup` ignores SIGHUP (bit 0); a shell's background job ignores SIGINT (bit 1) and
        // SIGQUIT (bit 2).
        let status = "Name:\tmuonctl\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000000007\n";
        assert_eq!(ignored_in(status), [Signal::SIGINT, Signal::SIGHUP]);
        assert!(ignored_in("SigIgn:\t0000000000000000\n").is_empty());
        assert!(ignored_in("").is_empty());
    }

    #[test]
    fn an_interruption_exits_like_a_shell_reports_the_signal() {
        assert_eq!(Interrupted(Signal::SIGTERM).exit_code(), 143);
        assert_eq!(
            Interrupted(Signal::SIGHUP).to_string(),
            "interrupted by SIGHUP"
        );
    }
}
