//! [`CachedClusterView`]: the broker's cluster reads answered from watch caches.
//!
//! A publish used to cost five or six GETs (pod, namespace, lease, policy, versions
//! Secret). Reflectors keep slimmed copies of those objects in memory instead, and a
//! read goes to the API server only when the cache cannot be trusted with the
//! answer ([`judge`]):
//!
//! - the cache has not finished its first list yet;
//! - the object is not cached (created a moment ago, or outside the watched scope);
//! - the cached pod has another UID or node than the caller expects (a pod recreated
//!   under the same name, or scheduled a moment ago);
//! - a shared lease has no current version, or an older one than the caller needs
//!   (a version just promoted);
//! - a versions Secret lacks the `v<N>` field asked for.
//!
//! Whatever the cache says "no" or "not ready" to is thus confirmed live, and the
//! broker confirms a refusal through [`ClusterView::live`] before refusing.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{
    CSIVolumeSource, Namespace, Pod, PodSpec, PodStatus, Secret, Volume,
};
use kube::Resource;
use kube::api::{Api, ObjectMeta};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use leasehold_api::{RotationPolicy, SecretLease};
use leasehold_envelope::secret::{SEALED_LABEL, SealedKind};
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::cluster::{ClusterView, KubeClusterView, PodExpectation, SecretData};
use crate::error::BrokerError;
use crate::metrics::ClusterReadMetrics;

/// Page size of the reflectors' initial lists.
const LIST_PAGE_SIZE: u32 = 500;

/// How the cache answered a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheVerdict {
    /// The cached object answers the question.
    Hit,
    /// Nothing cached, or the cache has not synced yet: read live.
    Miss,
    /// Cached, but possibly behind the cluster: read live.
    Stale,
}

impl CacheVerdict {
    /// The `result` label of `leasehold_broker_cache_lookups_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheVerdict::Hit => "hit",
            CacheVerdict::Miss => "miss",
            CacheVerdict::Stale => "stale",
        }
    }
}

/// A cached object, with what the caller needs of it.
#[derive(Debug, Clone, Copy)]
pub enum CachedAnswer<'a> {
    /// A pod that must be the expected one.
    Pod {
        /// The cached pod.
        pod: &'a Pod,
        /// Its UID and node as the caller expects them.
        expected: &'a PodExpectation<'a>,
    },
    /// A lease whose shared version must be current enough.
    Lease {
        /// The cached lease.
        lease: &'a SecretLease,
        /// The lowest current version the caller accepts (0: any).
        min_version: u64,
    },
    /// A Secret that must hold a field.
    Secret {
        /// The cached Secret.
        secret: &'a Secret,
        /// The field the caller reads, if any.
        field: Option<&'a str>,
    },
    /// Any cached copy will do (namespace labels, policies).
    Present,
}

/// Whether the cache may answer: `synced` is whether the cache finished its
/// first list, `cached` the cached object (if any) and what the caller needs of it.
pub fn judge(synced: bool, cached: Option<CachedAnswer<'_>>) -> CacheVerdict {
    let Some(cached) = cached.filter(|_| synced) else {
        return CacheVerdict::Miss;
    };
    let acceptable = match cached {
        CachedAnswer::Pod { pod, expected } => {
            pod.metadata.uid.as_deref() == Some(expected.uid)
                && expected.node.is_none_or(|node| {
                    pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
                })
        }
        CachedAnswer::Lease { lease, min_version } => lease_current_enough(lease, min_version),
        CachedAnswer::Secret { secret, field } => {
            field.is_none_or(|f| secret.data.as_ref().is_some_and(|d| d.contains_key(f)))
        }
        CachedAnswer::Present => true,
    };
    if acceptable {
        CacheVerdict::Hit
    } else {
        CacheVerdict::Stale
    }
}

