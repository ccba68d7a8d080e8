//! Per-pod credentials (`spec.perPod`): every pod gets a database user of its
//! own, issued and verified when it mounts the lease and dropped on `Release`.
//!
//! Each pod credential is recorded *before* the user is created, in a Secret
//! `leasehold-pod-<lease uid>-<pod uid>` in the lease's namespace (owned by
//! the lease, labelled with both UIDs), holding the password and a small JSON
//! record (user name, node, generation, times). So a repeated `Issue` returns
//! the same credential, and `Release` can revoke it after a broker restart.
//! The password is envelope-encrypted ([`password_field`]: bound to the Secret
//! it is stored in, so it does not open anywhere else); the record is not
//! secret and stays plain, so `Release` and the orphan sweep need no key.
//! The user name is `lh_<lease uid 12>_p<pod uid 12>` (29 characters: fits
//! PostgreSQL and MySQL), always derived from the two UIDs and never read back
//! from the record: anyone who can patch Secrets in the lease's namespace can
//! edit the record, and must not be able to make the admin drop another role.
//! At its renewal time the next `Issue` sets a new password (generation + 1)
//! and extends the database-side expiry.
//!
//! A first `Issue` that fails after the record was written (the user could not
//! be created, or did not verify) drops the user and the record before
//! returning the error. Users whose pod is gone without a `Release` are
//! revoked by [`crate::sweep`]. [`crate::BrokerLimits`] caps concurrent
//! issues and live users per lease.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use leasehold_api::{RotationPolicy, SecretLease};
use leasehold_backends::{
    BackendError, CredentialId, CredentialMaterial, DrainSessions, IssueMode, IssueRequest,
    RevokeMode, RevokeRequest, VerifyRequest,
};
use leasehold_core::naming::short_uid;
use leasehold_engine::context::{AdminCredentials, BackendRegistry, LeaseContext, LeaseKey};
use leasehold_engine::template::{CredentialValues, render};
use leasehold_envelope::Keyring;
use leasehold_envelope::secret::{SEALED_LABEL, SealedKind, SecretField};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tracing::{info, instrument, warn};

use crate::authz::{Deny, PodIdentity};
use crate::cluster::ClusterView;
use crate::consumers::FIELD_MANAGER;
use crate::error::BrokerError;
use crate::limits::BrokerLimits;

/// A credential issued to one pod. `Debug` shows file names only.
#[derive(Debug, Clone)]
pub struct PodCredential {
    /// Rendered files.
    pub files: CredentialMaterial,
    /// Generation of this pod's credential (1, 2, ...).
    pub version: u64,
    /// When it stops working.
    pub expires_at: Timestamp,
    /// When the driver should ask again.
    pub renew_at: Timestamp,
}

/// One `Issue` of a per-pod lease, already authorized.
#[derive(Debug, Clone, Copy)]
pub struct PerPodRequest<'a> {
    /// The lease.
    pub lease: &'a SecretLease,
    /// Its policy.
    pub policy: &'a RotationPolicy,
    /// The pod.
    pub pod: &'a PodIdentity,
    /// Its node.
    pub node: &'a str,
}

