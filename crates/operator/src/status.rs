//! SecretLease status: derived from the engine's progress, written with server-side apply
//! only when it changed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::Api;
use kube::api::{Patch, PatchParams};
use leasehold_api::conditions::{self, condition, upsert};
use leasehold_api::{FIELD_MANAGER, SecretLease, SecretLeaseStatus};
use leasehold_core::Progress;
use leasehold_core::rotation::{Phase, PolicyParams, VersionState, phase, rotation_due_at};
use leasehold_engine::{LeaseKey, ProgressStore, StoreError};
use tokio::sync::Mutex;

use crate::error::store_error;
use crate::leader::LeadershipFence;

/// Kubernetes `Time` has whole seconds; truncating here keeps what we write equal to
/// what we read back, so an unchanged status compares equal.
pub fn k8s_time(t: Timestamp) -> Time {
    Time(Timestamp::from_second(t.as_second()).unwrap_or(t))
}

/// Status fields implied by `progress` (everything except conditions and consumers).
pub fn derive_status(
    base: &SecretLeaseStatus,
    progress: &Progress,
    policy: Option<&PolicyParams>,
    deleting: bool,
    now: Timestamp,
) -> SecretLeaseStatus {
    let current = progress.current();
    let mut status = base.clone();
    status.phase = phase(progress, deleting, now);
    status.current_version = current.map(|c| c.version);
    status.pending_version = progress.pending().map(|p| p.version);
    status.current_username = current.map(|c| c.credential_id.clone());
    status.expires_at = current.and_then(|c| c.expires_at).map(k8s_time);
    status.next_rotation_at = match (current, policy) {
        (Some(c), Some(p)) if !deleting => Some(k8s_time(rotation_due_at(p, c))),
        _ => None,
    };
    status.rotations = progress.history.clone();
    status.progress = progress.clone();
    status
}

/// Number of versions waiting to be revoked.
pub fn revocations_pending(progress: &Progress) -> i64 {
    progress
        .versions
        .iter()
        .filter(|r| matches!(r.state, VersionState::Superseded | VersionState::Revoking))
        .count() as i64
}

/// How a reconcile ended, as far as conditions are concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseCondition {
    /// The engine ran (or is waiting); conditions follow from progress.
    Running,
    /// Something outside the engine stops the lease: `Ready=False` with this reason.
    Blocked { reason: String, message: String },
    /// The engine failed this time (backend down, API error); retried with backoff.
    Failing { message: String },
    /// Nothing is issued for the lease itself: every pod gets its own credential through
    /// the CSI driver (a certificate lease without Secret delivery). `Ready=True`.
    PerPodOnly { message: String },
    /// The key encryption key cannot be used (KMS unreachable, key disabled, a value
    /// that does not open): `Degraded=True` with `reason`; `Ready` follows progress
    /// (a delivered credential keeps working); retried with backoff.
    KeyUnavailable { reason: String, message: String },
}

