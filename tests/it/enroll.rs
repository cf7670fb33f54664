//! Token enrollment end to end over real TLS: the happy path checked against
//! the SPIFFE rules, every bad input, replay, reuse, retry, concurrency and
//! restart.

use base64::Engine;
use sha2::{Digest, Sha256};
use sigil::{api::pb, token::EnrollPayload};
use tonic::Code;
use x509_parser::prelude::*;

use crate::harness::*;

const ID: &str = "spiffe://sigil.local/ci/build";

fn payload(token_id: &str, ts: i64, nonce: &str, csr: &[u8]) -> EnrollPayload {
    EnrollPayload {
        action: "ENROLL".into(),
        token_id: token_id.into(),
        timestamp: ts,
        nonce: nonce.into(),
        csr_sha256: hex::encode(Sha256::digest(csr)),
    }
}

#[tokio::test]
async fn happy_path_issues_a_spiffe_x509_svid_and_a_verifiable_jwt() {
    let b = TestBroker::start().await;
    let (_, id, secret) = b.token(ID, 1, 0).await;
    let (key, csr) = key_and_csr();
    let mut c = b.identity().await;
    let r = c
        .enroll(enroll_req(
            &id,
            &secret,
            &csr,
            b.now_ms(),
            &["https://api.example"],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.spiffe_id, ID);
    assert!(!r.retried);
    assert_eq!(r.x509_svid_chain.len(), 1);
    assert_eq!(r.trust_bundle.len(), 1);

    // X509-SVID rules (formats.md §1.2).
    let (_, leaf) = parse_x509_certificate(&r.x509_svid_chain[0]).unwrap();
    let (_, ca) = parse_x509_certificate(&r.trust_bundle[0]).unwrap();
    leaf.verify_signature(Some(ca.public_key())).unwrap();
    assert_eq!(
        leaf.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
    );
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    let uris: Vec<_> = san
        .value
        .general_names
        .iter()
        .filter_map(|g| match g {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    assert_eq!(uris, vec![ID]);
    let bc = leaf.basic_constraints().unwrap().unwrap();
    assert!(!bc.value.ca);
    let ku = leaf.key_usage().unwrap().unwrap();
    assert!(ku.critical);
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.server_auth && eku.value.client_auth);
    let serial = leaf.raw_serial();
    assert!(
        serial.len() >= 16,
        "128-bit serial, got {} bytes",
        serial.len()
    );
    let nb = leaf.validity().not_before.timestamp();
    let na = leaf.validity().not_after.timestamp();
    let now = b.now_ms() / 1000;
    assert_eq!(nb, now - 30, "NotBefore backdated 30 s");
    assert_eq!(na, now + 3600, "default TTL 1 h");
    assert_eq!(r.expires_at, na);

    // JWT-SVID verified against the bundle's JWKS.
    let bundle = c
        .get_bundle(pb::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bundle.trust_domain, "sigil.local");
    assert_eq!(bundle.x509_authorities, r.trust_bundle);
    let jwks: serde_json::Value = serde_json::from_str(&bundle.spiffe_bundle_json).unwrap();
    assert!(jwks["spiffe_sequence"].as_u64().unwrap() >= 1);
    let jwt_key = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["use"] == "jwt-svid")
        .unwrap()
        .clone();
    let header = jsonwebtoken::decode_header(&r.jwt_svid).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    assert_eq!(header.kid.as_deref(), jwt_key["kid"].as_str());
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwt_key).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&["https://api.example"]);
    // The mock clock equals real time at start, so exp is checked against now.
    let data = jsonwebtoken::decode::<serde_json::Value>(
        &r.jwt_svid,
        &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(),
        &v,
    )
    .unwrap();
    assert_eq!(data.claims["sub"], ID);
    assert_eq!(data.claims["exp"].as_i64().unwrap(), now + 300);
    assert!(data.claims["jti"].is_string());
    assert!(data.claims["iat"].is_i64());
    let x5c = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["use"] == "x509-svid")
        .unwrap()["x5c"][0]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(x5c)
            .unwrap(),
        r.trust_bundle[0]
    );
}

