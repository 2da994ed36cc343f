//! The current mapping set, swapped whole on reload.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use tributary_mapping::{LoadErrors, MappingSet};

/// Holds the mapping set the workers use. A worker takes an `Arc` per message, so a reload never
/// changes the version in the middle of a message.
pub struct MappingRegistry {
    dir: PathBuf,
    current: RwLock<Arc<MappingSet>>,
    last_error: RwLock<Option<String>>,
}

/// What a reload did.
#[derive(Debug)]
pub enum ReloadOutcome {
    Unchanged,
    Reloaded {
        from: String,
        to: String,
    },
    /// The new files do not load; the previous version stays.
    Failed {
        errors: LoadErrors,
    },
}

impl MappingRegistry {
    /// Loads the set in `dir`; fails (with every file:line:col error) if it does not load.
    pub fn load(dir: &Path) -> Result<Self, LoadErrors> {
        let set = MappingSet::load(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            current: RwLock::new(Arc::new(set)),
            last_error: RwLock::new(None),
        })
    }

    pub fn current(&self) -> Arc<MappingSet> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The error of the last rejected reload, until a good one replaces it.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.read().ok().and_then(|g| g.clone())
    }

    /// Reloads when the directory's content hash differs from the running version.
    pub fn reload(&self) -> ReloadOutcome {
        let current = self.current();
        match MappingSet::version_of(&self.dir) {
            Ok(v) if v == current.version => {
                // The files are the running set again (a bad edit undone): its error is over.
                if let Ok(mut e) = self.last_error.write() {
                    *e = None;
                }
                return ReloadOutcome::Unchanged;
            }
            Ok(_) => {}
            Err(errors) => return self.reject(errors),
        }
        match MappingSet::load(&self.dir) {
            Ok(set) => {
                let to = set.version.clone();
                if let Ok(mut g) = self.current.write() {
                    *g = Arc::new(set);
                }
                if let Ok(mut e) = self.last_error.write() {
                    *e = None;
                }
                ReloadOutcome::Reloaded {
                    from: current.version.clone(),
                    to,
                }
            }
            Err(errors) => self.reject(errors),
        }
    }

    fn reject(&self, errors: LoadErrors) -> ReloadOutcome {
        if let Ok(mut e) = self.last_error.write() {
            *e = Some(errors.to_string());
        }
        ReloadOutcome::Failed { errors }
    }
}
