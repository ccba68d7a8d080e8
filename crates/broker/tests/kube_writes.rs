//! The broker's writes to the API server, against a scripted mock client:
//! the TLS bootstrap when another replica wins the create race, renewal and
//! sealing of its keys, the per-pod credential records, and the consumer list
//! applied under the broker's own field manager.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response};
use jiff::Timestamp;
use kube::client::Body;
use leasehold_broker::consumers::{ConsumerStore, KubeConsumerStore};
use leasehold_broker::tls::{TlsSettings, generate_ca, issue_serving_cert, key_field};
use leasehold_broker::{BrokerTls, Keyring, ObjectRef};
use leasehold_envelope::{
    DataKey, EncryptionContext, EnvelopeError, KeyEncryptionKey, KeyringSettings, LocalKey,
};
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

fn b64(s: impl AsRef<[u8]>) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn unb64(v: &Value) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap())
        .unwrap()
}

/// A local key that answers `KeyUnavailable` to its first `outages` calls (KMS down).
#[derive(Debug)]
struct FlakyKey {
    inner: LocalKey,
    outages: AtomicUsize,
}

impl FlakyKey {
    fn down(&self, operation: &'static str) -> Result<(), EnvelopeError> {
        if self
            .outages
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(EnvelopeError::KeyUnavailable {
                key_id: self.inner.key_id().to_owned(),
                operation,
                detail: "connection refused".into(),
            });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl KeyEncryptionKey for FlakyKey {
    fn key_id(&self) -> &str {
        self.inner.key_id()
    }
    async fn generate_data_key(
        &self,
        ctx: &EncryptionContext,
    ) -> Result<(DataKey, Vec<u8>), EnvelopeError> {
        self.down("generate_data_key")?;
        self.inner.generate_data_key(ctx).await
    }
    async fn decrypt_data_key(
        &self,
        key_id: &str,
        wrapped: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<DataKey, EnvelopeError> {
        self.down("decrypt")?;
        self.inner.decrypt_data_key(key_id, wrapped, ctx).await
    }
}

/// A keyring over the key `bytes`, unavailable for its first `outages` calls.
fn keyring(bytes: [u8; 32], outages: usize) -> Keyring {
    let key = FlakyKey {
        inner: LocalKey::from_bytes(bytes),
        outages: AtomicUsize::new(outages),
    };
    let settings = KeyringSettings {
        data_key_cache_capacity: 0,
        ..KeyringSettings::default()
    };
    Keyring::new(Arc::new(key), vec![], settings)
}

/// The opened private key `field` of a generated TLS Secret body; asserts it is
/// stored sealed and that no form of the plaintext appears in the body.
async fn sealed_key(
    keyring: &Keyring,
    settings: &TlsSettings,
    body: &Value,
    field: &str,
) -> String {
    let stored = unb64(&body["data"][field]);
    assert!(Keyring::is_sealed(&stored), "{field} is sealed");
    let plain = key_field(settings, field)
        .open(keyring, &stored)
        .await
        .unwrap();
    let pem = String::from_utf8(plain.to_vec()).unwrap();
    assert!(pem.contains("PRIVATE KEY"));
    let text = body.to_string();
    assert!(!text.contains(&b64(&pem)) && !text.contains("PRIVATE KEY"));
    assert_eq!(
        body["metadata"]["labels"]["leasehold.dev/sealed"],
        "broker-tls"
    );
    pem
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
    let keys = Arc::new(keyring([1; 32], 0));
    let seal = |field, pem: &str| {
        let (keys, settings, pem) = (keys.clone(), settings.clone(), pem.to_owned());
        async move {
            key_field(&settings, field)
                .seal(&keys, pem.as_bytes())
                .await
                .unwrap()
                .0
        }
    };
    let winner = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "broker-tls", "namespace": "leasehold-system", "resourceVersion": "7",
            "labels": {"leasehold.dev/sealed": "broker-tls"},
            "annotations": {
                "leasehold.dev/not-before": serving.not_before.to_string(),
                "leasehold.dev/not-after": serving.not_after.to_string()}},
        "data": {
            "ca.crt": b64(&ca.cert), "ca.key": b64(seal("ca.key", ca.key.expose_secret()).await),
            "tls.crt": b64(&serving.pem.cert),
            "tls.key": b64(seal("tls.key", serving.pem.key.expose_secret()).await)},
    });

