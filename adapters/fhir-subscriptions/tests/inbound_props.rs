//! The partner-facing notification hook over generated bodies: whatever an authenticated partner
//! posts, the answer is 200 or a 400 OperationOutcome — never a server error — and every body that
//! is not a handshake or heartbeat is journaled, accepted or kept as rejected.

use axum::body::Body;
use axum::http::Request;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};
use std::sync::Arc;
use tower::ServiceExt;
use tributary_storage::{Db, DbOptions, FjallJournal, FjallStore, Journal, ListFilter};
use tributary_subscriptions::api::{router, ApiState};
use tributary_subscriptions::{InboundPartner, SubscriptionService, SubscriptionsConfig};

const TOKEN: &str = "partner-token-0123456789";

/// A notification Bundle with one value replaced by generated JSON, or generated JSON alone.
fn body() -> impl Strategy<Value = Value> {
    let words = vec![
        "event-notification",
        "handshake",
        "heartbeat",
        "query-event",
        "Bundle",
        "Parameters",
        "Encounter/enc-1",
        "http://ehr.example/fhir/Encounter/enc-1",
        "../../x",
    ];
    let keys = vec![
        "resourceType",
        "type",
        "entry",
        "fullUrl",
        "resource",
        "parameter",
        "name",
        "part",
        "valueCode",
        "valueString",
        "valueReference",
        "reference",
        "request",
        "method",
        "x",
    ];
    let json = tributary_testing::json(words, keys);
    let base = json!({"resourceType": "Bundle", "type": "history", "entry": [
        {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Parameters", "parameter": [
            {"name": "subscription", "valueReference": {"reference": "http://ehr.example/fhir/Subscription/9"}},
            {"name": "status", "valueCode": "active"},
            {"name": "type", "valueCode": "event-notification"},
            {"name": "notification-event", "part": [
                {"name": "event-number", "valueString": "7"},
                {"name": "focus", "valueReference": {"reference": "Encounter/enc-1"}}]}]}},
        {"fullUrl": "Encounter/enc-1", "resource": {"resourceType": "Encounter", "id": "enc-1", "status": "in-progress"}}
    ]});
    tributary_testing::near(base, json)
}

#[test]
fn generated_notifications_get_200_or_a_400_outcome_and_are_kept() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), DbOptions::default()).unwrap();
    let store = Arc::new(FjallStore::new(db.clone()));
    let journal = Arc::new(FjallJournal::new(db.clone(), 0));
    let cfg = SubscriptionsConfig {
        tenants: vec!["t1".into()],
        inbound: vec![InboundPartner {
            partner: "ehr".into(),
            token: TOKEN.into(),
            tenant: "t1".into(),
            upstream_base_url: None,
            token_url: None,
            client_id: None,
            client_secret: None,
            scope: None,
        }],
        ..Default::default()
    };
    let service = rt.block_on(async { SubscriptionService::new(cfg, store, db, "t1").unwrap() });
    let app = router(ApiState {
        service,
        journal: journal.clone(),
        metrics: Default::default(),
    });
    let kept = std::cell::Cell::new(0usize);
    let (accepted, refused) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    let mut runner = TestRunner::new(Config {
        cases: 400,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&body(), |b| {
            let req = Request::post("/subscription-hook/ehr")
                .header("authorization", format!("Bearer {TOKEN}"))
                .header("content-type", "application/fhir+json")
                .body(Body::from(serde_json::to_vec(&b).unwrap()))
                .unwrap();
            let (status, answer) = rt.block_on(async {
                let res = app.clone().oneshot(req).await.unwrap();
                let status = res.status().as_u16();
                let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
                    .await
                    .unwrap();
                (
                    status,
                    serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null),
                )
            });
            prop_assert!(status == 200 || status == 400, "{status} for {b}: {answer}");
            if status == 400 {
                prop_assert_eq!(&answer["resourceType"], "OperationOutcome", "{}", b);
                refused.set(refused.get() + 1);
            } else {
                accepted.set(accepted.get() + 1);
            }
            let now = journal
                .list(&ListFilter {
                    limit: Some(100_000),
                    ..Default::default()
                })
                .unwrap()
                .len();
            // a 400 always keeps the body; a 200 journals it unless it was a handshake or
            // heartbeat (or repeated event numbers already journaled)
            if status == 400 {
                prop_assert_eq!(now, kept.get() + 1, "a refused body is kept: {}", b);
            }
            kept.set(now);
            Ok(())
        })
        .unwrap();
    // not vacuous: both answers occur often
    assert!(accepted.get() > 40, "{} accepted", accepted.get());
    assert!(refused.get() > 40, "{} refused", refused.get());
}
