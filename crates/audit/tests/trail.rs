//! The audit trail end to end: a real file sink, real checkpoint stores, a real HTTP
//! server for the webhook, and the verifier over what was written.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leasehold_audit::{
    Action, AuditEvent, AuditLog, AuditSettings, AuditSigner, Checkpoint, CheckpointStore,
    FileCheckpointStore, MemoryCheckpointStore, Outcome, ProblemKind, Sink, VerifyOptions,
    VerifyReport, verify_file,
};
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};

const WAIT: Duration = Duration::from_secs(20);

fn settings(every: u64) -> AuditSettings {
    AuditSettings {
        checkpoint_every: every,
        ..AuditSettings::default()
    }
}

fn event(i: u64) -> AuditEvent {
    AuditEvent::new(Action::Revoke, Outcome::Success)
        .lease("shop", "orders-db")
        .version(i)
        .username(format!("lh_orders_{i}"))
        .reason("superseded")
}

fn signer() -> AuditSigner {
    AuditSigner::from_bytes(&[42u8; 32])
}

fn keyed(signer: &AuditSigner) -> VerifyOptions {
    VerifyOptions {
        public_keys: vec![signer.verifying_key()],
    }
}

async fn start(path: &Path, store: Arc<dyn CheckpointStore>, settings: AuditSettings) -> AuditLog {
    AuditLog::start(
        vec![Sink::File(path.to_path_buf())],
        signer(),
        store,
        settings,
    )
    .await
    .expect("the log starts")
}

/// A trail of one segment: chain_start, `n` events, checkpoints every 10.
async fn write_trail(n: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = start(&path, Arc::new(MemoryCheckpointStore::new()), settings(10)).await;
    for i in 1..=n {
        log.record(event(i));
    }
    log.shutdown().await;
    (dir, path)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("read")
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).expect("write");
}

fn verify(path: &Path) -> VerifyReport {
    verify_file(path, &keyed(&signer())).expect("readable")
}

fn problem_of(report: &VerifyReport) -> (ProblemKind, usize) {
    let problem = report
        .first_problem
        .as_ref()
        .expect("a problem is reported");
    (problem.kind, problem.line)
}

fn metric(log: &AuditLog, name_and_labels: &str) -> Option<f64> {
    let mut registry = Registry::default();
    log.register_metrics(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    text.lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.trim().parse().ok())
}

/// Recompute a line's hash after editing it (what an attacker without the key can do).
fn rehash(line: &str) -> String {
    let mut value: serde_json::Value = serde_json::from_str(line).expect("json");
    let object = value.as_object_mut().expect("object");
    let start = line.find(",\"hash\":\"").expect("hash field");
    let canonical = format!("{}{}", &line[..start], &line[start + 74..]);
    let hash = format!("{:x}", Sha256::digest(canonical.as_bytes()));
    let old = object["hash"].as_str().expect("hash").to_owned();
    line.replace(&old, &hash)
}

#[tokio::test]
async fn an_untouched_trail_verifies() {
    let (_dir, path) = write_trail(25).await;
    let report = verify(&path);
    assert!(report.is_ok(), "{report}");
    // chain_start + 25 events + checkpoints after 10, 20 (chain_start counts) and at shutdown.
    assert_eq!(report.records, 29);
    assert_eq!(report.checkpoints, 3);
    assert_eq!(report.signatures_verified, 3);
    assert_eq!(report.segments, 1);
    assert_eq!(report.unsigned_at_end, 0);
    assert!(report.to_string().starts_with("OK: 29 records"));
    let first: serde_json::Value = serde_json::from_str(&lines(&path)[0]).expect("json");
    assert!(first["chain_start"]["resumed_from"].is_null());
    let second: serde_json::Value = serde_json::from_str(&lines(&path)[1]).expect("json");
    assert_eq!(second["event"]["username"], "lh_orders_1");
    assert_eq!(second["prev"], first["hash"]);
}

