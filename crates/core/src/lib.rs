//! The decisions of leasehold, free of I/O.
//!
//! * [`rotation`]: given a lease's recorded progress, its policy and what was observed,
//!   decide the one next thing to do (issue, verify, promote, revoke or wait).
//! * [`backoff`]: capped exponential backoff with deterministic jitter.
//! * [`naming`]: deterministic credential names from a lease's identity and version.
//!
//! Nothing here talks to a database, a cluster or a clock: `now` is always a parameter.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod naming;
pub mod rotation;
pub mod timing;

pub use rotation::{
    Action, DrainSessionsMode, IssuedUnder, Observations, PolicyParams, Progress, Strategy, Target,
    VersionRecord, VersionState, decide,
};
