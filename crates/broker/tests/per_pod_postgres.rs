//! Per-pod credentials on a real PostgreSQL: a user of the pod's own,
//! verified before it is handed out, the same credential on a repeated
//! Issue, dropped on Release (only by the node it was issued to).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use leasehold_broker::PodCredentialStore;
use leasehold_broker::authz::PodIdentity;
use leasehold_broker::per_pod::{PerPodRequest, per_pod_username};
use leasehold_broker::{
    BrokerLimits, EnginePerPodIssuer, MemoryCluster, MemoryPodCredentialStore, PerPodIssuer,
    SecretData,
};
use leasehold_engine::BackendRegistry;
use leasehold_testkit::PostgresServer;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

struct Fixture {
    pg: &'static PostgresServer,
    lease_uid: String,
    cluster: Arc<MemoryCluster>,
    lease: leasehold_api::SecretLease,
    policy: leasehold_api::RotationPolicy,
    store: Arc<MemoryPodCredentialStore>,
    issuer: EnginePerPodIssuer,
}

fn unique_uuid() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed) as u128;
    format!(
        "{:012x}-0000-4000-8000-{:012x}",
        (nanos + n) & 0xffff_ffff_ffff,
        n
    )
}

/// A per-pod lease on the shared PostgreSQL with `policy_spec` (merged over a
/// 2 h Dynamic policy).
async fn fixture_with(policy_spec: serde_json::Value) -> Fixture {
    let pg = PostgresServer::shared().await;
    let lease_uid = unique_uuid();
    let cluster = Arc::new(MemoryCluster::new());
    cluster.put_secret(
        "shop",
        "pg-admin",
        SecretData(BTreeMap::from([
            ("username".to_owned(), SecretString::from(pg.admin_user())),
            ("password".to_owned(), pg.admin_password().clone()),
        ])),
    );
    let lease: leasehold_api::SecretLease = serde_json::from_value(json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease",
        "metadata": {"namespace": "shop", "name": "db", "uid": lease_uid},
        "spec": {
            "policyRef": {"name": "p"},
            "perPod": true,
            "postgres": {"host": pg.host(), "port": pg.port(), "database": pg.database(),
                         "adminSecretRef": {"name": "pg-admin"}, "tls": {"mode": "Disable"}},
            "delivery": {"csi": {"enabled": true}},
        },
    }))
    .unwrap();
    let mut spec = json!({"ttl": "2h", "strategy": "Dynamic", "renewBefore": "40m"});
    for (k, v) in policy_spec.as_object().unwrap() {
        spec[k] = v.clone();
    }
    let policy: leasehold_api::RotationPolicy = serde_json::from_value(json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "RotationPolicy",
        "metadata": {"namespace": "shop", "name": "p"},
        "spec": spec,
    }))
    .unwrap();
    let store = Arc::new(MemoryPodCredentialStore::new());
    let issuer = EnginePerPodIssuer::new(cluster.clone(), store.clone(), BackendRegistry::new(2));
    Fixture {
        pg,
        lease_uid,
        cluster,
        lease,
        policy,
        store,
        issuer,
    }
}

async fn fixture() -> Fixture {
    fixture_with(json!({})).await
}

fn pod(name: &str) -> PodIdentity {
    PodIdentity {
        namespace: "shop".into(),
        name: name.into(),
        uid: unique_uuid(),
        service_account: "web".into(),
    }
}

/// Issues `p` its per-pod credential on node-a.
async fn issue_on_node_a(f: &Fixture, p: &PodIdentity) -> leasehold_broker::PodCredential {
    f.issuer
        .issue(&PerPodRequest {
            lease: &f.lease,
            policy: &f.policy,
            pod: p,
            node: "node-a",
        })
        .await
        .unwrap()
}

