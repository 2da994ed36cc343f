//! Outbox retention with Subscriptions, in process: delivered events are pruned up to what
//! every active subscription has delivered, later events keep their numbers (also across a
//! restart of the service), `$status` stays right and `$events` for pruned numbers answers
//! 410 Gone with an OperationOutcome instead of a shorter Bundle.

#[path = "common/hook.rs"]
mod hook;

#[path = "common/api.rs"]
mod api;
#[path = "common/store.rs"]
mod store;

use axum::http::StatusCode;
use hook::{notified, start_hook};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use store::put;
use tokio_util::sync::CancellationToken;
use tributary_runtime::Readiness;
use tributary_storage::{Db, DbOptions, FjallJournal, FjallStore, Store};
use tributary_subscriptions::api::{router, ApiState};
use tributary_subscriptions::bundle::read_status;
use tributary_subscriptions::model::{BACKPORT, TOPIC_BASE};
use tributary_subscriptions::{SubscriptionService, SubscriptionsConfig};

fn config() -> SubscriptionsConfig {
    SubscriptionsConfig {
        base_url: "http://tributary.test/fhir".into(),
        tenants: vec!["t1".into()],
        rescan_secs: 1,
        retry_initial_ms: 100,
        retry_max_ms: 1_000,
        give_up_after_secs: 3_600,
        request_timeout_ms: 2_000,
        min_heartbeat_secs: 1,
        allow_http_endpoints: true,
        allow_private_endpoints: true,
        ..Default::default()
    }
}

fn subscription(endpoint: &str, status: &str) -> Value {
    json!({
        "resourceType": "Subscription",
        "meta": {"profile": [format!("{BACKPORT}/backport-subscription")]},
        "status": status,
        "reason": "test",
        "criteria": format!("{TOPIC_BASE}/observation"),
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": format!("{BACKPORT}/backport-payload-content"), "valueCode": "id-only"}]}
        }
    })
}

