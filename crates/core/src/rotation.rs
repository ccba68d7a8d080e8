//! The rotation state machine.
//!
//! Each version of a lease's credential moves through
//! `Issuing → Issued → Verified → Current → Superseded → Revoking → Revoked`
//! (a version that fails verification goes from `Issued` straight to `Revoking`).
//!
//! [`decide`] is a pure function from (policy, recorded progress, observations, now) to
//! the one next [`Action`]. The caller records its intent in [`Progress`] before each side
//! effect and the result after it, so a crash between any two steps resumes at the right
//! place: every action is safe to repeat.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::backoff::{Backoff, seed_of};

/// How credentials are rotated on the database side.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub enum Strategy {
    /// A new database user per version, dropped when revoked.
    #[default]
    Dynamic,
    /// Two fixed users take turns; the idle one gets the new password.
    AlternatingUsers,
    /// One existing user's password changes. Clients still using the old password fail
    /// from the moment the new one is set until they pick up the new one.
    InPlace,
}

/// What to do with sessions still open under a credential being revoked.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DrainSessionsMode {
    /// Wait for sessions to end by themselves (revocation completes when they have).
    #[default]
    Wait,
    /// Wait up to the drain timeout, then terminate remaining sessions.
    Terminate,
    /// Do not look at sessions at all.
    Ignore,
}

/// The policy, resolved into plain durations.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyParams {
    pub strategy: Strategy,
    /// Lifetime of each credential version.
    pub ttl: Duration,
    /// Start rotating this long before a version expires.
    pub renew_before: Duration,
    /// Rotate at least this often, whatever the TTL.
    pub rotation_interval: Option<Duration>,
    /// Minimum time between promotion of a new version and revocation of the old one.
    pub grace_period: Duration,
    /// Revoke only once every known consumer holds the new version ...
    pub wait_for_consumers: bool,
    /// ... or this long after promotion, whichever comes first.
    pub max_wait: Duration,
    pub drain: DrainSessionsMode,
    /// With `Terminate`: how long to wait for sessions before terminating them.
    pub drain_timeout: Duration,
}

impl PolicyParams {
    /// When a version issued at `issued_at` should be replaced.
    pub fn renew_at(&self, issued_at: Timestamp) -> Timestamp {
        add(issued_at, self.ttl.saturating_sub(self.renew_before))
    }

    /// When a version issued at `issued_at` stops working on its own (database-side expiry).
    pub fn expires_at(&self, issued_at: Timestamp) -> Option<Timestamp> {
        match self.strategy {
            // A fixed user's password must not expire behind an InPlace consumer's back.
            Strategy::InPlace => None,
            Strategy::Dynamic | Strategy::AlternatingUsers => Some(add(issued_at, self.ttl)),
        }
    }
}

/// Where one credential version stands.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VersionState {
    /// Intent recorded; the credential may or may not exist on the backend yet.
    Issuing,
    /// The backend has the credential; not yet proven to work.
    Issued,
    /// A fresh login as the credential worked.
    Verified,
    /// The version consumers should use.
    Current,
    /// Replaced by a newer version; draining before revocation.
    Superseded,
    /// Revocation decided; the credential is being made to stop working.
    Revoking,
    /// Gone from the backend.
    Revoked,
}

/// Why a version is being revoked.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevokeReason {
    /// A newer version was promoted and the old one has drained.
    Superseded,
    /// The version failed verification and was never promoted.
    VerificationFailed,
    /// The backend refused to create it; whatever exists of it is removed.
    IssueFailed,
    /// The lease is being deleted.
    LeaseDeleted,
    /// An emergency revocation (`leasehold.dev/revoke-now`) covers the version: revoked
    /// as soon as a newer version is verified and promoted, sessions terminated.
    Emergency,
}

/// Progress of revoking one version.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RevokeProgress {
    /// First attempt that failed (cleared when an attempt succeeds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_failure_at: Option<Timestamp>,
    /// Failed attempts so far.
    #[serde(default)]
    pub failures: u32,
    /// Do not try again before this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<Timestamp>,
    /// Sessions still open at the last attempt (with DrainSessions `Wait`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions_remaining: Option<u32>,
    /// When draining started (for the Terminate timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_started_at: Option<Timestamp>,
    /// The last error, without secret values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The database a credential lives on.
#[derive(
    Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// `postgres` or `mysql`.
    pub kind: String,
    pub host: String,
    pub port: u16,
    pub database: String,
    /// MySQL: the host part of the accounts (`'user'@'<accountHost>'`); `None` is `%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_host: Option<String>,
}

impl Target {
    /// `kind://host:port/database`: the engine's name for the target.
    pub fn key(&self) -> String {
        let base = format!(
            "{}://{}:{}/{}",
            self.kind, self.host, self.port, self.database
        );
        match &self.account_host {
            Some(h) => format!("{base}?accountHost={h}"),
            None => base,
        }
    }

    /// `kind://host:port`: the scope of user names (PostgreSQL roles and MySQL users
    /// belong to the server, not to one database).
    pub fn server_key(&self) -> String {
        format!("{}://{}:{}", self.kind, self.host, self.port)
    }

    /// Whether one user name names the same account on both: the same server and, for
    /// MySQL, the same account host (`'u'@'%'` and `'u'@'10.%'` are two accounts).
    pub fn same_accounts(&self, other: &Target) -> bool {
        let account_host = |t: &Target| t.account_host.as_deref().unwrap_or("%").to_owned();
        self.server_key() == other.server_key() && account_host(self) == account_host(other)
    }
}

/// What a version was issued under: everything revoking it needs besides its user name
/// ([`VersionRecord::credential_id`]). Revocation and resumed issues go by this record,
/// never by the spec or policy as they are now.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IssuedUnder {
    pub strategy: Strategy,
    pub target: Target,
}

/// One credential version as recorded in status.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VersionRecord {
    pub version: u64,
    /// The backend-side name (database user). Not secret.
    pub credential_id: String,
    pub state: VersionState,
    pub issued_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke_reason: Option<RevokeReason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke: Option<RevokeProgress>,
    /// Strategy and database the version was issued under (absent in records written
    /// before leasehold recorded it: those are handled under the current spec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_under: Option<IssuedUnder>,
}

impl VersionRecord {
    /// The strategy this version was issued with (`current` for older records).
    pub fn strategy_or(&self, current: Strategy) -> Strategy {
        self.issued_under.as_ref().map_or(current, |u| u.strategy)
    }

    /// The database this version lives on, if recorded.
    pub fn target(&self) -> Option<&Target> {
        self.issued_under.as_ref().map(|u| &u.target)
    }

    /// Whether the version was issued under another strategy or database than `now`.
    /// Records without [`VersionRecord::issued_under`] never are.
    pub fn issued_elsewhere(&self, now: &IssuedUnder) -> bool {
        self.issued_under.as_ref().is_some_and(|u| u != now)
    }

    /// Whether both versions are the same database account: the same user name on the
    /// same server (MySQL: with the same account host). A record without a target is
    /// taken to be on the other's: assuming one account when it may be two never
    /// scrambles a password a later version set (see [`RevokePlan::ScramblePassword`]).
    pub fn same_account(&self, other: &VersionRecord) -> bool {
        self.credential_id == other.credential_id
            && match (self.target(), other.target()) {
                (Some(a), Some(b)) => a.same_accounts(b),
                _ => true,
            }
    }
}

/// How a finished rotation ended.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotationOutcome {
    /// Promoted; the previous version is revoked (or there was none).
    Succeeded,
    /// Failed verification; the new version was removed and the old one kept.
    VerificationFailed,
    /// The backend refused to issue.
    IssueFailed,
}

/// One entry of the rotation history kept in status.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RotationRecord {
    pub version: u64,
    pub started_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<Timestamp>,
    pub outcome: RotationOutcome,
    /// Why it failed, without secret values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl RotationRecord {
    /// A rotation that ended in `outcome` (not a success) for `reason`.
    pub fn failed(
        version: u64,
        started_at: Timestamp,
        verified_at: Option<Timestamp>,
        outcome: RotationOutcome,
        reason: String,
    ) -> Self {
        RotationRecord {
            version,
            started_at,
            verified_at,
            promoted_at: None,
            revoked_at: None,
            outcome,
            reason: Some(reason),
        }
    }
}

