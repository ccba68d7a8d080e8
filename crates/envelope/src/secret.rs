//! Sealed fields of Kubernetes Secrets. Every Secret leasehold keeps secret material
//! in carries the label [`SEALED_LABEL`] naming its kind; each sealed field is bound
//! to (kind, namespace, Secret name, field), so a value copied into another Secret,
//! another namespace or another field does not open. Because the context follows from
//! where a value is stored, `leasehold rekey` can rewrap any such Secret without
//! knowing more about it.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use zeroize::Zeroizing;

use crate::{EncryptionContext, EnvelopeError, Keyring};

/// Label on every Secret with sealed fields; its value is the kind.
pub const SEALED_LABEL: &str = "leasehold.dev/sealed";

/// What a Secret with sealed fields holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealedKind {
    /// A lease's credential versions (every field).
    Versions,
    /// A pod's own credential (`password`).
    PodCredential,
    /// The broker's generated CA and serving key (`ca.key`, `tls.key`).
    BrokerTls,
    /// An ACME account (`account.json`, with its private key).
    AcmeAccount,
    /// A generated issuer CA (`tls.key`).
    IssuerCa,
}

impl SealedKind {
    /// Every kind, for `rekey`.
    pub const ALL: [SealedKind; 5] = [
        SealedKind::Versions,
        SealedKind::PodCredential,
        SealedKind::BrokerTls,
        SealedKind::AcmeAccount,
        SealedKind::IssuerCa,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            SealedKind::Versions => "versions",
            SealedKind::PodCredential => "pod-credential",
            SealedKind::BrokerTls => "broker-tls",
            SealedKind::AcmeAccount => "acme-account",
            SealedKind::IssuerCa => "issuer-ca",
        }
    }

    /// The kind a label value names.
    pub fn parse(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == label)
    }

    /// Whether `field` of a Secret of this kind is sealed.
    pub fn seals(self, field: &str) -> bool {
        match self {
            SealedKind::Versions => true,
            SealedKind::PodCredential => field == "password",
            SealedKind::BrokerTls | SealedKind::IssuerCa => field.ends_with(".key"),
            SealedKind::AcmeAccount => field == "account.json",
        }
    }
}

/// The encryption context of `field` in the Secret `namespace/secret` of `kind`.
pub fn field_context(
    kind: SealedKind,
    namespace: &str,
    secret: &str,
    field: &str,
) -> EncryptionContext {
    EncryptionContext::new()
        .with("leasehold", kind.as_str())
        .with("namespace", namespace)
        .with("secret", secret)
        .with("field", field)
}

/// Where a sealed field lives.
#[derive(Debug, Clone, Copy)]
pub struct SecretField<'a> {
    pub kind: SealedKind,
    pub namespace: &'a str,
    pub secret: &'a str,
    pub field: &'a str,
}

impl SecretField<'_> {
    fn context(&self) -> EncryptionContext {
        field_context(self.kind, self.namespace, self.secret, self.field)
    }

    /// Seal `plaintext` for this field (plaintext as is when the keyring is unencrypted).
    pub async fn seal(
        &self,
        keyring: &Keyring,
        plaintext: &[u8],
    ) -> Result<ByteString, EnvelopeError> {
        Ok(ByteString(
            keyring.seal(&self.context(), plaintext).await?.into_bytes(),
        ))
    }

    /// Open the stored value of this field (legacy plaintext as is).
    pub async fn open(
        &self,
        keyring: &Keyring,
        stored: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
        keyring.open(&self.context(), stored).await
    }
}

/// The kind a Secret declares, if any.
pub fn sealed_kind(secret: &Secret) -> Option<SealedKind> {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SEALED_LABEL))
        .and_then(|v| SealedKind::parse(v))
}

/// What rewrapping one Secret did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rewrapped {
    /// Fields sealed anew (under the primary key, or as plaintext when unencrypted).
    pub fields: Vec<String>,
}

/// The data of `secret` with every sealed field that [`Keyring::needs_rewrap`] (or
/// that is sealed while the keyring is unencrypted) opened and sealed again under
/// the keyring's primary key; `None` when nothing needs it. Opening uses every key the
/// keyring holds (pass the old key as a decrypt-only key).
pub async fn rewrap_secret(
    keyring: &Keyring,
    secret: &Secret,
) -> Result<Option<(BTreeMap<String, ByteString>, Rewrapped)>, EnvelopeError> {
    let Some(kind) = sealed_kind(secret) else {
        return Ok(None);
    };
    let namespace = secret.metadata.namespace.as_deref().unwrap_or_default();
    let name = secret.metadata.name.as_deref().unwrap_or_default();
    let mut data = secret.data.clone().unwrap_or_default();
    let mut done = Rewrapped::default();
    for (field, value) in data.iter_mut() {
        if !kind.seals(field) {
            continue;
        }
        let stale = keyring.needs_rewrap(&value.0)
            || (keyring.primary_key_id().is_none() && Keyring::is_sealed(&value.0));
        if !stale {
            continue;
        }
        let at = SecretField {
            kind,
            namespace,
            secret: name,
            field,
        };
        let plain = at.open(keyring, &value.0).await?;
        *value = at.seal(keyring, &plain).await?;
        done.fields.push(field.clone());
    }
    Ok((!done.fields.is_empty()).then_some((data, done)))
}

