//! Leader election on a `coordination.k8s.io/v1` Lease, and the fence every side effect
//! passes.
//!
//! [`decide_leadership`] is the whole election decision; [`LeaderElector`] applies it
//! with optimistic concurrency (replace with the `resourceVersion` it read).
//!
//! [`fence_state`] is the whole fence decision: a replica leads until the start of its
//! last successful acquire/renew round plus the renew deadline (shorter than the lease
//! duration other replicas wait out). [`LeadershipFence`] keeps that instant for the
//! stores, delivery and reconciler to check before each side effect, so a leader that
//! was paused (GC, SIGSTOP, a partition) past its deadline refuses to act the moment it
//! resumes, before its renewal loop notices and before anyone else took over.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use leasehold_engine::StoreError;
use tokio::time::Instant;

use crate::OperatorError;

/// Where and how replicas elect a leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderElectionConfig {
    pub namespace: String,
    pub lease_name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a lease holds without renewal.
    pub lease_duration: Duration,
    /// The leader gives up if it could not renew for this long.
    pub renew_deadline: Duration,
    /// How often to try (standby) or renew (leader).
    pub retry_period: Duration,
}

impl LeaderElectionConfig {
    pub fn new(
        namespace: impl Into<String>,
        lease_name: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            lease_name: lease_name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What to do with the Lease now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeadershipAction {
    /// Nobody holds it (missing, released): claim it.
    Acquire,
    /// We hold it: renew.
    Renew,
    /// Someone else held it but let it expire: take it over.
    TakeOver,
    /// Someone else holds it; try again when it would expire.
    StandBy { expires_at: Timestamp },
}

use leasehold_core::rotation::add;

/// Decide from the Lease's spec (or its absence).
pub fn decide_leadership(
    lease: Option<&LeaseSpec>,
    me: &str,
    now: Timestamp,
    config: &LeaderElectionConfig,
) -> LeadershipAction {
    let Some(spec) = lease else {
        return LeadershipAction::Acquire;
    };
    let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
    match holder {
        None => LeadershipAction::Acquire,
        Some(h) if h == me => LeadershipAction::Renew,
        Some(_) => {
            let duration = spec
                .lease_duration_seconds
                .filter(|s| *s > 0)
                .map(|s| Duration::from_secs(s as u64))
                .unwrap_or(config.lease_duration);
            let last = spec
                .renew_time
                .as_ref()
                .or(spec.acquire_time.as_ref())
                .map(|t| t.0);
            match last {
                Some(last) if add(last, duration) > now => LeadershipAction::StandBy {
                    expires_at: add(last, duration),
                },
                // A holder that never renewed, or whose time ran out.
                _ => LeadershipAction::TakeOver,
            }
        }
    }
}

/// The spec to write for `action` (None for StandBy).
pub fn next_spec(
    old: Option<&LeaseSpec>,
    action: LeadershipAction,
    me: &str,
    now: Timestamp,
    config: &LeaderElectionConfig,
) -> Option<LeaseSpec> {
    let duration = i32::try_from(config.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let transitions = old.and_then(|s| s.lease_transitions).unwrap_or(0);
    match action {
        LeadershipAction::StandBy { .. } => None,
        LeadershipAction::Renew => {
            let mut s = old.cloned().unwrap_or_default();
            s.renew_time = Some(MicroTime(now));
            s.lease_duration_seconds = Some(duration);
            Some(s)
        }
        LeadershipAction::Acquire | LeadershipAction::TakeOver => Some(LeaseSpec {
            holder_identity: Some(me.to_string()),
            lease_duration_seconds: Some(duration),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if old.is_some() { transitions + 1 } else { 0 }),
            ..Default::default()
        }),
    }
}

/// The result of one election round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    /// We hold the lease (acquired, renewed or taken over).
    Leading,
    /// Another replica holds a valid lease.
    StandingBy,
    /// Our write lost a race (409); nothing is known until the next round.
    Conflict,
}

/// Both clocks at one moment: the monotonic one the fence counts on, and the wall clock
/// other replicas judge the Lease by (it also moves on while a suspended machine's
/// monotonic clock stands still).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clocks {
    pub monotonic: Instant,
    pub wall: Timestamp,
}

impl Clocks {
    pub fn now() -> Self {
        Self {
            monotonic: Instant::now(),
            wall: Timestamp::now(),
        }
    }

    fn plus(self, d: Duration) -> Self {
        Self {
            monotonic: self.monotonic + d,
            wall: add(self.wall, d),
        }
    }
}

