//! Delivery on Kubernetes: an owned Secret with the rendered keys, and rollout restarts
//! of workloads (debounced).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use leasehold_api::{ConsumerStatus, DeliverySpec, FIELD_MANAGER, RolloutTarget, WorkloadKind};
use leasehold_backends::CredentialMaterial;
use leasehold_core::rotation::ALL_CONSUMERS_CURRENT;
use leasehold_engine::{Delivery, LeaseKey, StoreError};
use tokio::sync::Mutex;

use crate::error::store_error;
use crate::leader::LeadershipFence;
use crate::secrets::{
    SecretOwnership, foreign_secret_message, owned_secret_patch, secret_apply_body,
    secret_ownership,
};

/// Pod template annotation set on restart (also the debounce clock, shared by every
/// lease restarting the workload).
pub const RESTARTED_AT_ANNOTATION: &str = "leasehold.dev/restartedAt";

/// The pod-template annotation recording which version of *this* lease a workload was
/// restarted for. One key per lease: a workload that consumes two leases must not let
/// one lease's restart count as the other's.
pub fn version_annotation(lease: &str) -> String {
    let prefix = format!("{lease}.lease.leasehold.dev");
    if prefix.len() <= 253 {
        format!("{prefix}/version")
    } else {
        let digest = leasehold_core::backoff::seed_of(lease);
        format!("{digest:016x}.lease.leasehold.dev/version")
    }
}

/// Field manager of one lease's restart annotations: with a shared manager, one lease's
/// apply would remove the other lease's version annotation.
pub fn restart_field_manager(lease: &str) -> String {
    let mut m = format!("leasehold-restart/{lease}");
    m.truncate(128);
    m
}

/// What the controller saw of one rollout-restart target.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TargetObservation {
    pub kind: String,
    pub name: String,
    pub exists: bool,
    /// The version its pod template was last restarted for.
    pub version: Option<u64>,
    pub restarted_at: Option<Timestamp>,
    pub generation: Option<i64>,
    pub rollout: RolloutCounts,
}

/// A workload controller's view of its rollout, from the workload's status.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RolloutCounts {
    pub observed_generation: Option<i64>,
    /// Pods wanted (`spec.replicas`; a DaemonSet's desired number scheduled).
    pub desired: i32,
    /// Pods from the latest template.
    pub updated: i32,
    /// Pods there are, old and new (`status.replicas`): more than `updated` means old
    /// pods, holding the old credential, still run.
    pub total: i32,
    /// Pods available (ready for `minReadySeconds`).
    pub available: i32,
    /// A StatefulSet's current revision is its update revision (every pod replaced);
    /// always true for the other kinds.
    pub revisions_match: bool,
}

impl TargetObservation {
    /// The controller of the workload has rolled out its latest template everywhere, as
    /// `kubectl rollout status` means it: every pod updated, no old pod left, the new
    /// ones available. Until then old pods may still use the old credential.
    pub fn rollout_complete(&self) -> bool {
        let r = &self.rollout;
        let observed = match (r.observed_generation, self.generation) {
            (Some(o), Some(g)) => o >= g,
            (_, None) => true,
            (None, Some(_)) => false,
        };
        observed
            && r.updated >= r.desired
            && r.total <= r.updated
            && r.available >= r.desired
            && r.revisions_match
    }
}

/// The version every known consumer holds at least: pods that reported a version
/// through CSI, and rollout targets whose restart for a version has completed (an
/// unfinished rollout proves nothing). [`ALL_CONSUMERS_CURRENT`] when there are none.
///
/// A version rather than "on the current one": the observation is made before the
/// engine runs, and a rotation promoted in the same reconcile must not count it.
pub fn consumers_hold(consumers: &[ConsumerStatus], targets: &[TargetObservation]) -> u64 {
    let pods = consumers
        .iter()
        .filter(|c| c.kind == "Pod")
        .map(|c| c.version.unwrap_or(0));
    let workloads = targets.iter().filter(|t| t.exists).map(|t| {
        if t.rollout_complete() {
            t.version.unwrap_or(0)
        } else {
            0
        }
    });
    pods.chain(workloads).min().unwrap_or(ALL_CONSUMERS_CURRENT)
}

