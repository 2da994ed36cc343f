//! Arbitrary bytes through the shipped mapping library, as the pipeline maps a journaled
//! message (with lineage on, as `tributary map --explain` runs it): never a panic; a mapped
//! message serializes to a JSON Bundle whose entries all have a type and an id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::OnceLock;
use tributary_mapping::{MappingSet, RunOptions};

fn library() -> &'static MappingSet {
    static SET: OnceLock<MappingSet> = OnceLock::new();
    SET.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../mappings/hl7v2");
        MappingSet::load(&dir).unwrap_or_else(|e| panic!("{e}"))
    })
}

fuzz_target!(|data: &[u8]| {
    let opts = RunOptions {
        tenant: "t1",
        lineage: true,
        feed: None,
    };
    let Ok(out) = library().map_bytes(data, tributary_terminology::builtin(), &opts) else {
        return;
    };
    let bundle: serde_json::Value =
        serde_json::from_slice(&out.to_json()).expect("a mapped message serializes to JSON");
    assert_eq!(bundle["resourceType"], "Bundle");
    for e in bundle["entry"].as_array().into_iter().flatten() {
        assert!(e["resource"]["resourceType"].is_string(), "{e}");
        assert!(e["resource"]["id"].is_string(), "{e}");
    }
    for (_, _, r) in out.resources() {
        assert!(r.is_object());
    }
});
