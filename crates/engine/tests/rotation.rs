//! Full rotations against real PostgreSQL and MariaDB, for every strategy.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::db::Db;
use common::{MemoryStores, TestClock, context, lease_key, obs, policy};
use leasehold_backends::Privileges;
use leasehold_core::Strategy;
use leasehold_core::rotation::{VersionState, WaitReason};
use leasehold_engine::{Engine, Outcome};
use leasehold_testkit::{MariaDbServer, PostgresServer};

/// Issue v1, rotate to v2 with a grace period, check who can log in at each stage.
async fn full_rotation(db: Db<'_>, strategy: Strategy) {
    let key = lease_key(&format!("{strategy:?}").to_lowercase());
    let grace = Duration::from_secs(600);
    let privileges = match db {
        Db::Pg(_) => Privileges {
            member_of: vec!["app_reader".into()],
            grants: vec![],
        },
        Db::Maria(_) => Privileges {
            member_of: vec![],
            grants: vec![format!("SELECT ON {}.widgets", db.database())],
        },
    };
    let ctx = context(
        key.clone(),
        db.kind(),
        db.backend(2),
        db.host(),
        db.port(),
        db.database(),
        policy(strategy, grace),
        privileges,
    );
    let stores = MemoryStores::default();
    let clock = TestClock::new();
    let engine = Engine::new().with_clock(clock.func());
    let mut progress = stores.load(&key);

    let out = engine
        .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
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
    let v1 = progress.current().unwrap().clone();
    assert_eq!(v1.version, 1);
    let pw1 = stores.password(&key, 1).unwrap();
    assert!(
        db.can_login(&v1.credential_id, &pw1).await,
        "v1 must log in after promotion"
    );
    // Grants: can read the table it was given, cannot write it, cannot read another.
    assert!(
        db.query_ok(&v1.credential_id, &pw1, "SELECT count(*) FROM widgets")
            .await,
        "grant missing"
    );
    assert!(
        !db.query_ok(&v1.credential_id, &pw1, "INSERT INTO widgets VALUES (1)")
            .await,
        "too many privileges"
    );
    assert!(
        !db.query_ok(&v1.credential_id, &pw1, "SELECT count(*) FROM secrets")
            .await,
        "too many privileges"
    );
    // Delivered with the right values.
    let delivered = stores.delivered.lock().unwrap().last().cloned().unwrap();
    assert_eq!(delivered.1, 1);
    assert_eq!(delivered.2["username"], v1.credential_id);
    assert_eq!(delivered.2["password"], pw1);

    // Rotate on request; the grace period holds revocation back.
    let out = engine
        .reconcile(&ctx, &mut progress, &obs(Some("r1")), stores.stores())
        .await
        .unwrap();
    assert!(
        matches!(
            out,
            Outcome::Wait {
                reason: WaitReason::Draining,
                ..
            }
        ),
        "{out:?}"
    );
    let v2 = progress.current().unwrap().clone();
    assert_eq!(v2.version, 2);
    let pw2 = stores.password(&key, 2).unwrap();
    assert!(
        db.can_login(&v2.credential_id, &pw2).await,
        "v2 must log in from promotion on"
    );
    assert!(
        db.query_ok(&v2.credential_id, &pw2, "SELECT count(*) FROM widgets")
            .await
    );
    match strategy {
        // The old credential keeps working until it is revoked.
        Strategy::Dynamic | Strategy::AlternatingUsers => {
            assert_ne!(v1.credential_id, v2.credential_id);
            assert!(
                db.can_login(&v1.credential_id, &pw1).await,
                "v1 must work until revoked"
            );
        }
        // Documented: InPlace replaces the password, the old one stops at once.
        Strategy::InPlace => {
            assert_eq!(v1.credential_id, v2.credential_id);
            assert!(!db.can_login(&v1.credential_id, &pw1).await);
        }
    }

    // After the grace period the old version is revoked.
    clock.advance(grace + Duration::from_secs(1));
    let out = engine
        .reconcile(&ctx, &mut progress, &obs(Some("r1")), stores.stores())
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
    assert_eq!(
        progress.versions.len(),
        1,
        "only the current version remains: {:?}",
        progress.versions
    );
    assert!(
        !db.can_login(&v1.credential_id, &pw1).await,
        "v1 must fail after revocation"
    );
    assert!(
        db.can_login(&v2.credential_id, &pw2).await,
        "v2 keeps working"
    );
    assert!(
        stores.password(&key, 1).is_none(),
        "the revoked secret is forgotten"
    );
    let users = ctx
        .backend
        .list_users(&v2.credential_id[..v2.credential_id.len() - 2])
        .await
        .unwrap();
    if strategy == Strategy::Dynamic {
        assert_eq!(users.len(), 1, "exactly one live user: {users:?}");
    }
    let history: Vec<_> = progress
        .history
        .iter()
        .map(|h| (h.version, h.revoked_at.is_some()))
        .collect();
    assert_eq!(history, vec![(1, true), (2, false)]);
}

