//! Compiles `coupons/v1/*.proto` with protox (a pure-Rust protobuf compiler, so
//! no `protoc` is needed on the machine) and generates Rust types with prost.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=coupons");
    let descriptors = protox::compile(["coupons/v1/events.proto"], ["."])?;
    prost_build::Config::new()
        .type_attribute(".coupons.v1", "#[derive(serde::Serialize)]")
        .compile_fds(descriptors)?;
    Ok(())
}
