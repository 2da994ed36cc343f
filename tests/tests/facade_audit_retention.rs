//! Audit retention against the real binary: `tributary audit prune` removes old records, the
//! chain still verifies from its anchor (also after the server appended more), and tampering
//! after a prune — with a kept record or with the anchor — is named by `tributary audit verify`.

mod facade_support;

use facade_support::{cli, data_dir, export_audit, seed, Facade};
use tributary_storage::{AuditAnchor, AuditEntry, AuditLog, Db};

fn run(f: &Facade, args: &[&str]) -> (Option<i32>, String) {
    let out = cli(f, args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// A server that wrote some records, was stopped, and had everything so far pruned; then
/// served a few more requests. Returns the anchor's sequence number.
async fn pruned_facade() -> (Facade, u64) {
    let mut f = Facade::start(None);
    let t = seed(&f, None).await;
    for _ in 0..3 {
        f.call("GET", "/fhir/Patient/pa", Some(&t), None).await;
    }
    f.stop();
    let before = export_audit(&f, None).len();
    assert!(before >= 7, "{before} records");
    // Without --before and with retention off (the default), prune refuses.
    let (code, text) = run(&f, &["audit", "prune"]);
    assert_ne!(code, Some(0), "{text}");
    let cutoff = tributary_core::format_rfc3339_millis(tributary_core::now_millis() + 1);
    let (code, text) = run(&f, &["audit", "prune", "--before", &cutoff]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!("pruned {before} audit records")),
        "{text}"
    );
    let left = export_audit(&f, None);
    assert_eq!(left.len(), 1, "only the retention record is left: {left:?}");
    assert_eq!(left[0]["body"]["kind"], "audit-retention");
    assert_eq!(left[0]["body"]["pruned_through"], before as u64);
    let (code, text) = run(&f, &["audit", "verify"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("pruned by retention"), "{text}");

    // The server continues the chain after the anchor.
    f.restart();
    for _ in 0..4 {
        let r = f.call("GET", "/fhir/Patient/pb", Some(&t), None).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    f.stop();
    let (code, text) = run(&f, &["audit", "verify"]);
    assert_eq!(code, Some(0), "after more requests: {text}");
    (f, before as u64)
}

fn open_log(f: &Facade) -> AuditLog {
    AuditLog::new(Db::open(data_dir(&f.dir), Default::default()).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn prune_then_verify_passes_and_later_edits_are_named() {
    let (f, anchor) = pruned_facade().await;
    let edited = anchor + 3;
    {
        let log = open_log(&f);
        let raw = String::from_utf8(log.raw(edited).unwrap().unwrap()).unwrap();
        let changed = raw.replace("\"status\":200", "\"status\":403");
        assert_ne!(raw, changed);
        log.tamper_raw(edited, Some(changed.into_bytes()))
            .await
            .unwrap();
    }
    let (code, text) = run(&f, &["audit", "verify"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(&format!("record {}", edited + 1)) && text.contains("edited"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn anchor_moved_to_hide_deleted_records_is_detected() {
    let (f, anchor) = pruned_facade().await;
    {
        // Delete the first kept records (the retention record among them) and move the anchor
        // so the rest still chains to it.
        let log = open_log(&f);
        let third: AuditEntry =
            serde_json::from_slice(&log.raw(anchor + 3).unwrap().unwrap()).unwrap();
        log.tamper_raw(anchor + 1, None).await.unwrap();
        log.tamper_raw(anchor + 2, None).await.unwrap();
        let hash = hex::decode(&third.prev).unwrap().try_into().unwrap();
        log.tamper_anchor(AuditAnchor {
            seq: anchor + 2,
            hash,
        })
        .await
        .unwrap();
    }
    let (code, text) = run(&f, &["audit", "verify"]);
    assert_eq!(code, Some(1), "{text}");
    // The removal is named up to the moved anchor: nothing in the chain attests it.
    assert!(
        text.contains(&format!("record {}", anchor + 2)) && text.contains("not attested"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn edited_anchor_hash_is_detected() {
    let (f, anchor) = pruned_facade().await;
    {
        let log = open_log(&f);
        let a = log.anchor().unwrap().unwrap();
        assert_eq!(a.seq, anchor);
        log.tamper_anchor(AuditAnchor {
            seq: a.seq,
            hash: [0x5a; 32],
        })
        .await
        .unwrap();
    }
    let (code, text) = run(&f, &["audit", "verify"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains(&format!("record {}", anchor + 1)), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_prunes_records_older_than_retention_days() {
    let config = "[audit]\nretention_days = 1\nprune_interval_secs = 1\n";
    let mut f = Facade::start(Some(config));
    f.stop();
    {
        // Records from three and two days ago, then one from an hour ago (as ingress would write).
        let log = open_log(&f);
        let now = tributary_core::now_millis();
        for age_hours in [72, 48, 1] {
            log.append(vec![serde_json::json!({
                "kind": "ingress",
                "time": now - age_hours * 3_600_000,
                "tenant": "default",
                "outcome": "accepted",
            })])
            .await
            .unwrap();
        }
    }
    let before = export_audit(&f, None).len() as u64;
    f.restart();
    // Retention runs at start and then every second; wait for the anchor to appear.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let t = f.token("auditor", "user/*.rs", &["--role", "audit"]);
    loop {
        let r = f.call("GET", "/admin/audit/verify", Some(&t), None).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let log = f.log();
        if log.contains("audit retention") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no audit retention run in the log:\n{log}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    f.stop();
    let (code, text) = run(&f, &["audit", "verify"]);
    assert_eq!(code, Some(0), "{text}");
    let records = export_audit(&f, None);
    let times: Vec<i64> = records
        .iter()
        .filter(|e| e["body"]["kind"] == "ingress")
        .map(|e| e["body"]["time"].as_i64().unwrap())
        .collect();
    assert_eq!(
        times.len(),
        1,
        "only the record from an hour ago is kept: {records:?}"
    );
    let retention = records
        .iter()
        .find(|e| e["body"]["kind"] == "audit-retention")
        .expect("a retention record");
    // Everything before the two old ingress records (the first start's, if any) went too.
    assert_eq!(
        retention["body"]["pruned_through"],
        before - 1,
        "{retention}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn export_window_selects_facade_and_ingress_records_by_their_time() {
    let mut f = Facade::start(None);
    f.stop();
    let now = tributary_core::now_millis();
    let at = |ms: i64| tributary_core::format_rfc3339_millis(ms);
    {
        let log = open_log(&f);
        log.append(vec![
            serde_json::json!({"kind": "fhir-request", "time": now - 7_200_000, "n": 1}),
            serde_json::json!({"kind": "ingress", "at": at(now - 7_200_000), "n": 2}),
            serde_json::json!({"kind": "fhir-request", "time": now - 60_000, "n": 3}),
            serde_json::json!({"kind": "ingress", "at": at(now - 60_000), "n": 4}),
        ])
        .await
        .unwrap();
    }
    let picked: Vec<u64> = export_audit(&f, Some(&at(now - 3_600_000)))
        .iter()
        .filter_map(|e| e["body"]["n"].as_u64())
        .collect();
    assert_eq!(picked, vec![3, 4]);
}

/// `tributary audit export` beside a running server (a SIEM job cannot stop the facade): it
/// reads the log's files, and every request answered before the export started is in it, with
/// the same records a stopped server's export gives.
#[tokio::test(flavor = "multi_thread")]
async fn export_works_while_the_server_runs_and_holds_every_answered_request() {
    let mut f = Facade::start(None);
    let t = seed(&f, None).await;
    for i in 0..5 {
        let r = f
            .call("GET", &format!("/fhir/Patient/probe-{i}"), Some(&t), None)
            .await;
        assert_eq!(r.status, 404);
    }
    let out = cli(&f, &["audit", "export"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("running server"),
        "the export says it read beside a running server"
    );
    let live: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let probes: Vec<&str> = live
        .iter()
        .filter_map(|e| e["body"]["resource_id"].as_str())
        .filter(|id| id.starts_with("probe-"))
        .collect();
    assert_eq!(
        probes,
        ["probe-0", "probe-1", "probe-2", "probe-3", "probe-4"]
    );
    let seqs: Vec<u64> = live.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=live.len() as u64).collect::<Vec<_>>());
    // the server keeps serving and auditing; stopped, its export starts with the same records
    assert_eq!(f.get_status("/fhir/Patient/pa", &t).await, 200);
    f.stop();
    let all = export_audit(&f, None);
    assert!(all.len() > live.len());
    assert_eq!(all[..live.len()], live[..]);
}
