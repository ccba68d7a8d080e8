#![allow(clippy::unwrap_used)]
//! End-to-end test of an installed leasehold against the real cluster in `KUBECONFIG`
//! (the kit in `../shared/kube/`, kind, or a real cluster). Run through `e2e/run.sh`
//! (`make e2e`), which renders the chart with a real Helm engine first.
//!
//! Installed as a user would: CRDs from `crds/`, then every object of the rendered chart
//! applied server-side, except the controller Deployment and the node DaemonSet, whose
//! containers cannot run here. In their place the `leasehold` binary runs as processes
//! on this machine, **authenticated as the chart's ServiceAccounts** (token kubeconfigs
//! from the TokenRequest API), so the chart's RBAC is what the API server enforces. The
//! test makes the CSI calls the kubelet would, with real pod-bound tokens. Any 403 from
//! the API server in the controller's or node driver's log fails the run.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use leasehold_api::{ROTATE_ANNOTATION, SecretLease, SecretLeaseStatus};
use leasehold_proto::csi::v1 as csi;
use serde_json::{Value, json};
use tonic::Code;

const RELEASE: &str = "lh";
const FULLNAME: &str = "lh-leasehold";
const MANAGER: &str = "leasehold-e2e";
/// Not the defaults: the chart is installed with `csi.tokenAudience` and
/// `broker.tokenAudience` set, so every CSI scenario shows that one chart value each
/// configures the CSIDriver, the node driver and the broker alike.
const POD_AUDIENCE: &str = "csi.e2e.leasehold.test";
const BROKER_AUDIENCE: &str = "broker.e2e.leasehold.test";
const FS_GROUP: u32 = 2000;

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn yaml_documents(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// Polls `f` every 250 ms until it returns `Some`, or fails naming `what`.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        fail_on_forbidden();
        assert!(
            Instant::now() < deadline,
            "e2e: {what}: not within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn random_suffix() -> String {
    leasehold_testkit::random_alphanumeric(6).to_lowercase()
}

/// Replaces the value of `--flag value` in an argv list (adds it when absent).
fn set_arg(args: &mut Vec<String>, flag: &str, value: &str) {
    match args.iter().position(|a| a == flag) {
        Some(i) => args[i + 1] = value.to_owned(),
        None => {
            args.push(flag.to_owned());
            args.push(value.to_owned());
        }
    }
}

/// Whether the suite runs with the chart's `rbac.writeNamespaces` mode
/// (`LEASEHOLD_E2E_WRITE_NAMESPACES=1`; `make e2e` runs it as a second pass).
fn write_namespaces_mode() -> bool {
    std::env::var("LEASEHOLD_E2E_WRITE_NAMESPACES").as_deref() == Ok("1")
}

/// The image of the test's pods. Nothing runs it on the kit (kwok); on a cluster with
/// real kubelets set `LEASEHOLD_E2E_IMAGE` to one its nodes can pull and run (a pause image).
fn image() -> String {
    std::env::var("LEASEHOLD_E2E_IMAGE").unwrap_or_else(|_| "registry.invalid/app:1".into())
}

/// The two nodes the placement scenarios use (`LEASEHOLD_E2E_NODES`, default the kit's).
fn nodes() -> (String, String) {
    let names = std::env::var("LEASEHOLD_E2E_NODES").unwrap_or_else(|_| "node-a node-b".into());
    let mut it = names.split_whitespace().map(str::to_owned);
    match (it.next(), it.next()) {
        (Some(a), Some(b)) => (a, b),
        _ => panic!("LEASEHOLD_E2E_NODES must name two nodes"),
    }
}

fn node_a() -> String {
    nodes().0
}

fn node_b() -> String {
    nodes().1
}

fn step(name: &str) {
    eprintln!("\n==== e2e: {name}");
}

// ---------------------------------------------------------------------------
// The database
// ---------------------------------------------------------------------------

/// A throwaway PostgreSQL on loopback (the controller runs on this machine too).
struct Database {
    server: leasehold_testkit::PostgresServer,
}

impl Database {
    async fn start() -> Self {
        Self {
            server: leasehold_testkit::PostgresServer::start().await,
        }
    }

    fn admin_password(&self) -> String {
        use secrecy::ExposeSecret;
        self.server.admin_password().expose_secret().to_owned()
    }

    async fn connect(&self, user: &str, password: &str) -> Result<(), tokio_postgres::Error> {
        let (client, conn) = self
            .server
            .config_for(user, password)
            .connect_timeout(Duration::from_secs(5))
            .connect(tokio_postgres::NoTls)
            .await?;
        let task = tokio::spawn(conn);
        client.simple_query("SELECT 1").await?;
        drop(client);
        let _ = task.await;
        Ok(())
    }

    async fn role_exists(&self, user: &str) -> bool {
        let admin = self.server.admin_client().await;
        !admin
            .query("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&user])
            .await
            .unwrap()
            .is_empty()
    }
}

// ---------------------------------------------------------------------------
// leasehold processes
// ---------------------------------------------------------------------------

/// A `leasehold` process with its log in a file.
struct Process {
    name: String,
    child: Option<tokio::process::Child>,
    log: PathBuf,
}

impl Process {
    fn spawn(
        name: &str,
        args: &[String],
        kubeconfig: &Path,
        log: PathBuf,
        env: &[(&str, &str)],
    ) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        PROCESS_LOGS.lock().unwrap().push(log.clone());
        eprintln!("e2e: starting {name}: leasehold {}", args.join(" "));
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_leasehold"));
        cmd.args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("LEASEHOLD_LOG", "info,leasehold=debug,kube=info")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .env_remove("NODE_NAME")
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self {
            name: name.to_owned(),
            child: Some(cmd.spawn().unwrap()),
            log,
        }
    }

    /// Kills the process at once (SIGKILL): a crash, not a shutdown.
    async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// SIGTERM, then waits for a clean exit.
    async fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = c.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
            if tokio::time::timeout(Duration::from_secs(20), c.wait())
                .await
                .is_err()
            {
                let _ = c.start_kill();
                let _ = c.wait().await;
            }
        }
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to the process.
    fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .and_then(|c| c.id())
            .unwrap_or_else(|| panic!("{} is not running", self.name));
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {}", self.name);
    }

    /// Waits (bounded) for the process to exit by itself; `None` if it still runs.
    async fn exited_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let c = self.child.as_mut()?;
        let status = tokio::time::timeout(timeout, c.wait()).await.ok()?.ok()?;
        self.child = None;
        Some(status)
    }

    fn assert_running(&mut self) {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            panic!(
                "e2e: {} exited ({status}); log:\n{}",
                self.name,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// Logs of the processes started so far, checked for 403s while the test waits.
static PROCESS_LOGS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Fails at once, naming the request, when a process logged a 403: waiting out a
/// timeout would only hide the missing RBAC verb.
fn fail_on_forbidden() {
    let logs = PROCESS_LOGS.lock().unwrap().clone();
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = forbidden_lines(&text).first() {
            panic!(
                "e2e: {} logged a 403 from the API server (a verb missing from the chart's RBAC):\n{line}",
                log.display()
            );
        }
    }
}

/// Lines where the API server refused a request (403): a verb missing from the chart.
fn forbidden_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| {
            let lower = l.to_ascii_lowercase();
            lower.contains("forbidden") || l.contains("code: 403") || l.contains("\"code\":403")
        })
        .map(|l| l.chars().take(600).collect())
        .collect()
}

// ---------------------------------------------------------------------------
// The cluster side: install, accounts, pods, tokens
// ---------------------------------------------------------------------------

struct Cluster {
    client: Client,
    server: String,
    ca_data: String,
    work: PathBuf,
    system_ns: String,
    app_ns: String,
    chart: Vec<Value>,
}

impl Cluster {
    async fn connect() -> Self {
        let client = Client::try_default()
            .await
            .expect("KUBECONFIG must point at a cluster");
        let kubeconfig = kube::config::Kubeconfig::read().unwrap();
        let context_name = kubeconfig.current_context.clone().unwrap();
        let context = kubeconfig
            .contexts
            .iter()
            .find(|c| c.name == context_name)
            .and_then(|c| c.context.clone())
            .unwrap();
        let cluster = kubeconfig
            .clusters
            .iter()
            .find(|c| c.name == context.cluster)
            .and_then(|c| c.cluster.clone())
            .unwrap();
        let ca_data = match (
            &cluster.certificate_authority_data,
            &cluster.certificate_authority,
        ) {
            (Some(data), _) => data.clone(),
            (None, Some(file)) => {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.encode(std::fs::read(file).unwrap())
            }
            (None, None) => panic!("the cluster in KUBECONFIG has no CA"),
        };
        let suffix = random_suffix();
        Self {
            client,
            server: cluster.server.clone().unwrap(),
            ca_data,
            work: {
                let dir = std::env::temp_dir().join(format!("leasehold-e2e-{suffix}"));
                std::fs::create_dir_all(&dir).unwrap();
                dir
            },
            system_ns: format!("lh-system-{suffix}"),
            app_ns: format!("lh-app-{suffix}"),
            chart: Vec::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }

    async fn create_namespace(&self, name: &str) {
        Api::<Namespace>::all(self.client.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
            )
            .await
            .unwrap();
    }

    async fn install_crds(&self) {
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        for entry in std::fs::read_dir(repo_root().join("crds")).unwrap() {
            let path = entry.unwrap().path();
            for doc in yaml_documents(&std::fs::read_to_string(&path).unwrap()) {
                let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
                api.patch(
                    &name,
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&doc),
                )
                .await
                .unwrap();
                eventually(
                    &format!("CRD {name} established"),
                    Duration::from_secs(60),
                    || async {
                        let crd = api.get(&name).await.ok()?;
                        crd.status?
                            .conditions?
                            .iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                            .then_some(())
                    },
                )
                .await;
            }
        }
    }

    /// The chart values the suite installs with: non-default token audiences, and with
    /// `LEASEHOLD_E2E_WRITE_NAMESPACES=1` the least-privilege RBAC mode
    /// (`rbac.writeNamespaces`: writes bound to the app namespace alone).
    fn chart_values(&self) -> Value {
        let mut values = json!({
            "csi": {"tokenAudience": POD_AUDIENCE},
            "broker": {"tokenAudience": BROKER_AUDIENCE},
        });
        if write_namespaces_mode() {
            values["rbac"] = json!({"writeNamespaces": [self.app_ns]});
        }
        values
    }

