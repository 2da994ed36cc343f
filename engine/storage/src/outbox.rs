use crate::db::{Db, Table};
use crate::keys;
use crate::{Result, StorageError};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// One event waiting to be relayed to Kafka, AMQP or FHIR Subscriptions. Written in the same
/// atomic write as the resource change that raised it, so no change is ever without its event.
///
/// `event_id` is stable (derived from tenant, resource and version, or from the source message),
/// so consumers de-duplicate redeliveries by it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutboxEvent {
    /// Position in the outbox; assigned at commit.
    #[serde(default)]
    pub seq: u64,
    pub event_id: String,
    pub tenant: String,
    /// `fhir.Patient.create`, `fhir.Observation.update`, `hl7v2.adt.A01`, …
    pub event_type: String,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub version: Option<u64>,
    /// Pseudonymous Patient resource id, the partition key for ordering per patient.
    pub patient_id: Option<String>,
    pub source_message: Option<String>,
    pub mapping_version: Option<String>,
    pub occurred_at: i64,
    /// The resource as committed (absent for deletes and message-level events).
    pub resource: Option<serde_json::Value>,
}

impl OutboxEvent {
    /// The id-only notification sinks publish instead of the resource: what happened to which
    /// resource, enough to fetch it, nothing clinical.
    pub fn id_only_notification(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.event_id,
            "type": self.event_type,
            "tenant": self.tenant,
            "resourceType": self.resource_type,
            "resourceId": self.resource_id,
            "versionId": self.version.map(|v| v.to_string()),
            "patient": self.patient_id,
            "sourceMessage": self.source_message,
            "mappingVersion": self.mapping_version,
            "occurredAt": tributary_core::format_rfc3339_millis(self.occurred_at),
        })
    }
}

/// Read side of the outbox: relays read after their cursor and advance it once delivered.
#[derive(Clone)]
pub struct Outbox {
    db: Db,
    pub(crate) head: std::sync::Arc<watch::Sender<u64>>,
}

fn cursor_key(sink: &str) -> Vec<u8> {
    [b"outbox:", sink.as_bytes()].concat()
}

impl Outbox {
    pub fn new(db: Db) -> Self {
        let head_seq = db
            .tables()
            .get(Table::Outbox)
            .last_key_value()
            .and_then(|g| g.key().ok())
            .and_then(|k| keys::read_u64(&k))
            .unwrap_or(0);
        Self {
            db,
            head: std::sync::Arc::new(watch::channel(head_seq).0),
        }
    }

    pub fn read_after(&self, after: u64, limit: usize) -> Result<Vec<OutboxEvent>> {
        let start = keys::u64_be(after.saturating_add(1));
        let mut out = Vec::new();
        for item in self.db.range(Table::Outbox, start..) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.into_inner()?;
            let mut ev: OutboxEvent =
                serde_json::from_slice(&v).map_err(|e| StorageError::corrupt("outbox", e))?;
            ev.seq = keys::read_u64(&k).unwrap_or(0);
            out.push(ev);
        }
        Ok(out)
    }

    pub fn cursor(&self, sink: &str) -> Result<u64> {
        Ok(self
            .db
            .tables()
            .get(Table::Cursor)
            .get(cursor_key(sink))?
            .and_then(|v| keys::read_u64(&v))
            .unwrap_or(0))
    }

    /// Durably records that `sink` has delivered everything up to and including `seq`.
    pub async fn ack(&self, sink: &str, seq: u64) -> Result<()> {
        let key = cursor_key(sink);
        self.db
            .committer()
            .run(move |txn| {
                txn.put(Table::Cursor, key, keys::u64_be(seq).to_vec());
                Ok(())
            })
            .await
    }

    /// Records a sink's contiguous acknowledgement watermark durably, coalescing updates: while
    /// one write is in flight, newer values replace older ones. Runs until `rx`'s sender is gone.
    pub async fn record_acks(self, sink: String, mut rx: watch::Receiver<u64>) {
        let mut written = *rx.borrow_and_update();
        loop {
            let closed = rx.changed().await.is_err();
            let v = *rx.borrow_and_update();
            if v > written {
                match self.ack(&sink, v).await {
                    Ok(()) => written = v,
                    Err(e) => {
                        tracing::error!(cursor = %sink, error = %e, "could not record outbox cursor")
                    }
                }
            }
            if closed {
                return;
            }
        }
    }

    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// Deletes events every listed sink has delivered and that occurred before `before_ms`
    /// (a prefix of the outbox: it stops at the first newer event). An empty `sinks` list
    /// prunes nothing — with no consumer registered nobody has delivered anything. Sequence
    /// numbers never go back after a prune. Returns how many were removed.
    pub async fn prune_delivered(&self, sinks: &[&str], before_ms: i64) -> Result<u64> {
        let mut upto = u64::MAX;
        for s in sinks {
            upto = upto.min(self.cursor(s)?);
        }
        if sinks.is_empty() || upto == 0 {
            return Ok(0);
        }
        let mut removed = 0;
        loop {
            // Bounded batches: one commit never holds more than 10,000 deletes.
            let mut doomed = Vec::new();
            for item in self
                .db
                .range(Table::Outbox, ..=keys::u64_be(upto))
                .take(10_000)
            {
                let (k, v) = item.into_inner()?;
                let at = serde_json::from_slice::<serde_json::Value>(&v)
                    .ok()
                    .and_then(|e| e.get("occurred_at").and_then(serde_json::Value::as_i64))
                    .unwrap_or(i64::MAX);
                if at >= before_ms {
                    break;
                }
                doomed.push(k.to_vec());
            }
            if doomed.is_empty() {
                return Ok(removed);
            }
            let n = doomed.len() as u64;
            self.db
                .committer()
                .run(move |txn| {
                    for k in doomed {
                        txn.delete(Table::Outbox, k);
                    }
                    let floor = keys::u64_be(txn.counters.outbox_seq).to_vec();
                    txn.put(Table::Meta, b"outbox_seq_floor".to_vec(), floor);
                    Ok(())
                })
                .await?;
            removed += n;
            if n < 10_000 {
                return Ok(removed);
            }
        }
    }

    /// Deletes events every listed sink has delivered. Returns how many were removed.
    pub async fn prune(&self, sinks: &[&str]) -> Result<u64> {
        let mut upto = u64::MAX;
        for s in sinks {
            upto = upto.min(self.cursor(s)?);
        }
        if sinks.is_empty() || upto == 0 {
            return Ok(0);
        }
        let mut doomed = Vec::new();
        for item in self.db.range(Table::Outbox, ..=keys::u64_be(upto)) {
            doomed.push(item.key()?.to_vec());
        }
        let n = doomed.len() as u64;
        self.db
            .committer()
            .run(move |txn| {
                for k in doomed {
                    txn.delete(Table::Outbox, k);
                }
                let floor = keys::u64_be(txn.counters.outbox_seq).to_vec();
                txn.put(Table::Meta, b"outbox_seq_floor".to_vec(), floor);
                Ok(())
            })
            .await?;
        Ok(n)
    }
}
