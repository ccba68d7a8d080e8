//! Certificate leases through the same engine as database leases.
//!
//! A certificate version is a [`Backend`] credential whose name is its serial and whose
//! secret is a [`CertificateBundle`]: the private key, made here before anything refers
//! to it and stored like a password, then the issued chain added next to it. So the
//! engine's order holds unchanged: key stored → `Issuing` recorded → the issuer signs
//! under the recorded serial (a repeat after a crash signs the same serial) → chain
//! stored → `Issued` → verified (chain, names, usages, key, a real TLS handshake) →
//! promoted → delivered → the superseded serial revoked at the issuer and its key wiped
//! with the version's secret.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use leasehold_api::validate::FieldError;
use leasehold_api::{CertificateSpec, CertificateUsage, KeyAlgorithm as ApiKeyAlgorithm};
use leasehold_backends::IssueJournal;
use leasehold_backends::{
    Backend, BackendError, CredentialId, CredentialMaterial, IssueRequest, RevokeOutcome,
    RevokeRequest, VerifyRequest,
};
use leasehold_certs::issuer::OrderJournal;
use leasehold_certs::verify::UsageCheck;
use leasehold_certs::{
    CertificateIssuer, CertificateRequest, IssueOrder, IssuerError, KeyAlgorithm, PrivateKeyPem,
    RevocationReason, RevokeOrder, Usage, csr_for, generate_key,
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Keys of the delivered material, as in a `kubernetes.io/tls` Secret.
pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
pub const CA_CRT: &str = "ca.crt";

/// What a certificate version's secret holds. `Debug` shows no key.
#[derive(Serialize, Deserialize, Clone, Default)]
#[serde(rename_all = "camelCase")]
pub struct CertificateBundle {
    /// PKCS#8 private key, PEM.
    pub key: String,
    /// Leaf then intermediates, PEM (absent until issued).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<String>,
    /// The trust anchor, PEM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub not_after: Option<OffsetDateTime>,
}

impl std::fmt::Debug for CertificateBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateBundle")
            .field("key", &"[redacted]")
            .field("issued", &self.chain.is_some())
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl CertificateBundle {
    pub fn parse(secret: &SecretString) -> Result<Self, BackendError> {
        serde_json::from_str(secret.expose_secret()).map_err(|_| {
            BackendError::Other("the version's stored certificate bundle is unreadable".into())
        })
    }

    pub fn to_secret(&self) -> SecretString {
        SecretString::from(serde_json::to_string(self).unwrap_or_default())
    }

    /// The leaf certificate (first of the chain), PEM.
    pub fn leaf_pem(&self) -> Option<String> {
        let chain = self.chain.as_deref()?;
        let end = "-----END CERTIFICATE-----";
        let at = chain.find(end)? + end.len();
        Some(format!("{}\n", &chain[..at]))
    }
}

/// The leaf certificate a lease asks for, from its spec (`ttl`: the policy's, the
/// default lifetime).
pub fn certificate_request(
    spec: &CertificateSpec,
    ttl: std::time::Duration,
) -> Result<CertificateRequest, FieldError> {
    let ip_addresses = spec
        .ip_addresses
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            ip.parse::<IpAddr>().map_err(|_| FieldError {
                field: format!("spec.certificate.ipAddresses[{i}]"),
                message: format!("{ip:?} is not an IP address"),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let duration: std::time::Duration = spec.duration.map(Into::into).unwrap_or(ttl);
    let duration = time::Duration::try_from(duration).map_err(|_| FieldError {
        field: "spec.certificate.duration".into(),
        message: "too long".into(),
    })?;
    let usages = if spec.usages.is_empty() {
        vec![Usage::ServerAuth, Usage::DigitalSignature]
    } else {
        spec.usages
            .iter()
            .map(|u| match u {
                CertificateUsage::ServerAuth => Usage::ServerAuth,
                CertificateUsage::ClientAuth => Usage::ClientAuth,
                CertificateUsage::DigitalSignature => Usage::DigitalSignature,
                CertificateUsage::KeyEncipherment => Usage::KeyEncipherment,
            })
            .collect()
    };
    let request = CertificateRequest {
        common_name: spec.common_name.clone(),
        dns_names: spec.dns_names.clone(),
        ip_addresses,
        uris: spec.uris.clone(),
        duration,
        usages,
        key_algorithm: key_algorithm(spec.key_algorithm),
    };
    if request.subject_alt_names().is_empty() {
        return Err(FieldError {
            field: "spec.certificate.dnsNames".into(),
            message: "name at least one dnsName, ipAddress or uri".into(),
        });
    }
    Ok(request)
}

pub fn key_algorithm(alg: ApiKeyAlgorithm) -> KeyAlgorithm {
    match alg {
        ApiKeyAlgorithm::EcdsaP256 => KeyAlgorithm::EcdsaP256,
        ApiKeyAlgorithm::EcdsaP384 => KeyAlgorithm::EcdsaP384,
        ApiKeyAlgorithm::Ed25519 => KeyAlgorithm::Ed25519,
        ApiKeyAlgorithm::Rsa2048 => KeyAlgorithm::Rsa2048,
        ApiKeyAlgorithm::Rsa3072 => KeyAlgorithm::Rsa3072,
    }
}

/// A lease's certificates from one issuer, as a [`Backend`].
pub struct CertificateBackend {
    issuer: Arc<dyn CertificateIssuer>,
    request: CertificateRequest,
    /// `certificate://<Issuer|ClusterIssuer>/<namespace>/<name>`.
    target_key: String,
    clock: Arc<dyn Fn() -> OffsetDateTime + Send + Sync>,
}

impl std::fmt::Debug for CertificateBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateBackend")
            .field("issuer", &self.target_key)
            .finish_non_exhaustive()
    }
}

impl CertificateBackend {
    pub fn new(
        issuer: Arc<dyn CertificateIssuer>,
        request: CertificateRequest,
        target_key: String,
    ) -> Self {
        Self {
            issuer,
            request,
            target_key,
            clock: Arc::new(OffsetDateTime::now_utc),
        }
    }

    /// Use another clock for verification (tests).
    pub fn with_clock(mut self, clock: Arc<dyn Fn() -> OffsetDateTime + Send + Sync>) -> Self {
        self.clock = clock;
        self
    }

    pub fn request(&self) -> &CertificateRequest {
        &self.request
    }
}

/// An ACME order's URL kept in the engine's issue journal.
struct OrderNotes<'a>(&'a dyn IssueJournal);

