//! Verification of Kubernetes projected service-account tokens.
//!
//! A [`TokenVerifier`] checks a token's signature against the keys the API
//! server publishes (`/openid/v1/jwks`, fetched through a [`KeySource`] and
//! cached), then its issuer, audience, lifetime and `kubernetes.io` binding.
//! Used by the CSI node driver (the pod's token for `csi.leasehold.dev`) and
//! by the broker (pod tokens, and node drivers' own tokens).
//!
//! No error, log line or `Debug` output contains a token.
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
