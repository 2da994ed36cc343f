//! The audit log's own files: append-only segments written by one thread with group commit.
//!
//! **Why not the fjall store.** Every facade request appends a record that must be durable
//! before the response. In fjall those records filled memtables whose flushes and compactions
//! wrote and fsynced large tables; the small group `fdatasync` of the next requests queued
//! behind them on the disk, which set the facade's tail latency (docs/PERFORMANCE.md). Here an
//! append is one `write` and one `fdatasync` of a few KiB, and nothing else writes in bulk.
//!
//! Layout of `<data dir>/audit/`:
//! - `<first seq, 20 digits>.seg`: one stored entry per line (JSON never holds a raw newline),
//!   in sequence order. A segment is sealed once it reaches the size limit (or retention seals
//!   it); the next one is created empty right away.
//! - `head`: sequence number (u64 BE) and hash of the newest record, rewritten after every
//!   group (synced at shutdown). It is what tells a truncated log from a short one.
//! - `anchor`: where the chain starts after retention (see `audit.rs`), replaced atomically.
//! - `<first seq, 20 digits>.idx`: a sealed segment's index ([`crate::audit_index`]); the open
//!   segment's index is held in memory and rebuilt from the segment when the log is opened.
//! - `<first seq, 20 digits>.<offset>.torn`: evidence — the tail of a segment cut at open because
//!   it did not link (a group torn by a power cut before its fdatasync; see `AuditWriter::open`).

use crate::audit::{entry_hash, AuditAnchor, PreparedRecord};
use crate::audit_index::{self as idx, Index, SidecarWriter};
use crate::committer::{CommitStats, SLOW_COMMIT};
use crate::db::{Table, Tables};
use crate::keys;
use crate::{Result, StorageError};
use std::io::{BufRead, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

const HEAD_FILE: &str = "head";
const ANCHOR_FILE: &str = "anchor";
/// Meta key of the fjall-held index of earlier versions (cleared once).
const OLD_INDEXED_THROUGH: &[u8] = b"audit_indexed_through";
/// Jobs waiting for the writer before appenders wait.
const QUEUE_BOUND: usize = 16_384;
/// Most records gathered into one write and fdatasync.
const MAX_GROUP: usize = 4096;

pub(crate) fn dir_of(data_dir: &Path) -> PathBuf {
    data_dir.join("audit")
}

fn seg_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.seg"))
}

/// Segment files in sequence order, as (first sequence number, path).
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    list_with_extension(dir, "seg")
}

/// Files named `<u64>.<ext>` in sequence order, as (number, path).
pub(crate) fn list_with_extension(dir: &Path, ext: &str) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e.into()),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(first) = name
            .to_str()
            .and_then(|n| n.strip_suffix(ext)?.strip_suffix('.'))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((first, entry.path()));
    }
    out.sort();
    Ok(out)
}

/// Segments that hold records after `anchor`: a segment whose successor starts at or before
/// the anchor's next record was pruned (a prune interrupted before deleting its file).
pub(crate) fn live_segments(
    dir: &Path,
    anchor: Option<AuditAnchor>,
) -> Result<Vec<(u64, PathBuf)>> {
    let all = list_segments(dir)?;
    let floor = anchor.map_or(0, |a| a.seq) + 1;
    let keep_from = all
        .iter()
        .rposition(|(first, _)| *first <= floor)
        .unwrap_or(0);
    Ok(all.into_iter().skip(keep_from).collect())
}

fn encode_pair(seq: u64, hash: &[u8; 32]) -> [u8; 40] {
    let mut out = [0u8; 40];
    out[..8].copy_from_slice(&keys::u64_be(seq));
    out[8..].copy_from_slice(hash);
    out
}

