//! Key-encryption keys for tests: one that is unavailable (KMS down) a number of
//! times before it works.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use leasehold_envelope::{
    DataKey, EncryptionContext, EnvelopeError, KeyEncryptionKey, Keyring, KeyringSettings, LocalKey,
};

/// A local key that answers `KeyUnavailable` to its first `outages` calls.
#[derive(Debug)]
pub(crate) struct FlakyKey {
    inner: LocalKey,
    outages: AtomicUsize,
}

impl FlakyKey {
    fn unavailable(&self, operation: &'static str) -> Result<(), EnvelopeError> {
        let down = self
            .outages
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if down {
            return Err(EnvelopeError::KeyUnavailable {
                key_id: self.inner.key_id().to_owned(),
                operation,
                detail: "connection refused".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl KeyEncryptionKey for FlakyKey {
    fn key_id(&self) -> &str {
        self.inner.key_id()
    }

    async fn generate_data_key(
        &self,
        ctx: &EncryptionContext,
    ) -> Result<(DataKey, Vec<u8>), EnvelopeError> {
        self.unavailable("generate_data_key")?;
        self.inner.generate_data_key(ctx).await
    }

    async fn decrypt_data_key(
        &self,
        key_id: &str,
        wrapped: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<DataKey, EnvelopeError> {
        self.unavailable("decrypt")?;
        self.inner.decrypt_data_key(key_id, wrapped, ctx).await
    }
}

/// A keyring over a fresh local key (no data-key cache, so every open asks the key).
pub(crate) fn local_keyring() -> Keyring {
    flaky_keyring(0)
}

/// A keyring whose key is unavailable for its first `outages` calls.
pub(crate) fn flaky_keyring(outages: usize) -> Keyring {
    let key = FlakyKey {
        inner: LocalKey::generate().expect("a local key"),
        outages: AtomicUsize::new(outages),
    };
    Keyring::new(Arc::new(key), vec![], no_cache())
}

/// A keyring over the same key bytes as `bytes`, unavailable for every call.
pub(crate) fn unavailable_keyring(bytes: [u8; 32]) -> Keyring {
    let key = FlakyKey {
        inner: LocalKey::from_bytes(bytes),
        outages: AtomicUsize::new(usize::MAX),
    };
    Keyring::new(Arc::new(key), vec![], no_cache())
}

/// A keyring over a local key made of `bytes`.
pub(crate) fn keyring_from(bytes: [u8; 32]) -> Keyring {
    Keyring::new(Arc::new(LocalKey::from_bytes(bytes)), vec![], no_cache())
}

fn no_cache() -> KeyringSettings {
    KeyringSettings {
        data_key_cache_capacity: 0,
        ..KeyringSettings::default()
    }
}
