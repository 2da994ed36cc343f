//! The pipeline against the real embedded journal and store.

mod common;

use common::{
    append, assert_committed, discharge_before_admit, fixture, repo, runtime, wait_processed,
};
use std::path::Path;
use std::sync::Arc;
use tributary_core::{MessageState, StateKind};
use tributary_pipeline::{
    MappingConfig, MappingRegistry, Pipeline, ReloadOutcome, UnconsumedPolicy,
};
use tributary_runtime::Runtime;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

fn pipeline(dir: &Path, policy: UnconsumedPolicy) -> Pipeline {
    let registry = Arc::new(MappingRegistry::load(dir).expect("library loads"));
    Pipeline::new(
        registry,
        MappingConfig {
            unconsumed: policy,
            ..Default::default()
        },
    )
}

async fn drain(p: &Pipeline, rt: &Runtime) {
    while p.step(rt).await.unwrap() > 0 {}
}

#[tokio::test]
async fn replaying_a_message_three_times_leaves_one_version_of_each_resource() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime(tmp.path());
    let p = pipeline(&repo().join("mappings/hl7v2"), UnconsumedPolicy::Warn);
    let id = append(&rt, fixture("ORU_R01.hl7")).await;
    drain(&p, &rt).await;
    let rec = rt.journal.get(id).unwrap().unwrap();
    assert_eq!(
        rec.state.state,
        MessageState::Committed,
        "{:?}",
        rec.state.state
    );
    assert_eq!(
        rec.state.mapping_version.as_deref(),
        Some(p.registry.current().version.as_str())
    );
    // The message event: message code lower case, trigger event as HL7 writes it.
    let types: Vec<String> = rt
        .store
        .outbox()
        .read_after(0, 10_000)
        .unwrap()
        .into_iter()
        .map(|e| e.event_type)
        .filter(|t| t.starts_with("hl7v2."))
        .collect();
    assert_eq!(types, vec!["hl7v2.oru.R01".to_string()]);

    let mapped = p
        .registry
        .current()
        .map_bytes(
            &fixture("ORU_R01.hl7"),
            tributary_terminology::builtin(),
            &tributary_mapping::RunOptions {
                tenant: "t1",
                lineage: false,
                feed: None,
            },
        )
        .unwrap();
    let resources: Vec<(String, String)> = mapped
        .entries()
        .map(|(t, i)| (t.to_string(), i.to_string()))
        .collect();
    assert!(resources.len() >= 10, "an ORU gives many resources");
    for _ in 0..3 {
        rt.journal.replay(&[id]).await.unwrap();
        drain(&p, &rt).await;
        assert_eq!(
            rt.journal.get(id).unwrap().unwrap().state.state,
            MessageState::Committed
        );
    }
    for (t, i) in &resources {
        let history = rt.store.history("t1", t, i).unwrap();
        assert_eq!(
            history.len(),
            1,
            "{t}/{i} has {} versions after 3 replays",
            history.len()
        );
    }
    assert_eq!(rt.journal.get(id).unwrap().unwrap().state.attempts, 4);
}

#[tokio::test]
async fn a_mapping_failure_names_file_rule_and_path_but_no_value() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime(tmp.path());
    let maps = tmp.path().join("maps");
    copy_dir(&repo().join("mappings/hl7v2"), &maps);
    // this deployment wants malformed values to fail the message
    let settings = maps.join("mapping-set.yaml");
    let text = std::fs::read_to_string(&settings)
        .unwrap()
        .replace("on_invalid_value: warn", "on_invalid_value: fail");
    std::fs::write(&settings, text).unwrap();
    let p = pipeline(&maps, UnconsumedPolicy::Warn);
    let msg = String::from_utf8(fixture("ADT_A01.hl7"))
        .unwrap()
        .replace("|19800214|", "|1980XX14|");
    let id = append(&rt, msg.into_bytes()).await;
    drain(&p, &rt).await;
    let rec = rt.journal.get(id).unwrap().unwrap();
    let reason = rec
        .state
        .state
        .reason()
        .expect("failed with a reason")
        .to_string();
    assert_eq!(rec.state.state.kind(), StateKind::Failed);
    assert!(reason.contains("segments/PID-Patient.yaml:"), "{reason}");
    assert!(
        reason.contains("birthDate") && reason.contains("PID-7"),
        "{reason}"
    );
    for phi in ["1980XX14", "Testpatient", "MRN70001", "Avery"] {
        assert!(!reason.contains(phi), "reason leaks {phi}: {reason}");
    }
    // fix the mapping (back to warn): replay commits it
    let text = std::fs::read_to_string(&settings)
        .unwrap()
        .replace("on_invalid_value: fail", "on_invalid_value: warn");
    std::fs::write(&settings, text).unwrap();
    assert!(matches!(
        p.registry.reload(),
        ReloadOutcome::Reloaded { .. }
    ));
    rt.journal.replay(&[id]).await.unwrap();
    drain(&p, &rt).await;
    assert_eq!(
        rt.journal.get(id).unwrap().unwrap().state.state,
        MessageState::Committed
    );
}

