//! A key-encryption key held by this process.

use std::fmt;
use std::path::Path;

use async_trait::async_trait;
use aws_lc_rs::aead::NONCE_LEN;
use aws_lc_rs::digest;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use zeroize::Zeroizing;

use crate::data_key::{KEY_LEN, aead_open, aead_seal, random_array};
use crate::{DataKey, EncryptionContext, EnvelopeError, KeyEncryptionKey, KeyKind};

/// Every local key id starts with this.
pub(crate) const LOCAL_KEY_ID_PREFIX: &str = "local:";
/// Domain separation for the wrapping AEAD's associated data.
const WRAP_LABEL: &[u8] = b"leasehold local data-key wrap v1\0";

/// A 256-bit key-encryption key from a file, a Kubernetes Secret or generated.
///
/// Its id is `local:` followed by the first 16 hex digits of the key's SHA-256: a
/// fingerprint that tells keys apart without revealing them. A data key is wrapped
/// as a random nonce followed by its AES-256-GCM encryption under this key, with
/// the key id and the encryption context as associated data.
pub struct LocalKey {
    key: Zeroizing<[u8; KEY_LEN]>,
    key_id: String,
}

impl LocalKey {
    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self::from_zeroizing(Zeroizing::new(bytes))
    }

    fn from_zeroizing(key: Zeroizing<[u8; KEY_LEN]>) -> Self {
        let digest = digest::digest(&digest::SHA256, key.as_slice());
        let fingerprint: String = digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Self {
            key,
            key_id: format!("{LOCAL_KEY_ID_PREFIX}{fingerprint}"),
        }
    }

    /// A fresh random key.
    pub fn generate() -> Result<Self, EnvelopeError> {
        Ok(Self::from_zeroizing(random_array::<KEY_LEN>()?))
    }

    /// Load a key file: 32 raw bytes, or the base64 (standard or URL-safe, padded or
    /// not) of 32 bytes with an optional trailing newline.
    pub fn from_file(path: &Path) -> Result<Self, EnvelopeError> {
        let source_name = path.display().to_string();
        let contents =
            Zeroizing::new(
                std::fs::read(path).map_err(|e| EnvelopeError::InvalidLocalKey {
                    source_name: source_name.clone(),
                    detail: e.to_string(),
                })?,
            );
        Self::parse_from(&contents, &source_name)
    }

    /// Parse key bytes as found in a Kubernetes Secret's data: same forms as
    /// [`from_file`](Self::from_file).
    pub fn parse(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        Self::parse_from(bytes, "Secret data")
    }

    fn parse_from(bytes: &[u8], source_name: &str) -> Result<Self, EnvelopeError> {
        if let Ok(raw) = <[u8; KEY_LEN]>::try_from(bytes) {
            return Ok(Self::from_zeroizing(Zeroizing::new(raw)));
        }
        let text = bytes
            .strip_suffix(b"\n")
            .map(|b| b.strip_suffix(b"\r").unwrap_or(b))
            .unwrap_or(bytes);
        for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
            // Enough room that decoding never reallocates (and leaves a copy behind).
            let mut decoded = Zeroizing::new(Vec::with_capacity(text.len()));
            if engine.decode_vec(text, &mut decoded).is_ok() {
                if let Ok(raw) = <[u8; KEY_LEN]>::try_from(decoded.as_slice()) {
                    return Ok(Self::from_zeroizing(Zeroizing::new(raw)));
                }
                return Err(EnvelopeError::InvalidLocalKey {
                    source_name: source_name.to_owned(),
                    detail: format!(
                        "the base64 decodes to {} bytes, a key is {KEY_LEN}; make one with \
                         `head -c 32 /dev/urandom | base64`",
                        decoded.len()
                    ),
                });
            }
        }
        Err(EnvelopeError::InvalidLocalKey {
            source_name: source_name.to_owned(),
            detail: format!(
                "expected {KEY_LEN} raw bytes or the base64 of {KEY_LEN} bytes, found {} bytes \
                 that are neither; make one with `head -c 32 /dev/urandom | base64`",
                bytes.len()
            ),
        })
    }

    /// The key as standard base64 (to write a generated key to a file or Secret).
    pub fn expose_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(self.key.as_slice()))
    }

    fn wrap_aad(&self, ctx: &EncryptionContext) -> Vec<u8> {
        let mut aad = WRAP_LABEL.to_vec();
        aad.extend_from_slice(self.key_id.as_bytes());
        aad.push(0);
        aad.extend_from_slice(&ctx.canonical_bytes());
        aad
    }
}

impl fmt::Debug for LocalKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl KeyEncryptionKey for LocalKey {
    fn key_id(&self) -> &str {
        &self.key_id
    }

