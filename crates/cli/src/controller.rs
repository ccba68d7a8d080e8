//! `leasehold controller`: the SecretLease/RotationPolicy controllers and the broker.

use std::net::SocketAddr;

use clap::Args;
use leasehold_broker::BrokerLimits;
use leasehold_operator::broker::BrokerSettings;
use leasehold_operator::{ControllerConfig, IssuerSettings, LeaderElectionConfig, OperatorError};

use crate::serve::shutdown_signal;

/// Flags of `leasehold controller`.
#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Reconcile only these namespaces (comma-separated); default: all namespaces.
    #[arg(long, value_delimiter = ',', value_name = "NS,...")]
    namespaces: Vec<String>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Namespace of the leader-election Lease; without it this process always leads
    /// (run a single replica).
    #[arg(long, value_name = "NS")]
    leader_election_namespace: Option<String>,
    /// Name of the leader-election Lease.
    #[arg(long, value_name = "NAME", default_value = "leasehold-controller")]
    leader_election_lease: String,
    /// This pod's name (leader identity and the pod labelled for the broker Service).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// This pod's namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    pod_namespace: Option<String>,
    /// Where CRLs and CA certificates of `ca` issuers are served over HTTP while this
    /// process leads: GET /crl/issuer/<namespace>/<name>.pem (PEM) or .crl (DER,
    /// application/pkix-crl), /crl/clusterissuer/<name>.pem|.crl, and the CA
    /// certificates at /ca/issuer/<namespace>/<name>.pem|.crt and
    /// /ca/clusterissuer/<name>.pem|.crt.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8083")]
    crl_addr: SocketAddr,
    /// Where the HTTP-01 solver of ACME issuers listens while this process leads
    /// (plain HTTP, GET /.well-known/acme-challenge/<token>). The ACME CA must reach it
    /// on port 80 of every name ordered: route /.well-known/acme-challenge/ to the
    /// solver Service (the chart's `<fullname>-acme-solver`).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8089")]
    acme_http01_addr: SocketAddr,
    /// Leases reconciled at once.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Admin connections per database.
    #[arg(long, default_value_t = 4)]
    max_admin_connections: usize,
    /// Where the broker (gRPC over TLS, for the node drivers) listens.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8443")]
    broker_addr: SocketAddr,
    /// Do not serve the broker (no CSI delivery).
    #[arg(long)]
    no_broker: bool,
    /// Name of the broker Service (DNS names of the generated certificate).
    #[arg(long, default_value = "leasehold-broker")]
    broker_service: String,
    /// A TLS Secret you provide (`tls.crt`, `tls.key`, optional `ca.crt`) in this pod's
    /// namespace; default: generate a CA and serving certificate.
    #[arg(long, value_name = "NAME")]
    broker_tls_secret: Option<String>,
    /// Secret the generated broker CA and certificate are kept in.
    #[arg(long, value_name = "NAME", default_value = "leasehold-broker-tls")]
    broker_tls_generated_secret: String,
    /// ConfigMap the broker CA is published in (key `ca.crt`) for the node drivers.
    #[arg(long, value_name = "NAME", default_value = "leasehold-broker-ca")]
    broker_ca_configmap: String,
    /// Audience of the pod tokens the node drivers pass on (the CSIDriver's
    /// tokenRequests audience; the node drivers' --token-audience).
    #[arg(long, default_value = leasehold_api::CSI_TOKEN_AUDIENCE)]
    pod_token_audience: String,
    /// How often per-pod users whose pod no longer exists are revoked (a node that
    /// vanished never unpublishes; a driver killed mid-publish never releases).
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    per_pod_sweep_seconds: u64,
    /// Audience of the node drivers' own tokens.
    #[arg(long, default_value = "leasehold-broker")]
    broker_token_audience: String,
    /// The node drivers' service account (in this pod's namespace).
    #[arg(long, value_name = "NAME", default_value = "leasehold-node")]
    node_service_account: String,
    /// Per-pod credentials of one lease the broker creates or renews at once
    /// (more are refused with RESOURCE_EXHAUSTED; the node driver retries).
    #[arg(long, value_name = "N", default_value_t = BrokerLimits::default().max_concurrent_issues_per_lease,
          value_parser = positive)]
    broker_max_concurrent_issues_per_lease: usize,
    /// Live per-pod users of one lease (a new pod beyond it is refused with
    /// RESOURCE_EXHAUSTED until others are released).
    #[arg(long, value_name = "N", default_value_t = BrokerLimits::default().max_per_pod_users_per_lease,
          value_parser = positive)]
    broker_max_per_pod_users_per_lease: usize,
    /// Open connections to the broker (TLS handshakes included); more are
    /// closed as soon as they are accepted.
    #[arg(long, value_name = "N", default_value_t = BrokerLimits::default().max_connections,
          value_parser = positive)]
    broker_max_connections: usize,
    #[command(flatten)]
    encryption: crate::keys::EncryptionArgs,
    #[command(flatten)]
    audit: crate::keys::AuditArgs,
}

