//! A throwaway moto server (a local AWS API emulator) for KMS tests.
//!
//! moto 5.2 ignores a key's state in GenerateDataKey, Encrypt and Decrypt; AWS
//! refuses a disabled key (`DisabledException`) and one pending deletion
//! (`KMSInvalidStateException`). The harness starts moto through a short launcher
//! that adds those two refusals, so tests see what AWS answers. moto does check
//! the encryption context on Decrypt (it is the associated data of its AES-GCM),
//! answering `InvalidCiphertextException` on a mismatch.
//!
//! ```no_run
//! # async fn demo() {
//! use leasehold_testkit::MotoServer;
//! if !MotoServer::available_for("demo") { return; }
//! let moto = MotoServer::start().await;
//! let key_id = moto.create_key().await;
//! moto.disable_key(&key_id).await;
//! # }
//! ```

use std::path::Path;
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_sdk_kms::config::{Credentials, Region};
use rustix::process::Signal;

use crate::process::{Watchdog, shutdown_blocking, signal_group, spawn_in_group};

/// The pinned requirement (see tests/requirements-kms.txt).
const MISSING: &str = "Install moto's server: python3 -m pip install -r tests/requirements-kms.txt (.ci/setup.sh does).";

/// Python run as the server: enforce key state as AWS does, then moto's own
/// server entry point with the remaining arguments.
const LAUNCHER: &str = r#"
import sys
from moto.core.exceptions import JsonRESTError
from moto.kms import models

def _refuse_unusable(backend, key_id):
    key = backend.keys.get(backend.any_id_to_key_id(key_id))
    if key is None:
        return
    if key.key_state == "Disabled":
        raise JsonRESTError("DisabledException", f"{key.arn} is disabled.")
    if key.key_state == "PendingDeletion":
        raise JsonRESTError("KMSInvalidStateException", f"{key.arn} is pending deletion.")

def _guard_by_request(original):
    def guarded(self, key_id, *args, **kwargs):
        _refuse_unusable(self, key_id)
        return original(self, key_id, *args, **kwargs)
    return guarded

def _guard_by_result(original):
    def guarded(self, *args, **kwargs):
        plaintext, arn = original(self, *args, **kwargs)
        _refuse_unusable(self, arn)
        return plaintext, arn
    return guarded

models.KmsBackend.generate_data_key = _guard_by_request(models.KmsBackend.generate_data_key)
models.KmsBackend.encrypt = _guard_by_request(models.KmsBackend.encrypt)
models.KmsBackend.decrypt = _guard_by_result(models.KmsBackend.decrypt)

from moto.server import main
main(sys.argv[1:])
"#;

/// A running moto server on a loopback port, torn down on drop.
#[derive(Debug)]
pub struct MotoServer {
    root: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    watchdog: Watchdog,
}

impl MotoServer {
    /// The region test clients use.
    pub const REGION: &'static str = "us-east-1";

