//! A throwaway MariaDB server.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use secrecy::{ExposeSecret, SecretString};
use sha1::{Digest, Sha1};
use tempfile::TempDir;
use tokio::sync::OnceCell;

use crate::process::{Watchdog, shutdown_blocking, signal, spawn_in_group, wait_async};
use crate::tls::{ServerCertificates, ServerOptions};

const ADMIN_USER: &str = "leasehold_admin";
/// Every privilege: the harness uses it only to set the server up.
const SUPERUSER: &str = "leasehold_superuser";
const DATABASE: &str = "leasehold";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The admin's privileges, no more than an RDS / Cloud SQL admin has:
/// * `CREATE USER`: create, alter (password, lock), drop users and create roles
///   (the creator of a role gets `ADMIN OPTION` on it, so it can grant it);
/// * everything on the application database, with the grant option, to hand out;
/// * `SELECT` on `mysql.user` and `mysql.global_priv`: to find users (`mysql.user`
///   is a view over `mysql.global_priv` since 10.4) and `SHOW CREATE USER` them;
/// * `SELECT` on `mysql.db` and `mysql.tables_priv`: to see what a reused user holds
///   and revoke what the spec no longer lists;
/// * `SELECT` on `mysql.roles_mapping`: to see the roles a reused user holds (and which
///   the admin holds `WITH ADMIN OPTION`) and revoke those `memberOf` no longer lists;
/// * `PROCESS`: to see other users' sessions (without it `PROCESSLIST` only shows the
///   admin's own, and draining would wrongly see none);
/// * `CONNECTION ADMIN` (MariaDB 10.5.2+; `SUPER` before): to `KILL` them;
/// * `UPDATE` on the `mysql` database: MariaDB requires it for
///   `SET DEFAULT ROLE <role> FOR <another user>`, which leases with `memberOf` need
///   (RDS's admin has it through its global `UPDATE`). Without it such an issue fails
///   with a `PermissionDenied` that says so.
pub const ADMIN_GRANTS: &[&str] = &[
    "CREATE USER, PROCESS, CONNECTION ADMIN ON *.*",
    "ALL PRIVILEGES ON `leasehold`.* WITH GRANT OPTION",
    "SELECT ON `mysql`.`user`",
    "SELECT ON `mysql`.`global_priv`",
    "SELECT ON `mysql`.`db`",
    "SELECT ON `mysql`.`tables_priv`",
    "SELECT ON `mysql`.`roles_mapping`",
    "UPDATE ON `mysql`.*",
];

const MISSING: &str = "MariaDB server binaries not found: install the Debian package `mariadb-server` \
     (leasehold's .ci/run does)";

/// A MariaDB server of its own: temporary data directory, its own socket, a random
/// loopback port, grant tables enforced, and the general query log written to a file
/// tests can read. It has an empty database `leasehold` and an admin
/// `'leasehold_admin'@'%'` that is not root but has what a managed database's admin
/// has and leasehold needs (see [`ADMIN_GRANTS`]). Root (socket authentication) is
/// only used to set the server up ([`superuser_conn`](Self::superuser_conn)). With [`ServerOptions::tls`]
/// it also serves TLS (`--ssl-cert`, `--ssl-key`, `--ssl-ca`); with
/// [`ServerOptions::require_tls`] it refuses plain TCP (`--require-secure-transport`).
///
/// Dropping it kills the server and removes the directory.
#[derive(Debug)]
pub struct MariaDbServer {
    root: TempDir,
    server_bin: PathBuf,
    port: u16,
    admin_password: SecretString,
    superuser_password: SecretString,
    options: ServerOptions,
    certs: Option<ServerCertificates>,
    process: Option<Child>,
    watchdog: Watchdog,
}

static SHARED: OnceCell<MariaDbServer> = OnceCell::const_new();

impl MariaDbServer {
    /// Initialise and start a new server without TLS; returns once the admin can
    /// log in.
    pub async fn start() -> Self {
        Self::start_with(ServerOptions::default()).await
    }

