//! A RabbitMQ queue feed of HL7 v2 messages ingested by the real binary, which is killed (-9)
//! mid-consumption and restarted: every message ends up in the journal exactly once.
//! Skips when RabbitMQ is not reachable at 127.0.0.1:5672 (or `AMQP_URL`).

mod events_common;

use events_common::rabbit::{amqp_url, fill_durable_queue, queue_depth, rabbit_or_skip};
use events_common::Server;
use lapin::options::QueueDeleteOptions;
use std::collections::BTreeMap;
use std::time::Duration;
use tributary_e2e::{metric, wait};
use tributary_storage::{Db, DbOptions, FjallJournal, Journal, ListFilter};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_feed_survives_kill_9_mid_consumption() {
    let Some(conn) = rabbit_or_skip("queue_feed_survives_kill_9_mid_consumption").await else {
        return;
    };
    let ch = conn.create_channel().await.unwrap();
    let queue = format!("e2e.ingest.{}", std::process::id());
    let n: u32 = 3_000;
    fill_durable_queue(
        &ch,
        &queue,
        (0..n).map(|i| {
            format!(
                "MSH|^~\\&|LAB|HOSP|EHR|HOSP|20240101120000||ORU^R01|Q-{i}|P|2.5\rPID|1||{i}\rOBX|1|NM|8867-4^HR^LN||{}\r",
                60 + i % 40
            )
        }),
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let extra = format!(
        "[amqp]\nurl = {:?}\n[amqp.source]\nqueue = {queue:?}\npartner = \"lab\"\nprefetch = 32\n",
        amqp_url()
    );
    let server = Server::start(&data, &extra);
    // Kill it once a part of the queue was consumed, the rest still waiting.
    let mut killed_at = None;
    for _ in 0..600 {
        let depth = queue_depth(&ch, &queue).await;
        if depth < n * 3 / 4 {
            killed_at = Some(depth);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill9();
    let killed_at = killed_at.expect("consumption started within 12 s");
    let left = queue_depth(&ch, &queue).await;
    assert!(
        left > 0,
        "killed after everything was consumed; test proves nothing"
    );
    eprintln!("killed with {killed_at} of {n} messages still queued ({left} after the kill: unacked ones returned)");

    let server = Server::start(&data, &extra);
    // Drained, and what was taken last journaled too (duplicates are not journaled again).
    let http = server.http.to_string();
    wait(format!(
        "the queue to drain and {n} messages to be journaled"
    ))
    .until_async(|| async {
        let head = metric(&http, "tributary_journal_head_seq")?;
        (queue_depth(&ch, &queue).await == 0 && head >= f64::from(n)).then_some(())
    })
    .await;
    server.stop();

    let db = Db::open(&data, DbOptions::default()).unwrap();
    let journal = FjallJournal::new(db, 86_400_000);
    let listed = journal
        .list(&ListFilter {
            limit: Some(100_000),
            ..Default::default()
        })
        .unwrap();
    let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
    for (id, _, _) in &listed {
        let rec = journal.get(*id).unwrap().unwrap();
        assert_eq!(rec.envelope.partner.as_str(), "lab");
        *per_id
            .entry(rec.envelope.meta["hl7.control_id"].clone())
            .or_default() += 1;
    }
    let missing: Vec<_> = (0..n)
        .map(|i| format!("Q-{i}"))
        .filter(|k| !per_id.contains_key(k))
        .collect();
    assert!(
        missing.is_empty(),
        "{} messages lost: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let twice: Vec<_> = per_id.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "stored twice: {twice:?}");
    assert_eq!(listed.len(), n as usize);
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
}
