//! The `acme` issuer behind [`leasehold_certs::CertificateIssuer`].
//!
//! * [`AcmeIssuer::issue`] places an order for the request's DNS names, records its URL
//!   in the caller's [`OrderJournal`] before anything else happens to it, answers the
//!   HTTP-01 challenges through the shared [`Http01Solver`], finalizes with the
//!   caller's CSR and downloads the chain. A repeated call after a crash finds the
//!   recorded order and resumes it: a `valid` order yields its certificate, a pending
//!   or ready one is driven on, an `invalid` or vanished one is replaced by a new
//!   order (recorded in turn).
//! * [`AcmeIssuer::revoke`] sends revokeCert with the certificate; one already revoked
//!   counts as revoked.
//! * [`account_for`] loads the account kept in a Secret, or registers one when there
//!   is none (or it belongs to another directory).
//!
//! Errors are mapped once, in [`issuer_error`]: what the CA refuses for this request
//! is `Rejected`, rate limits keep the CA's Retry-After, everything else is
//! `Unavailable` (worth retrying). No message ever carries key material.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use leasehold_certs::{
    CertificateIssuer, IssueOrder, IssuedChain, IssuerError, OrderJournal, RevokeOrder,
};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{
    AccountRequest, AcmeAccount, AcmeError, AcmeOrder, Directory, Http01Solver, OrderStatus,
    PollPolicy, ProblemDetails, RevocationReason, StoredAccount,
};

/// ACME problem types that no retry of the same request can get past.
const REFUSALS: &[&str] = &[
    "urn:ietf:params:acme:error:rejectedIdentifier",
    "urn:ietf:params:acme:error:unsupportedIdentifier",
    "urn:ietf:params:acme:error:badCSR",
    "urn:ietf:params:acme:error:caa",
    "urn:ietf:params:acme:error:badSignatureAlgorithm",
    "urn:ietf:params:acme:error:badPublicKey",
    "urn:ietf:params:acme:error:badRevocationReason",
    "urn:ietf:params:acme:error:unauthorized",
    "urn:ietf:params:acme:error:malformed",
    "urn:ietf:params:acme:error:accountDoesNotExist",
    "urn:ietf:params:acme:error:externalAccountRequired",
    "urn:ietf:params:acme:error:userActionRequired",
    "urn:ietf:params:acme:error:invalidContact",
    "urn:ietf:params:acme:error:unsupportedContact",
];

/// The problem type for revoking a certificate that is already revoked.
const ALREADY_REVOKED: &str = "urn:ietf:params:acme:error:alreadyRevoked";

/// Problem types a failed order carries when the CA refused the request itself (as
/// opposed to a challenge that could not be validated, which a new order may pass).
const ORDER_REFUSALS: &[&str] = &[
    "urn:ietf:params:acme:error:rejectedIdentifier",
    "urn:ietf:params:acme:error:unsupportedIdentifier",
    "urn:ietf:params:acme:error:badCSR",
    "urn:ietf:params:acme:error:caa",
    "urn:ietf:params:acme:error:badSignatureAlgorithm",
    "urn:ietf:params:acme:error:badPublicKey",
];

/// The `acme` issuer: one account, one HTTP-01 solver shared by every order.
#[derive(Clone)]
pub struct AcmeIssuer {
    account: AcmeAccount,
    solver: Arc<Http01Solver>,
    poll: PollPolicy,
    extra_trust_anchors: Option<String>,
}

impl std::fmt::Debug for AcmeIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeIssuer")
            .field("account", &self.account)
            .field("solver", &self.solver.local_addr())
            .field("poll", &self.poll)
            .field("extra_trust_anchors", &self.extra_trust_anchors.is_some())
            .finish()
    }
}

impl AcmeIssuer {
    /// An issuer ordering through `account`, answering challenges with `solver` (which
    /// the CA must reach on port 80 of every name ordered) and polling per `poll`.
    pub fn new(account: AcmeAccount, solver: Arc<Http01Solver>, poll: PollPolicy) -> Self {
        Self {
            account,
            solver,
            poll,
            extra_trust_anchors: None,
        }
    }