#[tokio::test]
async fn quarantine_policy_holds_messages_with_unconsumed_fields_and_requeues_after_a_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime(tmp.path());
    let maps = tmp.path().join("maps");
    copy_dir(&repo().join("mappings/hl7v2"), &maps);
    let p = pipeline(&maps, UnconsumedPolicy::Quarantine);
    // ZPI is a local segment no map reads
    let msg = String::from_utf8(fixture("ADT_A08.hl7")).unwrap() + "ZPI|1|LOCALVALUE\r";
    let id = append(&rt, msg.into_bytes()).await;
    drain(&p, &rt).await;
    let rec = rt.journal.get(id).unwrap().unwrap();
    let reason = rec.state.state.reason().unwrap().to_string();
    assert!(reason.starts_with("quarantined:"), "{reason}");
    assert!(reason.contains("ZPI-2"), "{reason}");
    assert!(!reason.contains("LOCALVALUE"));
    // the analyst declares ZPI deliberately ignored; the reload re-queues the message
    let settings = maps.join("mapping-set.yaml");
    let text = std::fs::read_to_string(&settings)
        .unwrap()
        .replace("ignore:\n", "ignore:\n  - ZPI\n");
    std::fs::write(&settings, text).unwrap();
    assert!(matches!(
        p.reload_and_requeue(&rt).await,
        ReloadOutcome::Reloaded { .. }
    ));
    drain(&p, &rt).await;
    // some synthetic fields of the fixture are unconsumed too: quarantine is strict
    let st = rt.journal.get(id).unwrap().unwrap().state;
    assert_eq!(st.attempts, 2, "re-queued once by the reload");
}

/// The output is validated before it is committed: a VXU whose administration time (RXA-3) is
/// empty would give an Immunization without the `occurrence[x]` R4 requires. It fails with the
/// reason instead, and nothing of it is stored.
#[tokio::test]
async fn a_resource_without_an_element_r4_requires_fails_the_message() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime(tmp.path());
    let p = pipeline(&repo().join("mappings/hl7v2"), UnconsumedPolicy::Warn);
    let msg = String::from_utf8(fixture("VXU_V04.hl7")).unwrap();
    let blanked: Vec<String> = msg
        .split('\r')
        .map(|seg| {
            if seg.starts_with("RXA|") {
                let mut f: Vec<&str> = seg.split('|').collect();
                f[3] = "";
                f.join("|")
            } else {
                seg.to_string()
            }
        })
        .collect();
    let id = append(&rt, blanked.join("\r").into_bytes()).await;
    drain(&p, &rt).await;
    let st = rt.journal.get(id).unwrap().unwrap().state.state;
    assert_eq!(st.kind(), StateKind::Failed, "{st:?}");
    let reason = st.reason().unwrap();
    assert!(
        reason.contains("not valid FHIR R4") && reason.contains("occurrence[x]"),
        "{reason}"
    );
    assert!(rt
        .store
        .list("t1", "Immunization", None, 10)
        .unwrap()
        .is_empty());
    // the unchanged fixture commits
    let id = append(&rt, msg.into_bytes()).await;
    drain(&p, &rt).await;
    assert_eq!(
        rt.journal.get(id).unwrap().unwrap().state.state,
        MessageState::Committed
    );
}

