//! Enrollment without a secret: Nitro attestation documents and CI /
//! Kubernetes OIDC tokens, with server challenges, plan entries and
//! one-use guards, over real TLS.

use sha2::{Digest, Sha256};
use sigil::{
    api::pb,
    attest::{
        registry::AttestConfig,
        testing::{NitroPki, OidcTestIssuer, Opt},
        Preset,
    },
};
use tonic::Code;

use crate::harness::*;

const PCR0: [u8; 48] = [0x11; 48];

struct World {
    b: TestBroker,
    pki: std::sync::Arc<NitroPki>,
    gh: std::sync::Arc<OidcTestIssuer>,
    gl: std::sync::Arc<OidcTestIssuer>,
    k8s: std::sync::Arc<OidcTestIssuer>,
}

fn plan() -> Vec<u8> {
    format!(
        r#"admins = ["spiffe://sigil.local/admin/a"]
[[entries]]
spiffe_id = "spiffe://sigil.local/enclave/payments"
selectors = ["aws_nitro:pcr0:{}"]
x509_ttl = "30m"
[[entries]]
spiffe_id = "spiffe://sigil.local/ci/deploy"
selectors = ["oidc:gh:repository:org/repo", "oidc:gh:ref:refs/heads/main"]
[[entries]]
spiffe_id = "spiffe://sigil.local/ci/any-branch"
selectors = ["oidc:gh:repository:org/repo"]
[[entries]]
spiffe_id = "spiffe://sigil.local/ci/gitlab"
selectors = ["oidc:gl:project_path:grp/proj", "oidc:gl:ref_protected:true"]
[[entries]]
spiffe_id = "spiffe://sigil.local/k8s/api"
selectors = ["oidc:k8s:kubernetes.io/namespace:prod", "oidc:k8s:kubernetes.io/serviceaccount/name:api"]
"#,
        hex::encode(PCR0)
    )
    .into_bytes()
}

async fn world() -> World {
    let pki = std::sync::Arc::new(NitroPki::new());
    let gh = std::sync::Arc::new(OidcTestIssuer::rsa(
        "gh",
        "https://token.actions.githubusercontent.com",
    ));
    let gl = std::sync::Arc::new(OidcTestIssuer::rsa("gl", "https://gitlab.example.com"));
    let k8s = std::sync::Arc::new(OidcTestIssuer::ec("k8s", "https://kubernetes.default.svc"));
    let cfg = AttestConfig {
        nitro: Some(pki.nitro_config()),
        oidc: vec![
            gh.config(&["sigil"], Preset::GithubActions.claims()),
            gl.config(&["sigil"], Preset::GitlabCi.claims()),
            k8s.config(&["sigil"], Preset::Kubernetes.claims()),
        ],
    };
    let b = TestBroker::start_with(move |c| c.attest = cfg.clone()).await;
    b.admin()
        .await
        .apply_plan(pb::ApplyPlanRequest { plan: plan() })
        .await
        .unwrap();
    World {
        b,
        pki,
        gh,
        gl,
        k8s,
    }
}

fn attest_req(format: &str, document: Vec<u8>, csr: &[u8]) -> pb::EnrollRequest {
    pb::EnrollRequest {
        csr: csr.to_vec(),
        credential: Some(pb::enroll_request::Credential::Attestation(
            pb::Attestation {
                format: format.into(),
                document,
            },
        )),
        jwt_audiences: vec!["api".into()],
    }
}

fn spki_of(key: &rcgen::KeyPair) -> Vec<u8> {
    rcgen::PublicKeyData::subject_public_key_info(key)
}

async fn challenge(w: &World) -> Vec<u8> {
    let c =
        w.b.identity()
            .await
            .get_challenge(pb::GetChallengeRequest {})
            .await
            .unwrap()
            .into_inner();
    assert_eq!(c.nonce.len(), 32);
    assert!(c.formats.contains(&"aws_nitro".to_owned()) && c.formats.contains(&"oidc".to_owned()));
    c.nonce
}

