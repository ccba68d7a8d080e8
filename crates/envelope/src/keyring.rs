//! The keyring stores use: seal with the primary key, open with whichever key an
//! envelope names, cache unwrapped data keys, count every key call.

use std::fmt;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use aws_lc_rs::digest;
use lru::LruCache;
use prometheus_client::registry::Registry;
use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::data_key::{aead_open, aead_seal};
use crate::format::{self, Envelope, FAMILY_PREFIX_STR};
use crate::metrics::{KeyringMetrics, Operation};
use crate::{DataKey, EncryptionContext, EnvelopeError, KeyEncryptionKey};

/// Data-key cache bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyringSettings {
    /// How long an unwrapped data key is reused before the key-encryption key is
    /// asked again (so a disabled KMS key takes effect within this time).
    pub data_key_cache_ttl: Duration,
    /// At most this many data keys are held; 0 disables the cache.
    pub data_key_cache_capacity: usize,
}

impl Default for KeyringSettings {
    fn default() -> Self {
        Self {
            data_key_cache_ttl: Duration::from_secs(300),
            data_key_cache_capacity: 1024,
        }
    }
}

/// Seals values under the primary key-encryption key and opens values sealed
/// under any key it holds.
///
/// Sealing makes one fresh data key per value (one GenerateDataKey per write).
/// Opening reads the key id from the envelope; a value without the envelope
/// prefix is legacy plaintext and is returned as it is (see
/// [`needs_rewrap`](Self::needs_rewrap)).
pub struct Keyring {
    primary: Option<Arc<dyn KeyEncryptionKey>>,
    decrypt_only: Vec<Arc<dyn KeyEncryptionKey>>,
    cache: DataKeyCache,
    metrics: KeyringMetrics,
}

impl Keyring {
    /// A keyring sealing under `primary` and also opening values sealed under
    /// `decrypt_only` keys (old keys during a rotation).
    pub fn new(
        primary: Arc<dyn KeyEncryptionKey>,
        decrypt_only: Vec<Arc<dyn KeyEncryptionKey>>,
        settings: KeyringSettings,
    ) -> Self {
        Self {
            primary: Some(primary),
            decrypt_only,
            cache: DataKeyCache::new(settings),
            metrics: KeyringMetrics::default(),
        }
    }

    /// The explicit opt-out: values are stored as plaintext. Sealing returns the
    /// plaintext (which must be UTF-8); opening returns plaintext as it is and
    /// refuses envelopes with [`EnvelopeError::UnknownKey`].
    pub fn unencrypted() -> Self {
        Self {
            primary: None,
            decrypt_only: Vec::new(),
            cache: DataKeyCache::new(KeyringSettings {
                data_key_cache_capacity: 0,
                ..KeyringSettings::default()
            }),
            metrics: KeyringMetrics::default(),
        }
    }

    /// Unencrypted like [`unencrypted`](Self::unencrypted), but still opening values
    /// sealed under `decrypt_only` keys: to move sealed values back to plaintext.
    pub fn unencrypted_with_decrypt_only(
        decrypt_only: Vec<Arc<dyn KeyEncryptionKey>>,
        settings: KeyringSettings,
    ) -> Self {
        Self {
            primary: None,
            decrypt_only,
            cache: DataKeyCache::new(settings),
            metrics: KeyringMetrics::default(),
        }
    }

    /// The primary key's id; `None` for an unencrypted keyring.
    pub fn primary_key_id(&self) -> Option<&str> {
        self.primary.as_deref().map(KeyEncryptionKey::key_id)
    }

    /// Whether `stored` is a sealed envelope (rather than legacy plaintext).
    pub fn is_sealed(stored: &[u8]) -> bool {
        format::is_sealed(stored)
    }

    /// The key id an envelope names; `None` for plaintext or a malformed envelope.
    pub fn envelope_key_id(stored: &[u8]) -> Option<String> {
        format::decode(stored).ok().flatten().map(|e| e.key_id)
    }

    /// Whether `stored` should be rewritten (opened and sealed again): it is
    /// plaintext while a primary key is set, or sealed under a key other than the
    /// primary. A malformed envelope does not (opening it reports why).
    pub fn needs_rewrap(&self, stored: &[u8]) -> bool {
        match format::decode(stored) {
            Ok(None) => self.primary.is_some(),
            Ok(Some(envelope)) => self.primary_key_id() != Some(envelope.key_id.as_str()),
            Err(_) => false,
        }
    }

