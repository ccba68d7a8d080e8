//! The token verifier: parsing, signature, claims, and the key cache.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tracing::{debug, instrument, warn};

use crate::claims::{Claims, Header, KubernetesClaim, parse_subject};
use crate::error::{AuthError, KeySourceError, PodField, SanitizedValue};
use crate::jwks::{Algorithm, KeyMatch, VerifyKey};
use crate::source::KeySource;

/// Tokens longer than this are refused before any decoding.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Decoded header and signature must fit these stack buffers.
const MAX_HEADER_LEN: usize = 1024;
const MAX_SIGNATURE_LEN: usize = 1024;
/// Payloads up to this size are decoded on the stack.
const STACK_PAYLOAD_LEN: usize = 4096;

/// How a [`TokenVerifier`] checks tokens.
#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// Expected `iss`. `None`: take it from the OIDC discovery document.
    pub issuer: Option<String>,
    /// Audience that `aud` must contain, for example `csi.leasehold.dev`.
    pub audience: String,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// Header algorithms accepted. `none` and HMAC cannot be expressed.
    pub allowed_algorithms: Vec<Algorithm>,
    /// Minimum time between two fetches of the key set.
    pub min_refetch_interval: Duration,
    /// Cached keys older than this are refreshed (rate-limited, in the
    /// background of one caller) so that removed keys stop being accepted.
    pub max_key_age: Duration,
    /// Limit on one fetch of discovery plus keys.
    pub fetch_timeout: Duration,
}

impl VerifierConfig {
    /// Defaults: issuer from discovery, 30 s leeway, RS256 and ES256, refetch
    /// at most every 10 s, keys refreshed after 5 min, 10 s fetch timeout.
    pub fn new(audience: impl Into<String>) -> Self {
        VerifierConfig {
            issuer: None,
            audience: audience.into(),
            leeway: Duration::from_secs(30),
            allowed_algorithms: vec![Algorithm::RS256, Algorithm::ES256],
            min_refetch_interval: Duration::from_secs(10),
            max_key_age: Duration::from_secs(300),
            fetch_timeout: Duration::from_secs(10),
        }
    }

    /// Sets a fixed issuer instead of discovering it.
    pub fn with_issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = Some(issuer.into());
        self
    }
}

/// Why a [`VerifierConfig`] was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// The audience is empty.
    #[error("audience must not be empty")]
    EmptyAudience,
    /// The issuer is set but empty.
    #[error("issuer must not be empty when set")]
    EmptyIssuer,
    /// No algorithm is allowed.
    #[error("at least one algorithm must be allowed")]
    NoAlgorithms,
}

/// The pod a token must be bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedPod {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod_name: String,
    /// The pod's UID.
    pub pod_uid: String,
    /// The pod's service account name.
    pub service_account: String,
}

/// A token that verified and is bound to the expected pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedPod {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod_name: String,
    /// The pod's UID.
    pub pod_uid: String,
    /// The pod's service account name.
    pub service_account: String,
    /// The node the pod runs on, when the token says so (Kubernetes ≥ 1.30).
    pub node_name: Option<String>,
    /// The token's `exp`.
    pub expires_at: jiff::Timestamp,
}

/// An object a token is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundObject {
    /// Its name.
    pub name: String,
    /// Its UID.
    pub uid: String,
}

/// A token that verified, with the service account it was issued to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedServiceAccount {
    /// The service account's namespace.
    pub namespace: String,
    /// The service account's name.
    pub name: String,
    /// The service account's UID.
    pub uid: String,
    /// The pod the token is bound to, if any.
    pub pod: Option<BoundObject>,
    /// The node the token is bound to or was issued on, if any.
    pub node: Option<BoundObject>,
    /// The token's `exp`.
    pub expires_at: jiff::Timestamp,
}

/// One fetched key set, immutable once published.
#[derive(Debug, Default)]
struct KeySnapshot {
    keys: Vec<VerifyKey>,
    /// From discovery, when the configuration has no issuer.
    discovered_issuer: Option<Box<str>>,
    /// `None` until the first successful fetch.
    fetched_at: Option<Instant>,
}

impl KeySnapshot {
    fn find(&self, kid: Option<&str>) -> Option<&VerifyKey> {
        match kid {
            Some(kid) => self.keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
            // Without a kid the choice is only unambiguous with a single key.
            None if self.keys.len() == 1 => self.keys.first(),
            None => None,
        }
    }
}

#[derive(Debug, Default)]
struct RefreshState {
    last_attempt: Option<Instant>,
}