/// Everything the engine records about a lease between reconciles.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Versions that still exist (or may exist) on the backend, oldest first.
    #[serde(default)]
    pub versions: Vec<VersionRecord>,
    /// The last version number handed out (versions start at 1).
    #[serde(default)]
    pub last_version: u64,
    /// The version last delivered to consumers (Secret, files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_version: Option<u64>,
    /// Consecutive verification failures (reset by a successful promotion).
    #[serde(default)]
    pub verify_failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verify_failure_at: Option<Timestamp>,
    /// The last rotation request handled (value of the force-rotation annotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_rotation_request: Option<String>,
    /// The last few rotations, newest last.
    #[serde(default)]
    pub history: Vec<RotationRecord>,
    /// The strategy the live versions were issued with, so they can still be revoked
    /// correctly when the policy is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    /// The emergency revocation under way, if any (see [`begin_emergency`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emergency: Option<EmergencyRevocation>,
    /// The last emergency request handled (value of the revoke-now annotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_emergency_request: Option<String>,
}

/// An emergency revocation: every version up to `through_version` is treated as
/// compromised. A new version is issued at once (maintenance window, renewal schedule
/// and consumers notwithstanding) and, as soon as it is verified and promoted, every
/// covered version is revoked with its sessions terminated, without waiting for the
/// grace period, consumers or `maxWait`. Nothing is revoked before a verified
/// replacement exists, so consumers are never left without a working credential.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EmergencyRevocation {
    /// The reason given with the request (the annotation's value).
    pub reason: String,
    /// When the request was first seen.
    pub requested_at: Timestamp,
    /// Every version up to and including this one is revoked.
    pub through_version: u64,
}

impl EmergencyRevocation {
    /// Whether `version` is one the emergency revokes.
    pub fn covers(&self, version: u64) -> bool {
        version <= self.through_version
    }
}

/// How many history entries to keep.
pub const HISTORY_LIMIT: usize = 10;

/// After this long failing, a revocation is reported as stuck (it keeps being retried).
pub const REVOCATION_STUCK_AFTER: Duration = Duration::from_secs(30 * 60);

/// While sessions remain under `DrainSessions: Wait`, look again this often.
pub const SESSION_POLL: Duration = Duration::from_secs(10);

impl Progress {
    pub fn version(&self, v: u64) -> Option<&VersionRecord> {
        self.versions.iter().find(|r| r.version == v)
    }

    pub fn version_mut(&mut self, v: u64) -> Option<&mut VersionRecord> {
        self.versions.iter_mut().find(|r| r.version == v)
    }

    pub fn current(&self) -> Option<&VersionRecord> {
        self.versions
            .iter()
            .find(|r| r.state == VersionState::Current)
    }

    /// A version being issued, verified or promoted.
    pub fn pending(&self) -> Option<&VersionRecord> {
        self.versions.iter().find(|r| {
            matches!(
                r.state,
                VersionState::Issuing | VersionState::Issued | VersionState::Verified
            )
        })
    }

    /// A revocation held up by open sessions (`drainSessions: Wait`) for longer than
    /// `policy.drain_timeout`, or while the current version is within `renew_before / 2`
    /// of its expiry: it may never finish on its own, and (AlternatingUsers, InPlace) no
    /// new version can be issued before it does, so the current one would expire.
    pub fn sessions_blocking_drain(
        &self,
        policy: &PolicyParams,
        now: Timestamp,
    ) -> Option<&VersionRecord> {
        if policy.drain != DrainSessionsMode::Wait {
            return None;
        }
        let current_expiring = self
            .current()
            .and_then(|c| c.expires_at)
            .is_some_and(|e| add(now, policy.renew_before / 2) >= e);
        self.versions.iter().find(|r| {
            r.state == VersionState::Revoking
                && r.revoke.as_ref().is_some_and(|p| {
                    p.sessions_remaining.is_some_and(|n| n > 0)
                        && (current_expiring
                            || p.drain_started_at
                                .is_some_and(|t| add(t, policy.drain_timeout) <= now))
                })
        })
    }

    /// A version being issued, verified or promoted under another strategy or database
    /// than `now`: it must not be finished under the new spec (its user and server are
    /// the old ones) and is revoked where it was issued instead.
    pub fn pending_issued_elsewhere(&self, now: &IssuedUnder) -> Option<&VersionRecord> {
        self.pending().filter(|p| p.issued_elsewhere(now))
    }

    /// Whether the current version was issued under another strategy or database than
    /// `now`: consumers would be handed a user of the old spec, so it is replaced now.
    pub fn current_issued_elsewhere(&self, now: &IssuedUnder) -> bool {
        self.current().is_some_and(|c| c.issued_elsewhere(now))
    }

    /// Whether any revocation has been failing for longer than [`REVOCATION_STUCK_AFTER`].
    pub fn revocation_stuck(&self, now: Timestamp) -> Option<&VersionRecord> {
        self.versions.iter().find(|r| {
            r.revoke
                .as_ref()
                .and_then(|p| p.first_failure_at)
                .is_some_and(|t| add(t, REVOCATION_STUCK_AFTER) <= now)
        })
    }

    /// The failed attempt behind the rotation that is still wanted, if the latest
    /// attempt failed (issue refused or verification failed) and no promotion has
    /// succeeded since. Status reports its reason instead of a clean `Active`.
    pub fn rotation_failure(&self) -> Option<&RotationRecord> {
        if self.verify_failures == 0 {
            return None;
        }
        self.history
            .last()
            .filter(|h| h.outcome != RotationOutcome::Succeeded)
    }

    /// When the failed rotation (see [`Progress::rotation_failure`]) is tried again,
    /// unless a rotation request comes first. The attempt count is `verify_failures`.
    pub fn rotation_retry_at(&self) -> Option<Timestamp> {
        self.last_verify_failure_at
            .filter(|_| self.verify_failures > 0)
            .map(|t| {
                add(
                    t,
                    Backoff::VERIFICATION.delay(
                        self.verify_failures.saturating_sub(1),
                        seed_of(&self.last_version.to_string()),
                    ),
                )
            })
    }

    /// A failed attempt at rotating in `record.version`: counted (the retry backoff
    /// follows the count) and kept in history.
    pub fn record_failed_attempt(&mut self, record: RotationRecord, now: Timestamp) {
        self.verify_failures += 1;
        self.last_verify_failure_at = Some(now);
        self.push_history(record);
    }

    /// Append to history, keeping the newest [`HISTORY_LIMIT`] entries.
    pub fn push_history(&mut self, record: RotationRecord) {
        if let Some(existing) = self
            .history
            .iter_mut()
            .find(|h| h.version == record.version)
        {
            *existing = record;
        } else {
            self.history.push(record);
        }
        let excess = self.history.len().saturating_sub(HISTORY_LIMIT);
        self.history.drain(..excess);
    }
}

/// [`Observations::consumers_hold`] when there are no consumers to wait for.
pub const ALL_CONSUMERS_CURRENT: u64 = u64::MAX;

/// What the caller saw outside the recorded progress.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observations {
    /// The lease is being deleted: revoke everything.
    pub deleting: bool,
    /// Every known consumer holds this version or a newer one ([`ALL_CONSUMERS_CURRENT`]
    /// when there are none; 0 when some consumer holds nothing known). A version, not
    /// a yes/no about "the current" one: the observation is made before the engine
    /// promotes, and must not count for a version promoted after it was made.
    pub consumers_hold: u64,
    /// A rotation was requested (the value of the request annotation), if any.
    pub rotation_request: Option<String>,
    /// Rotations not forced by expiry may start now (no maintenance window, or inside it).
    pub maintenance_window_open: bool,
    /// When the maintenance window next opens (if it is closed).
    pub maintenance_window_opens_at: Option<Timestamp>,
    /// An emergency revocation was requested (the value of the revoke-now annotation:
    /// the reason), if any.
    pub emergency_request: Option<String>,
    /// `spec.suspend`: start nothing and revoke nothing (deletion and emergency
    /// revocations still proceed).
    pub suspended: bool,
}

