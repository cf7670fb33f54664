//! The gRPC layer — the only module that names tonic and prost. Each handler
//! decodes the request, calls one [`crate::core::Broker`] method and encodes
//! the answer; errors become Status in [`status`] only. No rules live here.

pub mod caller;
pub mod delegation;
pub mod pb;
pub mod status;

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::core::{Broker, Caller, Credential, EnrollParams};

/// Runs `fut` as request `rpc`: a fresh request id (in the tracing span and
/// every audit row), latency and outcome metrics.
pub(crate) async fn served<T>(
    rpc: &'static str,
    fut: impl std::future::Future<Output = Result<T, crate::core::Error>>,
) -> Result<T, Status> {
    use tracing::Instrument;
    let mut id = [0u8; 8];
    rand::fill(&mut id);
    let id = hex::encode(id);
    let span = tracing::info_span!("rpc", rpc, request_id = %id);
    let start = std::time::Instant::now();
    let r = crate::audit::REQUEST_ID
        .scope(id, fut.instrument(span))
        .await;
    let m = crate::metrics::global();
    let outcome = match &r {
        Ok(_) => "ok",
        Err(e) => e.reason(),
    };
    m.inc(
        "sigil_rpc_requests_total",
        &[("rpc", rpc), ("outcome", outcome)],
        1,
    );
    m.observe(
        "sigil_rpc_duration_seconds",
        &[("rpc", rpc)],
        crate::metrics::LATENCY_BUCKETS,
        start.elapsed().as_secs_f64(),
    );
    r.map_err(Status::from)
}

/// Largest request message accepted on any service (64 KiB).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// The `Identity` service.
#[derive(Debug, Clone)]
pub struct IdentityApi {
    broker: Arc<Broker>,
    proxies: Arc<Vec<crate::ratelimit::Cidr>>,
}

impl IdentityApi {
    /// Wraps the broker.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self {
            broker,
            proxies: Arc::default(),
        }
    }

    /// Trusts `x-forwarded-for` from these proxy networks.
    pub fn with_trusted_proxies(mut self, proxies: Vec<crate::ratelimit::Cidr>) -> Self {
        self.proxies = Arc::new(proxies);
        self
    }

    fn caller<T>(&self, req: &Request<T>) -> Caller {
        caller::public_caller_via(req, &self.proxies)
    }

    /// The tonic service with size caps applied.
    pub fn into_service(self) -> pb::identity_server::IdentityServer<Self> {
        pb::identity_server::IdentityServer::new(self).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
impl pb::identity_server::Identity for IdentityApi {
    #[tracing::instrument(skip_all, name = "Enroll")]
    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let caller = self.caller(&request);
        let req = request.into_inner();
        let credential = match req.credential {
            Some(pb::enroll_request::Credential::Token(t)) => Some(Credential::Token {
                token_id: t.token_id,
                payload: t.payload,
                signature: t.signature,
            }),
            Some(pb::enroll_request::Credential::Attestation(a)) => Some(Credential::Attestation {
                format: a.format,
                document: a.document,
            }),
            None => None,
        };
        let out = served(
            "Enroll",
            self.broker.enroll(
                EnrollParams {
                    csr: req.csr,
                    credential,
                    jwt_audiences: req.jwt_audiences,
                },
                &caller,
            ),
        )
        .await?;
        Ok(Response::new(enroll_response(out)))
    }

    #[tracing::instrument(skip_all, name = "GetBundle")]
    async fn get_bundle(
        &self,
        _request: Request<pb::GetBundleRequest>,
    ) -> Result<Response<pb::GetBundleResponse>, Status> {
        Ok(Response::new(bundle_response(&self.broker)))
    }

    #[tracing::instrument(skip_all, name = "Renew")]
    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let caller = self.caller(&request);
        let r = request.into_inner();
        let out = served(
            "Renew",
            self.broker.renew(&r.csr, &r.jwt_audiences, &caller),
        )
        .await?;
        Ok(Response::new(enroll_response(out)))
    }

    #[tracing::instrument(skip_all, name = "FetchJWT")]
    async fn fetch_jwt(
        &self,
        request: Request<pb::FetchJwtRequest>,
    ) -> Result<Response<pb::FetchJwtResponse>, Status> {
        let caller = self.caller(&request);
        let r = request.into_inner();
        let j = served(
            "FetchJWT",
            self.broker.fetch_jwt(&r.audiences, r.ttl_seconds, &caller),
        )
        .await?;
        Ok(Response::new(pb::FetchJwtResponse {
            jwt_svid: j.token,
            expires_at: j.expires_at,
        }))
    }

    #[tracing::instrument(skip_all, name = "ValidateJWT")]
    async fn validate_jwt(
        &self,
        request: Request<pb::ValidateJwtRequest>,
    ) -> Result<Response<pb::ValidateJwtResponse>, Status> {
        let r = request.into_inner();
        let broker = &self.broker;
        let v = served("ValidateJWT", async {
            broker.validate_jwt(&r.token, &r.audience)
        })
        .await?;
        Ok(Response::new(pb::ValidateJwtResponse {
            spiffe_id: v.spiffe_id,
            claims_json: v.claims_json,
        }))
    }

    #[tracing::instrument(skip_all, name = "GetCrl")]
    async fn get_crl(
        &self,
        _request: Request<pb::GetCrlRequest>,
    ) -> Result<Response<pb::GetCrlResponse>, Status> {
        Ok(Response::new(pb::GetCrlResponse {
            crls: self.broker.crls().as_ref().clone(),
        }))
    }

    #[tracing::instrument(skip_all, name = "GetChallenge")]
    async fn get_challenge(
        &self,
        request: Request<pb::GetChallengeRequest>,
    ) -> Result<Response<pb::GetChallengeResponse>, Status> {
        let caller = self.caller(&request);
        let c = served("GetChallenge", self.broker.challenge(&caller)).await?;
        Ok(Response::new(pb::GetChallengeResponse {
            nonce: c.nonce,
            expires_at: c.expires_at,
            formats: self
                .broker
                .attestation_formats()
                .into_iter()
                .map(String::from)
                .collect(),
        }))
    }

    type WatchBundleStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::GetBundleResponse, Status>> + Send>,
    >;

    #[tracing::instrument(skip_all, name = "WatchBundle")]
    async fn watch_bundle(
        &self,
        _request: Request<pb::GetBundleRequest>,
    ) -> Result<Response<Self::WatchBundleStream>, Status> {
        use tokio_stream::StreamExt;
        let broker = self.broker.clone();
        // WatchStream yields the current value first, then every change.
        let stream = tokio_stream::wrappers::WatchStream::new(self.broker.watch_bundle())
            .map(move |_| Ok(bundle_response(&broker)));
        Ok(Response::new(Box::pin(stream)))
    }
}