/// A shared lease (one password for all pods) must have a current version of at least
/// `min_version` with its record; per-pod and certificate leases have no shared version.
fn lease_current_enough(lease: &SecretLease, min_version: u64) -> bool {
    let shared = !lease.spec.per_pod && lease.spec.certificate.is_none();
    if !shared {
        return true;
    }
    lease.status.as_ref().is_some_and(|status| {
        status
            .current_version
            .is_some_and(|v| v >= min_version && status.progress.version(v).is_some())
    })
}

/// Shrinks a pod to what the broker reads ([`crate::cluster::pod_facts`]): name,
/// namespace, UID, deletion timestamp, node, service account, leasehold's CSI
/// volumes (driver and attributes) and phase.
pub fn slim_pod(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        uid: meta.uid.take(),
        resource_version: meta.resource_version.take(),
        deletion_timestamp: meta.deletion_timestamp.take(),
        ..Default::default()
    };
    pod.spec = pod.spec.take().map(|spec| {
        let volumes: Vec<Volume> = spec
            .volumes
            .into_iter()
            .flatten()
            .filter_map(|v| {
                let csi = v
                    .csi
                    .filter(|c| c.driver == leasehold_api::CSI_DRIVER_NAME)?;
                Some(Volume {
                    name: v.name,
                    csi: Some(CSIVolumeSource {
                        driver: csi.driver,
                        volume_attributes: csi.volume_attributes,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
            })
            .collect();
        PodSpec {
            node_name: spec.node_name,
            service_account_name: spec.service_account_name,
            volumes: (!volumes.is_empty()).then_some(volumes),
            ..Default::default()
        }
    });
    pod.status = pod.status.take().map(|status| PodStatus {
        phase: status.phase,
        ..Default::default()
    });
}

/// Shrinks a namespace to its name and labels.
pub fn slim_namespace(namespace: &mut Namespace) {
    let meta = &mut namespace.metadata;
    *meta = ObjectMeta {
        name: meta.name.take(),
        uid: meta.uid.take(),
        resource_version: meta.resource_version.take(),
        labels: meta.labels.take(),
        ..Default::default()
    };
    namespace.spec = None;
    namespace.status = None;
}

/// Drops what no broker decision reads from a custom object's metadata
/// (managed fields, annotations); spec and status are kept.
fn slim_meta(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    meta.annotations = None;
}

/// Shrinks a versions Secret to its name and (sealed) data.
pub fn slim_secret(secret: &mut Secret) {
    let meta = &mut secret.metadata;
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        uid: meta.uid.take(),
        resource_version: meta.resource_version.take(),
        ..Default::default()
    };
    secret.string_data = None;
}

/// A reflector's store, and whether its first list is done.
struct Cache<K: Resource<DynamicType = ()> + Clone + 'static> {
    store: Store<K>,
}

impl<K> Cache<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    fn synced(&self) -> bool {
        matches!(self.store.wait_until_ready().now_or_never(), Some(Ok(())))
    }

    fn get(&self, namespace: Option<&str>, name: &str) -> Option<Arc<K>> {
        let key = match namespace {
            Some(ns) => ObjectRef::new(name).within(ns),
            None => ObjectRef::new(name),
        };
        self.store.get(&key)
    }
}

/// The caches of one scope (a watched namespace, or all of them).
struct ScopeCaches {
    pods: Cache<Pod>,
    namespaces: Cache<Namespace>,
    leases: Cache<SecretLease>,
    policies: Cache<RotationPolicy>,
    versions: Cache<Secret>,
}

/// Aborts the reflector tasks when the last view is dropped.
struct ReflectorTasks(Vec<JoinHandle<()>>);

impl Drop for ReflectorTasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Where the caches are: one scope for all namespaces, or one per watched namespace.
enum Scopes {
    All(ScopeCaches),
    Namespaces {
        watched: HashMap<String, ScopeCaches>,
        /// The node drivers' pods, when their namespace is not watched: every call
        /// checks the caller's own pod.
        driver_pods: Option<(String, Cache<Pod>)>,
    },
}

