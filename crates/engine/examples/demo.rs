//! `make demo`: leasehold's local mode rotating real credentials, with real logins.
//!
//! Starts a throwaway PostgreSQL (and MariaDB when installed), applies `examples/local/`
//! with host, port and admin password pointed at them, then shows that the old
//! credential works until the new one is verified and promoted, and is refused after
//! revocation. The state file is encrypted with a generated local key: the demo shows
//! its sealed `lhenc1:` values and checks that no password appears in it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use leasehold_engine::Engine;
use leasehold_engine::local::{LocalOptions, LocalRunner, LocalState, format_table, status_rows};
use leasehold_envelope::{Keyring, KeyringSettings, LocalKey};
use leasehold_testkit::{MariaDbServer, PostgresServer};
use mysql_async::prelude::Queryable;
use secrecy::ExposeSecret;
use serde::Deserialize;

enum Server {
    Pg(Box<PostgresServer>),
    Maria(Box<MariaDbServer>),
}

impl Server {
    async fn login(&self, user: &str, password: &str) -> Result<(), String> {
        match self {
            Server::Pg(s) => {
                let c = s.connect_as(user, password).await.map_err(|e| {
                    e.as_db_error().map_or_else(
                        || e.to_string(),
                        |d| format!("{}: {}", d.code().code(), d.message()),
                    )
                })?;
                c.simple_query("SELECT 1")
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            Server::Maria(s) => {
                let mut c = s
                    .connect_as(user, password)
                    .await
                    .map_err(|e| e.to_string())?;
                c.query_drop("SELECT 1").await.map_err(|e| e.to_string())?;
                c.disconnect().await.map_err(|e| e.to_string())
            }
        }
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Copy `examples/local/FILE` to `dir`, pointing it at `(port, admin password)`.
fn stage(file: &str, dir: &Path, port: u16, admin_password: &str) {
    let text = std::fs::read_to_string(repo_root().join("examples/local").join(file)).unwrap();
    let mut out = String::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let mut v = serde_json::Value::deserialize(doc).unwrap();
        match v["kind"].as_str() {
            Some("Secret") => v["stringData"]["password"] = admin_password.into(),
            Some("SecretLease") => {
                for backend in ["postgres", "mysql"] {
                    if v["spec"][backend].is_object() {
                        v["spec"][backend]["port"] = port.into();
                    }
                }
            }
            _ => {}
        }
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(&v).unwrap());
    }
    std::fs::write(dir.join(file), out).unwrap();
}

fn set_rotate_annotation(dir: &Path, file: &str, value: &str) {
    let text = std::fs::read_to_string(dir.join(file)).unwrap();
    let mut out = String::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let mut v = serde_json::Value::deserialize(doc).unwrap();
        if v["kind"] == "SecretLease" {
            v["metadata"]["annotations"] = serde_json::json!({ "leasehold.dev/rotate": value });
        }
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(&v).unwrap());
    }
    std::fs::write(dir.join(file), out).unwrap();
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap()
}

/// `openssl verify` of `leaf` against the demo issuer's CA, with its CRL when `crl`.
fn openssl_verify(out: &Path, leaf: &str, crl: bool) -> Result<(), String> {
    let issuer = out.join("_issuers/default/demo-ca");
    let leaf_file = out.join("leaf-under-test.pem");
    std::fs::write(&leaf_file, leaf).unwrap();
    let mut cmd = std::process::Command::new("openssl");
    cmd.arg("verify").arg("-CAfile").arg(issuer.join("ca.crt"));
    if crl {
        cmd.arg("-crl_check")
            .arg("-CRLfile")
            .arg(issuer.join("ca.crl"));
    }
    let result = cmd.arg(&leaf_file).output().map_err(|e| e.to_string())?;
    if result.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&result.stdout).trim().to_string()
            + String::from_utf8_lossy(&result.stderr).trim())
    }
}

