//! `leasehold node`: the CSI node driver.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use leasehold_auth::{HttpKeySource, TokenVerifier, VerifierConfig};
use leasehold_csi::{
    CredentialBroker, GrpcBroker, GrpcBrokerConfig, NodeDriver, NodeDriverConfig, NodeToken,
    PodTokenVerifier,
};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::info;

use crate::serve::{metrics_server, shutdown_signal};

/// Flags of `leasehold node`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// The CSI socket the kubelet (through node-driver-registrar) talks to.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/csi/csi.sock",
        env = "CSI_ENDPOINT"
    )]
    csi_socket: PathBuf,
    /// This node's name (the CSI node id; the broker checks pods run here).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The broker in the controller, `https://host:port` (TLS only: the
    /// driver sends its token and receives credentials over it).
    #[arg(long, value_name = "URL", value_parser = broker_url)]
    broker_url: String,
    /// CA bundle to verify the broker's certificate.
    #[arg(long, value_name = "FILE")]
    broker_ca: Option<PathBuf>,
    /// The name the broker's certificate must carry, when it differs from the host in
    /// --broker-url (e.g. dialling an IP address or a tunnel; default: that host).
    #[arg(long, value_name = "DNS-NAME")]
    broker_server_name: Option<String>,
    /// This driver's own service-account token, sent to the broker (re-read on every call).
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    node_token: PathBuf,
    /// Audience of the pod tokens the kubelet passes (must match the CSIDriver's tokenRequests).
    #[arg(long, default_value = leasehold_api::CSI_TOKEN_AUDIENCE)]
    token_audience: String,
    /// Per-volume metadata, so a restarted driver resumes its volumes without re-issuing.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/leasehold")]
    state_dir: PathBuf,
    /// Size cap of each volume's tmpfs, in KiB.
    #[arg(long, value_name = "KIB", default_value_t = 1024)]
    tmpfs_size_kib: u64,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9090")]
    metrics_addr: SocketAddr,
    /// The kubelet's root directory: target paths must be
    /// `<DIR>/pods/<pod uid>/volumes/kubernetes.io~csi/<volume>/mount`.
    #[arg(long, value_name = "DIR", default_value = leasehold_csi::DEFAULT_KUBELET_DIR)]
    kubelet_dir: PathBuf,
    /// Fresh publishes of one lease that may run at once, so a lease whose database
    /// hangs cannot take every publish slot; more wait for a slot (see
    /// --per-lease-waiting). Renewals of published volumes have slots of their own.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    per_lease_concurrency: u16,
    /// Renewals (republishes of published volumes) of one lease that may run at once,
    /// apart from its fresh publishes; default: a quarter of the node's 16 renewal
    /// slots (4), so a few leases whose database hangs cannot hold up the renewals of
    /// every other lease.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    per_lease_renewal_concurrency: Option<u16>,
    /// Publishes of one lease that may wait for a slot, and as many renewals (each
    /// at most the broker deadline); more are refused with RESOURCE_EXHAUSTED (the
    /// kubelet retries). Many pods of one lease starting at once (a Deployment
    /// scaling up) wait here.
    #[arg(long, value_name = "N", default_value_t = 512)]
    per_lease_waiting: usize,
}

/// `--broker-url`: an `https://` URL with a host; plain `http` is refused.
fn broker_url(value: &str) -> Result<String, String> {
    let (scheme, rest) = value
        .split_once("://")
        .ok_or_else(|| "expected https://host:port".to_owned())?;
    if !scheme.eq_ignore_ascii_case("https") {
        return Err(format!(
            "the broker must be reached over TLS: expected https://, not {scheme}://"
        ));
    }
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() || host.starts_with(':') || host.contains('@') {
        return Err("expected https://host:port".to_owned());
    }
    Ok(value.to_owned())
}