impl Scopes {
    fn of(&self, namespace: &str) -> Option<&ScopeCaches> {
        match self {
            Scopes::All(caches) => Some(caches),
            Scopes::Namespaces { watched, .. } => watched.get(namespace),
        }
    }

    fn pods(&self, namespace: &str) -> Option<&Cache<Pod>> {
        match self {
            Scopes::Namespaces {
                driver_pods: Some((ns, pods)),
                ..
            } if ns == namespace => Some(pods),
            _ => self.of(namespace).map(|s| &s.pods),
        }
    }

    fn all(&self) -> Vec<&ScopeCaches> {
        match self {
            Scopes::All(s) => vec![s],
            Scopes::Namespaces { watched, .. } => watched.values().collect(),
        }
    }
}

/// [`ClusterView`] answering from watch caches, reading live through
/// [`KubeClusterView`] when the cache cannot be trusted with the answer (see the
/// module documentation). Clones share the caches; the reflectors stop when the
/// last clone is dropped.
#[derive(Clone)]
pub struct CachedClusterView {
    scopes: Arc<Scopes>,
    live: KubeClusterView,
    metrics: ClusterReadMetrics,
    _tasks: Arc<ReflectorTasks>,
}

impl std::fmt::Debug for CachedClusterView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedClusterView").finish_non_exhaustive()
    }
}

fn spawn_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    slim: fn(&mut K),
    what: &'static str,
) -> (Cache<K>, JoinHandle<()>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let task = tokio::spawn(async move {
        watcher(api, config.page_size(LIST_PAGE_SIZE))
            .default_backoff()
            .modify(slim)
            .reflect(writer)
            .for_each(|event| async move {
                // The backoff spaces these out; reads go live until the watch is back.
                if let Err(e) = event {
                    warn!(cache = what, error = %e, "broker cache: watch failed, retrying");
                }
            })
            .await;
    });
    (Cache { store }, task)
}

impl CachedClusterView {
    /// Starts reflectors for pods, namespaces, SecretLeases, RotationPolicies and
    /// versions Secrets (label `leasehold.dev/sealed=versions`) in `namespaces`
    /// (empty: all), plus the pods of `driver_namespace` (where the node drivers
    /// run) if it is not among them; reads live through `client` until they have
    /// synced and whenever the cache cannot answer. Needs `get`, `list` and `watch`
    /// on those kinds in those namespaces (for namespaces: all of them, or the
    /// watched ones by name; for `driver_namespace`: pods). Must be called within a
    /// Tokio runtime.
    pub fn start(
        client: kube::Client,
        namespaces: &[String],
        driver_namespace: &str,
        metrics: ClusterReadMetrics,
    ) -> Self {
        let mut tasks = Vec::new();
        let mut scope = |ns: Option<&str>| {
            let api = |client: &kube::Client| -> (Api<Pod>, Api<SecretLease>, Api<RotationPolicy>, Api<Secret>) {
                match ns {
                    Some(ns) => (
                        Api::namespaced(client.clone(), ns),
                        Api::namespaced(client.clone(), ns),
                        Api::namespaced(client.clone(), ns),
                        Api::namespaced(client.clone(), ns),
                    ),
                    None => (
                        Api::all(client.clone()),
                        Api::all(client.clone()),
                        Api::all(client.clone()),
                        Api::all(client.clone()),
                    ),
                }
            };
            let (pods_api, leases_api, policies_api, secrets_api) = api(&client);
            let namespaces_config = match ns {
                Some(ns) => watcher::Config::default().fields(&format!("metadata.name={ns}")),
                None => watcher::Config::default(),
            };
            let versions_config = watcher::Config::default()
                .labels(&format!("{SEALED_LABEL}={}", SealedKind::Versions.as_str()));
            let (pods, t1) =
                spawn_reflector(pods_api, watcher::Config::default(), slim_pod, "pods");
            let (namespaces, t2) = spawn_reflector(
                Api::all(client.clone()),
                namespaces_config,
                slim_namespace,
                "namespaces",
            );
            let (leases, t3) = spawn_reflector(
                leases_api,
                watcher::Config::default(),
                |l: &mut SecretLease| slim_meta(&mut l.metadata),
                "secretleases",
            );
            let (policies, t4) = spawn_reflector(
                policies_api,
                watcher::Config::default(),
                |p: &mut RotationPolicy| slim_meta(&mut p.metadata),
                "rotationpolicies",
            );
            let (versions, t5) = spawn_reflector(
                secrets_api,
                versions_config,
                slim_secret,
                "versions secrets",
            );
            tasks.extend([t1, t2, t3, t4, t5]);
            ScopeCaches {
                pods,
                namespaces,
                leases,
                policies,
                versions,
            }
        };
        let scopes = if namespaces.is_empty() {
            Scopes::All(scope(None))
        } else {
            let watched: HashMap<String, ScopeCaches> = namespaces
                .iter()
                .map(|ns| (ns.clone(), scope(Some(ns))))
                .collect();
            let driver_pods = (!watched.contains_key(driver_namespace)).then(|| {
                let (pods, task) = spawn_reflector(
                    Api::namespaced(client.clone(), driver_namespace),
                    watcher::Config::default(),
                    slim_pod,
                    "node driver pods",
                );
                tasks.push(task);
                (driver_namespace.to_owned(), pods)
            });
            Scopes::Namespaces {
                watched,
                driver_pods,
            }
        };
        Self {
            scopes: Arc::new(scopes),
            live: KubeClusterView::new(client).with_metrics(metrics.clone()),
            metrics,
            _tasks: Arc::new(ReflectorTasks(tasks)),
        }
    }

