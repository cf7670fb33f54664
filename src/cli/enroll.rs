//! `sigil enroll`: generate a key locally, prove possession of the token by
//! signing a fresh payload (the token secret never leaves this process), and
//! write `svid.pem`, `svid.key` (0600), `bundle.pem` and optionally `jwt`.

use std::{
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use clap::Args;
use sha2::{Digest, Sha256};

use super::{client, CliError};
use crate::{
    api::pb::{self, identity_client::IdentityClient},
    clock::{Clock, SystemClock},
    token::{self, EnrollPayload},
};

/// Flags of `sigil enroll`.
#[derive(Debug, Args)]
pub struct EnrollArgs {
    /// Broker address, https://HOST:PORT.
    #[arg(long, env = "SIGIL_BROKER")]
    pub broker: String,
    /// The enrollment token `<token_id>.<secret>` (or set SIGIL_TOKEN).
    #[arg(
        long,
        env = "SIGIL_TOKEN",
        hide_env_values = true,
        required_unless_present = "attestation_format"
    )]
    pub token: Option<String>,
    /// Enroll with an attestation document instead of a token: aws_nitro or oidc.
    #[arg(long, conflicts_with = "token")]
    pub attestation_format: Option<String>,
    /// The attestation document (Nitro COSE bytes, or an OIDC JWT).
    #[arg(long, requires = "attestation_format")]
    pub attestation_file: Option<PathBuf>,
    /// Read the OIDC token from this environment variable (CI jobs).
    #[arg(long, requires = "attestation_format")]
    pub oidc_token_env: Option<String>,
    /// Run this command to produce the document: it gets SIGIL_CHALLENGE
    /// (hex server nonce), SIGIL_PUBLIC_KEY (hex DER SubjectPublicKeyInfo of
    /// the new key) and SIGIL_CSR_SHA256 in its environment and prints the
    /// document on stdout (e.g. a wrapper around the Nitro NSM).
    #[arg(long, requires = "attestation_format")]
    pub attestation_command: Option<String>,
    /// Use this PKCS#8 PEM key instead of generating one (e.g. the key an
    /// enclave bound into its attestation document).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Trust the broker whose CA key has this pin (sha256:<hex>).
    #[arg(long, conflicts_with = "bundle", required_unless_present = "bundle")]
    pub ca_pin: Option<String>,
    /// Trust the broker through these CA certificates (PEM).
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// Output directory.
    #[arg(long, default_value = "./svid")]
    pub out: PathBuf,
    /// Also fetch a JWT-SVID for this audience (repeatable).
    #[arg(long = "jwt-audience")]
    pub jwt_audiences: Vec<String>,
}

/// Generates a P-256 key and a CSR for it: (PKCS#8 key DER, CSR DER).
///
/// # Errors
/// Key generation failure.
pub fn new_key_and_csr() -> anyhow::Result<(zeroize::Zeroizing<Vec<u8>>, Vec<u8>)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    let csr = params.serialize_request(&key)?;
    Ok((
        zeroize::Zeroizing::new(key.serialize_der()),
        csr.der().to_vec(),
    ))
}

/// Builds the signed token proof for `csr` (client side of DESIGN.md §2.1).
pub fn token_proof(
    token_id: &str,
    secret: &token::TokenSecret,
    csr: &[u8],
    now_ms: i64,
) -> pb::TokenProof {
    let payload = EnrollPayload {
        action: token::ACTION_ENROLL.to_owned(),
        token_id: token_id.to_owned(),
        timestamp: now_ms,
        nonce: token::random_nonce(),
        csr_sha256: hex::encode(Sha256::digest(csr)),
    }
    .to_bytes();
    pb::TokenProof {
        token_id: token_id.to_owned(),
        signature: secret.sign(&payload),
        payload,
    }
}

/// A key from a PEM file and a CSR for it.
fn key_and_csr_from(path: &Path) -> Result<(zeroize::Zeroizing<Vec<u8>>, Vec<u8>), CliError> {
    let pem = zeroize::Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| CliError::usage(format!("{}: {e}", path.display())))?,
    );
    let key = rcgen::KeyPair::from_pem(&pem)
        .map_err(|_| CliError::usage(format!("{}: not a PKCS#8 PEM key", path.display())))?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .map_err(|e| CliError::failure(e.to_string()))?;
    Ok((
        zeroize::Zeroizing::new(key.serialize_der()),
        csr.der().to_vec(),
    ))
}

