//! Certificate leases through the engine with the `ca` issuer: issue, verify (a real TLS
//! handshake), deliver, rotate, and revoke the superseded serial into the CRL, checked
//! with `openssl verify -crl_check`.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use common::{MemoryStores, deleting, lease_key, obs};
use leasehold_api::{RotationPolicySpec, SecretLeaseSpec};
use leasehold_certs::{
    CaIssuer, CertificateAuthority, CertificateIssuer, IssueOrder, IssuedChain, IssuerError,
    KeyAlgorithm, MemoryLedger, RevocationList, RevokeOrder,
};
use leasehold_core::rotation::VersionState;
use leasehold_engine::context::resolve_certificate;
use leasehold_engine::engine::{EngineError, FaultPoint};
use leasehold_engine::{Engine, LeaseContext, LeaseKey, Outcome};
use time::OffsetDateTime;

fn policy() -> RotationPolicySpec {
    serde_json::from_value(serde_json::json!({
        "ttl": "1h", "renewBefore": "20m", "strategy": "Dynamic",
        "revoke": {"gracePeriod": "0s", "waitForConsumers": false}
    }))
    .unwrap()
}

fn lease() -> SecretLeaseSpec {
    serde_json::from_value(serde_json::json!({
        "policyRef": {"name": "p"},
        "certificate": {
            "issuerRef": {"name": "ca"},
            "commonName": "app",
            "dnsNames": ["app.test.svc", "app"],
            "ipAddresses": ["127.0.0.1"],
            "usages": ["serverAuth", "clientAuth", "digitalSignature"]
        },
        "delivery": {"secret": {"name": "app-tls"}}
    }))
    .unwrap()
}

fn authority() -> Arc<CertificateAuthority> {
    Arc::new(
        CertificateAuthority::self_signed(
            "leasehold test CA",
            KeyAlgorithm::EcdsaP256,
            OffsetDateTime::now_utc() - time::Duration::hours(1),
            time::Duration::days(365),
        )
        .unwrap(),
    )
}

fn context(key: &LeaseKey, issuer: Arc<dyn CertificateIssuer>) -> LeaseContext {
    resolve_certificate(key.clone(), &lease(), &policy(), issuer, None).unwrap()
}

