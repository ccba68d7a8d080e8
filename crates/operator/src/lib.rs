//! The Kubernetes side of leasehold.
//!
//! - [`lease_controller`]: SecretLease reconcile (finalizer, engine, conditions).
//! - [`policy_controller`]: RotationPolicy validation status.
//! - [`status`], [`secrets`], [`delivery`]: the engine's stores on Kubernetes.
//! - [`events`], [`metrics`], [`leader`]: events, Prometheus metrics and health, leader election.
//! - [`issuers`]: Issuer/ClusterIssuer reconcile and the [`IssuerRegistry`] leases resolve
//!   issuers through; [`crl`]: the revocation ledger ConfigMap and CRL refresh;
//!   [`crl_http`]: CRLs and CA certificates over HTTP; [`acme_issuer`]: ACME accounts
//!   kept in Secrets and the `acme` issuers (with one HTTP-01 solver per process).
//!
//! [`run`] wires them together; the `leasehold controller` subcommand calls it.

#![forbid(unsafe_code)]

pub mod acme_issuer;
pub mod audit;
pub mod broker;
pub mod crl;
pub mod crl_http;
pub mod delivery;
pub mod error;
pub mod events;
pub mod issuers;
pub mod keys;
pub mod leader;
pub mod lease_controller;
pub mod metrics;
pub mod policy_controller;
pub mod secrets;
pub mod status;

use std::net::SocketAddr;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use leasehold_api::{ClusterIssuer, Issuer, RotationPolicy, SecretLease};
use tokio::sync::watch;

pub use error::OperatorError;
pub use issuers::{IssuerKey, IssuerNotReady, IssuerRegistry};
pub use leader::{
    LeaderElectionConfig, LeadershipAction, LeadershipFence, NotLeader, decide_leadership,
};
pub use lease_controller::Context;

/// How the controller runs (no CLI types: the CLI maps its flags onto this).
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Watch only these namespaces; empty: all namespaces.
    pub namespaces: Vec<String>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_addr: SocketAddr,
    /// Elect a leader among replicas; `None`: this process always leads.
    pub leader_election: Option<LeaderElectionConfig>,
    /// Leases reconciled at once (per namespace stream).
    pub concurrency: u16,
    /// Admin connections per database.
    pub max_admin_connections: usize,
    /// `reportingInstance` of events (the pod name).
    pub instance: Option<String>,
    /// This controller's pod (`namespace`, `name`): labelled `leasehold.dev/leader=true`
    /// while it leads, so the broker Service routes to it.
    pub pod: Option<(String, String)>,
    /// Serve the broker while leading.
    pub broker: Option<broker::BrokerSettings>,
    /// The Issuer/ClusterIssuer controller and CRL publication.
    pub issuers: IssuerSettings,
    /// The audit trail (written while leading); `None`: no audit trail.
    pub audit: Option<audit::AuditConfig>,
    /// Seals stored secret material (versions, per-pod records, generated keys).
    pub keyring: Arc<leasehold_envelope::Keyring>,
}

/// How the issuer controller runs.
#[derive(Debug, Clone)]
pub struct IssuerSettings {
    /// The controller's namespace: ClusterIssuer Secrets (when their ref names none),
    /// generated ClusterIssuer CAs and ClusterIssuer CRL ConfigMaps live here.
    pub controller_namespace: String,
    /// Where CRLs and CA certificates are served over HTTP while leading; `None`: not
    /// served.
    pub crl_addr: Option<SocketAddr>,
    /// Where the HTTP-01 solver of ACME issuers listens while leading (the CA reaches
    /// it through the solver Service); `None`: ACME issuers are not ready.
    pub acme_http01_addr: Option<SocketAddr>,
    /// The registry the issuer controller fills (pass one in to resolve issuers from
    /// outside, e.g. the lease controller or an e2e test).
    pub registry: IssuerRegistry,
}

impl Default for IssuerSettings {
    fn default() -> Self {
        Self {
            controller_namespace: "default".into(),
            crl_addr: None,
            acme_http01_addr: None,
            registry: IssuerRegistry::new(),
        }
    }
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            namespaces: Vec::new(),
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
            leader_election: None,
            concurrency: 16,
            max_admin_connections: 4,
            instance: None,
            pod: None,
            broker: None,
            issuers: IssuerSettings::default(),
            audit: None,
            keyring: Arc::new(leasehold_envelope::Keyring::unencrypted()),
        }
    }
}

