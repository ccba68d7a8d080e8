//! Checks run on a certificate before it is handed out. Each failure is a distinct
//! [`VerifyError`] variant; none carries key material.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateSigningRequestParams, KeyPair, PublicKeyData};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::time::ASN1Time;

use crate::ca::CertificateAuthority;
use crate::ca::IssuedCertificate;
use crate::key::PrivateKeyPem;
use crate::request::{CertificateRequest, KeyAlgorithm, SubjectAltName, Usage};

/// Bytes in flight each way in the handshake pipe (a whole flight of handshake records).
const PIPE_BUFFER: usize = 64 * 1024;

/// How long the loopback handshake may take before it counts as failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which check failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("the certificate is not a valid X.509 certificate")]
    Certificate,
    #[error("the CA certificate is not a valid X.509 certificate")]
    CaCertificate,
    #[error("the certificate's issuer is not the CA's subject")]
    IssuerName,
    #[error("the certificate's signature does not verify with the CA's key")]
    Signature,
    #[error("the certificate is not valid at {at}")]
    NotValidNow { at: OffsetDateTime },
    #[error("the certificate's commonName is {found:?}, not the requested {expected:?}")]
    CommonName {
        expected: String,
        found: Option<String>,
    },
    #[error(
        "the certificate's subject alternative names {found:?} are not the requested {expected:?}"
    )]
    SubjectAltNames {
        expected: Vec<String>,
        found: Vec<String>,
    },
    #[error("the certificate's usages {found:?} are not the requested {expected:?}")]
    Usages {
        expected: Vec<Usage>,
        found: Vec<Usage>,
    },
    #[error("the private key cannot be parsed")]
    PrivateKey,
    #[error("the CSR cannot be parsed")]
    Csr,
    #[error("the private key does not match the certificate's public key")]
    KeyMismatch,
    #[error("the CSR's key is {found}, not the requested {expected:?}")]
    KeyAlgorithm {
        expected: KeyAlgorithm,
        found: String,
    },
    #[error("the TLS handshake for {server_name:?} failed: {reason}")]
    Handshake { server_name: String, reason: String },
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, VerifyError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert)
        .map_err(|_| VerifyError::Certificate)
}

/// The pure checks: issued by `ca_der`, valid at `now`, commonName, SANs and usages
/// exactly as requested.
pub fn check_certificate(
    ca_der: &[u8],
    leaf_der: &[u8],
    request: &CertificateRequest,
    now: OffsetDateTime,
) -> Result<(), VerifyError> {
    check_certificate_with(ca_der, leaf_der, request, now, UsageCheck::Exact)
}

/// How the certificate's usages must compare with the requested ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageCheck {
    /// Exactly the requested usages (an issuer leasehold runs itself).
    Exact,
    /// At least the requested ones: a public CA (ACME) decides the usages it puts on
    /// every certificate and may add some.
    AtLeast,
}

/// [`check_certificate`] with the usage comparison of `usages`.
pub fn check_certificate_with(
    ca_der: &[u8],
    leaf_der: &[u8],
    request: &CertificateRequest,
    now: OffsetDateTime,
    usages_check: UsageCheck,
) -> Result<(), VerifyError> {
    let ca = x509_parser::parse_x509_certificate(ca_der)
        .map(|(_, cert)| cert)
        .map_err(|_| VerifyError::CaCertificate)?;
    let leaf = parse(leaf_der)?;

    if leaf.issuer().as_raw() != ca.subject().as_raw() {
        return Err(VerifyError::IssuerName);
    }
    leaf.verify_signature(Some(ca.public_key()))
        .map_err(|_| VerifyError::Signature)?;
    let at = ASN1Time::from_timestamp(now.unix_timestamp())
        .map_err(|_| VerifyError::NotValidNow { at: now })?;
    if !leaf.validity().is_valid_at(at) || !ca.validity().is_valid_at(at) {
        return Err(VerifyError::NotValidNow { at: now });
    }

    let common_name = leaf
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    if common_name.as_deref() != Some(request.common_name.as_str()) {
        return Err(VerifyError::CommonName {
            expected: request.common_name.clone(),
            found: common_name,
        });
    }

    let expected = request.subject_alt_names();
    let found = subject_alt_names(&leaf)?;
    if found != expected {
        return Err(VerifyError::SubjectAltNames {
            expected: expected.iter().map(ToString::to_string).collect(),
            found: found.iter().map(ToString::to_string).collect(),
        });
    }

    let expected = request.usage_set();
    let found = usages(&leaf)?;
    let fits = match usages_check {
        UsageCheck::Exact => found == expected,
        UsageCheck::AtLeast => found.is_superset(&expected),
    };
    if !fits {
        return Err(VerifyError::Usages {
            expected: expected.into_iter().collect(),
            found: found.into_iter().collect(),
        });
    }
    Ok(())
}