/// What to do about one target for `version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartDecision {
    /// Its template already carries this version (or a newer one).
    Done,
    /// Restart now.
    Restart,
    /// Restarted too recently; restart at this time.
    Debounced(Timestamp),
    /// The workload does not exist.
    Missing,
}

pub fn restart_decision(
    target: &TargetObservation,
    version: u64,
    debounce: std::time::Duration,
    now: Timestamp,
) -> RestartDecision {
    if !target.exists {
        return RestartDecision::Missing;
    }
    if target.version.is_some_and(|v| v >= version) {
        return RestartDecision::Done;
    }
    let debounce = jiff::SignedDuration::try_from(debounce).unwrap_or(jiff::SignedDuration::ZERO);
    match target
        .restarted_at
        .and_then(|t| t.checked_add(debounce).ok())
    {
        Some(until) if until > now => RestartDecision::Debounced(until),
        _ => RestartDecision::Restart,
    }
}

fn kind_name(kind: WorkloadKind) -> &'static str {
    match kind {
        WorkloadKind::Deployment => "Deployment",
        WorkloadKind::StatefulSet => "StatefulSet",
        WorkloadKind::DaemonSet => "DaemonSet",
    }
}

fn observation_from(
    kind: WorkloadKind,
    name: &str,
    lease: &str,
    meta: Option<(&kube::api::ObjectMeta, Option<&BTreeMap<String, String>>)>,
    rollout: RolloutCounts,
) -> TargetObservation {
    let mut o = TargetObservation {
        kind: kind_name(kind).into(),
        name: name.into(),
        ..Default::default()
    };
    let Some((meta, annotations)) = meta else {
        return o;
    };
    o.exists = true;
    o.generation = meta.generation;
    o.rollout = rollout;
    if let Some(a) = annotations {
        o.version = a
            .get(&version_annotation(lease))
            .and_then(|v| v.parse().ok());
        o.restarted_at = a.get(RESTARTED_AT_ANNOTATION).and_then(|v| v.parse().ok());
    }
    o
}

/// Look at one rollout target.
pub async fn observe_target(
    client: &Client,
    namespace: &str,
    lease: &str,
    target: &RolloutTarget,
) -> Result<TargetObservation, kube::Error> {
    let name = target.name.as_str();
    Ok(match target.kind {
        WorkloadKind::Deployment => {
            let d = Api::<Deployment>::namespaced(client.clone(), namespace)
                .get_opt(name)
                .await?;
            let ann = |d: &Deployment| {
                d.spec
                    .template
                    .metadata
                    .as_ref()
                    .and_then(|m| m.annotations.clone())
            };
            let a = d.as_ref().and_then(ann);
            let st = d
                .as_ref()
                .and_then(|d| d.status.clone())
                .unwrap_or_default();
            let want = d.as_ref().and_then(|d| d.spec.replicas).unwrap_or(1);
            observation_from(
                target.kind,
                name,
                lease,
                d.as_ref().map(|d| (&d.metadata, a.as_ref())),
                RolloutCounts {
                    observed_generation: st.observed_generation,
                    desired: want,
                    updated: st.updated_replicas.unwrap_or(0),
                    total: st.replicas.unwrap_or(0),
                    available: st.available_replicas.unwrap_or(0),
                    revisions_match: true,
                },
            )
        }
        WorkloadKind::StatefulSet => {
            let s = Api::<StatefulSet>::namespaced(client.clone(), namespace)
                .get_opt(name)
                .await?;
            let a = s
                .as_ref()
                .and_then(|s| s.spec.template.metadata.as_ref())
                .and_then(|m| m.annotations.clone());
            let st = s
                .as_ref()
                .and_then(|s| s.status.clone())
                .unwrap_or_default();
            let want = s.as_ref().and_then(|s| s.spec.replicas).unwrap_or(1);
            observation_from(
                target.kind,
                name,
                lease,
                s.as_ref().map(|s| (&s.metadata, a.as_ref())),
                RolloutCounts {
                    observed_generation: st.observed_generation,
                    desired: want,
                    updated: st.updated_replicas.unwrap_or(0),
                    total: st.replicas,
                    available: st
                        .available_replicas
                        .unwrap_or(st.ready_replicas.unwrap_or(0)),
                    revisions_match: st.current_revision.is_some()
                        && st.current_revision == st.update_revision,
                },
            )
        }
        WorkloadKind::DaemonSet => {
            let d = Api::<DaemonSet>::namespaced(client.clone(), namespace)
                .get_opt(name)
                .await?;
            let a = d
                .as_ref()
                .and_then(|d| d.spec.template.metadata.as_ref())
                .and_then(|m| m.annotations.clone());
            let st = d
                .as_ref()
                .and_then(|d| d.status.clone())
                .unwrap_or_default();
            observation_from(
                target.kind,
                name,
                lease,
                d.as_ref().map(|d| (&d.metadata, a.as_ref())),
                RolloutCounts {
                    observed_generation: st.observed_generation,
                    desired: st.desired_number_scheduled,
                    updated: st.updated_number_scheduled.unwrap_or(0),
                    // A DaemonSet replaces each node's pod in place: its status has no
                    // count of old pods beyond `updated < desired`.
                    total: st.updated_number_scheduled.unwrap_or(0),
                    available: st.number_available.unwrap_or(0),
                    revisions_match: true,
                },
            )
        }
    })
}

