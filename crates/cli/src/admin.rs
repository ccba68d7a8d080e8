//! `leasehold audit …` and `leasehold rekey`: operator tools.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use leasehold_audit::{VerifyOptions, public_key_from_pem, verify_file, write_key_pair};

/// `leasehold audit`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check an audit trail: every record's hash, the chain between records, sequence
    /// numbers (a deleted or reordered record is found), signed checkpoints and restarts.
    /// Prints a summary and the first problem; exits 1 if there is one.
    Verify {
        /// The audit file (JSON lines).
        file: PathBuf,
        /// Public key (PEM) checkpoints must be signed with; repeatable (key rotation).
        /// In a cluster: the `public-key.pem` of the signing key Secret. Without it,
        /// signatures are reported unchecked.
        #[arg(long, value_name = "PEM")]
        public_key: Vec<PathBuf>,
    },
    /// Make a new Ed25519 key pair for signing checkpoints (PKCS#8 PEM private key
    /// written 0600; never overwrites).
    Keygen {
        #[arg(long, value_name = "PATH")]
        private_key: PathBuf,
        #[arg(long, value_name = "PATH")]
        public_key: PathBuf,
    },
}

pub fn audit(command: AuditCommand) -> ExitCode {
    match command {
        AuditCommand::Verify { file, public_key } => {
            let mut keys = Vec::new();
            for path in &public_key {
                let pem = match std::fs::read_to_string(path) {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("leasehold: cannot read {}: {e}", path.display());
                        return ExitCode::FAILURE;
                    }
                };
                match public_key_from_pem(&pem) {
                    Ok(k) => keys.push(k),
                    Err(e) => {
                        eprintln!("leasehold: {}: {e}", path.display());
                        return ExitCode::FAILURE;
                    }
                }
            }
            match verify_file(&file, &VerifyOptions { public_keys: keys }) {
                Ok(report) => {
                    print!("{report}");
                    if report.is_ok() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("leasehold: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        AuditCommand::Keygen {
            private_key,
            public_key,
        } => match write_key_pair(&private_key, &public_key) {
            Ok(signer) => {
                println!(
                    "wrote {} (private, 0600) and {}; key id {}",
                    private_key.display(),
                    public_key.display(),
                    signer.key_id()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("leasehold: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Flags of `leasehold rekey`.
#[derive(Debug, Args)]
pub struct RekeyArgs {
    /// Only these namespaces (comma-separated); default: all.
    #[arg(long, value_delimiter = ',', value_name = "NS,...")]
    namespaces: Vec<String>,
    /// Where key Secrets live (the controller's namespace).
    #[arg(
        long,
        value_name = "NS",
        env = "POD_NAMESPACE",
        default_value = "leasehold-system"
    )]
    key_namespace: String,
    #[command(flatten)]
    encryption: crate::keys::EncryptionArgs,
}

/// Rewrap every sealed Secret under the key the flags name, opening with the old keys
/// given as `--decrypt-key-*`. Safe while the controller runs (it uses the same
/// precondition as the controller's writes).
pub async fn rekey(args: RekeyArgs) -> ExitCode {
    let config = match args.encryption.key_config(&args.key_namespace) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("leasehold: {e}");
            return ExitCode::FAILURE;
        }
    };
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("leasehold: cannot reach the cluster: {e}");
            return ExitCode::FAILURE;
        }
    };
    let keyring = match leasehold_operator::keys::keyring(Some(&client), &config).await {
        Ok(k) => k,
        Err(e) => {
            eprintln!("leasehold: {e}");
            return ExitCode::FAILURE;
        }
    };
    match leasehold_operator::keys::rekey(
        &client,
        &keyring,
        &args.namespaces,
        &leasehold_audit::AuditLog::disabled(),
    )
    .await
    {
        Ok(report) => {
            print!("{report}");
            if report.failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("leasehold: {e}");
            ExitCode::FAILURE
        }
    }
}
