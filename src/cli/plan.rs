//! `sigil plan bootstrap|propose|approve|apply|show|diff`, `sigil status`
//! and `sigil bootstrap secret-path`. `plan bootstrap` computes the payload
//! and its HMAC locally: the bootstrap secret never crosses the network.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use sha2::{Digest, Sha256};

use super::{client, token::admin, trust_from, AdminTarget, CliError};
use crate::{
    api::pb::{self, admin_client::AdminClient, identity_client::IdentityClient},
    clock::{Clock, SystemClock},
    identity::TrustDomain,
    policy::Plan,
    token,
};

/// `sigil plan …`
#[derive(Debug, Subcommand)]
pub enum PlanCmd {
    /// Install the foundation plan on a fresh broker (once, ever) and print
    /// the first admin's one-time enrollment token.
    Bootstrap {
        /// Broker address, https://HOST:PORT.
        #[arg(long, env = "SIGIL_BROKER")]
        broker: String,
        /// Trust the broker whose CA key has this pin (sha256:<hex>).
        #[arg(long, conflicts_with = "bundle", required_unless_present = "bundle")]
        ca_pin: Option<String>,
        /// Trust the broker through these CA certificates (PEM).
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// The plan document (TOML or JSON).
        #[arg(long)]
        plan: PathBuf,
        /// File holding the bootstrap secret (base64); else SIGIL_BOOTSTRAP_SECRET.
        #[arg(long)]
        secret_file: Option<PathBuf>,
        /// Trust domain to sign for [default: asked from the broker's bundle].
        #[arg(long)]
        trust_domain: Option<String>,
    },
    /// Propose a plan; with one required approval it activates at once.
    Propose {
        /// The plan document.
        #[arg(long)]
        plan: PathBuf,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Approve a pending plan version (the hash must match what you reviewed).
    Approve {
        /// Plan version.
        #[arg(long)]
        version: u64,
        /// The plan's SHA-256 as shown by `plan show --version N`.
        #[arg(long)]
        sha256: String,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Local socket only: validate and activate a plan directly.
    Apply {
        /// The plan document.
        #[arg(long)]
        plan: PathBuf,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Show the active plan or one version.
    Show {
        /// Plan version [default: the active plan].
        #[arg(long, default_value_t = 0)]
        version: u64,
        /// Print the response as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Compare a plan file with the active plan (or a version), canonically.
    Diff {
        /// The plan document.
        #[arg(long)]
        plan: PathBuf,
        /// Plan version to compare with [default: the active plan].
        #[arg(long, default_value_t = 0)]
        version: u64,
        #[command(flatten)]
        target: AdminTarget,
    },
}

/// `sigil bootstrap …`
#[derive(Debug, Subcommand)]
pub enum BootstrapCmd {
    /// Print where the broker's bootstrap secret is (never the secret itself).
    SecretPath {
        /// Data directory of the broker.
        #[arg(long, env = "SIGIL_DATA_DIR", default_value = crate::config::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
}

fn read_file(p: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(p).map_err(|e| CliError::usage(format!("{}: {e}", p.display())))
}

/// Runs a plan verb.
pub async fn run(cmd: PlanCmd) -> Result<(), CliError> {
    match cmd {
        PlanCmd::Bootstrap {
            broker,
            ca_pin,
            bundle,
            plan,
            secret_file,
            trust_domain,
        } => bootstrap(&broker, ca_pin, bundle, &plan, secret_file, trust_domain).await,
        PlanCmd::Propose { plan, target } => {
            let bytes = read_file(&plan)?;
            let r = admin(&target)
                .await?
                .propose_plan(pb::ProposePlanRequest { plan: bytes })
                .await?
                .into_inner();
            print_plan_summary(&r);
            Ok(())
        }
        PlanCmd::Approve {
            version,
            sha256,
            target,
        } => {
            let r = admin(&target)
                .await?
                .approve_plan(pb::ApprovePlanRequest {
                    version,
                    plan_sha256: sha256,
                })
                .await?
                .into_inner();
            print_plan_summary(&r);
            Ok(())
        }
        PlanCmd::Apply { plan, target } => {
            let bytes = read_file(&plan)?;
            let r = admin(&target)
                .await?
                .apply_plan(pb::ApplyPlanRequest { plan: bytes })
                .await?
                .into_inner();
            print_plan_summary(&r);
            Ok(())
        }
        PlanCmd::Show {
            version,
            json,
            target,
        } => {
            let r = admin(&target)
                .await?
                .get_plan(pb::GetPlanRequest { version })
                .await?
                .into_inner();
            if json {
                let v = serde_json::json!({
                    "version": r.version, "plan_sha256": r.plan_sha256, "state": r.state,
                    "approvals": r.approvals, "required_approvals": r.required_approvals,
                    "proposer": r.proposer, "approvers": r.approvers, "expires_at": r.expires_at,
                    "plan": serde_json::from_str::<serde_json::Value>(&r.plan_json).unwrap_or_default(),
                });
                println!("{v}");
            } else {
                print_plan_summary(&r);
                println!("{}", pretty(&r.plan_json));
            }
            Ok(())
        }
        PlanCmd::Diff {
            plan,
            version,
            target,
        } => {
            let bytes = read_file(&plan)?;
            let mut c = admin(&target).await?;
            let status = c.get_status(pb::GetStatusRequest {}).await?.into_inner();
            let td = TrustDomain::parse(&status.trust_domain)
                .map_err(|e| CliError::failure(format!("broker trust domain: {e}")))?;
            let local = Plan::parse(&bytes, &td)
                .map_err(|e| CliError::usage(format!("{}: {e}", plan.display())))?;
            let remote = c
                .get_plan(pb::GetPlanRequest { version })
                .await?
                .into_inner();
            if local.sha256_hex() == remote.plan_sha256 {
                println!(
                    "identical to plan {} ({})",
                    remote.version, remote.plan_sha256
                );
                return Ok(());
            }
            println!("--- plan {} ({})", remote.version, remote.plan_sha256);
            println!("+++ {} ({})", plan.display(), local.sha256_hex());
            for line in line_diff(&pretty(&remote.plan_json), &pretty(&local.canonical_json())) {
                println!("{line}");
            }
            Ok(())
        }
    }
}

fn print_plan_summary(r: &pb::PlanResponse) {
    println!("plan_version:       {}", r.version);
    println!("plan_sha256:        {}", r.plan_sha256);
    println!("state:              {}", r.state);
    println!(
        "approvals:          {}/{} ({})",
        r.approvals,
        r.required_approvals,
        r.approvers.join(", ")
    );
    println!("proposer:           {}", r.proposer);
}

fn pretty(json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| json.to_owned())
}

/// A minimal line diff (longest common subsequence): `-` old, `+` new, ` ` same.
fn line_diff(old: &str, new: &str) -> Vec<String> {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push(format!(" {}", a[i]));
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push(format!("+{}", b[j]));
            j += 1;
        } else {
            out.push(format!("-{}", a[i]));
            i += 1;
        }
    }
    out
}

async fn bootstrap(
    broker: &str,
    ca_pin: Option<String>,
    bundle: Option<PathBuf>,
    plan: &Path,
    secret_file: Option<PathBuf>,
    trust_domain: Option<String>,
) -> Result<(), CliError> {
    let plan_bytes = read_file(plan)?;
    let secret = match (&secret_file, std::env::var("SIGIL_BOOTSTRAP_SECRET")) {
        (Some(f), _) => {
            let s = crate::secret::read_secret_file(f)
                .map_err(|e| CliError::usage(e.to_string()))?
                .ok_or_else(|| CliError::usage(format!("{} not found", f.display())))?;
            crate::server::decode_bootstrap(s.expose(), "secret file")
                .map_err(|e| CliError::usage(format!("{e:#}")))?
        }
        (None, Ok(v)) => crate::server::decode_bootstrap(v.as_bytes(), "SIGIL_BOOTSTRAP_SECRET")
            .map_err(|e| CliError::usage(format!("{e:#}")))?,
        (None, Err(_)) => return Err(CliError::usage(
            "give --secret-file (see `sigil bootstrap secret-path`) or set SIGIL_BOOTSTRAP_SECRET",
        )),
    };
    let trust = trust_from(ca_pin.as_deref(), bundle.as_deref(), None)?;
    let tls = client::tls_config(&trust).map_err(|e| CliError::usage(format!("{e:#}")))?;
    let channel = client::connect_tls(broker, tls)
        .await
        .map_err(|e| CliError::unreachable(format!("cannot reach {broker}: {e:#}")))?;
    let td = match trust_domain {
        Some(t) => t,
        None => {
            IdentityClient::new(channel.clone())
                .get_bundle(pb::GetBundleRequest {})
                .await?
                .into_inner()
                .trust_domain
        }
    };
    let payload = bootstrap_payload(&td, SystemClock.now_ms(), &plan_bytes);
    let signature = token::hmac_sign(secret.expose(), &payload);
    let r = AdminClient::new(channel)
        .bootstrap_plan(pb::BootstrapPlanRequest {
            payload,
            signature,
            plan: plan_bytes,
        })
        .await?
        .into_inner();
    let pin_arg = match (&ca_pin, &bundle) {
        (Some(p), _) => format!("--ca-pin {p}"),
        (None, Some(b)) => format!("--bundle {}", b.display()),
        (None, None) => String::new(),
    };
    println!("status:          {}", r.status);
    println!("plan_version:    {}", r.plan_version);
    println!("plan_sha256:     {}", r.plan_sha256);
    println!("admin_spiffe_id: {}", r.admin_spiffe_id);
    println!("admin_token:     {}", r.admin_token);
    println!();
    println!("Enroll the first admin (the token works once, for 1 hour):");
    println!(
        "  sigil enroll --broker {broker} --token {} {pin_arg} --out ./admin-svid",
        r.admin_token
    );
    Ok(())
}

/// The signed bootstrap payload bytes for `plan` (client side of DESIGN.md §2.3).
pub fn bootstrap_payload(trust_domain: &str, now_ms: i64, plan: &[u8]) -> Vec<u8> {
    serde_json::json!({
        "action": token::ACTION_BOOTSTRAP,
        "trust_domain": trust_domain,
        "timestamp": now_ms,
        "nonce": token::random_nonce(),
        "plan_sha256": hex::encode(Sha256::digest(plan)),
    })
    .to_string()
    .into_bytes()
}

/// `sigil status`.
pub async fn status(target: AdminTarget) -> Result<(), CliError> {
    let s = admin(&target)
        .await?
        .get_status(pb::GetStatusRequest {})
        .await?
        .into_inner();
    println!("trust_domain:      {}", s.trust_domain);
    println!("ca_pin:            {}", s.ca_pin);
    if s.bootstrap_enabled {
        println!("bootstrap:         ENABLED (no plan yet; run `sigil plan bootstrap`)");
    } else {
        println!(
            "bootstrap:         disabled for good (plan {} is active)",
            s.plan_version
        );
        println!("plan_sha256:       {}", s.plan_sha256);
    }
    println!(
        "bootstrap_secret:  {}",
        match s.bootstrap_secret.as_str() {
            "unused" => "unused now: bootstrap is over, the secret opens nothing",
            other => other,
        }
    );
    println!("tokens:            {}", s.tokens);
    println!("issued:            {}", s.issued);
    println!("audit_events:      {}", s.audit_events);
    Ok(())
}

/// `sigil bootstrap …` (local, no broker call).
pub fn run_bootstrap(cmd: BootstrapCmd) -> Result<(), CliError> {
    match cmd {
        BootstrapCmd::SecretPath { data_dir } => {
            if std::env::var_os("SIGIL_BOOTSTRAP_SECRET").is_some() {
                println!("SIGIL_BOOTSTRAP_SECRET (environment) takes precedence over any file");
            }
            let p = data_dir.join(crate::server::BOOTSTRAP_SECRET_FILE);
            println!("{}", p.display());
            if !p.exists() {
                eprintln!(
                    "(not generated yet: start `sigil serve --data-dir {}` once)",
                    data_dir.display()
                );
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_marks_changes() {
        let d = line_diff("a\nb\nc", "a\nx\nc");
        assert_eq!(d, vec![" a", "+x", "-b", " c"]);
    }
}