/// Set `Ready`, `Rotating`, `Verified`, `RevocationPending` and `Degraded` from progress.
pub fn derive_conditions(
    existing: &[Condition],
    progress: &Progress,
    outcome: &LeaseCondition,
    deleting: bool,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let mut conds = existing.to_vec();
    let c = |type_: &str, status: bool, reason: &str, message: String| {
        let mut cond = condition(type_, status, reason, message, generation, now);
        cond.last_transition_time = k8s_time(now);
        cond
    };
    let current = progress.current();
    let pending = revocations_pending(progress);
    let stuck = progress.revocation_stuck(now);
    let ready = match outcome {
        LeaseCondition::Blocked { reason, message } => {
            c(conditions::READY, false, reason, message.clone())
        }
        _ if deleting => c(
            conditions::READY,
            false,
            "RevocationPending",
            format!("the lease is being deleted; {pending} credential version(s) still to revoke"),
        ),
        LeaseCondition::Failing { message } if current.is_none() => {
            c(conditions::READY, false, "Failing", message.clone())
        }
        LeaseCondition::PerPodOnly { message } => {
            c(conditions::READY, true, "IssuedPerPod", message.clone())
        }
        _ => match current {
            Some(cur) => c(
                conditions::READY,
                true,
                "Active",
                format!("version {} is current", cur.version),
            ),
            None => c(
                conditions::READY,
                false,
                "Pending",
                "no credential issued yet".into(),
            ),
        },
    };
    upsert(&mut conds, ready);
    let rotating = match progress.pending() {
        Some(p) => c(
            conditions::ROTATING,
            true,
            match p.state {
                VersionState::Issuing => "Issuing",
                _ => "Verifying",
            },
            format!("version {} is being rotated in", p.version),
        ),
        None => c(
            conditions::ROTATING,
            false,
            "Idle",
            "no rotation in progress".into(),
        ),
    };
    upsert(&mut conds, rotating);
    let verified = match (progress.history.last(), current) {
        (Some(h), _) if h.outcome != leasehold_core::rotation::RotationOutcome::Succeeded => c(
            conditions::VERIFIED,
            false,
            "VerificationFailed",
            format!(
                "version {} failed: {}",
                h.version,
                h.reason.clone().unwrap_or_default()
            ),
        ),
        (_, Some(cur)) => c(
            conditions::VERIFIED,
            true,
            "LoginSucceeded",
            format!("version {} logged in before promotion", cur.version),
        ),
        (_, None) => c(
            conditions::VERIFIED,
            false,
            "NotVerified",
            "nothing verified yet".into(),
        ),
    };
    upsert(&mut conds, verified);
    let revocation = if pending > 0 {
        c(
            conditions::REVOCATION_PENDING,
            true,
            "Draining",
            format!("{pending} superseded version(s) waiting to be revoked"),
        )
    } else {
        c(
            conditions::REVOCATION_PENDING,
            false,
            "NothingPending",
            "no old versions remain".into(),
        )
    };
    upsert(&mut conds, revocation);
    let degraded = match (stuck, progress.rotation_failure()) {
        _ if let LeaseCondition::KeyUnavailable { reason, message } = outcome => c(
            conditions::DEGRADED,
            true,
            reason,
            format!(
                "{message}; rotations and issuances wait for the key, delivered credentials keep working"
            ),
        ),
        (None, Some(failed)) => c(
            conditions::DEGRADED,
            true,
            "RotationFailing",
            format!(
                "rotating to version {} failed ({} attempt(s)): {}; {}",
                failed.version,
                progress.verify_failures,
                failed
                    .reason
                    .clone()
                    .unwrap_or_else(|| "unknown error".into()),
                match progress.rotation_retry_at() {
                    Some(at) => format!("next attempt at {}", k8s_time(at).0),
                    None => "retrying".into(),
                },
            ),
        ),
        (Some(v), _) => c(
            conditions::DEGRADED,
            true,
            "RevocationStuck",
            format!(
                "revoking version {} keeps failing: {}",
                v.version,
                v.revoke
                    .as_ref()
                    .and_then(|r| r.last_error.clone())
                    .unwrap_or_default()
            ),
        ),
        (None, None) => c(
            conditions::DEGRADED,
            false,
            "Healthy",
            "revocations are working".into(),
        ),
    };
    upsert(&mut conds, degraded);
    conds
}

/// Whether `desired` differs from what the API server already has.
pub fn status_changed(observed: &SecretLeaseStatus, desired: &SecretLeaseStatus) -> bool {
    // Compare the JSON form: it is what the server stores (whole-second times, defaults).
    let a = serde_json::to_value(observed).ok();
    let b = serde_json::to_value(desired).ok();
    a.is_none() || a != b
}

