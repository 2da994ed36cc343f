//! Group commit: one thread owns every durable write.
//!
//! Callers submit a job (a closure that reads and writes through a [`Txn`]) over a bounded
//! channel. The committer takes the first waiting job, then every job that queued up behind it
//! (up to `max_group`), applies them all to one fjall write batch, and commits that batch with one
//! `fsync`. Only then does any caller's future resolve. With N concurrent writers and a disk whose
//! fsync costs ~4 ms, throughput grows ~N-fold instead of capping at ~250 writes/s.
//!
//! Jobs run one after the other on this thread, so a job sees the writes of the jobs before it in
//! the same group (point reads only) and may keep counters (sequence numbers) without locks.
//! A job that returns an error leaves no writes behind. A job that panics is turned into that
//! job's error ([`StorageError::Internal`]) the same way, with the counters it moved put back:
//! the thread, and every other job of the group, go on.

use crate::db::{Table, Tables};
use crate::{Result, StorageError};
use fjall::{Database, PersistMode};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Longest a group waits for more jobs once it has one (see the gathering loop in `run`).
const GATHER_BUDGET: Duration = Duration::from_micros(400);
const GATHER_POLL: Duration = Duration::from_micros(40);
/// See [`CommitStats::slow`].
pub const SLOW_COMMIT: Duration = Duration::from_millis(10);

type Completion = Box<dyn FnOnce(Option<&str>) + Send>;
type Job = Box<dyn FnOnce(&mut Txn<'_>) -> Completion + Send>;

/// Sequence counters owned by the committer thread; loaded from disk at open.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub journal_seq: u64,
    pub outbox_seq: u64,
    pub dead_letter_seq: u64,
}

/// One map per table: key → latest value (`None` = delete) written by the group so far.
///
/// A group's writes share one fjall sequence number, so only the last write of a key matters;
/// keeping the write set as a map drops overwritten values and lets point reads borrow the key.
type WriteSet = Vec<KeyMap<Option<Vec<u8>>>>;

/// Keys are partly client-chosen (resource ids), so the hasher is seeded, but it is much
/// cheaper than SipHash on the one serial thread.
type KeyMap<V> = HashMap<Vec<u8>, V, foldhash::fast::RandomState>;

/// How many group commits back [`Txn::unwritten_since`] can answer: ~1–3 s of groups under load.
const RECENT_GROUPS: u64 = 256;

/// Which group commit last wrote each recently written key of the tracked tables, so a job can
/// learn that a value read before it was submitted is still current without reading it again
/// (on the one serial thread, a hash lookup instead of a search through fjall's memtables).
struct RecentWrites {
    last_writer: KeyMap<u64>,
    by_group: std::collections::VecDeque<(u64, Vec<Vec<u8>>)>,
    /// Every write of a group numbered above this is in `last_writer`.
    complete_after: u64,
}

impl RecentWrites {
    /// Only the resource table's keys are looked up this way (the store's planned writes).
    const TRACKED: Table = Table::Res;

    fn new() -> Self {
        Self {
            last_writer: KeyMap::default(),
            by_group: Default::default(),
            complete_after: 0,
        }
    }

    fn record(&mut self, group: u64, writes: &WriteSet) {
        let keys: Vec<Vec<u8>> = writes[Self::TRACKED as usize].keys().cloned().collect();
        for key in &keys {
            self.last_writer.insert(key.clone(), group);
        }
        self.by_group.push_back((group, keys));
        while let Some((old, _)) = self.by_group.front() {
            if *old + RECENT_GROUPS > group {
                break;
            }
            let (old, keys) = self.by_group.pop_front().expect("front exists");
            for k in keys {
                if self.last_writer.get(&k) == Some(&old) {
                    self.last_writer.remove(&k);
                }
            }
            self.complete_after = old;
        }
    }
}

/// The write view a job gets: point reads see earlier writes of the same group.
pub struct Txn<'a> {
    tables: &'a Tables,
    recent: &'a RecentWrites,
    pub counters: &'a mut Counters,
    writes: WriteSet,
    /// The running job's writes, kept apart until it succeeds, indexed like `writes` so that
    /// its own point reads are lookups (a 10,000-resource bundle reads and writes each key).
    job: WriteSet,
    /// Whether `job` holds anything (most jobs' maps are all empty at the end).
    job_dirty: bool,
}

