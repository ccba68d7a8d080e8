//! The loop that turns decisions into side effects, recording progress around each one.

use std::sync::Arc;

use jiff::Timestamp;
use leasehold_backends::{
    BackendError, CredentialMaterial, DrainSessions, IssueMode, IssueRequest, RevokeMode,
    RevokeOutcome, RevokeRequest, VerifyRequest,
};
use leasehold_core::rotation::{
    Action, DrainSessionsMode, Observations, Progress, RevokePlan, RevokeProgress, RevokeReason,
    RotationOutcome, RotationRecord, SESSION_POLL, Target, VersionRecord, VersionState, WaitReason,
    begin_emergency, decide, emergency_finished, revoke_retry_at,
};
use secrecy::SecretString;
use tracing::{info, warn};

use crate::claims::UsernameClaims;
use crate::context::LeaseContext;
use crate::limiter::{TargetLimiter, TargetPermit};
use crate::template::{CredentialValues, render};
use crate::{Delivery, ProgressStore, SecretStore, StoreError};

/// Where a fault can be injected (tests only). Each sits on a step boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// Intent recorded, before the backend creates the credential.
    BeforeIssue,
    /// The backend created it, before `Issued` is recorded.
    AfterIssue,
    /// Before a fresh login as the new credential.
    BeforeVerify,
    /// Verified, before `Verified` is recorded.
    AfterVerify,
    /// Before promotion is recorded.
    BeforePromote,
    /// Before delivery to consumers.
    BeforeDeliver,
    /// `Revoking` recorded, before the backend revokes.
    BeforeRevoke,
    /// The backend revoked, before `Revoked` is recorded.
    AfterRevoke,
}

/// A test hook called at every [`FaultPoint`]; returning `Err` simulates a crash there.
pub type FaultHook = Arc<dyn Fn(FaultPoint) -> Result<(), String> + Send + Sync>;

/// What happened, for events and metrics. Never carries secret values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepEvent {
    Issued {
        version: u64,
        username: String,
    },
    Verified {
        version: u64,
    },
    VerificationFailed {
        version: u64,
        reason: String,
    },
    Promoted {
        version: u64,
        previous: Option<u64>,
    },
    Delivered {
        version: u64,
    },
    Revoked {
        version: u64,
        reason: RevokeReason,
    },
    RevocationRetry {
        version: u64,
        failures: u32,
        error: String,
    },
    RevocationStuck {
        version: u64,
        since: Timestamp,
    },
    SessionsRemain {
        version: u64,
        sessions: u32,
        /// Set once the sessions block the drain for longer than they should (see
        /// `Progress::sessions_blocking_drain`): since when the drain has been waiting.
        /// The lease should be reported `Degraded`.
        blocking_since: Option<Timestamp>,
    },
    /// An emergency revocation was requested: every version up to `through_version` is
    /// replaced and revoked without waiting for consumers.
    EmergencyRevocationBegun {
        through_version: u64,
        reason: String,
    },
    /// Every version the emergency covered is revoked and a newer one is current.
    EmergencyRevocationCompleted {
        through_version: u64,
        reason: String,
        /// Milliseconds from the request to the last revocation.
        millis: u64,
    },
}

impl StepEvent {
    /// The version the event is about, if it is about one.
    pub fn version(&self) -> Option<u64> {
        match self {
            StepEvent::Issued { version, .. }
            | StepEvent::Verified { version }
            | StepEvent::VerificationFailed { version, .. }
            | StepEvent::Promoted { version, .. }
            | StepEvent::Delivered { version }
            | StepEvent::Revoked { version, .. }
            | StepEvent::RevocationRetry { version, .. }
            | StepEvent::RevocationStuck { version, .. }
            | StepEvent::SessionsRemain { version, .. } => Some(*version),
            StepEvent::EmergencyRevocationBegun { .. }
            | StepEvent::EmergencyRevocationCompleted { .. } => None,
        }
    }
}

/// Receives [`StepEvent`]s.
pub type EventSink = Arc<dyn Fn(&LeaseContextRef<'_>, &StepEvent) + Send + Sync>;

/// The lease an event belongs to.
#[derive(Debug, Clone, Copy)]
pub struct LeaseContextRef<'a> {
    pub key: &'a crate::LeaseKey,
}

/// How a reconcile ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to do until `until` (or an observed change).
    Wait {
        until: Option<Timestamp>,
        reason: WaitReason,
    },
    /// The lease is being deleted and everything is revoked.
    Finished,
}

