//! The tamper-evident audit log.
//!
//! Each entry stores `{"seq":n,"prev":"<hex sha256 of entry n-1>","body":{…}}`; its own hash is the
//! SHA-256 of those stored bytes. The newest sequence number and hash are also kept apart (the
//! chain head), updated in the same atomic write. Editing any entry breaks the next entry's `prev`
//! (or the head), deleting one leaves a gap, and reordering breaks both — `verify` names the first
//! bad record. Entries are durable before `append` returns, sharing fsyncs with other writes.
//!
//! **Indexes.** The same write that appends an entry adds it to two index keyspaces — (tenant,
//! patient, time) and (tenant, time) — so an audit report for one patient or one time window
//! reads only the matching records ([`AuditLog::query`]).
//!
//! **Retention.** [`AuditLog::prune_before`] deletes the oldest records (and their index
//! entries) and, in the same atomic write, stores the *anchor* — the sequence number and hash of
//! the last pruned record — and appends a chained `audit-retention` record naming that anchor.
//! `verify` then starts from the anchor: the first kept record must chain to it, and the newest
//! `audit-retention` record must attest it, so moving the anchor to hide deleted records, or
//! editing it, is detected like any other edit. A segment whose chain is already broken is never
//! pruned (the evidence stays).

use crate::db::{Db, Table};
use crate::keys;
use crate::{Result, StorageError};
use fjall::Readable;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

const HEAD_KEY: &[u8] = b"audit_head";
/// seq (u64 BE) + SHA-256 of the last pruned record.
const ANCHOR_KEY: &[u8] = b"audit_anchor";
/// Present once every record is in the index keyspaces (new logs, or after [`AuditLog::ensure_index`]).
const INDEXED_KEY: &[u8] = b"audit_indexed_v1";
/// Body `kind` of the record that retention appends.
pub const RETENTION_KIND: &str = "audit-retention";
/// Most records deleted by one write batch of [`AuditLog::prune_before`].
const PRUNE_BATCH: usize = 20_000;

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

impl AuditAnchor {
    fn encode(&self) -> Vec<u8> {
        let mut v = keys::u64_be(self.seq).to_vec();
        v.extend_from_slice(&self.hash);
        v
    }

    fn decode(v: &[u8]) -> Option<Self> {
        Some(Self {
            seq: keys::read_u64(v)?,
            hash: v.get(8..40)?.try_into().ok()?,
        })
    }
}

pub(crate) fn read_anchor(tables: &crate::db::Tables) -> Result<Option<AuditAnchor>> {
    decode_anchor(tables.get(Table::Meta).get(ANCHOR_KEY)?)
}

