//! The RotationPolicy controller: validate and report `Ready` in status.

use std::sync::Arc;

use jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use leasehold_api::conditions::{self, condition, upsert};
use leasehold_api::{FIELD_MANAGER, RotationPolicy, RotationPolicyStatus};

use crate::OperatorError;
use crate::lease_controller::Context;
use crate::status::k8s_time;

pub const CONTROLLER: &str = "rotationpolicy";

/// The status a policy should have.
pub fn policy_status(policy: &RotationPolicy, now: Timestamp) -> RotationPolicyStatus {
    let mut status = policy.status.clone().unwrap_or_default();
    let generation = policy.metadata.generation;
    let mut ready = match leasehold_api::validate::policy_params(&policy.spec) {
        Ok(_) => condition(
            conditions::READY,
            true,
            "Valid",
            "the policy is valid",
            generation,
            now,
        ),
        Err(errors) => condition(
            conditions::READY,
            false,
            "InvalidPolicy",
            leasehold_api::validate::summary(&errors),
            generation,
            now,
        ),
    };
    ready.last_transition_time = k8s_time(now);
    upsert(&mut status.conditions, ready);
    status.observed_generation = generation;
    status
}

/// Reconcile one RotationPolicy: write status only when it changed.
pub async fn reconcile_policy(
    policy: Arc<RotationPolicy>,
    ctx: Arc<Context>,
) -> Result<Action, OperatorError> {
    let started = std::time::Instant::now();
    let ns = policy
        .namespace()
        .ok_or(OperatorError::MissingField("metadata.namespace"))?;
    let desired = policy_status(&policy, Timestamp::now());
    let observed = policy.status.clone().unwrap_or_default();
    if serde_json::to_value(&observed).ok() != serde_json::to_value(&desired).ok() {
        let body = serde_json::json!({
            "apiVersion": format!("{}/{}", leasehold_api::GROUP, leasehold_api::VERSION),
            "kind": "RotationPolicy",
            "status": desired,
        });
        Api::<RotationPolicy>::namespaced(ctx.client.clone(), &ns)
            .patch_status(
                &policy.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await?;
    }
    ctx.metrics
        .reconciled(CONTROLLER, started.elapsed().as_secs_f64());
    Ok(Action::await_change())
}

pub fn error_policy(
    policy: Arc<RotationPolicy>,
    error: &OperatorError,
    ctx: Arc<Context>,
) -> Action {
    ctx.metrics.failed(CONTROLLER, error.kind());
    tracing::warn!(policy = %policy.name_any(), error = %error, "policy reconcile failed");
    Action::requeue(ctx.next_backoff(&format!(
        "policy/{}/{}",
        policy.namespace().unwrap_or_default(),
        policy.name_any()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(ttl: &str) -> RotationPolicy {
        let mut p: RotationPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "leasehold.dev/v1alpha1",
            "kind": "RotationPolicy",
            "metadata": {"name": "p", "namespace": "shop", "generation": 4},
            "spec": {"ttl": ttl}
        }))
        .unwrap();
        p.status = None;
        p
    }

    #[test]
    fn valid_and_invalid_policies() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let ok = policy_status(&policy("3h"), now);
        let c = conditions::find(&ok.conditions, "Ready").unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Valid"));
        assert_eq!(ok.observed_generation, Some(4));
        let bad = policy_status(&policy("30s"), now);
        let c = conditions::find(&bad.conditions, "Ready").unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "InvalidPolicy")
        );
        assert!(c.message.contains("spec.ttl"), "{}", c.message);
        // Unchanged: same JSON, so no write.
        let mut again = policy("3h");
        again.status = Some(ok.clone());
        let later = now
            .checked_add(jiff::SignedDuration::from_secs(90))
            .unwrap();
        assert_eq!(
            serde_json::to_value(policy_status(&again, later)).unwrap(),
            serde_json::to_value(&ok).unwrap()
        );
    }
}
