//! Routing HL7 v2 → v2 through two real `tributary serve` processes: the upstream's
//! `[[mllp.routes]]` forwards the journaled ADT messages (not the ORU: filtered) to the
//! downstream's MLLP listener byte for byte and in order; a downstream `AE` is recorded on the
//! message; a downstream outage delays delivery but loses nothing.

mod mllp_common;

use mllp_common::*;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tributary_e2e::{log_count, wait};
use tributary_storage::{Db, DbOptions, FjallJournal, Journal, ListFilter};

fn original_mode(fixture: &str, control_id: &str, old_id: &str, bad_birth_date: bool) -> Vec<u8> {
    let m =
        std::fs::read_to_string(repo_root().join("mappings/hl7v2/messages").join(fixture)).unwrap();
    let mut m = m
        .replace(&format!("|{old_id}|"), &format!("|{control_id}|"))
        .replace("|AL|NE|", "|||");
    if bad_birth_date {
        m = m.replace("|19800214|", "|1980XX14|");
    }
    assert!(m.contains(control_id));
    m.into_bytes()
}

fn adt(id: &str, bad: bool) -> Vec<u8> {
    original_mode("ADT_A01.hl7", id, "SYN-ADT-A01-0001", bad)
}

fn wait_for(log: &Path, needle: &str, n: usize) {
    wait(format!("{needle:?} {n} times in {}", log.display()))
        .until(|| (log_count(log, needle) >= n).then_some(()));
}

fn downstream(data: &Path, log: &Path, addr: SocketAddr, maps: &Path) -> Server {
    // a listener that answers after mapping, so a message that fails mapping gets AE
    let extra = format!(
        "[mapping]\ndir = {:?}\n[[mllp.listeners]]\nname = \"from-upstream\"\nlisten = \"{addr}\"\nack_after = \"mapped\"\n",
        maps.display().to_string()
    );
    Server::start(data, log, &extra, &[addr])
}

fn send_ok(addr: &str, msg: &[u8]) {
    let mut c = Client::connect(addr);
    c.send(msg);
    let ack = c.recv(Duration::from_secs(30)).expect("ACK");
    assert_eq!(field(&ack, "MSA", 1), "AA", "{ack}");
}

