//! One database user never serves two leases: a lease whose names collide with another's
//! is refused before it touches the database.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::db::Db;
use common::{MemoryStores, context, deleting, lease_key, obs, policy};
use leasehold_core::Strategy;
use leasehold_engine::local::{LocalOptions, LocalRunner, LocalState, status_rows};
use leasehold_engine::{Engine, EngineError, NamingRule};
use leasehold_testkit::{MariaDbServer, PostgresServer};
use secrecy::ExposeSecret;

async fn a_lease_never_issues_a_user_another_lease_records(db: Db<'_>) {
    let (a, b) = (lease_key("first"), lease_key("second"));
    let base = format!("app_{}", &a.uid[..10]);
    let ctx = |key: &leasehold_engine::LeaseKey| {
        let mut c = context(
            key.clone(),
            db.kind(),
            db.backend(2),
            db.host(),
            db.port(),
            db.database(),
            policy(Strategy::AlternatingUsers, Duration::ZERO),
            db.minimal_privileges(),
        );
        // Both leases name the same user.
        c.naming = NamingRule::Alternating { base: base.clone() };
        c
    };
    let (ctx_a, ctx_b) = (ctx(&a), ctx(&b));
    let stores = MemoryStores::default();
    let engine = Engine::new();
    let mut pa = stores.load(&a);
    engine
        .reconcile(&ctx_a, &mut pa, &obs(None), stores.stores())
        .await
        .unwrap();
    let user = pa.current().unwrap().credential_id.clone();
    let pw = stores.password(&a, 1).unwrap();

    let check_refused = |r: Result<_, EngineError>, pb: &leasehold_core::Progress| {
        match r {
            Err(EngineError::UsernameTaken { user: u, owner, .. }) => {
                assert_eq!(u, user);
                assert_eq!(owner, a.to_string());
            }
            other => panic!("expected UsernameTaken, got {other:?}"),
        }
        assert!(
            pb.versions.is_empty(),
            "nothing recorded: {:?}",
            pb.versions
        );
        assert_eq!(
            EngineError::UsernameTaken {
                user: String::new(),
                server: String::new(),
                owner: String::new()
            }
            .kind(),
            "invalid"
        );
    };
    let mut pb = stores.load(&b);
    let r = engine
        .reconcile(&ctx_b, &mut pb, &obs(None), stores.stores())
        .await;
    check_refused(r, &pb);
    assert!(stores.password(&b, 1).is_none(), "no secret stored for it");
    assert!(
        db.can_login(&user, &pw).await,
        "the first lease keeps its user"
    );

    // A restarted engine seeded with what is recorded refuses it too.
    let restarted = Engine::new();
    restarted
        .claims()
        .record_progress(&a, &stores.load(&a), &ctx_a.target());
    let mut pb = stores.load(&b);
    let r = restarted
        .reconcile(&ctx_b, &mut pb, &obs(None), stores.stores())
        .await;
    check_refused(r, &pb);
    assert!(db.can_login(&user, &pw).await);

    // Once the first lease is gone (every version revoked), the name is free.
    let mut pa = stores.load(&a);
    restarted
        .reconcile(&ctx_a, &mut pa, &deleting(), stores.stores())
        .await
        .unwrap();
    let mut pb = stores.load(&b);
    restarted
        .reconcile(&ctx_b, &mut pb, &obs(None), stores.stores())
        .await
        .unwrap();
    assert_eq!(pb.current().unwrap().credential_id, user);
}

#[tokio::test]
async fn postgres_a_lease_never_issues_a_user_another_lease_records() {
    a_lease_never_issues_a_user_another_lease_records(Db::Pg(PostgresServer::shared().await)).await;
}

#[tokio::test]
async fn mariadb_a_lease_never_issues_a_user_another_lease_records() {
    a_lease_never_issues_a_user_another_lease_records(Db::Maria(MariaDbServer::shared().await))
        .await;
}

#[tokio::test]
async fn local_mode_refuses_a_second_lease_on_the_same_user_across_restarts() {
    let server = PostgresServer::shared().await;
    let tmp = tempfile::tempdir().unwrap();
    let mdir = tmp.path().join("m");
    std::fs::create_dir_all(&mdir).unwrap();
    let user = format!("shared_{}", &lease_key("u").uid[..8]);
    let mut yaml = format!(
        "apiVersion: leasehold.dev/v1alpha1
kind: RotationPolicy
metadata: {{name: p}}
spec:
  strategy: AlternatingUsers
  ttl: 1h
  revoke: {{gracePeriod: 0s, maxWait: 0s, waitForConsumers: false}}
---
apiVersion: v1
kind: Secret
metadata: {{name: admin}}
stringData: {{username: {}, password: {}}}
",
        server.admin_user(),
        server.admin_password().expose_secret()
    );
    for name in ["one", "two"] {
        yaml.push_str(&format!(
            "---
apiVersion: leasehold.dev/v1alpha1
kind: SecretLease
metadata: {{name: {name}}}
spec:
  policyRef: {{name: p}}
  postgres:
    host: {}
    port: {}
    database: {}
    username: {user}
    adminSecretRef: {{name: admin}}
    tls: {{mode: Disable}}
",
            server.host(),
            server.port(),
            server.database()
        ));
    }
    std::fs::write(mdir.join("all.yaml"), yaml).unwrap();
    let options = LocalOptions {
        manifests: mdir,
        state: tmp.path().join("state.json"),
        output: tmp.path().join("out"),
        keyring: test_keyring(),
    };
    for restart in 0..2 {
        let runner = LocalRunner::new(options.clone(), Engine::new()).unwrap();
        let report = runner.pass().await.unwrap();
        assert_eq!(
            report.errors.len(),
            1,
            "restart {restart}: {:?}",
            report.errors
        );
        let (loser, error) = &report.errors[0];
        assert!(error.contains("belongs to lease"), "{error}");
        let winner = if loser == "default/one" { "two" } else { "one" };
        let dir = options.output.join("default").join(winner);
        let username = std::fs::read_to_string(dir.join("username")).unwrap();
        let password = std::fs::read_to_string(dir.join("password")).unwrap();
        assert!(username.starts_with(&user));
        assert!(
            server.connect_as(&username, &password).await.is_ok(),
            "restart {restart}: the winner's credential works"
        );
        let state = LocalState::load(&options.state).unwrap();
        assert!(state.leases[loser].progress.versions.is_empty());
        let rows = status_rows(&state, jiff::Timestamp::now());
        let row = rows.iter().find(|r| &r.lease == loser).unwrap();
        assert!(
            row.message
                .as_deref()
                .unwrap_or("")
                .contains("belongs to lease"),
            "{row:?}"
        );
    }
}

/// A keyring with a fresh local key: every test run seals what the state file keeps.
fn test_keyring() -> std::sync::Arc<leasehold_envelope::Keyring> {
    std::sync::Arc::new(leasehold_envelope::Keyring::new(
        std::sync::Arc::new(leasehold_envelope::LocalKey::generate().unwrap()),
        vec![],
        leasehold_envelope::KeyringSettings::default(),
    ))
}