#[async_trait]
impl OrderJournal for OrderNotes<'_> {
    async fn recorded(&self) -> Option<String> {
        self.0.recorded().await
    }
    async fn record(&self, order_url: &str) -> Result<(), IssuerError> {
        self.0
            .record(order_url)
            .await
            .map_err(|e| IssuerError::Unavailable(e.to_string()))
    }
}

/// An issuer error as the engine sees it: a CA that is down or asks to slow down delays
/// the rotation; a refusal is for the user to fix.
pub fn issuer_error(e: IssuerError) -> BackendError {
    match e {
        IssuerError::Unavailable(m) => BackendError::Unreachable(m),
        e @ IssuerError::RateLimited { .. } => BackendError::Unreachable(e.to_string()),
        IssuerError::Rejected(m) => BackendError::Invalid(m),
    }
}

#[async_trait]
impl Backend for CertificateBackend {
    fn kind(&self) -> &'static str {
        "certificate"
    }

    fn target_key(&self) -> String {
        self.target_key.clone()
    }

    fn new_secret(&self) -> Option<Result<SecretString, BackendError>> {
        Some(
            generate_key(self.request.key_algorithm)
                .map(|key| {
                    CertificateBundle {
                        key: key.expose().to_owned(),
                        ..CertificateBundle::default()
                    }
                    .to_secret()
                })
                .map_err(|e| BackendError::Other(e.to_string())),
        )
    }

    async fn issue(&self, req: &IssueRequest) -> Result<(), BackendError> {
        self.issue_returning_secret(req, &leasehold_backends::NoIssueJournal)
            .await
            .map(|_| ())
    }

    async fn issue_returning_secret(
        &self,
        req: &IssueRequest,
        journal: &dyn IssueJournal,
    ) -> Result<Option<SecretString>, BackendError> {
        let mut bundle = CertificateBundle::parse(&req.password)?;
        let key = PrivateKeyPem::new(bundle.key.clone());
        let csr = csr_for(&key, &self.request).map_err(|e| BackendError::Invalid(e.to_string()))?;
        let issued = self
            .issuer
            .issue(IssueOrder {
                request: &self.request,
                csr_pem: &csr,
                serial: &req.id.0,
                journal: &OrderNotes(journal),
            })
            .await
            .map_err(issuer_error)?;
        bundle.chain = Some(issued.chain_pem);
        bundle.ca = Some(issued.ca_pem);
        bundle.not_after = Some(issued.not_after);
        Ok(Some(bundle.to_secret()))
    }

    async fn verify(&self, req: &VerifyRequest) -> Result<(), BackendError> {
        let bundle = CertificateBundle::parse(&req.password)?;
        let failed = |m: &str| BackendError::VerificationFailed(m.to_owned());
        let leaf = bundle
            .chain
            .as_deref()
            .and_then(leasehold_certs::first_certificate_der)
            .ok_or_else(|| failed("no certificate was stored for this version"))?;
        let anchor = bundle
            .ca
            .as_deref()
            .and_then(leasehold_certs::first_certificate_der)
            .ok_or_else(|| failed("no CA certificate was stored for this version"))?;
        let key = PrivateKeyPem::new(bundle.key.clone());
        let now = (self.clock)();
        // A CA leasehold runs puts exactly the requested usages on a certificate; a
        // public (ACME) CA decides them and may add some.
        let usages = if self.issuer.kind() == "CA" {
            UsageCheck::Exact
        } else {
            UsageCheck::AtLeast
        };
        let check = leasehold_certs::verify::verify_leaf_with(
            &anchor,
            &leaf,
            &self.request,
            Some(&key),
            None,
            now,
            usages,
        );
        match tokio::time::timeout(req.timeout, check).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(BackendError::VerificationFailed(e.to_string())),
            Err(_) => Err(BackendError::VerificationFailed(format!(
                "the checks did not finish within {:?}",
                req.timeout
            ))),
        }
    }

    async fn revoke(&self, req: &RevokeRequest) -> Result<RevokeOutcome, BackendError> {
        self.revoke_with_secret(req, None).await
    }

    async fn revoke_with_secret(
        &self,
        req: &RevokeRequest,
        secret: Option<&SecretString>,
    ) -> Result<RevokeOutcome, BackendError> {
        let bundle = secret.and_then(|s| CertificateBundle::parse(s).ok());
        let leaf = bundle.as_ref().and_then(CertificateBundle::leaf_pem);
        self.issuer
            .revoke(RevokeOrder {
                serial: &req.id.0,
                leaf_pem: leaf.as_deref(),
                not_after: bundle.as_ref().and_then(|b| b.not_after),
                reason: RevocationReason::Superseded,
            })
            .await
            .map_err(issuer_error)?;
        Ok(RevokeOutcome::Revoked)
    }

    async fn can_login(&self, _id: &CredentialId) -> Result<bool, BackendError> {
        Ok(false)
    }

    async fn list_users(&self, _prefix: &str) -> Result<Vec<CredentialId>, BackendError> {
        Ok(Vec::new())
    }

    async fn ping(&self) -> Result<(), BackendError> {
        Ok(())
    }

    fn material(&self, secret: &SecretString) -> Option<CredentialMaterial> {
        let mut map = BTreeMap::new();
        if let Ok(bundle) = CertificateBundle::parse(secret) {
            map.insert(TLS_KEY.to_owned(), SecretString::from(bundle.key.clone()));
            if let Some(chain) = bundle.chain {
                map.insert(TLS_CRT.to_owned(), SecretString::from(chain));
            }
            if let Some(ca) = bundle.ca {
                map.insert(CA_CRT.to_owned(), SecretString::from(ca));
            }
        }
        Some(CredentialMaterial(map))
    }
}
