//! Test fixtures: freshly generated keys, a local OIDC/JWKS server, a token minter.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _, RsaKeyPair,
};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use leasehold_auth::{ExpectedPod, HttpKeySource, TokenVerifier, VerifierConfig};
use serde_json::{Value, json};

pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
pub const AUDIENCE: &str = "csi.leasehold.dev";
pub const NAMESPACE: &str = "shop";
pub const POD: &str = "web-7d9f8-abcde";
pub const POD_UID: &str = "3c2f1e0a-5b6d-4e7f-8a9b-0c1d2e3f4a5b";
pub const SA: &str = "web";
pub const SA_UID: &str = "9a8b7c6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d";
pub const NODE: &str = "node-a";
pub const NODE_UID: &str = "11111111-2222-4333-8444-555555555555";

/// A signing key and its public JWK.
pub struct TestKey {
    pub kid: String,
    pub alg: Algorithm,
    pub encoding: EncodingKey,
    pub jwk: Value,
    /// PEM of the public key (RSA only): the "secret" an alg-confusion attack uses.
    pub public_pem: Option<String>,
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

pub fn rsa_key(kid: &str) -> TestKey {
    let pair = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
    let pkcs8 = pair.as_der().unwrap();
    let encoding =
        EncodingKey::from_rsa_pem(pem("PRIVATE KEY", pkcs8.as_ref()).as_bytes()).unwrap();
    let public = pair.public_key();
    let n = URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero());
    let e = URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero());
    let spki = public.as_der().unwrap();
    TestKey {
        kid: kid.to_owned(),
        alg: Algorithm::RS256,
        encoding,
        jwk: json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": n, "e": e}),
        public_pem: Some(pem("PUBLIC KEY", spki.as_ref())),
    }
}

pub fn ec_key(kid: &str) -> TestKey {
    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let pkcs8 = pair.to_pkcs8v1().unwrap();
    let encoding = EncodingKey::from_ec_der(pkcs8.as_ref());
    let point = pair.public_key().as_ref();
    assert_eq!(point.len(), 65);
    let x = URL_SAFE_NO_PAD.encode(&point[1..33]);
    let y = URL_SAFE_NO_PAD.encode(&point[33..]);
    TestKey {
        kid: kid.to_owned(),
        alg: Algorithm::ES256,
        encoding,
        jwk: json!({"kty": "EC", "kid": kid, "use": "sig", "alg": "ES256", "crv": "P-256", "x": x, "y": y}),
        public_pem: None,
    }
}

/// Generated once per test binary: RSA key generation is slow in debug builds.
pub static RSA: LazyLock<TestKey> = LazyLock::new(|| rsa_key("rsa-1"));
pub static RSA_2: LazyLock<TestKey> = LazyLock::new(|| rsa_key("rsa-2"));
pub static EC: LazyLock<TestKey> = LazyLock::new(|| ec_key("ec-1"));

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Claims of a projected token for the test pod, valid for an hour.
pub fn pod_claims() -> Value {
    let now = now();
    json!({
        "aud": [AUDIENCE],
        "exp": now + 3600,
        "iat": now - 5,
        "nbf": now - 5,
        "iss": ISSUER,
        "jti": "0f9e8d7c-6b5a-4938-8271-605f4e3d2c1b",
        "sub": format!("system:serviceaccount:{NAMESPACE}:{SA}"),
        "kubernetes.io": {
            "namespace": NAMESPACE,
            "node": {"name": NODE, "uid": NODE_UID},
            "pod": {"name": POD, "uid": POD_UID},
            "serviceaccount": {"name": SA, "uid": SA_UID},
            "warnafter": now + 2880
        }
    })
}

pub fn expected_pod() -> ExpectedPod {
    ExpectedPod {
        namespace: NAMESPACE.to_owned(),
        pod_name: POD.to_owned(),
        pod_uid: POD_UID.to_owned(),
        service_account: SA.to_owned(),
    }
}

pub fn mint(key: &TestKey, claims: &Value) -> String {
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, claims, &key.encoding).unwrap()
}

/// Builds a token from raw header and claims JSON and a raw signature.
pub fn assemble(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

/// What the fake API server serves, and how often it was asked.
pub struct ServerState {
    pub keys: Mutex<Vec<Value>>,
    pub fail: AtomicBool,
    pub discovery_hits: AtomicUsize,
    pub jwks_hits: AtomicUsize,
}

pub struct TestServer {
    pub state: Arc<ServerState>,
    pub url: String,
}

impl TestServer {
    pub async fn start(keys: Vec<Value>) -> TestServer {
        let state = Arc::new(ServerState {
            keys: Mutex::new(keys),
            fail: AtomicBool::new(false),
            discovery_hits: AtomicUsize::new(0),
            jwks_hits: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/openid/v1/jwks", get(jwks))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        TestServer { state, url }
    }

    pub fn set_keys(&self, keys: Vec<Value>) {
        *self.state.keys.lock().unwrap() = keys;
    }

    pub fn set_failing(&self, fail: bool) {
        self.state.fail.store(fail, Ordering::SeqCst);
    }

    pub fn jwks_hits(&self) -> usize {
        self.state.jwks_hits.load(Ordering::SeqCst)
    }

    pub fn discovery_hits(&self) -> usize {
        self.state.discovery_hits.load(Ordering::SeqCst)
    }

    pub fn key_source(&self) -> HttpKeySource {
        let config = kube::Config::new(self.url.parse().unwrap());
        HttpKeySource::new(kube::Client::try_from(config).unwrap())
    }

    pub fn verifier(&self, config: VerifierConfig) -> TokenVerifier {
        TokenVerifier::new(config, self.key_source()).unwrap()
    }
}

async fn discovery(
    State(state): State<Arc<ServerState>>,
) -> (StatusCode, [(header::HeaderName, &'static str); 1], String) {
    state.discovery_hits.fetch_add(1, Ordering::SeqCst);
    let body = json!({
        "issuer": ISSUER,
        "jwks_uri": "https://203.0.113.10:6443/openid/v1/jwks",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"]
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}

/// Whether an `Accept` header admits `application/jwk-set+json`, judged as the
/// Kubernetes API server judges it for `/openid/v1/jwks`.
pub fn accepts_jwk_set(accept: Option<&str>) -> bool {
    let Some(accept) = accept else { return true };
    accept.split(',').any(|range| {
        let media = range.split(';').next().unwrap_or("").trim();
        matches!(media, "application/jwk-set+json" | "application/*" | "*/*")
    })
}

async fn jwks(
    State(state): State<Arc<ServerState>>,
    headers: header::HeaderMap,
) -> (StatusCode, [(header::HeaderName, &'static str); 1], String) {
    state.jwks_hits.fetch_add(1, Ordering::SeqCst);
    // The real API server serves the key set only as application/jwk-set+json and
    // answers 406 to a request that accepts nothing but application/json.
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    if !accepts_jwk_set(accept) {
        return (
            StatusCode::NOT_ACCEPTABLE,
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"kind":"Status","status":"Failure","message":"only the following media types are accepted: application/jwk-set+json","reason":"NotAcceptable","code":406}"#.to_owned(),
        );
    }
    if state.fail.load(Ordering::SeqCst) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            "boom".to_owned(),
        );
    }
    let keys = state.keys.lock().unwrap().clone();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/jwk-set+json")],
        json!({ "keys": keys }).to_string(),
    )
}