/// Objects per page of the initial lists: small pages keep the memory peak of a start
/// (or re-list) with many leases low.
pub const LIST_PAGE_SIZE: u32 = 100;

fn api_for<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

async fn wait_for(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Leases in `leases` that reference the policy.
pub fn leases_for_policy(
    leases: &[Arc<SecretLease>],
    policy: &RotationPolicy,
) -> Vec<ObjectRef<SecretLease>> {
    let ns = policy.namespace();
    leases
        .iter()
        .filter(|l| l.namespace() == ns && l.spec.policy_ref.name == policy.name_any())
        .map(|l| ObjectRef::from_obj(l.as_ref()))
        .collect()
}

/// Every certificate lease in the cache (an issuer changed: those may be waiting on it).
pub fn certificate_leases(leases: &[Arc<SecretLease>]) -> Vec<ObjectRef<SecretLease>> {
    leases
        .iter()
        .filter(|l| l.spec.certificate.is_some())
        .map(|l| ObjectRef::from_obj(l.as_ref()))
        .collect()
}

/// Leases in `leases` whose admin (or CA) Secret is `namespace/name`.
pub fn leases_for_secret(
    leases: &[Arc<SecretLease>],
    namespace: Option<&str>,
    name: &str,
) -> Vec<ObjectRef<SecretLease>> {
    leases
        .iter()
        .filter(|l| l.namespace().as_deref() == namespace)
        .filter(|l| {
            l.spec.postgres.iter().chain(l.spec.mysql.iter()).any(|db| {
                db.admin_secret_ref.name == name
                    || db
                        .tls
                        .ca_secret_ref
                        .as_ref()
                        .is_some_and(|c| c.name == name)
            })
        })
        .map(|l| ObjectRef::from_obj(l.as_ref()))
        .collect()
}

/// The SecretLease and RotationPolicy controllers for one namespace (or all).
async fn run_controllers(
    client: Client,
    namespace: Option<String>,
    ctx: Arc<Context>,
    concurrency: u16,
    stop: watch::Receiver<bool>,
    health: Arc<metrics::Health>,
    issuer_changes: watch::Receiver<u64>,
) {
    let ns = namespace.as_deref();
    let leases: Api<SecretLease> = api_for(&client, ns);
    let secrets: Api<PartialObjectMeta<Secret>> = api_for(&client, ns);
    let policies: Api<RotationPolicy> = api_for(&client, ns);
    let owned = watcher::Config::default().labels(&format!(
        "{}={}",
        secrets::MANAGED_BY_LABEL,
        secrets::MANAGED_BY_VALUE
    ));
    // The cache keeps every lease, slimmed (no status, no managedFields): memory per
    // lease stays small; the reconciler reads the whole object when it runs.
    let (store, writer) = reflector::store::<SecretLease>();
    let lease_stream = watcher(leases, watcher::Config::default().page_size(LIST_PAGE_SIZE))
        .default_backoff()
        .modify(lease_controller::slim_for_cache)
        .reflect(writer)
        .applied_objects();
    let by_policy = store.clone();
    let by_secret = store.clone();
    let by_issuer = store.clone();
    // An issuer that becomes ready (or changes) wakes the certificate leases waiting on it.
    let issuer_changes = futures::stream::unfold(issuer_changes, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    })
    .flat_map(move |()| futures::stream::iter(certificate_leases(&by_issuer.state())));
    // Secrets are watched as metadata only: the mappers need names and owners, and
    // secret values never pass through the watch.
    let owned_secrets = watcher(secrets.clone(), owned)
        .default_backoff()
        .touched_objects();
    let referenced_secrets = watcher(secrets, watcher::Config::default())
        .default_backoff()
        .touched_objects();
    let lease_stream = Controller::for_stream(lease_stream, store.clone())
        .owns_stream(owned_secrets)
        .watches(
            policies.clone(),
            watcher::Config::default(),
            move |p: RotationPolicy| leases_for_policy(&by_policy.state(), &p),
        )
        .watches_stream(referenced_secrets, move |s: PartialObjectMeta<Secret>| {
            leases_for_secret(&by_secret.state(), s.namespace().as_deref(), &s.name_any())
        })
        .reconcile_on(issuer_changes)
        .with_config(controller::Config::default().concurrency(concurrency))
        .graceful_shutdown_on(wait_for(stop.clone()))
        .run(
            lease_controller::reconcile_cached,
            lease_controller::error_policy,
            ctx.clone(),
        )
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "SecretLease controller");
            }
        });
    let policy_stream = Controller::new(policies, watcher::Config::default())
        .graceful_shutdown_on(wait_for(stop))
        .run(
            policy_controller::reconcile_policy,
            policy_controller::error_policy,
            ctx,
        )
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "RotationPolicy controller");
            }
        });
    let ready = async move {
        if store.wait_until_ready().await.is_ok() {
            health.set_ready(true);
        }
    };
    tokio::join!(lease_stream, policy_stream, ready);
}