fn subject_alt_names(leaf: &X509Certificate<'_>) -> Result<BTreeSet<SubjectAltName>, VerifyError> {
    let Some(extension) = leaf
        .subject_alternative_name()
        .map_err(|_| VerifyError::Certificate)?
    else {
        return Ok(BTreeSet::new());
    };
    Ok(extension
        .value
        .general_names
        .iter()
        .map(|name| match name {
            GeneralName::DNSName(dns) => SubjectAltName::Dns(dns.to_ascii_lowercase()),
            GeneralName::URI(uri) => SubjectAltName::Uri((*uri).to_owned()),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => {
                    let octets: [u8; 4] = (*bytes).try_into().unwrap_or_default();
                    SubjectAltName::Ip(IpAddr::V4(Ipv4Addr::from(octets)))
                }
                16 => {
                    let octets: [u8; 16] = (*bytes).try_into().unwrap_or_default();
                    SubjectAltName::Ip(IpAddr::V6(Ipv6Addr::from(octets)))
                }
                _ => SubjectAltName::Uri(format!("ip-bytes:{bytes:?}")),
            },
            // Any other kind was not requested, so it must make the sets differ.
            other => SubjectAltName::Uri(format!("other:{other}")),
        })
        .collect())
}

fn usages(leaf: &X509Certificate<'_>) -> Result<BTreeSet<Usage>, VerifyError> {
    let mut found = BTreeSet::new();
    if let Some(eku) = leaf
        .extended_key_usage()
        .map_err(|_| VerifyError::Certificate)?
    {
        if eku.value.server_auth {
            found.insert(Usage::ServerAuth);
        }
        if eku.value.client_auth {
            found.insert(Usage::ClientAuth);
        }
    }
    if let Some(ku) = leaf.key_usage().map_err(|_| VerifyError::Certificate)? {
        if ku.value.digital_signature() {
            found.insert(Usage::DigitalSignature);
        }
        if ku.value.key_encipherment() {
            found.insert(Usage::KeyEncipherment);
        }
    }
    Ok(found)
}

/// The private key is the one whose public key the certificate carries.
pub fn check_private_key(leaf_der: &[u8], key: &PrivateKeyPem) -> Result<(), VerifyError> {
    let leaf = parse(leaf_der)?;
    let key = KeyPair::from_pem(key.expose()).map_err(|_| VerifyError::PrivateKey)?;
    if leaf.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(VerifyError::KeyMismatch);
    }
    Ok(())
}

/// Ed25519's algorithm identifier (RFC 8410).
const ED25519_OID: &str = "1.3.101.112";

/// The CSR's key is of `expected`'s kind and size: a node (or anyone holding a CSR) cannot
/// have a weaker key certified than the lease asks for.
pub fn check_csr_key_algorithm(csr_pem: &str, expected: KeyAlgorithm) -> Result<(), VerifyError> {
    use x509_parser::prelude::FromDer;
    use x509_parser::public_key::PublicKey;
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(csr_pem.as_bytes()).map_err(|_| VerifyError::Csr)?;
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&pem.contents)
            .map_err(|_| VerifyError::Csr)?;
    let spki = &csr.certification_request_info.subject_pki;
    let found = if spki.algorithm.algorithm.to_id_string() == ED25519_OID {
        "Ed25519".to_owned()
    } else {
        match spki.parsed() {
            Ok(PublicKey::EC(point)) => format!("ECDSA with a {}-bit curve", point.key_size()),
            Ok(PublicKey::RSA(rsa)) => format!("RSA {}", rsa.key_size()),
            _ => format!("of algorithm {}", spki.algorithm.algorithm.to_id_string()),
        }
    };
    let wanted = match expected {
        KeyAlgorithm::EcdsaP256 => "ECDSA with a 256-bit curve",
        KeyAlgorithm::EcdsaP384 => "ECDSA with a 384-bit curve",
        KeyAlgorithm::Ed25519 => "Ed25519",
        KeyAlgorithm::Rsa2048 => "RSA 2048",
        KeyAlgorithm::Rsa3072 => "RSA 3072",
    };
    if found == wanted {
        Ok(())
    } else {
        Err(VerifyError::KeyAlgorithm { expected, found })
    }
}

