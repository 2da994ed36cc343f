//! Messages that carry several patients (ADT^A40 merges, ORU^R01 PATIENT_RESULT groups): each
//! resource is filed under its own patient, never under the first PID of the message; and a
//! single-valued `ref:` that could name more than one resource fails instead of guessing.
//!
//! The messages here are hand-written synthetic data.

use serde_json::Value;
use std::path::{Path, PathBuf};
use tributary_mapping::{MappedBundle, MappingError, MappingSet, RunOptions, SplitMessage};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn library() -> MappingSet {
    MappingSet::load(&repo().join("mappings/hl7v2")).unwrap_or_else(|e| panic!("{e}"))
}

fn try_map(set: &MappingSet, segments: &[&str]) -> Result<MappedBundle, MappingError> {
    set.run(
        &SplitMessage::parse(&segments.join("\r")),
        tributary_terminology::builtin(),
        &RunOptions::default(),
    )
}

fn map(set: &MappingSet, segments: &[&str]) -> MappedBundle {
    try_map(set, segments).unwrap_or_else(|e| panic!("{e}"))
}

fn of_type(out: &MappedBundle, ty: &str) -> Vec<(String, Value)> {
    out.resources()
        .filter(|(t, _, _)| *t == ty)
        .map(|(_, id, r)| (id.to_string(), r))
        .collect()
}

/// The `Patient/id` reference of the Patient whose first identifier is `value`.
fn patient_ref(out: &MappedBundle, value: &str) -> String {
    let (id, _) = of_type(out, "Patient")
        .into_iter()
        .find(|(_, r)| r["identifier"][0]["value"] == value)
        .unwrap_or_else(|| panic!("no Patient {value}"));
    format!("Patient/{id}")
}

const A40: &[&str] = &[
    "MSH|^~\\&|SYNTH|RIVERSIDE|TRIBUTARY|HIE|20261123081500-0600||ADT^A40^ADT_A40|A40-1|P|2.5.1",
    "EVN|A40|20261123081500-0600",
    "PID|1||MRN1^^^RIVERSIDE^MR||One^Pat||19800101|F",
    "MRG|OLD1^^^RIVERSIDE^MR",
    "PID|2||MRN2^^^RIVERSIDE^MR||Two^Pat||19810101|M",
    "MRG|OLD2^^^RIVERSIDE^MR",
];

#[test]
fn an_a40_with_two_merges_links_each_pid_to_its_own_mrg() {
    let out = map(&library(), A40);
    assert_eq!(of_type(&out, "Patient").len(), 4);
    for (survivor, merged) in [("MRN1", "OLD1"), ("MRN2", "OLD2")] {
        let (s, m) = (patient_ref(&out, survivor), patient_ref(&out, merged));
        let find = |r: &str| {
            of_type(&out, "Patient")
                .into_iter()
                .find(|(id, _)| format!("Patient/{id}") == r)
                .unwrap()
                .1
        };
        let sr = find(&s);
        let mr = find(&m);
        assert_eq!(sr["link"][0]["other"]["reference"], m, "{survivor}: {sr}");
        assert_eq!(sr["link"][0]["type"], "replaces");
        assert_eq!(mr["link"][0]["other"]["reference"], s, "{merged}: {mr}");
        assert_eq!(mr["link"][0]["type"], "replaced-by");
    }
}

const ORU: &[&str] = &[
    "MSH|^~\\&|SYNTH_LAB|RIVERSIDE|TRIBUTARY|HIE|20261123090000-0600||ORU^R01^ORU_R01|ORU-1|P|2.5.1",
    "PID|1||MRN1^^^RIVERSIDE^MR||One^Pat||19800101|F",
    "PV1|1|O|LAB^^^RIVERSIDE|||||||||||||||||V1^^^RIVERSIDE",
    "ORC|RE|PLC-1^EHR|FIL-1^LAB",
    "OBR|1|PLC-1^EHR|FIL-1^LAB|GLU^Glucose^L",
    "OBX|1|NM|GLU^Glucose^L||100|mg/dL|||||F",
    "PID|2||MRN2^^^RIVERSIDE^MR||Two^Pat||19810101|M",
    "ORC|RE|PLC-1^EHR|FIL-1^LAB",
    "OBR|1|PLC-1^EHR|FIL-1^LAB|GLU^Glucose^L",
    "OBX|1|NM|GLU^Glucose^L||200|mg/dL|||||F",
];