/// The policy is per feed: the same message with a local segment no map reads is held from the
/// feed under `quarantine` and committed from the feed that stays on the default `warn`.
#[tokio::test]
async fn the_unconsumed_policy_is_per_feed() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime(tmp.path());
    let mut config = MappingConfig::default();
    config.feeds.insert(
        "new-lab".into(),
        tributary_pipeline::FeedConfig {
            unconsumed: UnconsumedPolicy::Quarantine,
        },
    );
    let registry = Arc::new(MappingRegistry::load(&repo().join("mappings/hl7v2")).unwrap());
    let p = Pipeline::new(registry, config);
    let msg = String::from_utf8(fixture("ADT_A08.hl7")).unwrap() + "ZPI|1|LOCALVALUE\r";
    let mut ids = Vec::new();
    for partner in ["new-lab", "riverside"] {
        let env = tributary_core::Envelope::builder(
            tributary_core::Protocol::Hl7v2,
            msg.clone().into_bytes(),
        )
        .tenant("t1")
        .partner(partner)
        .ordering_key(format!("{partner}/MRN70001"))
        .build();
        ids.push(rt.journal.append(env).await.unwrap().id);
    }
    drain(&p, &rt).await;
    let state = |i: usize| rt.journal.get(ids[i]).unwrap().unwrap().state.state;
    let held = state(0);
    assert!(
        held.reason()
            .is_some_and(|r| r.starts_with("quarantined:") && r.contains("ZPI-2")),
        "{held:?}"
    );
    assert_eq!(state(1), MessageState::Committed);
}

/// The feed a message came from chooses its `feeds:` variables: the same ORU without OBR-24
/// commits laboratory results for the ELR feed and uncategorized ones for another.
#[tokio::test]
async fn the_sending_feed_chooses_the_mapping_variables() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime(&tmp.path().join("data"));
    let dir = tmp.path().join("mappings");
    copy_dir(&repo().join("mappings/hl7v2"), &dir);
    let settings = dir.join("mapping-set.yaml");
    let mut text = std::fs::read_to_string(&settings).unwrap();
    text.push_str("feeds:\n  elr-lab:\n    vars:\n      result_category: laboratory\n");
    std::fs::write(&settings, text).unwrap();
    let p = pipeline(&dir, UnconsumedPolicy::Warn);
    let msg = fixture("ORU_R01.value-types.hl7");
    for (tenant, partner) in [("t1", "elr-lab"), ("t2", "riverside")] {
        let env = tributary_core::Envelope::builder(tributary_core::Protocol::Hl7v2, msg.clone())
            .tenant(tenant)
            .partner(partner)
            .ordering_key(format!("{partner}/MRN70003"))
            .build();
        rt.journal.append(env).await.unwrap();
    }
    drain(&p, &rt).await;
    for (tenant, expected) in [("t1", Some("laboratory")), ("t2", None)] {
        let mapped = p
            .registry
            .current()
            .map_bytes(
                &msg,
                tributary_terminology::builtin(),
                &tributary_mapping::RunOptions {
                    tenant,
                    lineage: false,
                    feed: None,
                },
            )
            .unwrap();
        let observations: Vec<String> = mapped
            .entries()
            .filter(|(t, _)| *t == "Observation")
            .map(|(_, i)| i.to_string())
            .collect();
        assert!(observations.len() >= 3);
        for id in observations {
            let stored = rt.store.history(tenant, "Observation", &id).unwrap();
            let r = stored.first().expect("committed").resource().unwrap();
            let category = r["category"][0]["coding"][0]["code"].as_str();
            assert_eq!(category, expected, "{tenant} Observation/{id}");
        }
    }
}