/// The certificate carries the public key of the CSR (the key itself stays on the node).
pub fn check_csr_key(leaf_der: &[u8], csr_pem: &str) -> Result<(), VerifyError> {
    let leaf = parse(leaf_der)?;
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|_| VerifyError::Csr)?;
    if leaf.public_key().raw != csr.public_key.subject_public_key_info().as_slice() {
        return Err(VerifyError::KeyMismatch);
    }
    Ok(())
}

/// A real TLS handshake on loopback: a rustls server presents `leaf_der` with `key`, a
/// rustls client trusting only `ca_der` connects for `server_name` (a DNS name or an IP
/// address) and reads a byte the server sends over the session.
pub async fn check_handshake(
    ca_der: &CertificateDer<'static>,
    leaf_der: &CertificateDer<'static>,
    key: &PrivateKeyPem,
    server_name: &str,
) -> Result<(), VerifyError> {
    let failed = |reason: String| VerifyError::Handshake {
        server_name: server_name.to_owned(),
        reason,
    };
    let key_der = PrivateKeyDer::from_pem_slice(key.expose().as_bytes())
        .map_err(|_| VerifyError::PrivateKey)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_config = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|err| failed(err.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![leaf_der.clone()], key_der)
        .map_err(|err| failed(format!("server configuration: {err}")))?;
    let client_config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| failed(err.to_string()))?
        .with_root_certificates(roots(ca_der).map_err(failed)?)
        .with_no_client_auth();
    handshake(server_config, client_config, server_name).await
}

/// Name of the throwaway server in [`check_client_handshake`].
const CLIENT_CHECK_SERVER: &str = "client-check.leasehold.invalid";

/// A real TLS handshake on loopback with `leaf_der` and `key` as the client
/// certificate: a rustls server that requires client certificates issued by `ca_der`
/// (and presents a throwaway certificate of its own) must accept it.
pub async fn check_client_handshake(
    ca_der: &CertificateDer<'static>,
    leaf_der: &CertificateDer<'static>,
    key: &PrivateKeyPem,
) -> Result<(), VerifyError> {
    let failed = |reason: String| VerifyError::Handshake {
        server_name: CLIENT_CHECK_SERVER.to_owned(),
        reason,
    };
    let key_der = PrivateKeyDer::from_pem_slice(key.expose().as_bytes())
        .map_err(|_| VerifyError::PrivateKey)?;
    let now = OffsetDateTime::now_utc();
    let server_ca = CertificateAuthority::self_signed(
        "leasehold client check",
        KeyAlgorithm::EcdsaP256,
        now - time::Duration::minutes(1),
        time::Duration::hours(1),
    )
    .map_err(|err| failed(format!("throwaway server CA: {err}")))?;
    let server = server_ca
        .issue_with_generated_key(
            &CertificateRequest::server(
                CLIENT_CHECK_SERVER,
                &[CLIENT_CHECK_SERVER],
                time::Duration::hours(1),
            ),
            now - time::Duration::minutes(1),
        )
        .map_err(|err| failed(format!("throwaway server certificate: {err}")))?;
    let server_key = server
        .private_key
        .as_ref()
        .and_then(|key| PrivateKeyDer::from_pem_slice(key.expose().as_bytes()).ok())
        .ok_or_else(|| failed("throwaway server key".to_owned()))?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client_verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(ca_der).map_err(failed)?),
        provider.clone(),
    )
    .build()
    .map_err(|err| failed(format!("client verifier: {err}")))?;
    let server_config = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|err| failed(err.to_string()))?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(vec![server.certificate_der.clone()], server_key)
        .map_err(|err| failed(format!("server configuration: {err}")))?;
    let client_config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| failed(err.to_string()))?
        .with_root_certificates(roots(server_ca.certificate_der()).map_err(failed)?)
        .with_client_auth_cert(vec![leaf_der.clone()], key_der)
        .map_err(|err| failed(format!("client configuration: {err}")))?;
    handshake(server_config, client_config, CLIENT_CHECK_SERVER).await
}

fn roots(ca_der: &CertificateDer<'static>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca_der.clone())
        .map_err(|err| format!("CA certificate: {err}"))?;
    Ok(roots)
}

