//! kubelet's gRPC APIs for the kubelet fixture, from the proto files the
//! plugins crate keeps (one definition of the wire for both ends).

fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=../plugins/proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(
            &[
                "../plugins/proto/deviceplugin.proto",
                "../plugins/proto/podresources.proto",
            ],
            &["../plugins/proto"],
        )
}
