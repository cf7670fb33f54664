//! JWT-SVIDs (SPIFFE JWT-SVID spec, formats.md §1.3) and the trust bundle
//! (formats.md §1.4).
//!
//! Tokens are ES256 only, JWS Compact Serialization, header exactly
//! `{"alg":"ES256","kid":<kid>,"typ":"JWT"}`; `kid` is the RFC 7638 JWK
//! thumbprint of the JWT key. Signing uses an aws-lc-rs key parsed once at
//! load (jsonwebtoken's `encode` would re-parse the PKCS#8 key on every
//! call). Validation goes through `jsonwebtoken::decode` with a
//! `DecodingKey` built once, pinned to ES256; time-based checks are done
//! here against the caller's clock, not jsonwebtoken's system clock.

use std::collections::HashSet;

use aws_lc_rs::{
    rand::SystemRandom,
    signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING},
};
use base64::{
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
    Engine as _,
};
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Validation};
use serde::Serialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::{Ca, CaError};
use crate::identity::SpiffeId;

/// Clock-skew allowance when validating `exp`, `nbf` and `iat`, in seconds.
/// A token is accepted while `now < exp + 30`.
pub const JWT_LEEWAY_SECS: i64 = 30;
/// Longest token [`Ca::validate_jwt`] will look at, in bytes.
pub const MAX_JWT_LEN: usize = 16 * 1024;

/// Inputs for [`Ca::mint_jwt`]. Authorisation happened before this point.
#[derive(Debug, Clone, Copy)]
pub struct JwtParams<'a> {
    /// Subject; must be in the CA's trust domain.
    pub spiffe_id: &'a SpiffeId,
    /// One or more audiences (one is recommended by the spec).
    pub audiences: &'a [String],
    /// Current time, Unix seconds (`iat`).
    pub now_secs: i64,
    /// Lifetime in seconds (> 0); `exp = now_secs + ttl_secs`.
    pub ttl_secs: i64,
}

/// A freshly minted JWT-SVID.
#[derive(Clone, PartialEq, Eq)]
pub struct MintedJwt {
    /// The compact JWS. A bearer credential: never log it.
    pub token: String,
    /// `exp`, Unix seconds.
    pub expires_at: i64,
    /// `jti`: 128 random bits, lowercase hex.
    pub jti: String,
}

impl std::fmt::Debug for MintedJwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MintedJwt")
            .field("token", &"***")
            .field("expires_at", &self.expires_at)
            .field("jti", &self.jti)
            .finish()
    }
}

/// A JWT-SVID that passed [`Ca::validate_jwt`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedJwt {
    /// `sub`, a SPIFFE ID in our trust domain.
    pub spiffe_id: String,
    /// All claims, as a JSON object.
    pub claims_json: String,
    /// `jti`, when present.
    pub jti: Option<String>,
    /// `exp`, Unix seconds.
    pub expires_at: i64,
}

/// The JWT-SVID key, parsed once, plus everything derived from it.
pub(super) struct JwtKey {
    /// ES256 signer (fixed-length r||s signatures, as JWS requires).
    signer: EcdsaKeyPair,
    decoding: DecodingKey,
    validation: Validation,
    kid: String,
    /// JWK `x` / `y`, base64url without padding.
    x: String,
    y: String,
    /// base64url of the constant header JSON.
    header_b64: String,
}

impl JwtKey {
    /// Wraps a P-256 key loaded for `ECDSA_P256_SHA256_FIXED_SIGNING`.
    pub(super) fn new(signer: EcdsaKeyPair) -> Result<Self, CaError> {
        // JWS wants fixed-length r||s, not the DER signatures X.509 uses.
        if signer.algorithm() != &ECDSA_P256_SHA256_FIXED_SIGNING {
            return Err(CaError::Key(
                "JWT key must be loaded for ES256 (fixed)".into(),
            ));
        }
        let point = signer.public_key().as_ref();
        let (x, y) = ec_xy(point).ok_or_else(|| CaError::Key("JWT key is not P-256".into()))?;
        let kid = jwk_thumbprint(&x, &y);
        let decoding = DecodingKey::from_ec_components(&x, &y)
            .map_err(|e| CaError::Key(format!("JWT public key: {e}")))?;

        let mut validation = Validation::new(Algorithm::ES256);
        // exp/nbf/aud/sub are checked in `validate_jwt` with the caller's
        // clock; jsonwebtoken would read the system clock.
        validation.required_spec_claims = HashSet::new();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.leeway = 0;

        let header = json!({"alg": "ES256", "kid": kid, "typ": "JWT"});
        let header_b64 = URL_SAFE_NO_PAD.encode(header.to_string());
        Ok(Self {
            signer,
            decoding,
            validation,
            kid,
            x,
            y,
            header_b64,
        })
    }
}

