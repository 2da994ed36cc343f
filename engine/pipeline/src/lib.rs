//! The mapping pipeline: workers take journaled HL7 v2 messages in journal order per ordering
//! key (sender + patient), map them with the current mapping set, check the output, and commit
//! resources + outbox events + the message state in one atomic, durable write. A message that
//! cannot be mapped is marked `failed` with a reason naming the mapping file, rule and source
//! path (never a value) and waits for a fix and `tributary replay`. A message whose report lists
//! source fields no rule consumed, or values the output had to leave out (a Period `end` before
//! its `start`, FHIR R4 invariant per-1), is committed with a warning, quarantined or rejected
//! as `[mapping] unconsumed` says. Either way the fields are counted per tenant, feed, message
//! map and path in the field report ([`FieldAggregator`], `tributary mapping report`); under `warn` the
//! log names each field the first time it is seen and then summarizes once per interval.
//!
//! FHIR messages (inbound Subscription notifications, FHIR from a queue) take the pass-through
//! mapping of [`fhir`] to the same store, outbox and state. An HL7 v2 batch file (one refused
//! whole at the door, then replayed) is split into its messages, each journaled on its own
//! ([`SPLIT_NOTE`]).
//!
//! The mapping set is hot-reloaded: a changed directory is compiled aside and swapped in whole
//! (each message is mapped by exactly one version, recorded on the message); a bad file never
//! replaces a good set — the error is logged and the old version keeps running. A change is
//! loaded once two checks in a row read the same files, so an edit of several files is never
//! caught half-way.

mod body;
mod config;
pub mod fhir;
pub mod field_report;
mod registry;
mod split;

pub use config::{FeedConfig, MappingConfig, MappingConfigError, UnconsumedPolicy};
pub use field_report::FieldAggregator;
pub use registry::{MappingRegistry, ReloadOutcome};
pub use split::SPLIT_NOTE;

use futures_util::FutureExt;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tributary_core::{deterministic_id, MessageId, MessageState, Protocol, StateKind};
use tributary_mapping::{MappedBundle, RunOptions, Write};
use tributary_runtime::{
    ComponentStatus, LogThrottle, Processed, ProcessedFeed, ProcessedOutcome, Runtime, Sample,
};
use tributary_storage::{
    FieldKey, FieldKind, FieldReportStore, Journal, JournalEntry, JournalRecord, MessageUpdate,
    OutboxEvent, Precondition, ResourceWrite, StateRecord, StorageError, StoreTransaction,
};

/// Journal consumer name under which the pipeline keeps its cursor.
pub const CONSUMER: &str = "pipeline.hl7v2";
/// Readiness component name.
pub const COMPONENT: &str = "pipeline";
/// Entries queued per worker.
const SHARD_QUEUE: usize = 64;
/// Entries dispatched but not yet processed, across all workers (overflow included).
const MAX_IN_FLIGHT: usize = 2048;
/// Entries the dispatcher holds for workers whose queue is full, across all shards (see
/// [`Dispatch`]).
const OVERFLOW_MAX: usize = 1024;
/// Largest payload a dispatched entry carries to its worker (see [`queued`]).
const QUEUED_PAYLOAD_MAX: usize = 64 * 1024;
const CURSOR_SAVE_EVERY: Duration = Duration::from_millis(100);
/// The reason a message fails with when mapping it hit a bug (a panic). Fixed: the panic's own
/// message may quote the message's content.
pub const PANIC_REASON: &str = "internal error: panic in mapping";

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
}

/// What happened to one journal entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Committed {
        resources: usize,
        changed: usize,
        unconsumed: usize,
        /// Source values left out of the output (a Period end before its start).
        dropped: usize,
    },
    Failed {
        reason: String,
    },
    /// A batch file split into its `messages`, of which `journaled` were new to the journal
    /// (see [`SPLIT_NOTE`]).
    Split {
        messages: usize,
        journaled: usize,
    },
    /// Not for this pipeline (another protocol), already processed, or queued again later.
    Skipped,
}

/// The running pipeline: a mapping registry plus the policy from `[mapping]`.
#[derive(Clone)]
pub struct Pipeline {
    pub registry: Arc<MappingRegistry>,
    pub config: MappingConfig,
    /// Where per-message outcomes are announced once durable (application ACKs listen).
    feed: Option<ProcessedFeed>,
    /// Unconsumed / left-out field counts, flushed to storage by [`Pipeline::flush_report`].
    pub report: Arc<FieldAggregator>,
    /// Test seam: mapping a message whose payload starts with `tests::HOLD_IN_MAPPING` waits
    /// for a permit here (a slow or stuck mapping of one key).
    #[cfg(test)]
    hold: Option<Arc<tokio::sync::Semaphore>>,
}

/// A dispatched record, kept for its worker unless its payload is large: the worker reads those
/// again, so queued records stay bounded in bytes, not only in count.
fn queued(record: JournalRecord) -> Option<JournalRecord> {
    (record.envelope.payload.len() <= QUEUED_PAYLOAD_MAX).then_some(record)
}

fn shard_of(key: &str, workers: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % workers.max(1) as u64) as usize
}

type Queued = (JournalEntry, Option<JournalRecord>);
type ShardSender = mpsc::Sender<Queued>;

/// What the dispatcher holds, read by `/metrics` at scrape time: per shard, entries not
/// processed yet, and the entries waiting in its overflow. Counts and shard numbers only.
struct DispatchStats {
    /// Per shard: queued for its worker, being processed, or waiting in the overflow.
    backlog: Vec<AtomicU64>,
    /// Entries waiting in the overflow, across shards.
    overflow: AtomicU64,
}

impl DispatchStats {
    fn new(shards: usize) -> Self {
        Self {
            backlog: (0..shards).map(|_| AtomicU64::new(0)).collect(),
            overflow: AtomicU64::new(0),
        }
    }

    fn samples(&self) -> Vec<Sample> {
        let mut out: Vec<Sample> = self
            .backlog
            .iter()
            .enumerate()
            .map(|(shard, n)| Sample {
                name: "tributary_pipeline_shard_backlog",
                labels: vec![("shard", shard.to_string())],
                value: n.load(Ordering::Relaxed) as f64,
            })
            .collect();
        out.push(Sample {
            name: "tributary_pipeline_dispatch_overflow",
            labels: Vec::new(),
            value: self.overflow.load(Ordering::Relaxed) as f64,
        });
        out
    }
}

/// The dispatcher's place in the journal: how far it has handed entries to workers, and which
/// of those are not processed yet.
///
/// It never waits for one worker: an entry whose shard's queue is full goes to that shard's
/// overflow and the dispatcher reads on, so one slow or stuck key holds back only its own shard.
/// While a shard has entries in the overflow its newer entries queue behind them (journal order
/// per key). The overflow is bounded across shards ([`OVERFLOW_MAX`]); when it is full, reading
/// stops before the entry that does not fit until a worker takes entries.
struct Dispatch {
    /// Every entry up to here was handed to its worker, put in its shard's overflow, or needs no
    /// processing.
    position: u64,
    /// Handed to a worker or waiting in the overflow (entry → shard), not reported done yet.
    in_flight: BTreeMap<u64, usize>,
    /// Per shard: entries read while its queue was full, oldest first (each also in `in_flight`).
    overflow: Vec<VecDeque<Queued>>,
    /// Entries in `overflow`, across shards.
    overflowed: usize,
    /// At most this many in `overflow` ([`OVERFLOW_MAX`]; tests set less).
    overflow_max: usize,
    /// Whether the journal may hold entries after `position` (read again when set).
    more: bool,
    /// Whether the last pass stopped at a full overflow: the entry after `position` waits.
    waiting: bool,
    stats: Arc<DispatchStats>,
}

