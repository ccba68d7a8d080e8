//! Local mode: the same engine without a cluster.
//!
//! Reads `RotationPolicy`, `SecretLease` and `Secret` manifests (the very same API types)
//! from a directory, keeps progress and credential secrets in one state file (written
//! atomically, mode 0600), and writes each lease's current credential into
//! `OUTPUT/<namespace>/<lease>/` with the atomic `..data` swap.
//!
//! Every secret the state file keeps (credential versions, issue journals, generated CA
//! keys, ACME accounts) is sealed with the run's [`Keyring`] (a local key or AWS KMS;
//! plaintext only with an explicit opt-out), each bound to where it is stored (see
//! [`StoredValue::context`]). Progress and status stay readable without the key.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use base64::Engine as _;
use jiff::Timestamp;
use leasehold_api::{
    REVOKE_NOW_ANNOTATION, ROTATE_ANNOTATION, RotationPolicy, RotationPolicySpec, SecretLease,
    SecretLeaseSpec,
};
use leasehold_backends::CredentialMaterial;
use leasehold_core::Progress;
use leasehold_core::rotation::{Observations, Phase, phase, rotation_due_at};
use leasehold_envelope::{EncryptionContext, EnvelopeError, Keyring, Zeroizing};
use leasehold_files::{AtomicDir, WriteOptions};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::context::{AdminCredentials, BackendRegistry, LeaseKey, resolve};
use crate::engine::{Engine, Outcome, Stores};
use crate::sealed::key_store_error;
use crate::{Delivery, ProgressStore, SecretStore, StoreError};

/// Errors of local mode (never with secret values).
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("cannot write the state file {path}: {message}")]
    State { path: PathBuf, message: String },
    #[error(
        "the state file {path} is in use by another `leasehold local run` (lock {lock} is held); \
         stop that process first: two runners on one state file would overwrite each other's progress"
    )]
    Locked { path: PathBuf, lock: PathBuf },
    /// An emergency revocation request could not be recorded.
    #[error("{0}")]
    Request(String),
    /// A sealed value in the state file cannot be opened (or sealed again) with the
    /// configured keys. The state file is left as it was.
    #[error(
        "the state file {path}: {value}: {source}; run with the key it was sealed under \
         (--key-file or --kms-key-id, or the old key as --decrypt-key-file)"
    )]
    Key {
        path: PathBuf,
        /// Which value (lease and version, or issuer and field).
        value: Box<StoredValue>,
        source: Box<EnvelopeError>,
    },
}

/// Where a secret in the state file is kept; it is sealed for exactly this place.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum StoredValue {
    /// A lease's secret-store slot: a credential version, or an issue journal (slots
    /// counted down from `u64::MAX`).
    Version {
        namespace: String,
        lease: String,
        version: u64,
    },
    /// A generated CA's private key (PEM).
    IssuerCaKey { issuer: String },
    /// An ACME issuer's registered account (its private key inside).
    IssuerAcmeAccount { issuer: String },
}

impl StoredValue {
    /// The encryption context the value is sealed for: a value copied to another lease,
    /// version, issuer or field does not open.
    pub fn context(&self) -> EncryptionContext {
        let base = EncryptionContext::new().with("leasehold", "local-state");
        match self {
            Self::Version {
                namespace,
                lease,
                version,
            } => base
                .with("namespace", namespace)
                .with("lease", lease)
                .with("version", version.to_string()),
            Self::IssuerCaKey { issuer } => base.with("issuer", issuer).with("field", "caKey"),
            Self::IssuerAcmeAccount { issuer } => {
                base.with("issuer", issuer).with("field", "acmeAccount")
            }
        }
    }

    fn of_lease(lease: &LeaseKey, version: u64) -> Self {
        Self::Version {
            namespace: lease.namespace.clone(),
            lease: lease.name.clone(),
            version,
        }
    }

    /// The state-file key of the lease or issuer holding the value.
    pub fn owner(&self) -> String {
        match self {
            Self::Version {
                namespace, lease, ..
            } => format!("{namespace}/{lease}"),
            Self::IssuerCaKey { issuer } | Self::IssuerAcmeAccount { issuer } => issuer.clone(),
        }
    }
}

impl std::fmt::Display for StoredValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Version {
                namespace,
                lease,
                version,
            } => write!(f, "lease {namespace}/{lease} slot {version}"),
            Self::IssuerCaKey { issuer } => write!(f, "the CA key of issuer {issuer}"),
            Self::IssuerAcmeAccount { issuer } => {
                write!(f, "the ACME account of issuer {issuer}")
            }
        }
    }
}

/// One lease as kept in the state file. `Debug` leaves the secrets out.
#[derive(Serialize, Deserialize, Clone, Default)]
#[serde(rename_all = "camelCase")]
pub struct LocalLease {
    /// Stable identity (credential names derive from it), made up on first sight.
    pub uid: String,
    #[serde(default)]
    pub progress: Progress,
    /// Version → password, sealed (`lhenc1:…`) unless the run opted out of encryption.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    secrets: BTreeMap<u64, String>,
    /// The last spec seen, so a lease removed from the manifests can still be revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_spec: Option<SecretLeaseSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_policy: Option<RotationPolicySpec>,
    /// Last error, for `status` (no secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_check_at: Option<Timestamp>,
}

impl std::fmt::Debug for LocalLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalLease")
            .field("uid", &self.uid)
            .field("progress", &self.progress)
            .field(
                "secrets",
                &format_args!("[{} redacted]", self.secrets.len()),
            )
            .field("last_spec", &self.last_spec)
            .field("last_policy", &self.last_policy)
            .field("last_error", &self.last_error)
            .field("next_check_at", &self.next_check_at)
            .finish()
    }
}