    /// Renders the chart with the real Helm engine (`e2e/render_chart.py`) for the
    /// system namespace and applies every object but the workloads that need an image.
    async fn install_chart(&mut self) {
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let out = std::process::Command::new(python)
            .arg(repo_root().join("e2e/render_chart.py"))
            .args([RELEASE, &self.system_ns])
            .arg(self.chart_values().to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rendering the chart failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.chart = yaml_documents(&String::from_utf8(out.stdout).unwrap());
        let mut applied = Vec::new();
        for mut doc in self.chart.clone() {
            let kind = doc["kind"].as_str().unwrap().to_owned();
            let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
            if matches!(kind.as_str(), "Deployment" | "DaemonSet") {
                // Their containers cannot run here: the binary runs as processes instead.
                continue;
            }
            let gvk = kube::core::GroupVersionKind::try_from(&kube::core::TypeMeta {
                api_version: doc["apiVersion"].as_str().unwrap().into(),
                kind: kind.clone(),
            })
            .unwrap();
            let (ar, caps) = kube::discovery::pinned_kind(&self.client, &gvk)
                .await
                .unwrap();
            let api: Api<kube::core::DynamicObject> =
                if caps.scope == kube::discovery::Scope::Namespaced {
                    // Where the chart put it (RoleBindings of rbac.writeNamespaces live in
                    // the workloads' namespaces), else the release namespace.
                    let ns = doc["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or(&self.system_ns)
                        .to_owned();
                    doc["metadata"]["namespace"] = json!(ns);
                    Api::namespaced_with(self.client.clone(), &ns, &ar)
                } else {
                    Api::all_with(self.client.clone(), &ar)
                };
            api.patch(
                &name,
                &PatchParams::apply("helm").force(),
                &Patch::Apply(&doc),
            )
            .await
            .unwrap_or_else(|e| panic!("applying {kind}/{name} from the chart: {e}"));
            applied.push(format!("{kind}/{name}"));
        }
        eprintln!("e2e: chart objects applied: {}", applied.join(", "));
    }

    /// Server-side dry-run of every manifest in `examples/`: schema and CEL rules accept them.
    async fn dry_run_examples(&self) {
        let pp = PatchParams::apply(MANAGER).dry_run();
        let mut count = 0;
        for entry in std::fs::read_dir(repo_root().join("examples")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            for mut doc in yaml_documents(&std::fs::read_to_string(&path).unwrap()) {
                let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
                let gvk = kube::core::GroupVersionKind::try_from(&kube::core::TypeMeta {
                    api_version: doc["apiVersion"].as_str().unwrap().into(),
                    kind: doc["kind"].as_str().unwrap().into(),
                })
                .unwrap();
                let (ar, caps) = kube::discovery::pinned_kind(&self.client, &gvk)
                    .await
                    .unwrap();
                let api: Api<kube::core::DynamicObject> =
                    if caps.scope == kube::discovery::Scope::Cluster {
                        Api::all_with(self.client.clone(), &ar)
                    } else {
                        doc["metadata"]["namespace"] = json!(self.app_ns);
                        Api::namespaced_with(self.client.clone(), &self.app_ns, &ar)
                    };
                api.patch(&name, &pp, &Patch::Apply(&doc))
                    .await
                    .unwrap_or_else(|e| {
                        panic!("{}: {} {name} rejected: {e}", path.display(), gvk.kind)
                    });
                count += 1;
            }
        }
        eprintln!("e2e: {count} example objects accepted by a server-side dry run");
    }

    fn chart_container_args(&self, kind: &str, container: &str) -> Vec<String> {
        let workload = self
            .chart
            .iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("the chart renders no {kind}"));
        let containers = workload["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        let c = containers
            .iter()
            .find(|c| c["name"] == container)
            .unwrap_or_else(|| panic!("{kind} has no container {container}"));
        c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect()
    }

    async fn create_service_account(&self, ns: &str, name: &str) {
        Api::<ServiceAccount>::namespaced(self.client.clone(), ns)
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
            )
            .await
            .unwrap();
    }

    /// A pod the kwok kubelet runs at once on `node`.
    async fn run_pod(
        &self,
        ns: &str,
        name: &str,
        service_account: &str,
        node: &str,
        lease: Option<&str>,
    ) -> Pod {
        let mut spec = json!({
            "serviceAccountName": service_account,
            "nodeName": node,
            "automountServiceAccountToken": false,
            "securityContext": {"fsGroup": FS_GROUP},
            "containers": [{"name": "app", "image": image()}]
        });
        if let Some(lease) = lease {
            spec["volumes"] = json!([{"name": "creds", "csi": {
                "driver": "csi.leasehold.dev", "readOnly": true,
                "volumeAttributes": {"lease": lease}
            }}]);
        }
        let api = Api::<Pod>::namespaced(self.client.clone(), ns);
        api.create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": name, "labels": {"e2e": "true"}}, "spec": spec}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
        eventually(
            &format!("pod {ns}/{name} running"),
            Duration::from_secs(60),
            || async {
                let pod = api.get(name).await.ok()?;
                (pod.status.as_ref()?.phase.as_deref() == Some("Running")).then_some(pod)
            },
        )
        .await
    }

    /// A token from the TokenRequest API, as the kubelet would ask for it.
    async fn token(
        &self,
        ns: &str,
        service_account: &str,
        audience: &str,
        bound: Option<&Pod>,
    ) -> String {
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                // None: the API server's own audience (a token it accepts as a credential).
                audiences: (!audience.is_empty()).then(|| vec![audience.to_owned()]),
                expiration_seconds: Some(3600),
                bound_object_ref: bound.map(|p| BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(p.name_any()),
                    uid: p.uid(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        Api::<ServiceAccount>::namespaced(self.client.clone(), ns)
            .create_token_request(service_account, &PostParams::default(), &request)
            .await
            .unwrap()
            .status
            .unwrap()
            .token
            .unwrap()
    }

    /// A kubeconfig that authenticates as `service_account` of the system namespace.
    async fn service_account_kubeconfig(
        &self,
        service_account: &str,
        bound: Option<&Pod>,
    ) -> PathBuf {
        let token = self
            .token(&self.system_ns, service_account, "", bound)
            .await;
        let config = json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "e2e", "cluster": {"server": self.server, "certificate-authority-data": self.ca_data}}],
            "users": [{"name": service_account, "user": {"token": token}}],
            "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": service_account}}],
            "current-context": "e2e"
        });
        let file = match bound.and_then(|p| p.metadata.name.as_deref()) {
            Some(pod) => format!("{service_account}-{pod}.kubeconfig"),
            None => format!("{service_account}.kubeconfig"),
        };
        let path = self.path(&file);
        std::fs::write(&path, serde_norway::to_string(&config).unwrap()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    fn leases(&self) -> Api<SecretLease> {
        Api::namespaced(self.client.clone(), &self.app_ns)
    }

    async fn status(&self, lease: &str) -> Option<SecretLeaseStatus> {
        self.leases().get(lease).await.ok()?.status
    }

    async fn apply(&self, doc: Value) {
        let gvk = kube::core::GroupVersionKind::try_from(&kube::core::TypeMeta {
            api_version: doc["apiVersion"].as_str().unwrap().into(),
            kind: doc["kind"].as_str().unwrap().into(),
        })
        .unwrap();
        let (ar, _) = kube::discovery::pinned_kind(&self.client, &gvk)
            .await
            .unwrap();
        let api: Api<kube::core::DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.app_ns, &ar);
        let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
        api.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&doc),
        )
        .await
        .unwrap_or_else(|e| panic!("applying {} {name}: {e}", gvk.kind));
    }

    /// Who holds the controller's leader-election Lease.
    async fn leader_identity(&self) -> Option<String> {
        Api::<Lease>::namespaced(self.client.clone(), &self.system_ns)
            .get_opt(&format!("{FULLNAME}-controller"))
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
    }

    /// Applies a lease under the `slow-drain` policy (20 s grace period), waits for v1,
    /// requests a rotation and waits until v2 is promoted while v1 drains. Returns v1's
    /// user.
    async fn rotation_left_draining(&self, postgres: Value, lease: &str) -> String {
        self.apply(json!({
            "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease", "metadata": {"name": lease},
            "spec": {"policyRef": {"name": "slow-drain"}, "postgres": postgres,
                     "delivery": {"secret": {"name": format!("{lease}-creds")}}}
        }))
        .await;
        let v1 = self
            .wait_ready_version(lease, 1)
            .await
            .current_username
            .unwrap();
        self.request_rotation(lease, "e2e-drain").await;
        eventually(
            "v2 promoted, v1 draining",
            Duration::from_secs(60),
            || async {
                let s = self.status(lease).await?;
                (s.current_version == Some(2) && s.progress.versions.len() == 2).then_some(())
            },
        )
        .await;
        v1
    }

    /// Waits until the lease's rotation has finished: v2 current and nothing else left.
    async fn wait_rotation_finished(&self, lease: &str, what: &str) {
        eventually(what, Duration::from_secs(120), || async {
            let s = self.status(lease).await?;
            (s.current_version == Some(2) && s.progress.versions.len() == 1).then_some(())
        })
        .await;
    }

    /// Waits until the lease is gone (its finalizer removed).
    async fn wait_lease_gone(&self, lease: &str, timeout: Duration) {
        eventually(&format!("lease {lease} gone"), timeout, || async {
            self.leases()
                .get_opt(lease)
                .await
                .ok()?
                .is_none()
                .then_some(())
        })
        .await;
    }

    async fn request_rotation(&self, lease: &str, value: &str) {
        let mut annotations = BTreeMap::new();
        annotations.insert(ROTATE_ANNOTATION.to_owned(), value.to_owned());
        self.leases()
            .patch(
                lease,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": annotations}})),
            )
            .await
            .unwrap();
    }

    async fn wait_ready_version(&self, lease: &str, version: u64) -> SecretLeaseStatus {
        eventually(
            &format!("lease {lease} Ready at version {version}"),
            Duration::from_secs(120),
            || async {
                let s = self.status(lease).await?;
                let ready =
                    leasehold_api::conditions::find(&s.conditions, "Ready")?.status == "True";
                (ready && s.current_version == Some(version)).then_some(s)
            },
        )
        .await
    }

    /// `kubectl get sl`: the printer columns as the API server renders them.
    async fn lease_table(&self) -> Value {
        let request = http::Request::get(format!(
            "/apis/leasehold.dev/v1alpha1/namespaces/{}/secretleases",
            self.app_ns
        ))
        .header(
            http::header::ACCEPT,
            "application/json;as=Table;v=v1;g=meta.k8s.io",
        )
        .body(Vec::new())
        .unwrap();
        serde_json::from_str(&self.client.request_text(request).await.unwrap()).unwrap()
    }

    async fn event_reasons(&self, lease: &str) -> Vec<String> {
        Api::<Event>::namespaced(self.client.clone(), &self.app_ns)
            .list(&ListParams::default().fields(&format!("involvedObject.name={lease}")))
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|e| e.reason)
            .collect()
    }
}

// ---------------------------------------------------------------------------
// The kubelet side: CSI calls over the node driver's socket
// ---------------------------------------------------------------------------

struct Kubelet {
    node: csi::node_client::NodeClient<tonic::transport::Channel>,
    identity: csi::identity_client::IdentityClient<tonic::transport::Channel>,
    root: PathBuf,
}

impl Kubelet {
    async fn connect(socket: &Path, root: &Path) -> Self {
        let path = socket.to_path_buf();
        // grpc-go (the kubelet) sends `:authority localhost` over a Unix socket.
        let channel = tonic::transport::Endpoint::try_from("http://localhost")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .unwrap();
        Self {
            node: csi::node_client::NodeClient::new(channel.clone()),
            identity: csi::identity_client::IdentityClient::new(channel),
            root: root.to_path_buf(),
        }
    }

    /// The kubelet's target path for an inline CSI volume of `pod`.
    fn target(&self, pod: &Pod, volume: &str) -> PathBuf {
        let dir = self
            .root
            .join("pods")
            .join(pod.uid().unwrap())
            .join("volumes/kubernetes.io~csi")
            .join(volume);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("mount")
    }

    fn volume_id(pod: &Pod, volume: &str) -> String {
        // The kubelet's ephemeral volume handle: "csi-" + sha256(podUID + volume name).
        use sha2::Digest;
        let digest = sha2::Sha256::digest(format!("{}{volume}", pod.uid().unwrap()));
        format!("csi-{}", hex(&digest))
    }

    /// NodePublishVolume as the kubelet sends it for an inline ephemeral volume
    /// (podInfoOnMount, tokenRequests, volume_mount_group = fsGroup).
    fn publish_request(
        &self,
        pod: &Pod,
        service_account: &str,
        lease: &str,
        audience_tokens: Value,
    ) -> csi::NodePublishVolumeRequest {
        use csi::volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode};
        let mut ctx = HashMap::new();
        ctx.insert("csi.storage.k8s.io/pod.name".to_owned(), pod.name_any());
        ctx.insert(
            "csi.storage.k8s.io/pod.namespace".to_owned(),
            pod.namespace().unwrap(),
        );
        ctx.insert("csi.storage.k8s.io/pod.uid".to_owned(), pod.uid().unwrap());
        ctx.insert(
            "csi.storage.k8s.io/serviceAccount.name".to_owned(),
            service_account.to_owned(),
        );
        ctx.insert("csi.storage.k8s.io/ephemeral".to_owned(), "true".to_owned());
        ctx.insert(
            "csi.storage.k8s.io/serviceAccount.tokens".to_owned(),
            audience_tokens.to_string(),
        );
        ctx.insert("lease".to_owned(), lease.to_owned());
        csi::NodePublishVolumeRequest {
            volume_id: Self::volume_id(pod, "creds"),
            target_path: self.target(pod, "creds").to_string_lossy().into_owned(),
            volume_capability: Some(csi::VolumeCapability {
                access_type: Some(AccessType::Mount(MountVolume {
                    volume_mount_group: FS_GROUP.to_string(),
                    ..Default::default()
                })),
                access_mode: Some(AccessMode {
                    mode: Mode::SingleNodeReaderOnly as i32,
                }),
            }),
            readonly: true,
            volume_context: ctx,
            ..Default::default()
        }
    }

    async fn publish(&mut self, req: csi::NodePublishVolumeRequest) -> Result<(), tonic::Status> {
        self.node.node_publish_volume(req).await.map(|_| ())
    }

    async fn unpublish(&mut self, pod: &Pod) -> Result<(), tonic::Status> {
        self.node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: Self::volume_id(pod, "creds"),
                target_path: self.target(pod, "creds").to_string_lossy().into_owned(),
            })
            .await
            .map(|_| ())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn tokens_for(audience: &str, token: &str) -> Value {
    let expiry = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1);
    json!({ audience: {"token": token, "expirationTimestamp": expiry.to_string()} })
}

/// The mount at `path` from /proc/self/mountinfo: (fstype, mount options + super options).
fn mount_at(path: &Path) -> Option<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let wanted = path.to_string_lossy();
    info.lines().rev().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fields: Vec<&str> = left.split(' ').collect();
        if fields.get(4)? != &wanted {
            return None;
        }
        let rfields: Vec<&str> = right.split(' ').collect();
        Some((
            rfields.first()?.to_string(),
            format!("{},{}", fields.get(5)?, rfields.get(2).unwrap_or(&"")),
        ))
    })
}

fn read_file(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name))
        .unwrap_or_else(|e| panic!("{}/{name}: {e}", dir.display()))
        .trim_end()
        .to_owned()
}

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