/// Why a reconcile stopped early. Progress saved so far stands; the next reconcile resumes.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The backend could not be reached; the step is retried later, nothing is lost.
    #[error("backend unavailable during {step}: {source}")]
    Backend {
        step: &'static str,
        #[source]
        source: BackendError,
    },
    #[error("cannot record progress: {0}")]
    Store(#[from] StoreError),
    #[error("the secret of version {0} is missing from the secret store")]
    SecretMissing(u64),
    #[error("invalid spec: {0}")]
    Invalid(String),
    /// Another lease records this user: issuing it would take that lease's credential over.
    #[error(
        "user {user} on {server} belongs to lease {owner}; refusing to issue it for this lease \
         (two leases would take over each other's credentials): give this lease another username or usernameTemplate"
    )]
    UsernameTaken {
        user: String,
        server: String,
        owner: String,
    },
    #[error("injected fault at {0:?}: {1}")]
    Injected(FaultPoint, String),
}

impl EngineError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::Backend { .. } => "backend",
            EngineError::Store(_) => "store",
            EngineError::SecretMissing(_) => "secret_missing",
            EngineError::Invalid(_) | EngineError::UsernameTaken { .. } => "invalid",
            EngineError::Injected(..) => "injected",
        }
    }
}

/// Runs leases. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct Engine {
    limiter: TargetLimiter,
    claims: UsernameClaims,
    clock: Arc<dyn Fn() -> Timestamp + Send + Sync>,
    fault: Option<FaultHook>,
    events: Option<EventSink>,
    audit: Option<leasehold_audit::AuditLog>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

impl Default for Engine {
    fn default() -> Self {
        Self::new()
    }
}

/// The stores a reconcile works with.
#[derive(Clone, Copy)]
pub struct Stores<'a> {
    pub progress: &'a dyn ProgressStore,
    pub secrets: &'a dyn SecretStore,
    pub delivery: &'a dyn Delivery,
}

impl std::fmt::Debug for Stores<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores").finish_non_exhaustive()
    }
}

impl Engine {
    pub fn new() -> Self {
        Self {
            limiter: TargetLimiter::new(),
            claims: UsernameClaims::new(),
            clock: Arc::new(Timestamp::now),
            fault: None,
            events: None,
            audit: None,
        }
    }

    /// Use another clock (tests).
    pub fn with_clock(mut self, clock: Arc<dyn Fn() -> Timestamp + Send + Sync>) -> Self {
        self.clock = clock;
        self
    }

    /// Inject faults at step boundaries (tests).
    pub fn with_fault_hook(mut self, hook: FaultHook) -> Self {
        self.fault = Some(hook);
        self
    }

    /// Receive events (the controller turns them into Kubernetes events and metrics).
    pub fn with_events(mut self, sink: EventSink) -> Self {
        self.events = Some(sink);
        self
    }

    /// Record every step in the audit trail.
    pub fn with_audit(mut self, audit: leasehold_audit::AuditLog) -> Self {
        self.audit = Some(audit);
        self
    }

    pub fn limiter(&self) -> &TargetLimiter {
        &self.limiter
    }

    /// Which lease each user belongs to (seed it with every known lease's progress).
    pub fn claims(&self) -> &UsernameClaims {
        &self.claims
    }

    fn now(&self) -> Timestamp {
        (self.clock)()
    }

    fn fault(&self, point: FaultPoint) -> Result<(), EngineError> {
        match &self.fault {
            Some(hook) => hook(point).map_err(|e| EngineError::Injected(point, e)),
            None => Ok(()),
        }
    }

    /// Report `event` (the version's user looked up in `progress`).
    fn emit(&self, ctx: &LeaseContext, progress: &Progress, event: StepEvent) {
        let user = event
            .version()
            .and_then(|v| progress.version(v))
            .map(|r| r.credential_id.clone());
        self.emit_as(ctx, user.as_deref(), event);
    }

