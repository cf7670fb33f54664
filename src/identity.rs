//! SPIFFE names: [`TrustDomain`] and [`SpiffeId`], validated per the SPIFFE
//! ID specification (§2): lowercase trust domain of `[a-z0-9._-]`, at most
//! 255 bytes; path segments of `[a-zA-Z0-9._-]`, no empty, `.` or `..`
//! segment, no trailing `/`; no query, fragment, port, userinfo or
//! percent-encoding; whole URI at most 2048 bytes.

use std::fmt;

/// Longest SPIFFE ID we accept or generate, in bytes.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain name, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME: &str = "spiffe://";

/// Why a SPIFFE ID or trust domain was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// Empty input.
    #[error("empty")]
    Empty,
    /// Not `spiffe://`.
    #[error("scheme must be spiffe://")]
    Scheme,
    /// Longer than allowed.
    #[error("too long (max {0} bytes)")]
    TooLong(usize),
    /// Bad trust-domain character.
    #[error("trust domain may only contain lowercase letters, digits, '.', '-' and '_'")]
    TrustDomainChar,
    /// Empty trust domain.
    #[error("trust domain is empty")]
    TrustDomainEmpty,
    /// Bad path character (incl. `%`, `?`, `#`).
    #[error("path segments may only contain letters, digits, '.', '-' and '_'")]
    PathChar,
    /// Empty, `.` or `..` segment, or trailing slash.
    #[error("path has an empty, '.' or '..' segment or a trailing '/'")]
    PathSegment,
    /// A workload ID needs a non-root path.
    #[error("a workload SPIFFE ID needs a path (spiffe://<trust-domain>/<path>)")]
    NoPath,
}

/// A validated trust domain name, e.g. `example.org`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (`example.org`) or its ID form (`spiffe://example.org`).
    ///
    /// # Errors
    /// [`IdError`] naming the broken rule.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let name = s.strip_prefix(SCHEME).unwrap_or(s);
        if name.is_empty() {
            return Err(IdError::TrustDomainEmpty);
        }
        if name.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(IdError::TooLong(MAX_TRUST_DOMAIN_LEN));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        {
            return Err(IdError::TrustDomainChar);
        }
        Ok(Self(name.to_owned()))
    }

    /// The bare name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<name>`, the key of bundle maps.
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated workload SPIFFE ID with a non-root path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    td_len: usize,
}

impl SpiffeId {
    /// Parses `spiffe://<trust-domain>/<path>`.
    ///
    /// # Errors
    /// [`IdError`] naming the broken rule.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdError::TooLong(MAX_SPIFFE_ID_LEN));
        }
        let rest = s.strip_prefix(SCHEME).ok_or(IdError::Scheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        TrustDomain::parse(td)?;
        if path.is_empty() {
            return Err(IdError::NoPath);
        }
        for seg in path[1..].split('/') {
            if seg.is_empty() || seg == "." || seg == ".." {
                return Err(IdError::PathSegment);
            }
            if !seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(IdError::PathChar);
            }
        }
        Ok(Self {
            uri: s.to_owned(),
            td_len: td.len(),
        })
    }

    /// The trust domain name.
    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..SCHEME.len() + self.td_len]
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.uri[SCHEME.len() + self.td_len..]
    }

    /// The whole URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_ids() {
        let id = SpiffeId::parse("spiffe://example.org/ci/build-1_x.y").unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(id.path(), "/ci/build-1_x.y");
        assert!(SpiffeId::parse("spiffe://10.0.0.1/a").is_ok());
    }

    #[test]
    fn rejects_invalid_ids() {
        for (s, e) in [
            ("", IdError::Empty),
            ("http://example.org/a", IdError::Scheme),
            ("spiffe://Example.org/a", IdError::TrustDomainChar),
            ("spiffe://example.org:8080/a", IdError::TrustDomainChar),
            ("spiffe://user@example.org/a", IdError::TrustDomainChar),
            ("spiffe:///a", IdError::TrustDomainEmpty),
            ("spiffe://example.org", IdError::NoPath),
            ("spiffe://example.org/", IdError::PathSegment),
            ("spiffe://example.org/a/", IdError::PathSegment),
            ("spiffe://example.org/a//b", IdError::PathSegment),
            ("spiffe://example.org/./b", IdError::PathSegment),
            ("spiffe://example.org/../b", IdError::PathSegment),
            ("spiffe://example.org/a%20b", IdError::PathChar),
            ("spiffe://example.org/a?q=1", IdError::PathChar),
            ("spiffe://example.org/a#f", IdError::PathChar),
        ] {
            assert_eq!(SpiffeId::parse(s).unwrap_err(), e, "{s}");
        }
        let long = format!("spiffe://example.org/{}", "a".repeat(2100));
        assert_eq!(SpiffeId::parse(&long).unwrap_err(), IdError::TooLong(2048));
    }

    #[test]
    fn trust_domain_forms() {
        assert_eq!(TrustDomain::parse("spiffe://a.b").unwrap().as_str(), "a.b");
        assert_eq!(
            TrustDomain::parse("a.b").unwrap().id_string(),
            "spiffe://a.b"
        );
        assert!(TrustDomain::parse(&"a".repeat(256)).is_err());
    }
}