    /// Whether every cache has finished its first list.
    pub fn synced(&self) -> bool {
        let scope_synced = |s: &ScopeCaches| {
            s.pods.synced()
                && s.namespaces.synced()
                && s.leases.synced()
                && s.policies.synced()
                && s.versions.synced()
        };
        let driver_pods_synced = match self.scopes.as_ref() {
            Scopes::Namespaces {
                driver_pods: Some((_, pods)),
                ..
            } => pods.synced(),
            _ => true,
        };
        self.scopes.all().into_iter().all(scope_synced) && driver_pods_synced
    }

    /// Waits until every cache has finished its first list (for tests and benches;
    /// the broker serves before, reading live).
    pub async fn wait_synced(&self) {
        if let Scopes::Namespaces {
            driver_pods: Some((_, pods)),
            ..
        } = self.scopes.as_ref()
        {
            let _ = pods.store.wait_until_ready().await;
        }
        for s in self.scopes.all() {
            let _ = s.pods.store.wait_until_ready().await;
            let _ = s.namespaces.store.wait_until_ready().await;
            let _ = s.leases.store.wait_until_ready().await;
            let _ = s.policies.store.wait_until_ready().await;
            let _ = s.versions.store.wait_until_ready().await;
        }
    }

    /// The cached object of `kind` if `verdict` (given whether the cache is synced
    /// and the cached object) is a hit; counts the lookup.
    fn lookup<K>(
        &self,
        kind: &str,
        cache: Option<&Cache<K>>,
        namespace: Option<&str>,
        name: &str,
        verdict: impl FnOnce(bool, Option<&K>) -> CacheVerdict,
    ) -> Option<Arc<K>>
    where
        K: Resource<DynamicType = ()> + Clone + 'static,
    {
        let (synced, cached) = match cache {
            Some(cache) => (cache.synced(), cache.get(namespace, name)),
            None => (false, None),
        };
        let verdict = verdict(synced, cached.as_deref());
        self.metrics.lookup(kind, verdict.as_str());
        cached.filter(|_| verdict == CacheVerdict::Hit)
    }
}

/// Whether `name` is a lease's versions Secret (the only Secrets cached).
fn is_versions_secret(name: &str) -> bool {
    name.ends_with(leasehold_api::VERSIONS_SECRET_SUFFIX)
}

