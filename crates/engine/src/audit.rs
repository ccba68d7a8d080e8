//! The audit record of each engine step. A credential is named by lease, version and
//! user; never a secret value.

use leasehold_audit::{Action, AuditEvent, Outcome};

use crate::LeaseKey;
use crate::engine::StepEvent;

/// The audit record of `step` on `lease` (about the credential `user`, when known).
pub fn step_audit_event(lease: &LeaseKey, user: Option<&str>, step: &StepEvent) -> AuditEvent {
    let (action, outcome) = match step {
        StepEvent::Issued { .. } => (Action::Issue, Outcome::Success),
        StepEvent::Verified { .. } => (Action::Verify, Outcome::Success),
        StepEvent::VerificationFailed { .. } => (Action::Verify, Outcome::Failure),
        StepEvent::Promoted { .. } => (Action::Promote, Outcome::Success),
        StepEvent::Delivered { .. } => (Action::Deliver, Outcome::Success),
        StepEvent::Revoked { .. } => (Action::Revoke, Outcome::Success),
        StepEvent::RevocationRetry { .. } | StepEvent::RevocationStuck { .. } => {
            (Action::Revoke, Outcome::Failure)
        }
        StepEvent::SessionsRemain { .. } => (Action::Revoke, Outcome::Requested),
        StepEvent::EmergencyRevocationBegun { .. } => (Action::EmergencyRevoke, Outcome::Requested),
        StepEvent::EmergencyRevocationCompleted { .. } => {
            (Action::EmergencyRevoke, Outcome::Success)
        }
    };
    let mut event = AuditEvent::new(action, outcome).lease(&lease.namespace, &lease.name);
    if let Some(v) = step.version() {
        event = event.version(v);
    }
    if let Some(u) = user {
        event = event.username(u);
    }
    match step {
        StepEvent::Issued { username, .. } if user.is_none() => event.username(username),
        StepEvent::VerificationFailed { reason, .. } => event.reason(reason),
        StepEvent::Promoted {
            previous: Some(p), ..
        } => event.detail_kv("previous_version", p.to_string()),
        StepEvent::Revoked { reason, .. } => event.reason(format!("{reason:?}")),
        StepEvent::RevocationRetry {
            failures, error, ..
        } => event
            .reason(error)
            .detail_kv("failures", failures.to_string()),
        StepEvent::RevocationStuck { since, .. } => event
            .reason("revocation stuck; still retrying")
            .detail_kv("failing_since", since.to_string()),
        StepEvent::SessionsRemain {
            sessions,
            blocking_since,
            ..
        } => {
            let e = event
                .reason("open sessions delay the revocation")
                .detail_kv("sessions", sessions.to_string());
            match blocking_since {
                Some(t) => e.detail_kv("blocking_since", t.to_string()),
                None => e,
            }
        }
        StepEvent::EmergencyRevocationBegun {
            through_version,
            reason,
        } => event
            .reason(reason)
            .detail_kv("through_version", through_version.to_string()),
        StepEvent::EmergencyRevocationCompleted {
            through_version,
            reason,
            millis,
        } => event
            .reason(reason)
            .detail_kv("through_version", through_version.to_string())
            .detail_kv("millis", millis.to_string()),
        _ => event,
    }
}
