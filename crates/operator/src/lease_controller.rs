//! The SecretLease controller: dereference (policy, admin Secret) → resolve → observe →
//! run the engine → write status only if it changed.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::{Api, Client, ResourceExt};
use leasehold_api::{
    ConsumerStatus, DatabaseSpec, FINALIZER, REVOKE_NOW_ANNOTATION, ROTATE_ANNOTATION,
    RotationPolicy, SecretLease,
};
use leasehold_backends::Backend;
use leasehold_core::rotation::{Observations, WaitReason};
use leasehold_engine::context::{AdminCredentials, IssuerResolver, resolve, resolve_certificate};
use leasehold_engine::engine::Stores;
use leasehold_engine::{BackendRegistry, Engine, LeaseKey, Outcome};
use rand::Rng;
use secrecy::SecretString;

use crate::OperatorError;
use crate::delivery::{KubeDelivery, consumers_hold};
use crate::leader::LeadershipFence;
use crate::metrics::Metrics;
use crate::secrets::{OwnedSecretStore, owner_reference};
use crate::status::{LeaseCondition, StatusProgressStore, revocations_pending};

pub const CONTROLLER: &str = "secretlease";

/// Longest time between two reconciles of a lease.
pub const MAX_REQUEUE: Duration = Duration::from_secs(600);

/// Shared state of the SecretLease controller.
pub struct Context {
    pub client: Client,
    pub engine: Engine,
    pub registry: BackendRegistry,
    pub metrics: Arc<Metrics>,
    pub recorder: Option<Recorder>,
    /// Use this backend instead of the one built from the spec (tests and benchmarks).
    pub backend_override: Option<Arc<dyn Backend>>,
    /// Finds the issuer of a certificate lease (`None`: certificate leases are refused
    /// with `Ready=False IssuerNotFound`).
    pub issuers: Option<IssuerResolver>,
    /// Per-pod certificates of CSI certificate leases, revoked when their lease is
    /// deleted (`None`: left to expire).
    pub pod_certificates: Option<Arc<leasehold_broker::PodCertificates>>,
    pub clock: Arc<dyn Fn() -> Timestamp + Send + Sync>,
    /// Status writes so far (the benchmark checks a no-op resync writes nothing).
    pub status_writes: Arc<AtomicU64>,
    /// Seals what the versions Secret keeps (KMS or a local key; or, explicitly, nothing).
    pub keyring: Arc<leasehold_envelope::Keyring>,
    /// Whether this replica leads: checked before every side effect (always open
    /// without leader election).
    pub fence: LeadershipFence,
    failures: Mutex<HashMap<String, u32>>,
    /// Admin credentials last read per (namespace, Secret): a namespace teardown may
    /// delete the admin Secret before its leases, and revocation still needs them.
    admin_seen: Mutex<HashMap<(String, String), AdminCredentials>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

impl Context {
    /// A context whose engine reports steps as events on `recorder` and as metrics.
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        recorder: Option<Recorder>,
        max_admin_connections: usize,
    ) -> Self {
        let engine =
            Engine::new().with_events(crate::events::sink(recorder.clone(), metrics.clone()));
        Self {
            client,
            engine,
            registry: BackendRegistry::new(max_admin_connections),
            metrics,
            recorder,
            backend_override: None,
            issuers: None,
            pod_certificates: None,
            clock: Arc::new(Timestamp::now),
            status_writes: Arc::default(),
            keyring: Arc::new(leasehold_envelope::Keyring::unencrypted()),
            fence: LeadershipFence::always_open(),
            failures: Mutex::default(),
            admin_seen: Mutex::default(),
        }
    }

    fn now(&self) -> Timestamp {
        (self.clock)()
    }

    /// Next error backoff for an object (5 s doubling to 5 min, with jitter).
    pub fn next_backoff(&self, key: &str) -> Duration {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(key.to_string()).or_insert(0);
        let base = Duration::from_secs(5).saturating_mul(1u32 << (*n).min(6));
        *n = n.saturating_add(1);
        let base = base.min(Duration::from_secs(300));
        base + Duration::from_millis(rand::rng().random_range(0..=base.as_millis() as u64 / 10))
    }

