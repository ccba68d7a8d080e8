//! Generated broker certificates: they verify against the generated CA for
//! every DNS name of the Service, in a real rustls handshake; renewal swaps
//! the certificate for new connections.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use jiff::Timestamp;
use leasehold_broker::BrokerTls;
use leasehold_broker::tls::{
    CertPem, TlsSettings, generate_ca, issue_serving_cert, needs_renewal, service_dns_names,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

/// Handshakes over an in-memory pipe; returns the server's leaf certificate.
async fn handshake(tls: &BrokerTls, ca_pem: &str, name: &str) -> Result<Vec<u8>, std::io::Error> {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(tls.server_config().unwrap());
    let server = tokio::spawn(async move {
        let mut stream = acceptor.accept(server_io).await?;
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await?;
        stream.write_all(&buf).await?;
        stream.flush().await?;
        Ok::<_, std::io::Error>(())
    });
    let mut stream = common::tls_connector(ca_pem)
        .connect(ServerName::try_from(name.to_owned()).unwrap(), client_io)
        .await?;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let leaf = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    stream.write_all(b"ping").await?;
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"ping");
    server.await.unwrap()?;
    Ok(leaf)
}

#[tokio::test]
async fn generated_certificate_verifies_for_every_service_name() {
    let settings = TlsSettings::new("leasehold-system", "leasehold-broker", "s", "c");
    let names = settings.dns_names();
    assert_eq!(
        names,
        service_dns_names("leasehold-broker", "leasehold-system")
    );
    assert_eq!(
        names[3],
        "leasehold-broker.leasehold-system.svc.cluster.local"
    );

    let now = Timestamp::now();
    let ca = generate_ca(now, settings.ca_validity).unwrap();
    let serving = issue_serving_cert(&ca.key, &names, now, settings.serving_validity).unwrap();
    assert!(!needs_renewal(serving.not_before, serving.not_after, now));
    let tls = BrokerTls::from_pem(&serving.pem, Some(ca.cert.clone())).unwrap();
    for name in &names {
        handshake(&tls, &ca.cert, name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // Not valid for other names, and not trusted by another CA.
    let err = handshake(&tls, &ca.cert, "leasehold-broker.other.svc").await;
    assert!(err.is_err());
    let other_ca = generate_ca(now, Duration::from_secs(3600)).unwrap();
    assert!(handshake(&tls, &other_ca.cert, &names[2]).await.is_err());
    assert!(!format!("{:?}", serving.pem).contains("PRIVATE KEY"));
}

#[tokio::test]
async fn renewal_from_the_stored_ca_and_hot_swap() {
    let names = service_dns_names("b", "ns");
    let now = Timestamp::now();
    let ca = generate_ca(now, Duration::from_secs(3600)).unwrap();
    let first = issue_serving_cert(&ca.key, &names, now, Duration::from_secs(600)).unwrap();
    let tls = BrokerTls::from_pem(&first.pem, Some(ca.cert.clone())).unwrap();
    let leaf1 = handshake(&tls, &ca.cert, "b.ns.svc").await.unwrap();

    // A third of the life left: renew, with only the CA key (as read back from the Secret).
    let later = now + jiff::SignedDuration::from_secs(401);
    assert!(needs_renewal(first.not_before, first.not_after, later));
    let stored_key = CertPem {
        cert: ca.cert.clone(),
        key: ca.key.clone(),
    };
    let second =
        issue_serving_cert(&stored_key.key, &names, now, Duration::from_secs(600)).unwrap();
    tls.reload(&second.pem).unwrap();
    let leaf2 = handshake(&tls, &ca.cert, "b.ns.svc").await.unwrap();
    assert_ne!(leaf1, leaf2, "new connections get the new certificate");

    // A broken certificate is refused and the old one stays.
    let broken = CertPem {
        cert: "not pem".into(),
        key: second.pem.key.clone(),
    };
    assert!(tls.reload(&broken).is_err());
    assert_eq!(handshake(&tls, &ca.cert, "b.ns").await.unwrap(), leaf2);
}
