//! The broker's TLS: a CA and serving certificate generated on first start
//! (or a user-provided Secret), hot-swapped on renewal.
//!
//! Generated material lives in one Secret (`ca.crt`, `ca.key`, `tls.crt`,
//! `tls.key`), created with a plain create so that two replicas racing at
//! start agree (the loser reads the winner's). The CA is published in a
//! ConfigMap (`ca.crt`) that the node drivers mount. The serving certificate
//! is renewed from the same CA when less than a third of its life is left.
//!
//! The private keys (`ca.key`, `tls.key`) of the generated Secret are
//! envelope-encrypted with the controller's keyring ([`key_field`]; the Secret
//! is labelled [`SEALED_LABEL`] `broker-tls`). A Secret written before that
//! (plaintext keys) still loads and is sealed as soon as it is read. A
//! user-provided Secret ([`BrokerTls::from_secret`]) is the user's: read as it
//! is, never sealed.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use leasehold_envelope::secret::{SEALED_LABEL, SealedKind, SecretField};
use leasehold_envelope::{EnvelopeError, Keyring};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use secrecy::{ExposeSecret, SecretString};
use tracing::{info, warn};

use crate::consumers::FIELD_MANAGER;

/// Secret key of the CA certificate.
pub const CA_CERT_KEY: &str = "ca.crt";
/// Secret key of the CA private key (generated Secrets only).
pub const CA_KEY_KEY: &str = "ca.key";
/// Secret key of the serving certificate.
pub const TLS_CERT_KEY: &str = "tls.crt";
/// Secret key of the serving private key.
pub const TLS_KEY_KEY: &str = "tls.key";
/// Annotation with the serving certificate's `notBefore` (RFC 3339).
pub const NOT_BEFORE_ANNOTATION: &str = "leasehold.dev/not-before";
/// Annotation with the serving certificate's `notAfter` (RFC 3339).
pub const NOT_AFTER_ANNOTATION: &str = "leasehold.dev/not-after";

const CA_COMMON_NAME: &str = "leasehold-broker-ca";

/// TLS failures. Never carry key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Generating a key or certificate failed.
    #[error("cannot generate {what}: {source}")]
    Generate {
        /// What was generated.
        what: &'static str,
        /// Cause.
        #[source]
        source: rcgen::Error,
    },
    /// The PEM or key material is unusable.
    #[error("invalid TLS material: {0}")]
    Invalid(String),
    /// An API-server call failed.
    #[error("{what}: {source}")]
    Kube {
        /// What was being done.
        what: &'static str,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Sealing or opening a private key failed; the message starts with the reason
    /// (`KeyUnavailable`, `KeyRefused`, `Tampered`, ...).
    #[error("{}: {what}: {source}", source.reason())]
    Key {
        /// What was being done.
        what: &'static str,
        /// Cause.
        #[source]
        source: EnvelopeError,
    },
}

impl TlsError {
    /// Whether retrying later may succeed without anyone acting (the key
    /// encryption key is unreachable for now).
    pub fn is_transient(&self) -> bool {
        matches!(self, TlsError::Key { source, .. } if source.is_transient())
    }
}

/// How long [`BrokerTls::ensure`] waits before its `attempt`-th (0-based) retry
/// while the key encryption key is unavailable: 1 s, doubling, at most a minute.
pub fn key_retry_delay(attempt: u32) -> Duration {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(60);
    FIRST
        .checked_mul(2u32.saturating_pow(attempt))
        .map_or(MAX, |d| d.min(MAX))
}

fn kube_err(what: &'static str) -> impl FnOnce(kube::Error) -> TlsError {
    move |source| TlsError::Kube { what, source }
}

/// PEM certificate and key. `Debug` hides the key.
#[derive(Clone)]
pub struct CertPem {
    /// Certificate (chain), PEM.
    pub cert: String,
    /// Private key, PEM.
    pub key: SecretString,
}

