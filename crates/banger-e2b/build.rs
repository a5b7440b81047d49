//! The envd messages, generated from `proto/` at build time: prost for the binary codec,
//! pbjson for Connect's JSON codec (proto3's JSON mapping), both from one descriptor set that
//! protox compiles (no protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/process.proto", "proto/filesystem.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = out.join("descriptors.bin");
    std::fs::write(&descriptors, prost::Message::encode_to_vec(&fds))?;
    let mut config = prost_build::Config::new();
    config
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types")
        .file_descriptor_set_path(&descriptors)
        .skip_protoc_run();
    config.compile_fds(fds)?;
    let set = std::fs::read(&descriptors)?;
    pbjson_build::Builder::new()
        .register_descriptors(&set)?
        .build(&[".process", ".filesystem"])?;
    Ok(())
}