    fn reset_backoff(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

/// The requeue delay for an engine wait: until `until` plus a little jitter, capped.
pub fn requeue_after(until: Option<Timestamp>, now: Timestamp, jitter_fraction: f64) -> Duration {
    let Some(until) = until else {
        return MAX_REQUEUE;
    };
    let delay = until
        .duration_since(now)
        .try_into()
        .unwrap_or(Duration::ZERO)
        .max(Duration::from_millis(500));
    let jitter = delay
        .mul_f64(jitter_fraction.clamp(0.0, 1.0) * 0.05)
        .min(Duration::from_secs(5));
    (delay + jitter).min(MAX_REQUEUE)
}

fn object_key(lease: &SecretLease) -> String {
    format!(
        "{}/{}",
        lease.namespace().unwrap_or_default(),
        lease.name_any()
    )
}

/// Shrink a lease for the controller's cache. The cache only feeds the watch mappers
/// (policy and Secret names) and names what to reconcile; [`reconcile_cached`] reads
/// the whole object fresh. Everything else (status, managedFields, annotations, most
/// of the spec) would only cost memory per lease.
pub fn slim_for_cache(lease: &mut SecretLease) {
    let meta = &mut lease.metadata;
    *meta = kube::api::ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        uid: meta.uid.take(),
        resource_version: meta.resource_version.take(),
        ..Default::default()
    };
    lease.status = None;
    let spec = &mut lease.spec;
    // Only the issuer is kept: an issuer that becomes ready wakes its leases.
    spec.certificate = spec
        .certificate
        .take()
        .map(|c| leasehold_api::CertificateSpec {
            issuer_ref: c.issuer_ref,
            common_name: String::new(),
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            uris: Vec::new(),
            duration: None,
            usages: Vec::new(),
            key_algorithm: c.key_algorithm,
        });
    spec.delivery = Default::default();
    for db in spec.postgres.iter_mut().chain(spec.mysql.iter_mut()) {
        db.host = String::new();
        db.database = String::new();
        db.username = None;
        db.username_template = None;
        db.member_of = Vec::new();
        db.grants = Vec::new();
    }
}

/// The controller's reconciler: read the current object (the cache holds a slim copy),
/// then [`reconcile_lease`].
pub async fn reconcile_cached(
    cached: Arc<SecretLease>,
    ctx: Arc<Context>,
) -> Result<Action, OperatorError> {
    let ns = cached
        .namespace()
        .ok_or(OperatorError::MissingField("metadata.namespace"))?;
    let api: Api<SecretLease> = Api::namespaced(ctx.client.clone(), &ns);
    match api.get_opt(&cached.name_any()).await? {
        Some(mut lease) => {
            lease.metadata.managed_fields = None;
            reconcile_lease(Arc::new(lease), ctx).await
        }
        // Gone: nothing left to do (the finalizer made sure credentials were revoked).
        None => Ok(Action::await_change()),
    }
}

/// Reconcile one SecretLease, given the whole object.
#[tracing::instrument(skip_all, fields(lease = %object_key(&lease)))]
pub async fn reconcile_lease(
    lease: Arc<SecretLease>,
    ctx: Arc<Context>,
) -> Result<Action, OperatorError> {
    let started = std::time::Instant::now();
    let key = object_key(&lease);
    let ns = lease
        .namespace()
        .ok_or(OperatorError::MissingField("metadata.namespace"))?;
    let api: Api<SecretLease> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, lease, |event| async {
        match event {
            FinalizerEvent::Apply(l) => run_lease(&l, &ctx, false).await,
            FinalizerEvent::Cleanup(l) => run_lease(&l, &ctx, true).await,
        }
    })
    .await
    .map_err(|e| match ctx.fence.check() {
        // Whatever failed, a replica that does not lead has nothing to report about
        // the lease (its refusal is what failed, or it must not act on the failure).
        Err(not_leader) => OperatorError::NotLeader(not_leader),
        Ok(()) => OperatorError::from(e),
    });
    ctx.metrics
        .reconciled(CONTROLLER, started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.reset_backoff(&key);
    }
    result
}

/// The log message of a reconcile the fence refused (with `error = NotLeader: …`).
pub const NOT_LEADER_LOG: &str = "not the leader: refused to act on the lease";