/// Everything a scenario needs.
struct World {
    cluster: Cluster,
    db: Database,
    /// The first controller's (`controller-0`): a token bound to its own pod.
    leader_kubeconfig: PathBuf,
    /// The second controller's (`controller-1`): a token bound to its own pod.
    standby_kubeconfig: PathBuf,
    controller_args: Vec<String>,
    controllers: Vec<Process>,
    node: Option<Process>,
    node_args: Vec<String>,
    node_kubeconfig: PathBuf,
    node_socket: PathBuf,
    broker_port: u16,
    /// Where the leader serves CRLs and CA certificates (`--crl-addr`).
    crl_port: u16,
    /// Pebble (Let's Encrypt's test CA), validating HTTP-01 against the leader's solver
    /// (`--acme-http01-addr`); `None` where pebble is not installed (never in CI).
    pebble: Option<leasehold_testkit::PebbleServer>,
    /// Values that must never appear in a log: passwords and tokens seen by the test.
    secrets: Vec<String>,
    results: Vec<(String, Duration)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes cluster: run e2e/run.sh (make e2e)"]
async fn installed_leasehold_on_a_real_cluster() {
    let started = Instant::now();
    let mut cluster = Cluster::connect().await;
    eprintln!(
        "e2e: cluster {}, namespaces {} and {}, work dir {}",
        cluster.server,
        cluster.system_ns,
        cluster.app_ns,
        cluster.work.display()
    );
    let work = cluster.work.clone();
    let system_ns = cluster.system_ns.clone();
    let app_ns = cluster.app_ns.clone();
    let client = cluster.client.clone();
    // Run the body in a task so a failure still reaches the cleanup below.
    let body = tokio::spawn(async move {
        step("install: CRDs, chart (real Helm engine), accounts");
        cluster.install_crds().await;
        cluster.create_namespace(&cluster.system_ns.clone()).await;
        cluster.create_namespace(&cluster.app_ns.clone()).await;
        cluster.install_chart().await;
        cluster.dry_run_examples().await;
        let world = setup(cluster).await;
        run_scenarios(world).await
    });
    let outcome = body.await;
    // Cleanup whatever happened.
    remove_test_namespaces(&client, &app_ns, &system_ns).await;
    match outcome {
        Ok(results) => {
            eprintln!("\n==== e2e: results");
            for (name, took) in &results {
                eprintln!("  PASS  {name:<70} {:>6.1}s", took.as_secs_f64());
            }
            eprintln!(
                "e2e: {} scenarios passed in {:.1}s (wall time, install included)",
                results.len(),
                started.elapsed().as_secs_f64()
            );
        }
        Err(e) => {
            dump_logs(&work);
            eprintln!("e2e: work dir kept for inspection: {}", work.display());
            std::panic::resume_unwind(e.into_panic())
        }
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// Whatever happened: the leases' finalizers dropped (their database is gone with the
/// test) and both test namespaces deleted.
async fn remove_test_namespaces(client: &Client, app_ns: &str, system_ns: &str) {
    let leases: Api<SecretLease> = Api::namespaced(client.clone(), app_ns);
    if let Ok(list) = leases.list(&Default::default()).await {
        for l in list {
            let _ = leases
                .patch(
                    &l.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                )
                .await;
        }
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for ns in [app_ns, system_ns] {
        let _ = namespaces.delete(ns, &DeleteParams::default()).await;
    }
    // Gone before the next run starts: a controller watching every namespace (the
    // writeNamespaces pass) must not find this run's leases still terminating.
    let deadline = Instant::now() + Duration::from_secs(120);
    for ns in [app_ns, system_ns] {
        while Instant::now() < deadline && namespaces.get_opt(ns).await.ok().flatten().is_some() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The end of each process log (without debug lines), so a failure in CI explains itself.
fn dump_logs(work: &Path) {
    let Ok(entries) = std::fs::read_dir(work) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "log") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.contains("\"DEBUG\"")).collect();
        eprintln!("\n==== e2e: last lines of {}", path.display());
        for line in &lines[lines.len().saturating_sub(40)..] {
            eprintln!("{}", line.chars().take(800).collect::<String>());
        }
    }
}

async fn setup(cluster: Cluster) -> World {
    let ns = cluster.system_ns.clone();
    let controller_sa = format!("{FULLNAME}-controller");
    let node_sa = format!("{FULLNAME}-node");
    // Stand-ins for the chart's pods, so identities are pod-bound as in a real install:
    // the leader labels its pod, and the node driver's token names its node.
    let controller_pods = [
        cluster
            .run_pod(&ns, "controller-0", &controller_sa, &node_a(), None)
            .await,
        cluster
            .run_pod(&ns, "controller-1", &controller_sa, &node_b(), None)
            .await,
    ];
    let node_pod = cluster
        .run_pod(&ns, "node-driver", &node_sa, &node_a(), None)
        .await;

    // Each controller process presents a token bound to its own stand-in pod.
    let controller_kubeconfig = cluster
        .service_account_kubeconfig(&controller_sa, Some(&controller_pods[0]))
        .await;
    let standby_kubeconfig = cluster
        .service_account_kubeconfig(&controller_sa, Some(&controller_pods[1]))
        .await;
    let node_kubeconfig = cluster
        .service_account_kubeconfig(&node_sa, Some(&node_pod))
        .await;

    let db = Database::start().await;
    let broker_port = free_port();
    let mut controller_args = cluster.chart_container_args("Deployment", "controller");
    set_arg(
        &mut controller_args,
        "--metrics-addr",
        &format!("127.0.0.1:{}", free_port()),
    );
    let crl_port = free_port();
    set_arg(
        &mut controller_args,
        "--crl-addr",
        &format!("127.0.0.1:{crl_port}"),
    );
    let acme_port = free_port();
    set_arg(
        &mut controller_args,
        "--acme-http01-addr",
        &format!("127.0.0.1:{acme_port}"),
    );
    let pebble = if leasehold_testkit::PebbleServer::installed() {
        Some(
            leasehold_testkit::PebbleServer::start(leasehold_testkit::PebbleOptions {
                http_port: acme_port,
                ..Default::default()
            })
            .await,
        )
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "pebble is not installed but CI is set: run .ci/setup.sh"
        );
        None
    };
    // Short, so the sweep scenario does not wait minutes (default 300 s).
    set_arg(&mut controller_args, "--per-pod-sweep-seconds", "3");
    // Frequent signed checkpoints, so the killed leader's trail is anchored.
    set_arg(&mut controller_args, "--audit-checkpoint-every", "5");
    set_arg(
        &mut controller_args,
        "--broker-addr",
        &format!("127.0.0.1:{broker_port}"),
    );
    let controller = Process::spawn(
        "controller-0",
        &controller_args,
        &controller_kubeconfig,
        cluster.path("controller-0.log"),
        &[("POD_NAME", "controller-0"), ("POD_NAMESPACE", &ns)],
    );

    // The broker CA the node drivers trust, published by the controller.
    let ca = eventually(
        "broker CA ConfigMap published",
        Duration::from_secs(60),
        || async {
            let cm = Api::<ConfigMap>::namespaced(cluster.client.clone(), &ns)
                .get_opt(&format!("{FULLNAME}-broker-ca"))
                .await
                .ok()??;
            cm.data?.get("ca.crt").cloned()
        },
    )
    .await;
    let ca_file = cluster.path("broker-ca.crt");
    std::fs::write(&ca_file, ca).unwrap();
    let node_token = cluster
        .token(&ns, &node_sa, BROKER_AUDIENCE, Some(&node_pod))
        .await;
    let node_token_file = cluster.path("node-token");
    std::fs::write(&node_token_file, &node_token).unwrap();

    let node_socket = cluster.path("csi/csi.sock");
    std::fs::create_dir_all(node_socket.parent().unwrap()).unwrap();
    let mut node_args = cluster.chart_container_args("DaemonSet", "leasehold");
    set_arg(
        &mut node_args,
        "--csi-socket",
        node_socket.to_str().unwrap(),
    );
    set_arg(&mut node_args, "--node-name", &node_a());
    set_arg(
        &mut node_args,
        "--broker-url",
        &format!("https://127.0.0.1:{broker_port}"),
    );
    set_arg(
        &mut node_args,
        "--broker-server-name",
        &format!("{FULLNAME}-broker.{ns}.svc"),
    );
    set_arg(&mut node_args, "--broker-ca", ca_file.to_str().unwrap());
    set_arg(
        &mut node_args,
        "--node-token",
        node_token_file.to_str().unwrap(),
    );
    set_arg(
        &mut node_args,
        "--kubelet-dir",
        cluster.path("kubelet").to_str().unwrap(),
    );
    set_arg(
        &mut node_args,
        "--state-dir",
        cluster.path("node-state").to_str().unwrap(),
    );
    set_arg(
        &mut node_args,
        "--metrics-addr",
        &format!("127.0.0.1:{}", free_port()),
    );
    let node = Process::spawn(
        "node-a driver",
        &node_args,
        &node_kubeconfig,
        cluster.path("node-a.log"),
        &[],
    );
    eventually("node driver socket", Duration::from_secs(30), || async {
        tokio::net::UnixStream::connect(&node_socket).await.ok()
    })
    .await;
    let mode = std::fs::metadata(&node_socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "CSI socket mode {mode:o}");

    let secrets = vec![db.admin_password(), node_token];
    World {
        cluster,
        db,
        leader_kubeconfig: controller_kubeconfig.clone(),
        standby_kubeconfig,
        controller_args,
        controllers: vec![controller],
        node: Some(node),
        node_args,
        node_kubeconfig,
        node_socket,
        broker_port,
        crl_port,
        pebble,
        secrets,
        results: Vec::new(),
    }
}

async fn run_scenarios(mut w: World) -> Vec<(String, Duration)> {
    common_objects(&w).await;
    scenario(
        &mut w,
        "Secret delivery: Ready, logs in, kubectl columns, events",
        secret_delivery,
    )
    .await;
    scenario(
        &mut w,
        "rotation by annotation with a rollout restart; old revoked after the rollout",
        rotation_with_rollout,
    )
    .await;
    scenario(
        &mut w,
        "CSI publish with a pod-bound token, files and modes, tmpfs options",
        csi_publish,
    )
    .await;
    scenario(
        &mut w,
        "CSI refusals: other pod's token, other node, SA outside access, wrong audience",
        csi_refusals,
    )
    .await;
    scenario(
        &mut w,
        "CSI rotation: republish swaps files and acknowledges; old revoked after",
        csi_rotation,
    )
    .await;
    scenario(
        &mut w,
        "perPod lease: a user per pod, dropped at unpublish",
        per_pod,
    )
    .await;
    scenario(
        &mut w,
        "lost node: the per-pod user of a deleted pod is swept by the controller",
        per_pod_sweep_after_a_lost_node,
    )
    .await;
    scenario(
        &mut w,
        "certificate lease from a self-signed CA Issuer: kubernetes.io/tls Secret, rotation, old serial in the published CRL",
        certificate_from_ca_issuer,
    )
    .await;
    scenario(
        &mut w,
        "certificate from an ACME ClusterIssuer (Pebble, HTTP-01 via the controller's solver): rotation, revokeCert",
        certificate_from_acme,
    )
    .await;
    scenario(
        &mut w,
        "certificate over CSI: key made on the node, per-pod SANs, files 0440, revoked at unpublish",
        certificate_over_csi,
    )
    .await;
    scenario(
        &mut w,
        "encrypted at rest (local key Secret) and emergency revocation: revoke-now replaces and revokes every version without waiting; suspend holds rotations",
        sealed_storage_and_emergency_revocation,
    )
    .await;
    scenario(
        &mut w,
        "a failing rotation keeps the old credential and shows Degraded RotationFailing",
        failing_rotation_is_visible,
    )
    .await;
    scenario(
        &mut w,
        "a lease never writes a Secret it did not create (its admin Secret, another lease's Secret: SecretConflict; a versions Secret: refused by the schema)",
        foreign_secret_is_refused,
    )
    .await;
    scenario(
        &mut w,
        "fencing: a writer holding a stale lease cannot overwrite newer progress",
        stale_writer_is_fenced,
    )
    .await;
    scenario(
        &mut w,
        "deletion with the database down: finalizer stays until revoked",
        deletion_waits_for_revocation,
    )
    .await;
    scenario(
        &mut w,
        "admin Secret deleted before its lease: revoked with the credentials last read",
        teardown_admin_secret_first,
    )
    .await;
    scenario(
        &mut w,
        "a node driver's token is refused once the driver's pod is deleted",
        driver_token_of_a_deleted_pod,
    )
    .await;
    scenario(
        &mut w,
        "failover: standby takes over after the leader is killed; rotation completes",
        failover,
    )
    .await;
    scenario(
        &mut w,
        "fencing: a leader paused past its lease (SIGSTOP) steps down on resume without acting; the new leader finishes the rotation",
        paused_leader_is_fenced,
    )
    .await;
    scenario(
        &mut w,
        "unrevocable deleted lease: waits, says how to get out, abandon annotation releases it",
        abandon_unrevocable_lease,
    )
    .await;
    scenario(
        &mut w,
        "csi-sanity (Identity and Node specs) on the node driver's socket",
        csi_sanity,
    )
    .await;
    scenario(
        &mut w,
        "no 403 from the API server and no secret in any log",
        logs_are_clean,
    )
    .await;
    for c in &mut w.controllers {
        c.terminate().await;
    }
    if let Some(n) = w.node.as_mut() {
        n.terminate().await;
    }
    let started = Instant::now();
    step(
        "audit trail across the failover verifies (leasehold audit verify); a deleted record is found",
    );
    audit_trail_verifies(&w).await;
    w.results
        .push(("audit trail verifies".to_owned(), started.elapsed()));
    let started = Instant::now();
    step("leasehold rekey: every sealed Secret to a new key and back");
    rekey_round_trip(&w).await;
    w.results.push(("rekey".to_owned(), started.elapsed()));
    w.results
}

async fn scenario<F>(w: &mut World, name: &str, f: F)
where
    F: for<'a> AsyncFnOnce(&'a mut World),
{
    step(name);
    let started = Instant::now();
    f(w).await;
    for c in &mut w.controllers {
        c.assert_running();
    }
    if let Some(n) = w.node.as_mut() {
        n.assert_running();
    }
    w.results.push((name.to_owned(), started.elapsed()));
}

/// Admin Secret, policies and the workload's service accounts.
async fn common_objects(w: &World) {
    let c = &w.cluster;
    c.create_service_account(&c.app_ns, "app").await;
    c.create_service_account(&c.app_ns, "intruder").await;
    c.apply(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pg-admin"},
        "stringData": {"username": w.db.server.admin_user(), "password": w.db.admin_password()}
    }))
    .await;
    let revoke_now = json!({"gracePeriod": "0s", "waitForConsumers": true, "maxWait": "10m",
                            "drainSessions": {"mode": "Terminate", "timeout": "5s"}});
    c.apply(json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "RotationPolicy", "metadata": {"name": "e2e"},
        "spec": {"ttl": "1h", "revoke": revoke_now, "access": {"serviceAccounts": ["app"]}}
    }))
    .await;
    c.apply(json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "RotationPolicy", "metadata": {"name": "slow-drain"},
        "spec": {"ttl": "1h", "revoke": {"gracePeriod": "20s", "waitForConsumers": false, "maxWait": "10m",
                 "drainSessions": {"mode": "Terminate", "timeout": "5s"}}}
    }))
    .await;
}

fn postgres_spec(w: &World) -> Value {
    json!({"host": w.db.server.host(), "port": w.db.server.port(), "database": w.db.server.database(),
           "adminSecretRef": {"name": "pg-admin"}, "tls": {"mode": "Disable"}})
}

async fn secret_delivery(w: &mut World) {
    let c = &w.cluster;
    c.apply(json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"serviceAccountName": "app", "automountServiceAccountToken": false,
                                       "containers": [{"name": "web", "image": image()}]}}}
    }))
    .await;
    c.apply(json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease", "metadata": {"name": "app-db"},
        "spec": {"policyRef": {"name": "e2e"}, "postgres": postgres_spec(w),
                 "delivery": {"secret": {"name": "app-db-creds"},
                              "rolloutRestart": [{"kind": "Deployment", "name": "web"}],
                              "restartDebounce": "0s"}}
    }))
    .await;
    let status = c.wait_ready_version("app-db", 1).await;
    let user = status.current_username.clone().unwrap();
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), &c.app_ns);
    let delivered = eventually(
        "Secret app-db-creds delivered",
        Duration::from_secs(30),
        || async { secrets.get_opt("app-db-creds").await.ok()? },
    )
    .await;
    let text =
        |s: &Secret, k: &str| String::from_utf8(s.data.as_ref().unwrap()[k].0.clone()).unwrap();
    assert_eq!(text(&delivered, "username"), user);
    let password = text(&delivered, "password");
    w.secrets.push(password.clone());
    w.db.connect(&user, &password)
        .await
        .expect("the delivered credential logs in");
    assert!(
        delivered
            .metadata
            .owner_references
            .unwrap_or_default()
            .iter()
            .any(|o| o.kind == "SecretLease" && o.controller == Some(true)),
        "the delivered Secret is owned by its lease"
    );

    // kubectl get sl: the columns show phase, version and expiry.
    let table = c.lease_table().await;
    let columns: Vec<String> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_owned())
        .collect();
    for wanted in ["Name", "Phase", "Version", "Expires", "Ready"] {
        assert!(
            columns.iter().any(|c| c == wanted),
            "column {wanted} in {columns:?}"
        );
    }
    let row = table["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["cells"][0] == "app-db")
        .unwrap();
    let cell = |name: &str| row["cells"][columns.iter().position(|c| c == name).unwrap()].clone();
    assert_eq!(cell("Version"), json!(1));
    assert_eq!(cell("Ready"), json!("True"));
    // A timestamp, not an age: a `date` column renders a future time as `<invalid>`.
    let expires = cell("Expires");
    assert!(
        expires
            .as_str()
            .is_some_and(|s| s.parse::<jiff::Timestamp>().is_ok()),
        "expiry shown as a time: {expires}"
    );
    eprintln!(
        "e2e: kubectl get sl → columns {columns:?}, row {}",
        row["cells"]
    );

    let reasons = eventually("events for app-db", Duration::from_secs(30), || async {
        let r = c.event_reasons("app-db").await;
        ["Issued", "Verified", "Promoted"]
            .iter()
            .all(|want| r.iter().any(|x| x == want))
            .then_some(r)
    })
    .await;
    eprintln!("e2e: events {reasons:?}");
}

/// `GET path` from the controller's CRL server (plain HTTP on loopback): status and body.
async fn crl_server_get(port: u16, path: &str) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await.unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&data[..end]).trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[end + 2..end + 2 + size]);
        data = &data[end + 2 + size + 2..];
    }
}

