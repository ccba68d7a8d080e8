//! `AcmeIssuer` behind the shared `CertificateIssuer` interface, against a real Pebble
//! that validates HTTP-01 against our solver on loopback.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use leasehold_acme::{
    AccountRequest, AcmeAccount, AcmeIssuer, Http01Solver, PollPolicy, StoredAccount, account_for,
};
use leasehold_certs::issuer::MemoryJournal;
use leasehold_certs::{
    CertificateIssuer, CertificateRequest, IssueOrder, IssuedChain, IssuerError, KeyAlgorithm,
    OrderJournal, PrivateKeyPem, RevocationReason, RevokeOrder, csr_for, generate_key,
};
use leasehold_testkit::{PebbleOptions, PebbleServer};
use time::OffsetDateTime;

mod common;
use common::{Fixture, fixture};

const NAME: &str = "test.example";

fn poll() -> PollPolicy {
    PollPolicy {
        initial_delay: std::time::Duration::from_millis(100),
        ..PollPolicy::default()
    }
}

async fn account(fx: &Fixture) -> (AcmeAccount, StoredAccount) {
    let (account, stored) = account_for(
        &fx.directory,
        &AccountRequest {
            contact_email: Some("ops@leasehold.test".to_owned()),
            external_account_binding: None,
        },
        None,
    )
    .await
    .unwrap_or_else(|e| panic!("account: {e}\n{}", fx.pebble.log_contents()));
    (
        account,
        stored.expect("a new account is handed back to persist"),
    )
}

async fn issuer(fx: &Fixture) -> AcmeIssuer {
    let (account, _) = account(fx).await;
    AcmeIssuer::new(account, fx.solver.clone(), poll())
}

/// A request with the usages Pebble puts on every leaf: an ACME CA decides them,
/// and `verify_leaf` wants them exactly.
fn request(names: &[&str]) -> CertificateRequest {
    let mut request = CertificateRequest::server(names[0], names, time::Duration::days(90));
    request.usages = pebble_usages();
    request
}

fn pebble_usages() -> Vec<leasehold_certs::Usage> {
    use leasehold_certs::Usage;
    vec![
        Usage::ServerAuth,
        Usage::ClientAuth,
        Usage::DigitalSignature,
        Usage::KeyEncipherment,
    ]
}

/// A key and its CSR, kept by the "caller" as the engine would.
struct Keyed {
    key: PrivateKeyPem,
    csr: String,
}

fn key_and_csr(request: &CertificateRequest) -> Keyed {
    let key = generate_key(KeyAlgorithm::EcdsaP256).expect("key");
    let csr = csr_for(&key, request).expect("csr");
    Keyed { key, csr }
}

async fn issue(
    issuer: &AcmeIssuer,
    request: &CertificateRequest,
    keyed: &Keyed,
    journal: &dyn OrderJournal,
) -> Result<IssuedChain, IssuerError> {
    issuer
        .issue(IssueOrder {
            request,
            csr_pem: &keyed.csr,
            serial: "ignored",
            journal,
        })
        .await
}

async fn verify(issued: &IssuedChain, request: &CertificateRequest, keyed: &Keyed) {
    let anchor = leasehold_certs::first_certificate_der(&issued.ca_pem).expect("ca_pem");
    let leaf = leasehold_certs::first_certificate_der(&issued.leaf_pem).expect("leaf_pem");
    leasehold_certs::verify::verify_leaf(
        &anchor,
        &leaf,
        request,
        Some(&keyed.key),
        Some(&keyed.csr),
        OffsetDateTime::now_utc(),
    )
    .await
    .unwrap_or_else(|e| panic!("issued certificate verifies: {e}"));
    assert!(issued.chain_pem.starts_with(&issued.leaf_pem));
    let end = "-----END CERTIFICATE-----";
    let issuing = &issued.ca_pem[..issued.ca_pem.find(end).expect("PEM") + end.len()];
    assert!(
        issued.chain_pem.trim_end().ends_with(issuing),
        "ca_pem starts with the chain's last certificate"
    );
    assert!(issued.not_after > OffsetDateTime::now_utc());
}

