//! The claims of a Kubernetes service-account token that `jsonwebtoken` does
//! not check for us: the `kubernetes.io` binding, `sub`, `iat`, and `exp` (to
//! report it). `iss`, `aud`, `exp` and `nbf` are validated by `jsonwebtoken`.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Visitor};

#[derive(Deserialize)]
pub(crate) struct Claims {
    #[serde(default)]
    pub(crate) sub: Option<String>,
    #[serde(default, deserialize_with = "numeric_date")]
    pub(crate) exp: Option<i64>,
    #[serde(default, deserialize_with = "numeric_date")]
    pub(crate) iat: Option<i64>,
    #[serde(default, rename = "kubernetes.io")]
    pub(crate) kubernetes: Option<KubernetesClaim>,
}

#[derive(Deserialize)]
pub(crate) struct KubernetesClaim {
    pub(crate) namespace: String,
    pub(crate) serviceaccount: ObjectRef,
    #[serde(default)]
    pub(crate) pod: Option<ObjectRef>,
    #[serde(default)]
    pub(crate) node: Option<ObjectRef>,
}

#[derive(Deserialize)]
pub(crate) struct ObjectRef {
    pub(crate) name: String,
    pub(crate) uid: String,
}

/// NumericDate: seconds since the epoch, integer or fractional (truncated).
fn numeric_date<'de, D: de::Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    struct DateVisitor;

    impl Visitor<'_> for DateVisitor {
        type Value = i64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a number of seconds since the epoch")
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v).map_err(|_| E::custom("date out of range"))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<i64, E> {
            // Bounds keep the cast exact enough and reject NaN and infinities.
            if v.is_finite() && v.abs() < 1e15 {
                #[allow(clippy::cast_possible_truncation)]
                Ok(v.floor() as i64)
            } else {
                Err(E::custom("date out of range"))
            }
        }
    }

    deserializer.deserialize_any(DateVisitor).map(Some)
}

/// Splits `system:serviceaccount:<namespace>:<name>`.
pub(crate) fn parse_subject(sub: &str) -> Option<(&str, &str)> {
    let rest = sub.strip_prefix("system:serviceaccount:")?;
    let (namespace, name) = rest.split_once(':')?;
    if namespace.is_empty() || name.is_empty() || name.contains(':') {
        return None;
    }
    Some((namespace, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_duplicates() {
        let c: Claims = serde_json::from_str(r#"{"exp":10,"iat":1.9}"#).expect("dates");
        assert_eq!((c.exp, c.iat), (Some(10), Some(1)));
        assert!(serde_json::from_str::<Claims>(r#"{"exp":"10"}"#).is_err());
        assert!(serde_json::from_str::<Claims>(r#"{"exp":1,"exp":2}"#).is_err());
        let c: Claims = serde_json::from_str(r#"{"aud":3,"other":[1]}"#).expect("ignored");
        assert!(c.exp.is_none() && c.kubernetes.is_none());
    }

    #[test]
    fn subjects() {
        assert_eq!(
            parse_subject("system:serviceaccount:ns:sa"),
            Some(("ns", "sa"))
        );
        assert_eq!(parse_subject("system:serviceaccount:ns"), None);
        assert_eq!(parse_subject("system:serviceaccount::sa"), None);
        assert_eq!(parse_subject("system:serviceaccount:ns:a:b"), None);
        assert_eq!(parse_subject("system:node:n"), None);
    }
}