#[tokio::test]
async fn a_bad_mapping_file_is_reported_with_position_and_the_old_version_keeps_mapping() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime(tmp.path());
    let maps = tmp.path().join("maps");
    copy_dir(&repo().join("mappings/hl7v2"), &maps);
    let p = pipeline(&maps, UnconsumedPolicy::Warn);
    let before = p.registry.current().version.clone();
    let file = maps.join("segments/PID-Patient.yaml");
    let good = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, good.replace("  - set: gender\n", "  - set: gendr\n")).unwrap();
    let ReloadOutcome::Failed { errors } = p.reload_and_requeue(&rt).await else {
        panic!("a bad file must not load")
    };
    let text = errors.to_string();
    let line = good.lines().position(|l| l == "  - set: gender").unwrap() + 1;
    assert!(
        text.contains(&format!("segments/PID-Patient.yaml:{line}:10")),
        "{text}"
    );
    assert!(text.contains("did you mean `gender`"), "{text}");
    assert_eq!(
        p.registry.current().version,
        before,
        "old version still current"
    );
    assert!(p.registry.last_error().is_some());
    // and it still maps messages
    let id = append(&rt, fixture("ADT_A01.hl7")).await;
    drain(&p, &rt).await;
    let st = rt.journal.get(id).unwrap().unwrap().state;
    assert_eq!(st.state, MessageState::Committed);
    assert_eq!(st.mapping_version.as_deref(), Some(before.as_str()));
    // the fix is picked up: the good file again is the version that was running, the error
    // is gone, and messages still map with it
    std::fs::write(&file, &good).unwrap();
    assert!(matches!(
        p.registry.reload(),
        ReloadOutcome::Unchanged | ReloadOutcome::Reloaded { .. }
    ));
    assert!(
        p.registry.last_error().is_none(),
        "the fixed file's error is cleared"
    );
    assert_eq!(p.registry.current().version, before);
    let id = append(&rt, fixture("ADT_A01.hl7")).await;
    drain(&p, &rt).await;
    let st = rt.journal.get(id).unwrap().unwrap().state;
    assert_eq!(st.state, MessageState::Committed);
    assert_eq!(st.mapping_version.as_deref(), Some(before.as_str()));
}

#[tokio::test]
async fn a_period_end_before_its_start_is_left_out_and_goes_by_the_feed_policy() {
    let tmp = tempfile::tempdir().unwrap();
    // warn (default): committed without the contradicting end, the admit kept
    let rt = runtime(&tmp.path().join("warn"));
    let p = pipeline(&repo().join("mappings/hl7v2"), UnconsumedPolicy::Warn);
    let id = append(&rt, discharge_before_admit()).await;
    drain(&p, &rt).await;
    assert_eq!(
        rt.journal.get(id).unwrap().unwrap().state.state,
        MessageState::Committed
    );
    let mapped = p
        .registry
        .current()
        .map_bytes(
            &discharge_before_admit(),
            tributary_terminology::builtin(),
            &tributary_mapping::RunOptions {
                tenant: "t1",
                lineage: false,
                feed: None,
            },
        )
        .unwrap();
    let (_, enc_id) = mapped.entries().find(|(t, _)| *t == "Encounter").unwrap();
    let stored = rt.store.read("t1", "Encounter", enc_id).unwrap().unwrap();
    let period = stored.resource().unwrap()["period"].clone();
    assert!(period["start"].is_string(), "{period}");
    assert!(period.get("end").is_none(), "{period}");

    // reject: not committed; the reason names the field and why, never the value
    let rt = runtime(&tmp.path().join("reject"));
    let p = pipeline(&repo().join("mappings/hl7v2"), UnconsumedPolicy::Reject);
    let id = append(&rt, discharge_before_admit()).await;
    drain(&p, &rt).await;
    let rec = rt.journal.get(id).unwrap().unwrap();
    assert_eq!(rec.state.state.kind(), StateKind::Failed);
    let reason = rec.state.state.reason().unwrap().to_string();
    assert!(reason.starts_with("rejected:"), "{reason}");
    assert!(
        reason.contains("1 source value(s) left out of the output"),
        "{reason}"
    );
    assert!(
        reason.contains("PV1-45 (Encounter.period.end: end before start)"),
        "{reason}"
    );
    assert!(!reason.contains("2016"), "reason leaks the value: {reason}");
    assert!(rt.store.read("t1", "Encounter", enc_id).unwrap().is_none());
}

/// The ADT_A01 fixture with the patient's family name replaced and, when `pad` > 0, a Z segment
/// of that many bytes (no rule reads Z segments: committed with a warning under `warn`).
fn admit(family: &str, pad: usize) -> Vec<u8> {
    let text = String::from_utf8(fixture("ADT_A01.hl7")).unwrap();
    let mut text = text
        .trim_end_matches(['\r', '\n'])
        .replace("Testpatient^Avery", &format!("{family}^Avery"));
    if pad > 0 {
        text.push_str(&format!("\rZXT|1|{}", "x".repeat(pad)));
    }
    text.push('\r');
    text.into_bytes()
}

