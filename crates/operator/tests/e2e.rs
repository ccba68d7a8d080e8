#![allow(clippy::unwrap_used)]
//! End-to-end test against a real cluster (`KUBECONFIG`). Run through `e2e/run.sh`
//! (`make e2e`), which skips it loudly when there is no cluster.
//!
//! The controller runs in this process; the database is the PostgreSQL named by
//! `LEASEHOLD_E2E_PG_HOST`, `_PORT`, `_DATABASE`, `_ADMIN_USER`, `_ADMIN_PASSWORD`, or a
//! throwaway local one started by leasehold-testkit when those are not set.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use leasehold_api::{FIELD_MANAGER, ROTATE_ANNOTATION, SecretLease};
use leasehold_operator::{ControllerConfig, run_with_client};
use serde_json::{Value, json};

struct Database {
    host: String,
    port: u16,
    database: String,
    admin_user: String,
    admin_password: String,
    _local: Option<leasehold_testkit::PostgresServer>,
}

impl Database {
    async fn get() -> Self {
        let env = |k: &str| std::env::var(format!("LEASEHOLD_E2E_PG_{k}")).ok();
        if let Some(host) = env("HOST") {
            return Self {
                host,
                port: env("PORT").and_then(|p| p.parse().ok()).unwrap_or(5432),
                database: env("DATABASE").unwrap_or_else(|| "postgres".into()),
                admin_user: env("ADMIN_USER").unwrap_or_else(|| "postgres".into()),
                admin_password: env("ADMIN_PASSWORD").unwrap_or_default(),
                _local: None,
            };
        }
        use secrecy::ExposeSecret;
        let pg = leasehold_testkit::PostgresServer::start().await;
        Self {
            host: pg.host().into(),
            port: pg.port(),
            database: pg.database().into(),
            admin_user: pg.admin_user().into(),
            admin_password: pg.admin_password().expose_secret().to_string(),
            _local: Some(pg),
        }
    }

    async fn connect(
        &self,
        user: &str,
        password: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::Config::new()
            .host(&self.host)
            .port(self.port)
            .dbname(&self.database)
            .user(user)
            .password(password)
            .connect_timeout(Duration::from_secs(5))
            .connect(tokio_postgres::NoTls)
            .await?;
        tokio::spawn(conn);
        Ok(client)
    }

    async fn role_exists(&self, user: &str) -> bool {
        let admin = self
            .connect(&self.admin_user, &self.admin_password)
            .await
            .unwrap();
        !admin
            .query("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&user])
            .await
            .unwrap()
            .is_empty()
    }
}

fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn yaml_documents(path: &std::path::Path) -> Vec<Value> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(path).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

async fn install_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for entry in std::fs::read_dir(repo_root().join("crds")).unwrap() {
        let path = entry.unwrap().path();
        for doc in yaml_documents(&path) {
            let name = doc["metadata"]["name"].as_str().unwrap().to_string();
            api.patch(
                &name,
                &PatchParams::apply("leasehold-e2e").force(),
                &Patch::Apply(&doc),
            )
            .await
            .unwrap();
            eventually(Duration::from_secs(60), || async {
                let crd = api.get(&name).await.ok()?;
                crd.status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
            })
            .await;
        }
    }
}

/// Server-side dry-run of every example manifest in `ns`: they must pass the schema and CEL rules.
async fn dry_run_examples(client: &Client, ns: &str) {
    let pp = PatchParams::apply("leasehold-e2e").dry_run();
    for entry in std::fs::read_dir(repo_root().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        for mut doc in yaml_documents(&path) {
            doc["metadata"]["namespace"] = json!(ns);
            let name = doc["metadata"]["name"].as_str().unwrap().to_string();
            let gvk = kube::core::GroupVersionKind::try_from(&kube::core::TypeMeta {
                api_version: doc["apiVersion"].as_str().unwrap().into(),
                kind: doc["kind"].as_str().unwrap().into(),
            })
            .unwrap();
            let (ar, _) = kube::discovery::pinned_kind(client, &gvk).await.unwrap();
            let api: Api<kube::core::DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
            api.patch(&name, &pp, &Patch::Apply(&doc))
                .await
                .unwrap_or_else(|e| {
                    panic!("{}: {} {name} rejected: {e}", path.display(), gvk.kind)
                });
        }
    }
}