/// What happens after a reconcile error.
pub fn error_policy(lease: Arc<SecretLease>, error: &OperatorError, ctx: Arc<Context>) -> Action {
    if let OperatorError::NotLeader(_) = error {
        // Not the lease's failure: no failure metric, no backoff. The replica is
        // stepping down; should it lead again, the lease is looked at soon.
        tracing::warn!(lease = %object_key(&lease), error = %error, "{NOT_LEADER_LOG}");
        return Action::requeue(NOT_LEADER_REQUEUE);
    }
    if let Some(retry) = error.deletion_retry() {
        // Not a failure: a deleted lease waits for draining or revocation backoff.
        tracing::info!(lease = %object_key(&lease), reason = %error, retry_seconds = retry.as_secs(), "deletion waits for revocation");
        return Action::requeue(retry);
    }
    ctx.metrics.failed(CONTROLLER, error.kind());
    tracing::warn!(lease = %object_key(&lease), error = %error, kind = error.kind(), "reconcile failed");
    if error.kind() == "invalid" {
        return Action::await_change();
    }
    Action::requeue(ctx.next_backoff(&object_key(&lease)))
}

fn database(lease: &SecretLease) -> Option<&DatabaseSpec> {
    lease.spec.postgres.as_ref().or(lease.spec.mysql.as_ref())
}

/// Read a key of a Secret as text.
fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    if let Some(v) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return String::from_utf8(v.0.clone()).ok();
    }
    secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(key))
        .cloned()
}

/// The admin credentials of a database lease, or the reason they are unusable.
async fn admin_credentials(
    client: &Client,
    ns: &str,
    db: &DatabaseSpec,
) -> Result<Result<AdminCredentials, String>, OperatorError> {
    let r = &db.admin_secret_ref;
    let Some(secret) = Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(&r.name)
        .await?
    else {
        return Ok(Err(format!("admin Secret {ns}/{} not found", r.name)));
    };
    let Some(username) = secret_value(&secret, &r.username_key) else {
        return Ok(Err(format!(
            "admin Secret {ns}/{} has no key {:?}",
            r.name, r.username_key
        )));
    };
    let Some(password) = secret_value(&secret, &r.password_key) else {
        return Ok(Err(format!(
            "admin Secret {ns}/{} has no key {:?}",
            r.name, r.password_key
        )));
    };
    Ok(Ok(AdminCredentials {
        username,
        password: SecretString::from(password),
    }))
}

async fn ca_pem(
    client: &Client,
    ns: &str,
    db: &DatabaseSpec,
) -> Result<Result<Option<String>, String>, OperatorError> {
    let Some(r) = db.tls.ca_secret_ref.as_ref() else {
        return Ok(Ok(None));
    };
    let Some(secret) = Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(&r.name)
        .await?
    else {
        return Ok(Err(format!("CA Secret {ns}/{} not found", r.name)));
    };
    match secret_value(&secret, &r.key) {
        Some(v) => Ok(Ok(Some(v))),
        None => Ok(Err(format!(
            "CA Secret {ns}/{} has no key {:?}",
            r.name, r.key
        ))),
    }
}

/// Write `Ready=False` with `reason` and wait for a change (or retry, when deleting).
async fn blocked(
    status: &StatusProgressStore,
    lease: &SecretLease,
    deleting: bool,
    reason: &str,
    message: String,
) -> Result<Action, OperatorError> {
    tracing::info!(lease = %object_key(lease), reason, message = %message, "lease blocked");
    status
        .finish(
            &LeaseCondition::Blocked {
                reason: reason.into(),
                message,
            },
            lease.metadata.generation,
        )
        .await?;
    if deleting {
        // The finalizer stays until credentials can be revoked: retry with backoff
        // (through error_policy).
        Err(OperatorError::Blocked {
            reason: reason.into(),
            message: "cannot revoke credentials of a deleted lease".into(),
        })
    } else {
        Ok(Action::await_change())
    }
}

