//! X.509 certificates: the self-signed CA certificate, X509-SVID leaves
//! (SPIFFE X509-SVID §2–§4, formats.md §1.2) and the broker's own TLS
//! serving certificate.
//!
//! Every leaf is built from a fresh [`CertificateParams`]; nothing from a
//! CSR but its public key ever reaches a certificate (formats.md §6).

use std::net::IpAddr;

use rcgen::{
    string::Ia5String, BasicConstraints, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use time::OffsetDateTime;
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

use super::{csr::VerifiedCsr, keys::P256Signer, Ca, CaError};
use crate::{
    identity::{SpiffeId, TrustDomain},
    secret::Secret,
};

/// How far a leaf's NotBefore is backdated, for clock skew between us and relying parties.
pub const LEAF_BACKDATE_SECS: i64 = 30;
/// Lifetime of [`Ca::serving_cert`] certificates: 30 days.
pub const SERVING_CERT_TTL_SECS: i64 = 30 * 24 * 60 * 60;
/// Organisation in the subject of every certificate we issue.
const ORG: &str = "Sigil";
/// RFC 5280 upper bound for a CommonName (ub-common-name).
const MAX_CN_LEN: usize = 64;

/// Inputs for [`Ca::issue_x509`]. Authorisation happened before this point:
/// the caller decided that this key may hold this ID and these DNS names.
#[derive(Debug, Clone, Copy)]
pub struct X509Params<'a> {
    /// The identity to certify; must be in the CA's trust domain.
    pub spiffe_id: &'a SpiffeId,
    /// The verified CSR; only its public key is used.
    pub csr: &'a VerifiedCsr,
    /// Current time, Unix milliseconds.
    pub now_ms: i64,
    /// Requested lifetime in seconds (> 0); clamped to the CA's NotAfter.
    pub ttl_secs: i64,
    /// Extra DNS SANs (may be empty).
    pub dns_names: &'a [String],
}

/// An issued X509-SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedX509 {
    /// The leaf certificate, DER.
    pub der: Vec<u8>,
    /// Lowercase hex of the serial's DER content bytes (x509-parser `raw_serial()`); 32 characters.
    pub serial_hex: String,
    /// NotBefore, Unix milliseconds (whole seconds).
    pub not_before_ms: i64,
    /// NotAfter, Unix milliseconds (whole seconds).
    pub not_after_ms: i64,
}

impl Ca {
    /// Issues an X509-SVID for `p.spiffe_id` to the CSR's public key:
    /// exactly one URI SAN (the ID) plus `p.dns_names` as DNS SANs; subject
    /// `O=Sigil` (non-empty, so the SAN extension is non-critical);
    /// BasicConstraints `cA=false`; critical KU digitalSignature only; EKU
    /// serverAuth+clientAuth; AKI and SKI; a positive 16-byte serial that
    /// starts with the issuance time and ends with 80 random bits
    /// ([`svid_serial`]); NotBefore `now - 30 s`; NotAfter
    /// `min(now + ttl, CA NotAfter)`.
    ///
    /// # Errors
    /// [`CaError::InvalidRequest`] for an ID outside our trust domain, a
    /// non-positive TTL or a malformed DNS name; [`CaError::Certificate`]
    /// when the CA certificate has expired or signing fails.
    pub fn issue_x509(&self, p: &X509Params<'_>) -> Result<IssuedX509, CaError> {
        self.check_own_domain(p.spiffe_id)?;
        let (not_before, not_after) = self.leaf_validity(p.now_ms, p.ttl_secs)?;

        let mut sans = Vec::with_capacity(1 + p.dns_names.len());
        sans.push(SanType::URI(
            Ia5String::try_from(p.spiffe_id.as_str())
                .map_err(|e| CaError::InvalidRequest(format!("SPIFFE ID: {e}")))?,
        ));
        for name in p.dns_names {
            sans.push(SanType::DnsName(dns_name(name)?));
        }

        let serial = svid_serial(p.now_ms);
        let mut params = leaf_params(sans, &serial, not_before, not_after)?;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params
            .signed_by(&p.csr.rcgen_key, &self.issuer)
            .map_err(|e| CaError::Certificate(format!("signing X509-SVID: {e}")))?;
        Ok(IssuedX509 {
            der: cert.der().to_vec(),
            serial_hex: hex::encode(serial.as_ref()),
            not_before_ms: not_before.saturating_mul(1000),
            not_after_ms: not_after.saturating_mul(1000),
        })
    }

