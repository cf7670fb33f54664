//! gRPC channels for the CLI: TLS to a broker, trusted either through a CA
//! pin (`sha256:<hex of the CA SubjectPublicKeyInfo>`) or a bundle PEM file,
//! and plain HTTP/2 over the local admin socket.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
};

use anyhow::{anyhow, bail, Context};
use hyper_util::rt::TokioIo;
use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        WebPkiServerVerifier,
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use sha2::{Digest, Sha256};
use tokio::net::{TcpStream, UnixStream};
use tonic::transport::{Channel, Endpoint, Uri};
use tower::service_fn;

use crate::netio::Coalesced;

/// How the CLI trusts the broker's TLS certificate.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Pin of the CA key.
    Pin([u8; 32]),
    /// CA certificates (DER) from a bundle file.
    Roots(Vec<Vec<u8>>),
}

impl Trust {
    /// Parses `sha256:<64 hex>`.
    ///
    /// # Errors
    /// A usage message.
    pub fn from_pin(pin: &str) -> anyhow::Result<Self> {
        let hexpart = pin
            .strip_prefix("sha256:")
            .ok_or_else(|| anyhow!("--ca-pin must look like sha256:<64 hex characters>"))?;
        let bytes = hex::decode(hexpart).map_err(|_| anyhow!("--ca-pin is not hex"))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| anyhow!("--ca-pin must have 64 hex characters"))?;
        Ok(Self::Pin(arr))
    }

    /// Loads CA certificates from a PEM file.
    ///
    /// # Errors
    /// Unreadable file or no certificate in it.
    pub fn from_bundle_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read bundle {}", path.display()))?;
        let certs = pem_certs(&text);
        if certs.is_empty() {
            bail!("no CERTIFICATE in {}", path.display());
        }
        Ok(Self::Roots(certs))
    }
}

/// Every `CERTIFICATE` block of a PEM text, as DER.
pub fn pem_certs(text: &str) -> Vec<Vec<u8>> {
    use base64::Engine;
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line == "-----BEGIN CERTIFICATE-----" {
            cur = Some(String::new());
        } else if line == "-----END CERTIFICATE-----" {
            if let Some(b64) = cur.take() {
                if let Ok(der) = base64::engine::general_purpose::STANDARD.decode(b64) {
                    out.push(der);
                }
            }
        } else if let Some(c) = cur.as_mut() {
            c.push_str(line);
        }
    }
    out
}

/// SHA-256 of a certificate's SubjectPublicKeyInfo, if it parses.
pub fn spki_sha256(cert_der: &[u8]) -> Option<[u8; 32]> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(Sha256::digest(cert.tbs_certificate.subject_pki.raw).into())
}

/// Accepts the server chain only if one of its certificates has the pinned
/// CA key and the leaf validates (RFC 5280 + hostname) under that CA. The
/// verifier built for the last CA certificate that matched is kept, so a
/// client that connects again (the load generator, the agent) does not
/// re-parse the CA on every handshake; a chain with another CA certificate
/// (after a rotation) is checked against the pin afresh.
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
    last: Mutex<Option<(CertificateDer<'static>, Arc<WebPkiServerVerifier>)>>,
}

impl PinnedCaVerifier {
    fn new(pin: [u8; 32], provider: Arc<CryptoProvider>) -> Self {
        Self {
            pin,
            provider,
            last: Mutex::new(None),
        }
    }

