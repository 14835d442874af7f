//! Muon's wire contract, generated from `proto/muon/v1`, and the one conversion every user of
//! the management API needs: a protobuf `Struct` spec to and from JSON; and how to connect to
//! the control plane (plaintext or TLS: [`connect`]).

pub mod connect;
pub mod json;
pub mod traffic;

/// The control plane's gRPC port, when a URL names none.
pub const DEFAULT_PORT: u16 = 15010;

/// The largest gRPC message either end of the discovery stream or the management API
/// decodes or encodes. The control plane splits discovery responses well below it
/// ([`DISCOVERY_SPLIT_BYTES`]) and refuses objects above its object limit, so nothing it can
/// build from valid objects is larger.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// A discovery response whose resources add up to more than this is sent in parts.
pub const DISCOVERY_SPLIT_BYTES: usize = 8 << 20;

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("muon.v1");

    /// The encoded file descriptor set, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("muon_descriptor");

    pub mod kinds;
}
