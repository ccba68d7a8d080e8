#![allow(clippy::unwrap_used)]
//! Two replicas against one (fake, in-process) API server: one leads, the other stands
//! by, and the standby takes over once the leader stops renewing.

#[path = "common/fake_api.rs"]
mod fake_api;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_api::{FakeApi, serve};
use leasehold_operator::LeaderElectionConfig;
use leasehold_operator::leader::LeaderElector;

fn config(identity: &str) -> LeaderElectionConfig {
    let mut c = LeaderElectionConfig::new("leasehold-system", "leasehold-controller", identity);
    // Scaled down from 15 s / 10 s / 2 s so the test is quick; the logic is the same.
    c.lease_duration = Duration::from_millis(1500);
    c.renew_deadline = Duration::from_millis(1000);
    c.retry_period = Duration::from_millis(100);
    c
}

async fn holder(api: &FakeApi) -> Option<String> {
    api.get("leasehold-system", "leases", "leasehold-controller")
        .await
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(String::from))
}

#[tokio::test]
async fn the_standby_takes_over_after_the_leader_dies() {
    let api = Arc::new(FakeApi::default());
    let url = serve(api.clone()).await;
    let client = || kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();

    let a = Arc::new(LeaderElector::new(client(), config("pod-a")));
    a.acquire().await;
    assert_eq!(holder(&api).await.as_deref(), Some("pod-a"));
    let a_holding = tokio::spawn({
        let a = a.clone();
        async move { a.hold().await }
    });

    let b = Arc::new(LeaderElector::new(client(), config("pod-b")));
    let b_acquired = tokio::spawn({
        let b = b.clone();
        async move { b.acquire().await }
    });
    // While A renews, B stands by: several of B's retry periods pass without a change.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            holder(&api).await.as_deref(),
            Some("pod-a"),
            "B must not steal a renewed lease"
        );
        assert!(!b_acquired.is_finished());
    }

    // A dies without releasing.
    a_holding.abort();
    let died = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), b_acquired)
        .await
        .expect("the standby takes over")
        .unwrap();
    println!(
        "takeover {:?} after the leader stopped (lease duration 1.5 s)",
        died.elapsed()
    );
    assert_eq!(holder(&api).await.as_deref(), Some("pod-b"));
}

#[tokio::test]
async fn a_released_lease_is_taken_over_at_once() {
    let api = Arc::new(FakeApi::default());
    let url = serve(api.clone()).await;
    let client = || kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let a = LeaderElector::new(client(), config("pod-a"));
    a.acquire().await;
    a.release().await;
    let b = LeaderElector::new(client(), config("pod-b"));
    tokio::time::timeout(Duration::from_millis(500), b.acquire())
        .await
        .expect("no need to wait out the lease after a clean release");
    assert_eq!(holder(&api).await.as_deref(), Some("pod-b"));
}
