//! `make bench`: what envelope encryption adds to a rotation. One lease rotated again
//! and again (issue → verify → promote → deliver → revoke, against a throwaway
//! PostgreSQL) with its versions stored (a) in clear, (b) sealed under a local key,
//! (c) sealed under an AWS KMS key (moto's server on loopback, through the real
//! aws-sdk-kms client); prints per-rotation p50/p99, the added latency, and the KMS
//! calls per rotation (from `leasehold_kms_requests_total`).
//!
//! Environment: `BENCH_ROTATIONS` (per mode, default 100).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use leasehold_core::rotation::Observations;
use leasehold_core::{DrainSessionsMode, PolicyParams, Progress, Strategy};
use leasehold_engine::engine::Stores;
use leasehold_engine::sealed::SealedSecretStore;
use leasehold_engine::{Engine, LeaseKey, SecretStore};
use leasehold_envelope::{
    EncryptionContext, KeyEncryptionKey, Keyring, KeyringSettings, KmsKey, KmsSettings, LocalKey,
};
use leasehold_testkit::{MotoServer, PostgresServer};
use prometheus_client::registry::Registry;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn version_context(lease: &LeaseKey, version: u64) -> EncryptionContext {
    EncryptionContext::new()
        .with("leasehold", "versions")
        .with("namespace", &lease.namespace)
        .with("lease", &lease.name)
        .with("version", version.to_string())
}

/// KMS calls so far (`leasehold_kms_requests_total`, every operation and outcome).
fn kms_calls(registry: &Registry) -> u64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .filter(|l| l.starts_with("leasehold_kms_requests_total{") && l.contains("key=\"kms\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

struct Mode {
    name: &'static str,
    keyring: Option<(Arc<Keyring>, Registry)>,
}

#[tokio::main]
async fn main() {
    let rotations: usize = std::env::var("BENCH_ROTATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let server = PostgresServer::start().await;
    let db = common::db::Db::Pg(&server);
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
    let keyring = |kek: Arc<dyn KeyEncryptionKey>| {
        let ring = Keyring::new(kek, vec![], KeyringSettings::default());
        let mut registry = Registry::default();
        ring.register_metrics(&mut registry);
        Some((Arc::new(ring), registry))
    };
    let mut modes = vec![
        Mode {
            name: "stored in clear",
            keyring: None,
        },
        Mode {
            name: "sealed, local key",
            keyring: keyring(Arc::new(LocalKey::generate().unwrap())),
        },
    ];
    let moto = if MotoServer::installed() {
        let moto = MotoServer::start().await;
        let mut settings = KmsSettings::new(moto.create_key().await);
        settings.region = Some(MotoServer::REGION.to_owned());
        settings.endpoint_url = Some(moto.endpoint_url());
        let kms = KmsKey::connect_with(settings, moto.config_loader())
            .await
            .unwrap();
        modes.push(Mode {
            name: "sealed, AWS KMS (moto)",
            keyring: keyring(Arc::new(kms)),
        });
        Some(moto)
    } else {
        println!(
            "kms rotation bench: moto_server not installed (pip install 'moto[server]'): the KMS row is skipped"
        );
        None
    };
    println!(
        "kms rotation bench: one lease, {rotations} sequential rotations per mode, throwaway PostgreSQL on 127.0.0.1:{}",
        server.port()
    );
    println!(
        "{:<26} {:>10} {:>10} {:>14} {:>14} {:>16}",
        "mode", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "KMS calls/rot."
    );
    let mut baseline: Option<(Duration, Duration)> = None;
    for (i, mode) in modes.iter().enumerate() {
        let mut ctx = common::context(
            LeaseKey {
                namespace: "bench".into(),
                name: format!("kms{i}"),
                uid: format!("{:012x}{:020}", 0xbe00 + i, 0),
            },
            db.kind(),
            db.backend(4),
            db.host(),
            db.port(),
            db.database(),
            policy.clone(),
            db.minimal_privileges(),
        );
        ctx.verify_timeout = Duration::from_secs(10);
        let memory = Arc::new(common::MemoryStores::default());
        let sealed = mode.keyring.as_ref().map(|(ring, _)| {
            SealedSecretStore::new(memory.clone(), ring.clone(), Arc::new(version_context))
        });
        let secrets: &dyn SecretStore = match &sealed {
            Some(s) => s,
            None => memory.as_ref(),
        };
        let stores = Stores {
            progress: memory.as_ref(),
            secrets,
            delivery: memory.as_ref(),
        };
        let engine = Engine::new();
        let mut progress = Progress::default();
        let obs = |n: usize| Observations {
            consumers_hold: leasehold_core::rotation::ALL_CONSUMERS_CURRENT,
            maintenance_window_open: true,
            rotation_request: Some(format!("r{n}")),
            ..Default::default()
        };
        engine
            .reconcile(&ctx, &mut progress, &obs(0), stores)
            .await
            .unwrap();
        let calls_before = mode.keyring.as_ref().map_or(0, |(_, r)| kms_calls(r));
        let mut times = Vec::with_capacity(rotations);
        for n in 1..=rotations {
            let t = Instant::now();
            engine
                .reconcile(&ctx, &mut progress, &obs(n), stores)
                .await
                .unwrap();
            times.push(t.elapsed());
            assert_eq!(progress.versions.len(), 1, "rotated, old version revoked");
        }
        let calls = mode.keyring.as_ref().map_or(0, |(_, r)| kms_calls(r)) - calls_before;
        times.sort();
        let (p50, p99) = (percentile(&times, 0.5), percentile(&times, 0.99));
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let added = |a: Duration, b: Duration| ms(a) - ms(b);
        let (add50, add99) = match baseline {
            Some((b50, b99)) => (added(p50, b50), added(p99, b99)),
            None => (0.0, 0.0),
        };
        println!(
            "{:<26} {:>10.2} {:>10.2} {:>14.2} {:>14.2} {:>16.2}",
            mode.name,
            ms(p50),
            ms(p99),
            add50,
            add99,
            calls as f64 / rotations as f64
        );
        if baseline.is_none() {
            baseline = Some((p50, p99));
        }
        for stored in memory.all_passwords() {
            assert_eq!(
                stored.starts_with("lhenc1:"),
                mode.keyring.is_some(),
                "stored as the mode says"
            );
        }
    }
    drop(moto);
}
