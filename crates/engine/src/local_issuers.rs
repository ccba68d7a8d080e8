//! Certificate issuers in local mode: `Issuer`/`ClusterIssuer` manifests with a `ca`
//! kept in the state file (a `selfSigned` root is generated once and kept, its key
//! sealed like every secret in the state file; a
//! `secretRef` is read from a `Secret` manifest), the revoked serials in the state file
//! too, and each issuer's `ca.crt` and signed CRL written to
//! `OUTPUT/_issuers/<namespace>/<name>/` (`OUTPUT/_issuers/_cluster/<name>/` for a
//! ClusterIssuer) after every pass.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use leasehold_api::{IssuerKind, IssuerRef, IssuerSpec};
use leasehold_certs::{
    CaIssuer, CertificateAuthority, CertificateIssuer, IssuerError, KeyAlgorithm, RevocationEntry,
    RevocationLedger, RevocationList,
};
use leasehold_files::{AtomicDir, WriteOptions};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::local::{StateFile, StoredValue};

/// How long a CRL written in local mode is valid (it is re-signed on every pass).
const CRL_VALIDITY: time::Duration = time::Duration::hours(24);

/// One issuer as kept in the state file. `Debug` leaves the key out.
#[derive(Serialize, Deserialize, Clone, Default)]
#[serde(rename_all = "camelCase")]
pub struct LocalIssuer {
    /// The CA certificate, PEM.
    pub certificate: String,
    /// The CA key, PEM, sealed (generated roots only; a `secretRef` CA is read each
    /// pass).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) key: String,
    #[serde(default)]
    pub revoked: RevocationList,
    /// An `acme` issuer's registered account (its key inside), as `account.json` holds it
    /// in the cluster; sealed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) acme_account: Option<String>,
}

impl std::fmt::Debug for LocalIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalIssuer")
            .field("revoked", &self.revoked.entries.len())
            .finish_non_exhaustive()
    }
}

/// The state-file key of an issuer a lease in `namespace` refers to.
pub fn issuer_key(namespace: &str, issuer: &IssuerRef) -> String {
    match issuer.kind {
        IssuerKind::Issuer => format!("{namespace}/{}", issuer.name),
        IssuerKind::ClusterIssuer => format!("_cluster/{}", issuer.name),
    }
}

/// Revoked serials in the state file.
struct StateLedger {
    store: Arc<StateFile>,
    key: String,
}

#[async_trait]
impl RevocationLedger for StateLedger {
    async fn revoke(&self, entry: RevocationEntry) -> Result<(), IssuerError> {
        let key = self.key.clone();
        self.store
            .update(|s| {
                let list = &mut s.issuers.entry(key).or_default().revoked;
                if !list.is_revoked(&entry.serial) {
                    list.entries.push(entry);
                }
            })
            .await
            .map_err(|e| IssuerError::Unavailable(e.to_string()))
    }

    async fn list(&self) -> Result<RevocationList, IssuerError> {
        Ok(self
            .store
            .snapshot()
            .await
            .issuers
            .get(&self.key)
            .map(|i| i.revoked.clone())
            .unwrap_or_default())
    }
}