/// Issues and revokes per-pod credentials.
#[async_trait]
pub trait PerPodIssuer: Send + Sync {
    /// The pod's credential: the recorded one while it is fresh, a new
    /// (issued and verified) one otherwise.
    async fn issue(&self, request: &PerPodRequest<'_>) -> Result<PodCredential, BrokerError>;
    /// The generation the pod should hold, if it has a credential.
    async fn latest_version(
        &self,
        lease: &SecretLease,
        pod_uid: &str,
    ) -> Result<Option<u64>, BrokerError>;
    /// Revokes the pod's credential, if any. Only the node it was issued to
    /// may release it. Idempotent.
    async fn release(
        &self,
        lease: &SecretLease,
        policy: Option<&RotationPolicy>,
        pod_uid: &str,
        node: &str,
    ) -> Result<(), BrokerError>;
}

/// The record of one pod credential. `Debug` hides the password.
#[derive(Clone)]
pub struct PodCredentialRecord {
    /// Non-secret facts.
    pub meta: PodCredentialMeta,
    /// The password.
    pub password: SecretString,
}

impl std::fmt::Debug for PodCredentialRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodCredentialRecord")
            .field("meta", &self.meta)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The non-secret part of a [`PodCredentialRecord`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodCredentialMeta {
    /// Database user.
    pub username: String,
    /// Pod namespace.
    pub pod_namespace: String,
    /// Pod name.
    pub pod_name: String,
    /// Pod UID.
    pub pod_uid: String,
    /// The node it was issued to.
    pub node: String,
    /// 1, 2, ... (a new password each time).
    pub generation: u64,
    /// When this generation was issued.
    pub issued_at: Timestamp,
    /// Database-side expiry.
    pub expires_at: Timestamp,
    /// When to replace it.
    pub renew_at: Timestamp,
    /// Whether the backend has it and a login with it worked.
    pub verified: bool,
}

/// Where pod credentials are recorded.
#[async_trait]
pub trait PodCredentialStore: Send + Sync {
    /// The record of a pod's credential for `lease`.
    async fn get(
        &self,
        lease: &SecretLease,
        pod_uid: &str,
    ) -> Result<Option<PodCredentialRecord>, BrokerError>;
    /// Creates or replaces it. Durable when it returns.
    async fn put(
        &self,
        lease: &SecretLease,
        record: &PodCredentialRecord,
    ) -> Result<(), BrokerError>;
    /// The non-secret part of a pod's record: what `Release` needs, readable
    /// without the key that protects the password.
    async fn meta(
        &self,
        lease: &SecretLease,
        pod_uid: &str,
    ) -> Result<Option<PodCredentialMeta>, BrokerError> {
        Ok(self.get(lease, pod_uid).await?.map(|r| r.meta))
    }
    /// Removes it (missing is fine).
    async fn delete(&self, lease: &SecretLease, pod_uid: &str) -> Result<(), BrokerError>;
    /// The non-secret part of every record of `lease` (for the orphan sweep).
    async fn list(&self, lease: &SecretLease) -> Result<Vec<PodCredentialMeta>, BrokerError>;
}

/// The database user of a pod's credential.
pub fn per_pod_username(lease_uid: &str, pod_uid: &str) -> String {
    format!("lh_{}_p{}", short_uid(lease_uid), short_uid(pod_uid))
}

/// Name of the Secret recording a pod's credential.
pub fn pod_secret_name(lease_uid: &str, pod_uid: &str) -> String {
    let pod: String = pod_uid
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(40)
        .collect::<String>()
        .to_ascii_lowercase();
    format!("leasehold-pod-{}-{pod}", short_uid(lease_uid))
}

/// Label with the lease UID on pod-credential Secrets.
pub const LEASE_UID_LABEL: &str = "leasehold.dev/lease-uid";
/// Label with the pod UID on pod-credential Secrets.
pub const POD_UID_LABEL: &str = "leasehold.dev/pod-uid";

const RECORD_KEY: &str = "record";
const PASSWORD_KEY: &str = "password";

fn lease_ns(lease: &SecretLease) -> &str {
    lease.metadata.namespace.as_deref().unwrap_or_default()
}

pub(crate) fn lease_uid(lease: &SecretLease) -> &str {
    lease.metadata.uid.as_deref().unwrap_or_default()
}

/// [`PodCredentialStore`] in Secrets owned by the lease, passwords sealed
/// with a [`Keyring`].
#[derive(Clone)]
pub struct KubePodCredentialStore {
    client: kube::Client,
    keyring: Arc<Keyring>,
}

impl std::fmt::Debug for KubePodCredentialStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubePodCredentialStore")
            .field("key", &self.keyring.primary_key_id())
            .finish_non_exhaustive()
    }
}

impl KubePodCredentialStore {
    /// Needs `get`, `list`, `patch` and `delete` on secrets in lease namespaces;
    /// passwords are sealed with `keyring` (plaintext with [`Keyring::unencrypted`]).
    pub fn new(client: kube::Client, keyring: Arc<Keyring>) -> Self {
        Self { client, keyring }
    }
}

/// Where the password in the pod credential Secret `namespace/secret_name` is
/// sealed: bound to that Secret, so a password copied into another pod's
/// Secret (or another namespace) does not open.
pub fn password_field<'a>(namespace: &'a str, secret_name: &'a str) -> SecretField<'a> {
    SecretField {
        kind: SealedKind::PodCredential,
        namespace,
        secret: secret_name,
        field: PASSWORD_KEY,
    }
}

/// The Secret recording `meta` with the password as stored (sealed by
/// [`sealed_pod_secret`], or plaintext when unencrypted): a server-side apply body.
pub fn pod_secret(
    lease: &SecretLease,
    meta: &PodCredentialMeta,
    stored_password: ByteString,
) -> Result<Secret, BrokerError> {
    let uid = lease_uid(lease);
    let record = serde_json::to_vec(meta).map_err(|e| {
        BrokerError::Internal(format!("cannot encode the pod credential record: {e}"))
    })?;
    let data = BTreeMap::from([
        (RECORD_KEY.to_owned(), ByteString(record)),
        (PASSWORD_KEY.to_owned(), stored_password),
    ]);
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(pod_secret_name(uid, &meta.pod_uid)),
            namespace: lease.metadata.namespace.clone(),
            labels: Some(BTreeMap::from([
                (LEASE_UID_LABEL.to_owned(), short_uid(uid)),
                (POD_UID_LABEL.to_owned(), meta.pod_uid.clone()),
                (
                    SEALED_LABEL.to_owned(),
                    SealedKind::PodCredential.as_str().to_owned(),
                ),
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    "leasehold".to_owned(),
                ),
            ])),
            owner_references: Some(vec![OwnerReference {
                api_version: format!("{}/{}", leasehold_api::GROUP, leasehold_api::VERSION),
                kind: "SecretLease".to_owned(),
                name: lease.metadata.name.clone().unwrap_or_default(),
                uid: uid.to_owned(),
                controller: Some(false),
                block_owner_deletion: None,
            }]),
            ..ObjectMeta::default()
        },
        data: Some(data),
        type_: Some("Opaque".to_owned()),
        ..Secret::default()
    })
}

