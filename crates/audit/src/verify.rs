//! The verifier: reads a trail and reports the first record that is altered, missing,
//! out of order, or wrongly signed. Pure apart from reading.

use std::collections::HashSet;
use std::fmt;
use std::io::BufRead;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};

use crate::record::{
    ChainPosition, ChainStartBody, CheckpointBody, GENESIS_HASH, ParsedLine, RecordKind,
    checkpoint_message,
};
use crate::{AuditError, key_id};

/// What the verifier checks signatures with.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// Keys whose checkpoints are accepted (found by `key_id`). Empty: signatures are
    /// not checked, and the report says so.
    pub public_keys: Vec<VerifyingKey>,
}

/// What kind of problem was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    /// The record's content does not match its hash (it was altered).
    BadHash,
    /// `prev` is not the hash of the record before (a record was replaced or removed).
    BrokenLink,
    /// Seqs jump forward: records are missing.
    SeqGap,
    /// Seqs go backward or repeat: records were reordered or duplicated.
    SeqOutOfOrder,
    /// A checkpoint's signature is invalid, or it signs something else than the record
    /// before it.
    BadSignature,
    /// A checkpoint is signed by a key not among the given public keys.
    UnknownKey,
    /// Not a record (bad JSON, a truncated line, a missing field).
    Malformed,
    /// A `chain_start` does not continue from a signed checkpoint earlier in the file,
    /// or a new chain starts mid-file.
    BadResume,
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BadHash => "bad hash",
            Self::BrokenLink => "broken link",
            Self::SeqGap => "missing records",
            Self::SeqOutOfOrder => "records out of order",
            Self::BadSignature => "bad signature",
            Self::UnknownKey => "unknown key",
            Self::Malformed => "malformed record",
            Self::BadResume => "bad resume",
        })
    }
}

/// The first problem found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line number.
    pub line: usize,
    /// The record's seq, if it could be read.
    pub seq: Option<u64>,
    pub kind: ProblemKind,
    pub message: String,
}

/// The outcome of [`verify_reader`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records that passed every check (before the first problem).
    pub records: u64,
    /// Of those, checkpoint records.
    pub checkpoints: u64,
    /// Checkpoints whose signature was checked and is valid (0 without public keys).
    pub signatures_verified: u64,
    /// Whether signatures were checked at all.
    pub signatures_checked: bool,
    /// Writer segments (one per start of the writer).
    pub segments: u64,
    /// Records written after the last checkpoint of a segment that ended without a
    /// clean shutdown (a crash): they are chained but were never signed, and the next
    /// segment continues from the checkpoint before them.
    pub unsigned_tail_before_restart: u64,
    /// Unreadable lines right before a restart: writes torn by the crash that ended a
    /// segment (forgiven only there; anywhere else an unreadable line is a problem).
    pub torn_lines_before_restart: u64,
    /// Records after the last checkpoint at the end of the file (not signed yet).
    pub unsigned_at_end: u64,
    /// Seq of the last record checked.
    pub last_seq: Option<u64>,
    /// The first problem, `None` if the trail is intact.
    pub first_problem: Option<Problem>,
}

