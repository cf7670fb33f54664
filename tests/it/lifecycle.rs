//! Renewal, JWT minting and validation, revocation, CRLs and key rotation.

use sigil::{
    api::pb::{self, admin_client::AdminClient, identity_client::IdentityClient},
    cli::{connect_tls, tls_config_with, ClientIdentity, Trust},
};
use tonic::Code;
use x509_parser::prelude::*;

use crate::harness::*;

const ID: &str = "spiffe://sigil.local/ci/build";

/// What a workload holds after enrolling: its chain, key and bundle.
#[derive(Clone, Debug)]
struct Held {
    chain: Vec<Vec<u8>>,
    key: Vec<u8>,
    bundle: Vec<Vec<u8>>,
}

async fn enroll(b: &TestBroker, id: &str) -> Held {
    let (_, tid, secret) = b.token(id, 1, 0).await;
    let (key, csr) = key_and_csr();
    let r = b
        .identity()
        .await
        .enroll(enroll_req(&tid, &secret, &csr, b.now_ms(), &[]))
        .await
        .unwrap()
        .into_inner();
    Held {
        chain: r.x509_svid_chain,
        key: key.serialize_der(),
        bundle: r.trust_bundle,
    }
}

/// An mTLS identity client that trusts the broker through the held bundle.
async fn as_workload(
    b: &TestBroker,
    h: &Held,
) -> Result<IdentityClient<tonic::transport::Channel>, String> {
    let tls = tls_config_with(
        &Trust::Roots(h.bundle.clone()),
        Some(ClientIdentity::from_der(h.chain.clone(), h.key.clone())),
    )
    .unwrap();
    connect_tls(&b.url(), tls)
        .await
        .map(IdentityClient::new)
        .map_err(|e| format!("{e:#}"))
}

async fn renew(
    b: &TestBroker,
    h: &Held,
    aud: &[&str],
) -> Result<(Held, pb::EnrollResponse), tonic::Status> {
    let mut c = as_workload(b, h)
        .await
        .map_err(tonic::Status::unavailable)?;
    let (key, csr) = key_and_csr();
    let r = c
        .renew(pb::RenewRequest {
            csr,
            jwt_audiences: aud.iter().map(|s| s.to_string()).collect(),
        })
        .await?
        .into_inner();
    Ok((
        Held {
            chain: r.x509_svid_chain.clone(),
            key: key.serialize_der(),
            bundle: r.trust_bundle.clone(),
        },
        r,
    ))
}

fn serial_of(der: &[u8]) -> String {
    hex::encode(parse_x509_certificate(der).unwrap().1.raw_serial())
}

fn verifies_against(leaf: &[u8], bundle: &[Vec<u8>]) -> bool {
    let (_, leaf) = parse_x509_certificate(leaf).unwrap();
    bundle.iter().any(|ca| {
        let (_, ca) = parse_x509_certificate(ca).unwrap();
        leaf.verify_signature(Some(ca.public_key())).is_ok()
    })
}

async fn revoke(b: &TestBroker, kind: &str, value: &str) {
    b.admin()
        .await
        .revoke_identity(pb::RevokeIdentityRequest {
            kind: kind.into(),
            value: value.into(),
            reason: "test".into(),
        })
        .await
        .unwrap();
}

