//! Token verification against a local OIDC discovery + JWKS server.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use jsonwebtoken::{EncodingKey, Header};
use leasehold_auth::{
    Algorithm, AuthError, ConfigError, ExpectedPod, KeySource, PodField, TokenVerifier,
    VerifierConfig,
};
use serde_json::{Value, json};

fn config() -> VerifierConfig {
    VerifierConfig::new(AUDIENCE)
}

async fn server_with_all_keys() -> TestServer {
    TestServer::start(vec![RSA.jwk.clone(), EC.jwk.clone()]).await
}

async fn refuse(token: &str) -> AuthError {
    let server = server_with_all_keys().await;
    refuse_with(&server.verifier(config()), token, &expected_pod()).await
}

async fn refuse_with(verifier: &TokenVerifier, token: &str, expected: &ExpectedPod) -> AuthError {
    match verifier.verify_pod_token(token, expected).await {
        Ok(v) => panic!("token accepted: {v:?}"),
        Err(e) => {
            // Whatever the failure, the error never shows the token.
            assert_no_token(token, &format!("{e} {e:?}"));
            e
        }
    }
}

fn assert_no_token(token: &str, text: &str) {
    for part in token.split('.').filter(|p| p.len() >= 8) {
        assert!(!text.contains(part), "token part leaked into: {text}");
    }
}

fn with(mut claims: Value, path: &[&str], value: Value) -> Value {
    let mut target = &mut claims;
    for key in &path[..path.len() - 1] {
        target = target.get_mut(*key).unwrap();
    }
    target[path[path.len() - 1]] = value;
    claims
}

fn without(mut claims: Value, path: &[&str]) -> Value {
    let mut target = &mut claims;
    for key in &path[..path.len() - 1] {
        target = target.get_mut(*key).unwrap();
    }
    target.as_object_mut().unwrap().remove(path[path.len() - 1]);
    claims
}

#[tokio::test]
async fn accepts_valid_rs256_pod_token() {
    let server = server_with_all_keys().await;
    let verifier = server.verifier(config());
    let token = mint(&RSA, &pod_claims());
    let verified = verifier
        .verify_pod_token(&token, &expected_pod())
        .await
        .unwrap();
    assert_eq!(verified.namespace, NAMESPACE);
    assert_eq!(verified.pod_name, POD);
    assert_eq!(verified.pod_uid, POD_UID);
    assert_eq!(verified.service_account, SA);
    assert_eq!(verified.node_name.as_deref(), Some(NODE));
    let exp = pod_claims()["exp"].as_i64().unwrap();
    assert!((verified.expires_at.as_second() - exp).abs() <= 2);
    // Issuer came from discovery; keys from /openid/v1/jwks.
    assert_eq!(server.discovery_hits(), 1);
    assert_eq!(server.jwks_hits(), 1);
    // Cached: a second verification fetches nothing.
    verifier
        .verify_pod_token(&token, &expected_pod())
        .await
        .unwrap();
    assert_eq!(server.jwks_hits(), 1);
}

/// The API server serves `/openid/v1/jwks` only as `application/jwk-set+json` and
/// answers 406 to `Accept: application/json` alone (seen on kube-apiserver v1.32):
/// the key source must ask for the media type the server has.
#[tokio::test]
async fn key_set_is_requested_as_jwk_set_json() {
    assert!(
        !accepts_jwk_set(Some("application/json")),
        "the fake must refuse as the API server does"
    );
    let server = server_with_all_keys().await;
    let keys = server.key_source().jwks().await.expect("key set fetched");
    assert!(!keys.keys.is_empty());
    assert_eq!(server.jwks_hits(), 1);
}

#[tokio::test]
async fn accepts_valid_es256_pod_token() {
    let server = server_with_all_keys().await;
    let verifier = server.verifier(config());
    let token = mint(&EC, &pod_claims());
    let verified = verifier
        .verify_pod_token(&token, &expected_pod())
        .await
        .unwrap();
    assert_eq!(verified.pod_uid, POD_UID);
}

