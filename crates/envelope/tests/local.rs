//! Sealing and opening with local keys: the format's guarantees, the cache, the
//! metrics, rotation between local keys and the migration from plaintext.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use leasehold_envelope::{
    EncryptionContext, EnvelopeError, KeyEncryptionKey, Keyring, KeyringSettings, LocalKey,
    SEALED_PREFIX,
};

const SECRET: &[u8] = b"postgres://app:correct-horse-battery-staple@db/app";

fn reason(err: &EnvelopeError) -> &'static str {
    err.reason()
}

#[tokio::test]
async fn round_trip_with_a_fresh_data_key_per_seal() {
    let key = local_key(1);
    let keyring = Keyring::new(key.clone(), vec![], settings());
    let ctx = lease_ctx("db-main");
    let first = keyring.seal(&ctx, SECRET).await.unwrap();
    let second = keyring.seal(&ctx, SECRET).await.unwrap();
    assert!(first.starts_with(SEALED_PREFIX));
    assert!(first.is_ascii() && !first.contains(['"', '\\', '\n']));
    assert_ne!(first, second, "each seal uses a fresh data key and nonce");
    for stored in [&first, &second] {
        assert!(Keyring::is_sealed(stored.as_bytes()));
        assert_eq!(
            Keyring::envelope_key_id(stored.as_bytes()).as_deref(),
            Some(key.key_id())
        );
        assert!(!keyring.needs_rewrap(stored.as_bytes()));
        let opened = keyring.open(&ctx, stored.as_bytes()).await.unwrap();
        assert_eq!(opened.as_slice(), SECRET);
    }
    assert_eq!(keyring.primary_key_id(), Some(key.key_id()));
    // Empty values and an empty context work too.
    let empty = keyring.seal(&EncryptionContext::new(), b"").await.unwrap();
    assert!(
        keyring
            .open(&EncryptionContext::new(), empty.as_bytes())
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn another_context_is_refused() {
    let keyring = Keyring::new(local_key(1), vec![], settings());
    let stored = keyring.seal(&lease_ctx("db-main"), SECRET).await.unwrap();
    let wrong = [
        lease_ctx("db-other"),
        lease_ctx("db-main").with("kind", "records"),
        lease_ctx("db-main").with("namespace", "other-team"),
        lease_ctx("db-main").with("extra", ""),
        EncryptionContext::new(),
    ];
    for ctx in wrong {
        let err = keyring.open(&ctx, stored.as_bytes()).await.unwrap_err();
        assert_eq!(reason(&err), "Tampered", "{ctx:?}: {err}");
        assert!(!err.is_transient());
        let message = err.to_string();
        assert!(message.contains("local:"), "{message}");
        // Context key names yes, values no.
        assert!(
            !message.contains("db-main") && !message.contains("payments"),
            "{message}"
        );
    }
}

#[tokio::test]
async fn a_blob_moved_to_another_lease_is_refused_even_with_the_cache_warm() {
    let keyring = Keyring::new(local_key(1), vec![], settings());
    let stored = keyring.seal(&lease_ctx("lease-a"), SECRET).await.unwrap();
    // Warm the cache for lease-a.
    keyring
        .open(&lease_ctx("lease-a"), stored.as_bytes())
        .await
        .unwrap();
    let err = keyring
        .open(&lease_ctx("lease-b"), stored.as_bytes())
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "Tampered", "{err}");
}

#[tokio::test]
async fn every_changed_byte_is_refused() {
    let keyring = Keyring::new(local_key(1), vec![], settings());
    let ctx = lease_ctx("db-main");
    let stored = keyring.seal(&ctx, SECRET).await.unwrap();
    let binary = URL_SAFE_NO_PAD
        .decode(&stored[SEALED_PREFIX.len()..])
        .unwrap();
    for i in 0..binary.len() {
        let mut changed = binary.clone();
        changed[i] ^= 0x01;
        let text = format!("{SEALED_PREFIX}{}", URL_SAFE_NO_PAD.encode(&changed));
        let err = keyring.open(&ctx, text.as_bytes()).await.unwrap_err();
        assert!(
            matches!(reason(&err), "Tampered" | "Malformed" | "UnknownKey"),
            "byte {i}: {err}"
        );
    }
    // Cut short, or with bytes added.
    let err = keyring
        .open(&ctx, &stored.as_bytes()[..stored.len() - 2])
        .await
        .unwrap_err();
    assert!(matches!(reason(&err), "Tampered" | "Malformed"), "{err}");
    let err = keyring
        .open(&ctx, format!("{stored}AAAA").as_bytes())
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "Tampered", "{err}");
}