/// `(x, y)` base64url of a SEC1 uncompressed P-256 point.
pub(super) fn ec_xy(point: &[u8]) -> Option<(String, String)> {
    match point {
        [0x04, xy @ ..] if xy.len() == 64 => {
            let (x, y) = xy.split_at(32);
            Some((URL_SAFE_NO_PAD.encode(x), URL_SAFE_NO_PAD.encode(y)))
        }
        _ => None,
    }
}

/// RFC 7638 §3 JWK thumbprint (SHA-256, base64url) of an EC P-256 key.
fn jwk_thumbprint(x: &str, y: &str) -> String {
    // Required members only, lexicographic order, no whitespace.
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    aud: Audience<'a>,
    exp: i64,
    iat: i64,
    jti: &'a str,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Audience<'a> {
    One(&'a str),
    Many(&'a [String]),
}

impl Ca {
    /// The JWT-SVID key id (RFC 7638 thumbprint), as in the `kid` header and the bundle.
    pub fn jwt_kid(&self) -> &str {
        &self.jwt.kid
    }

    /// Mints an ES256 JWT-SVID: header `alg ES256, kid, typ JWT`; claims
    /// `sub`, `aud` (a string for one audience, else an array), `exp`,
    /// `iat` and a random 128-bit hex `jti`. The JWT key does not expire,
    /// so `exp` is not clamped to the CA certificate.
    ///
    /// # Errors
    /// [`CaError::InvalidRequest`] for an ID outside our trust domain, no or
    /// empty audiences, or a non-positive TTL; [`CaError::Jwt`] when signing fails.
    pub fn mint_jwt(&self, p: &JwtParams<'_>) -> Result<MintedJwt, CaError> {
        self.check_own_domain(p.spiffe_id)?;
        if p.audiences.is_empty() || p.audiences.iter().any(String::is_empty) {
            return Err(CaError::InvalidRequest(
                "a JWT-SVID needs at least one non-empty audience".into(),
            ));
        }
        if p.ttl_secs <= 0 {
            return Err(CaError::InvalidRequest("ttl_secs must be positive".into()));
        }
        let exp = p
            .now_secs
            .checked_add(p.ttl_secs)
            .ok_or_else(|| CaError::InvalidRequest("exp overflows".into()))?;
        let mut jti = [0u8; 16];
        rand::fill(&mut jti[..]);
        let jti = hex::encode(jti);
        let claims = Claims {
            sub: p.spiffe_id.as_str(),
            aud: match p.audiences {
                [one] => Audience::One(one),
                many => Audience::Many(many),
            },
            exp,
            iat: p.now_secs,
            jti: &jti,
        };
        let claims =
            serde_json::to_vec(&claims).map_err(|e| CaError::Jwt(format!("claims: {e}")))?;

        let mut token =
            String::with_capacity(self.jwt.header_b64.len() + claims.len() * 4 / 3 + 2 + 88);
        token.push_str(&self.jwt.header_b64);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&claims, &mut token);
        let sig = self
            .jwt
            .signer
            .sign(&SystemRandom::new(), token.as_bytes())
            .map_err(|_| CaError::Jwt("ES256 signing failed".into()))?;
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(sig.as_ref(), &mut token);
        Ok(MintedJwt {
            token,
            expires_at: exp,
            jti,
        })
    }

    /// Validates a JWT-SVID minted by this CA: compact form; header `alg`
    /// exactly ES256 (so `none`, `HS*`, `EdDSA` and the rest are rejected),
    /// `kid` equal to ours, `typ` absent or `JWT`/`JOSE`, no `crit`; the
    /// signature under our key; `exp` required with `now < exp +
    /// JWT_LEEWAY_SECS`; `nbf`/`iat`, when present, not beyond `now +
    /// JWT_LEEWAY_SECS`; `aud` (string or array) containing `audience`; `sub`
    /// a SPIFFE ID in our trust domain.
    ///
    /// # Errors
    /// [`CaError::JwtInvalid`] naming the failed check (never echoing the token);
    /// [`CaError::InvalidRequest`] for an empty `audience`.
    pub fn validate_jwt(
        &self,
        token: &str,
        audience: &str,
        now_secs: i64,
    ) -> Result<ValidatedJwt, CaError> {
        let invalid = |m: &str| CaError::JwtInvalid(m.to_owned());
        if audience.is_empty() {
            return Err(CaError::InvalidRequest("audience must not be empty".into()));
        }
        if token.len() > MAX_JWT_LEN {
            return Err(invalid("token too long"));
        }
        if token.split('.').count() != 3 {
            return Err(invalid("not a compact JWS (three dot-separated parts)"));
        }

        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| invalid("malformed header or unsupported alg"))?;
        if header.alg != Algorithm::ES256 {
            return Err(CaError::JwtInvalid(format!(
                "alg {:?} not allowed (ES256 only)",
                header.alg
            )));
        }
        match header.kid.as_deref() {
            Some(kid) if kid == self.jwt.kid => {}
            Some(_) => return Err(invalid("unknown kid")),
            None => return Err(invalid("missing kid")),
        }
        if header
            .typ
            .as_deref()
            .is_some_and(|t| t != "JWT" && t != "JOSE")
        {
            return Err(invalid("typ must be JWT or JOSE"));
        }
        if header.crit.is_some() {
            return Err(invalid("crit header not supported"));
        }

        let data = jsonwebtoken::decode::<Map<String, Value>>(
            token,
            &self.jwt.decoding,
            &self.jwt.validation,
        )
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => invalid("bad signature"),
            ErrorKind::InvalidAlgorithm => invalid("alg not allowed"),
            _ => CaError::JwtInvalid(format!("undecodable token: {e}")),
        })?;
        let claims = data.claims;

        let exp = match claims.get("exp") {
            Some(v) => numeric_date(v).ok_or_else(|| invalid("exp is not a NumericDate"))?,
            None => return Err(invalid("missing exp")),
        };
        if now_secs >= exp.saturating_add(JWT_LEEWAY_SECS) {
            return Err(invalid("expired"));
        }
        let latest = now_secs.saturating_add(JWT_LEEWAY_SECS);
        for name in ["nbf", "iat"] {
            if let Some(v) = claims.get(name) {
                let t = numeric_date(v)
                    .ok_or_else(|| CaError::JwtInvalid(format!("{name} is not a NumericDate")))?;
                if t > latest {
                    return Err(CaError::JwtInvalid(format!("{name} is in the future")));
                }
            }
        }

        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => a == audience,
            Some(Value::Array(list)) => {
                if !list.iter().all(Value::is_string) {
                    return Err(invalid("aud must hold strings"));
                }
                list.iter().any(|a| a.as_str() == Some(audience))
            }
            Some(_) => return Err(invalid("aud must be a string or an array of strings")),
            None => return Err(invalid("missing aud")),
        };
        if !aud_ok {
            return Err(invalid("audience not accepted"));
        }

        let sub = claims
            .get("sub")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("missing or non-string sub"))?;
        let id = SpiffeId::parse(sub).map_err(|_| invalid("sub is not a SPIFFE ID"))?;
        if id.trust_domain() != self.trust_domain().as_str() {
            return Err(invalid("sub is not in our trust domain"));
        }
        let jti = match claims.get("jti") {
            None => None,
            Some(Value::String(j)) => Some(j.clone()),
            Some(_) => return Err(invalid("jti must be a string")),
        };

        let claims_json = Value::Object(claims.clone()).to_string();
        Ok(ValidatedJwt {
            spiffe_id: id.as_str().to_owned(),
            claims_json,
            jti,
            expires_at: exp,
        })
    }

    /// This generation's two bundle JWKs: the CA (`x509-svid`) and the JWT key (`jwt-svid`).
    pub(super) fn bundle_keys(&self) -> [Value; 2] {
        let (ca_x, ca_y) = &self.ca_jwk_xy;
        [
            json!({
                "kty": "EC", "crv": "P-256", "x": ca_x, "y": ca_y,
                "use": "x509-svid", "x5c": [STANDARD.encode(&self.ca_der)],
            }),
            json!({
                "kty": "EC", "crv": "P-256", "x": self.jwt.x, "y": self.jwt.y,
                "use": "jwt-svid", "kid": self.jwt.kid,
            }),
        ]
    }

    /// This generation's JWT key as a plain JWK (with `kid` and `alg`).
    pub(super) fn jwks_key(&self) -> Value {
        json!({
            "kty": "EC", "crv": "P-256", "x": self.jwt.x, "y": self.jwt.y,
            "kid": self.jwt.kid, "alg": "ES256",
        })
    }

    /// The SPIFFE bundle (formats.md §1.4): the CA certificate as an
    /// `x509-svid` JWK (no `kid`, `x5c` = standard base64 DER) and the JWT
    /// key as a `jwt-svid` JWK (with `kid`), plus `spiffe_sequence` and
    /// `spiffe_refresh_hint` (seconds).
    pub fn bundle_json(&self, sequence: u64, refresh_hint_secs: u64) -> String {
        let (ca_x, ca_y) = &self.ca_jwk_xy;
        json!({
            "keys": [
                {
                    "kty": "EC",
                    "crv": "P-256",
                    "x": ca_x,
                    "y": ca_y,
                    "use": "x509-svid",
                    "x5c": [STANDARD.encode(&self.ca_der)],
                },
                {
                    "kty": "EC",
                    "crv": "P-256",
                    "x": self.jwt.x,
                    "y": self.jwt.y,
                    "use": "jwt-svid",
                    "kid": self.jwt.kid,
                },
            ],
            "spiffe_sequence": sequence,
            "spiffe_refresh_hint": refresh_hint_secs,
        })
        .to_string()
    }

    /// A plain RFC 7517 JWK Set with only the JWT-SVID key(s), each with
    /// `kid` and `alg` (and, like go-spiffe's `jwtbundle.Marshal`, no
    /// `use`), for relying parties and the Workload API's JWT bundles.
    pub fn jwks_json(&self) -> String {
        json!({
            "keys": [{
                "kty": "EC",
                "crv": "P-256",
                "x": self.jwt.x,
                "y": self.jwt.y,
                "kid": self.jwt.kid,
                "alg": "ES256",
            }]
        })
        .to_string()
    }
}

