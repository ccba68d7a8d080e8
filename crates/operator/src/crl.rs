//! The revocation ledger of a `ca` issuer, kept in a ConfigMap, and its CRL.
//!
//! ConfigMap `<issuer>-crl` (the issuer's namespace; the controller's for a
//! ClusterIssuer) holds:
//! - `revoked.json`: the [`RevocationList`] (the serial index, and the last CRL number);
//! - `ca.crl`: the PEM CRL signed by the CA over that list;
//! - annotations with the CRL's window (`thisUpdate`, `nextUpdate`) and entry count, so a
//!   restarted controller knows when the CRL must be signed again without parsing it.
//!
//! Every write is fenced on the `resourceVersion` read: a concurrent writer makes the
//! write fail with 409 Conflict, and the change is re-applied on a fresh read a few
//! times before the caller is told [`IssuerError::Unavailable`]. The decision (what the
//! next document is) is pure: [`with_revocation`] and [`refreshed`].

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Api;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use leasehold_api::FIELD_MANAGER;
use leasehold_certs::issuer::IssuerError;
use leasehold_certs::{CertificateAuthority, CrlError, RevocationEntry, RevocationList, SignedCrl};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::secrets::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};

/// ConfigMap key of the revoked serials (JSON).
pub const REVOKED_KEY: &str = "revoked.json";
/// ConfigMap key of the signed CRL (PEM).
pub const CRL_KEY: &str = "ca.crl";
/// Annotation: `thisUpdate` of the CRL in `ca.crl` (RFC 3339).
pub const THIS_UPDATE_ANNOTATION: &str = "leasehold.dev/crl-this-update";
/// Annotation: `nextUpdate` of the CRL in `ca.crl` (RFC 3339).
pub const NEXT_UPDATE_ANNOTATION: &str = "leasehold.dev/crl-next-update";
/// Annotation: how many entries the CRL in `ca.crl` lists.
pub const ENTRIES_ANNOTATION: &str = "leasehold.dev/crl-entries";
/// Label naming the issuer a ledger ConfigMap belongs to.
pub const ISSUER_LABEL: &str = "leasehold.dev/issuer";

/// How long a signed CRL is valid; it is signed again at two thirds of that.
pub const CRL_VALIDITY: time::Duration = time::Duration::hours(24);
/// Writes tried before a revocation gives up on a contended ConfigMap.
pub const WRITE_ATTEMPTS: usize = 5;
/// Longest sleep of the refresh task (it re-reads the ConfigMap then).
pub const MAX_REFRESH_SLEEP: Duration = Duration::from_secs(3600);
/// Sleep of the refresh task after a failed refresh.
pub const REFRESH_RETRY: Duration = Duration::from_secs(30);

/// The name of the ledger ConfigMap of issuer `issuer_name`.
pub fn configmap_name(issuer_name: &str) -> String {
    format!("{issuer_name}-crl")
}

/// What the ledger ConfigMap holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerDocument {
    pub list: RevocationList,
    /// The CRL last signed over `list`; `None` until the first one.
    pub crl: Option<SignedCrl>,
}

/// A document as read, with the `resourceVersion` to fence the next write on.
#[derive(Clone, Debug)]
pub struct StoredLedger {
    pub document: LedgerDocument,
    pub resource_version: String,
}

/// Why reading or writing the ledger failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerStoreError {
    /// Someone else wrote in between (409): read again and re-apply.
    #[error("the ledger changed since it was read")]
    Conflict,
    #[error("{0}")]
    Unavailable(String),
}

/// Where the ledger document lives (a ConfigMap; in memory in tests).
#[async_trait]
pub trait LedgerStore: Send + Sync {
    /// `namespace/name` of the ConfigMap, for messages.
    fn describe(&self) -> String;
    /// The current document, `None` if there is none yet.
    async fn read(&self) -> Result<Option<StoredLedger>, LedgerStoreError>;
    /// Write `document` if the stored one is still at `expected` (`None`: create it;
    /// [`LedgerStoreError::Conflict`] if it exists by now).
    async fn write(
        &self,
        document: &LedgerDocument,
        expected: Option<&str>,
    ) -> Result<(), LedgerStoreError>;
}

