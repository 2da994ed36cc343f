//! Online backup of a data directory: a consistent copy that is itself a data directory, so
//! restoring is serving it (`tributary serve --data-dir <backup>`), and `tributary audit verify`
//! checks it like the original.
//!
//! - The store (journal, resources, outbox, cursors, dead letters, …) is copied from one fjall
//!   snapshot, so the copy holds whole group commits only: no message is in the journal without
//!   its state, no resource without its outbox event.
//! - The audit log's files are copied while retention is held off: first the chain head and the
//!   index sidecars (witnesses of how long the log was at least), then the segments, which only
//!   grow. The copy's segments therefore reach at least as far as its witnesses, and a record
//!   half-written at copy time is a torn tail the log cuts when the copy is opened.
//! - Everything else in the data directory (local signing keys, revoked grants) is copied as
//!   files, but for fjall's own files (rebuilt by the copy), the export files of `$export`
//!   (temporary by design) and the lock.

use crate::db::{Db, Table};
use crate::{Result, StorageError};
use fjall::{CompressionType, Database, KeyspaceCreateOptions, PersistMode, Readable};
use std::path::{Path, PathBuf};

/// Entries of a data directory a backup does not copy as files.
const NOT_COPIED: [&str; 5] = ["lock", "version", "keyspaces", "audit", "exports"];
/// Store entries per write batch of the copy.
const BATCH: usize = 10_000;

/// What a backup wrote.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct BackupReport {
    pub path: PathBuf,
    /// Store entries copied (every keyspace).
    pub store_entries: u64,
    /// Audit log files copied (segments, head, sidecars).
    pub audit_files: usize,
    /// Other files copied (keys, revoked grants).
    pub other_files: usize,
    pub bytes: u64,
    pub millis: u64,
}

impl Db {
    /// Copies this data directory to `target`, which must not exist yet or be an empty
    /// directory, and must not lie inside the data directory. Runs while the database serves;
    /// blocking (call it off the async workers).
    pub fn backup(&self, target: &Path) -> Result<BackupReport> {
        let started = std::time::Instant::now();
        let source = self.path().to_path_buf();
        check_target(&source, target)?;
        std::fs::create_dir_all(target)?;
        let mut report = BackupReport {
            path: target.to_path_buf(),
            ..Default::default()
        };
        // The audit log first: its records describe requests the store copy may postdate, and
        // a restore that has every record is the one that matters.
        let audit = self.audit_dir()?.to_path_buf();
        {
            let _no_prune = self.audit_prune_lock().blocking_lock();
            report.audit_files = copy_audit(&audit, &target.join("audit"), &mut report.bytes)?;
        }
        report.store_entries = self.copy_store(target)?;
        report.other_files = copy_others(&source, target, &mut report.bytes)?;
        sync_dir(target)?;
        report.millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        Ok(report)
    }

    fn copy_store(&self, target: &Path) -> Result<u64> {
        let snapshot = self.snapshot();
        let copy = Database::builder(target)
            .journal_compression(CompressionType::None)
            .open()?;
        let mut entries = 0u64;
        for t in Table::ALL {
            let into = copy.keyspace(t.name(), KeyspaceCreateOptions::default)?;
            let mut batch = copy.batch();
            let mut n = 0;
            for item in snapshot.iter(self.tables().get(t)) {
                let (k, v) = item.into_inner()?;
                batch.insert(&into, k, v);
                n += 1;
                if n == BATCH {
                    batch.commit()?;
                    batch = copy.batch();
                    entries += n as u64;
                    n = 0;
                }
            }
            batch.commit()?;
            entries += n as u64;
        }
        copy.persist(PersistMode::SyncAll)?;
        Ok(entries)
    }
}

fn check_target(source: &Path, target: &Path) -> Result<()> {
    let refuse = |why: &str| {
        Err(StorageError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("backup target {}: {why}", target.display()),
        )))
    };
    if let Ok(mut entries) = std::fs::read_dir(target) {
        if entries.next().is_some() {
            return refuse("exists and is not empty");
        }
    } else if target.exists() {
        return refuse("exists and is not a directory");
    }
    let absolute = |p: &Path| -> PathBuf {
        let p = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        // The target may not exist yet: resolve what does.
        match (p.parent(), p.file_name()) {
            (Some(parent), Some(name)) => parent
                .canonicalize()
                .map(|c| c.join(name))
                .unwrap_or_else(|_| p.clone()),
            _ => p,
        }
    };
    let (src, dst) = (
        source.canonicalize().unwrap_or_else(|_| absolute(source)),
        absolute(target),
    );
    if dst.starts_with(&src) {
        return refuse("lies inside the data directory");
    }
    Ok(())
}

