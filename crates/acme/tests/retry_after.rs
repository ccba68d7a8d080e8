//! A problem document's Retry-After reaches the error: a scripted HTTPS server
//! answers new-account with 429 rateLimited and `Retry-After: 120`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use leasehold_acme::{AccountRequest, AcmeAccount, AcmeError, Directory, RATE_LIMITED, TrustRoots};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn tls_material() -> (String, rustls::ServerConfig) {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("cert");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .expect("server config");
    (ca.pem(), config)
}

/// Reads one request (head plus Content-Length body); returns its first line.
async fn read_request<S: AsyncReadExt + Unpin>(stream: &mut S) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.expect("read") == 0 {
            break;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.expect("body");
    head.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn rate_limit_problem_carries_retry_after() {
    let (ca_pem, server_config) = tls_material();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().expect("addr").port()
    );
    let directory_json = format!(
        r#"{{"newNonce":"{base}/nonce","newAccount":"{base}/account","newOrder":"{base}/order"}}"#
    );
    let server = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut tls = acceptor.accept(tcp).await.expect("handshake");
            let line = read_request(&mut tls).await;
            let (status, headers, body) = if line.starts_with("GET /dir") {
                (
                    "200 OK",
                    "Content-Type: application/json\r\n",
                    directory_json.clone(),
                )
            } else if line.starts_with("HEAD /nonce") {
                ("200 OK", "Replay-Nonce: bm9uY2U\r\n", String::new())
            } else {
                (
                    "429 Too Many Requests",
                    "Content-Type: application/problem+json\r\nRetry-After: 120\r\nReplay-Nonce: bm9uY2U\r\n",
                    format!(
                        r#"{{"type":"{RATE_LIMITED}","detail":"too many new accounts","status":429}}"#
                    ),
                )
            };
            let rsp = format!(
                "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            tls.write_all(rsp.as_bytes()).await.expect("write");
            let _ = tls.shutdown().await;
        }
    });

    let before = SystemTime::now();
    let err = AcmeAccount::create(
        &Directory {
            url: format!("{base}/dir"),
            trust: TrustRoots::Pem(ca_pem),
        },
        &AccountRequest::default(),
    )
    .await
    .expect_err("rate limited");
    server.abort();
    let AcmeError::RateLimited { problem } = &err else {
        panic!("expected RateLimited, got {err:?}");
    };
    assert_eq!(problem.kind.as_deref(), Some(RATE_LIMITED));
    assert_eq!(problem.detail.as_deref(), Some("too many new accounts"));
    assert_eq!(problem.status, Some(429));
    let retry_after = err.retry_after().expect("Retry-After kept");
    let wait = retry_after.duration_since(before).expect("in the future");
    assert!(
        wait >= Duration::from_secs(119) && wait <= Duration::from_secs(130),
        "{wait:?}"
    );
    assert!(err.to_string().contains("rateLimited"), "{err}");

    // Behind the issuer interface: RateLimited with the CA's wait as a duration.
    match leasehold_acme::issuer_error(err) {
        leasehold_certs::IssuerError::RateLimited {
            detail,
            retry_after: Some(wait),
        } => {
            assert!(detail.contains("too many new accounts"), "{detail}");
            assert!(
                wait <= Duration::from_secs(120) && wait >= Duration::from_secs(60),
                "{wait:?}"
            );
        }
        other => panic!("expected RateLimited with retry_after, got {other:?}"),
    }
}
