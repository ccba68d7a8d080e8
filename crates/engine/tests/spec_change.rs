//! Versions are revoked (and resumed) the way and where they were issued, whatever the
//! policy and spec say now: strategy changes, new username templates, a new database.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::db::Db;
use common::{KnownTargets, MemoryStores, TestClock, context, lease_key, naming, obs, policy};
use leasehold_backends::CredentialId;
use leasehold_core::rotation::{RotationOutcome, VersionState};
use leasehold_core::{Strategy, Target};
use leasehold_engine::engine::FaultPoint;
use leasehold_engine::{Engine, LeaseContext, NamingRule, Outcome};
use leasehold_testkit::PostgresServer;

fn ctx_for(db: Db<'_>, key: &leasehold_engine::LeaseKey, strategy: Strategy) -> LeaseContext {
    context(
        key.clone(),
        db.kind(),
        db.backend(2),
        db.host(),
        db.port(),
        db.database(),
        policy(strategy, Duration::ZERO),
        db.minimal_privileges(),
    )
}

fn target_of(db: Db<'_>) -> Target {
    Target {
        kind: "postgres".into(),
        host: db.host().into(),
        port: db.port(),
        database: db.database().into(),
        account_host: None,
    }
}

async fn role_exists(s: &PostgresServer, name: &str) -> bool {
    s.admin_client()
        .await
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
        .await
        .unwrap()
        .is_some()
}

/// A lease that is not touched by anything the other lease does.
async fn bystander(db: Db<'_>) -> (String, String) {
    let key = lease_key("bystander");
    let ctx = ctx_for(db, &key, Strategy::Dynamic);
    let stores = MemoryStores::default();
    let mut progress = stores.load(&key);
    Engine::new()
        .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap();
    let user = progress.current().unwrap().credential_id.clone();
    (user, stores.password(&key, 1).unwrap())
}

#[tokio::test]
async fn dynamic_to_in_place_drops_the_dynamic_user_and_touches_nothing_else() {
    let s = PostgresServer::shared().await;
    let db = Db::Pg(s);
    let (other_user, other_pw) = bystander(db).await;
    let key = lease_key("to-inplace");
    let mut ctx = ctx_for(db, &key, Strategy::Dynamic);
    let stores = MemoryStores::default();
    let engine = Engine::new();
    let mut progress = stores.load(&key);
    engine
        .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap();
    let v1 = progress.current().unwrap().clone();
    let pw1 = stores.password(&key, 1).unwrap();
    assert_eq!(
        v1.issued_under.as_ref().map(|u| u.strategy),
        Some(Strategy::Dynamic)
    );

    // The policy changes to InPlace: the lease moves to its InPlace user at once (no
    // request needed) and v1's user is dropped, as a Dynamic user is.
    ctx.policy = policy(Strategy::InPlace, Duration::ZERO);
    ctx.naming = naming(Strategy::InPlace, &key, db.kind());
    db.create_in_place_user(&ctx).await;
    let out = engine
        .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap();
    assert!(matches!(out, Outcome::Wait { .. }), "{out:?}");
    let v2 = progress.current().unwrap().clone();
    assert_eq!(v2.version, 2, "{progress:?}");
    assert_ne!(v2.credential_id, v1.credential_id);
    assert_eq!(progress.versions.len(), 1, "{:?}", progress.versions);
    assert!(
        db.can_login(&v2.credential_id, &stores.password(&key, 2).unwrap())
            .await
    );
    assert!(!db.can_login(&v1.credential_id, &pw1).await, "v1 revoked");
    assert!(
        !role_exists(s, &v1.credential_id).await,
        "v1's user dropped"
    );
    assert!(
        db.can_login(&other_user, &other_pw).await,
        "other leases untouched"
    );

    // Deleting the lease leaves the InPlace user (leasehold did not create it as a
    // version user) and still touches nothing else.
    let deleting = leasehold_core::rotation::Observations {
        deleting: true,
        ..obs(None)
    };
    let out = engine
        .reconcile(&ctx, &mut progress, &deleting, stores.stores())
        .await
        .unwrap();
    assert_eq!(out, Outcome::Finished, "progress: {progress:?}");
    assert!(role_exists(s, &v2.credential_id).await);
    assert!(db.can_login(&other_user, &other_pw).await);
}

