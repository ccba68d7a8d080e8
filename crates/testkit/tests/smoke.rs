//! The harness itself: servers start, accept admin logins, survive stop/resume, and
//! leave nothing behind.

use leasehold_testkit::{MariaDbServer, PostgresServer};
use mysql_async::prelude::Queryable;
use secrecy::ExposeSecret;

#[tokio::test]
async fn postgres_starts_stops_resumes_and_cleans_up() {
    let mut pg = PostgresServer::start().await;
    let admin = pg.admin_client().await;
    let row = admin
        .query_one(
            "SELECT current_user::text, current_setting('password_encryption')",
            &[],
        )
        .await
        .expect("query");
    assert_eq!(row.get::<_, String>(0), "leasehold_admin");
    assert_eq!(row.get::<_, String>(1), "scram-sha-256");
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