/// The apply body that restarts a workload for `version`.
pub fn restart_patch(
    kind: WorkloadKind,
    name: &str,
    lease: &str,
    version: u64,
    now: Timestamp,
) -> serde_json::Value {
    let mut body = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": kind_name(kind),
        "metadata": { "name": name },
        "spec": { "template": { "metadata": { "annotations": {
            RESTARTED_AT_ANNOTATION: crate::status::k8s_time(now).0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        }}}}
    });
    body["spec"]["template"]["metadata"]["annotations"][version_annotation(lease)] =
        serde_json::Value::String(version.to_string());
    body
}

async fn restart(
    client: &Client,
    namespace: &str,
    lease: &str,
    target: &RolloutTarget,
    version: u64,
    now: Timestamp,
) -> Result<(), kube::Error> {
    let body = restart_patch(target.kind, &target.name, lease, version, now);
    let pp = PatchParams::apply(&restart_field_manager(lease)).force();
    let patch = Patch::Apply(&body);
    match target.kind {
        WorkloadKind::Deployment => {
            Api::<Deployment>::namespaced(client.clone(), namespace)
                .patch(&target.name, &pp, &patch)
                .await?;
        }
        WorkloadKind::StatefulSet => {
            Api::<StatefulSet>::namespaced(client.clone(), namespace)
                .patch(&target.name, &pp, &patch)
                .await?;
        }
        WorkloadKind::DaemonSet => {
            Api::<DaemonSet>::namespaced(client.clone(), namespace)
                .patch(&target.name, &pp, &patch)
                .await?;
        }
    }
    Ok(())
}

/// The Secret type of a delivered certificate.
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";

/// Delivery to a Secret and rollout restarts for one lease.
pub struct KubeDelivery {
    client: Client,
    namespace: String,
    lease_name: String,
    owner: OwnerReference,
    spec: DeliverySpec,
    clock: Arc<dyn Fn() -> Timestamp + Send + Sync>,
    /// The earliest time a debounced restart is due.
    debounced_until: Mutex<Option<Timestamp>>,
    /// `type` of the delivered Secret: `Opaque`, or `kubernetes.io/tls` for certificates.
    secret_type: &'static str,
    /// Checked before the delivered Secret is written and before each restart.
    fence: LeadershipFence,
}

impl std::fmt::Debug for KubeDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeDelivery")
            .field("namespace", &self.namespace)
            .field("lease", &self.lease_name)
            .finish_non_exhaustive()
    }
}

impl KubeDelivery {
    pub fn new(
        client: Client,
        namespace: &str,
        lease_name: &str,
        owner: OwnerReference,
        spec: DeliverySpec,
        clock: Arc<dyn Fn() -> Timestamp + Send + Sync>,
    ) -> Self {
        Self {
            client,
            namespace: namespace.into(),
            lease_name: lease_name.into(),
            owner,
            spec,
            clock,
            debounced_until: Mutex::new(None),
            secret_type: "Opaque",
            fence: LeadershipFence::always_open(),
        }
    }

    /// Refuse every write and restart unless `fence` is open.
    pub fn fenced(mut self, fence: LeadershipFence) -> Self {
        self.fence = fence;
        self
    }

    /// Deliver a `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`, `ca.crt`) instead of
    /// an `Opaque` one.
    pub fn tls(mut self) -> Self {
        self.secret_type = TLS_SECRET_TYPE;
        self
    }

