//! Full rotations against real PostgreSQL and MariaDB, for every strategy.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::db::Db;
use common::{MemoryStores, TestClock, context, lease_key, obs, policy};
use leasehold_backends::Privileges;
use leasehold_core::Strategy;
use leasehold_core::rotation::{RevokeReason, RotationOutcome, VersionState, WaitReason};
use leasehold_engine::{Engine, NamingRule, Outcome};
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
    db.create_in_place_user(&ctx).await;
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

/// AlternatingUsers: `<base>_a` (v1) then `<base>_b` (v2) is current; a grant that can
/// never succeed is added and a rotation requested. Every attempt fails and is retried,
/// and through all of it the current user must keep logging in, while the recorded
/// state says why the rotation fails.
async fn failed_alternating_rotation_keeps_current(db: Db<'_>, bad_grant: String) {
    let key = lease_key("altfail");
    let mut ctx = context(
        key.clone(),
        db.kind(),
        db.backend(2),
        db.host(),
        db.port(),
        db.database(),
        policy(Strategy::AlternatingUsers, Duration::ZERO),
        db.minimal_privileges(),
    );
    let stores = MemoryStores::default();
    let clock = TestClock::new();
    let engine = Engine::new().with_clock(clock.func());
    let mut progress = stores.load(&key);
    engine
        .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap();
    engine
        .reconcile(&ctx, &mut progress, &obs(Some("r1")), stores.stores())
        .await
        .unwrap();
    let v2 = progress.current().unwrap().clone();
    assert_eq!(v2.version, 2);
    assert!(v2.credential_id.ends_with("_b"), "{}", v2.credential_id);
    assert_eq!(
        progress.versions.len(),
        1,
        "v1 revoked: {:?}",
        progress.versions
    );
    let pw2 = stores.password(&key, 2).unwrap();
    assert!(db.can_login(&v2.credential_id, &pw2).await);

    ctx.privileges.grants.push(bad_grant);
    for attempt in 0..4 {
        let out = engine
            .reconcile(&ctx, &mut progress, &obs(Some("r2")), stores.stores())
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
            "attempt {attempt}: {out:?}"
        );
        assert!(
            db.can_login(&v2.credential_id, &pw2).await,
            "attempt {attempt}: the current user {} was locked out by a failed rotation",
            v2.credential_id
        );
        assert!(
            ctx.backend
                .can_login(&leasehold_backends::CredentialId(v2.credential_id.clone()))
                .await
                .unwrap()
        );
        assert_eq!(progress.current().map(|c| c.version), Some(2));
        // Past the longest verification backoff: the next reconcile retries.
        clock.advance(Duration::from_secs(11 * 60));
    }
    // The failure is recorded, not a clean state.
    let saved = stores.load(&key);
    assert_eq!(saved.current().map(|c| c.version), Some(2));
    assert!(saved.verify_failures >= 4, "{}", saved.verify_failures);
    let failure = saved
        .rotation_failure()
        .expect("the failed rotation is recorded");
    assert_eq!(failure.outcome, RotationOutcome::IssueFailed);
    let reason = failure.reason.clone().unwrap_or_default();
    assert!(reason.contains("no_such_table"), "{reason}");
    // Every failed version is gone and nothing but v2 remains.
    assert_eq!(
        saved.versions.iter().map(|v| v.version).collect::<Vec<_>>(),
        vec![2],
        "{:?}",
        saved.versions
    );
}

#[tokio::test]
async fn postgres_failed_alternating_rotation_keeps_current_user() {
    let s = PostgresServer::shared().await;
    setup_pg(s).await;
    failed_alternating_rotation_keeps_current(Db::Pg(s), "SELECT ON TABLE no_such_table".into())
        .await;
}

#[tokio::test]
async fn mariadb_failed_alternating_rotation_keeps_current_user() {
    let s = MariaDbServer::shared().await;
    setup_maria(s).await;
    failed_alternating_rotation_keeps_current(
        Db::Maria(s),
        format!("SELECT ON {}.no_such_table", s.database()),
    )
    .await;
}

/// Recorded state from before the slot came from the recorded current user may hold a
/// failed or half-issued version naming the current user: the engine neither issues nor
/// revokes it on that version's behalf.
async fn versions_naming_the_current_user_never_touch_it(db: Db<'_>) {
    let key = lease_key("altguard");
    let ctx = context(
        key.clone(),
        db.kind(),
        db.backend(2),
        db.host(),
        db.port(),
        db.database(),
        policy(Strategy::AlternatingUsers, Duration::ZERO),
        db.minimal_privileges(),
    );
    let stores = MemoryStores::default();
    let clock = TestClock::new();
    let engine = Engine::new().with_clock(clock.func());
    let mut progress = stores.load(&key);
    engine
        .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap();
    let current = progress.current().unwrap().clone();
    let password = stores.password(&key, 1).unwrap();

    for (state, reason) in [
        (VersionState::Revoking, Some(RevokeReason::IssueFailed)),
        (VersionState::Issuing, None),
    ] {
        let version = progress.last_version + 1;
        let mut stale = current.clone();
        stale.version = version;
        stale.state = state;
        stale.revoke_reason = reason;
        stale.promoted_at = None;
        progress.versions.push(stale);
        progress.last_version = version;
        engine
            .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
            .await
            .unwrap();
        assert!(
            db.can_login(&current.credential_id, &password).await,
            "{state:?}: the current user was locked out"
        );
        assert_eq!(
            progress
                .versions
                .iter()
                .map(|v| v.version)
                .collect::<Vec<_>>(),
            vec![1],
            "{state:?}: {:?}",
            progress.versions
        );
        clock.advance(Duration::from_secs(11 * 60));
    }
}

