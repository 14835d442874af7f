//! Where the tables come from, and the one writer of the shared table.
//!
//! Two sources, never both (the flags refuse the combination):
//! - [`file`]: `--table-file`, a static JSON `ServiceTable` polled for changes (tests, and
//!   setups without a control plane), or nothing at all (the empty table: everything passes
//!   through);
//! - [`client`]: `--control-plane`, one discovery stream per sidecar. Responses go through
//!   [`state`] (per-resource checks, [`convert`] into the proxy's model) and every applied
//!   change is saved by [`cache`] for a restart during an outage. With
//!   `--discovery-mode on-demand`, endpoints are subscribed per service by [`on_demand`],
//!   the first time the data path needs them.
//!
//! Either way the source's state lives on a [`Worker`] thread, and the result is published
//! by [`Publisher`]: a new [`Table`] is compiled there, off the runtime, and swapped in with
//! one atomic store. Readers never block and never wait for this module.

pub mod cache;
pub mod client;
pub mod convert;
pub mod file;
pub mod on_demand;
pub mod state;
pub mod worker;

pub use file::{Change, LoadError, TableFile, POLL_INTERVAL};
pub use worker::Worker;

use crate::config::{Config, DiscoveryMode};
use crate::endpoint;
use crate::metrics::Metrics;
use crate::model::Mesh;
use crate::table::{Context, SharedTable, Source, Table};
use std::fmt::Display;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::Signal;
use tracing::{debug, error, info, warn};

/// How long a starting sidecar waits for its first full sync before it serves the tables
/// saved in `--state-dir` (it keeps trying to connect in the background).
pub const STARTUP_WAIT: Duration = Duration::from_secs(2);

/// Publishes tables: compiles, swaps, counts. The only writer of the shared table; it runs
/// on the discovery [`Worker`] thread, never on the runtime.
pub struct Publisher {
    table: SharedTable,
    metrics: Arc<Metrics>,
    version: u64,
    /// This pod's addresses (the inbound table is their ports).
    local_ips: Vec<IpAddr>,
    /// State that outlives each table (endpoints, balancers).
    registry: endpoint::Registry,
    /// On-demand mode: the subscriptions the data path asks for (the same as
    /// [`crate::Shared::on_demand`]).
    on_demand: Option<Arc<on_demand::OnDemand>>,
    /// This pod's name and namespace (which policies apply to it).
    pod_name: String,
    pod_namespace: String,
    /// Where this pod runs (endpoints are ranked by distance from it).
    locality: crate::balance::Locality,
    /// Bumped when a table changes this pod's policies, so open inbound connections are
    /// checked again (the same as [`crate::Shared::authz_changes`]).
    authz_changes: Option<Arc<tokio::sync::watch::Sender<u64>>>,
}

impl Publisher {
    pub fn new(table: SharedTable, metrics: Arc<Metrics>) -> Self {
        Publisher {
            table,
            metrics,
            version: 0,
            local_ips: Vec::new(),
            registry: endpoint::Registry::default(),
            on_demand: None,
            pod_name: String::new(),
            pod_namespace: String::new(),
            locality: Default::default(),
            authz_changes: None,
        }
    }

    /// Links the publisher to the data path's policy-change signal.
    pub fn with_authz_changes(mut self, changes: Arc<tokio::sync::watch::Sender<u64>>) -> Self {
        self.authz_changes = Some(changes);
        self
    }

    /// This pod's name and namespace, so that the table holds the policies that apply to it.
    pub fn with_pod(mut self, name: &str, namespace: &str) -> Self {
        self.pod_name = name.to_owned();
        self.pod_namespace = namespace.to_owned();
        self
    }

    /// Links the publisher to the data path's on-demand subscriptions.
    pub fn with_on_demand(mut self, on_demand: Option<Arc<on_demand::OnDemand>>) -> Self {
        self.on_demand = on_demand;
        self
    }

    /// Where this pod runs: `--zone`, `--region`, `--cloud`.
    pub fn with_locality(mut self, locality: crate::balance::Locality) -> Self {
        self.locality = locality;
        self
    }

    /// This pod's addresses, so that the inbound table knows which service ports are its own.
    pub fn with_local_ips(mut self, ips: Vec<IpAddr>) -> Self {
        self.local_ips = ips;
        self
    }

    /// Compiles `mesh` and swaps it in.
    pub fn publish(&mut self, mesh: &Mesh, source: Source) {
        self.version += 1;
        let cx = Context {
            version: self.version,
            source,
            local_ips: &self.local_ips,
            metrics: &self.metrics,
            pod_name: &self.pod_name,
            pod_namespace: &self.pod_namespace,
            locality: &self.locality,
        };
        let table = Table::compile(mesh, &cx, &mut self.registry);
        let services = table.services();
        let authz_changed = self
            .table
            .load()
            .as_ref()
            .is_none_or(|old| !old.authz().same_policies(table.authz()));
        self.table.store(Some(Arc::new(table)));
        // After the store: whoever wakes up reads the new policies.
        if let Some(changes) = self.authz_changes.as_ref().filter(|_| authz_changed) {
            changes.send_modify(|v| *v += 1);
        }
        self.metrics.table_loaded(services);
        info!(services, version = self.version, source = ?source, "service table loaded");
    }

