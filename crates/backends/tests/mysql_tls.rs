//! MySQL/MariaDB backend over TLS, against a real MariaDB that refuses plain TCP
//! (`--require-secure-transport`). The tests share that server.

use std::time::{Duration, Instant};

use leasehold_backends::{
    Backend, BackendError, CredentialId, DrainSessions, IssueMode, IssueRequest, MySqlBackend,
    MySqlTarget, PasswordPolicy, Privileges, RevokeMode, RevokeOutcome, RevokeRequest, TlsMode,
    VerifyRequest, generate_password,
};
use leasehold_testkit::{MariaDbServer, ServerOptions, unique_name, unrelated_ca_pem};
use mysql_async::prelude::Queryable;
use secrecy::SecretString;
use tokio::sync::OnceCell;

static TLS_ONLY: OnceCell<MariaDbServer> = OnceCell::const_new();

/// One TLS-only server for this test binary; its watchdog removes it at exit.
async fn server() -> &'static MariaDbServer {
    TLS_ONLY
        .get_or_init(|| {
            MariaDbServer::start_with(ServerOptions {
                tls: true,
                require_tls: true,
            })
        })
        .await
}

fn ca_pem(db: &MariaDbServer) -> String {
    db.ca_pem().expect("the server serves TLS").to_owned()
}

fn target(db: &MariaDbServer, tls: TlsMode) -> MySqlTarget {
    let mut target = MySqlTarget::new(
        db.host(),
        db.port(),
        db.database(),
        db.admin_user(),
        db.admin_password().clone(),
    );
    target.tls = tls;
    // Generous: tests run in parallel on a small, shared, unoptimised build.
    target.connect_timeout = Duration::from_secs(15);
    target
}

fn backend(db: &MariaDbServer, tls: TlsMode) -> MySqlBackend {
    MySqlBackend::new(target(db, tls)).expect("backend")
}

fn password() -> SecretString {
    generate_password(&PasswordPolicy::default()).expect("password")
}

fn verify(id: &str, password: &SecretString, query: String) -> VerifyRequest {
    VerifyRequest {
        id: CredentialId(id.to_owned()),
        password: password.clone(),
        query,
        timeout: Duration::from_secs(20),
    }
}

/// Issue, verify (recording the cipher the verification session sees for itself),
/// revoke; returns that cipher.
async fn lifecycle(db: &MariaDbServer, b: &MySqlBackend) -> String {
    let p = unique_name("tls_");
    let table = format!("`{}`.`{p}_probe`", db.database());
    let mut admin = db.admin_conn().await;
    admin
        .query_drop(format!("CREATE TABLE {table} (cipher VARCHAR(200))"))
        .await
        .expect("probe table");
    let user = format!("{p}_u");
    let pw = password();
    let req = IssueRequest {
        id: CredentialId(user.clone()),
        mode: IssueMode::CreateUser,
        password: pw.clone(),
        valid_until: None,
        privileges: Privileges {
            member_of: vec![],
            grants: vec![
                format!("SELECT ON `{}`.*", db.database()),
                format!("INSERT ON {table}"),
            ],
        },
    };
    b.issue(&req).await.expect("issue");
    assert!(b.can_login(&req.id).await.expect("can_login"));
    // The credential's own session writes down its TLS cipher (empty without TLS).
    let probe = format!(
        "INSERT INTO {table} SELECT VARIABLE_VALUE FROM information_schema.SESSION_STATUS \
         WHERE VARIABLE_NAME = 'Ssl_cipher'"
    );
    b.verify(&verify(&user, &pw, probe)).await.expect("verify");
    let cipher: Option<String> = admin
        .query_first(format!("SELECT cipher FROM {table}"))
        .await
        .expect("probe row");

    let revoke = RevokeRequest {
        id: req.id.clone(),
        mode: RevokeMode::DropUser,
        drain: DrainSessions::Terminate,
    };
    assert_eq!(
        b.revoke(&revoke).await.expect("revoke"),
        RevokeOutcome::Revoked
    );
    assert!(!b.can_login(&req.id).await.expect("can_login"));
    let err = b
        .verify(&verify(&user, &pw, "SELECT 1".into()))
        .await
        .expect_err("revoked credential");
    assert!(
        matches!(err, BackendError::VerificationFailed(_)),
        "{err:?}"
    );
    let _ = admin.disconnect().await;
    cipher.unwrap_or_default()
}

#[tokio::test]
async fn require_issues_verifies_and_revokes_over_tls() {
    let db = server().await;
    let b = backend(db, TlsMode::Require);
    b.ping().await.expect("ping over TLS");
    let cipher = lifecycle(db, &b).await;
    assert!(
        !cipher.is_empty(),
        "the verification session was not encrypted"
    );

    // What the testkit's own (verified) TLS admin session reports, as a cross-check.
    let mut admin = db.admin_conn().await;
    let row: Option<(String, String)> = admin
        .query_first("SHOW STATUS LIKE 'Ssl_cipher'")
        .await
        .expect("status");
    assert!(row.is_some_and(|(_, cipher)| !cipher.is_empty()));
    let _ = admin.disconnect().await;
    b.close().await;
}

#[tokio::test]
async fn verify_full_with_the_right_ca() {
    let db = server().await;
    let b = backend(db, TlsMode::VerifyFull { ca_pem: ca_pem(db) });
    b.ping().await.expect("ping with a verified certificate");
    assert!(!lifecycle(db, &b).await.is_empty());
    b.close().await;

    // The certificate also names `localhost`.
    let mut by_name = target(db, TlsMode::VerifyFull { ca_pem: ca_pem(db) });
    by_name.host = "localhost".into();
    let by_name = MySqlBackend::new(by_name).expect("backend");
    by_name.ping().await.expect("ping by host name");
    by_name.close().await;
}

#[tokio::test]
async fn verify_full_with_a_wrong_ca_fails_clearly_and_fast() {
    let db = server().await;
    let b = backend(
        db,
        TlsMode::VerifyFull {
            ca_pem: unrelated_ca_pem(),
        },
    );
    let started = Instant::now();
    let err = b.ping().await.expect_err("unknown issuer");
    assert!(
        matches!(&err, BackendError::Invalid(m) if m.contains("certificate")),
        "{err:?}"
    );
    assert!(!err.is_transient());

    // Verification connections check the certificate the same way.
    let err = b
        .verify(&verify("nobody", &password(), "SELECT 1".into()))
        .await
        .expect_err("unknown issuer");
    assert!(
        matches!(&err, BackendError::Invalid(m) if m.contains("certificate")),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10), "took too long");
    b.close().await;
}

#[tokio::test]
async fn disable_is_refused_by_a_tls_only_server() {
    let db = server().await;
    let b = backend(db, TlsMode::Disable);
    let started = Instant::now();
    let err = b.ping().await.expect_err("plain TCP refused");
    // MariaDB answers a plain-text login to a TLS-only server with "access denied".
    assert!(
        matches!(
            err,
            BackendError::AdminRejected(_) | BackendError::Unreachable(_)
        ),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10), "took too long");
    b.close().await;
}
