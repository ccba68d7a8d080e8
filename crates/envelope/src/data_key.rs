//! Data keys and the AEAD they drive.

use std::fmt;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use zeroize::Zeroizing;

use crate::EnvelopeError;

/// Length of a data key and of a local key-encryption key: 256 bits.
pub const KEY_LEN: usize = 32;

/// A plaintext 256-bit data key, zeroized on drop, with the id of the
/// key-encryption key that wrapped it. `Debug` shows the key id only.
pub struct DataKey {
    bytes: Zeroizing<[u8; KEY_LEN]>,
    key_id: String,
}

impl DataKey {
    /// A data key from its plaintext bytes, wrapped by `key_id`.
    pub fn new(bytes: Zeroizing<[u8; KEY_LEN]>, key_id: impl Into<String>) -> Self {
        Self {
            bytes,
            key_id: key_id.into(),
        }
    }

    /// A data key from a plaintext buffer of any length; refuses anything but 32 bytes.
    pub(crate) fn from_slice(
        bytes: &[u8],
        key_id: impl Into<String>,
    ) -> Result<Self, EnvelopeError> {
        let key_id = key_id.into();
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        if bytes.len() != KEY_LEN {
            return Err(EnvelopeError::KeyRefused {
                key_id,
                operation: "decrypt",
                detail: format!(
                    "the key service returned a {}-byte data key, expected {KEY_LEN}",
                    bytes.len()
                ),
            });
        }
        key.copy_from_slice(bytes);
        Ok(Self::new(key, key_id))
    }

    /// The key-encryption key that wrapped this data key, as that key names
    /// itself (for KMS, the key ARN it reported); recorded in envelopes.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The plaintext key bytes.
    pub fn expose_bytes(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKey")
            .field("key_id", &self.key_id)
            .field("bytes", &"<redacted>")
            .finish()
    }
}

/// Fill a fresh array from the system CSPRNG.
pub(crate) fn random_array<const N: usize>() -> Result<Zeroizing<[u8; N]>, EnvelopeError> {
    let mut out = Zeroizing::new([0u8; N]);
    aws_lc_rs::rand::fill(out.as_mut_slice())
        .map_err(|_| EnvelopeError::malformed("the system random number generator failed"))?;
    Ok(out)
}

/// AES-256-GCM encryption under a random nonce: returns the nonce and
/// ciphertext with its tag appended.
pub(crate) fn aead_seal(
    key: &[u8; KEY_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<([u8; NONCE_LEN], Vec<u8>), EnvelopeError> {
    let sealing = aead_key(key)?;
    let nonce = *random_array::<NONCE_LEN>()?;
    let mut buffer = plaintext.to_vec();
    sealing
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut buffer,
        )
        .map_err(|_| EnvelopeError::malformed("AES-GCM refused to seal the value"))?;
    Ok((nonce, buffer))
}

/// AES-256-GCM decryption; `None` when authentication fails.
pub(crate) fn aead_open(
    key: &[u8; KEY_LEN],
    nonce: [u8; NONCE_LEN],
    aad: &[u8],
    sealed: &[u8],
) -> Result<Option<Zeroizing<Vec<u8>>>, EnvelopeError> {
    let opening = aead_key(key)?;
    let mut buffer = Zeroizing::new(sealed.to_vec());
    let Ok(plaintext) = opening.open_in_place(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut buffer,
    ) else {
        return Ok(None);
    };
    let len = plaintext.len();
    buffer.truncate(len);
    Ok(Some(buffer))
}

fn aead_key(key: &[u8; KEY_LEN]) -> Result<LessSafeKey, EnvelopeError> {
    UnboundKey::new(&AES_256_GCM, key)
        .map(LessSafeKey::new)
        .map_err(|_| EnvelopeError::malformed("AES-256-GCM refused the key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let key = DataKey::new(Zeroizing::new([0xAB; KEY_LEN]), "local:0123");
        let shown = format!("{key:?}");
        assert!(shown.contains("local:0123"));
        assert!(!shown.contains("171"), "{shown}");
        assert!(!shown.to_lowercase().contains("ab, "), "{shown}");
    }

    #[test]
    fn aead_round_trip_and_refusals() {
        let key = [7u8; KEY_LEN];
        let (nonce, sealed) = aead_seal(&key, b"aad", b"secret").unwrap();
        let opened = aead_open(&key, nonce, b"aad", &sealed).unwrap().unwrap();
        assert_eq!(opened.as_slice(), b"secret");
        assert!(aead_open(&key, nonce, b"other", &sealed).unwrap().is_none());
        assert!(
            aead_open(&[8u8; KEY_LEN], nonce, b"aad", &sealed)
                .unwrap()
                .is_none()
        );
    }
}