/// Resolves when `stop` is set before `store` was ever listed. A controller waits for
/// its store before it reconciles and does not see a graceful shutdown meanwhile (for
/// example when the CRDs are not installed): nothing has started then, so it can simply
/// be dropped. Once the store is ready, shutdown is left to the controller.
async fn stopped_before_ready<K>(stop: watch::Receiver<bool>, store: reflector::Store<K>)
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    use futures::FutureExt;
    wait_for(stop).await;
    if store.wait_until_ready().now_or_never().is_some() {
        std::future::pending::<()>().await;
    }
}

/// The Issuer controller for one namespace (or all), with the Secrets it reads.
async fn run_issuer_controller(
    client: Client,
    namespace: Option<String>,
    ctx: Arc<issuers::IssuerContext>,
    stop: watch::Receiver<bool>,
) {
    let ns = namespace.as_deref();
    let api: Api<Issuer> = api_for(&client, ns);
    let secrets: Api<PartialObjectMeta<Secret>> = api_for(&client, ns);
    let (store, writer) = reflector::store::<Issuer>();
    let mut sync = issuers::RegistrySync::issuers(ctx.registry.clone(), namespace.clone());
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .inspect(move |event| {
            if let Ok(event) = event {
                sync.observe(event, |issuer: &Issuer| {
                    issuers::IssuerObject::from_issuer(issuer)
                        .ok()
                        .map(|o| o.key)
                });
            }
        })
        .applied_objects();
    let by_secret = store.clone();
    let secret_stream = watcher(secrets, watcher::Config::default())
        .default_backoff()
        .touched_objects();
    let stopped = stopped_before_ready(stop.clone(), store.clone());
    let controller = Controller::for_stream(stream, store)
        .watches_stream(secret_stream, move |s: PartialObjectMeta<Secret>| {
            issuers::issuers_for_secret(&by_secret.state(), s.namespace().as_deref(), &s.name_any())
        })
        .graceful_shutdown_on(wait_for(stop))
        .run(issuers::reconcile_issuer, issuers::error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "Issuer controller");
            }
        });
    tokio::select! {
        _ = controller => {}
        _ = stopped => {}
    }
}

/// The ClusterIssuer controller. Its Secrets are watched cluster-wide, or only in the
/// controller namespace when the controller is limited to some namespaces (a periodic
/// resync covers Secrets elsewhere).
async fn run_cluster_issuer_controller(
    client: Client,
    all_namespaces: bool,
    ctx: Arc<issuers::IssuerContext>,
    stop: watch::Receiver<bool>,
) {
    let api: Api<ClusterIssuer> = Api::all(client.clone());
    let secrets: Api<PartialObjectMeta<Secret>> = if all_namespaces {
        Api::all(client.clone())
    } else {
        Api::namespaced(client.clone(), &ctx.controller_namespace)
    };
    let (store, writer) = reflector::store::<ClusterIssuer>();
    let mut sync = issuers::RegistrySync::cluster_issuers(ctx.registry.clone());
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .inspect(move |event| {
            if let Ok(event) = event {
                sync.observe(event, |issuer: &ClusterIssuer| {
                    Some(issuers::IssuerKey::Cluster {
                        name: issuer.name_any(),
                    })
                });
            }
        })
        .applied_objects();
    let by_secret = store.clone();
    let controller_namespace = ctx.controller_namespace.clone();
    let secret_stream = watcher(secrets, watcher::Config::default())
        .default_backoff()
        .touched_objects();
    let stopped = stopped_before_ready(stop.clone(), store.clone());
    let controller = Controller::for_stream(stream, store)
        .watches_stream(secret_stream, move |s: PartialObjectMeta<Secret>| {
            issuers::cluster_issuers_for_secret(
                &by_secret.state(),
                &controller_namespace,
                s.namespace().as_deref(),
                &s.name_any(),
            )
        })
        .graceful_shutdown_on(wait_for(stop))
        .run(
            issuers::reconcile_cluster_issuer,
            issuers::error_policy,
            ctx,
        )
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "ClusterIssuer controller");
            }
        });
    tokio::select! {
        _ = controller => {}
        _ = stopped => {}
    }
}