/// `openssl verify` of `leaf` against `ca`, checking `crl` when given.
fn openssl_verify(dir: &Path, ca: &str, leaf: &str, crl: Option<&[u8]>) -> Result<(), String> {
    std::fs::write(dir.join("verify-ca.pem"), ca).unwrap();
    std::fs::write(dir.join("verify-leaf.pem"), leaf).unwrap();
    let mut cmd = std::process::Command::new("openssl");
    cmd.arg("verify")
        .arg("-CAfile")
        .arg(dir.join("verify-ca.pem"));
    if let Some(crl) = crl {
        std::fs::write(dir.join("verify-crl.pem"), crl).unwrap();
        cmd.arg("-crl_check")
            .arg("-CRLfile")
            .arg(dir.join("verify-crl.pem"));
    }
    let out = cmd.arg(dir.join("verify-leaf.pem")).output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr))
    }
}

async fn certificate_from_ca_issuer(w: &mut World) {
    let c = &w.cluster;
    c.apply(json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "Issuer", "metadata": {"name": "e2e-ca"},
        "spec": {"ca": {"selfSigned": true}}
    }))
    .await;
    let issuers: Api<kube::core::DynamicObject> = Api::namespaced_with(
        c.client.clone(),
        &c.app_ns,
        &kube::core::ApiResource {
            group: "leasehold.dev".into(),
            version: "v1alpha1".into(),
            api_version: "leasehold.dev/v1alpha1".into(),
            kind: "Issuer".into(),
            plural: "issuers".into(),
        },
    );
    let ready = eventually("Issuer e2e-ca Ready", Duration::from_secs(60), || async {
        let i = issuers.get("e2e-ca").await.ok()?;
        let conditions = i.data["status"]["conditions"].as_array()?.clone();
        conditions
            .iter()
            .find(|c| c["type"] == "Ready" && c["status"] == "True")
            .cloned()
    })
    .await;
    eprintln!("e2e: Issuer e2e-ca Ready: {}", ready["message"]);
    c.apply(json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "RotationPolicy", "metadata": {"name": "certs"},
        "spec": {"ttl": "24h", "renewBefore": "8h",
                 "revoke": {"gracePeriod": "0s", "waitForConsumers": false, "maxWait": "0s"}}
    }))
    .await;
    let dns = format!("web.{}.svc", c.app_ns);
    c.apply(json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease", "metadata": {"name": "web-cert"},
        "spec": {"policyRef": {"name": "certs"},
                 "certificate": {"issuerRef": {"name": "e2e-ca"}, "commonName": dns,
                                 "dnsNames": [dns], "usages": ["serverAuth", "digitalSignature"]},
                 "delivery": {"secret": {"name": "web-tls"}}}
    }))
    .await;
    let v1 = c.wait_ready_version("web-cert", 1).await;
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), &c.app_ns);
    let text =
        |s: &Secret, k: &str| String::from_utf8(s.data.as_ref().unwrap()[k].0.clone()).unwrap();
    let first = eventually("Secret web-tls", Duration::from_secs(30), || async {
        secrets.get_opt("web-tls").await.ok()?
    })
    .await;
    assert_eq!(first.type_.as_deref(), Some("kubernetes.io/tls"));
    let keys: Vec<&String> = first.data.as_ref().unwrap().keys().collect();
    assert_eq!(keys, ["ca.crt", "tls.crt", "tls.key"]);
    let (ca, crt1, key1) = (
        text(&first, "ca.crt"),
        text(&first, "tls.crt"),
        text(&first, "tls.key"),
    );
    w.secrets
        .push(key1.lines().nth(1).unwrap_or_default().to_owned());
    let root = secrets.get("e2e-ca-ca").await.unwrap();
    assert_eq!(
        text(&root, "tls.crt"),
        ca,
        "ca.crt is the Issuer's generated root"
    );
    let scratch = c.path("certs");
    std::fs::create_dir_all(&scratch).unwrap();
    openssl_verify(&scratch, &ca, &crt1, None).expect("the delivered certificate verifies");
    eprintln!(
        "e2e: web-cert v1 serial {} delivered as kubernetes.io/tls",
        v1.current_username.clone().unwrap_or_default()
    );

    // Rotate: a new key and certificate; the old serial lands in the CRL ConfigMap and
    // in the CRL the controller serves.
    c.request_rotation("web-cert", "e2e-cert-1").await;
    c.wait_ready_version("web-cert", 2).await;
    let old_serial = v1.current_username.clone().unwrap();
    let configmaps: Api<ConfigMap> = Api::namespaced(c.client.clone(), &c.app_ns);
    wait_revoked_by_e2e_ca(&configmaps, &old_serial, Duration::from_secs(60)).await;
    let second = secrets.get("web-tls").await.unwrap();
    let (crt2, key2) = (text(&second, "tls.crt"), text(&second, "tls.key"));
    w.secrets
        .push(key2.lines().nth(1).unwrap_or_default().to_owned());
    assert_ne!(crt1, crt2);
    assert_ne!(key1, key2, "a fresh key for every certificate");
    let path = format!("/crl/issuer/{}/e2e-ca.pem", c.app_ns);
    let crl = eventually(
        "CRL served with the old serial",
        Duration::from_secs(30),
        || async {
            let (status, body) = crl_server_get(w.crl_port, &path).await;
            (status == 200 && openssl_verify(&scratch, &ca, &crt1, Some(&body)).is_err())
                .then_some(body)
        },
    )
    .await;
    let refused = openssl_verify(&scratch, &ca, &crt1, Some(&crl)).unwrap_err();
    assert!(refused.contains("revoked"), "{refused}");
    openssl_verify(&scratch, &ca, &crt2, Some(&crl)).expect("the new certificate is good");
    eprintln!(
        "e2e: old certificate refused by the served CRL: {}",
        refused.trim()
    );

    let reasons = c.event_reasons("web-cert").await;
    assert!(reasons.iter().any(|r| r == "Revoked"), "{reasons:?}");
    c.leases()
        .delete("web-cert", &DeleteParams::default())
        .await
        .unwrap();
    c.wait_lease_gone("web-cert", Duration::from_secs(60)).await;
    let v2_serial = {
        let cm = configmaps.get("e2e-ca-crl").await.unwrap();
        cm.data.unwrap()["revoked.json"].clone()
    };
    assert_eq!(
        v2_serial.matches("serial").count(),
        2,
        "both certificates revoked once the lease is gone: {v2_serial}"
    );
}

async fn lease_with_own_admin(w: &World, lease: &str, admin: &str) -> String {
    let c = &w.cluster;
    c.apply(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": admin},
        "stringData": {"username": w.db.server.admin_user(), "password": w.db.admin_password()}
    }))
    .await;
    let mut pg = postgres_spec(w);
    pg["adminSecretRef"] = json!({"name": admin});
    c.apply(json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease", "metadata": {"name": lease},
        "spec": {"policyRef": {"name": "e2e"}, "postgres": pg,
                 "delivery": {"secret": {"name": format!("{lease}-creds")}}}
    }))
    .await;
    c.wait_ready_version(lease, 1)
        .await
        .current_username
        .unwrap()
}

/// A namespace teardown can delete the admin Secret before the lease: the controller
/// revokes with the credentials it last read.
async fn teardown_admin_secret_first(w: &mut World) {
    let user = lease_with_own_admin(w, "teardown-db", "pg-admin-teardown").await;
    let c = &w.cluster;
    Api::<Secret>::namespaced(c.client.clone(), &c.app_ns)
        .delete("pg-admin-teardown", &DeleteParams::default())
        .await
        .unwrap();
    c.leases()
        .delete("teardown-db", &DeleteParams::default())
        .await
        .unwrap();
    c.wait_lease_gone("teardown-db", Duration::from_secs(60))
        .await;
    assert!(
        !w.db.role_exists(&user).await,
        "revoked with the remembered admin credentials"
    );
    // For the failover scenario: a lease whose admin Secret the next leader never sees.
    lease_with_own_admin(w, "orphan-db", "pg-admin-orphan").await;
    Api::<Secret>::namespaced(c.client.clone(), &c.app_ns)
        .delete("pg-admin-orphan", &DeleteParams::default())
        .await
        .unwrap();
}

/// After a restart the controller has no copy of a vanished admin Secret: the deleted
/// lease waits, says how to get out, and the abandon annotation lets it go.
async fn abandon_unrevocable_lease(w: &mut World) {
    let c = &w.cluster;
    let user = c
        .status("orphan-db")
        .await
        .unwrap()
        .current_username
        .unwrap();
    c.leases()
        .delete("orphan-db", &DeleteParams::default())
        .await
        .unwrap();
    let ready = eventually(
        "orphan-db blocked on its admin Secret",
        Duration::from_secs(60),
        || async {
            let s = c.status("orphan-db").await?;
            let r = leasehold_api::conditions::find(&s.conditions, "Ready")?.clone();
            (r.reason == "AdminSecretNotFound"
                && r.message.contains(leasehold_api::ABANDON_ANNOTATION))
            .then_some(r)
        },
    )
    .await;
    eprintln!(
        "e2e: deleted lease without admin credentials: {}",
        ready.message
    );
    assert!(
        c.leases().get_opt("orphan-db").await.unwrap().is_some(),
        "it waits"
    );
    c.leases()
        .patch(
            "orphan-db",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {leasehold_api::ABANDON_ANNOTATION: "true"}}}),
            ),
        )
        .await
        .unwrap();
    c.wait_lease_gone("orphan-db", Duration::from_secs(60))
        .await;
    let reasons = c.event_reasons("orphan-db").await;
    assert!(
        reasons.iter().any(|r| r == "CredentialsAbandoned"),
        "{reasons:?}"
    );
    assert!(
        w.db.role_exists(&user).await,
        "left behind, as the event says"
    );
    w.db.server
        .admin_client()
        .await
        .batch_execute(&format!("DROP ROLE \"{user}\""))
        .await
        .unwrap();
}

/// A rotation that cannot succeed keeps the working credential and says so: Degraded
/// with the reason in status and in the `kubectl get sl` Health column.
async fn failing_rotation_is_visible(w: &mut World) {
    let c = &w.cluster;
    let lease = |grants: Value| {
        let mut pg = postgres_spec(w);
        pg["grants"] = grants;
        json!({
            "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease", "metadata": {"name": "flaky-db"},
            "spec": {"policyRef": {"name": "e2e"}, "postgres": pg,
                     "delivery": {"secret": {"name": "flaky-db-creds"}}}
        })
    };
    c.apply(lease(json!([]))).await;
    let v1 = c
        .wait_ready_version("flaky-db", 1)
        .await
        .current_username
        .unwrap();
    c.apply(lease(json!(["SELECT ON TABLE no_such_table"])))
        .await;
    c.request_rotation("flaky-db", "e2e-1").await;
    let degraded = eventually(
        "Degraded=True RotationFailing",
        Duration::from_secs(60),
        || async {
            let s = c.status("flaky-db").await?;
            let d = leasehold_api::conditions::find(&s.conditions, "Degraded")?.clone();
            (d.status == "True" && d.reason == "RotationFailing").then_some(d)
        },
    )
    .await;
    eprintln!("e2e: Degraded RotationFailing: {}", degraded.message);
    assert!(
        degraded.message.contains("no_such_table"),
        "the reason names the cause"
    );
    let status = c.status("flaky-db").await.unwrap();
    assert_eq!(status.current_version, Some(1), "v1 stays current");
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), &c.app_ns);
    let s = secrets.get("flaky-db-creds").await.unwrap();
    let password = String::from_utf8(s.data.as_ref().unwrap()["password"].0.clone()).unwrap();
    w.secrets.push(password.clone());
    w.db.connect(&v1, &password)
        .await
        .expect("v1 still logs in");
    let table = c.lease_table().await;
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    let health = columns
        .iter()
        .position(|n| *n == "Health")
        .expect("Health column");
    let row = table["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["cells"][0] == "flaky-db")
        .unwrap();
    assert_eq!(
        row["cells"][health], "RotationFailing",
        "kubectl get sl shows it"
    );
    c.leases()
        .delete("flaky-db", &DeleteParams::default())
        .await
        .unwrap();
}

/// A lease must never take over a Secret it did not create (here: its own admin Secret).
async fn foreign_secret_is_refused(w: &mut World) {
    let c = &w.cluster;
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), &c.app_ns);

    // Another lease's versions Secret: refused by the CRD schema (the API server's CEL).
    let refused = c
        .leases()
        .patch(
            "into-versions",
            &PatchParams::apply(MANAGER),
            &Patch::Apply(json!({
                "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease", "metadata": {"name": "into-versions"},
                "spec": {"policyRef": {"name": "e2e"}, "postgres": postgres_spec(w),
                         "delivery": {"secret": {"name": "app-db-leasehold-versions"}}}
            })),
        )
        .await
        .expect_err("a lease delivering into a versions Secret is refused");
    assert!(
        refused.to_string().contains("-leasehold-versions"),
        "the API server names the rule: {refused}"
    );

    // Another lease's delivered Secret: Ready=False SecretConflict, the Secret untouched.
    let theirs = secrets.get("app-db-creds").await.unwrap();
    c.apply(json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease", "metadata": {"name": "copycat"},
        "spec": {"policyRef": {"name": "e2e"}, "postgres": postgres_spec(w),
                 "delivery": {"secret": {"name": "app-db-creds"}}}
    }))
    .await;
    eventually(
        "copycat refused with SecretConflict",
        Duration::from_secs(60),
        || async {
            let s = c.status("copycat").await?;
            let ready = leasehold_api::conditions::find(&s.conditions, "Ready")?.clone();
            (ready.reason == "SecretConflict" && ready.status == "False").then_some(())
        },
    )
    .await;
    let after = secrets.get("app-db-creds").await.unwrap();
    assert_eq!(theirs.data, after.data, "app-db's Secret is untouched");
    assert_eq!(
        theirs.metadata.owner_references, after.metadata.owner_references,
        "and still owned by app-db alone"
    );
    c.leases()
        .delete("copycat", &DeleteParams::default())
        .await
        .unwrap();
    c.wait_lease_gone("copycat", Duration::from_secs(30)).await;

    let before = secrets.get("pg-admin").await.unwrap();
    c.apply(json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease", "metadata": {"name": "grabby"},
        "spec": {"policyRef": {"name": "e2e"}, "postgres": postgres_spec(w),
                 "delivery": {"secret": {"name": "pg-admin"}}}
    }))
    .await;
    let ready = eventually(
        "grabby refused with SecretConflict",
        Duration::from_secs(60),
        || async {
            let s = c.status("grabby").await?;
            let ready = leasehold_api::conditions::find(&s.conditions, "Ready")?.clone();
            (ready.reason == "SecretConflict").then_some(ready)
        },
    )
    .await;
    assert_eq!(ready.status, "False");
    eprintln!("e2e: Ready=False SecretConflict: {}", ready.message);
    let after = secrets.get("pg-admin").await.unwrap();
    assert_eq!(before.data, after.data, "the admin Secret is untouched");
    assert!(
        after
            .metadata
            .owner_references
            .unwrap_or_default()
            .is_empty(),
        "and not owned by the lease"
    );
    assert!(
        c.status("grabby").await.unwrap().current_version.is_none(),
        "no credential issued"
    );
    c.leases()
        .delete("grabby", &DeleteParams::default())
        .await
        .unwrap();
    c.wait_lease_gone("grabby", Duration::from_secs(30)).await;
}

