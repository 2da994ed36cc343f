//! Durable storage for Tributary: the message [`Journal`], the FHIR resource [`Store`] with its
//! outbox, and the hash-chained audit log — behind traits, with an embedded default on fjall.
//!
//! Every durable write goes through one group committer (see [`committer`]): writes that arrive
//! while an fsync is in flight are gathered into the next write batch and share the next fsync.
//! A caller's future resolves only after the fsync that covered its write returned, which is what
//! lets adapters acknowledge a message the moment `append` returns.

mod audit;
mod audit_files;
mod audit_index;
mod backup;
pub mod committer;
mod db;
mod dead_letters;
mod error;
mod field_report;
mod journal;
mod keys;
mod outbox;
mod store;

pub use audit::{
    for_each_durable_record, record_time, AuditAnchor, AuditEntry, AuditLog, AuditPruneStats,
    AuditQuery, AuditVerifyError, AuditVerifyReport, PreparedRecord, RETENTION_KIND,
};
pub use backup::BackupReport;
pub use db::{Db, DbOptions};
pub use dead_letters::DeadLetterLog;
pub use error::StorageError;
pub use field_report::{
    FieldKey, FieldKind, FieldReport, FieldReportRow, FieldReportStore, FieldStats,
};
pub use journal::{
    with_followers, AppendReceipt, FjallJournal, Journal, JournalEntry, JournalRecord,
    JournalStats, ListFilter, PruneStats, ReplaySet, RetentionPolicy, StateRecord, VersionMatch,
};
pub use outbox::{AckRecorder, Numbering, Outbox, OutboxEvent, RawOutboxEvent};
pub use store::{
    patient_references, CommitOutcome, FjallStore, HistoryPosition, IndexFields, JsonView,
    MessageUpdate, Precondition, ResourceBody, ResourceWrite, Store, StoreTransaction,
    StoredResource, WriteOp, WriteOutcome,
};

pub type Result<T, E = StorageError> = std::result::Result<T, E>;
