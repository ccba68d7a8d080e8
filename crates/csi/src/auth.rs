//! Pod authentication: the seam to the service-account token verifier.
//!
//! `leasehold-auth` implements [`PodTokenVerifier`]; this crate only calls it.

use async_trait::async_trait;

/// What the kubelet told us about the pod; the token must match it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedPod {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod_name: String,
    /// Pod UID.
    pub pod_uid: String,
    /// Service-account name.
    pub service_account: String,
}

/// The identity a verified token proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedPod {
    /// Pod namespace from the token.
    pub namespace: String,
    /// Pod name from the token.
    pub pod_name: String,
    /// Pod UID from the token.
    pub pod_uid: String,
    /// Service-account name from the token.
    pub service_account: String,
    /// Token expiry, if known.
    pub expires_at: Option<jiff::Timestamp>,
}

/// Why a token was not accepted. Reasons never contain the token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// The token is not valid: bad signature, expired, wrong audience or issuer,
    /// malformed. Maps to `UNAUTHENTICATED`.
    #[error("token rejected: {0}")]
    Invalid(String),
    /// The token is valid but names another pod or service account, or the pod
    /// is no longer bound. Maps to `PERMISSION_DENIED`.
    #[error("token does not match the pod: {0}")]
    Mismatch(String),
    /// The verifier could not decide (keys unavailable). Maps to `UNAVAILABLE`.
    #[error("token verifier unavailable: {0}")]
    Unavailable(String),
}

/// Verifies a pod's projected service-account token.
#[async_trait]
pub trait PodTokenVerifier: Send + Sync {
    /// Checks `token` (for the driver's audience) and that it was issued to
    /// `expected`.
    async fn verify(&self, token: &str, expected: &ExpectedPod) -> Result<VerifiedPod, AuthError>;
}

/// The production verifier: `leasehold-auth` checks the token against the cluster's
/// service-account signing keys.
#[async_trait]
impl PodTokenVerifier for leasehold_auth::TokenVerifier {
    async fn verify(&self, token: &str, expected: &ExpectedPod) -> Result<VerifiedPod, AuthError> {
        let want = leasehold_auth::ExpectedPod {
            namespace: expected.namespace.clone(),
            pod_name: expected.pod_name.clone(),
            pod_uid: expected.pod_uid.clone(),
            service_account: expected.service_account.clone(),
        };
        match self.verify_pod_token(token, &want).await {
            Ok(v) => Ok(VerifiedPod {
                namespace: v.namespace,
                pod_name: v.pod_name,
                pod_uid: v.pod_uid,
                service_account: v.service_account,
                expires_at: Some(v.expires_at),
            }),
            Err(e) => Err(match e.class() {
                leasehold_auth::ErrorClass::Unauthenticated => AuthError::Invalid(e.to_string()),
                leasehold_auth::ErrorClass::PermissionDenied => AuthError::Mismatch(e.to_string()),
                leasehold_auth::ErrorClass::Unavailable => AuthError::Unavailable(e.to_string()),
            }),
        }
    }
}
