//! The audit log's index, kept beside its segments instead of in the fjall store.
//!
//! **Why not fjall.** Every facade request appends an audit record. With two index keys per
//! record in fjall, a read-only load kept filling memtables that were flushed and compacted,
//! and that work — CPU on two cores, writes queued ahead of the log's `fdatasync` — was the
//! larger part of the facade's fixed-rate tail latency (docs/PERFORMANCE.md). Here the open
//! segment's index is memory only, rebuilt from the segment when the log is opened, and a
//! sealed segment's index is written once, sorted, to `<first seq, 20 digits>.idx` by a
//! helper thread. The log's writer does nothing for the index but push a few entries.
//!
//! An entry is (key, time, seq, offset): `key` is a hash of the tenant (the time index) or of
//! the tenant and patient (the patient index), so every entry has one size and a sidecar is
//! binary-searched in place. Two tenants or patients may share a hash; readers compare the
//! record's own `tenant` and `patient`. A sidecar's header also names the segment's last
//! record: a witness of how long the log was, next to the chain head.

use crate::Result;
use std::collections::{BTreeMap, BinaryHeap};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const MAGIC: &[u8; 8] = b"TRBAIDX1";
/// Magic, last seq, entry count, least and greatest time.
const HEADER: u64 = 40;
const ENTRY: u64 = 32;
/// Bytes of a sidecar written between two syncs.
const SYNC_SLICE: usize = 256 << 10;
/// Entries a sidecar cursor reads at a time.
const BATCH: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Entry {
    pub key: u64,
    pub time: i64,
    pub seq: u64,
    pub offset: u64,
}

impl Entry {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.key.to_le_bytes());
        out.extend_from_slice(&self.time.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Self {
        let word = |i: usize| <[u8; 8]>::try_from(&b[i * 8..i * 8 + 8]).expect("32-byte entry");
        Self {
            key: u64::from_le_bytes(word(0)),
            time: i64::from_le_bytes(word(1)),
            seq: u64::from_le_bytes(word(2)),
            offset: u64::from_le_bytes(word(3)),
        }
    }
}

fn hash_parts(kind: u8, parts: &[&str]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&[kind]);
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    h.digest()
}

/// The time index's key of a tenant.
pub(crate) fn tenant_key(tenant: &str) -> u64 {
    hash_parts(b't', &[tenant])
}

/// The patient index's key of a (tenant, patient).
pub(crate) fn patient_key(tenant: &str, patient: &str) -> u64 {
    hash_parts(b'p', &[tenant, patient])
}

/// What the index needs of a record, computed before it reaches the writer thread.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IndexKeys {
    pub time: i64,
    pub tenant: u64,
    pub patient: Option<u64>,
}

impl IndexKeys {
    pub(crate) fn new(tenant: &str, time: i64, patient: Option<&str>) -> Self {
        Self {
            time,
            tenant: tenant_key(tenant),
            patient: patient
                .filter(|p| !p.is_empty())
                .map(|p| patient_key(tenant, p)),
        }
    }

    pub(crate) fn push(&self, seq: u64, offset: u64, out: &mut Vec<Entry>) {
        let entry = |key| Entry {
            key,
            time: self.time,
            seq,
            offset,
        };
        out.push(entry(self.tenant));
        if let Some(p) = self.patient {
            out.push(entry(p));
        }
    }
}

pub(crate) fn sidecar_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.idx"))
}

/// Sidecar files in the directory, as (first sequence number of their segment, path).
pub(crate) fn list_sidecars(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    crate::audit_files::list_with_extension(dir, "idx")
}

/// Writes a sealed segment's index (sorted here) next to it, replacing any older one whole.
pub(crate) fn write_sidecar(
    dir: &Path,
    first: u64,
    last_seq: u64,
    mut entries: Vec<Entry>,
) -> Result<()> {
    entries.sort_unstable();
    let (min, max) = entries.iter().fold((i64::MAX, i64::MIN), |(lo, hi), e| {
        (lo.min(e.time), hi.max(e.time))
    });
    let mut buf = Vec::with_capacity(HEADER as usize + entries.len() * ENTRY as usize);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&last_seq.to_le_bytes());
    buf.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    buf.extend_from_slice(&min.to_le_bytes());
    buf.extend_from_slice(&max.to_le_bytes());
    for e in &entries {
        e.encode(&mut buf);
    }
    let tmp = dir.join(format!("{first:020}.idx.tmp"));
    let file = std::fs::File::create(&tmp)?;
    // In slices, each synced: the log's small group fdatasyncs queue behind one slice at a
    // time on the disk, not behind the whole file.
    let mut at = 0;
    for slice in buf.chunks(SYNC_SLICE) {
        file.write_all_at(slice, at)?;
        file.sync_data()?;
        at += slice.len() as u64;
    }
    std::fs::rename(&tmp, sidecar_path(dir, first))?;
    Ok(())
}

/// An opened sidecar: its header, and its entries read in place.
pub(crate) struct Sidecar {
    file: std::fs::File,
    pub last_seq: u64,
    count: u64,
    min_time: i64,
    max_time: i64,
}

