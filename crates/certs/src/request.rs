use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use rcgen::{KeyPair, RsaKeySize, SanType};
use serde::{Deserialize, Serialize};

/// Algorithm of a generated key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyAlgorithm {
    EcdsaP256,
    EcdsaP384,
    Ed25519,
    Rsa2048,
    Rsa3072,
}

impl KeyAlgorithm {
    pub const ALL: [KeyAlgorithm; 5] = [
        KeyAlgorithm::EcdsaP256,
        KeyAlgorithm::EcdsaP384,
        KeyAlgorithm::Ed25519,
        KeyAlgorithm::Rsa2048,
        KeyAlgorithm::Rsa3072,
    ];

    /// A fresh key pair of this algorithm.
    pub fn generate(self) -> Result<KeyPair, rcgen::Error> {
        match self {
            KeyAlgorithm::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            KeyAlgorithm::EcdsaP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
            KeyAlgorithm::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519),
            KeyAlgorithm::Rsa2048 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_2048)
            }
            KeyAlgorithm::Rsa3072 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_3072)
            }
        }
    }
}

/// What a certificate may be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Usage {
    ServerAuth,
    ClientAuth,
    DigitalSignature,
    KeyEncipherment,
}

/// One subject alternative name, normalised for comparison (DNS names in lower case).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SubjectAltName {
    Dns(String),
    Ip(IpAddr),
    Uri(String),
}

impl fmt::Display for SubjectAltName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubjectAltName::Dns(name) => write!(f, "DNS:{name}"),
            SubjectAltName::Ip(ip) => write!(f, "IP:{ip}"),
            SubjectAltName::Uri(uri) => write!(f, "URI:{uri}"),
        }
    }
}

impl SubjectAltName {
    /// The rcgen form; an error for a name that is not a valid IA5 string.
    pub(crate) fn to_rcgen(&self) -> Result<SanType, rcgen::Error> {
        Ok(match self {
            SubjectAltName::Dns(name) => SanType::DnsName(name.as_str().try_into()?),
            SubjectAltName::Ip(ip) => SanType::IpAddress(*ip),
            SubjectAltName::Uri(uri) => SanType::URI(uri.as_str().try_into()?),
        })
    }

    /// The normalised form of an rcgen SAN; other kinds (e-mail, otherName) are kept as
    /// a URI-like marker so they never compare equal to a requested name.
    pub(crate) fn from_rcgen(san: &SanType) -> SubjectAltName {
        match san {
            SanType::DnsName(name) => SubjectAltName::Dns(name.as_str().to_ascii_lowercase()),
            SanType::IpAddress(ip) => SubjectAltName::Ip(*ip),
            SanType::URI(uri) => SubjectAltName::Uri(uri.as_str().to_owned()),
            other => SubjectAltName::Uri(format!("other:{other:?}")),
        }
    }
}

/// A leaf certificate to issue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateRequest {
    pub common_name: String,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    pub uris: Vec<String>,
    /// Lifetime from the moment of issue.
    pub duration: time::Duration,
    pub usages: Vec<Usage>,
    /// Algorithm of the key the issuer generates; ignored for a CSR.
    pub key_algorithm: KeyAlgorithm,
}

impl CertificateRequest {
    /// A server certificate for `dns_names` with the usual usages.
    pub fn server(common_name: &str, dns_names: &[&str], duration: time::Duration) -> Self {
        Self {
            common_name: common_name.to_owned(),
            dns_names: dns_names.iter().map(|name| (*name).to_owned()).collect(),
            ip_addresses: Vec::new(),
            uris: Vec::new(),
            duration,
            usages: vec![Usage::ServerAuth, Usage::DigitalSignature],
            key_algorithm: KeyAlgorithm::EcdsaP256,
        }
    }

    /// Every requested SAN, normalised.
    pub fn subject_alt_names(&self) -> BTreeSet<SubjectAltName> {
        self.dns_names
            .iter()
            .map(|name| SubjectAltName::Dns(name.to_ascii_lowercase()))
            .chain(self.ip_addresses.iter().map(|ip| SubjectAltName::Ip(*ip)))
            .chain(self.uris.iter().map(|uri| SubjectAltName::Uri(uri.clone())))
            .collect()
    }

    pub(crate) fn usage_set(&self) -> BTreeSet<Usage> {
        self.usages.iter().copied().collect()
    }
}
