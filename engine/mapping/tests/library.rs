//! The shipped mapping library: it loads, its fixtures pass (what `tributary mapping test` runs),
//! load errors point at file:line:col, and the unconsumed-field report is complete.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use tributary_mapping::{fixtures, MappingSet, RunOptions, SplitMessage};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn library() -> MappingSet {
    MappingSet::load(&repo().join("mappings/hl7v2")).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_message_map_has_a_fixture_and_all_fixtures_pass() {
    let set = library();
    assert!(
        set.message_maps_without_fixtures().is_empty(),
        "{:?}",
        set.message_maps_without_fixtures()
    );
    let outcomes = fixtures::run_fixtures(&set, tributary_terminology::builtin());
    assert!(outcomes.len() >= 20);
    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.passed())
        .map(|o| {
            format!(
                "{}: {:?} {:?}",
                o.input.display(),
                o.error,
                o.differences.iter().take(5).collect::<Vec<_>>()
            )
        })
        .collect();
    assert!(failed.is_empty(), "fixtures failed:\n{}", failed.join("\n"));
    let types: BTreeSet<String> = set.message_types().into_iter().map(|(t, _)| t).collect();
    for t in [
        "ADT^A01", "ADT^A02", "ADT^A03", "ADT^A04", "ADT^A05", "ADT^A06", "ADT^A07", "ADT^A08",
        "ADT^A11", "ADT^A12", "ADT^A13", "ADT^A28", "ADT^A31", "ADT^A40", "ORU^R01", "ORM^O01",
        "OML^O21", "VXU^V04", "MDM^T02", "SIU^S12",
    ] {
        assert!(types.contains(t), "{t} is not mapped");
    }
}

#[test]
fn a_fixture_mismatch_is_a_readable_path_diff() {
    let mut out = Vec::new();
    let expected = serde_json::json!({"entry": [{"resource": {"gender": "female", "name": [{"family": "A"}]}}]});
    let actual = serde_json::json!({"entry": [{"resource": {"gender": "male", "name": [{"family": "A"}], "active": true}}]});
    fixtures::json_diff("", &expected, &actual, &mut out);
    assert_eq!(
        out,
        vec![
            "~ entry[0].resource.gender: expected \"female\", got \"male\"".to_string(),
            "+ entry[0].resource.active: unexpected true".to_string(),
        ]
    );
}

fn load_texts(files: &[(&str, &str)]) -> Result<MappingSet, tributary_mapping::LoadErrors> {
    let texts: Vec<(PathBuf, String)> = files
        .iter()
        .map(|(p, t)| (PathBuf::from(p), t.to_string()))
        .collect();
    MappingSet::from_texts(Path::new("m"), &texts)
}

/// The load errors of `files`, one line each (the set must fail to load).
fn load_error_lines(files: &[(&str, &str)]) -> Vec<String> {
    load_texts(files)
        .unwrap_err()
        .0
        .iter()
        .map(|e| e.to_string())
        .collect()
}

/// Maps one HL7 v2 message with `set` for `tenant` (built-in terminology, no lineage).
fn map_as(set: &MappingSet, message: &[u8], tenant: &str) -> tributary_mapping::MappedBundle {
    set.map_bytes(
        message,
        tributary_terminology::builtin(),
        &RunOptions {
            tenant,
            lineage: false,
            feed: None,
        },
    )
    .unwrap()
}

/// Loads `files` as a mapping set and runs it over one HL7 v2 message (built-in terminology,
/// default options).
fn run_texts(
    files: &[(&str, &str)],
    message: &str,
) -> Result<tributary_mapping::MappedBundle, tributary_mapping::MappingError> {
    let set = load_texts(files).unwrap();
    set.run(
        &SplitMessage::parse(message),
        tributary_terminology::builtin(),
        &RunOptions::default(),
    )
}

const HEADER: &str = "resource: MessageHeader\nsegment: MSH\nrules:\n  - set: eventCoding\n    rules:\n      - set: code\n        from: MSH-9.2\n  - set: source.endpoint\n    value: mllp://x\n";

#[test]
fn load_errors_name_file_line_col_the_bad_element_and_a_suggestion() {
    let pid = "resource: Patient\nsegment: PID\nrules:\n  - set: gendr\n    from: PID-8\n  - set: name\n    from: PID-5\n    map: XPM\n  - set: birthDate\n    from: PID-7[*]\n  - set: identifier\n    from: PID-3\n    map: XPN\n  - set: active\n    from: PID-0\n  - set: gender\n    when: PID-8 == F )\n    value: female\n";
    let xpn = "datatype: XPN\nto: HumanName\nrules:\n  - set: family\n    from: .1\n";
    let msg = "message: [ADT^A01]\nresources:\n  - name: patient\n    segment: PID\n    map: PID-Patient\n";
    let errs = load_error_lines(&[
        ("segments/PID-Patient.yaml", pid),
        ("datatypes/XPN.yaml", xpn),
        ("messages/ADT.yaml", msg),
    ]);
    let all = errs.join("\n");
    assert!(all.contains("m/segments/PID-Patient.yaml:4:10: `gendr` is not an element of FHIR R4 Patient — did you mean `gender`?"), "{all}");
    assert!(
        all.contains("m/segments/PID-Patient.yaml:8:10: no map named `XPM` — did you mean `XPN`?"),
        "{all}"
    );
    assert!(all.contains("PID-Patient.yaml:10:11: `PID-7[*]` selects every repetition but `birthDate` holds one value"), "{all}");
    assert!(all.contains("PID-Patient.yaml:13:10: datatype map `XPN` produces HumanName, but `identifier` is a Identifier"), "{all}");
    assert!(
        all.contains("PID-Patient.yaml:15:11: field numbers start at 1"),
        "{all}"
    );
    assert!(
        all.contains("PID-Patient.yaml:17:22: condition: unexpected text after the condition"),
        "{all}"
    );
    // YAML syntax errors have positions too
    let errs = load_texts(&[(
        "datatypes/XPN.yaml",
        "datatype: XPN\nto: HumanName\nrules: [\n",
    )])
    .unwrap_err();
    assert!(
        errs.0[0].to_string().starts_with("m/datatypes/XPN.yaml:"),
        "{}",
        errs.0[0]
    );
}

/// A constant is checked against its element's R4 format when the file loads, so an analyst's
/// typo is a load error at its position, not an invalid resource in every message.
#[test]
fn constants_in_a_wrong_format_are_load_errors() {
    let pid = "resource: Patient\nsegment: PID\nrules:\n  - set: gender\n    value: \"female \"\n  - set: birthDate\n    value: 1962-02-30\n  - set: multipleBirthInteger\n    value: 3000000000\n  - set: identifier\n    value:\n      system: urn:x y\n      value: \"7\"\n  - set: active\n    value: true\n";
    let msg = "message: [ADT^A01]\nresources:\n  - name: patient\n    segment: PID\n    map: PID-Patient\n";
    let errs = load_error_lines(&[
        ("segments/PID-Patient.yaml", pid),
        ("messages/ADT.yaml", msg),
    ]);
    let all = errs.join("\n");
    for expected in [
        "PID-Patient.yaml:5:12: `female ` is not a FHIR R4 code: a non-empty string without leading, trailing or repeated whitespace",
        "PID-Patient.yaml:7:12: `1962-02-30` is not a FHIR R4 date: YYYY, YYYY-MM or YYYY-MM-DD, a real calendar date",
        "PID-Patient.yaml:9:12: `3000000000` is not a FHIR R4 integer: a whole number from -2147483648 to 2147483647",
        "PID-Patient.yaml:12:15: `urn:x y` is not a FHIR R4 uri: a non-empty string without whitespace",
    ] {
        assert!(all.contains(expected), "{expected}\n{all}");
    }
    assert_eq!(errs.len(), 4, "{all}");
}

