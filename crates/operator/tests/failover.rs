#![allow(clippy::unwrap_used)]
//! Two replicas against one (fake, in-process) API server: one leads, the other stands
//! by, and the standby takes over once the leader stops renewing; a leader whose
//! renewals stopped refuses to act as soon as its renew deadline passed, before anyone
//! else took over.

#[path = "common/fake_api.rs"]
mod fake_api;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use fake_api::{FakeApi, serve, serve_partitionable};
use kube::runtime::controller::Action;
use leasehold_api::SecretLease;
use leasehold_operator::leader::{FenceState, LeaderElector, LeadershipFence};
use leasehold_operator::lease_controller::{Context, error_policy, reconcile_lease};
use leasehold_operator::metrics::Metrics;
use leasehold_operator::{LeaderElectionConfig, OperatorError};
use leasehold_testkit::PostgresServer;
use secrecy::ExposeSecret;
use serde_json::{Value, json};

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

/// Timings for tests that also run reconciles against a real database: a renew deadline
/// long enough that a slow machine still renews in time while the leader works.
fn roomy_config(identity: &str) -> LeaderElectionConfig {
    let mut c = LeaderElectionConfig::new("leasehold-system", "leasehold-controller", identity);
    c.lease_duration = Duration::from_secs(5);
    c.renew_deadline = Duration::from_secs(3);
    c.retry_period = Duration::from_millis(200);
    c
}

fn client(url: &str) -> kube::Client {
    kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap()
}

/// A replica's SecretLease controller state, acting behind `fence`.
fn controller(url: &str, fence: LeadershipFence) -> Arc<Context> {
    let mut ctx = Context::new(client(url), Arc::new(Metrics::new()), None, 2);
    ctx.fence = fence;
    Arc::new(ctx)
}

async fn seed_lease(api: &FakeApi, pg: &PostgresServer, name: &str) {
    let b = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    api.insert("secrets", json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pg-admin", "namespace": "shop"},
        "data": {"username": b(pg.admin_user()), "password": b(pg.admin_password().expose_secret())}
    }))
    .await;
    api.insert(
        "rotationpolicies",
        json!({
            "apiVersion": "leasehold.dev/v1alpha1", "kind": "RotationPolicy",
            "metadata": {"name": "short", "namespace": "shop", "generation": 1},
            "spec": {"ttl": "3h", "revoke": {"gracePeriod": "0s", "maxWait": "10m"}}
        }),
    )
    .await;
    let uid = format!("{:032x}", rand::random::<u128>());
    let uid = format!(
        "{}-{}-{}-{}-{}",
        &uid[0..8],
        &uid[8..12],
        &uid[12..16],
        &uid[16..20],
        &uid[20..32]
    );
    api.insert("secretleases", json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease",
        "metadata": {"name": name, "namespace": "shop", "generation": 1,
                     "uid": uid, "finalizers": ["leasehold.dev/revoke"]},
        "spec": {"policyRef": {"name": "short"},
                 "postgres": {"host": pg.host(), "port": pg.port(), "database": pg.database(),
                              "adminSecretRef": {"name": "pg-admin"}, "tls": {"mode": "Disable"}}}
    }))
    .await;
}

async fn lease_object(api: &FakeApi, name: &str) -> Value {
    api.get("shop", "secretleases", name).await.unwrap()
}

async fn reconcile(api: &FakeApi, name: &str, ctx: &Arc<Context>) -> Result<Action, OperatorError> {
    let lease: SecretLease = serde_json::from_value(lease_object(api, name).await).unwrap();
    reconcile_lease(Arc::new(lease), ctx.clone()).await
}

