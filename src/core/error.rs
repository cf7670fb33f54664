//! The broker's single error type. Each variant has a stable machine-readable
//! reason (DESIGN.md §6); the api layer maps reasons to gRPC codes in one
//! place. Messages are safe to show to the caller: they describe the request,
//! never a secret or internal detail (internal causes are logged, not returned).

/// A refused or failed broker operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request is structurally wrong; the message names the field.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The HMAC over the payload does not verify.
    #[error("invalid signature")]
    InvalidSignature,
    /// The bootstrap HMAC does not verify.
    #[error("invalid bootstrap signature")]
    InvalidBootstrapSignature,
    /// The payload timestamp is outside the freshness window.
    #[error(
        "request timestamp outside the {window_seconds} s window (server time {server_time_ms} ms)"
    )]
    RequestExpired {
        /// Server time when checked, Unix ms.
        server_time_ms: i64,
        /// Allowed |now − timestamp|, seconds.
        window_seconds: i64,
    },
    /// The bootstrap payload timestamp is outside the window.
    #[error("bootstrap request timestamp outside the {window_seconds} s window (server time {server_time_ms} ms)")]
    BootstrapRequestExpired {
        /// Server time when checked, Unix ms.
        server_time_ms: i64,
        /// Allowed |now − timestamp|, seconds.
        window_seconds: i64,
    },
    /// The nonce was already used.
    #[error("nonce already used")]
    NonceReplayed,
    /// No such token.
    #[error("unknown token")]
    TokenUnknown,
    /// The token expired.
    #[error("token expired")]
    TokenExpired,
    /// The token has no uses left.
    #[error("token already used")]
    TokenAlreadyUsed,
    /// The token was revoked.
    #[error("token revoked")]
    TokenRevoked,
    /// The attestation document failed verification.
    #[error("attestation invalid: {0}")]
    AttestationInvalid(String),
    /// No registration entry matches the attested selectors.
    #[error("no registration entry matches the attested selectors")]
    AttestationNoMatchingEntry,
    /// A JWT-SVID presented for validation failed a check (named in the message).
    #[error("invalid JWT-SVID: {0}")]
    JwtInvalid(String),
    /// The SVID was revoked.
    #[error("SVID revoked")]
    SvidRevoked,
    /// The caller may not do this.
    #[error("not authorized")]
    NotAuthorized,
    /// Bootstrap mode is off.
    #[error("bootstrap disabled: a plan is already active")]
    BootstrapDisabled,
    /// No bootstrap secret is configured.
    #[error("bootstrap secret missing")]
    BootstrapSecretMissing,
    /// Too many requests from this peer.
    #[error("rate limited; retry after {retry_after_ms} ms")]
    RateLimited {
        /// Suggested wait.
        retry_after_ms: u64,
    },
    /// This credential kind is not available in this build.
    #[error("not implemented: {0}")]
    Unimplemented(String),
    /// A dependency (the store) failed; the request may be retried.
    #[error("service unavailable")]
    Unavailable,
    /// A bug or a broken invariant; details are in the broker log.
    #[error("internal error")]
    Internal,
}

impl Error {
    /// The stable reason string (DESIGN.md §6).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "MALFORMED_REQUEST",
            Self::InvalidSignature => "INVALID_SIGNATURE",
            Self::InvalidBootstrapSignature => "INVALID_BOOTSTRAP_SIGNATURE",
            Self::RequestExpired { .. } => "REQUEST_EXPIRED",
            Self::BootstrapRequestExpired { .. } => "BOOTSTRAP_REQUEST_EXPIRED",
            Self::NonceReplayed => "NONCE_REPLAYED",
            Self::TokenUnknown => "TOKEN_UNKNOWN",
            Self::TokenExpired => "TOKEN_EXPIRED",
            Self::TokenAlreadyUsed => "TOKEN_ALREADY_USED",
            Self::TokenRevoked => "TOKEN_REVOKED",
            Self::AttestationInvalid(_) => "ATTESTATION_INVALID",
            Self::AttestationNoMatchingEntry => "ATTESTATION_NO_MATCHING_ENTRY",
            Self::JwtInvalid(_) => "JWT_INVALID",
            Self::SvidRevoked => "SVID_REVOKED",
            Self::NotAuthorized => "NOT_AUTHORIZED",
            Self::BootstrapDisabled => "BOOTSTRAP_DISABLED",
            Self::BootstrapSecretMissing => "BOOTSTRAP_SECRET_MISSING",
            Self::RateLimited { .. } => "RATE_LIMITED",
            Self::Unimplemented(_) => "UNIMPLEMENTED",
            Self::Unavailable => "UNAVAILABLE",
            Self::Internal => "INTERNAL",
        }
    }

    /// Extra key/value details for the caller (clock skew, retry hints).
    pub fn metadata(&self) -> Vec<(&'static str, String)> {
        match self {
            Self::RequestExpired {
                server_time_ms,
                window_seconds,
            }
            | Self::BootstrapRequestExpired {
                server_time_ms,
                window_seconds,
            } => vec![
                ("server_time_ms", server_time_ms.to_string()),
                ("window_seconds", window_seconds.to_string()),
            ],
            Self::RateLimited { retry_after_ms } => {
                vec![("retry_after_ms", retry_after_ms.to_string())]
            }
            _ => Vec::new(),
        }
    }
}

impl From<crate::store::StoreError> for Error {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "store failure");
        match e {
            crate::store::StoreError::Unavailable(_) => Self::Unavailable,
            _ => Self::Internal,
        }
    }
}