#[async_trait]
impl ClusterView for CachedClusterView {
    async fn pod(&self, namespace: &str, name: &str) -> Result<Option<Pod>, BrokerError> {
        let cache = self.scopes.pods(namespace);
        match self.lookup::<Pod>("pod", cache, Some(namespace), name, |synced, cached| {
            judge(synced, cached.map(|_| CachedAnswer::Present))
        }) {
            Some(pod) => Ok(Some(pod.as_ref().clone())),
            None => self.live.pod(namespace, name).await,
        }
    }

    async fn pod_expecting(
        &self,
        namespace: &str,
        name: &str,
        expected: &PodExpectation<'_>,
    ) -> Result<Option<Pod>, BrokerError> {
        let cache = self.scopes.pods(namespace);
        let hit = self.lookup::<Pod>("pod", cache, Some(namespace), name, |synced, cached| {
            judge(
                synced,
                cached.map(|pod| CachedAnswer::Pod { pod, expected }),
            )
        });
        match hit {
            Some(pod) => Ok(Some(pod.as_ref().clone())),
            None => self.live.pod(namespace, name).await,
        }
    }

    async fn namespace_labels(
        &self,
        name: &str,
    ) -> Result<Option<BTreeMap<String, String>>, BrokerError> {
        let cache = self.scopes.of(name).map(|s| &s.namespaces);
        match self.lookup::<Namespace>("namespace", cache, None, name, |synced, cached| {
            judge(synced, cached.map(|_| CachedAnswer::Present))
        }) {
            Some(ns) => Ok(Some(ns.metadata.labels.clone().unwrap_or_default())),
            None => self.live.namespace_labels(name).await,
        }
    }

    async fn lease(&self, namespace: &str, name: &str) -> Result<Option<SecretLease>, BrokerError> {
        self.lease_at_version(namespace, name, 0).await
    }

    async fn lease_at_version(
        &self,
        namespace: &str,
        name: &str,
        min_version: u64,
    ) -> Result<Option<SecretLease>, BrokerError> {
        let cache = self.scopes.of(namespace).map(|s| &s.leases);
        match self.lookup::<SecretLease>(
            "secretlease",
            cache,
            Some(namespace),
            name,
            |synced, cached| {
                judge(
                    synced,
                    cached.map(|lease| CachedAnswer::Lease { lease, min_version }),
                )
            },
        ) {
            Some(lease) => Ok(Some(lease.as_ref().clone())),
            None => self.live.lease(namespace, name).await,
        }
    }

