//! Limits that keep one lease (or one misbehaving node) from exhausting the
//! broker or a database: concurrent per-pod issues and live per-pod users per
//! lease, and open connections.
//!
//! The controller binary sets them from its flags once at startup with
//! [`BrokerLimits::install`]; [`crate::EnginePerPodIssuer::new`] and
//! [`crate::serve`] read them ([`BrokerLimits::current`]) unless given
//! explicitly (`with_limits`).

use std::sync::OnceLock;

/// The broker's limits. Refusals are `RESOURCE_EXHAUSTED` (the driver retries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerLimits {
    /// Per-pod credentials of one lease being created or renewed at once
    /// (each costs a `CREATE ROLE` and a login on the lease's database).
    pub max_concurrent_issues_per_lease: usize,
    /// Live per-pod users of one lease (records, and new ones being created:
    /// concurrent issues cannot overshoot it); a pod that has one keeps it.
    pub max_per_pod_users_per_lease: usize,
    /// Open connections to the broker; more are closed on accept.
    pub max_connections: usize,
}

impl Default for BrokerLimits {
    fn default() -> Self {
        Self {
            max_concurrent_issues_per_lease: 8,
            max_per_pod_users_per_lease: 1000,
            max_connections: 1024,
        }
    }
}

static INSTALLED: OnceLock<BrokerLimits> = OnceLock::new();

impl BrokerLimits {
    /// Makes `self` the process's limits (first call wins; `false` after).
    pub fn install(self) -> bool {
        INSTALLED.set(self).is_ok()
    }

    /// The installed limits, or the defaults.
    pub fn current() -> Self {
        INSTALLED.get().copied().unwrap_or_default()
    }
}