/// Issuer and ClusterIssuer controllers, and the CRL server while they run.
async fn run_issuers(
    client: Client,
    namespaces: Vec<Option<String>>,
    ctx: Arc<issuers::IssuerContext>,
    crl_addr: Option<SocketAddr>,
    stop: watch::Receiver<bool>,
) {
    if let Some(addr) = crl_addr {
        let registry = ctx.registry.clone();
        let stop = wait_for(stop.clone());
        tokio::spawn(async move {
            if let Err(e) = crl_http::serve(addr, registry, stop).await {
                tracing::error!(error = %e, %addr, "cannot serve CRLs");
            }
        });
    }
    let all_namespaces = namespaces.iter().any(Option::is_none);
    let namespaced = futures::future::join_all(
        namespaces
            .into_iter()
            .map(|ns| run_issuer_controller(client.clone(), ns, ctx.clone(), stop.clone())),
    );
    let cluster = run_cluster_issuer_controller(client, all_namespaces, ctx, stop);
    tokio::join!(namespaced, cluster);
}

/// Run the controller until `shutdown` resolves (Ok) or leadership is lost (Err: exit
/// the process and let the Deployment restart it as a standby).
pub async fn run<F>(config: ControllerConfig, shutdown: F) -> Result<(), OperatorError>
where
    F: Future + Send + 'static,
{
    let client = Client::try_default().await?;
    run_with_client(client, config, shutdown).await
}

