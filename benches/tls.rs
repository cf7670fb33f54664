//! Micro-benchmarks of one full TLS handshake, client and server in one
//! thread with the records moved in memory (`sigil::tls::pump`), so only the
//! handshake's CPU is timed: no sockets, no HTTP/2. `handshake/sigil` uses
//! the broker's serving configuration (`DynamicTls`) and the CLI's pinned
//! client configuration (resumption off, as a first-boot workload); the
//! other two change one parameter each on the same certificates, so their
//! ratios show what each choice of `sigil::tls::crypto_provider` costs or
//! saves. Run with `cargo bench --bench tls`.

use std::{hint::black_box, sync::Arc, time::Duration};

use criterion::{criterion_group, criterion_main, Criterion};
use rustls::{
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName},
    ClientConfig, ClientConnection, NamedGroup, RootCertStore, ServerConfig, ServerConnection,
};
use sigil::{
    ca::ring::{Authority, RingOptions},
    cli::{spki_sha256, tls_config, Trust},
    clock::{Clock, SystemClock},
    identity::TrustDomain,
    tls::{crypto_provider, pump, DynamicTls, TlsMaterial},
};

/// One handshake; returns the connections so that dropping them is timed too.
fn handshake(
    client: &Arc<ClientConfig>,
    server: &Arc<ServerConfig>,
) -> (ClientConnection, ServerConnection) {
    let name = ServerName::try_from("localhost").expect("name");
    let mut c = ClientConnection::new(client.clone(), name).expect("client");
    let mut s = ServerConnection::new(server.clone()).expect("server");
    pump(&mut c, &mut s).expect("handshake");
    assert!(!c.is_handshaking() && !s.is_handshaking());
    (c, s)
}

/// A server and a client built the way rustls builds them by default, with
/// `provider`, on Sigil's serving certificate.
fn defaults(
    provider: CryptoProvider,
    chain: &[Vec<u8>],
    key: &[u8],
) -> (Arc<ClientConfig>, Arc<ServerConfig>) {
    let provider = Arc::new(provider);
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(chain[1].clone()))
        .expect("CA root");
    let mut client = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    client.resumption = rustls::client::Resumption::disabled();
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            chain.iter().cloned().map(CertificateDer::from).collect(),
            PrivateKeyDer::Pkcs8(key.to_vec().into()),
        )
        .expect("serving certificate");
    server.alpn_protocols = vec![b"h2".to_vec()];
    (Arc::new(client), Arc::new(server))
}

fn tls(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let td = TrustDomain::parse("sigil.local").expect("trust domain");
    let now = SystemClock.now_ms();
    let (authority, _) =
        Authority::load_or_create(dir.path(), &td, now, RingOptions::default()).expect("CA");
    let view = authority.view();
    let ca = view.serving();
    let (leaf, key) = ca
        .serving_cert(&["localhost".to_owned()], now)
        .expect("serving certificate");
    let chain = vec![leaf, ca.ca_cert_der().to_vec()];
    let pin = spki_sha256(&chain[1]).expect("CA SPKI");
    let (rustls_client, rustls_server) = defaults(
        rustls::crypto::aws_lc_rs::default_provider(),
        &chain,
        key.expose(),
    );
    let mut classic = (*crypto_provider()).clone();
    classic
        .kx_groups
        .retain(|g| g.name() != NamedGroup::X25519MLKEM768);
    let (classic_client, classic_server) = defaults(classic, &chain, key.expose());
    let key_pkcs8 = sigil::secret::Secret::new(key.expose().to_vec());
    let sigil_server = DynamicTls::new(
        Arc::new(authority),
        TlsMaterial {
            chain: chain.clone(),
            key_pkcs8,
        },
    )
    .expect("server config")
    .current();
    let mut sigil_client = tls_config(&Trust::Pin(pin)).expect("client config");
    sigil_client.resumption = rustls::client::Resumption::disabled();
    let sigil_client = Arc::new(sigil_client);

    let mut g = c.benchmark_group("handshake");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    // Sigil: AES-128-GCM-SHA256, X25519MLKEM768, no tickets, pinned CA.
    g.bench_function("sigil", |b| {
        b.iter(|| black_box(handshake(&sigil_client, &sigil_server)))
    });
    // rustls' defaults with the same provider crate: AES-256-GCM-SHA384,
    // X25519 (no `prefer-post-quantum`), two session tickets per handshake.
    g.bench_function("rustls_defaults", |b| {
        b.iter(|| black_box(handshake(&rustls_client, &rustls_server)))
    });
    // Sigil's suites without the hybrid key exchange: what ML-KEM costs.
    g.bench_function("sigil_suites_x25519_only", |b| {
        b.iter(|| black_box(handshake(&classic_client, &classic_server)))
    });
    g.finish();
}

criterion_group!(benches, tls);
criterion_main!(benches);
