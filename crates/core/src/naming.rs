//! Deterministic credential names.
//!
//! A repeated Issue step after a crash must find its own earlier work, so the name of
//! version `n` of a lease is a pure function of the lease's identity, the template and `n`.

use thiserror::Error;

/// The placeholders a username template may use.
pub const PLACEHOLDERS: &[&str] = &["{{namespace}}", "{{name}}", "{{uid}}", "{{version}}"];

/// Default template for `Dynamic`: readable, unique per lease (UID prefix) and version.
pub const DEFAULT_DYNAMIC_TEMPLATE: &str = "lh_{{uid}}_v{{version}}";

/// Identity of the lease a name is derived from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseIdentity {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NamingError {
    #[error("usernameTemplate must contain {{{{version}}}} so every version gets its own user")]
    MissingVersion,
    #[error(
        "usernameTemplate must have {{{{uid}}}} as its first placeholder (for example \"lh_{{{{uid}}}}_{{{{name}}}}_v{{{{version}}}}\"): \
         only the lease UID at a fixed place keeps two leases from rendering the same user \
         ({{{{namespace}}}} and {{{{name}}}} are not unique once '-' and '.' become '_', nor in front of the UID)"
    )]
    NotUnique,
    #[error(
        "usernameTemplate must start with at least 2 literal characters (for example \"lh_\") so leasehold can recognise its own users"
    )]
    NoLiteralPrefix,
    #[error(
        "usernameTemplate contains an unknown placeholder {0:?}; use {{{{namespace}}}}, {{{{name}}}}, {{{{uid}}}} or {{{{version}}}}"
    )]
    UnknownPlaceholder(String),
    #[error(
        "the rendered username {name:?} is {len} characters; the limit for this database is {max}"
    )]
    TooLong {
        name: String,
        len: usize,
        max: usize,
    },
}

/// Check a Dynamic username template before use.
pub fn check_template(template: &str) -> Result<(), NamingError> {
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start..];
        let end = after.find("}}").map(|e| e + 2).unwrap_or(after.len());
        let placeholder = &after[..end];
        if !PLACEHOLDERS.contains(&placeholder) {
            return Err(NamingError::UnknownPlaceholder(placeholder.to_string()));
        }
        rest = &after[end..];
    }
    if !template.contains("{{version}}") {
        return Err(NamingError::MissingVersion);
    }
    // Injective across leases: everything before `{{uid}}` is literal, so the UID (a fixed
    // 12 hex digits) sits at the same offset in every rendering, and two leases with
    // different UIDs never render the same name whatever their namespaces and names.
    // Across versions of one lease only `{{version}}` (decimal, no leading zeros) varies.
    let unique = template
        .find("{{")
        .is_some_and(|i| template[i..].starts_with("{{uid}}"));
    if !unique {
        return Err(NamingError::NotUnique);
    }
    if literal_prefix(template).len() < 2 {
        return Err(NamingError::NoLiteralPrefix);
    }
    Ok(())
}

/// The literal text before the first placeholder: what the orphan sweeper searches for.
pub fn literal_prefix(template: &str) -> &str {
    template.find("{{").map_or(template, |i| &template[..i])
}

/// Database identifiers are safest in lower-case ASCII letters, digits and `_`.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// The first 12 hex digits of a UID, enough to tell leases apart.
pub fn short_uid(uid: &str) -> String {
    uid.chars()
        .filter(char::is_ascii_hexdigit)
        .take(12)
        .collect::<String>()
        .to_ascii_lowercase()
}

/// Render the Dynamic username of `version`.
pub fn dynamic_username(
    template: &str,
    lease: &LeaseIdentity,
    version: u64,
    max_len: usize,
) -> Result<String, NamingError> {
    check_template(template)?;
    let name = template
        .replace("{{namespace}}", &sanitize(&lease.namespace))
        .replace("{{name}}", &sanitize(&lease.name))
        .replace("{{uid}}", &short_uid(&lease.uid))
        .replace("{{version}}", &version.to_string());
    if name.len() > max_len {
        return Err(NamingError::TooLong {
            len: name.len(),
            name,
            max: max_len,
        });
    }
    Ok(name)
}

