//! Credentials stored sealed under an AWS KMS key (moto's server, through the real
//! aws-sdk-kms client), with a real PostgreSQL: a KMS outage in the middle of a
//! rotation delays it and loses nothing; nothing is ever stored in clear.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::db::Db;
use common::{MemoryStores, TestClock, context, lease_key, obs, policy};
use leasehold_core::Strategy;
use leasehold_engine::engine::FaultPoint;
use leasehold_engine::engine::Stores;
use leasehold_engine::sealed::SealedSecretStore;
use leasehold_engine::{Engine, EngineError, SecretStore};
use leasehold_envelope::{
    EncryptionContext, Keyring, KeyringSettings, KmsKey, KmsSettings, KmsTimeouts,
};
use leasehold_testkit::{MotoServer, PostgresServer};

fn version_context(lease: &leasehold_engine::LeaseKey, version: u64) -> EncryptionContext {
    EncryptionContext::new()
        .with("leasehold", "versions")
        .with("namespace", &lease.namespace)
        .with("lease", &lease.name)
        .with("version", version.to_string())
}

#[tokio::test]
async fn a_kms_outage_mid_rotation_delays_it_and_loses_nothing() {
    if !MotoServer::available_for("a_kms_outage_mid_rotation_delays_it_and_loses_nothing") {
        return;
    }
    let moto = MotoServer::start().await;
    let key_id = moto.create_key().await;
    let kms = KmsKey::connect_with(
        KmsSettings {
            key_id,
            region: Some(MotoServer::REGION.to_owned()),
            endpoint_url: Some(moto.endpoint_url()),
            timeouts: KmsTimeouts {
                connect: Duration::from_millis(500),
                attempt: Duration::from_millis(700),
                operation: Duration::from_secs(3),
                max_attempts: 2,
            },
        },
        moto.config_loader(),
    )
    .await
    .unwrap();
    let keyring = Arc::new(Keyring::new(
        Arc::new(kms),
        vec![],
        // No cache: every open goes to KMS, so the outage is seen at once.
        KeyringSettings {
            data_key_cache_capacity: 0,
            ..KeyringSettings::default()
        },
    ));

    let s = PostgresServer::shared().await;
    let db = Db::Pg(s);
    let key = lease_key("kms");
    let ctx = context(
        key.clone(),
        db.kind(),
        db.backend(2),
        db.host(),
        db.port(),
        db.database(),
        policy(Strategy::Dynamic, Duration::ZERO),
        db.minimal_privileges(),
    );
    let memory = Arc::new(MemoryStores::default());
    let sealed = SealedSecretStore::new(memory.clone(), keyring.clone(), Arc::new(version_context));
    let stores = Stores {
        progress: memory.as_ref(),
        secrets: &sealed,
        delivery: memory.as_ref(),
    };
    // KMS goes away once the new version is sealed and stored, before the database
    // user is created: verifying it then needs its secret, which needs KMS.
    let outage = Arc::new(AtomicBool::new(false));
    let moto = Arc::new(moto);
    let hook = {
        let outage = outage.clone();
        let moto = moto.clone();
        Arc::new(move |point: FaultPoint| {
            if point == FaultPoint::BeforeIssue && outage.swap(false, Ordering::SeqCst) {
                moto.pause();
            }
            Ok(())
        })
    };
    let clock = TestClock::new();
    let engine = Engine::new().with_clock(clock.func()).with_fault_hook(hook);
    let mut progress = memory.load(&key);
    engine
        .reconcile(&ctx, &mut progress, &obs(None), stores)
        .await
        .unwrap();
    let v1 = progress.current().unwrap().clone();

    outage.store(true, Ordering::SeqCst);
    let err = engine
        .reconcile(&ctx, &mut progress, &obs(Some("rotate")), stores)
        .await
        .unwrap_err();
    let EngineError::Store(store_error) = &err else {
        panic!("a key failure, not {err}");
    };
    assert_eq!(store_error.key_reason(), Some("KeyUnavailable"), "{err}");
    // The rotation waits where it was: v1 current and working, v2 recorded (issued),
    // nothing lost, nothing in clear.
    let saved = memory.load(&key);
    assert_eq!(saved.current().unwrap().version, 1);
    assert_eq!(saved.pending().map(|p| p.version), Some(2));
    let pw1 = sealed.get(&key, 1).await;
    assert!(pw1.is_err(), "cannot even read v1 while KMS is down");
    for stored in memory.all_passwords() {
        assert!(stored.starts_with("lhenc1:"), "stored sealed");
    }

    moto.resume();
    let mut progress = memory.load(&key);
    engine
        .reconcile(&ctx, &mut progress, &obs(Some("rotate")), stores)
        .await
        .unwrap();
    let v2 = progress.current().unwrap().clone();
    assert_eq!(v2.version, 2);
    assert!(progress.version(1).is_none(), "v1 revoked");
    use secrecy::ExposeSecret;
    let pw2 = sealed.get(&key, 2).await.unwrap().unwrap();
    assert!(db.can_login(&v2.credential_id, pw2.expose_secret()).await);
    assert!(!db.user_exists(&v1.credential_id).await);
    for stored in memory.all_passwords() {
        assert!(stored.starts_with("lhenc1:"), "stored sealed");
        assert!(!stored.contains(pw2.expose_secret()));
    }
}
