//! A throwaway PostgreSQL cluster.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use rustix::process::Signal;
use secrecy::{ExposeSecret, SecretString};
use tempfile::TempDir;
use tokio::sync::OnceCell;
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::process::{
    Watchdog, chown_tree, shutdown_blocking, signal, spawn_in_group, system_user, wait_async,
};
use crate::tls::{ServerCertificates, ServerOptions};

const ADMIN_USER: &str = "leasehold_admin";
/// The bootstrap superuser: the harness uses it only to set the server up.
const SUPERUSER: &str = "leasehold_superuser";
/// The test database, owned by the admin.
const DATABASE: &str = "leasehold";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const MISSING: &str = "PostgreSQL server binaries not found: install the Debian package `postgresql` \
     (leasehold's .ci/run does), or point LEASEHOLD_PG_BIN at a directory holding initdb and postgres";

/// A PostgreSQL server of its own: temporary data directory owned by the `postgres`
/// system user, random loopback port, SCRAM password authentication for TCP, every
/// statement logged (`log_statement=all`) to a file tests can read.
///
/// The admin tests log in as is what a managed database (RDS, Cloud SQL, Azure) hands
/// out, not a superuser: `leasehold_admin` with `LOGIN CREATEROLE`, owner of the test
/// database `leasehold` (so it owns its `public` schema and creates the tables tests
/// grant on). It is not a member of `pg_signal_backend`. The bootstrap superuser is
/// only for setting the server up ([`superuser_client`](Self::superuser_client)). With
/// [`ServerOptions::tls`] it also serves TLS (`ssl=on`); with
/// [`ServerOptions::require_tls`] its `pg_hba.conf` only has `hostssl` lines for TCP.
///
/// Dropping it kills the server and removes the directory.
#[derive(Debug)]
pub struct PostgresServer {
    // Declared first so it is dropped last, after the process is gone.
    root: TempDir,
    bin_dir: PathBuf,
    uid: u32,
    gid: u32,
    port: u16,
    admin_password: SecretString,
    superuser_password: SecretString,
    options: ServerOptions,
    certs: Option<ServerCertificates>,
    /// Trusts `certs.ca_pem` only; `None` without TLS.
    tls_config: Option<rustls::ClientConfig>,
    process: Option<Child>,
    watchdog: Watchdog,
}

static SHARED: OnceCell<PostgresServer> = OnceCell::const_new();

impl PostgresServer {
    /// Initialise and start a new cluster without TLS; returns once it accepts admin
    /// logins.
    pub async fn start() -> Self {
        Self::start_with(ServerOptions::default()).await
    }