/// `openssl verify` of `leaf` against `ca`, with `crl` when given; Ok or openssl's words.
fn openssl_verify(dir: &Path, ca: &str, leaf: &str, crl: Option<&str>) -> Result<(), String> {
    std::fs::write(dir.join("ca.pem"), ca).unwrap();
    std::fs::write(dir.join("leaf.pem"), leaf).unwrap();
    let mut cmd = Command::new("openssl");
    cmd.arg("verify").arg("-CAfile").arg(dir.join("ca.pem"));
    if let Some(crl) = crl {
        std::fs::write(dir.join("crl.pem"), crl).unwrap();
        cmd.arg("-crl_check")
            .arg("-CRLfile")
            .arg(dir.join("crl.pem"));
    }
    let out = cmd.arg(dir.join("leaf.pem")).output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn delivered(stores: &MemoryStores, version: u64) -> std::collections::BTreeMap<String, String> {
    stores
        .delivered
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find(|(_, v, _)| *v == version)
        .map(|(_, _, files)| files.clone())
        .expect("delivered")
}

#[tokio::test]
async fn a_certificate_is_verified_delivered_rotated_and_the_old_serial_revoked() {
    let ca = authority();
    let ledger = MemoryLedger::default();
    let issuer = Arc::new(CaIssuer::new(ca.clone(), Arc::new(ledger.clone())));
    let key = lease_key("cert");
    let ctx = context(&key, issuer);
    let stores = MemoryStores::default();
    let engine = Engine::new();
    let mut progress = stores.load(&key);

    let out = engine
        .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap();
    assert!(matches!(out, Outcome::Wait { .. }), "{out:?}");
    let v1 = progress.current().unwrap().clone();
    assert_eq!(v1.version, 1);
    assert_eq!(v1.credential_id.len(), 32, "the serial, 16 bytes of hex");
    let files = delivered(&stores, 1);
    assert_eq!(
        files.keys().cloned().collect::<Vec<_>>(),
        ["ca.crt", "tls.crt", "tls.key"]
    );
    assert!(files["tls.key"].contains("PRIVATE KEY"));
    let dir = tempfile::tempdir().unwrap();
    openssl_verify(dir.path(), &files["ca.crt"], &files["tls.crt"], None).unwrap();

    // Rotate: v2 is issued with a new key, v1's serial goes into the ledger and its key
    // leaves the secret store.
    let out = engine
        .reconcile(&ctx, &mut progress, &obs(Some("now")), stores.stores())
        .await
        .unwrap();
    assert!(matches!(out, Outcome::Wait { .. }), "{out:?}");
    let v2 = progress.current().unwrap().clone();
    assert_eq!(v2.version, 2);
    assert_ne!(v2.credential_id, v1.credential_id);
    assert!(progress.version(1).is_none(), "v1 revoked: {progress:?}");
    assert!(stores.password(&key, 1).is_none(), "v1's key wiped");
    let files2 = delivered(&stores, 2);
    assert_ne!(files2["tls.key"], files["tls.key"], "a fresh key");
    let revoked: RevocationList = {
        let list = ledger.0.lock().unwrap();
        list.clone()
    };
    assert!(revoked.is_revoked(&v1.credential_id));
    assert!(!revoked.is_revoked(&v2.credential_id));

    // The CRL signed from the ledger rejects v1 and accepts v2.
    let mut list = revoked;
    let crl = list
        .sign(&ca, OffsetDateTime::now_utc(), time::Duration::hours(24))
        .unwrap();
    let err = openssl_verify(
        dir.path(),
        &files["ca.crt"],
        &files["tls.crt"],
        Some(&crl.pem),
    )
    .unwrap_err();
    assert!(err.contains("revoked"), "{err}");
    openssl_verify(
        dir.path(),
        &files2["ca.crt"],
        &files2["tls.crt"],
        Some(&crl.pem),
    )
    .unwrap();

    // Deleting the lease revokes v2 too.
    let out = engine
        .reconcile(&ctx, &mut progress, &deleting(), stores.stores())
        .await
        .unwrap();
    assert_eq!(out, Outcome::Finished);
    assert!(ledger.0.lock().unwrap().is_revoked(&v2.credential_id));
    assert!(stores.all_passwords().is_empty(), "every key wiped");

    // No key material in status or Debug output.
    let shown = format!(
        "{progress:?} {ctx:?} {:?}",
        serde_json::to_string(&progress)
    );
    assert!(!shown.contains("PRIVATE KEY"), "{shown}");
}

/// An issuer that signs for other names than requested while `wrong` is set.
struct WrongNames {
    inner: CaIssuer,
    wrong: AtomicBool,
    issued: Mutex<Vec<String>>,
}

#[async_trait]
impl CertificateIssuer for WrongNames {
    fn kind(&self) -> &'static str {
        "CA"
    }
    async fn issue(&self, order: IssueOrder<'_>) -> Result<IssuedChain, IssuerError> {
        let chain = if self.wrong.load(Ordering::SeqCst) {
            let mut other = order.request.clone();
            other.dns_names = vec!["evil.example".into()];
            let key = leasehold_certs::generate_key(KeyAlgorithm::EcdsaP256).unwrap();
            let csr = leasehold_certs::csr_for(&key, &other).unwrap();
            self.inner
                .issue(IssueOrder {
                    request: &other,
                    csr_pem: &csr,
                    ..order
                })
                .await?
        } else {
            self.inner.issue(order).await?
        };
        self.issued.lock().unwrap().push(chain.serial.clone());
        Ok(chain)
    }
    async fn revoke(&self, order: RevokeOrder<'_>) -> Result<(), IssuerError> {
        self.inner.revoke(order).await
    }
}

