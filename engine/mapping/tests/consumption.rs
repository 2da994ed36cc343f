//! What counts as mapped in the unconsumed-field report: a value a rule writes (or that chose
//! what a rule wrote). A value a condition only looked at, or that only went into an id, is still
//! reported, so nothing in a message is dropped without a trace.
//!
//! The messages here are hand-written synthetic data.

use std::path::{Path, PathBuf};
use tributary_mapping::{MappedBundle, MappingSet, RunOptions, SplitMessage};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn library() -> MappingSet {
    MappingSet::load(&repo().join("mappings/hl7v2")).unwrap_or_else(|e| panic!("{e}"))
}

fn run(set: &MappingSet, segments: &[&str]) -> MappedBundle {
    set.run(
        &SplitMessage::parse(&segments.join("\r")),
        tributary_terminology::builtin(),
        &RunOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Maps an ORU^R01 of one patient (`PID|1||MRN1^^^RIVERSIDE^MR||One^Pat`) with `rest` after
/// the PID.
fn run_oru(set: &MappingSet, rest: &[&str]) -> MappedBundle {
    let msh = MSH.replace("ADT^A01^ADT_A01", "ORU^R01^ORU_R01");
    let mut segments = vec![msh.as_str(), "PID|1||MRN1^^^RIVERSIDE^MR||One^Pat"];
    segments.extend_from_slice(rest);
    run(set, &segments)
}

fn unconsumed(out: &MappedBundle) -> Vec<String> {
    out.unconsumed.iter().map(ToString::to_string).collect()
}

fn load(files: &[(&str, &str)]) -> MappingSet {
    let texts: Vec<(PathBuf, String)> = files
        .iter()
        .map(|(p, t)| (PathBuf::from(p), t.to_string()))
        .collect();
    MappingSet::from_texts(Path::new("m"), &texts).unwrap_or_else(|e| panic!("{e}"))
}

const MSH: &str =
    "MSH|^~\\&|SYNTH|RIVERSIDE|TRIBUTARY|HIE|20261123081500-0600||ADT^A01^ADT_A01|C-1|P|2.5.1";

/// XAD-7 (address type) fills `use` or `type` only for the codes their conditions accept: a
/// code neither accepts (`L`, legal) is reported, not counted as read by the conditions.
#[test]
fn a_value_a_condition_only_looked_at_is_reported() {
    let set = library();
    let with = |xad7: &str| {
        let pid = format!(
            "PID|1||MRN1^^^RIVERSIDE^MR||One^Pat|||F|||1 Main St^^Town^IL^62701^USA^{xad7}"
        );
        unconsumed(&run(&set, &[MSH, &pid]))
    };
    assert!(
        with("L").contains(&"PID-11.7".to_string()),
        "{:?}",
        with("L")
    );
    assert!(
        !with("H").iter().any(|u| u.starts_with("PID-11")),
        "{:?}",
        with("H")
    );
}

/// A field only used in the resource id, or only compared by a condition whose rule wrote
/// nothing, is reported; a compared value that chose what was written is mapped.
#[test]
fn id_parts_and_condition_operands_count_only_when_a_value_is_written() {
    let set = load(&[
        (
            "segments/PID-Patient.yaml",
            "resource: Patient\nsegment: PID\nid: [\"PID-3.1\", \"PID-2\"]\nrules:\n  - set: identifier\n    rules:\n      - set: value\n        from: PID-3.1\n  - set: active\n    when: PID-30 == N\n    value: true\n  - set: gender\n    when: PID-8 == F\n    value: female\n",
        ),
        (
            "messages/ADT.yaml",
            "message: [ADT^A01]\nignore: [MSH]\nresources:\n  - name: patient\n    segment: PID\n    map: PID-Patient\n",
        ),
    ]);
    let mut pid = vec![""; 31];
    (pid[0], pid[1], pid[2], pid[3], pid[8], pid[30]) = ("PID", "1", "ALT-7", "MRN1", "M", "N");
    let out = run(&set, &[MSH, &pid.join("|")]);
    let u = unconsumed(&out);
    // PID-2: only an id part; PID-8: compared, but `gender` was not written (M is not F)
    assert!(u.contains(&"PID-2".to_string()), "{u:?}");
    assert!(u.contains(&"PID-8".to_string()), "{u:?}");
    // PID-30 == N chose `active`; PID-3.1 was written
    assert!(
        !u.iter().any(|x| x == "PID-30" || x.starts_with("PID-3")),
        "{u:?}"
    );
    assert_eq!(u.len(), 3, "{u:?}"); // and PID-1
}

/// OBX-4 (sub-id) is in the Observation id and, as the IG keeps it, in the observation-v2-subid
/// extension: mapped, not reported.
#[test]
fn the_obx_sub_id_is_kept_in_its_extension() {
    let out = run(
        &library(),
        &[
            "MSH|^~\\&|SYNTH_LAB|RIVERSIDE|TRIBUTARY|HIE|20261123090000-0600||ORU^R01^ORU_R01|O-1|P|2.5.1",
            "PID|1||MRN1^^^RIVERSIDE^MR||One^Pat",
            "OBR|1|PLC-1|FIL-1|GLU^Glucose^L",
            "OBX|1|NM|GLU^Glucose^L|2|100|mg/dL|||||F",
        ],
    );
    assert!(!unconsumed(&out).iter().any(|u| u.starts_with("OBX-4")));
    let obs = out
        .resources()
        .find(|(t, _, _)| *t == "Observation")
        .unwrap()
        .2;
    assert_eq!(
        obs["extension"][0]["url"],
        "http://hl7.org/fhir/StructureDefinition/observation-v2-subid"
    );
    assert_eq!(obs["extension"][0]["extension"][0]["valueString"], "2");
}

/// Two OBX that give one Observation id (same order, code and set id, no sub-id): the second is
/// not built — one PUT would replace the other — and is reported with the reason `duplicate id`,
/// its fields listed as unconsumed, instead of being discarded without a trace.
#[test]
fn a_second_segment_with_the_same_id_is_reported_not_dropped_silently() {
    let out = run(
        &library(),
        &[
            "MSH|^~\\&|SYNTH_LAB|RIVERSIDE|TRIBUTARY|HIE|20261123090000-0600||ORU^R01^ORU_R01|O-1|P|2.5.1",
            "PID|1||MRN1^^^RIVERSIDE^MR||One^Pat",
            "OBR|1|PLC-1|FIL-1|GLU^Glucose^L",
            "OBX|1|NM|GLU^Glucose^L||100|mg/dL|||||F",
            "OBX|1|NM|GLU^Glucose^L||200|mg/dL|||||F",
        ],
    );
    assert_eq!(
        out.resources()
            .filter(|(t, _, _)| *t == "Observation")
            .count(),
        1
    );
    let dup: Vec<String> = out
        .dropped
        .iter()
        .filter(|d| d.reason == tributary_mapping::DropReason::DuplicateId)
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        dup,
        vec!["OBX[2] (Observation.id: duplicate id)".to_string()]
    );
    let u = unconsumed(&out);
    assert!(u.iter().any(|x| x.starts_with("OBX[2]-5")), "{u:?}");
    assert!(!u.iter().any(|x| x.starts_with("OBX[1]-5")), "{u:?}");
}

/// `""` is HL7's explicit null: rules skip it, and as the upsert replaces the whole resource the
/// element is absent in the output. It is not unmapped data, so a message with one is not
/// reported (under `quarantine`/`reject` it would fail for nothing).
#[test]
fn an_explicit_null_is_not_reported_as_unconsumed() {
    let out = run(
        &library(),
        &[
            MSH,
            "PID|1||MRN1^^^RIVERSIDE^MR||One^Pat||\"\"|F|||1 Main St^^Town^IL^62701^USA^\"\"||\"\"",
        ],
    );
    let u = unconsumed(&out);
    assert!(
        !u.iter()
            .any(|x| x == "PID-7" || x == "PID-11.7" || x.starts_with("PID-13")),
        "{u:?}"
    );
    let patient = out.resources().find(|(t, _, _)| *t == "Patient").unwrap().2;
    assert!(patient.get("birthDate").is_none(), "{patient}");
}

/// Under `on_invalid_value: warn` (the library's setting) a value that cannot become its FHIR
/// type is left out with a warning — and reported as left out, like an unconsumed field, so the
/// feed's `[mapping] unconsumed` policy applies to it. Paths and reasons only, never the value.
#[test]
fn an_invalid_value_left_out_under_warn_is_reported() {
    let out = run(
        &library(),
        &[
            "MSH|^~\\&|SYNTH_LAB|RIVERSIDE|TRIBUTARY|HIE|20261123090000-0600||ORU^R01^ORU_R01|O-1|P|2.5.1",
            "PID|1||MRN1^^^RIVERSIDE^MR||One^Pat||19630231|F",
            "OBR|1|PLC-1|FIL-1|GLU^Glucose^L",
            "OBX|1|NM|GLU^Glucose^L||12abc|mg/dL|||||F",
        ],
    );
    let dropped: Vec<String> = out.dropped.iter().map(ToString::to_string).collect();
    assert_eq!(
        dropped,
        vec![
            "PID-7 (Patient.birthDate: invalid value)".to_string(),
            "OBX-5 (Observation.valueQuantity.value: invalid value)".to_string(),
        ]
    );
    assert!(out.dropped[0].rule.contains("segments/PID-Patient.yaml:"));
    for d in &out.dropped {
        assert!(!d.to_string().contains("19630231") && !d.to_string().contains("12abc"));
    }
    assert_eq!(out.warnings.len(), 2, "{:?}", out.warnings);
}

/// A `from:` list maps its first alternative with a value. A later alternative holding the same
/// value (the orderer in ORC-12 and again in OBR-16) is in the output through the first, so it is
/// not reported; one holding something else is, component by component, as is whatever neither
/// copy had mapped.
#[test]
fn a_later_alternative_with_the_same_value_is_mapped_through_the_first() {
    let set = load(&[
        (
            "segments/ORC-Task.yaml",
            "resource: Task\nsegment: ORC\nid: [ORC-2.1]\nrules:\n  - set: status\n    value: requested\n  - set: intent\n    value: order\n  - set: identifier\n    from: [ORC-2, OBR-2]\n    rules:\n      - set: value\n        from: .1\n  - set: note\n    from: [ORC-3.1, OBR-3.1]\n    rules:\n      - set: text\n        from: .\n",
        ),
        (
            "messages/ORM_O01.yaml",
            "message: [ORM^O01]\nresources:\n  - name: task\n    segment: ORC\n    map: ORC-Task\n",
        ),
    ]);
    let msh = MSH.replace("ADT^A01^ADT_A01", "ORM^O01^ORM_O01");
    let with = |orc: &str, obr: &str| unconsumed(&run(&set, &[&msh, orc, obr]));
    // the same order number (both components) and filler number: only the unmapped .2 is left
    let same = with("ORC|NW|P-1^LAB|F-9", "OBR|1|P-1^LAB|F-9");
    assert!(same.contains(&"ORC-2.2".to_string()), "{same:?}");
    assert!(same.contains(&"OBR-2.2".to_string()), "{same:?}");
    assert!(
        !same
            .iter()
            .any(|u| u == "OBR-2.1" || u.starts_with("OBR-3")),
        "{same:?}"
    );
    // a different placer number in OBR-2 is data the output does not hold
    let other = with("ORC|NW|P-1^LAB|F-9", "OBR|1|P-2^LAB|F-8");
    assert!(other.contains(&"OBR-2.1".to_string()), "{other:?}");
    assert!(
        other.contains(&"OBR-3".to_string()) || other.contains(&"OBR-3.1".to_string()),
        "{other:?}"
    );
    // an extra component makes the field a different value
    let longer = with("ORC|NW|P-1^LAB|F-9", "OBR|1|P-1^LAB^1.2.3^ISO|F-9");
    assert!(longer.contains(&"OBR-2.1".to_string()), "{longer:?}");
    assert!(!longer.iter().any(|u| u.starts_with("OBR-3")), "{longer:?}");
    // with the first alternative empty, the second is the one mapped
    let second = with("ORC|NW||", "OBR|1|P-1^LAB|F-9");
    assert!(
        !second
            .iter()
            .any(|u| u == "OBR-2.1" || u.starts_with("OBR-3")),
        "{second:?}"
    );
}

/// A flag the output states through another field is mapped: a date of death (PID-29) says
/// "deceased" and a birth order (PID-25) says "multiple birth", so PID-30 `Y` and PID-24 `Y` are
/// in the output; a flag contradicting them (`N`) is not, and is reported.
#[test]
fn a_flag_another_element_states_is_mapped_and_a_contradicting_one_reported() {
    let set = library();
    let with = |pid24: &str, pid25: &str, pid29: &str, pid30: &str| {
        let pid = format!(
            "PID|1||MRN1^^^RIVERSIDE^MR||One^Pat||19900101|F||||||||||||||||{pid24}|{pid25}||||{pid29}|{pid30}"
        );
        let out = run(&set, &[MSH, &pid]);
        let patient = out
            .resources()
            .find(|(t, ..)| *t == "Patient")
            .map(|(.., v)| v)
            .unwrap();
        (unconsumed(&out), patient)
    };
    let (u, p) = with("Y", "2", "20261101080000-0600", "Y");
    assert!(
        !u.iter()
            .any(|f| f.starts_with("PID-24") || f.starts_with("PID-30")),
        "{u:?}"
    );
    assert_eq!(p["multipleBirthInteger"], 2);
    assert_eq!(p["deceasedDateTime"], "2026-11-01T08:00:00-06:00");
    let (u, p) = with("N", "2", "20261101080000-0600", "N");
    assert!(
        u.contains(&"PID-24".to_string()) && u.contains(&"PID-30".to_string()),
        "{u:?}"
    );
    assert_eq!(p["multipleBirthInteger"], 2);
    let (u, p) = with("N", "", "", "N");
    assert!(
        !u.iter()
            .any(|f| f.starts_with("PID-24") || f.starts_with("PID-30")),
        "{u:?}"
    );
    assert_eq!(p["multipleBirthBoolean"], false);
    assert_eq!(p["deceasedBoolean"], false);
}

/// EI-4 `ISO` says EI-3 is an OID, which the `urn:oid:` system states: mapped. Another type
/// (`L`) is not in the output and is reported.
#[test]
fn an_iso_universal_id_type_is_stated_by_the_oid_system() {
    let set = library();
    let msh = MSH.replace("ADT^A01^ADT_A01", "ORM^O01^ORM_O01");
    let with = |ei: &str| {
        let orc = format!("ORC|NW|{ei}");
        let obr = format!("OBR|1|{ei}||24323-8^Metabolic panel^LN");
        let pid = "PID|1||MRN1^^^RIVERSIDE^MR||One^Pat";
        unconsumed(&run(&set, &[&msh, pid, &orc, &obr]))
    };
    let iso = with("P-1^^2.16.840.1.113883.3.9999.8^ISO");
    assert!(
        !iso.iter().any(|f| f == "OBR-2.4" || f == "ORC-2.4"),
        "{iso:?}"
    );
    let local = with("P-1^^2.16.840.1.113883.3.9999.8^L");
    assert!(local.contains(&"OBR-2.4".to_string()), "{local:?}");
}

/// OBR-24 (diagnostic service section) gives each result its observation category and a
/// laboratory report US Core's `LAB` category beside the section as sent. A section the
/// ConceptMap says has no category adds nothing without a warning; a code it does not know is
/// warned about by map and path, never by value.
#[test]
fn the_diagnostic_service_section_categorizes_results_and_reports() {
    let set = library();
    let with = |section: &str| {
        let obr = format!(
            "OBR|1|P-1||24323-8^Metabolic panel^LN{}|{section}",
            "|".repeat(19)
        );
        run_oru(
            &set,
            &[
                &obr,
                "OBX|1|NM|2345-7^Glucose^LN||105|mg/dL|||||F",
                "OBX|2|NM|2951-2^Sodium^LN||140|mmol/L|||||F",
            ],
        )
    };
    let codes = |out: &MappedBundle, rtype: &str| -> Vec<Vec<String>> {
        out.resources()
            .filter(|(t, _, _)| *t == rtype)
            .map(|(_, _, r)| {
                r["category"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|c| c["coding"].as_array().into_iter().flatten())
                    .map(|c| format!("{}|{}", c["system"].as_str().unwrap(), c["code"]))
                    .collect()
            })
            .collect()
    };
    const CAT: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
    const SECTION: &str = "http://terminology.hl7.org/CodeSystem/v2-0074";

    let hm = with("HM");
    let lab = vec![format!("{CAT}|\"laboratory\"")];
    assert_eq!(codes(&hm, "Observation"), [lab.clone(), lab]);
    assert_eq!(
        codes(&hm, "DiagnosticReport"),
        [[format!("{SECTION}|\"HM\""), format!("{SECTION}|\"LAB\"")]]
    );
    assert!(hm.warnings.is_empty(), "{:?}", hm.warnings);
    assert!(!unconsumed(&hm).iter().any(|f| f.starts_with("OBR-24")));

    // LAB is the section and US Core's code at once: one coding
    let as_lab = with("LAB");
    assert_eq!(
        codes(&as_lab, "DiagnosticReport"),
        [[format!("{SECTION}|\"LAB\"")]]
    );
    assert!(as_lab.warnings.is_empty(), "{:?}", as_lab.warnings);

    let other = with("OTH");
    assert_eq!(codes(&other, "Observation"), [Vec::<String>::new(), vec![]]);
    assert_eq!(
        codes(&other, "DiagnosticReport"),
        [[format!("{SECTION}|\"OTH\"")]]
    );
    assert!(other.warnings.is_empty(), "{:?}", other.warnings);

    let unknown = with("QQX");
    assert_eq!(
        codes(&unknown, "Observation"),
        [Vec::<String>::new(), vec![]]
    );
    assert_eq!(unknown.warnings.len(), 3, "{:?}", unknown.warnings);
    assert!(unknown
        .warnings
        .iter()
        .all(|w| w.contains("OBR-24") && w.contains("v2-0074-") && !w.contains("QQX")));
}

/// One person reached by two maps (the attending doctor of PV1-7 is also the orderer of ORC-12)
/// is one Practitioner with what each reading adds: the orderer's address (ORC-24) joins the
/// resource the attending reading made first, instead of being counted as read and lost. Another
/// attending doctor does not get the orderer's address.
#[test]
fn one_person_read_twice_keeps_what_either_reading_adds() {
    let set = library();
    let doe = "1234^Doe^Jane^^^^^^NPI";
    let address = "6789 Main St^^San Jose^CA^95126";
    let with = |attending: &str| {
        let pv1 = format!("PV1|1|O|||||{attending}");
        let orc = format!(
            "ORC|RE|P-1{}{doe}{}{address}",
            "|".repeat(10),
            "|".repeat(12)
        );
        run_oru(
            &set,
            &[
                &pv1,
                &orc,
                "OBR|1|P-1||24323-8^Metabolic panel^LN",
                "OBX|1|NM|2345-7^Glucose^LN||105|mg/dL|||||F",
            ],
        )
    };
    let practitioners = |out: &MappedBundle| -> Vec<(String, serde_json::Value)> {
        out.resources()
            .filter(|(t, _, _)| *t == "Practitioner")
            .map(|(_, id, r)| (id.to_string(), r))
            .collect()
    };

    let same = with(doe);
    let found = practitioners(&same);
    assert_eq!(found.len(), 1, "{found:?}");
    let (id, doctor) = &found[0];
    assert_eq!(doctor["name"][0]["family"], "Doe");
    assert_eq!(doctor["address"][0]["line"][0], "6789 Main St");
    assert_eq!(doctor["address"][0]["city"], "San Jose");
    assert!(
        !unconsumed(&same).iter().any(|u| u.starts_with("ORC-24")),
        "{:?}",
        unconsumed(&same)
    );
    let line = format!("Practitioner/{id}.address[0].line[0]");
    let lineage = same.lineage.iter().find(|l| l.element == line);
    assert_eq!(
        lineage.map(|l| l.source.as_str()),
        Some("ORC-24.1.1"),
        "{:?}",
        same.lineage
            .iter()
            .filter(|l| l.element.starts_with("Practitioner/"))
            .collect::<Vec<_>>()
    );

    let other = with("5678^Roe^Rick^^^^^^NPI");
    let found = practitioners(&other);
    assert_eq!(found.len(), 2, "{found:?}");
    for (_, p) in &found {
        let has_address = p.get("address").is_some();
        assert_eq!(has_address, p["name"][0]["family"] == "Doe", "{p}");
    }
    assert!(same.dropped.is_empty(), "{:?}", same.dropped);
    assert!(other.dropped.is_empty(), "{:?}", other.dropped);

    // the attending's reading has less than the orderer's: whichever came first, the given
    // name only the orderer's holds is in the resource
    let fewer = with("1234^Doe^^^^^^^NPI");
    let found = practitioners(&fewer);
    assert_eq!(found.len(), 1, "{found:?}");
    let names = found[0].1["name"].as_array().unwrap().clone();
    assert!(names.iter().any(|n| n["given"][0] == "Jane"), "{names:?}");
    assert!(fewer.dropped.is_empty(), "{:?}", fewer.dropped);
}

/// PL-7 (building) and PL-8 (floor) are Locations of their own, linked by `partOf` as the IG's
/// PL[Location] links a location's levels: bed → floor → building. Two floors of one building
/// share it; a location with a building and no floor is part of the building; nothing of either
/// component is left unmapped.
#[test]
fn a_bed_is_part_of_its_floor_and_the_floor_of_its_building() {
    let set = library();
    // PV1-3 (assigned), PV1-6 (prior) and PV1-42 (pending) locations
    let pv1 = format!(
        "PV1|1|I|4WEST^401^A^RIVERSIDE^^^North Tower^4|||3EAST^310^B^RIVERSIDE^^^North Tower^3{}ICU^1^^RIVERSIDE^^^North Tower",
        "|".repeat(36)
    );
    let out = run(&set, &[MSH, "PID|1||MRN1^^^RIVERSIDE^MR||One^Pat", &pv1]);
    let locations: std::collections::HashMap<String, serde_json::Value> = out
        .resources()
        .filter(|(t, _, _)| *t == "Location")
        .map(|(_, id, r)| (format!("Location/{id}"), r))
        .collect();
    let named = |name: &str| {
        locations
            .iter()
            .find(|(_, r)| r["name"] == name)
            .unwrap_or_else(|| panic!("no Location {name}: {locations:?}"))
    };
    let kind = |r: &serde_json::Value| r["physicalType"]["coding"][0]["code"].clone();
    let parent = |r: &serde_json::Value| r["partOf"]["reference"].as_str().map(str::to_string);

    let (building_ref, building) = named("North Tower");
    assert_eq!(kind(building), "bu");
    assert_eq!(parent(building), None);
    for (bed, floor) in [("4WEST 401 A", "4"), ("3EAST 310 B", "3")] {
        let (_, bed) = named(bed);
        let (floor_ref, floor_r) = named(floor);
        assert_eq!(kind(bed), "bd");
        assert_eq!(kind(floor_r), "lvl");
        assert_eq!(parent(bed).as_ref(), Some(floor_ref));
        assert_eq!(parent(floor_r).as_ref(), Some(building_ref));
    }
    let (_, icu) = named("ICU 1");
    assert_eq!(parent(icu).as_ref(), Some(building_ref));
    assert_eq!(
        locations.values().filter(|r| kind(r) == "bu").count(),
        1,
        "{locations:?}"
    );
    assert!(
        !unconsumed(&out).iter().any(|u| u.starts_with("PV1-3.")
            || u.starts_with("PV1-6.")
            || u.starts_with("PV1-42.")),
        "{:?}",
        unconsumed(&out)
    );
}

/// The NTEs right after an order's OBR are the order's comments (ServiceRequest.note); the NTEs
/// after an OBX are that result's (Observation.note) and never the order's too. No comment text
/// is left unmapped.
#[test]
fn an_order_s_comments_are_its_own_and_a_result_s_are_the_result_s() {
    let set = library();
    let out = run_oru(
        &set,
        &[
            "ORC|RE|P-1",
            "OBR|1|P-1||24323-8^Metabolic panel^LN",
            "NTE|1|L|Patient was fasting",
            "NTE|2|L|Drawn at home",
            "OBX|1|NM|2345-7^Glucose^LN||105|mg/dL|||||F",
            "NTE|1|L|Repeated, same value",
            "OBX|2|NM|2951-2^Sodium^LN||140|mmol/L|||||F",
        ],
    );
    let notes = |rtype: &str| -> Vec<Vec<String>> {
        out.resources()
            .filter(|(t, _, _)| *t == rtype)
            .map(|(_, _, r)| {
                r["note"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|n| n["text"].as_str().unwrap().to_string())
                    .collect()
            })
            .collect()
    };
    assert_eq!(
        notes("ServiceRequest"),
        [vec!["Patient was fasting", "Drawn at home"]]
    );
    let mut results = notes("Observation");
    results.sort();
    assert_eq!(results, [vec![], vec!["Repeated, same value"]]);
    assert!(
        !unconsumed(&out)
            .iter()
            .any(|u| u.starts_with("NTE") && u.ends_with("-3")),
        "{:?}",
        unconsumed(&out)
    );
}

/// One NTE is one note (IG NTE[Observation]): its comment lines (NTE-3 repetitions) are one
/// text, who entered it (NTE-5) its author, a Practitioner, and when (NTE-6) its time.
#[test]
fn a_comment_is_one_note_with_its_lines_author_and_time() {
    let set = library();
    let out = run_oru(
        &set,
        &[
            "OBR|1|P-1||24323-8^Metabolic panel^LN",
            "OBX|1|NM|2345-7^Glucose^LN||105|mg/dL|||||F",
            "NTE|1|L|Repeated~same value||T900^Tech^Terry|202611230915-0600",
            "NTE|2|L|Called to the ward",
        ],
    );
    let resources: Vec<(String, serde_json::Value)> = out
        .resources()
        .map(|(t, id, r)| (format!("{t}/{id}"), r))
        .collect();
    let observation = &resources
        .iter()
        .find(|(k, _)| k.starts_with("Observation/"))
        .unwrap()
        .1;
    let notes = observation["note"].as_array().unwrap();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert_eq!(notes[0]["text"], "Repeated\nsame value");
    assert_eq!(notes[0]["time"], "2026-11-23T09:15:00-06:00");
    let author = notes[0]["authorReference"]["reference"].as_str().unwrap();
    let practitioner = &resources.iter().find(|(k, _)| k == author).unwrap().1;
    assert_eq!(practitioner["name"][0]["family"], "Tech");
    assert_eq!(notes[1]["text"], "Called to the ward");
    assert!(notes[1].get("authorReference").is_none() && notes[1].get("time").is_none());
    assert!(
        !unconsumed(&out)
            .iter()
            .any(|u| u.starts_with("NTE")
                && (u.contains("-3") || u.contains("-5") || u.contains("-6"))),
        "{:?}",
        unconsumed(&out)
    );
}

/// The same identifier with two different names in one message: one Practitioner holding both
/// names (a list gains what the second reading adds), each explained by its own field.
#[test]
fn one_id_read_twice_with_another_name_keeps_both_names() {
    let set = library();
    let out = run_oru(
        &set,
        &[
            "PV1|1|O|||||1234^Dow^Jane^^^^^^NPI",
            &format!("ORC|RE|P-1{}1234^Doe^Jane^^^^^^NPI", "|".repeat(10)),
            "OBR|1|P-1||24323-8^Metabolic panel^LN",
            "OBX|1|NM|2345-7^Glucose^LN||105|mg/dL|||||F",
        ],
    );
    let doctors: Vec<(String, serde_json::Value)> = out
        .resources()
        .filter(|(t, _, _)| *t == "Practitioner")
        .map(|(_, id, r)| (id.to_string(), r))
        .collect();
    assert_eq!(doctors.len(), 1, "{doctors:?}");
    let (id, doctor) = &doctors[0];
    let mut families: Vec<&str> = doctor["name"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["family"].as_str().unwrap())
        .collect();
    families.sort_unstable();
    assert_eq!(families, ["Doe", "Dow"]);
    assert!(out.dropped.is_empty(), "{:?}", out.dropped);
    // each name's lineage names the field it came from, at the place it landed
    for (i, name) in doctor["name"].as_array().unwrap().iter().enumerate() {
        let element = format!("Practitioner/{id}.name[{i}].family");
        let source = out
            .lineage
            .iter()
            .find(|l| l.element == element)
            .map(|l| l.source.as_str());
        let expected = if name["family"] == "Dow" {
            "PV1-7.2.1"
        } else {
            "ORC-12.2.1"
        };
        assert_eq!(source, Some(expected), "{element}");
    }
}

/// A producer code sent twice in one message with two different names: one Organization (its
/// code is its identity), the first name kept and the second reported as left out with its
/// field, never the value.
#[test]
fn one_code_read_twice_with_another_single_valued_element_reports_the_second() {
    let set = library();
    let out = run_oru(
        &set,
        &[
            "OBR|1|P-1||24323-8^Metabolic panel^LN",
            "OBX|1|NM|2345-7^Glucose^LN||105|mg/dL|||||F||||36D1332559^Northgate Lab^CLIA",
            "OBX|2|NM|2951-2^Sodium^LN||140|mmol/L|||||F||||36D1332559^Northgate Labs Inc^CLIA",
        ],
    );
    let labs: Vec<serde_json::Value> = organizations(&out)
        .into_iter()
        .filter(|(_, o)| o["identifier"][0]["value"] == "36D1332559")
        .map(|(_, o)| o)
        .collect();
    assert_eq!(labs.len(), 1, "{labs:?}");
    assert_eq!(labs[0]["name"], "Northgate Lab");
    let conflicts: Vec<_> = out
        .dropped
        .iter()
        .filter(|d| d.reason == tributary_mapping::DropReason::Conflict)
        .collect();
    assert_eq!(conflicts.len(), 1, "{:?}", out.dropped);
    let c = conflicts[0];
    assert_eq!(
        (c.resource_type, c.element.as_str()),
        ("Organization", "name")
    );
    assert_eq!(c.source, "OBX[2]-15");
    assert!(c.rule.contains("OBX-Observation.yaml:"), "{}", c.rule);
    let shown = c.to_string();
    assert!(!shown.contains("Northgate"), "{shown}");
}

fn organizations(out: &MappedBundle) -> Vec<(String, serde_json::Value)> {
    out.resources()
        .filter(|(t, _, _)| *t == "Organization")
        .map(|(_, id, r)| (id.to_string(), r))
        .collect()
}

/// The authority that assigned an order number (EI-2..4) is an HD like MSH-4: the same lab in
/// both is one Organization, identified by its OID, and EI-4 (the id's type) is mapped.
#[test]
fn an_order_number_s_authority_is_the_organization_the_header_names() {
    let set = library();
    let oid = "2.16.840.1.113883.3.9999.7";
    let msh = format!(
        "MSH|^~\\&|LIS|NORTHGATE^{oid}^ISO|TRIBUTARY|HIE|20261123081500-0600||ORU^R01^ORU_R01|C-9|P|2.5.1"
    );
    let orc = format!("ORC|RE||F-77^NORTHGATE^{oid}^ISO");
    let out = run(
        &set,
        &[
            &msh,
            "PID|1||MRN1^^^RIVERSIDE^MR||One^Pat",
            &orc,
            &format!("OBR|1||F-77^NORTHGATE^{oid}^ISO|24323-8^Metabolic panel^LN"),
            "OBX|1|NM|2345-7^Glucose^LN||105|mg/dL|||||F",
        ],
    );
    let labs: Vec<_> = organizations(&out)
        .into_iter()
        .filter(|(_, o)| o["identifier"][0]["value"] == "NORTHGATE")
        .collect();
    assert_eq!(labs.len(), 1, "{labs:?}");
    let (lab_id, lab) = &labs[0];
    assert_eq!(lab["identifier"][1]["value"], format!("urn:oid:{oid}"));
    assert_eq!(lab["identifier"][1]["type"]["coding"][0]["code"], "ISO");
    let order = out
        .resources()
        .find(|(t, _, _)| *t == "ServiceRequest")
        .map(|(_, _, r)| r)
        .expect("a ServiceRequest");
    assert_eq!(
        order["identifier"][0]["assigner"]["reference"],
        format!("Organization/{lab_id}")
    );
    let left = unconsumed(&out);
    assert!(
        !left
            .iter()
            .any(|u| u.starts_with("ORC-3") || u.starts_with("OBR-3")),
        "{left:?}"
    );
}

/// A producer sent by its code alone (OBX-15 without a coding system) is one Organization per
/// sending facility: the same in every result and every message, not a new one per result.
#[test]
fn a_producer_code_without_a_system_is_one_organization_across_results_and_messages() {
    let set = library();
    let message = |control: &str, time: &str, facility: &str| {
        let msh = MSH
            .replace("ADT^A01^ADT_A01", "ORU^R01^ORU_R01")
            .replace("C-1", control)
            .replace("20261123081500", time)
            .replace("|RIVERSIDE|", &format!("|{facility}|"));
        let out = run(
            &set,
            &[
                &msh,
                "PID|1||MRN1^^^RIVERSIDE^MR||One^Pat",
                "OBR|1|P-1||24323-8^Metabolic panel^LN",
                "OBX|1|NM|2345-7^Glucose^LN||105|mg/dL|||||F||||36D1332559",
                "OBX|2|NM|2951-2^Sodium^LN||140|mmol/L|||||F||||36D1332559",
            ],
        );
        let producers: Vec<String> = out
            .resources()
            .filter(|(t, _, r)| *t == "Organization" && r["identifier"][0]["value"] == "36D1332559")
            .map(|(_, id, _)| id.to_string())
            .collect();
        producers
    };
    let first = message("C-1", "20261123081500", "RIVERSIDE");
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(message("C-2", "20261124091500", "RIVERSIDE"), first);
    // another sender's local code "36D1332559" is another organization
    assert_ne!(message("C-1", "20261123081500", "LAKEVIEW"), first);
}

/// Before v2.5 an organization's id came in XON-3: it identifies the Organization as XON-10
/// does, so two messages naming the lab that way give the same one.
#[test]
fn an_organization_id_in_xon_3_identifies_it_across_messages() {
    let set = library();
    let performer = |control: &str| {
        let msh = MSH
            .replace("ADT^A01^ADT_A01", "ORU^R01^ORU_R01")
            .replace("C-1", control);
        let out = run(
            &set,
            &[
                &msh,
                "PID|1||MRN1^^^RIVERSIDE^MR||One^Pat",
                "OBR|1|P-1||24323-8^Metabolic panel^LN",
                &format!(
                    "OBX|1|NM|2345-7^Glucose^LN||105|mg/dL|||||F{}Northgate Lab^^7788",
                    "|".repeat(12)
                ),
            ],
        );
        organizations(&out)
            .into_iter()
            .filter(|(_, o)| o["name"] == "Northgate Lab")
            .map(|(id, _)| id)
            .collect::<Vec<_>>()
    };
    let first = performer("C-1");
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(performer("C-2"), first);
}

/// A lab's CLIA number has one identifier system whether the lab is sent as a code whose coding
/// system is `CLIA` (OBX-15), as an XON naming the CLIA authority by its OID (OBX-23), or as an
/// HD whose universal id type is CLIA (MSH-4, an order number's authority): the CLIA OID, with
/// the number as sent, never an invented `urn:id:` URI.
#[test]
fn a_clia_number_has_one_system_however_the_lab_is_sent() {
    let set = library();
    let msh = MSH
        .replace("ADT^A01^ADT_A01", "ORU^R01^ORU_R01")
        .replace("|RIVERSIDE|", "|Northgate Lab^36D1332559^CLIA|");
    let out = run(
        &set,
        &[
            &msh,
            "PID|1||MRN1^^^RIVERSIDE^MR||One^Pat",
            "OBR|1|P-1|F-1^Northgate Lab^36D1332559^CLIA|24323-8^Metabolic panel^LN",
            &format!(
                "OBX|1|NM|2345-7^Glucose^LN||105|mg/dL|||||F||||36D1332559^Northgate Lab^CLIA{}Northgate Lab^^^^^CLIA&2.16.840.1.113883.4.7&ISO^XX^^^36D1332559",
                "|".repeat(8)
            ),
        ],
    );
    let identifiers: Vec<serde_json::Value> = organizations(&out)
        .iter()
        .flat_map(|(_, o)| o["identifier"].as_array().cloned().unwrap_or_default())
        .filter(|i| i["value"].as_str().unwrap_or("").contains("36D1332559"))
        .collect();
    // MSH-4 and the filler number's authority are one Organization; OBX-15 and OBX-23 are two
    assert_eq!(identifiers.len(), 3, "{identifiers:#?}");
    for i in &identifiers {
        assert_eq!(i["system"], "urn:oid:2.16.840.1.113883.4.7", "{i}");
        assert_eq!(i["value"], "36D1332559", "{i}");
    }
}

/// An HD's universal id is a URI under `urn:ietf:rfc:3986` only where it is one in some
/// spelling (an OID, a UUID); a local id or a DNS name is the identifier's value as sent,
/// typed by HD-3, without a system (IG HD[Organization]: the system only for ISO and UUID).
#[test]
fn an_hd_universal_id_that_is_no_uri_is_kept_as_sent() {
    let set = library();
    let universal = |hd: &str| {
        let msh = MSH.replace("|RIVERSIDE|", &format!("|{hd}|"));
        let out = run(&set, &[&msh, "PID|1||MRN1^^^RIVERSIDE^MR||One^Pat"]);
        organizations(&out)
            .into_iter()
            .flat_map(|(_, o)| o["identifier"].as_array().cloned().unwrap_or_default())
            .find(|i| i.get("type").is_some())
            .unwrap_or_else(|| panic!("no universal id for {hd}"))
    };
    let oid = universal("North^2.16.840.1.113883.3.9999^ISO");
    assert_eq!(oid["system"], "urn:ietf:rfc:3986");
    assert_eq!(oid["value"], "urn:oid:2.16.840.1.113883.3.9999");
    for (hd, value, kind) in [
        ("North^rt23^HCD", "rt23", "HCD"),
        ("North^north.example.org^DNS", "north.example.org", "DNS"),
    ] {
        let id = universal(hd);
        assert_eq!(id.get("system"), None, "{id}");
        assert_eq!(id["value"], value);
        assert_eq!(id["type"]["coding"][0]["code"], kind);
    }
}

/// PID-33/34 (when and where the patient's record was last updated) become a Provenance of the
/// Patient (IG PID[Provenance-Patient]): activity UPDATE, occurred at PID-33, the PID-34
/// facility — else the sending facility — as performer. The same update reported by two
/// messages is one Provenance.
#[test]
fn a_record_update_time_and_facility_are_a_provenance_of_the_patient() {
    let set = library();
    let update = |control: &str, pid34: &str| {
        let msh = MSH.replace("C-1", control);
        let pid = format!(
            "PID|1||MRN1^^^RIVERSIDE^MR||One^Pat{}20261120101500-0600|{pid34}",
            "|".repeat(28)
        );
        let out = run(&set, &[&msh, &pid]);
        let patient = out
            .resources()
            .find(|(t, _, _)| *t == "Patient")
            .map(|(_, id, _)| id.to_string())
            .expect("a Patient");
        let provenance: Vec<serde_json::Value> = out
            .resources()
            .filter(|(t, _, r)| {
                *t == "Provenance" && r["activity"]["coding"][0]["code"] == "UPDATE"
            })
            .map(|(_, _, r)| r)
            .collect();
        assert_eq!(provenance.len(), 1, "{provenance:#?}");
        let p = provenance[0].clone();
        assert_eq!(p["target"][0]["reference"], format!("Patient/{patient}"));
        assert_eq!(p["occurredDateTime"], "2026-11-20T10:15:00-06:00");
        assert_eq!(p["agent"][0]["type"]["coding"][0]["code"], "performer");
        let who = p["agent"][0]["who"]["reference"]
            .as_str()
            .unwrap()
            .to_string();
        let facility = organizations(&out)
            .into_iter()
            .find(|(id, _)| who == format!("Organization/{id}"))
            .map(|(_, o)| o["identifier"][0]["value"].clone())
            .expect("the performer is an Organization of the bundle");
        (p["id"].clone(), facility)
    };
    let (first, facility) = update("C-1", "REGISTRATION^2.16.840.1.113883.3.9999.4^ISO");
    assert_eq!(facility, "REGISTRATION");
    let (again, _) = update("C-2", "REGISTRATION^2.16.840.1.113883.3.9999.4^ISO");
    assert_eq!(again, first, "one update, one Provenance");
    let (_, sender) = update("C-3", "");
    assert_eq!(
        sender, "RIVERSIDE",
        "without PID-34 the sending facility performed it"
    );
}

/// PV2-22 (visit protection) labels the Encounter's confidentiality — restricted for `Y`,
/// normal for `N` — and a code outside table 0136 labels nothing and is reported as left out
/// (the warning names the field and the map, not the code); PV2-12 (visit
/// description) is the Encounter's narrative, escaped so the text stays text. IG PV2[Encounter].
#[test]
fn a_protected_visit_is_labelled_restricted_and_its_description_is_the_narrative() {
    let set = library();
    let visit = |pv2_12: &str, pv2_22: &str| {
        let pv2 = format!("PV2|{}{pv2_12}{}{pv2_22}", "|".repeat(11), "|".repeat(10));
        // the HL7 parser, not the test splitter: PV2-12 carries an escape sequence
        let text = [
            MSH,
            "PID|1||MRN1^^^RIVERSIDE^MR||One^Pat",
            "PV1|1|I|ICU^101^A",
            &pv2,
        ]
        .join("\r");
        let out = set
            .map_bytes(
                text.as_bytes(),
                tributary_terminology::builtin(),
                &RunOptions::default(),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        let encounter = out
            .resources()
            .find(|(t, _, _)| *t == "Encounter")
            .map(|(_, _, r)| r)
            .expect("an Encounter");
        (encounter, out.warnings, out.dropped)
    };
    let (protected, _, _) = visit("Work-up <telemetry> \\T\\ echo", "Y");
    assert_eq!(
        protected["meta"]["security"],
        serde_json::json!([{
            "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
            "code": "R",
            "display": "restricted"
        }])
    );
    assert_eq!(protected["text"]["status"], "additional");
    assert_eq!(
        protected["text"]["div"],
        "<div xmlns=\"http://www.w3.org/1999/xhtml\">Work-up &lt;telemetry&gt; &amp; echo</div>"
    );
    let (open, _, _) = visit("", "N");
    assert_eq!(open["meta"]["security"][0]["code"], "N");
    assert!(open.get("text").is_none());
    let (unknown, warnings, dropped) = visit("", "SEC");
    assert!(unknown.get("meta").is_none(), "{unknown}");
    // left out, and reported like an unconsumed field so the feed's policy applies
    let d: Vec<String> = dropped.iter().map(ToString::to_string).collect();
    assert_eq!(
        d,
        ["PV2-22 (Encounter.meta.security: code not in the rule's ConceptMap)"]
    );
    assert_eq!(
        dropped[0].reason,
        tributary_mapping::DropReason::UnknownCode
    );
    assert!(
        dropped[0].rule.contains("PV1-Encounter.yaml:"),
        "{}",
        dropped[0].rule
    );
    assert!(
        warnings.iter().any(|w| w.contains("PV2-22")
            && w.contains("v2-0136-protection-confidentiality")
            && !w.contains("SEC")),
        "{warnings:?}"
    );
}

/// A practitioner's name carries the period it is valid for: XCN-19/20 (effective and
/// expiration date), or XCN-17 (the name validity range messages before v2.5 send) when
/// neither is there. IG XCN[Practitioner].
#[test]
fn a_practitioner_name_carries_its_validity_period() {
    let set = library();
    let name_period = |xcn: &str| {
        let out = run_oru(
            &set,
            &[
                "OBR|1|P-1||24323-8^Metabolic panel^LN",
                &format!("OBX|1|NM|2345-7^Glucose^LN||105|mg/dL|||||F|||||{xcn}"),
            ],
        );
        let period = out
            .resources()
            .find(|(t, _, _)| *t == "Practitioner")
            .map(|(_, _, r)| r["name"][0]["period"].clone());
        period.expect("a Practitioner")
    };
    let fields = |tail: &str| format!("P1^Tech^Toni^^^^^^NORTHGATE{tail}");
    assert_eq!(
        name_period(&fields("^^^^^^^^^^20190301^20291231")),
        serde_json::json!({"start": "2019-03-01", "end": "2029-12-31"})
    );
    assert_eq!(
        name_period(&fields("^^^^^^^^20100115&20200115")),
        serde_json::json!({"start": "2010-01-15", "end": "2020-01-15"})
    );
    assert_eq!(
        name_period(&fields("^^^^^^^^20100115&20200115^^20190301")),
        serde_json::json!({"start": "2019-03-01"}),
        "XCN-19/20 win over XCN-17"
    );
}

/// A code a ConceptMap lists with `-` (no target on purpose: XTN-2 `NET` says the address is an
/// e-mail, which the system carries) is mapped without a use and not reported; an unlisted one
/// is reported as left out.
#[test]
fn a_code_with_no_target_on_purpose_is_not_reported_an_unlisted_one_is() {
    let set = library();
    let telecom = |use_code: &str| {
        let pid = format!(
            "PID|1||MRN1^^^RIVERSIDE^MR||One^Pat||||||||^{use_code}^Internet^a@example.org"
        );
        let out = run(&set, &[MSH, &pid]);
        let dropped: Vec<String> = out.dropped.iter().map(ToString::to_string).collect();
        let patient = out
            .resources()
            .find(|(t, _, _)| *t == "Patient")
            .map(|(_, _, r)| r["telecom"][0].clone());
        (patient.expect("a Patient"), dropped, unconsumed(&out))
    };
    let (email, dropped, left) = telecom("NET");
    assert_eq!(email["system"], "email");
    assert!(email.get("use").is_none(), "{email}");
    assert!(dropped.is_empty(), "{dropped:?}");
    assert!(!left.iter().any(|p| p.starts_with("PID-13")), "{left:?}");
    let (_, dropped, _) = telecom("XYZ");
    assert_eq!(
        dropped,
        ["PID-13.2 (Patient.telecom.use: code not in the rule's ConceptMap)"]
    );
}