/// The Secret recording `record`, its password sealed with `keyring`.
pub async fn sealed_pod_secret(
    keyring: &Keyring,
    lease: &SecretLease,
    record: &PodCredentialRecord,
) -> Result<Secret, BrokerError> {
    let name = pod_secret_name(lease_uid(lease), &record.meta.pod_uid);
    let stored = password_field(lease_ns(lease), &name)
        .seal(keyring, record.password.expose_secret().as_bytes())
        .await
        .map_err(|e| BrokerError::key("cannot encrypt a pod credential", &e))?;
    pod_secret(lease, &record.meta, stored)
}

/// The non-secret part of a record Secret (no key needed); `None` when it has none.
pub fn meta_from_secret(secret: &Secret) -> Option<PodCredentialMeta> {
    serde_json::from_slice(&secret.data.as_ref()?.get(RECORD_KEY)?.0).ok()
}

/// Reads a record back from its Secret, opening the password with `keyring`
/// for the Secret it was read from (a legacy plaintext password reads as is).
/// `Ok(None)` when the Secret is not a complete record; a key failure (or a
/// password sealed for another Secret) is an error naming the reason.
pub async fn record_from_secret(
    keyring: &Keyring,
    secret: &Secret,
) -> Result<Option<PodCredentialRecord>, BrokerError> {
    let Some(meta) = meta_from_secret(secret) else {
        return Ok(None);
    };
    let Some(stored) = secret.data.as_ref().and_then(|d| d.get(PASSWORD_KEY)) else {
        return Ok(None);
    };
    let namespace = secret.metadata.namespace.as_deref().unwrap_or_default();
    let name = secret.metadata.name.as_deref().unwrap_or_default();
    let plain = password_field(namespace, name)
        .open(keyring, &stored.0)
        .await
        .map_err(|e| {
            BrokerError::key(
                &format!("cannot decrypt the pod credential in Secret {namespace}/{name}"),
                &e,
            )
        })?;
    Ok(std::str::from_utf8(&plain)
        .ok()
        .map(|password| PodCredentialRecord {
            meta,
            password: SecretString::from(password),
        }))
}

#[async_trait]
impl PodCredentialStore for KubePodCredentialStore {
    async fn get(
        &self,
        lease: &SecretLease,
        pod_uid: &str,
    ) -> Result<Option<PodCredentialRecord>, BrokerError> {
        match self.read(lease, pod_uid).await? {
            Some(secret) => record_from_secret(&self.keyring, &secret).await,
            None => Ok(None),
        }
    }

    async fn meta(
        &self,
        lease: &SecretLease,
        pod_uid: &str,
    ) -> Result<Option<PodCredentialMeta>, BrokerError> {
        Ok(self
            .read(lease, pod_uid)
            .await?
            .as_ref()
            .and_then(meta_from_secret))
    }

    async fn put(
        &self,
        lease: &SecretLease,
        record: &PodCredentialRecord,
    ) -> Result<(), BrokerError> {
        let secret = sealed_pod_secret(&self.keyring, lease, record).await?;
        let name = secret.metadata.name.clone().unwrap_or_default();
        let mut body = serde_json::to_value(&secret)
            .map_err(|e| BrokerError::Internal(format!("cannot encode a Secret: {e}")))?;
        body["apiVersion"] = "v1".into();
        body["kind"] = "Secret".into();
        Api::<Secret>::namespaced(self.client.clone(), lease_ns(lease))
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(body),
            )
            .await
            .map_err(|e| BrokerError::kube("cannot write a pod credential record", &e))?;
        Ok(())
    }

    async fn delete(&self, lease: &SecretLease, pod_uid: &str) -> Result<(), BrokerError> {
        match Api::<Secret>::namespaced(self.client.clone(), lease_ns(lease))
            .delete(
                &pod_secret_name(lease_uid(lease), pod_uid),
                &DeleteParams::default(),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(BrokerError::kube(
                "cannot delete a pod credential record",
                &e,
            )),
        }
    }

    async fn list(&self, lease: &SecretLease) -> Result<Vec<PodCredentialMeta>, BrokerError> {
        let selector = format!("{LEASE_UID_LABEL}={}", short_uid(lease_uid(lease)));
        let secrets = Api::<Secret>::namespaced(self.client.clone(), lease_ns(lease))
            .list(&kube::api::ListParams::default().labels(&selector))
            .await
            .map_err(|e| BrokerError::kube("cannot list pod credential records", &e))?;
        Ok(secrets.items.iter().filter_map(meta_from_secret).collect())
    }
}

impl KubePodCredentialStore {
    async fn read(
        &self,
        lease: &SecretLease,
        pod_uid: &str,
    ) -> Result<Option<Secret>, BrokerError> {
        Api::<Secret>::namespaced(self.client.clone(), lease_ns(lease))
            .get_opt(&pod_secret_name(lease_uid(lease), pod_uid))
            .await
            .map_err(|e| BrokerError::kube("cannot read a pod credential record", &e))
    }
}