    /// A TLS serving certificate for the broker itself, signed by the CA:
    /// a fresh P-256 key; each entry of `sans` becomes an IP SAN when it
    /// parses as an IP address, else a DNS SAN; EKU serverAuth; lifetime
    /// 30 days capped at the CA's NotAfter.
    ///
    /// Returns the leaf certificate DER and the private key as PKCS#8 DER.
    ///
    /// # Errors
    /// [`CaError::InvalidRequest`] for no or malformed names;
    /// [`CaError::Certificate`] when the CA has expired or signing fails.
    pub fn serving_cert(&self, sans: &[String], now_ms: i64) -> Result<(Vec<u8>, Secret), CaError> {
        if sans.is_empty() {
            return Err(CaError::InvalidRequest(
                "a serving certificate needs at least one DNS name or IP address".into(),
            ));
        }
        let names = sans
            .iter()
            .map(|s| match s.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => dns_name(s).map(SanType::DnsName),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (not_before, not_after) = self.leaf_validity(now_ms, SERVING_CERT_TTL_SECS)?;

        let key = P256Signer::generate()?;
        let serial = random_serial();
        let mut params = leaf_params(names, &serial, not_before, not_after)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| CaError::Certificate(format!("signing serving certificate: {e}")))?;
        Ok((cert.der().to_vec(), key.to_pkcs8()?))
    }

    /// `(NotBefore, NotAfter)` in Unix seconds for a leaf issued at `now_ms`
    /// for `ttl_secs`: backdated by [`LEAF_BACKDATE_SECS`], clamped to the CA.
    fn leaf_validity(&self, now_ms: i64, ttl_secs: i64) -> Result<(i64, i64), CaError> {
        if ttl_secs <= 0 {
            return Err(CaError::InvalidRequest("ttl_secs must be positive".into()));
        }
        let now = now_ms.div_euclid(1000);
        let not_after = now.saturating_add(ttl_secs).min(self.ca_not_after_secs);
        if not_after <= now {
            return Err(CaError::Certificate(format!(
                "the CA certificate expired at {} (Unix seconds); it cannot issue",
                self.ca_not_after_secs
            )));
        }
        Ok((now.saturating_sub(LEAF_BACKDATE_SECS), not_after))
    }
}

/// Parameters shared by every leaf: subject `O=Sigil`, `cA=false` written
/// explicitly, critical KU digitalSignature, AKI, the serial and validity.
/// The caller sets the EKU.
fn leaf_params(
    sans: Vec<SanType>,
    serial: &SerialNumber,
    not_before: i64,
    not_after: i64,
) -> Result<CertificateParams, CaError> {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORG);
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(serial.clone());
    params.not_before = datetime(not_before)?;
    params.not_after = datetime(not_after)?;
    Ok(params)
}

/// A new random positive serial of exactly 16 DER content bytes: the top
/// bit is cleared (so no 0x00 pad is needed) and the next one set (so it
/// never shortens), leaving 126 bits from the CSPRNG — above the 64 bits
/// CA/B Forum asks for and within RFC 5280's 20-octet limit.
fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    rand::fill(&mut b[..]);
    b[0] = (b[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&b)
}

/// An X509-SVID serial: 16 DER content bytes, positive and never shortened
/// (top bits `01`, as in [`random_serial`]), then the issuance time in
/// milliseconds since 1970 (46 bits, big-endian, enough until the year
/// 4200), then 80 bits from the CSPRNG — above CA/B Forum's 64. Serials
/// therefore sort by issuance time, so the store's serial index grows at
/// its tail instead of on a random leaf per certificate (BENCHMARKS.md
/// §1); the time they reveal is the certificate's NotBefore + 30 s.
fn svid_serial(now_ms: i64) -> SerialNumber {
    const TIME_BITS: u32 = 46;
    let ms = u64::try_from(now_ms).unwrap_or(0) & ((1 << TIME_BITS) - 1);
    // The first 48 bits: 0, 1, then the time.
    let head = (1u64 << TIME_BITS) | ms;
    let mut b = [0u8; 16];
    b[..6].copy_from_slice(&head.to_be_bytes()[2..]);
    rand::fill(&mut b[6..]);
    SerialNumber::from_slice(&b)
}

