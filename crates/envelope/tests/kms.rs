//! Sealing and opening with a KMS key, against a real moto server through the
//! real aws-sdk-kms client.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use leasehold_envelope::{
    EncryptionContext, EnvelopeError, KeyEncryptionKey, Keyring, KmsKey, KmsSettings, KmsTimeouts,
};
use leasehold_testkit::MotoServer;

const SECRET: &[u8] = b"-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n";

/// Fails a test that hangs instead of finishing; the KMS timeouts under test are
/// far shorter.
async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), future)
        .await
        .expect("a KMS call hung past every configured timeout")
}

#[tokio::test]
async fn round_trip_records_the_key_arn() {
    if !MotoServer::available_for("round_trip_records_the_key_arn") {
        return;
    }
    let moto = MotoServer::start().await;
    let key_id = moto.create_key().await;
    moto.create_alias("alias/leasehold-test", &key_id).await;
    let kek = kms_key(&moto, "alias/leasehold-test", KmsTimeouts::default()).await;
    assert!(kek.key_id().starts_with("arn:aws:kms:"), "{kek:?}");
    assert!(kek.key_id().ends_with(&key_id), "{kek:?}");
    assert_eq!(kek.configured_key_id(), "alias/leasehold-test");
    let (keyring, registry) = keyring_with_registry(kek.clone(), vec![], settings());
    let ctx = lease_ctx("db-main");
    let stored = keyring.seal(&ctx, SECRET).await.unwrap();
    assert_eq!(
        Keyring::envelope_key_id(stored.as_bytes()).as_deref(),
        Some(kek.key_id())
    );
    assert!(!keyring.needs_rewrap(stored.as_bytes()));
    assert_eq!(
        keyring
            .open(&ctx, stored.as_bytes())
            .await
            .unwrap()
            .as_slice(),
        SECRET
    );
    assert_eq!(
        metric(
            &registry,
            "leasehold_kms_requests_total",
            &[
                ("operation", "generate_data_key"),
                ("outcome", "ok"),
                ("key", "kms")
            ]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &registry,
            "leasehold_kms_requests_total",
            &[("operation", "decrypt"), ("outcome", "ok"), ("key", "kms")]
        ),
        1.0
    );
    // Another process configured with the bare key id opens it too.
    let by_id = kms_key(&moto, &key_id, KmsTimeouts::default()).await;
    let other = Keyring::new(by_id, vec![], settings());
    assert_eq!(
        other
            .open(&ctx, stored.as_bytes())
            .await
            .unwrap()
            .as_slice(),
        SECRET
    );
}

#[tokio::test]
async fn kms_refuses_another_encryption_context() {
    if !MotoServer::available_for("kms_refuses_another_encryption_context") {
        return;
    }
    let moto = MotoServer::start().await;
    let kek = kms_key(&moto, &moto.create_key().await, KmsTimeouts::default()).await;
    // KMS itself (moto) binds the wrapped data key to the context...
    let (_data_key, wrapped) = kek.generate_data_key(&lease_ctx("lease-a")).await.unwrap();
    let err = kek
        .decrypt_data_key(kek.key_id(), &wrapped, &lease_ctx("lease-b"))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "Tampered", "{err}");
    assert!(err.to_string().contains("kind, lease, namespace"), "{err}");
    // ...and so does the keyring: a blob moved to another lease does not open.
    let (keyring, registry) = keyring_with_registry(kek.clone(), vec![], settings());
    let stored = keyring.seal(&lease_ctx("lease-a"), SECRET).await.unwrap();
    for ctx in [
        lease_ctx("lease-b"),
        lease_ctx("lease-a").with("kind", "records"),
        EncryptionContext::new(),
    ] {
        let err = keyring.open(&ctx, stored.as_bytes()).await.unwrap_err();
        assert_eq!(err.reason(), "Tampered", "{ctx:?}: {err}");
        assert!(!err.to_string().contains("lease-a"), "{err}");
    }
    assert_eq!(
        metric(
            &registry,
            "leasehold_kms_requests_total",
            &[("operation", "decrypt"), ("outcome", "tampered")]
        ),
        3.0
    );
}

