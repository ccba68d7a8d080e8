//! ACME (RFC 8555) client for leasehold certificates, on top of `instant-acme`.
//!
//! * [`AcmeAccount::create`] / [`AcmeAccount::load`]: an account whose key travels as
//!   a serializable [`StoredAccount`] that the caller persists (a Secret, say).
//! * [`Http01Solver`]: answers HTTP-01 challenges from memory.
//! * [`AcmeAccount::new_order`] → [`AcmeOrder::url`] (record it!) →
//!   [`AcmeOrder::complete`] with a CSR whose key lives wherever the caller keeps it.
//!   After a crash, [`AcmeAccount::resume_order`] picks the recorded order up again
//!   instead of creating a second one.
//! * [`AcmeAccount::revoke`] with a [`RevocationReason`].
//! * [`AcmeIssuer`]: all of the above behind `leasehold_certs::CertificateIssuer`, and
//!   [`account_for`] to get or create the account kept in a Secret.
//!
//! Every call retries requests the server refused for a stale nonce (`badNonce`
//! means the request was not processed, so sending it again is safe).

#![forbid(unsafe_code)]

mod error;
mod http;
mod issuer;
mod solver;

use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeStatus, ChallengeType,
    ExternalAccountKey, Identifier, NewAccount, NewOrder, RetryPolicy, RevocationRequest,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};

pub use error::{AcmeError, BAD_NONCE, ProblemDetails, RATE_LIMITED};
pub use http::TrustRoots;
pub use instant_acme::{OrderStatus, RevocationReason};
pub use issuer::{AcmeIssuer, account_for, issuer_error};
pub use solver::Http01Solver;

use crate::http::{AcmeHttp, acme_err, scoped};

/// How often a request refused with `badNonce` is sent again (on top of the three
/// attempts instant-acme makes itself).
const BAD_NONCE_RETRIES: u32 = 10;

/// Where the ACME server is and whom to trust for its TLS certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directory {
    /// The directory URL, e.g. `https://acme-v02.api.letsencrypt.org/directory`.
    pub url: String,
    /// Roots for the directory's TLS certificate.
    pub trust: TrustRoots,
}

/// External Account Binding credentials issued by the CA (RFC 8555 §7.3.4).
#[derive(Clone)]
pub struct ExternalAccountBinding {
    /// The key identifier the CA gave out.
    pub key_id: String,
    /// The raw (already base64url-decoded) HMAC key.
    pub hmac_key: Vec<u8>,
}

impl std::fmt::Debug for ExternalAccountBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalAccountBinding")
            .field("key_id", &self.key_id)
            .field("hmac_key", &"<redacted>")
            .finish()
    }
}

/// What a new account is registered with.
#[derive(Debug, Clone, Default)]
pub struct AccountRequest {
    /// Contact address; sent as `mailto:<email>`.
    pub contact_email: Option<String>,
    /// Required by some CAs (ZeroSSL, Google, most private ACME servers).
    pub external_account_binding: Option<ExternalAccountBinding>,
}

/// The account's credentials (its URL, directory and private key). Serialize it to
/// persist; the JSON contains the private key, so store it as a secret. `Debug`
/// never shows it.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct StoredAccount(AccountCredentials);

impl StoredAccount {
    /// The directory the account was registered at, when the credentials say.
    pub fn directory_url(&self) -> Option<String> {
        let json = serde_json::to_value(&self.0).ok()?;
        json.get("directory")?.as_str().map(str::to_owned)
    }
}

impl std::fmt::Debug for StoredAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoredAccount(<redacted>)")
    }
}

/// How long and how often an order is polled. The server's `Retry-After` wins over
/// the computed delay when it sends one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PollPolicy {
    /// Delay before the first poll.
    pub initial_delay: Duration,
    /// Factor the delay grows by after each poll.
    pub backoff: f32,
    /// Give up (with [`AcmeError::Timeout`]) after this long.
    pub timeout: Duration,
}

impl Default for PollPolicy {
    fn default() -> Self {
        Self {
            initial_delay: Duration::from_millis(250),
            backoff: 1.5,
            timeout: Duration::from_secs(60),
        }
    }
}

