//! `acme` issuers: the account kept in a Secret, and the [`AcmeIssuer`] put into the
//! [`IssuerRegistry`].
//!
//! Reconcile of an ACME issuer: *plan* (pure: which Secrets, which directory) → read the
//! account Secret → *evaluate* (pure: a usable account, none yet, or why it cannot be
//! used) → load it, or register one (EAB read only then) and **persist it before use**
//! (create-only, never overwrite) → register an [`AcmeIssuer`] with the process's
//! HTTP-01 solver.
//!
//! A registered account whose Secret could not be written is kept in memory
//! ([`PendingAccounts`]) and written on the next attempt, so a failed write never
//! registers a second account.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::{Api, Client};
use leasehold_acme::{
    AccountRequest, AcmeAccount, AcmeError, AcmeIssuer, Directory, ExternalAccountBinding,
    Http01Solver, PollPolicy, StoredAccount, TrustRoots, account_for,
};
use leasehold_api::{AcmeIssuer as AcmeSpec, IssuerSecretRef};
use secrecy::{ExposeSecret, SecretString};

use crate::OperatorError;
use crate::issuers::{IssuerKey, IssuerRegistry, NOT_READY_RESYNC, NotReadyReason, READY_RESYNC};
use crate::secrets::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};

/// Secret key of the stored ACME account (JSON: account URL, directory, private key).
pub const ACCOUNT_KEY: &str = "account.json";
/// Secret key of the External Account Binding HMAC key (base64url).
pub const EAB_KEY: &str = "key";
/// First retry after the directory could not be reached; doubles up to
/// [`MAX_DIRECTORY_BACKOFF`].
pub const DIRECTORY_BACKOFF: Duration = Duration::from_secs(5);
pub const MAX_DIRECTORY_BACKOFF: Duration = Duration::from_secs(300);
/// Retry after a rate limit when the CA gave no Retry-After.
pub const RATE_LIMIT_DEFAULT_RETRY: Duration = Duration::from_secs(60);

/// A Secret by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SecretName {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for SecretName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What an `acme` spec resolves to: the directory, whom to trust, and the Secrets read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcmePlan {
    pub directory_url: String,
    /// PEM roots for the directory's TLS; `None`: the public web PKI.
    pub ca_bundle: Option<String>,
    pub extra_trust_anchors: Option<String>,
    pub email: Option<String>,
    pub account_secret: SecretName,
    /// Key id and the Secret of its HMAC key.
    pub eab: Option<(String, SecretName)>,
}

impl AcmePlan {
    pub fn directory(&self) -> Directory {
        Directory {
            url: self.directory_url.clone(),
            trust: match &self.ca_bundle {
                Some(pem) => TrustRoots::Pem(pem.clone()),
                None => TrustRoots::Public,
            },
        }
    }

    /// The Secrets this issuer reads (a change to one re-checks the issuer).
    pub fn secrets(&self) -> Vec<&SecretName> {
        std::iter::once(&self.account_secret)
            .chain(self.eab.as_ref().map(|(_, s)| s))
            .collect()
    }

    /// What a registry entry is built from: the same identity, the same issuer.
    pub fn identity(&self, account_url: &str) -> String {
        format!(
            "acme\n{}\n{account_url}\n{}\n{}",
            self.directory_url,
            self.ca_bundle.as_deref().unwrap_or("public"),
            self.extra_trust_anchors.as_deref().unwrap_or_default()
        )
    }
}

/// The Secret `reference` names, for issuer `key`: an Issuer only ever reads its own
/// namespace; a ClusterIssuer the named one or the controller's.
pub fn resolve_secret_ref(
    key: &IssuerKey,
    reference: &IssuerSecretRef,
    field: &str,
    controller_namespace: &str,
) -> Result<SecretName, NotReadyReason> {
    let namespace = match key {
        IssuerKey::Namespaced { namespace, .. } => match &reference.namespace {
            Some(other) if other != namespace => {
                return Err(NotReadyReason {
                    reason: "InvalidSpec",
                    message: format!(
                        "an Issuer reads Secrets from its own namespace {namespace}; remove {field}.namespace ({other}) or use a ClusterIssuer"
                    ),
                });
            }
            _ => namespace.clone(),
        },
        IssuerKey::Cluster { .. } => reference
            .namespace
            .clone()
            .unwrap_or_else(|| controller_namespace.to_owned()),
    };
    Ok(SecretName {
        namespace,
        name: reference.name.clone(),
    })
}

/// What `spec.acme` of issuer `key` asks for.
pub fn plan_acme(
    key: &IssuerKey,
    spec: &AcmeSpec,
    controller_namespace: &str,
) -> Result<AcmePlan, NotReadyReason> {
    if !spec.directory_url.starts_with("https://") {
        return Err(NotReadyReason {
            reason: "InvalidSpec",
            message: format!(
                "spec.acme.directoryUrl {:?} must start with https:// (trust a private CA's TLS root with spec.acme.caBundle)",
                spec.directory_url
            ),
        });
    }
    let account_secret = resolve_secret_ref(
        key,
        &spec.account_key_secret_ref,
        "spec.acme.accountKeySecretRef",
        controller_namespace,
    )?;
    let eab = spec
        .external_account_binding
        .as_ref()
        .map(|eab| {
            resolve_secret_ref(
                key,
                &eab.key_secret_ref,
                "spec.acme.externalAccountBinding.keySecretRef",
                controller_namespace,
            )
            .map(|secret| (eab.key_id.clone(), secret))
        })
        .transpose()?;
    let non_empty = |s: &Option<String>| s.clone().filter(|s| !s.trim().is_empty());
    Ok(AcmePlan {
        directory_url: spec.directory_url.clone(),
        ca_bundle: non_empty(&spec.ca_bundle),
        extra_trust_anchors: non_empty(&spec.extra_trust_anchors),
        email: non_empty(&spec.email),
        account_secret,
        eab,
    })
}

