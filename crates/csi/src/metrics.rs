//! Prometheus metrics of the node driver.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The gRPC result code of a call.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    /// For example `Ok`, `InvalidArgument`, `Unavailable`.
    pub code: String,
}

/// A step of NodePublishVolume.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    /// `check` (request, volume record and mount), `prepare` (waiting for a slot),
    /// `verify_token`,
    /// `broker_issue`, `place` (tmpfs, files, state), `acknowledge`.
    pub step: String,
}

fn step_histogram() -> Histogram {
    // 0.1 ms .. ~1.6 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 15))
}

/// Node driver metrics; clones share the same series.
#[derive(Debug, Clone)]
pub struct NodeMetrics {
    publishes: Family<CodeLabels, Counter>,
    unpublishes: Family<CodeLabels, Counter>,
    publish_seconds: Histogram,
    volumes: Gauge,
    steps: Family<StepLabels, Histogram, fn() -> Histogram>,
    broker_reachable: Gauge,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        Self {
            publishes: Family::default(),
            unpublishes: Family::default(),
            // 1 ms .. ~16 s.
            publish_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            volumes: Gauge::default(),
            steps: Family::new_with_constructor(step_histogram),
            broker_reachable: Gauge::default(),
        }
    }
}

impl NodeMetrics {
    /// Metrics registered under `registry` (use a sub-registry such as
    /// `registry.sub_registry_with_prefix("leasehold_csi")`).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "node_publish",
            "NodePublishVolume calls by result code",
            m.publishes.clone(),
        );
        registry.register(
            "node_unpublish",
            "NodeUnpublishVolume calls by result code",
            m.unpublishes.clone(),
        );
        registry.register(
            "node_publish_duration_seconds",
            "NodePublishVolume handling time",
            m.publish_seconds.clone(),
        );
        registry.register(
            "volumes_published",
            "Volumes currently published on this node",
            m.volumes.clone(),
        );
        registry.register(
            "publish_step_duration_seconds",
            "Time spent in each step of NodePublishVolume (where a publish's time goes)",
            m.steps.clone(),
        );
        registry.register(
            "broker_reachable",
            "1 when the broker answered the driver's last reachability check (what /readyz reports), 0 otherwise",
            m.broker_reachable.clone(),
        );
        m
    }

    /// Count a finished NodePublishVolume.
    pub fn publish_done(&self, code: tonic::Code, seconds: f64) {
        self.publishes
            .get_or_create(&CodeLabels {
                code: format!("{code:?}"),
            })
            .inc();
        self.publish_seconds.observe(seconds);
    }

    /// Count a finished NodeUnpublishVolume.
    pub fn unpublish_done(&self, code: tonic::Code) {
        self.unpublishes
            .get_or_create(&CodeLabels {
                code: format!("{code:?}"),
            })
            .inc();
    }

    /// Whether the broker answered the last reachability check.
    pub fn broker_reachable(&self) -> bool {
        self.broker_reachable.get() == 1
    }

    pub(crate) fn set_broker_reachable(&self, reachable: bool) {
        self.broker_reachable.set(i64::from(reachable));
    }

    pub(crate) fn set_volumes(&self, n: usize) {
        self.volumes.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

impl leasehold_core::timing::StepSink for NodeMetrics {
    /// Record `seconds` spent in `step` of a publish.
    fn step(&self, step: &str, seconds: f64) {
        self.steps
            .get_or_create(&StepLabels {
                step: step.to_owned(),
            })
            .observe(seconds);
    }
}
