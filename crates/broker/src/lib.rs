//! The leasehold broker: a gRPC service, run inside the controller, through
//! which node drivers obtain lease credentials for the CSI volumes of pods on
//! their node, report the versions they hold, and release volumes.
//!
//! - [`authz`]: the authorization rules as pure functions.
//! - [`certificates`]: per-pod certificates of certificate leases (CSR in, chain out).
//! - [`cluster`]: the objects it reads ([`ClusterView`]), over the API server or in memory.
//! - [`cluster_cache`]: the same, from watch caches ([`CachedClusterView`]), live when they lag.
//! - [`consumers`]: `status.consumers` of leases, coalesced server-side apply.
//! - [`limits`]: per-lease and connection limits ([`BrokerLimits`]).
//! - [`per_pod`]: credentials of `perPod` leases, one database user per pod.
//! - [`service`]: the tonic service [`BrokerService`].
//! - [`sweep`]: revokes per-pod users of pods that no longer exist (called by the controller),
//!   each record's pod looked up in the record's own namespace ([`PodLister`]).
//! - [`tls`] and [`server`]: TLS material that works out of the box, and serving.
//!
//! ```no_run
//! # async fn run(client: kube::Client, node_verifier: std::sync::Arc<leasehold_auth::TokenVerifier>,
//! #     pod_verifier: std::sync::Arc<leasehold_auth::TokenVerifier>,
//! #     registry: &mut prometheus_client::registry::Registry,
//! #     backends: leasehold_engine::BackendRegistry,
//! #     keyring: std::sync::Arc<leasehold_envelope::Keyring>) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use leasehold_broker::*;
//!
//! let settings = TlsSettings::new("leasehold-system", "leasehold-broker",
//!     "leasehold-broker-tls", "leasehold-broker-ca");
//! // The CA and serving keys are sealed with `keyring` (`Keyring::unencrypted()` opts out).
//! let tls = BrokerTls::ensure(client.clone(), &settings, &keyring).await?;
//! tls.spawn_renewal(client.clone(), settings, keyring.clone(), std::time::Duration::from_secs(3600));
//! let cluster: Arc<dyn ClusterView> = Arc::new(KubeClusterView::new(client.clone()));
//! let per_pod = EnginePerPodIssuer::new(cluster.clone(),
//!     Arc::new(KubePodCredentialStore::new(client.clone(), keyring.clone())), backends);
//! let service = BrokerService::new(
//!     BrokerConfig::new("leasehold-system", "leasehold-csi"),
//!     Verifiers { node: node_verifier, pod: pod_verifier },
//!     cluster,
//!     Arc::new(CoalescingRecorder::kube(client.clone())),
//! )
//! .with_per_pod(Arc::new(per_pod))
//! .with_metrics(BrokerMetrics::register(registry));
//! serve("0.0.0.0:8443".parse()?, &tls, service, std::future::pending()).await?;
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

pub mod authz;
pub mod certificates;
pub mod cluster;
pub mod cluster_cache;
pub mod consumers;
pub mod error;
pub mod limits;
pub mod metrics;
pub mod per_pod;
pub mod server;
pub mod service;
pub mod sweep;
#[cfg(test)]
mod test_keys;
pub mod tls;

pub use authz::{Deny, NodeDriverAccount};
pub use certificates::{
    CertificateIssuers, IssuerLookupError, KubePodCertificateStore, MemoryCertificateIssuers,
    MemoryPodCertificateStore, PodCertificateRecord, PodCertificateStore, PodCertificates,
};
pub use cluster::{ClusterView, KubeClusterView, MemoryCluster, PodExpectation, SecretData};
pub use cluster_cache::CachedClusterView;
pub use consumers::{
    CoalescingRecorder, ConsumerRecorder, ConsumerStore, KubeConsumerStore, MemoryConsumerStore,
    ObjectRef,
};
pub use error::BrokerError;
pub use leasehold_envelope::Keyring;
pub use limits::BrokerLimits;
pub use metrics::{BrokerMetrics, ClusterReadMetrics};
pub use per_pod::{
    EnginePerPodIssuer, KubePodCredentialStore, MemoryPodCredentialStore, PerPodIssuer,
    PodCredential, PodCredentialStore,
};
pub use server::{
    ConnectionSettings, ServeError, serve, serve_with_listener, serve_with_listener_limited,
    serve_with_settings,
};
pub use service::{BrokerConfig, BrokerService, ServingGate, Verifiers};
pub use sweep::{KubePodLister, LivePods, PodLister};
pub use tls::{BrokerTls, CertPem, TlsSettings};