impl std::fmt::Debug for LocalState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalState")
            .field("leases", &self.leases.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The whole state file.
#[derive(Serialize, Deserialize, Clone, Default)]
pub struct LocalState {
    #[serde(default)]
    pub leases: BTreeMap<String, LocalLease>,
    /// Certificate issuers: their CA (a generated root with its key) and revoked serials.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub issuers: BTreeMap<String, crate::local_issuers::LocalIssuer>,
}

impl LocalState {
    /// Every secret value kept, with where it is kept.
    pub fn stored_values(&self) -> Vec<(StoredValue, &str)> {
        let mut out = Vec::new();
        for (key, lease) in &self.leases {
            let Some((namespace, name)) = key.split_once('/') else {
                continue;
            };
            for (version, value) in &lease.secrets {
                out.push((
                    StoredValue::Version {
                        namespace: namespace.into(),
                        lease: name.into(),
                        version: *version,
                    },
                    value.as_str(),
                ));
            }
        }
        for (key, issuer) in &self.issuers {
            if !issuer.key.is_empty() {
                out.push((
                    StoredValue::IssuerCaKey {
                        issuer: key.clone(),
                    },
                    issuer.key.as_str(),
                ));
            }
            if let Some(account) = &issuer.acme_account {
                out.push((
                    StoredValue::IssuerAcmeAccount {
                        issuer: key.clone(),
                    },
                    account.as_str(),
                ));
            }
        }
        out
    }

    /// Replace the value at `at` (which [`Self::stored_values`] reported).
    fn set_stored(&mut self, at: &StoredValue, value: String) {
        match at {
            StoredValue::Version {
                namespace,
                lease,
                version,
            } => {
                if let Some(l) = self.leases.get_mut(&format!("{namespace}/{lease}")) {
                    l.secrets.insert(*version, value);
                }
            }
            StoredValue::IssuerCaKey { issuer } => {
                if let Some(i) = self.issuers.get_mut(issuer) {
                    i.key = value;
                }
            }
            StoredValue::IssuerAcmeAccount { issuer } => {
                if let Some(i) = self.issuers.get_mut(issuer) {
                    i.acme_account = Some(value);
                }
            }
        }
    }

    pub fn load(path: &Path) -> Result<Self, LocalError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| LocalError::State {
                path: path.into(),
                message: format!("not a leasehold state file: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(LocalError::Read {
                path: path.into(),
                source,
            }),
        }
    }

    fn write(&self, path: &Path) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| StoreError(e.to_string()))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError(format!("cannot create {}: {e}", dir.display())))?;
        }
        leasehold_files::write_file_atomic(path, &bytes, 0o600)
            .map_err(|e| StoreError(e.to_string()))
    }
}

/// The state file behind both the progress and the secret store.
///
/// Holds an exclusive advisory lock (`flock`) on `<state>.lock` for as long as it lives,
/// so a second runner on the same state file is refused instead of overwriting this
/// one's progress (each writes the whole file). The lock goes with the process, also on
/// a crash. `leasehold local status` only reads and takes no lock.
///
/// Secrets are sealed with `keyring` on the way in and opened on the way out.
pub struct StateFile {
    path: PathBuf,
    state: Mutex<LocalState>,
    keyring: Arc<Keyring>,
    /// Every sealed value was found to open with `keyring` (see [`Self::check_keys`]).
    keys_checked: AtomicBool,
    _lock: std::fs::File,
}

impl std::fmt::Debug for StateFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateFile")
            .field("path", &self.path)
            .field("keyring", &self.keyring)
            .finish()
    }
}

/// What [`StateFile::check_keys`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KeyCheck {
    /// Values sealed (all of which open).
    pub sealed: usize,
    /// Values kept as plaintext.
    pub plaintext: usize,
    /// Values not sealed under the primary key (plaintext while a key is set, or sealed
    /// under an old key): `leasehold local rekey` seals them again.
    pub stale: usize,
}

/// What [`StateFile::rewrap`] did: values sealed anew, by owner (lease `ns/name` or
/// issuer key). Owners with nothing to do are absent.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RewrapReport {
    pub rewrapped: BTreeMap<String, usize>,
    /// Values already sealed under the primary key (or plaintext without one).
    pub unchanged: usize,
}

impl RewrapReport {
    /// All values sealed anew.
    pub fn total(&self) -> usize {
        self.rewrapped.values().sum()
    }
}

impl StateFile {
    /// Lock the state file at `path` (see [`lock_path`]) and load it. Nothing is
    /// decrypted yet: [`Self::check_keys`] tells whether `keyring` opens what is there.
    pub fn open(path: impl Into<PathBuf>, keyring: Arc<Keyring>) -> Result<Self, LocalError> {
        let path = path.into();
        let lock = lock_state(&path)?;
        let state = LocalState::load(&path)?;
        Ok(Self {
            path,
            state: Mutex::new(state),
            keyring,
            keys_checked: AtomicBool::new(false),
            _lock: lock,
        })
    }

    /// The keyring values are sealed with.
    pub fn keyring(&self) -> &Arc<Keyring> {
        &self.keyring
    }

    /// Open every sealed value once, so a wrong or missing key is reported at start,
    /// naming the value and the key id it needs, before anything is changed.
    pub async fn check_keys(&self) -> Result<KeyCheck, LocalError> {
        let state = self.snapshot().await;
        let mut check = KeyCheck::default();
        for (at, value) in state.stored_values() {
            if self.keyring.needs_rewrap(value.as_bytes()) {
                check.stale += 1;
            }
            if !Keyring::is_sealed(value.as_bytes()) {
                check.plaintext += 1;
                continue;
            }
            check.sealed += 1;
            self.keyring
                .open(&at.context(), value.as_bytes())
                .await
                .map_err(|source| LocalError::Key {
                    path: self.path.clone(),
                    value: Box::new(at.clone()),
                    source: Box::new(source),
                })?;
        }
        self.keys_checked.store(true, Ordering::Release);
        Ok(check)
    }