    /// Report `event` about the credential `user`: log, event sink, audit trail.
    fn emit_as(&self, ctx: &LeaseContext, user: Option<&str>, event: StepEvent) {
        if let Some(audit) = &self.audit {
            audit.record(crate::audit::step_audit_event(&ctx.key, user, &event));
        }
        match &event {
            StepEvent::VerificationFailed { version, reason } => {
                warn!(lease = %ctx.key, version, reason, "verification failed; the new credential is revoked and the current one kept")
            }
            StepEvent::RevocationRetry {
                version,
                failures,
                error,
            } => {
                warn!(lease = %ctx.key, version, failures, error, "revocation failed; retrying with backoff")
            }
            StepEvent::RevocationStuck { version, since } => {
                warn!(lease = %ctx.key, version, %since, "revocation stuck; still retrying")
            }
            StepEvent::SessionsRemain {
                version,
                sessions,
                blocking_since: Some(since),
            } => {
                warn!(lease = %ctx.key, version, sessions, %since,
                    "open sessions keep the old credential from being revoked (drainSessions: Wait); \
                     end them, or use drainSessions Terminate, before the current credential expires")
            }
            StepEvent::EmergencyRevocationBegun {
                through_version,
                reason,
            } => {
                warn!(lease = %ctx.key, through_version, reason,
                    "emergency revocation: rotating now; every older version is revoked as soon as the new one is verified")
            }
            other => info!(lease = %ctx.key, event = ?other, "rotation step"),
        }
        if let Some(sink) = &self.events {
            sink(&LeaseContextRef { key: &ctx.key }, &event);
        }
    }

    async fn save(
        &self,
        stores: Stores<'_>,
        ctx: &LeaseContext,
        progress: &Progress,
    ) -> Result<(), EngineError> {
        stores.progress.save(&ctx.key, progress).await?;
        Ok(())
    }

    /// Perform actions until the lease has to wait. `progress` is updated in place and
    /// saved through `stores.progress` before and after every side effect.
    #[tracing::instrument(skip_all, fields(lease = %ctx.key))]
    pub async fn reconcile(
        &self,
        ctx: &LeaseContext,
        progress: &mut Progress,
        obs: &Observations,
        stores: Stores<'_>,
    ) -> Result<Outcome, EngineError> {
        let mut permit: Option<TargetPermit> = None;
        let under = ctx.issued_under();
        self.claims
            .record_progress(&ctx.key, progress, &under.target);
        if let Some(e) = begin_emergency(progress, obs, self.now()).cloned() {
            self.save(stores, ctx, progress).await?;
            self.emit(
                ctx,
                progress,
                StepEvent::EmergencyRevocationBegun {
                    through_version: e.through_version,
                    reason: e.reason,
                },
            );
        }
        // A bound on steps per call, so a bug can never spin forever.
        for _ in 0..64 {
            let now = self.now();
            if emergency_finished(progress)
                && let Some(e) = progress.emergency.take()
            {
                self.save(stores, ctx, progress).await?;
                let millis = u64::try_from(now.duration_since(e.requested_at).as_millis().max(0))
                    .unwrap_or(0);
                self.emit(
                    ctx,
                    progress,
                    StepEvent::EmergencyRevocationCompleted {
                        through_version: e.through_version,
                        reason: e.reason,
                        millis,
                    },
                );
            }
            if let Some(stale) = progress.pending_issued_elsewhere(&under).cloned() {
                self.discard_issued_elsewhere(ctx, progress, stores, &stale, now)
                    .await?;
                continue;
            }
            // A current version of another strategy or database is replaced at once
            // (after a failed attempt, with the usual backoff): consumers must not be
            // handed the old spec's user with the new spec's host.
            let forced;
            let decide_obs = if progress.current_issued_elsewhere(&under)
                && progress.verify_failures == 0
                && !obs.deleting
            {
                let mut o = obs.clone();
                o.rotation_request = Some(format!(
                    "{}\u{0}spec-changed",
                    progress.handled_rotation_request.as_deref().unwrap_or("")
                ));
                forced = o;
                &forced
            } else {
                obs
            };
            let action = decide(&ctx.policy, progress, decide_obs, now);
            if matches!(
                action,
                Action::Issue { .. } | Action::Verify { .. } | Action::Revoke { .. }
            ) && permit.is_none()
            {
                permit = Some(
                    self.limiter
                        .acquire(&ctx.backend.target_key(), ctx.max_concurrent_per_target)
                        .await,
                );
            }
            match action {
                Action::Issue { version, resume } => {
                    self.issue(ctx, progress, obs, stores, version, resume)
                        .await?
                }
                Action::Verify { version } => self.verify(ctx, progress, stores, version).await?,
                Action::Promote { version } => self.promote(ctx, progress, stores, version).await?,
                Action::Deliver { version } => self.deliver(ctx, progress, stores, version).await?,
                Action::Revoke {
                    version,
                    reason,
                    plan,
                    drain,
                } => {
                    self.revoke(ctx, progress, stores, version, reason, plan, drain)
                        .await?
                }
                Action::Wait { until, reason } => return Ok(Outcome::Wait { until, reason }),
                Action::Finished => return Ok(Outcome::Finished),
            }
        }
        Ok(Outcome::Wait {
            until: Some(self.now()),
            reason: WaitReason::Renewal,
        })
    }

