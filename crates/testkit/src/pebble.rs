//! A throwaway Pebble ACME server (Let's Encrypt's test CA) with
//! `pebble-challtestsrv` as its DNS server, answering every name with 127.0.0.1 so
//! HTTP-01 validation connects to a solver on loopback.
//!
//! ```no_run
//! # async fn demo() {
//! use leasehold_testkit::{PebbleOptions, PebbleServer};
//! let pebble = PebbleServer::start(PebbleOptions { http_port: 5002, ..Default::default() }).await;
//! let _dir = pebble.directory_url();
//! let _tls_root = pebble.ca_pem();
//! # }
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::process::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::process::{Watchdog, shutdown_blocking, spawn_in_group};
use crate::tls::ServerCertificates;

const MISSING: &str = "Install the Debian package `pebble` (.ci/setup.sh does).";

/// How Pebble is started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PebbleOptions {
    /// Port Pebble connects to for HTTP-01 validation (where the solver listens on
    /// 127.0.0.1).
    pub http_port: u16,
    /// Percentage of valid nonces Pebble rejects with `badNonce`
    /// (`PEBBLE_WFE_NONCEREJECT`); 0 by default so tests are deterministic.
    pub nonce_reject_percent: u8,
    /// External Account Binding keys (key id, base64url HMAC key); when non-empty,
    /// Pebble requires EAB for new accounts.
    pub eab_keys: Vec<(String, String)>,
}

/// A running Pebble plus its DNS server, torn down on drop.
#[derive(Debug)]
pub struct PebbleServer {
    root: tempfile::TempDir,
    certs: ServerCertificates,
    acme_port: u16,
    management_port: u16,
    pebble: Option<Child>,
    dns: Option<Child>,
    watchdogs: Vec<Watchdog>,
}

impl PebbleServer {
    /// Whether the `pebble` and `pebble-challtestsrv` binaries are on `PATH`.
    pub fn installed() -> bool {
        which("pebble").is_some() && which("pebble-challtestsrv").is_some()
    }

    /// Whether a test named `test` can run Pebble: `true` when it is installed. Missing,
    /// it fails the test in CI (`CI` set: setup must have installed it) and skips it
    /// loudly elsewhere.
    pub fn available_for(test: &str) -> bool {
        if Self::installed() {
            return true;
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: pebble is not installed but CI is set; run .ci/setup.sh"
        );
        eprintln!(
            "\n!!!!! SKIPPED {test}: `pebble` / `pebble-challtestsrv` not installed (apt-get install pebble) !!!!!\n"
        );
        false
    }

