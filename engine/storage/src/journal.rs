use crate::committer::Txn;
use crate::db::{Db, Table};
use crate::keys;
use crate::{Result, StorageError};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Bound;
use tokio::sync::watch;
use tributary_core::{Envelope, MessageId, MessageState, StateKind};

/// Where a message is and how it got there. Stored apart from the envelope so a state change
/// never rewrites the payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    pub state: MessageState,
    /// The journal sequence number of the latest time this message was queued for processing.
    pub seq: Option<u64>,
    pub updated_at: i64,
    /// How many times the message was queued (1 + replays).
    pub attempts: u32,
    /// Content hash of the mapping set that last processed this message.
    pub mapping_version: Option<String>,
    /// The last transitions, oldest first: (epoch millis, state).
    pub history: Vec<(i64, StateKind)>,
}

const HISTORY_CAP: usize = 16;
/// Messages queued again per durable write by `replay`.
const REPLAY_CHUNK: usize = 512;

impl StateRecord {
    pub(crate) fn push(&mut self, state: MessageState, at: i64) {
        if self.history.len() == HISTORY_CAP {
            self.history.remove(0);
        }
        self.history.push((at, state.kind()));
        self.state = state;
        self.updated_at = at;
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalRecord {
    pub envelope: Envelope,
    pub state: StateRecord,
}

/// What `append` promises: when it returns, the message is on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendReceipt {
    pub id: MessageId,
    /// Where consumers will find it; `None` for rejected messages, which are not processed.
    pub seq: Option<u64>,
    /// True when the dedup key matched an earlier message: nothing was stored, `id` is the
    /// original's, and the sender should be acknowledged again.
    pub duplicate: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalEntry {
    pub seq: u64,
    pub id: MessageId,
}

/// Which messages `list` returns. Every field narrows; the default is every message.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    /// Any of these states; empty: any state.
    pub states: Vec<StateKind>,
    /// Inclusive lower bound on `received_at` (epoch millis).
    pub since: Option<i64>,
    /// Exclusive upper bound on `received_at`.
    pub until: Option<i64>,
    pub tenant: Option<String>,
    pub partner: Option<String>,
    /// HL7 v2 message type as ingress recorded it: `ADT` (any trigger) or `ADT^A08`.
    pub message_type: Option<String>,
    pub mapping_version: Option<VersionMatch>,
    /// Most messages returned (after every other test).
    pub limit: Option<usize>,
}

/// A test on the mapping version that last processed a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VersionMatch {
    /// Processed by a version whose hash starts with this (as `journal show` prints it).
    StartsWith(String),
    /// Processed, by any other version than this one: what a new mapping set would map
    /// differently.
    Not(String),
}

impl ListFilter {
    /// The state, version, tenant, partner and type tests (not the time bounds or the limit).
    pub fn admits(&self, record: &JournalRecord) -> bool {
        self.admits_state(&record.state) && self.admits_envelope(&record.envelope)
    }

    fn needs_envelope(&self) -> bool {
        self.tenant.is_some() || self.partner.is_some() || self.message_type.is_some()
    }

    fn admits_state(&self, st: &StateRecord) -> bool {
        let state_ok = self.states.is_empty() || self.states.contains(&st.state.kind());
        let version_ok = match (&self.mapping_version, &st.mapping_version) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(VersionMatch::StartsWith(p)), Some(v)) => v.starts_with(p.as_str()),
            (Some(VersionMatch::Not(c)), Some(v)) => v != c,
        };
        state_ok && version_ok
    }

    fn admits_envelope(&self, env: &Envelope) -> bool {
        let is = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        is(&self.tenant, env.tenant.as_str())
            && is(&self.partner, env.partner.as_str())
            && self
                .message_type
                .as_deref()
                .is_none_or(|t| message_type_matches(t, env))
    }
}

/// `ADT` matches any ADT message, `ADT^A08` (or `ADT_A08`) one trigger event; case-insensitive.
fn message_type_matches(pattern: &str, env: &Envelope) -> bool {
    let field = |k: &str| env.meta.get(k).map(String::as_str).unwrap_or("");
    let mut parts = pattern.splitn(2, ['^', '_']);
    let code = parts.next().unwrap_or("");
    code.eq_ignore_ascii_case(field("message_type"))
        && parts
            .next()
            .is_none_or(|t| t.eq_ignore_ascii_case(field("trigger_event")))
}

/// Retention keeps the journal from only growing. It prunes finished messages: mapped and
/// committed (or delivered), and passed by every other consumer of the journal. Failed and
/// rejected messages are never pruned: they wait for a human to fix and replay them; received
/// ones wait for the pipeline.
#[derive(Clone, Debug, Default)]
pub struct RetentionPolicy {
    /// Finished messages received longer ago than this are pruned.
    pub delivered_max_age_ms: i64,
    /// When the payloads of kept messages exceed this, the oldest finished ones go first.
    pub max_payload_bytes: Option<u64>,
    /// Journal cursors (as in [`Journal::cursor`]) that must have passed a message before it is
    /// pruned: outbound routes that forward journaled messages.
    pub consumers: Vec<String>,
}

