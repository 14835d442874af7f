//! What a running lab looks like on disk: `/run/muon/lab/<name>/state.json`, plus the pods'
//! logs, the service table the sidecars read, and copies of the binaries. The state file is
//! the only record `lab down` needs, and `down` also works without it.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

/// Root of every lab's files. `/run` is a tmpfs: a reboot forgets labs along with their
/// namespaces.
pub const LAB_ROOT: &str = "/run/muon/lab";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabState {
    pub name: String,
    /// The namespace holding the bridge every pod's veth plugs into.
    pub bridge_netns: String,
    pub ipv6: bool,
    pub topology_file: String,
    /// How far `up` got. A lab still `starting` whose `up` is gone never finished: `status`
    /// shows it as incomplete.
    #[serde(default)]
    pub phase: Phase,
    /// The `muonctl lab up` bringing the lab up, and afterwards a foreground `up` that
    /// supervises it: its pid, so `down` can tell it to stop and `status` can tell whether a
    /// `starting` lab is still coming up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervisor_pid: Option<i32>,
    /// The pod running muon-control, when the lab has a control plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<String>,
    pub pods: Vec<PodState>,
    pub services: Vec<ServiceState>,
}

/// How far `up` got with a lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// `up` is creating the lab, or was stopped before it finished.
    Starting,
    /// Every pod was ready and `up` finished. (The default: state files written before the
    /// phase was recorded had no way to say.)
    #[default]
    Up,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodState {
    pub name: String,
    /// The topology pod this instance comes from.
    pub template: String,
    pub namespace: String,
    pub service_account: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Ipv6Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub app_uid: u32,
    pub sidecar: bool,
    /// The app's command line and extra environment, kept so `restart` needs no topology.
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Extra flags for this pod's muon-proxy.
    #[serde(default)]
    pub proxy_args: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_pid: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar_pid: Option<i32>,
    /// Set on the lab's gateway pod, whose "app" is muon-proxy in gateway mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayPod>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayPod {
    /// Where it listens, on the pod's addresses.
    pub port: u16,
    pub tls: bool,
    /// The host's 127.0.0.1 port forwarded to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
    /// The process forwarding `host_port` (it runs in this pod's namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_pid: Option<i32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceState {
    pub name: String,
    pub namespace: String,
    pub vip: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip6: Option<Ipv6Addr>,
    pub ports: Vec<u16>,
    /// Names of the pods behind it.
    pub endpoints: Vec<String>,
}

pub fn lab_dir(name: &str) -> PathBuf {
    Path::new(LAB_ROOT).join(name)
}

pub fn state_file(name: &str) -> PathBuf {
    lab_dir(name).join("state.json")
}

pub fn table_file(name: &str) -> PathBuf {
    lab_dir(name).join("table.json")
}

pub fn log_file(name: &str, pod: &str, what: &str) -> PathBuf {
    lab_dir(name).join("logs").join(format!("{pod}.{what}.log"))
}

pub fn pod_dir(name: &str, pod: &str) -> PathBuf {
    lab_dir(name).join("pods").join(pod)
}

/// The gateway's copies of its certificate and key (readable by the proxy's user).
pub fn gateway_dir(name: &str) -> PathBuf {
    lab_dir(name).join("gateway")
}

/// Where a sidecar keeps its last good tables (writable by the proxy's user).
pub fn proxy_state_dir(name: &str, pod: &str) -> PathBuf {
    lab_dir(name).join("proxy-state").join(pod)
}

pub fn bin_dir(name: &str) -> PathBuf {
    lab_dir(name).join("bin")
}

impl LabState {
    /// The control plane's pod, if the lab has one.
    pub fn control_plane_pod(&self) -> Option<&PodState> {
        self.control_plane
            .as_deref()
            .and_then(|n| self.pods.iter().find(|p| p.name == n))
    }

    pub fn load(name: &str) -> Result<LabState> {
        let path = state_file(name);
        let text = std::fs::read(&path)
            .with_context(|| format!("no lab named {name:?} (no {})", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("{} is corrupt", path.display()))
    }

    /// Written whole to a temporary file and renamed, so a reader never sees half a state.
    pub fn save(&self) -> Result<()> {
        write_atomic(&state_file(&self.name), &serde_json::to_vec_pretty(self)?)
    }

    pub fn pod(&self, name: &str) -> Result<&PodState> {
        self.pods.iter().find(|p| p.name == name).with_context(|| {
            let names: Vec<&str> = self.pods.iter().map(|p| p.name.as_str()).collect();
            format!(
                "lab {} has no pod {name:?}; its pods: {}",
                self.name,
                names.join(", ")
            )
        })
    }

    pub fn pod_mut(&mut self, name: &str) -> Option<&mut PodState> {
        self.pods.iter_mut().find(|p| p.name == name)
    }
}

/// Names of every lab that has a state directory.
pub fn list_labs() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(LAB_ROOT) else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}