    /// Start Pebble and its DNS server; returns once the ACME directory answers. A
    /// port taken between choosing it and binding it (tests run in parallel) is retried
    /// with new ports.
    pub async fn start(options: PebbleOptions) -> Self {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::try_start(options.clone()).await {
                Ok(server) => return server,
                Err(logs) if attempt < 4 && logs.contains("address already in use") => {
                    eprintln!("pebble: a port was taken meanwhile; starting again with new ports");
                }
                Err(logs) => panic!("a Pebble process exited. Logs:\n{logs}"),
            }
        }
    }

    async fn try_start(options: PebbleOptions) -> Result<Self, String> {
        let pebble_bin = which("pebble").unwrap_or_else(|| panic!("no `pebble`. {MISSING}"));
        let dns_bin = which("pebble-challtestsrv")
            .unwrap_or_else(|| panic!("no `pebble-challtestsrv`. {MISSING}"));
        let root = tempfile::Builder::new()
            .prefix("leasehold-pebble-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let certs = ServerCertificates::generate();
        write(&root.path().join("cert.pem"), &certs.cert_pem);
        write(&root.path().join("key.pem"), &certs.key_pem);

        let dns_port = crate::free_port();
        let mut dns_cmd = Command::new(dns_bin);
        dns_cmd
            .arg("-dns01")
            .arg(format!("127.0.0.1:{dns_port}"))
            .arg("-http01")
            .arg("")
            .arg("-https01")
            .arg("")
            .arg("-tlsalpn01")
            .arg("")
            .arg("-management")
            .arg(format!("127.0.0.1:{}", crate::free_port()))
            .arg("-defaultIPv4")
            .arg("127.0.0.1")
            .arg("-defaultIPv6")
            .arg("");
        let dns_log = root.path().join("challtestsrv.log");
        let mut dns_watchdog = Watchdog::spawn(root.path(), "TERM");
        let dns = spawn_in_group(dns_cmd, &dns_log);
        dns_watchdog.watch(Some(dns.id()));

        let acme_port = crate::free_port();
        let management_port = crate::free_port();
        let eab_required = !options.eab_keys.is_empty();
        let eab_keys = options
            .eab_keys
            .iter()
            .map(|(kid, key)| format!("{kid:?}: {key:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let config = format!(
            r#"{{"pebble": {{
  "listenAddress": "127.0.0.1:{acme_port}",
  "managementListenAddress": "127.0.0.1:{management_port}",
  "certificate": {cert:?},
  "privateKey": {key:?},
  "httpPort": {http_port},
  "tlsPort": {tls_port},
  "ocspResponderURL": "",
  "externalAccountBindingRequired": {eab_required},
  "externalAccountMACKeys": {{ {eab_keys} }}
}}}}"#,
            cert = root.path().join("cert.pem").display().to_string(),
            key = root.path().join("key.pem").display().to_string(),
            http_port = options.http_port,
            tls_port = crate::free_port(),
        );
        let config_path = root.path().join("pebble-config.json");
        write(&config_path, &config);
        let mut cmd = Command::new(pebble_bin);
        cmd.arg("-config")
            .arg(&config_path)
            .arg("-dnsserver")
            .arg(format!("127.0.0.1:{dns_port}"))
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env(
                "PEBBLE_WFE_NONCEREJECT",
                options.nonce_reject_percent.to_string(),
            );
        let log = root.path().join("pebble.log");
        let mut watchdog = Watchdog::spawn(root.path(), "TERM");
        let pebble = spawn_in_group(cmd, &log);
        watchdog.watch(Some(pebble.id()));

        let mut server = Self {
            root,
            certs,
            acme_port,
            management_port,
            pebble: Some(pebble),
            dns: Some(dns),
            watchdogs: vec![dns_watchdog, watchdog],
        };
        server.wait_ready().await?;
        Ok(server)
    }

    /// Waits until both servers answer; `Err(logs)` if one exited.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.acme_port))
                .await
                .is_ok()
                && tokio::net::TcpStream::connect(("127.0.0.1", self.management_port))
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            let exited = [self.pebble.as_mut(), self.dns.as_mut()]
                .into_iter()
                .flatten()
                .find_map(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                return Err(format!("({status})\n{}", self.log_contents()));
            }
            if Instant::now() > deadline {
                panic!(
                    "Pebble did not start in 30s. Logs:\n{}",
                    self.log_contents()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The ACME directory URL.
    pub fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.acme_port)
    }

    /// The CA that signed Pebble's TLS certificate (for the directory and the
    /// management interface), PEM.
    pub fn ca_pem(&self) -> &str {
        &self.certs.ca_pem
    }

    /// GET `path` on Pebble's management interface; returns status and body.
    pub async fn management_get(&self, path: &str) -> (u16, String) {
        let config = crate::tls::client_config(&self.certs.ca_pem);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.management_port))
            .await
            .unwrap_or_else(|e| panic!("cannot connect to Pebble's management port: {e}"));
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1")
            .unwrap_or_else(|e| panic!("bad server name: {e}"));
        let mut tls = connector
            .connect(name, tcp)
            .await
            .unwrap_or_else(|e| panic!("TLS to Pebble's management port failed: {e}"));
        let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        tls.write_all(request.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("cannot send to Pebble's management port: {e}"));
        let mut raw = Vec::new();
        // A missing close_notify only ends the stream early; what was read is complete.
        let _ = tls.read_to_end(&mut raw).await;
        let raw = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = raw
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("malformed management response: {raw}"));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("malformed management status line: {head}"));
        (status, body.to_owned())
    }

    /// Pebble's record of a certificate, by serial (lowercase hex without leading
    /// zeros, as Pebble prints it): JSON with `Status` `Valid` or `Revoked`.
    pub async fn cert_status_by_serial(&self, serial_hex: &str) -> (u16, String) {
        self.management_get(&format!("/cert-status-by-serial/{serial_hex}"))
            .await
    }

    /// Pebble's current issuing root (PEM), which certificates it issues chain to.
    pub async fn issuing_root_pem(&self) -> String {
        let (status, body) = self.management_get("/roots/0").await;
        assert_eq!(status, 200, "GET /roots/0 on Pebble: {body}");
        body
    }

    /// Both processes' logs.
    pub fn log_contents(&self) -> String {
        let read =
            |name: &str| std::fs::read_to_string(self.root.path().join(name)).unwrap_or_default();
        format!(
            "--- pebble ---\n{}\n--- pebble-challtestsrv ---\n{}",
            read("pebble.log"),
            read("challtestsrv.log")
        )
    }
}

impl Drop for PebbleServer {
    fn drop(&mut self) {
        for watchdog in &mut self.watchdogs {
            watchdog.disarm();
        }
        for mut child in [self.pebble.take(), self.dns.take()].into_iter().flatten() {
            shutdown_blocking(&mut child, Signal::TERM);
        }
    }
}

fn write(path: &Path, contents: &str) {
    std::fs::write(path, contents)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

fn which(binary: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(binary))
        .find(|path| path.is_file())
}
