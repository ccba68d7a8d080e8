//! The tonic `Broker` service.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use leasehold_api::{RotationPolicy, SecretLease};
use leasehold_audit::{Action as AuditAction, AuditEvent, Outcome as AuditOutcome};
use leasehold_auth::{ExpectedPod, TokenVerifier};
use leasehold_backends::CredentialMaterial;
use leasehold_core::timing::StepClock;
use leasehold_engine::template::{CredentialValues, render};
use leasehold_proto::AUTHORIZATION_METADATA;
use leasehold_proto::broker::v1 as pb;
use secrecy::ExposeSecret;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::authz::{
    AcknowledgeFacts, CallerIdentity, Deny, IssueFacts, NodeDriverAccount, PodIdentity,
    authorize_acknowledge, authorize_driver_pod, authorize_issue, authorize_node,
    authorize_pod_on_node, authorize_pod_placement, namespace_allowed,
};
use crate::certificates::{PodCertificateRequest, PodCertificates, profile};
use crate::cluster::{ClusterView, PodExpectation, lease_facts, pod_facts, version_password};
use crate::consumers::{ConsumerRecorder, ObjectRef};
use crate::error::BrokerError;
use crate::metrics::BrokerMetrics;
use crate::per_pod::{PerPodIssuer, PerPodRequest, db_facts};

/// Longest name or UID accepted in a request.
const MAX_NAME: usize = 253;

/// How the broker is set up.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// The service account the node drivers run as; no one else may call.
    pub node_driver: NodeDriverAccount,
    /// When a lease names no next rotation, the driver is told to ask again after this.
    pub default_recheck: Duration,
}

impl BrokerConfig {
    /// Callers must be `namespace/name`; re-check after 30 s without a rotation plan.
    pub fn new(
        node_driver_namespace: impl Into<String>,
        node_driver_name: impl Into<String>,
    ) -> Self {
        Self {
            node_driver: NodeDriverAccount {
                namespace: node_driver_namespace.into(),
                name: node_driver_name.into(),
            },
            default_recheck: Duration::from_secs(30),
        }
    }
}

/// Token verifiers: one for the node drivers' own tokens (their audience), one
/// for pod tokens (audience [`leasehold_api::CSI_TOKEN_AUDIENCE`]). May be the same.
#[derive(Debug, Clone)]
pub struct Verifiers {
    /// Verifies `authorization: Bearer` tokens of node drivers.
    pub node: Arc<TokenVerifier>,
    /// Verifies `IssueRequest.pod_token`.
    pub pod: Arc<TokenVerifier>,
}

/// The broker: implements the generated `Broker` trait.
#[derive(Clone)]
pub struct BrokerService {
    config: BrokerConfig,
    verifiers: Verifiers,
    cluster: Arc<dyn ClusterView>,
    recorder: Arc<dyn ConsumerRecorder>,
    per_pod: Option<Arc<dyn PerPodIssuer>>,
    certificates: Option<Arc<PodCertificates>>,
    metrics: BrokerMetrics,
    audit: leasehold_audit::AuditLog,
    /// Opens the lease versions the controller stores sealed.
    keyring: Arc<leasehold_envelope::Keyring>,
    /// Answers only while this says so (the controller's leadership fence).
    serving_gate: Option<ServingGate>,
}

/// `Ok` while the broker may serve; `Err(why)` otherwise (a deposed leader).
pub type ServingGate = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

impl std::fmt::Debug for BrokerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerService")
            .field("config", &self.config)
            .field("per_pod", &self.per_pod.is_some())
            .field("certificates", &self.certificates.is_some())
            .finish_non_exhaustive()
    }
}

impl BrokerService {
    /// A broker reading through `cluster` and recording consumers through `recorder`.
    /// Per-pod leases are refused (`FAILED_PRECONDITION`) until [`Self::with_per_pod`].
    pub fn new(
        config: BrokerConfig,
        verifiers: Verifiers,
        cluster: Arc<dyn ClusterView>,
        recorder: Arc<dyn ConsumerRecorder>,
    ) -> Self {
        Self {
            config,
            verifiers,
            cluster,
            recorder,
            per_pod: None,
            certificates: None,
            metrics: BrokerMetrics::default(),
            audit: leasehold_audit::AuditLog::disabled(),
            keyring: Arc::new(leasehold_envelope::Keyring::unencrypted()),
            serving_gate: None,
        }
    }

    /// Serve only while `gate` allows it: a replica that stopped leading (frozen past its
    /// lease, partitioned) answers `UNAVAILABLE` before any side effect, and node drivers
    /// retry against the new leader.
    pub fn only_while(mut self, gate: ServingGate) -> Self {
        self.serving_gate = Some(gate);
        self
    }

    /// Open sealed lease versions with `keyring` (the controller's).
    pub fn with_keyring(mut self, keyring: Arc<leasehold_envelope::Keyring>) -> Self {
        self.keyring = keyring;
        self
    }

    /// Record every Issue, IssueCertificate, Acknowledge and Release (allowed or
    /// refused, with pod, service account, node, lease and version) in `audit`.
    pub fn with_audit(mut self, audit: leasehold_audit::AuditLog) -> Self {
        self.audit = audit;
        self
    }

