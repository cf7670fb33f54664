//! AWS Nitro Enclaves attestation documents (format `aws_nitro`),
//! formats.md §3 and `aws-nitro-enclaves-nsm-api:docs/attestation_process.md`.
//!
//! A document is a COSE_Sign1 (RFC 9052 §4.2), tagged (CBOR tag 18) or, as
//! the NSM actually emits it, untagged. Its payload is a CBOR map (definite
//! or indefinite length) signed by a P-384 leaf certificate that chains to
//! the AWS Nitro Enclaves Root G1. [`NitroAttestor::attest`] checks, in
//! order, failing closed at the first problem:
//!
//! 1. size ≤ [`MAX_DOCUMENT_LEN`], well-formed CBOR with no trailing bytes;
//! 2. COSE structure: `[protected: bstr, unprotected: map, payload: bstr,
//!    signature: bstr(96)]`, protected header exactly `{1: -35}` (ES384);
//! 3. payload types and limits (§3.2), every field size-capped;
//! 4. the chain `[certificate, cabundle[N-1], …, cabundle[1]]` up to a
//!    *configured* root (`cabundle[0]` is never trusted as an anchor and is
//!    ignored): ECDSA P-384/SHA-384 signatures, issuer/subject names,
//!    validity of every certificate including the root at the document's
//!    `timestamp`, CA + keyCertSign + pathLen on issuers, no unknown
//!    critical extension (RFC 5280 §4.2); CRLs are not used (AWS publishes none);
//! 5. the COSE signature over `["Signature1", protected, h'', payload]`
//!    with the leaf key;
//! 6. broker policy: `timestamp` within `window_secs` of now, a non-empty
//!    `nonce` (returned as [`ReplayGuard::Challenge`] for the broker to
//!    match against an outstanding challenge and consume), not a debug-mode
//!    enclave (PCR0, PCR1 and PCR2 all zero), and the CSR binding:
//!    `public_key` equals the CSR's SPKI DER, or `user_data` equals
//!    SHA-256 of the CSR DER.
//!
//! Must not: panic on any input (no indexing, no unchecked arithmetic), or
//! trust anything in the document before the signature check except to
//! locate the keys that check uses.

use std::collections::{btree_map::Entry, BTreeMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P384_SHA384_ASN1, ECDSA_P384_SHA384_FIXED};
use ciborium::Value;
use x509_parser::{
    certificate::X509Certificate,
    oid_registry::{
        OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_SIG_ECDSA_WITH_SHA384,
        OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER, OID_X509_EXT_BASIC_CONSTRAINTS,
        OID_X509_EXT_EXTENDED_KEY_USAGE, OID_X509_EXT_KEY_USAGE, OID_X509_EXT_SUBJECT_ALT_NAME,
        OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
    },
    prelude::FromDer,
};

use super::{
    config_err, invalid, quoted, sha256, within_window, AttestError, AttestInput, Attestor,
    CsrBinding, ReplayGuard, VerifiedAttestation, MAX_DOCUMENT_LEN,
};

/// The AWS Nitro Enclaves Root G1 certificate shipped in `certs/`
/// (see `certs/README.md`).
pub const AWS_NITRO_ROOT_G1_PEM: &str = include_str!("../../certs/aws-nitro-root-g1.pem");

/// Lowercase hex SHA-256 of the DER of [`AWS_NITRO_ROOT_G1_PEM`] (formats.md
/// §3.5). Checked whenever the shipped root is loaded. This is the
/// certificate's fingerprint, not the `8cf60e2b…` hash of AWS's ZIP file.
pub const AWS_NITRO_ROOT_G1_SHA256: &str =
    "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b";

const FORMAT: &str = "aws_nitro";
/// CBOR tag of COSE_Sign1 (RFC 9052 §2).
const COSE_SIGN1_TAG: u64 = 18;
/// COSE header label `alg` and the ES384 algorithm id (RFC 9053 §2.1).
const COSE_HEADER_ALG: i128 = 1;
const COSE_ALG_ES384: i128 = -35;
/// Raw r‖s for P-384 (not DER).
const SIGNATURE_LEN: usize = 96;
/// Payload limits from the nsm-api validation rules (formats.md §3.2).
const MAX_PAYLOAD_LEN: usize = 16 * 1024;
const MAX_CERT_LEN: usize = 1024;
const MAX_PUBLIC_KEY_LEN: usize = 1024;
/// 512 is the stricter of the CDDL (1024) and the validation rules (512).
const MAX_USER_DATA_LEN: usize = 512;
const MAX_NONCE_LEN: usize = 512;
/// Real module ids look like `i-0123456789abcdef0-enc0123456789abcdef`.
const MAX_MODULE_ID_LEN: usize = 256;
/// At most this many `cabundle` entries (real documents carry 4). Bounds
/// the path length and the work per document.
const MAX_CABUNDLE_LEN: usize = 8;
/// PCR indexes are in `0..32`, and there are 1..=32 of them.
const PCR_COUNT: u64 = 32;
/// PCRs that become selectors (formats.md §3.4).
const SELECTOR_PCRS: [u64; 6] = [0, 1, 2, 3, 4, 8];
/// Our structures nest three levels deep; anything deeper is hostile.
const CBOR_DEPTH_LIMIT: usize = 16;
/// Uncompressed SEC1 P-384 point: 0x04 ‖ X ‖ Y.
const P384_POINT_LEN: usize = 97;

/// Configuration of the `aws_nitro` verifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NitroConfig {
    /// DER of the trusted root certificates (P-384 CAs). Documents must
    /// chain to one of them. Default: the shipped AWS Nitro Enclaves Root G1.
    pub roots_der: Vec<Vec<u8>>,
}

impl NitroConfig {
    /// The shipped AWS Nitro Enclaves Root G1, checked against
    /// [`AWS_NITRO_ROOT_G1_SHA256`].
    ///
    /// # Errors
    /// [`AttestError::Config`] if the shipped file is not one PEM
    /// certificate or its fingerprint differs from the pin.
    pub fn aws() -> Result<Self, AttestError> {
        let cfg = Self::from_pem(AWS_NITRO_ROOT_G1_PEM)?;
        match cfg.roots_der.as_slice() {
            [der] if hex::encode(sha256(der)) == AWS_NITRO_ROOT_G1_SHA256 => Ok(cfg),
            _ => Err(config_err(
                "shipped AWS Nitro root does not match its pinned SHA-256",
            )),
        }
    }

    /// Roots from a PEM bundle (every `CERTIFICATE` block).
    ///
    /// # Errors
    /// [`AttestError::Config`] for a PEM error, a non-certificate block or
    /// an empty bundle. The certificates themselves are checked by
    /// [`NitroAttestor::new`].
    pub fn from_pem(pem: &str) -> Result<Self, AttestError> {
        let mut roots_der = Vec::new();
        for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
            let block = block.map_err(|e| config_err(format!("aws_nitro roots: bad PEM ({e})")))?;
            if block.label != "CERTIFICATE" {
                return Err(config_err(format!(
                    "aws_nitro roots: unexpected PEM block {}",
                    quoted(&block.label)
                )));
            }
            roots_der.push(block.contents);
        }
        if roots_der.is_empty() {
            return Err(config_err("aws_nitro roots: no certificate in PEM"));
        }
        Ok(Self { roots_der })
    }
}

impl Default for NitroConfig {
    /// The shipped AWS root. Should it ever fail its pin (a test guards
    /// that), the roots are empty and [`NitroAttestor::new`] refuses to
    /// start, rather than this constructor panicking.
    fn default() -> Self {
        Self::aws().unwrap_or(Self {
            roots_der: Vec::new(),
        })
    }
}

/// A configured root, reduced to what path validation needs.
#[derive(Debug, Clone)]
struct TrustAnchor {
    subject: Vec<u8>,
    point: Vec<u8>,
    not_before: i64,
    not_after: i64,
    path_len: Option<u32>,
}