async fn rotation_with_rollout(w: &mut World) {
    let c = &w.cluster;
    let v1 = c.status("app-db").await.unwrap().current_username.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(c.client.clone(), &c.app_ns);
    // Pause the Deployment: its restart for version 2 cannot finish until it resumes,
    // and until then version 1 must stay alive.
    let pause = |paused: bool| {
        let deployments = deployments.clone();
        async move {
            deployments
                .patch(
                    "web",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"paused": paused}})),
                )
                .await
                .unwrap();
        }
    };
    pause(true).await;
    c.request_rotation("app-db", "e2e-1").await;
    let version_key = "app-db.lease.leasehold.dev/version";
    let template_version = |d: &Deployment| {
        d.spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(version_key).cloned())
    };
    eventually(
        "v2 promoted and the restart for v2 requested",
        Duration::from_secs(60),
        || async {
            let s = c.status("app-db").await?;
            let d = deployments.get("web").await.ok()?;
            let observed = d.status.as_ref()?.observed_generation >= d.metadata.generation;
            (s.current_version == Some(2)
                && template_version(&d).as_deref() == Some("2")
                && observed)
                .then_some(())
        },
    )
    .await;
    let v1_seen = c.status("app-db").await.unwrap();
    assert_eq!(
        v1_seen.progress.versions.len(),
        2,
        "v1 still recorded while the rollout waits"
    );
    assert!(
        w.db.role_exists(&v1).await,
        "v1 must live until the restarted pods run"
    );
    pause(false).await;
    eventually(
        "v1 revoked after the rollout",
        Duration::from_secs(120),
        || async { (!w.db.role_exists(&v1).await).then_some(()) },
    )
    .await;
    let d = deployments.get("web").await.unwrap();
    let st = d.status.clone().unwrap_or_default();
    assert_eq!(template_version(&d).as_deref(), Some("2"));
    // Finished as `kubectl rollout status` means it: every pod updated, no old pod
    // left, the new ones available.
    assert_eq!(
        (st.updated_replicas, st.replicas, st.available_replicas),
        (d.spec.replicas, d.spec.replicas, d.spec.replicas),
        "the rollout finished before the revocation"
    );
    let status = c.wait_ready_version("app-db", 2).await;
    let v2 = status.current_username.unwrap();
    assert_ne!(v1, v2);
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), &c.app_ns);
    let s = secrets.get("app-db-creds").await.unwrap();
    let password = String::from_utf8(s.data.as_ref().unwrap()["password"].0.clone()).unwrap();
    w.secrets.push(password.clone());
    w.db.connect(&v2, &password).await.expect("v2 logs in");
    let reasons = c.event_reasons("app-db").await;
    assert!(
        reasons.iter().any(|r| r == "Revoked"),
        "Revoked event in {reasons:?}"
    );
}

/// Pods and the CSI lease shared by the CSI scenarios.
struct CsiPods {
    reader: Pod,
}

async fn csi_lease_and_pod(w: &World) -> CsiPods {
    let c = &w.cluster;
    if c.leases().get_opt("files-db").await.unwrap().is_none() {
        c.apply(json!({
            "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease", "metadata": {"name": "files-db"},
            "spec": {"policyRef": {"name": "e2e"}, "postgres": postgres_spec(w),
                     "delivery": {"csi": {"enabled": true}}}
        }))
        .await;
    }
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), &c.app_ns);
    let reader = match pods.get_opt("reader").await.unwrap() {
        Some(p) => p,
        None => {
            c.run_pod(&c.app_ns, "reader", "app", &node_a(), Some("files-db"))
                .await
        }
    };
    CsiPods { reader }
}

/// The node driver's broker token is bound to its pod: once the pod is deleted the broker
/// refuses it, although its signature and expiry still hold (the broker checks JWTs
/// locally, so it looks the bound pod up). Runs after every scenario that needs the node
/// driver.
async fn driver_token_of_a_deleted_pod(w: &mut World) {
    let c = &w.cluster;
    let ns = c.app_ns.clone();
    csi_lease_and_pod(w).await;
    let pod = c
        .run_pod(&ns, "after-driver", "app", &node_a(), Some("files-db"))
        .await;
    let token = c.token(&ns, "app", POD_AUDIENCE, Some(&pod)).await;
    w.secrets.push(token.clone());
    let mut k = kubelet(w).await;
    let request = || k.publish_request(&pod, "app", "files-db", tokens_for(POD_AUDIENCE, &token));
    // While its pod lives, the driver is served.
    k.publish(request())
        .await
        .expect("publish before the driver pod is deleted");
    k.unpublish(&pod).await.expect("unpublish");

    let system_pods: Api<Pod> = Api::namespaced(c.client.clone(), &c.system_ns);
    system_pods
        .delete("node-driver", &DeleteParams::default())
        .await
        .unwrap();
    // The broker sees the deletion through its pod watch: wait for the refusal (a publish
    // that still got through is unpublished before the next try).
    let refused = eventually(
        "the broker refuses the deleted driver pod's token",
        Duration::from_secs(60),
        || async {
            let mut k = kubelet(w).await;
            let request =
                k.publish_request(&pod, "app", "files-db", tokens_for(POD_AUDIENCE, &token));
            match k.publish(request).await {
                Err(e) if matches!(e.code(), Code::Unauthenticated | Code::PermissionDenied) => {
                    Some(e)
                }
                Err(_) => None,
                Ok(_) => {
                    let _ = k.unpublish(&pod).await;
                    None
                }
            }
        },
    )
    .await;
    eprintln!("e2e: deleted driver pod: {}", refused.message());
    assert!(
        mount_at(&k.target(&pod, "creds")).is_none(),
        "nothing mounted"
    );
}

async fn kubelet(w: &World) -> Kubelet {
    Kubelet::connect(&w.node_socket, &w.cluster.path("kubelet")).await
}

async fn csi_publish(w: &mut World) {
    let pods = csi_lease_and_pod(w).await;
    w.cluster.wait_ready_version("files-db", 1).await;
    let mut k = kubelet(w).await;
    let probe = k
        .identity
        .probe(csi::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    let token = w
        .cluster
        .token(&w.cluster.app_ns, "app", POD_AUDIENCE, Some(&pods.reader))
        .await;
    w.secrets.push(token.clone());
    let req = k.publish_request(
        &pods.reader,
        "app",
        "files-db",
        tokens_for(POD_AUDIENCE, &token),
    );
    k.publish(req.clone()).await.expect("publish");
    // Idempotent: the same request again is OK.
    k.publish(req).await.expect("publish again");
    let target = k.target(&pods.reader, "creds");
    let (fstype, options) = mount_at(&target).expect("tmpfs mounted at the target");
    assert_eq!(fstype, "tmpfs");
    for opt in ["nodev", "noexec", "nosuid"] {
        assert!(options.split(',').any(|o| o == opt), "{opt} in {options}");
    }
    for file in ["username", "password"] {
        let meta = std::fs::metadata(target.join(file)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o440, "{file} mode");
        assert_eq!(meta.gid(), FS_GROUP, "{file} group is the fsGroup");
    }
    let user = read_file(&target, "username");
    let password = read_file(&target, "password");
    w.secrets.push(password.clone());
    assert_eq!(
        Some(user.clone()),
        w.cluster.status("files-db").await.unwrap().current_username
    );
    w.db.connect(&user, &password)
        .await
        .expect("the file credential logs in");
    // The broker recorded the pod as a consumer of version 1.
    eventually(
        "reader recorded as a consumer",
        Duration::from_secs(30),
        || async {
            let s = w.cluster.status("files-db").await?;
            s.consumers
                .iter()
                .any(|c| c.name == "reader" && c.version == Some(1))
                .then_some(())
        },
    )
    .await;
}

async fn csi_refusals(w: &mut World) {
    let c = &w.cluster;
    let pods = csi_lease_and_pod(w).await;
    let ns = c.app_ns.clone();
    let other = c
        .run_pod(&ns, "other", "app", &node_a(), Some("files-db"))
        .await;
    let far = c
        .run_pod(&ns, "far", "app", &node_b(), Some("files-db"))
        .await;
    let intruder = c
        .run_pod(&ns, "intruder", "intruder", &node_a(), Some("files-db"))
        .await;
    let mut k = kubelet(w).await;

    // A token of another pod presented for the reader.
    let other_token = c.token(&ns, "app", POD_AUDIENCE, Some(&other)).await;
    let mut req = k.publish_request(
        &pods.reader,
        "app",
        "files-db",
        tokens_for(POD_AUDIENCE, &other_token),
    );
    // A second volume of the reader's, so the refusal is not an idempotency answer.
    let fresh = k.target(&pods.reader, "refused");
    req.target_path = fresh.to_string_lossy().into_owned();
    req.volume_id = Kubelet::volume_id(&pods.reader, "refused");
    let err = k.publish(req).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::Unauthenticated | Code::PermissionDenied),
        "other pod's token: {err:?}"
    );
    assert!(mount_at(&fresh).is_none(), "nothing mounted");

    // A pod that runs on node-b, published through node-a's driver.
    let far_token = c.token(&ns, "app", POD_AUDIENCE, Some(&far)).await;
    let err = k
        .publish(k.publish_request(
            &far,
            "app",
            "files-db",
            tokens_for(POD_AUDIENCE, &far_token),
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::Unauthenticated | Code::PermissionDenied),
        "pod on the other node: {err:?}"
    );
    assert!(mount_at(&k.target(&far, "creds")).is_none());

    // A service account outside the policy's access rules.
    let intruder_token = c
        .token(&ns, "intruder", POD_AUDIENCE, Some(&intruder))
        .await;
    let err = k
        .publish(k.publish_request(
            &intruder,
            "intruder",
            "files-db",
            tokens_for(POD_AUDIENCE, &intruder_token),
        ))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "SA outside access: {err:?}"
    );
    assert!(mount_at(&k.target(&intruder, "creds")).is_none());

    // A token for another audience.
    let wrong = c
        .token(&ns, "app", "some-other-audience", Some(&other))
        .await;
    let err = k
        .publish(k.publish_request(&other, "app", "files-db", tokens_for(POD_AUDIENCE, &wrong)))
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::Unauthenticated | Code::PermissionDenied),
        "wrong audience: {err:?}"
    );
    assert!(mount_at(&k.target(&other, "creds")).is_none());
    for t in [other_token, far_token, intruder_token, wrong] {
        w.secrets.push(t);
    }
    // None of them became a consumer.
    let consumers = c.status("files-db").await.unwrap().consumers;
    assert!(
        consumers.iter().all(|x| x.name == "reader"),
        "only the reader is a consumer: {consumers:?}"
    );
}

async fn csi_rotation(w: &mut World) {
    let pods = csi_lease_and_pod(w).await;
    let c = &w.cluster;
    let mut k = kubelet(w).await;
    let target = k.target(&pods.reader, "creds");
    let v1 = read_file(&target, "username");
    let v1_password = read_file(&target, "password");
    c.request_rotation("files-db", "e2e-1").await;
    let status = c.wait_ready_version("files-db", 2).await;
    let v2 = status.current_username.unwrap();
    // Not yet acknowledged by the reader: v1 still works.
    assert!(
        w.db.role_exists(&v1).await,
        "v1 kept until the consumer moves"
    );
    w.db.connect(&v1, &v1_password)
        .await
        .expect("v1 still logs in before the republish");
    // The kubelet's periodic republish (requiresRepublish) with a fresh token.
    let token = c
        .token(&c.app_ns, "app", POD_AUDIENCE, Some(&pods.reader))
        .await;
    w.secrets.push(token.clone());
    k.publish(k.publish_request(
        &pods.reader,
        "app",
        "files-db",
        tokens_for(POD_AUDIENCE, &token),
    ))
    .await
    .expect("republish");
    assert_eq!(read_file(&target, "username"), v2, "files swapped to v2");
    let v2_password = read_file(&target, "password");
    w.secrets.push(v2_password.clone());
    w.db.connect(&v2, &v2_password)
        .await
        .expect("v2 from the files logs in");
    eventually(
        "v1 revoked after the acknowledgement",
        Duration::from_secs(60),
        || async { (!w.db.role_exists(&v1).await).then_some(()) },
    )
    .await;
    let consumers = c.status("files-db").await.unwrap().consumers;
    assert!(
        consumers
            .iter()
            .any(|x| x.name == "reader" && x.version == Some(2)),
        "{consumers:?}"
    );

    // Unpublish: unmounted, and idempotent.
    k.unpublish(&pods.reader).await.expect("unpublish");
    assert!(mount_at(&target).is_none(), "unmounted");
    k.unpublish(&pods.reader).await.expect("unpublish again");
}

async fn per_pod(w: &mut World) {
    let c = &w.cluster;
    c.apply(json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease", "metadata": {"name": "per-pod-db"},
        "spec": {"policyRef": {"name": "e2e"}, "postgres": postgres_spec(w), "perPod": true,
                 "delivery": {"csi": {"enabled": true}}}
    }))
    .await;
    eventually("per-pod lease Ready", Duration::from_secs(60), || async {
        let s = c.status("per-pod-db").await?;
        (leasehold_api::conditions::find(&s.conditions, "Ready")?.status == "True").then_some(())
    })
    .await;
    let ns = c.app_ns.clone();
    let pod = c
        .run_pod(&ns, "worker", "app", &node_a(), Some("per-pod-db"))
        .await;
    let mut k = kubelet(w).await;
    let token = c.token(&ns, "app", POD_AUDIENCE, Some(&pod)).await;
    w.secrets.push(token.clone());
    k.publish(k.publish_request(&pod, "app", "per-pod-db", tokens_for(POD_AUDIENCE, &token)))
        .await
        .expect("per-pod publish");
    let target = k.target(&pod, "creds");
    let user = read_file(&target, "username");
    let password = read_file(&target, "password");
    w.secrets.push(password.clone());
    let lease_uid = c.leases().get("per-pod-db").await.unwrap().uid().unwrap();
    let expected = leasehold_broker::per_pod::per_pod_username(&lease_uid, &pod.uid().unwrap());
    assert_eq!(user, expected, "a user of this pod's own");
    w.db.connect(&user, &password)
        .await
        .expect("the per-pod user logs in");
    k.unpublish(&pod).await.expect("unpublish");
    eventually(
        "per-pod user dropped at unpublish",
        Duration::from_secs(30),
        || async { (!w.db.role_exists(&user).await).then_some(()) },
    )
    .await;
    assert!(w.db.connect(&user, &password).await.is_err());
}

