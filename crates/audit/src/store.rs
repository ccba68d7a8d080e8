//! Where the last signed checkpoint is kept so a restarted writer continues the chain:
//! a ConfigMap in the cluster, a file in local mode, memory in tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::AuditError;

/// Field manager of the checkpoint ConfigMap's server-side apply.
pub const FIELD_MANAGER: &str = "leasehold-audit";
/// ConfigMap data key holding the checkpoint JSON.
pub const CHECKPOINT_KEY: &str = "checkpoint.json";

/// The last checkpoint written (and fsynced) by the log.
///
/// `seq`/`hash`/`signature`/`key_id` are what the checkpoint record signs (the record
/// before it); `record_seq`/`record_hash` are the checkpoint record itself, where a
/// restarted writer continues the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: String,
    pub signature: String,
    pub key_id: String,
    pub record_seq: u64,
    pub record_hash: String,
}

/// Persistence of the last checkpoint.
#[async_trait]
pub trait CheckpointStore: Send + Sync {
    /// The last saved checkpoint, `None` if there is none yet.
    async fn load(&self) -> Result<Option<Checkpoint>, AuditError>;
    /// Replace the saved checkpoint.
    async fn save(&self, checkpoint: &Checkpoint) -> Result<(), AuditError>;
}

/// In memory, for tests; [`MemoryCheckpointStore::watch`] lets a test wait for a save.
#[derive(Debug, Clone)]
pub struct MemoryCheckpointStore {
    current: Arc<watch::Sender<Option<Checkpoint>>>,
}

impl Default for MemoryCheckpointStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryCheckpointStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            current: Arc::new(watch::Sender::new(None)),
        }
    }

    /// Follow the saved checkpoint.
    pub fn watch(&self) -> watch::Receiver<Option<Checkpoint>> {
        self.current.subscribe()
    }

    /// Overwrite the stored value (tests simulating a reset or a forged store).
    pub fn set(&self, checkpoint: Option<Checkpoint>) {
        self.current.send_replace(checkpoint);
    }
}

#[async_trait]
impl CheckpointStore for MemoryCheckpointStore {
    async fn load(&self) -> Result<Option<Checkpoint>, AuditError> {
        Ok(self.current.borrow().clone())
    }

    async fn save(&self, checkpoint: &Checkpoint) -> Result<(), AuditError> {
        self.current.send_replace(Some(checkpoint.clone()));
        Ok(())
    }
}

/// A JSON file (local mode), replaced atomically (temporary file, fsync, rename).
#[derive(Debug, Clone)]
pub struct FileCheckpointStore {
    path: PathBuf,
}

impl FileCheckpointStore {
    /// The store at `path` (created on the first save).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[async_trait]
impl CheckpointStore for FileCheckpointStore {
    async fn load(&self) -> Result<Option<Checkpoint>, AuditError> {
        let text = match tokio::fs::read_to_string(&self.path).await {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(AuditError::io(format!(
                    "cannot read {}",
                    self.path.display()
                ))(e));
            }
        };
        serde_json::from_str(&text).map(Some).map_err(|e| {
            AuditError::Store(format!("{} is not a checkpoint: {e}", self.path.display()))
        })
    }

    async fn save(&self, checkpoint: &Checkpoint) -> Result<(), AuditError> {
        let json = serde_json::to_vec_pretty(checkpoint)
            .map_err(|e| AuditError::Store(format!("cannot encode the checkpoint: {e}")))?;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write_atomically(&path, &json))
            .await
            .map_err(|e| AuditError::Store(format!("checkpoint writer task failed: {e}")))?
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), AuditError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(AuditError::io(format!("cannot create {}", tmp.display())))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(AuditError::io(format!("cannot write {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(AuditError::io(format!(
        "cannot rename {} to {}",
        tmp.display(),
        path.display()
    )))?;
    // Make the rename itself durable.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(AuditError::io(format!("cannot sync {}", dir.display())))?;
    }
    Ok(())
}

/// A ConfigMap (`data["checkpoint.json"]`), written with server-side apply under the
/// field manager [`FIELD_MANAGER`].
#[derive(Clone)]
pub struct KubeCheckpointStore {
    api: Api<ConfigMap>,
    namespace: String,
    name: String,
}