impl PollPolicy {
    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::new()
            .initial_delay(self.initial_delay)
            .backoff(self.backoff)
            .timeout(self.timeout)
    }
}

/// Run `op` again while the server refuses it for a stale nonce.
async fn retry_bad_nonce<T, F, Fut>(mut op: F) -> Result<T, AcmeError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, AcmeError>>,
{
    let mut attempt = 0;
    loop {
        match scoped(op()).await {
            Err(e) if e.is_bad_nonce() && attempt < BAD_NONCE_RETRIES => {
                attempt += 1;
                tracing::debug!(attempt, "ACME server rejected the nonce; retrying");
            }
            other => return other,
        }
    }
}

/// An ACME account, ready to order and revoke certificates. Cheap to clone.
#[derive(Clone)]
pub struct AcmeAccount {
    account: Account,
}

impl std::fmt::Debug for AcmeAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeAccount")
            .field("id", &self.account.id())
            .finish_non_exhaustive()
    }
}

impl AcmeAccount {
    /// Register a new account (agreeing to the CA's terms of service). Persist the
    /// returned [`StoredAccount`] and [`load`](Self::load) it next time.
    pub async fn create(
        directory: &Directory,
        request: &AccountRequest,
    ) -> Result<(Self, StoredAccount), AcmeError> {
        let http = AcmeHttp::new(&directory.trust)?;
        let contact = request
            .contact_email
            .as_ref()
            .map(|email| format!("mailto:{email}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let eab = request
            .external_account_binding
            .as_ref()
            .map(|b| ExternalAccountKey::new(b.key_id.clone(), &b.hmac_key));
        let (account, credentials) = retry_bad_nonce(|| async {
            Account::builder_with_http(Box::new(http.clone()))
                .create(
                    &NewAccount {
                        contact: &contacts,
                        terms_of_service_agreed: true,
                        only_return_existing: false,
                    },
                    directory.url.clone(),
                    eab.as_ref(),
                )
                .await
                .map_err(acme_err)
        })
        .await?;
        tracing::info!(account = account.id(), "ACME account registered");
        Ok((Self { account }, StoredAccount(credentials)))
    }

    /// Use an account created earlier. The directory URL comes from `stored`;
    /// `trust` says whom to trust for its TLS certificate.
    pub async fn load(trust: &TrustRoots, stored: StoredAccount) -> Result<Self, AcmeError> {
        let http = AcmeHttp::new(trust)?;
        let account = scoped(async {
            Account::builder_with_http(Box::new(http))
                .from_credentials(stored.0)
                .await
                .map_err(acme_err)
        })
        .await?;
        Ok(Self { account })
    }

    /// The account URL.
    pub fn id(&self) -> &str {
        self.account.id()
    }

    /// Start an order for these DNS names. Record [`AcmeOrder::url`] before doing
    /// anything else with it, so a restart can [`resume_order`](Self::resume_order).
    pub async fn new_order(&self, dns_names: &[String]) -> Result<AcmeOrder, AcmeError> {
        if dns_names.is_empty() {
            return Err(AcmeError::InvalidInput(
                "an order needs at least one DNS name".to_owned(),
            ));
        }
        let identifiers: Vec<Identifier> = dns_names.iter().cloned().map(Identifier::Dns).collect();
        let order = retry_bad_nonce(|| async {
            self.account
                .new_order(&NewOrder::new(&identifiers))
                .await
                .map_err(acme_err)
        })
        .await?;
        tracing::info!(order = order.url(), "ACME order created");
        Ok(AcmeOrder { order })
    }

    /// Pick up an order created earlier (by URL) instead of creating a second one.
    pub async fn resume_order(&self, url: &str) -> Result<AcmeOrder, AcmeError> {
        let order = retry_bad_nonce(|| async {
            self.account.order(url.to_owned()).await.map_err(acme_err)
        })
        .await?;
        Ok(AcmeOrder { order })
    }

    /// Revoke a certificate issued to this account. `certificate` is DER or PEM (the
    /// first certificate of a PEM chain, i.e. the leaf).
    pub async fn revoke(
        &self,
        certificate: &[u8],
        reason: RevocationReason,
    ) -> Result<(), AcmeError> {
        let der = certificate_der(certificate)?;
        retry_bad_nonce(|| async {
            self.account
                .revoke(&RevocationRequest {
                    certificate: &der,
                    reason: Some(reason.clone()),
                })
                .await
                .map_err(acme_err)
        })
        .await?;
        tracing::info!("ACME certificate revoked");
        Ok(())
    }
}

/// An order in progress. Its [`url`](Self::url) identifies it across restarts.
pub struct AcmeOrder {
    order: instant_acme::Order,
}

impl std::fmt::Debug for AcmeOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeOrder")
            .field("url", &self.order.url())
            .finish_non_exhaustive()
    }
}

