//! MySQL/MariaDB backend against a real MariaDB (leasehold-testkit). Most tests share
//! one server and use names of their own; the outage test starts its own.

use std::time::{Duration, Instant};

use leasehold_backends::{
    Backend, BackendError, CredentialId, DrainSessions, IssueMode, IssueRequest, MySqlBackend,
    MySqlTarget, PasswordPolicy, Privileges, RevokeMode, RevokeOutcome, RevokeRequest, TlsMode,
    VerifyRequest, generate_password,
};
use leasehold_testkit::{MariaDbServer, unique_name};
use mysql_async::prelude::Queryable;
use secrecy::{ExposeSecret, SecretString};

fn target(db: &MariaDbServer) -> MySqlTarget {
    let mut target = MySqlTarget::new(
        db.host(),
        db.port(),
        db.database(),
        db.admin_user(),
        db.admin_password().clone(),
    );
    // Generous: tests run in parallel on a small, shared, unoptimised build.
    target.connect_timeout = Duration::from_secs(15);
    target
}

fn backend(db: &MariaDbServer) -> MySqlBackend {
    MySqlBackend::new(target(db)).expect("backend")
}

fn password() -> SecretString {
    generate_password(&PasswordPolicy::default()).expect("password")
}

fn issue(
    id: &str,
    mode: IssueMode,
    password: &SecretString,
    privileges: Privileges,
) -> IssueRequest {
    IssueRequest {
        id: CredentialId(id.to_owned()),
        mode,
        password: password.clone(),
        valid_until: None,
        privileges,
    }
}

/// Just enough to log in with the target database as default: reading it.
fn basic(database: &str) -> Privileges {
    Privileges {
        member_of: vec![],
        grants: vec![format!("SELECT ON `{database}`.*")],
    }
}

fn verify(id: &str, password: &SecretString) -> VerifyRequest {
    VerifyRequest {
        id: CredentialId(id.to_owned()),
        password: password.clone(),
        query: "SELECT 1".into(),
        timeout: Duration::from_secs(10),
    }
}

fn revoke(id: &str, mode: RevokeMode, drain: DrainSessions) -> RevokeRequest {
    RevokeRequest {
        id: CredentialId(id.to_owned()),
        mode,
        drain,
    }
}

async fn can_connect(db: &MariaDbServer, user: &str, password: &SecretString) -> bool {
    match db.connect_as(user, password.expose_secret()).await {
        Ok(conn) => {
            let _ = conn.disconnect().await;
            true
        }
        Err(_) => false,
    }
}

fn assert_secret_free(err: &BackendError, secrets: &[&str]) {
    let shown = format!("{err} {err:?}");
    for secret in secrets {
        assert!(!shown.contains(secret), "secret leaked in error: {shown}");
    }
}

/// Tables `<p>_role_t` (readable through role `<p>_reader`), `<p>_grant_t` (through
/// a direct grant) and `<p>_private_t` (by neither).
async fn fixture(db: &MariaDbServer, p: &str) -> Privileges {
    let mut admin = db.admin_conn().await;
    let d = db.database();
    for statement in [
        format!("CREATE TABLE `{d}`.{p}_role_t (x INT)"),
        format!("INSERT INTO `{d}`.{p}_role_t VALUES (1)"),
        format!("CREATE TABLE `{d}`.{p}_grant_t (x INT)"),
        format!("INSERT INTO `{d}`.{p}_grant_t VALUES (2)"),
        format!("CREATE TABLE `{d}`.{p}_private_t (x INT)"),
        format!("CREATE ROLE {p}_reader"),
        format!("GRANT SELECT ON `{d}`.{p}_role_t TO {p}_reader"),
    ] {
        admin.query_drop(statement).await.expect("fixture");
    }
    admin.disconnect().await.expect("disconnect");
    Privileges {
        member_of: vec![format!("{p}_reader")],
        grants: vec![format!("SELECT ON `{d}`.{p}_grant_t")],
    }
}

#[tokio::test]
async fn dynamic_user_lifecycle() {
    let db = MariaDbServer::shared().await;
    let b = backend(db);
    let p = unique_name("dyn_");
    let privileges = fixture(db, &p).await;
    let user = format!("{p}_u");
    let pw = password();
    let req = issue(&user, IssueMode::CreateUser, &pw, privileges);

    b.issue(&req).await.expect("issue");
    b.issue(&req).await.expect("issue twice converges");
    b.verify(&verify(&user, &pw)).await.expect("verify");
    assert!(b.can_login(&req.id).await.expect("can_login"));

    let mut conn = db
        .connect_as(&user, pw.expose_secret())
        .await
        .expect("real login");
    let via_role: Option<i32> = conn
        .query_first(format!("SELECT x FROM {p}_role_t"))
        .await
        .expect("select via default role");
    assert_eq!(via_role, Some(1));
    let via_grant: Option<i32> = conn
        .query_first(format!("SELECT x FROM {p}_grant_t"))
        .await
        .expect("select via grant");
    assert_eq!(via_grant, Some(2));
    let denied = conn
        .query_drop(format!("SELECT x FROM {p}_private_t"))
        .await;
    match denied {
        Err(mysql_async::Error::Server(e)) => assert_eq!(e.code, 1142, "{e:?}"),
        other => panic!("private table must be denied: {other:?}"),
    }
    conn.disconnect().await.expect("disconnect");

    let pw2 = password();
    b.issue(&issue(
        &user,
        IssueMode::CreateUser,
        &pw2,
        req.privileges.clone(),
    ))
    .await
    .expect("re-issue");
    assert!(
        !can_connect(db, &user, &pw).await,
        "old password must stop working"
    );
    assert!(can_connect(db, &user, &pw2).await);

    let r = revoke(&user, RevokeMode::DropUser, DrainSessions::Terminate);
    assert_eq!(b.revoke(&r).await.expect("revoke"), RevokeOutcome::Revoked);
    assert!(
        !can_connect(db, &user, &pw2).await,
        "login must fail after revoke"
    );
    assert!(!b.can_login(&req.id).await.expect("can_login"));
    assert!(b.list_users(&user).await.expect("list").is_empty());
    assert_eq!(
        b.revoke(&r).await.expect("revoke twice"),
        RevokeOutcome::Revoked
    );
    let missing = revoke(
        &unique_name("never_"),
        RevokeMode::DropUser,
        DrainSessions::Wait,
    );
    assert_eq!(
        b.revoke(&missing).await.expect("revoke missing"),
        RevokeOutcome::Revoked
    );
    b.close().await;
}

