//! Generated protobuf and gRPC code for `sigil.v1`, plus hand-written
//! redacting `Debug` impls for messages that carry token proofs, tokens or
//! CSRs (build.rs skips their derived `Debug`).

#![allow(missing_docs, clippy::all, clippy::pedantic)]

use std::fmt;

tonic::include_proto!("sigil.v1");

/// Encoded descriptor set for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("sigil_descriptor");

impl fmt::Debug for TokenProof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenProof")
            .field("token_id", &self.token_id)
            .field("payload_len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("csr_len", &self.csr.len())
            .field("credential", &self.credential)
            .field("jwt_audiences", &self.jwt_audiences)
            .finish()
    }
}

impl fmt::Debug for enroll_request::Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Token(t) => t.fmt(f),
            Self::Attestation(a) => f
                .debug_struct("Attestation")
                .field("format", &a.format)
                .field("document_len", &a.document.len())
                .finish(),
        }
    }
}

impl fmt::Debug for EnrollResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollResponse")
            .field("spiffe_id", &self.spiffe_id)
            .field("expires_at", &self.expires_at)
            .field("retried", &self.retried)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for CreateEnrollmentTokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateEnrollmentTokenResponse")
            .field("token_id", &self.token_id)
            .field("expires_at", &self.expires_at)
            .field("ca_pin", &self.ca_pin)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for BootstrapPlanRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootstrapPlanRequest")
            .field("payload_len", &self.payload.len())
            .field("plan_len", &self.plan.len())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for BootstrapPlanResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootstrapPlanResponse")
            .field("status", &self.status)
            .field("plan_version", &self.plan_version)
            .field("plan_sha256", &self.plan_sha256)
            .field("admin_spiffe_id", &self.admin_spiffe_id)
            .finish_non_exhaustive()
    }
}