/// What the account Secret holds.
#[derive(Debug)]
pub enum AccountSecretState {
    /// An account for this directory: load it.
    Usable(Box<StoredAccount>),
    /// No Secret: register an account and create it.
    Absent,
    /// A Secret that cannot be used (and is never overwritten).
    Unusable(NotReadyReason),
}

fn secret_bytes<'a>(secret: &'a Secret, key: &str) -> Option<&'a [u8]> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|v| v.0.as_slice())
        .filter(|v| !v.iter().all(u8::is_ascii_whitespace))
}

/// The account kept in `secret`, or why it cannot be used. Messages never carry the
/// Secret's content (a parse error could quote it, so none is shown).
pub fn evaluate_account_secret(secret: Option<&Secret>, plan: &AcmePlan) -> AccountSecretState {
    let name = &plan.account_secret;
    let Some(secret) = secret else {
        return AccountSecretState::Absent;
    };
    let Some(json) = secret_bytes(secret, ACCOUNT_KEY) else {
        return AccountSecretState::Unusable(NotReadyReason {
            reason: "AccountSecretIncomplete",
            message: format!(
                "Secret {name} has no {ACCOUNT_KEY}: delete it to let the controller register an account and keep it there, or point spec.acme.accountKeySecretRef at another Secret"
            ),
        });
    };
    let Ok(stored) = serde_json::from_slice::<StoredAccount>(json) else {
        return AccountSecretState::Unusable(NotReadyReason {
            reason: "InvalidAccountSecret",
            message: format!(
                "Secret {name}: {ACCOUNT_KEY} is not an ACME account (JSON with id, key_pkcs8 and directory as the controller writes it)"
            ),
        });
    };
    match stored.directory_url() {
        Some(url) if url != plan.directory_url => AccountSecretState::Unusable(NotReadyReason {
            reason: "AccountDirectoryMismatch",
            message: format!(
                "Secret {name} holds an account at directory {url}, not {}: point spec.acme.accountKeySecretRef at another Secret (the controller creates it), or delete this one",
                plan.directory_url
            ),
        }),
        _ => AccountSecretState::Usable(Box::new(stored)),
    }
}

/// The External Account Binding in `secret` (base64url under `key`), or why not.
pub fn evaluate_eab_secret(
    secret: Option<&Secret>,
    key_id: &str,
    name: &SecretName,
) -> Result<ExternalAccountBinding, NotReadyReason> {
    use base64::Engine as _;
    let Some(secret) = secret else {
        return Err(NotReadyReason {
            reason: "EABSecretNotFound",
            message: format!(
                "Secret {name} does not exist: create it with the external account binding's HMAC key (base64url) under {EAB_KEY}"
            ),
        });
    };
    let Some(encoded) = secret_bytes(secret, EAB_KEY) else {
        return Err(NotReadyReason {
            reason: "EABSecretIncomplete",
            message: format!(
                "Secret {name} has no {EAB_KEY}: put the external account binding's HMAC key (base64url) there"
            ),
        });
    };
    let text: Vec<u8> = encoded
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'=')
        .collect();
    match base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&text) {
        Ok(hmac_key) if !hmac_key.is_empty() => Ok(ExternalAccountBinding {
            key_id: key_id.to_owned(),
            hmac_key,
        }),
        _ => Err(NotReadyReason {
            reason: "InvalidEABSecret",
            message: format!(
                "Secret {name}: {EAB_KEY} is not a base64url HMAC key (as the CA hands it out)"
            ),
        }),
    }
}

