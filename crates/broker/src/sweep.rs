//! The per-pod orphan sweep: per-pod users (and their records) of pods that no
//! longer exist are revoked.
//!
//! A per-pod user normally dies on `Release`, but a node can be lost, a driver
//! can crash between a failed publish and its release retry, or a record can
//! be deleted by hand. The controller calls [`EnginePerPodIssuer::sweep_lease`]
//! for every `perPod` lease, periodically, with the UIDs of the pods that
//! exist (all pods of the lease's namespace and of the namespaces its policy
//! admits, or simply all pods: extra UIDs only keep more), listed *before*
//! the call.
//!
//! [`plan_sweep`] is the decision (pure); [`EnginePerPodIssuer::sweep_lease`]
//! gathers the facts (records, database users) and applies it.

use std::collections::{BTreeSet, HashSet};

use jiff::Timestamp;
use leasehold_api::{RotationPolicy, SecretLease};
use leasehold_backends::{CredentialId, DrainSessions, RevokeMode, RevokeRequest};
use leasehold_core::naming::short_uid;
use tracing::{info, instrument, warn};

use crate::error::BrokerError;
use crate::per_pod::{EnginePerPodIssuer, PodCredentialMeta, lease_uid, per_pod_username};

/// One per-pod user to revoke.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Orphan {
    /// The database user (derived from the UIDs, or listed from the database).
    pub username: String,
    /// The pod UID of its record, when there is one (the record is deleted too).
    pub pod_uid: Option<String>,
}

/// Everything the sweep of one lease is decided on.
#[derive(Debug, Clone, Copy)]
pub struct SweepFacts<'a> {
    /// The lease's UID.
    pub lease_uid: &'a str,
    /// UIDs of pods that exist (listed at `listed_at`).
    pub live_pod_uids: &'a HashSet<String>,
    /// When `live_pod_uids` was listed: records issued at or after it are
    /// kept (their pod may be newer than the list).
    pub listed_at: Timestamp,
    /// The lease's pod credential records.
    pub records: &'a [PodCredentialMeta],
    /// Database users with the lease's per-pod prefix ([`per_pod_prefix`]).
    pub db_users: &'a [String],
}

/// The prefix of every per-pod user of a lease (`lh_<lease uid 12>_p`).
pub fn per_pod_prefix(lease_uid: &str) -> String {
    format!("lh_{}_p", short_uid(lease_uid))
}

/// Which per-pod users to revoke: those of records whose pod is gone (and
/// that were issued before the pod list was taken), and database users with
/// the lease's prefix that match neither a live pod nor a kept record.
pub fn plan_sweep(facts: &SweepFacts<'_>) -> Vec<Orphan> {
    let live_short: HashSet<String> = facts.live_pod_uids.iter().map(|u| short_uid(u)).collect();
    let prefix = per_pod_prefix(facts.lease_uid);
    let mut orphans = BTreeSet::new();
    let mut kept_users = HashSet::new();
    for record in facts.records {
        let username = per_pod_username(facts.lease_uid, &record.pod_uid);
        let live = facts.live_pod_uids.contains(&record.pod_uid);
        if live || record.issued_at >= facts.listed_at {
            kept_users.insert(username);
        } else {
            orphans.insert(Orphan {
                username,
                pod_uid: Some(record.pod_uid.clone()),
            });
        }
    }
    for user in facts.db_users {
        let Some(pod_short) = user.strip_prefix(&prefix) else {
            continue;
        };
        let recorded = orphans.iter().any(|o| &o.username == user);
        if recorded || kept_users.contains(user) || live_short.contains(pod_short) {
            continue;
        }
        orphans.insert(Orphan {
            username: user.clone(),
            pod_uid: None,
        });
    }
    orphans.into_iter().collect()
}

/// What a sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Users revoked (and records deleted).
    pub revoked: Vec<String>,
    /// Users that could not be revoked this time (retry at the next sweep).
    pub failed: Vec<String>,
}