#[tokio::test]
async fn nitro_document_bound_to_the_key_enrolls_once() {
    let w = world().await;
    let (key, csr) = key_and_csr();
    let nonce = challenge(&w).await;
    let doc = w
        .pki
        .document()
        .timestamp_ms(w.b.now_ms() as u64)
        .nonce(Opt::Bytes(nonce))
        .public_key(Opt::Bytes(spki_of(&key)))
        .build();
    let mut c = w.b.identity().await;
    let r = c
        .enroll(attest_req("aws_nitro", doc.clone(), &csr))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.spiffe_id, "spiffe://sigil.local/enclave/payments");
    assert_eq!(r.expires_at, w.b.now_ms() / 1000 + 1800, "entry TTL");
    assert!(!r.jwt_svid.is_empty());
    // The same document again: the challenge is consumed.
    let err = c
        .enroll(attest_req("aws_nitro", doc, &csr))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "NONCE_REPLAYED");
    // The audit row names format, entry and node; never the document.
    let rows =
        w.b.admin()
            .await
            .list_audit_events(pb::ListAuditEventsRequest {
                after_seq: 0,
                limit: 100,
            })
            .await
            .unwrap()
            .into_inner()
            .events;
    let issued = rows.iter().find(|e| e.kind == "issued").unwrap();
    assert!(issued.fields_json.contains("aws_nitro") && !issued.fields_json.contains("module_id"));
    assert!(issued
        .fields_json
        .contains(sigil::attest::testing::MODULE_ID));
}

#[tokio::test]
async fn nitro_user_data_binding_and_every_bad_input() {
    let w = world().await;
    let (key, csr) = key_and_csr();
    let mut c = w.b.identity().await;
    let now = w.b.now_ms() as u64;
    // user_data = SHA-256(CSR) also binds.
    let nonce = challenge(&w).await;
    let doc = w
        .pki
        .document()
        .timestamp_ms(now)
        .nonce(Opt::Bytes(nonce))
        .user_data(Opt::Bytes(Sha256::digest(&csr).to_vec()))
        .build();
    c.enroll(attest_req("aws_nitro", doc, &csr)).await.unwrap();

    let other_root = NitroPki::new();
    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    let n = challenge(&w).await;
    let good = |n: &[u8]| {
        w.pki
            .document()
            .timestamp_ms(now)
            .nonce(Opt::Bytes(n.to_vec()))
            .public_key(Opt::Bytes(spki_of(&key)))
    };
    cases.push((
        "malformed CBOR",
        b"\x84\x44garbage".to_vec(),
        "ATTESTATION_INVALID",
    ));
    cases.push((
        "wrong algorithm",
        good(&n).protected(vec![0xa1, 0x01, 0x26]).build(),
        "ATTESTATION_INVALID",
    ));
    cases.push((
        "bad signature",
        {
            let mut d = good(&n).build();
            let l = d.len();
            d[l - 5] ^= 1;
            d
        },
        "ATTESTATION_INVALID",
    ));
    cases.push((
        "unknown root",
        other_root
            .document()
            .timestamp_ms(now)
            .nonce(Opt::Bytes(n.clone()))
            .public_key(Opt::Bytes(spki_of(&key)))
            .build(),
        "ATTESTATION_INVALID",
    ));
    cases.push((
        "stale",
        good(&n).timestamp_ms(now - 301_000).build(),
        "ATTESTATION_INVALID",
    ));
    cases.push((
        "future",
        good(&n).timestamp_ms(now + 301_000).build(),
        "ATTESTATION_INVALID",
    ));
    cases.push((
        "unknown challenge",
        good(&[7u8; 32]).build(),
        "ATTESTATION_INVALID",
    ));
    cases.push((
        "key binding mismatch",
        good(&n)
            .public_key(Opt::Bytes(spki_of(&rcgen::KeyPair::generate().unwrap())))
            .build(),
        "ATTESTATION_INVALID",
    ));
    cases.push((
        "debug enclave",
        good(&n)
            .pcrs((0..3).map(|i| (i, vec![0u8; 48])).collect())
            .build(),
        "ATTESTATION_INVALID",
    ));
    cases.push((
        "unmatched PCRs",
        good(&n)
            .pcrs((0..3).map(|i| (i, vec![0x42u8; 48])).collect())
            .build(),
        "ATTESTATION_NO_MATCHING_ENTRY",
    ));
    cases.push(("oversize", vec![0u8; 20 * 1024], "MALFORMED_REQUEST"));
    for (name, doc, want) in cases {
        let before = w.b.counts().await;
        let err = c
            .enroll(attest_req("aws_nitro", doc, &csr))
            .await
            .expect_err(name);
        assert_eq!(reason(&err), want, "{name}: {err:?}");
        let after = w.b.counts().await;
        assert_eq!(
            (after.issued, after.audit),
            (before.issued, before.audit + 1),
            "{name}"
        );
    }
    // The challenge survived every refusal and still works once.
    c.enroll(attest_req("aws_nitro", good(&n).build(), &csr))
        .await
        .unwrap();
    // Unknown format.
    let err = c
        .enroll(attest_req("tpm", vec![1], &csr))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "MALFORMED_REQUEST");
    // An expired challenge.
    let n = challenge(&w).await;
    w.b.clock.advance_ms(301_000);
    let doc = w
        .pki
        .document()
        .timestamp_ms(w.b.now_ms() as u64)
        .nonce(Opt::Bytes(n))
        .public_key(Opt::Bytes(spki_of(&key)))
        .build();
    let err = c
        .enroll(attest_req("aws_nitro", doc, &csr))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "ATTESTATION_INVALID");
    assert!(err.message().contains("expired"), "{}", err.message());
}