#[tokio::test]
async fn credentials_with_a_lifetime_expire_on_the_server() {
    let db = MariaDbServer::shared().await;
    let b = backend(db);
    let user = unique_name("exp_");
    let pw = password();
    let mut req = issue(&user, IssueMode::CreateUser, &pw, basic(db.database()));
    req.valid_until = Some(jiff::Timestamp::now() + std::time::Duration::from_secs(3600));
    b.issue(&req).await.expect("issue");
    // Inspection only: SHOW CREATE USER of another user needs SELECT on all of `mysql`.
    let mut admin = db.superuser_conn().await;
    let create: Option<String> = admin
        .query_first(format!("SHOW CREATE USER '{user}'@'%'"))
        .await
        .expect("show create user");
    let create = create.unwrap();
    assert!(
        create.contains("PASSWORD EXPIRE INTERVAL 1 DAY"),
        "a 1h credential dies on the server within a day even without leasehold: {create}"
    );
    b.verify(&verify(&user, &pw))
        .await
        .expect("still works now");
    b.revoke(&revoke(
        &user,
        RevokeMode::DropUser,
        DrainSessions::Terminate,
    ))
    .await
    .expect("revoke");
}

#[tokio::test]
async fn alternating_users_disable_then_reenable() {
    let db = MariaDbServer::shared().await;
    let b = backend(db);
    let p = unique_name("alt_");
    let privileges = fixture(db, &p).await;
    let user = format!("{p}_a");
    let pw = password();
    let req = issue(&user, IssueMode::SetPassword, &pw, privileges.clone());
    b.issue(&req).await.expect("issue creates the missing user");
    b.verify(&verify(&user, &pw)).await.expect("verify");

    let r = revoke(&user, RevokeMode::DisableLogin, DrainSessions::Terminate);
    assert_eq!(b.revoke(&r).await.expect("disable"), RevokeOutcome::Revoked);
    assert_eq!(
        b.revoke(&r).await.expect("disable twice"),
        RevokeOutcome::Revoked
    );
    assert!(!can_connect(db, &user, &pw).await);
    assert!(!b.can_login(&req.id).await.expect("can_login"));
    assert_eq!(
        b.list_users(&user).await.expect("list"),
        vec![req.id.clone()],
        "user kept"
    );
    assert!(matches!(
        b.verify(&verify(&user, &pw)).await,
        Err(BackendError::VerificationFailed(_))
    ));

    let pw2 = password();
    b.issue(&issue(&user, IssueMode::SetPassword, &pw2, privileges))
        .await
        .expect("re-issue unlocks");
    b.verify(&verify(&user, &pw2)).await.expect("verify again");
    let mut conn = db
        .connect_as(&user, pw2.expose_secret())
        .await
        .expect("login");
    conn.query_drop(format!("SELECT x FROM {p}_role_t"))
        .await
        .expect("grant kept");
    conn.disconnect().await.expect("disconnect");
    b.close().await;
}

#[tokio::test]
async fn in_place_revoke_does_nothing() {
    let db = MariaDbServer::shared().await;
    let b = backend(db);
    let user = unique_name("inplace_");
    let pw = password();
    b.issue(&issue(
        &user,
        IssueMode::SetPassword,
        &pw,
        basic(db.database()),
    ))
    .await
    .expect("issue");
    let r = revoke(&user, RevokeMode::Nothing, DrainSessions::Ignore);
    assert_eq!(b.revoke(&r).await.expect("revoke"), RevokeOutcome::Revoked);
    assert!(
        can_connect(db, &user, &pw).await,
        "Nothing leaves the user alone"
    );
    let pw2 = password();
    b.issue(&issue(
        &user,
        IssueMode::SetPassword,
        &pw2,
        basic(db.database()),
    ))
    .await
    .expect("rotate in place");
    assert!(!can_connect(db, &user, &pw).await);
    assert!(can_connect(db, &user, &pw2).await);
    b.close().await;
}

/// What an account is, as SHOW GRANTS and mysql.global_priv tell (inspection as the
/// superuser): its grants without the password hash, whether it is locked, and its
/// stored password.
async fn account_state(db: &MariaDbServer, user: &str, host: &str) -> (Vec<String>, bool, String) {
    let mut su = db.superuser_conn().await;
    let grants: Vec<String> = su
        .query(format!("SHOW GRANTS FOR '{user}'@'{host}'"))
        .await
        .expect("show grants");
    let grants = grants
        .into_iter()
        .map(|g| match g.find(" IDENTIFIED BY PASSWORD") {
            Some(at) => g[..at].to_owned(),
            None => g,
        })
        .collect();
    let (locked, password): (Option<String>, String) = su
        .exec_first(
            "SELECT JSON_VALUE(Priv, '$.account_locked'), \
                    COALESCE(JSON_VALUE(Priv, '$.authentication_string'), '') \
               FROM mysql.global_priv WHERE User = ? AND Host = ?",
            (user, host),
        )
        .await
        .expect("global_priv")
        .expect("the account exists");
    su.disconnect().await.expect("disconnect");
    // JSON `true` reads "1" (10.11) or "true".
    (
        grants,
        matches!(locked.as_deref(), Some("1" | "true")),
        password,
    )
}

