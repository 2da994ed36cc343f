//! The tamper-evident audit log.
//!
//! Each entry stores `{"seq":n,"prev":"<hex sha256 of entry n-1>","body":{…}}`; its own hash is the
//! SHA-256 of those stored bytes. The newest sequence number and hash are also kept apart (the
//! chain head). Editing any entry breaks the next entry's `prev` (or the head), deleting one
//! leaves a gap, and reordering breaks both — `verify` names the first bad record. Entries are
//! durable before `append` returns, sharing fsyncs with the other appends of their group.
//!
//! Entries live in the log's own append-only segment files ([`crate::audit_files`]), not in
//! the fjall store; an older data directory's entries are moved there once.
//!
//! **Indexes.** Each record is indexed by (tenant, time) and (tenant, patient, time), pointing
//! at its place in its segment, so an audit report for one patient or one time window reads
//! only the matching records ([`AuditLog::query`]); the index lives beside the segments
//! ([`crate::audit_index`]).
//!
//! **Retention.** [`AuditLog::prune_before`] deletes whole segments whose records are all older
//! than the cut-off (it seals the current segment first when that one is wholly due). It first
//! appends a chained `audit-retention` record naming the *anchor* — the sequence number and hash
//! of the last pruned record — then stores the anchor and deletes the files. `verify` starts from
//! the anchor: the first kept record must chain to it, and the newest `audit-retention` record
//! must attest it, so moving the anchor to hide deleted records, or editing it, is detected like
//! any other edit. A segment whose chain is already broken is never pruned (the evidence stays).

use crate::audit_files::{self as files, AuditWriter};
use crate::audit_index::{self as idx, IndexKeys};
use crate::db::{Db, Table};
use crate::keys;
use crate::{Result, StorageError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Meta keys of the fjall-held log of earlier versions (moved to segments once).
const OLD_HEAD_KEY: &[u8] = b"audit_head";
const OLD_ANCHOR_KEY: &[u8] = b"audit_anchor";
const OLD_INDEXED_KEY: &[u8] = b"audit_indexed_v1";
/// Body `kind` of the record that retention appends.
pub const RETENTION_KIND: &str = "audit-retention";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub prev: String,
    /// The PHI-free record; its shape belongs to the caller (facade requests, ingress messages).
    pub body: Value,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditVerifyReport {
    pub entries: u64,
    pub head_seq: u64,
    pub head_hash: String,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("audit chain broken at record {seq}: {reason}")]
pub struct AuditVerifyError {
    pub seq: u64,
    pub reason: String,
}

pub(crate) fn entry_hash(stored: &[u8]) -> Result<[u8; 32]> {
    Ok(Sha256::digest(stored).into())
}

/// Where the chain starts after retention: the last pruned record's sequence number and hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditAnchor {
    pub seq: u64,
    pub hash: [u8; 32],
}

/// What one retention run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditPruneStats {
    pub pruned: u64,
    /// The anchor after the run (unchanged when nothing was pruned).
    pub anchor: Option<u64>,
}

/// The time of a record, in ms: the facade's `time` (number) or the ingress adapters' `at`
/// (RFC 3339).
pub fn record_time(body: &Value) -> Option<i64> {
    body.get("time").and_then(Value::as_i64).or_else(|| {
        body.get("at")
            .and_then(Value::as_str)
            .and_then(tributary_core::parse_rfc3339_millis)
    })
}

/// What the index needs of a record body: its `tenant`, time and `patient`.
pub(crate) fn index_keys_of(body: &Value) -> IndexKeys {
    IndexKeys::new(
        body.get("tenant").and_then(Value::as_str).unwrap_or(""),
        record_time(body).unwrap_or(0),
        body.get("patient").and_then(Value::as_str),
    )
}

/// A record serialized and indexed outside the writer thread, so the serial part of an
/// append is only the chain link: sequence number, `prev` and hash.
pub struct PreparedRecord {
    body: Vec<u8>,
    index: IndexKeys,
}

impl PreparedRecord {
    fn new(body: &Value) -> Self {
        Self {
            body: serde_json::to_vec(body).expect("audit bodies serialize"),
            index: index_keys_of(body),
        }
    }

    /// A record the caller has serialized itself (a JSON object, as [`AuditEntry::body`] reads
    /// it back), with the fields the indexes need: its tenant, time (ms) and patient — the same
    /// values the body holds under `tenant`, `time` and `patient`. For hot paths that would
    /// otherwise build a `serde_json::Value` per record only to serialize it.
    pub fn serialized(json: Vec<u8>, tenant: &str, time_ms: i64, patient: Option<&str>) -> Self {
        Self {
            body: json,
            index: IndexKeys::new(tenant, time_ms, patient),
        }
    }

    /// The record's JSON (the entry's `body`).
    pub fn json(&self) -> &[u8] {
        &self.body
    }

    /// The stored bytes: exactly `serde_json::to_vec(&AuditEntry { seq, prev, body })`.
    pub(crate) fn entry_bytes(&self, seq: u64, prev: &[u8; 32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + 100);
        out.extend_from_slice(b"{\"seq\":");
        out.extend_from_slice(seq.to_string().as_bytes());
        out.extend_from_slice(b",\"prev\":\"");
        out.extend_from_slice(hex::encode(prev).as_bytes());
        out.extend_from_slice(b"\",\"body\":");
        out.extend_from_slice(&self.body);
        out.push(b'}');
        out
    }

    pub(crate) fn index_keys(&self) -> IndexKeys {
        self.index
    }
}

/// An audit report's selection: one tenant, optionally one patient, a time window `[from, to)`.
#[derive(Clone, Debug)]
pub struct AuditQuery {
    pub tenant: String,
    pub patient: Option<String>,
    pub from_ms: i64,
    pub to_ms: i64,
}

#[derive(Clone)]
pub struct AuditLog {
    db: Db,
}

fn parse_entry(line: &[u8]) -> Result<AuditEntry> {
    serde_json::from_slice(line).map_err(|e| StorageError::corrupt("audit", e))
}

/// Every durable audit record of a data directory that a running `tributary serve` holds,
/// oldest first (`f` returns `false` to stop), read from the log's files without opening the
/// store: the records up to the chain head as of the call (the head is written after each
/// group's `fdatasync`, so nothing is passed on that a crash could still take back). Records
/// appended meanwhile are left for the next read.
pub fn for_each_durable_record(data_dir: &Path, f: impl FnMut(AuditEntry) -> bool) -> Result<()> {
    let dir = files::dir_of(data_dir);
    match files::read_head(&dir)? {
        Some(head) => for_each_in(&dir, 0, head.seq, f),
        None => Ok(()),
    }
}

