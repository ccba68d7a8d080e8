//! Quoting of identifiers and literals, LIKE patterns and secret redaction, shared
//! by the SQL backends. Statements like `CREATE ROLE` and `CREATE USER` cannot take
//! bind parameters, so names and verifiers have to be spliced in safely.

use leasehold_grants::{MySqlGrant, MySqlObject, PgGrant, PgObject, parse_mysql, parse_postgres};

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

/// Parse the lease's PostgreSQL grants; the first one that does not parse is an
/// [`BackendError::Invalid`] naming it. The last line behind the spec validation.
pub(crate) fn pg_grants(grants: &[String]) -> Result<Vec<PgGrant>, BackendError> {
    grants
        .iter()
        .map(|g| parse_postgres(g).map_err(|e| BackendError::Invalid(e.to_string())))
        .collect()
}

/// Parse the lease's MySQL grants (see [`pg_grants`]).
pub(crate) fn mysql_grants(grants: &[String]) -> Result<Vec<MySqlGrant>, BackendError> {
    grants
        .iter()
        .map(|g| parse_mysql(g).map_err(|e| BackendError::Invalid(e.to_string())))
        .collect()
}

/// `<privileges> ON <object>` of a parsed PostgreSQL grant, every name quoted: the
/// user's text is never spliced.
pub(crate) fn pg_grant_clause(grant: &PgGrant) -> String {
    let qualified = |schema: &Option<String>, name: &str| match schema {
        Some(schema) => format!("{}.{}", pg_ident(schema), pg_ident(name)),
        None => pg_ident(name),
    };
    let object = match &grant.object {
        PgObject::Table { schema, name } => format!("TABLE {}", qualified(schema, name)),
        PgObject::Sequence { schema, name } => format!("SEQUENCE {}", qualified(schema, name)),
        PgObject::Schema(s) => format!("SCHEMA {}", pg_ident(s)),
        PgObject::Database(d) => format!("DATABASE {}", pg_ident(d)),
        PgObject::AllTablesInSchema(s) => format!("ALL TABLES IN SCHEMA {}", pg_ident(s)),
        PgObject::AllSequencesInSchema(s) => format!("ALL SEQUENCES IN SCHEMA {}", pg_ident(s)),
        PgObject::AllFunctionsInSchema(s) => format!("ALL FUNCTIONS IN SCHEMA {}", pg_ident(s)),
    };
    format!("{} ON {object}", grant.privileges.to_sql())
}

/// The object of a parsed MySQL grant, names in backticks: `` `db`.* `` or
/// `` `db`.`table` ``.
pub(crate) fn mysql_grant_object(object: &MySqlObject) -> String {
    match object {
        MySqlObject::Database(d) => format!("{}.*", mysql_ident(d)),
        MySqlObject::Table { database, table } => {
            format!("{}.{}", mysql_ident(database), mysql_ident(table))
        }
    }
}

/// `<privileges> ON <object>` of a parsed MySQL grant (see [`pg_grant_clause`]).
pub(crate) fn mysql_grant_clause(grant: &MySqlGrant) -> String {
    format!(
        "{} ON {}",
        grant.privileges.to_sql(),
        mysql_grant_object(&grant.object)
    )
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
    fn grants_are_rebuilt_with_quoted_names() {
        let g = pg_grants(&["select, INSERT on app.\"Or\"\"ders\"".into()]).expect("parses");
        assert_eq!(
            pg_grant_clause(&g[0]),
            "SELECT, INSERT ON TABLE \"app\".\"Or\"\"ders\""
        );
        let g = pg_grants(&["ALL ON ALL TABLES IN SCHEMA public".into()]).expect("parses");
        assert_eq!(
            pg_grant_clause(&g[0]),
            "ALL PRIVILEGES ON ALL TABLES IN SCHEMA \"public\""
        );
        let g = mysql_grants(&["select ON `a``b`.t".into()]).expect("parses");
        assert_eq!(mysql_grant_clause(&g[0]), "SELECT ON `a``b`.`t`");
        assert!(matches!(
            pg_grants(&["SELECT ON t/**/TO/**/x".into()]),
            Err(BackendError::Invalid(m)) if m.contains("SELECT ON t/**/TO/**/x")
        ));
        assert!(mysql_grants(&["SELECT ON app.*# x".into()]).is_err());
    }

    #[test]
    fn redaction_removes_every_secret() {
        let out = redact("near 'hunter2' and SCRAM$x", &["hunter2", "SCRAM$x", ""]);
        assert_eq!(out, "near '[redacted]' and [redacted]");
    }
}
