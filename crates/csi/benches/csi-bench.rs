//! NodePublishVolume latency and memory of the real driver on a Unix socket,
//! with an in-process fake broker (tonic on loopback) and a trivial verifier.
//!
//! `cargo bench -p leasehold-csi --bench csi-bench` (root: it mounts tmpfs).
//! Prints figures; asserts nothing about timing.
#![allow(clippy::unwrap_used, missing_debug_implementations)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;

const VOLUMES: usize = 330;
const CERT_VOLUMES: usize = 200;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name:<34} n={:<4} p50={:>8.3} ms  p99={:>8.3} ms  max={:>8.3} ms",
        samples.len(),
        percentile(&samples, 0.50).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        samples.last().unwrap().as_secs_f64() * 1e3,
    );
}

fn main() {
    if !is_root() {
        eprintln!("csi-bench: needs root (tmpfs mounts); skipping");
        return;
    }
    QUIET.store(true, std::sync::atomic::Ordering::Relaxed);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let broker = FakeBroker::start().await;
        let mut d = start_driver(dir.path(), &broker).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let idle = rss_kib();

        // Warm-up: a few publish/unpublish cycles.
        for i in 0..20 {
            let id = format!("csi-warm{i}");
            let target = target_under(dir.path(), &format!("warm{i}"));
            d.node.node_publish_volume(Pub::new(&id, &target).build()).await.unwrap();
            d.node.node_unpublish_volume(unpublish_req(&id, &target)).await.unwrap();
        }

        let mut targets = Vec::new();
        let mut first = Vec::new();
        for i in 0..VOLUMES {
            let id = format!("csi-bench{i:04}");
            let target = target_under(dir.path(), &format!("pod{i:04}"));
            let req = Pub::new(&id, &target).build();
            let t = Instant::now();
            d.node.node_publish_volume(req).await.unwrap();
            first.push(t.elapsed());
            targets.push((id, target));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let loaded = rss_kib();

        let mut again = Vec::new();
        for (id, target) in &targets {
            let req = Pub::new(id, target).build();
            let t = Instant::now();
            d.node.node_publish_volume(req).await.unwrap();
            again.push(t.elapsed());
        }

        // Rotation: the broker has a new version; every republish swaps files.
        broker.bump_version();
        let mut rotate = Vec::new();
        for (id, target) in &targets {
            let req = Pub::new(id, target).build();
            let t = Instant::now();
            d.node.node_publish_volume(req).await.unwrap();
            rotate.push(t.elapsed());
        }

        let mut unpublish = Vec::new();
        for (id, target) in &targets {
            let t = Instant::now();
            d.node.node_unpublish_volume(unpublish_req(id, target)).await.unwrap();
            unpublish.push(t.elapsed());
        }
        let after = rss_kib();

        // Certificate volumes: key generation (P-256), CSR, IssueCertificate (a `ca`
        // issuer signing), the node's checks with a loopback TLS handshake, the files.
        let mut cert_first = Vec::new();
        let mut cert_targets = Vec::new();
        for i in 0..CERT_VOLUMES {
            let id = format!("csi-tls{i:04}");
            let target = target_under(dir.path(), &format!("tls{i:04}"));
            let mut req = Pub::new(&id, &target);
            req.lease = Some(CERT_LEASE);
            let t = Instant::now();
            d.node.node_publish_volume(req.build()).await.unwrap();
            cert_first.push(t.elapsed());
            cert_targets.push((id, target));
        }
        for (id, target) in &cert_targets {
            d.node.node_unpublish_volume(unpublish_req(id, target)).await.unwrap();
        }

        println!("csi-bench: real server on a Unix socket, fake broker on loopback, {VOLUMES} volumes, 2 worker threads");
        report("NodePublishVolume (new volume)", first);
        report("NodePublishVolume (republish, same)", again);
        report("NodePublishVolume (republish, rotate)", rotate);
        report("NodeUnpublishVolume", unpublish);
        report("NodePublishVolume (certificate)", cert_first);
        println!("  (certificate: key generated on the node, CSR signed by a ca issuer, loopback TLS check; target p99 <= 25 ms)");
        println!(
            "VmRSS (whole process: driver + fake broker + client): idle {:.1} MiB, {VOLUMES} volumes {:.1} MiB, after unpublish {:.1} MiB",
            idle as f64 / 1024.0,
            loaded as f64 / 1024.0,
            after as f64 / 1024.0
        );
        println!("broker calls: issue={} ack={} release={} certificates={}", broker.issues(), broker.acks(), broker.releases().len(), broker.state.lock().unwrap().certificates);
        d.stop().await;
        unmount_all_under(dir.path());
    });
}
