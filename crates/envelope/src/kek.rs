//! The key-encryption key abstraction.

use std::fmt::Debug;

use async_trait::async_trait;

use crate::{DataKey, EncryptionContext, EnvelopeError};

/// Where a key-encryption key lives; a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyKind {
    /// AWS KMS (or a compatible endpoint).
    Kms,
    /// A 256-bit key held by this process.
    Local,
}

impl KeyKind {
    /// The label value: `kms` or `local`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kms => "kms",
            Self::Local => "local",
        }
    }
}

/// A key-encryption key (KEK): makes fresh data keys and unwraps them again.
///
/// Implemented by [`LocalKey`](crate::LocalKey) and [`KmsKey`](crate::KmsKey).
#[async_trait]
pub trait KeyEncryptionKey: Send + Sync + Debug {
    /// The id recorded in envelopes sealed under this key (`local:<fingerprint>`
    /// or a KMS key ARN).
    fn key_id(&self) -> &str;

    /// A fresh data key and its wrapped form, bound to `ctx`. The data key's
    /// [`key_id`](DataKey::key_id) is what the envelope records.
    async fn generate_data_key(
        &self,
        ctx: &EncryptionContext,
    ) -> Result<(DataKey, Vec<u8>), EnvelopeError>;

    /// Unwrap a data key that an envelope records under `key_id`, for `ctx`.
    async fn decrypt_data_key(
        &self,
        key_id: &str,
        wrapped: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<DataKey, EnvelopeError>;

    /// Whether this key can try to unwrap data keys recorded under `key_id`. A
    /// local key only unwraps its own; KMS decides for any KMS key id.
    fn can_decrypt(&self, key_id: &str) -> bool {
        key_id == self.key_id()
    }

    /// Where the key lives, for metrics labels.
    fn kind(&self) -> KeyKind {
        if self.key_id().starts_with(crate::local::LOCAL_KEY_ID_PREFIX) {
            KeyKind::Local
        } else {
            KeyKind::Kms
        }
    }
}
