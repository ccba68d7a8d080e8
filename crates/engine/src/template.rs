//! Rendering of Secret keys and CSI files from a credential.

use std::collections::BTreeMap;

use leasehold_backends::CredentialMaterial;
use secrecy::{ExposeSecret, SecretString};

/// The values a template can use. `password` is secret; the rest are not.
#[derive(Clone)]
pub struct CredentialValues {
    pub username: String,
    pub password: SecretString,
    pub host: String,
    pub port: u16,
    pub database: String,
    /// `postgres` or `mysql` (URI scheme).
    pub scheme: &'static str,
    pub version: u64,
}

impl std::fmt::Debug for CredentialValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialValues")
            .field("username", &self.username)
            .field("password", &"[redacted]")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("version", &self.version)
            .finish()
    }
}

impl CredentialValues {
    fn uri(&self) -> String {
        format!(
            "{}://{}:{}@{}:{}/{}",
            self.scheme,
            percent_encode(&self.username),
            percent_encode(self.password.expose_secret()),
            self.host,
            self.port,
            percent_encode(&self.database)
        )
    }

    fn lookup(&self, key: &str) -> Option<String> {
        Some(match key {
            "username" => self.username.clone(),
            "password" => self.password.expose_secret().to_string(),
            "host" => self.host.clone(),
            "port" => self.port.to_string(),
            "database" => self.database.clone(),
            "uri" => self.uri(),
            "version" => self.version.to_string(),
            _ => return None,
        })
    }
}

/// Default keys/files when the lease names none.
pub fn default_templates() -> BTreeMap<String, String> {
    [
        ("username", "{{ username }}"),
        ("password", "{{ password }}"),
        ("uri", "{{ uri }}"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Render every template. Unknown placeholders were rejected by validation; here they
/// render as empty text rather than failing delivery.
pub fn render(
    templates: &BTreeMap<String, String>,
    values: &CredentialValues,
) -> CredentialMaterial {
    let templates = if templates.is_empty() {
        default_templates()
    } else {
        templates.clone()
    };
    let mut out = BTreeMap::new();
    for (key, template) in &templates {
        let mut rendered = String::with_capacity(template.len() + 32);
        let mut rest = template.as_str();
        while let Some(start) = rest.find("{{") {
            rendered.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            match after.find("}}") {
                Some(end) => {
                    rendered.push_str(&values.lookup(after[..end].trim()).unwrap_or_default());
                    rest = &after[end + 2..];
                }
                None => {
                    rendered.push_str(&rest[start..]);
                    rest = "";
                }
            }
        }
        rendered.push_str(rest);
        out.insert(key.clone(), SecretString::from(rendered));
    }
    CredentialMaterial(out)
}

/// RFC 3986 unreserved characters stay; everything else in user info is escaped.
const USERINFO: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, USERINFO).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_defaults_and_redacts_debug() {
        let values = CredentialValues {
            username: "lh_1".into(),
            password: SecretString::from("p@ss word"),
            host: "db".into(),
            port: 5432,
            database: "app".into(),
            scheme: "postgres",
            version: 3,
        };
        let material = render(&BTreeMap::new(), &values);
        assert_eq!(
            material.0["uri"].expose_secret(),
            "postgres://lh_1:p%40ss%20word@db:5432/app"
        );
        assert_eq!(material.0["password"].expose_secret(), "p@ss word");
        assert!(!format!("{values:?} {material:?}").contains("p@ss"));
        let custom = [(
            "dsn".to_string(),
            "user={{username}} v={{ version }}".to_string(),
        )]
        .into();
        assert_eq!(
            render(&custom, &values).0["dsn"].expose_secret(),
            "user=lh_1 v=3"
        );
    }
}
