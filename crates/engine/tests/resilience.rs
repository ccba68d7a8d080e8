//! Crashes at every step boundary, failed verification, database outages during
//! revocation, many concurrent leases, and no secrets in logs.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::db::Db;
use common::{
    FailVerifyFor, MemoryStores, TestClock, context, crashing_once_at, issue_first_version,
    lease_key, obs, policy,
};
use leasehold_backends::{CredentialId, Privileges};
use leasehold_core::Strategy;
use leasehold_core::rotation::{RevokeReason, RotationOutcome, VersionState, WaitReason};
use leasehold_engine::engine::FaultPoint;
use leasehold_engine::{Engine, EngineError, Outcome};
use leasehold_testkit::{MariaDbServer, PostgresServer};

const ALL_POINTS: [FaultPoint; 8] = [
    FaultPoint::BeforeIssue,
    FaultPoint::AfterIssue,
    FaultPoint::BeforeVerify,
    FaultPoint::AfterVerify,
    FaultPoint::BeforePromote,
    FaultPoint::BeforeDeliver,
    FaultPoint::BeforeRevoke,
    FaultPoint::AfterRevoke,
];

/// Crash once at `point` during a rotation, restart from the saved progress, finish.
async fn crash_and_resume(db: Db<'_>, strategy: Strategy, point: FaultPoint) {
    let key = lease_key("crash");
    let ctx = db.lease_context(&key, strategy);
    db.create_in_place_user(&ctx).await;
    let stores = MemoryStores::default();

    // v1 without faults.
    let (_, v1, pw1) = issue_first_version(&Engine::new(), &ctx, &stores).await;
    assert_eq!(v1.version, 1);

    // Rotation to v2 crashes once at `point`.
    let crashing = crashing_once_at(Engine::new(), point);
    let mut in_memory = stores.load(&key);
    let r = crashing
        .reconcile(&ctx, &mut in_memory, &obs(Some("rotate")), stores.stores())
        .await;
    assert!(
        matches!(r, Err(EngineError::Injected(p, _)) if p == point),
        "{point:?}: {r:?}"
    );

    // A new process loads what was saved and carries on.
    let mut progress = stores.load(&key);
    let out = Engine::new()
        .reconcile(&ctx, &mut progress, &obs(Some("rotate")), stores.stores())
        .await
        .unwrap();
    assert!(matches!(out, Outcome::Wait { .. }), "{point:?}: {out:?}");
    let current = progress.current().unwrap().clone();
    assert_eq!(current.version, 2, "{point:?}: {progress:?}");
    assert_eq!(
        progress.versions.len(),
        1,
        "{point:?}: only the current version is alive: {:?}",
        progress.versions
    );
    let pw = stores.password(&key, 2).unwrap();
    assert!(
        db.can_login(&current.credential_id, &pw).await,
        "{point:?}: current must log in"
    );
    // Exactly one live credential of this lease on the server.
    if strategy == Strategy::Dynamic {
        let prefix = format!("lh_{}", &key.uid[..12]);
        let users = ctx.backend.list_users(&prefix).await.unwrap();
        assert_eq!(
            users,
            vec![CredentialId(current.credential_id.clone())],
            "{point:?}: orphans left"
        );
    } else {
        // AlternatingUsers: the other user is disabled; InPlace: its password is replaced.
        let v1pw = stores.password(&key, 1);
        assert!(v1pw.is_none(), "{point:?}: v1's secret must be forgotten");
        assert!(
            !db.can_login(&v1.credential_id, &pw1).await,
            "{strategy:?} {point:?}: v1 must no longer log in"
        );
    }
    assert_eq!(
        stores.delivered.lock().unwrap().last().unwrap().1,
        2,
        "{point:?}: v2 delivered"
    );
}

#[tokio::test]
async fn postgres_crash_at_every_step_boundary_resumes_cleanly() {
    let s = PostgresServer::shared().await;
    for strategy in [Strategy::Dynamic, Strategy::AlternatingUsers] {
        for point in ALL_POINTS {
            crash_and_resume(Db::Pg(s), strategy, point).await;
        }
    }
}

#[tokio::test]
async fn postgres_in_place_crash_at_every_step_boundary_resumes_cleanly() {
    let s = PostgresServer::shared().await;
    for point in ALL_POINTS {
        crash_and_resume(Db::Pg(s), Strategy::InPlace, point).await;
    }
}

#[tokio::test]
async fn mariadb_crash_at_every_step_boundary_resumes_cleanly() {
    let s = MariaDbServer::shared().await;
    for point in ALL_POINTS {
        crash_and_resume(Db::Maria(s), Strategy::Dynamic, point).await;
    }
}

