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
///
/// `R` is how the resource is held: a parsed `serde_json::Value` (the default), or its stored
/// JSON as is ([`RawOutboxEvent`]) for sinks that only pass it on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutboxEvent<R = serde_json::Value> {
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
    /// The other patients whose compartment the resource is in (an Appointment with two
    /// patients among its participants): their patient-context subscribers hear of it too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_patients: Vec<String>,
    pub source_message: Option<String>,
    pub mapping_version: Option<String>,
    pub occurred_at: i64,
    /// The resource as committed (absent for deletes and message-level events).
    pub resource: Option<R>,
}

/// An [`OutboxEvent`] whose resource stays the JSON text it was stored as: a sink that publishes
/// it unchanged neither parses nor re-serializes it.
pub type RawOutboxEvent = OutboxEvent<Box<serde_json::value::RawValue>>;

impl<R> OutboxEvent<R> {
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

/// A numbering consumer's progress (a Subscription numbers the events it matches from 1, in
/// outbox order): every matching event at or before outbox position `through` has a number, and
/// `count` numbers have been given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Numbering {
    pub count: u64,
    pub through: u64,
}

fn numbering_key(name: &str) -> Vec<u8> {
    keys::join(&[b"c", name.as_bytes()])
}

fn numbers_prefix(name: &str) -> Vec<u8> {
    keys::prefix(&[b"n", name.as_bytes()])
}

fn number_key(name: &str, number: u64) -> Vec<u8> {
    [numbers_prefix(name), keys::u64_be(number).to_vec()].concat()
}

fn read_numbering(v: &[u8]) -> Option<Numbering> {
    Some(Numbering {
        count: keys::read_u64(v)?,
        through: keys::read_u64(v.get(8..)?)?,
    })
}

/// A sink's contiguous acknowledgement watermark, recorded durably without holding up delivery:
/// [`AckRecorder::record`] only hands the value over, and a background task writes the newest one
/// whenever the previous write has finished. A crash loses at most the unwritten tail, which the
/// sink then re-sends (at-least-once, same event ids).
pub struct AckRecorder {
    start: u64,
    tx: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl AckRecorder {
    /// The cursor the sink resumes from: every event at or before it was delivered.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Everything up to and including `seq` is delivered.
    pub fn record(&self, seq: u64) {
        let _ = self.tx.send(seq);
    }

    /// Records `seq` and waits until the last value is written.
    pub async fn finish(self, seq: u64) {
        self.record(seq);
        drop(self.tx);
        let _ = self.task.await;
    }
}

impl Outbox {
    pub fn new(db: Db) -> Self {
        let head_seq = db.last_seq(Table::Outbox);
        Self {
            db,
            head: std::sync::Arc::new(watch::channel(head_seq).0),
        }
    }

    pub fn read_after(&self, after: u64, limit: usize) -> Result<Vec<OutboxEvent>> {
        self.read_after_as(after, limit)
    }

    /// [`Outbox::read_after`] with each resource left as its stored JSON.
    pub fn read_after_raw(&self, after: u64, limit: usize) -> Result<Vec<RawOutboxEvent>> {
        self.read_after_as(after, limit)
    }

    fn read_after_as<R: serde::de::DeserializeOwned>(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<OutboxEvent<R>>> {
        let start = keys::u64_be(after.saturating_add(1));
        let mut out = Vec::new();
        for item in self.db.range(Table::Outbox, start..) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.into_inner()?;
            let mut ev: OutboxEvent<R> =
                serde_json::from_slice(&v).map_err(|e| StorageError::corrupt("outbox", e))?;
            ev.seq = keys::read_u64(&k).unwrap_or(0);
            out.push(ev);
        }
        Ok(out)
    }

    pub fn cursor(&self, sink: &str) -> Result<u64> {
        self.db.cursor(&cursor_key(sink))
    }

    /// Durably records that `sink` has delivered everything up to and including `seq`.
    pub async fn ack(&self, sink: &str, seq: u64) -> Result<()> {
        self.db.set_cursor(cursor_key(sink), seq).await
    }