/// The Secret a newly registered account is kept in: `Opaque`, `account.json`, no owner
/// (the account must outlive a deleted and re-created issuer: its certificates can only
/// be revoked with it).
pub fn account_secret(name: &SecretName, account_json: &SecretString) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.name.clone()),
            namespace: Some(name.namespace.clone()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_owned(),
                MANAGED_BY_VALUE.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            ACCOUNT_KEY.to_owned(),
            ByteString(account_json.expose_secret().as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

/// An account step that did not lead to a usable account: the status, and when to
/// look again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountFailure {
    pub why: NotReadyReason,
    pub retry_in: Duration,
}

impl AccountFailure {
    /// Not ready until something changes (the Secret watch or the periodic re-check).
    pub fn waiting(why: NotReadyReason) -> Self {
        Self {
            why,
            retry_in: NOT_READY_RESYNC,
        }
    }
}

/// The delay after the `attempt`-th consecutive failure to reach the directory (0-based).
pub fn directory_backoff(attempt: u32) -> Duration {
    DIRECTORY_BACKOFF
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(MAX_DIRECTORY_BACKOFF)
}

/// How an ACME failure of the account step reads in the issuer's status.
/// `registering`: a new account was being registered (else a stored one loaded).
pub fn account_failure(
    e: &AcmeError,
    plan: &AcmePlan,
    registering: bool,
    attempt: u32,
    now: SystemTime,
) -> AccountFailure {
    let directory = &plan.directory_url;
    let what = if registering {
        "registering an account".to_owned()
    } else {
        format!("loading the account kept in Secret {}", plan.account_secret)
    };
    match e {
        AcmeError::RateLimited { problem } => {
            let retry_in = problem
                .retry_after
                .map(|at| at.duration_since(now).unwrap_or_default())
                .unwrap_or(RATE_LIMIT_DEFAULT_RETRY)
                .max(Duration::from_secs(1));
            // An absolute time: the message stays the same until then (a status write
            // wakes the issuer again).
            let at = now
                .checked_add(retry_in)
                .and_then(|at| at.duration_since(SystemTime::UNIX_EPOCH).ok())
                .and_then(|d| jiff::Timestamp::from_second(d.as_secs().try_into().ok()?).ok())
                .map_or_else(|| "later".to_owned(), |t| t.to_string());
            AccountFailure {
                why: NotReadyReason {
                    reason: "RateLimited",
                    message: format!(
                        "the ACME CA at {directory} rate-limited {what}: {problem}; retrying after {at}"
                    ),
                },
                retry_in,
            }
        }
        AcmeError::Problem { problem } if problem.status.is_none_or(|s| s < 500) => {
            AccountFailure::waiting(NotReadyReason {
                reason: "AccountRegistrationFailed",
                message: format!("the ACME CA at {directory} refused {what}: {problem}"),
            })
        }
        AcmeError::InvalidInput(detail) => AccountFailure::waiting(NotReadyReason {
            reason: "InvalidCABundle",
            message: format!("spec.acme.caBundle cannot be used: {detail}"),
        }),
        AcmeError::Status { status, .. } if *status < 500 && *status != 429 => {
            AccountFailure::waiting(NotReadyReason {
                reason: "AccountRegistrationFailed",
                message: format!("the ACME CA at {directory} refused {what}: {e}"),
            })
        }
        _ => {
            let retry_in = directory_backoff(attempt);
            AccountFailure {
                why: NotReadyReason {
                    reason: "DirectoryUnreachable",
                    message: format!(
                        "cannot reach the ACME directory {directory} ({what}): {e}; retrying with backoff"
                    ),
                },
                retry_in,
            }
        }
    }
}

// ---- the Secret store ----

/// Why the account Secret could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SecretStoreError {
    #[error("the controller may not access Secret {secret}: {message}")]
    Forbidden { secret: SecretName, message: String },
    #[error("namespace {namespace} does not exist")]
    NamespaceNotFound { namespace: String },
    #[error("Secret {secret}: {message}")]
    Unavailable { secret: SecretName, message: String },
}

/// Whether a create made the Secret or found one there already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    Created,
    AlreadyExists,
}

/// Where account and EAB Secrets are read and account Secrets created.
#[async_trait]
pub trait AccountSecretStore: Send + Sync {
    async fn get(&self, name: &SecretName) -> Result<Option<Secret>, SecretStoreError>;
    /// Create `secret`; never overwrite one that exists.
    async fn create(&self, secret: Secret) -> Result<Created, SecretStoreError>;
}

/// Secrets in the cluster.
#[derive(Clone)]
pub struct KubeSecretStore {
    client: Client,
    /// Seals the account (its private key) in Secrets the controller creates.
    keyring: std::sync::Arc<leasehold_envelope::Keyring>,
}

impl std::fmt::Debug for KubeSecretStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeSecretStore")
    }
}

impl KubeSecretStore {
    pub fn new(client: Client, keyring: std::sync::Arc<leasehold_envelope::Keyring>) -> Self {
        Self { client, keyring }
    }
}

fn key_error(name: &SecretName, e: &leasehold_envelope::EnvelopeError) -> SecretStoreError {
    SecretStoreError::Unavailable {
        secret: name.clone(),
        message: format!("{}: {e}", e.reason()),
    }
}

fn store_error(name: &SecretName, e: kube::Error) -> SecretStoreError {
    match e {
        kube::Error::Api(s) if s.code == 403 => SecretStoreError::Forbidden {
            secret: name.clone(),
            message: s.message,
        },
        kube::Error::Api(s) => SecretStoreError::Unavailable {
            secret: name.clone(),
            message: format!("{} ({})", s.message, s.code),
        },
        other => SecretStoreError::Unavailable {
            secret: name.clone(),
            message: other.to_string(),
        },
    }
}

#[async_trait]
impl AccountSecretStore for KubeSecretStore {
    async fn get(&self, name: &SecretName) -> Result<Option<Secret>, SecretStoreError> {
        let secret = Api::<Secret>::namespaced(self.client.clone(), &name.namespace)
            .get_opt(&name.name)
            .await
            .map_err(|e| store_error(name, e))?;
        match secret {
            Some(s) => leasehold_envelope::secret::open_secret(&self.keyring, &s)
                .await
                .map(Some)
                .map_err(|e| key_error(name, &e)),
            None => Ok(None),
        }
    }

