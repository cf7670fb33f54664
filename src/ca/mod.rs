//! The certificate authority: one self-signed ECDSA P-256 CA that issues
//! X509-SVIDs and a separate P-256 key that mints ES256 JWT-SVIDs, both for
//! a single trust domain (SPIFFE X509-SVID and JWT-SVID specs; see
//! `shared/reference/formats.md` §1).
//!
//! Layout: `csr` admits caller keys ([`verify_csr`]), `x509` builds
//! certificates, `jwt` mints and validates tokens and publishes the bundle,
//! `keys` owns key files and the signing seam. Keys are parsed once in
//! [`Ca::load_or_create`] and held for the life of the [`Ca`].
//!
//! Must not: import anything from the crate but `identity`, `secret` and
//! `clock`; know about transports or storage; decide policy (which IDs,
//! names, audiences or TTLs a caller may have: the caller of this module
//! decides, this module only enforces the format rules and the CA's own
//! limits); read the system clock (time is a parameter); or let key bytes
//! reach `Debug`, errors or logs.

use std::{
    fmt, fs, io,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P256_SHA256_FIXED_SIGNING};
use sha2::{Digest, Sha256};

use crate::{
    identity::{SpiffeId, TrustDomain},
    secret::SecretFileError,
};

pub mod csr;
mod jwt;
mod keys;
pub mod ring;
mod x509;

pub use csr::{verify_csr, CsrError, KeyKind, VerifiedCsr, MAX_CSR_LEN};
pub use jwt::{JwtParams, MintedJwt, ValidatedJwt, JWT_LEEWAY_SECS, MAX_JWT_LEN};
pub use x509::{IssuedX509, X509Params, LEAF_BACKDATE_SECS, SERVING_CERT_TTL_SECS};

/// File name of the CA private key inside the CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// File name of the CA certificate inside the CA directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the JWT-SVID signing key inside the CA directory.
pub const JWT_KEY_FILE: &str = "jwt.key";

/// Default CA certificate lifetime: 365 days.
pub const DEFAULT_CA_TTL_SECS: i64 = 365 * 24 * 60 * 60;

/// How far a new CA certificate's NotBefore is backdated, for clock skew.
pub const CA_BACKDATE_SECS: i64 = 60;

/// Knobs for [`Ca::load_or_create`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaOptions {
    /// Lifetime of a newly created CA certificate, in seconds. Ignored when
    /// a CA certificate already exists.
    pub ca_ttl_secs: i64,
}

impl Default for CaOptions {
    fn default() -> Self {
        Self {
            ca_ttl_secs: DEFAULT_CA_TTL_SECS,
        }
    }
}

