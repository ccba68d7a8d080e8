//! Everything the engine needs to know about one lease, resolved from the API objects.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leasehold_api::validate::{self, FieldError};
use leasehold_api::{DatabaseSpec, PasswordAlphabet, RotationPolicySpec, SecretLeaseSpec, TlsMode};
use leasehold_backends::password::PasswordPolicy;
use leasehold_backends::{Backend, BackendError, CredentialId, Privileges};
use leasehold_backends::{MySqlBackend, MySqlTarget};
use leasehold_backends::{PostgresBackend, PostgresTarget};
use leasehold_core::naming::{self, DEFAULT_DYNAMIC_TEMPLATE, LeaseIdentity};
use leasehold_core::rotation::{IssuedUnder, Target};
use leasehold_core::{PolicyParams, Strategy};
use secrecy::{ExposeSecret, SecretString};

/// Identity of a lease: where it lives and its UID (credential names derive from the UID).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseKey {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl std::fmt::Display for LeaseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How version numbers map to backend user names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamingRule {
    Dynamic {
        template: String,
        max_len: usize,
    },
    Alternating {
        base: String,
    },
    InPlace {
        user: String,
    },
    /// A fresh random serial per version (certificates).
    Serial,
}

impl NamingRule {
    /// The user of a new version `version`. `current` is the user of the current version
    /// (AlternatingUsers takes the other of its two users).
    pub fn credential_id(
        &self,
        lease: &LeaseKey,
        version: u64,
        current: Option<&str>,
    ) -> Result<CredentialId, FieldError> {
        let name = match self {
            NamingRule::Dynamic { template, max_len } => naming::dynamic_username(
                template,
                &LeaseIdentity {
                    namespace: lease.namespace.clone(),
                    name: lease.name.clone(),
                    uid: lease.uid.clone(),
                },
                version,
                *max_len,
            )
            .map_err(|e| FieldError {
                field: "spec.usernameTemplate".into(),
                message: e.to_string(),
            })?,
            NamingRule::Alternating { base } => naming::alternating_username(base, current),
            NamingRule::InPlace { user } => user.clone(),
            NamingRule::Serial => leasehold_certs::new_serial(),
        };
        Ok(CredentialId(name))
    }

    /// The literal prefix of the names this rule produces (for the orphan sweeper).
    pub fn sweep_prefix(&self) -> Option<&str> {
        match self {
            NamingRule::Dynamic { template, .. } => Some(naming::literal_prefix(template)),
            _ => None,
        }
    }
}

/// Which kind of database a lease talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DatabaseKind {
    Postgres,
    MySql,
    /// Not a database: a certificate lease's issuer.
    Certificate,
}

impl DatabaseKind {
    pub fn scheme(self) -> &'static str {
        match self {
            DatabaseKind::Postgres => "postgres",
            DatabaseKind::MySql => "mysql",
            DatabaseKind::Certificate => "certificate",
        }
    }
    pub fn default_port(self) -> u16 {
        match self {
            DatabaseKind::Postgres => 5432,
            DatabaseKind::MySql => 3306,
            DatabaseKind::Certificate => 0,
        }
    }
}

/// Everything the engine needs for one lease.
#[derive(Clone)]
pub struct LeaseContext {
    pub key: LeaseKey,
    pub policy: PolicyParams,
    pub naming: NamingRule,
    pub privileges: Privileges,
    pub password: PasswordPolicy,
    pub verify_query: String,
    pub verify_timeout: Duration,
    pub max_concurrent_per_target: usize,
    pub backend: Arc<dyn Backend>,
    /// Connection facts consumers need (never secret).
    pub kind: DatabaseKind,
    pub host: String,
    pub port: u16,
    pub database: String,
    /// MySQL: the host part of the accounts (`None`: `%`).
    pub account_host: Option<String>,
    /// Templates for the delivered Secret / files (empty: defaults).
    pub templates: BTreeMap<String, String>,
    /// Backends for databases that earlier versions were issued on, when the lease has
    /// moved since (`None`: such versions cannot be revoked and their revocation retries).
    pub previous_targets: Option<Arc<dyn TargetBackends>>,
}

/// Finds the backend of a database a lease used to point at, so versions issued there
/// are revoked there.
pub trait TargetBackends: Send + Sync {
    fn backend_for(&self, target: &Target) -> Result<Arc<dyn Backend>, BackendError>;
}

