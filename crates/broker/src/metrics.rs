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

/// Broker metrics; clones share the same series.
#[derive(Debug, Clone)]
pub struct BrokerMetrics {
    requests: Family<RequestLabels, Counter>,
    durations: Family<MethodLabels, Histogram, fn() -> Histogram>,
}

impl Default for BrokerMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            durations: Family::new_with_constructor(duration_histogram),
        }
    }
}

impl BrokerMetrics {
    /// Registers `leasehold_broker_requests_total{method,code}` and
    /// `leasehold_broker_request_duration_seconds{method}` in `registry`.
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
        m
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
