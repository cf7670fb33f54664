//! `sigil renew`, `sigil jwt [validate]`, `sigil revoke`, `sigil ca rotate`
//! and `sigil bundle show|watch`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{client, enroll, token::admin, trust_from, AdminTarget, CliError, ClientIdentity};
use crate::api::pb::{self, identity_client::IdentityClient};

/// Where to reach the broker over mTLS with an existing SVID.
#[derive(Debug, Clone, Args)]
pub struct SvidTarget {
    /// Broker address, https://HOST:PORT.
    #[arg(long, env = "SIGIL_BROKER")]
    pub broker: String,
    /// Current X509-SVID (PEM), e.g. ./svid/svid.pem.
    #[arg(long, default_value = "./svid/svid.pem")]
    pub cert: PathBuf,
    /// Its key (PEM), e.g. ./svid/svid.key.
    #[arg(long, default_value = "./svid/svid.key")]
    pub key: PathBuf,
    /// Trust the broker whose CA key has this pin [default: bundle.pem beside --cert].
    #[arg(long, conflicts_with = "bundle")]
    pub ca_pin: Option<String>,
    /// Trust the broker through these CA certificates (PEM).
    #[arg(long)]
    pub bundle: Option<PathBuf>,
}

impl SvidTarget {
    async fn identity(&self) -> Result<IdentityClient<tonic::transport::Channel>, CliError> {
        let trust = trust_from(
            self.ca_pin.as_deref(),
            self.bundle.as_deref(),
            Some(&self.cert),
        )?;
        let id = ClientIdentity::from_files(&self.cert, &self.key)
            .map_err(|e| CliError::usage(format!("{e:#}")))?;
        let tls = client::tls_config_with(&trust, Some(id))
            .map_err(|e| CliError::usage(format!("{e:#}")))?;
        let ch = client::connect_tls(&self.broker, tls)
            .await
            .map_err(|e| CliError::unreachable(format!("cannot reach {}: {e:#}", self.broker)))?;
        Ok(IdentityClient::new(ch))
    }
}

/// Flags of `sigil renew`.
#[derive(Debug, Args)]
pub struct RenewArgs {
    #[command(flatten)]
    target: SvidTarget,
    /// Where to write the new svid.pem, svid.key, bundle.pem [default: beside --cert].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep the current key instead of generating a new one.
    #[arg(long)]
    keep_key: bool,
    /// Also fetch a JWT-SVID for this audience (repeatable).
    #[arg(long = "jwt-audience")]
    jwt_audiences: Vec<String>,
}

/// `sigil jwt …`
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct JwtArgs {
    #[command(subcommand)]
    cmd: Option<JwtCmd>,
    #[command(flatten)]
    fetch: Option<JwtFetch>,
}

/// Fetch a JWT-SVID over mTLS (the default action of `sigil jwt`).
#[derive(Debug, Args)]
pub struct JwtFetch {
    #[command(flatten)]
    target: SvidTarget,
    /// Audience (repeatable).
    #[arg(long = "audience", required = true)]
    audiences: Vec<String>,
    /// Lifetime in seconds (capped by the plan) [default: the plan's].
    #[arg(long, default_value_t = 0)]
    ttl: u32,
}

/// `sigil jwt validate`.
#[derive(Debug, Subcommand)]
pub enum JwtCmd {
    /// Ask the broker whether a JWT-SVID is valid for an audience.
    Validate {
        /// Broker address.
        #[arg(long, env = "SIGIL_BROKER")]
        broker: String,
        /// Trust the broker whose CA key has this pin.
        #[arg(long, conflicts_with = "bundle", required_unless_present = "bundle")]
        ca_pin: Option<String>,
        /// Trust the broker through these CA certificates.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// The token (or `-` to read it from stdin).
        #[arg(long)]
        token: String,
        /// The audience you accept.
        #[arg(long)]
        audience: String,
    },
}

/// Flags of `sigil revoke`.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// Revoke one certificate by serial (hex).
    #[arg(long, group = "what")]
    serial: Option<String>,
    /// Revoke every current certificate and JWT of a SPIFFE ID.
    #[arg(long, group = "what")]
    spiffe_id: Option<String>,
    /// Bar an attested node (Nitro module_id, or <issuer>:<sub>) from enrolling.
    #[arg(long, group = "what")]
    node: Option<String>,
    /// Revoke one JWT-SVID by jti.
    #[arg(long, group = "what")]
    jti: Option<String>,
    /// List current revocations instead.
    #[arg(long, group = "what")]
    list: bool,
    /// Why (recorded in the audit trail).
    #[arg(long, default_value = "")]
    reason: String,
    #[command(flatten)]
    target: AdminTarget,
}

