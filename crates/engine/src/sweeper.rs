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

/// Revoke every user whose name starts with `prefix` and is not in `referenced`.
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
        report.orphans.push(user.clone());
        if dry_run {
            info!(target = %backend.target_key(), user, "orphan found (dry run: not revoked)");
            continue;
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
    Ok(report)
}
