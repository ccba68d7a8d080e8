//! Local mode with the state file encrypted at rest: sealed values, a wrong key, and
//! rekeying between local keys, plaintext and KMS, against a real PostgreSQL.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use leasehold_engine::Engine;
use leasehold_engine::local::{
    LocalError, LocalOptions, LocalRunner, LocalState, StateFile, StoredValue,
};
use leasehold_envelope::{
    KeyEncryptionKey, Keyring, KeyringSettings, KmsKey, KmsSettings, LocalKey,
};
use leasehold_testkit::{MotoServer, PostgresServer};
use secrecy::ExposeSecret;

fn manifests(dir: &Path, server: &PostgresServer, rotate: Option<&str>) {
    let annotations = rotate
        .map(|r| format!("  annotations:\n    leasehold.dev/rotate: \"{r}\"\n"))
        .unwrap_or_default();
    let yaml = format!(
        "apiVersion: leasehold.dev/v1alpha1
kind: RotationPolicy
metadata:
  name: p
spec:
  ttl: 1h
  revoke: {{gracePeriod: 0s, maxWait: 0s, waitForConsumers: false}}
---
apiVersion: v1
kind: Secret
metadata:
  name: admin
stringData:
  username: {}
  password: {}
---
apiVersion: leasehold.dev/v1alpha1
kind: SecretLease
metadata:
  name: app
{annotations}spec:
  policyRef: {{name: p}}
  postgres:
    host: {}
    port: {}
    database: {}
    adminSecretRef: {{name: admin}}
    tls: {{mode: Disable}}
",
        server.admin_user(),
        server.admin_password().expose_secret(),
        server.host(),
        server.port(),
        server.database()
    );
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("all.yaml"), yaml).unwrap();
}

fn keyring(primary: &Arc<LocalKey>, old: &[&Arc<LocalKey>]) -> Arc<Keyring> {
    Arc::new(Keyring::new(
        primary.clone(),
        old.iter()
            .map(|k| (*k).clone() as Arc<dyn KeyEncryptionKey>)
            .collect(),
        KeyringSettings::default(),
    ))
}

struct Setup {
    _tmp: tempfile::TempDir,
    mdir: PathBuf,
    state: PathBuf,
    out: PathBuf,
}

impl Setup {
    fn new(server: &PostgresServer) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let mdir = tmp.path().join("m");
        manifests(&mdir, server, None);
        Self {
            mdir,
            state: tmp.path().join("state.json"),
            out: tmp.path().join("out"),
            _tmp: tmp,
        }
    }

    fn options(&self, keyring: Arc<Keyring>) -> LocalOptions {
        LocalOptions {
            manifests: self.mdir.clone(),
            state: self.state.clone(),
            output: self.out.clone(),
            keyring,
        }
    }

    fn delivered(&self) -> (String, String) {
        let dir = self.out.join("default/app");
        (
            std::fs::read_to_string(dir.join("username")).unwrap(),
            std::fs::read_to_string(dir.join("password")).unwrap(),
        )
    }

    fn state_text(&self) -> String {
        std::fs::read_to_string(&self.state).unwrap()
    }

    /// The key ids the state file's sealed values name.
    fn key_ids(&self) -> Vec<Option<String>> {
        LocalState::load(&self.state)
            .unwrap()
            .stored_values()
            .into_iter()
            .map(|(_, v)| Keyring::envelope_key_id(v.as_bytes()))
            .collect()
    }

    /// A pass with `keyring` that rotates (a new annotation value `tag`): the new
    /// credential logs in, the one before is revoked; returns the new credential.
    async fn rotate(&self, server: &PostgresServer, keyring: Arc<Keyring>, tag: &str) {
        let before = self.delivered();
        manifests(&self.mdir, server, Some(tag));
        let runner = LocalRunner::new(self.options(keyring), Engine::new()).unwrap();
        let report = runner.pass().await.unwrap();
        assert!(report.errors.is_empty(), "{tag}: {:?}", report.errors);
        let after = self.delivered();
        assert_ne!(before.0, after.0, "{tag}: rotated");
        assert!(
            server.connect_as(&after.0, &after.1).await.is_ok(),
            "{tag}: the new credential logs in"
        );
        assert!(
            server.connect_as(&before.0, &before.1).await.is_err(),
            "{tag}: the old credential is revoked"
        );
        assert!(!self.state_text().contains(&after.1) || tag.starts_with("plain"));
    }
}

/// Rekey `state` (refusing while a runner holds it) and return the values rewrapped.
async fn rekey(state: &Path, keyring: Arc<Keyring>) -> usize {
    let report = StateFile::open(state, keyring)
        .unwrap()
        .rewrap()
        .await
        .unwrap();
    assert!(
        report.rewrapped.keys().all(|k| k == "default/app"),
        "{report:?}"
    );
    report.total()
}

