//! The broker inside the controller: served by the elected leader only.
//!
//! The leader labels its own pod `leasehold.dev/leader=true`; the chart's broker Service
//! selects that label, so consumer records have a single writer.

use std::net::SocketAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use leasehold_api::{RotationPolicy, SecretLease};
use leasehold_auth::{HttpKeySource, TokenVerifier, VerifierConfig};
use leasehold_broker::{
    BrokerConfig, BrokerMetrics, BrokerService, BrokerTls, CachedClusterView, ClusterView,
    CoalescingRecorder, EnginePerPodIssuer, KubePodCredentialStore, KubePodLister, PodCertificates,
    TlsSettings, Verifiers,
};
use leasehold_engine::BackendRegistry;
use tracing::{info, warn};

use crate::OperatorError;
use crate::leader::LeadershipFence;

/// The label the broker Service selects.
pub const LEADER_LABEL: &str = "leasehold.dev/leader";

/// How the broker runs.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// Where the broker listens (TLS).
    pub addr: SocketAddr,
    /// The controller's (release) namespace: TLS Secret, CA ConfigMap, node driver SA.
    pub namespace: String,
    /// Name of the broker Service (DNS names of the generated certificate).
    pub service: String,
    /// Secret the generated CA and serving certificate are kept in.
    pub generated_secret: String,
    /// ConfigMap the CA is published in (key `ca.crt`) for the node drivers.
    pub ca_configmap: String,
    /// A user-provided TLS Secret (`tls.crt`, `tls.key`, optional `ca.crt`) instead.
    pub user_secret: Option<String>,
    /// The node drivers' service account (in `namespace`); no one else may call.
    pub node_service_account: String,
    /// Audience of the node drivers' own tokens.
    pub node_token_audience: String,
    /// Audience of pod tokens (the CSIDriver's tokenRequests).
    pub pod_token_audience: String,
    /// Namespaces the controller reconciles (empty: all): where per-pod users are swept.
    pub namespaces: Vec<String>,
    /// How often per-pod users of pods that no longer exist are revoked (a node that
    /// vanished never unpublishes, and a driver killed mid-publish never releases).
    pub per_pod_sweep: std::time::Duration,
    /// Seals the secret material the broker stores (per-pod passwords, the generated CA
    /// and serving keys); [`leasehold_envelope::Keyring::unencrypted`] to opt out.
    pub keyring: Arc<leasehold_envelope::Keyring>,
}

