//! The issuer controller and the ConfigMap revocation ledger against a scripted API:
//! each request is checked (method, path, body) and answered in order.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use base64::Engine as _;
use common::{Step, not_found, scripted};
use http::Method;
use leasehold_api::{IssuerKind, IssuerRef};
use leasehold_certs::{RevocationEntry, RevocationLedger, RevocationReason};
use leasehold_operator::acme_issuer::AcmeState;
use leasehold_operator::crl::{ConfigMapLedger, KubeLedgerStore};
use leasehold_operator::issuers::{IssuerContext, IssuerObject, reconcile_object};
use leasehold_operator::metrics::Metrics;
use leasehold_operator::{IssuerNotReady, IssuerRegistry};
use serde_json::{Value, json};

const CM: &str = "/api/v1/namespaces/shop/configmaps/internal-crl";
const CMS: &str = "/api/v1/namespaces/shop/configmaps";
const STATUS: &str = "/apis/leasehold.dev/v1alpha1/namespaces/shop/issuers/internal/status";

fn status(code: u16, reason: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": reason, "reason": reason, "code": code}),
    )
}

/// The Issuer the API returns after a status patch.
fn patched_issuer(body: &Value) -> (u16, Value) {
    (
        200,
        json!({"apiVersion": "leasehold.dev/v1alpha1", "kind": "Issuer",
               "metadata": {"name": "internal", "namespace": "shop"},
               "spec": {}, "status": body["status"].clone()}),
    )
}

fn stored_ledger(resource_version: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "internal-crl", "namespace": "shop", "resourceVersion": resource_version},
        "data": {"revoked.json": "{\"entries\": [], \"lastCrlNumber\": 3}"}
    })
}

#[tokio::test]
async fn a_revocation_is_fenced_on_the_resource_version_and_retried_on_conflict() {
    let steps = vec![
        Step::new(Method::GET, CM, |_, _| not_found()),
        // Another writer created it first.
        Step::new(Method::POST, CMS, |body, _| {
            assert_eq!(body["metadata"]["name"], "internal-crl");
            status(409, "AlreadyExists")
        }),
        Step::new(Method::GET, CM, |_, _| (200, stored_ledger("5"))),
        Step::new(Method::PATCH, CM, |body, _| {
            assert_eq!(body["metadata"]["resourceVersion"], "5", "fenced: {body}");
            status(409, "Conflict")
        }),
        Step::new(Method::GET, CM, |_, _| (200, stored_ledger("6"))),
        Step::new(Method::PATCH, CM, |body, _| {
            assert_eq!(body["metadata"]["resourceVersion"], "6");
            assert_eq!(
                body["metadata"]["labels"]["leasehold.dev/issuer"],
                "internal"
            );
            let list: Value =
                serde_json::from_str(body["data"]["revoked.json"].as_str().unwrap()).unwrap();
            assert_eq!(list["entries"][0]["serial"], "0abc");
            assert_eq!(list["lastCrlNumber"], 4, "the next CRL number");
            assert!(
                body["data"]["ca.crl"]
                    .as_str()
                    .unwrap()
                    .starts_with("-----BEGIN X509 CRL-----")
            );
            assert!(body["metadata"]["annotations"]["leasehold.dev/crl-next-update"].is_string());
            (200, body.clone())
        }),
    ];
    let (client, seen) = scripted(steps, Value::Null);
    let ca = leasehold_certs::CertificateAuthority::self_signed(
        "ledger CA",
        leasehold_certs::KeyAlgorithm::EcdsaP256,
        time::OffsetDateTime::now_utc(),
        time::Duration::days(1),
    )
    .unwrap();
    let store = KubeLedgerStore::new(client, "shop", "internal", None);
    let ledger = ConfigMapLedger::new(Arc::new(store), Arc::new(ca));
    ledger
        .revoke(RevocationEntry {
            serial: "0ABC".into(),
            revoked_at: time::OffsetDateTime::now_utc(),
            reason: RevocationReason::Superseded,
            not_after: None,
        })
        .await
        .unwrap();
    assert!(ledger.crl_pem().is_some());
    let (seen, _) = seen.await.unwrap();
    assert_eq!(seen.requests.len(), 6);
}