impl AcmeOrder {
    /// The order URL: record it to resume after a crash.
    pub fn url(&self) -> &str {
        self.order.url()
    }

    /// The last known status (as of creation, resumption or the last poll).
    pub fn status(&mut self) -> OrderStatus {
        self.order.state().status
    }

    /// Drive the order to a certificate from wherever it stands: answer pending
    /// HTTP-01 challenges through `solver`, finalize with `csr` (PEM or DER) and
    /// download the chain. Returns the PEM chain, leaf first. Safe to call again on a
    /// resumed order: an order already finalized is not finalized twice.
    pub async fn complete(
        &mut self,
        solver: &Http01Solver,
        csr: &[u8],
        poll: &PollPolicy,
    ) -> Result<String, AcmeError> {
        let csr = csr_der(csr)?;
        let mut attempt = 0;
        loop {
            match scoped(self.drive(solver, &csr, poll)).await {
                Err(e) if e.is_bad_nonce() && attempt < BAD_NONCE_RETRIES => {
                    attempt += 1;
                    tracing::debug!(
                        attempt,
                        "ACME server rejected the nonce; resuming the order"
                    );
                }
                other => return other,
            }
        }
    }

    async fn drive(
        &mut self,
        solver: &Http01Solver,
        csr: &[u8],
        poll: &PollPolicy,
    ) -> Result<String, AcmeError> {
        let mut status = self.order.refresh().await.map_err(acme_err)?.status;
        if status == OrderStatus::Pending {
            status = self.authorize(solver, poll).await?;
        }
        match status {
            OrderStatus::Ready => {
                self.order.finalize_csr(csr).await.map_err(acme_err)?;
            }
            OrderStatus::Processing | OrderStatus::Valid => {}
            OrderStatus::Pending | OrderStatus::Invalid => return Err(self.invalid()),
        }
        if self.order.state().status == OrderStatus::Valid
            && let Some(chain) = self.order.certificate().await.map_err(acme_err)?
        {
            return Ok(chain);
        }
        self.order
            .poll_certificate(&poll.retry_policy())
            .await
            .map_err(acme_err)
    }

    /// Serve every pending HTTP-01 challenge, tell the server, and wait until the
    /// order leaves `pending`. Tokens are withdrawn from the solver afterwards.
    async fn authorize(
        &mut self,
        solver: &Http01Solver,
        poll: &PollPolicy,
    ) -> Result<OrderStatus, AcmeError> {
        // Withdrawn on drop, so a cancelled call leaves no token behind either.
        let mut served = ServedTokens {
            solver,
            tokens: Vec::new(),
        };
        self.answer_challenges(solver, &mut served.tokens, poll)
            .await
    }