#[tokio::test]
async fn fixed_issuer_skips_discovery() {
    let server = server_with_all_keys().await;
    let verifier = server.verifier(config().with_issuer(ISSUER));
    let token = mint(&RSA, &pod_claims());
    verifier
        .verify_pod_token(&token, &expected_pod())
        .await
        .unwrap();
    assert_eq!(server.discovery_hits(), 0);

    let other = server.verifier(config().with_issuer("https://other.example"));
    let e = refuse_with(&other, &token, &expected_pod()).await;
    assert!(matches!(e, AuthError::WrongIssuer), "{e:?}");
}

#[tokio::test]
async fn service_account_token_reports_identity_and_bindings() {
    let server = server_with_all_keys().await;
    let verifier = server.verifier(config());
    let sa = verifier
        .verify_service_account_token(&mint(&RSA, &pod_claims()))
        .await
        .unwrap();
    assert_eq!(
        (sa.namespace.as_str(), sa.name.as_str(), sa.uid.as_str()),
        (NAMESPACE, SA, SA_UID)
    );
    assert_eq!(sa.pod.as_ref().map(|p| p.uid.as_str()), Some(POD_UID));
    assert_eq!(sa.node.as_ref().map(|n| n.name.as_str()), Some(NODE));

    // A node driver's own token: bound to nothing but a node.
    let unbound = without(pod_claims(), &["kubernetes.io", "pod"]);
    let sa = verifier
        .verify_service_account_token(&mint(&RSA, &unbound))
        .await
        .unwrap();
    assert!(sa.pod.is_none());
}

#[tokio::test]
async fn refuses_expired() {
    let now = now();
    let claims = with(pod_claims(), &["exp"], json!(now - 31));
    let claims = with(claims, &["iat"], json!(now - 3600));
    let claims = with(claims, &["nbf"], json!(now - 3600));
    let e = refuse(&mint(&RSA, &claims)).await;
    assert!(matches!(e, AuthError::Expired), "{e:?}");
    assert!(e.is_unauthenticated());
}

#[tokio::test]
async fn accepts_within_leeway() {
    let server = server_with_all_keys().await;
    let verifier = server.verifier(config());
    let claims = with(pod_claims(), &["exp"], json!(now() - 10));
    verifier
        .verify_pod_token(&mint(&RSA, &claims), &expected_pod())
        .await
        .unwrap();
}

#[tokio::test]
async fn refuses_not_yet_valid() {
    let claims = with(pod_claims(), &["nbf"], json!(now() + 120));
    let e = refuse(&mint(&RSA, &claims)).await;
    assert!(matches!(e, AuthError::NotYetValid), "{e:?}");

    let claims = with(pod_claims(), &["iat"], json!(now() + 120));
    let e = refuse(&mint(&RSA, &claims)).await;
    assert!(matches!(e, AuthError::NotYetValid), "{e:?}");
}

#[tokio::test]
async fn refuses_missing_exp() {
    let e = refuse(&mint(&RSA, &without(pod_claims(), &["exp"]))).await;
    assert!(matches!(e, AuthError::Malformed(_)), "{e:?}");
}

#[tokio::test]
async fn refuses_wrong_audience() {
    let claims = with(
        pod_claims(),
        &["aud"],
        json!(["https://kubernetes.default.svc"]),
    );
    let e = refuse(&mint(&RSA, &claims)).await;
    assert!(matches!(e, AuthError::WrongAudience), "{e:?}");

    // A single-string aud is accepted when it matches.
    let server = server_with_all_keys().await;
    let claims = with(pod_claims(), &["aud"], json!(AUDIENCE));
    server
        .verifier(config())
        .verify_pod_token(&mint(&RSA, &claims), &expected_pod())
        .await
        .unwrap();
}

#[tokio::test]
async fn refuses_wrong_issuer() {
    let claims = with(pod_claims(), &["iss"], json!("https://evil.example"));
    let e = refuse(&mint(&RSA, &claims)).await;
    assert!(matches!(e, AuthError::WrongIssuer), "{e:?}");
}