    async fn issue(
        &self,
        ctx: &LeaseContext,
        progress: &mut Progress,
        obs: &Observations,
        stores: Stores<'_>,
        version: u64,
        resume: bool,
    ) -> Result<(), EngineError> {
        let now = self.now();
        // A resumed version keeps the user recorded with its intent; a new one is named
        // from the recorded state (AlternatingUsers: the user that is not current).
        let recorded = progress
            .version(version)
            .filter(|_| resume)
            .map(|r| r.credential_id.clone());
        let id = match recorded {
            Some(name) => leasehold_backends::CredentialId(name),
            None => ctx
                .naming
                .credential_id(
                    &ctx.key,
                    version,
                    progress.current().map(|c| c.credential_id.as_str()),
                )
                .map_err(|e| EngineError::Invalid(e.to_string()))?,
        };
        // Never a user another lease records, before anything refers to it.
        let server = progress
            .version(version)
            .filter(|_| resume)
            .and_then(|r| r.target().cloned())
            .unwrap_or_else(|| ctx.target())
            .server_key();
        if let Err(owner) = self.claims.claim(&server, &id.0, &ctx.key) {
            return Err(EngineError::UsernameTaken {
                user: id.0,
                server,
                owner: owner.to_string(),
            });
        }
        let password = match stores.secrets.get(&ctx.key, version).await? {
            Some(p) if resume => p,
            _ => {
                // The secret is stored before anything refers to it, so a crash after this
                // point always finds the password that may already be on the backend.
                let p = match ctx.backend.new_secret() {
                    Some(made) => made.map_err(|e| EngineError::Backend {
                        step: "issue",
                        source: e,
                    })?,
                    None => leasehold_backends::password::generate(&ctx.password)
                        .map_err(|e| EngineError::Invalid(e.to_string()))?,
                };
                stores.secrets.put(&ctx.key, version, &p).await?;
                p
            }
        };
        if !resume {
            progress.versions.push(VersionRecord {
                version,
                credential_id: id.0.clone(),
                state: VersionState::Issuing,
                issued_at: now,
                verified_at: None,
                promoted_at: None,
                superseded_at: None,
                expires_at: ctx.policy.expires_at(now),
                revoke_reason: None,
                revoke: None,
                issued_under: Some(ctx.issued_under()),
            });
            progress.last_version = progress.last_version.max(version);
            progress.strategy = Some(ctx.policy.strategy);
            if obs.rotation_request.is_some() {
                progress.handled_rotation_request = obs.rotation_request.clone();
            }
        }
        // Saved before the backend is touched, also when resuming with nothing new to
        // record: a progress store may refuse (the operator's does, on a replica that no
        // longer leads), and that must stop the issue.
        self.save(stores, ctx, progress).await?;
        let issued_at = progress.version(version).map_or(now, |r| r.issued_at);
        self.fault(FaultPoint::BeforeIssue)?;
        let mode = match ctx.policy.strategy {
            leasehold_core::Strategy::Dynamic => IssueMode::CreateUser,
            // The InPlace user belongs to someone else: never created (a mistyped name
            // would become a new login), a missing one is for the user to fix.
            leasehold_core::Strategy::InPlace => IssueMode::ExistingUser,
            leasehold_core::Strategy::AlternatingUsers => IssueMode::SetPassword,
        };
        let request = IssueRequest {
            id: id.clone(),
            mode,
            password,
            valid_until: ctx.policy.expires_at(issued_at),
            privileges: ctx.privileges.clone(),
        };
        // Only InPlace re-issues the current user (that is what it is for). Anything else
        // landing on it (a version recorded before the slot was taken from the recorded
        // state) would change the current password: refuse before touching the backend.
        let issued = if ctx.policy.strategy != leasehold_core::Strategy::InPlace
            && progress
                .current()
                .is_some_and(|c| c.version != version && c.credential_id == id.0)
        {
            Err(BackendError::Invalid(format!(
                "version {version} would reuse {id}, the current version's user; it is discarded"
            )))
        } else {
            let journal = SecretJournal {
                secrets: stores.secrets,
                lease: &ctx.key,
                version,
            };
            ctx.backend.issue_returning_secret(&request, &journal).await
        };
        match issued {
            // What issuing added to the secret (a certificate next to its key) is stored
            // before `Issued` is recorded: a crash in between repeats the issue.
            Ok(Some(updated)) => stores.secrets.put(&ctx.key, version, &updated).await?,
            Ok(None) => {}
            Err(e) if e.is_transient() => {
                return Err(EngineError::Backend {
                    step: "issue",
                    source: e,
                });
            }
            Err(e) if e.is_missing_user() => {
                // InPlace on a user that does not exist: nothing was created or changed, so
                // there is nothing to revoke or restore. The version is dropped and the
                // error is `invalid` (the operator waits for a change rather than retry).
                let reason = e.to_string();
                stores.secrets.remove(&ctx.key, version).await?;
                progress.versions.retain(|r| r.version != version);
                if !progress
                    .versions
                    .iter()
                    .any(|r| r.credential_id == id.0 && server_of(ctx, r) == server)
                {
                    self.claims.release(&server, &id.0, &ctx.key);
                }
                progress.push_history(RotationRecord {
                    version,
                    started_at: issued_at,
                    verified_at: None,
                    promoted_at: None,
                    revoked_at: Some(now),
                    outcome: RotationOutcome::IssueFailed,
                    reason: Some(reason.clone()),
                });
                self.save(stores, ctx, progress).await?;
                self.emit(
                    ctx,
                    progress,
                    StepEvent::VerificationFailed {
                        version,
                        reason: reason.clone(),
                    },
                );
                return Err(EngineError::Invalid(reason));
            }
            Err(e) => {
                // The backend refused (bad grant, missing role): remove whatever exists of it.
                let reason = e.to_string();
                if let Some(r) = progress.version_mut(version) {
                    r.state = VersionState::Revoking;
                    r.revoke_reason = Some(RevokeReason::IssueFailed);
                }
                progress.record_failed_attempt(
                    RotationRecord::failed(
                        version,
                        issued_at,
                        None,
                        RotationOutcome::IssueFailed,
                        reason.clone(),
                    ),
                    now,
                );
                self.save(stores, ctx, progress).await?;
                self.emit(
                    ctx,
                    progress,
                    StepEvent::VerificationFailed { version, reason },
                );
                return Ok(());
            }
        }
        self.fault(FaultPoint::AfterIssue)?;
        if let Some(r) = progress.version_mut(version) {
            r.state = VersionState::Issued;
        }
        self.save(stores, ctx, progress).await?;
        // Issued: nothing left to resume.
        stores
            .secrets
            .remove(&ctx.key, journal_slot(version))
            .await?;
        self.emit(
            ctx,
            progress,
            StepEvent::Issued {
                version,
                username: id.0,
            },
        );
        Ok(())
    }

