//! `leasehold`: one binary, one subcommand per component.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use jiff::Timestamp;
use leasehold_engine::Engine;
use leasehold_engine::local::{LocalOptions, LocalRunner, LocalState, format_table, status_rows};
use tracing::{error, info};

mod admin;
mod controller;
mod keys;
mod node;
mod serve;

/// leasehold issues short-lived database credentials, proves each new one works by
/// logging in with it, and revokes the old one only after every consumer has moved over.
#[derive(Debug, Parser)]
#[command(name = "leasehold", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "LEASEHOLD_LOG_FORMAT")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the rotation engine without a cluster, from manifests in a directory.
    Local {
        #[command(subcommand)]
        command: LocalCommand,
    },
    /// Run the controller: SecretLease, RotationPolicy, Issuer and ClusterIssuer
    /// reconcilers, the broker and the CRL server.
    ///
    /// Replicas elect a leader through a coordination.k8s.io Lease; only the leader
    /// reconciles and serves the broker (it labels its pod leasehold.dev/leader=true).
    Controller(Box<controller::ControllerArgs>),
    /// Run the CSI node driver (one per node, from the chart's DaemonSet).
    ///
    /// Verifies each pod's projected service-account token against the cluster's signing
    /// keys, asks the broker for the lease's credential, and writes it atomically into a
    /// per-volume tmpfs (nodev,noexec,nosuid; files 0440 with the pod's fsGroup).
    Node(node::NodeArgs),
    /// Print the CRDs (YAML) that this build expects; apply them with `kubectl apply -f -`.
    Crds,
    /// Check or prepare the audit trail.
    Audit {
        #[command(subcommand)]
        command: admin::AuditCommand,
    },
    /// Rewrap the stored secret material of a cluster under a new key encryption key
    /// (KMS ↔ local key ↔ none), without downtime: give the new key like the controller
    /// does and the old one with `--decrypt-key-*`. The controller does the same in the
    /// background once it runs with the new key and can still open the old values.
    Rekey(admin::RekeyArgs),
}

#[derive(Debug, Subcommand)]
enum LocalCommand {
    /// Reconcile SecretLease/RotationPolicy/Secret manifests against real databases.
    ///
    /// Progress and credential secrets are kept in the state file (mode 0600, written
    /// atomically); each lease's current credential is written to
    /// OUTPUT/<namespace>/<lease>/{username,password,uri} with an atomic `..data` swap.
    /// Removing a lease from the manifests revokes all its credentials.
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
    /// Print each lease's phase, version, user and expiry from a state file.
    Status {
        #[arg(long, value_name = "FILE", default_value = "leasehold-state.json")]
        state: PathBuf,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LEASEHOLD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("leasehold: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Controller(args) => match controller::run(*args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!(error = %e, "controller stopped");
                    ExitCode::FAILURE
                }
            },
            Command::Node(args) => match node::run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!(error = %e, "node driver stopped");
                    ExitCode::FAILURE
                }
            },
            Command::Audit { command } => admin::audit(command),
            Command::Rekey(args) => admin::rekey(args).await,
            Command::Crds => {
                for (_, crd) in leasehold_api::crds() {
                    match leasehold_api::crd_yaml(&crd) {
                        Ok(y) => print!("---\n{y}"),
                        Err(e) => {
                            eprintln!("leasehold: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
                }
                ExitCode::SUCCESS
            }
            Command::Local {
                command:
                    LocalCommand::Revoke {
                        lease,
                        reason,
                        state,
                    },
            } => {
                let Some((namespace, name)) = lease.split_once('/') else {
                    eprintln!("leasehold: name the lease as NAMESPACE/NAME, not {lease:?}");
                    return ExitCode::FAILURE;
                };
                match leasehold_engine::local::request_emergency_revocation(
                    &state,
                    namespace,
                    name,
                    &reason,
                    Timestamp::now(),
                ) {
                    Ok(value) => {
                        println!(
                            "emergency revocation of {lease} requested ({value}); \
                             `leasehold local run` acts on it at once"
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("leasehold: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Command::Local {
                command: LocalCommand::Status { state },
            } => match LocalState::load(&state) {
                Ok(s) => {
                    print!("{}", format_table(&status_rows(&s, Timestamp::now())));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("leasehold: {e}");
                    ExitCode::FAILURE
                }
            },
            Command::Local {
                command:
                    LocalCommand::Run {
                        manifests,
                        state,
                        output,
                        once,
                        resync_seconds,
                        sweep_seconds,
                        sweep_dry_run,
                        acme_http01_addr,
                    },
            } => {
                let sweep = (sweep_seconds > 0).then_some(Sweep {
                    every: Duration::from_secs(sweep_seconds),
                    dry_run: sweep_dry_run,
                });
                let options = LocalOptions {
                    manifests,
                    state,
                    output,
                };
                run_local(
                    options,
                    once,
                    Duration::from_secs(resync_seconds.max(1)),
                    sweep,
                    acme_http01_addr,
                )
                .await
            }
        }
    })
}

/// Resolves once `dir` holds a request made after `since` (looked at every second: a
/// daemon acts on `leasehold local revoke` within a second, without waiting for its
/// next pass; a request the last pass could not act on does not wake it again).
async fn emergency_request_arrives(dir: &std::path::Path, since: std::time::SystemTime) {
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
    once: bool,
    resync: Duration,
    sweep: Option<Sweep>,
    acme_http01_addr: Option<std::net::SocketAddr>,
) -> ExitCode {
    let state_path = options.state.clone();
    let mut runner = match LocalRunner::new(options, Engine::new()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("leasehold: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(addr) = acme_http01_addr {
        match leasehold_acme::Http01Solver::bind(addr).await {
            Ok(solver) => runner = runner.with_acme_solver(std::sync::Arc::new(solver)),
            Err(e) => {
                eprintln!("leasehold: cannot answer HTTP-01 challenges on {addr}: {e}");
                return ExitCode::FAILURE;
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
