//! PostgreSQL backend against a real server (leasehold-testkit). Most tests share one
//! server and use names of their own; the outage test starts its own.

use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use leasehold_backends::{
    Backend, BackendError, CredentialId, DrainSessions, IssueMode, IssueRequest, PasswordPolicy,
    PostgresBackend, PostgresTarget, Privileges, RevokeMode, RevokeOutcome, RevokeRequest, TlsMode,
    VerifyRequest, generate_password,
};
use leasehold_testkit::{PostgresServer, unique_name};
use secrecy::{ExposeSecret, SecretString};

fn target(pg: &PostgresServer) -> PostgresTarget {
    let mut target = PostgresTarget::new(
        pg.host(),
        pg.port(),
        pg.database(),
        pg.admin_user(),
        pg.admin_password().clone(),
    );
    // Generous: tests run in parallel on a small, shared, unoptimised build.
    target.connect_timeout = Duration::from_secs(15);
    target
}

fn backend(pg: &PostgresServer) -> PostgresBackend {
    PostgresBackend::new(target(pg)).expect("backend")
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
        valid_until: Some(Timestamp::now() + SignedDuration::from_hours(1)),
        privileges,
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

async fn can_connect(pg: &PostgresServer, user: &str, password: &SecretString) -> bool {
    pg.connect_as(user, password.expose_secret()).await.is_ok()
}

fn assert_secret_free(err: &BackendError, secrets: &[&str]) {
    let shown = format!("{err} {err:?}");
    for secret in secrets {
        assert!(!shown.contains(secret), "secret leaked in error: {shown}");
    }
    assert!(
        !shown.contains("SCRAM-SHA-256$"),
        "verifier leaked: {shown}"
    );
}

/// Tables `<p>_role_t` (readable through role `<p>_reader`), `<p>_grant_t` (readable
/// through a direct grant) and `<p>_private_t` (readable by neither).
async fn fixture(pg: &PostgresServer, p: &str) -> Privileges {
    let admin = pg.admin_client().await;
    admin
        .batch_execute(&format!(
            "CREATE TABLE {p}_role_t (x int); INSERT INTO {p}_role_t VALUES (1);
             CREATE TABLE {p}_grant_t (x int); INSERT INTO {p}_grant_t VALUES (2);
             CREATE TABLE {p}_private_t (x int);
             CREATE ROLE {p}_reader NOLOGIN;
             GRANT SELECT ON {p}_role_t TO {p}_reader;"
        ))
        .await
        .expect("fixture");
    Privileges {
        member_of: vec![format!("{p}_reader")],
        grants: vec![format!("SELECT ON TABLE {p}_grant_t")],
    }
}

#[tokio::test]
async fn dynamic_user_lifecycle() {
    let pg = PostgresServer::shared().await;
    let b = backend(pg);
    let p = unique_name("dyn_");
    let privileges = fixture(pg, &p).await;
    let user = format!("{p}_u");
    let pw = password();
    let req = issue(&user, IssueMode::CreateUser, &pw, privileges);

    b.issue(&req).await.expect("issue");
    b.issue(&req).await.expect("issue twice converges");
    b.verify(&verify(&user, &pw)).await.expect("verify");
    assert!(b.can_login(&req.id).await.expect("can_login"));

    let client = pg
        .connect_as(&user, pw.expose_secret())
        .await
        .expect("real login");
    let role_row = client
        .query_one(&format!("SELECT x FROM {p}_role_t"), &[])
        .await;
    assert_eq!(role_row.expect("select via role").get::<_, i32>(0), 1);
    let grant_row = client
        .query_one(&format!("SELECT x FROM {p}_grant_t"), &[])
        .await;
    assert_eq!(grant_row.expect("select via grant").get::<_, i32>(0), 2);
    let denied = client
        .query(&format!("SELECT x FROM {p}_private_t"), &[])
        .await;
    let denied = denied.expect_err("private table must be denied");
    assert_eq!(
        denied.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
    drop(client);

    // Issuing with a new password replaces the old one.
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
        !can_connect(pg, &user, &pw).await,
        "old password must stop working"
    );
    assert!(can_connect(pg, &user, &pw2).await);

    let r = revoke(&user, RevokeMode::DropUser, DrainSessions::Terminate);
    assert_eq!(b.revoke(&r).await.expect("revoke"), RevokeOutcome::Revoked);
    assert!(
        !can_connect(pg, &user, &pw2).await,
        "login must fail after revoke"
    );
    assert!(!b.can_login(&req.id).await.expect("can_login"));
    assert!(
        b.list_users(&user).await.expect("list").is_empty(),
        "role dropped"
    );
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
}

#[tokio::test]
async fn dropping_a_user_that_owns_objects() {
    let pg = PostgresServer::shared().await;
    let b = backend(pg);
    let user = unique_name("owner_");
    let pw = password();
    let privileges = Privileges {
        member_of: vec![],
        grants: vec!["CREATE ON SCHEMA public".into()],
    };
    b.issue(&issue(&user, IssueMode::CreateUser, &pw, privileges))
        .await
        .expect("issue");
    let client = pg
        .connect_as(&user, pw.expose_secret())
        .await
        .expect("login");
    client
        .batch_execute(&format!("CREATE TABLE {user}_t (x int)"))
        .await
        .expect("user creates a table");
    drop(client);
    let r = revoke(&user, RevokeMode::DropUser, DrainSessions::Terminate);
    assert_eq!(b.revoke(&r).await.expect("revoke"), RevokeOutcome::Revoked);
    assert!(b.list_users(&user).await.expect("list").is_empty());
}

#[tokio::test]
async fn alternating_users_disable_then_reenable() {
    let pg = PostgresServer::shared().await;
    let b = backend(pg);
    let p = unique_name("alt_");
    let privileges = fixture(pg, &p).await;
    let user = format!("{p}_a");
    let pw = password();
    // SetPassword creates the missing `_a` user.
    let req = issue(&user, IssueMode::SetPassword, &pw, privileges.clone());
    b.issue(&req).await.expect("issue");
    b.verify(&verify(&user, &pw)).await.expect("verify");

    let r = revoke(&user, RevokeMode::DisableLogin, DrainSessions::Terminate);
    assert_eq!(b.revoke(&r).await.expect("disable"), RevokeOutcome::Revoked);
    assert_eq!(
        b.revoke(&r).await.expect("disable twice"),
        RevokeOutcome::Revoked
    );
    assert!(!can_connect(pg, &user, &pw).await);
    assert!(!b.can_login(&req.id).await.expect("can_login"));
    assert_eq!(
        b.list_users(&user).await.expect("list"),
        vec![req.id.clone()],
        "role kept"
    );
    assert!(matches!(
        b.verify(&verify(&user, &pw)).await,
        Err(BackendError::VerificationFailed(_))
    ));

    // The next rotation sets a new password and login works again, grants intact.
    let pw2 = password();
    b.issue(&issue(&user, IssueMode::SetPassword, &pw2, privileges))
        .await
        .expect("re-issue");
    b.verify(&verify(&user, &pw2)).await.expect("verify again");
    let client = pg
        .connect_as(&user, pw2.expose_secret())
        .await
        .expect("login");
    client
        .query_one(&format!("SELECT x FROM {p}_role_t"), &[])
        .await
        .expect("grant kept");
}

#[tokio::test]
async fn in_place_revoke_does_nothing() {
    let pg = PostgresServer::shared().await;
    let b = backend(pg);
    let user = unique_name("inplace_");
    let pw = password();
    b.issue(&issue(
        &user,
        IssueMode::SetPassword,
        &pw,
        Privileges::default(),
    ))
    .await
    .expect("issue");
    let r = revoke(&user, RevokeMode::Nothing, DrainSessions::Ignore);
    assert_eq!(b.revoke(&r).await.expect("revoke"), RevokeOutcome::Revoked);
    assert!(
        can_connect(pg, &user, &pw).await,
        "Nothing leaves the user alone"
    );
    let pw2 = password();
    b.issue(&issue(
        &user,
        IssueMode::SetPassword,
        &pw2,
        Privileges::default(),
    ))
    .await
    .expect("rotate in place");
    assert!(!can_connect(pg, &user, &pw).await);
    assert!(can_connect(pg, &user, &pw2).await);
}

/// `rolcanlogin`, `rolvaliduntil` (as text) and the roles `user` is a member of.
async fn role_attributes(pg: &PostgresServer, user: &str) -> (bool, Option<String>, Vec<String>) {
    let row = pg
        .admin_client()
        .await
        .query_one(
            "SELECT r.rolcanlogin, r.rolvaliduntil::text, \
                    ARRAY(SELECT g.rolname::text FROM pg_catalog.pg_auth_members m \
                            JOIN pg_catalog.pg_roles g ON g.oid = m.roleid \
                           WHERE m.member = r.oid ORDER BY 1) \
               FROM pg_catalog.pg_roles r WHERE r.rolname = $1",
            &[&user],
        )
        .await
        .expect("role attributes");
    (row.get(0), row.get(1), row.get(2))
}

/// An InPlace user (the DBA's) whose last password leasehold handed out: scrambling makes
/// that password stop working and leaves the user, its LOGIN and its privileges, so the
/// DBA can set a password of their own and log in with what the user had.
#[tokio::test]
async fn scrambling_an_in_place_user_refuses_its_password_and_keeps_the_user() {
    let pg = PostgresServer::shared().await;
    let b = backend(pg);
    let p = unique_name("scramble_");
    let privileges = fixture(pg, &p).await;
    let user = format!("{p}_u");
    pg.admin_client()
        .await
        .batch_execute(&format!("CREATE ROLE {user} NOLOGIN"))
        .await
        .expect("the DBA's user");
    let pw = password();
    b.issue(&issue(&user, IssueMode::ExistingUser, &pw, privileges))
        .await
        .expect("rotate in place");
    let session = pg
        .connect_as(&user, pw.expose_secret())
        .await
        .expect("a consumer's session");
    let before = role_attributes(pg, &user).await;
    assert!(before.0, "LOGIN set by the issue");

    // Draining: the password is refused at once, the open session is waited for.
    let wait = revoke(&user, RevokeMode::ScramblePassword, DrainSessions::Wait);
    assert_eq!(
        b.revoke(&wait).await.expect("scramble"),
        RevokeOutcome::SessionsRemain(1)
    );
    assert!(
        !can_connect(pg, &user, &pw).await,
        "the handed-out password no longer logs in"
    );
    client_alive(&session).await;
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
        session.simple_query("SELECT 1").await.is_err(),
        "session terminated"
    );
    assert!(!can_connect(pg, &user, &pw).await);
    assert!(matches!(
        b.verify(&verify(&user, &pw)).await,
        Err(BackendError::VerificationFailed(_))
    ));

    // Not dropped, not locked, memberships and validity unchanged.
    assert_eq!(role_attributes(pg, &user).await, before);
    assert!(
        b.can_login(&CredentialId(user.clone()))
            .await
            .expect("can_login")
    );
    assert_eq!(
        b.list_users(&user).await.expect("list"),
        vec![CredentialId(user.clone())]
    );
    // The DBA sets a password: it logs in, with the grants and the role's privileges.
    let dba_pw = password();
    pg.admin_client()
        .await
        .batch_execute(&format!(
            "ALTER ROLE {user} PASSWORD '{}'",
            dba_pw.expose_secret()
        ))
        .await
        .expect("the DBA sets a password");
    let client = pg
        .connect_as(&user, dba_pw.expose_secret())
        .await
        .expect("login with the DBA's password");
    let via_role = client
        .query_one(&format!("SELECT x FROM {p}_role_t"), &[])
        .await
        .expect("membership kept");
    assert_eq!(via_role.get::<_, i32>(0), 1);
    let via_grant = client
        .query_one(&format!("SELECT x FROM {p}_grant_t"), &[])
        .await
        .expect("grant kept");
    assert_eq!(via_grant.get::<_, i32>(0), 2);
    assert!(
        client
            .query(&format!("SELECT x FROM {p}_private_t"), &[])
            .await
            .is_err(),
        "nothing granted on the way"
    );

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
}