/// A stored (seq, hash) pair; `short_is_none`: a file shorter than a pair reads as no pair.
fn read_pair(path: &Path, what: &'static str, short_is_none: bool) -> Result<Option<AuditAnchor>> {
    match std::fs::read(path) {
        Ok(b) if b.len() == 40 => Ok(Some(AuditAnchor {
            seq: keys::read_u64(&b).unwrap_or(0),
            hash: b[8..40].try_into().expect("32 bytes"),
        })),
        Ok(b) if short_is_none && b.len() < 40 => Ok(None),
        Ok(_) => Err(StorageError::corrupt(what, "not seq + sha256")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The newest record's sequence number and hash, as of the last completed group.
///
/// The head is rewritten without a sync, so a power cut can leave it empty or cut short (a
/// file created, its bytes never written back): that is no witness, like a missing head — the
/// head only ever lags the data, so the log itself says how long it is.
pub(crate) fn read_head(dir: &Path) -> Result<Option<AuditAnchor>> {
    read_pair(&dir.join(HEAD_FILE), "audit head", true)
}

/// Writes the chain head (seq and hash of the newest record) without syncing it.
pub(crate) fn write_head_file(dir: &Path, head: AuditAnchor) -> Result<()> {
    std::fs::write(dir.join(HEAD_FILE), encode_pair(head.seq, &head.hash))?;
    Ok(())
}

pub(crate) fn read_anchor(dir: &Path) -> Result<Option<AuditAnchor>> {
    // replaced atomically and durably: anything but a whole pair is damage
    read_pair(&dir.join(ANCHOR_FILE), "audit anchor", false)
}

/// Replaces the anchor atomically and durably (temp file, fsync, rename, fsync the directory).
pub(crate) fn write_anchor(dir: &Path, anchor: AuditAnchor) -> Result<()> {
    let tmp = dir.join("anchor.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&encode_pair(anchor.seq, &anchor.hash))?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(ANCHOR_FILE))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// The sequence number a stored line claims, read from its prefix without parsing the line
/// (tampered lines need not be valid JSON).
pub(crate) fn line_seq(line: &[u8]) -> Option<u64> {
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// Calls `f(offset, line)` for each complete line of a segment (without its newline), in file
/// order; `f` returns `false` to stop. A last line still being written is not complete.
///
/// Retention zeroes the pruned front of a segment it does not delete whole (see
/// [`zero_prefix`]). Lines before the first record numbered above `floor` (the anchor) are that
/// debris and are skipped — also when a crash left the zeroing half done. After it, every line
/// is passed on as stored, so an edited record still reaches `verify`.
pub(crate) fn for_each_line(
    path: &Path,
    floor: u64,
    mut f: impl FnMut(u64, &[u8]) -> Result<bool>,
) -> Result<bool> {
    let file = std::fs::File::open(path)?;
    let mut reader = std::io::BufReader::with_capacity(1 << 16, file);
    let mut line = Vec::with_capacity(1024);
    let mut offset = 0u64;
    let mut started = false;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            return Ok(true);
        }
        let mut text = &line[..n - 1];
        let mut at = offset;
        if !started {
            if let Some(nul) = text.iter().rposition(|b| *b == 0) {
                text = &text[nul + 1..];
                at += nul as u64 + 1;
            }
            started = line_seq(text).is_some_and(|s| s > floor);
        }
        if started && !f(at, text)? {
            return Ok(false);
        }
        offset += n as u64;
    }
}

/// (bytes up to and with the last newline, file length): what follows the last newline is a
/// line a crash cut short.
fn complete_len(path: &Path) -> Result<(u64, u64)> {
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let mut buf = vec![0u8; 1 << 16];
    let mut hi = len;
    while hi > 0 {
        let lo = hi.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(hi - lo) as usize];
        file.read_exact_at(chunk, lo)?;
        if let Some(i) = chunk.iter().rposition(|b| *b == b'\n') {
            return Ok((lo + i as u64 + 1, len));
        }
        hi = lo;
    }
    Ok((0, len))
}

/// The last complete line of a segment (without its newline and any zeroed debris before it).
fn last_line(path: &Path) -> Result<Option<Vec<u8>>> {
    let (end, _) = complete_len(path)?;
    if end == 0 {
        return Ok(None);
    }
    let file = std::fs::File::open(path)?;
    let body_end = end - 1;
    let mut start = body_end;
    let mut buf = vec![0u8; 1 << 16];
    while start > 0 {
        let lo = start.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(start - lo) as usize];
        file.read_exact_at(chunk, lo)?;
        if let Some(i) = chunk.iter().rposition(|b| *b == b'\n') {
            start = lo + i as u64 + 1;
            break;
        }
        start = lo;
    }
    let mut line = vec![0u8; (body_end - start) as usize];
    file.read_exact_at(&mut line, start)?;
    if let Some(nul) = line.iter().rposition(|b| *b == 0) {
        line.drain(..=nul);
    }
    Ok(Some(line))
}

/// The hex `prev` a stored line claims, read from its prefix like [`line_seq`].
fn line_prev(line: &[u8]) -> Option<&[u8]> {
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let digits = rest.iter().position(|b| !b.is_ascii_digit())?;
    let rest = rest[digits..].strip_prefix(b",\"prev\":\"")?;
    let hash = rest.get(..64)?;
    rest.get(64).filter(|b| **b == b'"').map(|_| hash)
}

/// How far a segment's records link up: each claims the next sequence number and the hash of
/// the one before.
struct Links {
    /// Sequence number and hash of the last record that links.
    last: Option<(u64, [u8; 32])>,
    /// Where the first record that does not link starts, if one does not.
    broken_at: Option<u64>,
    /// The sequence number the first record that does not link should have had.
    expected: u64,
}

/// Walks a segment's records from `expected` on; `prev` is the hash the first one must
/// name, when it is known. A record written only in part (a power cut before its group's
/// fdatasync leaves unwritten blocks as zeros) is not whole JSON and breaks the walk.
fn walk_links(path: &Path, floor: u64, expected: u64, prev: Option<[u8; 32]>) -> Result<Links> {
    let mut links = Links {
        last: None,
        broken_at: None,
        expected,
    };
    let mut prev = prev;
    for_each_line(path, floor, |offset, line| {
        let whole = !line.contains(&0) && line.ends_with(b"}");
        let linked = whole
            && line_seq(line) == Some(links.expected)
            && match (&prev, line_prev(line)) {
                (Some(p), Some(claimed)) => claimed == hex::encode(p).as_bytes(),
                (None, Some(_)) => true,
                (_, None) => false,
            };
        if !linked {
            links.broken_at = Some(offset);
            return Ok(false);
        }
        let hash = entry_hash(line)?;
        links.last = Some((links.expected, hash));
        prev = Some(hash);
        links.expected += 1;
        Ok(true)
    })?;
    Ok(links)
}

/// Moves the bytes of a segment from `at` on to an evidence file beside it
/// (`<first seq>.<offset>.torn`, synced), then cuts the segment there.
fn cut_to_evidence(dir: &Path, first: u64, path: &Path, at: u64) -> Result<u64> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let len = file.metadata()?.len();
    let mut bytes = vec![0u8; (len - at) as usize];
    file.read_exact_at(&mut bytes, at)?;
    let evidence = dir.join(format!("{first:020}.{at}.torn"));
    let mut out = std::fs::File::create(&evidence)?;
    out.write_all(&bytes)?;
    out.sync_all()?;
    sync_dir(dir)?;
    file.set_len(at)?;
    file.sync_all()?;
    Ok(len - at)
}

/// Overwrites `[0, end)` of a segment with zeros and syncs it: retention's deletion of the
/// records at the front of a segment that still holds newer ones. Offsets of the records kept
/// do not move, so the index stays valid.
pub(crate) fn zero_prefix(path: &Path, end: u64) -> Result<()> {
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let zeros = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < end {
        let n = (end - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    file.sync_data()?;
    Ok(())
}

/// The line that starts at `offset` in a segment (without its newline), if it is complete.
pub(crate) fn line_at(file: &std::fs::File, offset: u64) -> Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; 4096];
    let mut have = 0usize;
    loop {
        let n = file.read_at(&mut buf[have..], offset + have as u64)?;
        if n == 0 {
            return Ok(None);
        }
        if let Some(end) = buf[have..have + n].iter().position(|b| *b == b'\n') {
            buf.truncate(have + end);
            return Ok(Some(buf));
        }
        have += n;
        if have == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
    }
}

/// Creates the log's directory; the first time, moves the records of the fjall keyspace that
/// held the log in earlier versions into it.
pub(crate) fn prepare_dir(
    data_dir: &Path,
    db: &fjall::Database,
    tables: &Tables,
) -> Result<PathBuf> {
    let dir = dir_of(data_dir);
    std::fs::create_dir_all(&dir)?;
    if list_segments(&dir)?.is_empty() {
        crate::audit::migrate_from_keyspace(&dir, db, tables)?;
    }
    clear_old_index(db, tables)?;
    Ok(dir)
}

/// Versions before the sidecars kept the index in two fjall keyspaces; they are derived data,
/// so they are dropped (the sidecars are built from the segments at open).
fn clear_old_index(db: &fjall::Database, tables: &Tables) -> Result<()> {
    let meta = tables.get(Table::Meta);
    if meta.get(OLD_INDEXED_THROUGH)?.is_none() {
        return Ok(());
    }
    crate::audit::clear_keyspaces(db, tables, &[Table::AuditIdxTime, Table::AuditIdxPatient])?;
    let mut batch = db.batch();
    batch.remove(meta, OLD_INDEXED_THROUGH);
    batch.commit()?;
    Ok(())
}

type Appends = Vec<(Vec<PreparedRecord>, oneshot::Sender<Result<Vec<u64>>>)>;

enum Job {
    Append(Vec<PreparedRecord>, oneshot::Sender<Result<Vec<u64>>>),
    /// Test and forensics hook: replace or remove the stored line of a record.
    Tamper(u64, Option<Vec<u8>>, oneshot::Sender<Result<()>>),
}

/// The one writer of a data directory's audit segments.
pub(crate) struct AuditWriter {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    stats: Arc<CommitStats>,
    index: Arc<Index>,
}

struct Active {
    file: std::fs::File,
    first: u64,
    len: u64,
}

struct State {
    dir: PathBuf,
    index: Arc<Index>,
    sidecars: SidecarWriter,
    segment_bytes: u64,
    active: Active,
    seq: u64,
    head: [u8; 32],
    head_file: std::fs::File,
    sync: bool,
    /// `jobs` counts records.
    stats: Arc<CommitStats>,
}

impl AuditWriter {
    /// Opens the log in `data_dir/audit` (prepared by [`prepare_dir`]), checks its tail against
    /// the head and the sidecars, builds the index (missing sidecars, the open segment's memory
    /// part) and starts the writer thread.
    pub(crate) fn open(data_dir: &Path, segment_bytes: u64, sync: bool) -> Result<Self> {
        let dir = dir_of(data_dir);
        let anchor = read_anchor(&dir)?;
        let mut segments = live_segments(&dir, anchor)?;
        // Leftovers of an interrupted prune, deleted only on the word of an anchor the chain
        // confirms (the newest retention record names it): an anchor edited or restored from
        // another copy must not delete records. Rare, so the whole chain is walked then.
        let leftovers: Vec<(u64, PathBuf)> = list_segments(&dir)?
            .into_iter()
            .filter(|(first, _)| !segments.iter().any(|(f, _)| f == first))
            .collect();
        if !leftovers.is_empty() {
            if let Err(e) = crate::audit::verify_once(&dir)? {
                return Err(StorageError::corrupt(
                    "audit",
                    format!("segments left by an interrupted prune were kept: the chain does not confirm the retention anchor (record {}: {}); run `tributary audit verify`", e.seq, e.reason),
                ));
            }
            for (_, path) in leftovers {
                std::fs::remove_file(path)?;
            }
        }
        let floor = anchor.map_or(0, |a| a.seq);
        let (mut seq, mut head) = anchor.map_or((0, [0u8; 32]), |a| (a.seq, a.hash));
        // The head and the sidecars are written only after their records are durable: they
        // are witnesses of how long the log was at least.
        let head_witness = read_head(&dir)?;
        let witnessed = head_witness
            .map_or(0, |h| h.seq)
            .max(idx::sealed_through(&dir)?);
        // The newest record: the last one of the newest segment holding one that links to the
        // records before it. A line a crash cut short was never acknowledged and is cut off.
        // So is a torn group: written with one write, power lost before its fdatasync, it can
        // leave whole lines, then zeros (blocks never written back), then whole lines again.
        // Nothing from its first break on was acknowledged — if that break lies after every
        // witness — so those bytes go to an evidence file and the chain goes on before them.
        for (i, (first, path)) in segments.iter().enumerate().rev() {
            let (end, file_len) = complete_len(path)?;
            if file_len > end {
                let f = std::fs::OpenOptions::new().write(true).open(path)?;
                f.set_len(end)?;
                f.sync_all()?;
            }
            let expected = (*first).max(floor + 1);
            let prev = if expected == floor + 1 {
                Some(head)
            } else if i > 0 {
                last_line(&segments[i - 1].1)?
                    .map(|l| entry_hash(&l))
                    .transpose()?
            } else {
                None
            };
            let links = walk_links(path, floor, expected, prev)?;
            if let Some(at) = links.broken_at {
                if links.expected <= witnessed {
                    return Err(StorageError::corrupt(
                        "audit",
                        format!("record {} does not link to the one before it, and the chain head or an index file shows the log reached {witnessed}; run `tributary audit verify`", links.expected),
                    ));
                }
                // Nothing of the segment links: from its start (a torn group that opened the
                // segment may begin with zeros), unless retention zeroed its front.
                let at = if links.last.is_none() && expected == *first {
                    0
                } else {
                    at
                };
                let moved = cut_to_evidence(&dir, *first, path, at)?;
                tracing::warn!(
                    segment = *first,
                    from_record = links.expected,
                    bytes = moved,
                    "audit segment ended in a torn write (power lost before its sync): the unacknowledged tail was moved to a .torn evidence file"
                );
            }
            if let Some((s, h)) = links.last {
                (seq, head) = (s, h);
                break;
            }
        }
        if witnessed > seq {
            return Err(StorageError::corrupt(
                "audit",
                format!("the chain head or an index file names record {witnessed} but the log ends at {seq}: records were removed from the end; run `tributary audit verify`"),
            ));
        }
        if segments.is_empty() {
            let path = seg_path(&dir, seq + 1);
            std::fs::File::create(&path)?;
            sync_dir(&dir)?;
            segments.push((seq + 1, path));
        }
        let (first, path) = segments.last().cloned().expect("one segment at least");
        let file = std::fs::OpenOptions::new().write(true).open(&path)?;
        let len = file.metadata()?.len();
        let head_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(HEAD_FILE))?;
        let index = Arc::new(Index::default());
        build_index(&dir, &segments, anchor.map_or(0, |a| a.seq), &index)?;
        let mut state = State {
            dir: dir.clone(),
            sidecars: SidecarWriter::start(dir.clone(), index.clone())?,
            index: index.clone(),
            segment_bytes: segment_bytes.max(1),
            active: Active { file, first, len },
            seq,
            head,
            head_file,
            sync,
            stats: Arc::new(CommitStats::default()),
        };
        let stats = state.stats.clone();
        state.write_head()?;
        if head_witness.is_none() {
            // A new (or empty) head is made durable once, with its directory entry, so that a
            // power cut cannot leave it short again before a clean shutdown syncs it.
            state.head_file.sync_all()?;
            sync_dir(&dir)?;
        }
        let (tx, rx) = mpsc::channel(QUEUE_BOUND);
        let thread = std::thread::Builder::new()
            .name("tributary-audit".into())
            .spawn(move || state.run(rx))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            stats,
            index,
        })
    }

    pub(crate) fn index(&self) -> &Index {
        &self.index
    }

    async fn send<R>(&self, job: impl FnOnce(oneshot::Sender<Result<R>>) -> Job) -> Result<R> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .as_ref()
            .expect("sender lives as long as the writer")
            .send(job(reply))
            .await
            .map_err(|_| StorageError::CommitterStopped)?;
        rx.await.map_err(|_| StorageError::CommitterStopped)?
    }

    pub(crate) fn stats(&self) -> &CommitStats {
        &self.stats
    }

    /// Appends records in order; resolves once they are durable.
    pub(crate) async fn append(&self, records: Vec<PreparedRecord>) -> Result<Vec<u64>> {
        self.send(|r| Job::Append(records, r)).await
    }

    pub(crate) async fn tamper(&self, seq: u64, replacement: Option<Vec<u8>>) -> Result<()> {
        self.send(|r| Job::Tamper(seq, replacement, r)).await
    }
}

