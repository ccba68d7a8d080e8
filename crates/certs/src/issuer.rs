//! One interface over every issuer (`ca` here, `acme` in `leasehold-acme`), used by the
//! engine for Secret delivery and by the broker for CSI volumes.
//!
//! The caller always holds the private key: it generates one ([`generate_key`]), makes a
//! CSR ([`csr_for`]) and hands only the CSR to [`CertificateIssuer::issue`]. Whatever
//! must survive a crash between two calls is recorded by the caller *before* the call:
//! the serial a `ca` issuer signs under ([`new_serial`]), and through an
//! [`OrderJournal`] the ACME order an `acme` issuer resumes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use time::OffsetDateTime;

use crate::ca::{CertificateAuthority, IssueError};
use crate::crl::{RevocationEntry, RevocationList, RevocationReason};
use crate::key::PrivateKeyPem;
use crate::request::{CertificateRequest, KeyAlgorithm};

pub use crate::ca::new_serial;

/// Why an issuer did not issue or revoke. Messages never carry key material.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    /// The issuer cannot be reached or is not ready yet (CA Secret missing, ACME
    /// directory down, revocation ledger write conflict). Retry later; nothing is lost.
    #[error("issuer unavailable: {0}")]
    Unavailable(String),
    /// The CA asks to slow down; retry no sooner than `retry_after`.
    #[error("issuer rate limit: {detail}")]
    RateLimited {
        detail: String,
        retry_after: Option<Duration>,
    },
    /// The issuer refused this request (names not allowed, bad CSR, invalid profile).
    /// Repeating it will not help; the request must change.
    #[error("issuer refused the request: {0}")]
    Rejected(String),
}

impl IssuerError {
    /// Worth retrying unchanged.
    pub fn is_transient(&self) -> bool {
        !matches!(self, IssuerError::Rejected(_))
    }
}

impl From<IssueError> for IssuerError {
    fn from(e: IssueError) -> Self {
        IssuerError::Rejected(e.to_string())
    }
}

/// Where an ACME issuer records the order it created for one certificate, so that a
/// repeated [`CertificateIssuer::issue`] after a crash resumes it instead of ordering
/// again. `ca` issuers do not use it.
#[async_trait]
pub trait OrderJournal: Send + Sync {
    /// The order recorded for this certificate, if any.
    async fn recorded(&self) -> Option<String>;
    /// Record `order_url` (durably) before the order is finalized.
    async fn record(&self, order_url: &str) -> Result<(), IssuerError>;
}

/// A journal that records nothing (tests, `ca` issuers).
#[derive(Debug, Default)]
pub struct NoJournal;

#[async_trait]
impl OrderJournal for NoJournal {
    async fn recorded(&self) -> Option<String> {
        None
    }
    async fn record(&self, _order_url: &str) -> Result<(), IssuerError> {
        Ok(())
    }
}

/// An in-memory journal.
#[derive(Debug, Default)]
pub struct MemoryJournal(pub Mutex<Option<String>>);

#[async_trait]
impl OrderJournal for MemoryJournal {
    async fn recorded(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    async fn record(&self, order_url: &str) -> Result<(), IssuerError> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(order_url.to_owned());
        Ok(())
    }
}

/// One certificate to issue.
pub struct IssueOrder<'a> {
    /// Names, usages and lifetime. The issuer never takes them from the CSR.
    pub request: &'a CertificateRequest,
    /// PEM CSR for the caller's key, with exactly the requested SANs.
    pub csr_pem: &'a str,
    /// The serial a `ca` issuer signs under (recorded by the caller before the call).
    pub serial: &'a str,
    pub journal: &'a dyn OrderJournal,
}

impl std::fmt::Debug for IssueOrder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssueOrder")
            .field("request", self.request)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

/// An issued certificate, not yet verified by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedChain {
    /// The leaf certificate, PEM.
    pub leaf_pem: String,
    /// The leaf followed by any intermediates, PEM (what `tls.crt` holds).
    pub chain_pem: String,
    /// The trust anchor to verify the chain with and to hand out as `ca.crt`, PEM.
    pub ca_pem: String,
    /// The serial, lower-case hex (a `ca` issuer's is the requested one).
    pub serial: String,
    pub not_after: OffsetDateTime,
}

/// One certificate to revoke.
#[derive(Debug, Clone, Copy)]
pub struct RevokeOrder<'a> {
    /// Lower-case hex serial.
    pub serial: &'a str,
    /// The certificate, PEM, when the caller still has it (ACME needs it; a `ca` issuer
    /// revokes by serial alone).
    pub leaf_pem: Option<&'a str>,
    /// When the certificate expires: a CRL need not list it after that.
    pub not_after: Option<OffsetDateTime>,
    pub reason: RevocationReason,
}