async fn client_alive(client: &tokio_postgres::Client) {
    client
        .simple_query("SELECT 1")
        .await
        .expect("existing session still alive");
}

#[tokio::test]
async fn drain_wait_then_terminate() {
    let pg = PostgresServer::shared().await;
    let b = backend(pg);
    let user = unique_name("drain_");
    let pw = password();
    b.issue(&issue(
        &user,
        IssueMode::CreateUser,
        &pw,
        Privileges::default(),
    ))
    .await
    .expect("issue");
    let session = pg
        .connect_as(&user, pw.expose_secret())
        .await
        .expect("session");

    let wait = revoke(&user, RevokeMode::DropUser, DrainSessions::Wait);
    assert_eq!(
        b.revoke(&wait).await.expect("revoke"),
        RevokeOutcome::SessionsRemain(1)
    );
    assert!(
        !can_connect(pg, &user, &pw).await,
        "no new logins while draining"
    );
    session
        .simple_query("SELECT 1")
        .await
        .expect("existing session still alive");
    assert_eq!(
        b.revoke(&wait).await.expect("again"),
        RevokeOutcome::SessionsRemain(1)
    );

    let terminate = revoke(&user, RevokeMode::DropUser, DrainSessions::Terminate);
    assert_eq!(
        b.revoke(&terminate).await.expect("terminate"),
        RevokeOutcome::Revoked
    );
    assert!(
        session.simple_query("SELECT 1").await.is_err(),
        "session must be dead"
    );
    assert!(b.list_users(&user).await.expect("list").is_empty());
}

