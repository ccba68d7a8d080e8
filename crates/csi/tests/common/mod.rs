//! Test harness: the real driver on a Unix socket, a fake broker as a real
//! tonic server on loopback, a fake verifier, and captured logs.
#![allow(clippy::unwrap_used, dead_code, missing_debug_implementations)]

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use leasehold_csi::{
    AuthError, BrokerReachability, ExpectedPod, GrpcBroker, GrpcBrokerConfig, NodeDriver,
    NodeDriverConfig, NodeService, NodeToken, PodTokenVerifier, VerifiedPod,
};
use leasehold_proto::broker::v1 as pb;
use leasehold_proto::csi::v1 as csi;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

pub const AUDIENCE: &str = "leasehold.dev";
pub const POD_TOKEN: &str = "eyJPODTOKEN-SECRET-4f1c9a";
pub const NODE_TOKEN: &str = "NODETOKEN-SECRET-77ab";
/// Every credential byte string the fake broker hands out contains this.
pub const CRED_MARKER: &str = "CREDSECRET";

// ---------- logs ----------

/// Set by the benchmark: no log capture.
pub static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[derive(Clone, Default)]
pub struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs (once) a global subscriber at TRACE level writing into a buffer.
pub fn logs() -> LogBuffer {
    static LOGS: OnceLock<LogBuffer> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = LogBuffer::default();
        let writer = buf.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        buf
    })
    .clone()
}

impl LogBuffer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

pub fn assert_no_secrets_in_logs() {
    let text = logs().text();
    for secret in [POD_TOKEN, NODE_TOKEN, CRED_MARKER] {
        assert!(!text.contains(secret), "logs contain a secret ({secret})");
    }
}

// ---------- root / mounts ----------

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!("\n!!!!! SKIPPING {test}: needs root to mount tmpfs (CI runs as root) !!!!!\n");
    true
}

pub fn mounts_at(path: &Path) -> Vec<leasehold_csi::mount::MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    leasehold_csi::mount::parse_mountinfo(&text)
        .into_iter()
        .filter(|m| m.mount_point == canonical)
        .collect()
}

/// Detaches every mount under `dir` (test cleanup, so tempdirs can be removed).
pub fn unmount_all_under(dir: &Path) {
    let Ok(canonical) = std::fs::canonicalize(dir) else {
        return;
    };
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut points: Vec<PathBuf> = leasehold_csi::mount::parse_mountinfo(&text)
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(&canonical))
        .collect();
    points.sort();
    for p in points.iter().rev() {
        let _ = rustix::mount::unmount(p, rustix::mount::UnmountFlags::DETACH);
    }
}

/// Polls `check` until it holds; fails the test, naming `what`, after `within`.
pub async fn wait_until<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not {what} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------- fake broker ----------

#[derive(Default)]
pub struct BrokerState {
    pub version: u64,
    pub issues: usize,
    pub acks: Vec<(String, u64)>,
    pub releases: Vec<String>,
    pub bad_auth: usize,
    pub issue_delay: Duration,
    pub lifetime_secs: i64,
    /// Leases whose Issue never answers (a tenant with an unresponsive database).
    pub hang_leases: std::collections::HashSet<String>,
    /// Issues of those leases received (and left hanging).
    pub hanging: usize,
    /// Certificates signed.
    pub certificates: usize,
}

/// The fake broker's certificate lease: `Issue` answers with [`cert_profile`] and
/// `IssueCertificate` signs with [`FAKE_ISSUER`].
pub const CERT_LEASE: &str = "tls";

pub fn cert_request() -> leasehold_certs::CertificateRequest {
    leasehold_certs::CertificateRequest::server(
        "web-0",
        &["web-0.shop.svc"],
        time::Duration::hours(1),
    )
}

