//! A holder for a token whose `Debug` does not show it.

use std::fmt;

/// A bearer token. `Debug` prints `ServiceAccountToken(<redacted>)`; there is
/// no `Display`, so it cannot end up in a log line by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceAccountToken(String);

impl ServiceAccountToken {
    /// Wraps a token.
    pub fn new(token: impl Into<String>) -> Self {
        ServiceAccountToken(token.into())
    }

    /// The token text, to pass to a verifier or an `Authorization` header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for ServiceAccountToken {
    fn from(token: String) -> Self {
        ServiceAccountToken(token)
    }
}

impl fmt::Debug for ServiceAccountToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServiceAccountToken(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let t = ServiceAccountToken::new("eyJhbGciOi.secret.sig");
        let shown = format!("{t:?} {:?}", Some(&t));
        assert!(!shown.contains("secret"), "{shown}");
        assert_eq!(t.expose(), "eyJhbGciOi.secret.sig");
    }
}
