//! Muon's control plane.
//!
//! Objects come in through the management API (`management`, persisted by `store`) and from
//! other sources (`sources`: the config directory; `kubernetes`: the cluster's Services,
//! EndpointSlices, Pods, routes and Muon's CRDs); the `registry` keeps them (`model`),
//! checks what spans objects (`rules`), and debounces changes into the data-plane view
//! (`snapshot`); `discovery` pushes it to each sidecar over one stream, coalesced, and
//! `wire` sends it with each resource encoded once. `convert` is the one place objects meet
//! the proto. `gate` admits connections to the gRPC port. `webhook` injects sidecars into
//! Kubernetes pods (admission, with `muon-inject`). `server` wires it together.
#![forbid(unsafe_code)]

pub mod alloc;
pub mod auth;
pub mod ca;
pub mod config;
pub mod convert;
pub mod discovery;
pub mod gate;
pub mod http;
pub mod identity;
pub mod kubernetes;
pub mod management;
pub mod metrics;
pub mod model;
pub mod registry;
pub mod rules;
pub mod server;
pub mod snapshot;
pub mod sources;
pub mod store;
pub mod webhook;
pub mod wire;

pub use config::Config;
pub use server::Server;
