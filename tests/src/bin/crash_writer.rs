//! Writer process for the crash-loop test: appends envelopes from many concurrent tasks and
//! prints `ACK <key> <id>` only after `append` returned, then `STATE <id> <state>` after each
//! transition returned. The test kills it with SIGKILL at a random moment and checks that every
//! printed acknowledgement survived.
//!
//! Usage: crash_writer DATA_DIR CYCLE WRITERS [RESEND_FILE]

use std::io::Write;
use std::sync::{Arc, Mutex};
use tributary_core::{Envelope, MessageState, Protocol};
use tributary_e2e::crash::payload_for;
use tributary_storage::{Db, DbOptions, FjallJournal, Journal};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = &args[1];
    let cycle: u64 = args[2].parse()?;
    let writers: u64 = args[3].parse()?;
    let resend: Vec<String> = match args.get(4) {
        Some(f) => std::fs::read_to_string(f)?
            .lines()
            .map(str::to_string)
            .collect(),
        None => Vec::new(),
    };
    let db = Db::open(dir, DbOptions::default())?;
    let journal = Arc::new(FjallJournal::new(db, i64::MAX / 4));
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let say = |out: &Mutex<std::io::Stdout>, line: String| {
        let mut o = out.lock().unwrap();
        let _ = writeln!(o, "{line}");
        let _ = o.flush();
    };
    let resend = Arc::new(Mutex::new(resend));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (journal, out, resend) = (journal.clone(), out.clone(), resend.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                let key = match resend.lock().unwrap().pop() {
                    Some(k) => k,
                    None => {
                        n += 1;
                        format!("c{cycle}-w{w}-n{n}")
                    }
                };
                say(&out, format!("SENT {key}"));
                let env = Envelope::builder(Protocol::Hl7v2, payload_for(&key))
                    .partner(format!("writer{w}"))
                    .dedup_key(key.clone())
                    .build();
                let receipt = match journal.append(env).await {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("append failed: {e}");
                        return;
                    }
                };
                say(
                    &out,
                    format!("ACK {key} {} {}", receipt.id, receipt.duplicate),
                );
                if !receipt.duplicate && n.is_multiple_of(3) {
                    let id = receipt.id;
                    if journal
                        .transition(id, MessageState::Mapped, Some("v1".into()))
                        .await
                        .is_ok()
                    {
                        say(&out, format!("STATE {id} mapped"));
                    }
                    if journal
                        .transition(id, MessageState::Committed, None)
                        .await
                        .is_ok()
                    {
                        say(&out, format!("STATE {id} committed"));
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}
