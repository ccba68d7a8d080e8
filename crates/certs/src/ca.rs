use std::collections::BTreeSet;
use std::fmt;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SerialNumber,
};
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::key::PrivateKeyPem;
use crate::request::{CertificateRequest, KeyAlgorithm, SubjectAltName, Usage};

/// Loading or generating the CA failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("the CA certificate is not a PEM X.509 certificate")]
    Certificate,
    #[error("the CA private key is not a PEM PKCS#8, PKCS#1 or SEC1 key")]
    PrivateKey,
    #[error("the CA private key does not match the CA certificate")]
    KeyMismatch,
    #[error("the CA certificate is not a CA (basicConstraints cA is not set)")]
    NotCa,
    #[error("generating the self-signed CA failed: {0}")]
    Generate(rcgen::Error),
}

/// Issuing a leaf certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("the CSR is not valid PEM, or its signature does not verify: {0}")]
    Csr(rcgen::Error),
    #[error(
        "the CSR's subject alternative names {in_csr:?} are not exactly the requested {requested:?}"
    )]
    CsrNames {
        requested: Vec<String>,
        in_csr: Vec<String>,
    },
    #[error("{0}")]
    CsrKey(String),
    #[error("the request names no subject alternative name")]
    NoNames,
    #[error("the request duration must be positive")]
    Duration,
    #[error("invalid subject alternative name {0}")]
    InvalidName(String),
    #[error("generating a {0:?} key failed: {1}")]
    KeyGeneration(KeyAlgorithm, rcgen::Error),
    #[error("signing the certificate failed: {0}")]
    Sign(rcgen::Error),
    #[error("the private key is not a PEM PKCS#8, PKCS#1 or SEC1 key")]
    Key,
    #[error("serial {0:?} is not 1 to 20 bytes of hex")]
    Serial(String),
}

/// A leaf certificate as issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCertificate {
    /// The leaf certificate in PEM.
    pub certificate_pem: String,
    pub certificate_der: CertificateDer<'static>,
    /// Serial number as lower-case hex, the key of a [`crate::RevocationList`] entry.
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// The issuer generated the key (Secret delivery); `None` when issued from a CSR.
    pub private_key: Option<PrivateKeyPem>,
}

