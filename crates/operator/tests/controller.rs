#![allow(clippy::unwrap_used)]
//! Smoke test of the whole controller wiring (`run_with_client`): watches, the cache,
//! both controllers, the metrics server. The API is a small in-process fake; the
//! database is a real PostgreSQL.

#[path = "common/fake_api.rs"]
mod fake_api;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use fake_api::FakeApi;
use kube::Client;
use leasehold_operator::{ControllerConfig, run_with_client};
use leasehold_testkit::PostgresServer;
use secrecy::ExposeSecret;
use serde_json::json;

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        code,
        out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string(),
    )
}

#[tokio::test]
async fn controller_issues_a_lease_and_serves_metrics() {
    let pg = PostgresServer::shared().await;
    let api = Arc::new(FakeApi::default());
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
            "spec": {"ttl": "3h"}
        }),
    )
    .await;
    api.insert("secretleases", json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease",
        "metadata": {"name": "smoke", "namespace": "shop", "generation": 1,
                     "uid": "5a0e0c1d-2b3c-4d5e-8f90-a1b2c3d4e5f6", "finalizers": ["leasehold.dev/revoke"]},
        "spec": {"policyRef": {"name": "short"},
                 "postgres": {"host": pg.host(), "port": pg.port(), "database": pg.database(),
                              "adminSecretRef": {"name": "pg-admin"}, "tls": {"mode": "Disable"}}}
    }))
    .await;
    let base = fake_api::serve(api.clone()).await;
    let client = Client::try_from(kube::Config::new(base.parse().unwrap())).unwrap();
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(run_with_client(
        client,
        ControllerConfig {
            namespaces: vec!["shop".into()],
            metrics_addr,
            ..ControllerConfig::default()
        },
        async move {
            let _ = stop_rx.await;
        },
    ));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        let lease = api.get("shop", "secretleases", "smoke").await.unwrap();
        if lease["status"]["currentVersion"] == 1
            && lease["status"]["progress"]["deliveredVersion"] == 1
        {
            break lease["status"].clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease was not issued: {lease}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let user = status["currentUsername"].as_str().unwrap();
    let admin = pg.admin_client().await;
    assert_eq!(
        admin
            .query("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&user])
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        api.get("shop", "secrets", "smoke-leasehold-versions")
            .await
            .is_some()
    );

    // The policy controller reports the policy valid.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let p = api.get("shop", "rotationpolicies", "short").await.unwrap();
        if p["status"]["conditions"][0]["reason"] == "Valid" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "policy status not written: {p}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let (code, _) = http_get(metrics_addr, "/healthz").await;
    assert_eq!(code, 200);
    let (code, _) = http_get(metrics_addr, "/readyz").await;
    assert_eq!(code, 200);
    let (code, text) = http_get(metrics_addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        text.contains("leasehold_reconciles_total{controller=\"secretlease\"}"),
        "{text}"
    );
    assert!(
        text.contains("leasehold_rotations_total{outcome=\"Succeeded\"} 1"),
        "{text}"
    );
    assert!(
        text.contains(
            "leasehold_credential_expiry_timestamp_seconds{namespace=\"shop\",lease=\"smoke\"}"
        ),
        "{text}"
    );

    // Settled: a few more seconds bring no further writes (no-op reconciles).
    let before = api.writes.lock().await.len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        api.writes.lock().await.len(),
        before,
        "writes while nothing changed"
    );

    stop_tx.send(()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(20), controller)
        .await
        .expect("shuts down")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
}
