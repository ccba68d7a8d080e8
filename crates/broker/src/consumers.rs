//! Consumer evidence: which version each pod holds, written to the lease's
//! `status.consumers`.
//!
//! The controller leaves `status.consumers` out of its own status patches, so
//! the broker owns the list under its own field manager ([`FIELD_MANAGER`]).
//! Writes are coalesced per lease (at most one per interval) and skipped when
//! nothing changed; an acknowledgement returns before the write, which
//! follows within the interval (and is retried with backoff on failure).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Api;
use kube::api::{Patch, PatchParams};
use leasehold_api::{ConsumerStatus, SecretLease};
use tracing::{debug, warn};

use crate::error::BrokerError;

/// Field manager of the broker's status writes (never the controller's).
pub const FIELD_MANAGER: &str = "leasehold-broker";

/// `kind` of consumers that are pods holding a CSI volume.
pub const POD_KIND: &str = "Pod";

/// A namespaced object by name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjectRef {
    /// `namespace/name`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Records which version each pod holds.
#[async_trait]
pub trait ConsumerRecorder: Send + Sync {
    /// `pod` holds `version` of `lease`.
    async fn acknowledged(
        &self,
        lease: &ObjectRef,
        pod: &ObjectRef,
        version: u64,
    ) -> Result<(), BrokerError>;
    /// `pod` no longer holds anything of `lease`.
    async fn released(&self, lease: &ObjectRef, pod: &ObjectRef) -> Result<(), BrokerError>;
}

/// Where the consumer list of a lease is read from and written to.
#[async_trait]
pub trait ConsumerStore: Send + Sync {
    /// The lease's current `status.consumers`; `None` when the lease is gone.
    async fn load(&self, lease: &ObjectRef) -> Result<Option<Vec<ConsumerStatus>>, BrokerError>;
    /// Replaces the list. `Ok(false)` when the lease is gone.
    async fn apply(
        &self,
        lease: &ObjectRef,
        consumers: &[ConsumerStatus],
    ) -> Result<bool, BrokerError>;
}

/// [`ConsumerStore`] on the `SecretLease` status subresource, with
/// server-side apply under [`FIELD_MANAGER`].
#[derive(Clone)]
pub struct KubeConsumerStore {
    client: kube::Client,
}

impl std::fmt::Debug for KubeConsumerStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeConsumerStore").finish_non_exhaustive()
    }
}

impl KubeConsumerStore {
    /// Needs `get` on secretleases and `patch` on secretleases/status.
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }
}

/// The server-side apply body that sets `status.consumers` and nothing else.
pub fn consumers_patch(consumers: &[ConsumerStatus]) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": format!("{}/{}", leasehold_api::GROUP, leasehold_api::VERSION),
        "kind": "SecretLease",
        "status": { "consumers": consumers },
    })
}

#[async_trait]
impl ConsumerStore for KubeConsumerStore {
    async fn load(&self, lease: &ObjectRef) -> Result<Option<Vec<ConsumerStatus>>, BrokerError> {
        let found = Api::<SecretLease>::namespaced(self.client.clone(), &lease.namespace)
            .get_opt(&lease.name)
            .await
            .map_err(|e| BrokerError::kube("cannot read the SecretLease", &e))?;
        Ok(found.map(|l| l.status.map(|s| s.consumers).unwrap_or_default()))
    }

    async fn apply(
        &self,
        lease: &ObjectRef,
        consumers: &[ConsumerStatus],
    ) -> Result<bool, BrokerError> {
        let api = Api::<SecretLease>::namespaced(self.client.clone(), &lease.namespace);
        // Forced: the list is ours (the controller never sets it), and a
        // stray manager (kubectl) must not block consumer evidence.
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match api
            .patch_status(
                &lease.name,
                &params,
                &Patch::Apply(consumers_patch(consumers)),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
            Err(e) => Err(BrokerError::kube("cannot write status.consumers", &e)),
        }
    }
}

#[derive(Default)]
struct LeaseConsumers {
    /// `None` until loaded from the store.
    desired: Option<Vec<ConsumerStatus>>,
    written: Option<Vec<ConsumerStatus>>,
    last_write: Option<Instant>,
    flush_scheduled: bool,
    failures: u32,
}

type Table = Arc<Mutex<HashMap<ObjectRef, LeaseConsumers>>>;

/// [`ConsumerRecorder`] that coalesces writes to a [`ConsumerStore`].
#[derive(Clone)]
pub struct CoalescingRecorder {
    store: Arc<dyn ConsumerStore>,
    interval: Duration,
    table: Table,
}

impl std::fmt::Debug for CoalescingRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoalescingRecorder")
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

fn lock(table: &Table) -> std::sync::MutexGuard<'_, HashMap<ObjectRef, LeaseConsumers>> {
    table.lock().unwrap_or_else(|e| e.into_inner())
}

