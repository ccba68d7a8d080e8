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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use leasehold_certs::{CertificateAuthority, KeyAlgorithm};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::crl::MemoryLedgerStore;

    #[test]
    fn file_names_pick_the_encoding() {
        assert_eq!(
            parse_file("internal.pem", "crl"),
            Some(("internal", Encoding::Pem))
        );
        assert_eq!(
            parse_file("internal.crl", "crl"),
            Some(("internal", Encoding::Der))
        );
        assert_eq!(parse_file("a.b.crt", "crt"), Some(("a.b", Encoding::Der)));
        assert_eq!(parse_file("internal.crt", "crl"), None);
        assert_eq!(parse_file("internal", "crl"), None);
        assert_eq!(parse_file(".pem", "crl"), None);
    }

    /// One HTTP/1.1 GET over a real socket: (status, content type, body).
    async fn get(addr: SocketAddr, path: &str) -> (u16, String, Vec<u8>) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: crl\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&response[..split]).to_string();
        let body = response[split + 4..].to_vec();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let content_type = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-type: ")
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        (status, content_type, body)
    }

    #[tokio::test]
    async fn serves_crls_and_ca_certificates_over_http() {
        let registry = IssuerRegistry::new();
        let ca = CertificateAuthority::self_signed(
            "http CA",
            KeyAlgorithm::EcdsaP256,
            time::OffsetDateTime::now_utc(),
            time::Duration::days(1),
        )
        .unwrap();
        let ca_pem = ca.certificate_pem().to_owned();
        let ca_der = ca.certificate_der().to_vec();
        let store = Arc::new(MemoryLedgerStore::default());
        let key = IssuerKey::Namespaced {
            namespace: "shop".into(),
            name: "internal".into(),
        };
        registry.set_ready(key.clone(), ca, store.clone());
        registry.set_not_ready(
            IssuerKey::Cluster {
                name: "broken".into(),
            },
            "SecretNotFound",
            "Secret leasehold/x does not exist",
        );

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_on(listener, registry.clone(), async move {
            let _ = stop_rx.await;
        }));

        // The first CRL is signed by the refresh task; wait for it.
        let crl_pem = loop {
            if let Some(pem) = registry.crl_pem_by_key(&key).unwrap() {
                break pem;
            }
            tokio::task::yield_now().await;
        };
        let (status, content_type, body) = get(addr, "/crl/issuer/shop/internal.pem").await;
        assert_eq!((status, content_type.as_str()), (200, PEM_CONTENT_TYPE));
        assert_eq!(String::from_utf8(body).unwrap(), crl_pem);
        let (status, content_type, body) = get(addr, "/crl/issuer/shop/internal.crl").await;
        assert_eq!((status, content_type.as_str()), (200, CRL_DER_CONTENT_TYPE));
        assert_eq!(body, pem_to_der(&crl_pem).unwrap());
        assert_eq!(body[0], 0x30, "DER SEQUENCE");

        let (status, content_type, body) = get(addr, "/ca/issuer/shop/internal.pem").await;
        assert_eq!((status, content_type.as_str()), (200, PEM_CONTENT_TYPE));
        assert_eq!(String::from_utf8(body).unwrap(), ca_pem);
        let (status, content_type, body) = get(addr, "/ca/issuer/shop/internal.crt").await;
        assert_eq!(
            (status, content_type.as_str()),
            (200, CERT_DER_CONTENT_TYPE)
        );
        assert_eq!(body, ca_der);

        let (status, _, body) = get(addr, "/crl/clusterissuer/broken.pem").await;
        assert_eq!(status, 404);
        assert!(String::from_utf8_lossy(&body).contains("SecretNotFound"));
        let (status, _, body) = get(addr, "/crl/issuer/other/internal.pem").await;
        assert_eq!(status, 404);
        assert!(String::from_utf8_lossy(&body).contains("does not exist"));
        assert_eq!(get(addr, "/crl/issuer/shop/internal.txt").await.0, 404);
        assert_eq!(get(addr, "/ca/clusterissuer/internal.crl").await.0, 404);

        stop_tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