/// What the fence says at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceState {
    /// This replica leads for `remaining` more (on the monotonic clock).
    Leading { remaining: Duration },
    /// Its leadership ran out `ago`: no renewal round that started within the renew
    /// deadline succeeded.
    Lapsed { ago: Duration },
    /// It does not lead: never acquired, stepped down, or released.
    NotLeading,
}

/// The fence decision: `until` is the start of the last successful acquire/renew round
/// plus the renew deadline (`None`: not leading). Leading only while *both* clocks are
/// before it.
pub fn fence_state(until: Option<Clocks>, now: Clocks) -> FenceState {
    let Some(until) = until else {
        return FenceState::NotLeading;
    };
    let wall_left: Duration = until
        .wall
        .duration_since(now.wall)
        .try_into()
        .unwrap_or(Duration::ZERO);
    let monotonic_left = until.monotonic.saturating_duration_since(now.monotonic);
    let remaining = wall_left.min(monotonic_left);
    if remaining.is_zero() {
        let wall_ago: Duration = now
            .wall
            .duration_since(until.wall)
            .try_into()
            .unwrap_or(Duration::ZERO);
        let ago = now
            .monotonic
            .saturating_duration_since(until.monotonic)
            .max(wall_ago);
        FenceState::Lapsed { ago }
    } else {
        FenceState::Leading { remaining }
    }
}

/// Where `until` goes after a renewal round that started at `started` succeeded at
/// `completed`: extended (never shortened) while still leading at `completed`; a lapsed
/// leadership stays lapsed, even if the Lease write got through (something may already
/// have been refused, and the process is stepping down).
pub fn renewed_until(
    until: Option<Clocks>,
    started: Clocks,
    completed: Clocks,
    renew_deadline: Duration,
) -> Option<Clocks> {
    let current = until?;
    if !matches!(
        fence_state(Some(current), completed),
        FenceState::Leading { .. }
    ) {
        return None;
    }
    let extended = started.plus(renew_deadline);
    Some(Clocks {
        monotonic: current.monotonic.max(extended.monotonic),
        wall: current.wall.max(extended.wall),
    })
}

/// Why a side effect was refused: this replica does not (or no longer surely) lead.
/// Not a failure of the lease: nothing for its owner to fix; the replica steps down and
/// the leader acts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{NOT_LEADER}: this replica {why} (leader Lease {lease}); refusing to act, the leader does"
)]
pub struct NotLeader {
    /// `namespace/name` of the leader election Lease.
    pub lease: String,
    pub why: String,
}

/// How a [`NotLeader`] refusal starts, as a message and in a [`StoreError`].
pub const NOT_LEADER: &str = "NotLeader";

impl From<NotLeader> for StoreError {
    fn from(e: NotLeader) -> Self {
        StoreError(e.to_string())
    }
}

/// Whether this replica may act as the leader now. Checked before every side effect
/// of a lease reconcile: status and versions-Secret writes, the progress save the
/// engine makes before each database call (even one that writes nothing), delivered
/// Secret writes, rollout restarts. Cheap to clone; all clones see the same state.
#[derive(Clone, Default)]
pub struct LeadershipFence {
    /// `None`: no leader election, this process always leads.
    elected: Option<Arc<ElectedFence>>,
}

struct ElectedFence {
    lease: String,
    renew_deadline: Duration,
    until: std::sync::Mutex<Option<Clocks>>,
}

impl std::fmt::Debug for LeadershipFence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.elected {
            None => f.write_str("LeadershipFence(always open)"),
            Some(e) => f
                .debug_struct("LeadershipFence")
                .field("lease", &e.lease)
                .field("until", &e.until())
                .finish(),
        }
    }
}

impl ElectedFence {
    fn until(&self) -> Option<Clocks> {
        *self.until.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, f: impl FnOnce(Option<Clocks>) -> Option<Clocks>) {
        let mut until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        *until = f(*until);
    }
}

impl LeadershipFence {
    /// No leader election (a single replica): always open.
    pub fn always_open() -> Self {
        Self::default()
    }

    /// The fence of an elected leadership of `lease` (`namespace/name`): closed until
    /// [`Self::acquired`].
    pub fn new(lease: impl Into<String>, renew_deadline: Duration) -> Self {
        Self {
            elected: Some(Arc::new(ElectedFence {
                lease: lease.into(),
                renew_deadline,
                until: std::sync::Mutex::new(None),
            })),
        }
    }

    /// An acquire round that started at `started` succeeded: lead until the deadline.
    pub fn acquired(&self, started: Clocks) {
        if let Some(e) = &self.elected {
            e.set(|_| Some(started.plus(e.renew_deadline)));
        }
    }