impl Drop for AuditWriter {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl State {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        while let Some(first) = rx.blocking_recv() {
            let mut appends = Vec::new();
            let mut records = 0usize;
            let mut next = Some(first);
            while let Some(job) = next.take() {
                match job {
                    Job::Append(recs, reply) => {
                        records += recs.len();
                        appends.push((recs, reply));
                    }
                    other => {
                        // Everything queued before it is written first.
                        self.commit(std::mem::take(&mut appends));
                        self.control(other);
                    }
                }
                if records < MAX_GROUP {
                    next = rx.try_recv().ok();
                }
            }
            self.commit(appends);
        }
        let _ = self.head_file.sync_all();
    }

    fn control(&mut self, job: Job) {
        match job {
            Job::Append(..) => unreachable!("appends are grouped"),
            Job::Tamper(seq, replacement, reply) => {
                let _ = reply.send(self.tamper(seq, replacement));
            }
        }
    }

    /// Writes one group: every record's line in one write, one fdatasync, then the head and
    /// the index; only then are the appenders answered.
    fn commit(&mut self, appends: Appends) {
        if appends.is_empty() {
            return;
        }
        let (seq0, head0) = (self.seq, self.head);
        let mut buf = Vec::with_capacity(appends.len() * 600);
        let mut index = Vec::with_capacity(appends.len() * 2);
        let mut replies = Vec::with_capacity(appends.len());
        for (recs, reply) in appends {
            let mut seqs = Vec::with_capacity(recs.len());
            for r in recs {
                self.seq += 1;
                let offset = self.active.len + buf.len() as u64;
                let bytes = r.entry_bytes(self.seq, &self.head);
                self.head = entry_hash(&bytes).expect("sha256");
                buf.extend_from_slice(&bytes);
                buf.push(b'\n');
                r.index_keys().push(self.seq, offset, &mut index);
                seqs.push(self.seq);
            }
            replies.push((reply, seqs));
        }
        let started = std::time::Instant::now();
        let written = self.write_group(&buf);
        if started.elapsed() >= SLOW_COMMIT {
            self.stats.slow.fetch_add(1, Ordering::Relaxed);
        }
        self.stats.groups.fetch_add(1, Ordering::Relaxed);
        let outcome = match written {
            Ok(()) => {
                self.stats
                    .jobs
                    .fetch_add(self.seq - seq0, Ordering::Relaxed);
                self.active.len += buf.len() as u64;
                if let Err(e) = self.write_head() {
                    tracing::warn!(error = %e, "audit head not updated; verify re-checks it after the next group");
                }
                self.index.add(self.active.first, index);
                if self.active.len >= self.segment_bytes {
                    if let Err(e) = self.start_segment() {
                        tracing::error!(error = %e, "audit segment not rotated; appending to the full one");
                    }
                }
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "audit group write failed; every record in it is refused");
                // Nothing of the group may stay behind to be chained onto later.
                let _ = self.active.file.set_len(self.active.len);
                self.seq = seq0;
                self.head = head0;
                Some(e.to_string())
            }
        };
        for (reply, seqs) in replies {
            let _ = reply.send(match &outcome {
                None => Ok(seqs),
                Some(e) => Err(StorageError::Io(std::io::Error::other(e.clone()))),
            });
        }
    }

    fn write_group(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.active.file.write_all_at(buf, self.active.len)?;
        if self.sync {
            // fdatasync: the bytes and the file size, not the timestamps.
            self.active.file.sync_data()?;
        }
        Ok(())
    }

    fn write_head(&mut self) -> Result<()> {
        self.head_file
            .write_all_at(&encode_pair(self.seq, &self.head), 0)?;
        Ok(())
    }

    fn start_segment(&mut self) -> Result<()> {
        let path = seg_path(&self.dir, self.seq + 1);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        sync_dir(&self.dir)?;
        let len = file.metadata()?.len();
        let sealed = std::mem::replace(
            &mut self.active,
            Active {
                file,
                first: self.seq + 1,
                len,
            },
        );
        self.sidecars.seal(sealed.first, self.seq);
        Ok(())
    }

    fn tamper(&mut self, seq: u64, replacement: Option<Vec<u8>>) -> Result<()> {
        let segments = list_segments(&self.dir)?;
        let Some((first, path)) = segments.iter().rev().find(|(f, _)| *f <= seq).cloned() else {
            return Ok(());
        };
        let mut content = Vec::new();
        std::fs::File::open(&path)?.read_to_end(&mut content)?;
        let lines: Vec<&[u8]> = content.split_inclusive(|b| *b == b'\n').collect();
        let claims = |i: usize| {
            lines.get(i).and_then(|l| {
                let l = l.strip_suffix(b"\n").unwrap_or(l);
                line_seq(&l[l.iter().rposition(|b| *b == 0).map_or(0, |n| n + 1)..])
            }) == Some(seq)
        };
        // The record's slot: its place in the segment if the line there still claims it (a
        // swap writes two lines that claim one number), else the line that does.
        let slot = (seq - first) as usize;
        let slot = if claims(slot) {
            slot
        } else {
            (0..lines.len()).find(|i| claims(*i)).unwrap_or(slot)
        };
        let mut out = Vec::with_capacity(content.len());
        for (i, line) in lines.iter().enumerate() {
            if i == slot {
                if let Some(r) = &replacement {
                    out.extend_from_slice(r);
                    out.push(b'\n');
                }
            } else {
                out.extend_from_slice(line);
            }
        }
        std::fs::write(&path, &out)?;
        if first == self.active.first {
            self.active.file = std::fs::OpenOptions::new().write(true).open(&path)?;
            self.active.len = out.len() as u64;
        }
        Ok(())
    }
}

