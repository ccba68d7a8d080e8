//! Flags for the key encryption key and the audit trail (controller and `rekey`).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use leasehold_audit::{AuditSettings, Sink};
use leasehold_envelope::{KeyringSettings, KmsSettings};
use leasehold_operator::keys::{KeyConfig, KeySource};

/// How stored secret material is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EncryptionMode {
    /// Data keys from AWS KMS (GenerateDataKey/Decrypt), bound to where each value is stored.
    Kms,
    /// A local 256-bit key (in a Secret or a file) wraps the data keys.
    Local,
    /// No encryption: credential versions, per-pod records and generated keys are stored
    /// in clear in Secrets (readable by anyone who can read Secrets or etcd backups).
    None,
}

/// The key encryption key.
#[derive(Debug, Clone, Args)]
pub struct EncryptionArgs {
    /// How stored secret material (credential versions, per-pod records, the broker CA
    /// key, ACME account keys, generated CA keys) is encrypted. `none` must be chosen
    /// explicitly.
    #[arg(long, value_enum, env = "LEASEHOLD_ENCRYPTION")]
    pub encryption: EncryptionMode,
    /// KMS key id, ARN or alias (`alias/…`), with `--encryption kms`.
    #[arg(long, value_name = "ID", required_if_eq("encryption", "kms"))]
    pub kms_key_id: Option<String>,
    /// AWS region of the KMS key (default: from the environment / instance).
    #[arg(long, value_name = "REGION")]
    pub kms_region: Option<String>,
    /// Another KMS endpoint (a VPC endpoint, or a test server).
    #[arg(long, value_name = "URL")]
    pub kms_endpoint_url: Option<String>,
    /// With `--encryption local`: the Secret (in the controller's namespace) holding the
    /// key under `key`.
    #[arg(long, value_name = "NAME", conflicts_with = "local_key_file")]
    pub local_key_secret: Option<String>,
    /// Create the local key Secret with a new random key if it does not exist.
    #[arg(long)]
    pub local_key_secret_create: bool,
    /// With `--encryption local`: a file holding the key (32 bytes, or their base64).
    #[arg(long, value_name = "PATH")]
    pub local_key_file: Option<PathBuf>,
    /// An earlier local key (file) that may still open values (during a rekey). Repeatable.
    #[arg(long, value_name = "PATH")]
    pub decrypt_key_file: Vec<PathBuf>,
    /// An earlier local key (Secret in the controller's namespace) that may still open
    /// values. Repeatable.
    #[arg(long, value_name = "NAME")]
    pub decrypt_key_secret: Vec<String>,
    /// Values sealed under KMS keys may still be opened (moving from KMS to a local key
    /// or to none): give any KMS key id the credentials can use; KMS finds the key from
    /// each value.
    #[arg(long, value_name = "ID")]
    pub decrypt_kms_key_id: Option<String>,
    /// How long a decrypted data key is kept in memory (bounds the KMS call rate; a
    /// disabled key takes effect within this time).
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub data_key_cache_ttl_seconds: u64,
}

impl EncryptionArgs {
    /// The key configuration; `namespace` is where key Secrets live.
    pub fn key_config(&self, namespace: &str) -> Result<KeyConfig, String> {
        let kms = |id: &str| {
            let mut s = KmsSettings::new(id);
            s.region = self.kms_region.clone();
            s.endpoint_url = self.kms_endpoint_url.clone();
            KeySource::Kms(s)
        };
        let primary = match self.encryption {
            EncryptionMode::None => None,
            EncryptionMode::Kms => Some(kms(self
                .kms_key_id
                .as_deref()
                .ok_or("--encryption kms needs --kms-key-id")?)),
            EncryptionMode::Local => Some(match (&self.local_key_secret, &self.local_key_file) {
                (Some(name), None) => KeySource::LocalSecret {
                    namespace: namespace.to_owned(),
                    name: name.clone(),
                    create: self.local_key_secret_create,
                },
                (None, Some(path)) => KeySource::LocalFile(path.clone()),
                _ => {
                    return Err(
                        "--encryption local needs --local-key-secret NAME or --local-key-file PATH"
                            .into(),
                    );
                }
            }),
        };
        let mut decrypt_only: Vec<KeySource> = self
            .decrypt_key_file
            .iter()
            .cloned()
            .map(KeySource::LocalFile)
            .collect();
        decrypt_only.extend(
            self.decrypt_key_secret
                .iter()
                .map(|name| KeySource::LocalSecret {
                    namespace: namespace.to_owned(),
                    name: name.clone(),
                    create: false,
                }),
        );
        if let Some(id) = &self.decrypt_kms_key_id {
            decrypt_only.push(kms(id));
        }
        Ok(KeyConfig {
            primary,
            decrypt_only,
            settings: KeyringSettings {
                data_key_cache_ttl: Duration::from_secs(self.data_key_cache_ttl_seconds),
                ..KeyringSettings::default()
            },
        })
    }
}

/// The audit trail.
#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    /// Write the audit trail (JSON lines, hash-chained, signed checkpoints) to this file,
    /// or `-` for standard output (logs go to standard error). Without it and without
    /// `--audit-webhook`, no audit trail is kept.
    #[arg(long, value_name = "PATH|-")]
    pub audit_log: Option<String>,
    /// Also POST the records (batches of JSON lines) to this URL; best effort.
    #[arg(long, value_name = "URL")]
    pub audit_webhook: Option<String>,
    /// Secret (controller's namespace) with the Ed25519 key that signs checkpoints;
    /// made if missing. Its `public-key.pem` is what `leasehold audit verify` needs.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "leasehold-audit-signing-key"
    )]
    pub audit_signing_key_secret: String,
    /// ConfigMap (controller's namespace) with the last checkpoint: the chain continues
    /// from it after a restart or a leader change.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "leasehold-audit-checkpoint"
    )]
    pub audit_checkpoint_configmap: String,
    /// A signed checkpoint after this many records (and at least once a minute).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub audit_checkpoint_every: u64,
}

impl AuditArgs {
    /// The audit configuration, or `None` when no sink is given.
    pub fn audit_config(&self, namespace: &str) -> Option<leasehold_operator::audit::AuditConfig> {
        let mut sinks = Vec::new();
        match self.audit_log.as_deref() {
            Some("-") => sinks.push(Sink::Stdout),
            Some(path) if !path.is_empty() => sinks.push(Sink::File(PathBuf::from(path))),
            _ => {}
        }
        if let Some(url) = &self.audit_webhook {
            sinks.push(Sink::Webhook { url: url.clone() });
        }
        if sinks.is_empty() {
            return None;
        }
        Some(leasehold_operator::audit::AuditConfig {
            sinks,
            namespace: namespace.to_owned(),
            signing_key_secret: self.audit_signing_key_secret.clone(),
            checkpoint_configmap: self.audit_checkpoint_configmap.clone(),
            settings: AuditSettings {
                checkpoint_every: self.audit_checkpoint_every.max(1),
                ..AuditSettings::default()
            },
        })
    }
}
