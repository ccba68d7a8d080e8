//! The token verifier: header and key selection, `jsonwebtoken` decoding and
//! validation, the Kubernetes claim checks, and the key cache.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Validation;
use jsonwebtoken::errors::{Error as JwtError, ErrorKind as JwtErrorKind};
use tracing::{debug, instrument, warn};

use crate::claims::{Claims, KubernetesClaim, ObjectRef, parse_subject};
use crate::error::{AuthError, KeySourceError, PodField, SanitizedValue};
use crate::jwks::{Algorithm, VerifyKey};
use crate::source::KeySource;

/// Tokens longer than this are refused before any decoding.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

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
    /// One `jsonwebtoken` validation per allowed algorithm, for this
    /// snapshot's issuer (configured or discovered).
    validations: Vec<(Algorithm, Validation)>,
    /// `None` until the first successful fetch.
    fetched_at: Option<Instant>,
}

impl KeySnapshot {
    fn validation(&self, alg: Algorithm) -> Option<&Validation> {
        self.validations
            .iter()
            .find_map(|(a, v)| (*a == alg).then_some(v))
    }

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
                    node_name: k8s.node.map(|n| n.name),
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
                let bound = |o: ObjectRef| BoundObject {
                    name: o.name,
                    uid: o.uid,
                };
                Ok(VerifiedServiceAccount {
                    namespace: k8s.namespace,
                    name: k8s.serviceaccount.name,
                    uid: k8s.serviceaccount.uid,
                    pod: k8s.pod.map(bound),
                    node: k8s.node.map(bound),
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
        finish: impl FnOnce(KubernetesClaim, jiff::Timestamp) -> Result<R, AuthError>,
    ) -> Result<R, AuthError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Malformed("token too long"));
        }
        let header = read_header(token)?;
        if header.crit.is_some() {
            return Err(AuthError::Malformed("unsupported critical header"));
        }
        // Alg-confusion defence, before any key is touched: the header's alg
        // must be one we allow (never `none` or HMAC) ...
        let alg = Algorithm::from_jwt(header.alg)
            .filter(|a| self.config.allowed_algorithms.contains(a))
            .ok_or_else(|| AuthError::AlgorithmNotAllowed {
                alg: SanitizedValue::new(&format!("{:?}", header.alg)),
            })?;

        let kid = header.kid.as_deref();
        let snapshot = self.keys_for(kid).await?;
        let key = snapshot.find(kid).ok_or_else(|| AuthError::UnknownKey {
            kid: kid.map(SanitizedValue::new),
        })?;
        // ... and must fit the key named by kid (type, curve, pinned alg).
        let mismatch = || AuthError::AlgorithmKeyMismatch {
            alg: SanitizedValue::new(alg.as_str()),
        };
        let decoding_key = key.decoding_key_for(alg).ok_or_else(mismatch)?;
        // Built for exactly this algorithm, the audience, the issuer, leeway.
        let validation =
            snapshot
                .validation(alg)
                .ok_or_else(|| AuthError::AlgorithmNotAllowed {
                    alg: SanitizedValue::new(alg.as_str()),
                })?;
        // Signature first, then iss, aud, exp (required) and nbf.
        let claims = jsonwebtoken::decode::<Claims>(token, decoding_key, validation)
            .map_err(|e| decode_error(&e, alg))?
            .claims;

        // The signature is good: from here on the claims are the issuer's.
        let expires_at = self.check_times(&claims)?;
        let Claims {
            sub, kubernetes, ..
        } = claims;
        let k8s = kubernetes.ok_or(AuthError::NotServiceAccountToken("no kubernetes.io claim"))?;
        let (sub_namespace, sub_name) =
            sub.as_deref()
                .and_then(parse_subject)
                .ok_or(AuthError::NotServiceAccountToken(
                    "subject is not a service account",
                ))?;
        if sub_namespace != k8s.namespace || sub_name != k8s.serviceaccount.name {
            return Err(AuthError::NotServiceAccountToken(
                "subject does not match the kubernetes.io claim",
            ));
        }
        finish(k8s, expires_at)
    }

    /// `exp` and `nbf` were checked by `jsonwebtoken`; `iat` is not, so a
    /// token issued in the future (beyond leeway) is refused here.
    fn check_times(&self, claims: &Claims) -> Result<jiff::Timestamp, AuthError> {
        let now = unix_now();
        let leeway = i64::try_from(self.config.leeway.as_secs()).unwrap_or(i64::MAX);
        let exp = claims.exp.ok_or(AuthError::Malformed("no exp claim"))?;
        if claims.iat.is_some_and(|t| t > now.saturating_add(leeway)) {
            return Err(AuthError::NotYetValid);
        }
        jiff::Timestamp::from_second(exp).map_err(|_| AuthError::Malformed("exp out of range"))
    }

    /// The `jsonwebtoken` validation for `alg`: that one algorithm, our
    /// audience and `issuer`, `exp`, `iss` and `aud` required, `exp` and
    /// `nbf` checked with the configured leeway.
    fn validation(&self, alg: Algorithm, issuer: &str) -> Validation {
        let mut validation = Validation::new(alg.to_jwt());
        validation.set_audience(&[self.config.audience.as_str()]);
        validation.set_issuer(&[issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        // jsonwebtoken computes `now - leeway` and `now + leeway` in u64:
        // a leeway beyond the current time would overflow and means
        // "any time" anyway.
        let now = u64::try_from(unix_now()).unwrap_or(0);
        validation.leeway = self.config.leeway.as_secs().min(now);
        validation
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
            let issuer = match &self.config.issuer {
                Some(configured) => configured.clone(),
                None => {
                    let discovery = self.source.discovery().await?;
                    if discovery.issuer.is_empty() {
                        return Err(KeySourceError::NoIssuer);
                    }
                    discovery.issuer
                }
            };
            let set = self.source.jwks().await?;
            Ok((issuer, set))
        };
        let (issuer, set) = tokio::time::timeout(self.config.fetch_timeout, work)
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
        let validations = self
            .config
            .allowed_algorithms
            .iter()
            .map(|&alg| (alg, self.validation(alg, &issuer)))
            .collect();
        Ok(KeySnapshot {
            keys,
            validations,
            fetched_at: Some(Instant::now()),
        })
    }
}

