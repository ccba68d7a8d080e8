//! The privileges a lease grants its users, parsed into a structured form.
//!
//! A lease lists its grants as text (`spec.<db>.grants`, kept as strings for
//! compatibility), but that text is never spliced into SQL: it is parsed here into
//! privileges from an allowlist and one object, and the backends build the `GRANT`
//! from the parsed form with their own identifier quoting. Whatever does not parse
//! (comments, `;`, `TO`, string quotes, `WITH GRANT OPTION`, several objects, global
//! privileges) is refused with an error naming the grant.
//!
//! Accepted forms (keywords in any case; identifiers plain or quoted, PostgreSQL with
//! `"..."`, MySQL with `` `...` ``):
//!
//! PostgreSQL, `<privileges> ON <object>`:
//! * `[TABLE] [schema.]table`: SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER
//! * `SEQUENCE [schema.]sequence`: USAGE, SELECT, UPDATE
//! * `SCHEMA schema`: USAGE, CREATE
//! * `DATABASE database`: CONNECT, TEMPORARY (or TEMP), CREATE
//! * `ALL TABLES IN SCHEMA schema`, `ALL SEQUENCES IN SCHEMA schema`: as for one
//!   table or sequence
//! * `ALL FUNCTIONS IN SCHEMA schema`: EXECUTE
//!
//! MySQL / MariaDB, `<privileges> ON <database>.*` or `<privileges> ON <database>.<table>`:
//! SELECT, INSERT, UPDATE, DELETE, CREATE, DROP, ALTER, INDEX, REFERENCES, CREATE VIEW,
//! SHOW VIEW, TRIGGER, DELETE HISTORY, and on a whole database also CREATE TEMPORARY
//! TABLES, LOCK TABLES, EXECUTE, CREATE ROUTINE, ALTER ROUTINE, EVENT.
//!
//! `ALL` (or `ALL PRIVILEGES`) stands for every privilege of the object's kind.

#![forbid(unsafe_code)]

use std::fmt;

/// Why a grant was refused. The message names the grant and says what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("grant {grant:?} is not accepted: {reason}")]
pub struct GrantError {
    /// The grant as written (never secret).
    pub grant: String,
    /// What is wrong and what to write instead.
    pub reason: String,
}

/// Which SQL dialect a grant is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    MySql,
}

/// The privileges of one grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrivilegeSet {
    /// `ALL [PRIVILEGES]`: every privilege of the object's kind.
    All,
    /// Upper-case privilege names from the allowlist, each once, in the order written
    /// (multi-word names with single spaces, e.g. `CREATE VIEW`).
    Listed(Vec<String>),
}

impl PrivilegeSet {
    /// The privilege list as SQL: only allowlisted keywords, safe to splice.
    pub fn to_sql(&self) -> String {
        match self {
            Self::All => "ALL PRIVILEGES".to_owned(),
            Self::Listed(names) => names.join(", "),
        }
    }
}

/// A PostgreSQL object a grant is on. Identifiers are as the server stores them
/// (unquoted ones folded to lower case) and must be quoted when built into SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgObject {
    Table {
        schema: Option<String>,
        name: String,
    },
    Sequence {
        schema: Option<String>,
        name: String,
    },
    Schema(String),
    Database(String),
    AllTablesInSchema(String),
    AllSequencesInSchema(String),
    AllFunctionsInSchema(String),
}

/// A parsed PostgreSQL grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgGrant {
    pub privileges: PrivilegeSet,
    pub object: PgObject,
}

/// A MySQL / MariaDB object a grant is on. Identifiers are unquoted and must be
/// quoted when built into SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MySqlObject {
    /// `database.*`
    Database(String),
    /// `database.table`
    Table { database: String, table: String },
}

/// A parsed MySQL / MariaDB grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MySqlGrant {
    pub privileges: PrivilegeSet,
    pub object: MySqlObject,
}

const PG_TABLE: &[&str] = &[
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "TRUNCATE",
    "REFERENCES",
    "TRIGGER",
];
const PG_SEQUENCE: &[&str] = &["USAGE", "SELECT", "UPDATE"];
const PG_SCHEMA: &[&str] = &["USAGE", "CREATE"];
const PG_DATABASE: &[&str] = &["CONNECT", "TEMPORARY", "CREATE"];
const PG_FUNCTION: &[&str] = &["EXECUTE"];

