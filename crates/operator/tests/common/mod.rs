//! A scripted Kubernetes API for reconcile tests: each expected request is checked
//! (method and path), answered, and recorded; a missing request fails fast, an
//! unexpected one fails the test. Events are answered whenever they come.

#![allow(dead_code)]

use std::time::Duration;

use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

type Reply = Box<dyn FnMut(&Value, &mut Value) -> (u16, Value) + Send>;

/// One expected request.
pub struct Step {
    method: Method,
    path: String,
    /// Also accept any number of directly following requests like this one.
    repeat: bool,
    reply: Reply,
}

impl Step {
    pub fn new(
        method: Method,
        path: &str,
        reply: impl FnMut(&Value, &mut Value) -> (u16, Value) + Send + 'static,
    ) -> Self {
        Self {
            method,
            path: path.into(),
            repeat: false,
            reply: Box::new(reply),
        }
    }
    pub fn repeated(mut self) -> Self {
        self.repeat = true;
        self
    }
}

/// What the API saw.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// (method, path, body) of every non-event request, in order.
    pub requests: Vec<(Method, String, Value)>,
    /// Bodies of the events posted.
    pub events: Vec<Value>,
}

impl Seen {
    pub fn bodies(&self, method: &Method, path: &str) -> Vec<Value> {
        self.requests
            .iter()
            .filter(|(m, p, _)| m == method && p == path)
            .map(|(_, _, b)| b.clone())
            .collect()
    }
    pub fn event_reasons(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| e["reason"].as_str().map(String::from))
            .collect()
    }
}

pub fn not_found() -> (u16, Value) {
    (
        404,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "not found", "reason": "NotFound", "code": 404}),
    )
}

fn is_event(path: &str) -> bool {
    path.starts_with("/apis/events.k8s.io/")
}

/// A client whose requests are checked against `steps`; `state` is shared with the
/// replies (for example the lease object that status patches update). Returns the
/// client and a handle that yields what was seen once the script ran and nothing else
/// came within `settle`.
pub fn scripted(
    steps: Vec<Step>,
    state: Value,
) -> (Client, tokio::task::JoinHandle<(Seen, Value)>) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let task = tokio::spawn(async move {
        let mut handle = Box::pin(handle);
        let mut state = state;
        let mut seen = Seen::default();
        let mut pending: Option<(
            Request<Body>,
            tower_test::mock::SendResponse<Response<Body>>,
        )> = None;
        let settle = Duration::from_millis(500);
        let step_timeout = Duration::from_secs(30);
        let mut steps = steps.into_iter().peekable();
        loop {
            let expecting = steps.peek().is_some();
            let next = match pending.take() {
                Some(p) => Some(p),
                None => {
                    let wait = if expecting { step_timeout } else { settle };
                    match tokio::time::timeout(wait, handle.as_mut().next_request()).await {
                        Ok(Some(r)) => Some(r),
                        Ok(None) => None,
                        Err(_) if expecting => {
                            let s = steps
                                .peek()
                                .map(|s| format!("{} {}", s.method, s.path))
                                .unwrap_or_default();
                            panic!(
                                "timed out waiting for {s}; seen so far: {:#?}",
                                summary(&seen)
                            );
                        }
                        Err(_) => None,
                    }
                }
            };
            let Some((request, send)) = next else { break };
            let method = request.method().clone();
            let path = request.uri().path().to_string();
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            if is_event(&path) {
                seen.events.push(body.clone());
                respond(send, 201, body);
                continue;
            }
            let Some(step) = steps.peek_mut() else {
                panic!(
                    "unexpected request {method} {path}: {body}\nseen: {:#?}",
                    summary(&seen)
                );
            };
            if step.method != method || step.path != path {
                panic!(
                    "expected {} {}, got {method} {path}: {body}\nseen: {:#?}",
                    step.method,
                    step.path,
                    summary(&seen)
                );
            }
            let (code, reply) = (step.reply)(&body, &mut state);
            seen.requests.push((method.clone(), path.clone(), body));
            respond(send, code, reply);
            if step.repeat {
                // Look at the next request: the same kind stays on this step.
                // Events in between are answered here.
                let wait = if steps.len() > 1 {
                    step_timeout
                } else {
                    settle
                };
                loop {
                    match tokio::time::timeout(wait, handle.as_mut().next_request()).await {
                        Ok(Some((r, s))) if is_event(r.uri().path()) => {
                            let bytes = r.into_body().collect_bytes().await.unwrap();
                            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                            seen.events.push(body.clone());
                            respond(s, 201, body);
                        }
                        Ok(Some((r, s))) => {
                            let same = r.method() == method && r.uri().path() == path;
                            if !same {
                                steps.next();
                            }
                            pending = Some((r, s));
                            break;
                        }
                        _ => {
                            steps.next();
                            break;
                        }
                    }
                }
            } else {
                steps.next();
            }
        }
        (seen, state)
    });
    (client, task)
}

fn summary(seen: &Seen) -> Vec<String> {
    seen.requests
        .iter()
        .map(|(m, p, _)| format!("{m} {p}"))
        .collect()
}

fn respond(send: tower_test::mock::SendResponse<Response<Body>>, code: u16, body: Value) {
    let response = Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap();
    send.send_response(response);
}

/// Reply with the object in `state` after setting its status from an apply body.
pub fn apply_status(body: &Value, state: &mut Value) -> (u16, Value) {
    state["status"] = body["status"].clone();
    (200, state.clone())
}

/// Reply with the request body as the object (server-side apply of a new object).
pub fn echo(body: &Value, _: &mut Value) -> (u16, Value) {
    let mut b = body.clone();
    b["metadata"]["namespace"] = json!("shop");
    (200, b)
}