    async fn answer_challenges(
        &mut self,
        solver: &Http01Solver,
        served: &mut Vec<String>,
        poll: &PollPolicy,
    ) -> Result<OrderStatus, AcmeError> {
        let mut authorizations = self.order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization.map_err(acme_err)?;
            match authorization.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                _ => break, // the order is invalid; reported below
            }
            let identifier = authorization.identifier().to_string();
            let mut challenge = authorization
                .challenge(ChallengeType::Http01)
                .ok_or(AcmeError::NoHttp01Challenge { identifier })?;
            solver.add(&challenge.token, challenge.key_authorization().as_str());
            served.push(challenge.token.clone());
            if challenge.status == ChallengeStatus::Pending {
                challenge.set_ready().await.map_err(acme_err)?;
            }
        }
        match self.order.poll_ready(&poll.retry_policy()).await {
            Ok(OrderStatus::Invalid) => Err(self.invalid()),
            Ok(status) => Ok(status),
            // An order error document means the order itself failed.
            Err(instant_acme::Error::Api(_))
                if self.order.state().status == OrderStatus::Invalid =>
            {
                Err(self.invalid())
            }
            Err(e) => Err(acme_err(e)),
        }
    }

    fn invalid(&mut self) -> AcmeError {
        let problem = self
            .order
            .state()
            .error
            .as_ref()
            .map(|p| ProblemDetails::from_problem(p, None));
        AcmeError::OrderInvalid {
            url: self.order.url().to_owned(),
            problem,
        }
    }
}

/// Tokens put into a solver for one authorization round; withdrawn when dropped.
struct ServedTokens<'a> {
    solver: &'a Http01Solver,
    tokens: Vec<String>,
}

impl Drop for ServedTokens<'_> {
    fn drop(&mut self) {
        for token in &self.tokens {
            self.solver.remove(token);
        }
    }
}

fn looks_like_pem(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .is_some_and(|start| bytes[start..].starts_with(b"-----BEGIN"))
}

fn csr_der(csr: &[u8]) -> Result<Vec<u8>, AcmeError> {
    if looks_like_pem(csr) {
        CertificateSigningRequestDer::from_pem_slice(csr)
            .map(|der| der.as_ref().to_vec())
            .map_err(|e| AcmeError::InvalidInput(format!("bad CSR PEM: {e}")))
    } else if csr.is_empty() {
        Err(AcmeError::InvalidInput("empty CSR".to_owned()))
    } else {
        Ok(csr.to_vec())
    }
}

fn certificate_der(certificate: &[u8]) -> Result<CertificateDer<'static>, AcmeError> {
    if looks_like_pem(certificate) {
        CertificateDer::from_pem_slice(certificate)
            .map_err(|e| AcmeError::InvalidInput(format!("bad certificate PEM: {e}")))
    } else if certificate.is_empty() {
        Err(AcmeError::InvalidInput("empty certificate".to_owned()))
    } else {
        Ok(CertificateDer::from(certificate.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_account_debug_is_redacted() {
        let json =
            r#"{"id":"https://ca/acct/1","key_pkcs8":"c2VjcmV0","directory":"https://ca/dir"}"#;
        let stored: StoredAccount = serde_json::from_str(json).expect("parse");
        assert_eq!(format!("{stored:?}"), "StoredAccount(<redacted>)");
        let eab = ExternalAccountBinding {
            key_id: "kid".to_owned(),
            hmac_key: b"very secret".to_vec(),
        };
        assert!(!format!("{eab:?}").contains("very"));
    }

    #[test]
    fn pem_and_der_inputs() {
        assert!(matches!(csr_der(b""), Err(AcmeError::InvalidInput(_))));
        assert_eq!(csr_der(&[0x30, 0x01]).expect("der"), vec![0x30, 0x01]);
        assert!(matches!(
            certificate_der(
                b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"
            ),
            Err(AcmeError::InvalidInput(_))
        ));
    }

    #[test]
    fn rate_limit_problem_keeps_type_detail_and_retry_after() {
        let problem: instant_acme::Problem = serde_json::from_str(
            r#"{"type":"urn:ietf:params:acme:error:rateLimited","detail":"too many","status":429}"#,
        )
        .expect("problem");
        let at = std::time::SystemTime::now() + Duration::from_secs(60);
        let err = AcmeError::from_acme(instant_acme::Error::Api(problem), Some(at));
        assert!(matches!(err, AcmeError::RateLimited { .. }));
        assert_eq!(err.retry_after(), Some(at));
        let p = err.problem().expect("problem");
        assert_eq!(p.kind.as_deref(), Some(RATE_LIMITED));
        assert_eq!(p.detail.as_deref(), Some("too many"));
        assert_eq!(p.status, Some(429));
    }
}
