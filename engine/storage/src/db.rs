use crate::audit_files::AuditWriter;
use crate::committer::{Committer, Counters};
use crate::keys;
use crate::{Result, StorageError};
use fjall::{CompressionType, Database, Keyspace, KeyspaceCreateOptions, Readable};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The keyspaces of the embedded store. One fjall database holds them all, so a write batch
/// spanning resources, outbox and message state is atomic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Table {
    /// message id → postcard(Envelope)
    Msg,
    /// message id → postcard(StateRecord)
    State,
    /// journal seq (u64 BE) → message id: the order consumers read in
    Seq,
    /// dedup key → message id + received_at
    Dedup,
    /// received_at (i64 BE) + message id → payload length: time-range replay and retention
    Time,
    /// consumer name → u64 cursor
    Cursor,
    /// tenant \0 type \0 id → current version (JSON)
    Res,
    /// tenant \0 type \0 id \0 version BE → that version (JSON), once superseded: the current
    /// version is in `Res` only (stores written before that change may hold it here as well)
    ResHist,
    /// tenant \0 type \0 patient id \0 resource id → ()
    IdxPatient,
    /// tenant \0 type \0 system \0 value \0 id → ()
    IdxIdent,
    /// tenant \0 type \0 lastUpdated BE \0 id → ()
    IdxUpdated,
    /// outbox seq (u64 BE) → JSON event
    Outbox,
    /// audit seq (u64 BE) → entry: the audit log of versions before its segment files (read
    /// once, to move it there; see `audit_files`)
    Audit,
    /// the audit index by patient of versions before its sidecar files (cleared once; see
    /// `audit_index`)
    AuditIdxPatient,
    /// the audit index by time of versions before its sidecar files (cleared once)
    AuditIdxTime,
    /// small named values (counters, signing keys' metadata)
    Meta,
    /// dead-letter seq (u64 BE) → JSON {relay, record}: deliveries a relay gave up on
    DeadLetter,
    /// tenant \0 message map \0 message type \0 kind \0 path \0 reason → JSON row: how often
    /// mapping left a source field unconsumed or a value out (see [`crate::FieldReportStore`])
    FieldReport,
    /// `c` \0 consumer → count BE + through BE: how many matching events a numbering consumer
    /// (a Subscription) has numbered and the outbox position it has looked at;
    /// `n` \0 consumer \0 number BE → outbox seq BE: which event got that number
    /// (see [`crate::Numbering`])
    EventNumber,
    /// tenant \0 type \0 parameter \0 value \0 id → (): the string and date search parameters
    /// (`name`, `family` folded by [`tributary_core::fold_search_string`]; `birthdate` as
    /// written), scanned by prefix or range
    IdxString,
}

impl Table {
    pub(crate) const COUNT: usize = Self::ALL.len();
    /// In discriminant order: `Table::ALL[t as usize] == t`.
    pub(crate) const ALL: [Table; 20] = [
        Table::Msg,
        Table::State,
        Table::Seq,
        Table::Dedup,
        Table::Time,
        Table::Cursor,
        Table::Res,
        Table::ResHist,
        Table::IdxPatient,
        Table::IdxIdent,
        Table::IdxUpdated,
        Table::Outbox,
        Table::Audit,
        Table::AuditIdxPatient,
        Table::AuditIdxTime,
        Table::Meta,
        Table::DeadLetter,
        Table::FieldReport,
        Table::EventNumber,
        Table::IdxString,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Table::Msg => "journal_msg",
            Table::State => "journal_state",
            Table::Seq => "journal_seq",
            Table::Dedup => "journal_dedup",
            Table::Time => "journal_time",
            Table::Cursor => "cursors",
            Table::Res => "res_current",
            Table::ResHist => "res_history",
            Table::IdxPatient => "idx_patient",
            Table::IdxIdent => "idx_identifier",
            Table::IdxUpdated => "idx_updated",
            Table::Outbox => "outbox",
            Table::Audit => "audit",
            Table::AuditIdxPatient => "audit_idx_patient",
            Table::AuditIdxTime => "audit_idx_time",
            Table::Meta => "meta",
            Table::DeadLetter => "dead_letters",
            Table::FieldReport => "mapping_field_report",
            Table::EventNumber => "outbox_event_numbers",
            Table::IdxString => "idx_string",
        }
    }
}

