//! Certificate volumes: the key is generated here, in memory, and only its CSR goes to
//! the broker. The broker is the authority on the names (it expands the lease's
//! templates from the verified pod); the driver checks what comes back against the
//! names the broker says it issued for, with the key it holds: chain to `ca.crt`, names
//! and usages, key match, and a real TLS handshake on loopback.

use std::collections::BTreeMap;

use jiff::Timestamp;
use leasehold_certs::{
    CertificateRequest, KeyAlgorithm, PrivateKeyPem, Usage, csr_for, generate_key, verify,
};
use leasehold_files::SecretBytes;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::broker::{CertificateProfile, IssuedCertificate};

/// The private key file.
pub const KEY_FILE: &str = "tls.key";
/// The certificate chain file (leaf first).
pub const CERT_FILE: &str = "tls.crt";
/// The trust anchor file.
pub const CA_FILE: &str = "ca.crt";

/// Why a certificate could not be made or accepted. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// The broker's profile names something this driver does not know.
    #[error("certificate profile: {0}")]
    Profile(String),
    /// Key or CSR generation failed.
    #[error("key or CSR: {0}")]
    Key(String),
    /// The issued certificate did not pass the checks.
    #[error("the issued certificate did not verify: {0}")]
    Verify(String),
}

fn key_algorithm(name: &str) -> Result<KeyAlgorithm, CertificateError> {
    KeyAlgorithm::ALL
        .into_iter()
        .find(|alg| format!("{alg:?}") == name)
        .ok_or_else(|| CertificateError::Profile(format!("unknown key algorithm {name:?}")))
}

fn usage(name: &str) -> Result<Usage, CertificateError> {
    Ok(match name {
        "ServerAuth" => Usage::ServerAuth,
        "ClientAuth" => Usage::ClientAuth,
        "DigitalSignature" => Usage::DigitalSignature,
        "KeyEncipherment" => Usage::KeyEncipherment,
        other => {
            return Err(CertificateError::Profile(format!(
                "unknown usage {other:?}"
            )));
        }
    })
}

/// The request the profile describes (the lifetime is the issuer's business and not
/// checked here: the validity at `now` is).
pub fn request_of(profile: &CertificateProfile) -> Result<CertificateRequest, CertificateError> {
    Ok(CertificateRequest {
        common_name: profile.common_name.clone(),
        dns_names: profile.dns_names.clone(),
        ip_addresses: profile
            .ip_addresses
            .iter()
            .map(|ip| {
                ip.parse()
                    .map_err(|_| CertificateError::Profile(format!("bad IP address {ip:?}")))
            })
            .collect::<Result<_, _>>()?,
        uris: profile.uris.clone(),
        duration: time::Duration::ZERO,
        usages: profile
            .usages
            .iter()
            .map(|u| usage(u))
            .collect::<Result<_, _>>()?,
        key_algorithm: key_algorithm(&profile.key_algorithm)?,
    })
}

/// A fresh key of the profile's algorithm and a CSR for exactly its names. Blocking
/// (RSA key generation takes a while): call from a blocking task.
pub fn key_and_csr(
    profile: &CertificateProfile,
) -> Result<(PrivateKeyPem, String), CertificateError> {
    let request = request_of(profile)?;
    let key =
        generate_key(request.key_algorithm).map_err(|e| CertificateError::Key(e.to_string()))?;
    let csr = csr_for(&key, &request).map_err(|e| CertificateError::Key(e.to_string()))?;
    Ok((key, csr))
}

fn first_der(pem: &str, what: &str) -> Result<CertificateDer<'static>, CertificateError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| CertificateError::Verify(format!("no {what} in the response")))
}

/// Checks `issued` for `key` against the names the broker says it issued for: chain,
/// names, usages, key match, and a loopback TLS handshake.
pub async fn check(
    issued: &IssuedCertificate,
    key: &PrivateKeyPem,
    now: Timestamp,
) -> Result<(), CertificateError> {
    let request = request_of(&issued.profile)?;
    let anchor = first_der(&issued.ca_pem, "CA certificate")?;
    let leaf = first_der(&issued.chain_pem, "certificate")?;
    let now = time::OffsetDateTime::from_unix_timestamp(now.as_second())
        .map_err(|e| CertificateError::Verify(e.to_string()))?;
    verify::verify_leaf(&anchor, &leaf, &request, Some(key), None, now)
        .await
        .map_err(|e| CertificateError::Verify(e.to_string()))
}

/// The files of a certificate volume: `tls.key`, `tls.crt`, `ca.crt`, written as one set.
pub fn files(key: &PrivateKeyPem, issued: &IssuedCertificate) -> BTreeMap<String, SecretBytes> {
    BTreeMap::from([
        (
            KEY_FILE.to_owned(),
            SecretBytes::from(key.expose().as_bytes().to_vec()),
        ),
        (
            CERT_FILE.to_owned(),
            SecretBytes::from(issued.chain_pem.as_bytes().to_vec()),
        ),
        (
            CA_FILE.to_owned(),
            SecretBytes::from(issued.ca_pem.as_bytes().to_vec()),
        ),
    ])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn profile_round_trip_and_unknown_names() {
        let profile = CertificateProfile {
            common_name: "web-0".into(),
            dns_names: vec!["web-0.shop.svc".into()],
            ip_addresses: vec!["10.0.0.1".into()],
            uris: vec![],
            usages: vec!["ServerAuth".into(), "DigitalSignature".into()],
            key_algorithm: "Ed25519".into(),
        };
        let r = request_of(&profile).unwrap();
        assert_eq!(r.key_algorithm, KeyAlgorithm::Ed25519);
        assert_eq!(r.usages, [Usage::ServerAuth, Usage::DigitalSignature]);
        let (key, csr) = key_and_csr(&profile).unwrap();
        assert!(csr.contains("CERTIFICATE REQUEST") && !csr.contains("PRIVATE KEY"));
        assert!(!format!("{key:?}").contains("PRIVATE KEY"));
        for bad in [
            CertificateProfile {
                key_algorithm: "Dsa".into(),
                ..profile.clone()
            },
            CertificateProfile {
                usages: vec!["CodeSigning".into()],
                ..profile.clone()
            },
            CertificateProfile {
                ip_addresses: vec!["x".into()],
                ..profile.clone()
            },
        ] {
            assert!(request_of(&bad).is_err());
        }
    }
}