    async fn create(&self, secret: Secret) -> Result<Created, SecretStoreError> {
        let name = SecretName {
            namespace: secret.metadata.namespace.clone().unwrap_or_default(),
            name: secret.metadata.name.clone().unwrap_or_default(),
        };
        let secret = leasehold_envelope::secret::seal_secret(
            &self.keyring,
            leasehold_envelope::secret::SealedKind::AcmeAccount,
            secret,
        )
        .await
        .map_err(|e| key_error(&name, &e))?;
        match Api::<Secret>::namespaced(self.client.clone(), &name.namespace)
            .create(&PostParams::default(), &secret)
            .await
        {
            Ok(_) => Ok(Created::Created),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Created::AlreadyExists),
            Err(kube::Error::Api(s)) if s.code == 404 => Err(SecretStoreError::NamespaceNotFound {
                namespace: name.namespace,
            }),
            Err(e) => Err(store_error(&name, e)),
        }
    }
}

/// Secrets in memory (tests), with writes that can be made to fail.
#[derive(Default)]
pub struct MemorySecretStore {
    secrets: Mutex<BTreeMap<SecretName, Secret>>,
    /// Make the next this-many creates fail as if the API server were unavailable.
    pub failures_to_inject: std::sync::atomic::AtomicUsize,
    /// Creates that made a Secret.
    pub creates: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for MemorySecretStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: the Secrets hold keys.
        let secrets = self.secrets.lock().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("MemorySecretStore")
            .field("secrets", &secrets.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl MemorySecretStore {
    pub fn insert(&self, secret: Secret) {
        let name = SecretName {
            namespace: secret.metadata.namespace.clone().unwrap_or_default(),
            name: secret.metadata.name.clone().unwrap_or_default(),
        };
        self.secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, secret);
    }

    pub fn secret(&self, name: &SecretName) -> Option<Secret> {
        self.secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }
}

#[async_trait]
impl AccountSecretStore for MemorySecretStore {
    async fn get(&self, name: &SecretName) -> Result<Option<Secret>, SecretStoreError> {
        Ok(self.secret(name))
    }

    async fn create(&self, secret: Secret) -> Result<Created, SecretStoreError> {
        use std::sync::atomic::Ordering;
        let name = SecretName {
            namespace: secret.metadata.namespace.clone().unwrap_or_default(),
            name: secret.metadata.name.clone().unwrap_or_default(),
        };
        if self
            .failures_to_inject
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(SecretStoreError::Unavailable {
                secret: name,
                message: "injected failure".into(),
            });
        }
        let mut secrets = self.secrets.lock().unwrap_or_else(|e| e.into_inner());
        if secrets.contains_key(&name) {
            return Ok(Created::AlreadyExists);
        }
        secrets.insert(name, secret);
        self.creates.fetch_add(1, Ordering::SeqCst);
        Ok(Created::Created)
    }
}

// ---- the account step ----

/// An account registered at `directory_url` whose Secret is not written yet.
struct PendingAccount {
    directory_url: String,
    json: SecretString,
}

/// Registered accounts waiting to be persisted, by Secret: the next attempt writes the
/// same account instead of registering another.
#[derive(Default)]
pub struct PendingAccounts(Mutex<HashMap<SecretName, PendingAccount>>);

impl std::fmt::Debug for PendingAccounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pending = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("PendingAccounts")
            .field("secrets", &pending.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl PendingAccounts {
    fn get(&self, secret: &SecretName, directory_url: &str) -> Option<SecretString> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(secret)
            .filter(|p| p.directory_url == directory_url)
            .map(|p| p.json.clone())
    }

    fn put(&self, secret: SecretName, directory_url: &str, json: SecretString) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(
            secret,
            PendingAccount {
                directory_url: directory_url.to_owned(),
                json,
            },
        );
    }

    fn forget(&self, secret: &SecretName) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(secret);
    }

    /// Whether an account for `secret` waits to be written.
    pub fn is_pending(&self, secret: &SecretName) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(secret)
    }

    /// The URL of the account waiting for `secret` (tests).
    pub fn pending_account_url(&self, secret: &SecretName) -> Option<String> {
        let json = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(secret)
            .map(|p| p.json.clone())?;
        account_url_of(json.expose_secret().as_bytes())
    }
}

/// The account URL in stored account JSON (not secret).
pub fn account_url_of(json: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(json).ok()?;
    value.get("id")?.as_str().map(str::to_owned)
}

fn store_failure(e: SecretStoreError) -> Result<AccountFailure, OperatorError> {
    match e {
        SecretStoreError::Forbidden { secret, message } => {
            Ok(AccountFailure::waiting(NotReadyReason {
                reason: "SecretForbidden",
                message: format!(
                    "the controller may not access Secret {secret} ({message}): grant its service account get and create on Secrets in {}",
                    secret.namespace
                ),
            }))
        }
        SecretStoreError::NamespaceNotFound { namespace } => {
            Ok(AccountFailure::waiting(NotReadyReason {
                reason: "AccountSecretNotFound",
                message: format!(
                    "the account Secret cannot be created: namespace {namespace} does not exist"
                ),
            }))
        }
        e @ SecretStoreError::Unavailable { .. } => Err(OperatorError::Store(
            leasehold_engine::StoreError(e.to_string()),
        )),
    }
}