/// The body of the status apply patch. `consumers` is left out: the CSI broker owns it.
pub fn status_patch(status: &SecretLeaseStatus) -> Result<serde_json::Value, StoreError> {
    let mut value = serde_json::to_value(status).map_err(|e| StoreError(format!("status: {e}")))?;
    if let Some(obj) = value.as_object_mut() {
        obj.remove("consumers");
    }
    Ok(serde_json::json!({
        "apiVersion": format!("{}/{}", leasehold_api::GROUP, leasehold_api::VERSION),
        "kind": "SecretLease",
        "status": value,
    }))
}

/// `Degraded=True SessionsBlockingDrain` when open sessions hold a `drainSessions: Wait`
/// revocation past its timeout or while the current credential nears expiry (unless a
/// stuck revocation or failing rotation already says Degraded).
pub fn sessions_blocking_condition(
    conds: &mut Vec<Condition>,
    progress: &Progress,
    policy: &PolicyParams,
    generation: Option<i64>,
    now: Timestamp,
) {
    let already = conditions::find(conds, conditions::DEGRADED).is_some_and(|c| c.status == "True");
    let Some(blocked) = progress.sessions_blocking_drain(policy, now) else {
        return;
    };
    if already {
        return;
    }
    let revoke = blocked.revoke.clone().unwrap_or_default();
    let current_expiry = progress
        .current()
        .and_then(|c| c.expires_at)
        .map(|t| k8s_time(t).0.to_string())
        .unwrap_or_else(|| "no expiry".into());
    let message = format!(
        "{} open session(s) of {} (version {}) hold its revocation (drainSessions: Wait) since {}; \
         the current credential expires at {current_expiry}. End those sessions, or set \
         drainSessions to Terminate",
        revoke.sessions_remaining.unwrap_or(0),
        blocked.credential_id,
        blocked.version,
        revoke
            .drain_started_at
            .map(|t| k8s_time(t).0.to_string())
            .unwrap_or_else(|| "unknown".into()),
    );
    let mut cond = condition(
        conditions::DEGRADED,
        true,
        "SessionsBlockingDrain",
        message,
        generation,
        now,
    );
    cond.last_transition_time = k8s_time(now);
    upsert(conds, cond);
}

struct StatusState {
    /// The lease's resourceVersion as last read or written: every write carries it as a
    /// precondition, so a controller that lost leadership (or raced another) cannot
    /// overwrite progress someone else recorded since; its write fails with 409.
    resource_version: Option<String>,
    /// What the server has (as last observed or written).
    written: SecretLeaseStatus,
    /// What we want it to have.
    desired: SecretLeaseStatus,
}

/// Saves engine progress (and the status derived from it) into the SecretLease status.
pub struct StatusProgressStore {
    api: Api<SecretLease>,
    name: String,
    policy: Option<PolicyParams>,
    deleting: bool,
    /// `spec.suspend`: the phase says so (unless deleting or in an emergency).
    suspended: bool,
    clock: Arc<dyn Fn() -> Timestamp + Send + Sync>,
    state: Mutex<StatusState>,
    writes: Arc<AtomicU64>,
    /// Checked by every save and write: the engine saves before each side effect, so a
    /// replica that does not lead stops there, even when the save would write nothing.
    fence: LeadershipFence,
}