/// Privileges MySQL / MariaDB accept on one table.
pub const MYSQL_TABLE_PRIVILEGES: &[&str] = &[
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "CREATE",
    "DROP",
    "ALTER",
    "INDEX",
    "REFERENCES",
    "CREATE VIEW",
    "SHOW VIEW",
    "TRIGGER",
    "DELETE HISTORY",
];
/// Privileges MySQL / MariaDB accept on a whole database (`db.*`).
pub const MYSQL_DATABASE_PRIVILEGES: &[&str] = &[
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "CREATE",
    "DROP",
    "ALTER",
    "INDEX",
    "REFERENCES",
    "CREATE VIEW",
    "SHOW VIEW",
    "TRIGGER",
    "DELETE HISTORY",
    "CREATE TEMPORARY TABLES",
    "LOCK TABLES",
    "EXECUTE",
    "CREATE ROUTINE",
    "ALTER ROUTINE",
    "EVENT",
];

/// PostgreSQL truncates longer names; refuse them instead.
const PG_MAX_IDENT_BYTES: usize = 63;
/// MySQL and MariaDB allow 64 characters for database and table names.
const MYSQL_MAX_IDENT_CHARS: usize = 64;

impl PgObject {
    fn allowed(&self) -> &'static [&'static str] {
        match self {
            Self::Table { .. } | Self::AllTablesInSchema(_) => PG_TABLE,
            Self::Sequence { .. } | Self::AllSequencesInSchema(_) => PG_SEQUENCE,
            Self::Schema(_) => PG_SCHEMA,
            Self::Database(_) => PG_DATABASE,
            Self::AllFunctionsInSchema(_) => PG_FUNCTION,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Table { .. } => "a table",
            Self::AllTablesInSchema(_) => "all tables in a schema",
            Self::Sequence { .. } => "a sequence",
            Self::AllSequencesInSchema(_) => "all sequences in a schema",
            Self::Schema(_) => "a schema",
            Self::Database(_) => "a database",
            Self::AllFunctionsInSchema(_) => "all functions in a schema",
        }
    }
}

impl MySqlObject {
    fn allowed(&self) -> &'static [&'static str] {
        match self {
            Self::Database(_) => MYSQL_DATABASE_PRIVILEGES,
            Self::Table { .. } => MYSQL_TABLE_PRIVILEGES,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Database(_) => "a database (db.*)",
            Self::Table { .. } => "a table",
        }
    }
}

/// Check a grant in the given dialect.
pub fn check(dialect: Dialect, grant: &str) -> Result<(), GrantError> {
    match dialect {
        Dialect::Postgres => parse_postgres(grant).map(drop),
        Dialect::MySql => parse_mysql(grant).map(drop),
    }
}

/// Parse a PostgreSQL grant: `<privileges> ON <object>`.
pub fn parse_postgres(grant: &str) -> Result<PgGrant, GrantError> {
    let mut p = Parser::new(grant, Dialect::Postgres)?;
    let privileges = p.privileges()?;
    let object = if p.keyword("TABLE") {
        let (schema, name) = p.pg_qualified()?;
        PgObject::Table { schema, name }
    } else if p.keyword("SEQUENCE") {
        let (schema, name) = p.pg_qualified()?;
        PgObject::Sequence { schema, name }
    } else if p.keyword("SCHEMA") {
        PgObject::Schema(p.ident()?)
    } else if p.keyword("DATABASE") {
        PgObject::Database(p.ident()?)
    } else if p.peek_keyword("ALL") {
        p.pos += 1;
        let kind = p.word_upper().ok_or_else(|| {
            p.error("after ON ALL write TABLES, SEQUENCES or FUNCTIONS IN SCHEMA <schema>")
        })?;
        if !(p.keyword("IN") && p.keyword("SCHEMA")) {
            return Err(p.error(format!("write ALL {kind} IN SCHEMA <schema>")));
        }
        let schema = p.ident()?;
        match kind.as_str() {
            "TABLES" => PgObject::AllTablesInSchema(schema),
            "SEQUENCES" => PgObject::AllSequencesInSchema(schema),
            "FUNCTIONS" => PgObject::AllFunctionsInSchema(schema),
            _ => {
                return Err(p.error("after ON ALL write TABLES, SEQUENCES or FUNCTIONS"));
            }
        }
    } else {
        let (schema, name) = p.pg_qualified()?;
        PgObject::Table { schema, name }
    };
    p.end()?;
    let privileges = p.check_allowed(privileges, object.allowed(), object.kind())?;
    Ok(PgGrant { privileges, object })
}

