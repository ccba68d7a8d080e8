//! Throwaway real database servers (and a Pebble ACME server and a moto KMS
//! emulator) for integration tests.
//!
//! Each server lives in its own temporary directory, listens on a random loopback
//! port and is torn down when its handle is dropped. A small watchdog shell process
//! per server also cleans up when the test process dies without running `Drop`
//! (for example a server shared through a `static`, or an aborted test binary): it
//! reads a pipe from the test process and acts when that pipe closes.
//!
//! ```no_run
//! # async fn demo() {
//! use leasehold_testkit::PostgresServer;
//! let pg = PostgresServer::start().await;
//! let admin = pg.admin_client().await;
//! admin.simple_query("SELECT 1").await.expect("query");
//! # }
//! ```
//!
//! [`PostgresServer::start_with`] and [`MariaDbServer::start_with`] take
//! [`ServerOptions`] to serve TLS (optionally TLS only) with a certificate signed by
//! a CA made for that server; `ca_pem()` hands that CA to tests.
//!
//! Run as root (they start PostgreSQL as the `postgres` system user and MariaDB as
//! root). These are test helpers: they panic with a clear message instead of returning
//! errors, so a broken environment fails the test loudly.

#![forbid(unsafe_code)]

mod mariadb;
mod moto;
mod pebble;
mod postgres;
mod process;
mod tls;

pub use mariadb::MariaDbServer;
pub use moto::MotoServer;
pub use pebble::{PebbleOptions, PebbleServer};
pub use postgres::PostgresServer;
pub use tls::{ServerOptions, unrelated_ca_pem};

use rand::Rng;
use rand::distr::Alphanumeric;

/// A random alphanumeric string from the thread CSPRNG.
pub fn random_alphanumeric(len: usize) -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// A fresh, unique-enough name for test objects: `prefix` + 10 random lowercase chars.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}{}", random_alphanumeric(10).to_ascii_lowercase())
}

/// The harness switches users (`setpriv`) and uses MariaDB's socket authentication
/// as OS root, so it must run as root, as CI and the dev machines do.
fn require_root(what: &str) {
    if !rustix::process::geteuid().is_root() {
        panic!("leasehold-testkit must run as root to start a throwaway {what} server");
    }
}

/// A loopback port that was free a moment ago. Servers retry with another port if
/// someone else takes it first.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot find a free loopback port: {e}"))
}
