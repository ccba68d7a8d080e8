//! A tiny in-process Kubernetes API for the controller smoke test: namespaced objects
//! in memory; GET/LIST, watches that stay open, server-side apply (whole object or
//! status), events. Only what the controller uses.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::Mutex;

#[derive(Default)]
pub struct FakeApi {
    /// (namespace, plural) -> name -> object
    pub objects: Mutex<HashMap<(String, String), BTreeMap<String, Value>>>,
    /// (method, path) of every write.
    pub writes: Mutex<Vec<(String, String, Value)>>,
    /// resourceVersion counter for creates and replaces.
    pub versions: std::sync::atomic::AtomicU64,
}

impl FakeApi {
    pub async fn insert(&self, plural: &str, object: Value) {
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap()
            .to_string();
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        self.objects
            .lock()
            .await
            .entry((ns, plural.into()))
            .or_default()
            .insert(name, object);
    }

    pub async fn get(&self, ns: &str, plural: &str, name: &str) -> Option<Value> {
        self.objects
            .lock()
            .await
            .get(&(ns.into(), plural.into()))
            .and_then(|m| m.get(name).cloned())
    }
}

fn json_response(code: StatusCode, v: Value) -> Response {
    (code, [("content-type", "application/json")], v.to_string()).into_response()
}

fn not_found() -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
    )
}

async fn handle(api: Arc<FakeApi>, method: Method, uri: Uri, body: Bytes) -> Response {
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or_default().to_string();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let Some(i) = segs.iter().position(|s| *s == "namespaces") else {
        return not_found();
    };
    let (Some(ns), Some(plural)) = (segs.get(i + 1), segs.get(i + 2)) else {
        return not_found();
    };
    let key = (ns.to_string(), plural.to_string());
    let name = segs.get(i + 3).map(|s| s.to_string());
    let sub = segs.get(i + 4).copied();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    match (method, name) {
        (Method::POST, None) if *plural == "events" => json_response(StatusCode::CREATED, body),
        (Method::GET, None) if query.contains("watch=true") => {
            // A watch that never sends anything: the controller keeps its listed state.
            Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(Body::from_stream(futures::stream::pending::<
                    Result<Bytes, std::io::Error>,
                >()))
                .unwrap()
        }
        (Method::GET, None) => {
            let objects = api.objects.lock().await;
            let items: Vec<Value> = objects
                .get(&key)
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default();
            let selector = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("labelSelector="))
                .map(|s| s.replace("%3D", "=").replace("%2F", "/"));
            let items: Vec<Value> = items
                .into_iter()
                .filter(|o| match &selector {
                    Some(sel) => sel.split(',').all(|kv| match kv.split_once('=') {
                        Some((k, v)) => o["metadata"]["labels"][k] == v,
                        None => true,
                    }),
                    None => true,
                })
                .collect();
            json_response(
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
            )
        }
        (Method::GET, Some(name)) => match api.get(ns, plural, &name).await {
            Some(o) => json_response(StatusCode::OK, o),
            None => not_found(),
        },
        (Method::PATCH, Some(name)) => {
            api.writes
                .lock()
                .await
                .push(("PATCH".into(), path.clone(), body.clone()));
            let mut objects = api.objects.lock().await;
            let coll = objects.entry(key).or_default();
            if sub == Some("status") {
                let Some(o) = coll.get_mut(&name) else {
                    return not_found();
                };
                o["status"] = body["status"].clone();
                json_response(StatusCode::OK, o.clone())
            } else if body.is_array() {
                // A JSON patch (finalizers): not needed by the smoke test.
                match coll.get(&name) {
                    Some(o) => json_response(StatusCode::OK, o.clone()),
                    None => not_found(),
                }
            } else {
                let mut o = body.clone();
                o["metadata"]["namespace"] = json!(ns);
                o["metadata"]["uid"] = json!(format!("uid-{name}"));
                coll.insert(name, o.clone());
                json_response(StatusCode::OK, o)
            }
        }
        // Create: 409 when it exists.
        (Method::POST, None) => {
            let Some(name) = body["metadata"]["name"].as_str().map(String::from) else {
                return json_response(StatusCode::UNPROCESSABLE_ENTITY, json!({}));
            };
            let mut objects = api.objects.lock().await;
            let coll = objects.entry(key).or_default();
            if coll.contains_key(&name) {
                return conflict();
            }
            let mut o = body.clone();
            o["metadata"]["namespace"] = json!(ns);
            o["metadata"]["resourceVersion"] = json!(next_version(&api));
            coll.insert(name, o.clone());
            json_response(StatusCode::CREATED, o)
        }
        // Replace with optimistic concurrency: 409 unless resourceVersion matches.
        (Method::PUT, Some(name)) => {
            let mut objects = api.objects.lock().await;
            let coll = objects.entry(key).or_default();
            let Some(current) = coll.get(&name) else {
                return not_found();
            };
            if body["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                return conflict();
            }
            let mut o = body.clone();
            o["metadata"]["resourceVersion"] = json!(next_version(&api));
            coll.insert(name, o.clone());
            json_response(StatusCode::OK, o)
        }
        _ => not_found(),
    }
}

fn conflict() -> Response {
    json_response(
        StatusCode::CONFLICT,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "conflict"}),
    )
}

fn next_version(api: &FakeApi) -> String {
    (api.versions
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        + 1)
    .to_string()
}

/// Serve on a random loopback port; returns the base URL.
pub async fn serve(api: Arc<FakeApi>) -> String {
    serve_partitionable(api).await.0
}

/// Like [`serve`], with a switch: while it is on, requests through this URL get no
/// answer (a partition between one client and the API; other URLs still work).
pub async fn serve_partitionable(api: Arc<FakeApi>) -> (String, Arc<AtomicBool>) {
    let partitioned = Arc::new(AtomicBool::new(false));
    let cut = partitioned.clone();
    let app = Router::new().fallback(move |method: Method, uri: Uri, body: Bytes| {
        let api = api.clone();
        let cut = cut.clone();
        async move {
            if cut.load(Ordering::SeqCst) {
                futures::future::pending::<()>().await;
            }
            handle(api, method, uri, body).await
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), partitioned)
}
