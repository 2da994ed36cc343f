//! The listener over real sockets and a real (temporary) journal.

mod common;

use common::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tributary_core::{MessageState, StateKind};
use tributary_mllp::ack::{read_all_msa, read_msa, AckCode};
use tributary_mllp::header::Header;
use tributary_mllp::{AckAfter, BatchCountMismatch, MllpListenerConfig, PartnerConfig};
use tributary_storage::Journal;

fn segs(b: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(b)
        .split('\r')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Reads one MLLP frame (the reply) from a raw stream, or None at EOF.
async fn read_reply(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        if let Some(start) = buf.iter().position(|&c| c == 0x0b) {
            if let Some(end) = buf[start..].iter().position(|&c| c == 0x1c) {
                return Some(buf[start + 1..start + end].to_vec());
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut b))
            .await
            .expect("reply within 30 s")
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&b[..n]);
    }
}

#[tokio::test]
async fn accepted_message_is_journaled_byte_for_byte_before_aa() {
    let h = start(MllpListenerConfig::default()).await;
    let msg = adt("CTRL0001");
    let ack = send_plain(h.addr, &msg).await;
    // ACK mirrors the header
    let s = segs(&ack);
    let msh: Vec<&str> = s[0].split('|').collect();
    assert_eq!(&msh[2..6], &["TRIB", "HIE", "ADTAPP", "GENHOSP"]);
    assert_eq!(msh[8], "ACK^A01^ACK");
    assert_eq!(msh[10], "P");
    assert_eq!(msh[11], "2.5.1");
    assert_eq!(s[1], "MSA|AA|CTRL0001");
    // in the journal, exactly, with PHI-free meta
    let recs = h.records();
    assert_eq!(recs.len(), 1);
    let env = &recs[0].envelope;
    assert_eq!(&env.payload[..], &msg[..]);
    assert_eq!(env.partner.as_str(), "anonymous");
    assert_eq!(env.tenant.as_str(), "default");
    assert_eq!(env.meta["message_type"], "ADT");
    assert_eq!(env.meta["trigger_event"], "A01");
    assert_eq!(env.meta["control_id"], "CTRL0001");
    assert_eq!(env.meta["version"], "2.5.1");
    assert!(env.ordering_key.starts_with("anonymous/p:"));
    assert!(!env.ordering_key.contains("PATID1234"));
    assert!(env
        .dedup_key
        .as_ref()
        .unwrap()
        .starts_with("anonymous/CTRL0001/"));
    let meta = format!("{:?}", env.meta);
    assert!(
        !meta.contains("EVERYMAN") && !meta.contains("PATID1234"),
        "{meta}"
    );
    assert_eq!(recs[0].state.state, MessageState::Received);
    // audited, without PHI
    let audit = h.audit_bodies();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0]["outcome"], "accepted");
    assert_eq!(audit[0]["message_type"], "ADT^A01");
    assert_eq!(audit[0]["message_id"], env.id.to_string());
    let a = audit[0].to_string();
    assert!(!a.contains("EVERYMAN") && !a.contains("PATID1234") && !a.contains("CTRL0001"));
}

