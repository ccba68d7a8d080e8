//! Shared test harness: in-memory stores and lease contexts against the testkit servers.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::type_complexity,
    clippy::too_many_arguments
)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use leasehold_backends::{Backend, CredentialMaterial, PasswordPolicy, Privileges};
use leasehold_core::rotation::{Observations, VersionRecord};
use leasehold_core::{DrainSessionsMode, PolicyParams, Progress, Strategy};
use leasehold_engine::context::DatabaseKind;
use leasehold_engine::engine::{FaultPoint, Stores};
use leasehold_engine::{
    Delivery, Engine, LeaseContext, LeaseKey, NamingRule, ProgressStore, SecretStore, StoreError,
};
use secrecy::{ExposeSecret, SecretString};

pub mod db;

/// Progress, secrets and deliveries kept in memory. `saved` is what survives a "crash".
#[derive(Default)]
pub struct MemoryStores {
    pub saved: Mutex<BTreeMap<LeaseKey, Progress>>,
    pub secrets: Mutex<BTreeMap<(LeaseKey, u64), String>>,
    pub delivered: Mutex<Vec<(LeaseKey, u64, BTreeMap<String, String>)>>,
    pub saves: AtomicI64,
}

impl MemoryStores {
    pub fn stores(&self) -> Stores<'_> {
        Stores {
            progress: self,
            secrets: self,
            delivery: self,
        }
    }
    /// The progress as last saved (what a restarted process would load).
    pub fn load(&self, key: &LeaseKey) -> Progress {
        self.saved
            .lock()
            .unwrap()
            .get(key)
            .cloned()
            .unwrap_or_default()
    }
    pub fn password(&self, key: &LeaseKey, version: u64) -> Option<String> {
        self.secrets
            .lock()
            .unwrap()
            .get(&(key.clone(), version))
            .cloned()
    }
    pub fn all_passwords(&self) -> Vec<String> {
        self.secrets.lock().unwrap().values().cloned().collect()
    }
}

#[async_trait]
impl ProgressStore for MemoryStores {
    async fn save(&self, lease: &LeaseKey, progress: &Progress) -> Result<(), StoreError> {
        self.saves.fetch_add(1, Ordering::SeqCst);
        self.saved
            .lock()
            .unwrap()
            .insert(lease.clone(), progress.clone());
        Ok(())
    }
}

#[async_trait]
impl SecretStore for MemoryStores {
    async fn put(
        &self,
        lease: &LeaseKey,
        version: u64,
        secret: &SecretString,
    ) -> Result<(), StoreError> {
        self.secrets
            .lock()
            .unwrap()
            .insert((lease.clone(), version), secret.expose_secret().to_string());
        Ok(())
    }
    async fn get(
        &self,
        lease: &LeaseKey,
        version: u64,
    ) -> Result<Option<SecretString>, StoreError> {
        Ok(self
            .secrets
            .lock()
            .unwrap()
            .get(&(lease.clone(), version))
            .map(|s| SecretString::from(s.clone())))
    }
    async fn remove(&self, lease: &LeaseKey, version: u64) -> Result<(), StoreError> {
        self.secrets
            .lock()
            .unwrap()
            .remove(&(lease.clone(), version));
        Ok(())
    }
}

#[async_trait]
impl Delivery for MemoryStores {
    async fn deliver(
        &self,
        lease: &LeaseKey,
        version: u64,
        material: &CredentialMaterial,
    ) -> Result<(), StoreError> {
        let files = material
            .0
            .iter()
            .map(|(k, v)| (k.clone(), v.expose_secret().to_string()))
            .collect();
        self.delivered
            .lock()
            .unwrap()
            .push((lease.clone(), version, files));
        Ok(())
    }
}

/// A clock tests move by hand.
#[derive(Clone)]
pub struct TestClock(pub Arc<AtomicI64>);

impl TestClock {
    pub fn new() -> Self {
        Self(Arc::new(AtomicI64::new(Timestamp::now().as_second())))
    }
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_secs() as i64, Ordering::SeqCst);
    }
    pub fn func(&self) -> Arc<dyn Fn() -> Timestamp + Send + Sync> {
        let c = self.0.clone();
        Arc::new(move || Timestamp::from_second(c.load(Ordering::SeqCst)).unwrap())
    }
}

/// Policy for tests: immediate revocation unless a grace period is given.
pub fn policy(strategy: Strategy, grace: Duration) -> PolicyParams {
    PolicyParams {
        strategy,
        ttl: Duration::from_secs(3600),
        renew_before: Duration::from_secs(1200),
        rotation_interval: None,
        grace_period: grace,
        wait_for_consumers: false,
        max_wait: grace,
        drain: DrainSessionsMode::Terminate,
        drain_timeout: Duration::ZERO,
    }
}

pub fn lease_key(prefix: &str) -> LeaseKey {
    let uid = format!("{:032x}", rand_u128());
    LeaseKey {
        namespace: "test".into(),
        name: format!("{prefix}-{}", &uid[..6]),
        uid,
    }
}

fn rand_u128() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    let a = h.finish() as u128;
    let mut h2 = std::collections::hash_map::RandomState::new().build_hasher();
    h2.write_u64(a as u64);
    (a << 64) | h2.finish() as u128
}