/// A deleted lease whose admin credentials are gone. The finalizer stays (the users
/// are alive), the condition says how to get out, and the abandon annotation lets the
/// owner remove the lease without revoking, naming the users left behind.
async fn unrevocable(
    status: &StatusProgressStore,
    lease: &SecretLease,
    ctx: &Context,
    progress: &leasehold_core::rotation::Progress,
    missing: String,
) -> Result<Action, OperatorError> {
    let users: Vec<&str> = progress
        .versions
        .iter()
        .map(|v| v.credential_id.as_str())
        .collect();
    let users = users.join(", ");
    if lease
        .annotations()
        .get(leasehold_api::ABANDON_ANNOTATION)
        .is_some_and(|v| v == "true")
    {
        let message =
            format!("deleted without revoking ({missing}); database users left behind: {users}");
        tracing::warn!(lease = %object_key(lease), users = %users, "credentials abandoned on request");
        if let Some(r) = &ctx.recorder {
            let key = LeaseKey {
                namespace: lease.namespace().unwrap_or_default(),
                name: lease.name_any(),
                uid: lease.uid().unwrap_or_default(),
            };
            crate::events::publish(r, &key, EventType::Warning, "CredentialsAbandoned", message);
        }
        ctx.metrics.lease_state(
            &lease.namespace().unwrap_or_default(),
            &lease.name_any(),
            None,
            0,
        );
        return Ok(Action::await_change());
    }
    let message = format!(
        "{missing}, so this deleted lease cannot revoke {users}. Recreate the Secret, or \
         annotate the lease {}=true to remove it without revoking",
        leasehold_api::ABANDON_ANNOTATION
    );
    blocked(status, lease, true, "AdminSecretNotFound", message).await
}

