//! The single mapping from [`crate::core::Error`] to `tonic::Status`: a gRPC
//! code per reason (DESIGN.md §6) and a `google.rpc.ErrorInfo` detail with
//! `reason`, `domain = "sigil"` and metadata such as `server_time_ms`.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::core::Error;

/// `ErrorInfo.domain` of every Sigil error.
pub const ERROR_DOMAIN: &str = "sigil";

/// The gRPC code for a core error.
pub fn code_for(e: &Error) -> Code {
    match e {
        Error::Malformed(_) => Code::InvalidArgument,
        Error::InvalidSignature
        | Error::InvalidBootstrapSignature
        | Error::RequestExpired { .. }
        | Error::BootstrapRequestExpired { .. }
        | Error::NonceReplayed
        | Error::JwtInvalid(_) => Code::Unauthenticated,
        Error::TokenUnknown
        | Error::TokenExpired
        | Error::TokenAlreadyUsed
        | Error::TokenRevoked
        | Error::AttestationInvalid(_)
        | Error::AttestationNoMatchingEntry
        | Error::SvidRevoked
        | Error::NotAuthorized => Code::PermissionDenied,
        Error::BootstrapDisabled | Error::BootstrapSecretMissing => Code::FailedPrecondition,
        Error::RateLimited { .. } => Code::ResourceExhausted,
        Error::Unimplemented(_) => Code::Unimplemented,
        Error::Unavailable => Code::Unavailable,
        Error::Internal => Code::Internal,
        // `Error` is non_exhaustive for other crates only; every variant is listed.
    }
}

/// Converts a core error into a Status carrying `ErrorInfo`.
pub fn to_status(e: &Error) -> Status {
    let metadata: HashMap<String, String> = e
        .metadata()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    Status::with_error_details(
        code_for(e),
        e.to_string(),
        ErrorDetails::with_error_info(e.reason(), ERROR_DOMAIN, metadata),
    )
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        to_status(&e)
    }
}

/// The `ErrorInfo` of a Status, for clients: `(reason, metadata)`.
pub fn error_info(status: &Status) -> Option<(String, HashMap<String, String>)> {
    let details = status.get_error_details();
    details
        .error_info()
        .map(|i| (i.reason.clone(), i.metadata.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_carries_skew_metadata() {
        let s = to_status(&Error::RequestExpired {
            server_time_ms: 42,
            window_seconds: 300,
        });
        assert_eq!(s.code(), Code::Unauthenticated);
        let (reason, md) = error_info(&s).unwrap();
        assert_eq!(reason, "REQUEST_EXPIRED");
        assert_eq!(md["server_time_ms"], "42");
        assert_eq!(md["window_seconds"], "300");
    }

    #[test]
    fn every_reason_has_the_documented_code() {
        for (e, c) in [
            (Error::Malformed("x".into()), Code::InvalidArgument),
            (Error::NonceReplayed, Code::Unauthenticated),
            (Error::TokenAlreadyUsed, Code::PermissionDenied),
            (Error::BootstrapDisabled, Code::FailedPrecondition),
            (
                Error::RateLimited { retry_after_ms: 1 },
                Code::ResourceExhausted,
            ),
        ] {
            assert_eq!(code_for(&e), c, "{e:?}");
        }
    }
}
