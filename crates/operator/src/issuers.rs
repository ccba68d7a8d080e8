//! The Issuer and ClusterIssuer controller, and the [`IssuerRegistry`] lease
//! controllers resolve issuers through.
//!
//! Reconcile: *plan* (pure: which CA source the spec names, or why none) → *load* (read
//! the CA Secret; for `selfSigned` create it once) → *evaluate* (pure: Secret → CA or the
//! reason it is not ready) → register the ready issuer (with its ConfigMap revocation
//! ledger and a CRL refresh task) → write status only if it changed.
//!
//! An `acme` issuer loads (or registers and persists) its account instead, see
//! [`crate::acme_issuer`], and registers an `AcmeIssuer` sharing the process's HTTP-01
//! solver.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use leasehold_api::conditions::{self, condition, upsert};
use leasehold_api::{
    ClusterIssuer, FIELD_MANAGER, Issuer, IssuerKind, IssuerRef, IssuerSpec, IssuerStatus,
    IssuerType,
};
use leasehold_certs::{CaIssuer, CertificateAuthority, CertificateIssuer, KeyAlgorithm};
use tokio::sync::watch;

use crate::OperatorError;
use crate::acme_issuer::{AcmePlan, AcmeState, KubeSecretStore, load_acme_issuer, plan_acme};
use crate::crl::{ConfigMapLedger, KubeLedgerStore, LedgerStore};
use crate::metrics::Metrics;
use crate::secrets::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use crate::status::k8s_time;

pub const CONTROLLER: &str = "issuer";
/// Secret key of the CA certificate (PEM).
pub const CERT_KEY: &str = "tls.crt";
/// Secret key of the CA private key (PEM).
pub const KEY_KEY: &str = "tls.key";
/// Secret key of the CA certificate for consumers (PEM; generated CAs only).
pub const CA_KEY: &str = "ca.crt";
/// Lifetime of a generated self-signed root.
pub const SELF_SIGNED_VALIDITY: time::Duration = time::Duration::days(3650);
/// Re-check a ready issuer this often (its Secret is watched too).
pub const READY_RESYNC: Duration = Duration::from_secs(600);
/// Re-check an issuer that is not ready this often, besides the Secret watch.
pub const NOT_READY_RESYNC: Duration = Duration::from_secs(120);

/// Which issuer: an `Issuer` in a namespace or a `ClusterIssuer`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IssuerKey {
    Namespaced { namespace: String, name: String },
    Cluster { name: String },
}

impl IssuerKey {
    /// The issuer a lease in `namespace` refers to with `issuer`.
    pub fn for_ref(namespace: &str, issuer: &IssuerRef) -> Self {
        match issuer.kind {
            IssuerKind::Issuer => IssuerKey::Namespaced {
                namespace: namespace.to_owned(),
                name: issuer.name.clone(),
            },
            IssuerKind::ClusterIssuer => IssuerKey::Cluster {
                name: issuer.name.clone(),
            },
        }
    }

    pub fn name(&self) -> &str {
        match self {
            IssuerKey::Namespaced { name, .. } | IssuerKey::Cluster { name } => name,
        }
    }

    /// Where the issuer's own objects (ledger ConfigMap, generated CA Secret) live.
    pub fn home_namespace<'a>(&'a self, controller_namespace: &'a str) -> &'a str {
        match self {
            IssuerKey::Namespaced { namespace, .. } => namespace,
            IssuerKey::Cluster { .. } => controller_namespace,
        }
    }
}

impl std::fmt::Display for IssuerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IssuerKey::Namespaced { namespace, name } => write!(f, "Issuer {namespace}/{name}"),
            IssuerKey::Cluster { name } => write!(f, "ClusterIssuer {name}"),
        }
    }
}

/// Why a lease cannot use the issuer it names. The message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssuerNotReady {
    #[error("{issuer} does not exist: create it, or fix the lease's issuerRef")]
    NotFound { issuer: String },
    #[error("{issuer} is not ready ({reason}): {message}")]
    NotReady {
        issuer: String,
        reason: String,
        message: String,
    },
    /// An ACME issuer has no CA certificate or CRL here: its CA publishes them.
    #[error("{issuer} is an ACME issuer: its CA publishes its certificates and revocations")]
    NotACa { issuer: String },
}

impl leasehold_broker::certificates::CertificateIssuers for IssuerRegistry {
    fn issuer_for(
        &self,
        namespace: &str,
        issuer_ref: &leasehold_api::IssuerRef,
    ) -> Result<Arc<dyn CertificateIssuer>, leasehold_broker::certificates::IssuerLookupError> {
        use leasehold_broker::certificates::IssuerLookupError;
        self.resolve(namespace, issuer_ref).map_err(|e| match e {
            IssuerNotReady::NotFound { issuer } => IssuerLookupError::NotFound(issuer),
            IssuerNotReady::NotReady {
                issuer,
                reason,
                message,
            } => IssuerLookupError::NotReady(issuer, format!("{reason}: {message}")),
            e @ IssuerNotReady::NotACa { .. } => {
                IssuerLookupError::NotReady(e.to_string(), "not a CA issuer".into())
            }
        })
    }
}

impl IssuerNotReady {
    /// A short reason for a condition (`IssuerNotFound`, or the issuer's own reason).
    pub fn reason(&self) -> &str {
        match self {
            IssuerNotReady::NotFound { .. } => "IssuerNotFound",
            IssuerNotReady::NotReady { reason, .. } => reason,
            IssuerNotReady::NotACa { .. } => "NotACaIssuer",
        }
    }
}

/// What a `ca` issuer has besides its issuer: its certificate and revocation ledger.
struct LocalCa {
    ledger: Arc<ConfigMapLedger>,
    ca_pem: String,
}

/// A ready issuer as the registry holds it.
struct ReadyIssuer {
    issuer: Arc<dyn CertificateIssuer>,
    /// What the entry was built from: a reconcile that finds the same keeps it.
    identity: String,
    /// `ca` issuers only.
    local_ca: Option<LocalCa>,
    /// The CRL refresh task; aborted when the entry is replaced or removed.
    refresher: Option<tokio::task::AbortHandle>,
}

impl Drop for ReadyIssuer {
    fn drop(&mut self) {
        if let Some(task) = self.refresher.take() {
            task.abort();
        }
    }
}

enum RegistryEntry {
    Ready(ReadyIssuer),
    NotReady { reason: String, message: String },
}

/// The issuers the controller has loaded, by [`IssuerKey`]. Cheap to clone; every clone
/// sees the same issuers.
#[derive(Clone)]
pub struct IssuerRegistry {
    entries: Arc<RwLock<HashMap<IssuerKey, RegistryEntry>>>,
    changes: Arc<watch::Sender<u64>>,
    /// Start a CRL refresh task per ready issuer (off in scripted-API tests).
    refresh_crls: bool,
}

