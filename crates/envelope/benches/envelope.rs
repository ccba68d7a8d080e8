//! Seal and open throughput with a local key, and the cost of a KMS key (moto on
//! loopback): KMS calls per seal/open and latency per seal/open.
//!
//! `cargo bench -p leasehold-envelope --bench envelope` (release profile).
//! `ENVELOPE_BENCH_SECS` sets the measuring time per local case (default 2),
//! `ENVELOPE_BENCH_KMS_OPS` the seals and opens against moto (default 300). The
//! KMS part is skipped with a note when moto is not installed.
#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use leasehold_envelope::{KeyEncryptionKey, Keyring, KeyringSettings, KmsTimeouts};
use leasehold_testkit::MotoServer;
use prometheus_client::registry::Registry;

/// A credential record's size.
const PAYLOAD: [u8; 1024] = [0x61; 1024];

fn main() {
    let secs: u64 = std::env::var("ENVELOPE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let kms_ops: usize = std::env::var("ENVELOPE_BENCH_KMS_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ctx = lease_ctx("bench");

    println!(
        "one thread, {} B values, {secs} s per local case",
        PAYLOAD.len()
    );
    let local: Arc<dyn KeyEncryptionKey> = local_key(1);
    let keyring = Keyring::new(local.clone(), vec![], KeyringSettings::default());
    let measure = Duration::from_secs(secs);
    let (rate, _) = runtime.block_on(rate_for(measure, || async {
        keyring.seal(&ctx, &PAYLOAD).await.unwrap();
    }));
    println!("local  seal                {rate:>10.0} /s");
    let (rate, _) = runtime.block_on(rate_for(measure, || async {
        let stored = keyring.seal(&ctx, &PAYLOAD).await.unwrap();
        keyring.open(&ctx, stored.as_bytes()).await.unwrap();
    }));
    println!("local  seal+open (cold)    {rate:>10.0} /s");
    let stored = runtime.block_on(keyring.seal(&ctx, &PAYLOAD)).unwrap();
    let (rate, _) = runtime.block_on(rate_for(measure, || async {
        keyring.open(&ctx, stored.as_bytes()).await.unwrap();
    }));
    println!("local  open (cached key)   {rate:>10.0} /s");

    let local_latency = runtime.block_on(latencies(&keyring, &ctx, kms_ops));

    if !MotoServer::installed() {
        println!(
            "\nKMS part skipped: moto is not installed (python3 -m pip install -r tests/requirements-kms.txt)"
        );
        return;
    }
    runtime.block_on(async {
        let moto = MotoServer::start().await;
        let kek = kms_key(&moto, &moto.create_key().await, KmsTimeouts::default()).await;
        let keyring = Keyring::new(kek, vec![], KeyringSettings::default());
        let mut registry = Registry::default();
        keyring.register_metrics(&mut registry);
        // Warm the connection pool.
        let warm = keyring.seal(&ctx, &PAYLOAD).await.unwrap();
        keyring.open(&ctx, warm.as_bytes()).await.unwrap();
        let before_gen = calls(&registry, "generate_data_key");
        let before_dec = calls(&registry, "decrypt");
        let kms_latency = latencies(&keyring, &ctx, kms_ops).await;
        let seal_calls = (calls(&registry, "generate_data_key") - before_gen) / kms_ops as f64;
        let open_calls = (calls(&registry, "decrypt") - before_dec) / kms_ops as f64;
        let hits_before = metric(&registry, "leasehold_kms_data_key_cache_hits_total", &[]);
        let dec_before = calls(&registry, "decrypt");
        for _ in 0..kms_ops {
            keyring.open(&ctx, warm.as_bytes()).await.unwrap();
        }
        let cached_calls = (calls(&registry, "decrypt") - dec_before) / kms_ops as f64;
        let hits = metric(&registry, "leasehold_kms_data_key_cache_hits_total", &[]) - hits_before;

        println!("\nKMS key on moto (loopback), {kms_ops} seals and {kms_ops} opens of distinct values");
        println!(
            "KMS calls: {seal_calls:.2} GenerateDataKey per seal, {open_calls:.2} Decrypt per open, \
             {cached_calls:.2} Decrypt per repeated open ({hits:.0} cache hits)"
        );
        for (name, kms, local) in [
            ("seal", &kms_latency.seal, &local_latency.seal),
            ("open", &kms_latency.open, &local_latency.open),
        ] {
            println!(
                "{name}: KMS p50 {:>6} µs p99 {:>6} µs | local p50 {:>4} µs p99 {:>4} µs | added p50 {:>6} µs p99 {:>6} µs",
                kms.p50, kms.p99, local.p50, local.p99,
                kms.p50.saturating_sub(local.p50), kms.p99.saturating_sub(local.p99),
            );
        }
    });
}

async fn rate_for<F, Fut>(measure: Duration, mut op: F) -> (f64, u64)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < measure {
        for _ in 0..64 {
            op().await;
        }
        n += 64;
    }
    (n as f64 / started.elapsed().as_secs_f64(), n)
}

struct Percentiles {
    p50: u64,
    p99: u64,
}

struct SealOpen {
    seal: Percentiles,
    open: Percentiles,
}

/// Latency of `n` seals, then of opening each of them once (cache misses).
async fn latencies(
    keyring: &Keyring,
    ctx: &leasehold_envelope::EncryptionContext,
    n: usize,
) -> SealOpen {
    let mut seal = Vec::with_capacity(n);
    let mut stored = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        stored.push(keyring.seal(ctx, &PAYLOAD).await.unwrap());
        seal.push(t.elapsed());
    }
    let mut open = Vec::with_capacity(n);
    for value in &stored {
        let t = Instant::now();
        keyring.open(ctx, value.as_bytes()).await.unwrap();
        open.push(t.elapsed());
    }
    SealOpen {
        seal: percentiles(seal),
        open: percentiles(open),
    }
}

fn percentiles(mut samples: Vec<Duration>) -> Percentiles {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples.get(i).map_or(0, |d| d.as_micros() as u64)
    };
    Percentiles {
        p50: at(0.50),
        p99: at(0.99),
    }
}
