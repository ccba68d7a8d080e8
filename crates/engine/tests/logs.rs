//! No secret value reaches logs, Debug output, recorded progress or the server log.
//! (Its own test binary: a scoped tracing subscriber must not race other tests.)
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::db::Db;
use common::{MemoryStores, context, lease_key, policy};
use leasehold_backends::{
    Backend, BackendError, CredentialId, IssueRequest, Privileges, RevokeOutcome, RevokeRequest,
    VerifyRequest,
};
use leasehold_core::Strategy;
use leasehold_core::rotation::Observations;
use leasehold_engine::Engine;
use leasehold_testkit::PostgresServer;

fn obs(request: Option<&str>) -> Observations {
    Observations {
        consumers_on_current: true,
        maintenance_window_open: true,
        rotation_request: request.map(String::from),
        ..Default::default()
    }
}

/// Verification always fails (to log a failure).
struct FailVerify(Arc<dyn Backend>);

#[async_trait]
impl Backend for FailVerify {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }
    fn target_key(&self) -> String {
        self.0.target_key()
    }
    async fn issue(&self, req: &IssueRequest) -> Result<(), BackendError> {
        self.0.issue(req).await
    }
    async fn verify(&self, _: &VerifyRequest) -> Result<(), BackendError> {
        Err(BackendError::VerificationFailed(
            "login refused (test)".into(),
        ))
    }
    async fn revoke(&self, req: &RevokeRequest) -> Result<RevokeOutcome, BackendError> {
        self.0.revoke(req).await
    }
    async fn can_login(&self, id: &CredentialId) -> Result<bool, BackendError> {
        self.0.can_login(id).await
    }
    async fn list_users(&self, prefix: &str) -> Result<Vec<CredentialId>, BackendError> {
        self.0.list_users(prefix).await
    }
    async fn ping(&self) -> Result<(), BackendError> {
        self.0.ping().await
    }
}

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
        Arc::new(FailVerify(db.backend(1))),
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
