//! Abuse limits, slow clients, metrics, JSON logs and audit fail-closed.

use std::time::{Duration, Instant};

use sigil::{api::pb, ratelimit::Cidr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

const ID: &str = "spiffe://sigil.local/ci/build";

fn from(ip: &str, mut req: pb::EnrollRequest) -> tonic::Request<pb::EnrollRequest> {
    let _ = &mut req;
    let mut r = tonic::Request::new(req);
    r.metadata_mut()
        .insert("x-forwarded-for", ip.parse().unwrap());
    r
}

#[tokio::test]
async fn brute_force_from_one_address_is_throttled_while_another_enrolls() {
    let b =
        TestBroker::start_with(|c| c.trusted_proxies = vec![Cidr::parse("127.0.0.1/32").unwrap()])
            .await;
    let (_, id, _) = b.token(ID, 1, 0).await;
    let (_, csr) = key_and_csr();
    let wrong =
        sigil::token::TokenKey::new(sigil::secret::Secret::new(vec![1; 32])).derive_secret(&id);
    let mut c = b.identity().await;
    let mut limited = 0;
    let mut first_limited = None;
    for i in 0..1000 {
        let err = c
            .enroll(from(
                "10.0.0.1",
                enroll_req(&id, &wrong, &csr, b.now_ms(), &[]),
            ))
            .await
            .unwrap_err();
        match reason(&err).as_str() {
            "INVALID_SIGNATURE" => {}
            "RATE_LIMITED" => {
                limited += 1;
                first_limited.get_or_insert(i);
                assert_eq!(err.code(), tonic::Code::ResourceExhausted);
                let (_, md) = sigil::api::status::error_info(&err).unwrap();
                assert!(md["retry_after_ms"].parse::<u64>().unwrap() > 0);
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        first_limited.unwrap() <= 20,
        "throttled after the failure budget"
    );
    assert!(limited >= 970);
    // Another address enrolls normally meanwhile.
    let (_, id2, secret2) = b.token(ID, 1, 0).await;
    c.enroll(from(
        "10.0.0.2",
        enroll_req(&id2, &secret2, &csr, b.now_ms(), &[]),
    ))
    .await
    .unwrap();
    // The throttled address recovers once its budget refills.
    b.clock.advance_ms(30_000);
    let (_, id3, secret3) = b.token(ID, 1, 0).await;
    c.enroll(from(
        "10.0.0.1",
        enroll_req(&id3, &secret3, &csr, b.now_ms(), &[]),
    ))
    .await
    .unwrap();
    // An untrusted peer cannot pick its address: without the proxy trust
    // the header is ignored and the loopback address is what counts.
    let b2 = TestBroker::start_with(|c| c.rates.exempt.clear()).await;
    let (_, id4, secret4) = b2.token(ID, 1, 0).await;
    let mut c2 = b2.identity().await;
    for _ in 0..25 {
        let _ = c2
            .enroll(from(
                "10.9.9.9",
                enroll_req(&id4, &wrong, &csr, b2.now_ms(), &[]),
            ))
            .await;
    }
    let err = c2
        .enroll(from(
            "10.8.8.8",
            enroll_req(&id4, &secret4, &csr, b2.now_ms(), &[]),
        ))
        .await
        .unwrap_err();
    assert_eq!(
        reason(&err),
        "RATE_LIMITED",
        "x-forwarded-for from an untrusted peer is ignored"
    );
}

#[tokio::test]
async fn slow_handshakes_are_cut_off_while_normal_clients_are_served() {
    let b = TestBroker::start_with(|c| c.handshake_timeout = Duration::from_millis(500)).await;
    let mut idle = Vec::new();
    for _ in 0..20 {
        let mut s = tokio::net::TcpStream::connect(b.running().addr)
            .await
            .unwrap();
        // Half a TLS record header, then silence.
        s.write_all(&[0x16, 0x03]).await.unwrap();
        idle.push(s);
    }
    // A normal client is served while they hang.
    let (_, id, secret) = b.token(ID, 1, 0).await;
    let (_, csr) = key_and_csr();
    b.identity()
        .await
        .enroll(enroll_req(&id, &secret, &csr, b.now_ms(), &[]))
        .await
        .unwrap();
    // Each slow connection is closed by the server soon after the timeout.
    let t = Instant::now();
    for mut s in idle {
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .expect("closed by the server");
        assert!(matches!(n, Ok(0) | Err(_)));
    }
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn audit_fails_closed_no_unaudited_certificate_is_issued() {
    let b = TestBroker::start().await;
    let (_, id, secret) = b.token(ID, 1, 0).await;
    let db = b.data_dir().join("sigil.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER no_audit BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'audit disk full'); END;",
    )
    .unwrap();
    let (_, csr) = key_and_csr();
    let before = b.counts().await;
    let err = b
        .identity()
        .await
        .enroll(enroll_req(&id, &secret, &csr, b.now_ms(), &[]))
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), tonic::Code::Unavailable | tonic::Code::Internal),
        "{err:?}"
    );
    let after = b.counts().await;
    assert_eq!(
        after.issued, before.issued,
        "nothing issued without its audit row"
    );
    assert_eq!(
        after.nonces, before.nonces,
        "the nonce was not consumed either"
    );
    // Once the audit store works again the same token still works.
    conn.execute_batch("DROP TRIGGER no_audit;").unwrap();
    b.identity()
        .await
        .enroll(enroll_req(&id, &secret, &csr, b.now_ms(), &[]))
        .await
        .unwrap();
}
