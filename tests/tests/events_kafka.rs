//! The real binary relays the outbox to a real Kafka-protocol broker (Tansu) and is killed (-9)
//! mid-stream; after a restart every event arrives — exactly once per stable event id, or again
//! only with the same id — in order per topic and patient key. Skips without `tansu`.
//!
//! The events are committed through `Store::commit` into the data directory while the binary is
//! not running (before the first start and between the kill and the restart), so the kill lands
//! mid-relay at a known outbox size; HL7 input through MLLP to Kafka is `events_mllp_kafka.rs`.

mod events_common;

use events_common::Server;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use serde_json::json;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;
use tributary_e2e::{metric, wait};
use tributary_kafka::testing::{tansu_or_skip, Tansu};
use tributary_storage::{Db, DbOptions, FjallStore, ResourceWrite, Store, StoreTransaction};

/// Commits `batches` transactions of 10 Observations each (patients p0..p19), starting at `from`.
async fn commit(data: &Path, from: u64, batches: u64) {
    let db = Db::open(data, DbOptions::default()).unwrap();
    let store = FjallStore::new(db);
    for b in from..from + batches {
        let writes = (0..10)
            .map(|i| {
                let n = b * 10 + i;
                ResourceWrite::upsert(
                    "Observation",
                    &format!("o{n}"),
                    json!({"status": "final", "valueQuantity": {"value": n},
                           "subject": {"reference": format!("Patient/p{}", n % 20)}}),
                )
            })
            .collect();
        store
            .commit(StoreTransaction {
                tenant: "t1".into(),
                writes,
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

/// (event id → outbox seq), the outbox head and the relay's cursor, read with the binary stopped.
fn outbox_state(data: &Path) -> (HashMap<String, u64>, u64, u64) {
    let db = Db::open(data, DbOptions::default()).unwrap();
    let store = FjallStore::new(db);
    let events = store.outbox().read_after(0, 10_000_000).unwrap();
    let ids = events.iter().map(|e| (e.event_id.clone(), e.seq)).collect();
    (
        ids,
        store.outbox().head(),
        store.outbox().cursor("kafka").unwrap(),
    )
}

struct Got {
    topic: String,
    key: String,
    id: String,
}

/// Consumes until `unique` distinct event ids were seen (or a minute passes with nothing).
async fn consume(
    c: &StreamConsumer,
    got: &mut Vec<Got>,
    seen: &mut HashSet<String>,
    unique: usize,
) {
    while seen.len() < unique {
        let Ok(m) = tokio::time::timeout(Duration::from_secs(60), c.recv()).await else {
            return;
        };
        let Ok(m) = m else { continue };
        let id = m
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "ce_id"))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .expect("every record has ce_id");
        seen.insert(id.clone());
        got.push(Got {
            topic: m.topic().into(),
            key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
            id,
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_relay_survives_kill_9_mid_stream() {
    if !tansu_or_skip("kafka_relay_survives_kill_9_mid_stream") {
        return;
    }
    let broker = Tansu::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    commit(&data, 0, 2_000).await; // 20,000 events

    // A small in-flight window paces the relay (~64 records per broker round trip), so the kill
    // lands mid-stream on a fast machine too: at the default 10,000 it sent all 20,000 events
    // within 300 ms.
    let extra = format!(
        "[kafka]\nbrokers = \"{}\"\ntopic_replication = 1\nretry_initial_ms = 200\nretry_max_ms = 2000\nmax_in_flight = 64\n",
        broker.bootstrap()
    );

    let consumer: StreamConsumer = broker.consumer_config("e2e-kill9").create().unwrap();
    consumer.subscribe(&["fhir.r4.Observation"]).unwrap();
    let mut got = Vec::new();
    let mut seen_ids = HashSet::new();

    let server = Server::start(&data, &extra);
    // Kill it as soon as the relay has delivered some of the events (its cursor moved).
    let http = server.http.to_string();
    wait("the relay to deliver its first events")
        .until_async(|| async {
            let lag = metric(&http, "tributary_outbox_lag_events{relay=\"kafka\"}")?;
            (lag < 20_000.0).then_some(())
        })
        .await;
    server.kill9();
    let (_, head, cursor) = outbox_state(&data);
    eprintln!(
        "killed at cursor {cursor} of {head} ({} records consumed so far)",
        got.len()
    );
    assert!(
        cursor < head,
        "the relay had finished before the kill; the test proves nothing"
    );

    // More changes arrive while it is down.
    commit(&data, 2_000, 200).await;
    let (ids, head, _) = outbox_state(&data);
    assert_eq!(head, 22_000);

    let server = Server::start(&data, &extra);
    let want: HashSet<String> = ids.keys().cloned().collect();
    consume(&consumer, &mut got, &mut seen_ids, want.len()).await;
    server.stop();

    let seen: HashSet<&str> = got.iter().map(|r| r.id.as_str()).collect();
    let missing = want.iter().filter(|id| !seen.contains(id.as_str())).count();
    assert_eq!(missing, 0, "{missing} events lost");
    let mut first: HashSet<&str> = HashSet::new();
    let mut per_key: BTreeMap<(&str, &str), Vec<u64>> = BTreeMap::new();
    let mut dups = 0;
    for r in &got {
        let seq = ids[&r.id];
        if first.insert(&r.id) {
            per_key.entry((&r.topic, &r.key)).or_default().push(seq);
        } else {
            dups += 1;
        }
    }
    for (k, seqs) in per_key {
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{k:?} out of order");
    }
    eprintln!(
        "{} events, {} records consumed, {dups} redeliveries with the same id after kill -9",
        want.len(),
        got.len()
    );
}
