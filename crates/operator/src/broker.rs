//! The broker inside the controller: served by the elected leader only.
//!
//! The leader labels its own pod `leasehold.dev/leader=true`; the chart's broker Service
//! selects that label, so consumer records have a single writer.

use std::net::SocketAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use leasehold_auth::{HttpKeySource, TokenVerifier, VerifierConfig};
use leasehold_broker::{
    BrokerConfig, BrokerMetrics, BrokerService, BrokerTls, ClusterView, CoalescingRecorder,
    EnginePerPodIssuer, KubeClusterView, KubePodCredentialStore, TlsSettings, Verifiers,
};
use leasehold_engine::BackendRegistry;
use tracing::{info, warn};

use crate::OperatorError;

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

/// Build the broker and serve it until `stop` completes.
pub async fn run(
    client: Client,
    settings: BrokerSettings,
    metrics: BrokerMetrics,
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
            let tls = BrokerTls::ensure(client.clone(), &tls_settings)
                .await
                .map_err(|e| OperatorError::Broker(format!("broker TLS: {e}")))?;
            tls.spawn_renewal(
                client.clone(),
                tls_settings,
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
    let cluster: Arc<dyn ClusterView> = Arc::new(KubeClusterView::new(client.clone()));
    let per_pod = EnginePerPodIssuer::new(
        cluster.clone(),
        Arc::new(KubePodCredentialStore::new(client.clone())),
        BackendRegistry::new(4),
    );
    let service = BrokerService::new(
        BrokerConfig::new(
            settings.namespace.clone(),
            settings.node_service_account.clone(),
        ),
        verifiers,
        cluster,
        Arc::new(CoalescingRecorder::kube(client.clone())),
    )
    .with_per_pod(Arc::new(per_pod))
    .with_metrics(metrics);
    info!(addr = %settings.addr, "broker serving");
    leasehold_broker::serve(settings.addr, &tls, service, stop)
        .await
        .map_err(|e| {
            warn!(error = %e, "broker stopped");
            OperatorError::Broker(e.to_string())
        })
}
