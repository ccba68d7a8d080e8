//! Emergency revocation (`leasehold.dev/revoke-now`) and `spec.suspend` against real
//! databases: the old credential stops working at once, with its sessions, and only
//! after the new one has been verified.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::db::Db;
use common::{MemoryStores, TestClock, context, lease_key, obs, policy};
use leasehold_core::rotation::{Observations, RevokeReason, WaitReason};
use leasehold_core::{DrainSessionsMode, Strategy};
use leasehold_engine::{Engine, Outcome, StepEvent};
use leasehold_testkit::{MariaDbServer, PostgresServer};

/// Waits for consumers, a long grace period and drains by waiting for sessions: all
/// of it is what an emergency skips.
fn patient_policy(strategy: Strategy) -> leasehold_core::rotation::PolicyParams {
    let mut p = policy(strategy, Duration::from_secs(3600));
    p.wait_for_consumers = true;
    p.max_wait = Duration::from_secs(7200);
    p.drain = DrainSessionsMode::Wait;
    p.drain_timeout = Duration::from_secs(3600);
    p
}

fn emergency(reason: &str) -> Observations {
    Observations {
        emergency_request: Some(reason.into()),
        // A consumer still on the old version, and the maintenance window closed.
        consumers_hold: 0,
        maintenance_window_open: false,
        ..obs(None)
    }
}

async fn emergency_revocation(db: Db<'_>, strategy: Strategy) {
    let key = lease_key("emergency");
    let ctx = context(
        key.clone(),
        db.kind(),
        db.backend(2),
        db.host(),
        db.port(),
        db.database(),
        patient_policy(strategy),
        db.minimal_privileges(),
    );
    let clock = TestClock::new();
    let events: Arc<Mutex<Vec<StepEvent>>> = Arc::default();
    let sink = events.clone();
    let engine = Engine::new()
        .with_clock(clock.func())
        .with_events(Arc::new(move |_, e| sink.lock().unwrap().push(e.clone())));
    let stores = MemoryStores::default();
    let mut progress = stores.load(&key);
    engine
        .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap();
    // A routine rotation: v1 is superseded and waits (grace period, consumer on v1).
    engine
        .reconcile(&ctx, &mut progress, &obs(Some("routine")), stores.stores())
        .await
        .unwrap();
    let v1 = progress.version(1).unwrap().clone();
    let v2 = progress.current().unwrap().clone();
    assert_eq!(v2.version, 2);
    let pw1 = stores.password(&key, 1).unwrap();
    let pw2 = stores.password(&key, 2).unwrap();
    assert!(
        db.can_login(&v1.credential_id, &pw1).await,
        "v1 drains for an hour"
    );
    // A consumer has a session open as v2 (the version that leaked).
    let session = db.session(&v2.credential_id, &pw2).await;

    clock.advance(Duration::from_secs(5));
    let out = engine
        .reconcile(
            &ctx,
            &mut progress,
            &emergency("leaked in a CI log"),
            stores.stores(),
        )
        .await
        .unwrap();
    assert!(
        matches!(
            out,
            Outcome::Wait {
                reason: WaitReason::Renewal,
                ..
            }
        ),
        "{out:?} {progress:?}"
    );
    let v3 = progress.current().unwrap().clone();
    assert_eq!(v3.version, 3, "a new version at once");
    assert_eq!(
        progress.versions.len(),
        1,
        "every older version revoked: {progress:?}"
    );
    assert!(progress.emergency.is_none(), "finished: {progress:?}");
    assert_eq!(
        progress.handled_emergency_request.as_deref(),
        Some("leaked in a CI log")
    );
    let pw3 = stores.password(&key, 3).unwrap();
    assert!(db.can_login(&v3.credential_id, &pw3).await);
    assert!(!db.can_login(&v1.credential_id, &pw1).await, "v1 revoked");
    assert!(!db.can_login(&v2.credential_id, &pw2).await, "v2 revoked");
    assert!(
        !db.session_alive(session).await,
        "the leaked version's session is terminated"
    );

    let events = events.lock().unwrap().clone();
    let order: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            StepEvent::EmergencyRevocationBegun { .. } => Some("begun"),
            StepEvent::Verified { version: 3 } => Some("verified v3"),
            StepEvent::Revoked {
                reason: RevokeReason::Emergency,
                ..
            } => Some("revoked"),
            StepEvent::EmergencyRevocationCompleted { .. } => Some("completed"),
            _ => None,
        })
        .collect();
    // The already superseded v1 goes at once (v2 is its verified replacement); the
    // current v2 only once v3 is verified.
    assert_eq!(
        order,
        ["begun", "revoked", "verified v3", "revoked", "completed"],
        "the current version is not revoked before its replacement is verified"
    );

    // The same annotation value again does nothing more.
    let out = engine
        .reconcile(
            &ctx,
            &mut progress,
            &emergency("leaked in a CI log"),
            stores.stores(),
        )
        .await
        .unwrap();
    assert!(matches!(out, Outcome::Wait { .. }));
    assert_eq!(progress.current().unwrap().version, 3);
}