#[tokio::test]
async fn concurrent_redemption_of_one_challenge_has_one_winner() {
    let w = world().await;
    let (key, csr) = key_and_csr();
    let n = challenge(&w).await;
    let doc = w
        .pki
        .document()
        .timestamp_ms(w.b.now_ms() as u64)
        .nonce(Opt::Bytes(n))
        .public_key(Opt::Bytes(spki_of(&key)))
        .build();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut c = w.b.identity().await;
        let req = attest_req("aws_nitro", doc.clone(), &csr);
        tasks.push(tokio::spawn(async move { c.enroll(req).await }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(reason(&e), "NONCE_REPLAYED"),
        }
    }
    assert_eq!(ok, 1);
}

#[tokio::test]
async fn ci_and_kubernetes_tokens_map_to_their_entries() {
    let w = world().await;
    let (_, csr) = key_and_csr();
    let mut c = w.b.identity().await;
    let now = w.b.now_ms();
    let mut gh =
        w.gh.standard_claims("repo:org/repo:ref:refs/heads/main", "sigil", now, "gh-1");
    gh["repository"] = "org/repo".into();
    gh["ref"] = "refs/heads/main".into();
    gh["workflow"] = "deploy".into();
    let r = c
        .enroll(attest_req("oidc", w.gh.mint(&gh).into_bytes(), &csr))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.spiffe_id, "spiffe://sigil.local/ci/deploy",
        "most specific entry"
    );
    let mut dev = gh.clone();
    dev["ref"] = "refs/heads/dev".into();
    dev["jti"] = "gh-2".into();
    let r = c
        .enroll(attest_req("oidc", w.gh.mint(&dev).into_bytes(), &csr))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.spiffe_id, "spiffe://sigil.local/ci/any-branch");

    let mut gl = w.gl.standard_claims(
        "project_path:grp/proj:ref_type:branch:ref:main",
        "sigil",
        now,
        "gl-1",
    );
    gl["project_path"] = "grp/proj".into();
    gl["ref_protected"] = "true".into();
    let r = c
        .enroll(attest_req("oidc", w.gl.mint(&gl).into_bytes(), &csr))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.spiffe_id, "spiffe://sigil.local/ci/gitlab");

    let mut k = w
        .k8s
        .standard_claims("system:serviceaccount:prod:api", "sigil", now, "k8s-1");
    k["kubernetes.io"] = serde_json::json!({"namespace": "prod", "serviceaccount": {"name": "api", "uid": "u"}, "pod": {"name": "api-1", "uid": "p"}});
    let r = c
        .enroll(attest_req("oidc", w.k8s.mint(&k).into_bytes(), &csr))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.spiffe_id, "spiffe://sigil.local/k8s/api");

    // Bad tokens.
    let fresh = |jti: &str| {
        let mut c =
            w.gh.standard_claims("repo:org/repo:ref:refs/heads/main", "sigil", now, jti);
        c["repository"] = "org/repo".into();
        c
    };
    let mut cases: Vec<(&str, String, &str)> = vec![
        ("reused jti", w.gh.mint(&gh), "NONCE_REPLAYED"),
        (
            "alg none",
            w.gh.mint_with_header(
                &serde_json::json!({"alg": "none", "kid": w.gh.kid()}),
                &fresh("n1"),
            ),
            "ATTESTATION_INVALID",
        ),
        (
            "HS256 with the public key",
            w.gh.mint_hs256_with_public_key(&fresh("n2")),
            "ATTESTATION_INVALID",
        ),
        (
            "unknown kid",
            w.gh.mint_with_header(
                &serde_json::json!({"alg": "RS256", "kid": "nope"}),
                &fresh("n3"),
            ),
            "ATTESTATION_INVALID",
        ),
        (
            "wrong aud",
            {
                let mut x = fresh("n4");
                x["aud"] = "other".into();
                w.gh.mint(&x)
            },
            "ATTESTATION_INVALID",
        ),
        (
            "expired",
            {
                let mut x = fresh("n5");
                x["exp"] = (now / 1000 - 120).into();
                w.gh.mint(&x)
            },
            "ATTESTATION_INVALID",
        ),
        (
            "iat outside window",
            {
                let mut x = fresh("n6");
                x["iat"] = (now / 1000 - 400).into();
                w.gh.mint(&x)
            },
            "ATTESTATION_INVALID",
        ),
        (
            "unmatched selectors",
            {
                let mut x = fresh("n7");
                x["repository"] = "evil/repo".into();
                w.gh.mint(&x)
            },
            "ATTESTATION_NO_MATCHING_ENTRY",
        ),
    ];
    for (name, token, want) in cases.drain(..) {
        let err = c
            .enroll(attest_req("oidc", token.into_bytes(), &csr))
            .await
            .expect_err(name);
        assert_eq!(reason(&err), want, "{name}: {err:?}");
        assert_eq!(
            err.code(),
            if want == "NONCE_REPLAYED" {
                Code::Unauthenticated
            } else {
                Code::PermissionDenied
            }
        );
    }
    // The raw JWT never reaches the audit trail.
    let rows =
        w.b.admin()
            .await
            .list_audit_events(pb::ListAuditEventsRequest {
                after_seq: 0,
                limit: 500,
            })
            .await
            .unwrap()
            .into_inner()
            .events;
    let token = w.gh.mint(&gh);
    let sig = token.rsplit('.').next().unwrap();
    assert!(rows.iter().all(|r| !r.fields_json.contains(sig)));
}

