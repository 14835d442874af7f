//! `muonctl inject -f FILE|-`: the injection library (`muon-inject`) over a file, for GitOps:
//! the injected manifests on stdout, what was left alone (already injected, opted out,
//! hostNetwork) on stderr. The control plane's webhook injects exactly the same.

use anyhow::{Context, Result};
use clap::Args;
use muon_inject::{Outcome, SidecarMode, Template};
use std::io::{Read, Write};
use std::path::PathBuf;

#[derive(Args)]
pub struct InjectArgs {
    /// The manifests (multi-document YAML, or a List); `-` for stdin.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// The registry of Muon's images.
    #[arg(long, default_value = muon_inject::template::DEFAULT_HUB)]
    hub: String,
    /// The images' tag.
    #[arg(long, default_value = muon_inject::template::DEFAULT_TAG)]
    tag: String,
    /// native: an init container with restartPolicy Always (Kubernetes 1.29+). classic: the
    /// first container, holding the app until it is ready. A pod's `muon.io/sidecar-mode`
    /// annotation wins.
    #[arg(long, default_value = "native", value_parser = SidecarMode::parse)]
    sidecar_mode: SidecarMode,
    /// Where the sidecars reach the control plane (host:port, over TLS).
    #[arg(long, default_value = muon_inject::template::DEFAULT_CONTROL_PLANE)]
    sidecar_control_plane: String,
}

pub fn run(args: InjectArgs) -> Result<i32> {
    let (name, text) = if args.file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading stdin")?;
        ("<stdin>".to_string(), text)
    } else {
        let text = std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading {}", args.file.display()))?;
        (args.file.display().to_string(), text)
    };
    let template = Template {
        proxy_image: muon_inject::proxy_image(&args.hub, &args.tag),
        control_plane: args.sidecar_control_plane,
        mode: args.sidecar_mode,
    };
    template.check().map_err(anyhow::Error::msg)?;
    let injected = muon_inject::inject_yaml(&name, &text, &template)?;
    for r in &injected.reports {
        if !matches!(
            r.object.outcome,
            Outcome::Injected(_) | Outcome::NotAWorkload
        ) {
            eprintln!("muonctl: {name}: {}", r.message());
        }
    }
    let mut out = std::io::stdout().lock();
    out.write_all(injected.text.as_bytes())?;
    out.flush()?;
    Ok(0)
}
