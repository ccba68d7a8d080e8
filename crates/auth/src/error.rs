//! Errors. Their `Display` and `Debug` never carry the token, and carry claim
//! values only where they are harmless (algorithm names, key ids, sanitised).

use std::fmt;

/// Why a token was refused, or why it could not be checked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The token is not a well-formed compact JWS with the claims we need.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// `exp` (plus leeway) is in the past.
    #[error("token expired")]
    Expired,
    /// `nbf` or `iat` (minus leeway) is in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// `aud` does not contain the configured audience.
    #[error("token audience does not include the expected audience")]
    WrongAudience,
    /// `iss` is not the cluster's issuer.
    #[error("token issuer is not the expected issuer")]
    WrongIssuer,
    /// The signature does not verify with the key named by `kid`.
    #[error("token signature is invalid")]
    BadSignature,
    /// No key of the cluster has the token's `kid`, even after a refetch.
    #[error("token signed with an unknown key (kid {kid:?})")]
    UnknownKey {
        /// The `kid` from the header, sanitised and truncated.
        kid: Option<SanitizedValue>,
    },
    /// The header's `alg` is not in the allowed set (`none` and HMAC never are).
    #[error("token algorithm {alg} is not allowed")]
    AlgorithmNotAllowed {
        /// The `alg` from the header, sanitised and truncated.
        alg: SanitizedValue,
    },
    /// The header's `alg` does not fit the key: wrong key type or curve, or the
    /// JWK pins a different `alg`.
    #[error("token algorithm {alg} does not match the signing key")]
    AlgorithmKeyMismatch {
        /// The `alg` from the header.
        alg: SanitizedValue,
    },
    /// `sub` or the `kubernetes.io` claim is missing or not a service-account identity.
    #[error("token is not a Kubernetes service-account token: {0}")]
    NotServiceAccountToken(&'static str),
    /// A pod was expected but the token is not bound to a pod.
    #[error("token is not bound to a pod")]
    NotBoundToPod,
    /// The token is bound to a different pod (or namespace, or service account).
    #[error("token is bound to a different pod: {field} does not match")]
    PodMismatch {
        /// Which part of the identity differs. The values are not reported.
        field: PodField,
    },
    /// The cluster's keys (or issuer) could not be fetched and none are cached.
    #[error("signing keys unavailable")]
    KeysUnavailable(#[source] KeySourceError),
}

/// How a caller such as a gRPC server should report an [`AuthError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The token is not valid: `UNAUTHENTICATED`.
    Unauthenticated,
    /// The token is valid but does not grant this: `PERMISSION_DENIED`.
    PermissionDenied,
    /// We could not decide, try again later: `UNAVAILABLE`.
    Unavailable,
}

impl AuthError {
    /// The class of this error, for mapping onto status codes.
    pub fn class(&self) -> ErrorClass {
        match self {
            AuthError::NotBoundToPod | AuthError::PodMismatch { .. } => {
                ErrorClass::PermissionDenied
            }
            AuthError::KeysUnavailable(_) => ErrorClass::Unavailable,
            AuthError::Malformed(_)
            | AuthError::Expired
            | AuthError::NotYetValid
            | AuthError::WrongAudience
            | AuthError::WrongIssuer
            | AuthError::BadSignature
            | AuthError::UnknownKey { .. }
            | AuthError::AlgorithmNotAllowed { .. }
            | AuthError::AlgorithmKeyMismatch { .. }
            | AuthError::NotServiceAccountToken(_) => ErrorClass::Unauthenticated,
        }
    }

    /// The token itself is not valid (gRPC `UNAUTHENTICATED`).
    pub fn is_unauthenticated(&self) -> bool {
        self.class() == ErrorClass::Unauthenticated
    }

    /// The token is valid but names another identity (gRPC `PERMISSION_DENIED`).
    pub fn is_permission_denied(&self) -> bool {
        self.class() == ErrorClass::PermissionDenied
    }

    /// Verification could not be done right now (gRPC `UNAVAILABLE`).
    pub fn is_unavailable(&self) -> bool {
        self.class() == ErrorClass::Unavailable
    }
}

/// The part of a pod identity that did not match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodField {
    /// `kubernetes.io.namespace` (and the namespace in `sub`).
    Namespace,
    /// `kubernetes.io.pod.name`.
    PodName,
    /// `kubernetes.io.pod.uid`.
    PodUid,
    /// `kubernetes.io.serviceaccount.name` (and the name in `sub`).
    ServiceAccount,
}

impl fmt::Display for PodField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PodField::Namespace => "namespace",
            PodField::PodName => "pod name",
            PodField::PodUid => "pod uid",
            PodField::ServiceAccount => "service account",
        })
    }
}

/// Why keys or discovery could not be fetched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeySourceError {
    /// The HTTP request failed or returned an error status.
    #[error("request for {what} failed: {message}")]
    Request {
        /// What was being fetched.
        what: &'static str,
        /// The client's error.
        message: String,
    },
    /// The response was not the expected JSON document.
    #[error("could not decode {what}: {message}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// The parser's error.
        message: String,
    },
    /// The key set has no key we can use.
    #[error("key set has no usable key")]
    NoUsableKeys,
    /// The issuer was needed from discovery and discovery gave none.
    #[error("discovery document has no issuer")]
    NoIssuer,
    /// A previous fetch failed and the refetch interval has not passed yet.
    #[error("previous fetch failed; next attempt allowed later")]
    RateLimited,
}

/// A short, printable rendering of an attacker-controlled header value
/// (`alg`, `kid`): at most 64 characters of `[A-Za-z0-9._~+/=-]`, others replaced.
#[derive(Clone, PartialEq, Eq)]
pub struct SanitizedValue(String);

impl SanitizedValue {
    const MAX: usize = 64;

    pub(crate) fn new(raw: &str) -> Self {
        let mut out = String::with_capacity(raw.len().min(Self::MAX + 3));
        for (i, c) in raw.chars().enumerate() {
            if i == Self::MAX {
                out.push_str("...");
                break;
            }
            let ok = c.is_ascii_alphanumeric() || "._~+/=-".contains(c);
            out.push(if ok { c } else { '?' });
        }
        SanitizedValue(out)
    }

    /// The sanitised text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SanitizedValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SanitizedValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitizes_and_truncates() {
        assert_eq!(SanitizedValue::new("RS256").as_str(), "RS256");
        assert_eq!(SanitizedValue::new("a\"b\nc").as_str(), "a?b?c");
        let long = "x".repeat(200);
        assert_eq!(SanitizedValue::new(&long).as_str().len(), 67);
    }

    #[test]
    fn classes() {
        assert!(AuthError::Expired.is_unauthenticated());
        assert!(
            AuthError::PodMismatch {
                field: PodField::PodUid
            }
            .is_permission_denied()
        );
        assert!(AuthError::KeysUnavailable(KeySourceError::NoUsableKeys).is_unavailable());
    }
}
