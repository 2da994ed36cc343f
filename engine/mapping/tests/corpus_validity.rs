//! Over every HL7 v2 sample in ../shared/corpus/hl7v2 whose type the library maps: mapping
//! succeeds, and every Bundle is valid FHIR R4 by two external validators — fhir.resources 6.4.0
//! (+ the R4 date/dateTime/instant regexes) and npm fhir@4.12.0 — via scripts/validate_fhir.py.
//!
//! Also checks FHIR R4 invariant per-1 (Period start not after end) on every Period, which
//! neither validator evaluates; and that the library's own fixtures (the expected outputs
//! `tributary mapping test` compares with) pass the same two validators.
//!
//! Skips (saying so) when the corpus or the validators are absent; set
//! TEST_REQUIRE_TOOLS=1 (CI) to make their absence a failure.
//! Install the validators with scripts/install-test-tools.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use tributary_mapping::{datetime, fhir, MapBytesError, MappingError, MappingSet, RunOptions};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn hl7_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            hl7_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "hl7") {
            out.push(p);
        }
    }
}

fn require() -> bool {
    std::env::var("TEST_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
}

/// Every Period in `v` (of FHIR type `ty`) whose `start` is after its `end`, by element path.
fn per1_violations(ty: &str, v: &Value, path: &str, out: &mut Vec<String>) {
    let Value::Object(o) = v else { return };
    if ty == "Period" {
        if let (Some(s), Some(e)) = (
            o.get("start").and_then(Value::as_str),
            o.get("end").and_then(Value::as_str),
        ) {
            if datetime::period_start_after_end(s, e) != Some(false) {
                out.push(path.to_string());
            }
        }
        return;
    }
    for (k, child) in o {
        let Some(el) = fhir::element(ty, k) else {
            continue;
        };
        match child {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    per1_violations(el.ty, item, &format!("{path}.{k}[{i}]"), out);
                }
            }
            _ => per1_violations(el.ty, child, &format!("{path}.{k}"), out),
        }
    }
}

#[test]
fn every_corpus_output_is_valid_fhir_r4() {
    let corpus = repo().join("../shared/corpus/hl7v2");
    if !corpus.is_dir() {
        assert!(!require(), "corpus {} absent", corpus.display());
        eprintln!("SKIP: corpus {} absent", corpus.display());
        return;
    }
    let validators = validators_present();
    let set = MappingSet::load(&repo().join("mappings/hl7v2")).unwrap();
    let term = tributary_terminology::builtin();
    let out = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    hl7_files(&corpus, &mut files);
    files.sort();
    let (mut mapped, mut unmapped_types, mut failures) = (0, 0, Vec::new());
    for f in &files {
        let all = std::fs::read(f).unwrap();
        let ranges = match tributary_hl7v2::split_batch(&all) {
            Ok(b) if b.messages.len() > 1 || b.enveloped => b.messages,
            _ => std::iter::once(0..all.len()).collect(),
        };
        for (n, r) in ranges.into_iter().enumerate() {
            match set.map_bytes(
                &all[r],
                term,
                &RunOptions {
                    tenant: "default",
                    lineage: false,
                    feed: None,
                },
            ) {
                Ok(m) => {
                    mapped += 1;
                    for (t, id, r) in m.resources() {
                        let mut bad = Vec::new();
                        per1_violations(t, &r, &format!("{t}/{id}"), &mut bad);
                        for b in bad {
                            failures.push(format!(
                                "{}: per-1 (start after end, or not a date) at {b}",
                                f.display()
                            ));
                        }
                    }
                    let name = format!(
                        "{:04}-{n}-{}.json",
                        mapped,
                        f.file_stem().unwrap().to_string_lossy()
                    );
                    std::fs::write(out.path().join(name), m.to_json()).unwrap();
                }
                Err(MapBytesError::Mapping(MappingError::NoMapping { .. })) => unmapped_types += 1,
                Err(e) => failures.push(format!("{}: {e}", f.display())),
            }
        }
    }
    eprintln!(
        "corpus: {mapped} mapped, {unmapped_types} of message types outside the library, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "mapping failed:\n{}",
        failures.join("\n")
    );
    assert!(mapped >= 300, "only {mapped} corpus messages mapped");
    if validators {
        validate(out.path());
    }
}

#[test]
fn every_fixture_output_is_valid_fhir_r4() {
    if !validators_present() {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let dir = repo().join("mappings/hl7v2/messages");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".expected.json") {
            std::fs::copy(e.path(), out.path().join(&name)).unwrap();
            n += 1;
        }
    }
    assert!(n >= 40, "only {n} fixtures in {}", dir.display());
    validate(out.path());
}

/// fhir.resources 6.4.0 and npm fhir@4.12.0 are installed; when they are not, says so and (in
/// CI, `TEST_REQUIRE_TOOLS=1`) fails.
fn validators_present() -> bool {
    let present = Command::new("python3")
        .args(["-c", "import fhir.resources, sys; sys.exit(0 if fhir.resources.__version__ == '6.4.0' else 1)"])
        .status()
        .is_ok_and(|s| s.success())
        && repo().join("scripts/node_modules/fhir").is_dir();
    if !present {
        assert!(
            !require(),
            "validators missing: run scripts/install-test-tools"
        );
        eprintln!("SKIP validation: fhir.resources==6.4.0 or scripts/node_modules/fhir missing (scripts/install-test-tools)");
    }
    present
}

/// Runs both validators over every JSON file in `dir`.
fn validate(dir: &Path) {
    let status = Command::new("python3")
        .arg(repo().join("scripts/validate_fhir.py"))
        .arg(dir)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "some outputs are not valid FHIR R4 (see the validator output above)"
    );
}

/// The sample that showed the problem: its discharge (PV1-45) is years before its admit (PV1-44).
#[test]
fn a_corpus_discharge_before_the_admit_leaves_a_valid_encounter_period() {
    let file = repo().join("../shared/corpus/hl7v2/google-whistle/adt_a01.hl7");
    let Ok(bytes) = std::fs::read(&file) else {
        assert!(!require(), "corpus sample {} absent", file.display());
        eprintln!("SKIP: corpus sample {} absent", file.display());
        return;
    };
    let set = MappingSet::load(&repo().join("mappings/hl7v2")).unwrap();
    let m = set
        .map_bytes(
            &bytes,
            tributary_terminology::builtin(),
            &RunOptions::default(),
        )
        .unwrap();
    let (_, _, enc) = m.resources().find(|(t, _, _)| *t == "Encounter").unwrap();
    assert!(enc["period"]["start"].is_string(), "the admit is kept");
    assert!(
        enc["period"].get("end").is_none(),
        "the contradicting discharge is left out"
    );
    let reported: Vec<String> = m.dropped.iter().map(ToString::to_string).collect();
    assert!(
        reported.contains(&"PV1-45 (Encounter.period.end: end before start)".to_string()),
        "{reported:?}"
    );
}
