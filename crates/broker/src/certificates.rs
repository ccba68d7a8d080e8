//! Certificates for CSI volumes of certificate leases: every pod gets its own,
//! for a key that never leaves its node.
//!
//! The node driver generates the key, makes a CSR for the names `Issue` told it
//! (the lease's names with `${POD_NAME}`, `${POD_NAMESPACE}`, `${SERVICE_ACCOUNT}`
//! and `${POD_UID}` expanded from the *verified* pod identity, see
//! [`certificate_request`]) and sends only the CSR (`IssueCertificate`). The broker
//! records the serial it asks for *before* the issuer signs ([`PodCertificateStore`]),
//! checks the returned chain (`verify_leaf` with the CSR: the broker has no key), and
//! revokes on `Release`, when the pod loses access, and from [`PodCertificates::sweep_lease`]
//! when the pod is gone.
//!
//! Issuers are found through [`CertificateIssuers`] (the controller implements it over
//! its issuer registry; [`MemoryCertificateIssuers`] for tests).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use leasehold_api::{
    CertificateSpec, CertificateUsage, IssuerKind, IssuerRef, RotationPolicy, SecretLease,
};
use leasehold_certs::issuer::NoJournal;
use leasehold_certs::{
    CertificateIssuer, CertificateRequest, IssueOrder, IssuerError, KeyAlgorithm, RevocationReason,
    RevokeOrder, Usage, new_serial, verify,
};
use leasehold_core::naming::short_uid;
use leasehold_proto::broker::v1 as pb;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use tracing::{info, instrument, warn};

use crate::authz::{Deny, PodIdentity};
use crate::consumers::FIELD_MANAGER;
use crate::error::BrokerError;
use crate::per_pod::{POD_UID_LABEL, lease_uid};
use crate::sweep::{LivePods, PodLister, sweep_namespaces};

/// Longest CSR accepted (PEM). An RSA-3072 CSR with many names is far below it.
pub const MAX_CSR_BYTES: usize = 16 * 1024;
/// Certificates a pod may hold at once per lease (current, renewing, and a
/// superseded one whose release has not arrived yet).
pub const MAX_CERTIFICATES_PER_POD: usize = 4;

/// Why an issuer cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IssuerLookupError {
    /// No such issuer: the lease is misconfigured (`FAILED_PRECONDITION`).
    #[error("issuer {0} not found")]
    NotFound(String),
    /// The issuer exists but cannot issue yet (`UNAVAILABLE`).
    #[error("issuer {0} is not ready: {1}")]
    NotReady(String, String),
}

impl From<IssuerLookupError> for BrokerError {
    fn from(e: IssuerLookupError) -> Self {
        match e {
            IssuerLookupError::NotFound(_) => BrokerError::FailedPrecondition(e.to_string()),
            IssuerLookupError::NotReady(..) => BrokerError::Unavailable(e.to_string()),
        }
    }
}

/// Where the broker finds the issuer a lease names.
pub trait CertificateIssuers: Send + Sync {
    /// The issuer `issuer_ref` names, for a lease in `namespace`.
    fn issuer_for(
        &self,
        namespace: &str,
        issuer_ref: &IssuerRef,
    ) -> Result<Arc<dyn CertificateIssuer>, IssuerLookupError>;
}

/// [`CertificateIssuers`] in memory.
#[derive(Default)]
pub struct MemoryCertificateIssuers {
    issuers: Mutex<HashMap<(String, String), Arc<dyn CertificateIssuer>>>,
}

impl std::fmt::Debug for MemoryCertificateIssuers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryCertificateIssuers")
            .finish_non_exhaustive()
    }
}

fn issuer_key(namespace: &str, issuer_ref: &IssuerRef) -> (String, String) {
    match issuer_ref.kind {
        IssuerKind::Issuer => (namespace.to_owned(), issuer_ref.name.clone()),
        IssuerKind::ClusterIssuer => (String::new(), issuer_ref.name.clone()),
    }
}

impl MemoryCertificateIssuers {
    /// No issuers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an `Issuer` in `namespace`, or a `ClusterIssuer` when `namespace` is `None`.
    pub fn insert(&self, namespace: Option<&str>, name: &str, issuer: Arc<dyn CertificateIssuer>) {
        let kind = if namespace.is_some() {
            IssuerKind::Issuer
        } else {
            IssuerKind::ClusterIssuer
        };
        let key = issuer_key(
            namespace.unwrap_or_default(),
            &IssuerRef {
                name: name.to_owned(),
                kind,
            },
        );
        self.issuers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, issuer);
    }
}

impl CertificateIssuers for MemoryCertificateIssuers {
    fn issuer_for(
        &self,
        namespace: &str,
        issuer_ref: &IssuerRef,
    ) -> Result<Arc<dyn CertificateIssuer>, IssuerLookupError> {
        self.issuers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&issuer_key(namespace, issuer_ref))
            .cloned()
            .ok_or_else(|| IssuerLookupError::NotFound(issuer_ref.name.clone()))
    }
}

