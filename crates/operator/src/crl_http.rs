//! CRLs and CA certificates of ready `ca` issuers over plain HTTP (relying parties
//! fetch CRLs over HTTP by convention; both documents are signed or public).
//!
//! | path | body | content type |
//! |---|---|---|
//! | `/crl/issuer/<namespace>/<name>.pem` | CRL, PEM | `application/x-pem-file` |
//! | `/crl/issuer/<namespace>/<name>.crl` | CRL, DER | `application/pkix-crl` |
//! | `/crl/clusterissuer/<name>.pem`, `.crl` | same, for a ClusterIssuer | |
//! | `/ca/issuer/<namespace>/<name>.pem` | CA certificate, PEM | `application/x-pem-file` |
//! | `/ca/issuer/<namespace>/<name>.crt` | CA certificate, DER | `application/pkix-cert` |
//! | `/ca/clusterissuer/<name>.pem`, `.crt` | same, for a ClusterIssuer | |
//!
//! Served from the [`IssuerRegistry`] (the in-memory copy of what the ledger last
//! read or wrote). 404: no such issuer or not ready; 503: ready, first CRL not signed yet.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;

use crate::OperatorError;
use crate::issuers::{IssuerKey, IssuerRegistry};

pub const PEM_CONTENT_TYPE: &str = "application/x-pem-file";
pub const CRL_DER_CONTENT_TYPE: &str = "application/pkix-crl";
pub const CERT_DER_CONTENT_TYPE: &str = "application/pkix-cert";

/// Which document and encoding a file name asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Pem,
    Der,
}

/// `<name>.pem` or `<name>.<der_extension>` → (name, encoding).
pub fn parse_file<'a>(file: &'a str, der_extension: &str) -> Option<(&'a str, Encoding)> {
    let (name, extension) = file.rsplit_once('.')?;
    if name.is_empty() {
        return None;
    }
    match extension {
        "pem" => Some((name, Encoding::Pem)),
        e if e == der_extension => Some((name, Encoding::Der)),
        _ => None,
    }
}

/// The DER bytes of the first PEM block in `pem`.
pub fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    let body: String = pem
        .lines()
        .skip_while(|line| !line.starts_with("-----BEGIN "))
        .skip(1)
        .take_while(|line| !line.starts_with("-----END "))
        .map(str::trim)
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

#[derive(Clone, Copy)]
enum Document {
    Crl,
    Ca,
}

fn respond(
    registry: &IssuerRegistry,
    key: IssuerKey,
    document: Document,
    encoding: Encoding,
) -> Response {
    let pem = match document {
        Document::Crl => registry.crl_pem_by_key(&key),
        Document::Ca => registry.ca_pem_by_key(&key).map(Some),
    };
    let pem = match pem {
        Ok(Some(pem)) => pem,
        Ok(None) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{key}: no CRL signed yet\n"),
            )
                .into_response();
        }
        Err(e) => return (StatusCode::NOT_FOUND, format!("{e}\n")).into_response(),
    };
    match encoding {
        Encoding::Pem => ([(header::CONTENT_TYPE, PEM_CONTENT_TYPE)], pem).into_response(),
        Encoding::Der => {
            let content_type = match document {
                Document::Crl => CRL_DER_CONTENT_TYPE,
                Document::Ca => CERT_DER_CONTENT_TYPE,
            };
            match pem_to_der(&pem) {
                Some(der) => ([(header::CONTENT_TYPE, content_type)], der).into_response(),
                None => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "stored PEM is unreadable\n",
                )
                    .into_response(),
            }
        }
    }
}

fn der_extension(document: Document) -> &'static str {
    match document {
        Document::Crl => "crl",
        Document::Ca => "crt",
    }
}

fn namespaced(
    registry: &IssuerRegistry,
    namespace: String,
    file: &str,
    document: Document,
) -> Response {
    match parse_file(file, der_extension(document)) {
        Some((name, encoding)) => respond(
            registry,
            IssuerKey::Namespaced {
                namespace,
                name: name.to_owned(),
            },
            document,
            encoding,
        ),
        None => not_found(document),
    }
}

fn cluster(registry: &IssuerRegistry, file: &str, document: Document) -> Response {
    match parse_file(file, der_extension(document)) {
        Some((name, encoding)) => respond(
            registry,
            IssuerKey::Cluster {
                name: name.to_owned(),
            },
            document,
            encoding,
        ),
        None => not_found(document),
    }
}

fn not_found(document: Document) -> Response {
    let hint = match document {
        Document::Crl => "ask for <name>.pem (PEM) or <name>.crl (DER)",
        Document::Ca => "ask for <name>.pem (PEM) or <name>.crt (DER)",
    };
    (StatusCode::NOT_FOUND, format!("{hint}\n")).into_response()
}

/// The CRL and CA routes.
pub fn router(registry: IssuerRegistry) -> Router {
    Router::new()
        .route(
            "/crl/issuer/{namespace}/{file}",
            get(|State(r): State<IssuerRegistry>, Path((ns, file)): Path<(String, String)>| async move {
                namespaced(&r, ns, &file, Document::Crl)
            }),
        )
        .route(
            "/crl/clusterissuer/{file}",
            get(|State(r): State<IssuerRegistry>, Path(file): Path<String>| async move {
                cluster(&r, &file, Document::Crl)
            }),
        )
        .route(
            "/ca/issuer/{namespace}/{file}",
            get(|State(r): State<IssuerRegistry>, Path((ns, file)): Path<(String, String)>| async move {
                namespaced(&r, ns, &file, Document::Ca)
            }),
        )
        .route(
            "/ca/clusterissuer/{file}",
            get(|State(r): State<IssuerRegistry>, Path(file): Path<String>| async move {
                cluster(&r, &file, Document::Ca)
            }),
        )
        .with_state(registry)
}

/// Serve [`router`] on `listener` until `shutdown`.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    registry: IssuerRegistry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), OperatorError> {
    axum::serve(listener, router(registry))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(OperatorError::Server)
}

/// Bind `addr` and serve CRLs and CA certificates until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    registry: IssuerRegistry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), OperatorError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(OperatorError::Server)?;
    tracing::info!(%addr, "serving /crl and /ca");
    serve_on(listener, registry, shutdown).await
}
