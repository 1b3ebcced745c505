//! kubelet's device plugin and PodResources APIs, compiled from the proto
//! files in `proto/` (protoc: Debian's `protobuf-compiler`).

fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(
            &["proto/deviceplugin.proto", "proto/podresources.proto"],
            &["proto"],
        )
}
