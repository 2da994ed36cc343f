use std::path::PathBuf;
use tributary_core::{MessageId, StateError};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage engine error: {0}")]
    Engine(#[from] fjall::Error),
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("corrupt record in {keyspace}: {detail}")]
    Corrupt {
        keyspace: &'static str,
        detail: String,
    },
    #[error("message {0} is not in the journal")]
    UnknownMessage(MessageId),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("version conflict on {resource}: expected version {expected}, current is {current}")]
    VersionConflict {
        resource: String,
        expected: u64,
        current: u64,
    },
    #[error("{resource} already exists")]
    AlreadyExists { resource: String },
    #[error("the storage committer has stopped")]
    CommitterStopped,
    /// A bug caught at run time (a panic inside a storage write); the write was refused and
    /// nothing of it was stored. Carries a fixed description, never record content.
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// A request would touch more records than one call may hold in memory.
    #[error("{0}")]
    TooMany(String),
    /// Another process holds the database: one process writes a data directory at a time.
    #[error("the data directory {} is in use by another process (a running `tributary serve`?)", .0.display())]
    InUse(PathBuf),
}

impl StorageError {
    pub(crate) fn corrupt(keyspace: &'static str, detail: impl ToString) -> Self {
        StorageError::Corrupt {
            keyspace,
            detail: detail.to_string(),
        }
    }
}
