//! The element check the facade applies to writes accepts what valid R4 looks like: every
//! resource of the mapping library's expected outputs, and every R4 example in the shared
//! corpus (US Core, the Subscriptions Backport IG) but one that is not valid R4.

use std::path::{Path, PathBuf};
use tributary_core::fhir_r4::{check_resource, is_resource};

fn json_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            json_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "json") {
            out.push(p);
        }
    }
}

fn check_all(
    files: &[PathBuf],
    resources: impl Fn(&serde_json::Value) -> Vec<serde_json::Value>,
) -> usize {
    let mut checked = 0;
    let mut failures = Vec::new();
    for f in files {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap();
        for r in resources(&v) {
            let Some(rt) = r.get("resourceType").and_then(|t| t.as_str()) else {
                continue;
            };
            if !is_resource(rt) {
                continue;
            }
            checked += 1;
            if let Err(e) = check_resource(rt, &r) {
                failures.push(format!("{}: {e}", f.display()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} refused:\n{}",
        failures.len(),
        failures.join("\n")
    );
    checked
}

#[test]
fn the_mapping_librarys_outputs_pass() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../mappings/hl7v2/messages");
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".expected.json"))
        .collect();
    assert!(files.len() >= 20);
    let n = check_all(&files, |bundle| {
        bundle["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e["resource"].clone())
            .collect()
    });
    assert!(n >= 200, "{n} resources checked");
}

#[test]
fn the_corpus_r4_examples_pass() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus/fhir");
    if !dir.is_dir() {
        eprintln!(
            "SKIP: {} is absent (the shared corpus is not on this machine)",
            dir.display()
        );
        return;
    }
    let mut files = Vec::new();
    json_files(&dir, &mut files);
    // Not valid R4, and refused by fhir.resources 6.4.0 as well: a Narrative without its
    // required `div`.
    const INVALID: [&str; 1] = ["us-core/diagnosticreport-cbc.json"];
    let (invalid, valid): (Vec<PathBuf>, Vec<PathBuf>) = files
        .into_iter()
        .partition(|f| INVALID.iter().any(|i| f.to_string_lossy().contains(i)));
    for f in &invalid {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap();
        let rt = v["resourceType"].as_str().unwrap();
        assert_eq!(
            check_resource(rt, &v),
            Err(format!("{rt}.text requires div in FHIR R4"))
        );
    }
    let files = valid;
    let n = check_all(&files, |r| vec![r.clone()]);
    eprintln!("{n} corpus resources checked");
    assert!(n >= 200, "{n} resources checked");
}
