//! PostgreSQL backend.
//!
//! Passwords are sent as SCRAM-SHA-256 verifiers computed here, so the plaintext
//! never reaches the server, its logs or `pg_stat_statements`. Admin work goes
//! through a small bounded pool; verification always opens a brand-new connection
//! as the credential itself.
//!
//! The admin needs no superuser: `CREATEROLE` (what RDS, Cloud SQL and Azure hand
//! out; on PostgreSQL 16+ it also needs `ADMIN OPTION` on the roles it grants and drops,
//! which it has for roles it created) and the privileges it hands out (owning the
//! database's tables, or holding them `WITH GRANT OPTION`).
//!
//! `REASSIGN OWNED`, `DROP OWNED` and `pg_terminate_backend` require the privileges of
//! the role they act on, which a `CREATEROLE` admin lacks (before 16 it has no
//! membership in roles it created; from 16 only `ADMIN OPTION` without `INHERIT`, see
//! `createrole_self_grant`). So the admin grants the role to itself inside the
//! transaction that needs it (`WITH INHERIT TRUE` on 16+): when dropping a role that
//! owns or was granted something (a `pg_shdepend` entry; a role without one is dropped
//! directly), and when terminating its sessions (that transaction is rolled back, so
//! the membership never stays). A member of `pg_signal_backend` terminates without it.
//! `REASSIGN OWNED` and `DROP OWNED` only act on the target database: objects a user
//! owns elsewhere make `DROP ROLE` fail with [`BackendError::Other`].
//!
//! [`RevokeMode::ScramblePassword`] (an InPlace user, which belongs to someone else) is
//! `ALTER ROLE .. PASSWORD` with the verifier of a random password kept nowhere: the
//! password leasehold handed out stops working; `LOGIN`, `VALID UNTIL`, memberships and
//! privileges stay as they are. Sessions are then drained as for the other modes.
//!
//! A missing privilege is [`BackendError::PermissionDenied`] naming the step and what it
//! needs, never "admin credential rejected" (that is a refused login).
//!
//! Issuing to a role that already exists (AlternatingUsers' idle user, InPlace's user)
//! reconciles its privileges with the spec: in the same transaction as the password
//! change, every privilege on this database's tables, sequences, schemas, routines and
//! the database itself that the role holds from the admin (or from a role whose
//! privileges the admin has; for a superuser admin, from anyone) is revoked, then the
//! spec's grants are granted. A grant removed from the spec is therefore gone after the
//! next rotation, and no session sees a kept privilege missing. Privileges granted by
//! other roles, column privileges and default privileges are left alone. Role
//! memberships are reconciled the same way: memberships in roles `memberOf` no longer
//! lists are revoked when the admin granted them (`pg_auth_members.grantor` is the admin
//! or, for an admin that is not superuser, a non-superuser role whose privileges it
//! has); memberships granted by others stay, and so do the listed ones.
//!
//! With [`TlsMode::Require`] or [`TlsMode::VerifyFull`] both the admin pool and the
//! verification connections use TLS (rustls) with `sslmode=require` semantics on the
//! wire: a server that answers the TLS request with "no" is refused
//! ([`BackendError::Invalid`]), and so is a certificate that fails verification.

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use secrecy::{ExposeSecret, SecretString};
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::{debug, instrument};

use crate::sql::{
    LIKE_ESCAPE, check_name, like_prefix, pg_grant_clause, pg_grants, pg_ident, pg_literal, redact,
};
use crate::{
    Backend, BackendError, CredentialId, DrainSessions, IssueMode, IssueRequest, PasswordPolicy,
    PostgresTarget, RevokeMode, RevokeOutcome, RevokeRequest, TlsMode, VerifyRequest,
    generate_password,
};

/// PostgreSQL limits names to 63 bytes and silently truncates longer ones: refuse
/// them instead, or two leases could share a role.
const MAX_NAME_BYTES: usize = 63;
/// How long `Terminate` waits for terminated backends to exit.
const TERMINATE_WAIT: Duration = Duration::from_secs(5);