#[test]
fn meta_stamps_are_the_stores_and_a_mapping_that_sets_them_does_not_load() {
    let pid = "resource: Patient\nsegment: PID\nrules:\n  - set: meta.versionId\n    from: PID-1\n  - set: meta\n    value:\n      lastUpdated: x\n  - set: meta.tag\n    rules:\n      - set: code\n        from: PID-2\n";
    let msg = "message: [ADT^A01]\nresources:\n  - name: patient\n    segment: PID\n    map: PID-Patient\n";
    let errs = load_error_lines(&[
        ("segments/PID-Patient.yaml", pid),
        ("messages/ADT.yaml", msg),
    ]);
    let all = errs.join("\n");
    assert!(
        all.contains("PID-Patient.yaml:4:10: `meta.versionId` is set by the store"),
        "{all}"
    );
    assert!(
        all.contains("PID-Patient.yaml:8:7: `meta.lastUpdated` is set by the store"),
        "{all}"
    );
    assert_eq!(errs.len(), 2, "meta.tag is the mapping's to set: {all}");
}

#[test]
fn a_ref_to_a_name_the_message_map_lacks_is_a_load_error() {
    let enc = "resource: Encounter\nsegment: PV1\nrules:\n  - set: subject\n    ref: patient\n  - set: status\n    value: finished\n  - set: class\n    value:\n      code: IMP\n";
    let msg = "message: [ADT^A03]\nresources:\n  - segment: PV1\n    map: PV1-Encounter\n";
    let errs = load_texts(&[
        ("segments/PV1-Encounter.yaml", enc),
        ("messages/ADT_A03.yaml", msg),
    ])
    .unwrap_err();
    assert!(errs.to_string().contains("PV1-Encounter.yaml:5:10: `ref: patient` names no resource of message map m/messages/ADT_A03.yaml"), "{errs}");
}

/// One message map for a family of trigger events: `event_vars:` gives an event the values that
/// differ from `vars:`; an event it does not name, or a message matched by its structure
/// (MSH-9.3), takes `vars:`. Naming an event the map does not handle, or a var `vars:` lacks,
/// is a load error at its place.
#[test]
fn event_vars_give_each_trigger_event_its_own_values() {
    let enc = "resource: Encounter\nsegment: PV1\nrules:\n  - set: status\n    var: encounter_status\n  - set: class\n    value:\n      code: IMP\n";
    let msg = "message: [ADT^A05, ADT^A14, ADT^A27]\nvars:\n  encounter_status: planned\nevent_vars:\n  ADT^A27: {encounter_status: cancelled}\nresources:\n  - segment: PV1\n    map: PV1-Encounter\n";
    let files = [
        ("segments/PV1-Encounter.yaml", enc),
        ("messages/ADT_A05.yaml", msg),
    ];
    let status = |event: &str| {
        let out = run_texts(
            &files,
            &format!("MSH|^~\\&|A|B|C|D|20260101||ADT^{event}|1|P|2.5\rPV1|1|I\r"),
        )
        .unwrap();
        let (_, _, enc) = out.resources().find(|(t, _, _)| *t == "Encounter").unwrap();
        enc["status"].as_str().unwrap().to_string()
    };
    assert_eq!(status("A05"), "planned");
    assert_eq!(status("A14"), "planned");
    assert_eq!(status("A27"), "cancelled");
    assert_eq!(status("A99^ADT_A05"), "planned", "matched by its structure");
    let bad = "message: [ADT^A05]\nvars:\n  encounter_status: planned\nevent_vars:\n  ADT^A27: {encounter_status: cancelled}\n  ADT^A05: {status: x}\nresources:\n  - segment: PV1\n    map: PV1-Encounter\n";
    let errs = load_error_lines(&[
        ("segments/PV1-Encounter.yaml", enc),
        ("messages/ADT_A05.yaml", bad),
    ])
    .join("\n");
    assert!(errs.contains("ADT_A05.yaml:5:3: `event_vars:` names `ADT^A27`, which is not in this map's `message:` (ADT^A05)"), "{errs}");
    assert!(errs.contains("ADT_A05.yaml:6:12: `event_vars:` of `ADT^A05` sets `status`, which `vars:` does not define"), "{errs}");
}

/// A single-valued path climbing out of a group never reads a segment inside another group: the
/// second order, without a TQ1, gets no timing (not the first order's). `with:` ends a group at
/// the first segment it does not hold, so the SPM after an order's OBX groups is the order's,
/// found from every OBX.
#[test]
fn groups_keep_their_segments_to_themselves() {
    let sr = "resource: ServiceRequest\nsegment: OBR\nrules:\n  - set: status\n    value: active\n  - set: intent\n    value: order\n  - set: occurrenceDateTime\n    from: TQ1-7\n";
    let obs = "resource: Observation\nsegment: OBX\nrules:\n  - set: status\n    value: final\n  - set: code.text\n    from: OBX-3\n  - set: effectiveDateTime\n    from: SPM-17\n";
    let msg = "message: [OML^O21]\nresources:\n  - group: [ORC]\n    resources:\n      - segment: OBR\n        map: OBR-ServiceRequest\n      - group: [OBX]\n        with: [NTE]\n        resources:\n          - segment: OBX\n            map: OBX-Observation\n";
    let out = run_texts(
        &[
            ("segments/OBR-ServiceRequest.yaml", sr),
            ("segments/OBX-Observation.yaml", obs),
            ("messages/OML.yaml", msg),
        ],
        "MSH|^~\\&|A|B|C|D|20260101||OML^O21|1|P|2.5\rORC|NW|1\rTQ1|1||||||20260102\rOBR|1|1||a\rORC|NW|2\rOBR|2|2||b\rOBX|1|ST|x||v\rNTE|1||n\rOBX|2|ST|y||w\rSPM|1|s|||||||||||||||20260103\r",
    )
    .unwrap();
    let dates: Vec<Option<String>> = out
        .resources()
        .filter(|(t, _, _)| *t == "ServiceRequest")
        .map(|(_, _, r)| r["occurrenceDateTime"].as_str().map(String::from))
        .collect();
    assert_eq!(dates, [Some("2026-01-02".to_string()), None]);
    let issued: Vec<Option<String>> = out
        .resources()
        .filter(|(t, _, _)| *t == "Observation")
        .map(|(_, _, r)| r["effectiveDateTime"].as_str().map(String::from))
        .collect();
    assert_eq!(issued.len(), 2);
    assert!(
        issued
            .iter()
            .all(|i| i.as_deref().is_some_and(|d| d.starts_with("2026-01-03"))),
        "{issued:?}"
    );
    let bad = msg.replace("with: [NTE]", "with: [N]");
    let errs = load_error_lines(&[
        ("segments/OBR-ServiceRequest.yaml", sr),
        ("segments/OBX-Observation.yaml", obs),
        ("messages/OML.yaml", &bad),
    ])
    .join("\n");
    assert!(
        errs.contains("OML.yaml:8:15: `with:` names the segments a group holds"),
        "{errs}"
    );
}

