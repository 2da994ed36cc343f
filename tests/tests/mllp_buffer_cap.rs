//! `[mllp] max_buffered_bytes` against the real `tributary serve`: while one connection holds a
//! large unfinished message, a second large message that does not fit is answered "busy, retry"
//! (and not stored), small messages still pass, and once the first completes the retry succeeds.

mod mllp_common;

use mllp_common::*;
use std::io::Write;
use std::time::Duration;

fn big(control_id: &str, filler: usize) -> Vec<u8> {
    let mut m = format!(
        "MSH|^~\\&|BIG|FAC|TRIB|HIE|20260101120000||ADT^A08^ADT_A01|{control_id}|P|2.5.1\rEVN|A08|20260101120000\rPID|1||BIG1^^^FAC^MR||Big^Message\rNTE|1||"
    )
    .into_bytes();
    m.extend(std::iter::repeat_n(b'x', filler));
    m.push(b'\r');
    m
}

#[test]
fn global_inbound_buffer_cap_refuses_with_retry_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let log = tmp.path().join("serve.log");
    // 12 MiB across all connections (the default listener's frames may be up to 10 MiB)
    let server = Server::start(&data, &log, "max_buffered_bytes = 12582912\n", &[]);
    let addr = server.mllp.to_string();
    let seven_mib = 7 << 20;
    let wait = Duration::from_secs(30);

    // A: 7 MiB of a message, not finished yet. B: another 7 MiB message does not fit while the
    // server holds A: AR "retry", nothing stored. The server holds A's bytes only once it has
    // read them off the socket (the kernel's buffers can take several MB of them first), which
    // on a loaded machine can take longer than the pause; an attempt where B came first and was
    // accepted is repeated with new ids and a longer pause (those B's are stored, as they should).
    let mut early = Vec::new();
    let (mut a, a_msg, mut b, b_msg, b_id) = 'attempts: {
        for attempt in 1..=5u64 {
            let a_msg = big(&format!("BIG-A{attempt}"), seven_mib);
            let mut a = Client::connect(&addr);
            a.s.write_all(&[0x0b]).unwrap();
            a.s.write_all(&a_msg[..a_msg.len() - 10]).unwrap();
            std::thread::sleep(Duration::from_secs(2 * attempt));
            let b_id = format!("BIG-B{attempt}");
            let b_msg = big(&b_id, seven_mib);
            let mut b = Client::connect(&addr);
            b.send(&b_msg);
            let reply = b.recv(wait).expect("a reply for B");
            assert_eq!(field(&reply, "MSA", 2), b_id);
            if field(&reply, "MSA", 1) == "AR" {
                assert!(
                    reply.contains("inbound buffer limit reached, retry"),
                    "{reply}"
                );
                break 'attempts (a, a_msg, b, b_msg, b_id);
            }
            assert_eq!(field(&reply, "MSA", 1), "AA", "{reply}");
            early.push(b_id);
            // dropping the unfinished A frees what the server held of it
        }
        panic!("B was accepted five times: the cap never counted A's buffered bytes");
    };

    // C: a small message still fits
    let mut c = Client::connect(&addr);
    c.send(&big("SMALL-C", 100));
    let ack = c.recv(wait).expect("ACK for C");
    assert_eq!(field(&ack, "MSA", 1), "AA", "{ack}");

    // A completes and is accepted; then B's retry on the same connection is accepted
    a.s.write_all(&a_msg[a_msg.len() - 10..]).unwrap();
    a.s.write_all(&[0x1c, 0x0d]).unwrap();
    let ack = a.recv(wait).expect("ACK for A");
    assert_eq!(field(&ack, "MSA", 1), "AA", "{ack}");
    assert!(field(&ack, "MSA", 2).starts_with("BIG-A"), "{ack}");
    b.send(&b_msg);
    let ack = b.recv(wait).expect("ACK for B's retry");
    assert_eq!(field(&ack, "MSA", 1), "AA", "{ack}");
    assert_eq!(field(&ack, "MSA", 2), b_id);
    drop((a, b, c));
    server.stop();

    let records = journal_records(&data);
    let ids: Vec<String> = records
        .iter()
        .map(|r| r.envelope.meta["control_id"].clone())
        .collect();
    let a_id = format!("BIG-A{}", &b_id["BIG-B".len()..]);
    let mut want = early.clone();
    want.extend(["SMALL-C".to_string(), a_id, b_id.clone()]);
    assert_eq!(ids, want, "the refused attempt was not stored");
    let n = records.len();
    assert_eq!(&records[n - 2].envelope.payload[..], &a_msg[..]);
    assert_eq!(&records[n - 1].envelope.payload[..], &b_msg[..]);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("inbound buffer limit reached"));
}