impl PostgresTarget {
    fn config(&self, user: &str, password: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.host)
            .port(self.port)
            .dbname(&self.database)
            .user(user)
            .password(password)
            .application_name("leasehold")
            .connect_timeout(self.connect_timeout)
            // With TLS, insist on it: a server that does not offer TLS is refused
            // instead of being talked to in plain text.
            .ssl_mode(match self.tls {
                TlsMode::Disable => SslMode::Disable,
                TlsMode::Require | TlsMode::VerifyFull { .. } => SslMode::Require,
            });
        config
    }
}

/// [`Backend`] for PostgreSQL.
pub struct PostgresBackend {
    target: PostgresTarget,
    pool: Pool,
    /// `None` for [`TlsMode::Disable`].
    tls: Option<MakeRustlsConnect>,
}

impl std::fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl PostgresBackend {
    /// Build the backend. Connects lazily: call [`Backend::ping`] to check the target.
    pub fn new(target: PostgresTarget) -> Result<Self, BackendError> {
        if target.max_admin_connections == 0 {
            return Err(BackendError::Invalid(
                "max_admin_connections must be at least 1".into(),
            ));
        }
        crate::tls::check_server_name(&target.tls, &target.host)?;
        let tls = crate::tls::client_config(&target.tls)?.map(MakeRustlsConnect::new);
        let config = target.config(&target.admin_user, target.admin_password.expose_secret());
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &tls {
            Some(tls) => Manager::from_config(config, tls.clone(), manager_config),
            None => Manager::from_config(config, tokio_postgres::NoTls, manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(target.max_admin_connections)
            .wait_timeout(Some(target.connect_timeout))
            .create_timeout(Some(target.connect_timeout))
            .recycle_timeout(Some(target.connect_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| BackendError::Other(format!("cannot build the admin pool: {e}")))?;
        Ok(Self { target, pool, tls })
    }

    pub fn target(&self) -> &PostgresTarget {
        &self.target
    }

    async fn admin(&self) -> Result<deadpool_postgres::Object, BackendError> {
        self.pool.get().await.map_err(|e| self.pool_error(e))
    }

    fn pool_error(&self, e: PoolError) -> BackendError {
        let secret = self.target.admin_password.expose_secret();
        match e {
            PoolError::Backend(e) => admin_error(&e, &[secret]),
            PoolError::Timeout(kind) => BackendError::Unreachable(format!(
                "no admin connection to {} within {:?} ({kind:?})",
                self.target_key(),
                self.target.connect_timeout
            )),
            other => BackendError::Other(redact(other.to_string(), &[secret])),
        }
    }

    async fn issue_inner(&self, req: &IssueRequest) -> Result<(), BackendError> {
        let name = req.id.0.as_str();
        check_name("role", name, MAX_NAME_BYTES)?;
        for role in &req.privileges.member_of {
            check_name("role", role, MAX_NAME_BYTES)?;
        }
        let grants = pg_grants(&req.privileges.grants)?;
        let password = req.password.expose_secret();
        if password.is_empty() {
            return Err(BackendError::Invalid("empty password".into()));
        }
        let verifier = scram_verifier(&req.password).await?;
        let secrets = [password, verifier.as_str()];
        let valid_until = req
            .valid_until
            .map_or_else(|| "infinity".to_owned(), |ts| ts.to_string());
        let role = pg_ident(name);
        let login = format!(
            "LOGIN PASSWORD {} VALID UNTIL {}",
            pg_literal(&verifier),
            pg_literal(&valid_until)
        );

        let mut client = self.admin().await?;
        // Two attempts: a concurrent issue of the same role can make CREATE ROLE
        // collide; the retry then sees the role and alters it.
        for attempt in 1..=2 {
            // The statement under way, to name the step a missing privilege stops.
            let mut step = String::new();
            let mut missing = false;
            let result: Result<(), tokio_postgres::Error> = async {
                let tx = client.transaction().await?;
                let exists = tx
                    .query_opt(
                        "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1",
                        &[&name],
                    )
                    .await?
                    .is_some();
                if !exists && req.mode == IssueMode::ExistingUser {
                    missing = true;
                    return tx.rollback().await;
                }
                let verb = if exists { "ALTER" } else { "CREATE" };
                step = format!(
                    "to {} role {name:?} (it needs CREATEROLE)",
                    verb.to_lowercase()
                );
                tx.execute(&format!("{verb} ROLE {role} {login}"), &[])
                    .await?;
                if exists {
                    // A reused user (AlternatingUsers, InPlace) keeps what earlier
                    // rotations granted: take back what the admin granted, then grant
                    // the spec, in this transaction, so the privileges equal the spec
                    // and no session ever sees them missing.
                    step = format!(
                        "to revoke the privileges of role {name:?} that are no longer in the \
                         spec (it needs to own the objects or hold those privileges WITH \
                         GRANT OPTION)"
                    );
                    revoke_granted_privileges(&tx, name).await?;
                    step = format!(
                        "to revoke the memberships of role {name:?} that are no longer in the \
                         spec (it needs CREATEROLE and, from PostgreSQL 16, ADMIN OPTION on \
                         those roles)"
                    );
                    revoke_granted_memberships(&tx, name, &req.privileges.member_of).await?;
                }
                for parent in &req.privileges.member_of {
                    step = format!(
                        "to grant role {parent:?} (it needs CREATEROLE and, from PostgreSQL 16, \
                         ADMIN OPTION on {parent:?})"
                    );
                    tx.execute(&format!("GRANT {} TO {role}", pg_ident(parent)), &[])
                        .await?;
                }
                for grant in &grants {
                    let clause = pg_grant_clause(grant);
                    step = format!(
                        "to grant `{clause}` (it needs to own the objects or hold those \
                         privileges WITH GRANT OPTION)"
                    );
                    tx.execute(&format!("GRANT {clause} TO {role}"), &[])
                        .await?;
                }
                tx.commit().await
            }
            .await;
            match result {
                Ok(()) if missing => return Err(crate::missing_user(name)),
                Ok(()) => return Ok(()),
                Err(e)
                    if attempt == 1
                        && (matches!(
                            e.code(),
                            Some(&SqlState::DUPLICATE_OBJECT | &SqlState::UNIQUE_VIOLATION)
                        ) || is_concurrent_conflict(&e)) =>
                {
                    debug!("role changed concurrently, retrying");
                }
                Err(e) => {
                    return Err(admin_error(&e, &secrets).in_step(|| step));
                }
            }
        }
        Err(BackendError::Other(format!(
            "role {name} kept colliding with a concurrent change"
        )))
    }

    async fn verify_inner(&self, req: &VerifyRequest) -> Result<(), BackendError> {
        let password = req.password.expose_secret();
        let secrets = [password];
        let config = self.target.config(&req.id.0, password);
        let login = async {
            let connected = match &self.tls {
                Some(tls) => connect(&config, tls.clone()).await,
                None => connect(&config, tokio_postgres::NoTls).await,
            };
            connected.map_err(|e| match e.code() {
                // No answer from the server at all, or no acceptable TLS session: not
                // the credential's fault.
                None => connect_error(&e, &secrets),
                Some(code) if is_unavailable(code.code()) => BackendError::Unreachable(redact(
                    format!("login as {} not possible now: {}", req.id, describe(&e)),
                    &secrets,
                )),
                Some(_) => BackendError::VerificationFailed(redact(
                    format!("login as {} refused: {}", req.id, describe(&e)),
                    &secrets,
                )),
            })
        };
        let (client, connection) =
            crate::login_within(req, self.target.connect_timeout, &self.target.key(), login)
                .await?;
        let result = crate::query_within(req, async {
            client
                .simple_query(&req.query)
                .await
                .map(drop)
                .map_err(|e| {
                    let text = redact(
                        format!("query as {} failed: {}", req.id, describe(&e)),
                        &secrets,
                    );
                    match e.code() {
                        Some(code) if !is_unavailable(code.code()) => {
                            BackendError::VerificationFailed(text)
                        }
                        // The server went away or shut the session down mid-query.
                        _ => BackendError::Unreachable(text),
                    }
                })
        })
        .await;
        drop(client);
        let _ = connection.await;
        result
    }

    async fn revoke_inner(&self, req: &RevokeRequest) -> Result<RevokeOutcome, BackendError> {
        let name = req.id.0.as_str();
        check_name("role", name, MAX_NAME_BYTES)?;
        let role = pg_ident(name);
        // What stops new logins: no LOGIN, or a password nobody knows (the verifier of
        // a random password that is dropped here).
        let (stop_logins, verifier, step) = match req.mode {
            RevokeMode::Nothing => return Ok(RevokeOutcome::Revoked),
            RevokeMode::DropUser | RevokeMode::DisableLogin => (
                format!("ALTER ROLE {role} NOLOGIN"),
                None,
                "to disable login of",
            ),
            RevokeMode::ScramblePassword => {
                let verifier =
                    scram_verifier(&generate_password(&PasswordPolicy::default())?).await?;
                (
                    format!("ALTER ROLE {role} PASSWORD {}", pg_literal(&verifier)),
                    Some(verifier),
                    "to set an unknown password on",
                )
            }
        };
        let secrets: Vec<&str> = verifier.as_deref().into_iter().collect();
        let client = self.admin().await?;
        let map = |e: tokio_postgres::Error| admin_error(&e, &[]);

        let exists = client
            .query_opt(
                "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1",
                &[&name],
            )
            .await
            .map_err(map)?
            .is_some();
        if !exists {
            return Ok(RevokeOutcome::Revoked);
        }
        match client.execute(&stop_logins, &[]).await {
            Ok(_) => {}
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => {
                return Ok(RevokeOutcome::Revoked);
            }
            Err(e) => {
                return Err(admin_error(&e, &secrets).in_step(|| {
                    format!(
                        "{step} role {name:?} (it needs CREATEROLE and, from PostgreSQL 16, \
                         ADMIN OPTION on the role; superuser roles need a superuser)"
                    )
                }));
            }
        }

        let mut client = client;
        let remaining = match req.drain {
            DrainSessions::Ignore => 0,
            DrainSessions::Wait => count_sessions(&client, name).await.map_err(map)?,
            DrainSessions::Terminate => {
                terminate_sessions(&mut client, name).await.map_err(|e| {
                    map(e).in_step(|| {
                        format!(
                            "to terminate the sessions of role {name:?} (it needs CREATEROLE \
                                 and, from PostgreSQL 16, ADMIN OPTION on the role, or membership \
                                 in pg_signal_backend)"
                        )
                    })
                })?;
                // Termination is asynchronous: give the backends a moment to exit.
                let deadline = tokio::time::Instant::now() + TERMINATE_WAIT;
                loop {
                    let n = count_sessions(&client, name).await.map_err(map)?;
                    if n == 0 || tokio::time::Instant::now() >= deadline {
                        break n;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        if remaining > 0 {
            return Ok(RevokeOutcome::SessionsRemain(remaining));
        }

        if req.mode == RevokeMode::DropUser {
            let mut attempt = 0u64;
            loop {
                attempt += 1;
                match drop_role(&mut client, name).await {
                    Ok(()) => break,
                    // Dropped concurrently between our check and REASSIGN.
                    Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => break,
                    // Revocations of other roles at the same moment (other leases, the
                    // same admin) can deadlock on shared catalogs: repeat shortly.
                    Err(e) if attempt < DROP_ATTEMPTS && is_concurrent_conflict(&e) => {
                        debug!(
                            attempt,
                            role = name,
                            "drop collided with a concurrent change; repeating"
                        );
                        tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
                        continue;
                    }
                    Err(e) => {
                        return Err(map(e).in_step(|| {
                        format!(
                            "to drop role {name:?} (it needs CREATEROLE and, from PostgreSQL 16, \
                             ADMIN OPTION on the role, which the role's creator has; for objects \
                             the role owns or was granted, the right to grant the role to itself)"
                        )
                    }));
                    }
                }
            }
        }
        Ok(RevokeOutcome::Revoked)
    }
}

/// The SCRAM-SHA-256 verifier of `password`, what the server stores instead of it. A
/// fresh salt each time: the verifier differs on every call even for the same password,
/// which is fine (the server only stores it). 4096 PBKDF2 rounds: CPU work, kept off the
/// async worker threads.
async fn scram_verifier(password: &SecretString) -> Result<String, BackendError> {
    let secret = password.clone();
    tokio::task::spawn_blocking(move || {
        postgres_protocol::password::scram_sha_256(secret.expose_secret().as_bytes())
    })
    .await
    .map_err(|e| BackendError::Other(format!("verifier computation failed: {e}")))
}

/// Revoke every privilege on this database's tables, views, sequences, schemas,
/// routines and on the database itself that `name` holds from the admin or from a role
/// whose privileges the admin has (what the admin could have granted; for a superuser
/// admin that is every grantor). Privileges granted by others, column privileges,
/// default privileges and role memberships are left alone. Names come quoted from the
/// server (`quote_ident`, `regprocedure`).
async fn revoke_granted_privileges(
    tx: &tokio_postgres::Transaction<'_>,
    name: &str,
) -> Result<(), tokio_postgres::Error> {
    let rows = tx
        .query(
            "WITH u AS (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $1) \
             SELECT CASE WHEN c.relkind = 'S' THEN 'SEQUENCE' ELSE 'TABLE' END, \
                    pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname) \
               FROM pg_catalog.pg_class c \
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace, \
                    pg_catalog.aclexplode(c.relacl) a \
              WHERE a.grantee = (SELECT oid FROM u) AND pg_catalog.pg_has_role(a.grantor, 'USAGE') \
             UNION \
             SELECT 'SCHEMA', pg_catalog.quote_ident(n.nspname) \
               FROM pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a \
              WHERE a.grantee = (SELECT oid FROM u) AND pg_catalog.pg_has_role(a.grantor, 'USAGE') \
             UNION \
             SELECT 'ROUTINE', p.oid::pg_catalog.regprocedure::text \
               FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a \
              WHERE a.grantee = (SELECT oid FROM u) AND pg_catalog.pg_has_role(a.grantor, 'USAGE') \
             UNION \
             SELECT 'DATABASE', pg_catalog.quote_ident(d.datname) \
               FROM pg_catalog.pg_database d, pg_catalog.aclexplode(d.datacl) a \
              WHERE d.datname = pg_catalog.current_database() \
                AND a.grantee = (SELECT oid FROM u) AND pg_catalog.pg_has_role(a.grantor, 'USAGE')",
            &[&name],
        )
        .await?;
    let role = pg_ident(name);
    for row in rows {
        let kind: String = row.try_get(0)?;
        let object: String = row.try_get(1)?;
        tx.execute(&format!("REVOKE ALL ON {kind} {object} FROM {role}"), &[])
            .await?;
    }
    Ok(())
}

/// Revoke `name`'s memberships in roles that `keep` does not list, but only those the
/// admin granted: `pg_auth_members.grantor` is the admin, or (for an admin that is not
/// superuser) a role whose privileges the admin has. Memberships granted by anyone else
/// are left alone. Before PostgreSQL 16 a role is a member of another at most once and
/// `REVOKE` removes that membership whoever granted it, hence the grantor filter here;
/// from 16 each grantor's grant is its own, and `GRANTED BY` names the one revoked.
async fn revoke_granted_memberships(
    tx: &tokio_postgres::Transaction<'_>,
    name: &str,
    keep: &[String],
) -> Result<(), tokio_postgres::Error> {
    let rows = tx
        .query(
            "WITH me AS (SELECT oid, rolsuper FROM pg_catalog.pg_roles \
                          WHERE rolname = CURRENT_USER) \
             SELECT pg_catalog.quote_ident(r.rolname), pg_catalog.quote_ident(g.rolname), \
                    pg_catalog.current_setting('server_version_num')::int >= 160000 \
               FROM pg_catalog.pg_auth_members m \
               JOIN pg_catalog.pg_roles r ON r.oid = m.roleid \
               JOIN pg_catalog.pg_roles g ON g.oid = m.grantor \
              WHERE m.member = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $1) \
                AND r.rolname::text <> ALL($2::text[]) \
                AND (m.grantor = (SELECT oid FROM me) \
                     OR (NOT (SELECT rolsuper FROM me) AND NOT g.rolsuper \
                         AND pg_catalog.pg_has_role(m.grantor, 'USAGE')))",
            &[&name, &keep],
        )
        .await?;
    let role = pg_ident(name);
    for row in rows {
        let parent: String = row.try_get(0)?;
        let grantor: String = row.try_get(1)?;
        let v16: bool = row.try_get(2)?;
        let granted_by = if v16 {
            format!(" GRANTED BY {grantor}")
        } else {
            String::new()
        };
        tx.execute(&format!("REVOKE {parent} FROM {role}{granted_by}"), &[])
            .await?;
    }
    Ok(())
}

/// What the admin may already do about a role without being granted it.
struct AdminStanding {
    superuser: bool,
    /// Has the privileges of the role (inherited membership).
    has_privileges: bool,
    /// PostgreSQL 16 or later: memberships carry `INHERIT`/`SET` options.
    v16: bool,
}

async fn admin_standing(
    client: &impl tokio_postgres::GenericClient,
    name: &str,
) -> Result<AdminStanding, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT r.rolsuper, pg_catalog.pg_has_role($1::text::name, 'USAGE'), \
                    pg_catalog.current_setting('server_version_num')::int >= 160000 \
             FROM pg_catalog.pg_roles r WHERE r.rolname = CURRENT_USER",
            &[&name],
        )
        .await?;
    Ok(AdminStanding {
        superuser: row.try_get(0)?,
        has_privileges: row.try_get(1)?,
        v16: row.try_get(2)?,
    })
}

/// `GRANT <role> TO CURRENT_USER` so the admin has the role's privileges, which
/// `REASSIGN OWNED`, `DROP OWNED` and `pg_terminate_backend` require. A `CREATEROLE`
/// admin (what managed databases hand out) has no membership in the roles it creates
/// before PostgreSQL 16, and from 16 only `ADMIN OPTION` without `INHERIT` (see
/// `createrole_self_grant`); it may grant them to itself, which is done inside the
/// caller's transaction so the membership never outlives it.
async fn borrow_role(
    tx: &tokio_postgres::Transaction<'_>,
    name: &str,
) -> Result<(), tokio_postgres::Error> {
    let standing = admin_standing(tx, name).await?;
    if standing.superuser || standing.has_privileges {
        return Ok(());
    }
    let options = if standing.v16 {
        " WITH INHERIT TRUE"
    } else {
        ""
    };
    tx.execute(
        &format!("GRANT {} TO CURRENT_USER{options}", pg_ident(name)),
        &[],
    )
    .await?;
    Ok(())
}

/// Terminate every session of `name` but our own. The admin borrows the role for the
/// duration of a transaction that is then rolled back: the signals stay sent, the
/// membership goes.
async fn terminate_sessions(
    client: &mut deadpool_postgres::ClientWrapper,
    name: &str,
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let may_signal: bool = tx
        .query_one(
            "SELECT pg_catalog.pg_has_role('pg_signal_backend', 'USAGE')",
            &[],
        )
        .await?
        .try_get(0)?;
    if !may_signal {
        borrow_role(&tx, name).await?;
    }
    tx.execute(
        "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity \
         WHERE usename = $1 AND pid <> pg_catalog.pg_backend_pid()",
        &[&name],
    )
    .await?;
    tx.rollback().await
}

/// Drop the role, first reassigning what it owns to the admin and dropping its
/// privileges, in one transaction. A role that owns nothing and was granted nothing
/// (no `pg_shdepend` entry here or on shared objects) is dropped directly, which needs
/// no more than `CREATEROLE` (and from PostgreSQL 16 `ADMIN OPTION` on it).
async fn drop_role(
    client: &mut deadpool_postgres::ClientWrapper,
    name: &str,
) -> Result<(), tokio_postgres::Error> {
    let role = pg_ident(name);
    let tx = client.transaction().await?;
    let depended_on: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_shdepend d \
               JOIN pg_catalog.pg_roles r ON d.refclassid = 'pg_catalog.pg_authid'::regclass \
                                          AND d.refobjid = r.oid \
             WHERE r.rolname = $1 \
               AND d.dbid IN (0, (SELECT oid FROM pg_catalog.pg_database \
                                  WHERE datname = pg_catalog.current_database())))",
            &[&name],
        )
        .await?
        .try_get(0)?;
    if depended_on {
        borrow_role(&tx, name).await?;
        tx.execute(&format!("REASSIGN OWNED BY {role} TO CURRENT_USER"), &[])
            .await?;
        tx.execute(&format!("DROP OWNED BY {role}"), &[]).await?;
    }
    tx.execute(&format!("DROP ROLE IF EXISTS {role}"), &[])
        .await?;
    tx.commit().await
}

/// How often a role drop is tried when it collides with concurrent catalog changes.
const DROP_ATTEMPTS: u64 = 4;

/// A collision with a concurrent catalog change that repeating the statement resolves:
/// a deadlock (40P01), a serialization failure (40001), or PostgreSQL's "tuple
/// concurrently updated/deleted" (XX000).
fn is_concurrent_conflict(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED => true,
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE => true,
        Some(c) if *c == SqlState::INTERNAL_ERROR => describe(e).contains("concurrently"),
        _ => false,
    }
}

/// Open one connection (plain or TLS) and drive it on a task of its own.
async fn connect<T>(
    config: &tokio_postgres::Config,
    tls: T,
) -> Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
{
    let (client, connection) = config.connect(tls).await?;
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((client, task))
}

async fn count_sessions(
    client: &tokio_postgres::Client,
    name: &str,
) -> Result<u32, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_catalog.pg_stat_activity \
             WHERE usename = $1 AND pid <> pg_catalog.pg_backend_pid()",
            &[&name],
        )
        .await?;
    let n: i64 = row.try_get(0)?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

#[async_trait]
impl Backend for PostgresBackend {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn target_key(&self) -> String {
        self.target.key()
    }