/// The `aws_nitro` verifier. Built by [`super::Registry::new`].
#[derive(Debug, Clone)]
pub struct NitroAttestor {
    anchors: Vec<TrustAnchor>,
    /// Certificate signatures already verified (see [`SignatureCache`]).
    verified: Arc<SignatureCache>,
}

/// Remembers which certificate signatures verified under which issuer key,
/// so that the chain links every document from one host repeats (the AWS
/// root → regional → zonal → instance certificates, and the enclave's
/// signing certificate for its later documents) cost one SHA-256 instead of
/// one P-384 verification each. Keyed by SHA-256 over the issuer's point
/// and the whole certificate DER (signature included), so a hit means these
/// exact bytes verified under this exact key; only successes are kept.
/// Names, extensions and validity are still checked on every document, and
/// the document's own COSE signature is always verified. Bounded: emptied
/// when full.
#[derive(Debug, Default)]
struct SignatureCache(Mutex<HashSet<[u8; 32]>>);

/// Entries kept before [`SignatureCache`] starts over (32 bytes each).
const SIGNATURE_CACHE_MAX: usize = 4096;

impl SignatureCache {
    fn key(cert: &X509Certificate<'_>, point: &[u8]) -> [u8; 32] {
        let mut input = Vec::with_capacity(8 + point.len() + cert.as_raw().len());
        input.extend_from_slice(&(point.len() as u64).to_be_bytes());
        input.extend_from_slice(point);
        input.extend_from_slice(cert.as_raw());
        sha256(&input)
    }

    /// Whether `cert`'s signature verifies with `point`, from the cache or
    /// by verifying (and remembering a success).
    fn verify(&self, cert: &X509Certificate<'_>, point: &[u8]) -> Result<(), ()> {
        let key = Self::key(cert, point);
        let lock = || self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if lock().contains(&key) {
            return Ok(());
        }
        verify_cert_signature(cert, point)?;
        let mut seen = lock();
        if seen.len() >= SIGNATURE_CACHE_MAX {
            seen.clear();
        }
        seen.insert(key);
        Ok(())
    }
}

impl NitroAttestor {
    /// Checks the roots and builds the verifier.
    ///
    /// # Errors
    /// [`AttestError::Config`] when there is no root, or a root is not a
    /// well-formed P-384 CA certificate with keyCertSign.
    pub fn new(cfg: &NitroConfig) -> Result<Self, AttestError> {
        if cfg.roots_der.is_empty() {
            return Err(config_err(
                "aws_nitro: no trust roots configured (the default is the shipped AWS root; \
                 did it fail its pin?)",
            ));
        }
        let mut anchors = Vec::with_capacity(cfg.roots_der.len());
        for (i, der) in cfg.roots_der.iter().enumerate() {
            let cert =
                parse_cert(der).map_err(|e| config_err(format!("aws_nitro root #{i}: {e}")))?;
            let point =
                p384_point(&cert).map_err(|e| config_err(format!("aws_nitro root #{i}: {e}")))?;
            let path_len = check_issuer_extensions(&cert, 0)
                .map_err(|e| config_err(format!("aws_nitro root #{i}: {e}")))?;
            check_critical_extensions(&cert)
                .map_err(|e| config_err(format!("aws_nitro root #{i}: {e}")))?;
            anchors.push(TrustAnchor {
                subject: cert.subject().as_raw().to_vec(),
                point: point.to_vec(),
                not_before: cert.validity().not_before.timestamp(),
                not_after: cert.validity().not_after.timestamp(),
                path_len,
            });
        }
        Ok(Self {
            anchors,
            verified: Arc::default(),
        })
    }
}

impl Attestor for NitroAttestor {
    fn format(&self) -> &'static str {
        FORMAT
    }

    #[tracing::instrument(level = "debug", skip_all, fields(format = FORMAT))]
    fn attest(&self, input: &AttestInput<'_>) -> Result<VerifiedAttestation, AttestError> {
        if input.document.len() > MAX_DOCUMENT_LEN {
            return Err(AttestError::TooLarge);
        }
        if input.csr_der.is_empty() || input.csr_spki_der.is_empty() {
            return Err(invalid("no CSR to bind the attestation to"));
        }
        let cose = CoseSign1::parse(input.document)?;
        let doc = Document::parse(&cose.payload)?;

        // Everything above only shaped bytes. From here on: authenticity.
        let leaf_point = self.verify_chain(&doc)?;
        UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, leaf_point)
            .verify(&cose.sig_structure(), &cose.signature)
            .map_err(|_| invalid("COSE signature does not verify with the leaf certificate key"))?;

        // Broker policy on an authentic document.
        if !within_window(
            input.now_ms,
            i128::from(doc.timestamp_ms),
            input.window_secs,
        ) {
            return Err(invalid(format!(
                "stale or future timestamp: {} ms from now, window is {} s",
                i128::from(doc.timestamp_ms) - i128::from(input.now_ms),
                input.window_secs.max(0)
            )));
        }
        let nonce = match &doc.nonce {
            Some(n) if !n.is_empty() => n.clone(),
            Some(_) => return Err(invalid("nonce is empty; request a challenge first")),
            None => return Err(invalid("document has no nonce; request a challenge first")),
        };
        if doc.is_debug_mode() {
            return Err(invalid(
                "debug-mode enclave: PCR0, PCR1 and PCR2 are all zero",
            ));
        }
        let csr_binding = if doc.public_key.as_deref() == Some(input.csr_spki_der) {
            CsrBinding::PublicKey
        } else if doc.user_data.as_deref() == Some(&sha256(input.csr_der)[..]) {
            CsrBinding::UserDataHash
        } else {
            return Err(invalid(
                "key binding mismatch: public_key is not the CSR key and user_data is not \
                 SHA-256 of the CSR",
            ));
        };

        let mut selectors = Vec::with_capacity(SELECTOR_PCRS.len() + 1);
        for (index, value) in &doc.pcrs {
            if SELECTOR_PCRS.contains(index) {
                selectors.push(format!("{FORMAT}:pcr{index}:{}", hex::encode(value)));
            }
        }
        selectors.push(format!("{FORMAT}:module_id:{}", doc.module_id));
        Ok(VerifiedAttestation::new(
            FORMAT,
            selectors,
            ReplayGuard::Challenge(nonce),
            doc.module_id,
            csr_binding,
        ))
    }
}