#[tokio::test]
async fn refuses_missing_issuer_or_audience() {
    let e = refuse(&mint(&RSA, &without(pod_claims(), &["iss"]))).await;
    assert!(matches!(e, AuthError::WrongIssuer), "{e:?}");
    let e = refuse(&mint(&RSA, &without(pod_claims(), &["aud"]))).await;
    assert!(matches!(e, AuthError::WrongAudience), "{e:?}");
    let e = refuse(&mint(&RSA, &with(pod_claims(), &["aud"], json!([])))).await;
    assert!(matches!(e, AuthError::WrongAudience), "{e:?}");
    let e = refuse(&mint(&RSA, &with(pod_claims(), &["nbf"], json!("soon")))).await;
    assert!(matches!(e, AuthError::Malformed(_)), "{e:?}");
}

#[tokio::test]
async fn huge_leeway_does_not_overflow() {
    let server = server_with_all_keys().await;
    let mut cfg = config();
    cfg.leeway = Duration::MAX;
    let claims = with(pod_claims(), &["nbf"], json!(now() + 120));
    server
        .verifier(cfg)
        .verify_pod_token(&mint(&RSA, &claims), &expected_pod())
        .await
        .unwrap();
}

#[tokio::test]
async fn refuses_token_of_another_pod() {
    let server = server_with_all_keys().await;
    let verifier = server.verifier(config());
    let token = mint(&RSA, &pod_claims());
    let cases = [
        (
            ExpectedPod {
                pod_uid: "00000000-0000-4000-8000-000000000000".into(),
                ..expected_pod()
            },
            PodField::PodUid,
        ),
        (
            ExpectedPod {
                pod_name: "web-other".into(),
                ..expected_pod()
            },
            PodField::PodName,
        ),
        (
            ExpectedPod {
                namespace: "other".into(),
                ..expected_pod()
            },
            PodField::Namespace,
        ),
        (
            ExpectedPod {
                service_account: "admin".into(),
                ..expected_pod()
            },
            PodField::ServiceAccount,
        ),
    ];
    for (expected, field) in cases {
        let e = refuse_with(&verifier, &token, &expected).await;
        assert!(
            matches!(&e, AuthError::PodMismatch { field: f } if *f == field),
            "{field:?}: {e:?}"
        );
        assert!(e.is_permission_denied());
        // Display names the field but not the values.
        let shown = e.to_string();
        assert!(
            !shown.contains(POD_UID) && !shown.contains("00000000"),
            "{shown}"
        );
    }
}

#[tokio::test]
async fn refuses_token_not_bound_to_a_pod() {
    let claims = without(pod_claims(), &["kubernetes.io", "pod"]);
    let e = refuse(&mint(&RSA, &claims)).await;
    assert!(matches!(e, AuthError::NotBoundToPod), "{e:?}");
    assert!(e.is_permission_denied());
}

#[tokio::test]
async fn refuses_inconsistent_or_missing_identity() {
    // sub names another service account than the kubernetes.io claim.
    let claims = with(
        pod_claims(),
        &["sub"],
        json!(format!("system:serviceaccount:{NAMESPACE}:admin")),
    );
    let e = refuse(&mint(&RSA, &claims)).await;
    assert!(matches!(e, AuthError::NotServiceAccountToken(_)), "{e:?}");

    let claims = with(pod_claims(), &["sub"], json!("system:node:node-a"));
    let e = refuse(&mint(&RSA, &claims)).await;
    assert!(matches!(e, AuthError::NotServiceAccountToken(_)), "{e:?}");

    let claims = without(pod_claims(), &["kubernetes.io"]);
    let e = refuse(&mint(&RSA, &claims)).await;
    assert!(matches!(e, AuthError::NotServiceAccountToken(_)), "{e:?}");
}

#[tokio::test]
async fn refuses_tampered_payload() {
    let token = mint(&RSA, &pod_claims());
    let parts: Vec<&str> = token.split('.').collect();
    let forged = with(
        pod_claims(),
        &["kubernetes.io", "pod", "uid"],
        json!("attacker"),
    );
    let forged_payload = base64_url(&forged.to_string());
    let tampered = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
    let server = server_with_all_keys().await;
    let expected = ExpectedPod {
        pod_uid: "attacker".into(),
        ..expected_pod()
    };
    let e = refuse_with(&server.verifier(config()), &tampered, &expected).await;
    assert!(matches!(e, AuthError::BadSignature), "{e:?}");
}

