//! Dead letters: deliveries an egress relay gave up on (after its retries), kept durably so they
//! survive a restart and stay visible to operators until someone acts on them. Each record is a
//! small PHI-free JSON object (ids, event numbers, a reason), never a payload.

use crate::db::{Db, Table};
use crate::keys;
use crate::{Result, StorageError};
use serde_json::{json, Value};

/// The dead letters of one relay (`subscriptions`, …), in the order they were written.
#[derive(Clone)]
pub struct DeadLetterLog {
    db: Db,
    relay: String,
    /// Most records kept for this relay; the oldest beyond it are dropped.
    max: usize,
}

impl DeadLetterLog {
    pub fn new(db: Db, relay: &str, max: usize) -> Self {
        Self {
            db,
            relay: relay.to_string(),
            max: max.max(1),
        }
    }

    /// Durably appends one record (resolves after the fsync), then trims the oldest beyond the
    /// bound.
    pub async fn append(&self, record: &Value) -> Result<()> {
        let value = serde_json::to_vec(&json!({"relay": self.relay, "record": record}))
            .map_err(|e| StorageError::corrupt("dead letter", e))?;
        self.db
            .committer()
            .run(move |txn| {
                txn.counters.dead_letter_seq += 1;
                let key = keys::u64_be(txn.counters.dead_letter_seq).to_vec();
                txn.put(Table::DeadLetter, key, value);
                Ok(())
            })
            .await?;
        let mine = self.keys()?;
        if mine.len() > self.max {
            let doomed: Vec<Vec<u8>> = mine[..mine.len() - self.max].to_vec();
            self.db
                .committer()
                .run(move |txn| {
                    for k in doomed {
                        txn.delete(Table::DeadLetter, k);
                    }
                    Ok(())
                })
                .await?;
        }
        Ok(())
    }

    fn entries(&self) -> Result<Vec<(Vec<u8>, Value)>> {
        let mut out = Vec::new();
        for item in self.db.tables().get(Table::DeadLetter).iter() {
            let (k, v) = item.into_inner()?;
            let v: Value =
                serde_json::from_slice(&v).map_err(|e| StorageError::corrupt("dead letter", e))?;
            if v.get("relay").and_then(Value::as_str) == Some(self.relay.as_str()) {
                out.push((k.to_vec(), v["record"].clone()));
            }
        }
        Ok(out)
    }

    fn keys(&self) -> Result<Vec<Vec<u8>>> {
        Ok(self.entries()?.into_iter().map(|(k, _)| k).collect())
    }

    /// Every record of this relay, oldest first.
    pub fn list(&self) -> Result<Vec<Value>> {
        Ok(self.entries()?.into_iter().map(|(_, v)| v).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DbOptions;

    #[tokio::test]
    async fn survives_reopen_is_bounded_and_per_relay() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Db::open(dir.path(), DbOptions::default()).unwrap();
            let subs = DeadLetterLog::new(db.clone(), "subscriptions", 3);
            let other = DeadLetterLog::new(db, "kafka", 3);
            for i in 0..5 {
                subs.append(&json!({"n": i})).await.unwrap();
            }
            other.append(&json!({"n": "k"})).await.unwrap();
        }
        let db = Db::open(dir.path(), DbOptions::default()).unwrap();
        let subs = DeadLetterLog::new(db.clone(), "subscriptions", 3);
        let ns: Vec<Value> = subs
            .list()
            .unwrap()
            .iter()
            .map(|r| r["n"].clone())
            .collect();
        assert_eq!(ns, vec![json!(2), json!(3), json!(4)]);
        subs.append(&json!({"n": 5})).await.unwrap();
        assert_eq!(subs.list().unwrap().last().unwrap()["n"], 5);
        assert_eq!(subs.list().unwrap().len(), 3);
        assert_eq!(
            DeadLetterLog::new(db, "kafka", 3).list().unwrap(),
            vec![json!({"n": "k"})]
        );
    }
}
