//! Generates Istio's certificate API (`proto/ca.proto`) when the `ca-api` feature is on. The
//! CNI plugin links this crate without it, so its build runs no protoc.

fn main() {
    println!("cargo:rerun-if-changed=proto");
    #[cfg(feature = "ca-api")]
    {
        if let Err(e) = tonic_prost_build::configure()
            .build_transport(false)
            .compile_protos(&["proto/ca.proto"], &["proto"])
        {
            // A build script reports by exiting non-zero with the reason on stderr.
            eprintln!("generating the certificate API from proto/ca.proto failed: {e} (is protoc installed? apt-get install protobuf-compiler)");
            std::process::exit(1);
        }
    }
}