    /// Observe every rollout target.
    pub async fn observe_targets(&self) -> Result<Vec<TargetObservation>, kube::Error> {
        let mut out = Vec::with_capacity(self.spec.rollout_restart.len());
        for t in &self.spec.rollout_restart {
            out.push(observe_target(&self.client, &self.namespace, &self.lease_name, t).await?);
        }
        Ok(out)
    }

    /// Restart the targets that do not have `version` yet and are not debounced.
    /// Returns when the next debounced restart is due, if any.
    pub async fn sync_restarts(
        &self,
        version: u64,
        observed: &[TargetObservation],
    ) -> Result<Option<Timestamp>, StoreError> {
        let now = (self.clock)();
        let debounce: std::time::Duration = self.spec.restart_debounce.into();
        let mut next: Option<Timestamp> = None;
        for (target, obs) in self.spec.rollout_restart.iter().zip(observed) {
            match restart_decision(obs, version, debounce, now) {
                RestartDecision::Restart => {
                    self.fence.check()?;
                    restart(
                        &self.client,
                        &self.namespace,
                        &self.lease_name,
                        target,
                        version,
                        now,
                    )
                    .await
                    .map_err(|e| {
                        store_error(
                            &format!("cannot restart {} {}", kind_name(target.kind), target.name),
                            e,
                        )
                    })?;
                    tracing::info!(lease = %self.lease_name, kind = kind_name(target.kind), name = %target.name, version, "rollout restart");
                }
                RestartDecision::Debounced(until) => {
                    next = Some(next.map_or(until, |n| n.min(until)))
                }
                RestartDecision::Done | RestartDecision::Missing => {}
            }
        }
        *self.debounced_until.lock().await = next;
        Ok(next)
    }

    /// When a debounced restart is due (set by the last delivery or sync).
    pub async fn debounced_until(&self) -> Option<Timestamp> {
        *self.debounced_until.lock().await
    }

    /// Why the delivered Secret may not be written (it exists and was not created by
    /// this lease), or `None` when it may.
    pub async fn foreign_secret(&self) -> Result<Option<String>, StoreError> {
        let Some(name) = self.secret_name() else {
            return Ok(None);
        };
        let existing = Api::<Secret>::namespaced(self.client.clone(), &self.namespace)
            .get_opt(&name)
            .await
            .map_err(|e| store_error("cannot read the delivered Secret", e))?;
        Ok(match secret_ownership(existing.as_ref(), &self.owner.uid) {
            SecretOwnership::Foreign => {
                Some(foreign_secret_message(&name, "spec.delivery.secret.name"))
            }
            SecretOwnership::Absent | SecretOwnership::Ours => None,
        })
    }

    /// Name of the delivered Secret, if any.
    pub fn secret_name(&self) -> Option<String> {
        self.spec
            .secret
            .as_ref()
            .map(|s| s.name.clone().unwrap_or_else(|| self.lease_name.clone()))
    }
}