pub(super) fn datetime(unix_secs: i64) -> Result<OffsetDateTime, CaError> {
    OffsetDateTime::from_unix_timestamp(unix_secs)
        .map_err(|_| CaError::InvalidRequest(format!("time {unix_secs} is out of range")))
}

/// Validates a DNS SAN: LDH labels of 1..=63 characters, at most 253 in
/// total, optionally one leading `*` wildcard label. Lowercased.
fn dns_name(name: &str) -> Result<Ia5String, CaError> {
    let bad = || CaError::InvalidRequest(format!("invalid DNS name {name:?}"));
    if name.is_empty() || name.len() > 253 {
        return Err(bad());
    }
    let rest = name.strip_prefix("*.").unwrap_or(name);
    for label in rest.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(bad());
        }
    }
    Ia5String::try_from(name.to_ascii_lowercase()).map_err(|_| bad())
}

/// Builds the self-signed CA certificate (DER) for `signer`.
pub(super) fn self_signed_ca(
    signer: &P256Signer,
    trust_domain: &TrustDomain,
    now_secs: i64,
    backdate_secs: i64,
    ttl_secs: i64,
) -> Result<Vec<u8>, CaError> {
    let cn = format!("Sigil CA {trust_domain}");
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORG);
    // Trust domains may be 255 bytes; keep the CN within RFC 5280's bound.
    // The SAN below carries the full name either way.
    dn.push(
        DnType::CommonName,
        if cn.len() <= MAX_CN_LEN {
            cn
        } else {
            "Sigil CA".to_owned()
        },
    );
    let uri = Ia5String::try_from(trust_domain.id_string())
        .map_err(|e| CaError::InvalidRequest(format!("trust domain: {e}")))?;

    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial());
    params.not_before = datetime(now_secs.saturating_sub(backdate_secs))?;
    params.not_after = datetime(now_secs.saturating_add(ttl_secs))?;
    let cert = params
        .self_signed(signer)
        .map_err(|e| CaError::Certificate(format!("self-signing CA certificate: {e}")))?;
    Ok(cert.der().to_vec())
}

/// What the CA keeps from its own certificate.
pub(super) struct CaCertInfo {
    pub(super) spki_der: Vec<u8>,
    pub(super) public_point: Vec<u8>,
    pub(super) not_after_secs: i64,
}

/// Checks a stored CA certificate before we sign with it: well-formed DER,
/// self-signed, a CA with keyCertSign, exactly one `spiffe://` URI SAN
/// naming `trust_domain` without a path, paired with `signer`, and not expired.
pub(super) fn inspect_ca_cert(
    der: &[u8],
    signer: &P256Signer,
    trust_domain: &TrustDomain,
    now_secs: i64,
) -> Result<CaCertInfo, CaError> {
    let bad = |m: &str| CaError::Certificate(m.to_owned());
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|_| bad("not a DER X.509 certificate"))?;
    if !rest.is_empty() {
        return Err(bad("trailing bytes after the certificate"));
    }

    // Trust domain first: pointing at another domain's directory is the
    // likeliest operator mistake, and the most useful message.
    let sans = cert
        .subject_alternative_name()
        .map_err(|_| bad("malformed subjectAltName"))?
        .ok_or_else(|| bad("no subjectAltName with the trust domain"))?;
    let uris: Vec<&str> = sans
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(bad(
            "expected exactly one URI SAN (spiffe://<trust-domain>)",
        ));
    };
    let stored = uri
        .strip_prefix("spiffe://")
        .filter(|td| !td.contains('/'))
        .and_then(|_| TrustDomain::parse(uri).ok())
        .ok_or_else(|| bad("URI SAN is not a SPIFFE trust-domain ID"))?;
    if stored != *trust_domain {
        return Err(CaError::TrustDomainMismatch {
            stored: stored.as_str().to_owned(),
            configured: trust_domain.as_str().to_owned(),
        });
    }

    if cert.public_key().raw != signer.subject_public_key_info().as_slice() {
        return Err(bad("certificate does not match the CA key"));
    }
    cert.verify_signature(None)
        .map_err(|_| bad("certificate is not self-signed by the CA key"))?;
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    let can_sign = cert
        .key_usage()
        .ok()
        .flatten()
        .is_some_and(|ku| ku.value.key_cert_sign());
    if !is_ca || !can_sign {
        return Err(bad("not a CA certificate (needs cA=true and keyCertSign)"));
    }
    let not_after_secs = cert.validity().not_after.timestamp();
    if not_after_secs <= now_secs {
        return Err(CaError::Certificate(format!(
            "CA certificate expired at {not_after_secs} (Unix seconds); move it away to \
             issue a new one for the same key"
        )));
    }
    Ok(CaCertInfo {
        spki_der: cert.public_key().raw.to_vec(),
        public_point: signer.public_point().to_vec(),
        not_after_secs,
    })
}

