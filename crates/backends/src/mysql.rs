//! MySQL / MariaDB backend.
//!
//! Users are `'name'@'<host>'`, the host part from [`MySqlTarget::account_host`]
//! (default `%`), used for every statement and catalog lookup. Passwords are sent pre-hashed in the
//! `mysql_native_password` stored form (`*` + hex of SHA1(SHA1(password))), so the
//! plaintext never reaches the server or its general log.
//!
//! `IDENTIFIED WITH mysql_native_password AS '<hash>'` works on MariaDB (all
//! supported versions) and MySQL 5.7/8.0. MySQL 8.4 disables that plugin by default
//! and 9.x removes it: there the stored form would have to be a
//! `caching_sha2_password` hash (`$A$005$` + salt + 5000-round SHA-256 crypt),
//! which this backend does not compute yet.
//!
//! MySQL and MariaDB have no per-user expiry time. `IssueRequest::valid_until` only
//! becomes a `PASSWORD EXPIRE INTERVAL` in whole days, which is not revocation: a
//! client holding an expired password may still log in (in sandbox mode) and set a new
//! one itself. Revocation (lock, drop) and the orphan sweeper are what end a MySQL
//! credential.
//!
//! The admin needs no more than a managed database's admin has, and not root:
//! * `CREATE USER` (create, alter, lock, drop users; the creator of a role gets
//!   `ADMIN OPTION` on it, so it may grant it);
//! * the privileges it grants, `WITH GRANT OPTION`;
//! * `SELECT` on `mysql.user` (and on MariaDB `mysql.global_priv`, which holds the
//!   lock state) to find users;
//! * `SELECT` on `mysql.db` and `mysql.tables_priv`, to reconcile a reused user
//!   (AlternatingUsers, InPlace): issuing to an existing user revokes the database- and
//!   table-level privileges it holds that the spec no longer lists (after the spec's
//!   grants, so a kept privilege never goes missing). Global, routine and column
//!   privileges and the grant option are left alone;
//! * `SELECT` on `mysql.roles_mapping` (MariaDB) or `mysql.role_edges` (MySQL), to
//!   revoke the roles of a reused user that `memberOf` no longer lists and reset its
//!   default role (the first listed role on MariaDB, all granted roles on MySQL, `NONE`
//!   when none is listed and a role was revoked). Needed on every reuse. No grantor is recorded for roles, so on MariaDB only roles
//!   the admin holds `WITH ADMIN OPTION` are revoked; on MySQL every unlisted role;
//! * `PROCESS` to see other users' sessions: without it the admin only sees its own
//!   and draining would find none, so revocation refuses to go on (see below);
//! * `CONNECTION ADMIN` (MariaDB 10.5.2+, MySQL 8) or `SUPER` to kill them
//!   (`DrainSessions::Terminate`);
//! * on MariaDB with `memberOf`: `UPDATE` on the `mysql` database, which
//!   `SET DEFAULT ROLE ... FOR <user>` requires for any user but one's own (roles
//!   only take effect at login as the default role). MySQL needs no more than the
//!   role's `ADMIN OPTION`.
//!
//! [`RevokeMode::ScramblePassword`] (an InPlace user, which belongs to someone else) is
//! `ALTER USER .. IDENTIFIED WITH mysql_native_password AS '<hash>'` of a random password
//! kept nowhere, on the configured account host: the password leasehold handed out stops
//! working; the lock state, roles and privileges stay as they are. Sessions are then
//! drained as for the other modes.
//!
//! A missing privilege is reported as [`BackendError::PermissionDenied`] naming the step.
//!
//! With [`TlsMode::Require`] or [`TlsMode::VerifyFull`] both the admin pool and the
//! verification connections use TLS (mysql_async over rustls with `ring`). A server
//! that does not offer TLS, or whose certificate fails verification, is refused with
//! [`BackendError::Invalid`].

use std::time::Duration;

use async_trait::async_trait;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder, Pool, PoolConstraints, PoolOpts, SslOpts};
use secrecy::ExposeSecret;
use sha1::{Digest, Sha1};
use tokio::sync::OnceCell;
use tracing::instrument;

use leasehold_grants::{MySqlGrant, MySqlObject, PrivilegeSet};

use crate::sql::{
    LIKE_ESCAPE, check_mysql_text, check_name, like_prefix, mysql_grant_clause, mysql_grant_object,
    mysql_grants, mysql_ident, mysql_literal, redact,
};
use crate::{
    Backend, BackendError, CredentialId, DrainSessions, IssueMode, IssueRequest, MySqlTarget,
    PasswordPolicy, RevokeMode, RevokeOutcome, RevokeRequest, TlsMode, VerifyRequest,
    generate_password,
};

