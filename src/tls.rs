//! The public port's TLS, done here rather than by tonic so that it can
//! change while serving: the server certificate is re-issued when the CA
//! rotates, and the client-certificate verifier trusts every CA in the
//! current bundle (old and new generations during an overlap). Client
//! certificates are optional (workloads enroll without one); when one is
//! presented it must chain to a bundle CA. A renewal grace (from the plan)
//! lets a just-expired X509-SVID still complete the handshake; the broker
//! then decides. Handshakes that take longer than the timeout are dropped,
//! so slow clients cannot pin connections.
//!
//! It also owns the TLS parameters both ends use ([`crypto_provider`]):
//! aws-lc-rs; the post-quantum hybrid X25519MLKEM768 as the preferred key
//! exchange; TLS 1.3 suites ordered AES-128-GCM-SHA256 first, chosen by the
//! server whatever the client prefers; and no session tickets or session
//! cache (every connection runs a full handshake and presents its
//! certificate afresh).

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

/// The TLS suites both ends prefer, most preferred first. TLS 1.3's
/// AES-128-GCM-SHA256 (the suite RFC 8446 §9.1 makes mandatory) leads:
/// the SHA-384 key schedule of AES-256-GCM-SHA384 (rustls' first choice)
/// ran on aws-lc's portable SHA-512 code on the benchmark machine's AMD
/// EPYC (`sha512_block_data_order_nohw` in `perf`) and cost ~35 µs more CPU
/// per handshake on each side (`cargo bench --bench tls`). TLS 1.2 suites keep the same order for clients that cannot do 1.3.
const SUITE_ORDER: [rustls::CipherSuite; 9] = [
    rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
    rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
    rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
    rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    rustls::CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
];

/// The crypto provider of the broker's port and of every Sigil client:
/// aws-lc-rs with its default suites and key exchange groups, the suites
/// in [`SUITE_ORDER`] (any suite not listed there keeps its place after
/// them), and X25519MLKEM768 (ML-KEM-768 with X25519, as Go and the
/// browsers use by default) moved ahead of plain X25519, where rustls puts
/// it without its `prefer-post-quantum` feature: what a recorded session
/// carries (JWT-SVIDs, admin-issued token secrets) should not be readable
/// by a future quantum computer. It costs each end ~20–30 µs more per
/// handshake (`cargo bench --bench tls`).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites.sort_by_key(|s| {
        SUITE_ORDER
            .iter()
            .position(|o| *o == s.suite())
            .unwrap_or(SUITE_ORDER.len())
    });
    p.kx_groups
        .sort_by_key(|g| g.name() != rustls::NamedGroup::X25519MLKEM768);
    Arc::new(p)
}

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
        let provider = crypto_provider();
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

    /// The configuration new connections get.
    pub fn current(&self) -> Arc<ServerConfig> {
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
    // Our order, not the client's: rustls clients put AES-256 first.
    cfg.ignore_client_order = true;
    // No resumption. Sigil's clients do not resume (the CLI is one process
    // per call, the agent keeps its connection), so tickets only cost both
    // ends CPU on every handshake; without them every connection verifies
    // its client certificate at the handshake.
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
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

/// Moves TLS records between a client and a server connection in memory
/// until neither has anything left to send: a whole handshake (and the
/// server's post-handshake messages) without sockets, for tests and
/// `benches/tls.rs`.
///
/// # Errors
/// Either side rejected the other's records.
#[cfg(any(test, feature = "test-support"))]
pub fn pump(
    client: &mut rustls::ClientConnection,
    server: &mut rustls::ServerConnection,
) -> Result<(), rustls::Error> {
    loop {
        let c2s = flow(client, server)?;
        let s2c = flow(server, client)?;
        if !c2s && !s2c {
            return Ok(());
        }
    }
}

/// Moves everything `from` has to send into `to`; whether there was any.
#[cfg(any(test, feature = "test-support"))]
fn flow<A, B, DA, DB>(from: &mut A, to: &mut B) -> Result<bool, rustls::Error>
where
    A: std::ops::DerefMut<Target = rustls::ConnectionCommon<DA>>,
    B: std::ops::DerefMut<Target = rustls::ConnectionCommon<DB>>,
{
    let io = |e: std::io::Error| rustls::Error::General(e.to_string());
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).map_err(io)?;
    }
    let mut rest = &buf[..];
    while !rest.is_empty() {
        to.read_tls(&mut rest).map_err(io)?;
        to.process_new_packets()?;
    }
    Ok(!buf.is_empty())
}