/// Apply (`deleting == false`) or clean up one lease.
pub async fn run_lease(
    lease: &SecretLease,
    ctx: &Context,
    deleting: bool,
) -> Result<Action, OperatorError> {
    let ns = lease
        .namespace()
        .ok_or(OperatorError::MissingField("metadata.namespace"))?;
    let name = lease.name_any();
    let uid = lease
        .uid()
        .ok_or(OperatorError::MissingField("metadata.uid"))?;
    let generation = lease.metadata.generation;
    let observed = lease.status.clone().unwrap_or_default();
    let mut progress = observed.progress.clone();
    let api: Api<SecretLease> = Api::namespaced(ctx.client.clone(), &ns);
    // A replica that does not lead does not start; every side effect below checks again.
    ctx.fence.check()?;

    if deleting
        && lease.spec.certificate.is_some()
        && let Some(pod_certificates) = &ctx.pod_certificates
    {
        // Every pod's certificate goes with its lease: revoke them all before the
        // finalizer goes (their records are owned by the lease and would be collected).
        ctx.fence.check()?;
        let report = pod_certificates
            .revoke_all(lease, ctx.now())
            .await
            .map_err(|e| OperatorError::Broker(e.to_string()))?;
        if !report.failed.is_empty() {
            return Err(OperatorError::Blocked {
                reason: "RevocationPending".into(),
                message: format!(
                    "{} pod certificate(s) of the deleted lease could not be revoked yet",
                    report.failed.len()
                ),
            });
        }
        if !report.revoked.is_empty() {
            tracing::info!(lease = %object_key(lease), revoked = report.revoked.len(), "pod certificates revoked with their lease");
        }
    }
    if deleting && progress.versions.is_empty() && !lease.spec.per_pod {
        // Nothing was ever issued (or everything is revoked): let the finalizer go. A
        // perPod lease goes on: its per-pod users are not versions, and they are dropped
        // (below, once the engine has nothing left) before the finalizer may go.
        ctx.metrics.lease_state(&ns, &name, None, 0);
        return Ok(Action::await_change());
    }

    let policy = Api::<RotationPolicy>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&lease.spec.policy_ref.name)
        .await?;
    let params = policy
        .as_ref()
        .and_then(|p| leasehold_api::validate::policy_params(&p.spec).ok());
    let status = StatusProgressStore::new(
        api.clone(),
        lease,
        params.clone(),
        deleting,
        ctx.clock.clone(),
        ctx.status_writes.clone(),
    )
    .suspended(lease.spec.suspend)
    .fenced(ctx.fence.clone());
    // A certificate lease without Secret delivery has no certificate of its own: the
    // broker signs one per pod (the key made on the node). Versions issued before the
    // Secret delivery was removed still run through the engine to be revoked.
    if lease.spec.certificate.is_some()
        && lease.spec.delivery.secret.is_none()
        && progress.versions.is_empty()
        && !deleting
    {
        let errors = leasehold_api::validate::validate_lease(&lease.spec, None);
        if !errors.is_empty() {
            let message = leasehold_api::validate::summary(&errors);
            return blocked(&status, lease, deleting, "InvalidSpec", message).await;
        }
        status
            .finish(
                &LeaseCondition::PerPodOnly {
                    message: "each pod that mounts this lease's CSI volume gets its own \
                              certificate, its key made on the node; nothing is issued for \
                              the lease itself"
                        .into(),
                },
                generation,
            )
            .await?;
        ctx.metrics.lease_state(&ns, &name, None, 0);
        return Ok(Action::await_change());
    }
    let policy = match policy {
        Some(p) => p,
        // Deleting after the policy is gone (a GitOps teardown removes both): revoke
        // with the strategy the versions were issued with.
        None if deleting => policy_for_cleanup(progress.strategy),
        None => {
            let msg = format!(
                "RotationPolicy {ns}/{} not found",
                lease.spec.policy_ref.name
            );
            return blocked(&status, lease, deleting, "PolicyNotFound", msg).await;
        }
    };
    let admin = match database(lease) {
        Some(db) => {
            let seen_key = (ns.clone(), db.admin_secret_ref.name.clone());
            match admin_credentials(&ctx.client, &ns, db).await? {
                Ok(a) => {
                    ctx.admin_seen
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(seen_key, a.clone());
                    Some(a)
                }
                Err(msg) => {
                    let remembered = ctx
                        .admin_seen
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&seen_key)
                        .cloned();
                    match remembered {
                        Some(a) if deleting => {
                            tracing::info!(lease = %object_key(lease), "admin Secret gone; revoking with the credentials last read from it");
                            Some(a)
                        }
                        _ if deleting => {
                            return unrevocable(&status, lease, ctx, &progress, msg).await;
                        }
                        _ => {
                            return blocked(&status, lease, deleting, "AdminSecretNotFound", msg)
                                .await;
                        }
                    }
                }
            }
        }
        None => None,
    };
    let ca = match database(lease) {
        Some(db) => match ca_pem(&ctx.client, &ns, db).await? {
            Ok(ca) => ca,
            Err(msg) => {
                return blocked(&status, lease, deleting, "CASecretNotFound", msg).await;
            }
        },
        None => None,
    };
    let key = LeaseKey {
        namespace: ns.clone(),
        name: name.clone(),
        uid,
    };
    let admin = admin.unwrap_or_else(|| AdminCredentials {
        username: String::new(),
        password: SecretString::from(String::new()),
    });
    let resolved = match &lease.spec.certificate {
        Some(cert) => {
            let found = match &ctx.issuers {
                Some(find) => find(&ns, &cert.issuer_ref),
                None => Err("this controller runs no certificate issuers".into()),
            };
            let issuer = match found {
                Ok(i) => i,
                Err(msg) => {
                    return blocked(&status, lease, deleting, "IssuerNotReady", msg).await;
                }
            };
            resolve_certificate(
                key.clone(),
                &lease.spec,
                &policy.spec,
                issuer,
                ctx.issuers.clone(),
            )
        }
        None => resolve(
            key.clone(),
            &lease.spec,
            &policy.spec,
            &admin,
            ca,
            &ctx.registry,
        ),
    };
    let mut lease_ctx = match resolved {
        Ok(c) => c,
        Err(e) => {
            let reason = e.reason();
            return blocked(&status, lease, deleting, reason, e.to_string()).await;
        }
    };
    if let Some(b) = &ctx.backend_override {
        lease_ctx.backend = b.clone();
    }

    let owner = owner_reference(lease).ok_or(OperatorError::MissingField("metadata.uid"))?;
    let secrets = crate::secrets::sealed_versions_store(
        OwnedSecretStore::new(
            Api::namespaced(ctx.client.clone(), &ns),
            &name,
            owner.clone(),
        )
        .fenced(ctx.fence.clone()),
        ctx.keyring.clone(),
    );
    let delivery = KubeDelivery::new(
        ctx.client.clone(),
        &ns,
        &name,
        owner,
        lease.spec.delivery.clone(),
        ctx.clock.clone(),
    )
    .fenced(ctx.fence.clone());
    let delivery = if lease.spec.certificate.is_some() {
        delivery.tls()
    } else {
        delivery
    };
    // Before the first delivery (the lease has never written its Secret): refuse a name
    // that is taken before any credential is issued. Later deliveries check again at
    // write time, so a resync costs no extra read.
    if !deleting
        && progress.delivered_version.is_none()
        && let Some(message) = delivery.foreign_secret().await?
    {
        blocked(&status, lease, deleting, "SecretConflict", message).await?;
        // Secrets the lease does not own are not watched: look again in a while, so
        // deleting the other Secret unblocks the lease without an edit.
        return Ok(Action::requeue(Duration::from_secs(60)));
    }
    let targets = if deleting || lease.spec.delivery.rollout_restart.is_empty() {
        Vec::new()
    } else {
        delivery.observe_targets().await?
    };
    let now = ctx.now();
    let (open, opens_at) =
        leasehold_engine::window::window_state(policy.spec.maintenance_window.as_ref(), now);
    let consumers = live_consumers(
        &ctx.client,
        progress.current().map(|c| c.version),
        &observed.consumers,
    )
    .await?;
    let obs = Observations {
        deleting,
        consumers_hold: consumers_hold(&consumers, &targets),
        rotation_request: lease.annotations().get(ROTATE_ANNOTATION).cloned(),
        maintenance_window_open: open,
        maintenance_window_opens_at: opens_at,
        emergency_request: lease.annotations().get(REVOKE_NOW_ANNOTATION).cloned(),
        suspended: lease.spec.suspend,
    };
    let stores = Stores {
        progress: &status,
        secrets: &secrets,
        delivery: &delivery,
    };
    let outcome = ctx
        .engine
        .reconcile(&lease_ctx, &mut progress, &obs, stores)
        .await;
    let expiry = progress
        .current()
        .and_then(|c| c.expires_at)
        .map(|t| t.as_second());
    ctx.metrics
        .lease_state(&ns, &name, expiry, revocations_pending(&progress));
    ctx.metrics
        .lease_suspended(&ns, &name, lease.spec.suspend && !deleting);
    match outcome {
        Ok(Outcome::Finished) => {
            if lease.spec.per_pod {
                // Per-pod credentials are not lease versions: drop every one of this lease.
                // `lh_<lease uid>_p`: every per-pod user of this lease and nothing else.
                let prefix = leasehold_broker::per_pod::per_pod_username(&key.uid, "");
                ctx.fence.check()?;
                let report = leasehold_engine::sweeper::sweep(
                    &lease_ctx.backend,
                    &prefix,
                    &std::collections::BTreeSet::new(),
                    false,
                )
                .await
                .map_err(|e| {
                    OperatorError::Engine(leasehold_engine::EngineError::Backend {
                        step: "revoke per-pod credentials",
                        source: e,
                    })
                })?;
                if let Some((user, error)) = report.failed.first() {
                    return Err(OperatorError::Blocked {
                        reason: "RevocationPending".into(),
                        message: format!("cannot drop per-pod user {user}: {error}"),
                    });
                }
            }
            ctx.metrics.lease_state(&ns, &name, None, 0);
            Ok(Action::await_change())
        }
        Ok(Outcome::Wait { until, reason }) => {
            let mut until = until;
            if !deleting
                && !targets.is_empty()
                && let Some(v) = progress.delivered_version
            {
                // Debounced restarts from an earlier promotion.
                let fresh = delivery.observe_targets().await?;
                if let Some(t) = delivery.sync_restarts(v, &fresh).await? {
                    until = Some(until.map_or(t, |u| u.min(t)));
                }
                // Workloads are not watched (a cache of every Deployment in the cluster
                // would cost more than polling the few a draining lease names): look
                // again soon, so the old version goes once the rollout completes rather
                // than at maxWait.
                if reason == WaitReason::Draining {
                    let poll = leasehold_core::rotation::add(ctx.now(), ROLLOUT_POLL);
                    until = Some(until.map_or(poll, |u| u.min(poll)));
                }
            }
            status.finish(&LeaseCondition::Running, generation).await?;
            let jitter: f64 = rand::rng().random();
            let retry_after = requeue_after(until, ctx.now(), jitter);
            if deleting {
                // The finalizer must stay until every version is revoked, and kube-runtime's
                // finalizer helper removes it on any Ok: wait through an error.
                let message = deletion_wait_message(reason, &progress);
                if reason == WaitReason::RevocationBackoff
                    && let Some(r) = &ctx.recorder
                {
                    crate::events::publish(
                        r,
                        &key,
                        EventType::Warning,
                        "RevocationPending",
                        message.clone(),
                    );
                }
                return Err(OperatorError::DeletionPending {
                    message,
                    retry_after,
                });
            }
            Ok(Action::requeue(retry_after))
        }
        Err(e) => {
            // Refused by the fence (or failed while no longer leading): nothing to say
            // on the lease, no event; this replica steps down.
            ctx.fence.check()?;
            // Best effort: say why in status, then let error_policy back off. A key
            // that cannot be used (KMS down, key disabled) delays the rotation and says
            // so; delivered credentials keep working.
            let condition = match key_failure(&e) {
                Some(reason) => LeaseCondition::KeyUnavailable {
                    reason: reason.to_owned(),
                    message: e.to_string(),
                },
                None => LeaseCondition::Failing {
                    message: e.to_string(),
                },
            };
            if let (Some(reason), Some(r)) = (key_failure(&e), &ctx.recorder) {
                crate::events::publish(r, &key, EventType::Warning, reason, e.to_string());
            }
            let _ = status.finish(&condition, generation).await;
            if deleting && let Some(r) = &ctx.recorder {
                crate::events::publish(
                    r,
                    &key,
                    EventType::Warning,
                    "RevocationPending",
                    e.to_string(),
                );
            }
            Err(e.into())
        }
    }
}

