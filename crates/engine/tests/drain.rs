//! `drainSessions: Wait` with sessions that do not end: the lease says so instead of
//! waiting silently until the current credential expires.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::db::Db;
use common::{MemoryStores, TestClock, context, lease_key, obs, policy};
use leasehold_core::rotation::WaitReason;
use leasehold_core::{DrainSessionsMode, Strategy};
use leasehold_engine::local::{LocalLease, LocalState, status_rows};
use leasehold_engine::{Engine, Outcome, StepEvent};
use leasehold_testkit::{MariaDbServer, PostgresServer};

async fn open_sessions_blocking_an_alternating_drain_are_reported(db: Db<'_>) {
    let key = lease_key("drain");
    let mut params = policy(Strategy::AlternatingUsers, Duration::ZERO);
    params.drain = DrainSessionsMode::Wait;
    params.drain_timeout = Duration::from_secs(60);
    let ctx = context(
        key.clone(),
        db.kind(),
        db.backend(2),
        db.host(),
        db.port(),
        db.database(),
        params,
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
    let v1 = progress.current().unwrap().clone();
    let pw1 = stores.password(&key, 1).unwrap();
    // A consumer keeps a session open as v1.
    let session = db.session(&v1.credential_id, &pw1).await;

    let out = engine
        .reconcile(&ctx, &mut progress, &obs(Some("r")), stores.stores())
        .await
        .unwrap();
    assert!(
        matches!(
            out,
            Outcome::Wait {
                reason: WaitReason::RevocationBackoff,
                ..
            }
        ),
        "within the drain timeout: {out:?}"
    );
    assert_eq!(progress.current().unwrap().version, 2);
    assert!(
        progress
            .sessions_blocking_drain(&ctx.policy, clock.func()())
            .is_none()
    );

    // Past the drain timeout the lease reports what it waits for.
    clock.advance(Duration::from_secs(61));
    let out = engine
        .reconcile(&ctx, &mut progress, &obs(Some("r")), stores.stores())
        .await
        .unwrap();
    assert!(
        matches!(
            out,
            Outcome::Wait {
                reason: WaitReason::SessionsBlockingDrain,
                ..
            }
        ),
        "{out:?}"
    );
    let blocked = progress
        .sessions_blocking_drain(&ctx.policy, clock.func()())
        .unwrap();
    assert_eq!(blocked.version, 1);
    assert!(
        events.lock().unwrap().iter().any(|e| matches!(
            e,
            StepEvent::SessionsRemain {
                version: 1,
                blocking_since: Some(_),
                ..
            }
        )),
        "{:?}",
        events.lock().unwrap()
    );
    // Local status shows it.
    let policy_spec = serde_json::from_value(serde_json::json!({
        "strategy": "AlternatingUsers",
        "ttl": "1h",
        "revoke": {
            "gracePeriod": "0s", "maxWait": "0s", "waitForConsumers": false,
            "drainSessions": {"mode": "Wait", "timeout": "1m"}
        }
    }))
    .unwrap();
    let mut lease = LocalLease::default();
    lease.uid = key.uid.clone();
    lease.progress = progress.clone();
    lease.last_policy = Some(policy_spec);
    let mut state = LocalState::default();
    state.leases.insert("test/drain".into(), lease);
    let rows = status_rows(&state, clock.func()());
    assert_eq!(rows[0].phase, "Degraded", "{rows:?}");
    let message = rows[0].message.clone().unwrap();
    assert!(
        message.contains("SessionsBlockingDrain") && message.contains("1 open session"),
        "{message}"
    );

    // The session ends: the revocation completes and the report clears.
    session.close().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        clock.advance(Duration::from_secs(11));
        let out = engine
            .reconcile(&ctx, &mut progress, &obs(Some("r")), stores.stores())
            .await
            .unwrap();
        if matches!(
            out,
            Outcome::Wait {
                reason: WaitReason::Renewal,
                ..
            }
        ) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never drained: {out:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(progress.versions.len(), 1);
    assert!(
        progress
            .sessions_blocking_drain(&ctx.policy, clock.func()())
            .is_none()
    );
    assert!(!db.can_login(&v1.credential_id, &pw1).await);
}

#[tokio::test]
async fn postgres_open_sessions_blocking_an_alternating_drain_are_reported() {
    open_sessions_blocking_an_alternating_drain_are_reported(Db::Pg(
        PostgresServer::shared().await,
    ))
    .await;
}

/// MariaDB lists a user's sessions in `information_schema.PROCESSLIST` (the admin has
/// `PROCESS`), so `Wait` sees them as PostgreSQL's `pg_stat_activity` does.
#[tokio::test]
async fn mariadb_open_sessions_blocking_an_alternating_drain_are_reported() {
    open_sessions_blocking_an_alternating_drain_are_reported(Db::Maria(
        MariaDbServer::shared().await,
    ))
    .await;
}