#[tokio::test]
async fn the_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let (_dir, path) = write_trail(1).await;
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[tokio::test]
async fn without_keys_signatures_are_reported_unchecked() {
    let (_dir, path) = write_trail(5).await;
    let report = verify_file(&path, &VerifyOptions::default()).expect("readable");
    assert!(report.is_ok(), "{report}");
    assert!(!report.signatures_checked);
    assert_eq!(report.signatures_verified, 0);
    assert!(report.to_string().contains("NOT checked"));
}

#[tokio::test]
async fn a_tampered_field_is_a_bad_hash_at_that_line() {
    let (_dir, path) = write_trail(8).await;
    let mut all = lines(&path);
    assert!(all[4].contains("\"version\":4"));
    all[4] = all[4].replace("\"version\":4", "\"version\":5");
    write_lines(&path, &all);
    let report = verify(&path);
    assert_eq!(problem_of(&report), (ProblemKind::BadHash, 5));
    assert_eq!(report.records, 4);
    assert!(
        report
            .to_string()
            .starts_with("PROBLEM at line 5 (seq 5): bad hash")
    );
}

#[tokio::test]
async fn a_tampered_and_rehashed_line_breaks_the_next_link() {
    let (_dir, path) = write_trail(8).await;
    let mut all = lines(&path);
    all[4] = rehash(&all[4].replace("superseded", "routine"));
    write_lines(&path, &all);
    assert_eq!(problem_of(&verify(&path)), (ProblemKind::BrokenLink, 6));
}

#[tokio::test]
async fn a_deleted_line_is_a_gap_where_it_was() {
    let (_dir, path) = write_trail(8).await;
    let mut all = lines(&path);
    all.remove(3);
    write_lines(&path, &all);
    let report = verify(&path);
    assert_eq!(problem_of(&report), (ProblemKind::SeqGap, 4));
    assert!(
        report.to_string().contains("records 4..4 are missing"),
        "{report}"
    );
}

#[tokio::test]
async fn a_deleted_first_line_is_detected() {
    let (_dir, path) = write_trail(3).await;
    let mut all = lines(&path);
    all.remove(0);
    write_lines(&path, &all);
    assert_eq!(problem_of(&verify(&path)), (ProblemKind::SeqGap, 1));
}

#[tokio::test]
async fn swapped_lines_are_detected() {
    let (_dir, path) = write_trail(8).await;
    let mut all = lines(&path);
    all.swap(3, 4);
    write_lines(&path, &all);
    let (kind, line) = problem_of(&verify(&path));
    assert_eq!(line, 4);
    assert!(matches!(
        kind,
        ProblemKind::SeqGap | ProblemKind::SeqOutOfOrder
    ));

    // Renumbered and rehashed by someone without the key: the links still break.
    let mut all = lines(&path);
    all.swap(3, 4);
    let (a, b) = (all[3].clone(), all[4].clone());
    all[3] = rehash(&b.replacen("\"seq\":5", "\"seq\":4", 1));
    all[4] = rehash(&a.replacen("\"seq\":4", "\"seq\":5", 1));
    write_lines(&path, &all);
    assert_eq!(problem_of(&verify(&path)), (ProblemKind::BrokenLink, 4));
}

#[tokio::test]
async fn a_truncated_last_line_is_malformed() {
    let (_dir, path) = write_trail(4).await;
    let text = std::fs::read_to_string(&path).expect("read");
    let last_start = text[..text.len() - 1].rfind('\n').expect("several lines") + 1;
    let cut = last_start + (text.len() - last_start) / 2;
    std::fs::write(&path, &text[..cut]).expect("write");
    let report = verify(&path);
    assert_eq!(
        problem_of(&report),
        (ProblemKind::Malformed, lines(&path).len())
    );
}