/// `secret` labelled as `kind`, with the fields that kind seals sealed (in memory
/// before it is written). With an unencrypted keyring the fields stay plaintext (the
/// label is set all the same, so a later `rekey` finds the Secret).
pub async fn seal_secret(
    keyring: &Keyring,
    kind: SealedKind,
    mut secret: Secret,
) -> Result<Secret, EnvelopeError> {
    secret
        .metadata
        .labels
        .get_or_insert_default()
        .insert(SEALED_LABEL.to_owned(), kind.as_str().to_owned());
    let namespace = secret.metadata.namespace.clone().unwrap_or_default();
    let name = secret.metadata.name.clone().unwrap_or_default();
    if let Some(data) = secret.data.as_mut() {
        for (field, value) in data.iter_mut() {
            if !kind.seals(field) || Keyring::is_sealed(&value.0) {
                continue;
            }
            let at = SecretField {
                kind,
                namespace: &namespace,
                secret: &name,
                field,
            };
            *value = at.seal(keyring, &value.0).await?;
        }
    }
    Ok(secret)
}

/// A copy of `secret` with its sealed fields opened (a Secret without the label, or
/// with plaintext fields, is returned as it is). Keep the copy in memory only.
pub async fn open_secret(keyring: &Keyring, secret: &Secret) -> Result<Secret, EnvelopeError> {
    let Some(kind) = sealed_kind(secret) else {
        return Ok(secret.clone());
    };
    let namespace = secret.metadata.namespace.clone().unwrap_or_default();
    let name = secret.metadata.name.clone().unwrap_or_default();
    let mut opened = secret.clone();
    if let Some(data) = opened.data.as_mut() {
        for (field, value) in data.iter_mut() {
            if !kind.seals(field) || !Keyring::is_sealed(&value.0) {
                continue;
            }
            let at = SecretField {
                kind,
                namespace: &namespace,
                secret: &name,
                field,
            };
            *value = ByteString(at.open(keyring, &value.0).await?.to_vec());
        }
    }
    Ok(opened)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::{KeyringSettings, LocalKey};

    fn keyring() -> Keyring {
        Keyring::new(
            Arc::new(LocalKey::generate().unwrap()),
            vec![],
            KeyringSettings::default(),
        )
    }

    fn secret(name: &str, data: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                ..ObjectMeta::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    #[tokio::test]
    async fn sealed_fields_round_trip_and_do_not_open_elsewhere() {
        let ring = keyring();
        let plain = secret(
            "acct",
            &[("account.json", "{\"key\":\"TOPSECRET\"}"), ("note", "hi")],
        );
        let sealed = seal_secret(&ring, SealedKind::AcmeAccount, plain.clone())
            .await
            .unwrap();
        let json = serde_json::to_string(&sealed).unwrap();
        assert!(!json.contains("TOPSECRET"));
        assert_eq!(sealed_kind(&sealed), Some(SealedKind::AcmeAccount));
        let data = sealed.data.as_ref().unwrap();
        assert!(Keyring::is_sealed(&data["account.json"].0));
        assert_eq!(data["note"].0, b"hi", "only the kind's fields are sealed");
        let opened = open_secret(&ring, &sealed).await.unwrap();
        assert_eq!(opened.data, plain.data);

        // The same value in another Secret does not open.
        let mut moved = sealed.clone();
        moved.metadata.name = Some("other".into());
        let e = open_secret(&ring, &moved).await.unwrap_err();
        assert_eq!(e.reason(), "Tampered");
    }

    #[tokio::test]
    async fn rewrap_moves_every_sealed_field_to_the_new_key() {
        let old = Arc::new(LocalKey::generate().unwrap());
        let new = Arc::new(LocalKey::generate().unwrap());
        let old_ring = Keyring::new(old.clone(), vec![], KeyringSettings::default());
        let sealed = seal_secret(
            &old_ring,
            SealedKind::Versions,
            secret("l-leasehold-versions", &[("v1", "pw1"), ("v2", "pw2")]),
        )
        .await
        .unwrap();
        let ring = Keyring::new(new.clone(), vec![old], KeyringSettings::default());
        let (data, done) = rewrap_secret(&ring, &sealed).await.unwrap().unwrap();
        assert_eq!(done.fields, ["v1", "v2"]);
        let mut rewrapped = sealed.clone();
        rewrapped.data = Some(data);
        let only_new = Keyring::new(new, vec![], KeyringSettings::default());
        let opened = open_secret(&only_new, &rewrapped).await.unwrap();
        assert_eq!(opened.data.unwrap()["v2"].0, b"pw2");
        assert!(
            rewrap_secret(&only_new, &rewrapped)
                .await
                .unwrap()
                .is_none()
        );
        // To plaintext (explicit opt-out) and back.
        let to_plain = Keyring::new(
            Arc::new(LocalKey::generate().unwrap()),
            vec![],
            KeyringSettings::default(),
        );
        assert!(
            rewrap_secret(&to_plain, &rewrapped).await.is_err(),
            "a key it does not hold"
        );
    }
}
