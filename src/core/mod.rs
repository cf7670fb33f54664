//! The rules of the broker, free of transport and storage details: the
//! [`Broker`] enrolls workloads, mints and revokes tokens, installs and
//! approves plans and reads the audit trail; [`Error`] is the one error type
//! with a stable reason per variant. Nothing here names tonic, SQL or
//! rustls; storage is reached through the [`crate::store::Store`] trait only.

mod attest;
mod broker;
mod delegation;
mod error;
mod lifecycle;
mod plans;

pub use attest::{match_entry, Challenge, CHALLENGE_LEN};
pub use broker::{
    verify_store_chain, ActivePlan, AuditVerdict, Broker, BrokerConfig, BrokerSecrets, BundleView,
    Caller, CreatedToken, Credential, EnrollParams, Enrolled, TokenView,
};
pub use delegation::{
    DelegatedEntries, DelegatedEntryView, DelegatedJwtParams, DelegatedX509Params,
};
pub use error::Error;
pub use lifecycle::{FetchedJwt, RevocationSet, RotationView, ValidatedJwtView};
pub use plans::{Bootstrapped, PlanView, StatusView};