#[tokio::test]
async fn a_forged_checkpoint_signature_is_detected() {
    let (_dir, path) = write_trail(4).await;
    let mut all = lines(&path);
    let last = all.len() - 1;
    assert!(all[last].contains("\"checkpoint\""));
    let value: serde_json::Value = serde_json::from_str(&all[last]).expect("json");
    let signature = value["checkpoint"]["signature"]
        .as_str()
        .expect("signature");
    let forged = AuditSigner::generate();
    let mut bytes = signature.to_owned().into_bytes();
    bytes[3] = if bytes[3] == b'A' { b'B' } else { b'A' };
    let forged_signature = String::from_utf8(bytes).expect("ascii");
    all[last] = rehash(&all[last].replace(signature, &forged_signature));
    write_lines(&path, &all);
    let report = verify(&path);
    assert_eq!(problem_of(&report), (ProblemKind::BadSignature, all.len()));

    // Signed with another key: unknown to the verifier.
    let report = verify_file(&path, &keyed(&forged)).expect("readable");
    assert_eq!(problem_of(&report), (ProblemKind::UnknownKey, all.len()));
}

#[tokio::test]
async fn a_clean_restart_continues_the_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    // Local mode: the checkpoint in a file.
    let store = Arc::new(FileCheckpointStore::new(dir.path().join("checkpoint.json")));
    for round in 0..3 {
        let log = start(&path, store.clone(), settings(4)).await;
        for i in 0..6 {
            log.record(event(round * 10 + i));
        }
        log.shutdown().await;
    }
    let report = verify(&path);
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.segments, 3);
    assert_eq!(report.unsigned_tail_before_restart, 0);
    assert_eq!(report.unsigned_at_end, 0);
    let saved = store.load().await.expect("load").expect("saved");
    assert_eq!(Some(saved.record_seq), report.last_seq);
    let starts: Vec<serde_json::Value> = lines(&path)
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|v| v.get("chain_start").is_some())
        .collect();
    assert_eq!(starts.len(), 3);
    assert_ne!(
        starts[1]["chain_start"]["segment"],
        starts[2]["chain_start"]["segment"]
    );
}

#[tokio::test]
async fn a_crash_leaves_an_unsigned_tail_that_the_verifier_reports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let store = Arc::new(MemoryCheckpointStore::new());
    let mut saved = store.watch();
    let log = start(&path, store.clone(), settings(5)).await;
    // seq 1 chain_start, 2..5 events, 6 checkpoint, 7..11 events, 12 checkpoint, 13..15 events.
    for i in 0..12 {
        log.record(event(i));
    }
    tokio::time::timeout(
        WAIT,
        saved.wait_for(|c| c.as_ref().is_some_and(|c| c.record_seq == 12)),
    )
    .await
    .expect("checkpoint saved in time")
    .expect("store alive");
    drop(log); // no shutdown: seq 13..15 are never signed

    let log = start(&path, store.clone(), settings(5)).await;
    log.record(event(100));
    log.shutdown().await;
    let report = verify(&path);
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.segments, 2);
    assert_eq!(report.unsigned_tail_before_restart, 3);
    assert!(report.to_string().contains("unsigned tail of 3 record(s)"));
    let all = lines(&path);
    let restart: serde_json::Value = serde_json::from_str(&all[15]).expect("json");
    assert_eq!(restart["seq"], 13);
    assert_eq!(restart["chain_start"]["resumed_from"]["seq"], 12);
}

#[tokio::test]
async fn a_line_torn_by_a_crash_is_forgiven_only_before_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let store = Arc::new(MemoryCheckpointStore::new());
    let log = start(&path, store.clone(), settings(3)).await;
    for i in 0..4 {
        log.record(event(i));
    }
    log.checkpoint().await;
    log.record(event(5));
    drop(log);
    // The crash cut the next write half-way.
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .expect("open");
    std::io::Write::write_all(&mut file, br#"{"seq":10,"time":"2025-"#).expect("append");
    drop(file);

    let log = start(&path, store.clone(), settings(3)).await;
    log.record(event(6));
    log.shutdown().await;
    let report = verify(&path);
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.torn_lines_before_restart, 1);
    assert_eq!(report.unsigned_tail_before_restart, 1);

    // Anywhere else, an unreadable line is a problem.
    let mut all = lines(&path);
    let torn_at = all
        .iter()
        .position(|l| l == r#"{"seq":10,"time":"2025-"#)
        .expect("torn line");
    all.remove(torn_at);
    all.insert(2, r#"{"seq":10,"time":"2025-"#.to_owned());
    write_lines(&path, &all);
    assert_eq!(problem_of(&verify(&path)), (ProblemKind::Malformed, 3));
}

#[tokio::test]
async fn resuming_from_a_checkpoint_not_in_the_file_is_a_bad_resume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let store = Arc::new(MemoryCheckpointStore::new());
    let log = start(&path, store.clone(), settings(5)).await;
    log.record(event(1));
    log.shutdown().await;
    let written = lines(&path).len();

    store.set(Some(Checkpoint {
        seq: 40,
        hash: "ab".repeat(32),
        signature: "c2ln".to_owned(),
        key_id: signer().key_id().to_owned(),
        record_seq: 41,
        record_hash: "cd".repeat(32),
    }));
    let log = start(&path, store.clone(), settings(5)).await;
    log.shutdown().await;
    assert_eq!(
        problem_of(&verify(&path)),
        (ProblemKind::BadResume, written + 1)
    );
}