/// Whether a message's processing is over: what retention may prune.
fn finished(state: &StateRecord, passed_by_all: u64) -> bool {
    matches!(
        state.state.kind(),
        StateKind::Committed | StateKind::Delivered
    ) && state.seq.is_none_or(|seq| seq <= passed_by_all)
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneStats {
    pub pruned: u64,
    pub bytes_freed: u64,
    /// Failed or rejected messages old enough to be due that retention kept for a human (only
    /// the part of the journal it read: up to the cut-off, further while over the budget).
    pub kept_for_attention: u64,
    /// Finished messages kept because a failed message of the same ordering key (sender and
    /// patient) precedes them: replaying the failed one re-queues them behind it, so its older
    /// data cannot end up over theirs. Only a payload budget overrides this.
    pub held_for_replay: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JournalStats {
    pub head_seq: u64,
    pub approx_messages: u64,
}

/// The durable message journal: store before acknowledge, consume in order, replay, prune.
#[async_trait]
pub trait Journal: Send + Sync + 'static {
    /// Stores a message for processing. Resolves only once it is on disk (group commit).
    async fn append(&self, envelope: Envelope) -> Result<AppendReceipt>;
    /// Stores a message that was refused at the door, with the reason, for inspection and replay.
    async fn append_rejected(&self, envelope: Envelope, reason: String) -> Result<AppendReceipt>;
    /// Moves a message along the state machine; illegal transitions are refused.
    async fn transition(
        &self,
        id: MessageId,
        to: MessageState,
        mapping_version: Option<String>,
    ) -> Result<StateRecord>;
    fn get(&self, id: MessageId) -> Result<Option<JournalRecord>>;
    /// Queue entries after `after_seq`, in order; the same message may appear again after a replay.
    fn entries_after(&self, after_seq: u64, limit: usize) -> Result<Vec<JournalEntry>>;
    fn cursor(&self, consumer: &str) -> Result<u64>;
    async fn set_cursor(&self, consumer: &str, seq: u64) -> Result<()>;
    fn list(&self, filter: &ListFilter) -> Result<Vec<(MessageId, i64, StateRecord)>>;
    /// Queues messages again (state back to `received`); returns their new sequence numbers.
    async fn replay(&self, ids: &[MessageId]) -> Result<Vec<u64>>;
    async fn prune(&self, policy: &RetentionPolicy, now_ms: i64) -> Result<PruneStats>;
    fn stats(&self) -> JournalStats;
    /// Watches the head sequence number so consumers wake when something is appended.
    fn subscribe(&self) -> watch::Receiver<u64>;
    /// The state of a message without reading its payload.
    fn state(&self, id: MessageId) -> Result<Option<StateRecord>>;
    /// Sets a named note on a message (e.g. `app_ack`, `route.<name>`): short, PHI-free delivery
    /// facts kept beside the state, shown by `tributary journal show`, pruned with the message.
    /// Replaces an earlier note of the same name.
    async fn set_note(&self, id: MessageId, name: &str, text: String) -> Result<()>;
    /// Every note on a message, by name.
    fn notes(&self, id: MessageId) -> Result<BTreeMap<String, String>>;
}

/// What a replay queues, in journal order.
#[derive(Debug)]
pub struct ReplaySet {
    pub messages: Vec<(MessageId, i64, StateRecord)>,
    /// How many of them are followers: later messages of the same ordering keys.
    pub followers: usize,
}

/// States of a later message that a replay re-queues with the earlier ones it follows: every
/// one that was or will be mapped (`rejected` ones never are).
const FOLLOWER_STATES: [StateKind; 5] = [
    StateKind::Received,
    StateKind::Mapped,
    StateKind::Committed,
    StateKind::Delivered,
    StateKind::Failed,
];

/// Most messages [`with_followers`] looks through; a selection reaching further back must be
/// narrowed.
const FOLLOWER_SCAN_MAX: usize = 1_000_000;

/// The messages to replay: `selected`, and every later message (of `tenant`, if given) with
/// the same ordering key (sender and patient) that was or will be mapped, all in journal order.
///
/// A replayed message is mapped again after everything already processed, so replaying an old
/// admission alone would put its older demographics over a later update. With its followers
/// re-queued behind it, the latest message's data is what stays, as when they first arrived.
pub fn with_followers(
    journal: &dyn Journal,
    mut selected: Vec<(MessageId, i64, StateRecord)>,
    tenant: Option<&str>,
) -> Result<ReplaySet> {
    // the earliest selected message of each ordering key
    let mut first: std::collections::HashMap<String, (i64, MessageId)> =
        std::collections::HashMap::new();
    for (id, at, _) in &selected {
        if let Some(rec) = journal.get(*id)? {
            let e = first.entry(rec.envelope.ordering_key).or_insert((*at, *id));
            *e = (*e).min((*at, *id));
        }
    }
    let Some(since) = first.values().map(|(at, _)| *at).min() else {
        return Ok(ReplaySet {
            messages: selected,
            followers: 0,
        });
    };
    let later = ListFilter {
        states: FOLLOWER_STATES.to_vec(),
        since: Some(since),
        tenant: tenant.map(str::to_string),
        limit: Some(FOLLOWER_SCAN_MAX + 1),
        ..Default::default()
    };
    let candidates = journal.list(&later)?;
    if candidates.len() > FOLLOWER_SCAN_MAX {
        return Err(StorageError::TooMany(format!(
            "more than {FOLLOWER_SCAN_MAX} messages arrived after the earliest one to replay: narrow the selection"
        )));
    }
    let chosen: std::collections::HashSet<MessageId> =
        selected.iter().map(|(id, _, _)| *id).collect();
    let mut followers = 0;
    for (id, at, st) in candidates {
        if chosen.contains(&id) {
            continue;
        }
        let Some(rec) = journal.get(id)? else {
            continue;
        };
        if first
            .get(&rec.envelope.ordering_key)
            .is_some_and(|earliest| (at, id) > *earliest)
        {
            selected.push((id, at, st));
            followers += 1;
        }
    }
    selected.sort_by_key(|(id, at, _)| (*at, *id));
    Ok(ReplaySet {
        messages: selected,
        followers,
    })
}

/// Notes live in the meta table under `note:` + message id, one postcard map per message.
fn note_key(id: &MessageId) -> Vec<u8> {
    [&b"note:"[..], id.as_bytes()].concat()
}

/// Time-index keys retention reads, and messages it deletes, per step (one durable write each).
/// (Small in unit tests, so that they cross chunk boundaries.)
const PRUNE_CHUNK: usize = if cfg!(test) { 4 } else { 512 };

/// The embedded journal on the shared fjall database.
#[derive(Clone)]
pub struct FjallJournal {
    db: Db,
    dedup_window_ms: i64,
    head: std::sync::Arc<watch::Sender<u64>>,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("in-memory serialization cannot fail")
}

fn decode<'a, T: Deserialize<'a>>(table: &'static str, bytes: &'a [u8]) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| StorageError::corrupt(table, e))
}

