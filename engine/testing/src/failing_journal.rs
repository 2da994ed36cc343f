//! A journal that fails its appends on demand: the real [`FjallJournal`] behind a switch, so
//! a test can show what an ingress adapter does when the disk cannot take a message (full, I/O
//! error) — and that nothing is acknowledged that was not stored.

use async_trait::async_trait;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::watch;
use tributary_core::{Envelope, MessageId, MessageState};
use tributary_storage::{
    AppendReceipt, FjallJournal, Journal, JournalEntry, JournalRecord, JournalStats, ListFilter,
    PruneStats, RetentionPolicy, StateRecord, StorageError,
};

/// The real journal, with appends failing while `failing` is set.
pub struct FailingJournal {
    inner: FjallJournal,
    failing: AtomicBool,
}

impl FailingJournal {
    /// Starts failing when `failing`.
    pub fn new(inner: FjallJournal, failing: bool) -> Self {
        Self {
            inner,
            failing: AtomicBool::new(failing),
        }
    }

    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    fn check(&self) -> tributary_storage::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StorageError::Io(std::io::Error::other(
                "no space left on device (injected)",
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl Journal for FailingJournal {
    async fn append(&self, envelope: Envelope) -> tributary_storage::Result<AppendReceipt> {
        self.check()?;
        self.inner.append(envelope).await
    }
    async fn append_rejected(
        &self,
        envelope: Envelope,
        reason: String,
    ) -> tributary_storage::Result<AppendReceipt> {
        self.check()?;
        self.inner.append_rejected(envelope, reason).await
    }
    async fn transition(
        &self,
        id: MessageId,
        to: MessageState,
        mapping_version: Option<String>,
    ) -> tributary_storage::Result<StateRecord> {
        self.inner.transition(id, to, mapping_version).await
    }
    fn get(&self, id: MessageId) -> tributary_storage::Result<Option<JournalRecord>> {
        self.inner.get(id)
    }
    fn entries_after(
        &self,
        after_seq: u64,
        limit: usize,
    ) -> tributary_storage::Result<Vec<JournalEntry>> {
        self.inner.entries_after(after_seq, limit)
    }
    fn cursor(&self, consumer: &str) -> tributary_storage::Result<u64> {
        self.inner.cursor(consumer)
    }
    async fn set_cursor(&self, consumer: &str, seq: u64) -> tributary_storage::Result<()> {
        self.inner.set_cursor(consumer, seq).await
    }
    fn list(
        &self,
        filter: &ListFilter,
    ) -> tributary_storage::Result<Vec<(MessageId, i64, StateRecord)>> {
        self.inner.list(filter)
    }
    async fn replay(&self, ids: &[MessageId]) -> tributary_storage::Result<Vec<u64>> {
        self.inner.replay(ids).await
    }
    async fn prune(
        &self,
        policy: &RetentionPolicy,
        now_ms: i64,
    ) -> tributary_storage::Result<PruneStats> {
        self.inner.prune(policy, now_ms).await
    }
    fn stats(&self) -> JournalStats {
        self.inner.stats()
    }
    fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.subscribe()
    }
    fn state(&self, id: MessageId) -> tributary_storage::Result<Option<StateRecord>> {
        self.inner.state(id)
    }
    async fn set_note(
        &self,
        id: MessageId,
        name: &str,
        text: String,
    ) -> tributary_storage::Result<()> {
        self.inner.set_note(id, name, text).await
    }
    fn notes(&self, id: MessageId) -> tributary_storage::Result<BTreeMap<String, String>> {
        self.inner.notes(id)
    }
}
