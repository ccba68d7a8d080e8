//! Credential backends behind one trait.
//!
//! A backend knows how to make a credential exist, prove it works, and make it stop
//! working. It knows nothing about leases, versions or Kubernetes: the engine decides
//! *what* to do (see `leasehold_core::rotation`) and a backend only does it.
//!
//! Every method must be idempotent, because the engine repeats a step after a crash:
//! issuing a credential that already exists converges it to the requested state,
//! revoking one that is already gone succeeds.

#![forbid(unsafe_code)]

pub mod mysql;
pub mod password;
pub mod postgres;
mod sql;
mod tls;

pub use mysql::MySqlBackend;
pub use password::{PasswordPolicy, generate as generate_password};
pub use postgres::PostgresBackend;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use secrecy::SecretString;

/// The name of a credential on the backend side: a database user name or a
/// certificate serial. Never secret.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CredentialId(pub String);

impl std::fmt::Display for CredentialId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a credential comes into being on the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueMode {
    /// Create the user if missing (update its password if present). Used by `Dynamic`.
    CreateUser,
    /// The user is expected to exist already (created if missing for
    /// `AlternatingUsers`), only its password changes and login is enabled.
    SetPassword,
    /// `InPlace`: the user belongs to someone else and must already exist; only its
    /// password changes and login is enabled. A missing user is never created (a
    /// mistyped name would otherwise become a new login): it is
    /// [`BackendError::Invalid`] naming the user, which needs the user to act.
    ExistingUser,
}

/// The error for an `ExistingUser` issue whose user does not exist.
pub(crate) fn missing_user(name: &str) -> BackendError {
    BackendError::Invalid(format!(
        "user {name:?} does not exist: {MISSING_USER}; create the user or correct the lease's \
         username"
    ))
}

/// What every [`missing_user`] error says (see [`BackendError::is_missing_user`]).
const MISSING_USER: &str =
    "the InPlace strategy only changes the password of an existing user and never creates one";

/// What a credential may do once it exists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Privileges {
    /// Roles (PostgreSQL) or roles / template users (MySQL) the user inherits from.
    pub member_of: Vec<String>,
    /// Grants as `<privileges> ON <object>`, e.g. `SELECT, INSERT ON orders.*` (MySQL) or
    /// `SELECT ON ALL TABLES IN SCHEMA public` (PostgreSQL). Never spliced into SQL: each
    /// is parsed by `leasehold_grants` (privileges from an allowlist, one object) and the
    /// statement is built from the parsed form with quoted names; anything else is
    /// [`BackendError::Invalid`] naming the grant.
    pub grants: Vec<String>,
}

/// A request to make one credential exist and work.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub id: CredentialId,
    pub mode: IssueMode,
    /// The secret to install. `SecretString` redacts itself in `Debug`.
    pub password: SecretString,
    /// Database-side expiry (PostgreSQL `VALID UNTIL`; MySQL has no per-user expiry
    /// time, so the MySQL backend records nothing here and relies on the sweeper).
    pub valid_until: Option<Timestamp>,
    pub privileges: Privileges,
}

/// How to check a credential works.
#[derive(Debug, Clone)]
pub struct VerifyRequest {
    pub id: CredentialId,
    pub password: SecretString,
    /// Query to run as the credential, e.g. `SELECT 1`.
    pub query: String,
    pub timeout: Duration,
}

/// What to do with sessions still open under a credential being revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainSessions {
    /// Report `SessionsRemain` until they end by themselves.
    Wait,
    /// Terminate them.
    Terminate,
    /// Do not look at sessions.
    Ignore,
}

/// How a credential stops working.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeMode {
    /// Disable login, drain sessions, then drop the user (and what it owns).
    DropUser,
    /// Disable login and drain sessions; keep the user (AlternatingUsers).
    DisableLogin,
    /// Set a fresh random password that is kept nowhere, then drain sessions; keep the
    /// user, its login attribute and its privileges. For a user leasehold did not create
    /// (InPlace) whose last password leasehold handed out, when no later version set
    /// another one on it: that password stops working, the user stays its owner's, who
    /// can set a password of their own.
    ScramblePassword,
    /// Nothing to do on the backend (InPlace: the password was already replaced).
    Nothing,
}

