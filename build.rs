//! Compiles `proto/` with a pure-Rust protobuf compiler (protox): a fresh
//! machine has no system `protoc`. Also writes the descriptor set that
//! server reflection serves.

use std::{env, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/sigil/v1/identity.proto",
        "proto/sigil/v1/admin.proto",
        "proto/sigil/v1/delegation.proto",
    ];
    let spiffe = "proto/spiffe/workload.proto";
    for p in protos.iter().chain([&spiffe]) {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(out.join("sigil_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // Messages that carry token proofs, tokens or CSRs get a hand-written
        // redacting Debug (src/api/pb.rs), never the derived one.
        .skip_debug([
            ".sigil.v1.TokenProof",
            ".sigil.v1.EnrollRequest",
            ".sigil.v1.EnrollResponse",
            ".sigil.v1.CreateEnrollmentTokenResponse",
            ".sigil.v1.BootstrapPlanRequest",
            ".sigil.v1.BootstrapPlanResponse",
            ".sigil.v1.MintDelegatedRequest",
            ".sigil.v1.MintDelegatedResponse",
            ".sigil.v1.MintDelegatedJWTResponse",
        ])
        .compile_fds(fds)?;

    // The SPIFFE Workload API has no package (its method paths are
    // `/SpiffeWorkloadAPI/<Rpc>`), so it gets its own output directory
    // (`_.rs`), included by src/agent/workload_api.rs. Messages carrying a
    // private key or a JWT get a hand-written redacting Debug there.
    let spiffe_out = out.join("spiffe");
    std::fs::create_dir_all(&spiffe_out)?;
    tonic_prost_build::configure()
        .out_dir(&spiffe_out)
        .skip_debug([".X509SVID", ".JWTSVID", ".ValidateJWTSVIDRequest"])
        .compile_fds(protox::compile([spiffe], ["proto"])?)?;
    Ok(())
}