/// The key failure (`KeyUnavailable`, `KeyRefused`, …) behind an engine error, if any.
fn key_failure(e: &leasehold_engine::EngineError) -> Option<&'static str> {
    match e {
        leasehold_engine::EngineError::Store(s) => s.key_reason(),
        _ => None,
    }
}

/// Before the first reconcile: every lease's recorded users become claims, so a lease
/// reconciled early can never issue a user another lease (not reconciled yet) holds.
/// A failed list only logs: the claims then fill as leases are reconciled.
pub async fn preload_username_claims(client: &Client, namespaces: &[String], engine: &Engine) {
    let scopes: Vec<Api<SecretLease>> = if namespaces.is_empty() {
        vec![Api::all(client.clone())]
    } else {
        namespaces
            .iter()
            .map(|ns| Api::namespaced(client.clone(), ns))
            .collect()
    };
    let mut recorded = 0usize;
    for api in scopes {
        let mut params = kube::api::ListParams::default().limit(500);
        loop {
            let page = match api.list(&params).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list SecretLeases to seed username claims");
                    break;
                }
            };
            for lease in &page.items {
                let (Some(status), Some(target)) = (
                    lease.status.as_ref(),
                    leasehold_engine::local::spec_target(&lease.spec),
                ) else {
                    continue;
                };
                let key = LeaseKey {
                    namespace: lease.namespace().unwrap_or_default(),
                    name: lease.name_any(),
                    uid: lease.uid().unwrap_or_default(),
                };
                engine
                    .claims()
                    .record_progress(&key, &status.progress, &target);
                recorded += status.progress.versions.len();
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
    }
    tracing::info!(
        users = recorded,
        "username claims seeded from recorded leases"
    );
}