/// Re-encode an envelope with another key id in its header.
fn swap_key_id(stored: &str, new_key_id: &str) -> String {
    let binary = URL_SAFE_NO_PAD
        .decode(&stored[SEALED_PREFIX.len()..])
        .unwrap();
    let old_len = usize::from(u16::from_be_bytes([binary[1], binary[2]]));
    let mut out = vec![binary[0]];
    out.extend_from_slice(&u16::try_from(new_key_id.len()).unwrap().to_be_bytes());
    out.extend_from_slice(new_key_id.as_bytes());
    out.extend_from_slice(&binary[3 + old_len..]);
    format!("{SEALED_PREFIX}{}", URL_SAFE_NO_PAD.encode(&out))
}

#[tokio::test]
async fn a_swapped_header_key_id_is_refused() {
    let old = local_key(1);
    let new = local_key(2);
    let keyring = Keyring::new(new.clone(), vec![old.clone()], settings());
    let ctx = lease_ctx("db-main");
    let stored = keyring.seal(&ctx, SECRET).await.unwrap();
    // Naming another key this ring holds: that key cannot unwrap the data key.
    let swapped = swap_key_id(&stored, old.key_id());
    assert_eq!(
        Keyring::envelope_key_id(swapped.as_bytes()).as_deref(),
        Some(old.key_id())
    );
    let err = keyring.open(&ctx, swapped.as_bytes()).await.unwrap_err();
    assert_eq!(reason(&err), "Tampered", "{err}");
    // Naming a key nobody holds.
    let swapped = swap_key_id(&stored, "local:ffffffffffffffff");
    let err = keyring.open(&ctx, swapped.as_bytes()).await.unwrap_err();
    assert_eq!(reason(&err), "UnknownKey", "{err}");
    assert!(err.to_string().contains("local:ffffffffffffffff"), "{err}");
}

#[tokio::test]
async fn legacy_plaintext_opens_as_is_and_needs_rewrap() {
    let keyring = Keyring::new(local_key(1), vec![], settings());
    let ctx = lease_ctx("db-main");
    let legacy = br#"{"versions":[{"password":"hunter2"}]}"#;
    assert!(!Keyring::is_sealed(legacy));
    assert_eq!(Keyring::envelope_key_id(legacy), None);
    assert!(keyring.needs_rewrap(legacy));
    let opened = keyring.open(&ctx, legacy).await.unwrap();
    assert_eq!(opened.as_slice(), legacy);
    // Rewritten, it is sealed under the primary and needs nothing more.
    let sealed = keyring.seal(&ctx, &opened).await.unwrap();
    assert!(!keyring.needs_rewrap(sealed.as_bytes()));
    // A newer envelope version is not mistaken for plaintext.
    let err = keyring.open(&ctx, b"lhenc9:AAAA").await.unwrap_err();
    assert_eq!(reason(&err), "Malformed", "{err}");
    assert!(err.to_string().contains("upgrade"), "{err}");
}

#[tokio::test]
async fn the_unencrypted_keyring_stores_plaintext() {
    let keyring = Keyring::unencrypted();
    let ctx = lease_ctx("db-main");
    assert_eq!(keyring.primary_key_id(), None);
    let stored = keyring.seal(&ctx, b"plain text").await.unwrap();
    assert_eq!(stored, "plain text");
    assert!(!keyring.needs_rewrap(stored.as_bytes()));
    assert_eq!(
        keyring
            .open(&ctx, stored.as_bytes())
            .await
            .unwrap()
            .as_slice(),
        b"plain text"
    );
    // It holds no key, so an envelope names an unknown key (and should be rewritten).
    let sealed = Keyring::new(local_key(1), vec![], settings())
        .seal(&ctx, SECRET)
        .await
        .unwrap();
    assert!(keyring.needs_rewrap(sealed.as_bytes()));
    let err = keyring.open(&ctx, sealed.as_bytes()).await.unwrap_err();
    assert_eq!(reason(&err), "UnknownKey", "{err}");
    // Binary or envelope-looking plaintext cannot be stored as text.
    assert_eq!(
        reason(&keyring.seal(&ctx, &[0xff, 0xfe]).await.unwrap_err()),
        "Malformed"
    );
    assert_eq!(
        reason(&keyring.seal(&ctx, b"lhenc1:abc").await.unwrap_err()),
        "Malformed"
    );
}

