//! `leasehold local …`: the engine without a cluster, from manifests and a state file.
//!
//! The secrets kept in the state file are sealed with the key chosen by [`KeyArgs`]
//! (a local key file, an AWS KMS key, or an explicit `--no-encryption`); `rekey`
//! seals them again under another key. `--audit-log` keeps a signed audit trail in a
//! file (never on stdout, which carries the status table).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{ArgGroup, Args, Subcommand};
use jiff::Timestamp;
use leasehold_audit::{
    Action, AuditEvent, AuditLog, AuditSettings, AuditSigner, FileCheckpointStore, Outcome, Sink,
};
use leasehold_engine::Engine;
use leasehold_engine::local::{
    LocalOptions, LocalRunner, LocalState, StateFile, format_table, status_rows,
};
use leasehold_envelope::{
    KeyEncryptionKey, Keyring, KeyringSettings, KmsKey, KmsSettings, LocalKey,
};
use tracing::{error, info, warn};

#[derive(Debug, Subcommand)]
pub enum LocalCommand {
    /// Reconcile SecretLease/RotationPolicy/Secret manifests against real databases.
    ///
    /// Progress and credential secrets are kept in the state file (mode 0600, written
    /// atomically; secrets sealed with the chosen key); each lease's current credential
    /// is written to OUTPUT/<namespace>/<lease>/{username,password,uri} with an atomic
    /// `..data` swap. Removing a lease from the manifests revokes all its credentials.
    Run {
        /// Directory of YAML manifests (RotationPolicy, SecretLease and the admin Secrets).
        #[arg(long, value_name = "DIR")]
        manifests: PathBuf,
        /// State file (created if missing).
        #[arg(long, value_name = "FILE", default_value = "leasehold-state.json")]
        state: PathBuf,
        /// Where credentials are written.
        #[arg(long, value_name = "DIR", default_value = "leasehold-out")]
        output: PathBuf,
        /// Reconcile every lease until it has to wait, print the status table, and exit.
        #[arg(long)]
        once: bool,
        /// As a daemon: the longest sleep between passes (manifest changes are picked up on the next pass).
        #[arg(long, value_name = "SECONDS", default_value_t = 10)]
        resync_seconds: u64,
        /// Look for leaked versions of known leases (database users that match a lease's
        /// naming but not its recorded state) on start and then this often; 0 disables.
        #[arg(long, value_name = "SECONDS", default_value_t = 600)]
        sweep_seconds: u64,
        /// Only report what the sweeper would revoke.
        #[arg(long)]
        sweep_dry_run: bool,
        /// Answer HTTP-01 challenges of `acme` issuers on this address (the ACME CA must
        /// reach it on port 80 of every name it validates). Without it, acme issuers are
        /// refused with a message saying so.
        #[arg(long, value_name = "ADDR")]
        acme_http01_addr: Option<std::net::SocketAddr>,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        audit: AuditArgs,
    },
    /// Seal every secret in the state file again under another key.
    ///
    /// Takes the state file's lock (refused while `leasehold local run` holds it), opens
    /// each value with the keys given (the new one and every --decrypt-key-file), seals it
    /// under the new key (or stores it as plaintext with --no-encryption) and writes the
    /// file once. Nothing is written if any value does not open.
    Rekey {
        #[arg(long, value_name = "FILE", default_value = "leasehold-state.json")]
        state: PathBuf,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        audit: AuditArgs,
    },
    /// Emergency revocation of a lease's credentials (as `leasehold.dev/revoke-now`).
    ///
    /// Records the request beside the state file; `leasehold local run` acts on it at
    /// once (a running daemon within a second, or the next `run --once`): it issues and
    /// verifies a new version, then revokes every older one without waiting for the
    /// grace period or `maxWait`, terminating their sessions.
    Revoke {
        /// The lease, as NAMESPACE/NAME (the namespace of its manifest; `default` if it has none).
        #[arg(value_name = "NAMESPACE/NAME")]
        lease: String,
        /// Why (kept in the state file's progress and the log; no secrets).
        #[arg(long)]
        reason: String,
        #[arg(long, value_name = "FILE", default_value = "leasehold-state.json")]
        state: PathBuf,
    },
    /// Print each lease's phase, version, user and expiry from a state file (no key
    /// needed: status holds no secrets).
    Status {
        #[arg(long, value_name = "FILE", default_value = "leasehold-state.json")]
        state: PathBuf,
    },
}

