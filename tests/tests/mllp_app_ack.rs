//! Enhanced-mode application ACKs through the real `tributary serve` over real sockets: MSH-16
//! `AL` gets `CA` then `AA` on the same connection; a message that fails mapping with MSH-16
//! `ER` gets `AE` with an ERR segment naming the field; `NE` gets none; a duplicate does not get
//! a second `AA`; a closed connection sends the ACK to the partner's return endpoint, or records
//! it as undelivered on the message.

mod mllp_common;

use mllp_common::*;
use std::net::TcpListener;
use std::time::Duration;
use tributary_storage::{Db, DbOptions, FjallJournal, Journal, ListFilter};

/// The ADT^A01 fixture with MSH-10, MSH-15/16 and (optionally) a malformed PID-7.
fn adt(control_id: &str, msh15: &str, msh16: &str, bad_birth_date: bool) -> Vec<u8> {
    let m =
        std::fs::read_to_string(repo_root().join("mappings/hl7v2/messages/ADT_A01.hl7")).unwrap();
    let mut m = m
        .replace("|SYN-ADT-A01-0001|", &format!("|{control_id}|"))
        .replace("|AL|NE||", &format!("|{msh15}|{msh16}||"));
    if bad_birth_date {
        m = m.replace("|19800214|", "|1980XX14|");
    }
    assert!(m.contains(control_id));
    m.into_bytes()
}

/// A partner's MLLP listener standing in for the return endpoint: answers `CA` and hands over
/// what it received.
fn return_endpoint() -> (String, std::sync::mpsc::Receiver<String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let mut c = Client { s, buf: Vec::new() };
            while let Some(m) = c.recv(Duration::from_secs(60)) {
                let id = field(&m, "MSH", 9);
                let ack = format!(
                    "MSH|^~\\&|PARTNER|P|TRIB|T|20260101||ACK|R{id}|P|2.5.1\rMSA|CA|{id}\r"
                );
                c.send(ack.as_bytes());
                if tx.send(m).is_err() {
                    return;
                }
            }
        }
    });
    (addr, rx)
}