    /// Whether `python3` can import moto's server (checked once per process).
    pub fn installed() -> bool {
        static INSTALLED: OnceLock<bool> = OnceLock::new();
        *INSTALLED.get_or_init(|| {
            Command::new("python3")
                .args(["-c", "import moto.server, moto.kms"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
    }

    /// Whether a test named `test` can run moto: `true` when it is installed.
    /// Missing, it fails the test in CI (`CI` set: setup must have installed it)
    /// and skips it loudly elsewhere.
    pub fn available_for(test: &str) -> bool {
        if Self::installed() {
            return true;
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: moto is not installed but CI is set; run .ci/setup.sh"
        );
        eprintln!("\n!!!!! SKIPPED {test}: moto's server is not installed. {MISSING} !!!!!\n");
        false
    }

    /// Start moto on a free loopback port; returns once it answers.
    pub async fn start() -> Self {
        if !Self::installed() {
            panic!("moto is not installed. {MISSING}");
        }
        let root = tempfile::Builder::new()
            .prefix("leasehold-moto-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let watchdog = Watchdog::spawn(root.path(), "TERM");
        let mut server = Self {
            root,
            port: crate::free_port(),
            child: None,
            watchdog,
        };
        // A port taken between choosing and binding it (tests run in parallel): again
        // with another one.
        for attempt in 1.. {
            match server.try_spawn().await {
                Ok(()) => break,
                Err(log) if attempt < 4 && log.contains("in use") => {
                    server.port = crate::free_port();
                }
                Err(log) => panic!("moto exited on port {}. Log:\n{log}", server.port),
            }
        }
        server
    }

    async fn spawn(&mut self) {
        if let Err(log) = self.try_spawn().await {
            panic!("moto exited on port {}. Log:\n{log}", self.port);
        }
    }

    async fn try_spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new("python3");
        cmd.arg("-c")
            .arg(LAUNCHER)
            .arg("-H")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(self.port.to_string())
            // moto reads these for defaults; set on the child only.
            .env("AWS_DEFAULT_REGION", Self::REGION)
            .env("PYTHONUNBUFFERED", "1");
        let child = spawn_in_group(cmd, &self.log_path());
        self.watchdog.watch(Some(child.id()));
        self.child = Some(child);
        self.wait_ready().await
    }

    fn log_path(&self) -> std::path::PathBuf {
        self.root.path().join("moto.log")
    }

    /// Waits until moto answers; `Err(log)` if it exited.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!("({status})\n{}", self.log_contents()));
            }
            if Instant::now() > deadline {
                panic!("moto did not start in 60s. Log:\n{}", self.log_contents());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The endpoint URL to give AWS clients.
    pub fn endpoint_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// An AWS config loader for this server: region, endpoint and static test
    /// credentials set on the loader (not in the process environment, which
    /// parallel tests share).
    pub fn config_loader(&self) -> aws_config::ConfigLoader {
        aws_config::defaults(BehaviorVersion::latest())
            .http_client(
                aws_smithy_http_client::Builder::new()
                    .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                        aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                    ))
                    .build_https(),
            )
            .region(Region::new(Self::REGION))
            .endpoint_url(self.endpoint_url())
            .credentials_provider(Credentials::new(
                "testing",
                "testing",
                None,
                None,
                "moto-test",
            ))
    }

    /// A KMS client for this server.
    pub async fn kms_client(&self) -> aws_sdk_kms::Client {
        aws_sdk_kms::Client::new(&self.config_loader().load().await)
    }

    /// Create a symmetric encryption key; returns its key id.
    pub async fn create_key(&self) -> String {
        let out = self
            .kms_client()
            .await
            .create_key()
            .description("leasehold test key")
            .send()
            .await
            .unwrap_or_else(|e| panic!("CreateKey on moto: {e:?}"));
        out.key_metadata()
            .map(|m| m.key_id().to_owned())
            .unwrap_or_else(|| panic!("CreateKey on moto returned no key metadata"))
    }

    /// Point `alias` (`alias/…`) at `key_id`.
    pub async fn create_alias(&self, alias: &str, key_id: &str) {
        self.kms_client()
            .await
            .create_alias()
            .alias_name(alias)
            .target_key_id(key_id)
            .send()
            .await
            .unwrap_or_else(|e| panic!("CreateAlias on moto: {e:?}"));
    }

    /// Disable a key (GenerateDataKey and Decrypt then answer `DisabledException`).
    pub async fn disable_key(&self, key_id: &str) {
        self.kms_client()
            .await
            .disable_key()
            .key_id(key_id)
            .send()
            .await
            .unwrap_or_else(|e| panic!("DisableKey on moto: {e:?}"));
    }

    /// Enable a key again.
    pub async fn enable_key(&self, key_id: &str) {
        self.kms_client()
            .await
            .enable_key()
            .key_id(key_id)
            .send()
            .await
            .unwrap_or_else(|e| panic!("EnableKey on moto: {e:?}"));
    }

    /// Schedule a key's deletion (7 days); calls then answer
    /// `KMSInvalidStateException` until [`cancel_key_deletion`](Self::cancel_key_deletion).
    pub async fn schedule_key_deletion(&self, key_id: &str) {
        self.kms_client()
            .await
            .schedule_key_deletion()
            .key_id(key_id)
            .pending_window_in_days(7)
            .send()
            .await
            .unwrap_or_else(|e| panic!("ScheduleKeyDeletion on moto: {e:?}"));
    }

    /// Cancel a scheduled deletion (the key is then disabled, as in AWS).
    pub async fn cancel_key_deletion(&self, key_id: &str) {
        self.kms_client()
            .await
            .cancel_key_deletion()
            .key_id(key_id)
            .send()
            .await
            .unwrap_or_else(|e| panic!("CancelKeyDeletion on moto: {e:?}"));
    }

    /// Stop the server (connections are refused). moto keeps keys in memory only:
    /// [`restart`](Self::restart) brings back an empty server.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_group(&child, Signal::CONT);
            shutdown_blocking(&mut child, Signal::TERM);
        }
        self.watchdog.watch(None);
    }

    /// Start again on the same port (after [`stop`](Self::stop)), with no keys.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    /// Freeze the server (SIGSTOP): connections are accepted but never answered,
    /// so clients run into their timeouts. Keys survive, unlike `stop`.
    pub fn pause(&self) {
        if let Some(child) = &self.child {
            signal_group(child, Signal::STOP);
        }
    }

    /// Let a paused server run again (SIGCONT).
    pub fn resume(&self) {
        if let Some(child) = &self.child {
            signal_group(child, Signal::CONT);
        }
    }

    /// The server's log.
    pub fn log_contents(&self) -> String {
        read(&self.log_path())
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        self.watchdog.disarm();
        if let Some(mut child) = self.child.take() {
            // A paused server would ignore TERM until continued.
            signal_group(&child, Signal::CONT);
            shutdown_blocking(&mut child, Signal::TERM);
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
