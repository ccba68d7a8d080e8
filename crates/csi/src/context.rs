//! Typed view of a `NodePublishVolume` request's `volume_context`.

use std::collections::HashMap;

use secrecy::SecretString;
use serde::Deserialize;

use crate::broker::{LeaseRef, PodInfo};

/// Keys the kubelet sets with `podInfoOnMount: true` and `tokenRequests`.
pub mod keys {
    /// Pod name.
    pub const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
    /// Pod namespace.
    pub const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
    /// Pod UID.
    pub const POD_UID: &str = "csi.storage.k8s.io/pod.uid";
    /// Service-account name.
    pub const SERVICE_ACCOUNT: &str = "csi.storage.k8s.io/serviceAccount.name";
    /// `"true"` for inline ephemeral volumes.
    pub const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";
    /// JSON: audience → `{token, expirationTimestamp}`.
    pub const TOKENS: &str = "csi.storage.k8s.io/serviceAccount.tokens";
    /// leasehold: the `SecretLease` name (`name` or `namespace/name`).
    pub const LEASE: &str = "lease";
}

/// The volume attributes leasehold reads. Unknown keys are ignored.
#[derive(Deserialize)]
pub struct VolumeContext {
    /// Pod name.
    #[serde(
        rename = "csi.storage.k8s.io/pod.name",
        default,
        deserialize_with = "present"
    )]
    pub pod_name: Option<String>,
    /// Pod namespace.
    #[serde(
        rename = "csi.storage.k8s.io/pod.namespace",
        default,
        deserialize_with = "present"
    )]
    pub pod_namespace: Option<String>,
    /// Pod UID.
    #[serde(
        rename = "csi.storage.k8s.io/pod.uid",
        default,
        deserialize_with = "present"
    )]
    pub pod_uid: Option<String>,
    /// Service-account name.
    #[serde(
        rename = "csi.storage.k8s.io/serviceAccount.name",
        default,
        deserialize_with = "present"
    )]
    pub service_account: Option<String>,
    /// `"true"` for inline ephemeral volumes.
    #[serde(
        rename = "csi.storage.k8s.io/ephemeral",
        default,
        deserialize_with = "present"
    )]
    pub ephemeral: Option<String>,
    /// Raw token JSON; parsed by [`VolumeContext::token_for`].
    #[serde(
        rename = "csi.storage.k8s.io/serviceAccount.tokens",
        default,
        deserialize_with = "present"
    )]
    pub tokens: Option<SecretString>,
    /// The lease.
    #[serde(default, deserialize_with = "present")]
    pub lease: Option<String>,
}

/// A key that is present: string-keyed maps have no `null` to map to `None`.
fn present<'de, D, T>(de: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(de).map(Some)
}

impl std::fmt::Debug for VolumeContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeContext")
            .field("pod_name", &self.pod_name)
            .field("pod_namespace", &self.pod_namespace)
            .field("pod_uid", &self.pod_uid)
            .field("service_account", &self.service_account)
            .field("ephemeral", &self.ephemeral)
            .field("tokens", &self.tokens.as_ref().map(|_| "<redacted>"))
            .field("lease", &self.lease)
            .finish()
    }
}

/// One entry of `serviceAccount.tokens`.
#[derive(Deserialize)]
struct TokenEntry {
    token: SecretString,
    #[serde(rename = "expirationTimestamp", default, deserialize_with = "present")]
    #[allow(dead_code)]
    expiration_timestamp: Option<String>,
}

/// Problems with the volume context. Messages never quote values of the token key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    /// A required key is missing or empty.
    #[error("volume_context key {0:?} is required")]
    Missing(&'static str),
    /// A key has a value we cannot use.
    #[error("volume_context key {key:?}: {reason}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// Why.
        reason: String,
    },
    /// No token for our audience.
    #[error("no service-account token for audience {0:?} (check the CSIDriver tokenRequests)")]
    MissingToken(String),
}

/// The validated, identity-bearing part of the context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodVolume {
    /// The pod.
    pub pod: PodInfo,
    /// The lease.
    pub lease: LeaseRef,
}

impl VolumeContext {
    /// Deserializes from the request map without copying it into another format.
    pub fn parse(map: &HashMap<String, String>) -> Result<Self, ContextError> {
        let de = serde::de::value::MapDeserializer::<_, serde::de::value::Error>::new(
            map.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        );
        // Every field is an optional string, so this only fails on duplicate
        // keys, which a HashMap cannot have; the message names no value anyway.
        VolumeContext::deserialize(de).map_err(|_| ContextError::Invalid {
            key: "volume_context",
            reason: "not a map of strings".into(),
        })
    }