#[tokio::test]
async fn rotation_between_local_keys() {
    let old = local_key(1);
    let new = local_key(2);
    let ctx = lease_ctx("db-main");
    let stored_old = Keyring::new(old.clone(), vec![], settings())
        .seal(&ctx, SECRET)
        .await
        .unwrap();
    // The new primary without the old key cannot open it.
    let without_old = Keyring::new(new.clone(), vec![], settings());
    let err = without_old
        .open(&ctx, stored_old.as_bytes())
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "UnknownKey", "{err}");
    assert!(err.to_string().contains(old.key_id()), "{err}");
    // With the old key decrypt-only: opens, needs rewrap, resealed under the new.
    let rotating = Keyring::new(new.clone(), vec![old.clone()], settings());
    assert!(rotating.needs_rewrap(stored_old.as_bytes()));
    let opened = rotating.open(&ctx, stored_old.as_bytes()).await.unwrap();
    let resealed = rotating.seal(&ctx, &opened).await.unwrap();
    assert_eq!(
        Keyring::envelope_key_id(resealed.as_bytes()).as_deref(),
        Some(new.key_id())
    );
    assert!(!rotating.needs_rewrap(resealed.as_bytes()));
    assert_eq!(
        without_old
            .open(&ctx, resealed.as_bytes())
            .await
            .unwrap()
            .as_slice(),
        SECRET
    );
}

#[tokio::test]
async fn second_open_of_a_blob_is_served_by_the_cache() {
    let (keyring, registry) = keyring_with_registry(local_key(1), vec![], settings());
    let ctx_a = lease_ctx("lease-a");
    let stored = keyring.seal(&ctx_a, SECRET).await.unwrap();
    assert_eq!(calls(&registry, "generate_data_key"), 1.0);
    keyring.open(&ctx_a, stored.as_bytes()).await.unwrap();
    assert_eq!(calls(&registry, "decrypt"), 1.0);
    keyring.open(&ctx_a, stored.as_bytes()).await.unwrap();
    keyring.open(&ctx_a, stored.as_bytes()).await.unwrap();
    assert_eq!(
        calls(&registry, "decrypt"),
        1.0,
        "no key call after the first open"
    );
    assert_eq!(
        metric(&registry, "leasehold_kms_data_key_cache_hits_total", &[]),
        2.0
    );
    // Another context is not served from the cache (and is refused).
    keyring
        .open(&lease_ctx("lease-b"), stored.as_bytes())
        .await
        .unwrap_err();
    assert_eq!(calls(&registry, "decrypt"), 2.0);
    assert_eq!(
        metric(
            &registry,
            "leasehold_kms_requests_total",
            &[
                ("operation", "decrypt"),
                ("outcome", "tampered"),
                ("key", "local")
            ]
        ),
        1.0
    );
    // Another blob under the same context has its own data key.
    let other = keyring.seal(&ctx_a, SECRET).await.unwrap();
    keyring.open(&ctx_a, other.as_bytes()).await.unwrap();
    assert_eq!(calls(&registry, "decrypt"), 3.0);
}

#[tokio::test(start_paused = true)]
async fn cached_data_keys_expire_after_the_ttl() {
    let (keyring, registry) = keyring_with_registry(
        local_key(1),
        vec![],
        KeyringSettings {
            data_key_cache_ttl: Duration::from_secs(60),
            data_key_cache_capacity: 8,
        },
    );
    let ctx = lease_ctx("db-main");
    let stored = keyring.seal(&ctx, SECRET).await.unwrap();
    keyring.open(&ctx, stored.as_bytes()).await.unwrap();
    tokio::time::advance(Duration::from_secs(59)).await;
    keyring.open(&ctx, stored.as_bytes()).await.unwrap();
    assert_eq!(calls(&registry, "decrypt"), 1.0);
    tokio::time::advance(Duration::from_secs(2)).await;
    keyring.open(&ctx, stored.as_bytes()).await.unwrap();
    assert_eq!(
        calls(&registry, "decrypt"),
        2.0,
        "expired entry is not served"
    );
    keyring.open(&ctx, stored.as_bytes()).await.unwrap();
    assert_eq!(calls(&registry, "decrypt"), 2.0, "fresh entry cached again");
}

#[tokio::test]
async fn the_cache_is_bounded_and_can_be_off() {
    let (keyring, registry) = keyring_with_registry(
        local_key(1),
        vec![],
        KeyringSettings {
            data_key_cache_ttl: Duration::from_secs(60),
            data_key_cache_capacity: 2,
        },
    );
    let ctx = lease_ctx("db-main");
    let mut blobs = Vec::new();
    for _ in 0..3 {
        blobs.push(keyring.seal(&ctx, SECRET).await.unwrap());
    }
    for blob in &blobs {
        keyring.open(&ctx, blob.as_bytes()).await.unwrap();
    }
    assert_eq!(calls(&registry, "decrypt"), 3.0);
    // The least recently used (the first) was evicted; the last two are held.
    keyring.open(&ctx, blobs[2].as_bytes()).await.unwrap();
    keyring.open(&ctx, blobs[1].as_bytes()).await.unwrap();
    assert_eq!(calls(&registry, "decrypt"), 3.0);
    keyring.open(&ctx, blobs[0].as_bytes()).await.unwrap();
    assert_eq!(calls(&registry, "decrypt"), 4.0);

    let (uncached, registry) = keyring_with_registry(
        local_key(1),
        vec![],
        KeyringSettings {
            data_key_cache_ttl: Duration::from_secs(60),
            data_key_cache_capacity: 0,
        },
    );
    uncached.open(&ctx, blobs[0].as_bytes()).await.unwrap();
    uncached.open(&ctx, blobs[0].as_bytes()).await.unwrap();
    assert_eq!(calls(&registry, "decrypt"), 2.0);
}