impl Sidecar {
    /// `None` when the file is missing or not a whole sidecar (it is then rebuilt at open).
    pub(crate) fn open(path: &Path) -> Result<Option<Self>> {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let len = file.metadata()?.len();
        let mut h = [0u8; HEADER as usize];
        if len < HEADER || file.read_exact_at(&mut h, 0).is_err() || &h[..8] != MAGIC {
            return Ok(None);
        }
        let word = |i: usize| <[u8; 8]>::try_from(&h[i * 8..i * 8 + 8]).expect("header");
        let count = u64::from_le_bytes(word(2));
        if len != HEADER + count.saturating_mul(ENTRY) {
            return Ok(None);
        }
        Ok(Some(Self {
            file,
            last_seq: u64::from_le_bytes(word(1)),
            count,
            min_time: i64::from_le_bytes(word(3)),
            max_time: i64::from_le_bytes(word(4)),
        }))
    }

    fn read(&self, from: u64, n: usize) -> Result<Vec<Entry>> {
        let n = (n as u64).min(self.count.saturating_sub(from)) as usize;
        let mut buf = vec![0u8; n * ENTRY as usize];
        self.file.read_exact_at(&mut buf, HEADER + from * ENTRY)?;
        Ok(buf
            .chunks_exact(ENTRY as usize)
            .map(Entry::decode)
            .collect())
    }