impl VerifyReport {
    /// Whether no problem was found.
    pub fn is_ok(&self) -> bool {
        self.first_problem.is_none()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.first_problem {
            None => writeln!(
                f,
                "OK: {} records, {} checkpoints, {} segment(s), last seq {}",
                self.records,
                self.checkpoints,
                self.segments,
                self.last_seq
                    .map_or_else(|| "-".to_owned(), |s| s.to_string())
            )?,
            Some(problem) => {
                write!(f, "PROBLEM at line {}", problem.line)?;
                if let Some(seq) = problem.seq {
                    write!(f, " (seq {seq})")?;
                }
                writeln!(f, ": {}: {}", problem.kind, problem.message)?;
                writeln!(
                    f,
                    "{} records before it were intact ({} checkpoints, {} segment(s))",
                    self.records, self.checkpoints, self.segments
                )?;
            }
        }
        if self.signatures_checked {
            writeln!(f, "signatures verified: {}", self.signatures_verified)?;
        } else {
            writeln!(f, "signatures NOT checked (no public key given)")?;
        }
        if self.unsigned_tail_before_restart > 0 {
            writeln!(
                f,
                "unsigned tail of {} record(s) before a restart (written after the last checkpoint, before a crash)",
                self.unsigned_tail_before_restart
            )?;
        }
        if self.torn_lines_before_restart > 0 {
            writeln!(
                f,
                "{} torn line(s) before a restart (a write cut by a crash)",
                self.torn_lines_before_restart
            )?;
        }
        if self.unsigned_at_end > 0 {
            writeln!(
                f,
                "{} record(s) after the last checkpoint (not signed yet)",
                self.unsigned_at_end
            )?;
        }
        Ok(())
    }
}

/// Verify the trail in the file at `path`.
pub fn verify_file(path: &Path, options: &VerifyOptions) -> Result<VerifyReport, AuditError> {
    let file = std::fs::File::open(path)
        .map_err(AuditError::io(format!("cannot open {}", path.display())))?;
    Ok(verify_reader(std::io::BufReader::new(file), options))
}

/// The last accepted record.
struct Head {
    seq: u64,
    hash: String,
}

struct TrailChecker<'a> {
    options: &'a VerifyOptions,
    report: VerifyReport,
    head: Option<Head>,
    /// Checkpoint records accepted so far (any segment): where a segment may resume.
    checkpoints: HashSet<ChainPosition>,
    /// Seq of the last checkpoint record or resume point in the current segment.
    anchored_seq: u64,
    /// Whether the line just checked was a chain_start resuming from a checkpoint.
    resumed_here: bool,
}

fn problem(
    line: usize,
    seq: Option<u64>,
    kind: ProblemKind,
    message: impl Into<String>,
) -> Problem {
    Problem {
        line,
        seq,
        kind,
        message: message.into(),
    }
}

/// Verify a trail read line by line. Stops at the first problem.
///
/// Checks, per line: it parses as a record; its hash matches its content; its seq is
/// the previous one plus one and its `prev` the previous hash (except at a valid
/// `chain_start`); a checkpoint signs exactly the record before it with a known key; a
/// `chain_start` continues from a checkpoint record earlier in the file (or is the
/// first line, starting a new chain at seq 1).
pub fn verify_reader(mut reader: impl BufRead, options: &VerifyOptions) -> VerifyReport {
    let mut verifier = TrailChecker {
        options,
        report: VerifyReport {
            signatures_checked: !options.public_keys.is_empty(),
            ..VerifyReport::default()
        },
        head: None,
        checkpoints: HashSet::new(),
        anchored_seq: 0,
        resumed_here: false,
    };
    let mut bytes = Vec::new();
    let mut line_no = 0usize;
    // A malformed line is forgiven only if a valid restart follows it: a write torn
    // by the crash that ended the previous segment.
    let mut torn: Option<Problem> = None;
    loop {
        bytes.clear();
        line_no += 1;
        match reader.read_until(b'\n', &mut bytes) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                verifier.report.first_problem = Some(torn.take().unwrap_or_else(|| {
                    problem(
                        line_no,
                        None,
                        ProblemKind::Malformed,
                        format!("cannot read the line: {e}"),
                    )
                }));
                return verifier.report;
            }
        }
        let checked = match std::str::from_utf8(&bytes) {
            Ok(text) => verifier.check_line(line_no, text),
            Err(_) => Err(problem(
                line_no,
                None,
                ProblemKind::Malformed,
                "not UTF-8 text",
            )),
        };
        match checked {
            Ok(()) => {
                if let Some(pending) = torn.take() {
                    if !verifier.resumed_here {
                        verifier.report.first_problem = Some(pending);
                        return verifier.report;
                    }
                    verifier.report.torn_lines_before_restart += 1;
                }
            }
            Err(found) if found.kind == ProblemKind::Malformed && torn.is_none() => {
                torn = Some(found);
            }
            Err(found) => {
                verifier.report.first_problem = Some(torn.take().unwrap_or(found));
                return verifier.report;
            }
        }
    }
    if let Some(pending) = torn {
        verifier.report.first_problem = Some(pending);
        return verifier.report;
    }
    if let Some(head) = &verifier.head {
        verifier.report.unsigned_at_end = head.seq.saturating_sub(verifier.anchored_seq);
    }
    verifier.report
}