    let (task_settings, task_keys) = (settings.clone(), keys.clone());
    let task =
        tokio::spawn(async move { BrokerTls::ensure(client, &task_settings, &task_keys).await });
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
    for key in ["ca.key", "tls.key"] {
        sealed_key(&keys, &settings, &created, key).await;
    }
    // Sealed under the primary key and fresh: read, not rewritten.
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
    let keys = keyring([2; 32], 0);
    let task_settings = settings.clone();
    let task = tokio::spawn(async move {
        BrokerTls::ensure(client, &task_settings, &keyring([2; 32], 0)).await
    });
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
    // The plaintext keys it was written with are sealed by the renewal.
    assert_eq!(
        sealed_key(&keys, &settings, &replaced, "ca.key").await,
        ca.key.expose_secret(),
        "same CA key"
    );
    assert_ne!(
        sealed_key(&keys, &settings, &replaced, "tls.key").await,
        old.pem.key.expose_secret(),
        "new serving key"
    );
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

/// A fresh generated Secret with plaintext keys, as written before sealing.
fn legacy_tls_secret(
    settings: &TlsSettings,
) -> (Value, leasehold_broker::CertPem, leasehold_broker::CertPem) {
    let now = Timestamp::now();
    let ca = generate_ca(now, settings.ca_validity).unwrap();
    let serving = issue_serving_cert(
        &ca.key,
        &settings.dns_names(),
        now,
        settings.serving_validity,
    )
    .unwrap();
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": settings.secret_name, "namespace": settings.namespace,
            "resourceVersion": "5",
            "annotations": {
                "leasehold.dev/not-before": serving.not_before.to_string(),
                "leasehold.dev/not-after": serving.not_after.to_string()}},
        "data": {
            "ca.crt": b64(&ca.cert), "ca.key": b64(ca.key.expose_secret()),
            "tls.crt": b64(&serving.pem.cert), "tls.key": b64(serving.pem.key.expose_secret())},
    });
    (secret, ca, serving.pem)
}

#[tokio::test]
async fn tls_bootstrap_seals_a_plaintext_secret_on_load() {
    let (client, mut handle) = client();
    let settings = TlsSettings::new("ns", "svc", "tls", "ca");
    let (legacy, ca, serving) = legacy_tls_secret(&settings);
    let keys = keyring([3; 32], 0);
    let task_settings = settings.clone();
    let task = tokio::spawn(async move {
        BrokerTls::ensure(client, &task_settings, &keyring([3; 32], 0)).await
    });
    let path = "/api/v1/namespaces/ns/secrets/tls";
    expect(&mut handle, "GET", path, 200, legacy.clone()).await;
    let (_, sealed) = expect(&mut handle, "PUT", path, 200, legacy.clone()).await;
    assert_eq!(
        sealed["metadata"]["resourceVersion"], "5",
        "optimistic replace"
    );
    assert_eq!(
        sealed["data"]["tls.crt"], legacy["data"]["tls.crt"],
        "the certificate is kept"
    );
    assert_eq!(
        sealed["metadata"]["annotations"],
        legacy["metadata"]["annotations"]
    );
    assert_eq!(
        sealed_key(&keys, &settings, &sealed, "ca.key").await,
        ca.key.expose_secret()
    );
    assert_eq!(
        sealed_key(&keys, &settings, &sealed, "tls.key").await,
        serving.key.expose_secret()
    );
    expect(
        &mut handle,
        "PATCH",
        "/api/v1/namespaces/ns/configmaps/ca",
        200,
        json!({}),
    )
    .await;
    let tls = task.await.unwrap().unwrap();
    assert_eq!(tls.ca_pem(), Some(ca.cert.as_str()));
}