/// An InPlace user (the DBA's) whose last password leasehold handed out: scrambling makes
/// that password stop working on the configured account and leaves the account unlocked
/// with its roles and grants, so the DBA can set a password of their own. Another host's
/// account of the same name is not touched.
#[tokio::test]
async fn scrambling_an_in_place_user_refuses_its_password_and_keeps_the_account() {
    let db = MariaDbServer::shared().await;
    let b = backend(db);
    let p = unique_name("scramble_");
    let privileges = fixture(db, &p).await;
    let user = format!("{p}_u");
    let mut admin = db.admin_conn().await;
    admin
        .query_drop(format!("CREATE USER '{user}'@'%' ACCOUNT LOCK"))
        .await
        .expect("the DBA's user");
    let twin_pw = password();
    admin
        .query_drop(format!(
            "CREATE USER '{user}'@'10.0.0.%' IDENTIFIED BY '{}'",
            twin_pw.expose_secret()
        ))
        .await
        .expect("another host's account of the same name");
    let pw = password();
    b.issue(&issue(&user, IssueMode::ExistingUser, &pw, privileges))
        .await
        .expect("rotate in place");
    let mut session = db
        .connect_as(&user, pw.expose_secret())
        .await
        .expect("a consumer's session");
    let before = account_state(db, &user, "%").await;
    assert!(!before.1, "unlocked by the issue");
    let twin_before = account_state(db, &user, "10.0.0.%").await;

    // Draining: the password is refused at once, the open session is waited for.
    let wait = revoke(&user, RevokeMode::ScramblePassword, DrainSessions::Wait);
    assert_eq!(
        b.revoke(&wait).await.expect("scramble"),
        RevokeOutcome::SessionsRemain(1)
    );
    assert!(
        !can_connect(db, &user, &pw).await,
        "the handed-out password no longer logs in"
    );
    session
        .query_drop("SELECT 1")
        .await
        .expect("existing session still alive");
    let terminate = revoke(
        &user,
        RevokeMode::ScramblePassword,
        DrainSessions::Terminate,
    );
    assert_eq!(
        b.revoke(&terminate).await.expect("terminate"),
        RevokeOutcome::Revoked
    );
    assert!(
        session.query_drop("SELECT 1").await.is_err(),
        "session terminated"
    );
    assert!(!can_connect(db, &user, &pw).await);
    assert!(matches!(
        b.verify(&verify(&user, &pw)).await,
        Err(BackendError::VerificationFailed(_))
    ));

    // Not dropped, not locked, grants and roles unchanged; only the password is new.
    let after = account_state(db, &user, "%").await;
    assert_eq!((&after.0, after.1), (&before.0, before.1));
    assert_ne!(after.2, before.2, "a new password");
    assert!(
        b.can_login(&CredentialId(user.clone()))
            .await
            .expect("can_login")
    );
    assert_eq!(
        account_state(db, &user, "10.0.0.%").await,
        twin_before,
        "another host's account untouched"
    );
    // The DBA sets a password: it logs in, with the role and the grant.
    let dba_pw = password();
    admin
        .query_drop(format!(
            "ALTER USER '{user}'@'%' IDENTIFIED BY '{}'",
            dba_pw.expose_secret()
        ))
        .await
        .expect("the DBA sets a password");
    let mut conn = db
        .connect_as(&user, dba_pw.expose_secret())
        .await
        .expect("login with the DBA's password");
    let via_role: Option<i32> = conn
        .query_first(format!("SELECT x FROM {p}_role_t"))
        .await
        .expect("default role kept");
    assert_eq!(via_role, Some(1));
    let via_grant: Option<i32> = conn
        .query_first(format!("SELECT x FROM {p}_grant_t"))
        .await
        .expect("grant kept");
    assert_eq!(via_grant, Some(2));
    assert!(
        conn.query_drop(format!("SELECT x FROM {p}_private_t"))
            .await
            .is_err(),
        "nothing granted on the way"
    );
    conn.disconnect().await.expect("disconnect");

    // A user that is gone is revoked.
    let missing = revoke(
        &unique_name("never_"),
        RevokeMode::ScramblePassword,
        DrainSessions::Wait,
    );
    assert_eq!(
        b.revoke(&missing).await.expect("scramble a missing user"),
        RevokeOutcome::Revoked
    );
    admin
        .query_drop(format!("DROP USER '{user}'@'10.0.0.%'"))
        .await
        .expect("cleanup");
    admin.disconnect().await.expect("disconnect");
    b.close().await;
}

#[tokio::test]
async fn drain_wait_then_terminate() {
    let db = MariaDbServer::shared().await;
    let b = backend(db);
    let user = unique_name("drain_");
    let pw = password();
    b.issue(&issue(
        &user,
        IssueMode::CreateUser,
        &pw,
        basic(db.database()),
    ))
    .await
    .expect("issue");
    let mut session = db
        .connect_as(&user, pw.expose_secret())
        .await
        .expect("session");

    let wait = revoke(&user, RevokeMode::DropUser, DrainSessions::Wait);
    assert_eq!(
        b.revoke(&wait).await.expect("revoke"),
        RevokeOutcome::SessionsRemain(1)
    );
    assert!(
        !can_connect(db, &user, &pw).await,
        "no new logins while draining"
    );
    session
        .query_drop("SELECT 1")
        .await
        .expect("existing session still alive");

    let terminate = revoke(&user, RevokeMode::DropUser, DrainSessions::Terminate);
    assert_eq!(
        b.revoke(&terminate).await.expect("terminate"),
        RevokeOutcome::Revoked
    );
    assert!(
        session.query_drop("SELECT 1").await.is_err(),
        "session must be dead"
    );
    assert!(b.list_users(&user).await.expect("list").is_empty());
    b.close().await;
}