/// One certificate issued (or being issued) to a pod. No key material: the broker
/// never has the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodCertificateRecord {
    /// Lower-case hex serial, chosen before the issuer was called.
    pub serial: String,
    /// Pod namespace.
    pub pod_namespace: String,
    /// Pod name.
    pub pod_name: String,
    /// Pod UID.
    pub pod_uid: String,
    /// The node it was issued to: only that node may release it.
    pub node: String,
    /// When the broker asked for it.
    pub issued_at: Timestamp,
    /// When it expires (an upper bound until the issuer answered).
    pub not_after: Timestamp,
    /// The leaf, PEM, once issued (an ACME issuer needs it to revoke).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaf_pem: Option<String>,
}

/// Where pod certificates are recorded, per lease.
#[async_trait]
pub trait PodCertificateStore: Send + Sync {
    /// Creates or replaces the record of `record.serial`. Durable when it returns.
    async fn put(
        &self,
        lease: &SecretLease,
        record: &PodCertificateRecord,
    ) -> Result<(), BrokerError>;
    /// Removes a record (missing is fine).
    async fn delete(&self, lease: &SecretLease, serial: &str) -> Result<(), BrokerError>;
    /// Every record of `lease`.
    async fn list(&self, lease: &SecretLease) -> Result<Vec<PodCertificateRecord>, BrokerError>;
}

/// [`PodCertificateStore`] in memory.
#[derive(Debug, Default)]
pub struct MemoryPodCertificateStore {
    records: Mutex<HashMap<(String, String), PodCertificateRecord>>,
}

impl MemoryPodCertificateStore {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serials recorded for `pod_uid` (any lease), sorted.
    pub fn serials_of(&self, pod_uid: &str) -> Vec<String> {
        let mut serials: Vec<String> = self
            .records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|r| r.pod_uid == pod_uid)
            .map(|r| r.serial.clone())
            .collect();
        serials.sort();
        serials
    }
}

#[async_trait]
impl PodCertificateStore for MemoryPodCertificateStore {
    async fn put(
        &self,
        lease: &SecretLease,
        record: &PodCertificateRecord,
    ) -> Result<(), BrokerError> {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                (lease_uid(lease).to_owned(), record.serial.clone()),
                record.clone(),
            );
        Ok(())
    }

    async fn delete(&self, lease: &SecretLease, serial: &str) -> Result<(), BrokerError> {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(lease_uid(lease).to_owned(), serial.to_owned()));
        Ok(())
    }

    async fn list(&self, lease: &SecretLease) -> Result<Vec<PodCertificateRecord>, BrokerError> {
        let uid = lease_uid(lease);
        Ok(self
            .records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|((l, _), _)| l == uid)
            .map(|(_, r)| r.clone())
            .collect())
    }
}

/// Label with the lease UID (12 hex digits) on certificate records.
pub const CERT_LEASE_UID_LABEL: &str = "leasehold.dev/cert-lease-uid";
const RECORD_KEY: &str = "record";

/// Name of the Secret recording `serial` of a lease. A Secret (not a ConfigMap) only
/// because the controller may already manage Secrets in lease namespaces; it holds no
/// secret.
pub fn cert_record_name(lease_uid: &str, serial: &str) -> String {
    let serial: String = serial
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(40)
        .collect::<String>()
        .to_ascii_lowercase();
    format!("leasehold-cert-{}-{serial}", short_uid(lease_uid))
}

/// The Secret recording `record` (server-side apply body), owned by the lease.
pub fn cert_record_secret(
    lease: &SecretLease,
    record: &PodCertificateRecord,
) -> Result<Secret, BrokerError> {
    let uid = lease_uid(lease);
    let json = serde_json::to_vec(record)
        .map_err(|e| BrokerError::Internal(format!("cannot encode a certificate record: {e}")))?;
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(cert_record_name(uid, &record.serial)),
            namespace: lease.metadata.namespace.clone(),
            labels: Some(BTreeMap::from([
                (CERT_LEASE_UID_LABEL.to_owned(), short_uid(uid)),
                (POD_UID_LABEL.to_owned(), record.pod_uid.clone()),
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    "leasehold".to_owned(),
                ),
            ])),
            owner_references: Some(vec![OwnerReference {
                api_version: format!("{}/{}", leasehold_api::GROUP, leasehold_api::VERSION),
                kind: "SecretLease".to_owned(),
                name: lease.metadata.name.clone().unwrap_or_default(),
                uid: uid.to_owned(),
                controller: Some(false),
                block_owner_deletion: None,
            }]),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(RECORD_KEY.to_owned(), ByteString(json))])),
        type_: Some("Opaque".to_owned()),
        ..Secret::default()
    })
}

fn record_of(secret: &Secret) -> Option<PodCertificateRecord> {
    serde_json::from_slice(&secret.data.as_ref()?.get(RECORD_KEY)?.0).ok()
}

/// [`PodCertificateStore`] in Secrets owned by the lease (one per serial). Needs
/// `get`, `list`, `patch` and `delete` on secrets in lease namespaces, as the
/// per-pod credential store does.
#[derive(Clone)]
pub struct KubePodCertificateStore {
    client: kube::Client,
}

