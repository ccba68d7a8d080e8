//! Borrowed views of the JWS header and the token's claims. Strings borrow from
//! the decoded buffers unless they contain escapes.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, IgnoredAny, SeqAccess, Visitor};

#[derive(Deserialize)]
pub(crate) struct Header<'a> {
    #[serde(borrow)]
    pub(crate) alg: Str<'a>,
    #[serde(borrow, default)]
    pub(crate) kid: Option<Str<'a>>,
    /// Any critical extension is one we do not understand (RFC 7515 §4.1.11).
    #[serde(default)]
    pub(crate) crit: Option<IgnoredAny>,
}

#[derive(Deserialize)]
pub(crate) struct Claims<'a> {
    #[serde(borrow, default)]
    pub(crate) iss: Option<Str<'a>>,
    #[serde(borrow, default)]
    pub(crate) aud: Audience<'a>,
    #[serde(borrow, default)]
    pub(crate) sub: Option<Str<'a>>,
    #[serde(default, deserialize_with = "numeric_date")]
    pub(crate) exp: Option<i64>,
    #[serde(default, deserialize_with = "numeric_date")]
    pub(crate) nbf: Option<i64>,
    #[serde(default, deserialize_with = "numeric_date")]
    pub(crate) iat: Option<i64>,
    #[serde(borrow, default, rename = "kubernetes.io")]
    pub(crate) kubernetes: Option<KubernetesClaim<'a>>,
}

#[derive(Deserialize)]
pub(crate) struct KubernetesClaim<'a> {
    #[serde(borrow)]
    pub(crate) namespace: Str<'a>,
    #[serde(borrow)]
    pub(crate) serviceaccount: ObjectRef<'a>,
    #[serde(borrow, default)]
    pub(crate) pod: Option<ObjectRef<'a>>,
    #[serde(borrow, default)]
    pub(crate) node: Option<ObjectRef<'a>>,
}

#[derive(Deserialize)]
pub(crate) struct ObjectRef<'a> {
    #[serde(borrow)]
    pub(crate) name: Str<'a>,
    #[serde(borrow)]
    pub(crate) uid: Str<'a>,
}

/// `aud`: a single string or an array of strings (RFC 7519 §4.1.3).
#[derive(Default)]
pub(crate) enum Audience<'a> {
    #[default]
    Absent,
    One(Str<'a>),
    Many(Vec<Str<'a>>),
}

impl Audience<'_> {
    pub(crate) fn contains(&self, wanted: &str) -> bool {
        match self {
            Audience::Absent => false,
            Audience::One(a) => &**a == wanted,
            Audience::Many(all) => all.iter().any(|a| &**a == wanted),
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Audience<'a> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AudienceVisitor;

        impl<'de> Visitor<'de> for AudienceVisitor {
            type Value = Audience<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array of strings")
            }

            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Audience::One(Str(Cow::Borrowed(v))))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Audience::One(Str(Cow::Owned(v.to_owned()))))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut all = Vec::with_capacity(seq.size_hint().unwrap_or(1).min(16));
                while let Some(a) = seq.next_element::<Str<'de>>()? {
                    all.push(a);
                }
                Ok(Audience::Many(all))
            }
        }

        deserializer.deserialize_any(AudienceVisitor)
    }
}

/// A string that borrows from the input when it has no escapes. (serde's own
/// borrowing of `Cow<str>` does not reach inside `Option` or sequences.)
pub(crate) struct Str<'a>(Cow<'a, str>);

impl std::ops::Deref for Str<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StrVisitor;

        impl<'de> Visitor<'de> for StrVisitor {
            type Value = Str<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed(v)))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
        }

        deserializer.deserialize_str(StrVisitor)
    }
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
    fn audience_forms() {
        let c: Claims<'_> = serde_json::from_str(r#"{"aud":"a"}"#).expect("one");
        assert!(c.aud.contains("a") && !c.aud.contains("b"));
        let c: Claims<'_> = serde_json::from_str(r#"{"aud":["b","a"]}"#).expect("many");
        assert!(c.aud.contains("a"));
        let c: Claims<'_> = serde_json::from_str(r#"{}"#).expect("absent");
        assert!(!c.aud.contains(""));
        assert!(serde_json::from_str::<Claims<'_>>(r#"{"aud":3}"#).is_err());
    }

    #[test]
    fn dates_and_duplicates() {
        let c: Claims<'_> = serde_json::from_str(r#"{"exp":10,"nbf":2.9,"iat":1}"#).expect("dates");
        assert_eq!((c.exp, c.nbf, c.iat), (Some(10), Some(2), Some(1)));
        assert!(serde_json::from_str::<Claims<'_>>(r#"{"exp":"10"}"#).is_err());
        assert!(serde_json::from_str::<Claims<'_>>(r#"{"exp":1,"exp":2}"#).is_err());
        assert!(serde_json::from_str::<Header<'_>>(r#"{"alg":"RS256","alg":"none"}"#).is_err());
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