fn time_key(received_at: i64, id: &MessageId) -> Vec<u8> {
    let mut k = keys::i64_be(received_at).to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

fn load_state(txn: &Txn<'_>, id: MessageId) -> Result<StateRecord> {
    let bytes = txn
        .get(Table::State, id.as_bytes())?
        .ok_or(StorageError::UnknownMessage(id))?;
    decode("journal_state", &bytes)
}

fn enqueue(txn: &mut Txn<'_>, id: MessageId) -> u64 {
    txn.counters.journal_seq += 1;
    let seq = txn.counters.journal_seq;
    txn.put(
        Table::Seq,
        keys::u64_be(seq).to_vec(),
        id.as_bytes().to_vec(),
    );
    seq
}

/// Puts a processed message back on the queue: a new sequence number, one more attempt.
fn queue_again(txn: &mut Txn<'_>, id: MessageId, record: &mut StateRecord) -> u64 {
    let seq = enqueue(txn, id);
    record.seq = Some(seq);
    record.attempts += 1;
    seq
}

impl FjallJournal {
    pub fn new(db: Db, dedup_window_ms: i64) -> Self {
        let head_seq = db.last_seq(Table::Seq);
        let (head, _) = watch::channel(head_seq);
        Self {
            db,
            dedup_window_ms,
            head: std::sync::Arc::new(head),
        }
    }

    fn notify(&self, seq: Option<u64>) {
        if let Some(seq) = seq {
            self.head.send_if_modified(|h| {
                if seq > *h {
                    *h = seq;
                    true
                } else {
                    false
                }
            });
        }
    }

    async fn store(&self, envelope: Envelope, rejected: Option<String>) -> Result<AppendReceipt> {
        let window = self.dedup_window_ms;
        // Encode here, on the caller's task: the committer thread is serial and must only write.
        let id = envelope.id;
        let received_at = envelope.received_at;
        let payload_len = envelope.payload.len() as u64;
        let dedup_key = envelope.dedup_key.clone();
        let env_bytes = encode(&envelope);
        let receipt = self
            .db
            .committer()
            .run(move |txn| {
                if let Some(key) = &dedup_key {
                    if let Some(prev) = txn.get(Table::Dedup, key.as_bytes())? {
                        let prev_id = MessageId::from_bytes(
                            prev.get(..16)
                                .and_then(|b| b.try_into().ok())
                                .ok_or_else(|| StorageError::corrupt("dedup", "short"))?,
                        );
                        let prev_at = keys::read_i64(&prev[16..]).unwrap_or(i64::MIN);
                        if received_at.saturating_sub(prev_at) <= window {
                            return Ok(AppendReceipt {
                                id: prev_id,
                                seq: None,
                                duplicate: true,
                            });
                        }
                    }
                    let mut v = id.as_bytes().to_vec();
                    v.extend_from_slice(&keys::i64_be(received_at));
                    txn.put(Table::Dedup, key.as_bytes().to_vec(), v);
                }
                let (state, seq) = match rejected {
                    Some(reason) => (MessageState::Rejected { reason }, None),
                    None => (MessageState::Received, Some(enqueue(txn, id))),
                };
                let record = StateRecord {
                    history: vec![(received_at, state.kind())],
                    state,
                    seq,
                    updated_at: received_at,
                    attempts: u32::from(seq.is_some()),
                    mapping_version: None,
                };
                txn.put(
                    Table::Time,
                    time_key(received_at, &id),
                    payload_len.to_be_bytes().to_vec(),
                );
                txn.put(Table::State, id.as_bytes().to_vec(), encode(&record));
                txn.put(Table::Msg, id.as_bytes().to_vec(), env_bytes);
                Ok(AppendReceipt {
                    id,
                    seq,
                    duplicate: false,
                })
            })
            .await?;
        self.notify(receipt.seq);
        Ok(receipt)
    }

    fn read_state(&self, id: MessageId) -> Result<Option<StateRecord>> {
        match self.db.tables().get(Table::State).get(id.as_bytes())? {
            Some(b) => Ok(Some(decode("journal_state", &b)?)),
            None => Ok(None),
        }
    }

    /// The payload bytes of every message the journal holds (one pass over the time index's
    /// values; no message is read or kept).
    fn total_payload(&self) -> Result<u64> {
        let mut total = 0u64;
        for item in self.db.range::<&[u8], _>(Table::Time, ..) {
            let (_, v) = item.into_inner()?;
            total = total.saturating_add(keys::read_u64(&v).unwrap_or(0));
        }
        Ok(total)
    }

    /// Retention, on a blocking thread: walks the time index oldest first, a chunk of
    /// `PRUNE_CHUNK` keys at a time, and deletes the finished messages that are due as it
    /// goes. It stops at the cut-off unless a payload budget is still exceeded, so only what
    /// is due is read, and no more than one chunk of candidates is held at once.
    fn prune_blocking(&self, policy: &RetentionPolicy, now_ms: i64) -> Result<PruneStats> {
        let mut stats = PruneStats::default();
        let passed_by_all = policy
            .consumers
            .iter()
            .map(|c| self.cursor(c))
            .try_fold(u64::MAX, |min, c| c.map(|c| min.min(c)))?;
        let cutoff = now_ms.saturating_sub(policy.delivered_max_age_ms);
        let mut total = match policy.max_payload_bytes {
            Some(_) => self.total_payload()?,
            None => 0,
        };
        let over_budget = |total: u64| policy.max_payload_bytes.is_some_and(|max| total > max);
        let mut after: Option<Vec<u8>> = None;
        let mut chosen: Vec<(MessageId, u64)> = Vec::with_capacity(PRUNE_CHUNK);
        // Ordering keys of the failed messages read so far (time order: before their followers).
        let mut held: std::collections::HashSet<String> = std::collections::HashSet::new();
        let key_of = |id: MessageId| -> Result<Option<String>> {
            Ok(self.get(id)?.map(|r| r.envelope.ordering_key))
        };
        'scan: loop {
            let from = after
                .as_ref()
                .map_or(Bound::Unbounded, |k| Bound::Excluded(k.clone()));
            let mut keys_read: Vec<(Vec<u8>, u64)> = Vec::with_capacity(PRUNE_CHUNK);
            for item in self.db.range(Table::Time, (from, Bound::Unbounded)) {
                let (k, v) = item.into_inner()?;
                keys_read.push((k.to_vec(), keys::read_u64(&v).unwrap_or(0)));
                if keys_read.len() == PRUNE_CHUNK {
                    break;
                }
            }
            if keys_read.is_empty() {
                break;
            }
            for (k, len) in keys_read {
                let at = keys::read_i64(&k).unwrap_or(0);
                // Time-ordered: nothing after this is due by age, and the budget is met.
                if at >= cutoff && !over_budget(total) {
                    break 'scan;
                }
                let id = MessageId::from_bytes(
                    k.get(8..24)
                        .and_then(|b| b.try_into().ok())
                        .ok_or_else(|| StorageError::corrupt("journal_time", "short key"))?,
                );
                match self.read_state(id)? {
                    Some(s) if finished(&s, passed_by_all) => {
                        let hold = !held.is_empty()
                            && !over_budget(total)
                            && key_of(id)?.is_some_and(|k| held.contains(&k));
                        if hold {
                            stats.held_for_replay += 1;
                        } else {
                            total = total.saturating_sub(len);
                            chosen.push((id, len));
                        }
                    }
                    Some(s) if s.state.kind().needs_attention() => {
                        stats.kept_for_attention += 1;
                        if s.state.kind() == StateKind::Failed {
                            if let Some(k) = key_of(id)? {
                                held.insert(k);
                            }
                        }
                    }
                    _ => {}
                }
                after = Some(k);
            }
            if chosen.len() >= PRUNE_CHUNK {
                self.delete_finished(std::mem::take(&mut chosen), &mut stats)?;
            }
        }
        if !chosen.is_empty() {
            self.delete_finished(chosen, &mut stats)?;
        }
        Ok(stats)
    }

    /// Deletes messages retention chose, in one durable write, unless one was queued again
    /// since it was chosen; raises the sequence floor so numbers never go backwards.
    fn delete_finished(&self, chosen: Vec<(MessageId, u64)>, stats: &mut PruneStats) -> Result<()> {
        let (n, bytes) = self.db.committer().run_blocking(move |txn| {
            let (mut n, mut bytes) = (0u64, 0u64);
            for (id, len) in chosen {
                let Ok(state) = load_state(txn, id) else {
                    continue;
                };
                // replayed since it was chosen: no longer finished
                if !finished(&state, u64::MAX) {
                    continue;
                }
                let Some(env) = txn.get(Table::Msg, id.as_bytes())? else {
                    continue;
                };
                let env: Envelope = decode("journal_msg", &env)?;
                if let Some(key) = &env.dedup_key {
                    if let Some(d) = txn.get(Table::Dedup, key.as_bytes())? {
                        if d.starts_with(id.as_bytes()) {
                            txn.delete(Table::Dedup, key.as_bytes().to_vec());
                        }
                    }
                }
                if let Some(seq) = state.seq {
                    txn.delete(Table::Seq, keys::u64_be(seq).to_vec());
                }
                txn.delete(Table::Time, time_key(env.received_at, &id));
                txn.delete(Table::State, id.as_bytes().to_vec());
                txn.delete(Table::Msg, id.as_bytes().to_vec());
                txn.delete(Table::Meta, note_key(&id));
                n += 1;
                bytes += len;
            }
            let floor = keys::u64_be(txn.counters.journal_seq).to_vec();
            txn.put(Table::Meta, b"journal_seq_floor".to_vec(), floor);
            Ok((n, bytes))
        })?;
        stats.pruned += n;
        stats.bytes_freed += bytes;
        Ok(())
    }
}