/// Naming for a strategy, unique per lease.
pub fn naming(strategy: Strategy, key: &LeaseKey, kind: DatabaseKind) -> NamingRule {
    let base = format!("app_{}", &key.uid[..10]);
    match strategy {
        Strategy::Dynamic => NamingRule::Dynamic {
            template: "lh_{{uid}}_v{{version}}".into(),
            max_len: if kind == DatabaseKind::Postgres {
                63
            } else {
                32
            },
        },
        Strategy::AlternatingUsers => NamingRule::Alternating { base },
        Strategy::InPlace => NamingRule::InPlace { user: base },
    }
}

pub fn context(
    key: LeaseKey,
    kind: DatabaseKind,
    backend: Arc<dyn Backend>,
    host: &str,
    port: u16,
    database: &str,
    policy: PolicyParams,
    privileges: Privileges,
) -> LeaseContext {
    LeaseContext {
        naming: naming(policy.strategy, &key, kind),
        key,
        policy,
        privileges,
        password: PasswordPolicy::default(),
        verify_query: "SELECT 1".into(),
        verify_timeout: Duration::from_secs(10),
        max_concurrent_per_target: 4,
        backend,
        kind,
        host: host.into(),
        port,
        database: database.into(),
        account_host: None,
        templates: BTreeMap::new(),
        previous_targets: None,
    }
}

/// Observations of a lease with all consumers current and no window, optionally with a
/// rotation request.
pub fn obs(request: Option<&str>) -> Observations {
    Observations {
        consumers_hold: leasehold_core::rotation::ALL_CONSUMERS_CURRENT,
        maintenance_window_open: true,
        rotation_request: request.map(String::from),
        ..Default::default()
    }
}

/// [`obs`] of a lease being deleted, with no rotation request.
pub fn deleting() -> Observations {
    Observations {
        deleting: true,
        ..obs(None)
    }
}

/// The lease's first version, issued by `engine` from what `stores` saved (nothing yet):
/// the progress after it, the version and its password.
pub async fn issue_first_version(
    engine: &Engine,
    ctx: &LeaseContext,
    stores: &MemoryStores,
) -> (Progress, VersionRecord, String) {
    let mut progress = stores.load(&ctx.key);
    engine
        .reconcile(ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap();
    let first = progress.current().unwrap().clone();
    let password = stores.password(&ctx.key, 1).unwrap();
    (progress, first, password)
}

/// `engine` failing as a crash would the first time it reaches `point`, and not after.
pub fn crashing_once_at(engine: Engine, point: FaultPoint) -> Engine {
    let armed = AtomicBool::new(true);
    engine.with_fault_hook(Arc::new(move |p| {
        if p == point && armed.swap(false, Ordering::SeqCst) {
            Err("crash".into())
        } else {
            Ok(())
        }
    }))
}

/// A backend whose verification fails for users ending in `user_suffix` (all users when
/// empty), like a credential that does not work.
pub struct FailVerifyFor {
    pub inner: Arc<dyn Backend>,
    pub user_suffix: String,
}

#[async_trait]
impl Backend for FailVerifyFor {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn target_key(&self) -> String {
        self.inner.target_key()
    }
    async fn issue(
        &self,
        req: &leasehold_backends::IssueRequest,
    ) -> Result<(), leasehold_backends::BackendError> {
        self.inner.issue(req).await
    }
    async fn verify(
        &self,
        req: &leasehold_backends::VerifyRequest,
    ) -> Result<(), leasehold_backends::BackendError> {
        if req.id.0.ends_with(&self.user_suffix) {
            return Err(leasehold_backends::BackendError::VerificationFailed(
                "login refused (test)".into(),
            ));
        }
        self.inner.verify(req).await
    }
    async fn revoke(
        &self,
        req: &leasehold_backends::RevokeRequest,
    ) -> Result<leasehold_backends::RevokeOutcome, leasehold_backends::BackendError> {
        self.inner.revoke(req).await
    }
    async fn can_login(
        &self,
        id: &leasehold_backends::CredentialId,
    ) -> Result<bool, leasehold_backends::BackendError> {
        self.inner.can_login(id).await
    }
    async fn list_users(
        &self,
        prefix: &str,
    ) -> Result<Vec<leasehold_backends::CredentialId>, leasehold_backends::BackendError> {
        self.inner.list_users(prefix).await
    }
    async fn ping(&self) -> Result<(), leasehold_backends::BackendError> {
        self.inner.ping().await
    }
}

/// Backends of databases a lease used to point at, by target (tests build them by hand).
#[derive(Default)]
pub struct KnownTargets(pub Mutex<Vec<(leasehold_core::Target, Arc<dyn Backend>)>>);

impl KnownTargets {
    /// Only `target`, reached through `backend`.
    pub fn only(target: leasehold_core::Target, backend: Arc<dyn Backend>) -> Arc<Self> {
        Arc::new(Self(Mutex::new(vec![(target, backend)])))
    }
}

impl leasehold_engine::TargetBackends for KnownTargets {
    fn backend_for(
        &self,
        target: &leasehold_core::Target,
    ) -> Result<Arc<dyn Backend>, leasehold_backends::BackendError> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .find(|(t, _)| t == target)
            .map(|(_, b)| b.clone())
            .ok_or_else(|| {
                leasehold_backends::BackendError::Other(format!("unknown {}", target.key()))
            })
    }
}