    /// PEM certificates (typically the CA's root) appended to
    /// [`IssuedChain::ca_pem`] after the issuing certificate, so that `ca.crt` lets
    /// consumers build a path to a root as well. The issuing certificate stays first:
    /// it is the anchor the leaf is verified against.
    pub fn with_extra_trust_anchors(mut self, pem: impl Into<String>) -> Self {
        let pem = pem.into();
        self.extra_trust_anchors = (!pem.trim().is_empty()).then_some(pem);
        self
    }

    /// The account orders are placed with.
    pub fn account(&self) -> &AcmeAccount {
        &self.account
    }

    /// The order to drive: the recorded one when it can still lead to a certificate,
    /// otherwise a new one, recorded before it is used.
    async fn order_for(
        &self,
        names: &[String],
        journal: &dyn OrderJournal,
    ) -> Result<(AcmeOrder, bool), IssuerError> {
        if let Some(url) = journal.recorded().await {
            match self.account.resume_order(&url).await {
                Ok(mut order) => {
                    if order.status() != OrderStatus::Invalid {
                        tracing::info!(order = %url, "resuming the recorded ACME order");
                        return Ok((order, true));
                    }
                    tracing::info!(order = %url, "the recorded ACME order is invalid; placing a new one");
                }
                Err(e) if order_is_gone(&e) => {
                    tracing::info!(order = %url, error = %e, "the recorded ACME order is gone; placing a new one");
                }
                Err(e) => return Err(issuer_error(e)),
            }
        }
        let order = self.account.new_order(names).await.map_err(issuer_error)?;
        journal.record(order.url()).await?;
        Ok((order, false))
    }

    /// Drive `order` to a certificate for `csr_pem` and check it is one.
    async fn complete(
        &self,
        order: &mut AcmeOrder,
        request: &leasehold_certs::CertificateRequest,
        csr_pem: &str,
    ) -> Result<IssuedChain, IssuerError> {
        let chain = order
            .complete(&self.solver, csr_pem.as_bytes(), &self.poll)
            .await
            .map_err(issuer_error)?;
        let issued = issued_chain(&chain, self.extra_trust_anchors.as_deref())?;
        matches_order(&issued, request, csr_pem)?;
        Ok(issued)
    }
}

#[async_trait]
impl CertificateIssuer for AcmeIssuer {
    fn kind(&self) -> &'static str {
        "ACME"
    }

    async fn issue(&self, order: IssueOrder<'_>) -> Result<IssuedChain, IssuerError> {
        let names = dns_names_to_order(order.request)?;
        let (mut acme_order, resumed) = self.order_for(&names, order.journal).await?;
        match self
            .complete(&mut acme_order, order.request, order.csr_pem)
            .await
        {
            Ok(issued) => Ok(issued),
            // A resumed order may belong to an earlier CSR (another key) or have
            // expired in between: one new order, recorded, settles it.
            Err(IssuerError::Rejected(reason)) if resumed => {
                tracing::info!(
                    order = acme_order.url(),
                    reason = %reason,
                    "the recorded ACME order cannot yield this certificate; placing a new one"
                );
                let mut fresh = self.account.new_order(&names).await.map_err(issuer_error)?;
                order.journal.record(fresh.url()).await?;
                self.complete(&mut fresh, order.request, order.csr_pem)
                    .await
            }
            Err(e) => Err(e),
        }
    }

    async fn revoke(&self, order: RevokeOrder<'_>) -> Result<(), IssuerError> {
        let leaf_pem = order.leaf_pem.ok_or_else(|| {
            IssuerError::Rejected("the certificate is needed to revoke it at an ACME CA".to_owned())
        })?;
        match self
            .account
            .revoke(leaf_pem.as_bytes(), revocation_reason(order.reason))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.problem().and_then(|p| p.kind.as_deref()) == Some(ALREADY_REVOKED) => {
                tracing::debug!(
                    serial = order.serial,
                    "ACME certificate was already revoked"
                );
                Ok(())
            }
            Err(e) => Err(issuer_error(e)),
        }
    }
}