/// Verifies Kubernetes service-account tokens against the cluster's keys.
///
/// Cheap to share (`Arc<TokenVerifier>`); all methods take `&self`.
pub struct TokenVerifier {
    config: VerifierConfig,
    source: Box<dyn KeySource>,
    /// Read on every verification; the lock is held only to clone the `Arc`.
    keys: RwLock<Arc<KeySnapshot>>,
    /// Serialises fetches, so concurrent callers share one.
    refresh: tokio::sync::Mutex<RefreshState>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl TokenVerifier {
    /// Creates a verifier. No request is made until the first verification
    /// (or [`TokenVerifier::refresh_keys`]).
    pub fn new(
        config: VerifierConfig,
        key_source: impl KeySource + 'static,
    ) -> Result<Self, ConfigError> {
        if config.audience.is_empty() {
            return Err(ConfigError::EmptyAudience);
        }
        if config.issuer.as_deref() == Some("") {
            return Err(ConfigError::EmptyIssuer);
        }
        if config.allowed_algorithms.is_empty() {
            return Err(ConfigError::NoAlgorithms);
        }
        Ok(TokenVerifier {
            config,
            source: Box::new(key_source),
            keys: RwLock::new(Arc::new(KeySnapshot::default())),
            refresh: tokio::sync::Mutex::new(RefreshState::default()),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &VerifierConfig {
        &self.config
    }

    /// Verifies a token and checks that it is bound to `expected`.
    #[instrument(
        level = "debug",
        skip(self, token, expected),
        fields(namespace = %expected.namespace, pod = %expected.pod_name)
    )]
    pub async fn verify_pod_token(
        &self,
        token: &str,
        expected: &ExpectedPod,
    ) -> Result<VerifiedPod, AuthError> {
        let result = self
            .verify_with(token, |k8s, exp| {
                let pod = k8s.pod.as_ref().ok_or(AuthError::NotBoundToPod)?;
                let mismatch = |field| Err(AuthError::PodMismatch { field });
                if *k8s.namespace != *expected.namespace {
                    return mismatch(PodField::Namespace);
                }
                if *k8s.serviceaccount.name != *expected.service_account {
                    return mismatch(PodField::ServiceAccount);
                }
                if *pod.name != *expected.pod_name {
                    return mismatch(PodField::PodName);
                }
                if *pod.uid != *expected.pod_uid {
                    return mismatch(PodField::PodUid);
                }
                Ok(VerifiedPod {
                    namespace: expected.namespace.clone(),
                    pod_name: expected.pod_name.clone(),
                    pod_uid: expected.pod_uid.clone(),
                    service_account: expected.service_account.clone(),
                    node_name: k8s.node.as_ref().map(|n| n.name.to_string()),
                    expires_at: exp,
                })
            })
            .await;
        if let Err(e) = &result {
            debug!(error = %e, "pod token refused");
        }
        result
    }

    /// Verifies a token and returns the service account (and pod, node) it
    /// names. Used to authenticate callers such as node drivers.
    #[instrument(level = "debug", skip(self, token))]
    pub async fn verify_service_account_token(
        &self,
        token: &str,
    ) -> Result<VerifiedServiceAccount, AuthError> {
        let result = self
            .verify_with(token, |k8s, exp| {
                let bound = |o: &crate::claims::ObjectRef<'_>| BoundObject {
                    name: o.name.to_string(),
                    uid: o.uid.to_string(),
                };
                Ok(VerifiedServiceAccount {
                    namespace: k8s.namespace.to_string(),
                    name: k8s.serviceaccount.name.to_string(),
                    uid: k8s.serviceaccount.uid.to_string(),
                    pod: k8s.pod.as_ref().map(bound),
                    node: k8s.node.as_ref().map(bound),
                    expires_at: exp,
                })
            })
            .await;
        if let Err(e) = &result {
            debug!(error = %e, "service-account token refused");
        }
        result
    }

    /// Fetches discovery (if needed) and the key set now, subject to the
    /// refetch rate limit. Useful at start-up to fail fast.
    pub async fn refresh_keys(&self) -> Result<(), AuthError> {
        let seen = self.snapshot();
        let current = self.refresh_shared(&seen, false).await?;
        if current.fetched_at.is_some() {
            Ok(())
        } else {
            Err(AuthError::KeysUnavailable(KeySourceError::RateLimited))
        }
    }

    /// Checks everything that does not depend on the caller's expectations,
    /// then hands the `kubernetes.io` claim and `exp` to `finish`.
    async fn verify_with<R>(
        &self,
        token: &str,
        finish: impl FnOnce(&KubernetesClaim<'_>, jiff::Timestamp) -> Result<R, AuthError>,
    ) -> Result<R, AuthError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Malformed("token too long"));
        }
        let (signing_input, signature_b64) = token
            .rsplit_once('.')
            .ok_or(AuthError::Malformed("not a compact JWS"))?;
        let (header_b64, payload_b64) = signing_input
            .split_once('.')
            .ok_or(AuthError::Malformed("not a compact JWS"))?;
        if header_b64.is_empty() || payload_b64.is_empty() || payload_b64.contains('.') {
            return Err(AuthError::Malformed("not a compact JWS"));
        }