#[tokio::test]
async fn postgres_versions_naming_the_current_user_never_touch_it() {
    let s = PostgresServer::shared().await;
    setup_pg(s).await;
    versions_naming_the_current_user_never_touch_it(Db::Pg(s)).await;
}

#[tokio::test]
async fn mariadb_versions_naming_the_current_user_never_touch_it() {
    let s = MariaDbServer::shared().await;
    setup_maria(s).await;
    versions_naming_the_current_user_never_touch_it(Db::Maria(s)).await;
}

/// With the admin a managed database gives (the testkit's `CREATEROLE` admin), a
/// superseded user is dropped and deleting the lease drops every user it made, even
/// users that hold grants and own objects.
#[tokio::test]
async fn postgres_deleting_a_lease_drops_its_users_with_a_createrole_admin() {
    let s = PostgresServer::shared().await;
    setup_pg(s).await;
    let db = Db::Pg(s);
    let key = lease_key("delete");
    let ctx = context(
        key.clone(),
        db.kind(),
        db.backend(2),
        db.host(),
        db.port(),
        db.database(),
        policy(Strategy::Dynamic, Duration::ZERO),
        Privileges {
            member_of: vec!["app_reader".into()],
            grants: vec![
                "SELECT ON TABLE widgets".into(),
                "CREATE ON SCHEMA public".into(),
            ],
        },
    );
    let stores = MemoryStores::default();
    let engine = Engine::new();
    let mut progress = stores.load(&key);
    engine
        .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap();
    let v1 = progress.current().unwrap().clone();
    let pw1 = stores.password(&key, 1).unwrap();
    assert!(
        db.query_ok(
            &v1.credential_id,
            &pw1,
            &format!("CREATE TABLE {}_t (x int)", v1.credential_id)
        )
        .await
    );
    engine
        .reconcile(&ctx, &mut progress, &obs(Some("r1")), stores.stores())
        .await
        .unwrap();
    assert_eq!(
        progress
            .versions
            .iter()
            .map(|v| v.version)
            .collect::<Vec<_>>(),
        vec![2],
        "v1 dropped: {:?}",
        progress.versions
    );
    let prefix = &v1.credential_id[..v1.credential_id.len() - 1];
    let users = ctx.backend.list_users(prefix).await.unwrap();
    assert_eq!(users.len(), 1, "only v2 remains: {users:?}");

    let deleting = leasehold_core::rotation::Observations {
        deleting: true,
        ..obs(Some("r1"))
    };
    let out = engine
        .reconcile(&ctx, &mut progress, &deleting, stores.stores())
        .await
        .unwrap();
    assert_eq!(out, Outcome::Finished);
    assert!(
        ctx.backend.list_users(prefix).await.unwrap().is_empty(),
        "deleting the lease leaves none of its users"
    );
}

/// InPlace on a username that does not exist: issue fails with an `invalid` error naming
/// the user (the operator waits for a change instead of retrying), no role is created,
/// nothing is left recorded; once a DBA creates the user the lease rotates it.
async fn in_place_missing_user_is_invalid_and_creates_nothing(db: Db<'_>) {
    let key = lease_key("missing");
    let ctx = context(
        key.clone(),
        db.kind(),
        db.backend(2),
        db.host(),
        db.port(),
        db.database(),
        policy(Strategy::InPlace, Duration::ZERO),
        db.minimal_privileges(),
    );
    let NamingRule::InPlace { user } = &ctx.naming else {
        unreachable!("InPlace naming")
    };
    let user = user.clone();
    assert!(!db.user_exists(&user).await);
    let stores = MemoryStores::default();
    let engine = Engine::new();
    let mut progress = stores.load(&key);
    for attempt in 1..=2 {
        let err = engine
            .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "invalid", "attempt {attempt}: {err}");
        assert!(
            err.to_string().contains(&user) && err.to_string().contains("does not exist"),
            "attempt {attempt}: the error names the user: {err}"
        );
        assert!(
            !db.user_exists(&user).await,
            "attempt {attempt}: InPlace never creates the user"
        );
        assert!(progress.current().is_none());
        assert!(
            progress.versions.is_empty(),
            "attempt {attempt}: nothing left to revoke or resume: {:?}",
            progress.versions
        );
        assert_eq!(stores.load(&key), progress, "attempt {attempt}: saved");
        assert!(stores.all_passwords().is_empty(), "no secret kept");
        let last = progress.history.last().unwrap();
        assert_eq!(last.outcome, RotationOutcome::IssueFailed);
        assert!(last.reason.as_deref().unwrap().contains(&user));
    }
    assert!(
        stores.delivered.lock().unwrap().is_empty(),
        "nothing delivered"
    );

    // The DBA creates the user: the next reconcile rotates it.
    db.create_user(&user).await;
    engine
        .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap();
    let current = progress.current().unwrap().clone();
    assert_eq!(current.credential_id, user);
    let pw = stores.password(&key, current.version).unwrap();
    assert!(db.can_login(&user, &pw).await);
}

#[tokio::test]
async fn postgres_in_place_missing_user_is_invalid() {
    let s = PostgresServer::shared().await;
    in_place_missing_user_is_invalid_and_creates_nothing(Db::Pg(s)).await;
}

#[tokio::test]
async fn mariadb_in_place_missing_user_is_invalid() {
    let s = MariaDbServer::shared().await;
    in_place_missing_user_is_invalid_and_creates_nothing(Db::Maria(s)).await;
}