#[async_trait]
impl Journal for FjallJournal {
    async fn append(&self, envelope: Envelope) -> Result<AppendReceipt> {
        self.store(envelope, None).await
    }

    async fn append_rejected(&self, envelope: Envelope, reason: String) -> Result<AppendReceipt> {
        self.store(envelope, Some(reason)).await
    }

    async fn transition(
        &self,
        id: MessageId,
        to: MessageState,
        mapping_version: Option<String>,
    ) -> Result<StateRecord> {
        let (record, seq) = self
            .db
            .committer()
            .run(move |txn| {
                let mut record = load_state(txn, id)?;
                record.state.check_transition(&to)?;
                let requeue = to.kind() == StateKind::Received;
                record.push(to, tributary_core::now_millis());
                if mapping_version.is_some() {
                    record.mapping_version = mapping_version;
                }
                let seq = requeue.then(|| queue_again(txn, id, &mut record));
                txn.put(Table::State, id.as_bytes().to_vec(), encode(&record));
                Ok((record, seq))
            })
            .await?;
        self.notify(seq);
        Ok(record)
    }

    fn get(&self, id: MessageId) -> Result<Option<JournalRecord>> {
        let tables = self.db.tables();
        let Some(env) = tables.get(Table::Msg).get(id.as_bytes())? else {
            return Ok(None);
        };
        let envelope: Envelope = decode("journal_msg", &env)?;
        let state = self
            .read_state(id)?
            .ok_or_else(|| StorageError::corrupt("journal_state", format!("missing for {id}")))?;
        Ok(Some(JournalRecord { envelope, state }))
    }

