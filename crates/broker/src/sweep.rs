//! The per-pod orphan sweep: per-pod users (and their records) of pods that no
//! longer exist are revoked.
//!
//! A per-pod user normally dies on `Release`, but a node can be lost, a driver
//! can crash between a failed publish and its release retry, or a record can
//! be deleted by hand. The controller calls [`EnginePerPodIssuer::sweep_lease`]
//! for every `perPod` lease, periodically, with a [`PodLister`].
//!
//! A lease's volumes may be mounted by pods of other namespaces (those its
//! policy admits), so liveness is decided per record: a record's pod is live
//! when a pod with its UID exists in the record's own namespace. Pods are
//! listed only in the namespaces the records name (and the lease's own), and
//! only *after* the database users and the records were read: a record is
//! written before its user is created and its pod existed before its record,
//! so a pod created meanwhile is never mistaken for a gone one. Records issued
//! at or after the listing started are kept all the same.
//!
//! [`plan_sweep`] is the decision (pure); [`EnginePerPodIssuer::sweep_lease`]
//! gathers the facts (database users, records, pods) and applies it.

use std::collections::{BTreeSet, HashMap, HashSet};

use async_trait::async_trait;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use leasehold_api::{RotationPolicy, SecretLease};
use leasehold_backends::{CredentialId, DrainSessions, RevokeMode, RevokeRequest};
use leasehold_core::naming::short_uid;
use tracing::{info, instrument, warn};

use crate::error::BrokerError;
use crate::per_pod::{EnginePerPodIssuer, PodCredentialMeta, lease_uid, per_pod_username};

/// Lists the pods that exist, read live (a cache that lags could miss a new pod).
#[async_trait]
pub trait PodLister: Send + Sync {
    /// UIDs of the pods of `namespace`.
    async fn pod_uids(&self, namespace: &str) -> Result<HashSet<String>, BrokerError>;
}

/// [`PodLister`] over the API server (needs `list` on pods in the namespaces
/// the sweep looks at).
#[derive(Clone)]
pub struct KubePodLister {
    client: kube::Client,
}

impl std::fmt::Debug for KubePodLister {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubePodLister").finish_non_exhaustive()
    }
}

impl KubePodLister {
    /// Lists with `client`.
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }
}

#[async_trait]
impl PodLister for KubePodLister {
    async fn pod_uids(&self, namespace: &str) -> Result<HashSet<String>, BrokerError> {
        Ok(Api::<Pod>::namespaced(self.client.clone(), namespace)
            .list(&kube::api::ListParams::default())
            .await
            .map_err(|e| BrokerError::kube(&format!("cannot list the pods of {namespace}"), &e))?
            .items
            .into_iter()
            .filter_map(|p| p.metadata.uid)
            .collect())
    }
}

/// The pods that exist in the namespaces a sweep looked at.
#[derive(Debug, Clone)]
pub struct LivePods {
    /// When the listing started: records issued at or after it are kept
    /// (their pod may be newer than the list).
    pub listed_at: Timestamp,
    /// Pod UIDs per listed namespace.
    pub by_namespace: HashMap<String, HashSet<String>>,
}

impl LivePods {
    /// Lists the pods of each of `namespaces` with `lister` (an error aborts:
    /// a namespace that could not be listed must not look empty).
    pub async fn list(
        lister: &dyn PodLister,
        namespaces: &BTreeSet<String>,
    ) -> Result<Self, BrokerError> {
        let listed_at = Timestamp::now();
        let mut by_namespace = HashMap::new();
        for namespace in namespaces {
            by_namespace.insert(namespace.clone(), lister.pod_uids(namespace).await?);
        }
        Ok(Self {
            listed_at,
            by_namespace,
        })
    }

    /// Whether a pod with `uid` exists in `namespace` (as listed).
    pub fn contains(&self, namespace: &str, uid: &str) -> bool {
        self.by_namespace
            .get(namespace)
            .is_some_and(|uids| uids.contains(uid))
    }

    /// Whether a record's pod is live, or too recent for the listing to tell.
    pub fn keeps(&self, pod_namespace: &str, pod_uid: &str, issued_at: Timestamp) -> bool {
        issued_at >= self.listed_at || self.contains(pod_namespace, pod_uid)
    }

    /// The short UIDs (as in user names) of every listed pod.
    fn short_uids(&self) -> HashSet<String> {
        self.by_namespace
            .values()
            .flatten()
            .map(|u| short_uid(u))
            .collect()
    }
}

/// The namespaces a sweep of a lease in `lease_namespace` lists pods in: the
/// lease's own and every namespace a record names.
pub fn sweep_namespaces<'a>(
    lease_namespace: &'a str,
    record_namespaces: impl IntoIterator<Item = &'a str>,
) -> BTreeSet<String> {
    std::iter::once(lease_namespace)
        .chain(record_namespaces)
        .filter(|ns| !ns.is_empty())
        .map(str::to_owned)
        .collect()
}

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
    /// The pods that exist, listed after `records` and `db_users` were read.
    pub live_pods: &'a LivePods,
    /// The lease's pod credential records.
    pub records: &'a [PodCredentialMeta],
    /// Database users with the lease's per-pod prefix ([`per_pod_prefix`]).
    pub db_users: &'a [String],
}

/// The prefix of every per-pod user of a lease (`lh_<lease uid 12>_p`).
pub fn per_pod_prefix(lease_uid: &str) -> String {
    format!("lh_{}_p", short_uid(lease_uid))
}