#[tokio::test]
async fn in_place_to_dynamic_never_drops_the_in_place_user() {
    let s = PostgresServer::shared().await;
    let db = Db::Pg(s);
    let (other_user, other_pw) = bystander(db).await;
    let key = lease_key("to-dynamic");
    let mut ctx = ctx_for(db, &key, Strategy::InPlace);
    db.create_in_place_user(&ctx).await;
    let stores = MemoryStores::default();
    let engine = Engine::new();
    let mut progress = stores.load(&key);
    engine
        .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap();
    let v1 = progress.current().unwrap().clone();

    ctx.policy = policy(Strategy::Dynamic, Duration::ZERO);
    ctx.naming = naming(Strategy::Dynamic, &key, db.kind());
    engine
        .reconcile(&ctx, &mut progress, &obs(Some("r")), stores.stores())
        .await
        .unwrap();
    let v2 = progress.current().unwrap().clone();
    assert_eq!(v2.version, 2);
    assert!(v2.credential_id.starts_with("lh_"), "{}", v2.credential_id);
    assert_eq!(progress.versions.len(), 1, "{:?}", progress.versions);
    assert!(
        role_exists(s, &v1.credential_id).await,
        "the InPlace user is not a version user: never dropped"
    );
    assert!(
        db.can_login(&v2.credential_id, &stores.password(&key, 2).unwrap())
            .await
    );
    assert!(db.can_login(&other_user, &other_pw).await);
}

#[tokio::test]
async fn a_resumed_issue_keeps_the_recorded_name_after_a_template_change() {
    let s = PostgresServer::shared().await;
    let db = Db::Pg(s);
    let key = lease_key("template");
    let mut ctx = ctx_for(db, &key, Strategy::Dynamic);
    let stores = MemoryStores::default();
    let mut progress = stores.load(&key);
    Engine::new()
        .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap();
    // v2 is created on the backend, then the process dies before `Issued` is recorded.
    let armed = Arc::new(AtomicBool::new(true));
    let hook = armed.clone();
    let crashing = Engine::new().with_fault_hook(Arc::new(move |p| {
        if p == FaultPoint::AfterIssue && hook.swap(false, Ordering::SeqCst) {
            Err("crash".into())
        } else {
            Ok(())
        }
    }));
    let _ = crashing
        .reconcile(&ctx, &mut progress, &obs(Some("r")), stores.stores())
        .await;
    let recorded = stores.load(&key).version(2).unwrap().clone();
    assert_eq!(recorded.state, VersionState::Issuing);

    // The template changes before the restart.
    ctx.naming = NamingRule::Dynamic {
        template: "lh_{{uid}}_n{{version}}".into(),
        max_len: 63,
    };
    let mut progress = stores.load(&key);
    Engine::new()
        .reconcile(&ctx, &mut progress, &obs(Some("r")), stores.stores())
        .await
        .unwrap();
    let v2 = progress.current().unwrap().clone();
    assert_eq!(v2.version, 2);
    assert_eq!(
        v2.credential_id, recorded.credential_id,
        "resumed under its recorded name"
    );
    assert_eq!(progress.versions.len(), 1);
    let new_name = ctx.naming.credential_id(&key, 2, None).unwrap().0;
    assert!(
        !role_exists(s, &new_name).await,
        "nothing issued under the new name"
    );

    // The next rotation uses the new template; the old-template user is dropped.
    Engine::new()
        .reconcile(&ctx, &mut progress, &obs(Some("r2")), stores.stores())
        .await
        .unwrap();
    let v3 = progress.current().unwrap().clone();
    assert!(v3.credential_id.ends_with("_n3"), "{}", v3.credential_id);
    assert!(!role_exists(s, &v2.credential_id).await);
}

