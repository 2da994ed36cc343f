//! Events/s from the outbox to Kafka through the relay, against a bare rdkafka producer sending
//! the same records (same topics' shape, keys, headers, values, producer settings) to the same
//! broker in the same run. Needs `tansu`; prints a Markdown table.
//!
//! `cargo bench -p tributary-kafka --bench relay_throughput` (EVENTS=50000 ROUNDS=5 by default).

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::json;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tributary_kafka::testing::{find_tansu, Tansu};
use tributary_kafka::{record, KafkaConfig, KafkaRelay};
use tributary_runtime::Readiness;
use tributary_storage::{Db, DbOptions, FjallStore, ResourceWrite, Store, StoreTransaction};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

async fn fill(store: &FjallStore, events: u64) {
    let per_tx = 100;
    for b in 0..events / per_tx {
        let writes = (0..per_tx)
            .map(|i| {
                let n = b * per_tx + i;
                ResourceWrite::upsert(
                    "Observation",
                    &format!("o{n}"),
                    json!({
                        "status": "final",
                        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
                        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
                        "subject": {"reference": format!("Patient/p{}", n % 500)},
                        "effectiveDateTime": "2026-11-23T10:00:00Z",
                        "valueQuantity": {"value": 60 + n % 40, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}
                    }),
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

fn config(bootstrap: &str, prefix: &str) -> KafkaConfig {
    KafkaConfig {
        brokers: bootstrap.into(),
        topic_prefix: prefix.into(),
        topic_replication: 1,
        cursor_name: format!("bench-{prefix}"),
        ..Default::default()
    }
}

async fn create_topic(bootstrap: &str, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let t = NewTopic::new(topic, 3, TopicReplication::Fixed(1));
    let _ = admin.create_topics([&t], &AdminOptions::new()).await;
}

/// The baseline: the same records, built beforehand, sent by one FutureProducer with the same
/// properties; time from the first send to the last acknowledgement.
async fn bare(store: &FjallStore, cfg: &KafkaConfig) -> Duration {
    let events = store.outbox().read_after(0, usize::MAX).unwrap();
    let records: Vec<_> = events
        .iter()
        .filter_map(|e| record::build(cfg, e))
        .collect();
    let mut cc = ClientConfig::new();
    for (k, v) in cfg.producer_properties() {
        cc.set(k, v);
    }
    let producer: FutureProducer = cc.create().unwrap();
    let started = Instant::now();
    let mut pending = std::collections::VecDeque::new();
    for r in &records {
        let mut h = OwnedHeaders::new_with_capacity(r.headers.len());
        for (k, v) in &r.headers {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let fr = FutureRecord::to(&r.topic)
            .key(r.key.as_bytes())
            .payload(&r.value)
            .headers(h);
        pending.push_back(producer.send_result(fr).map_err(|(e, _)| e).unwrap());
        if pending.len() >= cfg.max_in_flight {
            pending.pop_front().unwrap().await.unwrap().unwrap();
        }
    }
    for p in pending {
        p.await.unwrap().unwrap();
    }
    started.elapsed()
}

/// The relay from cursor 0 until its durable cursor reaches the head.
async fn relay(store: &FjallStore, cfg: &KafkaConfig) -> Duration {
    let shutdown = CancellationToken::new();
    let head = store.outbox().head();
    let r = KafkaRelay::new(
        cfg.clone(),
        store.outbox().clone(),
        Readiness::default(),
        shutdown.clone(),
    )
    .unwrap();
    let started = Instant::now();
    let task = tokio::spawn(r.run());
    while store.outbox().cursor(&cfg.cursor_name).unwrap() < head {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = started.elapsed();
    shutdown.cancel();
    task.await.unwrap().unwrap();
    took
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if find_tansu().is_none() {
        eprintln!("SKIP relay_throughput: `tansu` not installed");
        return;
    }
    let n = env_num("EVENTS", 50_000);
    let rounds = env_num("ROUNDS", 5);
    let broker = Tansu::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = FjallStore::new(Db::open(dir.path(), DbOptions::default()).unwrap());
    fill(&store, n).await;
    let value_bytes = store.outbox().read_after(0, 1).unwrap()[0]
        .resource
        .as_ref()
        .map(|r| serde_json::to_vec(r).unwrap().len())
        .unwrap_or(0);
    println!("| round | bare rdkafka (events/s) | relay outbox→Kafka (events/s) | ratio |");
    println!("|---|---|---|---|");
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let bare_cfg = config(&broker.bootstrap(), &format!("bare{round}."));
        let relay_cfg = config(&broker.bootstrap(), &format!("relay{round}."));
        create_topic(
            &broker.bootstrap(),
            &format!("bare{round}.fhir.r4.Observation"),
        )
        .await;
        create_topic(
            &broker.bootstrap(),
            &format!("relay{round}.fhir.r4.Observation"),
        )
        .await;
        // Alternate which side runs first, so neither always gets the warmer broker.
        let (b, r) = if round % 2 == 0 {
            let b = bare(&store, &bare_cfg).await;
            (b, relay(&store, &relay_cfg).await)
        } else {
            let r = relay(&store, &relay_cfg).await;
            (bare(&store, &bare_cfg).await, r)
        };
        let (bs, rs) = (n as f64 / b.as_secs_f64(), n as f64 / r.as_secs_f64());
        ratios.push(rs / bs);
        println!("| {} | {bs:.0} | {rs:.0} | {:.2} |", round + 1, rs / bs);
    }
    ratios.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "\n{n} events of ~{value_bytes} B values per round, 3 partitions, acks=all, idempotent, linger.ms=5; median ratio {:.2}",
        ratios[ratios.len() / 2]
    );
}