fn bundle_response(broker: &Broker) -> pb::GetBundleResponse {
    let b = broker.bundle();
    pb::GetBundleResponse {
        trust_domain: b.trust_domain,
        x509_authorities: b.x509_authorities,
        spiffe_bundle_json: b.spiffe_bundle_json,
        sequence: b.sequence,
    }
}

fn enroll_response(out: crate::core::Enrolled) -> pb::EnrollResponse {
    pb::EnrollResponse {
        spiffe_id: out.spiffe_id,
        x509_svid_chain: out.chain,
        trust_bundle: out.trust_bundle,
        jwt_svid: out.jwt_svid.unwrap_or_default(),
        expires_at: out.expires_at,
        retried: out.retried,
    }
}

/// The `Admin` service: on the local socket every caller is the trusted
/// local operator; on the public port the caller is whoever the TLS peer
/// certificate says (or nobody), and the broker authorizes.
#[derive(Debug, Clone)]
pub struct AdminApi {
    broker: Arc<Broker>,
    local: bool,
}

impl AdminApi {
    /// The admin service of the local socket.
    pub fn local(broker: Arc<Broker>) -> Self {
        Self {
            broker,
            local: true,
        }
    }

    /// The admin service of the public TLS port.
    pub fn public(broker: Arc<Broker>) -> Self {
        Self {
            broker,
            local: false,
        }
    }

    fn caller<T>(&self, req: &Request<T>) -> Caller {
        if self.local {
            Caller::LocalAdmin
        } else {
            caller::public_caller(req)
        }
    }

