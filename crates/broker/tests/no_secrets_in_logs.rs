//! Every log line of the broker, at TRACE, while it issues, refuses and
//! releases: no token and no credential may appear.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::*;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn no_token_or_credential_in_logs() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let mut b = start().await;
    let web = web();
    let node = node_token();
    let pod = pod_token(&web);
    let expired = pod_token_exp(&web, -600);
    let stranger = node_token_for("shop", "web", Some(NODE));
    let mut secrets = vec![node.clone(), pod.clone(), expired.clone(), stranger.clone()];

    let ok = b
        .client
        .issue(with_token(issue_request(&web, "db", &pod), Some(&node)))
        .await
        .unwrap()
        .into_inner();
    for content in ok.files.values() {
        secrets.push(String::from_utf8(content.clone()).unwrap());
    }
    let _ = b
        .client
        .issue(with_token(issue_request(&web, "db", &expired), Some(&node)))
        .await
        .unwrap_err();
    let _ = b
        .client
        .issue(with_token(issue_request(&web, "db", &pod), Some(&stranger)))
        .await
        .unwrap_err();
    let other = pod_id("shop", "api-0", "api");
    let _ = b
        .client
        .issue(with_token(
            issue_request(&web, "db", &pod_token(&other)),
            Some(&node),
        ))
        .await
        .unwrap_err();
    b.client
        .acknowledge(with_token(ack_request(&web, "db", 3), Some(&node)))
        .await
        .unwrap();
    b.client
        .release(with_token(release_request(&web, "db"), Some(&node)))
        .await
        .unwrap();

    // A certificate volume: the key is made here (the node's side) and must not
    // reach the broker's logs, which see only the CSR.
    let profile = b
        .client
        .issue(with_token(issue_request(&web, "cert", &pod), Some(&node)))
        .await
        .unwrap()
        .into_inner()
        .certificate
        .unwrap();
    let request = leasehold_certs::CertificateRequest {
        dns_names: profile.dns_names.clone(),
        uris: profile.uris.clone(),
        usages: vec![
            leasehold_certs::Usage::ServerAuth,
            leasehold_certs::Usage::ClientAuth,
            leasehold_certs::Usage::DigitalSignature,
        ],
        ..leasehold_certs::CertificateRequest::server(
            &profile.common_name,
            &[],
            time::Duration::hours(1),
        )
    };
    let key = leasehold_certs::generate_key(leasehold_certs::KeyAlgorithm::EcdsaP256).unwrap();
    let csr = leasehold_certs::csr_for(&key, &request).unwrap();
    b.client
        .issue_certificate(with_token(
            issue_certificate_request(&web, "cert", &pod, &csr),
            Some(&node),
        ))
        .await
        .unwrap();
    let _ = b
        .client
        .issue_certificate(with_token(
            issue_certificate_request(&web, "cert", &expired, &csr),
            Some(&node),
        ))
        .await
        .unwrap_err();
    b.client
        .release(with_token(release_request(&web, "cert"), Some(&node)))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("broker.issue"), "spans are logged:\n{logs}");
    assert!(
        logs.contains("broker call refused"),
        "refusals are logged:\n{logs}"
    );
    assert!(!logs.contains(V3_PASSWORD), "password in logs:\n{logs}");
    assert!(logs.contains("broker.issue_certificate"), "{logs}");
    assert!(
        !logs.contains("PRIVATE KEY"),
        "a private key in logs:\n{logs}"
    );
    let key_body: String = key
        .expose()
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(!logs.contains(&key_body[..40]), "key material in logs");
    for secret in &secrets {
        // Each JWT part is long and random enough to be a unique marker.
        for part in secret.split('.').filter(|p| p.len() > 16) {
            assert!(
                !logs.contains(part),
                "a secret appears in the logs:\n{logs}"
            );
        }
        assert!(!logs.contains(secret.as_str()));
    }
}
