#![allow(clippy::unwrap_used)]
//! The node driver against the REAL broker, end to end.
//!
//! The driver serves CSI on a Unix socket in a temp dir and talks to the
//! broker through `GrpcBroker` over TLS (a CA generated here, its file given to
//! the driver, the certificate's Service name as `tls_server_name`). The broker
//! runs on 127.0.0.1 over an in-memory cluster and consumer store. Both sides
//! verify tokens with a real `leasehold_auth::TokenVerifier` over a
//! `StaticKeySource` holding an RS256 key generated here: pod tokens for
//! `csi.leasehold.dev` bound to the pod, and the driver's own token for
//! `leasehold-broker` bound to a driver pod on its node, sent as
//! `NodeToken::Static`. Logs of every test are captured at TRACE and must hold
//! no token and no password.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{KeyPair as _, RsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use common::{logs, mounts_at, skip_unless_root, target_under, uds_channel, unmount_all_under};
use jiff::Timestamp;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use leasehold_api::ConsumerStatus;
use leasehold_auth::{JwkSet, StaticKeySource, TokenVerifier, VerifierConfig};
use leasehold_broker::tls::{generate_ca, issue_serving_cert, service_dns_names};
use leasehold_broker::{
    BrokerConfig, BrokerService, BrokerTls, CoalescingRecorder, MemoryCluster, MemoryConsumerStore,
    ObjectRef, SecretData, Verifiers,
};
use leasehold_csi::context::keys;
use leasehold_csi::{GrpcBroker, GrpcBrokerConfig, NodeDriver, NodeDriverConfig, NodeToken};
use leasehold_proto::csi::v1 as csi;
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tonic::Code;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// Audience of the node driver's own token (what the broker's node verifier wants).
const NODE_AUDIENCE: &str = "leasehold-broker";
/// Audience of pod tokens, for the driver (kubelet `tokenRequests`) and the broker.
const POD_AUDIENCE: &str = leasehold_api::CSI_TOKEN_AUDIENCE;
const DRIVER_NS: &str = "leasehold-system";
const DRIVER_SA: &str = "leasehold-csi";
const NODE: &str = "node-a";
const BROKER_SERVICE: &str = "leasehold-broker";
const NS: &str = "shop";
const LEASE: &str = "db";
const POLICY: &str = "db-access";
/// Passwords of versions 1 and 2 of `shop/db` (URI-safe, so `uri` holds them verbatim).
const V1_PASSWORD: &str = "pw-V1-SuperSecret-7f3a91c2";
const V2_PASSWORD: &str = "pw-V2-SuperSecret-0b8e44d6";
/// A certificate lease (names from the pod), and one whose names expand to invalid ones.
const CERT_LEASE: &str = "web-tls";
const BAD_CERT_LEASE: &str = "bad-tls";
const CERT_POLICY: &str = "tls-access";

// ---------- keys, tokens and the secrets the logs must not show ----------

struct SigningKey {
    encoding: EncodingKey,
    jwks: JwkSet,
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

/// One RS256 key per test binary (the API server's service-account key).
static KEY: LazyLock<SigningKey> = LazyLock::new(|| {
    let pair = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
    let pkcs8 = pair.as_der().unwrap();
    let encoding =
        EncodingKey::from_rsa_pem(pem("PRIVATE KEY", pkcs8.as_ref()).as_bytes()).unwrap();
    let public = pair.public_key();
    let n = URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero());
    let e = URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero());
    let jwks = serde_json::from_value(json!({"keys": [
        {"kty": "RSA", "kid": "sa-key-1", "use": "sig", "alg": "RS256", "n": n, "e": e}
    ]}))
    .unwrap();
    SigningKey { encoding, jwks }
});

/// Every token and password any test used: no log line may contain one.
static SECRETS: LazyLock<Mutex<Vec<String>>> =
    LazyLock::new(|| Mutex::new(vec![V1_PASSWORD.to_owned(), V2_PASSWORD.to_owned()]));

