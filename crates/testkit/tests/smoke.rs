//! The harness itself: servers start, accept admin logins, survive stop/resume, and
//! leave nothing behind.

use leasehold_testkit::{MariaDbServer, MotoServer, PostgresServer, ServerOptions};
use mysql_async::prelude::Queryable;
use secrecy::ExposeSecret;

#[tokio::test]
async fn postgres_starts_stops_resumes_and_cleans_up() {
    let mut pg = PostgresServer::start().await;
    let admin = pg.admin_client().await;
    let row = admin
        .query_one(
            "SELECT current_user::text, current_setting('password_encryption'), \
                    rolsuper, rolcreaterole, \
                    pg_has_role('pg_signal_backend', 'MEMBER'), \
                    (SELECT datdba = r.oid FROM pg_database WHERE datname = current_database()) \
             FROM pg_roles r WHERE rolname = current_user",
            &[],
        )
        .await
        .expect("query");
    assert_eq!(row.get::<_, String>(0), "leasehold_admin");
    assert_eq!(row.get::<_, String>(1), "scram-sha-256");
    // What a managed database hands out: CREATEROLE and its own database, no superuser.
    assert!(!row.get::<_, bool>(2), "the admin must not be a superuser");
    assert!(row.get::<_, bool>(3), "the admin has CREATEROLE");
    assert!(
        !row.get::<_, bool>(4),
        "the admin is not in pg_signal_backend"
    );
    assert!(row.get::<_, bool>(5), "the admin owns the test database");
    let su = pg.superuser_client().await;
    su.simple_query("SELECT 1").await.expect("superuser login");
    drop(su);
    // The admin's password never reaches the server log.
    assert!(
        !pg.log_contents()
            .contains(pg.admin_password().expose_secret())
    );
    // A wrong password is refused: authentication is really checked.
    assert!(
        pg.connect_as("leasehold_admin", "wrong-password")
            .await
            .is_err()
    );
    drop(admin);

    pg.stop().await;
    assert!(
        pg.connect_as("leasehold_admin", pg.admin_password().expose_secret())
            .await
            .is_err()
    );
    pg.resume().await;
    let admin = pg.admin_client().await;
    admin
        .simple_query("SELECT 1")
        .await
        .expect("query after resume");
    assert!(pg.log_contents().contains("SELECT 1"));

    let dir = pg.data_dir();
    assert!(dir.exists());
    drop(pg);
    assert!(!dir.exists());
}

#[tokio::test]
async fn mariadb_starts_stops_resumes_and_cleans_up() {
    let mut db = MariaDbServer::start().await;
    let mut admin = db.admin_conn().await;
    let user: Option<String> = admin
        .query_first("SELECT CURRENT_USER()")
        .await
        .expect("query");
    assert_eq!(user.as_deref(), Some("leasehold_admin@%"));
    // Not root: no privilege outside what leasehold needs.
    let grants: Vec<String> = admin
        .query("SHOW GRANTS FOR CURRENT_USER")
        .await
        .expect("grants");
    assert!(
        !grants.iter().any(|g| g.contains("ALL PRIVILEGES ON *.*")),
        "{grants:?}"
    );
    let mut su = db.superuser_conn().await;
    su.query_drop("SELECT 1").await.expect("superuser login");
    su.disconnect().await.expect("disconnect");
    admin.disconnect().await.expect("disconnect");
    assert!(
        db.connect_as("leasehold_admin", "wrong-password")
            .await
            .is_err()
    );
    assert!(
        !db.log_contents()
            .contains(db.admin_password().expose_secret())
    );

    db.stop().await;
    assert!(
        db.connect_as("leasehold_admin", db.admin_password().expose_secret())
            .await
            .is_err()
    );
    db.resume().await;
    let mut admin = db.admin_conn().await;
    admin
        .query_drop("SELECT 4242")
        .await
        .expect("query after resume");
    admin.disconnect().await.expect("disconnect");
    assert!(db.log_contents().contains("SELECT 4242"));

    let dir = db.data_dir();
    drop(db);
    assert!(!dir.exists());
}

#[tokio::test]
async fn tls_servers_serve_tls_and_still_take_plain_tcp() {
    let options = ServerOptions {
        tls: true,
        require_tls: false,
    };

    let pg = PostgresServer::start_with(options).await;
    assert!(
        pg.ca_pem()
            .is_some_and(|pem| pem.contains("BEGIN CERTIFICATE"))
    );
    let admin = pg.admin_client().await;
    let row = admin
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("query");
    assert!(
        row.get::<_, bool>(0),
        "the testkit's own session is not TLS"
    );
    let mut plain = pg.config_for("leasehold_admin", pg.admin_password().expose_secret());
    plain.ssl_mode(tokio_postgres::config::SslMode::Disable);
    let (client, connection) = plain
        .connect(tokio_postgres::NoTls)
        .await
        .expect("plain TCP is still accepted");
    drop(client);
    let _ = connection.await;

    let db = MariaDbServer::start_with(options).await;
    assert!(db.ca_pem().is_some());
    let mut admin = db.admin_conn().await;
    let row: Option<(String, String)> = admin
        .query_first("SHOW STATUS LIKE 'Ssl_cipher'")
        .await
        .expect("status");
    assert!(row.is_some_and(|(_, cipher)| !cipher.is_empty()));
    admin.disconnect().await.expect("disconnect");
    let plain = mysql_async::OptsBuilder::from_opts(
        db.opts_for("leasehold_admin", db.admin_password().expose_secret()),
    )
    .ssl_opts(None::<mysql_async::SslOpts>);
    let conn = mysql_async::Conn::new(plain)
        .await
        .expect("plain TCP is still accepted");
    conn.disconnect().await.expect("disconnect");

    // Servers started without options have no TLS.
    assert_eq!(
        ServerOptions::default(),
        ServerOptions {
            tls: false,
            require_tls: false
        }
    );
}

#[tokio::test]
async fn moto_starts_restarts_on_the_same_port_and_goes_away() {
    if !MotoServer::available_for("moto_starts_restarts_on_the_same_port_and_goes_away") {
        return;
    }
    let mut moto = MotoServer::start().await;
    let endpoint = moto.endpoint_url();
    let key_id = moto.create_key().await;
    moto.disable_key(&key_id).await;
    moto.enable_key(&key_id).await;
    moto.restart().await;
    assert_eq!(moto.endpoint_url(), endpoint);
    // A fresh server: keys live in memory only.
    let keys = moto
        .kms_client()
        .await
        .list_keys()
        .send()
        .await
        .expect("ListKeys");
    assert!(keys.keys().is_empty(), "{keys:?}");
    let port = endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .expect("port");
    drop(moto);
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "moto still listens after drop"
    );
}
