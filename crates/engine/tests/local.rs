//! Local mode end to end: manifests in a directory, a real PostgreSQL, files on disk.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::TestClock;
use leasehold_engine::Engine;
use leasehold_engine::local::{
    LocalError, LocalOptions, LocalRunner, LocalState, format_table, status_rows,
};
use leasehold_testkit::PostgresServer;
use secrecy::ExposeSecret;

fn manifests(dir: &Path, server: &PostgresServer, rotate: Option<&str>, with_lease: bool) {
    let policy = "apiVersion: leasehold.dev/v1alpha1
kind: RotationPolicy
metadata:
  name: p
spec:
  ttl: 1h
  revoke: {gracePeriod: 0s, maxWait: 0s, waitForConsumers: false}
";
    let secret = format!(
        "apiVersion: v1
kind: Secret
metadata:
  name: admin
stringData:
  username: {}
  password: {}
",
        server.admin_user(),
        server.admin_password().expose_secret()
    );
    std::fs::write(dir.join("policy.yaml"), policy).unwrap();
    std::fs::write(dir.join("admin.yaml"), secret).unwrap();
    if with_lease {
        std::fs::write(
            dir.join("lease.yaml"),
            lease_manifest(server, "app", rotate, &[]),
        )
        .unwrap();
    } else {
        let _ = std::fs::remove_file(dir.join("lease.yaml"));
    }
}

/// A SecretLease `name` on `server` under the policy and admin Secret of [`manifests`],
/// with a rotation request and `grants` if given.
fn lease_manifest(
    server: &PostgresServer,
    name: &str,
    rotate: Option<&str>,
    grants: &[&str],
) -> String {
    let annotations = rotate
        .map(|r| format!("  annotations:\n    leasehold.dev/rotate: \"{r}\"\n"))
        .unwrap_or_default();
    let grants = if grants.is_empty() {
        String::new()
    } else {
        format!("    grants: {}\n", serde_json::to_string(grants).unwrap())
    };
    format!(
        "apiVersion: leasehold.dev/v1alpha1
kind: SecretLease
metadata:
  name: {name}
{annotations}spec:
  policyRef: {{name: p}}
  postgres:
    host: {}
    port: {}
    database: {}
    adminSecretRef: {{name: admin}}
    tls: {{mode: Disable}}
{grants}",
        server.host(),
        server.port(),
        server.database()
    )
}

/// Options over `dir`: manifests (`m/`, the policy and the `app` lease), the state file
/// and the output directory.
fn local_options_with_lease(dir: &Path, server: &PostgresServer) -> LocalOptions {
    let mdir = dir.join("m");
    std::fs::create_dir_all(&mdir).unwrap();
    manifests(&mdir, server, None, true);
    LocalOptions {
        manifests: mdir,
        state: dir.join("state.json"),
        output: dir.join("out"),
        keyring: test_keyring(),
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

#[tokio::test]
async fn local_mode_issues_rotates_and_revokes_on_removal() {
    let server = PostgresServer::shared().await;
    let tmp = tempfile::tempdir().unwrap();
    let options = local_options_with_lease(tmp.path(), server);
    let (mdir, state, out) = (
        options.manifests.clone(),
        options.state.clone(),
        options.output.clone(),
    );

    let runner = LocalRunner::new(options.clone(), Engine::new()).unwrap();
    let report = runner.pass().await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let files = out.join("default/app");
    let user1 = read(&files.join("username"));
    let pw1 = read(&files.join("password"));
    assert!(read(&files.join("uri")).starts_with(&format!("postgres://{user1}:")));
    assert!(
        server.connect_as(&user1, &pw1).await.is_ok(),
        "the delivered credential logs in"
    );
    let mode = std::fs::metadata(files.join("..data/password"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o400, "credential files are owner-read-only");
    let state_mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
    assert_eq!(state_mode, 0o600, "the state file holds secrets: 0600");
    let rows = status_rows(&LocalState::load(&state).unwrap(), jiff::Timestamp::now());
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].phase.as_str(), rows[0].version),
        ("Active", Some(1))
    );
    assert!(format_table(&rows).contains("default/app"));
    assert!(
        !format_table(&rows).contains(&pw1),
        "status never shows secrets"
    );
    let loaded = LocalState::load(&state).unwrap();
    let debug = format!("{:?} {:?}", loaded, loaded.leases);
    assert!(debug.contains("default/app"), "{debug}");
    assert!(!debug.contains(&pw1), "Debug never shows secrets: {debug}");

    // A restarted process resumes from the state file: nothing new is issued.
    drop(runner);
    let runner = LocalRunner::new(options.clone(), Engine::new()).unwrap();
    runner.pass().await.unwrap();
    assert_eq!(read(&files.join("username")), user1);

    // Request a rotation through the annotation.
    manifests(&mdir, server, Some("2026-11-26T00:00:00Z"), true);
    runner.pass().await.unwrap();
    let user2 = read(&files.join("username"));
    let pw2 = read(&files.join("password"));
    assert_ne!(user1, user2);
    assert!(server.connect_as(&user2, &pw2).await.is_ok());
    assert!(
        server.connect_as(&user1, &pw1).await.is_err(),
        "the old credential is revoked"
    );
    // The same annotation value does not rotate again.
    runner.pass().await.unwrap();
    assert_eq!(read(&files.join("username")), user2);

    // Removing the lease revokes everything and forgets it.
    manifests(&mdir, server, None, false);
    runner.pass().await.unwrap();
    assert!(
        server.connect_as(&user2, &pw2).await.is_err(),
        "removal revokes the credential"
    );
    assert!(LocalState::load(&state).unwrap().leases.is_empty());
    assert!(!files.exists());
}