/// The key sealing the state file's secrets: exactly one of --key-file, --kms-key-id
/// and --no-encryption.
#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("state_key")
        .required(true)
        .args(["key_file", "kms_key_id", "no_encryption"])
))]
pub struct KeyArgs {
    /// Seal the state file's secrets with a local 256-bit key: a file holding 32 raw
    /// bytes or their base64 (`head -c 32 /dev/urandom | base64`).
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    /// Create --key-file (mode 0600) with a new random key if it does not exist.
    #[arg(long)]
    pub generate_key: bool,
    /// Seal the state file's secrets with this AWS KMS key (key id, ARN, alias/… or
    /// alias ARN); credentials from the default AWS chain.
    #[arg(long, value_name = "ID")]
    pub kms_key_id: Option<String>,
    /// AWS region of the KMS keys (default: from the environment).
    #[arg(long, value_name = "REGION")]
    pub kms_region: Option<String>,
    /// KMS endpoint URL (a VPC endpoint or a test server).
    #[arg(long, value_name = "URL")]
    pub kms_endpoint_url: Option<String>,
    /// Keep the state file's secrets as plaintext (explicit opt-out; a warning at start).
    #[arg(long)]
    pub no_encryption: bool,
    /// An old local key that may still open values (repeatable), for key rotation.
    #[arg(long, value_name = "PATH")]
    pub decrypt_key_file: Vec<PathBuf>,
    /// An old KMS key that may still open values (repeatable), for key rotation.
    #[arg(long, value_name = "ID")]
    pub decrypt_kms_key_id: Vec<String>,
    /// How long an unwrapped data key is reused before the key is asked again.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub data_key_cache_ttl_seconds: u64,
}

impl KeyArgs {
    /// The keyring these flags describe (loading, generating or connecting the keys).
    pub async fn keyring(&self) -> Result<Keyring, String> {
        let settings = KeyringSettings {
            data_key_cache_ttl: Duration::from_secs(self.data_key_cache_ttl_seconds),
            ..KeyringSettings::default()
        };
        if self.generate_key && self.key_file.is_none() {
            return Err("--generate-key creates the --key-file: give --key-file PATH".into());
        }
        let mut decrypt_only: Vec<Arc<dyn KeyEncryptionKey>> = Vec::new();
        for path in &self.decrypt_key_file {
            decrypt_only.push(Arc::new(
                LocalKey::from_file(path).map_err(|e| e.to_string())?,
            ));
        }
        for id in &self.decrypt_kms_key_id {
            decrypt_only.push(Arc::new(self.kms_key(id).await?));
        }
        if self.no_encryption {
            warn!(
                "--no-encryption: the secrets in the state file are stored as plaintext; \
                 anyone who can read the file can read every credential"
            );
            return Ok(Keyring::unencrypted_opening(decrypt_only, settings));
        }
        let primary: Arc<dyn KeyEncryptionKey> = match (&self.key_file, &self.kms_key_id) {
            (Some(path), _) => Arc::new(load_or_generate_key(path, self.generate_key)?),
            (None, Some(id)) => Arc::new(self.kms_key(id).await?),
            (None, None) => {
                return Err("choose --key-file, --kms-key-id or --no-encryption".into());
            }
        };
        info!(
            key = primary.key_id(),
            "state file secrets sealed with this key"
        );
        Ok(Keyring::new(primary, decrypt_only, settings))
    }

    async fn kms_key(&self, id: &str) -> Result<KmsKey, String> {
        let mut settings = KmsSettings::new(id);
        settings.region = self.kms_region.clone();
        settings.endpoint_url = self.kms_endpoint_url.clone();
        KmsKey::connect(settings).await.map_err(|e| e.to_string())
    }
}

/// Load a local key; with `generate`, first create the file (0600) with a new key if
/// it does not exist.
pub fn load_or_generate_key(path: &Path, generate: bool) -> Result<LocalKey, String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    if generate && !path.exists() {
        let key = LocalKey::generate().map_err(|e| e.to_string())?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| format!("cannot create the key file {}: {e}", path.display()))?;
        let mut text = key.expose_base64();
        text.push('\n');
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| format!("cannot write the key file {}: {e}", path.display()))?;
        info!(
            key = key.key_id(),
            path = %path.display(),
            "generated a local key; keep it: without it the state file's secrets are lost"
        );
        return Ok(key);
    }
    LocalKey::from_file(path).map_err(|e| e.to_string())
}