pub async fn run(args: NodeArgs) -> Result<(), String> {
    if !args.kubelet_dir.is_absolute() {
        return Err(format!(
            "--kubelet-dir must be an absolute path, not {}",
            args.kubelet_dir.display()
        ));
    }
    let keys = HttpKeySource::infer().await.map_err(|e| {
        format!("cannot reach the API server for the service-account signing keys: {e}")
    })?;
    let verifier = TokenVerifier::new(VerifierConfig::new(args.token_audience.clone()), keys)
        .map_err(|e| format!("token verifier: {e}"))?;
    let verifier: Arc<dyn PodTokenVerifier> = Arc::new(verifier);
    let broker = GrpcBroker::new(GrpcBrokerConfig {
        endpoint: args.broker_url.clone(),
        ca_file: args.broker_ca.clone(),
        tls_server_name: args.broker_server_name.clone(),
        node_token: NodeToken::File(args.node_token.clone()),
        call_timeout: Duration::from_secs(30),
        ready_cache: leasehold_csi::DEFAULT_READY_CACHE,
    })
    .map_err(|e| format!("broker client: {e}"))?;
    let broker: Arc<dyn CredentialBroker> = Arc::new(broker);

    let mut config = NodeDriverConfig::new(
        &args.csi_socket,
        &args.node_name,
        &args.state_dir,
        &args.token_audience,
    );
    config.tmpfs_size_bytes = args.tmpfs_size_kib * 1024;
    config.kubelet_dir = args.kubelet_dir.clone();
    config.per_lease_concurrency = usize::from(args.per_lease_concurrency);
    config.per_lease_renewal_concurrency = args.per_lease_renewal_concurrency.map(usize::from);
    config.per_lease_waiting = args.per_lease_waiting;
    let mut registry = Registry::default();
    let driver = NodeDriver::new(
        config,
        verifier,
        broker,
        registry.sub_registry_with_prefix("leasehold_csi"),
    )
    .map_err(|e| format!("node driver: {e}"))?;

    let (stop_tx, stop_rx) = watch::channel(false);
    // /readyz follows the broker's reachability, which the driver checks and exports
    // as `leasehold_csi_broker_reachable`; liveness (the CSI Probe) never does.
    let reachability = driver.broker_reachability();
    let mut metrics_stop = stop_rx.clone();
    let metrics = tokio::spawn(metrics_server(
        args.metrics_addr,
        Arc::new(registry),
        Arc::new(move || reachability.is_reachable()),
        async move {
            let _ = metrics_stop.changed().await;
        },
    ));
    info!(node = %args.node_name, socket = %args.csi_socket.display(), broker = %args.broker_url, "CSI node driver starting");
    let mut driver_stop = stop_rx;
    let driver_task = driver.run(async move {
        let _ = driver_stop.changed().await;
    });
    let result = tokio::select! {
        r = driver_task => r.map_err(|e| format!("CSI server: {e}")),
        () = shutdown_signal() => Ok(()),
    };
    let _ = stop_tx.send(true);
    let _ = metrics.await;
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        node: NodeArgs,
    }

    fn parse(url: &str) -> Result<NodeArgs, clap::Error> {
        Cli::try_parse_from(["leasehold", "--node-name", "node-a", "--broker-url", url])
            .map(|c| c.node)
    }

    #[test]
    fn broker_url_must_be_https() {
        let args = parse("https://leasehold-broker.leasehold-system.svc:8443").unwrap();
        assert_eq!(
            args.broker_url,
            "https://leasehold-broker.leasehold-system.svc:8443"
        );
        assert!(parse("HTTPS://10.0.0.1:8443").is_ok());
        for bad in [
            "http://leasehold-broker:8443",
            "leasehold-broker:8443",
            "https://",
            "https://:8443",
            "https://user@host:8443",
            "grpc://host:8443",
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{bad}");
        }
        let err = parse("http://leasehold-broker:8443")
            .unwrap_err()
            .to_string();
        assert!(err.contains("over TLS"), "{err}");
    }

    #[test]
    fn kubelet_dir_defaults_to_the_kubelets() {
        let args = parse("https://b:8443").unwrap();
        assert_eq!(args.kubelet_dir, PathBuf::from("/var/lib/kubelet"));
        assert_eq!(args.per_lease_concurrency, 8);
        assert_eq!(
            args.per_lease_renewal_concurrency, None,
            "the driver's pool / 4"
        );
        assert_eq!(args.per_lease_waiting, 512);
    }

    #[test]
    fn per_lease_slots_are_flags() {
        let args = Cli::try_parse_from([
            "leasehold",
            "--node-name",
            "node-a",
            "--broker-url",
            "https://b:8443",
            "--per-lease-concurrency",
            "3",
            "--per-lease-renewal-concurrency",
            "2",
            "--per-lease-waiting",
            "0",
        ])
        .unwrap()
        .node;
        assert_eq!(args.per_lease_concurrency, 3);
        assert_eq!(args.per_lease_renewal_concurrency, Some(2));
        assert_eq!(args.per_lease_waiting, 0);
        for zero in ["--per-lease-concurrency", "--per-lease-renewal-concurrency"] {
            let err = Cli::try_parse_from([
                "leasehold",
                "--node-name",
                "node-a",
                "--broker-url",
                "https://b:8443",
                zero,
                "0",
            ])
            .unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{zero}"
            );
        }
    }
}