#[tokio::test]
async fn postgres_emergency_revocation_dynamic() {
    emergency_revocation(Db::Pg(PostgresServer::shared().await), Strategy::Dynamic).await;
}

#[tokio::test]
async fn mariadb_emergency_revocation_dynamic() {
    emergency_revocation(Db::Maria(MariaDbServer::shared().await), Strategy::Dynamic).await;
}

#[tokio::test]
async fn an_emergency_whose_replacement_fails_verification_keeps_the_old_credential() {
    let s = PostgresServer::shared().await;
    let db = Db::Pg(s);
    let key = lease_key("emergency-fail");
    let mut ctx = context(
        key.clone(),
        db.kind(),
        db.backend(2),
        db.host(),
        db.port(),
        db.database(),
        patient_policy(Strategy::Dynamic),
        db.minimal_privileges(),
    );
    let clock = TestClock::new();
    let engine = Engine::new().with_clock(clock.func());
    let stores = MemoryStores::default();
    let mut progress = stores.load(&key);
    engine
        .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap();
    let v1 = progress.current().unwrap().clone();
    let pw1 = stores.password(&key, 1).unwrap();
    // Every new version fails verification.
    ctx.backend = Arc::new(common::FailVerifyFor {
        inner: ctx.backend.clone(),
        user_suffix: String::new(),
    });
    let out = engine
        .reconcile(&ctx, &mut progress, &emergency("r"), stores.stores())
        .await
        .unwrap();
    assert!(
        matches!(
            out,
            Outcome::Wait {
                reason: WaitReason::VerificationBackoff,
                ..
            }
        ),
        "{out:?}"
    );
    assert_eq!(progress.current().unwrap().version, 1);
    assert!(
        db.can_login(&v1.credential_id, &pw1).await,
        "never revoked without a verified replacement"
    );
    assert!(progress.emergency.is_some(), "still under way");
}

#[tokio::test]
async fn a_suspended_lease_neither_rotates_nor_revokes() {
    let s = PostgresServer::shared().await;
    let db = Db::Pg(s);
    let key = lease_key("suspend");
    let ctx = context(
        key.clone(),
        db.kind(),
        db.backend(2),
        db.host(),
        db.port(),
        db.database(),
        policy(Strategy::Dynamic, Duration::ZERO),
        db.minimal_privileges(),
    );
    let clock = TestClock::new();
    let engine = Engine::new().with_clock(clock.func());
    let stores = MemoryStores::default();
    let mut progress = stores.load(&key);
    engine
        .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap();
    let suspended = Observations {
        suspended: true,
        ..obs(Some("please rotate"))
    };
    // Past the renewal time, and a rotation requested: nothing happens.
    clock.advance(Duration::from_secs(3000));
    let out = engine
        .reconcile(&ctx, &mut progress, &suspended, stores.stores())
        .await
        .unwrap();
    assert_eq!(
        out,
        Outcome::Wait {
            until: None,
            reason: WaitReason::Suspended
        }
    );
    assert_eq!(progress.current().unwrap().version, 1);
    assert_eq!(progress.last_version, 1);
    // Resumed: the rotation happens.
    engine
        .reconcile(
            &ctx,
            &mut progress,
            &obs(Some("please rotate")),
            stores.stores(),
        )
        .await
        .unwrap();
    assert_eq!(progress.current().unwrap().version, 2);
}