/// A JWT NumericDate (RFC 7519 §2): integer or fractional seconds, floored.
fn numeric_date(v: &Value) -> Option<i64> {
    if let Some(i) = v.as_i64() {
        return Some(i);
    }
    let f = v.as_f64()?;
    // `as` saturates for out-of-range finite values.
    f.is_finite().then(|| f.floor() as i64)
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header};

    use super::*;
    use crate::ca::tests::{new_ca, NOW_MS};

    const NOW: i64 = NOW_MS / 1000;

    fn id() -> SpiffeId {
        SpiffeId::parse("spiffe://example.org/ci/build").unwrap()
    }

    fn mint(ca: &Ca, auds: &[&str], ttl: i64) -> MintedJwt {
        let auds: Vec<String> = auds.iter().map(|s| s.to_string()).collect();
        ca.mint_jwt(&JwtParams {
            spiffe_id: &id(),
            audiences: &auds,
            now_secs: NOW,
            ttl_secs: ttl,
        })
        .unwrap()
    }

    fn b64json(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn parts(token: &str) -> Vec<String> {
        token.split('.').map(str::to_owned).collect()
    }

    fn decode_part(p: &str) -> Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap()
    }

    #[test]
    fn mint_validate_roundtrip() {
        let (_dir, ca) = new_ca();
        let m = mint(&ca, &["svc-a"], 300);
        assert_eq!(m.expires_at, NOW + 300);
        assert_eq!(m.jti.len(), 32);
        assert!(!format!("{m:?}").contains(&m.token));

        let v = ca.validate_jwt(&m.token, "svc-a", NOW + 10).unwrap();
        assert_eq!(v.spiffe_id, "spiffe://example.org/ci/build");
        assert_eq!(v.expires_at, NOW + 300);
        assert_eq!(v.jti.as_deref(), Some(m.jti.as_str()));
        let claims: Value = serde_json::from_str(&v.claims_json).unwrap();
        assert_eq!(claims["aud"], "svc-a", "one audience is a plain string");
        assert_eq!(claims["iat"], NOW);
        assert_eq!(claims["sub"], "spiffe://example.org/ci/build");

        // Several audiences: an array, any of them validates.
        let m = mint(&ca, &["a", "b"], 300);
        let v = ca.validate_jwt(&m.token, "b", NOW).unwrap();
        let claims: Value = serde_json::from_str(&v.claims_json).unwrap();
        assert_eq!(claims["aud"], json!(["a", "b"]));
    }

    #[test]
    fn header_is_es256_with_kid() {
        let (_dir, ca) = new_ca();
        let m = mint(&ca, &["x"], 60);
        let p = parts(&m.token);
        assert_eq!(p.len(), 3);
        let header = decode_part(&p[0]);
        assert_eq!(
            header,
            json!({"alg": "ES256", "kid": ca.jwt_kid(), "typ": "JWT"})
        );
        assert_eq!(ca.jwt_kid().len(), 43);
        // The ES256 signature is fixed-length r||s.
        assert_eq!(URL_SAFE_NO_PAD.decode(&p[2]).unwrap().len(), 64);
    }

    #[test]
    fn rejects_tampering_wrong_audience_and_expiry() {
        let (_dir, ca) = new_ca();
        let m = mint(&ca, &["svc-a"], 300);

        // Flip a signature character in the middle (the last one may only carry padding bits).
        let mut p = parts(&m.token);
        let mid = p[2].len() / 2;
        let c = if &p[2][mid..=mid] == "A" { "B" } else { "A" };
        p[2].replace_range(mid..=mid, c);
        let err = ca.validate_jwt(&p.join("."), "svc-a", NOW).unwrap_err();
        assert!(
            matches!(err, CaError::JwtInvalid(ref e) if e.contains("signature")),
            "{err}"
        );

        // Claims swapped for a different subject, signature kept.
        let mut p = parts(&m.token);
        let mut claims = decode_part(&p[1]);
        claims["sub"] = json!("spiffe://example.org/admin");
        p[1] = b64json(&claims);
        assert!(matches!(
            ca.validate_jwt(&p.join("."), "svc-a", NOW),
            Err(CaError::JwtInvalid(_))
        ));

        let err = ca.validate_jwt(&m.token, "svc-b", NOW).unwrap_err();
        assert!(
            matches!(err, CaError::JwtInvalid(ref e) if e.contains("audience")),
            "{err}"
        );

        // Valid up to exp + leeway, not after.
        let edge = NOW + 300 + JWT_LEEWAY_SECS;
        assert!(ca.validate_jwt(&m.token, "svc-a", edge - 1).is_ok());
        let err = ca.validate_jwt(&m.token, "svc-a", edge).unwrap_err();
        assert!(
            matches!(err, CaError::JwtInvalid(ref e) if e.contains("expired")),
            "{err}"
        );

        // Issued in the future (beyond leeway).
        let err = ca
            .validate_jwt(&m.token, "svc-a", NOW - JWT_LEEWAY_SECS - 1)
            .unwrap_err();
        assert!(
            matches!(err, CaError::JwtInvalid(ref e) if e.contains("iat")),
            "{err}"
        );

        for junk in [
            "",
            "a.b",
            "a.b.c",
            "a.b.c.d",
            "....",
            &"x".repeat(MAX_JWT_LEN + 1),
        ] {
            assert!(
                matches!(
                    ca.validate_jwt(junk, "svc-a", NOW),
                    Err(CaError::JwtInvalid(_))
                ),
                "{junk:?}"
            );
        }
        assert!(matches!(
            ca.validate_jwt(&m.token, "", NOW),
            Err(CaError::InvalidRequest(_))
        ));
    }

    #[test]
    fn rejects_alg_none_hs256_and_foreign_keys() {
        let (_dir, ca) = new_ca();
        let m = mint(&ca, &["svc-a"], 300);
        let claims_b64 = parts(&m.token)[1].clone();

        // alg none, with our kid, empty and non-empty signature.
        let none = b64json(&json!({"alg": "none", "kid": ca.jwt_kid(), "typ": "JWT"}));
        for sig in ["", "AAAA"] {
            let t = format!("{none}.{claims_b64}.{sig}");
            assert!(matches!(
                ca.validate_jwt(&t, "svc-a", NOW),
                Err(CaError::JwtInvalid(_))
            ));
        }

        // HS256 "signed" with our public key bytes (the classic key-confusion attack),
        // both as the raw point and as the published JWKS text.
        let claims = decode_part(&claims_b64);
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some(ca.jwt_kid().to_owned());
        let point = ca.jwt.signer.public_key().as_ref().to_vec();
        for secret in [point, ca.jwks_json().into_bytes()] {
            let t = jsonwebtoken::encode(&h, &claims, &EncodingKey::from_secret(&secret)).unwrap();
            let err = ca.validate_jwt(&t, "svc-a", NOW).unwrap_err();
            assert!(
                matches!(err, CaError::JwtInvalid(ref e) if e.contains("HS256")),
                "{err}"
            );
        }

        // EdDSA / ES384 headers are refused before any key is consulted.
        for alg in ["EdDSA", "ES384", "RS256", "PS256"] {
            let hdr = b64json(&json!({"alg": alg, "kid": ca.jwt_kid()}));
            let t = format!("{hdr}.{claims_b64}.{}", parts(&m.token)[2]);
            assert!(
                matches!(
                    ca.validate_jwt(&t, "svc-a", NOW),
                    Err(CaError::JwtInvalid(_))
                ),
                "{alg}"
            );
        }

        // Another CA's token: unknown kid; and with our kid forged: bad signature.
        let (_d2, other) = new_ca();
        let foreign = mint(&other, &["svc-a"], 300);
        let err = ca.validate_jwt(&foreign.token, "svc-a", NOW).unwrap_err();
        assert!(
            matches!(err, CaError::JwtInvalid(ref e) if e.contains("kid")),
            "{err}"
        );
        let mut p = parts(&foreign.token);
        p[0] = ca.jwt.header_b64.clone();
        let err = ca.validate_jwt(&p.join("."), "svc-a", NOW).unwrap_err();
        assert!(
            matches!(err, CaError::JwtInvalid(ref e) if e.contains("signature")),
            "{err}"
        );

        // Missing kid.
        let mut p = parts(&m.token);
        p[0] = b64json(&json!({"alg": "ES256", "typ": "JWT"}));
        let err = ca.validate_jwt(&p.join("."), "svc-a", NOW).unwrap_err();
        assert!(
            matches!(err, CaError::JwtInvalid(ref e) if e.contains("kid")),
            "{err}"
        );
    }

    #[test]
    fn rejects_foreign_trust_domain_sub_even_if_signed() {
        // Sign a token with our key by hand whose sub is in another domain.
        let (_dir, ca) = new_ca();
        let claims = json!({"sub": "spiffe://other.org/x", "aud": "a", "exp": NOW + 60});
        let input = format!("{}.{}", ca.jwt.header_b64, b64json(&claims));
        let sig = ca
            .jwt
            .signer
            .sign(&SystemRandom::new(), input.as_bytes())
            .unwrap();
        let t = format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()));
        let err = ca.validate_jwt(&t, "a", NOW).unwrap_err();
        assert!(
            matches!(err, CaError::JwtInvalid(ref e) if e.contains("trust domain")),
            "{err}"
        );
    }

    #[test]
    fn mint_rejects_bad_params() {
        let (_dir, ca) = new_ca();
        let foreign = SpiffeId::parse("spiffe://other.org/x").unwrap();
        let ours = id();
        let one = vec!["a".to_string()];
        let base = JwtParams {
            spiffe_id: &ours,
            audiences: &one,
            now_secs: NOW,
            ttl_secs: 60,
        };
        let empty: Vec<String> = vec![];
        let blank = vec![String::new()];
        for p in [
            JwtParams {
                spiffe_id: &foreign,
                ..base
            },
            JwtParams {
                audiences: &empty,
                ..base
            },
            JwtParams {
                audiences: &blank,
                ..base
            },
            JwtParams {
                ttl_secs: 0,
                ..base
            },
            JwtParams {
                now_secs: i64::MAX,
                ..base
            },
        ] {
            assert!(matches!(ca.mint_jwt(&p), Err(CaError::InvalidRequest(_))));
        }
    }

    #[test]
    fn bundle_json_matches_keys() {
        let (_dir, ca) = new_ca();
        let b: Value = serde_json::from_str(&ca.bundle_json(7, 300)).unwrap();
        assert_eq!(b["spiffe_sequence"], 7);
        assert_eq!(b["spiffe_refresh_hint"], 300);
        let keys = b["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 2);

        let x = &keys[0];
        assert_eq!(
            (x["kty"].as_str(), x["crv"].as_str()),
            (Some("EC"), Some("P-256"))
        );
        assert_eq!(x["use"], "x509-svid");
        assert!(x.get("kid").is_none(), "x509-svid JWKs MUST NOT carry kid");
        let x5c = x["x5c"].as_array().unwrap();
        assert_eq!(x5c.len(), 1);
        let der = STANDARD.decode(x5c[0].as_str().unwrap()).unwrap();
        assert_eq!(der, ca.ca_cert_der());
        // x/y are the CA certificate's public key.
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let mut point = vec![4u8];
        point.extend(URL_SAFE_NO_PAD.decode(x["x"].as_str().unwrap()).unwrap());
        point.extend(URL_SAFE_NO_PAD.decode(x["y"].as_str().unwrap()).unwrap());
        assert_eq!(point, cert.public_key().subject_public_key.data.as_ref());

        let j = &keys[1];
        assert_eq!(
            (j["kty"].as_str(), j["crv"].as_str()),
            (Some("EC"), Some("P-256"))
        );
        assert_eq!(j["use"], "jwt-svid");
        assert_eq!(j["kid"], ca.jwt_kid());
        let mut point = vec![4u8];
        point.extend(URL_SAFE_NO_PAD.decode(j["x"].as_str().unwrap()).unwrap());
        point.extend(URL_SAFE_NO_PAD.decode(j["y"].as_str().unwrap()).unwrap());
        assert_eq!(point, ca.jwt.signer.public_key().as_ref());

        // A relying party using only the bundle can verify our tokens.
        let m = mint(&ca, &["rp"], 60);
        let key =
            DecodingKey::from_ec_components(j["x"].as_str().unwrap(), j["y"].as_str().unwrap())
                .unwrap();
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&["rp"]);
        v.validate_exp = false; // jsonwebtoken reads the system clock; NOW is fixed.
        jsonwebtoken::decode::<Value>(&m.token, &key, &v).unwrap();
    }

    #[test]
    fn jwks_json_is_a_standard_jwk_set() {
        let (_dir, ca) = new_ca();
        let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&ca.jwks_json()).unwrap();
        assert_eq!(set.keys.len(), 1);
        let jwk = set.find(ca.jwt_kid()).unwrap();
        // Our kid is the RFC 7638 thumbprint, as jsonwebtoken computes it too.
        assert_eq!(
            jwk.thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256)
                .unwrap(),
            ca.jwt_kid()
        );
        let m = mint(&ca, &["rp"], 60);
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&["rp"]);
        v.validate_exp = false;
        jsonwebtoken::decode::<Value>(&m.token, &DecodingKey::from_jwk(jwk).unwrap(), &v).unwrap();
    }

    #[test]
    fn numeric_dates() {
        assert_eq!(numeric_date(&json!(5)), Some(5));
        assert_eq!(numeric_date(&json!(5.9)), Some(5));
        assert_eq!(numeric_date(&json!(-1.5)), Some(-2));
        assert_eq!(numeric_date(&json!(u64::MAX)), Some(i64::MAX));
        assert_eq!(numeric_date(&json!("5")), None);
        assert_eq!(numeric_date(&Value::Null), None);
    }
}
