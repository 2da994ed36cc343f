//! Consent / grant revocation: a durable list of revoked ids, checked on every request against a
//! token's `grant` (consent id) and `jti` claims. The list is a file in `<data_dir>/keys/`
//! appended with fsync, so `tributary consent revoke` and the admin endpoint share it and a
//! running server sees a revocation on its next request (it re-reads the file when it changes).

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::SystemTime;

pub const REVOKED_FILE: &str = "revoked-grants";

#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("revocation list {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("a grant id is 1–128 characters of letters, digits, `-`, `_`, `.` and `:`")]
    BadId,
}

#[derive(Default)]
struct Loaded {
    ids: HashSet<String>,
    stamp: Option<(SystemTime, u64)>,
}

pub struct Revocations {
    path: PathBuf,
    loaded: RwLock<Loaded>,
}

pub fn valid_grant_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
}

impl Revocations {
    pub fn open(data_dir: &Path) -> Self {
        let r = Self {
            path: crate::keys::keys_dir(data_dir).join(REVOKED_FILE),
            loaded: RwLock::new(Loaded::default()),
        };
        r.refresh();
        r
    }

    fn stamp(&self) -> Option<(SystemTime, u64)> {
        let m = std::fs::metadata(&self.path).ok()?;
        Some((m.modified().ok()?, m.len()))
    }

    /// Re-reads the file if its modification time or size changed.
    fn refresh(&self) {
        let stamp = self.stamp();
        if self
            .loaded
            .read()
            .map(|l| l.stamp == stamp)
            .unwrap_or(false)
        {
            return;
        }
        let ids = std::fs::read_to_string(&self.path)
            .map(|t| {
                t.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        if let Ok(mut l) = self.loaded.write() {
            *l = Loaded { ids, stamp };
        }
    }

    pub fn is_revoked(&self, id: &str) -> bool {
        self.refresh();
        self.loaded
            .read()
            .map(|l| l.ids.contains(id))
            .unwrap_or(true)
    }

    /// Durably adds `id` (fsync before returning).
    pub fn revoke(&self, id: &str) -> Result<(), RevocationError> {
        revoke_in(&self.path, id)?;
        self.refresh();
        Ok(())
    }
}

/// Appends one id to the list at `path`, durably.
pub fn revoke_in(path: &Path, id: &str) -> Result<(), RevocationError> {
    if !valid_grant_id(id) {
        return Err(RevocationError::BadId);
    }
    let io = |source| RevocationError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)?;
    f.write_all(format!("{id}\n").as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(())
}

/// For the CLI: revoke in a data directory.
pub fn revoke_in_data_dir(data_dir: &Path, id: &str) -> Result<PathBuf, RevocationError> {
    let path = crate::keys::keys_dir(data_dir).join(REVOKED_FILE);
    revoke_in(&path, id)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocation_is_seen_by_another_handle() {
        let dir = tempfile::tempdir().unwrap();
        let server = Revocations::open(dir.path());
        assert!(!server.is_revoked("consent-1"));
        revoke_in_data_dir(dir.path(), "consent-1").unwrap();
        assert!(server.is_revoked("consent-1"));
        assert!(!server.is_revoked("consent-2"));
        assert!(revoke_in_data_dir(dir.path(), "bad id\n").is_err());
    }
}