    /// Initialise and start a new cluster as `options` say; returns once it accepts
    /// admin logins (over TLS when it serves TLS).
    pub async fn start_with(options: ServerOptions) -> Self {
        crate::require_root("PostgreSQL");
        let bin_dir = find_bin_dir();
        let (uid, gid) = system_user("postgres")
            .unwrap_or_else(|| panic!("no `postgres` system user. {MISSING}"));
        let root = tempfile::Builder::new()
            .prefix("leasehold-pg-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let watchdog = Watchdog::spawn(root.path(), "QUIT");
        let admin_password = SecretString::from(crate::random_alphanumeric(32));
        let certs = options.serves_tls().then(ServerCertificates::generate);
        let tls_config = certs
            .as_ref()
            .map(|certs| crate::tls::client_config(&certs.ca_pem));
        let mut server = Self {
            root,
            bin_dir,
            uid,
            gid,
            port: 0,
            admin_password,
            superuser_password: SecretString::from(crate::random_alphanumeric(32)),
            options,
            certs,
            tls_config,
            process: None,
            watchdog,
        };
        server.init_cluster();
        // The port was free when picked; if someone grabbed it since, pick another.
        for attempt in 1..=5 {
            server.port = crate::free_port();
            match server.launch().await {
                Ok(()) => {
                    server.bootstrap_admin().await;
                    return server;
                }
                Err(log) if attempt < 5 && log.contains("could not bind") => continue,
                Err(log) => panic!("PostgreSQL did not start. Server log:\n{log}"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// One server shared by every test of this test binary, started on first use.
    /// It is never dropped; its watchdog removes it when the test process exits.
    /// Tests sharing it must use distinct object names (see [`crate::unique_name`]).
    pub async fn shared() -> &'static Self {
        SHARED.get_or_init(Self::start).await
    }

    pub fn host(&self) -> &str {
        "127.0.0.1"
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The database the admin connects to.
    pub fn database(&self) -> &str {
        DATABASE
    }

    /// The admin leasehold is given: `LOGIN CREATEROLE`, owner of [`database`](Self::database),
    /// not a superuser. Random password.
    pub fn admin_user(&self) -> &str {
        ADMIN_USER
    }

    pub fn admin_password(&self) -> &SecretString {
        &self.admin_password
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

    /// The data directory (owned by the `postgres` system user).
    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// Connection settings for `user` over TCP with password authentication (TLS
    /// required when the server serves TLS; [`connect_as`](Self::connect_as) brings
    /// the matching TLS connector).
    pub fn config_for(&self, user: &str, password: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(self.host())
            .port(self.port)
            .user(user)
            .password(password)
            .dbname(DATABASE)
            .connect_timeout(Duration::from_secs(5));
        if self.tls_config.is_some() {
            config.ssl_mode(SslMode::Require);
        }
        config
    }

    /// Log in as `user` over TCP (the password is really checked), over TLS
    /// verified against [`ca_pem`](Self::ca_pem) when the server serves TLS. The
    /// connection task is spawned on the current runtime.
    pub async fn connect_as(
        &self,
        user: &str,
        password: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        self.open(user, password)
            .await
            .map(|(client, _task)| client)
    }

    async fn open(
        &self,
        user: &str,
        password: &str,
    ) -> Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
        self.open_to(user, password, DATABASE).await
    }

    async fn open_to(
        &self,
        user: &str,
        password: &str,
        database: &str,
    ) -> Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
        let mut config = self.config_for(user, password);
        config.dbname(database);
        match &self.tls_config {
            Some(tls) => open_with(&config, MakeRustlsConnect::new(tls.clone())).await,
            None => open_with(&config, tokio_postgres::NoTls).await,
        }
    }

    /// A fresh connection as the (non-superuser) admin. Panics if the server does not
    /// accept it.
    pub async fn admin_client(&self) -> tokio_postgres::Client {
        self.connect_as(ADMIN_USER, self.admin_password.expose_secret())
            .await
            .unwrap_or_else(|e| panic!("admin login to the test PostgreSQL failed: {e}"))
    }

    /// A fresh superuser connection to the test database, for setting up what a managed
    /// database's own operators would (objects the admin must not own, for example).
    /// Never hand it to the code under test.
    pub async fn superuser_client(&self) -> tokio_postgres::Client {
        self.superuser_client_to(DATABASE).await
    }

    async fn superuser_client_to(&self, database: &str) -> tokio_postgres::Client {
        self.open_to(SUPERUSER, self.superuser_password.expose_secret(), database)
            .await
            .map(|(client, _task)| client)
            .unwrap_or_else(|e| panic!("superuser login to the test PostgreSQL failed: {e}"))
    }

    /// Create the admin role and its database, as the bootstrap superuser. The password
    /// statement is kept out of the server log.
    async fn bootstrap_admin(&self) {
        let su = self.superuser_client_to("postgres").await;
        // A query string is logged before any of it runs: the SET goes on its own.
        let create_role = format!(
            "CREATE ROLE {ADMIN_USER} LOGIN CREATEROLE PASSWORD '{}'",
            self.admin_password.expose_secret()
        );
        for sql in [
            "SET log_statement = 'none'",
            create_role.as_str(),
            "RESET log_statement",
            &format!("CREATE DATABASE {DATABASE} OWNER {ADMIN_USER}"),
        ] {
            su.batch_execute(sql)
                .await
                .unwrap_or_else(|e| panic!("cannot create the test admin: {e}"));
        }
    }

    /// Everything the server logged so far (every statement, with `log_statement=all`).
    pub fn log_contents(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Shut the server down (fast shutdown: sessions are cut). Data and port stay.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.process.take() {
            self.watchdog.watch(None);
            signal(&child, Signal::INT);
            if !wait_async(&mut child, Duration::from_secs(30)).await {
                shutdown_blocking(&mut child, Signal::QUIT);
            }
        }
    }

    /// Start the server again after [`stop`](Self::stop), same data and port.
    pub async fn resume(&mut self) {
        if self.process.is_some() {
            return;
        }
        if let Err(log) = self.launch().await {
            panic!(
                "PostgreSQL did not restart on port {}. Server log:\n{log}",
                self.port
            );
        }
    }

    fn log_path(&self) -> PathBuf {
        self.root.path().join("server.log")
    }

    fn as_postgres(&self, program: &Path) -> Command {
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--init-groups")
            .arg("--")
            .arg(program)
            .env("LC_ALL", "C.UTF-8")
            .current_dir(self.root.path());
        cmd
    }

    fn init_cluster(&self) {
        let root = self.root.path();
        let pwfile = root.join("pwfile");
        std::fs::write(&pwfile, self.superuser_password.expose_secret())
            .unwrap_or_else(|e| panic!("cannot write the password file: {e}"));
        std::fs::create_dir(root.join("sock"))
            .unwrap_or_else(|e| panic!("cannot create the socket dir: {e}"));
        if let Some(certs) = &self.certs {
            let dir = root.join("tls");
            std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("cannot create the TLS dir: {e}"));
            write_file(&dir.join("server.crt"), &certs.cert_pem, 0o644);
            // PostgreSQL refuses a key file others can read.
            write_file(&dir.join("server.key"), &certs.key_pem, 0o600);
        }
        chown_tree(root, self.uid, self.gid)
            .unwrap_or_else(|e| panic!("cannot hand the temp dir to `postgres`: {e}"));

        let output = self
            .as_postgres(&self.bin_dir.join("initdb"))
            .arg("-D")
            .arg(self.data_dir())
            .arg(format!("--username={SUPERUSER}"))
            .arg(format!("--pwfile={}", pwfile.display()))
            .args([
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--no-sync",
                "--no-instructions",
            ])
            .output()
            .unwrap_or_else(|e| panic!("cannot run initdb: {e}. {MISSING}"));
        let _ = std::fs::remove_file(&pwfile);
        if !output.status.success() {
            panic!(
                "initdb failed: {}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }

        // Appending keeps the file's owner (postgres).
        let mut conf = String::from("\n# leasehold-testkit\n");
        let _ = writeln!(conf, "listen_addresses = '127.0.0.1'");
        let _ = writeln!(
            conf,
            "unix_socket_directories = '{}'",
            root.join("sock").display()
        );
        for line in [
            "fsync = off",
            "synchronous_commit = off",
            "full_page_writes = off",
            "password_encryption = 'scram-sha-256'",
            "max_connections = 300",
            "shared_buffers = 32MB",
            "log_statement = 'all'",
            "log_connections = on",
            "log_line_prefix = '%m [%p] %q%u@%d '",
            "logging_collector = off",
        ] {
            let _ = writeln!(conf, "{line}");
        }
        if self.certs.is_some() {
            let dir = root.join("tls");
            let _ = writeln!(conf, "ssl = on");
            let _ = writeln!(
                conf,
                "ssl_cert_file = '{}'",
                dir.join("server.crt").display()
            );
            let _ = writeln!(
                conf,
                "ssl_key_file = '{}'",
                dir.join("server.key").display()
            );
        }
        if self.options.require_tls {
            // Replacing the contents keeps the file's owner (postgres).
            let hba = "# leasehold-testkit: TCP only over TLS
                 local all all scram-sha-256
                 hostssl all all 127.0.0.1/32 scram-sha-256
                 hostssl all all ::1/128 scram-sha-256
";
            let path = self.data_dir().join("pg_hba.conf");
            std::fs::write(&path, hba)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        }
        let path = self.data_dir().join("postgresql.conf");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        std::io::Write::write_all(&mut file, conf.as_bytes())
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }

    /// Spawn the postmaster and wait until the superuser can log in. On failure returns
    /// the server log.
    async fn launch(&mut self) -> Result<(), String> {
        let mut cmd = self.as_postgres(&self.bin_dir.join("postgres"));
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string());
        let log_start = self.log_contents().len();
        let child = spawn_in_group(cmd, &self.log_path());
        self.watchdog.watch(Some(child.id()));
        self.process = Some(child);

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.process.as_mut()
                && matches!(child.try_wait(), Ok(Some(_)) | Err(_))
            {
                self.process = None;
                self.watchdog.watch(None);
                let log = self.log_contents();
                return Err(log.get(log_start..).unwrap_or(&log).to_owned());
            }
            if let Ok((client, task)) = self
                .open_to(
                    SUPERUSER,
                    self.superuser_password.expose_secret(),
                    "postgres",
                )
                .await
            {
                drop(client);
                let _ = task.await;
                return Ok(());
            }
            if Instant::now() >= deadline {
                if let Some(mut child) = self.process.take() {
                    shutdown_blocking(&mut child, Signal::QUIT);
                }
                self.watchdog.watch(None);
                return Err(format!(
                    "not ready after {READY_TIMEOUT:?}\n{}",
                    self.log_contents()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        // Do the cleanup here; the watchdog is only for when Drop never runs.
        self.watchdog.disarm();
        if let Some(mut child) = self.process.take() {
            // Immediate shutdown: no checkpoint, shared memory released.
            shutdown_blocking(&mut child, Signal::QUIT);
        }
        // `root` (TempDir) removes the directory when dropped after this.
    }
}

/// Open one connection and drive it on a task of its own.
async fn open_with<T>(
    config: &tokio_postgres::Config,
    tls: T,
) -> Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
{
    let (client, connection) = config.connect(tls).await?;
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((client, task))
}

/// Create `path` with `contents` and permission bits `mode`.
fn write_file(path: &Path, contents: &str, mode: u32) {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    std::io::Write::write_all(&mut file, contents.as_bytes())
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// The newest `/usr/lib/postgresql/<major>/bin` holding `postgres`, or
/// `$LEASEHOLD_PG_BIN`.
fn find_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LEASEHOLD_PG_BIN") {
        return PathBuf::from(dir);
    }
    let base = Path::new("/usr/lib/postgresql");
    let majors = std::fs::read_dir(base).unwrap_or_else(|_| panic!("{MISSING}"));
    majors
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let major: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").is_file().then_some((major, bin))
        })
        .max_by_key(|(major, _)| *major)
        .map(|(_, bin)| bin)
        .unwrap_or_else(|| panic!("{MISSING}"))
}