#[test]
fn application_acks_follow_msh16_and_are_never_silently_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let maps = mappings_failing_on_invalid_values(tmp.path());
    let (ret_addr, returned) = return_endpoint();
    let lab = free_addr();
    let extra = format!(
        "[mapping]\ndir = {:?}\n\n[[mllp.listeners]]\nname = \"lab\"\nlisten = \"{lab}\"\nallow_unknown_partners = false\n[[mllp.listeners.partners]]\nid = \"lab\"\nsource_cidrs = [\"127.0.0.1/32\"]\napp_ack_return = \"{ret_addr}\"\n",
        maps.display().to_string()
    );
    let data = tmp.path().join("data");
    let log = tmp.path().join("serve.log");
    let server = Server::start(&data, &log, &extra, &[lab]);
    let wait = Duration::from_secs(30);
    let mut c = Client::connect(&server.mllp.to_string());

    // MSH-15 = AL, MSH-16 = AL: CA, then an application AA with a fresh MSH-10
    c.send(&adt("APP-1", "AL", "AL", false));
    let commit = c.recv(wait).expect("commit ACK");
    assert_eq!(field(&commit, "MSA", 1), "CA", "{commit}");
    assert_eq!(field(&commit, "MSA", 2), "APP-1");
    let app = c
        .recv(wait)
        .expect("application ACK on the same connection");
    assert_eq!(field(&app, "MSA", 1), "AA", "{app}");
    assert_eq!(field(&app, "MSA", 2), "APP-1");
    assert!(field(&app, "MSH", 8).starts_with("ACK"), "{app}");
    let (c1, c2) = (field(&commit, "MSH", 9), field(&app, "MSH", 9));
    assert!(
        !c2.is_empty() && c2 != c1 && c2 != "APP-1",
        "fresh MSH-10: {c1} {c2}"
    );
    assert_eq!(
        field(&app, "MSH", 14),
        "NE",
        "the sender is asked for no ACK back"
    );
    assert!(segment(&app, "ERR").is_none());

    // MSH-16 = ER and mapping fails: CA, then AE with an ERR naming PID-7
    c.send(&adt("APP-2", "AL", "ER", true));
    let commit = c.recv(wait).expect("commit ACK");
    assert_eq!(field(&commit, "MSA", 1), "CA", "{commit}");
    let app = c.recv(wait).expect("application AE");
    assert_eq!(field(&app, "MSA", 1), "AE", "{app}");
    assert_eq!(field(&app, "MSA", 2), "APP-2");
    let err = segment(&app, "ERR").expect("ERR segment");
    assert!(err.contains("PID^1^7"), "{err}");
    assert!(err.contains("birthDate"), "{err}");
    assert!(
        !app.contains("1980XX14"),
        "no message content in the ACK: {app}"
    );

    // MSH-16 = ER and mapping succeeds: no application ACK. MSH-16 = NE: none either.
    c.send(&adt("APP-3", "AL", "ER", false));
    c.send(&adt("APP-4", "AL", "NE", false));
    // a duplicate of APP-1 (processed, AA sent): its commit ACK again, no second AA
    c.send(&adt("APP-1", "AL", "AL", false));
    let msa = |f: &str| format!("{}:{}", field(f, "MSA", 1), field(f, "MSA", 2));
    let mut got: Vec<String> = (0..3)
        .filter_map(|_| c.recv(wait))
        .map(|f| msa(&f))
        .collect();
    // APP-1 to APP-4 mapped (committed or failed): an application ACK they wrongly got would
    // be on its way before SU's below.
    let http = server.http.to_string();
    tributary_e2e::wait("the pipeline to finish APP-1 to APP-4")
        .until(|| (tributary_e2e::pipeline_finished(&http) >= 4.0).then_some(()));
    c.send(&adt("APP-5", "AL", "SU", false));
    while let Some(f) = c.recv(Duration::from_secs(5)) {
        got.push(msa(&f));
    }
    assert_eq!(
        got,
        ["CA:APP-3", "CA:APP-4", "CA:APP-1", "CA:APP-5", "AA:APP-5"],
        "only the commit ACKs, then SU's AA"
    );
    drop(c);

    // the connection closes before processing: the lab partner's ACK goes to its return
    // endpoint; the anonymous sender has none, so its ACK is recorded as undelivered
    let mut l = Client::connect(&lab.to_string());
    l.send(&adt("RET-1", "AL", "AL", false));
    let _ = l.s.shutdown(std::net::Shutdown::Write);
    drop(l);
    let m = returned
        .recv_timeout(wait)
        .expect("application ACK at the return endpoint");
    assert_eq!(field(&m, "MSA", 1), "AA", "{m}");
    assert_eq!(field(&m, "MSA", 2), "RET-1");
    assert_eq!(
        field(&m, "MSH", 14),
        "AL",
        "the return endpoint confirms with a commit ACK"
    );
    let mut a = Client::connect(&server.mllp.to_string());
    a.send(&adt("LOST-1", "AL", "AL", false));
    let _ = a.s.shutdown(std::net::Shutdown::Write);
    drop(a);
    // logged as it is recorded; the graceful stop lets the recording (note, audit) finish
    tributary_e2e::wait("LOST-1's application ACK to be recorded as undelivered").until(|| {
        (tributary_e2e::log_count(&log, "undelivered AA: the connection closed") > 0).then_some(())
    });
    server.stop();

    let db = Db::open(&data, DbOptions::default()).unwrap();
    let j = FjallJournal::new(db, 0);
    let mut notes = std::collections::BTreeMap::new();
    for (id, _, _) in j.list(&ListFilter::default()).unwrap() {
        let rec = j.get(id).unwrap().unwrap();
        let cid = rec
            .envelope
            .meta
            .get("control_id")
            .cloned()
            .unwrap_or_default();
        if let Some(n) = j.notes(id).unwrap().get("app_ack") {
            notes.insert(cid, n.clone());
        }
    }
    assert!(
        notes["APP-1"].starts_with("sent AA on the message's connection"),
        "{notes:?}"
    );
    assert!(notes["APP-2"].starts_with("sent AE"), "{notes:?}");
    assert!(
        notes["RET-1"].starts_with("sent AA to return endpoint"),
        "{notes:?}"
    );
    assert!(
        notes["LOST-1"].starts_with("undelivered AA: the connection closed"),
        "{notes:?}"
    );
    assert!(
        !notes.contains_key("APP-3") && !notes.contains_key("APP-4"),
        "{notes:?}"
    );
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("app_ack_undelivered"));
    assert!(
        !log.contains("Testpatient") && !log.contains("MRN70001"),
        "no PHI in logs"
    );
}