pub fn cert_profile() -> pb::CertificateProfile {
    pb::CertificateProfile {
        common_name: "web-0".into(),
        dns_names: vec!["web-0.shop.svc".into()],
        ip_addresses: vec![],
        uris: vec![],
        usages: vec!["ServerAuth".into(), "DigitalSignature".into()],
        key_algorithm: "EcdsaP256".into(),
    }
}

/// A `ca` issuer over a memory ledger.
pub static FAKE_ISSUER: std::sync::LazyLock<leasehold_certs::CaIssuer> =
    std::sync::LazyLock::new(|| {
        let ca = leasehold_certs::CertificateAuthority::self_signed(
            "fake broker CA",
            leasehold_certs::KeyAlgorithm::EcdsaP256,
            time::OffsetDateTime::now_utc() - time::Duration::minutes(5),
            time::Duration::days(1),
        )
        .unwrap();
        leasehold_certs::CaIssuer::new(
            Arc::new(ca),
            Arc::new(leasehold_certs::MemoryLedger::default()),
        )
    });

pub fn files_for(version: u64) -> HashMap<String, Vec<u8>> {
    let mut files = HashMap::new();
    files.insert(
        "username".to_owned(),
        format!("user-v{version:04}").into_bytes(),
    );
    // Big enough that a torn read would show.
    let password = format!("{CRED_MARKER}-v{version:04};").repeat(2000);
    files.insert("password".to_owned(), password.into_bytes());
    files.insert(
        "conf/db.properties".to_owned(),
        format!("version={version}\n").into_bytes(),
    );
    files
}

#[derive(Clone)]
struct FakeBrokerSvc(Arc<Mutex<BrokerState>>);

impl FakeBrokerSvc {
    fn check_auth<T>(&self, req: &tonic::Request<T>) -> Result<(), tonic::Status> {
        let ok = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            == Some(&format!("Bearer {NODE_TOKEN}"));
        if ok {
            Ok(())
        } else {
            self.0.lock().unwrap().bad_auth += 1;
            Err(tonic::Status::unauthenticated("node token"))
        }
    }
}

