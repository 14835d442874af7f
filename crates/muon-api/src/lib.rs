//! Muon's wire contract, generated from `proto/muon/v1`, and the one conversion every user of
//! the management API needs: a protobuf `Struct` spec to and from JSON. No other logic here.

pub mod json;

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("muon.v1");

    /// The encoded file descriptor set, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("muon_descriptor");

    pub mod kinds;
}
