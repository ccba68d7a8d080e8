//! The `ca` issuer end to end: issue, verify, revoke, and check with openssl.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use leasehold_certs::verify::{self, VerifyError};
use leasehold_certs::{
    CertificateAuthority, CertificateRequest, IssueError, KeyAlgorithm, RevocationList,
    RevocationReason, Usage,
};
use rcgen::{CertificateParams, KeyPair};
use time::{Duration, OffsetDateTime};

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn ca(name: &str) -> CertificateAuthority {
    CertificateAuthority::self_signed(name, KeyAlgorithm::EcdsaP256, now(), Duration::days(365))
        .expect("self-signed CA")
}

fn request(algorithm: KeyAlgorithm) -> CertificateRequest {
    CertificateRequest {
        common_name: "db.example.svc".to_owned(),
        dns_names: vec!["db.example.svc".to_owned(), "db".to_owned()],
        ip_addresses: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7))],
        uris: vec!["spiffe://cluster.local/ns/example/sa/db".to_owned()],
        duration: Duration::hours(24),
        usages: vec![
            Usage::ServerAuth,
            Usage::ClientAuth,
            Usage::DigitalSignature,
        ],
        key_algorithm: algorithm,
    }
}

/// A CSR made "on the node" for `sans`, and the key that stays there.
fn csr(algorithm: KeyAlgorithm, sans: &[&str]) -> (String, KeyPair) {
    let key = algorithm.generate().expect("node key");
    let mut params =
        CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
            .expect("csr params");
    // rcgen reads every non-IP string as a DNS name; make URIs URIs.
    for san in &mut params.subject_alt_names {
        if let rcgen::SanType::DnsName(name) = san
            && name.as_str().contains("://")
        {
            *san = rcgen::SanType::URI(name.as_str().try_into().expect("uri"));
        }
    }
    let csr = params.serialize_request(&key).expect("csr");
    (csr.pem().expect("csr pem"), key)
}

#[tokio::test]
async fn issues_with_generated_key_for_every_algorithm() {
    let ca = ca("leasehold test CA");
    for algorithm in KeyAlgorithm::ALL {
        let request = request(algorithm);
        let issued = ca
            .issue_with_generated_key(&request, now())
            .unwrap_or_else(|err| panic!("{algorithm:?}: {err}"));
        assert_eq!(issued.serial.len(), 32, "128-bit serial");
        verify::verify_issued(&ca, &issued, &request, None, now())
            .await
            .unwrap_or_else(|err| panic!("{algorithm:?}: {err}"));
        let key = issued.private_key.expect("generated key");
        assert_eq!(format!("{key:?}"), "PrivateKeyPem(<redacted>)");
    }
}

#[tokio::test]
async fn issues_from_csr_for_every_algorithm() {
    let ca = ca("leasehold test CA");
    for algorithm in KeyAlgorithm::ALL {
        let request = request(algorithm);
        // SANs in another order and case: still exactly the requested set.
        let (csr_pem, node_key) = csr(
            algorithm,
            &[
                "spiffe://cluster.local/ns/example/sa/db",
                "10.0.0.7",
                "DB",
                "db.example.svc",
            ],
        );
        let issued = ca
            .issue_from_csr(&request, &csr_pem, now())
            .unwrap_or_else(|err| panic!("{algorithm:?}: {err}"));
        assert!(issued.private_key.is_none());
        verify::verify_issued(&ca, &issued, &request, Some(&csr_pem), now())
            .await
            .unwrap_or_else(|err| panic!("{algorithm:?}: {err}"));
        // The node's key works with the certificate in a real handshake.
        let node_key = leasehold_certs::PrivateKeyPem::new(node_key.serialize_pem());
        verify::check_handshake(
            ca.certificate_der(),
            &issued.certificate_der,
            &node_key,
            "db.example.svc",
        )
        .await
        .unwrap_or_else(|err| panic!("{algorithm:?}: {err}"));
    }
}