#[tokio::test]
async fn tampered_blobs_and_swapped_key_ids_are_refused() {
    if !MotoServer::available_for("tampered_blobs_and_swapped_key_ids_are_refused") {
        return;
    }
    let moto = MotoServer::start().await;
    let kek = kms_key(&moto, &moto.create_key().await, KmsTimeouts::default()).await;
    let other_kek = kms_key(&moto, &moto.create_key().await, KmsTimeouts::default()).await;
    let keyring = Keyring::new(kek.clone(), vec![], settings());
    let ctx = lease_ctx("db-main");
    let stored = keyring.seal(&ctx, SECRET).await.unwrap();
    // One bit of the tag flipped (in the binary, so the base64 stays valid).
    let changed = {
        use base64::Engine as _;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let prefix = leasehold_envelope::SEALED_PREFIX;
        let mut binary = URL_SAFE_NO_PAD.decode(&stored[prefix.len()..]).unwrap();
        let last = binary.len() - 1;
        binary[last] ^= 0x01;
        format!("{prefix}{}", URL_SAFE_NO_PAD.encode(binary)).into_bytes()
    };
    let err = keyring.open(&ctx, &changed).await.unwrap_err();
    assert_eq!(err.reason(), "Tampered", "{err}");
    // The header names another KMS key: KMS refuses to unwrap the data key with
    // it (moto: AccessDeniedException; AWS: IncorrectKeyException).
    let swapped = replace_key_id(&stored, kek.key_id(), other_kek.key_id());
    let err = keyring.open(&ctx, swapped.as_bytes()).await.unwrap_err();
    assert!(matches!(err.reason(), "Tampered" | "KeyRefused"), "{err}");
    // The same key named differently (bare id instead of ARN): KMS unwraps, but
    // the header is associated data, so the value does not open.
    let bare = kek.key_id().rsplit('/').next().unwrap().to_owned();
    let renamed = replace_key_id(&stored, kek.key_id(), &bare);
    let err = keyring.open(&ctx, renamed.as_bytes()).await.unwrap_err();
    assert_eq!(err.reason(), "Tampered", "{err}");
}

fn replace_key_id(stored: &str, old: &str, new: &str) -> String {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let prefix = leasehold_envelope::SEALED_PREFIX;
    let binary = URL_SAFE_NO_PAD.decode(&stored[prefix.len()..]).unwrap();
    assert_eq!(&binary[3..3 + old.len()], old.as_bytes());
    let mut out = vec![binary[0]];
    out.extend_from_slice(&u16::try_from(new.len()).unwrap().to_be_bytes());
    out.extend_from_slice(new.as_bytes());
    out.extend_from_slice(&binary[3 + old.len()..]);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(&out))
}

