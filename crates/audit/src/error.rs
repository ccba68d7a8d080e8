//! The one error type of the crate's fallible operations.

/// Why an audit operation (start, a checkpoint store, key handling, reading a file) failed.
///
/// Messages never carry key material: key parsing errors say what was wrong, not what
/// was read.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A file could not be opened, read or written.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A key could not be parsed or encoded.
    #[error("audit signing key: {0}")]
    Key(String),
    /// The checkpoint store could not be read or written.
    #[error("audit checkpoint store: {0}")]
    Store(String),
    /// A setting is unusable (e.g. a webhook URL that is not http(s)).
    #[error("audit configuration: {0}")]
    Config(String),
}

impl AuditError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}
