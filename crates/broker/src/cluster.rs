//! What the broker reads from the cluster, behind [`ClusterView`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::Api;
use leasehold_api::{RotationPolicy, SecretLease};
use secrecy::SecretString;

use crate::authz::{LeaseFacts, PodFacts};
use crate::error::BrokerError;
use crate::metrics::ClusterReadMetrics;

/// Values of a Secret. `Debug` shows the keys only.
#[derive(Clone, Default)]
pub struct SecretData(pub BTreeMap<String, SecretString>);

impl std::fmt::Debug for SecretData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl SecretData {
    /// The value under `key`.
    pub fn get(&self, key: &str) -> Option<&SecretString> {
        self.0.get(key)
    }

    /// Decodes a Secret's `data` (values that are not UTF-8 are left out:
    /// every value the broker reads is text).
    pub fn from_secret(secret: &Secret) -> Self {
        SecretData(
            secret
                .data
                .iter()
                .flatten()
                .filter_map(|(k, v)| {
                    String::from_utf8(v.0.clone())
                        .ok()
                        .map(|s| (k.clone(), SecretString::from(s)))
                })
                .collect(),
        )
    }
}

/// Read access to the objects the broker decides on.
#[async_trait]
pub trait ClusterView: Send + Sync {
    /// A pod, `None` when it does not exist.
    async fn pod(&self, namespace: &str, name: &str) -> Result<Option<Pod>, BrokerError>;
    /// A namespace's labels, `None` when it does not exist.
    async fn namespace_labels(
        &self,
        name: &str,
    ) -> Result<Option<BTreeMap<String, String>>, BrokerError>;
    /// A `SecretLease`.
    async fn lease(&self, namespace: &str, name: &str) -> Result<Option<SecretLease>, BrokerError>;
    /// A `RotationPolicy`.
    async fn policy(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<RotationPolicy>, BrokerError>;
    /// A Secret's data (admin credentials, CA bundles, a lease's versions).
    async fn secret(&self, namespace: &str, name: &str) -> Result<Option<SecretData>, BrokerError>;

    /// A pod the caller expects to be `expected` (its UID, and its node when given).
    /// A cached view answers from its cache only when the cached pod agrees, and reads
    /// live otherwise, so a refusal is never based on a lagging cache. The answer may
    /// still differ from `expected`: the caller decides.
    async fn pod_expecting(
        &self,
        namespace: &str,
        name: &str,
        expected: &PodExpectation<'_>,
    ) -> Result<Option<Pod>, BrokerError> {
        let _ = expected;
        self.pod(namespace, name).await
    }

    /// A lease the caller needs at `min_version` or later (0: any). A cached view
    /// reads live when its copy is older, or is a shared lease without a current
    /// version (the cache may lag a just-promoted version).
    async fn lease_at_version(
        &self,
        namespace: &str,
        name: &str,
        min_version: u64,
    ) -> Result<Option<SecretLease>, BrokerError> {
        let _ = min_version;
        self.lease(namespace, name).await
    }

    /// A Secret's data, which the caller needs to hold `field`. A cached view reads
    /// live when its copy lacks the field.
    async fn secret_with_field(
        &self,
        namespace: &str,
        name: &str,
        field: &str,
    ) -> Result<Option<SecretData>, BrokerError> {
        let _ = field;
        self.secret(namespace, name).await
    }

    /// The same objects read live, bypassing any cache; `None` when this view has no
    /// cache. The broker confirms a refusal through it before refusing.
    fn live(&self) -> Option<&dyn ClusterView> {
        None
    }
}

/// What the broker expects of a pod it reads: the UID the caller named, and the node
/// when the call is about a pod on a given node.
#[derive(Debug, Clone, Copy)]
pub struct PodExpectation<'a> {
    /// The pod's UID.
    pub uid: &'a str,
    /// The node the pod must run on, when known.
    pub node: Option<&'a str>,
}

pub use leasehold_api::versions_secret_name;

