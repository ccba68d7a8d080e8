//! Scale check: reconcile N SecretLeases against an in-process fake API server (run as a
//! separate child process, so the figures are the controller's alone) with a no-op
//! database backend, then resync them all with nothing changed.
//!
//! Prints resident memory, the no-op resync throughput and the number of API writes
//! during the resync (the target is zero). Never asserts timings.
//!
//! ```text
//! cargo run -p leasehold-operator --example scale -- 10000
//! ```

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use futures::StreamExt;
use kube::api::ListParams;
use kube::{Api, Client};
use leasehold_api::SecretLease;
use leasehold_backends::{
    Backend, BackendError, CredentialId, IssueRequest, RevokeOutcome, RevokeRequest, VerifyRequest,
};
use leasehold_operator::LIST_PAGE_SIZE;
use leasehold_operator::lease_controller::{Context, reconcile_cached, slim_for_cache};
use leasehold_operator::metrics::Metrics;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio::sync::Mutex;

/// A backend that accepts everything instantly.
#[derive(Debug)]
struct NoopBackend;

#[async_trait]
impl Backend for NoopBackend {
    fn kind(&self) -> &'static str {
        "noop"
    }
    fn target_key(&self) -> String {
        "noop".into()
    }
    async fn issue(&self, _: &IssueRequest) -> Result<(), BackendError> {
        Ok(())
    }
    async fn verify(&self, _: &VerifyRequest) -> Result<(), BackendError> {
        Ok(())
    }
    async fn revoke(&self, _: &RevokeRequest) -> Result<RevokeOutcome, BackendError> {
        Ok(RevokeOutcome::Revoked)
    }
    async fn can_login(&self, _: &CredentialId) -> Result<bool, BackendError> {
        Ok(true)
    }
    async fn list_users(&self, _: &str) -> Result<Vec<CredentialId>, BackendError> {
        Ok(Vec::new())
    }
    async fn ping(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

// ---------------------------------------------------------------- fake API (child) --

#[derive(Default)]
struct Fake {
    leases: Mutex<HashMap<String, Value>>,
    secrets: Mutex<HashMap<String, Value>>,
    writes: AtomicU64,
}

type Shared = Arc<Fake>;

fn status_json(code: u16, reason: &str) -> (StatusCode, axum::Json<Value>) {
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code}),
        ),
    )
}

/// The `fieldsV1` tree a real API server records for `value`.
fn fields_v1(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                out.insert(format!("f:{k}"), fields_v1(v));
            }
            Value::Object(out)
        }
        Value::Array(items) => {
            let mut out = serde_json::Map::new();
            for (i, v) in items.iter().enumerate() {
                let key = match v.get("type").or_else(|| v.get("version")) {
                    Some(k) => format!("k:{{\"type\":{k}}}"),
                    None => format!("i:{i}"),
                };
                let mut entry = fields_v1(v);
                if let Some(o) = entry.as_object_mut() {
                    o.insert(".".into(), json!({}));
                }
                out.insert(key, entry);
            }
            Value::Object(out)
        }
        _ => json!({}),
    }
}

/// Add the managedFields a real API server would return (the spec applied by a user,
/// the finalizer by the controller, the status by the controller).
fn with_managed_fields(mut lease: Value) -> Value {
    let entry = |manager: &str, sub: Option<&str>, fields: Value| {
        let mut e = json!({"manager": manager, "operation": "Apply", "apiVersion": "leasehold.dev/v1alpha1",
            "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": fields});
        if let Some(sub) = sub {
            e["subresource"] = json!(sub);
        }
        e
    };
    let mut managed = vec![
        entry(
            "kubectl",
            None,
            json!({"f:spec": fields_v1(&lease["spec"])}),
        ),
        entry(
            "leasehold-controller",
            None,
            json!({"f:metadata": {"f:finalizers": {".": {}, "v:\"leasehold.dev/revoke\"": {}}}}),
        ),
    ];
    if lease.get("status").is_some() {
        managed.push(entry(
            "leasehold-controller",
            Some("status"),
            json!({"f:status": fields_v1(&lease["status"])}),
        ));
    }
    lease["metadata"]["managedFields"] = Value::Array(managed);
    lease
}

async fn list_leases(State(f): State<Shared>, uri: axum::http::Uri) -> axum::Json<Value> {
    let q: HashMap<&str, &str> = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let leases = f.leases.lock().await;
    let mut names: Vec<&String> = leases.keys().collect();
    names.sort();
    let limit = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(usize::MAX);
    let start = q
        .get("continue")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0usize);
    let items: Vec<Value> = names
        .iter()
        .skip(start)
        .take(limit)
        .map(|n| with_managed_fields(leases[*n].clone()))
        .collect();
    let next = start + items.len();
    let cont = if next < names.len() {
        next.to_string()
    } else {
        String::new()
    };
    axum::Json(
        json!({"apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLeaseList",
        "metadata": {"resourceVersion": "1", "continue": cont}, "items": items}),
    )
}