    /// Starts recording `sink`'s acknowledgement watermark in the background (see
    /// [`AckRecorder`]); the recorder starts at the cursor stored now.
    pub fn ack_recorder(&self, sink: &str) -> Result<AckRecorder> {
        let start = self.cursor(sink)?;
        let (tx, rx) = watch::channel(start);
        let task = tokio::spawn(self.clone().record_acks(sink.to_string(), rx));
        Ok(AckRecorder { start, tx, task })
    }

    /// Writes each new watermark from `rx`, coalescing: while one write is in flight, newer values
    /// replace older ones. Runs until `rx`'s sender is gone.
    async fn record_acks(self, sink: String, mut rx: watch::Receiver<u64>) {
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

    /// The event at outbox position `seq`, if it is still there (not pruned).
    pub fn event(&self, seq: u64) -> Result<Option<OutboxEvent>> {
        let Some(v) = self.db.tables().get(Table::Outbox).get(keys::u64_be(seq))? else {
            return Ok(None);
        };
        let mut ev: OutboxEvent =
            serde_json::from_slice(&v).map_err(|e| StorageError::corrupt("outbox", e))?;
        ev.seq = seq;
        Ok(Some(ev))
    }

    /// The numbering consumer `name`'s progress; `None` before its first
    /// [`Outbox::advance_numbered`].
    pub fn numbering(&self, name: &str) -> Result<Option<Numbering>> {
        Ok(self
            .db
            .tables()
            .get(Table::EventNumber)
            .get(numbering_key(name))?
            .and_then(|v| read_numbering(&v)))
    }

    /// Numbers the matching events `matched` (outbox seqs, ascending, none after `through`)
    /// and records that every match up to `through` is numbered; advances the cursor `name`
    /// (see [`Outbox::cursor`]) to `through` in the same atomic write. Runs as one committer
    /// job, so numbers are never given twice nor skipped: seqs at or before the position
    /// already recorded keep the number they have (a repeated call is a no-op), the others
    /// get `count + 1`, `count + 2`, …. Returns the progress after the write.
    pub async fn advance_numbered(
        &self,
        name: &str,
        through: u64,
        matched: Vec<u64>,
    ) -> Result<Numbering> {
        let name = name.to_string();
        self.db
            .committer()
            .run(move |txn| {
                let ckey = numbering_key(&name);
                let mut n = txn
                    .get(Table::EventNumber, &ckey)?
                    .and_then(|v| read_numbering(&v))
                    .unwrap_or_default();
                for seq in matched {
                    if seq <= n.through || seq > through {
                        continue;
                    }
                    n.count += 1;
                    n.through = seq;
                    txn.put(
                        Table::EventNumber,
                        number_key(&name, n.count),
                        keys::u64_be(seq).to_vec(),
                    );
                }
                n.through = n.through.max(through);
                let v = [keys::u64_be(n.count), keys::u64_be(n.through)].concat();
                txn.put(Table::EventNumber, ckey, v);
                let cur = cursor_key(&name);
                let old = txn
                    .get(Table::Cursor, &cur)?
                    .and_then(|v| keys::read_u64(&v))
                    .unwrap_or(0);
                txn.put(
                    Table::Cursor,
                    cur,
                    keys::u64_be(old.max(n.through)).to_vec(),
                );
                Ok(n)
            })
            .await
    }

    /// (number, outbox seq) of the numbering consumer `name`'s events numbered `since` to
    /// `until` (inclusive) still indexed, at most `limit`, in number order. Numbers whose
    /// entries were pruned with their events are absent.
    pub fn numbered_seqs(
        &self,
        name: &str,
        since: u64,
        until: u64,
        limit: usize,
    ) -> Result<Vec<(u64, u64)>> {
        let from = number_key(name, since);
        let to = number_key(name, until);
        let mut out = Vec::new();
        for item in self.db.range(Table::EventNumber, from..=to).take(limit) {
            let (k, v) = item.into_inner()?;
            let number = k.len().checked_sub(8).and_then(|i| keys::read_u64(&k[i..]));
            if let (Some(number), Some(seq)) = (number, keys::read_u64(&v)) {
                out.push((number, seq));
            }
        }
        Ok(out)
    }

    /// Index entries (see [`Outbox::numbered_seqs`]) pointing at events at or before `upto`.
    fn numbered_at_or_before(&self, upto: u64) -> Result<Vec<Vec<u8>>> {
        let mut names = Vec::new();
        for item in self.db.prefix(Table::EventNumber, keys::prefix(&[b"c"])) {
            let k = item.key()?;
            names.push(k[2..].to_vec());
        }
        let mut doomed = Vec::new();
        for name in names {
            for item in self
                .db
                .prefix(Table::EventNumber, keys::prefix(&[b"n", &name]))
            {
                let (k, v) = item.into_inner()?;
                if keys::read_u64(&v).is_none_or(|seq| seq > upto) {
                    break;
                }
                doomed.push(k.to_vec());
            }
        }
        Ok(doomed)
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
        if sinks.is_empty() {
            return Ok(0);
        }
        self.prune_through(upto, before_ms).await
    }

    /// Deletes events at or before outbox position `upto` that occurred before `before_ms` (a
    /// prefix of the outbox: it stops at the first newer event), with the event-number index
    /// entries (see [`Outbox::numbered_seqs`]) that point at them. The caller computes `upto`
    /// from every consumer's cursor. Returns how many events were removed.
    pub async fn prune_through(&self, upto: u64, before_ms: i64) -> Result<u64> {
        if upto == 0 {
            return Ok(0);
        }
        let mut removed = 0;
        loop {
            // Bounded batches: one commit never holds more than 10,000 event deletes.
            let mut doomed = Vec::new();
            let mut last = 0;
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
                last = keys::read_u64(&k).unwrap_or(last);
                doomed.push(k.to_vec());
            }
            if doomed.is_empty() {
                return Ok(removed);
            }
            let numbered = self.numbered_at_or_before(last)?;
            let n = doomed.len() as u64;
            self.db
                .committer()
                .run(move |txn| {
                    for k in doomed {
                        txn.delete(Table::Outbox, k);
                    }
                    for k in numbered {
                        txn.delete(Table::EventNumber, k);
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
}

#[cfg(test)]
mod tests {
    use crate::{Db, DbOptions, FjallStore, ResourceWrite, Store, StoreTransaction};
    use serde_json::json;

    async fn commit_patients(s: &FjallStore, n: usize) -> Vec<u64> {
        let mut seqs = Vec::new();
        for i in 0..n {
            let out = s
                .commit(StoreTransaction {
                    tenant: "t1".into(),
                    writes: vec![ResourceWrite::upsert(
                        "Patient",
                        &format!("p{i}"),
                        json!({"resourceType": "Patient"}),
                    )],
                    ..Default::default()
                })
                .await
                .unwrap();
            seqs.extend(out.event_seqs);
        }
        seqs
    }

    #[tokio::test]
    async fn event_numbers_survive_a_restart_and_repeats_are_no_ops() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = FjallStore::new(Db::open(dir.path(), DbOptions::default()).unwrap());
            let seqs = commit_patients(&s, 5).await;
            let ob = s.outbox();
            assert_eq!(ob.numbering("sub:t1/a").unwrap(), None);
            let n = ob
                .advance_numbered("sub:t1/a", seqs[2], vec![seqs[0], seqs[2]])
                .await
                .unwrap();
            assert_eq!(n.count, 2);
            assert_eq!(n.through, seqs[2]);
            assert_eq!(
                ob.cursor("sub:t1/a").unwrap(),
                seqs[2],
                "cursor moved along"
            );
            // The same batch again (a retried write): nothing numbered twice.
            let again = ob
                .advance_numbered("sub:t1/a", seqs[2], vec![seqs[0], seqs[2]])
                .await
                .unwrap();
            assert_eq!(again, n);
            // A scan past non-matching events only moves the position.
            let skip = ob
                .advance_numbered("sub:t1/a", seqs[3], vec![])
                .await
                .unwrap();
            assert_eq!((skip.count, skip.through), (2, seqs[3]));
        }
        let s = FjallStore::new(Db::open(dir.path(), DbOptions::default()).unwrap());
        let ob = s.outbox();
        let n = ob.numbering("sub:t1/a").unwrap().unwrap();
        assert_eq!(n.count, 2);
        let seqs: Vec<u64> = ob
            .read_after(0, 10)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(n.through, seqs[3]);
        assert_eq!(
            ob.numbered_seqs("sub:t1/a", 1, u64::MAX, 10).unwrap(),
            vec![(1, seqs[0]), (2, seqs[2])]
        );
        let n = ob
            .advance_numbered("sub:t1/a", seqs[4], vec![seqs[4]])
            .await
            .unwrap();
        assert_eq!(n.count, 3, "numbering goes on after the restart");
        assert_eq!(
            ob.numbered_seqs("sub:t1/a", 3, 3, 10).unwrap(),
            vec![(3, seqs[4])]
        );
        // Another consumer's numbering is its own.
        assert_eq!(ob.numbering("sub:t1/b").unwrap(), None);
        assert!(ob.numbered_seqs("sub:t1/b", 1, 10, 10).unwrap().is_empty());
    }

    /// Numbering writes racing each other and resource commits through the group committer:
    /// every event gets exactly one number, numbers are 1..=n in outbox order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_numbering_has_no_gaps_or_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let s = FjallStore::new(Db::open(dir.path(), DbOptions::default()).unwrap());
        let writer = {
            let s = s.clone();
            tokio::spawn(async move { commit_patients(&s, 60).await })
        };
        let mut tasks = Vec::new();
        // Four numbering writers walk the outbox; each numbers everything it has read, so
        // they race with overlapping batches.
        for _ in 0..4 {
            let ob = s.outbox().clone();
            tasks.push(tokio::spawn(async move {
                let mut after = 0;
                for _ in 0..400 {
                    let batch = ob.read_after(after, 7).unwrap();
                    if let Some(last) = batch.last() {
                        let seqs: Vec<u64> = batch.iter().map(|e| e.seq).collect();
                        ob.advance_numbered("sub:t1/c", last.seq, seqs)
                            .await
                            .unwrap();
                        after = last.seq;
                    } else {
                        tokio::task::yield_now().await;
                    }
                    if after >= 60 {
                        break;
                    }
                }
            }));
        }
        let all = writer.await.unwrap();
        for t in tasks {
            t.await.unwrap();
        }
        let ob = s.outbox();
        let last = *all.last().unwrap();
        ob.advance_numbered("sub:t1/c", last, all.clone())
            .await
            .unwrap();
        let n = ob.numbering("sub:t1/c").unwrap().unwrap();
        assert_eq!(n.count, all.len() as u64);
        let indexed = ob.numbered_seqs("sub:t1/c", 1, u64::MAX, 1000).unwrap();
        let want: Vec<(u64, u64)> = all
            .iter()
            .enumerate()
            .map(|(i, seq)| (i as u64 + 1, *seq))
            .collect();
        assert_eq!(indexed, want);
    }

    #[tokio::test]
    async fn pruning_events_prunes_their_index_entries_and_keeps_the_count() {
        let dir = tempfile::tempdir().unwrap();
        let s = FjallStore::new(Db::open(dir.path(), DbOptions::default()).unwrap());
        let seqs = commit_patients(&s, 4).await;
        let ob = s.outbox();
        ob.advance_numbered("sub:t1/a", seqs[3], seqs.clone())
            .await
            .unwrap();
        ob.advance_numbered("sub:t1/b", seqs[1], vec![seqs[1]])
            .await
            .unwrap();
        let later = tributary_core::now_millis() + 60_000;
        assert_eq!(ob.prune_through(seqs[1], later).await.unwrap(), 2);
        assert!(ob.event(seqs[1]).unwrap().is_none());
        assert_eq!(ob.event(seqs[2]).unwrap().unwrap().seq, seqs[2]);
        assert_eq!(
            ob.numbered_seqs("sub:t1/a", 1, u64::MAX, 10).unwrap(),
            vec![(3, seqs[2]), (4, seqs[3])]
        );
        assert!(ob.numbered_seqs("sub:t1/b", 1, 10, 10).unwrap().is_empty());
        assert_eq!(ob.numbering("sub:t1/a").unwrap().unwrap().count, 4);
        assert_eq!(ob.numbering("sub:t1/b").unwrap().unwrap().count, 1);
        // Nothing at or before position 0: nothing pruned.
        assert_eq!(ob.prune_through(0, later).await.unwrap(), 0);
    }
}
