//! `cargo bench -p leasehold-audit`: records/s and p99 latency of `AuditLog::record`
//! with a file sink (checkpoints every 100 records, as by default).

use std::sync::Arc;
use std::time::{Duration, Instant};

use leasehold_audit::{
    Action, AuditEvent, AuditLog, AuditSettings, AuditSigner, MemoryCheckpointStore, Outcome, Sink,
};

const RECORDS: usize = 50_000;

fn main() {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start a runtime: {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(run());
}

async fn run() {
    let Ok(dir) = tempfile::tempdir() else {
        eprintln!("cannot create a temp dir");
        std::process::exit(1);
    };
    let log = match AuditLog::start(
        vec![Sink::File(dir.path().join("audit.jsonl"))],
        AuditSigner::generate(),
        Arc::new(MemoryCheckpointStore::new()),
        AuditSettings::default(),
    )
    .await
    {
        Ok(log) => log,
        Err(e) => {
            eprintln!("cannot start the log: {e}");
            std::process::exit(1);
        }
    };
    let mut latencies = Vec::with_capacity(RECORDS);
    let started = Instant::now();
    for i in 0..RECORDS {
        let event = AuditEvent::new(Action::BrokerIssue, Outcome::Allowed)
            .lease("shop", "orders-db")
            .version(i as u64)
            .username("lh_orders_7")
            .pod("shop", "api-0", "5d1c0b1e-7f1a-4c0e-9d55-0a4c4b7e8f21")
            .service_account("shop", "api")
            .node("node-a");
        let call = Instant::now();
        log.record(event);
        latencies.push(call.elapsed());
    }
    let total = started.elapsed();
    log.shutdown().await;
    latencies.sort_unstable();
    let p = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "record(): {RECORDS} records in {:.3} s = {:.0} records/s; p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        total.as_secs_f64(),
        RECORDS as f64 / total.as_secs_f64(),
        micros(p(0.5)),
        micros(p(0.99)),
        micros(p(1.0)),
    );
}
