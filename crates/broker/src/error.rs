//! The one error type of the broker and its gRPC mapping.

use leasehold_auth::{AuthError, ErrorClass};
use leasehold_envelope::EnvelopeError;
use tonic::Code;

use crate::authz::Deny;

/// Why a broker call failed. Messages name objects and causes, never a token
/// or a credential.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The request is missing a field or has a malformed one: `INVALID_ARGUMENT`.
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// No token, or a token that does not verify: `UNAUTHENTICATED`.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// A valid caller asked for something it may not have: `PERMISSION_DENIED`.
    #[error("permission denied: {0}")]
    Denied(#[from] Deny),
    /// A pod token bound to another pod (from the verifier): `PERMISSION_DENIED`.
    #[error("permission denied: {0}")]
    TokenDenied(String),
    /// The lease does not exist: `NOT_FOUND`.
    #[error("lease {namespace}/{name} not found")]
    LeaseNotFound {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// The lease has no usable version yet: `UNAVAILABLE` (retry).
    #[error("lease {namespace}/{name} has no current version yet")]
    NotReady {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// The lease cannot be served as configured (policy missing, unsupported
    /// backend, invalid spec): `FAILED_PRECONDITION`.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A per-lease limit is reached (concurrent issues, live per-pod users,
    /// connections); retry later: `RESOURCE_EXHAUSTED`.
    #[error("limit reached: {0}")]
    ResourceExhausted(String),
    /// A dependency (API server, key source, database) failed; retry: `UNAVAILABLE`.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bug or an impossible state: `INTERNAL`.
    #[error("internal error: {0}")]
    Internal(String),
}

impl BrokerError {
    /// The gRPC code this error is reported with.
    pub fn code(&self) -> Code {
        match self {
            BrokerError::InvalidArgument(_) => Code::InvalidArgument,
            BrokerError::Unauthenticated(_) => Code::Unauthenticated,
            BrokerError::Denied(_) | BrokerError::TokenDenied(_) => Code::PermissionDenied,
            BrokerError::LeaseNotFound { .. } => Code::NotFound,
            BrokerError::NotReady { .. } | BrokerError::Unavailable(_) => Code::Unavailable,
            BrokerError::FailedPrecondition(_) => Code::FailedPrecondition,
            BrokerError::ResourceExhausted(_) => Code::ResourceExhausted,
            BrokerError::Internal(_) => Code::Internal,
        }
    }

    /// A token refused by the verifier; `what` says which token.
    pub fn from_auth(what: &str, error: &AuthError) -> Self {
        match error.class() {
            ErrorClass::Unauthenticated => {
                BrokerError::Unauthenticated(format!("{what} refused: {error}"))
            }
            ErrorClass::PermissionDenied => {
                BrokerError::TokenDenied(format!("{what} refused: {error}"))
            }
            ErrorClass::Unavailable => {
                BrokerError::Unavailable(format!("cannot verify the {what}: {error}"))
            }
        }
    }

    /// A failed API-server call.
    pub fn kube(what: &str, error: &kube::Error) -> Self {
        BrokerError::Unavailable(format!("{what}: {error}"))
    }

    /// A key-encryption key failure while sealing or opening a stored record.
    /// Transient ones (KMS unreachable) are `UNAVAILABLE`, so the node driver
    /// retries; the others (key refused, record tampered with, unknown key) need
    /// someone to act and are `FAILED_PRECONDITION`. The message starts with the
    /// reason (`KeyUnavailable`, `Tampered`, ...) and never holds secret material.
    pub fn key(what: &str, error: &EnvelopeError) -> Self {
        let message = format!("{}: {what}: {error}", error.reason());
        if error.is_transient() {
            BrokerError::Unavailable(message)
        } else {
            BrokerError::FailedPrecondition(message)
        }
    }
}

impl From<BrokerError> for tonic::Status {
    fn from(error: BrokerError) -> Self {
        tonic::Status::new(error.code(), error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let status: tonic::Status = BrokerError::NotReady {
            namespace: "a".into(),
            name: "b".into(),
        }
        .into();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            BrokerError::from_auth("pod token", &AuthError::Expired).code(),
            Code::Unauthenticated
        );
        assert_eq!(
            tonic::Status::from(BrokerError::ResourceExhausted("x".into())).code(),
            Code::ResourceExhausted
        );
        assert_eq!(
            tonic::Status::from(BrokerError::Denied(Deny::CallerNodeUnknown)).code(),
            Code::PermissionDenied
        );
    }

    #[test]
    fn key_failures_are_retried_only_when_transient() {
        let unavailable = BrokerError::key(
            "cannot open a record",
            &EnvelopeError::KeyUnavailable {
                key_id: "k".into(),
                operation: "decrypt",
                detail: "timeout".into(),
            },
        );
        assert_eq!(unavailable.code(), Code::Unavailable);
        assert!(unavailable.to_string().contains("KeyUnavailable"));
        let tampered = BrokerError::key(
            "cannot open a record",
            &EnvelopeError::Tampered {
                key_id: "k".into(),
                context_keys: "secret".into(),
            },
        );
        assert_eq!(tampered.code(), Code::FailedPrecondition);
        assert!(tampered.to_string().contains("Tampered"));
    }
}