/// Schema for the grant checks, created once per test binary (the tests run in parallel
/// against the shared server, and `IF NOT EXISTS` does not make DDL race-free).
async fn setup_pg(s: &'static PostgresServer) {
    static DONE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    DONE.get_or_init(|| create_pg_schema(s)).await;
}

async fn create_pg_schema(s: &PostgresServer) {
    Db::Pg(s)
        .admin(
            "DO $$ BEGIN
               IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app_reader') THEN CREATE ROLE app_reader NOLOGIN; END IF;
             END $$;
             CREATE TABLE IF NOT EXISTS widgets (id int);
             CREATE TABLE IF NOT EXISTS secrets (id int);
             GRANT SELECT ON widgets TO app_reader;",
        )
        .await;
}

async fn setup_maria(s: &'static MariaDbServer) {
    static DONE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    DONE.get_or_init(|| create_maria_schema(s)).await;
}

async fn create_maria_schema(s: &MariaDbServer) {
    let db = Db::Maria(s);
    db.admin("CREATE TABLE IF NOT EXISTS widgets (id int)")
        .await;
    db.admin("CREATE TABLE IF NOT EXISTS secrets (id int)")
        .await;
}

#[tokio::test]
async fn postgres_dynamic() {
    let s = PostgresServer::shared().await;
    setup_pg(s).await;
    full_rotation(Db::Pg(s), Strategy::Dynamic).await;
}

#[tokio::test]
async fn postgres_alternating_users() {
    let s = PostgresServer::shared().await;
    setup_pg(s).await;
    full_rotation(Db::Pg(s), Strategy::AlternatingUsers).await;
}

#[tokio::test]
async fn postgres_in_place() {
    let s = PostgresServer::shared().await;
    setup_pg(s).await;
    full_rotation(Db::Pg(s), Strategy::InPlace).await;
}

#[tokio::test]
async fn mariadb_dynamic() {
    let s = MariaDbServer::shared().await;
    setup_maria(s).await;
    full_rotation(Db::Maria(s), Strategy::Dynamic).await;
}

#[tokio::test]
async fn mariadb_alternating_users() {
    let s = MariaDbServer::shared().await;
    setup_maria(s).await;
    full_rotation(Db::Maria(s), Strategy::AlternatingUsers).await;
}

#[tokio::test]
async fn mariadb_in_place() {
    let s = MariaDbServer::shared().await;
    setup_maria(s).await;
    full_rotation(Db::Maria(s), Strategy::InPlace).await;
}

#[tokio::test]
async fn versions_never_share_state_across_leases() {
    // Two leases on one server rotate independently.
    let s = PostgresServer::shared().await;
    setup_pg(s).await;
    let db = Db::Pg(s);
    let stores = MemoryStores::default();
    let engine = Engine::new();
    let mut names = Vec::new();
    for _ in 0..2 {
        let key = lease_key("pair");
        let ctx = context(
            key.clone(),
            db.kind(),
            db.backend(1),
            db.host(),
            db.port(),
            db.database(),
            policy(Strategy::Dynamic, Duration::ZERO),
            Privileges::default(),
        );
        let mut p = stores.load(&key);
        engine
            .reconcile(&ctx, &mut p, &obs(None), stores.stores())
            .await
            .unwrap();
        assert_eq!(p.current().unwrap().state, VersionState::Current);
        names.push(p.current().unwrap().credential_id.clone());
    }
    assert_ne!(names[0], names[1]);
}
