//! `muon-proxy`: parse flags, set up logging, pick the runtime, run the server.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use muon_proxy::config::{Args, Config};

fn main() -> anyhow::Result<()> {
    let config = Config::from_args(Args::parse())?;
    muon_proxy::accesslog::init(config.log_format, &config.log_level)?;

    // One worker: a current-thread runtime, the smallest footprint for an idle sidecar.
    let runtime = match config.workers {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
    .context("starting the tokio runtime")?;
    let result = runtime.block_on(muon_proxy::server::run(config));
    muon_proxy::accesslog::flush();
    result?;
    Ok(())
}
