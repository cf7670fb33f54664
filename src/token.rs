//! Enrollment tokens and the signed payloads that prove possession of them.
//!
//! A token is `<token_id>.<token_secret>`: `token_id` is 128 random bits as
//! 32 lowercase hex chars; `token_secret` = HMAC-SHA256(K_token,
//! "sigil/token/v1" ‖ token_id) as 64 lowercase hex chars. The broker stores
//! no secret: it re-derives it from the id, so the HMAC check needs no
//! lookup and a database leak yields no usable token.
//!
//! The workload never sends the secret. It signs the exact bytes of a small
//! JSON payload (see [`EnrollPayload`]) with HMAC-SHA256 under the 32-byte
//! secret; checks use `verify_slice` (constant time), never `==`.

use std::fmt;

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::secret::Secret;

type HmacSha256 = Hmac<Sha256>;

/// Domain separator for token secret derivation.
const TOKEN_DERIVATION_LABEL: &[u8] = b"sigil/token/v1";
/// `action` of an enrollment payload.
pub const ACTION_ENROLL: &str = "ENROLL";
/// `action` of a foundation-plan bootstrap payload.
pub const ACTION_BOOTSTRAP: &str = "BOOTSTRAP_CREATE_FOUNDATION_PLAN";
/// Largest signed payload accepted, in bytes.
pub const MAX_PAYLOAD_LEN: usize = 4096;
/// Shortest nonce accepted, in decoded bytes (128 bits).
pub const MIN_NONCE_LEN: usize = 16;
/// Longest nonce accepted, in decoded bytes.
pub const MAX_NONCE_LEN: usize = 64;

/// Why a token string or payload was rejected. Messages never include secret bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The token string is not `<32 hex>.<64 hex>`.
    #[error("token must be <token_id>.<token_secret> (32 and 64 lowercase hex characters)")]
    BadTokenFormat,
    /// The token id is not 32 lowercase hex characters.
    #[error("token_id must be 32 lowercase hex characters")]
    BadTokenId,
    /// The payload is not acceptable; the message names the field.
    #[error("payload: {0}")]
    BadPayload(String),
}

/// The broker's token key `K_token`.
#[derive(Clone)]
pub struct TokenKey(Secret);

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenKey(***)")
    }
}

impl TokenKey {
    /// Wraps key material (≥ 32 bytes recommended).
    pub fn new(key: Secret) -> Self {
        Self(key)
    }

    /// Derives the token secret for `token_id`.
    pub fn derive_secret(&self, token_id: &str) -> TokenSecret {
        let mut mac = new_mac(self.0.expose());
        mac.update(TOKEN_DERIVATION_LABEL);
        mac.update(token_id.as_bytes());
        TokenSecret(Secret::new(mac.finalize().into_bytes().to_vec()))
    }

    /// Mints a new token: a random id and its derived secret.
    pub fn mint(&self) -> MintedToken {
        let mut id = [0u8; 16];
        rand::fill(&mut id);
        let token_id = hex::encode(id);
        let secret = self.derive_secret(&token_id);
        MintedToken { token_id, secret }
    }
}

fn new_mac(key: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    #[allow(clippy::expect_used)]
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key length")
}

/// A token secret (32 bytes). Redacted in `Debug`.
#[derive(Clone)]
pub struct TokenSecret(Secret);

impl fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenSecret(***)")
    }
}

impl TokenSecret {
    /// HMAC-SHA256 of `payload` under this secret.
    pub fn sign(&self, payload: &[u8]) -> Vec<u8> {
        hmac_sign(self.0.expose(), payload)
    }

    /// Constant-time check of `signature` over `payload`.
    pub fn verify(&self, payload: &[u8], signature: &[u8]) -> bool {
        hmac_verify(self.0.expose(), payload, signature)
    }

    /// The secret as 64 lowercase hex characters (for printing a new token to its owner once).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0.expose())
    }
}

/// HMAC-SHA256 of `payload` under `key`.
pub fn hmac_sign(key: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut mac = new_mac(key);
    mac.update(payload);
    mac.finalize().into_bytes().to_vec()
}

/// Constant-time HMAC-SHA256 check.
pub fn hmac_verify(key: &[u8], payload: &[u8], signature: &[u8]) -> bool {
    let mut mac = new_mac(key);
    mac.update(payload);
    mac.verify_slice(signature).is_ok()
}

/// A freshly minted token. The only place the secret exists in the broker.
pub struct MintedToken {
    /// 32 lowercase hex characters.
    pub token_id: String,
    /// The derived secret.
    pub secret: TokenSecret,
}

impl fmt::Debug for MintedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MintedToken")
            .field("token_id", &self.token_id)
            .finish_non_exhaustive()
    }
}