    /// Record one call's outcome: `Allowed` (with the version and user handed out, if
    /// any), `Denied` for a refusal of the caller, `Failure` when the broker could not
    /// serve it. The reason is the status message (never a secret or token).
    fn audit_call<T>(
        &self,
        base: AuditEvent,
        result: &Result<Response<T>, Status>,
        handed_out: impl FnOnce(&T) -> (Option<u64>, Option<String>),
    ) {
        let event = match result {
            Ok(response) => {
                let (version, user) = handed_out(response.get_ref());
                let mut e = base.with_outcome(AuditOutcome::Allowed);
                if let Some(v) = version.filter(|v| *v > 0) {
                    e = e.version(v);
                }
                if let Some(u) = user {
                    e = e.username(u);
                }
                e
            }
            Err(status) => {
                let outcome = match status.code() {
                    tonic::Code::Unavailable
                    | tonic::Code::Internal
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::Aborted => AuditOutcome::Failure,
                    _ => AuditOutcome::Denied,
                };
                base.with_outcome(outcome)
                    .reason(status.message())
                    .detail_kv("code", format!("{:?}", status.code()))
            }
        };
        self.audit.record(event);
    }

    /// Serves `perPod` leases with `issuer`.
    pub fn with_per_pod(mut self, issuer: Arc<dyn PerPodIssuer>) -> Self {
        self.per_pod = Some(issuer);
        self
    }

    /// Serves certificate leases: CSRs signed by the issuers `certificates` finds.
    /// Until then they are refused (`FAILED_PRECONDITION`).
    pub fn with_certificates(mut self, certificates: Arc<PodCertificates>) -> Self {
        self.certificates = Some(certificates);
        self
    }

    fn pod_certificates(&self) -> Result<&PodCertificates, BrokerError> {
        self.certificates.as_deref().ok_or_else(|| {
            BrokerError::FailedPrecondition(
                "certificate leases are not enabled on this broker".into(),
            )
        })
    }

    async fn issue_certificate_inner(
        &self,
        request: Request<pb::IssueCertificateRequest>,
    ) -> Result<pb::IssueCertificateResponse, BrokerError> {
        let (metadata, _, msg) = request.into_parts();
        let volume = self
            .authorize_volume(
                &metadata,
                msg.pod.as_ref(),
                &msg.pod_token,
                msg.lease.as_ref(),
                &msg.volume_id,
                &msg.node_name,
            )
            .await?;
        if volume.lease.spec.certificate.is_none() {
            return Err(BrokerError::FailedPrecondition(
                "the lease is not a certificate lease: call Issue".into(),
            ));
        }
        let issued = self
            .pod_certificates()?
            .issue(&PodCertificateRequest {
                lease: &volume.lease,
                policy: &volume.policy,
                pod: &volume.pod,
                node: &volume.node,
                csr_pem: &msg.csr_pem,
            })
            .await?;
        Ok(pb::IssueCertificateResponse {
            certificate_chain_pem: issued.chain_pem,
            ca_pem: issued.ca_pem,
            serial: issued.serial,
            not_after: Some(timestamp(issued.not_after)),
            renew_at: Some(timestamp(issued.renew_at)),
            certificate: Some(profile(&issued.request)),
        })
    }