/// Whether a role exists (as the admin sees pg_roles).
async fn role_exists(pg: &PostgresServer, role: &str) -> bool {
    let rows = pg
        .admin_client()
        .await
        .query("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
        .await
        .unwrap();
    !rows.is_empty()
}

#[tokio::test]
async fn per_pod_user_is_issued_verified_reused_and_dropped() {
    let Fixture {
        pg,
        lease_uid,
        lease,
        policy,
        store,
        issuer,
        ..
    } = fixture().await;
    let pod = PodIdentity {
        namespace: "shop".into(),
        name: "web-0".into(),
        uid: "3c2f1e0a-5b6d-4e7f-8a9b-0c1d2e3f4a5b".into(),
        service_account: "web".into(),
    };
    let request = PerPodRequest {
        lease: &lease,
        policy: &policy,
        pod: &pod,
        node: "node-a",
    };

    let first = issuer.issue(&request).await.unwrap();
    let file =
        |c: &leasehold_broker::PodCredential, k: &str| c.files.0[k].expose_secret().to_owned();
    let user = file(&first, "username");
    assert_eq!(user, per_pod_username(&lease_uid, &pod.uid));
    assert_eq!(first.version, 1);
    assert!(file(&first, "uri").starts_with(&format!("postgres://{user}:")));
    let password = file(&first, "password");
    pg.connect_as(&user, &password)
        .await
        .unwrap()
        .simple_query("SELECT 1")
        .await
        .unwrap();

    // Again: the same credential, no new password.
    let again = issuer.issue(&request).await.unwrap();
    assert_eq!(
        (again.version, file(&again, "password")),
        (1, password.clone())
    );
    assert_eq!(
        issuer.latest_version(&lease, &pod.uid).await.unwrap(),
        Some(1)
    );

    // Only the node it was issued to may release it.
    let err = issuer
        .release(&lease, Some(&policy), &pod.uid, "node-b")
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    pg.connect_as(&user, &password).await.unwrap();

    issuer
        .release(&lease, Some(&policy), &pod.uid, "node-a")
        .await
        .unwrap();
    assert!(
        pg.connect_as(&user, &password).await.is_err(),
        "the user is dropped"
    );
    assert!(store.is_empty());
    issuer
        .release(&lease, Some(&policy), &pod.uid, "node-a")
        .await
        .unwrap();
    assert_eq!(issuer.latest_version(&lease, &pod.uid).await.unwrap(), None);
}

/// Release drops the user derived from the UIDs, never the one a (writable)
/// record Secret names; Issue hands out the derived name too.
#[tokio::test]
async fn tampered_record_cannot_make_the_admin_drop_another_role() {
    let f = fixture().await;
    let pod = pod("web-0");
    let request = PerPodRequest {
        lease: &f.lease,
        policy: &f.policy,
        pod: &pod,
        node: "node-a",
    };
    f.issuer.issue(&request).await.unwrap();
    let own = per_pod_username(&f.lease_uid, &pod.uid);

    let victim = leasehold_testkit::unique_name("victim");
    f.pg.admin_client()
        .await
        .batch_execute(&format!("CREATE ROLE {victim} LOGIN PASSWORD 'victim-pw'"))
        .await
        .unwrap();
    let mut record = f.store.get(&f.lease, &pod.uid).await.unwrap().unwrap();
    record.meta.username = victim.clone();
    f.store.put(&f.lease, &record).await.unwrap();

    let again = f.issuer.issue(&request).await.unwrap();
    assert_eq!(again.files.0["username"].expose_secret(), own);

    f.issuer
        .release(&f.lease, Some(&f.policy), &pod.uid, "node-a")
        .await
        .unwrap();
    assert!(role_exists(f.pg, &victim).await, "the named role survives");
    f.pg.connect_as(&victim, "victim-pw").await.unwrap();
    assert!(
        !role_exists(f.pg, &own).await,
        "the pod's own user is dropped"
    );
    drop(f.cluster);
}

/// An Issue whose login test fails (an error, or no answer within the
/// verify timeout) leaves neither a user nor a record behind.
#[tokio::test]
async fn issue_that_fails_verification_leaves_no_user() {
    for verify in [
        json!({"query": "SELECT 1/0"}),
        json!({"query": "SELECT pg_sleep(5)", "timeout": "1s"}),
    ] {
        let f = fixture_with(json!({ "verify": verify })).await;
        let pod = pod("web-0");
        let err = f
            .issuer
            .issue(&PerPodRequest {
                lease: &f.lease,
                policy: &f.policy,
                pod: &pod,
                node: "node-a",
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
        let user = per_pod_username(&f.lease_uid, &pod.uid);
        assert!(!role_exists(f.pg, &user).await, "{verify}: no user left");
        assert!(f.store.is_empty(), "{verify}: no record left");
    }
}

/// The sweep drops the per-pod users of pods that are gone (with a record, or
/// without one), and keeps the users of live pods.
#[tokio::test]
async fn sweep_drops_users_of_deleted_pods() {
    let f = fixture().await;
    let (live, gone) = (pod("web-0"), pod("web-1"));
    for p in [&live, &gone] {
        issue_on_node_a(&f, p).await;
    }
    f.cluster
        .put_pod(common::pod_object_with(&live, "node-a", &[]));
    // A user whose record was lost (deleted by hand, say).
    let unrecorded = per_pod_username(&f.lease_uid, &unique_uuid());
    f.pg.admin_client()
        .await
        .batch_execute(&format!("CREATE ROLE {unrecorded} LOGIN"))
        .await
        .unwrap();

    let report = f
        .issuer
        .sweep_lease(&f.lease, &f.policy, f.cluster.as_ref())
        .await
        .unwrap();
    let gone_user = per_pod_username(&f.lease_uid, &gone.uid);
    let mut revoked = report.revoked.clone();
    revoked.sort();
    let mut expected = vec![gone_user.clone(), unrecorded.clone()];
    expected.sort();
    assert_eq!(revoked, expected);
    assert!(report.failed.is_empty());
    assert!(!role_exists(f.pg, &gone_user).await);
    assert!(!role_exists(f.pg, &unrecorded).await);
    assert!(role_exists(f.pg, &per_pod_username(&f.lease_uid, &live.uid)).await);
    assert_eq!(f.store.len(), 1, "only the live pod's record stays");

    // Nothing left to do.
    let again = f
        .issuer
        .sweep_lease(&f.lease, &f.policy, f.cluster.as_ref())
        .await
        .unwrap();
    assert!(again.revoked.is_empty());
}

/// A lease's volume mounted by pods of another namespace (`billing`, say its
/// policy admits it): the sweep looks each pod up in its record's namespace,
/// so a live `billing` pod keeps its user (and can still log in) while the
/// user of a gone one, of either namespace, is dropped.
#[tokio::test]
async fn sweep_keeps_users_of_live_pods_in_other_namespaces() {
    let f = fixture().await;
    let in_ns = |namespace: &str, name: &str| PodIdentity {
        namespace: namespace.into(),
        ..pod(name)
    };
    let (billing_live, billing_gone) = (in_ns("billing", "job-0"), in_ns("billing", "job-1"));
    let (shop_live, shop_gone) = (pod("web-0"), pod("web-1"));
    let mut passwords = BTreeMap::new();
    for p in [&billing_live, &billing_gone, &shop_live, &shop_gone] {
        let credential = issue_on_node_a(&f, p).await;
        passwords.insert(
            p.uid.clone(),
            credential.files.0["password"].expose_secret().to_owned(),
        );
    }
    for p in [&billing_live, &shop_live] {
        f.cluster.put_pod(common::pod_object_with(p, "node-a", &[]));
    }

    let report = f
        .issuer
        .sweep_lease(&f.lease, &f.policy, f.cluster.as_ref())
        .await
        .unwrap();
    let user = |p: &PodIdentity| per_pod_username(&f.lease_uid, &p.uid);
    let mut revoked = report.revoked.clone();
    revoked.sort();
    let mut expected = vec![user(&billing_gone), user(&shop_gone)];
    expected.sort();
    assert_eq!(revoked, expected);
    for p in [&billing_live, &shop_live] {
        f.pg.connect_as(&user(p), &passwords[&p.uid])
            .await
            .unwrap()
            .simple_query("SELECT 1")
            .await
            .unwrap();
    }
    for p in [&billing_gone, &shop_gone] {
        assert!(!role_exists(f.pg, &user(p)).await, "{}", p.name);
    }
    assert_eq!(f.store.len(), 2, "the live pods' records stay");
}

/// Per-lease limits: concurrent issues and live per-pod users, refused with
/// RESOURCE_EXHAUSTED; a pod that has a user keeps getting it.
#[tokio::test]
async fn per_lease_limits_refuse_with_resource_exhausted() {
    let mut f =
        fixture_with(json!({"verify": {"query": "SELECT pg_sleep(1)", "timeout": "10s"}})).await;
    let limits = BrokerLimits {
        max_concurrent_issues_per_lease: 1,
        max_per_pod_users_per_lease: 2,
        ..BrokerLimits::default()
    };
    f.issuer = EnginePerPodIssuer::new(f.cluster.clone(), f.store.clone(), BackendRegistry::new(2))
        .with_limits(limits);
    let f = Arc::new(f);
    let pods: Vec<PodIdentity> = (0..3).map(|i| pod(&format!("web-{i}"))).collect();
    let issue = |f: Arc<Fixture>, p: PodIdentity| async move {
        f.issuer
            .issue(&PerPodRequest {
                lease: &f.lease,
                policy: &f.policy,
                pod: &p,
                node: "node-a",
            })
            .await
    };

    // One issue in flight (its record is written once it holds the slot).
    let first = tokio::spawn(issue(f.clone(), pods[0].clone()));
    for _ in 0..500 {
        if f.store.len() == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(f.store.len(), 1, "the first issue started");
    let err = issue(f.clone(), pods[1].clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    first.await.unwrap().unwrap();

    // Two live users at most.
    issue(f.clone(), pods[1].clone()).await.unwrap();
    let err = issue(f.clone(), pods[2].clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert!(!role_exists(f.pg, &per_pod_username(&f.lease_uid, &pods[2].uid)).await);
    // A pod that has one still gets it.
    issue(f.clone(), pods[0].clone()).await.unwrap();
    // Released: room again.
    f.issuer
        .release(&f.lease, Some(&f.policy), &pods[0].uid, "node-a")
        .await
        .unwrap();
    issue(f.clone(), pods[2].clone()).await.unwrap();
    for p in &pods[1..] {
        f.issuer
            .release(&f.lease, Some(&f.policy), &p.uid, "node-a")
            .await
            .unwrap();
    }
}

/// The memory store, answering `list` with what it held before yielding to other
/// tasks (as a real API server round trip would): concurrent issues all count
/// before any of them records its pod.
struct SlowListStore(Arc<MemoryPodCredentialStore>);

#[async_trait::async_trait]
impl PodCredentialStore for SlowListStore {
    async fn get(
        &self,
        lease: &leasehold_api::SecretLease,
        pod_uid: &str,
    ) -> Result<Option<leasehold_broker::per_pod::PodCredentialRecord>, leasehold_broker::BrokerError>
    {
        self.0.get(lease, pod_uid).await
    }
    async fn put(
        &self,
        lease: &leasehold_api::SecretLease,
        record: &leasehold_broker::per_pod::PodCredentialRecord,
    ) -> Result<(), leasehold_broker::BrokerError> {
        self.0.put(lease, record).await
    }
    async fn delete(
        &self,
        lease: &leasehold_api::SecretLease,
        pod_uid: &str,
    ) -> Result<(), leasehold_broker::BrokerError> {
        self.0.delete(lease, pod_uid).await
    }
    async fn list(
        &self,
        lease: &leasehold_api::SecretLease,
    ) -> Result<Vec<leasehold_broker::per_pod::PodCredentialMeta>, leasehold_broker::BrokerError>
    {
        let listed = self.0.list(lease).await;
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
        listed
    }
}

/// Concurrent first issues of more pods than the lease's cap: exactly the cap
/// get users, the rest RESOURCE_EXHAUSTED, and the database never holds more.
#[tokio::test]
async fn concurrent_issues_never_overshoot_the_per_lease_user_cap() {
    const CAP: usize = 2;
    let mut f = fixture().await;
    f.issuer = EnginePerPodIssuer::new(
        f.cluster.clone(),
        Arc::new(SlowListStore(f.store.clone())),
        BackendRegistry::new(2),
    )
    .with_limits(BrokerLimits {
        max_concurrent_issues_per_lease: 16,
        max_per_pod_users_per_lease: CAP,
        ..BrokerLimits::default()
    });
    let f = Arc::new(f);
    let pods: Vec<PodIdentity> = (0..6).map(|i| pod(&format!("web-{i}"))).collect();
    let tasks: Vec<_> = pods
        .iter()
        .cloned()
        .map(|p| {
            let f = f.clone();
            tokio::spawn(async move {
                let issued = f
                    .issuer
                    .issue(&PerPodRequest {
                        lease: &f.lease,
                        policy: &f.policy,
                        pod: &p,
                        node: "node-a",
                    })
                    .await;
                (p, issued)
            })
        })
        .collect();
    let mut issued = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            (p, Ok(_)) => issued.push(p),
            (_, Err(e)) => assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}"),
        }
    }
    assert_eq!(issued.len(), CAP, "as many as the cap, no more");
    let prefix = format!("{}%", leasehold_broker::sweep::per_pod_prefix(&f.lease_uid));
    let users: i64 =
        f.pg.admin_client()
            .await
            .query_one(
                "SELECT count(*) FROM pg_roles WHERE rolname LIKE $1",
                &[&prefix],
            )
            .await
            .unwrap()
            .get(0);
    assert_eq!(users, CAP as i64, "users in the database");
    assert_eq!(f.store.len(), CAP);
    for p in &issued {
        f.issuer
            .release(&f.lease, Some(&f.policy), &p.uid, "node-a")
            .await
            .unwrap();
    }
}

/// Through the real broker over TLS: a per-pod lease on the test PostgreSQL
/// whose login test is `verify`, with its admin Secret, in the broker's cluster.
async fn broker_with_pg_lease(verify: serde_json::Value) -> (common::Broker, String) {
    let pg = PostgresServer::shared().await;
    let lease_uid = unique_uuid();
    let b = common::start_full(
        |cluster| {
            Some(Arc::new(EnginePerPodIssuer::new(
                cluster,
                Arc::new(MemoryPodCredentialStore::new()),
                BackendRegistry::new(2),
            )) as Arc<dyn PerPodIssuer>)
        },
        64,
    )
    .await;
    b.cluster.put_secret(
        "shop",
        "pg-admin",
        SecretData(BTreeMap::from([
            ("username".to_owned(), SecretString::from(pg.admin_user())),
            ("password".to_owned(), pg.admin_password().clone()),
        ])),
    );
    b.cluster.put_policy(
        serde_json::from_value(json!({
            "apiVersion": "leasehold.dev/v1alpha1", "kind": "RotationPolicy",
            "metadata": {"namespace": "shop", "name": "pgfail"},
            "spec": {"ttl": "2h", "strategy": "Dynamic", "verify": verify},
        }))
        .unwrap(),
    );
    b.cluster.put_lease(
        serde_json::from_value(json!({
            "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease",
            "metadata": {"namespace": "shop", "name": "pgpod", "uid": lease_uid},
            "spec": {
                "policyRef": {"name": "pgfail"},
                "perPod": true,
                "postgres": {"host": pg.host(), "port": pg.port(), "database": pg.database(),
                             "adminSecretRef": {"name": "pg-admin"}, "tls": {"mode": "Disable"}},
                "delivery": {"csi": {"enabled": true}},
            },
        }))
        .unwrap(),
    );
    (b, lease_uid)
}

/// The real broker: an Issue whose verification fails leaves no user; one
/// the node gave up waiting for is dropped by the Release the driver sends.
#[tokio::test]
async fn failed_or_abandoned_issue_through_the_broker_leaves_no_user() {
    let pg = PostgresServer::shared().await;
    let web = common::web();

    let (mut b, lease_uid) = broker_with_pg_lease(json!({"query": "SELECT 1/0"})).await;
    let err = b
        .client
        .issue(common::with_token(
            common::issue_request(&web, "pgpod", &common::pod_token(&web)),
            Some(&common::node_token()),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(!role_exists(pg, &per_pod_username(&lease_uid, &web.uid)).await);

    // The driver's deadline passes while the login test runs.
    let (mut b, lease_uid) =
        broker_with_pg_lease(json!({"query": "SELECT pg_sleep(2)", "timeout": "10s"})).await;
    let user = per_pod_username(&lease_uid, &web.uid);
    let mut request = common::with_token(
        common::issue_request(&web, "pgpod", &common::pod_token(&web)),
        Some(&common::node_token()),
    );
    request.set_timeout(std::time::Duration::from_millis(700));
    let err = b.client.issue(request).await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{err:?}"
    );
    // What the driver does after a failed Issue.
    b.client
        .release(common::with_token(
            common::release_request(&web, "pgpod"),
            Some(&common::node_token()),
        ))
        .await
        .unwrap();
    assert!(!role_exists(pg, &user).await, "released");
}

/// The real broker and issuer: once the pod's access is withdrawn (the policy
/// now admits another service account), its next Acknowledge is refused with
/// PERMISSION_DENIED and its per-pod user is dropped before the refusal.
#[tokio::test]
async fn acknowledge_after_access_is_withdrawn_drops_the_pods_user() {
    let pg = PostgresServer::shared().await;
    let web = common::web();
    let (mut b, lease_uid) = broker_with_pg_lease(json!({})).await;
    let mut leases = common::LEASES.to_vec();
    leases.push("pgpod");
    b.cluster
        .put_pod(common::pod_object_with(&web, common::NODE, &leases));

    let issued = b
        .client
        .issue(common::with_token(
            common::issue_request(&web, "pgpod", &common::pod_token(&web)),
            Some(&common::node_token()),
        ))
        .await
        .unwrap()
        .into_inner();
    let file = |k: &str| String::from_utf8(issued.files[k].clone()).unwrap();
    let (user, password) = (file("username"), file("password"));
    assert_eq!(user, per_pod_username(&lease_uid, &web.uid));
    pg.connect_as(&user, &password).await.unwrap();
    let held = b
        .client
        .acknowledge(common::with_token(
            common::ack_request(&web, "pgpod", issued.version),
            Some(&common::node_token()),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(held.latest_version, issued.version);

    b.cluster.put_policy(
        serde_json::from_value(json!({
            "apiVersion": "leasehold.dev/v1alpha1", "kind": "RotationPolicy",
            "metadata": {"namespace": "shop", "name": "pgfail"},
            "spec": {"ttl": "2h", "strategy": "Dynamic",
                     "access": {"serviceAccounts": ["api"]}},
        }))
        .unwrap(),
    );
    let err = b
        .client
        .acknowledge(common::with_token(
            common::ack_request(&web, "pgpod", issued.version),
            Some(&common::node_token()),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(!role_exists(pg, &user).await, "the pod's user is dropped");
    assert!(pg.connect_as(&user, &password).await.is_err());
}
