//! The writer: [`AuditLog`].

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::record::{
    ChainPosition, ChainStartBody, CheckpointBody, GENESIS_HASH, RecordKind, checkpoint_message,
    encode_line,
};
use crate::sink::{LineWriter, Sink, WebhookSettings, WebhookWorker, webhook_uri};
use crate::store::{Checkpoint, CheckpointStore};
use crate::{AuditError, AuditEvent, AuditSigner};

/// Metric label of a failed checkpoint save.
const STORE_SINK_LABEL: &str = "checkpoint_store";
/// Metric label of webhook failures.
const WEBHOOK_SINK_LABEL: &str = "webhook";

/// Tunables of an [`AuditLog`].
#[derive(Clone, Debug)]
pub struct AuditSettings {
    /// A checkpoint after this many records (events and chain starts).
    pub checkpoint_every: u64,
    /// A checkpoint after this long if anything was written since the last one.
    pub checkpoint_interval: Duration,
    /// Lines queued for each webhook before new ones are dropped (and counted).
    pub webhook_queue: usize,
    /// Most lines per webhook POST.
    pub webhook_batch: usize,
    /// POSTs tried per batch before it is given up (and counted).
    pub webhook_attempts: u32,
    /// Timeout of one POST.
    pub webhook_timeout: Duration,
    /// Wait before the first retry; doubled for each further one.
    pub webhook_backoff: Duration,
    /// How long [`AuditLog::shutdown`] waits for the webhook queues to drain.
    pub shutdown_timeout: Duration,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            checkpoint_every: 100,
            checkpoint_interval: Duration::from_secs(60),
            webhook_queue: 10_000,
            webhook_batch: 500,
            webhook_attempts: 3,
            webhook_timeout: Duration::from_secs(10),
            webhook_backoff: Duration::from_millis(500),
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabels {
    sink: String,
}

/// The audit trail's metrics. Register them before the log exists (a process
/// registers its metrics once, and leads — and starts its audit log — later), then
/// hand them to [`AuditLog::start_with_metrics`].
#[derive(Clone, Debug, Default)]
pub struct AuditMetrics {
    records: Family<ActionLabels, Counter>,
    failures: Family<SinkLabels, Counter>,
    last_checkpoint_seq: Gauge,
}

impl AuditMetrics {
    /// Metrics registered in `registry`: `leasehold_audit_records_total{action}`,
    /// `leasehold_audit_write_failures_total{sink}` and
    /// `leasehold_audit_last_checkpoint_seq`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        metrics.register_in(registry);
        metrics
    }

    fn register_in(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("leasehold_audit");
        sub.register(
            "records",
            "Audit records written, by action (chain_start and checkpoint included)",
            self.records.clone(),
        );
        sub.register(
            "write_failures",
            "Audit records a sink did not take (failed file or stdout write, webhook batch given up or queue full), by sink; failed checkpoint saves count as sink=checkpoint_store",
            self.failures.clone(),
        );
        sub.register(
            "last_checkpoint_seq",
            "Seq of the last checkpoint record saved to the checkpoint store",
            self.last_checkpoint_seq.clone(),
        );
    }

    fn record(&self, action: &str) {
        self.records
            .get_or_create(&ActionLabels {
                action: action.to_owned(),
            })
            .inc();
    }

    fn failure(&self, sink: &str) -> Counter {
        self.failures
            .get_or_create(&SinkLabels {
                sink: sink.to_owned(),
            })
            .clone()
    }
}

/// A checkpoint to fsync and save, and who waits for it.
struct PersistRequest {
    checkpoint: Checkpoint,
    done: Option<oneshot::Sender<()>>,
}

/// The head of the chain and the synchronous sinks, behind one lock.
struct Chain {
    seq: u64,
    head: String,
    since_checkpoint: u64,
    checkpoint_every: u64,
    signer: AuditSigner,
    writers: Vec<LineWriter>,
    webhooks: Vec<mpsc::Sender<String>>,
    persist: Option<mpsc::UnboundedSender<PersistRequest>>,
    metrics: AuditMetrics,
}