/// MariaDB allows 80 characters for a user name (MySQL 8: 32; the server rejects
/// what it cannot store, it does not truncate).
const MAX_NAME_CHARS: usize = 80;
const TERMINATE_WAIT: Duration = Duration::from_secs(5);

/// `ER_NO_SUCH_THREAD`: the session ended before we killed it.
const ER_NO_SUCH_THREAD: u16 = 1094;

impl MySqlTarget {
    /// mysql_async's TLS settings for the target's mode (`None`: plain TCP).
    fn ssl_opts(&self) -> Result<Option<SslOpts>, BackendError> {
        Ok(match &self.tls {
            TlsMode::Disable => None,
            // Encrypt, check nothing about the certificate (libpq's `require`).
            TlsMode::Require => Some(
                SslOpts::default()
                    .with_danger_accept_invalid_certs(true)
                    .with_danger_skip_domain_validation(true),
            ),
            TlsMode::VerifyFull { ca_pem } => {
                let certs = crate::tls::parse_ca_bundle(ca_pem)?;
                // An explicit CA bundle replaces the built-in (Mozilla) roots.
                let roots = certs
                    .into_iter()
                    .map(|cert| cert.as_ref().to_vec().into())
                    .collect::<Vec<_>>();
                Some(
                    SslOpts::default()
                        .with_disable_built_in_roots(!roots.is_empty())
                        .with_root_certs(roots),
                )
            }
        })
    }

    fn opts(&self, user: &str, password: &str, ssl: Option<SslOpts>) -> OptsBuilder {
        OptsBuilder::default()
            .ip_or_hostname(self.host.clone())
            .tcp_port(self.port)
            // Never switch to a local socket: verification must log in over TCP
            // like the application will, and the account's host pattern must be
            // what matches.
            .prefer_socket(false)
            .user(Some(user))
            .pass(Some(password))
            .db_name((!self.database.is_empty()).then(|| self.database.clone()))
            .ssl_opts(ssl)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    MariaDb,
    MySql,
}

/// [`Backend`] for MySQL and MariaDB.
pub struct MySqlBackend {
    target: MySqlTarget,
    pool: Pool,
    ssl: Option<SslOpts>,
    flavor: OnceCell<Flavor>,
}

impl std::fmt::Debug for MySqlBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MySqlBackend")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl MySqlBackend {
    /// Build the backend. Connects lazily: call [`Backend::ping`] to check the target.
    /// The pool's background tasks start on the Tokio runtime of first use: use one
    /// backend from one runtime.
    pub fn new(target: MySqlTarget) -> Result<Self, BackendError> {
        check_account_host(&target.account_host)?;
        crate::tls::check_server_name(&target.tls, &target.host)?;
        let ssl = target.ssl_opts()?;
        if ssl.is_some() {
            crate::tls::ensure_default_provider();
        }
        let constraints = PoolConstraints::new(0, target.max_admin_connections)
            .filter(|_| target.max_admin_connections > 0)
            .ok_or_else(|| {
                BackendError::Invalid("max_admin_connections must be at least 1".into())
            })?;
        let opts = target
            .opts(
                &target.admin_user,
                target.admin_password.expose_secret(),
                ssl.clone(),
            )
            .pool_opts(PoolOpts::default().with_constraints(constraints));
        let pool = Pool::new(opts);
        Ok(Self {
            target,
            pool,
            ssl,
            flavor: OnceCell::new(),
        })
    }

    pub fn target(&self) -> &MySqlTarget {
        &self.target
    }

    /// Close the pooled admin connections gracefully.
    pub async fn close(self) {
        let _ = self.pool.disconnect().await;
    }

    async fn admin(&self) -> Result<Conn, BackendError> {
        match tokio::time::timeout(self.target.connect_timeout, self.pool.get_conn()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(admin_error(
                &e,
                &[self.target.admin_password.expose_secret()],
            )),
            Err(_) => Err(BackendError::Unreachable(format!(
                "no admin connection to {} within {:?}",
                self.target_key(),
                self.target.connect_timeout
            ))),
        }
    }

    async fn flavor(&self, conn: &mut Conn) -> Result<Flavor, BackendError> {
        self.flavor
            .get_or_try_init(|| async {
                let version: Option<String> = conn
                    .query_first("SELECT VERSION()")
                    .await
                    .map_err(|e| admin_error(&e, &[]))?;
                Ok(match version {
                    Some(v) if v.contains("MariaDB") => Flavor::MariaDb,
                    _ => Flavor::MySql,
                })
            })
            .await
            .copied()
    }