    /// Records metrics in `metrics` (from [`BrokerMetrics::register`]).
    pub fn with_metrics(mut self, metrics: BrokerMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> pb::broker_server::BrokerServer<Self> {
        pb::broker_server::BrokerServer::new(self)
    }

    /// Run one call: metrics, a log line for a failure or refusal, and its audit record
    /// (`audit` completed with what `handed_out` finds in the response).
    async fn observe<T>(
        &self,
        method: &'static str,
        audit: AuditEvent,
        handed_out: impl FnOnce(&T) -> (Option<u64>, Option<String>),
        call: impl Future<Output = Result<T, BrokerError>>,
    ) -> Result<Response<T>, Status> {
        let result = self.observe_unaudited(method, call).await;
        self.audit_call(audit, &result, handed_out);
        result
    }

    async fn observe_unaudited<T>(
        &self,
        method: &'static str,
        call: impl Future<Output = Result<T, BrokerError>>,
    ) -> Result<Response<T>, Status> {
        let start = Instant::now();
        let gate = self.serving_gate.as_ref().map_or(Ok(()), |g| g());
        let result = match gate {
            Ok(()) => call.await,
            Err(why) => Err(BrokerError::Unavailable(format!(
                "this broker no longer serves ({why}); retry against the leader"
            ))),
        };
        let code = result
            .as_ref()
            .map_or_else(BrokerError::code, |_| tonic::Code::Ok);
        self.metrics
            .observe(method, code, start.elapsed().as_secs_f64());
        match result {
            Ok(v) => Ok(Response::new(v)),
            Err(e) => {
                match code {
                    tonic::Code::Internal
                    | tonic::Code::Unavailable
                    | tonic::Code::FailedPrecondition => {
                        warn!(method, code = ?code, error = %e, "broker call failed");
                    }
                    _ => info!(method, code = ?code, error = %e, "broker call refused"),
                }
                Err(e.into())
            }
        }
    }

    /// The verified caller, with the node it runs on.
    async fn caller(&self, metadata: &MetadataMap) -> Result<CallerIdentity, BrokerError> {
        let token = bearer(metadata)?;
        let sa = self
            .verifiers
            .node
            .verify_service_account_token(token)
            .await
            .map_err(|e| BrokerError::from_auth("node driver token", &e))?;
        let driver = &self.config.node_driver;
        let mut caller = CallerIdentity {
            node_claim: sa.node.map(|n| n.name),
            bound_pod_node: None,
            namespace: sa.namespace,
            name: sa.name,
        };
        // Only for the driver account (no lookups for strangers, whom
        // authorize_node refuses): the token must be bound to a driver pod
        // that still exists and is not terminating, since a token outlives
        // its pod. Older clusters put no node in the token: then the node is
        // the bound pod's.
        if caller.namespace == driver.namespace && caller.name == driver.name {
            let bound = sa.pod.as_ref().map(|b| (b.name.as_str(), b.uid.as_str()));
            let pod = match bound {
                Some((name, uid)) => self
                    .cluster
                    .pod_expecting(
                        &caller.namespace,
                        name,
                        &PodExpectation {
                            uid,
                            node: caller.node_claim.as_deref(),
                        },
                    )
                    .await?
                    .map(|p| pod_facts(&p)),
                None => None,
            };
            authorize_driver_pod(&caller.namespace, bound, pod.as_ref())?;
            if caller.node_claim.is_none() {
                caller.bound_pod_node = pod.and_then(|p| p.node_name);
            }
        }
        Ok(caller)
    }

    async fn lease(
        &self,
        cluster: &dyn ClusterView,
        lease: &ObjectRef,
        min_version: u64,
    ) -> Result<SecretLease, BrokerError> {
        cluster
            .lease_at_version(&lease.namespace, &lease.name, min_version)
            .await?
            .ok_or_else(|| BrokerError::LeaseNotFound {
                namespace: lease.namespace.clone(),
                name: lease.name.clone(),
            })
    }

    /// The lease, its policy (which must exist), and the labels of the pod's namespace
    /// when the access rules need them (fetched only when nothing cheaper decides):
    /// what Issue and Acknowledge authorize against. `min_version`: the lowest
    /// current version of a shared lease the caller accepts (0: any).
    async fn lease_access(
        &self,
        cluster: &dyn ClusterView,
        lease_ref: &ObjectRef,
        pod_namespace: &str,
        min_version: u64,
    ) -> Result<
        (
            SecretLease,
            RotationPolicy,
            Option<std::collections::BTreeMap<String, String>>,
        ),
        BrokerError,
    > {
        let lease = self.lease(cluster, lease_ref, min_version).await?;
        let policy = policy_of(cluster, &lease).await?.ok_or_else(|| {
            BrokerError::FailedPrecondition(format!(
                "RotationPolicy {}/{} of the lease not found",
                lease_ref.namespace, lease.spec.policy_ref.name
            ))
        })?;
        let access = &policy.spec.access;
        let labels = if access.namespace_selector.is_some()
            && !namespace_allowed(&lease_facts(&lease), access, pod_namespace, None)
        {
            cluster.namespace_labels(pod_namespace).await?
        } else {
            None
        };
        Ok((lease, policy, labels))
    }

    /// The pod as the request names it, and what its access to the lease is
    /// decided on. `pod_check` refuses before the lease is looked at.
    async fn volume_facts(
        &self,
        cluster: &dyn ClusterView,
        requested: &PodIdentity,
        node: &str,
        lease_ref: &ObjectRef,
        min_version: u64,
        pod_check: Option<PodCheck>,
    ) -> Result<VolumeFacts, BrokerError> {
        let pod = cluster
            .pod_expecting(
                &requested.namespace,
                &requested.name,
                &PodExpectation {
                    uid: &requested.uid,
                    node: Some(node),
                },
            )
            .await?
            .ok_or_else(|| Deny::PodNotFound {
                namespace: requested.namespace.clone(),
                name: requested.name.clone(),
            })?;
        let pod = pod_facts(&pod);
        if let Some(check) = pod_check {
            check(&pod, requested, node)?;
        }
        let (lease, policy, labels) = self
            .lease_access(cluster, lease_ref, &requested.namespace, min_version)
            .await?;
        Ok(VolumeFacts {
            pod,
            lease,
            policy,
            labels,
        })
    }

    /// Reads the facts of a volume and decides on them with `decide`. A refusal
    /// decided on cached facts is confirmed on live ones: a cache that lags a
    /// change (a namespace label, a policy's access rules) must not refuse.
    async fn decide_volume(
        &self,
        requested: &PodIdentity,
        node: &str,
        lease_ref: &ObjectRef,
        min_version: u64,
        pod_check: Option<PodCheck>,
        decide: impl Fn(&VolumeFacts) -> Result<(), Deny>,
    ) -> Result<(VolumeFacts, Result<(), Deny>), BrokerError> {
        let facts = self
            .volume_facts(
                self.cluster.as_ref(),
                requested,
                node,
                lease_ref,
                min_version,
                pod_check,
            )
            .await?;
        let decision = decide(&facts);
        match (&decision, self.cluster.live()) {
            (Err(deny), Some(live)) => {
                debug!(reason = %deny, "refusal decided on cached objects; confirming live");
                let facts = self
                    .volume_facts(live, requested, node, lease_ref, min_version, pod_check)
                    .await?;
                let decision = decide(&facts);
                Ok((facts, decision))
            }
            _ => Ok((facts, decision)),
        }
    }

    /// What `Issue` and `IssueCertificate` check before anything is handed out: the
    /// driver's token and node, the pod token, the pod's placement, the lease's CSI
    /// delivery and access rules (a refusal that withdraws access is enforced).
    #[allow(clippy::too_many_arguments)]
    async fn authorize_volume(
        &self,
        metadata: &MetadataMap,
        pod: Option<&pb::PodIdentity>,
        pod_token: &str,
        lease: Option<&pb::LeaseRef>,
        volume_id: &str,
        node_name: &str,
    ) -> Result<AuthorizedVolume, BrokerError> {
        let requested = pod_identity(pod)?;
        let lease_ref = lease_ref(lease, &requested)?;
        let node = node_name_of(node_name)?.to_owned();
        required("volume_id", volume_id)?;
        required("pod_token", pod_token)?;

        let steps = StepClock::new(&self.metrics);
        let caller = self.caller(metadata).await?;
        steps.lap("node_token");
        // Before anything else is looked at: only node drivers, on that node.
        authorize_node(&caller, &self.config.node_driver, &node)?;
        let verified = self
            .verifiers
            .pod
            .verify_pod_token(
                pod_token,
                &ExpectedPod {
                    namespace: requested.namespace.clone(),
                    pod_name: requested.name.clone(),
                    pod_uid: requested.uid.clone(),
                    service_account: requested.service_account.clone(),
                },
            )
            .await
            .map_err(|e| BrokerError::from_auth("pod token", &e))?;
        steps.lap("pod_token");
        let token_pod = PodIdentity {
            namespace: verified.namespace,
            name: verified.pod_name,
            uid: verified.pod_uid,
            service_account: verified.service_account,
        };
        let (facts, decision) = self
            .decide_volume(&requested, &node, &lease_ref, 0, None, |f| {
                authorize_issue(&IssueFacts {
                    driver: &self.config.node_driver,
                    caller: &caller,
                    pod_token: &token_pod,
                    requested: &requested,
                    node: &node,
                    pod: &f.pod,
                    lease: &lease_facts(&f.lease),
                    access: &f.policy.spec.access,
                    namespace_labels: f.labels.as_ref(),
                })
            })
            .await?;
        steps.lap("facts");
        let VolumeFacts { lease, policy, .. } = facts;
        self.enforce(decision, &lease, &policy, &lease_ref, &requested, &node)
            .await?;
        steps.lap("enforce");
        // From here on `requested` is the verified pod: the token named exactly it,
        // and the pod object on this node matches it.
        Ok(AuthorizedVolume {
            pod: requested,
            lease_ref,
            node,
            lease,
            policy,
        })
    }

    async fn issue_inner(
        &self,
        request: Request<pb::IssueRequest>,
    ) -> Result<pb::IssueResponse, BrokerError> {
        let (metadata, _, msg) = request.into_parts();
        let AuthorizedVolume {
            pod: requested,
            lease_ref,
            node,
            lease,
            policy,
        } = self
            .authorize_volume(
                &metadata,
                msg.pod.as_ref(),
                &msg.pod_token,
                msg.lease.as_ref(),
                &msg.volume_id,
                &msg.node_name,
            )
            .await?;
        let node = node.as_str();

        if lease.spec.certificate.is_some() {
            // The node makes a key and a CSR for exactly these names, then calls
            // IssueCertificate.
            self.pod_certificates()?;
            let wanted = PodCertificates::request_for(&lease, &policy, &requested)?;
            let now = Timestamp::now();
            return Ok(pb::IssueResponse {
                files: Default::default(),
                version: 0,
                expires_at: Some(timestamp(now)),
                renew_at: Some(timestamp(now)),
                certificate: Some(profile(&wanted)),
            });
        }
        if lease.spec.per_pod {
            let issuer = self.per_pod.as_ref().ok_or_else(|| {
                BrokerError::FailedPrecondition(
                    "per-pod leases are not enabled on this broker".into(),
                )
            })?;
            let credential = issuer
                .issue(&PerPodRequest {
                    lease: &lease,
                    policy: &policy,
                    pod: &requested,
                    node,
                })
                .await?;
            debug!(
                version = credential.version,
                "per-pod credential handed out"
            );
            return Ok(issue_response(
                credential.files,
                credential.version,
                credential.expires_at,
                credential.renew_at,
            ));
        }
        let steps = StepClock::new(&self.metrics);
        let credential = self.shared_credential(&lease, &lease_ref).await;
        steps.lap("credential");
        credential
    }

    /// The lease's current version, rendered with its CSI file templates.
    async fn shared_credential(
        &self,
        lease: &SecretLease,
        lease_ref: &ObjectRef,
    ) -> Result<pb::IssueResponse, BrokerError> {
        let not_ready = || BrokerError::NotReady {
            namespace: lease_ref.namespace.clone(),
            name: lease_ref.name.clone(),
        };
        let status = lease.status.as_ref().ok_or_else(not_ready)?;
        let version = status.current_version.ok_or_else(not_ready)?;
        let record = status.progress.version(version).ok_or_else(not_ready)?;
        let (scheme, host, port, database) = db_facts(lease).ok_or_else(|| {
            BrokerError::FailedPrecondition("only postgres and mysql leases can be mounted".into())
        })?;
        let password = version_password(
            self.cluster.as_ref(),
            &self.keyring,
            &lease_ref.namespace,
            &lease_ref.name,
            version,
        )
        .await?
        .ok_or_else(not_ready)?;
        let templates = lease
            .spec
            .delivery
            .csi
            .as_ref()
            .map(|c| c.files.clone())
            .unwrap_or_default();
        let files = render(
            &templates,
            &CredentialValues {
                username: record.credential_id.clone(),
                password,
                host: host.to_owned(),
                port,
                database: database.to_owned(),
                scheme,
                version,
            },
        );
        let now = Timestamp::now();
        let expires_at = record
            .expires_at
            .or(status.expires_at.as_ref().map(|t| t.0))
            .unwrap_or_else(|| add(now, Duration::from_secs(24 * 3600)));
        let renew_at = status
            .next_rotation_at
            .as_ref()
            .map(|t| t.0)
            .filter(|t| *t > now)
            .unwrap_or_else(|| add(now, self.config.default_recheck))
            .min(expires_at);
        Ok(issue_response(files, version, expires_at, renew_at))
    }

    async fn acknowledge_inner(
        &self,
        request: Request<pb::AcknowledgeRequest>,
    ) -> Result<pb::AcknowledgeResponse, BrokerError> {
        let (metadata, _, msg) = request.into_parts();
        let requested = pod_identity(msg.pod.as_ref())?;
        let lease_ref = lease_ref(msg.lease.as_ref(), &requested)?;
        let node = node_name_of(&msg.node_name)?;
        required("volume_id", &msg.volume_id)?;

        let steps = StepClock::new(&self.metrics);
        let caller = self.caller(&metadata).await?;
        steps.lap("node_token");
        authorize_node(&caller, &self.config.node_driver, node)?;
        // The pod must be on this node before the lease is looked at (a placement
        // refusal is not enforced: the pod is not this driver's to speak for).
        // Then the same rules as Issue: a pod that lost access must not keep
        // counting as a consumer (nor keep a per-pod user), and a driver may
        // speak only for volumes its pods really have. The lease must be at
        // least at the acknowledged version: a cache behind it is read live.
        let pod_check: PodCheck = authorize_pod_on_node;
        let (facts, decision) = self
            .decide_volume(
                &requested,
                node,
                &lease_ref,
                msg.version,
                Some(pod_check),
                |f| {
                    authorize_acknowledge(&AcknowledgeFacts {
                        driver: &self.config.node_driver,
                        caller: &caller,
                        requested: &requested,
                        node,
                        pod: &f.pod,
                        lease: &lease_facts(&f.lease),
                        access: &f.policy.spec.access,
                        namespace_labels: f.labels.as_ref(),
                    })
                },
            )
            .await?;
        steps.lap("facts");
        let VolumeFacts { lease, policy, .. } = facts;
        self.enforce(decision, &lease, &policy, &lease_ref, &requested, node)
            .await?;
        steps.lap("enforce");

        if lease.spec.certificate.is_some() {
            // Each pod's certificate is its own, renewed on its own schedule: there is
            // no lease version to move to.
            return Ok(pb::AcknowledgeResponse {
                latest_version: msg.version,
            });
        }
        if lease.spec.per_pod {
            // A pod's own credential is not a lease version: nothing to record.
            let latest = match &self.per_pod {
                Some(issuer) => issuer.latest_version(&lease, &requested.uid).await?,
                None => None,
            };
            return Ok(pb::AcknowledgeResponse {
                latest_version: latest.unwrap_or(0),
            });
        }
        let latest = lease
            .status
            .as_ref()
            .and_then(|s| s.current_version)
            .unwrap_or(0);
        if msg.version > latest {
            return Err(BrokerError::InvalidArgument(format!(
                "version {} is newer than the lease's current version {latest}",
                msg.version
            )));
        }
        if msg.version > 0 {
            self.recorder
                .acknowledged(
                    &lease_ref,
                    &ObjectRef::new(&requested.namespace, &requested.name),
                    msg.version,
                )
                .await?;
            steps.lap("record");
        }
        Ok(pb::AcknowledgeResponse {
            latest_version: latest,
        })
    }

    /// The pod lost access to the lease: it stops counting as a consumer,
    /// and its per-pod user (if any) is revoked. Best effort: failures are
    /// logged, the refusal is what the caller gets.
    /// Applies an Issue or Acknowledge decision: a pod refused because it lost access
    /// stops counting as a consumer and loses its per-pod user before the refusal.
    async fn enforce(
        &self,
        decision: Result<(), Deny>,
        lease: &SecretLease,
        policy: &RotationPolicy,
        lease_ref: &ObjectRef,
        pod: &PodIdentity,
        node: &str,
    ) -> Result<(), BrokerError> {
        if let Err(deny) = &decision
            && deny.withdraws_access()
        {
            self.withdraw(lease, Some(policy), lease_ref, pod, node)
                .await;
        }
        Ok(decision?)
    }

    async fn withdraw(
        &self,
        lease: &SecretLease,
        policy: Option<&RotationPolicy>,
        lease_ref: &ObjectRef,
        pod: &PodIdentity,
        node: &str,
    ) {
        if lease.spec.certificate.is_some() {
            if let Some(certificates) = &self.certificates
                && let Err(e) = certificates.release(lease, &pod.uid, node, None).await
            {
                warn!(error = %e, "cannot revoke the certificates of a pod that lost access");
            }
        } else if lease.spec.per_pod {
            if let Some(issuer) = &self.per_pod
                && let Err(e) = issuer.release(lease, policy, &pod.uid, node).await
            {
                warn!(error = %e, "cannot revoke the per-pod credential of a pod that lost access");
            }
        } else if let Err(e) = self
            .recorder
            .released(lease_ref, &ObjectRef::new(&pod.namespace, &pod.name))
            .await
        {
            warn!(error = %e, "cannot remove a pod that lost access from the consumers");
        }
    }

    async fn release_inner(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<pb::ReleaseResponse, BrokerError> {
        let (metadata, _, msg) = request.into_parts();
        let requested = pod_identity(msg.pod.as_ref())?;
        let lease_ref = lease_ref(msg.lease.as_ref(), &requested)?;
        let node = node_name_of(&msg.node_name)?;
        required("volume_id", &msg.volume_id)?;

        let caller = self.caller(&metadata).await?;
        authorize_node(&caller, &self.config.node_driver, node)?;
        // The pod may be gone already. If it still exists it must be on this
        // node; if a new pod took its name, its consumer entry is left alone.
        let recreated = match self
            .cluster
            .pod_expecting(
                &requested.namespace,
                &requested.name,
                &PodExpectation {
                    uid: &requested.uid,
                    node: Some(node),
                },
            )
            .await?
        {
            Some(pod) => {
                let facts = pod_facts(&pod);
                if facts.uid == requested.uid {
                    authorize_pod_placement(&facts, &requested, node)?;
                    false
                } else {
                    true
                }
            }
            None => false,
        };
        let Some(lease) = self
            .cluster
            .lease(&lease_ref.namespace, &lease_ref.name)
            .await?
        else {
            return Ok(pb::ReleaseResponse {});
        };
        if lease.spec.certificate.is_some() {
            if let Some(certificates) = &self.certificates {
                let serial = (!msg.serial.is_empty()).then_some(msg.serial.as_str());
                certificates
                    .release(&lease, &requested.uid, node, serial)
                    .await?;
            }
        } else if lease.spec.per_pod {
            if let Some(issuer) = &self.per_pod {
                let policy = policy_of(self.cluster.as_ref(), &lease).await?;
                issuer
                    .release(&lease, policy.as_ref(), &requested.uid, node)
                    .await?;
            }
        } else if !recreated {
            self.recorder
                .released(
                    &lease_ref,
                    &ObjectRef::new(&requested.namespace, &requested.name),
                )
                .await?;
        }
        Ok(pb::ReleaseResponse {})
    }
}

/// The lease's RotationPolicy, `None` when it does not exist.
async fn policy_of(
    cluster: &dyn ClusterView,
    lease: &SecretLease,
) -> Result<Option<RotationPolicy>, BrokerError> {
    let namespace = lease.metadata.namespace.as_deref().unwrap_or_default();
    cluster.policy(namespace, &lease.spec.policy_ref.name).await
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    jiff::SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

fn timestamp(t: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.as_second(),
        nanos: t.subsec_nanosecond(),
    }
}

fn issue_response(
    files: CredentialMaterial,
    version: u64,
    expires_at: Timestamp,
    renew_at: Timestamp,
) -> pb::IssueResponse {
    pb::IssueResponse {
        files: files
            .0
            .into_iter()
            .map(|(name, value)| (name, value.expose_secret().as_bytes().to_vec()))
            .collect(),
        version,
        expires_at: Some(timestamp(expires_at)),
        renew_at: Some(timestamp(renew_at)),
        certificate: None,
    }
}

/// A volume `authorize_volume` let through.
/// A check of the pod alone, made before its lease is read.
type PodCheck = fn(&crate::authz::PodFacts, &PodIdentity, &str) -> Result<(), Deny>;

/// What an Issue or Acknowledge is decided on, as read from the cluster.
struct VolumeFacts {
    pod: crate::authz::PodFacts,
    lease: SecretLease,
    policy: RotationPolicy,
    labels: Option<std::collections::BTreeMap<String, String>>,
}

struct AuthorizedVolume {
    /// The verified pod.
    pod: PodIdentity,
    lease_ref: ObjectRef,
    node: String,
    lease: SecretLease,
    policy: RotationPolicy,
}

/// The token of `authorization: Bearer <token>`.
fn bearer(metadata: &MetadataMap) -> Result<&str, BrokerError> {
    let missing =
        || BrokerError::Unauthenticated("no bearer token in the authorization metadata".into());
    let value = metadata
        .get(AUTHORIZATION_METADATA)
        .ok_or_else(missing)?
        .to_str()
        .map_err(|_| missing())?;
    let (scheme, token) = value.split_once(' ').ok_or_else(missing)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(missing());
    }
    Ok(token)
}

fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, BrokerError> {
    if value.is_empty() {
        return Err(BrokerError::InvalidArgument(format!("{field} is required")));
    }
    if field != "pod_token" && value.len() > MAX_NAME {
        return Err(BrokerError::InvalidArgument(format!("{field} is too long")));
    }
    Ok(value)
}

/// Kinds of names in requests, each checked as Kubernetes checks it.
#[derive(Debug, Clone, Copy)]
enum NameKind {
    /// DNS-1123 label: namespaces.
    Label,
    /// DNS-1123 subdomain: pods, service accounts, leases, nodes.
    Subdomain,
    /// A UUID: object UIDs.
    Uid,
}

/// DNS-1123 label: at most 63 of `[a-z0-9-]`, starting and ending alphanumeric.
pub(crate) fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// DNS-1123 subdomain: at most 253 characters, dot-separated labels.
pub(crate) fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

/// A UUID in its canonical 8-4-4-4-12 hexadecimal form.
pub(crate) fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|c| c.is_ascii_hexdigit()))
}

