//! Credential secrets per version, in a Secret owned by the SecretLease.
//!
//! Behind the engine's [`SecretStore`] trait, so envelope encryption (KMS) can be added
//! here later without touching the engine.

use std::collections::BTreeMap;

use async_trait::async_trait;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource};
use leasehold_api::{FIELD_MANAGER, SecretLease};
use leasehold_engine::{LeaseKey, SecretStore, StoreError};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Mutex;

use crate::error::store_error;
use crate::leader::LeadershipFence;

/// Label on every Secret leasehold writes (the controller watches only these).
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "leasehold";
/// Label naming the SecretLease a Secret belongs to.
pub const LEASE_LABEL: &str = "leasehold.dev/lease";

pub use leasehold_api::versions_secret_name;

/// The owner reference (controller=true) of objects owned by `lease`.
pub fn owner_reference(lease: &SecretLease) -> Option<OwnerReference> {
    let mut r = lease.controller_owner_ref(&())?;
    r.block_owner_deletion = Some(true);
    Some(r)
}

/// Server-side apply body of an owned Secret with `data`.
pub fn owned_secret_patch(
    name: &str,
    lease_name: &str,
    owner: &OwnerReference,
    data: &BTreeMap<String, SecretString>,
) -> Secret {
    let mut s = Secret::default();
    s.metadata.name = Some(name.to_string());
    s.metadata.owner_references = Some(vec![owner.clone()]);
    s.metadata.labels = Some(BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string()),
        (LEASE_LABEL.to_string(), lease_name.to_string()),
    ]));
    s.type_ = Some("Opaque".into());
    s.data = Some(
        data.iter()
            .map(|(k, v)| (k.clone(), ByteString(v.expose_secret().as_bytes().to_vec())))
            .collect(),
    );
    s
}

/// Serialize a Secret for an apply patch (with apiVersion and kind).
pub(crate) fn secret_apply_body(s: &Secret) -> Result<serde_json::Value, StoreError> {
    let mut v =
        serde_json::to_value(s).map_err(|_| StoreError("cannot serialize a Secret".into()))?;
    if let Some(o) = v.as_object_mut() {
        o.insert("apiVersion".into(), "v1".into());
        o.insert("kind".into(), "Secret".into());
    }
    Ok(v)
}

/// The versions Secret of one lease. Loaded on first use and written whole with
/// server-side apply (an apply that left a key out would delete it).
pub struct OwnedSecretStore {
    api: Api<Secret>,
    lease_name: String,
    owner: OwnerReference,
    /// The versions, and the Secret's resourceVersion as read or last written (a
    /// precondition of every write: a deposed controller cannot overwrite a version
    /// the current leader stored).
    cache: Mutex<Option<StoredVersions>>,
    /// Checked before every write.
    fence: LeadershipFence,
}

/// Who a Secret of the name a lease wants belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretOwnership {
    /// No such Secret: the lease may create it.
    Absent,
    /// Created by this lease (its controller ownerReference names the lease's UID).
    Ours,
    /// Someone else's: the lease must never write it (nor have it garbage-collected).
    Foreign,
}

/// Whether `secret` was created by the lease whose UID is `lease_uid`.
pub fn secret_ownership(secret: Option<&Secret>, lease_uid: &str) -> SecretOwnership {
    let Some(secret) = secret else {
        return SecretOwnership::Absent;
    };
    let ours = secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && o.uid == lease_uid && o.kind == "SecretLease");
    if ours {
        SecretOwnership::Ours
    } else {
        SecretOwnership::Foreign
    }
}

/// The message for a Secret the lease may not write.
pub fn foreign_secret_message(name: &str, what: &str) -> String {
    format!(
        "Secret {name:?} ({what}) already exists and was not created by this lease; leasehold \
         never writes a Secret it does not own. Choose another name or delete that Secret"
    )
}

/// The versions Secret as read or last written.
type StoredVersions = (BTreeMap<u64, SecretString>, Option<String>);

impl std::fmt::Debug for OwnedSecretStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedSecretStore")
            .field("lease", &self.lease_name)
            .finish_non_exhaustive()
    }
}

impl OwnedSecretStore {
    pub fn new(api: Api<Secret>, lease_name: &str, owner: OwnerReference) -> Self {
        Self {
            api,
            lease_name: lease_name.to_string(),
            owner,
            cache: Mutex::new(None),
            fence: LeadershipFence::always_open(),
        }
    }

    /// Refuse every write unless `fence` is open.
    pub fn fenced(mut self, fence: LeadershipFence) -> Self {
        self.fence = fence;
        self
    }

    fn secret_name(&self) -> String {
        versions_secret_name(&self.lease_name)
    }

    async fn load(&self) -> Result<StoredVersions, StoreError> {
        let secret = self
            .api
            .get_opt(&self.secret_name())
            .await
            .map_err(|e| store_error("cannot read the versions Secret", e))?;
        if secret_ownership(secret.as_ref(), &self.owner.uid) == SecretOwnership::Foreign {
            return Err(StoreError(foreign_secret_message(
                &self.secret_name(),
                "the lease's versions Secret",
            )));
        }
        let rv = secret
            .as_ref()
            .and_then(|s| s.metadata.resource_version.clone());
        Ok((parse_versions(secret.as_ref()), rv))
    }