/// An in-memory [`PodCredentialStore`] (tests, or a broker without persistence).
#[derive(Debug, Default)]
pub struct MemoryPodCredentialStore {
    records: Mutex<HashMap<(String, String), PodCredentialRecord>>,
}

impl MemoryPodCredentialStore {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many records exist.
    pub fn len(&self) -> usize {
        self.records.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl PodCredentialStore for MemoryPodCredentialStore {
    async fn get(
        &self,
        lease: &SecretLease,
        pod_uid: &str,
    ) -> Result<Option<PodCredentialRecord>, BrokerError> {
        let key = (lease_uid(lease).to_owned(), pod_uid.to_owned());
        Ok(self
            .records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned())
    }

    async fn put(
        &self,
        lease: &SecretLease,
        record: &PodCredentialRecord,
    ) -> Result<(), BrokerError> {
        let key = (lease_uid(lease).to_owned(), record.meta.pod_uid.clone());
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, record.clone());
        Ok(())
    }

    async fn delete(&self, lease: &SecretLease, pod_uid: &str) -> Result<(), BrokerError> {
        let key = (lease_uid(lease).to_owned(), pod_uid.to_owned());
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        Ok(())
    }

    async fn list(&self, lease: &SecretLease) -> Result<Vec<PodCredentialMeta>, BrokerError> {
        let uid = lease_uid(lease);
        Ok(self
            .records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|((l, _), _)| l == uid)
            .map(|(_, r)| r.meta.clone())
            .collect())
    }
}

fn backend_error(what: &str, e: &BackendError) -> BrokerError {
    if e.is_transient() {
        BrokerError::Unavailable(format!("{what}: {e}"))
    } else {
        BrokerError::FailedPrecondition(format!("{what}: {e}"))
    }
}

fn add(t: Timestamp, d: std::time::Duration) -> Timestamp {
    jiff::SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

/// [`PerPodIssuer`] on the engine's backends: `CREATE ROLE` (or user) with
/// the lease's privileges, a login test, and `DROP` on release.
pub struct EnginePerPodIssuer {
    cluster: Arc<dyn ClusterView>,
    pub(crate) store: Arc<dyn PodCredentialStore>,
    registry: BackendRegistry,
    /// Serialises work on one pod's credential.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    limits: BrokerLimits,
    /// Issues in progress per lease UID.
    issuing: Arc<Mutex<HashMap<String, usize>>>,
    /// New per-pod users being created, per lease UID.
    user_caps: UserCaps,
}

/// A lease's per-pod users being created, counted against its cap with the
/// recorded ones.
#[derive(Default)]
struct LeaseUserCap {
    /// Serialises counting (records, then reservations) and reserving.
    gate: Arc<tokio::sync::Mutex<()>>,
    /// Pod UIDs whose first issue is in progress.
    reserved: HashSet<String>,
}

type UserCaps = Arc<Mutex<HashMap<String, LeaseUserCap>>>;

/// Removes a lease's cap entry once nothing holds or waits on it.
fn forget_idle_cap(caps: &mut HashMap<String, LeaseUserCap>, lease_uid: &str) {
    if caps
        .get(lease_uid)
        .is_some_and(|c| c.reserved.is_empty() && Arc::strong_count(&c.gate) == 1)
    {
        caps.remove(lease_uid);
    }
}

/// A place under a lease's cap of live per-pod users, given back on drop.
struct UserPlace {
    caps: UserCaps,
    lease_uid: String,
    pod_uid: String,
}

impl Drop for UserPlace {
    fn drop(&mut self) {
        let mut caps = self.caps.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cap) = caps.get_mut(&self.lease_uid) {
            cap.reserved.remove(&self.pod_uid);
        }
        forget_idle_cap(&mut caps, &self.lease_uid);
    }
}

/// One slot of a lease's concurrent issues, given back on drop.
struct IssueSlot {
    issuing: Arc<Mutex<HashMap<String, usize>>>,
    lease_uid: String,
}

impl Drop for IssueSlot {
    fn drop(&mut self) {
        let mut map = self.issuing.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.lease_uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.lease_uid);
            }
        }
    }
}

impl std::fmt::Debug for EnginePerPodIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnginePerPodIssuer").finish_non_exhaustive()
    }
}

impl EnginePerPodIssuer {
    /// Reads admin credentials through `cluster`, records in `store`, and
    /// shares database pools through `registry` (share the controller's).
    pub fn new(
        cluster: Arc<dyn ClusterView>,
        store: Arc<dyn PodCredentialStore>,
        registry: BackendRegistry,
    ) -> Self {
        Self {
            cluster,
            store,
            registry,
            locks: Mutex::default(),
            limits: BrokerLimits::current(),
            issuing: Arc::default(),
            user_caps: Arc::default(),
        }
    }

    /// Uses `limits` instead of the installed ones.
    pub fn with_limits(mut self, limits: BrokerLimits) -> Self {
        self.limits = limits;
        self
    }

