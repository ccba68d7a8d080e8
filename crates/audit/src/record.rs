//! The line format and its canonical encoding, shared by the writer and the verifier.
//!
//! A line is one JSON object with the fields in this order:
//!
//! ```text
//! {"seq":N,"time":"<RFC 3339>","prev":"<hex sha256>","hash":"<hex sha256>","<kind>":{...}}
//! ```
//!
//! where `<kind>` is `event` (an [`crate::AuditEvent`]), `checkpoint` (a
//! [`CheckpointBody`]) or `chain_start` (a [`ChainStartBody`]).
//!
//! The hash is SHA-256 over the *canonical encoding*: the same object without `hash`,
//! i.e. `{"seq":N,"time":T,"prev":P,"<kind>":B}` with no whitespace, where `T` and `P`
//! are JSON strings as serde_json writes them and `B` is the body **exactly as it
//! appears in the line** (the verifier hashes the raw body text, so it needs no
//! knowledge of the event schema, and changing a single byte of the body changes the
//! hash). The first record of a chain has `prev` = 64 zeros ([`GENESIS_HASH`]).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

/// `prev` of the first record of a new chain.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The body of a checkpoint record: a signature over the record just before it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointBody {
    /// Seq of the record signed (the one right before the checkpoint record).
    pub seq: u64,
    /// Hash of that record.
    pub hash: String,
    /// [`crate::key_id`] of the signing key.
    pub key_id: String,
    /// Base64 Ed25519 signature over [`checkpoint_message`]`(seq, hash)`.
    pub signature: String,
}

/// Where a chain continues from: a checkpoint *record* (its own seq and hash).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChainPosition {
    pub seq: u64,
    pub hash: String,
}

/// The body of the first record a writer puts out after it starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainStartBody {
    /// A new random id per start of the writer.
    pub segment: String,
    /// The signed checkpoint record this segment continues from; `None` for a new chain.
    pub resumed_from: Option<ChainPosition>,
    /// [`crate::key_id`] of the key that will sign this segment's checkpoints.
    pub key_id: String,
    /// Version of the writer (this crate).
    pub writer: String,
}

/// Which body a record carries (the name of the JSON field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RecordKind {
    Event,
    Checkpoint,
    ChainStart,
}

impl RecordKind {
    pub(crate) fn field(self) -> &'static str {
        match self {
            Self::Event => "event",
            Self::Checkpoint => "checkpoint",
            Self::ChainStart => "chain_start",
        }
    }
}

/// The bytes an Ed25519 checkpoint signature covers: a fixed domain string, then the
/// seq and hash of the record signed.
pub fn checkpoint_message(seq: u64, hash: &str) -> Vec<u8> {
    format!("leasehold-audit checkpoint v1\nseq={seq}\nhash={hash}\n").into_bytes()
}

fn json_string(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

/// The canonical encoding hashed for a record (see the module docs).
pub(crate) fn canonical(seq: u64, time: &str, prev: &str, kind: RecordKind, body: &str) -> String {
    format!(
        "{{\"seq\":{seq},\"time\":{},\"prev\":{},\"{}\":{body}}}",
        json_string(time),
        json_string(prev),
        kind.field()
    )
}

/// Lowercase hex SHA-256.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// A written line (without the newline) and its hash.
pub(crate) fn encode_line(
    seq: u64,
    time: &str,
    prev: &str,
    kind: RecordKind,
    body: &str,
) -> (String, String) {
    let hash = sha256_hex(canonical(seq, time, prev, kind, body).as_bytes());
    let line = format!(
        "{{\"seq\":{seq},\"time\":{},\"prev\":{},\"hash\":\"{hash}\",\"{}\":{body}}}",
        json_string(time),
        json_string(prev),
        kind.field()
    );
    (line, hash)
}

/// A line as the verifier reads it: the body kept as raw text.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ParsedLine {
    pub seq: u64,
    pub time: String,
    pub prev: String,
    pub hash: String,
    #[serde(default)]
    pub event: Option<Box<RawValue>>,
    #[serde(default)]
    pub checkpoint: Option<Box<RawValue>>,
    #[serde(default)]
    pub chain_start: Option<Box<RawValue>>,
}

impl ParsedLine {
    /// The kind and raw body, if exactly one body field is present.
    pub(crate) fn body(&self) -> Option<(RecordKind, &str)> {
        match (&self.event, &self.checkpoint, &self.chain_start) {
            (Some(body), None, None) => Some((RecordKind::Event, body.get())),
            (None, Some(body), None) => Some((RecordKind::Checkpoint, body.get())),
            (None, None, Some(body)) => Some((RecordKind::ChainStart, body.get())),
            _ => None,
        }
    }

    /// The hash recomputed from the line's content.
    pub(crate) fn computed_hash(&self) -> Option<String> {
        let (kind, body) = self.body()?;
        Some(sha256_hex(
            canonical(self.seq, &self.time, &self.prev, kind, body).as_bytes(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_line_parses_back_to_the_same_hash() {
        let body = r#"{"action":"issue","outcome":"success"}"#;
        let (line, hash) = encode_line(
            7,
            "2025-01-01T00:00:00Z",
            GENESIS_HASH,
            RecordKind::Event,
            body,
        );
        assert!(line.starts_with(r#"{"seq":7,"time":"2025-01-01T00:00:00Z","prev":"000"#));
        assert!(line.ends_with(&format!(r#""hash":"{hash}","event":{body}}}"#)));
        let parsed: ParsedLine = serde_json::from_str(&line).expect("parses");
        assert_eq!(parsed.computed_hash().as_deref(), Some(hash.as_str()));
        assert_eq!(hash.len(), 64);
    }

    #[test]
    fn canonical_is_the_line_without_hash() {
        let body = r#"{"seq":1,"hash":"ab","key_id":"k","signature":"s"}"#;
        let (line, hash) = encode_line(2, "t", "p", RecordKind::Checkpoint, body);
        let without: serde_json::Value = {
            let mut v: serde_json::Value = serde_json::from_str(&line).expect("json");
            v.as_object_mut().map(|o| o.remove("hash"));
            v
        };
        let canon: serde_json::Value =
            serde_json::from_str(&canonical(2, "t", "p", RecordKind::Checkpoint, body))
                .expect("json");
        assert_eq!(without, canon);
        assert_eq!(
            sha256_hex(canonical(2, "t", "p", RecordKind::Checkpoint, body).as_bytes()),
            hash
        );
    }
}
