//! Credentials: the [`CredentialBroker`] seam and its gRPC implementation.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use jiff::Timestamp;
use leasehold_files::SecretBytes;
use leasehold_proto::broker::v1 as pb;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// A `SecretLease` reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRef {
    /// Namespace of the lease (the pod's namespace unless given).
    pub namespace: String,
    /// Name of the lease.
    pub name: String,
}

impl std::fmt::Display for LeaseRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The pod a volume belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
    /// Service-account name.
    pub service_account: String,
}

/// One volume's identity as the broker sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRef {
    /// CSI volume id.
    pub volume_id: String,
    /// The lease whose credential the volume holds.
    pub lease: LeaseRef,
    /// The pod.
    pub pod: PodInfo,
    /// This node.
    pub node_name: String,
}

/// A credential as issued. `Debug` shows file names only.
pub struct IssuedCredential {
    /// Relative file name → content.
    pub files: BTreeMap<String, SecretBytes>,
    /// Version, monotonic per lease.
    pub version: u64,
    /// When the credential stops working.
    pub expires_at: Timestamp,
    /// When the broker suggests asking again, if it said.
    pub renew_at: Option<Timestamp>,
    /// Set (and `files` empty) for a certificate lease: the driver makes a key and a
    /// CSR for these names and calls [`CredentialBroker::issue_certificate`].
    pub certificate: Option<CertificateProfile>,
}

/// What a pod's certificate holds, as the broker decided it (names already
/// expanded from the pod's identity). Never secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateProfile {
    /// Common name.
    pub common_name: String,
    /// DNS SANs.
    #[serde(default)]
    pub dns_names: Vec<String>,
    /// IP SANs.
    #[serde(default)]
    pub ip_addresses: Vec<String>,
    /// URI SANs.
    #[serde(default)]
    pub uris: Vec<String>,
    /// `ServerAuth`, `ClientAuth`, `DigitalSignature`, `KeyEncipherment`.
    #[serde(default)]
    pub usages: Vec<String>,
    /// `EcdsaP256`, `EcdsaP384`, `Ed25519`, `Rsa2048` or `Rsa3072`.
    pub key_algorithm: String,
}

impl From<pb::CertificateProfile> for CertificateProfile {
    fn from(p: pb::CertificateProfile) -> Self {
        Self {
            common_name: p.common_name,
            dns_names: p.dns_names,
            ip_addresses: p.ip_addresses,
            uris: p.uris,
            usages: p.usages,
            key_algorithm: p.key_algorithm,
        }
    }
}

/// A certificate the broker's issuer signed for the node's CSR. No key: the
/// driver holds it.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    /// Leaf then intermediates, PEM (`tls.crt`).
    pub chain_pem: String,
    /// Trust anchor, PEM (`ca.crt`).
    pub ca_pem: String,
    /// Lower-case hex serial.
    pub serial: String,
    /// Expiry.
    pub not_after: Timestamp,
    /// When to renew.
    pub renew_at: Timestamp,
    /// The names and usages it was issued for (what the driver verifies).
    pub profile: CertificateProfile,
}

impl std::fmt::Debug for IssuedCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCredential")
            .field("files", &self.files.keys().collect::<Vec<_>>())
            .field("version", &self.version)
            .field("expires_at", &self.expires_at)
            .field("renew_at", &self.renew_at)
            .field("certificate", &self.certificate)
            .finish()
    }
}

/// Broker failures. Messages come from the broker or the transport, never
/// from tokens or credentials.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The broker could not be reached or did not answer in time.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker answered with an error.
    #[error("broker refused ({code:?}): {message}")]
    Refused {
        /// gRPC code from the broker.
        code: tonic::Code,
        /// Its message.
        message: String,
    },
    /// The broker's answer made no sense.
    #[error("invalid broker response: {0}")]
    InvalidResponse(String),
}

impl From<tonic::Status> for BrokerError {
    fn from(status: tonic::Status) -> Self {
        use tonic::Code;
        match status.code() {
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::ResourceExhausted => {
                BrokerError::Unavailable(format!("{:?}: {}", status.code(), status.message()))
            }
            code => BrokerError::Refused {
                code,
                message: status.message().to_owned(),
            },
        }
    }
}

/// Where credentials come from.
#[async_trait]
pub trait CredentialBroker: Send + Sync {
    /// Issues (or returns the current) credential for the volume.
    async fn issue(
        &self,
        volume: &VolumeRef,
        pod_token: &SecretString,
        held_version: u64,
    ) -> Result<IssuedCredential, BrokerError>;

    /// Reports the held version; returns the latest version the broker has.
    async fn acknowledge(&self, volume: &VolumeRef, version: u64) -> Result<u64, BrokerError>;

    /// The volume is gone: revoke its credentials.
    async fn release(&self, volume: &VolumeRef) -> Result<(), BrokerError>;

    /// Has the CSR of a certificate lease's volume signed (the key stays here).
    async fn issue_certificate(
        &self,
        _volume: &VolumeRef,
        _pod_token: &SecretString,
        _csr_pem: &str,
    ) -> Result<IssuedCertificate, BrokerError> {
        Err(BrokerError::Refused {
            code: tonic::Code::Unimplemented,
            message: "this broker does not issue certificates".into(),
        })
    }

