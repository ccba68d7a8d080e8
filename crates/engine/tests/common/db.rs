//! One interface over the test PostgreSQL and MariaDB.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use leasehold_backends::{Backend, MySqlBackend, MySqlTarget, PostgresBackend, PostgresTarget};
use leasehold_core::Strategy;
use leasehold_engine::context::DatabaseKind;
use leasehold_engine::{LeaseContext, LeaseKey};
use leasehold_testkit::{MariaDbServer, PostgresServer};
use mysql_async::prelude::Queryable;

/// A consumer's open connection.
pub enum Session {
    Pg(tokio_postgres::Client),
    Maria(mysql_async::Conn),
}

impl Session {
    /// End the session as a consumer would (MySQL: a clean `COM_QUIT`).
    pub async fn close(self) {
        match self {
            Session::Pg(c) => drop(c),
            Session::Maria(c) => {
                let _ = c.disconnect().await;
            }
        }
    }
}

#[derive(Clone, Copy)]
pub enum Db<'a> {
    Pg(&'a PostgresServer),
    Maria(&'a MariaDbServer),
}

impl Db<'_> {
    pub fn kind(&self) -> DatabaseKind {
        match self {
            Db::Pg(_) => DatabaseKind::Postgres,
            Db::Maria(_) => DatabaseKind::MySql,
        }
    }
    pub fn host(&self) -> &str {
        match self {
            Db::Pg(s) => s.host(),
            Db::Maria(s) => s.host(),
        }
    }
    pub fn port(&self) -> u16 {
        match self {
            Db::Pg(s) => s.port(),
            Db::Maria(s) => s.port(),
        }
    }
    pub fn database(&self) -> &str {
        match self {
            Db::Pg(s) => s.database(),
            Db::Maria(s) => s.database(),
        }
    }
    /// A context for lease `key` on this database: `strategy`, revoking at once, with
    /// [`Db::minimal_privileges`] and two admin connections.
    pub fn lease_context(&self, key: &LeaseKey, strategy: Strategy) -> LeaseContext {
        super::context(
            key.clone(),
            self.kind(),
            self.backend(2),
            self.host(),
            self.port(),
            self.database(),
            super::policy(strategy, Duration::ZERO),
            self.minimal_privileges(),
        )
    }
    pub fn backend(&self, max_conns: usize) -> Arc<dyn Backend> {
        self.backend_for_accounts(max_conns, None)
    }
    /// [`Db::backend`] whose MySQL accounts are `'user'@'<account_host>'` (`None`: `%`);
    /// PostgreSQL has no account host and ignores it.
    pub fn backend_for_accounts(
        &self,
        max_conns: usize,
        account_host: Option<&str>,
    ) -> Arc<dyn Backend> {
        match self {
            Db::Pg(s) => {
                let mut t = PostgresTarget::new(
                    s.host(),
                    s.port(),
                    s.database(),
                    s.admin_user(),
                    s.admin_password().clone(),
                );
                t.max_admin_connections = max_conns;
                Arc::new(PostgresBackend::new(t).unwrap())
            }
            Db::Maria(s) => {
                let mut t = MySqlTarget::new(
                    s.host(),
                    s.port(),
                    s.database(),
                    s.admin_user(),
                    s.admin_password().clone(),
                );
                t.max_admin_connections = max_conns;
                if let Some(host) = account_host {
                    t.account_host = host.into();
                }
                Arc::new(MySqlBackend::new(t).unwrap())
            }
        }
    }
    /// Whether `user` can log in with `password` and run `sql`.
    pub async fn query_ok(&self, user: &str, password: &str, sql: &str) -> bool {
        match self {
            Db::Pg(s) => match s.connect_as(user, password).await {
                Ok(c) => c.simple_query(sql).await.is_ok(),
                Err(_) => false,
            },
            Db::Maria(s) => match s.connect_as(user, password).await {
                Ok(mut c) => {
                    let ok = c.query_drop(sql).await.is_ok();
                    let _ = c.disconnect().await;
                    ok
                }
                Err(_) => false,
            },
        }
    }
    /// Enough privilege to log in and run `SELECT 1` (MySQL needs a grant on the database).
    pub fn minimal_privileges(&self) -> leasehold_backends::Privileges {
        match self {
            Db::Pg(_) => leasehold_backends::Privileges::default(),
            Db::Maria(s) => leasehold_backends::Privileges {
                member_of: vec![],
                grants: vec![format!("SELECT ON {}.*", s.database())],
            },
        }
    }
    /// An open session as `user` (a consumer's connection).
    pub async fn session(&self, user: &str, password: &str) -> Session {
        match self {
            Db::Pg(s) => Session::Pg(s.connect_as(user, password).await.unwrap()),
            Db::Maria(s) => Session::Maria(s.connect_as(user, password).await.unwrap()),
        }
    }
    /// Whether `session` still answers a query.
    pub async fn session_alive(&self, session: Session) -> bool {
        match session {
            Session::Pg(c) => c.simple_query("SELECT 1").await.is_ok(),
            Session::Maria(mut c) => c.query_drop("SELECT 1").await.is_ok(),
        }
    }
    pub async fn can_login(&self, user: &str, password: &str) -> bool {
        self.query_ok(user, password, "SELECT 1").await
    }
    /// Run admin SQL.
    pub async fn admin(&self, sql: &str) {
        match self {
            Db::Pg(s) => {
                s.admin_client().await.batch_execute(sql).await.unwrap();
            }
            Db::Maria(s) => {
                let mut c = s.admin_conn().await;
                c.query_drop(sql).await.unwrap();
                let _ = c.disconnect().await;
            }
        }
    }
    /// Create `user` as the database's DBA would (what InPlace rotates: leasehold never
    /// creates it), locked out until leasehold sets its password.
    pub async fn create_user(&self, user: &str) {
        match self {
            Db::Pg(_) => self.admin(&format!("CREATE ROLE \"{user}\" NOLOGIN")).await,
            Db::Maria(_) => {
                self.admin(&format!("CREATE USER '{user}'@'%' ACCOUNT LOCK"))
                    .await
            }
        }
    }
    /// Set `user`'s password as its DBA would (MySQL: the `'user'@'%'` account).
    pub async fn set_password(&self, user: &str, password: &str) {
        match self {
            Db::Pg(_) => {
                self.admin(&format!("ALTER ROLE \"{user}\" PASSWORD '{password}'"))
                    .await
            }
            Db::Maria(_) => {
                self.admin(&format!(
                    "ALTER USER '{user}'@'%' IDENTIFIED BY '{password}'"
                ))
                .await
            }
        }
    }
    /// The lease's InPlace user, created first as a DBA would (other strategies: nothing).
    pub async fn create_in_place_user(&self, ctx: &LeaseContext) {
        if let leasehold_engine::NamingRule::InPlace { user } = &ctx.naming {
            self.create_user(user).await;
        }
    }
    /// Whether a user of this name exists on the server (any account host).
    pub async fn user_exists(&self, user: &str) -> bool {
        match self {
            Db::Pg(s) => s
                .admin_client()
                .await
                .query_opt(
                    "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1",
                    &[&user],
                )
                .await
                .unwrap()
                .is_some(),
            Db::Maria(s) => {
                let mut c = s.admin_conn().await;
                let n: Option<i64> = c
                    .exec_first("SELECT COUNT(*) FROM mysql.user WHERE User = ?", (user,))
                    .await
                    .unwrap();
                let _ = c.disconnect().await;
                n.unwrap_or(0) > 0
            }
        }
    }
}
