//! The `Delegation` service (public TLS port): decode, call the
//! [`Broker`]'s delegation methods with the mTLS caller, encode. The rule
//! lives in `core::delegation`. Also the redacting `Debug` of its messages
//! that carry a CSR, a certificate chain or a JWT (build.rs skips theirs).

use std::{fmt, sync::Arc};

use tonic::{Request, Response, Status};

use super::{caller, pb, MAX_MESSAGE_BYTES};
use crate::core::{Broker, DelegatedJwtParams, DelegatedX509Params};

/// The `Delegation` service.
#[derive(Debug, Clone)]
pub struct DelegationApi {
    broker: Arc<Broker>,
}

impl DelegationApi {
    /// Wraps the broker.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }

    /// The tonic service with size caps applied.
    pub fn into_service(self) -> pb::delegation_server::DelegationServer<Self> {
        pb::delegation_server::DelegationServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
impl pb::delegation_server::Delegation for DelegationApi {
    #[tracing::instrument(skip_all, name = "ListDelegatedEntries")]
    async fn list_delegated_entries(
        &self,
        request: Request<pb::ListDelegatedEntriesRequest>,
    ) -> Result<Response<pb::ListDelegatedEntriesResponse>, Status> {
        let caller = caller::public_caller(&request);
        let d = self.broker.delegated_entries(&caller).await?;
        Ok(Response::new(pb::ListDelegatedEntriesResponse {
            entries: d
                .entries
                .into_iter()
                .map(|e| pb::DelegatedEntry {
                    spiffe_id: e.spiffe_id,
                    selectors: e.selectors,
                    x509_ttl_seconds: e.x509_ttl_secs,
                    jwt_ttl_seconds: e.jwt_ttl_secs,
                })
                .collect(),
            plan_version: d.plan_version,
        }))
    }

    #[tracing::instrument(skip_all, name = "MintDelegated")]
    async fn mint_delegated(
        &self,
        request: Request<pb::MintDelegatedRequest>,
    ) -> Result<Response<pb::MintDelegatedResponse>, Status> {
        let caller = caller::public_caller(&request);
        let r = request.into_inner();
        let out = super::served(
            "MintDelegated",
            self.broker.mint_delegated(
                DelegatedX509Params {
                    csr: r.csr,
                    spiffe_id: r.spiffe_id,
                    selectors: r.selectors,
                },
                &caller,
            ),
        )
        .await?;
        Ok(Response::new(pb::MintDelegatedResponse {
            spiffe_id: out.spiffe_id,
            x509_svid_chain: out.chain,
            trust_bundle: out.trust_bundle,
            expires_at: out.expires_at,
            serial: out.serial,
        }))
    }

    #[tracing::instrument(skip_all, name = "MintDelegatedJWT")]
    async fn mint_delegated_jwt(
        &self,
        request: Request<pb::MintDelegatedJwtRequest>,
    ) -> Result<Response<pb::MintDelegatedJwtResponse>, Status> {
        let caller = caller::public_caller(&request);
        let r = request.into_inner();
        let j = super::served(
            "MintDelegatedJWT",
            self.broker.mint_delegated_jwt(
                DelegatedJwtParams {
                    spiffe_id: r.spiffe_id,
                    audiences: r.audiences,
                    selectors: r.selectors,
                    ttl_secs: r.ttl_seconds,
                },
                &caller,
            ),
        )
        .await?;
        Ok(Response::new(pb::MintDelegatedJwtResponse {
            jwt_svid: j.token,
            expires_at: j.expires_at,
        }))
    }
}

impl fmt::Debug for pb::MintDelegatedRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MintDelegatedRequest")
            .field("csr_len", &self.csr.len())
            .field("spiffe_id", &self.spiffe_id)
            .field("selectors", &self.selectors)
            .finish()
    }
}

impl fmt::Debug for pb::MintDelegatedResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MintDelegatedResponse")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for pb::MintDelegatedJwtResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MintDelegatedJwtResponse")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}
