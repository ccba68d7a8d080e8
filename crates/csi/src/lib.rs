//! leasehold's CSI node driver.
//!
//! Serves the CSI Identity and Node services on a Unix socket for inline
//! ephemeral volumes: each volume is a tmpfs at the pod's target path holding
//! one lease's credential, issued by the broker for that pod, refreshed on
//! republish (`requiresRepublish`) and released on unpublish.
//!
//! The lead's binary calls, for example:
//!
//! ```ignore
//! let broker = Arc::new(GrpcBroker::new(GrpcBrokerConfig { .. })?);
//! let verifier: Arc<dyn PodTokenVerifier> = Arc::new(my_verifier);
//! let driver = NodeDriver::new(config, verifier, broker, &mut registry)?;
//! driver.run(shutdown_signal).await?;
//! ```

#![forbid(unsafe_code)]

pub mod auth;
pub mod broker;
pub mod certificate;
pub mod context;
pub mod identity;
pub mod metrics;
pub mod mount;
pub mod node;
pub mod server;
pub mod state;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use auth::{AuthError, ExpectedPod, PodTokenVerifier, VerifiedPod};
pub use broker::{
    BrokerError, CertificateProfile, CredentialBroker, DEFAULT_READY_CACHE, GrpcBroker,
    GrpcBrokerConfig, IssuedCertificate, IssuedCredential, LeaseRef, NodeToken, PodInfo, VolumeRef,
};
pub use identity::{DRIVER_NAME, IdentityService};
pub use metrics::NodeMetrics;
pub use node::NodeService;
pub use server::{ServeError, bind_socket, serve};

/// Default tmpfs size per volume: 1 MiB.
pub const DEFAULT_TMPFS_SIZE: u64 = 1024 * 1024;
/// Upper bound of the broker deadline: the kubelet gives a CSI call 2 minutes.
pub const MAX_BROKER_TIMEOUT: Duration = Duration::from_secs(85);

/// Settings of the node driver.
#[derive(Debug, Clone)]
pub struct NodeDriverConfig {
    /// The CSI socket (`CSI_ENDPOINT` without `unix://`).
    pub socket_path: PathBuf,
    /// This node's name: the CSI node id and what the broker checks.
    pub node_name: String,
    /// Where per-volume metadata lives (a hostPath that survives restarts).
    pub state_dir: PathBuf,
    /// Audience of the pod tokens the kubelet passes (`CSIDriver.tokenRequests`).
    pub token_audience: String,
    /// tmpfs `size=` per volume.
    pub tmpfs_size_bytes: u64,
    /// First publishes that may run at once; more wait (then
    /// `RESOURCE_EXHAUSTED`). Republishes (renewals) of published volumes
    /// have as many slots of their own (the renewal pool), so they never wait
    /// behind these.
    pub publish_concurrency: usize,
    /// Fresh publishes of one lease that may run at once, so a lease whose database or
    /// broker hangs cannot take every publish slot; more wait in the lease's queue
    /// (see `per_lease_waiting`). Renewals do not count here.
    pub per_lease_concurrency: usize,
    /// Renewals (republishes of published volumes) of one lease that may run at once;
    /// `None`: a quarter of the renewal pool (`publish_concurrency / 4`, at least 1),
    /// so a hanging lease holds at most a quarter of the node's renewal slots and
    /// three hanging leases still leave some for every other lease. See
    /// [`NodeDriverConfig::per_lease_renewal_slots`].
    pub per_lease_renewal_concurrency: Option<usize>,
    /// Calls of one lease that may wait for one of its slots, fresh publishes and
    /// renewals counted apart (each waits at most the broker deadline, then
    /// `RESOURCE_EXHAUSTED`); more are refused at once with `RESOURCE_EXHAUSTED` (the
    /// kubelet retries). 0: never wait.
    pub per_lease_waiting: usize,
    /// Deadline of each broker call (clamped to [`MAX_BROKER_TIMEOUT`]).
    pub broker_timeout: Duration,
    /// How often failed releases are retried.
    pub release_retry_interval: Duration,
    /// How often the broker's reachability is checked (for `/readyz` and the
    /// `broker_reachable` gauge; never for the CSI `Probe`).
    pub broker_check_interval: Duration,
    /// The kubelet's root directory: every target path must be
    /// `<kubelet_dir>/pods/<pod uid>/volumes/kubernetes.io~csi/<volume>/mount`.
    pub kubelet_dir: PathBuf,
}

/// The kubelet's default root directory.
pub const DEFAULT_KUBELET_DIR: &str = "/var/lib/kubelet";

