//! Where service tables come from, and the one writer of the shared routes.
//!
//! Two sources, never both (the flags refuse the combination):
//! - [`file`]: `--table-file`, a JSON table polled for changes (the lab, until it runs a
//!   control plane), or nothing at all (the empty table: everything passes through);
//! - [`client`]: `--control-plane`, one discovery stream per sidecar. Responses go through
//!   [`state`] (per-resource checks, [`convert`] into the proxy's model) and every applied
//!   change is saved by [`cache`] for a restart during an outage. With
//!   `--discovery-mode on-demand`, endpoints are subscribed per service by [`on_demand`],
//!   the first time the data path needs them.
//!
//! Either way the result is published by [`Publisher`]: a new [`Routes`] is compiled off the
//! data path and swapped in with one atomic store. Readers never block and never wait for
//! this module.

pub mod cache;
pub mod client;
pub mod convert;
pub mod file;
pub mod on_demand;
pub mod state;

pub use file::{Change, LoadError, TableFile, POLL_INTERVAL};

use crate::config::{Config, DiscoveryMode};
use crate::metrics::Metrics;
use crate::routes::{Routes, SharedRoutes, Source};
use muon_core::ServiceTable;
use std::fmt::Display;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::signal::unix::Signal;
use tracing::{debug, error, info, warn};

/// How long a starting sidecar waits for its first full sync before it serves the tables
/// saved in `--state-dir` (it keeps trying to connect in the background).
pub const STARTUP_WAIT: Duration = Duration::from_secs(2);

/// Publishes tables: compiles, swaps, counts. The only writer of the shared routes.
pub struct Publisher {
    routes: SharedRoutes,
    metrics: Arc<Metrics>,
    version: u64,
    /// On-demand mode: the subscriptions the data path asks for (the same as
    /// [`crate::Shared::on_demand`]).
    on_demand: Option<Arc<on_demand::OnDemand>>,
}

impl Publisher {
    pub fn new(routes: SharedRoutes, metrics: Arc<Metrics>) -> Self {
        Publisher {
            routes,
            metrics,
            version: 0,
            on_demand: None,
        }
    }

    /// Links the publisher to the data path's on-demand subscriptions.
    pub fn with_on_demand(mut self, on_demand: Option<Arc<on_demand::OnDemand>>) -> Self {
        self.on_demand = on_demand;
        self
    }

    /// Publishes a table from the table file.
    pub fn publish(&mut self, table: ServiceTable) {
        self.publish_from(table, Source::File, None, |_| true);
    }

    /// Compiles `table` and swaps it in. `known` says which services' endpoints are known
    /// (see [`Routes::compile`]).
    pub fn publish_from(
        &mut self,
        table: ServiceTable,
        source: Source,
        resources: Option<serde_json::Value>,
        known: impl Fn(&str) -> bool,
    ) {
        self.version += 1;
        let services = table.services.len();
        let routes = Routes::compile(self.version, table, known).with_source(source, resources);
        self.routes.store(Some(Arc::new(routes)));
        self.metrics.table_loaded(services);
        info!(services, version = self.version, source = ?source, "service table loaded");
    }

