//! Captures every log line at TRACE while tokens are verified and refused, and
//! checks that no token (nor any of its three parts) shows up in the logs, in
//! an error's Display or Debug, or in the Debug of the verifier.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use jsonwebtoken::{EncodingKey, Header};
use leasehold_auth::{ExpectedPod, ServiceAccountToken, VerifierConfig};
use serde_json::json;

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn leaks<'a>(token: &'a str, text: &str) -> Vec<&'a str> {
    token
        .split('.')
        .filter(|part| part.len() >= 8 && text.contains(*part))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_reach_logs_or_errors() {
    let buffer = Buffer::default();
    let writer = buffer.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let server = TestServer::start(vec![RSA.jwk.clone(), EC.jwk.clone()]).await;
    let mut config = VerifierConfig::new(AUDIENCE);
    config.min_refetch_interval = Duration::from_millis(20);
    let verifier = server.verifier(config);

    let now = now();
    let mut hs_header = Header::new(jsonwebtoken::Algorithm::HS256);
    hs_header.kid = Some(RSA.kid.clone());
    let mut tampered = mint(&RSA, &pod_claims()).into_bytes();
    let i = tampered.len() - 10;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };

    let mut tokens = vec![
        mint(&RSA, &pod_claims()),
        mint(&EC, &pod_claims()),
        mint(&RSA, &{
            let mut c = pod_claims();
            c["exp"] = json!(now - 600);
            c
        }),
        mint(&RSA, &{
            let mut c = pod_claims();
            c["aud"] = json!(["other"]);
            c
        }),
        mint(&RSA, &{
            let mut c = pod_claims();
            c["iss"] = json!("https://evil.example");
            c
        }),
        mint(&RSA_2, &pod_claims()),
        String::from_utf8(tampered).unwrap(),
        assemble(&json!({"alg": "none", "kid": RSA.kid}), &pod_claims(), b""),
        jsonwebtoken::encode(
            &hs_header,
            &pod_claims(),
            &EncodingKey::from_secret(RSA.public_pem.as_deref().unwrap().as_bytes()),
        )
        .unwrap(),
    ];
    // Garbage that still looks like a token, with long parts.
    tokens.push(format!(
        "{}.{}.{}",
        "x".repeat(40),
        "y".repeat(40),
        "z".repeat(40)
    ));

    let wrong_pod = ExpectedPod {
        pod_uid: "not-the-uid".into(),
        ..expected_pod()
    };
    let mut texts = vec![format!("{verifier:?}")];
    for (round, token) in tokens.iter().enumerate() {
        // Make a failing key fetch part of the run too.
        server.set_failing(round % 3 == 2);
        tokio::time::sleep(Duration::from_millis(25)).await;
        for expected in [&expected_pod(), &wrong_pod] {
            match verifier.verify_pod_token(token, expected).await {
                Ok(v) => texts.push(format!("{v:?}")),
                Err(e) => texts.push(format!("{e} | {e:?} | {:?}", e.class())),
            }
        }
        match verifier.verify_service_account_token(token).await {
            Ok(v) => texts.push(format!("{v:?}")),
            Err(e) => texts.push(format!("{e} | {e:?}")),
        }
        texts.push(format!("{:?}", ServiceAccountToken::new(token.clone())));
    }

    let logs = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    // The capture works: verification events were logged.
    assert!(logs.contains("token refused"), "no log captured:\n{logs}");
    for token in &tokens {
        let leaked = leaks(token, &logs);
        assert!(leaked.is_empty(), "token part leaked into logs: {leaked:?}");
        for text in &texts {
            let leaked = leaks(token, text);
            assert!(leaked.is_empty(), "token part leaked into {text}");
        }
    }
}
