//! `muon-control`: parse flags, set up logging, run the server until SIGTERM/SIGINT.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use muon_control::config::{Args, Config};

fn main() -> anyhow::Result<()> {
    let config = Config::from_args(Args::parse())?;
    muon_control::server::init_logging(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(muon_control::server::run(config))
}