#[tokio::test]
async fn duplicate_is_acknowledged_again_but_stored_once() {
    let h = start(MllpListenerConfig::default()).await;
    let msg = adt("DUP1");
    let a1 = send_plain(h.addr, &msg).await;
    // a resend with a regenerated timestamp is still the same message
    let resend = String::from_utf8(msg.clone())
        .unwrap()
        .replace("20240101120000||ADT", "20240101120500||ADT");
    let a2 = send_plain(h.addr, resend.as_bytes()).await;
    assert_eq!(read_msa(&a1), Some((AckCode::AA, b"DUP1".to_vec())));
    assert_eq!(read_msa(&a2), Some((AckCode::AA, b"DUP1".to_vec())));
    assert_eq!(h.records().len(), 1);
    assert_eq!(
        h.stats
            .duplicates
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // same control id, different content: a different message, stored
    let other = String::from_utf8(msg).unwrap().replace("EVERYMAN", "OTHER");
    send_plain(h.addr, other.as_bytes()).await;
    assert_eq!(h.records().len(), 2);
}

#[tokio::test]
async fn unparseable_message_gets_ar_with_err_and_is_kept_as_rejected() {
    let h = start(MllpListenerConfig::default()).await;
    let ack = send_plain(h.addr, b"PID|1||123\rthis is not hl7").await;
    let s = segs(&ack);
    assert!(s[1].starts_with("MSA|AR||"), "{s:?}");
    assert!(s[2].starts_with("ERR|"), "{s:?}");
    assert!(s[2].contains("100^Segment sequence error^HL70357"), "{s:?}");
    // missing MSH-10: AR naming the field
    let ack = send_plain(h.addr, b"MSH|^~\\&|A|B|C|D|||ADT^A01||P|2.5\rPID|1\r").await;
    let s = segs(&ack);
    assert!(s[1].starts_with("MSA|AR|"), "{s:?}");
    assert!(s[2].contains("MSH^1^10") && s[2].contains("101"), "{s:?}");
    let recs = h.records();
    assert_eq!(recs.len(), 2);
    for r in &recs {
        assert_eq!(r.state.state.kind(), StateKind::Rejected);
        assert!(r
            .state
            .state
            .reason()
            .unwrap()
            .contains("cannot acknowledge"));
    }
    assert!(recs
        .iter()
        .any(|r| &r.envelope.payload[..] == b"PID|1||123\rthis is not hl7"));
}

#[tokio::test]
async fn enhanced_mode_sends_commit_acks_per_msh15() {
    // by default a commit ACK is always sent (senders block for it), even for MSH-15 NE
    let h = start(MllpListenerConfig::default()).await;
    let ne = b"MSH|^~\\&|A|B|C|D|||ORU^R01|N1|P|2.6|||NE|NE\rOBX|1\r";
    assert_eq!(
        read_msa(&send_plain(h.addr, ne).await),
        Some((AckCode::CA, b"N1".to_vec()))
    );
    // with follow_msh15, MSH-15 is honoured literally
    let h = start(MllpListenerConfig {
        follow_msh15: true,
        ..Default::default()
    })
    .await;
    let al = b"MSH|^~\\&|A|B|C|D|||ORU^R01^ORU_R01|E1|P|2.6|||AL|NE\rOBX|1\r";
    let ack = send_plain(h.addr, al).await;
    assert_eq!(read_msa(&ack), Some((AckCode::CA, b"E1".to_vec())));
    // NE: journaled, no ACK; the connection stays usable for the next message
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.write_all(&frame(
        b"MSH|^~\\&|A|B|C|D|||ORU^R01|E2|P|2.6|||NE|NE\rOBX|1\r",
    ))
    .await
    .unwrap();
    s.write_all(&frame(
        b"MSH|^~\\&|A|B|C|D|||ORU^R01|E3|P|2.6|||AL|NE\rOBX|1\r",
    ))
    .await
    .unwrap();
    let reply = read_reply(&mut s).await.unwrap();
    assert_eq!(read_msa(&reply), Some((AckCode::CA, b"E3".to_vec())));
    assert_eq!(h.records().len(), 3);
    // enhanced-mode rejection is CR
    let ack = send_plain(h.addr, b"MSH|^~\\&|A|B|C|D||||E4|P|2.6|||AL|NE\r").await;
    assert_eq!(read_msa(&ack).unwrap().0, AckCode::CR);
}

#[tokio::test]
async fn batch_with_a_stray_segment_before_its_first_message_is_rejected_whole() {
    let h = start(MllpListenerConfig::default()).await;
    let batch = "FHS|^~\\&|A|B|C|D|||||F78\rZZZ|stray\rMSH|^~\\&|A|B|C|D|||ADT^A01|SB1|P|2.5\rPID|1||X1\rFTS|1\r";
    let ack = send_plain(h.addr, batch.as_bytes()).await;
    assert_eq!(read_msa(&ack), Some((AckCode::AR, b"SB1".to_vec())));
    let text = String::from_utf8_lossy(&ack);
    assert!(text.contains("batch"), "{text}");
    let recs = h.records();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].state.state.kind(), StateKind::Rejected);
    assert_eq!(
        &recs[0].envelope.payload[..],
        batch.as_bytes(),
        "kept whole"
    );
    assert!(recs[0]
        .state
        .state
        .reason()
        .unwrap()
        .starts_with("batch cannot be split"));
}

