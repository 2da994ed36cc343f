//! Journal retention on the running binary: a message that was mapped and committed is pruned
//! once it is older than `[journal.retention] delivered_max_age_hours` (here 0: at once) and
//! every outbound route has passed it, while its resources stay in the store. A message a route
//! has not yet forwarded (its destination is down) is kept.

mod mllp_common;

use mllp_common::*;
use std::process::Command;
use tributary_e2e::{log_count, wait};
use tributary_storage::{Db, DbOptions, FjallStore, Store};

/// What the retention task logs after each pass (JSON log).
const RETENTION_PASS: &str = "\"message\":\"journal retention\"";

/// Message ids `tributary journal list` prints (through the running server).
fn listed(config: &std::path::Path) -> Vec<String> {
    let out = Command::new(tributary_e2e::tributary_bin())
        .args(["journal", "list", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').next().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processed_messages_are_pruned_after_every_route_has_passed_them() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let config = data.with_extension("toml");
    let down = tributary_e2e::free_addr();
    let extra = format!(
        "[mapping]\ndir = {:?}\n[journal.retention]\ndelivered_max_age_hours = 0\nprune_interval_secs = 1\n\
         [[mllp.routes]]\nname = \"lab-copy\"\ndestination = \"{down}\"\nmessage_types = [\"ORU\"]\n\
         backoff_max_secs = 1\n",
        tributary_e2e::repo_root().join("mappings").display().to_string()
    );
    let log = tmp.path().join("serve.log");
    let server = Server::start(&data, &log, &extra, &[]);
    let fixtures = tributary_e2e::repo_root().join("mappings/hl7v2/messages");
    let mllp = server.mllp.to_string();
    send_accepted(&mllp, &std::fs::read(fixtures.join("ADT_A01.hl7")).unwrap()).await;
    send_accepted(&mllp, &std::fs::read(fixtures.join("ORU_R01.hl7")).unwrap()).await;

    // The ADT is not for the route: pruned once committed. The ORU waits for its destination.
    let kept = wait("the committed ADT to be pruned, the ORU kept")
        .until_async(|| async {
            let ids = listed(&config);
            (ids.len() == 1).then_some(ids)
        })
        .await;
    // Two more retention passes (one logged line each) after both messages were committed:
    // the second started after the ORU was, and kept it.
    let http = server.http.to_string();
    wait("the pipeline to finish both messages")
        .until_async(|| async { (tributary_e2e::pipeline_finished(&http) >= 2.0).then_some(()) })
        .await;
    let passes = log_count(&log, RETENTION_PASS);
    wait("two more journal retention passes")
        .until_async(|| async { (log_count(&log, RETENTION_PASS) >= passes + 2).then_some(()) })
        .await;
    assert_eq!(listed(&config), kept, "the unforwarded ORU was pruned");
    server.stop();

    let records = journal_records(&data);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].envelope.meta["message_type"], "ORU");
    // what the pruned message produced is still there
    let store = FjallStore::new(Db::open(&data, DbOptions::default()).unwrap());
    assert!(!store
        .list("default", "Patient", None, 10)
        .unwrap()
        .is_empty());
    assert!(!store
        .list("default", "Encounter", None, 10)
        .unwrap()
        .is_empty());
}