#[tokio::test]
async fn a_keyed_run_keeps_no_password_in_the_state_file_and_still_rotates() {
    let server = PostgresServer::shared().await;
    let s = Setup::new(server);
    let key = Arc::new(LocalKey::generate().unwrap());
    let ring = keyring(&key, &[]);
    let runner = LocalRunner::new(s.options(ring.clone()), Engine::new()).unwrap();
    let report = runner.pass().await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let (user, pw) = s.delivered();
    assert!(server.connect_as(&user, &pw).await.is_ok());
    let text = s.state_text();
    assert!(text.contains("\"lhenc1:"), "{text}");
    assert!(
        !text.contains(&pw),
        "the password is sealed in the state file"
    );
    assert!(
        s.key_ids()
            .iter()
            .all(|id| id.as_deref() == Some(key.key_id())),
        "every value is sealed under the key"
    );
    let debug = format!("{runner:?} {ring:?}");
    assert!(!debug.contains(&pw) && !debug.contains(key.expose_base64().as_str()));
    drop(runner);
    s.rotate(server, ring, "r1").await;
    assert!(s.state_text().contains("\"lhenc1:"));
}

#[tokio::test]
async fn a_wrong_key_fails_naming_the_key_and_loses_nothing() {
    let server = PostgresServer::shared().await;
    let s = Setup::new(server);
    let right = Arc::new(LocalKey::generate().unwrap());
    let wrong = Arc::new(LocalKey::generate().unwrap());
    let runner = LocalRunner::new(s.options(keyring(&right, &[])), Engine::new()).unwrap();
    assert!(runner.pass().await.unwrap().errors.is_empty());
    drop(runner);
    let (user, pw) = s.delivered();
    let before = s.state_text();

    for (what, ring) in [
        ("another key", keyring(&wrong, &[])),
        ("no encryption", Arc::new(Keyring::unencrypted())),
    ] {
        let runner = LocalRunner::new(s.options(ring), Engine::new()).unwrap();
        let err = runner.pass().await.unwrap_err();
        assert!(matches!(err, LocalError::Key { .. }), "{what}: {err:?}");
        let msg = err.to_string();
        assert!(msg.contains(right.key_id()), "{what}: {msg}");
        assert!(msg.contains("lease default/app"), "{what}: {msg}");
        assert!(msg.contains("--decrypt-key-file"), "{what}: {msg}");
        assert!(!msg.contains(&pw), "{what}: {msg}");
        assert_eq!(
            s.state_text(),
            before,
            "{what}: the state file is untouched"
        );
        assert_eq!(s.delivered(), (user.clone(), pw.clone()));
    }
    // Rekeying with the wrong key fails too, and writes nothing.
    let err = StateFile::open(&s.state, keyring(&wrong, &[]))
        .unwrap()
        .rewrap()
        .await
        .unwrap_err();
    assert!(err.to_string().contains(right.key_id()), "{err}");
    assert_eq!(s.state_text(), before);

    // With the right key everything is as it was: no new version, the credential works.
    let runner = LocalRunner::new(s.options(keyring(&right, &[])), Engine::new()).unwrap();
    assert!(runner.pass().await.unwrap().errors.is_empty());
    assert_eq!(s.delivered(), (user.clone(), pw.clone()));
    assert!(server.connect_as(&user, &pw).await.is_ok());
    drop(runner);
    s.rotate(server, keyring(&right, &[]), "after-wrong-key")
        .await;
}

#[tokio::test]
async fn rekey_local_a_to_b_to_plaintext_and_back_to_a() {
    let server = PostgresServer::shared().await;
    let s = Setup::new(server);
    let a = Arc::new(LocalKey::generate().unwrap());
    let b = Arc::new(LocalKey::generate().unwrap());
    let runner = LocalRunner::new(s.options(keyring(&a, &[])), Engine::new()).unwrap();
    assert!(runner.pass().await.unwrap().errors.is_empty());
    drop(runner);

    // A → B: B alone then opens everything.
    assert!(rekey(&s.state, keyring(&b, &[&a])).await > 0);
    assert!(
        s.key_ids()
            .iter()
            .all(|id| id.as_deref() == Some(b.key_id()))
    );
    assert_eq!(rekey(&s.state, keyring(&b, &[&a])).await, 0, "nothing left");
    s.rotate(server, keyring(&b, &[]), "to-b").await;

    // B → plaintext (--no-encryption with B to open).
    let plain = || {
        Arc::new(Keyring::unencrypted_opening(
            vec![b.clone() as Arc<dyn KeyEncryptionKey>],
            KeyringSettings::default(),
        ))
    };
    assert!(rekey(&s.state, plain()).await > 0);
    assert!(s.key_ids().iter().all(Option::is_none), "all plaintext");
    let (_, pw) = s.delivered();
    assert!(s.state_text().contains(&pw), "plaintext, as asked");
    s.rotate(server, Arc::new(Keyring::unencrypted()), "plain-1")
        .await;

    // Plaintext → A (no old key needed).
    assert!(rekey(&s.state, keyring(&a, &[])).await > 0);
    assert!(
        s.key_ids()
            .iter()
            .all(|id| id.as_deref() == Some(a.key_id()))
    );
    let (_, pw) = s.delivered();
    assert!(!s.state_text().contains(&pw));
    s.rotate(server, keyring(&a, &[]), "back-to-a").await;
}

