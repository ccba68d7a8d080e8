use super::*;

fn pg(g: &str) -> PgGrant {
    parse_postgres(g).unwrap_or_else(|e| panic!("{g}: {e}"))
}

fn my(g: &str) -> MySqlGrant {
    parse_mysql(g).unwrap_or_else(|e| panic!("{g}: {e}"))
}

fn listed(names: &[&str]) -> PrivilegeSet {
    PrivilegeSet::Listed(names.iter().map(|n| (*n).to_owned()).collect())
}

#[test]
fn postgres_forms() {
    assert_eq!(
        pg("SELECT, insert ON TABLE orders"),
        PgGrant {
            privileges: listed(&["SELECT", "INSERT"]),
            object: PgObject::Table {
                schema: None,
                name: "orders".into()
            }
        }
    );
    assert_eq!(
        pg("select on App.\"Weird \"\" Name\"").object,
        PgObject::Table {
            schema: Some("app".into()),
            name: "Weird \" Name".into()
        }
    );
    assert_eq!(
        pg("USAGE ON SCHEMA app").object,
        PgObject::Schema("app".into())
    );
    assert_eq!(
        pg("ALL ON ALL TABLES IN SCHEMA app"),
        PgGrant {
            privileges: PrivilegeSet::All,
            object: PgObject::AllTablesInSchema("app".into())
        }
    );
    assert_eq!(
        pg("ALL PRIVILEGES ON ALL SEQUENCES IN SCHEMA public").object,
        PgObject::AllSequencesInSchema("public".into())
    );
    assert_eq!(
        pg("EXECUTE ON ALL FUNCTIONS IN SCHEMA public").object,
        PgObject::AllFunctionsInSchema("public".into())
    );
    assert_eq!(
        pg("CONNECT, TEMP ON DATABASE shop").privileges,
        listed(&["CONNECT", "TEMPORARY"])
    );
    assert_eq!(
        pg("USAGE, SELECT ON SEQUENCE app.ids").object,
        PgObject::Sequence {
            schema: Some("app".into()),
            name: "ids".into()
        }
    );
    assert_eq!(pg("SELECT, SELECT ON t").privileges, listed(&["SELECT"]));
}

#[test]
fn mysql_forms() {
    assert_eq!(
        my("SELECT ON app.*"),
        MySqlGrant {
            privileges: listed(&["SELECT"]),
            object: MySqlObject::Database("app".into())
        }
    );
    assert_eq!(
        my("select, create view ON `my-db`.`Orders`"),
        MySqlGrant {
            privileges: listed(&["SELECT", "CREATE VIEW"]),
            object: MySqlObject::Table {
                database: "my-db".into(),
                table: "Orders".into()
            }
        }
    );
    assert_eq!(my("ALL PRIVILEGES ON app.*").privileges, PrivilegeSet::All);
    assert_eq!(
        my("CREATE TEMPORARY TABLES, LOCK TABLES ON app.*").privileges,
        listed(&["CREATE TEMPORARY TABLES", "LOCK TABLES"])
    );
}

#[test]
fn injection_attempts_are_refused() {
    for g in [
        "SELECT ON t TO bob; DROP TABLE t",
        "SELECT ON t/**/TO/**/bob",
        "SELECT ON t -- comment",
        "SELECT ON t TO bob",
        "SELECT ON t, u",
        "SELECT ON TABLE t WITH GRANT OPTION",
        "SELECT ON 't'",
        "SELECT ON `t`",
        "SELECT ON \"t",
        "SELECT ON \"\"",
        "SELECT ON t\0",
        "pg_read_all_data",
        "SELECT",
        "",
        "   ",
        "SELECT ON SCHEMA app",
        "USAGE ON TABLE t",
        "ALL, SELECT ON t",
        "CREATEROLE ON DATABASE d",
        "SELECT ON ALL VIEWS IN SCHEMA app",
        "SELECT ON ALL TABLES app",
        "SELECT ON a.b.c",
        "SELECT ON TO",
        "SELECT ON $x",
    ] {
        let err = parse_postgres(g).expect_err(g);
        assert_eq!(err.grant, g);
        assert!(err.to_string().contains(&format!("{g:?}")), "{err}");
    }
    for g in [
        "SELECT ON app.* TO 'x'@'%'",
        "SELECT ON app.*# comment",
        "SELECT ON app.* -- comment",
        "SELECT ON app.*/**/TO/**/x",
        "SELECT ON app.*; DROP USER x",
        "SELECT ON *.*",
        "SELECT ON *",
        "SELECT ON orders",
        "SELECT ON \"app\".*",
        "SELECT ON 'app'.*",
        "SELECT ON `a\\b`.*",
        "SUPER ON app.*",
        "GRANT OPTION ON app.*",
        "SELECT ON app.* WITH GRANT OPTION",
        "EXECUTE ON app.t",
        "SELECT (col) ON app.t",
        "PROXY ON app.*",
        "SELECT ON `app",
    ] {
        let err = parse_mysql(g).expect_err(g);
        assert!(err.to_string().contains(&format!("{g:?}")), "{err}");
    }
}

#[test]
fn errors_say_what_is_accepted() {
    let err = parse_postgres("SELECT ON SCHEMA app").expect_err("wrong kind");
    assert!(err.reason.contains("USAGE, CREATE"), "{err}");
    let err = parse_mysql("SELECT ON app.* TO x").expect_err("TO");
    assert!(err.reason.contains("no TO"), "{err}");
    assert!(check(Dialect::MySql, "SELECT ON app.*").is_ok());
    assert!(check(Dialect::Postgres, "SELECT ON app.*").is_err());
}