impl Chain {
    fn append(&mut self, kind: RecordKind, body: &str, action: &str) {
        let seq = self.seq + 1;
        let time = jiff::Timestamp::now().to_string();
        let (mut line, hash) = encode_line(seq, &time, &self.head, kind, body);
        line.push('\n');
        for writer in &self.writers {
            if let Err(error) = writer.write_line(&line) {
                tracing::error!(%error, sink = writer.label(), seq, "cannot write an audit record");
                self.metrics.failure(writer.label()).inc();
            }
        }
        for queue in &self.webhooks {
            if queue.try_send(line.clone()).is_err() {
                self.metrics.failure(WEBHOOK_SINK_LABEL).inc();
            }
        }
        self.seq = seq;
        self.head = hash;
        if kind != RecordKind::Checkpoint {
            self.since_checkpoint += 1;
        }
        self.metrics.record(action);
    }

    fn append_json<T: serde::Serialize>(&mut self, kind: RecordKind, body: &T, action: &str) {
        match serde_json::to_string(body) {
            Ok(json) => self.append(kind, &json, action),
            // Not reachable with the crate's types (string keys, no floats); logged anyway.
            Err(error) => tracing::error!(%error, action, "cannot encode an audit record"),
        }
    }

    fn checkpoint_if_pending(&mut self, done: Option<oneshot::Sender<()>>) {
        if self.since_checkpoint > 0 {
            self.checkpoint(done);
        }
    }

    fn checkpoint(&mut self, done: Option<oneshot::Sender<()>>) {
        let signature = self
            .signer
            .sign_base64(&checkpoint_message(self.seq, &self.head));
        let body = CheckpointBody {
            seq: self.seq,
            hash: self.head.clone(),
            key_id: self.signer.key_id().to_owned(),
            signature,
        };
        self.append_json(RecordKind::Checkpoint, &body, "checkpoint");
        self.since_checkpoint = 0;
        let checkpoint = Checkpoint {
            seq: body.seq,
            hash: body.hash,
            signature: body.signature,
            key_id: body.key_id,
            record_seq: self.seq,
            record_hash: self.head.clone(),
        };
        if let Some(persist) = &self.persist {
            // A send error means the persister is gone (shutdown); `done` is dropped,
            // which wakes a waiter.
            let _ = persist.send(PersistRequest { checkpoint, done });
        }
    }
}

#[derive(Default)]
struct Tasks {
    ticker: Option<JoinHandle<()>>,
    persister: Option<JoinHandle<()>>,
    webhooks: Vec<JoinHandle<()>>,
}

struct Inner {
    chain: Mutex<Chain>,
    tasks: Mutex<Tasks>,
    shutdown_timeout: Duration,
}

impl Inner {
    fn chain(&self) -> MutexGuard<'_, Chain> {
        // A panic while holding the lock cannot leave the chain half-updated in a way
        // that matters more than losing the audit trail, so keep going.
        self.chain.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The audit trail writer. Cheap to clone; [`AuditLog::record`] can be called from sync
/// and async code.
///
/// # Why a mutex and not a queue
///
/// `record` takes a std mutex, assigns the next seq, hashes, and writes the line to
/// stdout and the file with one `write` each before returning. Lines are small and the
/// writes go to the page cache, so the lock is held for microseconds (see the bench),
/// and nothing is ever dropped or reordered between `record` returning and the line
/// being in the file: no queue that can fill up, and a crashed process loses nothing it
/// reported as recorded (only an OS crash can lose what was not yet fsynced; the file
/// is fsynced at every checkpoint). The slow parts never run under the lock: fsync and
/// the checkpoint store save run in a background task, and webhooks get lines through
/// a bounded queue that never blocks (a full queue counts the line as a webhook
/// failure; the webhook is best effort, the file is the record).
#[derive(Clone)]
pub struct AuditLog {
    inner: Option<Arc<Inner>>,
    metrics: AuditMetrics,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("enabled", &self.inner.is_some())
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// A log that records nothing (components and tests without an audit trail).
    pub fn disabled() -> Self {
        Self {
            inner: None,
            metrics: AuditMetrics::default(),
        }
    }