/// CA failures. Messages name files and rules, never key bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A key could not be generated, parsed or used.
    #[error("CA key: {0}")]
    Key(String),
    /// A certificate could not be built, parsed or does not meet the CA's rules
    /// (including an expired CA certificate).
    #[error("certificate: {0}")]
    Certificate(String),
    /// A JWT-SVID could not be minted.
    #[error("JWT-SVID: {0}")]
    Jwt(String),
    /// A JWT-SVID presented for validation was rejected.
    #[error("invalid JWT-SVID: {0}")]
    JwtInvalid(String),
    /// The CA directory belongs to another trust domain.
    #[error(
        "the CA in this directory is for trust domain {stored:?} but {configured:?} is configured; \
         use one CA directory per trust domain"
    )]
    TrustDomainMismatch {
        /// Trust domain in the stored CA certificate.
        stored: String,
        /// Trust domain the broker is configured with.
        configured: String,
    },
    /// The request itself is unacceptable (foreign trust domain, non-positive
    /// TTL, empty audience, malformed DNS name, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A key file could not be read or written, or is readable by group/world.
    #[error(transparent)]
    SecretFile(#[from] SecretFileError),
    /// Other file I/O (CA certificate, CA directory).
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The trust domain's signing authority: CA key and certificate for
/// X509-SVIDs, and the JWT-SVID key. Cheap to share behind an `Arc`; every
/// method takes `&self`.
pub struct Ca {
    trust_domain: TrustDomain,
    /// The CA key plus the CA certificate's subject and SKI, parsed once.
    issuer: rcgen::Issuer<'static, keys::P256Signer>,
    ca_der: Vec<u8>,
    /// JWK `x` / `y` (base64url) of the CA public key, for the bundle.
    ca_jwk_xy: (String, String),
    ca_not_after_secs: i64,
    ca_pin: String,
    jwt: jwt::JwtKey,
    /// Key generation number in the [`ring::Authority`] (0 when standalone).
    generation: u32,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain.as_str())
            .field("ca_pin", &self.ca_pin)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Loads the CA from `dir` (`ca.key`, `ca.crt`, `jwt.key`), generating
    /// whatever is missing. Keys are ECDSA P-256 PKCS#8 PEM, written `0600`
    /// through [`crate::secret`] and refused when group/world readable. A new
    /// CA certificate is self-signed with `cA=true, pathLen=0`, critical KU
    /// keyCertSign+cRLSign, URI SAN `spiffe://<trust-domain>`, subject
    /// `O=Sigil, CN=Sigil CA <trust-domain>`, a random serial, NotBefore
    /// `now - 60 s` and lifetime `opts.ca_ttl_secs`.
    ///
    /// Returns the CA and `true` when a new CA certificate was created.
    ///
    /// # Errors
    /// - [`CaError::TrustDomainMismatch`] when `dir` holds another domain's CA.
    /// - [`CaError::Certificate`] when `ca.crt` is unusable: not a CA, expired,
    ///   not matching `ca.key`, or badly formed. An expired certificate can be
    ///   moved away; the next start issues a new one for the same key (same pin).
    /// - [`CaError::Key`] / [`CaError::SecretFile`] / [`CaError::Io`] for key and file problems.
    pub fn load_or_create(
        dir: &Path,
        trust_domain: &TrustDomain,
        now_ms: i64,
        opts: CaOptions,
    ) -> Result<(Ca, bool), CaError> {
        if opts.ca_ttl_secs <= 0 {
            return Err(CaError::InvalidRequest(
                "ca_ttl_secs must be positive".into(),
            ));
        }
        let now_secs = now_ms.div_euclid(1000);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;

        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        // A certificate without its key is an operator mistake (lost or
        // misplaced key); generating a fresh key would only bury it.
        if !exists(&key_path)? && exists(&cert_path)? {
            return Err(CaError::Key(format!(
                "{} is missing but {} exists; restore the key or move the certificate away",
                key_path.display(),
                cert_path.display()
            )));
        }
        let (ca_key, _) = keys::load_or_generate_p256(&key_path, &ECDSA_P256_SHA256_ASN1_SIGNING)?;
        let signer = keys::P256Signer::from_key_pair(ca_key);

        let (ca_der, created) = match read_cert_file(&cert_path)? {
            Some(der) => (der, false),
            None => {
                let der = x509::self_signed_ca(
                    &signer,
                    trust_domain,
                    now_secs,
                    CA_BACKDATE_SECS,
                    opts.ca_ttl_secs,
                )?;
                if publish_new_file(
                    &cert_path,
                    keys::pem_encode(keys::CERT_LABEL, &der).as_bytes(),
                )? {
                    (der, true)
                } else {
                    // Another process published first; use theirs.
                    let der = read_cert_file(&cert_path)?.ok_or_else(|| {
                        io_err(&cert_path)(io::Error::new(
                            io::ErrorKind::NotFound,
                            "vanished after create",
                        ))
                    })?;
                    (der, false)
                }
            }
        };

        let info = x509::inspect_ca_cert(&ca_der, &signer, trust_domain, now_secs).map_err(
            |e| match e {
                CaError::Certificate(m) => {
                    CaError::Certificate(format!("{}: {m}", cert_path.display()))
                }
                other => other,
            },
        )?;
        let issuer = rcgen::Issuer::from_ca_cert_der(&ca_der.as_slice().into(), signer)
            .map_err(|e| CaError::Certificate(format!("{}: {e}", cert_path.display())))?;

        let (jwt_key, _) =
            keys::load_or_generate_p256(&dir.join(JWT_KEY_FILE), &ECDSA_P256_SHA256_FIXED_SIGNING)?;
        let jwt = jwt::JwtKey::new(jwt_key)?;

        let ca_jwk_xy = jwt::ec_xy(&info.public_point)
            .ok_or_else(|| CaError::Key("CA key is not ECDSA P-256".into()))?;
        let ca_pin = format!("sha256:{}", hex::encode(Sha256::digest(&info.spki_der)));
        Ok((
            Ca {
                trust_domain: trust_domain.clone(),
                issuer,
                ca_der,
                ca_jwk_xy,
                ca_not_after_secs: info.not_after_secs,
                ca_pin,
                jwt,
                generation: 0,
            },
            created,
        ))
    }

    /// The trust domain this CA signs for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The CA certificate, DER.
    pub fn ca_cert_der(&self) -> &[u8] {
        &self.ca_der
    }

    /// The CA certificate, PEM.
    pub fn ca_cert_pem(&self) -> String {
        keys::pem_encode(keys::CERT_LABEL, &self.ca_der)
    }

    /// The CA certificate's NotAfter, Unix milliseconds. Issued certificates never outlive it.
    pub fn ca_not_after_ms(&self) -> i64 {
        self.ca_not_after_secs.saturating_mul(1000)
    }

    /// `sha256:<lowercase hex SHA-256 of the CA certificate's SubjectPublicKeyInfo DER>`.
    /// Stable across CA certificate re-issues for the same key.
    pub fn ca_pin(&self) -> &str {
        &self.ca_pin
    }

    /// The key generation this CA belongs to (see [`ring`]).
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// An X.509 CRL (RFC 5280 §5) signed by this CA, listing `revoked`
    /// (lowercase hex serial, revocation time in Unix seconds), valid from
    /// `now_ms` until `next_update_ms`.
    ///
    /// # Errors
    /// [`CaError::Certificate`] on a bad serial or signing failure.
    pub fn crl(
        &self,
        revoked: &[(String, i64)],
        crl_number: u64,
        now_ms: i64,
        next_update_ms: i64,
    ) -> Result<Vec<u8>, CaError> {
        let dt = |ms: i64| x509::datetime(ms.div_euclid(1000));
        let mut certs = Vec::with_capacity(revoked.len());
        for (serial, at) in revoked {
            let bytes = hex::decode(serial)
                .map_err(|_| CaError::Certificate(format!("bad serial {serial:?}")))?;
            certs.push(rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(&bytes),
                revocation_time: x509::datetime(*at)?,
                reason_code: None,
                invalidity_date: None,
            });
        }
        let params = rcgen::CertificateRevocationListParams {
            this_update: dt(now_ms)?,
            next_update: dt(next_update_ms)?,
            crl_number: rcgen::SerialNumber::from_slice(&crl_number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.issuer)
            .map_err(|e| CaError::Certificate(format!("signing CRL: {e}")))?;
        Ok(crl.der().to_vec())
    }

    /// Rejects SPIFFE IDs outside our trust domain.
    fn check_own_domain(&self, id: &SpiffeId) -> Result<(), CaError> {
        if id.trust_domain() == self.trust_domain.as_str() {
            Ok(())
        } else {
            Err(CaError::InvalidRequest(format!(
                "{id} is not in trust domain {}",
                self.trust_domain
            )))
        }
    }
}

