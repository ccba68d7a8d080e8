//! ACME issuers as the controller loads them, against a real Pebble that validates
//! HTTP-01 against the controller's solver on loopback. The account Secret lives in an
//! in-memory store whose writes can be made to fail.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use leasehold_acme::{Http01Solver, PollPolicy};
use leasehold_api::{
    AcmeIssuer as AcmeSpec, ExternalAccountBinding, IssuerKind, IssuerRef, IssuerSecretRef,
};
use leasehold_certs::issuer::MemoryJournal;
use leasehold_certs::{CertificateRequest, IssueOrder, KeyAlgorithm, csr_for, generate_key};
use leasehold_operator::acme_issuer::{
    ACCOUNT_KEY, AcmePlan, AcmeState, MemorySecretStore, SecretName, account_url_of,
    load_acme_issuer, plan_acme,
};
use leasehold_operator::{IssuerKey, IssuerRegistry, OperatorError};
use leasehold_testkit::{PebbleOptions, PebbleServer};

struct Fixture {
    pebble: PebbleServer,
    solver: Arc<Http01Solver>,
}

async fn fixture(options: PebbleOptions) -> Fixture {
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let solver = Http01Solver::bind(addr).await.unwrap();
    let pebble = PebbleServer::start(PebbleOptions {
        http_port: solver.local_addr().port(),
        ..options
    })
    .await;
    Fixture {
        pebble,
        solver: Arc::new(solver),
    }
}

fn key() -> IssuerKey {
    IssuerKey::Namespaced {
        namespace: "shop".into(),
        name: "pebble".into(),
    }
}

fn spec(fx: &Fixture, eab: Option<&str>) -> AcmeSpec {
    AcmeSpec {
        directory_url: fx.pebble.directory_url(),
        email: Some("ops@leasehold.test".into()),
        account_key_secret_ref: IssuerSecretRef {
            name: "pebble-account".into(),
            namespace: None,
        },
        external_account_binding: eab.map(|kid| ExternalAccountBinding {
            key_id: kid.into(),
            key_secret_ref: IssuerSecretRef {
                name: "pebble-eab".into(),
                namespace: None,
            },
        }),
        http01: None,
        ca_bundle: Some(fx.pebble.ca_pem().to_owned()),
        extra_trust_anchors: None,
    }
}

fn state(fx: &Fixture) -> AcmeState {
    let mut state = AcmeState::new(Ok(fx.solver.clone()));
    state.poll = PollPolicy {
        initial_delay: std::time::Duration::from_millis(100),
        ..PollPolicy::default()
    };
    state
}

fn registrations(fx: &Fixture) -> usize {
    fx.pebble.log_contents().matches("POST /sign-me-up").count()
}

fn account_secret_name() -> SecretName {
    SecretName {
        namespace: "shop".into(),
        name: "pebble-account".into(),
    }
}

fn stored_json(store: &MemorySecretStore) -> String {
    let secret = store
        .secret(&account_secret_name())
        .expect("account Secret");
    let data = secret.data.unwrap();
    String::from_utf8(data[ACCOUNT_KEY].0.clone()).unwrap()
}