#[tokio::test]
async fn a_new_database_server_revokes_earlier_versions_on_the_old_one() {
    let old = PostgresServer::shared().await;
    let new = PostgresServer::start().await;
    let (old_db, new_db) = (Db::Pg(old), Db::Pg(&new));
    let (other_user, other_pw) = bystander(old_db).await;
    let key = lease_key("move");
    let clock = TestClock::new();
    let engine = Engine::new().with_clock(clock.func());
    let stores = MemoryStores::default();
    let old_ctx = ctx_for(old_db, &key, Strategy::Dynamic);
    let mut progress = stores.load(&key);
    engine
        .reconcile(&old_ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap();
    let v1 = progress.current().unwrap().clone();
    let pw1 = stores.password(&key, 1).unwrap();
    assert_eq!(v1.target(), Some(&target_of(old_db)));
    // v2 is issued on the old server, and the process dies before it is verified.
    let armed = Arc::new(AtomicBool::new(true));
    let hook = armed.clone();
    let crashing = Engine::new()
        .with_clock(clock.func())
        .with_fault_hook(Arc::new(move |p| {
            if p == FaultPoint::BeforeVerify && hook.swap(false, Ordering::SeqCst) {
                Err("crash".into())
            } else {
                Ok(())
            }
        }));
    let _ = crashing
        .reconcile(&old_ctx, &mut progress, &obs(Some("r")), stores.stores())
        .await;
    let mut progress = stores.load(&key);
    let v2 = progress.version(2).unwrap().clone();
    let pw2 = stores.password(&key, 2).unwrap();
    assert_eq!(v2.state, VersionState::Issued);
    assert!(old_db.can_login(&v2.credential_id, &pw2).await);

    // The lease now points at another server.
    let mut ctx = ctx_for(new_db, &key, Strategy::Dynamic);
    let targets = KnownTargets::default();
    targets
        .0
        .lock()
        .unwrap()
        .push((target_of(old_db), old_ctx.backend.clone()));
    ctx.previous_targets = Some(Arc::new(targets));
    engine
        .reconcile(&ctx, &mut progress, &obs(Some("r")), stores.stores())
        .await
        .unwrap();
    // v2 belonged to the old server: revoked there, never promoted.
    assert!(progress.version(2).is_none(), "{:?}", progress.versions);
    assert!(
        !old_db.can_login(&v2.credential_id, &pw2).await,
        "v2 revoked on the old server"
    );
    let failure = progress.history.iter().find(|h| h.version == 2).unwrap();
    assert_eq!(failure.outcome, RotationOutcome::IssueFailed);
    assert_eq!(
        progress.current().unwrap().version,
        1,
        "v1 current until replaced"
    );

    // After the retry backoff a version is issued on the new server and v1 is revoked on
    // the old one.
    clock.advance(Duration::from_secs(60));
    engine
        .reconcile(&ctx, &mut progress, &obs(Some("r")), stores.stores())
        .await
        .unwrap();
    let v3 = progress.current().unwrap().clone();
    assert_eq!(v3.version, 3, "{progress:?}");
    assert_eq!(v3.target(), Some(&target_of(new_db)));
    assert_eq!(progress.versions.len(), 1, "{:?}", progress.versions);
    assert!(
        new_db
            .can_login(&v3.credential_id, &stores.password(&key, 3).unwrap())
            .await
    );
    assert!(
        !old_db.can_login(&v1.credential_id, &pw1).await,
        "v1 revoked on the old server"
    );
    assert!(!role_exists(old, &v1.credential_id).await);
    let prefix = format!("lh_{}", &key.uid[..12]);
    assert!(
        ctx.backend.list_users(&prefix).await.unwrap()
            == vec![CredentialId(v3.credential_id.clone())],
        "only v3 on the new server"
    );
    assert!(
        old_ctx
            .backend
            .list_users(&prefix)
            .await
            .unwrap()
            .is_empty(),
        "nothing left on the old server"
    );
    assert!(
        old_db.can_login(&other_user, &other_pw).await,
        "other leases untouched"
    );
}

#[tokio::test]
async fn deleting_after_a_strategy_and_server_change_drops_the_user_where_it_was_issued() {
    let old = PostgresServer::shared().await;
    let new = PostgresServer::start().await;
    let (old_db, new_db) = (Db::Pg(old), Db::Pg(&new));
    let (other_user, other_pw) = bystander(old_db).await;
    let key = lease_key("delete-moved");
    let stores = MemoryStores::default();
    let engine = Engine::new();
    let old_ctx = ctx_for(old_db, &key, Strategy::Dynamic);
    let mut progress = stores.load(&key);
    engine
        .reconcile(&old_ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap();
    let v1 = progress.current().unwrap().clone();
    let pw1 = stores.password(&key, 1).unwrap();

    // Policy now InPlace, lease now on another server, and the lease is deleted before
    // anything rotated.
    let mut ctx = ctx_for(new_db, &key, Strategy::InPlace);
    let targets = KnownTargets::default();
    targets
        .0
        .lock()
        .unwrap()
        .push((target_of(old_db), old_ctx.backend.clone()));
    ctx.previous_targets = Some(Arc::new(targets));
    let deleting = leasehold_core::rotation::Observations {
        deleting: true,
        ..obs(None)
    };
    let out = engine
        .reconcile(&ctx, &mut progress, &deleting, stores.stores())
        .await
        .unwrap();
    assert_eq!(out, Outcome::Finished, "progress: {progress:?}");
    assert!(!old_db.can_login(&v1.credential_id, &pw1).await);
    assert!(
        !role_exists(old, &v1.credential_id).await,
        "dropped on the old server"
    );
    assert!(
        old_db.can_login(&other_user, &other_pw).await,
        "other leases untouched"
    );
}
