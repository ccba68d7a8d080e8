//! Prometheus metrics of key-encryption-key calls and the data-key cache.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::{EnvelopeError, KeyKind};

/// A key-encryption-key operation, as the `operation` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    GenerateDataKey,
    Decrypt,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Self::GenerateDataKey => "generate_data_key",
            Self::Decrypt => "decrypt",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    operation: &'static str,
    outcome: &'static str,
    key: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DurationLabels {
    operation: &'static str,
    key: &'static str,
}

fn duration_histogram() -> Histogram {
    // 50 µs (a local key) up to about 7 s (a KMS call that timed out).
    Histogram::new(exponential_buckets(0.000_05, 2.5, 14))
}

/// Counters and histograms shared by clones of one keyring.
#[derive(Debug, Clone)]
pub(crate) struct KeyringMetrics {
    requests: Family<RequestLabels, Counter>,
    cache_hits: Counter,
    durations: Family<DurationLabels, Histogram, fn() -> Histogram>,
}

impl Default for KeyringMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            cache_hits: Counter::default(),
            durations: Family::new_with_constructor(duration_histogram),
        }
    }
}

impl KeyringMetrics {
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "leasehold_kms_requests",
            "Calls to key-encryption keys (KMS or local) by operation and outcome",
            self.requests.clone(),
        );
        registry.register(
            "leasehold_kms_data_key_cache_hits",
            "Opens served by a cached data key, without a key-encryption-key call",
            self.cache_hits.clone(),
        );
        registry.register(
            "leasehold_kms_request_duration_seconds",
            "Duration of calls to key-encryption keys",
            self.durations.clone(),
        );
    }

    pub(crate) fn record<T>(
        &self,
        operation: Operation,
        key: KeyKind,
        elapsed: Duration,
        result: &Result<T, EnvelopeError>,
    ) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(EnvelopeError::KeyUnavailable { .. }) => "unavailable",
            Err(EnvelopeError::KeyRefused { .. }) => "refused",
            Err(EnvelopeError::Tampered { .. }) => "tampered",
            Err(_) => "error",
        };
        self.requests
            .get_or_create(&RequestLabels {
                operation: operation.as_str(),
                outcome,
                key: key.as_str(),
            })
            .inc();
        self.durations
            .get_or_create(&DurationLabels {
                operation: operation.as_str(),
                key: key.as_str(),
            })
            .observe(elapsed.as_secs_f64());
    }

    pub(crate) fn cache_hit(&self) {
        self.cache_hits.inc();
    }
}