impl std::fmt::Debug for CertPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertPem")
            .field("cert_len", &self.cert.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// A serving certificate with its validity.
#[derive(Debug, Clone)]
pub struct ServingCert {
    /// Certificate and key.
    pub pem: CertPem,
    /// `notBefore`.
    pub not_before: Timestamp,
    /// `notAfter`.
    pub not_after: Timestamp,
}

/// The DNS names of a Service: `svc`, `svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local`.
pub fn service_dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// Whether a certificate valid from `not_before` to `not_after` has less
/// than a third of its life left at `now`.
pub fn needs_renewal(not_before: Timestamp, not_after: Timestamp, now: Timestamp) -> bool {
    let life = not_after.as_second().saturating_sub(not_before.as_second());
    now.as_second() >= not_after.as_second().saturating_sub(life / 3)
}

fn set_validity(params: &mut CertificateParams, not_before: Timestamp, not_after: Timestamp) {
    let at = |t: Timestamp| {
        let secs = u64::try_from(t.as_second()).unwrap_or(0);
        rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(secs)
    };
    params.not_before = at(not_before);
    params.not_after = at(not_after);
}

fn ca_params() -> Result<CertificateParams, TlsError> {
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(|source| TlsError::Generate {
            what: "CA parameters",
            source,
        })?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn shift(t: Timestamp, d: Duration, forward: bool) -> Timestamp {
    let d = jiff::SignedDuration::try_from(d).unwrap_or(jiff::SignedDuration::ZERO);
    let r = if forward {
        t.checked_add(d)
    } else {
        t.checked_sub(d)
    };
    r.unwrap_or(t)
}

/// A new self-signed CA valid for `validity` from `now`.
pub fn generate_ca(now: Timestamp, validity: Duration) -> Result<CertPem, TlsError> {
    let key = KeyPair::generate().map_err(|source| TlsError::Generate {
        what: "CA key",
        source,
    })?;
    let mut params = ca_params()?;
    set_validity(
        &mut params,
        shift(now, Duration::from_secs(300), false),
        shift(now, validity, true),
    );
    let cert = params
        .self_signed(&key)
        .map_err(|source| TlsError::Generate {
            what: "CA certificate",
            source,
        })?;
    Ok(CertPem {
        cert: cert.pem(),
        key: SecretString::from(key.serialize_pem()),
    })
}

/// A serving certificate for `dns_names`, signed by the CA whose key is
/// `ca_key_pem` (a CA made by [`generate_ca`]).
pub fn issue_serving_cert(
    ca_key_pem: &SecretString,
    dns_names: &[String],
    now: Timestamp,
    validity: Duration,
) -> Result<ServingCert, TlsError> {
    let ca_key = KeyPair::from_pem(ca_key_pem.expose_secret())
        .map_err(|_| TlsError::Invalid("the CA key cannot be read".into()))?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    let key = KeyPair::generate().map_err(|source| TlsError::Generate {
        what: "serving key",
        source,
    })?;
    let mut params =
        CertificateParams::new(dns_names.to_vec()).map_err(|source| TlsError::Generate {
            what: "serving certificate parameters",
            source,
        })?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        dns_names
            .first()
            .map(String::as_str)
            .unwrap_or("leasehold-broker"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let not_before = shift(now, Duration::from_secs(300), false);
    let not_after = shift(now, validity, true);
    set_validity(&mut params, not_before, not_after);
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|source| TlsError::Generate {
            what: "serving certificate",
            source,
        })?;
    Ok(ServingCert {
        pem: CertPem {
            cert: cert.pem(),
            key: SecretString::from(key.serialize_pem()),
        },
        // Whole seconds, as in the certificate.
        not_before: Timestamp::from_second(not_before.as_second()).unwrap_or(not_before),
        not_after: Timestamp::from_second(not_after.as_second()).unwrap_or(not_after),
    })
}

/// A rustls certified key from PEM.
pub fn certified_key(pem: &CertPem) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(pem.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid(format!("certificate PEM: {e}")))?;
    if chain.is_empty() {
        return Err(TlsError::Invalid("no certificate in the PEM".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(pem.key.expose_secret().as_bytes())
        .map_err(|_| TlsError::Invalid("the private key PEM cannot be read".into()))?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, key, &provider)
        .map(Arc::new)
        .map_err(|e| TlsError::Invalid(format!("certificate and key: {e}")))
}

/// Hands rustls whatever certificate is current.
#[derive(Debug)]
struct CertSlot(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// Where [`BrokerTls::ensure`] keeps and publishes its material.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// Namespace of the broker (Secret, ConfigMap, Service).
    pub namespace: String,
    /// Name of the broker's Service (for the certificate's DNS names).
    pub service: String,
    /// Secret holding the generated CA and serving certificate.
    pub secret_name: String,
    /// ConfigMap where the CA is published (key `ca.crt`).
    pub configmap_name: String,
    /// Lifetime of a generated CA.
    pub ca_validity: Duration,
    /// Lifetime of a generated serving certificate.
    pub serving_validity: Duration,
}

impl TlsSettings {
    /// CA for 10 years, serving certificates for 90 days.
    pub fn new(
        namespace: impl Into<String>,
        service: impl Into<String>,
        secret_name: impl Into<String>,
        configmap_name: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            service: service.into(),
            secret_name: secret_name.into(),
            configmap_name: configmap_name.into(),
            ca_validity: Duration::from_secs(10 * 365 * 24 * 3600),
            serving_validity: Duration::from_secs(90 * 24 * 3600),
        }
    }

    /// The serving certificate's DNS names.
    pub fn dns_names(&self) -> Vec<String> {
        service_dns_names(&self.service, &self.namespace)
    }
}

/// The broker's serving certificate, swappable while serving.
#[derive(Clone, Debug)]
pub struct BrokerTls {
    slot: Arc<CertSlot>,
    ca_pem: Option<String>,
}

fn secret_text(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
}

fn annotation_time(secret: &Secret, key: &str) -> Option<Timestamp> {
    secret.metadata.annotations.as_ref()?.get(key)?.parse().ok()
}

/// Where the private key `field` (`ca.key` or `tls.key`) of the generated
/// Secret is sealed: bound to that Secret and field.
pub fn key_field<'a>(settings: &'a TlsSettings, field: &'a str) -> SecretField<'a> {
    SecretField {
        kind: SealedKind::BrokerTls,
        namespace: &settings.namespace,
        secret: &settings.secret_name,
        field,
    }
}

/// The private keys of the generated Secret as stored (sealed, or plaintext
/// with an unencrypted keyring).
struct StoredKeys {
    ca_key: ByteString,
    tls_key: ByteString,
}

impl StoredKeys {
    async fn seal(
        keyring: &Keyring,
        settings: &TlsSettings,
        ca: &CertPem,
        serving: &ServingCert,
    ) -> Result<Self, TlsError> {
        let seal = |field, key: &SecretString| {
            let at = key_field(settings, field);
            let key = key.clone();
            async move {
                at.seal(keyring, key.expose_secret().as_bytes())
                    .await
                    .map_err(|source| TlsError::Key {
                        what: "cannot encrypt a broker TLS key",
                        source,
                    })
            }
        };
        Ok(Self {
            ca_key: seal(CA_KEY_KEY, &ca.key).await?,
            tls_key: seal(TLS_KEY_KEY, &serving.pem.key).await?,
        })
    }
}

/// The private key `field` of the generated Secret `secret`, opened (a
/// plaintext key from before sealing reads as it is).
async fn open_key(
    keyring: &Keyring,
    settings: &TlsSettings,
    secret: &Secret,
    field: &str,
) -> Result<SecretString, TlsError> {
    let stored = secret
        .data
        .as_ref()
        .and_then(|d| d.get(field))
        .ok_or_else(|| {
            TlsError::Invalid(format!("Secret {} has no {field}", settings.secret_name))
        })?;
    let plain = key_field(settings, field)
        .open(keyring, &stored.0)
        .await
        .map_err(|source| TlsError::Key {
            what: "cannot decrypt a broker TLS key",
            source,
        })?;
    std::str::from_utf8(&plain)
        .map(SecretString::from)
        .map_err(|_| {
            TlsError::Invalid(format!(
                "{field} in Secret {} is not PEM",
                settings.secret_name
            ))
        })
}

/// Whether a key field of `secret` should be sealed again (plaintext from
/// before sealing, or sealed under another key than the keyring's primary).
fn keys_need_rewrap(keyring: &Keyring, secret: &Secret) -> bool {
    let Some(data) = secret.data.as_ref() else {
        return false;
    };
    [CA_KEY_KEY, TLS_KEY_KEY]
        .iter()
        .filter_map(|k| data.get(*k))
        .any(|v| keyring.needs_rewrap(&v.0))
}

fn generated_secret(
    settings: &TlsSettings,
    ca: &CertPem,
    serving: &ServingCert,
    keys: StoredKeys,
) -> Secret {
    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    Secret {
        metadata: ObjectMeta {
            name: Some(settings.secret_name.clone()),
            namespace: Some(settings.namespace.clone()),
            annotations: Some(BTreeMap::from([
                (
                    NOT_BEFORE_ANNOTATION.to_owned(),
                    serving.not_before.to_string(),
                ),
                (
                    NOT_AFTER_ANNOTATION.to_owned(),
                    serving.not_after.to_string(),
                ),
            ])),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    "leasehold".to_owned(),
                ),
                (
                    SEALED_LABEL.to_owned(),
                    SealedKind::BrokerTls.as_str().to_owned(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([
            (CA_CERT_KEY.to_owned(), bytes(&ca.cert)),
            (CA_KEY_KEY.to_owned(), keys.ca_key),
            (TLS_CERT_KEY.to_owned(), bytes(&serving.pem.cert)),
            (TLS_KEY_KEY.to_owned(), keys.tls_key),
        ])),
        ..Secret::default()
    }
}

impl BrokerTls {
    /// From PEM material (`ca_pem` only to report it).
    pub fn from_pem(pem: &CertPem, ca_pem: Option<String>) -> Result<Self, TlsError> {
        Ok(Self {
            slot: Arc::new(CertSlot(RwLock::new(certified_key(pem)?))),
            ca_pem,
        })
    }

    /// The CA that signed the serving certificate, when known.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// Swaps in a new serving certificate; new connections use it.
    pub fn reload(&self, pem: &CertPem) -> Result<(), TlsError> {
        let key = certified_key(pem)?;
        *self.slot.0.write().unwrap_or_else(|e| e.into_inner()) = key;
        Ok(())
    }

    /// A rustls server configuration (TLS 1.2+, ALPN `h2`) serving the current certificate.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider: Arc<CryptoProvider> = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid(format!("protocol versions: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(self.slot.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// A user-provided Secret with `tls.crt`, `tls.key` and optionally `ca.crt`.
    pub async fn from_secret(
        client: kube::Client,
        namespace: &str,
        name: &str,
    ) -> Result<Self, TlsError> {
        let secret = Api::<Secret>::namespaced(client, namespace)
            .get(name)
            .await
            .map_err(kube_err("cannot read the broker TLS Secret"))?;
        let missing = |k: &str| TlsError::Invalid(format!("Secret {namespace}/{name} has no {k}"));
        let pem = CertPem {
            cert: secret_text(&secret, TLS_CERT_KEY).ok_or_else(|| missing(TLS_CERT_KEY))?,
            key: SecretString::from(
                secret_text(&secret, TLS_KEY_KEY).ok_or_else(|| missing(TLS_KEY_KEY))?,
            ),
        };
        Self::from_pem(&pem, secret_text(&secret, CA_CERT_KEY))
    }

    /// Makes sure the generated Secret exists, its keys are sealed with
    /// `keyring` and its serving certificate is fresh, publishes the CA, and
    /// returns the serving certificate.
    ///
    /// While the key encryption key is unavailable (KMS unreachable: a
    /// transient error) it waits and retries ([`key_retry_delay`]), logging a
    /// warning; any other failure (key refused, keys tampered with, API errors)
    /// is returned.
    pub async fn ensure(
        client: kube::Client,
        settings: &TlsSettings,
        keyring: &Keyring,
    ) -> Result<Self, TlsError> {
        let mut attempt = 0;
        let (pem, ca) = loop {
            match ensure_secret(&client, settings, keyring).await {
                Err(e) if e.is_transient() => {
                    let delay = key_retry_delay(attempt);
                    warn!(error = %e, retry_in = ?delay, "broker TLS: waiting for the key encryption key");
                    tokio::time::sleep(delay).await;
                    attempt = attempt.saturating_add(1);
                }
                done => break done?,
            }
        };
        publish_ca(&client, settings, &ca).await?;
        Self::from_pem(&pem, Some(ca))
    }

    /// Re-checks the generated Secret every `period` (renewing and sealing as
    /// [`BrokerTls::ensure`] does) and swaps in the serving certificate it finds
    /// (renewed by this replica or another).
    pub fn spawn_renewal(
        &self,
        client: kube::Client,
        settings: TlsSettings,
        keyring: Arc<Keyring>,
        period: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let tls = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                match ensure_secret(&client, &settings, &keyring).await {
                    Ok((pem, ca)) => {
                        if let Err(e) = tls.reload(&pem) {
                            warn!(error = %e, "cannot load the renewed broker certificate");
                        }
                        if let Err(e) = publish_ca(&client, &settings, &ca).await {
                            warn!(error = %e, "cannot publish the broker CA");
                        }
                    }
                    Err(e) if e.is_transient() => {
                        warn!(error = %e, "broker TLS: waiting for the key encryption key; the current certificate stays in use");
                    }
                    Err(e) => warn!(error = %e, "cannot check the broker certificate"),
                }
            }
        })
    }
}