impl NitroAttestor {
    /// Validates `[certificate, cabundle[N-1], …, cabundle[1]]` up to a
    /// configured anchor at the document's timestamp and returns the
    /// leaf's P-384 point.
    fn verify_chain(&self, doc: &Document) -> Result<Vec<u8>, AttestError> {
        let at_secs = i64::try_from(doc.timestamp_ms / 1000)
            .map_err(|_| invalid("timestamp out of range"))?;

        // path[0] is the leaf; path[i + 1] issued path[i].
        let mut path = Vec::with_capacity(doc.cabundle.len());
        path.push(
            parse_cert(&doc.certificate).map_err(|e| invalid(format!("leaf certificate: {e}")))?,
        );
        for (i, der) in doc.cabundle.iter().enumerate().skip(1).rev() {
            path.push(parse_cert(der).map_err(|e| invalid(format!("cabundle[{i}]: {e}")))?);
        }

        for (i, cert) in path.iter().enumerate() {
            let role = role(i);
            check_signature_algorithm(cert).map_err(|e| invalid(format!("{role}: {e}")))?;
            check_critical_extensions(cert).map_err(|e| invalid(format!("{role}: {e}")))?;
            let validity = cert.validity();
            if !(validity.not_before.timestamp() <= at_secs
                && at_secs <= validity.not_after.timestamp())
            {
                return Err(invalid(format!(
                    "{role} is not valid at the document timestamp (expired or not yet valid)"
                )));
            }
        }

        // The leaf signs the document: it must be a P-384 signing key.
        let leaf = path
            .first()
            .ok_or_else(|| invalid("empty certificate chain"))?;
        let leaf_point = p384_point(leaf)
            .map_err(|e| invalid(format!("leaf certificate: {e}")))?
            .to_vec();
        match leaf.key_usage() {
            Ok(Some(ku)) if !ku.value.digital_signature() => {
                return Err(invalid("leaf certificate: keyUsage lacks digitalSignature"))
            }
            Ok(_) => {}
            Err(_) => return Err(invalid("leaf certificate: malformed or duplicate keyUsage")),
        }

        // Each link: names chain, the issuer is a CA allowed this depth,
        // and its key signed the child. `below` counts the intermediates
        // between the issuer and the leaf (RFC 5280 §4.2.1.9 pathLen).
        for (below, pair) in path.windows(2).enumerate() {
            let [child, issuer] = pair else {
                continue;
            };
            let role = role(below + 1);
            if child.issuer().as_raw() != issuer.subject().as_raw() {
                return Err(invalid(format!(
                    "{} was not issued by {role} (issuer name differs)",
                    self::role(below)
                )));
            }
            check_issuer_extensions(issuer, below).map_err(|e| invalid(format!("{role}: {e}")))?;
            let issuer_point = p384_point(issuer).map_err(|e| invalid(format!("{role}: {e}")))?;
            self.verified.verify(child, issuer_point).map_err(|()| {
                invalid(format!(
                    "signature of {} does not verify with the key of {role}",
                    self::role(below)
                ))
            })?;
        }

        // The top of the path must be issued by a configured root.
        let top = path
            .last()
            .ok_or_else(|| invalid("empty certificate chain"))?;
        let intermediates = path.len().saturating_sub(1);
        let mut named = false;
        for anchor in &self.anchors {
            if top.issuer().as_raw() != anchor.subject.as_slice() {
                continue;
            }
            named = true;
            if self.verified.verify(top, &anchor.point).is_err() {
                continue;
            }
            if !(anchor.not_before <= at_secs && at_secs <= anchor.not_after) {
                return Err(invalid(
                    "root certificate is not valid at the document timestamp",
                ));
            }
            if anchor
                .path_len
                .is_some_and(|max| u64::from(max) < intermediates as u64)
            {
                return Err(invalid("root certificate: pathLen exceeded"));
            }
            return Ok(leaf_point);
        }
        Err(invalid(if named {
            "certificate chain does not lead to a configured root (root signature does not verify)"
        } else {
            "certificate chain does not lead to a configured root (unknown issuer)"
        }))
    }
}

/// Names chain position `i` for messages (0 = leaf).
fn role(i: usize) -> String {
    if i == 0 {
        "leaf certificate".to_owned()
    } else {
        format!("intermediate certificate #{i} above the leaf")
    }
}

/// The decoded COSE_Sign1 envelope.
struct CoseSign1 {
    protected: Vec<u8>,
    payload: Vec<u8>,
    signature: Vec<u8>,
}

impl CoseSign1 {
    fn parse(document: &[u8]) -> Result<Self, AttestError> {
        let value = match decode_cbor(document, "document")? {
            Value::Tag(COSE_SIGN1_TAG, inner) => *inner,
            Value::Tag(tag, _) => {
                return Err(invalid(format!(
                    "COSE_Sign1: unexpected CBOR tag {tag} (only 18 or untagged)"
                )))
            }
            other => other,
        };
        let Value::Array(items) = value else {
            return Err(invalid("COSE_Sign1: not a CBOR array"));
        };
        let [protected, unprotected, payload, signature] =
            <[Value; 4]>::try_from(items).map_err(|items| {
                invalid(format!(
                    "COSE_Sign1: expected an array of 4 items, got {}",
                    items.len()
                ))
            })?;

        let Value::Bytes(protected) = protected else {
            return Err(invalid("COSE_Sign1: protected header is not a byte string"));
        };
        check_protected_header(&protected)?;
        if !matches!(unprotected, Value::Map(_)) {
            return Err(invalid("COSE_Sign1: unprotected header is not a map"));
        }
        let Value::Bytes(payload) = payload else {
            return Err(invalid("COSE_Sign1: payload is not a byte string"));
        };
        if payload.is_empty() || payload.len() > MAX_PAYLOAD_LEN {
            return Err(invalid(format!(
                "COSE_Sign1: payload must be 1..={MAX_PAYLOAD_LEN} bytes"
            )));
        }
        let Value::Bytes(signature) = signature else {
            return Err(invalid("COSE_Sign1: signature is not a byte string"));
        };
        if signature.len() != SIGNATURE_LEN {
            return Err(invalid(format!(
                "COSE_Sign1: signature must be {SIGNATURE_LEN} bytes (raw r||s), got {}",
                signature.len()
            )));
        }
        Ok(Self {
            protected,
            payload,
            signature,
        })
    }

    /// `Sig_structure = ["Signature1", protected, external_aad = h'', payload]`
    /// (RFC 9052 §4.4), in the deterministic encoding signers use.
    fn sig_structure(&self) -> Vec<u8> {
        const CONTEXT: &[u8] = b"Signature1";
        let mut out = Vec::with_capacity(self.protected.len() + self.payload.len() + 32);
        out.push(0x84); // array(4)
        out.push(0x60 | CONTEXT.len() as u8); // text(10)
        out.extend_from_slice(CONTEXT);
        push_bstr(&mut out, &self.protected);
        push_bstr(&mut out, &[]);
        push_bstr(&mut out, &self.payload);
        out
    }
}

/// The protected header must be exactly `{1: -35}`: ES384 and nothing else
/// (formats.md §3.3 step 1).
fn check_protected_header(protected: &[u8]) -> Result<(), AttestError> {
    let Value::Map(entries) = decode_cbor(protected, "protected header")? else {
        return Err(invalid("COSE_Sign1: protected header is not a map"));
    };
    match entries.as_slice() {
        [(Value::Integer(label), Value::Integer(alg))] if i128::from(*label) == COSE_HEADER_ALG => {
            let alg = i128::from(*alg);
            if alg == COSE_ALG_ES384 {
                Ok(())
            } else {
                Err(invalid(format!(
                    "COSE_Sign1: algorithm {alg} is not ES384 (-35)"
                )))
            }
        }
        _ => Err(invalid(
            "COSE_Sign1: protected header must be exactly {1: -35} (alg ES384)",
        )),
    }
}

