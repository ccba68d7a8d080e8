//! Against a real Pebble (Let's Encrypt's test CA), validating HTTP-01 against our
//! solver on loopback: pebble-challtestsrv resolves every name to 127.0.0.1.

use leasehold_acme::{
    AccountRequest, AcmeAccount, AcmeError, ExternalAccountBinding, Http01Solver, OrderStatus,
    PollPolicy, RevocationReason, StoredAccount,
};
use leasehold_testkit::{PebbleOptions, PebbleServer};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

mod common;
use common::{Fixture, fixture};

const NAME: &str = "test.example";

async fn account(fx: &Fixture) -> (AcmeAccount, StoredAccount) {
    AcmeAccount::create(
        &fx.directory,
        &AccountRequest {
            contact_email: Some("ops@leasehold.test".to_owned()),
            external_account_binding: None,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("account: {e}\n{}", fx.pebble.log_contents()))
}

/// A CSR for `names`; the key stays here, as it would in the caller.
fn csr_pem(names: &[&str]) -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .expect("params");
    params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem")
}

fn poll() -> PollPolicy {
    PollPolicy {
        initial_delay: std::time::Duration::from_millis(100),
        ..PollPolicy::default()
    }
}

fn chain_ders(pem: &str) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .map(|p| p.expect("PEM block").contents)
        .collect()
}

/// Leaf serial as Pebble's management interface expects it (hex).
fn serial_hex(der: &[u8]) -> String {
    let (_, cert) = X509Certificate::from_der(der).expect("leaf parses");
    cert.serial.to_str_radix(16)
}

fn assert_chain(chain_pem: &str, root_pem: &str) {
    let ders = chain_ders(chain_pem);
    assert!(
        ders.len() >= 2,
        "leaf plus intermediate expected: {chain_pem}"
    );
    let certs: Vec<X509Certificate<'_>> = ders
        .iter()
        .map(|d| X509Certificate::from_der(d).expect("chain certificate").1)
        .collect();
    let leaf = &certs[0];
    let sans: Vec<String> = leaf
        .extensions()
        .iter()
        .filter_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => Some(san),
            _ => None,
        })
        .flat_map(|san| san.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(sans, vec![NAME.to_owned()]);
    for pair in certs.windows(2) {
        assert_eq!(pair[0].issuer(), pair[1].subject(), "chain links by name");
        pair[0]
            .verify_signature(Some(pair[1].public_key()))
            .expect("each certificate is signed by the next");
    }
    let root_der = chain_ders(root_pem).remove(0);
    let (_, root) = X509Certificate::from_der(&root_der).expect("root parses");
    let last = certs.last().expect("non-empty");
    assert_eq!(last.issuer(), root.subject(), "chain ends at Pebble's root");
    last.verify_signature(Some(root.public_key()))
        .expect("the root signed the last intermediate");
}

async fn issue(fx: &Fixture, account: &AcmeAccount) -> String {
    let mut order = account
        .new_order(&[NAME.to_owned()])
        .await
        .unwrap_or_else(|e| panic!("new order: {e}"));
    order
        .complete(&fx.solver, csr_pem(&[NAME]).as_bytes(), &poll())
        .await
        .unwrap_or_else(|e| panic!("order: {e}\n{}", fx.pebble.log_contents()))
}