    pub fn reject(&self, err: &dyn Display) {
        self.metrics.table_rejected();
        let serving = self.table.load().as_ref().map_or(0, |r| r.version);
        error!(error = %err, serving_version = serving, "service table rejected; keeping the last good table");
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn on_demand(&self) -> Option<&Arc<on_demand::OnDemand>> {
        self.on_demand.as_ref()
    }
}

/// What the admin API asks the discovery source for.
#[derive(Clone)]
pub enum Handle {
    /// `--table-file` or nothing: the table is all there is.
    File,
    /// The control plane: the resources as received live on the worker.
    ControlPlane(Worker<Applier>),
}

impl Handle {
    /// `/config_dump`'s `resources`: every kind's version and resources, rendered on the
    /// worker (nothing is rendered per publish).
    pub async fn resources(&self) -> Option<serde_json::Value> {
        match self {
            Handle::File => None,
            Handle::ControlPlane(w) => w.call(|a| a.state().dump()).await.ok(),
        }
    }
}

/// A source's loop, as [`start`] returns it.
pub type Running = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Starts the configured source: its worker thread now, its loop as the returned future,
/// which runs until the process exits.
pub fn start(
    config: &Config,
    hup: Signal,
    mut publisher: Publisher,
    identity: Option<Arc<crate::identity::Identity>>,
) -> std::io::Result<(Handle, Running)> {
    publisher.local_ips = config.pod_ips.clone();
    publisher.pod_name = config.pod_name.clone();
    publisher.pod_namespace = config.pod_namespace.clone();
    let source = match &config.control_plane {
        None => {
            let w = Worker::spawn("muon-discovery", file::FileSource::new(publisher))?;
            let run = file::run(config.table_file.clone(), hup, w);
            return Ok((Handle::File, Box::pin(run)));
        }
        Some(addr) => addr.clone(),
    };
    let bootstrap = match &config.ca_bundle {
        Some(path) => {
            let pem = std::fs::read(path)?;
            let roots = muon_api::connect::roots_from_pem(&pem)
                .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
            Some(Arc::new(roots))
        }
        None => None,
    };
    let cp = crate::identity::ControlPlane {
        url: source,
        bootstrap: bootstrap.filter(|_| {
            config
                .control_plane
                .as_deref()
                .is_some_and(|u| u.starts_with("https://"))
        }),
        identity: identity.clone(),
    };
    let certify = identity.clone().map(|id| {
        crate::identity::keep_certified(
            cp.clone(),
            id,
            config.join_token.clone(),
            config.cert_ttl,
            publisher.metrics.clone(),
        )
    });
    // Over TLS the control plane serves discovery to certified sidecars only.
    let first_cert = match (&cp.bootstrap, &identity) {
        (Some(_), Some(id)) => Some(id.clone()),
        _ => None,
    };
    let settings = client::Settings::from_config(config, cp);
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
    let metrics = applier.metrics().clone();
    let on_demand = applier.on_demand().cloned();
    let worker = Worker::spawn("muon-discovery", applier)?;
    let handle = Handle::ControlPlane(worker.clone());
    let run = async move {
        let discover = async {
            if let Some(id) = first_cert {
                crate::identity::certified(&id).await;
            }
            client::run(settings, worker.clone(), metrics, on_demand).await
        };
        let certify = async {
            match certify {
                Some(c) => c.await,
                None => std::future::pending().await,
            }
        };
        tokio::join!(
            discover,
            certify,
            fall_back_to_saved(worker.clone(), STARTUP_WAIT),
            ignore_hup(hup),
        );
    };
    Ok((handle, Box::pin(run)))
}

async fn ignore_hup(mut hup: Signal) {
    while hup.recv().await.is_some() {
        info!("SIGHUP: tables come from the control plane, nothing to reload");
    }
}

/// After `wait`, if the first full sync has not happened, serve the saved tables.
async fn fall_back_to_saved(worker: Worker<Applier>, wait: Duration) {
    tokio::time::sleep(wait).await;
    let _ = worker.call(|a| a.load_saved()).await;
}

/// Turns control-plane state into published tables: applies responses, publishes, saves.
/// Owned by the discovery [`Worker`] thread; the stream and the start-up fallback send it
/// jobs, and nothing on the data path touches it. In on-demand mode its state knows which
/// endpoints were answered (compiled into the table), and `on_demand` which were asked for.
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
        self.publisher.publish(self.state.mesh(), source);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use muon_api::v1::kinds;
    use state::tests::{endpoints, response, service};

    fn applier(dir: &std::path::Path) -> Applier {
        let table: SharedTable = Arc::new(arc_swap::ArcSwapOption::empty());
        Applier::new(
            Publisher::new(table, Arc::new(Metrics::new())),
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
