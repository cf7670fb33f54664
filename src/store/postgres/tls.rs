//! TLS between a broker and its PostgreSQL (`--store-ca-file`): the
//! connection mode a store URL and a CA file resolve to, and the rustls
//! connector tokio-postgres drives.
//!
//! With a CA file the connection is encrypted and the server is verified
//! as libpq's `sslmode=verify-full` does: its chain must lead to one of the
//! file's certificates and name the URL's host (DNS name or IP). There is no
//! fallback to plaintext and no "encrypt but trust anyone" mode: a store
//! receives token records, certificates, the audit chain and the sealed key
//! material, so a URL asking for TLS without a CA file is refused rather
//! than half-honoured. Without a CA file the connection is plaintext (a
//! loopback or otherwise trusted network), whatever the URL's `sslmode`
//! default would have tried.
//!
//! The connector also gives the server's certificate hash to SCRAM
//! (`tls-server-end-point`, RFC 5929 §4.1) so a password login with
//! `SCRAM-SHA-256-PLUS` is bound to this TLS session.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::{pem::PemObject as _, CertificateDer, ServerName};
use sha2::{Digest, Sha256, Sha384, Sha512};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres::Config;

use crate::store::StoreError;

/// ALPN protocol id of PostgreSQL (required by servers that accept
/// `sslnegotiation=direct`; ignored by older ones).
const ALPN: &[u8] = b"postgresql";

/// How a store's connections are made: plaintext, or TLS verified against
/// the configured roots. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub(super) struct PgTls(Option<Arc<rustls::ClientConfig>>);

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "PgTls(verify-full)"
        } else {
            "PgTls(plaintext)"
        })
    }
}

impl PgTls {
    /// Whether connections are encrypted.
    pub(super) fn encrypted(&self) -> bool {
        self.0.is_some()
    }
}

/// Parses a store URL, accepting libpq's `sslmode=verify-full` and
/// `sslmode=verify-ca` (which tokio-postgres does not know) as requests for
/// verified TLS. Returns the config and whether the URL asked for TLS.
///
/// # Errors
/// `Unavailable` for an unparsable URL; the message does not repeat it (it
/// may hold a password).
pub(super) fn parse_url(url: &str) -> Result<(Config, bool), StoreError> {
    let (rewritten, asked_verify) = verify_modes_as_require(url);
    let config: Config = rewritten.parse().map_err(|_| {
        StoreError::Unavailable(
            "invalid PostgreSQL connection string (not shown: it may hold a password)".into(),
        )
    })?;
    let asked = asked_verify || config.get_ssl_mode() == SslMode::Require;
    Ok((config, asked))
}

/// `url` with an `sslmode=verify-full` or `sslmode=verify-ca` parameter
/// replaced by `sslmode=require`, and whether there was one. Only a real
/// parameter counts: in a URL, one of the query (after `?`); in a
/// key-value string, a keyword outside quoted values. Anything else (a
/// password that happens to contain the text) is left as it is.
fn verify_modes_as_require(url: &str) -> (String, bool) {
    const MODES: [&str; 2] = ["sslmode=verify-full", "sslmode=verify-ca"];
    let mut asked = false;
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_owned(), false);
        };
        let query: Vec<&str> = query
            .split('&')
            .map(|p| {
                if MODES.contains(&p) {
                    asked = true;
                    "sslmode=require"
                } else {
                    p
                }
            })
            .collect();
        return (format!("{base}?{}", query.join("&")), asked);
    }
    let mut out = String::with_capacity(url.len());
    let (mut quoted, mut escaped, mut at_word) = (false, false, true);
    let mut i = 0;
    while i < url.len() {
        if at_word && !quoted {
            let rest = &url[i..];
            let found = MODES.iter().find(|m| {
                rest.strip_prefix(**m)
                    .is_some_and(|after| after.is_empty() || after.starts_with(char::is_whitespace))
            });
            if let Some(m) = found {
                asked = true;
                out.push_str("sslmode=require");
                i += m.len();
                at_word = false;
                continue;
            }
        }
        let Some(c) = url[i..].chars().next() else {
            break;
        };
        out.push(c);
        i += c.len_utf8();
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '\'' {
            quoted = !quoted;
        }
        at_word = !quoted && c.is_whitespace();
    }
    (out, asked)
}