/// Waits until the `e2e-ca` Issuer's ledger (`e2e-ca-crl`) lists `serial` as revoked.
async fn wait_revoked_by_e2e_ca(configmaps: &Api<ConfigMap>, serial: &str, timeout: Duration) {
    eventually(
        &format!("serial {serial} revoked in e2e-ca-crl"),
        timeout,
        || async {
            let cm = configmaps.get_opt("e2e-ca-crl").await.ok()??;
            cm.data?.get("revoked.json")?.contains(serial).then_some(())
        },
    )
    .await;
}

/// The serial of a PEM certificate as Pebble names it (lower-case hex, no leading zeros).
fn serial_of(dir: &Path, pem: &str) -> String {
    std::fs::write(dir.join("serial-of.pem"), pem).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(dir.join("serial-of.pem"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("serial=")
        .trim_start_matches('0')
        .to_lowercase()
}

async fn certificate_from_acme(w: &mut World) {
    let Some(pebble) = w.pebble.as_ref() else {
        eprintln!("e2e: SKIPPED the ACME scenario: pebble is not installed");
        return;
    };
    let c = &w.cluster;
    let issuer = format!("e2e-acme-{}", c.app_ns);
    let cluster_issuers: Api<kube::core::DynamicObject> = Api::all_with(
        c.client.clone(),
        &kube::core::ApiResource {
            group: "leasehold.dev".into(),
            version: "v1alpha1".into(),
            api_version: "leasehold.dev/v1alpha1".into(),
            kind: "ClusterIssuer".into(),
            plural: "clusterissuers".into(),
        },
    );
    cluster_issuers
        .patch(
            &issuer,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(json!({
                "apiVersion": "leasehold.dev/v1alpha1", "kind": "ClusterIssuer",
                "metadata": {"name": issuer},
                "spec": {"acme": {"directoryUrl": pebble.directory_url(),
                                  "email": "ops@leasehold.test",
                                  "caBundle": pebble.ca_pem(),
                                  "accountKeySecretRef": {"name": "e2e-acme-account",
                                                          "namespace": c.app_ns}}}
            })),
        )
        .await
        .unwrap();
    let ready = eventually(
        "ACME ClusterIssuer Ready",
        Duration::from_secs(90),
        || async {
            let i = cluster_issuers.get(&issuer).await.ok()?;
            let conditions = i.data["status"]["conditions"].as_array()?.clone();
            conditions
                .iter()
                .find(|c| c["type"] == "Ready" && c["status"] == "True")
                .cloned()
        },
    )
    .await;
    eprintln!("e2e: ACME ClusterIssuer Ready: {}", ready["message"]);
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), &c.app_ns);
    assert!(
        secrets.get_opt("e2e-acme-account").await.unwrap().is_some(),
        "the account is kept in its Secret"
    );
    c.apply(json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease", "metadata": {"name": "acme-cert"},
        "spec": {"policyRef": {"name": "certs"},
                 "certificate": {"issuerRef": {"name": issuer, "kind": "ClusterIssuer"},
                                 "commonName": "acme-web.example", "dnsNames": ["acme-web.example"]},
                 "delivery": {"secret": {"name": "acme-tls"}}}
    }))
    .await;
    c.wait_ready_version("acme-cert", 1).await;
    let text =
        |s: &Secret, k: &str| String::from_utf8(s.data.as_ref().unwrap()[k].0.clone()).unwrap();
    let first = secrets.get("acme-tls").await.unwrap();
    assert_eq!(first.type_.as_deref(), Some("kubernetes.io/tls"));
    w.secrets.push(
        text(&first, "tls.key")
            .lines()
            .nth(1)
            .unwrap_or_default()
            .to_owned(),
    );
    let scratch = c.path("certs");
    std::fs::create_dir_all(&scratch).unwrap();
    let first_serial = serial_of(&scratch, &text(&first, "tls.crt"));
    let (code, body) = pebble.cert_status_by_serial(&first_serial).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"Valid\""), "{body}");

    c.request_rotation("acme-cert", "e2e-acme-1").await;
    c.wait_ready_version("acme-cert", 2).await;
    let revoked = eventually(
        "the superseded certificate revoked at the ACME CA",
        Duration::from_secs(60),
        || async {
            let (_, body) = pebble.cert_status_by_serial(&first_serial).await;
            body.contains("\"Revoked\"").then_some(body)
        },
    )
    .await;
    let second = secrets.get("acme-tls").await.unwrap();
    let second_serial = serial_of(&scratch, &text(&second, "tls.crt"));
    assert_ne!(first_serial, second_serial);
    let (_, body) = pebble.cert_status_by_serial(&second_serial).await;
    assert!(body.contains("\"Valid\""), "{body}");
    eprintln!(
        "e2e: ACME certificate {first_serial} revoked at the CA after rotation ({} bytes of status)",
        revoked.len()
    );
    c.leases()
        .delete("acme-cert", &DeleteParams::default())
        .await
        .unwrap();
    c.wait_lease_gone("acme-cert", Duration::from_secs(60))
        .await;
    let (_, body) = pebble.cert_status_by_serial(&second_serial).await;
    assert!(
        body.contains("\"Revoked\""),
        "revoked with its lease: {body}"
    );
    cluster_issuers
        .delete(&issuer, &DeleteParams::default())
        .await
        .unwrap();
}

async fn certificate_over_csi(w: &mut World) {
    let c = &w.cluster;
    // The Issuer and policy of the certificate scenario before this one.
    c.apply(json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease", "metadata": {"name": "pod-cert"},
        "spec": {"policyRef": {"name": "certs"},
                 "certificate": {"issuerRef": {"name": "e2e-ca"},
                                 "commonName": "${POD_NAME}.${POD_NAMESPACE}",
                                 "dnsNames": ["${POD_NAME}.${POD_NAMESPACE}.pod"],
                                 "uris": ["spiffe://cluster.local/ns/${POD_NAMESPACE}/sa/${SERVICE_ACCOUNT}"]},
                 "delivery": {"csi": {"enabled": true}}}
    }))
    .await;
    let ready = eventually(
        "pod-cert Ready (issued per pod)",
        Duration::from_secs(60),
        || async {
            let s = c.status("pod-cert").await?;
            let r = leasehold_api::conditions::find(&s.conditions, "Ready")?.clone();
            (r.status == "True").then_some(r)
        },
    )
    .await;
    assert_eq!(ready.reason, "IssuedPerPod", "{}", ready.message);
    let ns = c.app_ns.clone();
    let pod = c
        .run_pod(&ns, "tls-worker", "app", &node_a(), Some("pod-cert"))
        .await;
    let mut k = kubelet(w).await;
    let token = c.token(&ns, "app", POD_AUDIENCE, Some(&pod)).await;
    w.secrets.push(token.clone());
    let started = Instant::now();
    k.publish(k.publish_request(&pod, "app", "pod-cert", tokens_for(POD_AUDIENCE, &token)))
        .await
        .expect("certificate publish");
    eprintln!(
        "e2e: certificate volume published in {:?} (key generated on the node)",
        started.elapsed()
    );
    let target = k.target(&pod, "creds");
    for file in ["tls.key", "tls.crt", "ca.crt"] {
        let meta = std::fs::metadata(target.join(file)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o440, "{file} mode");
        assert_eq!(meta.gid(), FS_GROUP, "{file} group is the fsGroup");
    }
    let (key, crt, ca) = (
        read_file(&target, "tls.key"),
        read_file(&target, "tls.crt"),
        read_file(&target, "ca.crt"),
    );
    w.secrets
        .push(key.lines().nth(1).unwrap_or_default().to_owned());
    let scratch = c.path("certs");
    std::fs::create_dir_all(&scratch).unwrap();
    openssl_verify(&scratch, &ca, &crt, None).expect("the pod's certificate verifies");
    std::fs::write(scratch.join("pod.pem"), &crt).unwrap();
    let text = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(scratch.join("pod.pem"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    assert!(
        text.contains(&format!("DNS:tls-worker.{ns}.pod")),
        "the pod's name in its SAN: {text}"
    );
    assert!(
        text.contains(&format!("URI:spiffe://cluster.local/ns/{ns}/sa/app")),
        "{text}"
    );
    let serial = serial_of(&scratch, &crt);
    // The key never left the node: the controller's log and the cluster never saw it.
    let key_body = key.lines().nth(1).unwrap().to_owned();
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), &ns);
    for s in secrets.list(&ListParams::default()).await.unwrap().items {
        for v in s.data.clone().unwrap_or_default().values() {
            assert!(
                !String::from_utf8_lossy(&v.0).contains(&key_body),
                "the pod's key is in Secret {}",
                s.name_any()
            );
        }
    }

    k.unpublish(&pod).await.expect("unpublish");
    let configmaps: Api<ConfigMap> = Api::namespaced(c.client.clone(), &ns);
    wait_revoked_by_e2e_ca(&configmaps, &serial, Duration::from_secs(30)).await;
    eprintln!("e2e: pod certificate {serial} revoked at unpublish");

    // Mounted again, then the lease is deleted while the pod still holds its
    // certificate: the certificate goes with the lease.
    k.publish(k.publish_request(&pod, "app", "pod-cert", tokens_for(POD_AUDIENCE, &token)))
        .await
        .expect("certificate publish again");
    let held = serial_of(&scratch, &read_file(&target, "tls.crt"));
    assert_ne!(held, serial, "a new certificate for the new mount");
    c.leases()
        .delete("pod-cert", &DeleteParams::default())
        .await
        .unwrap();
    c.wait_lease_gone("pod-cert", Duration::from_secs(60)).await;
    let cm = configmaps.get("e2e-ca-crl").await.unwrap();
    assert!(
        cm.data.unwrap()["revoked.json"].contains(&held),
        "the certificate a pod held is revoked with its lease"
    );
    eprintln!("e2e: pod certificate {held} revoked with its deleted lease");
    k.unpublish(&pod)
        .await
        .expect("unpublish after the lease is gone");
}

/// What a deposed leader would do: it read the lease, lost leadership, and writes the
/// progress it had while the new leader has moved on. The API server must refuse it.
async fn stale_writer_is_fenced(w: &mut World) {
    use leasehold_engine::ProgressStore;
    let c = &w.cluster;
    let stale = c.leases().get("files-db").await.unwrap();
    let before = stale.status.clone().unwrap().current_version.unwrap();
    c.request_rotation("files-db", "e2e-fence").await;
    c.wait_ready_version("files-db", before + 1).await;
    let store = leasehold_operator::status::StatusProgressStore::new(
        c.leases(),
        &stale,
        None,
        false,
        std::sync::Arc::new(jiff::Timestamp::now),
        std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)),
    );
    let mut progress = stale.status.clone().unwrap().progress;
    progress.last_version += 10;
    let key = leasehold_engine::LeaseKey {
        namespace: c.app_ns.clone(),
        name: "files-db".into(),
        uid: stale.uid().unwrap(),
    };
    let err = store
        .save(&key, &progress)
        .await
        .expect_err("a stale write must be refused");
    eprintln!("e2e: stale write refused: {err}");
    let now = c.status("files-db").await.unwrap();
    assert_eq!(now.current_version, Some(before + 1), "newer progress kept");
    assert_ne!(now.progress.last_version, progress.last_version);
}

/// A node that vanishes never unpublishes: the pod's per-pod user is revoked by the
/// controller's sweep once the pod is gone.
async fn per_pod_sweep_after_a_lost_node(w: &mut World) {
    let c = &w.cluster;
    let ns = c.app_ns.clone();
    let pod = c
        .run_pod(&ns, "ghost", "app", &node_a(), Some("per-pod-db"))
        .await;
    let mut k = kubelet(w).await;
    let token = c.token(&ns, "app", POD_AUDIENCE, Some(&pod)).await;
    w.secrets.push(token.clone());
    k.publish(k.publish_request(&pod, "app", "per-pod-db", tokens_for(POD_AUDIENCE, &token)))
        .await
        .expect("per-pod publish");
    let target = k.target(&pod, "creds");
    let user = read_file(&target, "username");
    w.secrets.push(read_file(&target, "password"));
    assert!(w.db.role_exists(&user).await);
    // The node goes away with its driver: no unpublish, no release.
    w.node.as_mut().unwrap().kill().await;
    drop(k);
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), &ns);
    pods.delete("ghost", &DeleteParams::default())
        .await
        .unwrap();
    eventually("pod ghost gone", Duration::from_secs(60), || async {
        pods.get_opt("ghost").await.ok()?.is_none().then_some(())
    })
    .await;
    let started = Instant::now();
    eventually(
        "the sweep revokes the user of the deleted pod",
        Duration::from_secs(60),
        || async { (!w.db.role_exists(&user).await).then_some(()) },
    )
    .await;
    eprintln!(
        "e2e: per-pod user swept {:.1}s after its pod was deleted (sweep every 3 s)",
        started.elapsed().as_secs_f64()
    );
    // What the kubelet of a replaced node would leave: nothing mounted. Restart the driver.
    let _ = std::process::Command::new("umount").arg(&target).status();
    let log = c.path("node-a-restarted.log");
    w.node = Some(Process::spawn(
        "node-a driver (restarted)",
        &w.node_args,
        &w.node_kubeconfig,
        log,
        &[],
    ));
    let socket = w.node_socket.clone();
    eventually(
        "restarted node driver socket",
        Duration::from_secs(30),
        || async { tokio::net::UnixStream::connect(&socket).await.ok() },
    )
    .await;
}

async fn deletion_waits_for_revocation(w: &mut World) {
    let status = w.cluster.status("app-db").await.unwrap();
    let user = status.current_username.unwrap();
    assert!(w.db.role_exists(&user).await);
    w.db.server.stop().await;
    w.cluster
        .leases()
        .delete("app-db", &DeleteParams::default())
        .await
        .unwrap();
    // The revocation fails while the database is down: recorded, and said in an event.
    let c = &w.cluster;
    eventually(
        "a failed revocation recorded on the deleted lease",
        Duration::from_secs(90),
        || async {
            let lease = c.leases().get_opt("app-db").await.ok()??;
            assert!(lease.metadata.deletion_timestamp.is_some());
            let s = lease.status?;
            s.progress
                .versions
                .iter()
                .any(|v| v.revoke.as_ref().is_some_and(|r| r.last_error.is_some()))
                .then_some(())
        },
    )
    .await;
    eventually(
        "RevocationPending event",
        Duration::from_secs(30),
        || async {
            c.event_reasons("app-db")
                .await
                .iter()
                .any(|r| r == "RevocationPending")
                .then_some(())
        },
    )
    .await;
    let lease = c
        .leases()
        .get_opt("app-db")
        .await
        .unwrap()
        .expect("the lease waits");
    assert!(
        lease
            .finalizers()
            .iter()
            .any(|f| f == leasehold_api::FINALIZER),
        "the finalizer stays while a credential is alive"
    );
    let ready =
        leasehold_api::conditions::find(&lease.status.as_ref().unwrap().conditions, "Ready")
            .cloned()
            .unwrap();
    assert_eq!(ready.status, "False");
    eprintln!(
        "e2e: while the database is down: Ready=False {}: {}",
        ready.reason, ready.message
    );
    w.db.server.resume().await;
    c.wait_lease_gone("app-db", Duration::from_secs(360)).await;
    assert!(
        !w.db.role_exists(&user).await,
        "the last credential was dropped before the finalizer went"
    );
}