/// A required field that must be a valid Kubernetes name of `kind`.
fn name<'a>(field: &str, value: &'a str, kind: NameKind) -> Result<&'a str, BrokerError> {
    let value = required(field, value)?;
    let (ok, what) = match kind {
        NameKind::Label => (is_dns1123_label(value), "a DNS-1123 label"),
        NameKind::Subdomain => (is_dns1123_subdomain(value), "a DNS-1123 subdomain"),
        NameKind::Uid => (is_uuid(value), "a UUID"),
    };
    if ok {
        Ok(value)
    } else {
        // The value is not quoted: it is not trusted to be printable.
        Err(BrokerError::InvalidArgument(format!(
            "{field} is not {what}"
        )))
    }
}

fn pod_identity(pod: Option<&pb::PodIdentity>) -> Result<PodIdentity, BrokerError> {
    let pod = pod.ok_or_else(|| BrokerError::InvalidArgument("pod is required".into()))?;
    Ok(PodIdentity {
        namespace: name("pod.namespace", &pod.namespace, NameKind::Label)?.to_owned(),
        name: name("pod.name", &pod.name, NameKind::Subdomain)?.to_owned(),
        uid: name("pod.uid", &pod.uid, NameKind::Uid)?.to_owned(),
        service_account: name(
            "pod.service_account",
            &pod.service_account,
            NameKind::Subdomain,
        )?
        .to_owned(),
    })
}