#[tokio::test]
async fn an_account_is_registered_once_kept_and_issues_through_the_registry() {
    if !PebbleServer::available_for(
        "an_account_is_registered_once_kept_and_issues_through_the_registry",
    ) {
        return;
    }
    let fx = fixture(PebbleOptions::default()).await;
    let plan: AcmePlan = plan_acme(&key(), &spec(&fx, None), "leasehold").unwrap();
    let store = MemorySecretStore::default();
    let registry = IssuerRegistry::without_crl_refresh();
    let state = state(&fx);

    // The account is registered, but its Secret cannot be written: not used, kept.
    store.failures_to_inject.store(1, Ordering::SeqCst);
    let failed = load_acme_issuer(&key(), &plan, &store, &state, &registry).await;
    assert!(matches!(failed, Err(OperatorError::Store(_))), "{failed:?}");
    assert!(store.secret(&account_secret_name()).is_none());
    let registered = state
        .pending
        .pending_account_url(&account_secret_name())
        .expect("the registered account waits to be written");
    assert_eq!(registrations(&fx), 1);
    assert!(
        registry.resolve_key(&key()).is_err(),
        "not used before kept"
    );

    // The next attempt writes that same account instead of registering another.
    let ready = load_acme_issuer(&key(), &plan, &store, &state, &registry)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", fx.pebble.log_contents()));
    let message = ready.result.clone().unwrap();
    assert!(message.contains(&registered), "{message}");
    assert!(message.contains(&fx.pebble.directory_url()), "{message}");
    assert_eq!(registrations(&fx), 1);
    assert_eq!(store.creates.load(Ordering::SeqCst), 1);
    let json = stored_json(&store);
    assert_eq!(
        account_url_of(json.as_bytes()).as_deref(),
        Some(&*registered)
    );
    assert!(!state.pending.is_pending(&account_secret_name()));

    // A re-check (resync, Secret event) keeps the issuer in use: no new registration.
    let mut changes = registry.changes();
    changes.mark_unchanged();
    let again = load_acme_issuer(&key(), &plan, &store, &state, &registry)
        .await
        .unwrap();
    assert_eq!(again.result, ready.result);
    assert!(
        !changes.has_changed().unwrap(),
        "the registry entry is kept"
    );

    // A restarted controller (fresh state and registry) loads the kept account.
    let restarted = self::state(&fx);
    let restarted_registry = IssuerRegistry::without_crl_refresh();
    let again = load_acme_issuer(&key(), &plan, &store, &restarted, &restarted_registry)
        .await
        .unwrap();
    assert_eq!(again.result, ready.result);
    assert!(restarted_registry.resolve_key(&key()).is_ok());
    assert_eq!(registrations(&fx), 1);
    assert_eq!(store.creates.load(Ordering::SeqCst), 1);

    // The key never shows in the status message or Debug output.
    let key_pkcs8: serde_json::Value = serde_json::from_str(&json).unwrap();
    let key_pkcs8 = key_pkcs8["key_pkcs8"].as_str().unwrap().to_owned();
    assert!(key_pkcs8.len() > 20);
    for text in [
        message.clone(),
        format!("{ready:?}"),
        format!("{state:?}"),
        format!("{registry:?}"),
    ] {
        assert!(!text.contains(&key_pkcs8), "account key leaked: {text}");
    }

    // A lease resolves the issuer and gets a certificate, validated over HTTP-01 by
    // Pebble against the controller's solver.
    let issuer = registry
        .resolve(
            "shop",
            &IssuerRef {
                name: "pebble".into(),
                kind: IssuerKind::Issuer,
            },
        )
        .unwrap();
    assert_eq!(issuer.kind(), "ACME");
    let mut request = CertificateRequest::server(
        "app.shop.test",
        &["app.shop.test"],
        time::Duration::days(90),
    );
    {
        use leasehold_certs::Usage;
        request.usages = vec![
            Usage::ServerAuth,
            Usage::ClientAuth,
            Usage::DigitalSignature,
            Usage::KeyEncipherment,
        ];
    }
    let key = generate_key(KeyAlgorithm::EcdsaP256).unwrap();
    let csr = csr_for(&key, &request).unwrap();
    let journal = MemoryJournal::default();
    let issued = issuer
        .issue(IssueOrder {
            request: &request,
            csr_pem: &csr,
            serial: "unused",
            journal: &journal,
        })
        .await
        .unwrap_or_else(|e| panic!("issue: {e}\n{}", fx.pebble.log_contents()));
    let anchor = leasehold_certs::first_certificate_der(&issued.ca_pem).unwrap();
    let leaf = leasehold_certs::first_certificate_der(&issued.leaf_pem).unwrap();
    leasehold_certs::verify::verify_leaf(
        &anchor,
        &leaf,
        &request,
        Some(&key),
        Some(&csr),
        time::OffsetDateTime::now_utc(),
    )
    .await
    .unwrap_or_else(|e| panic!("the issued certificate verifies: {e}"));
    let log = fx.pebble.log_contents();
    let fetched = format!(
        "Attempting to validate w/ HTTP: http://app.shop.test:{}/.well-known/acme-challenge/",
        fx.solver.local_addr().port()
    );
    assert!(log.contains(&fetched), "HTTP-01 against the solver:\n{log}");
    assert!(fx.solver.is_empty(), "tokens withdrawn");
}

#[tokio::test]
async fn external_account_binding_is_read_from_its_secret() {
    if !PebbleServer::available_for("external_account_binding_is_read_from_its_secret") {
        return;
    }
    // base64url of a 32-byte HMAC key.
    let hmac = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    let fx = fixture(PebbleOptions {
        eab_keys: vec![("kid-1".into(), hmac.into())],
        ..PebbleOptions::default()
    })
    .await;
    let store = MemorySecretStore::default();
    let registry = IssuerRegistry::without_crl_refresh();
    let state = state(&fx);

    // Without binding the CA says no, and says why.
    let plan = plan_acme(&key(), &spec(&fx, None), "leasehold").unwrap();
    let refused = load_acme_issuer(&key(), &plan, &store, &state, &registry)
        .await
        .unwrap();
    let why = refused.result.unwrap_err();
    assert_eq!(why.reason, "AccountRegistrationFailed");
    assert!(
        why.message.contains("externalAccountRequired"),
        "{}",
        why.message
    );
    assert!(store.secret(&account_secret_name()).is_none());

    // With the binding but no Secret for it yet.
    let plan = plan_acme(&key(), &spec(&fx, Some("kid-1")), "leasehold").unwrap();
    let waiting = load_acme_issuer(&key(), &plan, &store, &state, &registry)
        .await
        .unwrap();
    assert_eq!(waiting.result.unwrap_err().reason, "EABSecretNotFound");

    store.insert(k8s_openapi::api::core::v1::Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("pebble-eab".into()),
            namespace: Some("shop".into()),
            ..Default::default()
        },
        data: Some(
            [(
                "key".to_owned(),
                k8s_openapi::ByteString(hmac.as_bytes().to_vec()),
            )]
            .into(),
        ),
        ..Default::default()
    });
    let ready = load_acme_issuer(&key(), &plan, &store, &state, &registry)
        .await
        .unwrap();
    let message = ready
        .result
        .unwrap_or_else(|e| panic!("{e:?}\n{}", fx.pebble.log_contents()));
    assert!(message.contains("as account https://"), "{message}");
    assert!(!message.contains(hmac));
    assert!(registry.resolve_key(&key()).is_ok());
}
