//! `leasehold`: one binary, one subcommand per component.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tracing::error;

mod admin;
mod controller;
mod keys;
mod local;
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
        command: local::LocalCommand,
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
            Command::Local { command } => local::run(command).await,
        }
    })
}