fn decode_anchor(raw: Option<fjall::Slice>) -> Result<Option<AuditAnchor>> {
    match raw {
        None => Ok(None),
        Some(v) => AuditAnchor::decode(&v)
            .map(Some)
            .ok_or_else(|| StorageError::corrupt("audit anchor", "not seq + sha256")),
    }
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

fn index_keys(seq: u64, body: &Value) -> (Vec<u8>, Option<Vec<u8>>) {
    IndexPrefixes::of(body).keys(seq)
}

/// The index keys of a record without their `seq` suffix: computed before the record reaches
/// the committer, which only knows the sequence number.
struct IndexPrefixes {
    by_time: Vec<u8>,
    by_patient: Option<Vec<u8>>,
}

impl IndexPrefixes {
    fn of(body: &Value) -> Self {
        Self::new(
            body.get("tenant").and_then(Value::as_str).unwrap_or(""),
            record_time(body).unwrap_or(0),
            body.get("patient").and_then(Value::as_str),
        )
    }

    fn new(tenant: &str, time_ms: i64, patient: Option<&str>) -> Self {
        let time = keys::i64_be(time_ms);
        let mut by_time = keys::prefix(&[tenant.as_bytes()]);
        by_time.extend_from_slice(&time);
        let by_patient = patient.filter(|p| !p.is_empty()).map(|p| {
            let mut k = keys::prefix(&[tenant.as_bytes(), p.as_bytes()]);
            k.extend_from_slice(&time);
            k
        });
        Self {
            by_time,
            by_patient,
        }
    }

    fn keys(mut self, seq: u64) -> (Vec<u8>, Option<Vec<u8>>) {
        let seq = keys::u64_be(seq);
        self.by_time.extend_from_slice(&seq);
        if let Some(k) = self.by_patient.as_mut() {
            k.extend_from_slice(&seq);
        }
        (self.by_time, self.by_patient)
    }
}

fn put_index_keys(txn: &mut crate::committer::Txn<'_>, keys: (Vec<u8>, Option<Vec<u8>>)) {
    let (by_time, by_patient) = keys;
    txn.put(Table::AuditIdxTime, by_time, Vec::new());
    if let Some(k) = by_patient {
        txn.put(Table::AuditIdxPatient, k, Vec::new());
    }
}

fn put_index(txn: &mut crate::committer::Txn<'_>, seq: u64, body: &Value) {
    put_index_keys(txn, index_keys(seq, body));
}

/// A record serialized and indexed outside the committer thread, so the serial part of an
/// append is only the chain link: sequence number, `prev`, hash and the puts.
pub struct PreparedRecord {
    body: Vec<u8>,
    index: IndexPrefixes,
}

impl PreparedRecord {
    fn new(body: &Value) -> Self {
        Self {
            body: serde_json::to_vec(body).expect("audit bodies serialize"),
            index: IndexPrefixes::of(body),
        }
    }

    /// A record the caller has serialized itself (a JSON object, as [`AuditEntry::body`] reads
    /// it back), with the fields the indexes need: its tenant, time (ms) and patient — the same
    /// values the body holds under `tenant`, `time` and `patient`. For hot paths that would
    /// otherwise build a `serde_json::Value` per record only to serialize it.
    pub fn serialized(json: Vec<u8>, tenant: &str, time_ms: i64, patient: Option<&str>) -> Self {
        Self {
            body: json,
            index: IndexPrefixes::new(tenant, time_ms, patient),
        }
    }

    /// The record's JSON (the entry's `body`).
    pub fn json(&self) -> &[u8] {
        &self.body
    }

    /// The stored bytes: exactly `serde_json::to_vec(&AuditEntry { seq, prev, body })`.
    fn entry_bytes(&self, seq: u64, prev: &[u8; 32]) -> Vec<u8> {
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

    /// Appends this record to the chain inside a committer job; returns its sequence number.
    fn link(self, txn: &mut crate::committer::Txn<'_>) -> Result<u64> {
        let seq = txn.counters.audit_seq + 1;
        let bytes = self.entry_bytes(seq, &txn.counters.audit_head);
        let hash = entry_hash(&bytes)?;
        put_index_keys(txn, self.index.keys(seq));
        if seq == 1 {
            // A new log: every record will be indexed from the start.
            txn.put(Table::Meta, INDEXED_KEY.to_vec(), Vec::new());
        }
        txn.put(Table::Audit, keys::u64_be(seq).to_vec(), bytes);
        let mut head = keys::u64_be(seq).to_vec();
        head.extend_from_slice(&hash);
        txn.put(Table::Meta, HEAD_KEY.to_vec(), head);
        txn.counters.audit_seq = seq;
        txn.counters.audit_head = hash;
        Ok(seq)
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

impl AuditLog {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Appends records in order; resolves once they are durable. Returns their sequence numbers.
    pub async fn append(&self, bodies: Vec<Value>) -> Result<Vec<u64>> {
        let records: Vec<PreparedRecord> = bodies.iter().map(PreparedRecord::new).collect();
        drop(bodies);
        self.append_prepared(records).await
    }

    /// [`append`](Self::append) for records already serialized ([`PreparedRecord::serialized`]).
    pub async fn append_prepared(&self, records: Vec<PreparedRecord>) -> Result<Vec<u64>> {
        self.db
            .committer()
            .run(move |txn| records.into_iter().map(|r| r.link(txn)).collect())
            .await
    }

    /// Entries with `seq > after`, oldest first.
    pub fn read_after(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>> {
        let mut out = Vec::new();
        for item in self
            .db
            .range(Table::Audit, keys::u64_be(after.saturating_add(1))..)
        {
            if out.len() >= limit {
                break;
            }
            let (_, v) = item.into_inner()?;
            out.push(serde_json::from_slice(&v).map_err(|e| StorageError::corrupt("audit", e))?);
        }
        Ok(out)
    }

    /// Walks the whole chain. `Ok(Err(_))` names the first bad record; `Err` is a storage failure.
    ///
    /// On a running server, records are appended (and retention may prune) while the walk reads:
    /// a failure seen while the chain head or anchor moved is re-checked (a few times) before it
    /// is reported, so only a break that stays put is named.
    pub fn verify(&self) -> Result<std::result::Result<AuditVerifyReport, AuditVerifyError>> {
        let meta = |k: &[u8]| -> Result<Option<Vec<u8>>> {
            Ok(self
                .db
                .tables()
                .get(Table::Meta)
                .get(k)?
                .map(|v| v.to_vec()))
        };
        let mut attempt = 0;
        loop {
            let before = (meta(HEAD_KEY)?, meta(ANCHOR_KEY)?);
            let result = self.verify_once()?;
            attempt += 1;
            if result.is_ok() || attempt >= 5 || before == (meta(HEAD_KEY)?, meta(ANCHOR_KEY)?) {
                return Ok(result);
            }
        }
    }

    fn verify_once(&self) -> Result<std::result::Result<AuditVerifyReport, AuditVerifyError>> {
        // One snapshot for every read: a plain point read also sees a group commit that is
        // still being applied, an iterator does not, and mixing them reported false breaks.
        let snap = self.db.snapshot();
        let meta = self.db.tables().get(Table::Meta);
        let head0 = snap.get(meta, HEAD_KEY)?;
        let anchor = decode_anchor(snap.get(meta, ANCHOR_KEY)?)?;
        let start = anchor.map_or(0, |a| a.seq);
        let mut prev = anchor.map_or([0u8; 32], |a| a.hash);
        let mut count = 0u64;
        // (seq, pruned_through, anchor_hash) of the newest retention record seen.
        let mut attested: Option<(u64, u64, String)> = None;
        let bad = |seq, reason: &str| {
            Ok(Err(AuditVerifyError {
                seq,
                reason: reason.to_string(),
            }))
        };
        for (expected_seq, item) in (start + 1..).zip(snap.iter(self.db.tables().get(Table::Audit)))
        {
            let (k, v) = item.into_inner()?;
            let key_seq = keys::read_u64(&k).unwrap_or(0);
            let entry: AuditEntry = match serde_json::from_slice(&v) {
                Ok(e) => e,
                Err(_) => return bad(key_seq, "record is not valid JSON (edited?)"),
            };
            if key_seq != expected_seq {
                return bad(
                    expected_seq,
                    &format!("record missing (next present is {key_seq})"),
                );
            }
            if entry.seq != key_seq {
                return bad(
                    key_seq,
                    &format!("record claims sequence {} (moved?)", entry.seq),
                );
            }
            if entry.prev != hex::encode(prev) {
                return bad(
                    key_seq,
                    "previous-hash mismatch (this or the record before was edited)",
                );
            }
            if entry.body.get("kind").and_then(Value::as_str) == Some(RETENTION_KIND) {
                let through = entry.body.get("pruned_through").and_then(Value::as_u64);
                let hash = entry.body.get("anchor_hash").and_then(Value::as_str);
                attested = Some((
                    key_seq,
                    through.unwrap_or(0),
                    hash.unwrap_or("").to_string(),
                ));
            }
            prev = entry_hash(&v)?;
            count += 1;
        }
        let last = start + count;
        // The anchor must be the one the newest retention record (inside the chain) names;
        // otherwise records were removed from the front and the anchor moved to hide it.
        match (&anchor, &attested) {
            (None, None) => {}
            (None, Some((seq, _, _))) => {
                return bad(
                    *seq,
                    "retention record present but the chain anchor is missing",
                )
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
                if *through != a.seq || *hash != hex::encode(a.hash) {
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
        // The head before the walk bounds what must be there; the head after it bounds what may
        // be there (records appended meanwhile). A stopped server has one head for both.
        let parse = |h: Option<fjall::Slice>| {
            h.map(|h| {
                (
                    keys::read_u64(&h).unwrap_or(0),
                    h.get(8..).map(<[u8]>::to_vec),
                )
            })
        };
        let (seq0, hash0) = parse(head0).unwrap_or((0, None));
        let Some((seq1, hash1)) = parse(snap.get(meta, HEAD_KEY)?) else {
            if last == 0 {
                return Ok(Ok(AuditVerifyReport {
                    entries: 0,
                    head_seq: 0,
                    head_hash: hex::encode(prev),
                }));
            }
            return bad(last, "chain head is missing");
        };
        if last < seq0 || last > seq1 {
            let head_seq = if last < seq0 { seq0 } else { seq1 };
            return bad(
                last.min(head_seq) + 1,
                &format!("chain head says {head_seq} records, found {last} (truncated?)"),
            );
        }
        let head_hash = if last == seq1 {
            Some(hash1)
        } else if last == seq0 {
            Some(hash0)
        } else {
            None // appended while walking: the chain itself was checked up to `last`
        };
        if let Some(h) = head_hash {
            if h.as_deref() != Some(&prev[..]) {
                return bad(last, "last record does not match the chain head (edited?)");
            }
        }
        Ok(Ok(AuditVerifyReport {
            entries: count,
            head_seq: last,
            head_hash: hex::encode(prev),
        }))
    }

    /// The retention anchor, if records were ever pruned.
    pub fn anchor(&self) -> Result<Option<AuditAnchor>> {
        read_anchor(self.db.tables())
    }

    /// Deletes the oldest records whose time is before `cutoff_ms` (stopping at the first newer
    /// one, so the kept chain stays contiguous), with their index entries; stores the anchor and
    /// appends an `audit-retention` record in the same atomic write. Refuses (error) to prune a
    /// segment whose chain does not verify. Runs in batches; returns once all are durable.
    pub async fn prune_before(&self, cutoff_ms: i64, now_ms: i64) -> Result<AuditPruneStats> {
        let mut stats = AuditPruneStats::default();
        loop {
            let this = self.clone();
            let plan = tokio::task::spawn_blocking(move || this.plan_prune(cutoff_ms))
                .await
                .map_err(|e| StorageError::Io(std::io::Error::other(e.to_string())))??;
            let Some(plan) = plan else { break };
            let n = plan.seqs.len() as u64;
            let anchor = self
                .db
                .committer()
                .run(move |txn| {
                    // Pruning starts right after the stored anchor, or nothing was planned right.
                    let current = txn
                        .get(Table::Meta, ANCHOR_KEY)?
                        .and_then(|v| AuditAnchor::decode(&v))
                        .map_or(0, |a| a.seq);
                    if plan.seqs.first() != Some(&(current + 1)) {
                        return Err(StorageError::corrupt(
                            "audit retention",
                            "the chain changed while pruning; try again",
                        ));
                    }
                    for (seq, idx) in plan.seqs.iter().zip(plan.index_keys) {
                        txn.delete(Table::Audit, keys::u64_be(*seq).to_vec());
                        txn.delete(Table::AuditIdxTime, idx.0);
                        if let Some(k) = idx.1 {
                            txn.delete(Table::AuditIdxPatient, k);
                        }
                    }
                    txn.put(Table::Meta, ANCHOR_KEY.to_vec(), plan.anchor.encode());
                    // The retention record attests the anchor inside the chain itself.
                    PreparedRecord::new(&serde_json::json!({
                        "kind": RETENTION_KIND,
                        "time": now_ms,
                        "cutoff": cutoff_ms,
                        "pruned": plan.seqs.len(),
                        "pruned_through": plan.anchor.seq,
                        "anchor_hash": hex::encode(plan.anchor.hash),
                    }))
                    .link(txn)?;
                    Ok(plan.anchor.seq)
                })
                .await?;
            stats.pruned += n;
            stats.anchor = Some(anchor);
            if n < PRUNE_BATCH as u64 {
                break;
            }
        }
        Ok(stats)
    }

    /// The next batch to prune, checked link by link from the anchor; `None` when nothing is due.
    fn plan_prune(&self, cutoff_ms: i64) -> Result<Option<PrunePlan>> {
        let anchor = read_anchor(self.db.tables())?;
        let mut prev = anchor.map_or([0u8; 32], |a| a.hash);
        let mut expected = anchor.map_or(1, |a| a.seq + 1);
        let mut seqs = Vec::new();
        let mut index = Vec::new();
        let mut last_time: Option<i64> = None;
        let broken = |seq: u64| {
            StorageError::corrupt(
                "audit retention",
                format!("chain does not verify at record {seq}; nothing pruned (run `tributary audit verify`)"),
            )
        };
        for item in self.db.tables().get(Table::Audit).iter() {
            let (k, v) = item.into_inner()?;
            let seq = keys::read_u64(&k).unwrap_or(0);
            let entry: AuditEntry = serde_json::from_slice(&v).map_err(|_| broken(seq))?;
            if seq != expected || entry.seq != seq || entry.prev != hex::encode(prev) {
                return Err(broken(expected.min(seq)));
            }
            // A record without a time of its own is as old as the one before it.
            let t = record_time(&entry.body).or(last_time);
            let due = t.is_some_and(|t| t < cutoff_ms);
            if !due || seqs.len() >= PRUNE_BATCH {
                break;
            }
            last_time = t;
            seqs.push(seq);
            index.push(index_keys(seq, &entry.body));
            prev = entry_hash(&v)?;
            expected = seq + 1;
        }
        if seqs.is_empty() {
            return Ok(None);
        }
        let last = *seqs.last().expect("not empty");
        Ok(Some(PrunePlan {
            seqs,
            index_keys: index,
            anchor: AuditAnchor {
                seq: last,
                hash: prev,
            },
        }))
    }

    /// Indexes records written before the index keyspaces existed (once per data directory).
    pub async fn ensure_index(&self) -> Result<u64> {
        if self
            .db
            .tables()
            .get(Table::Meta)
            .get(INDEXED_KEY)?
            .is_some()
        {
            return Ok(0);
        }
        let mut after = 0;
        let mut done = 0u64;
        loop {
            let batch = self.read_after(after, 4096)?;
            let Some(last) = batch.last().map(|e| e.seq) else {
                break;
            };
            after = last;
            done += batch.len() as u64;
            self.db
                .committer()
                .run(move |txn| {
                    for e in &batch {
                        put_index(txn, e.seq, &e.body);
                    }
                    Ok(())
                })
                .await?;
        }
        self.db
            .committer()
            .run(|txn| {
                txn.put(Table::Meta, INDEXED_KEY.to_vec(), Vec::new());
                Ok(())
            })
            .await?;
        Ok(done)
    }

    /// Records of one tenant (optionally one patient) in `[from_ms, to_ms)`, in time order,
    /// read through the index: `f` gets each and returns `false` to stop. `Ok(false)` when the
    /// index is not built yet (see [`AuditLog::ensure_index`]); the caller then scans.
    pub fn query(&self, q: &AuditQuery, mut f: impl FnMut(AuditEntry) -> bool) -> Result<bool> {
        let tables = self.db.tables();
        if tables.get(Table::Meta).get(INDEXED_KEY)?.is_none() {
            return Ok(false);
        }
        let (table, prefix) = match &q.patient {
            Some(p) => (
                Table::AuditIdxPatient,
                keys::prefix(&[q.tenant.as_bytes(), p.as_bytes()]),
            ),
            None => (Table::AuditIdxTime, keys::prefix(&[q.tenant.as_bytes()])),
        };
        let bound = |t: i64| {
            let mut k = prefix.clone();
            k.extend_from_slice(&keys::i64_be(t));
            k
        };
        let mut hi = bound(q.to_ms);
        if q.to_ms == i64::MAX {
            // `to` is exclusive; the largest time still belongs in an open-ended window.
            hi = prefix.clone();
            hi.extend_from_slice(&[0xff; 17]);
        }
        for item in tables.get(table).range(bound(q.from_ms)..hi) {
            let k = item.key()?;
            let Some(seq) = k.get(prefix.len() + 8..).and_then(keys::read_u64) else {
                continue;
            };
            let Some(v) = tables.get(Table::Audit).get(keys::u64_be(seq))? else {
                continue; // pruned meanwhile
            };
            let entry: AuditEntry =
                serde_json::from_slice(&v).map_err(|e| StorageError::corrupt("audit", e))?;
            if !f(entry) {
                break;
            }
        }
        Ok(true)
    }

    /// Test and forensics hook: overwrite or delete a raw record, bypassing the chain.
    #[doc(hidden)]
    pub async fn tamper_raw(&self, seq: u64, replacement: Option<Vec<u8>>) -> Result<()> {
        self.db
            .committer()
            .run(move |txn| {
                let key = keys::u64_be(seq).to_vec();
                match replacement {
                    Some(v) => txn.put(Table::Audit, key, v),
                    None => txn.delete(Table::Audit, key),
                }
                Ok(())
            })
            .await
    }

    /// Test and forensics hook: overwrite the retention anchor, bypassing the chain.
    #[doc(hidden)]
    pub async fn tamper_anchor(&self, anchor: AuditAnchor) -> Result<()> {
        self.db
            .committer()
            .run(move |txn| {
                txn.put(Table::Meta, ANCHOR_KEY.to_vec(), anchor.encode());
                Ok(())
            })
            .await
    }

    pub fn raw(&self, seq: u64) -> Result<Option<Vec<u8>>> {
        Ok(self
            .db
            .tables()
            .get(Table::Audit)
            .get(keys::u64_be(seq))?
            .map(|v| v.to_vec()))
    }
}

struct PrunePlan {
    seqs: Vec<u64>,
    index_keys: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    anchor: AuditAnchor,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DbOptions;
    use serde_json::json;

    async fn log_with(n: u64) -> (tempfile::TempDir, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(Db::open(dir.path(), DbOptions::default()).unwrap());
        for i in 0..n {
            log.append(vec![json!({"i": i, "outcome": "allowed"})])
                .await
                .unwrap();
        }
        (dir, log)
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
        let log = AuditLog::new(Db::open(dir.path(), DbOptions::default()).unwrap());
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
        let mut by_patient = Vec::new();
        let q = AuditQuery {
            tenant: "t1".into(),
            patient: Some("p1".into()),
            from_ms: 0,
            to_ms: 2_000,
        };
        assert!(log
            .query(&q, |e| {
                by_patient.push(e.seq);
                true
            })
            .unwrap());
        assert_eq!(by_patient, vec![1, 2]);
        let mut window = Vec::new();
        let q = AuditQuery {
            patient: None,
            from_ms: 1_200,
            ..q
        };
        assert!(log
            .query(&q, |e| {
                window.push(e.seq);
                true
            })
            .unwrap());
        assert_eq!(window, vec![3]);
        let entries = log.read_after(0, 10).unwrap();
        assert_eq!(entries[0].body, entries[1].body);
        assert_eq!(log.verify().unwrap().unwrap().entries, 3);
    }

    #[tokio::test]
    async fn intact_chain_verifies_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = AuditLog::new(Db::open(dir.path(), DbOptions::default()).unwrap());
            log.append(vec![json!({"a":1}), json!({"a":2})])
                .await
                .unwrap();
        }
        let log = AuditLog::new(Db::open(dir.path(), DbOptions::default()).unwrap());
        assert_eq!(log.append(vec![json!({"a":3})]).await.unwrap(), vec![3]);
        let report = log.verify().unwrap().unwrap();
        assert_eq!(report.entries, 3);
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

    async fn log_at(times: &[i64]) -> (tempfile::TempDir, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(Db::open(dir.path(), DbOptions::default()).unwrap());
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
        let log = AuditLog::new(Db::open(dir.path(), DbOptions::default()).unwrap());
        assert_eq!(
            log.append(vec![json!({"time": 600})]).await.unwrap(),
            vec![7]
        );
        assert!(log.verify().unwrap().is_ok());
        let mut seen = Vec::new();
        let q = AuditQuery {
            tenant: "t1".into(),
            patient: Some("pa".into()),
            from_ms: i64::MIN,
            to_ms: i64::MAX,
        };
        assert!(log
            .query(&q, |e| {
                seen.push(e.seq);
                true
            })
            .unwrap());
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
        let log = AuditLog::new(Db::open(dir.path(), DbOptions::default()).unwrap());
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
        let run = |patient: Option<&str>, from, to| {
            let mut seen = Vec::new();
            let q = AuditQuery {
                tenant: "t1".into(),
                patient: patient.map(String::from),
                from_ms: from,
                to_ms: to,
            };
            assert!(log
                .query(&q, |e| {
                    seen.push(e.seq);
                    true
                })
                .unwrap());
            seen
        };
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
}