#[derive(Debug, Clone)]
pub struct RevokeRequest {
    pub id: CredentialId,
    pub mode: RevokeMode,
    pub drain: DrainSessions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeOutcome {
    /// The credential no longer works and nothing of it remains that needs doing.
    Revoked,
    /// Login is disabled but `n` sessions are still open (with `DrainSessions::Wait`).
    /// Call again later.
    SessionsRemain(u32),
}

/// The files a credential is delivered as: name → value. Values are secret.
#[derive(Clone, Default)]
pub struct CredentialMaterial(pub BTreeMap<String, SecretString>);

impl std::fmt::Debug for CredentialMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The backend is unavailable for now: not reachable (connection refused, DNS,
    /// timeout) or refusing connections for a reason that passes (too many connections:
    /// PostgreSQL 53300 and other 53xxx, MySQL 1040, 1203, 1226; starting up or shutting
    /// down: PostgreSQL 57P0x, MySQL 1053; connection errors: SQLSTATE class 08). Retry
    /// later. During [`Backend::verify`] this says nothing about the credential: it is
    /// never reported as [`VerificationFailed`](Self::VerificationFailed), so the new
    /// credential is not revoked for it.
    #[error("backend unreachable: {0}")]
    Unreachable(String),
    /// The admin credential was refused at login. The user must fix it.
    #[error("admin credential rejected: {0}")]
    AdminRejected(String),
    /// The admin logged in but lacks a privilege a step needs (PostgreSQL SQLSTATE
    /// 42501, MySQL access-denied errors after login). The message names the step and
    /// what the server says is missing. The user must grant it.
    #[error("the admin lacks a privilege {0}")]
    PermissionDenied(String),
    /// Verification as the new credential failed: the server refused the login for the
    /// credential's sake (wrong password, no such user, login disabled or expired,
    /// SQLSTATE class 28, MySQL 1044/1045) or the query failed or ran out of time once
    /// logged in. A server that does not answer, times out during login or refuses
    /// connections for a passing reason is `Unreachable` instead: the credential may
    /// well be fine.
    #[error("verification failed: {0}")]
    VerificationFailed(String),
    /// The request itself is wrong (bad grant, unknown role). The user must fix the spec.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Anything else the server said.
    #[error("backend error: {0}")]
    Other(String),
}

/// How a [`BackendError::PermissionDenied`] starts before the step is known.
const UNNAMED_STEP: &str = "for this step: ";

impl BackendError {
    /// Whether retrying the same call later can succeed without a spec change.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unreachable(_) | Self::Other(_))
    }

    /// Whether this is the [`IssueMode::ExistingUser`] refusal of a user that does not
    /// exist: nothing was created or changed on the server.
    pub fn is_missing_user(&self) -> bool {
        matches!(self, Self::Invalid(m) if m.contains(MISSING_USER))
    }

    /// A missing privilege, the step not yet named (see [`in_step`](Self::in_step)).
    pub(crate) fn permission_denied(server_text: String) -> Self {
        Self::PermissionDenied(format!("{UNNAMED_STEP}{server_text}"))
    }

    /// Name the step a missing privilege was met in, e.g. `to drop role "x" (needs ...)`.
    pub(crate) fn in_step(self, step: impl FnOnce() -> String) -> Self {
        match self {
            Self::PermissionDenied(m) => {
                let server_text = m.strip_prefix(UNNAMED_STEP).unwrap_or(&m);
                Self::PermissionDenied(format!("{}: {server_text}", step()))
            }
            other => other,
        }
    }
}

/// Where a backend notes, durably and before it goes on, what resuming an issue after a
/// crash needs (an ACME order's URL). The engine keeps it with the version's secret.
#[async_trait]
pub trait IssueJournal: Send + Sync {
    /// The note recorded for this version, if any.
    async fn recorded(&self) -> Option<String>;
    /// Record `note`; an error means it may not be durable, and the backend must stop.
    async fn record(&self, note: &str) -> Result<(), BackendError>;
}

/// A journal that keeps nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoIssueJournal;

#[async_trait]
impl IssueJournal for NoIssueJournal {
    async fn recorded(&self) -> Option<String> {
        None
    }
    async fn record(&self, _note: &str) -> Result<(), BackendError> {
        Ok(())
    }
}

/// One credential backend (a database server, a certificate issuer).
///
/// Implementations never log or return secret values; errors carry server messages
/// with any secret removed.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Short kind name for logs and metrics: `postgres`, `mysql`, `certificate`.
    fn kind(&self) -> &'static str;

    /// A stable key for the target (host:port/db) used by per-target rate limits.
    fn target_key(&self) -> String;

    /// Make the credential exist and work. Idempotent.
    async fn issue(&self, req: &IssueRequest) -> Result<(), BackendError>;

    /// Prove the credential works, using a fresh connection as that credential.
    async fn verify(&self, req: &VerifyRequest) -> Result<(), BackendError>;

    /// Make the credential stop working. Idempotent: a missing user is `Revoked`.
    async fn revoke(&self, req: &RevokeRequest) -> Result<RevokeOutcome, BackendError>;

    /// Whether the credential currently exists and can log in.
    async fn can_login(&self, id: &CredentialId) -> Result<bool, BackendError>;

    /// Users whose names start with `prefix` (for the orphan sweeper).
    async fn list_users(&self, prefix: &str) -> Result<Vec<CredentialId>, BackendError>;

    /// Check that the admin connection works (for readiness and early errors).
    async fn ping(&self) -> Result<(), BackendError>;

    /// The secret of a new version when the backend makes its own (a certificate
    /// backend: a private key). `None`: a password from the lease's policy.
    fn new_secret(&self) -> Option<Result<SecretString, BackendError>> {
        None
    }

    /// [`Backend::issue`], returning the version's secret as it must be stored from now
    /// on when issuing added to it (a certificate backend: the issued chain next to the
    /// key). `None`: the stored secret stands. `journal` keeps what a repeat after a
    /// crash needs to resume rather than start over (an ACME order's URL).
    async fn issue_returning_secret(
        &self,
        req: &IssueRequest,
        _journal: &dyn IssueJournal,
    ) -> Result<Option<SecretString>, BackendError> {
        self.issue(req).await.map(|()| None)
    }

    /// What consumers get for a version, when the backend decides it rather than the
    /// lease's templates (a certificate backend: `tls.crt`, `tls.key`, `ca.crt`).
    fn material(&self, _secret: &SecretString) -> Option<CredentialMaterial> {
        None
    }

    /// [`Backend::revoke`], with the version's secret when it is still stored (revoking
    /// a certificate at an ACME CA needs the certificate).
    async fn revoke_with_secret(
        &self,
        req: &RevokeRequest,
        _secret: Option<&SecretString>,
    ) -> Result<RevokeOutcome, BackendError> {
        self.revoke(req).await
    }
}

