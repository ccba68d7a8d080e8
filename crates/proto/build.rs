//! Compiles `proto/` with protox (pure Rust: no protoc, no network) and
//! generates prost messages and tonic clients and servers.

use std::path::PathBuf;

/// Messages that carry tokens or credentials: their `Debug` is written by hand
/// in `src/lib.rs` and prints map keys only.
const REDACTED: &[&str] = &[
    ".csi.v1.NodePublishVolumeRequest",
    ".csi.v1.NodeStageVolumeRequest",
    ".csi.v1.NodeExpandVolumeRequest",
    ".leasehold.broker.v1.IssueRequest",
    ".leasehold.broker.v1.IssueResponse",
    ".leasehold.broker.v1.IssueCertificateRequest",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest.join("../../proto");
    let files = ["csi/v1/csi.proto", "leasehold/broker/v1/broker.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={}", proto_root.join(file).display());
    }
    let fds = protox::Compiler::new([&proto_root])?
        .include_source_info(true)
        .include_imports(true)
        .open_files(files)?
        .file_descriptor_set();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .generate_default_stubs(true)
        .skip_debug(REDACTED.iter().copied())
        .compile_fds(fds)?;
    Ok(())
}