    /// Open every value and seal again what is not sealed under the keyring's primary
    /// key (plaintext → sealed, old key → primary, or sealed → plaintext for an
    /// unencrypted keyring), then write the file once. On any failure nothing is
    /// written.
    pub async fn rewrap(&self) -> Result<RewrapReport, LocalError> {
        let mut state = self.state.lock().await;
        let mut next = state.clone();
        let mut report = RewrapReport::default();
        let unencrypted = self.keyring.primary_key_id().is_none();
        for (at, value) in state.stored_values() {
            let bytes = value.as_bytes();
            let stale =
                self.keyring.needs_rewrap(bytes) || (unencrypted && Keyring::is_sealed(bytes));
            if !stale {
                report.unchanged += 1;
                continue;
            }
            let key_err = |source| LocalError::Key {
                path: self.path.clone(),
                value: Box::new(at.clone()),
                source: Box::new(source),
            };
            let ctx = at.context();
            let plain = self.keyring.open(&ctx, bytes).await.map_err(key_err)?;
            let sealed = self.keyring.seal(&ctx, &plain).await.map_err(key_err)?;
            next.set_stored(&at, sealed);
            *report.rewrapped.entry(at.owner()).or_default() += 1;
        }
        if report.total() > 0 {
            next.write(&self.path).map_err(|e| LocalError::State {
                path: self.path.clone(),
                message: e.0,
            })?;
            *state = next;
        }
        Ok(report)
    }

    /// Seal `plaintext` to be kept at `at`.
    pub(crate) async fn seal_value(
        &self,
        at: &StoredValue,
        plaintext: &[u8],
    ) -> Result<String, StoreError> {
        self.keyring
            .seal(&at.context(), plaintext)
            .await
            .map_err(|e| key_store_error(&format!("cannot encrypt {at} for the state file"), &e))
    }

    /// Open `stored`, kept at `at`.
    pub(crate) async fn open_value(
        &self,
        at: &StoredValue,
        stored: &str,
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        self.keyring
            .open(&at.context(), stored.as_bytes())
            .await
            .map_err(|e| key_store_error(&format!("cannot decrypt {at} in the state file"), &e))
    }

    /// [`Self::open_value`] for text (PEM, JSON, passwords).
    pub(crate) async fn open_text(
        &self,
        at: &StoredValue,
        stored: &str,
    ) -> Result<Zeroizing<String>, StoreError> {
        let bytes = self.open_value(at, stored).await?;
        std::str::from_utf8(&bytes)
            .map(|s| Zeroizing::new(s.to_owned()))
            .map_err(|_| StoreError(format!("{at} in the state file is not UTF-8")))
    }

    pub async fn snapshot(&self) -> LocalState {
        self.state.lock().await.clone()
    }

    pub(crate) async fn update<R>(
        &self,
        f: impl FnOnce(&mut LocalState) -> R,
    ) -> Result<R, StoreError> {
        let mut state = self.state.lock().await;
        let r = f(&mut state);
        state.write(&self.path)?;
        Ok(r)
    }
}

/// The lock file of a state file: `<state>.lock` beside it.
pub fn lock_path(state: &Path) -> PathBuf {
    let mut name = state.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Take the exclusive lock of `state`, or refuse at once if another runner holds it.
fn lock_state(state: &Path) -> Result<std::fs::File, LocalError> {
    use std::os::unix::fs::OpenOptionsExt;
    let lock = lock_path(state);
    let io_err = |message: String| LocalError::State {
        path: state.into(),
        message,
    };
    if let Some(dir) = state.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| io_err(format!("cannot create {}: {e}", dir.display())))?;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock)
        .map_err(|e| io_err(format!("cannot open the lock file {}: {e}", lock.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(LocalError::Locked {
            path: state.into(),
            lock,
        }),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(io_err(format!("cannot lock {}: {e}", lock.display())))
        }
    }
}

fn key_of(lease: &LeaseKey) -> String {
    format!("{}/{}", lease.namespace, lease.name)
}

#[async_trait]
impl ProgressStore for StateFile {
    async fn save(&self, lease: &LeaseKey, progress: &Progress) -> Result<(), StoreError> {
        self.update(|s| s.leases.entry(key_of(lease)).or_default().progress = progress.clone())
            .await
    }
}

#[async_trait]
impl SecretStore for StateFile {
    async fn put(
        &self,
        lease: &LeaseKey,
        version: u64,
        secret: &SecretString,
    ) -> Result<(), StoreError> {
        let value = self
            .seal_value(
                &StoredValue::of_lease(lease, version),
                secret.expose_secret().as_bytes(),
            )
            .await?;
        self.update(|s| {
            s.leases
                .entry(key_of(lease))
                .or_default()
                .secrets
                .insert(version, value);
        })
        .await
    }

    async fn get(
        &self,
        lease: &LeaseKey,
        version: u64,
    ) -> Result<Option<SecretString>, StoreError> {
        let stored = {
            let state = self.state.lock().await;
            state
                .leases
                .get(&key_of(lease))
                .and_then(|l| l.secrets.get(&version))
                .cloned()
        };
        let Some(stored) = stored else {
            return Ok(None);
        };
        let text = self
            .open_text(&StoredValue::of_lease(lease, version), &stored)
            .await?;
        Ok(Some(SecretString::from(text.as_str())))
    }

    async fn remove(&self, lease: &LeaseKey, version: u64) -> Result<(), StoreError> {
        self.update(|s| {
            if let Some(l) = s.leases.get_mut(&key_of(lease)) {
                l.secrets.remove(&version);
            }
        })
        .await
    }
}

/// Writes credentials into `OUTPUT/<namespace>/<lease>/`.
#[derive(Debug, Clone)]
pub struct DirectoryDelivery {
    pub root: PathBuf,
}

#[async_trait]
impl Delivery for DirectoryDelivery {
    async fn deliver(
        &self,
        lease: &LeaseKey,
        _version: u64,
        material: &CredentialMaterial,
    ) -> Result<(), StoreError> {
        let dir = self.root.join(&lease.namespace).join(&lease.name);
        let files = material.0.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)
                .map_err(|e| StoreError(format!("cannot create {}: {e}", dir.display())))?;
            AtomicDir::new(&dir)
                .write(
                    &files,
                    WriteOptions {
                        file_mode: 0o400,
                        dir_mode: 0o500,
                        gid: None,
                    },
                )
                .map(|_| ())
                .map_err(|e| StoreError(e.to_string()))
        })
        .await
        .map_err(|e| StoreError(e.to_string()))?
    }
}

/// The objects found in a manifest directory.
#[derive(Default)]
pub struct Manifests {
    pub policies: BTreeMap<(String, String), RotationPolicy>,
    pub leases: BTreeMap<(String, String), SecretLease>,
    /// Issuers by [`crate::local_issuers::issuer_key`] (`<namespace>/<name>`, or
    /// `_cluster/<name>` for ClusterIssuers).
    pub issuers: BTreeMap<String, leasehold_api::IssuerSpec>,
    /// (namespace, name) → key → value.
    secrets: BTreeMap<(String, String), BTreeMap<String, SecretString>>,
}