#[test]
fn an_oru_with_two_patient_results_files_each_result_under_its_patient() {
    let out = map(&library(), ORU);
    let (p1, p2) = (patient_ref(&out, "MRN1"), patient_ref(&out, "MRN2"));
    let obs = of_type(&out, "Observation");
    assert_eq!(obs.len(), 2, "{obs:?}");
    let by_value = |v: i64| {
        obs.iter()
            .find(|(_, r)| r["valueQuantity"]["value"] == v)
            .unwrap()
            .clone()
    };
    let (id1, o1) = by_value(100);
    let (id2, o2) = by_value(200);
    assert_eq!(o1["subject"]["reference"], p1);
    assert_eq!(o2["subject"]["reference"], p2);
    // patient 2 has no PV1: the first patient's visit is not its encounter
    assert!(o1["encounter"]["reference"].is_string(), "{o1}");
    assert!(o2.get("encounter").is_none(), "{o2}");
    // same order numbers, two patients: two sets of ids
    assert_ne!(id1, id2);
    for ty in ["ServiceRequest", "DiagnosticReport"] {
        let rs = of_type(&out, ty);
        assert_eq!(rs.len(), 2, "{ty}: {rs:?}");
        let subjects: Vec<&Value> = rs.iter().map(|(_, r)| &r["subject"]["reference"]).collect();
        assert!(
            subjects.contains(&&Value::from(p1.clone())),
            "{ty}: {subjects:?}"
        );
        assert!(
            subjects.contains(&&Value::from(p2.clone())),
            "{ty}: {subjects:?}"
        );
    }
    // the second patient's id parts come from its own PID: changing the first leaves it alone
    let mut other = ORU.to_vec();
    other[1] = "PID|1||MRN9^^^RIVERSIDE^MR||One^Pat||19800101|F";
    let again = map(&library(), &other);
    let ids = |o: &MappedBundle| -> Vec<String> {
        of_type(o, "Observation")
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    };
    assert!(ids(&again).contains(&id2) && !ids(&again).contains(&id1));
}

#[test]
fn an_oru_without_a_pid_still_maps_its_orders() {
    let out = map(&library(), &[ORU[0], ORU[2], ORU[3], ORU[4], ORU[5]]);
    assert_eq!(of_type(&out, "Observation").len(), 1);
    assert_eq!(of_type(&out, "DiagnosticReport").len(), 1);
    assert_eq!(of_type(&out, "Encounter").len(), 1);
    assert!(of_type(&out, "Patient").is_empty());
}

