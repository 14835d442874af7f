//! Project automation: `cargo xtask test | demo | bench`.
#![forbid(unsafe_code)]

mod bench;
mod cpbench;
mod demo;
mod setup;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Muon project automation")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build everything and run every test, the end-to-end lab tests too (root, Linux).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Start a local mesh, send requests through it, show what the sidecars did, tear it down.
    Demo {
        /// Leave the mesh running and print how to reach it and how to stop it.
        #[arg(long)]
        keep: bool,
    },
    /// Benchmark Muon against Envoy, HAProxy, nginx and no proxy, in one run (root, Linux).
    Bench(Box<bench::BenchArgs>),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Test { args } => test(&args),
        Cmd::Demo { keep } => demo::run(keep),
        Cmd::Bench(args) => bench::run(*args),
    };
    if let Err(e) = result {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn test(extra: &[String]) -> Result<()> {
    util::require_root("the end-to-end tests create network namespaces")?;
    setup::ensure_packages()?;
    let python = setup::ensure_test_python()?;
    let k8s_tools = setup::ensure_k8s_tools(&python)?;
    let bins = util::build_bins()?;
    let mut cmd = util::cargo();
    cmd.args(["test", "--workspace", "--all-targets"]);
    cmd.env("MUON_BIN_DIR", &bins);
    cmd.env("MUON_TEST_PYTHON", &python);
    cmd.env("MUON_K8S_TOOLS", &k8s_tools);
    cmd.arg("--").args(extra);
    util::status(&mut cmd)
}