/// ACME issuers' shared state with a solver on loopback (never reached here).
async fn acme_with_solver() -> Arc<AcmeState> {
    let solver = leasehold_acme::Http01Solver::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    Arc::new(AcmeState::new(Ok(Arc::new(solver))))
}

fn context(client: kube::Client, registry: IssuerRegistry) -> IssuerContext {
    IssuerContext {
        client,
        registry,
        controller_namespace: "leasehold".into(),
        metrics: Arc::new(Metrics::new()),
        recorder: None,
        acme: Arc::new(AcmeState::without_solver("not needed here")),
        // Generated CA keys are sealed, as in a real install (one key for the process,
        // as a controller that restarts keeps its key).
        keyring: keyring(),
    }
}

fn keyring() -> Arc<leasehold_envelope::Keyring> {
    static KEYRING: std::sync::OnceLock<Arc<leasehold_envelope::Keyring>> =
        std::sync::OnceLock::new();
    KEYRING
        .get_or_init(|| {
            Arc::new(leasehold_envelope::Keyring::new(
                Arc::new(leasehold_envelope::LocalKey::generate().unwrap()),
                vec![],
                leasehold_envelope::KeyringSettings::default(),
            ))
        })
        .clone()
}

fn issuer(spec: Value, status: Option<Value>) -> IssuerObject {
    let mut object = json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "Issuer",
        "metadata": {"name": "internal", "namespace": "shop", "generation": 2,
                     "uid": "7b0e0c1d-2b3c-4d5e-8f90-a1b2c3d4e5f6"},
        "spec": spec
    });
    if let Some(status) = status {
        object["status"] = status;
    }
    IssuerObject::from_issuer(&serde_json::from_value(object).unwrap()).unwrap()
}

fn lease_ref() -> IssuerRef {
    IssuerRef {
        name: "internal".into(),
        kind: IssuerKind::Issuer,
    }
}

fn decoded(secret: &Value, key: &str) -> String {
    let b64 = secret["data"][key].as_str().unwrap();
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn a_self_signed_issuer_generates_its_root_once() {
    const SECRET: &str = "/api/v1/namespaces/shop/secrets/internal-ca";
    let steps = vec![
        Step::new(Method::GET, SECRET, |_, _| not_found()),
        Step::new(
            Method::POST,
            "/api/v1/namespaces/shop/secrets",
            |body, state| {
                assert_eq!(body["type"], "kubernetes.io/tls");
                assert_eq!(body["metadata"]["name"], "internal-ca");
                // Kept when the issuer is deleted: a re-created issuer keeps the root.
                assert!(body["metadata"]["ownerReferences"].is_null(), "{body}");
                let mut keys: Vec<_> = body["data"].as_object().unwrap().keys().cloned().collect();
                keys.sort();
                assert_eq!(keys, ["ca.crt", "tls.crt", "tls.key"]);
                state["secret"] = body.clone();
                (201, body.clone())
            },
        ),
        Step::new(Method::PATCH, STATUS, |body, state| {
            state["status"] = body["status"].clone();
            patched_issuer(body)
        }),
    ];
    let (client, seen) = scripted(steps, json!({}));
    let registry = IssuerRegistry::without_crl_refresh();
    let ctx = context(client, registry.clone());
    reconcile_object(issuer(json!({"ca": {"selfSigned": true}}), None), &ctx)
        .await
        .unwrap();
    let (_, state) = seen.await.unwrap();
    let status = &state["status"];
    assert_eq!(status["type"], "CA");
    assert_eq!(status["observedGeneration"], 2);
    let ready = &status["conditions"][0];
    assert_eq!(
        (&ready["type"], &ready["status"]),
        (&json!("Ready"), &json!("True"))
    );
    assert_eq!(ready["observedGeneration"], 2);
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("shop/internal-ca")
    );
    // The key is stored sealed, and never reaches the status.
    let key = decoded(&state["secret"], "tls.key");
    assert!(key.starts_with("lhenc1:"), "sealed: {}", &key[..12]);
    assert!(!state["secret"].to_string().contains("PRIVATE KEY"));
    assert_eq!(
        state["secret"]["metadata"]["labels"]["leasehold.dev/sealed"],
        "issuer-ca"
    );
    assert!(!status.to_string().contains(&key[8..40]));

    let ca_pem = decoded(&state["secret"], "tls.crt");
    assert_eq!(registry.ca_pem("shop", &lease_ref()).unwrap(), ca_pem);
    assert_eq!(registry.resolve("shop", &lease_ref()).unwrap().kind(), "CA");

    // A restart: the Secret exists and is loaded, nothing is created, the unchanged
    // status is not written again.
    let secret = state["secret"].clone();
    let steps = vec![Step::new(Method::GET, SECRET, move |_, _| {
        (200, secret.clone())
    })];
    let (client, seen) = scripted(steps, json!({}));
    let registry = IssuerRegistry::without_crl_refresh();
    let ctx = context(client, registry.clone());
    reconcile_object(
        issuer(json!({"ca": {"selfSigned": true}}), Some(status.clone())),
        &ctx,
    )
    .await
    .unwrap();
    let (seen, _) = seen.await.unwrap();
    assert_eq!(seen.requests.len(), 1, "{:?}", seen.requests);
    assert_eq!(
        registry.ca_pem("shop", &lease_ref()).unwrap(),
        ca_pem,
        "same root"
    );
}

