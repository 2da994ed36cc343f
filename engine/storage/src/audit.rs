//! The tamper-evident audit log.
//!
//! Each entry stores `{"seq":n,"prev":"<hex sha256 of entry n-1>","body":{…}}`; its own hash is the
//! SHA-256 of those stored bytes. The newest sequence number and hash are also kept apart (the
//! chain head), updated in the same atomic write. Editing any entry breaks the next entry's `prev`
//! (or the head), deleting one leaves a gap, and reordering breaks both — `verify` names the first
//! bad record. Entries are durable before `append` returns, sharing fsyncs with other writes.

use crate::db::{Db, Table};
use crate::keys;
use crate::{Result, StorageError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

const HEAD_KEY: &[u8] = b"audit_head";

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
        self.db
            .committer()
            .run(move |txn| {
                let mut seqs = Vec::with_capacity(bodies.len());
                for body in bodies {
                    let seq = txn.counters.audit_seq + 1;
                    let entry = AuditEntry {
                        seq,
                        prev: hex::encode(txn.counters.audit_head),
                        body,
                    };
                    let bytes = serde_json::to_vec(&entry).expect("audit entries serialize");
                    let hash = entry_hash(&bytes)?;
                    txn.put(Table::Audit, keys::u64_be(seq).to_vec(), bytes);
                    let mut head = keys::u64_be(seq).to_vec();
                    head.extend_from_slice(&hash);
                    txn.put(Table::Meta, HEAD_KEY.to_vec(), head);
                    txn.counters.audit_seq = seq;
                    txn.counters.audit_head = hash;
                    seqs.push(seq);
                }
                Ok(seqs)
            })
            .await
    }

    /// Entries with `seq > after`, oldest first.
    pub fn read_after(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>> {
        let mut out = Vec::new();
        for item in self
            .db
            .tables()
            .get(Table::Audit)
            .range(keys::u64_be(after.saturating_add(1))..)
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
    pub fn verify(&self) -> Result<std::result::Result<AuditVerifyReport, AuditVerifyError>> {
        let mut prev = [0u8; 32];
        let mut count = 0u64;
        let bad = |seq, reason: &str| {
            Ok(Err(AuditVerifyError {
                seq,
                reason: reason.to_string(),
            }))
        };
        for (expected_seq, item) in (1u64..).zip(self.db.tables().get(Table::Audit).iter()) {
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
            prev = entry_hash(&v)?;
            count += 1;
        }
        let head = self.db.tables().get(Table::Meta).get(HEAD_KEY)?;
        match head {
            None if count == 0 => {}
            None => return bad(count, "chain head is missing"),
            Some(h) => {
                let head_seq = keys::read_u64(&h).unwrap_or(0);
                if head_seq != count {
                    return bad(
                        count.min(head_seq) + 1,
                        &format!("chain head says {head_seq} records, found {count} (truncated?)"),
                    );
                }
                if h.get(8..) != Some(&prev[..]) {
                    return bad(count, "last record does not match the chain head (edited?)");
                }
            }
        }
        Ok(Ok(AuditVerifyReport {
            entries: count,
            head_seq: count,
            head_hash: hex::encode(prev),
        }))
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

    pub fn raw(&self, seq: u64) -> Result<Option<Vec<u8>>> {
        Ok(self
            .db
            .tables()
            .get(Table::Audit)
            .get(keys::u64_be(seq))?
            .map(|v| v.to_vec()))
    }
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
}