#[async_trait]
impl Delivery for KubeDelivery {
    async fn deliver(
        &self,
        _: &LeaseKey,
        version: u64,
        material: &CredentialMaterial,
    ) -> Result<(), StoreError> {
        if let Some(name) = self.secret_name() {
            // Checked again here, not only before the engine runs: never write over (and
            // so garbage-collect with the lease) a Secret someone else made meanwhile.
            if let Some(message) = self.foreign_secret().await? {
                return Err(StoreError(message));
            }
            self.fence.check()?;
            let mut body = owned_secret_patch(&name, &self.lease_name, &self.owner, &material.0);
            body.type_ = Some(self.secret_type.into());
            let body = secret_apply_body(&body)?;
            Api::<Secret>::namespaced(self.client.clone(), &self.namespace)
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&body),
                )
                .await
                .map_err(|e| store_error("cannot write the delivered Secret", e))?;
        }
        if !self.spec.rollout_restart.is_empty() {
            let observed = self
                .observe_targets()
                .await
                .map_err(|e| store_error("cannot read a rollout target", e))?;
            self.sync_restarts(version, &observed).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn target(version: Option<u64>, complete: bool) -> TargetObservation {
        TargetObservation {
            kind: "Deployment".into(),
            name: "orders".into(),
            exists: true,
            version,
            restarted_at: Some(t(0)),
            generation: Some(5),
            rollout: RolloutCounts {
                observed_generation: Some(if complete { 5 } else { 4 }),
                desired: 3,
                updated: 3,
                total: 3,
                available: 3,
                revisions_match: true,
            },
        }
    }

    fn pod(version: Option<u64>) -> ConsumerStatus {
        ConsumerStatus {
            kind: "Pod".into(),
            namespace: "shop".into(),
            name: "orders-1".into(),
            version,
            acknowledged_at: None,
        }
    }

    #[test]
    fn consumer_evidence_needs_completed_rollouts_and_acknowledging_pods() {
        assert_eq!(consumers_hold(&[], &[]), ALL_CONSUMERS_CURRENT);
        assert_eq!(consumers_hold(&[pod(None)], &[]), 0);
        assert_eq!(consumers_hold(&[pod(Some(2))], &[target(Some(2), true)]), 2);
        assert_eq!(consumers_hold(&[pod(Some(1))], &[target(Some(2), true)]), 1);
        assert_eq!(consumers_hold(&[], &[target(Some(2), false)]), 0);
        assert_eq!(consumers_hold(&[], &[target(Some(1), true)]), 1);
        let mut partial = target(Some(2), true);
        partial.rollout.updated = 2;
        assert_eq!(consumers_hold(&[], &[partial]), 0);
        let missing = TargetObservation {
            exists: false,
            ..Default::default()
        };
        assert_eq!(consumers_hold(&[], &[missing]), ALL_CONSUMERS_CURRENT);
    }

    #[test]
    fn a_rollout_is_complete_only_when_no_old_pod_runs_and_the_new_ones_are_available() {
        assert!(target(Some(2), true).rollout_complete());
        // Surge: three new pods created, the three old ones still running.
        let mut surging = target(Some(2), true);
        surging.rollout.total = 6;
        assert!(!surging.rollout_complete(), "old pods still run");
        // New pods created but not available yet.
        let mut starting = target(Some(2), true);
        starting.rollout.available = 1;
        assert!(!starting.rollout_complete(), "new pods not available");
        // A StatefulSet whose current revision is not the update revision yet.
        let mut stateful = target(Some(2), true);
        stateful.kind = "StatefulSet".into();
        stateful.rollout.revisions_match = false;
        assert!(
            !stateful.rollout_complete(),
            "pods of the old revision remain"
        );
        // Scaled to zero: nothing runs the old credential.
        let mut zero = target(Some(2), true);
        zero.rollout = RolloutCounts {
            observed_generation: Some(5),
            revisions_match: true,
            ..Default::default()
        };
        assert!(zero.rollout_complete());
    }

    #[test]
    fn restarts_are_debounced() {
        let d = Duration::from_secs(30);
        assert_eq!(
            restart_decision(&target(Some(2), true), 2, d, t(5)),
            RestartDecision::Done
        );
        assert_eq!(
            restart_decision(&target(Some(1), true), 2, d, t(5)),
            RestartDecision::Debounced(t(30))
        );
        assert_eq!(
            restart_decision(&target(Some(1), true), 2, d, t(30)),
            RestartDecision::Restart
        );
        let mut fresh = target(None, true);
        fresh.restarted_at = None;
        assert_eq!(
            restart_decision(&fresh, 1, d, t(0)),
            RestartDecision::Restart
        );
        assert_eq!(
            restart_decision(&TargetObservation::default(), 1, d, t(0)),
            RestartDecision::Missing
        );
        let p = restart_patch(WorkloadKind::Deployment, "orders", "orders-db", 3, t(0));
        let annotations = &p["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations["orders-db.lease.leasehold.dev/version"], "3");
        // Another lease restarting the same workload writes its own key, under its own
        // field manager, so neither overwrites the other.
        let q = restart_patch(WorkloadKind::Deployment, "orders", "orders-cache", 5, t(0));
        assert!(q["spec"]["template"]["metadata"]["annotations"]["orders-db.lease.leasehold.dev/version"].is_null());
        assert_ne!(
            restart_field_manager("orders-db"),
            restart_field_manager("orders-cache")
        );
        assert!(version_annotation(&"x".repeat(250)).len() < 80);
        assert!(
            p["spec"]["template"]["metadata"]["annotations"][RESTARTED_AT_ANNOTATION].is_string()
        );
    }
}
