//! `ValidateJWTSVID` on the agent: the JWT-SVID is checked locally against
//! the JWT bundle the agent holds (so validation keeps working while the
//! broker is away), per the JWT-SVID spec (formats.md §1.3): JWS compact
//! form, `alg` among RS/ES/PS 256–512 (never `none`, `HS*` or EdDSA), a
//! `kid` found in the bundle, the signature, `aud` containing the
//! audience, `exp` not passed (30 s leeway), and `sub` a SPIFFE ID of the
//! bundle's trust domain.
//!
//! Unlike the broker's `Identity.ValidateJWT`, this does not consult the
//! revocation list: revoking one `jti` takes effect on the broker, and a
//! JWT-SVID lives minutes.

use jsonwebtoken::{jwk::JwkSet, Algorithm, DecodingKey, Validation};
use serde_json::Value;

use super::state::Bundle;
use crate::identity::SpiffeId;

/// Clock-skew allowance for `exp`, seconds.
const LEEWAY_SECS: i64 = 30;
/// Longest token looked at, bytes.
const MAX_LEN: usize = 16 * 1024;

/// A validated token: its `sub` and all its claims.
#[derive(Debug, Clone)]
pub struct Validated {
    /// `sub`.
    pub spiffe_id: String,
    /// The claims object.
    pub claims: serde_json::Map<String, Value>,
}

/// Validates `token` for `audience` at `now_secs`.
///
/// # Errors
/// A message naming the failed check (safe to return to the caller).
pub fn validate(
    token: &str,
    audience: &str,
    bundle: &Bundle,
    now_secs: i64,
) -> Result<Validated, String> {
    if token.len() > MAX_LEN {
        return Err("token too long".into());
    }
    let header = jsonwebtoken::decode_header(token).map_err(|_| "malformed token".to_owned())?;
    let alg = header.alg;
    if !matches!(
        alg,
        Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::ES256
            | Algorithm::ES384
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512
    ) {
        return Err(format!("algorithm {alg:?} is not allowed for JWT-SVIDs"));
    }
    let kid = header.kid.ok_or("token header has no kid")?;
    let set: JwkSet =
        serde_json::from_str(&bundle.jwks_json).map_err(|_| "JWT bundle unusable".to_owned())?;
    let jwk = set
        .find(&kid)
        .ok_or_else(|| format!("no key {kid:?} in the trust bundle"))?;
    let key = DecodingKey::from_jwk(jwk).map_err(|_| "bundle key unusable".to_owned())?;
    let mut v = Validation::new(alg);
    // exp is checked below against the agent's clock, not the library's.
    v.validate_exp = false;
    v.required_spec_claims.clear();
    v.set_audience(&[audience]);
    let data = jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &key, &v).map_err(
        |e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidAudience => "audience not accepted".to_owned(),
            jsonwebtoken::errors::ErrorKind::InvalidSignature => "bad signature".to_owned(),
            _ => "token rejected".to_owned(),
        },
    )?;
    let claims = data.claims;
    if claims.get("aud").is_none() {
        return Err("token has no aud".into());
    }
    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or("token has no exp")?;
    if now_secs >= exp.saturating_add(LEEWAY_SECS) {
        return Err("token expired".into());
    }
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or("token has no sub")?;
    let id = SpiffeId::parse(sub).map_err(|e| format!("sub: {e}"))?;
    if id.trust_domain() != bundle.trust_domain {
        return Err("sub is not in the bundle's trust domain".into());
    }
    Ok(Validated {
        spiffe_id: id.to_string(),
        claims,
    })
}

/// A JSON value as a protobuf `Value` (for `ValidateJWTSVIDResponse.claims`).
pub fn to_proto_value(v: &Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(to_proto_value).collect(),
        }),
        Value::Object(o) => Kind::StructValue(to_proto_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A JSON object as a protobuf `Struct`.
pub fn to_proto_struct(o: &serde_json::Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: o
            .iter()
            .map(|(k, v)| (k.clone(), to_proto_value(v)))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_convert_to_a_struct() {
        let v: Value =
            serde_json::from_str(r#"{"sub":"spiffe://a/b","aud":["x"],"exp":5,"n":null,"t":true}"#)
                .unwrap();
        let s = to_proto_struct(v.as_object().unwrap());
        use prost_types::value::Kind;
        assert_eq!(
            s.fields["sub"].kind,
            Some(Kind::StringValue("spiffe://a/b".into()))
        );
        assert_eq!(s.fields["exp"].kind, Some(Kind::NumberValue(5.0)));
        assert!(matches!(s.fields["aud"].kind, Some(Kind::ListValue(_))));
        assert_eq!(s.fields["t"].kind, Some(Kind::BoolValue(true)));
    }

    #[test]
    fn rejects_garbage_and_unsigned_tokens() {
        let b = Bundle::from_parts("sigil.local".into(), vec![], r#"{"keys":[]}"#, 1).unwrap();
        assert!(validate("not-a-jwt", "a", &b, 0).is_err());
        // {"alg":"none"} . {"sub":"spiffe://sigil.local/x","aud":"a","exp":9999999999} .
        let none = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJzcGlmZmU6Ly9zaWdpbC5sb2NhbC94IiwiYXVkIjoiYSIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert!(validate(none, "a", &b, 0).is_err());
    }
}