fn cert_mark(r: &Result<(), String>) -> String {
    match r {
        Ok(()) => "openssl verify OK".to_string(),
        Err(e) => {
            let why = e
                .lines()
                .find(|l| l.contains("error"))
                .unwrap_or_else(|| e.lines().next().unwrap_or_default());
            format!("REFUSED ({why})")
        }
    }
}

fn mark(r: &Result<(), String>) -> String {
    match r {
        Ok(()) => "login OK".to_string(),
        Err(e) => format!("login REFUSED ({})", e.lines().next().unwrap_or_default()),
    }
}

#[tokio::main]
async fn main() {
    println!("== leasehold demo: verify-then-revoke on real databases (local mode) ==\n");
    let tmp = tempfile::tempdir().unwrap();
    let manifests = tmp.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();

    let mut servers: Vec<(String, &str, Server)> = Vec::new();
    let pg = PostgresServer::start().await;
    println!("started a throwaway PostgreSQL on 127.0.0.1:{}", pg.port());
    stage("policy.yaml", &manifests, 0, "");
    stage(
        "postgres.yaml",
        &manifests,
        pg.port(),
        pg.admin_password().expose_secret(),
    );
    servers.push((
        "default/app-postgres".into(),
        "postgres.yaml",
        Server::Pg(Box::new(pg)),
    ));
    let mariadb_installed =
        Path::new("/usr/sbin/mariadbd").exists() || Path::new("/usr/bin/mariadbd").exists();
    if mariadb_installed {
        let maria = MariaDbServer::start().await;
        println!("started a throwaway MariaDB on 127.0.0.1:{}", maria.port());
        stage(
            "mariadb.yaml",
            &manifests,
            maria.port(),
            maria.admin_password().expose_secret(),
        );
        servers.push((
            "default/app-mariadb".into(),
            "mariadb.yaml",
            Server::Maria(Box::new(maria)),
        ));
    } else {
        println!("MariaDB is not installed: showing PostgreSQL only");
    }

    stage("certificate.yaml", &manifests, 0, "");
    println!("staged a certificate lease from a self-signed `ca` Issuer");

    // The key `leasehold local run --key-file state.key --generate-key` would create.
    let key = LocalKey::generate().unwrap();
    println!(
        "state file encrypted with a generated local key ({})",
        leasehold_envelope::KeyEncryptionKey::key_id(&key)
    );
    let options = LocalOptions {
        manifests: manifests.clone(),
        state: tmp.path().join("state.json"),
        output: tmp.path().join("out"),
        keyring: Arc::new(Keyring::new(
            Arc::new(key),
            vec![],
            KeyringSettings::default(),
        )),
    };
    println!(
        "manifests from examples/local/ staged in {}",
        manifests.display()
    );
    println!(
        "credentials are written to {}/<namespace>/<lease>/\n",
        options.output.display()
    );
    let runner = LocalRunner::new(options.clone(), Engine::new()).unwrap();
    let show = || {
        let state = LocalState::load(&options.state).unwrap();
        print!(
            "{}",
            format_table(&status_rows(&state, jiff::Timestamp::now()))
        );
    };

    println!("-- 1. first pass: issue, verify (a real login as the new user), promote, deliver");
    let report = runner.pass().await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    show();
    let mut old = Vec::new();
    for (lease, _, server) in &servers {
        let dir = options.output.join(lease);
        let (user, pw) = (read(&dir, "username"), read(&dir, "password"));
        println!(
            "   {lease}: {user} → {}",
            mark(&server.login(&user, &pw).await)
        );
        old.push((user, pw));
    }
    let cert_dir = options.output.join("default/app-certificate");
    let old_cert = read(&cert_dir, "tls.crt");
    println!(
        "   default/app-certificate: tls.crt (verified with a TLS handshake before delivery) → {}",
        cert_mark(&openssl_verify(&options.output, &old_cert, true))
    );

    println!("\n-- 2. request a rotation (annotation leasehold.dev/rotate) and run a pass");
    for (_, file, _) in &servers {
        set_rotate_annotation(&manifests, file, "demo-1");
    }
    set_rotate_annotation(&manifests, "certificate.yaml", "demo-1");
    runner.pass().await.unwrap();
    show();
    for ((lease, _, server), (old_user, old_pw)) in servers.iter().zip(&old) {
        let dir = options.output.join(lease);
        let (user, pw) = (read(&dir, "username"), read(&dir, "password"));
        println!(
            "   {lease}: new {user} (verified before promotion) → {}",
            mark(&server.login(&user, &pw).await)
        );
        println!(
            "   {lease}: old {old_user} during the 5s grace period → {}",
            mark(&server.login(old_user, old_pw).await)
        );
    }

    println!("\n-- 3. after the grace period the next pass revokes the old credential");
    loop {
        let report = runner.pass().await.unwrap();
        let state = LocalState::load(&options.state).unwrap();
        if state
            .leases
            .values()
            .all(|l| l.progress.versions.len() == 1)
        {
            break;
        }
        let wait = report
            .next_wake
            .map(|t| {
                (t.as_millisecond() - jiff::Timestamp::now().as_millisecond()).clamp(100, 10_000)
            })
            .unwrap_or(1000);
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
    show();
    let mut ok = true;
    for ((lease, _, server), (old_user, old_pw)) in servers.iter().zip(&old) {
        let dir = options.output.join(lease);
        let (user, pw) = (read(&dir, "username"), read(&dir, "password"));
        let new = server.login(&user, &pw).await;
        let revoked = server.login(old_user, old_pw).await;
        println!("   {lease}: old {old_user} → {}", mark(&revoked));
        println!("   {lease}: new {user} → {}", mark(&new));
        ok &= new.is_ok() && revoked.is_err();
    }
    let new_cert = read(&cert_dir, "tls.crt");
    let revoked = openssl_verify(&options.output, &old_cert, true);
    let new = openssl_verify(&options.output, &new_cert, true);
    println!(
        "   default/app-certificate: old certificate against the published CRL → {}",
        cert_mark(&revoked)
    );
    println!(
        "   default/app-certificate: new certificate against the published CRL → {}",
        cert_mark(&new)
    );
    ok &= new.is_ok() && revoked.is_err() && new_cert != old_cert;

    println!("\n-- 4. the state file at rest: secrets sealed with the local key");
    let text = std::fs::read_to_string(&options.state).unwrap();
    for line in text.lines().filter(|l| l.contains("lhenc1:")).take(3) {
        let line = line.trim();
        let cut = line.char_indices().nth(72).map_or(line.len(), |(i, _)| i);
        println!("   {}…", &line[..cut]);
    }
    let sealed = text.matches("\"lhenc1:").count();
    let mut leaked = Vec::new();
    for ((lease, _, _), (_, old_pw)) in servers.iter().zip(&old) {
        let pw = read(&options.output.join(lease), "password");
        if text.contains(&pw) {
            leaked.push(format!("{lease} (current)"));
        }
        if text.contains(old_pw.as_str()) {
            leaked.push(format!("{lease} (revoked)"));
        }
    }
    let ca_key_in_clear = text.contains("PRIVATE KEY");
    println!(
        "   {sealed} sealed values; passwords in the state file: {}; CA private key in the clear: {}",
        if leaked.is_empty() { "none" } else { "FOUND" },
        if ca_key_in_clear { "FOUND" } else { "no" }
    );
    assert!(sealed > 0, "the state file holds sealed values");
    assert!(leaked.is_empty(), "passwords in the state file: {leaked:?}");
    assert!(!ca_key_in_clear, "the CA key is sealed");
    for (lease, _, server) in &servers {
        let dir = options.output.join(lease);
        let (user, pw) = (read(&dir, "username"), read(&dir, "password"));
        let login = server.login(&user, &pw).await;
        println!(
            "   {lease}: delivered credential files still log in → {}",
            mark(&login)
        );
        ok &= login.is_ok();
    }
    println!(
        "\n{}",
        if ok {
            "demo OK: no moment without a working credential; the old one was refused only after the new one was verified."
        } else {
            "demo FAILED"
        }
    );
    if !ok {
        std::process::exit(1);
    }
}