#[test]
fn csr_with_extra_or_missing_names_is_refused() {
    let ca = ca("leasehold test CA");
    let request = CertificateRequest::server("db", &["db"], Duration::hours(1));
    let (extra, _) = csr(KeyAlgorithm::EcdsaP256, &["db", "evil.example.com"]);
    match ca.issue_from_csr(&request, &extra, now()) {
        Err(IssueError::CsrNames { in_csr, .. }) => {
            assert!(in_csr.contains(&"DNS:evil.example.com".to_owned()))
        }
        other => panic!("extra SAN accepted: {other:?}"),
    }
    let (missing, _) = csr(KeyAlgorithm::EcdsaP256, &[]);
    assert!(matches!(
        ca.issue_from_csr(&request, &missing, now()),
        Err(IssueError::CsrNames { .. })
    ));
}

#[test]
fn csr_with_a_bad_signature_is_refused() {
    let ca = ca("leasehold test CA");
    let request = CertificateRequest::server("db", &["db"], Duration::hours(1));
    let (csr_pem, _) = csr(KeyAlgorithm::EcdsaP256, &["db"]);
    let der = pem_contents(&csr_pem);
    let mut tampered = der.clone();
    // Flip a bit of the signature, the last bytes of the CSR.
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let tampered_pem = pem_encode("CERTIFICATE REQUEST", &tampered);
    assert!(matches!(
        ca.issue_from_csr(&request, &tampered_pem, now()),
        Err(IssueError::Csr(_))
    ));
}

#[test]
fn verification_catches_a_wrong_name_a_wrong_key_and_another_ca() {
    let ca = ca("leasehold test CA");
    let request = request(KeyAlgorithm::EcdsaP256);
    let issued = ca.issue_with_generated_key(&request, now()).expect("issue");

    let mut other_names = request.clone();
    other_names.dns_names.push("other.example.svc".to_owned());
    assert!(matches!(
        verify::check_certificate(
            ca.certificate_der(),
            &issued.certificate_der,
            &other_names,
            now()
        ),
        Err(VerifyError::SubjectAltNames { .. })
    ));

    let mut other_usages = request.clone();
    other_usages.usages = vec![Usage::ClientAuth];
    assert!(matches!(
        verify::check_certificate(
            ca.certificate_der(),
            &issued.certificate_der,
            &other_usages,
            now()
        ),
        Err(VerifyError::Usages { .. })
    ));

    let other_key = ca.issue_with_generated_key(&request, now()).expect("issue");
    let err = verify::check_private_key(
        &issued.certificate_der,
        other_key.private_key.as_ref().expect("key"),
    )
    .expect_err("wrong key accepted");
    assert!(matches!(err, VerifyError::KeyMismatch));
    assert!(!err.to_string().contains("PRIVATE KEY"));

    // Same subject name, different key: only the signature check can tell.
    let impostor = self::ca("leasehold test CA");
    let foreign = impostor
        .issue_with_generated_key(&request, now())
        .expect("issue");
    assert!(matches!(
        verify::check_certificate(
            ca.certificate_der(),
            &foreign.certificate_der,
            &request,
            now()
        ),
        Err(VerifyError::Signature)
    ));
    let stranger = self::ca("another CA");
    let foreign = stranger
        .issue_with_generated_key(&request, now())
        .expect("issue");
    assert!(matches!(
        verify::check_certificate(
            ca.certificate_der(),
            &foreign.certificate_der,
            &request,
            now()
        ),
        Err(VerifyError::IssuerName)
    ));

    assert!(matches!(
        verify::check_certificate(
            ca.certificate_der(),
            &issued.certificate_der,
            &request,
            now() + Duration::days(2)
        ),
        Err(VerifyError::NotValidNow { .. })
    ));
}

#[tokio::test]
async fn handshake_fails_for_a_name_not_in_the_certificate() {
    let ca = ca("leasehold test CA");
    let issued = ca
        .issue_with_generated_key(
            &CertificateRequest::server("db", &["db.example.svc"], Duration::hours(1)),
            now(),
        )
        .expect("issue");
    let key = issued.private_key.as_ref().expect("key");
    verify::check_handshake(
        ca.certificate_der(),
        &issued.certificate_der,
        key,
        "db.example.svc",
    )
    .await
    .expect("good name");
    let err = verify::check_handshake(
        ca.certificate_der(),
        &issued.certificate_der,
        key,
        "cache.example.svc",
    )
    .await
    .expect_err("wrong name accepted");
    assert!(matches!(err, VerifyError::Handshake { .. }), "{err}");

    let stranger = self::ca("another CA");
    let err = verify::check_handshake(
        stranger.certificate_der(),
        &issued.certificate_der,
        key,
        "db.example.svc",
    )
    .await
    .expect_err("untrusted CA accepted");
    assert!(matches!(err, VerifyError::Handshake { .. }), "{err}");
}