impl<'a> Txn<'a> {
    fn new(tables: &'a Tables, recent: &'a RecentWrites, counters: &'a mut Counters) -> Self {
        Self {
            tables,
            recent,
            counters,
            writes: (0..Table::COUNT).map(|_| KeyMap::default()).collect(),
            job: (0..Table::COUNT).map(|_| KeyMap::default()).collect(),
            job_dirty: false,
        }
    }

    pub fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(v) = self.job[table as usize].get(key) {
            return Ok(v.clone());
        }
        if let Some(v) = self.writes[table as usize].get(key) {
            return Ok(v.clone());
        }
        Ok(self.tables.get(table).get(key)?.map(|v| v.to_vec()))
    }

    /// `Some(true)` when no group commit after `group` (see [`Committer::completed_groups`]) and
    /// no earlier job of this group wrote `key`: a value read after that group completed is
    /// still current. `None` when that cannot be told from memory (an untracked table, or a
    /// group too long ago); then read the key.
    pub fn unwritten_since(&self, table: Table, key: &[u8], group: u64) -> Option<bool> {
        if table != RecentWrites::TRACKED || group < self.recent.complete_after {
            return None;
        }
        let pending = self.writes[table as usize].contains_key(key)
            || self.job[table as usize].contains_key(key);
        if pending {
            return Some(false);
        }
        let last = self.recent.last_writer.get(key);
        Some(last.is_none_or(|g| *g <= group))
    }

    pub fn put(&mut self, table: Table, key: Vec<u8>, value: Vec<u8>) {
        self.job[table as usize].insert(key, Some(value));
        self.job_dirty = true;
    }

    pub fn delete(&mut self, table: Table, key: Vec<u8>) {
        self.job[table as usize].insert(key, None);
        self.job_dirty = true;
    }

    /// Moves the job's writes into the group's (`keep`) or drops them; the job's maps keep
    /// their capacity for the next job.
    fn finish_job(&mut self, keep: bool) {
        if !std::mem::take(&mut self.job_dirty) {
            return;
        }
        for (job, group) in self.job.iter_mut().zip(self.writes.iter_mut()) {
            if keep {
                group.extend(job.drain());
            } else {
                job.clear();
            }
        }
    }

    fn into_writes(self) -> WriteSet {
        self.writes
    }
}

/// Counts for the benchmarks: jobs per fsync shows whether group commit works.
#[derive(Debug, Default)]
pub struct CommitStats {
    pub groups: AtomicU64,
    pub jobs: AtomicU64,
    /// Group commits whose write + fsync took at least [`SLOW_COMMIT`]: every caller in such a
    /// group waited that long. fjall's journal rotation (every 64 MB of writes: a new file, its
    /// fsync and the directory's) is the usual cause; these set the tail latency of durable writes.
    pub slow: AtomicU64,
}

pub struct Committer {
    tx: mpsc::Sender<Job>,
    stats: Arc<CommitStats>,
    completed: Arc<AtomicU64>,
}

impl Committer {
    pub(crate) fn start(
        db: Database,
        tables: Tables,
        counters: Counters,
        max_group: usize,
        queue_bound: usize,
        sync: bool,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel::<Job>(queue_bound);
        let stats = Arc::new(CommitStats::default());
        let completed = Arc::new(AtomicU64::new(0));
        let shared = (stats.clone(), completed.clone());
        let handle = std::thread::Builder::new()
            .name("tributary-committer".into())
            .spawn(move || run(db, tables, counters, rx, max_group, sync, shared))?;
        Ok((
            Self {
                tx,
                stats,
                completed,
            },
            handle,
        ))
    }

    /// Number of the last group commit whose writes are applied; read it *before* reading a
    /// value that a job will later check with [`Txn::unwritten_since`].
    pub fn completed_groups(&self) -> u64 {
        self.completed.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> &CommitStats {
        &self.stats
    }

    fn job<R: Send + 'static>(
        f: impl FnOnce(&mut Txn<'_>) -> Result<R> + Send + 'static,
        reply: oneshot::Sender<Result<R>>,
    ) -> Job {
        Box::new(move |txn: &mut Txn<'_>| {
            let counters = txn.counters.clone();
            // The job's writes wait in `job` (dropped below unless it succeeds) and the
            // counters are restored, so nothing a panicking job left half done is kept.
            let res = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(txn))) {
                Ok(res) => res,
                Err(_) => {
                    *txn.counters = counters;
                    tracing::error!(
                        "a storage write panicked; it is refused, the committer goes on"
                    );
                    Err(StorageError::Internal("panic in a storage write"))
                }
            };
            txn.finish_job(res.is_ok());
            Box::new(move |commit_error: Option<&str>| {
                let out = match (res, commit_error) {
                    (Err(e), _) => Err(e),
                    (Ok(_), Some(e)) => Err(StorageError::Io(std::io::Error::other(e.to_string()))),
                    (Ok(r), None) => Ok(r),
                };
                let _ = reply.send(out);
            })
        })
    }

    /// Runs `f` inside the next group; resolves after the group's fsync.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Txn<'_>) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Self::job(f, reply))
            .await
            .map_err(|_| StorageError::CommitterStopped)?;
        rx.await.map_err(|_| StorageError::CommitterStopped)?
    }

    /// [`Committer::run`] for synchronous callers (CLI commands, the crash-test writer threads).
    /// Must not be called from inside a tokio runtime.
    pub fn run_blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Txn<'_>) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .blocking_send(Self::job(f, reply))
            .map_err(|_| StorageError::CommitterStopped)?;
        rx.blocking_recv()
            .map_err(|_| StorageError::CommitterStopped)?
    }
}