impl std::fmt::Debug for KubePodCertificateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubePodCertificateStore")
            .finish_non_exhaustive()
    }
}

impl KubePodCertificateStore {
    /// Records through `client`.
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }

    fn api(&self, lease: &SecretLease) -> Api<Secret> {
        Api::namespaced(
            self.client.clone(),
            lease.metadata.namespace.as_deref().unwrap_or_default(),
        )
    }
}

#[async_trait]
impl PodCertificateStore for KubePodCertificateStore {
    async fn put(
        &self,
        lease: &SecretLease,
        record: &PodCertificateRecord,
    ) -> Result<(), BrokerError> {
        let secret = cert_record_secret(lease, record)?;
        let name = secret.metadata.name.clone().unwrap_or_default();
        let mut body = serde_json::to_value(&secret)
            .map_err(|e| BrokerError::Internal(format!("cannot encode a Secret: {e}")))?;
        body["apiVersion"] = "v1".into();
        body["kind"] = "Secret".into();
        self.api(lease)
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(body),
            )
            .await
            .map_err(|e| BrokerError::kube("cannot write a certificate record", &e))?;
        Ok(())
    }

    async fn delete(&self, lease: &SecretLease, serial: &str) -> Result<(), BrokerError> {
        match self
            .api(lease)
            .delete(
                &cert_record_name(lease_uid(lease), serial),
                &DeleteParams::default(),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(BrokerError::kube("cannot delete a certificate record", &e)),
        }
    }

    async fn list(&self, lease: &SecretLease) -> Result<Vec<PodCertificateRecord>, BrokerError> {
        let selector = format!("{CERT_LEASE_UID_LABEL}={}", short_uid(lease_uid(lease)));
        let secrets = self
            .api(lease)
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| BrokerError::kube("cannot list certificate records", &e))?;
        Ok(secrets.items.iter().filter_map(record_of).collect())
    }
}

/// Why a lease's certificate names cannot be used for a pod (`INVALID_ARGUMENT`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertificateSpecError {
    /// `${...}` that is not one of the known placeholders.
    #[error(
        "{field}: unknown placeholder (use ${{POD_NAME}}, ${{POD_NAMESPACE}}, ${{SERVICE_ACCOUNT}} or ${{POD_UID}})"
    )]
    UnknownPlaceholder {
        /// Which field.
        field: &'static str,
    },
    /// After expansion, not a valid name of its kind.
    #[error("{field}: {value:?} is not {what}")]
    InvalidName {
        /// Which field.
        field: &'static str,
        /// The expanded value (a name, never a secret).
        value: String,
        /// What it should be.
        what: &'static str,
    },
    /// The duration is not positive.
    #[error("certificate duration must be positive")]
    Duration,
}

impl From<CertificateSpecError> for BrokerError {
    fn from(e: CertificateSpecError) -> Self {
        BrokerError::InvalidArgument(e.to_string())
    }
}

/// `template` with the pod's placeholders replaced.
pub fn expand(
    field: &'static str,
    template: &str,
    pod: &PodIdentity,
) -> Result<String, CertificateSpecError> {
    let out = template
        .replace("${POD_NAME}", &pod.name)
        .replace("${POD_NAMESPACE}", &pod.namespace)
        .replace("${SERVICE_ACCOUNT}", &pod.service_account)
        .replace("${POD_UID}", &pod.uid);
    if out.contains("${") {
        return Err(CertificateSpecError::UnknownPlaceholder { field });
    }
    Ok(out)
}