    /// Checks the ephemeral flag, the pod identity and the lease.
    pub fn pod_volume(&self) -> Result<PodVolume, ContextError> {
        match self.ephemeral.as_deref() {
            Some("true") => {}
            Some(_) => {
                return Err(ContextError::Invalid {
                    key: keys::EPHEMERAL,
                    reason: "only inline ephemeral volumes are supported".into(),
                });
            }
            None => return Err(ContextError::Missing(keys::EPHEMERAL)),
        }
        let required = |v: &Option<String>, key: &'static str| -> Result<String, ContextError> {
            match v.as_deref().map(str::trim) {
                Some(s) if !s.is_empty() => {
                    check_name(key, s)?;
                    Ok(s.to_owned())
                }
                _ => Err(ContextError::Missing(key)),
            }
        };
        let pod = PodInfo {
            namespace: required(&self.pod_namespace, keys::POD_NAMESPACE)?,
            name: required(&self.pod_name, keys::POD_NAME)?,
            uid: required(&self.pod_uid, keys::POD_UID)?,
            service_account: required(&self.service_account, keys::SERVICE_ACCOUNT)?,
        };
        let lease_raw = required(&self.lease, keys::LEASE)?;
        let lease = match lease_raw.split_once('/') {
            None => LeaseRef {
                namespace: pod.namespace.clone(),
                name: lease_raw,
            },
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                LeaseRef {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                }
            }
            Some(_) => {
                return Err(ContextError::Invalid {
                    key: keys::LEASE,
                    reason: "expected \"name\" or \"namespace/name\"".into(),
                });
            }
        };
        Ok(PodVolume { pod, lease })
    }

    /// The pod's token for `audience`.
    pub fn token_for(&self, audience: &str) -> Result<SecretString, ContextError> {
        use secrecy::ExposeSecret;
        let raw = self
            .tokens
            .as_ref()
            .ok_or_else(|| ContextError::MissingToken(audience.to_owned()))?;
        let mut entries: HashMap<String, TokenEntry> = serde_json::from_str(raw.expose_secret())
            .map_err(|e| ContextError::Invalid {
                key: keys::TOKENS,
                // Only the position: serde's messages can quote the input.
                reason: format!(
                    "not a JSON object of {{token, expirationTimestamp}} (line {}, column {})",
                    e.line(),
                    e.column()
                ),
            })?;
        match entries.remove(audience) {
            Some(entry) if !entry.token.expose_secret().is_empty() => Ok(entry.token),
            _ => Err(ContextError::MissingToken(audience.to_owned())),
        }
    }
}

/// Kubernetes names and UIDs: a conservative character set, so they are safe
/// in logs, metadata and broker requests.
fn check_name(key: &'static str, value: &str) -> Result<(), ContextError> {
    let ok = value.len() <= 253
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '/'));
    if ok {
        Ok(())
    } else {
        Err(ContextError::Invalid {
            key,
            reason: "not a valid Kubernetes name".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use secrecy::ExposeSecret;

    fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    fn full() -> HashMap<String, String> {
        ctx(&[
            (keys::POD_NAME, "web-0"),
            (keys::POD_NAMESPACE, "shop"),
            (keys::POD_UID, "1234-abcd"),
            (keys::SERVICE_ACCOUNT, "web"),
            (keys::EPHEMERAL, "true"),
            (keys::LEASE, "db"),
            (
                keys::TOKENS,
                r#"{"leasehold.dev":{"token":"eyJTOKEN","expirationTimestamp":"2030-01-01T00:00:00Z"}}"#,
            ),
            ("other", "ignored"),
        ])
    }

    #[test]
    fn parses_full_context() {
        let c = VolumeContext::parse(&full()).unwrap();
        let pv = c.pod_volume().unwrap();
        assert_eq!(pv.pod.name, "web-0");
        assert_eq!(
            pv.lease,
            LeaseRef {
                namespace: "shop".into(),
                name: "db".into()
            }
        );
        assert_eq!(
            c.token_for("leasehold.dev").unwrap().expose_secret(),
            "eyJTOKEN"
        );
        assert!(matches!(
            c.token_for("other"),
            Err(ContextError::MissingToken(_))
        ));
        assert!(!format!("{c:?}").contains("eyJTOKEN"));
    }

    #[test]
    fn rejects_bad_contexts() {
        let mut m = full();
        m.insert(keys::EPHEMERAL.into(), "false".into());
        assert!(VolumeContext::parse(&m).unwrap().pod_volume().is_err());
        let mut m = full();
        m.remove(keys::LEASE);
        assert_eq!(
            VolumeContext::parse(&m).unwrap().pod_volume(),
            Err(ContextError::Missing(keys::LEASE))
        );
        let mut m = full();
        m.insert(keys::LEASE.into(), "a/b/c".into());
        assert!(VolumeContext::parse(&m).unwrap().pod_volume().is_err());
        let mut m = full();
        m.insert(keys::TOKENS.into(), r#"{"leasehold.dev":"eyJLEAK"}"#.into());
        let err = VolumeContext::parse(&m)
            .unwrap()
            .token_for("leasehold.dev")
            .unwrap_err();
        assert!(!err.to_string().contains("eyJLEAK"), "{err}");
        let mut m = full();
        m.insert(keys::LEASE.into(), "other-ns/db".into());
        let pv = VolumeContext::parse(&m).unwrap().pod_volume().unwrap();
        assert_eq!(pv.lease.namespace, "other-ns");
    }
}