    async fn issue_inner(&self, req: &IssueRequest) -> Result<(), BackendError> {
        let name = req.id.0.as_str();
        check_user_name(name)?;
        for role in &req.privileges.member_of {
            check_user_name(role)?;
        }
        let grants = mysql_grants(&req.privileges.grants)?;
        let password = req.password.expose_secret();
        if password.is_empty() {
            return Err(BackendError::Invalid("empty password".into()));
        }
        let hash = native_password_hash(password);
        let secrets = [password, hash.as_str()];
        let account = account(name, &self.target.account_host);
        let auth = native_auth(&hash);

        let mut conn = self.admin().await?;
        let flavor = self.flavor(&mut conn).await?;
        let map = |e: mysql_async::Error| admin_error(&e, &secrets);
        // DDL is not transactional here: create the user locked, grant, and only then
        // set the password and unlock, so a half-made user cannot log in. An existing
        // user keeps working until the final ALTER.
        let existed = user_exists(&mut conn, name, &self.target.account_host)
            .await
            .map_err(map)?;
        if req.mode == IssueMode::ExistingUser {
            // Never create it: a mistyped name would become a new login.
            if !existed {
                return Err(crate::missing_user(name));
            }
        } else {
            conn.query_drop(format!(
                "CREATE USER IF NOT EXISTS {account} {auth} ACCOUNT LOCK"
            ))
            .await
            .map_err(map)?;
        }
        for role in &req.privileges.member_of {
            conn.query_drop(format!("GRANT {} TO {account}", mysql_ident(role)))
                .await
                .map_err(|e| {
                    map(e).in_step(|| {
                        format!("to grant role {role:?} (it needs ADMIN OPTION on the role)")
                    })
                })?;
        }
        let mut revoked_roles = false;
        if existed {
            // A reused user keeps the roles earlier rotations granted: take back the
            // ones `memberOf` no longer lists (the listed ones were granted above).
            revoked_roles = revoke_removed_roles(
                &mut conn,
                flavor,
                name,
                &self.target.account_host,
                &req.privileges.member_of,
            )
            .await
            .map_err(|e| {
                map(e).in_step(|| {
                    format!(
                        "to revoke the roles of user {name:?} that are no longer in the spec \
                         (it needs SELECT on {} and ADMIN OPTION on those roles)",
                        match flavor {
                            Flavor::MariaDb => "mysql.roles_mapping",
                            Flavor::MySql => "mysql.role_edges",
                        }
                    )
                })
            })?;
        }
        let default_role = match req.privileges.member_of.first() {
            // Roles only take effect when active; make them active at login.
            Some(first) => Some(match flavor {
                // MariaDB has exactly one default role per user.
                Flavor::MariaDb => format!("SET DEFAULT ROLE {} FOR {account}", mysql_ident(first)),
                Flavor::MySql => format!("SET DEFAULT ROLE ALL TO {account}"),
            }),
            // A reused user that lost its roles: no default role any more.
            None if revoked_roles => Some(match flavor {
                Flavor::MariaDb => format!("SET DEFAULT ROLE NONE FOR {account}"),
                Flavor::MySql => format!("SET DEFAULT ROLE NONE TO {account}"),
            }),
            None => None,
        };
        if let Some(statement) = default_role {
            let first = req
                .privileges
                .member_of
                .first()
                .map_or("NONE", String::as_str);
            conn.query_drop(statement).await.map_err(|e| {
                map(e).in_step(|| match flavor {
                    Flavor::MariaDb => format!(
                        "to make {first:?} the default role of user {name:?} (MariaDB requires \
                         UPDATE on the mysql database for SET DEFAULT ROLE ... FOR another user)"
                    ),
                    Flavor::MySql => format!(
                        "to make the roles of user {name:?} its default roles (it needs \
                         CREATE USER)"
                    ),
                })
            })?;
        }
        for grant in &grants {
            let clause = mysql_grant_clause(grant);
            conn.query_drop(format!("GRANT {clause} TO {account}"))
                .await
                .map_err(|e| {
                    map(e).in_step(|| {
                        format!("to grant `{clause}` (it needs those privileges WITH GRANT OPTION)")
                    })
                })?;
        }
        if existed {
            // A reused user keeps what earlier rotations granted: take back what the
            // spec no longer lists (after granting, so what stays never goes missing).
            revoke_removed_privileges(&mut conn, name, &self.target.account_host, &grants)
                .await
                .map_err(|e| {
                    map(e).in_step(|| {
                        format!(
                            "to revoke the privileges of user {name:?} that are no longer in \
                             the spec (it needs SELECT on mysql.db and mysql.tables_priv, and \
                             those privileges WITH GRANT OPTION)"
                        )
                    })
                })?;
        }
        let expiry = password_expiry_clause(req.valid_until, jiff::Timestamp::now());
        conn.query_drop(format!("ALTER USER {account} {auth} ACCOUNT UNLOCK {expiry}").trim_end())
            .await
            .map_err(map)?;
        Ok(())
    }