#[tokio::test]
async fn csr_requests_never_reach_the_certificate() {
    let b = TestBroker::start().await;
    let (_, id, secret) = b.token(ID, 1, 0).await;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://sigil.local/admin".try_into().unwrap(),
    ));
    let csr = params.serialize_request(&key).unwrap().der().to_vec();
    let r = b
        .identity()
        .await
        .enroll(enroll_req(&id, &secret, &csr, b.now_ms(), &[]))
        .await
        .unwrap()
        .into_inner();
    let (_, leaf) = parse_x509_certificate(&r.x509_svid_chain[0]).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names.len(), 1);
    assert!(matches!(san.value.general_names[0], GeneralName::URI(u) if u == ID));
    assert!(!leaf.basic_constraints().unwrap().unwrap().value.ca);
    assert!(r.jwt_svid.is_empty(), "no audiences, no JWT");
}

/// Each bad input: its reason, no state change but one audit row, server keeps serving.
#[tokio::test]
async fn bad_inputs_get_their_reason_and_change_nothing() {
    let b = TestBroker::start().await;
    let (_, id, secret) = b.token(ID, 1, 0).await;
    let (_, csr) = key_and_csr();
    let now = b.now_ms();
    let nonce = sigil::token::random_nonce;
    let mut c = b.identity().await;

    let other_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut foreign_sig_csr = csr.clone();
    // Replace the CSR's SubjectPublicKeyInfo with another key's: the self-signature no longer verifies.
    let own_spki = {
        let (_, parsed) = X509CertificationRequest::from_der(&csr).unwrap();
        parsed.certification_request_info.subject_pki.raw.to_vec()
    };
    let pos = foreign_sig_csr
        .windows(own_spki.len())
        .position(|w| w == own_spki.as_slice())
        .unwrap();
    foreign_sig_csr.splice(
        pos..pos + own_spki.len(),
        rcgen::PublicKeyData::subject_public_key_info(&other_key),
    );

    let p = |ts: i64, n: &str, csr: &[u8]| payload(&id, ts, n, csr);
    let cases: Vec<(&str, pb::EnrollRequest, &str)> = vec![
        (
            "garbage csr",
            signed_raw(
                &id,
                &secret,
                b"garbage",
                p(now, &nonce(), b"garbage").to_bytes(),
            ),
            "MALFORMED_REQUEST",
        ),
        (
            "truncated csr",
            signed_raw(
                &id,
                &secret,
                &csr[..csr.len() / 2],
                p(now, &nonce(), &csr[..csr.len() / 2]).to_bytes(),
            ),
            "MALFORMED_REQUEST",
        ),
        (
            "csr signed by another key",
            signed_raw(
                &id,
                &secret,
                &foreign_sig_csr,
                p(now, &nonce(), &foreign_sig_csr).to_bytes(),
            ),
            "MALFORMED_REQUEST",
        ),
        (
            "payload not json",
            signed_raw(&id, &secret, &csr, b"hello".to_vec()),
            "MALFORMED_REQUEST",
        ),
        (
            "missing fields",
            signed_raw(
                &id,
                &secret,
                &csr,
                br#"{"action":"ENROLL","token_id":"x"}"#.to_vec(),
            ),
            "MALFORMED_REQUEST",
        ),
        (
            "wrong action",
            signed_raw(&id, &secret, &csr, {
                let mut q = p(now, &nonce(), &csr);
                q.action = "BOOTSTRAP_CREATE_FOUNDATION_PLAN".into();
                q.to_bytes()
            }),
            "MALFORMED_REQUEST",
        ),
        (
            "token_id mismatch",
            signed_raw(&id, &secret, &csr, {
                let mut q = p(now, &nonce(), &csr);
                q.token_id = "0".repeat(32);
                q.to_bytes()
            }),
            "MALFORMED_REQUEST",
        ),
        (
            "csr hash mismatch",
            signed_raw(&id, &secret, &csr, p(now, &nonce(), b"other").to_bytes()),
            "MALFORMED_REQUEST",
        ),
        (
            "short nonce",
            signed_raw(
                &id,
                &secret,
                &csr,
                p(now, "AAAAAAAAAAAAAAAAAAAA", &csr).to_bytes(),
            ),
            "MALFORMED_REQUEST",
        ),
        (
            "301 s old",
            signed_raw(
                &id,
                &secret,
                &csr,
                p(now - 301_000, &nonce(), &csr).to_bytes(),
            ),
            "REQUEST_EXPIRED",
        ),
        (
            "301 s ahead",
            signed_raw(
                &id,
                &secret,
                &csr,
                p(now + 301_000, &nonce(), &csr).to_bytes(),
            ),
            "REQUEST_EXPIRED",
        ),
        (
            "bad hmac",
            {
                let mut r = enroll_req(&id, &secret, &csr, now, &[]);
                if let Some(pb::enroll_request::Credential::Token(t)) = r.credential.as_mut() {
                    t.signature[0] ^= 1;
                }
                r
            },
            "INVALID_SIGNATURE",
        ),
        (
            "oversize csr",
            {
                let big = vec![0x30u8; 40_000];
                signed_raw(&id, &secret, &big, p(now, &nonce(), &big).to_bytes())
            },
            "MALFORMED_REQUEST",
        ),
        (
            "no credential",
            pb::EnrollRequest {
                csr: csr.clone(),
                credential: None,
                jwt_audiences: vec![],
            },
            "MALFORMED_REQUEST",
        ),
    ];
    for (name, req, want) in cases {
        let before = b.counts().await;
        let err = c.enroll(req).await.expect_err(name);
        assert_eq!(reason(&err), want, "{name}: {err:?}");
        let after = b.counts().await;
        assert_eq!(after.issued, before.issued, "{name}");
        assert_eq!(after.nonces, before.nonces, "{name}");
        assert_eq!(after.audit, before.audit + 1, "{name}: one audit row");
    }

    // Expiry errors carry the server time and window for skew diagnosis.
    let err = c
        .enroll(signed_raw(
            &id,
            &secret,
            &csr,
            p(now - 301_000, &nonce(), &csr).to_bytes(),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let (_, md) = sigil::api::status::error_info(&err).unwrap();
    assert_eq!(md["server_time_ms"], now.to_string());
    assert_eq!(md["window_seconds"], "300");

    // Exactly at the edge of the window is accepted; the token still works.
    let r = c
        .enroll(signed_raw(
            &id,
            &secret,
            &csr,
            p(now - 300_000, &nonce(), &csr).to_bytes(),
        ))
        .await
        .unwrap();
    assert_eq!(r.into_inner().spiffe_id, ID);
}

#[tokio::test]
async fn oversize_message_is_refused_and_server_keeps_serving() {
    let b = TestBroker::start().await;
    let (_, id, secret) = b.token(ID, 1, 0).await;
    let mut c = b.identity().await;
    let big = vec![7u8; 100 * 1024];
    let err = c
        .enroll(signed_raw(&id, &secret, &big, b"{}".to_vec()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::Internal | Code::InvalidArgument
        ),
        "{err:?}"
    );
    let (_, csr) = key_and_csr();
    c.enroll(enroll_req(&id, &secret, &csr, b.now_ms(), &[]))
        .await
        .unwrap();
}

#[tokio::test]
async fn token_states_unknown_expired_revoked_used() {
    let b = TestBroker::start().await;
    let mut c = b.identity().await;
    let (_, csr) = key_and_csr();

    // Unknown: a correctly derived secret for an id the broker never stored.
    let key = sigil::secret::read_secret_file(&b.data_dir().join("token_key"))
        .unwrap()
        .unwrap();
    let minted = sigil::token::TokenKey::new(key).mint();
    let err = c
        .enroll(enroll_req(
            &minted.token_id,
            &minted.secret,
            &csr,
            b.now_ms(),
            &[],
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "TOKEN_UNKNOWN");
    assert_eq!(err.code(), Code::PermissionDenied);

    // Expired.
    let (_, id, secret) = b.token(ID, 1, 60).await;
    b.clock.advance_ms(61_000);
    let err = c
        .enroll(enroll_req(&id, &secret, &csr, b.now_ms(), &[]))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "TOKEN_EXPIRED");

    // Revoked.
    let (_, id, secret) = b.token(ID, 1, 0).await;
    let r = b
        .admin()
        .await
        .revoke_enrollment_token(pb::RevokeEnrollmentTokenRequest {
            token_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.revoked);
    let err = c
        .enroll(enroll_req(&id, &secret, &csr, b.now_ms(), &[]))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "TOKEN_REVOKED");

    // Used: second use with another key.
    let (_, id, secret) = b.token(ID, 1, 0).await;
    c.enroll(enroll_req(&id, &secret, &csr, b.now_ms(), &[]))
        .await
        .unwrap();
    let (_, csr2) = key_and_csr();
    let before = b.counts().await;
    let err = c
        .enroll(enroll_req(&id, &secret, &csr2, b.now_ms(), &[]))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "TOKEN_ALREADY_USED");
    let after = b.counts().await;
    assert_eq!(
        (after.issued, after.audit),
        (before.issued, before.audit + 1)
    );
    let audit = b
        .admin()
        .await
        .list_audit_events(pb::ListAuditEventsRequest {
            after_seq: before.audit,
            limit: 10,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(audit.events[0].outcome, "TOKEN_ALREADY_USED");
    assert!(audit.events[0].fields_json.contains(&id));
}

#[tokio::test]
async fn exact_replay_is_nonce_replayed() {
    let b = TestBroker::start().await;
    let (_, id, secret) = b.token(ID, 2, 0).await;
    let (_, csr) = key_and_csr();
    let req = enroll_req(&id, &secret, &csr, b.now_ms(), &[]);
    let mut c = b.identity().await;
    c.enroll(req.clone()).await.unwrap();
    let err = c.enroll(req).await.unwrap_err();
    assert_eq!(reason(&err), "NONCE_REPLAYED");
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn retry_with_same_key_returns_the_same_certificate() {
    let b = TestBroker::start().await;
    let (_, id, secret) = b.token(ID, 1, 0).await;
    let (key, csr) = key_and_csr();
    let mut c = b.identity().await;
    let first = c
        .enroll(enroll_req(&id, &secret, &csr, b.now_ms(), &["a"]))
        .await
        .unwrap()
        .into_inner();
    b.clock.advance_ms(5_000);
    // The response was "lost": the workload retries with a fresh nonce and a new CSR for the same key.
    let again = c
        .enroll(enroll_req(&id, &secret, &csr_for(&key), b.now_ms(), &["a"]))
        .await
        .unwrap()
        .into_inner();
    assert!(again.retried);
    assert_eq!(
        again.x509_svid_chain, first.x509_svid_chain,
        "same serial, same certificate"
    );
    assert!(again.jwt_svid.is_empty(), "no JWT on a retry");
    // A different key is refused.
    let (_, csr2) = key_and_csr();
    let err = c
        .enroll(enroll_req(&id, &secret, &csr2, b.now_ms(), &[]))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "TOKEN_ALREADY_USED");
}

#[tokio::test]
async fn sixty_four_concurrent_redemptions_give_exactly_one_certificate() {
    let b = TestBroker::start().await;
    let (_, id, secret) = b.token(ID, 1, 0).await;
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let mut c = b.identity().await;
        let (_, csr) = key_and_csr();
        let req = enroll_req(&id, &secret, &csr, b.now_ms(), &[]);
        tasks.push(tokio::spawn(async move { c.enroll(req).await }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(reason(&e), "TOKEN_ALREADY_USED"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(b.counts().await.issued, 1);
}

#[tokio::test]
async fn consumed_token_stays_consumed_across_restart() {
    let mut b = TestBroker::start().await;
    let (_, id, secret) = b.token(ID, 1, 0).await;
    let (_, csr) = key_and_csr();
    let req = enroll_req(&id, &secret, &csr, b.now_ms(), &[]);
    b.identity().await.enroll(req.clone()).await.unwrap();
    let pin = b.running().ca_pin.clone();
    b.restart().await;
    assert_eq!(b.running().ca_pin, pin, "same CA after restart");
    let mut c = b.identity().await;
    let err = c.enroll(req).await.unwrap_err();
    assert_eq!(
        reason(&err),
        "NONCE_REPLAYED",
        "nonce remembered across restart"
    );
    let (_, csr2) = key_and_csr();
    let err = c
        .enroll(enroll_req(&id, &secret, &csr2, b.now_ms(), &[]))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "TOKEN_ALREADY_USED");
}

#[tokio::test]
async fn multi_use_token_serves_a_fleet_then_stops() {
    let b = TestBroker::start().await;
    let (_, id, secret) = b.token(ID, 3, 0).await;
    let mut c = b.identity().await;
    for _ in 0..3 {
        let (_, csr) = key_and_csr();
        c.enroll(enroll_req(&id, &secret, &csr, b.now_ms(), &[]))
            .await
            .unwrap();
    }
    let (_, csr) = key_and_csr();
    let err = c
        .enroll(enroll_req(&id, &secret, &csr, b.now_ms(), &[]))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "TOKEN_ALREADY_USED");
    let list = b
        .admin()
        .await
        .list_enrollment_tokens(pb::ListEnrollmentTokensRequest {})
        .await
        .unwrap()
        .into_inner();
    let t = list.tokens.iter().find(|t| t.token_id == id).unwrap();
    assert_eq!((t.uses, t.max_uses), (3, 3));
}

#[tokio::test]
async fn admin_rejects_bad_token_requests() {
    let b = TestBroker::start().await;
    let mut a = b.admin().await;
    for (sid, ttl, uses) in [
        ("spiffe://other.domain/x", 0, 0),
        ("not-a-spiffe-id", 0, 0),
        ("spiffe://sigil.local", 0, 0),
        (ID, 40 * 24 * 3600, 0),
        (ID, 0, 2_000_000),
    ] {
        let err = a
            .create_enrollment_token(pb::CreateEnrollmentTokenRequest {
                spiffe_id: sid.into(),
                ttl_seconds: ttl,
                max_uses: uses,
            })
            .await
            .unwrap_err();
        assert_eq!(reason(&err), "MALFORMED_REQUEST", "{sid} {ttl} {uses}");
    }
    let err = a
        .revoke_enrollment_token(pb::RevokeEnrollmentTokenRequest {
            token_id: "f".repeat(32),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "TOKEN_UNKNOWN");
}

#[tokio::test]
async fn audit_chain_verifies_and_detects_tampering() {
    let mut b = TestBroker::start().await;
    let (_, id, secret) = b.token(ID, 1, 0).await;
    let (_, csr) = key_and_csr();
    let mut c = b.identity().await;
    let req = enroll_req(&id, &secret, &csr, b.now_ms(), &[]);
    c.enroll(req.clone()).await.unwrap();
    c.enroll(req).await.unwrap_err();
    let v = b
        .admin()
        .await
        .verify_audit_chain(pb::VerifyAuditChainRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{v:?}");
    assert_eq!(v.events, 3, "token_created, issued, denied");
    // No secret in any audit row.
    let rows = b
        .admin()
        .await
        .list_audit_events(pb::ListAuditEventsRequest {
            after_seq: 0,
            limit: 100,
        })
        .await
        .unwrap()
        .into_inner();
    for r in &rows.events {
        assert!(!r.fields_json.contains(&secret.to_hex()));
    }
    b.running.take().unwrap().shutdown().await.unwrap();

    // Edit a row.
    let db = b.data_dir().join("sigil.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute("UPDATE audit SET outcome = 'ok' WHERE seq = 3", [])
        .unwrap();
    drop(conn);
    let v = sigil::server::verify_audit_offline(&b.data_dir())
        .await
        .unwrap();
    assert_eq!(v.broken.as_ref().map(|x| x.0), Some(3), "{v:?}");

    // Delete a row (restore the edit first so only the deletion is seen).
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute(
        "UPDATE audit SET outcome = 'NONCE_REPLAYED' WHERE seq = 3",
        [],
    )
    .unwrap();
    conn.execute("DELETE FROM audit WHERE seq = 2", []).unwrap();
    drop(conn);
    let v = sigil::server::verify_audit_offline(&b.data_dir())
        .await
        .unwrap();
    assert_eq!(v.broken.as_ref().map(|x| x.0), Some(2), "{v:?}");
}

#[tokio::test]
async fn pin_mismatch_is_refused() {
    let b = TestBroker::start().await;
    let trust = sigil::cli::Trust::from_pin(&format!("sha256:{}", "ab".repeat(32))).unwrap();
    let res = sigil::cli::connect_tls(&b.url(), sigil::cli::tls_config(&trust).unwrap()).await;
    match res {
        Err(_) => {}
        Ok(ch) => {
            // Lazy transports surface the handshake failure on first call.
            let err = pb::identity_client::IdentityClient::new(ch)
                .get_bundle(pb::GetBundleRequest {})
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::Unavailable);
        }
    }
}