/// A repeating element read from another segment takes every one of the rule's own group (an
/// OBX's NTEs) and, where the group holds none, the segment that starts an enclosing group (the
/// OBX's order, its OBR) — never a segment that merely sits in an enclosing group: an OBX
/// without notes does not take its order's NTE.
#[test]
fn a_repeating_element_reads_the_segment_that_starts_an_enclosing_group() {
    let obs = "resource: Observation\nsegment: OBX\nrules:\n  - set: status\n    value: final\n  - set: code.text\n    from: OBX-3\n  - set: category\n    from: OBR-24\n    rules:\n      - set: text\n        from: .1\n  - set: note\n    from: NTE-3\n    rules:\n      - set: text\n        from: .\n";
    let msg = "message: [ORU^R01]\nresources:\n  - group: [ORC, OBR]\n    resources:\n      - group: [OBX]\n        with: [NTE]\n        resources:\n          - segment: OBX\n            map: OBX-Observation\n";
    let out = run_texts(
        &[
            ("segments/OBX-Observation.yaml", obs),
            ("messages/ORU.yaml", msg),
        ],
        &[
            "MSH|^~\\&|A|B|C|D|20260101||ORU^R01|1|P|2.5",
            &format!("OBR|1|1||a{}|HM", "|".repeat(19)),
            "NTE|1||order note",
            "OBX|1|ST|x||v",
            "NTE|1||result note",
            "OBX|2|ST|y||w",
            &format!("OBR|2|2||b{}|MB", "|".repeat(19)),
            "OBX|1|ST|z||u",
        ]
        .join("\r"),
    )
    .unwrap();
    let got: Vec<(String, String, String)> = out
        .resources()
        .filter(|(t, _, _)| *t == "Observation")
        .map(|(_, _, r)| {
            let text = |v: &serde_json::Value| v[0]["text"].as_str().unwrap_or("-").to_string();
            (
                r["code"]["text"].as_str().unwrap().to_string(),
                text(&r["category"]),
                text(&r["note"]),
            )
        })
        .collect();
    let row = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
    assert_eq!(
        got,
        [
            row("x", "HM", "result note"),
            row("y", "HM", "-"),
            row("z", "MB", "-")
        ]
    );
}

/// Ids are computed while the message is planned; a lookup made then (an id part, a `when:`)
/// must not read inside a sibling group planned after it. A patient's OBX before any order
/// keeps a message-specific id instead of taking the filler number of the order further down,
/// so it no longer collides with another order-less OBX of the same code and set id.
#[test]
fn ids_never_read_a_later_sibling_group() {
    let obs = "resource: Observation\nsegment: OBX\nid: [\"OBR-3\", \"OBX-3\", \"OBX-1\"]\nrules:\n  - set: status\n    value: final\n  - set: code.text\n    from: OBX-3\n";
    let msg = "message: [OUL^R22]\nresources:\n  - group: [OBX]\n    until: SPM\n    resources:\n      - segment: OBX\n        map: OBX-Observation\n  - group: [SPM]\n    resources:\n      - group: [OBX]\n        until: OBR\n        resources:\n          - segment: OBX\n            map: OBX-Observation\n      - group: [OBR]\n        resources:\n          - group: [OBX]\n            resources:\n              - segment: OBX\n                map: OBX-Observation\n";
    let out = run_texts(
        &[
            ("segments/OBX-Observation.yaml", obs),
            ("messages/OUL.yaml", msg),
        ],
        "MSH|^~\\&|A|B|C|D|20260101||OUL^R22|1|P|2.5\rPID|1||p1\rOBX|27|NM|hr||60\rSPM|1|s1\rOBX|27|NM|hr||61\rOBR|1||F-1|panel\rOBX|27|NM|hr||62\r",
    )
    .unwrap();
    let ids: BTreeSet<&str> = out
        .entries()
        .filter(|(t, _)| *t == "Observation")
        .map(|(_, id)| id)
        .collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(out.dropped.is_empty(), "{:?}", out.dropped);
}