#[tokio::test]
async fn a_disabled_key_is_refused_and_reenabled_opens_again() {
    if !MotoServer::available_for("a_disabled_key_is_refused_and_reenabled_opens_again") {
        return;
    }
    let moto = MotoServer::start().await;
    let key_id = moto.create_key().await;
    let kek = kms_key(&moto, &key_id, KmsTimeouts::default()).await;
    // No cache, so every open asks KMS.
    let (keyring, registry) = keyring_with_registry(
        kek.clone(),
        vec![],
        leasehold_envelope::KeyringSettings {
            data_key_cache_capacity: 0,
            ..settings()
        },
    );
    let ctx = lease_ctx("db-main");
    let stored = keyring.seal(&ctx, SECRET).await.unwrap();

    moto.disable_key(&key_id).await;
    let seal_err = keyring.seal(&ctx, SECRET).await.unwrap_err();
    let open_err = keyring.open(&ctx, stored.as_bytes()).await.unwrap_err();
    for err in [&seal_err, &open_err] {
        eprintln!("disabled key: {err}");
        assert!(matches!(err, EnvelopeError::KeyRefused { .. }), "{err}");
        assert_eq!(err.reason(), "KeyRefused");
        assert!(!err.is_transient());
        let message = err.to_string();
        assert!(message.contains("DisabledException"), "{message}");
        assert!(message.contains(&key_id), "{message}");
        assert!(message.contains("enable the key"), "{message}");
    }
    assert_eq!(
        metric(
            &registry,
            "leasehold_kms_requests_total",
            &[("outcome", "refused"), ("key", "kms")]
        ),
        2.0
    );

    moto.enable_key(&key_id).await;
    assert_eq!(
        keyring
            .open(&ctx, stored.as_bytes())
            .await
            .unwrap()
            .as_slice(),
        SECRET,
        "nothing was lost while the key was disabled"
    );
    keyring.seal(&ctx, SECRET).await.unwrap();

    // Pending deletion is refused too; cancelled (AWS leaves the key disabled) and
    // enabled, it works again.
    moto.schedule_key_deletion(&key_id).await;
    let err = keyring.open(&ctx, stored.as_bytes()).await.unwrap_err();
    assert_eq!(err.reason(), "KeyRefused", "{err}");
    assert!(
        err.to_string().contains("KMSInvalidStateException"),
        "{err}"
    );
    moto.cancel_key_deletion(&key_id).await;
    moto.enable_key(&key_id).await;
    keyring.open(&ctx, stored.as_bytes()).await.unwrap();
}

#[tokio::test]
async fn unknown_key_at_connect_is_refused() {
    if !MotoServer::available_for("unknown_key_at_connect_is_refused") {
        return;
    }
    let moto = MotoServer::start().await;
    let settings = KmsSettings {
        key_id: "alias/does-not-exist".to_owned(),
        region: Some(MotoServer::REGION.to_owned()),
        endpoint_url: Some(moto.endpoint_url()),
        timeouts: KmsTimeouts::default(),
    };
    let err = KmsKey::connect_with(settings, moto.config_loader())
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "KeyRefused", "{err}");
    assert!(err.to_string().contains("alias/does-not-exist"), "{err}");
    assert!(err.to_string().contains("NotFoundException"), "{err}");
}

#[tokio::test]
async fn a_stopped_kms_is_unavailable_and_a_restarted_one_works() {
    if !MotoServer::available_for("a_stopped_kms_is_unavailable_and_a_restarted_one_works") {
        return;
    }
    let mut moto = MotoServer::start().await;
    moto.create_alias("alias/leasehold", &moto.create_key().await)
        .await;
    let kek = kms_key(&moto, "alias/leasehold", quick_timeouts()).await;
    let (keyring, registry) = keyring_with_registry(kek.clone(), vec![], settings());
    let ctx = lease_ctx("db-main");
    let stored = keyring.seal(&ctx, SECRET).await.unwrap();

    moto.stop();
    let seal_err = within(keyring.seal(&ctx, SECRET)).await.unwrap_err();
    let open_err = within(keyring.open(&ctx, stored.as_bytes()))
        .await
        .unwrap_err();
    for err in [&seal_err, &open_err] {
        eprintln!("stopped KMS: {err}");
        assert!(matches!(err, EnvelopeError::KeyUnavailable { .. }), "{err}");
        assert!(err.is_transient());
        assert_eq!(err.reason(), "KeyUnavailable");
        assert!(
            err.to_string().contains("alias/leasehold") || err.to_string().contains("arn:"),
            "{err}"
        );
    }
    assert_eq!(
        metric(
            &registry,
            "leasehold_kms_requests_total",
            &[("outcome", "unavailable")]
        ),
        2.0
    );

    // moto keeps keys in memory, so the restarted server has none: recreate the
    // alias, and new writes work through the same client.
    moto.restart().await;
    moto.create_alias("alias/leasehold", &moto.create_key().await)
        .await;
    let fresh = keyring.seal(&ctx, SECRET).await.unwrap();
    assert_eq!(
        keyring
            .open(&ctx, fresh.as_bytes())
            .await
            .unwrap()
            .as_slice(),
        SECRET
    );
}