#[tokio::test]
async fn batch_is_split_journaled_and_batch_acked() {
    let h = start(MllpListenerConfig::default()).await;
    let m1 = "MSH|^~\\&|A|B|C|D|||ADT^A01|BM1|P|2.5\rPID|1||X1\r";
    let m2 = "MSH|^~\\&|A|B|C|D|||ADT^A08|BM2|P|2.5\rPID|1||X2\r";
    let bad = "MSH|^~\\&|A|B|C|D|||ADT^A08||P|2.5\rPID|1||X3\r";
    let batch = format!(
        "FHS|^~\\&|A|B|C|D|||||F77\rBHS|^~\\&|A|B|C|D|||||B77\r{m1}{m2}{bad}BTS|3\rFTS|1\r"
    );
    let ack = send_plain(h.addr, batch.as_bytes()).await;
    let s = segs(&ack);
    assert!(s[0].starts_with("FHS|") && s[0].ends_with("|F77"), "{s:?}");
    assert!(s[1].starts_with("BHS|") && s[1].ends_with("|B77"), "{s:?}");
    let msas = read_all_msa(&ack);
    assert_eq!(msas.len(), 3);
    assert_eq!(msas[0], (AckCode::AA, b"BM1".to_vec()));
    assert_eq!(msas[1], (AckCode::AA, b"BM2".to_vec()));
    assert_eq!(msas[2].0, AckCode::AR);
    assert!(
        s.contains(&"BTS|3".to_string()) && s.last().unwrap() == "FTS|1",
        "{s:?}"
    );
    let recs = h.records();
    let payloads: Vec<&[u8]> = recs.iter().map(|r| &r.envelope.payload[..]).collect();
    assert!(payloads.contains(&m1.as_bytes()) && payloads.contains(&m2.as_bytes()));
    assert_eq!(
        recs.iter()
            .filter(|r| r.state.state.kind() == StateKind::Rejected)
            .count(),
        1
    );
    assert!(recs
        .iter()
        .filter(|r| r.state.state.kind() == StateKind::Received)
        .all(|r| r.envelope.meta["batch_control_id"] == "B77"));
    // a multi-MSH stream without batch headers is split too
    let ack = send_plain(h.addr, format!("{m1}{m2}").replace("BM", "SM").as_bytes()).await;
    let msas = read_all_msa(&ack);
    assert_eq!(
        msas,
        vec![
            (AckCode::AA, b"SM1".to_vec()),
            (AckCode::AA, b"SM2".to_vec())
        ]
    );
}

#[tokio::test]
async fn empty_batch_gets_a_batch_ack_of_no_messages() {
    let h = start(MllpListenerConfig::default()).await;
    let empty = "FHS|^~\\&|A|B|C|D|||||F1\rBHS|^~\\&|A|B|C|D|||||B1\rBTS|0\rFTS|1\r";
    let ack = send_plain(h.addr, empty.as_bytes()).await;
    let s = segs(&ack);
    assert_eq!(s.len(), 4, "{s:?}");
    assert!(s[0].starts_with("FHS|") && s[0].ends_with("|F1"), "{s:?}");
    assert!(s[1].starts_with("BHS|") && s[1].ends_with("|B1"), "{s:?}");
    assert_eq!(&s[2..], ["BTS|0", "FTS|1"]);
    assert!(h.records().is_empty(), "nothing to store");
    // … but the submission is on the audit trail, and counted
    let audit = h.audit_bodies();
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0]["outcome"], "accepted_empty_batch");
    assert!(audit[0]["message_id"].is_null(), "{audit:?}");
    assert_eq!(
        h.stats
            .empty_batches
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // an envelope claiming messages it does not hold is refused and kept
    let claims = "BHS|^~\\&|A|B|C|D|||||B2\rBTS|2\r";
    let ack = send_plain(h.addr, claims.as_bytes()).await;
    let msas = read_all_msa(&ack);
    assert_eq!(
        msas.len(),
        1,
        "one general NAK: an ACK of no NAKs means all accepted"
    );
    assert_eq!(msas[0].0, AckCode::AR);
    assert!(
        String::from_utf8_lossy(&ack).contains("BTS-1 declares 2 message(s), 0 received"),
        "{}",
        String::from_utf8_lossy(&ack)
    );
    let recs = h.records();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].state.state.kind(), StateKind::Rejected);
    assert_eq!(&recs[0].envelope.payload[..], claims.as_bytes());
}

#[tokio::test]
async fn every_batch_of_a_file_is_acked_and_journaled_with_its_own_id() {
    let h = start(MllpListenerConfig::default()).await;
    let m = |id: &str| format!("MSH|^~\\&|A|B|C|D|||ADT^A01|{id}|P|2.5\rPID|1||X{id}\r");
    let file = format!(
        "FHS|^~\\&|A|B|C|D|||||F1\rBHS|^~\\&|A|B|C|D|||||B1\r{}{}BTS|2\rBHS|^~\\&|A|B|C|D|||||B2\r{}BTS|1\rFTS|2\r",
        m("FM1"),
        m("FM2"),
        m("FM3")
    );
    let ack = send_plain(h.addr, file.as_bytes()).await;
    let s = segs(&ack);
    let shape: Vec<&str> = s.iter().map(|x| &x[..3]).collect();
    assert_eq!(
        shape,
        ["FHS", "BHS", "MSH", "MSA", "MSH", "MSA", "BTS", "BHS", "MSH", "MSA", "BTS", "FTS"],
        "{s:?}"
    );
    assert!(s[1].ends_with("|B1") && s[7].ends_with("|B2"), "{s:?}");
    assert_eq!(
        (&s[6][..], &s[10][..], &s[11][..]),
        ("BTS|2", "BTS|1", "FTS|2")
    );
    assert_eq!(s[9], "MSA|AA|FM3");
    let recs = h.records();
    assert_eq!(recs.len(), 3);
    for r in &recs {
        let want = if r.envelope.meta["control_id"] == "FM3" {
            "B2"
        } else {
            "B1"
        };
        assert_eq!(r.envelope.meta["batch_control_id"], want);
        assert_eq!(r.state.state.kind(), StateKind::Received);
    }
}

