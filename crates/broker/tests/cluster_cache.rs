//! [`CachedClusterView`] against a scripted API server (a `tower_test` mock): the
//! reflectors list and watch, a synced cache answers without GETs, and every answer
//! the cache cannot vouch for is read live, exactly once.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response};
use kube::client::Body;
use leasehold_broker::authz::{PodIdentity, authorize_pod_placement};
use leasehold_broker::cluster::pod_facts;
use leasehold_broker::{CachedClusterView, ClusterReadMetrics, ClusterView, PodExpectation};
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// What the scripted API server holds: lists by collection path, objects by path.
#[derive(Default)]
struct Objects {
    lists: HashMap<String, Vec<Value>>,
    live: HashMap<String, Value>,
}

/// GETs of single objects the API server answered, by path.
type Gets = Arc<Mutex<Vec<String>>>;

fn reply(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

/// Answers lists from `objects.lists`, keeps watches open, and answers GETs from
/// `objects.live` (404 otherwise), recording them.
fn serve(mut handle: Handle, objects: Objects) -> Gets {
    let gets: Gets = Arc::default();
    let recorded = gets.clone();
    tokio::spawn(async move {
        let mut open_watches = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let path = request.uri().path().to_owned();
            let query = request.uri().query().unwrap_or_default().to_owned();
            if query.contains("watch=true") {
                open_watches.push(send);
            } else if let Some(items) = objects.lists.get(&path) {
                send.send_response(reply(
                    200,
                    &json!({"kind": "List", "apiVersion": "v1",
                            "metadata": {"resourceVersion": "1"}, "items": items}),
                ));
            } else {
                recorded.lock().unwrap().push(path.clone());
                match objects.live.get(&path) {
                    Some(obj) => send.send_response(reply(200, obj)),
                    None => send.send_response(reply(
                        404,
                        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                "reason": "NotFound", "code": 404}),
                    )),
                }
            }
        }
    });
    gets
}

fn pod(name: &str, uid: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"namespace": "shop", "name": name, "uid": uid, "resourceVersion": "1"},
           "spec": {"serviceAccountName": "web", "nodeName": node, "containers": [],
                    "volumes": [{"name": "c", "csi": {"driver": "csi.leasehold.dev",
                                 "volumeAttributes": {"lease": "db"}}}]},
           "status": {"phase": "Running"}})
}

fn lease() -> Value {
    json!({"apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease",
           "metadata": {"namespace": "shop", "name": "db", "resourceVersion": "1"},
           "spec": {"policyRef": {"name": "open"},
                    "postgres": {"host": "db", "port": 5432, "database": "d",
                                 "adminSecretRef": {"name": "admin"}},
                    "delivery": {"csi": {"enabled": true}}},
           "status": {"currentVersion": 3, "progress": {"lastVersion": 3, "versions": [
               {"version": 3, "credentialId": "u", "state": "Current",
                "issuedAt": "2025-01-01T00:00:00Z"}]}}})
}

/// The cluster: shop/web-0 (uid-web) on node-a, lease shop/db at v3, policy
/// shop/open, namespace shop labelled team=web, versions Secret with v3.
fn cluster() -> Objects {
    let mut o = Objects::default();
    o.lists.insert(
        "/api/v1/pods".into(),
        vec![pod("web-0", "uid-web", "node-a")],
    );
    o.lists.insert(
        "/api/v1/namespaces".into(),
        vec![json!({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": "shop", "labels": {"team": "web"}}})],
    );
    o.lists.insert(
        "/apis/leasehold.dev/v1alpha1/secretleases".into(),
        vec![lease()],
    );
    o.lists.insert(
        "/apis/leasehold.dev/v1alpha1/rotationpolicies".into(),
        vec![
            json!({"apiVersion": "leasehold.dev/v1alpha1", "kind": "RotationPolicy",
                    "metadata": {"namespace": "shop", "name": "open"},
                    "spec": {"ttl": "1h", "access": {}}}),
        ],
    );
    o.lists.insert(
        "/api/v1/secrets".into(),
        vec![json!({"apiVersion": "v1", "kind": "Secret",
                    "metadata": {"namespace": "shop", "name": "db-leasehold-versions",
                                 "labels": {"leasehold.dev/sealed": "versions"}},
                    "data": {"v3": "c2VhbGVk"}})],
    );
    o
}

async fn start(objects: Objects) -> (CachedClusterView, Gets, ClusterReadMetrics) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let gets = serve(handle, objects);
    let metrics = ClusterReadMetrics::default();
    let view = CachedClusterView::start(
        kube::Client::new(service, "default"),
        &[],
        "leasehold-system",
        metrics.clone(),
    );
    tokio::time::timeout(std::time::Duration::from_secs(10), view.wait_synced())
        .await
        .expect("the caches sync");
    assert!(view.synced());
    (view, gets, metrics)
}

fn requested(uid: &str) -> PodIdentity {
    PodIdentity {
        namespace: "shop".into(),
        name: "web-0".into(),
        uid: uid.into(),
        service_account: "web".into(),
    }
}

#[tokio::test]
async fn a_synced_cache_answers_a_publish_without_gets() {
    let (view, gets, metrics) = start(cluster()).await;
    let expected = PodExpectation {
        uid: "uid-web",
        node: Some("node-a"),
    };
    let pod = view
        .pod_expecting("shop", "web-0", &expected)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pod.metadata.uid.as_deref(), Some("uid-web"));
    let labels = view.namespace_labels("shop").await.unwrap().unwrap();
    assert_eq!(labels["team"], "web");
    let lease = view
        .lease_at_version("shop", "db", 3)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.status.unwrap().current_version, Some(3));
    assert!(view.policy("shop", "open").await.unwrap().is_some());
    let versions = view
        .secret_with_field("shop", "db-leasehold-versions", "v3")
        .await
        .unwrap()
        .unwrap();
    assert!(versions.get("v3").is_some());
    assert!(
        gets.lock().unwrap().is_empty(),
        "{:?}",
        gets.lock().unwrap()
    );
    assert_eq!(metrics.api_reads("pod"), 0);
    assert_eq!(metrics.lookups("pod", "hit"), 1);
    assert_eq!(metrics.lookups("secret", "hit"), 1);
}

