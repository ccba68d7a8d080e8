//! `make bench`: complete rotations per minute (issue → verify → promote → revoke) against
//! one throwaway PostgreSQL using at most 4 admin connections, with p50/p99 per phase.
//!
//! Environment: `BENCH_SECONDS` (default 30), `BENCH_LEASES` (concurrent leases, default 32).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use leasehold_backends::{
    Backend, BackendError, CredentialId, IssueRequest, PasswordPolicy, PostgresBackend,
    PostgresTarget, Privileges, RevokeOutcome, RevokeRequest, VerifyRequest,
};
use leasehold_core::rotation::Observations;
use leasehold_core::{DrainSessionsMode, PolicyParams, Progress, Strategy};
use leasehold_engine::context::DatabaseKind;
use leasehold_engine::{Engine, LeaseContext, LeaseKey, NamingRule};
use leasehold_testkit::PostgresServer;

type Samples = Arc<Mutex<BTreeMap<&'static str, Vec<Duration>>>>;

/// Times every backend call by phase.
struct Timed {
    inner: Arc<dyn Backend>,
    samples: Samples,
}

impl Timed {
    fn record(&self, phase: &'static str, d: Duration) {
        self.samples
            .lock()
            .unwrap()
            .entry(phase)
            .or_default()
            .push(d);
    }
}

#[async_trait]
impl Backend for Timed {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn target_key(&self) -> String {
        self.inner.target_key()
    }
    async fn issue(&self, req: &IssueRequest) -> Result<(), BackendError> {
        let t = Instant::now();
        let r = self.inner.issue(req).await;
        self.record("issue", t.elapsed());
        r
    }
    async fn verify(&self, req: &VerifyRequest) -> Result<(), BackendError> {
        let t = Instant::now();
        let r = self.inner.verify(req).await;
        self.record("verify", t.elapsed());
        r
    }
    async fn revoke(&self, req: &RevokeRequest) -> Result<RevokeOutcome, BackendError> {
        let t = Instant::now();
        let r = self.inner.revoke(req).await;
        self.record("revoke", t.elapsed());
        r
    }
    async fn can_login(&self, id: &CredentialId) -> Result<bool, BackendError> {
        self.inner.can_login(id).await
    }
    async fn list_users(&self, prefix: &str) -> Result<Vec<CredentialId>, BackendError> {
        self.inner.list_users(prefix).await
    }
    async fn ping(&self) -> Result<(), BackendError> {
        self.inner.ping().await
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let leases: usize = std::env::var("BENCH_LEASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let server = PostgresServer::start().await;
    let mut target = PostgresTarget::new(
        server.host(),
        server.port(),
        server.database(),
        server.admin_user(),
        server.admin_password().clone(),
    );
    target.max_admin_connections = 4;
    let samples: Samples = Arc::default();
    let backend: Arc<dyn Backend> = Arc::new(Timed {
        inner: Arc::new(PostgresBackend::new(target).unwrap()),
        samples: samples.clone(),
    });
    let policy = PolicyParams {
        strategy: Strategy::Dynamic,
        ttl: Duration::from_secs(3600),
        renew_before: Duration::from_secs(1200),
        rotation_interval: None,
        grace_period: Duration::ZERO,
        wait_for_consumers: false,
        max_wait: Duration::ZERO,
        drain: DrainSessionsMode::Terminate,
        drain_timeout: Duration::ZERO,
    };
    let store = Arc::new(common::MemoryStores::default());
    let engine = Engine::new();
    println!(
        "rotation bench: throwaway PostgreSQL on 127.0.0.1:{}, {leases} leases, at most 4 admin connections and 4 concurrent rotations, {seconds}s",
        server.port()
    );

    let contexts: Vec<LeaseContext> = (0..leases)
        .map(|i| LeaseContext {
            key: LeaseKey {
                namespace: "bench".into(),
                name: format!("l{i}"),
                uid: format!("{:012x}{:020}", i, 0),
            },
            policy: policy.clone(),
            naming: NamingRule::Dynamic {
                template: "lh_{{uid}}_v{{version}}".into(),
                max_len: 63,
            },
            privileges: Privileges::default(),
            password: PasswordPolicy::default(),
            verify_query: "SELECT 1".into(),
            verify_timeout: Duration::from_secs(10),
            max_concurrent_per_target: 4,
            backend: backend.clone(),
            kind: DatabaseKind::Postgres,
            host: server.host().into(),
            port: server.port(),
            database: server.database().into(),
            account_host: None,
            templates: BTreeMap::new(),
            previous_targets: None,
        })
        .collect();

    // Warm up: every lease gets its first version (not counted).
    futures::future::join_all(contexts.iter().map(|ctx| {
        let (engine, store) = (engine.clone(), store.clone());
        async move {
            let mut p = Progress::default();
            let stores = store.stores();
            let obs = Observations {
                consumers_hold: leasehold_core::rotation::ALL_CONSUMERS_CURRENT,
                maintenance_window_open: true,
                ..Default::default()
            };
            engine.reconcile(ctx, &mut p, &obs, stores).await.unwrap();
        }
    }))
    .await;
    samples.lock().unwrap().clear();

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let rotations: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let started = Instant::now();
    futures::future::join_all(contexts.iter().map(|ctx| {
        let (engine, store, rotations) = (engine.clone(), store.clone(), rotations.clone());
        async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let mut p = store.load(&ctx.key);
                let stores = store.stores();
                let obs = Observations {
                    consumers_hold: leasehold_core::rotation::ALL_CONSUMERS_CURRENT,
                    maintenance_window_open: true,
                    rotation_request: Some(format!("r{n}")),
                    ..Default::default()
                };
                let t = Instant::now();
                engine.reconcile(ctx, &mut p, &obs, stores).await.unwrap();
                assert_eq!(
                    p.versions.len(),
                    1,
                    "each rotation completes, old version revoked"
                );
                rotations.lock().unwrap().push(t.elapsed());
            }
        }
    }))
    .await;
    let elapsed = started.elapsed();
    let mut total = rotations.lock().unwrap().clone();
    total.sort();
    let per_minute = total.len() as f64 / elapsed.as_secs_f64() * 60.0;
    println!(
        "\ncomplete rotations: {} in {:.1}s = {:.0} rotations/minute",
        total.len(),
        elapsed.as_secs_f64(),
        per_minute
    );
    println!(
        "{:<28} {:>10} {:>10} {:>8}",
        "phase", "p50 ms", "p99 ms", "count"
    );
    let row = |name: &str, v: &mut Vec<Duration>| {
        v.sort();
        println!(
            "{:<28} {:>10.1} {:>10.1} {:>8}",
            name,
            percentile(v, 0.5).as_secs_f64() * 1000.0,
            percentile(v, 0.99).as_secs_f64() * 1000.0,
            v.len()
        );
    };
    let mut by_phase = samples.lock().unwrap().clone();
    for phase in ["issue", "verify", "revoke"] {
        row(
            &format!("{phase} (backend call)"),
            by_phase.entry(phase).or_default(),
        );
    }
    row("whole rotation (incl. queueing)", &mut total);
    println!(
        "peak concurrent rotations on the target: {}",
        engine.limiter().peak(&backend.target_key())
    );
}