#[tokio::test]
async fn local_mode_reports_invalid_specs_without_touching_the_database() {
    let tmp = tempfile::tempdir().unwrap();
    let mdir = tmp.path().join("m");
    std::fs::create_dir_all(&mdir).unwrap();
    std::fs::write(
        mdir.join("lease.yaml"),
        "apiVersion: leasehold.dev/v1alpha1
kind: SecretLease
metadata: {name: orphan}
spec:
  policyRef: {name: missing}
  postgres: {host: 127.0.0.1, port: 1, database: x, adminSecretRef: {name: a}}
",
    )
    .unwrap();
    let options = LocalOptions {
        manifests: mdir,
        state: tmp.path().join("s.json"),
        output: tmp.path().join("o"),
        keyring: test_keyring(),
    };
    let runner = LocalRunner::new(options, Engine::new()).unwrap();
    let report = runner.pass().await.unwrap();
    assert_eq!(report.errors.len(), 1);
    assert!(
        report.errors[0]
            .1
            .contains("RotationPolicy default/missing not found"),
        "{:?}",
        report.errors
    );
    let rows = status_rows(
        &LocalState::load(&tmp.path().join("s.json")).unwrap(),
        jiff::Timestamp::now(),
    );
    assert_eq!(rows[0].phase, "Invalid");
}

