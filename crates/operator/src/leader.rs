//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! [`decide_leadership`] is the whole decision; [`LeaderElector`] applies it with
//! optimistic concurrency (replace with the `resourceVersion` it read).

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

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

/// Applies [`decide_leadership`] against the API.
#[derive(Clone)]
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaderElectionConfig,
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
            config,
        }
    }

    /// One round: read, decide, write.
    pub async fn try_once(&self) -> Result<Round, OperatorError> {
        let now = Timestamp::now();
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

    /// Wait until this replica leads.
    pub async fn acquire(&self) {
        loop {
            match self.try_once().await {
                Ok(Round::Leading) => return,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "leader election attempt failed"),
            }
            tokio::time::sleep(self.config.retry_period).await;
        }
    }

    /// Keep renewing; returns an error once leadership is lost (another holder, or no
    /// successful renewal within the renew deadline).
    pub async fn hold(&self) -> OperatorError {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.config.retry_period).await;
            match self.try_once().await {
                Ok(Round::Leading) => last_renewal = tokio::time::Instant::now(),
                Ok(Round::StandingBy) => {
                    return OperatorError::LostLeadership(self.config.lease_name.clone());
                }
                // Someone wrote at the same moment: look again next period.
                Ok(Round::Conflict) => {}
                Err(e) => tracing::warn!(error = %e, "cannot renew the leader lease"),
            }
            if last_renewal.elapsed() > self.config.renew_deadline {
                return OperatorError::LostLeadership(self.config.lease_name.clone());
            }
        }
    }

    /// Give the lease up so a standby takes over at once (on clean shutdown).
    pub async fn release(&self) {
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
}