/// A DNS name a certificate may carry: labels of `[a-z0-9-]` (upper case folded),
/// at most 63 each and 253 in all, optionally a leading `*.` wildcard.
fn is_dns_name(name: &str) -> bool {
    let bare = name.strip_prefix("*.").unwrap_or(name);
    !bare.is_empty()
        && name.len() <= 253
        && bare.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

/// A URI SAN: `scheme:rest`, printable ASCII without spaces.
fn is_uri(uri: &str) -> bool {
    let Some((scheme, rest)) = uri.split_once(':') else {
        return false;
    };
    let mut chars = scheme.chars();
    uri.len() <= 2048
        && !rest.is_empty()
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        && uri.bytes().all(|b| b.is_ascii_graphic())
}

fn key_algorithm(alg: leasehold_api::KeyAlgorithm) -> KeyAlgorithm {
    match alg {
        leasehold_api::KeyAlgorithm::EcdsaP256 => KeyAlgorithm::EcdsaP256,
        leasehold_api::KeyAlgorithm::EcdsaP384 => KeyAlgorithm::EcdsaP384,
        leasehold_api::KeyAlgorithm::Ed25519 => KeyAlgorithm::Ed25519,
        leasehold_api::KeyAlgorithm::Rsa2048 => KeyAlgorithm::Rsa2048,
        leasehold_api::KeyAlgorithm::Rsa3072 => KeyAlgorithm::Rsa3072,
    }
}

fn usage(u: CertificateUsage) -> Usage {
    match u {
        CertificateUsage::ServerAuth => Usage::ServerAuth,
        CertificateUsage::ClientAuth => Usage::ClientAuth,
        CertificateUsage::DigitalSignature => Usage::DigitalSignature,
        CertificateUsage::KeyEncipherment => Usage::KeyEncipherment,
    }
}

/// The certificate a pod gets from `spec`: names expanded from the verified `pod`
/// and checked, lifetime `spec.duration` or `default_duration` (the policy's TTL).
pub fn certificate_request(
    spec: &CertificateSpec,
    default_duration: Duration,
    pod: &PodIdentity,
) -> Result<CertificateRequest, CertificateSpecError> {
    let common_name = expand("commonName", &spec.common_name, pod)?;
    if common_name.is_empty()
        || common_name.len() > 64
        || !common_name.bytes().all(|b| (0x20..0x7f).contains(&b))
    {
        return Err(CertificateSpecError::InvalidName {
            field: "commonName",
            value: common_name,
            what: "1 to 64 printable ASCII characters",
        });
    }
    let mut dns_names = Vec::with_capacity(spec.dns_names.len());
    for template in &spec.dns_names {
        let name = expand("dnsNames", template, pod)?.to_ascii_lowercase();
        if !is_dns_name(&name) {
            return Err(CertificateSpecError::InvalidName {
                field: "dnsNames",
                value: name,
                what: "a DNS name",
            });
        }
        dns_names.push(name);
    }
    let mut ip_addresses = Vec::with_capacity(spec.ip_addresses.len());
    for ip in &spec.ip_addresses {
        ip_addresses.push(
            ip.parse::<IpAddr>()
                .map_err(|_| CertificateSpecError::InvalidName {
                    field: "ipAddresses",
                    value: ip.clone(),
                    what: "an IP address",
                })?,
        );
    }
    let mut uris = Vec::with_capacity(spec.uris.len());
    for template in &spec.uris {
        let uri = expand("uris", template, pod)?;
        if !is_uri(&uri) {
            return Err(CertificateSpecError::InvalidName {
                field: "uris",
                value: uri,
                what: "a URI",
            });
        }
        uris.push(uri);
    }
    let duration = spec
        .duration
        .as_ref()
        .map(|d| {
            if d.is_negative() {
                Duration::ZERO
            } else {
                Duration::from(*d)
            }
        })
        .unwrap_or(default_duration);
    if duration.is_zero() {
        return Err(CertificateSpecError::Duration);
    }
    let usages = if spec.usages.is_empty() {
        vec![Usage::ServerAuth, Usage::DigitalSignature]
    } else {
        spec.usages
            .iter()
            .map(|u| usage(*u))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    };
    Ok(CertificateRequest {
        common_name,
        // Duplicates would make the CSR's SAN set differ from the list.
        dns_names: dedup(dns_names),
        ip_addresses: dedup(ip_addresses),
        uris: dedup(uris),
        duration: time::Duration::try_from(duration).map_err(|_| CertificateSpecError::Duration)?,
        usages,
        key_algorithm: key_algorithm(spec.key_algorithm),
    })
}

fn dedup<T: Ord + Clone>(items: Vec<T>) -> Vec<T> {
    let mut seen = BTreeSet::new();
    items
        .into_iter()
        .filter(|i| seen.insert(i.clone()))
        .collect()
}

/// The wire form of a request (what the node makes its CSR for and verifies with).
pub fn profile(request: &CertificateRequest) -> pb::CertificateProfile {
    pb::CertificateProfile {
        common_name: request.common_name.clone(),
        dns_names: request.dns_names.clone(),
        ip_addresses: request
            .ip_addresses
            .iter()
            .map(ToString::to_string)
            .collect(),
        uris: request.uris.clone(),
        usages: request.usages.iter().map(|u| format!("{u:?}")).collect(),
        key_algorithm: format!("{:?}", request.key_algorithm),
    }
}

/// A certificate issued to a pod (no key: the node has it).
#[derive(Debug, Clone)]
pub struct PodCertificate {
    /// Leaf and intermediates, PEM.
    pub chain_pem: String,
    /// Trust anchor, PEM.
    pub ca_pem: String,
    /// Lower-case hex.
    pub serial: String,
    /// Expiry.
    pub not_after: Timestamp,
    /// When the driver should renew.
    pub renew_at: Timestamp,
    /// What it was issued for.
    pub request: CertificateRequest,
}

/// One `IssueCertificate`, already authorized.
#[derive(Debug, Clone, Copy)]
pub struct PodCertificateRequest<'a> {
    /// The lease (with `spec.certificate`).
    pub lease: &'a SecretLease,
    /// Its policy.
    pub policy: &'a RotationPolicy,
    /// The verified pod.
    pub pod: &'a PodIdentity,
    /// Its node.
    pub node: &'a str,
    /// The node's CSR, PEM.
    pub csr_pem: &'a str,
}

/// What a sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertificateSweepReport {
    /// Serials revoked (records deleted).
    pub revoked: Vec<String>,
    /// Serials of expired certificates whose records were dropped (nothing to revoke).
    pub expired: Vec<String>,
    /// Serials that could not be revoked this time.
    pub failed: Vec<String>,
}