#[tokio::test]
async fn mariadb_alternating_crash_at_every_step_boundary_resumes_cleanly() {
    let s = MariaDbServer::shared().await;
    for point in ALL_POINTS {
        crash_and_resume(Db::Maria(s), Strategy::AlternatingUsers, point).await;
    }
}

#[tokio::test]
async fn mariadb_in_place_crash_at_every_step_boundary_resumes_cleanly() {
    let s = MariaDbServer::shared().await;
    for point in ALL_POINTS {
        crash_and_resume(Db::Maria(s), Strategy::InPlace, point).await;
    }
}

#[tokio::test]
async fn failed_verification_keeps_the_old_credential_and_removes_the_new() {
    let s = PostgresServer::shared().await;
    let db = Db::Pg(s);
    for strategy in [Strategy::Dynamic, Strategy::InPlace] {
        let key = lease_key("verify");
        let real = db.backend(2);
        let mut ctx = context(
            key.clone(),
            db.kind(),
            real.clone(),
            db.host(),
            db.port(),
            db.database(),
            policy(strategy, Duration::ZERO),
            Privileges::default(),
        );
        db.create_in_place_user(&ctx).await;
        let stores = MemoryStores::default();
        let engine = Engine::new();
        let (mut progress, v1, pw1) = issue_first_version(&engine, &ctx, &stores).await;

        // Version 2 fails verification (Dynamic: by its user name; InPlace: every verify).
        let suffix = if strategy == Strategy::Dynamic {
            "_v2".to_string()
        } else {
            String::new()
        };
        ctx.backend = Arc::new(FailVerifyFor {
            inner: real.clone(),
            user_suffix: suffix,
        });
        let out = engine
            .reconcile(&ctx, &mut progress, &obs(Some("r")), stores.stores())
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
            "{strategy:?}: {out:?}"
        );
        let current = progress.current().unwrap();
        assert_eq!(
            current.version, 1,
            "{strategy:?}: the old version stays current"
        );
        assert!(
            db.can_login(&v1.credential_id, &pw1).await,
            "{strategy:?}: the old credential still works"
        );
        assert_eq!(
            progress.versions.len(),
            1,
            "{strategy:?}: the failed version is gone: {:?}",
            progress.versions
        );
        let failure = progress.history.iter().find(|h| h.version == 2).unwrap();
        assert_eq!(failure.outcome, RotationOutcome::VerificationFailed);
        assert!(failure.reason.as_deref().unwrap().contains("login refused"));
        if strategy == Strategy::Dynamic {
            let v2_user = v1.credential_id.replace("_v1", "_v2");
            assert!(
                !real.can_login(&CredentialId(v2_user)).await.unwrap(),
                "the unverified user is dropped"
            );
        }
        assert_eq!(
            stores.delivered.lock().unwrap().last().unwrap().1,
            1,
            "{strategy:?}: never delivered v2"
        );
        assert!(progress.verify_failures >= 1);
    }
}

#[tokio::test]
async fn database_down_during_revoke_delays_it_until_it_returns() {
    let mut server = PostgresServer::start().await;
    let clock = TestClock::new();
    let key = lease_key("outage");
    let grace = Duration::from_secs(60);
    let (db_backend, host, port, database) = {
        let db = Db::Pg(&server);
        (
            db.backend(2),
            db.host().to_string(),
            db.port(),
            db.database().to_string(),
        )
    };
    let ctx = context(
        key.clone(),
        leasehold_engine::context::DatabaseKind::Postgres,
        db_backend,
        &host,
        port,
        &database,
        policy(Strategy::Dynamic, grace),
        Privileges::default(),
    );
    let stores = MemoryStores::default();
    let engine = Engine::new().with_clock(clock.func());
    let mut progress = stores.load(&key);
    engine
        .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap();
    engine
        .reconcile(&ctx, &mut progress, &obs(Some("r")), stores.stores())
        .await
        .unwrap();
    let v1 = progress
        .versions
        .iter()
        .find(|v| v.version == 1)
        .unwrap()
        .clone();
    let pw1 = stores.password(&key, 1).unwrap();
    assert_eq!(v1.state, VersionState::Superseded);

    server.stop().await;
    clock.advance(grace + Duration::from_secs(1));
    for attempt in 1..=3u32 {
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
            "{out:?}"
        );
        let r = progress.versions.iter().find(|v| v.version == 1).unwrap();
        assert_eq!(r.state, VersionState::Revoking);
        assert_eq!(r.revoke_reason, Some(RevokeReason::Superseded));
        let p = r.revoke.as_ref().unwrap();
        assert_eq!(p.failures, attempt);
        assert!(
            p.last_error.as_deref().unwrap().contains("unreachable"),
            "{:?}",
            p.last_error
        );
        // Nothing is lost: the old secret is still known, so revocation can finish later.
        assert!(stores.password(&key, 1).is_some());
        // Next attempt at capped exponential backoff.
        let wait = p.next_attempt_at.unwrap().as_second() - clock.func()().as_second();
        assert!(wait <= 300, "capped at 5 minutes: {wait}");
        clock.advance(Duration::from_secs(wait.max(0) as u64 + 1));
    }
    // After 30 minutes of failures the revocation reports itself stuck (and keeps trying).
    clock.advance(Duration::from_secs(31 * 60));
    engine
        .reconcile(&ctx, &mut progress, &obs(Some("r")), stores.stores())
        .await
        .unwrap();
    assert!(progress.revocation_stuck(clock.func()()).is_some());

    server.resume().await;
    clock.advance(Duration::from_secs(301));
    let out = engine
        .reconcile(&ctx, &mut progress, &obs(Some("r")), stores.stores())
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
        "{out:?}"
    );
    assert_eq!(progress.versions.len(), 1);
    assert!(
        !Db::Pg(&server).can_login(&v1.credential_id, &pw1).await,
        "revoked once the database returned"
    );
    assert!(progress.revocation_stuck(clock.func()()).is_none());
}