    /// A slot of the lease's concurrent issues, or `RESOURCE_EXHAUSTED`.
    fn issue_slot(&self, lease: &SecretLease) -> Result<IssueSlot, BrokerError> {
        let uid = lease_uid(lease).to_owned();
        let mut map = self.issuing.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(uid.clone()).or_default();
        if *n >= self.limits.max_concurrent_issues_per_lease {
            return Err(BrokerError::ResourceExhausted(format!(
                "{} per-pod credentials of lease {}/{} are being issued already",
                n,
                lease_ns(lease),
                lease.metadata.name.as_deref().unwrap_or_default()
            )));
        }
        *n += 1;
        Ok(IssueSlot {
            issuing: self.issuing.clone(),
            lease_uid: uid,
        })
    }

    /// A place for a new per-pod user of `pod_uid` under the lease's cap, or
    /// `RESOURCE_EXHAUSTED`. Counting and reserving are one step per lease:
    /// concurrent issues cannot all see room for one more (the recorded users
    /// and those being created are counted together, each pod once).
    async fn reserve_user(
        &self,
        lease: &SecretLease,
        pod_uid: &str,
    ) -> Result<UserPlace, BrokerError> {
        let uid = lease_uid(lease).to_owned();
        let gate = self
            .user_caps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(uid.clone())
            .or_default()
            .gate
            .clone();
        let counted = async {
            let _turn = gate.lock().await;
            let recorded = self.store.list(lease).await?;
            let mut caps = self.user_caps.lock().unwrap_or_else(|e| e.into_inner());
            let cap = caps.entry(uid.clone()).or_default();
            let live = recorded
                .iter()
                .map(|m| m.pod_uid.as_str())
                .chain(cap.reserved.iter().map(String::as_str))
                .collect::<HashSet<_>>()
                .len();
            if live >= self.limits.max_per_pod_users_per_lease {
                return Err(BrokerError::ResourceExhausted(format!(
                    "lease {}/{} has {live} per-pod users (at most {})",
                    lease_ns(lease),
                    lease.metadata.name.as_deref().unwrap_or_default(),
                    self.limits.max_per_pod_users_per_lease
                )));
            }
            cap.reserved.insert(pod_uid.to_owned());
            Ok(UserPlace {
                caps: self.user_caps.clone(),
                lease_uid: uid.clone(),
                pod_uid: pod_uid.to_owned(),
            })
        }
        .await;
        drop(gate);
        if counted.is_err() {
            forget_idle_cap(
                &mut self.user_caps.lock().unwrap_or_else(|e| e.into_inner()),
                &uid,
            );
        }
        counted
    }

    pub(crate) fn lock_for(
        &self,
        lease: &SecretLease,
        pod_uid: &str,
    ) -> Arc<tokio::sync::Mutex<()>> {
        let key = format!("{}/{pod_uid}", lease_uid(lease));
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .clone()
    }

    pub(crate) fn forget_lock(&self, lease: &SecretLease, pod_uid: &str) {
        let key = format!("{}/{pod_uid}", lease_uid(lease));
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
    }

    pub(crate) async fn context(
        &self,
        lease: &SecretLease,
        policy: &RotationPolicy,
    ) -> Result<LeaseContext, BrokerError> {
        let namespace = lease_ns(lease);
        let db = lease
            .spec
            .postgres
            .as_ref()
            .or(lease.spec.mysql.as_ref())
            .ok_or_else(|| {
                BrokerError::FailedPrecondition(
                    "per-pod credentials need a postgres or mysql lease".into(),
                )
            })?;
        let secret_ref = &db.admin_secret_ref;
        let admin = self
            .cluster
            .secret(namespace, &secret_ref.name)
            .await?
            .ok_or_else(|| {
                BrokerError::FailedPrecondition(format!(
                    "admin Secret {namespace}/{} not found",
                    secret_ref.name
                ))
            })?;
        let field = |key: &str| {
            admin.get(key).cloned().ok_or_else(|| {
                BrokerError::FailedPrecondition(format!(
                    "admin Secret {namespace}/{} has no key {key:?}",
                    secret_ref.name
                ))
            })
        };
        let admin = AdminCredentials {
            username: field(&secret_ref.username_key)?.expose_secret().to_owned(),
            password: field(&secret_ref.password_key)?,
        };
        let ca_pem = match &db.tls.ca_secret_ref {
            Some(r) => self
                .cluster
                .secret(namespace, &r.name)
                .await?
                .and_then(|d| d.get(&r.key).map(|v| v.expose_secret().to_owned())),
            None => None,
        };
        let key = LeaseKey {
            namespace: namespace.to_owned(),
            name: lease.metadata.name.clone().unwrap_or_default(),
            uid: lease_uid(lease).to_owned(),
        };
        leasehold_engine::context::resolve(
            key,
            &lease.spec,
            &policy.spec,
            &admin,
            ca_pem,
            &self.registry,
        )
        .map_err(|e| match e {
            leasehold_engine::context::ResolveError::Backend(b) => {
                backend_error("cannot reach the database", &b)
            }
            other => BrokerError::FailedPrecondition(other.to_string()),
        })
    }