fn secret(s: String) -> String {
    SECRETS.lock().unwrap().push(s.clone());
    s
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn mint(claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("sa-key-1".into());
    secret(jsonwebtoken::encode(&header, claims, &KEY.encoding).unwrap())
}

/// The node driver's projected token: its service account, bound to the
/// driver pod on `node`.
fn node_token(node: &str) -> String {
    let now = now();
    mint(&json!({
        "aud": [NODE_AUDIENCE], "iss": ISSUER, "exp": now + 3600, "iat": now - 5, "nbf": now - 5,
        "sub": format!("system:serviceaccount:{DRIVER_NS}:{DRIVER_SA}"),
        "kubernetes.io": {
            "namespace": DRIVER_NS,
            "serviceaccount": {"name": DRIVER_SA, "uid": "sa-uid-driver"},
            "pod": {"name": format!("leasehold-csi-{node}"), "uid": format!("pod-uid-driver-{node}")},
            "node": {"name": node, "uid": format!("node-uid-{node}")},
        },
    }))
}

#[derive(Debug, Clone)]
struct Pod {
    name: &'static str,
    uid: &'static str,
    service_account: &'static str,
}

/// `shop/web-0`, service account `web`: allowed by the policy.
const WEB: Pod = Pod {
    name: "web-0",
    uid: "5d0c7e1a-0eb0-4c59-9a1e-000000000001",
    service_account: "web",
};
/// `shop/batch-0`, service account `batch`: not allowed by the policy.
const BATCH: Pod = Pod {
    name: "batch-0",
    uid: "5d0c7e1a-ba70-4c59-9a1e-000000000002",
    service_account: "batch",
};

/// The pod's projected token for `csi.leasehold.dev`, as the kubelet passes it.
fn pod_token(pod: &Pod) -> String {
    let now = now();
    mint(&json!({
        "aud": [POD_AUDIENCE], "iss": ISSUER, "exp": now + 3600, "iat": now - 5, "nbf": now - 5,
        "sub": format!("system:serviceaccount:{NS}:{}", pod.service_account),
        "kubernetes.io": {
            "namespace": NS,
            "serviceaccount": {"name": pod.service_account, "uid": "sa-uid"},
            "pod": {"name": pod.name, "uid": pod.uid},
            "node": {"name": NODE, "uid": "node-uid-node-a"},
        },
    }))
}

fn verifier(audience: &str) -> Arc<TokenVerifier> {
    Arc::new(
        TokenVerifier::new(
            VerifierConfig::new(audience).with_issuer(ISSUER),
            StaticKeySource::new(ISSUER, KEY.jwks.clone()),
        )
        .unwrap(),
    )
}

/// Logs so far hold no token, no token part and no password.
fn assert_no_secrets_in_logs() {
    let text = logs().text();
    assert!(!text.is_empty(), "logs are captured");
    for s in SECRETS.lock().unwrap().iter() {
        assert!(
            !text.contains(s.as_str()),
            "a token or password appears in the logs"
        );
        // Each JWT part (header, claims, signature) on its own.
        for part in s.split('.').filter(|p| p.len() > 16) {
            assert!(!text.contains(part), "part of a token appears in the logs");
        }
    }
}

// ---------- the cluster the broker sees ----------

fn pod_object(pod: &Pod) -> Value {
    let volumes: Vec<Value> = [LEASE, CERT_LEASE, BAD_CERT_LEASE]
        .map(|lease| {
            json!({"name": format!("creds-{lease}"), "csi": {"driver": "csi.leasehold.dev",
                   "readOnly": true, "volumeAttributes": {"lease": lease}}})
        })
        .into();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": NS, "name": pod.name, "uid": pod.uid},
        "spec": {"serviceAccountName": pod.service_account, "nodeName": NODE, "containers": [],
                 "volumes": volumes},
        "status": {"phase": "Running"},
    })
}

/// `shop/db` with `current_version` Current (and the versions before it superseded).
fn lease_object(current_version: u64) -> Value {
    let now = Timestamp::now();
    let issued = (now - jiff::SignedDuration::from_mins(5)).to_string();
    let expires = (now + jiff::SignedDuration::from_hours(2)).to_string();
    let next = (now + jiff::SignedDuration::from_hours(1)).to_string();
    let versions: Vec<Value> = (1..=current_version)
        .map(|v| {
            let state = if v == current_version {
                "Current"
            } else {
                "Superseded"
            };
            json!({"version": v, "credentialId": format!("lh_abc_v{v}"), "state": state,
                   "issuedAt": issued, "expiresAt": expires})
        })
        .collect();
    json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease",
        "metadata": {"namespace": NS, "name": LEASE, "uid": "lease-uid-db", "generation": 1},
        "spec": {
            "policyRef": {"name": POLICY},
            "postgres": {"host": "db.shop.svc", "port": 5432, "database": "orders",
                         "adminSecretRef": {"name": "db-admin"}},
            "delivery": {"csi": {"enabled": true}},
        },
        "status": {
            "phase": "Active",
            "currentVersion": current_version,
            "nextRotationAt": next,
            "progress": {"lastVersion": current_version, "versions": versions},
        },
    })
}

/// A certificate lease of `shop` whose names use the pod's identity (`dns` the
/// DNS name templates), allowed to the `web` service account.
fn cert_lease_object(name: &str, dns: &[&str]) -> Value {
    json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease",
        "metadata": {"namespace": NS, "name": name, "uid": format!("lease-uid-{name}"), "generation": 1},
        "spec": {
            "policyRef": {"name": CERT_POLICY},
            "certificate": {
                "issuerRef": {"name": "pods-ca"},
                "commonName": "${POD_NAME}",
                "dnsNames": dns,
                "uris": ["spiffe://cluster.local/ns/${POD_NAMESPACE}/sa/${SERVICE_ACCOUNT}"],
                "usages": ["serverAuth", "clientAuth", "digitalSignature"],
                "duration": "1h",
            },
            "delivery": {"csi": {"enabled": true}},
        },
    })
}

fn versions_secret(versions: &[(u64, &str)]) -> SecretData {
    SecretData(
        versions
            .iter()
            .map(|(v, pw)| (format!("v{v}"), SecretString::from(*pw)))
            .collect::<BTreeMap<_, _>>(),
    )
}

