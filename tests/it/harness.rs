//! Test harness: a real broker (real TLS on loopback, real SQLite file) in a
//! temp dir with a mock clock, and clients built from the generated code.

use std::{path::PathBuf, sync::Arc};

use sigil::{
    api::pb::{self, admin_client::AdminClient, identity_client::IdentityClient},
    clock::{Clock, MockClock},
    config::Config,
    server::{self, Running},
    token::{self, TokenSecret},
};
use tonic::transport::Channel;

pub struct TestBroker {
    pub dir: tempfile::TempDir,
    pub clock: MockClock,
    pub running: Option<Running>,
    tweak: Arc<dyn Fn(&mut Config) + Send + Sync>,
}

impl TestBroker {
    /// Test defaults: an ephemeral port, and loopback exempt from rate
    /// limits (every test client is on loopback; the rate-limit tests use
    /// other addresses through a trusted proxy, or clear the exemption).
    pub fn config(&self) -> Config {
        let mut cfg = Config::with_data_dir(self.dir.path().join("data"));
        cfg.listen = "127.0.0.1:0".parse().unwrap();
        cfg.rates.exempt = vec![sigil::ratelimit::Cidr::parse("127.0.0.0/8").unwrap()];
        cfg
    }

    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl Fn(&mut Config) + Send + Sync + 'static) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let clock = MockClock::starting_now();
        let mut b = Self {
            dir,
            clock,
            running: None,
            tweak: Arc::new(tweak),
        };
        b.boot().await;
        b
    }

    async fn boot(&mut self) {
        let mut cfg = self.config();
        (self.tweak)(&mut cfg);
        let running = server::start(cfg, Arc::new(self.clock.clone()))
            .await
            .expect("server starts");
        self.running = Some(running);
    }

    pub async fn restart(&mut self) {
        self.running.take().unwrap().shutdown().await.unwrap();
        self.boot().await;
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().unwrap()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.running().addr.port())
    }

    pub async fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.tls().await)
    }

    /// A TLS channel presenting a client certificate (mTLS).
    pub async fn mtls(&self, chain: Vec<Vec<u8>>, key_pkcs8: Vec<u8>) -> Channel {
        let trust = sigil::cli::Trust::from_pin(&self.running().ca_pin).unwrap();
        let id = sigil::cli::ClientIdentity::from_der(chain, key_pkcs8);
        sigil::cli::connect_tls(
            &self.url(),
            sigil::cli::tls_config_with(&trust, Some(id)).unwrap(),
        )
        .await
        .unwrap()
    }

    /// A TLS channel without a client certificate, pinned to the broker's
    /// current serving CA. After a rotation the server switches its
    /// certificate asynchronously (milliseconds), so connecting retries briefly.
    pub async fn tls(&self) -> Channel {
        let mut last = None;
        for _ in 0..100 {
            let trust = sigil::cli::Trust::from_pin(&self.running().broker.ca_pin()).unwrap();
            match sigil::cli::connect_tls(&self.url(), sigil::cli::tls_config(&trust).unwrap())
                .await
            {
                Ok(ch) => return ch,
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("cannot connect: {last:?}");
    }

    /// Enrolls `token` with a fresh key; returns (chain DER, PKCS#8 key DER).
    pub async fn enroll_with_token(&self, token: &str) -> (Vec<Vec<u8>>, Vec<u8>) {
        let (id, secret) = token::parse_token(token).unwrap();
        let (key, csr) = key_and_csr();
        let r = self
            .identity()
            .await
            .enroll(enroll_req(&id, &secret, &csr, self.now_ms(), &[]))
            .await
            .unwrap()
            .into_inner();
        (r.x509_svid_chain, key.serialize_der())
    }

    /// The generated bootstrap secret of this broker.
    pub fn bootstrap_secret(&self) -> Vec<u8> {
        let text = std::fs::read(self.data_dir().join("bootstrap_secret")).unwrap();
        sigil::server::decode_bootstrap(&text, "test")
            .unwrap()
            .expose()
            .to_vec()
    }

    /// The generated bootstrap secret file's value, or empty when none was generated.
    pub fn bootstrap_secret_or_empty(&self) -> Vec<u8> {
        if self.data_dir().join("bootstrap_secret").exists() {
            self.bootstrap_secret()
        } else {
            vec![0u8; 32]
        }
    }

    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(
            sigil::cli::connect_admin(self.running().admin_socket.clone())
                .await
                .unwrap(),
        )
    }

    /// Creates a token; returns (token string, id, secret).
    pub async fn token(
        &self,
        spiffe_id: &str,
        uses: u32,
        ttl: u32,
    ) -> (String, String, TokenSecret) {
        let r = self
            .admin()
            .await
            .create_enrollment_token(pb::CreateEnrollmentTokenRequest {
                spiffe_id: spiffe_id.into(),
                ttl_seconds: ttl,
                max_uses: uses,
            })
            .await
            .unwrap()
            .into_inner();
        let (id, secret) = token::parse_token(&r.token).unwrap();
        assert_eq!(id, r.token_id);
        (r.token, id, secret)
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    pub async fn counts(&self) -> sigil::store::StoreCounts {
        self.running().broker.store().counts().await.unwrap()
    }
}

pub fn key_and_csr() -> (rcgen::KeyPair, Vec<u8>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    (key, csr.der().to_vec())
}

pub fn csr_for(key: &rcgen::KeyPair) -> Vec<u8> {
    rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(key)
        .unwrap()
        .der()
        .to_vec()
}

/// An enroll request with a correctly signed payload.
pub fn enroll_req(
    id: &str,
    secret: &TokenSecret,
    csr: &[u8],
    now_ms: i64,
    aud: &[&str],
) -> pb::EnrollRequest {
    pb::EnrollRequest {
        csr: csr.to_vec(),
        credential: Some(pb::enroll_request::Credential::Token(
            sigil::cli::token_proof(id, secret, csr, now_ms),
        )),
        jwt_audiences: aud.iter().map(|s| s.to_string()).collect(),
    }
}

/// An enroll request with an arbitrary payload, correctly HMAC-signed.
pub fn signed_raw(
    id: &str,
    secret: &TokenSecret,
    csr: &[u8],
    payload: Vec<u8>,
) -> pb::EnrollRequest {
    pb::EnrollRequest {
        csr: csr.to_vec(),
        credential: Some(pb::enroll_request::Credential::Token(pb::TokenProof {
            token_id: id.into(),
            signature: secret.sign(&payload),
            payload,
        })),
        jwt_audiences: vec![],
    }
}

pub fn reason(s: &tonic::Status) -> String {
    sigil::api::status::error_info(s)
        .map(|(r, _)| r)
        .unwrap_or_else(|| format!("<no ErrorInfo: {:?}>", s.code()))
}