/// The index at open: sidecars that are missing or cut short are written again from their
/// segments, sidecars of pruned segments go, and the open segment's entries are read into
/// memory.
fn build_index(dir: &Path, segments: &[(u64, PathBuf)], floor: u64, index: &Index) -> Result<()> {
    for (first, path) in idx::list_sidecars(dir)? {
        if !segments.iter().any(|(f, _)| *f == first) {
            std::fs::remove_file(path)?;
        }
    }
    for (_, path) in list_with_extension(dir, "idx.tmp")? {
        std::fs::remove_file(path)?;
    }
    let Some(((active, active_path), sealed)) = segments.split_last() else {
        return Ok(());
    };
    let entries_of = |path: &Path| -> Result<(Vec<idx::Entry>, u64)> {
        let mut out = Vec::new();
        let mut last = 0;
        for_each_line(path, floor, |offset, line| {
            let Some(seq) = line_seq(line) else {
                return Ok(true);
            };
            last = seq;
            // A record that does not parse is left out; verify names it.
            if let Ok(entry) = serde_json::from_slice::<crate::AuditEntry>(line) {
                crate::audit::index_keys_of(&entry.body).push(seq, offset, &mut out);
            }
            Ok(true)
        })?;
        Ok((out, last))
    };
    let mut rebuilt = 0usize;
    for (first, path) in sealed {
        if idx::Sidecar::open(&idx::sidecar_path(dir, *first))?.is_none() {
            if rebuilt == 0 {
                // Once, after an upgrade from the fjall-held index, this reads the whole log.
                tracing::info!("writing missing audit index files from their segments");
            }
            let (entries, last) = entries_of(path)?;
            idx::write_sidecar(dir, *first, last, entries)?;
            rebuilt += 1;
        }
    }
    if rebuilt > 0 {
        tracing::info!(segments = rebuilt, "audit index files written");
    }
    let (entries, _) = entries_of(active_path)?;
    index.add(*active, entries);
    Ok(())
}
