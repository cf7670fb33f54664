//! The agent's side of the broker: enrollment with the bootstrap credential,
//! renewal and JWT-SVIDs for its own identity (`Identity`, mTLS), the trust
//! bundle, and SVIDs for its workloads (`Delegation`, mTLS).
//!
//! Trust in the broker starts from the configured pin or bundle file; once
//! the agent holds the trust bundle it trusts that (so a CA rotation that
//! retires the pinned CA does not cut it off). The mTLS channel is cached
//! per own-SVID serial and dropped on any transport error. Every call has a
//! deadline. Keys are generated here, locally; only CSRs leave the host.

use std::{sync::Mutex, time::Duration};

use anyhow::anyhow;
use sha2::{Digest, Sha256};
use tonic::{transport::Channel, Code};
use zeroize::Zeroizing;

use super::state::{Bundle, EntryView, Svid};
use crate::{
    api::pb::{self, delegation_client::DelegationClient, identity_client::IdentityClient},
    cli::{self, ClientIdentity, Trust},
    clock::{Clock, SystemClock},
    token,
};

/// Deadline of one call to the broker.
const RPC_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest attestation document accepted from the source command.
const MAX_DOCUMENT_LEN: usize = 64 * 1024;
/// How long the attestation source command may run.
const ATTESTATION_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a call to the broker failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// The broker could not be reached (or the call timed out); retry.
    #[error("broker unreachable: {0}")]
    Unreachable(String),
    /// The broker answered with a refusal (`reason` is its stable reason).
    #[error("broker refused: {reason}: {message}")]
    Refused {
        /// gRPC code.
        code: Code,
        /// `ErrorInfo.reason`, or the code's name.
        reason: String,
        /// The broker's message (never contains secrets).
        message: String,
    },
    /// A local failure (key generation, a malformed answer, I/O).
    #[error("{0}")]
    Local(String),
}

impl UpstreamError {
    fn from_status(s: &tonic::Status) -> Self {
        match s.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled => {
                Self::Unreachable(format!("{:?}: {}", s.code(), s.message()))
            }
            code => Self::Refused {
                code,
                reason: crate::api::status::error_info(s)
                    .map(|(r, _)| r)
                    .unwrap_or_else(|| format!("{code:?}")),
                message: s.message().to_owned(),
            },
        }
    }

    /// The broker's reason, when it refused.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Self::Refused { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

/// How the agent proves itself the first time.
#[derive(Clone)]
pub enum Bootstrap {
    /// A file holding an enrollment token; deleted after a successful enrollment.
    TokenFile(std::path::PathBuf),
    /// A command whose stdout is an attestation document. It runs with
    /// `SIGIL_CHALLENGE` (hex server nonce), `SIGIL_PUBLIC_KEY` (hex DER SPKI
    /// of the new key) and `SIGIL_CSR_SHA256` in its environment.
    Attestation {
        /// `aws_nitro` or `oidc`.
        format: String,
        /// Run with `sh -c`.
        command: String,
    },
    /// None: the agent only runs on a saved, still-valid SVID.
    None,
}

impl std::fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TokenFile(p) => f.debug_tuple("TokenFile").field(p).finish(),
            Self::Attestation { format, .. } => f
                .debug_struct("Attestation")
                .field("format", format)
                .finish_non_exhaustive(),
            Self::None => f.write_str("None"),
        }
    }
}

/// The result of an enrollment or renewal.
#[derive(Debug)]
pub struct Issued {
    /// The new SVID.
    pub svid: Svid,
    /// DER CA certificates returned with it.
    pub trust_bundle: Vec<Vec<u8>>,
}

/// The broker, as the agent sees it.
pub struct Upstream {
    url: String,
    initial: Trust,
    roots: Mutex<Option<Vec<Vec<u8>>>>,
    mtls: Mutex<Option<(String, Channel)>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn call<T>(
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, UpstreamError> {
    match tokio::time::timeout(RPC_TIMEOUT, fut).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(UpstreamError::from_status(&s)),
        Err(_) => Err(UpstreamError::Unreachable("call timed out".into())),
    }
}

fn local(e: impl std::fmt::Display) -> UpstreamError {
    UpstreamError::Local(e.to_string())
}

/// A CSR for a PKCS#8 DER key.
fn csr_for(key: &[u8]) -> anyhow::Result<Vec<u8>> {
    let pair = rcgen::KeyPair::try_from(key).map_err(|_| anyhow!("unusable key"))?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?.serialize_request(&pair)?;
    Ok(csr.der().to_vec())
}

impl Upstream {
    /// A broker at `url` (`https://HOST:PORT`), first trusted through `initial`.
    ///
    /// # Errors
    /// A malformed URL.
    pub fn new(url: &str, initial: Trust) -> anyhow::Result<Self> {
        let uri: http::Uri = url
            .parse()
            .map_err(|_| anyhow!("--broker must be https://HOST:PORT"))?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            return Err(anyhow!("--broker must be https://HOST:PORT"));
        }
        Ok(Self {
            url: url.to_owned(),
            initial,
            roots: Mutex::new(None),
            mtls: Mutex::new(None),
        })
    }