impl std::fmt::Debug for Manifests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manifests")
            .field("policies", &self.policies.keys().collect::<Vec<_>>())
            .field("leases", &self.leases.keys().collect::<Vec<_>>())
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Manifests {
    /// Read every `*.yaml`/`*.yml` file in `dir` (not recursive).
    pub fn load(dir: &Path) -> Result<Self, LocalError> {
        let mut out = Self::default();
        let entries = std::fs::read_dir(dir).map_err(|source| LocalError::Read {
            path: dir.into(),
            source,
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        files.sort();
        for path in files {
            let text = std::fs::read_to_string(&path).map_err(|source| LocalError::Read {
                path: path.clone(),
                source,
            })?;
            for doc in serde_norway::Deserializer::from_str(&text) {
                let value =
                    serde_json::Value::deserialize(doc).map_err(|e| LocalError::Manifest {
                        path: path.clone(),
                        message: format!("not YAML: {e}"),
                    })?;
                if value.is_null() {
                    continue;
                }
                out.add(&path, value)?;
            }
        }
        Ok(out)
    }

    fn add(&mut self, path: &Path, value: serde_json::Value) -> Result<(), LocalError> {
        let err = |message: String| LocalError::Manifest {
            path: path.into(),
            message,
        };
        let kind = value["kind"].as_str().unwrap_or_default().to_string();
        let namespace = value["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let name = value["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        match kind.as_str() {
            "RotationPolicy" => {
                let mut p: RotationPolicy = serde_json::from_value(value)
                    .map_err(|e| err(format!("RotationPolicy {name}: {e}")))?;
                p.metadata.namespace = Some(namespace.clone());
                self.policies.insert((namespace, name), p);
            }
            "SecretLease" => {
                let mut l: SecretLease = serde_json::from_value(value)
                    .map_err(|e| err(format!("SecretLease {name}: {e}")))?;
                l.metadata.namespace = Some(namespace.clone());
                self.leases.insert((namespace, name), l);
            }
            "Issuer" => {
                let i: leasehold_api::Issuer = serde_json::from_value(value)
                    .map_err(|e| err(format!("Issuer {name}: {e}")))?;
                self.issuers.insert(format!("{namespace}/{name}"), i.spec);
            }
            "ClusterIssuer" => {
                let i: leasehold_api::ClusterIssuer = serde_json::from_value(value)
                    .map_err(|e| err(format!("ClusterIssuer {name}: {e}")))?;
                self.issuers
                    .insert(format!("_cluster/{name}"), i.spec.into());
            }
            "Secret" => {
                let mut data = BTreeMap::new();
                if let Some(map) = value["stringData"].as_object() {
                    for (k, v) in map {
                        data.insert(
                            k.clone(),
                            SecretString::from(v.as_str().unwrap_or_default().to_string()),
                        );
                    }
                }
                if let Some(map) = value["data"].as_object() {
                    for (k, v) in map {
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(v.as_str().unwrap_or_default())
                            .map_err(|_| err(format!("Secret {name}: data.{k} is not base64")))?;
                        let text = String::from_utf8(bytes)
                            .map_err(|_| err(format!("Secret {name}: data.{k} is not UTF-8")))?;
                        data.insert(k.clone(), SecretString::from(text));
                    }
                }
                self.secrets.insert((namespace, name), data);
            }
            _ => {}
        }
        Ok(())
    }

    /// The data of a `Secret` manifest.
    pub(crate) fn secret_data(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<BTreeMap<String, SecretString>> {
        self.secrets
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    fn admin_for(
        &self,
        namespace: &str,
        spec: &SecretLeaseSpec,
    ) -> Result<AdminCredentials, String> {
        let db = spec
            .postgres
            .as_ref()
            .or(spec.mysql.as_ref())
            .ok_or("no database backend")?;
        let r = &db.admin_secret_ref;
        let secret = self
            .secrets
            .get(&(namespace.to_string(), r.name.clone()))
            .ok_or_else(|| {
                format!(
                    "admin Secret {namespace}/{} not found in the manifests",
                    r.name
                )
            })?;
        let username = secret
            .get(&r.username_key)
            .ok_or_else(|| format!("admin Secret {} has no key {:?}", r.name, r.username_key))?;
        let password = secret
            .get(&r.password_key)
            .ok_or_else(|| format!("admin Secret {} has no key {:?}", r.name, r.password_key))?;
        Ok(AdminCredentials {
            username: username.expose_secret().to_string(),
            password: password.clone(),
        })
    }
}

/// One line of the status table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusRow {
    pub lease: String,
    pub phase: String,
    pub version: Option<u64>,
    pub username: Option<String>,
    pub expires_at: Option<Timestamp>,
    pub next_rotation_at: Option<Timestamp>,
    pub message: Option<String>,
}

/// Status rows from a state file.
pub fn status_rows(state: &LocalState, now: Timestamp) -> Vec<StatusRow> {
    state
        .leases
        .iter()
        .map(|(key, l)| {
            let current = l.progress.current();
            let params = l
                .last_policy
                .as_ref()
                .and_then(|p| leasehold_api::validate::policy_params(p).ok());
            let next = match (current, params.as_ref()) {
                (Some(c), Some(params)) => Some(rotation_due_at(params, c)),
                _ => None,
            };
            let blocked = params
                .as_ref()
                .and_then(|p| l.progress.sessions_blocking_drain(p, now));
            let ph = if l.last_error.is_some() && current.is_none() {
                "Invalid".to_string()
            } else if blocked.is_some() {
                format!("{:?}", Phase::Degraded)
            } else if l.last_spec.as_ref().is_some_and(|s| s.suspend)
                && l.progress.emergency.is_none()
            {
                format!("{:?}", Phase::Suspended)
            } else {
                format!("{:?}", phase(&l.progress, false, now))
            };
            let blocked_message = blocked.map(|r| {
                let p = r.revoke.clone().unwrap_or_default();
                let mut m = format!(
                    "SessionsBlockingDrain: {} open session(s) keep version {} from being revoked (drainSessions: Wait)",
                    p.sessions_remaining.unwrap_or_default(),
                    r.version
                );
                if let Some(t) = p.drain_started_at {
                    m.push_str(&format!(" since {}", status_time(t)));
                }
                if let Some(e) = current.and_then(|c| c.expires_at) {
                    m.push_str(&format!("; the current credential expires {}", status_time(e)));
                    if params
                        .as_ref()
                        .is_some_and(|p| p.strategy != leasehold_core::Strategy::Dynamic)
                    {
                        m.push_str(" and no new version can be issued until this revocation ends");
                    }
                }
                m
            });
            let problems: Vec<String> = l
                .last_error
                .iter()
                .cloned()
                .chain(blocked_message)
                .chain(progress_problems(&l.progress))
                .collect();
            StatusRow {
                lease: key.clone(),
                phase: ph,
                version: current.map(|c| c.version),
                username: current.map(|c| c.credential_id.clone()),
                expires_at: current.and_then(|c| c.expires_at),
                next_rotation_at: next,
                message: (!problems.is_empty()).then(|| problems.join("; ")),
            }
        })
        .collect()
}

fn status_time(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// What is going wrong according to recorded progress (never secret: reasons and errors
/// are sanitized by the backends): a rotation that keeps failing and revocations being
/// retried, each with its attempts and next retry.
pub fn progress_problems(progress: &Progress) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(failure) = progress.rotation_failure() {
        let mut m = format!(
            "rotation to version {} failed ({:?}): {} (attempt {}",
            failure.version,
            failure.outcome,
            failure.reason.as_deref().unwrap_or("no reason recorded"),
            progress.verify_failures
        );
        if let Some(t) = progress.rotation_retry_at() {
            m.push_str(&format!(", next retry {}", status_time(t)));
        }
        m.push(')');
        out.push(m);
    }
    for v in &progress.versions {
        let Some(r) = v.revoke.as_ref() else { continue };
        if r.failures > 0 {
            let mut m = format!(
                "revoking version {} failed: {} (attempt {}",
                v.version,
                r.last_error.as_deref().unwrap_or("unknown error"),
                r.failures
            );
            if let Some(t) = r.next_attempt_at {
                m.push_str(&format!(", next retry {}", status_time(t)));
            }
            m.push(')');
            out.push(m);
        }
    }
    out
}

/// Render rows as an aligned table.
pub fn format_table(rows: &[StatusRow]) -> String {
    let mut out = format!(
        "{:<32} {:<10} {:>7} {:<24} {:<22} {:<22} {}\n",
        "LEASE", "PHASE", "VERSION", "USER", "EXPIRES", "NEXT ROTATION", "MESSAGE"
    );
    let ts = |t: &Option<Timestamp>| {
        t.map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_else(|| "-".into())
    };
    for r in rows {
        out.push_str(&format!(
            "{:<32} {:<10} {:>7} {:<24} {:<22} {:<22} {}\n",
            r.lease,
            r.phase,
            r.version
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into()),
            r.username.clone().unwrap_or_else(|| "-".into()),
            ts(&r.expires_at),
            ts(&r.next_rotation_at),
            r.message.clone().unwrap_or_default()
        ));
    }
    out
}

/// Options of a local run.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    pub manifests: PathBuf,
    pub state: PathBuf,
    pub output: PathBuf,
    /// Seals the secrets kept in the state file ([`Keyring::unencrypted`] only as an
    /// explicit opt-out).
    pub keyring: Arc<Keyring>,
}

/// The local runner: one pass over all leases per call to [`LocalRunner::pass`].
pub struct LocalRunner {
    pub options: LocalOptions,
    pub engine: Engine,
    pub store: Arc<StateFile>,
    registry: BackendRegistry,
    /// Answers HTTP-01 challenges for `acme` issuers (none: acme issuers are refused).
    acme_solver: Option<Arc<leasehold_acme::Http01Solver>>,
}

impl std::fmt::Debug for LocalRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRunner")
            .field("options", &self.options)
            .finish()
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone)]
pub struct PassReport {
    /// When the next pass has something to do (earliest wake-up).
    pub next_wake: Option<Timestamp>,
    /// Leases that failed this pass, with the error (no secrets).
    pub errors: Vec<(String, String)>,
}