#[tokio::test]
async fn a_hanging_kms_times_out_and_nothing_is_lost() {
    if !MotoServer::available_for("a_hanging_kms_times_out_and_nothing_is_lost") {
        return;
    }
    let moto = MotoServer::start().await;
    let kek = kms_key(&moto, &moto.create_key().await, quick_timeouts()).await;
    let (keyring, registry) = keyring_with_registry(
        kek,
        vec![],
        leasehold_envelope::KeyringSettings {
            data_key_cache_capacity: 0,
            ..settings()
        },
    );
    let ctx = lease_ctx("db-main");
    let stored = keyring.seal(&ctx, SECRET).await.unwrap();

    moto.pause();
    let started = std::time::Instant::now();
    let err = within(keyring.open(&ctx, stored.as_bytes()))
        .await
        .unwrap_err();
    eprintln!("paused KMS after {:?}: {err}", started.elapsed());
    assert!(matches!(err, EnvelopeError::KeyUnavailable { .. }), "{err}");
    assert!(err.is_transient());
    let err = within(keyring.seal(&ctx, SECRET)).await.unwrap_err();
    assert!(matches!(err, EnvelopeError::KeyUnavailable { .. }), "{err}");
    moto.resume();

    assert_eq!(
        keyring
            .open(&ctx, stored.as_bytes())
            .await
            .unwrap()
            .as_slice(),
        SECRET
    );
    assert_eq!(
        metric(
            &registry,
            "leasehold_kms_requests_total",
            &[("outcome", "unavailable")]
        ),
        2.0
    );
}

#[tokio::test]
async fn cached_data_keys_spare_kms_calls() {
    if !MotoServer::available_for("cached_data_keys_spare_kms_calls") {
        return;
    }
    let moto = MotoServer::start().await;
    let kek = kms_key(&moto, &moto.create_key().await, KmsTimeouts::default()).await;
    let (keyring, registry) = keyring_with_registry(kek, vec![], settings());
    let ctx = lease_ctx("lease-a");
    let stored = keyring.seal(&ctx, SECRET).await.unwrap();
    keyring.open(&ctx, stored.as_bytes()).await.unwrap();
    keyring.open(&ctx, stored.as_bytes()).await.unwrap();
    assert_eq!(
        calls(&registry, "decrypt"),
        1.0,
        "second open made a KMS call"
    );
    assert_eq!(
        metric(&registry, "leasehold_kms_data_key_cache_hits_total", &[]),
        1.0
    );
    keyring
        .open(&lease_ctx("lease-b"), stored.as_bytes())
        .await
        .unwrap_err();
    assert_eq!(
        calls(&registry, "decrypt"),
        2.0,
        "another context hit the cache"
    );
    assert_eq!(
        metric(&registry, "leasehold_kms_data_key_cache_hits_total", &[]),
        1.0
    );
}

