//! The CSI Node service: publish, republish and unpublish of ephemeral volumes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::error::Error as StdError;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use jiff::{SignedDuration, Timestamp};
use leasehold_core::timing::StepClock;
use leasehold_files::{AtomicDir, FilesError, SecretBytes, WriteOptions};
use leasehold_proto::csi::v1 as csi;
use secrecy::SecretString;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::NodeDriverConfig;
use crate::auth::{AuthError, ExpectedPod, PodTokenVerifier};
use crate::broker::{
    BrokerError, CertificateProfile, CredentialBroker, IssuedCredential, VolumeRef,
};
use crate::certificate::{self, CertificateError};
use crate::context::{ContextError, PodVolume, VolumeContext};
use crate::metrics::NodeMetrics;
use crate::mount::{self, TmpfsOptions, Unmounted};
use crate::state::{HeldCertificate, RecordKind, StateError, StateStore, VolumeRecord};

/// Mode of credential files.
pub const FILE_MODE: u32 = 0o440;
/// Mode of directories, including the tmpfs root.
pub const DIR_MODE: u32 = 0o550;

/// Renders an error and its sources as one line, for our own logs.
pub fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Why a `NodePublishVolume` failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The request is malformed or asks for something we do not serve.
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// The volume context is incomplete or invalid.
    #[error(transparent)]
    Context(#[from] ContextError),
    /// The pod's token was not accepted.
    #[error("pod authentication failed")]
    Auth(#[source] AuthError),
    /// Another call for this volume is running.
    #[error("an operation on volume {0} is already in progress")]
    InFlight(String),
    /// Too many publishes are waiting.
    #[error("too many concurrent publishes; retry later")]
    Busy,
    /// Too many publishes (or renewals) of this lease are in progress.
    #[error("too many concurrent publishes of lease {0}; retry later")]
    LeaseBusy(String),
    /// The target already holds this volume for another lease or pod.
    #[error("volume {0} is already published with a different lease, pod or target")]
    Incompatible(String),
    /// The target is mounted, but not by us.
    #[error("target {} is already a {fs} mount", .0.display(), fs = .1)]
    ForeignMount(PathBuf, String),
    /// The broker failed.
    #[error("credential broker")]
    Broker(#[source] BrokerError),
    /// The broker's credential cannot be written.
    #[error("unusable credential from the broker: {0}")]
    BadCredential(String),
    /// A certificate volume's key, CSR or issued certificate failed.
    #[error("certificate")]
    Certificate(#[source] CertificateError),
    /// Creating the directory or mounting failed.
    #[error("mount tmpfs at {}", .0.display())]
    Mount(PathBuf, #[source] io::Error),
    /// Writing files failed.
    #[error("write credential files")]
    Files(#[source] FilesError),
    /// Metadata could not be saved or read.
    #[error("volume metadata")]
    State(#[source] StateError),
    /// A blocking task died.
    #[error("internal task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl PublishError {
    /// The gRPC code this error maps to.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            PublishError::InvalidArgument(_) => Code::InvalidArgument,
            PublishError::Context(ContextError::MissingToken(_)) => Code::Unauthenticated,
            PublishError::Context(_) => Code::InvalidArgument,
            PublishError::Auth(AuthError::Invalid(_)) => Code::Unauthenticated,
            PublishError::Auth(AuthError::Mismatch(_)) => Code::PermissionDenied,
            PublishError::Auth(AuthError::Unavailable(_)) => Code::Unavailable,
            PublishError::InFlight(_) => Code::Aborted,
            PublishError::Busy | PublishError::LeaseBusy(_) => Code::ResourceExhausted,
            PublishError::Incompatible(_) => Code::AlreadyExists,
            PublishError::ForeignMount(..) => Code::FailedPrecondition,
            PublishError::Broker(BrokerError::Unavailable(_)) => Code::Unavailable,
            PublishError::Broker(BrokerError::Refused { code, .. }) => match code {
                Code::PermissionDenied
                | Code::NotFound
                | Code::InvalidArgument
                | Code::FailedPrecondition
                | Code::Unauthenticated => *code,
                _ => Code::Internal,
            },
            PublishError::Broker(BrokerError::InvalidResponse(_))
            | PublishError::BadCredential(_)
            | PublishError::Certificate(_)
            | PublishError::Mount(..)
            | PublishError::Files(_)
            | PublishError::State(_)
            | PublishError::Task(_) => Code::Internal,
        }
    }
}

impl From<PublishError> for Status {
    fn from(err: PublishError) -> Self {
        // The top-level message plus the broker's or verifier's reason: none
        // of them carries a token or credential.
        let message = match &err {
            PublishError::Auth(e) => format!("{err}: {e}"),
            PublishError::Broker(e) => format!("{err}: {e}"),
            PublishError::Certificate(e) => format!("{err}: {e}"),
            _ => err.to_string(),
        };
        Status::new(err.code(), message)
    }
}

/// Why a `NodeUnpublishVolume` failed.
#[derive(Debug, thiserror::Error)]
pub enum UnpublishError {
    /// The request is malformed.
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// Another call for this volume is running.
    #[error("an operation on volume {0} is already in progress")]
    InFlight(String),
    /// Unmounting failed.
    #[error("unmount {}", .0.display())]
    Unmount(PathBuf, #[source] io::Error),
    /// Removing the target failed.
    #[error("remove {}", .0.display())]
    Remove(PathBuf, #[source] io::Error),
    /// Removing leftover files failed.
    #[error("remove files")]
    Files(#[source] FilesError),
    /// Metadata could not be updated.
    #[error("volume metadata")]
    State(#[source] StateError),
    /// A blocking task died.
    #[error("internal task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl From<UnpublishError> for Status {
    fn from(err: UnpublishError) -> Self {
        use tonic::Code;
        let code = match &err {
            UnpublishError::InvalidArgument(_) => Code::InvalidArgument,
            UnpublishError::InFlight(_) => Code::Aborted,
            UnpublishError::Unmount(..)
            | UnpublishError::Remove(..)
            | UnpublishError::Files(_)
            | UnpublishError::State(_)
            | UnpublishError::Task(_) => Code::Internal,
        };
        Status::new(code, err.to_string())
    }
}

/// Holds a volume id in the in-flight set until dropped.
struct InFlightGuard<'a> {
    set: &'a Mutex<HashSet<String>>,
    volume_id: String,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut set) = self.set.lock() {
            set.remove(&self.volume_id);
        }
    }
}

pub(crate) struct Inner {
    pub(crate) config: NodeDriverConfig,
    pub(crate) verifier: Arc<dyn PodTokenVerifier>,
    pub(crate) broker: Arc<dyn CredentialBroker>,
    pub(crate) state: StateStore,
    pub(crate) metrics: NodeMetrics,
    in_flight: Mutex<HashSet<String>>,
    published: Mutex<HashSet<String>>,
    publish_slots: Semaphore,
    republish_slots: Semaphore,
    /// Slots per lease (`namespace/name`), and how many wait for one.
    lease_slots: Mutex<HashMap<String, Arc<LeaseSlots>>>,
}

/// One lease's slots: fresh publishes and renewals each have their own, so a lease
/// whose fresh publishes hang still renews its published volumes.
struct LeaseSlots {
    fresh: LeaseQueue,
    renewals: LeaseQueue,
}

/// Slots of one kind for one lease, and the calls waiting for them.
struct LeaseQueue {
    slots: Arc<Semaphore>,
    waiting: std::sync::atomic::AtomicUsize,
}

impl LeaseQueue {
    fn new(slots: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(slots.max(1))),
            waiting: Default::default(),
        }
    }

    /// A slot at once if one is free; otherwise after a wait of at most `deadline`,
    /// if fewer than `max_waiting` calls already wait; `None` when neither.
    async fn acquire(
        &self,
        max_waiting: usize,
        deadline: std::time::Duration,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        use std::sync::atomic::Ordering;
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Some(permit);
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        let waited = tokio::time::timeout(deadline, self.slots.clone().acquire_owned()).await;
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        waited.ok().and_then(Result::ok)
    }
}

/// The Node service. Cheap to clone.
#[derive(Clone)]
pub struct NodeService {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for NodeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeService")
            .field("node_name", &self.inner.config.node_name)
            .finish_non_exhaustive()
    }
}

/// Renew time with jitter: at the broker's `renew_at` (or two thirds of the
/// remaining lifetime when it gave none), pulled earlier by up to 10 %, so
/// volumes issued together do not all renew in the same second.
pub fn renew_at(
    now: Timestamp,
    expires_at: Timestamp,
    broker_renew_at: Option<Timestamp>,
    jitter: f64,
) -> Timestamp {
    let lifetime = expires_at.duration_since(now);
    let target = broker_renew_at
        .map(|r| r.duration_since(now))
        .unwrap_or_else(|| lifetime.checked_mul(2).map_or(lifetime, |d| d / 3))
        .min(lifetime);
    if target.is_negative() {
        return now;
    }
    let factor = 1.0 - 0.1 * jitter.clamp(0.0, 1.0);
    let wait = SignedDuration::from_secs_f64(target.as_secs_f64() * factor);
    now.checked_add(wait).unwrap_or(expires_at)
}

/// Whether a failed `Issue` may have left something issued on the broker's
/// side: anything but a refusal the broker decides before issuing.
fn may_have_issued(error: &BrokerError) -> bool {
    use tonic::Code;
    match error {
        BrokerError::Unavailable(_) | BrokerError::InvalidResponse(_) => true,
        BrokerError::Refused { code, .. } => !matches!(
            code,
            Code::InvalidArgument | Code::Unauthenticated | Code::PermissionDenied | Code::NotFound
        ),
    }
}

/// Whether the broker refused the pod itself (access rules, pod or node
/// checks): the volume must stop holding a credential.
fn access_withdrawn(error: &BrokerError) -> bool {
    matches!(
        error,
        BrokerError::Refused {
            code: tonic::Code::PermissionDenied,
            ..
        }
    )
}

fn validate_volume_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else if id.is_empty() {
        Err("volume_id is required".into())
    } else {
        Err("volume_id must be at most 128 characters of [A-Za-z0-9._-]".into())
    }
}

/// A target path the kubelet would give: exactly
/// `<kubelet_dir>/pods/<pod uid>/volumes/kubernetes.io~csi/<volume name>/mount`.
/// Returns the path and the pod UID in it.
fn validate_target(path: &str, kubelet_dir: &Path) -> Result<(PathBuf, String), String> {
    if path.is_empty() {
        return Err("target_path is required".into());
    }
    let expected = || {
        format!(
            "target_path must be {}/pods/<pod uid>/volumes/kubernetes.io~csi/<volume>/mount",
            kubelet_dir.display()
        )
    };
    let p = Path::new(path);
    if !p.is_absolute() || path.contains('\0') {
        return Err(expected());
    }
    // Lexical: `..`, `.` or doubled separators never pass as a component below.
    let rest = p.strip_prefix(kubelet_dir).map_err(|_| expected())?;
    let parts: Vec<&str> = rest
        .components()
        .map(|c| match c {
            Component::Normal(s) => s.to_str().unwrap_or("/"),
            _ => "/",
        })
        .collect();
    let component_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    match parts.as_slice() {
        ["pods", uid, "volumes", "kubernetes.io~csi", name, "mount"]
            if component_ok(uid)
                && component_ok(name)
                && !path.contains("/./")
                && !path.ends_with("/.") =>
        {
            Ok((p.to_path_buf(), (*uid).to_owned()))
        }
        _ => Err(expected()),
    }
}

/// Checks the capability; returns the fsGroup to use, if any.
fn check_capability(cap: Option<&csi::VolumeCapability>) -> Result<Option<u32>, String> {
    use csi::volume_capability::AccessType;
    use csi::volume_capability::access_mode::Mode;
    let cap = cap.ok_or("volume_capability is required")?;
    let mount = match &cap.access_type {
        Some(AccessType::Mount(m)) => m,
        Some(AccessType::Block(_)) => return Err("block volumes are not supported".into()),
        None => return Err("volume_capability.access_type is required".into()),
    };
    if !mount.fs_type.is_empty() && mount.fs_type != "tmpfs" {
        return Err(format!(
            "fs_type {:?} is not supported (tmpfs only)",
            mount.fs_type
        ));
    }
    // The kubelet sends inline ephemeral volumes as ReadWriteOnce
    // (SINGLE_NODE_WRITER) whatever the pod says; read-only is carried by
    // `readonly` and enforced by modes. Multi-node writers make no sense here.
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown))
        .unwrap_or(Mode::Unknown);
    match mode {
        Mode::SingleNodeReaderOnly
        | Mode::MultiNodeReaderOnly
        | Mode::SingleNodeWriter
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => {}
        other => {
            return Err(format!(
                "access mode {} is not supported",
                other.as_str_name()
            ));
        }
    }
    if mount.volume_mount_group.is_empty() {
        Ok(None)
    } else {
        mount
            .volume_mount_group
            .parse::<u32>()
            .map(Some)
            .map_err(|_| "volume_mount_group must be a numeric group id".into())
    }
}

