//! Verifications per second on one thread with cached keys.
//!
//! `cargo bench -p leasehold-auth --bench verify` (release profile). Set
//! `AUTH_BENCH_SECS` to change the measuring time per case (default 3).
#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use aws_lc_rs::signature::{self, UnparsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use leasehold_auth::{JwkSet, StaticKeySource, TokenVerifier, VerifierConfig};
use serde_json::json;

fn main() {
    let secs: u64 = std::env::var("AUTH_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let measure = Duration::from_secs(secs);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let rsa = rsa_key("bench-rsa");
    let ec = ec_key("bench-ec");
    let jwks: JwkSet =
        serde_json::from_value(json!({ "keys": [rsa.jwk.clone(), ec.jwk.clone()] })).unwrap();
    let verifier = TokenVerifier::new(
        VerifierConfig::new(AUDIENCE),
        StaticKeySource::new(ISSUER, jwks),
    )
    .unwrap();
    let expected = expected_pod();

    println!("one thread, cached keys, {secs} s per case");
    for (name, key) in [("RS256", &rsa), ("ES256", &ec)] {
        let token = mint(key, &pod_claims());
        let rate = runtime.block_on(async {
            // Warm the cache (first call fetches from the static source).
            for _ in 0..1000 {
                verifier.verify_pod_token(&token, &expected).await.unwrap();
            }
            run_for(measure, || async {
                verifier.verify_pod_token(&token, &expected).await.unwrap();
            })
            .await
        });
        report(name, "verify_pod_token", rate);

        let rate = runtime.block_on(run_for(measure, || async {
            verifier.verify_service_account_token(&token).await.unwrap();
        }));
        report(name, "verify_service_account_token", rate);

        // Baseline: the signature check alone, key parsed on every call.
        let (signing_input, sig_b64) = token.rsplit_once('.').unwrap();
        let sig = URL_SAFE_NO_PAD.decode(sig_b64).unwrap();
        let public = public_key_der(name, key);
        let alg: &'static dyn signature::VerificationAlgorithm = if name == "RS256" {
            &signature::RSA_PKCS1_2048_8192_SHA256
        } else {
            &signature::ECDSA_P256_SHA256_FIXED
        };
        let unparsed = UnparsedPublicKey::new(alg, &public);
        let rate = runtime.block_on(run_for(measure, || async {
            unparsed.verify(signing_input.as_bytes(), &sig).unwrap();
        }));
        report(name, "signature only, key parsed per call", rate);
    }
}

fn report(alg: &str, case: &str, rate: f64) {
    println!("{alg} {case:<38} {rate:>9.0} verifications/s");
}

/// The key as aws-lc-rs's unparsed verifier takes it: PKCS#1 RSAPublicKey or
/// an uncompressed EC point.
fn public_key_der(name: &str, key: &TestKey) -> Vec<u8> {
    let b64 = |member: &str| {
        URL_SAFE_NO_PAD
            .decode(key.jwk[member].as_str().unwrap())
            .unwrap()
    };
    if name == "RS256" {
        der_rsa_public_key(&b64("n"), &b64("e"))
    } else {
        let mut point = vec![0x04];
        point.extend(b64("x"));
        point.extend(b64("y"));
        point
    }
}

fn der_rsa_public_key(n: &[u8], e: &[u8]) -> Vec<u8> {
    fn integer(bytes: &[u8]) -> Vec<u8> {
        let mut value = Vec::new();
        if bytes[0] & 0x80 != 0 {
            value.push(0);
        }
        value.extend_from_slice(bytes);
        tlv(0x02, &value)
    }
    fn tlv(tag: u8, value: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = value.len();
        if len < 0x80 {
            out.push(len as u8);
        } else if len < 0x100 {
            out.extend([0x81, len as u8]);
        } else {
            out.extend([0x82, (len >> 8) as u8, len as u8]);
        }
        out.extend_from_slice(value);
        out
    }
    let mut body = integer(n);
    body.extend(integer(e));
    tlv(0x30, &body)
}

async fn run_for<F, Fut>(measure: Duration, mut f: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let start = Instant::now();
    let mut count: u64 = 0;
    loop {
        for _ in 0..256 {
            f().await;
        }
        count += 256;
        let elapsed = start.elapsed();
        if elapsed >= measure {
            return count as f64 / elapsed.as_secs_f64();
        }
    }
}