impl LocalRunner {
    pub fn new(options: LocalOptions, engine: Engine) -> Result<Self, LocalError> {
        let store = Arc::new(StateFile::open(&options.state, options.keyring.clone())?);
        Ok(Self {
            options,
            engine,
            store,
            registry: BackendRegistry::new(4),
            acme_solver: None,
        })
    }

    /// Answer `acme` issuers' HTTP-01 challenges with `solver`.
    pub fn with_acme_solver(mut self, solver: Arc<leasehold_acme::Http01Solver>) -> Self {
        self.acme_solver = Some(solver);
        self
    }

    /// Check once that the keyring opens every sealed value in the state file (see
    /// [`StateFile::check_keys`]); [`Self::pass`] does it before its first pass.
    pub async fn check_keys(&self) -> Result<KeyCheck, LocalError> {
        let check = self.store.check_keys().await?;
        if check.stale > 0 {
            warn!(
                state = %self.options.state.display(),
                values = check.stale,
                plaintext = check.plaintext,
                "values in the state file are not sealed under the primary key; \
                 `leasehold local rekey` seals them again"
            );
        }
        Ok(check)
    }

    /// Reconcile every lease once (running each until it has to wait).
    pub async fn pass(&self) -> Result<PassReport, LocalError> {
        if !self.store.keys_checked.load(Ordering::Acquire) {
            self.check_keys().await?;
        }
        let manifests = Manifests::load(&self.options.manifests)?;
        let delivery = DirectoryDelivery {
            root: self.options.output.clone(),
        };
        let mut report = PassReport::default();
        let known: BTreeSet<String> = self.store.snapshot().await.leases.keys().cloned().collect();
        let present: BTreeSet<String> = manifests
            .leases
            .keys()
            .map(|(ns, n)| format!("{ns}/{n}"))
            .collect();

        // Every lease is known here: claim each recorded user for its lease, so no lease
        // issues a user another one holds (also across restarts).
        let snapshot = self.store.snapshot().await;
        self.engine.claims().clear();
        for (key, l) in &snapshot.leases {
            let (Some((ns, name)), Some(spec)) = (key.split_once('/'), l.last_spec.as_ref()) else {
                continue;
            };
            let Some(target) = spec_target_in(spec, ns) else {
                continue;
            };
            let lease = LeaseKey {
                namespace: ns.into(),
                name: name.into(),
                uid: l.uid.clone(),
            };
            self.engine
                .claims()
                .record_progress(&lease, &l.progress, &target);
        }

        let mut work = Vec::new();
        for ((ns, name), lease) in &manifests.leases {
            work.push((ns.clone(), name.clone(), Some(lease.clone())));
        }
        for gone in known.difference(&present) {
            if let Some((ns, name)) = gone.split_once('/') {
                work.push((ns.to_string(), name.to_string(), None));
            }
        }

        let results = futures::future::join_all(work.into_iter().map(|(ns, name, lease)| {
            let manifests = &manifests;
            let delivery = &delivery;
            async move {
                let key = format!("{ns}/{name}");
                let r = self
                    .reconcile_one(manifests, delivery, &ns, &name, lease.as_ref())
                    .await;
                (key, r)
            }
        }))
        .await;
        crate::local_issuers::publish(
            &self.store,
            &manifests.issuers,
            |ns, n| manifests.secret_data(ns, n),
            &self.options.output,
        )
        .await;
        for (key, r) in results {
            match r {
                Ok(Some(t)) => {
                    report.next_wake = Some(report.next_wake.map_or(t, |w: Timestamp| w.min(t)))
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(lease = %key, error = %e, "lease not reconciled");
                    report.errors.push((key, e));
                }
            }
        }
        Ok(report)
    }