/// The account an issuer uses.
#[derive(Debug)]
pub enum AccountReady {
    /// The Secret holds the account the registry already uses: nothing to load.
    InUse { account_url: String },
    /// Loaded from the Secret (registered first if there was none).
    Loaded(AcmeAccount),
}

/// The issuer's account: the one kept in its Secret, or a new one registered and
/// persisted before it is used. `Ok(Err(..))`: not ready (status says why);
/// `Err`: the Secret store failed (retried with the controller's backoff; an account
/// already registered waits in `pending`).
pub async fn ensure_account(
    store: &dyn AccountSecretStore,
    pending: &PendingAccounts,
    plan: &AcmePlan,
    attempt: u32,
    in_use: &(dyn Fn(&str) -> bool + Sync),
) -> Result<Result<AccountReady, AccountFailure>, OperatorError> {
    let directory = plan.directory();
    let name = &plan.account_secret;
    // Twice at most: a Secret someone else created meanwhile is read back and loaded.
    for _ in 0..2 {
        let secret = match store.get(name).await {
            Ok(secret) => secret,
            Err(e) => return store_failure(e).map(Err),
        };
        match evaluate_account_secret(secret.as_ref(), plan) {
            AccountSecretState::Unusable(why) => return Ok(Err(AccountFailure::waiting(why))),
            AccountSecretState::Usable(stored) => {
                // The Secret is the truth; anything still pending lost the race.
                if pending.is_pending(name) {
                    tracing::warn!(secret = %name, "an account Secret appeared meanwhile; the account registered here is not used");
                    pending.forget(name);
                }
                let account_url = serde_json::to_vec(&*stored)
                    .ok()
                    .and_then(|json| account_url_of(&json));
                if let Some(account_url) = account_url.filter(|url| in_use(url)) {
                    return Ok(Ok(AccountReady::InUse { account_url }));
                }
                return Ok(AcmeAccount::load(&directory.trust, *stored)
                    .await
                    .map(AccountReady::Loaded)
                    .map_err(|e| account_failure(&e, plan, false, attempt, SystemTime::now())));
            }
            AccountSecretState::Absent => {}
        }
        let json = match pending.get(name, &plan.directory_url) {
            Some(json) => {
                tracing::info!(secret = %name, "writing the ACME account registered earlier");
                json
            }
            None => match register(store, plan, &directory, attempt).await? {
                Ok(json) => {
                    pending.put(name.clone(), &plan.directory_url, json.clone());
                    json
                }
                Err(failure) => return Ok(Err(failure)),
            },
        };
        match store.create(account_secret(name, &json)).await {
            Ok(Created::Created) => {
                pending.forget(name);
                tracing::info!(secret = %name, directory = %plan.directory_url, "registered an ACME account and kept it in its Secret");
                let stored: StoredAccount =
                    serde_json::from_str(json.expose_secret()).map_err(|_| {
                        OperatorError::Config("a registered ACME account does not read back".into())
                    })?;
                return Ok(AcmeAccount::load(&directory.trust, stored)
                    .await
                    .map(AccountReady::Loaded)
                    .map_err(|e| account_failure(&e, plan, false, attempt, SystemTime::now())));
            }
            Ok(Created::AlreadyExists) => continue,
            Err(e) => return store_failure(e).map(Err),
        }
    }
    Ok(Err(AccountFailure::waiting(NotReadyReason {
        reason: "AccountSecretConflict",
        message: format!("Secret {name} keeps changing; retrying"),
    })))
}

/// Register an account (reading the EAB key first when the spec names one); its JSON.
async fn register(
    store: &dyn AccountSecretStore,
    plan: &AcmePlan,
    directory: &Directory,
    attempt: u32,
) -> Result<Result<SecretString, AccountFailure>, OperatorError> {
    let external_account_binding = match &plan.eab {
        None => None,
        Some((key_id, secret_name)) => {
            let secret = match store.get(secret_name).await {
                Ok(secret) => secret,
                Err(e) => return store_failure(e).map(Err),
            };
            match evaluate_eab_secret(secret.as_ref(), key_id, secret_name) {
                Ok(eab) => Some(eab),
                Err(why) => return Ok(Err(AccountFailure::waiting(why))),
            }
        }
    };
    let request = AccountRequest {
        contact_email: plan.email.clone(),
        external_account_binding,
    };
    let stored = match account_for(directory, &request, None).await {
        Ok((_, Some(stored))) => stored,
        Ok((_, None)) => {
            return Err(OperatorError::Config(
                "the ACME client returned no account to keep".into(),
            ));
        }
        Err(e) => {
            return Ok(Err(account_failure(
                &e,
                plan,
                true,
                attempt,
                SystemTime::now(),
            )));
        }
    };
    let json = serde_json::to_string(&stored).map_err(|e| OperatorError::Serialize {
        what: "ACME account",
        message: e.to_string(),
    })?;
    Ok(Ok(SecretString::from(json)))
}

