//! The Ed25519 key that signs checkpoints, and public key handling for the verifier.

use std::fmt;
use std::io::Write;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use rand::RngCore;
use zeroize::Zeroizing;

use crate::AuditError;
use crate::record::sha256_hex;

/// The fingerprint of a public key: the first 16 bytes (32 hex digits) of SHA-256 over
/// its 32 raw bytes. Written into checkpoints and chain starts as `key_id`.
pub fn key_id(key: &VerifyingKey) -> String {
    let mut hex = sha256_hex(key.as_bytes());
    hex.truncate(32);
    hex
}

/// Parse an Ed25519 public key from SPKI PEM (`-----BEGIN PUBLIC KEY-----`).
pub fn public_key_from_pem(pem: &str) -> Result<VerifyingKey, AuditError> {
    VerifyingKey::from_public_key_pem(pem)
        .map_err(|e| AuditError::Key(format!("not an Ed25519 public key PEM: {e}")))
}

/// The controller's checkpoint signing key. The secret half is zeroized on drop and
/// never shown by `Debug`.
#[derive(Clone)]
pub struct AuditSigner {
    key: SigningKey,
    key_id: String,
}

impl fmt::Debug for AuditSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditSigner")
            .field("key_id", &self.key_id)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl AuditSigner {
    /// A new random key.
    pub fn generate() -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(seed.as_mut());
        Self::from_bytes(&seed)
    }

    /// The key with this 32-byte seed (the RFC 8032 private key).
    pub fn from_bytes(seed: &[u8; 32]) -> Self {
        let key = SigningKey::from_bytes(seed);
        let key_id = key_id(&key.verifying_key());
        Self { key, key_id }
    }

    /// Parse a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`, as written by
    /// [`AuditSigner::to_pkcs8_pem`] or `openssl genpkey -algorithm ed25519`).
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, AuditError> {
        let key = SigningKey::from_pkcs8_pem(pem)
            .map_err(|_| AuditError::Key("not an Ed25519 PKCS#8 private key PEM".to_owned()))?;
        let key_id = key_id(&key.verifying_key());
        Ok(Self { key, key_id })
    }

    /// The private key as PKCS#8 PEM (zeroized when dropped).
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, AuditError> {
        self.key
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| AuditError::Key(format!("cannot encode the private key: {e}")))
    }

    /// The public key as SPKI PEM, for `leasehold audit verify --public-key`.
    pub fn public_key_pem(&self) -> Result<String, AuditError> {
        self.key
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| AuditError::Key(format!("cannot encode the public key: {e}")))
    }

    /// The public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// The fingerprint of the public key (see [`key_id`]).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Base64 signature over `message`.
    pub(crate) fn sign_base64(&self, message: &[u8]) -> String {
        BASE64.encode(self.key.sign(message).to_bytes())
    }
}

/// `leasehold audit keygen`: write a new key pair, the private key as PKCS#8 PEM (file
/// mode 0600, never overwriting an existing file) and the public key as SPKI PEM.
/// Returns the signer (e.g. to print its key id).
pub fn write_key_pair(private_path: &Path, public_path: &Path) -> Result<AuditSigner, AuditError> {
    use std::os::unix::fs::OpenOptionsExt;
    let signer = AuditSigner::generate();
    let private_pem = signer.to_pkcs8_pem()?;
    let public_pem = signer.public_key_pem()?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(private_path)
        .map_err(AuditError::io(format!(
            "cannot create {}",
            private_path.display()
        )))?;
    file.write_all(private_pem.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(AuditError::io(format!(
            "cannot write {}",
            private_path.display()
        )))?;
    std::fs::write(public_path, public_pem.as_bytes()).map_err(AuditError::io(format!(
        "cannot write {}",
        public_path.display()
    )))?;
    Ok(signer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signature, Verifier};

    #[test]
    fn debug_does_not_show_the_key() {
        let seed = [7u8; 32];
        let signer = AuditSigner::from_bytes(&seed);
        let debug = format!("{signer:?}");
        let pem = signer.to_pkcs8_pem().expect("pem");
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(debug.contains(signer.key_id()));
        assert!(!debug.contains(&BASE64.encode(seed)));
        assert!(!debug.contains(&body));
        assert!(!debug.contains(&format!("{:?}", seed)));
        assert!(!debug.contains("7, 7, 7"));
    }

    #[test]
    fn pem_round_trip_and_signatures_verify() {
        let signer = AuditSigner::generate();
        let again =
            AuditSigner::from_pkcs8_pem(&signer.to_pkcs8_pem().expect("pem")).expect("parses");
        assert_eq!(again.key_id(), signer.key_id());
        let public = public_key_from_pem(&signer.public_key_pem().expect("pem")).expect("parses");
        assert_eq!(key_id(&public), signer.key_id());
        let signature = BASE64.decode(signer.sign_base64(b"hello")).expect("base64");
        let signature = Signature::from_slice(&signature).expect("64 bytes");
        assert!(public.verify(b"hello", &signature).is_ok());
    }

    #[test]
    fn bad_pem_error_does_not_echo_input() {
        let err = AuditSigner::from_pkcs8_pem(
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LXN0dWZm\n-----END PRIVATE KEY-----\n",
        )
        .expect_err("not a key");
        assert!(!err.to_string().contains("c2VjcmV0LXN0dWZm"));
    }

    #[test]
    fn keygen_writes_private_0600_and_refuses_to_overwrite() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let private = dir.path().join("audit.key");
        let public = dir.path().join("audit.pub");
        let signer = write_key_pair(&private, &public).expect("keygen");
        let mode = std::fs::metadata(&private)
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let read = AuditSigner::from_pkcs8_pem(&std::fs::read_to_string(&private).expect("read"))
            .expect("parses");
        assert_eq!(read.key_id(), signer.key_id());
        let public_key =
            public_key_from_pem(&std::fs::read_to_string(&public).expect("read")).expect("parses");
        assert_eq!(key_id(&public_key), signer.key_id());
        assert!(write_key_pair(&private, &public).is_err());
    }
}
