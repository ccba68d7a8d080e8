//! Envelope encryption in front of any [`SecretStore`]: what reaches the inner store
//! is sealed with a per-value data key wrapped by the keyring's key (AWS KMS or a
//! local key), bound to where the value belongs (see [`VersionContext`]).

use std::sync::Arc;

use async_trait::async_trait;
use leasehold_envelope::{EncryptionContext, EnvelopeError, Keyring};
use secrecy::{ExposeSecret, SecretString};

use crate::{LeaseKey, SecretStore, StoreError};

/// The encryption context of a lease's version `version` (the same one every time:
/// `leasehold rekey` recomputes it from where the value is stored).
pub type VersionContext = Arc<dyn Fn(&LeaseKey, u64) -> EncryptionContext + Send + Sync>;

/// A [`SecretStore`] that seals on `put` and opens on `get`.
pub struct SealedSecretStore<S> {
    inner: S,
    keyring: Arc<Keyring>,
    context: VersionContext,
}

impl<S> std::fmt::Debug for SealedSecretStore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedSecretStore")
            .field("key", &self.keyring.primary_key_id())
            .finish_non_exhaustive()
    }
}

impl<S> SealedSecretStore<S> {
    pub fn new(inner: S, keyring: Arc<Keyring>, context: VersionContext) -> Self {
        Self {
            inner,
            keyring,
            context,
        }
    }

    /// The store underneath.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

/// A key failure as a store error whose [`StoreError::key_reason`] names it, so the
/// lease reports `Degraded` with that reason (`KeyUnavailable`, `KeyRefused`, …).
pub fn key_store_error(what: &str, e: &EnvelopeError) -> StoreError {
    StoreError(format!("{}: {what}: {e}", e.reason()))
}

#[async_trait]
impl<S: SecretStore> SecretStore for SealedSecretStore<S> {
    async fn put(
        &self,
        lease: &LeaseKey,
        version: u64,
        secret: &SecretString,
    ) -> Result<(), StoreError> {
        let sealed = self
            .keyring
            .seal(
                &(self.context)(lease, version),
                secret.expose_secret().as_bytes(),
            )
            .await
            .map_err(|e| key_store_error("cannot encrypt a credential for storage", &e))?;
        self.inner
            .put(lease, version, &SecretString::from(sealed))
            .await
    }

    async fn get(
        &self,
        lease: &LeaseKey,
        version: u64,
    ) -> Result<Option<SecretString>, StoreError> {
        let Some(stored) = self.inner.get(lease, version).await? else {
            return Ok(None);
        };
        let plain = self
            .keyring
            .open(
                &(self.context)(lease, version),
                stored.expose_secret().as_bytes(),
            )
            .await
            .map_err(|e| key_store_error("cannot decrypt a stored credential", &e))?;
        let text = String::from_utf8(plain.to_vec())
            .map_err(|_| StoreError("a stored credential is not UTF-8".into()))?;
        Ok(Some(SecretString::from(text)))
    }

    async fn remove(&self, lease: &LeaseKey, version: u64) -> Result<(), StoreError> {
        self.inner.remove(lease, version).await
    }
}
