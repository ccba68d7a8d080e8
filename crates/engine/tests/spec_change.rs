//! Versions are revoked (and resumed) the way and where they were issued, whatever the
//! policy and spec say now: strategy changes, new username templates, a new database
//! server, a new MySQL account host. Each runs on PostgreSQL and MariaDB.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::db::Db;
use common::{
    KnownTargets, MemoryStores, TestClock, crashing_once_at, deleting, issue_first_version,
    lease_key, naming, obs, policy,
};
use leasehold_backends::CredentialId;
use leasehold_core::rotation::{RotationOutcome, VersionState};
use leasehold_core::{Strategy, Target};
use leasehold_engine::engine::FaultPoint;
use leasehold_engine::{Engine, LeaseContext, NamingRule, Outcome};
use leasehold_testkit::{MariaDbServer, PostgresServer};
use mysql_async::prelude::Queryable;

fn target_of(db: Db<'_>) -> Target {
    Target {
        kind: db.kind().scheme().into(),
        host: db.host().into(),
        port: db.port(),
        database: db.database().into(),
        account_host: None,
    }
}

/// A lease that is not touched by anything the other lease does.
async fn bystander(db: Db<'_>) -> (String, String) {
    let key = lease_key("bystander");
    let ctx = db.lease_context(&key, Strategy::Dynamic);
    let stores = MemoryStores::default();
    let (_, first, password) = issue_first_version(&Engine::new(), &ctx, &stores).await;
    (first.credential_id, password)
}

async fn dynamic_to_in_place_drops_the_dynamic_user_and_touches_nothing_else(db: Db<'_>) {
    let (other_user, other_pw) = bystander(db).await;
    let key = lease_key("to-inplace");
    let mut ctx = db.lease_context(&key, Strategy::Dynamic);
    let stores = MemoryStores::default();
    let engine = Engine::new();
    let (mut progress, v1, pw1) = issue_first_version(&engine, &ctx, &stores).await;
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
        !db.user_exists(&v1.credential_id).await,
        "v1's user dropped"
    );
    assert!(
        db.can_login(&other_user, &other_pw).await,
        "other leases untouched"
    );

    // Deleting the lease leaves the InPlace user (leasehold did not create it as a
    // version user) and still touches nothing else.
    let out = engine
        .reconcile(&ctx, &mut progress, &deleting(), stores.stores())
        .await
        .unwrap();
    assert_eq!(out, Outcome::Finished, "progress: {progress:?}");
    assert!(db.user_exists(&v2.credential_id).await);
    assert!(db.can_login(&other_user, &other_pw).await);
}

#[tokio::test]
async fn postgres_dynamic_to_in_place_drops_the_dynamic_user_and_touches_nothing_else() {
    dynamic_to_in_place_drops_the_dynamic_user_and_touches_nothing_else(Db::Pg(
        PostgresServer::shared().await,
    ))
    .await;
}

#[tokio::test]
async fn mariadb_dynamic_to_in_place_drops_the_dynamic_user_and_touches_nothing_else() {
    dynamic_to_in_place_drops_the_dynamic_user_and_touches_nothing_else(Db::Maria(
        MariaDbServer::shared().await,
    ))
    .await;
}

/// The InPlace user (the DBA's) after leasehold's last version on it was revoked: the
/// password leasehold handed out (`old_pw`) no longer logs in, and the user is neither
/// dropped nor locked: a password its DBA sets logs in.
async fn assert_handed_back_scrambled(db: Db<'_>, user: &str, old_pw: &str) {
    assert!(
        !db.can_login(user, old_pw).await,
        "the password leasehold handed out no longer logs in"
    );
    assert!(
        db.user_exists(user).await,
        "the InPlace user is not dropped"
    );
    let dba_pw = leasehold_testkit::random_alphanumeric(24);
    db.set_password(user, &dba_pw).await;
    assert!(
        db.can_login(user, &dba_pw).await,
        "not locked: a password its DBA sets logs in"
    );
}

async fn in_place_to_dynamic_scrambles_but_never_drops_the_in_place_user(db: Db<'_>) {
    let (other_user, other_pw) = bystander(db).await;
    let key = lease_key("to-dynamic");
    let mut ctx = db.lease_context(&key, Strategy::InPlace);
    db.create_in_place_user(&ctx).await;
    let stores = MemoryStores::default();
    let engine = Engine::new();
    let (mut progress, v1, pw1) = issue_first_version(&engine, &ctx, &stores).await;
    assert!(db.can_login(&v1.credential_id, &pw1).await);

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
        db.can_login(&v2.credential_id, &stores.password(&key, 2).unwrap())
            .await
    );
    assert_handed_back_scrambled(db, &v1.credential_id, &pw1).await;
    assert!(db.can_login(&other_user, &other_pw).await);
}

