//! The broker's writes to the API server, against a scripted mock client:
//! the TLS bootstrap when another replica wins the create race, and the
//! consumer list applied under the broker's own field manager.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use http::{Request, Response};
use jiff::Timestamp;
use kube::client::Body;
use leasehold_broker::consumers::{ConsumerStore, KubeConsumerStore};
use leasehold_broker::tls::{TlsSettings, generate_ca, issue_serving_cert};
use leasehold_broker::{BrokerTls, ObjectRef};
use secrecy::ExposeSecret;
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn client() -> (kube::Client, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, "default"), handle)
}

/// The next request: method, path and query, JSON body; answered with `code` and `reply`.
async fn expect(
    handle: &mut Handle,
    method: &str,
    path: &str,
    code: u16,
    reply: Value,
) -> (String, Value) {
    let (request, send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
        .await
        .unwrap_or_else(|_| panic!("no {method} {path}"))
        .unwrap();
    assert_eq!(request.method().as_str(), method);
    assert_eq!(request.uri().path(), path);
    let query = request.uri().query().unwrap_or_default().to_owned();
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    send.send_response(
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&reply).unwrap()))
            .unwrap(),
    );
    (query, body)
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
           "message": reason, "reason": reason, "code": code})
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test]
async fn tls_bootstrap_loses_the_create_race_and_uses_the_winners_secret() {
    let (client, mut handle) = client();
    let settings = TlsSettings::new(
        "leasehold-system",
        "leasehold-broker",
        "broker-tls",
        "broker-ca",
    );
    // What the other replica stored.
    let now = Timestamp::now();
    let ca = generate_ca(now, settings.ca_validity).unwrap();
    let serving = issue_serving_cert(
        &ca.key,
        &settings.dns_names(),
        now,
        settings.serving_validity,
    )
    .unwrap();
    let winner = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "broker-tls", "namespace": "leasehold-system", "resourceVersion": "7",
            "annotations": {
                "leasehold.dev/not-before": serving.not_before.to_string(),
                "leasehold.dev/not-after": serving.not_after.to_string()}},
        "data": {
            "ca.crt": b64(&ca.cert), "ca.key": b64(ca.key.expose_secret()),
            "tls.crt": b64(&serving.pem.cert), "tls.key": b64(serving.pem.key.expose_secret())},
    });

    let task = tokio::spawn(async move { BrokerTls::ensure(client, &settings).await });
    let secret_path = "/api/v1/namespaces/leasehold-system/secrets/broker-tls";
    expect(
        &mut handle,
        "GET",
        secret_path,
        404,
        status(404, "NotFound"),
    )
    .await;
    let (_, created) = expect(
        &mut handle,
        "POST",
        "/api/v1/namespaces/leasehold-system/secrets",
        409,
        status(409, "AlreadyExists"),
    )
    .await;
    for key in ["ca.crt", "ca.key", "tls.crt", "tls.key"] {
        assert!(
            created["data"][key].is_string(),
            "{key} in the created Secret"
        );
    }
    expect(&mut handle, "GET", secret_path, 200, winner.clone()).await;
    let (query, applied) = expect(
        &mut handle,
        "PATCH",
        "/api/v1/namespaces/leasehold-system/configmaps/broker-ca",
        200,
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "broker-ca"}}),
    )
    .await;
    assert!(
        query.contains("fieldManager=leasehold-broker") && query.contains("force=true"),
        "{query}"
    );
    assert_eq!(applied["data"]["ca.crt"], ca.cert.as_str());
    let tls = task.await.unwrap().unwrap();
    assert_eq!(
        tls.ca_pem(),
        Some(ca.cert.as_str()),
        "the winner's CA is used"
    );
}

#[tokio::test]
async fn tls_bootstrap_renews_a_stale_serving_certificate() {
    let (client, mut handle) = client();
    let settings = TlsSettings::new("ns", "svc", "tls", "ca");
    let long_ago = Timestamp::now() - jiff::SignedDuration::from_hours(24 * 80);
    let ca = generate_ca(long_ago, settings.ca_validity).unwrap();
    let old = issue_serving_cert(
        &ca.key,
        &settings.dns_names(),
        long_ago,
        settings.serving_validity,
    )
    .unwrap();
    let stored = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "tls", "namespace": "ns", "resourceVersion": "42",
            "annotations": {
                "leasehold.dev/not-before": old.not_before.to_string(),
                "leasehold.dev/not-after": old.not_after.to_string()}},
        "data": {
            "ca.crt": b64(&ca.cert), "ca.key": b64(ca.key.expose_secret()),
            "tls.crt": b64(&old.pem.cert), "tls.key": b64(old.pem.key.expose_secret())},
    });
    let task = tokio::spawn(async move { BrokerTls::ensure(client, &settings).await });
    expect(
        &mut handle,
        "GET",
        "/api/v1/namespaces/ns/secrets/tls",
        200,
        stored.clone(),
    )
    .await;
    let (_, replaced) = expect(
        &mut handle,
        "PUT",
        "/api/v1/namespaces/ns/secrets/tls",
        200,
        stored,
    )
    .await;
    assert_eq!(
        replaced["metadata"]["resourceVersion"], "42",
        "optimistic replace"
    );
    assert_eq!(replaced["data"]["ca.crt"], b64(&ca.cert), "same CA");
    assert_ne!(
        replaced["data"]["tls.crt"],
        b64(&old.pem.cert),
        "new serving certificate"
    );
    let not_after: Timestamp = replaced["metadata"]["annotations"]["leasehold.dev/not-after"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(not_after > Timestamp::now() + jiff::SignedDuration::from_hours(24 * 80));
    expect(
        &mut handle,
        "PATCH",
        "/api/v1/namespaces/ns/configmaps/ca",
        200,
        json!({}),
    )
    .await;
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn consumers_are_applied_on_the_status_under_the_brokers_field_manager() {
    let (client, mut handle) = client();
    let store = KubeConsumerStore::new(client);
    let consumers = vec![leasehold_api::ConsumerStatus {
        kind: "Pod".into(),
        namespace: "shop".into(),
        name: "web-0".into(),
        version: Some(3),
        acknowledged_at: None,
    }];
    let lease = ObjectRef::new("shop", "db");
    let task = tokio::spawn(async move { store.apply(&lease, &consumers).await });
    let (query, body) = expect(
        &mut handle,
        "PATCH",
        "/apis/leasehold.dev/v1alpha1/namespaces/shop/secretleases/db/status",
        200,
        json!({"apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease",
               "metadata": {"name": "db", "namespace": "shop"},
               "spec": {"policyRef": {"name": "p"}}}),
    )
    .await;
    assert!(query.contains("fieldManager=leasehold-broker"), "{query}");
    assert_eq!(body["status"]["consumers"][0]["name"], "web-0");
    assert_eq!(body["status"]["consumers"][0]["version"], 3);
    assert_eq!(
        body["status"].as_object().unwrap().len(),
        1,
        "only consumers"
    );
    assert!(body.get("spec").is_none());
    assert!(task.await.unwrap().unwrap());
}
