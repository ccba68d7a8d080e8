//! Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` server.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::OperatorError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub controller: String,
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaseLabels {
    pub namespace: String,
    pub lease: String,
}

/// Every metric the operator exports, in one registry.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ControllerLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    duration: Histogram,
    rotations: Family<OutcomeLabels, Counter>,
    revocations_pending: Gauge,
    expiry: Family<LeaseLabels, Gauge>,
    emergency_revocations: Family<LeaseLabels, Counter>,
    suspended: Family<LeaseLabels, Gauge>,
    /// Pending revocations per lease; the gauge is their sum.
    pending_by_lease: Mutex<HashMap<(String, String), i64>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let reconciles = Family::<ControllerLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let rotations = Family::<OutcomeLabels, Counter>::default();
        let revocations_pending = Gauge::default();
        let expiry = Family::<LeaseLabels, Gauge>::default();
        let emergency_revocations = Family::<LeaseLabels, Counter>::default();
        let suspended = Family::<LeaseLabels, Gauge>::default();
        let sub = registry.sub_registry_with_prefix("leasehold");
        sub.register(
            "reconciles",
            "Reconciles run, by controller",
            reconciles.clone(),
        );
        sub.register(
            "reconcile_failures",
            "Reconciles that failed, by controller and error kind",
            failures.clone(),
        );
        sub.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            duration.clone(),
        );
        sub.register(
            "rotations",
            "Finished rotations, by outcome",
            rotations.clone(),
        );
        sub.register(
            "revocations_pending",
            "Superseded or failed credential versions not yet revoked",
            revocations_pending.clone(),
        );
        sub.register(
            "credential_expiry_timestamp_seconds",
            "When the current credential of a lease expires (Unix seconds)",
            expiry.clone(),
        );
        sub.register(
            "emergency_revocations",
            "Emergency revocations requested (leasehold.dev/revoke-now), by lease",
            emergency_revocations.clone(),
        );
        sub.register(
            "lease_suspended",
            "1 while a lease has spec.suspend set (nothing is rotated or revoked)",
            suspended.clone(),
        );
        Self {
            registry,
            reconciles,
            failures,
            duration,
            rotations,
            revocations_pending,
            expiry,
            emergency_revocations,
            suspended,
            pending_by_lease: Mutex::default(),
        }
    }

    pub fn reconciled(&self, controller: &str, seconds: f64) {
        self.reconciles
            .get_or_create(&ControllerLabels {
                controller: controller.into(),
            })
            .inc();
        self.duration.observe(seconds);
    }

    pub fn failed(&self, controller: &str, error: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                controller: controller.into(),
                error: error.into(),
            })
            .inc();
    }

    pub fn rotation(&self, outcome: &str) {
        self.rotations
            .get_or_create(&OutcomeLabels {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// An emergency revocation of `namespace/lease` began.
    pub fn emergency_revocation(&self, namespace: &str, lease: &str) {
        self.emergency_revocations
            .get_or_create(&LeaseLabels {
                namespace: namespace.into(),
                lease: lease.into(),
            })
            .inc();
    }

    /// Whether `namespace/lease` is suspended (`spec.suspend`); the series exists only while it is.
    pub fn lease_suspended(&self, namespace: &str, lease: &str, suspended: bool) {
        let labels = LeaseLabels {
            namespace: namespace.into(),
            lease: lease.into(),
        };
        if suspended {
            self.suspended.get_or_create(&labels).set(1);
        } else {
            self.suspended.remove(&labels);
        }
    }

    /// Record a lease's expiry and pending revocations; `None` expiry removes the series.
    pub fn lease_state(&self, namespace: &str, lease: &str, expires_at: Option<i64>, pending: i64) {
        let labels = LeaseLabels {
            namespace: namespace.into(),
            lease: lease.into(),
        };
        match expires_at {
            Some(t) => {
                self.expiry.get_or_create(&labels).set(t);
            }
            None => {
                self.expiry.remove(&labels);
            }
        }
        let mut map = self
            .pending_by_lease
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if pending == 0 {
            map.remove(&(labels.namespace, labels.lease));
        } else {
            map.insert((labels.namespace, labels.lease), pending);
        }
        self.revocations_pending.set(map.values().sum());
    }

    /// The text exposition format.
    /// Register more metrics (the broker's) before the metrics are shared.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// What `/readyz` reports.
#[derive(Debug, Default)]
pub struct Health {
    /// Leadership is settled: this replica leads with synced caches, or stands by.
    pub ready: AtomicBool,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct ServerState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// The HTTP routes (exposed for tests).
pub fn router(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(ServerState { metrics, health })
}

async fn metrics_handler(State(s): State<ServerState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn readyz(State(s): State<ServerState>) -> impl IntoResponse {
    if s.health.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// Serve until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), OperatorError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(OperatorError::Server)?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, router(metrics, health))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(OperatorError::Server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_the_documented_names() {
        let m = Metrics::new();
        m.reconciled("secretlease", 0.01);
        m.failed("secretlease", "backend");
        m.rotation("Succeeded");
        m.lease_state("shop", "orders-db", Some(1_900_000_000), 1);
        let text = m.encode();
        for name in [
            "leasehold_reconciles_total{controller=\"secretlease\"} 1",
            "leasehold_reconcile_failures_total{controller=\"secretlease\",error=\"backend\"} 1",
            "leasehold_reconcile_duration_seconds_count 1",
            "leasehold_rotations_total{outcome=\"Succeeded\"} 1",
            "leasehold_revocations_pending 1",
            "leasehold_credential_expiry_timestamp_seconds{namespace=\"shop\",lease=\"orders-db\"} 1900000000",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        m.lease_state("shop", "orders-db", None, 0);
        let text = m.encode();
        assert!(text.contains("leasehold_revocations_pending 0"));
        assert!(!text.contains("orders-db"));
    }
}
