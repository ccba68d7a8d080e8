//! Prometheus metrics of the broker.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Method and result code of a call.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `Issue`, `Acknowledge` or `Release`.
    pub method: String,
    /// gRPC code, for example `Ok` or `PermissionDenied`.
    pub code: String,
}

/// The method of a call.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// `Issue`, `Acknowledge` or `Release`.
    pub method: String,
}

fn duration_histogram() -> Histogram {
    // 0.5 ms .. ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// The kind of object a cluster read was for, and how the cache answered it.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLookupLabels {
    /// `pod`, `namespace`, `secretlease`, `rotationpolicy` or `secret`.
    pub kind: String,
    /// `hit` (served from the cache), `miss` (not cached, or the cache not synced
    /// yet: read live) or `stale` (cached but not good enough: read live).
    pub result: String,
}

/// The kind of object read from the API server.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `pod`, `namespace`, `secretlease`, `rotationpolicy` or `secret`.
    pub kind: String,
}

/// Counters of the broker's cluster reads: cache answers and live API reads.
/// Clones share the same series.
#[derive(Debug, Clone, Default)]
pub struct ClusterReadMetrics {
    lookups: Family<CacheLookupLabels, Counter>,
    api_reads: Family<KindLabels, Counter>,
}

impl ClusterReadMetrics {
    /// Counts one cache lookup of `kind` answered with `result` (`hit`, `miss`, `stale`).
    pub fn lookup(&self, kind: &str, result: &str) {
        self.lookups
            .get_or_create(&CacheLookupLabels {
                kind: kind.to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }

    /// Counts one GET of `kind` sent to the API server.
    pub fn api_read(&self, kind: &str) {
        self.api_reads
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Cache lookups of `kind` answered with `result` so far.
    pub fn lookups(&self, kind: &str, result: &str) -> u64 {
        self.lookups
            .get_or_create(&CacheLookupLabels {
                kind: kind.to_owned(),
                result: result.to_owned(),
            })
            .get()
    }

    /// GETs of `kind` sent so far.
    pub fn api_reads(&self, kind: &str) -> u64 {
        self.api_reads
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .get()
    }
}

/// Broker metrics; clones share the same series.
#[derive(Debug, Clone)]
pub struct BrokerMetrics {
    requests: Family<RequestLabels, Counter>,
    durations: Family<MethodLabels, Histogram, fn() -> Histogram>,
    cluster_reads: ClusterReadMetrics,
    steps: Family<StepLabels, Histogram, fn() -> Histogram>,
}

/// A step of a broker call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct StepLabels {
    /// `node_token`, `pod_token`, `facts` (pod, lease, policy, namespace: cache or live),
    /// `enforce`, `credential` (versions Secret, decrypt, render), `record` (consumer).
    pub step: String,
}

fn step_histogram() -> Histogram {
    // 0.05 ms .. ~0.8 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.00005, 2.0, 15,
    ))
}

impl Default for BrokerMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            durations: Family::new_with_constructor(duration_histogram),
            cluster_reads: ClusterReadMetrics::default(),
            steps: Family::new_with_constructor(step_histogram),
        }
    }
}

impl BrokerMetrics {
    /// Registers `leasehold_broker_requests_total{method,code}`,
    /// `leasehold_broker_request_duration_seconds{method}`,
    /// `leasehold_broker_cache_lookups_total{kind,result}` and
    /// `leasehold_broker_api_reads_total{kind}` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let sub = registry.sub_registry_with_prefix("leasehold_broker");
        sub.register(
            "requests",
            "Broker calls by method and gRPC result code",
            m.requests.clone(),
        );
        sub.register(
            "request_duration_seconds",
            "Broker call handling time",
            m.durations.clone(),
        );
        sub.register(
            "cache_lookups",
            "Cluster reads answered by the broker's watch caches, by kind and result (hit, miss, stale)",
            m.cluster_reads.lookups.clone(),
        );
        sub.register(
            "api_reads",
            "Objects the broker read live from the API server, by kind",
            m.cluster_reads.api_reads.clone(),
        );
        sub.register(
            "step_duration_seconds",
            "Time spent in each step of Issue and Acknowledge (where a call's time goes)",
            m.steps.clone(),
        );
        m
    }

    /// The counters of cluster reads, for [`crate::CachedClusterView`] and
    /// [`crate::KubeClusterView`].
    pub fn cluster_reads(&self) -> ClusterReadMetrics {
        self.cluster_reads.clone()
    }

    /// Records one finished call.
    pub fn observe(&self, method: &str, code: tonic::Code, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_owned(),
                code: format!("{code:?}"),
            })
            .inc();
        self.durations
            .get_or_create(&MethodLabels {
                method: method.to_owned(),
            })
            .observe(seconds);
    }
}

impl leasehold_core::timing::StepSink for BrokerMetrics {
    /// Record `seconds` spent in `step` of a call.
    fn step(&self, step: &str, seconds: f64) {
        self.steps
            .get_or_create(&StepLabels {
                step: step.to_owned(),
            })
            .observe(seconds);
    }
}
