//! Quoting of identifiers and literals, LIKE patterns and secret redaction, shared
//! by the SQL backends. Statements like `CREATE ROLE` and `CREATE USER` cannot take
//! bind parameters, so names and verifiers have to be spliced in safely.

use crate::BackendError;

/// Escape character used in every LIKE pattern we build.
pub(crate) const LIKE_ESCAPE: char = '!';

/// PostgreSQL identifier: always double-quoted, embedded quotes doubled (libpq's
/// `PQescapeIdentifier`, from postgres-protocol).
pub(crate) fn pg_ident(name: &str) -> String {
    postgres_protocol::escape::escape_identifier(name)
}

/// PostgreSQL string literal that is correct whatever `standard_conforming_strings`
/// says (libpq's `PQescapeLiteral`: with backslashes, the ` E''` form).
pub(crate) fn pg_literal(value: &str) -> String {
    postgres_protocol::escape::escape_literal(value)
}

/// MySQL/MariaDB string literal. Backslashes are rejected by [`check_mysql_text`]
/// before this is used, so the result is the same with or without
/// `NO_BACKSLASH_ESCAPES`.
pub(crate) fn mysql_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// MySQL/MariaDB identifier in backticks, embedded backticks doubled.
pub(crate) fn mysql_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// A LIKE pattern matching strings that start with `prefix`, with `_`, `%` and the
/// escape character itself escaped.
pub(crate) fn like_prefix(prefix: &str) -> String {
    let mut pattern = String::with_capacity(prefix.len() + 2);
    for c in prefix.chars() {
        if matches!(c, '_' | '%') || c == LIKE_ESCAPE {
            pattern.push(LIKE_ESCAPE);
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

/// Names must be non-empty, of bounded length, free of NUL and control characters.
pub(crate) fn check_name(kind: &str, name: &str, max_bytes: usize) -> Result<(), BackendError> {
    if name.is_empty() {
        return Err(BackendError::Invalid(format!("empty {kind} name")));
    }
    if name.len() > max_bytes {
        return Err(BackendError::Invalid(format!(
            "{kind} name `{name}` is longer than {max_bytes} bytes"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(BackendError::Invalid(format!(
            "{kind} name contains a control character"
        )));
    }
    Ok(())
}

/// MySQL text spliced into a statement: no backslash (its meaning depends on the
/// SQL mode), no NUL.
pub(crate) fn check_mysql_text(kind: &str, text: &str) -> Result<(), BackendError> {
    if text.contains('\\') {
        return Err(BackendError::Invalid(format!(
            "{kind} `{text}` contains a backslash"
        )));
    }
    Ok(())
}

/// A raw privilege clause from the spec: one statement only.
pub(crate) fn check_grant_clause(clause: &str) -> Result<(), BackendError> {
    let trimmed = clause.trim();
    if trimmed.is_empty() {
        return Err(BackendError::Invalid("empty grant clause".into()));
    }
    if trimmed.contains(';') || trimmed.chars().any(char::is_control) || trimmed.contains("--") {
        return Err(BackendError::Invalid(format!(
            "grant clause `{trimmed}` must be a single privilege clause"
        )));
    }
    Ok(())
}

/// Remove every secret from a message that may quote a statement or a server reply.
pub(crate) fn redact(message: impl Into<String>, secrets: &[&str]) -> String {
    let mut message = message.into();
    for secret in secrets {
        if !secret.is_empty() && message.contains(secret) {
            message = message.replace(secret, "[redacted]");
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pg_quoting() {
        assert_eq!(pg_ident("app"), "\"app\"");
        assert_eq!(pg_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(pg_literal("it's"), "'it''s'");
        assert_eq!(pg_literal("a\\b'"), " E'a\\\\b'''");
    }

    #[test]
    fn mysql_quoting() {
        assert_eq!(mysql_literal("o'neil"), "'o''neil'");
        assert_eq!(mysql_ident("ro`le"), "`ro``le`");
        assert!(check_mysql_text("user", "a\\b").is_err());
    }

    #[test]
    fn like_prefix_escapes_wildcards() {
        assert_eq!(like_prefix("app_"), "app!_%");
        assert_eq!(like_prefix("50%!"), "50!%!!%");
        assert_eq!(like_prefix(""), "%");
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("user", "", 63).is_err());
        assert!(check_name("user", &"a".repeat(64), 63).is_err());
        assert!(check_name("user", "a\0b", 63).is_err());
        assert!(check_name("user", "lease_abc-1", 63).is_ok());
    }

    #[test]
    fn grant_clauses_are_single_statements() {
        assert!(check_grant_clause("SELECT ON ALL TABLES IN SCHEMA public").is_ok());
        assert!(check_grant_clause("SELECT ON t TO x; DROP TABLE t").is_err());
        assert!(check_grant_clause("  ").is_err());
        assert!(check_grant_clause("SELECT ON t -- comment").is_err());
    }

    #[test]
    fn redaction_removes_every_secret() {
        let out = redact("near 'hunter2' and SCRAM$x", &["hunter2", "SCRAM$x", ""]);
        assert_eq!(out, "near '[redacted]' and [redacted]");
    }
}