/// A message map that leaves two PIDs in one scope cannot say whose encounter it is: the
/// single-valued `ref:` fails (naming the rule and segment, no value) instead of taking the first.
#[test]
fn a_single_valued_ref_that_matches_two_resources_fails() {
    let err = try_map(
        &library(),
        &[
            "MSH|^~\\&|SYNTH|RIVERSIDE|TRIBUTARY|HIE|20261123081500-0600||ADT^A01^ADT_A01|A01-1|P|2.5.1",
            "PID|1||MRN1^^^RIVERSIDE^MR||One^Pat",
            "PV1|1|I|4WEST^401^A^RIVERSIDE",
            "PID|2||MRN2^^^RIVERSIDE^MR||Two^Pat",
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("PV1-Encounter.yaml:")
            && err.contains("`ref: patient` matches 2 resources of different patients"),
        "{err}"
    );
    assert!(!err.contains("MRN") && !err.contains("One"), "{err}");
}

/// Two specimens of one order for the single `Observation.specimen`: both are the patient's, so
/// the first is referenced — with a warning naming the rule, not silently.
#[test]
fn a_single_valued_ref_to_several_resources_of_one_patient_warns() {
    let mut msg = ORU[..6].to_vec();
    msg.push("SPM|1|S1&LAB||119297000^Blood^SCT");
    msg.push("SPM|2|S2&LAB||119297000^Blood^SCT");
    let out = map(&library(), &msg);
    let obs = &of_type(&out, "Observation")[0].1;
    assert!(obs["specimen"]["reference"].is_string(), "{obs}");
    assert!(
        out.warnings
            .iter()
            .any(|w| w.contains("OBX-Observation.yaml:")
                && w.contains("`ref: specimen` at OBX matches 2 resources")),
        "{:?}",
        out.warnings
    );
}

/// Resources without an identifying value get a message-specific id. A sender that reuses a
/// control id (MSH-10) for another patient, or at another time, must not overwrite the first
/// message's resources; a replay of the same message keeps its ids.
#[test]
fn message_specific_ids_include_the_patient_and_the_message_time() {
    let adt = |time: &str, mrn: &str| -> Vec<String> {
        let msh = format!(
            "MSH|^~\\&|SYNTH|RIVERSIDE|TRIBUTARY|HIE|{time}||ADT^A01^ADT_A01|REUSED-1|P|2.5.1"
        );
        let pid = format!("PID|1||{mrn}^^^RIVERSIDE^MR||One^Pat");
        let out = map(
            &library(),
            &[
                &msh,
                &pid,
                "PV1|1|I|4WEST^401^A^RIVERSIDE",
                "OBX|1|NM|8867-4^Heart rate^LN||72|/min|||||F",
            ],
        );
        // the visit has no number and the OBX no order: both ids are message-specific
        let mut ids: Vec<String> = out
            .resources()
            .filter(|(t, _, _)| matches!(*t, "Encounter" | "Observation"))
            .map(|(t, id, _)| format!("{t}/{id}"))
            .collect();
        ids.sort();
        assert_eq!(ids.len(), 2, "{ids:?}");
        ids
    };
    let first = adt("20261123081500-0600", "MRN1");
    assert_eq!(
        first,
        adt("20261123081500-0600", "MRN1"),
        "a replay keeps its ids"
    );
    let other_patient = adt("20261123081500-0600", "MRN2");
    let later = adt("20261124081500-0600", "MRN1");
    for (what, ids) in [("another patient", other_patient), ("another time", later)] {
        assert!(
            first.iter().all(|id| !ids.contains(id)),
            "{what} with the same control id shares ids: {first:?} {ids:?}"
        );
    }
}

/// An MRN without an assigning authority (PID-3.4) is only unique at its sender: two facilities'
/// "1234" are two Patients (and two sets of visits), as for Practitioners and Locations. With an
/// authority the facility does not matter; and an A40's MRG names the Patient a PID made.
#[test]
fn a_patient_id_without_an_assigning_authority_is_scoped_to_the_sending_facility() {
    let ids = |facility: &str, cx: &str| -> (String, String) {
        let msh = format!(
            "MSH|^~\\&|SYNTH|{facility}|TRIBUTARY|HIE|20261123081500-0600||ADT^A01^ADT_A01|A01-1|P|2.5.1"
        );
        let pid = format!("PID|1||{cx}||One^Pat");
        let pv1 = format!("PV1|1|I|4WEST^401^A|||||||||||||||||V77^^^{facility}");
        let out = map(&library(), &[&msh, &pid, &pv1]);
        let id = |ty: &str| of_type(&out, ty).remove(0).0;
        (id("Patient"), id("Encounter"))
    };
    let (p_here, e_here) = ids("RIVERSIDE", "1234^^^^MR");
    let (p_there, e_there) = ids("LAKESIDE", "1234^^^^MR");
    assert_ne!(
        p_here, p_there,
        "two facilities' bare MRN 1234 share a Patient"
    );
    assert_ne!(e_here, e_there);
    let with_authority = "1234^^^MPI&2.16.840.1.113883.3.1&ISO^MR";
    assert_eq!(
        ids("RIVERSIDE", with_authority).0,
        ids("LAKESIDE", with_authority).0
    );
    let merge = map(
        &library(),
        &[
            "MSH|^~\\&|SYNTH|LAKESIDE|TRIBUTARY|HIE|20261123081500-0600||ADT^A40^ADT_A40|A40-1|P|2.5.1",
            "PID|1||5678^^^^MR||One^Pat",
            "MRG|1234^^^^MR",
        ],
    );
    let merged = of_type(&merge, "Patient")
        .into_iter()
        .find(|(_, r)| r["identifier"][0]["value"] == "1234")
        .unwrap();
    assert_eq!(
        merged.0, p_there,
        "the MRG names the Patient the sender's PID made"
    );
}
