#![allow(clippy::unwrap_used)]
//! Leader election rounds against a scripted API: create, stand by, take over, conflict.

mod common;

use common::{Step, not_found, scripted};
use http::Method;
use leasehold_operator::LeaderElectionConfig;
use leasehold_operator::leader::{LeaderElector, Round};
use serde_json::{Value, json};

const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/leasehold-system/leases/leasehold-controller";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/leasehold-system/leases";

fn config() -> LeaderElectionConfig {
    LeaderElectionConfig::new("leasehold-system", "leasehold-controller", "pod-a")
}

fn lease(holder: &str, renewed: jiff::Timestamp) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "leasehold-controller", "namespace": "leasehold-system", "resourceVersion": "7"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                 "renewTime": renewed.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(), "leaseTransitions": 2}
    })
}

#[tokio::test]
async fn first_replica_creates_the_lease() {
    let steps = vec![
        Step::new(Method::GET, LEASE, |_, _| not_found()),
        Step::new(Method::POST, LEASES, |body, _| {
            assert_eq!(body["spec"]["holderIdentity"], "pod-a");
            assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
            (201, body.clone())
        }),
    ];
    let (client, api) = scripted(steps, Value::Null);
    assert_eq!(
        LeaderElector::new(client, config())
            .try_once()
            .await
            .unwrap(),
        Round::Leading
    );
    api.await.unwrap();
}

#[tokio::test]
async fn a_valid_holder_is_left_alone_and_an_expired_one_is_replaced() {
    let now = jiff::Timestamp::now();
    let fresh = lease("pod-b", now);
    let expired = lease(
        "pod-b",
        now.checked_sub(jiff::SignedDuration::from_secs(60))
            .unwrap(),
    );
    let steps = vec![
        Step::new(Method::GET, LEASE, move |_, _| (200, fresh.clone())),
        Step::new(Method::GET, LEASE, move |_, _| (200, expired.clone())),
        Step::new(Method::PUT, LEASE, |body, _| {
            // Optimistic concurrency: the resourceVersion read is sent back.
            assert_eq!(body["metadata"]["resourceVersion"], "7");
            assert_eq!(body["spec"]["holderIdentity"], "pod-a");
            assert_eq!(body["spec"]["leaseTransitions"], 3);
            (200, body.clone())
        }),
    ];
    let (client, api) = scripted(steps, Value::Null);
    let elector = LeaderElector::new(client, config());
    assert_eq!(elector.try_once().await.unwrap(), Round::StandingBy);
    assert_eq!(elector.try_once().await.unwrap(), Round::Leading);
    let (seen, _) = api.await.unwrap();
    assert_eq!(seen.requests.len(), 3);
}

#[tokio::test]
async fn a_lost_race_is_a_conflict_not_leadership() {
    let mine = lease("pod-a", jiff::Timestamp::now());
    let steps = vec![
        Step::new(Method::GET, LEASE, move |_, _| (200, mine.clone())),
        Step::new(Method::PUT, LEASE, |_, _| {
            (
                409,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409}),
            )
        }),
    ];
    let (client, api) = scripted(steps, Value::Null);
    assert_eq!(
        LeaderElector::new(client, config())
            .try_once()
            .await
            .unwrap(),
        Round::Conflict
    );
    api.await.unwrap();
}
