//! The operator's one error type. Messages never contain secret values.

use leasehold_engine::{EngineError, StoreError};

/// Why a reconcile, a store or the controller itself failed.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<OperatorError>>),
    #[error("the object has no {0}")]
    MissingField(&'static str),
    #[error("cannot serialize {what}: {message}")]
    Serialize { what: &'static str, message: String },
    #[error("metrics server: {0}")]
    Server(#[source] std::io::Error),
    #[error("lost leadership of lease {0}")]
    LostLeadership(String),
    /// A side effect was refused: this replica does not (surely) lead. Not a failure of
    /// the object being reconciled.
    #[error(transparent)]
    NotLeader(#[from] crate::leader::NotLeader),
    #[error("configuration: {0}")]
    Config(String),
    #[error("broker: {0}")]
    Broker(String),
    /// The lease cannot be worked on until something else changes (Ready=False says why).
    #[error("{reason}: {message}")]
    Blocked { reason: String, message: String },
    /// A deleted lease still has credentials to revoke (draining, or revocation
    /// backing off). An error, not an `Ok`, because kube-runtime's finalizer helper
    /// removes the finalizer on any `Ok` from cleanup, whatever `Action` it carries.
    #[error("deletion waits: {message}")]
    DeletionPending {
        message: String,
        retry_after: std::time::Duration,
    },
}

impl OperatorError {
    /// A short label for the `error` metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            OperatorError::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            OperatorError::Kube(_) => "kube",
            OperatorError::Engine(e) => e.kind(),
            OperatorError::Store(_) => "store",
            OperatorError::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.kind(),
                _ => "finalizer",
            },
            OperatorError::MissingField(_) => "invalid_object",
            OperatorError::Serialize { .. } => "serialize",
            OperatorError::Server(_) => "server",
            OperatorError::LostLeadership(_) => "leadership",
            OperatorError::NotLeader(_) => "not_leader",
            OperatorError::Broker(_) => "broker",
            OperatorError::Config(_) => "config",
            OperatorError::Blocked { .. } => "blocked",
            OperatorError::DeletionPending { .. } => "deletion_pending",
        }
    }

    /// When a deleted lease waits on its own schedule (not an error backoff): retry then.
    pub fn deletion_retry(&self) -> Option<std::time::Duration> {
        match self {
            OperatorError::DeletionPending { retry_after, .. } => Some(*retry_after),
            OperatorError::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::CleanupFailed(e) => e.deletion_retry(),
                _ => None,
            },
            _ => None,
        }
    }
}

impl From<kube::runtime::finalizer::Error<OperatorError>> for OperatorError {
    fn from(e: kube::runtime::finalizer::Error<OperatorError>) -> Self {
        OperatorError::Finalizer(Box::new(e))
    }
}

/// Turn a Kubernetes error into the engine's store error (no secret values are ever in
/// the request bodies' error echoes we format here: only the status message).
pub(crate) fn store_error(what: &str, e: kube::Error) -> StoreError {
    match e {
        kube::Error::Api(s) => StoreError(format!("{what}: {} ({})", s.message, s.code)),
        other => StoreError(format!("{what}: {other}")),
    }
}
