//! Where lines go: stdout, an append-only file, and (best effort) a webhook.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use crate::AuditError;

/// A destination of the audit stream.
///
/// `Debug` shows only the scheme and host of a webhook URL: webhook URLs often carry a
/// token in their path or query.
#[derive(Clone, PartialEq, Eq)]
pub enum Sink {
    /// The process's standard output, one line per record.
    Stdout,
    /// A file opened for append (created with mode 0600), fsynced at every checkpoint.
    File(PathBuf),
    /// HTTP(S) POST of batches of lines (`application/x-ndjson`). Best effort: a
    /// bounded queue, capped retries; what cannot be delivered is counted in
    /// `leasehold_audit_write_failures_total{sink="webhook"}`, never waited for.
    Webhook { url: String },
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stdout => f.write_str("Stdout"),
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
            Self::Webhook { url } => {
                let shown = url
                    .parse::<http::Uri>()
                    .ok()
                    .and_then(|uri| {
                        Some(format!(
                            "{}://{}/[redacted]",
                            uri.scheme_str()?,
                            uri.host()?
                        ))
                    })
                    .unwrap_or_else(|| "[redacted]".to_owned());
                f.debug_struct("Webhook").field("url", &shown).finish()
            }
        }
    }
}

/// A synchronous destination written under the chain lock.
#[derive(Debug)]
pub(crate) enum LineWriter {
    Stdout,
    File { path: PathBuf, file: Arc<File> },
}

impl LineWriter {
    pub(crate) fn open_file(path: &PathBuf) -> Result<Self, AuditError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(AuditError::io(format!(
                "cannot open audit file {}",
                path.display()
            )))?;
        end_with_newline(&file).map_err(AuditError::io(format!(
            "cannot repair the end of {}",
            path.display()
        )))?;
        Ok(Self::File {
            path: path.clone(),
            file: Arc::new(file),
        })
    }

    /// The metric label of this sink.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::File { .. } => "file",
        }
    }

    /// Write one line. `line` ends with a newline and is written with a single
    /// `write` to an `O_APPEND` file, so concurrent writers never interleave.
    pub(crate) fn write_line(&self, line: &str) -> std::io::Result<()> {
        match self {
            Self::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(line.as_bytes())?;
                out.flush()
            }
            Self::File { file, .. } => (&**file).write_all(line.as_bytes()),
        }
    }

    /// The file to fsync at a checkpoint, if any.
    pub(crate) fn durable_file(&self) -> Option<(PathBuf, Arc<File>)> {
        match self {
            Self::Stdout => None,
            Self::File { path, file } => Some((path.clone(), file.clone())),
        }
    }
}

/// After a crash the file may end in a torn line; start the next record on a line of
/// its own (the verifier forgives a torn line right before a restart).
fn end_with_newline(file: &File) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut last = [0u8; 1];
    file.read_exact_at(&mut last, len - 1)?;
    if last[0] != b'\n' {
        (&*file).write_all(b"\n")?;
    }
    Ok(())
}

/// Settings of the webhook delivery.
#[derive(Clone, Debug)]
pub(crate) struct WebhookSettings {
    pub batch: usize,
    pub attempts: u32,
    pub timeout: Duration,
    pub backoff: Duration,
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

pub(crate) fn webhook_uri(url: &str) -> Result<http::Uri, AuditError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| AuditError::Config(format!("bad webhook URL: {e}")))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some() => Ok(uri),
        _ => Err(AuditError::Config(
            "the webhook URL must be http:// or https:// with a host".to_owned(),
        )),
    }
}

fn http_client() -> Result<HttpClient, AuditError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| AuditError::Config(format!("TLS setup: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

/// The webhook task: batches whatever is queued, POSTs it, retries a few times, then
/// counts the batch's lines as failed. Ends when the queue's sender is dropped and the
/// queue is drained.
pub(crate) struct WebhookWorker {
    uri: http::Uri,
    client: HttpClient,
    settings: WebhookSettings,
    failures: Counter,
}

impl WebhookWorker {
    pub(crate) fn new(
        uri: http::Uri,
        settings: WebhookSettings,
        failures: Counter,
    ) -> Result<Self, AuditError> {
        Ok(Self {
            uri,
            client: http_client()?,
            settings,
            failures,
        })
    }

    pub(crate) async fn run(self, mut queue: mpsc::Receiver<String>) {
        let mut batch: Vec<String> = Vec::with_capacity(self.settings.batch);
        while let Some(line) = queue.recv().await {
            batch.push(line);
            while batch.len() < self.settings.batch {
                match queue.try_recv() {
                    Ok(line) => batch.push(line),
                    Err(_) => break,
                }
            }
            let body = Bytes::from(batch.concat());
            if let Err(error) = self.post_with_retries(body).await {
                tracing::warn!(%error, records = batch.len(), "audit webhook delivery failed; records are only in the other sinks");
                self.failures.inc_by(batch.len() as u64);
            }
            batch.clear();
        }
    }

    async fn post_with_retries(&self, body: Bytes) -> Result<(), String> {
        let mut last_error = String::new();
        for attempt in 0..self.settings.attempts.max(1) {
            if attempt > 0 {
                tokio::time::sleep(self.settings.backoff * 2u32.saturating_pow(attempt - 1)).await;
            }
            match self.post(body.clone()).await {
                Ok(()) => return Ok(()),
                Err(error) => last_error = error,
            }
        }
        Err(last_error)
    }

    async fn post(&self, body: Bytes) -> Result<(), String> {
        let request = http::Request::post(self.uri.clone())
            .header(http::header::CONTENT_TYPE, "application/x-ndjson")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(self.settings.timeout, self.client.request(request))
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("status {}", response.status()))
        }
    }
}