        let mut header_buf = [0u8; MAX_HEADER_LEN];
        let header_len = decode_into(
            header_b64,
            &mut header_buf,
            "header too large",
            "header is not base64url",
        )?;
        let header: Header<'_> = serde_json::from_slice(&header_buf[..header_len])
            .map_err(|_| AuthError::Malformed("header is not valid JSON"))?;
        if header.crit.is_some() {
            return Err(AuthError::Malformed("unsupported critical header"));
        }
        let alg = Algorithm::from_name(&header.alg)
            .filter(|a| self.config.allowed_algorithms.contains(a))
            .ok_or_else(|| AuthError::AlgorithmNotAllowed {
                alg: SanitizedValue::new(&header.alg),
            })?;

        let mut signature_buf = [0u8; MAX_SIGNATURE_LEN];
        let signature_len = decode_into(
            signature_b64,
            &mut signature_buf,
            "signature too large",
            "signature is not base64url",
        )?;

        let kid = header.kid.as_deref();
        let snapshot = self.keys_for(kid).await?;
        let key = snapshot.find(kid).ok_or_else(|| AuthError::UnknownKey {
            kid: kid.map(SanitizedValue::new),
        })?;
        let verifier = match key.verifier_for(alg) {
            KeyMatch::Verifier(v) => v,
            KeyMatch::Mismatch => {
                return Err(AuthError::AlgorithmKeyMismatch {
                    alg: SanitizedValue::new(alg.as_str()),
                });
            }
        };
        verifier
            .verify_sig(signing_input.as_bytes(), &signature_buf[..signature_len])
            .map_err(|_| AuthError::BadSignature)?;

        // The signature is good: from here on the claims are the issuer's.
        let mut stack_payload = [0u8; STACK_PAYLOAD_LEN];
        let heap_payload;
        let payload: &[u8] = if base64::decoded_len_estimate(payload_b64.len()) <= STACK_PAYLOAD_LEN
        {
            let len = decode_into(
                payload_b64,
                &mut stack_payload,
                "payload too large",
                "payload is not base64url",
            )?;
            &stack_payload[..len]
        } else {
            heap_payload = URL_SAFE_NO_PAD
                .decode(payload_b64)
                .map_err(|_| AuthError::Malformed("payload is not base64url"))?;
            &heap_payload
        };
        let claims: Claims<'_> = serde_json::from_slice(payload)
            .map_err(|_| AuthError::Malformed("claims are not valid JSON"))?;

        let expected_issuer = match (&self.config.issuer, &snapshot.discovered_issuer) {
            (Some(configured), _) => configured.as_str(),
            (None, Some(discovered)) => discovered,
            (None, None) => return Err(AuthError::KeysUnavailable(KeySourceError::NoIssuer)),
        };
        if claims.iss.as_deref() != Some(expected_issuer) {
            return Err(AuthError::WrongIssuer);
        }
        if !claims.aud.contains(&self.config.audience) {
            return Err(AuthError::WrongAudience);
        }
        let expires_at = self.check_times(&claims)?;

