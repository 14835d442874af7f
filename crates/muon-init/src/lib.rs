//! muon-init: programs Muon's traffic capture in the current network namespace.
//!
//! It runs once per pod, before the app and the sidecar start (in the lab: inside each pod's
//! namespace). It writes nat-table rules, in chains named `MUON_*` only, that redirect the
//! pod's inbound TCP to the proxy's inbound port (15006) and its outbound TCP to the outbound
//! port (15001), except for the proxy's own connections (UID/GID 1337).
//!
//! The pipeline, one module per stage:
//! - [`config`]: flags and env vars → validated [`Config`] (every problem reported at once);
//! - [`rules`]: [`Config`] → the desired [`Ruleset`] for a family (pure);
//! - [`state`]: `iptables-save -t nat` output → what Muon already has there (pure);
//! - [`payload`]: desired + existing → one atomic `iptables-restore --noflush` payload (pure);
//! - [`apply`]: the only module with I/O: checks, reads, restores, rolls back.
//!
//! Beside the pipeline, [`wait`] (`--wait-ready`) programs nothing: it waits for the proxy to be
//! ready (a classic sidecar's postStart hook in Kubernetes).
#![forbid(unsafe_code)]

pub mod apply;
pub mod config;
pub mod payload;
pub mod rules;
pub mod state;
pub mod wait;

pub use apply::{plan, ApplyError, Plan};
pub use config::{Args, Backend, Capture, Cidr, Config, ConfigError, Family, Ipv6Mode};
pub use payload::{cleanup_payload, restore_payload};
pub use rules::{ruleset, Ruleset};
pub use state::NatState;