/// Parse a MySQL / MariaDB grant: `<privileges> ON <database>.*` or
/// `<privileges> ON <database>.<table>`.
pub fn parse_mysql(grant: &str) -> Result<MySqlGrant, GrantError> {
    let mut p = Parser::new(grant, Dialect::MySql)?;
    let privileges = p.privileges()?;
    if p.peek() == Some(&Token::Star) {
        return Err(p.error(
            "global (*.*) and current-database (*) grants are not allowed; name the database, \
             e.g. SELECT ON app.*",
        ));
    }
    let database = p.ident()?;
    if !p.eat(&Token::Dot) {
        return Err(p.error("qualify the table with its database: db.table or db.*"));
    }
    let object = if p.eat(&Token::Star) {
        MySqlObject::Database(database)
    } else {
        MySqlObject::Table {
            database,
            table: p.ident()?,
        }
    };
    p.end()?;
    let privileges = p.check_allowed(privileges, object.allowed(), object.kind())?;
    Ok(MySqlGrant { privileges, object })
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// Letters, digits, `_` and `$`, as written.
    Word(String),
    /// A quoted identifier, quotes removed and doubled quotes undone.
    Quoted(String),
    Comma,
    Dot,
    Star,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Word(w) => write!(f, "`{w}`"),
            Self::Quoted(q) => write!(f, "quoted name {q:?}"),
            Self::Comma => f.write_str("`,`"),
            Self::Dot => f.write_str("`.`"),
            Self::Star => f.write_str("`*`"),
        }
    }
}

