//! A certificate lease through the engine with an ACME issuer against a real Pebble
//! (HTTP-01 validated against our solver on loopback): issue, verify with a TLS
//! handshake, rotate, and the superseded certificate revoked at the CA.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::{MemoryStores, lease_key, obs};
use leasehold_acme::{AccountRequest, AcmeIssuer, Directory, Http01Solver, PollPolicy, TrustRoots};
use leasehold_api::{RotationPolicySpec, SecretLeaseSpec};
use leasehold_engine::context::resolve_certificate;
use leasehold_engine::{Engine, Outcome};
use leasehold_testkit::{PebbleOptions, PebbleServer};

#[tokio::test]
async fn an_acme_certificate_is_issued_rotated_and_the_old_one_revoked_at_the_ca() {
    if !PebbleServer::available_for(
        "an_acme_certificate_is_issued_rotated_and_the_old_one_revoked_at_the_ca",
    ) {
        return;
    }
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let solver = Arc::new(Http01Solver::bind(addr).await.unwrap());
    let pebble = PebbleServer::start(PebbleOptions {
        http_port: solver.local_addr().port(),
        ..PebbleOptions::default()
    })
    .await;
    let directory = Directory {
        url: pebble.directory_url(),
        trust: TrustRoots::Pem(pebble.ca_pem().to_owned()),
    };
    let (account, _) = leasehold_acme::account_for(&directory, &AccountRequest::default(), None)
        .await
        .unwrap();
    let issuer = Arc::new(AcmeIssuer::new(
        account,
        solver.clone(),
        PollPolicy {
            initial_delay: std::time::Duration::from_millis(100),
            ..PollPolicy::default()
        },
    ));
    let policy: RotationPolicySpec = serde_json::from_value(serde_json::json!({
        "ttl": "24h", "renewBefore": "8h",
        "revoke": {"gracePeriod": "0s", "waitForConsumers": false}
    }))
    .unwrap();
    let lease: SecretLeaseSpec = serde_json::from_value(serde_json::json!({
        "policyRef": {"name": "p"},
        "certificate": {
            "issuerRef": {"name": "acme", "kind": "ClusterIssuer"},
            "commonName": "web.example",
            "dnsNames": ["web.example"]
        },
        "delivery": {"secret": {"name": "web-tls"}}
    }))
    .unwrap();
    let key = lease_key("acme");
    let ctx = resolve_certificate(key.clone(), &lease, &policy, issuer, None).unwrap();
    let stores = MemoryStores::default();
    let engine = Engine::new();
    let mut progress = stores.load(&key);
    let out = engine
        .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", pebble.log_contents()));
    assert!(matches!(out, Outcome::Wait { .. }), "{out:?}");
    // The version's name is the serial the engine chose; an ACME CA picks its own, so
    // the certificate is looked up by what was delivered.
    let delivered = stores.delivered.lock().unwrap().last().cloned().unwrap();
    let serial = leaf_serial(&delivered.2["tls.crt"]);
    let (code, body) = pebble.cert_status_by_serial(&serial).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"Valid\""), "{body}");

    engine
        .reconcile(&ctx, &mut progress, &obs(Some("now")), stores.stores())
        .await
        .unwrap();
    let v2 = progress.current().unwrap().clone();
    assert_eq!(v2.version, 2);
    assert!(progress.version(1).is_none(), "v1 revoked: {progress:?}");
    let (code, body) = pebble.cert_status_by_serial(&serial).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"Revoked\""), "{body}");
    let newest = stores.delivered.lock().unwrap().last().cloned().unwrap();
    let (_, body) = pebble
        .cert_status_by_serial(&leaf_serial(&newest.2["tls.crt"]))
        .await;
    assert!(body.contains("\"Valid\""), "{body}");
}

fn leaf_serial(pem: &str) -> String {
    let der = leasehold_certs::first_certificate_der(pem).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let hex = cert.raw_serial_as_string().replace(':', "");
    hex.trim_start_matches('0').to_lowercase()
}