/// The token's header, through `jsonwebtoken`. A header it refuses only
/// because `alg` is a name it does not know (`none`, ...) is reported as a
/// refused algorithm, not as a malformed token.
fn read_header(token: &str) -> Result<jsonwebtoken::Header, AuthError> {
    jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
        JwtErrorKind::Json(_) => {
            unknown_alg(token).unwrap_or(AuthError::Malformed("header is not valid JSON"))
        }
        JwtErrorKind::Base64(_) => AuthError::Malformed("header is not base64url"),
        JwtErrorKind::Utf8(_) => AuthError::Malformed("header is not valid JSON"),
        _ => AuthError::Malformed("not a compact JWS"),
    })
}

/// For a header `jsonwebtoken` could not parse: its `alg`, when that is a
/// string naming no algorithm `jsonwebtoken` knows.
fn unknown_alg(token: &str) -> Option<AuthError> {
    #[derive(serde::Deserialize)]
    struct AlgOnly {
        alg: String,
    }
    // decode_header got as far as JSON, so the header is the first of three
    // parts and valid base64url.
    let json = URL_SAFE_NO_PAD.decode(token.split('.').next()?).ok()?;
    let AlgOnly { alg } = serde_json::from_slice(&json).ok()?;
    alg.parse::<jsonwebtoken::Algorithm>()
        .is_err()
        .then(|| AuthError::AlgorithmNotAllowed {
            alg: SanitizedValue::new(&alg),
        })
}

/// Maps a `jsonwebtoken` decoding or validation error. Only fixed texts are
/// kept: `jsonwebtoken`'s messages may quote parts of the token.
fn decode_error(e: &JwtError, alg: Algorithm) -> AuthError {
    match e.kind() {
        JwtErrorKind::InvalidSignature
        // A key that aws-lc refuses verifies nothing.
        | JwtErrorKind::InvalidRsaKey(_)
        | JwtErrorKind::InvalidEcdsaKey => AuthError::BadSignature,
        JwtErrorKind::ExpiredSignature => AuthError::Expired,
        JwtErrorKind::ImmatureSignature => AuthError::NotYetValid,
        JwtErrorKind::InvalidAudience => AuthError::WrongAudience,
        JwtErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        JwtErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "iss" => AuthError::WrongIssuer,
            "aud" => AuthError::WrongAudience,
            "exp" => AuthError::Malformed("no exp claim"),
            _ => AuthError::Malformed("a required claim is missing"),
        },
        JwtErrorKind::InvalidClaimFormat(_) => {
            AuthError::Malformed("a registered claim has an invalid format")
        }
        // Checked before decoding; kept in case jsonwebtoken disagrees.
        JwtErrorKind::InvalidAlgorithm | JwtErrorKind::InvalidKeyFormat => {
            AuthError::AlgorithmKeyMismatch {
                alg: SanitizedValue::new(alg.as_str()),
            }
        }
        JwtErrorKind::InvalidToken => AuthError::Malformed("not a compact JWS"),
        JwtErrorKind::Base64(_) => AuthError::Malformed("payload or signature is not base64url"),
        JwtErrorKind::Json(_) | JwtErrorKind::Utf8(_) => {
            AuthError::Malformed("claims are not valid JSON")
        }
        _ => AuthError::Malformed("token could not be decoded"),
    }
}

fn unix_now() -> i64 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    i64::try_from(secs).unwrap_or(i64::MAX)
}