/// Which records the sweep acts on: revoke those whose pod is gone from the
/// record's namespace (and that were recorded before the pod list was taken),
/// forget those that expired.
pub fn plan_certificate_sweep<'a>(
    records: &'a [PodCertificateRecord],
    live_pods: &LivePods,
    now: Timestamp,
) -> (Vec<&'a PodCertificateRecord>, Vec<&'a PodCertificateRecord>) {
    let mut revoke = Vec::new();
    let mut expired = Vec::new();
    for record in records {
        if record.not_after <= now {
            expired.push(record);
        } else if !live_pods.keeps(&record.pod_namespace, &record.pod_uid, record.issued_at) {
            revoke.push(record);
        }
    }
    (revoke, expired)
}

fn issuer_error(e: IssuerError) -> BrokerError {
    match e {
        IssuerError::Rejected(reason) => {
            BrokerError::InvalidArgument(format!("the issuer refused the CSR: {reason}"))
        }
        IssuerError::Unavailable(reason) => {
            BrokerError::Unavailable(format!("issuer unavailable: {reason}"))
        }
        IssuerError::RateLimited {
            detail,
            retry_after,
        } => BrokerError::ResourceExhausted(match retry_after {
            Some(after) => format!(
                "issuer rate limit ({detail}); retry after {}s",
                after.as_secs().max(1)
            ),
            None => format!("issuer rate limit ({detail})"),
        }),
    }
}

fn to_jiff(t: time::OffsetDateTime) -> Timestamp {
    Timestamp::from_second(t.unix_timestamp()).unwrap_or(Timestamp::MAX)
}

fn to_time(t: Timestamp) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(t.as_second())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    jiff::SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

fn first_der(pem: &str, what: &str) -> Result<CertificateDer<'static>, BrokerError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| BrokerError::Unavailable(format!("the issuer returned no usable {what}")))
}

/// When to renew a certificate that expires at `not_after` after `lifetime`: the
/// policy's `renewBefore` ahead of expiry, or at two thirds of the lifetime when
/// `renewBefore` does not fit in it.
pub fn renew_at(issued_at: Timestamp, not_after: Timestamp, policy: &RotationPolicy) -> Timestamp {
    let lifetime = Duration::try_from(not_after.duration_since(issued_at)).unwrap_or_default();
    let before = leasehold_api::validate::renew_before(&policy.spec)
        .ok()
        .filter(|b| *b < lifetime)
        .unwrap_or(lifetime / 3);
    let before = jiff::SignedDuration::try_from(before).unwrap_or_default();
    not_after.checked_sub(before).unwrap_or(issued_at)
}

/// Issues, records and revokes pod certificates.
pub struct PodCertificates {
    issuers: Arc<dyn CertificateIssuers>,
    store: Arc<dyn PodCertificateStore>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for PodCertificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodCertificates").finish_non_exhaustive()
    }
}

impl PodCertificates {
    /// Issuers from `issuers`, records in `store`.
    pub fn new(issuers: Arc<dyn CertificateIssuers>, store: Arc<dyn PodCertificateStore>) -> Self {
        Self {
            issuers,
            store,
            locks: Mutex::default(),
        }
    }

    fn lock_for(&self, lease: &SecretLease, pod_uid: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(format!("{}/{pod_uid}", lease_uid(lease)))
            .or_default()
            .clone()
    }