#[derive(Clone)]
pub struct Tables(Arc<Vec<Keyspace>>);

impl Tables {
    pub fn get(&self, t: Table) -> &Keyspace {
        &self.0[t as usize]
    }
}

/// Tunables of the embedded store.
#[derive(Clone, Debug)]
pub struct DbOptions {
    /// Most jobs folded into one write batch and fsync.
    pub max_group: usize,
    /// Jobs waiting for the committer before submitters wait (backpressure).
    pub queue_bound: usize,
    /// fsync each group. Only benchmarks of the non-durable path turn this off.
    pub sync: bool,
    /// Size at which an audit segment is sealed and the next one started; retention deletes
    /// whole segments.
    pub audit_segment_bytes: u64,
}

impl Default for DbOptions {
    fn default() -> Self {
        Self {
            max_group: 2048,
            queue_bound: 16_384,
            sync: true,
            audit_segment_bytes: 64 << 20,
        }
    }
}

struct Inner {
    path: PathBuf,
    db: Database,
    tables: Tables,
    committer: Option<Committer>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    options: DbOptions,
    /// Started on first use, so commands that never touch the audit log do not open it.
    audit: std::sync::OnceLock<AuditWriter>,
    audit_dir: std::sync::OnceLock<PathBuf>,
    audit_open: Mutex<()>,
    audit_prune: tokio::sync::Mutex<()>,
}

/// The embedded database: one directory, one fjall instance, one committer thread.
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