    /// The verifier for the pinned CA among `intermediates`.
    fn for_chain(
        &self,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((der, v)) = last.as_ref() {
            if intermediates.iter().any(|c| c.as_ref() == der.as_ref()) {
                return Ok(v.clone());
            }
        }
        let ca = intermediates
            .iter()
            .find(|c| spki_sha256(c) == Some(self.pin))
            .ok_or_else(|| {
                rustls::Error::General(
                    "broker CA does not match --ca-pin (wrong broker or pin)".into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("pinned CA unusable: {e}")))?;
        let v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        *last = Some((ca.clone().into_owned(), v.clone()));
        Ok(v)
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.for_chain(intermediates)?.verify_server_cert(
            end_entity,
            &[],
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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

/// A client certificate chain and key for mTLS, read from PEM files.
pub struct ClientIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl ClientIdentity {
    /// Reads `svid.pem` (leaf first) and `svid.key` (PKCS#8).
    ///
    /// # Errors
    /// Unreadable or malformed files (the message names the file, never its content).
    pub fn from_files(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<Self> {
        use rustls::pki_types::{pem::PemObject, PrivateKeyDer};
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|_| anyhow!("cannot read certificates from {}", cert.display()))?;
        if chain.is_empty() {
            bail!("no CERTIFICATE in {}", cert.display());
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|_| anyhow!("cannot read a private key from {}", key.display()))?;
        Ok(Self { chain, key })
    }
}

impl ClientIdentity {
    /// From DER certificates (leaf first) and a PKCS#8 DER key.
    pub fn from_der(chain: Vec<Vec<u8>>, pkcs8_key: Vec<u8>) -> Self {
        Self {
            chain: chain.into_iter().map(CertificateDer::from).collect(),
            key: rustls::pki_types::PrivateKeyDer::Pkcs8(pkcs8_key.into()),
        }
    }
}

/// A rustls client config for `trust`, offering HTTP/2 only.
///
/// # Errors
/// Unusable roots.
pub fn tls_config(trust: &Trust) -> anyhow::Result<ClientConfig> {
    tls_config_with(trust, None)
}

/// Like [`tls_config`], presenting `client` for mutual TLS when given.
///
/// # Errors
/// Unusable roots or client key.
pub fn tls_config_with(
    trust: &Trust,
    client: Option<ClientIdentity>,
) -> anyhow::Result<ClientConfig> {
    let provider = crate::tls::crypto_provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match trust {
        Trust::Pin(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier::new(*pin, provider))),
        Trust::Roots(ders) => {
            let mut roots = RootCertStore::empty();
            for d in ders {
                roots.add(CertificateDer::from(d.clone()))?;
            }
            builder.with_root_certificates(roots)
        }
    };
    let mut cfg = match client {
        Some(id) => builder
            .with_client_auth_cert(id.chain, id.key)
            .map_err(|e| anyhow!("client certificate unusable: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Host and port of `https://HOST:PORT`.
///
/// # Errors
/// A usage message.
pub fn parse_broker_url(url: &str) -> anyhow::Result<(String, u16)> {
    let uri: Uri = url
        .parse()
        .map_err(|_| anyhow!("--broker must be https://HOST:PORT"))?;
    if uri.scheme_str() != Some("https") {
        bail!("--broker must start with https://");
    }
    let host = uri
        .host()
        .ok_or_else(|| anyhow!("--broker has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Ok((host, uri.port_u16().unwrap_or(443)))
}

/// Connects to the broker over TLS with `config`.
///
/// # Errors
/// Connection or TLS failure (the caller maps these to "unreachable").
pub async fn connect_tls(url: &str, config: ClientConfig) -> anyhow::Result<Channel> {
    let (host, port) = parse_broker_url(url)?;
    let server_name = ServerName::try_from(host.clone())
        .map_err(|_| anyhow!("--broker host {host:?} is not a valid name"))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let endpoint = Endpoint::from_shared(format!("http://{}", authority(&host, port)))?
        .connect_timeout(std::time::Duration::from_secs(10));
    let channel = endpoint
        .connect_with_connector(service_fn(move |_: Uri| {
            let connector = connector.clone();
            let server_name = server_name.clone();
            let host = host.clone();
            async move {
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(server_name, tcp).await?;
                // One TLS record and one syscall per request, as on the server.
                Ok::<_, std::io::Error>(TokioIo::new(Coalesced::new(tls)))
            }
        }))
        .await?;
    Ok(channel)
}

fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Connects to the local admin socket.
///
/// # Errors
/// The socket is missing or refuses.
pub async fn connect_admin(path: PathBuf) -> anyhow::Result<Channel> {
    let p = path.clone();
    Endpoint::from_static("http://admin.sock")
        .connect_with_connector(service_fn(move |_: Uri| {
            let p = p.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(p).await?)) }
        }))
        .await
        .with_context(|| {
            format!(
                "cannot reach the admin socket {} (is `sigil serve` running with this --data-dir?)",
                path.display()
            )
        })
}