/// Decides how `config` connects: with `ca_file`, TLS is required and
/// verified; without, plaintext. Sets the config's `sslmode` to match.
///
/// # Errors
/// `Unavailable` (before any connection is attempted) when the URL asks for
/// TLS without a CA file, says `sslmode=disable` with one, names a Unix
/// socket with one, or the file holds no usable certificate.
pub(super) fn resolve(
    config: &mut Config,
    url_asked_tls: bool,
    ca_file: Option<&Path>,
) -> Result<PgTls, StoreError> {
    let refuse = |m: &str| Err(StoreError::Unavailable(m.to_owned()));
    let Some(ca_file) = ca_file else {
        if url_asked_tls {
            return refuse(
                "the store URL asks for TLS (sslmode=require or verify-*) but no CA file \
                 is given: set --store-ca-file to the CA that signed the PostgreSQL server's \
                 certificate (Sigil does not encrypt without verifying the server)",
            );
        }
        config.ssl_mode(SslMode::Disable);
        return Ok(PgTls(None));
    };
    if config.get_ssl_mode() == SslMode::Disable {
        return refuse("the store URL says sslmode=disable but --store-ca-file asks for TLS");
    }
    if config
        .get_hosts()
        .iter()
        .any(|h| !matches!(h, Host::Tcp(_)))
    {
        return refuse("TLS to PostgreSQL needs a TCP host, not a Unix socket");
    }
    let roots = load_roots(ca_file)?;
    // aws-lc's algorithms with the post-quantum hybrid key exchange first,
    // as on the broker's own port (`crate::tls`, not imported: the store
    // depends on leaves only). A server without it settles on X25519
    // (tested against PostgreSQL 15 on OpenSSL 3.0, which has no ML-KEM).
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .kx_groups
        .sort_by_key(|g| g.name() != rustls::NamedGroup::X25519MLKEM768);
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Unavailable(format!("TLS to PostgreSQL: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    config.ssl_mode(SslMode::Require);
    Ok(PgTls(Some(Arc::new(tls))))
}

/// Whether every host `config` may connect to is on this machine (a Unix
/// socket, `localhost` or a loopback address), where plaintext crosses no
/// network.
pub(super) fn local_only(config: &Config) -> bool {
    let loopback = |name: &str| {
        name.eq_ignore_ascii_case("localhost")
            || name
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    };
    config.get_hosts().iter().all(|h| match h {
        Host::Tcp(name) => loopback(name),
        Host::Unix(_) => true,
    }) && config
        .get_hostaddrs()
        .iter()
        .all(std::net::IpAddr::is_loopback)
}

/// The PEM certificates of `path` as trust roots.
fn load_roots(path: &Path) -> Result<rustls::RootCertStore, StoreError> {
    let shown = path.display();
    let bad = |why: String| StoreError::Unavailable(format!("--store-ca-file {shown}: {why}"));
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("not PEM certificates ({e})")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("unusable certificate ({e})")))?;
    }
    if roots.is_empty() {
        return Err(bad("no CERTIFICATE block".into()));
    }
    Ok(roots)
}

/// `tls-server-end-point` channel binding data of a server certificate
/// (RFC 5929 §4.1): its DER hashed with the hash of its signature
/// algorithm, SHA-256 for MD5 and SHA-1. `None` when that hash is not
/// determined by the algorithm (EdDSA, RSASSA-PSS): SCRAM then goes without
/// channel binding, as PostgreSQL itself cannot compute one for such a
/// certificate.
pub(super) fn server_end_point(der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::oid_registry as oids;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let alg = &cert.signature_algorithm.algorithm;
    let sha384 = [
        oids::OID_SIG_ECDSA_WITH_SHA384,
        oids::OID_PKCS1_SHA384WITHRSA,
    ];
    let sha512 = [
        oids::OID_SIG_ECDSA_WITH_SHA512,
        oids::OID_PKCS1_SHA512WITHRSA,
    ];
    let sha256 = [
        oids::OID_SIG_ECDSA_WITH_SHA256,
        oids::OID_PKCS1_SHA256WITHRSA,
        oids::OID_PKCS1_SHA1WITHRSA,
        oids::OID_PKCS1_MD5WITHRSAENC,
        oids::OID_SIG_DSA_WITH_SHA1,
    ];
    if sha384.contains(alg) {
        Some(Sha384::digest(der).to_vec())
    } else if sha512.contains(alg) {
        Some(Sha512::digest(der).to_vec())
    } else if sha256.contains(alg) {
        Some(Sha256::digest(der).to_vec())
    } else {
        None
    }
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    /// Called for every host before connecting, whatever the mode: errors
    /// wait for [`TlsConnect::connect`], which runs only when TLS is used.
    fn make_tls_connect(&mut self, host: &str) -> io::Result<PgTlsConnect> {
        Ok(PgTlsConnect {
            config: self.0.clone(),
            host: host.to_owned(),
        })
    }
}

