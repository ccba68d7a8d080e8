//! PostgreSQL backend over TLS, against a real server that only accepts TCP
//! connections over TLS (`hostssl` lines only). The tests share that server.

use std::time::{Duration, Instant};

use leasehold_backends::{
    Backend, BackendError, CredentialId, DrainSessions, IssueMode, IssueRequest, PasswordPolicy,
    PostgresBackend, PostgresTarget, Privileges, RevokeMode, RevokeOutcome, RevokeRequest, TlsMode,
    VerifyRequest, generate_password,
};
use leasehold_testkit::{PostgresServer, ServerOptions, unique_name, unrelated_ca_pem};
use secrecy::SecretString;
use tokio::sync::OnceCell;

static TLS_ONLY: OnceCell<PostgresServer> = OnceCell::const_new();

/// One TLS-only server for this test binary; its watchdog removes it at exit.
async fn server() -> &'static PostgresServer {
    TLS_ONLY
        .get_or_init(|| {
            PostgresServer::start_with(ServerOptions {
                tls: true,
                require_tls: true,
            })
        })
        .await
}

fn ca_pem(pg: &PostgresServer) -> String {
    pg.ca_pem().expect("the server serves TLS").to_owned()
}

fn target(pg: &PostgresServer, tls: TlsMode) -> PostgresTarget {
    let mut target = PostgresTarget::new(
        pg.host(),
        pg.port(),
        pg.database(),
        pg.admin_user(),
        pg.admin_password().clone(),
    );
    target.tls = tls;
    // Generous: tests run in parallel on a small, shared, unoptimised build.
    target.connect_timeout = Duration::from_secs(15);
    target
}

fn backend(pg: &PostgresServer, tls: TlsMode) -> PostgresBackend {
    PostgresBackend::new(target(pg, tls)).expect("backend")
}

fn password() -> SecretString {
    generate_password(&PasswordPolicy::default()).expect("password")
}

fn issue(id: &str, password: &SecretString, privileges: Privileges) -> IssueRequest {
    IssueRequest {
        id: CredentialId(id.to_owned()),
        mode: IssueMode::CreateUser,
        password: password.clone(),
        valid_until: None,
        privileges,
    }
}

fn verify(id: &str, password: &SecretString, query: String) -> VerifyRequest {
    VerifyRequest {
        id: CredentialId(id.to_owned()),
        password: password.clone(),
        query,
        timeout: Duration::from_secs(20),
    }
}

fn drop_user(id: &str) -> RevokeRequest {
    RevokeRequest {
        id: CredentialId(id.to_owned()),
        mode: RevokeMode::DropUser,
        drain: DrainSessions::Terminate,
    }
}

/// Issue, verify (recording what the verification session saw of its own TLS
/// state), revoke; returns the `ssl` flag the verification session recorded.
async fn lifecycle(pg: &PostgresServer, b: &PostgresBackend) -> bool {
    let p = unique_name("tls_");
    let admin = pg.admin_client().await;
    admin
        .batch_execute(&format!("CREATE TABLE {p}_probe (ssl bool, version text)"))
        .await
        .expect("probe table");
    let user = format!("{p}_u");
    let pw = password();
    let privileges = Privileges {
        member_of: vec![],
        grants: vec![format!("INSERT ON TABLE {p}_probe")],
    };
    b.issue(&issue(&user, &pw, privileges))
        .await
        .expect("issue");
    assert!(
        b.can_login(&CredentialId(user.clone()))
            .await
            .expect("can_login")
    );
    // The credential's own session writes down whether it is encrypted.
    let probe = format!(
        "INSERT INTO {p}_probe SELECT ssl, version FROM pg_catalog.pg_stat_ssl \
         WHERE pid = pg_catalog.pg_backend_pid()"
    );
    b.verify(&verify(&user, &pw, probe)).await.expect("verify");
    let row = admin
        .query_one(&format!("SELECT ssl, version FROM {p}_probe"), &[])
        .await
        .expect("probe row");
    let ssl: bool = row.get(0);
    let version: Option<String> = row.get(1);
    if ssl {
        assert!(version.is_some_and(|v| v.starts_with("TLS")));
    }

    assert_eq!(
        b.revoke(&drop_user(&user)).await.expect("revoke"),
        RevokeOutcome::Revoked
    );
    assert!(
        !b.can_login(&CredentialId(user.clone()))
            .await
            .expect("can_login")
    );
    let err = b
        .verify(&verify(&user, &pw, "SELECT 1".into()))
        .await
        .expect_err("revoked credential");
    assert!(
        matches!(err, BackendError::VerificationFailed(_)),
        "{err:?}"
    );
    ssl
}

#[tokio::test]
async fn require_issues_verifies_and_revokes_over_tls() {
    let pg = server().await;
    let b = backend(pg, TlsMode::Require);
    b.ping().await.expect("ping over TLS");
    assert!(
        lifecycle(pg, &b).await,
        "the verification session was not encrypted"
    );

    // The pooled admin sessions are encrypted too.
    let admin = pg.admin_client().await;
    let row = admin
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl) \
             FROM pg_catalog.pg_stat_activity a JOIN pg_catalog.pg_stat_ssl s USING (pid) \
             WHERE a.application_name = 'leasehold'",
            &[],
        )
        .await
        .expect("admin sessions");
    let (all, encrypted): (i64, i64) = (row.get(0), row.get(1));
    assert!(all > 0, "no pooled admin session seen");
    assert_eq!(all, encrypted, "an admin session is not encrypted");
}

#[tokio::test]
async fn verify_full_with_the_right_ca() {
    let pg = server().await;
    let b = backend(pg, TlsMode::VerifyFull { ca_pem: ca_pem(pg) });
    b.ping().await.expect("ping with a verified certificate");
    assert!(lifecycle(pg, &b).await);

    // The certificate also names `localhost`.
    let mut by_name = target(pg, TlsMode::VerifyFull { ca_pem: ca_pem(pg) });
    by_name.host = "localhost".into();
    let by_name = PostgresBackend::new(by_name).expect("backend");
    by_name.ping().await.expect("ping by host name");
}

#[tokio::test]
async fn verify_full_with_a_wrong_ca_fails_clearly_and_fast() {
    let pg = server().await;
    let b = backend(
        pg,
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

    // An empty bundle means the public web roots, which do not know the test CA.
    let b = backend(
        pg,
        TlsMode::VerifyFull {
            ca_pem: String::new(),
        },
    );
    let err = b
        .ping()
        .await
        .expect_err("not a publicly trusted certificate");
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
}

#[tokio::test]
async fn disable_is_refused_by_a_tls_only_server() {
    let pg = server().await;
    let b = backend(pg, TlsMode::Disable);
    let started = Instant::now();
    let err = b.ping().await.expect_err("plain TCP refused");
    assert!(err.to_string().contains("no encryption"), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "took too long");
}