    /// Initialise and start a new server as `options` say; returns once the admin
    /// can log in (over TLS when it serves TLS).
    pub async fn start_with(options: ServerOptions) -> Self {
        crate::require_root("MariaDB");
        let server_bin = find_binary(&["/usr/sbin/mariadbd", "/usr/sbin/mysqld"]);
        let install_bin = find_binary(&[
            "/usr/bin/mariadb-install-db",
            "/usr/bin/mysql_install_db",
            "/usr/bin/mariadb_install_db",
        ]);
        let root = tempfile::Builder::new()
            .prefix("leasehold-mariadb-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let watchdog = Watchdog::spawn(root.path(), "TERM");
        let mut server = Self {
            root,
            server_bin,
            port: 0,
            admin_password: SecretString::from(crate::random_alphanumeric(32)),
            superuser_password: SecretString::from(crate::random_alphanumeric(32)),
            options,
            certs: options.serves_tls().then(ServerCertificates::generate),
            process: None,
            watchdog,
        };
        if let Some(certs) = &server.certs {
            crate::tls::ensure_default_provider();
            let dir = server.tls_dir();
            std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("cannot create the TLS dir: {e}"));
            for (name, contents) in [
                ("ca.crt", &certs.ca_pem),
                ("server.crt", &certs.cert_pem),
                ("server.key", &certs.key_pem),
            ] {
                let path = dir.join(name);
                std::fs::write(&path, contents)
                    .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            }
        }

        // A second try on a fresh data dir: on a machine busy with parallel test binaries
        // a first bootstrap has been seen to fail once (its output is printed, not lost).
        for attempt in 1..=2 {
            let output = Command::new(&install_bin)
                .arg("--no-defaults")
                .arg("--user=root")
                .arg(format!("--datadir={}", server.data_dir().display()))
                .args(["--skip-test-db", "--auth-root-authentication-method=socket"])
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}. {MISSING}", install_bin.display()));
            if output.status.success() {
                break;
            }
            let report = format!(
                "{} failed: {}\n{}",
                install_bin.display(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            if attempt == 2 {
                panic!("{report}");
            }
            eprintln!(
                "testkit: MariaDB bootstrap failed, trying once more on a fresh data dir: {report}"
            );
            let _ = std::fs::remove_dir_all(server.data_dir());
        }

        for attempt in 1..=5 {
            server.port = crate::free_port();
            match server.launch(true).await {
                Ok(()) => return server,
                Err(log) if attempt < 5 && log.contains("Address already in use") => continue,
                Err(log) => panic!("MariaDB did not start. Error log:\n{log}"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// One server shared by every test of this test binary, started on first use.
    /// It is never dropped; its watchdog removes it when the test process exits.
    pub async fn shared() -> &'static Self {
        SHARED.get_or_init(Self::start).await
    }

    pub fn host(&self) -> &str {
        "127.0.0.1"
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// An empty database created for tests.
    pub fn database(&self) -> &str {
        DATABASE
    }

    pub fn admin_user(&self) -> &str {
        ADMIN_USER
    }

    pub fn admin_password(&self) -> &SecretString {
        &self.admin_password
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// The PEM certificate of the CA that signed the server certificate (for
    /// `127.0.0.1` and `localhost`), or `None` for a server without TLS.
    pub fn ca_pem(&self) -> Option<&str> {
        self.certs.as_ref().map(|certs| certs.ca_pem.as_str())
    }

    /// The options the server was started with.
    pub fn options(&self) -> ServerOptions {
        self.options
    }

    fn tls_dir(&self) -> PathBuf {
        self.root.path().join("tls")
    }

    /// The server's own unix socket.
    pub fn socket_path(&self) -> PathBuf {
        self.root.path().join("mysqld.sock")
    }

    /// Connection options for `user` over TCP to the test database; over TLS
    /// verified against [`ca_pem`](Self::ca_pem) when the server serves TLS.
    pub fn opts_for(&self, user: &str, password: &str) -> mysql_async::Opts {
        let ssl = self.certs.as_ref().map(|certs| {
            mysql_async::SslOpts::default()
                .with_disable_built_in_roots(true)
                .with_root_certs(vec![certs.ca_pem.clone().into_bytes().into()])
        });
        mysql_async::OptsBuilder::default()
            .ip_or_hostname(self.host())
            .tcp_port(self.port)
            .prefer_socket(false)
            .user(Some(user))
            .pass(Some(password))
            .db_name(Some(DATABASE))
            .ssl_opts(ssl)
            .into()
    }

    /// Log in as `user` over TCP (the password is really checked).
    pub async fn connect_as(
        &self,
        user: &str,
        password: &str,
    ) -> Result<mysql_async::Conn, mysql_async::Error> {
        let opts = self.opts_for(user, password);
        match tokio::time::timeout(Duration::from_secs(10), mysql_async::Conn::new(opts)).await {
            Ok(result) => result,
            Err(_) => Err(mysql_async::Error::Other("connect timed out".into())),
        }
    }

    /// A fresh connection as the (non-root) admin. Panics if the server does not
    /// accept it.
    pub async fn admin_conn(&self) -> mysql_async::Conn {
        self.connect_as(ADMIN_USER, self.admin_password.expose_secret())
            .await
            .unwrap_or_else(|e| panic!("admin login to the test MariaDB failed: {e}"))
    }

    /// A fresh connection with every privilege, for setting up what the admin could not
    /// (objects outside its database, for example). Never hand it to the code under test.
    pub async fn superuser_conn(&self) -> mysql_async::Conn {
        self.connect_as(SUPERUSER, self.superuser_password.expose_secret())
            .await
            .unwrap_or_else(|e| panic!("superuser login to the test MariaDB failed: {e}"))
    }

    /// The general query log so far (every statement the server received).
    pub fn log_contents(&self) -> String {
        std::fs::read_to_string(self.root.path().join("general.log")).unwrap_or_default()
    }

    /// The server's error log so far.
    pub fn error_log_contents(&self) -> String {
        std::fs::read_to_string(self.error_log_path()).unwrap_or_default()
    }

    /// Shut the server down. Data and port stay.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.process.take() {
            self.watchdog.watch(None);
            signal(&child, Signal::TERM);
            if !wait_async(&mut child, Duration::from_secs(30)).await {
                shutdown_blocking(&mut child, Signal::KILL);
            }
        }
    }

    /// Start the server again after [`stop`](Self::stop), same data and port.
    pub async fn resume(&mut self) {
        if self.process.is_some() {
            return;
        }
        if let Err(log) = self.launch(false).await {
            panic!(
                "MariaDB did not restart on port {}. Error log:\n{log}",
                self.port
            );
        }
    }

    fn error_log_path(&self) -> PathBuf {
        self.root.path().join("error.log")
    }

    async fn launch(&mut self, first: bool) -> Result<(), String> {
        let root = self.root.path();
        let mut cmd = Command::new(&self.server_bin);
        // --no-defaults must come first: the machine-wide config must not leak in.
        cmd.arg("--no-defaults")
            .arg("--user=root")
            .arg(format!("--datadir={}", self.data_dir().display()))
            .arg(format!("--socket={}", self.socket_path().display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--pid-file={}", root.join("mysqld.pid").display()))
            .arg(format!("--log-error={}", self.error_log_path().display()))
            .arg(format!("--tmpdir={}", root.display()))
            .arg("--general-log=1")
            .arg("--log-output=FILE")
            .arg(format!(
                "--general-log-file={}",
                root.join("general.log").display()
            ))
            .args([
                "--skip-name-resolve",
                "--skip-log-bin",
                "--max-connections=300",
                "--innodb-buffer-pool-size=32M",
                "--innodb-flush-log-at-trx-commit=0",
                "--innodb-doublewrite=0",
                "--performance-schema=0",
            ]);
        if self.certs.is_some() {
            let dir = self.tls_dir();
            cmd.arg(format!("--ssl-ca={}", dir.join("ca.crt").display()))
                .arg(format!("--ssl-cert={}", dir.join("server.crt").display()))
                .arg(format!("--ssl-key={}", dir.join("server.key").display()));
        }
        if self.options.require_tls {
            cmd.arg("--require-secure-transport=ON");
        }
        let log_start = self.error_log_contents().len();
        let child = spawn_in_group(cmd, &root.join("stdout.log"));
        self.watchdog.watch(Some(child.id()));
        self.process = Some(child);

        let deadline = Instant::now() + READY_TIMEOUT;
        let mut bootstrapped = !first;
        loop {
            if let Some(child) = self.process.as_mut()
                && matches!(child.try_wait(), Ok(Some(_)) | Err(_))
            {
                self.process = None;
                self.watchdog.watch(None);
                let log = self.error_log_contents();
                return Err(log.get(log_start..).unwrap_or(&log).to_owned());
            }
            if !bootstrapped && self.socket_path().exists() {
                bootstrapped = self.bootstrap_admin()?;
            }
            if bootstrapped
                && let Ok(conn) = mysql_async::Conn::new(
                    self.opts_for(ADMIN_USER, self.admin_password.expose_secret()),
                )
                .await
            {
                let _ = conn.disconnect().await;
                return Ok(());
            }
            if Instant::now() >= deadline {
                if let Some(mut child) = self.process.take() {
                    shutdown_blocking(&mut child, Signal::KILL);
                }
                self.watchdog.watch(None);
                return Err(format!(
                    "not ready after {READY_TIMEOUT:?}\n{}",
                    self.error_log_contents()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Create the admin and the test database, as OS root over the server's socket
    /// (`unix_socket` authentication). The admin password goes in pre-hashed, so the
    /// general log never shows it. Returns `Ok(false)` if the server is not ready yet.
    fn bootstrap_admin(&self) -> Result<bool, String> {
        let hash = native_password_hash(self.admin_password.expose_secret());
        let super_hash = native_password_hash(self.superuser_password.expose_secret());
        let mut sql = format!(
            "CREATE USER '{SUPERUSER}'@'%' IDENTIFIED BY PASSWORD '{super_hash}';\n\
             GRANT ALL PRIVILEGES ON *.* TO '{SUPERUSER}'@'%' WITH GRANT OPTION;\n\
             CREATE USER '{ADMIN_USER}'@'%' IDENTIFIED BY PASSWORD '{hash}';\n\
             CREATE DATABASE `{DATABASE}`;\n"
        );
        for grant in ADMIN_GRANTS {
            let (privileges, option) = match grant.strip_suffix(" WITH GRANT OPTION") {
                Some(p) => (p, " WITH GRANT OPTION"),
                None => (*grant, ""),
            };
            sql.push_str(&format!(
                "GRANT {privileges} TO '{ADMIN_USER}'@'%'{option};\n"
            ));
        }
        let mut child = Command::new(client_binary())
            .arg("--no-defaults")
            .arg("--protocol=socket")
            .arg(format!("--socket={}", self.socket_path().display()))
            .arg("--user=root")
            .arg("--batch")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run the mariadb client: {e}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(sql.as_bytes())
                .map_err(|e| format!("cannot feed the mariadb client: {e}"))?;
        }
        let output = child
            .wait_with_output()
            .map_err(|e| format!("mariadb client: {e}"))?;
        if output.status.success() {
            return Ok(true);
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        // 2002: socket not accepting connections yet.
        if stderr.contains("2002") || stderr.contains("Can't connect") {
            return Ok(false);
        }
        Err(format!("admin bootstrap failed: {stderr}"))
    }
}

impl Drop for MariaDbServer {
    fn drop(&mut self) {
        self.watchdog.disarm();
        if let Some(mut child) = self.process.take() {
            // The data is thrown away: no need for a clean shutdown.
            shutdown_blocking(&mut child, Signal::KILL);
        }
    }
}

/// MariaDB's `mysql_native_password` stored form: `*` + upper hex of SHA1(SHA1(pw)).
fn native_password_hash(password: &str) -> String {
    let stage1 = Sha1::digest(password.as_bytes());
    let stage2 = Sha1::digest(stage1);
    let mut out = String::with_capacity(41);
    out.push('*');
    for byte in stage2 {
        out.push_str(&format!("{byte:02X}"));
    }
    out
}

fn find_binary(candidates: &[&str]) -> PathBuf {
    candidates
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| panic!("none of {candidates:?} exists. {MISSING}"))
}

fn client_binary() -> PathBuf {
    find_binary(&["/usr/bin/mariadb", "/usr/bin/mysql"])
}
