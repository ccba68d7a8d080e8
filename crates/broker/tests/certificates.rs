//! Certificate leases through the real broker (TLS on loopback): the node's CSR is
//! signed by a `ca` issuer over a memory ledger, with names from the verified pod.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;

use common::*;
use leasehold_certs::{CertificateRequest, KeyAlgorithm, Usage, csr_for, generate_key, verify};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tonic::Code;

fn request_from(profile: &leasehold_proto::broker::v1::CertificateProfile) -> CertificateRequest {
    let usage = |u: &str| match u {
        "ServerAuth" => Usage::ServerAuth,
        "ClientAuth" => Usage::ClientAuth,
        "DigitalSignature" => Usage::DigitalSignature,
        "KeyEncipherment" => Usage::KeyEncipherment,
        other => panic!("usage {other}"),
    };
    CertificateRequest {
        common_name: profile.common_name.clone(),
        dns_names: profile.dns_names.clone(),
        ip_addresses: profile
            .ip_addresses
            .iter()
            .map(|ip| ip.parse().unwrap())
            .collect(),
        uris: profile.uris.clone(),
        duration: time::Duration::hours(1),
        usages: profile.usages.iter().map(|u| usage(u)).collect(),
        key_algorithm: KeyAlgorithm::EcdsaP256,
    }
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn a_pod_gets_its_own_certificate_for_a_key_the_broker_never_sees() {
    let mut b = start().await;
    let web = web();
    let node = node_token();
    let pod = pod_token(&web);

    // Issue tells the driver it is a certificate lease, and which names to ask for.
    let issued = b
        .client
        .issue(with_token(issue_request(&web, "cert", &pod), Some(&node)))
        .await
        .unwrap()
        .into_inner();
    assert!(issued.files.is_empty());
    let profile = issued.certificate.expect("a certificate profile");
    assert_eq!(profile.common_name, "web-0");
    assert_eq!(profile.dns_names, ["web-0.web.shop.svc", "web.shop.svc"]);
    assert_eq!(profile.uris, ["spiffe://cluster.local/ns/shop/sa/web"]);
    assert_eq!(profile.key_algorithm, "EcdsaP256");

    let request = request_from(&profile);
    let key = generate_key(KeyAlgorithm::EcdsaP256).unwrap();
    let csr = csr_for(&key, &request).unwrap();
    assert!(!csr.contains("PRIVATE KEY"));
    let cert = b
        .client
        .issue_certificate(with_token(
            issue_certificate_request(&web, "cert", &pod, &csr),
            Some(&node),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cert.ca_pem, b.certs.ca.certificate_pem());
    assert_eq!(cert.certificate.as_ref(), Some(&profile));
    assert_eq!(
        b.certs.store.serials_of(&web.uid),
        std::slice::from_ref(&cert.serial)
    );
    let not_after = cert.not_after.unwrap().seconds;
    let renew_at = cert.renew_at.unwrap().seconds;
    // The open policy: ttl 1h, renewBefore a third of it.
    assert!(
        renew_at < not_after && renew_at > now(),
        "{renew_at} {not_after}"
    );
    // The node's checks: chain, names, key match, and a real TLS handshake.
    verify::verify_leaf(
        &der(&cert.ca_pem),
        &der(&cert.certificate_chain_pem),
        &request,
        Some(&key),
        None,
        time::OffsetDateTime::now_utc(),
    )
    .await
    .unwrap();

    // A renewal gets a new serial; releasing the old one revokes only it.
    let key2 = generate_key(KeyAlgorithm::EcdsaP256).unwrap();
    let renewed = b
        .client
        .issue_certificate(with_token(
            issue_certificate_request(&web, "cert", &pod, &csr_for(&key2, &request).unwrap()),
            Some(&node),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(renewed.serial, cert.serial);
    let mut release = release_request(&web, "cert");
    release.serial = cert.serial.clone();
    b.client
        .release(with_token(release, Some(&node)))
        .await
        .unwrap();
    let ledger = b.certs.ledger.0.lock().unwrap().clone();
    assert!(ledger.is_revoked(&cert.serial));
    assert!(!ledger.is_revoked(&renewed.serial));
    assert_eq!(
        b.certs.store.serials_of(&web.uid),
        std::slice::from_ref(&renewed.serial)
    );

    // Release of the volume revokes the rest; releasing again is fine.
    for _ in 0..2 {
        b.client
            .release(with_token(release_request(&web, "cert"), Some(&node)))
            .await
            .unwrap();
    }
    assert!(b.certs.ledger.0.lock().unwrap().is_revoked(&renewed.serial));
    assert!(b.certs.store.serials_of(&web.uid).is_empty());
}

#[tokio::test]
async fn refused_callers_get_nothing_signed() {
    let mut b = start().await;
    let web = web();
    let node = node_token();
    let request = CertificateRequest {
        dns_names: vec!["web-0.web.shop.svc".into(), "web.shop.svc".into()],
        uris: vec!["spiffe://cluster.local/ns/shop/sa/web".into()],
        ..CertificateRequest::server("web-0", &[], time::Duration::hours(1))
    };
    let csr = csr_for(&generate_key(KeyAlgorithm::EcdsaP256).unwrap(), &request).unwrap();

    // Another pod's token, an expired token, a stranger's driver token.
    let api = pod_id("shop", "api-0", "api");
    let cases = [
        (pod_token(&api), node.clone(), Code::PermissionDenied),
        (
            pod_token_exp(&web, -600),
            node.clone(),
            Code::Unauthenticated,
        ),
        (
            pod_token(&web),
            node_token_for("shop", "web", Some(NODE)),
            Code::PermissionDenied,
        ),
    ];
    for (pod, driver, code) in cases {
        let err = b
            .client
            .issue_certificate(with_token(
                issue_certificate_request(&web, "cert", &pod, &csr),
                Some(&driver),
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
    }
    // A pod on another node.
    let far = pod_id("shop", "far-0", "web");
    let err = b
        .client
        .issue_certificate(with_token(
            issue_certificate_request(&far, "cert", &pod_token(&far), &csr),
            Some(&node),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(b.certs.signed.load(Ordering::SeqCst), 0);
    assert!(b.certs.store.serials_of(&web.uid).is_empty());

    // A database lease is no certificate lease.
    let err = b
        .client
        .issue_certificate(with_token(
            issue_certificate_request(&web, "db", &pod_token(&web), &csr),
            Some(&node),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}

#[tokio::test]
async fn csrs_with_other_names_or_no_csr_are_invalid() {
    let mut b = start().await;
    let web = web();
    let node = node_token();
    let pod = pod_token(&web);
    let key = generate_key(KeyAlgorithm::EcdsaP256).unwrap();
    // Names of another pod: the broker names the certificate, never the CSR.
    let other = CertificateRequest::server(
        "api-0",
        &["api-0.web.shop.svc", "web.shop.svc"],
        time::Duration::hours(1),
    );
    for csr in [
        csr_for(&key, &other).unwrap(),
        "-----BEGIN CERTIFICATE REQUEST-----\nnot base64\n-----END CERTIFICATE REQUEST-----\n"
            .to_owned(),
        String::new(),
    ] {
        let err = b
            .client
            .issue_certificate(with_token(
                issue_certificate_request(&web, "cert", &pod, &csr),
                Some(&node),
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
    assert!(b.certs.store.serials_of(&web.uid).is_empty());
    assert!(b.certs.ledger.0.lock().unwrap().entries.is_empty());
}

/// Issues `p` a certificate of `shop/cert` through the broker; its serial.
async fn issue_cert(b: &mut Broker, p: &leasehold_broker::authz::PodIdentity) -> String {
    let node = node_token();
    let profile = b
        .client
        .issue(with_token(
            issue_request(p, "cert", &pod_token(p)),
            Some(&node),
        ))
        .await
        .unwrap()
        .into_inner()
        .certificate
        .unwrap();
    let csr = csr_for(
        &generate_key(KeyAlgorithm::EcdsaP256).unwrap(),
        &request_from(&profile),
    )
    .unwrap();
    b.client
        .issue_certificate(with_token(
            issue_certificate_request(p, "cert", &pod_token(p), &csr),
            Some(&node),
        ))
        .await
        .unwrap()
        .into_inner()
        .serial
}

#[tokio::test]
async fn the_sweep_revokes_certificates_of_gone_pods() {
    let mut b = start().await;
    let (web, api) = (web(), pod_id("shop", "api-0", "api"));
    let serials = [
        issue_cert(&mut b, &web).await,
        issue_cert(&mut b, &api).await,
    ];
    // web-0 is gone; api-0 lives.
    b.cluster.remove_pod("shop", "web-0");
    let report = b
        .certs
        .certificates
        .sweep_lease(&cert_lease_object(), b.cluster.as_ref())
        .await
        .unwrap();
    assert_eq!(report.revoked, [serials[0].clone()]);
    let ledger = b.certs.ledger.0.lock().unwrap().clone();
    assert!(ledger.is_revoked(&serials[0]) && !ledger.is_revoked(&serials[1]));
}

/// `shop/cert` admitting pods of `billing`: the sweep looks each pod up in
/// its record's namespace, so a live `billing` pod keeps its certificate while
/// gone pods of either namespace lose theirs.
#[tokio::test]
async fn the_sweep_keeps_certificates_of_live_pods_in_other_namespaces() {
    let mut b = start().await;
    let mut lease = cert_lease_object();
    lease.spec.policy_ref.name = "shared".into();
    b.cluster.put_lease(lease.clone());
    let shop = [web(), pod_id("shop", "web-1", "web")];
    let billing = [
        pod_id("billing", "job-0", "worker"),
        pod_id("billing", "job-1", "worker"),
    ];
    for p in [&shop[1], &billing[1]] {
        b.cluster.put_pod(pod_object(p, NODE));
    }
    let mut serials = Vec::new();
    for p in shop.iter().chain(&billing) {
        serials.push(issue_cert(&mut b, p).await);
    }
    // web-1 and job-1 are gone; web-0 and job-0 live.
    b.cluster.remove_pod("shop", "web-1");
    b.cluster.remove_pod("billing", "job-1");

    let report = b
        .certs
        .certificates
        .sweep_lease(&lease, b.cluster.as_ref())
        .await
        .unwrap();
    let mut revoked = report.revoked.clone();
    revoked.sort();
    let mut expected = vec![serials[1].clone(), serials[3].clone()];
    expected.sort();
    assert_eq!(revoked, expected);
    let ledger = b.certs.ledger.0.lock().unwrap().clone();
    assert!(!ledger.is_revoked(&serials[0]), "shop/web-0 lives");
    assert!(!ledger.is_revoked(&serials[2]), "billing/job-0 lives");
}