#[tokio::test]
async fn batch_whose_counts_disagree_is_rejected_whole_and_kept() {
    let h = start(MllpListenerConfig::default()).await;
    let m1 = "MSH|^~\\&|A|B|C|D|||ADT^A01|CM1|P|2.5\rPID|1||X1\r";
    let m2 = "MSH|^~\\&|A|B|C|D|||ADT^A01|CM2|P|2.6|||AL|NE\rPID|1||X2\r";
    let short = format!("BHS|^~\\&|A|B|C|D|||||B9\r{m1}{m2}BTS|3\r");
    let ack = send_plain(h.addr, short.as_bytes()).await;
    let s = segs(&ack);
    assert_eq!(
        read_all_msa(&ack),
        [
            (AckCode::AR, b"CM1".to_vec()),
            (AckCode::CR, b"CM2".to_vec())
        ]
    );
    assert!(s[0].ends_with("|B9"), "{s:?}");
    assert!(
        s.iter().filter(|x| x.starts_with("ERR|")).count() == 2
            && s.last().unwrap().starts_with("BTS|2|batch rejected"),
        "{s:?}"
    );
    let recs = h.records();
    assert_eq!(recs.len(), 1, "kept whole, no message of it processed");
    assert_eq!(recs[0].state.state.kind(), StateKind::Rejected);
    assert_eq!(&recs[0].envelope.payload[..], short.as_bytes());
    let reason = recs[0].state.state.reason().unwrap().to_string();
    assert_eq!(
        reason,
        "batch count mismatch: batch 1: BTS-1 declares 3 message(s), 2 received"
    );
    // FTS-1 is checked too
    let file = format!(
        "FHS|^~\\&|A|B|C|D|||||F9\rBHS|^~\\&\r{}BTS|1\rFTS|2\r",
        m1.replace("CM1", "CM3")
    );
    let ack = send_plain(h.addr, file.as_bytes()).await;
    assert_eq!(read_all_msa(&ack), [(AckCode::AR, b"CM3".to_vec())]);
    assert!(segs(&ack)
        .last()
        .unwrap()
        .starts_with("FTS|1|batch rejected"));
    let recs = h.records();
    assert_eq!(recs.len(), 2);
    assert!(recs
        .iter()
        .all(|r| r.state.state.kind() == StateKind::Rejected));
}

/// A listener set to accept a miscounting sender's batches processes what arrived and states
/// the mismatch in the batch ACK's BTS-2.
#[tokio::test]
async fn a_listener_set_to_accept_processes_a_miscounted_batch_and_says_so() {
    let h = start(MllpListenerConfig {
        batch_count_mismatch: BatchCountMismatch::Accept,
        ..MllpListenerConfig::default()
    })
    .await;
    let m1 = "MSH|^~\\&|A|B|C|D|||ADT^A01|CA1|P|2.5\rPID|1||X1\r";
    let m2 = "MSH|^~\\&|A|B|C|D|||ADT^A01|CA2|P|2.5\rPID|1||X2\r";
    let batch = format!("BHS|^~\\&|A|B|C|D|||||B7\r{m1}{m2}BTS|25\r");
    let ack = send_plain(h.addr, batch.as_bytes()).await;
    assert_eq!(
        read_all_msa(&ack),
        [
            (AckCode::AA, b"CA1".to_vec()),
            (AckCode::AA, b"CA2".to_vec())
        ]
    );
    let s = segs(&ack);
    assert!(
        s.last().unwrap().starts_with(
            "BTS|2|batch count mismatch, the messages received were processed: batch 1: BTS-1 declares 25"
        ),
        "{s:?}"
    );
    let recs = h.records();
    let payloads: Vec<&[u8]> = recs.iter().map(|r| &r.envelope.payload[..]).collect();
    assert_eq!(payloads.len(), 2);
    assert!(payloads.contains(&m1.as_bytes()) && payloads.contains(&m2.as_bytes()));
}

