//! `sigil agent`: the SPIFFE Workload API served on a Unix socket, checked
//! with a third-party SPIFFE client (the `spiffe` crate); per-workload
//! identities from plan entries (`parent_id`) and the broker's delegation
//! rule; renewal pushed on the stream before expiry; the broker going away
//! and coming back; two separate processes doing mTLS with what the agent
//! serves; and the real binary (token file, files, restart, logs).
//!
//! The agent's clock is a `MockClock` moved by the tests (half-life
//! renewals without sleeping); the broker's stays at real time, because the
//! TLS handshakes check certificate validity against the real clock.

use std::{
    io::{Read, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sigil::{
    agent::{
        self,
        workload_api::pb::{self as wpb, spiffe_workload_api_client::SpiffeWorkloadApiClient},
        AgentConfig, Bootstrap, RunningAgent, Timing,
    },
    api::pb::{self, delegation_client::DelegationClient},
    cli::Trust,
    clock::{Clock, MockClock, SystemClock},
};
use spiffe::{JwtSvid, TrustDomain, WorkloadApiClient};
use tonic::{transport::Channel, Code};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::harness::*;

const AGENT_ID: &str = "spiffe://sigil.local/node/agent1";
const AUD: &str = "https://api.example";
const MIN: i64 = 60_000;

fn fast() -> Timing {
    Timing {
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(300),
        sync_interval: Duration::from_millis(300),
        poll: Duration::from_millis(20),
    }
}

/// Starts an in-process agent that enrolls as `AGENT_ID` with a fresh token
/// file (unless `token` is false) in `dir`.
async fn start_agent(
    b: &TestBroker,
    dir: &Path,
    clock: &MockClock,
    token: bool,
    tweak: impl FnOnce(&mut AgentConfig),
) -> RunningAgent {
    let mut cfg = AgentConfig::new(
        b.url(),
        Trust::from_pin(&b.running().ca_pin).unwrap(),
        dir.join("agent"),
    );
    if token {
        let (t, ..) = b.token(AGENT_ID, 1, 600).await;
        let f = dir.join("token");
        std::fs::write(&f, format!("{t}\n")).unwrap();
        cfg.bootstrap = Bootstrap::TokenFile(f);
    }
    cfg.timing = fast();
    tweak(&mut cfg);
    agent::start(cfg, Arc::new(clock.clone())).await.unwrap()
}

async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the agent holds an SVID, the bundle and its entries.
async fn ready(a: &RunningAgent) -> agent::AgentStatus {
    eventually("agent ready", || {
        let s = a.status();
        (s.spiffe_id.is_some() && s.bundle_sequence.is_some() && s.entries.is_some()).then_some(s)
    })
    .await
}

async fn raw(a: &RunningAgent) -> SpiffeWorkloadApiClient<Channel> {
    SpiffeWorkloadApiClient::new(
        sigil::cli::connect_admin(a.socket().to_path_buf())
            .await
            .unwrap(),
    )
}

/// A Workload API request with the security header.
fn req<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

fn serial_and_id(der: &[u8]) -> (String, String) {
    let (id, serial) = sigil::api::caller::svid_identity(der).expect("an X509-SVID");
    (serial, id)
}

fn not_after_ms(der: &[u8]) -> i64 {
    let (_, c) = X509Certificate::from_der(der).unwrap();
    c.validity().not_after.timestamp() * 1000
}

fn verifies_against(leaf: &[u8], bundle: &[Vec<u8>]) -> bool {
    let (_, leaf) = X509Certificate::from_der(leaf).unwrap();
    bundle.iter().any(|ca| {
        let (_, ca) = X509Certificate::from_der(ca).unwrap();
        leaf.verify_signature(Some(ca.public_key())).is_ok()
    })
}

async fn apply_plan(b: &TestBroker, plan: String) {
    b.admin()
        .await
        .apply_plan(pb::ApplyPlanRequest {
            plan: plan.into_bytes(),
        })
        .await
        .unwrap();
}

fn own_uid() -> u32 {
    sigil::agent::selectors::own_uid().unwrap()
}

fn exe() -> String {
    std::env::current_exe().unwrap().display().to_string()
}

fn entry(id: &str, parent: &str, selectors: &[String]) -> String {
    let sel: Vec<String> = selectors.iter().map(|s| format!("{s:?}")).collect();
    format!(
        "\n[[entries]]\nspiffe_id = {id:?}\nparent_id = {parent:?}\nselectors = [{}]\n",
        sel.join(", ")
    )
}

const PLAN_HEAD: &str = "admins = [\"spiffe://sigil.local/admin/a\"]\n";

// === the Workload API through a third-party client ===

#[tokio::test]
async fn spiffe_client_fetches_and_validates_x509_bundles_and_jwt() {
    let b = TestBroker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = MockClock::starting_now();
    let a = start_agent(&b, dir.path(), &clock, true, |_| {}).await;
    let st = ready(&a).await;
    assert_eq!(st.spiffe_id.as_deref(), Some(AGENT_ID));
    assert!(
        !dir.path().join("token").exists(),
        "token file deleted after use"
    );
    let private = dir.path().join("agent/private");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&private), 0o700);
    assert_eq!(mode(&private.join("svid.key")), 0o600);
    assert_eq!(mode(&dir.path().join("agent/public")), 0o755);
    assert_eq!(mode(a.socket()), 0o777);
    assert!(a.endpoint().starts_with("unix:///"));

    let c = WorkloadApiClient::connect_to(a.endpoint()).await.unwrap();
    let td = TrustDomain::new("sigil.local").unwrap();

    // X509-SVID and bundles; the chain verifies under the served bundle.
    let svid = c.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), AGENT_ID);
    let bundles = c.fetch_x509_bundles().await.unwrap();
    let roots: Vec<Vec<u8>> = bundles
        .get(&td)
        .expect("own trust domain")
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    assert!(!roots.is_empty());
    let leaf = svid.cert_chain()[0].as_bytes();
    assert!(verifies_against(leaf, &roots));
    assert_eq!(roots, b.running().broker.bundle().x509_authorities);

    // JWT-SVID, validated locally against the served JWT bundle…
    let jwt = c.fetch_jwt_svid(&[AUD], None).await.unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), AGENT_ID);
    let jwt_bundles = c.fetch_jwt_bundles().await.unwrap();
    let ok = JwtSvid::parse_and_validate(jwt.token(), &jwt_bundles, &[AUD]).unwrap();
    assert_eq!(ok.spiffe_id().to_string(), AGENT_ID);
    assert!(JwtSvid::parse_and_validate(jwt.token(), &jwt_bundles, &["other"]).is_err());
    // …by the agent's ValidateJWTSVID, and by the broker.
    let v = c.validate_jwt_token(AUD, jwt.token()).await.unwrap();
    assert_eq!(v.spiffe_id().to_string(), AGENT_ID);
    assert!(c.validate_jwt_token("other", jwt.token()).await.is_err());
    b.running()
        .broker
        .validate_jwt(jwt.token(), AUD)
        .expect("the broker accepts it too");

    // Wire details: map keys are trust-domain IDs, bundles concatenated DER,
    // claims a Struct.
    let mut r = raw(&a).await;
    let x = r
        .fetch_x509_bundles(req(wpb::X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(x.bundles["spiffe://sigil.local"], roots.concat());
    let j = r
        .fetch_jwt_bundles(req(wpb::JwtBundlesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let jwks: serde_json::Value =
        serde_json::from_slice(&j.bundles["spiffe://sigil.local"]).unwrap();
    assert!(jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["kid"].is_string() && k["use"] == "jwt-svid"));
    let v = r
        .validate_jwtsvid(req(wpb::ValidateJwtsvidRequest {
            audience: AUD.into(),
            svid: jwt.token().into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.spiffe_id, AGENT_ID);
    assert!(v.claims.unwrap().fields.contains_key("exp"));

    // Without the security header: InvalidArgument, on every RPC.
    let e = r.fetch_x509svid(wpb::X509svidRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = r
        .fetch_jwtsvid(wpb::JwtsvidRequest {
            audience: vec![AUD.into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut bad = tonic::Request::new(wpb::ValidateJwtsvidRequest {
        audience: AUD.into(),
        svid: jwt.token().into(),
    });
    bad.metadata_mut()
        .insert("workload.spiffe.io", "TRUE".parse().unwrap());
    assert_eq!(
        r.validate_jwtsvid(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // A JWT request without audience is invalid too.
    let e = r
        .fetch_jwtsvid(req(wpb::JwtsvidRequest {
            audience: vec![],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    a.shutdown().await.unwrap();
}

#[tokio::test]
async fn attestation_command_gets_the_challenge_and_enrolls_the_agent() {
    use sigil::attest::{registry::AttestConfig, testing::OidcTestIssuer, Preset};
    let gh = Arc::new(OidcTestIssuer::rsa(
        "gh",
        "https://token.actions.githubusercontent.com",
    ));
    let cfg = AttestConfig {
        nitro: None,
        oidc: vec![gh.config(&["sigil"], Preset::GithubActions.claims())],
    };
    let b = TestBroker::start_with(move |c| c.attest = cfg.clone()).await;
    apply_plan(
        &b,
        format!(
            "{PLAN_HEAD}[[entries]]\nspiffe_id = \"spiffe://sigil.local/ci/agent\"\nselectors = [\"oidc:gh:repository:org/repo\"]\n"
        ),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut claims = gh.standard_claims(
        "repo:org/repo:ref:refs/heads/main",
        "sigil",
        b.now_ms(),
        "jti-agent",
    );
    claims["repository"] = "org/repo".into();
    std::fs::write(dir.path().join("oidc.jwt"), gh.mint(&claims)).unwrap();
    let d = dir.path().display();
    let command = format!(
        "printf '%s %s %s' \"$SIGIL_CHALLENGE\" \"$SIGIL_PUBLIC_KEY\" \"$SIGIL_CSR_SHA256\" > {d}/env.txt; cat {d}/oidc.jwt"
    );
    let clock = MockClock::starting_now();
    let a = start_agent(&b, dir.path(), &clock, false, |c| {
        c.bootstrap = Bootstrap::Attestation {
            format: "oidc".into(),
            command,
        };
    })
    .await;
    let st = ready(&a).await;
    assert_eq!(
        st.spiffe_id.as_deref(),
        Some("spiffe://sigil.local/ci/agent")
    );
    let env = std::fs::read_to_string(dir.path().join("env.txt")).unwrap();
    let parts: Vec<&str> = env.split(' ').collect();
    assert_eq!(parts.len(), 3, "{env}");
    assert_eq!(parts[0].len(), 64, "the 32-byte challenge, hex");
    assert!(parts
        .iter()
        .all(|p| !p.is_empty() && hex::decode(p).is_ok()));
    // The attested agent renews like any other.
    clock.advance_ms(31 * MIN);
    eventually("renewed", || (a.status().serial != st.serial).then_some(())).await;
    a.shutdown().await.unwrap();
}

// === per-workload identities and the delegation rule ===

#[tokio::test]
async fn plan_entries_pick_identities_by_caller_and_others_are_denied() {
    let b = TestBroker::start().await;
    let me = vec![
        format!("unix:uid:{}", own_uid()),
        format!("unix:path:{}", exe()),
    ];
    let plan = |with_web: bool| {
        let mut p = PLAN_HEAD.to_owned();
        if with_web {
            p += &entry("spiffe://sigil.local/app/web", AGENT_ID, &me);
        }
        p += &entry(
            "spiffe://sigil.local/app/other",
            AGENT_ID,
            &["unix:uid:4242424".to_owned()],
        );
        // Matches this process too, but belongs to another agent.
        p += &entry(
            "spiffe://sigil.local/app/elsewhere",
            "spiffe://sigil.local/node/agent2",
            &me,
        );
        p
    };
    apply_plan(&b, plan(true)).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = MockClock::starting_now();
    let a = start_agent(&b, dir.path(), &clock, true, |c| {
        c.default_selectors = Some(vec![]);
    })
    .await;
    let st = ready(&a).await;
    assert_eq!(st.entries, Some(2), "only this agent's entries");

    let c = WorkloadApiClient::connect_to(a.endpoint()).await.unwrap();
    let all = c.fetch_all_x509_svids().await.unwrap();
    let ids: Vec<String> = all.iter().map(|s| s.spiffe_id().to_string()).collect();
    assert_eq!(ids, vec!["spiffe://sigil.local/app/web"]);
    let jwt = c.fetch_jwt_svid(&[AUD], None).await.unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), "spiffe://sigil.local/app/web");
    let jb = c.fetch_jwt_bundles().await.unwrap();
    JwtSvid::parse_and_validate(jwt.token(), &jb, &[AUD]).unwrap();
    // Asking for an identity the caller does not have.
    let mut r = raw(&a).await;
    let e = r
        .fetch_jwtsvid(req(wpb::JwtsvidRequest {
            audience: vec![AUD.into()],
            spiffe_id: AGENT_ID.into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // The broker recorded who minted it.
    let rows = b
        .admin()
        .await
        .list_audit_events(pb::ListAuditEventsRequest {
            after_seq: 0,
            limit: 1000,
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(rows.iter().any(|e| e.kind == "issued"
        && e.fields_json
            .contains("\"delegated_by\":\"spiffe://sigil.local/node/agent1\"")
        && e.fields_json.contains("app/web")));

    // The entry leaves the plan: the caller now matches nothing.
    apply_plan(&b, plan(false)).await;
    eventually("entries synced", || {
        (a.status().entries == Some(1)).then_some(())
    })
    .await;
    let e = r
        .fetch_x509svid(req(wpb::X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = r
        .fetch_x509_bundles(req(wpb::X509BundlesRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = c.fetch_x509_svid().await.unwrap_err();
    assert!(
        matches!(e, spiffe::WorkloadApiError::NoIdentityIssued),
        "{e:?}"
    );
    a.shutdown().await.unwrap();
}

async fn delegation(b: &TestBroker, id: &(Vec<Vec<u8>>, Vec<u8>)) -> DelegationClient<Channel> {
    DelegationClient::new(b.mtls(id.0.clone(), id.1.clone()).await)
}

fn mint(id: &str, selectors: &[&str]) -> pb::MintDelegatedRequest {
    pb::MintDelegatedRequest {
        csr: key_and_csr().1,
        spiffe_id: id.into(),
        selectors: selectors.iter().map(|s| s.to_string()).collect(),
    }
}

#[tokio::test]
async fn only_the_parent_agent_gets_delegated_svids() {
    let b = TestBroker::start().await;
    let mut p = PLAN_HEAD.to_owned();
    p += &entry(
        "spiffe://sigil.local/app/web",
        AGENT_ID,
        &["unix:uid:1000".into()],
    );
    p += &entry(
        "spiffe://sigil.local/app/other",
        "spiffe://sigil.local/node/agent2",
        &["unix:uid:1000".into()],
    );
    apply_plan(&b, p).await;
    let agent1 = b
        .enroll_with_token(&b.token(AGENT_ID, 1, 600).await.0)
        .await;
    let agent2 = b
        .enroll_with_token(&b.token("spiffe://sigil.local/node/agent2", 1, 600).await.0)
        .await;
    let stranger = b
        .enroll_with_token(&b.token("spiffe://sigil.local/app/stranger", 1, 600).await.0)
        .await;

    let mut d1 = delegation(&b, &agent1).await;
    let entries = d1
        .list_delegated_entries(pb::ListDelegatedEntriesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(entries.entries.len(), 1);
    assert_eq!(entries.entries[0].spiffe_id, "spiffe://sigil.local/app/web");
    assert_eq!(entries.entries[0].selectors, vec!["unix:uid:1000"]);

    let ok = d1
        .mint_delegated(mint(
            "spiffe://sigil.local/app/web",
            &["unix:uid:1000", "unix:gid:5"],
        ))
        .await
        .unwrap()
        .into_inner();
    let (serial, id) = serial_and_id(&ok.x509_svid_chain[0]);
    assert_eq!(id, "spiffe://sigil.local/app/web");
    assert_eq!(serial, ok.serial);
    assert!(verifies_against(&ok.x509_svid_chain[0], &ok.trust_bundle));

    for (client, id, sel) in [
        (&agent1, "spiffe://sigil.local/app/web", "unix:uid:1001"),
        (&agent1, "spiffe://sigil.local/app/other", "unix:uid:1000"),
        (&stranger, "spiffe://sigil.local/app/web", "unix:uid:1000"),
    ] {
        let e = delegation(&b, client)
            .await
            .mint_delegated(mint(id, &[sel]))
            .await
            .unwrap_err();
        assert_eq!(reason(&e), "NOT_AUTHORIZED", "{id} {sel}");
    }
    delegation(&b, &agent2)
        .await
        .mint_delegated(mint("spiffe://sigil.local/app/other", &["unix:uid:1000"]))
        .await
        .expect("agent2's own entry");
    // No client certificate at all.
    let e = DelegationClient::new(b.tls().await)
        .mint_delegated(mint("spiffe://sigil.local/app/web", &["unix:uid:1000"]))
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "NOT_AUTHORIZED");

    // Delegated JWT-SVIDs follow the same rule.
    let j = d1
        .mint_delegated_jwt(pb::MintDelegatedJwtRequest {
            spiffe_id: "spiffe://sigil.local/app/web".into(),
            audiences: vec![AUD.into()],
            selectors: vec!["unix:uid:1000".into()],
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let v = b.running().broker.validate_jwt(&j.jwt_svid, AUD).unwrap();
    assert_eq!(v.spiffe_id, "spiffe://sigil.local/app/web");
    let e = d1
        .mint_delegated_jwt(pb::MintDelegatedJwtRequest {
            spiffe_id: "spiffe://sigil.local/app/web".into(),
            audiences: vec![AUD.into()],
            selectors: vec!["unix:uid:7".into()],
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "NOT_AUTHORIZED");

    // A revoked agent gets nothing more, at once.
    let (agent_serial, _) = serial_and_id(&agent1.0[0]);
    b.admin()
        .await
        .revoke_identity(pb::RevokeIdentityRequest {
            kind: "serial".into(),
            value: agent_serial,
            reason: "test".into(),
        })
        .await
        .unwrap();
    let e = d1
        .mint_delegated(mint("spiffe://sigil.local/app/web", &["unix:uid:1000"]))
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "SVID_REVOKED");
    let e = d1
        .list_delegated_entries(pb::ListDelegatedEntriesRequest {})
        .await
        .unwrap_err();
    assert_eq!(reason(&e), "SVID_REVOKED");

    let rows = b
        .admin()
        .await
        .list_audit_events(pb::ListAuditEventsRequest {
            after_seq: 0,
            limit: 1000,
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(rows
        .iter()
        .any(|e| e.kind == "denied" && e.fields_json.contains("mint_delegated")));
    assert!(rows.iter().any(|e| e.kind == "issued"
        && e.fields_json.contains("agent_serial")
        && e.fields_json.contains("\"jwt_svid\":true")));
}

// === renewal and the broker going away ===

async fn next_svids(s: &mut tonic::Streaming<wpb::X509svidResponse>) -> Vec<(String, String, i64)> {
    let m = tokio::time::timeout(Duration::from_secs(20), s.message())
        .await
        .expect("a push within 20 s")
        .unwrap()
        .unwrap();
    m.svids
        .iter()
        .map(|x| {
            let (serial, id) = serial_and_id(&x.x509_svid);
            (id, serial, not_after_ms(&x.x509_svid))
        })
        .collect()
}

#[tokio::test]
async fn renewals_are_pushed_on_the_stream_before_expiry() {
    let b = TestBroker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = MockClock::starting_now();
    let a = start_agent(&b, dir.path(), &clock, true, |_| {}).await;
    ready(&a).await;
    let mut r = raw(&a).await;
    let mut stream = r
        .fetch_x509svid(req(wpb::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = next_svids(&mut stream).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].0, AGENT_ID);

    // Past half-life on the agent's clock: renewed and pushed while the old
    // one is still valid.
    clock.advance_ms(31 * MIN);
    let second = next_svids(&mut stream).await;
    assert_eq!(second[0].0, AGENT_ID);
    assert_ne!(second[0].1, first[0].1, "a new certificate");
    assert!(
        first[0].2 > clock.now_ms(),
        "pushed before the old one expired"
    );

    // A workload entry for this caller appears: pushed too.
    clock.set_ms(SystemClock.now_ms());
    let me = vec![format!("unix:path:{}", exe())];
    apply_plan(
        &b,
        format!(
            "{PLAN_HEAD}{}",
            entry("spiffe://sigil.local/app/web", AGENT_ID, &me)
        ),
    )
    .await;
    let third = next_svids(&mut stream).await;
    assert_eq!(third[0].0, "spiffe://sigil.local/app/web");

    // And the workload SVID is renewed and pushed before it expires.
    clock.advance_ms(31 * MIN);
    let fourth = loop {
        let m = next_svids(&mut stream).await;
        if m[0].1 != third[0].1 {
            break m;
        }
    };
    assert_eq!(fourth[0].0, "spiffe://sigil.local/app/web");
    assert!(third[0].2 > clock.now_ms());
    a.shutdown().await.unwrap();
}

/// Collects log output of the current thread (the test's runtime is
/// current-thread, so the agent's tasks log here too).
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn free_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn broker_down_agent_keeps_serving_then_recovers() {
    let logs = Capture::default();
    let w = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("sigil=trace,warn"))
        .with_ansi(false)
        .with_writer(move || w.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let addr = free_port();
    let mut b = TestBroker::start_with(move |c| c.listen = addr).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = MockClock::starting_now();
    let a = start_agent(&b, dir.path(), &clock, true, |_| {}).await;
    let st = ready(&a).await;
    let c = WorkloadApiClient::connect_to(a.endpoint()).await.unwrap();
    let before = c.fetch_x509_svid().await.unwrap();

    // The broker goes away; the agent's SVID passes half-life.
    b.running.take().unwrap().shutdown().await.unwrap();
    clock.advance_ms(31 * MIN);
    eventually("renewal failures", || {
        (a.status().health.failures >= 2).then_some(())
    })
    .await;
    let h = a.status().health;
    assert!(h.last_error.unwrap().contains("unreachable"));
    // Still serving the still-valid SVID.
    let during = c.fetch_x509_svid().await.unwrap();
    assert_eq!(
        during.cert_chain()[0].as_bytes(),
        before.cert_chain()[0].as_bytes()
    );
    assert_eq!(a.status().serial, st.serial);
    // A JWT needs the broker: Unavailable (clients retry).
    let mut r = raw(&a).await;
    let e = r
        .fetch_jwtsvid(req(wpb::JwtsvidRequest {
            audience: vec![AUD.into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);

    // Back on the same address: the agent renews and recovers.
    let mut cfg = b.config();
    cfg.listen = addr;
    b.running = Some(
        sigil::server::start(cfg, Arc::new(b.clock.clone()))
            .await
            .unwrap(),
    );
    let renewed = eventually("renewed after recovery", || {
        let s = a.status();
        (s.serial != st.serial && s.health.failures == 0).then_some(s)
    })
    .await;
    let after = c.fetch_x509_svid().await.unwrap();
    assert_eq!(
        serial_and_id(after.cert_chain()[0].as_bytes()).0,
        renewed.serial.unwrap()
    );
    let text = logs.text();
    assert!(text.contains("broker call failed"), "logged the outage");
    assert!(
        text.contains("broker reachable again"),
        "logged the recovery"
    );
    // Trace-level logs never carry the agent's key.
    let key = std::fs::read_to_string(dir.path().join("agent/private/svid.key")).unwrap();
    for line in key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!text.contains(line), "private key material in the log");
    }
    a.shutdown().await.unwrap();
}

// === two processes, mTLS with what the agent serves ===

/// Runs only as a child process of `two_processes_get_mtls_from_the_agent`
/// (it does nothing in a normal test run).
#[tokio::test]
async fn peer_process_helper() {
    let Ok(role) = std::env::var("SIGIL_AGENT_PEER_ROLE") else {
        return;
    };
    let expect = std::env::var("SIGIL_AGENT_PEER_EXPECT").unwrap();
    let port_file = PathBuf::from(std::env::var("SIGIL_AGENT_PEER_PORT_FILE").unwrap());
    // SPIFFE_ENDPOINT_SOCKET comes from the parent, as for any workload.
    let client = WorkloadApiClient::connect_env().await.unwrap();
    let ctx = {
        let t = Instant::now();
        loop {
            match client.fetch_x509_context().await {
                Ok(c) => break c,
                Err(e) if t.elapsed() < Duration::from_secs(20) => {
                    eprintln!("retrying: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    };
    let svid = ctx.default_svid().expect("an SVID").clone();
    let td = svid.spiffe_id().trust_domain().clone();
    let roots: Vec<Vec<u8>> = ctx
        .bundle_set()
        .get(&td)
        .unwrap()
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    let chain: Vec<rustls::pki_types::CertificateDer<'static>> = svid
        .cert_chain()
        .iter()
        .map(|c| rustls::pki_types::CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let key =
        rustls::pki_types::PrivateKeyDer::Pkcs8(svid.private_key().as_bytes().to_vec().into());
    let verifier = Arc::new(SpiffeVerifier::new(&roots, &expect));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let me = svid.spiffe_id().to_string();
    if role == "server" {
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tmp = port_file.with_extension("tmp");
        std::fs::write(&tmp, l.local_addr().unwrap().port().to_string()).unwrap();
        std::fs::rename(&tmp, &port_file).unwrap();
        let (tcp, _) = l.accept().await.unwrap();
        let mut tls = tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
            .accept(tcp)
            .await
            .unwrap();
        let peer = peer_id(tls.get_ref().1.peer_certificates());
        assert_eq!(peer, expect);
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        tls.write_all(format!("pong from {me}\n").as_bytes())
            .await
            .unwrap();
        tls.shutdown().await.unwrap();
    } else {
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(chain, key)
            .unwrap();
        let t = Instant::now();
        let port: u16 = loop {
            if let Ok(p) = std::fs::read_to_string(&port_file) {
                break p.trim().parse().unwrap();
            }
            assert!(t.elapsed() < Duration::from_secs(30), "no server port");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect("peer.invalid".try_into().unwrap(), tcp)
            .await
            .unwrap();
        assert_eq!(peer_id(tls.get_ref().1.peer_certificates()), expect);
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tls.write_all(b"ping").await.unwrap();
        let mut out = String::new();
        tls.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, format!("pong from {expect}\n"));
    }
    println!("PEER OK {role} {me} <-> {expect}");
}

fn peer_id(certs: Option<&[rustls::pki_types::CertificateDer<'_>]>) -> String {
    let leaf = certs.and_then(|c| c.first()).expect("peer certificate");
    sigil::api::caller::svid_identity(leaf).unwrap().0
}

/// Verifies a peer X509-SVID: the chain under the SPIFFE bundle (webpki,
/// no host name: SVIDs carry both serverAuth and clientAuth, so the client
/// verifier serves both directions), then exactly one URI SAN equal to the
/// expected SPIFFE ID.
#[derive(Debug)]
struct SpiffeVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    expect: String,
}

impl SpiffeVerifier {
    fn new(roots: &[Vec<u8>], expect: &str) -> Self {
        let mut store = rustls::RootCertStore::empty();
        for r in roots {
            store
                .add(rustls::pki_types::CertificateDer::from(r.clone()))
                .unwrap();
        }
        let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(store),
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .build()
        .unwrap();
        Self {
            inner,
            expect: expect.to_owned(),
        }
    }

    fn check_id(&self, leaf: &[u8]) -> Result<(), rustls::Error> {
        let (_, cert) = X509Certificate::from_der(leaf)
            .map_err(|_| rustls::Error::General("bad leaf".into()))?;
        let uris: Vec<String> = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|s| {
                s.value
                    .general_names
                    .iter()
                    .filter_map(|g| match g {
                        GeneralName::URI(u) => Some(u.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if uris == [self.expect.clone()] {
            Ok(())
        } else {
            Err(rustls::Error::General(format!(
                "peer is {uris:?}, expected {}",
                self.expect
            )))
        }
    }
}

impl rustls::server::danger::ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        self.check_id(end_entity)?;
        Ok(ok)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

impl rustls::client::danger::ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        self.check_id(end_entity)?;
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A hard link to the test binary under another name: a distinct
/// `unix:path:` selector for a child process running the same code.
struct Alias(PathBuf);

impl Alias {
    fn new(role: &str) -> Self {
        let exe = std::env::current_exe().unwrap();
        let p = exe.with_file_name(format!(
            "agent-peer-{role}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        if std::fs::hard_link(&exe, &p).is_err() {
            std::fs::copy(&exe, &p).unwrap();
        }
        Self(p)
    }
}

impl Drop for Alias {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn two_processes_get_mtls_from_the_agent() {
    let b = TestBroker::start().await;
    let server = Alias::new("server");
    let client = Alias::new("client");
    const SERVER_ID: &str = "spiffe://sigil.local/app/server";
    const CLIENT_ID: &str = "spiffe://sigil.local/app/client";
    let sel = |a: &Alias| vec![format!("unix:path:{}", a.0.display())];
    apply_plan(
        &b,
        format!(
            "{PLAN_HEAD}{}{}",
            entry(SERVER_ID, AGENT_ID, &sel(&server)),
            entry(CLIENT_ID, AGENT_ID, &sel(&client))
        ),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let clock = MockClock::starting_now();
    let a = start_agent(&b, dir.path(), &clock, true, |c| {
        c.default_selectors = Some(vec![]);
    })
    .await;
    ready(&a).await;
    let port_file = dir.path().join("port");
    let spawn = |alias: &Alias, role: &str, expect: &str| {
        Command::new(&alias.0)
            .args([
                "--exact",
                "agent::peer_process_helper",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("SIGIL_AGENT_PEER_ROLE", role)
            .env("SIGIL_AGENT_PEER_EXPECT", expect)
            .env("SIGIL_AGENT_PEER_PORT_FILE", &port_file)
            .env("SPIFFE_ENDPOINT_SOCKET", a.endpoint())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let s = spawn(&server, "server", CLIENT_ID);
    let c = spawn(&client, "client", SERVER_ID);
    let (s, c) = tokio::task::spawn_blocking(move || {
        (s.wait_with_output().unwrap(), c.wait_with_output().unwrap())
    })
    .await
    .unwrap();
    let show = |o: &std::process::Output| {
        format!(
            "{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    assert!(s.status.success(), "server: {}", show(&s));
    assert!(c.status.success(), "client: {}", show(&c));
    assert!(show(&s).contains(&format!("PEER OK server {SERVER_ID} <-> {CLIENT_ID}")));
    assert!(show(&c).contains(&format!("PEER OK client {CLIENT_ID} <-> {SERVER_ID}")));
    // The agent holds both workload identities and nobody else's.
    let ids: Vec<String> = a.status().workloads.into_iter().map(|w| w.0).collect();
    assert_eq!(ids, vec![CLIENT_ID.to_owned(), SERVER_ID.to_owned()]);
    a.shutdown().await.unwrap();
}

// === the binary ===

const BIN: &str = env!("CARGO_BIN_EXE_sigil");

/// The end of a log file (for failure messages).
fn tail(log: &Path) -> String {
    let t = std::fs::read_to_string(log).unwrap_or_default();
    let start = t.len().saturating_sub(6000);
    t.get(start..).unwrap_or(&t).to_owned()
}

/// Waits (without blocking the runtime the in-process broker runs on).
async fn wait_file(p: &Path, child: &mut std::process::Child, log: &Path) {
    let t = Instant::now();
    while !p.exists() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "agent exited with {st} before {}:\n{}",
                p.display(),
                tail(log)
            );
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{} never appeared:\n{}",
            p.display(),
            tail(log)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn term(mut child: std::process::Child) {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "agent exited with {st}");
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "agent ignored SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_binary_enrolls_writes_files_serves_and_reuses_its_svid() {
    let b = TestBroker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("agent-data");
    let out = dir.path().join("svid");
    let token_file = dir.path().join("token");
    let (token, ..) = b.token(AGENT_ID, 1, 600).await;
    std::fs::write(&token_file, &token).unwrap();
    let run = |extra: &[&str], log: &Path, stdout: &Path| {
        let mut args = vec![
            "agent".to_owned(),
            "--broker".into(),
            b.url(),
            "--ca-pin".into(),
            b.running().ca_pin.clone(),
            "--data-dir".into(),
            data.display().to_string(),
            "--write-dir".into(),
            out.display().to_string(),
            "--jwt-audience".into(),
            AUD.into(),
            "--on-update".into(),
            format!("echo updated >> {}/hook.log", dir.path().display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Command::new(BIN)
            .args(&args)
            .env("SIGIL_LOG", "trace")
            .stdout(std::fs::File::create(stdout).unwrap())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap()
    };
    let log1 = dir.path().join("agent1.log");
    let out1 = dir.path().join("agent1.out");
    let mut child = run(
        &["--token-file", token_file.to_str().unwrap()],
        &log1,
        &out1,
    );
    wait_file(&out.join("jwt"), &mut child, &log1).await;
    wait_file(&dir.path().join("hook.log"), &mut child, &log1).await;
    assert!(!token_file.exists(), "token file deleted after use");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data.join("private")), 0o700);
    assert_eq!(mode(&out.join("svid.key")), 0o600);
    assert_eq!(mode(&out.join("jwt")), 0o600);

    // The documented endpoint line, and a SPIFFE client through it.
    let stdout = std::fs::read_to_string(&out1).unwrap();
    let socket = std::path::absolute(data.join("public/api.sock")).unwrap();
    let line = format!("SPIFFE_ENDPOINT_SOCKET=unix://{}", socket.display());
    assert!(stdout.contains(&line), "{stdout}");
    let endpoint = line
        .trim_start_matches("SPIFFE_ENDPOINT_SOCKET=")
        .to_owned();
    let c = WorkloadApiClient::connect_to(&endpoint).await.unwrap();
    let fetch = || async {
        let t = Instant::now();
        loop {
            match c.fetch_x509_svid().await {
                Ok(s) => return s,
                Err(e) if t.elapsed() < Duration::from_secs(20) => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    };
    let svid = fetch().await;
    assert_eq!(svid.spiffe_id().to_string(), AGENT_ID);
    let file_leaf = sigil::cli::pem_certs(&std::fs::read_to_string(out.join("svid.pem")).unwrap());
    assert_eq!(
        file_leaf[0],
        svid.cert_chain()[0].as_bytes(),
        "files match the socket"
    );
    let bundle = sigil::cli::pem_certs(&std::fs::read_to_string(out.join("bundle.pem")).unwrap());
    assert!(verifies_against(&file_leaf[0], &bundle));
    let file_jwt = std::fs::read_to_string(out.join("jwt")).unwrap();
    b.running().broker.validate_jwt(&file_jwt, AUD).unwrap();
    term(child).await;
    assert!(!socket.exists(), "socket removed on exit");

    // Restart without any credential: the saved SVID is reused.
    let log2 = dir.path().join("agent2.log");
    let out2 = dir.path().join("agent2.out");
    let mut child = run(&[], &log2, &out2);
    wait_file(&socket, &mut child, &log2).await;
    let c = WorkloadApiClient::connect_to(&endpoint).await.unwrap();
    let again = {
        let t = Instant::now();
        loop {
            match c.fetch_x509_svid().await {
                Ok(s) => break s,
                Err(_) if t.elapsed() < Duration::from_secs(20) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    };
    assert_eq!(
        again.cert_chain()[0].as_bytes(),
        svid.cert_chain()[0].as_bytes()
    );
    term(child).await;

    // Trace-level logs of both runs: no key, token secret or JWT.
    let mut logs = String::new();
    for l in [&log1, &log2] {
        std::fs::File::open(l)
            .unwrap()
            .read_to_string(&mut logs)
            .unwrap();
    }
    assert!(logs.contains("reusing the saved SVID"), "{logs}");
    let secret = token.split('.').nth(1).unwrap();
    assert!(!logs.contains(secret), "token secret in the log");
    assert!(!logs.contains(file_jwt.trim()), "JWT in the log");
    for key in [out.join("svid.key"), data.join("private/svid.key")] {
        let pem = std::fs::read_to_string(key).unwrap();
        for line in pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!logs.contains(line), "private key material in the log");
        }
    }
}