        let k8s = claims
            .kubernetes
            .as_ref()
            .ok_or(AuthError::NotServiceAccountToken("no kubernetes.io claim"))?;
        let (sub_namespace, sub_name) = claims.sub.as_deref().and_then(parse_subject).ok_or(
            AuthError::NotServiceAccountToken("subject is not a service account"),
        )?;
        if sub_namespace != &*k8s.namespace || sub_name != &*k8s.serviceaccount.name {
            return Err(AuthError::NotServiceAccountToken(
                "subject does not match the kubernetes.io claim",
            ));
        }
        finish(k8s, expires_at)
    }

    fn check_times(&self, claims: &Claims<'_>) -> Result<jiff::Timestamp, AuthError> {
        let now = unix_now();
        let leeway = i64::try_from(self.config.leeway.as_secs()).unwrap_or(i64::MAX);
        let exp = claims.exp.ok_or(AuthError::Malformed("no exp claim"))?;
        if now > exp.saturating_add(leeway) {
            return Err(AuthError::Expired);
        }
        let in_future = |t: Option<i64>| t.is_some_and(|t| t > now.saturating_add(leeway));
        if in_future(claims.nbf) || in_future(claims.iat) {
            return Err(AuthError::NotYetValid);
        }
        jiff::Timestamp::from_second(exp).map_err(|_| AuthError::Malformed("exp out of range"))
    }

    fn snapshot(&self) -> Arc<KeySnapshot> {
        // A poisoned lock only means a writer panicked between two complete
        // snapshots; the value inside is still a whole snapshot.
        match self.keys.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn publish(&self, snapshot: Arc<KeySnapshot>) {
        match self.keys.write() {
            Ok(mut guard) => *guard = snapshot,
            Err(poisoned) => *poisoned.into_inner() = snapshot,
        }
    }

    /// The snapshot to look `kid` up in: the cached one when it has the key,
    /// else one after a (rate-limited, shared) refetch.
    async fn keys_for(&self, kid: Option<&str>) -> Result<Arc<KeySnapshot>, AuthError> {
        let snapshot = self.snapshot();
        if snapshot.find(kid).is_some() {
            let stale = snapshot
                .fetched_at
                .is_some_and(|t| t.elapsed() >= self.config.max_key_age);
            if !stale {
                return Ok(snapshot);
            }
            // Refresh old keys, but never make callers queue behind a fetch
            // that another caller is already doing.
            return self.refresh_shared(&snapshot, true).await;
        }
        self.refresh_shared(&snapshot, false).await
    }

    /// Fetches new keys unless another caller did since we read `seen`, or
    /// the last attempt is too recent. With `only_if_idle`, returns `seen` at
    /// once when a fetch is already running.
    async fn refresh_shared(
        &self,
        seen: &Arc<KeySnapshot>,
        only_if_idle: bool,
    ) -> Result<Arc<KeySnapshot>, AuthError> {
        let mut state = if only_if_idle {
            match self.refresh.try_lock() {
                Ok(state) => state,
                Err(_) => return Ok(Arc::clone(seen)),
            }
        } else {
            self.refresh.lock().await
        };
        let current = self.snapshot();
        if !Arc::ptr_eq(&current, seen) {
            return Ok(current);
        }
        if let Some(last) = state.last_attempt
            && last.elapsed() < self.config.min_refetch_interval
        {
            return if current.fetched_at.is_some() {
                Ok(current)
            } else {
                Err(AuthError::KeysUnavailable(KeySourceError::RateLimited))
            };
        }
        state.last_attempt = Some(Instant::now());
        match self.fetch().await {
            Ok(fresh) => {
                let fresh = Arc::new(fresh);
                self.publish(Arc::clone(&fresh));
                Ok(fresh)
            }
            Err(e) if current.fetched_at.is_some() => {
                warn!(error = %e, "refreshing signing keys failed; keeping the cached keys");
                Ok(current)
            }
            Err(e) => {
                warn!(error = %e, "fetching signing keys failed");
                Err(AuthError::KeysUnavailable(e))
            }
        }
    }

    #[instrument(level = "debug", skip(self))]
    async fn fetch(&self) -> Result<KeySnapshot, KeySourceError> {
        let work = async {
            let discovered_issuer = match self.config.issuer {
                Some(_) => None,
                None => {
                    let discovery = self.source.discovery().await?;
                    if discovery.issuer.is_empty() {
                        return Err(KeySourceError::NoIssuer);
                    }
                    Some(discovery.issuer.into_boxed_str())
                }
            };
            let set = self.source.jwks().await?;
            Ok((discovered_issuer, set))
        };
        let (discovered_issuer, set) = tokio::time::timeout(self.config.fetch_timeout, work)
            .await
            .map_err(|_| KeySourceError::Request {
                what: "signing keys",
                message: "timed out".to_owned(),
            })??;
        let mut keys = Vec::with_capacity(set.keys.len());
        for jwk in &set.keys {
            match VerifyKey::from_jwk(jwk, &self.config.allowed_algorithms) {
                Ok(key) => keys.push(key),
                Err(skipped) => {
                    debug!(kid = ?skipped.kid, reason = skipped.reason, "skipping key");
                }
            }
        }
        if keys.is_empty() {
            return Err(KeySourceError::NoUsableKeys);
        }
        debug!(keys = keys.len(), "fetched signing keys");
        Ok(KeySnapshot {
            keys,
            discovered_issuer,
            fetched_at: Some(Instant::now()),
        })
    }
}

/// Decodes base64url (no padding) into `buf`, refusing what does not fit.
fn decode_into(
    input: &str,
    buf: &mut [u8],
    too_large: &'static str,
    invalid: &'static str,
) -> Result<usize, AuthError> {
    if base64::decoded_len_estimate(input.len()) > buf.len() {
        return Err(AuthError::Malformed(too_large));
    }
    URL_SAFE_NO_PAD
        .decode_slice(input, buf)
        .map_err(|_| AuthError::Malformed(invalid))
}

fn unix_now() -> i64 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    i64::try_from(secs).unwrap_or(i64::MAX)
}