/// The running pipeline's dispatcher hands small records to the workers with the entry and lets
/// the workers read large ones themselves; either way one patient's messages apply in journal
/// order, so the last admit's name is the stored one.
#[tokio::test]
async fn a_running_pipeline_applies_large_and_small_messages_of_one_patient_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime(tmp.path());
    let p = pipeline(&repo().join("mappings/hl7v2"), UnconsumedPolicy::Warn);
    let running = tokio::spawn(p.clone().run(rt.clone()));
    let messages = [
        admit("Smallfirst", 0),
        admit("Largesecond", 200_000),
        admit("Smallthird", 0),
        admit("Largelast", 100_000),
    ];
    assert!(messages[1].len() > 64 * 1024 && messages[2].len() < 64 * 1024);
    let mut ids = Vec::new();
    for m in &messages {
        ids.push(append(&rt, m.clone()).await);
    }
    wait_processed(&rt, &ids).await;
    rt.shutdown.cancel();
    running.await.unwrap().unwrap();
    assert_committed(&rt, &ids);
    let mapped = p
        .registry
        .current()
        .map_bytes(
            &messages[3],
            tributary_terminology::builtin(),
            &tributary_mapping::RunOptions {
                tenant: "t1",
                lineage: false,
                feed: None,
            },
        )
        .unwrap();
    let (_, patient_id) = mapped.entries().find(|(t, _)| *t == "Patient").unwrap();
    let history = rt.store.history("t1", "Patient", patient_id).unwrap();
    let families: Vec<String> = history
        .iter()
        .map(|v| {
            v.resource().unwrap()["name"][0]["family"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(families.len(), 4, "one version per admit: {families:?}");
    assert!(families.contains(&"Largelast".to_string()));
    let current = rt.store.read("t1", "Patient", patient_id).unwrap().unwrap();
    assert_eq!(
        current.resource().unwrap()["name"][0]["family"],
        "Largelast"
    );
    assert_eq!(current.version, 4);
}

/// Journals a FHIR message from partner `ehr` of tenant `t1`, as the Subscriptions-in hook does.
async fn journal_fhir(rt: &Runtime, payload: impl Into<Vec<u8>>) -> tributary_core::MessageId {
    let env = tributary_core::Envelope::builder(tributary_core::Protocol::Fhir, payload.into())
        .tenant("t1")
        .partner("ehr")
        .ordering_key("ehr")
        .build();
    rt.journal.append(env).await.unwrap().id
}

/// A FHIR notification (as the Subscriptions-in hook journals it) reaches the store through the
/// pass-through mapping: our ids, references rewritten, the status entry left out; sent again,
/// nothing changes; a deletion deletes ours; one that cannot be stored fails with the reason.
#[tokio::test]
async fn fhir_notifications_reach_the_store_under_our_ids_and_replays_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime(tmp.path());
    let p = pipeline(&repo().join("mappings/hl7v2"), UnconsumedPolicy::Warn);
    let bundle = serde_json::json!({"resourceType": "Bundle", "type": "history", "entry": [
        {"fullUrl": "urn:uuid:s", "resource": {"resourceType": "Parameters", "id": "s",
            "meta": {"profile": ["http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4"]}}},
        {"fullUrl": "https://ehr.example/fhir/Patient/7",
            "resource": {"resourceType": "Patient", "id": "7", "gender": "female"}},
        {"fullUrl": "https://ehr.example/fhir/Encounter/e1", "resource": {"resourceType": "Encounter",
            "id": "e1", "status": "in-progress", "class": {"code": "IMP"},
            "subject": {"reference": "Patient/7"}}}
    ]});
    let id = journal_fhir(&rt, bundle.to_string().into_bytes()).await;
    drain(&p, &rt).await;
    let st = rt.journal.get(id).unwrap().unwrap().state;
    assert_eq!(st.state, MessageState::Committed);
    assert_eq!(
        st.mapping_version.as_deref(),
        Some(tributary_pipeline::fhir::VERSION)
    );
    let patient = tributary_core::deterministic_id(&["t1", "ehr", "Patient", "7"]);
    let encounter = tributary_core::deterministic_id(&["t1", "ehr", "Encounter", "e1"]);
    let enc = rt
        .store
        .read("t1", "Encounter", &encounter)
        .unwrap()
        .expect("stored");
    assert_eq!(
        enc.resource().unwrap()["subject"]["reference"],
        format!("Patient/{patient}")
    );
    assert!(rt.store.read("t1", "Parameters", "s").unwrap().is_none());
    // the same notification again (a replay): no new version
    rt.journal.replay(&[id]).await.unwrap();
    drain(&p, &rt).await;
    let again = rt.store.read("t1", "Patient", &patient).unwrap().unwrap();
    assert_eq!(again.version, 1);
    // the sender deletes the Encounter: ours is deleted, and the change goes out as an event
    let deletion = serde_json::json!({"resourceType": "Bundle", "type": "history", "entry": [
        {"fullUrl": "https://ehr.example/fhir/Encounter/e1",
            "request": {"method": "DELETE", "url": "Encounter/e1"}, "response": {"status": "204"}}
    ]});
    let del = journal_fhir(&rt, deletion.to_string().into_bytes()).await;
    drain(&p, &rt).await;
    assert_eq!(
        rt.journal.get(del).unwrap().unwrap().state.state,
        MessageState::Committed
    );
    let gone = rt
        .store
        .read("t1", "Encounter", &encounter)
        .unwrap()
        .unwrap();
    assert!(gone.deleted);
    let last = rt
        .store
        .outbox()
        .read_after(0, 10_000)
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(last.event_type, "fhir.Encounter.delete");
    assert_eq!(last.resource_id.as_deref(), Some(encounter.as_str()));
    assert!(last.resource.is_none());
    // an id-only notification that nobody read from the sender is not "done": it fails, saying why
    let unread = serde_json::json!({"resourceType": "Bundle", "type": "history", "entry": [
        {"fullUrl": "https://ehr.example/fhir/Patient/7", "request": {"method": "PUT", "url": "Patient/7"}}
    ]});
    let unread = journal_fhir(&rt, unread.to_string().into_bytes()).await;
    drain(&p, &rt).await;
    let st = rt.journal.get(unread).unwrap().unwrap().state;
    assert!(st
        .state
        .reason()
        .is_some_and(|r| r.starts_with("entry 0: no resource to store")));
    // a resource without an id cannot be stored: the message fails, saying why
    let bad = journal_fhir(
        &rt,
        br#"{"resourceType":"Patient","gender":"male"}"#.to_vec(),
    )
    .await;
    drain(&p, &rt).await;
    let st = rt.journal.get(bad).unwrap().unwrap().state;
    assert_eq!(st.state.reason(), Some("entry 0: Patient without an id"));
}

/// An ADT^A40 marks the merged-away Patient inactive and links it to the survivor, and that
/// record keeps what the MRG segment does not carry (birth date, address, gender): a merge, not
/// a replacement. Replaying the A40 changes nothing.
#[tokio::test]
async fn a_merge_keeps_the_merged_away_patients_record_and_replays_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime(tmp.path());
    let p = pipeline(&repo().join("mappings/hl7v2"), UnconsumedPolicy::Warn);
    let register = "MSH|^~\\&|SYNTH_ADT|RIVERSIDE^2.16.840.1.113883.3.9999.1^ISO|TRIBUTARY|TRIB_HIE|20261101080000-0600||ADT^A04^ADT_A01|SYN-A04-MERGED|P|2.5.1\r\
EVN|A04|20261101080000-0600\r\
PID|1||MRN70999^^^RIVERSIDE&2.16.840.1.113883.3.9999.1&ISO^MR||Testpatient^Avery||19800214|F|||12 Synthetic Way^^Springfield^IL^62701^USA^H\r\
PV1|1|O\r";
    let first = append(&rt, register.as_bytes().to_vec()).await;
    drain(&p, &rt).await;
    assert_committed(&rt, &[first]);
    let ids = rt
        .store
        .ids_by_identifier("t1", "Patient", None, "MRN70999")
        .unwrap();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let merged_id = ids[0].clone();
    let before = rt.store.read("t1", "Patient", &merged_id).unwrap().unwrap();
    let before = before.resource().unwrap();
    assert_eq!(before["birthDate"], "1980-02-14");

    let merge = append(&rt, fixture("ADT_A40.hl7")).await;
    drain(&p, &rt).await;
    assert_committed(&rt, &[merge]);
    let after = rt.store.read("t1", "Patient", &merged_id).unwrap().unwrap();
    assert_eq!(after.version, 2);
    let after = after.resource().unwrap();
    for kept in ["birthDate", "gender", "address"] {
        assert_eq!(after[kept], before[kept], "{kept} is kept");
    }
    assert_eq!(after["active"], false);
    let survivor = rt
        .store
        .ids_by_identifier("t1", "Patient", None, "MRN70001")
        .unwrap();
    assert_eq!(
        after["link"],
        serde_json::json!([{"other": {"reference": format!("Patient/{}", survivor[0])}, "type": "replaced-by"}])
    );
    let mrns: Vec<&serde_json::Value> = after["identifier"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["value"] == "MRN70999")
        .collect();
    assert_eq!(mrns.len(), 1, "the MRN the record had is not repeated");

    rt.journal.replay(&[merge]).await.unwrap();
    drain(&p, &rt).await;
    assert_committed(&rt, &[merge]);
    assert_eq!(
        rt.store.history("t1", "Patient", &merged_id).unwrap().len(),
        2
    );
}