/// `sigil ca …`
#[derive(Debug, Subcommand)]
pub enum CaCmd {
    /// Rotate the CA and JWT keys now (the next generation becomes active).
    Rotate {
        /// Key compromise: drop the old generation from the bundle now and
        /// revoke everything it signed.
        #[arg(long)]
        revoke_old: bool,
        /// Only prepare and publish the next generation (activate later).
        #[arg(long, conflicts_with = "revoke_old")]
        prepare_only: bool,
        #[command(flatten)]
        target: AdminTarget,
    },
}

/// `sigil bundle …`
#[derive(Debug, Subcommand)]
pub enum BundleCmd {
    /// Print the SPIFFE bundle (JSON) or the CA certificates (--pem).
    Show {
        #[command(flatten)]
        target: BrokerTrust,
        /// Print the CA certificates as PEM instead of the JSON bundle.
        #[arg(long)]
        pem: bool,
    },
    /// Print the bundle now and every time it changes (one JSON per line).
    Watch {
        #[command(flatten)]
        target: BrokerTrust,
    },
}

/// A broker and how to trust it (no client certificate).
#[derive(Debug, Clone, Args)]
pub struct BrokerTrust {
    /// Broker address.
    #[arg(long, env = "SIGIL_BROKER")]
    broker: String,
    /// Trust the broker whose CA key has this pin.
    #[arg(long, conflicts_with = "bundle", required_unless_present = "bundle")]
    ca_pin: Option<String>,
    /// Trust the broker through these CA certificates.
    #[arg(long)]
    bundle: Option<PathBuf>,
}

async fn plain(
    broker: &str,
    pin: Option<&str>,
    bundle: Option<&std::path::Path>,
) -> Result<IdentityClient<tonic::transport::Channel>, CliError> {
    let trust = trust_from(pin, bundle, None)?;
    let tls = client::tls_config(&trust).map_err(|e| CliError::usage(format!("{e:#}")))?;
    let ch = client::connect_tls(broker, tls)
        .await
        .map_err(|e| CliError::unreachable(format!("cannot reach {broker}: {e:#}")))?;
    Ok(IdentityClient::new(ch))
}

/// `sigil renew`.
pub async fn renew(a: RenewArgs) -> Result<(), CliError> {
    let mut c = a.target.identity().await?;
    let (key, csr) = if a.keep_key {
        let pem = std::fs::read(&a.target.key)
            .map_err(|e| CliError::usage(format!("{}: {e}", a.target.key.display())))?;
        let key = rcgen::KeyPair::from_pem(&String::from_utf8_lossy(&pem))
            .map_err(|_| CliError::usage(format!("{}: not a PEM key", a.target.key.display())))?;
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .and_then(|p| p.serialize_request(&key))
            .map_err(|e| CliError::failure(e.to_string()))?;
        (
            zeroize::Zeroizing::new(key.serialize_der()),
            csr.der().to_vec(),
        )
    } else {
        enroll::new_key_and_csr().map_err(|e| CliError::failure(format!("{e:#}")))?
    };
    let resp = c
        .renew(pb::RenewRequest {
            csr,
            jwt_audiences: a.jwt_audiences,
        })
        .await?
        .into_inner();
    let out = a.out.unwrap_or_else(|| {
        a.target
            .cert
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    });
    enroll::write_outputs(&out, &resp, &key).map_err(|e| CliError::failure(format!("{e:#}")))?;
    println!("spiffe_id: {}", resp.spiffe_id);
    println!("expires:   {} (unix seconds)", resp.expires_at);
    println!("wrote {}", out.display());
    Ok(())
}

