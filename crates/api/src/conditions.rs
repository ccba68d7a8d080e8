//! Condition types and the rule that `lastTransitionTime` only moves when `status` does.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const READY: &str = "Ready";
pub const ROTATING: &str = "Rotating";
pub const VERIFIED: &str = "Verified";
pub const REVOCATION_PENDING: &str = "RevocationPending";
pub const DEGRADED: &str = "Degraded";

/// Build a condition; `status` is `True`/`False`.
pub fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: jiff::Timestamp,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation,
        last_transition_time: Time(now),
    }
}

/// Insert or replace `new` by type, keeping the old `lastTransitionTime` when the status
/// did not change.
pub fn upsert(conditions: &mut Vec<Condition>, mut new: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(old) => {
            if old.status == new.status {
                new.last_transition_time = old.last_transition_time.clone();
            }
            *old = new;
        }
        None => conditions.push(new),
    }
}

/// Find a condition by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let t0 = jiff::Timestamp::from_second(1_000).unwrap();
        let t1 = jiff::Timestamp::from_second(2_000).unwrap();
        let mut conds = vec![];
        upsert(
            &mut conds,
            condition(READY, true, "Active", "ok", Some(1), t0),
        );
        upsert(
            &mut conds,
            condition(READY, true, "Active", "still ok", Some(2), t1),
        );
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].last_transition_time, Time(t0));
        assert_eq!(conds[0].observed_generation, Some(2));
        upsert(
            &mut conds,
            condition(READY, false, "PolicyNotFound", "x", Some(2), t1),
        );
        assert_eq!(conds[0].last_transition_time, Time(t1));
    }
}
