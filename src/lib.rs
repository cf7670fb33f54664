//! Sigil: a gRPC identity broker. A workload proves itself once — with a
//! one-time HMAC enrollment token or a platform attestation document — and
//! receives short-lived SPIFFE X509-SVIDs and JWT-SVIDs.
//!
//! Module map (dependencies point down; see STYLE.md §2):
//!
//! | module | owns |
//! |---|---|
//! | [`cli`] | command-line verbs; admin verbs speak the gRPC admin API |
//! | [`agent`] | `sigil agent`: host agent, SPIFFE Workload API on a Unix socket; a broker client like `cli` |
//! | [`server`] | composition root: builds the store, CA, broker and listeners |
//! | [`config`] | flags, `SIGIL_*` env and TOML file → typed [`config::Config`] |
//! | [`api`] | the only module that names tonic/prost: proto ⇄ core, errors ⇄ Status |
//! | [`core`] | the rules: enroll, tokens, audit — no gRPC, SQL or rustls |
//! | [`token`] | token minting and the signed enrollment payload (constant-time HMAC) |
//! | [`ca`] | X.509 and JWT signing, CSR checks, the trust bundle |
//! | [`store`] | durable one-use state behind one trait; SQLite and PostgreSQL backends (TLS to PostgreSQL in `store::postgres::tls`) |
//! | [`audit`] | audit event shape and the hash chain |
//! | [`attest`] | attestation verifiers (Nitro, OIDC) behind one trait |
//! | [`policy`] | plans: parse, validate, canonicalise, hash |
//! | [`tls`] | the public port's dynamic TLS (rotation-aware); the TLS parameters of every Sigil connection |
//! | [`netio`] | write coalescing for connections on and to the public port |
//! | [`ratelimit`], [`metrics`] | leaves: token buckets, Prometheus text |
//! | [`identity`], [`secret`], [`clock`] | leaves: SPIFFE names, secret bytes, time |

#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod agent;
pub mod api;
pub mod attest;
pub mod audit;
pub mod ca;
pub mod cli;
pub mod clock;
pub mod config;
pub mod core;
pub mod identity;
pub mod jwks;
pub mod keysync;
pub mod metrics;
pub mod netio;
pub mod policy;
pub mod ratelimit;
pub mod secret;
pub mod server;
pub mod store;
pub mod tls;
pub mod token;