#[tokio::test]
async fn a_bom_before_a_batch_message_does_not_merge_it_into_the_previous_one() {
    let h = start(MllpListenerConfig::default()).await;
    let m1 = "MSH|^~\\&|A|B|C|D|||ADT^A01|BOM1|P|2.5\rPID|1||X1\r";
    let m2 = "MSH|^~\\&|A|B|C|D|||ADT^A01|BOM2|P|2.5\rPID|1||X2\r";
    let batch = format!("BHS|^~\\&|A|B|C|D|||||B5\r{m1}\u{feff}{m2}BTS|2\r");
    let ack = send_plain(h.addr, batch.as_bytes()).await;
    assert_eq!(
        read_all_msa(&ack),
        [
            (AckCode::AA, b"BOM1".to_vec()),
            (AckCode::AA, b"BOM2".to_vec())
        ]
    );
    let recs = h.records();
    let payloads: Vec<&[u8]> = recs.iter().map(|r| &r.envelope.payload[..]).collect();
    assert_eq!(payloads.len(), 2);
    assert!(payloads.contains(&m1.as_bytes()) && payloads.contains(&m2.as_bytes()));
}

#[tokio::test]
async fn oversized_frame_is_rejected_clearly_and_the_connection_goes_on() {
    let h = start(MllpListenerConfig {
        max_frame_bytes: 4096,
        ..Default::default()
    })
    .await;
    let mut big = adt("BIG1");
    big.extend(std::iter::repeat_n(b'x', 1 << 20));
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.write_all(&frame(&big)).await.unwrap();
    let reply = read_reply(&mut s).await.unwrap();
    let segs = segs(&reply);
    assert_eq!(read_msa(&reply).unwrap(), (AckCode::AR, b"BIG1".to_vec()));
    assert!(segs[1].contains("frame exceeds 4096 bytes"), "{segs:?}");
    // same connection, next message works
    s.write_all(&frame(&adt("SMALL1"))).await.unwrap();
    let reply = read_reply(&mut s).await.unwrap();
    assert_eq!(read_msa(&reply).unwrap(), (AckCode::AA, b"SMALL1".to_vec()));
    let recs = h.records();
    let rejected: Vec<_> = recs
        .iter()
        .filter(|r| r.state.state.kind() == StateKind::Rejected)
        .collect();
    assert_eq!(rejected.len(), 1);
    assert!(rejected[0].envelope.payload.len() <= 4096);
    assert!(rejected[0]
        .state
        .state
        .reason()
        .unwrap()
        .contains("max_frame_bytes"));
}

#[tokio::test]
async fn garbage_between_frames_is_skipped() {
    let h = start(MllpListenerConfig::default()).await;
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    let mut junk: Vec<u8> = (0..50_000u32)
        .map(|i| (i * 7919 % 251) as u8)
        .filter(|b| *b != 0x0b)
        .collect();
    junk.extend(frame(&adt("AFTERJUNK")));
    s.write_all(&junk).await.unwrap();
    let reply = read_reply(&mut s).await.unwrap();
    assert_eq!(
        read_msa(&reply).unwrap(),
        (AckCode::AA, b"AFTERJUNK".to_vec())
    );
    assert_eq!(h.records().len(), 1);
}

#[tokio::test]
async fn slowloris_is_cut_off_while_others_are_served() {
    let h = start(MllpListenerConfig {
        read_timeout_secs: 2,
        idle_timeout_secs: 3,
        ..Default::default()
    })
    .await;
    let mut slow = TcpStream::connect(h.addr).await.unwrap();
    let msg = frame(&adt("SLOW1"));
    let mut closed = false;
    for (i, b) in msg.iter().enumerate() {
        // meanwhile, a normal client is served
        if i == 1 {
            let ack = send_plain(h.addr, &adt("FAST1")).await;
            assert_eq!(read_msa(&ack).unwrap().0, AckCode::AA);
        }
        if slow.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut probe = [0u8; 1];
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(1), slow.read(&mut probe)).await {
            if matches!(r, Ok(0) | Err(_)) {
                closed = true;
                break;
            }
        }
        assert!(
            i < 20,
            "server did not close the slow connection within 20 s"
        );
    }
    assert!(closed, "server must close a 1 byte/s client");
    assert!(h.stats.timeouts.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    let recs = h.records();
    assert_eq!(recs.len(), 1, "only the fast message is journaled");
    assert_eq!(recs[0].envelope.meta["control_id"], "FAST1");
}