    /// Start writing: load the last checkpoint from `store`, open the sinks, write a
    /// `chain_start` record continuing from that checkpoint (or a new chain), and start
    /// the background tasks (periodic checkpoints, fsync + save, webhooks). Must be
    /// called inside a Tokio runtime.
    pub async fn start(
        sinks: Vec<Sink>,
        signer: AuditSigner,
        store: Arc<dyn CheckpointStore>,
        settings: AuditSettings,
    ) -> Result<Self, AuditError> {
        Self::start_with_metrics(sinks, signer, store, settings, AuditMetrics::default()).await
    }

    /// [`AuditLog::start`], counting into `metrics` (registered earlier with
    /// [`AuditMetrics::register`]).
    pub async fn start_with_metrics(
        sinks: Vec<Sink>,
        signer: AuditSigner,
        store: Arc<dyn CheckpointStore>,
        settings: AuditSettings,
        metrics: AuditMetrics,
    ) -> Result<Self, AuditError> {
        let resume = store.load().await?;
        let mut writers = Vec::new();
        let mut webhook_uris = Vec::new();
        for sink in &sinks {
            match sink {
                Sink::Stdout => writers.push(LineWriter::Stdout),
                Sink::File(path) => writers.push(LineWriter::open_file(path)?),
                Sink::Webhook { url } => webhook_uris.push(webhook_uri(url)?),
            }
        }
        // Series at 0 from the start, so rates and alerts work before the first failure.
        for writer in &writers {
            metrics.failure(writer.label());
        }
        metrics.failure(STORE_SINK_LABEL);
        let mut tasks = Tasks::default();
        let mut webhooks = Vec::new();
        for uri in webhook_uris {
            let worker = WebhookWorker::new(
                uri,
                WebhookSettings {
                    batch: settings.webhook_batch.max(1),
                    attempts: settings.webhook_attempts,
                    timeout: settings.webhook_timeout,
                    backoff: settings.webhook_backoff,
                },
                metrics.failure(WEBHOOK_SINK_LABEL),
            )?;
            let (queue, receiver) = mpsc::channel(settings.webhook_queue.max(1));
            webhooks.push(queue);
            tasks.webhooks.push(tokio::spawn(worker.run(receiver)));
        }
        if let Some(checkpoint) = &resume {
            metrics
                .last_checkpoint_seq
                .set(i64::try_from(checkpoint.record_seq).unwrap_or(i64::MAX));
        }
        let (persist, persist_requests) = mpsc::unbounded_channel();
        let durable_files = writers
            .iter()
            .filter_map(LineWriter::durable_file)
            .collect();
        tasks.persister = Some(tokio::spawn(run_persister(
            persist_requests,
            durable_files,
            store,
            metrics.clone(),
        )));

        let resumed_from = resume.map(|checkpoint| ChainPosition {
            seq: checkpoint.record_seq,
            hash: checkpoint.record_hash,
        });
        let mut chain = Chain {
            seq: resumed_from.as_ref().map_or(0, |at| at.seq),
            head: resumed_from
                .as_ref()
                .map_or_else(|| GENESIS_HASH.to_owned(), |at| at.hash.clone()),
            since_checkpoint: 0,
            checkpoint_every: settings.checkpoint_every.max(1),
            signer,
            writers,
            webhooks,
            persist: Some(persist),
            metrics: metrics.clone(),
        };
        let start = ChainStartBody {
            segment: uuid::Uuid::new_v4().to_string(),
            resumed_from,
            key_id: chain.signer.key_id().to_owned(),
            writer: env!("CARGO_PKG_VERSION").to_owned(),
        };
        chain.append_json(RecordKind::ChainStart, &start, "chain_start");
        tracing::info!(segment = %start.segment, seq = chain.seq, key_id = %start.key_id, "audit trail started");

        let inner = Arc::new(Inner {
            chain: Mutex::new(chain),
            tasks: Mutex::new(Tasks::default()),
            shutdown_timeout: settings.shutdown_timeout,
        });
        tasks.ticker = Some(tokio::spawn(run_ticker(
            Arc::downgrade(&inner),
            settings.checkpoint_interval,
        )));
        *inner.tasks.lock().unwrap_or_else(PoisonError::into_inner) = tasks;
        Ok(Self {
            inner: Some(inner),
            metrics,
        })
    }