#[tonic::async_trait]
impl pb::broker_server::Broker for FakeBrokerSvc {
    async fn issue(
        &self,
        request: tonic::Request<pb::IssueRequest>,
    ) -> Result<tonic::Response<pb::IssueResponse>, tonic::Status> {
        self.check_auth(&request)?;
        let req = request.into_inner();
        if req.pod_token != POD_TOKEN {
            return Err(tonic::Status::permission_denied("pod token"));
        }
        let lease = req
            .lease
            .as_ref()
            .map(|l| l.name.clone())
            .unwrap_or_default();
        let (delay, hang) = {
            let mut s = self.0.lock().unwrap();
            let hang = s.hang_leases.contains(&lease);
            s.hanging += usize::from(hang);
            (s.issue_delay, hang)
        };
        if hang {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(delay).await;
        if lease == CERT_LEASE {
            self.0.lock().unwrap().issues += 1;
            let now = prost_types::Timestamp {
                seconds: jiff::Timestamp::now().as_second(),
                nanos: 0,
            };
            return Ok(tonic::Response::new(pb::IssueResponse {
                expires_at: Some(now),
                renew_at: Some(now),
                certificate: Some(cert_profile()),
                ..Default::default()
            }));
        }
        let (version, lifetime) = {
            let mut s = self.0.lock().unwrap();
            s.issues += 1;
            if s.version == 0 {
                s.version = 1;
            }
            (
                s.version,
                if s.lifetime_secs == 0 {
                    3600
                } else {
                    s.lifetime_secs
                },
            )
        };
        let now = jiff::Timestamp::now();
        let ts = |secs: i64| prost_types::Timestamp {
            seconds: now.as_second() + secs,
            nanos: 0,
        };
        Ok(tonic::Response::new(pb::IssueResponse {
            files: files_for(version),
            version,
            expires_at: Some(ts(lifetime)),
            renew_at: Some(ts(lifetime * 2 / 3)),
            certificate: None,
        }))
    }

    async fn issue_certificate(
        &self,
        request: tonic::Request<pb::IssueCertificateRequest>,
    ) -> Result<tonic::Response<pb::IssueCertificateResponse>, tonic::Status> {
        use leasehold_certs::CertificateIssuer;
        self.check_auth(&request)?;
        let req = request.into_inner();
        if req.pod_token != POD_TOKEN {
            return Err(tonic::Status::permission_denied("pod token"));
        }
        // What the real broker does after authorizing: sign with a `ca` issuer under a
        // fresh serial, then check the chain against the CSR.
        let request = cert_request();
        let serial = leasehold_certs::new_serial();
        let chain = FAKE_ISSUER
            .issue(leasehold_certs::IssueOrder {
                request: &request,
                csr_pem: &req.csr_pem,
                serial: &serial,
                journal: &leasehold_certs::issuer::NoJournal,
            })
            .await
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let der = |pem: &str| {
            use rustls::pki_types::pem::PemObject;
            rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
                .next()
                .unwrap()
                .unwrap()
        };
        leasehold_certs::verify::verify_leaf(
            &der(&chain.ca_pem),
            &der(&chain.leaf_pem),
            &request,
            None,
            Some(&req.csr_pem),
            time::OffsetDateTime::now_utc(),
        )
        .await
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
        self.0.lock().unwrap().certificates += 1;
        let ts = |t: time::OffsetDateTime| prost_types::Timestamp {
            seconds: t.unix_timestamp(),
            nanos: 0,
        };
        Ok(tonic::Response::new(pb::IssueCertificateResponse {
            certificate_chain_pem: chain.chain_pem,
            ca_pem: chain.ca_pem,
            serial: chain.serial,
            not_after: Some(ts(chain.not_after)),
            renew_at: Some(ts(chain.not_after - time::Duration::minutes(20))),
            certificate: Some(cert_profile()),
        }))
    }

    async fn acknowledge(
        &self,
        request: tonic::Request<pb::AcknowledgeRequest>,
    ) -> Result<tonic::Response<pb::AcknowledgeResponse>, tonic::Status> {
        self.check_auth(&request)?;
        let req = request.into_inner();
        let mut s = self.0.lock().unwrap();
        s.acks.push((req.volume_id, req.version));
        Ok(tonic::Response::new(pb::AcknowledgeResponse {
            latest_version: s.version,
        }))
    }

    async fn release(
        &self,
        request: tonic::Request<pb::ReleaseRequest>,
    ) -> Result<tonic::Response<pb::ReleaseResponse>, tonic::Status> {
        self.check_auth(&request)?;
        self.0
            .lock()
            .unwrap()
            .releases
            .push(request.into_inner().volume_id);
        Ok(tonic::Response::new(pb::ReleaseResponse {}))
    }
}

pub struct FakeBroker {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<BrokerState>>,
    task: Option<JoinHandle<()>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FakeBroker {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut broker = Self {
            addr,
            state: Arc::new(Mutex::new(BrokerState::default())),
            task: None,
            shutdown: None,
        };
        broker.serve(listener);
        broker
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let svc = pb::broker_server::BrokerServer::new(FakeBrokerSvc(self.state.clone()));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        self.shutdown = Some(tx);
        self.task = Some(tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    // TCP_NODELAY as a real broker would set it (tonic's
                    // builder option only applies to listeners it binds).
                    tokio_stream::StreamExt::map(
                        tokio_stream::wrappers::TcpListenerStream::new(listener),
                        |conn| conn.inspect(|s| drop(s.set_nodelay(true))),
                    ),
                    async move {
                        let _ = rx.await;
                    },
                )
                .await;
        }));
    }

    /// Stops the server: the listener closes and open connections are shut
    /// down (GOAWAY), so clients see connection refused afterwards.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }

    pub async fn restart(&mut self) {
        self.stop().await;
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    pub fn bump_version(&self) -> u64 {
        let mut s = self.state.lock().unwrap();
        s.version += 1;
        s.version
    }

    pub fn issues(&self) -> usize {
        self.state.lock().unwrap().issues
    }

    pub fn acks(&self) -> usize {
        self.state.lock().unwrap().acks.len()
    }

    pub fn hanging(&self) -> usize {
        self.state.lock().unwrap().hanging
    }

    pub fn releases(&self) -> Vec<String> {
        self.state.lock().unwrap().releases.clone()
    }
}

