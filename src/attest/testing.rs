//! Throwaway evidence for tests: a P-384 Nitro PKI (root → intermediate →
//! leaf) that signs attestation documents, and OIDC issuers (RS256 or
//! ES256) that mint JWTs and publish their JWKS. Everything is generated at
//! run time; nothing here is real AWS or CI material.
//!
//! Compiled only for unit tests and with the `test-support` feature (for
//! `tests/it`). It never appears in a release build: it can mint evidence
//! for any PCR or claim a test asks for.
//!
//! Panics on internal failures (key generation, encoding): in a test that is
//! the right outcome.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use aws_lc_rs::{
    rand::SystemRandom,
    rsa::{KeyPair as RsaKeyPair, KeySize},
    signature::{
        EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING,
        ECDSA_P384_SHA384_FIXED_SIGNING, RSA_PKCS1_SHA256,
    },
};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use ciborium::Value;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384,
};
use time::OffsetDateTime;

use super::{NitroConfig, OidcIssuer};

/// The fixed "now" of the unit tests: 2026-01-01T00:00:00Z in Unix ms.
/// Documents default to this timestamp.
pub const NOW_MS: i64 = 1_767_225_600_000;

/// The `module_id` of generated documents.
pub const MODULE_ID: &str = "i-0123456789abcdef0-enc0123456789abcdef";

/// The `nonce` of generated documents unless overridden.
pub const NONCE: &[u8] = b"challenge-0123456789";

/// A fresh P-256 CSR: `(csr_der, spki_der)`.
pub fn test_csr() -> (Vec<u8>, Vec<u8>) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&key).unwrap();
    (
        csr.der().to_vec(),
        rcgen::PublicKeyData::subject_public_key_info(&key),
    )
}

fn datetime(secs: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(secs).unwrap()
}

/// 2000-01-01 .. 2100-01-01: covers [`NOW_MS`] and any real clock a test uses.
const WIDE_VALIDITY: (i64, i64) = (946_684_800, 4_102_444_800);

/// A test Nitro PKI: root → intermediate → leaf, all ECDSA P-384/SHA-384.
pub struct NitroPki {
    root: Vec<u8>,
    intermediate: Vec<u8>,
    leaf: Vec<u8>,
    leaf_key: EcdsaKeyPair,
}

impl Default for NitroPki {
    fn default() -> Self {
        Self::new()
    }
}

impl NitroPki {
    /// A PKI whose certificates are valid 2000..2100.
    pub fn new() -> Self {
        Self::generate(WIDE_VALIDITY, None)
    }

    /// A PKI whose root carries basicConstraints pathLen `n` (the default
    /// root is unconstrained; the intermediate always has pathLen 0).
    pub fn with_root_path_len(n: u8) -> Self {
        Self::generate(WIDE_VALIDITY, Some(n))
    }

    /// A PKI whose intermediate is valid only `not_before..=not_after`
    /// (Unix seconds), e.g. to test an expired intermediate.
    pub fn with_intermediate_validity(not_before: i64, not_after: i64) -> Self {
        Self::generate((not_before, not_after), None)
    }

    fn generate(intermediate_validity: (i64, i64), root_path_len: Option<u8>) -> Self {
        let ca = |cn: &str, (nb, na): (i64, i64), path_len: Option<u8>| {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name = DistinguishedName::new();
            p.distinguished_name
                .push(DnType::OrganizationName, "Sigil test");
            p.distinguished_name.push(DnType::CommonName, cn);
            p.is_ca = IsCa::Ca(match path_len {
                Some(n) => BasicConstraints::Constrained(n),
                None => BasicConstraints::Unconstrained,
            });
            p.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
            ];
            p.not_before = datetime(nb);
            p.not_after = datetime(na);
            p
        };
        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let root_params = ca("test nitro root", WIDE_VALIDITY, root_path_len);
        let root = root_params.self_signed(&root_key).unwrap();
        let root_issuer = Issuer::from_params(&root_params, &root_key);