#[tokio::test]
async fn verification_failures() {
    let db = MariaDbServer::shared().await;
    let b = backend(db);
    let user = unique_name("verify_");
    let pw = password();
    b.issue(&issue(
        &user,
        IssueMode::CreateUser,
        &pw,
        basic(db.database()),
    ))
    .await
    .expect("issue");
    let wrong = password();
    let err = b
        .verify(&verify(&user, &wrong))
        .await
        .expect_err("wrong password");
    assert!(
        matches!(err, BackendError::VerificationFailed(_)),
        "{err:?}"
    );
    assert_secret_free(&err, &[pw.expose_secret(), wrong.expose_secret()]);

    let mut bad_query = verify(&user, &pw);
    bad_query.query = "SELECT * FROM no_such_table".into();
    let err = b.verify(&bad_query).await.expect_err("bad query");
    assert!(
        matches!(err, BackendError::VerificationFailed(_)),
        "{err:?}"
    );

    let err = b
        .verify(&verify(&unique_name("nobody_"), &pw))
        .await
        .expect_err("no user");
    assert!(
        matches!(err, BackendError::VerificationFailed(_)),
        "{err:?}"
    );
    b.close().await;
}

#[tokio::test]
async fn invalid_requests_and_rejected_admin() {
    let db = MariaDbServer::shared().await;
    let b = backend(db);
    let user = unique_name("invalid_");
    let pw = password();
    let unknown_role = Privileges {
        member_of: vec![unique_name("no_such_role_")],
        grants: vec![],
    };
    let err = b
        .issue(&issue(&user, IssueMode::CreateUser, &pw, unknown_role))
        .await
        .expect_err("unknown role");
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
    assert_secret_free(&err, &[pw.expose_secret()]);
    // Created locked before the grants: the half-made user cannot log in.
    assert!(
        !b.can_login(&CredentialId(user.clone()))
            .await
            .expect("can_login")
    );
    assert!(!can_connect(db, &user, &pw).await);

    let bad_grant = Privileges {
        member_of: vec![],
        grants: vec!["SELEC ON *.*".into()],
    };
    let err = b
        .issue(&issue(&user, IssueMode::CreateUser, &pw, bad_grant))
        .await
        .expect_err("bad grant");
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
    assert_secret_free(&err, &[pw.expose_secret()]);

    let err = b
        .issue(&issue(
            "bad\\name",
            IssueMode::CreateUser,
            &pw,
            basic(db.database()),
        ))
        .await
        .expect_err("backslash");
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");

    let wrong_admin = SecretString::from("not-the-admin-password".to_owned());
    let mut t = target(db);
    t.admin_password = wrong_admin.clone();
    let rejected = MySqlBackend::new(t).expect("backend");
    let err = rejected.ping().await.expect_err("wrong admin password");
    assert!(matches!(err, BackendError::AdminRejected(_)), "{err:?}");
    assert_secret_free(&err, &[wrong_admin.expose_secret()]);
    assert!(!format!("{:?}", target(db)).contains(db.admin_password().expose_secret()));

    // A CA bundle without a certificate is refused up front.
    let mut tls = target(db);
    tls.tls = TlsMode::VerifyFull {
        ca_pem: "not a certificate".into(),
    };
    assert!(matches!(
        MySqlBackend::new(tls),
        Err(BackendError::Invalid(_))
    ));
    // TLS asked of a server without TLS: refused, never downgraded to plain text.
    let mut tls = target(db);
    tls.tls = TlsMode::Require;
    let tls = MySqlBackend::new(tls).expect("backend");
    let err = tls.ping().await.expect_err("no TLS on the shared server");
    assert!(
        matches!(&err, BackendError::Invalid(m) if m.contains("does not offer")),
        "{err:?}"
    );
    tls.close().await;
    b.close().await;
}

#[tokio::test]
async fn secrets_never_reach_the_server_log() {
    let db = MariaDbServer::shared().await;
    let b = backend(db);
    let user = unique_name("secret_");
    let pw1 = password();
    let pw2 = password();
    b.issue(&issue(
        &user,
        IssueMode::CreateUser,
        &pw1,
        basic(db.database()),
    ))
    .await
    .expect("issue");
    b.verify(&verify(&user, &pw1)).await.expect("verify");
    b.issue(&issue(
        &user,
        IssueMode::SetPassword,
        &pw2,
        basic(db.database()),
    ))
    .await
    .expect("rotate");
    b.verify(&verify(&user, &pw2))
        .await
        .expect("verify rotated");
    let err = b
        .verify(&verify(&user, &pw1))
        .await
        .expect_err("old password");
    assert_secret_free(&err, &[pw1.expose_secret(), pw2.expose_secret()]);
    b.revoke(&revoke(
        &user,
        RevokeMode::DropUser,
        DrainSessions::Terminate,
    ))
    .await
    .expect("revoke");

    let log = db.log_contents();
    assert!(
        log.contains(&format!(
            "ALTER USER '{user}'@'%' IDENTIFIED WITH mysql_native_password AS '*"
        )),
        "the statement is logged, with a hash"
    );
    for pw in [&pw1, &pw2] {
        assert!(
            !log.contains(pw.expose_secret()),
            "plaintext password in the general log"
        );
    }
    b.close().await;
}

#[tokio::test]
async fn list_users_by_prefix() {
    let db = MariaDbServer::shared().await;
    let b = backend(db);
    let p = unique_name("lst");
    for name in [format!("{p}_a"), format!("{p}_b"), format!("{p}xc")] {
        b.issue(&issue(
            &name,
            IssueMode::CreateUser,
            &password(),
            basic(db.database()),
        ))
        .await
        .expect("issue");
    }
    let found = b.list_users(&format!("{p}_")).await.expect("list");
    assert_eq!(
        found,
        vec![
            CredentialId(format!("{p}_a")),
            CredentialId(format!("{p}_b"))
        ]
    );
    assert_eq!(b.list_users(&p).await.expect("list").len(), 3);
    assert!(
        b.list_users("%").await.expect("list").is_empty(),
        "% is literal"
    );
    b.close().await;
}