fn lease_ref(lease: Option<&pb::LeaseRef>, pod: &PodIdentity) -> Result<ObjectRef, BrokerError> {
    let lease = lease.ok_or_else(|| BrokerError::InvalidArgument("lease is required".into()))?;
    let lease_name = name("lease.name", &lease.name, NameKind::Subdomain)?;
    let namespace = if lease.namespace.is_empty() {
        pod.namespace.as_str()
    } else {
        name("lease.namespace", &lease.namespace, NameKind::Label)?
    };
    Ok(ObjectRef::new(namespace, lease_name))
}

fn node_name_of(value: &str) -> Result<&str, BrokerError> {
    name("node_name", value, NameKind::Subdomain)
}

fn pod_label(pod: Option<&pb::PodIdentity>) -> String {
    pod.map(|p| format!("{}/{}", p.namespace, p.name))
        .unwrap_or_default()
}

/// A request about one volume of one pod: what its audit record names.
trait VolumeCall {
    fn names(&self) -> (Option<&pb::PodIdentity>, Option<&pb::LeaseRef>, &str, &str);
}

macro_rules! volume_call {
    ($($request:ty),*) => {$(
        impl VolumeCall for $request {
            fn names(&self) -> (Option<&pb::PodIdentity>, Option<&pb::LeaseRef>, &str, &str) {
                (self.pod.as_ref(), self.lease.as_ref(), &self.node_name, &self.volume_id)
            }
        }
    )*};
}