async fn failover(w: &mut World) {
    let c = &w.cluster;
    let standby = Process::spawn(
        "controller-1",
        &w.controller_args,
        &w.standby_kubeconfig,
        c.path("controller-1.log"),
        &[
            ("POD_NAME", "controller-1"),
            ("POD_NAMESPACE", &c.system_ns),
        ],
    );
    let holder = || c.leader_identity();
    assert_eq!(holder().await.as_deref(), Some("controller-0"));
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), &c.system_ns);
    let leader_label = |p: &Pod| p.labels().get("leasehold.dev/leader").cloned();
    assert_eq!(
        leader_label(&pods.get("controller-0").await.unwrap()).as_deref(),
        Some("true"),
        "the leader labels its pod"
    );
    // Rotate, and kill the leader while the old version drains (grace period 20 s).
    let v1 = c
        .rotation_left_draining(postgres_spec(w), "failover-db")
        .await;
    let killed_at = Instant::now();
    w.controllers[0].kill().await;
    w.controllers.push(standby);
    eventually(
        "the standby holds the leader lease",
        Duration::from_secs(60),
        || async { (holder().await.as_deref() == Some("controller-1")).then_some(()) },
    )
    .await;
    eprintln!(
        "e2e: standby took over {:.1}s after the kill",
        killed_at.elapsed().as_secs_f64()
    );
    c.wait_rotation_finished(
        "failover-db",
        "the interrupted rotation completes under the new leader",
    )
    .await;
    assert!(!w.db.role_exists(&v1).await, "v1 revoked by the new leader");
    let v2 = c
        .status("failover-db")
        .await
        .unwrap()
        .current_username
        .unwrap();
    assert!(w.db.role_exists(&v2).await);
    eventually(
        "the new leader labels its pod",
        Duration::from_secs(30),
        || async {
            let p = pods.get("controller-1").await.ok()?;
            (leader_label(&p).as_deref() == Some("true")).then_some(())
        },
    )
    .await;
    let _ = w.broker_port;
}

/// A leader frozen past its lease (a GC pause, a stopped VM, a partition) finds another
/// leader when it resumes: it must step down without a single side effect, even though
/// its reconciles were due while it was frozen.
async fn paused_leader_is_fenced(w: &mut World) {
    let c = &w.cluster;
    let holder = || c.leader_identity();
    assert_eq!(holder().await.as_deref(), Some("controller-1"));
    let leader = w
        .controllers
        .iter()
        .position(|p| p.name == "controller-1" && p.child.is_some())
        .expect("controller-1 leads after the failover");

    // A second replica (controller-0 again) with listeners of its own: the frozen leader
    // keeps its sockets.
    let mut args = w.controller_args.clone();
    for flag in [
        "--metrics-addr",
        "--broker-addr",
        "--crl-addr",
        "--acme-http01-addr",
    ] {
        set_arg(&mut args, flag, &format!("127.0.0.1:{}", free_port()));
    }
    let standby = Process::spawn(
        "controller-0 (second start)",
        &args,
        &w.leader_kubeconfig,
        c.path("controller-0-second.log"),
        &[
            ("POD_NAME", "controller-0"),
            ("POD_NAMESPACE", &c.system_ns),
        ],
    );

    // A rotation whose old version drains (20 s) when the leader freezes: the frozen
    // leader's revocation of v1 falls due while it cannot see that it lost the lease.
    let v1 = c
        .rotation_left_draining(postgres_spec(w), "fenced-db")
        .await;

    w.controllers[leader].signal("STOP");
    let frozen_at = Instant::now();
    w.controllers.push(standby);
    eventually(
        "the other replica holds the leader lease",
        Duration::from_secs(60),
        || async { (holder().await.as_deref() == Some("controller-0")).then_some(()) },
    )
    .await;
    c.wait_rotation_finished("fenced-db", "the rotation completes under the new leader")
        .await;
    assert!(!w.db.role_exists(&v1).await, "v1 revoked by the new leader");
    let settled = c.status("fenced-db").await.unwrap();
    let log = w.controllers[leader].log.clone();
    let before_resume = std::fs::read_to_string(&log).unwrap_or_default().len();

    // Resume the deposed leader: it steps down (exits, as a pod would restart) without
    // writing anything.
    w.controllers[leader].signal("CONT");
    let status = w.controllers[leader]
        .exited_within(Duration::from_secs(30))
        .await
        .expect("the deposed leader steps down");
    let after = std::fs::read_to_string(&log).unwrap_or_default();
    let resumed = &after[before_resume.min(after.len())..];
    eprintln!(
        "e2e: leader frozen {:.1}s; after resuming it exited ({status}) having logged:\n{}",
        frozen_at.elapsed().as_secs_f64(),
        resumed
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Every engine step is an audit record (stdout): none for any lease after resuming.
    let acted: Vec<&str> = resumed
        .lines()
        .filter(|l| l.starts_with("{\"seq\":") && l.contains("\"lease\""))
        .collect();
    assert!(
        acted.is_empty(),
        "the deposed leader acted after resuming:\n{}",
        acted.join("\n")
    );
    let now = c.status("fenced-db").await.unwrap();
    assert_eq!(
        (
            now.current_version,
            now.progress.versions.len(),
            now.current_username.clone()
        ),
        (
            settled.current_version,
            settled.progress.versions.len(),
            settled.current_username.clone()
        ),
        "the lease is as the new leader left it"
    );
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), &c.app_ns);
    let s = secrets.get("fenced-db-creds").await.unwrap();
    let password = String::from_utf8(s.data.as_ref().unwrap()["password"].0.clone()).unwrap();
    w.secrets.push(password.clone());
    w.db.connect(now.current_username.as_deref().unwrap(), &password)
        .await
        .expect("v2 still logs in");
}

async fn csi_sanity(w: &mut World) {
    let dir =
        std::env::var("LEASEHOLD_KUBE_DIR").unwrap_or_else(|_| "/var/tmp/leasehold-kube".into());
    let bin = Path::new(&dir).join("bin/csi-sanity");
    if !bin.exists() {
        // In CI the kit ships it: a missing binary is a failure, never a silent pass.
        assert!(
            std::env::var("LEASEHOLD_E2E_REQUIRED").as_deref() != Ok("1"),
            "csi-sanity not found at {} (it comes with ../shared/kube) and LEASEHOLD_E2E_REQUIRED=1",
            bin.display()
        );
        eprintln!(
            "e2e: csi-sanity SKIPPED: {} not found (it comes with ../shared/kube)",
            bin.display()
        );
        return;
    }
    let mount = w.cluster.path("sanity-mount");
    let staging = w.cluster.path("sanity-staging");
    let out = tokio::process::Command::new(&bin)
        .arg(format!("--csi.endpoint=unix://{}", w.node_socket.display()))
        .arg(format!("--csi.mountdir={}", mount.display()))
        .arg(format!("--csi.stagingdir={}", staging.display()))
        // A node-only driver for inline ephemeral volumes: the Controller service specs,
        // and the Node specs that create their volume through it, cannot apply.
        .arg(format!("--ginkgo.skip={}", CSI_SANITY_SKIP))
        .arg("--ginkgo.no-color")
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Passed") || l.contains("Ran ") || l.contains("FAIL"))
        .collect();
    eprintln!("e2e: csi-sanity: {}", summary.join(" | "));
    assert!(out.status.success(), "csi-sanity failed:\n{text}");
}

/// csi-sanity specs that need a Controller service (this driver is node-only, for
/// inline ephemeral volumes): the Controller Server specs, and the three Node specs that
/// create their volume through CreateVolume before publishing it ("Node Service should
/// work", "NodeExpandVolume should work if node-expand is called after node-publish",
/// "NodeUnpublishVolume should remove target path").
const CSI_SANITY_SKIP: &str = "Controller Server|Node Service should work|node-expand is called after node-publish|should remove target path";

async fn sealed_storage_and_emergency_revocation(w: &mut World) {
    let c = &w.cluster;
    c.apply(json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease", "metadata": {"name": "leaky-db"},
        "spec": {"policyRef": {"name": "slow-drain"}, "postgres": postgres_spec(w),
                 "delivery": {"secret": {"name": "leaky-db-creds"}}}
    }))
    .await;
    let v1 = c
        .wait_ready_version("leaky-db", 1)
        .await
        .current_username
        .unwrap();
    // The versions Secret holds only sealed values, under the chart's local key.
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), &c.app_ns);
    let versions = secrets.get("leaky-db-leasehold-versions").await.unwrap();
    assert_eq!(
        versions
            .labels()
            .get("leasehold.dev/sealed")
            .map(String::as_str),
        Some("versions")
    );
    for (field, value) in versions.data.as_ref().unwrap() {
        assert!(
            value.0.starts_with(b"lhenc1:"),
            "{field} of the versions Secret is sealed"
        );
    }
    let kek = Api::<Secret>::namespaced(c.client.clone(), &c.system_ns)
        .get("leasehold-kek")
        .await
        .expect("the controller made its local key Secret");
    assert!(kek.data.unwrap().contains_key("key"));
    let delivered = secrets.get("leaky-db-creds").await.unwrap();
    let password = String::from_utf8(delivered.data.unwrap()["password"].0.clone()).unwrap();
    w.secrets.push(password.clone());
    w.db.connect(&v1, &password)
        .await
        .expect("the delivered (opened) credential logs in");

    // A routine rotation: v1 drains for its 20 s grace period.
    c.request_rotation("leaky-db", "routine").await;
    let v2 = c
        .wait_ready_version("leaky-db", 2)
        .await
        .current_username
        .unwrap();
    // v2 leaked: revoke now. v3 replaces it; v1 and v2 go without waiting out the grace period.
    let requested = Instant::now();
    c.leases()
        .patch(
            "leaky-db",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"leasehold.dev/revoke-now": "e2e: v2 leaked"}}})),
        )
        .await
        .unwrap();
    let status = eventually(
        "v3 current and every older version revoked",
        Duration::from_secs(60),
        || async {
            let s = c.status("leaky-db").await?;
            (s.current_version == Some(3)
                && s.progress.versions.len() == 1
                && s.progress.emergency.is_none())
            .then_some(s)
        },
    )
    .await;
    let took = requested.elapsed();
    assert!(!w.db.role_exists(&v1).await, "v1 revoked");
    assert!(!w.db.role_exists(&v2).await, "v2 revoked");
    let v3 = status.current_username.unwrap();
    assert!(w.db.role_exists(&v3).await);
    eprintln!(
        "e2e: emergency revocation done {:.1}s after the annotation",
        took.as_secs_f64()
    );
    let reasons = eventually("emergency events", Duration::from_secs(30), || async {
        let r = c.event_reasons("leaky-db").await;
        (r.iter().any(|r| r == "EmergencyRevocation")
            && r.iter().any(|r| r == "EmergencyRevocationCompleted"))
        .then_some(r)
    })
    .await;
    assert!(reasons.iter().any(|r| r == "Revoked"), "{reasons:?}");

    // Suspended: the phase says so; a rotation requested meanwhile waits for the resume.
    c.apply(json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease", "metadata": {"name": "leaky-db"},
        "spec": {"policyRef": {"name": "slow-drain"}, "postgres": postgres_spec(w),
                 "delivery": {"secret": {"name": "leaky-db-creds"}}, "suspend": true}
    }))
    .await;
    eventually("phase Suspended", Duration::from_secs(30), || async {
        let s = c.status("leaky-db").await?;
        (format!("{:?}", s.phase) == "Suspended").then_some(())
    })
    .await;
    c.request_rotation("leaky-db", "during maintenance").await;
    c.apply(json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease", "metadata": {"name": "leaky-db"},
        "spec": {"policyRef": {"name": "slow-drain"}, "postgres": postgres_spec(w),
                 "delivery": {"secret": {"name": "leaky-db-creds"}}}
    }))
    .await;
    c.wait_ready_version("leaky-db", 4).await;
}

/// The audit lines of the controllers' logs (stdout holds the audit trail, stderr the
/// JSON logs; both went to one file per process), in the order the leaders wrote them.
fn audit_lines(w: &World) -> Vec<String> {
    let mut lines = Vec::new();
    for name in [
        "controller-0.log",
        "controller-1.log",
        "controller-0-second.log",
    ] {
        let text = std::fs::read_to_string(w.cluster.path(name)).unwrap_or_default();
        lines.extend(
            text.lines()
                .filter(|l| l.starts_with("{\"seq\":"))
                .map(str::to_owned),
        );
    }
    lines
}

async fn audit_trail_verifies(w: &World) {
    let c = &w.cluster;
    let lines = audit_lines(w);
    let key = Api::<Secret>::namespaced(c.client.clone(), &c.system_ns)
        .get("leasehold-audit-signing-key")
        .await
        .expect("the leader made its audit signing key");
    let public = c.path("audit-public.pem");
    std::fs::write(&public, &key.data.unwrap()["public-key.pem"].0).unwrap();
    let trail = c.path("audit.jsonl");
    std::fs::write(&trail, lines.join("\n") + "\n").unwrap();
    let text = lines.join("\n");
    for needle in [
        "\"action\":\"issue\"",
        "\"action\":\"verify\"",
        "\"action\":\"promote\"",
        "\"action\":\"revoke\"",
        "\"action\":\"broker_issue\"",
        "\"action\":\"emergency_revoke\"",
        "\"outcome\":\"denied\"",
        "\"checkpoint\"",
    ] {
        assert!(text.contains(needle), "the audit trail has {needle}");
    }
    for secret in &w.secrets {
        assert!(
            secret.len() < 8 || !text.contains(secret.as_str()),
            "no secret in the audit trail"
        );
    }
    let verify = |file: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
            .args(["audit", "verify"])
            .arg(file)
            .arg("--public-key")
            .arg(&public)
            .output()
            .unwrap()
    };
    let out = verify(&trail);
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "e2e: audit verify ({} records): {}",
        lines.len(),
        report.trim()
    );
    assert!(out.status.success(), "the audit trail verifies: {report}");
    // One record removed from the middle: found.
    let mut cut = lines.clone();
    cut.remove(lines.len() / 2);
    let tampered = c.path("audit-cut.jsonl");
    std::fs::write(&tampered, cut.join("\n") + "\n").unwrap();
    let out = verify(&tampered);
    assert!(!out.status.success(), "a deleted record is found");
}