    /// A renewal round that started at `started` succeeded at `completed`.
    pub fn renewed(&self, started: Clocks, completed: Clocks) {
        if let Some(e) = &self.elected {
            e.set(|until| renewed_until(until, started, completed, e.renew_deadline));
        }
    }

    /// Stop leading now (another holder, a lapse, a release).
    pub fn step_down(&self) {
        if let Some(e) = &self.elected {
            e.set(|_| None);
        }
    }

    /// Until when this replica leads (`None`: it does not; always `None` without
    /// election, which never needs it).
    pub fn leading_until(&self) -> Option<Clocks> {
        self.elected.as_ref().and_then(|e| e.until())
    }

    /// The fence at `now` (without election: leading, for ever).
    pub fn state(&self, now: Clocks) -> FenceState {
        match &self.elected {
            None => FenceState::Leading {
                remaining: Duration::MAX,
            },
            Some(e) => fence_state(e.until(), now),
        }
    }

    /// `Ok` if this replica may act as the leader at `now`.
    pub fn check_at(&self, now: Clocks) -> Result<(), NotLeader> {
        let why = match self.state(now) {
            FenceState::Leading { .. } => return Ok(()),
            FenceState::Lapsed { ago } => format!(
                "stopped leading {} ms ago: no renewal succeeded within its renew deadline",
                ago.as_millis()
            ),
            FenceState::NotLeading => "does not lead".to_owned(),
        };
        Err(NotLeader {
            lease: self
                .elected
                .as_ref()
                .map(|e| e.lease.clone())
                .unwrap_or_default(),
            why,
        })
    }

    /// `Ok` if this replica may act as the leader now.
    pub fn check(&self) -> Result<(), NotLeader> {
        self.check_at(Clocks::now())
    }
}

/// Applies [`decide_leadership`] against the API, and keeps the [`LeadershipFence`].
#[derive(Clone)]
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaderElectionConfig,
    fence: LeadershipFence,
}

impl std::fmt::Debug for LeaderElector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderElector")
            .field("config", &self.config)
            .finish()
    }
}