    /// Append `event` to the trail. Returns once the line is written to stdout and the
    /// file (not fsynced); a failed write is logged and counted in
    /// `leasehold_audit_write_failures_total`, and shows up as a gap to the verifier.
    pub fn record(&self, event: AuditEvent) {
        let Some(inner) = &self.inner else {
            return;
        };
        let mut chain = inner.chain();
        chain.append_json(RecordKind::Event, &event, event.action().as_str());
        if chain.since_checkpoint >= chain.checkpoint_every {
            chain.checkpoint(None);
        }
    }

    /// Write a checkpoint now if anything was written since the last one, and wait
    /// until it is fsynced and saved (or the save failed, which is counted).
    pub async fn checkpoint(&self) {
        let Some(inner) = &self.inner else {
            return;
        };
        let (done, saved) = oneshot::channel();
        inner.chain().checkpoint_if_pending(Some(done));
        let _ = saved.await;
    }

    /// Clean shutdown: a final checkpoint, fsynced and saved, and the webhook queues
    /// drained (at most `shutdown_timeout`). Records made afterwards still go to stdout
    /// and the file, but no further checkpoint is saved.
    pub async fn shutdown(&self) {
        let Some(inner) = &self.inner else {
            return;
        };
        let (done, saved) = oneshot::channel();
        {
            let mut chain = inner.chain();
            chain.checkpoint_if_pending(Some(done));
            chain.persist = None;
            chain.webhooks.clear();
        }
        let _ = saved.await;
        let tasks =
            std::mem::take(&mut *inner.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        if let Some(ticker) = tasks.ticker {
            ticker.abort();
        }
        if let Some(persister) = tasks.persister {
            let _ = persister.await;
        }
        for webhook in tasks.webhooks {
            let abort = webhook.abort_handle();
            if tokio::time::timeout(inner.shutdown_timeout, webhook)
                .await
                .is_err()
            {
                tracing::warn!("audit webhook queue not drained at shutdown");
                abort.abort();
            }
        }
    }

    /// Register `leasehold_audit_records_total{action}`,
    /// `leasehold_audit_write_failures_total{sink}` and
    /// `leasehold_audit_last_checkpoint_seq` in `registry`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.metrics.register_in(registry);
    }
}

/// Periodic checkpoints; ends with the log.
async fn run_ticker(log: Weak<Inner>, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(inner) = log.upgrade() else {
            return;
        };
        inner.chain().checkpoint_if_pending(None);
    }
}

/// Make each checkpoint durable (fsync the files it is in), then save it. Only the
/// newest queued checkpoint is saved; it supersedes older ones.
async fn run_persister(
    mut requests: mpsc::UnboundedReceiver<PersistRequest>,
    files: Vec<(std::path::PathBuf, Arc<std::fs::File>)>,
    store: Arc<dyn CheckpointStore>,
    metrics: AuditMetrics,
) {
    while let Some(mut request) = requests.recv().await {
        let mut waiters: Vec<oneshot::Sender<()>> = request.done.take().into_iter().collect();
        while let Ok(mut newer) = requests.try_recv() {
            waiters.extend(newer.done.take());
            request = newer;
        }
        let files = files.clone();
        let synced = tokio::task::spawn_blocking(move || {
            for (path, file) in &files {
                file.sync_data()
                    .map_err(|e| format!("cannot fsync {}: {e}", path.display()))?;
            }
            Ok::<(), String>(())
        })
        .await
        .unwrap_or_else(|e| Err(format!("fsync task failed: {e}")));
        match synced {
            // Not saved: a checkpoint the file may not hold after a crash would make the
            // next segment unverifiable. The next checkpoint tries again.
            Err(error) => {
                tracing::error!(%error, "audit checkpoint not durable; not saved");
                metrics.failure("file").inc();
            }
            Ok(()) => match store.save(&request.checkpoint).await {
                Ok(()) => {
                    metrics
                        .last_checkpoint_seq
                        .set(i64::try_from(request.checkpoint.record_seq).unwrap_or(i64::MAX));
                }
                Err(error) => {
                    tracing::error!(%error, seq = request.checkpoint.record_seq, "cannot save the audit checkpoint");
                    metrics.failure(STORE_SINK_LABEL).inc();
                }
            },
        }
        for waiter in waiters {
            let _ = waiter.send(());
        }
    }
}