#[tokio::test]
async fn rewrap_local_to_kms_and_back() {
    if !MotoServer::available_for("rewrap_local_to_kms_and_back") {
        return;
    }
    let moto = MotoServer::start().await;
    let kms: Arc<dyn KeyEncryptionKey> =
        kms_key(&moto, &moto.create_key().await, KmsTimeouts::default()).await;
    let local: Arc<dyn KeyEncryptionKey> = local_key(7);
    let ctx = lease_ctx("db-main");

    // Plaintext → local.
    let local_ring = Keyring::new(local.clone(), vec![], settings());
    let legacy = b"legacy plaintext";
    assert!(local_ring.needs_rewrap(legacy));
    let under_local = local_ring
        .seal(&ctx, &local_ring.open(&ctx, legacy).await.unwrap())
        .await
        .unwrap();

    // Local → KMS: the new ring has KMS as primary and the local key decrypt-only.
    let to_kms = Keyring::new(kms.clone(), vec![local.clone()], settings());
    assert!(to_kms.needs_rewrap(under_local.as_bytes()));
    let under_kms = to_kms
        .seal(
            &ctx,
            &to_kms.open(&ctx, under_local.as_bytes()).await.unwrap(),
        )
        .await
        .unwrap();
    assert!(!to_kms.needs_rewrap(under_kms.as_bytes()));
    assert_eq!(
        Keyring::envelope_key_id(under_kms.as_bytes()).as_deref(),
        Some(kms.key_id())
    );
    // A KMS-only ring opens it; it cannot open what is still under the local key.
    let kms_only = Keyring::new(kms.clone(), vec![], settings());
    assert_eq!(
        kms_only
            .open(&ctx, under_kms.as_bytes())
            .await
            .unwrap()
            .as_slice(),
        legacy
    );
    let err = kms_only
        .open(&ctx, under_local.as_bytes())
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "UnknownKey", "{err}");

    // KMS → local.
    let to_local = Keyring::new(local.clone(), vec![kms.clone()], settings());
    assert!(to_local.needs_rewrap(under_kms.as_bytes()));
    let back = to_local
        .seal(
            &ctx,
            &to_local.open(&ctx, under_kms.as_bytes()).await.unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        Keyring::envelope_key_id(back.as_bytes()).as_deref(),
        Some(local.key_id())
    );
    assert_eq!(
        local_ring
            .open(&ctx, back.as_bytes())
            .await
            .unwrap()
            .as_slice(),
        legacy
    );
}

#[tokio::test]
async fn a_kms_key_opens_values_of_other_kms_keys_it_may_use() {
    if !MotoServer::available_for("a_kms_key_opens_values_of_other_kms_keys_it_may_use") {
        return;
    }
    let moto = MotoServer::start().await;
    let old = kms_key(&moto, &moto.create_key().await, KmsTimeouts::default()).await;
    let new = kms_key(&moto, &moto.create_key().await, KmsTimeouts::default()).await;
    let ctx = lease_ctx("db-main");
    let stored = Keyring::new(old.clone(), vec![], settings())
        .seal(&ctx, SECRET)
        .await
        .unwrap();
    // The ring is configured with the new key only: KMS decides, and allows it.
    let ring = Keyring::new(new.clone(), vec![], settings());
    assert!(ring.needs_rewrap(stored.as_bytes()));
    assert_eq!(
        ring.open(&ctx, stored.as_bytes()).await.unwrap().as_slice(),
        SECRET
    );
}

#[tokio::test]
async fn kms_debug_and_errors_show_no_secrets() {
    if !MotoServer::available_for("kms_debug_and_errors_show_no_secrets") {
        return;
    }
    let moto = MotoServer::start().await;
    let key_id = moto.create_key().await;
    let kek = kms_key(&moto, &key_id, KmsTimeouts::default()).await;
    let ctx = lease_ctx("db-main");
    let (data_key, _wrapped) = kek.generate_data_key(&ctx).await.unwrap();
    let keyring = Keyring::new(kek.clone(), vec![], settings());
    let stored = keyring.seal(&ctx, SECRET).await.unwrap();
    moto.disable_key(&key_id).await;
    let refused = keyring
        .open(&lease_ctx("x"), stored.as_bytes())
        .await
        .unwrap_err();
    let shown = format!("{kek:?}\n{keyring:?}\n{data_key:?}\n{refused:?}\n{refused}",);
    use base64::Engine as _;
    for secret in [
        String::from_utf8_lossy(SECRET).into_owned(),
        "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC".to_owned(),
        base64::engine::general_purpose::STANDARD.encode(data_key.expose_bytes()),
        format!("{:?}", data_key.expose_bytes()),
    ] {
        assert!(!shown.contains(&secret), "{secret:?} leaked in {shown}");
    }
    assert!(shown.contains(kek.key_id()), "{shown}");
}