#[tokio::test]
async fn drain_wait_finishes_once_sessions_end() {
    let pg = PostgresServer::shared().await;
    let b = backend(pg);
    let user = unique_name("drainend_");
    let pw = password();
    b.issue(&issue(
        &user,
        IssueMode::CreateUser,
        &pw,
        Privileges::default(),
    ))
    .await
    .expect("issue");
    let session = pg
        .connect_as(&user, pw.expose_secret())
        .await
        .expect("session");
    let wait = revoke(&user, RevokeMode::DisableLogin, DrainSessions::Wait);
    assert_eq!(
        b.revoke(&wait).await.expect("revoke"),
        RevokeOutcome::SessionsRemain(1)
    );
    drop(session);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match b.revoke(&wait).await.expect("revoke") {
            RevokeOutcome::Revoked => break,
            RevokeOutcome::SessionsRemain(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("session did not go away: {other:?}"),
        }
    }
}

#[tokio::test]
async fn verification_failures() {
    let pg = PostgresServer::shared().await;
    let b = backend(pg);
    let user = unique_name("verify_");
    let pw = password();
    b.issue(&issue(
        &user,
        IssueMode::CreateUser,
        &pw,
        Privileges::default(),
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

    // Expired: VALID UNTIL in the past.
    let mut expired = issue(&user, IssueMode::CreateUser, &pw, Privileges::default());
    expired.valid_until = Some(Timestamp::now() - SignedDuration::from_hours(1));
    b.issue(&expired).await.expect("issue expired");
    assert!(!b.can_login(&expired.id).await.expect("can_login"));
    let err = b.verify(&verify(&user, &pw)).await.expect_err("expired");
    assert!(
        matches!(err, BackendError::VerificationFailed(_)),
        "{err:?}"
    );
}

#[tokio::test]
async fn invalid_requests_and_rejected_admin() {
    let pg = PostgresServer::shared().await;
    let b = backend(pg);
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
    // All or nothing: the role was not left behind.
    assert!(b.list_users(&user).await.expect("list").is_empty());

    let bad_grant = Privileges {
        member_of: vec![],
        grants: vec!["SELECT ON TABLE no_such_table_xyz".into()],
    };
    let err = b
        .issue(&issue(&user, IssueMode::CreateUser, &pw, bad_grant))
        .await
        .expect_err("bad grant");
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
    assert_secret_free(&err, &[pw.expose_secret()]);

    let injection = Privileges {
        member_of: vec![],
        grants: vec!["SELECT ON TABLE x TO public; DROP TABLE y".into()],
    };
    let err = b
        .issue(&issue(&user, IssueMode::CreateUser, &pw, injection))
        .await
        .expect_err("two statements");
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");

    let long = "x".repeat(64);
    let err = b
        .issue(&issue(
            &long,
            IssueMode::CreateUser,
            &pw,
            Privileges::default(),
        ))
        .await
        .expect_err("name too long");
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");

    let wrong_admin = SecretString::from("not-the-admin-password".to_owned());
    let mut t = target(pg);
    t.admin_password = wrong_admin.clone();
    let rejected = PostgresBackend::new(t).expect("backend");
    let err = rejected.ping().await.expect_err("wrong admin password");
    assert!(matches!(err, BackendError::AdminRejected(_)), "{err:?}");
    assert_secret_free(&err, &[wrong_admin.expose_secret()]);
    assert!(!format!("{:?}", target(pg)).contains(pg.admin_password().expose_secret()));

    // A CA bundle without a certificate is refused up front.
    let mut tls = target(pg);
    tls.tls = TlsMode::VerifyFull {
        ca_pem: "not a certificate".into(),
    };
    assert!(matches!(
        PostgresBackend::new(tls),
        Err(BackendError::Invalid(_))
    ));
    // TLS asked of a server without TLS: refused, never downgraded to plain text.
    let mut tls = target(pg);
    tls.tls = TlsMode::Require;
    let err = PostgresBackend::new(tls)
        .expect("backend")
        .ping()
        .await
        .expect_err("no TLS on the shared server");
    assert!(
        matches!(&err, BackendError::Invalid(m) if m.contains("does not offer")),
        "{err:?}"
    );
}

#[tokio::test]
async fn secrets_never_reach_the_server_log() {
    let pg = PostgresServer::shared().await;
    let b = backend(pg);
    let user = unique_name("secret_");
    let pw1 = password();
    let pw2 = password();
    b.issue(&issue(
        &user,
        IssueMode::CreateUser,
        &pw1,
        Privileges::default(),
    ))
    .await
    .expect("issue");
    b.verify(&verify(&user, &pw1)).await.expect("verify");
    // Rotation: new password, verify, old one rejected.
    b.issue(&issue(
        &user,
        IssueMode::SetPassword,
        &pw2,
        Privileges::default(),
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

    let log = pg.log_contents();
    assert!(
        log.contains(&format!(
            "ALTER ROLE \"{user}\" LOGIN PASSWORD 'SCRAM-SHA-256$"
        )),
        "the statement is logged, with a verifier"
    );
    for pw in [&pw1, &pw2] {
        assert!(
            !log.contains(pw.expose_secret()),
            "plaintext password in the server log"
        );
    }
    // Every password the server saw for this user is a SCRAM verifier.
    for line in log
        .lines()
        .filter(|l| l.contains(&format!("ROLE \"{user}\" LOGIN PASSWORD")))
    {
        assert!(
            line.contains("PASSWORD 'SCRAM-SHA-256$4096:"),
            "not a verifier: {line}"
        );
    }
    let req = issue(&user, IssueMode::CreateUser, &pw1, Privileges::default());
    assert!(!format!("{req:?}").contains(pw1.expose_secret()));
}

#[tokio::test]
async fn list_users_by_prefix() {
    let pg = PostgresServer::shared().await;
    let b = backend(pg);
    let p = unique_name("lst");
    for name in [format!("{p}_a"), format!("{p}_b"), format!("{p}xc")] {
        b.issue(&issue(
            &name,
            IssueMode::CreateUser,
            &password(),
            Privileges::default(),
        ))
        .await
        .expect("issue");
    }
    let found = b.list_users(&format!("{p}_")).await.expect("list");
    // `_` is literal: `{p}xc` does not match `{p}_`.
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
}

#[tokio::test]
async fn many_concurrent_leases() {
    let pg = PostgresServer::shared().await;
    let b = std::sync::Arc::new(backend(pg));
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
                    Privileges::default(),
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
    let mut pg = PostgresServer::start().await;
    let mut t = target(&pg);
    t.connect_timeout = Duration::from_secs(2);
    let b = PostgresBackend::new(t).expect("backend");
    b.ping().await.expect("ping");
    let user = unique_name("outage_");
    let pw = password();
    b.issue(&issue(
        &user,
        IssueMode::CreateUser,
        &pw,
        Privileges::default(),
    ))
    .await
    .expect("issue");

    pg.stop().await;
    let started = Instant::now();
    let err = b.ping().await.expect_err("server down");
    assert!(matches!(err, BackendError::Unreachable(_)), "{err:?}");
    assert!(err.is_transient());
    let err = b
        .issue(&issue(
            &user,
            IssueMode::SetPassword,
            &pw,
            Privileges::default(),
        ))
        .await
        .expect_err("issue while down");
    assert!(matches!(err, BackendError::Unreachable(_)), "{err:?}");
    assert_secret_free(
        &err,
        &[pw.expose_secret(), pg.admin_password().expose_secret()],
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

    pg.resume().await;
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
}

/// Memberships the admin holds (`CREATEROLE` admins created by the testkit hold none).
async fn admin_memberships(pg: &PostgresServer) -> Vec<String> {
    pg.admin_client()
        .await
        .query(
            "SELECT g.rolname::text FROM pg_auth_members m \
             JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles u ON u.oid = m.member \
             WHERE u.rolname = current_user ORDER BY 1",
            &[],
        )
        .await
        .expect("memberships")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The testkit's admin is what RDS, Cloud SQL and Azure hand out (`CREATEROLE`, owner
/// of the database, no superuser, not in `pg_signal_backend`). It can still end a
/// user's sessions and drop a user that owns objects and holds grants, and it keeps
/// no membership in the roles it borrowed to do so.
#[tokio::test]
async fn a_createrole_admin_terminates_and_drops_without_keeping_memberships() {
    let pg = PostgresServer::shared().await;
    let b = backend(pg);
    let p = unique_name("borrow_");
    let privileges = fixture(pg, &p).await;
    let user = format!("{p}_u");
    let pw = password();
    let mut privileges = privileges;
    privileges.grants.push("CREATE ON SCHEMA public".into());
    b.issue(&issue(&user, IssueMode::CreateUser, &pw, privileges))
        .await
        .expect("issue");
    let before = admin_memberships(pg).await;

    let session = pg
        .connect_as(&user, pw.expose_secret())
        .await
        .expect("login");
    session
        .batch_execute(&format!("CREATE TABLE {p}_owned (x int)"))
        .await
        .expect("the user creates a table");

    // Disabling login and terminating sessions (AlternatingUsers keeps the user).
    let disable = revoke(&user, RevokeMode::DisableLogin, DrainSessions::Terminate);
    assert_eq!(
        b.revoke(&disable)
            .await
            .expect("terminate as a CREATEROLE admin"),
        RevokeOutcome::Revoked
    );
    assert!(
        session.simple_query("SELECT 1").await.is_err(),
        "the session was terminated"
    );
    assert_eq!(admin_memberships(pg).await, before, "no membership kept");

    // Dropping: what it owned goes to the admin, its grants go with it.
    let drop = revoke(&user, RevokeMode::DropUser, DrainSessions::Terminate);
    assert_eq!(
        b.revoke(&drop).await.expect("drop as a CREATEROLE admin"),
        RevokeOutcome::Revoked
    );
    assert!(b.list_users(&user).await.expect("list").is_empty());
    let owner: String = pg
        .admin_client()
        .await
        .query_one(
            "SELECT tableowner::text FROM pg_tables WHERE tablename = $1",
            &[&format!("{p}_owned")],
        )
        .await
        .expect("owner")
        .get(0);
    assert_eq!(owner, pg.admin_user());
    assert_eq!(admin_memberships(pg).await, before, "no membership kept");
}

/// A privilege the admin lacks is named as such, with the step, not reported as a
/// rejected admin credential.
#[tokio::test]
async fn missing_admin_privileges_are_named() {
    let pg = PostgresServer::shared().await;
    let b = backend(pg);
    let p = unique_name("noperm_");
    let su = pg.superuser_client().await;
    su.batch_execute(&format!(
        "CREATE TABLE {p}_theirs (x int); CREATE ROLE {p}_root LOGIN SUPERUSER;"
    ))
    .await
    .expect("setup");

    let user = format!("{p}_u");
    let pw = password();
    let privileges = Privileges {
        member_of: vec![],
        grants: vec![format!("SELECT ON TABLE {p}_theirs")],
    };
    let err = b
        .issue(&issue(&user, IssueMode::CreateUser, &pw, privileges))
        .await
        .expect_err("the admin has no privilege on the table");
    let shown = err.to_string();
    assert!(matches!(err, BackendError::PermissionDenied(_)), "{err:?}");
    assert!(!shown.contains("credential rejected"), "{shown}");
    assert!(
        shown.starts_with("the admin lacks a privilege to grant `SELECT ON TABLE"),
        "{shown}"
    );
    assert!(shown.contains("42501"), "{shown}");
    assert!(!err.is_transient());
    assert_secret_free(&err, &[pw.expose_secret()]);

    let err = b
        .revoke(&revoke(
            &format!("{p}_root"),
            RevokeMode::DropUser,
            DrainSessions::Ignore,
        ))
        .await
        .expect_err("a CREATEROLE admin cannot touch a superuser");
    assert!(matches!(err, BackendError::PermissionDenied(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains(&format!("to disable login of role \"{p}_root\"")),
        "{err}"
    );
}

/// Grants are parsed and rebuilt with quoted names: the documented forms work against
/// the server (quoted mixed-case names included), and anything spliced-looking
/// (comments, `;`, `TO`, string quotes) is refused naming the grant before any
/// statement runs.
#[tokio::test]
async fn grants_are_parsed_not_spliced() {
    let pg = PostgresServer::shared().await;
    let b = backend(pg);
    let p = unique_name("grants_");
    let admin = pg.admin_client().await;
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA {p}_s;
             CREATE TABLE {p}_s.\"Orders\" (x int); INSERT INTO {p}_s.\"Orders\" VALUES (7);
             CREATE TABLE {p}_s.items (x int); INSERT INTO {p}_s.items VALUES (8);
             CREATE TABLE {p}_s.secret (x int);
             CREATE ROLE {p}_victim NOLOGIN;"
        ))
        .await
        .expect("fixture");

    let user = format!("{p}_u");
    let pw = password();
    for bad in [
        format!("SELECT ON TABLE {p}_s.items/**/TO/**/{p}_victim"),
        format!("SELECT ON TABLE {p}_s.items TO {p}_victim"),
        format!("SELECT ON TABLE {p}_s.items; DROP TABLE {p}_s.items"),
        format!("SELECT ON TABLE {p}_s.items -- x"),
        format!("SELECT ON TABLE '{p}_s.items'"),
        format!("SELECT ON TABLE {p}_s.items WITH GRANT OPTION"),
    ] {
        let privileges = Privileges {
            member_of: vec![],
            grants: vec![format!("USAGE ON SCHEMA {p}_s"), bad.clone()],
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
        assert!(b.list_users(&user).await.expect("list").is_empty(), "{bad}");
    }

    let privileges = Privileges {
        member_of: vec![],
        grants: vec![
            format!("usage ON SCHEMA {p}_s"),
            format!("SELECT ON {p}_s.\"Orders\""),
            format!("SELECT, INSERT ON TABLE {p}_s.items"),
        ],
    };
    b.issue(&issue(&user, IssueMode::CreateUser, &pw, privileges))
        .await
        .expect("valid grants");
    let client = pg
        .connect_as(&user, pw.expose_secret())
        .await
        .expect("login");
    let n: i32 = client
        .query_one(&format!("SELECT x FROM {p}_s.\"Orders\""), &[])
        .await
        .expect("quoted table readable")
        .get(0);
    assert_eq!(n, 7);
    client
        .execute(&format!("INSERT INTO {p}_s.items VALUES (9)"), &[])
        .await
        .expect("insert granted");
    assert!(
        client
            .query(&format!("SELECT * FROM {p}_s.secret"), &[])
            .await
            .is_err(),
        "not granted"
    );
    drop(client);

    let all = Privileges {
        member_of: vec![],
        grants: vec![
            format!("USAGE ON SCHEMA {p}_s"),
            format!("ALL ON ALL TABLES IN SCHEMA {p}_s"),
        ],
    };
    let user2 = format!("{p}_all");
    b.issue(&issue(&user2, IssueMode::CreateUser, &pw, all))
        .await
        .expect("ALL TABLES IN SCHEMA");
    let client = pg
        .connect_as(&user2, pw.expose_secret())
        .await
        .expect("login");
    client
        .query(&format!("SELECT * FROM {p}_s.secret"), &[])
        .await
        .expect("every table");
    drop(client);
    for u in [&user, &user2] {
        b.revoke(&revoke(u, RevokeMode::DropUser, DrainSessions::Terminate))
            .await
            .expect("drop");
    }
}

/// InPlace only changes the password of an existing user: a mistyped name is refused
/// naming the user (not a transient error, so the engine does not retry-storm), and no
/// new LOGIN role appears. An existing user is rotated as before.
#[tokio::test]
async fn in_place_never_creates_a_user() {
    let pg = PostgresServer::shared().await;
    let b = backend(pg);
    let user = unique_name("inplace_typo_");
    let pw = password();
    let err = b
        .issue(&issue(
            &user,
            IssueMode::ExistingUser,
            &pw,
            Privileges::default(),
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
    assert!(!can_connect(pg, &user, &pw).await);

    pg.admin_client()
        .await
        .batch_execute(&format!("CREATE ROLE {user} LOGIN"))
        .await
        .expect("the DBA creates the user");
    b.issue(&issue(
        &user,
        IssueMode::ExistingUser,
        &pw,
        Privileges::default(),
    ))
    .await
    .expect("existing user");
    assert!(can_connect(pg, &user, &pw).await);
}

/// A server that refuses the login because connections are exhausted (53300
/// too_many_connections, here the role's connection limit held by an open session)
/// says nothing about the credential: verify is `Unreachable` (retry later), never
/// `VerificationFailed` (which revokes the new credential). Once the slot frees up
/// the same credential verifies.
#[tokio::test]
async fn exhausted_connections_are_unavailable_not_a_failed_verification() {
    let pg = PostgresServer::shared().await;
    let b = backend(pg);
    let user = unique_name("connlimit_");
    let pw = password();
    b.issue(&issue(
        &user,
        IssueMode::CreateUser,
        &pw,
        Privileges::default(),
    ))
    .await
    .expect("issue");
    pg.admin_client()
        .await
        .batch_execute(&format!("ALTER ROLE {user} CONNECTION LIMIT 1"))
        .await
        .expect("limit");
    let held = pg
        .connect_as(&user, pw.expose_secret())
        .await
        .expect("the one allowed session");
    let err = b
        .verify(&verify(&user, &pw))
        .await
        .expect_err("no connection slot left");
    assert!(
        matches!(&err, BackendError::Unreachable(m) if m.contains("53300")),
        "{err:?}"
    );
    assert!(err.is_transient());
    assert_secret_free(&err, &[pw.expose_secret()]);

    drop(held);
    // The server notices the closed session a moment later: wait for the slot.
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
}

/// A reused user (AlternatingUsers' idle user, InPlace's user) ends up with exactly the
/// spec's privileges: a grant removed from the spec is revoked at the next issue, in
/// the same transaction as the new grants, so what stays never goes missing.
#[tokio::test]
async fn removed_grants_are_revoked_on_reused_users() {
    let pg = PostgresServer::shared().await;
    let b = backend(pg);
    let p = unique_name("regrant_");
    let admin = pg.admin_client().await;
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA {p}_s;
             CREATE TABLE {p}_s.kept (x int); CREATE TABLE {p}_s.dropped (x int);
             CREATE SCHEMA {p}_other; CREATE TABLE {p}_other.t (x int);"
        ))
        .await
        .expect("fixture");
    let grants = |list: &[String]| Privileges {
        member_of: vec![],
        grants: list.to_vec(),
    };
    let wide = grants(&[
        format!("USAGE ON SCHEMA {p}_s"),
        format!("SELECT, INSERT ON TABLE {p}_s.kept"),
        format!("SELECT ON TABLE {p}_s.dropped"),
        format!("USAGE ON SCHEMA {p}_other"),
        format!("ALL ON ALL TABLES IN SCHEMA {p}_other"),
    ]);
    let narrow = grants(&[
        format!("USAGE ON SCHEMA {p}_s"),
        format!("SELECT ON TABLE {p}_s.kept"),
    ]);
    let reads = |user: String, pw: SecretString, table: String| async move {
        let client = pg
            .connect_as(&user, pw.expose_secret())
            .await
            .expect("login");
        client
            .query(&format!("SELECT * FROM {table}"), &[])
            .await
            .is_ok()
    };

    // AlternatingUsers: the idle user is re-enabled with a new password.
    let alt = format!("{p}_a");
    let pw = password();
    b.issue(&issue(&alt, IssueMode::SetPassword, &pw, wide.clone()))
        .await
        .expect("v1");
    assert!(reads(alt.clone(), pw.clone(), format!("{p}_s.dropped")).await);
    assert!(reads(alt.clone(), pw.clone(), format!("{p}_other.t")).await);
    b.revoke(&revoke(
        &alt,
        RevokeMode::DisableLogin,
        DrainSessions::Terminate,
    ))
    .await
    .expect("idle");
    let pw = password();
    b.issue(&issue(&alt, IssueMode::SetPassword, &pw, narrow.clone()))
        .await
        .expect("v3 reuses the user");
    assert!(reads(alt.clone(), pw.clone(), format!("{p}_s.kept")).await);
    assert!(!reads(alt.clone(), pw.clone(), format!("{p}_s.dropped")).await);
    assert!(!reads(alt.clone(), pw.clone(), format!("{p}_other.t")).await);
    let client = pg
        .connect_as(&alt, pw.expose_secret())
        .await
        .expect("login");
    assert!(
        client
            .execute(&format!("INSERT INTO {p}_s.kept VALUES (1)"), &[])
            .await
            .is_err(),
        "INSERT was removed from the spec"
    );
    drop(client);

    // InPlace: the DBA's user.
    let own = format!("{p}_app");
    admin
        .batch_execute(&format!("CREATE ROLE {own} LOGIN"))
        .await
        .expect("the DBA's user");
    let pw = password();
    b.issue(&issue(&own, IssueMode::ExistingUser, &pw, wide))
        .await
        .expect("first");
    assert!(reads(own.clone(), pw.clone(), format!("{p}_s.dropped")).await);
    let pw = password();
    b.issue(&issue(&own, IssueMode::ExistingUser, &pw, narrow))
        .await
        .expect("second");
    assert!(reads(own.clone(), pw.clone(), format!("{p}_s.kept")).await);
    assert!(!reads(own.clone(), pw.clone(), format!("{p}_s.dropped")).await);
    assert!(!reads(own.clone(), pw.clone(), format!("{p}_other.t")).await);
}

/// Memberships `memberOf` no longer lists are revoked from a reused role when the admin
/// granted them; the listed ones stay, and so does a membership the superuser granted.
#[tokio::test]
async fn removed_memberships_are_revoked_on_reused_users() {
    let pg = PostgresServer::shared().await;
    let b = backend(pg);
    let p = unique_name("remember_");
    let (r1, r2, r3) = (format!("{p}_r1"), format!("{p}_r2"), format!("{p}_r3"));
    let admin = pg.admin_client().await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {r1}; CREATE ROLE {r2}; CREATE ROLE {r3};"
        ))
        .await
        .expect("fixture");
    let su = pg.superuser_client().await;
    let privileges = |roles: &[&String]| Privileges {
        member_of: roles.iter().map(|r| (*r).clone()).collect(),
        grants: vec![],
    };
    let memberships = |user: String| {
        let su = &su;
        async move {
            su.query(
                "SELECT r.rolname::text FROM pg_catalog.pg_auth_members m \
                   JOIN pg_catalog.pg_roles r ON r.oid = m.roleid \
                  WHERE m.member = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $1) \
                  ORDER BY 1",
                &[&user],
            )
            .await
            .expect("memberships")
            .iter()
            .map(|row| row.get::<_, String>(0))
            .collect::<Vec<_>>()
        }
    };

    for (user, mode) in [
        (format!("{p}_a"), IssueMode::SetPassword),
        (format!("{p}_app"), IssueMode::ExistingUser),
    ] {
        if mode == IssueMode::ExistingUser {
            admin
                .batch_execute(&format!("CREATE ROLE {user} LOGIN"))
                .await
                .expect("the DBA's user");
        }
        b.issue(&issue(&user, mode, &password(), privileges(&[&r1, &r2])))
            .await
            .expect("first");
        // Granted by someone else: never leasehold's to take back.
        su.batch_execute(&format!("GRANT {r3} TO {user}"))
            .await
            .expect("the superuser's grant");
        assert_eq!(
            memberships(user.clone()).await,
            vec![r1.clone(), r2.clone(), r3.clone()]
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
            memberships(user.clone()).await,
            vec![r1.clone(), r3.clone()],
            "{mode:?}: r2 is revoked, r1 and the superuser's r3 stay"
        );
        b.verify(&verify(&user, &pw)).await.expect("logs in");
        b.issue(&issue(&user, mode, &password(), privileges(&[])))
            .await
            .expect("no roles");
        assert_eq!(
            memberships(user.clone()).await,
            vec![r3.clone()],
            "{mode:?}"
        );
    }
}