#[cfg(test)]
mod tests {
    use rustls::{
        client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue},
        pki_types::ServerName,
        ClientConfig, ClientConnection, HandshakeKind, NamedGroup, ServerConnection,
    };

    use super::*;
    use crate::{
        ca::ring::RingOptions,
        cli::{spki_sha256, tls_config, Trust},
        identity::TrustDomain,
    };

    /// A serving configuration of a fresh authority, its CA pin and CA.
    fn serving(dir: &std::path::Path) -> (DynamicTls, [u8; 32], Vec<u8>) {
        let td = TrustDomain::parse("tls.test").expect("trust domain");
        let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
        let (authority, _) =
            Authority::load_or_create(dir, &td, now, RingOptions::default()).expect("authority");
        let view = authority.view();
        let ca = view.serving();
        let (leaf, key) = ca
            .serving_cert(&["localhost".to_owned()], now)
            .expect("serving certificate");
        let ca_der = ca.ca_cert_der().to_vec();
        let pin = spki_sha256(&ca_der).expect("CA SPKI");
        let tls = DynamicTls::new(
            Arc::new(authority),
            TlsMaterial {
                chain: vec![leaf, ca_der.clone()],
                key_pkcs8: key,
            },
        )
        .expect("server config");
        (tls, pin, ca_der)
    }

    fn connect(
        client: &Arc<ClientConfig>,
        server: &DynamicTls,
    ) -> Result<(ClientConnection, ServerConnection), rustls::Error> {
        let name = ServerName::try_from("localhost").expect("name");
        let mut c = ClientConnection::new(client.clone(), name)?;
        let mut s = ServerConnection::new(server.current())?;
        pump(&mut c, &mut s)?;
        Ok((c, s))
    }

    /// Counts the session tickets a client is given.
    #[derive(Debug)]
    struct Tickets(
        std::sync::atomic::AtomicUsize,
        rustls::client::ClientSessionMemoryCache,
    );

    impl Tickets {
        fn new() -> Self {
            Self(0.into(), rustls::client::ClientSessionMemoryCache::new(16))
        }
        fn count(&self) -> usize {
            self.0.load(Ordering::Relaxed)
        }
    }

    impl ClientSessionStore for Tickets {
        fn set_kx_hint(&self, n: ServerName<'static>, g: NamedGroup) {
            self.1.set_kx_hint(n, g);
        }
        fn kx_hint(&self, n: &ServerName<'_>) -> Option<NamedGroup> {
            self.1.kx_hint(n)
        }
        fn set_tls12_session(&self, n: ServerName<'static>, v: Tls12ClientSessionValue) {
            self.0.fetch_add(1, Ordering::Relaxed);
            self.1.set_tls12_session(n, v);
        }
        fn tls12_session(&self, n: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
            self.1.tls12_session(n)
        }
        fn remove_tls12_session(&self, n: &ServerName<'static>) {
            self.1.remove_tls12_session(n);
        }
        fn insert_tls13_ticket(&self, n: ServerName<'static>, v: Tls13ClientSessionValue) {
            self.0.fetch_add(1, Ordering::Relaxed);
            self.1.insert_tls13_ticket(n, v);
        }
        fn take_tls13_ticket(&self, n: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
            self.1.take_tls13_ticket(n)
        }
    }

    #[test]
    fn the_server_chooses_aes_128_whatever_the_client_prefers_and_ours_use_the_hybrid_kem() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (server, pin, ca) = serving(dir.path());
        // Sigil's own client, and a client with rustls' defaults (AES-256 first).
        let ours = Arc::new(tls_config(&Trust::Pin(pin)).expect("client config"));
        let mut theirs = ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates({
            let mut roots = RootCertStore::empty();
            roots.add(CertificateDer::from(ca)).expect("CA root");
            roots
        })
        .with_no_client_auth();
        theirs.alpn_protocols = vec![b"h2".to_vec()];
        assert_eq!(
            theirs.crypto_provider().cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            "the second client must prefer another suite for this test to mean anything"
        );
        // A client that sends no hybrid key share is not made to retry.
        let groups = [NamedGroup::X25519MLKEM768, NamedGroup::X25519];
        for (client, group) in [ours, Arc::new(theirs)].into_iter().zip(groups) {
            let (c, s) = connect(&client, &server).expect("handshake");
            for suite in [c.negotiated_cipher_suite(), s.negotiated_cipher_suite()] {
                assert_eq!(
                    suite.map(|s| s.suite()),
                    Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
                );
            }
            assert_eq!(
                s.negotiated_key_exchange_group().map(|g| g.name()),
                Some(group)
            );
            assert_eq!(s.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
            assert_eq!(c.alpn_protocol(), Some(&b"h2"[..]));
        }
    }

    #[test]
    fn no_session_is_resumable_every_connection_runs_a_full_handshake() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (server, pin, _) = serving(dir.path());
        let tickets = Arc::new(Tickets::new());
        let mut cfg = tls_config(&Trust::Pin(pin)).expect("client config");
        cfg.resumption = rustls::client::Resumption::store(tickets.clone());
        let cfg = Arc::new(cfg);
        for round in 0..3 {
            let (c, s) = connect(&cfg, &server).expect("handshake");
            assert_eq!(
                c.handshake_kind(),
                Some(HandshakeKind::Full),
                "round {round}"
            );
            assert_eq!(
                s.handshake_kind(),
                Some(HandshakeKind::Full),
                "round {round}"
            );
        }
        assert_eq!(tickets.count(), 0, "the server sent session tickets");
    }

    #[test]
    fn a_pinned_client_that_connected_once_still_refuses_another_ca() {
        let (a, b) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        let (server_a, pin_a, _) = serving(a.path());
        let (server_b, pin_b, _) = serving(b.path());
        assert_ne!(pin_a, pin_b);
        let cfg = Arc::new(tls_config(&Trust::Pin(pin_a)).expect("client config"));
        for _ in 0..2 {
            connect(&cfg, &server_a).expect("the pinned CA is accepted");
            let err = connect(&cfg, &server_b).expect_err("another CA must be refused");
            assert!(err.to_string().contains("does not match --ca-pin"), "{err}");
        }
        // And the other way round: a client pinned to B, after B, refuses A.
        let cfg = Arc::new(tls_config(&Trust::Pin(pin_b)).expect("client config"));
        connect(&cfg, &server_b).expect("B accepted");
        assert!(connect(&cfg, &server_a).is_err());
    }
}
