//! Wiring, read top to bottom: bind everything, start the tasks, wait for a reason to stop,
//! drain, exit.
//!
//! Every socket is bound before anything is served, so a port in use fails the start
//! instead of leaving a half-ready proxy. Every task is owned by a `JoinSet` here, and
//! every listener task owns its connection tasks (see `listen`).

use crate::admin::{self, Kind};
use crate::config::{Config, Mode};
use crate::discovery::{self, Publisher};
use crate::listen::{self, BindError};
use crate::metrics::Metrics;
use crate::table::SharedTable;
use crate::{Direction, Shared};
use arc_swap::ArcSwapOption;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;
use tracing::{info, warn};

/// How long the server waits for the listeners after the drain deadline. Each listener
/// aborts its own connections after `listen::CLOSE_GRACE` (so their access events are
/// written); this is only the backstop for a listener task that does not return.
const LISTENER_GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("installing signal handlers: {0}")]
    Signals(io::Error),
    #[error("starting the discovery thread: {0}")]
    Discovery(io::Error),
    #[error(transparent)]
    Tls(#[from] crate::gateway::TlsError),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
}

/// Runs the proxy until it has drained. Returns `Ok` after a clean drain.
pub async fn run(config: Config) -> Result<(), Error> {
    // Handlers first: from here on SIGTERM/SIGINT/SIGHUP are ours, not the default kill.
    let mut term = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::Signals)?;
    let hup = signal(SignalKind::hangup()).map_err(Error::Signals)?;

    // A sidecar captures both ways; a gateway only listens where it is told.
    let data: Vec<(TcpListener, Direction)> = match (&config.mode, &config.gateway) {
        (Mode::Gateway, Some(g)) => listen::bind_all(&g.listen)?
            .into_iter()
            .map(|l| (l, Direction::Gateway))
            .collect(),
        _ => {
            let outbound = listen::bind_all(&config.outbound_addrs)?;
            let inbound = listen::bind_all(&config.inbound_addrs)?;
            outbound
                .into_iter()
                .map(|l| (l, Direction::Outbound))
                .chain(inbound.into_iter().map(|l| (l, Direction::Inbound)))
                .collect()
        }
    };
    let health = listen::bind(config.health_addr)?;
    let admin = listen::bind(config.admin_addr)?;

    let metrics = Arc::new(Metrics::new());
    let table: SharedTable = Arc::new(ArcSwapOption::empty());
    let mut shared = Shared::new(&config, table.clone(), metrics.clone());
    if let Some(g) = &config.gateway {
        shared.tls = crate::gateway::tls_acceptor(g)?;
    }
    // With a join token this sidecar gets a mesh certificate and speaks mutual TLS.
    let identity = match (&config.join_token, &config.control_plane) {
        (Some(_), Some(_)) => Some(crate::identity::Identity::generate()?),
        _ => None,
    };
    shared.mesh = identity.clone().map(crate::tls::MeshTls::new);
    let shared = Arc::new(shared);
    let drain = shared.drain.clone();
    let publisher = Publisher::new(table.clone(), metrics.clone())
        .with_on_demand(shared.on_demand.clone())
        .with_authz_changes(shared.authz_changes.clone())
        .with_locality(config.locality());
    let (source, discovering) =
        discovery::start(&config, hup, publisher, identity.clone()).map_err(Error::Discovery)?;
    let state = Arc::new(
        admin::State::new(&config, table, source, metrics.clone(), drain.clone())
            .with_on_demand(shared.on_demand.clone())
            .with_identity(identity.clone()),
    );

    let mut background = JoinSet::new();
    background.spawn(discovering);
    background.spawn(admin::serve(health, Kind::Health, state.clone()));
    background.spawn(admin::serve(admin, Kind::Admin, state));

    let mut listeners = JoinSet::new();
    for (listener, direction) in data {
        listeners.spawn(listen::serve(
            listener,
            direction,
            shared.clone(),
            drain.watch(),
        ));
    }
    info!(
        pod = %config.pod_name,
        namespace = %config.pod_namespace,
        mode = ?config.mode,
        version = env!("CARGO_PKG_VERSION"),
        "muon-proxy started"
    );

    let mut requested = drain.watch();
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: draining"),
        _ = int.recv() => info!("SIGINT: draining"),
        () = requested.draining() => {}
    }
    drain.start();

    let open = || {
        let m = |d| shared.metrics.direction(d).open.get();
        m(Direction::Outbound) + m(Direction::Inbound) + m(Direction::Gateway)
    };
    info!(
        open = open(),
        deadline = %crate::config::format_duration(config.drain_timeout),
        "draining: no longer accepting; waiting for open connections"
    );
    let drained = tokio::select! {
        () = join_all(&mut listeners) => true,
        () = tokio::time::sleep(config.drain_timeout) => false,
        _ = term.recv() => false,
        _ = int.recv() => false,
    };
    if !drained {
        warn!(
            open = open(),
            "drain cut short; closing the remaining connections"
        );
        drain.close();
        if tokio::time::timeout(LISTENER_GRACE, join_all(&mut listeners))
            .await
            .is_err()
        {
            listeners.shutdown().await;
        }
    }
    background.shutdown().await;
    info!("drained; exiting");
    Ok(())
}

async fn join_all(set: &mut JoinSet<()>) {
    while set.join_next().await.is_some() {}
}