impl std::fmt::Debug for IssuerRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("IssuerRegistry")
            .field("issuers", &entries.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Default for IssuerRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl IssuerRegistry {
    pub fn new() -> Self {
        Self {
            entries: Arc::default(),
            changes: Arc::new(watch::channel(0).0),
            refresh_crls: true,
        }
    }

    /// A registry that starts no CRL refresh tasks (tests that script every API call).
    pub fn without_crl_refresh() -> Self {
        Self {
            refresh_crls: false,
            ..Self::new()
        }
    }

    fn with_entry<T>(
        &self,
        key: &IssuerKey,
        f: impl FnOnce(&ReadyIssuer) -> T,
    ) -> Result<T, IssuerNotReady> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        match entries.get(key) {
            Some(RegistryEntry::Ready(ready)) => Ok(f(ready)),
            Some(RegistryEntry::NotReady { reason, message }) => Err(IssuerNotReady::NotReady {
                issuer: key.to_string(),
                reason: reason.clone(),
                message: message.clone(),
            }),
            None => Err(IssuerNotReady::NotFound {
                issuer: key.to_string(),
            }),
        }
    }

    /// The ready issuer a lease in `namespace` refers to, or why not.
    pub fn resolve(
        &self,
        namespace: &str,
        issuer: &IssuerRef,
    ) -> Result<Arc<dyn CertificateIssuer>, IssuerNotReady> {
        self.resolve_key(&IssuerKey::for_ref(namespace, issuer))
    }

    /// [`Self::resolve`] by key.
    pub fn resolve_key(
        &self,
        key: &IssuerKey,
    ) -> Result<Arc<dyn CertificateIssuer>, IssuerNotReady> {
        self.with_entry(key, |ready| ready.issuer.clone())
    }

    /// The CA certificate (PEM) of that issuer, for `ca.crt`.
    pub fn ca_pem(&self, namespace: &str, issuer: &IssuerRef) -> Result<String, IssuerNotReady> {
        self.ca_pem_by_key(&IssuerKey::for_ref(namespace, issuer))
    }

    pub fn ca_pem_by_key(&self, key: &IssuerKey) -> Result<String, IssuerNotReady> {
        self.with_entry(key, |ready| {
            ready.local_ca.as_ref().map(|ca| ca.ca_pem.clone())
        })?
        .ok_or_else(|| IssuerNotReady::NotACa {
            issuer: key.to_string(),
        })
    }

    /// The current CRL (PEM) of a ready issuer; `Ok(None)` until the first is signed.
    pub fn crl_pem_by_key(&self, key: &IssuerKey) -> Result<Option<String>, IssuerNotReady> {
        self.with_entry(key, |ready| {
            ready.local_ca.as_ref().map(|ca| ca.ledger.crl_pem())
        })?
        .ok_or_else(|| IssuerNotReady::NotACa {
            issuer: key.to_string(),
        })
    }

    /// Changes whenever an issuer becomes ready, changes CA, or stops being ready: a lease
    /// controller can wait on it to retry leases blocked on an issuer.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Register a ready `ca` issuer (starting its CRL refresh task when a runtime is
    /// there). Keeps the existing entry, and its task, if it already signs with this CA.
    pub fn set_ready(&self, key: IssuerKey, ca: CertificateAuthority, store: Arc<dyn LedgerStore>) {
        let ca_pem = ca.certificate_pem().to_owned();
        let identity = format!("ca\n{ca_pem}");
        if self.is_ready_as(&key, &identity) {
            return;
        }
        let ca = Arc::new(ca);
        let ledger = Arc::new(ConfigMapLedger::new(store, ca.clone()));
        let issuer = Arc::new(CaIssuer::new(ca, ledger.clone()));
        let refresher = tokio::runtime::Handle::try_current()
            .ok()
            .filter(|_| self.refresh_crls)
            .map(|handle| {
                handle
                    .spawn(ledger.clone().refresh_forever())
                    .abort_handle()
            });
        let entry = RegistryEntry::Ready(ReadyIssuer {
            issuer,
            identity,
            local_ca: Some(LocalCa { ledger, ca_pem }),
            refresher,
        });
        self.entries
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, entry);
        self.changed();
    }

    /// Whether `key` is ready with an entry built from `identity`.
    pub fn is_ready_as(&self, key: &IssuerKey, identity: &str) -> bool {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        matches!(entries.get(key), Some(RegistryEntry::Ready(ready)) if ready.identity == identity)
    }

    /// Register a ready issuer that keeps no CA here (an ACME issuer). `identity` says
    /// what it was built from: the existing entry is kept if it was built from the same.
    pub fn set_ready_issuer(
        &self,
        key: IssuerKey,
        issuer: Arc<dyn CertificateIssuer>,
        identity: String,
    ) {
        if self.is_ready_as(&key, &identity) {
            return;
        }
        let entry = RegistryEntry::Ready(ReadyIssuer {
            issuer,
            identity,
            local_ca: None,
            refresher: None,
        });
        self.entries
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, entry);
        self.changed();
    }

    /// Record why an issuer is not ready (a lease naming it says so).
    pub fn set_not_ready(&self, key: IssuerKey, reason: &str, message: &str) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        let same = matches!(entries.get(&key), Some(RegistryEntry::NotReady { reason: r, message: m }) if r == reason && m == message);
        if !same {
            entries.insert(
                key,
                RegistryEntry::NotReady {
                    reason: reason.to_owned(),
                    message: message.to_owned(),
                },
            );
            drop(entries);
            self.changed();
        }
    }

    /// Forget a deleted issuer (stops its CRL refresh task).
    pub fn remove(&self, key: &IssuerKey) {
        let removed = self
            .entries
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        if removed.is_some() {
            self.changed();
        }
    }

    /// Keep only the issuers `keep` accepts (after a re-list: deletions missed while
    /// the watch was down).
    pub fn retain(&self, keep: impl Fn(&IssuerKey) -> bool) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        let before = entries.len();
        entries.retain(|key, _| keep(key));
        let changed = entries.len() != before;
        drop(entries);
        if changed {
            self.changed();
        }
    }
}

/// Follows an issuer watch so the registry forgets issuers deleted while the watch was
/// down: a re-list (`Init` … `InitDone`) names every issuer that still exists.
#[derive(Debug)]
pub struct RegistrySync {
    registry: IssuerRegistry,
    /// Keys this watch covers: `Some(ns)`: Issuers in `ns`; `None` with `cluster`:
    /// ClusterIssuers; `None` without: Issuers in every namespace.
    namespace: Option<String>,
    cluster: bool,
    relisted: Option<std::collections::HashSet<IssuerKey>>,
}