impl LeaseContext {
    /// The database this lease points at now.
    pub fn target(&self) -> Target {
        Target {
            kind: self.kind.scheme().to_string(),
            host: self.host.clone(),
            port: self.port,
            database: self.database.clone(),
            account_host: self.account_host.clone(),
        }
    }

    /// What a version issued now is issued under.
    pub fn issued_under(&self) -> IssuedUnder {
        IssuedUnder {
            strategy: self.policy.strategy,
            target: self.target(),
        }
    }

    /// The backend of `target` (this lease's own when it is the current target).
    pub fn backend_for(&self, target: Option<&Target>) -> Result<Arc<dyn Backend>, BackendError> {
        match target {
            Some(t) if *t != self.target() => match &self.previous_targets {
                Some(targets) => targets.backend_for(t),
                None => Err(BackendError::Other(format!(
                    "no backend for {}, where this version was issued",
                    t.key()
                ))),
            },
            _ => Ok(self.backend.clone()),
        }
    }
}

/// Earlier targets of a lease, reached through the shared registry with the lease's
/// current admin credentials and TLS mode (the spec names no others).
#[derive(Clone)]
struct RegistryTargets {
    registry: BackendRegistry,
    admin: AdminCredentials,
    tls: leasehold_backends::TlsMode,
}

impl TargetBackends for RegistryTargets {
    fn backend_for(&self, target: &Target) -> Result<Arc<dyn Backend>, BackendError> {
        let kind = match target.kind.as_str() {
            "postgres" => DatabaseKind::Postgres,
            "mysql" => DatabaseKind::MySql,
            other => {
                return Err(BackendError::Other(format!(
                    "unknown database kind {other:?} recorded for {}",
                    target.key()
                )));
            }
        };
        self.registry.get_target(
            kind,
            &target.host,
            target.port,
            &target.database,
            target.account_host.as_deref(),
            &self.admin,
            self.tls.clone(),
        )
    }
}

impl std::fmt::Debug for LeaseContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseContext")
            .field("key", &self.key)
            .field("strategy", &self.policy.strategy)
            .field("backend", &self.backend.target_key())
            .finish_non_exhaustive()
    }
}

/// Why a lease cannot be run; each maps to a `Ready=False` reason.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("the policy is invalid: {}", validate::summary(.0))]
    InvalidPolicy(Vec<FieldError>),
    #[error("the lease is invalid: {}", validate::summary(.0))]
    InvalidLease(Vec<FieldError>),
    #[error("the lease names no backend: set one of postgres, mysql or certificate")]
    UnsupportedBackend,
    #[error("cannot build the backend: {0}")]
    Backend(#[from] BackendError),
}

impl ResolveError {
    /// The `Ready=False` reason.
    pub fn reason(&self) -> &'static str {
        match self {
            ResolveError::InvalidPolicy(_) => "InvalidPolicy",
            ResolveError::InvalidLease(_) => "InvalidSpec",
            ResolveError::UnsupportedBackend => "UnsupportedBackend",
            ResolveError::Backend(_) => "BackendError",
        }
    }
}

/// Admin credentials read from the referenced Secret.
#[derive(Clone)]
pub struct AdminCredentials {
    pub username: String,
    pub password: SecretString,
}

impl std::fmt::Debug for AdminCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminCredentials")
            .field("username", &self.username)
            .field("password", &"[redacted]")
            .finish()
    }
}

/// Backends shared per target and admin credential, so each database gets one bounded pool.
#[derive(Default, Clone)]
pub struct BackendRegistry {
    backends: Arc<Mutex<HashMap<String, Arc<dyn Backend>>>>,
    /// Admin pool size per target.
    pub max_admin_connections: usize,
}

impl std::fmt::Debug for BackendRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendRegistry").finish_non_exhaustive()
    }
}

impl BackendRegistry {
    pub fn new(max_admin_connections: usize) -> Self {
        Self {
            backends: Arc::default(),
            max_admin_connections: max_admin_connections.max(1),
        }
    }