    async fn policy(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<RotationPolicy>, BrokerError> {
        let cache = self.scopes.of(namespace).map(|s| &s.policies);
        match self.lookup::<RotationPolicy>(
            "rotationpolicy",
            cache,
            Some(namespace),
            name,
            |synced, cached| judge(synced, cached.map(|_| CachedAnswer::Present)),
        ) {
            Some(policy) => Ok(Some(policy.as_ref().clone())),
            None => self.live.policy(namespace, name).await,
        }
    }

    async fn secret(&self, namespace: &str, name: &str) -> Result<Option<SecretData>, BrokerError> {
        self.cached_secret(namespace, name, None).await
    }

    async fn secret_with_field(
        &self,
        namespace: &str,
        name: &str,
        field: &str,
    ) -> Result<Option<SecretData>, BrokerError> {
        self.cached_secret(namespace, name, Some(field)).await
    }

    fn live(&self) -> Option<&dyn ClusterView> {
        Some(&self.live)
    }
}

impl CachedClusterView {
    async fn cached_secret(
        &self,
        namespace: &str,
        name: &str,
        field: Option<&str>,
    ) -> Result<Option<SecretData>, BrokerError> {
        // Only versions Secrets are watched (admin credentials and CA bundles are
        // read when a per-pod user or certificate is made, not per publish).
        if !is_versions_secret(name) {
            return self.live.secret(namespace, name).await;
        }
        let cache = self.scopes.of(namespace).map(|s| &s.versions);
        match self.lookup::<Secret>("secret", cache, Some(namespace), name, |synced, cached| {
            judge(
                synced,
                cached.map(|secret| CachedAnswer::Secret { secret, field }),
            )
        }) {
            Some(secret) => Ok(Some(SecretData::from_secret(&secret))),
            None => self.live.secret(namespace, name).await,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::cluster::pod_facts;
    use serde_json::json;

    fn pod(uid: &str, node: Option<&str>) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"namespace": "shop", "name": "web-0", "uid": uid,
                         "labels": {"app": "web"}, "annotations": {"a": "b"},
                         "managedFields": [{"manager": "kubelet"}]},
            "spec": {"serviceAccountName": "web", "nodeName": node,
                     "containers": [{"name": "app", "image": "web:1",
                                     "env": [{"name": "X", "value": "y"}]}],
                     "volumes": [
                         {"name": "creds", "csi": {"driver": "csi.leasehold.dev", "readOnly": true,
                                                   "volumeAttributes": {"lease": "db"}}},
                         {"name": "other", "csi": {"driver": "other.csi", "volumeAttributes": {"lease": "x"}}},
                         {"name": "tmp", "emptyDir": {}}]},
            "status": {"phase": "Running", "podIP": "10.0.0.1",
                       "conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .unwrap()
    }

    fn lease(status: serde_json::Value, extra_spec: serde_json::Value) -> SecretLease {
        let mut spec = json!({"policyRef": {"name": "open"},
            "postgres": {"host": "db", "port": 5432, "database": "d",
                         "adminSecretRef": {"name": "admin"}}});
        for (k, v) in extra_spec.as_object().unwrap() {
            spec[k] = v.clone();
        }
        serde_json::from_value(json!({
            "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease",
            "metadata": {"namespace": "shop", "name": "db"},
            "spec": spec, "status": status,
        }))
        .unwrap()
    }

    fn current(version: u64) -> serde_json::Value {
        json!({"currentVersion": version, "progress": {"lastVersion": version, "versions": [
            {"version": version, "credentialId": "u", "state": "Current",
             "issuedAt": "2025-01-01T00:00:00Z"}]}})
    }

    fn secret(fields: &[&str]) -> Secret {
        Secret {
            data: Some(
                fields
                    .iter()
                    .map(|f| ((*f).to_owned(), k8s_openapi::ByteString(b"sealed".to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn cache_answers_only_what_it_can_vouch_for() {
        use CacheVerdict::{Hit, Miss, Stale};
        let on_a = pod("uid-1", Some("node-a"));
        let unscheduled = pod("uid-1", None);
        let expect = |uid, node| PodExpectation { uid, node };
        let e1a = expect("uid-1", Some("node-a"));
        let e2a = expect("uid-2", Some("node-a"));
        let e1b = expect("uid-1", Some("node-b"));
        let e1 = expect("uid-1", None);
        let ready = lease(current(3), json!({}));
        let no_version = lease(json!({}), json!({}));
        let version_without_record = lease(
            json!({"currentVersion": 4, "progress": {"versions": []}}),
            json!({}),
        );
        let per_pod = lease(json!({}), json!({"perPod": true}));
        let versions = secret(&["v3"]);
        let cases: Vec<(&str, bool, Option<CachedAnswer<'_>>, CacheVerdict)> = vec![
            (
                "matching pod",
                true,
                Some(CachedAnswer::Pod {
                    pod: &on_a,
                    expected: &e1a,
                }),
                Hit,
            ),
            (
                "pod, node not asked",
                true,
                Some(CachedAnswer::Pod {
                    pod: &on_a,
                    expected: &e1,
                }),
                Hit,
            ),
            ("not cached", true, None, Miss),
            (
                "not synced",
                false,
                Some(CachedAnswer::Pod {
                    pod: &on_a,
                    expected: &e1a,
                }),
                Miss,
            ),
            (
                "not synced, present",
                false,
                Some(CachedAnswer::Present),
                Miss,
            ),
            (
                "UID mismatch",
                true,
                Some(CachedAnswer::Pod {
                    pod: &on_a,
                    expected: &e2a,
                }),
                Stale,
            ),
            (
                "node mismatch",
                true,
                Some(CachedAnswer::Pod {
                    pod: &on_a,
                    expected: &e1b,
                }),
                Stale,
            ),
            (
                "not scheduled yet",
                true,
                Some(CachedAnswer::Pod {
                    pod: &unscheduled,
                    expected: &e1a,
                }),
                Stale,
            ),
            (
                "lease with current version",
                true,
                Some(CachedAnswer::Lease {
                    lease: &ready,
                    min_version: 0,
                }),
                Hit,
            ),
            (
                "lease at the acknowledged version",
                true,
                Some(CachedAnswer::Lease {
                    lease: &ready,
                    min_version: 3,
                }),
                Hit,
            ),
            (
                "lease behind the acknowledged version",
                true,
                Some(CachedAnswer::Lease {
                    lease: &ready,
                    min_version: 4,
                }),
                Stale,
            ),
            (
                "lease without current version",
                true,
                Some(CachedAnswer::Lease {
                    lease: &no_version,
                    min_version: 0,
                }),
                Stale,
            ),
            (
                "lease without the version's record",
                true,
                Some(CachedAnswer::Lease {
                    lease: &version_without_record,
                    min_version: 0,
                }),
                Stale,
            ),
            (
                "per-pod lease has no shared version",
                true,
                Some(CachedAnswer::Lease {
                    lease: &per_pod,
                    min_version: 2,
                }),
                Hit,
            ),
            (
                "secret with the field",
                true,
                Some(CachedAnswer::Secret {
                    secret: &versions,
                    field: Some("v3"),
                }),
                Hit,
            ),
            (
                "secret missing the field",
                true,
                Some(CachedAnswer::Secret {
                    secret: &versions,
                    field: Some("v4"),
                }),
                Stale,
            ),
            (
                "secret, no field asked",
                true,
                Some(CachedAnswer::Secret {
                    secret: &versions,
                    field: None,
                }),
                Hit,
            ),
            (
                "namespace or policy",
                true,
                Some(CachedAnswer::Present),
                Hit,
            ),
        ];
        for (what, synced, cached, want) in cases {
            assert_eq!(judge(synced, cached), want, "{what}");
        }
    }

    #[test]
    fn a_slimmed_pod_has_the_same_facts() {
        let full = pod("uid-1", Some("node-a"));
        let mut slim = full.clone();
        slim_pod(&mut slim);
        assert_eq!(pod_facts(&slim), pod_facts(&full));
        assert!(slim.metadata.labels.is_none() && slim.metadata.managed_fields.is_none());
        let spec = slim.spec.as_ref().unwrap();
        assert!(spec.containers.is_empty());
        assert_eq!(
            spec.volumes.as_ref().unwrap().len(),
            1,
            "only leasehold volumes"
        );
        assert_eq!(slim.status.as_ref().unwrap().pod_ip, None);
        // What a cached pod costs, roughly: the structs plus its strings.
        let heap = serde_json::to_vec(&slim).unwrap().len();
        // Spec and status are inline in `Pod`, the CSI source inline in `Volume`.
        let structs = std::mem::size_of::<Pod>() + std::mem::size_of::<Volume>();
        eprintln!(
            "slim pod: ~{} bytes ({structs} of structs, {heap} of JSON)",
            structs + heap
        );
    }

    #[test]
    fn a_slimmed_secret_keeps_its_data_only() {
        let mut s = secret(&["v1", "v2"]);
        s.metadata.name = Some("db-leasehold-versions".into());
        s.metadata.annotations = Some(BTreeMap::from([("a".into(), "b".into())]));
        slim_secret(&mut s);
        assert!(s.metadata.annotations.is_none());
        assert_eq!(s.data.as_ref().unwrap().len(), 2);
        assert!(is_versions_secret("db-leasehold-versions"));
        assert!(!is_versions_secret("db-admin"));
    }
}
