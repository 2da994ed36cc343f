//! Store-before-ACK under SIGKILL: a writer process appends from 16 concurrent tasks and prints an
//! acknowledgement only after `append` returned; we kill it at a random instant, reopen the
//! journal and check every acknowledged envelope is present, byte-for-byte, with consistent state.
//! Keys sent but never acknowledged are resent by the next writer, as a real sender would; the
//! journal must store each key once (durable-but-unacked records are de-duplicated).
//!
//! `CRASH_CYCLES` (default 200) sets the number of kill cycles.

use rand::Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tributary_core::{MessageId, StateKind};
use tributary_e2e::crash::payload_for;
use tributary_storage::{Db, DbOptions, FjallJournal, Journal, ListFilter};

const WRITERS: u64 = 16;

#[derive(Default)]
struct CycleLog {
    sent: BTreeSet<String>,
    acked: BTreeMap<String, MessageId>,
    states: BTreeMap<MessageId, StateKind>,
}

fn run_writer(
    dir: &std::path::Path,
    cycle: u64,
    resend: &BTreeSet<String>,
    kill_after: Duration,
) -> CycleLog {
    let resend_file = dir.with_extension(format!("resend{cycle}"));
    std::fs::write(
        &resend_file,
        resend.iter().cloned().collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_crash_writer"))
        .arg(dir)
        .arg(cycle.to_string())
        .arg(WRITERS.to_string())
        .arg(&resend_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start crash_writer");
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut log = CycleLog::default();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let parts: Vec<&str> = line.split(' ').collect();
            match parts.as_slice() {
                ["SENT", key] => {
                    log.sent.insert(key.to_string());
                }
                ["ACK", key, id, _dup] => {
                    log.acked.insert(key.to_string(), id.parse().unwrap());
                }
                ["STATE", id, state] => {
                    log.states
                        .insert(id.parse().unwrap(), StateKind::parse(state).unwrap());
                }
                _ => {}
            }
        }
        log
    });
    std::thread::sleep(kill_after);
    // SIGKILL: no destructor, no flush, no final fsync.
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_file(resend_file);
    reader.join().unwrap()
}

fn rank(k: StateKind) -> u8 {
    match k {
        StateKind::Received => 0,
        StateKind::Mapped => 1,
        StateKind::Committed => 2,
        _ => 3,
    }
}

#[test]
fn acknowledged_envelopes_survive_sigkill() {
    let cycles: u64 = std::env::var("CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut rng = rand::rng();
    let mut all_acked: BTreeMap<String, MessageId> = BTreeMap::new();
    let mut resend = BTreeSet::new();
    let started = Instant::now();
    let mut total_acks = 0usize;
    for cycle in 0..cycles {
        // Random kill instants, from during start-up (before anything is acknowledged) to well
        // into steady writing.
        let kill_after = Duration::from_millis(rng.random_range(5..250));
        let log = run_writer(&dir, cycle, &resend, kill_after);
        total_acks += log.acked.len();
        let db = Db::open(&dir, DbOptions::default()).expect("reopen after kill -9");
        let journal = FjallJournal::new(db, i64::MAX / 4);
        for (key, id) in &log.acked {
            let rec = journal
                .get(*id)
                .unwrap()
                .unwrap_or_else(|| panic!("cycle {cycle}: acknowledged {key} ({id}) is missing"));
            assert_eq!(
                rec.envelope.payload.as_ref(),
                payload_for(key).as_slice(),
                "cycle {cycle}: {key} torn"
            );
            assert_eq!(rec.envelope.dedup_key.as_deref(), Some(key.as_str()));
            let seq = rec
                .state
                .seq
                .expect("queued messages have a sequence number");
            let entry = journal.entries_after(seq - 1, 1).unwrap();
            assert_eq!(
                entry.first().map(|e| e.id),
                Some(*id),
                "cycle {cycle}: seq {seq} does not point back"
            );
            if let Some(acked_state) = log.states.get(id) {
                assert!(
                    rank(rec.state.state.kind()) >= rank(*acked_state),
                    "cycle {cycle}: {id} acknowledged as {acked_state} but found {}",
                    rec.state.state.kind()
                );
            }
            if let Some(previous) = all_acked.get(key) {
                assert_eq!(
                    previous, id,
                    "cycle {cycle}: {key} acknowledged under two ids"
                );
            }
        }
        all_acked.extend(log.acked.iter().map(|(k, v)| (k.clone(), *v)));
        resend = log
            .sent
            .iter()
            .filter(|k| !all_acked.contains_key(*k))
            .cloned()
            .collect();
    }
    // Final sweep: every key ever acknowledged is present, and no key is stored twice.
    let db = Db::open(&dir, DbOptions::default()).unwrap();
    let journal = FjallJournal::new(db, i64::MAX / 4);
    let mut keys_seen = BTreeSet::new();
    for (id, _, _) in journal.list(&ListFilter::default()).unwrap() {
        let rec = journal.get(id).unwrap().unwrap();
        let key = rec.envelope.dedup_key.clone().unwrap();
        assert!(keys_seen.insert(key.clone()), "{key} stored twice");
    }
    for key in all_acked.keys() {
        assert!(keys_seen.contains(key), "{key} lost");
    }
    eprintln!(
        "{cycles} kill -9 cycles, {total_acks} acknowledged appends, {} distinct stored, {:.1}s",
        keys_seen.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        total_acks > 0,
        "the writer never acknowledged anything: the test proved nothing"
    );
}