#[tokio::test]
async fn refuses_tampered_signature() {
    for key in [&*RSA, &*EC] {
        let token = mint(key, &pod_claims());
        let mut bytes = token.into_bytes();
        let i = bytes.len() - 10;
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        let e = refuse(&tampered).await;
        assert!(matches!(e, AuthError::BadSignature), "{e:?}");
    }
}

#[tokio::test]
async fn refuses_alg_none() {
    for alg in ["none", "None", "NONE"] {
        let token = assemble(&json!({"alg": alg, "kid": RSA.kid}), &pod_claims(), b"");
        let e = refuse(&token).await;
        assert!(matches!(e, AuthError::AlgorithmNotAllowed { .. }), "{e:?}");
        assert!(token.ends_with('.'));
    }
}

#[tokio::test]
async fn refuses_hs256_signed_with_the_rsa_public_key() {
    // The classic confusion: HMAC keyed with the public key the verifier holds.
    let public_pem = RSA.public_pem.clone().unwrap();
    let mut header = Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(RSA.kid.clone());
    for secret in [
        public_pem.as_bytes(),
        RSA.jwk["n"].as_str().unwrap().as_bytes(),
    ] {
        let token = jsonwebtoken::encode(&header, &pod_claims(), &EncodingKey::from_secret(secret))
            .unwrap();
        let e = refuse(&token).await;
        assert!(matches!(e, AuthError::AlgorithmNotAllowed { .. }), "{e:?}");
    }
    // Even a verifier that allows every algorithm it knows refuses HMAC.
    let server = server_with_all_keys().await;
    let mut everything = config();
    everything.allowed_algorithms = Algorithm::ALL.to_vec();
    let token = jsonwebtoken::encode(
        &header,
        &pod_claims(),
        &EncodingKey::from_secret(public_pem.as_bytes()),
    )
    .unwrap();
    let e = refuse_with(&server.verifier(everything), &token, &expected_pod()).await;
    assert!(matches!(e, AuthError::AlgorithmNotAllowed { .. }), "{e:?}");
}

#[tokio::test]
async fn refuses_header_alg_that_does_not_fit_the_key() {
    // RS256 header naming the EC key (signed with the RSA key).
    let mut header = Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(EC.kid.clone());
    let token = jsonwebtoken::encode(&header, &pod_claims(), &RSA.encoding).unwrap();
    let e = refuse(&token).await;
    assert!(matches!(e, AuthError::AlgorithmKeyMismatch { .. }), "{e:?}");

    // ES256 header naming the RSA key.
    let mut header = Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(RSA.kid.clone());
    let token = jsonwebtoken::encode(&header, &pod_claims(), &EC.encoding).unwrap();
    let e = refuse(&token).await;
    assert!(matches!(e, AuthError::AlgorithmKeyMismatch { .. }), "{e:?}");

    // PS256 (allowed here) with a JWK that pins RS256: same key type, wrong alg.
    let server = server_with_all_keys().await;
    let mut cfg = config();
    cfg.allowed_algorithms = vec![Algorithm::RS256, Algorithm::PS256];
    let mut header = Header::new(jsonwebtoken::Algorithm::PS256);
    header.kid = Some(RSA.kid.clone());
    let token = jsonwebtoken::encode(&header, &pod_claims(), &RSA.encoding).unwrap();
    let e = refuse_with(&server.verifier(cfg), &token, &expected_pod()).await;
    assert!(matches!(e, AuthError::AlgorithmKeyMismatch { .. }), "{e:?}");
}

#[tokio::test]
async fn refuses_algorithms_outside_the_allowed_set() {
    let server = server_with_all_keys().await;
    let mut cfg = config();
    cfg.allowed_algorithms = vec![Algorithm::RS256];
    let e = refuse_with(
        &server.verifier(cfg),
        &mint(&EC, &pod_claims()),
        &expected_pod(),
    )
    .await;
    assert!(matches!(e, AuthError::AlgorithmNotAllowed { .. }), "{e:?}");
}