    /// Trusts these CA certificates from now on (the current bundle).
    pub fn trust_bundle(&self, roots: &[Vec<u8>]) {
        let mut cur = lock(&self.roots);
        if cur.as_deref() != Some(roots) && !roots.is_empty() {
            *cur = Some(roots.to_vec());
            *lock(&self.mtls) = None;
        }
    }

    fn trust(&self) -> Trust {
        match lock(&self.roots).as_ref() {
            Some(r) => Trust::Roots(r.clone()),
            None => self.initial.clone(),
        }
    }

    async fn connect(&self, id: Option<ClientIdentity>) -> Result<Channel, UpstreamError> {
        let tls = cli::tls_config_with(&self.trust(), id).map_err(local)?;
        tokio::time::timeout(RPC_TIMEOUT, cli::connect_tls(&self.url, tls))
            .await
            .map_err(|_| UpstreamError::Unreachable("connect timed out".into()))?
            .map_err(|e| UpstreamError::Unreachable(format!("{e:#}")))
    }

    async fn mtls(&self, own: &Svid) -> Result<Channel, UpstreamError> {
        if let Some((serial, ch)) = lock(&self.mtls).as_ref() {
            if *serial == own.serial {
                return Ok(ch.clone());
            }
        }
        let id = ClientIdentity::from_der(own.chain.clone(), own.key.to_vec());
        let ch = self.connect(Some(id)).await?;
        *lock(&self.mtls) = Some((own.serial.clone(), ch.clone()));
        Ok(ch)
    }

    /// Forgets the cached channel when a call failed in transport.
    fn check<T>(&self, r: Result<T, UpstreamError>) -> Result<T, UpstreamError> {
        if matches!(r, Err(UpstreamError::Unreachable(_))) {
            *lock(&self.mtls) = None;
        }
        r
    }

