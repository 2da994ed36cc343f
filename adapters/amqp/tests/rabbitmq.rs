//! Against the real RabbitMQ on this machine (127.0.0.1:5672, guest/guest, or `AMQP_URL`).
//! Skips with a message when nothing listens there.

mod common;

use common::{amqp_url, bound_queue, fill_durable_queue, queue_depth, rabbit_or_skip};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tributary_amqp::{AmqpConfig, AmqpSink, AmqpSinkConfig, AmqpSource, AmqpSourceConfig};
use tributary_runtime::{ComponentStatus, Readiness};
use tributary_storage::{
    Db, DbOptions, FjallJournal, FjallStore, Journal, ListFilter, ResourceWrite, Store,
    StoreTransaction,
};

fn unique(name: &str) -> String {
    format!("{name}.{}", uuid_like())
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{n:x}")
}

/// Publishes to the default exchange and waits for the broker's confirmation.
async fn publish(ch: &lapin::Channel, queue: &str, body: &[u8]) {
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// A new durable `queue` holding `n` ORU^R01 messages, control ids `{prefix}-0` … `{prefix}-{n-1}`.
async fn fill_with_orus(ch: &lapin::Channel, queue: &str, prefix: &str, n: usize) {
    fill_durable_queue(
        ch,
        queue,
        (0..n).map(|i| {
            format!(
                "MSH|^~\\&|LAB|HOSP|EHR|HOSP|20240101120000||ORU^R01|{prefix}-{i}|P|2.5\rPID|1||{i}\r"
            )
        }),
    )
    .await;
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..600 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_publishes_every_event_with_confirms_and_routing_keys() {
    let Some(conn) =
        rabbit_or_skip("sink_publishes_every_event_with_confirms_and_routing_keys").await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), DbOptions::default()).unwrap();
    let store = FjallStore::new(db);
    let exchange = unique("test.events");
    let sink_cfg = AmqpSinkConfig {
        exchange: exchange.clone(),
        ..Default::default()
    };
    let cfg = AmqpConfig {
        url: amqp_url(),
        sink: Some(sink_cfg),
        ..Default::default()
    };

    // A subscriber queue bound to Observation events of tenant t1 only, declared before
    // publishing starts (the sink declares the exchange; we declare it too to bind first).
    let ch = conn.create_channel().await.unwrap();
    let queue = bound_queue(&ch, &exchange, "t1.Observation.*").await;

    for n in 0..50 {
        let tenant = if n % 10 == 9 { "t2" } else { "t1" };
        store
            .commit(StoreTransaction {
                tenant: tenant.into(),
                writes: vec![
                    ResourceWrite::upsert(
                        "Observation",
                        &format!("o{n}"),
                        json!({"status": "final", "subject": {"reference": "Patient/p1"}}),
                    ),
                    ResourceWrite::upsert("Patient", "p1", json!({"active": n % 2 == 0})),
                ],
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let readiness = Readiness::default();
    let shutdown = CancellationToken::new();
    let sink = AmqpSink::new(
        cfg,
        store.outbox().clone(),
        readiness.clone(),
        shutdown.clone(),
    )
    .unwrap();
    let task = tokio::spawn(sink.run());

    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut ids = Vec::new();
    while ids.len() < 45 {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .expect("a message within 30 s")
            .unwrap()
            .unwrap();
        assert!(d.routing_key.as_str().starts_with("t1.Observation."));
        let props = &d.properties;
        assert_eq!(
            props.content_type().as_ref().unwrap().as_str(),
            "application/fhir+json"
        );
        assert_eq!(*props.delivery_mode(), Some(2), "persistent");
        let headers = props.headers().as_ref().unwrap();
        let ce_id = match headers.inner().get("ce_id") {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            other => panic!("ce_id header missing: {other:?}"),
        };
        assert_eq!(
            props.message_id().as_ref().unwrap().as_str(),
            ce_id.as_str()
        );
        let body: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        assert_eq!(body["resourceType"], "Observation");
        ids.push(ce_id);
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    // Only t1's observations, each once, in commit order.
    let expected: Vec<String> = store
        .outbox()
        .read_after(0, 1000)
        .unwrap()
        .into_iter()
        .filter(|e| e.tenant == "t1" && e.event_type.starts_with("fhir.Observation."))
        .map(|e| e.event_id)
        .collect();
    assert_eq!(ids, expected);
    let head = store.outbox().head();
    wait_for("cursor at head", || {
        store.outbox().cursor("amqp").unwrap() == head
    })
    .await;
    assert_eq!(readiness.snapshot()["amqp-sink"], ComponentStatus::Ready);
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let _ = ch
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_journals_before_ack_and_recognises_redeliveries() {
    let Some(conn) = rabbit_or_skip("source_journals_before_ack_and_recognises_redeliveries").await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), DbOptions::default()).unwrap();
    let journal: Arc<dyn Journal> = Arc::new(FjallJournal::new(db.clone(), 86_400_000));
    let audit = tributary_storage::AuditLog::new(db);
    let queue = unique("test.ingest");
    let ch = conn.create_channel().await.unwrap();
    let n = 200;
    fill_with_orus(&ch, &queue, "CTRL", n).await;
    // Over the size limit: refused but kept, as a rejected journal entry with the reason.
    let oversized = format!(
        "MSH|^~\\&|LAB|HOSP|EHR|HOSP|20240101120000||ORU^R01|BIG-1|P|2.5\rNTE|1||{}\r",
        "x".repeat(5_000)
    );
    publish(&ch, &queue, oversized.as_bytes()).await;
    // The same message again (a sender retry): recognised by MSH-10, stored once.
    let again = "MSH|^~\\&|LAB|HOSP|EHR|HOSP|20240101120000||ORU^R01|CTRL-7|P|2.5\rPID|1||7\r";
    publish(&ch, &queue, again.as_bytes()).await;
    // A different message that reuses a control id (a sender whose counter restarted): stored.
    let reused = "MSH|^~\\&|LAB|HOSP|EHR|HOSP|20240102120000||ORU^R01|CTRL-8|P|2.5\rPID|1||other\r";
    publish(&ch, &queue, reused.as_bytes()).await;

    let cfg = AmqpConfig {
        url: amqp_url(),
        source: Some(AmqpSourceConfig {
            queue: queue.clone(),
            partner: "lab".into(),
            prefetch: 16,
            max_message_bytes: 4096,
            ..Default::default()
        }),
        ..Default::default()
    };
    let readiness = Readiness::default();
    let shutdown = CancellationToken::new();
    let metrics = tributary_runtime::Metrics::default();
    let source = AmqpSource::new(
        cfg,
        "default",
        journal.clone(),
        readiness.clone(),
        shutdown.clone(),
    )
    .unwrap()
    .with_metrics(metrics.clone())
    .with_audit(audit.clone());
    let task = tokio::spawn(source.run());
    let all = ListFilter {
        limit: Some(10_000),
        ..Default::default()
    };
    wait_for("every message journaled", || {
        journal.list(&all).unwrap().len() > n + 1
    })
    .await;
    // The queue drains (every delivery acked after its append).
    for _ in 0..100 {
        if queue_depth(&ch, &queue).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let listed = journal.list(&all).unwrap();
    assert_eq!(
        listed.len(),
        n + 2,
        "one journal entry per distinct message, a resend stored once"
    );
    let rejected: Vec<_> = listed
        .iter()
        .map(|(id, _, _)| journal.get(*id).unwrap().unwrap())
        .filter(|r| matches!(r.state.state, tributary_core::MessageState::Rejected { .. }))
        .collect();
    assert_eq!(
        rejected.len(),
        1,
        "the oversized message is kept as rejected"
    );
    let tributary_core::MessageState::Rejected { reason } = &rejected[0].state.state else {
        unreachable!()
    };
    assert!(reason.contains("max_message_bytes (4096)"), "{reason}");
    assert_eq!(
        rejected[0].envelope.payload.len(),
        oversized.len(),
        "kept whole"
    );
    let text = metrics.render(Vec::new());
    for want in [
        format!(
            "tributary_ingress_messages_total{{source=\"amqp-source\",outcome=\"accepted\"}} {}",
            n + 1
        ),
        "tributary_ingress_messages_total{source=\"amqp-source\",outcome=\"duplicate\"} 1".into(),
        "tributary_ingress_messages_total{source=\"amqp-source\",outcome=\"rejected\"} 1".into(),
    ] {
        assert!(
            text.lines().any(|l| l == want),
            "missing {want:?} in\n{text}"
        );
    }
    let rec = journal.get(listed[0].0).unwrap().unwrap();
    assert_eq!(rec.envelope.partner.as_str(), "lab");
    assert_eq!(rec.envelope.meta["ingress"], "amqp");
    assert!(rec.envelope.meta["hl7.control_id"].starts_with("CTRL-"));
    // The same header facts as over MLLP, so `tributary replay --type ORU^R01` finds it.
    let oru = ListFilter {
        message_type: Some("ORU^R01".into()),
        ..all.clone()
    };
    assert_eq!(journal.list(&oru).unwrap().len(), n + 2);
    assert_eq!(readiness.snapshot()["amqp-source"], ComponentStatus::Ready);
    // One ingress audit record per queue message, naming the journal entry, and no content.
    let records: Vec<serde_json::Value> = audit
        .read_after(0, 10_000)
        .unwrap()
        .into_iter()
        .map(|e| e.body)
        .collect();
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for r in &records {
        assert_eq!(
            (&r["kind"], &r["protocol"], &r["partner"], &r["queue"]),
            (
                &json!("ingress"),
                &json!("hl7v2-amqp"),
                &json!("lab"),
                &json!(queue)
            ),
            "{r}"
        );
        assert_eq!(r["message_type"], "ORU^R01", "{r}");
        let id: tributary_core::MessageId = r["message_id"].as_str().unwrap().parse().unwrap();
        assert!(journal.get(id).unwrap().is_some(), "{r}");
        *outcomes
            .entry(r["outcome"].as_str().unwrap().into())
            .or_default() += 1;
    }
    assert_eq!(
        outcomes,
        [
            ("accepted".to_string(), n + 1),
            ("duplicate".into(), 1),
            ("rejected".into(), 1)
        ]
        .into_iter()
        .collect()
    );
    let text = serde_json::to_string(&records).unwrap();
    for phi in ["other", "xxxxxxxx", "PID|"] {
        assert!(
            !text.contains(phi),
            "audit records hold message content: {phi}"
        );
    }
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
}

/// The journal cannot write: no queue message is acknowledged, each goes back to the queue,
/// the source reports itself degraded with the reason, and once the journal writes again every
/// message is journaled exactly once and the queue drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_that_cannot_write_leaves_every_message_in_the_queue() {
    let Some(conn) =
        rabbit_or_skip("a_journal_that_cannot_write_leaves_every_message_in_the_queue").await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), DbOptions::default()).unwrap();
    let journal = Arc::new(tributary_testing::failing_journal::FailingJournal::new(
        FjallJournal::new(db.clone(), 86_400_000),
        true,
    ));
    let audit = tributary_storage::AuditLog::new(db);
    let queue = unique("test.ingest-failing");
    let ch = conn.create_channel().await.unwrap();
    let n = 20;
    fill_with_orus(&ch, &queue, "FJ", n).await;
    let cfg = AmqpConfig {
        url: amqp_url(),
        retry_initial_ms: 100,
        retry_max_ms: 500,
        source: Some(AmqpSourceConfig {
            queue: queue.clone(),
            partner: "lab".into(),
            prefetch: 4,
            ..Default::default()
        }),
        ..Default::default()
    };
    let readiness = Readiness::default();
    let shutdown = CancellationToken::new();
    let source = AmqpSource::new(
        cfg,
        "default",
        journal.clone(),
        readiness.clone(),
        shutdown.clone(),
    )
    .unwrap()
    .with_audit(audit.clone());
    let task = tokio::spawn(source.run());
    wait_for("the source to report the journal failure", || {
        matches!(
            readiness.snapshot().get("amqp-source"),
            Some(ComponentStatus::Degraded { reason }) if reason.contains("journal append failed")
        )
    })
    .await;
    let all = ListFilter {
        limit: Some(10_000),
        ..Default::default()
    };
    assert!(journal.list(&all).unwrap().is_empty());
    // Every message is still the broker's (requeued, or held by a consumer that has not acked).
    let depth = queue_depth(&ch, &queue).await;
    assert!(depth as usize + 4 >= n, "{depth} of {n} left in the queue");

    journal.set_failing(false);
    wait_for("every message journaled", || {
        journal.list(&all).unwrap().len() >= n
    })
    .await;
    for _ in 0..100 {
        if queue_depth(&ch, &queue).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(queue_depth(&ch, &queue).await, 0);
    assert_eq!(
        journal.list(&all).unwrap().len(),
        n,
        "each message once, although some were delivered more than once"
    );
    // The audit log says what happened to each delivery: given back while the journal could not
    // write, then journaled once each.
    let outcomes: Vec<String> = audit
        .read_after(0, 10_000)
        .unwrap()
        .into_iter()
        .map(|e| e.body["outcome"].as_str().unwrap().to_string())
        .collect();
    let count = |o: &str| outcomes.iter().filter(|x| *x == o).count();
    assert!(count("storage_unavailable") >= 1, "{outcomes:?}");
    assert_eq!(count("accepted"), n, "{outcomes:?}");
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
}