/// A count of at least 1.
fn positive(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("expected a whole number of at least 1".to_owned()),
    }
}

impl ControllerArgs {
    /// The broker's limits from the flags.
    fn broker_limits(&self) -> BrokerLimits {
        BrokerLimits {
            max_concurrent_issues_per_lease: self.broker_max_concurrent_issues_per_lease,
            max_per_pod_users_per_lease: self.broker_max_per_pod_users_per_lease,
            max_connections: self.broker_max_connections,
        }
    }
}

pub async fn run(args: ControllerArgs) -> Result<(), OperatorError> {
    // Read by the broker the operator builds (per-pod issuer, server).
    args.broker_limits().install();
    // Key Secrets, the audit signing key and checkpoint live with the controller.
    let home = args
        .pod_namespace
        .clone()
        .or_else(|| args.leader_election_namespace.clone())
        .unwrap_or_else(|| "default".to_owned());
    let key_config = args
        .encryption
        .key_config(&home)
        .map_err(OperatorError::Config)?;
    if key_config.primary.is_none() {
        tracing::warn!(
            "--encryption none: credential versions, per-pod records and generated keys are stored unencrypted in Secrets"
        );
    }
    let client = kube::Client::try_default().await?;
    let keyring =
        std::sync::Arc::new(leasehold_operator::keys::keyring(Some(&client), &key_config).await?);
    tracing::info!(
        key_id = keyring.primary_key_id().unwrap_or("none"),
        "key encryption key ready"
    );
    let audit = args.audit.audit_config(&home);
    let identity = args
        .pod_name
        .clone()
        .unwrap_or_else(|| format!("leasehold-{}", std::process::id()));
    let pod = args
        .pod_name
        .clone()
        .zip(args.pod_namespace.clone())
        .map(|(name, ns)| (ns, name));
    let broker = if args.no_broker {
        None
    } else {
        let namespace = args.pod_namespace.clone().ok_or_else(|| {
            OperatorError::Config("the broker needs POD_NAMESPACE (or --pod-namespace); pass --no-broker to run without it".into())
        })?;
        Some(BrokerSettings {
            addr: args.broker_addr,
            namespace,
            service: args.broker_service.clone(),
            generated_secret: args.broker_tls_generated_secret.clone(),
            ca_configmap: args.broker_ca_configmap.clone(),
            user_secret: args.broker_tls_secret.clone(),
            node_service_account: args.node_service_account.clone(),
            node_token_audience: args.broker_token_audience.clone(),
            pod_token_audience: args.pod_token_audience.clone(),
            namespaces: args.namespaces.clone(),
            per_pod_sweep: std::time::Duration::from_secs(args.per_pod_sweep_seconds.max(1)),
            keyring: keyring.clone(),
        })
    };
    let issuers = IssuerSettings {
        // ClusterIssuer Secrets and CRL ConfigMaps live with the controller.
        controller_namespace: args
            .pod_namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        crl_addr: Some(args.crl_addr),
        acme_http01_addr: Some(args.acme_http01_addr),
        ..IssuerSettings::default()
    };
    let config = ControllerConfig {
        namespaces: args.namespaces,
        metrics_addr: args.metrics_addr,
        leader_election: args
            .leader_election_namespace
            .map(|ns| LeaderElectionConfig::new(ns, args.leader_election_lease, identity.clone())),
        concurrency: args.concurrency,
        max_admin_connections: args.max_admin_connections,
        instance: Some(identity),
        pod,
        broker,
        issuers,
        audit,
        keyring,
    };
    leasehold_operator::run_with_client(client, config, shutdown_signal()).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        controller: ControllerArgs,
    }

    fn parse(extra: &[&str]) -> Result<ControllerArgs, clap::Error> {
        let mut argv = vec!["leasehold"];
        if !extra.contains(&"--encryption") {
            argv.extend_from_slice(&["--encryption", "none"]);
        }
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).map(|c| c.controller)
    }

    #[test]
    fn broker_limits_from_flags() {
        assert_eq!(parse(&[]).unwrap().broker_limits(), BrokerLimits::default());
        let args = parse(&[
            "--broker-max-concurrent-issues-per-lease",
            "2",
            "--broker-max-per-pod-users-per-lease",
            "50",
            "--broker-max-connections",
            "64",
        ])
        .unwrap();
        let limits = args.broker_limits();
        assert_eq!(limits.max_concurrent_issues_per_lease, 2);
        assert_eq!(limits.max_per_pod_users_per_lease, 50);
        assert_eq!(limits.max_connections, 64);
        assert!(parse(&["--broker-max-per-pod-users-per-lease", "0"]).is_err());
    }

    #[test]
    fn encryption_is_chosen_explicitly() {
        let bare = Cli::try_parse_from(["leasehold"]);
        assert!(bare.is_err(), "no default: --encryption must be given");
        assert!(
            parse(&["--encryption", "kms"]).is_err(),
            "kms needs a key id"
        );
        let kms = parse(&["--encryption", "kms", "--kms-key-id", "alias/leasehold"]).unwrap();
        assert!(matches!(
            kms.encryption.key_config("ns").unwrap().primary,
            Some(leasehold_operator::keys::KeySource::Kms(_))
        ));
        let local = parse(&[
            "--encryption",
            "local",
            "--local-key-secret",
            "leasehold-kek",
            "--local-key-secret-create",
        ])
        .unwrap();
        assert!(matches!(
            local.encryption.key_config("ns").unwrap().primary,
            Some(leasehold_operator::keys::KeySource::LocalSecret { create: true, .. })
        ));
        let no_key = parse(&["--encryption", "local"]).unwrap();
        assert!(no_key.encryption.key_config("ns").is_err());
        assert!(
            parse(&[])
                .unwrap()
                .encryption
                .key_config("ns")
                .unwrap()
                .primary
                .is_none()
        );
        // The audit trail is on only with a sink.
        assert!(parse(&[]).unwrap().audit.audit_config("ns").is_none());
        let audit = parse(&["--audit-log", "-"])
            .unwrap()
            .audit
            .audit_config("ns")
            .unwrap();
        assert_eq!(audit.sinks, [leasehold_audit::Sink::Stdout]);
    }

    #[test]
    fn crl_addr_defaults_and_parses() {
        assert_eq!(parse(&[]).unwrap().crl_addr.to_string(), "0.0.0.0:8083");
        let args = parse(&["--crl-addr", "127.0.0.1:9000"]).unwrap();
        assert_eq!(args.crl_addr.to_string(), "127.0.0.1:9000");
        assert!(parse(&["--crl-addr", "nope"]).is_err());
    }

    #[test]
    fn acme_http01_addr_defaults_and_parses() {
        assert_eq!(
            parse(&[]).unwrap().acme_http01_addr.to_string(),
            "0.0.0.0:8089"
        );
        let args = parse(&["--acme-http01-addr", "127.0.0.1:9089"]).unwrap();
        assert_eq!(args.acme_http01_addr.to_string(), "127.0.0.1:9089");
        assert!(parse(&["--acme-http01-addr", "8089"]).is_err());
    }
}