volume_call!(
    pb::IssueRequest,
    pb::IssueCertificateRequest,
    pb::AcknowledgeRequest,
    pb::ReleaseRequest
);

/// The audit record of a call, before its outcome: what the request names (the pod
/// and service account as claimed; a refused call's claims are what was refused).
fn audit_base(action: AuditAction, request: &impl VolumeCall) -> AuditEvent {
    let (pod, lease, node, volume_id) = request.names();
    let mut e = AuditEvent::new(action, AuditOutcome::Requested);
    if let Some(p) = pod {
        e = e
            .pod(&p.namespace, &p.name, &p.uid)
            .service_account(&p.namespace, &p.service_account);
    }
    if let Some(l) = lease {
        let ns = if l.namespace.is_empty() {
            pod.map(|p| p.namespace.as_str()).unwrap_or_default()
        } else {
            l.namespace.as_str()
        };
        e = e.lease(ns, &l.name);
    }
    if !node.is_empty() {
        e = e.node(node);
    }
    if !volume_id.is_empty() {
        e = e.detail_kv("volume_id", volume_id);
    }
    e
}

fn lease_label(lease: Option<&pb::LeaseRef>) -> String {
    lease
        .map(|l| format!("{}/{}", l.namespace, l.name))
        .unwrap_or_default()
}