/// Which per-pod users to revoke: those of records whose pod is gone from the
/// record's namespace (and that were issued before the pod list was taken),
/// and database users with the lease's prefix that match neither a kept
/// record nor a live pod of any listed namespace (a user without a record has
/// no namespace to look in).
pub fn plan_sweep(facts: &SweepFacts<'_>) -> Vec<Orphan> {
    let live_short = facts.live_pods.short_uids();
    let prefix = per_pod_prefix(facts.lease_uid);
    let mut orphans = BTreeSet::new();
    let mut kept_users = HashSet::new();
    for record in facts.records {
        let username = per_pod_username(facts.lease_uid, &record.pod_uid);
        if facts
            .live_pods
            .keeps(&record.pod_namespace, &record.pod_uid, record.issued_at)
        {
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
    /// the module docs), listing pods with `pods`. Errors reading the
    /// database, the records or the pods abort the sweep; a user that cannot
    /// be dropped is reported in [`SweepReport::failed`].
    #[instrument(skip_all, fields(lease = %lease.metadata.name.as_deref().unwrap_or_default()))]
    pub async fn sweep_lease(
        &self,
        lease: &SecretLease,
        policy: &RotationPolicy,
        pods: &dyn PodLister,
    ) -> Result<SweepReport, BrokerError> {
        let uid = lease_uid(lease);
        if uid.is_empty() || !lease.spec.per_pod {
            return Ok(SweepReport::default());
        }
        let ctx = self.context(lease, policy).await?;
        // Users first, then records, then pods: a user's record is written
        // before the user, and a record's pod exists before the record.
        let db_users: Vec<String> = ctx
            .backend
            .list_users(&per_pod_prefix(uid))
            .await
            .map_err(|e| BrokerError::Unavailable(format!("cannot list per-pod users: {e}")))?
            .into_iter()
            .map(|id| id.0)
            .collect();
        let records = self.store.list(lease).await?;
        if records.is_empty() && db_users.is_empty() {
            return Ok(SweepReport::default());
        }
        let namespaces = sweep_namespaces(
            lease.metadata.namespace.as_deref().unwrap_or_default(),
            records.iter().map(|r| r.pod_namespace.as_str()),
        );
        let live_pods = LivePods::list(pods, &namespaces).await?;
        let plan = plan_sweep(&SweepFacts {
            lease_uid: uid,
            live_pods: &live_pods,
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

    fn meta(namespace: &str, pod_uid: &str, issued_at: Timestamp) -> PodCredentialMeta {
        PodCredentialMeta {
            username: "whatever-the-record-says".into(),
            pod_namespace: namespace.into(),
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

    fn live_pods(listed_at: &str, pods: &[(&str, &str)]) -> LivePods {
        let mut by_namespace: HashMap<String, HashSet<String>> = HashMap::new();
        for (namespace, uid) in pods {
            by_namespace
                .entry((*namespace).to_owned())
                .or_default()
                .insert((*uid).to_owned());
        }
        LivePods {
            listed_at: listed_at.parse().unwrap(),
            by_namespace,
        }
    }

    #[test]
    fn gone_pods_lose_their_users_live_and_fresh_ones_keep_them() {
        let t0: Timestamp = "2030-01-01T00:00:00Z".parse().unwrap();
        let live_uid = "11111111-aaaa-4000-8000-000000000001";
        let gone_uid = "22222222-bbbb-4000-8000-000000000002";
        let fresh_uid = "33333333-cccc-4000-8000-000000000003";
        let unrecorded_gone = per_pod_username(LEASE, "44444444-dddd-4000-8000-000000000004");
        let unrecorded_live = per_pod_username(LEASE, live_uid);
        let live = live_pods("2030-01-01T00:10:00Z", &[("shop", live_uid)]);
        let records = [
            meta("shop", live_uid, t0),
            meta("shop", gone_uid, t0),
            meta("shop", fresh_uid, "2030-01-01T00:10:01Z".parse().unwrap()),
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
            live_pods: &live,
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

    /// A lease in `shop` whose volume a pod of `billing` mounts: that pod is
    /// live in its own namespace, not in the lease's.
    #[test]
    fn a_live_pod_of_another_namespace_keeps_its_user() {
        let t0: Timestamp = "2030-01-01T00:00:00Z".parse().unwrap();
        let billing_uid = "55555555-eeee-4000-8000-000000000005";
        let moved_uid = "66666666-ffff-4000-8000-000000000006";
        let live = live_pods(
            "2030-01-01T00:10:00Z",
            &[("billing", billing_uid), ("shop", moved_uid)],
        );
        let records = [
            meta("billing", billing_uid, t0),
            // A record naming a namespace its pod is not in: that pod is gone.
            meta("analytics", moved_uid, t0),
        ];
        let db_users = vec![
            per_pod_username(LEASE, billing_uid),
            per_pod_username(LEASE, moved_uid),
        ];
        let plan = plan_sweep(&SweepFacts {
            lease_uid: LEASE,
            live_pods: &live,
            records: &records,
            db_users: &db_users,
        });
        assert_eq!(
            plan,
            [Orphan {
                username: per_pod_username(LEASE, moved_uid),
                pod_uid: Some(moved_uid.into()),
            }]
        );
    }

    #[test]
    fn pods_are_listed_in_the_lease_namespace_and_those_records_name() {
        assert_eq!(
            sweep_namespaces("shop", ["billing", "shop", "", "analytics", "billing"]),
            BTreeSet::from(["analytics".into(), "billing".into(), "shop".into()])
        );
    }
}