fn exists(path: &Path) -> Result<bool, CaError> {
    path.try_exists().map_err(io_err(path))
}

/// Reads a PEM certificate file; `Ok(None)` when it does not exist.
fn read_cert_file(path: &Path) -> Result<Option<Vec<u8>>, CaError> {
    let text = match fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    keys::pem_decode(&text, keys::CERT_LABEL)
        .map(|der| Some(der.expose().to_vec()))
        .map_err(|why| CaError::Certificate(format!("{}: {why}", path.display())))
}

/// Atomically publishes a complete new file at `path` (mode 0644): writes
/// and fsyncs a temporary sibling, then hard-links it into place, which
/// fails rather than replaces when `path` exists. Returns `false` when
/// another writer got there first, so readers never see a partial file.
fn publish_new_file(path: &Path, bytes: &[u8]) -> Result<bool, CaError> {
    use std::io::Write;
    let mut nonce = [0u8; 8];
    rand::fill(&mut nonce[..]);
    let tmp = path.with_extension(format!("tmp.{}", hex::encode(nonce)));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        match fs::hard_link(&tmp, path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io_err(path)(e)),
        }
    })();
    // Best effort: a leftover temp file is harmless and never read.
    let _ = fs::remove_file(&tmp);
    result
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// 2026-01-01T00:00:00Z.
    pub(crate) const NOW_MS: i64 = 1_767_225_600_000;

    pub(crate) fn td() -> TrustDomain {
        TrustDomain::parse("example.org").unwrap()
    }

    pub(crate) fn new_ca() -> (tempfile::TempDir, Ca) {
        let dir = tempfile::tempdir().unwrap();
        let (ca, created) =
            Ca::load_or_create(dir.path(), &td(), NOW_MS, CaOptions::default()).unwrap();
        assert!(created);
        (dir, ca)
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn second_load_returns_same_ca() {
        let (dir, a) = new_ca();
        let (b, created) =
            Ca::load_or_create(dir.path(), &td(), NOW_MS + 5_000, CaOptions::default()).unwrap();
        assert!(!created);
        assert_eq!(a.ca_pin(), b.ca_pin());
        assert_eq!(a.ca_cert_der(), b.ca_cert_der());
        assert_eq!(a.jwt_kid(), b.jwt_kid());
        assert_eq!(a.ca_not_after_ms(), b.ca_not_after_ms());
        assert_eq!(mode(&dir.path().join(CA_KEY_FILE)), 0o600);
        assert_eq!(mode(&dir.path().join(JWT_KEY_FILE)), 0o600);
        // The certificate is public; only the keys are secret.
        assert_eq!(mode(&dir.path().join(CA_CERT_FILE)), 0o644);
        // No temp files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 3);
    }

    #[test]
    fn ca_cert_properties() {
        use x509_parser::prelude::*;
        let (_dir, ca) = new_ca();
        let (rest, cert) = X509Certificate::from_der(ca.ca_cert_der()).unwrap();
        assert!(rest.is_empty());
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && bc.value.ca);
        assert_eq!(bc.value.path_len_constraint, Some(0));
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical && ku.value.key_cert_sign() && ku.value.crl_sign());
        assert!(!ku.value.digital_signature());
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("spiffe://example.org")]
        );
        let cn: Vec<_> = cert
            .subject()
            .iter_common_name()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(cn, vec!["Sigil CA example.org"]);
        let o: Vec<_> = cert
            .subject()
            .iter_organization()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(o, vec!["Sigil"]);
        assert_eq!(cert.subject().as_raw(), cert.issuer().as_raw());
        cert.verify_signature(None).unwrap();
        let now = NOW_MS / 1000;
        assert_eq!(cert.validity().not_before.timestamp(), now - 60);
        assert_eq!(
            cert.validity().not_after.timestamp(),
            now + DEFAULT_CA_TTL_SECS
        );
        assert_eq!(ca.ca_not_after_ms(), (now + DEFAULT_CA_TTL_SECS) * 1000);
        assert!(cert.raw_serial().len() >= 16);
        let pin = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(cert.public_key().raw))
        );
        assert_eq!(ca.ca_pin(), pin);
        assert!(ca
            .ca_cert_pem()
            .starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert_eq!(
            keys::pem_decode(ca.ca_cert_pem().as_bytes(), "CERTIFICATE")
                .unwrap()
                .expose(),
            ca.ca_cert_der()
        );
    }

    #[test]
    fn group_readable_key_is_refused() {
        for file in [CA_KEY_FILE, JWT_KEY_FILE] {
            let (dir, _ca) = new_ca();
            let p = dir.path().join(file);
            fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
            let err =
                Ca::load_or_create(dir.path(), &td(), NOW_MS, CaOptions::default()).unwrap_err();
            assert!(
                matches!(err, CaError::SecretFile(SecretFileError::TooOpen { .. })),
                "{file}: {err}"
            );
            assert!(err.to_string().contains("chmod 600"));
        }
    }

    #[test]
    fn other_trust_domain_is_refused() {
        let (dir, _ca) = new_ca();
        let other = TrustDomain::parse("other.example").unwrap();
        match Ca::load_or_create(dir.path(), &other, NOW_MS, CaOptions::default()) {
            Err(CaError::TrustDomainMismatch { stored, configured }) => {
                assert_eq!(stored, "example.org");
                assert_eq!(configured, "other.example");
            }
            other => panic!("expected TrustDomainMismatch, got {other:?}"),
        }
    }

    #[test]
    fn mismatched_key_and_cert_are_refused() {
        let (dir, _ca) = new_ca();
        // Both are P-256 PKCS#8 keys, so only the pairing check can catch this.
        fs::copy(dir.path().join(JWT_KEY_FILE), dir.path().join(CA_KEY_FILE)).unwrap();
        let err = Ca::load_or_create(dir.path(), &td(), NOW_MS, CaOptions::default()).unwrap_err();
        assert!(
            matches!(err, CaError::Certificate(ref m) if m.contains("does not match")),
            "{err}"
        );
    }

    #[test]
    fn missing_key_with_existing_cert_is_refused_not_regenerated() {
        let (dir, _ca) = new_ca();
        let key = dir.path().join(CA_KEY_FILE);
        fs::remove_file(&key).unwrap();
        let err = Ca::load_or_create(dir.path(), &td(), NOW_MS, CaOptions::default()).unwrap_err();
        assert!(
            matches!(err, CaError::Key(ref m) if m.contains("missing")),
            "{err}"
        );
        assert!(!key.exists());
    }

    #[test]
    fn expired_ca_is_refused_and_reissued_for_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let opts = CaOptions { ca_ttl_secs: 3600 };
        let (a, _) = Ca::load_or_create(dir.path(), &td(), NOW_MS, opts).unwrap();
        let later = NOW_MS + 3_601_000;
        let err = Ca::load_or_create(dir.path(), &td(), later, opts).unwrap_err();
        assert!(
            matches!(err, CaError::Certificate(ref m) if m.contains("expired")),
            "{err}"
        );
        fs::remove_file(dir.path().join(CA_CERT_FILE)).unwrap();
        let (b, created) = Ca::load_or_create(dir.path(), &td(), later, opts).unwrap();
        assert!(created);
        assert_eq!(a.ca_pin(), b.ca_pin());
        assert_ne!(a.ca_cert_der(), b.ca_cert_der());
    }

    #[test]
    fn garbage_cert_file_is_refused() {
        let (dir, _ca) = new_ca();
        fs::write(dir.path().join(CA_CERT_FILE), "not a pem").unwrap();
        let err = Ca::load_or_create(dir.path(), &td(), NOW_MS, CaOptions::default()).unwrap_err();
        assert!(matches!(err, CaError::Certificate(_)), "{err}");
    }

    #[test]
    fn bad_ttl_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = Ca::load_or_create(dir.path(), &td(), NOW_MS, CaOptions { ca_ttl_secs: 0 })
            .unwrap_err();
        assert!(matches!(err, CaError::InvalidRequest(_)));
    }

    #[test]
    fn debug_shows_only_domain_and_pin() {
        let (dir, ca) = new_ca();
        let dbg = format!("{ca:?}");
        assert!(
            dbg.contains("example.org") && dbg.contains(ca.ca_pin()),
            "{dbg}"
        );
        let key_pem = fs::read_to_string(dir.path().join(CA_KEY_FILE)).unwrap();
        let key_line = key_pem.lines().nth(1).unwrap();
        assert!(!dbg.contains(&key_line[..20]));
        assert!(dbg.len() < 200, "{dbg}");
    }

    #[test]
    fn ca_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Ca>();
    }
}
