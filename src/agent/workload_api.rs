//! The SPIFFE Workload API on the agent's Unix socket (formats.md §2):
//! service `SpiffeWorkloadAPI` (no proto package), generated from
//! `proto/spiffe/workload.proto`.
//!
//! Every call must carry the metadata `workload.spiffe.io: true`, else
//! `InvalidArgument`. The caller is identified by its Unix peer credentials
//! (see [`super::selectors`]); a caller entitled to nothing gets
//! `PermissionDenied`; `Unavailable` means "retry" (not enrolled yet, or the
//! broker is needed and away). Streams send the full state first and again
//! on every change of what the caller sees (renewal, rotation, bundle).
//! Bundle maps are keyed `spiffe://<trust domain>`; X.509 bundles are
//! concatenated DER; keys are PKCS#8 DER.

use std::{collections::HashMap, fmt, pin::Pin, sync::Arc};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{transport::server::UdsConnectInfo, Code, Request, Response, Status};

use super::{
    jwt,
    manager::{bundle_of, ServeError, Shared, Target},
    selectors,
    state::Snapshot,
};

/// Generated code for the Workload API (no package), with hand-written
/// redacting `Debug` for messages that carry a private key or a JWT.
pub mod pb {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    include!(concat!(env!("OUT_DIR"), "/spiffe/_.rs"));
}

/// Largest request accepted on the socket.
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Metadata every Workload API request must carry.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";
/// Most audiences in one JWT-SVID request.
const MAX_AUDIENCES: usize = 16;
/// Longest audience, bytes.
const MAX_AUDIENCE_LEN: usize = 256;

impl fmt::Debug for pb::X509svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509SVID")
            .field("spiffe_id", &self.spiffe_id)
            .field("x509_svid_len", &self.x509_svid.len())
            .field("hint", &self.hint)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for pb::Jwtsvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JWTSVID")
            .field("spiffe_id", &self.spiffe_id)
            .field("hint", &self.hint)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for pb::ValidateJwtsvidRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValidateJWTSVIDRequest")
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

/// The Workload API service.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    shared: Arc<Shared>,
}

impl WorkloadApi {
    /// The tonic service over the agent's shared state.
    pub fn service(
        shared: Arc<Shared>,
    ) -> pb::spiffe_workload_api_server::SpiffeWorkloadApiServer<Self> {
        pb::spiffe_workload_api_server::SpiffeWorkloadApiServer::new(Self { shared })
            .max_decoding_message_size(MAX_REQUEST_BYTES)
    }
}

type Updates<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

impl From<ServeError> for Status {
    fn from(e: ServeError) -> Self {
        match e {
            ServeError::Denied(m) => Status::permission_denied(m),
            ServeError::Unavailable(m) => Status::unavailable(m),
        }
    }
}

/// The security header, then the caller's selectors.
fn admit<T>(req: &Request<T>, rpc: &'static str) -> Result<Vec<String>, Status> {
    let ok = req
        .metadata()
        .get(SECURITY_HEADER)
        .is_some_and(|v| v.as_bytes() == b"true");
    if !ok {
        tracing::debug!(rpc, "refused: security header missing");
        return Err(Status::invalid_argument(
            "security header missing from request (workload.spiffe.io: true)",
        ));
    }
    let cred = req
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .ok_or_else(|| Status::permission_denied("caller credentials unavailable"))?;
    let observed = selectors::of_peer(cred.uid(), cred.gid(), cred.pid());
    tracing::debug!(rpc, uid = cred.uid(), gid = cred.gid(), pid = ?cred.pid(), "call");
    Ok(observed)
}

