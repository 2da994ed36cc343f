//! FHIR R4 invariant per-1 (a Period's `start` is not after its `end`) holds for every Period the
//! library writes: a contradicting `end` is left out, the `start` kept, and the source path of the
//! left-out value reported (never the value) so the pipeline applies the feed's policy.
//!
//! The messages here are hand-written synthetic data.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tributary_mapping::{DropReason, MappedBundle, MappingSet, RunOptions, SplitMessage};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn library() -> MappingSet {
    MappingSet::load(&repo().join("mappings/hl7v2")).unwrap_or_else(|e| panic!("{e}"))
}

fn map(set: &MappingSet, message: &str) -> MappedBundle {
    set.run(
        &SplitMessage::parse(message),
        tributary_terminology::builtin(),
        &RunOptions::default(),
    )
    .unwrap()
}

/// A two-file mapping set: `segments/PV1-Encounter.yaml` and `messages/ADT.yaml`.
fn encounter_set(
    segment: &str,
    message: &str,
) -> Result<MappingSet, tributary_mapping::LoadErrors> {
    let texts = [
        ("segments/PV1-Encounter.yaml", segment),
        ("messages/ADT.yaml", message),
    ]
    .map(|(p, t)| (PathBuf::from(p), t.to_string()));
    MappingSet::from_texts(Path::new("m"), &texts)
}

fn resource(out: &MappedBundle, ty: &str) -> Value {
    out.resources()
        .find(|(t, _, _)| *t == ty)
        .map(|(_, _, r)| r)
        .unwrap_or_else(|| panic!("no {ty}"))
}

/// An admission whose discharge (PV1-45) is years before the admit (PV1-44), with a second
/// patient name whose validity ends before it starts (PID-5[2].12/.13) and a coverage whose
/// expiration is before its effective date (IN1-12/13).
fn admission(discharge: &str) -> String {
    [
        "MSH|^~\\&|SYNTH|RIVERSIDE|TRIBUTARY|HIE|20261123081500-0600||ADT^A01^ADT_A01|PER-1|P|2.5.1",
        "EVN|A01|20261123081500-0600",
        "PID|1||MRN90001^^^RIVERSIDE^MR||Sample^Pat^^^^^L~Former^Pat^^^^^M^^^^^20200101^20100101||19800101|F",
        &format!(
            "PV1|1|I|4WEST^401^A^RIVERSIDE|||||||||||||||I|V90001{}|20261123081500-0600|{discharge}",
            "|".repeat(24)
        ),
        "IN1|1|GOLD^Gold Plan|INS42^^^PAYERS^NIIP|Synthetic Insurance||||||||20260101|20250101",
    ]
    .join("\r")
        + "\r"
}

#[test]
fn a_discharge_before_the_admit_is_left_out_and_reported_by_path() {
    let set = library();
    let msg = admission("20161123");
    let out = map(&set, &msg);

    let enc = resource(&out, "Encounter");
    assert_eq!(enc["period"], json!({"start": "2026-11-23T08:15:00-06:00"}));
    let patient = resource(&out, "Patient");
    assert_eq!(patient["name"][1]["period"], json!({"start": "2020-01-01"}));
    let coverage = resource(&out, "Coverage");
    assert_eq!(coverage["period"], json!({"start": "2026-01-01"}));

    let mut dropped: Vec<(String, &str, String, DropReason)> = out
        .dropped
        .iter()
        .map(|d| {
            (
                d.source.clone(),
                d.resource_type,
                d.element.clone(),
                d.reason,
            )
        })
        .collect();
    dropped.sort();
    assert_eq!(
        dropped,
        vec![
            (
                "IN1-13".into(),
                "Coverage",
                "period.end".into(),
                DropReason::EndBeforeStart
            ),
            (
                "PID-5[2].13".into(),
                "Patient",
                "name[1].period.end".into(),
                DropReason::EndBeforeStart
            ),
            (
                "PV1-45".into(),
                "Encounter",
                "period.end".into(),
                DropReason::EndBeforeStart
            ),
        ]
    );
    let pv1 = out.dropped.iter().find(|d| d.source == "PV1-45").unwrap();
    assert_eq!(
        pv1.to_string(),
        "PV1-45 (Encounter.period.end: end before start)"
    );
    // the rule is the `set: period.end` line of the library's Encounter map, wherever it is
    let map = std::fs::read_to_string(pv1.rule.rsplit_once(':').unwrap().0).unwrap();
    let line = map
        .lines()
        .position(|l| l.trim() == "- set: period.end")
        .map(|i| i + 1)
        .unwrap();
    assert!(
        pv1.rule
            .ends_with(&format!("segments/PV1-Encounter.yaml:{line}")),
        "{} (expected line {line})",
        pv1.rule
    );
    for d in &out.dropped {
        let text = d.to_string();
        assert!(
            !text.contains("2016") && !text.contains("2010") && !text.contains("2025"),
            "no values in the report: {text}"
        );
    }
    // the source field was read by a rule: it is not "unconsumed", it is "dropped"
    assert!(!out.unconsumed.iter().any(|u| u.to_string() == "PV1-45"));
    // lineage (--explain) lists only what the output holds
    let enc_id = out.dropped.iter().find(|d| d.source == "PV1-45").unwrap();
    let enc_prefix = format!("Encounter/{}.", enc_id.resource_id);
    assert!(out
        .lineage
        .iter()
        .any(|l| l.element == format!("{enc_prefix}period.start") && l.source == "PV1-44"));
    assert!(!out
        .lineage
        .iter()
        .any(|l| l.element.ends_with(".period.end") && l.source == "PV1-45"));
    assert!(!out.lineage.iter().any(|l| l.source == "PID-5[2].13"));
    // the same with lineage off (the pipeline's setting)
    let fast = set
        .map_bytes(
            msg.as_bytes(),
            tributary_terminology::builtin(),
            &RunOptions {
                tenant: "default",
                lineage: false,
                feed: None,
            },
        )
        .unwrap();
    assert_eq!(fast.dropped, out.dropped);
    assert_eq!(fast.to_json(), out.to_json());
}

