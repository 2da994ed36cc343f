//! A batch refused whole at the door (its BTS-1 says more messages than it holds) is replayed by
//! the operator with `tributary replay <id>` through the running server: its messages are
//! journaled one by one and mapped into the store, and the batch leaves the failure list.

mod mllp_common;

use mllp_common::*;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tributary_core::MessageState;
use tributary_storage::{Db, DbOptions, FjallStore, Store};

fn cli(config: &Path, args: &[&str]) -> String {
    let out: Output = Command::new(tributary_e2e::tributary_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("TRIBUTARY_TOKEN")
        .output()
        .expect("run tributary");
    tributary_e2e::succeeded(out)
}

/// `journal list` rows (through the running server): (id, state).
fn rows(config: &Path, args: &[&str]) -> Vec<(String, String)> {
    cli(config, &[&["journal", "list"], args].concat())
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f[0].to_string(), f[2].to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_replayed_with_the_cli_reaches_the_store_message_by_message() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let config = data.with_extension("toml");
    let maps = tributary_e2e::repo_root().join("mappings");
    let extra = format!("[mapping]\ndir = {:?}\n", maps.display().to_string());
    let server = Server::start(&data, &tmp.path().join("serve.log"), &extra, &[]);
    let fixtures = maps.join("hl7v2/messages");
    let mut batch = b"BHS|^~\\&|SYNTH|RIVERSIDE|||||||B5\r".to_vec();
    for name in ["ADT_A01.hl7", "ORU_R01.hl7"] {
        let text = std::fs::read_to_string(fixtures.join(name)).unwrap();
        batch.extend_from_slice(text.trim_end().as_bytes());
        batch.push(b'\r');
    }
    batch.extend_from_slice(b"BTS|3\r");
    let mut sender = tributary_mllp::sink::MllpSender::new(
        tributary_mllp::sink::MllpSenderConfig::new(server.mllp.to_string()),
    );
    let ack = tokio::time::timeout(Duration::from_secs(30), sender.send_once(&batch))
        .await
        .expect("ack in time")
        .expect("sent");
    let ack = String::from_utf8_lossy(&ack).into_owned();
    assert!(ack.contains("BTS|2|batch rejected"), "{ack}");

    let rejected = rows(&config, &["--state", "rejected"]);
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    let id = rejected[0].0.clone();
    let queued = cli(&config, &["replay", &id]);
    assert!(queued.contains("queued 1 message(s)"), "{queued}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = rows(&config, &[]);
        if r.len() == 3 && r.iter().all(|(_, state)| state == "committed") {
            break;
        }
        assert!(Instant::now() < deadline, "never all committed: {r:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(rows(&config, &["--state", "rejected"]).is_empty());
    assert!(rows(&config, &["--state", "failed"]).is_empty());
    let shown: serde_json::Value =
        serde_json::from_str(&cli(&config, &["journal", "show", &id])).unwrap();
    assert_eq!(shown["state"], "committed", "{shown}");
    let note = shown["notes"]["split"].as_str().unwrap_or_default();
    assert!(
        note.starts_with("into 2 message(s): 2 journaled")
            && note.contains("BTS-1 declares 3 message(s), 2 received"),
        "{shown}"
    );
    server.stop();

    let records = journal_records(&data);
    let split: Vec<_> = records
        .iter()
        .filter(|r| r.envelope.meta.get("split_from") == Some(&id))
        .collect();
    assert_eq!(split.len(), 2);
    for r in &split {
        assert_eq!(r.state.state, MessageState::Committed);
        assert_eq!(r.envelope.meta["batch_control_id"], "B5");
    }
    let store = FjallStore::new(Db::open(&data, DbOptions::default()).unwrap());
    for rtype in ["Patient", "Encounter", "Observation"] {
        let found = store.list("default", rtype, None, 10).unwrap();
        assert!(!found.is_empty(), "no {rtype} in the store");
    }
}