    /// A version recorded under another strategy or database than the lease has now:
    /// revoke it where and how it was issued, and let a new version be issued under the
    /// current spec (after the usual short backoff, shown as a failed rotation).
    async fn discard_issued_elsewhere(
        &self,
        ctx: &LeaseContext,
        progress: &mut Progress,
        stores: Stores<'_>,
        stale: &VersionRecord,
        now: Timestamp,
    ) -> Result<(), EngineError> {
        let reason = format!(
            "the policy's strategy or the database changed while version {} was being issued; \
             it is revoked where it was issued and a new version follows",
            stale.version
        );
        if let Some(r) = progress.version_mut(stale.version) {
            r.state = VersionState::Revoking;
            r.revoke_reason = Some(RevokeReason::IssueFailed);
        }
        progress.record_failed_attempt(
            RotationRecord::failed(
                stale.version,
                stale.issued_at,
                stale.verified_at,
                RotationOutcome::IssueFailed,
                reason.clone(),
            ),
            now,
        );
        self.save(stores, ctx, progress).await?;
        self.emit(
            ctx,
            progress,
            StepEvent::VerificationFailed {
                version: stale.version,
                reason,
            },
        );
        Ok(())
    }

    async fn secret(
        &self,
        ctx: &LeaseContext,
        stores: Stores<'_>,
        version: u64,
    ) -> Result<SecretString, EngineError> {
        stores
            .secrets
            .get(&ctx.key, version)
            .await?
            .ok_or(EngineError::SecretMissing(version))
    }