/// Sends `first`, then a new message whenever `build` yields a different
/// fingerprint after a state change; ends on stop, on client disconnect, or
/// after sending a `PermissionDenied` (the caller lost its last identity).
fn updates<T, F, Fut>(
    shared: Arc<Shared>,
    mut changes: watch::Receiver<Arc<Snapshot>>,
    first: (T, Vec<String>),
    build: F,
) -> Updates<T>
where
    T: Send + 'static,
    F: Fn(Arc<Shared>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(T, Vec<String>), Status>> + Send,
{
    let (tx, rx) = mpsc::channel(4);
    let mut stop = shared.stop.clone();
    tokio::spawn(async move {
        let (msg, mut last) = first;
        if tx.send(Ok(msg)).await.is_err() {
            return;
        }
        loop {
            if *stop.borrow() {
                return;
            }
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                () = tx.closed() => return,
                r = stop.changed() => if r.is_err() { return },
            }
            match build(shared.clone()).await {
                Ok((msg, fp)) if fp != last => {
                    last = fp;
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(s) if s.code() == Code::PermissionDenied => {
                    let _ = tx.send(Err(s)).await;
                    return;
                }
                // Transient (broker away): the client keeps what it has.
                Err(_) => {}
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

async fn x509_svids(
    shared: Arc<Shared>,
    observed: Arc<Vec<String>>,
) -> Result<(pb::X509svidResponse, Vec<String>), Status> {
    let snap = shared.snapshot();
    let targets = shared.resolve(&snap, &observed)?;
    let bundle = bundle_of(&snap)?;
    let svids = shared.x509_for(&targets, &observed).await?;
    let concat = bundle.x509_concat();
    let mut fp: Vec<String> = svids.iter().map(|s| s.serial.clone()).collect();
    fp.push(bundle.sequence.to_string());
    let msg = pb::X509svidResponse {
        svids: svids
            .iter()
            .map(|s| pb::X509svid {
                spiffe_id: s.spiffe_id.clone(),
                x509_svid: s.chain.concat(),
                x509_svid_key: s.key.to_vec(),
                bundle: concat.clone(),
                hint: String::new(),
            })
            .collect(),
        crl: Vec::new(),
        federated_bundles: HashMap::new(),
    };
    Ok((msg, fp))
}

/// The bundle, for callers entitled to some identity.
fn entitled_bundle(
    shared: &Shared,
    observed: &[String],
) -> Result<Arc<super::state::Bundle>, Status> {
    let snap = shared.snapshot();
    shared.resolve(&snap, observed)?;
    Ok(bundle_of(&snap)?)
}

async fn x509_bundles(
    shared: Arc<Shared>,
    observed: Arc<Vec<String>>,
) -> Result<(pb::X509BundlesResponse, Vec<String>), Status> {
    let b = entitled_bundle(&shared, &observed)?;
    let msg = pb::X509BundlesResponse {
        crl: Vec::new(),
        bundles: HashMap::from([(b.td_id(), b.x509_concat())]),
    };
    Ok((msg, vec![b.sequence.to_string()]))
}

async fn jwt_bundles(
    shared: Arc<Shared>,
    observed: Arc<Vec<String>>,
) -> Result<(pb::JwtBundlesResponse, Vec<String>), Status> {
    let b = entitled_bundle(&shared, &observed)?;
    let msg = pb::JwtBundlesResponse {
        bundles: HashMap::from([(b.td_id(), b.jwks_json.clone().into_bytes())]),
    };
    Ok((msg, vec![b.sequence.to_string()]))
}

#[tonic::async_trait]
impl pb::spiffe_workload_api_server::SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = Updates<pb::X509svidResponse>;

    #[tracing::instrument(skip_all, name = "FetchX509SVID")]
    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let observed = Arc::new(admit(&request, "FetchX509SVID")?);
        let changes = self.shared.state.subscribe();
        let first = x509_svids(self.shared.clone(), observed.clone()).await?;
        Ok(Response::new(updates(
            self.shared.clone(),
            changes,
            first,
            move |s| x509_svids(s, observed.clone()),
        )))
    }

    type FetchX509BundlesStream = Updates<pb::X509BundlesResponse>;

    #[tracing::instrument(skip_all, name = "FetchX509Bundles")]
    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let observed = Arc::new(admit(&request, "FetchX509Bundles")?);
        let changes = self.shared.state.subscribe();
        let first = x509_bundles(self.shared.clone(), observed.clone()).await?;
        Ok(Response::new(updates(
            self.shared.clone(),
            changes,
            first,
            move |s| x509_bundles(s, observed.clone()),
        )))
    }

    #[tracing::instrument(skip_all, name = "FetchJWTSVID")]
    async fn fetch_jwtsvid(
        &self,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        let observed = admit(&request, "FetchJWTSVID")?;
        let r = request.into_inner();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if r.audience.len() > MAX_AUDIENCES
            || r.audience
                .iter()
                .any(|a| a.is_empty() || a.len() > MAX_AUDIENCE_LEN)
        {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_AUDIENCES} audiences of 1..={MAX_AUDIENCE_LEN} bytes"
            )));
        }
        let snap = self.shared.snapshot();
        let mut targets = self.shared.resolve(&snap, &observed)?;
        if !r.spiffe_id.is_empty() {
            let own_id = snap.own.as_ref().map(|s| s.spiffe_id.as_str());
            targets.retain(|t| match t {
                Target::Own => own_id == Some(r.spiffe_id.as_str()),
                Target::Workload(id) => *id == r.spiffe_id,
            });
            if targets.is_empty() {
                return Err(Status::permission_denied(
                    "the caller has no identity with this spiffe_id",
                ));
            }
        }
        let svids = self
            .shared
            .jwt_for(&targets, &r.audience, &observed)
            .await?;
        Ok(Response::new(pb::JwtsvidResponse {
            svids: svids
                .into_iter()
                .map(|(spiffe_id, token)| pb::Jwtsvid {
                    spiffe_id,
                    svid: token.to_string(),
                    hint: String::new(),
                })
                .collect(),
        }))
    }

    type FetchJWTBundlesStream = Updates<pb::JwtBundlesResponse>;

    #[tracing::instrument(skip_all, name = "FetchJWTBundles")]
    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let observed = Arc::new(admit(&request, "FetchJWTBundles")?);
        let changes = self.shared.state.subscribe();
        let first = jwt_bundles(self.shared.clone(), observed.clone()).await?;
        Ok(Response::new(updates(
            self.shared.clone(),
            changes,
            first,
            move |s| jwt_bundles(s, observed.clone()),
        )))
    }

    #[tracing::instrument(skip_all, name = "ValidateJWTSVID")]
    async fn validate_jwtsvid(
        &self,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        admit(&request, "ValidateJWTSVID")?;
        let r = request.into_inner();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if r.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let bundle = bundle_of(&self.shared.snapshot())?;
        let v = jwt::validate(&r.svid, &r.audience, &bundle, self.shared.clock.now_secs())
            .map_err(|m| Status::invalid_argument(format!("invalid JWT-SVID: {m}")))?;
        Ok(Response::new(pb::ValidateJwtsvidResponse {
            spiffe_id: v.spiffe_id,
            claims: Some(jwt::to_proto_struct(&v.claims)),
        }))
    }
}