    /// The tonic service with size caps applied.
    pub fn into_service(self) -> pb::admin_server::AdminServer<Self> {
        pb::admin_server::AdminServer::new(self).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminApi {
    #[tracing::instrument(skip_all, name = "CreateEnrollmentToken")]
    async fn create_enrollment_token(
        &self,
        request: Request<pb::CreateEnrollmentTokenRequest>,
    ) -> Result<Response<pb::CreateEnrollmentTokenResponse>, Status> {
        let caller = self.caller(&request);
        let r = request.into_inner();
        let t = self
            .broker
            .create_token(&r.spiffe_id, r.ttl_seconds, r.max_uses, &caller)
            .await?;
        Ok(Response::new(pb::CreateEnrollmentTokenResponse {
            token: t.token,
            token_id: t.token_id,
            expires_at: t.expires_at,
            ca_pin: t.ca_pin,
        }))
    }

    #[tracing::instrument(skip_all, name = "RevokeEnrollmentToken")]
    async fn revoke_enrollment_token(
        &self,
        request: Request<pb::RevokeEnrollmentTokenRequest>,
    ) -> Result<Response<pb::RevokeEnrollmentTokenResponse>, Status> {
        let caller = self.caller(&request);
        let r = request.into_inner();
        let revoked = self.broker.revoke_token(&r.token_id, &caller).await?;
        Ok(Response::new(pb::RevokeEnrollmentTokenResponse { revoked }))
    }

    #[tracing::instrument(skip_all, name = "ListEnrollmentTokens")]
    async fn list_enrollment_tokens(
        &self,
        request: Request<pb::ListEnrollmentTokensRequest>,
    ) -> Result<Response<pb::ListEnrollmentTokensResponse>, Status> {
        let caller = self.caller(&request);
        let tokens = self
            .broker
            .list_tokens(&caller)
            .await?
            .into_iter()
            .map(|t| pb::EnrollmentToken {
                token_id: t.token_id,
                spiffe_id: t.spiffe_id,
                created_at: t.created_at,
                expires_at: t.expires_at,
                max_uses: t.max_uses,
                uses: t.uses,
                revoked: t.revoked,
            })
            .collect();
        Ok(Response::new(pb::ListEnrollmentTokensResponse { tokens }))
    }

    #[tracing::instrument(skip_all, name = "ListAuditEvents")]
    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let caller = self.caller(&request);
        let r = request.into_inner();
        let events = self
            .broker
            .list_audit(r.after_seq, r.limit, &caller)
            .await?
            .into_iter()
            .map(|e| pb::AuditEvent {
                seq: e.seq,
                time_ms: e.time_ms,
                kind: e.kind,
                outcome: e.outcome,
                fields_json: e.fields_json,
                hash: e.hash,
            })
            .collect();
        Ok(Response::new(pb::ListAuditEventsResponse { events }))
    }

    #[tracing::instrument(skip_all, name = "VerifyAuditChain")]
    async fn verify_audit_chain(
        &self,
        request: Request<pb::VerifyAuditChainRequest>,
    ) -> Result<Response<pb::VerifyAuditChainResponse>, Status> {
        let caller = self.caller(&request);
        let v = self.broker.verify_audit(&caller).await?;
        let (broken_at, problem) = v.broken.unwrap_or_default();
        Ok(Response::new(pb::VerifyAuditChainResponse {
            ok: broken_at == 0,
            events: v.events,
            broken_at,
            problem,
        }))
    }

    #[tracing::instrument(skip_all, name = "BootstrapPlan")]
    async fn bootstrap_plan(
        &self,
        request: Request<pb::BootstrapPlanRequest>,
    ) -> Result<Response<pb::BootstrapPlanResponse>, Status> {
        let caller = self.caller(&request);
        let r = request.into_inner();
        let b = served(
            "BootstrapPlan",
            self.broker
                .bootstrap_plan(&r.payload, &r.signature, &r.plan, &caller),
        )
        .await?;
        Ok(Response::new(pb::BootstrapPlanResponse {
            status: "PLAN_CREATED".to_owned(),
            plan_version: b.version,
            plan_sha256: b.sha256,
            admin_token: b.admin_token,
            admin_spiffe_id: b.admin_spiffe_id,
        }))
    }

    #[tracing::instrument(skip_all, name = "ProposePlan")]
    async fn propose_plan(
        &self,
        request: Request<pb::ProposePlanRequest>,
    ) -> Result<Response<pb::PlanResponse>, Status> {
        let caller = self.caller(&request);
        let r = request.into_inner();
        let v = self.broker.propose_plan(&r.plan, &caller).await?;
        Ok(Response::new(plan_response(v)))
    }

    #[tracing::instrument(skip_all, name = "ApprovePlan")]
    async fn approve_plan(
        &self,
        request: Request<pb::ApprovePlanRequest>,
    ) -> Result<Response<pb::PlanResponse>, Status> {
        let caller = self.caller(&request);
        let r = request.into_inner();
        let v = self
            .broker
            .approve_plan(r.version, &r.plan_sha256, &caller)
            .await?;
        Ok(Response::new(plan_response(v)))
    }

    #[tracing::instrument(skip_all, name = "ApplyPlan")]
    async fn apply_plan(
        &self,
        request: Request<pb::ApplyPlanRequest>,
    ) -> Result<Response<pb::PlanResponse>, Status> {
        let caller = self.caller(&request);
        let r = request.into_inner();
        let v = self.broker.apply_plan(&r.plan, &caller).await?;
        Ok(Response::new(plan_response(v)))
    }

    #[tracing::instrument(skip_all, name = "GetPlan")]
    async fn get_plan(
        &self,
        request: Request<pb::GetPlanRequest>,
    ) -> Result<Response<pb::PlanResponse>, Status> {
        let caller = self.caller(&request);
        let r = request.into_inner();
        let v = self.broker.get_plan(r.version, &caller).await?;
        Ok(Response::new(plan_response(v)))
    }

    #[tracing::instrument(skip_all, name = "GetStatus")]
    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        let caller = self.caller(&request);
        let s = self.broker.status(&caller).await?;
        let (plan_version, plan_sha256) = s.plan.unwrap_or_default();
        Ok(Response::new(pb::GetStatusResponse {
            bootstrap_enabled: s.bootstrap_enabled,
            plan_version,
            plan_sha256,
            trust_domain: s.trust_domain,
            ca_pin: s.ca_pin,
            tokens: s.counts.tokens,
            issued: s.counts.issued,
            audit_events: s.counts.audit,
            bootstrap_secret: s.bootstrap_secret,
        }))
    }
    #[tracing::instrument(skip_all, name = "RevokeIdentity")]
    async fn revoke_identity(
        &self,
        request: Request<pb::RevokeIdentityRequest>,
    ) -> Result<Response<pb::RevokeIdentityResponse>, Status> {
        let caller = self.caller(&request);
        let r = request.into_inner();
        let rec = self
            .broker
            .revoke_identity(&r.kind, &r.value, &r.reason, &caller)
            .await?;
        let pb = revocation_pb(rec);
        Ok(Response::new(pb::RevokeIdentityResponse {
            revoked_at: pb.revoked_at,
            expires_at: pb.expires_at,
        }))
    }

