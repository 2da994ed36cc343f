//! Arbitrary text in place of one file of the shipped mapping library (the first byte picks the
//! file): loading never panics, and every error points at a line and column of a file of the set.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tributary_mapping::MappingSet;

fn texts() -> &'static Vec<(PathBuf, String)> {
    static TEXTS: OnceLock<Vec<(PathBuf, String)>> = OnceLock::new();
    TEXTS.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../mappings/hl7v2");
        MappingSet::texts(&root).unwrap_or_else(|e| panic!("{e}"))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((pick, rest)) = data.split_first() else {
        return;
    };
    let mut set = texts().clone();
    let n = *pick as usize % set.len();
    set[n].1 = String::from_utf8_lossy(rest).into_owned();
    let root = Path::new("lib");
    if let Err(errors) = MappingSet::from_texts(root, &set) {
        assert!(!errors.0.is_empty());
        for e in &errors.0 {
            let text = set
                .iter()
                .find(|(rel, _)| root.join(rel).display().to_string() == e.file)
                .map(|(_, t)| t)
                .unwrap_or_else(|| panic!("{e} names no file of the set"));
            // YAML counts CR LF, CR and LF each as one line break
            let lines = text.replace("\r\n", "\n").split(['\n', '\r']).count();
            assert!(
                e.line >= 1 && e.col >= 1 && e.line <= lines + 1,
                "{e}: not a position in a {lines}-line file"
            );
        }
    }
});
