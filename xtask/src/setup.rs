//! What the demo and the tests need from the machine, installed when missing, so that one
//! command is enough on a fresh Debian machine: system packages (apt) and the Python packages
//! of the test clients (in a virtualenv of their own).

use crate::util;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::Command;

/// iptables for capture (nft and legacy backends), iproute2 for namespaces, curl as the
/// client, python3 for test apps, util-linux for setpriv, procps for sysctl, openssl for the
/// gateway's test certificate and for a TLS client without a certificate, tcpdump to show
/// what crosses the lab's bridge.
pub const PACKAGES: &[&str] = &[
    "iptables",
    "iproute2",
    "curl",
    "python3",
    "python3-venv",
    "util-linux",
    "procps",
    "openssl",
    "tcpdump",
];

/// Installs the packages of `PACKAGES` that dpkg does not know as installed.
pub fn ensure_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("== installing {}", missing.join(" "));
    util::status(Command::new("apt-get").arg("update").arg("-qq"))?;
    util::status(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// The Python interpreter of the test clients: `$MUON_TEST_PYTHON`, else a virtualenv in
/// /opt/muon-ci/venv with grpcio, grpcio-reflection and websockets, created when missing.
pub fn ensure_test_python() -> Result<PathBuf> {
    let python = PathBuf::from(
        std::env::var("MUON_TEST_PYTHON").unwrap_or_else(|_| "/opt/muon-ci/venv/bin/python".into()),
    );
    let ready = Command::new(&python)
        .args(["-c", "import grpc, grpc_reflection, websockets"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ready {
        return Ok(python);
    }
    let venv = python
        .parent()
        .and_then(|bin| bin.parent())
        .context("MUON_TEST_PYTHON should be <venv>/bin/python")?;
    println!(
        "== creating {} for the Python gRPC test client",
        venv.display()
    );
    util::status(Command::new("python3").args(["-m", "venv"]).arg(venv))?;
    util::status(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "grpcio",
        "grpcio-reflection",
        "protobuf",
        "websockets",
    ]))?;
    Ok(python)
}