/// The issuer a certificate lease in `namespace` uses, loaded (or for `selfSigned`
/// generated once) into the state file. `secret` finds `Secret` manifests.
pub async fn local_issuer(
    store: &Arc<StateFile>,
    issuers: &BTreeMap<String, IssuerSpec>,
    secret: impl Fn(&str, &str) -> Option<BTreeMap<String, SecretString>>,
    acme_solver: Option<&Arc<leasehold_acme::Http01Solver>>,
    namespace: &str,
    issuer: &IssuerRef,
) -> Result<Arc<dyn CertificateIssuer>, String> {
    let key = issuer_key(namespace, issuer);
    let kind = match issuer.kind {
        IssuerKind::Issuer => "Issuer",
        IssuerKind::ClusterIssuer => "ClusterIssuer",
    };
    let spec = issuers
        .get(&key)
        .ok_or_else(|| format!("{kind} {key} not found in the manifests"))?;
    if let Some(acme) = &spec.acme {
        return acme_issuer(store, &key, kind, acme, acme_solver).await;
    }
    let Some(ca) = &spec.ca else {
        return Err(format!("{kind} {key}: set ca or acme"));
    };
    let authority = if ca.self_signed {
        let known = store.snapshot().await.issuers.get(&key).cloned();
        let at = StoredValue::IssuerCaKey {
            issuer: key.clone(),
        };
        match known.filter(|i| !i.key.is_empty()) {
            Some(i) => {
                let key_pem = store
                    .open_text(&at, &i.key)
                    .await
                    .map_err(|e| format!("{kind} {key}: {e}"))?;
                CertificateAuthority::from_pem(&i.certificate, &key_pem)
                    .map_err(|e| format!("{kind} {key}: the generated CA in the state file: {e}"))?
            }
            None => {
                let now = OffsetDateTime::now_utc();
                let made = CertificateAuthority::self_signed(
                    &format!("leasehold {kind} {key}"),
                    KeyAlgorithm::EcdsaP256,
                    now - time::Duration::minutes(5),
                    time::Duration::days(3650),
                )
                .map_err(|e| format!("{kind} {key}: {e}"))?;
                let certificate = made.certificate_pem().to_owned();
                let key_pem = store
                    .seal_value(&at, made.key_pem().expose().as_bytes())
                    .await
                    .map_err(|e| format!("{kind} {key}: {e}"))?;
                store
                    .update(|s| {
                        let entry = s.issuers.entry(key.clone()).or_default();
                        entry.certificate = certificate;
                        entry.key = key_pem;
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                made
            }
        }
    } else {
        let r = ca
            .secret_ref
            .as_ref()
            .ok_or_else(|| format!("{kind} {key}: set ca.secretRef or ca.selfSigned"))?;
        let secret_ns = match issuer.kind {
            IssuerKind::Issuer => namespace.to_owned(),
            IssuerKind::ClusterIssuer => r.namespace.clone().unwrap_or_else(|| "default".into()),
        };
        let data = secret(&secret_ns, &r.name)
            .ok_or_else(|| format!("{kind} {key}: Secret {secret_ns}/{} not found", r.name))?;
        let get = |k: &str| {
            data.get(k)
                .map(|v| v.expose_secret().to_owned())
                .ok_or_else(|| format!("{kind} {key}: Secret {secret_ns}/{} has no {k}", r.name))
        };
        let made = CertificateAuthority::from_pem(&get("tls.crt")?, &get("tls.key")?)
            .map_err(|e| format!("{kind} {key}: Secret {secret_ns}/{}: {e}", r.name))?;
        let certificate = made.certificate_pem().to_owned();
        store
            .update(|s| s.issuers.entry(key.clone()).or_default().certificate = certificate)
            .await
            .map_err(|e| e.to_string())?;
        made
    };
    let ledger = StateLedger {
        store: store.clone(),
        key,
    };
    Ok(Arc::new(CaIssuer::new(
        Arc::new(authority),
        Arc::new(ledger),
    )))
}

/// An `acme` issuer: the account registered once and kept in the state file, challenges
/// answered by the local run's HTTP-01 solver.
async fn acme_issuer(
    store: &Arc<StateFile>,
    key: &str,
    kind: &str,
    acme: &leasehold_api::AcmeIssuer,
    solver: Option<&Arc<leasehold_acme::Http01Solver>>,
) -> Result<Arc<dyn CertificateIssuer>, String> {
    let solver = solver.ok_or_else(|| {
        format!(
            "{kind} {key} is an acme issuer: run `leasehold local run --acme-http01-addr <addr>` \
             so its HTTP-01 challenges are answered (the CA must reach that address on port 80 \
             of every name)"
        )
    })?;
    let directory = leasehold_acme::Directory {
        url: acme.directory_url.clone(),
        trust: match &acme.ca_bundle {
            Some(pem) => leasehold_acme::TrustRoots::Pem(pem.clone()),
            None => leasehold_acme::TrustRoots::Public,
        },
    };
    let at = StoredValue::IssuerAcmeAccount {
        issuer: key.to_owned(),
    };
    let sealed = store
        .snapshot()
        .await
        .issuers
        .get(key)
        .and_then(|i| i.acme_account.clone());
    let stored = match sealed {
        Some(sealed) => {
            let json = store
                .open_text(&at, &sealed)
                .await
                .map_err(|e| format!("{kind} {key}: {e}"))?;
            serde_json::from_str::<leasehold_acme::StoredAccount>(&json).ok()
        }
        None => None,
    };
    let request = leasehold_acme::AccountRequest {
        contact_email: acme.email.clone(),
        external_account_binding: None,
    };
    let (account, registered) = leasehold_acme::account_for(&directory, &request, stored)
        .await
        .map_err(|e| format!("{kind} {key}: ACME account at {}: {e}", directory.url))?;
    if let Some(new) = registered {
        // Kept before first use, so the next pass never registers another one.
        let json = leasehold_envelope::Zeroizing::new(
            serde_json::to_string(&new).map_err(|e| e.to_string())?,
        );
        let json = store
            .seal_value(&at, json.as_bytes())
            .await
            .map_err(|e| format!("{kind} {key}: {e}"))?;
        let key = key.to_owned();
        store
            .update(|s| s.issuers.entry(key).or_default().acme_account = Some(json))
            .await
            .map_err(|e| e.to_string())?;
    }
    let mut issuer = leasehold_acme::AcmeIssuer::new(
        account,
        solver.clone(),
        leasehold_acme::PollPolicy::default(),
    );
    if let Some(extra) = &acme.extra_trust_anchors {
        issuer = issuer.with_extra_trust_anchors(extra.clone());
    }
    Ok(Arc::new(issuer))
}

/// Write every known issuer's `ca.crt` and a freshly signed `ca.crl` (PEM) under
/// `output/_issuers/`. Issuers whose CA cannot be loaded are skipped.
pub async fn publish(
    store: &Arc<StateFile>,
    issuers: &BTreeMap<String, IssuerSpec>,
    secret: impl Fn(&str, &str) -> Option<BTreeMap<String, SecretString>>,
    output: &std::path::Path,
) {
    let state = store.snapshot().await;
    for (key, known) in &state.issuers {
        let Some(spec) = issuers.get(key) else {
            continue;
        };
        let key_pem = if !known.key.is_empty() {
            let at = StoredValue::IssuerCaKey {
                issuer: key.clone(),
            };
            match store.open_text(&at, &known.key).await {
                Ok(pem) => pem.as_str().to_owned(),
                Err(e) => {
                    tracing::warn!(issuer = %key, error = %e, "CRL not published");
                    continue;
                }
            }
        } else {
            let Some(r) = spec.ca.as_ref().and_then(|c| c.secret_ref.as_ref()) else {
                continue;
            };
            let ns = match key.split_once('/') {
                Some(("_cluster", _)) => r.namespace.clone().unwrap_or_else(|| "default".into()),
                Some((ns, _)) => ns.to_owned(),
                None => continue,
            };
            match secret(&ns, &r.name).and_then(|d| d.get("tls.key").cloned()) {
                Some(k) => k.expose_secret().to_owned(),
                None => continue,
            }
        };
        let Ok(ca) = CertificateAuthority::from_pem(&known.certificate, &key_pem) else {
            continue;
        };
        let mut list = known.revoked.clone();
        let now = OffsetDateTime::now_utc();
        // Expired certificates need no CRL entry.
        list.entries.retain(|e| e.not_after.is_none_or(|t| t > now));
        let Ok(crl) = list.sign(&ca, now, CRL_VALIDITY) else {
            continue;
        };
        let dir = output.join("_issuers").join(key);
        let files: BTreeMap<String, SecretString> = [
            (
                "ca.crt".to_owned(),
                SecretString::from(known.certificate.clone()),
            ),
            ("ca.crl".to_owned(), SecretString::from(crl.pem)),
        ]
        .into();
        let _ = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            AtomicDir::new(&dir)
                .write(
                    &files,
                    WriteOptions {
                        file_mode: 0o444,
                        dir_mode: 0o755,
                        gid: None,
                    },
                )
                .map(|_| ())
                .map_err(std::io::Error::other)
        })
        .await;
    }
}
