//! Muon's control plane.
//!
//! Objects come in through the management API (`management`, persisted by `store`) and from
//! other sources (`sources`: the config directory); the `registry` merges them and computes
//! what sidecars see; `discovery` pushes it to each sidecar over one stream, debounced and
//! coalesced, and `wire` sends it with each resource encoded once. `convert` is the one place objects meet the proto. `server` wires it together.
#![forbid(unsafe_code)]

pub mod config;
pub mod convert;
pub mod discovery;
pub mod http;
pub mod management;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod sources;
pub mod store;
pub mod wire;

pub use config::Config;
pub use server::Server;