async fn rotate(
    b: &TestBroker,
    revoke_old: bool,
    prepare_only: bool,
) -> pb::RotateAuthorityResponse {
    b.admin()
        .await
        .rotate_authority(pb::RotateAuthorityRequest {
            revoke_old,
            prepare_only,
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn renew_happy_path_and_every_denial() {
    let b = TestBroker::start().await;
    let h = enroll(&b, ID).await;
    let (h2, r) = renew(&b, &h, &["api"]).await.unwrap();
    assert_eq!(r.spiffe_id, ID);
    assert_ne!(serial_of(&h2.chain[0]), serial_of(&h.chain[0]));
    assert!(!r.jwt_svid.is_empty());
    assert!(verifies_against(&h2.chain[0], &h2.bundle));
    // The renewed certificate can renew again.
    let (h3, _) = renew(&b, &h2, &[]).await.unwrap();

    // No client certificate.
    let err = b
        .identity()
        .await
        .renew(pb::RenewRequest {
            csr: key_and_csr().1,
            jwt_audiences: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "NOT_AUTHORIZED");

    // Revoked by serial.
    revoke(&b, "serial", &serial_of(&h3.chain[0])).await;
    let err = renew(&b, &h3, &[]).await.unwrap_err();
    assert_eq!(reason(&err), "SVID_REVOKED");
    assert_eq!(err.code(), Code::PermissionDenied);

    // Expired (broker clock past NotAfter; no grace by default).
    b.clock.advance_ms(3_601_000);
    let err = renew(&b, &h2, &[]).await.unwrap_err();
    assert_eq!(reason(&err), "NOT_AUTHORIZED");

    // A certificate from another broker's CA fails the handshake.
    let other = TestBroker::start().await;
    let foreign = enroll(&other, ID).await;
    let mut trust_b = foreign.clone();
    trust_b.bundle = h.bundle.clone();
    let err = renew(&b, &trust_b, &[]).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::Unavailable | Code::Unknown),
        "{err:?}"
    );
}

#[tokio::test]
async fn renewal_grace_comes_from_the_plan() {
    let b = TestBroker::start().await;
    b.admin()
        .await
        .apply_plan(pb::ApplyPlanRequest {
            plan:
                b"admins = [\"spiffe://sigil.local/admin/a\"]\n[limits]\nrenewal_grace = \"2m\"\n"
                    .to_vec(),
        })
        .await
        .unwrap();
    let h = enroll(&b, ID).await;
    b.clock.advance_ms(3_600_000 + 60_000);
    renew(&b, &h, &[]).await.expect("within the 2 min grace");
    b.clock.advance_ms(120_000);
    let err = renew(&b, &h, &[]).await.unwrap_err();
    assert_eq!(reason(&err), "NOT_AUTHORIZED");
}

#[tokio::test]
async fn revoked_spiffe_id_cannot_renew_fetch_or_validate_at_once() {
    let b = TestBroker::start().await;
    let h = enroll(&b, ID).await;
    let mut c = as_workload(&b, &h).await.unwrap();
    let jwt = c
        .fetch_jwt(pb::FetchJwtRequest {
            audiences: vec!["db".into()],
            ttl_seconds: 60,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(jwt.expires_at, b.now_ms() / 1000 + 60);
    let mut anyone = b.identity().await;
    let v = anyone
        .validate_jwt(pb::ValidateJwtRequest {
            token: jwt.jwt_svid.clone(),
            audience: "db".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.spiffe_id, ID);
    let err = anyone
        .validate_jwt(pb::ValidateJwtRequest {
            token: jwt.jwt_svid.clone(),
            audience: "other".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "JWT_INVALID");
    // FetchJWT needs mTLS.
    let err = anyone
        .fetch_jwt(pb::FetchJwtRequest {
            audiences: vec!["db".into()],
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "NOT_AUTHORIZED");

    revoke(&b, "spiffe_id", ID).await;
    // Same instant: everything stops.
    let err = renew(&b, &h, &[]).await.unwrap_err();
    assert_eq!(reason(&err), "SVID_REVOKED");
    let err = c
        .fetch_jwt(pb::FetchJwtRequest {
            audiences: vec!["db".into()],
            ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "SVID_REVOKED");
    let err = anyone
        .validate_jwt(pb::ValidateJwtRequest {
            token: jwt.jwt_svid,
            audience: "db".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "SVID_REVOKED");

    // Revoking one JWT by jti.
    let h2 = enroll(&b, "spiffe://sigil.local/web").await;
    let jwt2 = as_workload(&b, &h2)
        .await
        .unwrap()
        .fetch_jwt(pb::FetchJwtRequest {
            audiences: vec!["db".into()],
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .jwt_svid;
    let claims: serde_json::Value = serde_json::from_str(
        &anyone
            .validate_jwt(pb::ValidateJwtRequest {
                token: jwt2.clone(),
                audience: "db".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .claims_json,
    )
    .unwrap();
    revoke(&b, "jti", claims["jti"].as_str().unwrap()).await;
    let err = anyone
        .validate_jwt(pb::ValidateJwtRequest {
            token: jwt2,
            audience: "db".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "SVID_REVOKED");
}

#[tokio::test]
async fn crl_lists_the_serial_verifies_and_survives_restart() {
    let mut b = TestBroker::start().await;
    let h = enroll(&b, ID).await;
    let serial = serial_of(&h.chain[0]);
    revoke(&b, "serial", &serial).await;
    let crls = b
        .identity()
        .await
        .get_crl(pb::GetCrlRequest {})
        .await
        .unwrap()
        .into_inner()
        .crls;
    assert_eq!(crls.len(), 1);
    let (_, crl) = parse_x509_crl(&crls[0]).unwrap();
    let listed: Vec<String> = crl
        .iter_revoked_certificates()
        .map(|r| hex::encode(r.raw_serial()))
        .collect();
    assert_eq!(listed, vec![serial.clone()]);
    let (_, ca) = parse_x509_certificate(&h.bundle[0]).unwrap();
    crl.verify_signature(ca.public_key()).unwrap();

    // openssl accepts it (when installed).
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("crl.der"), &crls[0]).unwrap();
    let ca_pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &h.bundle[0])
    );
    std::fs::write(dir.path().join("ca.pem"), ca_pem).unwrap();
    if let Ok(o) = std::process::Command::new("openssl")
        .args(["crl", "-inform", "DER", "-in"])
        .arg(dir.path().join("crl.der"))
        .arg("-CAfile")
        .arg(dir.path().join("ca.pem"))
        .arg("-noout")
        .output()
    {
        let text =
            String::from_utf8_lossy(&o.stderr).to_string() + &String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success() && text.contains("verify OK"), "{text}");
    }
    // The data dir's crl.der follows the revocation.
    let t = std::time::Instant::now();
    loop {
        if let Ok(bytes) = std::fs::read(b.data_dir().join("crl.der")) {
            if bytes == crls[0] {
                break;
            }
        }
        assert!(t.elapsed().as_secs() < 10, "crl.der not written");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // Revocation survives a restart.
    b.restart().await;
    let err = renew(&b, &h, &[]).await.unwrap_err();
    assert_eq!(reason(&err), "SVID_REVOKED");
    let list = b
        .admin()
        .await
        .list_revocations(pb::ListRevocationsRequest {})
        .await
        .unwrap()
        .into_inner()
        .revocations;
    assert!(list.iter().any(|r| r.kind == "serial" && r.value == serial));
}

#[tokio::test]
async fn forced_rotation_while_32_clients_renew_has_no_failures() {
    let b = TestBroker::start().await;
    let mut clients = Vec::new();
    for i in 0..32 {
        clients.push(enroll(&b, &format!("spiffe://sigil.local/w/{i}")).await);
    }
    let b = std::sync::Arc::new(b);
    let seq0 = b
        .identity()
        .await
        .get_bundle(pb::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner()
        .sequence;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for h in clients {
        let b = b.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut held = h;
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || n < 3 {
                let (next, _) = renew(&b, &held, &[])
                    .await
                    .map_err(|e| format!("renewal {n}: {e:?}"))?;
                if !verifies_against(&next.chain[0], &next.bundle) {
                    return Err(
                        "certificate does not verify against the bundle it came with".into(),
                    );
                }
                held = next;
                n += 1;
            }
            Ok::<_, String>((n, held))
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let r = rotate(&b, false, false).await;
    assert!(r.activated);
    assert_eq!((r.old_generation, r.new_generation), (1, 2));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut helds = Vec::new();
    for t in tasks {
        let (n, held) = t.await.unwrap().unwrap();
        assert!(n >= 3);
        helds.push(held);
    }
    // Certificates issued after the rotation come from generation 2.
    let bundle = b
        .identity()
        .await
        .get_bundle(pb::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(bundle.sequence > seq0);
    assert_eq!(
        bundle.x509_authorities.len(),
        2,
        "old CA stays during the overlap"
    );
    let new_ca = &bundle.x509_authorities[0];
    assert!(helds
        .iter()
        .all(|h| verifies_against(&h.chain[0], std::slice::from_ref(new_ca))));

    // After the overlap the old generation leaves the bundle. (Read in
    // process: the mock clock is an hour ahead of the TLS layer's real clock.)
    b.clock.advance_ms(3_600_000 + 1000);
    assert!(b.running().broker.maintain().await.unwrap());
    let after = b.running().broker.bundle();
    assert!(after.sequence > bundle.sequence);
    assert_eq!(after.x509_authorities, vec![new_ca.clone()]);
}

#[tokio::test]
async fn jwt_from_a_key_first_seen_as_prepared_validates_after_activation() {
    let b = TestBroker::start().await;
    let h = enroll(&b, ID).await;
    let mut anyone = b.identity().await;
    let mut watch = anyone
        .watch_bundle(pb::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();

    let p = rotate(&b, false, true).await;
    assert!(!p.activated);
    let prepared = watch.message().await.unwrap().unwrap();
    assert!(
        prepared.sequence > first.sequence,
        "watch pushes the change"
    );
    let jwks: serde_json::Value = serde_json::from_str(&prepared.spiffe_bundle_json).unwrap();
    let jwt_keys: Vec<serde_json::Value> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "jwt-svid")
        .cloned()
        .collect();
    assert_eq!(jwt_keys.len(), 2);

    let a = rotate(&b, false, false).await;
    assert!(a.activated && a.new_generation == p.new_generation);
    let activated = watch.message().await.unwrap().unwrap();
    assert!(activated.sequence > prepared.sequence);

    let token = as_workload(&b, &h)
        .await
        .unwrap()
        .fetch_jwt(pb::FetchJwtRequest {
            audiences: vec!["api".into()],
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .jwt_svid;
    // A relying party that only has the bundle from the *prepare* step validates it.
    let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
    let key = jwt_keys
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .expect("kid published at prepare time");
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(key.clone()).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&["api"]);
    jsonwebtoken::decode::<serde_json::Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(),
        &v,
    )
    .unwrap();
    anyone
        .validate_jwt(pb::ValidateJwtRequest {
            token,
            audience: "api".into(),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn compromise_rotation_revokes_everything_the_old_key_signed() {
    let b = TestBroker::start().await;
    let h = enroll(&b, ID).await;
    let old_jwt = as_workload(&b, &h)
        .await
        .unwrap()
        .fetch_jwt(pb::FetchJwtRequest {
            audiences: vec!["api".into()],
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .jwt_svid;
    let r = rotate(&b, true, false).await;
    assert!(r.activated);
    let bundle = b
        .identity()
        .await
        .get_bundle(pb::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        bundle.x509_authorities.len(),
        1,
        "tainted CA dropped at once"
    );
    // Old certificate: the handshake no longer trusts its CA.
    let mut fresh = h.clone();
    fresh.bundle = bundle.x509_authorities.clone();
    assert!(renew(&b, &fresh, &[]).await.is_err());
    let err = b
        .identity()
        .await
        .validate_jwt(pb::ValidateJwtRequest {
            token: old_jwt,
            audience: "api".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "JWT_INVALID");
    let list = b
        .admin()
        .await
        .list_revocations(pb::ListRevocationsRequest {})
        .await
        .unwrap()
        .into_inner()
        .revocations;
    assert!(list
        .iter()
        .any(|r| r.kind == "ca_generation" && r.value == "1"));
}

#[tokio::test]
async fn revoked_admin_certificate_is_refused() {
    let b = TestBroker::start().await;
    b.admin()
        .await
        .apply_plan(pb::ApplyPlanRequest {
            plan: b"admins = [\"spiffe://sigil.local/admin/a\"]\n".to_vec(),
        })
        .await
        .unwrap();
    let h = enroll(&b, "spiffe://sigil.local/admin/a").await;
    let mut a = AdminClient::new(b.mtls(h.chain.clone(), h.key.clone()).await);
    a.get_status(pb::GetStatusRequest {}).await.unwrap();
    revoke(&b, "spiffe_id", "spiffe://sigil.local/admin/a").await;
    let err = a.get_status(pb::GetStatusRequest {}).await.unwrap_err();
    assert_eq!(reason(&err), "SVID_REVOKED");
}
