//! `make bench`: certificates issued and verified per second by the `ca` issuer on one
//! core (ECDSA P-256), the way a certificate lease does it: a fresh key, a CSR, signing
//! under a caller-chosen serial, then every check before hand-out — chain, names,
//! usages, key match and a real TLS handshake on loopback. Prints figures; asserts
//! nothing about time.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Instant;

use leasehold_certs::issuer::NoJournal;
use leasehold_certs::verify::verify_leaf;
use leasehold_certs::{
    CaIssuer, CertificateAuthority, CertificateIssuer, CertificateRequest, IssueOrder,
    KeyAlgorithm, MemoryLedger, csr_for, first_certificate_der, generate_key, new_serial,
};
use time::OffsetDateTime;

const TARGET_PER_SECOND: f64 = 500.0;

async fn one(issuer: &CaIssuer, request: &CertificateRequest, handshake: bool) {
    let key = generate_key(KeyAlgorithm::EcdsaP256).unwrap();
    let csr = csr_for(&key, request).unwrap();
    let serial = new_serial();
    let chain = issuer
        .issue(IssueOrder {
            request,
            csr_pem: &csr,
            serial: &serial,
            journal: &NoJournal,
        })
        .await
        .unwrap();
    let leaf = first_certificate_der(&chain.chain_pem).unwrap();
    let anchor = first_certificate_der(&chain.ca_pem).unwrap();
    let key = handshake.then_some(&key);
    verify_leaf(
        &anchor,
        &leaf,
        request,
        key,
        Some(&csr),
        OffsetDateTime::now_utc(),
    )
    .await
    .unwrap();
}

fn main() {
    // One core: a current-thread runtime, nothing else running.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ca = CertificateAuthority::self_signed(
        "bench CA",
        KeyAlgorithm::EcdsaP256,
        OffsetDateTime::now_utc() - time::Duration::hours(1),
        time::Duration::days(30),
    )
    .unwrap();
    let issuer = CaIssuer::new(Arc::new(ca), Arc::new(MemoryLedger::default()));
    let request = CertificateRequest::server(
        "app.default.svc",
        &["app.default.svc", "app.default.svc.cluster.local"],
        time::Duration::hours(24),
    );
    rt.block_on(async {
        for _ in 0..50 {
            one(&issuer, &request, true).await;
        }
        for (label, handshake, n) in [
            ("issued + verified incl. TLS handshake", true, 2000u32),
            ("issued + verified without handshake", false, 2000u32),
        ] {
            let start = Instant::now();
            for _ in 0..n {
                one(&issuer, &request, handshake).await;
            }
            let secs = start.elapsed().as_secs_f64();
            let rate = f64::from(n) / secs;
            println!(
                "ca issuer, ECDSA P-256, one core: {rate:.0} certificates/s {label} ({:.2} ms each; target >= {TARGET_PER_SECOND:.0}/s: {})",
                secs * 1000.0 / f64::from(n),
                if rate >= TARGET_PER_SECOND { "met" } else { "NOT met" }
            );
        }
    });
}