#[tokio::test]
async fn refuses_malformed_tokens() {
    let server = server_with_all_keys().await;
    let verifier = server.verifier(config());
    let good = mint(&RSA, &pod_claims());
    let parts: Vec<&str> = good.split('.').collect();
    let too_long = format!("{}.{}.{}", parts[0], "A".repeat(20_000), parts[2]);
    let four_parts = format!("{good}.{}", parts[2]);
    let not_json_header = format!("{}.{}.{}", base64_url("not json"), parts[1], parts[2]);
    let padded = format!("{}=.{}.{}", parts[0], parts[1], parts[2]);
    let crit = assemble(
        &json!({"alg": "RS256", "kid": RSA.kid, "crit": ["exp"], "exp": 1}),
        &pod_claims(),
        b"sig",
    );
    for token in [
        "",
        ".",
        "..",
        "abc",
        "a.b",
        "a.b.c",
        &too_long,
        &four_parts,
        &not_json_header,
        &padded,
        &crit,
    ] {
        let e = refuse_with(&verifier, token, &expected_pod()).await;
        assert!(matches!(e, AuthError::Malformed(_)), "{token:.40}: {e:?}");
        assert!(e.is_unauthenticated());
    }
}

#[tokio::test]
async fn config_is_validated() {
    let server = server_with_all_keys().await;
    let err = |c| TokenVerifier::new(c, server.key_source()).err();
    assert_eq!(
        err(VerifierConfig::new("")),
        Some(ConfigError::EmptyAudience)
    );
    assert_eq!(
        err(config().with_issuer("")),
        Some(ConfigError::EmptyIssuer)
    );
    let mut none = config();
    none.allowed_algorithms.clear();
    assert_eq!(err(none), Some(ConfigError::NoAlgorithms));
}

