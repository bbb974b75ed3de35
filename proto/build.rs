//! Generates the gRPC code with a vendored protoc: no system protoc needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut cfg = tonic_prost_build::Config::new();
    cfg.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_with_config(
        cfg,
        &["stackwise/v1/coordinator.proto"],
        &["."],
    )?;
    println!("cargo:rerun-if-changed=stackwise/v1/coordinator.proto");
    Ok(())
}