    /// Writes every version; returns the new resourceVersion.
    async fn write(
        &self,
        versions: &BTreeMap<u64, SecretString>,
        resource_version: Option<&str>,
    ) -> Result<Option<String>, StoreError> {
        self.fence.check()?;
        let data = versions
            .iter()
            .map(|(v, s)| (format!("v{v}"), s.clone()))
            .collect();
        let mut body =
            owned_secret_patch(&self.secret_name(), &self.lease_name, &self.owner, &data);
        body.metadata.labels.get_or_insert_default().insert(
            leasehold_envelope::secret::SEALED_LABEL.to_owned(),
            leasehold_envelope::secret::SealedKind::Versions
                .as_str()
                .to_owned(),
        );
        let mut body = secret_apply_body(&body)?;
        if let Some(rv) = resource_version {
            body["metadata"]["resourceVersion"] = serde_json::json!(rv);
        }
        let written = self
            .api
            .patch(
                &self.secret_name(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map_err(|e| {
                match e {
                kube::Error::Api(ref s) if s.code == 409 => StoreError(
                    "the versions Secret changed since this controller read it; not writing over it"
                        .into(),
                ),
                e => store_error("cannot write the versions Secret", e),
            }
            })?;
        Ok(written.metadata.resource_version)
    }
}

/// `store` with every version sealed by `keyring`, each bound to its place: the
/// lease's namespace, its versions Secret and the `v<N>` field (what
/// `leasehold rekey` recomputes from the Secret alone).
pub fn sealed_versions_store(
    store: OwnedSecretStore,
    keyring: std::sync::Arc<leasehold_envelope::Keyring>,
) -> leasehold_engine::sealed::SealedSecretStore<OwnedSecretStore> {
    use leasehold_envelope::secret::{SealedKind, field_context};
    leasehold_engine::sealed::SealedSecretStore::new(
        store,
        keyring,
        std::sync::Arc::new(|lease: &LeaseKey, version: u64| {
            field_context(
                SealedKind::Versions,
                &lease.namespace,
                &versions_secret_name(&lease.name),
                &format!("v{version}"),
            )
        }),
    )
}

/// `v<N>` keys of a versions Secret.
pub fn parse_versions(secret: Option<&Secret>) -> BTreeMap<u64, SecretString> {
    let mut out = BTreeMap::new();
    let Some(data) = secret.and_then(|s| s.data.as_ref()) else {
        return out;
    };
    for (k, v) in data {
        let Some(n) = k.strip_prefix('v').and_then(|n| n.parse::<u64>().ok()) else {
            continue;
        };
        if let Ok(text) = String::from_utf8(v.0.clone()) {
            out.insert(n, SecretString::from(text));
        }
    }
    out
}

#[async_trait]
impl SecretStore for OwnedSecretStore {
    async fn put(
        &self,
        _: &LeaseKey,
        version: u64,
        secret: &SecretString,
    ) -> Result<(), StoreError> {
        let mut cache = self.cache.lock().await;
        let (mut versions, rv) = match cache.take() {
            Some(v) => v,
            None => self.load().await?,
        };
        versions.insert(version, secret.clone());
        // On failure the cache is dropped: the next use re-reads what the server has.
        let new_rv = self.write(&versions, rv.as_deref()).await?;
        *cache = Some((versions, new_rv));
        Ok(())
    }

    async fn get(&self, _: &LeaseKey, version: u64) -> Result<Option<SecretString>, StoreError> {
        let mut cache = self.cache.lock().await;
        if cache.is_none() {
            *cache = Some(self.load().await?);
        }
        Ok(cache
            .as_ref()
            .and_then(|(versions, _)| versions.get(&version).cloned()))
    }

    async fn remove(&self, _: &LeaseKey, version: u64) -> Result<(), StoreError> {
        let mut cache = self.cache.lock().await;
        let (mut versions, rv) = match cache.take() {
            Some(v) => v,
            None => self.load().await?,
        };
        let new_rv = if versions.remove(&version).is_some() {
            self.write(&versions, rv.as_deref()).await?
        } else {
            rv
        };
        *cache = Some((versions, new_rv));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_secret_this_lease_created_is_ours() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
        let with_owner = |uid: &str, controller: bool| Secret {
            metadata: kube::api::ObjectMeta {
                owner_references: Some(vec![OwnerReference {
                    api_version: "leasehold.dev/v1alpha1".into(),
                    kind: "SecretLease".into(),
                    name: "orders".into(),
                    uid: uid.into(),
                    controller: Some(controller),
                    ..Default::default()
                }]),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(secret_ownership(None, "u1"), SecretOwnership::Absent);
        assert_eq!(
            secret_ownership(Some(&with_owner("u1", true)), "u1"),
            SecretOwnership::Ours
        );
        // Another lease's, a non-controller reference, or no owner at all: never ours.
        assert_eq!(
            secret_ownership(Some(&with_owner("u2", true)), "u1"),
            SecretOwnership::Foreign
        );
        assert_eq!(
            secret_ownership(Some(&with_owner("u1", false)), "u1"),
            SecretOwnership::Foreign
        );
        assert_eq!(
            secret_ownership(Some(&Secret::default()), "u1"),
            SecretOwnership::Foreign
        );
    }

    use super::*;

    #[test]
    fn versions_round_trip_through_secret_data() {
        let owner = OwnerReference {
            api_version: "leasehold.dev/v1alpha1".into(),
            kind: "SecretLease".into(),
            name: "db".into(),
            uid: "u".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        let data = BTreeMap::from([
            ("v1".to_string(), SecretString::from("one")),
            ("v2".to_string(), SecretString::from("two")),
        ]);
        let s = owned_secret_patch("db-leasehold-versions", "db", &owner, &data);
        let parsed = parse_versions(Some(&s));
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[&2].expose_secret(), "two");
        let body = secret_apply_body(&s).unwrap();
        assert_eq!(body["kind"], "Secret");
        assert_eq!(body["metadata"]["ownerReferences"][0]["controller"], true);
        assert_eq!(
            body["metadata"]["labels"][MANAGED_BY_LABEL],
            MANAGED_BY_VALUE
        );
    }
}