struct Parser<'a> {
    grant: &'a str,
    dialect: Dialect,
    tokens: Vec<Token>,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(grant: &'a str, dialect: Dialect) -> Result<Self, GrantError> {
        let error = |reason: String| GrantError {
            grant: grant.to_owned(),
            reason,
        };
        let quote = match dialect {
            Dialect::Postgres => '"',
            Dialect::MySql => '`',
        };
        let mut tokens = Vec::new();
        let mut chars = grant.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                ' ' | '\t' | '\n' | '\r' => {}
                ',' => tokens.push(Token::Comma),
                '.' => tokens.push(Token::Dot),
                '*' => tokens.push(Token::Star),
                c if c == quote => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            None => return Err(error(format!("unclosed {quote}"))),
                            Some(c) if c == quote => {
                                if chars.peek() == Some(&quote) {
                                    chars.next();
                                    name.push(quote);
                                } else {
                                    break;
                                }
                            }
                            Some(c) if c.is_control() => {
                                return Err(error(
                                    "a quoted name contains a control character".into(),
                                ));
                            }
                            Some(c) => name.push(c),
                        }
                    }
                    if name.is_empty() {
                        return Err(error("empty quoted name".into()));
                    }
                    tokens.push(Token::Quoted(name));
                }
                c if c.is_ascii_alphanumeric() || c == '_' || c == '$' => {
                    let mut word = String::from(c);
                    while let Some(&c) = chars.peek() {
                        if c.is_ascii_alphanumeric() || c == '_' || c == '$' {
                            word.push(c);
                            chars.next();
                        } else {
                            break;
                        }
                    }
                    tokens.push(Token::Word(word));
                }
                other => {
                    let shown = if other.is_control() {
                        format!("{:?}", other)
                    } else {
                        format!("`{other}`")
                    };
                    return Err(error(format!(
                        "the character {shown} is not allowed (no comments, ';', string quotes or \
                         operators: write `<privileges> ON <object>`{})",
                        match dialect {
                            Dialect::Postgres => ", names quoted with \"",
                            Dialect::MySql => ", names quoted with `",
                        }
                    )));
                }
            }
        }
        if tokens.is_empty() {
            return Err(error("empty grant".into()));
        }
        Ok(Self {
            grant,
            dialect,
            tokens,
            pos: 0,
        })
    }

    fn error(&self, reason: impl Into<String>) -> GrantError {
        GrantError {
            grant: self.grant.to_owned(),
            reason: reason.into(),
        }
    }

    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn eat(&mut self, token: &Token) -> bool {
        if self.peek() == Some(token) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn peek_keyword(&self, keyword: &str) -> bool {
        matches!(self.peek(), Some(Token::Word(w)) if w.eq_ignore_ascii_case(keyword))
    }

    fn keyword(&mut self, keyword: &str) -> bool {
        if self.peek_keyword(keyword) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn word_upper(&mut self) -> Option<String> {
        match self.peek() {
            Some(Token::Word(w)) => {
                let w = w.to_ascii_uppercase();
                self.pos += 1;
                Some(w)
            }
            _ => None,
        }
    }

    /// Privileges up to and including `ON`, as written (upper case), not yet checked
    /// against an object kind. `None` for `ALL [PRIVILEGES]`.
    fn privileges(&mut self) -> Result<Option<Vec<String>>, GrantError> {
        let mut names = Vec::new();
        let mut current: Vec<String> = Vec::new();
        loop {
            match self.peek() {
                None => {
                    return Err(self.error("missing ON <object>: write `<privileges> ON <object>`"));
                }
                Some(Token::Word(w)) if w.eq_ignore_ascii_case("ON") => {
                    self.pos += 1;
                    break;
                }
                Some(Token::Word(_)) => {
                    if let Some(w) = self.word_upper() {
                        current.push(w);
                    }
                }
                Some(Token::Comma) => {
                    if current.is_empty() {
                        return Err(self.error("a privilege is missing before `,`"));
                    }
                    names.push(current.join(" "));
                    current.clear();
                    self.pos += 1;
                }
                Some(other) => {
                    return Err(self.error(format!("unexpected {other} in the privilege list")));
                }
            }
        }
        if current.is_empty() {
            return Err(self.error("a privilege is missing before ON"));
        }
        names.push(current.join(" "));
        if names.iter().any(|n| n == "ALL" || n == "ALL PRIVILEGES") {
            if names.len() > 1 {
                return Err(self.error("ALL cannot be combined with other privileges"));
            }
            return Ok(None);
        }
        Ok(Some(names))
    }

    fn check_allowed(
        &self,
        privileges: Option<Vec<String>>,
        allowed: &[&str],
        kind: &str,
    ) -> Result<PrivilegeSet, GrantError> {
        let Some(names) = privileges else {
            return Ok(PrivilegeSet::All);
        };
        let mut out: Vec<String> = Vec::new();
        for name in names {
            let name = match (self.dialect, name.as_str()) {
                (Dialect::Postgres, "TEMP") => "TEMPORARY".to_owned(),
                _ => name,
            };
            if !allowed.contains(&name.as_str()) {
                return Err(self.error(format!(
                    "{name} is not a privilege leasehold grants on {kind}; use ALL or some of: {}",
                    allowed.join(", ")
                )));
            }
            if !out.contains(&name) {
                out.push(name);
            }
        }
        Ok(PrivilegeSet::Listed(out))
    }

    fn ident(&mut self) -> Result<String, GrantError> {
        let name = match self.peek().cloned() {
            Some(Token::Word(w)) => {
                let plain_start = match self.dialect {
                    Dialect::Postgres => {
                        w.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                    }
                    Dialect::MySql => !w.bytes().all(|b| b.is_ascii_digit()),
                };
                if !plain_start {
                    return Err(self.error(format!("{w:?} is not a name; quote it")));
                }
                if matches!(
                    w.to_ascii_uppercase().as_str(),
                    "TO" | "FROM" | "WITH" | "ON" | "GRANT" | "GRANTED" | "IN"
                ) {
                    return Err(self.error(format!(
                        "unexpected {w}: write only `<privileges> ON <object>` (no TO, no WITH \
                         GRANT OPTION; leasehold adds the user)"
                    )));
                }
                match self.dialect {
                    // The server folds unquoted names to lower case.
                    Dialect::Postgres => w.to_ascii_lowercase(),
                    Dialect::MySql => w,
                }
            }
            Some(Token::Quoted(q)) => q,
            Some(other) => return Err(self.error(format!("expected a name, found {other}"))),
            None => return Err(self.error("a name is missing at the end")),
        };
        self.pos += 1;
        let too_long = match self.dialect {
            Dialect::Postgres => name.len() > PG_MAX_IDENT_BYTES,
            Dialect::MySql => name.chars().count() > MYSQL_MAX_IDENT_CHARS,
        };
        if too_long {
            return Err(self.error(format!("the name {name:?} is too long")));
        }
        if self.dialect == Dialect::MySql && (name.contains('\\') || name.ends_with(' ')) {
            return Err(self.error(format!(
                "the name {name:?} contains a backslash or ends with a space"
            )));
        }
        Ok(name)
    }

    fn pg_qualified(&mut self) -> Result<(Option<String>, String), GrantError> {
        let first = self.ident()?;
        if self.eat(&Token::Dot) {
            Ok((Some(first), self.ident()?))
        } else {
            Ok((None, first))
        }
    }

    fn end(&self) -> Result<(), GrantError> {
        match self.peek() {
            None => Ok(()),
            Some(Token::Comma) => {
                Err(self.error("one object per grant: write a separate grant for each object"))
            }
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("TO") => {
                Err(self
                    .error("write only `<privileges> ON <object>`: no TO, leasehold adds the user"))
            }
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("WITH") => {
                Err(self.error("WITH GRANT OPTION is not allowed"))
            }
            Some(other) => Err(self.error(format!("unexpected {other} after the object"))),
        }
    }
}

#[cfg(test)]
mod tests;