/// The user a new `AlternatingUsers` version goes to: of `<base>_a` and `<base>_b`, the
/// one the current version does not hold (`<base>_a` when nothing is current).
///
/// The slot comes from the recorded current user, never from the version number: failed
/// attempts use up version numbers, so parity would sooner or later point a new version
/// (and the revocation that follows its failure) at the current user.
pub fn alternating_username(base: &str, current: Option<&str>) -> String {
    let a = format!("{base}_a");
    if current == Some(a.as_str()) {
        format!("{base}_b")
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease() -> LeaseIdentity {
        LeaseIdentity {
            namespace: "shop".into(),
            name: "orders-db".into(),
            uid: "3f2a9c1e-77d0-4b8e-9a51-0c6e2f1d9b34".into(),
        }
    }

    #[test]
    fn default_template_is_deterministic() {
        let a = dynamic_username(DEFAULT_DYNAMIC_TEMPLATE, &lease(), 7, 63).unwrap();
        assert_eq!(a, "lh_3f2a9c1e77d0_v7");
        assert_eq!(
            a,
            dynamic_username(DEFAULT_DYNAMIC_TEMPLATE, &lease(), 7, 63).unwrap()
        );
    }

    #[test]
    fn names_are_sanitized() {
        let n = dynamic_username(
            "app_{{uid}}_{{namespace}}_{{name}}_{{version}}",
            &lease(),
            2,
            63,
        )
        .unwrap();
        assert_eq!(n, "app_3f2a9c1e77d0_shop_orders_db_2");
    }

    #[test]
    fn templates_that_let_two_leases_render_one_user_are_refused() {
        // `-` and `.` both become `_`: these two leases rendered the same user.
        let a = LeaseIdentity {
            namespace: "a-b".into(),
            name: "c".into(),
            uid: "11111111-1111-1111-1111-111111111111".into(),
        };
        let b = LeaseIdentity {
            namespace: "a".into(),
            name: "b.c".into(),
            uid: "22222222-2222-2222-2222-222222222222".into(),
        };
        for t in [
            "app_{{namespace}}_{{name}}_{{version}}",
            // Variable text in front of the UID shifts it: "ab"+uid vs "a"+"b…".
            "app_{{name}}{{uid}}{{version}}",
            "app_{{namespace}}_{{uid}}_{{version}}",
        ] {
            assert_eq!(check_template(t), Err(NamingError::NotUnique), "{t}");
        }
        let ok = "app_{{uid}}_{{namespace}}_{{name}}_{{version}}";
        check_template(ok).unwrap();
        assert_ne!(
            dynamic_username(ok, &a, 1, 63).unwrap(),
            dynamic_username(ok, &b, 1, 63).unwrap()
        );
        assert!(
            NamingError::NotUnique
                .to_string()
                .contains("usernameTemplate"),
            "the error names the field"
        );
    }

    #[test]
    fn template_errors() {
        assert_eq!(
            check_template("lh_{{uid}}"),
            Err(NamingError::MissingVersion)
        );
        assert_eq!(
            check_template("lh_{{name}}_{{version}}"),
            Err(NamingError::NotUnique)
        );
        assert_eq!(
            check_template("{{uid}}_{{version}}"),
            Err(NamingError::NoLiteralPrefix)
        );
        assert!(matches!(
            check_template("lh_{{uid}}_{{bogus}}_{{version}}"),
            Err(NamingError::UnknownPlaceholder(p)) if p == "{{bogus}}"
        ));
        assert!(matches!(
            dynamic_username(
                "lh_{{uid}}_{{namespace}}_{{name}}_{{version}}",
                &lease(),
                1,
                20
            ),
            Err(NamingError::TooLong { max: 20, .. })
        ));
    }

    #[test]
    fn alternating_slot_is_the_one_not_current() {
        assert_eq!(alternating_username("orders", None), "orders_a");
        assert_eq!(alternating_username("orders", Some("orders_a")), "orders_b");
        assert_eq!(alternating_username("orders", Some("orders_b")), "orders_a");
        // A current user from another base (renamed lease): start at `_a`.
        assert_eq!(alternating_username("orders", Some("other_a")), "orders_a");
    }
}