/// What a revocation does on the backend, by strategy and reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokePlan {
    /// Disable login, drain, drop the user.
    DropUser,
    /// Disable login and drain, keep the user (AlternatingUsers' idle user).
    DisableLogin,
    /// Put the current version's password back (InPlace after a failed verification:
    /// the new password replaced the old one on the same user).
    RestoreCurrent,
    /// Set a password nobody keeps, drain, keep the user with its login and privileges
    /// (InPlace superseded or revoked in an emergency when no later version lives on the
    /// same account: the strategy, username, account host or server changed, so nothing
    /// replaced the password leasehold handed out, and it would keep working).
    ScramblePassword,
    /// Nothing left to do on the backend (InPlace: a later version on the same account
    /// already replaced the password, or the lease is deleted and the user goes back to
    /// its owner as it is).
    Nothing,
}

/// The one next thing to do for a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start version `version` (not yet recorded) or resume one recorded as `Issuing`:
    /// make sure its secret is stored, record `Issuing`, call the backend, record `Issued`.
    Issue { version: u64, resume: bool },
    /// Log in as the version; record `Verified`, or `Revoking(VerificationFailed)`.
    Verify { version: u64 },
    /// Make the version current; the previous current becomes `Superseded`.
    Promote { version: u64 },
    /// Hand the current version to consumers (Secret, files, restarts). Idempotent.
    Deliver { version: u64 },
    /// Record `Revoking` (if not yet), then make the version stop working.
    Revoke {
        version: u64,
        reason: RevokeReason,
        plan: RevokePlan,
        drain: DrainSessionsMode,
    },
    /// Nothing to do until `until` (or until something observed changes).
    Wait {
        until: Option<Timestamp>,
        reason: WaitReason,
    },
    /// The lease is being deleted and nothing of it remains: release the finalizer.
    Finished,
}

/// Why the engine is waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitReason {
    /// Current version is fresh; next renewal at `until`.
    Renewal,
    /// An old version is draining (grace period, consumers, sessions).
    Draining,
    /// A revocation failed and is retried at `until`.
    RevocationBackoff,
    /// Verification failed recently; the next attempt is at `until`.
    VerificationBackoff,
    /// Renewal is due but the maintenance window is closed.
    MaintenanceWindow,
    /// AlternatingUsers/InPlace: a rotation must wait until the previous one has finished revoking.
    PreviousRotationUnfinished,
    /// Open sessions keep a revocation (`drainSessions: Wait`) from finishing for longer
    /// than the drain timeout, or while the current credential nears its expiry (the
    /// next rotation cannot start before it finishes): report the lease `Degraded`.
    SessionsBlockingDrain,
    /// `spec.suspend` is set: no rotation starts and nothing is revoked until it is cleared.
    Suspended,
}

/// `t + d`, saturating at the end of time.
pub fn add(t: Timestamp, d: Duration) -> Timestamp {
    let d = SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX);
    t.checked_add(d).unwrap_or(Timestamp::MAX)
}

/// The backend work a revocation needs. `replaced`: a later version lives on the same
/// account (see [`VersionRecord::same_account`]), so the revoked version's password was
/// already replaced there (only InPlace asks).
pub fn revoke_plan(strategy: Strategy, reason: RevokeReason, replaced: bool) -> RevokePlan {
    match (strategy, reason) {
        (Strategy::Dynamic, _) => RevokePlan::DropUser,
        (Strategy::AlternatingUsers, _) => RevokePlan::DisableLogin,
        (Strategy::InPlace, RevokeReason::VerificationFailed | RevokeReason::IssueFailed) => {
            RevokePlan::RestoreCurrent
        }
        (Strategy::InPlace, RevokeReason::Superseded | RevokeReason::Emergency) if replaced => {
            RevokePlan::Nothing
        }
        // The user is someone else's: never dropped or locked, but the password leasehold
        // handed out must stop working.
        (Strategy::InPlace, RevokeReason::Superseded | RevokeReason::Emergency) => {
            RevokePlan::ScramblePassword
        }
        // Deleting an InPlace lease leaves the user as it is: leasehold did not create it.
        (Strategy::InPlace, RevokeReason::LeaseDeleted) => RevokePlan::Nothing,
    }
}

/// The session rule for a revocation that started draining at `drain_started_at`.
pub fn drain_mode_now(
    policy: &PolicyParams,
    drain_started_at: Option<Timestamp>,
    now: Timestamp,
) -> DrainSessionsMode {
    match policy.drain {
        DrainSessionsMode::Terminate => match drain_started_at {
            Some(t) if add(t, policy.drain_timeout) <= now => DrainSessionsMode::Terminate,
            _ => DrainSessionsMode::Wait,
        },
        other => other,
    }
}

/// When a superseded version may be revoked, or `None` if it may be revoked now.
pub fn drain_ready_at(
    policy: &PolicyParams,
    superseded_at: Timestamp,
    consumers_on_current: bool,
    now: Timestamp,
) -> Option<Timestamp> {
    let grace_end = add(superseded_at, policy.grace_period);
    let hard_end = add(superseded_at, policy.max_wait.max(policy.grace_period));
    let ready =
        now >= grace_end && (!policy.wait_for_consumers || consumers_on_current || now >= hard_end);
    if ready {
        None
    } else if now < grace_end {
        Some(grace_end)
    } else {
        Some(hard_end)
    }
}

/// When the current version should be rotated (ignoring windows and requests).
pub fn rotation_due_at(policy: &PolicyParams, current: &VersionRecord) -> Timestamp {
    let renew = policy.renew_at(current.issued_at);
    match (policy.rotation_interval, current.promoted_at) {
        (Some(interval), Some(promoted)) => renew.min(add(promoted, interval)),
        _ => renew,
    }
}

/// Record a new emergency request from `obs` in `progress` (covering every version
/// handed out so far). Returns the emergency begun, or `None` when there is no new
/// request. The caller saves the progress before acting on it.
pub fn begin_emergency<'a>(
    progress: &'a mut Progress,
    obs: &Observations,
    now: Timestamp,
) -> Option<&'a EmergencyRevocation> {
    let request = obs.emergency_request.as_ref()?;
    if obs.deleting || progress.handled_emergency_request.as_ref() == Some(request) {
        return None;
    }
    progress.handled_emergency_request = Some(request.clone());
    // A second request while one is under way widens it to what exists now.
    progress.emergency = Some(EmergencyRevocation {
        reason: request.clone(),
        requested_at: progress
            .emergency
            .as_ref()
            .map_or(now, |e| e.requested_at.min(now)),
        through_version: progress.last_version,
    });
    progress.emergency.as_ref()
}

/// Whether the emergency under way has done its work: a version newer than every
/// covered one is current (or nothing was ever issued) and no covered version remains
/// on the backend.
pub fn emergency_finished(progress: &Progress) -> bool {
    let Some(e) = &progress.emergency else {
        return false;
    };
    let replaced =
        e.through_version == 0 || progress.current().is_some_and(|c| !e.covers(c.version));
    replaced && !progress.versions.iter().any(|r| e.covers(r.version))
}