#[tokio::test]
async fn a_certificate_that_fails_verification_is_revoked_and_the_current_one_kept() {
    let ledger = MemoryLedger::default();
    let issuer = Arc::new(WrongNames {
        inner: CaIssuer::new(authority(), Arc::new(ledger.clone())),
        wrong: AtomicBool::new(false),
        issued: Mutex::default(),
    });
    let key = lease_key("cert-bad");
    let ctx = context(&key, issuer.clone());
    let stores = MemoryStores::default();
    let engine = Engine::new();
    let mut progress = stores.load(&key);
    engine
        .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap();
    let v1 = progress.current().unwrap().clone();

    issuer.wrong.store(true, Ordering::SeqCst);
    engine
        .reconcile(&ctx, &mut progress, &obs(Some("now")), stores.stores())
        .await
        .unwrap();
    let bad = issuer.issued.lock().unwrap().last().cloned().unwrap();
    assert_eq!(progress.current().unwrap().credential_id, v1.credential_id);
    assert!(
        ledger.0.lock().unwrap().is_revoked(&bad),
        "the bad one revoked"
    );
    assert!(!ledger.0.lock().unwrap().is_revoked(&v1.credential_id));
    let failure = progress.rotation_failure().expect("failure recorded");
    assert!(
        failure.reason.as_deref().unwrap_or("").contains("name"),
        "{failure:?}"
    );
    assert_eq!(
        stores.delivered.lock().unwrap().last().unwrap().1,
        1,
        "consumers keep v1"
    );
}

/// An issuer that is down until told otherwise; counts signatures per serial.
struct Flaky {
    inner: CaIssuer,
    down: AtomicBool,
    serials: Mutex<Vec<String>>,
}

#[async_trait]
impl CertificateIssuer for Flaky {
    fn kind(&self) -> &'static str {
        "CA"
    }
    async fn issue(&self, order: IssueOrder<'_>) -> Result<IssuedChain, IssuerError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(IssuerError::Unavailable("connection refused".into()));
        }
        self.serials.lock().unwrap().push(order.serial.to_owned());
        self.inner.issue(order).await
    }
    async fn revoke(&self, order: RevokeOrder<'_>) -> Result<(), IssuerError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(IssuerError::Unavailable("connection refused".into()));
        }
        self.inner.revoke(order).await
    }
}

#[tokio::test]
async fn an_unavailable_issuer_delays_and_a_crash_after_signing_reuses_the_serial() {
    let ledger = MemoryLedger::default();
    let issuer = Arc::new(Flaky {
        inner: CaIssuer::new(authority(), Arc::new(ledger.clone())),
        down: AtomicBool::new(true),
        serials: Mutex::default(),
    });
    let key = lease_key("cert-flaky");
    let ctx = context(&key, issuer.clone());
    let stores = MemoryStores::default();

    // Down: nothing lost, the version waits as Issuing with its key stored.
    let engine = Engine::new();
    let mut progress = stores.load(&key);
    let err = engine
        .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::Backend { .. }), "{err}");
    let pending = stores.load(&key).version(1).cloned().unwrap();
    assert_eq!(pending.state, VersionState::Issuing);
    assert!(stores.password(&key, 1).is_some());

    // Back, but the process "crashes" right after the CA signed.
    issuer.down.store(false, Ordering::SeqCst);
    let crashing = Engine::new().with_fault_hook(Arc::new(|p| {
        if p == FaultPoint::AfterIssue {
            Err("crash".into())
        } else {
            Ok(())
        }
    }));
    let mut progress = stores.load(&key);
    crashing
        .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap_err();

    // The restarted process resumes under the same serial.
    let mut progress = stores.load(&key);
    engine
        .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap();
    let current = progress.current().unwrap();
    assert_eq!(current.credential_id, pending.credential_id);
    let serials = issuer.serials.lock().unwrap().clone();
    assert!(
        serials.iter().all(|s| *s == pending.credential_id),
        "one serial only: {serials:?}"
    );
}
