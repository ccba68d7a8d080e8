//! Test fixtures: signing keys and token minting, an in-memory cluster with a
//! few pods, leases and policies, and the broker on 127.0.0.1 over TLS.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{KeyPair as _, RsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jiff::Timestamp;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use leasehold_auth::{JwkSet, StaticKeySource, TokenVerifier, VerifierConfig};
use leasehold_broker::authz::PodIdentity;
use leasehold_broker::tls::{generate_ca, issue_serving_cert};
use leasehold_broker::{
    BrokerConfig, BrokerService, BrokerTls, CoalescingRecorder, ConnectionSettings, MemoryCluster,
    MemoryConsumerStore, ObjectRef, PerPodIssuer, SecretData, Verifiers,
};
use leasehold_proto::broker::v1 as pb;
use leasehold_proto::broker::v1::broker_client::BrokerClient;
use secrecy::SecretString;
use serde_json::{Value, json};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
pub const NODE_AUDIENCE: &str = "broker.leasehold.dev";
pub const POD_AUDIENCE: &str = leasehold_api::CSI_TOKEN_AUDIENCE;
pub const DRIVER_NS: &str = "leasehold-system";
pub const DRIVER_SA: &str = "leasehold-csi";
pub const NODE: &str = "node-a";
/// The password of version 3 of `shop/db`: must never show up in logs.
pub const V3_PASSWORD: &str = "pw-V3-SuperSecret-4242";

pub struct SigningKey {
    pub encoding: EncodingKey,
    pub jwks: JwkSet,
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

/// One RS256 key per test binary (RSA generation is slow in debug builds).
pub static KEY: LazyLock<SigningKey> = LazyLock::new(|| {
    let pair = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
    let pkcs8 = pair.as_der().unwrap();
    let encoding =
        EncodingKey::from_rsa_pem(pem("PRIVATE KEY", pkcs8.as_ref()).as_bytes()).unwrap();
    let public = pair.public_key();
    let n = URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero());
    let e = URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero());
    let jwks = serde_json::from_value(json!({"keys": [
        {"kty": "RSA", "kid": "test-1", "use": "sig", "alg": "RS256", "n": n, "e": e}
    ]}))
    .unwrap();
    SigningKey { encoding, jwks }
});

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub fn mint(claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("test-1".into());
    jsonwebtoken::encode(&header, claims, &KEY.encoding).unwrap()
}

/// A node driver's own token: `namespace/name`, bound to a driver pod and `node`.
pub fn node_token_for(namespace: &str, name: &str, node: Option<&str>) -> String {
    let now = now();
    let mut k8s = json!({
        "namespace": namespace,
        "serviceaccount": {"name": name, "uid": "sa-uid-driver"},
        "pod": {"name": "leasehold-csi-abcde", "uid": "pod-uid-driver"},
    });
    if let Some(node) = node {
        k8s["node"] = json!({"name": node, "uid": "node-uid"});
    }
    mint(&json!({
        "aud": [NODE_AUDIENCE], "iss": ISSUER, "exp": now + 3600, "iat": now - 5, "nbf": now - 5,
        "sub": format!("system:serviceaccount:{namespace}:{name}"),
        "kubernetes.io": k8s,
    }))
}

pub fn node_token() -> String {
    node_token_for(DRIVER_NS, DRIVER_SA, Some(NODE))
}

/// A pod's projected token, expiring `exp_in` seconds from now.
pub fn pod_token_exp(pod: &PodIdentity, exp_in: i64) -> String {
    let now = now();
    mint(&json!({
        "aud": [POD_AUDIENCE], "iss": ISSUER, "exp": now + exp_in, "iat": now - 7200, "nbf": now - 7200,
        "sub": format!("system:serviceaccount:{}:{}", pod.namespace, pod.service_account),
        "kubernetes.io": {
            "namespace": pod.namespace,
            "serviceaccount": {"name": pod.service_account, "uid": "sa-uid"},
            "pod": {"name": pod.name, "uid": pod.uid},
            "node": {"name": NODE, "uid": "node-uid"},
        },
    }))
}

pub fn pod_token(pod: &PodIdentity) -> String {
    pod_token_exp(pod, 3600)
}

pub fn verifiers() -> Verifiers {
    let make = |aud: &str| {
        Arc::new(
            TokenVerifier::new(
                VerifierConfig::new(aud).with_issuer(ISSUER),
                StaticKeySource::new(ISSUER, KEY.jwks.clone()),
            )
            .unwrap(),
        )
    };
    Verifiers {
        node: make(NODE_AUDIENCE),
        pod: make(POD_AUDIENCE),
    }
}

