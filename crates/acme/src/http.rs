//! The HTTP client instant-acme talks through: rustls with the roots the caller
//! trusts (a test CA such as Pebble's, or the public web PKI), and a record of the
//! last response's `Retry-After` so problem documents can carry it.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Request;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::AcmeError;

/// Which certificate authorities may vouch for the ACME directory's TLS certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustRoots {
    /// The public web PKI (Mozilla's roots via `webpki-roots`).
    Public,
    /// Only these PEM certificates, e.g. Pebble's or a private CA's root.
    Pem(String),
}

impl TrustRoots {
    fn root_store(&self) -> Result<rustls::RootCertStore, AcmeError> {
        let mut roots = rustls::RootCertStore::empty();
        match self {
            Self::Public => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            Self::Pem(pem) => {
                for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    let cert = cert.map_err(|e| {
                        AcmeError::InvalidInput(format!("bad CA certificate PEM: {e}"))
                    })?;
                    roots.add(cert).map_err(|e| {
                        AcmeError::InvalidInput(format!("unusable CA certificate: {e}"))
                    })?;
                }
                if roots.is_empty() {
                    return Err(AcmeError::InvalidInput(
                        "the CA bundle holds no certificate".to_owned(),
                    ));
                }
            }
        }
        Ok(roots)
    }
}

/// What an error needs to know of the last response: its status and Retry-After.
#[derive(Debug, Clone, Copy, Default)]
struct LastResponse {
    status: Option<u16>,
    retry_after: Option<SystemTime>,
}

tokio::task_local! {
    /// The last response seen by the client in this task.
    static LAST_RESPONSE: Cell<LastResponse>;
}

/// Run an ACME operation so that its last response's status and Retry-After are
/// available to [`acme_err`]. Scoped per task, so concurrent operations never mix.
pub(crate) async fn scoped<T>(fut: impl Future<Output = T>) -> T {
    LAST_RESPONSE
        .scope(Cell::new(LastResponse::default()), fut)
        .await
}

fn last_response() -> LastResponse {
    LAST_RESPONSE.try_with(Cell::get).unwrap_or_default()
}

pub(crate) fn acme_err(err: instant_acme::Error) -> AcmeError {
    let last = last_response();
    match AcmeError::from_acme(err, last.retry_after) {
        // A failure response without a problem document (an empty 404, a proxy's
        // HTML 502): keep its status, which says more than the parse error.
        AcmeError::Transport(message) => match last.status {
            Some(status) if !(200..300).contains(&status) => AcmeError::Status { status, message },
            _ => AcmeError::Transport(message),
        },
        other => other,
    }
}

fn parse_retry_after(rsp: &BytesResponse) -> Option<SystemTime> {
    let value = rsp
        .parts
        .headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    match value.parse::<u64>() {
        Ok(secs) => Some(SystemTime::now() + Duration::from_secs(secs)),
        Err(_) => httpdate::parse_http_date(value).ok(),
    }
}

/// rustls + hyper client for instant-acme. Cheap to clone.
#[derive(Clone)]
pub(crate) struct AcmeHttp {
    client: Client<HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>,
}

impl std::fmt::Debug for AcmeHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeHttp").finish_non_exhaustive()
    }
}

impl AcmeHttp {
    pub(crate) fn new(trust: &TrustRoots) -> Result<Self, AcmeError> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| AcmeError::Transport(format!("TLS setup: {e}")))?
        .with_root_certificates(trust.root_store()?)
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .build();
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }
}

impl HttpClient for AcmeHttp {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let fut = self.client.request(req);
        Box::pin(async move {
            let rsp = BytesResponse::from(
                fut.await
                    .map_err(|e| instant_acme::Error::Other(Box::new(e)))?,
            );
            let last = LastResponse {
                status: Some(rsp.parts.status.as_u16()),
                retry_after: parse_retry_after(&rsp),
            };
            let _ = LAST_RESPONSE.try_with(|cell| cell.set(last));
            Ok(rsp)
        })
    }
}