    async fn verify(
        &self,
        ctx: &LeaseContext,
        progress: &mut Progress,
        stores: Stores<'_>,
        version: u64,
    ) -> Result<(), EngineError> {
        let now = self.now();
        let Some(record) = progress.version(version).cloned() else {
            return Ok(());
        };
        let password = match stores.secrets.get(&ctx.key, version).await? {
            Some(p) => p,
            None => {
                // Without the secret the version is useless: discard it.
                self.fail_verification(
                    ctx,
                    progress,
                    stores,
                    &record,
                    "its secret was lost before verification".into(),
                    now,
                )
                .await?;
                return Ok(());
            }
        };
        self.fault(FaultPoint::BeforeVerify)?;
        let result = ctx
            .backend
            .verify(&VerifyRequest {
                id: leasehold_backends::CredentialId(record.credential_id.clone()),
                password,
                query: ctx.verify_query.clone(),
                timeout: ctx.verify_timeout,
            })
            .await;
        match result {
            Ok(()) => {
                self.fault(FaultPoint::AfterVerify)?;
                if let Some(r) = progress.version_mut(version) {
                    r.state = VersionState::Verified;
                    r.verified_at = Some(now);
                }
                self.save(stores, ctx, progress).await?;
                self.emit(ctx, progress, StepEvent::Verified { version });
                Ok(())
            }
            // A database that is down delays the rotation; it is not a failed verification.
            Err(e @ BackendError::Unreachable(_)) => Err(EngineError::Backend {
                step: "verify",
                source: e,
            }),
            Err(e) => {
                self.fail_verification(ctx, progress, stores, &record, e.to_string(), now)
                    .await
            }
        }
    }

    async fn fail_verification(
        &self,
        ctx: &LeaseContext,
        progress: &mut Progress,
        stores: Stores<'_>,
        record: &VersionRecord,
        reason: String,
        now: Timestamp,
    ) -> Result<(), EngineError> {
        if let Some(r) = progress.version_mut(record.version) {
            r.state = VersionState::Revoking;
            r.revoke_reason = Some(RevokeReason::VerificationFailed);
        }
        progress.record_failed_attempt(
            RotationRecord::failed(
                record.version,
                record.issued_at,
                None,
                RotationOutcome::VerificationFailed,
                reason.clone(),
            ),
            now,
        );
        self.save(stores, ctx, progress).await?;
        self.emit(
            ctx,
            progress,
            StepEvent::VerificationFailed {
                version: record.version,
                reason,
            },
        );
        Ok(())
    }

    async fn promote(
        &self,
        ctx: &LeaseContext,
        progress: &mut Progress,
        stores: Stores<'_>,
        version: u64,
    ) -> Result<(), EngineError> {
        let now = self.now();
        self.fault(FaultPoint::BeforePromote)?;
        let mut previous = None;
        for r in &mut progress.versions {
            if r.state == VersionState::Current {
                r.state = VersionState::Superseded;
                r.superseded_at = Some(now);
                previous = Some(r.version);
            }
        }
        let mut started = now;
        let mut verified = None;
        if let Some(r) = progress.version_mut(version) {
            r.state = VersionState::Current;
            r.promoted_at = Some(now);
            started = r.issued_at;
            verified = r.verified_at;
        }
        progress.verify_failures = 0;
        progress.last_verify_failure_at = None;
        progress.push_history(RotationRecord {
            version,
            started_at: started,
            verified_at: verified,
            promoted_at: Some(now),
            revoked_at: None,
            outcome: RotationOutcome::Succeeded,
            reason: None,
        });
        self.save(stores, ctx, progress).await?;
        self.emit(ctx, progress, StepEvent::Promoted { version, previous });
        Ok(())
    }

