//! Tamper-evident audit trail of leasehold (issue #12).
//!
//! Every security-relevant event (issue, verify, promote, deliver, acknowledge, revoke,
//! broker requests allowed or refused, emergency revocations, suspend/resume, key
//! operations) becomes an [`AuditEvent`] handed to [`AuditLog::record`]. An event names a
//! credential by lease, version and username; it has no field for a secret (see
//! [`event`]).
//!
//! # The stream
//!
//! One JSON object per line (format and canonical hash encoding in [`record`]):
//!
//! ```text
//! {"seq":1,"time":"…","prev":"000…0","hash":"…","chain_start":{"segment":"…","resumed_from":null,"key_id":"…","writer":"0.1.0"}}
//! {"seq":2,"time":"…","prev":"<hash 1>","hash":"…","event":{"action":"issue","outcome":"success",…}}
//! …
//! {"seq":101,"time":"…","prev":"<hash 100>","hash":"…","checkpoint":{"seq":100,"hash":"<hash 100>","key_id":"…","signature":"…"}}
//! ```
//!
//! Each record carries the hash of the one before, so altering, removing or reordering
//! a record breaks the chain at that point. Every `checkpoint_every` records (100), every
//! `checkpoint_interval` (60 s) if anything was written, and at
//! [`AuditLog::shutdown`], a *checkpoint record* signs (Ed25519, [`AuditSigner`]) the
//! seq and hash of the record just before it. A checkpoint is a chained record itself.
//! After writing a checkpoint the file sinks are fsynced and then the checkpoint is
//! saved to a [`CheckpointStore`] (a ConfigMap, or a file in local mode).
//!
//! # Restarts
//!
//! A starting writer loads the saved checkpoint and writes a `chain_start` record with
//! a new random `segment` id, `resumed_from` = the checkpoint record's seq and hash,
//! seq = that seq + 1 and prev = that hash. So the chain continues from the last
//! *signed and durable* point, never from an unsigned line an attacker could have
//! truncated to.
//!
//! After a crash, the file may hold records written after the last saved checkpoint;
//! the new segment reuses their seqs. The verifier ([`verify_reader`]) accepts a seq
//! going back only at a `chain_start` whose `resumed_from` is a checkpoint record
//! found (and, with keys, signature-checked) earlier in the same file, and that it
//! continues exactly; it reports the records after that checkpoint in the abandoned
//! segment as the *unsigned tail before restart*. They are still hash-checked, just not
//! covered by a signature. A crash can also cut a write half-way: a starting writer
//! ends such a torn line with a newline, and the verifier forgives one unreadable line
//! only when a valid restart follows it (reported as a torn line); anywhere else an
//! unreadable line is [`ProblemKind::Malformed`]. Anything else is a problem:
//! a `chain_start` naming a checkpoint not in the file, or a new chain (no
//! `resumed_from`) after the first line, is [`ProblemKind::BadResume`]. Consequently a
//! trail must be verified as a whole: if the file is rotated, verify the concatenation.
//! A new file with an old checkpoint store (or the reverse) shows as `BadResume`,
//! which is intended: it is indistinguishable from deleted history.
//!
//! # Limits
//!
//! The chain proves order and integrity of what is in the file, and the signatures
//! prove who vouched for it up to each checkpoint. Records after the last checkpoint
//! can be removed from the end without trace (they are reported as unsigned); the
//! checkpoint store, kept apart from the file, bounds that loss to at most
//! `checkpoint_every` records or `checkpoint_interval`. Verifiers use the body text as
//! written, so they accept events from newer writers with more fields.

#![forbid(unsafe_code)]

mod error;
pub mod event;
mod log;
pub mod record;
mod signer;
mod sink;
pub mod store;
mod verify;

pub use ed25519_dalek::VerifyingKey;
pub use error::AuditError;
pub use event::{Action, AuditEvent, ObjectRef, Outcome, PodRef};
pub use log::{AuditLog, AuditMetrics, AuditSettings};
pub use signer::{AuditSigner, key_id, public_key_from_pem, write_key_pair};
pub use sink::Sink;
pub use store::{
    Checkpoint, CheckpointStore, FileCheckpointStore, KubeCheckpointStore, MemoryCheckpointStore,
};
pub use verify::{Problem, ProblemKind, VerifyOptions, VerifyReport, verify_file, verify_reader};