impl std::fmt::Debug for StatusProgressStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusProgressStore")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl StatusProgressStore {
    /// A store for `lease`, starting from the status the server has.
    pub fn new(
        api: Api<SecretLease>,
        lease: &SecretLease,
        policy: Option<PolicyParams>,
        deleting: bool,
        clock: Arc<dyn Fn() -> Timestamp + Send + Sync>,
        writes: Arc<AtomicU64>,
    ) -> Self {
        let observed = lease.status.clone().unwrap_or_default();
        Self {
            api,
            name: lease.metadata.name.clone().unwrap_or_default(),
            policy,
            deleting,
            suspended: false,
            clock,
            state: Mutex::new(StatusState {
                resource_version: lease.metadata.resource_version.clone(),
                written: observed.clone(),
                desired: observed,
            }),
            writes,
            fence: LeadershipFence::always_open(),
        }
    }

    /// Refuse every save and write unless `fence` is open.
    pub fn fenced(mut self, fence: LeadershipFence) -> Self {
        self.fence = fence;
        self
    }

    /// Report the lease as suspended (`spec.suspend`).
    pub fn suspended(mut self, suspended: bool) -> Self {
        self.suspended = suspended;
        self
    }

    fn show_suspend(&self, desired: &mut SecretLeaseStatus) {
        if self.suspended && !self.deleting && desired.progress.emergency.is_none() {
            desired.phase = Phase::Suspended;
            desired.next_rotation_at = None;
        }
    }

    /// The status as it stands (observed plus unsaved changes).
    pub async fn desired(&self) -> SecretLeaseStatus {
        self.state.lock().await.desired.clone()
    }

    /// Replace conditions and `observedGeneration`, then write if anything changed.
    pub async fn finish(
        &self,
        outcome: &LeaseCondition,
        generation: Option<i64>,
    ) -> Result<bool, StoreError> {
        let now = (self.clock)();
        let mut state = self.state.lock().await;
        let conds = derive_conditions(
            &state.desired.conditions,
            &state.desired.progress,
            outcome,
            self.deleting,
            generation,
            now,
        );
        state.desired.conditions = conds;
        if let Some(policy) = &self.policy {
            let desired = &mut state.desired;
            sessions_blocking_condition(
                &mut desired.conditions,
                &desired.progress,
                policy,
                generation,
                now,
            );
        }
        state.desired.observed_generation = generation;
        self.show_suspend(&mut state.desired);
        if matches!(outcome, LeaseCondition::Blocked { .. })
            && state.desired.progress.current().is_none()
        {
            state.desired.phase = Phase::Invalid;
        }
        self.write_if_changed(&mut state).await
    }

    async fn write_if_changed(&self, state: &mut StatusState) -> Result<bool, StoreError> {
        if !status_changed(&state.written, &state.desired) {
            return Ok(false);
        }
        self.fence.check()?;
        let mut patch = status_patch(&state.desired)?;
        if let Some(rv) = &state.resource_version {
            patch["metadata"] = serde_json::json!({ "resourceVersion": rv });
        }
        let written = self
            .api
            .patch_status(
                &self.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(|e| match e {
                kube::Error::Api(ref s) if s.code == 409 => StoreError(
                    "the SecretLease changed since this controller read it (another writer, or \
                     this replica lost leadership); not writing over it, the lease is re-read"
                        .into(),
                ),
                e => store_error("cannot write the SecretLease status", e),
            })?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        state.resource_version = written.metadata.resource_version;
        state.written = state.desired.clone();
        Ok(true)
    }
}