#[tokio::test]
async fn client_that_never_reads_acks_is_disconnected_and_others_are_served() {
    let h = start_with(
        MllpListenerConfig {
            write_timeout_secs: 2,
            ..Default::default()
        },
        false,
        None,
    )
    .await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(h.addr).await.unwrap();
    let one = frame(&adt("NOREAD"));
    let chunk: Vec<u8> = one.iter().copied().cycle().take(one.len() * 200).collect();
    let started = std::time::Instant::now();
    let mut disconnected = false;
    while started.elapsed() < Duration::from_secs(120) {
        match tokio::time::timeout(Duration::from_secs(10), s.write_all(&chunk)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                disconnected = true;
                break;
            }
            Err(_) => {
                // our writes are blocked because the server stopped reading; is it still alive
                // for others?
                let ack = send_plain(h.addr, &adt("OTHER1")).await;
                assert_eq!(read_msa(&ack).unwrap().0, AckCode::AA);
            }
        }
    }
    assert!(
        disconnected,
        "server must drop a client that never reads its ACKs"
    );
    let ack = send_plain(h.addr, &adt("OTHER2")).await;
    assert_eq!(read_msa(&ack).unwrap().0, AckCode::AA);
}

#[tokio::test]
async fn two_thousand_idle_connections_do_not_block_service() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let h = start(MllpListenerConfig::default()).await;
    let mut idle = Vec::with_capacity(2000);
    for _ in 0..2000 {
        idle.push(TcpStream::connect(h.addr).await.unwrap());
    }
    // all accepted and held
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while h
        .stats
        .connections_open
        .load(std::sync::atomic::Ordering::Relaxed)
        < 2000
    {
        assert!(
            std::time::Instant::now() < deadline,
            "connections not accepted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..5 {
        let ack = send_plain(h.addr, &adt(&format!("BUSY{i}"))).await;
        assert_eq!(read_msa(&ack).unwrap().0, AckCode::AA);
    }
    // and an idle one can still talk
    let s = &mut idle[1234];
    s.write_all(&frame(&adt("IDLE1234"))).await.unwrap();
    let reply = read_reply(s).await.unwrap();
    assert_eq!(
        read_msa(&reply).unwrap(),
        (AckCode::AA, b"IDLE1234".to_vec())
    );
}

#[tokio::test]
async fn connection_limit_closes_excess_connections() {
    let h = start(MllpListenerConfig {
        max_connections: 2,
        ..Default::default()
    })
    .await;
    let _a = TcpStream::connect(h.addr).await.unwrap();
    let _b = TcpStream::connect(h.addr).await.unwrap();
    let mut c = TcpStream::connect(h.addr).await.unwrap();
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(30), c.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "third connection must be closed"
    );
    assert_eq!(
        h.stats
            .connections_refused
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

/// A listener whose only partner is elsewhere (10.0.0.0/8): every local sender is unknown.
async fn start_for_strangers() -> Harness {
    start(MllpListenerConfig {
        allow_unknown_partners: false,
        partners: vec![PartnerConfig {
            id: "faraway".into(),
            source_cidrs: vec!["10.0.0.0/8".into()],
            ..Default::default()
        }],
        ..Default::default()
    })
    .await
}

/// What senders that are no partner can make the listener keep is bounded: past the budget
/// (50 frames, then 5 a second) a frame gets no answer and the connection is closed, and a
/// large frame is kept only in part — so anyone who can connect cannot fill the disk.
#[tokio::test]
async fn unknown_senders_cannot_fill_the_journal() {
    let h = start_for_strangers().await;
    let mut big = adt("BIG");
    big.extend_from_slice(format!("ZPD|{}\r", "x".repeat(200_000)).as_bytes());
    let mut answered = 0;
    let mut dropped = 0;
    for i in 0..200 {
        let mut s = TcpStream::connect(h.addr).await.unwrap();
        let msg = if i == 0 {
            big.clone()
        } else {
            adt(&format!("U{i}"))
        };
        s.write_all(&frame(&msg)).await.unwrap();
        match read_reply(&mut s).await {
            Some(reply) => {
                assert_eq!(read_msa(&reply).unwrap().0, AckCode::AR);
                answered += 1;
            }
            None => dropped += 1,
        }
    }
    assert!(
        answered >= 50 && dropped > 0,
        "{answered} answered, {dropped} dropped"
    );
    let recs = h.records();
    assert_eq!(recs.len(), answered);
    let first = recs
        .iter()
        .find(|r| r.envelope.payload.starts_with(&adt("BIG")))
        .expect("the large frame is kept in part");
    assert_eq!(first.envelope.payload.len(), 64 * 1024);
}

#[tokio::test]
async fn unknown_partner_is_refused_audited_and_kept() {
    let h = start_for_strangers().await;
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.write_all(&frame(&adt("UNK1"))).await.unwrap();
    let reply = read_reply(&mut s).await.unwrap();
    assert_eq!(read_msa(&reply).unwrap(), (AckCode::AR, b"UNK1".to_vec()));
    assert!(String::from_utf8_lossy(&reply).contains("unknown partner"));
    // then closed
    assert!(read_reply(&mut s).await.is_none());
    let recs = h.records();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].state.state.kind(), StateKind::Rejected);
    assert_eq!(recs[0].envelope.partner.as_str(), "unknown");
    let audit = h.audit_bodies();
    assert!(audit
        .iter()
        .any(|a| a["outcome"] == "refused_unknown_partner"
            && a["remote_addr"] == "127.0.0.1"
            && a["message_type"] == "ADT^A01"));
    let all = serde_json::to_string(&audit).unwrap();
    assert!(!all.contains("EVERYMAN") && !all.contains("PATID1234"));
}

