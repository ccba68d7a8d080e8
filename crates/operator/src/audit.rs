//! The controller's audit trail: its Ed25519 signing key in a Secret (made on first
//! start), its checkpoint in a ConfigMap, both in the controller's namespace. Only the
//! leader writes the trail.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use leasehold_audit::{
    Action, AuditEvent, AuditLog, AuditMetrics, AuditSettings, AuditSigner, KubeCheckpointStore,
    Outcome, Sink,
};

use crate::OperatorError;

/// Secret key holding the PKCS#8 PEM private key.
pub const SIGNING_KEY_KEY: &str = "signing-key.pem";
/// Secret key holding the PEM public key (what `leasehold audit verify --public-key` takes).
pub const PUBLIC_KEY_KEY: &str = "public-key.pem";

/// Where and how the controller keeps its audit trail.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Where records go (stdout, a file, webhooks).
    pub sinks: Vec<Sink>,
    /// The controller's namespace (signing key Secret, checkpoint ConfigMap).
    pub namespace: String,
    /// Secret with the signing key (created with a new key if missing).
    pub signing_key_secret: String,
    /// ConfigMap with the last checkpoint (the chain continues from it after a restart).
    pub checkpoint_configmap: String,
    pub settings: AuditSettings,
}

/// The signing key from `namespace/name`, or a new one stored there if it does not exist.
pub async fn signing_key(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<(AuditSigner, bool), OperatorError> {
    let api = Api::<Secret>::namespaced(client.clone(), namespace);
    let from = |secret: &Secret| -> Result<AuditSigner, OperatorError> {
        let pem = secret
            .data
            .as_ref()
            .and_then(|d| d.get(SIGNING_KEY_KEY))
            .ok_or_else(|| {
                OperatorError::Config(format!(
                    "audit signing key Secret {namespace}/{name} has no {SIGNING_KEY_KEY}"
                ))
            })?;
        let pem = std::str::from_utf8(&pem.0).map_err(|_| {
            OperatorError::Config(format!(
                "audit signing key Secret {namespace}/{name}: {SIGNING_KEY_KEY} is not PEM"
            ))
        })?;
        AuditSigner::from_pkcs8_pem(pem).map_err(|e| {
            OperatorError::Config(format!("audit signing key Secret {namespace}/{name}: {e}"))
        })
    };
    if let Some(secret) = api.get_opt(name).await? {
        return Ok((from(&secret)?, false));
    }
    let signer = AuditSigner::generate();
    let private = signer
        .to_pkcs8_pem()
        .map_err(|e| OperatorError::Config(format!("cannot encode the audit signing key: {e}")))?;
    let public = signer
        .public_key_pem()
        .map_err(|e| OperatorError::Config(format!("cannot encode the audit public key: {e}")))?;
    let data = BTreeMap::from([
        (
            SIGNING_KEY_KEY.to_owned(),
            ByteString(private.as_bytes().to_vec()),
        ),
        (PUBLIC_KEY_KEY.to_owned(), ByteString(public.into_bytes())),
    ]);
    match crate::keys::create_key_secret(&api, namespace, name, data).await? {
        None => Ok((signer, true)),
        // Another replica made it first: use that one.
        Some(theirs) => Ok((from(&theirs)?, false)),
    }
}

/// Start the audit trail (when this replica leads), counting into `metrics`.
pub async fn start(
    client: &Client,
    config: &AuditConfig,
    metrics: AuditMetrics,
) -> Result<AuditLog, OperatorError> {
    let (signer, generated) =
        signing_key(client, &config.namespace, &config.signing_key_secret).await?;
    let key_id = signer.key_id().to_owned();
    let store = Arc::new(KubeCheckpointStore::new(
        client.clone(),
        &config.namespace,
        &config.checkpoint_configmap,
    ));
    let log = AuditLog::start_with_metrics(
        config.sinks.clone(),
        signer,
        store,
        config.settings.clone(),
        metrics,
    )
    .await
    .map_err(|e| OperatorError::Config(format!("cannot start the audit trail: {e}")))?;
    if generated {
        log.record(
            AuditEvent::new(Action::KeyGenerate, Outcome::Success)
                .reason("audit signing key generated")
                .detail_kv("key_id", key_id)
                .detail_kv(
                    "secret",
                    format!("{}/{}", config.namespace, config.signing_key_secret),
                ),
        );
    }
    Ok(log)
}