/// A UUID derived from `seed` (FNV-1a), stable across runs.
pub fn uid_of(seed: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!(
        "{:08x}-{:04x}-4000-8000-{:012x}",
        h >> 32,
        (h >> 16) & 0xffff,
        h & 0xffff_ffff_ffff
    )
}

pub fn pod_id(namespace: &str, name: &str, sa: &str) -> PodIdentity {
    PodIdentity {
        namespace: namespace.into(),
        name: name.into(),
        uid: uid_of(&format!("{namespace}/{name}")),
        service_account: sa.into(),
    }
}

pub fn web() -> PodIdentity {
    pod_id("shop", "web-0", "web")
}

/// Leases in `shop` every fixture pod mounts (a CSI volume each).
pub const LEASES: [&str; 8] = [
    "db",
    "nocsi",
    "fresh",
    "restricted",
    "shared",
    "selected",
    "perpod",
    "cert",
];

/// The issuer of `shop/cert`, the CA behind it and its ledger.
pub struct CertFixture {
    pub ca: Arc<leasehold_certs::CertificateAuthority>,
    pub ledger: leasehold_certs::MemoryLedger,
    pub store: Arc<leasehold_broker::MemoryPodCertificateStore>,
    pub certificates: Arc<leasehold_broker::PodCertificates>,
    /// How many times the issuer was asked to sign.
    pub signed: Arc<std::sync::atomic::AtomicUsize>,
}

/// A `ca` issuer that counts the CSRs it is asked to sign.
pub struct CountingIssuer {
    inner: leasehold_certs::CaIssuer,
    signed: Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait::async_trait]
impl leasehold_certs::CertificateIssuer for CountingIssuer {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    async fn issue(
        &self,
        order: leasehold_certs::IssueOrder<'_>,
    ) -> Result<leasehold_certs::IssuedChain, leasehold_certs::IssuerError> {
        self.signed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.issue(order).await
    }
    async fn revoke(
        &self,
        order: leasehold_certs::RevokeOrder<'_>,
    ) -> Result<(), leasehold_certs::IssuerError> {
        self.inner.revoke(order).await
    }
}

pub fn cert_fixture() -> CertFixture {
    let ca = Arc::new(
        leasehold_certs::CertificateAuthority::self_signed(
            "leasehold test CA",
            leasehold_certs::KeyAlgorithm::EcdsaP256,
            time::OffsetDateTime::now_utc() - time::Duration::minutes(5),
            time::Duration::days(1),
        )
        .unwrap(),
    );
    let ledger = leasehold_certs::MemoryLedger::default();
    let signed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let issuers = leasehold_broker::MemoryCertificateIssuers::new();
    issuers.insert(
        Some("shop"),
        "ca",
        Arc::new(CountingIssuer {
            inner: leasehold_certs::CaIssuer::new(ca.clone(), Arc::new(ledger.clone())),
            signed: signed.clone(),
        }),
    );
    let store = Arc::new(leasehold_broker::MemoryPodCertificateStore::new());
    let certificates = Arc::new(leasehold_broker::PodCertificates::new(
        Arc::new(issuers),
        store.clone(),
    ));
    CertFixture {
        ca,
        ledger,
        store,
        certificates,
        signed,
    }
}

/// `shop/cert`: a certificate lease whose names use the pod's identity.
pub fn cert_lease_object() -> leasehold_api::SecretLease {
    serde_json::from_value(json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease",
        "metadata": {"namespace": "shop", "name": "cert", "uid": "lease-uid-cert"},
        "spec": {
            "policyRef": {"name": "open"},
            "certificate": {
                "issuerRef": {"name": "ca"},
                "commonName": "${POD_NAME}",
                "dnsNames": ["${POD_NAME}.web.${POD_NAMESPACE}.svc", "web.shop.svc"],
                "uris": ["spiffe://cluster.local/ns/${POD_NAMESPACE}/sa/${SERVICE_ACCOUNT}"],
                "usages": ["serverAuth", "clientAuth", "digitalSignature"],
                "duration": "1h",
            },
            "delivery": {"csi": {"enabled": true}},
        },
    }))
    .unwrap()
}