impl LeaderElector {
    pub fn new(client: Client, config: LeaderElectionConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            fence: LeadershipFence::new(
                format!("{}/{}", config.namespace, config.lease_name),
                config.renew_deadline,
            ),
            config,
        }
    }

    /// The fence of this elector's leadership, for everything that acts as the leader.
    pub fn fence(&self) -> LeadershipFence {
        self.fence.clone()
    }

    /// One round: read, decide, write.
    pub async fn try_once(&self) -> Result<Round, OperatorError> {
        self.round(Clocks::now()).await
    }

    /// A round that started at `started` (both clocks read before its first request, so
    /// the leadership it confirms is counted from before the Lease was read).
    async fn round(&self, started: Clocks) -> Result<Round, OperatorError> {
        let now = started.wall;
        let existing = self.api.get_opt(&self.config.lease_name).await?;
        let spec = existing.as_ref().and_then(|l| l.spec.as_ref());
        let action = decide_leadership(spec, &self.config.identity, now, &self.config);
        let Some(new_spec) = next_spec(spec, action, &self.config.identity, now, &self.config)
        else {
            return Ok(Round::StandingBy);
        };
        let result = match existing {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.lease_name.clone()),
                        namespace: Some(self.config.namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(new_spec),
                };
                self.api
                    .create(&PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
            Some(mut lease) => {
                // resourceVersion stays as read: a concurrent writer makes this fail with 409.
                lease.spec = Some(new_spec);
                self.api
                    .replace(&self.config.lease_name, &PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
        };
        match result {
            Ok(()) => {
                if matches!(
                    action,
                    LeadershipAction::Acquire | LeadershipAction::TakeOver
                ) {
                    tracing::info!(identity = %self.config.identity, lease = %self.config.lease_name, "became the leader");
                }
                Ok(Round::Leading)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Round::Conflict),
            Err(e) => Err(e.into()),
        }
    }

    /// Wait until this replica leads; the fence opens.
    pub async fn acquire(&self) {
        loop {
            let started = Clocks::now();
            match self.round(started).await {
                Ok(Round::Leading) => {
                    self.fence.acquired(started);
                    return;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "leader election attempt failed"),
            }
            tokio::time::sleep(self.config.retry_period).await;
        }
    }

    /// Keep renewing; returns an error once leadership is lost: another holder, or no
    /// renewal round that started within the renew deadline succeeded (a round that
    /// hangs, on a partition, is given up at the deadline). The fence is closed before
    /// this returns, and it does not reopen: leading again takes a new [`Self::acquire`].
    pub async fn hold(&self) -> OperatorError {
        let lost = || OperatorError::LostLeadership(self.config.lease_name.clone());
        loop {
            let Some(until) = self.fence.leading_until() else {
                return lost();
            };
            let round = async {
                tokio::time::sleep(self.config.retry_period).await;
                let started = Clocks::now();
                (started, self.round(started).await)
            };
            match tokio::time::timeout_at(until.monotonic, round).await {
                Err(_deadline) => {}
                Ok((started, Ok(Round::Leading))) => self.fence.renewed(started, Clocks::now()),
                Ok((_, Ok(Round::StandingBy))) => {
                    self.fence.step_down();
                    tracing::warn!(identity = %self.config.identity, lease = %self.config.lease_name, "another replica holds the leader lease; stepping down");
                    return lost();
                }
                // Someone wrote at the same moment: look again next period.
                Ok((_, Ok(Round::Conflict))) => {}
                Ok((_, Err(e))) => tracing::warn!(error = %e, "cannot renew the leader lease"),
            }
            if let FenceState::Lapsed { .. } = self.fence.state(Clocks::now()) {
                self.fence.step_down();
                tracing::warn!(
                    identity = %self.config.identity,
                    lease = %self.config.lease_name,
                    renew_deadline_ms = self.config.renew_deadline.as_millis() as u64,
                    "leadership lapsed: no renewal succeeded within the renew deadline; stepping down"
                );
                return lost();
            }
        }
    }

    /// Give the lease up so a standby takes over at once (on clean shutdown). The fence
    /// closes first: nothing acts as the leader once the lease may be someone else's.
    pub async fn release(&self) {
        self.fence.step_down();
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.lease_name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        if let Err(e) = self
            .api
            .replace(&self.config.lease_name, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(error = %e, "cannot release the leader lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn cfg() -> LeaderElectionConfig {
        LeaderElectionConfig::new("leasehold-system", "leasehold-controller", "pod-a")
    }

    fn held_by(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            acquire_time: Some(MicroTime(t(0))),
            renew_time: Some(MicroTime(t(renewed))),
            lease_transitions: Some(3),
            ..Default::default()
        }
    }

    #[test]
    fn acquire_when_missing_or_released() {
        assert_eq!(
            decide_leadership(None, "pod-a", t(0), &cfg()),
            LeadershipAction::Acquire
        );
        let released = LeaseSpec {
            holder_identity: Some(String::new()),
            ..held_by("x", 0)
        };
        assert_eq!(
            decide_leadership(Some(&released), "pod-a", t(0), &cfg()),
            LeadershipAction::Acquire
        );
    }

    #[test]
    fn renew_own_lease_even_if_late() {
        assert_eq!(
            decide_leadership(Some(&held_by("pod-a", 0)), "pod-a", t(100), &cfg()),
            LeadershipAction::Renew
        );
    }

    #[test]
    fn stand_by_until_the_holder_expires_then_take_over() {
        let spec = held_by("pod-b", 10);
        assert_eq!(
            decide_leadership(Some(&spec), "pod-a", t(24), &cfg()),
            LeadershipAction::StandBy { expires_at: t(25) }
        );
        assert_eq!(
            decide_leadership(Some(&spec), "pod-a", t(25), &cfg()),
            LeadershipAction::TakeOver
        );
        let never_renewed = LeaseSpec {
            renew_time: None,
            acquire_time: None,
            ..spec
        };
        assert_eq!(
            decide_leadership(Some(&never_renewed), "pod-a", t(0), &cfg()),
            LeadershipAction::TakeOver
        );
    }

    #[test]
    fn written_specs() {
        let old = held_by("pod-b", 10);
        let take = next_spec(
            Some(&old),
            LeadershipAction::TakeOver,
            "pod-a",
            t(30),
            &cfg(),
        )
        .unwrap();
        assert_eq!(take.holder_identity.as_deref(), Some("pod-a"));
        assert_eq!(take.lease_transitions, Some(4));
        assert_eq!(take.renew_time, Some(MicroTime(t(30))));
        let mine = held_by("pod-a", 10);
        let renew =
            next_spec(Some(&mine), LeadershipAction::Renew, "pod-a", t(12), &cfg()).unwrap();
        assert_eq!(renew.acquire_time, Some(MicroTime(t(0))));
        assert_eq!(renew.renew_time, Some(MicroTime(t(12))));
        assert_eq!(renew.lease_transitions, Some(3));
        assert!(
            next_spec(
                Some(&old),
                LeadershipAction::StandBy { expires_at: t(25) },
                "pod-a",
                t(12),
                &cfg()
            )
            .is_none()
        );
        let first = next_spec(None, LeadershipAction::Acquire, "pod-a", t(0), &cfg()).unwrap();
        assert_eq!(first.lease_transitions, Some(0));
        assert_eq!(first.lease_duration_seconds, Some(15));
    }

    /// A moment `ms` milliseconds after a fixed origin, on both clocks.
    fn at(origin: Clocks, ms: u64) -> Clocks {
        origin.plus(Duration::from_millis(ms))
    }

    #[test]
    fn the_fence_is_open_until_the_renew_deadline_after_the_last_round_started() {
        let o = Clocks::now();
        let deadline = Duration::from_secs(10);
        let until = Some(at(o, 0).plus(deadline));
        assert_eq!(
            fence_state(until, at(o, 4_000)),
            FenceState::Leading {
                remaining: Duration::from_secs(6)
            }
        );
        assert_eq!(
            fence_state(until, at(o, 10_000)),
            FenceState::Lapsed {
                ago: Duration::ZERO
            }
        );
        // Paused for 30 s: resumes lapsed, whatever the renewal loop thinks.
        assert_eq!(
            fence_state(until, at(o, 40_000)),
            FenceState::Lapsed {
                ago: Duration::from_secs(30)
            }
        );
        assert_eq!(fence_state(None, at(o, 0)), FenceState::NotLeading);
    }

    #[test]
    fn a_suspended_machine_is_caught_by_the_wall_clock() {
        let o = Clocks::now();
        let until = Some(o.plus(Duration::from_secs(10)));
        // The monotonic clock stood still for a minute; the wall clock did not.
        let resumed = Clocks {
            monotonic: o.monotonic + Duration::from_secs(1),
            wall: add(o.wall, Duration::from_secs(61)),
        };
        assert_eq!(
            fence_state(until, resumed),
            FenceState::Lapsed {
                ago: Duration::from_secs(51)
            }
        );
        // A wall clock stepped back does not extend anything: the monotonic one decides.
        let stepped_back = Clocks {
            monotonic: o.monotonic + Duration::from_secs(11),
            wall: o.wall,
        };
        assert!(matches!(
            fence_state(until, stepped_back),
            FenceState::Lapsed { .. }
        ));
    }

    #[test]
    fn a_renewal_extends_from_its_start_and_never_revives_a_lapse() {
        let o = Clocks::now();
        let deadline = Duration::from_secs(10);
        let until = Some(o.plus(deadline));
        // Started at 2 s, answered at 3 s: leading until 12 s, counted from the start.
        assert_eq!(
            renewed_until(until, at(o, 2_000), at(o, 3_000), deadline),
            Some(at(o, 12_000))
        );
        // A slow round that started at 9 s and was answered at 11 s: the fence had
        // closed meanwhile, and stays closed.
        assert_eq!(
            renewed_until(until, at(o, 9_000), at(o, 11_000), deadline),
            None
        );
        // A round that started before the last one (answers out of order) shortens nothing.
        assert_eq!(
            renewed_until(Some(at(o, 12_000)), at(o, 1_000), at(o, 3_000), deadline),
            Some(at(o, 12_000))
        );
        assert_eq!(renewed_until(None, at(o, 0), at(o, 1), deadline), None);
    }

    #[test]
    fn the_fence_refuses_once_lapsed_or_stepped_down_and_is_always_open_without_election() {
        let o = Clocks::now();
        assert_eq!(
            LeadershipFence::always_open().check_at(at(o, 1 << 40)),
            Ok(())
        );
        let fence = LeadershipFence::new(
            "leasehold-system/leasehold-controller",
            Duration::from_secs(10),
        );
        let refused = fence.check_at(o).unwrap_err();
        assert!(refused.to_string().starts_with("NotLeader: "), "{refused}");
        fence.acquired(o);
        let clone = fence.clone();
        assert_eq!(clone.check_at(at(o, 9_999)), Ok(()));
        let lapsed = clone.check_at(at(o, 12_000)).unwrap_err();
        assert_eq!(lapsed.lease, "leasehold-system/leasehold-controller");
        assert!(lapsed.why.contains("2000 ms ago"), "{lapsed}");
        // A renewal answered after the lapse does not reopen it.
        fence.renewed(at(o, 9_000), at(o, 12_000));
        assert!(fence.check_at(at(o, 12_001)).is_err());
        fence.acquired(o);
        fence.step_down();
        assert!(clone.check_at(o).is_err());
        assert_eq!(
            StoreError::from(lapsed).0.split(':').next(),
            Some(NOT_LEADER)
        );
    }
}