/// Decide the next action.
pub fn decide(
    policy: &PolicyParams,
    progress: &Progress,
    obs: &Observations,
    now: Timestamp,
) -> Action {
    let mut wait: Option<(Timestamp, WaitReason)> = None;
    let mut wait_for = |t: Timestamp, r: WaitReason| {
        if wait.is_none_or(|(w, _)| t < w) {
            wait = Some((t, r));
        }
    };

    // Revocations already under way come first: they never give up, but respect backoff.
    let revoke_ready = |r: &VersionRecord| {
        r.revoke
            .as_ref()
            .and_then(|p| p.next_attempt_at)
            .filter(|t| *t > now)
    };
    // A version is revoked the way it was issued, whatever the policy says now.
    let emergency = progress.emergency.as_ref();
    let covered = |r: &VersionRecord| emergency.is_some_and(|e| e.covers(r.version));
    let replaced = |r: &VersionRecord| {
        progress
            .versions
            .iter()
            .any(|later| later.version > r.version && later.same_account(r))
    };
    let revoke_action = |r: &VersionRecord, reason: RevokeReason| Action::Revoke {
        version: r.version,
        reason,
        plan: revoke_plan(r.strategy_or(policy.strategy), reason, replaced(r)),
        // An emergency does not wait for sessions to end: they are terminated.
        drain: if reason == RevokeReason::Emergency {
            DrainSessionsMode::Terminate
        } else {
            drain_mode_now(
                policy,
                r.revoke.as_ref().and_then(|p| p.drain_started_at),
                now,
            )
        },
    };

    if obs.deleting {
        for r in &progress.versions {
            if r.state == VersionState::Revoked {
                continue;
            }
            if let Some(t) = revoke_ready(r) {
                wait_for(t, WaitReason::RevocationBackoff);
                continue;
            }
            let reason = r.revoke_reason.unwrap_or(RevokeReason::LeaseDeleted);
            return revoke_action(r, reason);
        }
        return match wait {
            Some((t, reason)) => Action::Wait {
                until: Some(t),
                reason,
            },
            None => Action::Finished,
        };
    }

    // Suspended: nothing starts and nothing is revoked (an emergency overrides it).
    if obs.suspended && emergency.is_none() {
        return Action::Wait {
            until: None,
            reason: WaitReason::Suspended,
        };
    }

    for r in &progress.versions {
        if r.state != VersionState::Revoking {
            continue;
        }
        if let Some(t) = revoke_ready(r) {
            wait_for(t, WaitReason::RevocationBackoff);
            continue;
        }
        return revoke_action(r, r.revoke_reason.unwrap_or(RevokeReason::Superseded));
    }

    if let Some(p) = progress.pending() {
        return match p.state {
            VersionState::Issuing => Action::Issue {
                version: p.version,
                resume: true,
            },
            VersionState::Issued => Action::Verify { version: p.version },
            _ => Action::Promote { version: p.version },
        };
    }

    let current = progress.current();
    if let Some(c) = current
        && progress.delivered_version != Some(c.version)
    {
        return Action::Deliver { version: c.version };
    }

    for r in &progress.versions {
        if r.state != VersionState::Superseded {
            continue;
        }
        if covered(r) {
            return revoke_action(r, RevokeReason::Emergency);
        }
        let superseded_at = r.superseded_at.unwrap_or(r.issued_at);
        let consumers_on_current = current.is_none_or(|c| obs.consumers_hold >= c.version);
        match drain_ready_at(policy, superseded_at, consumers_on_current, now) {
            None => return revoke_action(r, RevokeReason::Superseded),
            Some(t) => wait_for(t, WaitReason::Draining),
        }
    }

    // Should a new version start?
    let draining = progress
        .versions
        .iter()
        .any(|r| matches!(r.state, VersionState::Superseded | VersionState::Revoking));
    // An emergency whose covered version is still current wants a new one now.
    let emergency_due = emergency.is_some_and(|e| current.is_some_and(|c| e.covers(c.version)));
    let requested = emergency_due
        || (obs.rotation_request.is_some()
            && obs.rotation_request != progress.handled_rotation_request);
    let (due_at, urgent) = match current {
        None => (now, true),
        Some(c) => {
            let due = rotation_due_at(policy, c);
            // Past the midpoint of the renewal window, the maintenance window no longer holds it back.
            let urgent = c
                .expires_at
                .is_some_and(|e| add(now, policy.renew_before / 2) >= e);
            (
                if requested { now.min(due) } else { due },
                urgent || requested,
            )
        }
    };
    // After a failed attempt the rotation is still wanted: retry with backoff (a new
    // rotation request skips the backoff).
    // (An emergency skips the backoff of failures that came before it, not its own.)
    let failed_retry_at = progress.rotation_retry_at().filter(|_| match emergency {
        Some(e) if emergency_due => progress
            .last_verify_failure_at
            .is_some_and(|f| f >= e.requested_at),
        _ => !requested,
    });
    let (due_at, due_reason) = match failed_retry_at {
        Some(r) => (r, WaitReason::VerificationBackoff),
        None => (due_at, WaitReason::Renewal),
    };

    if due_at > now {
        wait_for(due_at, due_reason);
    } else if draining && policy.strategy != Strategy::Dynamic {
        // The idle user (or the single user) is still held by the previous rotation.
        wait_for(
            add(now, SESSION_POLL),
            WaitReason::PreviousRotationUnfinished,
        );
    } else if !urgent && !obs.maintenance_window_open {
        match obs.maintenance_window_opens_at {
            Some(t) => wait_for(t, WaitReason::MaintenanceWindow),
            None => wait_for(
                add(now, Duration::from_secs(60)),
                WaitReason::MaintenanceWindow,
            ),
        }
    } else {
        return Action::Issue {
            version: progress.last_version + 1,
            resume: false,
        };
    }

    let (until, reason) = match wait {
        Some((t, r)) => (Some(t), r),
        None => (None, WaitReason::Renewal),
    };
    // Sessions holding a drain up is what the lease is really waiting for.
    let reason = if progress.sessions_blocking_drain(policy, now).is_some() {
        WaitReason::SessionsBlockingDrain
    } else {
        reason
    };
    Action::Wait { until, reason }
}

/// The next attempt time after a failed revocation attempt number `failures` (1-based).
pub fn revoke_retry_at(version: &VersionRecord, failures: u32, now: Timestamp) -> Timestamp {
    let seed = seed_of(&version.credential_id);
    add(
        now,
        Backoff::REVOCATION.delay(failures.saturating_sub(1), seed),
    )
}

/// A coarse summary of where a lease stands, for `kubectl get`.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Phase {
    /// No credential yet.
    #[default]
    Pending,
    /// A current credential exists and nothing is in flight.
    Active,
    /// A new version is being issued.
    Issuing,
    /// A new version is being verified.
    Verifying,
    /// An old version is draining or being revoked.
    Draining,
    /// Revocation is failing for longer than it should.
    Degraded,
    /// The lease is being deleted; its credentials are being revoked.
    Deleting,
    /// The spec or policy is invalid; nothing is done until it changes.
    Invalid,
    /// `spec.suspend` is set: nothing is rotated or revoked until it is cleared.
    Suspended,
    /// An emergency revocation is under way (`leasehold.dev/revoke-now`).
    Revoking,
}