#[tokio::test]
async fn metrics_have_the_documented_names() {
    let (keyring, registry) = keyring_with_registry(local_key(1), vec![], settings());
    let ctx = lease_ctx("db-main");
    let stored = keyring.seal(&ctx, SECRET).await.unwrap();
    keyring.open(&ctx, stored.as_bytes()).await.unwrap();
    keyring.open(&ctx, stored.as_bytes()).await.unwrap();
    let text = encoded(&registry);
    for expected in [
        "# TYPE leasehold_kms_requests counter",
        r#"leasehold_kms_requests_total{operation="generate_data_key",outcome="ok",key="local"} 1"#,
        r#"leasehold_kms_requests_total{operation="decrypt",outcome="ok",key="local"} 1"#,
        "# TYPE leasehold_kms_data_key_cache_hits counter",
        "leasehold_kms_data_key_cache_hits_total 1",
        "# TYPE leasehold_kms_request_duration_seconds histogram",
        r#"leasehold_kms_request_duration_seconds_count{operation="decrypt",key="local"} 1"#,
        r#"leasehold_kms_request_duration_seconds_count{operation="generate_data_key",key="local"} 1"#,
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
}

#[tokio::test]
async fn key_files_and_secret_data() {
    let dir = tempfile::tempdir().unwrap();
    let generated = LocalKey::generate().unwrap();
    let b64 = generated.expose_base64();
    let path = dir.path().join("kek");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(format!("{}\n", b64.as_str()).as_bytes())
        .unwrap();
    let loaded = LocalKey::from_file(&path).unwrap();
    assert_eq!(loaded.key_id(), generated.key_id());
    let from_secret = LocalKey::parse(b64.as_bytes()).unwrap();
    assert_eq!(from_secret.key_id(), generated.key_id());
    // A value sealed under the generated key opens with the loaded one.
    let ctx = lease_ctx("db-main");
    let stored = Keyring::new(Arc::new(generated), vec![], settings())
        .seal(&ctx, SECRET)
        .await
        .unwrap();
    let opened = Keyring::new(Arc::new(loaded), vec![], settings())
        .open(&ctx, stored.as_bytes())
        .await
        .unwrap();
    assert_eq!(opened.as_slice(), SECRET);

    std::fs::write(&path, b"too short\n").unwrap();
    let err = LocalKey::from_file(&path).unwrap_err();
    assert_eq!(err.reason(), "InvalidLocalKey");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert!(!err.to_string().contains("too short"), "{err}");
}

#[tokio::test]
async fn debug_and_errors_show_no_secrets() {
    let key_bytes = [0x42u8; 32];
    let key = Arc::new(LocalKey::from_bytes(key_bytes));
    let keyring = Keyring::new(key.clone(), vec![local_key(9)], settings());
    let ctx = lease_ctx("db-main");
    let stored = keyring.seal(&ctx, SECRET).await.unwrap();
    keyring.open(&ctx, stored.as_bytes()).await.unwrap();
    let (data_key, _wrapped) = key.generate_data_key(&ctx).await.unwrap();
    let errors = [
        keyring
            .open(&lease_ctx("other"), stored.as_bytes())
            .await
            .unwrap_err(),
        keyring
            .open(
                &ctx,
                swap_key_id(&stored, "local:0000000000000000").as_bytes(),
            )
            .await
            .unwrap_err(),
        keyring.open(&ctx, b"lhenc1:!!").await.unwrap_err(),
    ];
    let forbidden: Vec<String> = vec![
        String::from_utf8_lossy(SECRET).into_owned(),
        "correct-horse".to_owned(),
        key.expose_base64().to_string(),
        base64::engine::general_purpose::STANDARD.encode(data_key.expose_bytes()),
        URL_SAFE_NO_PAD.encode(data_key.expose_bytes()),
        format!("{:?}", data_key.expose_bytes()),
        format!("{:?}", &key_bytes),
        format!("{:?}", &key_bytes[..4])
            .trim_end_matches(']')
            .to_owned(),
    ];
    let shown = [
        format!("{keyring:?}"),
        format!("{key:?}"),
        format!("{data_key:?}"),
        format!("{errors:?}"),
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n"),
    ];
    for text in &shown {
        for secret in &forbidden {
            assert!(
                !text.contains(secret.as_str()),
                "{secret:?} leaked in {text}"
            );
        }
    }
    assert!(shown[0].contains(key.key_id()), "{}", shown[0]);
}