async fn status_of(fx: &Fixture, serial: &str) -> String {
    let (status, body) = fx.pebble.cert_status_by_serial(serial).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn new_orders(fx: &Fixture) -> usize {
    fx.pebble.log_contents().matches("POST /order-plz").count()
}

#[tokio::test]
async fn issues_a_chain_that_verifies_with_a_real_handshake() {
    if !PebbleServer::available_for("issues_a_chain_that_verifies_with_a_real_handshake") {
        return;
    }
    let fx = fixture(PebbleOptions::default()).await;
    let issuer = issuer(&fx).await;
    assert_eq!(issuer.kind(), "ACME");
    let request = request(&[NAME, "www.test.example"]);
    let keyed = key_and_csr(&request);
    let journal = MemoryJournal::default();
    let issued = issue(&issuer, &request, &keyed, &journal)
        .await
        .unwrap_or_else(|e| panic!("issue: {e}\n{}", fx.pebble.log_contents()));
    verify(&issued, &request, &keyed).await;
    assert!(
        journal.recorded().await.is_some(),
        "the order was journaled"
    );
    assert!(fx.solver.is_empty(), "tokens withdrawn after validation");

    // Really validated: Pebble fetched both tokens from our solver.
    let log = fx.pebble.log_contents();
    for name in &request.dns_names {
        let fetched = format!(
            "Attempting to validate w/ HTTP: http://{name}:{}/.well-known/acme-challenge/",
            fx.solver.local_addr().port()
        );
        assert!(log.contains(&fetched), "HTTP-01 for {name}:\n{log}");
    }
    assert!(status_of(&fx, &issued.serial).await.contains("\"Valid\""));

    // With an extra anchor, ca_pem keeps the issuing certificate first.
    let root = fx.pebble.issuing_root_pem().await;
    let with_root = AcmeIssuer::new(issuer.account().clone(), fx.solver.clone(), poll())
        .with_extra_trust_anchors(root.clone());
    let keyed2 = key_and_csr(&request);
    let issued2 = issue(&with_root, &request, &keyed2, &MemoryJournal::default())
        .await
        .expect("issue with extra anchors");
    verify(&issued2, &request, &keyed2).await;
    assert!(issued2.ca_pem.ends_with(&root), "{}", issued2.ca_pem);
}

/// Records the order URL durably, then "crashes": the call never returns, as if the
/// process died right after the write.
#[derive(Default)]
struct CrashingJournal {
    url: Mutex<Option<String>>,
    crash: AtomicBool,
    records: AtomicUsize,
    recorded: tokio::sync::Notify,
}

#[async_trait]
impl OrderJournal for CrashingJournal {
    async fn recorded(&self) -> Option<String> {
        self.url.lock().expect("lock").clone()
    }
    async fn record(&self, order_url: &str) -> Result<(), IssuerError> {
        *self.url.lock().expect("lock") = Some(order_url.to_owned());
        self.records.fetch_add(1, Ordering::SeqCst);
        self.recorded.notify_one();
        if self.crash.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_crash_after_the_order_is_journaled_resumes_that_order() {
    if !PebbleServer::available_for("a_crash_after_the_order_is_journaled_resumes_that_order") {
        return;
    }
    let fx = fixture(PebbleOptions::default()).await;
    let issuer = issuer(&fx).await;
    let request = request(&[NAME]);
    let keyed = key_and_csr(&request);
    let journal = CrashingJournal {
        crash: AtomicBool::new(true),
        ..CrashingJournal::default()
    };

    // First attempt: dropped as soon as the order URL is durable.
    tokio::select! {
        biased;
        () = journal.recorded.notified() => {}
        result = issue(&issuer, &request, &keyed, &journal) => {
            panic!("the crashing journal never lets issue finish: {result:?}")
        }
    }
    let recorded = journal.recorded().await.expect("order URL journaled");
    assert_eq!(new_orders(&fx), 1);

    // After the "restart": the same order is driven to a certificate.
    journal.crash.store(false, Ordering::SeqCst);
    let issued = issue(&issuer, &request, &keyed, &journal)
        .await
        .unwrap_or_else(|e| panic!("resumed issue: {e}\n{}", fx.pebble.log_contents()));
    verify(&issued, &request, &keyed).await;
    assert_eq!(journal.recorded().await.as_deref(), Some(recorded.as_str()));
    assert_eq!(
        journal.records.load(Ordering::SeqCst),
        1,
        "no second order recorded"
    );
    assert_eq!(new_orders(&fx), 1, "no second order placed");

    // A crash after issuance (before the caller stored the certificate): the valid
    // order hands out the same certificate again.
    let again = issue(&issuer, &request, &keyed, &journal)
        .await
        .expect("valid order yields its certificate");
    assert_eq!(again, issued);
    assert_eq!(new_orders(&fx), 1, "still one order");

    // Recorded for another key (the caller lost it): a new order, for this CSR.
    let other_key = key_and_csr(&request);
    let replaced = issue(&issuer, &request, &other_key, &journal)
        .await
        .expect("new order for another key");
    verify(&replaced, &request, &other_key).await;
    assert_ne!(replaced.serial, issued.serial);
    assert_ne!(journal.recorded().await.as_deref(), Some(recorded.as_str()));
    assert_eq!(new_orders(&fx), 2);
}

#[tokio::test]
async fn an_invalid_recorded_order_is_replaced_by_a_new_one() {
    if !PebbleServer::available_for("an_invalid_recorded_order_is_replaced_by_a_new_one") {
        return;
    }
    let fx = fixture(PebbleOptions::default()).await;
    let (account, _) = account(&fx).await;
    // Tokens go to a solver Pebble never asks: validation fails, the order is invalid.
    let elsewhere = Http01Solver::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("second solver");
    let misrouted = AcmeIssuer::new(account.clone(), Arc::new(elsewhere), poll());
    let request = request(&[NAME]);
    let keyed = key_and_csr(&request);
    let journal = MemoryJournal::default();
    let err = issue(&misrouted, &request, &keyed, &journal)
        .await
        .expect_err("validation fails");
    assert!(
        matches!(err, IssuerError::Unavailable(_)),
        "a failed validation is worth another order: {err:?}"
    );
    let failed = journal.recorded().await.expect("journaled");

    let issuer = AcmeIssuer::new(account, fx.solver.clone(), poll());
    let issued = issue(&issuer, &request, &keyed, &journal)
        .await
        .unwrap_or_else(|e| panic!("issue: {e}\n{}", fx.pebble.log_contents()));
    verify(&issued, &request, &keyed).await;
    let placed = journal.recorded().await.expect("journaled");
    assert_ne!(placed, failed, "the new order is journaled");
    assert_eq!(new_orders(&fx), 2);

    // An order the CA no longer knows (purged, or the CA was reset): a new one too.
    let gone = placed.rsplit_once('/').expect("order URL").0.to_owned() + "/no-such-order";
    let journal = MemoryJournal(std::sync::Mutex::new(Some(gone.clone())));
    let keyed = key_and_csr(&request);
    let issued = issue(&issuer, &request, &keyed, &journal)
        .await
        .unwrap_or_else(|e| panic!("issue: {e}\n{}", fx.pebble.log_contents()));
    verify(&issued, &request, &keyed).await;
    assert_ne!(journal.recorded().await, Some(gone));
    assert_eq!(new_orders(&fx), 3);
}

#[tokio::test]
async fn renew_then_revoke_the_superseded_certificate() {
    if !PebbleServer::available_for("renew_then_revoke_the_superseded_certificate") {
        return;
    }
    let fx = fixture(PebbleOptions::default()).await;
    let issuer = issuer(&fx).await;
    let request = request(&[NAME]);
    let first_key = key_and_csr(&request);
    let first = issue(&issuer, &request, &first_key, &MemoryJournal::default())
        .await
        .expect("first");
    let second_key = key_and_csr(&request);
    let second = issue(&issuer, &request, &second_key, &MemoryJournal::default())
        .await
        .expect("renewal");
    verify(&second, &request, &second_key).await;
    assert_ne!(first.serial, second.serial);
    assert_ne!(first.leaf_pem, second.leaf_pem);

    let revoke = |issued: &IssuedChain| {
        let serial = issued.serial.clone();
        let leaf = issued.leaf_pem.clone();
        let not_after = issued.not_after;
        let issuer = &issuer;
        async move {
            issuer
                .revoke(RevokeOrder {
                    serial: &serial,
                    leaf_pem: Some(&leaf),
                    not_after: Some(not_after),
                    reason: RevocationReason::Superseded,
                })
                .await
        }
    };
    revoke(&first)
        .await
        .unwrap_or_else(|e| panic!("revoke: {e}\n{}", fx.pebble.log_contents()));
    assert!(status_of(&fx, &first.serial).await.contains("\"Revoked\""));
    assert!(status_of(&fx, &second.serial).await.contains("\"Valid\""));
    // Revoking again succeeds (alreadyRevoked).
    revoke(&first)
        .await
        .expect("already revoked counts as revoked");

    let err = issuer
        .revoke(RevokeOrder {
            serial: &second.serial,
            leaf_pem: None,
            not_after: None,
            reason: RevocationReason::Superseded,
        })
        .await
        .expect_err("no certificate, no revokeCert");
    assert!(
        matches!(&err, IssuerError::Rejected(m) if m.contains("needed to revoke")),
        "{err:?}"
    );
    assert!(status_of(&fx, &second.serial).await.contains("\"Valid\""));
}

#[tokio::test]
async fn issues_despite_rejected_nonces() {
    if !PebbleServer::available_for("issues_despite_rejected_nonces") {
        return;
    }
    let fx = fixture(PebbleOptions {
        nonce_reject_percent: 50,
        ..PebbleOptions::default()
    })
    .await;
    let issuer = issuer(&fx).await;
    let request = request(&[NAME]);
    let keyed = key_and_csr(&request);
    let issued = issue(&issuer, &request, &keyed, &MemoryJournal::default())
        .await
        .unwrap_or_else(|e| panic!("issue: {e}\n{}", fx.pebble.log_contents()));
    verify(&issued, &request, &keyed).await;
    issuer
        .revoke(RevokeOrder {
            serial: &issued.serial,
            leaf_pem: Some(&issued.leaf_pem),
            not_after: None,
            reason: RevocationReason::CessationOfOperation,
        })
        .await
        .expect("revoke despite rejected nonces");
    let log = fx.pebble.log_contents();
    assert!(
        log.contains("Configured to reject 50% of good nonces"),
        "nonce rejection was active:\n{log}"
    );
}

#[tokio::test]
async fn refused_requests_are_rejected_with_the_reason() {
    if !PebbleServer::available_for("refused_requests_are_rejected_with_the_reason") {
        return;
    }
    let fx = fixture(PebbleOptions::default()).await;
    let issuer = issuer(&fx).await;
    let journal = MemoryJournal::default();

    // IP SANs cannot be validated over HTTP-01: refused before the CA is asked.
    let mut with_ip = request(&[NAME]);
    with_ip.ip_addresses = vec!["127.0.0.1".parse().expect("ip")];
    let err = issue(&issuer, &with_ip, &key_and_csr(&with_ip), &journal)
        .await
        .expect_err("IP SAN");
    assert!(
        matches!(&err, IssuerError::Rejected(m) if m.contains("DNS names only")),
        "{err:?}"
    );

    let mut stray_cn = request(&[NAME]);
    stray_cn.common_name = "other.example".to_owned();
    let err = issue(&issuer, &stray_cn, &key_and_csr(&stray_cn), &journal)
        .await
        .expect_err("commonName not among the names");
    assert!(
        matches!(&err, IssuerError::Rejected(m) if m.contains("commonName")),
        "{err:?}"
    );
    assert!(journal.recorded().await.is_none(), "nothing was ordered");
    assert_eq!(new_orders(&fx), 0);

    // A name the CA refuses: its problem detail comes back, not retried.
    let bad = request(&["bad_name.example"]);
    let err = issue(&issuer, &bad, &key_and_csr(&bad), &journal)
        .await
        .expect_err("refused identifier");
    match &err {
        IssuerError::Rejected(m) => {
            assert!(m.contains("urn:ietf:params:acme:error:"), "{m}");
            assert!(!err.is_transient());
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
}

#[tokio::test]
async fn account_for_loads_the_stored_account_and_replaces_a_foreign_one() {
    if !PebbleServer::available_for(
        "account_for_loads_the_stored_account_and_replaces_a_foreign_one",
    ) {
        return;
    }
    let fx = fixture(PebbleOptions::default()).await;
    let (created, stored) = account(&fx).await;
    let json = serde_json::to_string(&stored).expect("persist");
    assert_eq!(
        stored.directory_url().as_deref(),
        Some(fx.directory.url.as_str())
    );

    let (loaded, new) = account_for(
        &fx.directory,
        &AccountRequest::default(),
        Some(serde_json::from_str(&json).expect("stored JSON")),
    )
    .await
    .expect("load");
    assert!(new.is_none(), "nothing new to persist");
    assert_eq!(loaded.id(), created.id());

    // An account of another directory (the Issuer's server changed): a new one here.
    let foreign = json.replace(&fx.directory.url, "https://elsewhere.example/dir");
    let (replaced, new) = account_for(
        &fx.directory,
        &AccountRequest::default(),
        Some(serde_json::from_str(&foreign).expect("stored JSON")),
    )
    .await
    .expect("register");
    assert!(new.is_some(), "the new account must be persisted");
    assert_ne!(replaced.id(), created.id());
}

#[tokio::test]
async fn debug_output_carries_no_key_material() {
    if !PebbleServer::available_for("debug_output_carries_no_key_material") {
        return;
    }
    let fx = fixture(PebbleOptions::default()).await;
    let (account, stored) = account(&fx).await;
    let json: serde_json::Value = serde_json::to_value(&stored).expect("json");
    let account_key = json["key_pkcs8"].as_str().expect("key").to_owned();
    assert!(account_key.len() > 40);
    let issuer = AcmeIssuer::new(account.clone(), fx.solver.clone(), poll())
        .with_extra_trust_anchors(fx.pebble.issuing_root_pem().await);
    let request = request(&[NAME]);
    let keyed = key_and_csr(&request);
    let key_body: String = keyed
        .key
        .expose()
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    for rendered in [
        format!("{issuer:?}"),
        format!("{account:?}"),
        format!("{stored:?}"),
        format!("{:?}", keyed.key),
    ] {
        assert!(!rendered.contains(&account_key), "{rendered}");
        assert!(!rendered.contains(&account_key[..32]), "{rendered}");
        assert!(!rendered.contains(&key_body[..32]), "{rendered}");
    }
    let issued = issue(&issuer, &request, &keyed, &MemoryJournal::default())
        .await
        .expect("issue");
    assert!(!format!("{issued:?}").contains(&key_body[..32]));
}