#[tonic::async_trait]
impl pb::broker_server::Broker for BrokerService {
    async fn issue(
        &self,
        request: Request<pb::IssueRequest>,
    ) -> Result<Response<pb::IssueResponse>, Status> {
        // The span names objects only; the request (with the pod token) is not recorded.
        let span = info_span!(
            "broker.issue",
            volume_id = %request.get_ref().volume_id,
            pod = %pod_label(request.get_ref().pod.as_ref()),
            lease = %lease_label(request.get_ref().lease.as_ref()),
            node = %request.get_ref().node_name,
        );
        let audit = audit_base(AuditAction::BrokerIssue, request.get_ref());
        let handed_out = |resp: &pb::IssueResponse| {
            let user = resp
                .files
                .get("username")
                .map(|u| String::from_utf8_lossy(u).into_owned());
            (Some(resp.version), user)
        };
        self.observe("Issue", audit, handed_out, self.issue_inner(request))
            .instrument(span)
            .await
    }

    async fn issue_certificate(
        &self,
        request: Request<pb::IssueCertificateRequest>,
    ) -> Result<Response<pb::IssueCertificateResponse>, Status> {
        // Names objects only: neither the pod token nor the CSR is recorded.
        let span = info_span!(
            "broker.issue_certificate",
            volume_id = %request.get_ref().volume_id,
            pod = %pod_label(request.get_ref().pod.as_ref()),
            lease = %lease_label(request.get_ref().lease.as_ref()),
            node = %request.get_ref().node_name,
        );
        let audit = audit_base(AuditAction::CertificateIssue, request.get_ref());
        let handed_out =
            |resp: &pb::IssueCertificateResponse| (None, Some(format!("serial {}", resp.serial)));
        let call = self.issue_certificate_inner(request);
        self.observe("IssueCertificate", audit, handed_out, call)
            .instrument(span)
            .await
    }

