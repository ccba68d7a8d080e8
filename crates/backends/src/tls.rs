//! TLS client settings shared by the SQL backends (rustls with the `ring` provider).
//!
//! [`TlsMode::Require`] follows libpq's `sslmode=require`: the connection is
//! encrypted but the server certificate is not checked, so it protects against
//! passive eavesdropping only. [`TlsMode::VerifyFull`] checks the chain against the
//! given CA bundle (or the Mozilla roots when it is empty) and the host name.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::{BackendError, TlsMode};

/// The crypto provider every TLS connection of this crate uses.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Make sure rustls has a process-wide default provider, for libraries (mysql_async)
/// that build their `ClientConfig` with `ClientConfig::builder()`. Without one that
/// call panics when both the `ring` and `aws-lc-rs` features end up enabled in the
/// same build. An already installed default is kept.
pub(crate) fn ensure_default_provider() {
    if CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: there is a default either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// The certificates of a PEM bundle. An empty bundle gives an empty list; a
/// non-empty one without a single certificate is refused.
pub(crate) fn parse_ca_bundle(ca_pem: &str) -> Result<Vec<CertificateDer<'static>>, BackendError> {
    if ca_pem.trim().is_empty() {
        return Ok(Vec::new());
    }
    let certs = CertificateDer::pem_slice_iter(ca_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| BackendError::Invalid(format!("cannot read the CA bundle: {e}")))?;
    if certs.is_empty() {
        return Err(BackendError::Invalid(
            "the CA bundle holds no PEM certificate".into(),
        ));
    }
    Ok(certs)
}

/// The rustls client configuration for `mode`, or `None` for [`TlsMode::Disable`].
pub(crate) fn client_config(mode: &TlsMode) -> Result<Option<ClientConfig>, BackendError> {
    let provider = provider();
    let builder = || {
        ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| BackendError::Other(format!("cannot set up TLS: {e}")))
    };
    let config = match mode {
        TlsMode::Disable => return Ok(None),
        TlsMode::Require => builder()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServerCertificate {
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth(),
        TlsMode::VerifyFull { ca_pem } => {
            let mut roots = RootCertStore::empty();
            let certs = parse_ca_bundle(ca_pem)?;
            if certs.is_empty() {
                roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            }
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| BackendError::Invalid(format!("unusable CA certificate: {e}")))?;
            }
            let verifier =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| BackendError::Invalid(format!("unusable CA bundle: {e}")))?;
            builder()?
                .with_webpki_verifier(verifier)
                .with_no_client_auth()
        }
    };
    Ok(Some(config))
}

/// Check that `host` can be named in a TLS handshake (a DNS name or an IP address).
pub(crate) fn check_server_name(mode: &TlsMode, host: &str) -> Result<(), BackendError> {
    if *mode == TlsMode::Disable {
        return Ok(());
    }
    ServerName::try_from(host)
        .map(|_| ())
        .map_err(|e| BackendError::Invalid(format!("host {host:?} cannot be used with TLS: {e}")))
}

/// If `err` (or anything it wraps) is rustls refusing the server's certificate, a
/// description of why.
pub(crate) fn certificate_rejection(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(rustls_error) = rejection(e) {
            return Some(rustls_error.to_string());
        }
        // `io::Error::source` skips the wrapped error itself: look at it too.
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            && let Some(rustls_error) = rejection(inner)
        {
            return Some(rustls_error.to_string());
        }
        current = e.source();
    }
    None
}

fn rejection<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    e.downcast_ref::<rustls::Error>().filter(|e| {
        matches!(
            e,
            rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
        )
    })
}

/// Accepts any server certificate (the `Require` mode) while still checking that
/// the server holds the key of the certificate it presented.
#[derive(Debug)]
struct AnyServerCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyServerCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disable_has_no_config() {
        assert!(matches!(client_config(&TlsMode::Disable), Ok(None)));
    }

    #[test]
    fn require_and_public_roots_build() {
        assert!(matches!(client_config(&TlsMode::Require), Ok(Some(_))));
        let mode = TlsMode::VerifyFull {
            ca_pem: String::new(),
        };
        assert!(matches!(client_config(&mode), Ok(Some(_))));
    }

    #[test]
    fn garbage_ca_bundle_is_invalid() {
        let mode = TlsMode::VerifyFull {
            ca_pem: "not a certificate".into(),
        };
        assert!(matches!(
            client_config(&mode),
            Err(BackendError::Invalid(_))
        ));
    }

    #[test]
    fn ip_and_dns_hosts_are_server_names() {
        assert!(check_server_name(&TlsMode::Require, "127.0.0.1").is_ok());
        assert!(check_server_name(&TlsMode::Require, "db.example.com").is_ok());
        assert!(check_server_name(&TlsMode::Require, "bad host").is_err());
        assert!(check_server_name(&TlsMode::Disable, "bad host").is_ok());
    }

    #[test]
    fn certificate_rejections_are_found_inside_io_errors() {
        let inner = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, inner);
        assert!(certificate_rejection(&io).is_some());
        let other = std::io::Error::other("connection reset");
        assert!(certificate_rejection(&other).is_none());
    }
}
