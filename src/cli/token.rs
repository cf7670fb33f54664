//! `sigil token create|revoke|list` and `sigil audit list|verify`, spoken
//! to a running broker over its admin socket. `audit verify` falls back to
//! reading the data dir directly when no broker is running.

use clap::Subcommand;

use super::{AdminTarget, CliError};
use crate::api::pb::{self, admin_client::AdminClient};

/// `sigil token …`
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Mint a one-time enrollment token and print a ready-to-paste `sigil enroll` line.
    Create {
        /// SPIFFE ID the token enrolls as, e.g. spiffe://sigil.local/ci/build.
        #[arg(long)]
        spiffe_id: String,
        /// Lifetime, e.g. 10m, 1h [default: 10m].
        #[arg(long, default_value = "10m")]
        ttl: String,
        /// Number of enrollments allowed (fleets may use more than 1).
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Print the response as one JSON object (for scripts).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Revoke a token by id.
    Revoke {
        /// The token id (32 hex characters).
        token_id: String,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// List tokens (metadata only: the broker stores no secret).
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: AdminTarget,
    },
}

/// `sigil audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Print audit events.
    List {
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many events (max 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Verify the hash chain; exit 1 and name the first bad row if it was edited or cut.
    Verify {
        #[command(flatten)]
        target: AdminTarget,
    },
}

/// An admin client for `target` (socket or mTLS).
pub(super) async fn admin(
    target: &AdminTarget,
) -> Result<AdminClient<tonic::transport::Channel>, CliError> {
    Ok(AdminClient::new(target.channel().await?))
}

/// Runs a token verb.
pub async fn run_token(cmd: TokenCmd) -> Result<(), CliError> {
    match cmd {
        TokenCmd::Create {
            spiffe_id,
            ttl,
            uses,
            json,
            target,
        } => {
            let ttl = crate::config::parse_duration_secs(&ttl).map_err(CliError::usage)?;
            let ttl = u32::try_from(ttl).map_err(|_| CliError::usage("--ttl too large"))?;
            let r = admin(&target)
                .await?
                .create_enrollment_token(pb::CreateEnrollmentTokenRequest {
                    spiffe_id: spiffe_id.clone(),
                    ttl_seconds: ttl,
                    max_uses: uses,
                })
                .await?
                .into_inner();
            if json {
                let v = serde_json::json!({
                    "token": r.token, "token_id": r.token_id,
                    "expires_at": r.expires_at, "ca_pin": r.ca_pin,
                });
                println!("{v}");
            } else {
                let broker = target.broker.clone().unwrap_or_else(|| {
                    std::fs::read_to_string(target.data_dir.join("listen.addr"))
                        .map(|s| format!("https://{}", s.trim()))
                        .unwrap_or_else(|_| "https://127.0.0.1:8443".to_owned())
                });
                println!("token:     {}", r.token);
                println!("token_id:  {}", r.token_id);
                println!("spiffe_id: {spiffe_id}");
                println!("expires:   {} (unix seconds; uses: {uses})", r.expires_at);
                println!("ca_pin:    {}", r.ca_pin);
                println!();
                println!("Enroll with:");
                println!(
                    "  sigil enroll --broker {broker} --token {} --ca-pin {} --out ./svid",
                    r.token, r.ca_pin
                );
            }
            Ok(())
        }
        TokenCmd::Revoke { token_id, target } => {
            let r = admin(&target)
                .await?
                .revoke_enrollment_token(pb::RevokeEnrollmentTokenRequest {
                    token_id: token_id.clone(),
                })
                .await?
                .into_inner();
            if r.revoked {
                println!("revoked {token_id}");
            } else {
                println!("{token_id} was already revoked");
            }
            Ok(())
        }
        TokenCmd::List { json, target } => {
            let r = admin(&target)
                .await?
                .list_enrollment_tokens(pb::ListEnrollmentTokensRequest {})
                .await?
                .into_inner();
            for t in r.tokens {
                if json {
                    let v = serde_json::json!({
                        "token_id": t.token_id, "spiffe_id": t.spiffe_id,
                        "created_at": t.created_at, "expires_at": t.expires_at,
                        "max_uses": t.max_uses, "uses": t.uses, "revoked": t.revoked,
                    });
                    println!("{v}");
                } else {
                    println!(
                        "{}  {}  uses {}/{}  expires {}{}",
                        t.token_id,
                        t.spiffe_id,
                        t.uses,
                        t.max_uses,
                        t.expires_at,
                        if t.revoked { "  REVOKED" } else { "" }
                    );
                }
            }
            Ok(())
        }
    }
}

/// Runs an audit verb.
pub async fn run_audit(cmd: AuditCmd) -> Result<(), CliError> {
    match cmd {
        AuditCmd::List {
            after,
            limit,
            json,
            target,
        } => {
            let r = admin(&target)
                .await?
                .list_audit_events(pb::ListAuditEventsRequest {
                    after_seq: after,
                    limit,
                })
                .await?
                .into_inner();
            for e in r.events {
                if json {
                    let fields: serde_json::Value =
                        serde_json::from_str(&e.fields_json).unwrap_or(serde_json::Value::Null);
                    let v = serde_json::json!({
                        "seq": e.seq, "time_ms": e.time_ms, "kind": e.kind,
                        "outcome": e.outcome, "fields": fields, "hash": e.hash,
                    });
                    println!("{v}");
                } else {
                    println!(
                        "{:>6}  {}  {:<14} {:<20} {}",
                        e.seq, e.time_ms, e.kind, e.outcome, e.fields_json
                    );
                }
            }
            Ok(())
        }
        AuditCmd::Verify { target } => {
            let (ok, events, broken_at, problem) = match target.channel().await {
                Ok(ch) => {
                    let r = AdminClient::new(ch)
                        .verify_audit_chain(pb::VerifyAuditChainRequest {})
                        .await?
                        .into_inner();
                    (r.ok, r.events, r.broken_at, r.problem)
                }
                Err(_) => {
                    eprintln!(
                        "(no broker on the admin socket: reading {} directly)",
                        target.data_dir.display()
                    );
                    let v = crate::server::verify_audit_offline(&target.data_dir)
                        .await
                        .map_err(|e| CliError::failure(format!("{e:#}")))?;
                    let (at, p) = v.broken.clone().unwrap_or_default();
                    (v.broken.is_none(), v.events, at, p)
                }
            };
            if ok {
                println!("audit chain OK: {events} events");
                Ok(())
            } else {
                Err(CliError::failure(format!(
                    "audit chain BROKEN at event {broken_at}: {problem} ({events} events verified before it)"
                )))
            }
        }
    }
}