        let inter_key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let inter_params = ca("test nitro intermediate", intermediate_validity, Some(0));
        let intermediate = inter_params.signed_by(&inter_key, &root_issuer).unwrap();
        let inter_issuer = Issuer::from_params(&inter_params, &inter_key);

        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let mut leaf_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf_params.distinguished_name = DistinguishedName::new();
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, MODULE_ID);
        leaf_params.is_ca = IsCa::ExplicitNoCa;
        leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf_params.not_before = datetime(WIDE_VALIDITY.0);
        leaf_params.not_after = datetime(WIDE_VALIDITY.1);
        let leaf = leaf_params.signed_by(&leaf_key, &inter_issuer).unwrap();
        let leaf_key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &leaf_key.serialize_der())
                .unwrap();

        Self {
            root: root.der().to_vec(),
            intermediate: intermediate.der().to_vec(),
            leaf: leaf.der().to_vec(),
            leaf_key,
        }
    }

    /// DER of the root.
    pub fn root_der(&self) -> &[u8] {
        &self.root
    }

    /// DER of the intermediate.
    pub fn intermediate_der(&self) -> &[u8] {
        &self.intermediate
    }

    /// DER of the leaf (the document signer).
    pub fn leaf_der(&self) -> &[u8] {
        &self.leaf
    }

    /// A verifier config trusting this PKI's root.
    pub fn nitro_config(&self) -> NitroConfig {
        NitroConfig {
            roots_der: vec![self.root.clone()],
        }
    }

    /// Raw r‖s ES384 signature by the leaf key.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.leaf_key
            .sign(&SystemRandom::new(), message)
            .unwrap()
            .as_ref()
            .to_vec()
    }

    /// A document builder with valid defaults: [`MODULE_ID`], digest
    /// SHA384, timestamp [`NOW_MS`], PCR0..15 of 48 non-zero bytes (PCR*i*
    /// = `0x11 * (i + 1)` repeated), the leaf as `certificate`,
    /// `cabundle = [root, intermediate]`, nonce [`NONCE`], no public_key or
    /// user_data. Untagged, definite-length payload map.
    pub fn document(&self) -> NitroDocBuilder<'_> {
        let pcrs = (0u64..16)
            .map(|i| (i, vec![0x11u8.wrapping_mul(i as u8 + 1); 48]))
            .collect();
        let mut b = NitroDocBuilder {
            pki: self,
            fields: Vec::new(),
            protected: vec![0xa1, 0x01, 0x38, 0x22], // {1: -35}
            tagged: false,
            indefinite: false,
        };
        b = b
            .module_id(MODULE_ID)
            .digest("SHA384")
            .timestamp_ms(NOW_MS as u64)
            .pcrs(pcrs)
            .certificate(self.leaf.clone())
            .cabundle(vec![self.root.clone(), self.intermediate.clone()])
            .nonce(Opt::Bytes(NONCE.to_vec()));
        b
    }
}

/// An optional document field: left out, CBOR null, or a byte string.
#[derive(Debug, Clone)]
pub enum Opt {
    /// The key is not in the map.
    Absent,
    /// The key maps to CBOR null.
    Null,
    /// The key maps to these bytes.
    Bytes(Vec<u8>),
}

/// Builds a signed Nitro attestation document. Setters replace a field in
/// place (keeping the NSM's key order); [`Self::extra`] appends.
pub struct NitroDocBuilder<'a> {
    pki: &'a NitroPki,
    fields: Vec<(Value, Value)>,
    protected: Vec<u8>,
    tagged: bool,
    indefinite: bool,
}