/// The phase implied by recorded progress.
pub fn phase(progress: &Progress, deleting: bool, now: Timestamp) -> Phase {
    if deleting {
        return Phase::Deleting;
    }
    if progress.revocation_stuck(now).is_some() {
        return Phase::Degraded;
    }
    if progress.emergency.is_some() {
        return Phase::Revoking;
    }
    if let Some(p) = progress.pending() {
        return match p.state {
            VersionState::Issuing => Phase::Issuing,
            _ => Phase::Verifying,
        };
    }
    if progress
        .versions
        .iter()
        .any(|r| matches!(r.state, VersionState::Superseded | VersionState::Revoking))
    {
        return Phase::Draining;
    }
    if progress.current().is_some() {
        Phase::Active
    } else {
        Phase::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn policy(strategy: Strategy) -> PolicyParams {
        PolicyParams {
            strategy,
            ttl: 60 * MIN,
            renew_before: 20 * MIN,
            rotation_interval: None,
            grace_period: 2 * MIN,
            wait_for_consumers: true,
            max_wait: 10 * MIN,
            drain: DrainSessionsMode::Terminate,
            drain_timeout: 5 * MIN,
        }
    }

    fn t(mins: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + mins * 60).unwrap()
    }

    fn record(version: u64, state: VersionState, issued: i64) -> VersionRecord {
        VersionRecord {
            version,
            credential_id: format!("lh_v{version}"),
            state,
            issued_at: t(issued),
            verified_at: None,
            promoted_at: Some(t(issued)),
            superseded_at: None,
            expires_at: Some(t(issued + 60)),
            revoke_reason: None,
            revoke: None,
            issued_under: None,
        }
    }

    fn obs() -> Observations {
        Observations {
            consumers_hold: ALL_CONSUMERS_CURRENT,
            maintenance_window_open: true,
            ..Default::default()
        }
    }

    fn emergency_obs(reason: &str) -> Observations {
        Observations {
            emergency_request: Some(reason.to_owned()),
            // Everything that would normally hold a rotation back.
            maintenance_window_open: false,
            consumers_hold: 0,
            ..obs()
        }
    }

    #[test]
    fn an_emergency_rotates_at_once_and_revokes_without_waiting_for_consumers() {
        let p = policy(Strategy::Dynamic);
        let mut progress = Progress {
            versions: vec![
                {
                    let mut r = record(1, VersionState::Superseded, 0);
                    r.superseded_at = Some(t(1));
                    r
                },
                record(2, VersionState::Current, 1),
            ],
            last_version: 2,
            delivered_version: Some(2),
            ..Progress::default()
        };
        let o = emergency_obs("leaked in CI logs");
        // Fresh version, window closed, a consumer lagging: without the emergency, nothing.
        let calm = Observations {
            emergency_request: None,
            ..o.clone()
        };
        assert!(matches!(
            decide(&p, &progress, &calm, t(2)),
            Action::Wait { .. }
        ));

        let begun = begin_emergency(&mut progress, &o, t(2)).cloned();
        assert_eq!(
            begun,
            Some(EmergencyRevocation {
                reason: "leaked in CI logs".into(),
                requested_at: t(2),
                through_version: 2,
            })
        );
        // Handled once: the same annotation value does not begin it again.
        assert!(begin_emergency(&mut progress, &o, t(3)).is_none());
        // The superseded version 1 is revoked at once (inside its grace period), sessions terminated.
        assert_eq!(
            decide(&p, &progress, &o, t(2)),
            Action::Revoke {
                version: 1,
                reason: RevokeReason::Emergency,
                plan: RevokePlan::DropUser,
                drain: DrainSessionsMode::Terminate,
            }
        );
        progress.versions.remove(0);
        // The current version 2 is covered: a new one is issued now (window closed, not due).
        assert_eq!(
            decide(&p, &progress, &o, t(2)),
            Action::Issue {
                version: 3,
                resume: false
            }
        );
        // Nothing is revoked before the replacement is verified and promoted.
        progress.versions.push(VersionRecord {
            promoted_at: None,
            ..record(3, VersionState::Issued, 2)
        });
        progress.last_version = 3;
        assert_eq!(
            decide(&p, &progress, &o, t(2)),
            Action::Verify { version: 3 }
        );
        assert!(!emergency_finished(&progress));
        // Promoted and delivered: version 2 goes at once, although no consumer has 3.
        progress.versions[0].state = VersionState::Superseded;
        progress.versions[0].superseded_at = Some(t(3));
        progress.versions[1].state = VersionState::Current;
        progress.delivered_version = Some(3);
        assert_eq!(
            decide(&p, &progress, &o, t(3)),
            Action::Revoke {
                version: 2,
                reason: RevokeReason::Emergency,
                plan: RevokePlan::DropUser,
                drain: DrainSessionsMode::Terminate,
            }
        );
        assert_eq!(phase(&progress, false, t(3)), Phase::Revoking);
        progress.versions.remove(0);
        assert!(emergency_finished(&progress));
    }

    #[test]
    fn an_emergency_keeps_its_own_verification_backoff_but_not_an_older_one() {
        let p = policy(Strategy::Dynamic);
        let mut progress = Progress {
            versions: vec![record(2, VersionState::Current, 0)],
            last_version: 2,
            delivered_version: Some(2),
            verify_failures: 3,
            last_verify_failure_at: Some(t(1)),
            ..Progress::default()
        };
        let o = emergency_obs("r");
        begin_emergency(&mut progress, &o, t(2));
        assert!(matches!(
            decide(&p, &progress, &o, t(2)),
            Action::Issue { version: 3, .. }
        ));
        // It failed after the request: the usual backoff holds the next attempt.
        progress.last_verify_failure_at = Some(t(3));
        assert!(matches!(
            decide(&p, &progress, &o, t(3)),
            Action::Wait {
                reason: WaitReason::VerificationBackoff,
                ..
            }
        ));
    }

    #[test]
    fn suspend_stops_rotation_and_revocation_but_not_deletion_or_an_emergency() {
        let p = policy(Strategy::Dynamic);
        let mut progress = Progress {
            versions: vec![
                record(1, VersionState::Superseded, 0),
                record(2, VersionState::Current, 0),
            ],
            last_version: 2,
            delivered_version: Some(2),
            ..Progress::default()
        };
        let suspended = Observations {
            suspended: true,
            ..obs()
        };
        // Long past renewal and past the drain: nothing happens while suspended.
        assert_eq!(
            decide(&p, &progress, &suspended, t(59)),
            Action::Wait {
                until: None,
                reason: WaitReason::Suspended
            }
        );
        let deleting = Observations {
            deleting: true,
            ..suspended.clone()
        };
        assert!(matches!(
            decide(&p, &progress, &deleting, t(59)),
            Action::Revoke { version: 1, .. }
        ));
        let emergency = Observations {
            emergency_request: Some("r".into()),
            ..suspended
        };
        begin_emergency(&mut progress, &emergency, t(59));
        assert!(matches!(
            decide(&p, &progress, &emergency, t(59)),
            Action::Revoke {
                version: 1,
                reason: RevokeReason::Emergency,
                ..
            }
        ));
    }

    #[test]
    fn an_emergency_on_a_lease_without_credentials_is_finished_at_once() {
        let mut progress = Progress::default();
        begin_emergency(&mut progress, &emergency_obs("r"), t(0));
        assert!(emergency_finished(&progress));
    }

    #[test]
    fn first_version_is_issued_immediately() {
        let a = decide(
            &policy(Strategy::Dynamic),
            &Progress::default(),
            &obs(),
            t(0),
        );
        assert_eq!(
            a,
            Action::Issue {
                version: 1,
                resume: false
            }
        );
    }

    #[test]
    fn each_recorded_state_resumes_at_the_right_step() {
        let p = policy(Strategy::Dynamic);
        for (state, want) in [
            (
                VersionState::Issuing,
                Action::Issue {
                    version: 1,
                    resume: true,
                },
            ),
            (VersionState::Issued, Action::Verify { version: 1 }),
            (VersionState::Verified, Action::Promote { version: 1 }),
        ] {
            let progress = Progress {
                versions: vec![record(1, state, 0)],
                last_version: 1,
                ..Default::default()
            };
            assert_eq!(decide(&p, &progress, &obs(), t(1)), want, "{state:?}");
        }
    }

    #[test]
    fn current_is_delivered_then_renewed_at_two_thirds() {
        let p = policy(Strategy::Dynamic);
        let mut progress = Progress {
            versions: vec![record(1, VersionState::Current, 0)],
            last_version: 1,
            ..Default::default()
        };
        assert_eq!(
            decide(&p, &progress, &obs(), t(1)),
            Action::Deliver { version: 1 }
        );
        progress.delivered_version = Some(1);
        assert_eq!(
            decide(&p, &progress, &obs(), t(1)),
            Action::Wait {
                until: Some(t(40)),
                reason: WaitReason::Renewal
            }
        );
        assert_eq!(
            decide(&p, &progress, &obs(), t(40)),
            Action::Issue {
                version: 2,
                resume: false
            }
        );
    }

    #[test]
    fn superseded_waits_for_grace_and_consumers_until_max_wait() {
        let p = policy(Strategy::Dynamic);
        let mut old = record(1, VersionState::Superseded, 0);
        old.superseded_at = Some(t(40));
        let progress = Progress {
            versions: vec![old, record(2, VersionState::Current, 40)],
            last_version: 2,
            delivered_version: Some(2),
            ..Default::default()
        };
        let waiting = Observations {
            consumers_hold: 1,
            ..obs()
        };
        assert_eq!(
            decide(&p, &progress, &obs(), t(41)),
            Action::Wait {
                until: Some(t(42)),
                reason: WaitReason::Draining
            }
        );
        assert_eq!(
            decide(&p, &progress, &waiting, t(45)),
            Action::Wait {
                until: Some(t(50)),
                reason: WaitReason::Draining
            }
        );
        let revoke = Action::Revoke {
            version: 1,
            reason: RevokeReason::Superseded,
            plan: RevokePlan::DropUser,
            drain: DrainSessionsMode::Wait,
        };
        assert_eq!(decide(&p, &progress, &obs(), t(42)), revoke);
        assert_eq!(decide(&p, &progress, &waiting, t(50)), revoke);
    }

    #[test]
    fn failed_verification_revokes_new_and_backs_off() {
        let p = policy(Strategy::Dynamic);
        let mut bad = record(2, VersionState::Revoking, 40);
        bad.revoke_reason = Some(RevokeReason::VerificationFailed);
        let mut progress = Progress {
            versions: vec![record(1, VersionState::Current, 0), bad],
            last_version: 2,
            delivered_version: Some(1),
            verify_failures: 1,
            last_verify_failure_at: Some(t(40)),
            ..Default::default()
        };
        assert!(matches!(
            decide(&p, &progress, &obs(), t(40)),
            Action::Revoke {
                version: 2,
                reason: RevokeReason::VerificationFailed,
                plan: RevokePlan::DropUser,
                ..
            }
        ));
        progress.versions.pop();
        match decide(&p, &progress, &obs(), t(40)) {
            Action::Wait {
                until: Some(u),
                reason: WaitReason::VerificationBackoff,
            } => {
                assert!(u > t(40) && u <= add(t(40), Duration::from_secs(10)))
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn failed_rotation_is_retried_after_backoff_not_at_next_renewal() {
        let p = policy(Strategy::Dynamic);
        let progress = Progress {
            versions: vec![record(1, VersionState::Current, 0)],
            last_version: 2,
            delivered_version: Some(1),
            verify_failures: 2,
            last_verify_failure_at: Some(t(5)),
            ..Default::default()
        };
        match decide(&p, &progress, &obs(), t(5)) {
            Action::Wait {
                until: Some(u),
                reason: WaitReason::VerificationBackoff,
            } => {
                assert!(u > t(5) && u <= add(t(5), Duration::from_secs(20)), "{u}")
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            decide(&p, &progress, &obs(), t(6)),
            Action::Issue {
                version: 3,
                resume: false
            }
        );
    }

    #[test]
    fn revocation_retries_respect_backoff_and_never_stop() {
        let p = policy(Strategy::Dynamic);
        let mut old = record(1, VersionState::Revoking, 0);
        old.revoke_reason = Some(RevokeReason::Superseded);
        old.revoke = Some(RevokeProgress {
            first_failure_at: Some(t(40)),
            failures: 50,
            next_attempt_at: Some(t(80)),
            ..Default::default()
        });
        let progress = Progress {
            versions: vec![old.clone(), record(2, VersionState::Current, 40)],
            last_version: 2,
            delivered_version: Some(2),
            ..Default::default()
        };
        assert!(matches!(
            decide(&p, &progress, &obs(), t(79)),
            Action::Wait {
                reason: WaitReason::RevocationBackoff,
                ..
            }
        ));
        assert!(matches!(
            decide(&p, &progress, &obs(), t(80)),
            Action::Revoke { version: 1, .. }
        ));
        assert!(progress.revocation_stuck(t(69)).is_none());
        assert_eq!(progress.revocation_stuck(t(70)).map(|r| r.version), Some(1));
        assert_eq!(phase(&progress, false, t(70)), Phase::Degraded);
        assert!(revoke_retry_at(&old, 1000, t(0)) <= add(t(0), Duration::from_secs(300)));
    }

    #[test]
    fn terminate_waits_for_drain_timeout() {
        let p = policy(Strategy::Dynamic);
        assert_eq!(drain_mode_now(&p, None, t(0)), DrainSessionsMode::Wait);
        assert_eq!(
            drain_mode_now(&p, Some(t(0)), t(4)),
            DrainSessionsMode::Wait
        );
        assert_eq!(
            drain_mode_now(&p, Some(t(0)), t(5)),
            DrainSessionsMode::Terminate
        );
    }

    #[test]
    fn sessions_holding_a_drain_past_its_timeout_or_near_expiry_are_reported() {
        let mut p = policy(Strategy::AlternatingUsers);
        p.drain = DrainSessionsMode::Wait;
        let mut old = record(1, VersionState::Revoking, 0);
        old.revoke_reason = Some(RevokeReason::Superseded);
        old.revoke = Some(RevokeProgress {
            drain_started_at: Some(t(40)),
            sessions_remaining: Some(3),
            next_attempt_at: Some(t(41)),
            ..Default::default()
        });
        // v2 expires at t(100).
        let mut progress = Progress {
            versions: vec![old, record(2, VersionState::Current, 40)],
            last_version: 2,
            delivered_version: Some(2),
            ..Default::default()
        };
        let waiting =
            |p: &PolicyParams, progress: &Progress, now| match decide(p, progress, &obs(), now) {
                Action::Wait { reason, .. } => reason,
                other => panic!("unexpected {other:?}"),
            };
        // Within the drain timeout (5 min): an ordinary wait.
        assert_eq!(progress.sessions_blocking_drain(&p, t(44)), None);
        assert_eq!(waiting(&p, &progress, t(40)), WaitReason::RevocationBackoff);
        // Past it: reported.
        progress.versions[0]
            .revoke
            .as_mut()
            .unwrap()
            .next_attempt_at = Some(t(46));
        assert_eq!(
            progress
                .sessions_blocking_drain(&p, t(45))
                .map(|r| r.version),
            Some(1)
        );
        assert_eq!(
            waiting(&p, &progress, t(45)),
            WaitReason::SessionsBlockingDrain
        );
        // With a long timeout, the current credential nearing expiry reports it too.
        p.drain_timeout = 600 * MIN;
        assert_eq!(progress.sessions_blocking_drain(&p, t(45)), None);
        progress.versions[0]
            .revoke
            .as_mut()
            .unwrap()
            .next_attempt_at = Some(t(95));
        assert_eq!(
            progress
                .sessions_blocking_drain(&p, t(90))
                .map(|r| r.version),
            Some(1)
        );
        assert_eq!(
            waiting(&p, &progress, t(90)),
            WaitReason::SessionsBlockingDrain
        );
        // Sessions gone, or a mode that does not wait for them: nothing to report.
        progress.versions[0]
            .revoke
            .as_mut()
            .unwrap()
            .sessions_remaining = Some(0);
        assert_eq!(progress.sessions_blocking_drain(&p, t(90)), None);
        progress.versions[0]
            .revoke
            .as_mut()
            .unwrap()
            .sessions_remaining = Some(3);
        p.drain = DrainSessionsMode::Terminate;
        assert_eq!(progress.sessions_blocking_drain(&p, t(90)), None);
    }

    #[test]
    fn alternating_waits_for_previous_revocation() {
        let p = policy(Strategy::AlternatingUsers);
        let mut old = record(1, VersionState::Superseded, 0);
        old.superseded_at = Some(t(40));
        let progress = Progress {
            versions: vec![old, record(2, VersionState::Current, 0)],
            last_version: 2,
            delivered_version: Some(2),
            ..Default::default()
        };
        let any_consumers = Observations {
            consumers_hold: 1,
            ..obs()
        };
        assert!(matches!(
            decide(&p, &progress, &any_consumers, t(45)),
            Action::Wait {
                reason: WaitReason::Draining | WaitReason::PreviousRotationUnfinished,
                ..
            }
        ));
    }

    #[test]
    fn deletion_revokes_everything_then_finishes() {
        let p = policy(Strategy::Dynamic);
        let deleting = Observations {
            deleting: true,
            ..obs()
        };
        let mut progress = Progress {
            versions: vec![record(1, VersionState::Current, 0)],
            last_version: 1,
            ..Default::default()
        };
        assert!(matches!(
            decide(&p, &progress, &deleting, t(1)),
            Action::Revoke {
                version: 1,
                reason: RevokeReason::LeaseDeleted,
                ..
            }
        ));
        progress.versions[0].state = VersionState::Revoked;
        assert_eq!(decide(&p, &progress, &deleting, t(1)), Action::Finished);
    }

    #[test]
    fn in_place_failed_verification_restores_current() {
        for replaced in [false, true] {
            assert_eq!(
                revoke_plan(
                    Strategy::InPlace,
                    RevokeReason::VerificationFailed,
                    replaced
                ),
                RevokePlan::RestoreCurrent
            );
            assert_eq!(
                revoke_plan(
                    Strategy::AlternatingUsers,
                    RevokeReason::Superseded,
                    replaced
                ),
                RevokePlan::DisableLogin
            );
            assert_eq!(
                revoke_plan(Strategy::Dynamic, RevokeReason::Emergency, replaced),
                RevokePlan::DropUser
            );
            // Deleting the lease hands the user back to its owner as it is.
            assert_eq!(
                revoke_plan(Strategy::InPlace, RevokeReason::LeaseDeleted, replaced),
                RevokePlan::Nothing
            );
        }
        assert_eq!(
            revoke_plan(Strategy::InPlace, RevokeReason::Superseded, true),
            RevokePlan::Nothing
        );
        assert_eq!(
            revoke_plan(Strategy::InPlace, RevokeReason::Emergency, true),
            RevokePlan::Nothing
        );
        assert_eq!(
            revoke_plan(Strategy::InPlace, RevokeReason::Superseded, false),
            RevokePlan::ScramblePassword
        );
        assert_eq!(
            revoke_plan(Strategy::InPlace, RevokeReason::Emergency, false),
            RevokePlan::ScramblePassword
        );
    }

    #[test]
    fn maintenance_window_defers_unless_urgent_or_requested() {
        let p = policy(Strategy::Dynamic);
        let progress = Progress {
            versions: vec![record(1, VersionState::Current, 0)],
            last_version: 1,
            delivered_version: Some(1),
            ..Default::default()
        };
        let closed = Observations {
            maintenance_window_open: false,
            maintenance_window_opens_at: Some(t(100)),
            ..obs()
        };
        assert_eq!(
            decide(&p, &progress, &closed, t(41)),
            Action::Wait {
                until: Some(t(100)),
                reason: WaitReason::MaintenanceWindow
            }
        );
        // Within renew_before/2 of expiry: rotate anyway.
        assert!(matches!(
            decide(&p, &progress, &closed, t(50)),
            Action::Issue { version: 2, .. }
        ));
        let requested = Observations {
            rotation_request: Some("now".into()),
            ..closed
        };
        assert!(matches!(
            decide(&p, &progress, &requested, t(5)),
            Action::Issue { version: 2, .. }
        ));
    }

    #[test]
    fn a_failed_rotation_stays_visible_until_one_succeeds() {
        let failed = RotationRecord {
            version: 3,
            started_at: t(0),
            verified_at: None,
            promoted_at: None,
            revoked_at: Some(t(0)),
            outcome: RotationOutcome::IssueFailed,
            reason: Some("relation \"no_such_table\" does not exist".into()),
        };
        let mut progress = Progress {
            versions: vec![record(2, VersionState::Current, 0)],
            last_version: 3,
            delivered_version: Some(2),
            verify_failures: 1,
            history: vec![failed.clone()],
            ..Default::default()
        };
        assert_eq!(progress.rotation_failure(), Some(&failed));
        assert_eq!(
            progress.rotation_retry_at(),
            None,
            "no failure time recorded"
        );
        progress.last_verify_failure_at = Some(t(0));
        let retry = progress.rotation_retry_at().unwrap();
        assert!(
            retry > t(0) && retry <= add(t(0), Duration::from_secs(10)),
            "{retry}"
        );
        // decide() waits for exactly that time.
        assert_eq!(
            decide(&policy(Strategy::Dynamic), &progress, &obs(), t(0)),
            Action::Wait {
                until: Some(retry),
                reason: WaitReason::VerificationBackoff
            }
        );
        assert_eq!(phase(&progress, false, t(1)), Phase::Active);
        progress.verify_failures = 0;
        assert_eq!(progress.rotation_failure(), None);
        assert_eq!(progress.rotation_retry_at(), None);
    }

    fn under(strategy: Strategy, host: &str) -> IssuedUnder {
        IssuedUnder {
            strategy,
            target: Target {
                kind: "postgres".into(),
                host: host.into(),
                port: 5432,
                database: "app".into(),
                account_host: None,
            },
        }
    }

    #[test]
    fn a_version_is_revoked_the_way_it_was_issued() {
        // v1 was a Dynamic user; the policy is InPlace now.
        let p = policy(Strategy::InPlace);
        let mut old = record(1, VersionState::Superseded, 0);
        old.superseded_at = Some(t(40));
        old.issued_under = Some(under(Strategy::Dynamic, "db"));
        let mut progress = Progress {
            versions: vec![old, record(2, VersionState::Current, 40)],
            last_version: 2,
            delivered_version: Some(2),
            ..Default::default()
        };
        assert!(matches!(
            decide(&p, &progress, &obs(), t(45)),
            Action::Revoke {
                version: 1,
                plan: RevokePlan::DropUser,
                ..
            }
        ));
        // An InPlace version (the user leasehold did not create) under a Dynamic policy
        // is not dropped: its password is scrambled.
        progress.versions[0].issued_under = Some(under(Strategy::InPlace, "db"));
        assert!(matches!(
            decide(&policy(Strategy::Dynamic), &progress, &obs(), t(45)),
            Action::Revoke {
                version: 1,
                plan: RevokePlan::ScramblePassword,
                ..
            }
        ));
        // Older records (nothing recorded) keep today's behaviour: the policy decides
        // (InPlace: one user, whose password v2 replaced).
        progress.versions[0].issued_under = None;
        progress.versions[0].credential_id = progress.versions[1].credential_id.clone();
        assert!(matches!(
            decide(&p, &progress, &obs(), t(45)),
            Action::Revoke {
                version: 1,
                plan: RevokePlan::Nothing,
                ..
            }
        ));
    }

    /// An InPlace version on `user` at `target`, superseded at t(40) by a current version.
    fn in_place_superseded(user: &str, target: IssuedUnder) -> VersionRecord {
        let mut old = record(1, VersionState::Superseded, 0);
        old.credential_id = user.into();
        old.superseded_at = Some(t(40));
        old.issued_under = Some(target);
        old
    }

    fn current_on(version: u64, user: &str, target: IssuedUnder) -> VersionRecord {
        let mut current = record(version, VersionState::Current, 40);
        current.credential_id = user.into();
        current.issued_under = Some(target);
        current
    }

    fn mysql(strategy: Strategy, account_host: Option<&str>) -> IssuedUnder {
        let mut u = under(strategy, "db");
        u.target.kind = "mysql".into();
        u.target.port = 3306;
        u.target.account_host = account_host.map(Into::into);
        u
    }

    /// The plan decided for the first version of `versions` (all consumers current,
    /// past the grace period) under `policy`.
    fn plan_for(policy: &PolicyParams, versions: Vec<VersionRecord>, obs: &Observations) -> Action {
        let last = versions.iter().map(|v| v.version).max().unwrap_or(0);
        let progress = Progress {
            delivered_version: Some(last),
            last_version: last,
            versions,
            ..Default::default()
        };
        decide(policy, &progress, obs, t(45))
    }

    fn revoke_of(action: Action) -> (u64, RevokeReason, RevokePlan, DrainSessionsMode) {
        match action {
            Action::Revoke {
                version,
                reason,
                plan,
                drain,
            } => (version, reason, plan, drain),
            other => panic!("expected a revocation, got {other:?}"),
        }
    }

    #[test]
    fn an_in_place_password_no_later_version_replaced_is_scrambled() {
        let in_place = under(Strategy::InPlace, "db");
        let p = policy(Strategy::InPlace);
        let superseded = |plan| (1, RevokeReason::Superseded, plan, DrainSessionsMode::Wait);
        // The same user on the same server: the current version replaced the password.
        let same = vec![
            in_place_superseded("app", in_place.clone()),
            current_on(2, "app", in_place.clone()),
        ];
        assert_eq!(
            revoke_of(plan_for(&p, same, &obs())),
            superseded(RevokePlan::Nothing)
        );
        // The strategy changed (InPlace -> Dynamic or AlternatingUsers).
        for strategy in [Strategy::Dynamic, Strategy::AlternatingUsers] {
            let moved = vec![
                in_place_superseded("app", in_place.clone()),
                current_on(2, "lh_v2", under(strategy, "db")),
            ];
            assert_eq!(
                revoke_of(plan_for(&policy(strategy), moved, &obs())),
                superseded(RevokePlan::ScramblePassword),
                "{strategy:?}"
            );
        }
        // The username changed.
        let renamed = vec![
            in_place_superseded("app", in_place.clone()),
            current_on(2, "app2", in_place.clone()),
        ];
        assert_eq!(
            revoke_of(plan_for(&p, renamed, &obs())),
            superseded(RevokePlan::ScramblePassword)
        );
        // The server changed; another database on the same server is the same role.
        let elsewhere = vec![
            in_place_superseded("app", in_place.clone()),
            current_on(2, "app", under(Strategy::InPlace, "other-db")),
        ];
        assert_eq!(
            revoke_of(plan_for(&p, elsewhere, &obs())),
            superseded(RevokePlan::ScramblePassword)
        );
        let mut other_database = in_place.clone();
        other_database.target.database = "reports".into();
        let same_server = vec![
            in_place_superseded("app", in_place.clone()),
            current_on(2, "app", other_database),
        ];
        assert_eq!(
            revoke_of(plan_for(&p, same_server, &obs())),
            superseded(RevokePlan::Nothing)
        );
        // MySQL: a new account host is another account; `%` spelt out is the default.
        let new_host = vec![
            in_place_superseded("app", mysql(Strategy::InPlace, None)),
            current_on(2, "app", mysql(Strategy::InPlace, Some("10.%"))),
        ];
        assert_eq!(
            revoke_of(plan_for(&p, new_host, &obs())),
            superseded(RevokePlan::ScramblePassword)
        );
        let spelt_out = vec![
            in_place_superseded("app", mysql(Strategy::InPlace, None)),
            current_on(2, "app", mysql(Strategy::InPlace, Some("%"))),
        ];
        assert_eq!(
            revoke_of(plan_for(&p, spelt_out, &obs())),
            superseded(RevokePlan::Nothing)
        );
        // A record without a target is taken to be on the current one's account.
        let mut legacy = in_place_superseded("app", in_place.clone());
        legacy.issued_under = None;
        let legacy = vec![legacy, current_on(2, "app", in_place.clone())];
        assert_eq!(
            revoke_of(plan_for(&p, legacy, &obs())),
            superseded(RevokePlan::Nothing)
        );
    }

    #[test]
    fn a_later_superseded_version_on_the_same_account_keeps_the_password_its_own() {
        // v1 and v2 were InPlace on one user; v3 is Dynamic. v2 set the user's last
        // password and may still be draining: v1's revocation leaves it alone, v2's
        // scrambles it.
        let in_place = under(Strategy::InPlace, "db");
        let mut v2 = in_place_superseded("app", in_place.clone());
        v2.version = 2;
        let versions = vec![
            in_place_superseded("app", in_place.clone()),
            v2,
            current_on(3, "lh_v3", under(Strategy::Dynamic, "db")),
        ];
        let p = policy(Strategy::Dynamic);
        assert_eq!(
            revoke_of(plan_for(&p, versions.clone(), &obs())),
            (
                1,
                RevokeReason::Superseded,
                RevokePlan::Nothing,
                DrainSessionsMode::Wait
            )
        );
        assert_eq!(
            revoke_of(plan_for(&p, versions[1..].to_vec(), &obs())),
            (
                2,
                RevokeReason::Superseded,
                RevokePlan::ScramblePassword,
                DrainSessionsMode::Wait
            )
        );
    }

    #[test]
    fn an_emergency_scrambles_an_in_place_password_nothing_replaced_and_deletion_never_does() {
        let in_place = under(Strategy::InPlace, "db");
        let emergency = EmergencyRevocation {
            reason: "leaked".into(),
            requested_at: t(40),
            through_version: 1,
        };
        let progress = |current: VersionRecord| Progress {
            versions: vec![in_place_superseded("app", in_place.clone()), current],
            last_version: 2,
            delivered_version: Some(2),
            emergency: Some(emergency.clone()),
            ..Default::default()
        };
        let p = policy(Strategy::Dynamic);
        let moved = progress(current_on(2, "lh_v2", under(Strategy::Dynamic, "db")));
        assert_eq!(
            revoke_of(decide(&p, &moved, &obs(), t(41))),
            (
                1,
                RevokeReason::Emergency,
                RevokePlan::ScramblePassword,
                DrainSessionsMode::Terminate
            )
        );
        let same = progress(current_on(2, "app", in_place.clone()));
        assert_eq!(
            revoke_of(decide(&policy(Strategy::InPlace), &same, &obs(), t(41))),
            (
                1,
                RevokeReason::Emergency,
                RevokePlan::Nothing,
                DrainSessionsMode::Terminate
            )
        );
        // Deleting the lease hands the user back to its owner with its password, even
        // when a version on another account is current.
        let deleting = Observations {
            deleting: true,
            ..obs()
        };
        let mut deleted = moved.clone();
        deleted.emergency = None;
        assert_eq!(
            revoke_of(decide(&p, &deleted, &deleting, t(41))),
            (
                1,
                RevokeReason::LeaseDeleted,
                RevokePlan::Nothing,
                DrainSessionsMode::Wait
            )
        );
    }

    #[test]
    fn versions_issued_under_another_spec_are_recognised() {
        let now = under(Strategy::Dynamic, "new-db");
        let mut progress = Progress {
            versions: vec![record(1, VersionState::Current, 0)],
            last_version: 1,
            ..Default::default()
        };
        assert!(!progress.current_issued_elsewhere(&now), "old records: no");
        progress.versions[0].issued_under = Some(under(Strategy::Dynamic, "new-db"));
        assert!(!progress.current_issued_elsewhere(&now));
        progress.versions[0].issued_under = Some(under(Strategy::Dynamic, "old-db"));
        assert!(progress.current_issued_elsewhere(&now));
        progress.versions[0].issued_under = Some(under(Strategy::InPlace, "new-db"));
        assert!(progress.current_issued_elsewhere(&now));
        let mut pending = record(2, VersionState::Issuing, 1);
        pending.issued_under = Some(under(Strategy::Dynamic, "old-db"));
        progress.versions.push(pending);
        assert_eq!(
            progress.pending_issued_elsewhere(&now).map(|p| p.version),
            Some(2)
        );
        let json = serde_json::to_string(&progress).unwrap();
        assert_eq!(serde_json::from_str::<Progress>(&json).unwrap(), progress);
        // A record written before `issuedUnder` existed still loads.
        let legacy: VersionRecord = serde_json::from_value(serde_json::json!({
            "version": 1, "credentialId": "lh_v1", "state": "Current",
            "issuedAt": "2026-01-01T00:00:00Z"
        }))
        .unwrap();
        assert_eq!(legacy.issued_under, None);
    }

    #[test]
    fn progress_round_trips_through_json() {
        let progress = Progress {
            versions: vec![record(1, VersionState::Current, 0)],
            last_version: 1,
            ..Default::default()
        };
        let json = serde_json::to_string(&progress).unwrap();
        assert_eq!(serde_json::from_str::<Progress>(&json).unwrap(), progress);
    }
}