// ---- the issuer ----

/// What every ACME issuer of this process shares: the HTTP-01 solver, accounts waiting
/// to be persisted, and failure counts for the directory backoff.
pub struct AcmeState {
    /// The solver, or why there is none (not configured, or it could not listen).
    pub solver: Result<Arc<Http01Solver>, String>,
    pub pending: PendingAccounts,
    pub poll: PollPolicy,
    attempts: Mutex<HashMap<IssuerKey, u32>>,
    /// Issuers the CA is not asked about again before a time (rate limit, backoff).
    holds: Mutex<HashMap<IssuerKey, Hold>>,
}

/// Do not contact the CA for this issuer before `until` while its plan is `plan`.
struct Hold {
    plan: AcmePlan,
    until: std::time::Instant,
    why: NotReadyReason,
}

impl std::fmt::Debug for AcmeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeState")
            .field("solver", &self.solver.as_ref().map(|s| s.local_addr()))
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl AcmeState {
    pub fn new(solver: Result<Arc<Http01Solver>, String>) -> Self {
        Self {
            solver,
            pending: PendingAccounts::default(),
            poll: PollPolicy::default(),
            attempts: Mutex::default(),
            holds: Mutex::default(),
        }
    }

    /// No solver: ACME issuers are not ready, saying why.
    pub fn without_solver(why: impl Into<String>) -> Self {
        Self::new(Err(why.into()))
    }

    fn attempt(&self, key: &IssuerKey) -> u32 {
        self.attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// Why the CA is not to be asked yet, and for how long.
    fn held(&self, key: &IssuerKey, plan: &AcmePlan) -> Option<(NotReadyReason, Duration)> {
        let holds = self.holds.lock().unwrap_or_else(|e| e.into_inner());
        let hold = holds.get(key).filter(|hold| hold.plan == *plan)?;
        let left = hold
            .until
            .checked_duration_since(std::time::Instant::now())?;
        Some((hold.why.clone(), left))
    }

    fn hold(&self, key: &IssuerKey, plan: &AcmePlan, failure: Option<&AccountFailure>) {
        let mut holds = self.holds.lock().unwrap_or_else(|e| e.into_inner());
        match failure {
            Some(failure)
                if matches!(failure.why.reason, "RateLimited" | "DirectoryUnreachable") =>
            {
                holds.insert(
                    key.clone(),
                    Hold {
                        plan: plan.clone(),
                        until: std::time::Instant::now() + failure.retry_in,
                        why: failure.why.clone(),
                    },
                );
            }
            _ => {
                holds.remove(key);
            }
        }
    }

    fn record(&self, key: &IssuerKey, failed: bool) {
        let mut attempts = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
        if failed {
            *attempts.entry(key.clone()).or_default() += 1;
        } else {
            attempts.remove(key);
        }
    }
}

/// The result of loading an ACME issuer: the `Ready` message or why not, and when to
/// reconcile again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcmeOutcome {
    pub result: Result<String, NotReadyReason>,
    pub retry_in: Duration,
}

