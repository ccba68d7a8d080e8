//! The rotation engine: drives [`leasehold_core::decide`] against a real [`Backend`].
//!
//! For each action the engine records its intent in [`Progress`] (through a
//! [`ProgressStore`]) *before* the side effect and the result after it, so a crash at
//! any point resumes cleanly. Passwords live in a [`SecretStore`], never in progress.
//!
//! The same engine runs inside the Kubernetes controller (status and an owned Secret as
//! stores) and in [`local`] mode (a state file).

#![forbid(unsafe_code)]

pub mod audit;
pub mod certificate;
pub mod claims;
pub mod context;
pub mod engine;
pub mod limiter;
pub mod local;
pub mod local_issuers;
pub mod sealed;
pub mod sweeper;
pub mod template;
pub mod window;

pub use claims::UsernameClaims;
pub use context::{BackendRegistry, LeaseContext, LeaseKey, NamingRule, TargetBackends};
pub use engine::{Engine, EngineError, Outcome, StepEvent};
pub use limiter::TargetLimiter;

use async_trait::async_trait;
use leasehold_backends::CredentialMaterial;
use leasehold_core::Progress;
use secrecy::SecretString;

/// Where recorded progress is persisted (status subresource, state file).
#[async_trait]
pub trait ProgressStore: Send + Sync {
    /// Persist `progress` for `lease`. Must be durable when it returns.
    async fn save(&self, lease: &LeaseKey, progress: &Progress) -> Result<(), StoreError>;
}

/// Where credential secrets are kept between reconciles (an owned Secret, a 0600 file).
#[async_trait]
pub trait SecretStore: Send + Sync {
    async fn put(
        &self,
        lease: &LeaseKey,
        version: u64,
        secret: &SecretString,
    ) -> Result<(), StoreError>;
    async fn get(&self, lease: &LeaseKey, version: u64)
    -> Result<Option<SecretString>, StoreError>;
    async fn remove(&self, lease: &LeaseKey, version: u64) -> Result<(), StoreError>;
}

#[async_trait]
impl<T: SecretStore + ?Sized> SecretStore for std::sync::Arc<T> {
    async fn put(
        &self,
        lease: &LeaseKey,
        version: u64,
        secret: &SecretString,
    ) -> Result<(), StoreError> {
        (**self).put(lease, version, secret).await
    }
    async fn get(
        &self,
        lease: &LeaseKey,
        version: u64,
    ) -> Result<Option<SecretString>, StoreError> {
        (**self).get(lease, version).await
    }
    async fn remove(&self, lease: &LeaseKey, version: u64) -> Result<(), StoreError> {
        (**self).remove(lease, version).await
    }
}

/// Hands the current credential to consumers (a Secret, files, rollout restarts).
#[async_trait]
pub trait Delivery: Send + Sync {
    async fn deliver(
        &self,
        lease: &LeaseKey,
        version: u64,
        material: &CredentialMaterial,
    ) -> Result<(), StoreError>;
}

/// A store or delivery failure. Messages never contain secret values.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// Reasons a [`StoreError`] can carry for a key (KMS or local key) failure.
pub const KEY_REASONS: [&str; 6] = [
    "KeyUnavailable",
    "KeyRefused",
    "Tampered",
    "Malformed",
    "UnknownKey",
    "InvalidLocalKey",
];

impl StoreError {
    /// The key failure this error reports (`KeyUnavailable`, `KeyRefused`, …), if it
    /// is one (see [`sealed::key_store_error`]).
    pub fn key_reason(&self) -> Option<&'static str> {
        KEY_REASONS.into_iter().find(|r| {
            self.0
                .strip_prefix(r)
                .is_some_and(|rest| rest.starts_with(": "))
        })
    }
}

/// A delivery that does nothing (for leases with no delivery configured, and tests).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoDelivery;

#[async_trait]
impl Delivery for NoDelivery {
    async fn deliver(
        &self,
        _: &LeaseKey,
        _: u64,
        _: &CredentialMaterial,
    ) -> Result<(), StoreError> {
        Ok(())
    }
}