/// One connection's handshake: the roots and the host to verify.
pub(super) struct PgTlsConnect {
    config: Option<Arc<rustls::ClientConfig>>,
    host: String,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            // `resolve` set sslmode=disable without a config: never asked.
            let config = self
                .config
                .ok_or_else(|| io::Error::other("TLS to PostgreSQL is not configured"))?;
            let name = ServerName::try_from(self.host).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("no DNS name or IP address to verify the server against: {e}"),
                )
            })?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await?;
            Ok(PgTlsStream(tls))
        })
    }
}

/// A verified TLS session to PostgreSQL.
pub(super) struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        let (_, session) = self.0.get_ref();
        session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| server_end_point(leaf))
            .map_or_else(ChannelBinding::none, ChannelBinding::tls_server_end_point)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    //! Without a server: URL and CA-file rules, the channel binding hash,
    //! and a listener that declines TLS as a server with `ssl = off` does.
    //! Against the real server: `store::postgres::tests` (TLS section).

    use super::*;

    fn parsed(url: &str) -> (Config, bool) {
        parse_url(url).unwrap()
    }

    fn write_ca(dir: &Path) -> std::path::PathBuf {
        let ca = rcgen::generate_simple_self_signed(vec!["ca".to_owned()]).unwrap();
        let path = dir.join("ca.crt");
        std::fs::write(&path, ca.cert.pem()).unwrap();
        path
    }

    #[test]
    fn libpq_verify_modes_are_accepted_as_requests_for_verified_tls() {
        for url in [
            "postgres://u@db.example:5432/sigil?sslmode=verify-full",
            "postgres://u@db.example/sigil?application_name=x&sslmode=verify-ca",
            "host=db.example sslmode=verify-full user=u",
            "sslmode=verify-full host=db.example",
            "postgres://u@db.example/sigil?sslmode=require",
        ] {
            let (config, asked) = parsed(url);
            assert!(asked, "{url}");
            assert_eq!(config.get_ssl_mode(), SslMode::Require, "{url}");
        }
        for url in [
            "postgres://u@db.example/sigil",
            "postgres://u@db.example/sigil?sslmode=prefer",
            "postgres://u@db.example/sigil?sslmode=disable",
        ] {
            assert!(!parsed(url).1, "{url}");
        }
        // Only a parameter is rewritten, not text that merely contains it:
        // in a value, a quoted value, or a URL's user info.
        let (config, asked) = parsed("host=db.example password=xsslmode=verify-full");
        assert!(!asked);
        assert_eq!(config.get_password(), Some(&b"xsslmode=verify-full"[..]));
        let (config, asked) = parsed("host=db.example password='a sslmode=verify-ca' user=u");
        assert!(!asked);
        assert_eq!(config.get_password(), Some(&b"a sslmode=verify-ca"[..]));
        let (config, asked) = parsed(r"host=db.example password='it\'s sslmode=verify-ca'");
        assert!(!asked);
        assert_eq!(config.get_password(), Some(&b"it's sslmode=verify-ca"[..]));
        let (config, asked) = parsed("postgres://u:p&sslmode=verify-full@db.example/s");
        assert!(!asked);
        assert_eq!(config.get_password(), Some(&b"p&sslmode=verify-full"[..]));
        // A mode libpq does not have either is still refused, unquoted.
        let err = parse_url("postgres://u:pw@db/s?sslmode=verify-everything").unwrap_err();
        assert!(!err.to_string().contains("pw@"), "{err}");
    }

    #[test]
    fn tls_is_required_and_verified_with_a_ca_file_and_never_half_done() {
        let dir = tempfile::tempdir().unwrap();
        let ca = write_ca(dir.path());
        // CA file: TLS required, whatever `prefer` the URL defaulted to.
        for url in [
            "postgres://u@db.example/s",
            "postgres://u@db.example/s?sslmode=verify-full",
        ] {
            let (mut config, asked) = parsed(url);
            let tls = resolve(&mut config, asked, Some(&ca)).unwrap();
            assert!(tls.encrypted());
            assert_eq!(config.get_ssl_mode(), SslMode::Require);
        }
        // No CA file: plaintext, stated, not "prefer" (which would take
        // any certificate).
        let (mut config, asked) = parsed("postgres://u@db.example/s");
        let tls = resolve(&mut config, asked, None).unwrap();
        assert!(!tls.encrypted());
        assert_eq!(config.get_ssl_mode(), SslMode::Disable);
        assert_eq!(format!("{tls:?}"), "PgTls(plaintext)");
        // Refusals, before any connection.
        let refused = |url: &str, ca: Option<&Path>| {
            let (mut config, asked) = parsed(url);
            resolve(&mut config, asked, ca).unwrap_err().to_string()
        };
        let m = refused("postgres://u@db.example/s?sslmode=verify-full", None);
        assert!(m.contains("--store-ca-file"), "{m}");
        let m = refused("postgres://u@db.example/s?sslmode=require", None);
        assert!(m.contains("--store-ca-file"), "{m}");
        let m = refused("postgres://u@db.example/s?sslmode=disable", Some(&ca));
        assert!(m.contains("sslmode=disable"), "{m}");
        let m = refused("host=/run/postgresql user=u", Some(&ca));
        assert!(m.contains("Unix socket"), "{m}");
        // CA files that give no root.
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let url = "postgres://u@db.example/s";
        for (file, want) in [
            (dir.path().join("missing.pem"), "missing.pem"),
            (empty, "no CERTIFICATE block"),
            (garbage, "unusable certificate"),
        ] {
            let m = refused(url, Some(&file));
            assert!(m.contains(want), "{m}");
        }
    }

    #[test]
    fn only_loopback_hosts_count_as_local() {
        let local = |url: &str| local_only(&parsed(url).0);
        assert!(local("postgres://u@127.0.0.1/s"));
        assert!(local("postgres://u@localhost/s"));
        assert!(local("postgres://u@[::1]:5432/s"));
        assert!(local("host=/run/postgresql user=u"));
        assert!(!local("postgres://u@db.example/s"));
        assert!(!local("postgres://u@10.0.0.5/s"));
        assert!(!local("host=localhost,db.example user=u"));
        assert!(!local("host=localhost hostaddr=10.0.0.5 user=u"));
    }

    #[test]
    fn the_channel_binding_hash_follows_the_certificate_signature() {
        for (alg, len) in [
            (&rcgen::PKCS_ECDSA_P256_SHA256, 32),
            (&rcgen::PKCS_ECDSA_P384_SHA384, 48),
        ] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let cert = rcgen::CertificateParams::new(vec!["db".to_owned()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            let der = cert.der().to_vec();
            let got = server_end_point(&der).unwrap();
            assert_eq!(got.len(), len);
            let want = if len == 32 {
                Sha256::digest(&der).to_vec()
            } else {
                Sha384::digest(&der).to_vec()
            };
            assert_eq!(got, want);
        }
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(server_end_point(cert.der()), None);
        assert_eq!(server_end_point(b"\x30\x03garbage"), None);
    }

    /// A server with `ssl = off` answers the SSLRequest with `N`. With a CA
    /// file the store gives up there: it never sends its startup message
    /// (user, database) or anything else in plaintext.
    #[tokio::test]
    async fn a_server_that_declines_tls_gets_nothing_in_plaintext() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let dir = tempfile::tempdir().unwrap();
        let ca = write_ca(dir.path());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 8];
            sock.read_exact(&mut request).await.unwrap();
            sock.write_all(b"N").await.unwrap();
            let mut rest = Vec::new();
            sock.read_to_end(&mut rest).await.unwrap();
            (request, rest)
        });
        let url = format!("postgres://sigil:pw@127.0.0.1:{port}/sigil");
        let opts = crate::store::postgres::PostgresOptions {
            pool_size: 1,
            statement_timeout: std::time::Duration::from_secs(2),
            server_ca: Some(ca),
        };
        let err = crate::store::postgres::PostgresStore::connect(&url, opts)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("does not support TLS"), "{err}");
        let (request, rest) = server.await.unwrap();
        // SSLRequest: length 8, code 80877103.
        assert_eq!(request, [0, 0, 0, 8, 4, 210, 22, 47]);
        assert!(rest.is_empty(), "sent after the refusal: {rest:?}");
    }
}