/// Runs one handshake between `server_config` and `client_config` over an in-process
/// byte pipe (the same TLS records a socket would carry, without the socket); the server
/// sends one byte the client must read, so both sides completed the handshake.
async fn handshake(
    server_config: ServerConfig,
    client_config: ClientConfig,
    server_name: &str,
) -> Result<(), VerifyError> {
    let failed = |reason: String| VerifyError::Handshake {
        server_name: server_name.to_owned(),
        reason,
    };
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|_| failed("not a valid DNS name or IP address".to_owned()))?;
    let (server_end, client_end) = tokio::io::duplex(PIPE_BUFFER);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));

    let server = async {
        let mut tls = acceptor.accept(server_end).await?;
        tls.write_all(b"!").await?;
        tls.shutdown().await
    };
    let client = async {
        let mut tls = connector.connect(name, client_end).await?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await?;
        Ok::<_, std::io::Error>(byte)
    };
    let (server, client) =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, async { tokio::join!(server, client) })
            .await
            .map_err(|_| failed("timed out".to_owned()))?;
    // In TLS 1.3 the client finishes before the server has checked its certificate, so
    // a refused client certificate shows on the server side; report the server's view
    // when the client's is only the resulting alert or EOF.
    match (client, server) {
        (Ok(byte), Ok(())) if &byte == b"!" => Ok(()),
        (Ok(_), Ok(())) => Err(failed("unexpected data".to_owned())),
        (Err(client), Err(server)) => Err(failed(format!("client: {client}; server: {server}"))),
        (Err(err), Ok(())) => Err(failed(format!("client: {err}"))),
        (Ok(_), Err(err)) => Err(failed(format!("server: {err}"))),
    }
}

/// Every check for a certificate about to be handed out: the pure checks, then for an
/// issuer-generated key that the key matches, a TLS handshake as server for its first
/// DNS name (or IP address) when it has `serverAuth`, and one as client when it has
/// `clientAuth`. A CSR-issued certificate is
/// checked against the CSR's public key instead (the key is not here).
pub async fn verify_issued(
    ca: &CertificateAuthority,
    issued: &IssuedCertificate,
    request: &CertificateRequest,
    csr_pem: Option<&str>,
    now: OffsetDateTime,
) -> Result<(), VerifyError> {
    verify_leaf(
        ca.certificate_der(),
        &issued.certificate_der,
        request,
        issued.private_key.as_ref(),
        csr_pem,
        now,
    )
    .await
}

/// [`verify_issued`] for any issuer: `anchor_der` the CA that signed `leaf_der`
/// directly, `key` the private key when it is here (Secret delivery, or the node
/// verifying what it received), `csr_pem` the CSR when the key is elsewhere.
pub async fn verify_leaf(
    anchor_der: &CertificateDer<'static>,
    leaf_der: &CertificateDer<'static>,
    request: &CertificateRequest,
    key: Option<&PrivateKeyPem>,
    csr_pem: Option<&str>,
    now: OffsetDateTime,
) -> Result<(), VerifyError> {
    verify_leaf_with(
        anchor_der,
        leaf_der,
        request,
        key,
        csr_pem,
        now,
        UsageCheck::Exact,
    )
    .await
}

/// [`verify_leaf`] with the usage comparison of `usages` (ACME: [`UsageCheck::AtLeast`]).
pub async fn verify_leaf_with(
    anchor_der: &CertificateDer<'static>,
    leaf_der: &CertificateDer<'static>,
    request: &CertificateRequest,
    key: Option<&PrivateKeyPem>,
    csr_pem: Option<&str>,
    now: OffsetDateTime,
    usages: UsageCheck,
) -> Result<(), VerifyError> {
    check_certificate_with(anchor_der, leaf_der, request, now, usages)?;
    if let Some(csr_pem) = csr_pem {
        check_csr_key(leaf_der, csr_pem)?;
    }
    if let Some(key) = key {
        check_private_key(leaf_der, key)?;
        if request.usages.contains(&Usage::ServerAuth) {
            let server_name = request
                .dns_names
                .first()
                .cloned()
                .or_else(|| request.ip_addresses.first().map(ToString::to_string));
            if let Some(server_name) = server_name {
                check_handshake(anchor_der, leaf_der, key, &server_name).await?;
            }
        }
        if request.usages.contains(&Usage::ClientAuth) {
            check_client_handshake(anchor_der, leaf_der, key).await?;
        }
    }
    Ok(())
}