    /// Revokes one certificate of the volume (the one a renewal replaced).
    async fn release_certificate(
        &self,
        _volume: &VolumeRef,
        _serial: &str,
    ) -> Result<(), BrokerError> {
        Err(BrokerError::Refused {
            code: tonic::Code::Unimplemented,
            message: "this broker does not issue certificates".into(),
        })
    }

    /// Whether the broker is reachable now.
    async fn ready(&self) -> bool;
}

/// Where the node driver's own token comes from.
#[derive(Clone)]
pub enum NodeToken {
    /// A projected token file, re-read on every call (the kubelet rotates it).
    File(PathBuf),
    /// A fixed token (tests).
    Static(SecretString),
    /// No authorization metadata.
    None,
}

impl std::fmt::Debug for NodeToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeToken::File(p) => f.debug_tuple("File").field(p).finish(),
            NodeToken::Static(_) => f.write_str("Static(<redacted>)"),
            NodeToken::None => f.write_str("None"),
        }
    }
}

/// Settings of [`GrpcBroker`].
#[derive(Debug, Clone)]
pub struct GrpcBrokerConfig {
    /// `https://host:port` (TLS) or `http://host:port` (tests only).
    pub endpoint: String,
    /// PEM CA bundle to verify the broker's certificate (for `https`).
    pub ca_file: Option<PathBuf>,
    /// Server name to verify, when it differs from the endpoint's host.
    pub tls_server_name: Option<String>,
    /// The node driver's own token, sent as `authorization: Bearer ...`.
    pub node_token: NodeToken,
    /// Deadline of one broker call (keep well under the kubelet's 2 minutes).
    pub call_timeout: Duration,
    /// How long a successful [`CredentialBroker::ready`] check is trusted before the
    /// next one connects again ([`DEFAULT_READY_CACHE`]; zero: connect every time).
    pub ready_cache: Duration,
}

/// [`CredentialBroker`] over gRPC (tonic; rustls when `https`).
#[derive(Debug)]
pub struct GrpcBroker {
    endpoint: Endpoint,
    client: pb::broker_client::BrokerClient<Channel>,
    node_token: NodeToken,
    /// Last time a readiness probe connected, to avoid a connection per probe.
    last_ready: Mutex<Option<Instant>>,
    ready_cache: Duration,
}

