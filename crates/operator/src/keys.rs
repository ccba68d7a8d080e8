//! The key encryption key of an installation, and `rekey`: every Secret leasehold
//! keeps secret material in (labelled `leasehold.dev/sealed`) rewrapped under the
//! current key.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::{Api, Client};
use leasehold_audit::{Action, AuditEvent, AuditLog, Outcome};
use leasehold_envelope::secret::{SEALED_LABEL, rewrap_secret};
use leasehold_envelope::{
    EnvelopeError, KeyEncryptionKey, Keyring, KeyringSettings, KmsKey, KmsSettings, LocalKey,
};

use crate::OperatorError;

/// Secret key holding a local key encryption key (32 bytes, raw or base64).
pub const LOCAL_KEY_KEY: &str = "key";

/// One key encryption key, as configured.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// An AWS KMS key (id, ARN or alias).
    Kms(KmsSettings),
    /// A local 256-bit key in a file.
    LocalFile(std::path::PathBuf),
    /// A local 256-bit key in a Secret of the controller's namespace (`create`: make
    /// one if it does not exist).
    LocalSecret {
        namespace: String,
        name: String,
        create: bool,
    },
}

/// What seals stored secret material: a primary key (or, explicitly, none) and old
/// keys that may still open values (while a rekey is under way).
#[derive(Debug, Clone)]
pub struct KeyConfig {
    /// `None`: stored unencrypted (the explicit opt-out).
    pub primary: Option<KeySource>,
    pub decrypt_only: Vec<KeySource>,
    pub settings: KeyringSettings,
}

fn key_error(what: &str, e: EnvelopeError) -> OperatorError {
    OperatorError::Config(format!("{what}: {e}"))
}

/// The local key in `namespace/name` (key `key`), made (32 random bytes) if it does not
/// exist and `create` is set.
pub async fn local_key_from_secret(
    client: &Client,
    namespace: &str,
    name: &str,
    create: bool,
) -> Result<(LocalKey, bool), OperatorError> {
    let api = Api::<Secret>::namespaced(client.clone(), namespace);
    let parse = |secret: &Secret| -> Result<LocalKey, OperatorError> {
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(LOCAL_KEY_KEY))
            .ok_or_else(|| {
                OperatorError::Config(format!(
                    "local key Secret {namespace}/{name} has no {LOCAL_KEY_KEY:?}: put a 256-bit key there (32 bytes, or their base64)"
                ))
            })?;
        LocalKey::parse(&bytes.0)
            .map_err(|e| key_error(&format!("local key Secret {namespace}/{name}"), e))
    };
    if let Some(secret) = api.get_opt(name).await? {
        return Ok((parse(&secret)?, false));
    }
    if !create {
        return Err(OperatorError::Config(format!(
            "local key Secret {namespace}/{name} does not exist: create it (key {LOCAL_KEY_KEY:?}, 32 random bytes) or pass --local-key-secret-create"
        )));
    }
    let key = LocalKey::generate().map_err(|e| key_error("cannot generate a local key", e))?;
    let data = BTreeMap::from([(
        LOCAL_KEY_KEY.to_owned(),
        ByteString(key.expose_base64().as_bytes().to_vec()),
    )]);
    match create_key_secret(&api, namespace, name, data).await? {
        None => Ok((key, true)),
        // Another replica made it first: use that one.
        Some(theirs) => Ok((parse(&theirs)?, false)),
    }
}

/// Create the Secret `namespace/name` holding a key the controller just made, or —
/// when another replica created it first — return that one (`Some`), whose key wins.
pub(crate) async fn create_key_secret(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
    data: BTreeMap<String, ByteString>,
) -> Result<Option<Secret>, OperatorError> {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "leasehold".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(data),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(None),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Some(api.get(name).await?)),
        Err(e) => Err(e.into()),
    }
}

async fn load(
    client: Option<&Client>,
    source: &KeySource,
) -> Result<Arc<dyn KeyEncryptionKey>, OperatorError> {
    Ok(match source {
        KeySource::Kms(settings) => Arc::new(
            KmsKey::connect(settings.clone())
                .await
                .map_err(|e| key_error("KMS key", e))?,
        ),
        KeySource::LocalFile(path) => Arc::new(
            LocalKey::from_file(path)
                .map_err(|e| key_error(&format!("local key file {}", path.display()), e))?,
        ),
        KeySource::LocalSecret {
            namespace,
            name,
            create,
        } => {
            let client = client.ok_or_else(|| {
                OperatorError::Config("a local key Secret needs a Kubernetes client".into())
            })?;
            let (key, generated) = local_key_from_secret(client, namespace, name, *create).await?;
            if generated {
                tracing::info!(secret = %format!("{namespace}/{name}"), key_id = %key.key_id(), "generated a local key encryption key");
            }
            Arc::new(key)
        }
    })
}