    fn forget_lock(&self, lease: &SecretLease, pod_uid: &str) {
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&format!("{}/{pod_uid}", lease_uid(lease)));
    }

    fn issuer(&self, lease: &SecretLease) -> Result<Arc<dyn CertificateIssuer>, BrokerError> {
        let spec = certificate_spec(lease)?;
        let namespace = lease.metadata.namespace.as_deref().unwrap_or_default();
        Ok(self.issuers.issuer_for(namespace, &spec.issuer_ref)?)
    }

    /// The names a pod's certificate of `lease` will carry (what `Issue` answers).
    pub fn request_for(
        lease: &SecretLease,
        policy: &RotationPolicy,
        pod: &PodIdentity,
    ) -> Result<CertificateRequest, BrokerError> {
        let spec = certificate_spec(lease)?;
        Ok(certificate_request(spec, policy.spec.ttl.into(), pod)?)
    }

    /// Signs the node's CSR: records the serial, has the issuer sign, checks the chain
    /// (CA, names, usages, CSR key), records the leaf.
    #[instrument(skip_all, fields(pod = %request.pod.name, namespace = %request.pod.namespace))]
    pub async fn issue(
        &self,
        request: &PodCertificateRequest<'_>,
    ) -> Result<PodCertificate, BrokerError> {
        let lease = request.lease;
        if request.csr_pem.is_empty() || request.csr_pem.len() > MAX_CSR_BYTES {
            return Err(BrokerError::InvalidArgument(format!(
                "csr_pem must be 1 to {MAX_CSR_BYTES} bytes"
            )));
        }
        let wanted = Self::request_for(lease, request.policy, request.pod)?;
        // Whatever the issuer: never certify a key of another kind than the lease asks for.
        leasehold_certs::verify::check_csr_key_algorithm(request.csr_pem, wanted.key_algorithm)
            .map_err(|e| BrokerError::InvalidArgument(e.to_string()))?;
        let issuer = self.issuer(lease)?;
        let lock = self.lock_for(lease, &request.pod.uid);
        let _guard = lock.lock().await;

        let now = Timestamp::now();
        let mut held = 0;
        for record in self.store.list(lease).await? {
            if record.pod_uid != request.pod.uid {
                continue;
            }
            if record.not_after <= now {
                // Expired: trusted by no one any more, nothing to revoke.
                self.store.delete(lease, &record.serial).await?;
            } else {
                held += 1;
            }
        }
        if held >= MAX_CERTIFICATES_PER_POD {
            return Err(BrokerError::ResourceExhausted(format!(
                "pod {}/{} holds {held} certificates of this lease already; release one first",
                request.pod.namespace, request.pod.name
            )));
        }

        let serial = new_serial();
        let mut record = PodCertificateRecord {
            serial: serial.clone(),
            pod_namespace: request.pod.namespace.clone(),
            pod_name: request.pod.name.clone(),
            pod_uid: request.pod.uid.clone(),
            node: request.node.to_owned(),
            issued_at: now,
            // An upper bound (the CA backdates and pads by a minute), so an unanswered
            // order is kept for revocation as long as its certificate could be valid.
            not_after: add(
                now,
                Duration::try_from(wanted.duration).unwrap_or_default() + Duration::from_secs(120),
            ),
            leaf_pem: None,
        };
        self.store.put(lease, &record).await?;
        let issued = issuer
            .issue(IssueOrder {
                request: &wanted,
                csr_pem: request.csr_pem,
                serial: &serial,
                journal: &NoJournal,
            })
            .await;
        let chain = match issued {
            Ok(chain) => chain,
            Err(e) => {
                // Refused: nothing signed under the serial. Transient: the record stays, so
                // that release or the sweep revokes whatever may have been signed.
                if !e.is_transient() {
                    self.store.delete(lease, &serial).await?;
                }
                return Err(issuer_error(e));
            }
        };
        let anchor = first_der(&chain.ca_pem, "CA certificate")?;
        let leaf = first_der(&chain.leaf_pem, "certificate")?;
        let checked = verify::verify_leaf(
            &anchor,
            &leaf,
            &wanted,
            None,
            Some(request.csr_pem),
            to_time(now),
        )
        .await;
        if let Err(e) = checked {
            warn!(serial = %serial, error = %e, "issued certificate did not verify; revoking it");
            self.revoke_record(
                issuer.as_ref(),
                lease,
                &record,
                RevocationReason::Unspecified,
            )
            .await?;
            return Err(BrokerError::Unavailable(format!(
                "the issued certificate did not verify: {e}"
            )));
        }
        let not_after = to_jiff(chain.not_after);
        record.not_after = not_after;
        record.leaf_pem = Some(chain.leaf_pem.clone());
        self.store.put(lease, &record).await?;
        info!(serial = %serial, %not_after, kind = issuer.kind(), "pod certificate issued");
        Ok(PodCertificate {
            chain_pem: chain.chain_pem,
            ca_pem: chain.ca_pem,
            serial: chain.serial,
            not_after,
            renew_at: renew_at(now, not_after, request.policy),
            request: wanted,
        })
    }

    async fn revoke_record(
        &self,
        issuer: &dyn CertificateIssuer,
        lease: &SecretLease,
        record: &PodCertificateRecord,
        reason: RevocationReason,
    ) -> Result<(), BrokerError> {
        issuer
            .revoke(RevokeOrder {
                serial: &record.serial,
                leaf_pem: record.leaf_pem.as_deref(),
                not_after: Some(to_time(record.not_after)),
                reason,
            })
            .await
            .map_err(|e| {
                BrokerError::Unavailable(format!("cannot revoke {}: {e}", record.serial))
            })?;
        self.store.delete(lease, &record.serial).await
    }

    /// Revokes the pod's certificates of `lease` (only `serial` when given). Only the
    /// node they were issued to may release them. Idempotent.
    #[instrument(skip_all, fields(pod_uid = %pod_uid))]
    pub async fn release(
        &self,
        lease: &SecretLease,
        pod_uid: &str,
        node: &str,
        serial: Option<&str>,
    ) -> Result<(), BrokerError> {
        let lock = self.lock_for(lease, pod_uid);
        let guard = lock.lock().await;
        let records: Vec<PodCertificateRecord> = self
            .store
            .list(lease)
            .await?
            .into_iter()
            .filter(|r| r.pod_uid == pod_uid && serial.is_none_or(|s| s == r.serial))
            .collect();
        if records.is_empty() {
            return Ok(());
        }
        if let Some(other) = records.iter().find(|r| r.node != node) {
            return Err(BrokerError::Denied(Deny::PodNotOnNode {
                namespace: other.pod_namespace.clone(),
                name: other.pod_name.clone(),
                node: node.to_owned(),
            }));
        }
        let issuer = self.issuer(lease)?;
        let reason = if serial.is_some() {
            RevocationReason::Superseded
        } else {
            RevocationReason::CessationOfOperation
        };
        for record in &records {
            self.revoke_record(issuer.as_ref(), lease, record, reason)
                .await?;
            info!(serial = %record.serial, "pod certificate revoked");
        }
        drop(guard);
        if serial.is_none() {
            self.forget_lock(lease, pod_uid);
        }
        Ok(())
    }

    /// Revokes the certificates of `lease` whose pod no longer exists in its
    /// record's namespace, listing pods with `pods` once the records are read
    /// (in the namespaces they name only; see [`crate::sweep`]).
    #[instrument(skip_all, fields(lease = %lease.metadata.name.as_deref().unwrap_or_default()))]
    pub async fn sweep_lease(
        &self,
        lease: &SecretLease,
        pods: &dyn PodLister,
    ) -> Result<CertificateSweepReport, BrokerError> {
        if lease.spec.certificate.is_none() || lease_uid(lease).is_empty() {
            return Ok(CertificateSweepReport::default());
        }
        let records = self.store.list(lease).await?;
        if records.is_empty() {
            return Ok(CertificateSweepReport::default());
        }
        let namespaces = sweep_namespaces(
            lease.metadata.namespace.as_deref().unwrap_or_default(),
            records.iter().map(|r| r.pod_namespace.as_str()),
        );
        let live_pods = LivePods::list(pods, &namespaces).await?;
        self.revoke_gone(lease, &records, &live_pods).await
    }

    /// Revokes every certificate of `lease` recorded before `before`: the lease is
    /// going away, and its pods with it.
    pub async fn revoke_all(
        &self,
        lease: &SecretLease,
        before: Timestamp,
    ) -> Result<CertificateSweepReport, BrokerError> {
        if lease.spec.certificate.is_none() || lease_uid(lease).is_empty() {
            return Ok(CertificateSweepReport::default());
        }
        let records = self.store.list(lease).await?;
        let no_pods = LivePods {
            listed_at: before,
            by_namespace: HashMap::new(),
        };
        self.revoke_gone(lease, &records, &no_pods).await
    }

    /// Applies [`plan_certificate_sweep`] to `records`.
    async fn revoke_gone(
        &self,
        lease: &SecretLease,
        records: &[PodCertificateRecord],
        live_pods: &LivePods,
    ) -> Result<CertificateSweepReport, BrokerError> {
        let (revoke, expired) = plan_certificate_sweep(records, live_pods, Timestamp::now());
        let mut report = CertificateSweepReport::default();
        for record in expired {
            self.store.delete(lease, &record.serial).await?;
            report.expired.push(record.serial.clone());
        }
        if revoke.is_empty() {
            return Ok(report);
        }
        let issuer = self.issuer(lease)?;
        for record in revoke {
            let lock = self.lock_for(lease, &record.pod_uid);
            let guard = lock.lock().await;
            match self
                .revoke_record(
                    issuer.as_ref(),
                    lease,
                    record,
                    RevocationReason::CessationOfOperation,
                )
                .await
            {
                Ok(()) => {
                    info!(serial = %record.serial, "certificate of a deleted pod revoked");
                    report.revoked.push(record.serial.clone());
                }
                Err(e) => {
                    warn!(serial = %record.serial, error = %e, "cannot revoke the certificate of a deleted pod");
                    report.failed.push(record.serial.clone());
                }
            }
            drop(guard);
            self.forget_lock(lease, &record.pod_uid);
        }
        Ok(report)
    }
}