/// Copies the audit directory in the order that keeps the copy consistent (module docs).
fn copy_audit(from: &Path, to: &Path, bytes: &mut u64) -> Result<usize> {
    std::fs::create_dir_all(to)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(from)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    // Witnesses (head, anchor, sidecars) before segments.
    files.sort_by_key(|p| {
        let seg = p.extension().is_some_and(|e| e == "seg");
        (seg, p.clone())
    });
    for f in &files {
        let name = f.file_name().expect("a file has a name");
        *bytes += std::fs::copy(f, to.join(name))?;
        sync_file(&to.join(name))?;
    }
    sync_dir(to)?;
    Ok(files.len())
}

/// Copies what else the data directory holds (keys, revoked grants), recursively.
fn copy_others(from: &Path, to: &Path, bytes: &mut u64) -> Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let name = e.file_name();
        let text = name.to_string_lossy();
        if NOT_COPIED.contains(&text.as_ref()) || text.ends_with(".jnl") {
            continue;
        }
        n += copy_tree(&e.path(), &to.join(&name), bytes)?;
    }
    Ok(n)
}

fn copy_tree(from: &Path, to: &Path, bytes: &mut u64) -> Result<usize> {
    let meta = std::fs::symlink_metadata(from)?;
    if meta.is_dir() {
        std::fs::create_dir_all(to)?;
        let mut n = 0;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            n += copy_tree(&e.path(), &to.join(e.file_name()), bytes)?;
        }
        sync_dir(to)?;
        Ok(n)
    } else if meta.is_file() {
        // Keeps the permissions: the signing key stays readable by its owner only.
        *bytes += std::fs::copy(from, to)?;
        sync_file(to)?;
        Ok(1)
    } else {
        Ok(0)
    }
}

fn sync_file(p: &Path) -> Result<()> {
    std::fs::File::open(p)?.sync_all()?;
    Ok(())
}

fn sync_dir(p: &Path) -> Result<()> {
    std::fs::File::open(p)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AuditLog, DbOptions, FjallStore, ResourceWrite, Store, StoreTransaction};
    use serde_json::json;

    fn write(id: &str, family: &str) -> StoreTransaction {
        StoreTransaction {
            tenant: "t1".into(),
            writes: vec![ResourceWrite::upsert(
                "Patient",
                id,
                json!({"resourceType": "Patient", "name": [{"family": family}]}),
            )],
            ..Default::default()
        }
    }

    /// A backup taken while the database serves is a data directory of its own: it opens, holds
    /// what was committed before it (and not what came after), its audit chain verifies, and
    /// the other files come along.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backup_is_a_consistent_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let db = Db::open(&data, DbOptions::default()).unwrap();
        let store = FjallStore::new(db.clone());
        let audit = AuditLog::new(db.clone());
        for i in 0..50 {
            store.commit(write(&format!("p{i}"), "A")).await.unwrap();
            audit.append(vec![json!({"n": i})]).await.unwrap();
        }
        store.commit(write("p0", "B")).await.unwrap();
        std::fs::create_dir_all(data.join("keys")).unwrap();
        std::fs::write(data.join("keys/revoked-grants"), "g1\n").unwrap();

        // Refused: inside the data directory, or a directory that holds something.
        let d = db.clone();
        let inside = data.join("copy");
        let err = tokio::task::spawn_blocking(move || d.backup(&inside))
            .await
            .unwrap();
        assert!(err
            .unwrap_err()
            .to_string()
            .contains("inside the data directory"));
        let busy = dir.path().join("busy");
        std::fs::create_dir_all(&busy).unwrap();
        std::fs::write(busy.join("x"), "x").unwrap();
        let d = db.clone();
        let err = tokio::task::spawn_blocking(move || d.backup(&busy))
            .await
            .unwrap();
        assert!(err.unwrap_err().to_string().contains("not empty"));

        let target = dir.path().join("backup");
        let (d, t) = (db.clone(), target.clone());
        let report = tokio::task::spawn_blocking(move || d.backup(&t))
            .await
            .unwrap()
            .unwrap();
        // The database goes on; the copy does not see what came after it.
        store.commit(write("after", "C")).await.unwrap();
        assert!(report.store_entries > 100 && report.audit_files >= 2 && report.other_files == 1);
        drop((store, audit, db));

        let copy = Db::open(&target, DbOptions::default()).unwrap();
        let store = FjallStore::new(copy.clone());
        assert_eq!(store.history("t1", "Patient", "p0").unwrap().len(), 2);
        assert!(store.read("t1", "Patient", "p49").unwrap().is_some());
        assert!(store.read("t1", "Patient", "after").unwrap().is_none());
        assert_eq!(store.outbox().head(), 51);
        let audit = AuditLog::new(copy.clone());
        let verified = audit.verify().unwrap().expect("the copy's chain verifies");
        assert_eq!(verified.entries, 50);
        assert_eq!(
            std::fs::read_to_string(target.join("keys/revoked-grants")).unwrap(),
            "g1\n"
        );
    }
}
