//! Policy: plans. A plan is a declarative, versioned, hashed document naming
//! the admins, the registration entries (SPIFFE ID ← selectors, TTLs, DNS
//! names) and the limits. This module parses, validates and canonicalises
//! plans; it knows nothing of storage or transport.

mod plan;

pub use plan::{Entry, Limits, Plan, PlanError, MAX_PLAN_LEN};