    fn entries_after(&self, after_seq: u64, limit: usize) -> Result<Vec<JournalEntry>> {
        let start = keys::u64_be(after_seq.saturating_add(1));
        let mut out = Vec::with_capacity(limit.min(1024));
        for item in self.db.range(Table::Seq, start..) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.into_inner()?;
            let seq =
                keys::read_u64(&k).ok_or_else(|| StorageError::corrupt("journal_seq", "key"))?;
            let id = MessageId::from_bytes(
                v[..]
                    .try_into()
                    .map_err(|_| StorageError::corrupt("journal_seq", "value"))?,
            );
            out.push(JournalEntry { seq, id });
        }
        Ok(out)
    }

    fn cursor(&self, consumer: &str) -> Result<u64> {
        self.db.cursor(&[b"journal:", consumer.as_bytes()].concat())
    }

    async fn set_cursor(&self, consumer: &str, seq: u64) -> Result<()> {
        let key = [b"journal:", consumer.as_bytes()].concat();
        self.db.set_cursor(key, seq).await
    }

    fn list(&self, filter: &ListFilter) -> Result<Vec<(MessageId, i64, StateRecord)>> {
        let from = keys::i64_be(filter.since.unwrap_or(i64::MIN));
        let to = keys::i64_be(filter.until.unwrap_or(i64::MAX));
        let limit = filter.limit.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        for item in self.db.range(Table::Time, from..to) {
            if out.len() >= limit {
                break;
            }
            let k = item.key()?;
            let at = keys::read_i64(&k).unwrap_or(0);
            let id = MessageId::from_bytes(
                k[8..24]
                    .try_into()
                    .map_err(|_| StorageError::corrupt("journal_time", "short key"))?,
            );
            let Some(state) = self.read_state(id)? else {
                continue;
            };
            if !filter.admits_state(&state) {
                continue;
            }
            if filter.needs_envelope() {
                let tables = self.db.tables();
                let Some(bytes) = tables.get(Table::Msg).get(id.as_bytes())? else {
                    continue;
                };
                let env: Envelope = decode("journal_msg", &bytes)?;
                if !filter.admits_envelope(&env) {
                    continue;
                }
            }
            out.push((id, at, state));
        }
        Ok(out)
    }

    async fn replay(&self, ids: &[MessageId]) -> Result<Vec<u64>> {
        let mut seqs = Vec::with_capacity(ids.len());
        // One durable write per chunk, not per message: a selection can hold a day of a feed.
        for chunk in ids.chunks(REPLAY_CHUNK) {
            let chunk = chunk.to_vec();
            let queued = self
                .db
                .committer()
                .run(move |txn| {
                    let now = tributary_core::now_millis();
                    let mut queued = Vec::with_capacity(chunk.len());
                    for id in chunk {
                        let mut record = load_state(txn, id)?;
                        record.push(MessageState::Received, now);
                        queued.push(queue_again(txn, id, &mut record));
                        txn.put(Table::State, id.as_bytes().to_vec(), encode(&record));
                    }
                    Ok(queued)
                })
                .await?;
            self.notify(queued.last().copied());
            seqs.extend(queued);
        }
        Ok(seqs)
    }

    async fn prune(&self, policy: &RetentionPolicy, now_ms: i64) -> Result<PruneStats> {
        // Reads and deletes in chunks: a blocking thread, not a tokio worker.
        let (this, policy) = (self.clone(), policy.clone());
        tokio::task::spawn_blocking(move || this.prune_blocking(&policy, now_ms))
            .await
            .map_err(|e| StorageError::Io(std::io::Error::other(e.to_string())))?
    }

    fn stats(&self) -> JournalStats {
        JournalStats {
            head_seq: *self.head.borrow(),
            approx_messages: self.db.tables().get(Table::Msg).approximate_len() as u64,
        }
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    fn state(&self, id: MessageId) -> Result<Option<StateRecord>> {
        self.read_state(id)
    }

    async fn set_note(&self, id: MessageId, name: &str, text: String) -> Result<()> {
        let name = name.to_string();
        self.db
            .committer()
            .run(move |txn| {
                // only for messages the journal holds: a note never outlives its message
                load_state(txn, id)?;
                let key = note_key(&id);
                let mut notes: BTreeMap<String, String> = match txn.get(Table::Meta, &key)? {
                    Some(b) => decode("journal_note", &b)?,
                    None => BTreeMap::new(),
                };
                notes.insert(name, text);
                txn.put(Table::Meta, key, encode(&notes));
                Ok(())
            })
            .await
    }

    fn notes(&self, id: MessageId) -> Result<BTreeMap<String, String>> {
        match self.db.tables().get(Table::Meta).get(note_key(&id))? {
            Some(b) => decode("journal_note", &b),
            None => Ok(BTreeMap::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DbOptions;
    use tributary_core::Protocol;

    fn journal() -> (tempfile::TempDir, FjallJournal) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), DbOptions::default()).unwrap();
        (dir, FjallJournal::new(db, 60_000))
    }

    fn env(body: &str) -> Envelope {
        Envelope::builder(Protocol::Hl7v2, body.as_bytes().to_vec())
            .partner("lab")
            .build()
    }

    #[tokio::test]
    async fn append_is_readable_in_order_with_cursor() {
        let (_d, j) = journal();
        let a = j.append(env("a")).await.unwrap();
        let b = j.append(env("b")).await.unwrap();
        assert_eq!((a.seq, b.seq), (Some(1), Some(2)));
        let entries = j.entries_after(0, 10).unwrap();
        assert_eq!(
            entries.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![a.id, b.id]
        );
        j.set_cursor("mapper", 1).await.unwrap();
        assert_eq!(j.cursor("mapper").unwrap(), 1);
        assert_eq!(j.entries_after(1, 10).unwrap().len(), 1);
        let rec = j.get(a.id).unwrap().unwrap();
        assert_eq!(&rec.envelope.payload[..], b"a");
        assert_eq!(rec.state.state, MessageState::Received);
    }

    #[tokio::test]
    async fn duplicate_within_window_returns_original() {
        let (_d, j) = journal();
        let first = Envelope::builder(Protocol::Hl7v2, &b"m"[..])
            .dedup_key("lab/CTRL1")
            .build();
        let again = Envelope::builder(Protocol::Hl7v2, &b"m"[..])
            .dedup_key("lab/CTRL1")
            .build();
        let r1 = j.append(first).await.unwrap();
        let r2 = j.append(again.clone()).await.unwrap();
        assert!(!r1.duplicate);
        assert!(r2.duplicate);
        assert_eq!(r2.id, r1.id);
        assert!(j.get(again.id).unwrap().is_none());
        assert_eq!(j.entries_after(0, 10).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_cut_short_dedup_record_is_an_error_not_a_dead_committer() {
        let (_d, j) = journal();
        j.db.committer()
            .run(|txn| {
                txn.put(Table::Dedup, b"lab/CTRL9".to_vec(), vec![1, 2, 3]);
                Ok(())
            })
            .await
            .unwrap();
        let keyed = Envelope::builder(Protocol::Hl7v2, &b"m"[..])
            .dedup_key("lab/CTRL9")
            .build();
        let err = j.append(keyed).await.unwrap_err();
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
        // The committer is still there for everything else.
        assert_eq!(j.append(env("a")).await.unwrap().seq, Some(1));
    }

    #[tokio::test]
    async fn dedup_window_expires() {
        let (_d, j) = journal();
        let old = Envelope::builder(Protocol::Hl7v2, &b"m"[..])
            .dedup_key("k")
            .received_at(1_000)
            .build();
        let new = Envelope::builder(Protocol::Hl7v2, &b"m"[..])
            .dedup_key("k")
            .received_at(1_000 + 60_001)
            .build();
        j.append(old).await.unwrap();
        assert!(!j.append(new).await.unwrap().duplicate);
    }

    #[tokio::test]
    async fn rejected_messages_are_kept_but_not_queued_until_replayed() {
        let (_d, j) = journal();
        let r = j
            .append_rejected(env("garbage"), "no MSH segment".into())
            .await
            .unwrap();
        assert_eq!(r.seq, None);
        assert!(j.entries_after(0, 10).unwrap().is_empty());
        let rec = j.get(r.id).unwrap().unwrap();
        assert_eq!(rec.state.state.reason(), Some("no MSH segment"));
        let seqs = j.replay(&[r.id]).await.unwrap();
        assert_eq!(seqs, vec![1]);
        assert_eq!(j.get(r.id).unwrap().unwrap().state.attempts, 1);
    }

    fn typed(tenant: &str, partner: &str, code: &str, trigger: &str) -> Envelope {
        Envelope::builder(Protocol::Hl7v2, &b"MSH|"[..])
            .tenant(tenant)
            .partner(partner)
            .meta("message_type", code)
            .meta("trigger_event", trigger)
            .build()
    }

    async fn processed(
        j: &FjallJournal,
        env: Envelope,
        to: MessageState,
        version: &str,
    ) -> MessageId {
        let id = j.append(env).await.unwrap().id;
        j.transition(id, to, Some(version.into())).await.unwrap();
        id
    }

    #[tokio::test]
    async fn list_narrows_by_state_tenant_partner_type_and_mapping_version() {
        let (_d, j) = journal();
        let failed = MessageState::Failed { reason: "x".into() };
        let a01 = processed(
            &j,
            typed("t1", "adt", "ADT", "A01"),
            MessageState::Committed,
            "v1aaa",
        )
        .await;
        let a08 = processed(
            &j,
            typed("t1", "adt", "ADT", "A08"),
            failed.clone(),
            "v2bbb",
        )
        .await;
        let oru = processed(
            &j,
            typed("t1", "lab", "ORU", "R01"),
            MessageState::Committed,
            "v2bbb",
        )
        .await;
        let other = processed(
            &j,
            typed("t2", "adt", "ADT", "A01"),
            MessageState::Committed,
            "v1aaa",
        )
        .await;
        let pending = j.append(typed("t1", "adt", "ADT", "A01")).await.unwrap().id;
        let ids = |f: ListFilter| -> Vec<MessageId> {
            j.list(&f)
                .unwrap()
                .into_iter()
                .map(|(id, _, _)| id)
                .collect()
        };
        assert_eq!(
            ids(ListFilter::default()),
            vec![a01, a08, oru, other, pending]
        );
        let t1 = || ListFilter {
            tenant: Some("t1".into()),
            ..Default::default()
        };
        assert_eq!(ids(t1()), vec![a01, a08, oru, pending]);
        assert_eq!(
            ids(ListFilter {
                message_type: Some("adt".into()),
                ..t1()
            }),
            vec![a01, a08, pending]
        );
        assert_eq!(
            ids(ListFilter {
                message_type: Some("ADT_A08".into()),
                ..t1()
            }),
            vec![a08]
        );
        assert_eq!(
            ids(ListFilter {
                partner: Some("lab".into()),
                ..t1()
            }),
            vec![oru]
        );
        assert_eq!(
            ids(ListFilter {
                states: vec![StateKind::Failed, StateKind::Received],
                ..t1()
            }),
            vec![a08, pending]
        );
        let version = |v: VersionMatch| ListFilter {
            mapping_version: Some(v),
            ..t1()
        };
        assert_eq!(
            ids(version(VersionMatch::StartsWith("v1".into()))),
            vec![a01]
        );
        // never processed: no version to differ from the current one
        assert_eq!(ids(version(VersionMatch::Not("v2bbb".into()))), vec![a01]);
        assert_eq!(
            ids(ListFilter {
                limit: Some(2),
                ..t1()
            }),
            vec![a01, a08]
        );
        let rec = j.get(other).unwrap().unwrap();
        assert!(!t1().admits(&rec));
        assert!(ListFilter::default().admits(&rec));
    }

    #[tokio::test]
    async fn replaying_more_than_a_chunk_queues_each_message_once_in_the_given_order() {
        let (_d, j) = journal();
        let mut ids = Vec::new();
        for i in 0..(REPLAY_CHUNK + 3) {
            let id = j.append(env(&format!("m{i}"))).await.unwrap().id;
            j.transition(id, MessageState::Committed, Some("v1".into()))
                .await
                .unwrap();
            ids.push(id);
        }
        let head = j.stats().head_seq;
        let seqs = j.replay(&ids).await.unwrap();
        assert_eq!(
            seqs,
            ((head + 1)..=(head + ids.len() as u64)).collect::<Vec<_>>()
        );
        let queued: Vec<MessageId> = j
            .entries_after(head, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(queued, ids);
        let rec = j.state(ids[REPLAY_CHUNK + 1]).unwrap().unwrap();
        assert_eq!((rec.state, rec.attempts), (MessageState::Received, 2));
        assert_eq!(rec.seq, Some(head + REPLAY_CHUNK as u64 + 2));
        assert_eq!(*j.subscribe().borrow(), head + ids.len() as u64);
        assert!(matches!(
            j.replay(&[MessageId::new()]).await,
            Err(StorageError::UnknownMessage(_))
        ));
    }

    #[tokio::test]
    async fn notes_are_kept_per_message_and_only_for_known_messages() {
        let (_d, j) = journal();
        let r = j.append(env("x")).await.unwrap();
        assert!(j.notes(r.id).unwrap().is_empty());
        j.set_note(r.id, "app_ack", "pending".into()).await.unwrap();
        j.set_note(r.id, "route.lab", "sent".into()).await.unwrap();
        j.set_note(r.id, "app_ack", "sent AA".into()).await.unwrap();
        let n = j.notes(r.id).unwrap();
        assert_eq!(n.len(), 2);
        assert_eq!(n["app_ack"], "sent AA");
        assert_eq!(
            j.state(r.id).unwrap().unwrap().state,
            MessageState::Received
        );
        let unknown = MessageId::new();
        assert!(j.set_note(unknown, "app_ack", "x".into()).await.is_err());
        assert!(j.notes(unknown).unwrap().is_empty());
    }

    #[tokio::test]
    async fn illegal_transition_is_refused_and_changes_nothing() {
        let (_d, j) = journal();
        let r = j.append(env("x")).await.unwrap();
        let err = j
            .transition(r.id, MessageState::Delivered, None)
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::State(_)), "{err}");
        assert_eq!(
            j.get(r.id).unwrap().unwrap().state.state,
            MessageState::Received
        );
        j.transition(r.id, MessageState::Mapped, Some("v1".into()))
            .await
            .unwrap();
        let rec = j
            .transition(r.id, MessageState::Committed, None)
            .await
            .unwrap();
        assert_eq!(rec.mapping_version.as_deref(), Some("v1"));
        assert_eq!(rec.history.len(), 3);
    }

    #[tokio::test]
    async fn prune_removes_old_delivered_and_keeps_failed() {
        let (_d, j) = journal();
        let mut ids = Vec::new();
        for i in 0..4 {
            let e = Envelope::builder(Protocol::Hl7v2, vec![b'x'; 100])
                .received_at(1_000 + i)
                .dedup_key(format!("k{i}"))
                .build();
            ids.push(j.append(e).await.unwrap().id);
        }
        for id in &ids[..2] {
            j.transition(*id, MessageState::Committed, None)
                .await
                .unwrap();
            j.transition(*id, MessageState::Delivered, None)
                .await
                .unwrap();
        }
        j.transition(ids[2], MessageState::Failed { reason: "r".into() }, None)
            .await
            .unwrap();
        j.set_note(ids[0], "app_ack", "sent AA".into())
            .await
            .unwrap();
        j.set_note(ids[2], "app_ack", "sent AE".into())
            .await
            .unwrap();
        let policy = RetentionPolicy {
            delivered_max_age_ms: 10,
            ..Default::default()
        };
        let stats = j.prune(&policy, 5_000).await.unwrap();
        assert_eq!(stats.pruned, 2);
        assert_eq!(stats.bytes_freed, 200);
        assert_eq!(stats.kept_for_attention, 1);
        assert!(j.get(ids[0]).unwrap().is_none());
        assert!(j.get(ids[2]).unwrap().is_some());
        assert!(
            j.notes(ids[0]).unwrap().is_empty(),
            "notes go with the message"
        );
        assert_eq!(j.notes(ids[2]).unwrap()["app_ack"], "sent AE");
        assert_eq!(j.entries_after(0, 10).unwrap().len(), 2);
        // The dedup key of a pruned message is free again.
        let again = Envelope::builder(Protocol::Hl7v2, &b"x"[..])
            .dedup_key("k0")
            .build();
        assert!(!j.append(again).await.unwrap().duplicate);
    }

    /// A failed message's later messages of the same sender and patient stay while it is
    /// unresolved (a replay re-queues them behind it); other keys' messages go as usual; a
    /// payload budget still prunes them.
    #[tokio::test]
    async fn prune_keeps_the_followers_of_a_failed_message() {
        let (_d, j) = journal();
        let mut ids = Vec::new();
        for (i, key) in ["p1", "p1", "p2", "p1"].iter().enumerate() {
            let e = Envelope::builder(Protocol::Hl7v2, vec![b'x'; 100])
                .received_at(1_000 + i as i64)
                .ordering_key(*key)
                .dedup_key(format!("f{i}"))
                .build();
            ids.push(j.append(e).await.unwrap().id);
        }
        j.transition(ids[0], MessageState::Failed { reason: "r".into() }, None)
            .await
            .unwrap();
        for id in &ids[1..] {
            j.transition(*id, MessageState::Committed, None)
                .await
                .unwrap();
        }
        let policy = RetentionPolicy {
            delivered_max_age_ms: 10,
            ..Default::default()
        };
        let stats = j.prune(&policy, 5_000).await.unwrap();
        assert_eq!((stats.pruned, stats.held_for_replay), (1, 2));
        assert!(
            j.get(ids[2]).unwrap().is_none(),
            "another patient's message"
        );
        for id in [ids[0], ids[1], ids[3]] {
            assert!(j.get(id).unwrap().is_some());
        }
        let budget = RetentionPolicy {
            max_payload_bytes: Some(150),
            ..policy
        };
        let stats = j.prune(&budget, 5_000).await.unwrap();
        assert_eq!(stats.pruned, 2, "the budget overrides the hold");
    }

    /// `n` delivered messages of 100 bytes received at 1000, 1001, …
    async fn delivered(j: &FjallJournal, n: i64) -> Vec<MessageId> {
        let mut ids = Vec::new();
        for i in 0..n {
            let e = Envelope::builder(Protocol::Hl7v2, vec![b'x'; 100])
                .received_at(1_000 + i)
                .build();
            let id = j.append(e).await.unwrap().id;
            j.transition(id, MessageState::Committed, None)
                .await
                .unwrap();
            ids.push(id);
        }
        ids
    }

    #[tokio::test]
    async fn retention_reads_only_up_to_the_cut_off() {
        let (_d, j) = journal();
        let ids = delivered(&j, 10).await;
        // A record newer than the cut-off is damaged: retention has no business reading it.
        let damaged = ids[9];
        j.db.committer()
            .run(move |txn| {
                txn.put(Table::State, damaged.as_bytes().to_vec(), b"x".to_vec());
                Ok(())
            })
            .await
            .unwrap();
        let policy = RetentionPolicy {
            delivered_max_age_ms: 1_000,
            ..Default::default()
        };
        // cut-off 1006: the six messages received before it go, over two chunks
        let stats = j.prune(&policy, 2_006).await.unwrap();
        assert_eq!((stats.pruned, stats.bytes_freed), (6, 600));
        assert!(j.get(ids[5]).unwrap().is_none());
        assert!(j.state(ids[6]).unwrap().is_some());
    }

    #[tokio::test]
    async fn a_payload_budget_prunes_the_oldest_finished_messages_across_chunks() {
        let (_d, j) = journal();
        let ids = delivered(&j, 10).await;
        j.transition(ids[1], MessageState::Failed { reason: "r".into() }, None)
            .await
            .unwrap();
        let policy = RetentionPolicy {
            delivered_max_age_ms: i64::MAX / 2,
            max_payload_bytes: Some(450),
            ..Default::default()
        };
        // 1,000 bytes, 100 of them failed and kept: the oldest finished go until 450 remain.
        let stats = j.prune(&policy, 5_000).await.unwrap();
        assert_eq!(stats.pruned, 6);
        assert_eq!(stats.kept_for_attention, 1);
        let kept: Vec<bool> = ids
            .iter()
            .map(|id| j.state(*id).unwrap().is_some())
            .collect();
        assert_eq!(
            kept,
            [false, true, false, false, false, false, false, true, true, true]
        );
    }

    #[tokio::test]
    async fn committed_messages_are_pruned_once_every_journal_consumer_has_passed_them() {
        let (_d, j) = journal();
        let mut ids = Vec::new();
        for i in 0..3 {
            let e = Envelope::builder(Protocol::Hl7v2, vec![b'x'; 10])
                .received_at(1_000 + i)
                .build();
            ids.push(j.append(e).await.unwrap().id);
        }
        // nothing marks messages delivered today: committed is finished
        for id in &ids[..2] {
            j.transition(*id, MessageState::Committed, None)
                .await
                .unwrap();
        }
        let policy = RetentionPolicy {
            delivered_max_age_ms: 10,
            consumers: vec!["mllp.route.lab".into()],
            ..Default::default()
        };
        // the route has forwarded the first message only
        j.set_cursor("mllp.route.lab", 1).await.unwrap();
        assert_eq!(j.prune(&policy, 5_000).await.unwrap().pruned, 1);
        assert!(j.get(ids[0]).unwrap().is_none());
        assert!(j.get(ids[1]).unwrap().is_some(), "not forwarded yet");
        j.set_cursor("mllp.route.lab", 3).await.unwrap();
        assert_eq!(j.prune(&policy, 5_000).await.unwrap().pruned, 1);
        assert!(j.get(ids[1]).unwrap().is_none());
        assert!(
            j.get(ids[2]).unwrap().is_some(),
            "still waiting for the pipeline"
        );
    }

    #[tokio::test]
    async fn sequence_survives_reopen_even_after_pruning_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let id;
        {
            let db = Db::open(dir.path(), DbOptions::default()).unwrap();
            let j = FjallJournal::new(db, 0);
            j.append(env("a")).await.unwrap();
            id = j.append(env("b")).await.unwrap().id;
            j.transition(id, MessageState::Committed, None)
                .await
                .unwrap();
            j.transition(id, MessageState::Delivered, None)
                .await
                .unwrap();
            let policy = RetentionPolicy::default();
            let later = tributary_core::now_millis() + 1_000;
            assert_eq!(j.prune(&policy, later).await.unwrap().pruned, 1);
        }
        let db = Db::open(dir.path(), DbOptions::default()).unwrap();
        let j = FjallJournal::new(db, 0);
        assert_eq!(j.append(env("c")).await.unwrap().seq, Some(3));
    }
}