/// The `ca` issuer: a CA certificate and its key.
pub struct CertificateAuthority {
    certificate_pem: String,
    certificate_der: CertificateDer<'static>,
    key_pem: PrivateKeyPem,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("certificate_pem", &self.certificate_pem)
            .field("key_pem", &self.key_pem)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Loads a CA from its certificate and private key (PEM).
    pub fn from_pem(certificate_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let der = pem_certificate_der(certificate_pem).ok_or(CaError::Certificate)?;
        let key = KeyPair::from_pem(key_pem).map_err(|_| CaError::PrivateKey)?;
        {
            let (_, cert) =
                x509_parser::parse_x509_certificate(&der).map_err(|_| CaError::Certificate)?;
            if cert.public_key().raw != key.subject_public_key_info().as_slice() {
                return Err(CaError::KeyMismatch);
            }
            let is_ca = cert
                .basic_constraints()
                .ok()
                .flatten()
                .is_some_and(|bc| bc.value.ca);
            if !is_ca {
                return Err(CaError::NotCa);
            }
        }
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|_| CaError::Certificate)?;
        Ok(Self {
            certificate_pem: certificate_pem.to_owned(),
            certificate_der: der,
            key_pem: PrivateKeyPem::new(key_pem.to_owned()),
            issuer,
        })
    }

    /// Generates a self-signed CA valid from `now` for `validity`.
    pub fn self_signed(
        common_name: &str,
        algorithm: KeyAlgorithm,
        now: OffsetDateTime,
        validity: time::Duration,
    ) -> Result<Self, CaError> {
        let key = algorithm.generate().map_err(CaError::Generate)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, common_name);
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now;
        params.not_after = now + validity;
        params.serial_number = Some(random_serial());
        let certificate = params.self_signed(&key).map_err(CaError::Generate)?;
        let key_pem = PrivateKeyPem::new(key.serialize_pem());
        Ok(Self {
            certificate_pem: certificate.pem(),
            certificate_der: certificate.der().clone(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    pub fn certificate_der(&self) -> &CertificateDer<'static> {
        &self.certificate_der
    }

    /// The CA key, to store it (for example in the Secret of a self-signed CA).
    pub fn key_pem(&self) -> &PrivateKeyPem {
        &self.key_pem
    }

    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// Issues a certificate for the public key of `csr_pem`. The CSR's signature must
    /// verify and its SANs must be exactly the requested ones; the subject and every
    /// other extension come from `request`, never from the CSR.
    pub fn issue_from_csr(
        &self,
        request: &CertificateRequest,
        csr_pem: &str,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, IssueError> {
        self.issue_from_csr_with_serial(request, csr_pem, None, now)
    }

    /// [`CertificateAuthority::issue_from_csr`] with the serial the caller chose (lower-case
    /// hex from [`new_serial`]) and recorded before this call, so that a repeat after a
    /// crash issues under the same serial (and revoking that serial revokes both).
    pub fn issue_from_csr_with_serial(
        &self,
        request: &CertificateRequest,
        csr_pem: &str,
        serial: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, IssueError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(IssueError::Csr)?;
        crate::verify::check_csr_key_algorithm(csr_pem, request.key_algorithm)
            .map_err(|e| IssueError::CsrKey(e.to_string()))?;
        let requested = request.subject_alt_names();
        let in_csr: BTreeSet<SubjectAltName> = csr
            .params
            .subject_alt_names
            .iter()
            .map(SubjectAltName::from_rcgen)
            .collect();
        if in_csr != requested {
            return Err(IssueError::CsrNames {
                requested: requested.iter().map(ToString::to_string).collect(),
                in_csr: in_csr.iter().map(ToString::to_string).collect(),
            });
        }
        let mut params = leaf_params(request, now)?;
        if let Some(serial) = serial {
            params.serial_number = Some(parse_serial(serial)?);
        }
        let certificate = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(IssueError::Sign)?;
        Ok(issued(certificate, &params, None))
    }

    /// Generates a key of `request.key_algorithm` and issues a certificate for it.
    pub fn issue_with_generated_key(
        &self,
        request: &CertificateRequest,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, IssueError> {
        let params = leaf_params(request, now)?;
        let key = request
            .key_algorithm
            .generate()
            .map_err(|err| IssueError::KeyGeneration(request.key_algorithm, err))?;
        let certificate = params
            .signed_by(&key, &self.issuer)
            .map_err(IssueError::Sign)?;
        Ok(issued(
            certificate,
            &params,
            Some(PrivateKeyPem::new(key.serialize_pem())),
        ))
    }
}

fn issued(
    certificate: rcgen::Certificate,
    params: &CertificateParams,
    private_key: Option<PrivateKeyPem>,
) -> IssuedCertificate {
    IssuedCertificate {
        certificate_pem: certificate.pem(),
        certificate_der: certificate.der().clone(),
        serial: params
            .serial_number
            .as_ref()
            .map(|serial| hex(&serial.to_bytes()))
            .unwrap_or_default(),
        not_before: params.not_before,
        not_after: params.not_after,
        private_key,
    }
}

fn leaf_params(
    request: &CertificateRequest,
    now: OffsetDateTime,
) -> Result<CertificateParams, IssueError> {
    if request.duration <= time::Duration::ZERO {
        return Err(IssueError::Duration);
    }
    let names = request.subject_alt_names();
    if names.is_empty() {
        return Err(IssueError::NoNames);
    }
    let mut params = CertificateParams::default();
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, request.common_name.as_str());
    params.distinguished_name = subject;
    params.subject_alt_names = names
        .iter()
        .map(|name| {
            name.to_rcgen()
                .map_err(|_| IssueError::InvalidName(name.to_string()))
        })
        .collect::<Result<_, _>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    for usage in request.usage_set() {
        match usage {
            Usage::ServerAuth => params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth),
            Usage::ClientAuth => params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth),
            Usage::DigitalSignature => params.key_usages.push(KeyUsagePurpose::DigitalSignature),
            Usage::KeyEncipherment => params.key_usages.push(KeyUsagePurpose::KeyEncipherment),
        }
    }
    params.use_authority_key_identifier_extension = true;
    params.not_before = now;
    params.not_after = now + request.duration;
    params.serial_number = Some(random_serial());
    Ok(params)
}

/// A random positive 128-bit serial: unique without any state to persist.
pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive, and no leading zero byte, so the DER encoding is exactly these 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// A fresh random serial as lower-case hex (see [`random_serial`]).
pub fn new_serial() -> String {
    hex(&random_serial().to_bytes())
}

/// A hex serial as rcgen's type.
fn parse_serial(serial: &str) -> Result<SerialNumber, IssueError> {
    let bad = || IssueError::Serial(serial.to_owned());
    if serial.is_empty() || !serial.len().is_multiple_of(2) || serial.len() > 40 {
        return Err(bad());
    }
    let bytes = (0..serial.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&serial[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| bad())?;
    Ok(SerialNumber::from_slice(&bytes))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The first certificate of a PEM text, DER.
pub fn pem_certificate_der(pem_text: &str) -> Option<CertificateDer<'static>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem_text.as_bytes()).ok()?;
    (pem.label == "CERTIFICATE").then(|| CertificateDer::from(pem.contents))
}