impl Dispatch {
    fn new(cursor: u64, shards: usize) -> Self {
        Self {
            position: cursor,
            in_flight: Default::default(),
            overflow: (0..shards).map(|_| VecDeque::new()).collect(),
            overflowed: 0,
            overflow_max: OVERFLOW_MAX,
            more: true,
            waiting: false,
            stats: Arc::new(DispatchStats::new(shards)),
        }
    }

    /// Every entry up to here is processed: where the cursor may go.
    fn done_through(&self) -> u64 {
        self.in_flight
            .first_key_value()
            .map_or(self.position, |(oldest, _)| self.position.min(oldest - 1))
    }

    fn hold(&mut self, seq: u64, shard: usize) {
        if self.in_flight.insert(seq, shard).is_none() {
            self.stats.backlog[shard].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn done(&mut self, seq: u64) {
        if let Some(shard) = self.in_flight.remove(&seq) {
            self.stats.backlog[shard].fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Every entry up to `seq` is handed out (or needs no processing).
    fn advance(&mut self, seq: u64) {
        self.position = seq;
        self.waiting = false;
    }

    fn push_overflow(&mut self, shard: usize, item: Queued) {
        self.overflow[shard].push_back(item);
        self.overflowed += 1;
        self.stats.overflow.fetch_add(1, Ordering::Relaxed);
    }

    /// The shard with the most entries not processed yet, and how many (for the log).
    fn fullest(&self) -> (usize, u64) {
        self.stats
            .backlog
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .enumerate()
            .max_by_key(|(_, n)| *n)
            .unwrap_or_default()
    }

    /// A worker that stopped lost the entries queued for it: they are handed out again, from
    /// the oldest on, and so are those waiting in its overflow. Entries of other shards still in
    /// flight are not sent twice (see [`Dispatch::fill`]); those already processed are read
    /// again and skipped.
    fn forget_shard(&mut self, shard: usize) {
        let waiting = std::mem::take(&mut self.overflow[shard]).len();
        self.overflowed -= waiting;
        self.stats
            .overflow
            .fetch_sub(waiting as u64, Ordering::Relaxed);
        let lost: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, s)| **s == shard)
            .map(|(seq, _)| *seq)
            .collect();
        if let Some(oldest) = lost.first() {
            self.position = self.position.min(oldest - 1);
            for seq in &lost {
                self.done(*seq);
            }
            self.more = true;
        }
    }

    /// Hands a shard's overflow to its worker, oldest first, while its queue takes entries;
    /// `false` when the worker is gone.
    fn drain(&mut self, shard: usize, tx: &ShardSender) -> bool {
        while let Some(item) = self.overflow[shard].pop_front() {
            match tx.try_send(item) {
                Ok(()) => {
                    self.overflowed -= 1;
                    self.stats.overflow.fetch_sub(1, Ordering::Relaxed);
                }
                Err(TrySendError::Full(item)) => {
                    self.overflow[shard].push_front(item);
                    return true;
                }
                Err(TrySendError::Closed(item)) => {
                    self.overflow[shard].push_front(item);
                    return false;
                }
            }
        }
        true
    }

    /// Hands waiting overflow entries on, then reads entries after `position` and hands each to
    /// the worker of its ordering key (or its shard's overflow), until `MAX_IN_FLIGHT` are out,
    /// the journal has no more, or the overflow is full. Never waits for a worker. An entry that
    /// fits nowhere is not counted as read: `position` stays before it, so the cursor never
    /// passes it, and the next pass reads it again. Returns a shard whose worker is gone
    /// (shutdown, or it died): its entries wait in the overflow until it is started again.
    fn fill(&mut self, journal: &dyn Journal, shards: &[ShardSender]) -> Option<usize> {
        let mut gone = None;
        for (shard, tx) in shards.iter().enumerate() {
            if !self.drain(shard, tx) {
                gone.get_or_insert(shard);
            }
        }
        let stopped = self.read_on(journal, shards);
        gone.or(stopped)
    }

    /// The reading half of [`Dispatch::fill`]. A worker may take entries while it runs, so a
    /// shard's queue can have room while its overflow still holds older entries.
    fn read_on(&mut self, journal: &dyn Journal, shards: &[ShardSender]) -> Option<usize> {
        let mut gone = None;
        while self.more && self.in_flight.len() < MAX_IN_FLIGHT {
            // While waiting, only the entry that did not fit is read again.
            let batch = if self.waiting { 1 } else { 512 };
            let entries = match journal.entries_after(self.position, batch) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the journal failed; retrying");
                    return gone;
                }
            };
            self.more = entries.len() == batch;
            for e in entries {
                if self.in_flight.contains_key(&e.seq) {
                    // still with its worker (the pass re-reads after a worker stopped)
                    self.advance(e.seq);
                    continue;
                }
                let record = match journal.get(e.id) {
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        self.advance(e.seq);
                        continue;
                    }
                    Err(err) => {
                        // read again on the next pass, from this entry on
                        tracing::warn!(error = %err, "reading a journal record failed");
                        self.more = false;
                        return gone;
                    }
                };
                let seq = e.seq;
                let shard = shard_of(&record.envelope.ordering_key, shards.len());
                let mut item = (e, queued(record));
                // Behind its shard's overflow, if any: one key's entries stay in journal order.
                if self.overflow[shard].is_empty() {
                    match shards[shard].try_send(item) {
                        Ok(()) => {
                            self.advance(seq);
                            self.hold(seq, shard);
                            continue;
                        }
                        Err(TrySendError::Full(back)) => item = back,
                        Err(TrySendError::Closed(back)) => {
                            gone.get_or_insert(shard);
                            item = back;
                        }
                    }
                }
                if self.overflowed >= self.overflow_max {
                    // read again from this entry once a worker took entries
                    self.more = true;
                    self.waiting = true;
                    return gone;
                }
                self.push_overflow(shard, item);
                self.advance(seq);
                self.hold(seq, shard);
            }
        }
        gone
    }
}

impl Pipeline {
    pub fn new(registry: Arc<MappingRegistry>, config: MappingConfig) -> Self {
        let report = Arc::new(FieldAggregator::new(
            config.report_max_fields,
            Duration::from_secs(config.report_log_interval_secs.max(1)),
            Instant::now(),
        ));
        Self {
            registry,
            config,
            feed: None,
            report,
            #[cfg(test)]
            hold: None,
        }
    }

    /// Announces every committed or failed message on `feed` after its write is durable.
    pub fn with_feed(mut self, feed: ProcessedFeed) -> Self {
        self.feed = Some(feed);
        self
    }

    fn announce(&self, id: tributary_core::MessageId, outcome: ProcessedOutcome) {
        if let Some(f) = &self.feed {
            f.publish(Processed { id, outcome });
        }
    }