#[tokio::test]
async fn issues_through_http01_checks_chain_and_revokes() {
    if !PebbleServer::available_for("issues_through_http01_checks_chain_and_revokes") {
        return;
    }
    let fx = fixture(PebbleOptions::default()).await;
    let (account, stored) = account(&fx).await;
    let chain = issue(&fx, &account).await;
    assert_chain(&chain, &fx.pebble.issuing_root_pem().await);
    assert!(fx.solver.is_empty(), "tokens withdrawn after validation");
    // Real validation (no PEBBLE_VA_ALWAYS_VALID): Pebble fetched the token from
    // our solver's port under the DNS name.
    let log = fx.pebble.log_contents();
    let fetched = format!(
        "Attempting to validate w/ HTTP: http://{NAME}:{}/.well-known/acme-challenge/",
        fx.solver.local_addr().port()
    );
    assert!(
        log.contains(&fetched),
        "Pebble validated over HTTP-01:\n{log}"
    );
    assert!(log.contains("set VALID by completed challenge"), "{log}");

    // The caller persists the account and loads it later (here: to revoke).
    let json = serde_json::to_string(&stored).expect("serialize account");
    assert_eq!(format!("{stored:?}"), "StoredAccount(<redacted>)");
    let loaded = AcmeAccount::load(
        &fx.directory.trust,
        serde_json::from_str(&json).expect("deserialize account"),
    )
    .await
    .expect("load account");
    assert_eq!(loaded.id(), account.id());

    let serial = serial_hex(&chain_ders(&chain)[0]);
    let (status, body) = fx.pebble.cert_status_by_serial(&serial).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"Valid\""), "{body}");

    loaded
        .revoke(chain.as_bytes(), RevocationReason::Superseded)
        .await
        .unwrap_or_else(|e| panic!("revoke: {e}\n{}", fx.pebble.log_contents()));
    let (status, body) = fx.pebble.cert_status_by_serial(&serial).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"Revoked\""), "{body}");

    // Revoking again is a problem document with its type, not a transport error.
    let err = loaded
        .revoke(chain.as_bytes(), RevocationReason::Superseded)
        .await
        .expect_err("already revoked");
    let problem = err.problem().unwrap_or_else(|| panic!("problem: {err:?}"));
    assert_eq!(
        problem.kind.as_deref(),
        Some("urn:ietf:params:acme:error:alreadyRevoked"),
        "{err}"
    );
}

#[tokio::test]
async fn resumed_order_is_the_same_order() {
    if !PebbleServer::available_for("resumed_order_is_the_same_order") {
        return;
    }
    let fx = fixture(PebbleOptions::default()).await;
    let (account, _) = account(&fx).await;
    let order = account
        .new_order(&[NAME.to_owned()])
        .await
        .expect("new order");
    let recorded_url = order.url().to_owned();
    drop(order); // the "crash": only the recorded URL survives

    let mut resumed = account.resume_order(&recorded_url).await.expect("resume");
    assert_eq!(resumed.url(), recorded_url);
    assert_eq!(resumed.status(), OrderStatus::Pending);
    let chain = resumed
        .complete(&fx.solver, csr_pem(&[NAME]).as_bytes(), &poll())
        .await
        .unwrap_or_else(|e| panic!("resumed order: {e}\n{}", fx.pebble.log_contents()));

    // A second crash after issuance: resuming yields the same certificate, no new
    // order and no second finalization.
    let mut again = account.resume_order(&recorded_url).await.expect("resume");
    assert_eq!(again.status(), OrderStatus::Valid);
    let chain_again = again
        .complete(&fx.solver, csr_pem(&[NAME]).as_bytes(), &poll())
        .await
        .expect("valid order yields its certificate");
    assert_eq!(chain_again, chain);
    let log = fx.pebble.log_contents();
    assert_eq!(
        log.matches("POST /order-plz").count(),
        1,
        "exactly one new-order request:\n{log}"
    );
}

#[tokio::test]
async fn bad_nonces_are_retried() {
    if !PebbleServer::available_for("bad_nonces_are_retried") {
        return;
    }
    let fx = fixture(PebbleOptions {
        nonce_reject_percent: 50,
        ..PebbleOptions::default()
    })
    .await;
    let (account, _) = account(&fx).await;
    let chain = issue(&fx, &account).await;
    assert_chain(&chain, &fx.pebble.issuing_root_pem().await);
    account
        .revoke(chain.as_bytes(), RevocationReason::CessationOfOperation)
        .await
        .expect("revoke despite bad nonces");
    let log = fx.pebble.log_contents();
    assert!(
        log.contains("Configured to reject 50% of good nonces"),
        "nonce rejection was active:\n{log}"
    );
}