/// The audit trail of a local run (none by default).
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Append a hash-chained, signed audit trail of every step to FILE (JSON lines).
    /// The checkpoint is kept in `<state>.audit-checkpoint.json`.
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// Ed25519 signing key of the audit trail (PKCS#8 PEM; default
    /// `<state>.audit-key.pem`), generated (0600) if missing, its public key beside it
    /// as `<name>.pub.pem`.
    #[arg(long, value_name = "FILE", requires = "audit_log")]
    pub audit_key_file: Option<PathBuf>,
}

impl AuditArgs {
    /// Start the audit log, if one is configured.
    pub async fn start(&self, state: &Path) -> Result<Option<AuditLog>, String> {
        let Some(log) = &self.audit_log else {
            return Ok(None);
        };
        let key_file = self
            .audit_key_file
            .clone()
            .unwrap_or_else(|| beside(state, ".audit-key.pem"));
        let signer = if key_file.exists() {
            let pem = std::fs::read_to_string(&key_file)
                .map(leasehold_envelope::Zeroizing::new)
                .map_err(|e| format!("cannot read {}: {e}", key_file.display()))?;
            AuditSigner::from_pkcs8_pem(&pem)
                .map_err(|e| format!("audit key {}: {e}", key_file.display()))?
        } else {
            let public = public_key_path(&key_file);
            let signer =
                leasehold_audit::write_key_pair(&key_file, &public).map_err(|e| e.to_string())?;
            info!(
                key_id = signer.key_id(),
                public_key = %public.display(),
                "generated the audit signing key"
            );
            signer
        };
        let checkpoints = Arc::new(FileCheckpointStore::new(beside(
            state,
            ".audit-checkpoint.json",
        )));
        AuditLog::start(
            vec![Sink::File(log.clone())],
            signer,
            checkpoints,
            AuditSettings::default(),
        )
        .await
        .map(Some)
        .map_err(|e| format!("cannot start the audit log {}: {e}", log.display()))
    }
}

/// `<path><suffix>`.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// `key.pem` → `key.pub.pem`; any other name gets `.pub.pem` appended.
fn public_key_path(private: &Path) -> PathBuf {
    let text = private.as_os_str().to_string_lossy();
    match text.strip_suffix(".pem") {
        Some(stem) => PathBuf::from(format!("{stem}.pub.pem")),
        None => beside(private, ".pub.pem"),
    }
}