/// Load issuer `key`'s account per `plan` and put its [`AcmeIssuer`] into `registry`.
/// The registry entry for a not-ready outcome is left to the caller.
pub async fn load_acme_issuer(
    key: &IssuerKey,
    plan: &AcmePlan,
    store: &dyn AccountSecretStore,
    state: &AcmeState,
    registry: &IssuerRegistry,
) -> Result<AcmeOutcome, OperatorError> {
    let solver = match &state.solver {
        Ok(solver) => solver.clone(),
        Err(why) => {
            return Ok(AcmeOutcome {
                result: Err(NotReadyReason {
                    reason: "NoHttp01Solver",
                    message: format!(
                        "the controller serves no HTTP-01 solver ({why}): check --acme-http01-addr and the controller's log"
                    ),
                }),
                retry_in: NOT_READY_RESYNC,
            });
        }
    };
    // Rate-limited or unreachable: a reconcile triggered meanwhile (a status write, a
    // Secret event) does not ask the CA again before the time is up.
    if let Some((why, left)) = state.held(key, plan) {
        return Ok(AcmeOutcome {
            result: Err(why),
            retry_in: left,
        });
    }
    let attempt = state.attempt(key);
    let in_use = |account_url: &str| registry.is_ready_as(key, &plan.identity(account_url));
    let account = ensure_account(store, &state.pending, plan, attempt, &in_use).await;
    state.record(key, !matches!(account, Ok(Ok(_))));
    let account = match account? {
        Ok(account) => account,
        Err(failure) => {
            state.hold(key, plan, Some(&failure));
            return Ok(AcmeOutcome {
                result: Err(failure.why),
                retry_in: failure.retry_in,
            });
        }
    };
    state.hold(key, plan, None);
    let account_url = match account {
        AccountReady::InUse { account_url } => account_url,
        AccountReady::Loaded(account) => {
            let account_url = account.id().to_owned();
            let mut issuer = AcmeIssuer::new(account, solver, state.poll);
            if let Some(anchors) = &plan.extra_trust_anchors {
                issuer = issuer.with_extra_trust_anchors(anchors.clone());
            }
            registry.set_ready_issuer(key.clone(), Arc::new(issuer), plan.identity(&account_url));
            account_url
        }
    };
    Ok(AcmeOutcome {
        result: Ok(format!(
            "ordering from ACME directory {} as account {account_url} (kept in Secret {}); HTTP-01 answered by the controller's solver",
            plan.directory_url, plan.account_secret
        )),
        retry_in: READY_RESYNC,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use leasehold_acme::ProblemDetails;
    use leasehold_api::ExternalAccountBinding as EabSpec;

    use super::*;

    fn spec() -> AcmeSpec {
        AcmeSpec {
            directory_url: "https://acme.example/directory".into(),
            email: Some("ops@example.com".into()),
            account_key_secret_ref: IssuerSecretRef {
                name: "acct".into(),
                namespace: None,
            },
            external_account_binding: Some(EabSpec {
                key_id: "kid-1".into(),
                key_secret_ref: IssuerSecretRef {
                    name: "eab".into(),
                    namespace: None,
                },
            }),
            http01: None,
            ca_bundle: Some("  ".into()),
            extra_trust_anchors: None,
        }
    }

    fn ns_key() -> IssuerKey {
        IssuerKey::Namespaced {
            namespace: "shop".into(),
            name: "le".into(),
        }
    }

    fn secret(name: &str, data: &[(&str, &[u8])]) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                ..ObjectMeta::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| ((*k).to_owned(), ByteString(v.to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    fn sn(ns: &str, name: &str) -> SecretName {
        SecretName {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    #[test]
    fn the_plan_names_the_secrets_per_issuer_kind() {
        let plan = plan_acme(&ns_key(), &spec(), "leasehold").unwrap();
        assert_eq!(plan.account_secret, sn("shop", "acct"));
        assert_eq!(plan.eab, Some(("kid-1".into(), sn("shop", "eab"))));
        assert_eq!(plan.ca_bundle, None, "a blank bundle means the public PKI");
        assert_eq!(plan.directory().trust, TrustRoots::Public);
        assert_eq!(plan.secrets().len(), 2);

        let cluster = IssuerKey::Cluster { name: "le".into() };
        let mut s = spec();
        s.account_key_secret_ref.namespace = Some("pki".into());
        s.ca_bundle = Some("-----BEGIN CERTIFICATE-----".into());
        let plan = plan_acme(&cluster, &s, "leasehold").unwrap();
        assert_eq!(plan.account_secret, sn("pki", "acct"));
        assert_eq!(plan.eab.unwrap().1, sn("leasehold", "eab"));
        assert!(plan.ca_bundle.is_some());

        // An Issuer never reads another namespace.
        let why = plan_acme(&ns_key(), &s, "leasehold").unwrap_err();
        assert_eq!(why.reason, "InvalidSpec");
        assert!(why.message.contains("pki"), "{}", why.message);
        let mut s = spec();
        s.directory_url = "http://acme.example/dir".into();
        assert_eq!(
            plan_acme(&ns_key(), &s, "x").unwrap_err().reason,
            "InvalidSpec"
        );
    }

    const STORED: &str = r#"{"id":"https://acme.example/acct/7","key_pkcs8":"c2VjcmV0LWtleS1ieXRlcw","directory":"https://acme.example/directory"}"#;

    #[test]
    fn the_account_secret_is_usable_absent_or_says_what_to_fix() {
        let plan = plan_acme(&ns_key(), &spec(), "leasehold").unwrap();
        assert!(matches!(
            evaluate_account_secret(None, &plan),
            AccountSecretState::Absent
        ));
        assert!(matches!(
            evaluate_account_secret(
                Some(&secret("acct", &[(ACCOUNT_KEY, STORED.as_bytes())])),
                &plan
            ),
            AccountSecretState::Usable(_)
        ));
        let reason = |s: Secret| match evaluate_account_secret(Some(&s), &plan) {
            AccountSecretState::Unusable(why) => why,
            other => panic!("{other:?}"),
        };
        let incomplete = reason(secret("acct", &[("tls.key", b"x")]));
        assert_eq!(incomplete.reason, "AccountSecretIncomplete");
        assert!(incomplete.message.contains("shop/acct"));
        // A parse error never quotes the content.
        let garbage = reason(secret(
            "acct",
            &[(ACCOUNT_KEY, br#"{"id": 1, "key_pkcs8": "TOPSECRETKEY"}"#)],
        ));
        assert_eq!(garbage.reason, "InvalidAccountSecret");
        assert!(!format!("{garbage:?}").contains("TOPSECRETKEY"));
        let elsewhere = STORED.replace("acme.example/directory", "other.example/dir");
        let moved = reason(secret("acct", &[(ACCOUNT_KEY, elsewhere.as_bytes())]));
        assert_eq!(moved.reason, "AccountDirectoryMismatch");
        assert!(moved.message.contains("https://other.example/dir"));
    }

    #[test]
    fn the_eab_key_is_base64url_and_never_shown() {
        let name = sn("shop", "eab");
        let eab = evaluate_eab_secret(
            Some(&secret("eab", &[(EAB_KEY, b"c2VjcmV0LWhtYWM_-w==\n")])),
            "kid-1",
            &name,
        )
        .unwrap();
        assert_eq!(eab.key_id, "kid-1");
        assert_eq!(eab.hmac_key[..11], *b"secret-hmac");
        assert!(!format!("{eab:?}").contains("secret"));
        assert_eq!(
            evaluate_eab_secret(None, "kid-1", &name)
                .unwrap_err()
                .reason,
            "EABSecretNotFound"
        );
        assert_eq!(
            evaluate_eab_secret(Some(&secret("eab", &[])), "kid-1", &name)
                .unwrap_err()
                .reason,
            "EABSecretIncomplete"
        );
        let bad = evaluate_eab_secret(
            Some(&secret("eab", &[(EAB_KEY, b"not base64 at all!")])),
            "kid-1",
            &name,
        )
        .unwrap_err();
        assert_eq!(bad.reason, "InvalidEABSecret");
        assert!(!bad.message.contains("not base64"));
    }

    #[test]
    fn the_account_secret_is_opaque_and_unowned() {
        let s = account_secret(&sn("shop", "acct"), &SecretString::from(STORED));
        assert_eq!(s.type_.as_deref(), Some("Opaque"));
        assert!(s.metadata.owner_references.is_none());
        assert_eq!(
            s.data.as_ref().unwrap().keys().collect::<Vec<_>>(),
            [ACCOUNT_KEY]
        );
        assert_eq!(
            account_url_of(STORED.as_bytes()).as_deref(),
            Some("https://acme.example/acct/7")
        );
    }

    fn problem(kind: &str, status: u16, retry_after: Option<SystemTime>) -> ProblemDetails {
        ProblemDetails {
            kind: Some(kind.into()),
            detail: Some("the CA's words".into()),
            status: Some(status),
            subproblems: Vec::new(),
            retry_after,
        }
    }

    #[test]
    fn failures_map_to_reasons_and_retries() {
        let plan = plan_acme(&ns_key(), &spec(), "leasehold").unwrap();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        let limited = account_failure(
            &AcmeError::RateLimited {
                problem: problem(
                    leasehold_acme::RATE_LIMITED,
                    429,
                    Some(now + Duration::from_secs(90)),
                ),
            },
            &plan,
            true,
            0,
            now,
        );
        assert_eq!(limited.why.reason, "RateLimited");
        assert_eq!(limited.retry_in, Duration::from_secs(90));
        assert!(limited.why.message.contains("the CA's words"));
        let no_header = account_failure(
            &AcmeError::RateLimited {
                problem: problem(leasehold_acme::RATE_LIMITED, 429, None),
            },
            &plan,
            true,
            0,
            now,
        );
        assert_eq!(no_header.retry_in, RATE_LIMIT_DEFAULT_RETRY);

        let refused = account_failure(
            &AcmeError::Problem {
                problem: problem(
                    "urn:ietf:params:acme:error:externalAccountRequired",
                    403,
                    None,
                ),
            },
            &plan,
            true,
            0,
            now,
        );
        assert_eq!(refused.why.reason, "AccountRegistrationFailed");
        assert!(refused.why.message.contains("the CA's words"));
        assert_eq!(refused.retry_in, NOT_READY_RESYNC);

        let down = |attempt| {
            account_failure(
                &AcmeError::Transport("connection refused".into()),
                &plan,
                false,
                attempt,
                now,
            )
        };
        assert_eq!(down(0).why.reason, "DirectoryUnreachable");
        assert_eq!(down(0).retry_in, DIRECTORY_BACKOFF);
        assert_eq!(down(1).retry_in, DIRECTORY_BACKOFF * 2);
        assert_eq!(down(30).retry_in, MAX_DIRECTORY_BACKOFF);
        let server_error = account_failure(
            &AcmeError::Problem {
                problem: problem("urn:ietf:params:acme:error:serverInternal", 503, None),
            },
            &plan,
            true,
            0,
            now,
        );
        assert_eq!(server_error.why.reason, "DirectoryUnreachable");
        assert_eq!(
            account_failure(
                &AcmeError::InvalidInput("bad CA certificate PEM".into()),
                &plan,
                true,
                0,
                now
            )
            .why
            .reason,
            "InvalidCABundle"
        );
    }

    #[tokio::test]
    async fn an_unusable_secret_is_never_overwritten_and_nothing_is_registered() {
        // Port 9 (discard): any registration attempt would fail as unreachable.
        let mut s = spec();
        s.directory_url = "https://127.0.0.1:9/dir".into();
        s.external_account_binding = None;
        let plan = plan_acme(&ns_key(), &s, "leasehold").unwrap();
        let store = MemorySecretStore::default();
        store.insert(secret("acct", &[("unrelated", b"x")]));
        let pending = PendingAccounts::default();
        let failure = ensure_account(&store, &pending, &plan, 0, &|_| false)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(failure.why.reason, "AccountSecretIncomplete");
        assert_eq!(
            store.creates.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "never overwritten"
        );
        // A missing EAB Secret stops registration before the CA is asked.
        let plan = plan_acme(&ns_key(), &spec(), "leasehold").unwrap();
        let store = MemorySecretStore::default();
        let failure = ensure_account(&store, &pending, &plan, 0, &|_| false)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(failure.why.reason, "EABSecretNotFound");
        assert!(!pending.is_pending(&plan.account_secret));
    }
}