#[test]
fn route_forwards_in_order_byte_identical_and_survives_a_downstream_outage() {
    let tmp = tempfile::tempdir().unwrap();
    let maps = mappings_failing_on_invalid_values(tmp.path());
    let down_addr = free_addr();
    let down_data = tmp.path().join("down");
    let down_log = tmp.path().join("down.log");
    let down = downstream(&down_data, &down_log, down_addr, &maps);

    let up_data = tmp.path().join("up");
    let up_log = tmp.path().join("up.log");
    let extra = format!(
        "[[mllp.routes]]\nname = \"to-down\"\ndestination = \"{down_addr}\"\nmessage_types = [\"ADT\"]\nbackoff_initial_ms = 100\nbackoff_max_secs = 1\n"
    );
    let up = Server::start(&up_data, &up_log, &extra, &[]);
    let up_addr = up.mllp.to_string();

    let mut sent = Vec::new();
    for (id, msg) in [
        ("R-1", adt("R-1", false)),
        (
            "R-2",
            original_mode("ORU_R01.hl7", "R-2", "SYN-ORU-0001", false),
        ),
        ("R-3", adt("R-3", true)),
        ("R-4", adt("R-4", false)),
    ] {
        send_ok(&up_addr, &msg);
        sent.push((id, msg));
    }
    wait_for(&up_log, "\"forwarded\"", 2);
    wait_for(&up_log, "downstream refused the message", 1);

    // outage: the downstream stops; the upstream keeps accepting and the route keeps trying
    down.stop();
    for id in ["R-5", "R-6"] {
        let msg = adt(id, false);
        send_ok(&up_addr, &msg);
        sent.push((id, msg));
    }
    wait_for(&up_log, "forwarding failed; retrying", 1);
    // `/ready` says the route cannot deliver (messages wait in the journal), and stays 200:
    // the upstream keeps sending to an instance that stores what it is sent …
    let ready = wait("/ready to say the route is degraded").until(|| {
        let ready = tributary_e2e::http_get(&up.http.to_string(), "/ready").ok()?;
        ready.contains("not answering").then_some(ready)
    });
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(
        ready.contains("\"mllp.route.to-down\":{\"reason\":") && ready.contains("\"degraded\""),
        "{ready}"
    );
    let down = downstream(&down_data, &down_log, down_addr, &maps);
    wait_for(&up_log, "\"forwarded\"", 4);
    // … and is ready again once it delivers.
    let ready = tributary_e2e::http_get(&up.http.to_string(), "/ready").unwrap();
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(
        ready.contains("\"mllp.route.to-down\":{\"status\":\"ready\"}"),
        "{ready}"
    );
    // (each "forwarded" is logged after the delivery note is recorded: nothing left to wait for)
    up.stop();
    down.stop();

    // downstream: every ADT, in order, byte for byte; the ORU was filtered out
    let records = journal_records(&down_data);
    let got: Vec<(String, Vec<u8>)> = records
        .iter()
        .map(|r| {
            (
                r.envelope.meta["control_id"].clone(),
                r.envelope.payload.to_vec(),
            )
        })
        .collect();
    let expected: Vec<(String, Vec<u8>)> = sent
        .iter()
        .filter(|(id, _)| *id != "R-2")
        .map(|(id, m)| (id.to_string(), m.clone()))
        .collect();
    assert_eq!(
        got.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>(),
        ["R-1", "R-3", "R-4", "R-5", "R-6"]
    );
    assert!(
        got == expected,
        "payloads differ from what was sent upstream"
    );

    // upstream: the refusal is recorded on the message with the downstream's reason
    let db = Db::open(&up_data, DbOptions::default()).unwrap();
    let j = FjallJournal::new(db, 0);
    let mut notes = std::collections::BTreeMap::new();
    for (id, _, _) in j.list(&ListFilter::default()).unwrap() {
        let rec = j.get(id).unwrap().unwrap();
        let n = j.notes(id).unwrap().get("route.to-down").cloned();
        notes.insert(rec.envelope.meta["control_id"].clone(), n);
    }
    assert_eq!(notes["R-2"], None, "filtered");
    for id in ["R-1", "R-4", "R-5", "R-6"] {
        let n = notes[id].clone().unwrap();
        assert!(
            n.starts_with(&format!("sent to {down_addr}; it answered AA")),
            "{n}"
        );
    }
    let refused = notes["R-3"].clone().unwrap();
    assert!(
        refused.starts_with(&format!(
            "failed: {down_addr} answered AE (error code 207): mapping failed"
        )),
        "{refused}"
    );
    assert!(refused.contains("PID-7"), "{refused}");
    let log = std::fs::read_to_string(&up_log).unwrap();
    assert!(!log.contains("Testpatient") && !log.contains("MRN70001"));
}

#[test]
fn route_over_mtls_reaches_a_tls_listener_as_the_certified_partner() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write_lab_certs(d);
    let tls_addr = free_addr();
    let down_extra = mtls_listener(tls_addr, d);
    let down_data = d.join("down");
    let down = Server::start(&down_data, &d.join("down.log"), &down_extra, &[tls_addr]);
    let up_extra = format!(
        r#"
[[mllp.routes]]
name = "tls-out"
destination = "{tls_addr}"
[mllp.routes.tls]
ca = "{d}/ca.crt"
server_name = "localhost"
client_cert = "{d}/lab.crt"
client_key = "{d}/lab.key"
"#,
        d = d.display()
    );
    let up_log = d.join("up.log");
    let up = Server::start(&d.join("up"), &up_log, &up_extra, &[]);
    let msgs = [adt("T-1", false), adt("T-2", false)];
    for m in &msgs {
        send_ok(&up.mllp.to_string(), m);
    }
    wait_for(&up_log, "\"forwarded\"", 2);
    up.stop();
    down.stop();
    let records = journal_records(&down_data);
    assert_eq!(records.len(), 2);
    for (r, m) in records.iter().zip(&msgs) {
        assert_eq!(r.envelope.partner.as_str(), "general-lab");
        assert_eq!(&r.envelope.payload[..], &m[..]);
    }
}