/// Appends a definite-length CBOR byte string header and `bytes`.
fn push_bstr(out: &mut Vec<u8>, bytes: &[u8]) {
    const MAJOR: u8 = 0x40;
    let len = bytes.len();
    if let Ok(small) = u8::try_from(len) {
        if small < 24 {
            out.push(MAJOR | small);
        } else {
            out.push(MAJOR | 24);
            out.push(small);
        }
    } else if let Ok(len) = u16::try_from(len) {
        out.push(MAJOR | 25);
        out.extend_from_slice(&len.to_be_bytes());
    } else if let Ok(len) = u32::try_from(len) {
        out.push(MAJOR | 26);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.push(MAJOR | 27);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(bytes);
}

/// Decodes exactly one CBOR item from `bytes`, refusing trailing bytes and
/// nesting deeper than [`CBOR_DEPTH_LIMIT`].
fn decode_cbor(bytes: &[u8], what: &str) -> Result<Value, AttestError> {
    let mut rest = bytes;
    let value: Value = ciborium::de::from_reader_with_recursion_limit(&mut rest, CBOR_DEPTH_LIMIT)
        .map_err(|e| {
            // Summarise: never echo decoded content into the message.
            let why = match e {
                ciborium::de::Error::Io(_) => "truncated".to_owned(),
                ciborium::de::Error::Syntax(at) => format!("syntax error at byte {at}"),
                ciborium::de::Error::Semantic(Some(at), _) => format!("invalid item at byte {at}"),
                ciborium::de::Error::Semantic(None, _) => "invalid item".to_owned(),
                ciborium::de::Error::RecursionLimitExceeded => "nested too deeply".to_owned(),
            };
            invalid(format!("{what}: malformed CBOR ({why})"))
        })?;
    if !rest.is_empty() {
        return Err(invalid(format!(
            "{what}: {} trailing bytes after the CBOR item",
            rest.len()
        )));
    }
    Ok(value)
}

/// The attestation document payload (formats.md §3.2), validated.
struct Document {
    module_id: String,
    timestamp_ms: u64,
    pcrs: BTreeMap<u64, Vec<u8>>,
    certificate: Vec<u8>,
    cabundle: Vec<Vec<u8>>,
    public_key: Option<Vec<u8>>,
    user_data: Option<Vec<u8>>,
    nonce: Option<Vec<u8>>,
}

impl Document {
    fn parse(payload: &[u8]) -> Result<Self, AttestError> {
        let Value::Map(entries) = decode_cbor(payload, "payload")? else {
            return Err(invalid("payload is not a CBOR map"));
        };
        let mut fields = BTreeMap::new();
        for (key, value) in entries {
            let Value::Text(key) = key else {
                return Err(invalid("payload has a non-text key"));
            };
            match fields.entry(key) {
                Entry::Occupied(e) => {
                    return Err(invalid(format!(
                        "payload has duplicate key {}",
                        quoted(e.key())
                    )))
                }
                Entry::Vacant(e) => {
                    e.insert(value);
                }
            }
        }
        // Unknown keys are ignored: they are signed, but we give them no meaning.
        let mut take = |name: &str| fields.remove(name);

        let module_id = match take("module_id") {
            Some(Value::Text(s)) => s,
            other => return Err(field_type("module_id", "a text string", other.as_ref())),
        };
        if module_id.is_empty()
            || module_id.len() > MAX_MODULE_ID_LEN
            || !module_id.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(invalid(format!(
                "module_id must be 1..={MAX_MODULE_ID_LEN} printable ASCII characters"
            )));
        }

        match take("digest") {
            Some(Value::Text(s)) if s == "SHA384" => {}
            Some(Value::Text(s)) => {
                return Err(invalid(format!("digest {} is not \"SHA384\"", quoted(&s))))
            }
            other => return Err(field_type("digest", "a text string", other.as_ref())),
        }

        let timestamp_ms = match take("timestamp") {
            Some(Value::Integer(i)) => u64::try_from(i)
                .ok()
                .filter(|t| *t > 0 && i64::try_from(*t).is_ok())
                .ok_or_else(|| invalid("timestamp must be a positive number of milliseconds"))?,
            other => {
                return Err(field_type(
                    "timestamp",
                    "an unsigned integer",
                    other.as_ref(),
                ))
            }
        };

        let pcrs = match take("pcrs") {
            Some(Value::Map(entries)) => parse_pcrs(entries)?,
            other => return Err(field_type("pcrs", "a map", other.as_ref())),
        };

        let certificate = match take("certificate") {
            Some(Value::Bytes(b)) => bounded("certificate", b, 1, MAX_CERT_LEN)?,
            other => return Err(field_type("certificate", "a byte string", other.as_ref())),
        };

        let cabundle = match take("cabundle") {
            Some(Value::Array(items)) => {
                if items.is_empty() || items.len() > MAX_CABUNDLE_LEN {
                    return Err(invalid(format!(
                        "cabundle must have 1..={MAX_CABUNDLE_LEN} entries"
                    )));
                }
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.into_iter().enumerate() {
                    let Value::Bytes(b) = item else {
                        return Err(invalid(format!("cabundle[{i}] is not a byte string")));
                    };
                    out.push(bounded(&format!("cabundle[{i}]"), b, 1, MAX_CERT_LEN)?);
                }
                out
            }
            other => return Err(field_type("cabundle", "an array", other.as_ref())),
        };

        let public_key = optional_bytes("public_key", take("public_key"), 1, MAX_PUBLIC_KEY_LEN)?;
        let user_data = optional_bytes("user_data", take("user_data"), 0, MAX_USER_DATA_LEN)?;
        let nonce = optional_bytes("nonce", take("nonce"), 0, MAX_NONCE_LEN)?;

        Ok(Self {
            module_id,
            timestamp_ms,
            pcrs,
            certificate,
            cabundle,
            public_key,
            user_data,
            nonce,
        })
    }

    /// A debug-mode enclave reports all-zero PCR0, PCR1 and PCR2
    /// (formats.md §3.3 step 8). An absent PCR counts as zero, so a
    /// document cannot dodge the check by leaving them out.
    fn is_debug_mode(&self) -> bool {
        [0u64, 1, 2]
            .iter()
            .all(|i| self.pcrs.get(i).is_none_or(|v| v.iter().all(|b| *b == 0)))
    }
}

/// `pcrs`: 1..=32 entries, index in `0..32`, value of 32, 48 or 64 bytes.
fn parse_pcrs(entries: Vec<(Value, Value)>) -> Result<BTreeMap<u64, Vec<u8>>, AttestError> {
    if entries.is_empty() || entries.len() as u64 > PCR_COUNT {
        return Err(invalid(format!("pcrs must have 1..={PCR_COUNT} entries")));
    }
    let mut pcrs = BTreeMap::new();
    for (index, value) in entries {
        let index = match index {
            Value::Integer(i) => u64::try_from(i).ok().filter(|i| *i < PCR_COUNT),
            _ => None,
        }
        .ok_or_else(|| invalid(format!("pcrs: index must be an integer in 0..{PCR_COUNT}")))?;
        let Value::Bytes(value) = value else {
            return Err(invalid(format!("pcrs: PCR{index} is not a byte string")));
        };
        if ![32, 48, 64].contains(&value.len()) {
            return Err(invalid(format!(
                "pcrs: PCR{index} must be 32, 48 or 64 bytes, got {}",
                value.len()
            )));
        }
        if pcrs.insert(index, value).is_some() {
            return Err(invalid(format!("pcrs: duplicate PCR{index}")));
        }
    }
    Ok(pcrs)
}

/// The error for a missing, null or mistyped required field.
fn field_type(name: &str, expected: &str, got: Option<&Value>) -> AttestError {
    match got {
        None => invalid(format!("{name} is missing")),
        Some(Value::Null) => invalid(format!("{name} is null")),
        Some(_) => invalid(format!("{name} is not {expected}")),
    }
}

/// Enforces `min..=max` bytes.
fn bounded(name: &str, bytes: Vec<u8>, min: usize, max: usize) -> Result<Vec<u8>, AttestError> {
    if bytes.len() < min || bytes.len() > max {
        return Err(invalid(format!(
            "{name} must be {min}..={max} bytes, got {}",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// An optional byte-string field; CBOR null means absent (real NSM documents
/// carry `public_key: null`).
fn optional_bytes(
    name: &str,
    value: Option<Value>,
    min: usize,
    max: usize,
) -> Result<Option<Vec<u8>>, AttestError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bytes(b)) => bounded(name, b, min, max).map(Some),
        Some(_) => Err(invalid(format!("{name} is not a byte string or null"))),
    }
}

/// Parses one DER certificate, refusing trailing bytes.
fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("not a DER X.509 certificate ({e})"))?;
    if !rest.is_empty() {
        return Err(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        ));
    }
    Ok(cert)
}

/// The certificate's key as an uncompressed P-384 point.
fn p384_point<'a>(cert: &'a X509Certificate<'_>) -> Result<&'a [u8], String> {
    let spki = cert.public_key();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY
        || curve.as_ref() != Some(&OID_NIST_EC_P384)
    {
        return Err("key is not ECDSA P-384".to_owned());
    }
    let point: &[u8] = spki.subject_public_key.data.as_ref();
    if spki.subject_public_key.unused_bits != 0
        || point.len() != P384_POINT_LEN
        || point.first() != Some(&0x04)
    {
        return Err("P-384 key is not an uncompressed point".to_owned());
    }
    Ok(point)
}