    /// Enrolls with the bootstrap credential and `key` (PKCS#8 DER).
    ///
    /// # Errors
    /// No credential, an unreadable token file, a failed attestation
    /// command, or the broker's refusal.
    pub async fn enroll(
        &self,
        bootstrap: &Bootstrap,
        key: Zeroizing<Vec<u8>>,
    ) -> Result<Issued, UpstreamError> {
        let csr = csr_for(&key).map_err(local)?;
        let mut client = IdentityClient::new(self.connect(None).await?);
        let credential = match bootstrap {
            Bootstrap::TokenFile(path) => {
                let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                    UpstreamError::Local(format!("token file {}: {e}", path.display()))
                })?);
                let (token_id, secret) = token::parse_token(text.trim()).map_err(|e| {
                    UpstreamError::Local(format!("token file {}: {e}", path.display()))
                })?;
                pb::enroll_request::Credential::Token(cli::token_proof(
                    &token_id,
                    &secret,
                    &csr,
                    SystemClock.now_ms(),
                ))
            }
            Bootstrap::Attestation { format, command } => {
                let challenge = call(client.get_challenge(pb::GetChallengeRequest {})).await?;
                let document = attestation_document(format, command, &challenge.nonce, &csr)
                    .await
                    .map_err(local)?;
                pb::enroll_request::Credential::Attestation(pb::Attestation {
                    format: format.clone(),
                    document,
                })
            }
            Bootstrap::None => {
                return Err(UpstreamError::Local(
                    "no valid SVID and no bootstrap credential (give --token-file or --attestation-command)"
                        .into(),
                ))
            }
        };
        let r = call(client.enroll(pb::EnrollRequest {
            csr,
            credential: Some(credential),
            jwt_audiences: vec![],
        }))
        .await?;
        let svid = Svid::new(r.x509_svid_chain, key).map_err(local)?;
        Ok(Issued {
            svid,
            trust_bundle: r.trust_bundle,
        })
    }

    /// Renews the agent's own SVID with a new key (`Identity.Renew`, mTLS).
    ///
    /// # Errors
    /// Transport, refusal (`NOT_AUTHORIZED` once expired, `SVID_REVOKED`).
    pub async fn renew(&self, own: &Svid) -> Result<Issued, UpstreamError> {
        let r = async {
            let (key, csr) = cli::new_key_and_csr().map_err(local)?;
            let mut c = IdentityClient::new(self.mtls(own).await?);
            let r = call(c.renew(pb::RenewRequest {
                csr,
                jwt_audiences: vec![],
            }))
            .await?;
            let svid = Svid::new(r.x509_svid_chain, key).map_err(local)?;
            Ok(Issued {
                svid,
                trust_bundle: r.trust_bundle,
            })
        }
        .await;
        self.check(r)
    }

    /// A JWT-SVID for the agent's own identity: (token, exp Unix seconds).
    ///
    /// # Errors
    /// Transport or refusal.
    pub async fn fetch_jwt(
        &self,
        own: &Svid,
        audiences: &[String],
    ) -> Result<(Zeroizing<String>, i64), UpstreamError> {
        let r = async {
            let mut c = IdentityClient::new(self.mtls(own).await?);
            let r = call(c.fetch_jwt(pb::FetchJwtRequest {
                audiences: audiences.to_vec(),
                ttl_seconds: 0,
            }))
            .await?;
            Ok((Zeroizing::new(r.jwt_svid), r.expires_at))
        }
        .await;
        self.check(r)
    }

    /// The current trust bundle and its SPIFFE JSON.
    ///
    /// # Errors
    /// Transport or a malformed bundle.
    pub async fn bundle(&self, own: &Svid) -> Result<(Bundle, String), UpstreamError> {
        let r = async {
            let mut c = IdentityClient::new(self.mtls(own).await?);
            let r = call(c.get_bundle(pb::GetBundleRequest {})).await?;
            let b = Bundle::from_parts(
                r.trust_domain,
                r.x509_authorities,
                &r.spiffe_bundle_json,
                r.sequence,
            )
            .map_err(local)?;
            Ok((b, r.spiffe_bundle_json))
        }
        .await;
        self.check(r)
    }

    /// The plan entries this agent may serve.
    ///
    /// # Errors
    /// Transport or refusal.
    pub async fn entries(&self, own: &Svid) -> Result<Vec<EntryView>, UpstreamError> {
        let r = async {
            let mut c = DelegationClient::new(self.mtls(own).await?);
            let r = call(c.list_delegated_entries(pb::ListDelegatedEntriesRequest {})).await?;
            Ok(r.entries
                .into_iter()
                .map(|e| EntryView {
                    spiffe_id: e.spiffe_id,
                    selectors: e.selectors,
                })
                .collect())
        }
        .await;
        self.check(r)
    }

    /// An X509-SVID for a workload, with a key generated here.
    ///
    /// # Errors
    /// Transport or refusal.
    pub async fn mint_x509(
        &self,
        own: &Svid,
        spiffe_id: &str,
        selectors: &[String],
    ) -> Result<Svid, UpstreamError> {
        let r = async {
            let (key, csr) = cli::new_key_and_csr().map_err(local)?;
            let mut c = DelegationClient::new(self.mtls(own).await?);
            let r = call(c.mint_delegated(pb::MintDelegatedRequest {
                csr,
                spiffe_id: spiffe_id.to_owned(),
                selectors: selectors.to_vec(),
            }))
            .await?;
            Svid::new(r.x509_svid_chain, key).map_err(local)
        }
        .await;
        self.check(r)
    }

    /// A JWT-SVID for a workload: (token, exp Unix seconds).
    ///
    /// # Errors
    /// Transport or refusal.
    pub async fn mint_jwt(
        &self,
        own: &Svid,
        spiffe_id: &str,
        audiences: &[String],
        selectors: &[String],
    ) -> Result<(Zeroizing<String>, i64), UpstreamError> {
        let r = async {
            let mut c = DelegationClient::new(self.mtls(own).await?);
            let r = call(c.mint_delegated_jwt(pb::MintDelegatedJwtRequest {
                spiffe_id: spiffe_id.to_owned(),
                audiences: audiences.to_vec(),
                selectors: selectors.to_vec(),
                ttl_seconds: 0,
            }))
            .await?;
            Ok((Zeroizing::new(r.jwt_svid), r.expires_at))
        }
        .await;
        self.check(r)
    }
}

/// Runs the attestation source command; its stdout is the document.
async fn attestation_document(
    format: &str,
    command: &str,
    nonce: &[u8],
    csr: &[u8],
) -> anyhow::Result<Vec<u8>> {
    let spki = crate::ca::verify_csr(csr)
        .map_err(|e| anyhow!("own CSR: {e}"))?
        .spki_der()
        .to_vec();
    let run = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("SIGIL_CHALLENGE", hex::encode(nonce))
        .env("SIGIL_PUBLIC_KEY", hex::encode(&spki))
        .env("SIGIL_CSR_SHA256", hex::encode(Sha256::digest(csr)))
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(ATTESTATION_TIMEOUT, run)
        .await
        .map_err(|_| anyhow!("attestation command timed out"))?
        .map_err(|e| anyhow!("attestation command: {e}"))?;
    if !out.status.success() {
        return Err(anyhow!("attestation command exited with {}", out.status));
    }
    let mut doc = out.stdout;
    if format == "oidc" {
        doc = String::from_utf8_lossy(&doc).trim().as_bytes().to_vec();
    }
    if doc.is_empty() || doc.len() > MAX_DOCUMENT_LEN {
        return Err(anyhow!(
            "attestation command printed {} bytes (1..={MAX_DOCUMENT_LEN} expected)",
            doc.len()
        ));
    }
    Ok(doc)
}