    /// Find (and unless `dry_run`, revoke) users of known leases that their recorded
    /// progress does not reference. Run it on start and periodically.
    pub async fn sweep(
        &self,
        dry_run: bool,
    ) -> Result<Vec<(String, crate::sweeper::SweepReport)>, LocalError> {
        let manifests = Manifests::load(&self.options.manifests)?;
        let state = self.store.snapshot().await;
        let mut reports = Vec::new();
        for (key_str, lease) in &state.leases {
            let (Some(spec), Some(policy)) = (&lease.last_spec, &lease.last_policy) else {
                continue;
            };
            let Some((ns, name)) = key_str.split_once('/') else {
                continue;
            };
            let Ok(admin) = manifests.admin_for(ns, spec) else {
                continue;
            };
            let key = LeaseKey {
                namespace: ns.into(),
                name: name.into(),
                uid: lease.uid.clone(),
            };
            let Ok(ctx) = resolve(key.clone(), spec, policy, &admin, None, &self.registry) else {
                continue;
            };
            let Some(pattern) = crate::sweeper::lease_pattern(&ctx.naming, &key) else {
                continue;
            };
            let referenced: BTreeSet<String> = lease
                .progress
                .versions
                .iter()
                .map(|v| v.credential_id.clone())
                .collect();
            match crate::sweeper::sweep_lease(&ctx.backend, &pattern, &referenced, dry_run).await {
                Ok(report) => reports.push((key_str.clone(), report)),
                Err(e) => {
                    warn!(lease = %key_str, error = %e, "orphan sweep skipped: database unavailable")
                }
            }
        }
        Ok(reports)
    }

    async fn set_error(&self, key: &str, error: Option<String>) {
        let _ = self
            .store
            .update(|s| {
                if let Some(l) = s.leases.get_mut(key) {
                    l.last_error = error;
                }
            })
            .await;
    }