#[tokio::test]
async fn partner_by_address_with_rate_limit_gets_a_retry_nak() {
    let h = start(MllpListenerConfig {
        allow_unknown_partners: false,
        tenant: Some("north".into()),
        partners: vec![PartnerConfig {
            id: "lab".into(),
            source_cidrs: vec!["127.0.0.0/8".into()],
            max_messages_per_sec: Some(0.01),
            burst: Some(2),
            ..Default::default()
        }],
        ..Default::default()
    })
    .await;
    let mut s = tributary_mllp::sink::MllpSender::new(sender_cfg(h.addr));
    let a1 = s.send_once(&adt("R1")).await.unwrap();
    let a2 = s.send_once(&adt("R2")).await.unwrap();
    let a3 = s.send_once(&adt("R3")).await.unwrap();
    assert_eq!(read_msa(&a1).unwrap().0, AckCode::AA);
    assert_eq!(read_msa(&a2).unwrap().0, AckCode::AA);
    assert_eq!(read_msa(&a3).unwrap(), (AckCode::AR, b"R3".to_vec()));
    assert!(String::from_utf8_lossy(&a3).contains("rate limited, retry"));
    let recs = h.records();
    assert_eq!(recs.len(), 2, "rate-limited message is not stored");
    assert!(recs
        .iter()
        .all(|r| r.envelope.partner.as_str() == "lab" && r.envelope.tenant.as_str() == "north"));
    assert!(h
        .audit_bodies()
        .iter()
        .any(|a| a["outcome"] == "rate_limited"));
}

