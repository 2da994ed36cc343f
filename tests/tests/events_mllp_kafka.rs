//! The whole flow: the shared HL7 v2 corpus is sent over MLLP to the real binary, mapped,
//! committed, and relayed to a real Kafka-protocol broker (Tansu); a consumer group reads every
//! event the store raised, with CloudEvents headers, in order per topic and patient key.
//! Skips without `tansu` or without the corpus.

mod events_common;

use events_common::{free_addr, repo_root, Server};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tributary_kafka::testing::{headers_of, tansu_or_skip, Tansu};
use tributary_mllp::sink::{MllpSender, MllpSenderConfig};
use tributary_storage::{Db, DbOptions, FjallStore, Store};

fn corpus_files(dir: &Path) -> Vec<PathBuf> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "hl7") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hl7_corpus_over_mllp_reaches_kafka_topics() {
    if !tansu_or_skip("hl7_corpus_over_mllp_reaches_kafka_topics") {
        return;
    }
    let corpus = repo_root().join("../shared/corpus/hl7v2");
    if !corpus.is_dir() {
        eprintln!(
            "SKIP hl7_corpus_over_mllp_reaches_kafka_topics: {} absent",
            corpus.display()
        );
        return;
    }
    let files = corpus_files(&corpus);
    assert!(!files.is_empty());
    let broker = Tansu::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mllp = free_addr();
    let extra = format!(
        "[kafka]\nbrokers = \"{}\"\ntopic_replication = 1\nretry_initial_ms = 200\nretry_max_ms = 2000\n",
        broker.bootstrap()
    );
    let server = Server::start_with_mllp(&data, &extra, Some(mllp));
    for _ in 0..300 {
        if std::net::TcpStream::connect(mllp).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let consumer: StreamConsumer = broker.consumer_config("e2e-mllp").create().unwrap();
    // Every topic the relay may create: subscribe by pattern.
    consumer
        .subscribe(&["^fhir\\.r4\\..*", "^hl7v2\\..*"])
        .unwrap();

    let mut sender = MllpSender::new(MllpSenderConfig::new(mllp.to_string()));
    let mut acked = 0;
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        if tokio::time::timeout(Duration::from_secs(60), sender.send_once(&bytes))
            .await
            .is_ok_and(|r| r.is_ok())
        {
            acked += 1;
        }
    }
    eprintln!(
        "{acked} of {} corpus files acknowledged over MLLP",
        files.len()
    );
    assert!(acked > 0, "no corpus file was acknowledged over MLLP");

    // Consume until nothing new arrives for 20 s (mapping and relaying run behind the ACKs) and
    // the relay has nothing left to deliver: a broker that holds one produce request past its
    // timeout makes the relay resend it later, which is delivery, not loss. Bounded at 5 minutes.
    let mut got: Vec<(String, String, HashMap<String, String>)> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    let lag = loop {
        let Ok(m) = tokio::time::timeout(Duration::from_secs(20), consumer.recv()).await else {
            let lag = kafka_lag(&server);
            if lag == Some(0) || tokio::time::Instant::now() > deadline {
                break lag;
            }
            continue;
        };
        let Ok(m) = m else { continue };
        let headers = headers_of(&m);
        got.push((
            m.topic().to_string(),
            String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
            headers,
        ));
    };
    // What the relay logged (ids, kinds and reasons only), to explain a failure below.
    let relay_log: Vec<String> = std::fs::read_to_string(&server.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("kafka") && !l.contains("\"level\":\"INFO\""))
        .take(20)
        .map(String::from)
        .collect();
    server.stop();

    // Every event the store raised (read now that the binary is stopped) was consumed.
    let store = FjallStore::new(Db::open(&data, DbOptions::default()).unwrap());
    let events = store.outbox().read_after(0, 10_000_000).unwrap();
    assert!(
        !events.is_empty(),
        "the corpus produced no events (mapping pipeline not running?)"
    );
    let seq_of: HashMap<&str, u64> = events
        .iter()
        .map(|e| (e.event_id.as_str(), e.seq))
        .collect();
    let seen: HashSet<&str> = got.iter().map(|g| g.2["ce_id"].as_str()).collect();
    let missing: Vec<_> = events
        .iter()
        .filter(|e| !seen.contains(e.event_id.as_str()))
        .map(|e| e.event_type.clone())
        .collect();
    assert!(
        missing.is_empty(),
        "{} events never reached Kafka: {:?}; relay lag at the end {lag:?}; relay warnings: {relay_log:#?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let mut first = HashSet::new();
    let mut per_key: BTreeMap<(&str, &str), Vec<u64>> = BTreeMap::new();
    let mut topics: BTreeMap<&str, usize> = BTreeMap::new();
    for (topic, key, h) in &got {
        for k in [
            "ce_specversion",
            "ce_id",
            "ce_type",
            "ce_source",
            "ce_tenant",
            "content-type",
        ] {
            assert!(h.contains_key(k), "{topic}: header {k} missing");
        }
        assert_eq!(h["ce_tenant"], "t1");
        if first.insert(h["ce_id"].as_str()) {
            *topics.entry(topic).or_default() += 1;
            per_key
                .entry((topic, key))
                .or_default()
                .push(seq_of[h["ce_id"].as_str()]);
        }
    }
    // Message events: `hl7v2.<code lower case>.<trigger as HL7 writes it>` (`hl7v2.adt.A01`).
    assert!(
        topics.keys().any(|t| t.starts_with("hl7v2.")),
        "no message event topic: {:?}",
        topics.keys().collect::<Vec<_>>()
    );
    for topic in topics.keys().filter(|t| t.starts_with("hl7v2.")) {
        let parts: Vec<&str> = topic.split('.').collect();
        assert!(
            parts.len() == 3
                && parts[1].chars().all(|c| !c.is_ascii_uppercase())
                && parts[2].chars().any(|c| c.is_ascii_uppercase()),
            "message event topic {topic} is not named like hl7v2.adt.A01"
        );
    }
    for (k, seqs) in &per_key {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{k:?} out of order: {seqs:?}"
        );
    }
    eprintln!(
        "{} events ({} records) from {} messages on {} topics: {topics:?}",
        events.len(),
        got.len(),
        acked,
        topics.len()
    );
}

/// Outbox events the Kafka relay has not had acknowledged yet, from the server's `/metrics`.
fn kafka_lag(server: &Server) -> Option<u64> {
    let text = tributary_e2e::http_get(&server.http.to_string(), "/metrics").ok()?;
    text.lines()
        .find(|l| l.starts_with("tributary_outbox_lag_events{relay=\"kafka\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}
