//! Verification of Kubernetes projected service-account tokens.
//!
//! A [`TokenVerifier`] checks a token's signature against the keys the API
//! server publishes (`/openid/v1/jwks`, fetched through a [`KeySource`] and
//! cached), then its issuer, audience, lifetime and `kubernetes.io` binding.
//! Used by the CSI node driver (the pod's token for `csi.leasehold.dev`) and
//! by the broker (pod tokens, and node drivers' own tokens).
//!
//! No error, log line or `Debug` output contains a token.
//!
//! ```no_run
//! use leasehold_auth::{ExpectedPod, HttpKeySource, TokenVerifier, VerifierConfig};
//!
//! # async fn example(token: &str) -> Result<(), Box<dyn std::error::Error>> {
//! let keys = HttpKeySource::infer().await?; // in-cluster config or KUBECONFIG
//! let verifier = TokenVerifier::new(VerifierConfig::new("csi.leasehold.dev"), keys)?;
//! verifier.refresh_keys().await?; // optional: fail fast at start-up
//! let expected = ExpectedPod {
//!     namespace: "shop".into(),
//!     pod_name: "web-0".into(),
//!     pod_uid: "3c2f1e0a-5b6d-4e7f-8a9b-0c1d2e3f4a5b".into(),
//!     service_account: "web".into(),
//! };
//! match verifier.verify_pod_token(token, &expected).await {
//!     Ok(pod) => println!("token of {}/{} valid until {}", pod.namespace, pod.pod_name, pod.expires_at),
//!     Err(e) if e.is_unauthenticated() => { /* UNAUTHENTICATED */ }
//!     Err(e) if e.is_permission_denied() => { /* PERMISSION_DENIED */ }
//!     Err(e) => { /* UNAVAILABLE: keys could not be fetched */ let _ = e; }
//! }
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

mod claims;
mod error;
mod jwks;
mod source;
mod token;
mod verifier;

pub use error::{AuthError, ErrorClass, KeySourceError, PodField, SanitizedValue};
pub use jwks::{Algorithm, Jwk, JwkSet, OidcDiscovery};
pub use source::{
    DISCOVERY_PATH, HttpKeySource, JWKS_PATH, JwksLocation, KeySource, StaticKeySource,
};
pub use token::ServiceAccountToken;
pub use verifier::{
    BoundObject, ConfigError, ExpectedPod, MAX_TOKEN_LEN, TokenVerifier, VerifiedPod,
    VerifiedServiceAccount, VerifierConfig,
};
