//! Helpers shared by the envelope tests and the bench.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use leasehold_envelope::{
    EncryptionContext, KeyEncryptionKey, Keyring, KeyringSettings, KmsKey, KmsSettings,
    KmsTimeouts, LocalKey,
};
use leasehold_testkit::MotoServer;
use prometheus_client::registry::Registry;

/// The context of one lease's credential versions.
pub fn lease_ctx(lease: &str) -> EncryptionContext {
    EncryptionContext::new()
        .with("namespace", "payments")
        .with("lease", lease)
        .with("kind", "versions")
}

pub fn local_key(byte: u8) -> Arc<LocalKey> {
    Arc::new(LocalKey::from_bytes([byte; 32]))
}

pub fn settings() -> KeyringSettings {
    KeyringSettings {
        data_key_cache_ttl: Duration::from_secs(300),
        data_key_cache_capacity: 64,
    }
}

/// A keyring and the registry its metrics are in.
pub fn keyring_with_registry(
    primary: Arc<dyn KeyEncryptionKey>,
    decrypt_only: Vec<Arc<dyn KeyEncryptionKey>>,
    settings: KeyringSettings,
) -> (Keyring, Registry) {
    let keyring = Keyring::new(primary, decrypt_only, settings);
    let mut registry = Registry::default();
    keyring.register_metrics(&mut registry);
    (keyring, registry)
}

/// Short timeouts so outage tests finish in about a second.
pub fn quick_timeouts() -> KmsTimeouts {
    KmsTimeouts {
        connect: Duration::from_millis(500),
        attempt: Duration::from_millis(700),
        operation: Duration::from_secs(3),
        max_attempts: 2,
    }
}

pub async fn kms_key(moto: &MotoServer, key_id: &str, timeouts: KmsTimeouts) -> Arc<KmsKey> {
    let settings = KmsSettings {
        key_id: key_id.to_owned(),
        region: Some(MotoServer::REGION.to_owned()),
        endpoint_url: Some(moto.endpoint_url()),
        timeouts,
    };
    Arc::new(
        KmsKey::connect_with(settings, moto.config_loader())
            .await
            .unwrap(),
    )
}

/// The registry in the text exposition format.
pub fn encoded(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text
}

/// Sum of the samples of `name` whose labels include all of `labels`.
pub fn metric(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = encoded(registry);
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, parse_labels(rest.trim_end_matches('}'))),
            None => (series, BTreeMap::new()),
        };
        if series_name == name
            && labels
                .iter()
                .all(|(k, v)| series_labels.get(*k).map(String::as_str) == Some(*v))
        {
            sum += value.parse::<f64>().unwrap();
        }
    }
    sum
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    text.split(',')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect()
}

/// KMS (or local key) calls of one operation, any outcome.
pub fn calls(registry: &Registry, operation: &str) -> f64 {
    metric(
        registry,
        "leasehold_kms_requests_total",
        &[("operation", operation)],
    )
}