#[tokio::test]
async fn postgres_in_place_to_dynamic_scrambles_but_never_drops_the_in_place_user() {
    in_place_to_dynamic_scrambles_but_never_drops_the_in_place_user(Db::Pg(
        PostgresServer::shared().await,
    ))
    .await;
}

#[tokio::test]
async fn mariadb_in_place_to_dynamic_scrambles_but_never_drops_the_in_place_user() {
    in_place_to_dynamic_scrambles_but_never_drops_the_in_place_user(Db::Maria(
        MariaDbServer::shared().await,
    ))
    .await;
}

async fn a_new_in_place_username_scrambles_the_old_users_password(db: Db<'_>) {
    let key = lease_key("rename");
    let mut ctx = db.lease_context(&key, Strategy::InPlace);
    // Both users exist, created by their DBA; the lease names the first.
    let user_a = format!("app_{}_a", &key.uid[..10]);
    let user_b = format!("app_{}_b", &key.uid[..10]);
    db.create_user(&user_a).await;
    db.create_user(&user_b).await;
    ctx.naming = NamingRule::InPlace {
        user: user_a.clone(),
    };
    let stores = MemoryStores::default();
    let engine = Engine::new();
    let (mut progress, _, pw1) = issue_first_version(&engine, &ctx, &stores).await;
    assert_eq!(progress.current().unwrap().credential_id, user_a);
    assert!(db.can_login(&user_a, &pw1).await);

    // The lease's username changes to the second user.
    ctx.naming = NamingRule::InPlace {
        user: user_b.clone(),
    };
    engine
        .reconcile(&ctx, &mut progress, &obs(Some("r")), stores.stores())
        .await
        .unwrap();
    let v2 = progress.current().unwrap().clone();
    assert_eq!(
        (v2.version, v2.credential_id.as_str()),
        (2, user_b.as_str())
    );
    assert_eq!(progress.versions.len(), 1, "{:?}", progress.versions);
    assert!(
        db.can_login(&user_b, &stores.password(&key, 2).unwrap())
            .await
    );
    assert_handed_back_scrambled(db, &user_a, &pw1).await;
}

#[tokio::test]
async fn postgres_a_new_in_place_username_scrambles_the_old_users_password() {
    a_new_in_place_username_scrambles_the_old_users_password(Db::Pg(
        PostgresServer::shared().await,
    ))
    .await;
}

#[tokio::test]
async fn mariadb_a_new_in_place_username_scrambles_the_old_users_password() {
    a_new_in_place_username_scrambles_the_old_users_password(Db::Maria(
        MariaDbServer::shared().await,
    ))
    .await;
}

async fn a_resumed_issue_keeps_the_recorded_name_after_a_template_change(db: Db<'_>) {
    let key = lease_key("template");
    let mut ctx = db.lease_context(&key, Strategy::Dynamic);
    let stores = MemoryStores::default();
    let (mut progress, _, _) = issue_first_version(&Engine::new(), &ctx, &stores).await;
    // v2 is created on the backend, then the process dies before `Issued` is recorded.
    let crashing = crashing_once_at(Engine::new(), FaultPoint::AfterIssue);
    let _ = crashing
        .reconcile(&ctx, &mut progress, &obs(Some("r")), stores.stores())
        .await;
    let recorded = stores.load(&key).version(2).unwrap().clone();
    assert_eq!(recorded.state, VersionState::Issuing);

    // The template changes before the restart.
    let NamingRule::Dynamic { max_len, .. } = ctx.naming else {
        panic!("a Dynamic lease: {:?}", ctx.naming);
    };
    ctx.naming = NamingRule::Dynamic {
        template: "lh_{{uid}}_n{{version}}".into(),
        max_len,
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
        !db.user_exists(&new_name).await,
        "nothing issued under the new name"
    );

    // The next rotation uses the new template; the old-template user is dropped.
    Engine::new()
        .reconcile(&ctx, &mut progress, &obs(Some("r2")), stores.stores())
        .await
        .unwrap();
    let v3 = progress.current().unwrap().clone();
    assert!(v3.credential_id.ends_with("_n3"), "{}", v3.credential_id);
    assert!(!db.user_exists(&v2.credential_id).await);
}

#[tokio::test]
async fn postgres_a_resumed_issue_keeps_the_recorded_name_after_a_template_change() {
    a_resumed_issue_keeps_the_recorded_name_after_a_template_change(Db::Pg(
        PostgresServer::shared().await,
    ))
    .await;
}