#[tokio::test]
async fn many_concurrent_leases() {
    let db = MariaDbServer::shared().await;
    let b = std::sync::Arc::new(backend(db));
    let p = unique_name("many");
    let tasks: Vec<_> = (0..25)
        .map(|i| {
            let b = b.clone();
            let user = format!("{p}_{i}");
            tokio::spawn(async move {
                let pw = password();
                b.issue(&issue(
                    &user,
                    IssueMode::CreateUser,
                    &pw,
                    basic(db.database()),
                ))
                .await?;
                b.verify(&verify(&user, &pw)).await?;
                b.revoke(&revoke(
                    &user,
                    RevokeMode::DropUser,
                    DrainSessions::Terminate,
                ))
                .await
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(
            task.await.expect("join").expect("lease"),
            RevokeOutcome::Revoked
        );
    }
    assert!(b.list_users(&p).await.expect("list").is_empty());
}

#[tokio::test]
async fn outage_is_unreachable_then_recovers() {
    let mut db = MariaDbServer::start().await;
    let mut t = target(&db);
    t.connect_timeout = Duration::from_secs(2);
    let b = MySqlBackend::new(t).expect("backend");
    b.ping().await.expect("ping");
    let user = unique_name("outage_");
    let pw = password();
    b.issue(&issue(
        &user,
        IssueMode::CreateUser,
        &pw,
        basic(db.database()),
    ))
    .await
    .expect("issue");

    db.stop().await;
    let started = Instant::now();
    let err = b.ping().await.expect_err("server down");
    assert!(matches!(err, BackendError::Unreachable(_)), "{err:?}");
    let err = b
        .issue(&issue(
            &user,
            IssueMode::SetPassword,
            &pw,
            basic(db.database()),
        ))
        .await
        .expect_err("issue while down");
    assert!(matches!(err, BackendError::Unreachable(_)), "{err:?}");
    assert_secret_free(
        &err,
        &[pw.expose_secret(), db.admin_password().expose_secret()],
    );
    let err = b
        .verify(&verify(&user, &pw))
        .await
        .expect_err("verify while down");
    assert!(matches!(err, BackendError::Unreachable(_)), "{err:?}");
    let err = b
        .revoke(&revoke(
            &user,
            RevokeMode::DropUser,
            DrainSessions::Terminate,
        ))
        .await
        .expect_err("revoke while down");
    assert!(matches!(err, BackendError::Unreachable(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "calls must fail fast"
    );

    db.resume().await;
    b.ping().await.expect("ping after restart");
    b.verify(&verify(&user, &pw))
        .await
        .expect("verify after restart");
    assert_eq!(
        b.revoke(&revoke(
            &user,
            RevokeMode::DropUser,
            DrainSessions::Terminate
        ))
        .await
        .expect("revoke after restart"),
        RevokeOutcome::Revoked
    );
    b.close().await;
}

/// An admin with only `CREATE USER`, the app database and `SELECT` on the user tables:
/// what it cannot do is reported as a missing privilege naming what to grant, and
/// draining never proceeds blind (without `PROCESS` the admin sees no one's sessions).
#[tokio::test]
async fn a_narrower_admin_is_told_what_it_lacks() {
    let db = MariaDbServer::shared().await;
    let p = unique_name("narrow_");
    let admin_user = format!("{p}_adm");
    let admin_pw = password();
    let d = db.database();
    let mut su = db.superuser_conn().await;
    for statement in [
        format!(
            "CREATE USER '{admin_user}'@'%' IDENTIFIED BY '{}'",
            admin_pw.expose_secret()
        ),
        format!("GRANT CREATE USER ON *.* TO '{admin_user}'@'%'"),
        format!("GRANT ALL PRIVILEGES ON `{d}`.* TO '{admin_user}'@'%' WITH GRANT OPTION"),
        format!("GRANT SELECT ON mysql.user TO '{admin_user}'@'%'"),
        format!("GRANT SELECT ON mysql.global_priv TO '{admin_user}'@'%'"),
    ] {
        su.query_drop(statement).await.expect("setup");
    }
    su.disconnect().await.expect("disconnect");
    let mut t = target(db);
    t.admin_user = admin_user.clone();
    t.admin_password = admin_pw.clone();
    let b = MySqlBackend::new(t).expect("backend");
    let mut narrow = db
        .connect_as(&admin_user, admin_pw.expose_secret())
        .await
        .expect("narrow admin login");
    narrow
        .query_drop(format!("CREATE ROLE {p}_reader"))
        .await
        .expect("the admin creates a role");
    narrow.disconnect().await.expect("disconnect");

    // MariaDB: SET DEFAULT ROLE ... FOR another user needs UPDATE on `mysql`.
    let user = format!("{p}_r");
    let pw = password();
    let with_role = Privileges {
        member_of: vec![format!("{p}_reader")],
        grants: basic(d).grants,
    };
    let err = b
        .issue(&issue(&user, IssueMode::CreateUser, &pw, with_role))
        .await
        .expect_err("no UPDATE on mysql");
    assert!(matches!(err, BackendError::PermissionDenied(_)), "{err:?}");
    let shown = err.to_string();
    assert!(!shown.contains("credential rejected"), "{shown}");
    assert!(shown.contains("UPDATE on the mysql database"), "{shown}");
    assert_secret_free(&err, &[pw.expose_secret(), admin_pw.expose_secret()]);

    // Without PROCESS, draining would see none of the user's sessions: refused.
    let user = format!("{p}_u");
    b.issue(&issue(&user, IssueMode::CreateUser, &pw, basic(d)))
        .await
        .expect("issue without roles");
    assert!(
        b.can_login(&CredentialId(user.clone()))
            .await
            .expect("can_login")
    );
    let session = db
        .connect_as(&user, pw.expose_secret())
        .await
        .expect("session");
    let err = b
        .revoke(&revoke(&user, RevokeMode::DropUser, DrainSessions::Wait))
        .await
        .expect_err("cannot see sessions");
    assert!(matches!(err, BackendError::PermissionDenied(_)), "{err:?}");
    assert!(err.to_string().contains("PROCESS"), "{err}");
    assert!(
        !b.can_login(&CredentialId(user.clone()))
            .await
            .expect("can_login"),
        "locked before the sessions were looked at"
    );
    assert_eq!(
        b.revoke(&revoke(&user, RevokeMode::DropUser, DrainSessions::Ignore))
            .await
            .expect("Ignore needs no PROCESS"),
        RevokeOutcome::Revoked
    );
    assert!(b.list_users(&user).await.expect("list").is_empty());
    let _ = session.disconnect().await;
    b.close().await;
}

/// Grants are parsed and rebuilt with quoted names. Before, `#` (a MySQL comment to the
/// end of the line) passed the free-text check, so `... TO 'victim'@'%'#` granted to
/// another account and commented out leasehold's own `TO`. Now it is refused naming
/// the grant, nothing reaches the server, and the documented forms work.
#[tokio::test]
async fn grants_are_parsed_not_spliced() {
    let db = MariaDbServer::shared().await;
    let b = backend(db);
    let p = unique_name("grants_");
    let d = db.database();
    let victim = format!("{p}_victim");
    let victim_pw = password();
    let mut admin = db.admin_conn().await;
    for statement in [
        format!("CREATE TABLE `{d}`.{p}_items (x INT)"),
        format!("INSERT INTO `{d}`.{p}_items VALUES (8)"),
        format!("CREATE TABLE `{d}`.`{p}_Odd-Name` (x INT)"),
        format!("INSERT INTO `{d}`.`{p}_Odd-Name` VALUES (7)"),
        format!("CREATE TABLE `{d}`.{p}_secret (x INT)"),
        format!(
            "CREATE USER '{victim}'@'%' IDENTIFIED BY '{}'",
            victim_pw.expose_secret()
        ),
    ] {
        admin.query_drop(statement).await.expect("fixture");
    }
    admin.disconnect().await.expect("disconnect");

    let user = format!("{p}_u");
    let pw = password();
    for bad in [
        format!("SELECT ON `{d}`.*/**/TO/**/'{victim}'@'%'#"),
        format!("SELECT ON `{d}`.* TO '{victim}'@'%'"),
        format!("SELECT ON `{d}`.*; DROP USER '{victim}'@'%'"),
        format!("SELECT ON `{d}`.* -- x"),
        format!("SELECT ON '{d}'.*"),
        "SELECT ON *.*".to_owned(),
    ] {
        let privileges = Privileges {
            member_of: vec![],
            grants: vec![bad.clone()],
        };
        let err = b
            .issue(&issue(&user, IssueMode::CreateUser, &pw, privileges))
            .await
            .expect_err(&bad);
        assert!(
            matches!(&err, BackendError::Invalid(m)
                if m.contains(&format!("grant {bad:?} is not accepted"))),
            "{bad}: {err:?}"
        );
    }
    assert!(b.list_users(&user).await.expect("list").is_empty());
    // With any privilege on the database the victim could log in with it as default.
    assert!(
        !can_connect(db, &victim, &victim_pw).await,
        "the victim was granted nothing"
    );

    let privileges = Privileges {
        member_of: vec![],
        grants: vec![
            format!("select ON {d}.`{p}_Odd-Name`"),
            format!("SELECT, INSERT ON `{d}`.{p}_items"),
        ],
    };
    b.issue(&issue(&user, IssueMode::CreateUser, &pw, privileges))
        .await
        .expect("valid grants");
    let mut conn = db
        .connect_as(&user, pw.expose_secret())
        .await
        .expect("login");
    let n: Option<i32> = conn
        .query_first(format!("SELECT x FROM `{d}`.`{p}_Odd-Name`"))
        .await
        .expect("quoted table readable");
    assert_eq!(n, Some(7));
    conn.query_drop(format!("INSERT INTO `{d}`.{p}_items VALUES (9)"))
        .await
        .expect("insert granted");
    assert!(
        conn.query_drop(format!("SELECT * FROM `{d}`.{p}_secret"))
            .await
            .is_err(),
        "not granted"
    );
    let _ = conn.disconnect().await;
    b.revoke(&revoke(
        &user,
        RevokeMode::DropUser,
        DrainSessions::Terminate,
    ))
    .await
    .expect("drop");
    b.close().await;
}

/// InPlace only changes the password of an existing user: a mistyped name is refused
/// naming the user (not transient), and no account is created.
#[tokio::test]
async fn in_place_never_creates_a_user() {
    let db = MariaDbServer::shared().await;
    let b = backend(db);
    let user = unique_name("inplace_typo_");
    let pw = password();
    let err = b
        .issue(&issue(
            &user,
            IssueMode::ExistingUser,
            &pw,
            basic(db.database()),
        ))
        .await
        .expect_err("missing user");
    assert!(
        matches!(&err, BackendError::Invalid(m) if m.contains(&format!("{user:?} does not exist"))),
        "{err:?}"
    );
    assert!(!err.is_transient());
    assert_secret_free(&err, &[pw.expose_secret()]);
    assert!(b.list_users(&user).await.expect("list").is_empty());

    let mut admin = db.admin_conn().await;
    admin
        .query_drop(format!("CREATE USER '{user}'@'%' ACCOUNT LOCK"))
        .await
        .expect("the DBA creates the user");
    admin.disconnect().await.expect("disconnect");
    b.issue(&issue(
        &user,
        IssueMode::ExistingUser,
        &pw,
        basic(db.database()),
    ))
    .await
    .expect("existing user");
    assert!(can_connect(db, &user, &pw).await);
    b.close().await;
}

/// A server that refuses the login because the account's connection limit is reached
/// (1226, as 1040 too many connections) says nothing about the credential: verify is
/// `Unreachable` (retry later), never `VerificationFailed` (which revokes the new
/// credential). Once the slot frees up the same credential verifies.
#[tokio::test]
async fn exhausted_connections_are_unavailable_not_a_failed_verification() {
    let db = MariaDbServer::shared().await;
    let b = backend(db);
    let user = unique_name("connlimit_");
    let pw = password();
    b.issue(&issue(
        &user,
        IssueMode::CreateUser,
        &pw,
        basic(db.database()),
    ))
    .await
    .expect("issue");
    let mut admin = db.admin_conn().await;
    admin
        .query_drop(format!(
            "ALTER USER '{user}'@'%' WITH MAX_USER_CONNECTIONS 1"
        ))
        .await
        .expect("limit");
    admin.disconnect().await.expect("disconnect");
    let held = db
        .connect_as(&user, pw.expose_secret())
        .await
        .expect("the one allowed session");
    let err = b
        .verify(&verify(&user, &pw))
        .await
        .expect_err("no connection slot left");
    assert!(matches!(&err, BackendError::Unreachable(_)), "{err:?}");
    assert!(err.is_transient());
    assert_secret_free(&err, &[pw.expose_secret()]);

    held.disconnect().await.expect("disconnect");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match b.verify(&verify(&user, &pw)).await {
            Ok(()) => break,
            Err(BackendError::Unreachable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    b.close().await;
}

/// The account host part comes from the target (`'app'@'127.0.0.1'`, not always
/// `'app'@'%'`): the existing account is the one rotated, looked up, verified, locked
/// and dropped, and no `'%'` twin appears. A backend with the default `%` does not see
/// that account.
#[tokio::test]
async fn account_host_is_used_for_every_statement() {
    let db = MariaDbServer::shared().await;
    let user = unique_name("acct_host_");
    let mut admin = db.admin_conn().await;
    admin
        .query_drop(format!("CREATE USER '{user}'@'127.0.0.1' ACCOUNT LOCK"))
        .await
        .expect("the DBA's account");
    let count_host = |host: &'static str| {
        let user = user.clone();
        async move {
            let mut admin = db.admin_conn().await;
            let n: Option<u64> = admin
                .exec_first(
                    "SELECT COUNT(*) FROM mysql.user WHERE User = ? AND Host = ?",
                    (user, host),
                )
                .await
                .expect("count");
            admin.disconnect().await.expect("disconnect");
            n.unwrap_or(0)
        }
    };

    let default = backend(db);
    let pw = password();
    let err = default
        .issue(&issue(
            &user,
            IssueMode::ExistingUser,
            &pw,
            basic(db.database()),
        ))
        .await
        .expect_err("no 'user'@'%'");
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
    assert!(default.list_users(&user).await.expect("list").is_empty());
    default.close().await;

    let mut t = target(db);
    t.account_host = "127.0.0.1".into();
    let b = MySqlBackend::new(t).expect("backend");
    b.issue(&issue(
        &user,
        IssueMode::ExistingUser,
        &pw,
        basic(db.database()),
    ))
    .await
    .expect("rotate the 127.0.0.1 account");
    assert_eq!(count_host("%").await, 0, "no '%' twin");
    assert!(can_connect(db, &user, &pw).await);
    b.verify(&verify(&user, &pw)).await.expect("verify");
    assert!(
        b.can_login(&CredentialId(user.clone()))
            .await
            .expect("can_login")
    );
    assert_eq!(
        b.list_users(&user).await.expect("list"),
        vec![CredentialId(user.clone())]
    );
    assert_eq!(
        b.revoke(&revoke(
            &user,
            RevokeMode::DropUser,
            DrainSessions::Terminate
        ))
        .await
        .expect("drop"),
        RevokeOutcome::Revoked
    );
    assert_eq!(count_host("127.0.0.1").await, 0, "dropped");
    b.close().await;

    // A pattern the client does not match: the account exists, login is refused.
    let mut t = target(db);
    t.account_host = "10.%".into();
    let b = MySqlBackend::new(t).expect("backend");
    b.issue(&issue(
        &user,
        IssueMode::CreateUser,
        &pw,
        basic(db.database()),
    ))
    .await
    .expect("create 'user'@'10.%'");
    assert_eq!(count_host("10.%").await, 1);
    let err = b
        .verify(&verify(&user, &pw))
        .await
        .expect_err("not from 10.%");
    assert!(
        matches!(err, BackendError::VerificationFailed(_)),
        "{err:?}"
    );
    b.revoke(&revoke(&user, RevokeMode::DropUser, DrainSessions::Ignore))
        .await
        .expect("drop");
    assert_eq!(count_host("10.%").await, 0);
    b.close().await;

    let mut t = target(db);
    t.account_host = "%' OR '1".into();
    assert!(matches!(
        MySqlBackend::new(t),
        Err(BackendError::Invalid(_))
    ));
    admin.disconnect().await.expect("disconnect");
}

/// A reused user (AlternatingUsers' idle user, InPlace's user) ends up with the spec's
/// database- and table-level privileges: a grant removed from the spec is revoked at
/// the next issue.
#[tokio::test]
async fn removed_grants_are_revoked_on_reused_users() {
    let db = MariaDbServer::shared().await;
    let b = backend(db);
    let p = unique_name("regrant_");
    let d = db.database();
    let mut admin = db.admin_conn().await;
    for statement in [
        format!("CREATE TABLE `{d}`.{p}_kept (x INT)"),
        format!("CREATE TABLE `{d}`.{p}_dropped (x INT)"),
        format!("CREATE TABLE `{d}`.{p}_other (x INT)"),
    ] {
        admin.query_drop(statement).await.expect("fixture");
    }
    admin.disconnect().await.expect("disconnect");
    let grants = |list: &[String]| Privileges {
        member_of: vec![],
        grants: list.to_vec(),
    };
    let wide = grants(&[
        format!("SELECT ON `{d}`.*"),
        format!("SELECT, INSERT ON `{d}`.{p}_kept"),
        format!("SELECT ON `{d}`.{p}_dropped"),
    ]);
    let narrow = grants(&[format!("SELECT ON `{d}`.{p}_kept")]);
    let works = |user: String, pw: SecretString, sql: String| async move {
        let mut conn = db
            .connect_as(&user, pw.expose_secret())
            .await
            .expect("login");
        let ok = conn.query_drop(sql).await.is_ok();
        let _ = conn.disconnect().await;
        ok
    };

    for (user, mode) in [
        (format!("{p}_a"), IssueMode::SetPassword),
        (format!("{p}_app"), IssueMode::ExistingUser),
    ] {
        if mode == IssueMode::ExistingUser {
            let mut admin = db.admin_conn().await;
            admin
                .query_drop(format!("CREATE USER '{user}'@'%'"))
                .await
                .expect("the DBA's user");
            admin.disconnect().await.expect("disconnect");
        }
        let pw = password();
        b.issue(&issue(&user, mode, &pw, wide.clone()))
            .await
            .expect("first");
        assert!(
            works(
                user.clone(),
                pw.clone(),
                format!("SELECT * FROM `{d}`.{p}_other")
            )
            .await
        );
        b.revoke(&revoke(
            &user,
            RevokeMode::DisableLogin,
            DrainSessions::Terminate,
        ))
        .await
        .expect("idle");
        let pw = password();
        b.issue(&issue(&user, mode, &pw, narrow.clone()))
            .await
            .expect("reused");
        assert!(
            works(
                user.clone(),
                pw.clone(),
                format!("SELECT * FROM `{d}`.{p}_kept")
            )
            .await
        );
        for sql in [
            format!("SELECT * FROM `{d}`.{p}_other"),
            format!("SELECT * FROM `{d}`.{p}_dropped"),
            format!("INSERT INTO `{d}`.{p}_kept VALUES (1)"),
        ] {
            assert!(
                !works(user.clone(), pw.clone(), sql.clone()).await,
                "{mode:?}: {sql}"
            );
        }
    }
    b.close().await;
}

/// Roles `memberOf` no longer lists are revoked from a reused user and the default role
/// follows; a role the admin holds no `ADMIN OPTION` on (granted by root) is kept.
#[tokio::test]
async fn removed_memberships_are_revoked_on_reused_users() {
    let db = MariaDbServer::shared().await;
    let b = backend(db);
    let p = unique_name("remember_");
    let d = db.database();
    let (r1, r2, r3) = (format!("{p}_r1"), format!("{p}_r2"), format!("{p}_r3"));
    let mut admin = db.admin_conn().await;
    for statement in [format!("CREATE ROLE {r1}"), format!("CREATE ROLE {r2}")] {
        admin.query_drop(statement).await.expect("fixture");
    }
    admin.disconnect().await.expect("disconnect");
    let mut su = db.superuser_conn().await;
    // Not the admin's: root creates it and holds its ADMIN OPTION, the admin does not.
    su.query_drop(format!("CREATE ROLE {r3}"))
        .await
        .expect("root's role");
    let privileges = |roles: &[&String]| Privileges {
        member_of: roles.iter().map(|r| (*r).clone()).collect(),
        grants: vec![format!("SELECT ON `{d}`.*")],
    };

    for (user, mode) in [
        (format!("{p}_a"), IssueMode::SetPassword),
        (format!("{p}_app"), IssueMode::ExistingUser),
    ] {
        if mode == IssueMode::ExistingUser {
            su.query_drop(format!("CREATE USER '{user}'@'%'"))
                .await
                .expect("the DBA's user");
        }
        b.issue(&issue(&user, mode, &password(), privileges(&[&r2, &r1])))
            .await
            .expect("first");
        su.query_drop(format!("GRANT {r3} TO '{user}'@'%'"))
            .await
            .expect("someone else's role");
        assert_eq!(
            user_roles(&mut su, &user).await,
            (vec![r1.clone(), r2.clone(), r3.clone()], r2.clone()),
            "{mode:?}"
        );
        b.revoke(&revoke(
            &user,
            RevokeMode::DisableLogin,
            DrainSessions::Terminate,
        ))
        .await
        .expect("idle");
        let pw = password();
        b.issue(&issue(&user, mode, &pw, privileges(&[&r1])))
            .await
            .expect("reused");
        assert_eq!(
            user_roles(&mut su, &user).await,
            (vec![r1.clone(), r3.clone()], r1.clone()),
            "{mode:?}: r2 is revoked, r1 is the default role, root's r3 stays"
        );
        b.verify(&verify(&user, &pw)).await.expect("logs in");
        b.issue(&issue(&user, mode, &password(), privileges(&[])))
            .await
            .expect("no roles");
        assert_eq!(
            user_roles(&mut su, &user).await,
            (vec![r3.clone()], String::new()),
            "{mode:?}: without roles in the spec there is no default role"
        );
    }
    su.disconnect().await.expect("disconnect");
    b.close().await;
}

/// The roles `'user'@'%'` holds (sorted) and its default role (`""` for none).
async fn user_roles(su: &mut mysql_async::Conn, user: &str) -> (Vec<String>, String) {
    let mut roles: Vec<String> = su
        .exec(
            "SELECT Role FROM mysql.roles_mapping WHERE User = ? AND Host = '%'",
            (user,),
        )
        .await
        .expect("roles");
    roles.sort();
    let default: Option<String> = su
        .exec_first(
            "SELECT default_role FROM mysql.user WHERE User = ? AND Host = '%'",
            (user,),
        )
        .await
        .expect("default role");
    (roles, default.unwrap_or_default())
}