/// Drop entries of certificates that have expired by `now`: no relying party accepts
/// them anyway, and the CRL stays bounded. Returns whether any was dropped.
pub fn prune_expired(list: &mut RevocationList, now: OffsetDateTime) -> bool {
    let before = list.entries.len();
    list.entries
        .retain(|entry| entry.not_after.is_none_or(|not_after| not_after > now));
    list.entries.len() != before
}

/// The document after revoking `entry`, with a freshly signed CRL; `None` when the
/// serial is already listed and the CRL current (nothing to write).
pub fn with_revocation(
    current: Option<&LedgerDocument>,
    entry: RevocationEntry,
    ca: &CertificateAuthority,
    now: OffsetDateTime,
    validity: time::Duration,
) -> Result<Option<LedgerDocument>, CrlError> {
    let mut list = current.map(|doc| doc.list.clone()).unwrap_or_default();
    let serial = entry.serial.to_ascii_lowercase();
    if list.is_revoked(&serial) {
        return refreshed(current, ca, now, validity);
    }
    prune_expired(&mut list, now);
    if entry.not_after.is_none_or(|not_after| not_after > now) {
        list.entries.push(RevocationEntry { serial, ..entry });
    }
    let crl = list.sign(ca, now, validity)?;
    Ok(Some(LedgerDocument {
        list,
        crl: Some(crl),
    }))
}

/// The document with a newly signed CRL if the stored one must be replaced (none yet,
/// refresh time reached, or the list changed); `None` if it is still good.
pub fn refreshed(
    current: Option<&LedgerDocument>,
    ca: &CertificateAuthority,
    now: OffsetDateTime,
    validity: time::Duration,
) -> Result<Option<LedgerDocument>, CrlError> {
    let mut list = current.map(|doc| doc.list.clone()).unwrap_or_default();
    let pruned = prune_expired(&mut list, now);
    let stale = match current.and_then(|doc| doc.crl.as_ref()) {
        Some(crl) => pruned || crl.needs_refresh(&list, now),
        None => true,
    };
    if !stale {
        return Ok(None);
    }
    let crl = list.sign(ca, now, validity)?;
    Ok(Some(LedgerDocument {
        list,
        crl: Some(crl),
    }))
}

/// How long the refresh task sleeps after a CRL valid per `crl` was stored: until its
/// refresh time, at least a second, at most [`MAX_REFRESH_SLEEP`].
pub fn refresh_sleep(crl: &SignedCrl, now: OffsetDateTime) -> Duration {
    let left = crl.refresh_at() - now;
    let left = Duration::try_from(left).unwrap_or(Duration::ZERO);
    left.clamp(Duration::from_secs(1), MAX_REFRESH_SLEEP)
}

/// A clock (tests use a fake one).
pub type Clock = Arc<dyn Fn() -> OffsetDateTime + Send + Sync>;

/// The [`leasehold_certs::RevocationLedger`] of one `ca` issuer over a [`LedgerStore`];
/// re-signs the CRL on every change and keeps the last CRL in memory for HTTP.
pub struct ConfigMapLedger {
    store: Arc<dyn LedgerStore>,
    ca: Arc<CertificateAuthority>,
    clock: Clock,
    validity: time::Duration,
    published: RwLock<Option<String>>,
}

impl std::fmt::Debug for ConfigMapLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigMapLedger")
            .field("store", &self.store.describe())
            .finish_non_exhaustive()
    }
}

impl ConfigMapLedger {
    pub fn new(store: Arc<dyn LedgerStore>, ca: Arc<CertificateAuthority>) -> Self {
        Self {
            store,
            ca,
            clock: Arc::new(OffsetDateTime::now_utc),
            validity: CRL_VALIDITY,
            published: RwLock::new(None),
        }
    }

    /// Use another clock (tests).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Sign CRLs valid for `validity`.
    pub fn with_validity(mut self, validity: time::Duration) -> Self {
        self.validity = validity;
        self
    }

