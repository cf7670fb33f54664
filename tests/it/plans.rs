//! Foundation-plan bootstrap, plans and the Admin API over mTLS.

use sigil::{
    api::pb::{self, admin_client::AdminClient},
    cli::bootstrap_payload,
    token,
};
use tonic::Code;

use crate::harness::*;

const ADMIN: &str = "spiffe://sigil.local/admin/alice";
const ADMIN2: &str = "spiffe://sigil.local/admin/bob";

fn plan(admins: &[&str], required: u32) -> Vec<u8> {
    let admins: Vec<String> = admins.iter().map(|a| format!("{a:?}")).collect();
    format!(
        "admins = [{}]\n[limits]\nrequired_approvals = {required}\n\n[[entries]]\nspiffe_id = \"spiffe://sigil.local/ci/build\"\nx509_ttl = \"2h\"\n",
        admins.join(", ")
    )
    .into_bytes()
}

fn bootstrap_req(secret: &[u8], payload: Vec<u8>, plan: Vec<u8>) -> pb::BootstrapPlanRequest {
    pb::BootstrapPlanRequest {
        signature: token::hmac_sign(secret, &payload),
        payload,
        plan,
    }
}

fn payload_with(ts: i64, td: &str, action: &str, plan: &[u8]) -> Vec<u8> {
    let mut v: serde_json::Value =
        serde_json::from_slice(&bootstrap_payload(td, ts, plan)).unwrap();
    v["action"] = action.into();
    v.to_string().into_bytes()
}

async fn public_admin(b: &TestBroker) -> AdminClient<tonic::transport::Channel> {
    AdminClient::new(b.tls().await)
}