impl NitroDocBuilder<'_> {
    /// Sets `key` to `value`, replacing an existing entry in place.
    pub fn replace(mut self, key: &str, value: Value) -> Self {
        let k = Value::Text(key.to_owned());
        match self.fields.iter_mut().find(|(fk, _)| *fk == k) {
            Some(entry) => entry.1 = value,
            None => self.fields.push((k, value)),
        }
        self
    }

    /// Removes `key`.
    pub fn omit(mut self, key: &str) -> Self {
        let k = Value::Text(key.to_owned());
        self.fields.retain(|(fk, _)| *fk != k);
        self
    }

    /// Appends `key: value` even if `key` is present (duplicate keys).
    pub fn extra(mut self, key: &str, value: Value) -> Self {
        self.fields.push((Value::Text(key.to_owned()), value));
        self
    }

    /// Appends an arbitrary map entry (e.g. a non-text key).
    pub fn extra_raw(mut self, key: Value, value: Value) -> Self {
        self.fields.push((key, value));
        self
    }

    fn opt(self, key: &str, value: Opt) -> Self {
        match value {
            Opt::Absent => self.omit(key),
            Opt::Null => self.replace(key, Value::Null),
            Opt::Bytes(b) => self.replace(key, Value::Bytes(b)),
        }
    }

    /// `module_id`.
    pub fn module_id(self, id: &str) -> Self {
        self.replace("module_id", Value::Text(id.to_owned()))
    }

    /// `digest`.
    pub fn digest(self, d: &str) -> Self {
        self.replace("digest", Value::Text(d.to_owned()))
    }

    /// `timestamp` in Unix ms.
    pub fn timestamp_ms(self, ms: u64) -> Self {
        self.replace("timestamp", Value::Integer(ms.into()))
    }

    /// `pcrs`, in the given order (duplicates allowed, to test refusal).
    pub fn pcrs(self, pcrs: Vec<(u64, Vec<u8>)>) -> Self {
        let map = pcrs
            .into_iter()
            .map(|(i, v)| (Value::Integer(i.into()), Value::Bytes(v)))
            .collect();
        self.replace("pcrs", Value::Map(map))
    }

    /// `certificate` (DER).
    pub fn certificate(self, der: Vec<u8>) -> Self {
        self.replace("certificate", Value::Bytes(der))
    }

    /// `cabundle`, root first.
    pub fn cabundle(self, ders: Vec<Vec<u8>>) -> Self {
        let items = ders.into_iter().map(Value::Bytes).collect();
        self.replace("cabundle", Value::Array(items))
    }

    /// `public_key`.
    pub fn public_key(self, v: Opt) -> Self {
        self.opt("public_key", v)
    }

    /// `user_data`.
    pub fn user_data(self, v: Opt) -> Self {
        self.opt("user_data", v)
    }

    /// `nonce`.
    pub fn nonce(self, v: Opt) -> Self {
        self.opt("nonce", v)
    }

    /// The protected header bytes (signed as given). Default `{1: -35}`.
    pub fn protected(mut self, bytes: Vec<u8>) -> Self {
        self.protected = bytes;
        self
    }

    /// Wrap the COSE_Sign1 in CBOR tag 18.
    pub fn tagged(mut self, on: bool) -> Self {
        self.tagged = on;
        self
    }

    /// Encode the payload map with indefinite length (`0xbf … 0xff`).
    pub fn indefinite(mut self, on: bool) -> Self {
        self.indefinite = on;
        self
    }

    /// The payload bytes.
    pub fn payload(&self) -> Vec<u8> {
        if self.indefinite {
            let mut out = vec![0xbf];
            for (k, v) in &self.fields {
                ciborium::ser::into_writer(k, &mut out).unwrap();
                ciborium::ser::into_writer(v, &mut out).unwrap();
            }
            out.push(0xff);
            out
        } else {
            encode(&Value::Map(self.fields.clone()))
        }
    }

    /// The four signed COSE_Sign1 items `[protected, {}, payload, signature]`.
    pub fn build_items(&self) -> Vec<Value> {
        let payload = self.payload();
        let sig_structure = encode(&Value::Array(vec![
            Value::Text("Signature1".into()),
            Value::Bytes(self.protected.clone()),
            Value::Bytes(Vec::new()),
            Value::Bytes(payload.clone()),
        ]));
        let signature = self.pki.sign(&sig_structure);
        vec![
            Value::Bytes(self.protected.clone()),
            Value::Map(Vec::new()),
            Value::Bytes(payload),
            Value::Bytes(signature),
        ]
    }

    /// The encoded document.
    pub fn build(&self) -> Vec<u8> {
        let array = Value::Array(self.build_items());
        if self.tagged {
            encode(&Value::Tag(18, Box::new(array)))
        } else {
            encode(&array)
        }
    }
}

/// Encodes one CBOR value.
pub fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(v, &mut out).unwrap();
    out
}

/// The signing key of an [`OidcTestIssuer`].
enum TestKey {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

/// A test OIDC issuer: one signing key, its JWKS, and a minting function.
pub struct OidcTestIssuer {
    alias: String,
    issuer: String,
    kid: String,
    key: TestKey,
}

impl OidcTestIssuer {
    /// An RS256 issuer with a fresh 2048-bit key.
    pub fn rsa(alias: &str, issuer: &str) -> Self {
        let key = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
        Self::with_key(alias, issuer, TestKey::Rsa(key))
    }

    /// An ES256 issuer with a fresh P-256 key.
    pub fn ec(alias: &str, issuer: &str) -> Self {
        let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        Self::with_key(alias, issuer, TestKey::Ec(key))
    }

    fn with_key(alias: &str, issuer: &str, key: TestKey) -> Self {
        let mut me = Self {
            alias: alias.to_owned(),
            issuer: issuer.to_owned(),
            kid: String::new(),
            key,
        };
        me.kid = hex::encode(&super::sha256(&me.public_key_der())[..8]);
        me
    }