/// `write: delete` through the pipeline: an IAM with action code D (ADT^A60) deletes the stored
/// allergy of its unique identifier and leaves the patient's other allergies; the history keeps
/// the deleted allergy's version; a replay changes nothing. An ADT^A29 deletes the Patient.
#[tokio::test]
async fn a_delete_entry_deletes_what_it_names_and_replays_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime(tmp.path());
    let p = pipeline(&repo().join("mappings/hl7v2"), UnconsumedPolicy::Warn);
    let deleting = fixture("ADT_A60.hl7");
    let text = String::from_utf8(deleting.clone()).unwrap();
    assert!(text.contains("|D^Delete^HL70206|"));
    let adding = text
        .replace("|D^Delete^HL70206|", "|A^Add/Insert^HL70206|")
        .replace("SYN-ADT-A60-0001", "SYN-ADT-A60-0000");
    let add = append(&rt, adding.into_bytes()).await;
    drain(&p, &rt).await;
    assert_committed(&rt, &[add]);
    let allergy = |value: &str| {
        let ids = rt
            .store
            .ids_by_identifier("t1", "AllergyIntolerance", None, value)
            .unwrap();
        assert_eq!(ids.len(), 1, "{value}: {ids:?}");
        ids[0].clone()
    };
    let (kept, deleted) = (allergy("AL-9001"), allergy("AL-9003"));

    let del = append(&rt, deleting).await;
    drain(&p, &rt).await;
    assert_committed(&rt, &[del]);
    let gone = rt
        .store
        .read("t1", "AllergyIntolerance", &deleted)
        .unwrap()
        .unwrap();
    assert!(gone.deleted, "the D allergy is deleted");
    let history = rt
        .store
        .history("t1", "AllergyIntolerance", &deleted)
        .unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(
        history[1].resource().unwrap()["code"]["coding"][0]["code"],
        "256277009"
    );
    let other = rt
        .store
        .read("t1", "AllergyIntolerance", &kept)
        .unwrap()
        .unwrap();
    assert!(!other.deleted, "the other allergies stay");

    rt.journal.replay(&[del]).await.unwrap();
    drain(&p, &rt).await;
    assert_committed(&rt, &[del]);
    assert_eq!(
        rt.store
            .history("t1", "AllergyIntolerance", &deleted)
            .unwrap()
            .len(),
        2,
        "deleting again changes nothing"
    );

    let a29 = fixture("ADT_A29.hl7");
    let register = String::from_utf8(a29.clone())
        .unwrap()
        .replace("ADT^A29^ADT_A21", "ADT^A28^ADT_A05")
        .replace("EVN|A29", "EVN|A28")
        .replace("SYN-ADT-A29-0001", "SYN-ADT-A28-0001");
    let reg = append(&rt, register.into_bytes()).await;
    drain(&p, &rt).await;
    assert_committed(&rt, &[reg]);
    let ids = rt
        .store
        .ids_by_identifier("t1", "Patient", None, "MRN70999")
        .unwrap();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let withdraw = append(&rt, a29).await;
    drain(&p, &rt).await;
    assert_committed(&rt, &[withdraw]);
    assert!(
        rt.store
            .read("t1", "Patient", &ids[0])
            .unwrap()
            .unwrap()
            .deleted
    );

    // BAR^P02 deletes the Account and only names the Patient (`write: none`): the Patient (the
    // A60's, stored above) is untouched, and the message event still carries the patient key
    let stored = rt
        .store
        .ids_by_identifier("t1", "Patient", None, "MRN70001")
        .unwrap();
    let version = |rt: &Runtime| {
        let p = rt.store.read("t1", "Patient", &stored[0]).unwrap().unwrap();
        p.version
    };
    let before = version(&rt);
    let purge = append(&rt, fixture("BAR_P02.hl7")).await;
    drain(&p, &rt).await;
    assert_committed(&rt, &[purge]);
    let event = rt
        .store
        .outbox()
        .read_after(0, 10_000)
        .unwrap()
        .into_iter()
        .find(|e| e.event_type == "hl7v2.bar.P02")
        .unwrap();
    assert_eq!(event.patient_id.as_deref(), Some(stored[0].as_str()));
    assert_eq!(version(&rt), before, "the Patient is not written");
}