    async fn reconcile_one(
        &self,
        manifests: &Manifests,
        delivery: &DirectoryDelivery,
        ns: &str,
        name: &str,
        lease: Option<&SecretLease>,
    ) -> Result<Option<Timestamp>, String> {
        let key_str = format!("{ns}/{name}");
        let snapshot = self.store.snapshot().await;
        let existing = snapshot.leases.get(&key_str).cloned();
        let deleting = lease.is_none();
        let (spec, policy) = match lease {
            Some(l) => {
                let policy = manifests
                    .policies
                    .get(&(ns.to_string(), l.spec.policy_ref.name.clone()))
                    .map(|p| p.spec.clone());
                (l.spec.clone(), policy)
            }
            None => match existing
                .as_ref()
                .and_then(|e| e.last_spec.clone().zip(e.last_policy.clone()))
            {
                Some((s, p)) => (s, Some(p)),
                None => return Ok(None),
            },
        };
        // Record identity and the spec before anything else touches the database.
        let uid = existing
            .as_ref()
            .map(|e| e.uid.clone())
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let store_spec = (!deleting).then(|| spec.clone());
        let store_policy = policy.clone();
        self.store
            .update(|s| {
                let entry = s.leases.entry(key_str.clone()).or_default();
                entry.uid = uid.clone();
                if let Some(sp) = store_spec {
                    entry.last_spec = Some(sp);
                }
                if let Some(p) = store_policy {
                    entry.last_policy = Some(p);
                }
            })
            .await
            .map_err(|e| e.to_string())?;

        let Some(policy) = policy else {
            let msg = format!("RotationPolicy {ns}/{} not found", spec.policy_ref.name);
            self.set_error(&key_str, Some(msg.clone())).await;
            return Err(msg);
        };
        let key = LeaseKey {
            namespace: ns.into(),
            name: name.into(),
            uid,
        };
        let resolved = match &spec.certificate {
            Some(cert) => {
                let issuer = match crate::local_issuers::local_issuer(
                    &self.store,
                    &manifests.issuers,
                    |ns, n| manifests.secret_data(ns, n),
                    self.acme_solver.as_ref(),
                    ns,
                    &cert.issuer_ref,
                )
                .await
                {
                    Ok(i) => i,
                    Err(msg) => {
                        self.set_error(&key_str, Some(msg.clone())).await;
                        return Err(msg);
                    }
                };
                crate::context::resolve_certificate(key.clone(), &spec, &policy, issuer, None)
            }
            None => {
                let admin = match manifests.admin_for(ns, &spec) {
                    Ok(a) => a,
                    Err(msg) => {
                        self.set_error(&key_str, Some(msg.clone())).await;
                        return Err(msg);
                    }
                };
                resolve(key.clone(), &spec, &policy, &admin, None, &self.registry)
            }
        };
        let ctx = match resolved {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("{}: {e}", e.reason());
                self.set_error(&key_str, Some(msg.clone())).await;
                return Err(msg);
            }
        };
        let (open, opens_at) =
            crate::window::window_state(policy.maintenance_window.as_ref(), Timestamp::now());
        let requested_emergency = read_emergency_request(&self.options.state, ns, name);
        let obs = Observations {
            deleting,
            consumers_hold: leasehold_core::rotation::ALL_CONSUMERS_CURRENT,
            rotation_request: lease
                .and_then(|l| l.metadata.annotations.as_ref())
                .and_then(|a| a.get(ROTATE_ANNOTATION).cloned()),
            maintenance_window_open: open,
            maintenance_window_opens_at: opens_at,
            emergency_request: match requested_emergency.clone() {
                Some(r) => Some(r),
                None => lease
                    .and_then(|l| l.metadata.annotations.as_ref())
                    .and_then(|a| a.get(REVOKE_NOW_ANNOTATION).cloned()),
            },
            suspended: lease.is_some_and(|l| l.spec.suspend),
        };
        let mut progress = existing.map(|e| e.progress).unwrap_or_default();
        let stores = Stores {
            progress: self.store.as_ref(),
            secrets: self.store.as_ref(),
            delivery,
        };
        let outcome = self
            .engine
            .reconcile(&ctx, &mut progress, &obs, stores)
            .await;
        // A `leasehold local revoke` request is done with once the progress records it.
        if let Some(r) = &requested_emergency
            && progress.handled_emergency_request.as_ref() == Some(r)
        {
            let _ = std::fs::remove_file(emergency_request_path(&self.options.state, ns, name));
        }
        match outcome {
            Ok(Outcome::Finished) => {
                let out_dir = self.options.output.join(ns).join(name);
                let _ = tokio::task::spawn_blocking(move || {
                    let _ = AtomicDir::new(&out_dir).remove_all();
                    let _ = std::fs::remove_dir(&out_dir);
                })
                .await;
                self.store
                    .update(|s| s.leases.remove(&key_str))
                    .await
                    .map_err(|e| e.to_string())?;
                info!(lease = %key_str, "lease removed; every credential revoked");
                Ok(None)
            }
            Ok(Outcome::Wait { until, .. }) => {
                self.set_error(&key_str, None).await;
                let _ = self
                    .store
                    .update(|s| {
                        if let Some(l) = s.leases.get_mut(&key_str) {
                            l.next_check_at = until;
                        }
                    })
                    .await;
                Ok(until)
            }
            Err(e) => {
                let msg = e.to_string();
                self.set_error(&key_str, Some(msg.clone())).await;
                Err(msg)
            }
        }
    }
}

/// Where `leasehold local revoke` leaves emergency revocation requests for the runner
/// (which holds the state file's lock): a directory `<state>.revoke-now` beside it, one
/// file per lease. The runner acts on a request on its next pass, as on the
/// `leasehold.dev/revoke-now` annotation, and removes it once recorded in the progress.
pub fn emergency_requests_dir(state: &Path) -> PathBuf {
    let mut name = state.as_os_str().to_owned();
    name.push(".revoke-now");
    PathBuf::from(name)
}

fn emergency_request_path(state: &Path, namespace: &str, name: &str) -> PathBuf {
    emergency_requests_dir(state).join(format!("{namespace}.{name}"))
}