#[tokio::test]
async fn database_down_during_issue_delays_the_rotation_and_loses_nothing() {
    let mut server = PostgresServer::start().await;
    let key = lease_key("issue-outage");
    let db = Db::Pg(&server);
    let ctx = context(
        key.clone(),
        db.kind(),
        db.backend(2),
        db.host(),
        db.port(),
        db.database(),
        policy(Strategy::Dynamic, Duration::ZERO),
        Privileges::default(),
    );
    let stores = MemoryStores::default();
    let engine = Engine::new();
    let mut progress = stores.load(&key);
    engine
        .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap();
    server.stop().await;
    let r = engine
        .reconcile(&ctx, &mut progress, &obs(Some("r")), stores.stores())
        .await;
    assert!(
        matches!(r, Err(EngineError::Backend { step: "issue", .. })),
        "{r:?}"
    );
    assert_eq!(progress.current().unwrap().version, 1, "v1 stays current");
    server.resume().await;
    let mut progress = stores.load(&key);
    engine
        .reconcile(&ctx, &mut progress, &obs(Some("r")), stores.stores())
        .await
        .unwrap();
    assert_eq!(progress.current().unwrap().version, 2);
    assert_eq!(progress.versions.len(), 1);
}

#[tokio::test]
async fn hundred_leases_rotate_concurrently_within_the_target_limit() {
    let s = PostgresServer::shared().await;
    let db = Db::Pg(s);
    let backend = db.backend(4);
    let stores = Arc::new(MemoryStores::default());
    let engine = Engine::new();
    let keys: Vec<_> = (0..100).map(|_| lease_key("many")).collect();
    let run = |request: Option<&'static str>| {
        futures::future::join_all(keys.iter().map(|key| {
            let ctx = context(
                key.clone(),
                db.kind(),
                backend.clone(),
                db.host(),
                db.port(),
                db.database(),
                policy(Strategy::Dynamic, Duration::ZERO),
                Privileges::default(),
            );
            let stores = stores.clone();
            let engine = engine.clone();
            async move {
                let mut p = stores.load(&ctx.key);
                engine
                    .reconcile(&ctx, &mut p, &obs(request), stores.stores())
                    .await
                    .unwrap();
                p
            }
        }))
    };
    let first = run(None).await;
    assert!(
        first
            .iter()
            .all(|p| p.current().map(|c| c.version) == Some(1))
    );
    let second = run(Some("all")).await;
    let mut live = BTreeSet::new();
    for p in &second {
        assert_eq!(p.versions.len(), 1);
        assert_eq!(p.current().unwrap().version, 2);
        live.insert(p.current().unwrap().credential_id.clone());
    }
    assert!(
        engine.limiter().peak(&backend.target_key()) <= 4,
        "limit exceeded: {}",
        engine.limiter().peak(&backend.target_key())
    );
    // No orphans: every leasehold user of these leases is a current one.
    for key in &keys {
        let prefix = format!("lh_{}", &key.uid[..12]);
        for user in backend.list_users(&prefix).await.unwrap() {
            assert!(live.contains(&user.0), "orphaned user {user}");
        }
    }
}
