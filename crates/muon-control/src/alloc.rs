//! The allocator's settings. `muon-control` runs on mimalloc (its binary sets it as the
//! global allocator): measured with 1,000 synced proxies of a 5,500-resource mesh, glibc
//! kept about 100 KiB per connected proxy after the initial sync (its per-thread arenas do
//! not give back what another thread freed), mimalloc under 30 KiB.
//!
//! Transparent huge pages are turned off for the process: mimalloc asks for them on its
//! arenas, and one byte touched then keeps 2 MiB resident. Measured (debug build, the
//! flood test): an idle control plane at 20 MiB instead of 27, and 34 MiB after a
//! 20,000-connection flood instead of 55.

/// Applies the settings; call first thing in `main`, before any thread starts (memory
/// faulted in before stays as it is).
pub fn configure() {
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        tracing::debug!(error = %e, "could not turn transparent huge pages off");
    }
}