async fn patch_status(
    State(f): State<Shared>,
    Path((_ns, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<axum::Json<Value>, (StatusCode, axum::Json<Value>)> {
    f.writes.fetch_add(1, Ordering::Relaxed);
    let body: Value = serde_json::from_slice(&body).map_err(|_| status_json(400, "BadRequest"))?;
    let mut leases = f.leases.lock().await;
    let lease = leases
        .get_mut(&name)
        .ok_or_else(|| status_json(404, "NotFound"))?;
    lease["status"] = body["status"].clone();
    Ok(axum::Json(lease.clone()))
}

async fn get_lease(
    State(f): State<Shared>,
    Path((_ns, name)): Path<(String, String)>,
) -> Result<axum::Json<Value>, (StatusCode, axum::Json<Value>)> {
    let leases = f.leases.lock().await;
    let lease = leases
        .get(&name)
        .ok_or_else(|| status_json(404, "NotFound"))?;
    Ok(axum::Json(with_managed_fields(lease.clone())))
}

async fn get_policy(Path((ns, name)): Path<(String, String)>) -> axum::Json<Value> {
    axum::Json(json!({
        "apiVersion": "leasehold.dev/v1alpha1", "kind": "RotationPolicy",
        "metadata": {"name": name, "namespace": ns, "generation": 1},
        "spec": {"ttl": "3h"}
    }))
}

async fn get_secret(
    State(f): State<Shared>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<axum::Json<Value>, (StatusCode, axum::Json<Value>)> {
    if name == "db-admin" {
        return Ok(axum::Json(json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns},
            "stringData": {"username": "admin", "password": "not-used"}
        })));
    }
    f.secrets
        .lock()
        .await
        .get(&name)
        .cloned()
        .map(axum::Json)
        .ok_or_else(|| status_json(404, "NotFound"))
}

async fn patch_secret(
    State(f): State<Shared>,
    Path((_ns, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> axum::Json<Value> {
    f.writes.fetch_add(1, Ordering::Relaxed);
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    f.secrets.lock().await.insert(name, body.clone());
    axum::Json(body)
}

async fn writes(State(f): State<Shared>) -> String {
    f.writes.load(Ordering::Relaxed).to_string()
}

async fn serve_fake(n: usize) {
    let fake = Arc::new(Fake::default());
    {
        let mut leases = fake.leases.lock().await;
        for i in 0..n {
            let name = format!("lease-{i:05}");
            leases.insert(
                name.clone(),
                json!({
                    "apiVersion": "leasehold.dev/v1alpha1", "kind": "SecretLease",
                    "metadata": {"name": name, "namespace": "bench", "uid": format!("00000000-0000-4000-8000-{i:012x}"),
                                 "generation": 1, "finalizers": ["leasehold.dev/revoke"]},
                    "spec": {"policyRef": {"name": "bench"},
                             "postgres": {"host": "db.bench.svc", "database": "app", "adminSecretRef": {"name": "db-admin"}, "tls": {"mode": "Disable"}}}
                }),
            );
        }
    }
    let app = Router::new()
        .route(
            "/apis/leasehold.dev/v1alpha1/secretleases",
            get(list_leases),
        )
        .route(
            "/apis/leasehold.dev/v1alpha1/namespaces/{ns}/secretleases/{name}",
            get(get_lease),
        )
        .route(
            "/apis/leasehold.dev/v1alpha1/namespaces/{ns}/secretleases/{name}/status",
            axum::routing::patch(patch_status),
        )
        .route(
            "/apis/leasehold.dev/v1alpha1/namespaces/{ns}/rotationpolicies/{name}",
            get(get_policy),
        )
        .route(
            "/api/v1/namespaces/{ns}/secrets/{name}",
            get(get_secret).patch(patch_secret),
        )
        .route(
            "/apis/events.k8s.io/v1/namespaces/{ns}/events",
            post(|| async { StatusCode::CREATED }),
        )
        .route("/writes", get(writes))
        .with_state(fake);
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot bind: {e}");
            return;
        }
    };
    if let Ok(addr) = listener.local_addr() {
        println!("{}", addr.port());
    }
    let _ = axum::serve(listener, app).await;
}

// ------------------------------------------------------------ controller (parent) --

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

async fn api_writes(base: &str) -> u64 {
    // A tiny HTTP GET over a raw socket keeps the example free of another HTTP client.
    let Ok(mut s) = tokio::net::TcpStream::connect(base.trim_start_matches("http://")).await else {
        return 0;
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = s
        .write_all(b"GET /writes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out.rsplit("\r\n\r\n")
        .next()
        .and_then(|b| b.trim().parse().ok())
        .unwrap_or(0)
}

/// `SCALE_FULL_OBJECTS=1`: cache whole objects (to compare with the slim cache).
fn keep_full_objects() -> bool {
    std::env::var_os("SCALE_FULL_OBJECTS").is_some()
}

/// List in pages, as the controller's watcher does.
async fn list_paged(client: &Client) -> Vec<SecretLease> {
    let api = Api::<SecretLease>::all(client.clone());
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut lp = ListParams::default().limit(LIST_PAGE_SIZE);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let Ok(page) = api.list(&lp).await else { break };
        out.extend(page.items.into_iter().map(|mut l| {
            // As the controller's cache does (see `run_controllers`).
            if !keep_full_objects() {
                slim_for_cache(&mut l);
            }
            l
        }));
        token = page.metadata.continue_.filter(|t| !t.is_empty());
        if token.is_none() {
            break;
        }
    }
    out
}

async fn pass(
    client: &Client,
    ctx: &Arc<Context>,
    concurrency: usize,
) -> (usize, usize, std::time::Duration) {
    let before = vm_rss_kib();
    let leases = list_paged(client).await;
    let n = leases.len();
    println!(
        "  listed {n} leases: VmRSS {:.1} -> {:.1} MiB",
        before as f64 / 1024.0,
        vm_rss_kib() as f64 / 1024.0
    );
    let started = Instant::now();
    let failures = futures::stream::iter(leases.into_iter().map(|l| {
        let ctx = ctx.clone();
        async move {
            match reconcile_cached(Arc::new(l), ctx).await {
                Ok(_) => false,
                Err(e) => {
                    static SHOWN: std::sync::Once = std::sync::Once::new();
                    SHOWN.call_once(|| eprintln!("first failure: {e}"));
                    true
                }
            }
        }
    }))
    .buffer_unordered(concurrency)
    .filter(|failed| std::future::ready(*failed))
    .count()
    .await;
    (n, failures, started.elapsed())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve-fake") {
        let n = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(1000);
        serve_fake(n).await;
        return;
    }
    let n: usize = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(10_000);
    let concurrency = 16;
    let Ok(exe) = std::env::current_exe() else {
        eprintln!("cannot find this executable");
        return;
    };
    let mut child = match tokio::process::Command::new(exe)
        .args(["--serve-fake", &n.to_string()])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot start the fake API: {e}");
            return;
        }
    };
    let Some(stdout) = child.stdout.take() else {
        return;
    };
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let Ok(Some(port)) = lines.next_line().await else {
        eprintln!("the fake API did not start");
        return;
    };
    let base = format!("http://127.0.0.1:{}", port.trim());
    let Ok(uri) = base.parse() else { return };
    let config = kube::Config::new(uri);
    let client = match Client::try_from(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("client: {e}");
            return;
        }
    };
    let rss_start = vm_rss_kib();
    let mut ctx = Context::new(client.clone(), Arc::new(Metrics::new()), None, 1);
    ctx.backend_override = Some(Arc::new(NoopBackend));
    let ctx = Arc::new(ctx);

    let (count, failed, took) = pass(&client, &ctx, concurrency).await;
    let writes_initial = api_writes(&base).await;
    println!(
        "initial pass: {count} leases issued in {:.1} s ({failed} failed), {writes_initial} API writes",
        took.as_secs_f64()
    );
    let mut resync = pass(&client, &ctx, concurrency).await;
    // Extra resyncs (SCALE_RESYNCS) show whether memory keeps growing or settles.
    let extra: usize = std::env::var("SCALE_RESYNCS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    for i in 0..extra {
        println!(
            "  after resync {}: VmRSS {:.1} MiB",
            i + 1,
            vm_rss_kib() as f64 / 1024.0
        );
        resync = pass(&client, &ctx, concurrency).await;
    }
    let (count, failed, took) = resync;
    let writes_resync = api_writes(&base).await - writes_initial;
    let rss = vm_rss_kib();
    println!(
        "no-op resync: {count} leases in {:.1} s ({:.0} leases/s, {failed} failed), {writes_resync} API writes (target 0), target < 50 s",
        took.as_secs_f64(),
        count as f64 / took.as_secs_f64().max(1e-9)
    );
    // Keep the leases alive as a controller's cache would while measuring.
    let cache = list_paged(&client).await;
    let rss_cached = vm_rss_kib();
    println!(
        "VmRSS: {:.1} MiB at start, {:.1} MiB after the resync, {:.1} MiB holding all {} leases (target <= 64 MiB)",
        rss_start as f64 / 1024.0,
        rss as f64 / 1024.0,
        rss_cached as f64 / 1024.0,
        cache.len()
    );
    let _ = child.kill().await;
}