/// Entries with `after < seq <= through`, oldest first, from the segments in `dir`.
fn for_each_in(
    dir: &Path,
    after: u64,
    through: u64,
    mut f: impl FnMut(AuditEntry) -> bool,
) -> Result<()> {
    let anchor = files::read_anchor(dir)?;
    let segments = files::live_segments(dir, anchor)?;
    let start = segments
        .partition_point(|(first, _)| *first <= after.saturating_add(1))
        .saturating_sub(1);
    for (_, path) in &segments[start..] {
        let go_on = files::for_each_line(path, anchor.map_or(0, |a| a.seq), |_, line| {
            match files::line_seq(line) {
                Some(s) if s <= after => return Ok(true),
                Some(s) if s > through => return Ok(false),
                _ => {}
            }
            Ok(f(parse_entry(line)?))
        });
        match go_on {
            Ok(true) => {}
            Ok(false) => break,
            // Pruned while reading: its records are gone, the next segment goes on.
            Err(StorageError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl AuditLog {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Opens the log's files now rather than at first use: moves an older data directory's
    /// records over, checks the tail against the head and catches the index up.
    pub fn open(&self) -> Result<()> {
        self.writer().map(|_| ())
    }

    /// Group-commit counts of the log's writer (`jobs` = records), once it is open.
    pub fn commit_stats(&self) -> Option<&crate::committer::CommitStats> {
        self.db.open_audit_writer().map(AuditWriter::stats)
    }

    fn writer(&self) -> Result<&AuditWriter> {
        self.db.audit_writer()
    }

    /// Readers need the files, not the writer: `verify` must name a tail cut off even though
    /// the writer refuses to open over it.
    fn dir(&self) -> Result<PathBuf> {
        Ok(self.db.audit_dir()?.to_path_buf())
    }

    /// Appends records in order; resolves once they are durable. Returns their sequence numbers.
    pub async fn append(&self, bodies: Vec<Value>) -> Result<Vec<u64>> {
        let records: Vec<PreparedRecord> = bodies.iter().map(PreparedRecord::new).collect();
        drop(bodies);
        self.append_prepared(records).await
    }

    /// [`append`](Self::append) for records already serialized ([`PreparedRecord::serialized`]).
    pub async fn append_prepared(&self, records: Vec<PreparedRecord>) -> Result<Vec<u64>> {
        self.writer()?.append(records).await
    }

    /// Calls `f` with every entry whose `seq > after`, oldest first, streaming through the
    /// segments; `f` returns `false` to stop.
    pub fn for_each_after(&self, after: u64, f: impl FnMut(AuditEntry) -> bool) -> Result<()> {
        for_each_in(&self.dir()?, after, u64::MAX, f)
    }

    /// Entries with `seq > after`, oldest first.
    pub fn read_after(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>> {
        let mut out = Vec::new();
        if limit > 0 {
            self.for_each_after(after, |e| {
                out.push(e);
                out.len() < limit
            })?;
        }
        Ok(out)
    }

    /// Walks the whole chain. `Ok(Err(_))` names the first bad record; `Err` is a storage failure.
    ///
    /// On a running server, records are appended (and retention may prune) while the walk reads:
    /// a failure seen while the chain head or anchor moved is re-checked (a few times) before it
    /// is reported, so only a break that stays put is named.
    pub fn verify(&self) -> Result<std::result::Result<AuditVerifyReport, AuditVerifyError>> {
        let dir = self.dir()?;
        let mut attempt = 0;
        loop {
            let before = (files::read_head(&dir)?, files::read_anchor(&dir)?);
            let result = match verify_once(&dir) {
                Err(StorageError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                    Err(AuditVerifyError {
                        seq: 0,
                        reason: "a segment file disappeared while reading".into(),
                    })
                }
                other => other?,
            };
            attempt += 1;
            let after = (files::read_head(&dir)?, files::read_anchor(&dir)?);
            if result.is_ok() || attempt >= 5 || before == after {
                return Ok(result);
            }
        }
    }

    /// The retention anchor, if records were ever pruned.
    pub fn anchor(&self) -> Result<Option<AuditAnchor>> {
        files::read_anchor(&self.dir()?)
    }

    /// Deletes the oldest records whose time is before `cutoff_ms` (stopping at the first newer
    /// one, so the kept chain stays contiguous) with their index files: segments wholly due are
    /// deleted, the due front of the next one is overwritten with zeros. The chained
    /// `audit-retention` record naming the new anchor is appended first, then the anchor is
    /// stored, then the records go. Refuses (error) to prune records whose chain does not
    /// verify. Returns once all of it is durable.
    pub async fn prune_before(&self, cutoff_ms: i64, now_ms: i64) -> Result<AuditPruneStats> {
        let _one_at_a_time = self.db.audit_prune_lock().lock().await;
        let dir = self.dir()?;
        let plan = {
            let dir = dir.clone();
            blocking(move || plan_prune(&dir, cutoff_ms)).await?
        };
        let Some(plan) = plan else {
            return Ok(AuditPruneStats::default());
        };
        let n = plan.pruned;
        // The retention record attests the anchor inside the chain itself.
        self.append(vec![serde_json::json!({
            "kind": RETENTION_KIND,
            "time": now_ms,
            "cutoff": cutoff_ms,
            "pruned": n,
            "pruned_through": plan.anchor.seq,
            "anchor_hash": hex::encode(plan.anchor.hash),
        })])
        .await?;
        let db = self.db.clone();
        blocking(move || {
            files::write_anchor(&dir, plan.anchor)?;
            for (first, path) in &plan.files {
                std::fs::remove_file(path)?;
                if let Some(w) = db.open_audit_writer() {
                    w.index().forget(*first);
                }
                match std::fs::remove_file(idx::sidecar_path(&dir, *first)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                    _ => {}
                }
            }
            if let Some((path, end)) = &plan.zero {
                files::zero_prefix(path, *end)?;
            }
            Ok(())
        })
        .await?;
        Ok(AuditPruneStats {
            pruned: n,
            anchor: Some(plan.anchor.seq),
        })
    }

    /// Records of one tenant (optionally one patient) in `[from_ms, to_ms)`, in time order,
    /// read through the index: `f` gets each and returns `false` to stop.
    pub fn query(&self, q: &AuditQuery, mut f: impl FnMut(AuditEntry) -> bool) -> Result<()> {
        let index = self.writer()?.index();
        let dir = self.dir()?;
        let anchor = files::read_anchor(&dir)?;
        let floor = anchor.map_or(0, |a| a.seq);
        let segments = files::live_segments(&dir, anchor)?;
        let live: Vec<u64> = segments.iter().map(|(first, _)| *first).collect();
        let key = match &q.patient {
            Some(p) => idx::patient_key(&q.tenant, p),
            None => idx::tenant_key(&q.tenant),
        };
        let mut hits = index.search(
            &dir,
            &live,
            idx::Range {
                key,
                from: q.from_ms,
                to: q.to_ms,
            },
        )?;
        let mut open: Option<(u64, std::fs::File)> = None;
        while let Some((seq, offset)) = hits.next()? {
            if seq <= floor {
                continue; // pruned
            }
            let i = segments.partition_point(|(first, _)| *first <= seq);
            let Some((first, path)) = i.checked_sub(1).map(|i| &segments[i]) else {
                continue;
            };
            if open.as_ref().map(|(f, _)| *f) != Some(*first) {
                match std::fs::File::open(path) {
                    Ok(file) => open = Some((*first, file)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            let file = &open.as_ref().expect("opened above").1;
            let Some(line) = files::line_at(file, offset)? else {
                continue;
            };
            // A record moved by hand is not what the index points to; verify names it.
            if files::line_seq(&line) != Some(seq) {
                continue;
            }
            let entry = parse_entry(&line)?;
            // Index keys are hashes: the record itself says whose it is.
            let field = |name| entry.body.get(name).and_then(Value::as_str);
            if field("tenant").unwrap_or("") != q.tenant
                || q.patient
                    .as_deref()
                    .is_some_and(|p| field("patient") != Some(p))
            {
                continue;
            }
            if !f(entry) {
                break;
            }
        }
        Ok(())
    }

    /// Test and forensics hook: overwrite or delete a raw record, bypassing the chain.
    #[doc(hidden)]
    pub async fn tamper_raw(&self, seq: u64, replacement: Option<Vec<u8>>) -> Result<()> {
        self.writer()?.tamper(seq, replacement).await
    }

    /// Test and forensics hook: overwrite the retention anchor, bypassing the chain.
    #[doc(hidden)]
    pub async fn tamper_anchor(&self, anchor: AuditAnchor) -> Result<()> {
        files::write_anchor(&self.dir()?, anchor)
    }

    /// The stored bytes of a record, if present.
    pub fn raw(&self, seq: u64) -> Result<Option<Vec<u8>>> {
        let dir = self.dir()?;
        let mut found = None;
        let anchor = files::read_anchor(&dir)?;
        for (_, path) in files::live_segments(&dir, anchor)? {
            files::for_each_line(&path, anchor.map_or(0, |a| a.seq), |_, line| {
                if files::line_seq(line) == Some(seq) {
                    found = Some(line.to_vec());
                    return Ok(false);
                }
                Ok(true)
            })?;
            if found.is_some() {
                break;
            }
        }
        Ok(found)
    }
}

async fn blocking<R: Send + 'static>(f: impl FnOnce() -> Result<R> + Send + 'static) -> Result<R> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::Io(std::io::Error::other(e.to_string())))?
}

pub(crate) fn verify_once(
    dir: &Path,
) -> Result<std::result::Result<AuditVerifyReport, AuditVerifyError>> {
    let head0 = files::read_head(dir)?;
    // The sidecars name the last record of their segments: a second witness of how long the
    // log was, beside the head.
    let indexed = idx::sealed_through(dir)?;
    let anchor = files::read_anchor(dir)?;
    let start = anchor.map_or(0, |a| a.seq);
    let mut prev = anchor.map_or([0u8; 32], |a| a.hash);
    let mut count = 0u64;
    let mut expected = start + 1;
    // (seq, pruned_through, anchor_hash) of the newest retention record seen.
    let mut attested: Option<(u64, u64, String)> = None;
    let mut bad: Option<AuditVerifyError> = None;
    let fail = |seq, reason: String| Some(AuditVerifyError { seq, reason });
    for (_, path) in files::live_segments(dir, anchor)? {
        files::for_each_line(&path, start, |_, line| {
            let entry: AuditEntry = match serde_json::from_slice(line) {
                Ok(e) => e,
                Err(_) => {
                    bad = fail(expected, "record is not valid JSON (edited?)".into());
                    return Ok(false);
                }
            };
            if entry.seq > expected {
                bad = fail(
                    expected,
                    format!("record missing (next present is {})", entry.seq),
                );
                return Ok(false);
            }
            if entry.seq != expected {
                bad = fail(
                    expected,
                    format!(
                        "record {} found where {expected} belongs (moved?)",
                        entry.seq
                    ),
                );
                return Ok(false);
            }
            if entry.prev != hex::encode(prev) {
                bad = fail(
                    expected,
                    "previous-hash mismatch (this or the record before was edited)".into(),
                );
                return Ok(false);
            }
            if entry.body.get("kind").and_then(Value::as_str) == Some(RETENTION_KIND) {
                let through = entry.body.get("pruned_through").and_then(Value::as_u64);
                let hash = entry.body.get("anchor_hash").and_then(Value::as_str);
                attested = Some((
                    expected,
                    through.unwrap_or(0),
                    hash.unwrap_or("").to_string(),
                ));
            }
            prev = entry_hash(line)?;
            count += 1;
            expected += 1;
            Ok(true)
        })?;
        if bad.is_some() {
            break;
        }
    }
    if let Some(b) = bad {
        return Ok(Err(b));
    }
    let bad = |seq, reason: &str| {
        Ok(Err(AuditVerifyError {
            seq,
            reason: reason.to_string(),
        }))
    };
    let last = start + count;
    // The anchor must be the one the newest retention record (inside the chain) names, or —
    // a prune interrupted between its retention record and its anchor — a record still
    // present with the attested hash; otherwise records were removed from the front and the
    // anchor moved to hide it.
    let pending = |through: u64, hash: &str| -> Result<bool> {
        if through <= start || through >= last {
            return Ok(false);
        }
        // Rare (a crash mid-prune), so the record is looked up by a second walk.
        let mut found = false;
        for (_, path) in files::live_segments(dir, anchor)? {
            files::for_each_line(&path, start, |_, line| {
                if files::line_seq(line) == Some(through) {
                    found = hex::encode(entry_hash(line)?) == hash;
                    return Ok(false);
                }
                Ok(true)
            })?;
        }
        Ok(found)
    };
    match (&anchor, &attested) {
        (None, None) => {}
        (None, Some((seq, through, hash))) => {
            if !pending(*through, hash)? {
                return bad(
                    *seq,
                    "retention record present but the chain anchor is missing",
                );
            }
        }
        (Some(a), None) => {
            // The retention record that would say where pruning really stopped is gone too:
            // the anchor's own record is the latest one whose removal is unaccounted for.
            return bad(
                a.seq,
                "chain anchor is not attested by any retention record: records up to here may have been removed",
            );
        }
        (Some(a), Some((seq, through, hash))) => {
            let stored = *through == a.seq && *hash == hex::encode(a.hash);
            if !(stored || *through > a.seq && pending(*through, hash)?) {
                return bad(
                    through.min(&a.seq) + 1,
                    &format!(
                        "chain anchor (record {}) differs from the one retention record {seq} names (record {through}): anchor edited or records removed",
                        a.seq
                    ),
                );
            }
        }
    }
    if last < indexed {
        return bad(
            last + 1,
            &format!(
                "an index file lists records up to {indexed}, the log ends at {last} (truncated?)"
            ),
        );
    }
    // The head before the walk bounds what must be there: it is written only after its records
    // are durable. A stopped server has one head for before and after.
    let (seq0, hash0) = head0.map_or((0, None), |h| (h.seq, Some(h.hash)));
    let Some(head1) = files::read_head(dir)? else {
        if last == 0 {
            return Ok(Ok(AuditVerifyReport {
                entries: 0,
                head_seq: 0,
                head_hash: hex::encode(prev),
            }));
        }
        return bad(last, "chain head is missing");
    };
    // Records past the head are appends whose head update the walk outran.
    if last < seq0 {
        return bad(
            last + 1,
            &format!("chain head says {seq0} records, found {last} (truncated?)"),
        );
    }
    let head_hash = if last == head1.seq {
        Some(head1.hash)
    } else if last == seq0 {
        hash0
    } else {
        None // appended while walking: the chain itself was checked up to `last`
    };
    if let Some(h) = head_hash {
        if h != prev {
            return bad(last, "last record does not match the chain head (edited?)");
        }
    }
    Ok(Ok(AuditVerifyReport {
        entries: count,
        head_seq: last,
        head_hash: hex::encode(prev),
    }))
}

struct PrunePlan {
    pruned: u64,
    /// Segments wholly due, as (first sequence number, path).
    files: Vec<(u64, PathBuf)>,
    /// The segment after them, when its front is due: bytes `[0, end)` to zero.
    zero: Option<(PathBuf, u64)>,
    anchor: AuditAnchor,
}

/// The records to prune, checked link by link from the anchor; `None` when none is due.
fn plan_prune(dir: &Path, cutoff_ms: i64) -> Result<Option<PrunePlan>> {
    let anchor = files::read_anchor(dir)?;
    let floor = anchor.map_or(0, |a| a.seq);
    let segments = files::live_segments(dir, anchor)?;
    let mut prev = anchor.map_or([0u8; 32], |a| a.hash);
    let mut expected = floor + 1;
    let mut last_time: Option<i64> = None;
    let mut plan = PrunePlan {
        pruned: 0,
        files: Vec::new(),
        zero: None,
        anchor: AuditAnchor {
            seq: floor,
            hash: prev,
        },
    };
    let broken = |seq: u64| {
        StorageError::corrupt(
            "audit retention",
            format!("chain does not verify at record {seq}; nothing pruned (run `tributary audit verify`)"),
        )
    };
    for (i, (first, path)) in segments.iter().enumerate() {
        let mut due_end = None;
        let whole = files::for_each_line(path, floor, |offset, line| {
            let entry: AuditEntry = serde_json::from_slice(line).map_err(|_| broken(expected))?;
            if entry.seq != expected || entry.prev != hex::encode(prev) {
                return Err(broken(expected));
            }
            // A record without a time of its own is as old as the one before it.
            let t = record_time(&entry.body).or(last_time);
            if t.is_none_or(|t| t >= cutoff_ms) {
                return Ok(false);
            }
            last_time = t;
            prev = entry_hash(line)?;
            expected += 1;
            due_end = Some(offset + line.len() as u64 + 1);
            Ok(true)
        })?;
        // The newest segment is the one being written: never deleted, only zeroed.
        if whole && i + 1 < segments.len() {
            plan.files.push((*first, path.clone()));
        } else {
            plan.zero = due_end.map(|end| (path.clone(), end));
            break;
        }
    }
    plan.pruned = expected - 1 - floor;
    plan.anchor = AuditAnchor {
        seq: expected - 1,
        hash: prev,
    };
    Ok((plan.pruned > 0).then_some(plan))
}

/// Moves the entries of a data directory written before segments (fjall keyspace `audit`)
/// into a first segment, with their head and anchor, and clears the old keyspaces; the index
/// is then rebuilt from the segment. Runs once, when the segment directory has no segment.
pub(crate) fn migrate_from_keyspace(
    dir: &Path,
    db: &fjall::Database,
    tables: &crate::db::Tables,
) -> Result<()> {
    use std::io::Write;
    let audit = tables.get(Table::Audit);
    let Some(first) = audit.first_key_value() else {
        // Every record pruned in the old layout: only the anchor carries over.
        if let Some(v) = tables.get(Table::Meta).get(OLD_ANCHOR_KEY)? {
            if let Some(a) = decode_old_pair(&v) {
                files::write_anchor(dir, a)?;
            }
        }
        return Ok(());
    };
    let first_seq = keys::read_u64(&first.key()?).unwrap_or(1);
    let tmp = dir.join("migrating.tmp");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    let mut n = 0u64;
    for item in audit.iter() {
        let (_, v) = item.into_inner()?;
        out.write_all(&v)?;
        out.write_all(b"\n")?;
        n += 1;
    }
    let file = out
        .into_inner()
        .map_err(|e| StorageError::Io(e.into_error()))?;
    file.sync_all()?;
    if let Some(v) = tables.get(Table::Meta).get(OLD_ANCHOR_KEY)? {
        if let Some(a) = decode_old_pair(&v) {
            files::write_anchor(dir, a)?;
        }
    }
    if let Some(h) = tables
        .get(Table::Meta)
        .get(OLD_HEAD_KEY)?
        .and_then(|v| decode_old_pair(&v))
    {
        files::write_head_file(dir, h)?;
    }
    std::fs::rename(&tmp, dir.join(format!("{first_seq:020}.seg")))?;
    std::fs::File::open(dir)?.sync_all()?;
    // The segment is durable: the old copy and its index go.
    clear_keyspaces(
        db,
        tables,
        &[Table::Audit, Table::AuditIdxTime, Table::AuditIdxPatient],
    )?;
    let mut batch = db.batch();
    for k in [OLD_HEAD_KEY, OLD_ANCHOR_KEY, OLD_INDEXED_KEY] {
        batch.remove(tables.get(Table::Meta), k);
    }
    batch.commit()?;
    db.persist(fjall::PersistMode::SyncAll)?;
    tracing::info!(records = n, "audit log moved to its own segment files");
    Ok(())
}

/// Removes every key of the given keyspaces.
pub(crate) fn clear_keyspaces(
    db: &fjall::Database,
    tables: &crate::db::Tables,
    which: &[Table],
) -> Result<()> {
    for t in which {
        let ks = tables.get(*t);
        let keys: Vec<fjall::Slice> = ks
            .iter()
            .map(|i| i.key())
            .collect::<std::result::Result<_, _>>()?;
        for chunk in keys.chunks(10_000) {
            let mut batch = db.batch();
            for k in chunk {
                batch.remove(ks, k.clone());
            }
            batch.commit()?;
        }
    }
    Ok(())
}

fn decode_old_pair(v: &[u8]) -> Option<AuditAnchor> {
    Some(AuditAnchor {
        seq: keys::read_u64(v)?,
        hash: v.get(8..40)?.try_into().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DbOptions;
    use serde_json::json;

    fn open_log(dir: &Path) -> AuditLog {
        AuditLog::new(Db::open(dir, DbOptions::default()).unwrap())
    }

    fn seqs_after(log: &AuditLog, after: u64) -> Vec<u64> {
        log.read_after(after, 1000)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect()
    }

    /// Sequence numbers of the records a query returns.
    fn matching(
        log: &AuditLog,
        tenant: &str,
        patient: Option<&str>,
        from: i64,
        to: i64,
    ) -> Vec<u64> {
        let mut seen = Vec::new();
        let q = AuditQuery {
            tenant: tenant.into(),
            patient: patient.map(String::from),
            from_ms: from,
            to_ms: to,
        };
        log.query(&q, |e| {
            seen.push(e.seq);
            true
        })
        .unwrap();
        seen
    }

    async fn log_with(n: u64) -> (tempfile::TempDir, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with_in(dir.path(), n).await;
        (dir, log)
    }

    async fn log_with_in(dir: &Path, n: u64) -> AuditLog {
        let log = open_log(dir);
        for i in 0..n {
            log.append(vec![json!({"i": i, "outcome": "allowed"})])
                .await
                .unwrap();
        }
        log
    }

    #[test]
    fn prepared_bytes_are_the_serialized_entry() {
        let body = json!({"kind": "fhir-request", "q": "a\"b\\c\u{e9}\n", "n": -3, "nested": {"z": 1, "a": [true, null]}});
        for (seq, prev) in [(1u64, [0u8; 32]), (u64::MAX, [0xabu8; 32])] {
            let want = serde_json::to_vec(&AuditEntry {
                seq,
                prev: hex::encode(prev),
                body: body.clone(),
            })
            .unwrap();
            assert_eq!(PreparedRecord::new(&body).entry_bytes(seq, &prev), want);
        }
    }

    #[tokio::test]
    async fn serialized_records_are_chained_and_indexed_like_values() {
        let dir = tempfile::tempdir().unwrap();
        let log = open_log(dir.path());
        let body =
            |p: &str| json!({"kind": "fhir-request", "tenant": "t1", "time": 1_000, "patient": p});
        log.append(vec![body("p1")]).await.unwrap();
        let bytes = serde_json::to_vec(&body("p1")).unwrap();
        let seqs = log
            .append_prepared(vec![
                PreparedRecord::serialized(bytes, "t1", 1_000, Some("p1")),
                PreparedRecord::serialized(
                    serde_json::to_vec(&body("p2")).unwrap(),
                    "t1",
                    1_500,
                    Some("p2"),
                ),
            ])
            .await
            .unwrap();
        assert_eq!(seqs, vec![2, 3]);
        let by_patient = matching(&log, "t1", Some("p1"), 0, 2_000);
        assert_eq!(by_patient, vec![1, 2]);
        let window = matching(&log, "t1", None, 1_200, 2_000);
        assert_eq!(window, vec![3]);
        let entries = log.read_after(0, 10).unwrap();
        assert_eq!(entries[0].body, entries[1].body);
        assert_eq!(log.verify().unwrap().unwrap().entries, 3);
    }

    #[tokio::test]
    async fn intact_chain_survives_reopen_and_a_line_cut_short_by_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = open_log(dir.path());
            log.append(vec![json!({"a":1}), json!({"a":2})])
                .await
                .unwrap();
        }
        let log = open_log(dir.path());
        assert_eq!(log.append(vec![json!({"a":3})]).await.unwrap(), vec![3]);
        let report = log.verify().unwrap().unwrap();
        assert_eq!(report.entries, 3);
        drop(log);
        // A line a crash cut short was never acknowledged: dropped, and the chain goes on.
        let seg = segment_files(dir.path()).pop().unwrap();
        let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
        std::io::Write::write_all(&mut f, b"{\"seq\":4,\"prev\":\"ab").unwrap();
        drop(f);
        let log = open_log(dir.path());
        assert_eq!(log.append(vec![json!({"a": 4})]).await.unwrap(), vec![4]);
        let report = log.verify().unwrap().unwrap();
        assert_eq!((report.entries, report.head_seq), (4, 4));
    }

    #[tokio::test]
    async fn edit_is_detected_at_the_edited_record() {
        let (_d, log) = log_with(5).await;
        let raw = String::from_utf8(log.raw(3).unwrap().unwrap()).unwrap();
        let edited = raw.replace("allowed", "denied");
        log.tamper_raw(3, Some(edited.into_bytes())).await.unwrap();
        let err = log.verify().unwrap().unwrap_err();
        assert_eq!(err.seq, 4, "{err}");
    }

    #[tokio::test]
    async fn deletion_and_truncation_are_detected() {
        let (_d, log) = log_with(5).await;
        log.tamper_raw(2, None).await.unwrap();
        assert_eq!(log.verify().unwrap().unwrap_err().seq, 2);
        let (_d2, log2) = log_with(5).await;
        log2.tamper_raw(5, None).await.unwrap();
        let err = log2.verify().unwrap().unwrap_err();
        assert!(err.reason.contains("truncated"), "{err}");
    }

    #[tokio::test]
    async fn reordering_is_detected() {
        let (_d, log) = log_with(4).await;
        let two = log.raw(2).unwrap().unwrap();
        let three = log.raw(3).unwrap().unwrap();
        log.tamper_raw(2, Some(three)).await.unwrap();
        log.tamper_raw(3, Some(two)).await.unwrap();
        assert_eq!(log.verify().unwrap().unwrap_err().seq, 2);
    }

    /// One record per segment, so retention can prune any prefix of the log.
    fn small_segments() -> DbOptions {
        DbOptions {
            audit_segment_bytes: 1,
            ..DbOptions::default()
        }
    }

    async fn log_at(times: &[i64]) -> (tempfile::TempDir, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(Db::open(dir.path(), small_segments()).unwrap());
        for (i, t) in times.iter().enumerate() {
            let p = if i % 2 == 0 { "pa" } else { "pb" };
            log.append(vec![
                json!({"time": t, "tenant": "t1", "patient": p, "i": i}),
            ])
            .await
            .unwrap();
        }
        (dir, log)
    }

    #[tokio::test]
    async fn prune_keeps_the_chain_verifiable_from_the_anchor() {
        let (dir, log) = log_at(&[100, 200, 300, 400, 500]).await;
        let stats = log.prune_before(350, 1000).await.unwrap();
        assert_eq!(stats.pruned, 3);
        assert_eq!(stats.anchor, Some(3));
        assert_eq!(log.raw(3).unwrap(), None);
        assert!(log.raw(4).unwrap().is_some());
        let report = log.verify().unwrap().unwrap();
        assert_eq!(report.entries, 3, "records 4, 5 and the retention record 6");
        assert_eq!(report.head_seq, 6);
        // Nothing more is due; a second run changes nothing.
        assert_eq!(log.prune_before(350, 1000).await.unwrap().pruned, 0);
        // The chain continues after a reopen, and the pruned records left the index.
        drop(log);
        let log = AuditLog::new(Db::open(dir.path(), small_segments()).unwrap());
        assert_eq!(
            log.append(vec![json!({"time": 600})]).await.unwrap(),
            vec![7]
        );
        assert!(log.verify().unwrap().is_ok());
        let seen = matching(&log, "t1", Some("pa"), i64::MIN, i64::MAX);
        assert_eq!(seen, vec![5]);
    }

    #[tokio::test]
    async fn pruning_everything_then_appending_still_verifies() {
        let (dir, log) = log_at(&[100, 200]).await;
        assert_eq!(log.prune_before(10_000, 1).await.unwrap().pruned, 2);
        // The retention record (time 1) is itself due at the next run.
        assert_eq!(log.prune_before(10_000, 20_000).await.unwrap().pruned, 1);
        assert!(log.verify().unwrap().is_ok());
        drop(log);
        let log = AuditLog::new(Db::open(dir.path(), small_segments()).unwrap());
        log.append(vec![json!({"time": 30_000})]).await.unwrap();
        let report = log.verify().unwrap().unwrap();
        assert_eq!(report.head_seq, 5);
    }

    #[tokio::test]
    async fn tampering_after_prune_is_named() {
        let (_d, log) = log_at(&[100, 200, 300, 400, 500, 600]).await;
        log.prune_before(250, 1000).await.unwrap();
        let raw = String::from_utf8(log.raw(4).unwrap().unwrap()).unwrap();
        log.tamper_raw(4, Some(raw.replace("\"i\":3", "\"i\":9").into_bytes()))
            .await
            .unwrap();
        assert_eq!(log.verify().unwrap().unwrap_err().seq, 5);
        // Deleting the first kept record is named too.
        let (_d, log) = log_at(&[100, 200, 300, 400, 500, 600]).await;
        log.prune_before(250, 1000).await.unwrap();
        log.tamper_raw(3, None).await.unwrap();
        let err = log.verify().unwrap().unwrap_err();
        assert_eq!(err.seq, 3, "{err}");
    }

    #[tokio::test]
    async fn anchor_tampering_is_detected() {
        // Move the anchor forward to hide deleted records, with a hash that chains correctly.
        let (_d, log) = log_at(&[100, 200, 300, 400, 500, 600]).await;
        log.prune_before(250, 1000).await.unwrap();
        let four: AuditEntry = serde_json::from_slice(&log.raw(4).unwrap().unwrap()).unwrap();
        let hash3 = hex::decode(&four.prev).unwrap().try_into().unwrap();
        log.tamper_raw(3, None).await.unwrap();
        log.tamper_anchor(AuditAnchor {
            seq: 3,
            hash: hash3,
        })
        .await
        .unwrap();
        let err = log.verify().unwrap().unwrap_err();
        assert_eq!(err.seq, 3, "{err}");
        assert!(err.reason.contains("anchor"), "{err}");
        // Edit the anchor's hash.
        let (_d, log) = log_at(&[100, 200, 300, 400]).await;
        log.prune_before(250, 1000).await.unwrap();
        let a = log.anchor().unwrap().unwrap();
        log.tamper_anchor(AuditAnchor {
            seq: a.seq,
            hash: [7; 32],
        })
        .await
        .unwrap();
        assert_eq!(log.verify().unwrap().unwrap_err().seq, 3);
        // Front records removed without any anchor: record 1 is missing.
        let (_d, log) = log_at(&[100, 200, 300]).await;
        log.tamper_raw(1, None).await.unwrap();
        assert_eq!(log.verify().unwrap().unwrap_err().seq, 1);
    }

    /// Segments outside the anchor's range (an interrupted prune) are deleted at open only when
    /// the chain confirms the anchor; an anchor written over (past records still there) deletes
    /// nothing and keeps the log from opening.
    #[tokio::test]
    async fn leftover_segments_go_only_on_the_word_of_a_confirmed_anchor() {
        let (d, log) = log_at(&[100, 200, 300, 400, 500]).await;
        let audit_dir = files::dir_of(d.path());
        let saved = files::list_segments(&audit_dir).unwrap();
        let first = std::fs::read(&saved[0].1).unwrap();
        log.prune_before(350, 1000).await.unwrap();
        drop(log);
        // A prune interrupted before deleting its first segment: it goes at the next open.
        std::fs::write(&saved[0].1, &first).unwrap();
        let log = AuditLog::new(Db::open(d.path(), small_segments()).unwrap());
        log.append(vec![json!({"time": 600, "tenant": "t1"})])
            .await
            .unwrap();
        assert!(!saved[0].1.exists(), "a confirmed leftover is deleted");
        assert!(log.verify().unwrap().is_ok());
        drop(log);

        let (d, log) = log_at(&[100, 200, 300, 400, 500]).await;
        let four: AuditEntry = serde_json::from_slice(&log.raw(4).unwrap().unwrap()).unwrap();
        drop(log);
        let audit_dir = files::dir_of(d.path());
        let before = files::list_segments(&audit_dir).unwrap().len();
        files::write_anchor(
            &audit_dir,
            AuditAnchor {
                seq: 3,
                hash: hex::decode(&four.prev).unwrap().try_into().unwrap(),
            },
        )
        .unwrap();
        let log = AuditLog::new(Db::open(d.path(), small_segments()).unwrap());
        let refused = log.append(vec![json!({"time": 600})]).await;
        assert!(
            refused.is_err(),
            "an unconfirmed anchor keeps the log closed"
        );
        assert_eq!(
            files::list_segments(&audit_dir).unwrap().len(),
            before,
            "nothing deleted"
        );
    }

    #[tokio::test]
    async fn a_broken_segment_is_not_pruned() {
        let (_d, log) = log_at(&[100, 200, 300, 400]).await;
        let raw = String::from_utf8(log.raw(2).unwrap().unwrap()).unwrap();
        log.tamper_raw(2, Some(raw.replace("\"i\":1", "\"i\":7").into_bytes()))
            .await
            .unwrap();
        assert!(log.prune_before(1000, 2000).await.is_err());
        assert!(log.raw(1).unwrap().is_some(), "evidence kept");
    }

    #[tokio::test]
    async fn query_reads_the_index_by_patient_and_window() {
        let (_d, log) = log_at(&[100, 200, 300, 400, 500]).await;
        log.append(vec![json!({"time": 250, "tenant": "t2", "patient": "pa"})])
            .await
            .unwrap();
        let run = |patient, from, to| matching(&log, "t1", patient, from, to);
        assert_eq!(run(Some("pa"), 150, 500), vec![3]);
        assert_eq!(run(Some("pa"), i64::MIN, i64::MAX), vec![1, 3, 5]);
        assert_eq!(run(None, 200, 401), vec![2, 3, 4]);
        assert_eq!(run(Some("pb"), 0, 1000), vec![2, 4]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verify_while_appending_and_pruning_reports_no_false_break() {
        let (_d, log) = log_at(&[100, 200, 300]).await;
        let writer = log.clone();
        let appends = tokio::spawn(async move {
            for i in 0..300 {
                writer
                    .append(vec![json!({"time": 1000 + i, "tenant": "t1"})])
                    .await
                    .unwrap();
                if i % 50 == 0 {
                    writer.prune_before(1000 + i, 5000).await.unwrap();
                }
            }
        });
        while !appends.is_finished() {
            let l = log.clone();
            let r = tokio::task::spawn_blocking(move || l.verify().unwrap())
                .await
                .unwrap();
            assert!(r.is_ok(), "{r:?}");
        }
        appends.await.unwrap();
        assert!(log.verify().unwrap().is_ok());
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        files::list_segments(&files::dir_of(dir))
            .unwrap()
            .into_iter()
            .map(|(_, p)| p)
            .collect()
    }

    #[tokio::test]
    async fn records_cut_off_the_end_are_named_and_not_chained_onto() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = open_log(dir.path());
            for i in 0..3 {
                log.append(vec![json!({"i": i})]).await.unwrap();
            }
        }
        let seg = segment_files(dir.path()).pop().unwrap();
        let bytes = std::fs::read(&seg).unwrap();
        let cut = bytes[..bytes.len() - 1]
            .iter()
            .rposition(|b| *b == b'\n')
            .unwrap();
        std::fs::write(&seg, &bytes[..cut + 1]).unwrap();
        let log = open_log(dir.path());
        let err = log.verify().unwrap().unwrap_err();
        assert!(err.reason.contains("truncated") && err.seq == 3, "{err}");
        let refused = log.append(vec![json!({"i": 9})]).await.unwrap_err();
        assert!(
            refused.to_string().contains("removed from the end"),
            "{refused}"
        );
    }

    #[tokio::test]
    async fn an_empty_or_short_head_left_by_a_power_cut_is_no_witness() {
        for short in [0usize, 7] {
            let dir = tempfile::tempdir().unwrap();
            {
                let log = open_log(dir.path());
                for i in 0..2 {
                    log.append(vec![json!({"i": i})]).await.unwrap();
                }
            }
            // The head file was created but its bytes never reached the disk (or only some).
            let head = files::dir_of(dir.path()).join("head");
            let bytes = std::fs::read(&head).unwrap();
            std::fs::write(&head, &bytes[..short]).unwrap();
            let log = open_log(dir.path());
            assert_eq!(log.append(vec![json!({"i": 2})]).await.unwrap(), vec![3]);
            let report = log.verify().unwrap().unwrap();
            assert_eq!((report.entries, report.head_seq), (3, 3));
        }
    }

    /// The stored lines of records `from..=to` of a log of `{"i": n}` records, as one group
    /// would write them.
    async fn lines_of(from: u64, to: u64) -> Vec<Vec<u8>> {
        let (_d, log) = log_with(to).await;
        (from..=to)
            .map(|seq| {
                let mut line = log.raw(seq).unwrap().unwrap();
                line.push(b'\n');
                line
            })
            .collect()
    }

    #[tokio::test]
    async fn a_torn_group_is_cut_at_its_first_break_and_kept_as_evidence() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with_in(dir.path(), 3).await);
        // Records 4–8 written as one group; power lost before its fdatasync: 4 reached the
        // disk, a block from inside 5 to inside 6 did not (zeros), 7 and 8 did.
        let group = lines_of(4, 8).await;
        let kept = group[0].len();
        let mut torn = group.concat();
        let hole = kept + 10..kept + group[1].len() + 12;
        torn[hole].fill(0);
        let seg = segment_files(dir.path()).pop().unwrap();
        let before = std::fs::metadata(&seg).unwrap().len();
        let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
        std::io::Write::write_all(&mut f, &torn).unwrap();
        drop(f);
        let log = open_log(dir.path());
        // Record 4 links and is kept; 5 onwards were never acknowledged.
        assert_eq!(log.append(vec![json!({"i": 9})]).await.unwrap(), vec![5]);
        let report = log.verify().unwrap().unwrap();
        assert_eq!((report.entries, report.head_seq), (5, 5));
        let audit = files::dir_of(dir.path());
        let evidence: Vec<_> = std::fs::read_dir(&audit)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "torn"))
            .collect();
        assert_eq!(evidence.len(), 1, "{evidence:?}");
        assert_eq!(std::fs::read(&evidence[0]).unwrap(), torn[kept..]);
        assert_eq!(
            std::fs::read(&seg).unwrap().len() as u64,
            before + kept as u64 + log.raw(5).unwrap().unwrap().len() as u64 + 1
        );
    }

    #[tokio::test]
    async fn a_torn_group_that_opened_a_segment_is_cut_from_the_segment_s_start() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = AuditLog::new(Db::open(dir.path(), small_segments()).unwrap());
            for i in 0..3 {
                log.append(vec![json!({"i": i, "outcome": "allowed"})])
                    .await
                    .unwrap();
            }
        }
        // Records 1–3 each fill a segment; the open fourth is empty. Records 4–5 written as
        // one group into it: the block holding 4 never reached the disk, 5 did.
        let group = lines_of(4, 5).await;
        let mut torn = group.concat();
        torn[..group[0].len()].fill(0);
        let seg = segment_files(dir.path()).pop().unwrap();
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), 0);
        std::fs::write(&seg, &torn).unwrap();
        let log = AuditLog::new(Db::open(dir.path(), small_segments()).unwrap());
        assert_eq!(log.append(vec![json!({"i": 9})]).await.unwrap(), vec![4]);
        let report = log.verify().unwrap().unwrap();
        assert_eq!((report.entries, report.head_seq), (4, 4));
    }

    #[tokio::test]
    async fn a_break_before_what_the_head_witnesses_still_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with_in(dir.path(), 4).await);
        // Record 2 zeroed in place: the head says 4, so 2 was acknowledged.
        let seg = segment_files(dir.path()).pop().unwrap();
        let mut bytes = std::fs::read(&seg).unwrap();
        let lines: Vec<usize> = bytes
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .map(|(i, _)| i)
            .collect();
        bytes[lines[0] + 1..lines[1]].fill(0);
        std::fs::write(&seg, &bytes).unwrap();
        let log = open_log(dir.path());
        let refused = log.append(vec![json!({"i": 9})]).await.unwrap_err();
        assert!(
            refused.to_string().contains("record 2 does not link"),
            "{refused}"
        );
        assert_eq!(
            std::fs::read(&seg).unwrap(),
            bytes,
            "the evidence stays in place"
        );
    }

    #[tokio::test]
    async fn a_sealed_segment_index_witnesses_the_log_s_length_without_the_head() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = AuditLog::new(Db::open(dir.path(), small_segments()).unwrap());
            for i in 0..3 {
                log.append(vec![json!({"i": i})]).await.unwrap();
            }
        }
        // Records 1–3 each fill a segment; the open fourth is empty. Remove the newest record's
        // segment, the empty one and the head.
        let audit = files::dir_of(dir.path());
        for seg in segment_files(dir.path()).split_off(2) {
            std::fs::remove_file(seg).unwrap();
        }
        std::fs::remove_file(audit.join("head")).unwrap();
        let log = AuditLog::new(Db::open(dir.path(), small_segments()).unwrap());
        let err = log.verify().unwrap().unwrap_err();
        assert!(
            err.reason.contains("index file lists records up to 3") && err.seq == 3,
            "{err}"
        );
        let refused = log.append(vec![json!({"i": 9})]).await.unwrap_err();
        assert!(
            refused.to_string().contains("removed from the end"),
            "{refused}"
        );
    }

    #[tokio::test]
    async fn retention_zeroes_the_due_front_of_a_segment_and_skips_half_zeroed_debris() {
        let dir = tempfile::tempdir().unwrap();
        let log = open_log(dir.path());
        for (i, t) in [100, 200, 300, 400, 500].into_iter().enumerate() {
            let p = if i % 2 == 0 { "pa" } else { "pb" };
            log.append(vec![
                json!({"time": t, "tenant": "t1", "patient": p, "i": i}),
            ])
            .await
            .unwrap();
        }
        let seg = segment_files(dir.path()).pop().unwrap();
        let original = std::fs::read(&seg).unwrap();
        let stats = log.prune_before(350, 1000).await.unwrap();
        assert_eq!((stats.pruned, stats.anchor), (3, Some(3)));
        let pruned = std::fs::read(&seg).unwrap();
        let zeroed = pruned.iter().take_while(|b| **b == 0).count();
        assert!(zeroed > 0 && !pruned[..zeroed].contains(&b'\n'));
        assert!(
            !String::from_utf8_lossy(&pruned).contains("\"i\":2"),
            "the pruned records' bytes are gone"
        );
        assert_eq!(log.raw(3).unwrap(), None);
        let kept = seqs_after(&log, 0);
        assert_eq!(kept, vec![4, 5, 6]);
        let seen = matching(&log, "t1", Some("pa"), i64::MIN, i64::MAX);
        assert_eq!(seen, vec![5], "offsets of kept records still valid");
        // A crash mid-zeroing: some pruned bytes survive, whole lines and pieces of lines.
        let mut half = pruned.clone();
        half[zeroed / 3..zeroed * 2 / 3].copy_from_slice(&original[zeroed / 3..zeroed * 2 / 3]);
        std::fs::write(&seg, &half).unwrap();
        assert_eq!(log.verify().unwrap().unwrap().entries, 3);
        let kept = seqs_after(&log, 0);
        assert_eq!(kept, vec![4, 5, 6]);
        drop(log);
        let log = open_log(dir.path());
        assert_eq!(
            log.append(vec![json!({"time": 600})]).await.unwrap(),
            vec![7]
        );
        assert!(log.verify().unwrap().is_ok());
    }

    #[tokio::test]
    async fn lost_or_cut_index_files_are_rebuilt_from_the_segments_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let audit = files::dir_of(dir.path());
        {
            let log = AuditLog::new(Db::open(dir.path(), small_segments()).unwrap());
            for t in 1..=6 {
                log.append(vec![json!({"time": t, "tenant": "t1", "patient": "pa"})])
                    .await
                    .unwrap();
            }
        }
        let sidecars = idx::list_sidecars(&audit).unwrap();
        assert_eq!(sidecars.len(), 6, "one per sealed segment");
        std::fs::remove_file(&sidecars[1].1).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&sidecars[4].1)
            .unwrap();
        f.set_len(50).unwrap();
        let log = AuditLog::new(Db::open(dir.path(), small_segments()).unwrap());
        log.open().unwrap();
        assert_eq!(
            matching(&log, "t1", Some("pa"), 0, 100),
            (1..=6).collect::<Vec<_>>()
        );
        assert_eq!(matching(&log, "t1", None, 3, 5), vec![3, 4]);
        assert_eq!(idx::list_sidecars(&audit).unwrap().len(), 6);
    }

    #[tokio::test]
    async fn the_open_segment_is_indexed_in_memory_and_again_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let options = DbOptions {
            audit_segment_bytes: 600,
            ..DbOptions::default()
        };
        let body = |t: i64, p: &str| json!({"time": t, "tenant": "t1", "patient": p});
        {
            let log = AuditLog::new(Db::open(dir.path(), options.clone()).unwrap());
            for t in 0..10 {
                log.append(vec![body(t, if t % 3 == 0 { "pa" } else { "pb" })])
                    .await
                    .unwrap();
            }
            // Records in a sealed segment and in the open one alike.
            assert!(segment_files(dir.path()).len() >= 3);
            assert_eq!(matching(&log, "t1", Some("pa"), 0, 100), vec![1, 4, 7, 10]);
        }
        let log = AuditLog::new(Db::open(dir.path(), options).unwrap());
        assert_eq!(matching(&log, "t1", Some("pa"), 0, 100), vec![1, 4, 7, 10]);
        assert_eq!(matching(&log, "t1", Some("pb"), 4, 7), vec![5, 6]);
        assert!(matching(&log, "t2", None, 0, 100).is_empty());
    }

    #[tokio::test]
    async fn a_log_kept_in_the_store_by_earlier_versions_moves_to_segments() {
        let dir = tempfile::tempdir().unwrap();
        let bodies = [
            json!({"time": 10, "tenant": "t1", "patient": "pa"}),
            json!({"time": 20, "tenant": "t1", "patient": "pb"}),
            json!({"time": 30, "tenant": "t1", "patient": "pa"}),
        ];
        {
            // The old layout: entries keyed by seq, the head beside them.
            let db = Db::open(dir.path(), DbOptions::default()).unwrap();
            let mut prev = [0u8; 32];
            let mut rows = Vec::new();
            for (i, b) in bodies.iter().enumerate() {
                let bytes = PreparedRecord::new(b).entry_bytes(i as u64 + 1, &prev);
                prev = entry_hash(&bytes).unwrap();
                rows.push((i as u64 + 1, bytes));
            }
            db.committer()
                .run(move |txn| {
                    for (seq, bytes) in rows {
                        txn.put(Table::Audit, keys::u64_be(seq).to_vec(), bytes);
                    }
                    let mut head = keys::u64_be(3).to_vec();
                    head.extend_from_slice(&prev);
                    txn.put(Table::Meta, OLD_HEAD_KEY.to_vec(), head);
                    Ok(())
                })
                .await
                .unwrap();
        }
        let db = Db::open(dir.path(), DbOptions::default()).unwrap();
        let log = AuditLog::new(db.clone());
        assert_eq!(log.verify().unwrap().unwrap().entries, 3);
        assert_eq!(
            log.append(vec![json!({"time": 40})]).await.unwrap(),
            vec![4]
        );
        assert_eq!(log.verify().unwrap().unwrap().entries, 4);
        assert!(
            db.tables().get(Table::Audit).first_key_value().is_none(),
            "old copy cleared"
        );
        let seen = matching(&log, "t1", Some("pa"), 0, 100);
        assert_eq!(seen, vec![1, 3]);
    }

    #[tokio::test]
    async fn the_fjall_index_of_earlier_versions_is_cleared_once() {
        let (dir, log) = log_with(2).await;
        let db = log.db.clone();
        db.committer()
            .run(|txn| {
                txn.put(
                    Table::AuditIdxTime,
                    b"old-key".to_vec(),
                    keys::u64_be(0).to_vec(),
                );
                txn.put(
                    Table::Meta,
                    b"audit_indexed_through".to_vec(),
                    keys::u64_be(2).to_vec(),
                );
                Ok(())
            })
            .await
            .unwrap();
        drop((log, db));
        let db = Db::open(dir.path(), DbOptions::default()).unwrap();
        let log = AuditLog::new(db.clone());
        assert_eq!(log.verify().unwrap().unwrap().entries, 2);
        let tables = db.tables();
        assert!(tables.get(Table::AuditIdxTime).first_key_value().is_none());
        assert!(tables
            .get(Table::Meta)
            .get(b"audit_indexed_through")
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn segments_rotate_and_readers_cross_them() {
        let dir = tempfile::tempdir().unwrap();
        let options = DbOptions {
            audit_segment_bytes: 400,
            ..DbOptions::default()
        };
        let log = AuditLog::new(Db::open(dir.path(), options.clone()).unwrap());
        for i in 0..20 {
            log.append(vec![
                json!({"time": i, "tenant": "t1", "pad": "x".repeat(50)}),
            ])
            .await
            .unwrap();
        }
        assert!(segment_files(dir.path()).len() > 3);
        assert_eq!(seqs_after(&log, 7), (8..=20).collect::<Vec<_>>());
        let stats = log.prune_before(10, 100).await.unwrap();
        assert_eq!(stats.anchor, Some(10));
        assert!(log.verify().unwrap().is_ok());
        drop(log);
        let log = AuditLog::new(Db::open(dir.path(), options).unwrap());
        assert_eq!(
            log.append(vec![json!({"time": 99})]).await.unwrap(),
            vec![22]
        );
        assert_eq!(log.verify().unwrap().unwrap().entries, 12);
    }
}