// ---------- fake verifier ----------

pub struct FakeVerifier;

#[async_trait]
impl PodTokenVerifier for FakeVerifier {
    async fn verify(&self, token: &str, expected: &ExpectedPod) -> Result<VerifiedPod, AuthError> {
        if token != POD_TOKEN {
            return Err(AuthError::Invalid("signature does not verify".into()));
        }
        if expected.pod_name == "impostor" {
            return Err(AuthError::Mismatch("token is bound to pod web-0".into()));
        }
        Ok(VerifiedPod {
            namespace: expected.namespace.clone(),
            pod_name: expected.pod_name.clone(),
            pod_uid: expected.pod_uid.clone(),
            service_account: expected.service_account.clone(),
            expires_at: None,
        })
    }
}

// ---------- driver ----------

pub struct Driver {
    pub socket: PathBuf,
    pub node: csi::node_client::NodeClient<Channel>,
    pub identity: csi::identity_client::IdentityClient<Channel>,
    pub service: NodeService,
    /// The broker client the driver uses (its `ready()` trusts no earlier check).
    pub broker: Arc<GrpcBroker>,
    /// What the driver's `/readyz` reports.
    pub reachability: BrokerReachability,
    /// The driver's metrics, under `leasehold_csi` as `leasehold node` exports them.
    pub registry: prometheus_client::registry::Registry,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), leasehold_csi::ServeError>>>,
}

pub async fn uds_channel(path: PathBuf) -> Channel {
    Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

pub async fn start_driver(dir: &Path, broker: &FakeBroker) -> Driver {
    start_driver_with(dir, broker, |_| {}).await
}

pub async fn start_driver_with(
    dir: &Path,
    broker: &FakeBroker,
    tweak: impl FnOnce(&mut NodeDriverConfig),
) -> Driver {
    if !QUIET.load(std::sync::atomic::Ordering::Relaxed) {
        logs();
    }
    let socket = dir.join("csi.sock");
    let mut config = NodeDriverConfig::new(&socket, "node-a", dir.join("state"), AUDIENCE);
    config.broker_timeout = Duration::from_secs(5);
    // Where `target_under` puts targets.
    config.kubelet_dir = dir.join("kubelet");
    tweak(&mut config);
    let grpc = GrpcBroker::new(GrpcBrokerConfig {
        endpoint: format!("http://{}", broker.addr),
        ca_file: None,
        tls_server_name: None,
        node_token: NodeToken::Static(NODE_TOKEN.into()),
        call_timeout: Duration::from_secs(5),
        // A test sees the broker's state at once.
        ready_cache: Duration::ZERO,
    })
    .unwrap();
    let grpc = Arc::new(grpc);
    let mut registry = prometheus_client::registry::Registry::default();
    let driver = NodeDriver::new(
        config,
        Arc::new(FakeVerifier),
        grpc.clone(),
        registry.sub_registry_with_prefix("leasehold_csi"),
    )
    .unwrap();
    let service = driver.node_service().clone();
    let reachability = driver.broker_reachability();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(driver.run(async move {
        let _ = rx.await;
    }));
    // Wait for the new listener (a stale socket file may exist before it).
    for _ in 0..500 {
        if tokio::net::UnixStream::connect(&socket).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let channel = uds_channel(socket.clone()).await;
    Driver {
        socket,
        node: csi::node_client::NodeClient::new(channel.clone()),
        identity: csi::identity_client::IdentityClient::new(channel),
        service,
        broker: grpc,
        reachability,
        registry,
        shutdown: Some(tx),
        task: Some(task),
    }
}

impl Driver {
    /// The value of a metric series in the driver's registry (`name` with labels as
    /// exported), if it is there.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text.lines().find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().unwrap())
        })
    }

    pub async fn stop(mut self) {
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

// ---------- requests ----------

pub struct Pub<'a> {
    pub volume_id: &'a str,
    pub target: &'a Path,
    pub lease: Option<&'a str>,
    pub token: Option<&'a str>,
    pub gid: Option<u32>,
    pub readonly: bool,
    pub ephemeral: &'a str,
    pub pod_name: &'a str,
    /// The pod UID in the volume context; default: the one in the target path.
    pub pod_uid: Option<&'a str>,
}