impl Db {
    pub fn open(path: impl AsRef<Path>, options: DbOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        std::fs::create_dir_all(&path)?;
        // No lz4 in the write-ahead journal: it ran on the committer thread, the one serial stage
        // of every durable write, and cost more there than the extra bytes cost the fsync.
        // Tables on disk stay compressed (flush and compaction run on fjall's workers).
        let db = Database::builder(&path)
            .journal_compression(CompressionType::None)
            .open()
            .map_err(|e| match e {
                fjall::Error::Locked => StorageError::InUse(path.clone()),
                e => e.into(),
            })?;
        let mut spaces = Vec::with_capacity(Table::ALL.len());
        for t in Table::ALL {
            spaces.push(db.keyspace(t.name(), KeyspaceCreateOptions::default)?);
        }
        let tables = Tables(Arc::new(spaces));
        crate::store::build_new_indexes(&db, &tables)?;
        let counters = load_counters(&tables)?;
        let (committer, thread) = Committer::start(
            db.clone(),
            tables.clone(),
            counters,
            options.max_group.max(1),
            options.queue_bound.max(1),
            options.sync,
        )?;
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                db,
                tables,
                committer: Some(committer),
                thread: Mutex::new(Some(thread)),
                options,
                audit: std::sync::OnceLock::new(),
                audit_dir: std::sync::OnceLock::new(),
                audit_open: Mutex::new(()),
                audit_prune: tokio::sync::Mutex::new(()),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// A consumer's position stored under `key` in the cursor table (0 when none is stored).
    pub(crate) fn cursor(&self, key: &[u8]) -> Result<u64> {
        Ok(self
            .tables()
            .get(Table::Cursor)
            .get(key)?
            .and_then(|v| crate::keys::read_u64(&v))
            .unwrap_or(0))
    }

    /// Stores a consumer's position under `key`, durably, through the committer.
    pub(crate) async fn set_cursor(&self, key: Vec<u8>, seq: u64) -> Result<()> {
        self.committer()
            .run(move |txn| {
                txn.put(Table::Cursor, key, crate::keys::u64_be(seq).to_vec());
                Ok(())
            })
            .await
    }

    pub fn committer(&self) -> &Committer {
        self.inner
            .committer
            .as_ref()
            .expect("committer lives as long as the Db")
    }

    /// The audit log's directory, moved over from an older layout on first use.
    pub(crate) fn audit_dir(&self) -> Result<&Path> {
        let inner = &self.inner;
        init_once(&inner.audit_dir, &inner.audit_open, || {
            crate::audit_files::prepare_dir(&inner.path, &inner.db, &inner.tables)
        })
        .map(PathBuf::as_path)
    }

    /// The audit log's writer, opened (and its index caught up) on first use.
    pub(crate) fn audit_writer(&self) -> Result<&AuditWriter> {
        self.audit_dir()?;
        let inner = &self.inner;
        init_once(&inner.audit, &inner.audit_open, || {
            AuditWriter::open(
                &inner.path,
                inner.options.audit_segment_bytes,
                inner.options.sync,
            )
        })
    }

    pub(crate) fn open_audit_writer(&self) -> Option<&AuditWriter> {
        self.inner.audit.get()
    }

    /// Held by a retention run, so two never plan over the same segments.
    pub(crate) fn audit_prune_lock(&self) -> &tokio::sync::Mutex<()> {
        &self.inner.audit_prune
    }

    /// A consistent read view: sees whole group commits only.
    pub(crate) fn snapshot(&self) -> fjall::Snapshot {
        self.inner.db.snapshot()
    }

    /// A range scan that sees whole group commits only. fjall's `Keyspace::range` and `prefix`
    /// read at the newest sequence number, so a scan racing a group commit could see some of its
    /// keys and not others — an ordered consumer (outbox relay, journal queue) would then move its
    /// cursor past keys that appear a moment later.
    pub(crate) fn range<K: AsRef<[u8]>, R: std::ops::RangeBounds<K>>(
        &self,
        t: Table,
        r: R,
    ) -> fjall::Iter {
        self.snapshot().range(self.tables().get(t), r)
    }

    /// [`Db::range`] for a key prefix.
    pub(crate) fn prefix<K: AsRef<[u8]>>(&self, t: Table, p: K) -> fjall::Iter {
        self.snapshot().prefix(self.tables().get(t), p)
    }

    /// The highest sequence number in a table keyed by big-endian `u64`s (0 when empty).
    pub(crate) fn last_seq(&self, t: Table) -> u64 {
        last_u64_key(self.tables().get(t)).unwrap_or(0)
    }

    pub(crate) fn tables(&self) -> &Tables {
        &self.inner.tables
    }

    /// Bytes on disk (the store and the audit segments), for `/metrics`.
    pub fn disk_space(&self) -> u64 {
        let audit: u64 = std::fs::read_dir(crate::audit_files::dir_of(&self.inner.path))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum();
        self.inner.db.disk_space().unwrap_or(0) + audit
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        drop(self.audit.take());
        // The committer thread exits once every sender is gone; wait so the last group is synced.
        drop(self.committer.take());
        if let Some(handle) = self.thread.lock().ok().and_then(|mut h| h.take()) {
            let _ = handle.join();
        }
    }
}

/// `cell`'s value, made by `make` under `lock` the first time; a failure leaves it unset.
fn init_once<'a, T>(
    cell: &'a std::sync::OnceLock<T>,
    lock: &Mutex<()>,
    make: impl FnOnce() -> Result<T>,
) -> Result<&'a T> {
    if let Some(v) = cell.get() {
        return Ok(v);
    }
    let _once = lock.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(v) = cell.get() {
        return Ok(v);
    }
    let v = make()?;
    Ok(cell.get_or_init(|| v))
}

fn last_u64_key(ks: &Keyspace) -> Result<u64> {
    match ks.last_key_value() {
        Some(guard) => Ok(keys::read_u64(&guard.key()?).unwrap_or(0)),
        None => Ok(0),
    }
}

fn load_counters(tables: &Tables) -> Result<Counters> {
    let mut c = Counters {
        journal_seq: last_u64_key(tables.get(Table::Seq))?,
        outbox_seq: last_u64_key(tables.get(Table::Outbox))?,
        dead_letter_seq: last_u64_key(tables.get(Table::DeadLetter))?,
    };
    // Sequence numbers never go backwards, even after retention pruned the newest-but-one range.
    if let Some(v) = tables.get(Table::Meta).get(b"journal_seq_floor")? {
        c.journal_seq = c.journal_seq.max(keys::read_u64(&v).unwrap_or(0));
    }
    if let Some(v) = tables.get(Table::Meta).get(b"outbox_seq_floor")? {
        c.outbox_seq = c.outbox_seq.max(keys::read_u64(&v).unwrap_or(0));
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::Table;

    #[test]
    fn all_is_in_discriminant_order() {
        for (i, t) in Table::ALL.into_iter().enumerate() {
            assert_eq!(t as usize, i, "{t:?}");
        }
    }
}
