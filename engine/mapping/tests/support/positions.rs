//! Shared by the property tests and the `load_mapping` fuzz target: whether every load error
//! points into the set it was loaded from.

use std::path::{Path, PathBuf};
use tributary_mapping::LoadErrors;

/// The first error that names no file of `texts` (loaded with `root`) or no line and column
/// inside it; `None` when every error is well placed.
pub fn misplaced(root: &Path, texts: &[(PathBuf, String)], errors: &LoadErrors) -> Option<String> {
    if errors.0.is_empty() {
        return Some("a failed load with no error".into());
    }
    errors.0.iter().find_map(|e| {
        let Some((_, text)) = texts
            .iter()
            .find(|(rel, _)| root.join(rel).display().to_string() == e.file)
        else {
            return Some(format!("{e} names no file of the set"));
        };
        // YAML counts CR LF, CR and LF each as one line break
        let lines = text.replace("\r\n", "\n").split(['\n', '\r']).count();
        (e.line == 0 || e.col == 0 || e.line > lines + 1)
            .then(|| format!("{e}: not a position in a {lines}-line file"))
    })
}