fn read_emergency_request(state: &Path, namespace: &str, name: &str) -> Option<String> {
    let text = std::fs::read_to_string(emergency_request_path(state, namespace, name)).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

/// Request an emergency revocation of `namespace/name` for the runner of `state` (see
/// [`emergency_requests_dir`]). The request carries the reason and when it was made, so
/// the same reason given twice is two requests. Returns the request's value.
pub fn request_emergency_revocation(
    state: &Path,
    namespace: &str,
    name: &str,
    reason: &str,
    now: Timestamp,
) -> Result<String, LocalError> {
    let reason = reason.trim();
    if reason.is_empty() || reason.contains('\n') {
        return Err(LocalError::Request(
            "give the emergency revocation a one-line reason".into(),
        ));
    }
    let dir = emergency_requests_dir(state);
    std::fs::create_dir_all(&dir)
        .map_err(|e| LocalError::Request(format!("cannot create {}: {e}", dir.display())))?;
    let value = format!("{reason} (requested {now})");
    let path = emergency_request_path(state, namespace, name);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{value}\n"))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| LocalError::Request(format!("cannot write {}: {e}", path.display())))?;
    Ok(value)
}

/// The database a lease spec points at.
/// The database a lease spec points at, as a recorded target.
pub fn spec_target(spec: &SecretLeaseSpec) -> Option<leasehold_core::Target> {
    spec_target_in(spec, "default")
}

/// [`spec_target`] for a lease in `namespace` (a certificate lease's issuer may be
/// namespaced).
pub fn spec_target_in(spec: &SecretLeaseSpec, namespace: &str) -> Option<leasehold_core::Target> {
    if let Some(cert) = &spec.certificate {
        return Some(crate::context::issuer_target(namespace, &cert.issuer_ref));
    }
    let (kind, db) = match (&spec.postgres, &spec.mysql) {
        (Some(db), _) => (crate::context::DatabaseKind::Postgres, db),
        (None, Some(db)) => (crate::context::DatabaseKind::MySql, db),
        (None, None) => return None,
    };
    Some(leasehold_core::Target {
        kind: kind.scheme().to_string(),
        host: db.host.clone(),
        port: db.port.unwrap_or(kind.default_port()),
        database: db.database.clone(),
        account_host: match kind {
            crate::context::DatabaseKind::MySql => db.account_host.clone(),
            crate::context::DatabaseKind::Postgres | crate::context::DatabaseKind::Certificate => {
                None
            }
        },
    })
}

/// Phase as text for a lease key (used by tests and the status command).
pub fn phase_of(state: &LocalState, key: &str, now: Timestamp) -> Option<Phase> {
    state
        .leases
        .get(key)
        .map(|l| phase(&l.progress, false, now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_core::rotation::{
        RevokeProgress, RevokeReason, RotationOutcome, RotationRecord, VersionRecord, VersionState,
    };

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn version(v: u64, state: VersionState) -> VersionRecord {
        VersionRecord {
            version: v,
            credential_id: format!("lh_v{v}"),
            state,
            issued_at: t(0),
            verified_at: None,
            promoted_at: Some(t(0)),
            superseded_at: None,
            expires_at: None,
            revoke_reason: None,
            revoke: None,
            issued_under: None,
        }
    }

    #[test]
    fn status_shows_a_failing_rotation_and_a_failing_revocation() {
        let mut old = version(1, VersionState::Revoking);
        old.revoke_reason = Some(RevokeReason::Superseded);
        old.revoke = Some(RevokeProgress {
            failures: 4,
            next_attempt_at: Some(t(600)),
            last_error: Some("database unreachable: connection refused".into()),
            ..Default::default()
        });
        let progress = Progress {
            versions: vec![old, version(2, VersionState::Current)],
            last_version: 3,
            delivered_version: Some(2),
            verify_failures: 2,
            last_verify_failure_at: Some(t(100)),
            history: vec![RotationRecord {
                version: 3,
                started_at: t(100),
                verified_at: None,
                promoted_at: None,
                revoked_at: Some(t(100)),
                outcome: RotationOutcome::IssueFailed,
                reason: Some("relation \"no_such_table\" does not exist".into()),
            }],
            ..Default::default()
        };
        let retry = status_time(progress.rotation_retry_at().unwrap());
        let mut state = LocalState::default();
        state.leases.insert(
            "default/app".into(),
            LocalLease {
                uid: "u".into(),
                progress,
                ..Default::default()
            },
        );
        let rows = status_rows(&state, t(200));
        let message = rows[0].message.clone().unwrap_or_default();
        for want in [
            "rotation to version 3 failed (IssueFailed)",
            "no_such_table",
            "attempt 2",
            &format!("next retry {retry}"),
            "revoking version 1 failed: database unreachable",
            "attempt 4",
            "next retry 2027-01-15T08:10:00Z",
        ] {
            assert!(message.contains(want), "{want:?} missing from {message:?}");
        }
        assert!(format_table(&rows).contains("no_such_table"));
    }

    /// A lease as a run leaves it in the state file, with its issued passwords kept as
    /// plaintext (the explicit opt-out) or sealed: `Debug` shows none of them, nor the
    /// admin password of the manifests it was read with.
    #[tokio::test]
    async fn a_lease_debug_shows_no_secret_values() {
        let admin_password = "admin-pw-7Hq2Lm9x";
        let issued = ["issued-pw-v1-Xk3vR8", "issued-pw-v2-Bn5tQ1"];
        let journal = "journal-pw-v3-Wc4pZ6";
        let dir = tempfile::tempdir().unwrap();
        let manifests_dir = dir.path().join("m");
        std::fs::create_dir(&manifests_dir).unwrap();
        std::fs::write(
            manifests_dir.join("all.yaml"),
            format!(
                "apiVersion: leasehold.dev/v1alpha1
kind: RotationPolicy
metadata: {{name: p}}
spec: {{ttl: 1h}}
---
apiVersion: v1
kind: Secret
metadata: {{name: admin}}
stringData: {{username: root, password: {admin_password}}}
---
apiVersion: leasehold.dev/v1alpha1
kind: SecretLease
metadata: {{name: app}}
spec:
  policyRef: {{name: p}}
  mysql:
    host: db.example
    database: app
    adminSecretRef: {{name: admin}}
"
            ),
        )
        .unwrap();
        let manifests = Manifests::load(&manifests_dir).unwrap();
        let spec = manifests.leases[&("default".to_owned(), "app".to_owned())]
            .spec
            .clone();
        let policy = manifests.policies[&("default".to_owned(), "p".to_owned())]
            .spec
            .clone();
        let key = LeaseKey {
            namespace: "default".into(),
            name: "app".into(),
            uid: "3f2a9c1e77d04b8e".into(),
        };
        let keyrings = [
            Keyring::unencrypted(),
            Keyring::new(
                Arc::new(leasehold_envelope::LocalKey::generate().unwrap()),
                vec![],
                leasehold_envelope::KeyringSettings::default(),
            ),
        ];
        for (n, keyring) in keyrings.into_iter().enumerate() {
            let store = StateFile::open(
                dir.path().join(format!("state-{n}.json")),
                Arc::new(keyring),
            )
            .unwrap();
            for (version, password) in (1..).zip(issued) {
                store
                    .put(&key, version, &SecretString::from(password))
                    .await
                    .unwrap();
            }
            store
                .put(&key, u64::MAX - 3, &SecretString::from(journal))
                .await
                .unwrap();
            store
                .update(|s| {
                    let lease = s.leases.get_mut("default/app").unwrap();
                    lease.uid = key.uid.clone();
                    lease.progress.versions = vec![
                        version(1, VersionState::Superseded),
                        version(2, VersionState::Current),
                    ];
                    lease.last_spec = Some(spec.clone());
                    lease.last_policy = Some(policy.clone());
                    lease.last_error = Some("database unreachable: connection refused".into());
                })
                .await
                .unwrap();
            let state = store.snapshot().await;
            let lease = &state.leases["default/app"];
            let stored: Vec<&String> = lease.secrets.values().collect();
            assert_eq!(stored.len(), 3, "keyring {n}: {stored:?}");

            let shown = format!("{lease:?}\n{lease:#?}\n{state:?}\n{state:#?}");
            assert!(
                shown.contains("[3 redacted]") && shown.contains("lh_v2"),
                "keyring {n}: {shown}"
            );
            for secret in [admin_password, journal]
                .into_iter()
                .chain(issued)
                .chain(stored.iter().map(|s| s.as_str()))
            {
                assert!(
                    !shown.contains(secret),
                    "keyring {n}: Debug shows {secret:?}: {shown}"
                );
            }
        }
    }
}