    async fn verify_inner(&self, req: &VerifyRequest) -> Result<(), BackendError> {
        let password = req.password.expose_secret();
        let secrets = [password];
        let opts = self.target.opts(&req.id.0, password, self.ssl.clone());
        let login = async {
            Conn::new(opts).await.map_err(|e| match &e {
                // No answer, no acceptable TLS session, or a server that refuses
                // connections for now: not the credential's fault.
                mysql_async::Error::Io(_)
                | mysql_async::Error::Driver(_)
                | mysql_async::Error::Url(_) => admin_error(&e, &secrets),
                mysql_async::Error::Server(s) if is_unavailable(s) => {
                    BackendError::Unreachable(redact(
                        format!("login as {} not possible now: {}", req.id, describe(&e)),
                        &secrets,
                    ))
                }
                _ => BackendError::VerificationFailed(redact(
                    format!("login as {} refused: {}", req.id, describe(&e)),
                    &secrets,
                )),
            })
        };
        let mut conn =
            crate::login_within(req, self.target.connect_timeout, &self.target.key(), login)
                .await?;
        let result = crate::query_within(req, async {
            conn.query_drop(req.query.as_str()).await.map_err(|e| {
                let text = redact(
                    format!("query as {} failed: {}", req.id, describe(&e)),
                    &secrets,
                );
                match &e {
                    mysql_async::Error::Server(s) if !is_unavailable(s) => {
                        BackendError::VerificationFailed(text)
                    }
                    mysql_async::Error::Server(_) | mysql_async::Error::Io(_) => {
                        BackendError::Unreachable(text)
                    }
                    _ => BackendError::VerificationFailed(text),
                }
            })
        })
        .await;
        let _ = conn.disconnect().await;
        result
    }