fn is_pod(c: &ConsumerStatus, pod: &ObjectRef) -> bool {
    c.kind == POD_KIND && c.namespace == pod.namespace && c.name == pod.name
}

/// Applies an acknowledgement to a list; `false` when nothing changed. The
/// time is kept when the version is unchanged, so repeated acknowledgements
/// cost no write.
pub fn apply_ack(
    list: &mut Vec<ConsumerStatus>,
    pod: &ObjectRef,
    version: u64,
    now: Timestamp,
) -> bool {
    match list.iter_mut().find(|c| is_pod(c, pod)) {
        Some(c) if c.version == Some(version) => false,
        Some(c) => {
            c.version = Some(version);
            c.acknowledged_at = Some(Time(now));
            true
        }
        None => {
            list.push(ConsumerStatus {
                kind: POD_KIND.to_owned(),
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                version: Some(version),
                acknowledged_at: Some(Time(now)),
            });
            list.sort_by(|a, b| {
                (&a.kind, &a.namespace, &a.name).cmp(&(&b.kind, &b.namespace, &b.name))
            });
            true
        }
    }
}

/// Removes a pod from a list; `false` when it was not there.
pub fn apply_release(list: &mut Vec<ConsumerStatus>, pod: &ObjectRef) -> bool {
    let before = list.len();
    list.retain(|c| !is_pod(c, pod));
    list.len() != before
}

impl CoalescingRecorder {
    /// Writes at most once per `interval` per lease.
    pub fn new(store: Arc<dyn ConsumerStore>, interval: Duration) -> Self {
        Self {
            store,
            interval,
            table: Arc::default(),
        }
    }

    /// Over the API server, one write per lease per second at most.
    pub fn kube(client: kube::Client) -> Self {
        Self::new(
            Arc::new(KubeConsumerStore::new(client)),
            Duration::from_secs(1),
        )
    }

    async fn ensure_loaded(&self, lease: &ObjectRef) -> Result<bool, BrokerError> {
        if lock(&self.table)
            .get(lease)
            .is_some_and(|s| s.desired.is_some())
        {
            return Ok(true);
        }
        let Some(loaded) = self.store.load(lease).await? else {
            return Ok(false);
        };
        let mut table = lock(&self.table);
        let state = table.entry(lease.clone()).or_default();
        if state.desired.is_none() {
            state.written = Some(loaded.clone());
            state.desired = Some(loaded);
        }
        Ok(true)
    }

    async fn change(
        &self,
        lease: &ObjectRef,
        op: impl FnOnce(&mut Vec<ConsumerStatus>) -> bool,
    ) -> Result<(), BrokerError> {
        if !self.ensure_loaded(lease).await? {
            return Ok(()); // the lease is gone: nothing to record
        }
        let mut table = lock(&self.table);
        let Some(state) = table.get_mut(lease) else {
            return Ok(());
        };
        let Some(desired) = state.desired.as_mut() else {
            return Ok(());
        };
        if !op(desired) || state.desired == state.written || state.flush_scheduled {
            return Ok(());
        }
        state.flush_scheduled = true;
        let delay = state
            .last_write
            .map(|t| self.interval.saturating_sub(t.elapsed()))
            .unwrap_or_default();
        tokio::spawn(flush(
            self.store.clone(),
            self.table.clone(),
            lease.clone(),
            self.interval,
            delay,
        ));
        Ok(())
    }
}

/// Writes one lease's list until what is written is what is desired.
async fn flush(
    store: Arc<dyn ConsumerStore>,
    table: Table,
    lease: ObjectRef,
    interval: Duration,
    mut delay: Duration,
) {
    loop {
        tokio::time::sleep(delay).await;
        let snapshot = {
            let mut t = lock(&table);
            let Some(state) = t.get_mut(&lease) else {
                return;
            };
            if state.desired == state.written {
                state.flush_scheduled = false;
                return;
            }
            state.desired.clone().unwrap_or_default()
        };
        let result = store.apply(&lease, &snapshot).await;
        let mut t = lock(&table);
        match result {
            Ok(true) => {
                if let Some(state) = t.get_mut(&lease) {
                    state.written = Some(snapshot);
                    state.last_write = Some(Instant::now());
                    state.failures = 0;
                }
                debug!(%lease, "status.consumers written");
                delay = interval;
            }
            Ok(false) => {
                debug!(%lease, "lease gone; consumers forgotten");
                t.remove(&lease);
                return;
            }
            Err(e) => {
                let Some(state) = t.get_mut(&lease) else {
                    return;
                };
                state.failures = state.failures.saturating_add(1);
                delay = interval
                    .saturating_mul(1 << state.failures.min(5))
                    .min(Duration::from_secs(30));
                warn!(%lease, error = %e, retry_in = ?delay, "cannot record consumers");
            }
        }
    }
}

#[async_trait]
impl ConsumerRecorder for CoalescingRecorder {
    async fn acknowledged(
        &self,
        lease: &ObjectRef,
        pod: &ObjectRef,
        version: u64,
    ) -> Result<(), BrokerError> {
        let now = Timestamp::now();
        self.change(lease, |list| apply_ack(list, pod, version, now))
            .await
    }