/// The password of `version` of a lease, from its versions Secret (opened with
/// `keyring`: the controller stores it sealed).
pub async fn version_password(
    cluster: &dyn ClusterView,
    keyring: &leasehold_envelope::Keyring,
    namespace: &str,
    lease: &str,
    version: u64,
) -> Result<Option<SecretString>, BrokerError> {
    use secrecy::ExposeSecret;
    let secret_name = versions_secret_name(lease);
    let field = format!("v{version}");
    let Some(stored) = cluster
        .secret_with_field(namespace, &secret_name, &field)
        .await?
        .and_then(|data| data.get(&field).cloned())
    else {
        return Ok(None);
    };
    let at = leasehold_envelope::secret::SecretField {
        kind: leasehold_envelope::secret::SealedKind::Versions,
        namespace,
        secret: &secret_name,
        field: &field,
    };
    let plain = at
        .open(keyring, stored.expose_secret().as_bytes())
        .await
        .map_err(|e| BrokerError::key("the lease's credential", &e))?;
    let text = String::from_utf8(plain.to_vec())
        .map_err(|_| BrokerError::Internal("a stored credential is not UTF-8".into()))?;
    Ok(Some(SecretString::from(text)))
}

/// The facts of a pod that authorization uses.
pub fn pod_facts(pod: &Pod) -> PodFacts {
    let spec = pod.spec.as_ref();
    PodFacts {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_owned()),
        node_name: spec
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty()),
        phase: pod.status.as_ref().and_then(|s| s.phase.clone()),
        terminating: pod.metadata.deletion_timestamp.is_some(),
        csi_leases: csi_leases(pod),
    }
}

/// The leases a pod mounts through leasehold's CSI driver: the `lease`
/// attribute of its inline `csi` volumes (`name` or `namespace/name`).
fn csi_leases(pod: &Pod) -> Vec<(String, String)> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| v.csi.as_ref())
        .filter(|csi| csi.driver == leasehold_api::CSI_DRIVER_NAME)
        .filter_map(|csi| csi.volume_attributes.as_ref()?.get("lease"))
        .map(|lease| match lease.split_once('/') {
            Some((ns, name)) => (ns.to_owned(), name.to_owned()),
            None => (namespace.to_owned(), lease.clone()),
        })
        .collect()
}

/// The facts of a lease that authorization uses.
pub fn lease_facts(lease: &SecretLease) -> LeaseFacts {
    LeaseFacts {
        namespace: lease.metadata.namespace.clone().unwrap_or_default(),
        name: lease.metadata.name.clone().unwrap_or_default(),
        csi_enabled: lease.spec.delivery.csi.as_ref().is_some_and(|c| c.enabled),
        per_pod: lease.spec.per_pod,
    }
}

/// [`ClusterView`] over the API server: one GET per question, so a decision
/// always sees the current pod. [`crate::CachedClusterView`] answers most questions
/// from watch caches and falls back to this.
#[derive(Clone)]
pub struct KubeClusterView {
    client: kube::Client,
    metrics: ClusterReadMetrics,
}

impl std::fmt::Debug for KubeClusterView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeClusterView").finish_non_exhaustive()
    }
}

impl KubeClusterView {
    /// Reads through `client`. Needs `get` on pods, namespaces, secrets,
    /// secretleases and rotationpolicies.
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            metrics: ClusterReadMetrics::default(),
        }
    }

    /// Counts its reads in `metrics` (`leasehold_broker_api_reads_total`).
    pub fn with_metrics(mut self, metrics: ClusterReadMetrics) -> Self {
        self.metrics = metrics;
        self
    }
}

#[async_trait]
impl ClusterView for KubeClusterView {
    async fn pod(&self, namespace: &str, name: &str) -> Result<Option<Pod>, BrokerError> {
        self.metrics.api_read("pod");
        Api::<Pod>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(|e| BrokerError::kube("cannot read the pod", &e))
    }

    async fn namespace_labels(
        &self,
        name: &str,
    ) -> Result<Option<BTreeMap<String, String>>, BrokerError> {
        self.metrics.api_read("namespace");
        Ok(Api::<Namespace>::all(self.client.clone())
            .get_opt(name)
            .await
            .map_err(|e| BrokerError::kube("cannot read the namespace", &e))?
            .map(|ns| ns.metadata.labels.unwrap_or_default()))
    }

    async fn lease(&self, namespace: &str, name: &str) -> Result<Option<SecretLease>, BrokerError> {
        self.metrics.api_read("secretlease");
        Api::<SecretLease>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(|e| BrokerError::kube("cannot read the SecretLease", &e))
    }

