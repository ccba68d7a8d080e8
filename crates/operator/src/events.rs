//! Kubernetes events for the engine's steps. Never a secret in an event.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};
use leasehold_engine::engine::{EventSink, LeaseContextRef};
use leasehold_engine::{LeaseKey, StepEvent};

use crate::metrics::Metrics;

/// Kubernetes event fields for a step, or `None` for steps that are not reported.
pub fn event_for(step: &StepEvent) -> Option<(EventType, &'static str, String)> {
    Some(match step {
        StepEvent::Issued { version, username } => (
            EventType::Normal,
            "Issued",
            format!("issued version {version} as database user {username}"),
        ),
        StepEvent::Verified { version } => (
            EventType::Normal,
            "Verified",
            format!("version {version} logged in and ran the verification query"),
        ),
        StepEvent::Promoted { version, previous } => (
            EventType::Normal,
            "Promoted",
            match previous {
                Some(p) => format!("version {version} is current; version {p} is draining"),
                None => format!("version {version} is current"),
            },
        ),
        StepEvent::Revoked { version, reason } => (
            EventType::Normal,
            "Revoked",
            format!("version {version} revoked ({reason:?})"),
        ),
        StepEvent::VerificationFailed { version, reason } => (
            EventType::Warning,
            "VerificationFailed",
            format!("version {version} failed verification and is removed: {reason}"),
        ),
        StepEvent::RevocationStuck { version, since } => (
            EventType::Warning,
            "RevocationStuck",
            format!("revoking version {version} has been failing since {since}; still retrying"),
        ),
        StepEvent::EmergencyRevocationBegun {
            through_version,
            reason,
        } => (
            EventType::Warning,
            "EmergencyRevocation",
            format!(
                "emergency revocation requested ({reason}): rotating now; versions up to \
                 {through_version} are revoked as soon as the new one is verified, sessions terminated"
            ),
        ),
        StepEvent::EmergencyRevocationCompleted {
            through_version,
            millis,
            ..
        } => (
            EventType::Normal,
            "EmergencyRevocationCompleted",
            format!(
                "every version up to {through_version} is revoked ({:.1} s after the request)",
                *millis as f64 / 1000.0
            ),
        ),
        StepEvent::Delivered { .. }
        | StepEvent::RevocationRetry { .. }
        | StepEvent::SessionsRemain { .. } => {
            return None;
        }
    })
}

/// The object reference events about a lease point at.
pub fn lease_reference(key: &LeaseKey) -> ObjectReference {
    ObjectReference {
        api_version: Some(format!(
            "{}/{}",
            leasehold_api::GROUP,
            leasehold_api::VERSION
        )),
        kind: Some("SecretLease".into()),
        namespace: Some(key.namespace.clone()),
        name: Some(key.name.clone()),
        uid: Some(key.uid.clone()).filter(|u| !u.is_empty()),
        ..Default::default()
    }
}

/// Publish one event in the background (events are best effort).
pub fn publish(recorder: &Recorder, key: &LeaseKey, type_: EventType, reason: &str, note: String) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let recorder = recorder.clone();
    let reference = lease_reference(key);
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(truncate(note, 1000)),
        action: "Reconcile".into(),
        secondary: None,
    };
    handle.spawn(async move {
        if let Err(e) = recorder.publish(&event, &reference).await {
            tracing::debug!(error = %e, "cannot publish an event");
        }
    });
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// The engine's event sink: Kubernetes events plus rotation metrics.
pub fn sink(recorder: Option<Recorder>, metrics: Arc<Metrics>) -> EventSink {
    Arc::new(move |lease: &LeaseContextRef<'_>, step: &StepEvent| {
        match step {
            StepEvent::Promoted { .. } => metrics.rotation("Succeeded"),
            StepEvent::VerificationFailed { .. } => metrics.rotation("VerificationFailed"),
            StepEvent::EmergencyRevocationBegun { .. } => {
                metrics.emergency_revocation(&lease.key.namespace, &lease.key.name)
            }
            _ => {}
        }
        if let (Some(recorder), Some((type_, reason, note))) = (&recorder, event_for(step)) {
            publish(recorder, lease.key, type_, reason, note);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_reported_step_has_a_reason() {
        let cases = [
            (
                StepEvent::Issued {
                    version: 1,
                    username: "lh_x_v1".into(),
                },
                "Issued",
            ),
            (StepEvent::Verified { version: 1 }, "Verified"),
            (
                StepEvent::Promoted {
                    version: 2,
                    previous: Some(1),
                },
                "Promoted",
            ),
            (
                StepEvent::Revoked {
                    version: 1,
                    reason: leasehold_core::rotation::RevokeReason::Superseded,
                },
                "Revoked",
            ),
            (
                StepEvent::VerificationFailed {
                    version: 2,
                    reason: "login refused".into(),
                },
                "VerificationFailed",
            ),
            (
                StepEvent::RevocationStuck {
                    version: 1,
                    since: jiff::Timestamp::UNIX_EPOCH,
                },
                "RevocationStuck",
            ),
        ];
        for (step, want) in cases {
            let (_, reason, note) = event_for(&step).unwrap();
            assert_eq!(reason, want);
            assert!(!note.is_empty());
        }
        assert!(event_for(&StepEvent::Delivered { version: 1 }).is_none());
        assert_eq!(truncate("ééé".into(), 3), "é");
    }
}