    /// Runs until `rt.shutdown`: consume, map, commit; reload the mapping set when it changes.
    ///
    /// A dispatcher reads the journal after its position and hands each entry to the worker of
    /// its ordering key over a bounded channel; workers map and commit one entry at a time. There
    /// is no barrier between batches, and the dispatcher never waits on one worker: while a
    /// shard's queue is full its entries wait in a bounded overflow and the other shards are
    /// still fed (see [`Dispatch`]), so a slow shard holds back only its own keys' messages until
    /// the overflow fills. The stored cursor advances to just before the oldest entry still in
    /// flight (overflow included), so after a crash the entries after it are offered again and
    /// those already processed are skipped.
    pub async fn run(self, rt: Runtime) -> Result<(), PipelineError> {
        rt.readiness.set(COMPONENT, ComponentStatus::Ready);
        let workers = self.config.workers.max(1);
        tracing::info!(
            version = %self.registry.current().version,
            workers,
            "pipeline started"
        );
        // Fields already in the stored report are not announced as new again.
        match FieldReportStore::new(rt.db.clone()).keys() {
            Ok(keys) => self.report.preload(keys),
            Err(e) => tracing::warn!(error = %e, "reading the mapping field report failed"),
        }
        let mut report_tick =
            tokio::time::interval(Duration::from_secs(self.config.report_flush_secs.max(1)));
        report_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        report_tick.tick().await;
        let mut head = rt.journal.subscribe();
        let reload_every = Duration::from_secs(self.config.reload_interval_secs.max(1));
        let mut reload_tick = tokio::time::interval(reload_every);
        reload_tick.tick().await;

        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<u64>();
        let mut shards = Vec::with_capacity(workers);
        let mut worker_ids = Vec::with_capacity(workers);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..workers {
            let (tx, rx) = mpsc::channel(SHARD_QUEUE);
            shards.push(tx);
            let worker = self.clone().worker(rt.clone(), rx, done_tx.clone());
            worker_ids.push(tasks.spawn(worker).id());
        }

        let mut dispatch = Dispatch::new(rt.journal.cursor(CONSUMER)?, workers);
        // Read at scrape time while this run lasts.
        let stats = Arc::downgrade(&dispatch.stats);
        rt.metrics.provide(Box::new(move || {
            stats.upgrade().map_or_else(Vec::new, |s| s.samples())
        }));
        let overflow_full_log = LogThrottle::new(Duration::from_secs(10));
        let mut saved = dispatch.position;
        let mut last_save = Instant::now();
        loop {
            let was_waiting = dispatch.waiting;
            if let Some(shard) = dispatch.fill(rt.journal.as_ref(), &shards) {
                if !rt.shutdown.is_cancelled() {
                    tracing::warn!(
                        shard,
                        "a pipeline worker is not taking entries; its entries wait"
                    );
                }
            }
            if dispatch.waiting && !was_waiting {
                // One shard is far behind (a slow or stuck key): the others got what was read so
                // far, and get more once it takes entries.
                rt.metrics
                    .inc("tributary_pipeline_dispatch_overflow_full_total", &[]);
                if let Some(not_logged) = overflow_full_log.hit() {
                    let (shard, backlog) = dispatch.fullest();
                    tracing::warn!(
                        shard,
                        backlog,
                        overflow = dispatch.overflowed,
                        not_logged,
                        "pipeline dispatch overflow full; reading the journal waits for a shard"
                    );
                }
            }
            // Everything before the oldest entry in flight is done. The cursor is only where a
            // restart resumes (processed entries are skipped), so saving it is rate-limited.
            let done_through = dispatch.done_through();
            if done_through > saved
                && (dispatch.in_flight.is_empty() || last_save.elapsed() >= CURSOR_SAVE_EVERY)
            {
                last_save = Instant::now();
                match rt.journal.set_cursor(CONSUMER, done_through).await {
                    Ok(()) => saved = done_through,
                    Err(e) => tracing::warn!(error = %e, "saving the pipeline cursor failed"),
                }
            }
            tokio::select! {
                _ = rt.shutdown.cancelled() => break,
                Some(seq) = done_rx.recv() => {
                    dispatch.done(seq);
                    while let Ok(seq) = done_rx.try_recv() {
                        dispatch.done(seq);
                    }
                    dispatch.more = true;
                }
                // A worker returns only at shutdown; one that stops otherwise (a bug outside the
                // per-message panic guard) is started again and given its lost entries anew.
                Some(joined) = tasks.join_next_with_id() => {
                    if rt.shutdown.is_cancelled() {
                        break;
                    }
                    let (id, panicked) = match &joined {
                        Ok((id, ())) => (*id, false),
                        Err(e) => (e.id(), e.is_panic()),
                    };
                    if let Some(shard) = worker_ids.iter().position(|w| *w == id) {
                        tracing::error!(shard, panicked, "a pipeline worker stopped; starting it again");
                        rt.metrics.inc("tributary_pipeline_worker_restarts_total", &[]);
                        let (tx, rx) = mpsc::channel(SHARD_QUEUE);
                        shards[shard] = tx;
                        let worker = self.clone().worker(rt.clone(), rx, done_tx.clone());
                        worker_ids[shard] = tasks.spawn(worker).id();
                        dispatch.forget_shard(shard);
                    }
                }
                _ = head.changed() => dispatch.more = true,
                _ = reload_tick.tick(), if self.config.reload_interval_secs > 0 => {
                    let outcome = self.registry.poll();
                    self.after_reload(&rt, outcome).await;
                    dispatch.more = true;
                }
                _ = report_tick.tick() => {
                    self.log_summaries();
                    if let Err(e) = self.flush_report(&rt).await {
                        tracing::warn!(error = %e, "saving the mapping field report failed; retrying");
                    }
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => dispatch.more = true,
            }
        }
        // Finish what the workers hold (each entry is one atomic commit), then save the cursor.
        drop(shards);
        drop(done_tx);
        while tasks.join_next().await.is_some() {}
        while let Ok(seq) = done_rx.try_recv() {
            dispatch.done(seq);
        }
        let done_through = dispatch.done_through();
        if done_through > saved {
            rt.journal.set_cursor(CONSUMER, done_through).await?;
        }
        self.flush_report(&rt).await?;
        Ok(())
    }

    /// Writes the field counts gathered since the last flush to storage in one durable write; on
    /// failure they are kept for the next attempt.
    pub async fn flush_report(&self, rt: &Runtime) -> Result<(), PipelineError> {
        let pending = self.report.take_pending();
        if pending.is_empty() {
            return Ok(());
        }
        let (deltas, overflow) = (pending.deltas.clone(), pending.overflow.clone());
        match FieldReportStore::new(rt.db.clone())
            .merge(deltas, overflow)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => {
                self.report.restore(pending);
                Err(e.into())
            }
        }
    }

    /// Under `warn`: one summary line per message map once per `report_log_interval_secs`.
    fn log_summaries(&self) {
        let summaries = self.report.take_summaries(Instant::now());
        if !self.config.any_warn() {
            return;
        }
        for s in summaries {
            tracing::warn!(
                tenant = %s.tenant,
                message_map = %s.message_map,
                messages = s.messages,
                "{s}"
            );
        }
    }

    /// Counts a mapped message's unconsumed and left-out fields; under `warn`, logs those seen
    /// for the first time (paths and reasons only).
    fn observe_fields(&self, env: &tributary_core::Envelope, mapped: &MappedBundle) {
        if mapped.unconsumed.is_empty() && mapped.dropped.is_empty() {
            return;
        }
        let fields = field_report::fields_of(mapped);
        let id = env.id.to_string();
        // the file name (`ADT_A01.yaml`): stable when the mapping directory moves
        let map = std::path::Path::new(&mapped.message_map)
            .file_name()
            .map_or(mapped.message_map.as_str(), |n| n.to_str().unwrap_or(""));
        let new = self.report.observe(&field_report::Observation {
            tenant: env.tenant.as_str(),
            feed: env.partner.as_str(),
            message_map: map,
            message_type: &mapped.message_type,
            message_id: &id,
            at: tributary_core::now_millis(),
            fields: &fields,
        });
        if self.config.unconsumed_for(env.partner.as_str()) == UnconsumedPolicy::Warn {
            for k in new {
                log_first_sighting(&id, &k);
            }
        }
    }