    /// The backend for a database, created on first use. A changed admin password
    /// creates a new pool (the key includes a fingerprint of the credential).
    pub fn get(
        &self,
        kind: DatabaseKind,
        db: &DatabaseSpec,
        admin: &AdminCredentials,
        tls: leasehold_backends::TlsMode,
    ) -> Result<Arc<dyn Backend>, BackendError> {
        let port = db.port.unwrap_or(kind.default_port());
        let account_host = match kind {
            DatabaseKind::MySql => db.account_host.as_deref(),
            DatabaseKind::Postgres | DatabaseKind::Certificate => None,
        };
        self.get_target(kind, &db.host, port, &db.database, account_host, admin, tls)
    }

    /// [`BackendRegistry::get`] by host, port and database.
    #[allow(clippy::too_many_arguments)]
    pub fn get_target(
        &self,
        kind: DatabaseKind,
        host: &str,
        port: u16,
        database: &str,
        account_host: Option<&str>,
        admin: &AdminCredentials,
        tls: leasehold_backends::TlsMode,
    ) -> Result<Arc<dyn Backend>, BackendError> {
        let target = format!(
            "{}://{}@{}:{}/{}",
            kind.scheme(),
            admin.username,
            host,
            port,
            database
        );
        // The MySQL account host is part of the target: leases on one server with
        // different host patterns need backends of their own.
        let target = match (kind, account_host) {
            (DatabaseKind::MySql, Some(host)) => format!("{target}?accountHost={host}"),
            _ => target,
        };
        let key = format!(
            "{target}#{:016x}",
            fingerprint(admin.password.expose_secret())
        );
        let mut backends = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = backends.get(&key) {
            return Ok(b.clone());
        }
        // The admin password changed: the old pool's connections still work until the
        // server drops them, but no new work should go there.
        backends.retain(|k, _| k.split_once('#').is_none_or(|(t, _)| t != target));
        let backend: Arc<dyn Backend> = match kind {
            DatabaseKind::Postgres => {
                let mut t = PostgresTarget::new(
                    host,
                    port,
                    database,
                    &admin.username,
                    admin.password.clone(),
                );
                t.tls = tls;
                t.max_admin_connections = self.max_admin_connections;
                Arc::new(PostgresBackend::new(t)?)
            }
            DatabaseKind::MySql => {
                let mut t = MySqlTarget::new(
                    host,
                    port,
                    database,
                    &admin.username,
                    admin.password.clone(),
                );
                t.tls = tls;
                t.max_admin_connections = self.max_admin_connections;
                if let Some(host) = account_host {
                    t.account_host = host.to_owned();
                }
                Arc::new(MySqlBackend::new(t)?)
            }
            DatabaseKind::Certificate => {
                return Err(BackendError::Invalid(
                    "a certificate issuer is not a database target".into(),
                ));
            }
        };
        backends.insert(key, backend.clone());
        Ok(backend)
    }
}

/// Not cryptographic: only tells two admin passwords apart in a map key.
fn fingerprint(s: &str) -> u64 {
    leasehold_core::backoff::splitmix(leasehold_core::backoff::seed_of(s))
}