/// A pod with a leasehold CSI volume of each of `leases` (in `shop`).
pub fn pod_object_with(
    p: &PodIdentity,
    node: &str,
    leases: &[&str],
) -> k8s_openapi::api::core::v1::Pod {
    let volumes: Vec<Value> = leases
        .iter()
        .map(|lease| {
            let attr = if p.namespace == "shop" {
                (*lease).to_owned()
            } else {
                format!("shop/{lease}")
            };
            json!({"name": format!("creds-{lease}"), "csi": {
                "driver": "csi.leasehold.dev", "readOnly": true,
                "volumeAttributes": {"lease": attr}}})
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": p.namespace, "name": p.name, "uid": p.uid},
        "spec": {"serviceAccountName": p.service_account, "nodeName": node, "containers": [],
                 "volumes": volumes},
        "status": {"phase": "Running"},
    }))
    .unwrap()
}

pub fn pod_object(p: &PodIdentity, node: &str) -> k8s_openapi::api::core::v1::Pod {
    pod_object_with(p, node, &LEASES)
}

fn lease_object(
    namespace: &str,
    name: &str,
    policy: &str,
    extra: Value,
) -> leasehold_api::SecretLease {
    let mut spec = json!({
        "policyRef": {"name": policy},
        "postgres": {"host": "db.shop.svc", "port": 5432, "database": "orders",
                     "adminSecretRef": {"name": "db-admin"}},
        "delivery": {"csi": {"enabled": true, "files": {
            "username": "{{ username }}", "password": "{{ password }}", "dsn": "{{ uri }}"}}},
    });
    if let Some(obj) = extra.get("spec").and_then(Value::as_object) {
        for (k, v) in obj {
            spec[k] = v.clone();
        }
    }
    let issued = Timestamp::now().to_string();
    let expires = (Timestamp::now() + jiff::SignedDuration::from_hours(1)).to_string();
    let next = (Timestamp::now() + jiff::SignedDuration::from_mins(40)).to_string();
    let status = extra.get("status").cloned().unwrap_or_else(|| {
        json!({
            "currentVersion": 3,
            "nextRotationAt": next,
            "progress": {"lastVersion": 3, "versions": [
                {"version": 3, "credentialId": "lh_abc_v3", "state": "Current",
                 "issuedAt": issued, "expiresAt": expires}
            ]},
        })
    });
    serde_json::from_value(json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease",
        "metadata": {"namespace": namespace, "name": name, "uid": format!("lease-uid-{name}")},
        "spec": spec,
        "status": status,
    }))
    .unwrap()
}

pub fn policy_object(namespace: &str, name: &str, access: Value) -> leasehold_api::RotationPolicy {
    serde_json::from_value(json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "RotationPolicy",
        "metadata": {"namespace": namespace, "name": name},
        "spec": {"ttl": "1h", "access": access},
    }))
    .unwrap()
}

/// Pods: shop/web-0 (sa web), shop/api-0 (sa api), billing/job-0 (sa worker),
/// analytics/report-0 (sa report), all on node-a; shop/far-0 on node-b; each
/// with a volume of every lease; shop/bare-0 (sa web, node-a) with none.
/// Leases in `shop`: `db` (open), `nocsi`, `fresh` (no version yet),
/// `restricted` (SA `api` only), `shared` (namespace billing, SA billing/worker),
/// `selected` (namespaces labelled team=data), `perpod`.
pub fn cluster() -> MemoryCluster {
    let c = MemoryCluster::new();
    for (p, node) in [
        (web(), NODE),
        (pod_id("shop", "api-0", "api"), NODE),
        (pod_id("billing", "job-0", "worker"), NODE),
        (pod_id("analytics", "report-0", "report"), NODE),
        (pod_id("shop", "far-0", "web"), "node-b"),
    ] {
        c.put_pod(pod_object(&p, node));
    }
    c.put_pod(pod_object_with(&pod_id("shop", "bare-0", "web"), NODE, &[]));
    c.put_pod(driver_pod(None));
    c.put_namespace("shop", BTreeMap::new());
    c.put_namespace(
        "billing",
        BTreeMap::from([("team".into(), "payments".into())]),
    );
    c.put_namespace(
        "analytics",
        BTreeMap::from([("team".into(), "data".into())]),
    );
    c.put_policy(policy_object("shop", "open", json!({})));
    c.put_policy(policy_object(
        "shop",
        "restricted",
        json!({"serviceAccounts": ["api"]}),
    ));
    c.put_policy(policy_object(
        "shop",
        "shared",
        json!({"namespaces": ["billing"], "serviceAccounts": ["billing/worker", "web"]}),
    ));
    c.put_policy(policy_object(
        "shop",
        "selected",
        json!({"namespaceSelector": {"matchExpressions": [
            {"key": "team", "operator": "In", "values": ["data"]}]}}),
    ));
    c.put_lease(lease_object("shop", "db", "open", json!({})));
    c.put_lease(lease_object(
        "shop",
        "nocsi",
        "open",
        json!({"spec": {"delivery": {"csi": {"enabled": false}}}}),
    ));
    c.put_lease(lease_object("shop", "fresh", "open", json!({"status": {}})));
    c.put_lease(lease_object("shop", "restricted", "restricted", json!({})));
    c.put_lease(lease_object("shop", "shared", "shared", json!({})));
    c.put_lease(lease_object("shop", "selected", "selected", json!({})));
    c.put_lease(cert_lease_object());
    c.put_lease(lease_object(
        "shop",
        "perpod",
        "open",
        json!({"spec": {"perPod": true}}),
    ));
    for lease in ["db", "restricted", "shared", "selected"] {
        c.put_secret(
            "shop",
            &format!("{lease}-leasehold-versions"),
            SecretData(BTreeMap::from([(
                "v3".to_owned(),
                SecretString::from(V3_PASSWORD),
            )])),
        );
    }
    c
}