impl std::fmt::Debug for KubeCheckpointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeCheckpointStore")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl KubeCheckpointStore {
    /// The ConfigMap `namespace/name`.
    pub fn new(
        client: kube::Client,
        namespace: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        let namespace = namespace.into();
        Self {
            api: Api::namespaced(client, &namespace),
            namespace,
            name: name.into(),
        }
    }
}

/// The apply body of the checkpoint ConfigMap.
pub fn configmap_body(
    namespace: &str,
    name: &str,
    checkpoint: &Checkpoint,
) -> Result<serde_json::Value, AuditError> {
    let json = serde_json::to_string(checkpoint)
        .map_err(|e| AuditError::Store(format!("cannot encode the checkpoint: {e}")))?;
    Ok(serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/managed-by": "leasehold",
                "app.kubernetes.io/component": "audit",
            },
        },
        "data": { CHECKPOINT_KEY: json },
    }))
}

/// The checkpoint in a ConfigMap, `None` if it has no checkpoint key.
pub fn checkpoint_from_configmap(configmap: &ConfigMap) -> Result<Option<Checkpoint>, AuditError> {
    let Some(json) = configmap
        .data
        .as_ref()
        .and_then(|data| data.get(CHECKPOINT_KEY))
    else {
        return Ok(None);
    };
    serde_json::from_str(json).map(Some).map_err(|e| {
        AuditError::Store(format!(
            "the checkpoint ConfigMap holds no valid checkpoint: {e}"
        ))
    })
}

#[async_trait]
impl CheckpointStore for KubeCheckpointStore {
    async fn load(&self) -> Result<Option<Checkpoint>, AuditError> {
        let configmap = self.api.get_opt(&self.name).await.map_err(|e| {
            AuditError::Store(format!(
                "cannot read ConfigMap {}/{}: {e}",
                self.namespace, self.name
            ))
        })?;
        match configmap {
            Some(configmap) => checkpoint_from_configmap(&configmap),
            None => Ok(None),
        }
    }

    async fn save(&self, checkpoint: &Checkpoint) -> Result<(), AuditError> {
        let body = configmap_body(&self.namespace, &self.name, checkpoint)?;
        self.api
            .patch(
                &self.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(body),
            )
            .await
            .map_err(|e| {
                AuditError::Store(format!(
                    "cannot write ConfigMap {}/{}: {e}",
                    self.namespace, self.name
                ))
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            seq: 99,
            hash: "ab".repeat(32),
            signature: "c2ln".to_owned(),
            key_id: "0123456789abcdef0123456789abcdef".to_owned(),
            record_seq: 100,
            record_hash: "cd".repeat(32),
        }
    }

    #[test]
    fn configmap_body_holds_the_checkpoint() {
        let body = configmap_body("leasehold-system", "leasehold-audit", &sample()).expect("body");
        assert_eq!(body["apiVersion"], "v1");
        assert_eq!(body["kind"], "ConfigMap");
        assert_eq!(body["metadata"]["namespace"], "leasehold-system");
        assert_eq!(body["metadata"]["name"], "leasehold-audit");
        assert_eq!(
            body["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "leasehold"
        );
        let configmap: ConfigMap = serde_json::from_value(body).expect("a ConfigMap");
        assert_eq!(
            checkpoint_from_configmap(&configmap).expect("parses"),
            Some(sample())
        );
        assert_eq!(
            checkpoint_from_configmap(&ConfigMap::default()).expect("empty"),
            None
        );
    }

    #[tokio::test]
    async fn file_store_round_trip() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileCheckpointStore::new(dir.path().join("checkpoint.json"));
        assert_eq!(store.load().await.expect("load"), None);
        store.save(&sample()).await.expect("save");
        let mut next = sample();
        next.record_seq = 200;
        store.save(&next).await.expect("save");
        assert_eq!(store.load().await.expect("load"), Some(next));
        let mode = std::fs::metadata(store.path())
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!dir.path().join("checkpoint.json.tmp").exists());
    }

    #[tokio::test]
    async fn file_store_rejects_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("checkpoint.json");
        std::fs::write(&path, "not json").expect("write");
        assert!(matches!(
            FileCheckpointStore::new(path).load().await,
            Err(AuditError::Store(_))
        ));
    }
}