impl RegistrySync {
    pub fn issuers(registry: IssuerRegistry, namespace: Option<String>) -> Self {
        Self {
            registry,
            namespace,
            cluster: false,
            relisted: None,
        }
    }

    pub fn cluster_issuers(registry: IssuerRegistry) -> Self {
        Self {
            registry,
            namespace: None,
            cluster: true,
            relisted: None,
        }
    }

    fn covers(&self, key: &IssuerKey) -> bool {
        match key {
            IssuerKey::Cluster { .. } => self.cluster,
            IssuerKey::Namespaced { namespace, .. } => {
                !self.cluster && self.namespace.as_ref().is_none_or(|ns| ns == namespace)
            }
        }
    }

    /// Apply one watch event (`None` key: an event that names no issuer).
    pub fn observe<K>(
        &mut self,
        event: &kube::runtime::watcher::Event<K>,
        key_of: impl Fn(&K) -> Option<IssuerKey>,
    ) {
        use kube::runtime::watcher::Event;
        match event {
            Event::Init => self.relisted = Some(Default::default()),
            Event::InitApply(object) => {
                if let (Some(seen), Some(key)) = (self.relisted.as_mut(), key_of(object)) {
                    seen.insert(key);
                }
            }
            Event::InitDone => {
                if let Some(seen) = self.relisted.take() {
                    let covers = |key: &IssuerKey| self.covers(key);
                    self.registry
                        .retain(|key| !covers(key) || seen.contains(key));
                }
            }
            Event::Delete(object) => {
                if let Some(key) = key_of(object) {
                    self.registry.remove(&key);
                }
            }
            Event::Apply(_) => {}
        }
    }
}

// ---- plan and evaluate: pure ----

/// Where a `ca` issuer's CA comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaSource {
    /// A Secret the user provides.
    Secret { namespace: String, name: String },
    /// A root generated once and kept in this Secret.
    SelfSigned { namespace: String, name: String },
}

impl CaSource {
    pub fn secret(&self) -> (&str, &str) {
        match self {
            CaSource::Secret { namespace, name } | CaSource::SelfSigned { namespace, name } => {
                (namespace, name)
            }
        }
    }
}

/// Why an issuer is not ready: a condition reason and a message naming what to fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotReadyReason {
    pub reason: &'static str,
    pub message: String,
}

/// What the spec asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IssuerPlan {
    Ca(CaSource),
    Acme(AcmePlan),
    Invalid(NotReadyReason),
}

impl IssuerPlan {
    /// The Secrets the issuer reads (`namespace`, `name`): a change to one re-checks it.
    pub fn secrets(&self) -> Vec<(&str, &str)> {
        match self {
            IssuerPlan::Ca(source) => vec![source.secret()],
            IssuerPlan::Acme(acme) => acme
                .secrets()
                .into_iter()
                .map(|s| (s.namespace.as_str(), s.name.as_str()))
                .collect(),
            IssuerPlan::Invalid(_) => Vec::new(),
        }
    }

    pub fn issuer_type(&self) -> Option<IssuerType> {
        match self {
            IssuerPlan::Ca(_) => Some(IssuerType::Ca),
            IssuerPlan::Acme(_) => Some(IssuerType::Acme),
            IssuerPlan::Invalid(_) => None,
        }
    }
}

/// The name of the Secret a `selfSigned` issuer keeps its generated root in.
pub fn self_signed_secret_name(issuer_name: &str) -> String {
    format!("{issuer_name}-ca")
}

/// What `spec` of issuer `key` asks for. ClusterIssuer Secrets default to
/// `controller_namespace`; an Issuer only ever reads its own namespace.
pub fn plan(key: &IssuerKey, spec: &IssuerSpec, controller_namespace: &str) -> IssuerPlan {
    match (&spec.ca, &spec.acme) {
        (Some(_), Some(_)) | (None, None) => IssuerPlan::Invalid(NotReadyReason {
            reason: "InvalidSpec",
            message: "set exactly one of spec.ca and spec.acme".into(),
        }),
        (None, Some(acme)) => match plan_acme(key, acme, controller_namespace) {
            Ok(acme) => IssuerPlan::Acme(acme),
            Err(why) => IssuerPlan::Invalid(why),
        },
        (Some(ca), None) => match (&ca.secret_ref, ca.self_signed) {
            (Some(_), true) | (None, false) => IssuerPlan::Invalid(NotReadyReason {
                reason: "InvalidSpec",
                message: "set exactly one of spec.ca.secretRef and spec.ca.selfSigned".into(),
            }),
            (None, true) => IssuerPlan::Ca(CaSource::SelfSigned {
                namespace: key.home_namespace(controller_namespace).to_owned(),
                name: self_signed_secret_name(key.name()),
            }),
            (Some(secret), false) => match key {
                IssuerKey::Namespaced { namespace, .. } => match &secret.namespace {
                    Some(other) if other != namespace => IssuerPlan::Invalid(NotReadyReason {
                        reason: "InvalidSpec",
                        message: format!(
                            "an Issuer reads its CA Secret from its own namespace {namespace}; remove spec.ca.secretRef.namespace ({other}) or use a ClusterIssuer"
                        ),
                    }),
                    _ => IssuerPlan::Ca(CaSource::Secret {
                        namespace: namespace.clone(),
                        name: secret.name.clone(),
                    }),
                },
                IssuerKey::Cluster { .. } => IssuerPlan::Ca(CaSource::Secret {
                    namespace: secret
                        .namespace
                        .clone()
                        .unwrap_or_else(|| controller_namespace.to_owned()),
                    name: secret.name.clone(),
                }),
            },
        },
    }
}

fn secret_text(data: Option<&BTreeMap<String, ByteString>>, key: &str) -> Option<String> {
    data.and_then(|d| d.get(key))
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
        .filter(|s| !s.trim().is_empty())
}

/// The CA in `secret` (`tls.crt`, `tls.key`), or why it cannot be used. Messages name
/// the Secret and never carry key material.
pub fn evaluate_ca_secret(
    secret: Option<&Secret>,
    namespace: &str,
    name: &str,
) -> Result<CertificateAuthority, NotReadyReason> {
    let Some(secret) = secret else {
        return Err(NotReadyReason {
            reason: "SecretNotFound",
            message: format!(
                "Secret {namespace}/{name} does not exist: create it with {CERT_KEY} and {KEY_KEY} (a CA certificate and its private key, PEM)"
            ),
        });
    };
    let data = secret.data.as_ref();
    let missing: Vec<&str> = [CERT_KEY, KEY_KEY]
        .into_iter()
        .filter(|key| secret_text(data, key).is_none())
        .collect();
    if !missing.is_empty() {
        return Err(NotReadyReason {
            reason: "SecretIncomplete",
            message: format!(
                "Secret {namespace}/{name} has no {}: it needs {CERT_KEY} and {KEY_KEY} (PEM)",
                missing.join(" and ")
            ),
        });
    }
    let cert = secret_text(data, CERT_KEY).unwrap_or_default();
    let key = secret_text(data, KEY_KEY).unwrap_or_default();
    CertificateAuthority::from_pem(&cert, &key).map_err(|e| NotReadyReason {
        reason: "InvalidCA",
        message: format!("Secret {namespace}/{name}: {e}"),
    })
}