pub struct Broker {
    pub addr: SocketAddr,
    pub ca_pem: String,
    pub client: BrokerClient<Channel>,
    pub cluster: Arc<MemoryCluster>,
    pub consumers: Arc<MemoryConsumerStore>,
    pub registry: Arc<std::sync::Mutex<prometheus_client::registry::Registry>>,
    pub certs: CertFixture,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The node driver's pod on `NODE`, the one `node_token_for` tokens are bound
/// to; `deleting`: with that deletion timestamp.
pub fn driver_pod(deleting: Option<&str>) -> k8s_openapi::api::core::v1::Pod {
    let mut meta =
        json!({"namespace": DRIVER_NS, "name": "leasehold-csi-abcde", "uid": "pod-uid-driver"});
    if let Some(t) = deleting {
        meta["deletionTimestamp"] = json!(t);
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": meta,
        "spec": {"serviceAccountName": DRIVER_SA, "nodeName": NODE, "containers": []},
        "status": {"phase": "Running"},
    }))
    .unwrap()
}

pub async fn start() -> Broker {
    start_with(None).await
}

/// The broker over TLS on 127.0.0.1, with a client that trusts its CA.
pub async fn start_with(per_pod: Option<Arc<dyn PerPodIssuer>>) -> Broker {
    start_opts(per_pod, 1024).await
}

/// [`start_with`], at most `max_connections` connections.
pub async fn start_opts(per_pod: Option<Arc<dyn PerPodIssuer>>, max_connections: usize) -> Broker {
    start_full(move |_| per_pod, max_connections).await
}

/// The broker with the per-pod issuer `per_pod` builds on the broker's own
/// in-memory cluster.
pub async fn start_full(
    per_pod: impl FnOnce(Arc<MemoryCluster>) -> Option<Arc<dyn PerPodIssuer>>,
    max_connections: usize,
) -> Broker {
    let settings = ConnectionSettings {
        max_connections,
        ..ConnectionSettings::current()
    };
    start_configured(per_pod, settings).await
}

/// [`start_full`] with connection `settings` of its own.
pub async fn start_configured(
    per_pod: impl FnOnce(Arc<MemoryCluster>) -> Option<Arc<dyn PerPodIssuer>>,
    settings: ConnectionSettings,
) -> Broker {
    start_service(per_pod, settings, |s| s).await
}