    /// Index of the first entry not less than `probe`.
    fn lower_bound(&self, probe: Entry) -> Result<u64> {
        let (mut lo, mut hi) = (0, self.count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.read(mid, 1)?[0] < probe {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }
}

/// Which entries a search wants: one key, times in `[from, to)` (`to == i64::MAX`: open).
#[derive(Clone, Copy)]
pub(crate) struct Range {
    pub key: u64,
    pub from: i64,
    pub to: i64,
}

impl Range {
    fn holds_time(&self, t: i64) -> bool {
        t >= self.from && (t < self.to || self.to == i64::MAX)
    }

    fn holds(&self, e: &Entry) -> bool {
        e.key == self.key && self.holds_time(e.time)
    }
}

/// The in-memory part: the open segment's entries, and those of sealed segments whose sidecar
/// is not written yet. Each group of the writer adds one chunk.
#[derive(Default)]
pub(crate) struct Index {
    segments: Mutex<BTreeMap<u64, Vec<Arc<[Entry]>>>>,
}

impl Index {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Vec<Arc<[Entry]>>>> {
        self.segments.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn add(&self, segment: u64, chunk: Vec<Entry>) {
        if !chunk.is_empty() {
            self.lock().entry(segment).or_default().push(chunk.into());
        }
    }

    /// Every entry held for a segment, in no particular order (`None`: not held).
    pub(crate) fn entries(&self, segment: u64) -> Option<Vec<Entry>> {
        let chunks = self.lock().get(&segment)?.clone();
        Some(chunks.iter().flat_map(|c| c.iter().copied()).collect())
    }

    pub(crate) fn forget(&self, segment: u64) {
        self.lock().remove(&segment);
    }

    /// The matching entries of `live` segments (first sequence numbers) in (time, seq) order,
    /// from memory and sidecars.
    pub(crate) fn search(&self, dir: &Path, live: &[u64], range: Range) -> Result<Hits> {
        let held: BTreeMap<u64, Vec<Arc<[Entry]>>> = self.lock().clone();
        let mut cursors = Vec::new();
        for (first, chunks) in &held {
            if !live.contains(first) {
                continue;
            }
            let mut hits: Vec<Entry> = chunks
                .iter()
                .flat_map(|c| c.iter().filter(|e| range.holds(e)).copied())
                .collect();
            hits.sort_unstable();
            cursors.push(Cursor::Memory(hits.into_iter()));
        }
        for (first, path) in list_sidecars(dir)? {
            if held.contains_key(&first) || !live.contains(&first) {
                continue;
            }
            let Some(side) = Sidecar::open(&path)? else {
                continue;
            };
            if side.count == 0 || side.max_time < range.from || side.min_time > range.to {
                continue;
            }
            let at = side.lower_bound(Entry {
                key: range.key,
                time: range.from,
                seq: 0,
                offset: 0,
            })?;
            cursors.push(Cursor::File {
                side,
                next: at,
                buf: Vec::new().into_iter(),
                done: false,
            });
        }
        let mut hits = Hits {
            range,
            cursors,
            heap: BinaryHeap::new(),
        };
        for i in 0..hits.cursors.len() {
            hits.refill(i)?;
        }
        Ok(hits)
    }
}

enum Cursor {
    Memory(std::vec::IntoIter<Entry>),
    File {
        side: Sidecar,
        next: u64,
        buf: std::vec::IntoIter<Entry>,
        done: bool,
    },
}

impl Cursor {
    fn next(&mut self, range: &Range) -> Result<Option<Entry>> {
        match self {
            Cursor::Memory(it) => Ok(it.next()),
            Cursor::File {
                side,
                next,
                buf,
                done,
            } => {
                if *done {
                    return Ok(None);
                }
                let e = match buf.next() {
                    Some(e) => e,
                    None => {
                        let batch = side.read(*next, BATCH)?;
                        *next += batch.len() as u64;
                        *buf = batch.into_iter();
                        match buf.next() {
                            Some(e) => e,
                            None => {
                                *done = true;
                                return Ok(None);
                            }
                        }
                    }
                };
                // Sorted by (key, time): the first entry past the range ends it.
                if range.holds(&e) {
                    Ok(Some(e))
                } else {
                    *done = true;
                    Ok(None)
                }
            }
        }
    }
}

/// Search results merged across segments, in (time, seq) order.
pub(crate) struct Hits {
    range: Range,
    cursors: Vec<Cursor>,
    heap: BinaryHeap<std::cmp::Reverse<(i64, u64, u64, usize)>>,
}

impl Hits {
    fn refill(&mut self, i: usize) -> Result<()> {
        if let Some(e) = self.cursors[i].next(&self.range)? {
            self.heap
                .push(std::cmp::Reverse((e.time, e.seq, e.offset, i)));
        }
        Ok(())
    }

    /// The next (seq, offset).
    pub(crate) fn next(&mut self) -> Result<Option<(u64, u64)>> {
        let Some(std::cmp::Reverse((_, seq, offset, i))) = self.heap.pop() else {
            return Ok(None);
        };
        self.refill(i)?;
        Ok(Some((seq, offset)))
    }
}

/// Writes the sidecars of sealed segments off the log writer's thread, then drops their
/// entries from memory. A failed write keeps them in memory (and is rebuilt at open).
pub(crate) struct SidecarWriter {
    tx: Option<std::sync::mpsc::Sender<(u64, u64)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SidecarWriter {
    pub(crate) fn start(dir: PathBuf, index: Arc<Index>) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<(u64, u64)>();
        let thread = std::thread::Builder::new()
            .name("tributary-audit-idx".into())
            .spawn(move || {
                for (first, last_seq) in rx {
                    let Some(entries) = index.entries(first) else {
                        continue; // pruned meanwhile
                    };
                    match write_sidecar(&dir, first, last_seq, entries) {
                        Ok(()) => index.forget(first),
                        Err(e) => {
                            tracing::error!(error = %e, segment = first, "audit index file not written; kept in memory, rebuilt at the next start")
                        }
                    }
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues the segment starting at `first`, whose last record is `last_seq`.
    pub(crate) fn seal(&self, first: u64, last_seq: u64) {
        if let Some(tx) = &self.tx {
            let _ = tx.send((first, last_seq));
        }
    }
}

impl Drop for SidecarWriter {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The greatest `last_seq` any sidecar names: the log reached at least that far.
pub(crate) fn sealed_through(dir: &Path) -> Result<u64> {
    let mut most = 0;
    for (_, path) in list_sidecars(dir)? {
        if let Some(s) = Sidecar::open(&path)? {
            most = most.max(s.last_seq);
        }
    }
    Ok(most)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: u64, time: i64, seq: u64) -> Entry {
        Entry {
            key,
            time,
            seq,
            offset: seq * 10,
        }
    }

    fn all(mut hits: Hits) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some((seq, _)) = hits.next().unwrap() {
            out.push(seq);
        }
        out
    }

    #[test]
    fn sidecars_and_memory_merge_in_time_order() {
        let dir = tempfile::tempdir().unwrap();
        // Segment 1 on disk, segment 4 in memory; time is not monotonic in seq.
        write_sidecar(
            dir.path(),
            1,
            3,
            vec![entry(7, 50, 1), entry(9, 10, 2), entry(7, 30, 3)],
        )
        .unwrap();
        let index = Index::default();
        index.add(4, vec![entry(7, 40, 4), entry(7, 60, 5)]);
        index.add(4, vec![entry(7, 20, 6)]);
        let range = |from, to| Range { key: 7, from, to };
        let hits = index
            .search(dir.path(), &[1, 4], range(0, i64::MAX))
            .unwrap();
        assert_eq!(all(hits), vec![6, 3, 4, 1, 5]);
        let hits = index.search(dir.path(), &[1, 4], range(30, 60)).unwrap();
        assert_eq!(all(hits), vec![3, 4, 1]);
        // A segment that is not live (pruned) is not read.
        let hits = index.search(dir.path(), &[4], range(0, i64::MAX)).unwrap();
        assert_eq!(all(hits), vec![6, 4, 5]);
        assert_eq!(sealed_through(dir.path()).unwrap(), 3);
    }

    #[test]
    fn a_cut_sidecar_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        write_sidecar(dir.path(), 1, 2, vec![entry(7, 1, 1), entry(7, 2, 2)]).unwrap();
        let path = sidecar_path(dir.path(), 1);
        assert_eq!(Sidecar::open(&path).unwrap().unwrap().count, 2);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(HEADER + ENTRY + 5).unwrap();
        assert!(Sidecar::open(&path).unwrap().is_none());
    }

    #[test]
    fn keys_tell_tenants_and_patients_apart() {
        assert_ne!(tenant_key("a"), tenant_key("b"));
        assert_ne!(patient_key("a", "bc"), patient_key("ab", "c"));
        assert_ne!(tenant_key(""), patient_key("", ""));
    }
}