impl NodeDriverConfig {
    /// Defaults for everything but the identity of the node and its paths.
    pub fn new(
        socket_path: impl Into<PathBuf>,
        node_name: impl Into<String>,
        state_dir: impl Into<PathBuf>,
        token_audience: impl Into<String>,
    ) -> Self {
        Self {
            socket_path: socket_path.into(),
            node_name: node_name.into(),
            state_dir: state_dir.into(),
            token_audience: token_audience.into(),
            tmpfs_size_bytes: DEFAULT_TMPFS_SIZE,
            publish_concurrency: 16,
            per_lease_concurrency: 8,
            per_lease_renewal_concurrency: None,
            per_lease_waiting: 512,
            broker_timeout: Duration::from_secs(30),
            release_retry_interval: Duration::from_secs(60),
            broker_check_interval: Duration::from_secs(5),
            kubelet_dir: PathBuf::from(DEFAULT_KUBELET_DIR),
        }
    }

    /// Renewal slots of one lease: `per_lease_renewal_concurrency`, or a quarter of the
    /// renewal pool when unset; at least 1 and at most the pool.
    pub fn per_lease_renewal_slots(&self) -> usize {
        let pool = self.publish_concurrency.max(1);
        self.per_lease_renewal_concurrency
            .unwrap_or(pool / 4)
            .clamp(1, pool)
    }
}

/// A ready-to-run node driver: services built, metrics registered.
#[derive(Debug)]
pub struct NodeDriver {
    socket_path: PathBuf,
    release_retry_interval: Duration,
    broker_check_interval: Duration,
    identity: IdentityService,
    node: NodeService,
}

/// Whether the broker answered the driver's last reachability check: what the
/// driver's `/readyz` reports (the `broker_reachable` gauge). A broker outage makes
/// the driver not ready, never not live: the CSI `Probe` does not consult it.
#[derive(Debug, Clone)]
pub struct BrokerReachability {
    metrics: NodeMetrics,
}

impl BrokerReachability {
    /// The result of the last check (false before the first).
    pub fn is_reachable(&self) -> bool {
        self.metrics.broker_reachable()
    }
}

impl NodeDriver {
    /// Opens the state directory, resumes known volumes and registers metrics
    /// into `registry` (give it a sub-registry, e.g. prefixed `leasehold_csi`).
    pub fn new(
        mut config: NodeDriverConfig,
        verifier: Arc<dyn PodTokenVerifier>,
        broker: Arc<dyn CredentialBroker>,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Result<Self, ServeError> {
        config.broker_timeout = config.broker_timeout.min(MAX_BROKER_TIMEOUT);
        let state = state::StateStore::open(&config.state_dir).map_err(ServeError::State)?;
        let metrics = NodeMetrics::register(registry);
        let socket_path = config.socket_path.clone();
        let release_retry_interval = config.release_retry_interval;
        let broker_check_interval = config.broker_check_interval;
        let identity = IdentityService::new();
        let node = NodeService::new(config, verifier, broker, state, metrics);
        Ok(Self {
            socket_path,
            release_retry_interval,
            broker_check_interval,
            identity,
            node,
        })
    }

    /// The Node service (for callers that build their own server).
    pub fn node_service(&self) -> &NodeService {
        &self.node
    }

    /// The broker's reachability as [`NodeDriver::run`] keeps checking it.
    pub fn broker_reachability(&self) -> BrokerReachability {
        BrokerReachability {
            metrics: self.node.inner.metrics.clone(),
        }
    }

    /// Serves until `shutdown` completes; retries failed releases and checks the
    /// broker's reachability meanwhile.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServeError> {
        let node = self.node.clone();
        let interval = self.release_retry_interval;
        let retry = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                node.retry_pending_releases().await;
            }
        });
        let broker = self.node.inner.broker.clone();
        let metrics = self.node.inner.metrics.clone();
        let interval = self.broker_check_interval;
        let check = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                metrics.set_broker_reachable(broker.ready().await);
            }
        });
        let result = serve(&self.socket_path, self.identity, self.node, shutdown).await;
        retry.abort();
        check.abort();
        result
    }
}

/// Builds and runs the driver with its own (unexported) metrics registry.
/// Use [`NodeDriver`] to expose metrics.
pub async fn run(
    config: NodeDriverConfig,
    verifier: Arc<dyn PodTokenVerifier>,
    broker: Arc<dyn CredentialBroker>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let mut registry = prometheus_client::registry::Registry::default();
    NodeDriver::new(config, verifier, broker, &mut registry)?
        .run(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_renews_with_a_quarter_of_the_renewal_pool_unless_told() {
        let mut config = NodeDriverConfig::new("/csi.sock", "node-a", "/state", "aud");
        assert_eq!(config.publish_concurrency, 16);
        assert_eq!(config.per_lease_renewal_slots(), 4, "16 / 4");
        config.publish_concurrency = 2;
        assert_eq!(config.per_lease_renewal_slots(), 1, "never 0");
        config.per_lease_renewal_concurrency = Some(3);
        assert_eq!(
            config.per_lease_renewal_slots(),
            2,
            "never more than the pool"
        );
        config.publish_concurrency = 16;
        assert_eq!(config.per_lease_renewal_slots(), 3);
    }
}