    /// The last CRL (PEM) this ledger read or wrote; `None` before the first refresh.
    pub fn crl_pem(&self) -> Option<String> {
        self.published
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn publish(&self, document: &LedgerDocument) {
        if let Some(crl) = &document.crl {
            *self.published.write().unwrap_or_else(|e| e.into_inner()) = Some(crl.pem.clone());
        }
    }

    fn unavailable(&self, e: impl std::fmt::Display) -> IssuerError {
        IssuerError::Unavailable(format!(
            "revocation ledger ConfigMap {}: {e}",
            self.store.describe()
        ))
    }

    /// Read, decide with `next`, write fenced on the version read; retried on conflict.
    /// Returns the document now stored.
    async fn update(
        &self,
        next: impl Fn(Option<&LedgerDocument>) -> Result<Option<LedgerDocument>, CrlError>,
    ) -> Result<LedgerDocument, IssuerError> {
        for _ in 0..WRITE_ATTEMPTS {
            let stored = self.store.read().await.map_err(|e| self.unavailable(e))?;
            let current = stored.as_ref().map(|s| &s.document);
            let Some(document) = next(current).map_err(|e| self.unavailable(e))? else {
                let document = current.cloned().unwrap_or_default();
                self.publish(&document);
                return Ok(document);
            };
            let expected = stored.as_ref().map(|s| s.resource_version.as_str());
            match self.store.write(&document, expected).await {
                Ok(()) => {
                    self.publish(&document);
                    return Ok(document);
                }
                Err(LedgerStoreError::Conflict) => continue,
                Err(e) => return Err(self.unavailable(e)),
            }
        }
        Err(self.unavailable(format_args!(
            "changed under every one of {WRITE_ATTEMPTS} attempts to write it"
        )))
    }

    /// Sign a new CRL if the stored one is missing or due; returns how long until the
    /// next refresh is due.
    pub async fn refresh(&self) -> Result<Duration, IssuerError> {
        let document = self
            .update(|current| refreshed(current, &self.ca, (self.clock)(), self.validity))
            .await?;
        Ok(match &document.crl {
            Some(crl) => refresh_sleep(crl, (self.clock)()),
            None => REFRESH_RETRY,
        })
    }

    /// Keep the CRL fresh until the task is aborted.
    pub async fn refresh_forever(self: Arc<Self>) {
        loop {
            let sleep = match self.refresh().await {
                Ok(sleep) => sleep,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot refresh the CRL; retrying");
                    REFRESH_RETRY
                }
            };
            tokio::time::sleep(sleep).await;
        }
    }
}

#[async_trait]
impl leasehold_certs::RevocationLedger for ConfigMapLedger {
    async fn revoke(&self, entry: RevocationEntry) -> Result<(), IssuerError> {
        self.update(|current| {
            with_revocation(
                current,
                entry.clone(),
                &self.ca,
                (self.clock)(),
                self.validity,
            )
        })
        .await
        .map(|_| ())
    }

    async fn list(&self) -> Result<RevocationList, IssuerError> {
        let stored = self.store.read().await.map_err(|e| self.unavailable(e))?;
        Ok(stored.map(|s| s.document.list).unwrap_or_default())
    }
}

/// The ConfigMap form of a document.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigMapParts {
    pub data: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// The ConfigMap form of a document (data and annotations).
pub fn document_to_configmap_parts(document: &LedgerDocument) -> Result<ConfigMapParts, String> {
    let mut data = BTreeMap::new();
    let mut annotations = BTreeMap::new();
    data.insert(
        REVOKED_KEY.to_owned(),
        serde_json::to_string_pretty(&document.list).map_err(|e| e.to_string())?,
    );
    if let Some(crl) = &document.crl {
        data.insert(CRL_KEY.to_owned(), crl.pem.clone());
        let format = |t: OffsetDateTime| t.format(&Rfc3339).map_err(|e| e.to_string());
        annotations.insert(THIS_UPDATE_ANNOTATION.to_owned(), format(crl.this_update)?);
        annotations.insert(NEXT_UPDATE_ANNOTATION.to_owned(), format(crl.next_update)?);
        annotations.insert(ENTRIES_ANNOTATION.to_owned(), crl.entries.to_string());
    }
    Ok(ConfigMapParts { data, annotations })
}

/// The document a ConfigMap holds. A missing or unreadable CRL window reads as no CRL
/// (it is signed again); an unreadable list is an error (never silently forget
/// revocations).
pub fn document_from_configmap(cm: &ConfigMap) -> Result<LedgerDocument, String> {
    let data = cm.data.clone().unwrap_or_default();
    let list: RevocationList = match data.get(REVOKED_KEY) {
        Some(text) => serde_json::from_str(text).map_err(|e| format!("{REVOKED_KEY}: {e}"))?,
        None => RevocationList::default(),
    };
    let annotations = cm.metadata.annotations.clone().unwrap_or_default();
    let time_of = |key: &str| {
        annotations
            .get(key)
            .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
    };
    let crl = match (
        data.get(CRL_KEY),
        time_of(THIS_UPDATE_ANNOTATION),
        time_of(NEXT_UPDATE_ANNOTATION),
        annotations
            .get(ENTRIES_ANNOTATION)
            .and_then(|n| n.parse::<usize>().ok()),
    ) {
        (Some(pem), Some(this_update), Some(next_update), Some(entries)) => Some(SignedCrl {
            pem: pem.clone(),
            crl_number: list.last_crl_number,
            this_update,
            next_update,
            entries,
        }),
        _ => None,
    };
    Ok(LedgerDocument { list, crl })
}