    pub fn reject(&self, err: &dyn Display) {
        self.metrics.table_rejected();
        let serving = self.routes.load().as_ref().map_or(0, |r| r.version);
        error!(error = %err, serving_version = serving, "service table rejected; keeping the last good table");
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn on_demand(&self) -> Option<&Arc<on_demand::OnDemand>> {
        self.on_demand.as_ref()
    }
}

/// Runs the configured source until the process exits.
pub async fn run(config: Config, hup: Signal, mut publisher: Publisher) {
    match &config.control_plane {
        None => file::run(config.table_file.clone(), hup, publisher).await,
        Some(addr) => {
            let settings = client::Settings::from_config(&config, addr.clone());
            publisher.on_demand = match config.discovery_mode {
                DiscoveryMode::All => None,
                // Unlinked (no data path asks): endpoints of nothing, but still by name.
                DiscoveryMode::OnDemand => publisher.on_demand.take().or_else(|| {
                    let metrics = publisher.metrics.clone();
                    Some(Arc::new(on_demand::OnDemand::new(metrics)))
                }),
            };
            let applier = Applier::new(publisher, cache::Cache::new(config.state_dir.clone()));
            applier.restore_subscriptions();
            let applier = Arc::new(Mutex::new(applier));
            tokio::join!(
                client::run(settings, applier.clone()),
                fall_back_to_saved(applier, STARTUP_WAIT),
                ignore_hup(hup),
            );
        }
    }
}

async fn ignore_hup(mut hup: Signal) {
    while hup.recv().await.is_some() {
        info!("SIGHUP: tables come from the control plane, nothing to reload");
    }
}

/// After `wait`, if the first full sync has not happened, serve the saved tables.
async fn fall_back_to_saved(applier: Arc<Mutex<Applier>>, wait: Duration) {
    tokio::time::sleep(wait).await;
    lock(&applier).load_saved();
}

/// Locks the applier. A panic while it was held leaves consistent data (every update is
/// built first and swapped in last), so a poisoned lock is used as is.
pub fn lock(applier: &Mutex<Applier>) -> std::sync::MutexGuard<'_, Applier> {
    applier.lock().unwrap_or_else(|p| p.into_inner())
}

/// Turns control-plane state into published tables: applies responses, publishes, saves.
/// Shared (behind a mutex, never held across an await) by the stream and the start-up
/// fallback; nothing on the data path touches it. In on-demand mode its state knows which
/// endpoints were answered (compiled into the routes), and `on_demand` which were asked for.
pub struct Applier {
    state: state::State,
    publisher: Publisher,
    cache: cache::Cache,
    writer: cache::Writer,
    /// Tables are being served: after the first full sync, or from the saved state.
    serving: bool,
}

impl Applier {
    /// The state is on demand when the publisher carries the data path's subscriptions.
    pub fn new(publisher: Publisher, cache: cache::Cache) -> Self {
        Applier {
            state: Self::empty_state(&publisher),
            publisher,
            writer: cache::Writer::new(cache.clone()),
            cache,
            serving: false,
        }
    }

    fn empty_state(publisher: &Publisher) -> state::State {
        match publisher.on_demand {
            Some(_) => state::State::on_demand(),
            None => state::State::new(),
        }
    }

    pub fn state(&self) -> &state::State {
        &self.state
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        self.publisher.metrics()
    }

    pub fn on_demand(&self) -> Option<&Arc<on_demand::OnDemand>> {
        self.publisher.on_demand()
    }

    /// On demand, at start: the names subscribed before a restart are subscribed again by
    /// the first stream, so the services this app talks to do not pay the first-connection
    /// wait again.
    pub fn restore_subscriptions(&self) {
        let Some(od) = self.on_demand() else { return };
        match self.cache.load() {
            Ok(Some(saved)) if !saved.on_demand.is_empty() => {
                info!(
                    services = saved.on_demand.len(),
                    "on demand: subscribing again to the endpoints saved before the restart"
                );
                od.restore(saved.on_demand);
            }
            Ok(_) => {}
            // Reported when the saved tables are needed (`load_saved`).
            Err(e) => debug!(error = %e, "no saved on-demand subscriptions"),
        }
    }

    /// Applies one response (see [`state::State::apply`]); publishes and saves the result
    /// once the first full sync is done.
    pub fn apply(
        &mut self,
        resp: &muon_api::v1::DiscoveryResponse,
        full: bool,
    ) -> Result<state::Applied, String> {
        let applied = self.state.apply(resp, full)?;
        if self.serving || self.state.synced() {
            if !self.serving {
                info!("first full sync with the control plane");
            }
            self.serving = true;
            self.publish(Source::ControlPlane);
            let saved = cache::Saved {
                kinds: self.state.snapshot(),
                on_demand: self.state.answered(),
            };
            self.writer.save_latest(saved);
        }
        Ok(applied)
    }

