//! `make bench`: complete rotations per minute (issue → verify → promote → revoke) against
//! one throwaway PostgreSQL and one throwaway MariaDB, each with at most 4 admin
//! connections, with p50/p99 per phase; then, on the same server and with the same
//! concurrency (4 workers), the database floor: fresh password logins per second and
//! create + drop user per second, the rotations per minute the database alone could do,
//! and leasehold's rate as a fraction of it (issue #13).
//!
//! Environment: `BENCH_DB` (`postgres`, `mariadb` or `both`, default `both`),
//! `BENCH_SECONDS` (rotation run per database, default 20), `BENCH_LEASES` (concurrent
//! leases, default 32), `BENCH_FLOOR_SECONDS` (each floor measurement, default 10).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::db::Db;
use leasehold_backends::{
    Backend, BackendError, CredentialId, IssueRequest, PasswordPolicy, RevokeOutcome,
    RevokeRequest, VerifyRequest,
};
use leasehold_core::rotation::Observations;
use leasehold_core::{DrainSessionsMode, PolicyParams, Progress, Strategy};
use leasehold_engine::{Engine, LeaseContext, LeaseKey};
use leasehold_testkit::{MariaDbServer, PostgresServer};
use mysql_async::prelude::Queryable;
use secrecy::ExposeSecret;
use sha1::{Digest, Sha1};

/// Admin connections leasehold may hold on the target, concurrent rotations on it, and
/// the number of workers every floor measurement runs: the same concurrency throughout.
const CONCURRENCY: usize = 4;

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

/// The bench's settings, from the environment.
struct Settings {
    postgres: bool,
    mariadb: bool,
    rotation_seconds: u64,
    leases: usize,
    floor_seconds: u64,
}

impl Settings {
    fn from_env() -> Self {
        let number = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(default)
        };
        let which = std::env::var("BENCH_DB").unwrap_or_else(|_| "both".into());
        let (postgres, mariadb) = match which.as_str() {
            "postgres" => (true, false),
            "mariadb" => (false, true),
            "both" => (true, true),
            other => panic!("BENCH_DB must be postgres, mariadb or both, not {other:?}"),
        };
        Self {
            postgres,
            mariadb,
            rotation_seconds: number("BENCH_SECONDS", 20),
            leases: number("BENCH_LEASES", 32) as usize,
            floor_seconds: number("BENCH_FLOOR_SECONDS", 10),
        }
    }
}

/// What one database's part of the bench measured.
struct DatabaseFigures {
    name: &'static str,
    rotations_per_minute: f64,
    floor: Floor,
}

#[tokio::main]
async fn main() {
    let settings = Settings::from_env();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "rotation bench on {cores} cores: {} leases, at most {CONCURRENCY} admin connections and \
         {CONCURRENCY} concurrent rotations per database, {}s of rotations, then {}s per floor \
         measurement with {CONCURRENCY} workers",
        settings.leases, settings.rotation_seconds, settings.floor_seconds
    );

    let mut figures = Vec::new();
    if settings.postgres {
        let server = PostgresServer::start().await;
        figures.push(bench_database(Db::Pg(&server), "PostgreSQL", &settings).await);
    }
    if settings.mariadb {
        let server = MariaDbServer::start().await;
        figures.push(bench_database(Db::Maria(&server), "MariaDB", &settings).await);
    }

    println!("\nsummary ({cores} cores, {CONCURRENCY} concurrent workers against each database)");
    println!(
        "{:<11} {:>13} {:>11} {:>16} {:>15} {:>13}",
        "database", "leasehold/min", "logins/s", "create+drop/s", "floor rot./min", "of the floor"
    );
    for f in &figures {
        println!(
            "{:<11} {:>13.0} {:>11.0} {:>16.0} {:>15.0} {:>12.0}%",
            f.name,
            f.rotations_per_minute,
            f.floor.logins_per_second,
            f.floor.create_drops_per_second,
            f.floor.rotations_per_minute(),
            f.rotations_per_minute / f.floor.rotations_per_minute() * 100.0
        );
    }
    println!(
        "floor rotations/minute = 60 / (1/(create+drop per s) + 1/(logins per s)): a rotation \
         needs at least one create + drop and one fresh login, which share the same database \
         and workers"
    );
}

