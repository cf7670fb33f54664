//! Fetching an OIDC issuer's JWKS over HTTPS, at start and then on a timer,
//! so an issuer's key rotation reaches the `oidc` verifier without a
//! restart. A deliberately small HTTP/1.0 client: HTTPS only, roots from a
//! given PEM file or the system bundle, 10 s deadline, 256 KiB cap, status
//! 200 required. Only the server wires it in.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{anyhow, bail, Context};
use rustls::{pki_types::ServerName, ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest JWKS document accepted.
pub const MAX_JWKS_LEN: usize = 256 * 1024;
/// System CA bundle used when no CA file is configured (Debian's path).
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Where one issuer's keys come from.
#[derive(Debug, Clone)]
pub struct JwksSource {
    /// The issuer alias in the attestation config.
    pub alias: String,
    /// `https://…` JWKS URL.
    pub url: String,
    /// PEM roots to trust for it (else the system bundle).
    pub ca_file: Option<PathBuf>,
    /// How often to refetch.
    pub refresh: Duration,
}

fn roots(ca_file: Option<&PathBuf>) -> anyhow::Result<RootCertStore> {
    let path = ca_file
        .cloned()
        .unwrap_or_else(|| PathBuf::from(SYSTEM_ROOTS));
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let mut store = RootCertStore::empty();
    for der in crate::cli::pem_certs(&text) {
        let _ = store.add(der.into());
    }
    if store.is_empty() {
        bail!("no usable certificate in {}", path.display());
    }
    Ok(store)
}

/// GETs `src.url` and returns the body.
///
/// # Errors
/// Not https, connection/TLS failure, non-200 status, oversize or timeout.
pub async fn fetch(src: &JwksSource) -> anyhow::Result<String> {
    let rest = src
        .url
        .strip_prefix("https://")
        .ok_or_else(|| anyhow!("jwks_url must be https://"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(']') || h.ends_with(']') => (
            h.trim_start_matches('[').trim_end_matches(']'),
            p.parse::<u16>()
                .map_err(|_| anyhow!("bad port in jwks_url"))?,
        ),
        _ => (authority, 443),
    };
    let provider = crate::tls::crypto_provider();
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(src.ca_file.as_ref())?)
        .with_no_client_auth();
    let name =
        ServerName::try_from(host.to_owned()).map_err(|_| anyhow!("bad host in jwks_url"))?;
    let work = async {
        let tcp = tokio::net::TcpStream::connect((host, port)).await?;
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await?;
        let req = format!(
            "GET {path} HTTP/1.0\r\nHost: {authority}\r\nAccept: application/json\r\nUser-Agent: sigil\r\n\r\n"
        );
        tls.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = tls.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > MAX_JWKS_LEN + 16 * 1024 {
                bail!("JWKS response larger than {MAX_JWKS_LEN} bytes");
            }
        }
        Ok::<_, anyhow::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| anyhow!("JWKS fetch timed out"))??;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP response"))?;
    let head = String::from_utf8_lossy(&buf[..split]);
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("JWKS fetch: {status}");
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        bail!("JWKS fetch: chunked responses are not supported");
    }
    String::from_utf8(buf[split + 4..].to_vec()).map_err(|_| anyhow!("JWKS is not UTF-8"))
}
