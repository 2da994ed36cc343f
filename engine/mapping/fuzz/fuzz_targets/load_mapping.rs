//! Arbitrary text in place of one file of the shipped mapping library (the first byte picks the
//! file): loading never panics, and every error points at a line and column of a file of the set.
#![no_main]

#[path = "../../tests/support/positions.rs"]
mod positions;

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
        if let Some(bad) = positions::misplaced(root, &set, &errors) {
            panic!("{bad}");
        }
    }
});