/// Property tests: the SPIFFE parsers never panic, valid IDs round-trip
/// through `Display`, and one forbidden character anywhere is refused.
#[cfg(test)]
mod proptests {
    use proptest::{collection::vec, prelude::*};

    use super::*;

    fn trust_domain() -> impl Strategy<Value = String> {
        "[a-z0-9._-]{1,60}"
    }

    fn segment() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9._-]{1,20}".prop_filter("not . or ..", |s| s != "." && s != "..")
    }

    fn valid_id() -> impl Strategy<Value = (String, Vec<String>)> {
        (trust_domain(), vec(segment(), 1..8))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn parsers_never_panic(s in any::<String>()) {
            let _ = SpiffeId::parse(&s);
            let _ = TrustDomain::parse(&s);
        }

        #[test]
        fn parsers_never_panic_on_near_misses(s in "(spiffe://)?[a-zA-Z0-9._:@%?#/ \\\\-]{0,60}") {
            if let Ok(id) = SpiffeId::parse(&s) {
                prop_assert_eq!(id.to_string(), s.clone());
            }
            if let Ok(td) = TrustDomain::parse(&s) {
                prop_assert_eq!(TrustDomain::parse(&td.id_string()), Ok(td));
            }
        }

        #[test]
        fn valid_ids_round_trip((td, segs) in valid_id()) {
            let path = format!("/{}", segs.join("/"));
            let s = format!("spiffe://{td}{path}");
            let id = SpiffeId::parse(&s).unwrap();
            prop_assert_eq!(id.to_string(), s.clone());
            prop_assert_eq!(id.as_str(), s.as_str());
            prop_assert_eq!(id.trust_domain(), td.as_str());
            prop_assert_eq!(id.path(), path.as_str());
            prop_assert_eq!(SpiffeId::parse(&id.to_string()), Ok(id.clone()));
            let parsed_td = TrustDomain::parse(&td).unwrap();
            prop_assert_eq!(parsed_td.to_string(), td.clone());
            prop_assert_eq!(TrustDomain::parse(&parsed_td.id_string()), Ok(parsed_td));
        }

        #[test]
        fn one_forbidden_character_is_refused(
            (td, segs) in valid_id(),
            bad in prop_oneof![
                Just('%'), Just('?'), Just('#'), Just(':'), Just('@'), Just(' '),
                Just('\\'), Just('é'), Just('\u{0}'), Just('+'), Just('~'),
            ],
            seg_pick in any::<usize>(),
            at in any::<usize>(),
        ) {
            let mut segs = segs;
            let i = seg_pick % segs.len();
            let mut chars: Vec<char> = segs[i].chars().collect();
            let at = at % (chars.len() + 1);
            chars.insert(at, bad);
            segs[i] = chars.into_iter().collect();
            let s = format!("spiffe://{td}/{}", segs.join("/"));
            prop_assert!(SpiffeId::parse(&s).is_err(), "{:?}", s);
        }

        #[test]
        fn uppercase_or_foreign_trust_domain_is_refused(
            td in "[a-z0-9]{0,10}[A-Z:@ %][a-z0-9]{0,10}",
            seg in segment(),
        ) {
            let id = format!("spiffe://{td}/{seg}");
            prop_assert!(TrustDomain::parse(&td).is_err());
            prop_assert!(SpiffeId::parse(&id).is_err());
        }

        #[test]
        fn empty_dot_and_trailing_segments_are_refused(
            (td, segs) in valid_id(),
            bad in prop_oneof![Just(""), Just("."), Just("..")],
            at in any::<usize>(),
        ) {
            let mut segs = segs;
            let at = at % (segs.len() + 1);
            segs.insert(at, bad.to_owned());
            let s = format!("spiffe://{td}/{}", segs.join("/"));
            prop_assert_eq!(SpiffeId::parse(&s), Err(IdError::PathSegment), "{}", s);
        }
    }
}