/// [`start_configured`] with a last word on the service (`customize`).
pub async fn start_service(
    per_pod: impl FnOnce(Arc<MemoryCluster>) -> Option<Arc<dyn PerPodIssuer>>,
    settings: ConnectionSettings,
    customize: impl FnOnce(BrokerService) -> BrokerService,
) -> Broker {
    let cluster = Arc::new(cluster());
    let per_pod = per_pod(cluster.clone());
    let consumers = Arc::new(MemoryConsumerStore::new());
    for lease in ["db", "restricted", "shared", "selected", "perpod"] {
        consumers.add_lease(ObjectRef::new("shop", lease), Vec::new());
    }
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = leasehold_broker::BrokerMetrics::register(&mut registry);
    let mut service = BrokerService::new(
        BrokerConfig::new(DRIVER_NS, DRIVER_SA),
        verifiers(),
        cluster.clone(),
        Arc::new(CoalescingRecorder::new(
            consumers.clone(),
            Duration::from_millis(50),
        )),
    )
    .with_metrics(metrics);
    if let Some(issuer) = per_pod {
        service = service.with_per_pod(issuer);
    }
    let certs = cert_fixture();
    service = customize(service.with_certificates(certs.certificates.clone()));

    let now = Timestamp::now();
    let ca = generate_ca(now, Duration::from_secs(3600)).unwrap();
    let serving = issue_serving_cert(
        &ca.key,
        &["localhost".to_owned()],
        now,
        Duration::from_secs(3600),
    )
    .unwrap();
    let tls = BrokerTls::from_pem(&serving.pem, Some(ca.cert.clone())).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        leasehold_broker::serve_with_settings(listener, &tls, service, settings, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    let channel = connect(addr, &ca.cert).await.unwrap();
    Broker {
        ca_pem: ca.cert.clone(),
        addr,
        client: BrokerClient::new(channel),
        cluster,
        consumers,
        registry: Arc::new(std::sync::Mutex::new(registry)),
        certs,
        shutdown: Some(tx),
    }
}

/// A new connection to the broker at `addr` (trusting `ca_pem`).
pub async fn connect(addr: SocketAddr, ca_pem: &str) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("https://127.0.0.1:{}", addr.port()))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca_pem.as_bytes()))
                .domain_name("localhost"),
        )
        .unwrap()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
}

/// A bare TLS client (ALPN `h2`) trusting `ca_pem`, for tests that speak below gRPC.
pub fn tls_connector(ca_pem: &str) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

pub fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert(
            leasehold_proto::AUTHORIZATION_METADATA,
            format!("Bearer {token}").parse().unwrap(),
        );
    }
    request
}

pub fn pb_pod(p: &PodIdentity) -> pb::PodIdentity {
    pb::PodIdentity {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        uid: p.uid.clone(),
        service_account: p.service_account.clone(),
    }
}

pub fn issue_request(p: &PodIdentity, lease: &str, pod_token: &str) -> pb::IssueRequest {
    pb::IssueRequest {
        pod: Some(pb_pod(p)),
        pod_token: pod_token.to_owned(),
        lease: Some(pb::LeaseRef {
            namespace: "shop".into(),
            name: lease.into(),
        }),
        volume_id: format!("csi-{}", p.uid),
        node_name: NODE.into(),
        held_version: 0,
    }
}

pub fn ack_request(p: &PodIdentity, lease: &str, version: u64) -> pb::AcknowledgeRequest {
    pb::AcknowledgeRequest {
        volume_id: format!("csi-{}", p.uid),
        lease: Some(pb::LeaseRef {
            namespace: "shop".into(),
            name: lease.into(),
        }),
        version,
        node_name: NODE.into(),
        pod: Some(pb_pod(p)),
    }
}

pub fn release_request(p: &PodIdentity, lease: &str) -> pb::ReleaseRequest {
    pb::ReleaseRequest {
        volume_id: format!("csi-{}", p.uid),
        lease: Some(pb::LeaseRef {
            namespace: "shop".into(),
            name: lease.into(),
        }),
        node_name: NODE.into(),
        pod: Some(pb_pod(p)),
        serial: String::new(),
    }
}

pub fn issue_certificate_request(
    p: &PodIdentity,
    lease: &str,
    pod_token: &str,
    csr_pem: &str,
) -> pb::IssueCertificateRequest {
    // Every field spelled out: the request has no field for a key.
    pb::IssueCertificateRequest {
        pod: Some(pb_pod(p)),
        pod_token: pod_token.to_owned(),
        lease: Some(pb::LeaseRef {
            namespace: "shop".into(),
            name: lease.into(),
        }),
        volume_id: format!("csi-{}", p.uid),
        node_name: NODE.into(),
        csr_pem: csr_pem.to_owned(),
    }
}

/// Waits until the consumers of `shop/<lease>` satisfy `check`.
pub async fn wait_consumers(
    store: &MemoryConsumerStore,
    lease: &str,
    check: impl Fn(&[leasehold_api::ConsumerStatus]) -> bool,
) {
    let lease = ObjectRef::new("shop", lease);
    for _ in 0..300 {
        if store.consumers(&lease).is_some_and(|c| check(&c)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "consumers of {lease} never matched: {:?}",
        store.consumers(&lease)
    );
}
