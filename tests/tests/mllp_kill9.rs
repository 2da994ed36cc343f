//! Store-before-ACK under `kill -9`: 8 clients stream messages to the real binary, the server is
//! killed with SIGKILL mid-stream, restarted on the same data directory, and every message that
//! was acknowledged `AA` (or `CA`) must be in the journal.

mod mllp_common;

use mllp_common::*;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tributary_core::StateKind;
use tributary_mllp::ack::read_msa;
use tributary_mllp::sink::{MllpSender, MllpSenderConfig};

fn message(client: usize, i: usize) -> Vec<u8> {
    // half original mode, half enhanced mode (CA)
    let ack_modes = if i.is_multiple_of(2) { "" } else { "|||AL|NE" };
    format!(
        "MSH|^~\\&|KILLTEST|FAC{client}|TRIB|HIE|20240101120000||ORU^R01^ORU_R01|K{client}-{i}|P|2.5.1{ack_modes}\rPID|1||ID{client}X{i}^^^HOSP^MR||TESTPATIENT^K\rOBR|1||ORD{i}|GLU^Glucose\rOBX|1|NM|GLU^Glucose||{i}|mg/dL\r"
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_message_survives_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let log = tmp.path().join("tributary.log");
    let server = Server::start(&data, &log, "", &[]);
    let addr = server.mllp;

    let acked_total = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for c in 0..8 {
        let acked_total = acked_total.clone();
        clients.push(tokio::spawn(async move {
            let mut cfg = MllpSenderConfig::new(addr.to_string());
            cfg.ack_timeout = Duration::from_secs(20);
            let mut sender = MllpSender::new(cfg);
            let mut acked = Vec::new();
            for i in 0.. {
                match sender.send_once(&message(c, i)).await {
                    Ok(ack) => {
                        let (code, id) = read_msa(&ack).expect("an ACK");
                        assert!(code.is_positive(), "unexpected {code:?}");
                        assert_eq!(id, format!("K{c}-{i}").into_bytes());
                        acked.push(format!("K{c}-{i}"));
                        acked_total.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => break, // the server is gone
                }
            }
            acked
        }));
    }
    // let them stream, then kill -9 while they are mid-flight
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked_total.load(Ordering::Relaxed) < 1500 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill9();
    let mut acked = HashSet::new();
    for c in clients {
        acked.extend(c.await.unwrap());
    }
    assert!(
        acked.len() >= 100,
        "too few messages were acknowledged: {}",
        acked.len()
    );

    // restart on the same data directory: it recovers and serves again
    let server = Server::start(&data, &log, "", &[]);
    let mut s = MllpSender::new(MllpSenderConfig::new(server.mllp.to_string()));
    let ack = s.send_once(&message(99, 0)).await.unwrap();
    assert!(read_msa(&ack).unwrap().0.is_positive());
    server.stop();

    let stored: HashSet<String> = journal_records(&data)
        .into_iter()
        .filter(|r| r.state.state.kind() == StateKind::Received)
        .filter_map(|r| r.envelope.meta.get("control_id").cloned())
        .collect();
    let missing: Vec<&String> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged messages lost after kill -9: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(10)]
    );
    eprintln!(
        "{} acknowledged before kill -9, all {} in the journal after restart ({} stored in total)",
        acked.len(),
        acked.len(),
        stored.len()
    );
}