/// The ledger ConfigMap on the API server.
#[derive(Clone)]
pub struct KubeLedgerStore {
    api: Api<ConfigMap>,
    namespace: String,
    name: String,
    issuer_name: String,
    owner: Option<OwnerReference>,
}

impl std::fmt::Debug for KubeLedgerStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeLedgerStore")
            .field("configmap", &self.describe())
            .finish_non_exhaustive()
    }
}

impl KubeLedgerStore {
    /// The ledger of issuer `issuer_name`, in `namespace`, owned by `owner` (the issuer).
    pub fn new(
        client: kube::Client,
        namespace: &str,
        issuer_name: &str,
        owner: Option<OwnerReference>,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: configmap_name(issuer_name),
            issuer_name: issuer_name.to_owned(),
            owner,
        }
    }

    fn configmap(
        &self,
        document: &LedgerDocument,
        resource_version: Option<&str>,
    ) -> Result<ConfigMap, LedgerStoreError> {
        let ConfigMapParts { data, annotations } =
            document_to_configmap_parts(document).map_err(LedgerStoreError::Unavailable)?;
        Ok(ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                resource_version: resource_version.map(str::to_owned),
                labels: Some(BTreeMap::from([
                    (MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned()),
                    (ISSUER_LABEL.to_owned(), self.issuer_name.clone()),
                ])),
                annotations: Some(annotations),
                owner_references: self.owner.clone().map(|o| vec![o]),
                ..ObjectMeta::default()
            },
            data: Some(data),
            ..ConfigMap::default()
        })
    }
}

fn kube_store_error(e: kube::Error) -> LedgerStoreError {
    match e {
        kube::Error::Api(s) if s.code == 409 => LedgerStoreError::Conflict,
        kube::Error::Api(s) => LedgerStoreError::Unavailable(format!("{} ({})", s.message, s.code)),
        other => LedgerStoreError::Unavailable(other.to_string()),
    }
}

#[async_trait]
impl LedgerStore for KubeLedgerStore {
    fn describe(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    async fn read(&self) -> Result<Option<StoredLedger>, LedgerStoreError> {
        let Some(cm) = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(kube_store_error)?
        else {
            return Ok(None);
        };
        let document = document_from_configmap(&cm).map_err(LedgerStoreError::Unavailable)?;
        Ok(Some(StoredLedger {
            document,
            resource_version: cm.metadata.resource_version.unwrap_or_default(),
        }))
    }

    async fn write(
        &self,
        document: &LedgerDocument,
        expected: Option<&str>,
    ) -> Result<(), LedgerStoreError> {
        match expected {
            // A create fails with 409 AlreadyExists if another writer got there first.
            None => {
                let cm = self.configmap(document, None)?;
                self.api
                    .create(&PostParams::default(), &cm)
                    .await
                    .map_err(kube_store_error)?;
            }
            // Server-side apply with the resourceVersion read: the API server refuses it
            // with 409 Conflict if the ConfigMap changed since.
            Some(resource_version) => {
                let mut cm = self.configmap(document, Some(resource_version))?;
                cm.metadata.namespace = None;
                let mut body = serde_json::to_value(&cm)
                    .map_err(|e| LedgerStoreError::Unavailable(e.to_string()))?;
                body["apiVersion"] = "v1".into();
                body["kind"] = "ConfigMap".into();
                self.api
                    .patch(
                        &self.name,
                        &PatchParams::apply(FIELD_MANAGER).force(),
                        &Patch::Apply(&body),
                    )
                    .await
                    .map_err(kube_store_error)?;
            }
        }
        Ok(())
    }
}

/// A ledger store in memory with a version counter (tests; local mode).
#[derive(Debug, Default)]
pub struct MemoryLedgerStore {
    state: std::sync::Mutex<Option<(LedgerDocument, u64)>>,
    /// Make the next this-many writes fail with a conflict (as if someone else wrote).
    pub conflicts_to_inject: std::sync::atomic::AtomicUsize,
    /// Writes that succeeded.
    pub writes: std::sync::atomic::AtomicUsize,
}

impl MemoryLedgerStore {
    pub fn document(&self) -> Option<LedgerDocument> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(doc, _)| doc.clone())
    }
}

