//! HTTP-01 challenge responder: a small HTTP server answering
//! `/.well-known/acme-challenge/<token>` from an in-memory map.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::AcmeError;

type Tokens = Arc<RwLock<HashMap<String, String>>>;

/// Serves HTTP-01 key authorizations until dropped.
pub struct Http01Solver {
    local_addr: SocketAddr,
    tokens: Tokens,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Http01Solver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http01Solver")
            .field("local_addr", &self.local_addr)
            .field("tokens", &self.tokens.read().map_or(0, |t| t.len()))
            .finish()
    }
}

impl Http01Solver {
    /// Listen on `addr` (e.g. `127.0.0.1:0` in tests, `0.0.0.0:8089` behind a
    /// Service that the CA reaches on port 80).
    pub async fn bind(addr: SocketAddr) -> Result<Self, AcmeError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(AcmeError::Solver)?;
        let local_addr = listener.local_addr().map_err(AcmeError::Solver)?;
        let tokens = Tokens::default();
        let app = Router::new()
            .route("/.well-known/acme-challenge/{token}", get(challenge))
            .with_state(tokens.clone());
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "HTTP-01 solver stopped");
            }
        });
        Ok(Self {
            local_addr,
            tokens,
            server,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Answer `token` with `key_authorization` from now on.
    pub fn add(&self, token: &str, key_authorization: &str) {
        if let Ok(mut tokens) = self.tokens.write() {
            tokens.insert(token.to_owned(), key_authorization.to_owned());
        }
    }

    /// Stop answering `token`.
    pub fn remove(&self, token: &str) {
        if let Ok(mut tokens) = self.tokens.write() {
            tokens.remove(token);
        }
    }

    /// How many tokens are being served.
    pub fn len(&self) -> usize {
        self.tokens.read().map_or(0, |t| t.len())
    }

    /// Whether no token is being served.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Http01Solver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn challenge(State(tokens): State<Tokens>, Path(token): Path<String>) -> Response {
    let answer = tokens.read().ok().and_then(|t| t.get(&token).cloned());
    match answer {
        Some(key_authorization) => (
            [(header::CONTENT_TYPE, "application/octet-stream")],
            key_authorization,
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}