impl MintedToken {
    /// The token string handed to the operator: `<token_id>.<secret hex>`.
    pub fn token_string(&self) -> String {
        format!("{}.{}", self.token_id, self.secret.to_hex())
    }
}

/// True when `s` is 32 lowercase hex characters.
pub fn is_valid_token_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Splits a token string into its id and secret (client side).
///
/// # Errors
/// [`TokenError::BadTokenFormat`].
pub fn parse_token(token: &str) -> Result<(String, TokenSecret), TokenError> {
    let token = token.trim();
    let (id, secret_hex) = token.split_once('.').ok_or(TokenError::BadTokenFormat)?;
    if !is_valid_token_id(id) || secret_hex.len() != 64 {
        return Err(TokenError::BadTokenFormat);
    }
    let secret = hex::decode(secret_hex).map_err(|_| TokenError::BadTokenFormat)?;
    Ok((id.to_owned(), TokenSecret(Secret::new(secret))))
}

/// The signed enrollment payload:
/// `{"action":"ENROLL","token_id":…,"timestamp":<unix ms>,"nonce":<base64url>,"csr_sha256":<hex>}`.
/// Unknown fields are rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollPayload {
    /// Must be [`ACTION_ENROLL`].
    pub action: String,
    /// The token being redeemed.
    pub token_id: String,
    /// Client time, Unix ms.
    pub timestamp: i64,
    /// ≥ 128-bit random, base64url.
    pub nonce: String,
    /// Lowercase hex SHA-256 of the CSR DER.
    pub csr_sha256: String,
}

impl EnrollPayload {
    /// Parses payload bytes strictly (size cap, UTF-8 JSON object, exact fields).
    ///
    /// # Errors
    /// [`TokenError::BadPayload`] naming the problem.
    pub fn parse(bytes: &[u8]) -> Result<Self, TokenError> {
        parse_json(bytes)
    }

