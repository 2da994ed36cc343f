//! The journal cannot write (disk full, I/O error): the listener must never acknowledge what it
//! did not store. Every frame gets "could not be stored, retry" (never AA, never the final
//! AR/CR its content would get), nothing is kept, the refusal is audited, and once the journal
//! writes again the sender's retry is accepted and stored once.
//!
//! The failure is injected by a wrapper over the real journal whose appends fail while a switch
//! is on (`tributary_testing::failing_journal`); everything else (sockets, framing, the journal
//! itself, the audit log) is real.

mod common;

use common::*;
use std::sync::Arc;
use tributary_mllp::ack::{read_all_msa, AckCode};
use tributary_mllp::{ListenerContext, MllpListenerConfig};
use tributary_storage::{AuditLog, Db, DbOptions, FjallJournal, Journal, ListFilter};
use tributary_testing::failing_journal::FailingJournal;

fn adt(id: &str) -> String {
    format!(
        "MSH|^~\\&|LAB|HOSP|TRIB|HIE|20261206120000||ADT^A01|{id}|P|2.5\rPID|1||MRN{id}^^^HOSP^MR||DOE^JANE\r"
    )
}

#[tokio::test]
async fn nothing_is_acknowledged_that_the_journal_did_not_store() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), DbOptions::default()).unwrap();
    let journal = Arc::new(FailingJournal::new(
        FjallJournal::new(db.clone(), 86_400_000),
        true,
    ));
    let audit = AuditLog::new(db.clone());
    let cfg = MllpListenerConfig {
        listen: "127.0.0.1:0".into(),
        ..Default::default()
    };
    let ctx = ListenerContext {
        journal: journal.clone(),
        audit: audit.clone(),
        app_ack: None,
        inbound_budget: None,
    };
    let (addr, _, shutdown, task) = listen(cfg, ctx).await;
    let stored = || journal.list(&ListFilter::default()).unwrap().len();
    let retry_text = "message could not be stored, retry";

    // A good message: not AA, the reason says retry, nothing kept.
    let ack = send_plain(addr, adt("F1").as_bytes()).await;
    let text = String::from_utf8_lossy(&ack).to_string();
    let msas = read_all_msa(&ack);
    assert_eq!(msas.len(), 1, "{text}");
    assert_ne!(msas[0].0, AckCode::AA, "{text}");
    assert_eq!(msas[0].1, b"F1".to_vec(), "{text}");
    assert!(text.contains("\rERR|"), "an ERR segment says why: {text}");
    assert!(text.contains(retry_text), "{text}");

    // A message that would be refused for its content is not refused for good: it could not
    // be kept for inspection, so the sender is asked to retry rather than told it is rejected
    // (an unreadable MSH-9 here).
    let bad = "MSH|^~\\&|LAB|HOSP|TRIB|HIE|20261206120000|||F2|P|2.5\rPID|1||X\r";
    let ack = send_plain(addr, bad.as_bytes()).await;
    let text = String::from_utf8_lossy(&ack).to_string();
    assert!(text.contains(retry_text), "{text}");

    // A batch: no message of it is acknowledged.
    let batch = format!(
        "BHS|^~\\&|LAB|HOSP|||20261206120000||||B1\r{}{}BTS|2\r",
        adt("F3"),
        adt("F4")
    );
    let ack = send_plain(addr, batch.as_bytes()).await;
    let text = String::from_utf8_lossy(&ack).to_string();
    let msas = read_all_msa(&ack);
    assert!(!msas.is_empty(), "{text}");
    assert!(
        msas.iter().all(|(code, _)| *code != AckCode::AA),
        "no message of the batch acknowledged: {text}"
    );
    assert_eq!(stored(), 0, "nothing was stored, nothing is listed");

    // The refusals are on the audit trail (the audit log is not the journal). A message's
    // `accepted` record is written beside its journal append; when the append fails, a second
    // record names it and says what happened, so no message reads as accepted that was not.
    let records = audit.read_after(0, 1000).unwrap();
    let corrections: Vec<_> = records
        .iter()
        .filter(|e| e.body["outcome"] == "storage_unavailable" && e.body["corrects"].is_u64())
        .collect();
    assert_eq!(corrections.len(), 3, "F1, F3 and F4: {records:?}");
    for c in corrections {
        let first = records
            .iter()
            .find(|e| Some(e.seq) == c.body["corrects"].as_u64())
            .unwrap_or_else(|| panic!("{c:?} names no record"));
        assert_eq!(first.body["outcome"], "accepted", "{first:?}");
        assert_eq!(first.body["message_id"], c.body["message_id"], "{c:?}");
    }
    assert!(
        records
            .iter()
            .any(|e| e.body["outcome"] == "storage_unavailable" && e.body["corrects"].is_null()),
        "the unreadable message is audited as not stored: {records:?}"
    );
    let seen = records.len();

    // The disk recovers; the sender's retries are accepted and stored once each.
    journal.set_failing(false);
    for id in ["F1", "F1"] {
        let ack = send_plain(addr, adt(id).as_bytes()).await;
        assert_eq!(read_all_msa(&ack)[0].0, AckCode::AA);
    }
    let ack = send_plain(addr, batch.as_bytes()).await;
    assert!(read_all_msa(&ack)
        .iter()
        .all(|(code, _)| *code == AckCode::AA));
    assert_eq!(stored(), 3, "F1 once, F3 and F4");
    // The resent F1 is a duplicate: its `accepted` record is corrected to `duplicate`, naming
    // the message the journal holds.
    let records = audit.read_after(0, 1000).unwrap();
    let dup = records[seen..]
        .iter()
        .find(|e| e.body["outcome"] == "duplicate")
        .unwrap_or_else(|| panic!("{records:?}"));
    let held = journal.list(&ListFilter::default()).unwrap();
    assert!(
        held.iter()
            .any(|(id, _, _)| dup.body["message_id"] == id.to_string()),
        "{dup:?}"
    );
    assert!(dup.body["corrects"].is_u64(), "{dup:?}");

    shutdown.cancel();
    let _ = task.await;
}
