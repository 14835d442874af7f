//! Compiles proto/muon/v1 with protox (pure Rust: no system protoc) and generates the tonic
//! code, plus a file descriptor set for gRPC reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not with env!(): a build script compiled for one clone may be reused
    // from a shared target dir by another clone at another path.
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "muon/v1/resources.proto",
        "muon/v1/discovery.proto",
        "muon/v1/management.proto",
        "muon/v1/identity.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("muon_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