#[tokio::test]
async fn a_missing_ca_secret_is_not_ready_and_says_which() {
    let steps = vec![
        Step::new(Method::GET, "/api/v1/namespaces/shop/secrets/ca", |_, _| {
            not_found()
        }),
        Step::new(Method::PATCH, STATUS, |body, state| {
            *state = body["status"].clone();
            patched_issuer(body)
        }),
    ];
    let (client, seen) = scripted(steps, Value::Null);
    let registry = IssuerRegistry::without_crl_refresh();
    let ctx = context(client, registry.clone());
    reconcile_object(
        issuer(json!({"ca": {"secretRef": {"name": "ca"}}}), None),
        &ctx,
    )
    .await
    .unwrap();
    let (_, status) = seen.await.unwrap();
    let ready = &status["conditions"][0];
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "SecretNotFound");
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("Secret shop/ca")
    );
    let err = registry.resolve("shop", &lease_ref()).err().unwrap();
    assert!(matches!(err, IssuerNotReady::NotReady { .. }));
    assert!(err.to_string().contains("SecretNotFound"), "{err}");
}

fn acme_status_step() -> Step {
    Step::new(Method::PATCH, STATUS, |body, state| {
        *state = body["status"].clone();
        patched_issuer(body)
    })
}

#[tokio::test]
async fn an_acme_issuer_without_a_solver_says_so() {
    let (client, seen) = scripted(vec![acme_status_step()], Value::Null);
    let mut ctx = context(client, IssuerRegistry::without_crl_refresh());
    ctx.acme = Arc::new(AcmeState::without_solver("--acme-http01-addr is not set"));
    let spec = json!({"acme": {"directoryUrl": "https://acme.example/directory",
                               "accountKeySecretRef": {"name": "acct"}}});
    reconcile_object(issuer(spec, None), &ctx).await.unwrap();
    let (_, status) = seen.await.unwrap();
    assert_eq!(status["type"], "ACME");
    assert_eq!(status["conditions"][0]["reason"], "NoHttp01Solver");
}

#[tokio::test]
async fn an_acme_account_secret_without_an_account_is_never_overwritten() {
    let steps = vec![
        Step::new(
            Method::GET,
            "/api/v1/namespaces/shop/secrets/acct",
            |_, _| {
                (
                    200,
                    json!({"apiVersion": "v1", "kind": "Secret",
                       "metadata": {"name": "acct", "namespace": "shop"},
                       "data": {"tls.key": "c2VjcmV0"}}),
                )
            },
        ),
        acme_status_step(),
    ];
    let (client, seen) = scripted(steps, Value::Null);
    let registry = IssuerRegistry::without_crl_refresh();
    let mut ctx = context(client, registry.clone());
    ctx.acme = acme_with_solver().await;
    let spec = json!({"acme": {"directoryUrl": "https://acme.example/directory",
                               "accountKeySecretRef": {"name": "acct"}}});
    reconcile_object(issuer(spec, None), &ctx).await.unwrap();
    let (seen, status) = seen.await.unwrap();
    assert_eq!(seen.requests.len(), 2, "no write to the Secret");
    assert_eq!(status["conditions"][0]["reason"], "AccountSecretIncomplete");
    assert_eq!(
        registry
            .resolve("shop", &lease_ref())
            .err()
            .unwrap()
            .reason(),
        "AccountSecretIncomplete"
    );
}

