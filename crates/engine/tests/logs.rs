//! No secret value reaches logs, Debug output, recorded progress or the server log.
//! (Its own test binary: a scoped tracing subscriber must not race other tests.)
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::db::Db;
use common::{FailVerifyFor, MemoryStores, context, lease_key, obs, policy};
use leasehold_backends::Privileges;
use leasehold_core::Strategy;
use leasehold_engine::Engine;
use leasehold_testkit::PostgresServer;

/// A writer that keeps everything logged.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn no_password_appears_in_logs_errors_or_debug_output() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let s = PostgresServer::shared().await;
    let db = Db::Pg(s);
    let key = lease_key("logs");
    let ctx = context(
        key.clone(),
        db.kind(),
        db.backend(2),
        db.host(),
        db.port(),
        db.database(),
        policy(Strategy::Dynamic, Duration::ZERO),
        Privileges::default(),
    );
    let stores = MemoryStores::default();
    let engine = Engine::new();
    let mut progress = stores.load(&key);
    engine
        .reconcile(&ctx, &mut progress, &obs(None), stores.stores())
        .await
        .unwrap();
    let mut passwords = stores.all_passwords();
    engine
        .reconcile(&ctx, &mut progress, &obs(Some("r")), stores.stores())
        .await
        .unwrap();
    passwords.extend(stores.all_passwords());
    // A failing verification's error text too.
    let bad = context(
        key.clone(),
        db.kind(),
        Arc::new(FailVerifyFor {
            inner: db.backend(1),
            user_suffix: String::new(),
        }),
        db.host(),
        db.port(),
        db.database(),
        policy(Strategy::Dynamic, Duration::ZERO),
        Privileges::default(),
    );
    engine
        .reconcile(&bad, &mut progress, &obs(Some("r2")), stores.stores())
        .await
        .unwrap();
    passwords.extend(stores.all_passwords());

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("rotation step"), "logging was captured");
    let debug = format!(
        "{ctx:?} {progress:?} {:?}",
        stores.delivered.lock().unwrap().len()
    );
    let server_log = s.log_contents();
    assert!(!passwords.is_empty());
    for pw in &passwords {
        assert!(!logs.contains(pw.as_str()), "a password reached the logs");
        assert!(
            !debug.contains(pw.as_str()),
            "a password reached Debug output"
        );
        assert!(
            !server_log.contains(pw.as_str()),
            "a password reached the PostgreSQL log"
        );
        let status = serde_json::to_string(&progress).unwrap();
        assert!(
            !status.contains(pw.as_str()),
            "a password reached recorded progress (status)"
        );
    }
}