    /// The files of `record`. The user name is derived from the UIDs, never
    /// read from the record: the record Secret is writable by others.
    fn credential(
        lease: &SecretLease,
        ctx_facts: (&str, &str, u16, &str),
        record: &PodCredentialRecord,
        pod_uid: &str,
    ) -> PodCredential {
        let (scheme, host, port, database) = ctx_facts;
        let scheme = if scheme == "mysql" {
            "mysql"
        } else {
            "postgres"
        };
        let templates = lease
            .spec
            .delivery
            .csi
            .as_ref()
            .map(|c| c.files.clone())
            .unwrap_or_default();
        let files = render(
            &templates,
            &CredentialValues {
                username: per_pod_username(lease_uid(lease), pod_uid),
                password: record.password.clone(),
                host: host.to_owned(),
                port,
                database: database.to_owned(),
                scheme,
                version: record.meta.generation,
            },
        );
        PodCredential {
            files,
            version: record.meta.generation,
            expires_at: record.meta.expires_at,
            renew_at: record.meta.renew_at,
        }
    }
}

/// Connection facts of a lease (scheme, host, port, database) without building a backend.
pub(crate) fn db_facts(lease: &SecretLease) -> Option<(&'static str, &str, u16, &str)> {
    if let Some(db) = &lease.spec.postgres {
        Some(("postgres", &db.host, db.port.unwrap_or(5432), &db.database))
    } else {
        let db = lease.spec.mysql.as_ref()?;
        Some(("mysql", &db.host, db.port.unwrap_or(3306), &db.database))
    }
}

#[async_trait]
impl PerPodIssuer for EnginePerPodIssuer {
    #[instrument(skip_all, fields(pod = %request.pod.name, namespace = %request.pod.namespace))]
    async fn issue(&self, request: &PerPodRequest<'_>) -> Result<PodCredential, BrokerError> {
        let lease = request.lease;
        let lock = self.lock_for(lease, &request.pod.uid);
        let _guard = lock.lock().await;
        let facts = db_facts(lease).ok_or_else(|| {
            BrokerError::FailedPrecondition(
                "per-pod credentials need a postgres or mysql lease".into(),
            )
        })?;
        let now = Timestamp::now();
        let existing = self.store.get(lease, &request.pod.uid).await?;
        if let Some(r) = &existing
            && r.meta.verified
            && r.meta.node == request.node
            && now < r.meta.renew_at
        {
            return Ok(Self::credential(lease, facts, r, &request.pod.uid));
        }

        let _slot = self.issue_slot(lease)?;
        // A pod without a user takes a place under the lease's cap until its
        // issue is over (by then its record counts, or is gone).
        let _place = match existing {
            None => Some(self.reserve_user(lease, &request.pod.uid).await?),
            Some(_) => None,
        };
        let ctx = self.context(lease, request.policy).await?;
        let password = leasehold_backends::password::generate(&ctx.password)
            .map_err(|e| backend_error("cannot generate a password", &e))?;
        let generation = existing.as_ref().map_or(1, |r| r.meta.generation + 1);
        let mut record = PodCredentialRecord {
            meta: PodCredentialMeta {
                username: per_pod_username(lease_uid(lease), &request.pod.uid),
                pod_namespace: request.pod.namespace.clone(),
                pod_name: request.pod.name.clone(),
                pod_uid: request.pod.uid.clone(),
                node: request.node.to_owned(),
                generation,
                issued_at: now,
                expires_at: add(now, ctx.policy.ttl),
                renew_at: ctx.policy.renew_at(now),
                verified: false,
            },
            password,
        };
        // Recorded first: whatever happens next, Release can find the user.
        self.store.put(lease, &record).await?;
        let id = CredentialId(record.meta.username.clone());
        let created = async {
            ctx.backend
                .issue(&IssueRequest {
                    id: id.clone(),
                    mode: IssueMode::CreateUser,
                    password: record.password.clone(),
                    valid_until: Some(record.meta.expires_at),
                    privileges: ctx.privileges.clone(),
                })
                .await
                .map_err(|e| backend_error("cannot create the pod's user", &e))?;
            ctx.backend
                .verify(&VerifyRequest {
                    id: id.clone(),
                    password: record.password.clone(),
                    query: ctx.verify_query.clone(),
                    timeout: ctx.verify_timeout,
                })
                .await
                .map_err(|e| {
                    BrokerError::Unavailable(format!("the pod's credential did not verify: {e}"))
                })
        }
        .await;
        if let Err(error) = created {
            // A pod that never held a working credential gets none: drop what
            // may have been created instead of leaving it to a Release that
            // may never come. (A renewal keeps its record: the volume is
            // published, and its unpublish releases it.)
            let held_before = existing.as_ref().is_some_and(|r| r.meta.verified);
            if !held_before {
                match ctx
                    .backend
                    .revoke(&RevokeRequest {
                        id,
                        mode: RevokeMode::DropUser,
                        drain: DrainSessions::Terminate,
                    })
                    .await
                {
                    Ok(_) => {
                        self.store.delete(lease, &request.pod.uid).await?;
                        info!(user = %record.meta.username, "unverified per-pod user dropped");
                    }
                    Err(e) => {
                        warn!(user = %record.meta.username, error = %e, "cannot drop the unverified per-pod user; its record stays for Release and the sweep");
                    }
                }
            }
            return Err(error);
        }
        record.meta.verified = true;
        self.store.put(lease, &record).await?;
        info!(user = %record.meta.username, generation, "per-pod credential issued and verified");
        Ok(Self::credential(
            lease,
            (ctx.kind.scheme(), &ctx.host, ctx.port, &ctx.database),
            &record,
            &request.pod.uid,
        ))
    }