#[cfg(test)]
mod tests {
    use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519};
    use x509_parser::prelude::{ParsedExtension, X509Version};

    use super::*;
    use crate::ca::{
        csr::{tests::csr_for, verify_csr},
        tests::{new_ca, NOW_MS},
    };

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn issue(ca: &Ca, csr: &VerifiedCsr, ttl: i64, dns: &[String]) -> IssuedX509 {
        let spiffe_id = id("spiffe://example.org/ci/build");
        ca.issue_x509(&X509Params {
            spiffe_id: &spiffe_id,
            csr,
            now_ms: NOW_MS,
            ttl_secs: ttl,
            dns_names: dns,
        })
        .unwrap()
    }

    /// Asserts every X509-SVID issuer rule of formats.md §1.2 on `der`.
    fn assert_svid(ca: &Ca, issued: &IssuedX509, csr: &VerifiedCsr, dns: &[&str]) {
        let (rest, cert) = X509Certificate::from_der(&issued.der).unwrap();
        assert!(rest.is_empty());
        let (_, ca_cert) = X509Certificate::from_der(ca.ca_cert_der()).unwrap();

        // Signed by the CA, chained by name and key id.
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        assert_eq!(cert.issuer().as_raw(), ca_cert.subject().as_raw());
        let ski = ca_cert
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0),
                _ => None,
            })
            .unwrap();
        let aki = cert
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(a) => Some(a.key_identifier.clone()),
                _ => None,
            })
            .unwrap()
            .unwrap();
        assert_eq!(aki.0, ski);

        // The CSR's key, and nothing else from the CSR.
        assert_eq!(cert.public_key().raw, csr.spki_der());
        let names: Vec<String> = cert
            .subject()
            .iter_attributes()
            .map(|a| format!("{}={}", a.attr_type(), a.as_str().unwrap()))
            .collect();
        assert_eq!(names, vec!["2.5.4.10=Sigil"]);

        // SAN: exactly one URI = the ID, then the DNS names; non-critical
        // is allowed only because the subject is non-empty.
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let uris: Vec<_> = san
            .value
            .general_names
            .iter()
            .filter(|n| matches!(n, GeneralName::URI(_)))
            .collect();
        assert_eq!(
            uris,
            vec![&GeneralName::URI("spiffe://example.org/ci/build")]
        );
        let got_dns: Vec<&str> = san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(*d),
                _ => None,
            })
            .collect();
        assert_eq!(got_dns, dns);
        assert_eq!(san.value.general_names.len(), 1 + dns.len());
        assert!(!cert.subject().as_raw().is_empty());

        // cA=false, explicitly present.
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(!bc.value.ca);
        assert_eq!(bc.value.path_len_constraint, None);
        assert!(!cert.is_ca());

        // KU critical, digitalSignature only.
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.digital_signature());
        assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
        assert_eq!(ku.value.flags, 1, "only digitalSignature");

        // EKU serverAuth + clientAuth, nothing else.
        let eku = cert.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.server_auth && eku.value.client_auth);
        assert!(!eku.value.any && eku.value.other.is_empty());

        // Serial: 16 positive bytes, high entropy, reported as x509-parser sees it.
        let serial = cert.raw_serial();
        assert_eq!(serial.len(), 16);
        assert!(serial[0] & 0x80 == 0 && serial[0] >= 0x40);
        assert_eq!(issued.serial_hex, hex::encode(serial));

        // Validity as reported.
        assert_eq!(
            cert.validity().not_before.timestamp() * 1000,
            issued.not_before_ms
        );
        assert_eq!(
            cert.validity().not_after.timestamp() * 1000,
            issued.not_after_ms
        );
        assert_eq!(issued.not_before_ms, (NOW_MS / 1000 - 30) * 1000);
        assert_eq!(cert.version(), X509Version::V3);
    }

    #[test]
    fn issues_spec_conformant_svids_for_every_key_kind() {
        let (_dir, ca) = new_ca();
        let mut keys: Vec<KeyPair> = [
            &PKCS_ECDSA_P256_SHA256,
            &PKCS_ECDSA_P384_SHA384,
            &PKCS_ED25519,
        ]
        .into_iter()
        .map(|a| KeyPair::generate_for(a).unwrap())
        .collect();
        keys.push(
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap(),
        );
        for k in keys {
            let csr = verify_csr(&csr_for(&k)).unwrap();
            let issued = issue(&ca, &csr, 3600, &[]);
            assert_svid(&ca, &issued, &csr, &[]);
            assert_eq!(issued.not_after_ms, (NOW_MS / 1000 + 3600) * 1000);
        }
    }

    #[test]
    fn svid_serials_sort_by_time_and_keep_80_random_bits() {
        let t = 1_764_000_000_123_i64; // 2025-11-24, in ms
        let a = svid_serial(t);
        let b = svid_serial(t);
        let later = svid_serial(t + 1);
        let (a, b, later) = (a.as_ref(), b.as_ref(), later.as_ref());
        for s in [a, b, later] {
            assert_eq!(s.len(), 16);
            assert_eq!(s[0] >> 6, 0b01, "positive, never shortened");
        }
        // The first 48 bits are 0b01 then the time, big-endian.
        let mut head = [0u8; 8];
        head[2..].copy_from_slice(&a[..6]);
        assert_eq!(u64::from_be_bytes(head), (1 << 46) | t as u64);
        assert_eq!(a[..6], b[..6], "same millisecond, same time part");
        assert_ne!(a[6..], b[6..], "the random part differs");
        // Hex of equal-length big-endian bytes sorts like the numbers.
        assert!(hex::encode(later) > hex::encode(a) && hex::encode(later) > hex::encode(b));
        assert!(svid_serial(t + 3_600_000).as_ref() > later);
        // A clock before 1970 does not panic or go negative.
        assert_eq!(svid_serial(-5).as_ref()[..6], [0x40, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn dns_names_are_added_and_serials_differ() {
        let (_dir, ca) = new_ca();
        let csr = verify_csr(&csr_for(&KeyPair::generate().unwrap())).unwrap();
        let dns = vec![
            "api.example.org".to_string(),
            "*.svc.example.org".to_string(),
        ];
        let a = issue(&ca, &csr, 60, &dns);
        assert_svid(&ca, &a, &csr, &["api.example.org", "*.svc.example.org"]);
        let b = issue(&ca, &csr, 60, &dns);
        assert_ne!(a.serial_hex, b.serial_hex);
    }

    #[test]
    fn not_after_is_clamped_to_ca_expiry() {
        let (_dir, ca) = new_ca();
        let csr = verify_csr(&csr_for(&KeyPair::generate().unwrap())).unwrap();
        let issued = issue(&ca, &csr, i64::MAX, &[]);
        assert_eq!(issued.not_after_ms, ca.ca_not_after_ms());
        assert_svid(&ca, &issued, &csr, &[]);
    }

    #[test]
    fn csr_requests_do_not_leak() {
        let (_dir, ca) = new_ca();
        let k = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["evil.example".to_string(), "10.0.0.1".to_string()])
                .unwrap();
        params.subject_alt_names.push(SanType::URI(
            "spiffe://example.org/admin".try_into().unwrap(),
        ));
        params
            .subject_alt_names
            .push(SanType::URI("spiffe://evil.example/x".try_into().unwrap()));
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        params
            .distinguished_name
            .push(DnType::CommonName, "root-of-all-evil");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Evil Corp");
        let csr = verify_csr(params.serialize_request(&k).unwrap().der()).unwrap();
        let issued = issue(&ca, &csr, 3600, &[]);
        // assert_svid checks: one URI (ours), no DNS/IP, cA=false, KU/EKU ours, subject O=Sigil only.
        assert_svid(&ca, &issued, &csr, &[]);
        let text = String::from_utf8_lossy(&issued.der);
        for leaked in ["evil", "admin", "root-of-all"] {
            assert!(
                !text.contains(leaked),
                "{leaked} leaked into the certificate"
            );
        }
    }

    #[test]
    fn rejects_foreign_ids_bad_ttl_bad_dns_and_expired_ca() {
        let (_dir, ca) = new_ca();
        let csr = verify_csr(&csr_for(&KeyPair::generate().unwrap())).unwrap();
        let foreign = id("spiffe://other.org/x");
        let ours = id("spiffe://example.org/x");
        let base = X509Params {
            spiffe_id: &ours,
            csr: &csr,
            now_ms: NOW_MS,
            ttl_secs: 60,
            dns_names: &[],
        };
        let err = ca
            .issue_x509(&X509Params {
                spiffe_id: &foreign,
                ..base
            })
            .unwrap_err();
        assert!(matches!(err, CaError::InvalidRequest(_)), "{err}");
        for ttl in [0, -5] {
            let err = ca
                .issue_x509(&X509Params {
                    ttl_secs: ttl,
                    ..base
                })
                .unwrap_err();
            assert!(matches!(err, CaError::InvalidRequest(_)), "{err}");
        }
        for bad in [
            "",
            "a..b",
            "-a.b",
            "a b",
            "ex\u{e4}mple.org",
            "a.*.b",
            "x\0y",
        ] {
            let dns = vec![bad.to_string()];
            let err = ca
                .issue_x509(&X509Params {
                    dns_names: &dns,
                    ..base
                })
                .unwrap_err();
            assert!(matches!(err, CaError::InvalidRequest(_)), "{bad:?}: {err}");
        }
        let err = ca
            .issue_x509(&X509Params {
                now_ms: ca.ca_not_after_ms(),
                ..base
            })
            .unwrap_err();
        assert!(
            matches!(err, CaError::Certificate(ref m) if m.contains("expired")),
            "{err}"
        );
    }

    #[test]
    fn serving_cert_is_a_ca_signed_server_cert() {
        use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING};
        let (_dir, ca) = new_ca();
        let sans = vec![
            "sigil.example.org".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ];
        let (der, key) = ca.serving_cert(&sans, NOW_MS).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let (_, ca_cert) = X509Certificate::from_der(ca.ca_cert_der()).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![
                GeneralName::DNSName("sigil.example.org"),
                GeneralName::IPAddress(&[127, 0, 0, 1]),
                GeneralName::IPAddress(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
            ]
        );
        let eku = cert.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.server_auth && !eku.value.client_auth);
        assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
        let life = cert.validity().not_after.timestamp() - NOW_MS / 1000;
        assert_eq!(life, SERVING_CERT_TTL_SECS);
        // The key is PKCS#8 and belongs to the certificate.
        let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, key.expose()).unwrap();
        assert_eq!(
            kp.public_key().as_ref(),
            cert.public_key().subject_public_key.data.as_ref()
        );
        assert!(format!("{key:?}").contains("***"));
        assert!(ca.serving_cert(&[], NOW_MS).is_err());
        assert!(ca.serving_cert(&["bad name".to_string()], NOW_MS).is_err());
    }

    #[test]
    fn serial_shape() {
        for _ in 0..1000 {
            let s = random_serial();
            assert_eq!(s.len(), 16);
            assert_eq!(s.as_ref()[0] & 0xc0, 0x40);
        }
    }
}