    async fn acknowledge(
        &self,
        request: Request<pb::AcknowledgeRequest>,
    ) -> Result<Response<pb::AcknowledgeResponse>, Status> {
        let span = info_span!(
            "broker.acknowledge",
            volume_id = %request.get_ref().volume_id,
            pod = %pod_label(request.get_ref().pod.as_ref()),
            lease = %lease_label(request.get_ref().lease.as_ref()),
            version = request.get_ref().version,
        );
        let audit = audit_base(AuditAction::BrokerAcknowledge, request.get_ref())
            .version(request.get_ref().version);
        self.observe(
            "Acknowledge",
            audit,
            |_| (None, None),
            self.acknowledge_inner(request),
        )
        .instrument(span)
        .await
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let span = info_span!(
            "broker.release",
            volume_id = %request.get_ref().volume_id,
            pod = %pod_label(request.get_ref().pod.as_ref()),
            lease = %lease_label(request.get_ref().lease.as_ref()),
        );
        let mut audit = audit_base(AuditAction::BrokerRelease, request.get_ref());
        if !request.get_ref().serial.is_empty() {
            audit = audit.detail_kv("serial", &request.get_ref().serial);
        }
        self.observe(
            "Release",
            audit,
            |_| (None, None),
            self.release_inner(request),
        )
        .instrument(span)
        .await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        let mut m = MetadataMap::new();
        assert_eq!(bearer(&m).unwrap_err().code(), tonic::Code::Unauthenticated);
        m.insert("authorization", "Basic abc".parse().unwrap());
        assert!(bearer(&m).is_err());
        m.insert("authorization", "Bearer ".parse().unwrap());
        assert!(bearer(&m).is_err());
        m.insert("authorization", "bearer eyJx.y.z".parse().unwrap());
        assert_eq!(bearer(&m).unwrap(), "eyJx.y.z");
    }

    #[test]
    fn kubernetes_names_and_uids() {
        for ok in ["shop", "a", "web-0", &"a".repeat(63)] {
            assert!(is_dns1123_label(ok), "{ok}");
            assert!(is_dns1123_subdomain(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Shop",
            "a_b",
            "a.b",
            &"a".repeat(64),
            "a/b",
            "é",
        ] {
            assert!(!is_dns1123_label(bad), "{bad}");
        }
        assert!(is_dns1123_subdomain("web-0.shop"));
        for bad in ["", ".a", "a.", "a..b", "A", "a_b", "a/b", &"a".repeat(254)] {
            assert!(!is_dns1123_subdomain(bad), "{bad}");
        }
        assert!(is_uuid("7f3c2a1b-0d9e-4c8f-a6b5-4e3d2c1b0a99"));
        for bad in [
            "",
            "uid-shop-web-0",
            "7f3c2a1b0d9e4c8fa6b54e3d2c1b0a99",
            "7f3c2a1b-0d9e-4c8f-a6b5-4e3d2c1b0a9",
            "7f3c2a1b-0d9e-4c8f-a6b5-4e3d2c1b0a9z",
            "../../etc-0d9e-4c8f-a6b5-4e3d2c1b0a99",
        ] {
            assert!(!is_uuid(bad), "{bad}");
        }
    }

    #[test]
    fn lease_defaults_to_the_pods_namespace() {
        let pod = PodIdentity {
            namespace: "shop".into(),
            ..PodIdentity::default()
        };
        let l = pb::LeaseRef {
            namespace: String::new(),
            name: "db".into(),
        };
        assert_eq!(
            lease_ref(Some(&l), &pod).unwrap(),
            ObjectRef::new("shop", "db")
        );
        assert!(lease_ref(None, &pod).is_err());
        let long = "x".repeat(300);
        assert!(required("pod.name", &long).is_err());
    }
}