/// Only ecdsa-with-SHA384, consistently in the TBS and outer algorithm.
fn check_signature_algorithm(cert: &X509Certificate<'_>) -> Result<(), String> {
    if cert.signature_algorithm.algorithm != OID_SIG_ECDSA_WITH_SHA384
        || cert.tbs_certificate.signature.algorithm != OID_SIG_ECDSA_WITH_SHA384
    {
        return Err("not signed with ecdsa-with-SHA384".to_owned());
    }
    Ok(())
}

/// RFC 5280 §4.2: a critical extension we do not process fails the path.
fn check_critical_extensions(cert: &X509Certificate<'_>) -> Result<(), String> {
    for ext in cert.extensions() {
        let known = [
            &OID_X509_EXT_BASIC_CONSTRAINTS,
            &OID_X509_EXT_KEY_USAGE,
            &OID_X509_EXT_EXTENDED_KEY_USAGE,
            &OID_X509_EXT_SUBJECT_ALT_NAME,
            &OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
            &OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER,
        ];
        if ext.critical && !known.contains(&&ext.oid) {
            return Err(format!("unsupported critical extension {}", ext.oid));
        }
        if ext.critical && ext.parsed_extension().error().is_some() {
            return Err(format!("malformed critical extension {}", ext.oid));
        }
    }
    Ok(())
}

/// An issuer must be a CA (basicConstraints cA) allowed to sign
/// certificates (keyUsage keyCertSign when present; RFC 5280 §4.2.1.3), with
/// a pathLen of at least `below` intermediates. Returns the pathLen.
fn check_issuer_extensions(
    cert: &X509Certificate<'_>,
    below: usize,
) -> Result<Option<u32>, String> {
    let bc = cert
        .basic_constraints()
        .map_err(|_| "duplicate basicConstraints".to_owned())?
        .ok_or_else(|| "not a CA (no basicConstraints)".to_owned())?;
    if !bc.value.ca {
        return Err("not a CA (basicConstraints cA is false)".to_owned());
    }
    let ku = cert
        .key_usage()
        .map_err(|_| "malformed or duplicate keyUsage".to_owned())?
        .ok_or_else(|| "CA without keyUsage".to_owned())?;
    if !ku.value.key_cert_sign() {
        return Err("keyUsage lacks keyCertSign".to_owned());
    }
    let path_len = bc.value.path_len_constraint;
    if path_len.is_some_and(|max| u64::from(max) < below as u64) {
        return Err(format!(
            "pathLen {} exceeded ({below} intermediates below)",
            path_len.unwrap_or_default()
        ));
    }
    Ok(path_len)
}