/// When a lease refused by the fence is looked at again (by then this replica has
/// stepped down; the requeue only matters if it has not).
const NOT_LEADER_REQUEUE: Duration = Duration::from_secs(5);

/// How often a lease draining behind a rollout restart looks at its workloads again.
const ROLLOUT_POLL: Duration = Duration::from_secs(5);

/// Why a deleted lease still waits, for its event and the reconcile log (no secrets:
/// revocation errors are sanitized by the backends).
fn deletion_wait_message(
    reason: WaitReason,
    progress: &leasehold_core::rotation::Progress,
) -> String {
    let left = progress.versions.len();
    match reason {
        WaitReason::RevocationBackoff => {
            let last_error = progress
                .versions
                .iter()
                .filter_map(|v| v.revoke.as_ref().and_then(|r| r.last_error.clone()))
                .next()
                .unwrap_or_else(|| "unknown error".into());
            format!(
                "the lease is deleted but {left} credential version(s) could not be revoked yet ({last_error}); retrying with backoff, the finalizer stays until they are gone"
            )
        }
        other => format!(
            "the lease is deleted; {left} credential version(s) still to revoke ({other:?})"
        ),
    }
}

/// Consumers that still count: a pod that fell behind but no longer exists (its node
/// died before the kubelet could unpublish) must not hold back revocation until maxWait.
/// Only lagging pods are looked up, so a lease whose consumers are current costs nothing.
async fn live_consumers(
    client: &Client,
    current: Option<u64>,
    consumers: &[ConsumerStatus],
) -> Result<Vec<ConsumerStatus>, OperatorError> {
    let mut live = Vec::with_capacity(consumers.len());
    for c in consumers {
        if lags_behind(c, current) {
            let pod = Api::<Pod>::namespaced(client.clone(), &c.namespace)
                .get_opt(&c.name)
                .await?;
            if !pod_still_consumes(pod.as_ref()) {
                tracing::debug!(pod = %format!("{}/{}", c.namespace, c.name), "ignoring a consumer whose pod is gone");
                continue;
            }
        }
        live.push(c.clone());
    }
    Ok(live)
}

