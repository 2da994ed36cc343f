//! Consent / grant revocation: a durable list of revoked ids, checked on every request against a
//! token's `grant` (consent id) and `jti` claims. A line `tenant/id` revokes the id for that
//! tenant's tokens only (what a tenant's admin can do: another tenant's identity provider may
//! issue the same id); a bare `id` line revokes it for every tenant (the operator's
//! `tributary consent revoke` without `--tenant`, and every line written before tenants were
//! named). The list is a file in `<data_dir>/keys/`
//! appended with fsync, so `tributary consent revoke` and the admin endpoint share it and a
//! running server sees a revocation on its next request (it re-reads the file when it changes).
//!
//! The change check runs on every request, so it `fstat`s a handle it keeps open rather than
//! walking the path each time; appends (all this module and the CLI do) change the same file.
//! The path is looked up again at most once per [`RELOOK`], which catches a file replaced by
//! hand (an editor's rename) or created after the server started.

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

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

const RELOOK: Duration = Duration::from_secs(1);

/// Modification time, size and inode of the list.
type Stamp = Option<(SystemTime, u64, u64)>;

#[derive(Default)]
struct Loaded {
    ids: HashSet<String>,
    stamp: Stamp,
}

/// The open list and when its path was last looked up.
struct Handle {
    file: Option<std::fs::File>,
    looked: Option<Instant>,
}

pub struct Revocations {
    path: PathBuf,
    loaded: RwLock<Loaded>,
    handle: Mutex<Handle>,
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
        let path = crate::keys::keys_dir(data_dir).join(REVOKED_FILE);
        // An empty list to hold open, so the common case (nothing revoked) has a handle too;
        // where it cannot be made, the path is looked up on each check instead.
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path);
        let r = Self {
            path,
            loaded: RwLock::new(Loaded::default()),
            handle: Mutex::new(Handle {
                file: None,
                looked: None,
            }),
        };
        r.refresh();
        r
    }

    fn stamp(&self) -> Stamp {
        let of = |m: std::fs::Metadata| Some((m.modified().ok()?, m.len(), m.ino()));
        let mut h = self.handle.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = h.looked.is_some_and(|t| t.elapsed() < RELOOK);
        if let (true, Some(f)) = (fresh, &h.file) {
            if let Ok(m) = f.metadata() {
                return of(m);
            }
        }
        h.looked = Some(Instant::now());
        h.file = std::fs::File::open(&self.path).ok();
        of(h.file.as_ref()?.metadata().ok()?)
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

    /// Is `id` revoked for a token of `tenant` (for that tenant, or for all)?
    pub fn is_revoked(&self, tenant: &str, id: &str) -> bool {
        self.refresh();
        self.loaded
            .read()
            .map(|l| l.ids.contains(id) || l.ids.contains(&entry(Some(tenant), id)))
            .unwrap_or(true)
    }

    /// Durably adds `id` for `tenant` (`None`: every tenant); fsync before returning.
    pub fn revoke(&self, tenant: Option<&str>, id: &str) -> Result<(), RevocationError> {
        revoke_in(&self.path, tenant, id)?;
        self.refresh();
        Ok(())
    }
}

/// The list's line for `id` revoked for `tenant` (all tenants: `None`).
fn entry(tenant: Option<&str>, id: &str) -> String {
    match tenant {
        Some(t) => format!("{t}/{id}"),
        None => id.to_string(),
    }
}

/// Appends one id (for one tenant, or all) to the list at `path`, durably.
pub fn revoke_in(path: &Path, tenant: Option<&str>, id: &str) -> Result<(), RevocationError> {
    if !valid_grant_id(id) || tenant.is_some_and(|t| !valid_grant_id(t) || t.contains(':')) {
        return Err(RevocationError::BadId);
    }
    let id = &entry(tenant, id);
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

/// For the CLI: revoke in a data directory (for `tenant`, or every tenant).
pub fn revoke_in_data_dir(
    data_dir: &Path,
    tenant: Option<&str>,
    id: &str,
) -> Result<PathBuf, RevocationError> {
    let path = crate::keys::keys_dir(data_dir).join(REVOKED_FILE);
    revoke_in(&path, tenant, id)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_replaced_by_hand_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        revoke_in_data_dir(dir.path(), None, "consent-1").unwrap();
        let server = Revocations::open(dir.path());
        assert!(server.is_revoked("t", "consent-1"));
        // An editor writes a new file and renames it over the list.
        let path = crate::keys::keys_dir(dir.path()).join(REVOKED_FILE);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, "consent-9\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        server.handle.lock().unwrap().looked = None; // as if RELOOK had passed
        assert!(server.is_revoked("t", "consent-9"));
        assert!(!server.is_revoked("t", "consent-1"));
    }

    #[test]
    fn revocation_is_seen_by_another_handle() {
        let dir = tempfile::tempdir().unwrap();
        let server = Revocations::open(dir.path());
        assert!(!server.is_revoked("t", "consent-1"));
        revoke_in_data_dir(dir.path(), None, "consent-1").unwrap();
        assert!(server.is_revoked("t", "consent-1"));
        assert!(!server.is_revoked("t", "consent-2"));
        assert!(revoke_in_data_dir(dir.path(), None, "bad id\n").is_err());
        assert!(revoke_in_data_dir(dir.path(), Some("a/b"), "consent-3").is_err());
    }

    /// A tenant's revocation stops that tenant's tokens only; a bare one stops every tenant's.
    #[test]
    fn a_tenants_revocation_is_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let server = Revocations::open(dir.path());
        server.revoke(Some("north"), "consent-7").unwrap();
        assert!(server.is_revoked("north", "consent-7"));
        assert!(!server.is_revoked("south", "consent-7"));
        server.revoke(None, "consent-8").unwrap();
        assert!(server.is_revoked("north", "consent-8") && server.is_revoked("south", "consent-8"));
    }
}
