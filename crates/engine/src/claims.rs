//! Which lease each database user belongs to, so one lease never issues a user another
//! lease records (a shared `username`, or names that happen to collide): issuing it
//! would take over the other lease's credential, and revoking it would lock it out.
//!
//! User names are scoped per database server (PostgreSQL roles and MySQL users are not
//! per database). The engine claims a name before it records a version under it and
//! releases it once no version of the lease uses it any more. It only knows leases it has
//! seen: local mode seeds it with every lease in the state file before each pass, and the
//! controller can seed it from the status of every lease it caches
//! ([`UsernameClaims::record_progress`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use leasehold_core::Progress;
use leasehold_core::rotation::Target;

use crate::LeaseKey;

/// Shared map of (server, user) → owning lease. Cheap to clone.
#[derive(Debug, Default, Clone)]
pub struct UsernameClaims {
    owners: Arc<Mutex<HashMap<(String, String), LeaseKey>>>,
}

impl UsernameClaims {
    pub fn new() -> Self {
        Self::default()
    }

    /// Claim `user` on `server` for `lease`, or name the lease that holds it.
    pub fn claim(&self, server: &str, user: &str, lease: &LeaseKey) -> Result<(), LeaseKey> {
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        let owner = owners
            .entry((server.to_string(), user.to_string()))
            .or_insert_with(|| lease.clone());
        if owner.uid == lease.uid {
            // Same lease (it may have been renamed in local mode): keep it current.
            *owner = lease.clone();
            Ok(())
        } else {
            Err(owner.clone())
        }
    }

    /// Give up `user` on `server` if `lease` holds it.
    pub fn release(&self, server: &str, user: &str, lease: &LeaseKey) {
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        let key = (server.to_string(), user.to_string());
        if owners.get(&key).is_some_and(|o| o.uid == lease.uid) {
            owners.remove(&key);
        }
    }

    /// Record every user `progress` names for `lease` (versions without a recorded
    /// target are on `fallback`). A name another lease already holds is left to it.
    pub fn record_progress(&self, lease: &LeaseKey, progress: &Progress, fallback: &Target) {
        for v in &progress.versions {
            let server = v.target().unwrap_or(fallback).server_key();
            let _ = self.claim(&server, &v.credential_id, lease);
        }
    }

    /// Forget every claim (before re-seeding from a complete list of leases).
    pub fn clear(&self) {
        self.owners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(uid: &str) -> LeaseKey {
        LeaseKey {
            namespace: "ns".into(),
            name: format!("l-{uid}"),
            uid: uid.into(),
        }
    }

    #[test]
    fn a_user_belongs_to_one_lease_per_server() {
        let claims = UsernameClaims::new();
        claims.claim("pg://a:1", "app_a", &key("1")).unwrap();
        claims.claim("pg://a:1", "app_a", &key("1")).unwrap();
        assert_eq!(claims.claim("pg://a:1", "app_a", &key("2")), Err(key("1")));
        claims.claim("pg://b:1", "app_a", &key("2")).unwrap();
        claims.release("pg://a:1", "app_a", &key("2"));
        assert!(claims.claim("pg://a:1", "app_a", &key("2")).is_err());
        claims.release("pg://a:1", "app_a", &key("1"));
        claims.claim("pg://a:1", "app_a", &key("2")).unwrap();
    }
}
