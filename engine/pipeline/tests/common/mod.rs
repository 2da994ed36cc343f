//! Helpers shared by the pipeline's integration test binaries: a runtime over the real embedded
//! store, journaling a message, and the repository's fixtures.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use tributary_core::{Envelope, MessageState, Protocol};
use tributary_runtime::Runtime;
use tributary_storage::{Db, DbOptions};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn runtime(dir: &Path) -> Runtime {
    Runtime::embedded(Db::open(dir, DbOptions::default()).unwrap(), 0)
}

/// Journals an HL7 v2 message of tenant `t1` from partner `riverside` (one ordering key).
pub async fn append(rt: &Runtime, payload: Vec<u8>) -> tributary_core::MessageId {
    let env = Envelope::builder(Protocol::Hl7v2, payload)
        .tenant("t1")
        .partner("riverside")
        .ordering_key("riverside/MRN70001")
        .build();
    rt.journal.append(env).await.unwrap().id
}

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(repo().join("mappings/hl7v2/messages").join(name)).unwrap()
}

/// The ADT^A01 fixture with a discharge (PV1-45) years before its admit (PV1-44).
pub fn discharge_before_admit() -> Vec<u8> {
    let text = String::from_utf8(fixture("ADT_A01.hl7")).unwrap();
    let segments: Vec<String> = text
        .split('\r')
        .map(|seg| {
            if !seg.starts_with("PV1|") {
                return seg.to_string();
            }
            let mut fields: Vec<&str> = seg.split('|').collect();
            fields.resize(fields.len().max(46), "");
            fields[45] = "20161123";
            fields.join("|")
        })
        .collect();
    segments.join("\r").into_bytes()
}

/// Waits (at most 30 s) until none of `ids` is still `received`.
pub async fn wait_processed(rt: &Runtime, ids: &[tributary_core::MessageId]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let done = ids.iter().all(|id| {
            let st = rt.journal.get(*id).unwrap().unwrap().state.state;
            st != MessageState::Received
        });
        if done {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "messages not processed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

pub fn assert_committed(rt: &Runtime, ids: &[tributary_core::MessageId]) {
    for id in ids {
        assert_eq!(
            rt.journal.get(*id).unwrap().unwrap().state.state,
            MessageState::Committed
        );
    }
}