/// The Secret that keeps a generated root: `kubernetes.io/tls` with `tls.crt`,
/// `tls.key` and `ca.crt`.
pub fn self_signed_secret(
    ca: &CertificateAuthority,
    namespace: &str,
    name: &str,
    owner: Option<OwnerReference>,
) -> Secret {
    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_owned(),
                MANAGED_BY_VALUE.to_owned(),
            )])),
            owner_references: owner.map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            (CERT_KEY.to_owned(), bytes(ca.certificate_pem())),
            (KEY_KEY.to_owned(), bytes(ca.key_pem().expose())),
            (CA_KEY.to_owned(), bytes(ca.certificate_pem())),
        ])),
        ..Secret::default()
    }
}

/// The common name of a generated root.
pub fn self_signed_common_name(key: &IssuerKey) -> String {
    match key {
        IssuerKey::Namespaced { namespace, name } => format!("leasehold Issuer {namespace}/{name}"),
        IssuerKey::Cluster { name } => format!("leasehold ClusterIssuer {name}"),
    }
}

/// The status for an outcome: `type` and the `Ready` condition.
pub fn issuer_status(
    existing: Option<&IssuerStatus>,
    issuer_type: Option<IssuerType>,
    outcome: &Result<String, NotReadyReason>,
    generation: Option<i64>,
    now: Timestamp,
) -> IssuerStatus {
    let mut conds = existing.map(|s| s.conditions.clone()).unwrap_or_default();
    let mut ready = match outcome {
        Ok(message) => condition(
            conditions::READY,
            true,
            "Ready",
            message.clone(),
            generation,
            now,
        ),
        Err(why) => condition(
            conditions::READY,
            false,
            why.reason,
            why.message.clone(),
            generation,
            now,
        ),
    };
    ready.last_transition_time = k8s_time(now);
    upsert(&mut conds, ready);
    IssuerStatus {
        observed_generation: generation,
        type_: issuer_type,
        conditions: conds,
    }
}

/// What to do next after a reconcile.
pub fn next_action(outcome: &Result<String, NotReadyReason>) -> Action {
    match outcome {
        Ok(_) => Action::requeue(READY_RESYNC),
        Err(_) => Action::requeue(NOT_READY_RESYNC),
    }
}

// ---- effects ----

/// Shared state of the issuer controller.
pub struct IssuerContext {
    pub client: Client,
    pub registry: IssuerRegistry,
    /// Home of ClusterIssuer Secrets and ConfigMaps (the controller's namespace).
    pub controller_namespace: String,
    pub metrics: Arc<Metrics>,
    pub recorder: Option<Recorder>,
    /// The HTTP-01 solver and account state ACME issuers share.
    pub acme: Arc<AcmeState>,
    /// Seals the keys the controller generates (self-signed CAs, ACME accounts).
    pub keyring: Arc<leasehold_envelope::Keyring>,
}

impl std::fmt::Debug for IssuerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerContext")
            .field("controller_namespace", &self.controller_namespace)
            .finish_non_exhaustive()
    }
}

/// An Issuer or a ClusterIssuer, as the reconciler sees both.
#[derive(Debug, Clone)]
pub struct IssuerObject {
    pub key: IssuerKey,
    pub spec: IssuerSpec,
    pub status: Option<IssuerStatus>,
    pub generation: Option<i64>,
    pub owner: Option<OwnerReference>,
    pub reference: k8s_openapi::api::core::v1::ObjectReference,
}

impl IssuerObject {
    pub fn from_issuer(issuer: &Issuer) -> Result<Self, OperatorError> {
        Ok(Self {
            key: IssuerKey::Namespaced {
                namespace: issuer
                    .namespace()
                    .ok_or(OperatorError::MissingField("metadata.namespace"))?,
                name: issuer.name_any(),
            },
            spec: issuer.spec.clone(),
            status: issuer.status.clone(),
            generation: issuer.metadata.generation,
            owner: issuer.controller_owner_ref(&()),
            reference: issuer.object_ref(&()),
        })
    }

    pub fn from_cluster_issuer(issuer: &ClusterIssuer) -> Self {
        Self {
            key: IssuerKey::Cluster {
                name: issuer.name_any(),
            },
            spec: issuer.spec.clone().into(),
            status: issuer.status.clone(),
            generation: issuer.metadata.generation,
            owner: issuer.controller_owner_ref(&()),
            reference: issuer.object_ref(&()),
        }
    }
}

/// A Secret the controller may not read or create: not ready, with what to grant.
fn forbidden(namespace: &str, name: &str, e: &kube::core::Status) -> NotReadyReason {
    NotReadyReason {
        reason: "SecretForbidden",
        message: format!(
            "the controller may not access Secret {namespace}/{name} ({}): grant its service account access to Secrets in {namespace}, or keep the CA in a namespace it manages",
            e.message
        ),
    }
}

