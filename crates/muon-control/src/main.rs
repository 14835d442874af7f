//! `muon-control`: parse flags, set up logging, run the server until SIGTERM/SIGINT.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use muon_control::config::{Args, Config};

/// mimalloc (see [`muon_control::alloc`]): after the initial sync of thousands of streams,
/// a flood or a large apply it gives memory back; glibc's per-thread arenas kept it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    muon_control::alloc::configure();
    let config = Config::from_args(Args::parse())?;
    muon_control::server::init_logging(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(muon_control::server::run(config))
}
