//! The current mapping set, swapped whole on reload.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use tributary_mapping::{LoadErrors, MappingSet};

/// Holds the mapping set the workers use. A worker takes an `Arc` per message, so a reload never
/// changes the version in the middle of a message.
pub struct MappingRegistry {
    dir: PathBuf,
    current: RwLock<Arc<MappingSet>>,
    last_error: RwLock<Option<String>>,
    /// The content hash the last [`poll`](Self::poll) saw that differs from the running set.
    candidate: Mutex<Option<String>>,
}

/// What a reload did.
#[derive(Debug)]
pub enum ReloadOutcome {
    Unchanged,
    /// The directory changed since the last poll; it is loaded when the next poll reads the
    /// same content.
    Settling,
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
            candidate: Mutex::new(None),
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

    /// Reloads now when the directory's content hash differs from the running version (an
    /// operator's explicit reload).
    pub fn reload(&self) -> ReloadOutcome {
        self.reload_with(false)
    }

    /// What the periodic check calls: like [`reload`](Self::reload), but a changed directory is
    /// loaded only once two polls in a row have read the same content. An analyst saving three
    /// related files, a `git pull` or a ConfigMap update is caught mid-way by a poll at times;
    /// that half-written set is never compiled, swapped in or reported as an error.
    pub fn poll(&self) -> ReloadOutcome {
        self.reload_with(true)
    }

    fn reload_with(&self, settle: bool) -> ReloadOutcome {
        let current = self.current();
        let texts = match MappingSet::texts(&self.dir) {
            Ok(t) => t,
            Err(errors) => return self.reject(errors),
        };
        let version = MappingSet::version_of_texts(&texts);
        let seen_before = match self.candidate.lock() {
            Ok(mut c) => {
                let same = c.as_deref() == Some(version.as_str());
                *c = (version != current.version).then(|| version.clone());
                same
            }
            Err(_) => true,
        };
        if version == current.version {
            // The files are the running set again (a bad edit undone): its error is over.
            if let Ok(mut e) = self.last_error.write() {
                *e = None;
            }
            return ReloadOutcome::Unchanged;
        }
        if settle && !seen_before {
            return ReloadOutcome::Settling;
        }
        match MappingSet::load_texts(&self.dir, &texts) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends a line to one of the set's files (a comment: the set still compiles).
    fn edit(dir: &Path, file: &str, line: &str) {
        let path = dir.join(file);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(line);
        text.push('\n');
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn a_poll_loads_a_change_only_when_the_next_poll_reads_the_same_files() {
        let dir = tempfile::tempdir().unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../mappings/hl7v2");
        copy_dir(&src, dir.path());
        let reg = MappingRegistry::load(dir.path()).unwrap();
        let first = reg.current().version.clone();
        assert!(matches!(reg.poll(), ReloadOutcome::Unchanged));

        // the first of two related edits: seen, not loaded
        edit(dir.path(), "mapping-set.yaml", "# first file of an edit");
        assert!(matches!(reg.poll(), ReloadOutcome::Settling));
        // the second lands before the next poll: the content moved on, still not loaded
        edit(
            dir.path(),
            "segments/AL1-AllergyIntolerance.yaml",
            "# second file of the edit",
        );
        assert!(matches!(reg.poll(), ReloadOutcome::Settling));
        assert_eq!(reg.current().version, first);
        // unchanged since the last poll: now it is loaded, both files at once
        let ReloadOutcome::Reloaded { from, to } = reg.poll() else {
            panic!("the settled change is loaded");
        };
        assert_eq!(from, first);
        assert_eq!(to, reg.current().version);
        assert!(matches!(reg.poll(), ReloadOutcome::Unchanged));

        // a half-written file is neither swapped in nor reported while it settles …
        let good = std::fs::read_to_string(dir.path().join("mapping-set.yaml")).unwrap();
        std::fs::write(dir.path().join("mapping-set.yaml"), "name: [unclosed\n").unwrap();
        assert!(matches!(reg.poll(), ReloadOutcome::Settling));
        assert_eq!(reg.last_error(), None);
        // … and when the writer finishes, the completed set is what loads
        std::fs::write(
            dir.path().join("mapping-set.yaml"),
            format!("{good}# done\n"),
        )
        .unwrap();
        assert!(matches!(reg.poll(), ReloadOutcome::Settling));
        assert!(matches!(reg.poll(), ReloadOutcome::Reloaded { .. }));
        assert_eq!(reg.last_error(), None);

        // a bad file that stays is reported once settled, and the old version keeps running
        let running = reg.current().version.clone();
        std::fs::write(dir.path().join("mapping-set.yaml"), "name: [unclosed\n").unwrap();
        assert!(matches!(reg.poll(), ReloadOutcome::Settling));
        assert!(matches!(reg.poll(), ReloadOutcome::Failed { .. }));
        assert_eq!(reg.current().version, running);
        assert!(reg.last_error().is_some());

        // an explicit reload does not wait
        std::fs::write(dir.path().join("mapping-set.yaml"), &good).unwrap();
        assert!(matches!(reg.reload(), ReloadOutcome::Reloaded { .. }));
    }

    fn copy_dir(from: &Path, to: &Path) {
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let target = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                std::fs::create_dir_all(&target).unwrap();
                copy_dir(&e.path(), &target);
            } else {
                std::fs::copy(e.path(), target).unwrap();
            }
        }
    }
}