#[test]
fn an_end_on_or_after_the_start_is_kept() {
    let set = library();
    // the same instant, the same day at date precision, and a later date-time
    for (discharge, end) in [
        ("20261123081500-0600", json!("2026-11-23T08:15:00-06:00")),
        ("20261123", json!("2026-11-23")),
        ("20261123091500-0500", json!("2026-11-23T09:15:00-05:00")),
        ("20261124", json!("2026-11-24")),
    ] {
        let out = map(&set, &admission(discharge));
        let enc = resource(&out, "Encounter");
        assert_eq!(enc["period"]["end"], end, "discharge {discharge}");
        assert!(!out.dropped.iter().any(|d| d.source == "PV1-45"));
    }
    // an instant earlier by the clock, in another offset: 09:00-05:00 is 08:00-06:00
    let out = map(&set, &admission("20261123090000-0500"));
    assert!(resource(&out, "Encounter")["period"].get("end").is_none());
    assert_eq!(out.dropped.len(), 3);
}

#[test]
fn an_observation_date_range_ending_before_it_starts_keeps_its_start() {
    let set = library();
    let oru = std::fs::read_to_string(repo().join("mappings/hl7v2/messages/ORU_R01.hl7")).unwrap();
    let msg = oru + "OBX|9|DR|99999-9^Synthetic period^L||20260105^20260101||||||F\r";
    let out = map(&set, &msg);
    let obs: Vec<Value> = out
        .resources()
        .filter(|(t, _, r)| *t == "Observation" && r.get("valuePeriod").is_some())
        .map(|(_, _, r)| r)
        .collect();
    assert_eq!(obs.len(), 1);
    assert_eq!(obs[0]["valuePeriod"], json!({"start": "2026-01-05"}));
    assert_eq!(out.dropped.len(), 1, "{:?}", out.dropped);
    let d = &out.dropped[0];
    assert!(
        d.source.starts_with("OBX[") && d.source.ends_with("]-5.2"),
        "{}",
        d.source
    );
    assert_eq!(
        (d.resource_type, d.element.as_str()),
        ("Observation", "valuePeriod.end")
    );
    assert!(d.rule.ends_with("datatypes/DR.yaml:7"), "{}", d.rule);
}

#[test]
fn the_check_is_generic_whatever_order_or_level_the_rules_write_start_and_end() {
    // `end` written before `start`, the start in a nested object built by another rule, and a
    // Period in an extension: the engine checks the finished resource, not the rule order.
    let enc = "resource: Encounter\nsegment: PV1\nrules:\n  - set: status\n    value: finished\n  - set: class\n    value: {system: http://terminology.hl7.org/CodeSystem/v3-ActCode, code: IMP}\n  - set: period.end\n    from: PV1-45\n  - set: period\n    rules:\n      - set: start\n        from: PV1-44\n  - set: period.start\n    from: PV1-44\n  - set: extension\n    rules:\n      - set: url\n        value: http://example.org/stay\n      - set: valuePeriod.end\n        from: PV1-45\n      - set: valuePeriod.start\n        value: \"2026-11-23\"\n";
    let msg = "message: [ADT^A01]\nresources:\n  - segment: PV1\n    map: PV1-Encounter\n";
    let set = encounter_set(enc, msg).unwrap_or_else(|e| panic!("{e}"));
    let out = map(
        &set,
        "MSH|^~\\&|A|B|C|D|20260101||ADT^A01|1|P|2.5\rPV1|1|I||||||||||||||||||||||||||||||||||||||||||20261123081500-0600|20261122\r",
    );
    let enc = resource(&out, "Encounter");
    assert_eq!(enc["period"], json!({"start": "2026-11-23T08:15:00-06:00"}));
    assert_eq!(
        enc["extension"][0]["valuePeriod"],
        json!({"start": "2026-11-23"})
    );
    let mut elements: Vec<(&str, &str)> = out
        .dropped
        .iter()
        .map(|d| (d.source.as_str(), d.element.as_str()))
        .collect();
    elements.sort();
    assert_eq!(
        elements,
        vec![
            ("PV1-45", "extension[0].valuePeriod.end"),
            ("PV1-45", "period.end")
        ]
    );
}

#[test]
fn a_constant_period_that_ends_before_it_starts_is_a_load_error() {
    let enc = "resource: Encounter\nsegment: PV1\nrules:\n  - set: status\n    value: finished\n  - set: identifier\n    value:\n      value: x\n      period: {start: \"2020-01-01\", end: \"2019-12-31\"}\n  - set: period\n    value: {start: \"2020-01-01\", end: \"2020-01-01\"}\n";
    let msg = "message: [ADT^A01]\nresources:\n  - segment: PV1\n    map: PV1-Encounter\n";
    let errors = encounter_set(enc, msg).unwrap_err().to_string();
    assert!(
        errors.contains("segments/PV1-Encounter.yaml:8:")
            && errors.contains("constant Period `identifier.period` starts after it ends"),
        "{errors}"
    );
    assert!(
        errors.contains("1 error(s)"),
        "equal start and end are fine: {errors}"
    );
}
