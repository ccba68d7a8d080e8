//! The orphan sweeper: users that carry leasehold's naming but no lease records.
//!
//! A crash between creating a user and recording it cannot orphan it (the intent is
//! recorded first and names are deterministic), but a lease deleted while leasehold was
//! not running, or state lost by hand, can. The sweeper finds such users by their name
//! prefix and revokes them.

use std::collections::BTreeSet;
use std::sync::Arc;

use leasehold_backends::{
    Backend, BackendError, CredentialId, DrainSessions, RevokeMode, RevokeRequest,
};
use tracing::{info, warn};

use crate::{LeaseKey, NamingRule};

/// What the sweeper did (or would do in dry-run mode).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SweepReport {
    /// Users found with the prefix and referenced by no lease.
    pub orphans: Vec<String>,
    /// Orphans actually dropped (empty in dry-run mode).
    pub revoked: Vec<String>,
    /// Orphans whose revocation failed, with the error.
    pub failed: Vec<(String, String)>,
}

/// The user names one lease's versions can have: `prefix` + version digits + `suffix`.
/// `None` when the names would not identify the lease on their own (no UID, namespace or
/// name in front of the version), because sweeping them could touch other leases' users.
pub fn lease_pattern(naming: &NamingRule, lease: &LeaseKey) -> Option<(String, String)> {
    const SENTINEL: u64 = 987_654_321_987;
    let NamingRule::Dynamic { .. } = naming else {
        return None;
    };
    let name = naming.credential_id(lease, SENTINEL, None).ok()?.0;
    let (prefix, suffix) = name.split_once(&SENTINEL.to_string())?;
    let identifies = prefix.contains(&leasehold_core::naming::short_uid(&lease.uid))
        || (prefix.contains(&lease.namespace.replace('-', "_"))
            && prefix.contains(&lease.name.replace('-', "_")));
    identifies.then(|| (prefix.to_string(), suffix.to_string()))
}

/// Revoke users of one lease that its recorded progress does not know: versions leaked
/// by lost or restored state. Only names matching the lease's exact pattern are touched.
pub async fn sweep_lease(
    backend: &Arc<dyn Backend>,
    pattern: &(String, String),
    referenced: &BTreeSet<String>,
    dry_run: bool,
) -> Result<SweepReport, BackendError> {
    let (prefix, suffix) = pattern;
    let mut report = SweepReport::default();
    for CredentialId(user) in backend.list_users(prefix).await? {
        let middle = user
            .strip_prefix(prefix.as_str())
            .and_then(|rest| rest.strip_suffix(suffix.as_str()));
        let is_version =
            middle.is_some_and(|m| !m.is_empty() && m.bytes().all(|b| b.is_ascii_digit()));
        if !is_version || referenced.contains(&user) {
            continue;
        }
        revoke_orphan(backend, user, dry_run, &mut report).await;
    }
    Ok(report)
}

async fn revoke_orphan(
    backend: &Arc<dyn Backend>,
    user: String,
    dry_run: bool,
    report: &mut SweepReport,
) {
    report.orphans.push(user.clone());
    if dry_run {
        info!(target = %backend.target_key(), user, "orphan found (dry run: not revoked)");
        return;
    }
    let request = RevokeRequest {
        id: CredentialId(user.clone()),
        mode: RevokeMode::DropUser,
        drain: DrainSessions::Terminate,
    };
    match backend.revoke(&request).await {
        Ok(_) => {
            info!(target = %backend.target_key(), user, "orphan revoked");
            report.revoked.push(user);
        }
        Err(e) => {
            warn!(target = %backend.target_key(), user, error = %e, "cannot revoke orphan");
            report.failed.push((user, e.to_string()));
        }
    }
}

/// Revoke every user whose name starts with `prefix` and is not in `referenced`. Use only
/// when this leasehold instance owns every user with that prefix on the database.
pub async fn sweep(
    backend: &Arc<dyn Backend>,
    prefix: &str,
    referenced: &BTreeSet<String>,
    dry_run: bool,
) -> Result<SweepReport, BackendError> {
    let mut report = SweepReport::default();
    if prefix.len() < 2 {
        // Too broad a prefix could match users leasehold never made.
        return Ok(report);
    }
    for CredentialId(user) in backend.list_users(prefix).await? {
        if referenced.contains(&user) {
            continue;
        }
        revoke_orphan(backend, user, dry_run, &mut report).await;
    }
    Ok(report)
}
