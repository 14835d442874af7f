//! Muon's shared domain model.
//!
//! Types here are used by more than one crate (the lab writes them, the proxy reads them), so
//! they live in one place with their validation. Nothing in this crate performs I/O.
#![forbid(unsafe_code)]

pub mod duration;
pub mod identity;
pub mod net;
pub mod ports;
pub mod resource;
#[cfg(feature = "schema")]
pub mod schema;
pub mod table;

pub use table::{Endpoint, Protocol, ServiceEntry, ServicePort, ServiceTable, TableError};