/// Run one `leasehold local` command.
pub async fn run(command: LocalCommand) -> ExitCode {
    match command {
        LocalCommand::Revoke {
            lease,
            reason,
            state,
        } => revoke(&lease, &reason, &state),
        LocalCommand::Status { state } => match LocalState::load(&state) {
            Ok(s) => {
                print!("{}", format_table(&status_rows(&s, Timestamp::now())));
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        LocalCommand::Rekey { state, key, audit } => rekey(&state, &key, &audit).await,
        LocalCommand::Run {
            manifests,
            state,
            output,
            once,
            resync_seconds,
            sweep_seconds,
            sweep_dry_run,
            acme_http01_addr,
            key,
            audit,
        } => {
            let keyring = match key.keyring().await {
                Ok(k) => Arc::new(k),
                Err(e) => return fail(e),
            };
            let audit = match audit.start(&state).await {
                Ok(a) => a,
                Err(e) => return fail(e),
            };
            let sweep = (sweep_seconds > 0).then_some(Sweep {
                every: Duration::from_secs(sweep_seconds),
                dry_run: sweep_dry_run,
            });
            let options = LocalOptions {
                manifests,
                state,
                output,
                keyring,
            };
            let mut engine = Engine::new();
            if let Some(log) = &audit {
                engine = engine.with_audit(log.clone());
            }
            let code = run_local(
                options,
                engine,
                once,
                Duration::from_secs(resync_seconds.max(1)),
                sweep,
                acme_http01_addr,
            )
            .await;
            if let Some(log) = audit {
                log.shutdown().await;
            }
            code
        }
    }
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("leasehold: {e}");
    ExitCode::FAILURE
}

fn revoke(lease: &str, reason: &str, state: &Path) -> ExitCode {
    let Some((namespace, name)) = lease.split_once('/') else {
        return fail(format!("name the lease as NAMESPACE/NAME, not {lease:?}"));
    };
    match leasehold_engine::local::request_emergency_revocation(
        state,
        namespace,
        name,
        reason,
        Timestamp::now(),
    ) {
        Ok(value) => {
            println!(
                "emergency revocation of {lease} requested ({value}); \
                 `leasehold local run` acts on it at once"
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

async fn rekey(state: &Path, key: &KeyArgs, audit: &AuditArgs) -> ExitCode {
    let keyring = match key.keyring().await {
        Ok(k) => Arc::new(k),
        Err(e) => return fail(e),
    };
    let keyring_id = keyring.primary_key_id().map(str::to_owned);
    let new_key = keyring_id
        .clone()
        .unwrap_or_else(|| "none (plaintext)".into());
    // The lock first: a running runner makes this fail before anything else happens.
    let store = match StateFile::open(state, keyring) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let audit = match audit.start(state).await {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let result = store.rewrap().await;
    let code = match &result {
        Ok(report) => {
            for (owner, n) in &report.rewrapped {
                println!("{owner}: {n} value(s) rewrapped");
            }
            let target = match keyring_id.as_deref() {
                Some(id) => format!("sealed under {id}"),
                None => "stored as plaintext".to_owned(),
            };
            println!(
                "{} value(s) rewrapped, now {target}; {} already were",
                report.total(),
                report.unchanged
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    };
    if let Some(log) = audit {
        match &result {
            Ok(report) => {
                for (owner, n) in &report.rewrapped {
                    let event = AuditEvent::new(Action::KeyRewrap, Outcome::Success)
                        .detail_kv("values", n.to_string())
                        .detail_kv("key", new_key.clone());
                    log.record(match owner.split_once('/') {
                        Some((ns, name)) if ns != "_cluster" => event.lease(ns, name),
                        _ => event.detail_kv("issuer", owner.clone()),
                    });
                }
            }
            Err(e) => log.record(
                AuditEvent::new(Action::KeyRewrap, Outcome::Failure)
                    .reason(e.to_string())
                    .detail_kv("key", new_key.clone()),
            ),
        }
        log.shutdown().await;
    }
    code
}

/// Resolves once `dir` holds a request made after `since` (looked at every second: a
/// daemon acts on `leasehold local revoke` within a second, without waiting for its
/// next pass; a request the last pass could not act on does not wake it again).
async fn emergency_request_arrives(dir: &Path, since: std::time::SystemTime) {
    loop {
        let any = std::fs::read_dir(dir)
            .map(|mut d| {
                d.any(|e| {
                    e.is_ok_and(|e| {
                        e.path().extension().is_none()
                            && e.metadata()
                                .and_then(|m| m.modified())
                                .is_ok_and(|t| t > since)
                    })
                })
            })
            .unwrap_or(false);
        if any {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Orphan sweeping schedule.
#[derive(Debug, Clone, Copy)]
struct Sweep {
    every: Duration,
    dry_run: bool,
}

async fn run_local(
    options: LocalOptions,
    engine: Engine,
    once: bool,
    resync: Duration,
    sweep: Option<Sweep>,
    acme_http01_addr: Option<std::net::SocketAddr>,
) -> ExitCode {
    let state_path = options.state.clone();
    let mut runner = match LocalRunner::new(options, engine) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    // A wrong or missing key is reported before anything is touched.
    if let Err(e) = runner.check_keys().await {
        return fail(e);
    }
    if let Some(addr) = acme_http01_addr {
        match leasehold_acme::Http01Solver::bind(addr).await {
            Ok(solver) => runner = runner.with_acme_solver(Arc::new(solver)),
            Err(e) => {
                return fail(format!("cannot answer HTTP-01 challenges on {addr}: {e}"));
            }
        }
    }
    let mut next_sweep = std::time::Instant::now();
    loop {
        if let Some(sw) = sweep
            && std::time::Instant::now() >= next_sweep
        {
            match runner.sweep(sw.dry_run).await {
                Ok(reports) => {
                    for (lease, r) in reports.iter().filter(|(_, r)| !r.orphans.is_empty()) {
                        info!(
                            lease,
                            orphans = r.orphans.len(),
                            revoked = r.revoked.len(),
                            failed = r.failed.len(),
                            dry_run = sw.dry_run,
                            "orphan sweep"
                        );
                    }
                }
                Err(e) => error!(error = %e, "orphan sweep failed"),
            }
            next_sweep = std::time::Instant::now() + sw.every;
        }
        let pass_started = std::time::SystemTime::now();
        let report = match runner.pass().await {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "pass failed");
                if once {
                    return ExitCode::FAILURE;
                }
                tokio::time::sleep(resync).await;
                continue;
            }
        };
        let state = LocalState::load(&state_path).unwrap_or_default();
        print!("{}", format_table(&status_rows(&state, Timestamp::now())));
        if once {
            return if report.errors.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        let sleep = report
            .next_wake
            .map(|t| {
                let secs = t.as_second() - Timestamp::now().as_second();
                Duration::from_secs(secs.max(1) as u64).min(resync)
            })
            .unwrap_or(resync);
        info!(seconds = sleep.as_secs(), "next pass");
        let requests = leasehold_engine::local::emergency_requests_dir(&state_path);
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = emergency_request_arrives(&requests, pass_started) => {
                info!("emergency revocation requested; reconciling now");
            }
            _ = tokio::signal::ctrl_c() => {
                info!("interrupted; state is saved");
                return ExitCode::SUCCESS;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Local {
        #[command(subcommand)]
        command: LocalCommand,
    }

    fn parse(args: &[&str]) -> Result<LocalCommand, clap::Error> {
        Local::try_parse_from(std::iter::once("local").chain(args.iter().copied()))
            .map(|l| l.command)
    }

    #[test]
    fn run_takes_exactly_one_key_choice() {
        let err = parse(&["run", "--manifests", "m"]).unwrap_err();
        assert_eq!(
            err.kind(),
            clap::error::ErrorKind::MissingRequiredArgument,
            "{err}"
        );
        let text = err.to_string();
        for flag in ["--key-file", "--kms-key-id", "--no-encryption"] {
            assert!(text.contains(flag), "{flag} missing from {text}");
        }
        let err = parse(&[
            "run",
            "--manifests",
            "m",
            "--key-file",
            "k",
            "--no-encryption",
        ])
        .unwrap_err();
        assert_eq!(
            err.kind(),
            clap::error::ErrorKind::ArgumentConflict,
            "{err}"
        );
    }

    #[test]
    fn run_flags_parse() {
        let LocalCommand::Run { key, audit, .. } = parse(&[
            "run",
            "--manifests",
            "m",
            "--key-file",
            "new.key",
            "--generate-key",
            "--decrypt-key-file",
            "a.key",
            "--decrypt-key-file",
            "b.key",
            "--audit-log",
            "audit.jsonl",
        ])
        .unwrap() else {
            panic!("not run");
        };
        assert_eq!(key.key_file.as_deref(), Some(Path::new("new.key")));
        assert!(key.generate_key);
        assert_eq!(key.decrypt_key_file.len(), 2);
        assert_eq!(key.data_key_cache_ttl_seconds, 300);
        assert_eq!(audit.audit_log.as_deref(), Some(Path::new("audit.jsonl")));
        let LocalCommand::Rekey { key, .. } = parse(&[
            "rekey",
            "--state",
            "s.json",
            "--kms-key-id",
            "alias/x",
            "--kms-region",
            "eu-west-1",
            "--decrypt-key-file",
            "old.key",
            "--data-key-cache-ttl-seconds",
            "0",
        ])
        .unwrap() else {
            panic!("not rekey");
        };
        assert_eq!(key.kms_key_id.as_deref(), Some("alias/x"));
        assert_eq!(key.data_key_cache_ttl_seconds, 0);
        // Status needs no key.
        assert!(parse(&["status", "--state", "s.json"]).is_ok());
    }

    #[tokio::test]
    async fn generate_key_needs_a_key_file() {
        let LocalCommand::Run { key, .. } = parse(&[
            "run",
            "--manifests",
            "m",
            "--generate-key",
            "--no-encryption",
        ])
        .unwrap() else {
            panic!("not run");
        };
        let err = key.keyring().await.unwrap_err();
        assert!(err.contains("--key-file"), "{err}");
    }

    #[tokio::test]
    async fn a_generated_key_file_is_0600_and_loads_again() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys").join("state.key");
        let made = load_or_generate_key(&path, true).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = load_or_generate_key(&path, true).unwrap();
        assert_eq!(made.key_id(), again.key_id(), "an existing key is kept");
        let err = load_or_generate_key(&dir.path().join("missing.key"), false).unwrap_err();
        assert!(err.contains("missing.key"), "{err}");
        assert_eq!(
            public_key_path(Path::new("s.json.audit-key.pem")),
            Path::new("s.json.audit-key.pub.pem")
        );
    }
}