#[tokio::test]
async fn a_lost_checkpoint_store_shows_as_a_new_chain_mid_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = start(&path, Arc::new(MemoryCheckpointStore::new()), settings(5)).await;
    log.record(event(1));
    log.shutdown().await;
    let written = lines(&path).len();
    let log = start(&path, Arc::new(MemoryCheckpointStore::new()), settings(5)).await;
    log.shutdown().await;
    assert_eq!(
        problem_of(&verify(&path)),
        (ProblemKind::BadResume, written + 1)
    );
}

#[tokio::test]
async fn checkpoints_come_on_time_when_records_are_few() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let store = Arc::new(MemoryCheckpointStore::new());
    let mut saved = store.watch();
    let settings = AuditSettings {
        checkpoint_every: 1000,
        checkpoint_interval: Duration::from_millis(50),
        ..AuditSettings::default()
    };
    let log = start(&path, store.clone(), settings).await;
    log.record(event(1));
    tokio::time::timeout(WAIT, saved.wait_for(Option::is_some))
        .await
        .expect("a timed checkpoint")
        .expect("store alive");
    assert_eq!(
        metric(&log, "leasehold_audit_last_checkpoint_seq"),
        Some(3.0)
    );
    let report = verify(&path);
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.checkpoints, 1);
    drop(log);
}

#[tokio::test]
async fn explicit_checkpoint_waits_until_saved() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let store = Arc::new(MemoryCheckpointStore::new());
    let log = start(&path, store.clone(), settings(1000)).await;
    log.record(event(1));
    log.checkpoint().await;
    let saved = store.load().await.expect("load").expect("saved");
    assert_eq!((saved.seq, saved.record_seq), (2, 3));
    log.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_recorders_keep_one_contiguous_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    // Checkpoints interleave with the recorders (signing is slow in debug builds, so not
    // too many).
    let log = start(&path, Arc::new(MemoryCheckpointStore::new()), settings(40)).await;
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let log = log.clone();
        if t % 2 == 0 {
            tasks.push(tokio::spawn(async move {
                for i in 0..200 {
                    log.record(event(t * 1000 + i));
                    tokio::task::yield_now().await;
                }
            }));
        } else {
            // The sync path, from plain threads.
            tasks.push(tokio::task::spawn_blocking(move || {
                for i in 0..200 {
                    log.record(event(t * 1000 + i));
                }
            }));
        }
    }
    for task in tasks {
        task.await.expect("recorder");
    }
    log.shutdown().await;
    let report = verify(&path);
    assert!(report.is_ok(), "{report}");
    let all = lines(&path);
    let seqs: Vec<u64> = all
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["seq"]
                .as_u64()
                .expect("seq")
        })
        .collect();
    assert_eq!(seqs, (1..=all.len() as u64).collect::<Vec<_>>());
    let events = all.iter().filter(|l| l.contains("\"event\":")).count();
    assert_eq!(events, 1600);
    assert_eq!(
        metric(&log, "leasehold_audit_records_total{action=\"revoke\"}"),
        Some(1600.0)
    );
}