#[tokio::test]
async fn mariadb_a_resumed_issue_keeps_the_recorded_name_after_a_template_change() {
    a_resumed_issue_keeps_the_recorded_name_after_a_template_change(Db::Maria(
        MariaDbServer::shared().await,
    ))
    .await;
}

async fn a_new_database_server_revokes_earlier_versions_on_the_old_one(
    old_db: Db<'_>,
    new_db: Db<'_>,
) {
    let (other_user, other_pw) = bystander(old_db).await;
    let key = lease_key("move");
    let clock = TestClock::new();
    let engine = Engine::new().with_clock(clock.func());
    let stores = MemoryStores::default();
    let old_ctx = old_db.lease_context(&key, Strategy::Dynamic);
    let (mut progress, v1, pw1) = issue_first_version(&engine, &old_ctx, &stores).await;
    assert_eq!(v1.target(), Some(&target_of(old_db)));
    // v2 is issued on the old server, and the process dies before it is verified.
    let crashing = crashing_once_at(
        Engine::new().with_clock(clock.func()),
        FaultPoint::BeforeVerify,
    );
    let _ = crashing
        .reconcile(&old_ctx, &mut progress, &obs(Some("r")), stores.stores())
        .await;
    let mut progress = stores.load(&key);
    let v2 = progress.version(2).unwrap().clone();
    let pw2 = stores.password(&key, 2).unwrap();
    assert_eq!(v2.state, VersionState::Issued);
    assert!(old_db.can_login(&v2.credential_id, &pw2).await);

    // The lease now points at another server.
    let mut ctx = new_db.lease_context(&key, Strategy::Dynamic);
    ctx.previous_targets = Some(KnownTargets::only(
        target_of(old_db),
        old_ctx.backend.clone(),
    ));
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
    assert!(!old_db.user_exists(&v1.credential_id).await);
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
async fn postgres_a_new_database_server_revokes_earlier_versions_on_the_old_one() {
    let new = PostgresServer::start().await;
    a_new_database_server_revokes_earlier_versions_on_the_old_one(
        Db::Pg(PostgresServer::shared().await),
        Db::Pg(&new),
    )
    .await;
}

#[tokio::test]
async fn mariadb_a_new_database_server_revokes_earlier_versions_on_the_old_one() {
    let new = MariaDbServer::start().await;
    a_new_database_server_revokes_earlier_versions_on_the_old_one(
        Db::Maria(MariaDbServer::shared().await),
        Db::Maria(&new),
    )
    .await;
}

async fn deleting_after_a_strategy_and_server_change_drops_the_user_where_it_was_issued(
    old_db: Db<'_>,
    new_db: Db<'_>,
) {
    let (other_user, other_pw) = bystander(old_db).await;
    let key = lease_key("delete-moved");
    let stores = MemoryStores::default();
    let engine = Engine::new();
    let old_ctx = old_db.lease_context(&key, Strategy::Dynamic);
    let (mut progress, v1, pw1) = issue_first_version(&engine, &old_ctx, &stores).await;

    // Policy now InPlace, lease now on another server, and the lease is deleted before
    // anything rotated.
    let mut ctx = new_db.lease_context(&key, Strategy::InPlace);
    ctx.previous_targets = Some(KnownTargets::only(
        target_of(old_db),
        old_ctx.backend.clone(),
    ));
    let out = engine
        .reconcile(&ctx, &mut progress, &deleting(), stores.stores())
        .await
        .unwrap();
    assert_eq!(out, Outcome::Finished, "progress: {progress:?}");
    assert!(!old_db.can_login(&v1.credential_id, &pw1).await);
    assert!(
        !old_db.user_exists(&v1.credential_id).await,
        "dropped on the old server"
    );
    assert!(
        old_db.can_login(&other_user, &other_pw).await,
        "other leases untouched"
    );
}

#[tokio::test]
async fn postgres_deleting_after_a_strategy_and_server_change_drops_the_user_where_it_was_issued() {
    let new = PostgresServer::start().await;
    deleting_after_a_strategy_and_server_change_drops_the_user_where_it_was_issued(
        Db::Pg(PostgresServer::shared().await),
        Db::Pg(&new),
    )
    .await;
}

#[tokio::test]
async fn mariadb_deleting_after_a_strategy_and_server_change_drops_the_user_where_it_was_issued() {
    let new = MariaDbServer::start().await;
    deleting_after_a_strategy_and_server_change_drops_the_user_where_it_was_issued(
        Db::Maria(MariaDbServer::shared().await),
        Db::Maria(&new),
    )
    .await;
}

/// MariaDB's account `'user'@'host'`: `None` when it does not exist, else whether it is
/// locked.
async fn mariadb_account(s: &MariaDbServer, user: &str, host: &str) -> Option<bool> {
    let mut c = s.admin_conn().await;
    let locked: Option<Option<String>> = c
        .exec_first(
            "SELECT JSON_VALUE(Priv, '$.account_locked') FROM mysql.global_priv \
             WHERE User = ? AND Host = ?",
            (user, host),
        )
        .await
        .unwrap();
    let _ = c.disconnect().await;
    // JSON `true` reads "1" (10.11) or "true".
    locked.map(|l| matches!(l.as_deref(), Some("1" | "true")))
}

/// The host the tests' accounts move to: the address the test logins come from, more
/// specific than `%`.
const NEW_ACCOUNT_HOST: &str = "127.0.0.1";

/// `ctx` with its MySQL accounts moved to [`NEW_ACCOUNT_HOST`]; versions issued before
/// are reached through `ctx`'s old backend.
fn with_new_account_host(db: Db<'_>, ctx: &LeaseContext) -> LeaseContext {
    let mut moved = ctx.clone();
    moved.backend = db.backend_for_accounts(2, Some(NEW_ACCOUNT_HOST));
    moved.account_host = Some(NEW_ACCOUNT_HOST.into());
    moved.previous_targets = Some(KnownTargets::only(ctx.target(), ctx.backend.clone()));
    moved
}

#[tokio::test]
async fn mariadb_a_new_account_host_drops_earlier_versions_on_their_old_accounts() {
    let s = MariaDbServer::shared().await;
    let db = Db::Maria(s);
    let (other_user, other_pw) = bystander(db).await;
    let key = lease_key("account-host");
    let stores = MemoryStores::default();
    let engine = Engine::new();
    let old_ctx = db.lease_context(&key, Strategy::Dynamic);
    let (mut progress, v1, pw1) = issue_first_version(&engine, &old_ctx, &stores).await;
    assert_eq!(
        mariadb_account(s, &v1.credential_id, "%").await,
        Some(false)
    );
    // An account of the same name on another host is someone else's.
    let foreign_host = "10.0.0.%";
    db.admin(&format!(
        "CREATE USER '{}'@'{foreign_host}' ACCOUNT LOCK",
        v1.credential_id
    ))
    .await;

    // `mysql.accountHost` changes: the lease moves to its new account at once.
    let ctx = with_new_account_host(db, &old_ctx);
    let out = engine
        .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap();
    assert!(matches!(out, Outcome::Wait { .. }), "{out:?}");
    let v2 = progress.current().unwrap().clone();
    let pw2 = stores.password(&key, 2).unwrap();
    assert_eq!(v2.version, 2, "{progress:?}");
    assert_eq!(v2.target(), Some(&ctx.target()));
    assert_eq!(progress.versions.len(), 1, "{:?}", progress.versions);
    assert_eq!(
        mariadb_account(s, &v2.credential_id, NEW_ACCOUNT_HOST).await,
        Some(false),
        "v2 lives on the new host's account"
    );
    assert_eq!(mariadb_account(s, &v2.credential_id, "%").await, None);
    assert!(db.can_login(&v2.credential_id, &pw2).await);
    assert_eq!(
        mariadb_account(s, &v1.credential_id, "%").await,
        None,
        "v1 dropped on its old account"
    );
    assert!(!db.can_login(&v1.credential_id, &pw1).await);
    assert_eq!(
        mariadb_account(s, &v1.credential_id, foreign_host).await,
        Some(true),
        "another host's account of the same name untouched"
    );
    assert!(
        db.can_login(&other_user, &other_pw).await,
        "other leases untouched"
    );
    let prefix = format!("lh_{}", &key.uid[..12]);
    assert_eq!(
        ctx.backend.list_users(&prefix).await.unwrap(),
        vec![CredentialId(v2.credential_id.clone())]
    );
    assert!(
        old_ctx
            .backend
            .list_users(&prefix)
            .await
            .unwrap()
            .is_empty(),
        "nothing left on the old host"
    );

    // Deleting drops v2 on its account and still touches nothing else.
    let out = engine
        .reconcile(&ctx, &mut progress, &deleting(), stores.stores())
        .await
        .unwrap();
    assert_eq!(out, Outcome::Finished, "progress: {progress:?}");
    assert_eq!(
        mariadb_account(s, &v2.credential_id, NEW_ACCOUNT_HOST).await,
        None
    );
    assert_eq!(
        mariadb_account(s, &v1.credential_id, foreign_host).await,
        Some(true)
    );
    assert!(db.can_login(&other_user, &other_pw).await);
    db.admin(&format!(
        "DROP USER '{}'@'{foreign_host}'",
        v1.credential_id
    ))
    .await;
}

#[tokio::test]
async fn mariadb_a_new_account_host_locks_the_alternating_user_on_its_old_account_only() {
    let s = MariaDbServer::shared().await;
    let db = Db::Maria(s);
    let (other_user, other_pw) = bystander(db).await;
    let key = lease_key("account-host-alt");
    let stores = MemoryStores::default();
    let engine = Engine::new();
    let old_ctx = db.lease_context(&key, Strategy::AlternatingUsers);
    let (mut progress, v1, pw1) = issue_first_version(&engine, &old_ctx, &stores).await;
    let user_a = v1.credential_id.clone();

    // The accounts move: v2 goes to the other user on the new host, v1's old account
    // is locked.
    let ctx = with_new_account_host(db, &old_ctx);
    engine
        .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap();
    let v2 = progress.current().unwrap().clone();
    assert_eq!(v2.version, 2, "{progress:?}");
    assert_ne!(v2.credential_id, user_a);
    assert_eq!(progress.versions.len(), 1, "{:?}", progress.versions);
    assert_eq!(
        mariadb_account(s, &user_a, "%").await,
        Some(true),
        "v1 locked on its old account"
    );
    assert!(!db.can_login(&user_a, &pw1).await);
    assert_eq!(
        mariadb_account(s, &v2.credential_id, NEW_ACCOUNT_HOST).await,
        Some(false)
    );
    assert_eq!(mariadb_account(s, &v2.credential_id, "%").await, None);

    // The next rotation brings the first user back, on the new host: its own account
    // there, while the old one stays locked.
    engine
        .reconcile(&ctx, &mut progress, &obs(Some("r")), stores.stores())
        .await
        .unwrap();
    let v3 = progress.current().unwrap().clone();
    assert_eq!(v3.version, 3, "{progress:?}");
    assert_eq!(v3.credential_id, user_a);
    assert_eq!(progress.versions.len(), 1, "{:?}", progress.versions);
    assert_eq!(
        mariadb_account(s, &user_a, NEW_ACCOUNT_HOST).await,
        Some(false)
    );
    assert!(
        db.can_login(&user_a, &stores.password(&key, 3).unwrap())
            .await
    );
    assert_eq!(
        mariadb_account(s, &user_a, "%").await,
        Some(true),
        "the old account stays locked"
    );
    assert_eq!(
        mariadb_account(s, &v2.credential_id, NEW_ACCOUNT_HOST).await,
        Some(true),
        "v2 locked"
    );
    assert!(db.can_login(&other_user, &other_pw).await);
}

#[tokio::test]
async fn mariadb_a_new_account_host_scrambles_the_in_place_password_on_the_old_account() {
    let s = MariaDbServer::shared().await;
    let db = Db::Maria(s);
    let key = lease_key("account-host-inplace");
    let stores = MemoryStores::default();
    let engine = Engine::new();
    let old_ctx = db.lease_context(&key, Strategy::InPlace);
    db.create_in_place_user(&old_ctx).await;
    let (mut progress, v1, pw1) = issue_first_version(&engine, &old_ctx, &stores).await;
    let user = v1.credential_id;
    assert!(db.can_login(&user, &pw1).await);

    // The DBA makes the user's account on the new host, and `mysql.accountHost` moves
    // the lease there: v2 lives on the new account, the old one gets a password nobody
    // knows.
    db.admin(&format!(
        "CREATE USER '{user}'@'{NEW_ACCOUNT_HOST}' ACCOUNT LOCK"
    ))
    .await;
    let ctx = with_new_account_host(db, &old_ctx);
    engine
        .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap();
    let v2 = progress.current().unwrap().clone();
    assert_eq!(v2.version, 2, "{progress:?}");
    assert_eq!(v2.target(), Some(&ctx.target()));
    assert_eq!(progress.versions.len(), 1, "{:?}", progress.versions);
    assert!(
        db.can_login(&user, &stores.password(&key, 2).unwrap())
            .await
    );
    assert_eq!(
        mariadb_account(s, &user, "%").await,
        Some(false),
        "the old account is kept, unlocked"
    );

    // Without the new host's account, logins reach the old one again: v1's password
    // must not work there.
    db.admin(&format!("DROP USER '{user}'@'{NEW_ACCOUNT_HOST}'"))
        .await;
    assert_handed_back_scrambled(db, &user, &pw1).await;
}