    #[tracing::instrument(skip_all, name = "ListRevocations")]
    async fn list_revocations(
        &self,
        request: Request<pb::ListRevocationsRequest>,
    ) -> Result<Response<pb::ListRevocationsResponse>, Status> {
        let caller = self.caller(&request);
        let revocations = self
            .broker
            .list_revocations(&caller)
            .await?
            .into_iter()
            .map(revocation_pb)
            .collect();
        Ok(Response::new(pb::ListRevocationsResponse { revocations }))
    }

    #[tracing::instrument(skip_all, name = "RotateAuthority")]
    async fn rotate_authority(
        &self,
        request: Request<pb::RotateAuthorityRequest>,
    ) -> Result<Response<pb::RotateAuthorityResponse>, Status> {
        let caller = self.caller(&request);
        let r = request.into_inner();
        let v = self
            .broker
            .rotate(r.revoke_old, r.prepare_only, &caller)
            .await?;
        Ok(Response::new(pb::RotateAuthorityResponse {
            old_generation: v.old,
            new_generation: v.new,
            bundle_sequence: v.sequence,
            activated: v.activated,
        }))
    }
}

fn revocation_pb(r: crate::store::RevocationRecord) -> pb::Revocation {
    pb::Revocation {
        kind: r.kind.as_str().to_owned(),
        value: r.value,
        revoked_at: r.revoked_at_ms.div_euclid(1000),
        expires_at: r.expires_at_ms.map_or(0, |e| e.div_euclid(1000)),
        reason: r.reason,
    }
}

fn plan_response(v: crate::core::PlanView) -> pb::PlanResponse {
    pb::PlanResponse {
        version: v.version,
        plan_sha256: v.sha256,
        state: v.state,
        approvals: u32::try_from(v.approvers.len()).unwrap_or(u32::MAX),
        required_approvals: v.required_approvals,
        plan_json: v.plan_json,
        proposer: v.proposer,
        approvers: v.approvers,
        expires_at: v.expires_at,
    }
}