    async fn revoke_inner(&self, req: &RevokeRequest) -> Result<RevokeOutcome, BackendError> {
        let name = req.id.0.as_str();
        check_user_name(name)?;
        let account = account(name, &self.target.account_host);
        // What stops new logins: a lock, or a password nobody knows (the stored form of
        // a random password that is dropped here), leaving the lock state alone.
        let (stop_logins, hash, step) = match req.mode {
            RevokeMode::Nothing => return Ok(RevokeOutcome::Revoked),
            RevokeMode::DropUser | RevokeMode::DisableLogin => {
                (String::from("ACCOUNT LOCK"), None, "to lock")
            }
            RevokeMode::ScramblePassword => {
                let hash = native_password_hash(
                    generate_password(&PasswordPolicy::default())?.expose_secret(),
                );
                (
                    native_auth(&hash),
                    Some(hash),
                    "to set an unknown password on",
                )
            }
        };
        let secrets: Vec<&str> = hash.as_deref().into_iter().collect();
        let mut conn = self.admin().await?;
        let map = |e: mysql_async::Error| admin_error(&e, &[]);

        if !user_exists(&mut conn, name, &self.target.account_host)
            .await
            .map_err(map)?
        {
            return Ok(RevokeOutcome::Revoked);
        }
        // IF EXISTS: a concurrent revoke may have dropped it since the check.
        conn.query_drop(format!("ALTER USER IF EXISTS {account} {stop_logins}"))
            .await
            .map_err(|e| {
                admin_error(&e, &secrets)
                    .in_step(|| format!("{step} user {name:?} (it needs CREATE USER)"))
            })?;

        if req.drain != DrainSessions::Ignore && !sees_all_sessions(&mut conn).await.map_err(map)? {
            // The process list would only show the admin's own sessions: counting none
            // there would drop a user whose sessions are still open.
            return Err(BackendError::PermissionDenied(format!(
                "to see the sessions of user {name:?}: the admin needs the PROCESS privilege \
                 (and CONNECTION ADMIN or SUPER to terminate them), or the policy's \
                 drainSessions mode Ignore"
            )));
        }

        let remaining = match req.drain {
            DrainSessions::Ignore => 0,
            DrainSessions::Wait => session_ids(&mut conn, name).await.map_err(map)?.len(),
            DrainSessions::Terminate => {
                for id in session_ids(&mut conn, name).await.map_err(map)? {
                    match conn.query_drop(format!("KILL CONNECTION {id}")).await {
                        Ok(()) => {}
                        Err(mysql_async::Error::Server(e)) if e.code == ER_NO_SUCH_THREAD => {}
                        Err(e) => {
                            return Err(map(e).in_step(|| {
                                format!(
                                    "to terminate the sessions of user {name:?} (it needs \
                                     CONNECTION ADMIN or SUPER)"
                                )
                            }));
                        }
                    }
                }
                let deadline = tokio::time::Instant::now() + TERMINATE_WAIT;
                loop {
                    let n = session_ids(&mut conn, name).await.map_err(map)?.len();
                    if n == 0 || tokio::time::Instant::now() >= deadline {
                        break n;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        if remaining > 0 {
            return Ok(RevokeOutcome::SessionsRemain(
                u32::try_from(remaining).unwrap_or(u32::MAX),
            ));
        }
        if req.mode == RevokeMode::DropUser {
            conn.query_drop(format!("DROP USER IF EXISTS {account}"))
                .await
                .map_err(|e| {
                    map(e).in_step(|| format!("to drop user {name:?} (it needs CREATE USER)"))
                })?;
        }
        Ok(RevokeOutcome::Revoked)
    }
}

fn check_user_name(name: &str) -> Result<(), BackendError> {
    check_name("user", name, MAX_NAME_CHARS)?;
    check_mysql_text("user name", name)
}

/// `mysql.db` privilege columns and the privilege each stands for (the columns MySQL
/// 5.7+ and MariaDB share).
const DB_PRIVILEGE_COLUMNS: &[(&str, &str)] = &[
    ("Select_priv", "SELECT"),
    ("Insert_priv", "INSERT"),
    ("Update_priv", "UPDATE"),
    ("Delete_priv", "DELETE"),
    ("Create_priv", "CREATE"),
    ("Drop_priv", "DROP"),
    ("References_priv", "REFERENCES"),
    ("Index_priv", "INDEX"),
    ("Alter_priv", "ALTER"),
    ("Create_tmp_table_priv", "CREATE TEMPORARY TABLES"),
    ("Lock_tables_priv", "LOCK TABLES"),
    ("Create_view_priv", "CREATE VIEW"),
    ("Show_view_priv", "SHOW VIEW"),
    ("Create_routine_priv", "CREATE ROUTINE"),
    ("Alter_routine_priv", "ALTER ROUTINE"),
    ("Execute_priv", "EXECUTE"),
    ("Event_priv", "EVENT"),
    ("Trigger_priv", "TRIGGER"),
];

/// The database- and table-level privileges `'name'@'host'` holds (from `mysql.db` and
/// `mysql.tables_priv`) that `grants` do not list are revoked. Global, routine and
/// column privileges, the grant option and roles are left alone.
async fn revoke_removed_privileges(
    conn: &mut Conn,
    name: &str,
    host: &str,
    grants: &[MySqlGrant],
) -> Result<(), mysql_async::Error> {
    let columns = DB_PRIVILEGE_COLUMNS
        .iter()
        .map(|(column, privilege)| format!("IF({column} = 'Y', '{privilege}', NULL)"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut held: Vec<(MySqlObject, Vec<String>)> = Vec::new();
    let rows: Vec<(String, String)> = conn
        .exec(
            format!(
                "SELECT Db, CONCAT_WS(',', {columns}) FROM mysql.db WHERE User = ? AND Host = ?"
            ),
            (name, host),
        )
        .await?;
    for (database, privileges) in rows {
        held.push((
            MySqlObject::Database(database),
            split_privileges(&privileges),
        ));
    }
    let rows: Vec<(String, String, String)> = conn
        .exec(
            "SELECT Db, Table_name, Table_priv FROM mysql.tables_priv WHERE User = ? AND Host = ?",
            (name, host),
        )
        .await?;
    for (database, table, privileges) in rows {
        held.push((
            MySqlObject::Table { database, table },
            split_privileges(&privileges),
        ));
    }
    let account = account(name, host);
    for (object, privileges) in held {
        let wanted: Vec<&PrivilegeSet> = grants
            .iter()
            .filter(|g| g.object == object)
            .map(|g| &g.privileges)
            .collect();
        let extra = if wanted.is_empty() {
            "ALL PRIVILEGES".to_owned()
        } else if wanted.contains(&&PrivilegeSet::All) {
            continue;
        } else {
            let extra: Vec<String> = privileges
                .into_iter()
                .filter(|p| {
                    !wanted
                        .iter()
                        .any(|w| matches!(w, PrivilegeSet::Listed(l) if l.contains(p)))
                })
                .collect();
            if extra.is_empty() {
                continue;
            }
            extra.join(", ")
        };
        conn.query_drop(format!(
            "REVOKE {extra} ON {} FROM {account}",
            mysql_grant_object(&object)
        ))
        .await?;
    }
    Ok(())
}

/// Revoke the roles `'name'@'host'` holds that `keep` does not list. MySQL and MariaDB
/// record no grantor, so on MariaDB only roles the admin holds `WITH ADMIN OPTION` (from
/// `mysql.roles_mapping`; the creator of a role has it) are revoked, which are the roles
/// leasehold could have granted; on MySQL every unlisted role in `mysql.role_edges` is.
async fn revoke_removed_roles(
    conn: &mut Conn,
    flavor: Flavor,
    name: &str,
    host: &str,
    keep: &[String],
) -> Result<bool, mysql_async::Error> {
    let held: Vec<(String, String)> = match flavor {
        Flavor::MariaDb => {
            conn.exec(
                "SELECT m.Role, '' FROM mysql.roles_mapping m \
                  WHERE m.User = ? AND m.Host = ? AND EXISTS ( \
                        SELECT 1 FROM mysql.roles_mapping a \
                         WHERE a.Role = m.Role AND a.Admin_option = 'Y' \
                           AND CONCAT(a.User, '@', a.Host) = CURRENT_USER())",
                (name, host),
            )
            .await?
        }
        Flavor::MySql => {
            conn.exec(
                "SELECT FROM_USER, FROM_HOST FROM mysql.role_edges \
                  WHERE TO_USER = ? AND TO_HOST = ?",
                (name, host),
            )
            .await?
        }
    };
    let account = account(name, host);
    let mut revoked = false;
    for (role, role_host) in held {
        if keep.contains(&role) {
            continue;
        }
        revoked = true;
        let role = if role_host.is_empty() {
            mysql_ident(&role)
        } else {
            self::account(&role, &role_host)
        };
        conn.query_drop(format!("REVOKE {role} FROM {account}"))
            .await?;
    }
    Ok(revoked)
}

/// `Select,Create View` (a `tables_priv` SET, or our `CONCAT_WS`) as privilege names;
/// the grant option is not one.
fn split_privileges(list: &str) -> Vec<String> {
    list.split(',')
        .map(|p| p.trim().to_ascii_uppercase())
        .filter(|p| !p.is_empty() && p != "GRANT")
        .map(|p| match p.as_str() {
            // MariaDB's SET value for DELETE HISTORY.
            "DELETE VERSIONING ROWS" => "DELETE HISTORY".to_owned(),
            _ => p,
        })
        .collect()
}

/// MySQL 8 and MariaDB allow 255 characters for the host part of an account.
const MAX_HOST_CHARS: usize = 255;

/// An account host pattern: a host name, an IP address, a pattern with `%` and `_`,
/// or `address/netmask`. Nothing that could end the quoted literal.
pub(crate) fn check_account_host(host: &str) -> Result<(), BackendError> {
    let ok = !host.is_empty()
        && host.chars().count() <= MAX_HOST_CHARS
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".%_:-/".contains(c));
    if ok {
        Ok(())
    } else {
        Err(BackendError::Invalid(format!(
            "account host {host:?} is not a host pattern: use letters, digits and . % _ : - / \
             only, at most {MAX_HOST_CHARS} characters (e.g. %, 10.%, localhost)"
        )))
    }
}

/// `IDENTIFIED WITH mysql_native_password AS '<hash>'`: the password in its stored form
/// (see [`native_password_hash`]), so the plaintext never reaches the server.
fn native_auth(hash: &str) -> String {
    format!(
        "IDENTIFIED WITH mysql_native_password AS {}",
        mysql_literal(hash)
    )
}

/// `'name'@'host'`, for a name and host already checked.
fn account(name: &str, host: &str) -> String {
    format!("{}@{}", mysql_literal(name), mysql_literal(host))
}

async fn user_exists(conn: &mut Conn, name: &str, host: &str) -> Result<bool, mysql_async::Error> {
    let n: Option<u64> = conn
        .exec_first(
            "SELECT COUNT(*) FROM mysql.user WHERE User = ? AND Host = ?",
            (name, host),
        )
        .await?;
    Ok(n.unwrap_or(0) > 0)
}

/// Whether the admin sees every user's sessions in the process list (`PROCESS`, or
/// `SUPER` which implies it on older servers).
async fn sees_all_sessions(conn: &mut Conn) -> Result<bool, mysql_async::Error> {
    let n: Option<u64> = conn
        .query_first(
            "SELECT COUNT(*) FROM information_schema.USER_PRIVILEGES \
             WHERE PRIVILEGE_TYPE IN ('PROCESS', 'SUPER') \
               AND GRANTEE = CONCAT(QUOTE(SUBSTRING_INDEX(CURRENT_USER(), '@', 1)), '@', \
                                    QUOTE(SUBSTRING_INDEX(CURRENT_USER(), '@', -1)))",
        )
        .await?;
    Ok(n.unwrap_or(0) > 0)
}

async fn session_ids(conn: &mut Conn, name: &str) -> Result<Vec<u64>, mysql_async::Error> {
    conn.exec(
        "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = ? AND ID <> CONNECTION_ID()",
        (name,),
    )
    .await
}

#[async_trait]
impl Backend for MySqlBackend {
    fn kind(&self) -> &'static str {
        "mysql"
    }

    fn target_key(&self) -> String {
        self.target.key()
    }

    #[instrument(skip_all, fields(backend = "mysql", id = %req.id, mode = ?req.mode))]
    async fn issue(&self, req: &IssueRequest) -> Result<(), BackendError> {
        self.target.bounded(self.issue_inner(req)).await
    }

    #[instrument(skip_all, fields(backend = "mysql", id = %req.id))]
    async fn verify(&self, req: &VerifyRequest) -> Result<(), BackendError> {
        self.verify_inner(req).await
    }

    #[instrument(skip_all, fields(backend = "mysql", id = %req.id, mode = ?req.mode, drain = ?req.drain))]
    async fn revoke(&self, req: &RevokeRequest) -> Result<RevokeOutcome, BackendError> {
        self.target.bounded(self.revoke_inner(req)).await
    }

    #[instrument(skip_all, fields(backend = "mysql", id = %id))]
    async fn can_login(&self, id: &CredentialId) -> Result<bool, BackendError> {
        check_user_name(&id.0)?;
        self.target
            .bounded(async {
                let mut conn = self.admin().await?;
                let map = |e: mysql_async::Error| admin_error(&e, &[]);
                if !user_exists(&mut conn, &id.0, &self.target.account_host)
                    .await
                    .map_err(map)?
                {
                    return Ok(false);
                }
                match self.flavor(&mut conn).await? {
                    // MariaDB's mysql.user view lacks `account_locked`, and SHOW CREATE
                    // USER needs SELECT on the whole mysql database: read the JSON.
                    Flavor::MariaDb => {
                        let locked: Option<Option<String>> = conn
                            .exec_first(
                                "SELECT JSON_VALUE(Priv, '$.account_locked') \
                                 FROM mysql.global_priv WHERE User = ? AND Host = ?",
                                (id.0.as_str(), self.target.account_host.as_str()),
                            )
                            .await
                            .map_err(map)?;
                        // JSON `true` comes back as "1" (10.11) or "true".
                        Ok(!matches!(locked, Some(Some(v)) if v == "1" || v == "true"))
                    }
                    Flavor::MySql => {
                        let create: Option<String> = conn
                            .query_first(format!(
                                "SHOW CREATE USER {}",
                                account(&id.0, &self.target.account_host)
                            ))
                            .await
                            .map_err(map)?;
                        Ok(create.is_some_and(|create| !create.contains("ACCOUNT LOCK")))
                    }
                }
            })
            .await
    }

    #[instrument(skip_all, fields(backend = "mysql", prefix))]
    async fn list_users(&self, prefix: &str) -> Result<Vec<CredentialId>, BackendError> {
        let pattern = like_prefix(prefix);
        let sql = format!(
            "SELECT User FROM mysql.user WHERE Host = ? AND User LIKE ? ESCAPE '{LIKE_ESCAPE}' \
             ORDER BY User"
        );
        self.target
            .bounded(async {
                let mut conn = self.admin().await?;
                let users: Vec<String> = conn
                    .exec(
                        sql.as_str(),
                        (self.target.account_host.as_str(), pattern.as_str()),
                    )
                    .await
                    .map_err(|e| admin_error(&e, &[]))?;
                Ok(users.into_iter().map(CredentialId).collect())
            })
            .await
    }

    #[instrument(skip_all, fields(backend = "mysql"))]
    async fn ping(&self) -> Result<(), BackendError> {
        self.target
            .bounded(async {
                let mut conn = self.admin().await?;
                conn.query_drop("SELECT 1")
                    .await
                    .map_err(|e| admin_error(&e, &[]))
            })
            .await
    }
}

/// The `mysql_native_password` stored form: `*` + upper-case hex of SHA1(SHA1(pw)).
pub(crate) fn native_password_hash(password: &str) -> String {
    let inner = Sha1::digest(password.as_bytes());
    let outer = Sha1::digest(inner);
    let mut out = String::with_capacity(41);
    out.push('*');
    for byte in outer {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn describe(e: &mysql_async::Error) -> String {
    match e {
        mysql_async::Error::Server(s) => {
            format!("{} ({}, SQLSTATE {})", s.message, s.code, s.state)
        }
        other => other.to_string(),
    }
}

/// Server errors that say it cannot take the connection or statement now, for a reason
/// that passes: too many connections (1040), per-user connection limits (1203
/// `max_user_connections`, 1226 an account's resource limit), host blocked after
/// connection errors (1129), shutdown in progress (1053), server gone (2006, 2013),
/// and SQLSTATE class 08 (connection exceptions).
fn is_unavailable(e: &mysql_async::ServerError) -> bool {
    matches!(e.code, 1040 | 1053 | 1129 | 1203 | 1226 | 2006 | 2013) || e.state.starts_with("08")
}

/// Classify an error met while working as admin.
fn admin_error(e: &mysql_async::Error, secrets: &[&str]) -> BackendError {
    let text = redact(describe(e), secrets);
    match e {
        mysql_async::Error::Io(io) => match crate::tls::certificate_rejection(io) {
            // The spec's CA or host does not match the server: retrying cannot help.
            Some(why) => BackendError::Invalid(redact(
                format!("the server's TLS certificate was rejected: {why}"),
                secrets,
            )),
            None => BackendError::Unreachable(text),
        },
        mysql_async::Error::Driver(mysql_async::DriverError::NoClientSslFlagFromServer) => {
            BackendError::Invalid(format!(
                "TLS is required by the target's TLS mode but the server does not offer it \
                 ({text})"
            ))
        }
        mysql_async::Error::Driver(mysql_async::DriverError::ConnectionClosed) => {
            BackendError::Unreachable(text)
        }
        mysql_async::Error::Url(_) => BackendError::Invalid(text),
        mysql_async::Error::Server(s) => match s.code {
            // Access denied at login: a wrong admin user or password.
            1045 => BackendError::AdminRejected(text),
            // Logged in, but denied a database (1044), a table (1142), a column (1143),
            // a privilege (1227), granting (1410), or killing a thread (1095).
            1044 | 1095 | 1142 | 1143 | 1227 | 1410 => BackendError::permission_denied(text),
            _ if is_unavailable(s) => BackendError::Unreachable(text),
            // Invalid role (MariaDB 1959), unknown database (1049).
            1959 | 1049 => BackendError::Invalid(text),
            _ if s.state.starts_with("42") => BackendError::Invalid(text),
            _ => BackendError::Other(text),
        },
        _ => BackendError::Other(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_hash_matches_the_server_format() {
        // SELECT PASSWORD('password') on MariaDB / MySQL 5.7.
        assert_eq!(
            native_password_hash("password"),
            "*2470C0C06DEE42FD1618BB99005ADCA2EC9D1E19"
        );
    }

    #[test]
    fn passing_server_conditions_are_unavailable() {
        let server = |code: u16, state: &str| mysql_async::ServerError {
            code,
            message: String::new(),
            state: state.into(),
        };
        for (code, state) in [
            (1040, "08004"),
            (1203, "42000"),
            (1226, "42000"),
            (1053, "08S01"),
        ] {
            assert!(is_unavailable(&server(code, state)), "{code}");
        }
        for (code, state) in [(1045, "28000"), (1044, "42000"), (1146, "42S02")] {
            assert!(!is_unavailable(&server(code, state)), "{code}");
        }
    }

    #[test]
    fn accounts_are_quoted() {
        assert_eq!(account("app_1", "%"), "'app_1'@'%'");
        assert_eq!(account("o'x", "10.%"), "'o''x'@'10.%'");
        assert!(check_account_host("10.0.0.0/255.0.0.0").is_ok());
        assert!(check_account_host("localhost").is_ok());
        for bad in ["", "a'b", "a\\b", "%' OR '1", "a b", &"h".repeat(256)] {
            assert!(check_account_host(bad).is_err(), "{bad}");
        }
        assert!(check_user_name("a\\b").is_err());
    }
}

/// MySQL and MariaDB have no expiry time for a user, only a password lifetime in whole
/// days: a credential with `valid_until` has its password expire on the server at most
/// a day after it. That is a backstop, not revocation: a client holding an expired
/// password may still connect (sandbox mode) and set a new password itself.
fn password_expiry_clause(valid_until: Option<jiff::Timestamp>, now: jiff::Timestamp) -> String {
    match valid_until {
        Some(until) => {
            let seconds = until.as_second().saturating_sub(now.as_second()).max(0);
            let days = (seconds + 86_399) / 86_400;
            format!("PASSWORD EXPIRE INTERVAL {} DAY", days.max(1))
        }
        // InPlace users belong to someone else: leave their password policy alone.
        None => String::new(),
    }
}

#[cfg(test)]
mod expiry_tests {
    use super::password_expiry_clause;

    #[test]
    fn lifetimes_round_up_to_whole_days() {
        let now = jiff::Timestamp::from_second(1_800_000_000).unwrap();
        let at = |s: i64| Some(jiff::Timestamp::from_second(1_800_000_000 + s).unwrap());
        assert_eq!(
            password_expiry_clause(at(3600), now),
            "PASSWORD EXPIRE INTERVAL 1 DAY"
        );
        assert_eq!(
            password_expiry_clause(at(86_400), now),
            "PASSWORD EXPIRE INTERVAL 1 DAY"
        );
        assert_eq!(
            password_expiry_clause(at(86_401), now),
            "PASSWORD EXPIRE INTERVAL 2 DAY"
        );
        assert_eq!(
            password_expiry_clause(at(-5), now),
            "PASSWORD EXPIRE INTERVAL 1 DAY"
        );
        assert_eq!(password_expiry_clause(None, now), "");
    }
}