/// How the SQL backends protect their connections (admin and verification alike).
///
/// TLS uses rustls with the `ring` provider. A server that does not offer TLS is
/// refused in `Require` and `VerifyFull`, never silently used in plain text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain TCP.
    #[default]
    Disable,
    /// TLS without checking the server certificate (libpq's `sslmode=require`):
    /// protects against eavesdropping, not against an active man in the middle.
    Require,
    /// TLS, the server certificate checked against this CA bundle (PEM, one or more
    /// certificates; empty = the Mozilla roots of `webpki-roots`) and the host name.
    VerifyFull { ca_pem: String },
}

/// Where and how to reach one database server as admin (PostgreSQL or MySQL/MariaDB).
#[derive(Debug, Clone)]
pub struct DatabaseTarget {
    pub host: String,
    pub port: u16,
    /// Database for admin and verification connections.
    pub database: String,
    pub admin_user: String,
    /// Redacted in `Debug`.
    pub admin_password: SecretString,
    pub tls: TlsMode,
    /// Upper bound of pooled admin connections to this target.
    pub max_admin_connections: usize,
    /// Bound on establishing a connection (and on waiting for a pooled one).
    pub connect_timeout: Duration,
    /// Bound on one whole backend call once connected.
    pub operation_timeout: Duration,
    /// MySQL/MariaDB only: the host part of every account leasehold creates, alters,
    /// grants to, locks, drops and looks up (`'user'@'<account_host>'`), e.g. `%`
    /// (default), `10.%`, `localhost` or `127.0.0.1`. Letters, digits and `.%_:-/`
    /// only. PostgreSQL ignores it.
    pub account_host: String,
}

/// A PostgreSQL target.
pub type PostgresTarget = DatabaseTarget;
/// A MySQL or MariaDB target.
pub type MySqlTarget = DatabaseTarget;

impl DatabaseTarget {
    /// A target with the defaults: no TLS, 4 admin connections, 5 s connect timeout,
    /// 30 s operation timeout.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        database: impl Into<String>,
        admin_user: impl Into<String>,
        admin_password: SecretString,
    ) -> Self {
        Self {
            host: host.into(),
            port,
            database: database.into(),
            admin_user: admin_user.into(),
            admin_password,
            tls: TlsMode::Disable,
            max_admin_connections: 4,
            connect_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(30),
            account_host: "%".to_owned(),
        }
    }

    /// `host:port/database`: the key per-target limits and logs use.
    pub fn key(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.database)
    }

    /// Run one admin operation within `operation_timeout`; a server that does not answer
    /// in time is `Unreachable`.
    pub(crate) async fn bounded<T>(
        &self,
        op: impl Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        tokio::time::timeout(self.operation_timeout, op)
            .await
            .unwrap_or_else(|_| {
                Err(BackendError::Unreachable(format!(
                    "{} did not answer within {:?}",
                    self.key(),
                    self.operation_timeout
                )))
            })
    }
}

/// Bound the login phase of a verification: running out of time before the server
/// lets the credential in is [`BackendError::Unreachable`] (an overloaded or stuck
/// server), never a failed verification.
pub(crate) async fn login_within<T>(
    req: &VerifyRequest,
    connect_timeout: Duration,
    target: &str,
    op: impl Future<Output = Result<T, BackendError>>,
) -> Result<T, BackendError> {
    let limit = req.timeout.min(connect_timeout);
    tokio::time::timeout(limit, op).await.unwrap_or_else(|_| {
        Err(BackendError::Unreachable(format!(
            "login as {} to {target} did not finish within {limit:?}",
            req.id
        )))
    })
}

/// Bound the query phase of a verification: running out of time once logged in is a
/// failed verification.
pub(crate) async fn query_within(
    req: &VerifyRequest,
    op: impl Future<Output = Result<(), BackendError>>,
) -> Result<(), BackendError> {
    tokio::time::timeout(req.timeout, op)
        .await
        .unwrap_or_else(|_| {
            Err(BackendError::VerificationFailed(format!(
                "the verification query as {} did not finish within {:?}",
                req.id, req.timeout
            )))
        })
}