/// The pod UID of a kubelet-like target path (`.../pods/<uid>/volumes/...`).
pub fn uid_of_target(target: &Path) -> String {
    let parts: Vec<_> = target
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    parts
        .iter()
        .rposition(|p| p == "pods")
        .and_then(|i| parts.get(i + 1).cloned())
        .unwrap_or_else(|| "6c1e-uid-0001".to_owned())
}

impl<'a> Pub<'a> {
    pub fn new(volume_id: &'a str, target: &'a Path) -> Self {
        Self {
            volume_id,
            target,
            lease: Some("db"),
            token: Some(POD_TOKEN),
            gid: None,
            readonly: true,
            ephemeral: "true",
            pod_name: "web-0",
            pod_uid: None,
        }
    }

    pub fn build(&self) -> csi::NodePublishVolumeRequest {
        use csi::volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode};
        let mut ctx = HashMap::new();
        ctx.insert("csi.storage.k8s.io/pod.name".into(), self.pod_name.into());
        ctx.insert("csi.storage.k8s.io/pod.namespace".into(), "shop".into());
        let uid = self
            .pod_uid
            .map_or_else(|| uid_of_target(self.target), str::to_owned);
        ctx.insert("csi.storage.k8s.io/pod.uid".into(), uid);
        ctx.insert(
            "csi.storage.k8s.io/serviceAccount.name".into(),
            "web".into(),
        );
        ctx.insert("csi.storage.k8s.io/ephemeral".into(), self.ephemeral.into());
        if let Some(lease) = self.lease {
            ctx.insert("lease".into(), lease.into());
        }
        if let Some(token) = self.token {
            ctx.insert(
                "csi.storage.k8s.io/serviceAccount.tokens".into(),
                format!(r#"{{"{AUDIENCE}":{{"token":"{token}","expirationTimestamp":"2030-01-01T00:00:00Z"}}}}"#),
            );
        }
        csi::NodePublishVolumeRequest {
            volume_id: self.volume_id.into(),
            target_path: self.target.to_string_lossy().into_owned(),
            volume_capability: Some(csi::VolumeCapability {
                access_type: Some(AccessType::Mount(MountVolume {
                    fs_type: String::new(),
                    mount_flags: vec![],
                    volume_mount_group: self.gid.map(|g| g.to_string()).unwrap_or_default(),
                })),
                access_mode: Some(AccessMode {
                    mode: Mode::SingleNodeWriter as i32,
                }),
            }),
            readonly: self.readonly,
            volume_context: ctx,
            ..Default::default()
        }
    }
}

pub fn unpublish_req(volume_id: &str, target: &Path) -> csi::NodeUnpublishVolumeRequest {
    csi::NodeUnpublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: target.to_string_lossy().into_owned(),
    }
}

/// A kubelet-like target path under `dir` (the parent exists, the target does not).
pub fn target_under(dir: &Path, pod: &str) -> PathBuf {
    let parent = dir
        .join("kubelet/pods")
        .join(pod)
        .join("volumes/kubernetes.io~csi/creds");
    std::fs::create_dir_all(&parent).unwrap();
    parent.join("mount")
}