#[test]
fn loaded_ca_issues_like_the_generated_one() {
    let generated = ca("leasehold test CA");
    let loaded =
        CertificateAuthority::from_pem(generated.certificate_pem(), generated.key_pem().expose())
            .expect("load");
    let request = request(KeyAlgorithm::Ed25519);
    let issued = loaded
        .issue_with_generated_key(&request, now())
        .expect("issue");
    verify::check_certificate(
        generated.certificate_der(),
        &issued.certificate_der,
        &request,
        now(),
    )
    .expect("verifies against the original");
    let debug = format!("{loaded:?}");
    assert!(!debug.contains("PRIVATE KEY"), "{debug}");

    let other = ca("another CA");
    assert!(matches!(
        CertificateAuthority::from_pem(generated.certificate_pem(), other.key_pem().expose()),
        Err(leasehold_certs::CaError::KeyMismatch)
    ));
}

fn openssl_verify(dir: &std::path::Path, crl: Option<&str>) -> std::process::Output {
    let mut command = Command::new("/usr/bin/openssl");
    command.arg("verify").arg("-CAfile").arg(dir.join("ca.pem"));
    if let Some(crl) = crl {
        std::fs::write(dir.join("crl.pem"), crl).expect("write crl");
        command
            .arg("-crl_check")
            .arg("-CRLfile")
            .arg(dir.join("crl.pem"));
    }
    command
        .arg(dir.join("leaf.pem"))
        .output()
        .expect("run openssl")
}

#[test]
fn openssl_sees_the_revocation_in_the_crl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = ca("leasehold test CA");
    let request = request(KeyAlgorithm::EcdsaP256);
    let issued = ca.issue_with_generated_key(&request, now()).expect("issue");
    std::fs::write(dir.path().join("ca.pem"), ca.certificate_pem()).expect("write");
    std::fs::write(dir.path().join("leaf.pem"), &issued.certificate_pem).expect("write");

    let mut list = RevocationList::default();
    let crl = list
        .sign(&ca, now(), Duration::hours(6))
        .expect("empty crl");
    assert_eq!(crl.crl_number, 1);
    let output = openssl_verify(dir.path(), Some(&crl.pem));
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    assert!(list.revoke(&issued.serial, now(), RevocationReason::Superseded));
    assert!(!list.revoke(
        &issued.serial.to_uppercase(),
        now(),
        RevocationReason::KeyCompromise
    ));
    assert!(
        crl.needs_refresh(&list, crl.this_update),
        "a new entry needs a new CRL"
    );
    let crl = list.sign(&ca, now(), Duration::hours(6)).expect("crl");
    assert_eq!(crl.crl_number, 2);
    let output = openssl_verify(dir.path(), Some(&crl.pem));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("certificate revoked"), "{text}");

    // The list survives a JSON round trip (the caller persists it).
    let json = serde_json::to_string(&list).expect("json");
    let restored: RevocationList = serde_json::from_str(&json).expect("parse");
    assert_eq!(restored, list);
}

#[test]
fn crl_window_and_refresh_time() {
    let ca = ca("leasehold test CA");
    let mut list = RevocationList::default();
    let this_update = now();
    let crl = list
        .sign(&ca, this_update, Duration::hours(6))
        .expect("crl");
    assert_eq!(crl.next_update - crl.this_update, Duration::hours(6));
    assert_eq!(crl.refresh_at() - this_update, Duration::hours(4));
    assert!(!crl.needs_refresh(&list, this_update + Duration::hours(3)));
    assert!(crl.needs_refresh(&list, this_update + Duration::hours(4)));

    // The nextUpdate openssl reads is the one asked for.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("crl.pem"), &crl.pem).expect("write");
    let output = Command::new("/usr/bin/openssl")
        .args(["crl", "-noout", "-nextupdate", "-in"])
        .arg(dir.path().join("crl.pem"))
        .output()
        .expect("openssl crl");
    let text = String::from_utf8_lossy(&output.stdout);
    let expected = crl.next_update.to_offset(time::UtcOffset::UTC);
    let month = format!("{:?}", expected.month());
    assert!(text.contains(&month[..3]), "{text}");
    assert!(text.contains(&expected.year().to_string()), "{text}");
    assert!(
        text.contains(&format!(
            "{:02}:{:02}:{:02}",
            expected.hour(),
            expected.minute(),
            expected.second()
        )),
        "{text}"
    );

    // An expired CRL fails openssl's check.
    let stale = list
        .sign(&ca, now() - Duration::hours(3), Duration::hours(1))
        .expect("stale crl");
    std::fs::write(dir.path().join("ca.pem"), ca.certificate_pem()).expect("write");
    let issued = ca
        .issue_with_generated_key(
            &request(KeyAlgorithm::EcdsaP256),
            now() - Duration::hours(1),
        )
        .expect("issue");
    std::fs::write(dir.path().join("leaf.pem"), &issued.certificate_pem).expect("write");
    let output = openssl_verify(dir.path(), Some(&stale.pem));
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("CRL has expired"), "{text}");
}

