//! The mapping field report through a running pipeline over the real embedded store: counts,
//! paths, example ids, the log lines — and no field value anywhere. Its own test binary: it
//! installs the process-wide log subscriber it reads back.

mod common;

use common::{
    append, assert_committed, discharge_before_admit, fixture, repo, runtime, wait_processed,
};
use std::sync::Arc;
use tributary_pipeline::{MappingConfig, MappingRegistry, Pipeline, UnconsumedPolicy};
use tributary_runtime::test_wait::wait;

/// Log lines written while a test runs, for asserting what the pipeline logs.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

/// The ADT_A01 fixture with a Z segment carrying `value` in ZXT-2 (no rule reads Z segments).
fn with_z_segment(value: &str) -> Vec<u8> {
    let mut text = String::from_utf8(fixture("ADT_A01.hl7")).unwrap();
    let text_end = text.trim_end_matches(['\r', '\n']).len();
    text.truncate(text_end);
    text.push_str(&format!("\rZXT|1|{value}\r"));
    text.into_bytes()
}

#[tokio::test]
async fn the_field_report_counts_fields_per_message_map_and_never_keeps_a_value() {
    const SECRET: &str = "ZEBRA-SECRET-4711";
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    // process-wide: the pipeline's tasks may run on any thread
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime(tmp.path());
    let registry = Arc::new(MappingRegistry::load(&repo().join("mappings/hl7v2")).unwrap());
    let p = Pipeline::new(
        registry,
        MappingConfig {
            unconsumed: UnconsumedPolicy::Warn,
            reload_interval_secs: 0,
            report_flush_secs: 1,
            report_log_interval_secs: 1,
            ..Default::default()
        },
    );
    let running = tokio::spawn(p.clone().run(rt.clone()));
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(append(&rt, with_z_segment(SECRET)).await);
    }
    ids.push(append(&rt, discharge_before_admit()).await);
    wait_processed(&rt, &ids).await;
    // report ticks while running: the counts are flushed and the summaries logged
    let summarized = |needle: &str| {
        String::from_utf8_lossy(&logs.0.lock().unwrap())
            .lines()
            .any(|l| l.contains("message(s) of") && l.contains(needle))
    };
    wait("ZXT-2 flushed to the store and summaries of ZXT-2 and PV1-45 logged, while running")
        .until_async(|| async {
            let flushed = tributary_storage::FieldReportStore::new(rt.db.clone())
                .read(Some("t1"))
                .unwrap();
            (flushed.rows.iter().any(|r| r.key.path == "ZXT-2")
                && summarized("ZXT-2 (")
                && summarized("PV1-45 left out"))
            .then_some(())
        })
        .await;
    // more after the flush: counted at shutdown
    ids.push(append(&rt, with_z_segment(SECRET)).await);
    wait_processed(&rt, &ids).await;
    rt.shutdown.cancel();
    running.await.unwrap().unwrap();
    assert_committed(&rt, &ids);

    let report = tributary_storage::FieldReportStore::new(rt.db.clone())
        .read(Some("t1"))
        .unwrap();
    let row = |kind: tributary_storage::FieldKind, path: &str| {
        report
            .rows
            .iter()
            .find(|r| r.key.kind == kind && r.key.path == path)
            .unwrap_or_else(|| panic!("no {kind} {path} in {report:#?}"))
            .clone()
    };
    let z = row(tributary_storage::FieldKind::Unconsumed, "ZXT-2");
    assert_eq!(z.stats.count, 4, "{z:?}");
    assert_eq!(z.key.tenant, "t1");
    assert_eq!(z.key.feed, "riverside", "counted per sending partner");
    assert_eq!(z.key.message_type, "ADT^A01");
    assert_eq!(z.key.message_map, "ADT_A01.yaml", "{z:?}");
    assert_eq!(
        z.stats.example_message,
        ids[4].to_string(),
        "the latest one"
    );
    assert!(z.stats.first_seen <= z.stats.last_seen);
    let end = row(tributary_storage::FieldKind::LeftOut, "PV1-45");
    assert_eq!(end.stats.count, 1);
    assert_eq!(end.key.reason, "Encounter.period.end: end before start");
    assert_eq!(end.stats.example_message, ids[3].to_string());
    // every row is a real count of these five messages
    assert!(report.rows.iter().all(|r| (1..=5).contains(&r.stats.count)));
    assert!(report.overflow.is_empty());

    let json = serde_json::to_string(&report).unwrap();
    assert!(!json.contains(SECRET), "the report keeps a value: {json}");
    assert!(
        !json.contains("20161123"),
        "the report keeps a value: {json}"
    );

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(!logs.contains(SECRET), "the log has a value:\n{logs}");
    assert!(!logs.contains("20161123"), "the log has a value:\n{logs}");
    // ZXT-2 is announced once, not per message; then summarized
    let firsts = logs
        .lines()
        .filter(|l| l.contains("first sighting") && l.contains("field=ZXT-2"))
        .count();
    assert_eq!(firsts, 1, "{logs}");
    // (which tick's summary holds which message depends on timing; each is summarized)
    let summaries: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("message(s) of"))
        .collect();
    assert!(
        summaries.iter().any(|l| l.contains("ZXT-2 (")),
        "no summary:\n{logs}"
    );
    assert!(
        summaries
            .iter()
            .any(|l| l.contains("PV1-45 left out: Encounter.period.end: end before start (1)")),
        "no summary:\n{logs}"
    );
    assert!(
        !logs.contains("source fields no rule consumed"),
        "the per-message line is gone:\n{logs}"
    );
}