/// `write: amend`: an MDM^T10 replacement supersedes the stored original document (keeping its
/// content), and a replacement whose original never came creates no document without content.
#[tokio::test]
async fn a_replacement_supersedes_a_stored_parent_and_creates_no_missing_one() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime(tmp.path());
    let p = pipeline(&repo().join("mappings/hl7v2"), UnconsumedPolicy::Warn);
    // by document number (TXA-12: masterIdentifier)
    let doc = |rt: &Runtime, number: &str| {
        let docs: Vec<_> = rt
            .store
            .list("t1", "DocumentReference", None, 100)
            .unwrap()
            .into_iter()
            .filter(|d| d.resource().unwrap()["masterIdentifier"]["value"] == number)
            .collect();
        assert!(docs.len() <= 1, "{number}: {} documents", docs.len());
        docs.into_iter().next()
    };

    // the replacement first: its parent is not stored, so nothing is made of it
    let early = append(&rt, fixture("MDM_T02.replacement.hl7")).await;
    drain(&p, &rt).await;
    assert_committed(&rt, &[early]);
    assert!(doc(&rt, "DOC-7001").is_none(), "no partial parent document");
    assert_eq!(
        doc(&rt, "DOC-7002").unwrap().resource().unwrap()["status"],
        "current"
    );

    // the original, then the replacement again (a resend): the original is superseded
    let original = append(&rt, fixture("MDM_T02.hl7")).await;
    drain(&p, &rt).await;
    assert_committed(&rt, &[original]);
    assert_eq!(
        doc(&rt, "DOC-7001").unwrap().resource().unwrap()["status"],
        "current"
    );
    rt.journal.replay(&[early]).await.unwrap();
    drain(&p, &rt).await;
    assert_committed(&rt, &[early]);
    let parent = doc(&rt, "DOC-7001").unwrap();
    let parent_json = parent.resource().unwrap();
    assert_eq!(parent_json["status"], "superseded");
    assert!(
        parent_json["content"][0]["attachment"]["data"].is_string(),
        "content kept"
    );
    let replacement = doc(&rt, "DOC-7002").unwrap().resource().unwrap();
    assert_eq!(
        replacement["relatesTo"][0]["target"]["reference"],
        format!("DocumentReference/{}", parent.id)
    );
    // a replay amends nothing more
    rt.journal.replay(&[early]).await.unwrap();
    drain(&p, &rt).await;
    assert_committed(&rt, &[early]);
    let history = rt
        .store
        .history("t1", "DocumentReference", &parent.id)
        .unwrap();
    assert_eq!(history.len(), 2, "the original and its superseded version");
}