#[tokio::test]
async fn unknown_key_is_refetched_at_most_once_per_interval() {
    let server = TestServer::start(vec![RSA.jwk.clone()]).await;
    let mut cfg = config();
    cfg.min_refetch_interval = Duration::from_millis(1500);
    let verifier = server.verifier(cfg);
    verifier
        .verify_pod_token(&mint(&RSA, &pod_claims()), &expected_pod())
        .await
        .unwrap();
    assert_eq!(server.jwks_hits(), 1);

    // A token signed with a key the server does not publish yet.
    let rotated = mint(&RSA_2, &pod_claims());
    let e = refuse_with(&verifier, &rotated, &expected_pod()).await;
    assert!(
        matches!(&e, AuthError::UnknownKey { kid: Some(k) } if k.as_str() == "rsa-2"),
        "{e:?}"
    );
    assert!(e.is_unauthenticated());

    // The server rotates keys; within the interval nothing is fetched.
    server.set_keys(vec![RSA.jwk.clone(), RSA_2.jwk.clone()]);
    for _ in 0..20 {
        let e = refuse_with(&verifier, &rotated, &expected_pod()).await;
        assert!(matches!(e, AuthError::UnknownKey { .. }), "{e:?}");
    }
    assert_eq!(server.jwks_hits(), 1);

    // After the interval the unknown kid triggers one refetch and is accepted.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    verifier
        .verify_pod_token(&rotated, &expected_pod())
        .await
        .unwrap();
    assert_eq!(server.jwks_hits(), 2);
    verifier
        .verify_pod_token(&rotated, &expected_pod())
        .await
        .unwrap();
    assert_eq!(server.jwks_hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_unknown_kid_callers_share_one_fetch() {
    let server = TestServer::start(vec![RSA.jwk.clone()]).await;
    let mut cfg = config();
    cfg.min_refetch_interval = Duration::from_secs(3600);
    let verifier = Arc::new(server.verifier(cfg));
    let unknown = Arc::new(mint(&RSA_2, &pod_claims()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let verifier = Arc::clone(&verifier);
        let unknown = Arc::clone(&unknown);
        tasks.spawn(async move { verifier.verify_pod_token(&unknown, &expected_pod()).await });
    }
    while let Some(result) = tasks.join_next().await {
        let e = result.unwrap().unwrap_err();
        assert!(matches!(e, AuthError::UnknownKey { .. }), "{e:?}");
    }
    // The first caller loaded the set; nobody refetched for the unknown kid.
    assert_eq!(server.jwks_hits(), 1);
    assert_eq!(server.discovery_hits(), 1);
    // Known keys keep working from the cache.
    verifier
        .verify_pod_token(&mint(&RSA, &pod_claims()), &expected_pod())
        .await
        .unwrap();
    assert_eq!(server.jwks_hits(), 1);
}

#[tokio::test]
async fn failed_refetch_keeps_the_cached_keys() {
    let server = TestServer::start(vec![RSA.jwk.clone()]).await;
    let mut cfg = config();
    cfg.min_refetch_interval = Duration::from_millis(100);
    let verifier = server.verifier(cfg);
    let good = mint(&RSA, &pod_claims());
    verifier
        .verify_pod_token(&good, &expected_pod())
        .await
        .unwrap();

    server.set_failing(true);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let e = refuse_with(&verifier, &mint(&RSA_2, &pod_claims()), &expected_pod()).await;
    assert!(matches!(e, AuthError::UnknownKey { .. }), "{e:?}");
    assert_eq!(server.jwks_hits(), 2);
    // The old key still verifies.
    verifier
        .verify_pod_token(&good, &expected_pod())
        .await
        .unwrap();
}

#[tokio::test]
async fn unavailable_keys_are_reported_and_not_hammered() {
    let server = TestServer::start(vec![RSA.jwk.clone()]).await;
    server.set_failing(true);
    let verifier = server.verifier(config());
    let token = mint(&RSA, &pod_claims());
    for _ in 0..5 {
        let e = refuse_with(&verifier, &token, &expected_pod()).await;
        assert!(matches!(e, AuthError::KeysUnavailable(_)), "{e:?}");
        assert!(e.is_unavailable());
    }
    assert_eq!(server.jwks_hits(), 1);
    assert!(verifier.refresh_keys().await.is_err());
    assert_eq!(server.jwks_hits(), 1);
}

#[tokio::test]
async fn stale_keys_are_refreshed_and_removed_keys_stop_working() {
    let server = TestServer::start(vec![RSA.jwk.clone(), RSA_2.jwk.clone()]).await;
    let mut cfg = config();
    cfg.min_refetch_interval = Duration::from_millis(50);
    cfg.max_key_age = Duration::from_millis(100);
    let verifier = server.verifier(cfg);
    let old = mint(&RSA_2, &pod_claims());
    verifier.refresh_keys().await.unwrap();
    verifier
        .verify_pod_token(&old, &expected_pod())
        .await
        .unwrap();

    server.set_keys(vec![RSA.jwk.clone()]);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let e = refuse_with(&verifier, &old, &expected_pod()).await;
    assert!(matches!(e, AuthError::UnknownKey { .. }), "{e:?}");
    verifier
        .verify_pod_token(&mint(&RSA, &pod_claims()), &expected_pod())
        .await
        .unwrap();
}

fn base64_url(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

#[tokio::test]
async fn jwks_location_from_discovery_uses_only_the_path() {
    // Discovery names an unreachable external host; only its path is used,
    // requested from the API server the client points at.
    let server = server_with_all_keys().await;
    let source = server
        .key_source()
        .with_jwks_location(leasehold_auth::JwksLocation::FromDiscovery);
    let verifier = TokenVerifier::new(config(), source).unwrap();
    verifier
        .verify_pod_token(&mint(&RSA, &pod_claims()), &expected_pod())
        .await
        .unwrap();
    assert_eq!(server.jwks_hits(), 1);
}

#[tokio::test]
async fn keys_without_alg_or_use_are_accepted_for_their_key_type() {
    let mut rsa = RSA.jwk.clone();
    rsa.as_object_mut().unwrap().remove("alg");
    rsa.as_object_mut().unwrap().remove("use");
    let mut enc = EC.jwk.clone();
    enc["use"] = json!("enc");
    let server = TestServer::start(vec![rsa, enc]).await;
    let verifier = server.verifier(config());
    verifier
        .verify_pod_token(&mint(&RSA, &pod_claims()), &expected_pod())
        .await
        .unwrap();
    // An encryption key is never used to verify signatures.
    let e = refuse_with(&verifier, &mint(&EC, &pod_claims()), &expected_pod()).await;
    assert!(matches!(e, AuthError::UnknownKey { .. }), "{e:?}");
}