fn pem_contents(text: &str) -> Vec<u8> {
    x509_parser::pem::parse_x509_pem(text.as_bytes())
        .expect("pem")
        .1
        .contents
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut text = format!("-----BEGIN {label}-----\n");
    for chunk in body.as_bytes().chunks(64) {
        text.push_str(std::str::from_utf8(chunk).expect("ascii"));
        text.push('\n');
    }
    text.push_str(&format!("-----END {label}-----\n"));
    text
}

#[tokio::test]
async fn client_handshake_passes_for_a_client_certificate_and_fails_for_another_ca() {
    let ca = ca("leasehold test CA");
    let mut request = CertificateRequest::server("app", &["app.example.svc"], Duration::hours(1));
    request.usages = vec![Usage::ClientAuth, Usage::DigitalSignature];
    let issued = ca.issue_with_generated_key(&request, now()).expect("issue");
    verify::verify_issued(&ca, &issued, &request, None, now())
        .await
        .expect("client certificate verifies");
    let key = issued.private_key.as_ref().expect("key");
    let stranger = self::ca("another CA");
    let err =
        verify::check_client_handshake(stranger.certificate_der(), &issued.certificate_der, key)
            .await
            .expect_err("client certificate from another CA accepted");
    assert!(matches!(err, VerifyError::Handshake { .. }), "{err}");

    // A server-only certificate is no client certificate.
    let server = ca
        .issue_with_generated_key(
            &CertificateRequest::server("db", &["db"], Duration::hours(1)),
            now(),
        )
        .expect("issue");
    let err = verify::check_client_handshake(
        ca.certificate_der(),
        &server.certificate_der,
        server.private_key.as_ref().expect("key"),
    )
    .await
    .expect_err("serverAuth-only certificate accepted as client");
    assert!(matches!(err, VerifyError::Handshake { .. }), "{err}");
}

#[test]
fn a_csr_key_of_another_algorithm_than_requested_is_refused() {
    use leasehold_certs::verify::check_csr_key_algorithm;
    let request = |alg| {
        let mut r = CertificateRequest::server("app.test", &["app.test"], time::Duration::hours(1));
        r.key_algorithm = alg;
        r
    };
    for alg in KeyAlgorithm::ALL {
        let key = leasehold_certs::generate_key(alg).unwrap();
        let csr = leasehold_certs::csr_for(&key, &request(alg)).unwrap();
        check_csr_key_algorithm(&csr, alg).unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        for other in KeyAlgorithm::ALL.into_iter().filter(|o| *o != alg) {
            let err = check_csr_key_algorithm(&csr, other).unwrap_err();
            assert!(err.to_string().contains("not the requested"), "{err}");
        }
    }
    // The CA refuses to sign it too.
    let ca = CertificateAuthority::self_signed(
        "test CA",
        KeyAlgorithm::EcdsaP256,
        time::OffsetDateTime::now_utc(),
        time::Duration::days(1),
    )
    .unwrap();
    let key = leasehold_certs::generate_key(KeyAlgorithm::EcdsaP384).unwrap();
    let csr = leasehold_certs::csr_for(&key, &request(KeyAlgorithm::EcdsaP384)).unwrap();
    let err = ca
        .issue_from_csr(
            &request(KeyAlgorithm::EcdsaP256),
            &csr,
            time::OffsetDateTime::now_utc(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("384"), "{err}");
}