/// A leader whose renewals stopped (paused, or its renewal loop starved) resumes its
/// reconciles after its renew deadline: the fence refuses them although nobody else has
/// written the Lease yet. The standby takes over once the lease expires and acts; the
/// old leader goes on refusing.
#[tokio::test]
async fn a_leader_whose_renewals_stopped_refuses_to_act_once_its_renew_deadline_passed() {
    let pg = PostgresServer::shared().await;
    let api = Arc::new(FakeApi::default());
    let name = "fenced";
    seed_lease(&api, pg, name).await;
    let url = serve(api.clone()).await;

    let a = LeaderElector::new(client(&url), roomy_config("pod-a"));
    a.acquire().await;
    let a_renewing = tokio::spawn({
        let a = a.clone();
        async move { a.hold().await }
    });
    let replica_a = controller(&url, a.fence());
    reconcile(&api, name, &replica_a)
        .await
        .expect("the leader acts");
    let status = lease_object(&api, name).await["status"].clone();
    assert_eq!(status["currentVersion"], 1, "{status}");

    // A's renewals stop (as in a paused process, its renewal loop has not run again).
    a_renewing.abort();
    let until = a.fence().leading_until().expect("A leads");
    tokio::time::sleep_until(until.monotonic).await;
    assert!(matches!(
        a.fence().state(leasehold_operator::leader::Clocks::now()),
        FenceState::Lapsed { .. }
    ));
    // Nobody else has written anything: A is still the Lease's holder.
    assert_eq!(holder(&api).await.as_deref(), Some("pod-a"));

    // A rotation is requested: A, resuming, would issue a new user. It refuses instead.
    {
        let mut objects = api.objects.lock().await;
        let lease = objects
            .get_mut(&("shop".to_string(), "secretleases".to_string()))
            .and_then(|m| m.get_mut(name))
            .unwrap();
        lease["metadata"]["annotations"] = json!({(leasehold_api::ROTATE_ANNOTATION): "now"});
    }
    let writes_before = api.writes.lock().await.len();
    let refused = reconcile(&api, name, &replica_a).await.unwrap_err();
    assert!(
        matches!(refused, OperatorError::NotLeader(_)),
        "refused as not the leader, not as a failure of the lease: {refused:?}"
    );
    assert!(refused.to_string().starts_with("NotLeader: "), "{refused}");
    // Not a failure of the lease: no failure counted, no error backoff.
    let refused_lease: SecretLease =
        serde_json::from_value(lease_object(&api, name).await).unwrap();
    let action = error_policy(Arc::new(refused_lease), &refused, replica_a.clone());
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
    assert!(
        !replica_a.metrics.encode().contains("not_leader"),
        "{}",
        replica_a.metrics.encode()
    );
    assert_eq!(
        api.writes.lock().await.len(),
        writes_before,
        "a replica past its renew deadline writes nothing"
    );
    assert_eq!(lease_object(&api, name).await["status"], status);

    // B takes over once A's lease expires, and acts on the request.
    let b = LeaderElector::new(client(&url), roomy_config("pod-b"));
    tokio::time::timeout(Duration::from_secs(30), b.acquire())
        .await
        .expect("the standby takes over the expired lease");
    assert_eq!(holder(&api).await.as_deref(), Some("pod-b"));
    let replica_b = controller(&url, b.fence());
    reconcile(&api, name, &replica_b)
        .await
        .expect("the new leader acts");
    let rotated = lease_object(&api, name).await["status"].clone();
    assert_eq!(rotated["currentVersion"], 2, "{rotated}");

    // The old leader still refuses (its leadership does not come back by itself).
    let again = reconcile(&api, name, &replica_a).await.unwrap_err();
    assert!(matches!(again, OperatorError::NotLeader(_)), "{again:?}");
    assert_eq!(lease_object(&api, name).await["status"], rotated);
}

/// A leader cut off from the API (its renewal requests get no answer) does not wait on
/// them: it steps down at its renew deadline, its fence closed, while it still holds the
/// Lease as far as the API server knows.
#[tokio::test]
async fn a_leader_whose_renewals_hang_steps_down_at_its_renew_deadline() {
    let api = Arc::new(FakeApi::default());
    let (url, partition) = serve_partitionable(api.clone()).await;
    let a = LeaderElector::new(client(&url), config("pod-a"));
    a.acquire().await;
    assert_eq!(a.fence().check(), Ok(()));
    let a_renewing = tokio::spawn({
        let a = a.clone();
        async move { a.hold().await }
    });
    partition.store(true, std::sync::atomic::Ordering::SeqCst);
    let lost = tokio::time::timeout(Duration::from_secs(10), a_renewing)
        .await
        .expect("a hung renewal does not keep the leader from stepping down")
        .unwrap();
    assert!(matches!(lost, OperatorError::LostLeadership(_)), "{lost:?}");
    assert!(a.fence().check().is_err());
    assert_eq!(holder(&api).await.as_deref(), Some("pod-a"));
}