#[tokio::test]
async fn an_unreachable_directory_creates_no_secret_and_backs_off() {
    // Nothing listens there: registration fails before any Secret is written.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let steps = vec![
        Step::new(
            Method::GET,
            "/api/v1/namespaces/shop/secrets/acct",
            |_, _| not_found(),
        ),
        acme_status_step(),
    ];
    let (client, seen) = scripted(steps, Value::Null);
    let mut ctx = context(client, IssuerRegistry::without_crl_refresh());
    ctx.acme = acme_with_solver().await;
    let spec = json!({"acme": {"directoryUrl": format!("https://127.0.0.1:{port}/dir"),
                               "accountKeySecretRef": {"name": "acct"}}});
    let action = reconcile_object(issuer(spec, None), &ctx).await.unwrap();
    let (seen, status) = seen.await.unwrap();
    assert_eq!(seen.requests.len(), 2, "no Secret created");
    assert_eq!(status["conditions"][0]["reason"], "DirectoryUnreachable");
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(
            leasehold_operator::acme_issuer::DIRECTORY_BACKOFF
        )
    );

    // Woken again at once (its own status write, say): the directory is not asked
    // again before the backoff is up, and nothing is written.
    let (client, seen) = scripted(Vec::new(), Value::Null);
    let registry = ctx.registry.clone();
    let acme = ctx.acme.clone();
    let mut ctx = context(client, registry);
    ctx.acme = acme;
    let spec = json!({"acme": {"directoryUrl": format!("https://127.0.0.1:{port}/dir"),
                               "accountKeySecretRef": {"name": "acct"}}});
    let action = reconcile_object(issuer(spec, Some(status.clone())), &ctx)
        .await
        .unwrap();
    let (seen, _) = seen.await.unwrap();
    // Requeued for what is left of the backoff, not the not-ready resync.
    assert!(seen.requests.is_empty(), "{:?}", seen.requests);
    assert_ne!(
        action,
        kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(120))
    );
}

#[tokio::test]
async fn a_cluster_issuer_secret_the_controller_may_not_read_is_not_ready() {
    const CLUSTER_STATUS: &str = "/apis/leasehold.dev/v1alpha1/clusterissuers/root/status";
    let steps = vec![
        Step::new(
            Method::GET,
            "/api/v1/namespaces/pki/secrets/root-ca",
            |_, _| status(403, "Forbidden"),
        ),
        Step::new(Method::PATCH, CLUSTER_STATUS, |body, state| {
            *state = body["status"].clone();
            (
                200,
                json!({"apiVersion": "leasehold.dev/v1alpha1", "kind": "ClusterIssuer",
                       "metadata": {"name": "root"}, "spec": {}, "status": body["status"].clone()}),
            )
        }),
    ];
    let (client, seen) = scripted(steps, Value::Null);
    let registry = IssuerRegistry::without_crl_refresh();
    let ctx = context(client, registry.clone());
    let object: leasehold_api::ClusterIssuer = serde_json::from_value(json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "ClusterIssuer",
        "metadata": {"name": "root", "generation": 1, "uid": "u"},
        "spec": {"ca": {"secretRef": {"name": "root-ca", "namespace": "pki"}}}
    }))
    .unwrap();
    reconcile_object(IssuerObject::from_cluster_issuer(&object), &ctx)
        .await
        .unwrap();
    let (_, status) = seen.await.unwrap();
    assert_eq!(status["conditions"][0]["reason"], "SecretForbidden");
    assert!(
        status["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("pki/root-ca")
    );
    let lease_ref = IssuerRef {
        name: "root".into(),
        kind: IssuerKind::ClusterIssuer,
    };
    // A lease in any namespace sees why.
    let err = registry.resolve("shop", &lease_ref).err().unwrap();
    assert_eq!(err.reason(), "SecretForbidden");
}