#[async_trait]
impl ProgressStore for StatusProgressStore {
    async fn save(&self, _lease: &LeaseKey, progress: &Progress) -> Result<(), StoreError> {
        // Before anything else, and whether or not this save writes: the engine saves
        // right before each database call, and this is where a deposed leader stops.
        self.fence.check()?;
        let now = (self.clock)();
        let mut state = self.state.lock().await;
        state.desired = derive_status(
            &state.desired,
            progress,
            self.policy.as_ref(),
            self.deleting,
            now,
        );
        self.show_suspend(&mut state.desired);
        self.write_if_changed(&mut state).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_core::rotation::{DrainSessionsMode, RevokeProgress, Strategy, VersionRecord};
    use std::time::Duration;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn params() -> PolicyParams {
        PolicyParams {
            strategy: Strategy::Dynamic,
            ttl: Duration::from_secs(3600),
            renew_before: Duration::from_secs(1200),
            rotation_interval: None,
            grace_period: Duration::from_secs(120),
            wait_for_consumers: true,
            max_wait: Duration::from_secs(600),
            drain: DrainSessionsMode::Terminate,
            drain_timeout: Duration::from_secs(300),
        }
    }

    fn record(v: u64, state: VersionState) -> VersionRecord {
        VersionRecord {
            version: v,
            credential_id: format!("lh_v{v}"),
            state,
            issued_at: t(0)
                .checked_add(jiff::SignedDuration::from_nanos(123_456))
                .unwrap(),
            verified_at: None,
            promoted_at: None,
            superseded_at: None,
            expires_at: Some(
                t(3600)
                    .checked_add(jiff::SignedDuration::from_nanos(123_456))
                    .unwrap(),
            ),
            revoke_reason: None,
            revoke: None,
            issued_under: None,
        }
    }

    fn progress() -> Progress {
        Progress {
            versions: vec![
                record(1, VersionState::Superseded),
                record(2, VersionState::Current),
            ],
            last_version: 2,
            delivered_version: Some(2),
            ..Default::default()
        }
    }

    #[test]
    fn derived_fields_follow_progress_in_whole_seconds() {
        let s = derive_status(
            &SecretLeaseStatus::default(),
            &progress(),
            Some(&params()),
            false,
            t(10),
        );
        assert_eq!(s.phase, Phase::Draining);
        assert_eq!(s.current_version, Some(2));
        assert_eq!(s.pending_version, None);
        assert_eq!(s.current_username.as_deref(), Some("lh_v2"));
        assert_eq!(s.expires_at, Some(Time(t(3600))));
        assert_eq!(s.next_rotation_at, Some(Time(t(2400))));
        assert_eq!(revocations_pending(&s.progress), 1);
        let deleting = derive_status(&s, &progress(), Some(&params()), true, t(10));
        assert_eq!(deleting.phase, Phase::Deleting);
        assert_eq!(deleting.next_rotation_at, None);
    }

    #[test]
    fn conditions_reflect_progress_and_blocking_reasons() {
        let conds = derive_conditions(
            &[],
            &progress(),
            &LeaseCondition::Running,
            false,
            Some(3),
            t(10),
        );
        let get = |c: &[Condition], ty: &str| conditions::find(c, ty).cloned().unwrap();
        assert_eq!(get(&conds, "Ready").status, "True");
        assert_eq!(get(&conds, "Ready").observed_generation, Some(3));
        assert_eq!(get(&conds, "RevocationPending").status, "True");
        assert_eq!(get(&conds, "Degraded").status, "False");
        assert_eq!(get(&conds, "Rotating").status, "False");

        let blocked = LeaseCondition::Blocked {
            reason: "PolicyNotFound".into(),
            message: "RotationPolicy shop/p not found".into(),
        };
        let conds2 = derive_conditions(
            &conds,
            &Progress::default(),
            &blocked,
            false,
            Some(3),
            t(20),
        );
        assert_eq!(get(&conds2, "Ready").status, "False");
        assert_eq!(get(&conds2, "Ready").reason, "PolicyNotFound");
        assert_eq!(get(&conds2, "Ready").last_transition_time, Time(t(20)));

        let mut stuck = progress();
        stuck.versions[0].state = VersionState::Revoking;
        stuck.versions[0].revoke = Some(RevokeProgress {
            first_failure_at: Some(t(0)),
            failures: 9,
            last_error: Some("backend unreachable: connection refused".into()),
            ..Default::default()
        });
        let conds3 = derive_conditions(
            &[],
            &stuck,
            &LeaseCondition::Running,
            false,
            Some(3),
            t(3600),
        );
        assert_eq!(get(&conds3, "Degraded").status, "True");
        assert_eq!(get(&conds3, "Degraded").reason, "RevocationStuck");
        let deleting =
            derive_conditions(&[], &stuck, &LeaseCondition::Running, true, Some(3), t(10));
        assert_eq!(get(&deleting, "Ready").reason, "RevocationPending");
    }

    /// A rotation that keeps failing is not a clean `Active`: Degraded says why, how
    /// often, and when it is tried again (the current credential stays Ready).
    #[test]
    fn a_failing_rotation_is_degraded_with_reason_attempts_and_next_try() {
        let mut failing = progress();
        failing.verify_failures = 3;
        failing.last_verify_failure_at = Some(t(100));
        failing
            .history
            .push(leasehold_core::rotation::RotationRecord {
                version: 3,
                started_at: t(90),
                verified_at: None,
                promoted_at: None,
                revoked_at: Some(t(100)),
                outcome: leasehold_core::rotation::RotationOutcome::VerificationFailed,
                reason: Some("permission denied for table orders".into()),
            });
        let conds = derive_conditions(
            &[],
            &failing,
            &LeaseCondition::Running,
            false,
            Some(3),
            t(110),
        );
        let degraded = conditions::find(&conds, "Degraded").cloned().unwrap();
        assert_eq!(degraded.status, "True");
        assert_eq!(degraded.reason, "RotationFailing");
        assert!(
            degraded.message.contains("3 attempt(s)"),
            "{}",
            degraded.message
        );
        assert!(
            degraded
                .message
                .contains("permission denied for table orders")
        );
        let next = failing.rotation_retry_at().unwrap();
        assert!(next > t(100));
        assert!(
            degraded.message.contains(&k8s_time(next).0.to_string()),
            "{}",
            degraded.message
        );
        assert_eq!(conditions::find(&conds, "Ready").unwrap().status, "True");
    }

    #[test]
    fn sessions_holding_a_wait_drain_past_its_timeout_are_degraded() {
        let mut policy = params();
        policy.drain = DrainSessionsMode::Wait;
        policy.drain_timeout = Duration::from_secs(60);
        let mut p = progress();
        p.versions[0].state = VersionState::Revoking;
        p.versions[0].revoke = Some(RevokeProgress {
            sessions_remaining: Some(2),
            drain_started_at: Some(t(0)),
            ..Default::default()
        });
        let mut conds = derive_conditions(&[], &p, &LeaseCondition::Running, false, Some(1), t(30));
        sessions_blocking_condition(&mut conds, &p, &policy, Some(1), t(30));
        assert_eq!(
            conditions::find(&conds, "Degraded").unwrap().status,
            "False",
            "within the timeout"
        );
        sessions_blocking_condition(&mut conds, &p, &policy, Some(1), t(61));
        let d = conditions::find(&conds, "Degraded").cloned().unwrap();
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "SessionsBlockingDrain")
        );
        assert!(d.message.contains("2 open session(s)"), "{}", d.message);
    }

    #[test]
    fn unchanged_status_needs_no_write() {
        let now = t(10);
        let s = derive_status(
            &SecretLeaseStatus::default(),
            &progress(),
            Some(&params()),
            false,
            now,
        );
        let mut s = s;
        s.conditions = derive_conditions(
            &[],
            &s.progress,
            &LeaseCondition::Running,
            false,
            Some(1),
            now,
        );
        s.observed_generation = Some(1);
        // What the server returns: the same status after a JSON round trip.
        let observed: SecretLeaseStatus =
            serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        // A later resync derives the status again, at another time.
        let later = t(500);
        let mut again = derive_status(&observed, &observed.progress, Some(&params()), false, later);
        again.conditions = derive_conditions(
            &observed.conditions,
            &again.progress,
            &LeaseCondition::Running,
            false,
            Some(1),
            later,
        );
        assert!(!status_changed(&observed, &again));
        // A changed generation is a change.
        again.conditions = derive_conditions(
            &observed.conditions,
            &again.progress,
            &LeaseCondition::Running,
            false,
            Some(2),
            later,
        );
        assert!(status_changed(&observed, &again));
    }

    #[test]
    fn patch_leaves_consumers_to_their_owner() {
        let mut s = SecretLeaseStatus::default();
        s.consumers.push(leasehold_api::ConsumerStatus {
            kind: "Pod".into(),
            namespace: "shop".into(),
            name: "p".into(),
            version: Some(1),
            acknowledged_at: None,
        });
        let p = status_patch(&s).unwrap();
        assert_eq!(p["kind"], "SecretLease");
        assert!(p["status"].get("consumers").is_none());
        assert!(p["status"].get("phase").is_some());
    }
}