/// `leasehold rekey` against the API server (controllers stopped): to a new local key
/// (the old Secret key opening), then back; every sealed Secret follows.
async fn rekey_round_trip(w: &World) {
    let c = &w.cluster;
    let new_key = c.path("new.key");
    std::fs::write(&new_key, [7u8; 32]).unwrap();
    let rekey = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
            .arg("rekey")
            .args(["--namespaces", &format!("{},{}", c.system_ns, c.app_ns)])
            .args(["--key-namespace", &c.system_ns])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "rekey {args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let key_file = new_key.to_str().unwrap();
    let to_new = rekey(&[
        "--encryption",
        "local",
        "--local-key-file",
        key_file,
        "--decrypt-key-secret",
        "leasehold-kek",
    ]);
    eprintln!(
        "e2e: rekey to a new key: {}",
        to_new.lines().next().unwrap_or_default()
    );
    assert!(to_new.contains("rewrapped"), "{to_new}");
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), &c.app_ns);
    let versions = secrets.get("leaky-db-leasehold-versions").await.unwrap();
    let new_id = leasehold_envelope::Keyring::envelope_key_id(
        &versions.data.as_ref().unwrap().values().next().unwrap().0,
    )
    .unwrap();
    let again = rekey(&["--encryption", "local", "--local-key-file", key_file]);
    assert!(
        again.contains(", 0 rewrapped, 0 failed"),
        "nothing left to rewrap: {again}"
    );
    let back = rekey(&[
        "--encryption",
        "local",
        "--local-key-secret",
        "leasehold-kek",
        "--decrypt-key-file",
        key_file,
    ]);
    assert!(back.contains("rewrapped"), "{back}");
    let versions = secrets.get("leaky-db-leasehold-versions").await.unwrap();
    let back_id = leasehold_envelope::Keyring::envelope_key_id(
        &versions.data.as_ref().unwrap().values().next().unwrap().0,
    )
    .unwrap();
    assert_ne!(new_id, back_id, "rewrapped under the original key again");
}

async fn logs_are_clean(w: &mut World) {
    // Every process started, including those killed or replaced on the way.
    let logs: Vec<(String, String)> = PROCESS_LOGS
        .lock()
        .unwrap()
        .iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(p).unwrap_or_default())
        })
        .collect();
    let mut problems = Vec::new();
    for (name, text) in &logs {
        for line in forbidden_lines(text) {
            problems.push(format!("{name}: 403 from the API server: {line}"));
        }
        for secret in &w.secrets {
            if secret.len() >= 8 && text.contains(secret.as_str()) {
                problems.push(format!(
                    "{name}: a secret value ({} chars) appears in the log",
                    secret.len()
                ));
            }
        }
        eprintln!("e2e: {name}: {} log lines", text.lines().count());
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------
// `make bench-e2e`: the real path, as the kubelet sees it
// ---------------------------------------------------------------------------

/// Requests the API server has served so far, by (verb, resource), from its own
/// `apiserver_request_total`.
async fn api_requests(client: &Client) -> HashMap<(String, String), f64> {
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(request).await.unwrap_or_default();
    let mut out = HashMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let label = |name: &str| {
            let start = line.find(&format!("{name}=\""))? + name.len() + 2;
            let end = line[start..].find('"')? + start;
            Some(line[start..end].to_owned())
        };
        let (Some(verb), Some(resource)) = (label("verb"), label("resource")) else {
            continue;
        };
        let subresource = label("subresource").unwrap_or_default();
        let resource = if subresource.is_empty() {
            resource
        } else {
            format!("{resource}/{subresource}")
        };
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *out.entry((verb, resource)).or_insert(0.0) += value;
    }
    out
}

/// Reads and writes of the objects leasehold reads and writes on the publish path
/// (pods, namespaces, SecretLeases, RotationPolicies, Secrets) between two scrapes.
/// Watches and the kubelet simulator's own pod-status updates are left out.
fn leasehold_api_delta(
    before: &HashMap<(String, String), f64>,
    after: &HashMap<(String, String), f64>,
) -> (f64, f64) {
    let mut reads = 0.0;
    let mut writes = 0.0;
    for ((verb, resource), v) in after {
        let d = v - before
            .get(&(verb.clone(), resource.clone()))
            .unwrap_or(&0.0);
        let ours = matches!(
            resource.as_str(),
            "pods"
                | "namespaces"
                | "secretleases"
                | "secretleases/status"
                | "rotationpolicies"
                | "secrets"
        );
        if !ours || d <= 0.0 {
            continue;
        }
        match verb.as_str() {
            "GET" | "LIST" => reads += d,
            "POST" | "PUT" | "PATCH" | "DELETE" | "APPLY" => writes += d,
            _ => {}
        }
    }
    (reads, writes)
}

async fn run_phase<F, Fut>(
    client: &Client,
    ports: &MetricsPorts,
    name: &'static str,
    count: usize,
    concurrency: usize,
    call: &F,
) -> PhaseResult
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<(), tonic::Status>>,
{
    let before = api_requests(client).await;
    let steps_before = all_steps(ports).await;
    let (latencies, errors) = timed_calls(count, concurrency, call).await;
    let steps_after = all_steps(ports).await;
    let after = api_requests(client).await;
    let (reads, writes) = leasehold_api_delta(&before, &after);
    let calls = latencies.len().max(1) as f64;
    let steps = steps_after
        .iter()
        .filter_map(|(step, (sum, count))| {
            let (s0, c0) = steps_before.get(step).copied().unwrap_or_default();
            (count - c0 > 0.0 || step.starts_with('='))
                .then(|| (step.clone(), (sum - s0) * 1000.0 / calls))
        })
        .collect();
    PhaseResult {
        name,
        latencies,
        errors,
        reads,
        writes,
        steps,
    }
}

struct PhaseResult {
    name: &'static str,
    latencies: Vec<Duration>,
    errors: usize,
    reads: f64,
    writes: f64,
    /// Mean milliseconds per call in each step (node driver and broker), from their
    /// step histograms.
    steps: Vec<(String, f64)>,
}

/// `(sum, count)` of every `<metric>_sum{step="…"}` / `_count` series at `port`.
async fn step_sums(port: u16, metric: &str) -> BTreeMap<String, (f64, f64)> {
    let (_, body) = crl_server_get(port, "/metrics").await;
    let text = String::from_utf8_lossy(&body).into_owned();
    let mut out: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for line in text.lines() {
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let step = |rest: &str| {
            let start = rest.find("step=\"")? + 6;
            let end = rest[start..].find('"')? + start;
            Some(rest[start..end].to_owned())
        };
        if let Some(rest) = series.strip_prefix(&format!("{metric}_sum{{")) {
            if let Some(s) = step(rest) {
                out.entry(s).or_default().0 += value;
            }
        } else if let Some(rest) = series.strip_prefix(&format!("{metric}_count{{"))
            && let Some(s) = step(rest)
        {
            out.entry(s).or_default().1 += value;
        }
    }
    out
}

/// Where the metrics of the node driver and of the controller (broker) are served.
struct MetricsPorts {
    node: u16,
    controller: u16,
}

async fn all_steps(ports: &MetricsPorts) -> BTreeMap<String, (f64, f64)> {
    let mut out = BTreeMap::new();
    // The broker's own count of live API reads (`leasehold_broker_api_reads_total`),
    // kept as a pseudo-step whose "sum" is the count.
    let (_, body) = crl_server_get(ports.controller, "/metrics").await;
    let reads: f64 = String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| l.starts_with("leasehold_broker_api_reads_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    out.insert("=broker api reads".to_owned(), (reads / 1000.0, 1.0));
    for (k, v) in step_sums(ports.node, "leasehold_csi_publish_step_duration_seconds").await {
        out.insert(format!("node {k}"), v);
    }
    for (k, v) in step_sums(ports.controller, "leasehold_broker_step_duration_seconds").await {
        out.insert(format!("broker {k}"), v);
    }
    out
}

fn print_phases(results: &[PhaseResult]) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pct = |v: &[Duration], p: f64| {
        if v.is_empty() {
            Duration::ZERO
        } else {
            v[((v.len() - 1) as f64 * p).round() as usize]
        }
    };
    eprintln!(
        "\n{:<46} {:>6} {:>8} {:>8} {:>8} {:>7} {:>11} {:>11}",
        "phase", "calls", "p50 ms", "p99 ms", "max ms", "errors", "reads/call", "writes/call"
    );
    for r in results {
        let mut v = r.latencies.clone();
        v.sort();
        let n = v.len().max(1) as f64;
        eprintln!(
            "{:<46} {:>6} {:>8.1} {:>8.1} {:>8.1} {:>7} {:>11.2} {:>11.2}",
            r.name,
            v.len(),
            ms(pct(&v, 0.5)),
            ms(pct(&v, 0.99)),
            ms(v.last().copied().unwrap_or_default()),
            r.errors,
            r.reads / n,
            r.writes / n
        );
        let steps: Vec<String> = r
            .steps
            .iter()
            .filter(|(step, _)| !step.starts_with('='))
            .map(|(step, ms)| format!("{step} {ms:.2}"))
            .collect();
        if let Some((_, reads)) = r.steps.iter().find(|(step, _)| step.starts_with('=')) {
            eprintln!("    live API reads by the broker per call (its own counter): {reads:.2}");
        }
        if !steps.is_empty() {
            eprintln!("    mean ms per call by step: {}", steps.join(", "));
        }
    }
}

/// Run `calls` (each a publish or unpublish) `concurrency` at a time; latencies and errors.
async fn timed_calls<F, Fut>(count: usize, concurrency: usize, call: &F) -> (Vec<Duration>, usize)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<(), tonic::Status>>,
{
    use futures::StreamExt;
    let results: Vec<(Duration, bool)> = futures::stream::iter(0..count)
        .map(|i| {
            let fut = call(i);
            async move {
                let t = Instant::now();
                let r = fut.await;
                if let Err(e) = &r {
                    eprintln!("bench: call {i} failed: {} {}", e.code(), e.message());
                }
                (t.elapsed(), r.is_ok())
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let errors = results.iter().filter(|(_, ok)| !ok).count();
    (results.into_iter().map(|(d, _)| d).collect(), errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark against a Kubernetes cluster: make bench-e2e"]
async fn bench_real_path() {
    let pods_wanted: usize = std::env::var("BENCH_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let sequential: usize = std::env::var("BENCH_SEQUENTIAL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
        .min(pods_wanted);
    let mut cluster = Cluster::connect().await;
    let (work, system_ns, app_ns, client) = (
        cluster.work.clone(),
        cluster.system_ns.clone(),
        cluster.app_ns.clone(),
        cluster.client.clone(),
    );
    eprintln!(
        "bench-e2e: cluster {}, {} cores on this machine (shared by the control plane, the database, the controller, the node driver and this client), {pods_wanted} pods on {}",
        cluster.server,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        node_a()
    );
    let body = tokio::spawn(async move {
        cluster.install_crds().await;
        cluster.create_namespace(&cluster.system_ns.clone()).await;
        cluster.create_namespace(&cluster.app_ns.clone()).await;
        cluster.install_chart().await;
        let mut w = setup(cluster).await;
        common_objects(&w).await;
        let c = &w.cluster;
        c.apply(json!({
            "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease", "metadata": {"name": "bench-db"},
            "spec": {"policyRef": {"name": "e2e"}, "postgres": postgres_spec(&w),
                     "delivery": {"csi": {"enabled": true}}}
        }))
        .await;
        c.wait_ready_version("bench-db", 1).await;
        // The pods (scheduled on node-a, Running under kwok) and their pod-bound tokens,
        // made before anything is timed.
        use futures::StreamExt;
        let made: Vec<(Pod, String)> = futures::stream::iter(0..pods_wanted)
            .map(|i| async move {
                let name = format!("bench-{i}");
                let pod = c
                    .run_pod(&c.app_ns, &name, "app", &node_a(), Some("bench-db"))
                    .await;
                let token = c.token(&c.app_ns, "app", POD_AUDIENCE, Some(&pod)).await;
                (pod, token)
            })
            .buffer_unordered(16)
            .collect()
            .await;
        let k = kubelet(&w).await;
        let requests: Vec<csi::NodePublishVolumeRequest> = made
            .iter()
            .map(|(pod, token)| {
                k.publish_request(pod, "app", "bench-db", tokens_for(POD_AUDIENCE, token))
            })
            .collect();
        let pods: Vec<Pod> = made.iter().map(|(p, _)| p.clone()).collect();
        let node = k.node.clone();
        let publish = |i: usize| {
            let mut node = node.clone();
            let req = requests[i].clone();
            async move { node.node_publish_volume(req).await.map(|_| ()) }
        };
        let client = w.cluster.client.clone();
        let port_of = |args: &[String]| -> u16 {
            let at = args.iter().position(|a| a == "--metrics-addr").unwrap();
            args[at + 1].rsplit(':').next().unwrap().parse().unwrap()
        };
        let ports = MetricsPorts {
            node: port_of(&w.node_args),
            controller: port_of(&w.controller_args),
        };
        let mut results = Vec::new();
        results.push(
            run_phase(
                &client,
                &ports,
                "fresh publish, one at a time",
                sequential,
                1,
                &publish,
            )
            .await,
        );
        let rest = pods_wanted - sequential;
        let fresh_rest = |i: usize| publish(sequential + i);
        results.push(
            run_phase(
                &client,
                &ports,
                "fresh publish, all at once",
                rest,
                rest,
                &fresh_rest,
            )
            .await,
        );
        // The kubelet republishes every minute or so: nothing changed.
        results.push(
            run_phase(
                &client,
                &ports,
                "republish, unchanged, one at a time",
                sequential,
                1,
                &publish,
            )
            .await,
        );
        results.push(
            run_phase(
                &client,
                &ports,
                "republish, unchanged, all at once",
                pods_wanted,
                pods_wanted,
                &publish,
            )
            .await,
        );
        c.request_rotation("bench-db", "bench").await;
        eventually(
            "bench-db rotated to version 2",
            Duration::from_secs(120),
            || async {
                let s = c.status("bench-db").await?;
                (s.current_version == Some(2)).then_some(())
            },
        )
        .await;
        results.push(
            run_phase(
                &client,
                &ports,
                "republish after a rotation, all at once",
                pods_wanted,
                pods_wanted,
                &publish,
            )
            .await,
        );
        let unpublish = |i: usize| {
            let mut node = node.clone();
            let req = csi::NodeUnpublishVolumeRequest {
                volume_id: Kubelet::volume_id(&pods[i], "creds"),
                target_path: k.target(&pods[i], "creds").to_string_lossy().into_owned(),
            };
            async move { node.node_unpublish_volume(req).await.map(|_| ()) }
        };
        results.push(
            run_phase(
                &client,
                &ports,
                "unpublish, all at once",
                pods_wanted,
                pods_wanted,
                &unpublish,
            )
            .await,
        );
        print_phases(&results);
        for c in &mut w.controllers {
            c.terminate().await;
        }
        if let Some(n) = w.node.as_mut() {
            n.terminate().await;
        }
        results.iter().map(|r| r.errors).sum::<usize>()
    });
    let outcome = body.await;
    remove_test_namespaces(&client, &app_ns, &system_ns).await;
    match outcome {
        Ok(errors) => {
            let _ = std::fs::remove_dir_all(&work);
            assert_eq!(errors, 0, "every call succeeded");
        }
        Err(e) => {
            dump_logs(&work);
            std::panic::resume_unwind(e.into_panic())
        }
    }
}