    #[instrument(skip_all, fields(backend = "postgres", id = %req.id, mode = ?req.mode))]
    async fn issue(&self, req: &IssueRequest) -> Result<(), BackendError> {
        self.target.bounded(self.issue_inner(req)).await
    }

    #[instrument(skip_all, fields(backend = "postgres", id = %req.id))]
    async fn verify(&self, req: &VerifyRequest) -> Result<(), BackendError> {
        self.verify_inner(req).await
    }

    #[instrument(skip_all, fields(backend = "postgres", id = %req.id, mode = ?req.mode, drain = ?req.drain))]
    async fn revoke(&self, req: &RevokeRequest) -> Result<RevokeOutcome, BackendError> {
        self.target.bounded(self.revoke_inner(req)).await
    }

    #[instrument(skip_all, fields(backend = "postgres", id = %id))]
    async fn can_login(&self, id: &CredentialId) -> Result<bool, BackendError> {
        self.target
            .bounded(async {
                let client = self.admin().await?;
                let row = client
                    .query_opt(
                        "SELECT rolcanlogin AND (rolvaliduntil IS NULL OR rolvaliduntil > now()) \
                     FROM pg_catalog.pg_roles WHERE rolname = $1",
                        &[&id.0],
                    )
                    .await
                    .map_err(|e| admin_error(&e, &[]))?;
                Ok(match row {
                    Some(row) => row
                        .try_get::<_, Option<bool>>(0)
                        .map_err(|e| admin_error(&e, &[]))?
                        .unwrap_or(false),
                    None => false,
                })
            })
            .await
    }