#[async_trait]
impl LedgerStore for MemoryLedgerStore {
    fn describe(&self) -> String {
        "memory/ledger".to_owned()
    }

    async fn read(&self) -> Result<Option<StoredLedger>, LedgerStoreError> {
        Ok(self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(document, version)| StoredLedger {
                document: document.clone(),
                resource_version: version.to_string(),
            }))
    }

    async fn write(
        &self,
        document: &LedgerDocument,
        expected: Option<&str>,
    ) -> Result<(), LedgerStoreError> {
        use std::sync::atomic::Ordering;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if self
            .conflicts_to_inject
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            // Someone else wrote: the version moves on.
            if let Some((_, version)) = state.as_mut() {
                *version += 1;
            }
            return Err(LedgerStoreError::Conflict);
        }
        let current = state.as_ref().map(|(_, version)| version.to_string());
        if current.as_deref() != expected {
            return Err(LedgerStoreError::Conflict);
        }
        let next = state.as_ref().map_or(1, |(_, version)| version + 1);
        *state = Some((document.clone(), next));
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::Ordering;

    use leasehold_certs::issuer::NoJournal;
    use leasehold_certs::{
        CaIssuer, CertificateIssuer, CertificateRequest, IssueOrder, KeyAlgorithm,
        RevocationLedger, RevocationReason, RevokeOrder, csr_for, generate_key, new_serial,
    };

    use super::*;

    fn t0() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_900_000_000).unwrap()
    }

    fn ca() -> Arc<CertificateAuthority> {
        Arc::new(
            CertificateAuthority::self_signed(
                "test CA",
                KeyAlgorithm::EcdsaP256,
                t0() - time::Duration::days(1),
                time::Duration::days(3650),
            )
            .unwrap(),
        )
    }

    /// A clock tests move by hand.
    fn fake_clock() -> (Arc<Mutex<OffsetDateTime>>, Clock) {
        let now = Arc::new(Mutex::new(t0()));
        let read = now.clone();
        (now, Arc::new(move || *read.lock().unwrap()))
    }

    fn entry(serial: &str, not_after: Option<OffsetDateTime>) -> RevocationEntry {
        RevocationEntry {
            serial: serial.into(),
            revoked_at: t0(),
            reason: RevocationReason::Superseded,
            not_after,
        }
    }

    #[test]
    fn a_revocation_signs_a_crl_listing_it_and_a_repeat_writes_nothing() {
        let ca = ca();
        let doc = with_revocation(None, entry("0A", None), &ca, t0(), CRL_VALIDITY)
            .unwrap()
            .unwrap();
        assert!(doc.list.is_revoked("0a"));
        let crl = doc.crl.clone().unwrap();
        assert_eq!((crl.entries, crl.crl_number), (1, 1));
        assert_eq!(crl.next_update, t0() + CRL_VALIDITY);
        let again =
            with_revocation(Some(&doc), entry("0a", None), &ca, t0(), CRL_VALIDITY).unwrap();
        assert_eq!(again, None, "already revoked and the CRL is current");
    }

    #[test]
    fn expired_certificates_leave_the_crl() {
        let ca = ca();
        let soon = t0() + time::Duration::hours(1);
        let doc = with_revocation(None, entry("01", Some(soon)), &ca, t0(), CRL_VALIDITY)
            .unwrap()
            .unwrap();
        let later = t0() + time::Duration::hours(2);
        let doc = with_revocation(Some(&doc), entry("02", None), &ca, later, CRL_VALIDITY)
            .unwrap()
            .unwrap();
        assert!(!doc.list.is_revoked("01"));
        assert!(doc.list.is_revoked("02"));
        assert_eq!(doc.crl.unwrap().entries, 1);
        // An already expired certificate is not even added.
        let doc = with_revocation(None, entry("03", Some(t0())), &ca, later, CRL_VALIDITY)
            .unwrap()
            .unwrap();
        assert!(doc.list.entries.is_empty());
    }

    #[test]
    fn refresh_is_due_at_two_thirds_of_the_window() {
        let ca = ca();
        let doc = refreshed(None, &ca, t0(), CRL_VALIDITY).unwrap().unwrap();
        let crl = doc.crl.clone().unwrap();
        assert_eq!(crl.refresh_at(), t0() + time::Duration::hours(16));
        assert_eq!(
            refresh_sleep(&crl, t0()),
            Duration::from_secs(3600),
            "capped at MAX_REFRESH_SLEEP"
        );
        assert_eq!(
            refresh_sleep(&crl, t0() + time::Duration::minutes(15 * 60 + 30)),
            Duration::from_secs(30 * 60)
        );
        assert_eq!(
            refresh_sleep(&crl, t0() + time::Duration::hours(20)),
            Duration::from_secs(1)
        );
        let just_before = t0() + time::Duration::hours(16) - time::Duration::seconds(1);
        assert_eq!(
            refreshed(Some(&doc), &ca, just_before, CRL_VALIDITY).unwrap(),
            None
        );
        let due = refreshed(
            Some(&doc),
            &ca,
            t0() + time::Duration::hours(16),
            CRL_VALIDITY,
        )
        .unwrap()
        .unwrap();
        assert_eq!(due.crl.unwrap().crl_number, 2);
    }

    #[test]
    fn the_configmap_form_round_trips() {
        let ca = ca();
        let doc = with_revocation(None, entry("0abc", None), &ca, t0(), CRL_VALIDITY)
            .unwrap()
            .unwrap();
        let parts = document_to_configmap_parts(&doc).unwrap();
        assert!(parts.data[CRL_KEY].starts_with("-----BEGIN X509 CRL-----"));
        let cm = ConfigMap {
            metadata: ObjectMeta {
                annotations: Some(parts.annotations),
                ..ObjectMeta::default()
            },
            data: Some(parts.data.clone()),
            ..ConfigMap::default()
        };
        assert_eq!(document_from_configmap(&cm).unwrap(), doc);
        // Without the window annotations the CRL reads as absent (signed again)...
        let bare = ConfigMap {
            data: Some(parts.data.clone()),
            ..ConfigMap::default()
        };
        assert_eq!(document_from_configmap(&bare).unwrap().crl, None);
        // ...but an unreadable list is an error, never an empty list.
        let mut broken = parts.data;
        broken.insert(REVOKED_KEY.into(), "{not json".into());
        let broken = ConfigMap {
            data: Some(broken),
            ..ConfigMap::default()
        };
        assert!(document_from_configmap(&broken).is_err());
    }

    #[tokio::test]
    async fn the_refresh_task_logic_follows_a_fake_clock() {
        let store = Arc::new(MemoryLedgerStore::default());
        let (now, clock) = fake_clock();
        let ledger = ConfigMapLedger::new(store.clone(), ca()).with_clock(clock);
        assert_eq!(ledger.crl_pem(), None);
        // First refresh signs; sleeps the capped hour.
        assert_eq!(ledger.refresh().await.unwrap(), MAX_REFRESH_SLEEP);
        assert_eq!(store.writes.load(Ordering::SeqCst), 1);
        assert!(ledger.crl_pem().is_some());
        // An hour later nothing is due: no write.
        *now.lock().unwrap() = t0() + time::Duration::hours(1);
        ledger.refresh().await.unwrap();
        assert_eq!(store.writes.load(Ordering::SeqCst), 1);
        // 15h30m in: sleeps until the 16h refresh time.
        *now.lock().unwrap() = t0() + time::Duration::minutes(15 * 60 + 30);
        assert_eq!(
            ledger.refresh().await.unwrap(),
            Duration::from_secs(30 * 60)
        );
        assert_eq!(store.writes.load(Ordering::SeqCst), 1);
        // At 16h a new CRL is signed, valid for 24h from now.
        *now.lock().unwrap() = t0() + time::Duration::hours(16);
        ledger.refresh().await.unwrap();
        assert_eq!(store.writes.load(Ordering::SeqCst), 2);
        let crl = store.document().unwrap().crl.unwrap();
        assert_eq!(crl.crl_number, 2);
        assert_eq!(crl.next_update, t0() + time::Duration::hours(40));
    }

    #[tokio::test]
    async fn revoke_retries_conflicts_then_gives_up() {
        let store = Arc::new(MemoryLedgerStore::default());
        let (_, clock) = fake_clock();
        let ledger = ConfigMapLedger::new(store.clone(), ca()).with_clock(clock);
        // Two concurrent writers: the first two writes conflict, the third lands.
        store.conflicts_to_inject.store(2, Ordering::SeqCst);
        ledger.revoke(entry("aa", None)).await.unwrap();
        assert!(ledger.list().await.unwrap().is_revoked("aa"));
        // Contended on every attempt: Unavailable, naming the ConfigMap, and nothing lost.
        store
            .conflicts_to_inject
            .store(WRITE_ATTEMPTS, Ordering::SeqCst);
        let err = ledger.revoke(entry("bb", None)).await.unwrap_err();
        assert!(matches!(err, IssuerError::Unavailable(_)), "{err}");
        assert!(err.is_transient());
        assert!(err.to_string().contains("memory/ledger"), "{err}");
        assert!(!ledger.list().await.unwrap().is_revoked("bb"));
        ledger.revoke(entry("bb", None)).await.unwrap();
        let list = ledger.list().await.unwrap();
        assert!(list.is_revoked("aa") && list.is_revoked("bb"));
        assert_eq!(store.document().unwrap().crl.unwrap().entries, 2);
    }

    #[tokio::test]
    async fn concurrent_revocations_all_land() {
        let store = Arc::new(MemoryLedgerStore::default());
        let ledger = Arc::new(ConfigMapLedger::new(store.clone(), ca()));
        let tasks: Vec<_> = (0..4)
            .map(|i| {
                let ledger = ledger.clone();
                tokio::spawn(async move { ledger.revoke(entry(&format!("0{i}"), None)).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(ledger.list().await.unwrap().entries.len(), 4);
    }

    fn openssl_verify(dir: &std::path::Path, crl_pem: &str) -> std::process::Output {
        std::fs::write(dir.join("crl.pem"), crl_pem).unwrap();
        std::process::Command::new("openssl")
            .args([
                "verify",
                "-crl_check",
                "-CAfile",
                "ca.pem",
                "-CRLfile",
                "crl.pem",
                "leaf.pem",
            ])
            .current_dir(dir)
            .output()
            .unwrap()
    }

    #[tokio::test]
    async fn openssl_rejects_a_leaf_once_revoked() {
        let ca = Arc::new(
            CertificateAuthority::self_signed(
                "openssl CA",
                KeyAlgorithm::EcdsaP256,
                OffsetDateTime::now_utc() - time::Duration::hours(1),
                time::Duration::days(30),
            )
            .unwrap(),
        );
        let store = Arc::new(MemoryLedgerStore::default());
        let ledger = Arc::new(ConfigMapLedger::new(store.clone(), ca.clone()));
        let issuer = CaIssuer::new(ca.clone(), ledger.clone());
        let request =
            CertificateRequest::server("app", &["app.shop.svc"], time::Duration::hours(1));
        let key = generate_key(KeyAlgorithm::EcdsaP256).unwrap();
        let csr = csr_for(&key, &request).unwrap();
        let serial = new_serial();
        let issued = issuer
            .issue(IssueOrder {
                request: &request,
                csr_pem: &csr,
                serial: &serial,
                journal: &NoJournal,
            })
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.certificate_pem()).unwrap();
        std::fs::write(dir.path().join("leaf.pem"), &issued.leaf_pem).unwrap();

        ledger.refresh().await.unwrap();
        let before = openssl_verify(dir.path(), &ledger.crl_pem().unwrap());
        assert!(
            before.status.success(),
            "not revoked yet: {}",
            String::from_utf8_lossy(&before.stdout) + String::from_utf8_lossy(&before.stderr)
        );

        issuer
            .revoke(RevokeOrder {
                serial: &issued.serial,
                leaf_pem: None,
                not_after: Some(issued.not_after),
                reason: RevocationReason::Superseded,
            })
            .await
            .unwrap();
        // What the ConfigMap holds, not only the in-memory copy.
        let stored = store.document().unwrap().crl.unwrap().pem;
        assert_eq!(Some(stored.clone()), ledger.crl_pem());
        let after = openssl_verify(dir.path(), &stored);
        let output =
            String::from_utf8_lossy(&after.stdout) + String::from_utf8_lossy(&after.stderr);
        assert!(!after.status.success(), "revoked, yet verified: {output}");
        assert!(output.contains("certificate revoked"), "{output}");
    }
}