fn run(
    db: Database,
    tables: Tables,
    mut counters: Counters,
    mut rx: mpsc::Receiver<Job>,
    max_group: usize,
    sync: bool,
    (stats, completed): (Arc<CommitStats>, Arc<AtomicU64>),
) {
    let mut last_group = 1usize;
    let mut recent = RecentWrites::new();
    let mut group = 0u64;
    while let Some(first) = rx.blocking_recv() {
        let saved = counters.clone();
        let mut completions = Vec::with_capacity(64);
        let writes = {
            let mut txn = Txn::new(&tables, &recent, &mut counters);
            completions.push(first(&mut txn));
            // Adaptive gathering: writers whose previous group just completed need a moment to
            // submit again. When the last group was large (many concurrent writers), wait briefly
            // for about as many jobs instead of committing the first few alone — otherwise the
            // writers split into alternating half-size groups. A lone writer never waits.
            let target = last_group.clamp(1, max_group);
            let deadline = Instant::now() + GATHER_BUDGET;
            while completions.len() < max_group {
                match rx.try_recv() {
                    Ok(job) => completions.push(job(&mut txn)),
                    Err(mpsc::error::TryRecvError::Empty)
                        if completions.len() < target && Instant::now() < deadline =>
                    {
                        std::thread::sleep(GATHER_POLL);
                    }
                    Err(_) => break,
                }
            }
            last_group = completions.len();
            txn.into_writes()
        };
        group += 1;
        recent.record(group, &writes);
        let result = if writes.iter().all(HashMap::is_empty) {
            Ok(())
        } else {
            let mut batch = db.batch();
            for (table, set) in Table::ALL.into_iter().zip(writes) {
                let ks = tables.get(table);
                for (key, value) in set {
                    match value {
                        Some(v) => batch.insert(ks, key, v),
                        None => batch.remove(ks, key),
                    }
                }
            }
            // fdatasync: the journal's bytes and what is needed to read them back (size, block
            // allocation), without the timestamp-only inode updates a full fsync also forces.
            let mode = if sync {
                Some(PersistMode::SyncData)
            } else {
                None
            };
            let started = Instant::now();
            let result = batch.durability(mode).commit();
            if started.elapsed() >= SLOW_COMMIT {
                stats.slow.fetch_add(1, Ordering::Relaxed);
            }
            result
        };
        completed.store(group, Ordering::Release);
        stats.groups.fetch_add(1, Ordering::Relaxed);
        stats
            .jobs
            .fetch_add(completions.len() as u64, Ordering::Relaxed);
        let error = result.err().map(|e| {
            tracing::error!(error = %e, "group commit failed; every write in the group is refused");
            counters = saved;
            e.to_string()
        });
        for done in completions {
            done(error.as_deref());
        }
    }
    if let Err(e) = db.persist(PersistMode::SyncAll) {
        tracing::error!(error = %e, "final persist at shutdown failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Db, DbOptions};

    fn put(db: &Db, table: Table, key: &'static [u8]) {
        db.committer()
            .run_blocking(move |txn| {
                txn.put(table, key.to_vec(), b"v".to_vec());
                Ok(())
            })
            .unwrap();
    }

    fn unwritten(db: &Db, table: Table, key: &'static [u8], group: u64) -> Option<bool> {
        db.committer()
            .run_blocking(move |txn| Ok(txn.unwritten_since(table, key, group)))
            .unwrap()
    }

    #[test]
    fn a_panicking_job_is_refused_alone_and_the_committer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), DbOptions::default()).unwrap();
        let seq_before = db
            .committer()
            .run_blocking(|txn| Ok(txn.counters.journal_seq))
            .unwrap();
        let err = db
            .committer()
            .run_blocking(|txn| -> Result<()> {
                txn.counters.journal_seq += 1;
                txn.put(Table::Meta, b"half".to_vec(), b"done".to_vec());
                panic!("a bug in a storage write");
            })
            .unwrap_err();
        assert!(matches!(err, StorageError::Internal(_)), "{err}");
        // Nothing of it stayed: neither its write nor the counter it moved.
        let (seq_after, half) = db
            .committer()
            .run_blocking(|txn| Ok((txn.counters.journal_seq, txn.get(Table::Meta, b"half")?)))
            .unwrap();
        assert_eq!((seq_after, half), (seq_before, None));
        put(&db, Table::Meta, b"after");
        assert!(db
            .tables()
            .get(Table::Meta)
            .get(b"after")
            .unwrap()
            .is_some());
    }

    #[test]
    fn a_job_reads_its_own_latest_writes_and_a_failed_job_leaves_none() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), DbOptions::default()).unwrap();
        put(&db, Table::Res, b"kept");
        let seen = db
            .committer()
            .run_blocking(|txn| {
                let n = 10_000u32;
                for i in 0..n {
                    txn.put(Table::Res, i.to_be_bytes().to_vec(), b"1".to_vec());
                }
                // as a bundle's commit does: read each key, then write it
                for i in 0..n {
                    let key = i.to_be_bytes();
                    assert_eq!(txn.get(Table::Res, &key)?, Some(b"1".to_vec()));
                    txn.put(Table::Res, key.to_vec(), i.to_string().into_bytes());
                }
                txn.delete(Table::Res, b"kept".to_vec());
                let last = txn.get(Table::Res, &(n - 1).to_be_bytes())?;
                let gone = txn.get(Table::Res, b"kept")?;
                let other_table = txn.get(Table::Meta, &0u32.to_be_bytes())?;
                Ok((last, gone, other_table))
            })
            .unwrap();
        assert_eq!(seen, (Some(b"9999".to_vec()), None, None));
        let res = db.tables().get(Table::Res);
        assert_eq!(res.get(7u32.to_be_bytes()).unwrap().unwrap().to_vec(), b"7");
        assert!(res.get(b"kept").unwrap().is_none());
        // A job that fails leaves none of its writes to the next job of the group or to disk.
        let failed = db.committer().run_blocking(|txn| -> Result<()> {
            txn.put(Table::Res, b"failed".to_vec(), b"v".to_vec());
            Err(StorageError::TooMany("test".into()))
        });
        assert!(failed.is_err());
        let after = db
            .committer()
            .run_blocking(|txn| txn.get(Table::Res, b"failed"))
            .unwrap();
        assert_eq!(after, None);
        assert!(res.get(b"failed").unwrap().is_none());
    }

    #[test]
    fn unwritten_since_tells_whether_a_read_is_still_current() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), DbOptions::default()).unwrap();
        put(&db, Table::Res, b"a");
        let read_at = db.committer().completed_groups();
        assert_eq!(unwritten(&db, Table::Res, b"a", read_at), Some(true));
        assert_eq!(unwritten(&db, Table::Res, b"never", read_at), Some(true));
        assert_eq!(unwritten(&db, Table::Res, b"a", read_at - 1), Some(false));
        put(&db, Table::Res, b"a");
        assert_eq!(unwritten(&db, Table::Res, b"a", read_at), Some(false));
        // Untracked tables are read, not answered from memory.
        assert_eq!(unwritten(&db, Table::Outbox, b"a", read_at), None);
        // An earlier write in the same job or group counts.
        let now = db.committer().completed_groups();
        let same_job = db
            .committer()
            .run_blocking(move |txn| {
                txn.put(Table::Res, b"b".to_vec(), b"v".to_vec());
                Ok(txn.unwritten_since(Table::Res, b"b", now))
            })
            .unwrap();
        assert_eq!(same_job, Some(false));
        // Past the window, the answer is "read it".
        for _ in 0..=RECENT_GROUPS {
            put(&db, Table::Res, b"c");
        }
        let last_c = db.committer().completed_groups();
        assert_eq!(unwritten(&db, Table::Res, b"a", read_at), None);
        assert_eq!(unwritten(&db, Table::Res, b"a", last_c), Some(true));
        assert_eq!(unwritten(&db, Table::Res, b"c", last_c - 1), Some(false));
        assert_eq!(unwritten(&db, Table::Res, b"c", last_c), Some(true));
    }
}