    async fn generate_data_key(
        &self,
        ctx: &EncryptionContext,
    ) -> Result<(DataKey, Vec<u8>), EnvelopeError> {
        let data_key = random_array::<KEY_LEN>()?;
        let (nonce, sealed) = aead_seal(&self.key, &self.wrap_aad(ctx), data_key.as_slice())?;
        let mut wrapped = Vec::with_capacity(NONCE_LEN + sealed.len());
        wrapped.extend_from_slice(&nonce);
        wrapped.extend_from_slice(&sealed);
        Ok((DataKey::new(data_key, self.key_id.clone()), wrapped))
    }

    async fn decrypt_data_key(
        &self,
        key_id: &str,
        wrapped: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<DataKey, EnvelopeError> {
        if key_id != self.key_id {
            return Err(EnvelopeError::UnknownKey {
                key_id: key_id.to_owned(),
            });
        }
        let tampered = || EnvelopeError::Tampered {
            key_id: key_id.to_owned(),
            context_keys: ctx.key_names(),
        };
        if wrapped.len() < NONCE_LEN {
            return Err(tampered());
        }
        let (nonce, sealed) = wrapped.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| tampered())?;
        let plaintext =
            aead_open(&self.key, nonce, &self.wrap_aad(ctx), sealed)?.ok_or_else(tampered)?;
        let bytes: [u8; KEY_LEN] = plaintext.as_slice().try_into().map_err(|_| tampered())?;
        Ok(DataKey::new(Zeroizing::new(bytes), self.key_id.clone()))
    }

    fn kind(&self) -> KeyKind {
        KeyKind::Local
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; KEY_LEN] = [0x5a; KEY_LEN];

    #[test]
    fn key_id_is_a_fingerprint() {
        let key = LocalKey::from_bytes(KEY);
        assert!(key.key_id().starts_with("local:"));
        assert_eq!(key.key_id().len(), "local:".len() + 16);
        assert_eq!(key.key_id(), LocalKey::from_bytes(KEY).key_id());
        assert_ne!(key.key_id(), LocalKey::from_bytes([1; KEY_LEN]).key_id());
        let shown = format!("{key:?}");
        assert!(shown.contains(key.key_id()));
        assert!(!shown.contains(key.expose_base64().as_str()));
        assert!(!shown.contains("90"), "{shown}"); // 0x5a
    }

    #[test]
    fn parses_raw_and_base64_forms() {
        let want = LocalKey::from_bytes(KEY).key_id().to_owned();
        let b64 = STANDARD.encode(KEY);
        let forms: Vec<Vec<u8>> = vec![
            KEY.to_vec(),
            b64.clone().into_bytes(),
            format!("{b64}\n").into_bytes(),
            format!("{b64}\r\n").into_bytes(),
            STANDARD_NO_PAD.encode(KEY).into_bytes(),
            URL_SAFE.encode(KEY).into_bytes(),
        ];
        for form in forms {
            assert_eq!(LocalKey::parse(&form).unwrap().key_id(), want);
        }
    }

    #[test]
    fn refuses_other_lengths_without_echoing_the_input() {
        let short = STANDARD.encode([0x33u8; 16]);
        let err = LocalKey::parse(short.as_bytes()).unwrap_err();
        assert_eq!(err.reason(), "InvalidLocalKey");
        assert!(err.to_string().contains("16 bytes"), "{err}");
        assert!(!err.to_string().contains(&short));
        let err = LocalKey::parse(b"not a key at all, not base64 either!").unwrap_err();
        assert!(err.to_string().contains("raw bytes"), "{err}");
        assert!(!err.to_string().contains("not a key"));
        let err = LocalKey::from_file(Path::new("/nonexistent/key")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/key"), "{err}");
    }

    #[tokio::test]
    async fn wrap_is_bound_to_key_and_context() {
        let key = LocalKey::from_bytes(KEY);
        let ctx = EncryptionContext::new().with("lease", "a");
        let (data_key, wrapped) = key.generate_data_key(&ctx).await.unwrap();
        assert_eq!(data_key.key_id(), key.key_id());
        let again = key
            .decrypt_data_key(key.key_id(), &wrapped, &ctx)
            .await
            .unwrap();
        assert_eq!(again.expose_bytes(), data_key.expose_bytes());
        let other_ctx = EncryptionContext::new().with("lease", "b");
        let err = key
            .decrypt_data_key(key.key_id(), &wrapped, &other_ctx)
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "Tampered");
        let err = key
            .decrypt_data_key("local:0000000000000000", &wrapped, &ctx)
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "UnknownKey");
    }
}