/// Build the context of a database lease from its spec, policy and admin credentials.
pub fn resolve(
    key: LeaseKey,
    lease: &SecretLeaseSpec,
    policy: &RotationPolicySpec,
    admin: &AdminCredentials,
    ca_pem: Option<String>,
    registry: &BackendRegistry,
) -> Result<LeaseContext, ResolveError> {
    let params = validate::policy_params(policy).map_err(ResolveError::InvalidPolicy)?;
    let errors = validate::validate_lease(lease, Some(policy));
    if !errors.is_empty() {
        return Err(ResolveError::InvalidLease(errors));
    }
    let (kind, db, max_len) = match (&lease.postgres, &lease.mysql) {
        (Some(db), _) => (DatabaseKind::Postgres, db, validate::POSTGRES_MAX_USERNAME),
        (None, Some(db)) => (DatabaseKind::MySql, db, validate::MYSQL_MAX_USERNAME),
        (None, None) => return Err(ResolveError::UnsupportedBackend),
    };
    let naming = match policy.strategy {
        Strategy::Dynamic => NamingRule::Dynamic {
            template: db
                .username_template
                .clone()
                .unwrap_or_else(|| DEFAULT_DYNAMIC_TEMPLATE.to_string()),
            max_len,
        },
        Strategy::AlternatingUsers => NamingRule::Alternating {
            base: db.username.clone().unwrap_or_default(),
        },
        Strategy::InPlace => NamingRule::InPlace {
            user: db.username.clone().unwrap_or_default(),
        },
    };
    let tls = match db.tls.mode {
        TlsMode::Disable => leasehold_backends::TlsMode::Disable,
        TlsMode::Require => leasehold_backends::TlsMode::Require,
        TlsMode::VerifyFull => leasehold_backends::TlsMode::VerifyFull {
            ca_pem: ca_pem.unwrap_or_default(),
        },
    };
    let backend = registry.get(kind, db, admin, tls.clone())?;
    let previous_targets: Arc<dyn TargetBackends> = Arc::new(RegistryTargets {
        registry: registry.clone(),
        admin: admin.clone(),
        tls,
    });
    let templates = lease
        .delivery
        .secret
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();
    Ok(LeaseContext {
        key,
        policy: params,
        naming,
        privileges: Privileges {
            member_of: db.member_of.clone(),
            grants: db.grants.clone(),
        },
        password: PasswordPolicy {
            length: policy.password.length as usize,
            alphabet: match policy.password.alphabet {
                PasswordAlphabet::Alphanumeric => {
                    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789".into()
                }
                PasswordAlphabet::AlphanumericSymbols => {
                    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~!*".into()
                }
            },
        },
        verify_query: policy.verify.query.clone(),
        verify_timeout: policy.verify.timeout.into(),
        max_concurrent_per_target: policy.rate_limit.max_concurrent_rotations_per_target as usize,
        backend,
        kind,
        host: db.host.clone(),
        account_host: match kind {
            DatabaseKind::MySql => db.account_host.clone(),
            DatabaseKind::Postgres | DatabaseKind::Certificate => None,
        },
        port: db.port.unwrap_or(kind.default_port()),
        database: db.database.clone(),
        templates,
        previous_targets: Some(previous_targets),
    })
}

/// Where a certificate lease's issuer is, as a [`Target`]: `kind` `certificate`, `host`
/// `Issuer/<namespace>/<name>` or `ClusterIssuer/<name>`.
pub fn issuer_target(lease_namespace: &str, issuer: &leasehold_api::IssuerRef) -> Target {
    let host = match issuer.kind {
        leasehold_api::IssuerKind::Issuer => format!("Issuer/{lease_namespace}/{}", issuer.name),
        leasehold_api::IssuerKind::ClusterIssuer => format!("ClusterIssuer/{}", issuer.name),
    };
    Target {
        kind: DatabaseKind::Certificate.scheme().to_owned(),
        host,
        port: 0,
        database: String::new(),
        account_host: None,
    }
}

/// Build the context of a certificate lease: versions are certificates from `issuer`
/// (resolved by the caller from `spec.certificate.issuerRef`), one per rotation, each
/// with a fresh key. The policy's strategy does not apply (every certificate is new, as
/// with `Dynamic`), nor do sessions; `ttl` is the default lifetime and `renewBefore`
/// when the next one is issued.
pub fn resolve_certificate(
    key: LeaseKey,
    lease: &SecretLeaseSpec,
    policy: &RotationPolicySpec,
    issuer: Arc<dyn leasehold_certs::CertificateIssuer>,
    previous_issuers: Option<IssuerResolver>,
) -> Result<LeaseContext, ResolveError> {
    let mut params = validate::policy_params(policy).map_err(ResolveError::InvalidPolicy)?;
    let errors = validate::validate_lease(lease, None);
    if !errors.is_empty() {
        return Err(ResolveError::InvalidLease(errors));
    }
    let Some(spec) = &lease.certificate else {
        return Err(ResolveError::UnsupportedBackend);
    };
    let request = crate::certificate::certificate_request(spec, params.ttl)
        .map_err(|e| ResolveError::InvalidLease(vec![e]))?;
    params.strategy = Strategy::Dynamic;
    params.drain = leasehold_core::rotation::DrainSessionsMode::Ignore;
    params.ttl = request.duration.try_into().unwrap_or(params.ttl);
    if params.renew_before >= params.ttl {
        params.renew_before = params.ttl / 3;
    }
    let target = issuer_target(&key.namespace, &spec.issuer_ref);
    let previous_targets = previous_issuers.map(|resolve| {
        Arc::new(IssuerTargets {
            resolve,
            request: request.clone(),
        }) as Arc<dyn TargetBackends>
    });
    let backend: Arc<dyn Backend> = Arc::new(crate::certificate::CertificateBackend::new(
        issuer,
        request,
        target.key(),
    ));
    Ok(LeaseContext {
        key,
        policy: params,
        naming: NamingRule::Serial,
        privileges: Privileges::default(),
        password: PasswordPolicy {
            length: 0,
            alphabet: String::new(),
        },
        verify_query: String::new(),
        verify_timeout: policy.verify.timeout.into(),
        max_concurrent_per_target: policy.rate_limit.max_concurrent_rotations_per_target as usize,
        backend,
        kind: DatabaseKind::Certificate,
        host: target.host,
        port: 0,
        database: String::new(),
        account_host: None,
        templates: BTreeMap::new(),
        previous_targets,
    })
}