/// An issuer of certificates (`ca` or `acme`).
#[async_trait]
pub trait CertificateIssuer: Send + Sync {
    /// `CA` or `ACME`, for logs and status.
    fn kind(&self) -> &'static str;
    /// Issue a certificate for `order.csr_pem`'s key. Idempotent for a repeated `serial`
    /// (`ca`) or `journal` (`acme`).
    async fn issue(&self, order: IssueOrder<'_>) -> Result<IssuedChain, IssuerError>;
    /// Make the certificate stop being trusted: a CRL entry (`ca`) or revokeCert
    /// (`acme`). Revoking a revoked certificate succeeds.
    async fn revoke(&self, order: RevokeOrder<'_>) -> Result<(), IssuerError>;
}

/// A fresh private key of `algorithm`, PEM (PKCS#8).
pub fn generate_key(algorithm: KeyAlgorithm) -> Result<PrivateKeyPem, IssueError> {
    let key = algorithm
        .generate()
        .map_err(|err| IssueError::KeyGeneration(algorithm, err))?;
    Ok(PrivateKeyPem::new(key.serialize_pem()))
}

/// A PEM CSR for `key` naming exactly `request`'s SANs (and its common name).
pub fn csr_for(key: &PrivateKeyPem, request: &CertificateRequest) -> Result<String, IssueError> {
    let key = KeyPair::from_pem(key.expose()).map_err(|_| IssueError::Key)?;
    let mut params = CertificateParams::default();
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, request.common_name.as_str());
    params.distinguished_name = subject;
    params.subject_alt_names = request
        .subject_alt_names()
        .iter()
        .map(|name| {
            name.to_rcgen()
                .map_err(|_| IssueError::InvalidName(name.to_string()))
        })
        .collect::<Result<_, _>>()?;
    let csr = params.serialize_request(&key).map_err(IssueError::Sign)?;
    csr.pem().map_err(IssueError::Sign)
}

/// Where a `ca` issuer keeps its revoked serials. The controller keeps them in a
/// ConfigMap (with the signed CRL); local mode in a file; tests in memory.
#[async_trait]
pub trait RevocationLedger: Send + Sync {
    /// Add `entry` durably (a serial already listed is left as it is).
    async fn revoke(&self, entry: RevocationEntry) -> Result<(), IssuerError>;
    /// Everything revoked so far.
    async fn list(&self) -> Result<RevocationList, IssuerError>;
}

/// A ledger in memory.
#[derive(Debug, Default, Clone)]
pub struct MemoryLedger(pub Arc<Mutex<RevocationList>>);

#[async_trait]
impl RevocationLedger for MemoryLedger {
    async fn revoke(&self, entry: RevocationEntry) -> Result<(), IssuerError> {
        let mut list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !list.is_revoked(&entry.serial) {
            list.entries.push(entry);
        }
        Ok(())
    }
    async fn list(&self) -> Result<RevocationList, IssuerError> {
        Ok(self.0.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// The `ca` issuer behind [`CertificateIssuer`]: signs with a [`CertificateAuthority`],
/// revokes into a [`RevocationLedger`].
pub struct CaIssuer {
    ca: Arc<CertificateAuthority>,
    ledger: Arc<dyn RevocationLedger>,
    clock: Arc<dyn Fn() -> OffsetDateTime + Send + Sync>,
}

impl std::fmt::Debug for CaIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaIssuer").finish_non_exhaustive()
    }
}

impl CaIssuer {
    pub fn new(ca: Arc<CertificateAuthority>, ledger: Arc<dyn RevocationLedger>) -> Self {
        Self {
            ca,
            ledger,
            clock: Arc::new(OffsetDateTime::now_utc),
        }
    }

    /// Use another clock (tests).
    pub fn with_clock(mut self, clock: Arc<dyn Fn() -> OffsetDateTime + Send + Sync>) -> Self {
        self.clock = clock;
        self
    }

    pub fn authority(&self) -> &Arc<CertificateAuthority> {
        &self.ca
    }

    pub fn ledger(&self) -> &Arc<dyn RevocationLedger> {
        &self.ledger
    }
}

#[async_trait]
impl CertificateIssuer for CaIssuer {
    fn kind(&self) -> &'static str {
        "CA"
    }

    async fn issue(&self, order: IssueOrder<'_>) -> Result<IssuedChain, IssuerError> {
        // Backdated a minute, for clocks slightly behind ours.
        let now = (self.clock)() - time::Duration::minutes(1);
        let mut request = order.request.clone();
        request.duration += time::Duration::minutes(1);
        let issued =
            self.ca
                .issue_from_csr_with_serial(&request, order.csr_pem, Some(order.serial), now)?;
        Ok(IssuedChain {
            leaf_pem: issued.certificate_pem.clone(),
            chain_pem: issued.certificate_pem,
            ca_pem: self.ca.certificate_pem().to_owned(),
            serial: issued.serial,
            not_after: issued.not_after,
        })
    }

    async fn revoke(&self, order: RevokeOrder<'_>) -> Result<(), IssuerError> {
        self.ledger
            .revoke(RevocationEntry {
                serial: order.serial.to_ascii_lowercase(),
                revoked_at: (self.clock)(),
                reason: order.reason,
                not_after: order.not_after,
            })
            .await
    }
}