/// `sigil jwt [validate]`.
pub async fn jwt(a: JwtArgs) -> Result<(), CliError> {
    match (a.cmd, a.fetch) {
        (
            Some(JwtCmd::Validate {
                broker,
                ca_pin,
                bundle,
                token,
                audience,
            }),
            _,
        ) => {
            let token = if token == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                    .map_err(|e| CliError::usage(e.to_string()))?;
                s.trim().to_owned()
            } else {
                token
            };
            let r = plain(&broker, ca_pin.as_deref(), bundle.as_deref())
                .await?
                .validate_jwt(pb::ValidateJwtRequest { token, audience })
                .await?
                .into_inner();
            println!("valid: {}", r.spiffe_id);
            println!("{}", r.claims_json);
            Ok(())
        }
        (None, Some(f)) => {
            let r = f
                .target
                .identity()
                .await?
                .fetch_jwt(pb::FetchJwtRequest {
                    audiences: f.audiences,
                    ttl_seconds: f.ttl,
                })
                .await?
                .into_inner();
            println!("{}", r.jwt_svid);
            Ok(())
        }
        (None, None) => Err(CliError::usage("give --audience (fetch) or `validate`")),
    }
}

/// `sigil revoke`.
pub async fn revoke(a: RevokeArgs) -> Result<(), CliError> {
    let mut c = admin(&a.target).await?;
    if a.list {
        let r = c
            .list_revocations(pb::ListRevocationsRequest {})
            .await?
            .into_inner();
        for r in r.revocations {
            let exp = if r.expires_at == 0 {
                "kept".to_owned()
            } else {
                format!("until {}", r.expires_at)
            };
            println!(
                "{:<10} {}  at {}  {exp}  {}",
                r.kind, r.value, r.revoked_at, r.reason
            );
        }
        return Ok(());
    }
    let (kind, value) = match (a.serial, a.spiffe_id, a.node, a.jti) {
        (Some(v), ..) => ("serial", v),
        (_, Some(v), ..) => ("spiffe_id", v),
        (_, _, Some(v), _) => ("node", v),
        (_, _, _, Some(v)) => ("jti", v),
        _ => {
            return Err(CliError::usage(
                "give one of --serial, --spiffe-id, --node, --jti, --list",
            ))
        }
    };
    let r = c
        .revoke_identity(pb::RevokeIdentityRequest {
            kind: kind.into(),
            value: value.clone(),
            reason: a.reason,
        })
        .await?
        .into_inner();
    println!("revoked {kind} {value} at {}", r.revoked_at);
    Ok(())
}

/// `sigil ca rotate`.
pub async fn ca(cmd: CaCmd) -> Result<(), CliError> {
    let CaCmd::Rotate {
        revoke_old,
        prepare_only,
        target,
    } = cmd;
    let r = admin(&target)
        .await?
        .rotate_authority(pb::RotateAuthorityRequest {
            revoke_old,
            prepare_only,
        })
        .await?
        .into_inner();
    if r.activated {
        println!(
            "generation {} is active (was {}); bundle sequence {}",
            r.new_generation, r.old_generation, r.bundle_sequence
        );
    } else {
        println!(
            "generation {} prepared and published (active: {}); bundle sequence {}",
            r.new_generation, r.old_generation, r.bundle_sequence
        );
    }
    Ok(())
}

/// `sigil bundle show|watch`.
pub async fn bundle(cmd: BundleCmd) -> Result<(), CliError> {
    match cmd {
        BundleCmd::Show { target, pem } => {
            let b = plain(
                &target.broker,
                target.ca_pin.as_deref(),
                target.bundle.as_deref(),
            )
            .await?
            .get_bundle(pb::GetBundleRequest {})
            .await?
            .into_inner();
            if pem {
                print!("{}", enroll::pem_all(&b.x509_authorities));
            } else {
                println!("{}", b.spiffe_bundle_json);
            }
            Ok(())
        }
        BundleCmd::Watch { target } => {
            let mut s = plain(
                &target.broker,
                target.ca_pin.as_deref(),
                target.bundle.as_deref(),
            )
            .await?
            .watch_bundle(pb::GetBundleRequest {})
            .await?
            .into_inner();
            while let Some(b) = s.message().await? {
                println!("{}", b.spiffe_bundle_json);
            }
            Ok(())
        }
    }
}

/// `sigil challenge`: a fresh server nonce (hex) for an attestation document.
pub async fn challenge(t: BrokerTrust, json: bool) -> Result<(), CliError> {
    let c = plain(&t.broker, t.ca_pin.as_deref(), t.bundle.as_deref())
        .await?
        .get_challenge(pb::GetChallengeRequest {})
        .await?
        .into_inner();
    if json {
        let v = serde_json::json!({
            "nonce": hex::encode(&c.nonce), "expires_at": c.expires_at, "formats": c.formats,
        });
        println!("{v}");
    } else {
        println!("{}", hex::encode(&c.nonce));
    }
    Ok(())
}
