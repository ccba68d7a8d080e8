//! Errors of sealing and opening, sorted by what the operator should do.

/// Why a value could not be sealed or opened.
///
/// Messages name the key id and the encryption context's key names, never a
/// plaintext, a data key or a context value, and say what to do.
/// [`reason`](Self::reason) is a CamelCase word for Kubernetes condition reasons.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// The key could not be reached or answered with a transient failure (network,
    /// timeout, throttling, a 5xx): retry later.
    #[error(
        "key {key_id} is unavailable for {operation} ({detail}); this is usually transient \
         (KMS unreachable, slow or throttling): it is retried, check network access to KMS if it persists"
    )]
    KeyUnavailable {
        /// The key id as configured or as named in the envelope.
        key_id: String,
        /// `generate_data_key` or `decrypt`.
        operation: &'static str,
        /// What went wrong, from the client or the service.
        detail: String,
    },
    /// The key service refused the key: it is disabled, pending deletion, not found
    /// or access is denied. Needs operator action.
    #[error(
        "key {key_id} refused {operation} ({detail}); enable the key, cancel its deletion or \
         grant this service account kms:GenerateDataKey, kms:Decrypt and kms:DescribeKey on it"
    )]
    KeyRefused {
        /// The key id as configured or as named in the envelope.
        key_id: String,
        /// `generate_data_key`, `decrypt` or `describe_key`.
        operation: &'static str,
        /// The service's error code and message.
        detail: String,
    },
    /// Authentication failed: the value was changed, or it was sealed for another
    /// encryption context (for example copied from another lease).
    #[error(
        "sealed value under key {key_id} does not open for the encryption context with keys \
         [{context_keys}]: it was changed or belongs to another object; restore it from the \
         object it was sealed for, or delete it so it is issued anew"
    )]
    Tampered {
        /// The key id named in the envelope.
        key_id: String,
        /// The context's key names (not values).
        context_keys: String,
    },
    /// Not a valid envelope (bad encoding, truncated, unknown version).
    #[error("value is not a valid sealed envelope: {detail}; it was truncated or edited by hand")]
    Malformed {
        /// What is wrong with it.
        detail: String,
    },
    /// The envelope names a key this process does not hold.
    #[error(
        "sealed value names key {key_id}, which this process does not hold; configure it as the \
         primary or a decrypt-only key"
    )]
    UnknownKey {
        /// The key id named in the envelope.
        key_id: String,
    },
    /// A local key could not be loaded.
    #[error("cannot load the local key from {source_name}: {detail}")]
    InvalidLocalKey {
        /// A file path or "Secret data".
        source_name: String,
        /// What is wrong (never the key bytes).
        detail: String,
    },
}

impl EnvelopeError {
    /// Whether retrying later may succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::KeyUnavailable { .. })
    }

    /// A CamelCase reason for Kubernetes conditions and events.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::KeyUnavailable { .. } => "KeyUnavailable",
            Self::KeyRefused { .. } => "KeyRefused",
            Self::Tampered { .. } => "Tampered",
            Self::Malformed { .. } => "Malformed",
            Self::UnknownKey { .. } => "UnknownKey",
            Self::InvalidLocalKey { .. } => "InvalidLocalKey",
        }
    }

    pub(crate) fn malformed(detail: impl Into<String>) -> Self {
        Self::Malformed {
            detail: detail.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unavailable_is_transient() {
        let unavailable = EnvelopeError::KeyUnavailable {
            key_id: "k".into(),
            operation: "decrypt",
            detail: "timeout".into(),
        };
        assert!(unavailable.is_transient());
        assert_eq!(unavailable.reason(), "KeyUnavailable");
        let refused = EnvelopeError::KeyRefused {
            key_id: "k".into(),
            operation: "decrypt",
            detail: "DisabledException".into(),
        };
        assert!(!refused.is_transient());
        assert_eq!(refused.reason(), "KeyRefused");
        for (err, reason) in [
            (
                EnvelopeError::Tampered {
                    key_id: "k".into(),
                    context_keys: "lease".into(),
                },
                "Tampered",
            ),
            (EnvelopeError::malformed("x"), "Malformed"),
            (
                EnvelopeError::UnknownKey { key_id: "k".into() },
                "UnknownKey",
            ),
        ] {
            assert!(!err.is_transient());
            assert_eq!(err.reason(), reason);
        }
    }
}