#[tokio::test]
async fn metrics_are_exported_under_their_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = start(&path, Arc::new(MemoryCheckpointStore::new()), settings(10)).await;
    log.record(AuditEvent::new(Action::BrokerIssue, Outcome::Denied));
    log.checkpoint().await;
    let mut registry = Registry::default();
    log.register_metrics(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    assert!(
        text.contains("# TYPE leasehold_audit_records counter"),
        "{text}"
    );
    assert!(
        text.contains("leasehold_audit_records_total{action=\"broker_issue\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("leasehold_audit_records_total{action=\"chain_start\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE leasehold_audit_write_failures counter"),
        "{text}"
    );
    // Every configured sink has its series from the start, at 0.
    assert!(
        text.contains("leasehold_audit_write_failures_total{sink=\"file\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("leasehold_audit_write_failures_total{sink=\"checkpoint_store\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("leasehold_audit_records_total{action=\"checkpoint\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("leasehold_audit_last_checkpoint_seq 3"),
        "{text}"
    );
    log.shutdown().await;
}

#[tokio::test]
async fn a_disabled_log_records_nothing() {
    let log = AuditLog::disabled();
    log.record(event(1));
    log.checkpoint().await;
    log.shutdown().await;
    let mut registry = Registry::default();
    log.register_metrics(&mut registry);
}

/// A webhook receiver on a random loopback port, keeping every body it gets.
async fn webhook_server() -> (String, Arc<Mutex<Vec<String>>>) {
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let kept = bodies.clone();
    let app = axum::Router::new().route(
        "/audit",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let kept = kept.clone();
            async move {
                assert_eq!(headers["content-type"], "application/x-ndjson");
                kept.lock().expect("lock").push(body);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/audit", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, bodies)
}

#[tokio::test]
async fn the_webhook_receives_every_line_in_batches() {
    let (url, bodies) = webhook_server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::start(
        vec![Sink::File(path.clone()), Sink::Webhook { url }],
        signer(),
        Arc::new(MemoryCheckpointStore::new()),
        settings(10),
    )
    .await
    .expect("starts");
    for i in 0..30 {
        log.record(event(i));
    }
    log.shutdown().await;
    let received = bodies.lock().expect("lock").concat();
    assert_eq!(received, std::fs::read_to_string(&path).expect("read"));
    assert_eq!(
        metric(
            &log,
            "leasehold_audit_write_failures_total{sink=\"webhook\"}"
        ),
        Some(0.0)
    );
}

#[tokio::test]
async fn a_webhook_that_is_down_loses_nothing_from_the_file_and_is_counted() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let settings = AuditSettings {
        checkpoint_every: 10,
        webhook_attempts: 2,
        webhook_backoff: Duration::from_millis(10),
        ..AuditSettings::default()
    };
    let log = AuditLog::start(
        vec![
            Sink::File(path.clone()),
            Sink::Webhook {
                url: format!("http://127.0.0.1:{port}/audit?token=do-not-log"),
            },
        ],
        signer(),
        Arc::new(MemoryCheckpointStore::new()),
        settings,
    )
    .await
    .expect("starts");
    for i in 0..5 {
        log.record(event(i));
    }
    log.shutdown().await;
    let report = verify(&path);
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.records, 7);
    let failed = metric(
        &log,
        "leasehold_audit_write_failures_total{sink=\"webhook\"}",
    );
    assert_eq!(failed, Some(7.0));
}

#[test]
fn a_webhook_url_is_not_shown_by_debug() {
    let sink = Sink::Webhook {
        url: "https://hooks.example.com/services/T000/B000/secret-token".to_owned(),
    };
    let debug = format!("{sink:?}");
    assert!(!debug.contains("secret-token"), "{debug}");
    assert!(debug.contains("hooks.example.com"));
}

#[tokio::test]
async fn a_bad_webhook_url_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let result = AuditLog::start(
        vec![Sink::Webhook {
            url: "ftp://example.com/x".to_owned(),
        }],
        signer(),
        Arc::new(MemoryCheckpointStore::new()),
        AuditSettings::default(),
    )
    .await;
    assert!(result.is_err());
    drop(dir);
}
