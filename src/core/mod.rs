//! The rules of the broker, free of transport and storage details: the
//! [`Broker`] enrolls workloads, mints and revokes tokens and reads the audit
//! trail; [`Error`] is the one error type with a stable reason per variant.
//! Nothing here names tonic, SQL or rustls; storage is reached through the
//! [`crate::store::Store`] trait only.

mod broker;
mod error;

pub use broker::{
    AuditVerdict, Broker, BrokerConfig, BundleView, Caller, CreatedToken, Credential, EnrollParams,
    Enrolled, TokenView,
};
pub use error::Error;