/// Finds the issuer an `issuerRef` names for a lease in a namespace, or says why not.
pub type IssuerResolver = Arc<
    dyn Fn(
            &str,
            &leasehold_api::IssuerRef,
        ) -> Result<Arc<dyn leasehold_certs::CertificateIssuer>, String>
        + Send
        + Sync,
>;

/// The issuers a certificate lease used before its `issuerRef` changed, so versions
/// issued there are revoked there.
struct IssuerTargets {
    resolve: IssuerResolver,
    request: leasehold_certs::CertificateRequest,
}

impl TargetBackends for IssuerTargets {
    fn backend_for(&self, target: &Target) -> Result<Arc<dyn Backend>, BackendError> {
        let (namespace, issuer) = parse_issuer_target(target).ok_or_else(|| {
            BackendError::Other(format!("{} is not a certificate issuer", target.key()))
        })?;
        let found = (self.resolve)(&namespace, &issuer).map_err(BackendError::Unreachable)?;
        Ok(Arc::new(crate::certificate::CertificateBackend::new(
            found,
            self.request.clone(),
            target.key(),
        )))
    }
}

/// The namespace (of the lease) and `issuerRef` an [`issuer_target`] was made from.
pub fn parse_issuer_target(target: &Target) -> Option<(String, leasehold_api::IssuerRef)> {
    if target.kind != DatabaseKind::Certificate.scheme() {
        return None;
    }
    let mut parts = target.host.splitn(3, '/');
    match (parts.next()?, parts.next()?, parts.next()) {
        ("Issuer", ns, Some(name)) => Some((
            ns.to_owned(),
            leasehold_api::IssuerRef {
                name: name.to_owned(),
                kind: leasehold_api::IssuerKind::Issuer,
            },
        )),
        ("ClusterIssuer", name, None) => Some((
            String::new(),
            leasehold_api::IssuerRef {
                name: name.to_owned(),
                kind: leasehold_api::IssuerKind::ClusterIssuer,
            },
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> DatabaseSpec {
        serde_json::from_value(serde_json::json!({
            "host": "127.0.0.1", "port": 5432, "database": "app",
            "adminSecretRef": {"name": "admin"}
        }))
        .unwrap()
    }

    fn admin(password: &str) -> AdminCredentials {
        AdminCredentials {
            username: "leasehold_admin".into(),
            password: SecretString::from(password.to_string()),
        }
    }

    #[tokio::test]
    async fn one_pool_per_target_replaced_when_the_admin_password_changes() {
        let registry = BackendRegistry::new(2);
        let tls = || leasehold_backends::TlsMode::Disable;
        let a = registry
            .get(DatabaseKind::Postgres, &db(), &admin("one"), tls())
            .unwrap();
        let again = registry
            .get(DatabaseKind::Postgres, &db(), &admin("one"), tls())
            .unwrap();
        assert!(Arc::ptr_eq(&a, &again), "the pool is shared");
        let rotated = registry
            .get(DatabaseKind::Postgres, &db(), &admin("two"), tls())
            .unwrap();
        assert!(
            !Arc::ptr_eq(&a, &rotated),
            "a new admin password gets a new pool"
        );
        assert_eq!(
            registry.backends.lock().unwrap().len(),
            1,
            "the old pool is dropped"
        );
    }
}
