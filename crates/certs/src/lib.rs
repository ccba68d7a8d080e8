//! Certificate issuing for leasehold, with no Kubernetes and no I/O beyond loopback.
//!
//! - [`CertificateAuthority`]: the `ca` issuer. Loads a CA (or generates a self-signed one)
//!   and issues leaf certificates from a CSR (the key stays on the node) or with a key it
//!   generates itself (Secret delivery).
//! - [`RevocationList`]: revoked serials, and the signed CRL with its refresh time.
//! - [`verify`]: the checks run before a certificate is handed out, including a real TLS
//!   handshake on loopback.
//!
//! Private keys live in [`PrivateKeyPem`], whose `Debug` is redacted; no error carries key
//! material.

#![forbid(unsafe_code)]

mod ca;
mod crl;
pub mod issuer;
mod key;
mod request;
pub mod verify;

pub use ca::{
    CaError, CertificateAuthority, IssueError, IssuedCertificate, new_serial,
    pem_certificate_der as first_certificate_der,
};
pub use crl::{CrlError, RevocationEntry, RevocationList, RevocationReason, SignedCrl};
pub use issuer::{
    CaIssuer, CertificateIssuer, IssueOrder, IssuedChain, IssuerError, MemoryLedger, OrderJournal,
    RevocationLedger, RevokeOrder, csr_for, generate_key,
};
pub use key::PrivateKeyPem;
pub use request::{CertificateRequest, KeyAlgorithm, SubjectAltName, Usage};
