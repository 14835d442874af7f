//! The `muon-init` binary: parse flags, plan, then print (`--dry-run`) or apply.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use muon_init::{apply, Args, Config};

fn main() -> ExitCode {
    let config = match Config::from_args(&Args::parse()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            // The same code clap uses for bad usage.
            return ExitCode::from(2);
        }
    };
    match run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: &Config) -> anyhow::Result<()> {
    if let Some(w) = &config.wait_ready {
        muon_init::wait::wait_ready(w)?;
        println!("muon-init: the proxy at {} is ready", w.addr);
        return Ok(());
    }
    // Every check happens while planning, so a failure here means nothing was touched.
    let plan = apply::plan(config).map_err(|e| anyhow::anyhow!("{e}\n(nothing was changed)"))?;
    for note in &plan.notes {
        eprintln!("muon-init: note: {note}");
    }
    if config.dry_run {
        print!("{}", plan.dry_run_text());
        return Ok(());
    }
    plan.execute()?;
    let families: Vec<String> = plan
        .families
        .iter()
        .map(|f| format!("{} ({})", f.family, f.restore))
        .collect();
    let what = if config.cleanup {
        "removed Muon's rules"
    } else {
        "applied capture rules"
    };
    println!("muon-init: {what} for {}", families.join(", "));
    Ok(())
}
