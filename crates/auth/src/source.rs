//! Where the cluster's signing keys come from.

use async_trait::async_trait;
use serde::de::DeserializeOwned;

use crate::error::KeySourceError;
use crate::jwks::{JwkSet, OidcDiscovery};

/// The path at which the API server serves OIDC discovery.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
/// The path at which the API server serves its service-account signing keys.
pub const JWKS_PATH: &str = "/openid/v1/jwks";

/// `Accept` for the discovery document, which the API server serves as JSON.
const ACCEPT_DISCOVERY: &str = "application/json";
/// `Accept` for the key set. The API server serves it only as
/// `application/jwk-set+json` and answers `406 Not Acceptable` to a request that
/// accepts nothing but `application/json`; other issuers serve plain JSON.
const ACCEPT_JWKS: &str = "application/jwk-set+json, application/json;q=0.9";

/// A supplier of the issuer's discovery document and key set.
#[async_trait]
pub trait KeySource: Send + Sync {
    /// Fetches the OIDC discovery document.
    async fn discovery(&self) -> Result<OidcDiscovery, KeySourceError>;
    /// Fetches the current key set.
    async fn jwks(&self) -> Result<JwkSet, KeySourceError>;
}

/// Where [`HttpKeySource`] fetches the key set from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum JwksLocation {
    /// `/openid/v1/jwks` on the API server (always served there).
    #[default]
    ApiServer,
    /// The path of the discovery document's `jwks_uri`, requested from the
    /// API server through the same client. Only the path and query are used:
    /// the host in `jwks_uri` is often an external address that the pod cannot
    /// reach or that lacks the client's credentials.
    FromDiscovery,
    /// A path of your choosing on the API server.
    Path(String),
}

/// Fetches discovery and keys from the Kubernetes API server through a
/// [`kube::Client`], so in-cluster or `KUBECONFIG` credentials and CA apply.
#[derive(Clone)]
pub struct HttpKeySource {
    client: kube::Client,
    location: JwksLocation,
}

impl std::fmt::Debug for HttpKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpKeySource")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl HttpKeySource {
    /// Uses `client`, fetching keys from `/openid/v1/jwks`.
    pub fn new(client: kube::Client) -> Self {
        HttpKeySource {
            client,
            location: JwksLocation::ApiServer,
        }
    }

    /// Builds a client from the in-cluster environment or `KUBECONFIG`.
    pub async fn infer() -> Result<Self, KeySourceError> {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| KeySourceError::Request {
                what: "Kubernetes client configuration",
                message: e.to_string(),
            })?;
        Ok(HttpKeySource::new(client))
    }

    /// Chooses where the key set is fetched from.
    pub fn with_jwks_location(mut self, location: JwksLocation) -> Self {
        self.location = location;
        self
    }

    async fn get_json<T: DeserializeOwned>(
        &self,
        path: &str,
        accept: &'static str,
        what: &'static str,
    ) -> Result<T, KeySourceError> {
        let request = http::Request::get(path)
            .header(http::header::ACCEPT, accept)
            .body(Vec::new())
            .map_err(|e| KeySourceError::Request {
                what,
                message: e.to_string(),
            })?;
        let text =
            self.client
                .request_text(request)
                .await
                .map_err(|e| KeySourceError::Request {
                    what,
                    message: e.to_string(),
                })?;
        serde_json::from_str(&text).map_err(|e| KeySourceError::Decode {
            what,
            message: e.to_string(),
        })
    }
}

#[async_trait]
impl KeySource for HttpKeySource {
    async fn discovery(&self) -> Result<OidcDiscovery, KeySourceError> {
        self.get_json(DISCOVERY_PATH, ACCEPT_DISCOVERY, "OIDC discovery document")
            .await
    }

    async fn jwks(&self) -> Result<JwkSet, KeySourceError> {
        let path = match &self.location {
            JwksLocation::ApiServer => JWKS_PATH.to_owned(),
            JwksLocation::Path(p) => p.clone(),
            JwksLocation::FromDiscovery => {
                let discovery = self.discovery().await?;
                let uri = discovery.jwks_uri.ok_or(KeySourceError::Decode {
                    what: "OIDC discovery document",
                    message: "no jwks_uri".to_owned(),
                })?;
                path_of(&uri)?
            }
        };
        self.get_json(&path, ACCEPT_JWKS, "JWK set").await
    }
}

/// A fixed discovery document and key set, for tests, benchmarks, or keys
/// distributed out of band.
#[derive(Debug, Clone)]
pub struct StaticKeySource {
    discovery: OidcDiscovery,
    jwks: JwkSet,
}

impl StaticKeySource {
    /// Serves `jwks` and a discovery document naming `issuer`.
    pub fn new(issuer: impl Into<String>, jwks: JwkSet) -> Self {
        StaticKeySource {
            discovery: OidcDiscovery {
                issuer: issuer.into(),
                jwks_uri: None,
                id_token_signing_alg_values_supported: Vec::new(),
            },
            jwks,
        }
    }
}

#[async_trait]
impl KeySource for StaticKeySource {
    async fn discovery(&self) -> Result<OidcDiscovery, KeySourceError> {
        Ok(self.discovery.clone())
    }

    async fn jwks(&self) -> Result<JwkSet, KeySourceError> {
        Ok(self.jwks.clone())
    }
}

fn path_of(uri: &str) -> Result<String, KeySourceError> {
    let uri: http::Uri =
        uri.parse()
            .map_err(|e: http::uri::InvalidUri| KeySourceError::Decode {
                what: "jwks_uri",
                message: e.to_string(),
            })?;
    match uri.path_and_query() {
        Some(pq) if pq.path() != "/" || pq.query().is_some() => Ok(pq.as_str().to_owned()),
        _ => Err(KeySourceError::Decode {
            what: "jwks_uri",
            message: "no path".to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwks_uri_path_is_extracted() {
        assert_eq!(
            path_of("https://10.0.0.1:6443/openid/v1/jwks")
                .ok()
                .as_deref(),
            Some("/openid/v1/jwks")
        );
        assert_eq!(
            path_of("https://example/keys?x=1").ok().as_deref(),
            Some("/keys?x=1")
        );
        assert!(path_of("https://example").is_err());
    }
}