/// Returns the serving certificate and the CA PEM, creating, renewing or
/// sealing them as needed.
async fn ensure_secret(
    client: &kube::Client,
    settings: &TlsSettings,
    keyring: &Keyring,
) -> Result<(CertPem, String), TlsError> {
    let api = Api::<Secret>::namespaced(client.clone(), &settings.namespace);
    for _ in 0..5 {
        let now = Timestamp::now();
        let Some(existing) = api
            .get_opt(&settings.secret_name)
            .await
            .map_err(kube_err("cannot read the broker TLS Secret"))?
        else {
            let ca = generate_ca(now, settings.ca_validity)?;
            let serving = issue_serving_cert(
                &ca.key,
                &settings.dns_names(),
                now,
                settings.serving_validity,
            )?;
            let keys = StoredKeys::seal(keyring, settings, &ca, &serving).await?;
            match api
                .create(
                    &PostParams::default(),
                    &generated_secret(settings, &ca, &serving, keys),
                )
                .await
            {
                Ok(_) => {
                    info!(secret = %settings.secret_name, "generated the broker CA and certificate");
                    return Ok((serving.pem, ca.cert));
                }
                // Another replica won the race: use what it stored.
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(kube_err("cannot create the broker TLS Secret")(e)),
            }
        };
        let text = |k: &str| {
            secret_text(&existing, k).ok_or_else(|| {
                TlsError::Invalid(format!("Secret {} has no {k}", settings.secret_name))
            })
        };
        let ca = CertPem {
            cert: text(CA_CERT_KEY)?,
            key: open_key(keyring, settings, &existing, CA_KEY_KEY).await?,
        };
        let current = CertPem {
            cert: text(TLS_CERT_KEY)?,
            key: open_key(keyring, settings, &existing, TLS_KEY_KEY).await?,
        };
        let validity = match (
            annotation_time(&existing, NOT_BEFORE_ANNOTATION),
            annotation_time(&existing, NOT_AFTER_ANNOTATION),
        ) {
            (Some(nb), Some(na)) if !needs_renewal(nb, na, now) => Some((nb, na)),
            _ => None,
        };
        let (serving, done) = match validity {
            // Fresh and sealed under the primary key: nothing to write.
            Some(_) if !keys_need_rewrap(keyring, &existing) => return Ok((current, ca.cert)),
            // Fresh, but its keys are plaintext (written before sealing) or
            // sealed under an old key: seal them now, same certificates.
            Some((not_before, not_after)) => (
                ServingCert {
                    pem: current,
                    not_before,
                    not_after,
                },
                "sealed the broker TLS keys",
            ),
            None => (
                issue_serving_cert(
                    &ca.key,
                    &settings.dns_names(),
                    now,
                    settings.serving_validity,
                )?,
                "renewed the broker certificate",
            ),
        };
        let keys = StoredKeys::seal(keyring, settings, &ca, &serving).await?;
        let mut renewed = generated_secret(settings, &ca, &serving, keys);
        // Optimistic concurrency: only replace what we read.
        renewed.metadata.resource_version = existing.metadata.resource_version.clone();
        match api
            .replace(&settings.secret_name, &PostParams::default(), &renewed)
            .await
        {
            Ok(_) => {
                info!(secret = %settings.secret_name, not_after = %serving.not_after, "{done}");
                return Ok((serving.pem, ca.cert));
            }
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(kube_err("cannot write the broker TLS Secret")(e)),
        }
    }
    Err(TlsError::Invalid(
        "the broker TLS Secret kept changing; giving up for now".into(),
    ))
}