    async fn released(&self, lease: &ObjectRef, pod: &ObjectRef) -> Result<(), BrokerError> {
        self.change(lease, |list| apply_release(list, pod)).await
    }
}

/// An in-memory [`ConsumerStore`] for tests: counts writes.
#[derive(Debug, Default)]
pub struct MemoryConsumerStore {
    lists: Mutex<HashMap<ObjectRef, Vec<ConsumerStatus>>>,
    writes: std::sync::atomic::AtomicUsize,
}

impl MemoryConsumerStore {
    /// An empty store; leases must be added with [`MemoryConsumerStore::add_lease`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes a lease exist with this list.
    pub fn add_lease(&self, lease: ObjectRef, consumers: Vec<ConsumerStatus>) {
        self.lists
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(lease, consumers);
    }

    /// The list of a lease.
    pub fn consumers(&self, lease: &ObjectRef) -> Option<Vec<ConsumerStatus>> {
        self.lists
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(lease)
            .cloned()
    }

    /// How many writes happened.
    pub fn writes(&self) -> usize {
        self.writes.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[async_trait]
impl ConsumerStore for MemoryConsumerStore {
    async fn load(&self, lease: &ObjectRef) -> Result<Option<Vec<ConsumerStatus>>, BrokerError> {
        Ok(self.consumers(lease))
    }

    async fn apply(
        &self,
        lease: &ObjectRef,
        consumers: &[ConsumerStatus],
    ) -> Result<bool, BrokerError> {
        let mut lists = self.lists.lock().unwrap_or_else(|e| e.into_inner());
        let Some(list) = lists.get_mut(lease) else {
            return Ok(false);
        };
        *list = consumers.to_vec();
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(true)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    async fn settle(store: &MemoryConsumerStore, lease: &ObjectRef, want: usize) {
        for _ in 0..200 {
            if store.consumers(lease).is_some_and(|l| l.len() == want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("consumers of {lease} never reached {want}");
    }

    #[tokio::test]
    async fn coalesces_and_skips_unchanged() {
        let store = Arc::new(MemoryConsumerStore::new());
        let lease = ObjectRef::new("shop", "db");
        let other = ConsumerStatus {
            kind: "Deployment".into(),
            namespace: "shop".into(),
            name: "api".into(),
            version: Some(1),
            acknowledged_at: None,
        };
        store.add_lease(lease.clone(), vec![other.clone()]);
        let rec = CoalescingRecorder::new(store.clone(), Duration::from_millis(300));

        rec.acknowledged(&lease, &ObjectRef::new("shop", "web-0"), 3)
            .await
            .unwrap();
        settle(&store, &lease, 2).await;
        assert_eq!(store.writes(), 1);

        // A burst within the interval becomes one write.
        for i in 1..=5 {
            rec.acknowledged(&lease, &ObjectRef::new("shop", format!("web-{i}")), 3)
                .await
                .unwrap();
        }
        settle(&store, &lease, 7).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(store.writes(), 2);

        // The same acknowledgement again writes nothing.
        rec.acknowledged(&lease, &ObjectRef::new("shop", "web-0"), 3)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(store.writes(), 2);

        rec.released(&lease, &ObjectRef::new("shop", "web-0"))
            .await
            .unwrap();
        rec.released(&lease, &ObjectRef::new("shop", "gone"))
            .await
            .unwrap();
        settle(&store, &lease, 6).await;
        let list = store.consumers(&lease).unwrap();
        assert!(list.contains(&other), "other kinds are kept");
        assert!(!list.iter().any(|c| c.name == "web-0"));

        // A lease that does not exist: nothing recorded, no error.
        rec.acknowledged(
            &ObjectRef::new("shop", "nope"),
            &ObjectRef::new("shop", "p"),
            1,
        )
        .await
        .unwrap();
    }

    #[test]
    fn ack_updates_version_and_time() {
        let mut list = Vec::new();
        let pod = ObjectRef::new("a", "p");
        let t1 = Timestamp::from_second(100).unwrap();
        let t2 = Timestamp::from_second(200).unwrap();
        assert!(apply_ack(&mut list, &pod, 1, t1));
        assert!(!apply_ack(&mut list, &pod, 1, t2));
        assert_eq!(list[0].acknowledged_at, Some(Time(t1)));
        assert!(apply_ack(&mut list, &pod, 2, t2));
        assert_eq!(
            (list[0].version, list[0].acknowledged_at.clone()),
            (Some(2), Some(Time(t2)))
        );
        assert!(apply_release(&mut list, &pod));
        assert!(!apply_release(&mut list, &pod));
        let body = consumers_patch(&[]);
        assert_eq!(body["kind"], "SecretLease");
        assert_eq!(body["status"]["consumers"], serde_json::json!([]));
    }
}