/// The keyring `config` describes.
pub async fn keyring(
    client: Option<&Client>,
    config: &KeyConfig,
) -> Result<Keyring, OperatorError> {
    let mut decrypt_only = Vec::new();
    for source in &config.decrypt_only {
        decrypt_only.push(load(client, source).await?);
    }
    match &config.primary {
        Some(source) => Ok(Keyring::new(
            load(client, source).await?,
            decrypt_only,
            config.settings,
        )),
        None if decrypt_only.is_empty() => Ok(Keyring::unencrypted()),
        // Unencrypted from now on, but values sealed before still open (rekey to plaintext).
        None => Ok(Keyring::unencrypted_opening(decrypt_only, config.settings)),
    }
}

/// What a rekey pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RekeyReport {
    /// Secrets with sealed fields looked at.
    pub secrets: usize,
    /// Secrets rewritten, with the fields rewrapped: `namespace/name` → fields.
    pub rewrapped: BTreeMap<String, Vec<String>>,
    /// Secrets that could not be rewrapped, with why (retried on the next pass).
    pub failed: BTreeMap<String, String>,
}

impl std::fmt::Display for RekeyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} Secret(s) with sealed fields, {} rewrapped, {} failed",
            self.secrets,
            self.rewrapped.len(),
            self.failed.len()
        )?;
        for (name, fields) in &self.rewrapped {
            writeln!(f, "  rewrapped {name}: {}", fields.join(", "))?;
        }
        for (name, why) in &self.failed {
            writeln!(f, "  FAILED {name}: {why}")?;
        }
        Ok(())
    }
}

/// Rewrap every sealed Secret in `namespaces` (empty: all) whose fields are not under
/// `keyring`'s primary key (plaintext included), each written with its
/// resourceVersion as a precondition: a Secret that changed meanwhile is skipped and
/// picked up by the next pass (its writer sealed it under the current key anyway).
/// Safe to run while the controller runs.
pub async fn rekey(
    client: &Client,
    keyring: &Keyring,
    namespaces: &[String],
    audit: &AuditLog,
) -> Result<RekeyReport, OperatorError> {
    let scopes: Vec<Api<Secret>> = if namespaces.is_empty() {
        vec![Api::all(client.clone())]
    } else {
        namespaces
            .iter()
            .map(|ns| Api::namespaced(client.clone(), ns))
            .collect()
    };
    let mut report = RekeyReport::default();
    for api in scopes {
        let secrets = api
            .list(&ListParams::default().labels(SEALED_LABEL))
            .await?;
        for secret in secrets {
            report.secrets += 1;
            let ns = secret.metadata.namespace.clone().unwrap_or_default();
            let name = secret.metadata.name.clone().unwrap_or_default();
            let at = format!("{ns}/{name}");
            let (data, done) = match rewrap_secret(keyring, &secret).await {
                Ok(Some(found)) => found,
                Ok(None) => continue,
                Err(e) => {
                    report.failed.insert(at, format!("{}: {e}", e.reason()));
                    continue;
                }
            };
            let mut updated = secret.clone();
            updated.data = Some(data);
            // A PUT carries the resourceVersion read: a concurrent change wins.
            match Api::<Secret>::namespaced(client.clone(), &ns)
                .replace(&name, &PostParams::default(), &updated)
                .await
            {
                Ok(_) => {
                    audit.record(
                        AuditEvent::new(Action::KeyRewrap, Outcome::Success)
                            .reason("sealed fields rewrapped under the current key")
                            .detail_kv("secret", &at)
                            .detail_kv("fields", done.fields.join(","))
                            .detail_kv(
                                "key_id",
                                keyring.primary_key_id().unwrap_or("none (unencrypted)"),
                            ),
                    );
                    report.rewrapped.insert(at, done.fields);
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    report
                        .failed
                        .insert(at, "changed meanwhile; the next pass retries".into());
                }
                Err(e) => {
                    report.failed.insert(at, e.to_string());
                }
            }
        }
    }
    Ok(report)
}