    /// The exact bytes a client signs and sends.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising a struct of strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Parses a signed JSON payload with the shared limits.
///
/// # Errors
/// [`TokenError::BadPayload`].
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, TokenError> {
    if bytes.is_empty() {
        return Err(TokenError::BadPayload("empty".into()));
    }
    if bytes.len() > MAX_PAYLOAD_LEN {
        return Err(TokenError::BadPayload(format!(
            "larger than {MAX_PAYLOAD_LEN} bytes"
        )));
    }
    let text =
        std::str::from_utf8(bytes).map_err(|_| TokenError::BadPayload("not UTF-8".into()))?;
    serde_json::from_str(text).map_err(|e| TokenError::BadPayload(json_problem(&e)))
}

/// A short description of a JSON error that never echoes input content.
fn json_problem(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    match e.classify() {
        Category::Data => {
            // serde's data errors name fields ("missing field `nonce`",
            // "unknown field `x`", "invalid type"), never values of ours.
            let msg = e.to_string();
            match msg.find(" at line") {
                Some(i) => msg[..i].to_owned(),
                None => msg,
            }
        }
        Category::Syntax | Category::Eof | Category::Io => "not a JSON object".into(),
    }
}

/// Decodes and normalises a base64url nonce (padding optional), enforcing
/// [`MIN_NONCE_LEN`]..=[`MAX_NONCE_LEN`] bytes. Returns the canonical unpadded form.
///
/// # Errors
/// [`TokenError::BadPayload`].
pub fn normalize_nonce(nonce: &str) -> Result<String, TokenError> {
    let raw = URL_SAFE_NO_PAD
        .decode(nonce.trim_end_matches('='))
        .map_err(|_| TokenError::BadPayload("nonce is not base64url".into()))?;
    if raw.len() < MIN_NONCE_LEN {
        return Err(TokenError::BadPayload(format!(
            "nonce shorter than {MIN_NONCE_LEN} bytes"
        )));
    }
    if raw.len() > MAX_NONCE_LEN {
        return Err(TokenError::BadPayload(format!(
            "nonce longer than {MAX_NONCE_LEN} bytes"
        )));
    }
    Ok(URL_SAFE_NO_PAD.encode(raw))
}

/// A fresh random 128-bit nonce, base64url (client side).
pub fn random_nonce() -> String {
    let mut n = [0u8; MIN_NONCE_LEN];
    rand::fill(&mut n);
    URL_SAFE_NO_PAD.encode(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TokenKey {
        TokenKey::new(Secret::new(vec![7u8; 32]))
    }

    #[test]
    fn minted_token_parses_back_and_secret_rederives() {
        let k = key();
        let t = k.mint();
        assert!(is_valid_token_id(&t.token_id));
        let s = t.token_string();
        assert_eq!(s.len(), 32 + 1 + 64);
        let (id, secret) = parse_token(&s).unwrap();
        assert_eq!(id, t.token_id);
        let payload = b"hello";
        assert!(k.derive_secret(&id).verify(payload, &secret.sign(payload)));
    }

    #[test]
    fn verify_rejects_wrong_signature_and_wrong_key() {
        let k = key();
        let t = k.mint();
        let sig = t.secret.sign(b"p");
        assert!(!t.secret.verify(b"q", &sig));
        assert!(!t.secret.verify(b"p", &sig[..31]));
        let other = TokenKey::new(Secret::new(vec![8u8; 32]));
        assert!(!other.derive_secret(&t.token_id).verify(b"p", &sig));
    }

    #[test]
    fn debug_never_shows_secret() {
        let t = key().mint();
        let hexs = t.secret.to_hex();
        for s in [
            format!("{t:?}"),
            format!("{:?}", t.secret),
            format!("{:?}", key()),
        ] {
            assert!(!s.contains(&hexs), "{s}");
        }
    }

    #[test]
    fn bad_token_strings() {
        for s in [
            "",
            "abc",
            "x.y",
            &format!("{}.{}", "A".repeat(32), "0".repeat(64)),
        ] {
            assert_eq!(parse_token(s).unwrap_err(), TokenError::BadTokenFormat);
        }
    }

    #[test]
    fn payload_parsing_is_strict() {
        let good = EnrollPayload {
            action: ACTION_ENROLL.into(),
            token_id: "0".repeat(32),
            timestamp: 1,
            nonce: random_nonce(),
            csr_sha256: "ab".into(),
        };
        assert_eq!(EnrollPayload::parse(&good.to_bytes()).unwrap(), good);
        for (bad, want) in [
            (&b"not json"[..], "not a JSON object"),
            (&b"{\"action\":\"ENROLL\"}"[..], "missing field"),
            (&b"{\"action\":\"ENROLL\",\"token_id\":\"a\",\"timestamp\":1,\"nonce\":\"a\",\"csr_sha256\":\"a\",\"x\":1}"[..], "unknown field"),
            (&b"\xff\xfe"[..], "not UTF-8"),
            (&b""[..], "empty"),
        ] {
            let e = EnrollPayload::parse(bad).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        assert!(EnrollPayload::parse(&vec![b' '; MAX_PAYLOAD_LEN + 1]).is_err());
    }

    #[test]
    fn nonce_rules() {
        assert!(normalize_nonce(&random_nonce()).is_ok());
        assert!(normalize_nonce(&URL_SAFE_NO_PAD.encode([0u8; 15])).is_err());
        assert!(normalize_nonce(&URL_SAFE_NO_PAD.encode([0u8; 65])).is_err());
        assert!(normalize_nonce("!!!").is_err());
        let padded = base64::engine::general_purpose::URL_SAFE.encode([1u8; 16]);
        assert_eq!(
            normalize_nonce(&padded).unwrap(),
            URL_SAFE_NO_PAD.encode([1u8; 16])
        );
    }
}

/// Property tests: the token and payload parsers never panic, and what the
/// client side builds is exactly what the broker side reads back.
#[cfg(test)]
mod proptests {
    use proptest::{collection::vec, prelude::*};

    use super::*;

    /// A base64url nonce of `MIN_NONCE_LEN..=MAX_NONCE_LEN` random bytes.
    fn valid_nonce() -> impl Strategy<Value = String> {
        vec(any::<u8>(), MIN_NONCE_LEN..=MAX_NONCE_LEN).prop_map(|b| URL_SAFE_NO_PAD.encode(b))
    }

    /// JSON-ish text: objects of our field names with assorted values, so
    /// the parser is driven past the "not JSON" exit.
    fn jsonish() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            Just("action"),
            Just("token_id"),
            Just("timestamp"),
            Just("nonce"),
            Just("csr_sha256"),
            Just("x"),
        ];
        let value = prop_oneof![
            "-?[0-9]{1,25}(\\.[0-9]{1,3})?(e[0-9]{1,3})?",
            "\"([ -~]|\\\\u[0-9a-fA-F]{4}|\\\\[nrt\"\\\\/])*\"",
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("[]".to_owned()),
            Just("{}".to_owned()),
        ];
        vec((key, value), 0..8).prop_map(|kvs| {
            let body: Vec<String> = kvs.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            format!("{{{}}}", body.join(","))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn payload_parse_never_panics_on_bytes(bytes in vec(any::<u8>(), 0..MAX_PAYLOAD_LEN + 64)) {
            let _ = EnrollPayload::parse(&bytes);
            let _ = parse_json::<serde_json::Value>(&bytes);
        }

        #[test]
        fn payload_parse_never_panics_on_jsonish_text(text in jsonish()) {
            if let Ok(p) = EnrollPayload::parse(text.as_bytes()) {
                prop_assert_eq!(EnrollPayload::parse(&p.to_bytes()), Ok(p));
            }
        }

        #[test]
        fn valid_payload_round_trips(
            token_id in "[0-9a-f]{32}",
            timestamp in any::<i64>(),
            nonce in valid_nonce(),
            csr_sha256 in "[0-9a-f]{64}",
        ) {
            let p = EnrollPayload {
                action: ACTION_ENROLL.to_owned(),
                token_id,
                timestamp,
                nonce,
                csr_sha256,
            };
            let bytes = p.to_bytes();
            prop_assert!(bytes.len() <= MAX_PAYLOAD_LEN);
            let back = EnrollPayload::parse(&bytes).unwrap();
            prop_assert!(is_valid_token_id(&back.token_id));
            prop_assert_eq!(normalize_nonce(&back.nonce), Ok(back.nonce.clone()));
            prop_assert_eq!(back, p);
        }

        #[test]
        fn any_string_fields_round_trip_while_small_enough(
            action in any::<String>(),
            token_id in any::<String>(),
            timestamp in any::<i64>(),
            nonce in any::<String>(),
            csr_sha256 in any::<String>(),
        ) {
            let p = EnrollPayload { action, token_id, timestamp, nonce, csr_sha256 };
            let bytes = p.to_bytes();
            if bytes.len() <= MAX_PAYLOAD_LEN {
                prop_assert_eq!(EnrollPayload::parse(&bytes), Ok(p));
            } else {
                prop_assert!(EnrollPayload::parse(&bytes).is_err());
            }
        }

        #[test]
        fn parse_token_never_panics(s in any::<String>()) {
            if let Ok((id, _)) = parse_token(&s) {
                prop_assert!(is_valid_token_id(&id));
            }
        }

        #[test]
        fn minted_tokens_parse_back_under_any_key(
            key in vec(any::<u8>(), 0..100),
            pad in "[ \t\n]{0,3}",
        ) {
            let k = TokenKey::new(Secret::new(key));
            let t = k.mint();
            let (id, secret) = parse_token(&format!("{pad}{}{pad}", t.token_string())).unwrap();
            prop_assert_eq!(&id, &t.token_id);
            prop_assert_eq!(secret.to_hex(), k.derive_secret(&id).to_hex());
        }

        #[test]
        fn token_strings_with_a_bad_part_are_refused(
            id in "[0-9a-fA-Z]{0,40}",
            secret in "[0-9a-fg]{0,70}",
        ) {
            let ok_shape = is_valid_token_id(&id)
                && secret.len() == 64
                && secret.bytes().all(|b| b.is_ascii_hexdigit());
            let token = format!("{id}.{secret}");
            prop_assert_eq!(parse_token(&token).is_ok(), ok_shape);
        }

        #[test]
        fn normalize_nonce_never_panics_and_is_idempotent(s in any::<String>()) {
            if let Ok(n) = normalize_nonce(&s) {
                let raw = URL_SAFE_NO_PAD.decode(&n).unwrap();
                prop_assert!((MIN_NONCE_LEN..=MAX_NONCE_LEN).contains(&raw.len()));
                prop_assert_eq!(normalize_nonce(&n), Ok(n.clone()));
            }
        }

        #[test]
        fn nonce_length_bounds(raw in vec(any::<u8>(), 0..100), padded in any::<bool>()) {
            let text = if padded {
                base64::engine::general_purpose::URL_SAFE.encode(&raw)
            } else {
                URL_SAFE_NO_PAD.encode(&raw)
            };
            let in_range = (MIN_NONCE_LEN..=MAX_NONCE_LEN).contains(&raw.len());
            prop_assert_eq!(normalize_nonce(&text).is_ok(), in_range);
            if in_range {
                prop_assert_eq!(normalize_nonce(&text).unwrap(), URL_SAFE_NO_PAD.encode(&raw));
            }
        }

        #[test]
        fn hmac_rejects_any_flipped_bit(
            key in vec(any::<u8>(), 1..64),
            payload in vec(any::<u8>(), 1..256),
            at in any::<usize>(),
            bit in 0u8..8,
            in_signature in any::<bool>(),
        ) {
            let sig = hmac_sign(&key, &payload);
            prop_assert!(hmac_verify(&key, &payload, &sig));
            let (mut p, mut s) = (payload.clone(), sig.clone());
            if in_signature {
                let i = at % s.len();
                s[i] ^= 1 << bit;
            } else {
                let i = at % p.len();
                p[i] ^= 1 << bit;
            }
            prop_assert!(!hmac_verify(&key, &p, &s));
            prop_assert!(!hmac_verify(&key, &payload, &sig[..sig.len() - 1]));
        }
    }
}