/// Set or remove the leader label on this controller's pod.
pub async fn label_leader(
    client: &Client,
    namespace: &str,
    pod: &str,
    leader: bool,
) -> Result<(), OperatorError> {
    let value = if leader {
        serde_json::json!("true")
    } else {
        serde_json::Value::Null
    };
    let patch = serde_json::json!({ "metadata": { "labels": { LEADER_LABEL: value } } });
    Api::<Pod>::namespaced(client.clone(), namespace)
        .patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Build the broker and serve it until `stop` completes. Calls are answered, and pods
/// swept, only while `fence` says this replica leads.
pub async fn run(
    client: Client,
    settings: BrokerSettings,
    metrics: BrokerMetrics,
    certificates: Arc<PodCertificates>,
    audit: leasehold_audit::AuditLog,
    fence: LeadershipFence,
    stop: impl Future<Output = ()> + Send,
) -> Result<(), OperatorError> {
    let tls = match &settings.user_secret {
        Some(name) => BrokerTls::from_secret(client.clone(), &settings.namespace, name)
            .await
            .map_err(|e| OperatorError::Broker(format!("broker TLS Secret {name}: {e}")))?,
        None => {
            let tls_settings = TlsSettings::new(
                settings.namespace.clone(),
                settings.service.clone(),
                settings.generated_secret.clone(),
                settings.ca_configmap.clone(),
            );
            let tls = BrokerTls::ensure(client.clone(), &tls_settings, &settings.keyring)
                .await
                .map_err(|e| OperatorError::Broker(format!("broker TLS: {e}")))?;
            tls.spawn_renewal(
                client.clone(),
                tls_settings,
                settings.keyring.clone(),
                std::time::Duration::from_secs(3600),
            );
            tls
        }
    };
    let verifier = |audience: &str| -> Result<Arc<TokenVerifier>, OperatorError> {
        TokenVerifier::new(
            VerifierConfig::new(audience),
            HttpKeySource::new(client.clone()),
        )
        .map(Arc::new)
        .map_err(|e| OperatorError::Broker(format!("token verifier: {e}")))
    };
    let verifiers = Verifiers {
        node: verifier(&settings.node_token_audience)?,
        pod: verifier(&settings.pod_token_audience)?,
    };
    // Watch caches of the objects every publish reads, in the watched namespaces;
    // reads go live until they have synced and whenever they may lag. The
    // reflectors stop when the broker (the last holder of the view) is dropped.
    let cluster: Arc<dyn ClusterView> = Arc::new(CachedClusterView::start(
        client.clone(),
        &settings.namespaces,
        &settings.namespace,
        metrics.cluster_reads(),
    ));
    let per_pod = Arc::new(EnginePerPodIssuer::new(
        cluster.clone(),
        Arc::new(KubePodCredentialStore::new(
            client.clone(),
            settings.keyring.clone(),
        )),
        BackendRegistry::new(4),
    ));
    let sweeper = tokio::spawn(sweep_per_pod_users(
        client.clone(),
        per_pod.clone(),
        certificates.clone(),
        settings.namespaces.clone(),
        settings.per_pod_sweep,
        fence.clone(),
    ));
    let service = BrokerService::new(
        BrokerConfig::new(
            settings.namespace.clone(),
            settings.node_service_account.clone(),
        ),
        verifiers,
        cluster,
        Arc::new(CoalescingRecorder::kube(client.clone())),
    )
    .with_per_pod(per_pod)
    .with_certificates(certificates)
    .with_metrics(metrics)
    .with_audit(audit)
    .with_keyring(settings.keyring.clone())
    .only_while(Arc::new(move || fence.check().map_err(|e| e.to_string())));
    info!(addr = %settings.addr, "broker serving");
    let served = leasehold_broker::serve(settings.addr, &tls, service, stop)
        .await
        .map_err(|e| {
            warn!(error = %e, "broker stopped");
            OperatorError::Broker(e.to_string())
        });
    sweeper.abort();
    served
}

/// Every `every`: for each perPod lease, revoke the per-pod users whose pod no longer
/// exists, and for each certificate lease the certificates of pods that no longer exist.
/// A record's pod is looked up in the record's own namespace (a lease's volumes may be
/// mounted from the namespaces its policy admits), listed after the records were read,
/// so a pod created meanwhile is never mistaken for a gone one.
async fn sweep_per_pod_users(
    client: Client,
    issuer: Arc<EnginePerPodIssuer>,
    certificates: Arc<PodCertificates>,
    namespaces: Vec<String>,
    every: std::time::Duration,
    fence: LeadershipFence,
) {
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    let pods = KubePodLister::new(client.clone());
    loop {
        tokio::time::sleep(every).await;
        // A replica frozen past its lease drops nothing when it resumes: the leader sweeps.
        if let Err(e) = fence.check() {
            warn!(error = %e, "per-pod sweep skipped: not the leader");
            continue;
        }
        for scope in &scopes {
            let leases: Api<SecretLease> = match scope {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
            };
            let leases = match leases.list(&Default::default()).await {
                Ok(l) => l,
                Err(e) => {
                    warn!(error = %e, "per-pod sweep: cannot list SecretLeases");
                    continue;
                }
            };
            for lease in leases.items.iter().filter(|l| l.spec.per_pod) {
                if let Err(e) = sweep_lease(&client, &issuer, &pods, lease).await {
                    warn!(lease = %lease.name_any(), error = %e, "per-pod sweep failed; retried next time");
                }
            }
            for lease in leases.items.iter().filter(|l| l.spec.certificate.is_some()) {
                if let Err(e) = sweep_certificates(&certificates, &pods, lease).await {
                    warn!(lease = %lease.name_any(), error = %e, "certificate sweep failed; retried next time");
                }
            }
        }
    }
}

/// Revoke the per-pod certificates of `lease` whose pod no longer exists.
async fn sweep_certificates(
    certificates: &PodCertificates,
    pods: &KubePodLister,
    lease: &SecretLease,
) -> Result<(), OperatorError> {
    let report = certificates
        .sweep_lease(lease, pods)
        .await
        .map_err(|e| OperatorError::Broker(e.to_string()))?;
    if !report.revoked.is_empty() || !report.failed.is_empty() {
        info!(
            lease = %format!("{}/{}", lease.namespace().unwrap_or_default(), lease.name_any()),
            revoked = ?report.revoked,
            failed = ?report.failed,
            "certificate sweep: certificates of pods that no longer exist"
        );
    }
    Ok(())
}

async fn sweep_lease(
    client: &Client,
    issuer: &EnginePerPodIssuer,
    pods: &KubePodLister,
    lease: &SecretLease,
) -> Result<(), OperatorError> {
    let ns = lease.namespace().unwrap_or_default();
    let Some(policy) = Api::<RotationPolicy>::namespaced(client.clone(), &ns)
        .get_opt(&lease.spec.policy_ref.name)
        .await?
    else {
        return Ok(());
    };
    let report = issuer
        .sweep_lease(lease, &policy, pods)
        .await
        .map_err(|e| OperatorError::Broker(e.to_string()))?;
    if !report.revoked.is_empty() || !report.failed.is_empty() {
        info!(
            lease = %format!("{ns}/{}", lease.name_any()),
            revoked = report.revoked.len(),
            failed = report.failed.len(),
            "per-pod sweep: users of pods that no longer exist"
        );
    }
    Ok(())
}