    async fn latest_version(
        &self,
        lease: &SecretLease,
        pod_uid: &str,
    ) -> Result<Option<u64>, BrokerError> {
        Ok(self
            .store
            .meta(lease, pod_uid)
            .await?
            .filter(|m| m.verified)
            .map(|m| m.generation))
    }

    #[instrument(skip_all, fields(pod_uid = %pod_uid))]
    async fn release(
        &self,
        lease: &SecretLease,
        policy: Option<&RotationPolicy>,
        pod_uid: &str,
        node: &str,
    ) -> Result<(), BrokerError> {
        let lock = self.lock_for(lease, pod_uid);
        let _guard = lock.lock().await;
        // The record's plain part is enough: releasing works while the key is unavailable.
        let Some(record) = self.store.meta(lease, pod_uid).await? else {
            return Ok(());
        };
        if record.node != node {
            return Err(Deny::CallerOnOtherNode {
                caller_node: node.to_owned(),
                requested_node: record.node,
            }
            .into());
        }
        let policy = policy.ok_or_else(|| {
            BrokerError::FailedPrecondition("the lease's RotationPolicy is missing".into())
        })?;
        let ctx = self.context(lease, policy).await?;
        // Derived, never read from the record: whoever can write Secrets in
        // the lease's namespace must not be able to make the admin drop a role.
        let username = per_pod_username(lease_uid(lease), pod_uid);
        if record.username != username {
            warn!(recorded = %record.username, user = %username, "pod credential record names another user; ignoring it");
        }
        ctx.backend
            .revoke(&RevokeRequest {
                id: CredentialId(username.clone()),
                mode: RevokeMode::DropUser,
                drain: DrainSessions::Terminate,
            })
            .await
            .map_err(|e| backend_error("cannot drop the pod's user", &e))?;
        self.store.delete(lease, pod_uid).await?;
        drop(_guard);
        self.forget_lock(lease, pod_uid);
        info!(user = %username, "per-pod credential revoked");
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_every_database() {
        let u = per_pod_username(
            "7f3c2a1b-0d9e-4c8f-a6b5-4e3d2c1b0a99",
            "3c2f1e0a-5b6d-4e7f-8a9b-0c1d2e3f4a5b",
        );
        assert_eq!(u, "lh_7f3c2a1b0d9e_p3c2f1e0a5b6d");
        assert!(u.len() <= 32);
        let s = pod_secret_name("7f3c2a1b-0d9e", "3C2F1E0A-5b6d-4e7f-8a9b-0c1d2e3f4a5b");
        assert_eq!(
            s,
            "leasehold-pod-7f3c2a1b0d9e-3c2f1e0a-5b6d-4e7f-8a9b-0c1d2e3f4a5b"
        );
        assert!(s.len() <= 63);
    }

    use crate::test_keys::{flaky_keyring, keyring_from, local_keyring, unavailable_keyring};
    use base64::Engine as _;
    use tonic::Code;

    const PASSWORD: &str = "s3cret-value";

    fn lease() -> SecretLease {
        let mut lease = SecretLease::new(
            "db",
            serde_json::from_value(serde_json::json!({
                "policyRef": {"name": "p"},
                "postgres": {"host": "h", "database": "d", "adminSecretRef": {"name": "a"}}
            }))
            .unwrap(),
        );
        lease.metadata.namespace = Some("shop".into());
        lease.metadata.uid = Some("7f3c2a1b-0d9e".into());
        lease
    }

    fn record(pod_uid: &str) -> PodCredentialRecord {
        let now = Timestamp::now();
        PodCredentialRecord {
            meta: PodCredentialMeta {
                username: "lh_x_py".into(),
                pod_namespace: "shop".into(),
                pod_name: "web-0".into(),
                pod_uid: pod_uid.into(),
                node: "node-a".into(),
                generation: 2,
                issued_at: now,
                expires_at: now,
                renew_at: now,
                verified: true,
            },
            password: SecretString::from(PASSWORD),
        }
    }

    /// The Secret as the API server would get it.
    fn body(secret: &Secret) -> String {
        serde_json::to_string(secret).unwrap()
    }

    fn holds_plaintext(body: &str) -> bool {
        let b64 = base64::engine::general_purpose::STANDARD.encode(PASSWORD);
        body.contains(PASSWORD) || body.contains(&b64)
    }

    #[tokio::test]
    async fn record_round_trips_through_a_sealed_secret() {
        let keyring = local_keyring();
        let lease = lease();
        let record = record("uid-1");
        let secret = sealed_pod_secret(&keyring, &lease, &record).await.unwrap();
        assert!(!holds_plaintext(&body(&secret)), "{}", body(&secret));
        let password = &secret.data.as_ref().unwrap()[PASSWORD_KEY].0;
        assert!(Keyring::is_sealed(password));
        assert_eq!(
            secret.metadata.labels.as_ref().unwrap()[SEALED_LABEL],
            "pod-credential"
        );
        // The record is plain: the sweep lists it without the key.
        assert_eq!(meta_from_secret(&secret).unwrap(), record.meta);

        let back = record_from_secret(&keyring, &secret)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back.meta, record.meta);
        assert_eq!(back.password.expose_secret(), PASSWORD);
        assert!(!format!("{record:?}").contains("s3cret"));
        let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("SecretLease", "db")
        );
    }

    #[tokio::test]
    async fn a_password_copied_into_another_pods_secret_does_not_open() {
        let keyring = local_keyring();
        let lease = lease();
        let mut secret = sealed_pod_secret(&keyring, &lease, &record("uid-1"))
            .await
            .unwrap();
        secret.metadata.name = Some(pod_secret_name(lease_uid(&lease), "uid-2"));
        let error = record_from_secret(&keyring, &secret).await.unwrap_err();
        assert_eq!(error.code(), Code::FailedPrecondition);
        let message = error.to_string();
        assert!(message.starts_with("Tampered: "), "{message}");
        assert!(!holds_plaintext(&message));

        // Nor in another namespace.
        let mut moved = sealed_pod_secret(&keyring, &lease, &record("uid-1"))
            .await
            .unwrap();
        moved.metadata.namespace = Some("other".into());
        let error = record_from_secret(&keyring, &moved).await.unwrap_err();
        assert!(error.to_string().starts_with("Tampered: "));
    }

    #[tokio::test]
    async fn a_legacy_plaintext_record_still_reads() {
        let lease = lease();
        let record = record("uid-1");
        let legacy = pod_secret(
            &lease,
            &record.meta,
            ByteString(PASSWORD.as_bytes().to_vec()),
        )
        .unwrap();
        let back = record_from_secret(&local_keyring(), &legacy)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back.password.expose_secret(), PASSWORD);
        assert_eq!(back.meta, record.meta);
    }

    #[tokio::test]
    async fn an_unencrypted_keyring_stores_plaintext() {
        let keyring = Keyring::unencrypted();
        let lease = lease();
        let secret = sealed_pod_secret(&keyring, &lease, &record("uid-1"))
            .await
            .unwrap();
        assert_eq!(
            secret.data.as_ref().unwrap()[PASSWORD_KEY].0,
            PASSWORD.as_bytes(),
            "the explicit opt-out stores the password as it is"
        );
        let back = record_from_secret(&keyring, &secret)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back.password.expose_secret(), PASSWORD);
    }

    #[tokio::test]
    async fn an_unavailable_key_is_retried_by_the_caller() {
        let lease = lease();
        // Sealing while the key is down.
        let error = sealed_pod_secret(&flaky_keyring(1), &lease, &record("uid-1"))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::Unavailable);
        assert!(
            error
                .to_string()
                .starts_with("unavailable: KeyUnavailable: ")
        );
        // Opening while it is down.
        let bytes = [7u8; 32];
        let secret = sealed_pod_secret(&keyring_from(bytes), &lease, &record("uid-1"))
            .await
            .unwrap();
        let error = record_from_secret(&unavailable_keyring(bytes), &secret)
            .await
            .unwrap_err();
        assert_eq!(tonic::Status::from(error).code(), Code::Unavailable);
        // The plain part still reads.
        assert!(meta_from_secret(&secret).is_some());
    }

    #[tokio::test]
    async fn places_under_the_user_cap_are_given_back_and_forgotten() {
        let store = Arc::new(MemoryPodCredentialStore::new());
        let issuer = EnginePerPodIssuer::new(
            Arc::new(crate::MemoryCluster::new()),
            store.clone(),
            BackendRegistry::new(1),
        )
        .with_limits(BrokerLimits {
            max_per_pod_users_per_lease: 2,
            ..BrokerLimits::default()
        });
        let lease = lease();
        store.put(&lease, &record("uid-1")).await.unwrap();
        let place = issuer.reserve_user(&lease, "uid-2").await.unwrap();
        let err = issuer.reserve_user(&lease, "uid-3").await.err().unwrap();
        assert_eq!(err.code(), Code::ResourceExhausted);
        drop(place);
        let place = issuer.reserve_user(&lease, "uid-3").await.unwrap();
        drop(place);
        assert!(
            issuer.user_caps.lock().unwrap().is_empty(),
            "no entry left per lease"
        );
    }

    #[tokio::test]
    async fn an_incomplete_secret_is_no_record() {
        let mut secret = sealed_pod_secret(&local_keyring(), &lease(), &record("uid-1"))
            .await
            .unwrap();
        secret.data.as_mut().unwrap().remove(PASSWORD_KEY);
        assert!(
            record_from_secret(&local_keyring(), &secret)
                .await
                .unwrap()
                .is_none()
        );
    }
}