    /// Serves the saved tables unless tables are already served. Returns whether it did.
    pub fn load_saved(&mut self) -> bool {
        if self.serving {
            return false;
        }
        let saved = match self.cache.load() {
            Ok(Some(saved)) => saved,
            Ok(None) => {
                warn!(path = %self.cache.path().display(), "control plane unreachable and no saved tables; not ready until the first sync");
                return false;
            }
            Err(e) => {
                error!(error = %e, "control plane unreachable and the saved tables are unusable; not ready until the first sync");
                return false;
            }
        };
        let mut state = Self::empty_state(&self.publisher);
        // Kinds that already arrived on the live stream stay as they are (the stream treats
        // its next responses for them as updates); only the missing kinds come from disk.
        let live = self.state.snapshot();
        let from_disk: Vec<_> = saved
            .kinds
            .iter()
            .filter(|k| !live.iter().any(|l| l.type_url == k.type_url))
            .cloned()
            .collect();
        let live_answered = self.state.answered();
        for kind in live.iter().chain(&from_disk) {
            match state.apply(kind, true) {
                Ok(a) if a.rejected.is_empty() => {}
                Ok(a) => {
                    warn!(type_url = %kind.type_url, rejected = a.rejected.len(), "saved resources rejected")
                }
                Err(e) => warn!(error = %e, "saved kind skipped"),
            }
        }
        if let Some(od) = self.on_demand() {
            // Served as answered: the saved endpoints (or none) are all there is until the
            // control plane is back, and the next stream subscribes to them again.
            od.restore(saved.on_demand.iter().cloned());
            state.mark_answered(saved.on_demand);
        }
        state.mark_answered(live_answered);
        self.state = state;
        self.serving = true;
        warn!(path = %self.cache.path().display(), "control plane unreachable: serving the saved tables");
        self.publish(Source::Saved);
        true
    }

    fn publish(&mut self, source: Source) {
        let table = self.state.table();
        let dump = self.state.dump();
        let state = &self.state;
        self.publisher
            .publish_from(table, source, Some(dump), |name| {
                state.endpoints_known(name)
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use muon_api::v1::kinds;
    use state::tests::{endpoints, response, service};

    fn applier(dir: &std::path::Path) -> Applier {
        let routes: SharedRoutes = Arc::new(arc_swap::ArcSwapOption::empty());
        Applier::new(
            Publisher::new(routes, Arc::new(Metrics::new())),
            cache::Cache::new(dir.to_path_buf()),
        )
    }

    #[test]
    fn saved_tables_fill_in_only_the_kinds_the_live_stream_has_not_sent() {
        let dir = tempfile::tempdir().unwrap();
        // Saved before: an old service and its endpoints, and routes and policies.
        let cache = cache::Cache::new(dir.path().to_path_buf());
        let saved = cache::Saved {
            kinds: vec![
                response(kinds::SERVICES, "1", vec![service("old", "198.19.0.9", 80)]),
                response(
                    kinds::ENDPOINTS,
                    "1",
                    vec![endpoints("old", &["198.18.0.9"])],
                ),
                response(kinds::ROUTES, "1", vec![]),
                response(kinds::POLICIES, "1", vec![]),
            ],
            on_demand: Vec::new(),
        };
        cache.save(&saved).unwrap();
        // The live stream has sent services (the old one is gone) but not endpoints yet.
        let mut a = applier(dir.path());
        let live = response(kinds::SERVICES, "7", vec![service("web", "198.19.0.1", 80)]);
        a.apply(&live, true).unwrap();
        assert!(a.load_saved());
        let services = a.state().kind(kinds::SERVICES).unwrap();
        assert_eq!(services.version, "7", "the live services stay");
        assert!(services.resources.contains_key("web.shop"));
        assert!(
            !services.resources.contains_key("old.shop"),
            "a deleted service came back from disk"
        );
        let eps = a.state().kind(kinds::ENDPOINTS).unwrap();
        assert!(
            eps.received && eps.resources.contains_key("old.shop"),
            "missing kinds come from disk"
        );
    }
}
