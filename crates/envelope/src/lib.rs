//! Envelope encryption for the secret material leasehold stores.
//!
//! Every stored object gets its own 256-bit data key; the data key is wrapped by
//! a key-encryption key (KEK): AWS KMS ([`KmsKey`]) or a local key ([`LocalKey`]).
//! The value is sealed with AES-256-GCM, bound to an [`EncryptionContext`]
//! (namespace, lease, kind) so a value copied to another object does not open.
//! A [`Keyring`] is what stores use:
//!
//! ```
//! # async fn demo() -> Result<(), leasehold_envelope::EnvelopeError> {
//! use std::sync::Arc;
//! use leasehold_envelope::{EncryptionContext, Keyring, KeyringSettings, LocalKey};
//!
//! let keyring = Keyring::new(Arc::new(LocalKey::generate()?), vec![], KeyringSettings::default());
//! let ctx = EncryptionContext::new().with("namespace", "ns").with("lease", "db").with("kind", "versions");
//! let stored = keyring.seal(&ctx, b"password").await?;
//! assert!(stored.starts_with("lhenc1:"));
//! assert_eq!(keyring.open(&ctx, stored.as_bytes()).await?.as_slice(), b"password");
//! # Ok(()) }
//! ```
//!
//! The stored form records the key id, so keys can be rotated: a keyring whose
//! primary is the new key and whose decrypt-only keys include the old one opens
//! both, and [`Keyring::needs_rewrap`] tells which values to seal again.

#![forbid(unsafe_code)]

mod context;
mod data_key;
mod error;
mod format;
mod kek;
mod keyring;
mod kms;
mod local;
mod metrics;
pub mod secret;

pub use context::EncryptionContext;
pub use data_key::{DataKey, KEY_LEN};
pub use error::EnvelopeError;
pub use format::SEALED_PREFIX;
pub use kek::{KeyEncryptionKey, KeyKind};
pub use keyring::{Keyring, KeyringSettings};
pub use kms::{KmsKey, KmsSettings, KmsTimeouts};
pub use local::LocalKey;
pub use zeroize::Zeroizing;
