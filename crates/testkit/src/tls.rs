//! Test certificates: a throwaway CA and a server certificate it signed for the
//! loopback addresses the servers listen on.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// How a test server is started.
///
/// ```no_run
/// # async fn demo() {
/// use leasehold_testkit::{PostgresServer, ServerOptions};
/// let pg = PostgresServer::start_with(ServerOptions { tls: true, require_tls: true }).await;
/// let ca = pg.ca_pem().expect("started with TLS");
/// # let _ = ca;
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerOptions {
    /// Serve TLS with a certificate for `127.0.0.1` and `localhost`, signed by a CA
    /// made for this server alone (see `ca_pem()`). Plain TCP keeps working.
    pub tls: bool,
    /// Refuse plain TCP connections (implies `tls`). PostgreSQL: `hostssl` lines only
    /// in `pg_hba.conf`; MariaDB: `--require-secure-transport`.
    pub require_tls: bool,
}

impl ServerOptions {
    pub(crate) fn serves_tls(&self) -> bool {
        self.tls || self.require_tls
    }
}

/// A CA and a server certificate signed by it, all PEM.
#[derive(Debug, Clone)]
pub(crate) struct ServerCertificates {
    pub(crate) ca_pem: String,
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
}

impl ServerCertificates {
    /// Fresh keys and certificates for the loopback server names.
    pub(crate) fn generate() -> Self {
        let (ca, ca_pem) = new_ca("leasehold-testkit CA");
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("cannot generate a key: {e}"));
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .unwrap_or_else(|e| panic!("bad certificate names: {e}"));
        params
            .distinguished_name
            .push(DnType::CommonName, "leasehold-testkit server");
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &ca)
            .unwrap_or_else(|e| panic!("cannot sign the server certificate: {e}"));
        Self {
            ca_pem,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// The PEM certificate of a brand-new CA that signed nothing: a CA bundle any test
/// server's certificate fails to verify against.
pub fn unrelated_ca_pem() -> String {
    new_ca("leasehold-testkit unrelated CA").1
}

fn new_ca(name: &str) -> (CertifiedIssuer<'static, KeyPair>, String) {
    let key = KeyPair::generate().unwrap_or_else(|e| panic!("cannot generate a CA key: {e}"));
    let mut params = CertificateParams::new(Vec::<String>::new())
        .unwrap_or_else(|e| panic!("bad CA parameters: {e}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(params, key)
        .unwrap_or_else(|e| panic!("cannot self-sign the CA: {e}"));
    let pem = ca.pem();
    (ca, pem)
}

/// A rustls client configuration trusting only `ca_pem`, checking host names.
pub(crate) fn client_config(ca_pem: &str) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.unwrap_or_else(|e| panic!("bad CA PEM: {e}"));
        roots
            .add(cert)
            .unwrap_or_else(|e| panic!("unusable CA certificate: {e}"));
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| panic!("cannot set up TLS: {e}"))
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// mysql_async builds its rustls configuration with the process default provider:
/// make sure there is one (the build may enable more than one provider).
pub(crate) fn ensure_default_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
