//! The controller's audit trail: its Ed25519 signing key in a Secret (made on first
//! start), its checkpoint in a ConfigMap, both in the controller's namespace. Only the
//! leader writes the trail.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use leasehold_audit::{
    Action, AuditError, AuditEvent, AuditLog, AuditMetrics, AuditSettings, AuditSigner, Checkpoint,
    CheckpointStore, KubeCheckpointStore, Outcome, Sink,
};

use crate::OperatorError;
use crate::leader::LeadershipFence;

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

/// Start the audit trail (when this replica leads), counting into `metrics`. Checkpoints
/// are saved only while `fence` says this replica leads: a deposed leader (a periodic or
/// final checkpoint after it was frozen past its lease) must not overwrite the checkpoint
/// the new leader continues from.
pub async fn start(
    client: &Client,
    config: &AuditConfig,
    metrics: AuditMetrics,
    fence: LeadershipFence,
) -> Result<AuditLog, OperatorError> {
    let (signer, generated) =
        signing_key(client, &config.namespace, &config.signing_key_secret).await?;
    let key_id = signer.key_id().to_owned();
    let store = Arc::new(FencedCheckpointStore {
        inner: KubeCheckpointStore::new(
            client.clone(),
            &config.namespace,
            &config.checkpoint_configmap,
        ),
        fence,
    });
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

/// A checkpoint store that saves only while this replica leads.
#[derive(Debug)]
pub struct FencedCheckpointStore<S> {
    pub inner: S,
    pub fence: LeadershipFence,
}

#[async_trait::async_trait]
impl<S: CheckpointStore> CheckpointStore for FencedCheckpointStore<S> {
    async fn load(&self) -> Result<Option<Checkpoint>, AuditError> {
        self.inner.load().await
    }

    async fn save(&self, checkpoint: &Checkpoint) -> Result<(), AuditError> {
        self.fence
            .check()
            .map_err(|e| AuditError::Store(format!("checkpoint not saved: {e}")))?;
        self.inner.save(checkpoint).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leader::Clocks;
    use leasehold_audit::MemoryCheckpointStore;

    fn checkpoint(seq: u64) -> Checkpoint {
        Checkpoint {
            seq,
            hash: "h".into(),
            signature: "s".into(),
            key_id: "k".into(),
            record_seq: seq + 1,
            record_hash: "r".into(),
        }
    }

    #[tokio::test]
    async fn a_replica_that_stopped_leading_saves_no_checkpoint() {
        let memory = MemoryCheckpointStore::new();
        let fence = LeadershipFence::new("lh/lh-controller", std::time::Duration::from_secs(10));
        let store = FencedCheckpointStore {
            inner: memory.clone(),
            fence: fence.clone(),
        };
        fence.acquired(Clocks::now());
        store.save(&checkpoint(1)).await.unwrap();
        assert_eq!(memory.load().await.unwrap(), Some(checkpoint(1)));

        // Deposed (another holder, or frozen past its renew deadline): the checkpoint the
        // new leader continues from stays as it is.
        fence.step_down();
        let refused = store.save(&checkpoint(2)).await.unwrap_err();
        assert!(refused.to_string().contains("NotLeader"), "{refused}");
        assert_eq!(memory.load().await.unwrap(), Some(checkpoint(1)));
        assert_eq!(store.load().await.unwrap(), Some(checkpoint(1)));
    }
}
