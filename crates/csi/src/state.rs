//! Per-volume metadata in `--state-dir`: enough to resume after a restart
//! without re-issuing, never the credential itself.

use std::io;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::broker::{CertificateProfile, LeaseRef, PodInfo, VolumeRef};

/// The certificate a certificate volume holds (its key exists only in the volume).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldCertificate {
    /// Lower-case hex serial: released (revoked) when a renewal replaces it.
    pub serial: String,
    /// What it was issued for.
    pub profile: CertificateProfile,
}

/// What the driver remembers about a published volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// CSI volume id.
    pub volume_id: String,
    /// Where it is mounted.
    pub target_path: PathBuf,
    /// The lease.
    pub lease: LeaseRef,
    /// The pod.
    pub pod: PodInfo,
    /// The node.
    pub node_name: String,
    /// Credential version in the volume.
    pub version: u64,
    /// When that credential expires.
    pub expires_at: Timestamp,
    /// When the driver will refresh it (jittered).
    pub renew_at: Timestamp,
    /// Group owner of the files, if any.
    pub gid: Option<u32>,
    /// When the record was last written.
    pub updated_at: Timestamp,
    /// Set for a certificate lease's volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<HeldCertificate>,
}

impl VolumeRecord {
    /// The broker's view of this volume.
    pub fn volume_ref(&self) -> VolumeRef {
        VolumeRef {
            volume_id: self.volume_id.clone(),
            lease: self.lease.clone(),
            pod: self.pod.clone(),
            node_name: self.node_name.clone(),
        }
    }
}

/// State store errors.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or creating state failed.
    #[error("{op} {}", path.display())]
    Io {
        /// Operation.
        op: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A record could not be written atomically.
    #[error("write {}", path.display())]
    Write {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: leasehold_files::FilesError,
    },
    /// A record is not valid JSON of the expected shape.
    #[error("corrupt record {}", path.display())]
    Corrupt {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

/// Records under `state_dir/volumes` (live volumes) and
/// `state_dir/pending-release` (unpublished, release not yet acknowledged).
#[derive(Debug, Clone)]
pub struct StateStore {
    volumes: PathBuf,
    pending: PathBuf,
}

/// Which set a record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// A published volume.
    Volume,
    /// An unpublished volume whose release the broker has not confirmed.
    PendingRelease,
}

impl StateStore {
    /// Creates the directories (0700) if needed.
    pub fn open(state_dir: &Path) -> Result<Self, StateError> {
        use std::os::unix::fs::DirBuilderExt;
        let store = Self {
            volumes: state_dir.join("volumes"),
            pending: state_dir.join("pending-release"),
        };
        for dir in [&store.volumes, &store.pending] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| StateError::Io {
                    op: "mkdir",
                    path: dir.clone(),
                    source,
                })?;
        }
        Ok(store)
    }

    fn path(&self, kind: RecordKind, volume_id: &str) -> PathBuf {
        let dir = match kind {
            RecordKind::Volume => &self.volumes,
            RecordKind::PendingRelease => &self.pending,
        };
        dir.join(format!("{volume_id}.json"))
    }

    /// Loads a record; `None` when absent.
    pub fn load(
        &self,
        kind: RecordKind,
        volume_id: &str,
    ) -> Result<Option<VolumeRecord>, StateError> {
        let path = self.path(kind, volume_id);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Io {
                    op: "read",
                    path,
                    source,
                });
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StateError::Corrupt { path, source })
    }

    /// Writes a record atomically at 0600.
    pub fn save(&self, kind: RecordKind, record: &VolumeRecord) -> Result<(), StateError> {
        let path = self.path(kind, &record.volume_id);
        let json = serde_json::to_vec_pretty(record).map_err(|source| StateError::Corrupt {
            path: path.clone(),
            source,
        })?;
        leasehold_files::write_file_atomic(&path, &json, 0o600)
            .map_err(|source| StateError::Write { path, source })
    }

    /// Removes a record; succeeds when absent.
    pub fn remove(&self, kind: RecordKind, volume_id: &str) -> Result<(), StateError> {
        let path = self.path(kind, volume_id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io {
                op: "remove",
                path,
                source,
            }),
        }
    }

    /// All records of a kind; corrupt ones are reported, not fatal.
    pub fn list(
        &self,
        kind: RecordKind,
    ) -> Result<Vec<Result<VolumeRecord, StateError>>, StateError> {
        let dir = match kind {
            RecordKind::Volume => &self.volumes,
            RecordKind::PendingRelease => &self.pending,
        };
        let entries = std::fs::read_dir(dir).map_err(|source| StateError::Io {
            op: "read_dir",
            path: dir.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".json")
                && !name.starts_with('.')
            {
                match self.load(kind, id) {
                    Ok(Some(r)) => out.push(Ok(r)),
                    Ok(None) => {}
                    Err(e) => out.push(Err(e)),
                }
            }
        }
        Ok(out)
    }
}