/// Errors building a [`GrpcBroker`].
#[derive(Debug, thiserror::Error)]
pub enum GrpcBrokerError {
    /// The endpoint URL is not valid.
    #[error("invalid broker endpoint {0:?}")]
    Endpoint(String, #[source] tonic::transport::Error),
    /// The CA file could not be read.
    #[error("read CA file {0}")]
    CaFile(PathBuf, #[source] std::io::Error),
    /// TLS settings were rejected.
    #[error("TLS configuration")]
    Tls(#[source] tonic::transport::Error),
}

/// How long a successful readiness check is trusted by default.
pub const DEFAULT_READY_CACHE: Duration = Duration::from_secs(5);

impl GrpcBroker {
    /// A client that connects lazily: building it never fails on a broker that is down.
    pub fn new(config: GrpcBrokerConfig) -> Result<Self, GrpcBrokerError> {
        let mut endpoint = Endpoint::from_shared(config.endpoint.clone())
            .map_err(|e| GrpcBrokerError::Endpoint(config.endpoint.clone(), e))?
            .connect_timeout(Duration::from_secs(5).min(config.call_timeout))
            .timeout(config.call_timeout)
            .tcp_nodelay(true);
        if config.endpoint.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &config.ca_file {
                let pem = std::fs::read(ca).map_err(|e| GrpcBrokerError::CaFile(ca.clone(), e))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let Some(name) = &config.tls_server_name {
                tls = tls.domain_name(name.clone());
            }
            endpoint = endpoint.tls_config(tls).map_err(GrpcBrokerError::Tls)?;
        }
        let client = pb::broker_client::BrokerClient::new(endpoint.connect_lazy());
        Ok(Self {
            endpoint,
            client,
            node_token: config.node_token,
            last_ready: Mutex::new(None),
            ready_cache: config.ready_cache,
        })
    }

    fn request<T>(&self, message: T) -> Result<tonic::Request<T>, BrokerError> {
        let mut request = tonic::Request::new(message);
        let token = match &self.node_token {
            NodeToken::None => return Ok(request),
            NodeToken::Static(t) => t.expose_secret().trim().to_owned(),
            NodeToken::File(path) => std::fs::read_to_string(path)
                .map_err(|e| {
                    BrokerError::Unavailable(format!("read node token {}: {e}", path.display()))
                })?
                .trim()
                .to_owned(),
        };
        let value = tonic::metadata::MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| BrokerError::Unavailable("node token is not valid metadata".into()))?;
        request
            .metadata_mut()
            .insert(leasehold_proto::AUTHORIZATION_METADATA, value);
        Ok(request)
    }
}

fn pb_lease(lease: &LeaseRef) -> pb::LeaseRef {
    pb::LeaseRef {
        namespace: lease.namespace.clone(),
        name: lease.name.clone(),
    }
}

fn pb_pod(pod: &PodInfo) -> pb::PodIdentity {
    pb::PodIdentity {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
        service_account: pod.service_account.clone(),
    }
}

fn timestamp(ts: Option<prost_types::Timestamp>) -> Result<Option<Timestamp>, BrokerError> {
    ts.map(|t| {
        let nanos = t.nanos.clamp(0, 999_999_999);
        Timestamp::new(t.seconds, nanos)
            .map_err(|e| BrokerError::InvalidResponse(format!("timestamp out of range: {e}")))
    })
    .transpose()
}

#[async_trait]
impl CredentialBroker for GrpcBroker {
    async fn issue(
        &self,
        volume: &VolumeRef,
        pod_token: &SecretString,
        held_version: u64,
    ) -> Result<IssuedCredential, BrokerError> {
        let request = self.request(pb::IssueRequest {
            pod: Some(pb_pod(&volume.pod)),
            pod_token: pod_token.expose_secret().to_owned(),
            lease: Some(pb_lease(&volume.lease)),
            volume_id: volume.volume_id.clone(),
            node_name: volume.node_name.clone(),
            held_version,
        })?;
        let response = self.client.clone().issue(request).await?.into_inner();
        let expires_at = timestamp(response.expires_at)?
            .ok_or_else(|| BrokerError::InvalidResponse("no expires_at".into()))?;
        let renew_at = timestamp(response.renew_at)?;
        let files = response
            .files
            .into_iter()
            .map(|(name, content)| (name, SecretBytes::from(content)))
            .collect();
        Ok(IssuedCredential {
            files,
            version: response.version,
            expires_at,
            renew_at,
            certificate: response.certificate.map(CertificateProfile::from),
        })
    }

    async fn acknowledge(&self, volume: &VolumeRef, version: u64) -> Result<u64, BrokerError> {
        let request = self.request(pb::AcknowledgeRequest {
            volume_id: volume.volume_id.clone(),
            lease: Some(pb_lease(&volume.lease)),
            version,
            node_name: volume.node_name.clone(),
            pod: Some(pb_pod(&volume.pod)),
        })?;
        Ok(self
            .client
            .clone()
            .acknowledge(request)
            .await?
            .into_inner()
            .latest_version)
    }

    async fn release(&self, volume: &VolumeRef) -> Result<(), BrokerError> {
        let request = self.request(pb::ReleaseRequest {
            volume_id: volume.volume_id.clone(),
            lease: Some(pb_lease(&volume.lease)),
            node_name: volume.node_name.clone(),
            pod: Some(pb_pod(&volume.pod)),
            serial: String::new(),
        })?;
        self.client.clone().release(request).await?;
        Ok(())
    }

    async fn issue_certificate(
        &self,
        volume: &VolumeRef,
        pod_token: &SecretString,
        csr_pem: &str,
    ) -> Result<IssuedCertificate, BrokerError> {
        let request = self.request(pb::IssueCertificateRequest {
            pod: Some(pb_pod(&volume.pod)),
            pod_token: pod_token.expose_secret().to_owned(),
            lease: Some(pb_lease(&volume.lease)),
            volume_id: volume.volume_id.clone(),
            node_name: volume.node_name.clone(),
            csr_pem: csr_pem.to_owned(),
        })?;
        let response = self
            .client
            .clone()
            .issue_certificate(request)
            .await?
            .into_inner();
        let missing = |what: &str| BrokerError::InvalidResponse(format!("no {what}"));
        Ok(IssuedCertificate {
            not_after: timestamp(response.not_after)?.ok_or_else(|| missing("not_after"))?,
            renew_at: timestamp(response.renew_at)?.ok_or_else(|| missing("renew_at"))?,
            profile: response
                .certificate
                .map(CertificateProfile::from)
                .ok_or_else(|| missing("certificate profile"))?,
            chain_pem: response.certificate_chain_pem,
            ca_pem: response.ca_pem,
            serial: response.serial,
        })
    }

    async fn release_certificate(
        &self,
        volume: &VolumeRef,
        serial: &str,
    ) -> Result<(), BrokerError> {
        let request = self.request(pb::ReleaseRequest {
            volume_id: volume.volume_id.clone(),
            lease: Some(pb_lease(&volume.lease)),
            node_name: volume.node_name.clone(),
            pod: Some(pb_pod(&volume.pod)),
            serial: serial.to_owned(),
        })?;
        self.client.clone().release(request).await?;
        Ok(())
    }

    async fn ready(&self) -> bool {
        if let Ok(last) = self.last_ready.lock()
            && last.is_some_and(|t| t.elapsed() < self.ready_cache)
        {
            return true;
        }
        // A fresh connection (TCP and TLS handshake) proves reachability; the
        // shared lazy channel would report ready without connecting.
        let ok = tokio::time::timeout(Duration::from_secs(3), self.endpoint.connect())
            .await
            .is_ok_and(|r| r.is_ok());
        if let Ok(mut last) = self.last_ready.lock() {
            *last = ok.then(Instant::now);
        }
        ok
    }
}