#[tokio::test]
async fn sweeper_revokes_only_unrecorded_versions_of_known_leases() {
    let server = PostgresServer::shared().await;
    let tmp = tempfile::tempdir().unwrap();
    let options = local_options_with_lease(tmp.path(), server);
    let out = options.output.clone();
    let runner = LocalRunner::new(options, Engine::new()).unwrap();
    runner.pass().await.unwrap();
    let current = read(&out.join("default/app/username"));
    // A leaked version of this lease (as if state had been restored from an old backup),
    // and a user that merely looks similar.
    let leaked = current.replace("_v1", "_v7");
    let lookalike = format!("{current}_extra");
    let admin = server.admin_client().await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {leaked} LOGIN; CREATE ROLE {lookalike} LOGIN"
        ))
        .await
        .unwrap();

    let dry = runner.sweep(true).await.unwrap();
    assert_eq!(dry.len(), 1);
    assert_eq!(dry[0].1.orphans, vec![leaked.clone()]);
    assert!(dry[0].1.revoked.is_empty());
    let exists = |name: String| async move {
        server
            .admin_client()
            .await
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
            .await
            .unwrap()
            .is_some()
    };
    assert!(exists(leaked.clone()).await, "dry run keeps it");

    let real = runner.sweep(false).await.unwrap();
    assert_eq!(real[0].1.revoked, vec![leaked.clone()]);
    assert!(!exists(leaked).await, "the orphan is dropped");
    assert!(exists(current).await, "the current user is untouched");
    assert!(
        exists(lookalike.clone()).await,
        "a user outside the exact pattern is untouched"
    );
    admin
        .batch_execute(&format!("DROP ROLE {lookalike}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_second_runner_on_the_same_state_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mdir = tmp.path().join("m");
    std::fs::create_dir_all(&mdir).unwrap();
    let options = LocalOptions {
        manifests: mdir,
        state: tmp.path().join("state").join("s.json"),
        output: tmp.path().join("o"),
        keyring: test_keyring(),
    };
    let first = LocalRunner::new(options.clone(), Engine::new()).unwrap();
    first.pass().await.unwrap();
    let second = LocalRunner::new(options.clone(), Engine::new());
    let err = second.expect_err("a second runner must be refused");
    assert!(matches!(err, LocalError::Locked { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("in use by another `leasehold local run`") && msg.contains("s.json"),
        "{msg}"
    );
    // Reading status needs no lock.
    LocalState::load(&options.state).unwrap();
    // Once the first runner is gone (process exit drops it), the state file is free.
    // (Other tests in this process start database servers: a child forked at this very
    // moment holds a copy of the lock's descriptor until it execs, so wait for that.)
    drop(first);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match LocalRunner::new(options.clone(), Engine::new()) {
            Ok(_) => break,
            Err(LocalError::Locked { .. }) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await
            }
            Err(e) => panic!("the lock was not released: {e}"),
        }
    }
}

#[tokio::test]
async fn local_status_shows_a_failing_rotation_with_reason_attempts_and_next_retry() {
    let server = PostgresServer::shared().await;
    let tmp = tempfile::tempdir().unwrap();
    let (mdir, state) = (tmp.path().join("m"), tmp.path().join("state.json"));
    std::fs::create_dir_all(&mdir).unwrap();
    manifests(&mdir, server, None, false);
    std::fs::write(
        mdir.join("lease.yaml"),
        lease_manifest(
            server,
            "broken",
            None,
            &["SELECT ON no_such_table_for_status"],
        ),
    )
    .unwrap();
    let options = LocalOptions {
        manifests: mdir,
        state: state.clone(),
        output: tmp.path().join("out"),
        keyring: test_keyring(),
    };
    let runner = LocalRunner::new(options, Engine::new()).unwrap();
    let report = runner.pass().await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let rows = status_rows(&LocalState::load(&state).unwrap(), jiff::Timestamp::now());
    let message = rows[0].message.clone().unwrap_or_default();
    assert!(
        message.contains("failed (IssueFailed)")
            && message.contains("no_such_table_for_status")
            && message.contains("attempt 1")
            && message.contains("next retry"),
        "{rows:?}"
    );
    assert!(format_table(&rows).contains("no_such_table_for_status"));
}

#[tokio::test]
async fn local_status_shows_a_rotation_that_keeps_failing_while_the_current_version_works() {
    let server = PostgresServer::shared().await;
    let tmp = tempfile::tempdir().unwrap();
    let options = local_options_with_lease(tmp.path(), server);
    let (mdir, state, out) = (
        options.manifests.clone(),
        options.state.clone(),
        options.output.clone(),
    );
    let clock = TestClock::new();
    let runner = LocalRunner::new(options, Engine::new().with_clock(clock.func())).unwrap();
    let report = runner.pass().await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let files = out.join("default/app");
    let (user1, pw1) = (read(&files.join("username")), read(&files.join("password")));
    assert!(server.connect_as(&user1, &pw1).await.is_ok());

    // A rotation is requested with a grant the database cannot give: every attempt fails.
    std::fs::write(
        mdir.join("lease.yaml"),
        lease_manifest(
            server,
            "app",
            Some("1"),
            &["SELECT ON no_such_table_for_rotation"],
        ),
    )
    .unwrap();
    for attempt in 1..=2u32 {
        let report = runner.pass().await.unwrap();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let now = clock.func()();
        let loaded = LocalState::load(&state).unwrap();
        let progress = loaded.leases["default/app"].progress.clone();
        assert_eq!(progress.verify_failures, attempt, "{progress:?}");
        let retry = progress.rotation_retry_at().unwrap();
        assert!(retry > now, "{retry} {now}");
        let rows = status_rows(&loaded, now);
        let row = &rows[0];
        assert_eq!(
            (row.version, row.username.as_deref()),
            (Some(1), Some(user1.as_str())),
            "v1 stays current: {row:?}"
        );
        let message = row.message.clone().unwrap_or_default();
        for want in [
            format!("rotation to version {} failed (IssueFailed)", attempt + 1),
            "no_such_table_for_rotation".to_owned(),
            format!("attempt {attempt}"),
            format!("next retry {}", retry.strftime("%Y-%m-%dT%H:%M:%SZ")),
        ] {
            assert!(message.contains(&want), "{want:?} missing: {row:?}");
        }
        assert!(format_table(&rows).contains("no_such_table_for_rotation"));
        // v1 is still delivered and still logs in.
        assert_eq!(read(&files.join("username")), user1);
        assert_eq!(read(&files.join("password")), pw1);
        assert!(
            server.connect_as(&user1, &pw1).await.is_ok(),
            "attempt {attempt}: v1 still logs in"
        );
        // Past the retry time the rotation is tried again.
        clock.advance(std::time::Duration::from_secs(
            (retry.as_second() - now.as_second() + 1).unsigned_abs(),
        ));
    }
}

fn certificate_manifests(dir: &Path, rotate: Option<&str>) {
    let annotations = rotate
        .map(|r| format!("  annotations:\n    leasehold.dev/rotate: \"{r}\"\n"))
        .unwrap_or_default();
    let text = format!(
        "apiVersion: leasehold.dev/v1alpha1
kind: RotationPolicy
metadata:
  name: p
spec:
  ttl: 1h
  revoke: {{gracePeriod: 0s, maxWait: 0s, waitForConsumers: false}}
---
apiVersion: leasehold.dev/v1alpha1
kind: Issuer
metadata:
  name: ca
spec:
  ca: {{selfSigned: true}}
---
apiVersion: leasehold.dev/v1alpha1
kind: SecretLease
metadata:
  name: web
{annotations}spec:
  policyRef: {{name: p}}
  certificate:
    issuerRef: {{name: ca}}
    commonName: web.default.svc
    dnsNames: [web.default.svc]
  delivery:
    secret: {{name: web-tls}}
"
    );
    std::fs::write(dir.join("all.yaml"), text).unwrap();
}

fn openssl_verify(ca: &Path, crl: &Path, leaf: &str, scratch: &Path) -> bool {
    let file = scratch.join("leaf.pem");
    std::fs::write(&file, leaf).unwrap();
    std::process::Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(ca)
        .arg("-crl_check")
        .arg("-CRLfile")
        .arg(crl)
        .arg(&file)
        .output()
        .unwrap()
        .status
        .success()
}

#[tokio::test]
async fn local_mode_rotates_a_certificate_and_publishes_the_revoked_serial() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    certificate_manifests(&dir, None);
    let options = LocalOptions {
        manifests: dir.clone(),
        state: tmp.path().join("state.json"),
        output: tmp.path().join("out"),
        keyring: test_keyring(),
    };
    let runner = LocalRunner::new(options.clone(), Engine::new()).unwrap();
    let report = runner.pass().await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let lease_dir = options.output.join("default/web");
    let issuer_dir = options.output.join("_issuers/default/ca");
    let first = read(&lease_dir.join("tls.crt"));
    let ca_first = read(&issuer_dir.join("ca.crt"));
    let mode = std::fs::metadata(lease_dir.join("tls.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o400, "the key is readable by its owner only");
    let state = read(&options.state);
    assert!(
        !state.contains("PRIVATE KEY") && !state.contains(&read(&lease_dir.join("tls.key"))),
        "the generated CA key and the certificate key are sealed in the state file"
    );
    assert!(state.contains("\"key\": \"lhenc1:"), "{state}");
    assert!(openssl_verify(
        &issuer_dir.join("ca.crt"),
        &issuer_dir.join("ca.crl"),
        &first,
        tmp.path()
    ));
    drop(runner);

    // A restarted runner keeps the generated root, rotates, and the old serial is in
    // the published CRL.
    certificate_manifests(&dir, Some("1"));
    let runner = LocalRunner::new(options.clone(), Engine::new()).unwrap();
    let report = runner.pass().await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    // The superseded certificate is revoked in the same pass (no grace period); the CRL
    // is published after the pass.
    let second = read(&lease_dir.join("tls.crt"));
    assert_ne!(first, second);
    assert_eq!(read(&issuer_dir.join("ca.crt")), ca_first, "the same root");
    assert!(!openssl_verify(
        &issuer_dir.join("ca.crt"),
        &issuer_dir.join("ca.crl"),
        &first,
        tmp.path()
    ));
    assert!(openssl_verify(
        &issuer_dir.join("ca.crt"),
        &issuer_dir.join("ca.crl"),
        &second,
        tmp.path()
    ));
    let state = LocalState::load(&options.state).unwrap();
    assert_eq!(state.leases["default/web"].progress.versions.len(), 1);
    let shown = format!("{state:?}");
    assert!(!shown.contains("PRIVATE KEY"), "{shown}");
}

fn pebble_serial(pem: &str) -> String {
    let der = leasehold_certs::first_certificate_der(pem).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    cert.raw_serial_as_string()
        .replace(':', "")
        .trim_start_matches('0')
        .to_lowercase()
}

#[tokio::test]
async fn local_mode_orders_rotates_and_revokes_at_an_acme_ca() {
    use leasehold_testkit::{PebbleOptions, PebbleServer};
    if !PebbleServer::available_for("local_mode_orders_rotates_and_revokes_at_an_acme_ca") {
        return;
    }
    let solver = std::sync::Arc::new(
        leasehold_acme::Http01Solver::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap(),
    );
    let pebble = PebbleServer::start(PebbleOptions {
        http_port: solver.local_addr().port(),
        ..PebbleOptions::default()
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let write = |rotate: Option<&str>| {
        let mut lease = serde_json::json!({
            "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease",
            "metadata": {"name": "web"},
            "spec": {"policyRef": {"name": "p"},
                     "certificate": {"issuerRef": {"name": "acme", "kind": "ClusterIssuer"},
                                     "commonName": "web.example", "dnsNames": ["web.example"]},
                     "delivery": {"secret": {"name": "web-tls"}}}
        });
        if let Some(r) = rotate {
            lease["metadata"]["annotations"] = serde_json::json!({"leasehold.dev/rotate": r});
        }
        let docs = [
            serde_json::json!({
                "apiVersion": "leasehold.dev/v1alpha1", "kind": "RotationPolicy",
                "metadata": {"name": "p"},
                "spec": {"ttl": "24h", "revoke": {"gracePeriod": "0s", "maxWait": "0s",
                                                  "waitForConsumers": false}}
            }),
            serde_json::json!({
                "apiVersion": "leasehold.dev/v1alpha1", "kind": "ClusterIssuer",
                "metadata": {"name": "acme"},
                "spec": {"acme": {"directoryUrl": pebble.directory_url(),
                                  "caBundle": pebble.ca_pem(),
                                  "accountKeySecretRef": {"name": "acme-account"}}}
            }),
            lease,
        ];
        let text: Vec<String> = docs
            .iter()
            .map(|d| serde_json::to_string(d).unwrap())
            .collect();
        std::fs::write(dir.join("all.yaml"), text.join("\n---\n")).unwrap();
    };
    write(None);
    let options = LocalOptions {
        manifests: dir.clone(),
        state: tmp.path().join("state.json"),
        output: tmp.path().join("out"),
        keyring: test_keyring(),
    };

    // Without a solver the issuer is refused with what to do.
    let runner = LocalRunner::new(options.clone(), Engine::new()).unwrap();
    let report = runner.pass().await.unwrap();
    assert!(
        report
            .errors
            .iter()
            .any(|(_, e)| e.contains("--acme-http01-addr")),
        "{:?}",
        report.errors
    );
    drop(runner);

    let runner = LocalRunner::new(options.clone(), Engine::new())
        .unwrap()
        .with_acme_solver(solver.clone());
    let report = runner.pass().await.unwrap();
    assert!(
        report.errors.is_empty(),
        "{:?}\n{}",
        report.errors,
        pebble.log_contents()
    );
    let lease_dir = options.output.join("default/web");
    let first = read(&lease_dir.join("tls.crt"));
    let first_serial = pebble_serial(&first);
    let state = read(&options.state);
    assert!(
        state.contains("\"acmeAccount\": \"lhenc1:") && !state.contains("PRIVATE KEY"),
        "the ACME account (its key inside) is sealed in the state file: {state}"
    );
    let (_, status) = pebble.cert_status_by_serial(&first_serial).await;
    assert!(status.contains("\"Valid\""), "{status}");

    write(Some("1"));
    let report = runner.pass().await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let second = read(&lease_dir.join("tls.crt"));
    assert_ne!(first, second);
    let (_, status) = pebble.cert_status_by_serial(&first_serial).await;
    assert!(status.contains("\"Revoked\""), "{status}");
    let (_, status) = pebble.cert_status_by_serial(&pebble_serial(&second)).await;
    assert!(status.contains("\"Valid\""), "{status}");
    // One account, registered once and kept.
    let registrations = pebble.log_contents().matches("POST /sign-me-up").count();
    assert_eq!(registrations, 1, "{}", pebble.log_contents());
}

/// A keyring with a fresh local key: every test run seals what the state file keeps.
fn test_keyring() -> std::sync::Arc<leasehold_envelope::Keyring> {
    std::sync::Arc::new(leasehold_envelope::Keyring::new(
        std::sync::Arc::new(leasehold_envelope::LocalKey::generate().unwrap()),
        vec![],
        leasehold_envelope::KeyringSettings::default(),
    ))
}