/// The mount at `target`, comparing canonical paths (the kubelet's root may be
/// a symlink).
fn mounted(target: &Path) -> io::Result<Option<mount::MountEntry>> {
    let canonical = match std::fs::canonicalize(target) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    mount::mount_at(&canonical)
}

/// What is mounted at `target` for the publish check: the filesystem type from
/// `statx`/`statfs` in constant time, falling back to `/proc/self/mountinfo` where the
/// kernel does not report mount roots. Only `fs_type` is filled in on the fast path.
fn mounted_for_check(target: &Path) -> io::Result<Option<mount::MountEntry>> {
    match mount::fs_type_if_mount_root(target)? {
        Some(None) => Ok(None),
        Some(Some(fs_type)) => Ok(Some(mount::MountEntry {
            mount_point: target.to_path_buf(),
            mount_options: String::new(),
            fs_type,
            super_options: String::new(),
        })),
        None => mounted(target),
    }
}

/// What a publish found at the target.
enum Existing {
    /// Our record and our mount: a republish.
    Live(Box<VolumeRecord>),
    /// Nothing usable: publish from scratch (with the last held version, if any).
    Fresh { held_version: u64, mounted: bool },
}

impl NodeService {
    pub(crate) fn new(
        config: NodeDriverConfig,
        verifier: Arc<dyn PodTokenVerifier>,
        broker: Arc<dyn CredentialBroker>,
        state: StateStore,
        metrics: NodeMetrics,
    ) -> Self {
        let published: HashSet<String> = state
            .list(RecordKind::Volume)
            .map(|records| records.into_iter().flatten().map(|r| r.volume_id).collect())
            .unwrap_or_default();
        metrics.set_volumes(published.len());
        if !published.is_empty() {
            info!(volumes = published.len(), "resuming volumes from metadata");
        }
        let slots = config.publish_concurrency.max(1);
        Self {
            inner: Arc::new(Inner {
                config,
                verifier,
                broker,
                state,
                metrics,
                in_flight: Mutex::new(HashSet::new()),
                published: Mutex::new(published),
                publish_slots: Semaphore::new(slots),
                republish_slots: Semaphore::new(slots),
                lease_slots: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn guard(&self, volume_id: &str) -> Option<InFlightGuard<'_>> {
        let mut set = self.inner.in_flight.lock().ok()?;
        if !set.insert(volume_id.to_owned()) {
            return None;
        }
        Some(InFlightGuard {
            set: &self.inner.in_flight,
            volume_id: volume_id.to_owned(),
        })
    }

    /// One of the lease's slots for a fresh publish or, with `renewal`, for a
    /// republish of a published volume: at once if one is free; otherwise after a wait
    /// in the lease's queue of that kind (at most `per_lease_waiting` calls wait, each
    /// at most the broker deadline), so many pods of one lease starting together all
    /// get published while a lease whose calls hang holds only its own slots, and its
    /// hanging fresh publishes never hold up its renewals.
    async fn lease_slot(
        &self,
        lease: &str,
        renewal: bool,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, PublishError> {
        let config = &self.inner.config;
        let slots = {
            let mut map = self
                .inner
                .lease_slots
                .lock()
                .map_err(|_| PublishError::Busy)?;
            map.entry(lease.to_owned())
                .or_insert_with(|| {
                    Arc::new(LeaseSlots {
                        fresh: LeaseQueue::new(config.per_lease_concurrency),
                        renewals: LeaseQueue::new(config.per_lease_renewal_slots()),
                    })
                })
                .clone()
        };
        let queue = if renewal {
            &slots.renewals
        } else {
            &slots.fresh
        };
        queue
            .acquire(config.per_lease_waiting, config.broker_timeout)
            .await
            .ok_or_else(|| PublishError::LeaseBusy(lease.to_owned()))
    }

    fn is_published(&self, volume_id: &str) -> bool {
        self.inner
            .published
            .lock()
            .is_ok_and(|set| set.contains(volume_id))
    }

    fn mark_published(&self, volume_id: &str, published: bool) {
        if let Ok(mut set) = self.inner.published.lock() {
            if published {
                set.insert(volume_id.to_owned());
            } else {
                set.remove(volume_id);
            }
            self.inner.metrics.set_volumes(set.len());
        }
    }

    async fn broker_call<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, BrokerError>>,
    ) -> Result<T, BrokerError> {
        match tokio::time::timeout(self.inner.config.broker_timeout, fut).await {
            Ok(result) => result,
            Err(_) => Err(BrokerError::Unavailable(format!(
                "no answer within {:?}",
                self.inner.config.broker_timeout
            ))),
        }
    }

    async fn blocking<T: Send + 'static, E>(
        f: impl FnOnce() -> Result<T, E> + Send + 'static,
        task_err: impl FnOnce(tokio::task::JoinError) -> E,
    ) -> Result<T, E>
    where
        E: Send + 'static,
    {
        tokio::task::spawn_blocking(f).await.map_err(task_err)?
    }

    async fn publish(&self, req: csi::NodePublishVolumeRequest) -> Result<(), PublishError> {
        let steps = StepClock::new(&self.inner.metrics);
        validate_volume_id(&req.volume_id).map_err(PublishError::InvalidArgument)?;
        let (target, target_pod_uid) =
            validate_target(&req.target_path, &self.inner.config.kubelet_dir)
                .map_err(PublishError::InvalidArgument)?;
        let gid = check_capability(req.volume_capability.as_ref())
            .map_err(PublishError::InvalidArgument)?;
        if !req.readonly {
            return Err(PublishError::InvalidArgument(
                "readonly must be true: set readOnly: true on the pod's csi volume".into(),
            ));
        }
        let context = VolumeContext::parse(&req.volume_context)?;
        let PodVolume { pod, lease } = context.pod_volume()?;
        if pod.uid != target_pod_uid {
            return Err(PublishError::InvalidArgument(
                "target_path is not under the pod's own directory (pod.uid differs)".into(),
            ));
        }
        let token = context.token_for(&self.inner.config.token_audience)?;
        drop(context);

        let volume_id = req.volume_id;
        let _guard = self
            .guard(&volume_id)
            .ok_or_else(|| PublishError::InFlight(volume_id.clone()))?;
        let volume = VolumeRef {
            volume_id: volume_id.clone(),
            lease,
            pod,
            node_name: self.inner.config.node_name.clone(),
        };

        let existing = {
            let state = self.inner.state.clone();
            let (id, t) = (volume_id.clone(), target.clone());
            Self::blocking(
                move || -> Result<_, PublishError> {
                    let record = state
                        .load(RecordKind::Volume, &id)
                        .map_err(PublishError::State)?;
                    let mount =
                        mounted_for_check(&t).map_err(|e| PublishError::Mount(t.clone(), e))?;
                    Ok((record, mount))
                },
                PublishError::Task,
            )
            .await?
        };
        let existing = match existing {
            (Some(record), Some(m)) if m.fs_type == "tmpfs" => {
                if record.lease != volume.lease
                    || record.pod.uid != volume.pod.uid
                    || record.target_path != target
                {
                    return Err(PublishError::Incompatible(volume_id));
                }
                Existing::Live(Box::new(record))
            }
            (_, Some(m)) if m.fs_type != "tmpfs" => {
                return Err(PublishError::ForeignMount(target, m.fs_type));
            }
            (record, m) => {
                if let Some(r) = &record
                    && (r.lease != volume.lease || r.pod.uid != volume.pod.uid)
                {
                    return Err(PublishError::Incompatible(volume_id));
                }
                Existing::Fresh {
                    held_version: record.map_or(0, |r| r.version),
                    mounted: m.is_some(),
                }
            }
        };

        let republish = matches!(existing, Existing::Live(_));
        steps.lap("check");
        // One lease may take only a few slots, and renewals have their own pool
        // and their own per-lease slots: a lease whose database hangs delays
        // neither other leases nor renewals of volumes already published (its
        // own included), and a few hanging leases leave renewal slots for the rest.
        let _lease_slot = self
            .lease_slot(&volume.lease.to_string(), republish)
            .await?;
        let slots = if republish {
            &self.inner.republish_slots
        } else {
            &self.inner.publish_slots
        };
        let _permit = tokio::time::timeout(self.inner.config.broker_timeout, slots.acquire())
            .await
            .map_err(|_| PublishError::Busy)?
            .map_err(|_| PublishError::Busy)?;
        let expected = ExpectedPod {
            namespace: volume.pod.namespace.clone(),
            pod_name: volume.pod.name.clone(),
            pod_uid: volume.pod.uid.clone(),
            service_account: volume.pod.service_account.clone(),
        };
        steps.lap("prepare");
        let verified = self
            .inner
            .verifier
            .verify(secrecy::ExposeSecret::expose_secret(&token), &expected)
            .await;
        steps.lap("verify_token");
        match verified {
            Ok(_) => {}
            Err(AuthError::Unavailable(reason)) if republish => {
                warn!(%reason, "token verifier unavailable on republish; keeping the current files");
                return Ok(());
            }
            Err(e) => {
                warn!(reason = %e, "pod token not accepted");
                return Err(PublishError::Auth(e));
            }
        }

        match existing {
            Existing::Live(record) if record.certificate.is_some() => {
                self.republish_certificate(*record, &token).await
            }
            Existing::Live(record) => self.republish(*record, &token).await,
            Existing::Fresh {
                held_version,
                mounted,
            } => {
                self.fresh_publish(volume, &token, target, gid, held_version, mounted)
                    .await
            }
        }
    }

    async fn fresh_publish(
        &self,
        volume: VolumeRef,
        token: &SecretString,
        target: PathBuf,
        gid: Option<u32>,
        held_version: u64,
        already_mounted: bool,
    ) -> Result<(), PublishError> {
        let steps = StepClock::new(&self.inner.metrics);
        let credential = match self
            .broker_call(self.inner.broker.issue(&volume, token, held_version))
            .await
        {
            Ok(c) => {
                steps.lap("broker_issue");
                c
            }
            Err(e) => {
                if may_have_issued(&e) {
                    // The broker may have created something (a per-pod user)
                    // before failing or before we gave up waiting: release it,
                    // now or from the background retry loop.
                    self.release_after_failed_issue(&volume, &target, gid).await;
                }
                return Err(PublishError::Broker(e));
            }
        };
        let (credential, held) = match credential.certificate {
            Some(profile) => match self.obtain_certificate(&volume, token, &profile, 1).await {
                Ok((credential, held)) => (credential, Some(held)),
                Err(e) => {
                    let issued = match &e {
                        PublishError::Broker(be) => may_have_issued(be),
                        PublishError::Certificate(CertificateError::Verify(_)) => true,
                        _ => false,
                    };
                    if issued {
                        self.release_after_failed_issue(&volume, &target, gid).await;
                    }
                    return Err(e);
                }
            },
            None => (credential, None),
        };
        let is_certificate = held.is_some();
        let version = credential.version;
        if let Err(e) = self
            .place(
                &volume,
                credential,
                target.clone(),
                gid,
                !already_mounted,
                held,
            )
            .await
        {
            // Undo: no half-published volume, and no credential left issued.
            let t = target.clone();
            let _ = Self::blocking(
                move || -> Result<(), io::Error> {
                    if !already_mounted && mounted(&t)?.is_some() {
                        mount::unmount(&t)?;
                    }
                    let _ = std::fs::remove_dir(&t);
                    Ok(())
                },
                |e| io::Error::other(e.to_string()),
            )
            .await
            .inspect_err(|ue| warn!(error = %ue, "cleanup after failed publish"));
            if let Err(re) = self.broker_call(self.inner.broker.release(&volume)).await {
                warn!(error = %re, "release after failed publish");
            }
            return Err(e);
        }
        steps.lap("place");
        self.mark_published(&volume.volume_id, true);
        // An earlier failed attempt may have queued a release: this credential supersedes it.
        if let Err(e) = self
            .inner
            .state
            .remove(RecordKind::PendingRelease, &volume.volume_id)
        {
            warn!(error = %error_chain(&e), "remove a superseded pending release");
        }
        info!(version, "volume published");
        if !is_certificate {
            // A pod's own certificate is no lease version: nothing to acknowledge.
            self.acknowledge(&volume, version).await;
            steps.lap("acknowledge");
        }
        Ok(())
    }

    /// A key made here, its CSR signed by the broker's issuer, checked with the key:
    /// the volume's files (`tls.key`, `tls.crt`, `ca.crt`) as a credential of `version`.
    async fn obtain_certificate(
        &self,
        volume: &VolumeRef,
        token: &SecretString,
        profile: &CertificateProfile,
        version: u64,
    ) -> Result<(IssuedCredential, HeldCertificate), PublishError> {
        let wanted = profile.clone();
        let (key, csr) = Self::blocking(
            move || certificate::key_and_csr(&wanted).map_err(PublishError::Certificate),
            PublishError::Task,
        )
        .await?;
        let issued = self
            .broker_call(self.inner.broker.issue_certificate(volume, token, &csr))
            .await
            .map_err(PublishError::Broker)?;
        certificate::check(&issued, &key, Timestamp::now())
            .await
            .map_err(PublishError::Certificate)?;
        let credential = IssuedCredential {
            files: certificate::files(&key, &issued),
            version,
            expires_at: issued.not_after,
            renew_at: Some(issued.renew_at),
            certificate: None,
        };
        debug!(serial = %issued.serial, "certificate issued and verified");
        Ok((
            credential,
            HeldCertificate {
                serial: issued.serial,
                profile: issued.profile,
            },
        ))
    }

    /// Republish of a certificate volume: nothing until the renew time; then a new
    /// key and certificate (for the names the broker gives now), written as one set,
    /// and the replaced certificate released (revoked).
    async fn republish_certificate(
        &self,
        mut record: VolumeRecord,
        token: &SecretString,
    ) -> Result<(), PublishError> {
        let volume = record.volume_ref();
        // The broker's access rules, on every republish as for other leases.
        match self
            .broker_call(self.inner.broker.acknowledge(&volume, record.version))
            .await
        {
            Ok(_) => {}
            Err(BrokerError::Unavailable(reason)) => {
                warn!(%reason, "broker unavailable on republish; keeping the current certificate");
                return Ok(());
            }
            Err(e) if access_withdrawn(&e) => return self.withdraw(record, e).await,
            Err(e) => warn!(error = %e, "acknowledge refused on republish"),
        }
        let now = Timestamp::now();
        if now < record.renew_at {
            debug!(version = record.version, "republish: certificate current");
            return Ok(());
        }
        info!(held = record.version, "renewing the certificate");
        let keep = |reason: &dyn std::fmt::Display| {
            warn!(%reason, "cannot renew now; keeping the current certificate");
            Ok(())
        };
        let profile = match self
            .broker_call(self.inner.broker.issue(&volume, token, record.version))
            .await
        {
            Ok(IssuedCredential {
                certificate: Some(profile),
                ..
            }) => profile,
            Ok(_) => {
                return Err(PublishError::BadCredential(
                    "the lease is no longer a certificate lease".into(),
                ));
            }
            Err(BrokerError::Unavailable(reason)) => return keep(&reason),
            Err(e) if access_withdrawn(&e) => return self.withdraw(record, e).await,
            Err(e) => return Err(PublishError::Broker(e)),
        };
        let (credential, held) = match self
            .obtain_certificate(&volume, token, &profile, record.version + 1)
            .await
        {
            Ok(issued) => issued,
            Err(PublishError::Broker(BrokerError::Unavailable(reason))) => return keep(&reason),
            Err(PublishError::Broker(e)) if access_withdrawn(&e) => {
                return self.withdraw(record, e).await;
            }
            // A certificate that did not verify stays recorded on the broker's side and
            // is revoked with the volume's release (or by the sweep).
            Err(e) => return Err(e),
        };
        let files = self.checked_files(credential.files)?;
        let replaced = record.certificate.replace(held).map(|c| c.serial);
        record.version = credential.version;
        record.expires_at = credential.expires_at;
        record.renew_at = renew_at(
            now,
            credential.expires_at,
            credential.renew_at,
            rand::random::<f64>(),
        );
        record.updated_at = now;
        let version = record.version;
        let state = self.inner.state.clone();
        Self::blocking(
            move || -> Result<(), PublishError> {
                AtomicDir::new(&record.target_path)
                    .write(
                        &files,
                        WriteOptions {
                            file_mode: FILE_MODE,
                            dir_mode: DIR_MODE,
                            gid: record.gid,
                        },
                    )
                    .map_err(PublishError::Files)?;
                state
                    .save(RecordKind::Volume, &record)
                    .map_err(PublishError::State)
            },
            PublishError::Task,
        )
        .await?;
        info!(version, "certificate renewed");
        if let Some(serial) = replaced {
            // On failure the broker keeps it recorded: the volume's release revokes it.
            match self
                .broker_call(self.inner.broker.release_certificate(&volume, &serial))
                .await
            {
                Ok(()) => debug!(%serial, "replaced certificate revoked"),
                Err(e) => warn!(%serial, error = %e, "cannot revoke the replaced certificate yet"),
            }
        }
        Ok(())
    }

    /// Best-effort `Release` after a failed `Issue`; on failure it is queued
    /// for [`Self::retry_pending_releases`].
    async fn release_after_failed_issue(
        &self,
        volume: &VolumeRef,
        target: &Path,
        gid: Option<u32>,
    ) {
        match self.broker_call(self.inner.broker.release(volume)).await {
            Ok(()) => debug!("released after a failed issue"),
            Err(e) => {
                warn!(error = %e, "release after a failed issue failed; will retry in the background");
                let now = Timestamp::now();
                let record = VolumeRecord {
                    volume_id: volume.volume_id.clone(),
                    target_path: target.to_path_buf(),
                    lease: volume.lease.clone(),
                    pod: volume.pod.clone(),
                    node_name: volume.node_name.clone(),
                    version: 0,
                    expires_at: now,
                    renew_at: now,
                    gid,
                    updated_at: now,
                    certificate: None,
                };
                if let Err(se) = self.inner.state.save(RecordKind::PendingRelease, &record) {
                    error!(error = %error_chain(&se), "cannot queue the release after a failed issue");
                }
            }
        }
    }

    /// Mounts (when asked), writes the files and saves the record.
    async fn place(
        &self,
        volume: &VolumeRef,
        credential: IssuedCredential,
        target: PathBuf,
        gid: Option<u32>,
        mount_first: bool,
        certificate: Option<HeldCertificate>,
    ) -> Result<(), PublishError> {
        let files = self.checked_files(credential.files)?;
        let now = Timestamp::now();
        let record = VolumeRecord {
            volume_id: volume.volume_id.clone(),
            target_path: target.clone(),
            lease: volume.lease.clone(),
            pod: volume.pod.clone(),
            node_name: volume.node_name.clone(),
            version: credential.version,
            expires_at: credential.expires_at,
            renew_at: renew_at(
                now,
                credential.expires_at,
                credential.renew_at,
                rand::random::<f64>(),
            ),
            gid,
            updated_at: now,
            certificate,
        };
        let size = self.inner.config.tmpfs_size_bytes;
        let state = self.inner.state.clone();
        Self::blocking(
            move || -> Result<(), PublishError> {
                if mount_first {
                    use std::os::unix::fs::DirBuilderExt;
                    match std::fs::DirBuilder::new().mode(0o750).create(&target) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(PublishError::Mount(target, e)),
                    }
                    mount::mount_tmpfs(
                        &target,
                        TmpfsOptions {
                            size_bytes: size,
                            mode: DIR_MODE,
                            gid,
                        },
                    )
                    .map_err(|e| PublishError::Mount(target.clone(), e))?;
                }
                AtomicDir::new(&target)
                    .write(
                        &files,
                        WriteOptions {
                            file_mode: FILE_MODE,
                            dir_mode: DIR_MODE,
                            gid,
                        },
                    )
                    .map_err(PublishError::Files)?;
                state
                    .save(RecordKind::Volume, &record)
                    .map_err(PublishError::State)
            },
            PublishError::Task,
        )
        .await
    }

    fn checked_files(
        &self,
        files: BTreeMap<String, SecretBytes>,
    ) -> Result<BTreeMap<String, SecretBytes>, PublishError> {
        use secrecy::ExposeSecret;
        if files.is_empty() {
            return Err(PublishError::BadCredential("no files".into()));
        }
        for name in files.keys() {
            leasehold_files::validate_name(name)
                .map_err(|e| PublishError::BadCredential(e.to_string()))?;
        }
        let total: u64 = files.values().map(|v| v.expose_secret().len() as u64).sum();
        // Two versions coexist during a swap.
        if total.saturating_mul(2) > self.inner.config.tmpfs_size_bytes {
            return Err(PublishError::BadCredential(format!(
                "{total} bytes do not fit twice in a {}-byte volume",
                self.inner.config.tmpfs_size_bytes
            )));
        }
        Ok(files)
    }

    async fn acknowledge(&self, volume: &VolumeRef, version: u64) -> Option<u64> {
        match self
            .broker_call(self.inner.broker.acknowledge(volume, version))
            .await
        {
            Ok(latest) => Some(latest),
            Err(e) => {
                warn!(version, error = %e, "acknowledge failed");
                None
            }
        }
    }

    async fn republish(
        &self,
        mut record: VolumeRecord,
        token: &SecretString,
    ) -> Result<(), PublishError> {
        let volume = record.volume_ref();
        let steps = StepClock::new(&self.inner.metrics);
        let acknowledged = self
            .broker_call(self.inner.broker.acknowledge(&volume, record.version))
            .await;
        steps.lap("acknowledge");
        let latest = match acknowledged {
            Ok(latest) => Some(latest),
            Err(BrokerError::Unavailable(reason)) => {
                warn!(%reason, version = record.version, "broker unavailable on republish; keeping the current files");
                return Ok(());
            }
            Err(e) if access_withdrawn(&e) => {
                return self.withdraw(record, e).await;
            }
            Err(e) => {
                warn!(error = %e, "acknowledge refused on republish");
                None
            }
        };
        let now = Timestamp::now();
        let newer = latest.is_some_and(|l| l > record.version);
        let due = now >= record.renew_at;
        if !newer && !due {
            debug!(version = record.version, "republish: credential current");
            return Ok(());
        }
        info!(held = record.version, ?latest, due, "refreshing credential");
        let credential = match self
            .broker_call(self.inner.broker.issue(&volume, token, record.version))
            .await
        {
            Ok(c) => {
                steps.lap("broker_issue");
                c
            }
            Err(BrokerError::Unavailable(reason)) => {
                warn!(%reason, "broker unavailable while refreshing; keeping the current files");
                return Ok(());
            }
            Err(e) if access_withdrawn(&e) => return self.withdraw(record, e).await,
            Err(e) => return Err(PublishError::Broker(e)),
        };
        let files = self.checked_files(credential.files)?;
        record.version = credential.version;
        record.expires_at = credential.expires_at;
        record.renew_at = renew_at(
            now,
            credential.expires_at,
            credential.renew_at,
            rand::random::<f64>(),
        );
        record.updated_at = now;
        let version = record.version;
        let state = self.inner.state.clone();
        let outcome = Self::blocking(
            move || -> Result<bool, PublishError> {
                let outcome = AtomicDir::new(&record.target_path)
                    .write(
                        &files,
                        WriteOptions {
                            file_mode: FILE_MODE,
                            dir_mode: DIR_MODE,
                            gid: record.gid,
                        },
                    )
                    .map_err(PublishError::Files)?;
                state
                    .save(RecordKind::Volume, &record)
                    .map_err(PublishError::State)?;
                Ok(outcome.changed)
            },
            PublishError::Task,
        )
        .await?;
        steps.lap("place");
        info!(version, files_changed = outcome, "credential refreshed");
        self.acknowledge(&volume, version).await;
        steps.lap("acknowledge");
        Ok(())
    }

    /// The broker refused the volume's pod: its credential files are removed
    /// (the tmpfs stays mounted until unpublish) and the record says nothing
    /// is held, so a republish after access is restored issues afresh.
    async fn withdraw(
        &self,
        mut record: VolumeRecord,
        refusal: BrokerError,
    ) -> Result<(), PublishError> {
        warn!(error = %refusal, held = record.version, "access withdrawn; removing the credential files");
        let now = Timestamp::now();
        record.version = 0;
        record.renew_at = now;
        record.updated_at = now;
        let state = self.inner.state.clone();
        Self::blocking(
            move || -> Result<(), PublishError> {
                AtomicDir::new(&record.target_path)
                    .remove_all()
                    .map_err(PublishError::Files)?;
                state
                    .save(RecordKind::Volume, &record)
                    .map_err(PublishError::State)
            },
            PublishError::Task,
        )
        .await?;
        Err(PublishError::Broker(refusal))
    }

    async fn unpublish(&self, req: csi::NodeUnpublishVolumeRequest) -> Result<(), UnpublishError> {
        validate_volume_id(&req.volume_id).map_err(UnpublishError::InvalidArgument)?;
        let (target, _) = validate_target(&req.target_path, &self.inner.config.kubelet_dir)
            .map_err(UnpublishError::InvalidArgument)?;
        let volume_id = req.volume_id;
        let _guard = self
            .guard(&volume_id)
            .ok_or_else(|| UnpublishError::InFlight(volume_id.clone()))?;

        let record = match self.inner.state.load(RecordKind::Volume, &volume_id) {
            Ok(r) => r,
            Err(e) => {
                // Still unmount: a corrupt record must not keep a credential mounted.
                error!(error = %error_chain(&e), "unreadable volume metadata; unmounting without release");
                None
            }
        };
        let t = target.clone();
        Self::blocking(
            move || -> Result<(), UnpublishError> {
                if mounted(&t)
                    .map_err(|e| UnpublishError::Unmount(t.clone(), e))?
                    .is_some()
                {
                    match mount::unmount(&t).map_err(|e| UnpublishError::Unmount(t.clone(), e))? {
                        Unmounted::Clean => {}
                        Unmounted::Detached => warn!("target busy; detached lazily"),
                    }
                }
                match std::fs::remove_dir(&t) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {
                        // Files written without a mount (a crash mid-publish).
                        AtomicDir::new(&t)
                            .remove_all()
                            .map_err(UnpublishError::Files)?;
                        std::fs::remove_dir(&t).map_err(|e| UnpublishError::Remove(t.clone(), e))
                    }
                    Err(e) => Err(UnpublishError::Remove(t.clone(), e)),
                }
            },
            UnpublishError::Task,
        )
        .await?;

        if let Some(record) = record {
            if record.target_path == target {
                match self
                    .broker_call(self.inner.broker.release(&record.volume_ref()))
                    .await
                {
                    Ok(()) => info!(lease = %record.lease, "volume unpublished and released"),
                    Err(e) => {
                        warn!(error = %e, "release failed; will retry in the background");
                        self.inner
                            .state
                            .save(RecordKind::PendingRelease, &record)
                            .map_err(UnpublishError::State)?;
                    }
                }
                self.inner
                    .state
                    .remove(RecordKind::Volume, &volume_id)
                    .map_err(UnpublishError::State)?;
                self.mark_published(&volume_id, false);
            } else {
                warn!(recorded = %record.target_path.display(), "unpublish of a target the record does not name; record kept");
            }
        } else {
            debug!("no metadata; nothing to release");
        }
        Ok(())
    }

