//! The lab: a whole Muon mesh on one Linux host, without Kubernetes.
//!
//! Each pod is a network namespace with a veth into a bridge that lives in a namespace of the
//! lab's own, its traffic captured by muon-init's iptables rules, its app and sidecar started
//! inside. Nothing here touches the host namespace's interfaces, routes or iptables. The demo,
//! the end-to-end tests and the benchmarks are all built on it.
#![forbid(unsafe_code)]

pub mod addr;
pub mod control;
pub mod forward;
pub mod lab;
pub mod netns;
pub mod process;
pub mod signals;
pub mod state;
pub mod topology;

pub use lab::{
    down, exec, logs, restart, status, stop, up, DownReport, LabPhase, LabStatus, PodStatus,
    UpOptions,
};
pub use signals::Interrupted;
pub use state::{list_labs, LabState, Phase};
pub use topology::Topology;