impl TrailChecker<'_> {
    fn check_line(&mut self, line_no: usize, text: &str) -> Result<(), Problem> {
        self.resumed_here = false;
        let Some(content) = text.strip_suffix('\n') else {
            return Err(problem(
                line_no,
                None,
                ProblemKind::Malformed,
                "the last line is incomplete (no newline): truncated",
            ));
        };
        let parsed: ParsedLine = serde_json::from_str(content).map_err(|e| {
            problem(
                line_no,
                None,
                ProblemKind::Malformed,
                format!("not a record: {e}"),
            )
        })?;
        let seq = Some(parsed.seq);
        let Some((kind, body)) = parsed.body() else {
            return Err(problem(
                line_no,
                seq,
                ProblemKind::Malformed,
                "a record needs exactly one of event, checkpoint, chain_start",
            ));
        };
        let computed = parsed.computed_hash().unwrap_or_default();
        if computed != parsed.hash {
            return Err(problem(
                line_no,
                seq,
                ProblemKind::BadHash,
                format!(
                    "content hashes to {computed}, the record says {}",
                    parsed.hash
                ),
            ));
        }
        match kind {
            RecordKind::ChainStart => {
                let start: ChainStartBody = serde_json::from_str(body).map_err(|e| {
                    problem(
                        line_no,
                        seq,
                        ProblemKind::Malformed,
                        format!("bad chain_start: {e}"),
                    )
                })?;
                self.check_start(line_no, &parsed, &start)?;
            }
            RecordKind::Event | RecordKind::Checkpoint => {
                self.check_link(line_no, &parsed)?;
            }
        }
        if kind == RecordKind::Checkpoint {
            let checkpoint: CheckpointBody = serde_json::from_str(body).map_err(|e| {
                problem(
                    line_no,
                    seq,
                    ProblemKind::Malformed,
                    format!("bad checkpoint: {e}"),
                )
            })?;
            self.check_checkpoint(line_no, &parsed, &checkpoint)?;
        }
        self.head = Some(Head {
            seq: parsed.seq,
            hash: parsed.hash,
        });
        self.report.records += 1;
        self.report.last_seq = Some(parsed.seq);
        Ok(())
    }

    /// An event or checkpoint: seq + 1 and prev = the previous hash.
    fn check_link(&self, line_no: usize, record: &ParsedLine) -> Result<(), Problem> {
        let seq = Some(record.seq);
        let Some(head) = &self.head else {
            return Err(if record.seq > 1 {
                problem(
                    line_no,
                    seq,
                    ProblemKind::SeqGap,
                    format!(
                        "the file starts at seq {}: records 1..{} are missing",
                        record.seq,
                        record.seq - 1
                    ),
                )
            } else {
                problem(
                    line_no,
                    seq,
                    ProblemKind::BadResume,
                    "the file does not begin with a chain_start record",
                )
            });
        };
        let expected = head.seq + 1;
        if record.seq > expected {
            return Err(problem(
                line_no,
                seq,
                ProblemKind::SeqGap,
                format!(
                    "seq {} follows seq {}: records {expected}..{} are missing",
                    record.seq,
                    head.seq,
                    record.seq - 1
                ),
            ));
        }
        if record.seq < expected {
            return Err(problem(
                line_no,
                seq,
                ProblemKind::SeqOutOfOrder,
                format!("seq {} follows seq {}", record.seq, head.seq),
            ));
        }
        if record.prev != head.hash {
            return Err(problem(
                line_no,
                seq,
                ProblemKind::BrokenLink,
                format!("prev is not the hash of seq {}", head.seq),
            ));
        }
        Ok(())
    }

    fn check_start(
        &mut self,
        line_no: usize,
        record: &ParsedLine,
        start: &ChainStartBody,
    ) -> Result<(), Problem> {
        let seq = Some(record.seq);
        match &start.resumed_from {
            None => {
                if self.head.is_some() {
                    return Err(problem(
                        line_no,
                        seq,
                        ProblemKind::BadResume,
                        "a new chain starts in the middle of the file (was the checkpoint store lost or reset?)",
                    ));
                }
                if record.seq != 1 || record.prev != GENESIS_HASH {
                    return Err(problem(
                        line_no,
                        seq,
                        ProblemKind::BadResume,
                        "a new chain must start at seq 1 with the zero prev hash",
                    ));
                }
            }
            Some(from) => {
                if !self.checkpoints.contains(from) {
                    return Err(problem(
                        line_no,
                        seq,
                        ProblemKind::BadResume,
                        format!(
                            "resumes from checkpoint seq {} which is not a verified checkpoint earlier in this file",
                            from.seq
                        ),
                    ));
                }
                if record.seq != from.seq + 1 || record.prev != from.hash {
                    return Err(problem(
                        line_no,
                        seq,
                        ProblemKind::BadResume,
                        format!(
                            "does not continue from checkpoint seq {} it names",
                            from.seq
                        ),
                    ));
                }
                if let Some(head) = &self.head {
                    self.report.unsigned_tail_before_restart += head.seq.saturating_sub(from.seq);
                }
                self.resumed_here = true;
            }
        }
        self.report.segments += 1;
        self.anchored_seq = record.seq.saturating_sub(1);
        Ok(())
    }

    fn check_checkpoint(
        &mut self,
        line_no: usize,
        record: &ParsedLine,
        checkpoint: &CheckpointBody,
    ) -> Result<(), Problem> {
        let seq = Some(record.seq);
        if checkpoint.seq + 1 != record.seq || checkpoint.hash != record.prev {
            return Err(problem(
                line_no,
                seq,
                ProblemKind::BadSignature,
                format!(
                    "the checkpoint signs seq {} but follows seq {}",
                    checkpoint.seq,
                    record.seq.saturating_sub(1)
                ),
            ));
        }
        if self.report.signatures_checked {
            let Some(key) = self
                .options
                .public_keys
                .iter()
                .find(|key| key_id(key) == checkpoint.key_id)
            else {
                return Err(problem(
                    line_no,
                    seq,
                    ProblemKind::UnknownKey,
                    format!(
                        "signed by key {} which is not among the given keys",
                        checkpoint.key_id
                    ),
                ));
            };
            let valid = BASE64
                .decode(&checkpoint.signature)
                .ok()
                .and_then(|bytes| Signature::from_slice(&bytes).ok())
                .is_some_and(|signature| {
                    key.verify(
                        &checkpoint_message(checkpoint.seq, &checkpoint.hash),
                        &signature,
                    )
                    .is_ok()
                });
            if !valid {
                return Err(problem(
                    line_no,
                    seq,
                    ProblemKind::BadSignature,
                    format!("the signature by key {} does not verify", checkpoint.key_id),
                ));
            }
            self.report.signatures_verified += 1;
        }
        self.report.checkpoints += 1;
        self.anchored_seq = record.seq;
        self.checkpoints.insert(ChainPosition {
            seq: record.seq,
            hash: record.hash.clone(),
        });
        Ok(())
    }
}