    /// Retries releases that failed at unpublish time. Returns how many remain.
    pub async fn retry_pending_releases(&self) -> usize {
        let records = match self.inner.state.list(RecordKind::PendingRelease) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %error_chain(&e), "list pending releases");
                return 0;
            }
        };
        let mut remaining = 0;
        for record in records {
            let record = match record {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %error_chain(&e), "skipping pending release");
                    continue;
                }
            };
            // Never concurrently with a publish of the same volume, and never
            // for a volume published again since (the release would take its
            // credential away).
            let Some(_guard) = self.guard(&record.volume_id) else {
                remaining += 1;
                continue;
            };
            if self.is_published(&record.volume_id) {
                debug!(volume_id = %record.volume_id, "volume published again; pending release dropped");
                if let Err(e) = self
                    .inner
                    .state
                    .remove(RecordKind::PendingRelease, &record.volume_id)
                {
                    warn!(error = %error_chain(&e), "remove pending release");
                }
                continue;
            }
            match self
                .broker_call(self.inner.broker.release(&record.volume_ref()))
                .await
            {
                Ok(()) => {
                    info!(volume_id = %record.volume_id, lease = %record.lease, "pending release done");
                    if let Err(e) = self
                        .inner
                        .state
                        .remove(RecordKind::PendingRelease, &record.volume_id)
                    {
                        warn!(error = %error_chain(&e), "remove pending release");
                    }
                }
                Err(e) => {
                    debug!(volume_id = %record.volume_id, error = %e, "pending release still failing");
                    remaining += 1;
                }
            }
        }
        remaining
    }
}