fn certificate_spec(lease: &SecretLease) -> Result<&CertificateSpec, BrokerError> {
    lease.spec.certificate.as_ref().ok_or_else(|| {
        BrokerError::FailedPrecondition("the lease is not a certificate lease".into())
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn pod() -> PodIdentity {
        PodIdentity {
            namespace: "shop".into(),
            name: "web-0".into(),
            uid: "7f3c2a1b-0d9e-4c8f-a6b5-4e3d2c1b0a99".into(),
            service_account: "web".into(),
        }
    }

    fn spec(json: serde_json::Value) -> CertificateSpec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn placeholders_expand_from_the_pod() {
        let s = spec(serde_json::json!({
            "issuerRef": {"name": "ca"},
            "commonName": "${POD_NAME}.${POD_NAMESPACE}",
            "dnsNames": ["${POD_NAME}.web.${POD_NAMESPACE}.svc", "WEB.${POD_NAMESPACE}.svc", "web.shop.svc"],
            "ipAddresses": ["10.0.0.1"],
            "uris": ["spiffe://cluster.local/ns/${POD_NAMESPACE}/sa/${SERVICE_ACCOUNT}", "urn:uid:${POD_UID}"],
            "usages": ["clientAuth", "serverAuth", "clientAuth"],
        }));
        let r = certificate_request(&s, Duration::from_secs(3600), &pod()).unwrap();
        assert_eq!(r.common_name, "web-0.shop");
        assert_eq!(r.dns_names, ["web-0.web.shop.svc", "web.shop.svc"]);
        assert_eq!(r.ip_addresses, ["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            r.uris,
            [
                "spiffe://cluster.local/ns/shop/sa/web",
                "urn:uid:7f3c2a1b-0d9e-4c8f-a6b5-4e3d2c1b0a99"
            ]
        );
        assert_eq!(r.usages, [Usage::ServerAuth, Usage::ClientAuth]);
        assert_eq!(r.duration, time::Duration::hours(1));
        let p = profile(&r);
        assert_eq!(p.usages, ["ServerAuth", "ClientAuth"]);
        assert_eq!(p.key_algorithm, "EcdsaP256");
    }

    #[test]
    fn bad_templates_and_names_are_refused() {
        for (field, value) in [
            ("dnsNames", serde_json::json!(["${HOSTNAME}.svc"])),
            ("dnsNames", serde_json::json!(["web_0.svc"])),
            ("dnsNames", serde_json::json!(["a..b"])),
            ("uris", serde_json::json!(["not a uri"])),
            ("ipAddresses", serde_json::json!(["10.0.0.300"])),
        ] {
            let s = spec(serde_json::json!({
                "issuerRef": {"name": "ca"}, "commonName": "web", field: value,
            }));
            let e = certificate_request(&s, Duration::from_secs(60), &pod()).unwrap_err();
            assert_eq!(
                BrokerError::from(e).code(),
                tonic::Code::InvalidArgument,
                "{field}"
            );
        }
    }

    #[test]
    fn records_are_lease_owned_secrets_without_key_material() {
        let lease: SecretLease = serde_json::from_value(serde_json::json!({
            "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease",
            "metadata": {"namespace": "shop", "name": "tls",
                         "uid": "0a1b2c3d-4e5f-4000-8000-000000000001"},
            "spec": {"policyRef": {"name": "p"},
                     "certificate": {"issuerRef": {"name": "ca"}, "commonName": "x"}},
        }))
        .unwrap();
        let t: Timestamp = "2030-01-01T00:00:00Z".parse().unwrap();
        let record = PodCertificateRecord {
            serial: "4a".repeat(16),
            pod_namespace: "shop".into(),
            pod_name: "web-0".into(),
            pod_uid: "7f3c2a1b-0d9e-4c8f-a6b5-4e3d2c1b0a99".into(),
            node: "node-a".into(),
            issued_at: t,
            not_after: t,
            leaf_pem: Some("-----BEGIN CERTIFICATE-----".into()),
        };
        let secret = cert_record_secret(&lease, &record).unwrap();
        let name = secret.metadata.name.clone().unwrap();
        assert_eq!(
            name,
            format!("leasehold-cert-0a1b2c3d4e5f-{}", "4a".repeat(16))
        );
        assert!(name.len() <= 63);
        let labels = secret.metadata.labels.clone().unwrap();
        assert_eq!(labels[CERT_LEASE_UID_LABEL], "0a1b2c3d4e5f");
        assert_eq!(
            secret.metadata.owner_references.clone().unwrap()[0].kind,
            "SecretLease"
        );
        assert_eq!(record_of(&secret).unwrap(), record);
        let json = serde_json::to_string(&secret).unwrap();
        assert!(!json.contains("PRIVATE"));
    }

    #[test]
    fn sweep_revokes_gone_pods_and_forgets_expired() {
        let t0: Timestamp = "2030-01-01T00:00:00Z".parse().unwrap();
        let listed_at: Timestamp = "2030-01-01T00:10:00Z".parse().unwrap();
        let now: Timestamp = "2030-01-01T00:11:00Z".parse().unwrap();
        let later: Timestamp = "2030-01-02T00:00:00Z".parse().unwrap();
        let rec = |serial: &str, pod_uid: &str, issued_at, not_after| PodCertificateRecord {
            serial: serial.into(),
            pod_namespace: "shop".into(),
            pod_name: "web".into(),
            pod_uid: pod_uid.into(),
            node: "node-a".into(),
            issued_at,
            not_after,
            leaf_pem: None,
        };
        let records = [
            rec("01", "live", t0, later),
            rec("02", "gone", t0, later),
            rec(
                "03",
                "fresh",
                "2030-01-01T00:10:30Z".parse().unwrap(),
                later,
            ),
            rec("04", "gone", t0, t0),
            // A pod of another namespace the lease admits, live there.
            PodCertificateRecord {
                pod_namespace: "billing".into(),
                ..rec("05", "elsewhere", t0, later)
            },
        ];
        let live = LivePods {
            listed_at,
            by_namespace: HashMap::from([
                ("shop".to_owned(), HashSet::from(["live".to_owned()])),
                (
                    "billing".to_owned(),
                    HashSet::from(["elsewhere".to_owned()]),
                ),
            ]),
        };
        let (revoke, expired) = plan_certificate_sweep(&records, &live, now);
        assert_eq!(
            revoke.iter().map(|r| r.serial.as_str()).collect::<Vec<_>>(),
            ["02"]
        );
        assert_eq!(
            expired
                .iter()
                .map(|r| r.serial.as_str())
                .collect::<Vec<_>>(),
            ["04"]
        );
    }
}