    #[instrument(skip_all, fields(backend = "postgres", prefix))]
    async fn list_users(&self, prefix: &str) -> Result<Vec<CredentialId>, BackendError> {
        let pattern = like_prefix(prefix);
        let sql = format!(
            "SELECT rolname::text FROM pg_catalog.pg_roles \
             WHERE rolname LIKE $1 ESCAPE '{LIKE_ESCAPE}' ORDER BY 1"
        );
        self.target
            .bounded(async {
                let client = self.admin().await?;
                let rows = client
                    .query(&sql, &[&pattern])
                    .await
                    .map_err(|e| admin_error(&e, &[]))?;
                rows.iter()
                    .map(|row| row.try_get::<_, String>(0).map(CredentialId))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| admin_error(&e, &[]))
            })
            .await
    }

    #[instrument(skip_all, fields(backend = "postgres"))]
    async fn ping(&self) -> Result<(), BackendError> {
        self.target
            .bounded(async {
                let client = self.admin().await?;
                client
                    .simple_query("SELECT 1")
                    .await
                    .map(|_| ())
                    .map_err(|e| admin_error(&e, &[]))
            })
            .await
    }
}

/// A readable one-line description: SQLSTATE and message for server errors.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{} ({})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(": ");
                text.push_str(detail);
            }
            text
        }
        // Client-side errors keep their cause in the source chain (for example
        // "error performing TLS handshake" ← "server does not support TLS").
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                let cause_text = cause.to_string();
                if !text.contains(&cause_text) {
                    text.push_str(": ");
                    text.push_str(&cause_text);
                }
                source = cause.source();
            }
            text
        }
    }
}