impl EnginePerPodIssuer {
    /// Revokes the per-pod users of `lease` whose pod no longer exists (see
    /// the module docs). `live_pod_uids` must have been listed at or before
    /// `listed_at`. Errors reading records or the database abort the sweep;
    /// a user that cannot be dropped is reported in [`SweepReport::failed`].
    #[instrument(skip_all, fields(lease = %lease.metadata.name.as_deref().unwrap_or_default()))]
    pub async fn sweep_lease(
        &self,
        lease: &SecretLease,
        policy: &RotationPolicy,
        live_pod_uids: &HashSet<String>,
        listed_at: Timestamp,
    ) -> Result<SweepReport, BrokerError> {
        let uid = lease_uid(lease);
        if uid.is_empty() || !lease.spec.per_pod {
            return Ok(SweepReport::default());
        }
        let records = self.store.list(lease).await?;
        let ctx = self.context(lease, policy).await?;
        let db_users: Vec<String> = ctx
            .backend
            .list_users(&per_pod_prefix(uid))
            .await
            .map_err(|e| BrokerError::Unavailable(format!("cannot list per-pod users: {e}")))?
            .into_iter()
            .map(|id| id.0)
            .collect();
        let plan = plan_sweep(&SweepFacts {
            lease_uid: uid,
            live_pod_uids,
            listed_at,
            records: &records,
            db_users: &db_users,
        });
        let mut report = SweepReport::default();
        for orphan in plan {
            let lock = orphan
                .pod_uid
                .as_deref()
                .map(|pod_uid| self.lock_for(lease, pod_uid));
            let _guard = match &lock {
                Some(l) => Some(l.lock().await),
                None => None,
            };
            let revoked = ctx
                .backend
                .revoke(&RevokeRequest {
                    id: CredentialId(orphan.username.clone()),
                    mode: RevokeMode::DropUser,
                    drain: DrainSessions::Terminate,
                })
                .await;
            match revoked {
                Ok(_) => {
                    if let Some(pod_uid) = &orphan.pod_uid {
                        self.store.delete(lease, pod_uid).await?;
                    }
                    info!(user = %orphan.username, "per-pod user of a deleted pod revoked");
                    report.revoked.push(orphan.username);
                }
                Err(e) => {
                    warn!(user = %orphan.username, error = %e, "cannot revoke the per-pod user of a deleted pod");
                    report.failed.push(orphan.username);
                }
            }
            drop(_guard);
            if let Some(pod_uid) = &orphan.pod_uid {
                self.forget_lock(lease, pod_uid);
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const LEASE: &str = "7f3c2a1b-0d9e-4c8f-a6b5-4e3d2c1b0a99";

    fn meta(pod_uid: &str, issued_at: Timestamp) -> PodCredentialMeta {
        PodCredentialMeta {
            username: "whatever-the-record-says".into(),
            pod_namespace: "shop".into(),
            pod_name: "web".into(),
            pod_uid: pod_uid.into(),
            node: "node-a".into(),
            generation: 1,
            issued_at,
            expires_at: issued_at,
            renew_at: issued_at,
            verified: true,
        }
    }

    #[test]
    fn gone_pods_lose_their_users_live_and_fresh_ones_keep_them() {
        let t0: Timestamp = "2030-01-01T00:00:00Z".parse().unwrap();
        let listed_at: Timestamp = "2030-01-01T00:10:00Z".parse().unwrap();
        let live_uid = "11111111-aaaa-4000-8000-000000000001";
        let gone_uid = "22222222-bbbb-4000-8000-000000000002";
        let fresh_uid = "33333333-cccc-4000-8000-000000000003";
        let unrecorded_gone = per_pod_username(LEASE, "44444444-dddd-4000-8000-000000000004");
        let unrecorded_live = per_pod_username(LEASE, live_uid);
        let live = HashSet::from([live_uid.to_owned()]);
        let records = [
            meta(live_uid, t0),
            meta(gone_uid, t0),
            meta(fresh_uid, "2030-01-01T00:10:01Z".parse().unwrap()),
        ];
        let db_users = vec![
            per_pod_username(LEASE, gone_uid),
            per_pod_username(LEASE, fresh_uid),
            unrecorded_gone.clone(),
            unrecorded_live,
            "lh_other_lease_puser".into(),
        ];
        let plan = plan_sweep(&SweepFacts {
            lease_uid: LEASE,
            live_pod_uids: &live,
            listed_at,
            records: &records,
            db_users: &db_users,
        });
        let mut expected = vec![
            Orphan {
                username: per_pod_username(LEASE, gone_uid),
                pod_uid: Some(gone_uid.into()),
            },
            Orphan {
                username: unrecorded_gone,
                pod_uid: None,
            },
        ];
        expected.sort();
        assert_eq!(plan, expected);
    }
}