#[tonic::async_trait]
impl csi::node_server::Node for NodeService {
    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let span = info_span!(
            "node_publish_volume",
            volume_id = %req.volume_id,
            target = %req.target_path,
            pod = tracing::field::Empty,
        );
        if let (Some(ns), Some(name)) = (
            req.volume_context.get(crate::context::keys::POD_NAMESPACE),
            req.volume_context.get(crate::context::keys::POD_NAME),
        ) {
            span.record("pod", format!("{ns}/{name}"));
        }
        let started = Instant::now();
        let result = self.publish(req).instrument(span.clone()).await;
        let code = match &result {
            Ok(()) => tonic::Code::Ok,
            Err(e) => {
                let _enter = span.enter();
                error!(error = %error_chain(e), "NodePublishVolume failed");
                e.code()
            }
        };
        self.inner
            .metrics
            .publish_done(code, started.elapsed().as_secs_f64());
        result
            .map(|()| Response::new(csi::NodePublishVolumeResponse {}))
            .map_err(Status::from)
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let span = info_span!("node_unpublish_volume", volume_id = %req.volume_id, target = %req.target_path);
        let result = self.unpublish(req).instrument(span.clone()).await;
        let result = result.map_err(|e| {
            let _enter = span.enter();
            error!(error = %error_chain(&e), "NodeUnpublishVolume failed");
            Status::from(e)
        });
        self.inner.metrics.unpublish_done(
            result
                .as_ref()
                .map_or_else(Status::code, |()| tonic::Code::Ok),
        );
        result.map(|()| Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        use csi::node_service_capability::{Rpc, Type, rpc};
        // VOLUME_MOUNT_GROUP: the kubelet then passes the pod's fsGroup in
        // volume_mount_group, and files get that group.
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: vec![csi::NodeServiceCapability {
                r#type: Some(Type::Rpc(Rpc {
                    r#type: rpc::Type::VolumeMountGroup as i32,
                })),
            }],
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.inner.config.node_name.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn renew_is_two_thirds_with_jitter() {
        let now: Timestamp = "2030-01-01T00:00:00Z".parse().unwrap();
        let exp = now.checked_add(SignedDuration::from_secs(3000)).unwrap();
        let r = renew_at(now, exp, None, 0.0);
        assert_eq!(r.duration_since(now).as_secs(), 2000);
        let r = renew_at(now, exp, None, 1.0);
        assert_eq!(r.duration_since(now).as_secs(), 1800);
        let broker = now.checked_add(SignedDuration::from_secs(1000)).unwrap();
        assert_eq!(renew_at(now, exp, Some(broker), 0.0), broker);
        // Already expired: renew now.
        let past = now.checked_sub(SignedDuration::from_secs(10)).unwrap();
        assert_eq!(renew_at(now, past, None, 0.5), now);
    }

    #[test]
    fn validates_ids_and_paths() {
        assert!(validate_volume_id("csi-0123abcd").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", &"x".repeat(129)] {
            assert!(validate_volume_id(bad).is_err(), "{bad}");
        }
        let kubelet = Path::new("/var/lib/kubelet");
        let good = "/var/lib/kubelet/pods/0f3c2a1b-0d9e-4c8f-a6b5-4e3d2c1b0a99/volumes/kubernetes.io~csi/creds/mount";
        let (path, uid) = validate_target(good, kubelet).unwrap();
        assert_eq!(path, Path::new(good));
        assert_eq!(uid, "0f3c2a1b-0d9e-4c8f-a6b5-4e3d2c1b0a99");
        for bad in [
            "",
            "relative",
            "/a/../b",
            "/var/lib/kubelet/pods/x/mount",
            "/etc/pods/u/volumes/kubernetes.io~csi/creds/mount",
            "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/creds/mount/x",
            "/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/creds/mount",
            "/var/lib/kubelet/pods/../volumes/kubernetes.io~csi/creds/mount",
            "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/../mount",
            "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/./mount",
            "/var/lib/kubelet/pods/u/./volumes/kubernetes.io~csi/creds/mount",
            "/var/lib/kubelet/../kubelet/pods/u/volumes/kubernetes.io~csi/creds/mount",
            "/var/lib/kubelet-other/pods/u/volumes/kubernetes.io~csi/creds/mount",
        ] {
            assert!(validate_target(bad, kubelet).is_err(), "{bad}");
        }
    }
}