#[tokio::test]
async fn jti_reuse_is_refused_across_a_restart_and_node_revocation_bars_enrollment() {
    let mut w = world().await;
    let (_, csr) = key_and_csr();
    let mut gh = w.gh.standard_claims(
        "repo:org/repo:ref:refs/heads/main",
        "sigil",
        w.b.now_ms(),
        "once",
    );
    gh["repository"] = "org/repo".into();
    let token = w.gh.mint(&gh);
    w.b.identity()
        .await
        .enroll(attest_req("oidc", token.clone().into_bytes(), &csr))
        .await
        .unwrap();
    w.b.restart().await;
    let err =
        w.b.identity()
            .await
            .enroll(attest_req("oidc", token.into_bytes(), &csr))
            .await
            .unwrap_err();
    assert_eq!(reason(&err), "NONCE_REPLAYED");

    // Revoke the GitHub subject as a node: it can no longer enroll.
    w.b.admin()
        .await
        .revoke_identity(pb::RevokeIdentityRequest {
            kind: "node".into(),
            value: "gh:repo:org/repo:ref:refs/heads/main".into(),
            reason: "compromised runner".into(),
        })
        .await
        .unwrap();
    let mut again = gh.clone();
    again["jti"] = "twice".into();
    let err =
        w.b.identity()
            .await
            .enroll(attest_req("oidc", w.gh.mint(&again).into_bytes(), &csr))
            .await
            .unwrap_err();
    assert_eq!(reason(&err), "ATTESTATION_INVALID");
    assert!(err.message().contains("revoked"));
}