async fn wait_for_received(h: &Harness, control_id: &str) -> tributary_core::MessageId {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(r) = h
            .records()
            .into_iter()
            .find(|r| r.envelope.meta.get("control_id").map(String::as_str) == Some(control_id))
        {
            return r.envelope.id;
        }
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn ack_after_mapped_reports_mapping_failure_as_ae_naming_the_field() {
    // the default hook is JournalStateAck: the test plays the pipeline with journal.transition
    let h = start_with(
        MllpListenerConfig {
            ack_after: AckAfter::Mapped,
            mapped_timeout_secs: 30,
            ..Default::default()
        },
        true,
        None,
    )
    .await;
    let addr = h.addr;
    let fail = tokio::spawn(async move { send_plain(addr, &adt("MAPFAIL")).await });
    let id = wait_for_received(&h, "MAPFAIL").await;
    h.journal
        .transition(
            id,
            MessageState::Failed {
                reason: "mappings/hl7v2/adt_a01.map:14:5 rule patient.identifier: PID-3.4 has no ConceptMap entry".into(),
            },
            None,
        )
        .await
        .unwrap();
    let ack = fail.await.unwrap();
    let s = segs(&ack);
    assert_eq!(read_msa(&ack).unwrap(), (AckCode::AE, b"MAPFAIL".to_vec()));
    assert!(s[2].starts_with("ERR||PID^1^3|"), "{s:?}");
    assert!(s[2].contains("mapping failed"), "{s:?}");

    let ok = tokio::spawn(async move { send_plain(addr, &adt("MAPOK")).await });
    let id = wait_for_received(&h, "MAPOK").await;
    h.journal
        .transition(id, MessageState::Mapped, Some("v1".into()))
        .await
        .unwrap();
    let ack = ok.await.unwrap();
    assert_eq!(read_msa(&ack).unwrap(), (AckCode::AA, b"MAPOK".to_vec()));
    assert_eq!(segs(&ack).len(), 2);
}

#[tokio::test]
async fn header_variants_are_acknowledged() {
    let h = start(MllpListenerConfig::default()).await;
    // BOM + LF separators + 5 encoding chars + custom field separator + 8859/1 bytes in header
    let m = b"\xEF\xBB\xBFMSH#^~\\&!#APP#FAC\xE9#R#RF#2024##ADT^A01#V27#P#2.7####\n\nPID#1\n";
    let ack = send_plain(h.addr, m).await;
    let hdr = Header::read(&ack).unwrap();
    assert_eq!(hdr.delims.field, b'#');
    assert_eq!(hdr.receiving_facility(), b"FAC\xE9", "raw bytes mirrored");
    assert_eq!(read_msa(&ack).unwrap(), (AckCode::AA, b"V27".to_vec()));
    assert_eq!(&h.records()[0].envelope.payload[..], &m[..]);
}

#[tokio::test]
async fn sender_retries_until_the_receiver_is_up() {
    // a free port; the listener starts on it a little later
    let addr = tributary_runtime::test_ports::free_loopback_addr();
    let mut cfg = sender_cfg(addr);
    cfg.max_attempts = 30;
    cfg.backoff_initial = Duration::from_millis(100);
    cfg.backoff_max = Duration::from_millis(500);
    let send = tokio::spawn(async move {
        let mut s = tributary_mllp::sink::MllpSender::new(cfg);
        let first = s.send(&adt("RETRY1")).await;
        let second = s.send(&adt("RETRY2")).await;
        (first, second, s.is_connected())
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let dir = tempfile::tempdir().unwrap();
    let db = tributary_storage::Db::open(dir.path(), Default::default()).unwrap();
    let journal = Arc::new(tributary_storage::FjallJournal::new(db.clone(), 1000));
    let listener = tributary_mllp::MllpListener::bind(
        MllpListenerConfig {
            listen: addr.to_string(),
            ..Default::default()
        },
        "default",
        tributary_mllp::ListenerContext {
            journal: journal.clone(),
            audit: tributary_storage::AuditLog::new(db.clone()),
            app_ack: None,
            inbound_budget: None,
        },
    )
    .await
    .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(listener.run(stop.clone()));
    let (first, second, connected) = send.await.unwrap();
    assert_eq!(first.unwrap().control_id, b"RETRY1");
    assert_eq!(second.unwrap().code, AckCode::AA);
    assert!(connected, "the connection is kept between messages");
    stop.cancel();
}

#[tokio::test]
async fn message_invalid_in_its_declared_charset_is_rejected_with_err() {
    let h = start(MllpListenerConfig::default()).await;
    let m = b"MSH|^~\\&|A|B|C|D|||ADT^A01|CS1|P|2.5||||||UNICODE UTF-8\rPID|1||X||\xff\xfe\xfd\r";
    let ack = send_plain(h.addr, m).await;
    let s = segs(&ack);
    assert_eq!(read_msa(&ack).unwrap(), (AckCode::AR, b"CS1".to_vec()));
    assert!(s[2].contains("102^Data type error"), "{s:?}");
    let recs = h.records();
    assert_eq!(recs[0].state.state.kind(), StateKind::Rejected);
    assert_eq!(&recs[0].envelope.payload[..], &m[..]);
    // the same bytes declared as 8859/1 are fine
    let ok = b"MSH|^~\\&|A|B|C|D|||ADT^A01|CS2|P|2.5||||||8859/1\rPID|1||X||\xe9\xe8\r";
    assert_eq!(
        read_msa(&send_plain(h.addr, ok).await).unwrap().0,
        AckCode::AA
    );
}

/// The outbound client takes the frame that acknowledges *its* message: a receiver that first
/// sends something else on the connection (an application ACK of an earlier message) does not
/// shift the ACKs onto the wrong messages.
#[tokio::test]
async fn the_sender_matches_the_ack_to_its_message() {
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = server.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf)
            .await
            .unwrap();
        let other = b"MSH|^~\\&|R|R|S|S|20240101||ACK^A01|A1|P|2.5\rMSA|AA|EARLIER\r";
        let ours = b"MSH|^~\\&|R|R|S|S|20240101||ACK^A01|A2|P|2.5\rMSA|AE|M-7\r";
        s.write_all(&frame(other)).await.unwrap();
        s.write_all(&frame(ours)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let mut sender = tributary_mllp::sink::MllpSender::new(sender_cfg(addr));
    let ack = sender.send_once(&adt("M-7")).await.unwrap();
    assert_eq!(read_msa(&ack).unwrap(), (AckCode::AE, b"M-7".to_vec()));
}