    async fn deliver(
        &self,
        ctx: &LeaseContext,
        progress: &mut Progress,
        stores: Stores<'_>,
        version: u64,
    ) -> Result<(), EngineError> {
        let Some(record) = progress.version(version).cloned() else {
            return Ok(());
        };
        let password = self.secret(ctx, stores, version).await?;
        let material = material_for(ctx, &record, password);
        self.fault(FaultPoint::BeforeDeliver)?;
        stores
            .delivery
            .deliver(&ctx.key, version, &material)
            .await?;
        progress.delivered_version = Some(version);
        self.save(stores, ctx, progress).await?;
        self.emit(ctx, progress, StepEvent::Delivered { version });
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn revoke(
        &self,
        ctx: &LeaseContext,
        progress: &mut Progress,
        stores: Stores<'_>,
        version: u64,
        reason: RevokeReason,
        plan: RevokePlan,
        drain: DrainSessionsMode,
    ) -> Result<(), EngineError> {
        let now = self.now();
        let Some(record) = progress.version(version).cloned() else {
            return Ok(());
        };
        if record.state != VersionState::Revoking
            && let Some(r) = progress.version_mut(version)
        {
            r.state = VersionState::Revoking;
            r.revoke_reason = Some(reason);
        }
        if let Some(r) = progress.version_mut(version) {
            let p = r.revoke.get_or_insert_with(RevokeProgress::default);
            if p.drain_started_at.is_none() {
                p.drain_started_at = Some(now);
            }
        }
        self.save(stores, ctx, progress).await?;
        self.fault(FaultPoint::BeforeRevoke)?;

        let id = leasehold_backends::CredentialId(record.credential_id.clone());
        let drain = match drain {
            DrainSessionsMode::Wait => DrainSessions::Wait,
            DrainSessionsMode::Terminate => DrainSessions::Terminate,
            DrainSessionsMode::Ignore => DrainSessions::Ignore,
        };
        // The current version's user is never revoked on behalf of another version (a
        // failed version that named it): that would lock out every consumer.
        let holds_current_user = progress.current().is_some_and(|c| {
            c.version != version
                && c.credential_id == record.credential_id
                && server_of(ctx, c) == server_of(ctx, &record)
        });
        // Nor is the current version's password scrambled (the plan already excludes an
        // account a later version lives on; this keeps consumers safe whatever comes).
        let holds_current_account = progress
            .current()
            .is_some_and(|c| c.version != version && c.same_account(&record));
        // Revoked where it was issued, even if the lease points elsewhere now.
        let backend = match ctx.backend_for(record.target()) {
            Ok(b) => b,
            Err(e) => {
                return self
                    .revoke_failed(ctx, progress, stores, &record, e, now)
                    .await;
            }
        };
        let result = match plan {
            RevokePlan::DropUser | RevokePlan::DisableLogin if holds_current_user => {
                warn!(lease = %ctx.key, version, user = %record.credential_id,
                    "not revoking: the user belongs to the current version");
                Ok(RevokeOutcome::Revoked)
            }
            RevokePlan::ScramblePassword if holds_current_account => {
                warn!(lease = %ctx.key, version, user = %record.credential_id,
                    "not changing the password: the account belongs to the current version");
                Ok(RevokeOutcome::Revoked)
            }
            RevokePlan::DropUser | RevokePlan::DisableLogin | RevokePlan::ScramblePassword => {
                let mode = match plan {
                    RevokePlan::DropUser => RevokeMode::DropUser,
                    RevokePlan::DisableLogin => RevokeMode::DisableLogin,
                    _ => RevokeMode::ScramblePassword,
                };
                let secret = stores.secrets.get(&ctx.key, version).await.ok().flatten();
                backend
                    .revoke_with_secret(&RevokeRequest { id, mode, drain }, secret.as_ref())
                    .await
            }
            RevokePlan::Nothing => Ok(RevokeOutcome::Revoked),
            RevokePlan::RestoreCurrent => {
                self.restore_current(ctx, progress, stores, &record, &backend)
                    .await
            }
        };
        match result {
            Ok(RevokeOutcome::Revoked) => {
                self.fault(FaultPoint::AfterRevoke)?;
                stores.secrets.remove(&ctx.key, version).await?;
                stores
                    .secrets
                    .remove(&ctx.key, journal_slot(version))
                    .await?;
                progress.versions.retain(|r| r.version != version);
                let server = server_of(ctx, &record);
                if !progress
                    .versions
                    .iter()
                    .any(|r| r.credential_id == record.credential_id && server_of(ctx, r) == server)
                {
                    self.claims
                        .release(&server, &record.credential_id, &ctx.key);
                }
                if let Some(h) = progress.history.iter_mut().find(|h| h.version == version) {
                    h.revoked_at = Some(now);
                }
                self.save(stores, ctx, progress).await?;
                self.emit_as(
                    ctx,
                    Some(&record.credential_id),
                    StepEvent::Revoked { version, reason },
                );
            }
            Ok(RevokeOutcome::SessionsRemain(n)) => {
                if let Some(p) = progress
                    .version_mut(version)
                    .and_then(|r| r.revoke.as_mut())
                {
                    p.sessions_remaining = Some(n);
                    p.next_attempt_at = Some(leasehold_core::rotation::add(now, SESSION_POLL));
                }
                self.save(stores, ctx, progress).await?;
                let blocking_since = progress
                    .sessions_blocking_drain(&ctx.policy, now)
                    .filter(|r| r.version == version)
                    .and_then(|r| r.revoke.as_ref())
                    .and_then(|p| p.drain_started_at);
                self.emit(
                    ctx,
                    progress,
                    StepEvent::SessionsRemain {
                        version,
                        sessions: n,
                        blocking_since,
                    },
                );
            }
            Err(e) => {
                self.revoke_failed(ctx, progress, stores, &record, e, now)
                    .await?;
            }
        }
        Ok(())
    }

    /// Record a failed revocation attempt and when to try again.
    async fn revoke_failed(
        &self,
        ctx: &LeaseContext,
        progress: &mut Progress,
        stores: Stores<'_>,
        record: &VersionRecord,
        e: BackendError,
        now: Timestamp,
    ) -> Result<(), EngineError> {
        let version = record.version;
        let error = e.to_string();
        let mut failures = 0;
        let mut stuck_since = None;
        if let Some(r) = progress.version_mut(version) {
            let retry = |f| revoke_retry_at(record, f, now);
            let p = r.revoke.get_or_insert_with(RevokeProgress::default);
            p.failures += 1;
            failures = p.failures;
            let first = *p.first_failure_at.get_or_insert(now);
            p.next_attempt_at = Some(retry(p.failures));
            p.last_error = Some(error.clone());
            if leasehold_core::rotation::add(
                first,
                leasehold_core::rotation::REVOCATION_STUCK_AFTER,
            ) <= now
            {
                stuck_since = Some(first);
            }
        }
        self.save(stores, ctx, progress).await?;
        self.emit(
            ctx,
            progress,
            StepEvent::RevocationRetry {
                version,
                failures,
                error,
            },
        );
        if let Some(since) = stuck_since {
            self.emit(ctx, progress, StepEvent::RevocationStuck { version, since });
        }
        Ok(())
    }

    /// InPlace after a failed verification: the user now has the rejected password; put
    /// the current version's password back.
    async fn restore_current(
        &self,
        ctx: &LeaseContext,
        progress: &Progress,
        stores: Stores<'_>,
        failed: &VersionRecord,
        backend: &Arc<dyn leasehold_backends::Backend>,
    ) -> Result<RevokeOutcome, BackendError> {
        // Only a current version on the same user and server can be put back.
        let Some(current) = progress.current().filter(|c| {
            c.credential_id == failed.credential_id && server_of(ctx, c) == server_of(ctx, failed)
        }) else {
            // Nothing to restore to (first issue failed): lock the user out instead.
            return backend
                .revoke(&RevokeRequest {
                    id: leasehold_backends::CredentialId(failed.credential_id.clone()),
                    mode: RevokeMode::DisableLogin,
                    drain: DrainSessions::Ignore,
                })
                .await;
        };
        let password = stores
            .secrets
            .get(&ctx.key, current.version)
            .await
            .map_err(|e| BackendError::Other(e.to_string()))?
            .ok_or_else(|| BackendError::Other("the current version's secret is missing".into()))?;
        backend
            .issue(&IssueRequest {
                id: leasehold_backends::CredentialId(current.credential_id.clone()),
                // Never recreate a user someone dropped meanwhile.
                mode: IssueMode::ExistingUser,
                password,
                valid_until: current.expires_at,
                privileges: ctx.privileges.clone(),
            })
            .await?;
        Ok(RevokeOutcome::Revoked)
    }
}

/// The issue journal of one version, kept next to its secret in the secret store (under
/// version `u64::MAX - version`, which no real version reaches).
struct SecretJournal<'a> {
    secrets: &'a dyn SecretStore,
    lease: &'a crate::LeaseKey,
    version: u64,
}