/// A pod consumer that does not hold `current` yet.
fn lags_behind(c: &ConsumerStatus, current: Option<u64>) -> bool {
    c.kind == "Pod" && current.is_some_and(|v| c.version.is_none_or(|held| held < v))
}

/// Whether a consumer's pod can still pick up a new version.
fn pod_still_consumes(pod: Option<&Pod>) -> bool {
    pod.is_some_and(|p| {
        p.metadata.deletion_timestamp.is_none()
            && !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
    })
}

/// A stand-in policy for revoking a lease whose policy was deleted first: the recorded
/// strategy, no grace period, sessions terminated.
fn policy_for_cleanup(strategy: Option<leasehold_core::Strategy>) -> RotationPolicy {
    let mut spec = leasehold_api::RotationPolicySpec {
        strategy: strategy.unwrap_or_default(),
        ttl: std::time::Duration::from_secs(3600).into(),
        renew_before: None,
        rotation_interval: None,
        maintenance_window: None,
        verify: Default::default(),
        revoke: Default::default(),
        access: Default::default(),
        rate_limit: Default::default(),
        password: Default::default(),
    };
    spec.revoke.grace_period = std::time::Duration::ZERO.into();
    spec.revoke.max_wait = Some(std::time::Duration::ZERO.into());
    spec.revoke.drain_sessions.timeout = std::time::Duration::ZERO.into();
    RotationPolicy::new("deleted-policy", spec)
}

#[cfg(test)]
mod tests {
    use super::{lags_behind, pod_still_consumes};

    #[test]
    fn gone_or_finished_pods_stop_counting_as_consumers() {
        let consumer = |version| leasehold_api::ConsumerStatus {
            kind: "Pod".into(),
            namespace: "shop".into(),
            name: "web-0".into(),
            version,
            acknowledged_at: None,
        };
        assert!(lags_behind(&consumer(Some(1)), Some(2)));
        assert!(lags_behind(&consumer(None), Some(2)));
        assert!(!lags_behind(&consumer(Some(2)), Some(2)));
        assert!(!lags_behind(&consumer(Some(1)), None));
        let pod = |phase: &str, deleting: bool| -> k8s_openapi::api::core::v1::Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web-0", "deletionTimestamp": if deleting { Some("2026-01-01T00:00:00Z") } else { None }},
                "status": {"phase": phase},
            }))
            .unwrap()
        };
        assert!(!pod_still_consumes(None));
        assert!(pod_still_consumes(Some(&pod("Running", false))));
        assert!(!pod_still_consumes(Some(&pod("Running", true))));
        assert!(!pod_still_consumes(Some(&pod("Failed", false))));
        assert!(!pod_still_consumes(Some(&pod("Succeeded", false))));
    }

    use super::*;

    #[test]
    fn requeue_follows_the_engine_with_a_cap() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let in_a_minute = now
            .checked_add(jiff::SignedDuration::from_secs(60))
            .unwrap();
        assert_eq!(
            requeue_after(Some(in_a_minute), now, 0.0),
            Duration::from_secs(60)
        );
        let r = requeue_after(Some(in_a_minute), now, 1.0);
        assert!(r > Duration::from_secs(60) && r <= Duration::from_secs(63));
        let far = now
            .checked_add(jiff::SignedDuration::from_hours(5))
            .unwrap();
        assert_eq!(requeue_after(Some(far), now, 0.5), MAX_REQUEUE);
        assert_eq!(requeue_after(None, now, 0.5), MAX_REQUEUE);
        assert_eq!(
            requeue_after(Some(now), now, 0.0),
            Duration::from_millis(500)
        );
    }
}