#[tokio::test]
async fn a_miss_is_one_live_get() {
    let mut objects = cluster();
    objects.live.insert(
        "/api/v1/namespaces/shop/pods/new-0".into(),
        pod("new-0", "uid-new", "node-a"),
    );
    let (view, gets, metrics) = start(objects).await;
    let pod = view
        .pod_expecting(
            "shop",
            "new-0",
            &PodExpectation {
                uid: "uid-new",
                node: Some("node-a"),
            },
        )
        .await
        .unwrap();
    assert!(pod.is_some(), "a pod created a moment ago is read live");
    assert_eq!(
        *gets.lock().unwrap(),
        ["/api/v1/namespaces/shop/pods/new-0"]
    );
    assert_eq!(metrics.lookups("pod", "miss"), 1);
    assert_eq!(metrics.api_reads("pod"), 1);
    // A lease behind the acknowledged version, a Secret without the field: live too.
    let _ = view.lease_at_version("shop", "db", 4).await.unwrap();
    let _ = view
        .secret_with_field("shop", "db-leasehold-versions", "v4")
        .await
        .unwrap();
    assert_eq!(metrics.lookups("secretlease", "stale"), 1);
    assert_eq!(metrics.lookups("secret", "stale"), 1);
    assert_eq!(gets.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn a_uid_mismatch_is_confirmed_live_before_a_refusal() {
    // The cache still has the old web-0; the API server has its replacement.
    let mut objects = cluster();
    objects.live.insert(
        "/api/v1/namespaces/shop/pods/web-0".into(),
        pod("web-0", "uid-web-2", "node-a"),
    );
    let (view, gets, metrics) = start(objects).await;
    let new = requested("uid-web-2");
    let pod = view
        .pod_expecting(
            "shop",
            "web-0",
            &PodExpectation {
                uid: &new.uid,
                node: Some("node-a"),
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(gets.lock().unwrap().len(), 1);
    assert_eq!(metrics.lookups("pod", "stale"), 1);
    authorize_pod_placement(&pod_facts(&pod), &new, "node-a").expect("the live pod matches");

    // A UID neither the cache nor the API server has: read live, then refused.
    let stranger = requested("uid-other");
    let pod = view
        .pod_expecting(
            "shop",
            "web-0",
            &PodExpectation {
                uid: &stranger.uid,
                node: Some("node-a"),
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(gets.lock().unwrap().len(), 2);
    assert!(authorize_pod_placement(&pod_facts(&pod), &stranger, "node-a").is_err());
}

#[tokio::test]
async fn a_node_mismatch_is_read_live() {
    let mut objects = cluster();
    objects.live.insert(
        "/api/v1/namespaces/shop/pods/web-0".into(),
        pod("web-0", "uid-web", "node-a"),
    );
    let (view, gets, metrics) = start(objects).await;
    let pod = view
        .pod_expecting(
            "shop",
            "web-0",
            &PodExpectation {
                uid: "uid-web",
                node: Some("node-b"),
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(gets.lock().unwrap().len(), 1);
    assert_eq!(metrics.lookups("pod", "stale"), 1);
    assert!(authorize_pod_placement(&pod_facts(&pod), &requested("uid-web"), "node-b").is_err());
}