/// A tiny HTTPS server answering every request with the current body.
async fn jwks_server(
    body: std::sync::Arc<std::sync::Mutex<String>>,
) -> (String, tempfile::TempDir) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                break;
            };
            let acceptor = acceptor.clone();
            let body = body.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                let b = body.lock().unwrap().clone();
                let resp = format!("HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len());
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (format!("https://localhost:{port}/.well-known/jwks"), dir)
}

#[tokio::test]
async fn jwks_fetched_from_the_issuer_url_and_refreshed_on_rotation() {
    let old = OidcTestIssuer::rsa("gh", "https://token.actions.githubusercontent.com");
    let new = OidcTestIssuer::rsa("gh", "https://token.actions.githubusercontent.com");
    let body = std::sync::Arc::new(std::sync::Mutex::new(old.jwks_json()));
    let (url, ca_dir) = jwks_server(body.clone()).await;
    let mut issuer = old.config(&["sigil"], Preset::GithubActions.claims());
    issuer.jwks_json = String::new();
    let source = sigil::jwks::JwksSource {
        alias: "gh".into(),
        url,
        ca_file: Some(ca_dir.path().join("ca.pem")),
        refresh: std::time::Duration::from_millis(200),
    };
    let b = TestBroker::start_with(move |c| {
        c.attest = AttestConfig {
            nitro: None,
            oidc: vec![issuer.clone()],
        };
        c.jwks_sources = vec![source.clone()];
    })
    .await;
    b.admin()
        .await
        .apply_plan(pb::ApplyPlanRequest { plan: plan() })
        .await
        .unwrap();
    let (_, csr) = key_and_csr();
    let token = |iss: &OidcTestIssuer, jti: &str| {
        let mut c = iss.standard_claims(
            "repo:org/repo:ref:refs/heads/main",
            "sigil",
            b.now_ms(),
            jti,
        );
        c["repository"] = "org/repo".into();
        iss.mint(&c).into_bytes()
    };
    let mut c = b.identity().await;
    c.enroll(attest_req("oidc", token(&old, "a"), &csr))
        .await
        .unwrap();
    let err = c
        .enroll(attest_req("oidc", token(&new, "b"), &csr))
        .await
        .unwrap_err();
    assert!(err.message().contains("unknown kid"), "{}", err.message());
    // The issuer rotates its keys; the broker picks them up on its next refresh.
    *body.lock().unwrap() = new.jwks_json();
    let t = std::time::Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        match c
            .enroll(attest_req("oidc", token(&new, &format!("c{n}")), &csr))
            .await
        {
            Ok(_) => break,
            Err(e) => assert!(t.elapsed().as_secs() < 5, "not refreshed: {e:?}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