impl SecretJournal<'_> {
    fn slot(&self) -> u64 {
        journal_slot(self.version)
    }
}

/// Where the issue journal of `version` is kept in the secret store.
fn journal_slot(version: u64) -> u64 {
    u64::MAX - version
}

#[async_trait::async_trait]
impl leasehold_backends::IssueJournal for SecretJournal<'_> {
    async fn recorded(&self) -> Option<String> {
        use secrecy::ExposeSecret;
        self.secrets
            .get(self.lease, self.slot())
            .await
            .ok()
            .flatten()
            .map(|s| s.expose_secret().to_owned())
    }
    async fn record(&self, note: &str) -> Result<(), BackendError> {
        self.secrets
            .put(
                self.lease,
                self.slot(),
                &SecretString::from(note.to_owned()),
            )
            .await
            .map_err(|e| BackendError::Unreachable(e.to_string()))
    }
}

/// The server a version's user lives on (records without one: the lease's current).
fn server_of(ctx: &LeaseContext, record: &VersionRecord) -> String {
    record
        .target()
        .map_or_else(|| ctx.target().server_key(), Target::server_key)
}

/// The delivered files/keys of a version.
pub fn material_for(
    ctx: &LeaseContext,
    record: &VersionRecord,
    password: SecretString,
) -> CredentialMaterial {
    if let Some(material) = ctx.backend.material(&password) {
        return material;
    }
    render(
        &ctx.templates,
        &CredentialValues {
            username: record.credential_id.clone(),
            password,
            host: ctx.host.clone(),
            port: ctx.port,
            database: ctx.database.clone(),
            scheme: ctx.kind.scheme(),
            version: record.version,
        },
    )
}