/// Load the account kept in `stored`, or register a new one when there is none or it
/// was made at another directory than `directory`.
///
/// Returns the account and, when one was registered, its [`StoredAccount`]. The
/// caller must persist that (e.g. into the account Secret, with server-side apply)
/// **before** using the account: an account that is used but not kept would be
/// registered again on the next start, orphaning its orders and certificates (they
/// could no longer be revoked).
pub async fn account_for(
    directory: &Directory,
    request: &AccountRequest,
    stored: Option<StoredAccount>,
) -> Result<(AcmeAccount, Option<StoredAccount>), AcmeError> {
    if let Some(stored) = stored {
        match stored.directory_url() {
            Some(url) if url != directory.url => {
                tracing::info!(
                    stored = %url,
                    wanted = %directory.url,
                    "the stored ACME account belongs to another directory; registering a new one"
                );
            }
            _ => return Ok((AcmeAccount::load(&directory.trust, stored).await?, None)),
        }
    }
    let (account, stored) = AcmeAccount::create(directory, request).await?;
    Ok((account, Some(stored)))
}

/// The names HTTP-01 can validate: DNS names only, the commonName among them.
fn dns_names_to_order(
    request: &leasehold_certs::CertificateRequest,
) -> Result<Vec<String>, IssuerError> {
    if !request.ip_addresses.is_empty() || !request.uris.is_empty() {
        return Err(IssuerError::Rejected(
            "an ACME issuer validates names over HTTP-01, which covers DNS names only; \
             remove ipAddresses and uris"
                .to_owned(),
        ));
    }
    if request.dns_names.is_empty() {
        return Err(IssuerError::Rejected(
            "an ACME certificate needs at least one DNS name".to_owned(),
        ));
    }
    if !request
        .dns_names
        .iter()
        .any(|name| name.eq_ignore_ascii_case(&request.common_name))
    {
        return Err(IssuerError::Rejected(format!(
            "the commonName {:?} must be one of the dnsNames for an ACME issuer",
            request.common_name
        )));
    }
    let mut names: Vec<String> = request
        .dns_names
        .iter()
        .map(|name| name.to_ascii_lowercase())
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// The chain split up: leaf first, the last certificate the issuing one.
fn issued_chain(chain_pem: &str, extra_anchors: Option<&str>) -> Result<IssuedChain, IssuerError> {
    let unusable =
        |why: &str| IssuerError::Rejected(format!("the ACME CA's certificate chain {why}"));
    let blocks: Vec<x509_parser::pem::Pem> =
        x509_parser::pem::Pem::iter_from_buffer(chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|_| unusable("is not PEM"))?;
    let certificates: Vec<&x509_parser::pem::Pem> = blocks
        .iter()
        .filter(|block| block.label == "CERTIFICATE")
        .collect();
    let (leaf, rest) = certificates
        .split_first()
        .ok_or_else(|| unusable("holds no certificate"))?;
    let (_, leaf_cert) = X509Certificate::from_der(&leaf.contents)
        .map_err(|_| unusable("has an unreadable leaf"))?;
    let serial = leaf_cert.serial.to_str_radix(16);
    let not_after = OffsetDateTime::from_unix_timestamp(leaf_cert.validity().not_after.timestamp())
        .map_err(|_| unusable("has a leaf with an impossible expiry"))?;
    let mut ca_pem = match rest.last() {
        Some(issuing) => pem_of(&issuing.contents),
        None => String::new(),
    };
    if let Some(extra) = extra_anchors {
        ca_pem.push_str(extra.trim_end());
        ca_pem.push('\n');
    }
    if ca_pem.is_empty() {
        return Err(unusable(
            "holds only the leaf; configure the CA's certificate as an extra trust anchor",
        ));
    }
    Ok(IssuedChain {
        leaf_pem: pem_of(&leaf.contents),
        chain_pem: certificates.iter().map(|c| pem_of(&c.contents)).collect(),
        ca_pem,
        serial,
        not_after,
    })
}

/// The certificate carries the CSR's key and exactly the requested DNS names; a
/// resumed order placed for an earlier CSR would not.
fn matches_order(
    issued: &IssuedChain,
    request: &leasehold_certs::CertificateRequest,
    csr_pem: &str,
) -> Result<(), IssuerError> {
    let leaf = leasehold_certs::first_certificate_der(&issued.leaf_pem)
        .ok_or_else(|| IssuerError::Rejected("the ACME certificate is not PEM".to_owned()))?;
    leasehold_certs::verify::check_csr_key(&leaf, csr_pem).map_err(|e| {
        IssuerError::Rejected(format!("the ACME certificate does not fit the CSR: {e}"))
    })?;
    let (_, cert) = X509Certificate::from_der(&leaf)
        .map_err(|_| IssuerError::Rejected("the ACME certificate is unreadable".to_owned()))?;
    let mut found: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::DNSName(dns) => {
                        Some(dns.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.dedup();
    let wanted = dns_names_to_order(request)?;
    if found != wanted {
        return Err(IssuerError::Rejected(format!(
            "the ACME certificate names {found:?}, not the requested {wanted:?}"
        )));
    }
    Ok(())
}

/// One certificate as PEM, in 64-character lines.
fn pem_of(der: &[u8]) -> String {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in encoded.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

fn revocation_reason(reason: leasehold_certs::RevocationReason) -> RevocationReason {
    use leasehold_certs::RevocationReason as Reason;
    match reason {
        Reason::Unspecified => RevocationReason::Unspecified,
        Reason::KeyCompromise => RevocationReason::KeyCompromise,
        Reason::CaCompromise => RevocationReason::CaCompromise,
        Reason::AffiliationChanged => RevocationReason::AffiliationChanged,
        Reason::Superseded => RevocationReason::Superseded,
        Reason::CessationOfOperation => RevocationReason::CessationOfOperation,
    }
}

/// The recorded order no longer exists at the CA (expired and purged, or the CA was
/// reset): a new order is the only way on.
fn order_is_gone(e: &AcmeError) -> bool {
    match e {
        AcmeError::Status { status, .. } => *status == 404,
        other => other.problem().is_some_and(|p| p.status == Some(404)),
    }
}

fn retry_after(at: Option<SystemTime>) -> Option<Duration> {
    at.map(|at| at.duration_since(SystemTime::now()).unwrap_or_default())
}

fn is_refusal(problem: &ProblemDetails, refusals: &[&str]) -> bool {
    problem
        .kind
        .as_deref()
        .is_some_and(|kind| refusals.contains(&kind))
        && problem.status.is_none_or(|status| status < 500)
}

/// How an ACME failure reads behind the issuer interface.
pub fn issuer_error(e: AcmeError) -> IssuerError {
    match e {
        AcmeError::RateLimited { problem } => IssuerError::RateLimited {
            detail: problem.to_string(),
            retry_after: retry_after(problem.retry_after),
        },
        AcmeError::Problem { problem } if is_refusal(&problem, REFUSALS) => {
            IssuerError::Rejected(format!("the ACME CA refused: {problem}"))
        }
        AcmeError::Problem { problem } => {
            IssuerError::Unavailable(format!("the ACME CA answered: {problem}"))
        }
        // Refused names or CSR will be refused again; a challenge the CA could not
        // validate (DNS, routing to the solver) may pass with the next order, which
        // the next attempt places since this one is invalid.
        AcmeError::OrderInvalid {
            url,
            problem: Some(problem),
        } if is_refusal(&problem, ORDER_REFUSALS)
            || problem
                .subproblems
                .iter()
                .any(|sub| ORDER_REFUSALS.iter().any(|kind| sub.contains(kind))) =>
        {
            IssuerError::Rejected(format!("ACME order {url} failed: {problem}"))
        }
        e @ AcmeError::OrderInvalid { .. } => IssuerError::Unavailable(e.to_string()),
        e @ AcmeError::Timeout { .. } => IssuerError::Unavailable(format!(
            "{e}; the order is kept and resumed on the next attempt"
        )),
        e @ (AcmeError::NoHttp01Challenge { .. } | AcmeError::InvalidInput(_)) => {
            IssuerError::Rejected(e.to_string())
        }
        e @ (AcmeError::Solver(_) | AcmeError::Transport(_) | AcmeError::Status { .. }) => {
            IssuerError::Unavailable(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(kind: &str, status: u16) -> ProblemDetails {
        ProblemDetails {
            kind: Some(kind.to_owned()),
            detail: Some("the CA's words".to_owned()),
            status: Some(status),
            subproblems: Vec::new(),
            retry_after: None,
        }
    }

    #[test]
    fn problems_map_to_issuer_errors() {
        let refused = issuer_error(AcmeError::Problem {
            problem: problem("urn:ietf:params:acme:error:rejectedIdentifier", 400),
        });
        assert!(
            matches!(&refused, IssuerError::Rejected(m) if m.contains("the CA's words")),
            "{refused:?}"
        );
        for transient in [
            AcmeError::Problem {
                problem: problem("urn:ietf:params:acme:error:serverInternal", 500),
            },
            AcmeError::Problem {
                problem: problem("urn:ietf:params:acme:error:badNonce", 400),
            },
            AcmeError::Transport("connection refused".to_owned()),
            AcmeError::Timeout { next_poll: None },
            AcmeError::OrderInvalid {
                url: "https://ca/order/1".to_owned(),
                problem: Some(problem("urn:ietf:params:acme:error:connection", 400)),
            },
        ] {
            let mapped = issuer_error(transient);
            assert!(matches!(mapped, IssuerError::Unavailable(_)), "{mapped:?}");
        }
        let mut caa = problem("urn:ietf:params:acme:error:unauthorized", 403);
        caa.subproblems = vec!["urn:ietf:params:acme:error:caa: forbidden by CAA".to_owned()];
        let mapped = issuer_error(AcmeError::OrderInvalid {
            url: "https://ca/order/2".to_owned(),
            problem: Some(caa),
        });
        assert!(matches!(mapped, IssuerError::Rejected(_)), "{mapped:?}");

        let mut limited = problem(crate::RATE_LIMITED, 429);
        limited.retry_after = Some(SystemTime::now() - Duration::from_secs(5));
        match issuer_error(AcmeError::RateLimited { problem: limited }) {
            IssuerError::RateLimited { retry_after, .. } => {
                assert_eq!(retry_after, Some(Duration::ZERO), "a past Retry-After: now");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_dns_names_with_the_common_name_among_them() {
        let mut request = leasehold_certs::CertificateRequest::server(
            "B.example",
            &["b.example", "a.example", "A.example"],
            time::Duration::days(1),
        );
        assert_eq!(
            dns_names_to_order(&request).expect("names"),
            vec!["a.example".to_owned(), "b.example".to_owned()]
        );
        request.uris = vec!["spiffe://x/y".to_owned()];
        assert!(matches!(
            dns_names_to_order(&request),
            Err(IssuerError::Rejected(_))
        ));
        request.uris.clear();
        request.common_name = "c.example".to_owned();
        assert!(matches!(
            dns_names_to_order(&request),
            Err(IssuerError::Rejected(_))
        ));
        request.dns_names.clear();
        assert!(matches!(
            dns_names_to_order(&request),
            Err(IssuerError::Rejected(_))
        ));
    }

    #[test]
    fn a_chain_of_one_needs_an_extra_anchor() {
        let key = rcgen::KeyPair::generate().expect("key");
        let leaf = rcgen::CertificateParams::new(vec!["a.example".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert")
            .pem();
        assert!(matches!(
            issued_chain(&leaf, None),
            Err(IssuerError::Rejected(_))
        ));
        let issued = issued_chain(&leaf, Some(&leaf)).expect("with an anchor");
        assert_eq!(issued.ca_pem.trim_end(), leaf.trim_end());
        assert_eq!(issued.leaf_pem.trim_end(), leaf.trim_end());
        assert!(!issued.serial.is_empty());
        assert_eq!(issued.serial, issued.serial.to_ascii_lowercase());
    }
}