/// Read the CA Secret; for a `selfSigned` issuer, generate and create it if absent
/// (create, never overwrite: a concurrent or earlier creation wins and is loaded).
///
/// The generated Secret has no owner: deleting and re-creating the issuer must not
/// replace a root that relying parties already trust.
async fn load_ca(
    ctx: &IssuerContext,
    object: &IssuerObject,
    source: &CaSource,
) -> Result<Result<CertificateAuthority, NotReadyReason>, OperatorError> {
    let (namespace, name) = source.secret();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let mut secret = match secrets.get_opt(name).await {
        Ok(secret) => secret,
        Err(kube::Error::Api(s)) if s.code == 403 => {
            return Ok(Err(forbidden(namespace, name, &s)));
        }
        Err(e) => return Err(e.into()),
    };
    if secret.is_none()
        && let CaSource::SelfSigned { .. } = source
    {
        let ca = CertificateAuthority::self_signed(
            &self_signed_common_name(&object.key),
            KeyAlgorithm::EcdsaP256,
            time::OffsetDateTime::now_utc(),
            SELF_SIGNED_VALIDITY,
        )
        .map_err(|e| OperatorError::Config(format!("generating a CA: {e}")))?;
        let body = leasehold_envelope::secret::seal_secret(
            &ctx.keyring,
            leasehold_envelope::secret::SealedKind::IssuerCa,
            self_signed_secret(&ca, namespace, name, None),
        )
        .await
        .map_err(|e| key_unavailable(namespace, name, &e))?;
        match secrets.create(&PostParams::default(), &body).await {
            Ok(created) => {
                tracing::info!(issuer = %object.key, secret = %format!("{namespace}/{name}"), "generated a self-signed CA");
                secret = Some(created);
            }
            Err(kube::Error::Api(s)) if s.code == 409 => secret = secrets.get_opt(name).await?,
            Err(kube::Error::Api(s)) if s.code == 403 => {
                return Ok(Err(forbidden(namespace, name, &s)));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let secret = match secret {
        Some(s) => Some(
            leasehold_envelope::secret::open_secret(&ctx.keyring, &s)
                .await
                .map_err(|e| key_unavailable(namespace, name, &e))?,
        ),
        None => None,
    };
    Ok(evaluate_ca_secret(secret.as_ref(), namespace, name))
}

/// A key failure on the CA Secret: the issuer is retried with backoff.
fn key_unavailable(
    namespace: &str,
    name: &str,
    e: &leasehold_envelope::EnvelopeError,
) -> OperatorError {
    OperatorError::Store(leasehold_engine::StoreError(format!(
        "{}: the CA key in Secret {namespace}/{name}: {e}",
        e.reason()
    )))
}

fn ready_message(source: &CaSource) -> String {
    match source {
        CaSource::Secret { namespace, name } => {
            format!("signing with the CA in Secret {namespace}/{name}")
        }
        CaSource::SelfSigned { namespace, name } => {
            format!("signing with the self-signed CA kept in Secret {namespace}/{name}")
        }
    }
}

/// Reconcile one Issuer or ClusterIssuer.
pub async fn reconcile_object(
    object: IssuerObject,
    ctx: &IssuerContext,
) -> Result<Action, OperatorError> {
    let started = Instant::now();
    let plan = plan(&object.key, &object.spec, &ctx.controller_namespace);
    let mut retry_in = None;
    let outcome = match &plan {
        IssuerPlan::Invalid(why) => Err(why.clone()),
        IssuerPlan::Acme(acme) => {
            let store = KubeSecretStore::new(ctx.client.clone(), ctx.keyring.clone());
            let loaded =
                load_acme_issuer(&object.key, acme, &store, &ctx.acme, &ctx.registry).await?;
            retry_in = Some(loaded.retry_in);
            loaded.result
        }
        IssuerPlan::Ca(source) => match load_ca(ctx, &object, source).await? {
            Ok(ca) => {
                let ledger_namespace = object.key.home_namespace(&ctx.controller_namespace);
                // No owner: the revocations must outlive a deleted and re-created
                // issuer as long as its CA does, or revoked certificates turn valid.
                let store = KubeLedgerStore::new(
                    ctx.client.clone(),
                    ledger_namespace,
                    object.key.name(),
                    None,
                );
                ctx.registry
                    .set_ready(object.key.clone(), ca, Arc::new(store));
                Ok(ready_message(source))
            }
            Err(why) => Err(why),
        },
    };
    if let Err(why) = &outcome {
        ctx.registry
            .set_not_ready(object.key.clone(), why.reason, &why.message);
    }
    let status = issuer_status(
        object.status.as_ref(),
        plan.issuer_type(),
        &outcome,
        object.generation,
        Timestamp::now(),
    );
    if status_changed(object.status.as_ref(), &status) {
        write_status(ctx, &object, &status).await?;
        publish_transition(ctx, &object, &outcome);
    }
    ctx.metrics
        .reconciled(CONTROLLER, started.elapsed().as_secs_f64());
    Ok(retry_in.map_or_else(|| next_action(&outcome), Action::requeue))
}

/// Whether `desired` differs from the stored status (as JSON: what the server keeps).
pub fn status_changed(observed: Option<&IssuerStatus>, desired: &IssuerStatus) -> bool {
    let strip = |s: &IssuerStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time = k8s_time(Timestamp::UNIX_EPOCH);
        }
        serde_json::to_value(s).ok()
    };
    match observed {
        None => true,
        Some(observed) => strip(observed) != strip(desired) || strip(desired).is_none(),
    }
}

async fn write_status(
    ctx: &IssuerContext,
    object: &IssuerObject,
    status: &IssuerStatus,
) -> Result<(), OperatorError> {
    let kind = match &object.key {
        IssuerKey::Namespaced { .. } => "Issuer",
        IssuerKey::Cluster { .. } => "ClusterIssuer",
    };
    let body = serde_json::json!({
        "apiVersion": format!("{}/{}", leasehold_api::GROUP, leasehold_api::VERSION),
        "kind": kind,
        "status": status,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match &object.key {
        IssuerKey::Namespaced { namespace, name } => {
            Api::<Issuer>::namespaced(ctx.client.clone(), namespace)
                .patch_status(name, &params, &Patch::Apply(&body))
                .await?;
        }
        IssuerKey::Cluster { name } => {
            Api::<ClusterIssuer>::all(ctx.client.clone())
                .patch_status(name, &params, &Patch::Apply(&body))
                .await?;
        }
    }
    Ok(())
}

/// An event when the status changed (best effort).
fn publish_transition(
    ctx: &IssuerContext,
    object: &IssuerObject,
    outcome: &Result<String, NotReadyReason>,
) {
    let Some(recorder) = ctx.recorder.clone() else {
        return;
    };
    let (type_, reason, note) = match outcome {
        Ok(message) => (EventType::Normal, "Ready", message.clone()),
        Err(why) => (EventType::Warning, why.reason, why.message.clone()),
    };
    let reference = object.reference.clone();
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    tokio::spawn(async move {
        if let Err(e) = recorder.publish(&event, &reference).await {
            tracing::debug!(error = %e, "cannot publish an event");
        }
    });
}

pub async fn reconcile_issuer(
    issuer: Arc<Issuer>,
    ctx: Arc<IssuerContext>,
) -> Result<Action, OperatorError> {
    reconcile_object(IssuerObject::from_issuer(&issuer)?, &ctx).await
}

pub async fn reconcile_cluster_issuer(
    issuer: Arc<ClusterIssuer>,
    ctx: Arc<IssuerContext>,
) -> Result<Action, OperatorError> {
    reconcile_object(IssuerObject::from_cluster_issuer(&issuer), &ctx).await
}

pub fn error_policy<K: Resource>(
    object: Arc<K>,
    error: &OperatorError,
    ctx: Arc<IssuerContext>,
) -> Action {
    ctx.metrics.failed(CONTROLLER, error.kind());
    tracing::warn!(issuer = %object.meta().name.as_deref().unwrap_or_default(), error = %error, "issuer reconcile failed");
    Action::requeue(Duration::from_secs(15))
}

/// Issuers in `issuers` whose CA Secret is `namespace/name`.
pub fn issuers_for_secret(
    issuers: &[Arc<Issuer>],
    namespace: Option<&str>,
    name: &str,
) -> Vec<kube::runtime::reflector::ObjectRef<Issuer>> {
    issuers
        .iter()
        .filter(|i| i.namespace().as_deref() == namespace)
        .filter(|i| {
            let Some(namespace) = namespace else {
                return false;
            };
            let key = IssuerKey::Namespaced {
                namespace: namespace.to_owned(),
                name: i.name_any(),
            };
            // Issuers never read the controller namespace: any name does here.
            plan(&key, &i.spec, "")
                .secrets()
                .contains(&(namespace, name))
        })
        .map(|i| kube::runtime::reflector::ObjectRef::from_obj(i.as_ref()))
        .collect()
}

/// ClusterIssuers in `issuers` whose CA Secret is `namespace/name`.
pub fn cluster_issuers_for_secret(
    issuers: &[Arc<ClusterIssuer>],
    controller_namespace: &str,
    namespace: Option<&str>,
    name: &str,
) -> Vec<kube::runtime::reflector::ObjectRef<ClusterIssuer>> {
    issuers
        .iter()
        .filter(|i| {
            let key = IssuerKey::Cluster { name: i.name_any() };
            plan(&key, &i.spec.clone().into(), controller_namespace)
                .secrets()
                .contains(&(namespace.unwrap_or_default(), name))
        })
        .map(|i| kube::runtime::reflector::ObjectRef::from_obj(i.as_ref()))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use leasehold_api::{AcmeIssuer, CaIssuer as CaSpec, IssuerSecretRef};

    use super::*;
    use crate::crl::MemoryLedgerStore;

    fn ns_key() -> IssuerKey {
        IssuerKey::Namespaced {
            namespace: "shop".into(),
            name: "internal".into(),
        }
    }

    fn ca_spec(secret: Option<(&str, Option<&str>)>, self_signed: bool) -> IssuerSpec {
        IssuerSpec {
            ca: Some(CaSpec {
                secret_ref: secret.map(|(name, namespace)| IssuerSecretRef {
                    name: name.into(),
                    namespace: namespace.map(Into::into),
                }),
                self_signed,
            }),
            acme: None,
        }
    }

    fn test_ca() -> CertificateAuthority {
        CertificateAuthority::self_signed(
            "test",
            KeyAlgorithm::EcdsaP256,
            time::OffsetDateTime::now_utc(),
            time::Duration::days(1),
        )
        .unwrap()
    }

    fn secret_with(data: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(
                data.iter()
                    .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    #[test]
    fn plan_reads_what_the_spec_names() {
        assert_eq!(
            plan(&ns_key(), &ca_spec(Some(("ca", None)), false), "leasehold"),
            IssuerPlan::Ca(CaSource::Secret {
                namespace: "shop".into(),
                name: "ca".into()
            })
        );
        assert_eq!(
            plan(&ns_key(), &ca_spec(None, true), "leasehold"),
            IssuerPlan::Ca(CaSource::SelfSigned {
                namespace: "shop".into(),
                name: "internal-ca".into()
            })
        );
        let cluster = IssuerKey::Cluster {
            name: "root".into(),
        };
        assert_eq!(
            plan(&cluster, &ca_spec(Some(("ca", None)), false), "leasehold"),
            IssuerPlan::Ca(CaSource::Secret {
                namespace: "leasehold".into(),
                name: "ca".into()
            })
        );
        assert_eq!(
            plan(
                &cluster,
                &ca_spec(Some(("ca", Some("pki"))), false),
                "leasehold"
            ),
            IssuerPlan::Ca(CaSource::Secret {
                namespace: "pki".into(),
                name: "ca".into()
            })
        );
        assert_eq!(
            plan(&cluster, &ca_spec(None, true), "leasehold"),
            IssuerPlan::Ca(CaSource::SelfSigned {
                namespace: "leasehold".into(),
                name: "root-ca".into()
            })
        );
        // An Issuer never reads another namespace.
        let IssuerPlan::Invalid(why) = plan(
            &ns_key(),
            &ca_spec(Some(("ca", Some("kube-system"))), false),
            "leasehold",
        ) else {
            panic!("cross-namespace secretRef accepted");
        };
        assert_eq!(why.reason, "InvalidSpec");
        assert!(why.message.contains("kube-system"), "{}", why.message);
        let acme = IssuerSpec {
            ca: None,
            acme: Some(AcmeIssuer {
                directory_url: "https://acme.example/directory".into(),
                email: None,
                account_key_secret_ref: IssuerSecretRef {
                    name: "acct".into(),
                    namespace: None,
                },
                external_account_binding: None,
                http01: None,
                ca_bundle: None,
                extra_trust_anchors: None,
            }),
        };
        let IssuerPlan::Acme(acme_plan) = plan(&ns_key(), &acme, "leasehold") else {
            panic!("not an ACME plan");
        };
        assert_eq!(acme_plan.account_secret.to_string(), "shop/acct");
        assert!(matches!(
            plan(
                &ns_key(),
                &IssuerSpec {
                    ca: None,
                    acme: None
                },
                "x"
            ),
            IssuerPlan::Invalid(_)
        ));
    }

    #[test]
    fn a_ca_secret_loads_or_says_what_to_fix_without_the_key() {
        let ca = test_ca();
        let key = ca.key_pem().expose().to_owned();
        let good = secret_with(&[(CERT_KEY, ca.certificate_pem()), (KEY_KEY, &key)]);
        let loaded = evaluate_ca_secret(Some(&good), "shop", "ca").unwrap();
        assert_eq!(loaded.certificate_pem(), ca.certificate_pem());

        let missing = evaluate_ca_secret(None, "shop", "ca").unwrap_err();
        assert_eq!(missing.reason, "SecretNotFound");
        assert!(missing.message.contains("shop/ca"));

        let incomplete = evaluate_ca_secret(
            Some(&secret_with(&[(CERT_KEY, ca.certificate_pem())])),
            "shop",
            "ca",
        )
        .unwrap_err();
        assert_eq!(incomplete.reason, "SecretIncomplete");
        assert!(incomplete.message.contains(KEY_KEY));

        let other = test_ca();
        let mismatch = secret_with(&[
            (CERT_KEY, ca.certificate_pem()),
            (KEY_KEY, other.key_pem().expose()),
        ]);
        let why = evaluate_ca_secret(Some(&mismatch), "shop", "ca").unwrap_err();
        assert_eq!(why.reason, "InvalidCA");
        assert!(
            why.message.contains("shop/ca") && why.message.contains("does not match"),
            "{}",
            why.message
        );

        // A leaf is not a CA.
        let request = leasehold_certs::CertificateRequest::server(
            "leaf",
            &["leaf.example"],
            time::Duration::hours(1),
        );
        let leaf = ca
            .issue_with_generated_key(&request, time::OffsetDateTime::now_utc())
            .unwrap();
        let not_ca = secret_with(&[
            (CERT_KEY, &leaf.certificate_pem),
            (KEY_KEY, leaf.private_key.as_ref().unwrap().expose()),
        ]);
        assert_eq!(
            evaluate_ca_secret(Some(&not_ca), "shop", "ca")
                .unwrap_err()
                .reason,
            "InvalidCA"
        );

        // No message, status or Debug output carries the key.
        for why in [
            missing,
            incomplete,
            evaluate_ca_secret(Some(&mismatch), "shop", "ca").unwrap_err(),
        ] {
            let status = issuer_status(
                None,
                Some(IssuerType::Ca),
                &Err(why.clone()),
                Some(1),
                Timestamp::now(),
            );
            let text = format!(
                "{why:?} {} {}",
                why.message,
                serde_json::to_string(&status).unwrap()
            );
            for secret_key in [&key, other.key_pem().expose()] {
                let body = secret_key.lines().nth(1).unwrap();
                assert!(!text.contains(body), "key material leaked: {text}");
            }
        }
        assert!(!format!("{loaded:?}").contains(key.lines().nth(1).unwrap()));
    }

    #[test]
    fn the_generated_root_secret_is_a_tls_secret() {
        let ca = test_ca();
        let secret = self_signed_secret(&ca, "shop", "internal-ca", None);
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        let data = secret.data.as_ref().unwrap();
        assert_eq!(data.keys().collect::<Vec<_>>(), [CA_KEY, CERT_KEY, KEY_KEY]);
        // It loads back as the same CA: a restart reuses it.
        let again = evaluate_ca_secret(Some(&secret), "shop", "internal-ca").unwrap();
        assert_eq!(again.certificate_pem(), ca.certificate_pem());
        assert_eq!(
            self_signed_common_name(&ns_key()),
            "leasehold Issuer shop/internal"
        );
    }

    #[test]
    fn status_says_ready_or_why_not_with_the_generation() {
        let t0 = Timestamp::from_second(1_900_000_000).unwrap();
        let t1 = Timestamp::from_second(1_900_000_100).unwrap();
        let not_ready = Err(NotReadyReason {
            reason: "DirectoryUnreachable",
            message: "later".into(),
        });
        let s1 = issuer_status(None, Some(IssuerType::Acme), &not_ready, Some(3), t0);
        assert_eq!(s1.observed_generation, Some(3));
        let ready = &s1.conditions[0];
        assert_eq!(
            (
                ready.type_.as_str(),
                ready.status.as_str(),
                ready.reason.as_str()
            ),
            ("Ready", "False", "DirectoryUnreachable")
        );
        assert_eq!(ready.observed_generation, Some(3));
        let json = serde_json::to_value(&s1).unwrap();
        assert_eq!(json["type"], "ACME");
        // Same outcome later: unchanged, nothing to write.
        let s2 = issuer_status(Some(&s1), Some(IssuerType::Acme), &not_ready, Some(3), t1);
        assert!(!status_changed(Some(&s1), &s2));
        assert_eq!(
            s2.conditions[0].last_transition_time,
            s1.conditions[0].last_transition_time
        );
        // Ready now: the transition time moves.
        let s3 = issuer_status(
            Some(&s2),
            Some(IssuerType::Ca),
            &Ok("signing".into()),
            Some(4),
            t1,
        );
        assert!(status_changed(Some(&s2), &s3));
        assert_eq!(s3.conditions[0].status, "True");
        assert_eq!(s3.conditions[0].last_transition_time, k8s_time(t1));
        assert!(status_changed(None, &s3));
    }

    #[test]
    fn mappers_find_issuers_of_a_secret() {
        let issuer: Issuer = serde_json::from_value(serde_json::json!({
            "apiVersion": "leasehold.dev/v1alpha1", "kind": "Issuer",
            "metadata": {"name": "internal", "namespace": "shop"},
            "spec": {"ca": {"secretRef": {"name": "ca"}}}
        }))
        .unwrap();
        let generated: Issuer = serde_json::from_value(serde_json::json!({
            "apiVersion": "leasehold.dev/v1alpha1", "kind": "Issuer",
            "metadata": {"name": "gen", "namespace": "shop"},
            "spec": {"ca": {"selfSigned": true}}
        }))
        .unwrap();
        let issuers = vec![Arc::new(issuer), Arc::new(generated)];
        let names = |refs: Vec<kube::runtime::reflector::ObjectRef<Issuer>>| {
            refs.into_iter().map(|r| r.name).collect::<Vec<_>>()
        };
        assert_eq!(
            names(issuers_for_secret(&issuers, Some("shop"), "ca")),
            ["internal"]
        );
        assert_eq!(
            names(issuers_for_secret(&issuers, Some("shop"), "gen-ca")),
            ["gen"]
        );
        assert!(issuers_for_secret(&issuers, Some("other"), "ca").is_empty());
        let cluster: ClusterIssuer = serde_json::from_value(serde_json::json!({
            "apiVersion": "leasehold.dev/v1alpha1", "kind": "ClusterIssuer",
            "metadata": {"name": "root"},
            "spec": {"ca": {"secretRef": {"name": "root-ca"}}}
        }))
        .unwrap();
        let acme: Issuer = serde_json::from_value(serde_json::json!({
            "apiVersion": "leasehold.dev/v1alpha1", "kind": "Issuer",
            "metadata": {"name": "le", "namespace": "shop"},
            "spec": {"acme": {"directoryUrl": "https://acme.example/dir",
                              "accountKeySecretRef": {"name": "le-account"},
                              "externalAccountBinding": {"keyId": "k", "keySecretRef": {"name": "le-eab"}}}}
        }))
        .unwrap();
        let acme = vec![Arc::new(acme)];
        for secret in ["le-account", "le-eab"] {
            assert_eq!(
                names(issuers_for_secret(&acme, Some("shop"), secret)),
                ["le"]
            );
        }
        assert!(issuers_for_secret(&acme, Some("shop"), "ca").is_empty());
        let acme_cluster: ClusterIssuer = serde_json::from_value(serde_json::json!({
            "apiVersion": "leasehold.dev/v1alpha1", "kind": "ClusterIssuer",
            "metadata": {"name": "le"},
            "spec": {"acme": {"directoryUrl": "https://acme.example/dir",
                              "accountKeySecretRef": {"name": "le-account", "namespace": "pki"}}}
        }))
        .unwrap();
        let acme_cluster = vec![Arc::new(acme_cluster)];
        assert_eq!(
            cluster_issuers_for_secret(&acme_cluster, "leasehold", Some("pki"), "le-account").len(),
            1
        );
        assert!(
            cluster_issuers_for_secret(&acme_cluster, "leasehold", Some("leasehold"), "le-account")
                .is_empty()
        );
        let cluster = vec![Arc::new(cluster)];
        assert_eq!(
            cluster_issuers_for_secret(&cluster, "leasehold", Some("leasehold"), "root-ca").len(),
            1
        );
        assert!(
            cluster_issuers_for_secret(&cluster, "leasehold", Some("shop"), "root-ca").is_empty()
        );
    }

    #[test]
    fn a_relist_forgets_issuers_deleted_meanwhile() {
        use kube::runtime::watcher::Event;
        let registry = IssuerRegistry::without_crl_refresh();
        let key = |ns: &str, name: &str| IssuerKey::Namespaced {
            namespace: ns.into(),
            name: name.into(),
        };
        for k in [
            key("shop", "kept"),
            key("shop", "gone"),
            key("other", "elsewhere"),
        ] {
            registry.set_not_ready(k, "SecretNotFound", "x");
        }
        registry.set_not_ready(
            IssuerKey::Cluster {
                name: "root".into(),
            },
            "SecretNotFound",
            "x",
        );
        let mut sync = RegistrySync::issuers(registry.clone(), Some("shop".into()));
        let key_of = |name: &&str| Some(key("shop", name));
        sync.observe(&Event::Init, key_of);
        sync.observe(&Event::InitApply("kept"), key_of);
        sync.observe(&Event::InitDone, key_of);
        let found = |k: IssuerKey| {
            !matches!(
                registry.resolve_key(&k),
                Err(IssuerNotReady::NotFound { .. })
            )
        };
        assert!(found(key("shop", "kept")));
        assert!(!found(key("shop", "gone")));
        assert!(
            found(key("other", "elsewhere")),
            "another watch's namespace"
        );
        assert!(found(IssuerKey::Cluster {
            name: "root".into()
        }));
        sync.observe(&Event::Delete("kept"), key_of);
        assert!(!found(key("shop", "kept")));

        let mut cluster = RegistrySync::cluster_issuers(registry.clone());
        let cluster_key = |_: &&str| None;
        cluster.observe(&Event::Init, cluster_key);
        cluster.observe(&Event::InitDone, cluster_key);
        assert!(!found(IssuerKey::Cluster {
            name: "root".into()
        }));
        assert!(found(key("other", "elsewhere")));
    }

    #[test]
    fn an_issuer_without_a_local_ca_is_kept_by_identity_and_serves_no_crl() {
        let registry = IssuerRegistry::without_crl_refresh();
        let mut changes = registry.changes();
        let ca = Arc::new(test_ca());
        let issuer: Arc<dyn CertificateIssuer> = Arc::new(CaIssuer::new(
            ca,
            Arc::new(leasehold_certs::issuer::MemoryLedger::default()),
        ));
        registry.set_ready_issuer(ns_key(), issuer.clone(), "acme\nhttps://ca/acct/1".into());
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        assert!(registry.is_ready_as(&ns_key(), "acme\nhttps://ca/acct/1"));
        // The same identity again: the entry is kept, nobody is woken.
        registry.set_ready_issuer(ns_key(), issuer.clone(), "acme\nhttps://ca/acct/1".into());
        assert!(!changes.has_changed().unwrap());
        registry.set_ready_issuer(ns_key(), issuer, "acme\nhttps://ca/acct/2".into());
        assert!(changes.has_changed().unwrap());
        assert!(registry.resolve_key(&ns_key()).is_ok());
        for err in [
            registry.ca_pem_by_key(&ns_key()).unwrap_err(),
            registry.crl_pem_by_key(&ns_key()).unwrap_err(),
        ] {
            assert_eq!(err.reason(), "NotACaIssuer");
            assert!(err.to_string().contains("ACME issuer"), "{err}");
        }
    }

    #[tokio::test]
    async fn the_registry_resolves_ready_issuers_and_says_why_not() {
        let registry = IssuerRegistry::new();
        let mut changes = registry.changes();
        let lease_ref = |kind: IssuerKind, name: &str| IssuerRef {
            name: name.into(),
            kind,
        };
        let err = registry
            .resolve("shop", &lease_ref(IssuerKind::Issuer, "internal"))
            .err()
            .unwrap();
        assert_eq!(err.reason(), "IssuerNotFound");
        assert!(
            err.to_string()
                .contains("Issuer shop/internal does not exist"),
            "{err}"
        );

        registry.set_not_ready(ns_key(), "SecretNotFound", "Secret shop/ca does not exist");
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        let err = registry
            .resolve("shop", &lease_ref(IssuerKind::Issuer, "internal"))
            .err()
            .unwrap();
        assert_eq!(err.reason(), "SecretNotFound");
        assert!(
            err.to_string().contains("Secret shop/ca does not exist"),
            "{err}"
        );
        // The same reason again is no change.
        registry.set_not_ready(ns_key(), "SecretNotFound", "Secret shop/ca does not exist");
        assert!(!changes.has_changed().unwrap());

        let ca = test_ca();
        let ca_pem = ca.certificate_pem().to_owned();
        registry.set_ready(ns_key(), ca, Arc::new(MemoryLedgerStore::default()));
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        let issuer = registry
            .resolve("shop", &lease_ref(IssuerKind::Issuer, "internal"))
            .unwrap();
        assert_eq!(issuer.kind(), "CA");
        assert_eq!(
            registry
                .ca_pem("shop", &lease_ref(IssuerKind::Issuer, "internal"))
                .unwrap(),
            ca_pem
        );
        // Another namespace's lease does not see it; a ClusterIssuer of that name neither.
        assert!(
            registry
                .resolve("other", &lease_ref(IssuerKind::Issuer, "internal"))
                .is_err()
        );
        assert!(
            registry
                .resolve("shop", &lease_ref(IssuerKind::ClusterIssuer, "internal"))
                .is_err()
        );
        // The refresh task signs the first CRL.
        let key = ns_key();
        let crl = loop {
            if let Some(crl) = registry.crl_pem_by_key(&key).unwrap() {
                break crl;
            }
            tokio::task::yield_now().await;
        };
        assert!(crl.starts_with("-----BEGIN X509 CRL-----"));

        registry.remove(&key);
        assert!(changes.has_changed().unwrap());
        assert!(matches!(
            registry.resolve_key(&key),
            Err(IssuerNotReady::NotFound { .. })
        ));
    }
}
