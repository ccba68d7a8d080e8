//! `charts/leasehold/dashboards/exported-metrics.txt` is what the processes export:
//! the dashboard and alert-rule tests (tests/chart) check every query against that
//! file, and this test checks the file against the real registries, so neither can
//! drift. Regenerate with `LEASEHOLD_WRITE_METRICS=1 cargo test -p leasehold-cli --test
//! exported_metrics`.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use leasehold_core::timing::StepSink;
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

/// Metric names as queried: counters with `_total`, histograms and gauges by name.
fn names(registry: &Registry) -> BTreeSet<String> {
    let mut text = String::new();
    encode(&mut text, registry).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let mut parts = l.split_whitespace();
            let name = parts.next().unwrap();
            match parts.next() {
                Some("counter") => format!("{name}_total"),
                _ => name.to_owned(),
            }
        })
        .collect()
}

#[tokio::test]
async fn the_exported_metrics_file_matches_the_registries() {
    // The controller: its own metrics, the broker's, the audit trail's and the keyring's,
    // in one registry as `leasehold_operator::run` builds it. A family without a series
    // is not exported at all, so every one is given one first.
    let mut controller = leasehold_operator::metrics::Metrics::new();
    let broker = leasehold_broker::BrokerMetrics::register(controller.registry_mut());
    let audit_metrics = leasehold_audit::AuditMetrics::register(controller.registry_mut());
    let keyring = leasehold_envelope::Keyring::new(
        std::sync::Arc::new(leasehold_envelope::LocalKey::generate().unwrap()),
        vec![],
        leasehold_envelope::KeyringSettings::default(),
    );
    keyring.register_metrics(controller.registry_mut());
    controller.reconciled("secretlease", 0.1);
    controller.failed("secretlease", "kube");
    controller.rotation("Succeeded");
    controller.lease_state("ns", "lease", Some(1), 1);
    controller.emergency_revocation("ns", "lease");
    controller.lease_suspended("ns", "lease", true);
    broker.observe("Issue", tonic::Code::Ok, 0.01);
    broker.step("facts", 0.001);
    broker.cluster_reads().lookup("pod", "hit");
    broker.cluster_reads().api_read("pod");
    let ctx = leasehold_envelope::EncryptionContext::new().with("k", "v");
    let sealed = keyring.seal(&ctx, b"x").await.unwrap();
    keyring.open(&ctx, sealed.as_bytes()).await.unwrap();
    keyring.open(&ctx, sealed.as_bytes()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let audit = leasehold_audit::AuditLog::start_with_metrics(
        vec![leasehold_audit::Sink::File(dir.path().join("audit.jsonl"))],
        leasehold_audit::AuditSigner::generate(),
        std::sync::Arc::new(leasehold_audit::MemoryCheckpointStore::new()),
        leasehold_audit::AuditSettings::default(),
        audit_metrics,
    )
    .await
    .unwrap();
    audit.shutdown().await;
    let mut exported = names(controller.registry_mut());
    // The node driver.
    let mut node = Registry::default();
    let csi = leasehold_csi::NodeMetrics::register(node.sub_registry_with_prefix("leasehold_csi"));
    csi.publish_done(tonic::Code::Ok, 0.01);
    csi.unpublish_done(tonic::Code::Ok);
    csi.step("broker_issue", 0.001);
    exported.extend(names(&node));

    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../charts/leasehold/dashboards/exported-metrics.txt");
    let want: String = exported.iter().map(|n| format!("{n}\n")).collect();
    if std::env::var_os("LEASEHOLD_WRITE_METRICS").is_some() {
        std::fs::write(&file, &want).unwrap();
    }
    let have = std::fs::read_to_string(&file).unwrap();
    assert_eq!(
        have, want,
        "exported-metrics.txt differs from what the code exports; regenerate it (see the test's doc)"
    );
}