/// Runs `sigil enroll`.
pub async fn run(args: EnrollArgs) -> Result<(), CliError> {
    let trust = match (&args.ca_pin, &args.bundle) {
        (Some(pin), _) => {
            client::Trust::from_pin(pin).map_err(|e| CliError::usage(format!("{e:#}")))?
        }
        (None, Some(b)) => {
            client::Trust::from_bundle_file(b).map_err(|e| CliError::usage(format!("{e:#}")))?
        }
        (None, None) => return Err(CliError::usage("give --ca-pin or --bundle")),
    };
    client::parse_broker_url(&args.broker).map_err(|e| CliError::usage(format!("{e:#}")))?;
    let tls = client::tls_config(&trust).map_err(|e| CliError::usage(format!("{e:#}")))?;
    let (key, csr) = match &args.key {
        Some(p) => key_and_csr_from(p)?,
        None => new_key_and_csr().map_err(|e| CliError::failure(format!("{e:#}")))?,
    };

    let channel = client::connect_tls(&args.broker, tls)
        .await
        .map_err(|e| CliError::unreachable(format!("cannot reach {}: {e:#}", args.broker)))?;
    let mut client = IdentityClient::new(channel);
    let credential = match (&args.token, &args.attestation_format) {
        (Some(t), _) => {
            let (token_id, secret) =
                token::parse_token(t).map_err(|e| CliError::usage(e.to_string()))?;
            pb::enroll_request::Credential::Token(token_proof(
                &token_id,
                &secret,
                &csr,
                SystemClock.now_ms(),
            ))
        }
        (None, Some(format)) => {
            let document = attestation_document(&args, &mut client, &csr).await?;
            pb::enroll_request::Credential::Attestation(pb::Attestation {
                format: format.clone(),
                document,
            })
        }
        (None, None) => return Err(CliError::usage("give --token or --attestation-format")),
    };
    let resp = client
        .enroll(pb::EnrollRequest {
            csr,
            credential: Some(credential),
            jwt_audiences: args.jwt_audiences.clone(),
        })
        .await?
        .into_inner();

    write_outputs(&args.out, &resp, &key).map_err(|e| CliError::failure(format!("{e:#}")))?;
    println!("spiffe_id: {}", resp.spiffe_id);
    println!("expires:   {} (unix seconds)", resp.expires_at);
    if resp.retried {
        println!(
            "note: this token was already redeemed for this key; the same certificate was returned"
        );
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

/// The attestation document from a file, an environment variable, or a
/// command run with the server challenge and the key binding in its env.
async fn attestation_document(
    args: &EnrollArgs,
    client: &mut IdentityClient<tonic::transport::Channel>,
    csr: &[u8],
) -> Result<Vec<u8>, CliError> {
    if let Some(f) = &args.attestation_file {
        let mut doc =
            std::fs::read(f).map_err(|e| CliError::usage(format!("{}: {e}", f.display())))?;
        if args.attestation_format.as_deref() == Some("oidc") {
            let trimmed = String::from_utf8_lossy(&doc).trim().to_owned();
            doc = trimmed.into_bytes();
        }
        return Ok(doc);
    }
    if let Some(var) = &args.oidc_token_env {
        return std::env::var(var)
            .map(|v| v.trim().as_bytes().to_vec())
            .map_err(|_| CliError::usage(format!("environment variable {var} is not set")));
    }
    let Some(cmd) = &args.attestation_command else {
        return Err(CliError::usage(
            "give --attestation-file, --oidc-token-env or --attestation-command",
        ));
    };
    let challenge = client
        .get_challenge(pb::GetChallengeRequest {})
        .await?
        .into_inner();
    let spki = crate::ca::verify_csr(csr)
        .map_err(|e| CliError::failure(e.to_string()))?
        .spki_der()
        .to_vec();
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("SIGIL_CHALLENGE", hex::encode(&challenge.nonce))
        .env("SIGIL_PUBLIC_KEY", hex::encode(&spki))
        .env("SIGIL_CSR_SHA256", hex::encode(Sha256::digest(csr)))
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .map_err(|e| CliError::failure(format!("--attestation-command: {e}")))?;
    if !out.status.success() {
        return Err(CliError::failure(format!(
            "--attestation-command exited with {}",
            out.status
        )));
    }
    Ok(out.stdout)
}

pub(super) fn pem_all(der: &[Vec<u8>]) -> String {
    use base64::Engine;
    let mut out = String::new();
    for d in der {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(d);
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// Writes a file atomically (temp + rename) with `mode`.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path)?;
    Ok(())
}

pub(super) fn write_outputs(
    out: &Path,
    resp: &pb::EnrollResponse,
    key_der: &[u8],
) -> anyhow::Result<()> {
    fs::create_dir_all(out)?;
    use base64::Engine;
    let mut key_pem = zeroize::Zeroizing::new(String::from("-----BEGIN PRIVATE KEY-----\n"));
    let b64 = zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(key_der));
    for chunk in b64.as_bytes().chunks(64) {
        key_pem.push_str(&String::from_utf8_lossy(chunk));
        key_pem.push('\n');
    }
    key_pem.push_str("-----END PRIVATE KEY-----\n");
    write_atomic(&out.join("svid.key"), key_pem.as_bytes(), 0o600)?;
    write_atomic(
        &out.join("svid.pem"),
        pem_all(&resp.x509_svid_chain).as_bytes(),
        0o644,
    )?;
    write_atomic(
        &out.join("bundle.pem"),
        pem_all(&resp.trust_bundle).as_bytes(),
        0o644,
    )?;
    if !resp.jwt_svid.is_empty() {
        write_atomic(&out.join("jwt"), resp.jwt_svid.as_bytes(), 0o600)?;
    }
    Ok(())
}