#[tokio::test]
async fn bootstrap_then_admin_over_mtls_then_workload() {
    let b = TestBroker::start().await;
    let secret = b.bootstrap_secret();
    let p = plan(&[ADMIN], 1);
    let r = public_admin(&b)
        .await
        .bootstrap_plan(bootstrap_req(
            &secret,
            bootstrap_payload("sigil.local", b.now_ms(), &p),
            p,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, "PLAN_CREATED");
    assert_eq!(r.plan_version, 1);
    assert_eq!(r.admin_spiffe_id, ADMIN);
    assert_eq!(r.plan_sha256.len(), 64);

    // The admin enrolls with the one-time token and calls Admin over mTLS.
    let (chain, key) = b.enroll_with_token(&r.admin_token).await;
    let mut admin = AdminClient::new(b.mtls(chain, key).await);
    let status = admin
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!status.bootstrap_enabled);
    assert_eq!(
        (status.plan_version, status.plan_sha256.as_str()),
        (1, r.plan_sha256.as_str())
    );
    assert_eq!(status.bootstrap_secret, "unused");
    let t = admin
        .create_enrollment_token(pb::CreateEnrollmentTokenRequest {
            spiffe_id: "spiffe://sigil.local/ci/build".into(),
            ttl_seconds: 600,
            max_uses: 1,
        })
        .await
        .unwrap()
        .into_inner();
    // The workload enrolls; the plan's entry gives it a 2 h certificate.
    let (id, s) = token::parse_token(&t.token).unwrap();
    let (_, csr) = key_and_csr();
    let w = b
        .identity()
        .await
        .enroll(enroll_req(&id, &s, &csr, b.now_ms(), &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.expires_at, b.now_ms() / 1000 + 7200);
    // The issuance audit row records the active plan.
    let rows = admin
        .list_audit_events(pb::ListAuditEventsRequest {
            after_seq: 0,
            limit: 100,
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let issued = rows.iter().rev().find(|e| e.kind == "issued").unwrap();
    assert!(
        issued.fields_json.contains(&r.plan_sha256),
        "{}",
        issued.fields_json
    );
    assert!(issued.fields_json.contains("\"plan_version\":1"));
    assert!(rows.iter().any(|e| e.kind == "plan_bootstrapped"));
    // A token longer than the plan's max_token_ttl (default 24 h) is refused.
    let err = admin
        .create_enrollment_token(pb::CreateEnrollmentTokenRequest {
            spiffe_id: "spiffe://sigil.local/ci/build".into(),
            ttl_seconds: 25 * 3600,
            max_uses: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "MALFORMED_REQUEST");
}

#[tokio::test]
async fn every_bootstrap_failure_has_its_reason() {
    let b = TestBroker::start().await;
    let secret = b.bootstrap_secret();
    let p = plan(&[ADMIN], 1);
    let now = b.now_ms();
    let mut c = public_admin(&b).await;
    let ok_payload = || bootstrap_payload("sigil.local", now, &p);
    let enroll_payload = sigil::token::EnrollPayload {
        action: "ENROLL".into(),
        token_id: "0".repeat(32),
        timestamp: now,
        nonce: token::random_nonce(),
        csr_sha256: "00".repeat(32),
    }
    .to_bytes();
    let cases: Vec<(&str, pb::BootstrapPlanRequest, &str)> = vec![
        (
            "wrong secret",
            bootstrap_req(&[9u8; 32], ok_payload(), p.clone()),
            "INVALID_BOOTSTRAP_SIGNATURE",
        ),
        (
            "ENROLL payload with its token HMAC",
            pb::BootstrapPlanRequest {
                signature: token::hmac_sign(&[1u8; 32], &enroll_payload),
                payload: enroll_payload.clone(),
                plan: p.clone(),
            },
            "INVALID_BOOTSTRAP_SIGNATURE",
        ),
        (
            "ENROLL payload under the bootstrap secret",
            bootstrap_req(&secret, enroll_payload, p.clone()),
            "MALFORMED_REQUEST",
        ),
        (
            "wrong action",
            bootstrap_req(
                &secret,
                payload_with(now, "sigil.local", "ENROLL", &p),
                p.clone(),
            ),
            "MALFORMED_REQUEST",
        ),
        (
            "foreign trust domain",
            bootstrap_req(&secret, bootstrap_payload("other.org", now, &p), p.clone()),
            "MALFORMED_REQUEST",
        ),
        (
            "plan hash mismatch",
            bootstrap_req(
                &secret,
                bootstrap_payload("sigil.local", now, b"other"),
                p.clone(),
            ),
            "MALFORMED_REQUEST",
        ),
        (
            "301 s old",
            bootstrap_req(
                &secret,
                bootstrap_payload("sigil.local", now - 301_000, &p),
                p.clone(),
            ),
            "BOOTSTRAP_REQUEST_EXPIRED",
        ),
        (
            "301 s ahead",
            bootstrap_req(
                &secret,
                bootstrap_payload("sigil.local", now + 301_000, &p),
                p.clone(),
            ),
            "BOOTSTRAP_REQUEST_EXPIRED",
        ),
        (
            "no admin",
            {
                let q = b"admins = []".to_vec();
                bootstrap_req(&secret, bootstrap_payload("sigil.local", now, &q), q)
            },
            "MALFORMED_REQUEST",
        ),
    ];
    for (name, req, want) in cases {
        let err = c.bootstrap_plan(req).await.expect_err(name);
        assert_eq!(reason(&err), want, "{name}: {err:?}");
    }
    let err = c
        .bootstrap_plan(bootstrap_req(
            &secret,
            bootstrap_payload("sigil.local", now - 301_000, &p),
            p.clone(),
        ))
        .await
        .unwrap_err();
    let (_, md) = sigil::api::status::error_info(&err).unwrap();
    assert_eq!(md["server_time_ms"], now.to_string());
    assert_eq!(err.code(), Code::Unauthenticated);

    // Invalid plans are refused with a message naming the field.
    for (doc, field) in [
        ("admins = [\"spiffe://sigil.local/a\"]\nsurprise = 1\n", "surprise"),
        ("admins = [\"spiffe://evil.org/a\"]\n", "admins[0]"),
        ("admins = [\"spiffe://sigil.local/a\"]\n[[entries]]\nspiffe_id = \"spiffe://sigil.local/w\"\nx509_ttl = \"9000d\"\n", "entries[0].x509_ttl"),
    ] {
        let q = doc.as_bytes().to_vec();
        let err = c
            .bootstrap_plan(bootstrap_req(&secret, bootstrap_payload("sigil.local", now, &q), q))
            .await
            .unwrap_err();
        assert_eq!(reason(&err), "MALFORMED_REQUEST");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }

    // Replay of a winning request: the nonce is remembered.
    let winning = bootstrap_req(&secret, ok_payload(), p.clone());
    c.bootstrap_plan(winning.clone()).await.unwrap();
    let err = c.bootstrap_plan(winning).await.unwrap_err();
    assert_eq!(reason(&err), "NONCE_REPLAYED");
    // Any later valid request: disabled for good.
    let err = c
        .bootstrap_plan(bootstrap_req(&secret, ok_payload(), p.clone()))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "BOOTSTRAP_DISABLED");
    assert_eq!(err.code(), Code::FailedPrecondition);
    // Every attempt was audited.
    let rows = b
        .admin()
        .await
        .list_audit_events(pb::ListAuditEventsRequest {
            after_seq: 0,
            limit: 100,
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let denied = rows
        .iter()
        .filter(|e| e.kind == "denied" && e.fields_json.contains("bootstrap"))
        .count();
    assert_eq!(denied, 9 + 1 + 3 + 2);
}

#[tokio::test]
async fn secret_missing_when_an_external_secret_is_required() {
    let b = TestBroker::start_with(|c| c.require_bootstrap_secret = true).await;
    assert!(
        !b.data_dir().join("bootstrap_secret").exists(),
        "nothing generated"
    );
    let p = plan(&[ADMIN], 1);
    let err = public_admin(&b)
        .await
        .bootstrap_plan(bootstrap_req(
            &[0u8; 32],
            bootstrap_payload("sigil.local", b.now_ms(), &p),
            p,
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "BOOTSTRAP_SECRET_MISSING");
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn secret_from_env_takes_precedence() {
    let b = TestBroker::start_with(|c| {
        c.bootstrap_secret_env = Some(base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            [5u8; 32],
        ));
    })
    .await;
    let p = plan(&[ADMIN], 1);
    let mut c = public_admin(&b).await;
    let err = c
        .bootstrap_plan(bootstrap_req(
            &b.bootstrap_secret_or_empty(),
            bootstrap_payload("sigil.local", b.now_ms(), &p),
            p.clone(),
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "INVALID_BOOTSTRAP_SIGNATURE");
    c.bootstrap_plan(bootstrap_req(
        &[5u8; 32],
        bootstrap_payload("sigil.local", b.now_ms(), &p),
        p,
    ))
    .await
    .unwrap();
}

#[tokio::test]
async fn thirty_two_concurrent_bootstraps_exactly_one_wins_and_it_survives_restart() {
    let mut b = TestBroker::start().await;
    let secret = b.bootstrap_secret();
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let mut c = public_admin(&b).await;
        let p = plan(&[ADMIN], 1);
        let req = bootstrap_req(&secret, bootstrap_payload("sigil.local", b.now_ms(), &p), p);
        tasks.push(tokio::spawn(async move { c.bootstrap_plan(req).await }));
    }
    let mut created = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => {
                assert_eq!(r.into_inner().status, "PLAN_CREATED");
                created += 1;
            }
            Err(e) => assert_eq!(reason(&e), "BOOTSTRAP_DISABLED"),
        }
    }
    assert_eq!(created, 1);
    b.restart().await;
    let p = plan(&[ADMIN], 1);
    let err = public_admin(&b)
        .await
        .bootstrap_plan(bootstrap_req(
            &secret,
            bootstrap_payload("sigil.local", b.now_ms(), &p),
            p,
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "BOOTSTRAP_DISABLED");
    let s = b
        .admin()
        .await
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!s.bootstrap_enabled);
    assert_eq!(s.plan_version, 1);
}

async fn bootstrapped(b: &TestBroker, admins: &[&str], required: u32) -> String {
    let p = plan(admins, required);
    public_admin(b)
        .await
        .bootstrap_plan(bootstrap_req(
            &b.bootstrap_secret(),
            bootstrap_payload("sigil.local", b.now_ms(), &p),
            p,
        ))
        .await
        .unwrap()
        .into_inner()
        .admin_token
}

#[tokio::test]
async fn non_admins_are_not_authorized_on_any_admin_rpc() {
    let b = TestBroker::start().await;
    bootstrapped(&b, &[ADMIN], 1).await;
    // A workload SVID (not an admin of the plan), and no certificate at all.
    let (tok, _, _) = b.token("spiffe://sigil.local/ci/build", 1, 0).await;
    let (chain, key) = b.enroll_with_token(&tok).await;
    for ch in [b.mtls(chain, key).await, b.tls().await] {
        let mut c = AdminClient::new(ch);
        let p = plan(&[ADMIN], 1);
        let errs = vec![
            c.create_enrollment_token(pb::CreateEnrollmentTokenRequest {
                spiffe_id: "spiffe://sigil.local/x".into(),
                ttl_seconds: 0,
                max_uses: 0,
            })
            .await
            .unwrap_err(),
            c.revoke_enrollment_token(pb::RevokeEnrollmentTokenRequest {
                token_id: "0".repeat(32),
            })
            .await
            .unwrap_err(),
            c.list_enrollment_tokens(pb::ListEnrollmentTokensRequest {})
                .await
                .unwrap_err(),
            c.list_audit_events(pb::ListAuditEventsRequest {
                after_seq: 0,
                limit: 1,
            })
            .await
            .unwrap_err(),
            c.verify_audit_chain(pb::VerifyAuditChainRequest {})
                .await
                .unwrap_err(),
            c.propose_plan(pb::ProposePlanRequest { plan: p.clone() })
                .await
                .unwrap_err(),
            c.approve_plan(pb::ApprovePlanRequest {
                version: 1,
                plan_sha256: "00".into(),
            })
            .await
            .unwrap_err(),
            c.apply_plan(pb::ApplyPlanRequest { plan: p.clone() })
                .await
                .unwrap_err(),
            c.get_plan(pb::GetPlanRequest { version: 0 })
                .await
                .unwrap_err(),
            c.get_status(pb::GetStatusRequest {}).await.unwrap_err(),
        ];
        for e in errs {
            assert_eq!(reason(&e), "NOT_AUTHORIZED", "{e:?}");
            assert_eq!(e.code(), Code::PermissionDenied);
        }
    }
}

#[tokio::test]
async fn two_approval_plan_needs_two_distinct_admins() {
    let b = TestBroker::start().await;
    let admin_token = bootstrapped(&b, &[ADMIN, ADMIN2], 2).await;
    // The bootstrap token is for the first admin (sorted): alice. Bob gets a token from the local operator.
    let (alice_chain, alice_key) = b.enroll_with_token(&admin_token).await;
    let (bob_tok, _, _) = b.token(ADMIN2, 1, 0).await;
    let (bob_chain, bob_key) = b.enroll_with_token(&bob_tok).await;
    let mut alice = AdminClient::new(b.mtls(alice_chain, alice_key).await);
    let mut bob = AdminClient::new(b.mtls(bob_chain, bob_key).await);

    let next = plan(&[ADMIN, ADMIN2], 1);
    let proposed = alice
        .propose_plan(pb::ProposePlanRequest { plan: next.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(proposed.state, "pending");
    assert_eq!((proposed.approvals, proposed.required_approvals), (1, 2));
    // Alice alone cannot push it: approving again does not count.
    let err = alice
        .approve_plan(pb::ApprovePlanRequest {
            version: proposed.version,
            plan_sha256: proposed.plan_sha256.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "MALFORMED_REQUEST");
    assert_eq!(
        alice
            .get_plan(pb::GetPlanRequest { version: 0 })
            .await
            .unwrap()
            .into_inner()
            .version,
        1
    );
    // Bob must approve the exact hash.
    let err = bob
        .approve_plan(pb::ApprovePlanRequest {
            version: proposed.version,
            plan_sha256: "0".repeat(64),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "MALFORMED_REQUEST");
    let done = bob
        .approve_plan(pb::ApprovePlanRequest {
            version: proposed.version,
            plan_sha256: proposed.plan_sha256.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.state, "active");
    assert_eq!(done.approvers, vec![ADMIN.to_owned(), ADMIN2.to_owned()]);
    let active = alice
        .get_plan(pb::GetPlanRequest { version: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(active.version, proposed.version);
    assert_eq!(
        alice
            .get_plan(pb::GetPlanRequest { version: 1 })
            .await
            .unwrap()
            .into_inner()
            .state,
        "superseded"
    );
    // The new plan needs one approval: a proposal activates at once.
    let third = plan(&[ADMIN], 1);
    let r = alice
        .propose_plan(pb::ProposePlanRequest { plan: third })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, "active");
    // Bob is no longer an admin.
    let err = bob.get_status(pb::GetStatusRequest {}).await.unwrap_err();
    assert_eq!(reason(&err), "NOT_AUTHORIZED");
}

#[tokio::test]
async fn local_socket_applies_plans_directly() {
    let b = TestBroker::start().await;
    let mut local = b.admin().await;
    let r = local
        .apply_plan(pb::ApplyPlanRequest {
            plan: plan(&[ADMIN], 1),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.version, r.state.as_str()), (1, "active"));
    // Applying a plan ends bootstrap mode too.
    let p = plan(&[ADMIN], 1);
    let err = public_admin(&b)
        .await
        .bootstrap_plan(bootstrap_req(
            &b.bootstrap_secret(),
            bootstrap_payload("sigil.local", b.now_ms(), &p),
            p,
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "BOOTSTRAP_DISABLED");
    let err = local
        .apply_plan(pb::ApplyPlanRequest {
            plan: b"admins = [\"spiffe://sigil.local/a\"]\n[limits]\nmax_svid_ttl = 1\n".to_vec(),
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("limits.max_svid_ttl"),
        "{}",
        err.message()
    );
}