    async fn policy(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<RotationPolicy>, BrokerError> {
        self.metrics.api_read("rotationpolicy");
        Api::<RotationPolicy>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(|e| BrokerError::kube("cannot read the RotationPolicy", &e))
    }

    async fn secret(&self, namespace: &str, name: &str) -> Result<Option<SecretData>, BrokerError> {
        self.metrics.api_read("secret");
        Ok(Api::<Secret>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(|e| BrokerError::kube("cannot read a Secret", &e))?
            .map(|s| SecretData::from_secret(&s)))
    }
}

type Key = (String, String);

fn key(namespace: &str, name: &str) -> Key {
    (namespace.to_owned(), name.to_owned())
}

#[derive(Default)]
struct MemoryObjects {
    pods: HashMap<Key, Pod>,
    namespaces: HashMap<String, BTreeMap<String, String>>,
    leases: HashMap<Key, SecretLease>,
    policies: HashMap<Key, RotationPolicy>,
    secrets: HashMap<Key, SecretData>,
}

/// An in-memory [`ClusterView`] for tests: objects are put in and read back.
#[derive(Default)]
pub struct MemoryCluster {
    objects: Mutex<MemoryObjects>,
}

impl std::fmt::Debug for MemoryCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryCluster").finish_non_exhaustive()
    }
}

impl MemoryCluster {
    /// An empty cluster.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(&self, f: impl FnOnce(&mut MemoryObjects) -> R) -> R {
        let mut guard = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// Adds or replaces a pod.
    pub fn put_pod(&self, pod: Pod) {
        let k = key(
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            pod.metadata.name.as_deref().unwrap_or_default(),
        );
        self.with(|o| o.pods.insert(k, pod));
    }

    /// Removes a pod.
    pub fn remove_pod(&self, namespace: &str, name: &str) {
        self.with(|o| o.pods.remove(&key(namespace, name)));
    }

    /// Adds or replaces a namespace with its labels.
    pub fn put_namespace(&self, name: &str, labels: BTreeMap<String, String>) {
        self.with(|o| o.namespaces.insert(name.to_owned(), labels));
    }

    /// Adds or replaces a lease.
    pub fn put_lease(&self, lease: SecretLease) {
        let k = key(
            lease.metadata.namespace.as_deref().unwrap_or_default(),
            lease.metadata.name.as_deref().unwrap_or_default(),
        );
        self.with(|o| o.leases.insert(k, lease));
    }

    /// Adds or replaces a policy.
    pub fn put_policy(&self, policy: RotationPolicy) {
        let k = key(
            policy.metadata.namespace.as_deref().unwrap_or_default(),
            policy.metadata.name.as_deref().unwrap_or_default(),
        );
        self.with(|o| o.policies.insert(k, policy));
    }

    /// Adds or replaces a Secret's data.
    pub fn put_secret(&self, namespace: &str, name: &str, data: SecretData) {
        self.with(|o| o.secrets.insert(key(namespace, name), data));
    }
}

#[async_trait]
impl ClusterView for MemoryCluster {
    async fn pod(&self, namespace: &str, name: &str) -> Result<Option<Pod>, BrokerError> {
        Ok(self.with(|o| o.pods.get(&key(namespace, name)).cloned()))
    }

    async fn namespace_labels(
        &self,
        name: &str,
    ) -> Result<Option<BTreeMap<String, String>>, BrokerError> {
        Ok(self.with(|o| o.namespaces.get(name).cloned()))
    }

    async fn lease(&self, namespace: &str, name: &str) -> Result<Option<SecretLease>, BrokerError> {
        Ok(self.with(|o| o.leases.get(&key(namespace, name)).cloned()))
    }

    async fn policy(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<RotationPolicy>, BrokerError> {
        Ok(self.with(|o| o.policies.get(&key(namespace, name)).cloned()))
    }

    async fn secret(&self, namespace: &str, name: &str) -> Result<Option<SecretData>, BrokerError> {
        Ok(self.with(|o| o.secrets.get(&key(namespace, name)).cloned()))
    }
}

#[async_trait]
impl crate::sweep::PodLister for MemoryCluster {
    async fn pod_uids(
        &self,
        namespace: &str,
    ) -> Result<std::collections::HashSet<String>, BrokerError> {
        Ok(self.with(|o| {
            o.pods
                .iter()
                .filter(|((ns, _), _)| ns == namespace)
                .filter_map(|(_, pod)| pod.metadata.uid.clone())
                .collect()
        }))
    }
}
