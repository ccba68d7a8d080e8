//! The encryption context: what a sealed value is bound to.

use std::collections::BTreeMap;
use std::fmt;

/// Names and values that bind a sealed value to the object it belongs to
/// (for example namespace, lease and kind of record).
///
/// The same context must be given to open a value as was given to seal it: a blob
/// copied to another lease does not open there. The context is not secret (it is
/// sent to KMS and may appear in its audit log), but error messages name only its
/// keys.
///
/// ```
/// use leasehold_envelope::EncryptionContext;
/// let ctx = EncryptionContext::new()
///     .with("namespace", "payments")
///     .with("lease", "db-main")
///     .with("kind", "versions");
/// assert_eq!(ctx.key_names(), "kind, lease, namespace");
/// ```
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct EncryptionContext {
    entries: BTreeMap<String, String>,
}

impl EncryptionContext {
    /// An empty context.
    pub fn new() -> Self {
        Self::default()
    }

    /// The context with `key` set to `value` (replacing an earlier value).
    #[must_use]
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.entries.insert(key.into(), value.into());
        self
    }

    /// The entries in key order.
    pub fn entries(&self) -> &BTreeMap<String, String> {
        &self.entries
    }

    /// The key names, comma separated, for messages (values are left out).
    pub fn key_names(&self) -> String {
        if self.entries.is_empty() {
            return "(empty)".to_owned();
        }
        self.entries
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Unambiguous byte encoding used as AEAD associated data and as part of the
    /// data-key cache key: the entry count, then for each entry in key order the
    /// key and the value, each prefixed with its length (u32, big endian).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            4 + self
                .entries
                .iter()
                .map(|(k, v)| 8 + k.len() + v.len())
                .sum::<usize>(),
        );
        push_len(&mut out, self.entries.len());
        for (key, value) in &self.entries {
            push_len(&mut out, key.len());
            out.extend_from_slice(key.as_bytes());
            push_len(&mut out, value.len());
            out.extend_from_slice(value.as_bytes());
        }
        out
    }

    /// The context as the map KMS takes.
    pub(crate) fn to_kms_map(&self) -> std::collections::HashMap<String, String> {
        self.entries
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    // Contexts are a handful of short names; saturating keeps the encoding total
    // without a panic path, and a 4 GiB name cannot be built in practice anyway.
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
}

impl fmt::Debug for EncryptionContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.entries.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_bytes_do_not_depend_on_insertion_order() {
        let a = EncryptionContext::new()
            .with("lease", "x")
            .with("kind", "v");
        let b = EncryptionContext::new()
            .with("kind", "v")
            .with("lease", "x");
        assert_eq!(a.canonical_bytes(), b.canonical_bytes());
    }

    #[test]
    fn canonical_bytes_are_unambiguous() {
        // Concatenation without lengths would make these two equal.
        let a = EncryptionContext::new().with("ab", "c");
        let b = EncryptionContext::new().with("a", "bc");
        assert_ne!(a.canonical_bytes(), b.canonical_bytes());
        let empty_value = EncryptionContext::new().with("a", "");
        assert_ne!(
            empty_value.canonical_bytes(),
            EncryptionContext::new().canonical_bytes()
        );
    }

    #[test]
    fn key_names_leave_values_out() {
        let ctx = EncryptionContext::new()
            .with("namespace", "team-a")
            .with("lease", "db");
        assert_eq!(ctx.key_names(), "lease, namespace");
        assert_eq!(EncryptionContext::new().key_names(), "(empty)");
    }
}