/// The rotation run, then the floor, on one server.
async fn bench_database(db: Db<'_>, name: &'static str, settings: &Settings) -> DatabaseFigures {
    println!(
        "\n== {name}: throwaway server on {}:{} ==",
        db.host(),
        db.port()
    );
    let rotations_per_minute = rotation_rate(db, settings.leases, settings.rotation_seconds).await;
    let floor = match db {
        Db::Pg(server) => postgres_floor(server, settings.floor_seconds).await,
        Db::Maria(server) => mariadb_floor(server, settings.floor_seconds).await,
    };
    floor.print(name, rotations_per_minute);
    DatabaseFigures {
        name,
        rotations_per_minute,
        floor,
    }
}

/// Complete rotations per minute of `leases` leases against `db` for `seconds`; prints
/// the per-phase latencies.
async fn rotation_rate(db: Db<'_>, leases: usize, seconds: u64) -> f64 {
    let samples: Samples = Arc::default();
    let backend: Arc<dyn Backend> = Arc::new(Timed {
        inner: db.backend(CONCURRENCY),
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
    let contexts: Arc<Vec<LeaseContext>> = Arc::new(
        (0..leases)
            .map(|i| {
                let key = LeaseKey {
                    namespace: "bench".into(),
                    name: format!("l{i}"),
                    uid: format!("{:012x}{:020}", i, 0),
                };
                let mut ctx = common::context(
                    key,
                    db.kind(),
                    backend.clone(),
                    db.host(),
                    db.port(),
                    db.database(),
                    policy.clone(),
                    // PostgreSQL: none needed to log in; MariaDB: SELECT on the database.
                    db.minimal_privileges(),
                );
                ctx.max_concurrent_per_target = CONCURRENCY;
                ctx
            })
            .collect(),
    );

    // Warm up: every lease gets its first version (not counted).
    run_leases(&contexts, |i| {
        let (engine, store, contexts) = (engine.clone(), store.clone(), contexts.clone());
        async move {
            let ctx = &contexts[i];
            let mut p = Progress::default();
            engine
                .reconcile(ctx, &mut p, &common::obs(None), store.stores())
                .await
                .unwrap();
        }
    })
    .await;
    samples.lock().unwrap().clear();

    // One task per lease, as the controller runs them; the engine's per-target limiter
    // lets CONCURRENCY of them rotate at a time.
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let rotations: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let started = Instant::now();
    run_leases(&contexts, |i| {
        let (engine, store, contexts, rotations) = (
            engine.clone(),
            store.clone(),
            contexts.clone(),
            rotations.clone(),
        );
        async move {
            let ctx = &contexts[i];
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let mut p = store.load(&ctx.key);
                let obs = Observations {
                    consumers_hold: leasehold_core::rotation::ALL_CONSUMERS_CURRENT,
                    maintenance_window_open: true,
                    rotation_request: Some(format!("r{n}")),
                    ..Default::default()
                };
                let t = Instant::now();
                engine
                    .reconcile(ctx, &mut p, &obs, store.stores())
                    .await
                    .unwrap();
                assert_eq!(
                    p.versions.len(),
                    1,
                    "each rotation completes, old version revoked"
                );
                rotations.lock().unwrap().push(t.elapsed());
            }
        }
    })
    .await;
    let elapsed = started.elapsed();
    let mut total = rotations.lock().unwrap().clone();
    total.sort();
    let per_minute = total.len() as f64 / elapsed.as_secs_f64() * 60.0;
    println!(
        "complete rotations: {} in {:.1}s = {:.0} rotations/minute",
        total.len(),
        elapsed.as_secs_f64(),
        per_minute
    );
    println!(
        "{:<32} {:>10} {:>10} {:>8}",
        "phase", "p50 ms", "p99 ms", "count"
    );
    let row = |name: &str, v: &mut Vec<Duration>| {
        v.sort();
        println!(
            "{:<32} {:>10.1} {:>10.1} {:>8}",
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
    per_minute
}

/// Runs `lease(i)` for every lease index as its own task and waits for all of them.
async fn run_leases<F, Fut>(contexts: &[LeaseContext], lease: F)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let tasks: Vec<_> = (0..contexts.len())
        .map(|i| tokio::spawn(lease(i)))
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// What the database alone sustains with [`CONCURRENCY`] workers, each measured on its
/// own for the same duration.
struct Floor {
    /// Fresh connections per second: TCP connect, password authentication, `SELECT 1`,
    /// close.
    logins_per_second: f64,
    /// Create a login user with a password, then drop it: pairs per second.
    create_drops_per_second: f64,
    /// How the logins authenticate (for the printout).
    login_method: &'static str,
}

impl Floor {
    /// Complete rotations per minute the database alone could do.
    ///
    /// A rotation needs at least one create (issue), one fresh login (verify) and one
    /// drop (revoke); grants, session termination and leasehold's own bookkeeping come on
    /// top. Both rates are aggregates over the same [`CONCURRENCY`] workers, so a worker
    /// doing create, login and drop in turn spends `CONCURRENCY / create_drops` +
    /// `CONCURRENCY / logins` seconds per rotation, and the `CONCURRENCY` workers
    /// together finish `1 / (1 / create_drops + 1 / logins)` rotations per second. Read
    /// as capacities of one shared server, the same formula is the harmonic combination
    /// of the two kinds of work competing for it.
    fn rotations_per_minute(&self) -> f64 {
        60.0 / (1.0 / self.create_drops_per_second + 1.0 / self.logins_per_second)
    }

    fn print(&self, name: &str, leasehold_per_minute: f64) {
        let floor = self.rotations_per_minute();
        println!(
            "{name} floor, {CONCURRENCY} workers: {:.0} fresh logins/s ({}, SELECT 1, close); \
             {:.0} create+drop user pairs/s through the admin on {CONCURRENCY} persistent \
             connections",
            self.logins_per_second, self.login_method, self.create_drops_per_second
        );
        println!(
            "  = {floor:.0} rotations/minute the database alone could do \
             (60 / (1/{:.0} + 1/{:.0}): one create+drop and one fresh login per rotation)",
            self.create_drops_per_second, self.logins_per_second
        );
        println!(
            "  leasehold: {leasehold_per_minute:.0} rotations/minute = {:.0}% of the floor \
             (ratio {:.2})",
            leasehold_per_minute / floor * 100.0,
            leasehold_per_minute / floor
        );
    }
}

/// Runs `op(worker, n)` in [`CONCURRENCY`] tasks, each repeating it until `seconds`
/// have passed; returns completed operations per second over all of them.
async fn rate<F, Fut>(seconds: u64, op: F) -> f64
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|worker| {
            let (op, done) = (op.clone(), done.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while Instant::now() < deadline {
                    n += 1;
                    op(worker, n).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// The PostgreSQL floor as the testkit's admin (`LOGIN CREATEROLE`, not a superuser).
/// Passwords go in as SCRAM-SHA-256 verifiers made here, as leasehold sends them, so the
/// server never hashes a plaintext password.
async fn postgres_floor(server: &PostgresServer, seconds: u64) -> Floor {
    let password = leasehold_backends::generate_password(&PasswordPolicy::default()).unwrap();
    let verifier = postgres_protocol::password::scram_sha_256(password.expose_secret().as_bytes());
    let admin = server.admin_client().await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE bench_floor_login LOGIN PASSWORD '{verifier}'"
        ))
        .await
        .unwrap();

    let config = server.config_for("bench_floor_login", password.expose_secret());
    let logins_per_second = rate(seconds, move |_, _| {
        let config = config.clone();
        async move {
            // A new TCP connection and a full SCRAM-SHA-256 exchange every time.
            let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
            let connection = tokio::spawn(connection);
            client.simple_query("SELECT 1").await.unwrap();
            drop(client);
            connection.await.unwrap().unwrap();
        }
    })
    .await;

    let mut admins = Vec::with_capacity(CONCURRENCY);
    for _ in 0..CONCURRENCY {
        admins.push(server.admin_client().await);
    }
    let admins = Arc::new(admins);
    let create_drops_per_second = rate(seconds, move |worker, n| {
        let (admins, verifier) = (admins.clone(), verifier.clone());
        async move {
            let admin = &admins[worker];
            let role = format!("bench_floor_w{worker}_{n}");
            admin
                .batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD '{verifier}'"))
                .await
                .unwrap();
            admin
                .batch_execute(&format!("DROP ROLE {role}"))
                .await
                .unwrap();
        }
    })
    .await;
    admin
        .batch_execute("DROP ROLE bench_floor_login")
        .await
        .unwrap();
    Floor {
        logins_per_second,
        create_drops_per_second,
        login_method: "new TCP connection, SCRAM-SHA-256",
    }
}

/// The MariaDB floor as the testkit's admin (`CREATE USER` and grant option on its
/// database, not root). Users get `mysql_native_password` with the hash made here, as
/// leasehold creates them.
async fn mariadb_floor(server: &MariaDbServer, seconds: u64) -> Floor {
    let password = leasehold_backends::generate_password(&PasswordPolicy::default()).unwrap();
    let hash = native_password_hash(password.expose_secret());
    let mut admin = server.admin_conn().await;
    // Logging in to the test database needs a privilege on it.
    admin
        .query_drop(format!(
            "CREATE USER 'bench_floor_login'@'%' IDENTIFIED WITH mysql_native_password AS '{hash}'"
        ))
        .await
        .unwrap();
    admin
        .query_drop(format!(
            "GRANT SELECT ON `{}`.* TO 'bench_floor_login'@'%'",
            server.database()
        ))
        .await
        .unwrap();

    let opts = server.opts_for("bench_floor_login", password.expose_secret());
    let logins_per_second = rate(seconds, move |_, _| {
        let opts = opts.clone();
        async move {
            // A new TCP connection (no pool) and a full authentication every time.
            let mut conn = mysql_async::Conn::new(opts).await.unwrap();
            conn.query_drop("SELECT 1").await.unwrap();
            conn.disconnect().await.unwrap();
        }
    })
    .await;

    let mut admins = Vec::with_capacity(CONCURRENCY);
    for _ in 0..CONCURRENCY {
        admins.push(tokio::sync::Mutex::new(server.admin_conn().await));
    }
    let admins = Arc::new(admins);
    let create_drops_per_second = rate(seconds, move |worker, n| {
        let (admins, hash) = (admins.clone(), hash.clone());
        async move {
            // Each worker has its own connection: the lock is never contended.
            let mut admin = admins[worker].lock().await;
            let user = format!("'bench_floor_w{worker}_{n}'@'%'");
            admin
                .query_drop(format!(
                    "CREATE USER {user} IDENTIFIED WITH mysql_native_password AS '{hash}'"
                ))
                .await
                .unwrap();
            admin.query_drop(format!("DROP USER {user}")).await.unwrap();
        }
    })
    .await;
    admin
        .query_drop("DROP USER 'bench_floor_login'@'%'")
        .await
        .unwrap();
    let _ = admin.disconnect().await;
    Floor {
        logins_per_second,
        create_drops_per_second,
        login_method: "new TCP connection, mysql_native_password",
    }
}

/// MariaDB's `mysql_native_password` stored form: `*` and the upper hex of
/// SHA1(SHA1(password)).
fn native_password_hash(password: &str) -> String {
    let twice = Sha1::digest(Sha1::digest(password.as_bytes()));
    let hex: String = twice.iter().map(|b| format!("{b:02X}")).collect();
    format!("*{hex}")
}