async fn publish_ca(
    client: &kube::Client,
    settings: &TlsSettings,
    ca_pem: &str,
) -> Result<(), TlsError> {
    let body = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": settings.configmap_name,
            "namespace": settings.namespace,
            "labels": {"app.kubernetes.io/managed-by": "leasehold"},
        },
        "data": { CA_CERT_KEY: ca_pem },
    });
    Api::<ConfigMap>::namespaced(client.clone(), &settings.namespace)
        .patch(
            &settings.configmap_name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
        .map_err(kube_err("cannot publish the broker CA"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_at_two_thirds() {
        let nb = Timestamp::from_second(0).unwrap_or(Timestamp::UNIX_EPOCH);
        let na = Timestamp::from_second(300).unwrap_or(Timestamp::UNIX_EPOCH);
        let at = |s| Timestamp::from_second(s).unwrap_or(Timestamp::UNIX_EPOCH);
        assert!(!needs_renewal(nb, na, at(199)));
        assert!(needs_renewal(nb, na, at(200)));
        assert!(needs_renewal(nb, na, at(400)));
    }

    #[test]
    fn waits_for_the_key_with_capped_backoff() {
        let secs: Vec<u64> = (0..9).map(|a| key_retry_delay(a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(key_retry_delay(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn only_an_unavailable_key_is_transient() {
        let key = |source| TlsError::Key {
            what: "cannot decrypt a broker TLS key",
            source,
        };
        let unavailable = key(EnvelopeError::KeyUnavailable {
            key_id: "k".into(),
            operation: "decrypt",
            detail: "timeout".into(),
        });
        assert!(unavailable.is_transient());
        assert!(unavailable.to_string().starts_with("KeyUnavailable: "));
        let refused = key(EnvelopeError::KeyRefused {
            key_id: "k".into(),
            operation: "decrypt",
            detail: "DisabledException".into(),
        });
        assert!(!refused.is_transient());
        assert!(refused.to_string().starts_with("KeyRefused: "));
        assert!(!TlsError::Invalid("x".into()).is_transient());
    }
}
