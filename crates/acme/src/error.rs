//! One error type for the crate. Problem documents from the server keep their type,
//! detail and the server's Retry-After; nothing here ever holds key material.

use std::time::SystemTime;

/// The ACME problem type a server sends when a rate limit is hit.
pub const RATE_LIMITED: &str = "urn:ietf:params:acme:error:rateLimited";
/// The ACME problem type for a rejected anti-replay nonce (retried automatically).
pub const BAD_NONCE: &str = "urn:ietf:params:acme:error:badNonce";

/// A problem document (RFC 7807) returned by the ACME server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProblemDetails {
    /// The problem type, e.g. `urn:ietf:params:acme:error:rateLimited`.
    pub kind: Option<String>,
    /// The server's human-readable explanation.
    pub detail: Option<String>,
    /// The HTTP status of the response that carried the problem.
    pub status: Option<u16>,
    /// Per-identifier subproblems, rendered as text.
    pub subproblems: Vec<String>,
    /// When the server asked us to come back (its `Retry-After` header), if it said.
    pub retry_after: Option<SystemTime>,
}

impl ProblemDetails {
    pub(crate) fn from_problem(
        problem: &instant_acme::Problem,
        retry_after: Option<SystemTime>,
    ) -> Self {
        Self {
            kind: problem.r#type.clone(),
            detail: problem.detail.clone(),
            status: problem.status,
            subproblems: problem
                .subproblems
                .iter()
                .map(ToString::to_string)
                .collect(),
            retry_after,
        }
    }

    fn is(&self, kind: &str) -> bool {
        self.kind.as_deref() == Some(kind)
    }
}

impl std::fmt::Display for ProblemDetails {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({})",
            self.detail.as_deref().unwrap_or("no detail"),
            self.kind.as_deref().unwrap_or("no type")
        )?;
        if !self.subproblems.is_empty() {
            write!(f, " [{}]", self.subproblems.join("; "))?;
        }
        Ok(())
    }
}

/// Everything that can go wrong talking ACME.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcmeError {
    /// The server enforces a rate limit; come back at `problem.retry_after` if set.
    #[error("ACME rate limit: {problem}")]
    RateLimited { problem: ProblemDetails },
    /// Any other problem document from the server.
    #[error("ACME server problem: {problem}")]
    Problem { problem: ProblemDetails },
    /// The order became `invalid` (a challenge failed, the CSR was refused, ...).
    #[error("ACME order {url} is invalid: {}", problem.as_ref().map_or_else(|| "no reason given".to_owned(), ToString::to_string))]
    OrderInvalid {
        url: String,
        problem: Option<ProblemDetails>,
    },
    /// Polling did not reach the wanted state in time. `next_poll` is when the server
    /// suggested to look again, if it did.
    #[error("timed out waiting for the ACME order to progress")]
    Timeout { next_poll: Option<SystemTime> },
    /// The server offered no HTTP-01 challenge for an identifier.
    #[error("no http-01 challenge offered for {identifier}")]
    NoHttp01Challenge { identifier: String },
    /// The caller passed something unusable (CSR, certificate, CA bundle, identifiers).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The HTTP-01 solver could not listen.
    #[error("HTTP-01 solver: {0}")]
    Solver(#[source] std::io::Error),
    /// The server answered with a failure status but no problem document.
    #[error("ACME server answered HTTP {status} without a problem document: {message}")]
    Status { status: u16, message: String },
    /// Transport, TLS, JSON or protocol failure below the problem-document level.
    #[error("ACME request failed: {0}")]
    Transport(String),
}

impl AcmeError {
    /// The problem document, if the server sent one.
    pub fn problem(&self) -> Option<&ProblemDetails> {
        match self {
            Self::RateLimited { problem } | Self::Problem { problem } => Some(problem),
            Self::OrderInvalid { problem, .. } => problem.as_ref(),
            _ => None,
        }
    }

    /// When the server asked to retry, if it did.
    pub fn retry_after(&self) -> Option<SystemTime> {
        match self {
            Self::Timeout { next_poll } => *next_poll,
            other => other.problem().and_then(|p| p.retry_after),
        }
    }

    /// A rejected nonce: the request was not processed and may be sent again.
    pub(crate) fn is_bad_nonce(&self) -> bool {
        matches!(self, Self::Problem { problem } if problem.is(BAD_NONCE))
    }

    /// Convert an instant-acme error, attaching the Retry-After the HTTP layer saw for
    /// the failed response.
    pub(crate) fn from_acme(err: instant_acme::Error, retry_after: Option<SystemTime>) -> Self {
        match err {
            instant_acme::Error::Api(problem) => {
                let problem = ProblemDetails::from_problem(&problem, retry_after);
                if problem.is(RATE_LIMITED) {
                    Self::RateLimited { problem }
                } else {
                    Self::Problem { problem }
                }
            }
            instant_acme::Error::Timeout(next) => Self::Timeout {
                next_poll: next.map(|at| {
                    SystemTime::now() + at.saturating_duration_since(std::time::Instant::now())
                }),
            },
            // instant-acme's remaining errors carry no key material (keys are never
            // formatted by it); keep their text only.
            other => Self::Transport(other.to_string()),
        }
    }
}
