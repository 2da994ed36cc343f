//! Conformance over real messages: every `.hl7` file of the shared corpus is sent to the real
//! `tributary serve` over MLLP (plain, and TLS with a client certificate); each ACK's MSA-1 and
//! MSA-2 are checked, and every message must be in the journal byte-for-byte. The logs of the
//! plain run are then searched for patient names and identifiers taken from the inputs.

mod mllp_common;

use mllp_common::*;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tributary_core::StateKind;
use tributary_mllp::ack::{read_all_msa, AckCode};
use tributary_mllp::header::{is_batch, segments, split_batch, Header};
use tributary_mllp::sink::{MllpSender, MllpSenderConfig};

/// Corpus files that are rejected on purpose, with the reason. Keep this list short and
/// explained.
const EXPECTED_REJECTIONS: &[(&str, &str)] = &[(
    "reportstream/messages/test-0001-input-covid-19.hl7",
    "BTS-1 declares 25 messages, the batch holds 20: a batch whose count disagrees is refused whole",
)];

struct Sent {
    file: PathBuf,
    bytes: Vec<u8>,
    ack: Vec<u8>,
}

async fn send_all(files: &[PathBuf], cfg: MllpSenderConfig, connections: usize) -> Vec<Sent> {
    let files = Arc::new(files.to_vec());
    let mut tasks = Vec::new();
    for c in 0..connections {
        let files = files.clone();
        let cfg = cfg.clone();
        tasks.push(tokio::spawn(async move {
            let mut sender = MllpSender::new(cfg);
            let mut out = Vec::new();
            for f in files.iter().skip(c).step_by(connections) {
                let bytes = std::fs::read(f).unwrap();
                let ack = tokio::time::timeout(Duration::from_secs(60), sender.send_once(&bytes))
                    .await
                    .unwrap_or_else(|_| panic!("no ACK for {} within 60 s", f.display()))
                    .unwrap_or_else(|e| panic!("sending {}: {e}", f.display()));
                out.push(Sent {
                    file: f.clone(),
                    bytes,
                    ack,
                });
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// The messages in a file as the listener journals them: the whole frame for one message, each
/// MSH…next-MSH slice for a batch or multi-message stream.
fn messages_of(bytes: &[u8]) -> Vec<Vec<u8>> {
    match split_batch(bytes) {
        Ok(b) if is_batch(bytes) => b.messages.into_iter().map(|r| bytes[r].to_vec()).collect(),
        _ => vec![bytes.to_vec()],
    }
}

fn after_msh(m: &[u8]) -> &[u8] {
    match Header::read(m) {
        Ok(h) => &m[h.msh.end..],
        Err(_) => m,
    }
}

fn name(corpus: &Path, f: &Path) -> String {
    f.strip_prefix(corpus).unwrap_or(f).display().to_string()
}

/// Checks MSA-1/MSA-2 of every ACK and the journal; returns how many messages were checked.
fn check(corpus: &Path, sent: &[Sent], data_dir: &Path, partner: &str) -> usize {
    let records = journal_records(data_dir);
    let received: Vec<&[u8]> = records
        .iter()
        .filter(|r| r.state.state.kind() == StateKind::Received)
        .map(|r| &r.envelope.payload[..])
        .collect();
    let stored: HashSet<&[u8]> = received.iter().copied().collect();
    let stored_bodies: HashSet<&[u8]> = received.iter().map(|p| after_msh(p)).collect();
    assert!(records
        .iter()
        .filter(|r| r.state.state.kind() == StateKind::Received)
        .all(|r| r.envelope.partner.as_str() == partner));
    let mut checked = 0;
    let mut failures = Vec::new();
    for s in sent {
        let n = name(corpus, &s.file);
        let msgs = messages_of(&s.bytes);
        let msas = read_all_msa(&s.ack);
        if let Some((_, why)) = EXPECTED_REJECTIONS.iter().find(|(f, _)| *f == n) {
            assert!(
                msas.iter().any(|(c, _)| !c.is_positive()),
                "{n} expected to be rejected ({why})"
            );
            continue;
        }
        if msas.len() != msgs.len() {
            failures.push(format!(
                "{n}: {} messages but {} MSA",
                msgs.len(),
                msas.len()
            ));
            continue;
        }
        for (m, (code, msa2)) in msgs.iter().zip(&msas) {
            let h = Header::read(m).expect("corpus message has an MSH");
            let expected = if h.enhanced_mode() {
                AckCode::CA
            } else {
                AckCode::AA
            };
            if *code != expected {
                let text = String::from_utf8_lossy(&s.ack).replace('\r', "\n");
                failures.push(format!(
                    "{n}: MSA-1 {code:?}, expected {expected:?}\n{text}"
                ));
                continue;
            }
            if msa2.as_slice() != h.control_id() {
                failures.push(format!("{n}: MSA-2 does not echo MSH-10"));
                continue;
            }
            // byte-for-byte; a message whose control id and body equal an earlier file's is a
            // duplicate by design (acknowledged, stored once)
            if !stored.contains(m.as_slice()) && !stored_bodies.contains(after_msh(m)) {
                failures.push(format!("{n}: not in the journal byte-for-byte"));
                continue;
            }
            checked += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    checked
}

/// Patient names (PID-5 family/given) and identifiers (PID-3 ids) from the inputs, long enough
/// not to collide with ordinary log words.
fn phi_tokens(files: &[PathBuf]) -> HashSet<String> {
    let mut out = HashSet::new();
    for f in files {
        let bytes = std::fs::read(f).unwrap();
        for m in messages_of(&bytes) {
            let Ok(h) = Header::read(&m) else { continue };
            let d = h.delims;
            for r in segments(&m) {
                let seg = &m[r];
                if !seg.starts_with(b"PID") {
                    continue;
                }
                let fields: Vec<&[u8]> = seg.split(|b| *b == d.field).collect();
                let mut add = |v: &[u8], min: usize| {
                    let s = String::from_utf8_lossy(v).trim().to_string();
                    if s.len() >= min && s.chars().all(|c| c.is_alphanumeric()) {
                        out.insert(s);
                    }
                };
                if let Some(pid3) = fields.get(3) {
                    for rep in pid3.split(|b| *b == d.repetition) {
                        if let Some(id) = rep.split(|b| *b == d.component).next() {
                            add(id, 6);
                        }
                    }
                }
                if let Some(pid5) = fields.get(5) {
                    for rep in pid5.split(|b| *b == d.repetition) {
                        for c in rep.split(|b| *b == d.component).take(2) {
                            add(c.split(|b| *b == d.subcomponent).next().unwrap_or(&[]), 4);
                        }
                    }
                }
            }
        }
    }
    out
}

fn assert_no_phi_in_log(log: &Path, tokens: &HashSet<String>) {
    let text = std::fs::read_to_string(log).unwrap();
    assert!(text.contains("mllp listening"), "log was captured");
    let words: HashSet<&str> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let mut leaked: Vec<&String> = tokens
        .iter()
        .filter(|t| words.contains(t.as_str()))
        .collect();
    leaked.sort();
    assert!(
        leaked.is_empty(),
        "patient names/identifiers found in the logs: {leaked:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corpus_over_plain_mllp_is_acknowledged_and_journaled_and_logs_carry_no_phi() {
    let Some(corpus) = corpus_dir() else {
        eprintln!("SKIP: ../shared/corpus/hl7v2 not found beside the repository");
        return;
    };
    let files = corpus_files(&corpus);
    assert!(!files.is_empty());
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let log = tmp.path().join("tributary.log");
    let server = Server::start(&data, &log, "", &[]);
    let sent = send_all(&files, MllpSenderConfig::new(server.mllp.to_string()), 4).await;
    server.stop();
    let n = check(&corpus, &sent, &data, "anonymous");
    eprintln!(
        "{} files, {n} messages acknowledged AA and journaled byte-for-byte",
        files.len()
    );
    let tokens = phi_tokens(&files);
    assert!(
        tokens.len() > 50,
        "PHI token extraction found too little: {}",
        tokens.len()
    );
    assert_no_phi_in_log(&log, &tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corpus_over_mtls_identifies_the_partner_by_certificate() {
    let Some(corpus) = corpus_dir() else {
        eprintln!("SKIP: ../shared/corpus/hl7v2 not found beside the repository");
        return;
    };
    let files = corpus_files(&corpus);
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path();
    write_lab_certs(certs);
    let rogue = Pki::new("Rogue CA");
    rogue.write(
        certs,
        "rogue",
        "lab.partner.example",
        &["lab.partner.example"],
        true,
    );
    let tls_addr = free_addr();
    let extra = mtls_listener(tls_addr, certs);
    let data = tmp.path().join("data");
    let log = tmp.path().join("tributary.log");
    let server = Server::start(&data, &log, &extra, &[tls_addr]);

    let client = |cert: Option<(&str, &str)>| {
        let cfg = tributary_mllp::tls::client_config(
            Some(&certs.join("ca.crt")),
            cert.map(|(c, k)| (certs.join(c), certs.join(k)))
                .as_ref()
                .map(|(c, k)| (c.as_path(), k.as_path())),
        )
        .unwrap();
        let mut s = MllpSenderConfig::new(tls_addr.to_string());
        s.tls = Some((Arc::new(cfg), "localhost".into()));
        s.max_attempts = 1;
        s
    };
    // no client certificate, or one from another CA: no message gets through
    for cert in [None, Some(("rogue.crt", "rogue.key"))] {
        let mut s = MllpSender::new(client(cert));
        let r = s.send_once(&std::fs::read(&files[0]).unwrap()).await;
        assert!(
            r.is_err(),
            "a client without a trusted certificate must be refused"
        );
    }
    let sent = send_all(&files, client(Some(("lab.crt", "lab.key"))), 4).await;
    server.stop();
    let n = check(&corpus, &sent, &data, "general-lab");
    eprintln!(
        "{} files, {n} messages over mTLS acknowledged AA and journaled",
        files.len()
    );
}