#[tokio::test]
async fn rekey_is_refused_while_a_runner_holds_the_state_file() {
    let server = PostgresServer::shared().await;
    let s = Setup::new(server);
    let a = Arc::new(LocalKey::generate().unwrap());
    let b = Arc::new(LocalKey::generate().unwrap());
    let runner = LocalRunner::new(s.options(keyring(&a, &[])), Engine::new()).unwrap();
    assert!(runner.pass().await.unwrap().errors.is_empty());
    let before = s.state_text();
    let err = StateFile::open(&s.state, keyring(&b, &[&a])).unwrap_err();
    assert!(matches!(err, LocalError::Locked { .. }), "{err:?}");
    assert_eq!(s.state_text(), before);
    // The runner goes on with its key.
    assert!(runner.pass().await.unwrap().errors.is_empty());
}

#[tokio::test]
async fn rekey_local_to_kms_and_back() {
    if !MotoServer::available_for("rekey_local_to_kms_and_back") {
        return;
    }
    let moto = MotoServer::start().await;
    let key_id = moto.create_key().await;
    let mut settings = KmsSettings::new(key_id);
    settings.region = Some(MotoServer::REGION.into());
    settings.endpoint_url = Some(moto.endpoint_url());
    let kms: Arc<dyn KeyEncryptionKey> = Arc::new(
        KmsKey::connect_with(settings, moto.config_loader())
            .await
            .unwrap(),
    );
    let server = PostgresServer::shared().await;
    let s = Setup::new(server);
    let local = Arc::new(LocalKey::generate().unwrap());
    let runner = LocalRunner::new(s.options(keyring(&local, &[])), Engine::new()).unwrap();
    assert!(runner.pass().await.unwrap().errors.is_empty());
    drop(runner);

    let to_kms = Arc::new(Keyring::new(
        kms.clone(),
        vec![local.clone() as Arc<dyn KeyEncryptionKey>],
        KeyringSettings::default(),
    ));
    assert!(rekey(&s.state, to_kms).await > 0);
    assert!(
        s.key_ids()
            .iter()
            .all(|id| id.as_deref() == Some(kms.key_id())),
        "{:?}",
        s.key_ids()
    );
    let kms_only = Arc::new(Keyring::new(
        kms.clone(),
        vec![],
        KeyringSettings::default(),
    ));
    s.rotate(server, kms_only, "to-kms").await;

    // KMS → local, the KMS key only to open.
    let back = Arc::new(Keyring::new(
        local.clone(),
        vec![kms.clone()],
        KeyringSettings::default(),
    ));
    assert!(rekey(&s.state, back).await > 0);
    assert!(
        s.key_ids()
            .iter()
            .all(|id| id.as_deref() == Some(local.key_id()))
    );
    s.rotate(server, keyring(&local, &[]), "back-to-local")
        .await;
}

#[tokio::test]
async fn a_sealed_value_opens_only_where_it_was_stored() {
    let key = Arc::new(LocalKey::generate().unwrap());
    let ring = keyring(&key, &[]);
    let at = |namespace: &str, lease: &str, version: u64| StoredValue::Version {
        namespace: namespace.into(),
        lease: lease.into(),
        version,
    };
    let stored = ring
        .seal(&at("default", "app", 2).context(), b"pw")
        .await
        .unwrap();
    assert_eq!(
        ring.open(&at("default", "app", 2).context(), stored.as_bytes())
            .await
            .unwrap()
            .as_slice(),
        b"pw"
    );
    for elsewhere in [
        at("default", "app", 3),
        at("default", "other", 2),
        at("prod", "app", 2),
        StoredValue::IssuerCaKey {
            issuer: "default/app".into(),
        },
    ] {
        let err = ring
            .open(&elsewhere.context(), stored.as_bytes())
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "Tampered", "{elsewhere}");
    }
    let ca = StoredValue::IssuerCaKey {
        issuer: "default/ca".into(),
    };
    let account = StoredValue::IssuerAcmeAccount {
        issuer: "default/ca".into(),
    };
    let sealed = ring.seal(&ca.context(), b"k").await.unwrap();
    assert!(
        ring.open(&account.context(), sealed.as_bytes())
            .await
            .is_err()
    );
}
