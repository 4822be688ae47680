//! Generates the gRPC code for `caravan.v1` from `caravan/v1/*.proto` (needs `protoc`, which
//! scripts/setup.sh installs from Debian's protobuf-compiler).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["caravan/v1/worker.proto", "caravan/v1/coordinator.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure().compile_protos(&protos, &["."])?;
    Ok(())
}
