//! MLLP → journal → map → commit, end to end through the real `tributary serve`: messages sent
//! over MLLP are mapped by the shipped mapping set and committed with the set's version; a bad
//! edit of a mapping file is rejected by hot reload (file:line:col in the log) while the old
//! version keeps mapping.

mod mllp_common;

use mllp_common::*;
use tributary_core::MessageState;
use tributary_e2e::wait;
use tributary_storage::{Db, DbOptions, FjallStore, Store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mllp_messages_are_mapped_and_committed_and_a_bad_mapping_edit_keeps_the_old_version() {
    let tmp = tempfile::tempdir().unwrap();
    let maps = tmp.path().join("mappings");
    copy_dir(&repo_root().join("mappings"), &maps);
    let data = tmp.path().join("data");
    let log = tmp.path().join("serve.log");
    let extra = format!(
        "[mapping]\ndir = {:?}\nreload_interval_secs = 1\n",
        maps.display().to_string()
    );
    let server = Server::start(&data, &log, &extra, &[]);
    let addr = server.mllp.to_string();
    let fixtures = repo_root().join("mappings/hl7v2/messages");

    send_accepted(&addr, &std::fs::read(fixtures.join("ADT_A01.hl7")).unwrap()).await;

    // a bad edit: unknown FHIR element; hot reload must refuse it and keep the old set
    let file = maps.join("hl7v2/segments/PID-Patient.yaml");
    let good = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, good.replace("  - set: gender\n", "  - set: gendr\n")).unwrap();
    let line = good.lines().position(|l| l == "  - set: gender").unwrap() + 1;
    let text = wait("the bad edit to be reported")
        .until_async(|| async {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.contains("mapping set change rejected").then_some(text)
        })
        .await;
    assert!(
        text.contains(&format!("PID-Patient.yaml:{line}:10")),
        "no file:line:col in the log"
    );
    send_accepted(&addr, &std::fs::read(fixtures.join("ORU_R01.hl7")).unwrap()).await;
    let http = server.http.to_string();
    wait("the pipeline to finish both messages")
        .until_async(|| async { (tributary_e2e::pipeline_finished(&http) >= 2.0).then_some(()) })
        .await;
    // The operator's view: both messages counted at the listener and in the pipeline, no PHI.
    let metrics = tributary_e2e::http_get(&http, "/metrics").unwrap();
    for want in [
        "tributary_mllp_messages_total{listener=\"mllp\",outcome=\"accepted\"} 2",
        "tributary_mllp_messages_total{listener=\"mllp\",outcome=\"rejected\"} 0",
        "tributary_pipeline_messages_total{outcome=\"committed\"} 2",
        "tributary_journal_head_seq 2",
    ] {
        assert!(
            metrics.lines().any(|l| l == want),
            "missing {want:?} in\n{metrics}"
        );
    }
    for phi in ["MRN70001", "999-00-1234", "Testpatient", "Avery"] {
        assert!(!metrics.contains(phi), "{phi} leaked into /metrics");
    }
    server.stop();

    let records = journal_records(&data);
    assert_eq!(records.len(), 2);
    let versions: Vec<_> = records
        .iter()
        .map(|r| {
            assert_eq!(
                r.state.state,
                MessageState::Committed,
                "{:?}",
                r.state.state
            );
            r.state.mapping_version.clone().expect("version recorded")
        })
        .collect();
    assert_eq!(versions[0], versions[1], "the old version kept mapping");
    let db = Db::open(&data, DbOptions::default()).unwrap();
    let store = FjallStore::new(db);
    let patient_id = tributary_core::deterministic_id(&[
        "default",
        "Patient",
        "MRN70001",
        "RIVERSIDE",
        "2.16.840.1.113883.3.9999.1",
    ]);
    let p = store
        .read("default", "Patient", &patient_id)
        .unwrap()
        .expect("Patient committed");
    let p = p.resource().unwrap();
    assert_eq!(p["gender"], "female");
    assert!(!store
        .list("default", "Observation", None, 100)
        .unwrap()
        .is_empty());
}