/// Classify an error without a server answer (no SQLSTATE): I/O error, closed
/// connection, timeout, or a TLS session that could not be set up.
fn connect_error(e: &tokio_postgres::Error, secrets: &[&str]) -> BackendError {
    let text = redact(describe(e), secrets);
    if let Some(why) = crate::tls::certificate_rejection(e) {
        // The spec's CA or host does not match the server: retrying cannot help.
        return BackendError::Invalid(redact(
            format!("the server's TLS certificate was rejected: {why}"),
            secrets,
        ));
    }
    // tokio-postgres says so when the server answers the TLS request with "no".
    if text.contains("server does not support TLS") {
        return BackendError::Invalid(format!(
            "TLS is required by the target's TLS mode but the server does not offer it ({text})"
        ));
    }
    BackendError::Unreachable(text)
}

/// SQLSTATEs that say the server cannot take the connection or the statement now, for
/// a reason that passes: connection exceptions (08), insufficient resources such as
/// too many connections (53, e.g. 53300), operator intervention such as starting up
/// or shutting down (57P01-57P05; not 57014, a cancelled query).
fn is_unavailable(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("53") || code.starts_with("57P")
}

/// Classify an error met while working as admin.
fn admin_error(e: &tokio_postgres::Error, secrets: &[&str]) -> BackendError {
    let text = redact(describe(e), secrets);
    let Some(code) = e.code() else {
        return connect_error(e, secrets);
    };
    let code = code.code();
    match code {
        // Authentication failed: the admin credential itself is wrong.
        _ if code.starts_with("28") => BackendError::AdminRejected(text),
        // Logged in, but a statement needs a privilege the admin does not have.
        "42501" => BackendError::permission_denied(text),
        // Syntax error, unknown role or table, bad grant clause, unknown database.
        _ if code.starts_with("42") || code == "3D000" || code == "22023" => {
            BackendError::Invalid(text)
        }
        // Connection exceptions, shutdown in progress, too many connections.
        _ if is_unavailable(code) => BackendError::Unreachable(text),
        _ => BackendError::Other(text),
    }
}

#[cfg(test)]
mod tests {
    use super::is_unavailable;

    #[test]
    fn passing_server_conditions_are_unavailable() {
        for code in ["53300", "53000", "57P03", "57P01", "08006", "08001"] {
            assert!(is_unavailable(code), "{code}");
        }
        for code in ["28P01", "28000", "42501", "3D000", "57014"] {
            assert!(!is_unavailable(code), "{code}");
        }
    }
}