/// Every non-empty component of every field, as `SEG-f.c` / `SEG[n]-f.c` (independent splitter).
fn all_nonempty(text: &str) -> BTreeSet<(String, usize, usize, usize)> {
    let mut out = BTreeSet::new();
    let segs: Vec<&str> = text.split(['\r', '\n']).filter(|l| l.len() >= 3).collect();
    let mut occ = std::collections::HashMap::new();
    for s in &segs {
        let name = &s[..3];
        let o = {
            let e = occ.entry(name.to_string()).or_insert(0usize);
            *e += 1;
            *e
        };
        let fields: Vec<&str> = s.split('|').collect();
        for (i, f) in fields.iter().enumerate().skip(1) {
            let field = if name == "MSH" { i + 1 } else { i };
            if name == "MSH" && field <= 2 {
                continue;
            }
            for rep in f.split('~') {
                for (c, comp) in rep.split('^').enumerate() {
                    if comp.split('&').any(|x| !x.is_empty() && x != "\"\"") {
                        out.insert((name.to_string(), o, field, c + 1));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn with_only_a_header_map_every_nonempty_field_of_a_corpus_message_is_reported() {
    let path = repo().join("../shared/corpus/hl7v2/ms-fhir-converter/ADT-A01-01.hl7");
    let Ok(bytes) = std::fs::read(&path) else {
        eprintln!("SKIP: corpus sample {} absent", path.display());
        return;
    };
    let text = String::from_utf8_lossy(&bytes)
        .trim_start_matches('\u{feff}')
        .to_string();
    let msg = "message: [ADT^A01]\nresources:\n  - name: header\n    segment: MSH\n    map: MSH-MessageHeader\n";
    let out = run_texts(
        &[
            ("segments/MSH-MessageHeader.yaml", HEADER),
            ("messages/ADT_A01.yaml", msg),
        ],
        &text,
    )
    .unwrap();
    let reported: BTreeSet<String> = out.unconsumed.iter().map(ToString::to_string).collect();
    let all = all_nonempty(&text);
    let counts: std::collections::HashMap<String, usize> =
        all.iter().fold(Default::default(), |mut m, (s, o, _, _)| {
            let e = m.entry(s.clone()).or_insert(0);
            *e = (*e).max(*o);
            m
        });
    let mut missing = Vec::new();
    for (seg, o, f, c) in &all {
        if seg == "MSH" && (*f == 9 || (*f == 10)) {
            continue; // MSH-9 picks the map; MSH-9.2 and MSH-10 are read by the header map
        }
        let occ = if counts[seg] > 1 {
            format!("[{o}]")
        } else {
            String::new()
        };
        let field_form = format!("{seg}{occ}-{f}");
        let comp_form = format!("{seg}{occ}-{f}.{c}");
        if !reported.contains(&field_form) && !reported.contains(&comp_form) {
            missing.push(comp_form);
        }
    }
    assert!(
        missing.is_empty(),
        "non-empty fields missing from the report: {missing:?}"
    );
    assert!(reported.iter().any(|r| r.starts_with("PID-5")));
    assert!(reported.len() > 100, "{}", reported.len());
}

#[test]
fn the_library_reports_what_it_leaves_unmapped_in_a_corpus_message() {
    let path = repo().join("../shared/corpus/hl7v2/ms-fhir-converter/ADT-A01-01.hl7");
    let Ok(bytes) = std::fs::read(&path) else {
        eprintln!("SKIP: corpus sample {} absent", path.display());
        return;
    };
    let out = library()
        .map_bytes(
            &bytes,
            tributary_terminology::builtin(),
            &RunOptions::default(),
        )
        .unwrap();
    // ROL and DB1 have no segment map in the library: every non-empty field of them is listed
    let text = String::from_utf8_lossy(&bytes).to_string();
    let listed: Vec<String> = out.unconsumed.iter().map(ToString::to_string).collect();
    for (seg, _, f, c) in all_nonempty(&text).iter().filter(|(s, ..)| s == "DB1") {
        let field = format!("{seg}-{f}");
        let comp = format!("{seg}-{f}.{c}");
        assert!(
            listed.contains(&field) || listed.contains(&comp),
            "{comp} not reported"
        );
    }
    // and what it maps is not listed
    assert!(!listed
        .iter()
        .any(|u| u == "PID-8" || u == "PID-5.1" || u == "PID-7"));
}

#[test]
fn lineage_names_source_path_and_rule_for_each_element() {
    let bytes = std::fs::read(repo().join("mappings/hl7v2/messages/ADT_A01.hl7")).unwrap();
    let out = library()
        .map_bytes(
            &bytes,
            tributary_terminology::builtin(),
            &RunOptions::default(),
        )
        .unwrap();
    let gender = out
        .lineage
        .iter()
        .find(|l| l.element.ends_with(".gender") && l.element.starts_with("Patient/"))
        .unwrap();
    assert_eq!(gender.source, "PID-8");
    assert!(
        gender.rule.ends_with("segments/PID-Patient.yaml:65"),
        "{}",
        gender.rule
    );
    let family = out
        .lineage
        .iter()
        .find(|l| l.element.starts_with("Patient/") && l.element.ends_with(".name[0].family"))
        .unwrap();
    assert_eq!(family.source, "PID-5[1].1.1");
    assert!(family.rule.contains("datatypes/XPN.yaml:"));
}

#[test]
fn ids_are_deterministic_per_tenant_and_source_identifier() {
    let bytes = std::fs::read(repo().join("mappings/hl7v2/messages/ADT_A08.hl7")).unwrap();
    let set = library();
    let a = map_as(&set, &bytes, "t1");
    let b = map_as(&set, &bytes, "t1");
    let c = map_as(&set, &bytes, "t2");
    assert_eq!(a.bundle(), b.bundle());
    let pid = |m: &tributary_mapping::MappedBundle| {
        m.resources()
            .find(|(t, _, _)| *t == "Patient")
            .unwrap()
            .1
            .to_string()
    };
    assert_eq!(
        pid(&a),
        tributary_core::deterministic_id(&[
            "t1",
            "Patient",
            "MRN70001",
            "RIVERSIDE",
            "2.16.840.1.113883.3.9999.1"
        ])
    );
    assert_ne!(pid(&a), pid(&c));
    // the Encounter references that Patient id
    let enc = a.resources().find(|(t, _, _)| *t == "Encounter").unwrap().2;
    assert_eq!(enc["subject"]["reference"], format!("Patient/{}", pid(&a)));
    let bundle = a.bundle();
    assert_eq!(bundle["type"], "transaction");
    for e in bundle["entry"].as_array().unwrap() {
        assert_eq!(e["request"]["method"], "PUT");
    }
}

#[test]
fn mapping_errors_carry_paths_never_values() {
    let pid = "resource: Patient\nsegment: PID\nrules:\n  - set: birthDate\n    from: PID-7\n    on_error: fail\n";
    let msg = "message: [ADT^A01]\nresources:\n  - name: patient\n    segment: PID\n    map: PID-Patient\n";
    let err = run_texts(
        &[
            ("segments/PID-Patient.yaml", pid),
            ("messages/ADT.yaml", msg),
        ],
        "MSH|^~\\&|A|B|C|D|20260101||ADT^A01|1|P|2.5\rPID|1||X123||SECRETNAME||19AB0101\r",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("m/segments/PID-Patient.yaml:4")
            && err.contains("PID-7")
            && err.contains("birthDate"),
        "{err}"
    );
    assert!(
        !err.contains("19AB0101") && !err.contains("SECRETNAME") && !err.contains("X123"),
        "{err}"
    );
}

#[test]
fn a_join_transform_applies_once_to_the_joined_text() {
    let doc = "resource: DocumentReference\nsegment: TXA\nrules:\n  - set: status\n    value: current\n  - set: content\n    rules:\n      - set: attachment.data\n        from: OBX-5\n        join: \"\\n\"\n        transform: base64\n";
    let msg = "message: [MDM^T02]\nresources:\n  - segment: TXA\n    map: TXA-DocumentReference\n";
    let out = run_texts(
        &[
            ("segments/TXA-DocumentReference.yaml", doc),
            ("messages/MDM.yaml", msg),
        ],
        "MSH|^~\\&|A|B|C|D|20260101||MDM^T02|1|P|2.5\rTXA|1|DS\rOBX|1|TX|x||ab\rOBX|2|TX|x||c\r",
    )
    .unwrap();
    let (_, _, doc) = out
        .resources()
        .find(|(t, _, _)| *t == "DocumentReference")
        .unwrap();
    // base64("ab\nc"), not base64("ab") + "\n" + base64("c")
    assert_eq!(doc["content"][0]["attachment"]["data"], "YWIKYw==");
}

/// Order and result numbers are unique only within the system that assigns them: the same
/// filler number for two patients must give two sets of resources, never one that the second
/// patient's message overwrites. For one patient, a corrected result keeps its ids.
#[test]
fn order_and_result_ids_are_scoped_to_the_patient() {
    let text = std::fs::read_to_string(repo().join("mappings/hl7v2/messages/ORU_R01.hl7")).unwrap();
    let set = library();
    let ids = |message: &str| -> BTreeSet<(String, String)> {
        let out = map_as(&set, message.as_bytes(), "t1");
        out.resources()
            .filter(|(t, _, _)| {
                matches!(
                    *t,
                    "Observation" | "DiagnosticReport" | "ServiceRequest" | "Specimen"
                )
            })
            .map(|(t, id, _)| (t.to_string(), id.to_string()))
            .collect()
    };
    let first = ids(&text);
    assert!(first.len() >= 8, "{first:?}");
    let other_patient = ids(&text.replace("MRN70001^", "MRN70002^"));
    assert!(
        first.is_disjoint(&other_patient),
        "a second patient with the same order numbers shares ids: {:?}",
        first.intersection(&other_patient).collect::<Vec<_>>()
    );
    let corrected = ids(&text
        .replace("||105|mg/dL", "||106|mg/dL")
        .replace("SYN-ORU-0001", "SYN-ORU-0002"));
    assert_eq!(
        first, corrected,
        "a corrected result for the same patient keeps its ids"
    );
}

/// A list inside `id:` takes the first path that holds a value: the library's Practitioner id
/// falls back from the assigning authority (XCN-9) to the sending facility (MSH-4), so an
/// un-namespaced person id from two facilities gives two Practitioners, and one with an
/// authority stays one.
#[test]
fn an_id_part_list_takes_the_first_value_and_scopes_bare_person_ids_to_the_sender() {
    let text = std::fs::read_to_string(repo().join("mappings/hl7v2/messages/ADT_A01.hl7")).unwrap();
    let set = library();
    let practitioners = |message: &str| -> Vec<(String, String)> {
        let out = map_as(&set, message.as_bytes(), "t1");
        let mut found: Vec<(String, String)> = out
            .resources()
            .filter(|(t, _, _)| *t == "Practitioner")
            .map(|(_, id, r)| {
                (
                    r["name"][0]["family"].as_str().unwrap_or("").to_string(),
                    id.to_string(),
                )
            })
            .collect();
        found.sort();
        found
    };
    let id_of = |all: &[(String, String)], family: &str| {
        all.iter()
            .find(|(f, _)| f == family)
            .map(|(_, id)| id.clone())
            .unwrap()
    };
    let here = practitioners(&text);
    let elsewhere = practitioners(&text.replace("|SYNTH_ADT|RIVERSIDE^", "|SYNTH_ADT|LAKESIDE^"));
    // R700 (Referring) has no XCN-9: the sending facility scopes it.
    assert_ne!(id_of(&here, "Referring"), id_of(&elsewhere, "Referring"));
    // A700 (Attending) has XCN-9 = RIVERSIDE&2.16.840.1.113883.3.9999.1: one person everywhere.
    assert_eq!(id_of(&here, "Attending"), id_of(&elsewhere, "Attending"));
    assert_eq!(here, practitioners(&text), "deterministic");

    let bad = "resource: Practitioner\nid: [\".1\", [\".9.1\", constant]]\nrules:\n  - set: active\n    value: true\n";
    let header = "resource: MessageHeader\nsegment: MSH\nrules:\n  - set: eventCoding\n    rules:\n      - set: code\n        from: MSH-9.2\n  - set: source.endpoint\n    value: mllp://x\n  - set: author\n    from: MSH-22\n    create: XCN-Practitioner\n";
    let errors = load_error_lines(&[
        ("datatypes/XCN-Practitioner.yaml", bad),
        ("segments/MSH-MessageHeader.yaml", header),
        (
            "messages/ADT.yaml",
            "message: [ADT^A01]\nresources:\n  - segment: MSH\n    map: MSH-MessageHeader\n",
        ),
    ]);
    assert!(
        errors.iter().any(|e| e.contains("XCN-Practitioner.yaml:2:")
            && e.contains("`constant` is not a source path")),
        "{errors:?}"
    );
}

/// A map that uses itself — through `map:` or `create:`, directly or via another map — would
/// recurse until the stack overflows on the first message: it is a load error at the rule that
/// closes the cycle.
#[test]
fn cyclic_maps_are_load_errors_at_the_rule_that_closes_the_cycle() {
    let a = "datatype: CWE\nto: CodeableConcept\nrules:\n  - set: text\n    from: .2\n  - set: coding\n    rules:\n      - set: code\n        from: .1\n  - set: extension\n    rules:\n      - set: url\n        value: http://x\n      - set: valueCodeableConcept\n        map: CWE-B\n";
    let b = "datatype: CWE\nto: CodeableConcept\nrules:\n  - set: text\n    from: .1\n  - set: extension\n    rules:\n      - set: url\n        value: http://y\n      - set: valueCodeableConcept\n        map: CWE-A\n";
    let xcn = "resource: Practitioner\nid: [\".1\"]\nrules:\n  - set: name\n    rules:\n      - set: family\n        from: .2\n  - set: extension\n    rules:\n      - set: url\n        value: http://z\n      - set: valueReference\n        create: XCN-Practitioner\n";
    let pid = "resource: Patient\nsegment: PID\nrules:\n  - set: maritalStatus\n    from: PID-16\n    map: CWE-A\n  - set: generalPractitioner\n    from: PD1-4\n    create: XCN-Practitioner\n";
    let msg = "message: [ADT^A01]\nresources:\n  - name: patient\n    segment: PID\n    map: PID-Patient\n";
    let errors = load_error_lines(&[
        ("datatypes/CWE-A.yaml", a),
        ("datatypes/CWE-B.yaml", b),
        ("datatypes/XCN-Practitioner.yaml", xcn),
        ("segments/PID-Patient.yaml", pid),
        ("messages/ADT.yaml", msg),
    ]);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors.iter().any(|e| e.starts_with(
            "m/datatypes/CWE-B.yaml:10:12: `map: CWE-A` makes a cycle (CWE-A → CWE-B → CWE-A)"
        )),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.starts_with("m/datatypes/XCN-Practitioner.yaml:12:12: `create: XCN-Practitioner` makes a cycle (XCN-Practitioner → XCN-Practitioner)")),
        "{errors:?}"
    );
}

/// `default_timezone` is `Z` or `±HH:MM` within real offsets; anything else — a multi-byte sign
/// that used to panic the loader, an hour of 99 — is a load error naming the setting.
#[test]
fn default_timezone_is_checked_without_panicking() {
    let msg = "message: [ADT^A01]\nresources:\n  - segment: MSH\n    map: MSH-MessageHeader\n";
    let with = |tz: &str| {
        load_texts(&[
            ("mapping-set.yaml", &format!("default_timezone: \"{tz}\"\n")),
            ("segments/MSH-MessageHeader.yaml", HEADER),
            ("messages/ADT.yaml", msg),
        ])
    };
    for good in ["Z", "+00:00", "-05:00", "+05:30", "+14:00", "-12:00"] {
        assert_eq!(with(good).unwrap().default_timezone, good);
    }
    for bad in [
        "±1:00", "+99:99", "+15:00", "+01:60", "+1:00", "0500", "+05:3x", "", "−05:00",
    ] {
        let errs = with(bad).unwrap_err().0;
        assert!(
            errs.iter().any(|e| e.file == "m/mapping-set.yaml"
                && e.line == 1
                && e.message.starts_with("default_timezone must be")),
            "{bad}: {errs:?}"
        );
    }
}

/// FHIR decimals keep their precision (R4 §2.1.28.0.1: `0.010` is not `0.01`): a result of
/// `7.10` is written `7.10`, in the Bundle, in the stored resource and through a `Value`.
#[test]
fn decimals_keep_their_written_precision() {
    let text = std::fs::read_to_string(repo().join("mappings/hl7v2/messages/ORU_R01.hl7"))
        .unwrap()
        .replace("||105|mg/dL", "||7.10|mg/dL")
        .replace("||^1^:^128|", "||^1.0^:^128.00|");
    let mut out = map_as(&library(), text.as_bytes(), "t1");
    let bundle = String::from_utf8(out.to_json()).unwrap();
    let observations: Vec<String> = out
        .resources()
        .filter(|(t, _, _)| *t == "Observation")
        .map(|(_, _, v)| serde_json::to_string(&v).unwrap())
        .collect();
    let stored: Vec<String> = out
        .take_resources()
        .into_iter()
        .filter(|r| r.resource_type == "Observation")
        .map(|r| {
            let mut json = Vec::new();
            r.write_stamped(&mut json, "1", "2026-12-06T00:00:00Z");
            String::from_utf8(json).unwrap()
        })
        .collect();
    for written in ["7.10", "1.0", "128.00"] {
        let literal = format!(":{written}");
        assert!(bundle.contains(&literal), "{written} in the Bundle");
        assert!(
            observations.iter().any(|o| o.contains(&literal)),
            "{written} via Value"
        );
        assert!(
            stored.iter().any(|o| o.contains(&literal)),
            "{written} as stored"
        );
    }
}

/// `write:` is `replace`, `merge`, `amend`, `delete` or `none`; anything else is a load error at
/// its position. A merge or amend entry is a PATCH in the Bundle, a delete a DELETE without a
/// resource, a `none` no entry at all, while the others stay conditional PUTs.
#[test]
fn write_modes_give_their_bundle_entries_and_other_write_values_are_load_errors() {
    let pat = "resource: Patient\nsegment: PID\nid: [\"PID-3[1].1\"]\nrules:\n  - set: active\n    value: false\n";
    let msg = |write: &str| {
        format!("message: [ADT^A40]\nresources:\n  - segment: MSH\n    map: MSH-Header\n  - segment: PID\n    map: PID-Patient\n    write: {write}\n")
    };
    let bad = msg("upsert");
    let errs = load_texts(&[
        ("segments/MSH-Header.yaml", HEADER),
        ("segments/PID-Patient.yaml", pat),
        ("messages/ADT_A40.yaml", &bad),
    ])
    .unwrap_err();
    assert!(
        errs.to_string()
            .contains("ADT_A40.yaml:7:12: `write:` is `replace` (the default"),
        "{errs}"
    );
    let good = msg("merge");
    let set = load_texts(&[
        ("segments/MSH-Header.yaml", HEADER),
        ("segments/PID-Patient.yaml", pat),
        ("messages/ADT_A40.yaml", &good),
    ])
    .unwrap();
    let m = map_as(
        &set,
        b"MSH|^~\\&|A|B|C|D|202601010000||ADT^A40|1|P|2.5.1\rPID|1||M1\r",
        "t1",
    );
    let b = m.bundle();
    let methods: Vec<&str> = b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["request"]["method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, ["PUT", "PATCH"]);
    assert_eq!(b["entry"][1]["resource"]["resourceType"], "Parameters");
    assert_eq!(serde_json::to_vec(&b).unwrap(), m.to_json());

    let message = b"MSH|^~\\&|A|B|C|D|202601010000||ADT^A40|1|P|2.5.1\rPID|1||M1\r";
    for (write, methods) in [
        ("amend", &["PUT", "PATCH"][..]),
        ("delete", &["PUT", "DELETE"][..]),
        ("none", &["PUT"][..]),
    ] {
        let set = load_texts(&[
            ("segments/MSH-Header.yaml", HEADER),
            ("segments/PID-Patient.yaml", pat),
            ("messages/ADT_A40.yaml", &msg(write)),
        ])
        .unwrap();
        let mut m = map_as(&set, message, "t1");
        let b = m.bundle();
        let entries = b["entry"].as_array().unwrap();
        let got: Vec<&str> = entries
            .iter()
            .map(|e| e["request"]["method"].as_str().unwrap())
            .collect();
        assert_eq!(got, methods, "write: {write}");
        let patch = write == "amend";
        assert!(entries[1..]
            .iter()
            .all(|e| e.get("resource").is_some() == patch));
        assert_eq!(
            serde_json::to_vec(&b).unwrap(),
            m.to_json(),
            "write: {write}"
        );
        let writes: Vec<_> = m.take_resources().into_iter().map(|r| r.write).collect();
        assert_eq!(writes.len(), methods.len());
    }
}

/// The events the library maps through another event's map do what their event says: each
/// fixture sent again as a sibling event (MSH-9.2 and the EVN event type changed).
#[test]
fn sibling_events_map_with_their_own_meaning() {
    let set = library();
    let as_event = |fixture: &str, from: &str, to: &str| {
        let text = std::fs::read_to_string(repo().join("mappings/hl7v2/messages").join(fixture))
            .unwrap()
            .replacen(&format!("ADT^{from}"), &format!("ADT^{to}"), 1)
            .replace(&format!("EVN|{from}"), &format!("EVN|{to}"));
        assert!(text.contains(&format!("ADT^{to}")), "{fixture}");
        map_as(&set, text.as_bytes(), "t1")
    };
    let encounter_status = |out: &tributary_mapping::MappedBundle| {
        let (_, _, enc) = out.resources().find(|(t, _, _)| *t == "Encounter").unwrap();
        enc["status"].as_str().unwrap().to_string()
    };
    for (event, status) in [
        ("A21", "onleave"),
        ("A22", "in-progress"),
        ("A52", "in-progress"),
        ("A53", "onleave"),
        ("A32", "in-progress"),
        ("A33", "in-progress"),
    ] {
        let out = as_event("ADT_A02.hl7", "A02", event);
        assert_eq!(encounter_status(&out), status, "{event}");
    }
    assert_eq!(
        encounter_status(&as_event("ADT_A11.hl7", "A11", "A38")),
        "cancelled"
    );
    assert_eq!(
        encounter_status(&as_event("ADT_A08.hl7", "A08", "A54")),
        "in-progress"
    );
    // the older merges link the surviving Patient to the merged one, as A40 does
    for event in ["A18", "A30"] {
        let out = as_event("ADT_A40.hl7", "A40", event);
        let links: Vec<String> = out
            .resources()
            .filter(|(t, _, _)| *t == "Patient")
            .filter_map(|(_, _, p)| p["link"][0]["type"].as_str().map(String::from))
            .collect();
        assert_eq!(links, ["replaces", "replaced-by"], "{event}");
        assert_eq!(
            out.bundle()["entry"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["request"]["method"] == "PATCH")
                .count(),
            1,
            "{event}: the merged record"
        );
    }
    // a visit merge or renumbering deletes the Encounter stored under the old number
    for event in ["A42", "A50"] {
        let out = as_event("ADT_A45.hl7", "A45", event);
        let deleted: Vec<String> = out.bundle()["entry"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["request"]["method"] == "DELETE")
            .map(|e| e["request"]["url"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(deleted.len(), 1, "{event}");
        assert!(deleted[0].starts_with("Encounter/"), "{event}");
    }
    let out = as_event("ADT_A41.hl7", "A41", "A35");
    assert!(out.bundle()["entry"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["request"]["method"] == "PATCH"
            && e["request"]["url"]
                .as_str()
                .unwrap()
                .starts_with("Account/")));
}

/// A variable a map reads (`var:`, or `$name` in a `when:` of a rule or of the message map)
/// that the message map does not define is a load error at the place that reads it, naming the
/// message map — never a silently false condition.
#[test]
fn undefined_variables_are_load_errors_where_they_are_read() {
    let enc = "resource: Encounter\nsegment: PV1\nrules:\n  - set: status\n    var: encounter_status\n  - set: class.code\n    when: $kind == visit\n    value: IMP\n";
    let msg = "message: [ADT^A01]\nvars:\n  other: x\nresources:\n  - segment: PV1\n    map: PV1-Encounter\n    when: $admitting == yes\n";
    let errs = load_error_lines(&[
        ("segments/PV1-Encounter.yaml", enc),
        ("messages/ADT_A01.yaml", msg),
    ])
    .join("\n");
    for (at, var) in [
        ("PV1-Encounter.yaml:4:8", "encounter_status"),
        ("PV1-Encounter.yaml:6:8", "kind"),
        ("ADT_A01.yaml:7:11", "admitting"),
    ] {
        assert!(
            errs.lines().any(|l| l.contains(at)
                && l.contains(&format!(
                    "`${var}` is not defined under `vars:` of message map"
                ))
                && l.contains("ADT_A01.yaml")),
            "{at} {var}:\n{errs}"
        );
    }
}

/// Maps one HL7 v2 message with `set` as messages from `feed` are mapped (tenant `default`).
fn map_as_feed(
    set: &MappingSet,
    message: &[u8],
    feed: Option<&str>,
) -> tributary_mapping::MappedBundle {
    set.map_bytes(
        message,
        tributary_terminology::builtin(),
        &RunOptions {
            feed,
            lineage: false,
            ..Default::default()
        },
    )
    .unwrap()
}

/// The library's texts with `feeds:` added to mapping-set.yaml.
fn library_with_feeds(feeds: &str) -> Result<MappingSet, tributary_mapping::LoadErrors> {
    let dir = repo().join("mappings/hl7v2");
    let mut texts = MappingSet::texts(&dir).unwrap();
    let settings = texts
        .iter_mut()
        .find(|(p, _)| p == Path::new("mapping-set.yaml"))
        .unwrap();
    settings.1.push_str(feeds);
    MappingSet::from_texts(&dir, &texts)
}

/// A feed whose results are all laboratory results but whose orders carry no OBR-24 gets its
/// Observations `laboratory` and its reports US Core's `LAB` through `feeds:`; another feed's
/// messages, and an OBR-24 where sent, are unaffected.
#[test]
fn a_feed_states_the_category_its_orders_leave_out() {
    let set =
        library_with_feeds("feeds:\n  elr-lab:\n    vars:\n      result_category: laboratory\n")
            .unwrap_or_else(|e| panic!("{e}"));
    let oru = |obr24: &str| {
        [
            "MSH|^~\\&|SYNTH|RIVERSIDE|TRIBUTARY|HIE|20261123081500-0600||ORU^R01^ORU_R01|C-1|P|2.5.1",
            "PID|1||MRN1^^^RIVERSIDE^MR||One^Pat",
            &format!("OBR|1|P-1||24323-8^Metabolic panel^LN{}|{obr24}", "|".repeat(19)),
            "OBX|1|NM|2345-7^Glucose^LN||105|mg/dL|||||F",
        ]
        .join("\r")
    };
    let categories = |feed: Option<&str>, obr24: &str| -> Vec<(String, String)> {
        let out = map_as_feed(&set, oru(obr24).as_bytes(), feed);
        let mut got = Vec::new();
        for (t, _, r) in out.resources() {
            if !matches!(t, "Observation" | "DiagnosticReport") {
                continue;
            }
            for c in r["category"].as_array().into_iter().flatten() {
                for coding in c["coding"].as_array().unwrap() {
                    got.push((t.to_string(), coding["code"].as_str().unwrap().to_string()));
                }
            }
        }
        got
    };
    let pair = |t: &str, c: &str| (t.to_string(), c.to_string());
    assert_eq!(
        categories(Some("elr-lab"), ""),
        [
            pair("Observation", "laboratory"),
            pair("DiagnosticReport", "LAB")
        ]
    );
    assert_eq!(categories(None, ""), []);
    assert_eq!(categories(Some("another-feed"), ""), []);
    // OBR-24 wins over the feed's default
    assert_eq!(
        categories(Some("elr-lab"), "RAD"),
        [
            pair("Observation", "imaging"),
            pair("DiagnosticReport", "RAD")
        ]
    );
}

/// A feed's variables never replace what `event_vars:` gives one trigger event (a leave of
/// absence stays `onleave`), and a name no `vars:` defines is a load error at its place.
#[test]
fn feed_variables_yield_to_event_variables_and_must_be_defined() {
    let set = library_with_feeds("feeds:\n  adt-a:\n    vars:\n      encounter_status: finished\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let status = |event: &str, feed: Option<&str>| {
        let msg = [
            &format!("MSH|^~\\&|SYNTH|RIVERSIDE|TRIBUTARY|HIE|20261123081500-0600||ADT^{event}^ADT_A02|C-1|P|2.5.1"),
            "EVN||20261123081500-0600",
            "PID|1||MRN1^^^RIVERSIDE^MR||One^Pat",
            "PV1|1|I|W1^101^A^RIVERSIDE||||||||||||||||V1^^^RIVERSIDE^VN",
        ]
        .join("\r");
        let out = map_as_feed(&set, msg.as_bytes(), feed);
        let status = out
            .resources()
            .find(|(t, _, _)| *t == "Encounter")
            .map(|(_, _, r)| r["status"].as_str().unwrap().to_string());
        status.unwrap()
    };
    assert_eq!(status("A02", None), "in-progress");
    assert_eq!(status("A02", Some("adt-a")), "finished");
    assert_eq!(status("A21", Some("adt-a")), "onleave");

    let errs = library_with_feeds("feeds:\n  lab:\n    vars:\n      result_categry: laboratory\n")
        .unwrap_err()
        .to_string();
    assert!(
        errs.contains("mapping-set.yaml:")
            && errs.contains("feed `lab` sets `result_categry`")
            && errs.contains("did you mean `result_category`?"),
        "{errs}"
    );
}

/// A variable declared with the values it may take (`one_of:`) or their form (`format: uri`)
/// refuses any other value a feed gives it, at its `file:line:col` and with the nearest value:
/// a misspelt category would otherwise be written into every result of that feed, where no
/// `category=laboratory` search or scope finds it. Empty (none) stays allowed.
#[test]
fn a_feed_value_outside_its_variable_s_declared_values_is_a_load_error() {
    let errs = library_with_feeds(
        "feeds:\n  lab:\n    vars:\n      result_category: Laboratory\n      identifier_system: MRN SYSTEM\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        errs.contains("mapping-set.yaml:")
            && errs.contains("feed `lab` sets `result_category` to `Laboratory`")
            && errs.contains("did you mean `laboratory`?"),
        "{errs}"
    );
    assert!(
        errs.contains(
            "feed `lab` sets `identifier_system` to `MRN SYSTEM`, which is not an absolute URI"
        ),
        "{errs}"
    );
    let ok = "feeds:\n  lab:\n    vars:\n      result_category: vital-signs\n      identifier_system: urn:oid:2.16.840.1.113883.3.9999.7\n  other:\n    vars:\n      result_category: \"\"\n";
    library_with_feeds(ok).unwrap_or_else(|e| panic!("{e}"));
}

/// The long form works in a message map too, and its `one_of:` holds for the map's own value,
/// its `event_vars:` and a feed's; a malformed declaration is an error where it is written.
#[test]
fn a_message_map_variable_declares_its_values_for_events_and_feeds() {
    let files = |status: &str, event: &str, feed: &str| {
        vec![
            (
                PathBuf::from("mapping-set.yaml"),
                format!("name: t\nfeeds:\n  f:\n    vars:\n      status: {feed}\n"),
            ),
            (
                PathBuf::from("segments/PID-Patient.yaml"),
                "resource: Patient\nid: [PID-3.1]\nrules:\n  - set: gender\n    var: status\n".to_string(),
            ),
            (
                PathBuf::from("messages/ADT_A01.yaml"),
                format!(
                    "message: [ADT^A01, ADT^A03]\nvars:\n  status:\n    value: {status}\n    one_of: [male, female]\nevent_vars:\n  ADT^A03:\n    status: {event}\nresources:\n  - name: patient\n    segment: PID\n    map: PID-Patient\n"
                ),
            ),
        ]
    };
    MappingSet::from_texts(Path::new("t"), &files("male", "female", "female"))
        .unwrap_or_else(|e| panic!("{e}"));
    for (bad, whose) in [
        (
            files("mail", "female", "female"),
            "`vars:` sets `status` to `mail`",
        ),
        (
            files("male", "femal", "female"),
            "`event_vars:` of `ADT^A03` sets `status` to `femal`",
        ),
        (
            files("male", "female", "other"),
            "feed `f` sets `status` to `other`",
        ),
    ] {
        let errs = MappingSet::from_texts(Path::new("t"), &bad)
            .unwrap_err()
            .to_string();
        assert!(errs.contains(whose), "{errs}");
    }
    let mut broken = files("male", "female", "female");
    broken[2].1 = broken[2]
        .1
        .replace("one_of: [male, female]", "one_of: male\n    format: url");
    let errs = MappingSet::from_texts(Path::new("t"), &broken)
        .unwrap_err()
        .to_string();
    assert!(
        errs.contains("messages/ADT_A01.yaml:5:")
            && errs.contains("`one_of:` of `status` is a list"),
        "{errs}"
    );
    assert!(
        errs.contains("`format:` of `status` can only be `uri`"),
        "{errs}"
    );
}

/// A feed that sends ids without an assigning authority names their system once, for all of
/// them; ids that carry an authority keep theirs, and resource ids do not change with it.
#[test]
fn a_feed_names_the_system_of_the_ids_it_sends_unqualified() {
    let set = library_with_feeds(
        "feeds:\n  clinic-a:\n    vars:\n      identifier_system: urn:oid:2.16.840.1.113883.3.9999.7\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let msg = [
        "MSH|^~\\&|SYNTH|CLINIC_A|TRIBUTARY|HIE|20261123081500-0600||ADT^A04^ADT_A01|C-1|P|2.5.1",
        "EVN||20261123081500-0600",
        "PID|1||MRN1^^^^MR~X9^^^OTHER&1.2.3&ISO^MR||One^Pat",
        "PV1|1|O",
    ]
    .join("\r");
    let patient = |feed: Option<&str>| {
        let out = map_as_feed(&set, msg.as_bytes(), feed);
        let found = out
            .resources()
            .find(|(t, _, _)| *t == "Patient")
            .map(|(_, id, r)| (id.to_string(), r));
        found.unwrap()
    };
    let systems = |r: &serde_json::Value| -> Vec<Option<String>> {
        r["identifier"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["system"].as_str().map(String::from))
            .collect()
    };
    let (id_a, a) = patient(Some("clinic-a"));
    let (id_none, none) = patient(None);
    assert_eq!(
        systems(&a),
        [
            Some("urn:oid:2.16.840.1.113883.3.9999.7".to_string()),
            Some("urn:oid:1.2.3".to_string())
        ]
    );
    assert_eq!(systems(&none), [None, Some("urn:oid:1.2.3".to_string())]);
    assert_eq!(id_a, id_none);
}

/// A resource created without identifying values (a performing lab named only by name) gets an
/// id from its message and the creating rule's place in its map — not the rule's line: an
/// analyst's comment or a rule added above it must leave that id alone, or a replay after the
/// edit would write the resource again under a new id and leave the old one behind. Another
/// creating rule still gives another id.
#[test]
fn an_edit_above_a_creating_rule_keeps_the_ids_it_gives() {
    let dir = repo().join("mappings/hl7v2");
    let texts = MappingSet::texts(&dir).unwrap();
    // OBX-23: the performing organization, by name only
    let obx = format!(
        "OBX|1|NM|2345-7^Glucose^LN||105|mg/dL|||||F{}Riverside Reference Lab",
        "|".repeat(12)
    );
    let message = [
        "MSH|^~\\&|SYNTH|RIVERSIDE|TRIBUTARY|HIE|20261123081500-0600||ORU^R01^ORU_R01|C-1|P|2.5.1",
        "PID|1||MRN1^^^RIVERSIDE^MR||One^Pat",
        "OBR|1|P-1||24323-8^Metabolic panel^LN",
        &obx,
    ]
    .join("\r");
    let bundle = |texts: &[(PathBuf, String)]| {
        let set = MappingSet::from_texts(&dir, texts).unwrap_or_else(|e| panic!("{e}"));
        let out = map_as_feed(&set, message.as_bytes(), None);
        out.resources()
            .map(|(t, id, r)| (format!("{t}/{id}"), r))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let before = bundle(&texts);
    let performer = before
        .iter()
        .find(|(k, r)| k.starts_with("Organization/") && r["name"] == "Riverside Reference Lab")
        .map(|(k, _)| k.clone())
        .unwrap_or_else(|| panic!("no performing Organization: {:?}", before.keys()));

    let mut edited = texts.clone();
    let obx = edited
        .iter_mut()
        .find(|(p, _)| p.ends_with("segments/OBX-Observation.yaml"))
        .unwrap();
    obx.1 = obx.1.replacen(
        "rules:\n",
        "rules:\n  # a note an analyst added\n  - set: language\n    value: en\n",
        1,
    );
    let after = bundle(&edited);
    assert!(after.contains_key(&performer), "{:?}", after.keys());
    let ids = |b: &std::collections::BTreeMap<String, serde_json::Value>| {
        b.keys().cloned().collect::<Vec<_>>()
    };
    assert_eq!(ids(&before), ids(&after));

    // the same organization created by a second rule of the map (its performer as well) is
    // another resource
    let mut twice = texts.clone();
    let obx = twice
        .iter_mut()
        .find(|(p, _)| p.ends_with("segments/OBX-Observation.yaml"))
        .unwrap();
    obx.1
        .push_str("  - set: performer\n    from: OBX-23\n    create: XON-Organization\n");
    let doubled = bundle(&twice);
    let labs = doubled
        .values()
        .filter(|r| r["name"] == "Riverside Reference Lab")
        .count();
    assert_eq!(labs, 2, "{:?}", doubled.keys());
}

/// A resource map's own `write:` applies to what `create:` makes from it: `merge` gives PATCH
/// entries; a mode that makes no sense for a created resource is a load error at its place.
#[test]
fn a_resource_map_s_write_applies_to_the_resources_created_from_it() {
    let pat = "resource: Patient\nsegment: PID\nid: [\"PID-3[1].1\"]\nrules:\n  - set: managingOrganization\n    from: PID-3[1].4\n    create: HD-Org\n";
    let org = |write: &str| {
        format!("resource: Organization\nid: [\".1\"]\nwrite: {write}\nrules:\n  - set: name\n    from: .1\n")
    };
    let msg = "message: [ADT^A01]\nresources:\n  - segment: MSH\n    map: MSH-Header\n  - segment: PID\n    map: PID-Patient\n";
    let load = |write: &str| {
        load_texts(&[
            ("segments/MSH-Header.yaml", HEADER),
            ("segments/PID-Patient.yaml", pat),
            ("segments/HD-Org.yaml", &org(write)),
            ("messages/ADT_A01.yaml", msg),
        ])
    };
    for bad in ["delete", "amend", "none", "upsert"] {
        let errs = load(bad).unwrap_err().to_string();
        assert!(
            errs.contains("HD-Org.yaml:3:8: a resource map's `write:`"),
            "{bad}: {errs}"
        );
    }
    let message = b"MSH|^~\\&|A|B|C|D|202601010000||ADT^A01|1|P|2.5.1\rPID|1||M1^^^RIVERSIDE\r";
    for (write, method) in [("merge", "PATCH"), ("replace", "PUT")] {
        let set = load(write).unwrap();
        let b = map_as(&set, message, "t1").bundle();
        let org = b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| {
                e["request"]["url"]
                    .as_str()
                    .unwrap()
                    .starts_with("Organization/")
            })
            .unwrap_or_else(|| panic!("{b}"))
            .clone();
        assert_eq!(org["request"]["method"], method, "{write}");
    }
}