#[tokio::test]
async fn tls_bootstrap_with_an_unencrypted_keyring_stores_plaintext_keys() {
    let (client, mut handle) = client();
    let settings = TlsSettings::new("ns", "svc", "tls", "ca");
    let task_settings = settings.clone();
    let task = tokio::spawn(async move {
        BrokerTls::ensure(client, &task_settings, &Keyring::unencrypted()).await
    });
    let path = "/api/v1/namespaces/ns/secrets/tls";
    expect(&mut handle, "GET", path, 404, status(404, "NotFound")).await;
    let (_, created) = expect(
        &mut handle,
        "POST",
        "/api/v1/namespaces/ns/secrets",
        201,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tls"}}),
    )
    .await;
    for key in ["ca.key", "tls.key"] {
        let stored = String::from_utf8(unb64(&created["data"][key])).unwrap();
        assert!(
            stored.contains("PRIVATE KEY"),
            "{key}: the explicit opt-out"
        );
    }
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

#[tokio::test(start_paused = true)]
async fn tls_bootstrap_waits_for_an_unavailable_key() {
    let (client, mut handle) = client();
    let settings = TlsSettings::new("ns", "svc", "tls", "ca");
    // KMS is down for the first two calls: two failed attempts, then it works.
    let task =
        tokio::spawn(
            async move { BrokerTls::ensure(client, &settings, &keyring([4; 32], 2)).await },
        );
    let path = "/api/v1/namespaces/ns/secrets/tls";
    for _ in 0..3 {
        expect(&mut handle, "GET", path, 404, status(404, "NotFound")).await;
    }
    let (_, created) = expect(
        &mut handle,
        "POST",
        "/api/v1/namespaces/ns/secrets",
        201,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tls"}}),
    )
    .await;
    assert!(Keyring::is_sealed(&unb64(&created["data"]["ca.key"])));
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
async fn tls_bootstrap_fails_clearly_on_keys_that_do_not_open() {
    let (client, mut handle) = client();
    let settings = TlsSettings::new("ns", "svc", "tls", "ca");
    let (mut secret, _, _) = legacy_tls_secret(&settings);
    // Each key sealed for the other field: neither opens where it is.
    let keys = keyring([5; 32], 0);
    for (field, sealed_for) in [("ca.key", "tls.key"), ("tls.key", "ca.key")] {
        let plain = unb64(&secret["data"][field]);
        let sealed = key_field(&settings, sealed_for)
            .seal(&keys, &plain)
            .await
            .unwrap();
        secret["data"][field] = b64(sealed.0).into();
    }
    let task =
        tokio::spawn(
            async move { BrokerTls::ensure(client, &settings, &keyring([5; 32], 0)).await },
        );
    expect(
        &mut handle,
        "GET",
        "/api/v1/namespaces/ns/secrets/tls",
        200,
        secret,
    )
    .await;
    let error = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("a permanent key error is not retried")
        .unwrap()
        .unwrap_err();
    assert!(!error.is_transient());
    let message = error.to_string();
    assert!(message.starts_with("Tampered: "), "{message}");
    assert!(!message.contains("PRIVATE KEY"));
}

#[tokio::test]
async fn pod_credential_records_are_stored_sealed_and_read_back() {
    use leasehold_broker::per_pod::{PodCredentialMeta, PodCredentialRecord};
    use leasehold_broker::{KubePodCredentialStore, PodCredentialStore};

    let (client, mut handle) = client();
    let store = Arc::new(KubePodCredentialStore::new(
        client,
        Arc::new(keyring([6; 32], 0)),
    ));
    let mut lease = leasehold_api::SecretLease::new(
        "db",
        serde_json::from_value(json!({
            "policyRef": {"name": "p"},
            "postgres": {"host": "h", "database": "d", "adminSecretRef": {"name": "a"}}
        }))
        .unwrap(),
    );
    lease.metadata.namespace = Some("shop".into());
    lease.metadata.uid = Some("7f3c2a1b-0d9e".into());
    let now = Timestamp::now();
    let password = "pod-pass-Zq81";
    let record = PodCredentialRecord {
        meta: PodCredentialMeta {
            username: "lh_7f3c2a1b0d9e_puid1".into(),
            pod_namespace: "shop".into(),
            pod_name: "web-0".into(),
            pod_uid: "uid-1".into(),
            node: "node-a".into(),
            generation: 1,
            issued_at: now,
            expires_at: now,
            renew_at: now,
            verified: true,
        },
        password: secrecy::SecretString::from(password),
    };
    let path = "/api/v1/namespaces/shop/secrets/leasehold-pod-7f3c2a1b0d9e-uid-1";

    let (task_store, task_lease, task_record) = (store.clone(), lease.clone(), record.clone());
    let put = tokio::spawn(async move { task_store.put(&task_lease, &task_record).await });
    let (query, applied) = expect(&mut handle, "PATCH", path, 200, json!({})).await;
    assert!(query.contains("fieldManager=leasehold-broker"), "{query}");
    put.await.unwrap().unwrap();
    let text = applied.to_string();
    assert!(
        !text.contains(password) && !text.contains(&b64(password)),
        "{text}"
    );
    assert!(Keyring::is_sealed(&unb64(&applied["data"]["password"])));
    assert_eq!(
        applied["metadata"]["labels"]["leasehold.dev/sealed"],
        "pod-credential"
    );
    let meta: PodCredentialMeta =
        serde_json::from_slice(&unb64(&applied["data"]["record"])).unwrap();
    assert_eq!(meta, record.meta, "the record is plain");

    let stored = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": applied["metadata"].clone(),
        "data": applied["data"].clone(),
    });
    let (task_store, task_lease) = (store.clone(), lease.clone());
    let get = tokio::spawn(async move { task_store.get(&task_lease, "uid-1").await });
    expect(&mut handle, "GET", path, 200, stored).await;
    let back = get.await.unwrap().unwrap().unwrap();
    assert_eq!(back.password.expose_secret(), password);
    assert_eq!(back.meta, record.meta);
}