    /// Export the metrics (`leasehold_kms_requests_total`,
    /// `leasehold_kms_data_key_cache_hits_total`,
    /// `leasehold_kms_request_duration_seconds`) into `registry`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.metrics.register(registry);
    }

    /// Seal `plaintext` for `ctx`: ASCII text (`lhenc1:` + base64url), safe in
    /// JSON and in a Secret value. Unencrypted keyrings return the plaintext.
    pub async fn seal(
        &self,
        ctx: &EncryptionContext,
        plaintext: &[u8],
    ) -> Result<String, EnvelopeError> {
        let Some(primary) = &self.primary else {
            return unencrypted_text(plaintext);
        };
        let started = Instant::now();
        let generated = primary.generate_data_key(ctx).await;
        self.metrics.record(
            Operation::GenerateDataKey,
            primary.kind(),
            started.elapsed(),
            &generated,
        );
        let (data_key, wrapped) = generated?;
        let header = format::header(data_key.key_id(), &wrapped)?;
        let aad = format::associated_data(&header, ctx);
        let (nonce, ciphertext) = aead_seal(data_key.expose_bytes(), &aad, plaintext)?;
        Ok(format::encode(&header, &nonce, &ciphertext))
    }

    /// Open a stored value for `ctx`. Plaintext (no envelope prefix) is returned
    /// as it is; an envelope is opened with the key it names.
    pub async fn open(
        &self,
        ctx: &EncryptionContext,
        stored: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
        let Some(envelope) = format::decode(stored)? else {
            return Ok(Zeroizing::new(stored.to_vec()));
        };
        let data_key = self.data_key_for(&envelope, ctx).await?;
        let header = format::header(&envelope.key_id, &envelope.wrapped_key)?;
        let aad = format::associated_data(&header, ctx);
        aead_open(
            data_key.expose_bytes(),
            envelope.nonce,
            &aad,
            &envelope.ciphertext,
        )?
        .ok_or_else(|| EnvelopeError::Tampered {
            key_id: envelope.key_id.clone(),
            context_keys: ctx.key_names(),
        })
    }

    /// The envelope's data key, from the cache or unwrapped by the key it names.
    async fn data_key_for(
        &self,
        envelope: &Envelope,
        ctx: &EncryptionContext,
    ) -> Result<Arc<DataKey>, EnvelopeError> {
        let cache_key = cache_key(&envelope.key_id, &envelope.wrapped_key, ctx);
        if let Some(hit) = self.cache.get(&cache_key) {
            self.metrics.cache_hit();
            return Ok(hit);
        }
        let kek = self
            .key_for(&envelope.key_id)
            .ok_or_else(|| EnvelopeError::UnknownKey {
                key_id: envelope.key_id.clone(),
            })?;
        let started = Instant::now();
        let unwrapped = kek
            .decrypt_data_key(&envelope.key_id, &envelope.wrapped_key, ctx)
            .await;
        self.metrics.record(
            Operation::Decrypt,
            kek.kind(),
            started.elapsed(),
            &unwrapped,
        );
        let data_key = Arc::new(unwrapped?);
        self.cache.insert(cache_key, Arc::clone(&data_key));
        Ok(data_key)
    }

    /// The key with exactly this id, else the first that may try it (KMS).
    fn key_for(&self, key_id: &str) -> Option<&Arc<dyn KeyEncryptionKey>> {
        let keys = || self.primary.iter().chain(&self.decrypt_only);
        keys()
            .find(|k| k.key_id() == key_id)
            .or_else(|| keys().find(|k| k.can_decrypt(key_id)))
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("primary", &self.primary_key_id())
            .field(
                "decrypt_only",
                &self
                    .decrypt_only
                    .iter()
                    .map(|k| k.key_id())
                    .collect::<Vec<_>>(),
            )
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

fn unencrypted_text(plaintext: &[u8]) -> Result<String, EnvelopeError> {
    if plaintext.starts_with(FAMILY_PREFIX_STR.as_bytes()) && format::is_sealed(plaintext) {
        return Err(EnvelopeError::malformed(
            "an unencrypted keyring cannot store a value that looks like an envelope",
        ));
    }
    String::from_utf8(plaintext.to_vec())
        .map_err(|_| EnvelopeError::malformed("an unencrypted keyring stores UTF-8 text only"))
}

/// Hash of what a data key was unwrapped for: a cached key is only served for the
/// same key id, wrapped bytes and context.
fn cache_key(key_id: &str, wrapped: &[u8], ctx: &EncryptionContext) -> [u8; 32] {
    let mut hasher = digest::Context::new(&digest::SHA256);
    for part in [key_id.as_bytes(), wrapped, &ctx.canonical_bytes()] {
        hasher.update(&(part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(hasher.finish().as_ref());
    out
}

/// Unwrapped data keys with a time to live; evicted entries are dropped, which
/// zeroizes them once no open still uses them.
struct DataKeyCache {
    ttl: Duration,
    capacity: usize,
    entries: Option<Mutex<LruCache<[u8; 32], CachedDataKey>>>,
}

struct CachedDataKey {
    key: Arc<DataKey>,
    expires_at: Instant,
}

impl DataKeyCache {
    fn new(settings: KeyringSettings) -> Self {
        let entries = NonZeroUsize::new(settings.data_key_cache_capacity)
            .filter(|_| !settings.data_key_cache_ttl.is_zero())
            .map(|cap| Mutex::new(LruCache::new(cap)));
        Self {
            ttl: settings.data_key_cache_ttl,
            capacity: settings.data_key_cache_capacity,
            entries,
        }
    }

    fn lock(&self) -> Option<MutexGuard<'_, LruCache<[u8; 32], CachedDataKey>>> {
        // A panic while holding the lock leaves the map consistent; keep using it.
        self.entries
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    fn get(&self, cache_key: &[u8; 32]) -> Option<Arc<DataKey>> {
        let mut entries = self.lock()?;
        let now = Instant::now();
        match entries.get(cache_key) {
            Some(entry) if entry.expires_at > now => Some(Arc::clone(&entry.key)),
            Some(_) => {
                entries.pop(cache_key);
                None
            }
            None => None,
        }
    }

    fn insert(&self, cache_key: [u8; 32], key: Arc<DataKey>) {
        let Some(mut entries) = self.lock() else {
            return;
        };
        let now = Instant::now();
        let expired: Vec<[u8; 32]> = entries
            .iter()
            .filter(|(_, entry)| entry.expires_at <= now)
            .map(|(k, _)| *k)
            .collect();
        for k in expired {
            entries.pop(&k);
        }
        entries.put(
            cache_key,
            CachedDataKey {
                key,
                expires_at: now + self.ttl,
            },
        );
    }

    fn len(&self) -> usize {
        self.lock().map_or(0, |e| e.len())
    }
}

impl fmt::Debug for DataKeyCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKeyCache")
            .field("ttl", &self.ttl)
            .field("capacity", &self.capacity)
            .field("len", &self.len())
            .finish()
    }
}