/// Verifies `cert`'s ECDSA P-384/SHA-384 signature (DER-encoded) with `point`.
fn verify_cert_signature(cert: &X509Certificate<'_>, point: &[u8]) -> Result<(), ()> {
    if cert.signature_value.unused_bits != 0 {
        return Err(());
    }
    UnparsedPublicKey::new(&ECDSA_P384_SHA384_ASN1, point)
        .verify(
            cert.tbs_certificate.as_ref(),
            cert.signature_value.data.as_ref(),
        )
        .map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::testing::{test_csr, NitroPki, Opt, NOW_MS};

    const WINDOW: i64 = 300;

    fn attestor(pki: &NitroPki) -> NitroAttestor {
        NitroAttestor::new(&pki.nitro_config()).unwrap()
    }

    fn run(
        pki: &NitroPki,
        doc: &[u8],
        csr: &(Vec<u8>, Vec<u8>),
        now_ms: i64,
    ) -> Result<VerifiedAttestation, AttestError> {
        run_on(&attestor(pki), doc, csr, now_ms)
    }

    /// [`run`] with a given verifier (to keep its state between documents).
    fn run_on(
        a: &NitroAttestor,
        doc: &[u8],
        csr: &(Vec<u8>, Vec<u8>),
        now_ms: i64,
    ) -> Result<VerifiedAttestation, AttestError> {
        a.attest(&AttestInput {
            document: doc,
            csr_der: &csr.0,
            csr_spki_der: &csr.1,
            now_ms,
            window_secs: WINDOW,
        })
    }

    fn err(r: Result<VerifiedAttestation, AttestError>) -> String {
        match r {
            Err(AttestError::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn shipped_root_matches_pin_and_loads() {
        let (_, pem) = x509_parser::pem::parse_x509_pem(AWS_NITRO_ROOT_G1_PEM.as_bytes()).unwrap();
        assert_eq!(
            hex::encode(sha256(&pem.contents)),
            "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
        );
        assert_eq!(pem.contents.len(), 533);
        let cfg = NitroConfig::default();
        assert_eq!(cfg.roots_der, vec![pem.contents]);
        let a = NitroAttestor::new(&cfg).unwrap();
        assert_eq!(a.anchors.len(), 1);
        // 2019-10-28T13:28:05Z .. 2049-10-28T14:28:05Z
        assert_eq!(a.anchors[0].not_before, 1_572_269_285);
        assert_eq!(a.anchors[0].not_after, 2_519_044_085);
        assert_eq!(a.anchors[0].path_len, None);
    }

    #[test]
    fn config_rejects_bad_roots() {
        assert!(matches!(
            NitroAttestor::new(&NitroConfig { roots_der: vec![] }),
            Err(AttestError::Config(_))
        ));
        assert!(matches!(
            NitroAttestor::new(&NitroConfig {
                roots_der: vec![vec![1, 2, 3]]
            }),
            Err(AttestError::Config(_))
        ));
        // A leaf (not a CA) is no root.
        let pki = NitroPki::new();
        let e = NitroAttestor::new(&NitroConfig {
            roots_der: vec![pki.leaf_der().to_vec()],
        })
        .unwrap_err();
        assert!(
            matches!(e, AttestError::Config(ref m) if m.contains("not a CA")),
            "{e}"
        );
        assert!(NitroConfig::from_pem("nothing here").is_err());
    }

    #[test]
    fn happy_path_untagged_and_tagged_definite_and_indefinite() {
        let pki = NitroPki::new();
        let csr = test_csr();
        for (tagged, indefinite) in [(false, false), (true, false), (false, true), (true, true)] {
            let doc = pki
                .document()
                .public_key(Opt::Bytes(csr.1.clone()))
                .tagged(tagged)
                .indefinite(indefinite)
                .build();
            if tagged {
                assert_eq!(doc.first(), Some(&0xd2));
            } else {
                assert_eq!(doc.first(), Some(&0x84));
            }
            let v = run(&pki, &doc, &csr, NOW_MS).unwrap();
            assert_eq!(v.format(), "aws_nitro");
            assert_eq!(v.node(), "i-0123456789abcdef0-enc0123456789abcdef");
            assert_eq!(v.csr_binding(), CsrBinding::PublicKey);
            assert_eq!(
                v.replay_guard(),
                &ReplayGuard::Challenge(b"challenge-0123456789".to_vec())
            );
            let pcr0 = format!("aws_nitro:pcr0:{}", hex::encode([0x11u8; 48]));
            assert!(v.selectors().contains(&pcr0), "{:?}", v.selectors());
            assert!(v.selectors().contains(
                &"aws_nitro:module_id:i-0123456789abcdef0-enc0123456789abcdef".to_owned()
            ));
            // PCR 5 is present in the document but is not a selector PCR.
            assert!(!v
                .selectors()
                .iter()
                .any(|s| s.starts_with("aws_nitro:pcr5:")));
            assert_eq!(v.selectors().len(), 7, "{:?}", v.selectors());
        }
    }

    #[test]
    fn user_data_hash_binding_accepted() {
        let pki = NitroPki::new();
        let csr = test_csr();
        let doc = pki
            .document()
            .user_data(Opt::Bytes(sha256(&csr.0).to_vec()))
            .build();
        let v = run(&pki, &doc, &csr, NOW_MS).unwrap();
        assert_eq!(v.csr_binding(), CsrBinding::UserDataHash);
    }

    #[test]
    fn null_public_key_is_absent() {
        let pki = NitroPki::new();
        let csr = test_csr();
        let doc = pki
            .document()
            .public_key(Opt::Null)
            .user_data(Opt::Bytes(sha256(&csr.0).to_vec()))
            .nonce(Opt::Bytes(vec![7; 32]))
            .build();
        let v = run(&pki, &doc, &csr, NOW_MS).unwrap();
        assert_eq!(v.csr_binding(), CsrBinding::UserDataHash);
        // And null public_key with nothing else binds nothing.
        let doc = pki.document().public_key(Opt::Null).build();
        assert_eq!(
            err(run(&pki, &doc, &csr, NOW_MS)).split(':').next(),
            Some("key binding mismatch")
        );
    }

    #[test]
    fn key_binding_mismatch() {
        let pki = NitroPki::new();
        let csr = test_csr();
        let other = test_csr();
        let doc = pki
            .document()
            .public_key(Opt::Bytes(other.1.clone()))
            .build();
        assert!(err(run(&pki, &doc, &csr, NOW_MS)).starts_with("key binding mismatch"));
        let doc = pki
            .document()
            .user_data(Opt::Bytes(sha256(&other.0).to_vec()))
            .build();
        assert!(err(run(&pki, &doc, &csr, NOW_MS)).starts_with("key binding mismatch"));
        // user_data equal to the SPKI hash (not the CSR hash) is not accepted.
        let doc = pki
            .document()
            .user_data(Opt::Bytes(sha256(&csr.1).to_vec()))
            .build();
        assert!(err(run(&pki, &doc, &csr, NOW_MS)).starts_with("key binding mismatch"));
    }

    #[test]
    fn malformed_cbor_and_cose_structure() {
        let pki = NitroPki::new();
        let csr = test_csr();
        assert!(err(run(&pki, &[], &csr, NOW_MS)).contains("malformed CBOR"));
        assert!(err(run(&pki, &[0x84, 0x44, 0xa1], &csr, NOW_MS)).contains("malformed CBOR"));
        assert!(err(run(&pki, &[0xff; 10], &csr, NOW_MS)).contains("malformed CBOR"));
        let good = pki.document().public_key(Opt::Bytes(csr.1.clone())).build();
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(err(run(&pki, &trailing, &csr, NOW_MS)).contains("trailing bytes"));

        let items = pki
            .document()
            .public_key(Opt::Bytes(csr.1.clone()))
            .build_items();
        let three = encode(&Value::Array(items[..3].to_vec()));
        assert_eq!(
            err(run(&pki, &three, &csr, NOW_MS)),
            "COSE_Sign1: expected an array of 4 items, got 3"
        );
        let mut bad_payload = items.clone();
        bad_payload[2] = Value::Text("payload".into());
        assert_eq!(
            err(run(&pki, &encode(&Value::Array(bad_payload)), &csr, NOW_MS)),
            "COSE_Sign1: payload is not a byte string"
        );
        let wrong_tag = encode(&Value::Tag(98, Box::new(Value::Array(items.clone()))));
        assert!(err(run(&pki, &wrong_tag, &csr, NOW_MS)).contains("unexpected CBOR tag 98"));
        let not_array = encode(&Value::Map(vec![]));
        assert_eq!(
            err(run(&pki, &not_array, &csr, NOW_MS)),
            "COSE_Sign1: not a CBOR array"
        );
        let mut short_sig = items.clone();
        short_sig[3] = Value::Bytes(vec![0; 64]);
        assert!(
            err(run(&pki, &encode(&Value::Array(short_sig)), &csr, NOW_MS))
                .contains("signature must be 96 bytes")
        );
        let mut bad_unprot = items;
        bad_unprot[1] = Value::Array(vec![]);
        assert!(
            err(run(&pki, &encode(&Value::Array(bad_unprot)), &csr, NOW_MS))
                .contains("unprotected header")
        );
    }

    #[test]
    fn wrong_algorithm_refused() {
        let pki = NitroPki::new();
        let csr = test_csr();
        // ES256 in the protected header; signed correctly over that header.
        let doc = pki
            .document()
            .public_key(Opt::Bytes(csr.1.clone()))
            .protected(encode(&Value::Map(vec![(1.into(), (-7).into())])))
            .build();
        assert_eq!(
            err(run(&pki, &doc, &csr, NOW_MS)),
            "COSE_Sign1: algorithm -7 is not ES384 (-35)"
        );
        // Extra header parameter.
        let doc = pki
            .document()
            .public_key(Opt::Bytes(csr.1.clone()))
            .protected(encode(&Value::Map(vec![
                (1.into(), (-35).into()),
                (4.into(), Value::Bytes(vec![1])),
            ])))
            .build();
        assert!(err(run(&pki, &doc, &csr, NOW_MS)).contains("exactly {1: -35}"));
        // Empty protected header.
        let doc = pki
            .document()
            .public_key(Opt::Bytes(csr.1.clone()))
            .protected(vec![])
            .build();
        assert!(err(run(&pki, &doc, &csr, NOW_MS)).contains("protected header: malformed CBOR"));
    }

    #[test]
    fn bad_signature_refused() {
        let pki = NitroPki::new();
        let csr = test_csr();
        let doc = pki.document().public_key(Opt::Bytes(csr.1.clone())).build();
        // The signature is the last 96 bytes of the document.
        let mut flipped = doc.clone();
        let last = flipped.len() - 10;
        flipped[last] ^= 0x01;
        assert_eq!(
            err(run(&pki, &flipped, &csr, NOW_MS)),
            "COSE signature does not verify with the leaf certificate key"
        );
        // A payload byte flipped inside module_id: still parses, signature fails.
        let mut items = pki
            .document()
            .public_key(Opt::Bytes(csr.1.clone()))
            .build_items();
        if let Value::Bytes(p) = &mut items[2] {
            let pos = p.windows(3).position(|w| w == b"enc").unwrap();
            p[pos] = b'E';
        }
        assert_eq!(
            err(run(&pki, &encode(&Value::Array(items)), &csr, NOW_MS)),
            "COSE signature does not verify with the leaf certificate key"
        );
    }

    #[test]
    fn unknown_root_refused() {
        let pki = NitroPki::new();
        let other = NitroPki::new();
        let csr = test_csr();
        let doc = pki.document().public_key(Opt::Bytes(csr.1.clone())).build();
        let e = err(run(&other, &doc, &csr, NOW_MS));
        assert!(
            e.starts_with("certificate chain does not lead to a configured root"),
            "{e}"
        );
        // Nor does putting the signer's root into cabundle[0] help: it is never an anchor.
        let doc = pki
            .document()
            .public_key(Opt::Bytes(csr.1.clone()))
            .cabundle(vec![
                pki.root_der().to_vec(),
                pki.intermediate_der().to_vec(),
            ])
            .build();
        assert!(err(run(&other, &doc, &csr, NOW_MS)).starts_with("certificate chain does not lead"));
        // And the shipped AWS root does not accept the test PKI.
        let aws = NitroAttestor::new(&NitroConfig::default()).unwrap();
        let e = aws
            .attest(&AttestInput {
                document: &doc,
                csr_der: &csr.0,
                csr_spki_der: &csr.1,
                now_ms: NOW_MS,
                window_secs: WINDOW,
            })
            .unwrap_err();
        assert!(
            matches!(e, AttestError::Invalid(ref m) if m.contains("configured root")),
            "{e}"
        );
    }

    #[test]
    fn chain_order_and_links_checked() {
        let pki = NitroPki::new();
        let csr = test_csr();
        // Leaf directly under root without the intermediate: issuer name mismatch at the top.
        let doc = pki
            .document()
            .public_key(Opt::Bytes(csr.1.clone()))
            .cabundle(vec![pki.root_der().to_vec()])
            .build();
        assert!(err(run(&pki, &doc, &csr, NOW_MS)).contains("unknown issuer"));
        // Leaf certificate replaced by the intermediate: the leaf key did not sign the doc.
        let doc = pki
            .document()
            .public_key(Opt::Bytes(csr.1.clone()))
            .certificate(pki.intermediate_der().to_vec())
            .cabundle(vec![pki.root_der().to_vec()])
            .build();
        assert!(err(run(&pki, &doc, &csr, NOW_MS)).contains("COSE signature does not verify"));
        // The leaf as an issuer (leaf listed as intermediate): not a CA.
        let doc = pki
            .document()
            .public_key(Opt::Bytes(csr.1.clone()))
            .cabundle(vec![
                pki.root_der().to_vec(),
                pki.intermediate_der().to_vec(),
                pki.leaf_der().to_vec(),
            ])
            .build();
        let e = err(run(&pki, &doc, &csr, NOW_MS));
        assert!(
            e.contains("issuer name differs") || e.contains("not a CA"),
            "{e}"
        );
    }

    /// The signature cache only ever skips a check these exact bytes passed
    /// under this exact key: after a good document, a certificate with a
    /// tampered signature is still refused by the same verifier.
    #[test]
    fn signature_cache_never_accepts_other_bytes() {
        let pki = NitroPki::new();
        let csr = test_csr();
        let a = attestor(&pki);
        let input = |doc: &[u8]| run_on(&a, doc, &csr, NOW_MS);
        let good = pki.document().public_key(Opt::Bytes(csr.1.clone())).build();
        input(&good).unwrap();
        input(&good).unwrap();
        assert_eq!(
            a.verified.0.lock().unwrap().len(),
            2,
            "leaf and intermediate links"
        );
        // The leaf's signature is its last bytes.
        let mut leaf = pki.leaf_der().to_vec();
        let last = leaf.len() - 1;
        leaf[last] ^= 0x01;
        let forged = pki
            .document()
            .public_key(Opt::Bytes(csr.1.clone()))
            .certificate(leaf)
            .build();
        let e = err(input(&forged));
        assert!(e.contains("signature of leaf"), "{e}");
        assert_eq!(
            a.verified.0.lock().unwrap().len(),
            2,
            "failures are not cached"
        );
    }

    #[test]
    fn expired_intermediate_refused() {
        let pki =
            NitroPki::with_intermediate_validity(NOW_MS / 1000 - 86_400, NOW_MS / 1000 - 3_600);
        let csr = test_csr();
        let doc = pki.document().public_key(Opt::Bytes(csr.1.clone())).build();
        assert_eq!(
            err(run(&pki, &doc, &csr, NOW_MS)),
            "intermediate certificate #1 above the leaf is not valid at the document timestamp (expired or not yet valid)"
        );
    }

    #[test]
    fn path_len_respected() {
        let csr = test_csr();
        // Root pathLen 1 admits the one intermediate.
        let pki = NitroPki::with_root_path_len(1);
        let doc = pki.document().public_key(Opt::Bytes(csr.1.clone())).build();
        assert!(run(&pki, &doc, &csr, NOW_MS).is_ok());
        // Root pathLen 0 admits none.
        let pki = NitroPki::with_root_path_len(0);
        let doc = pki.document().public_key(Opt::Bytes(csr.1.clone())).build();
        assert_eq!(
            err(run(&pki, &doc, &csr, NOW_MS)),
            "root certificate: pathLen exceeded"
        );
        // The root repeated inside the path sits above an intermediate with
        // pathLen 0 below it: counts as a second intermediate for the root.
        let doc = pki
            .document()
            .public_key(Opt::Bytes(csr.1.clone()))
            .cabundle(vec![
                pki.root_der().to_vec(),
                pki.root_der().to_vec(),
                pki.intermediate_der().to_vec(),
            ])
            .build();
        let e = err(run(&pki, &doc, &csr, NOW_MS));
        assert!(e.contains("pathLen"), "{e}");
    }

    #[test]
    fn stale_and_future_timestamps_refused() {
        let pki = NitroPki::new();
        let csr = test_csr();
        let doc = pki.document().public_key(Opt::Bytes(csr.1.clone())).build();
        assert!(
            err(run(&pki, &doc, &csr, NOW_MS + 301_000)).starts_with("stale or future timestamp")
        );
        assert!(
            err(run(&pki, &doc, &csr, NOW_MS - 301_000)).starts_with("stale or future timestamp")
        );
        assert!(run(&pki, &doc, &csr, NOW_MS + 300_000).is_ok());
        let future = pki
            .document()
            .public_key(Opt::Bytes(csr.1.clone()))
            .timestamp_ms(NOW_MS as u64 + 301_000)
            .build();
        assert!(err(run(&pki, &future, &csr, NOW_MS)).starts_with("stale or future timestamp"));
        let zero = pki
            .document()
            .public_key(Opt::Bytes(csr.1.clone()))
            .timestamp_ms(0)
            .build();
        assert!(err(run(&pki, &zero, &csr, NOW_MS)).starts_with("timestamp must be"));
    }

    #[test]
    fn nonce_required() {
        let pki = NitroPki::new();
        let csr = test_csr();
        for nonce in [Opt::Absent, Opt::Null] {
            let doc = pki
                .document()
                .public_key(Opt::Bytes(csr.1.clone()))
                .nonce(nonce)
                .build();
            assert_eq!(
                err(run(&pki, &doc, &csr, NOW_MS)),
                "document has no nonce; request a challenge first"
            );
        }
        let doc = pki
            .document()
            .public_key(Opt::Bytes(csr.1.clone()))
            .nonce(Opt::Bytes(vec![]))
            .build();
        assert!(err(run(&pki, &doc, &csr, NOW_MS)).starts_with("nonce is empty"));
    }

    #[test]
    fn debug_enclave_refused() {
        let pki = NitroPki::new();
        let csr = test_csr();
        let doc = pki
            .document()
            .public_key(Opt::Bytes(csr.1.clone()))
            .pcrs((0..16).map(|i| (i, vec![0u8; 48])).collect())
            .build();
        assert_eq!(
            err(run(&pki, &doc, &csr, NOW_MS)),
            "debug-mode enclave: PCR0, PCR1 and PCR2 are all zero"
        );
        // Only PCR0 non-zero is not debug mode.
        let mut pcrs: Vec<(u64, Vec<u8>)> = (0..3).map(|i| (i, vec![0u8; 48])).collect();
        pcrs[0].1[0] = 1;
        let doc = pki
            .document()
            .public_key(Opt::Bytes(csr.1.clone()))
            .pcrs(pcrs)
            .build();
        assert!(run(&pki, &doc, &csr, NOW_MS).is_ok());
    }

    #[test]
    fn oversize_inputs_refused() {
        let pki = NitroPki::new();
        let csr = test_csr();
        let big = vec![0u8; MAX_DOCUMENT_LEN + 1];
        assert_eq!(
            run(&pki, &big, &csr, NOW_MS).unwrap_err(),
            AttestError::TooLarge
        );
        let doc = pki
            .document()
            .public_key(Opt::Bytes(csr.1.clone()))
            .user_data(Opt::Bytes(vec![1; 513]))
            .build();
        assert_eq!(
            err(run(&pki, &doc, &csr, NOW_MS)),
            "user_data must be 0..=512 bytes, got 513"
        );
        let doc = pki
            .document()
            .user_data(Opt::Bytes(sha256(&csr.0).to_vec()))
            .nonce(Opt::Bytes(vec![1; 513]))
            .build();
        assert_eq!(
            err(run(&pki, &doc, &csr, NOW_MS)),
            "nonce must be 0..=512 bytes, got 513"
        );
        let doc = pki.document().public_key(Opt::Bytes(vec![1; 1025])).build();
        assert_eq!(
            err(run(&pki, &doc, &csr, NOW_MS)),
            "public_key must be 1..=1024 bytes, got 1025"
        );
        let doc = pki.document().public_key(Opt::Bytes(vec![])).build();
        assert_eq!(
            err(run(&pki, &doc, &csr, NOW_MS)),
            "public_key must be 1..=1024 bytes, got 0"
        );
    }

    #[test]
    fn payload_field_rules() {
        let pki = NitroPki::new();
        let csr = test_csr();
        let base = || pki.document().public_key(Opt::Bytes(csr.1.clone()));
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (base().module_id("").build(), "module_id must be"),
            (base().module_id("bad id").build(), "module_id must be"),
            (
                base().digest("SHA256").build(),
                "digest \"SHA256\" is not \"SHA384\"",
            ),
            (base().pcrs(vec![]).build(), "pcrs must have 1..=32 entries"),
            (
                base().pcrs(vec![(32, vec![1; 48])]).build(),
                "pcrs: index must be",
            ),
            (
                base().pcrs(vec![(0, vec![1; 47])]).build(),
                "pcrs: PCR0 must be 32, 48 or 64 bytes, got 47",
            ),
            (
                base()
                    .pcrs(vec![(0, vec![1; 48]), (0, vec![2; 48])])
                    .build(),
                "pcrs: duplicate PCR0",
            ),
            (base().cabundle(vec![]).build(), "cabundle must have"),
            (
                base().cabundle(vec![vec![]]).build(),
                "cabundle[0] must be 1..=1024 bytes",
            ),
            (
                base().certificate(vec![1; 1025]).build(),
                "certificate must be 1..=1024 bytes",
            ),
            (
                base().certificate(vec![1, 2, 3]).build(),
                "leaf certificate: not a DER X.509 certificate",
            ),
            (
                base()
                    .extra("module_id", Value::Text("again".into()))
                    .build(),
                "duplicate key \"module_id\"",
            ),
            (
                base()
                    .extra_raw(Value::Integer(7.into()), Value::Null)
                    .build(),
                "non-text key",
            ),
            (base().omit("digest").build(), "digest is missing"),
            (base().omit("timestamp").build(), "timestamp is missing"),
            (
                base().replace("certificate", Value::Null).build(),
                "certificate is null",
            ),
            (
                base()
                    .replace("timestamp", Value::Integer((-5).into()))
                    .build(),
                "timestamp must be a positive",
            ),
            (
                base().replace("nonce", Value::Text("n".into())).build(),
                "nonce is not a byte string or null",
            ),
        ];
        for (doc, want) in cases {
            let e = err(run(&pki, &doc, &csr, NOW_MS));
            assert!(e.contains(want), "got {e:?}, want {want:?}");
        }
    }

    #[test]
    fn mutated_documents_never_panic() {
        use rand::{Rng, SeedableRng};
        let pki = NitroPki::new();
        let csr = test_csr();
        let a = attestor(&pki);
        let good = pki
            .document()
            .public_key(Opt::Bytes(csr.1.clone()))
            .indefinite(true)
            .build();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x0005_1611);
        for _ in 0..3000 {
            let mut doc = good.clone();
            match rng.random_range(0..4) {
                0 => {
                    for _ in 0..rng.random_range(1..8) {
                        let i = rng.random_range(0..doc.len());
                        doc[i] = rng.random();
                    }
                }
                1 => doc.truncate(rng.random_range(0..doc.len())),
                2 => {
                    let i = rng.random_range(0..doc.len());
                    doc.insert(i, rng.random());
                }
                _ => {
                    let len = rng.random_range(0..64);
                    doc = (0..len).map(|_| rng.random()).collect();
                }
            }
            let r = a.attest(&AttestInput {
                document: &doc,
                csr_der: &csr.0,
                csr_spki_der: &csr.1,
                now_ms: NOW_MS,
                window_secs: WINDOW,
            });
            if let Ok(v) = r {
                // Only a mutation that leaves the signed content intact could pass.
                assert_eq!(v.node(), "i-0123456789abcdef0-enc0123456789abcdef");
            }
        }
    }

    fn encode(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::ser::into_writer(v, &mut out).unwrap();
        out
    }

    #[test]
    fn sig_structure_matches_ciborium_encoding() {
        for (p, l) in [(0usize, 0usize), (4, 23), (24, 255), (256, 70_000)] {
            let cose = CoseSign1 {
                protected: vec![1; p],
                payload: vec![2; l],
                signature: vec![],
            };
            let want = encode(&Value::Array(vec![
                Value::Text("Signature1".into()),
                Value::Bytes(vec![1; p]),
                Value::Bytes(vec![]),
                Value::Bytes(vec![2; l]),
            ]));
            assert_eq!(cose.sig_structure(), want);
        }
    }
}

#[cfg(test)]
mod proptests {
    //! Random and mutated documents: the verifier never panics and never
    //! accepts anything it did not sign.

    use std::sync::OnceLock;

    use proptest::{collection::vec, prelude::*, sample::Index};

    use super::*;
    use crate::attest::testing::{encode, test_csr, NitroPki, Opt, NOW_MS};

    struct Fixture {
        attestor: NitroAttestor,
        csr: (Vec<u8>, Vec<u8>),
        good: Vec<u8>,
    }

    fn fixture() -> &'static Fixture {
        static F: OnceLock<Fixture> = OnceLock::new();
        F.get_or_init(|| {
            let pki = NitroPki::new();
            let csr = test_csr();
            let good = pki
                .document()
                .public_key(Opt::Bytes(csr.1.clone()))
                .indefinite(true)
                .build();
            Fixture {
                attestor: NitroAttestor::new(&pki.nitro_config()).unwrap(),
                csr,
                good,
            }
        })
    }

    fn attest(doc: &[u8]) -> Result<VerifiedAttestation, AttestError> {
        let f = fixture();
        f.attestor.attest(&AttestInput {
            document: doc,
            csr_der: &f.csr.0,
            csr_spki_der: &f.csr.1,
            now_ms: NOW_MS,
            window_secs: 300,
        })
    }

    /// Arbitrary CBOR values, a few levels deep.
    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            any::<i64>().prop_map(|i| Value::Integer(i.into())),
            any::<u64>().prop_map(|i| Value::Integer(i.into())),
            vec(any::<u8>(), 0..80).prop_map(Value::Bytes),
            "[a-zA-Z0-9_]{0,12}".prop_map(Value::Text),
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            Just(Value::Text("SHA384".into())),
            Just(Value::Bytes(vec![0x11; 48])),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..6).prop_map(Value::Array),
                vec((inner.clone(), inner.clone()), 0..6).prop_map(Value::Map),
                (0u64..40, inner).prop_map(|(t, v)| Value::Tag(t, Box::new(v))),
            ]
        })
    }

    const KEYS: [&str; 10] = [
        "module_id",
        "digest",
        "timestamp",
        "pcrs",
        "certificate",
        "cabundle",
        "public_key",
        "user_data",
        "nonce",
        "other",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn random_bytes_are_refused(doc in vec(any::<u8>(), 0..1024)) {
            prop_assert!(attest(&doc).is_err());
        }

        #[test]
        fn random_payloads_are_refused(
            fields in vec((0..KEYS.len(), value()), 0..12),
            tagged in any::<bool>(),
        ) {
            let map = fields
                .into_iter()
                .map(|(k, v)| (Value::Text(KEYS[k].to_owned()), v))
                .collect();
            let items = Value::Array(vec![
                Value::Bytes(vec![0xa1, 0x01, 0x38, 0x22]),
                Value::Map(vec![]),
                Value::Bytes(encode(&Value::Map(map))),
                Value::Bytes(vec![0; 96]),
            ]);
            let doc = if tagged { encode(&Value::Tag(18, Box::new(items))) } else { encode(&items) };
            prop_assert!(attest(&doc).is_err());
        }

        #[test]
        fn mutated_valid_document_is_refused(at in any::<Index>(), byte in any::<u8>()) {
            let mut doc = fixture().good.clone();
            let i = at.index(doc.len());
            prop_assume!(doc[i] != byte);
            doc[i] = byte;
            // Every byte of the document is either structure or signed.
            prop_assert!(attest(&doc).is_err());
        }

        #[test]
        fn random_cose_values_are_refused(v in value()) {
            prop_assert!(attest(&encode(&v)).is_err());
        }
    }

    #[test]
    fn fixture_document_is_valid() {
        assert!(attest(&fixture().good).is_ok());
    }
}