    /// One shard: its entries in journal order, each retried until it is processed (or shutdown).
    async fn worker(
        self,
        rt: Runtime,
        mut rx: mpsc::Receiver<(JournalEntry, Option<JournalRecord>)>,
        done: mpsc::UnboundedSender<u64>,
    ) {
        loop {
            // Entries still queued at shutdown stay after the cursor and are offered again.
            let (entry, record) = tokio::select! {
                biased;
                _ = rt.shutdown.cancelled() => return,
                e = rx.recv() => match e {
                    Some(e) => e,
                    None => return,
                },
            };
            let seq = entry.seq;
            // The dispatcher's read serves the first attempt; a retry reads the journal again.
            let mut record = record;
            loop {
                match self.process(&rt, entry, record.take()).await {
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, seq, "pipeline step failed; retrying");
                        tokio::select! {
                            _ = rt.shutdown.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        }
                    }
                }
            }
            let _ = done.send(seq);
        }
    }

    /// Re-queues quarantined messages with the later messages of their senders and patients
    /// behind them ([`tributary_storage::with_followers`]): a quarantined admission mapped
    /// after the update that followed it would leave its older data in place.
    async fn requeue(&self, rt: &Runtime, quarantined: Vec<(MessageId, i64, StateRecord)>) {
        let count = quarantined.len();
        let set = match tributary_storage::with_followers(rt.journal.as_ref(), quarantined, None) {
            Ok(set) => set,
            Err(e) => {
                tracing::warn!(error = %e, "re-queue failed");
                return;
            }
        };
        tracing::info!(
            count,
            followers = set.followers,
            "re-queueing quarantined messages"
        );
        let ids: Vec<MessageId> = set.messages.iter().map(|(id, _, _)| *id).collect();
        if let Err(e) = rt.journal.replay(&ids).await {
            tracing::warn!(error = %e, "re-queue failed");
        }
    }

    /// Checks the mapping directory now; on a new good version, re-queues quarantined messages.
    pub async fn reload_and_requeue(&self, rt: &Runtime) -> ReloadOutcome {
        let outcome = self.registry.reload();
        self.after_reload(rt, outcome).await
    }

    async fn after_reload(&self, rt: &Runtime, outcome: ReloadOutcome) -> ReloadOutcome {
        match &outcome {
            ReloadOutcome::Unchanged => {}
            ReloadOutcome::Settling => {
                tracing::debug!("mapping directory changed; loading it once it stays the same");
            }
            ReloadOutcome::Reloaded { from, to } => {
                tracing::info!(%from, %to, "mapping set reloaded");
                let filter = tributary_storage::ListFilter {
                    states: vec![StateKind::Failed],
                    ..Default::default()
                };
                if let Ok(list) = rt.journal.list(&filter) {
                    let quarantined: Vec<_> = list
                        .into_iter()
                        .filter(|(_, _, st)| {
                            st.state
                                .reason()
                                .is_some_and(|r| r.starts_with("quarantined:"))
                        })
                        .collect();
                    if !quarantined.is_empty() {
                        self.requeue(rt, quarantined).await;
                    }
                }
            }
            ReloadOutcome::Failed { errors } => {
                // file:line:col and the bad path or element: no message content involved
                tracing::error!(
                    kept = %self.registry.current().version,
                    errors = %errors,
                    "mapping set change rejected; the previous version keeps running"
                );
            }
        }
        outcome
    }

    /// Processes everything queued after the cursor (one batch); returns how many entries.
    pub async fn step(&self, rt: &Runtime) -> Result<usize, PipelineError> {
        let cursor = rt.journal.cursor(CONSUMER)?;
        let entries = rt.journal.entries_after(cursor, 512)?;
        let Some(last) = entries.last().map(|e| e.seq) else {
            return Ok(0);
        };
        let n = entries.len();
        // Shard by ordering key: one key's messages go to one worker, in journal order.
        let workers = self.config.workers.max(1);
        let mut shards: Vec<Vec<(JournalEntry, Option<JournalRecord>)>> = vec![Vec::new(); workers];
        for e in entries {
            let Some(record) = rt.journal.get(e.id)? else {
                continue;
            };
            let shard = shard_of(&record.envelope.ordering_key, workers);
            shards[shard].push((e, queued(record)));
        }
        let mut set = tokio::task::JoinSet::new();
        for shard in shards.into_iter().filter(|s| !s.is_empty()) {
            let this = self.clone();
            let rt = rt.clone();
            set.spawn(async move {
                for (e, record) in shard {
                    this.process(&rt, e, record).await?;
                }
                Ok::<_, PipelineError>(())
            });
        }
        let mut result = Ok(());
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(join) => tracing::error!(error = %join, "pipeline worker panicked"),
            }
        }
        result?;
        rt.journal.set_cursor(CONSUMER, last).await?;
        Ok(n)
    }

    /// Maps and commits one journal entry; counts the outcome for `/metrics`. `record` is the
    /// entry's journal record when the caller has just read it (otherwise it is read here).
    ///
    /// A panic while mapping (a bug, in a mapping or in this crate) does not stop the worker:
    /// the message fails with [`PANIC_REASON`] and the next one is taken.
    pub async fn process(
        &self,
        rt: &Runtime,
        entry: JournalEntry,
        record: Option<JournalRecord>,
    ) -> Result<Outcome, PipelineError> {
        // Unwind safety: a panicking attempt leaves nothing of its own behind (its commit is
        // one atomic write, done or not); the message is read again below.
        let attempt = AssertUnwindSafe(self.map_and_commit(rt, entry, record))
            .catch_unwind()
            .await;
        let out = match attempt {
            Ok(out) => out,
            Err(_) => self.fail_after_panic(rt, entry).await,
        };
        let outcome = match &out {
            Ok(Outcome::Committed { .. }) => "committed",
            Ok(Outcome::Failed { .. }) => "failed",
            Ok(Outcome::Split { .. }) => "split",
            Ok(Outcome::Skipped) => "skipped",
            Err(_) => "error",
        };
        rt.metrics
            .inc("tributary_pipeline_messages_total", &[("outcome", outcome)]);
        out
    }

    /// Marks a message failed with [`PANIC_REASON`] after mapping it panicked, unless it was
    /// committed before the panic or queued again since.
    async fn fail_after_panic(
        &self,
        rt: &Runtime,
        entry: JournalEntry,
    ) -> Result<Outcome, PipelineError> {
        let Some(record) = rt.journal.get(entry.id)? else {
            return Ok(Outcome::Skipped);
        };
        if record.state.state != MessageState::Received || record.state.seq != Some(entry.seq) {
            return Ok(Outcome::Skipped);
        }
        let env = &record.envelope;
        tracing::error!(message_id = %env.id, seq = entry.seq, "panic while mapping a message; marked failed");
        let version = match env.protocol {
            Protocol::Fhir => fhir::VERSION.to_string(),
            _ => self.registry.current().version.clone(),
        };
        self.fail(rt, env, entry.seq, PANIC_REASON.to_string(), &version)
            .await
    }

    async fn map_and_commit(
        &self,
        rt: &Runtime,
        entry: JournalEntry,
        record: Option<JournalRecord>,
    ) -> Result<Outcome, PipelineError> {
        let record = match record {
            Some(r) => r,
            None => match rt.journal.get(entry.id)? {
                Some(r) => r,
                None => return Ok(Outcome::Skipped),
            },
        };
        // Stale queue entry (replayed since) or already processed: nothing to do.
        if record.state.state != MessageState::Received || record.state.seq != Some(entry.seq) {
            return Ok(Outcome::Skipped);
        }
        let env = &record.envelope;
        #[cfg(test)]
        if env.payload.starts_with(tests::PANIC_IN_MAPPING) {
            panic!("test: a bug in mapping");
        }
        #[cfg(test)]
        if let (true, Some(gate)) = (env.payload.starts_with(tests::HOLD_IN_MAPPING), &self.hold) {
            if let Ok(permit) = gate.acquire().await {
                permit.forget();
            }
        }
        match env.protocol {
            // a batch file (replayed after it was refused whole) is split, not mapped
            Protocol::Hl7v2 if tributary_hl7v2::ingress::starts_as_batch(&env.payload) => {
                return self.split_batch(rt, entry, env).await
            }
            Protocol::Hl7v2 => {}
            Protocol::Fhir => return self.pass_through(rt, entry, env).await,
            _ => return Ok(Outcome::Skipped),
        }
        // One version maps the whole message, even if a reload happens meanwhile.
        let set = self.registry.current();
        let version = set.version.clone();
        let opts = RunOptions {
            tenant: env.tenant.as_str(),
            lineage: false,
            feed: Some(env.partner.as_str()),
        };
        let mut mapped = match set.map_bytes(&env.payload, tributary_terminology::builtin(), &opts)
        {
            Ok(m) => m,
            Err(e) => return self.fail(rt, env, entry.seq, e.to_string(), &version).await,
        };
        for w in &mapped.warnings {
            tracing::warn!(message_id = %env.id, warning = %w, "mapping warning");
        }
        // Nothing is dropped silently: source fields no rule read, and values a rule read but the
        // output had to leave out (a Period end before its start), both go by the feed's policy.
        if !mapped.unconsumed.is_empty() || !mapped.dropped.is_empty() {
            let (what, list) = report(&mapped);
            match self.config.unconsumed_for(env.partner.as_str()) {
                // counted (and logged when new) once the message is committed, below
                UnconsumedPolicy::Warn => {}
                UnconsumedPolicy::Quarantine => {
                    self.observe_fields(env, &mapped);
                    let reason = format!(
                        "quarantined: {what} in {} (mapping set {version}): {list}",
                        mapped.message_map
                    );
                    return self.fail(rt, env, entry.seq, reason, &version).await;
                }
                UnconsumedPolicy::Reject => {
                    self.observe_fields(env, &mapped);
                    let reason = format!(
                        "rejected: {what} in {} (mapping set {version}): {list}",
                        mapped.message_map
                    );
                    return self.fail(rt, env, entry.seq, reason, &version).await;
                }
            }
        }
        if let Err(reason) = check_bundle(&mapped) {
            return self
                .fail(
                    rt,
                    env,
                    entry.seq,
                    format!("{}: {reason}", mapped.message_map),
                    &version,
                )
                .await;
        }
        let patient = mapped.patient_id().map(str::to_string);
        let writes: Vec<ResourceWrite> = mapped
            .take_resources()
            .into_iter()
            .filter_map(|r| {
                let (rtype, id) = (r.resource_type, r.id.clone());
                Some(match r.write {
                    Write::Replace => {
                        ResourceWrite::upsert_body(rtype, &id, Arc::new(body::MappedBody(r)))
                    }
                    Write::Merge => ResourceWrite::merge(rtype, &id, r.into_value()),
                    Write::Amend => {
                        let mut w = ResourceWrite::merge(rtype, &id, r.into_value());
                        w.precondition = Precondition::IfStored;
                        w
                    }
                    Write::Delete => ResourceWrite::delete(rtype, &id),
                    // never built into an entry; nothing to write either way
                    Write::None => return None,
                })
            })
            .collect();
        let event_type = message_event_type(&mapped.message_type);
        let event = OutboxEvent {
            seq: 0,
            // stable per message: a replay raises the same event id, so consumers de-duplicate
            event_id: deterministic_id(&[env.tenant.as_str(), "message", &env.id.to_string()]),
            tenant: env.tenant.to_string(),
            event_type,
            resource_type: None,
            resource_id: None,
            version: None,
            patient_id: patient,
            other_patients: Vec::new(),
            source_message: Some(env.id.to_string()),
            mapping_version: Some(version.clone()),
            occurred_at: env.received_at,
            resource: None,
        };
        let resources = writes.len();
        let Some(changed) = self
            .commit_message(rt, entry, env, writes, vec![event], &version)
            .await?
        else {
            return Ok(Outcome::Skipped);
        };
        if self.config.unconsumed_for(env.partner.as_str()) == UnconsumedPolicy::Warn {
            self.observe_fields(env, &mapped);
        }
        Ok(Outcome::Committed {
            resources,
            changed,
            unconsumed: mapped.unconsumed.len(),
            dropped: mapped.dropped.len(),
        })
    }

    /// Commits a message's resources and events with its `committed` state in one write; the
    /// number of resources that changed, or `None` when the message moved on meanwhile (a
    /// concurrent replay: its new queue entry maps it).
    async fn commit_message(
        &self,
        rt: &Runtime,
        entry: JournalEntry,
        env: &tributary_core::Envelope,
        writes: Vec<ResourceWrite>,
        events: Vec<OutboxEvent>,
        version: &str,
    ) -> Result<Option<usize>, PipelineError> {
        let resources = writes.len();
        let outcome = rt
            .store
            .commit(StoreTransaction {
                tenant: env.tenant.to_string(),
                writes,
                events,
                message: Some(MessageUpdate {
                    id: env.id,
                    state: MessageState::Committed,
                    mapping_version: Some(version.to_string()),
                    seq: Some(entry.seq),
                }),
            })
            .await;
        match outcome {
            Ok(o) => {
                let changed = o.writes.iter().filter(|w| w.changed).count();
                tracing::debug!(message_id = %env.id, resources, changed, version, "committed");
                self.announce(env.id, ProcessedOutcome::Committed);
                Ok(Some(changed))
            }
            Err(StorageError::State(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// A FHIR message: its resources (and the deletions it reports), normalised by
    /// [`fhir::normalise`], committed with the message state like a mapped HL7 v2 message's; one
    /// that cannot be stored fails with the reason.
    async fn pass_through(
        &self,
        rt: &Runtime,
        entry: JournalEntry,
        env: &tributary_core::Envelope,
    ) -> Result<Outcome, PipelineError> {
        let version = fhir::VERSION;
        let resources =
            match fhir::normalise(env.tenant.as_str(), env.partner.as_str(), &env.payload) {
                Ok(r) => r,
                Err(reason) => return self.fail(rt, env, entry.seq, reason, version).await,
            };
        let writes: Vec<ResourceWrite> = resources
            .into_iter()
            .map(|c| match c.resource {
                Some(r) => ResourceWrite::upsert(&c.resource_type, &c.id, r),
                None => ResourceWrite::delete(&c.resource_type, &c.id),
            })
            .collect();
        let resources = writes.len();
        let Some(changed) = self
            .commit_message(rt, entry, env, writes, Vec::new(), version)
            .await?
        else {
            return Ok(Outcome::Skipped);
        };
        Ok(Outcome::Committed {
            resources,
            changed,
            unconsumed: 0,
            dropped: 0,
        })
    }

    /// Records the failure with its reason, unless the message was queued again meanwhile
    /// (see [`MessageUpdate::seq`]).
    async fn fail(
        &self,
        rt: &Runtime,
        env: &tributary_core::Envelope,
        seq: u64,
        reason: String,
        version: &str,
    ) -> Result<Outcome, PipelineError> {
        let id = env.id;
        tracing::warn!(message_id = %id, %reason, "message failed");
        rt.store
            .commit(StoreTransaction {
                tenant: env.tenant.to_string(),
                message: Some(MessageUpdate {
                    id,
                    state: MessageState::Failed {
                        reason: reason.clone(),
                    },
                    mapping_version: Some(version.to_string()),
                    seq: Some(seq),
                }),
                ..Default::default()
            })
            .await?;
        self.announce(
            id,
            ProcessedOutcome::Failed {
                reason: reason.clone(),
            },
        );
        Ok(Outcome::Failed { reason })
    }
}

/// The first time this process (or the stored report) sees a field: one WARN line naming it.
fn log_first_sighting(message: &str, k: &FieldKey) {
    match k.kind {
        FieldKind::Unconsumed => tracing::warn!(
            message_id = %message,
            tenant = %k.tenant,
            feed = %k.feed,
            message_map = %k.message_map,
            field = %k.path,
            "source field no rule consumed (first sighting; further ones are summarized \
             periodically and counted in `tributary mapping report`)"
        ),
        FieldKind::LeftOut => tracing::warn!(
            message_id = %message,
            tenant = %k.tenant,
            feed = %k.feed,
            message_map = %k.message_map,
            field = %k.path,
            reason = %k.reason,
            "source value left out of the output (first sighting; further ones are summarized \
             periodically and counted in `tributary mapping report`)"
        ),
    }
}

/// The event type of a mapped message: `hl7v2.<message code, lower case>.<trigger event as
/// HL7 writes it>`, e.g. `ADT^A01` → `hl7v2.adt.A01`, `ORU^R01` → `hl7v2.oru.R01`. Characters
/// a topic or routing key cannot carry are dropped (Kafka allows `[A-Za-z0-9._-]`).
pub fn message_event_type(message_type: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
            .collect()
    };
    let mut parts = message_type.split('^');
    let code = clean(parts.next().unwrap_or("")).to_ascii_lowercase();
    let trigger = clean(parts.next().unwrap_or(""));
    match (code.is_empty(), trigger.is_empty()) {
        (true, _) => "hl7v2.unknown".into(),
        (false, true) => format!("hl7v2.{code}"),
        (false, false) => format!("hl7v2.{code}.{trigger}"),
    }
}

/// What a message's report holds, and the list: `1 source field(s) no rule consumed`, `1 source
/// value(s) left out of the output`, or both; paths and reasons only, never values.
fn report(m: &MappedBundle) -> (String, String) {
    let (u, d) = (m.unconsumed.len(), m.dropped.len());
    let consumed = format!("{u} source field(s) no rule consumed");
    let left_out = format!("{d} source value(s) left out of the output");
    match (u, d) {
        (_, 0) => (consumed, summarize(&m.unconsumed)),
        (0, _) => (left_out, summarize(&m.dropped)),
        _ => (
            format!("{consumed}; {left_out}"),
            format!("{}; {}", summarize(&m.unconsumed), summarize(&m.dropped)),
        ),
    }
}

fn summarize<T: std::fmt::Display>(paths: &[T]) -> String {
    let mut s = paths
        .iter()
        .take(50)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if paths.len() > 50 {
        s.push_str(&format!(", … ({} more)", paths.len() - 50));
    }
    s
}

/// Validates the output before anything is committed: one entry per resource, and every
/// element FHIR R4 requires of each resource present (a required source field that was empty
/// would otherwise commit an invalid resource and send it to every subscriber).
fn check_bundle(m: &MappedBundle) -> Result<(), String> {
    let mut seen: HashSet<(&str, &str)> = HashSet::new();
    for (t, id) in m.entries() {
        if !seen.insert((t, id)) {
            return Err(format!("two entries for {t} {id}"));
        }
    }
    let missing = m.missing_required();
    if !missing.is_empty() {
        return Err(format!(
            "not valid FHIR R4: required element(s) missing: {}",
            missing.join("; ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_core::Envelope;
    use tributary_storage::{Db, DbOptions};

    fn runtime(dir: &std::path::Path) -> Runtime {
        Runtime::embedded(Db::open(dir, DbOptions::default()).unwrap(), 0)
    }

    async fn journal(rt: &Runtime, ordering_key: &str) -> u64 {
        let env = Envelope::builder(Protocol::Hl7v2, b"MSH|^~\\&|".to_vec())
            .tenant("t1")
            .partner("riverside")
            .ordering_key(ordering_key)
            .build();
        rt.journal.append(env).await.unwrap().seq.unwrap()
    }

    /// An ordering key whose messages go to `shard` of two.
    fn key_for(shard: usize) -> String {
        (0..)
            .map(|i| format!("riverside/MRN{i}"))
            .find(|k| shard_of(k, 2) == shard)
            .unwrap()
    }

    /// A payload that makes mapping panic (the test seam in `map_and_commit`).
    pub(super) const PANIC_IN_MAPPING: &[u8] = b"TEST-PANIC-IN-MAPPING";

    fn repo() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    async fn journal_payload(rt: &Runtime, payload: Vec<u8>) -> (MessageId, u64) {
        let env = Envelope::builder(Protocol::Hl7v2, payload)
            .tenant("t1")
            .partner("riverside")
            .ordering_key("riverside/MRN70001")
            .build();
        let r = rt.journal.append(env).await.unwrap();
        (r.id, r.seq.unwrap())
    }

    #[tokio::test]
    async fn a_panic_while_mapping_fails_that_message_and_its_shard_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(dir.path());
        let registry = MappingRegistry::load(&repo().join("mappings/hl7v2")).expect("loads");
        let p = Pipeline::new(
            Arc::new(registry),
            MappingConfig {
                workers: 1,
                ..Default::default()
            },
        );
        let adt = std::fs::read(repo().join("mappings/hl7v2/messages/ADT_A01.hl7")).unwrap();
        // One ordering key: the message after the panicking one waits on the same worker.
        let (bad, _) = journal_payload(&rt, PANIC_IN_MAPPING.to_vec()).await;
        let (good, last) = journal_payload(&rt, adt).await;
        let running = tokio::spawn(p.clone().run(rt.clone()));
        let deadline = Instant::now() + Duration::from_secs(30);
        let state = |id| rt.journal.get(id).unwrap().unwrap().state.state;
        while state(bad) == MessageState::Received || state(good) == MessageState::Received {
            assert!(Instant::now() < deadline, "messages not processed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        rt.shutdown.cancel();
        running.await.unwrap().unwrap();
        assert_eq!(
            state(bad),
            MessageState::Failed {
                reason: PANIC_REASON.into()
            }
        );
        assert_eq!(state(good), MessageState::Committed);
        assert_eq!(rt.journal.cursor(CONSUMER).unwrap(), last);
    }

    /// A payload whose mapping waits for a permit of `Pipeline::hold` (the test seam in
    /// `map_and_commit`) and then fails (it is no HL7 v2): one key's slow or stuck mapping.
    pub(super) const HOLD_IN_MAPPING: &[u8] = b"TEST-HOLD-IN-MAPPING";

    async fn journal_as(rt: &Runtime, ordering_key: &str, payload: Vec<u8>) -> (MessageId, u64) {
        let env = Envelope::builder(Protocol::Hl7v2, payload)
            .tenant("t1")
            .partner("riverside")
            .ordering_key(ordering_key)
            .build();
        let r = rt.journal.append(env).await.unwrap();
        (r.id, r.seq.unwrap())
    }

    /// One key's mapping is stuck while more of its messages wait than its worker's queue holds:
    /// the other shard's messages are still dispatched and committed, the cursor stays before the
    /// stuck key's messages, and after a restart those are processed, each key in journal order.
    #[tokio::test]
    async fn a_stuck_key_holds_back_only_its_own_shard_and_the_cursor_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(dir.path());
        let registry = MappingRegistry::load(&repo().join("mappings/hl7v2")).expect("loads");
        let feed = ProcessedFeed::default();
        let mut processed = feed.subscribe();
        let mut p = Pipeline::new(
            Arc::new(registry),
            MappingConfig {
                workers: 2,
                ..Default::default()
            },
        )
        .with_feed(feed);
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        p.hold = Some(gate.clone());
        let adt = std::fs::read(repo().join("mappings/hl7v2/messages/ADT_A01.hl7")).unwrap();
        let (stuck, other) = (key_for(0), key_for(1));
        // The stuck message, more of its key than its worker's queue holds, then another key's.
        let mut stuck_ids = vec![journal_as(&rt, &stuck, HOLD_IN_MAPPING.to_vec()).await];
        for _ in 0..SHARD_QUEUE + 8 {
            stuck_ids.push(journal_as(&rt, &stuck, adt.clone()).await);
        }
        let mut other_ids = Vec::new();
        for _ in 0..8 {
            other_ids.push(journal_as(&rt, &other, adt.clone()).await);
        }
        let state = |rt: &Runtime, id| rt.journal.get(id).unwrap().unwrap().state.state;

        let running = tokio::spawn(p.clone().run(rt.clone()));
        let deadline = Instant::now() + Duration::from_secs(30);
        while other_ids
            .iter()
            .any(|(id, _)| state(&rt, *id) == MessageState::Received)
        {
            assert!(
                Instant::now() < deadline,
                "the other key's messages starve behind the stuck key"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (id, _) in &other_ids {
            assert_eq!(state(&rt, *id), MessageState::Committed);
        }
        for (id, _) in &stuck_ids {
            assert_eq!(state(&rt, *id), MessageState::Received, "the key is stuck");
        }
        assert!(rt.journal.cursor(CONSUMER).unwrap() < stuck_ids[0].1);
        // An operator sees the shard's backlog, and what waits for its queue (the dispatcher
        // moves one entry into it once the worker took the stuck message).
        let backlog = format!(
            "tributary_pipeline_shard_backlog{{shard=\"0\"}} {}",
            stuck_ids.len()
        );
        let overflow = format!(
            "tributary_pipeline_dispatch_overflow {}",
            stuck_ids.len() - 1 - SHARD_QUEUE
        );
        loop {
            let metrics = rt.metrics.render(Vec::new());
            let has = |want: &str| metrics.lines().any(|l| l == want);
            if has(&backlog) && has(&overflow) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{backlog}, {overflow}:\n{metrics}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // Shut down while the key is stuck: its worker finishes the message it holds (let go
        // now); the rest of the key stays after the cursor, though later entries are done.
        rt.shutdown.cancel();
        gate.add_permits(1);
        running.await.unwrap().unwrap();
        assert_eq!(rt.journal.cursor(CONSUMER).unwrap(), stuck_ids[0].1);
        assert!(matches!(
            state(&rt, stuck_ids[0].0),
            MessageState::Failed { .. }
        ));
        for (id, _) in &stuck_ids[1..] {
            assert_eq!(state(&rt, *id), MessageState::Received);
        }

        // A restart hands them out again.
        let rt = Runtime {
            shutdown: tokio_util::sync::CancellationToken::new(),
            ..rt
        };
        p.hold = None;
        let running = tokio::spawn(p.clone().run(rt.clone()));
        let deadline = Instant::now() + Duration::from_secs(30);
        while stuck_ids
            .iter()
            .any(|(id, _)| state(&rt, *id) == MessageState::Received)
        {
            assert!(
                Instant::now() < deadline,
                "the stuck key's messages not processed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        rt.shutdown.cancel();
        running.await.unwrap().unwrap();
        for (id, _) in &stuck_ids[1..] {
            assert_eq!(state(&rt, *id), MessageState::Committed);
        }
        assert_eq!(
            rt.journal.cursor(CONSUMER).unwrap(),
            other_ids.last().unwrap().1
        );
        // Each key's messages were processed once each, in journal order.
        let order: Vec<MessageId> = std::iter::from_fn(|| processed.try_recv().ok())
            .map(|p| p.id)
            .collect();
        for ids in [&stuck_ids, &other_ids] {
            let want: Vec<MessageId> = ids.iter().map(|(id, _)| *id).collect();
            let got: Vec<MessageId> = order
                .iter()
                .filter(|id| want.contains(id))
                .copied()
                .collect();
            assert_eq!(got, want);
        }
        assert_eq!(order.len(), stuck_ids.len() + other_ids.len());
    }

    #[tokio::test]
    async fn entries_a_stopped_worker_held_are_handed_out_again_and_no_others() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(dir.path());
        let (zero, one) = (key_for(0), key_for(1));
        let a = journal(&rt, &zero).await;
        let b = journal(&rt, &one).await;
        let c = journal(&rt, &zero).await;
        let (tx0, mut rx0) = mpsc::channel(SHARD_QUEUE);
        let (tx1, rx1) = mpsc::channel(SHARD_QUEUE);
        let mut dispatch = Dispatch::new(0, 2);
        let journal = rt.journal.as_ref();
        assert_eq!(dispatch.fill(journal, &[tx0.clone(), tx1]), None);
        // Worker 1 stops with entry b still queued for it.
        drop(rx1);
        dispatch.forget_shard(1);
        assert!(dispatch.done_through() < b);
        let (tx1, mut rx1) = mpsc::channel(SHARD_QUEUE);
        assert_eq!(dispatch.fill(journal, &[tx0, tx1]), None);
        assert_eq!(rx1.try_recv().unwrap().0.seq, b);
        assert!(rx1.try_recv().is_err());
        let to_zero: Vec<u64> =
            std::iter::from_fn(|| rx0.try_recv().ok().map(|(e, _)| e.seq)).collect();
        assert_eq!(to_zero, vec![a, c], "nothing sent twice to the live worker");
        for seq in [a, b, c] {
            dispatch.done(seq);
        }
        assert_eq!(dispatch.done_through(), c);
    }

    #[tokio::test]
    async fn an_entry_a_worker_did_not_take_is_never_passed_by_the_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(dir.path());
        let (live, gone) = (key_for(0), key_for(1));
        let first = journal(&rt, &live).await;
        let refused = journal(&rt, &gone).await;
        let last = journal(&rt, &live).await;
        let (live_tx, mut live_rx) = mpsc::channel(SHARD_QUEUE);
        let (gone_tx, gone_rx) = mpsc::channel(SHARD_QUEUE);
        drop(gone_rx); // that worker has returned (shutdown) or died
        let mut dispatch = Dispatch::new(0, 2);
        let stopped = dispatch.fill(rt.journal.as_ref(), &[live_tx.clone(), gone_tx]);
        assert_eq!(stopped, Some(1));
        // The live worker processes everything it was handed: the gone one does not hold it up.
        let mut processed = Vec::new();
        while let Ok((e, _)) = live_rx.try_recv() {
            processed.push(e.seq);
            dispatch.done(e.seq);
        }
        assert_eq!(processed, vec![first, last]);
        assert!(
            dispatch.done_through() < refused,
            "the cursor may go to {} past entry {refused}, which no worker took",
            dispatch.done_through()
        );
        assert_eq!(dispatch.done_through(), first);
        // A worker taking entries again gets the refused entry, and nothing is sent twice.
        let (again_tx, mut again_rx) = mpsc::channel(SHARD_QUEUE);
        let stopped = dispatch.fill(rt.journal.as_ref(), &[live_tx, again_tx]);
        assert_eq!(stopped, None);
        assert_eq!(again_rx.try_recv().unwrap().0.seq, refused);
        assert!(again_rx.try_recv().is_err());
        assert!(live_rx.try_recv().is_err());
        assert_eq!(dispatch.done_through(), first);
        dispatch.done(refused);
        assert_eq!(dispatch.done_through(), last);
    }

    fn received(rx: &mut mpsc::Receiver<Queued>) -> Vec<u64> {
        std::iter::from_fn(|| rx.try_recv().ok().map(|(e, _)| e.seq)).collect()
    }

    /// Takes a shard's entries one at a time, as its worker would, reporting each done and
    /// letting the dispatcher refill the queue; the order they arrived in.
    fn work_off(
        dispatch: &mut Dispatch,
        journal: &dyn Journal,
        shards: &mut [(ShardSender, mpsc::Receiver<Queued>)],
        shard: usize,
    ) -> Vec<u64> {
        let senders: Vec<ShardSender> = shards.iter().map(|(tx, _)| tx.clone()).collect();
        let mut order = Vec::new();
        while let Ok((e, _)) = shards[shard].1.try_recv() {
            order.push(e.seq);
            dispatch.done(e.seq);
            assert_eq!(dispatch.fill(journal, &senders), None);
        }
        order
    }

    type Shards = Vec<(ShardSender, mpsc::Receiver<Queued>)>;

    /// A dispatcher over two shards whose worker 0 has room for one queued entry and worker 1
    /// for a full queue.
    fn shard_zero_holds_one() -> (Shards, Vec<ShardSender>, Dispatch) {
        let shards = vec![mpsc::channel(1), mpsc::channel(SHARD_QUEUE)];
        let senders = shards.iter().map(|(tx, _)| tx.clone()).collect();
        (shards, senders, Dispatch::new(0, 2))
    }

    #[tokio::test]
    async fn a_full_shard_queue_holds_back_only_its_own_entries_and_keeps_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(dir.path());
        let jr = rt.journal.as_ref();
        let (zero, one) = (key_for(0), key_for(1));
        let a = journal(&rt, &zero).await;
        let b = journal(&rt, &zero).await;
        let c = journal(&rt, &zero).await;
        let x = journal(&rt, &one).await;
        let d = journal(&rt, &zero).await;
        let y = journal(&rt, &one).await;
        // Worker 0 is stuck: its queue holds one entry and it takes none.
        let (mut shards, senders, mut dispatch) = shard_zero_holds_one();
        assert_eq!(dispatch.fill(jr, &senders), None);
        assert_eq!(
            received(&mut shards[1].1),
            vec![x, y],
            "shard 1 is fed past shard 0's entries"
        );
        assert_eq!(dispatch.overflowed, 3);
        for seq in [x, y] {
            dispatch.done(seq);
        }
        assert_eq!(
            dispatch.done_through(),
            a - 1,
            "the cursor waits for shard 0's entries"
        );
        let stats = dispatch.stats.clone();
        assert_eq!(stats.backlog[0].load(Ordering::Relaxed), 4);
        assert_eq!(stats.backlog[1].load(Ordering::Relaxed), 0);
        assert_eq!(stats.overflow.load(Ordering::Relaxed), 3);
        // A pass while it is still stuck sends nothing twice and loses nothing.
        assert_eq!(dispatch.fill(jr, &senders), None);
        assert_eq!(dispatch.overflowed, 3);
        // Worker 0 goes on: its entries arrive in journal order.
        assert_eq!(
            work_off(&mut dispatch, jr, &mut shards, 0),
            vec![a, b, c, d]
        );
        assert_eq!(dispatch.done_through(), y);
        assert_eq!(stats.backlog[0].load(Ordering::Relaxed), 0);
        assert_eq!(stats.overflow.load(Ordering::Relaxed), 0);
    }

    /// The worker takes an entry while the dispatcher reads (after it handed the overflow on):
    /// the entry read then still queues behind its shard's overflow.
    #[tokio::test]
    async fn an_entry_read_while_its_shard_has_overflow_queues_behind_it() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(dir.path());
        let zero = key_for(0);
        let a = journal(&rt, &zero).await;
        let b = journal(&rt, &zero).await;
        let (mut shards, senders, mut dispatch) = shard_zero_holds_one();
        assert_eq!(dispatch.fill(rt.journal.as_ref(), &senders), None);
        assert_eq!(dispatch.overflowed, 1, "b waits");
        let c = journal(&rt, &zero).await;
        // Worker 0 takes a: its queue has room, b still waits in the overflow.
        assert_eq!(shards[0].1.try_recv().unwrap().0.seq, a);
        dispatch.done(a);
        dispatch.more = true;
        assert_eq!(dispatch.read_on(rt.journal.as_ref(), &senders), None);
        assert_eq!(dispatch.overflowed, 2, "c queues behind b");
        let jr = rt.journal.as_ref();
        assert_eq!(dispatch.fill(jr, &senders), None);
        assert_eq!(work_off(&mut dispatch, jr, &mut shards, 0), vec![b, c]);
    }

    #[tokio::test]
    async fn a_full_overflow_stops_reading_before_the_entry_that_does_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(dir.path());
        let jr = rt.journal.as_ref();
        let (zero, one) = (key_for(0), key_for(1));
        let a = journal(&rt, &zero).await;
        let b = journal(&rt, &zero).await;
        let c = journal(&rt, &zero).await;
        let d = journal(&rt, &zero).await;
        let x = journal(&rt, &one).await;
        let (mut shards, senders, mut dispatch) = shard_zero_holds_one();
        dispatch.overflow_max = 2;
        for _ in 0..2 {
            assert_eq!(dispatch.fill(jr, &senders), None);
            assert!(dispatch.waiting);
            assert_eq!(dispatch.overflowed, 2);
            assert_eq!(dispatch.position, c, "d was not taken");
            assert!(shards[1].1.try_recv().is_err(), "nothing is read past d");
        }
        assert_eq!(dispatch.done_through(), a - 1);
        // Worker 0 takes one: d fits, and the entries after it are read again.
        let (e, _) = shards[0].1.try_recv().unwrap();
        assert_eq!(e.seq, a);
        dispatch.done(a);
        assert_eq!(dispatch.fill(jr, &senders), None);
        assert!(!dispatch.waiting);
        assert_eq!(received(&mut shards[1].1), vec![x]);
        dispatch.done(x);
        assert_eq!(work_off(&mut dispatch, jr, &mut shards, 0), vec![b, c, d]);
        assert_eq!(dispatch.done_through(), x);
    }

    #[tokio::test]
    async fn entries_waiting_in_the_overflow_of_a_stopped_worker_are_handed_out_again_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(dir.path());
        let jr = rt.journal.as_ref();
        let zero = key_for(0);
        let a = journal(&rt, &zero).await;
        let b = journal(&rt, &zero).await;
        let c = journal(&rt, &zero).await;
        let (tx0, rx0) = mpsc::channel(1);
        let (tx1, _rx1) = mpsc::channel(SHARD_QUEUE);
        let mut dispatch = Dispatch::new(0, 2);
        assert_eq!(dispatch.fill(jr, &[tx0, tx1.clone()]), None);
        assert_eq!(dispatch.overflowed, 2);
        // Worker 0 stops with a queued and b, c waiting for it.
        drop(rx0);
        dispatch.forget_shard(0);
        assert_eq!(dispatch.overflowed, 0);
        assert_eq!(dispatch.stats.overflow.load(Ordering::Relaxed), 0);
        assert_eq!(dispatch.done_through(), a - 1);
        let (tx0, mut rx0) = mpsc::channel(SHARD_QUEUE);
        assert_eq!(dispatch.fill(jr, &[tx0, tx1]), None);
        assert_eq!(received(&mut rx0), vec![a, b, c]);
        assert_eq!(dispatch.stats.backlog[0].load(Ordering::Relaxed), 3);
    }

    #[test]
    fn event_type_keeps_the_trigger_event_as_hl7_writes_it() {
        assert_eq!(message_event_type("ADT^A01"), "hl7v2.adt.A01");
        assert_eq!(message_event_type("ORU^R01"), "hl7v2.oru.R01");
        assert_eq!(message_event_type("adt^a08"), "hl7v2.adt.a08");
        assert_eq!(message_event_type("ADT^"), "hl7v2.adt");
        assert_eq!(message_event_type("^A01"), "hl7v2.unknown");
        assert_eq!(message_event_type("AD T^A 0/1"), "hl7v2.adt.A01");
    }
}