#[tokio::test]
async fn external_account_binding_and_problem_documents() {
    if !PebbleServer::available_for("external_account_binding_and_problem_documents") {
        return;
    }
    // base64url of 32 bytes of HMAC key.
    let hmac_key = b"leasehold-eab-hmac-key-32-bytes!".to_vec();
    let encoded = "bGVhc2Vob2xkLWVhYi1obWFjLWtleS0zMi1ieXRlcyE";
    let fx = fixture(PebbleOptions {
        eab_keys: vec![("kid-1".to_owned(), encoded.to_owned())],
        ..PebbleOptions::default()
    })
    .await;

    let err = AcmeAccount::create(&fx.directory, &AccountRequest::default())
        .await
        .expect_err("EAB is required");
    let problem = err.problem().unwrap_or_else(|| panic!("problem: {err:?}"));
    assert_eq!(
        problem.kind.as_deref(),
        Some("urn:ietf:params:acme:error:externalAccountRequired"),
        "{err}"
    );

    let (account, _) = AcmeAccount::create(
        &fx.directory,
        &AccountRequest {
            contact_email: None,
            external_account_binding: Some(ExternalAccountBinding {
                key_id: "kid-1".to_owned(),
                hmac_key,
            }),
        },
    )
    .await
    .unwrap_or_else(|e| panic!("EAB account: {e}\n{}", fx.pebble.log_contents()));

    // A name no CA may issue for: the rejection keeps its type and detail.
    let err = account
        .new_order(&["not a name!".to_owned()])
        .await
        .expect_err("bad identifier");
    assert!(matches!(err, AcmeError::Problem { .. }), "{err:?}");
    let problem = err.problem().expect("problem");
    assert!(
        problem
            .kind
            .as_deref()
            .is_some_and(|k| k.starts_with("urn:ietf:params:acme:error:")),
        "{err}"
    );
    assert!(problem.detail.is_some(), "{err}");
}

#[tokio::test]
async fn failed_validation_surfaces_the_order_problem() {
    if !PebbleServer::available_for("failed_validation_surfaces_the_order_problem") {
        return;
    }
    let fx = fixture(PebbleOptions::default()).await;
    let (account, _) = account(&fx).await;
    // Tokens go to a solver Pebble never asks: it gets 404 from the real one.
    let elsewhere = Http01Solver::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("second solver");
    let mut order = account
        .new_order(&[NAME.to_owned()])
        .await
        .expect("new order");
    let err = order
        .complete(&elsewhere, csr_pem(&[NAME]).as_bytes(), &poll())
        .await
        .expect_err("validation fails");
    match &err {
        AcmeError::OrderInvalid { url, .. } => assert_eq!(url, order.url()),
        other => panic!("expected OrderInvalid, got {other:?}"),
    }
    assert!(elsewhere.is_empty(), "tokens withdrawn after a failure too");
}

#[tokio::test]
async fn solver_serves_only_added_tokens() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let solver = Http01Solver::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("solver");
    let get = |token: &'static str| {
        let addr = solver.local_addr();
        async move {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let req = format!(
                "GET /.well-known/acme-challenge/{token} HTTP/1.0\r\nHost: test.example\r\n\r\n"
            );
            tcp.write_all(req.as_bytes()).await.expect("send");
            let mut rsp = String::new();
            tcp.read_to_string(&mut rsp).await.expect("read");
            rsp
        }
    };
    solver.add("tok", "tok.thumbprint");
    let rsp = get("tok").await;
    assert!(rsp.starts_with("HTTP/1.0 200"), "{rsp}");
    assert!(rsp.ends_with("\r\n\r\ntok.thumbprint"), "{rsp}");
    assert!(get("other").await.contains(" 404 "));
    solver.remove("tok");
    assert!(get("tok").await.contains(" 404 "));
}