    /// The key id in the JWKS and in minted headers.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// `"RS256"` or `"ES256"`.
    pub fn alg(&self) -> &'static str {
        match self.key {
            TestKey::Rsa(_) => "RS256",
            TestKey::Ec(_) => "ES256",
        }
    }

    /// The issuer URL (`iss`).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// DER SubjectPublicKeyInfo of the signing key.
    pub fn public_key_der(&self) -> Vec<u8> {
        use aws_lc_rs::encoding::AsDer;
        match &self.key {
            TestKey::Rsa(k) => k.public_key().as_der().unwrap().as_ref().to_vec(),
            TestKey::Ec(k) => k.public_key().as_der().unwrap().as_ref().to_vec(),
        }
    }

    /// The JWK of the signing key (with `kid`, `use: sig`, `alg`).
    pub fn jwk(&self) -> serde_json::Value {
        match &self.key {
            TestKey::Rsa(k) => serde_json::json!({
                "kty": "RSA",
                "kid": self.kid,
                "use": "sig",
                "alg": "RS256",
                "n": b64(k.public_key().modulus().big_endian_without_leading_zero()),
                "e": b64(k.public_key().exponent().big_endian_without_leading_zero()),
            }),
            TestKey::Ec(k) => {
                let point = k.public_key().as_ref();
                let (x, y) = point.get(1..).unwrap().split_at(32);
                serde_json::json!({
                    "kty": "EC",
                    "kid": self.kid,
                    "use": "sig",
                    "alg": "ES256",
                    "crv": "P-256",
                    "x": b64(x),
                    "y": b64(y),
                })
            }
        }
    }

    /// The JWKS document `{"keys": [jwk]}`.
    pub fn jwks_json(&self) -> String {
        serde_json::json!({ "keys": [self.jwk()] }).to_string()
    }

    /// A verifier config for this issuer: its alias, iss, JWKS and alg,
    /// the given audiences and selector claims, no binding claim.
    pub fn config(&self, audiences: &[&str], claims: Vec<String>) -> OidcIssuer {
        OidcIssuer {
            alias: self.alias.clone(),
            issuer: self.issuer.clone(),
            audiences: audiences.iter().map(|s| (*s).to_owned()).collect(),
            jwks_json: self.jwks_json(),
            claims,
            algorithms: vec![self.alg().to_owned()],
            binding_claim: None,
        }
    }

    /// Standard claims for a token valid at `now_ms`: iss, sub, aud, iat
    /// and nbf = now, exp = now + 5 min, and the given jti.
    pub fn standard_claims(
        &self,
        sub: &str,
        aud: &str,
        now_ms: i64,
        jti: &str,
    ) -> serde_json::Value {
        let now = now_ms.div_euclid(1000);
        serde_json::json!({
            "iss": self.issuer,
            "sub": sub,
            "aud": aud,
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "jti": jti,
        })
    }

    /// A compact JWS of `claims` with header `{alg, kid, typ: JWT}`.
    pub fn mint(&self, claims: &serde_json::Value) -> String {
        let header = serde_json::json!({ "alg": self.alg(), "kid": self.kid, "typ": "JWT" });
        self.mint_with_header(&header, claims)
    }

    /// A compact JWS of `claims` under an arbitrary `header`, signed with
    /// this issuer's key whatever the header says.
    pub fn mint_with_header(
        &self,
        header: &serde_json::Value,
        claims: &serde_json::Value,
    ) -> String {
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = self.sign(input.as_bytes());
        format!("{input}.{}", b64(&sig))
    }

    /// Signs `message` with the issuer key (RS256 or ES256, raw r‖s for EC).
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.key {
            TestKey::Rsa(k) => {
                let mut sig = vec![0u8; k.public_modulus_len()];
                k.sign(&RSA_PKCS1_SHA256, &rng, message, &mut sig).unwrap();
                sig
            }
            TestKey::Ec(k) => k.sign(&rng, message).unwrap().as_ref().to_vec(),
        }
    }

    /// The classic algorithm-confusion forgery: an HS256 token whose HMAC
    /// key is this issuer's public key (SPKI DER).
    pub fn mint_hs256_with_public_key(&self, claims: &serde_json::Value) -> String {
        let header = serde_json::json!({ "alg": "HS256", "kid": self.kid, "typ": "JWT" });
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &self.public_key_der());
        let tag = aws_lc_rs::hmac::sign(&key, input.as_bytes());
        format!("{input}.{}", b64(tag.as_ref()))
    }
}

/// Unpadded base64url.
pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}