async fn observe(store: &FjallStore, id: &str) {
    let body = json!({"status": "final", "subject": {"reference": "Patient/p1"}});
    put(store, "Observation", id, body).await;
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn api_get(
    service: &Arc<SubscriptionService>,
    journal: &Arc<FjallJournal>,
    uri: &str,
) -> (StatusCode, Value) {
    let app = router(ApiState {
        service: service.clone(),
        journal: journal.clone(),
        metrics: Default::default(),
    });
    api::get(app, uri).await
}

fn events_since_start(status_bundle: &Value) -> Option<String> {
    status_bundle["entry"][0]["resource"]["parameter"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == "events-since-subscription-start")
        .and_then(|p| p["valueString"].as_str().map(str::to_string))
}

fn focus(id: &str) -> Option<String> {
    Some(format!("http://tributary.test/fhir/Observation/{id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_events_are_pruned_and_numbering_goes_on() {
    let (got, hook) = start_hook().await;

    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), DbOptions::default()).unwrap();
    let store = Arc::new(FjallStore::new(db.clone()));
    let journal = Arc::new(FjallJournal::new(db.clone(), 86_400_000));
    let service = SubscriptionService::new(config(), store.clone(), db.clone(), "t1").unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(service.clone().run(Readiness::default(), shutdown.clone()));

    put(
        &store,
        "Subscription",
        "obs",
        subscription(&hook, "requested"),
    )
    .await;
    // An `off` subscription holds nothing back.
    put(&store, "Subscription", "idle", subscription(&hook, "off")).await;
    wait_for("the handshake", || !got.lock().unwrap().is_empty()).await;
    for id in ["o1", "o2", "o3"] {
        observe(&store, id).await;
    }
    wait_for("three events", || notified(&got).len() >= 3).await;
    assert_eq!(
        notified(&got),
        vec![(1, focus("o1")), (2, focus("o2")), (3, focus("o3"))]
    );

    // Everything the subscription has delivered may go (a far-future age cut-off).
    let outbox = store.outbox();
    let o3_seq = outbox
        .read_after(0, 1000)
        .unwrap()
        .iter()
        .find(|e| e.resource_id.as_deref() == Some("o3"))
        .unwrap()
        .seq;
    wait_for("the retention floor past o3", || {
        service.retention_floor().unwrap().unwrap_or(0) >= o3_seq
    })
    .await;
    let floor = service.retention_floor().unwrap().unwrap();
    let later = tributary_core::now_millis() + 60_000;
    let pruned = outbox.prune_through(floor, later).await.unwrap();
    assert!(pruned >= 3, "pruned {pruned}");
    assert!(outbox.event(o3_seq).unwrap().is_none());

    // The pruned range: a clear answer, not a short Bundle.
    let (code, oo) = api_get(&service, &journal, "/Subscription/obs/$events").await;
    assert_eq!(code, StatusCode::GONE, "{oo}");
    assert_eq!(oo["resourceType"], "OperationOutcome");
    let text = oo["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(text.contains("events 1 to 3"), "{text}");
    assert!(text.contains("retention"), "{text}");

    // New events keep counting from 4.
    for id in ["o4", "o5"] {
        observe(&store, id).await;
    }
    wait_for("two more events", || notified(&got).len() >= 5).await;
    assert_eq!(notified(&got)[3..], [(4, focus("o4")), (5, focus("o5"))]);
    let (code, st) = api_get(&service, &journal, "/Subscription/obs/$status").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(events_since_start(&st).as_deref(), Some("5"));
    let (code, ev) = api_get(
        &service,
        &journal,
        "/Subscription/obs/$events?eventsSinceNumber=4",
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{ev}");
    assert_eq!(
        read_status(&ev).unwrap().1,
        vec![(4, focus("o4")), (5, focus("o5"))]
    );
    // A range that starts in the pruned part names the first number still there.
    let (code, oo) = api_get(
        &service,
        &journal,
        "/Subscription/obs/$events?eventsSinceNumber=2&eventsUntilNumber=5",
    )
    .await;
    assert_eq!(code, StatusCode::GONE);
    let text = oo["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(
        text.contains("events 2 to 3") && text.contains("number 4"),
        "{text}"
    );

    // A restart of the service: numbers come from the record, not from a rescan.
    shutdown.cancel();
    running.await.unwrap().unwrap();
    let service = SubscriptionService::new(config(), store.clone(), db.clone(), "t1").unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(service.clone().run(Readiness::default(), shutdown.clone()));
    observe(&store, "o6").await;
    wait_for("the event after the restart", || notified(&got).len() >= 6).await;
    assert_eq!(notified(&got)[5], (6, focus("o6")));
    let (_, st) = api_get(&service, &journal, "/Subscription/obs/$status").await;
    assert_eq!(events_since_start(&st).as_deref(), Some("6"));
    shutdown.cancel();
    running.await.unwrap().unwrap();
}

/// A subscription that delivered before event numbers were recorded (only its cursors in the
/// data directory): its worker numbers what it delivered once, from its start, and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_of_a_subscription_from_before_the_record_are_backfilled() {
    let (got, hook) = start_hook().await;

    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), DbOptions::default()).unwrap();
    let store = Arc::new(FjallStore::new(db.clone()));
    let journal = Arc::new(FjallJournal::new(db.clone(), 86_400_000));
    put(&store, "Subscription", "obs", subscription(&hook, "active")).await;
    let created = store.outbox().head();
    for id in ["o1", "o2", "o3"] {
        observe(&store, id).await;
    }
    put(&store, "Encounter", "e1", json!({"status": "planned"})).await;
    let seq_of = |id: &str| {
        store
            .outbox()
            .read_after(0, 100)
            .unwrap()
            .iter()
            .find(|e| e.resource_id.as_deref() == Some(id))
            .unwrap()
            .seq
    };
    // What an older version left: its start and its cursor (o1 and o2 delivered).
    let outbox = store.outbox();
    outbox.ack("substart:t1/obs", created).await.unwrap();
    outbox.ack("sub:t1/obs", seq_of("o2")).await.unwrap();
    assert_eq!(outbox.numbering("sub:t1/obs").unwrap(), None);

    let service = SubscriptionService::new(config(), store.clone(), db.clone(), "t1").unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(service.clone().run(Readiness::default(), shutdown.clone()));
    wait_for("the third event", || !notified(&got).is_empty()).await;
    assert_eq!(notified(&got), vec![(3, focus("o3"))]);
    // the worker records a delivery after the endpoint has answered
    wait_for("the delivery recorded", || {
        outbox
            .numbering("sub:t1/obs")
            .unwrap()
            .is_some_and(|n| n.count > 2)
    })
    .await;
    let n = outbox.numbering("sub:t1/obs").unwrap().unwrap();
    assert_eq!(n.count, 3);
    assert_eq!(
        outbox.numbered_seqs("sub:t1/obs", 1, 10, 10).unwrap(),
        vec![(1, seq_of("o1")), (2, seq_of("o2")), (3, seq_of("o3"))]
    );
    let (code, ev) = api_get(&service, &journal, "/Subscription/obs/$events").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        read_status(&ev).unwrap().1,
        vec![(1, focus("o1")), (2, focus("o2")), (3, focus("o3"))]
    );
    shutdown.cancel();
    running.await.unwrap().unwrap();

    // Beyond what the worker numbered (it is not running): found by scanning on from its
    // position, and nothing is recorded by asking.
    observe(&store, "o4").await;
    let idle = SubscriptionService::new(config(), store.clone(), db.clone(), "t1").unwrap();
    let (code, ev) = api_get(
        &idle,
        &journal,
        "/Subscription/obs/$events?eventsSinceNumber=3",
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        read_status(&ev).unwrap().1,
        vec![(3, focus("o3")), (4, focus("o4"))]
    );
    assert_eq!(outbox.numbering("sub:t1/obs").unwrap().unwrap().count, 3);
}