fn cluster() -> MemoryCluster {
    let c = MemoryCluster::new();
    for pod in [&WEB, &BATCH] {
        c.put_pod(serde_json::from_value(pod_object(pod)).unwrap());
    }
    // The driver pods the node tokens are bound to.
    for node in [NODE, "node-b"] {
        c.put_pod(
            serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"namespace": DRIVER_NS, "name": format!("leasehold-csi-{node}"),
                             "uid": format!("pod-uid-driver-{node}")},
                "spec": {"serviceAccountName": DRIVER_SA, "nodeName": node, "containers": []},
                "status": {"phase": "Running"},
            }))
            .unwrap(),
        );
    }
    c.put_namespace(NS, BTreeMap::new());
    c.put_lease(
        serde_json::from_value(cert_lease_object(
            CERT_LEASE,
            &["${POD_NAME}.web.${POD_NAMESPACE}.svc", "web.shop.svc"],
        ))
        .unwrap(),
    );
    c.put_lease(
        serde_json::from_value(cert_lease_object(BAD_CERT_LEASE, &["${POD_NAME}_web.svc"]))
            .unwrap(),
    );
    c.put_policy(
        serde_json::from_value(json!({
            "apiVersion": "leasehold.dev/v1alpha1", "kind": "RotationPolicy",
            "metadata": {"namespace": NS, "name": CERT_POLICY},
            "spec": {"ttl": "1h", "renewBefore": "20m", "access": {"serviceAccounts": ["web"]}},
        }))
        .unwrap(),
    );
    c.put_lease(serde_json::from_value(lease_object(1)).unwrap());
    c.put_secret(
        NS,
        &format!("{LEASE}-leasehold-versions"),
        versions_secret(&[(1, V1_PASSWORD)]),
    );
    c.put_policy(
        serde_json::from_value(json!({
            "apiVersion": "leasehold.dev/v1alpha1", "kind": "RotationPolicy",
            "metadata": {"namespace": NS, "name": POLICY},
            "spec": {"ttl": "2h", "access": {"serviceAccounts": ["web"]}},
        }))
        .unwrap(),
    );
    c
}

// ---------- the broker over TLS ----------

struct Broker {
    addr: std::net::SocketAddr,
    cluster: Arc<MemoryCluster>,
    consumers: Arc<MemoryConsumerStore>,
    ca_file: PathBuf,
    /// The `ca` issuer of certificate leases: its CA, revocation ledger and records.
    pods_ca: Arc<leasehold_certs::CertificateAuthority>,
    ledger: leasehold_certs::MemoryLedger,
    cert_store: Arc<leasehold_broker::MemoryPodCertificateStore>,
    /// CSRs the issuer was asked to sign.
    signed: Arc<AtomicUsize>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// A `ca` issuer that counts the CSRs it is asked to sign.
struct CountingIssuer {
    inner: leasehold_certs::CaIssuer,
    signed: Arc<AtomicUsize>,
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
        self.signed.fetch_add(1, Ordering::SeqCst);
        self.inner.issue(order).await
    }
    async fn revoke(
        &self,
        order: leasehold_certs::RevokeOrder<'_>,
    ) -> Result<(), leasehold_certs::IssuerError> {
        self.inner.revoke(order).await
    }
}