/// [`run`] with a given client (tests, e2e).
pub async fn run_with_client<F>(
    client: Client,
    config: ControllerConfig,
    shutdown: F,
) -> Result<(), OperatorError>
where
    F: Future + Send + 'static,
{
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    {
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
    }
    let mut metrics = metrics::Metrics::new();
    let broker_metrics = leasehold_broker::BrokerMetrics::register(metrics.registry_mut());
    let audit_metrics = leasehold_audit::AuditMetrics::register(metrics.registry_mut());
    config.keyring.register_metrics(metrics.registry_mut());
    let metrics = Arc::new(metrics);
    let health = Arc::new(metrics::Health::default());
    let server = tokio::spawn(metrics::serve(
        config.metrics_addr,
        metrics.clone(),
        health.clone(),
        wait_for(stop_rx.clone()),
    ));

    // A restarted former leader keeps its pod object, and with it the leader label:
    // drop it until this process wins the election again.
    if let Some((ns, pod)) = &config.pod
        && config.leader_election.is_some()
    {
        let _ = broker::label_leader(&client, ns, pod, false).await;
    }
    let elector = config
        .leader_election
        .clone()
        .map(|le| leader::LeaderElector::new(client.clone(), le));
    // Without election this process always leads; with it, every side effect of a
    // lease reconcile checks that the last renewal round started within the deadline.
    let fence = elector
        .as_ref()
        .map(leader::LeaderElector::fence)
        .unwrap_or_default();
    if let Some(e) = &elector {
        // A standby is ready: it serves nothing but is healthy.
        health.set_ready(true);
        tokio::select! {
            _ = e.acquire() => {}
            _ = wait_for(stop_rx.clone()) => {
                server.abort();
                return Ok(());
            }
        }
        health.set_ready(false);
    }

    if let Some((ns, pod)) = &config.pod
        && let Err(e) = broker::label_leader(&client, ns, pod, true).await
    {
        tracing::warn!(error = %e, "cannot label this pod as leader; the broker Service will not route to it");
    }
    // The audit trail is the leader's: one writer continues the chain.
    let audit_log = match &config.audit {
        Some(audit_config) => {
            match audit::start(&client, audit_config, audit_metrics, fence.clone()).await {
                Ok(log) => log,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the audit trail; stopping so nothing goes unrecorded");
                    let _ = stop_tx.send(true);
                    if let Some((ns, pod)) = &config.pod {
                        let _ = broker::label_leader(&client, ns, pod, false).await;
                    }
                    server.abort();
                    return Err(e);
                }
            }
        }
        None => leasehold_audit::AuditLog::disabled(),
    };
    // Controller mode of rekey: whatever is not under the current key (an earlier key,
    // or plaintext from before encryption was turned on) is rewrapped in the
    // background, and again every hour (Secrets that changed meanwhile, or a key that
    // was unavailable).
    let rekey_task = {
        let client = client.clone();
        let keyring = config.keyring.clone();
        let namespaces = config.namespaces.clone();
        let audit = audit_log.clone();
        let fence = fence.clone();
        tokio::spawn(async move {
            loop {
                if fence.check().is_err() {
                    return;
                }
                match keys::rekey(&client, &keyring, &namespaces, &audit).await {
                    Ok(report) if report.rewrapped.is_empty() && report.failed.is_empty() => {}
                    Ok(report) => tracing::info!(
                        rewrapped = report.rewrapped.len(),
                        failed = report.failed.len(),
                        "rekey pass: {}",
                        report.to_string().trim_end()
                    ),
                    Err(e) => tracing::warn!(error = %e, "rekey pass failed; retried in an hour"),
                }
                tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            }
        })
    };
    // Per-pod certificates: signed by the broker, revoked by the sweep and, when their
    // lease is deleted, by the lease controller.
    let pod_certificates = Arc::new(leasehold_broker::PodCertificates::new(
        Arc::new(config.issuers.registry.clone()),
        Arc::new(leasehold_broker::KubePodCertificateStore::new(
            client.clone(),
        )),
    ));
    let broker_task = config.broker.clone().map(|settings| {
        let stop = wait_for(stop_rx.clone());
        let stop_tx = stop_tx.clone();
        let issuers = pod_certificates.clone();
        let audit = audit_log.clone();
        let fence = fence.clone();
        tokio::spawn({
            let client = client.clone();
            async move {
                if let Err(e) = broker::run(client, settings, broker_metrics, issuers, audit, fence, stop).await {
                    tracing::error!(error = %e, "the broker failed; stopping so a healthy replica can lead");
                    let _ = stop_tx.send(true);
                    return Err(e);
                }
                Ok(())
            }
        })
    });

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: leasehold_api::FIELD_MANAGER.into(),
            instance: config.instance.clone(),
        },
    );
    // One HTTP-01 solver for every ACME order of this process, bound once leading
    // (only the leader is behind the solver Service).
    let acme = Arc::new(acme_issuer::AcmeState::new(
        match config.issuers.acme_http01_addr {
            None => Err("no --acme-http01-addr".to_owned()),
            Some(addr) => match leasehold_acme::Http01Solver::bind(addr).await {
                Ok(solver) => {
                    tracing::info!(addr = %solver.local_addr(), "HTTP-01 solver listening");
                    Ok(Arc::new(solver))
                }
                Err(e) => {
                    tracing::error!(error = %e, %addr, "cannot serve HTTP-01 challenges; ACME issuers stay not ready");
                    Err(format!("cannot listen on {addr}: {e}"))
                }
            },
        },
    ));
    let issuer_ctx = Arc::new(issuers::IssuerContext {
        client: client.clone(),
        registry: config.issuers.registry.clone(),
        controller_namespace: config.issuers.controller_namespace.clone(),
        metrics: metrics.clone(),
        recorder: Some(recorder.clone()),
        acme,
        keyring: config.keyring.clone(),
    });
    let mut lease_ctx = Context::new(
        client.clone(),
        metrics,
        Some(recorder),
        config.max_admin_connections,
    );
    let registry = config.issuers.registry.clone();
    lease_ctx.issuers = Some(Arc::new(
        move |ns: &str, issuer: &leasehold_api::IssuerRef| {
            registry.resolve(ns, issuer).map_err(|e| e.to_string())
        },
    ));
    lease_ctx.pod_certificates = Some(pod_certificates.clone());
    lease_ctx.engine = lease_ctx.engine.clone().with_audit(audit_log.clone());
    lease_ctx.keyring = config.keyring.clone();
    lease_ctx.fence = fence;
    let ctx = Arc::new(lease_ctx);
    lease_controller::preload_username_claims(&client, &config.namespaces, &ctx.engine).await;
    let namespaces: Vec<Option<String>> = if config.namespaces.is_empty() {
        vec![None]
    } else {
        config.namespaces.iter().cloned().map(Some).collect()
    };
    let issuer_controllers = run_issuers(
        client.clone(),
        namespaces.clone(),
        issuer_ctx,
        config.issuers.crl_addr,
        stop_rx.clone(),
    );
    let controllers = futures::future::join_all(namespaces.into_iter().map(|ns| {
        run_controllers(
            client.clone(),
            ns,
            ctx.clone(),
            config.concurrency.max(1),
            stop_rx.clone(),
            health.clone(),
            config.issuers.registry.changes(),
        )
    }));
    let controllers = futures::future::join(controllers, issuer_controllers);
    tracing::info!(namespaces = ?config.namespaces, "leasehold controller running");
    let result = match &elector {
        Some(e) => tokio::select! {
            _ = controllers => Ok(()),
            lost = e.hold() => {
                let _ = stop_tx.send(true);
                Err(lost)
            }
        },
        None => {
            controllers.await;
            Ok(())
        }
    };
    let _ = stop_tx.send(true);
    let broker_result = match broker_task {
        Some(task) => task.await.unwrap_or(Ok(())),
        None => Ok(()),
    };
    if let Some((ns, pod)) = &config.pod {
        let _ = broker::label_leader(&client, ns, pod, false).await;
    }
    if let Some(e) = &elector
        && result.is_ok()
    {
        e.release().await;
    }
    rekey_task.abort();
    audit_log.shutdown().await;
    let result = result.and(broker_result);
    match server.await {
        Ok(Err(e)) if result.is_ok() => Err(e),
        _ => result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease_controller::slim_for_cache;

    fn lease(ns: &str, name: &str, policy: &str, admin: &str) -> Arc<SecretLease> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease",
                "metadata": {"name": name, "namespace": ns, "uid": "u",
                             "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}", "keep": "me"},
                             "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
                "spec": {"policyRef": {"name": policy},
                         "postgres": {"host": "db", "database": "app", "adminSecretRef": {"name": admin}}},
                "status": {"phase": "Active"}
            }))
            .unwrap(),
        )
    }

    #[test]
    fn mappers_find_the_referencing_leases() {
        let leases = vec![
            lease("shop", "a", "p1", "admin1"),
            lease("shop", "b", "p2", "admin1"),
            lease("other", "c", "p1", "admin1"),
        ];
        let policy: RotationPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "leasehold.dev/v1alpha1", "kind": "RotationPolicy",
            "metadata": {"name": "p1", "namespace": "shop"}, "spec": {"ttl": "1h"}
        }))
        .unwrap();
        let names = |refs: Vec<ObjectRef<SecretLease>>| {
            refs.into_iter().map(|r| r.name).collect::<Vec<_>>()
        };
        assert_eq!(names(leases_for_policy(&leases, &policy)), ["a"]);
        assert_eq!(
            names(leases_for_secret(&leases, Some("shop"), "admin1")),
            ["a", "b"]
        );
        assert!(leases_for_secret(&leases, Some("shop"), "unrelated").is_empty());
    }

    #[test]
    fn the_cache_keeps_what_the_mappers_read() {
        let mut l = (*lease("shop", "a", "p1", "admin1")).clone();
        slim_for_cache(&mut l);
        assert!(l.status.is_none());
        assert!(l.metadata.managed_fields.is_none());
        assert!(l.metadata.annotations.is_none());
        assert_eq!(l.spec.policy_ref.name, "p1");
        let slim = vec![Arc::new(l)];
        assert_eq!(leases_for_secret(&slim, Some("shop"), "admin1").len(), 1);
        assert_eq!(slim[0].metadata.name.as_deref(), Some("a"));
        assert_eq!(slim[0].metadata.uid.as_deref(), Some("u"));
    }
}
