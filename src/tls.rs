//! The public port's TLS, done here rather than by tonic so that it can
//! change while serving: the server certificate is re-issued when the CA
//! rotates, and the client-certificate verifier trusts every CA in the
//! current bundle (old and new generations during an overlap). Client
//! certificates are optional (workloads enroll without one); when one is
//! presented it must chain to a bundle CA. A renewal grace (from the plan)
//! lets a just-expired X509-SVID still complete the handshake; the broker
//! then decides. Handshakes that take longer than the timeout are dropped,
//! so slow clients cannot pin connections.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc, Mutex, PoisonError, RwLock,
    },
    time::Duration,
};

use anyhow::{anyhow, Context};
use rustls::{
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        WebPkiClientVerifier,
    },
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_rustls::{server::TlsStream, TlsAcceptor};
use tokio_stream::wrappers::ReceiverStream;

use crate::{ca::ring::Authority, netio::Coalesced};

/// The serving certificate a TLS configuration is built from.
pub struct TlsMaterial {
    /// Serving certificate chain (leaf first).
    pub chain: Vec<Vec<u8>>,
    /// Its PKCS#8 key.
    pub key_pkcs8: crate::secret::Secret,
}

/// Verifies client certificates against the authority's *current* bundle
/// (rebuilt when the bundle sequence changes, checked on every handshake, so
/// a certificate from a just-activated CA generation is accepted at once),
/// and accepts expired certificates within the plan's renewal grace by
/// re-verifying at the certificate's last valid second.
struct RingVerifier {
    authority: Arc<Authority>,
    provider: Arc<CryptoProvider>,
    cache: Mutex<Option<(u64, Arc<dyn ClientCertVerifier>)>>,
    grace_secs: Arc<AtomicI64>,
    /// Root hints are optional in TLS; we send none (clients have one identity).
    hints: Vec<DistinguishedName>,
}

impl std::fmt::Debug for RingVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingVerifier").finish_non_exhaustive()
    }
}

impl RingVerifier {
    fn inner(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let view = self.authority.view();
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((seq, v)) = cache.as_ref() {
            if *seq == view.sequence {
                return Ok(v.clone());
            }
        }
        let mut roots = RootCertStore::empty();
        for r in view.x509_authorities() {
            roots
                .add(CertificateDer::from(r))
                .map_err(|e| rustls::Error::General(format!("client CA root: {e}")))?;
        }
        let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| rustls::Error::General(format!("client verifier: {e}")))?;
        *cache = Some((view.sequence, v.clone()));
        Ok(v)
    }
}

impl ClientCertVerifier for RingVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let inner = self.inner()?;
        match inner.verify_client_cert(end_entity, intermediates, now) {
            Err(rustls::Error::InvalidCertificate(CertificateError::ExpiredContext {
                time,
                not_after,
            })) => {
                let grace = self.grace_secs.load(Ordering::Relaxed).max(0) as u64;
                let overdue = time.as_secs().saturating_sub(not_after.as_secs());
                if grace > 0 && overdue <= grace {
                    let at = UnixTime::since_unix_epoch(Duration::from_secs(not_after.as_secs()));
                    inner.verify_client_cert(end_entity, intermediates, at)
                } else {
                    Err(rustls::Error::InvalidCertificate(CertificateError::Expired))
                }
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The current server configuration, swappable while serving.
pub struct DynamicTls {
    config: RwLock<Arc<ServerConfig>>,
    verifier: Arc<RingVerifier>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for DynamicTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamicTls").finish_non_exhaustive()
    }
}

impl DynamicTls {
    /// Builds the first configuration.
    ///
    /// # Errors
    /// Unusable certificate, key or roots.
    pub fn new(authority: Arc<Authority>, m: TlsMaterial) -> anyhow::Result<Self> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = Arc::new(RingVerifier {
            authority,
            provider: provider.clone(),
            cache: Mutex::new(None),
            grace_secs: Arc::new(AtomicI64::new(0)),
            hints: Vec::new(),
        });
        verifier.inner().map_err(|e| anyhow!("{e}"))?;
        let config = build(&provider, verifier.clone(), m)?;
        Ok(Self {
            config: RwLock::new(config),
            verifier,
            provider,
        })
    }

    /// Replaces the serving certificate for new connections.
    ///
    /// # Errors
    /// Unusable certificate or key (the old configuration stays).
    pub fn update(&self, m: TlsMaterial) -> anyhow::Result<()> {
        let config = build(&self.provider, self.verifier.clone(), m)?;
        *self.config.write().unwrap_or_else(PoisonError::into_inner) = config;
        Ok(())
    }

    /// Sets the renewal grace for expired client certificates.
    pub fn set_grace_secs(&self, secs: i64) {
        self.verifier.grace_secs.store(secs, Ordering::Relaxed);
    }

    fn current(&self) -> Arc<ServerConfig> {
        self.config
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn build(
    provider: &Arc<CryptoProvider>,
    verifier: Arc<RingVerifier>,
    m: TlsMaterial,
) -> anyhow::Result<Arc<ServerConfig>> {
    let chain = m.chain.into_iter().map(CertificateDer::from).collect();
    let key = PrivateKeyDer::Pkcs8(m.key_pkcs8.expose().to_vec().into());
    let mut cfg = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .context("serving certificate")?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// A stream of established TLS connections for tonic's
/// `serve_with_incoming_shutdown`. Each handshake runs in its own task with
/// `handshake_timeout`; failures are logged at debug level and dropped.
/// Established connections coalesce their writes ([`Coalesced`]).
pub fn incoming(
    listener: TcpListener,
    tls: Arc<DynamicTls>,
    handshake_timeout: Duration,
) -> ReceiverStream<Result<Coalesced<TlsStream<tokio::net::TcpStream>>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let (tcp, peer): (tokio::net::TcpStream, SocketAddr) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                break;
            }
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(Coalesced::new(stream))).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