impl Broker {
    async fn start(dir: &Path) -> Self {
        let cluster = Arc::new(cluster());
        let consumers = Arc::new(MemoryConsumerStore::new());
        consumers.add_lease(ObjectRef::new(NS, LEASE), Vec::new());
        let service = BrokerService::new(
            BrokerConfig::new(DRIVER_NS, DRIVER_SA),
            Verifiers {
                node: verifier(NODE_AUDIENCE),
                pod: verifier(POD_AUDIENCE),
            },
            cluster.clone(),
            Arc::new(CoalescingRecorder::new(
                consumers.clone(),
                Duration::from_millis(50),
            )),
        );
        let pods_ca = Arc::new(
            leasehold_certs::CertificateAuthority::self_signed(
                "pods CA",
                leasehold_certs::KeyAlgorithm::EcdsaP256,
                time::OffsetDateTime::now_utc() - time::Duration::minutes(5),
                time::Duration::days(1),
            )
            .unwrap(),
        );
        let ledger = leasehold_certs::MemoryLedger::default();
        let signed = Arc::new(AtomicUsize::new(0));
        let issuers = leasehold_broker::MemoryCertificateIssuers::new();
        issuers.insert(
            Some(NS),
            "pods-ca",
            Arc::new(CountingIssuer {
                inner: leasehold_certs::CaIssuer::new(pods_ca.clone(), Arc::new(ledger.clone())),
                signed: signed.clone(),
            }),
        );
        let cert_store = Arc::new(leasehold_broker::MemoryPodCertificateStore::new());
        let service = service.with_certificates(Arc::new(leasehold_broker::PodCertificates::new(
            Arc::new(issuers),
            cert_store.clone(),
        )));

        let now = Timestamp::now();
        let ca = generate_ca(now, Duration::from_secs(3600)).unwrap();
        let serving = issue_serving_cert(
            &ca.key,
            &service_dns_names(BROKER_SERVICE, DRIVER_NS),
            now,
            Duration::from_secs(3600),
        )
        .unwrap();
        let ca_file = dir.join("broker-ca.crt");
        std::fs::write(&ca_file, &ca.cert).unwrap();
        let tls = BrokerTls::from_pem(&serving.pem, Some(ca.cert.clone())).unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            leasehold_broker::serve_with_listener(listener, &tls, service, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Broker {
            addr,
            cluster,
            consumers,
            ca_file,
            pods_ca,
            ledger,
            cert_store,
            signed,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    fn consumers(&self) -> Option<Vec<ConsumerStatus>> {
        self.consumers.consumers(&ObjectRef::new(NS, LEASE))
    }

    /// Waits until the consumers of `shop/db` satisfy `check`.
    async fn wait_consumers(&self, what: &str, check: impl Fn(&[ConsumerStatus]) -> bool) {
        for _ in 0..500 {
            if self.consumers().is_some_and(|c| check(&c)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("consumers never {what}: {:?}", self.consumers());
    }

    /// The controller rotated: version 2 is current, its password stored.
    fn rotate_to_v2(&self) {
        self.cluster
            .put_lease(serde_json::from_value(lease_object(2)).unwrap());
        self.cluster.put_secret(
            NS,
            &format!("{LEASE}-leasehold-versions"),
            versions_secret(&[(1, V1_PASSWORD), (2, V2_PASSWORD)]),
        );
    }

    /// The policy stops allowing any service account but `batch`.
    fn revoke_web_access(&self) {
        self.cluster.put_policy(
            serde_json::from_value(json!({
                "apiVersion": "leasehold.dev/v1alpha1", "kind": "RotationPolicy",
                "metadata": {"namespace": NS, "name": POLICY},
                "spec": {"ttl": "2h", "access": {"serviceAccounts": ["batch"]}},
            }))
            .unwrap(),
        );
    }

    async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

// ---------- the node driver ----------

struct Driver {
    node: csi::node_client::NodeClient<tonic::transport::Channel>,
    identity: csi::identity_client::IdentityClient<tonic::transport::Channel>,
    broker: Arc<GrpcBroker>,
    state_dir: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), leasehold_csi::ServeError>>>,
}

impl Driver {
    /// The driver for node `node_name` sending `node_token` as its own, the
    /// broker reached over TLS through the CA file.
    async fn start(dir: &Path, broker: &Broker, node_name: &str, node_token: String) -> Self {
        Self::start_with_ca(dir, broker, node_name, node_token, &broker.ca_file).await
    }

    async fn start_with_ca(
        dir: &Path,
        broker: &Broker,
        node_name: &str,
        node_token: String,
        ca_file: &Path,
    ) -> Self {
        logs();
        let socket = dir.join("csi.sock");
        let state_dir = dir.join("state");
        let mut config = NodeDriverConfig::new(&socket, node_name, &state_dir, POD_AUDIENCE);
        config.broker_timeout = Duration::from_secs(10);
        config.kubelet_dir = dir.join("kubelet");
        let grpc = GrpcBroker::new(GrpcBrokerConfig {
            endpoint: format!("https://127.0.0.1:{}", broker.addr.port()),
            ca_file: Some(ca_file.to_path_buf()),
            tls_server_name: Some(format!("{BROKER_SERVICE}.{DRIVER_NS}.svc")),
            node_token: NodeToken::Static(node_token.into()),
            call_timeout: Duration::from_secs(10),
            ready_cache: leasehold_csi::DEFAULT_READY_CACHE,
        })
        .unwrap();
        let grpc = Arc::new(grpc);
        let mut registry = prometheus_client::registry::Registry::default();
        let driver =
            NodeDriver::new(config, verifier(POD_AUDIENCE), grpc.clone(), &mut registry).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(driver.run(async move {
            let _ = rx.await;
        }));
        for _ in 0..500 {
            if tokio::net::UnixStream::connect(&socket).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let channel = uds_channel(socket).await;
        Driver {
            node: csi::node_client::NodeClient::new(channel.clone()),
            identity: csi::identity_client::IdentityClient::new(channel),
            broker: grpc,
            state_dir,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    async fn probe(&mut self) -> Option<bool> {
        self.identity
            .probe(csi::ProbeRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    }

    /// The broker readiness the driver's `/readyz` reports.
    async fn broker_ready(&self) -> bool {
        use leasehold_csi::CredentialBroker;
        self.broker.ready().await
    }

    async fn publish(&mut self, req: csi::NodePublishVolumeRequest) -> Result<(), tonic::Status> {
        self.node.node_publish_volume(req).await.map(|_| ())
    }

    fn record(&self, volume_id: &str) -> Option<String> {
        std::fs::read_to_string(self.state_dir.join(format!("volumes/{volume_id}.json"))).ok()
    }

    async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        drop(self.node);
        drop(self.identity);
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("driver stops on shutdown")
                .unwrap()
                .unwrap();
        }
    }
}

/// What the kubelet sends for an inline ephemeral volume of `pod` using
/// lease `db`, with the pod's token for the driver's audience.
fn publish_req(
    volume_id: &str,
    target: &Path,
    pod: &Pod,
    token: &str,
) -> csi::NodePublishVolumeRequest {
    publish_req_for(LEASE, volume_id, target, pod, token)
}

/// [`publish_req`] for a volume of `lease`.
fn publish_req_for(
    lease: &str,
    volume_id: &str,
    target: &Path,
    pod: &Pod,
    token: &str,
) -> csi::NodePublishVolumeRequest {
    use csi::volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode};
    let mut ctx = HashMap::new();
    ctx.insert(keys::POD_NAME.to_owned(), pod.name.to_owned());
    ctx.insert(keys::POD_NAMESPACE.to_owned(), NS.to_owned());
    ctx.insert(keys::POD_UID.to_owned(), pod.uid.to_owned());
    ctx.insert(
        keys::SERVICE_ACCOUNT.to_owned(),
        pod.service_account.to_owned(),
    );
    ctx.insert(keys::EPHEMERAL.to_owned(), "true".to_owned());
    ctx.insert(keys::LEASE.to_owned(), lease.to_owned());
    let expiry = (Timestamp::now() + jiff::SignedDuration::from_hours(1)).to_string();
    ctx.insert(
        keys::TOKENS.to_owned(),
        json!({POD_AUDIENCE: {"token": token, "expirationTimestamp": expiry}}).to_string(),
    );
    csi::NodePublishVolumeRequest {
        volume_id: volume_id.to_owned(),
        target_path: target.to_string_lossy().into_owned(),
        volume_capability: Some(csi::VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        }),
        readonly: true,
        volume_context: ctx,
        ..Default::default()
    }
}

fn unpublish_req(volume_id: &str, target: &Path) -> csi::NodeUnpublishVolumeRequest {
    csi::NodeUnpublishVolumeRequest {
        volume_id: volume_id.to_owned(),
        target_path: target.to_string_lossy().into_owned(),
    }
}

/// The files a pod sees at `target` (dot entries are the atomic-swap machinery).
fn visible_files(target: &Path) -> BTreeMap<String, (String, u32)> {
    std::fs::read_dir(target)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| !name.starts_with('.'))
        .map(|name| {
            let path = target.join(&name);
            let mode = std::fs::metadata(&path).unwrap().mode() & 0o7777;
            (name, (std::fs::read_to_string(&path).unwrap(), mode))
        })
        .collect()
}

fn assert_files(target: &Path, version: u64, password: &str) {
    let user = format!("lh_abc_v{version}");
    let expected: BTreeMap<String, (String, u32)> = [
        ("username", user.clone()),
        ("password", password.to_owned()),
        (
            "uri",
            format!("postgres://{user}:{password}@db.shop.svc:5432/orders"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), (v, 0o440)))
    .collect();
    let actual = visible_files(target);
    // Compare without printing the values on failure.
    assert_eq!(
        actual.keys().collect::<BTreeSet<_>>(),
        expected.keys().collect::<BTreeSet<_>>(),
        "file names"
    );
    for (name, (content, mode)) in &expected {
        let (got, got_mode) = &actual[name];
        assert_eq!(*got_mode, *mode, "{name}: mode {got_mode:o}");
        assert!(
            got == content,
            "{name}: not the content of version {version}"
        );
    }
}

fn assert_nothing_mounted(target: &Path) {
    assert!(
        mounts_at(target).is_empty(),
        "nothing mounted at {target:?}"
    );
    assert!(!target.exists(), "{target:?} not created");
}

fn one_consumer(version: u64) -> impl Fn(&[ConsumerStatus]) -> bool {
    move |c: &[ConsumerStatus]| {
        c.len() == 1
            && c[0].kind == "Pod"
            && c[0].namespace == NS
            && c[0].name == WEB.name
            && c[0].version == Some(version)
            && c[0].acknowledged_at.is_some()
    }
}

// ---------- scenarios ----------

/// Scenarios 1, 2 and 5: publish v1, republish after the lease moved to v2,
/// unpublish; the broker's consumer record follows each step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_rotate_and_unpublish_through_the_real_broker() {
    if skip_unless_root("publish_rotate_and_unpublish_through_the_real_broker") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path()).await;
    let mut d = Driver::start(dir.path(), &broker, NODE, node_token(NODE)).await;
    let target = target_under(dir.path(), WEB.uid);
    let volume = "csi-5d0c7e1a-web0";
    let token = pod_token(&WEB);
    assert_eq!(d.probe().await, Some(true), "driver live");
    assert!(d.broker_ready().await, "broker reachable over TLS");

    // 1. Publish: a tmpfs with the rendered v1 files.
    d.publish(publish_req(volume, &target, &WEB, &token))
        .await
        .unwrap();
    let mounts = mounts_at(&target);
    assert_eq!(mounts.len(), 1, "one mount: {mounts:?}");
    assert_eq!(mounts[0].fs_type, "tmpfs");
    let root = std::fs::metadata(&target).unwrap().mode() & 0o7777;
    assert_eq!(root, 0o550, "tmpfs root mode {root:o}");
    assert_files(&target, 1, V1_PASSWORD);
    broker
        .wait_consumers("recorded web-0 at v1", one_consumer(1))
        .await;
    let record = d.record(volume).unwrap();
    assert!(record.contains("\"version\": 1"), "{record}");

    // Republish with nothing new: acknowledged, files untouched, still v1.
    let data = std::fs::read_link(target.join("..data")).unwrap();
    d.publish(publish_req(volume, &target, &WEB, &token))
        .await
        .unwrap();
    assert_eq!(std::fs::read_link(target.join("..data")).unwrap(), data);
    assert_files(&target, 1, V1_PASSWORD);
    broker
        .wait_consumers("kept web-0 at v1", one_consumer(1))
        .await;

    // 2. The controller rotates to v2; the kubelet's next republish picks it up.
    broker.rotate_to_v2();
    d.publish(publish_req(volume, &target, &WEB, &token))
        .await
        .unwrap();
    assert_eq!(mounts_at(&target).len(), 1, "same mount, new files");
    assert_files(&target, 2, V2_PASSWORD);
    broker
        .wait_consumers("recorded web-0 at v2", one_consumer(2))
        .await;
    let record = d.record(volume).unwrap();
    assert!(record.contains("\"version\": 2"), "{record}");

    // 5. Unpublish: unmounted, files gone, released at the broker.
    d.node
        .node_unpublish_volume(unpublish_req(volume, &target))
        .await
        .unwrap();
    assert!(mounts_at(&target).is_empty(), "unmounted");
    assert!(!target.exists(), "target removed");
    assert!(d.record(volume).is_none(), "metadata removed");
    assert!(
        !d.state_dir
            .join(format!("pending-release/{volume}.json"))
            .exists(),
        "released at once, nothing left to retry"
    );
    broker
        .wait_consumers("empty after Release", <[_]>::is_empty)
        .await;

    d.stop().await;
    broker.stop().await;
    unmount_all_under(dir.path());
    // 6. No token, no password in any log line (driver and broker, TRACE).
    let text = logs().text();
    assert!(text.contains("volume published") && text.contains("credential refreshed"));
    // The broker's side is in the same capture.
    assert!(text.contains("broker.issue{") && text.contains("status.consumers written"));
    assert_no_secrets_in_logs();
}

/// Scenario 3: a pod whose service account the policy does not allow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_outside_the_policy_is_denied() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path()).await;
    let mut d = Driver::start(dir.path(), &broker, NODE, node_token(NODE)).await;
    let target = target_under(dir.path(), BATCH.uid);
    let volume = "csi-5d0c7e1a-bat0";

    // The pod's token is valid and bound to it: the driver accepts it, the
    // broker's policy check refuses.
    let err = d
        .publish(publish_req(volume, &target, &BATCH, &pod_token(&BATCH)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(
        err.message()
            .contains("service account shop/batch may not use"),
        "{}",
        err.message()
    );
    assert_nothing_mounted(&target);
    assert!(d.record(volume).is_none(), "no metadata");
    assert_eq!(broker.consumers(), Some(Vec::new()), "no consumer recorded");

    d.stop().await;
    broker.stop().await;
    unmount_all_under(dir.path());
    let text = logs().text();
    assert!(text.contains("broker call refused"), "refusal logged");
    assert_no_secrets_in_logs();
}

/// A pod that loses access (policy changed) is refused on its next republish and stops
/// counting as a consumer, so it cannot hold back revocation of the old version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_loses_access_stops_being_a_consumer() {
    if skip_unless_root("a_pod_that_loses_access_stops_being_a_consumer") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path()).await;
    let mut d = Driver::start(dir.path(), &broker, NODE, node_token(NODE)).await;
    let target = target_under(dir.path(), WEB.uid);
    let volume = "csi-5d0c7e1a-web1";
    let token = pod_token(&WEB);
    d.publish(publish_req(volume, &target, &WEB, &token))
        .await
        .unwrap();
    broker
        .wait_consumers("recorded web-0 at v1", one_consumer(1))
        .await;

    broker.revoke_web_access();
    broker.rotate_to_v2();
    let err = d
        .publish(publish_req(volume, &target, &WEB, &token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    broker
        .wait_consumers("web-0 no longer a consumer", <[_]>::is_empty)
        .await;

    d.node
        .node_unpublish_volume(unpublish_req(volume, &target))
        .await
        .unwrap();
    d.stop().await;
    broker.stop().await;
    unmount_all_under(dir.path());
    assert_no_secrets_in_logs();
}

/// Scenario 4: the driver runs as node-a but its own token is bound to node-b.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_token_of_another_node_is_denied() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path()).await;
    let mut d = Driver::start(dir.path(), &broker, NODE, node_token("node-b")).await;
    let target = target_under(dir.path(), WEB.uid);
    let volume = "csi-5d0c7e1a-web0";

    let err = d
        .publish(publish_req(volume, &target, &WEB, &pod_token(&WEB)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(
        err.message().contains("node-b"),
        "names the token's node: {}",
        err.message()
    );
    assert_nothing_mounted(&target);
    assert!(d.record(volume).is_none(), "no metadata");
    assert_eq!(broker.consumers(), Some(Vec::new()), "no consumer recorded");

    d.stop().await;
    broker.stop().await;
    unmount_all_under(dir.path());
    assert_no_secrets_in_logs();
}

/// TLS is verified: a driver trusting another CA reaches no broker, and a
/// publish fails UNAVAILABLE (the kubelet retries) with nothing mounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path()).await;
    let other_ca = generate_ca(Timestamp::now(), Duration::from_secs(3600)).unwrap();
    let other_ca_file = dir.path().join("other-ca.crt");
    std::fs::write(&other_ca_file, &other_ca.cert).unwrap();
    let mut d =
        Driver::start_with_ca(dir.path(), &broker, NODE, node_token(NODE), &other_ca_file).await;
    let target = target_under(dir.path(), WEB.uid);
    let volume = "csi-5d0c7e1a-web0";

    assert_eq!(d.probe().await, Some(true), "the driver stays live");
    assert!(!d.broker_ready().await, "broker not trusted: not ready");
    let err = d
        .publish(publish_req(volume, &target, &WEB, &pod_token(&WEB)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert_nothing_mounted(&target);
    assert!(d.record(volume).is_none(), "no metadata");
    assert_eq!(broker.consumers(), Some(Vec::new()), "no consumer recorded");

    d.stop().await;
    broker.stop().await;
    unmount_all_under(dir.path());
    assert_no_secrets_in_logs();
}

/// A pod that loses access with no rotation in between: the next republish
/// is refused by Acknowledge, the credential files are removed from the
/// volume and the pod stops being a consumer; once access is restored, a
/// republish issues the credential again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawn_access_removes_the_files_at_the_next_republish() {
    if skip_unless_root("withdrawn_access_removes_the_files_at_the_next_republish") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path()).await;
    let mut d = Driver::start(dir.path(), &broker, NODE, node_token(NODE)).await;
    let target = target_under(dir.path(), WEB.uid);
    let volume = "csi-5d0c7e1a-wd01";
    let token = pod_token(&WEB);
    d.publish(publish_req(volume, &target, &WEB, &token))
        .await
        .unwrap();
    assert_files(&target, 1, V1_PASSWORD);
    broker
        .wait_consumers("recorded web-0 at v1", one_consumer(1))
        .await;

    broker.revoke_web_access();
    let err = d
        .publish(publish_req(volume, &target, &WEB, &token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(
        visible_files(&target).is_empty(),
        "credential files removed"
    );
    assert_eq!(
        mounts_at(&target).len(),
        1,
        "the tmpfs stays until unpublish"
    );
    broker
        .wait_consumers("web-0 no longer a consumer", <[_]>::is_empty)
        .await;

    // Access restored: the next republish hands the credential out again.
    broker.cluster.put_policy(
        serde_json::from_value(json!({
            "apiVersion": "leasehold.dev/v1alpha1", "kind": "RotationPolicy",
            "metadata": {"namespace": NS, "name": POLICY},
            "spec": {"ttl": "2h", "access": {"serviceAccounts": ["web"]}},
        }))
        .unwrap(),
    );
    d.publish(publish_req(volume, &target, &WEB, &token))
        .await
        .unwrap();
    assert_files(&target, 1, V1_PASSWORD);

    d.node
        .node_unpublish_volume(unpublish_req(volume, &target))
        .await
        .unwrap();
    d.stop().await;
    broker.stop().await;
    unmount_all_under(dir.path());
    assert_no_secrets_in_logs();
}

// ---------- certificate volumes ----------

fn leaf_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

fn key_matches(key_pem: &str, cert_pem: &str) -> bool {
    leasehold_certs::verify::check_private_key(
        &leaf_der(cert_pem),
        &leasehold_certs::PrivateKeyPem::new(key_pem.to_owned()),
    )
    .is_ok()
}

/// The key must show up in no log line: its base64 lines join the secrets.
fn key_is_secret(key_pem: &str) {
    for line in key_pem.lines().filter(|l| !l.starts_with("-----")) {
        secret(line.to_owned());
    }
}

fn held_serial(d: &Driver, volume: &str) -> String {
    let record: Value = serde_json::from_str(&d.record(volume).unwrap()).unwrap();
    record["certificate"]["serial"].as_str().unwrap().to_owned()
}

/// Time passes: the volume's renew time (kept in the driver's metadata) is behind us.
fn renewal_due(d: &Driver, volume: &str) {
    let path = d.state_dir.join(format!("volumes/{volume}.json"));
    let mut record: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    record["renew_at"] = json!((Timestamp::now() - jiff::SignedDuration::from_secs(1)).to_string());
    std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Checks the three files of a certificate volume; returns (key, certificate).
fn assert_certificate_files(target: &Path, broker: &Broker) -> (String, String) {
    let files = visible_files(target);
    assert_eq!(
        files.keys().map(String::as_str).collect::<Vec<_>>(),
        ["ca.crt", "tls.crt", "tls.key"]
    );
    for (name, (_, mode)) in &files {
        assert_eq!(*mode, 0o440, "{name}: mode {mode:o}");
    }
    let key = files["tls.key"].0.clone();
    let cert = files["tls.crt"].0.clone();
    key_is_secret(&key);
    assert!(key_matches(&key, &cert), "tls.key matches tls.crt");
    assert_eq!(files["ca.crt"].0, broker.pods_ca.certificate_pem());
    let ca = target.join("ca.crt").to_string_lossy().into_owned();
    let crt = target.join("tls.crt").to_string_lossy().into_owned();
    let (ok, out) = openssl(&["verify", "-CAfile", &ca, &crt]);
    assert!(ok, "openssl verify: {out}");
    let (ok, out) = openssl(&[
        "x509",
        "-in",
        &crt,
        "-noout",
        "-subject",
        "-ext",
        "subjectAltName",
    ]);
    assert!(ok, "{out}");
    for expected in [
        "CN = web-0",
        "DNS:web-0.web.shop.svc",
        "DNS:web.shop.svc",
        "URI:spiffe://cluster.local/ns/shop/sa/web",
    ] {
        assert!(out.contains(expected), "{expected} in {out}");
    }
    (key, cert)
}

/// A certificate volume: key made on the node, CSR signed through the broker,
/// kept while current, renewed (new key, old serial revoked) once due, revoked on
/// unpublish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_volume_is_issued_renewed_and_revoked() {
    if skip_unless_root("certificate_volume_is_issued_renewed_and_revoked") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path()).await;
    let mut d = Driver::start(dir.path(), &broker, NODE, node_token(NODE)).await;
    let target = target_under(dir.path(), WEB.uid);
    let volume = "csi-5d0c7e1a-web0-tls";
    let token = pod_token(&WEB);
    let publish = || publish_req_for(CERT_LEASE, volume, &target, &WEB, &token);

    d.publish(publish()).await.unwrap();
    assert_eq!(mounts_at(&target).len(), 1);
    let (key1, cert1) = assert_certificate_files(&target, &broker);
    let serial1 = held_serial(&d, volume);
    assert_eq!(
        broker.cert_store.serials_of(WEB.uid),
        std::slice::from_ref(&serial1)
    );
    assert_eq!(broker.signed.load(Ordering::SeqCst), 1);

    // Republish inside the validity, before the renew window: nothing changes.
    let data = std::fs::read_link(target.join("..data")).unwrap();
    d.publish(publish()).await.unwrap();
    assert_eq!(std::fs::read_link(target.join("..data")).unwrap(), data);
    assert_eq!(broker.signed.load(Ordering::SeqCst), 1);

    // Once due: a new key and certificate; the replaced one is revoked.
    renewal_due(&d, volume);
    d.publish(publish()).await.unwrap();
    assert_ne!(std::fs::read_link(target.join("..data")).unwrap(), data);
    let (key2, cert2) = assert_certificate_files(&target, &broker);
    assert!(
        key2 != key1 && cert2 != cert1,
        "a fresh key and certificate"
    );
    let serial2 = held_serial(&d, volume);
    assert_ne!(serial2, serial1);
    assert_eq!(broker.signed.load(Ordering::SeqCst), 2);
    let revoked = broker.ledger.0.lock().unwrap().clone();
    assert!(revoked.is_revoked(&serial1) && !revoked.is_revoked(&serial2));
    assert_eq!(
        broker.cert_store.serials_of(WEB.uid),
        std::slice::from_ref(&serial2)
    );

    // Unpublish: released, so revoked; files and mount gone.
    d.node
        .node_unpublish_volume(unpublish_req(volume, &target))
        .await
        .unwrap();
    assert!(broker.ledger.0.lock().unwrap().is_revoked(&serial2));
    assert!(broker.cert_store.serials_of(WEB.uid).is_empty());
    assert!(mounts_at(&target).is_empty() && !target.exists());

    d.stop().await;
    broker.stop().await;
    unmount_all_under(dir.path());
    let text = logs().text();
    assert!(text.contains("broker.issue_certificate{") && text.contains("certificate renewed"));
    assert!(!text.contains("PRIVATE KEY"), "no key in the logs");
    assert_no_secrets_in_logs();
}

/// The broker refuses a pod the policy does not allow, and names that expand to
/// invalid ones: nothing is signed, nothing mounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_certificate_volumes_get_nothing_signed() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path()).await;
    let mut d = Driver::start(dir.path(), &broker, NODE, node_token(NODE)).await;

    let target = target_under(dir.path(), BATCH.uid);
    let err = d
        .publish(publish_req_for(
            CERT_LEASE,
            "csi-batch-tls",
            &target,
            &BATCH,
            &pod_token(&BATCH),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_nothing_mounted(&target);

    let target = target_under(dir.path(), WEB.uid);
    let err = d
        .publish(publish_req_for(
            BAD_CERT_LEASE,
            "csi-web-bad-tls",
            &target,
            &WEB,
            &pod_token(&WEB),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("dnsNames"), "{err:?}");
    assert_nothing_mounted(&target);

    assert_eq!(broker.signed.load(Ordering::SeqCst), 0, "no CSR signed");
    assert!(broker.ledger.0.lock().unwrap().entries.is_empty());
    d.stop().await;
    broker.stop().await;
    unmount_all_under(dir.path());
}

/// A reader looping over the volume while the certificate is renewed several times
/// never sees a key that does not match the certificate next to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_swap_key_and_certificate_as_one_set() {
    if skip_unless_root("renewals_swap_key_and_certificate_as_one_set") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path()).await;
    let mut d = Driver::start(dir.path(), &broker, NODE, node_token(NODE)).await;
    let target = target_under(dir.path(), WEB.uid);
    let volume = "csi-5d0c7e1a-web0-swap";
    let token = pod_token(&WEB);
    let publish = || publish_req_for(CERT_LEASE, volume, &target, &WEB, &token);
    d.publish(publish()).await.unwrap();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let checked = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (stop, checked, target) = (stop.clone(), checked.clone(), target.clone());
        std::thread::spawn(move || {
            let mut mismatches = 0;
            let mut seen = BTreeSet::new();
            while !stop.load(Ordering::SeqCst) {
                // As a pod reads: both files through their symlinks, counted only when
                // `..data` pointed at the same version before and after.
                let before = std::fs::read_link(target.join("..data"));
                let key = std::fs::read_to_string(target.join("tls.key"));
                let cert = std::fs::read_to_string(target.join("tls.crt"));
                let after = std::fs::read_link(target.join("..data"));
                if let (Ok(b), Ok(a), Ok(key), Ok(cert)) = (before, after, key, cert)
                    && a == b
                {
                    if !key_matches(&key, &cert) {
                        mismatches += 1;
                    }
                    seen.insert(a);
                    checked.fetch_add(1, Ordering::SeqCst);
                }
            }
            (mismatches, seen.len())
        })
    };
    let checks_past = |n: usize| {
        let checked = checked.clone();
        async move {
            while checked.load(Ordering::SeqCst) <= n {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    };
    checks_past(0).await;
    let mut serials = vec![held_serial(&d, volume)];
    for _ in 0..5 {
        renewal_due(&d, volume);
        d.publish(publish()).await.unwrap();
        serials.push(held_serial(&d, volume));
    }
    checks_past(checked.load(Ordering::SeqCst)).await;
    stop.store(true, Ordering::SeqCst);
    let (mismatches, versions_seen) = reader.join().unwrap();
    assert_eq!(mismatches, 0, "a key next to another key's certificate");
    assert!(versions_seen >= 2, "the reader saw the swaps");
    assert_eq!(serials.iter().collect::<BTreeSet<_>>().len(), 6);
    let revoked = broker.ledger.0.lock().unwrap().clone();
    for old in &serials[..5] {
        assert!(revoked.is_revoked(old));
    }

    d.node
        .node_unpublish_volume(unpublish_req(volume, &target))
        .await
        .unwrap();
    assert!(broker.ledger.0.lock().unwrap().is_revoked(&serials[5]));
    d.stop().await;
    broker.stop().await;
    unmount_all_under(dir.path());
}