async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn secret_text(s: &Secret, key: &str) -> String {
    String::from_utf8(s.data.as_ref().unwrap()[key].0.clone()).unwrap()
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: run e2e/run.sh"]
async fn rotation_lifecycle_on_a_real_cluster() {
    let client = Client::try_default()
        .await
        .expect("KUBECONFIG must point at a cluster");
    install_crds(&client).await;
    let ns = format!(
        "leasehold-e2e-{}",
        leasehold_testkit::random_alphanumeric(6).to_lowercase()
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    let db = Database::get().await;

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(run_with_client(
        client.clone(),
        ControllerConfig {
            namespaces: vec![ns.clone()],
            metrics_addr: "127.0.0.1:0".parse().unwrap(),
            ..ControllerConfig::default()
        },
        async move {
            let _ = stop_rx.await;
        },
    ));

    let body = tokio::spawn(scenario(client.clone(), ns.clone(), db)).await;

    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), controller).await;
    // Leases still there would keep the namespace: drop their finalizers first.
    let leases: Api<SecretLease> = Api::namespaced(client.clone(), &ns);
    if let Ok(list) = leases.list(&Default::default()).await {
        for l in list {
            let name = l.metadata.name.unwrap_or_default();
            let _ = leases
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                )
                .await;
        }
    }
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    if let Err(e) = body {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn scenario(client: Client, ns: String, db: Database) {
    dry_run_examples(&client, &ns).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let leases: Api<SecretLease> = Api::namespaced(client.clone(), &ns);
    let ssa = PatchParams::apply("leasehold-e2e").force();
    secrets
        .patch(
            "pg-admin",
            &ssa,
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pg-admin"},
                "stringData": {"username": db.admin_user, "password": db.admin_password}
            })),
        )
        .await
        .unwrap();
    let policies: Api<leasehold_api::RotationPolicy> = Api::namespaced(client.clone(), &ns);
    policies
        .patch(
            "e2e",
            &ssa,
            &Patch::Apply(json!({
                "apiVersion": "leasehold.dev/v1alpha1", "kind": "RotationPolicy", "metadata": {"name": "e2e"},
                "spec": {"ttl": "1h", "revoke": {"gracePeriod": "0s", "maxWait": "5m", "drainSessions": {"mode": "Terminate", "timeout": "0s"}}}
            })),
        )
        .await
        .unwrap();
    leases
        .patch(
            "app-db",
            &ssa,
            &Patch::Apply(json!({
                "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease", "metadata": {"name": "app-db"},
                "spec": {
                    "policyRef": {"name": "e2e"},
                    "postgres": {"host": db.host, "port": db.port, "database": db.database,
                                 "adminSecretRef": {"name": "pg-admin"}, "tls": {"mode": "Disable"}},
                    "delivery": {"secret": {"name": "app-db-creds"}}
                }
            })),
        )
        .await
        .unwrap();

    // Ready with version 1, delivered, and the credential logs in.
    let status = eventually(Duration::from_secs(90), || async {
        let s = leases.get("app-db").await.ok()?.status?;
        let ready = leasehold_api::conditions::find(&s.conditions, "Ready")?.status == "True";
        (ready && s.current_version == Some(1)).then_some(s)
    })
    .await;
    let v1_user = status.current_username.clone().unwrap();
    let delivered = eventually(Duration::from_secs(30), || async {
        secrets.get_opt("app-db-creds").await.ok()?
    })
    .await;
    assert_eq!(secret_text(&delivered, "username"), v1_user);
    let v1_password = secret_text(&delivered, "password");
    db.connect(&v1_user, &v1_password)
        .await
        .expect("v1 logs in");
    assert!(
        delivered
            .metadata
            .owner_references
            .unwrap_or_default()
            .iter()
            .any(|o| o.kind == "SecretLease" && o.controller == Some(true))
    );
    let policy = policies.get("e2e").await.unwrap();
    assert_eq!(
        leasehold_api::conditions::find(&policy.status.unwrap_or_default().conditions, "Ready")
            .map(|c| c.reason.clone()),
        Some("Valid".to_string())
    );

    // Forced rotation: v2 delivered, v1 revoked.
    let mut annotations = BTreeMap::new();
    annotations.insert(ROTATE_ANNOTATION.to_string(), "e2e-1".to_string());
    leases
        .patch(
            "app-db",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": annotations}})),
        )
        .await
        .unwrap();
    let status = eventually(Duration::from_secs(120), || async {
        let s = leases.get("app-db").await.ok()?.status?;
        (s.current_version == Some(2) && s.progress.versions.len() == 1).then_some(s)
    })
    .await;
    let v2_user = status.current_username.clone().unwrap();
    assert_ne!(v1_user, v2_user);
    let delivered = eventually(Duration::from_secs(30), || async {
        let s = secrets.get("app-db-creds").await.ok()?;
        (secret_text(&s, "username") == v2_user).then_some(s)
    })
    .await;
    db.connect(&v2_user, &secret_text(&delivered, "password"))
        .await
        .expect("v2 logs in");
    assert!(
        db.connect(&v1_user, &v1_password).await.is_err(),
        "the old credential must stop working"
    );
    assert!(!db.role_exists(&v1_user).await);

    // Delete: every credential revoked, then the lease is gone.
    leases
        .delete("app-db", &DeleteParams::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(90), || async {
        leases.get_opt("app-db").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(
        !db.role_exists(&v2_user).await,
        "the last user is dropped on delete"
    );
    let _ = FIELD_MANAGER;
}
