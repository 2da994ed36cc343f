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

    // A: 7 MiB of a message, not finished yet
    let a_msg = big("BIG-A", seven_mib);
    let mut a = Client::connect(&addr);
    a.s.write_all(&[0x0b]).unwrap();
    a.s.write_all(&a_msg[..a_msg.len() - 10]).unwrap();
    std::thread::sleep(Duration::from_secs(2));

    // B: another 7 MiB message does not fit: AR "retry", nothing stored
    let b_msg = big("BIG-B", seven_mib);
    let mut b = Client::connect(&addr);
    b.send(&b_msg);
    let nak = b.recv(wait).expect("a NAK for B");
    assert_eq!(field(&nak, "MSA", 1), "AR", "{nak}");
    assert_eq!(field(&nak, "MSA", 2), "BIG-B");
    assert!(nak.contains("inbound buffer limit reached, retry"), "{nak}");

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
    assert_eq!(field(&ack, "MSA", 2), "BIG-A");
    b.send(&b_msg);
    let ack = b.recv(wait).expect("ACK for B's retry");
    assert_eq!(field(&ack, "MSA", 1), "AA", "{ack}");
    assert_eq!(field(&ack, "MSA", 2), "BIG-B");
    drop((a, b, c));
    server.stop();

    let records = journal_records(&data);
    let ids: Vec<String> = records
        .iter()
        .map(|r| r.envelope.meta["control_id"].clone())
        .collect();
    assert_eq!(
        ids,
        ["SMALL-C", "BIG-A", "BIG-B"],
        "the refused attempt was not stored"
    );
    assert_eq!(&records[1].envelope.payload[..], &a_msg[..]);
    assert_eq!(&records[2].envelope.payload[..], &b_msg[..]);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("inbound buffer limit reached"));
}
