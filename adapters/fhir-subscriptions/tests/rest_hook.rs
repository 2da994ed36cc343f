//! Rest-hook delivery end to end, in process: resources committed through `Store::commit` (as
//! the mapping pipeline and the facade do), notifications received by a real HTTP endpoint.

#[path = "common/api.rs"]
mod api;
#[path = "../../mllp/tests/common/pki.rs"]
mod pki;
#[path = "common/receiver.rs"]
mod receiver;
#[path = "common/store.rs"]
mod store;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use receiver::{Receiver, RECEIVER_AUTH};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use store::put;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tributary_runtime::tls::{ListenerTlsConfig, ReloadingAcceptor};
use tributary_runtime::Readiness;
use tributary_storage::{Db, DbOptions, FjallJournal, FjallStore, Journal, ListFilter, Store};
use tributary_subscriptions::api::{router, ApiState};
use tributary_subscriptions::bundle::read_status;
use tributary_subscriptions::model::{BACKPORT, PATIENT_CONTEXT_EXT, TOPIC_BASE};
use tributary_subscriptions::{InboundPartner, SubscriptionService, SubscriptionsConfig};

struct Env {
    _dir: tempfile::TempDir,
    db: Db,
    store: Arc<FjallStore>,
    journal: Arc<FjallJournal>,
    service: Arc<SubscriptionService>,
    shutdown: CancellationToken,
}

fn config() -> SubscriptionsConfig {
    SubscriptionsConfig {
        base_url: "http://tributary.test/fhir".into(),
        tenants: vec!["t1".into()],
        rescan_secs: 1,
        retry_initial_ms: 100,
        retry_max_ms: 2_000,
        give_up_after_secs: 3_600,
        request_timeout_ms: 2_000,
        min_heartbeat_secs: 1,
        allow_http_endpoints: true,
        allow_private_endpoints: true,
        ..Default::default()
    }
}

fn start(cfg: SubscriptionsConfig) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), DbOptions::default()).unwrap();
    let store = Arc::new(FjallStore::new(db.clone()));
    let journal = Arc::new(FjallJournal::new(db.clone(), 86_400_000));
    let service = SubscriptionService::new(cfg, store.clone(), db.clone(), "t1").unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(service.clone().run(Readiness::default(), shutdown.clone()));
    Env {
        _dir: dir,
        db,
        store,
        journal,
        service,
        shutdown,
    }
}

fn subscription(topic: &str, endpoint: &str, content: &str, criteria: Option<&str>) -> Value {
    let mut s = json!({
        "resourceType": "Subscription",
        "meta": {"profile": [format!("{BACKPORT}/backport-subscription")]},
        "status": "requested",
        "reason": "test",
        "criteria": format!("{TOPIC_BASE}/{topic}"),
        "channel": {
            "extension": [{"url": format!("{BACKPORT}/backport-heartbeat-period"), "valueUnsignedInt": 1}],
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": format!("{BACKPORT}/backport-payload-content"), "valueCode": content}]},
            "header": [format!("Authorization: {RECEIVER_AUTH}")]
        }
    });
    if let Some(c) = criteria {
        s["_criteria"] = json!({"extension": [{"url": format!("{BACKPORT}/backport-filter-criteria"), "valueString": c}]});
    }
    s
}

async fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    for _ in 0..secs * 10 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The stored Subscription `id` of tenant t1.
fn stored_subscription(env: &Env, id: &str) -> Value {
    env.store
        .read("t1", "Subscription", id)
        .unwrap()
        .unwrap()
        .resource()
        .unwrap()
}

fn observation(subject: &str) -> Value {
    json!({"status": "final", "subject": {"reference": subject}})
}

fn api(env: &Env) -> Router {
    router(ApiState {
        service: env.service.clone(),
        journal: env.journal.clone(),
        metrics: Default::default(),
    })
}

fn encounter(patient: &str, status: &str) -> Value {
    json!({"resourceType": "Encounter", "status": status, "class": {"code": "IMP"},
           "subject": {"reference": format!("Patient/{patient}")}})
}

async fn api_get(env: &Env, uri: &str) -> (StatusCode, Value) {
    api::get(api(env), uri).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_heartbeat_and_matching_notifications_only() {
    let rx = Receiver::start().await;
    let env = start(config());
    put(
        &env.store,
        "Subscription",
        "adm",
        subscription(
            "patient-admission",
            &rx.url(),
            "full-resource",
            Some("Encounter?patient=Patient/p1"),
        ),
    )
    .await;
    wait_for("handshake", 20, || !rx.of_type("handshake").is_empty()).await;
    wait_for("status active", 20, || {
        stored_subscription(&env, "adm")["status"] == "active"
    })
    .await;

    put(&env.store, "Encounter", "e1", encounter("p1", "planned")).await; // not an admission
    put(
        &env.store,
        "Encounter",
        "e1",
        encounter("p1", "in-progress"),
    )
    .await; // admission: match
    put(
        &env.store,
        "Encounter",
        "e2",
        encounter("p2", "in-progress"),
    )
    .await; // other patient
    put(&env.store, "Observation", "o1", observation("Patient/p1")).await; // other topic
    put(
        &env.store,
        "Encounter",
        "e1",
        encounter("p1", "in-progress"),
    )
    .await; // unchanged: no event
    put(
        &env.store,
        "Encounter",
        "e3",
        encounter("p1", "in-progress"),
    )
    .await; // match

    wait_for("two admissions", 20, || rx.events().len() >= 2).await;
    wait_for("a heartbeat", 20, || !rx.of_type("heartbeat").is_empty()).await;
    let events = rx.events();
    assert_eq!(
        events,
        vec![
            (1, Some("http://tributary.test/fhir/Encounter/e1".into())),
            (2, Some("http://tributary.test/fhir/Encounter/e3".into())),
        ]
    );
    let first = &rx.of_type("event-notification")[0];
    assert_eq!(first["type"], "history");
    assert_eq!(first["entry"][1]["resource"]["status"], "in-progress");
    assert_eq!(first["entry"][1]["request"]["method"], "PUT");

    let (code, st) = api_get(&env, "/Subscription/adm/$status").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(st["type"], "searchset");
    let params = &st["entry"][0]["resource"]["parameter"];
    assert!(params
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "events-since-subscription-start" && p["valueString"] == "2"));
    let (code, ev) = api_get(
        &env,
        "/Subscription/adm/$events?eventsSinceNumber=2&content=id-only",
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    let (kind, listed) = read_status(&ev).unwrap();
    assert_eq!(kind, "query-event");
    assert_eq!(
        listed,
        vec![(2, Some("http://tributary.test/fhir/Encounter/e3".into()))]
    );
    let (code, _) = api_get(&env, "/Subscription/nope/$status").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    env.shutdown.cancel();
}

/// A Subscription created just before a crash (no worker had recorded where it starts) and
/// a matching change after it: at the next start, delivery begins at the Subscription's own
/// creation, not at the outbox head, so the change is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_seen_first_at_start_gets_the_changes_since_its_creation() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path(), DbOptions::default()).unwrap();
    let store = Arc::new(FjallStore::new(db.clone()));
    put(
        &store,
        "Encounter",
        "before",
        encounter("p1", "in-progress"),
    )
    .await; // before: not sent
    put(
        &store,
        "Subscription",
        "adm",
        subscription("patient-admission", &rx.url(), "id-only", None),
    )
    .await;
    put(&store, "Encounter", "e1", encounter("p1", "in-progress")).await;
    put(&store, "Observation", "o1", observation("Patient/p1")).await;
    let service = SubscriptionService::new(config(), store.clone(), db, "t1").unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(service.run(Readiness::default(), shutdown.clone()));
    wait_for("the admission after the subscription", 20, || {
        !rx.events().is_empty()
    })
    .await;
    assert_eq!(
        rx.events(),
        vec![(1, Some("http://tributary.test/fhir/Encounter/e1".into()))]
    );
    shutdown.cancel();
}

/// The subscriber's endpoint is down (port closed) while changes keep coming; when it returns
/// it receives every event, numbered without gaps, in order. `SUBS_OUTAGE_SECS` sets the outage
/// (default 120 s: the issue's two minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_down_then_receives_everything() {
    let outage = std::env::var("SUBS_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120u64);
    let mut rx = Receiver::start().await;
    let env = start(SubscriptionsConfig {
        retry_max_ms: 5_000,
        ..config()
    });
    put(
        &env.store,
        "Subscription",
        "obs",
        subscription("observation", &rx.url(), "id-only", None),
    )
    .await;
    wait_for("handshake", 20, || !rx.of_type("handshake").is_empty()).await;
    rx.down();
    let began = std::time::Instant::now();
    let mut n = 0;
    while began.elapsed() < Duration::from_secs(outage) {
        put(
            &env.store,
            "Observation",
            &format!("o{n}"),
            observation(&format!("Patient/p{}", n % 3)),
        )
        .await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(rx.events().is_empty(), "nothing delivered while down");
    // `$status` counts what happened, not what was delivered: the subscriber can see it missed
    // events while its endpoint was down.
    let (code, st) = api_get(&env, "/Subscription/obs/$status").await;
    assert_eq!(code, StatusCode::OK);
    let params = &st["entry"][0]["resource"]["parameter"];
    let happened = n.to_string();
    assert!(
        params.as_array().unwrap().iter().any(|p| {
            p["name"] == "events-since-subscription-start" && p["valueString"] == happened.as_str()
        }),
        "{params}"
    );
    rx.up().await;
    wait_for("every event after the outage", 60, || {
        rx.events().len() >= n
    })
    .await;
    let events = rx.events();
    let numbers: Vec<u64> = events.iter().map(|e| e.0).collect();
    assert_eq!(
        numbers,
        (1..=n as u64).collect::<Vec<_>>(),
        "no gaps, no duplicates, in order"
    );
    for (i, (_, focus)) in events.iter().enumerate() {
        assert_eq!(
            focus.as_deref(),
            Some(format!("http://tributary.test/fhir/Observation/o{i}").as_str())
        );
    }
    eprintln!("{n} events delivered after a {outage} s endpoint outage");
    env.shutdown.cancel();
}

/// Revoking the consent a Subscription was created under (the facade stamps its grant id)
/// switches the Subscription off: nothing more is delivered, as the token itself stops working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_grant_stops_delivery() {
    use tributary_subscriptions::model::GRANT_EXT;
    let rx = Receiver::start().await;
    let env = start(config());
    let revoked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = revoked.clone();
    env.service
        .set_revocation_check(Arc::new(move |tenant: &str, id: &str| {
            tenant == "t1" && id == "consent-9" && flag.load(std::sync::atomic::Ordering::SeqCst)
        }));
    let mut s = subscription("observation", &rx.url(), "full-resource", None);
    s["extension"] = json!([{"url": GRANT_EXT, "valueString": "consent-9"}]);
    put(&env.store, "Subscription", "granted", s).await;
    put(&env.store, "Observation", "o1", observation("Patient/p1")).await;
    wait_for("the first event", 20, || !rx.events().is_empty()).await;
    revoked.store(true, std::sync::atomic::Ordering::SeqCst);
    put(&env.store, "Observation", "o2", observation("Patient/p1")).await;
    wait_for("status off", 20, || {
        stored_subscription(&env, "granted")["status"] == "off"
    })
    .await;
    assert_eq!(
        rx.events(),
        vec![(1, Some("http://tributary.test/fhir/Observation/o1".into()))]
    );
    assert!(stored_subscription(&env, "granted")["error"]
        .as_str()
        .unwrap()
        .contains("revoked"));
    env.shutdown.cancel();
}

/// Without `allow_private_endpoints`, an endpoint on the engine's own network is never posted
/// to, whether written as an address or as a name that resolves to one: the handshake fails
/// (the Subscription goes to `error`) and the listener there receives nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_on_private_addresses_are_not_posted_to() {
    let rx = Receiver::start().await;
    let env = start(SubscriptionsConfig {
        allow_private_endpoints: false,
        give_up_after_secs: 1,
        retry_initial_ms: 100,
        retry_max_ms: 200,
        ..config()
    });
    let by_name = rx.url().replace("127.0.0.1", "localhost");
    for (id, url) in [("literal", rx.url()), ("named", by_name)] {
        put(
            &env.store,
            "Subscription",
            id,
            subscription("observation", &url, "id-only", None),
        )
        .await;
    }
    for id in ["literal", "named"] {
        wait_for("status error", 20, || {
            stored_subscription(&env, id)["status"] == "error"
        })
        .await;
    }
    assert!(
        rx.bundles().is_empty(),
        "nothing reached the private listener"
    );
    let reason = stored_subscription(&env, "literal")["error"].to_string();
    assert!(reason.contains("not public"), "{reason}");
    env.shutdown.cancel();
}

/// A client that writes its Subscription as `active` still gets the handshake before the first
/// notification: the endpoint must agree to receive before anything is sent to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_created_active_is_handshaken_first() {
    let rx = Receiver::start().await;
    let env = start(config());
    let mut s = subscription("observation", &rx.url(), "id-only", None);
    s["status"] = json!("active");
    put(&env.store, "Subscription", "eager", s).await;
    put(&env.store, "Observation", "o1", observation("Patient/p1")).await;
    wait_for("the event", 20, || !rx.events().is_empty()).await;
    assert_eq!(rx.kinds()[..2], ["handshake", "event-notification"]);
    env.shutdown.cancel();
}

/// A Subscription moved to another endpoint: the new endpoint gets a handshake before any
/// notification, and numbering goes on (same subscriber).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_endpoint_is_handshaken_before_it_receives_events() {
    let first = Receiver::start().await;
    let second = Receiver::start().await;
    let env = start(config());
    put(
        &env.store,
        "Subscription",
        "moving",
        subscription("observation", &first.url(), "id-only", None),
    )
    .await;
    put(&env.store, "Observation", "o1", observation("Patient/p1")).await;
    wait_for("the first event", 20, || !first.events().is_empty()).await;
    let mut moved = subscription("observation", &second.url(), "id-only", None);
    moved["status"] = json!("active");
    put(&env.store, "Subscription", "moving", moved).await;
    // (An event committed before the engine has seen the move may still go to the old one.)
    wait_for("the handshake at the new endpoint", 20, || {
        !second.of_type("handshake").is_empty()
    })
    .await;
    put(&env.store, "Observation", "o2", observation("Patient/p1")).await;
    wait_for("the event at the new endpoint", 20, || {
        !second.events().is_empty()
    })
    .await;
    assert_eq!(second.kinds()[..2], ["handshake", "event-notification"]);
    assert_eq!(
        second.events(),
        vec![(2, Some("http://tributary.test/fhir/Observation/o2".into()))]
    );
    env.shutdown.cancel();
}

/// A Subscription deleted and created again under the same id is a new subscriber: it gets its
/// own handshake, numbers from 1 and none of the earlier incarnation's events, by delivery or by
/// `$events` (which would otherwise hand the new owner what the old one's token could read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_created_again_under_a_deleted_id_starts_afresh() {
    let first = Receiver::start().await;
    let env = start(config());
    put(
        &env.store,
        "Subscription",
        "obs",
        subscription("observation", &first.url(), "id-only", None),
    )
    .await;
    wait_for("handshake", 20, || !first.of_type("handshake").is_empty()).await;
    put(&env.store, "Observation", "o1", observation("Patient/p1")).await;
    put(&env.store, "Observation", "o2", observation("Patient/p2")).await;
    wait_for("two events", 20, || first.events().len() >= 2).await;
    env.store
        .commit(tributary_storage::StoreTransaction {
            tenant: "t1".into(),
            writes: vec![tributary_storage::ResourceWrite::delete(
                "Subscription",
                "obs",
            )],
            ..Default::default()
        })
        .await
        .unwrap();
    let second = Receiver::start().await;
    put(
        &env.store,
        "Subscription",
        "obs",
        subscription("observation", &second.url(), "id-only", None),
    )
    .await;
    wait_for("the new incarnation's handshake", 20, || {
        !second.of_type("handshake").is_empty()
    })
    .await;
    put(&env.store, "Observation", "o3", observation("Patient/p1")).await;
    wait_for("the new event", 20, || !second.events().is_empty()).await;
    assert_eq!(
        second.events(),
        vec![(1, Some("http://tributary.test/fhir/Observation/o3".into()))]
    );
    let (code, ev) = api_get(&env, "/Subscription/obs/$events?eventsSinceNumber=1").await;
    assert_eq!(code, StatusCode::OK);
    let (_, listed) = read_status(&ev).unwrap();
    assert_eq!(
        listed,
        vec![(1, Some("http://tributary.test/fhir/Observation/o3".into()))]
    );
    assert_eq!(
        first.events().len(),
        2,
        "the deleted one's endpoint got no more"
    );
    env.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patient_context_subscriber_never_receives_another_patients_events() {
    let rx = Receiver::start().await;
    let env = start(config());
    let mut s = subscription("resource-change", &rx.url(), "full-resource", None);
    s["extension"] =
        json!([{"url": PATIENT_CONTEXT_EXT, "valueReference": {"reference": "Patient/p1"}}]);
    put(&env.store, "Subscription", "ctx", s).await;
    wait_for("handshake", 20, || !rx.of_type("handshake").is_empty()).await;
    for i in 0..30 {
        let p = format!("p{}", i % 3);
        put(
            &env.store,
            "Patient",
            &p,
            json!({"active": true, "extension": [{"url": "urn:n", "valueInteger": i}]}),
        )
        .await;
        put(
            &env.store,
            "Observation",
            &format!("o{i}"),
            observation(&format!("Patient/{p}")),
        )
        .await;
        put(
            &env.store,
            "Encounter",
            &format!("e{i}"),
            encounter(&p, "in-progress"),
        )
        .await;
    }
    // p1 gets 10 Patient updates, 10 Observations, 10 Encounters.
    wait_for("p1's 30 events", 30, || rx.events().len() >= 30).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let bundles = rx.of_type("event-notification");
    let mut count = 0;
    for b in &bundles {
        for e in b["entry"].as_array().unwrap().iter().skip(1) {
            count += 1;
            let r = &e["resource"];
            let patient = if r["resourceType"] == "Patient" {
                format!("Patient/{}", r["id"].as_str().unwrap())
            } else {
                r["subject"]["reference"].as_str().unwrap().to_string()
            };
            assert_eq!(patient, "Patient/p1", "another patient's event leaked");
        }
    }
    assert_eq!(count, 30);
    // What went out is in p1's audit report, and in nobody else's.
    let audit = tributary_storage::AuditLog::new(env.db.clone())
        .read_after(0, 100_000)
        .unwrap();
    let notified: Vec<&Value> = audit
        .iter()
        .map(|e| &e.body)
        .filter(|b| b["kind"] == "subscription-notification")
        .collect();
    assert!(!notified.is_empty(), "{audit:?}");
    for b in &notified {
        assert_eq!(b["patient"], "p1", "{b}");
        assert_eq!(b["resource_id"], "ctx", "{b}");
        assert_eq!(b["tenant"], "t1", "{b}");
        assert_eq!(b["content"], "full-resource", "{b}");
        assert_eq!(b["channel"], "rest-hook", "{b}");
    }
    let events: u64 = notified.iter().map(|b| b["events"].as_u64().unwrap()).sum();
    assert_eq!(events, 30, "every delivered event is accounted for once");
    env.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn give_up_dead_letters_and_sets_error_then_recovers() {
    let rx = Receiver::start().await;
    let env = start(SubscriptionsConfig {
        give_up_after_secs: 2,
        retry_initial_ms: 200,
        retry_max_ms: 500,
        ..config()
    });
    put(
        &env.store,
        "Subscription",
        "dl",
        subscription("observation", &rx.url(), "id-only", None),
    )
    .await;
    wait_for("handshake", 20, || !rx.of_type("handshake").is_empty()).await;
    *rx.status.lock().unwrap() = StatusCode::INTERNAL_SERVER_ERROR;
    put(&env.store, "Observation", "o1", observation("Patient/p1")).await;
    wait_for("status error", 30, || {
        stored_subscription(&env, "dl")["status"] == "error"
    })
    .await;
    let (code, dl) = api_get(&env, "/Subscription/$dead-letters").await;
    assert_eq!(code, StatusCode::OK);
    let list = dl["deadLetters"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["subscription"], "dl");
    assert_eq!(list[0]["event_numbers"], json!([1]));
    assert!(list[0]["reason"].as_str().unwrap().contains("500"));
    let (_, st) = api_get(&env, "/Subscription/dl/$status").await;
    let params = st["entry"][0]["resource"]["parameter"]
        .as_array()
        .unwrap()
        .clone();
    assert!(params
        .iter()
        .any(|p| p["name"] == "status" && p["valueCode"] == "error"));
    assert!(params.iter().any(|p| p["name"] == "error"));

    // The endpoint recovers: the next event is delivered (number 2) and the status is active.
    *rx.status.lock().unwrap() = StatusCode::OK;
    put(&env.store, "Observation", "o2", observation("Patient/p1")).await;
    wait_for("event 2", 30, || rx.events().iter().any(|e| e.0 == 2)).await;
    wait_for("status active", 30, || {
        stored_subscription(&env, "dl")["status"] == "active"
    })
    .await;
    env.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_subscription_gets_error_status() {
    let env = start(config());
    let mut s = subscription("no-such-topic", "http://127.0.0.1:9/hook", "id-only", None);
    s["criteria"] = json!("http://example.org/topics/unknown");
    put(&env.store, "Subscription", "bad", s).await;
    wait_for("status error", 20, || {
        let r = stored_subscription(&env, "bad");
        r["status"] == "error"
            && r["error"]
                .as_str()
                .is_some_and(|e| e.contains("not a topic"))
    })
    .await;
    env.shutdown.cancel();
}

/// The journal's messages kept as rejected (at most 10).
fn rejected(
    env: &Env,
) -> Vec<(
    tributary_core::MessageId,
    i64,
    tributary_storage::StateRecord,
)> {
    env.journal
        .list(&ListFilter {
            states: vec![tributary_core::StateKind::Rejected],
            limit: Some(10),
            ..Default::default()
        })
        .unwrap()
}

/// A notification POSTed to partner `ehr`'s hook with `token`.
fn hook_request(b: Value, token: &str) -> Request<Body> {
    Request::post("/subscription-hook/ehr")
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/fhir+json")
        .body(Body::from(serde_json::to_vec(&b).unwrap()))
        .unwrap()
}

/// The SubscriptionStatus entry of a notification from the upstream server at `base`, with
/// `events` (`notification-event` parameters) appended.
fn status_entry(base: &str, kind: &str, events: Value) -> Value {
    let mut params = vec![
        json!({"name": "subscription", "valueReference": {"reference": format!("{base}/fhir/Subscription/9")}}),
        json!({"name": "topic", "valueCanonical": "http://example.org/topics/admission"}),
        json!({"name": "status", "valueCode": "active"}),
        json!({"name": "type", "valueCode": kind}),
    ];
    if let Some(a) = events.as_array() {
        params.extend(a.iter().cloned());
    }
    json!({"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Parameters", "parameter": params}})
}

/// Serves `upstream` (a partner's EHR: token endpoint and FHIR reads) on a free port; its base URL.
async fn serve_upstream(upstream: Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://127.0.0.1:{}", l.local_addr().unwrap().port());
    tokio::spawn(async move { axum::serve(l, upstream).await.unwrap() });
    base
}

/// Inbound partner `name` (tenant `t1`) whose FHIR server is `{base}/fhir` and whose token
/// endpoint is `{base}{token_path}`.
fn partner(name: &str, base: &str, token_path: &str) -> InboundPartner {
    InboundPartner {
        partner: name.into(),
        token: "partner-token-0123456789".into(),
        tenant: "t1".into(),
        upstream_base_url: Some(format!("{base}/fhir")),
        token_url: Some(format!("{base}{token_path}")),
        client_id: Some("tributary".into()),
        client_secret: Some("s3cret".into()),
        scope: None,
    }
}

fn inbound_app(env: &Env, metrics: &tributary_runtime::Metrics) -> Router {
    router(ApiState {
        service: env.service.clone(),
        journal: env.journal.clone(),
        metrics: metrics.clone(),
    })
}

/// Posts `req` to the inbound router: the status and the OperationOutcome's diagnostics (Null
/// for a 200).
async fn hook_answer(app: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let body = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    (status, v["issue"][0]["diagnostics"].clone())
}

/// The journaled inbound messages that were accepted (not kept as rejected), oldest first.
fn accepted_messages(env: &Env) -> Vec<tributary_storage::JournalRecord> {
    env.journal
        .list(&ListFilter {
            limit: Some(20),
            ..Default::default()
        })
        .unwrap()
        .into_iter()
        .filter(|(_, _, r)| r.state.kind() != tributary_core::StateKind::Rejected)
        .map(|(id, _, _)| env.journal.get(id).unwrap().unwrap())
        .collect()
}

/// Subscriptions in: an upstream server's handshake is answered; an id-only notification is
/// completed with the resource fetched (OAuth2 client credentials) and journaled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_notifications_are_fetched_and_journaled() {
    // The upstream EHR: a token endpoint and one Encounter behind a bearer token.
    let upstream = Router::new()
        .route(
            "/token",
            post(|| async {
                Json(json!({"access_token": "up-token", "token_type": "bearer", "expires_in": 300}))
            }),
        )
        .route(
            "/fhir/Encounter/{id}",
            get(
                |headers: axum::http::HeaderMap,
                 axum::extract::Path(id): axum::extract::Path<String>| async move {
                    if headers.get("authorization").and_then(|v| v.to_str().ok())
                        != Some("Bearer up-token")
                    {
                        return (StatusCode::UNAUTHORIZED, Json(json!({})));
                    }
                    (
                        StatusCode::OK,
                        Json(
                            json!({"resourceType": "Encounter", "id": id, "status": "in-progress"}),
                        ),
                    )
                },
            ),
        );
    let base = serve_upstream(upstream).await;

    let env = start(SubscriptionsConfig {
        inbound: vec![InboundPartner {
            scope: Some("system/Encounter.read".into()),
            ..partner("ehr", &base, "/token")
        }],
        ..config()
    });
    let metrics = tributary_runtime::Metrics::default();
    let app = inbound_app(&env, &metrics);
    let status = |kind: &str, events: Value| status_entry(&base, kind, events);
    let handshake = json!({"resourceType": "Bundle", "type": "history", "entry": [status("handshake", json!([]))]});
    let res = app
        .clone()
        .oneshot(hook_request(handshake.clone(), "wrong-token-0123456789"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let res = app
        .clone()
        .oneshot(hook_request(handshake, "partner-token-0123456789"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);

    let event = json!([{"name": "notification-event", "part": [
        {"name": "event-number", "valueString": "7"},
        {"name": "focus", "valueReference": {"reference": format!("{base}/fhir/Encounter/enc-1")}}]}]);
    let note = json!({"resourceType": "Bundle", "type": "history", "entry": [
        status("event-notification", event),
        {"fullUrl": format!("{base}/fhir/Encounter/enc-1"), "request": {"method": "PUT", "url": "Encounter/enc-1"}, "response": {"status": "200"}}
    ]});
    let res = app
        .clone()
        .oneshot(hook_request(note.clone(), "partner-token-0123456789"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // The same notification again (sender retry) is recognised, not journaled twice.
    let res = app
        .clone()
        .oneshot(hook_request(note.clone(), "partner-token-0123456789"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // The same event number with other content (the sender's numbering restarted) is new.
    let mut renumbered = note;
    renumbered["entry"][1]["resource"] = json!({"resourceType": "Encounter", "id": "enc-1",
        "status": "finished", "class": {"code": "IMP"}});
    let res = app
        .clone()
        .oneshot(hook_request(renumbered, "partner-token-0123456789"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);

    // Authenticated but not acceptable: 400 with the reason, and the body kept as rejected.
    let raw = |body: &'static str| {
        Request::post("/subscription-hook/ehr")
            .header("authorization", "Bearer partner-token-0123456789")
            .body(Body::from(body))
            .unwrap()
    };
    for (body, reason) in [
        ("{not json", "body is not JSON"),
        (
            r#"{"resourceType":"Patient"}"#,
            "expected a notification Bundle",
        ),
    ] {
        let res = app.clone().oneshot(raw(body)).await.unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
        let oo: Value = serde_json::from_slice(
            &axum::body::to_bytes(res.into_body(), 1 << 20)
                .await
                .unwrap(),
        )
        .unwrap();
        assert_eq!(oo["resourceType"], "OperationOutcome");
        assert_eq!(oo["issue"][0]["diagnostics"], reason);
    }
    // A focus the partner's server does not hold, or a path that climbs out of its base, is
    // refused without any read (a retry would fail the same way), and kept.
    for focus in [
        "https://elsewhere.example/fhir/Encounter/enc-1".to_string(),
        format!("{base}/fhir/Encounter/../../token"),
        "Encounter/enc-1/../../../token".to_string(),
    ] {
        let event = json!([{"name": "notification-event", "part": [
            {"name": "event-number", "valueString": "8"},
            {"name": "focus", "valueReference": {"reference": focus}}]}]);
        let bad = json!({"resourceType": "Bundle", "type": "history", "entry": [
            status("event-notification", event),
            {"fullUrl": focus, "request": {"method": "PUT", "url": "Encounter/enc-1"}}
        ]});
        let res = app
            .clone()
            .oneshot(hook_request(bad, "partner-token-0123456789"))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{focus}");
        let oo: Value = serde_json::from_slice(
            &axum::body::to_bytes(res.into_body(), 1 << 20)
                .await
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            oo["issue"][0]["diagnostics"],
            "a focus reference is not a resource URL under the partner's base URL"
        );
    }
    let rejected = rejected(&env);
    assert_eq!(rejected.len(), 5, "every refused body is kept");
    let kept: Vec<_> = rejected
        .iter()
        .map(|(id, _, _)| env.journal.get(*id).unwrap().unwrap())
        .collect();
    assert!(kept.iter().any(|r| &r.envelope.payload[..] == b"{not json"));
    assert!(kept.iter().all(|r| r.envelope.partner.as_str() == "ehr"));
    let text = metrics.render(Vec::new());
    for (outcome, n) in [("accepted", 2), ("duplicate", 1), ("rejected", 5)] {
        let line = format!(
            "tributary_ingress_messages_total{{source=\"fhir-subscription\",outcome=\"{outcome}\"}} {n}"
        );
        assert!(text.contains(&line), "{line} in {text}");
    }

    let listed = accepted_messages(&env);
    assert_eq!(
        listed.len(),
        2,
        "handshake not journaled; retry de-duplicated; renumbered event kept"
    );
    let rec = &listed[0];
    assert_eq!(rec.envelope.protocol, tributary_core::Protocol::Fhir);
    assert_eq!(rec.envelope.partner.as_str(), "ehr");
    let journaled: Value = serde_json::from_slice(&rec.envelope.payload).unwrap();
    assert_eq!(
        journaled["entry"][1]["resource"]["id"], "enc-1",
        "id-only completed with the resource"
    );
    // A post to a partner that is not configured: 404, audited without the name it used.
    let res = app
        .clone()
        .oneshot(
            Request::post("/subscription-hook/someone-else")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);

    // Every POST has its ingress audit record, in order, naming the journal entry if any.
    let records: Vec<Value> = tributary_storage::AuditLog::new(env.db.clone())
        .read_after(0, 1000)
        .unwrap()
        .into_iter()
        .map(|e| e.body)
        .filter(|b| b["kind"] == "ingress")
        .collect();
    let seen: Vec<(String, u64, Option<String>)> = records
        .iter()
        .map(|b| {
            assert_eq!(b["protocol"], "fhir-subscription", "{b}");
            (
                b["outcome"].as_str().unwrap().to_string(),
                b["status"].as_u64().unwrap(),
                b["notification"].as_str().map(str::to_string),
            )
        })
        .collect();
    let row = |o: &str, s: u64, n: Option<&str>| (o.to_string(), s, n.map(str::to_string));
    let notification = Some("event-notification");
    assert_eq!(
        seen,
        [
            row("unauthorized", 401, None),
            row("answered", 200, Some("handshake")),
            row("accepted", 200, notification),
            row("duplicate", 200, notification),
            row("accepted", 200, notification),
            row("rejected", 400, None),
            row("rejected", 400, None),
            row("rejected", 400, notification),
            row("rejected", 400, notification),
            row("rejected", 400, notification),
            row("unknown_partner", 404, None),
        ]
    );
    for b in &records[..10] {
        assert_eq!(
            (&b["partner"], &b["tenant"]),
            (&json!("ehr"), &json!("t1")),
            "{b}"
        );
    }
    assert_eq!(records[10]["partner"], Value::Null);
    for b in &records {
        let stored = matches!(
            b["outcome"].as_str(),
            Some("accepted" | "duplicate" | "rejected")
        );
        assert_eq!(b["message_id"].is_string(), stored, "{b}");
        if let Some(id) = b["message_id"].as_str() {
            assert!(
                env.journal.get(id.parse().unwrap()).unwrap().is_some(),
                "{b}"
            );
        }
    }
    let text = serde_json::to_string(&records).unwrap();
    for content in [
        "enc-1",
        "in-progress",
        "partner-token",
        "someone-else",
        "not json",
    ] {
        assert!(!text.contains(content), "audit records hold {content}");
    }
    env.shutdown.cancel();
}

/// Subscriptions in: what is read from the partner is bounded. More id-only entries than are
/// read for one notification, or resources past the size bound, refuse the notification (400,
/// kept as rejected: a retry would fail the same way); a token endpoint whose answer has no end
/// is a 503 (the partner's server is at fault now, a retry may succeed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_reads_from_the_partner_are_bounded() {
    use futures_util::StreamExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let reads = Arc::new(AtomicUsize::new(0));
    let counter = reads.clone();
    // A body of `n` chunks of 64 KiB of spaces, streamed without a length (`None`: no end).
    let spaces = |n: Option<usize>| {
        let chunk = axum::body::Bytes::from(vec![b' '; 64 << 10]);
        let stream = futures_util::stream::iter(std::iter::repeat(chunk))
            .take(n.unwrap_or(usize::MAX))
            .map(Ok::<_, std::io::Error>);
        Body::from_stream(stream)
    };
    let upstream = Router::new()
        .route(
            "/token",
            post(|| async { Json(json!({"access_token": "up-token", "expires_in": 300})) }),
        )
        .route("/endless-token", post(move || async move { spaces(None) }))
        .route(
            "/fhir/Binary/{id}",
            get(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                async move { spaces(None) }
            }),
        );
    let base = serve_upstream(upstream).await;
    let env = start(SubscriptionsConfig {
        inbound: vec![
            partner("ehr", &base, "/token"),
            partner("ehr2", &base, "/endless-token"),
        ],
        ..config()
    });
    let app = inbound_app(&env, &tributary_runtime::Metrics::default());
    let notification = |ids: std::ops::Range<usize>| {
        let mut entries = vec![status_entry(
            &base,
            "event-notification",
            json!([{"name": "notification-event", "part": [
                {"name": "event-number", "valueString": "1"},
                {"name": "focus", "valueReference": {"reference": format!("{base}/fhir/Binary/b{}", ids.start)}}]}]),
        )];
        for i in ids {
            entries.push(json!({"fullUrl": format!("{base}/fhir/Binary/b{i}"), "request": {"method": "PUT", "url": format!("Binary/b{i}")}}));
        }
        json!({"resourceType": "Bundle", "type": "history", "entry": entries})
    };
    let send = |req: Request<Body>| hook_answer(&app, req);

    let (status, why) = send(hook_request(
        notification(0..101),
        "partner-token-0123456789",
    ))
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{why}");
    assert_eq!(
        why,
        "the notification names 101 resources to read; at most 100 are read for one notification"
    );
    assert_eq!(
        reads.load(Ordering::SeqCst),
        0,
        "nothing read for a refused notification"
    );

    let (status, why) = send(hook_request(notification(0..1), "partner-token-0123456789")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{why}");
    assert_eq!(
        why,
        "the resources to read for this notification exceed 33554432 bytes"
    );
    assert_eq!(reads.load(Ordering::SeqCst), 1);

    let mut req = hook_request(notification(0..1), "partner-token-0123456789");
    *req.uri_mut() = "/subscription-hook/ehr2".parse().unwrap();
    let (status, why) = send(req).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{why}");
    assert_eq!(
        why,
        "token endpoint answer not read: response body larger than 65536 bytes"
    );

    let rejected = rejected(&env);
    assert_eq!(rejected.len(), 2, "both refused notifications are kept");
    env.shutdown.cancel();
}

/// Subscriptions in: the partner's access token is requested once and reused; a read refused
/// with 401 renews it once (a token revoked early); a partner that refuses every token is a 503
/// (fix the credentials, the sender retries); a focus the partner's server no longer holds (404,
/// 410) refuses the notification with 400 and keeps it as rejected, since a retry cannot help.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_token_is_reused_renewed_once_and_gone_focus_is_refused() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let issued = Arc::new(AtomicUsize::new(0));
    // The number of the one token the partner's server accepts now (tokens are `tok-<n>`).
    let accepted = Arc::new(AtomicUsize::new(1));
    let (counter, valid) = (issued.clone(), accepted.clone());
    let upstream = Router::new()
        .route(
            "/token",
            post(move || async move {
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                Json(json!({"access_token": format!("tok-{n}"), "expires_in": 3600}))
            }),
        )
        .route(
            "/fhir/Encounter/{id}",
            get(
                move |headers: axum::http::HeaderMap,
                      axum::extract::Path(id): axum::extract::Path<String>| async move {
                    let want = format!("Bearer tok-{}", valid.load(Ordering::SeqCst));
                    if headers.get("authorization").and_then(|v| v.to_str().ok())
                        != Some(want.as_str())
                    {
                        return (StatusCode::UNAUTHORIZED, Json(json!({})));
                    }
                    match id.as_str() {
                        "gone" => (StatusCode::GONE, Json(json!({}))),
                        "missing" => (StatusCode::NOT_FOUND, Json(json!({}))),
                        _ => (
                            StatusCode::OK,
                            Json(json!({"resourceType": "Encounter", "id": id, "status": "finished"})),
                        ),
                    }
                },
            ),
        );
    let base = serve_upstream(upstream).await;
    let env = start(SubscriptionsConfig {
        inbound: vec![partner("ehr", &base, "/token")],
        ..config()
    });
    let app = inbound_app(&env, &tributary_runtime::Metrics::default());
    let send = |number: u64, id: &str| {
        let app = app.clone();
        let focus = format!("{base}/fhir/Encounter/{id}");
        let note = json!({"resourceType": "Bundle", "type": "history", "entry": [
            status_entry(&base, "event-notification", json!([{"name": "notification-event", "part": [
                {"name": "event-number", "valueString": number.to_string()},
                {"name": "focus", "valueReference": {"reference": focus}}]}])),
            {"fullUrl": focus, "request": {"method": "PUT", "url": format!("Encounter/{id}")}}
        ]});
        async move { hook_answer(&app, hook_request(note, "partner-token-0123456789")).await }
    };

    assert_eq!(send(1, "enc-1").await.0, StatusCode::OK);
    assert_eq!(send(2, "enc-2").await.0, StatusCode::OK);
    assert_eq!(issued.load(Ordering::SeqCst), 1, "one token for both reads");

    accepted.store(2, Ordering::SeqCst);
    assert_eq!(send(3, "enc-3").await.0, StatusCode::OK);
    assert_eq!(issued.load(Ordering::SeqCst), 2, "renewed after the 401");

    accepted.store(99, Ordering::SeqCst);
    let (status, why) = send(4, "enc-4").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{why}");
    assert_eq!(
        why,
        "the partner's server refused our credentials (read answered HTTP 401)"
    );
    assert_eq!(
        issued.load(Ordering::SeqCst),
        3,
        "one renewal per read, no more"
    );

    accepted.store(3, Ordering::SeqCst);
    for (n, id, code) in [(5, "gone", 410), (6, "missing", 404)] {
        let (status, why) = send(n, id).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{why}");
        assert_eq!(
            why,
            format!(
                "the partner's server does not hold a focus resource (read answered HTTP {code})"
            )
        );
    }
    assert_eq!(
        rejected(&env).len(),
        2,
        "both refused notifications are kept"
    );
    let journaled: Vec<Value> = accepted_messages(&env)
        .iter()
        .map(|rec| serde_json::from_slice(&rec.envelope.payload).unwrap())
        .collect();
    let ids: Vec<&str> = journaled
        .iter()
        .filter_map(|b| b["entry"][1]["resource"]["id"].as_str())
        .collect();
    assert_eq!(
        ids,
        ["enc-1", "enc-2", "enc-3"],
        "the 503 journaled nothing"
    );
    env.shutdown.cancel();
}

/// A CA in `dir` (`ca.crt`) and an HTTPS receiver with its certificate for `localhost`; with
/// `require_client_cert`, the receiver demands a client certificate issued by that CA.
async fn tls_receiver(dir: &std::path::Path, require_client_cert: bool) -> (Receiver, pki::Pki) {
    let pki = pki::Pki::new("Subscriber Test CA");
    let ca = dir.join("ca.crt");
    pki.write_ca(&ca);
    pki.write(dir, "hook", "localhost", &["localhost"], false);
    let tls = ReloadingAcceptor::new(ListenerTlsConfig {
        cert: dir.join("hook.crt"),
        key: dir.join("hook.key"),
        client_ca: require_client_cert.then_some(ca),
        require_client_cert,
        reload_interval_secs: 0,
    })
    .unwrap();
    (Receiver::start_with(Some(tls)).await, pki)
}

/// Creates Subscription `id` for `rx` under `cfg` (https only, giving up after 1 s) and waits
/// for its handshake to reach the endpoint (`delivered`) or to fail with status `error` and
/// nothing received.
async fn subscribe_over_tls(cfg: SubscriptionsConfig, rx: &Receiver, id: &str, delivered: bool) {
    let env = start(SubscriptionsConfig {
        allow_http_endpoints: false,
        allow_private_endpoints: true,
        give_up_after_secs: 1,
        ..cfg
    });
    put(
        &env.store,
        "Subscription",
        id,
        subscription("observation", &rx.url(), "id-only", None),
    )
    .await;
    if delivered {
        wait_for("the handshake", 20, || !rx.of_type("handshake").is_empty()).await;
        wait_for("the subscription to be active", 20, || {
            stored_subscription(&env, id)["status"] == "active"
        })
        .await;
    } else {
        wait_for("the handshake to fail", 20, || {
            stored_subscription(&env, id)["status"] == "error"
        })
        .await;
        assert!(rx.bundles().is_empty(), "nothing reached the endpoint");
    }
    env.shutdown.cancel();
}

/// `ca_file`: a subscriber endpoint on HTTPS whose certificate comes from a private CA is
/// refused while that CA is not trusted (the handshake fails and the Subscription is in error),
/// and gets its handshake once `ca_file` names the CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_endpoints_under_a_private_ca_need_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let (rx, _) = tls_receiver(dir.path(), false).await;
    subscribe_over_tls(config(), &rx, "untrusted", false).await;
    let trusted = SubscriptionsConfig {
        ca_file: dir.path().join("ca.crt"),
        ..config()
    };
    subscribe_over_tls(trusted, &rx, "trusted", true).await;

    let missing = SubscriptionsConfig {
        ca_file: dir.path().join("no-such.pem"),
        ..config()
    };
    let err = missing.http_client().unwrap_err();
    assert_eq!(err.key, "ca_file");
}

/// `client_identity_file`: a subscriber endpoint that requires a client certificate refuses the
/// handshake without one, and gets it when the certificate (issued by the CA it trusts) is
/// configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_endpoints_get_the_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (rx, pki) = tls_receiver(dir.path(), true).await;
    let (cert, key) = pki.issue("tributary", &["tributary.example.org"], true);
    let identity = dir.path().join("tributary.pem");
    std::fs::write(&identity, cert + &key).unwrap();
    let mtls = |client_identity_file: std::path::PathBuf| SubscriptionsConfig {
        ca_file: dir.path().join("ca.crt"),
        client_identity_file,
        ..config()
    };
    subscribe_over_tls(mtls(std::path::PathBuf::new()), &rx, "anonymous", false).await;
    subscribe_over_tls(mtls(identity), &rx, "identified", true).await;

    let bad = SubscriptionsConfig {
        client_identity_file: dir.path().join("ca.crt"),
        ..config()
    };
    assert_eq!(bad.http_client().unwrap_err().key, "client_identity_file");
}

/// Subscriptions in, when the journal cannot write: the sender gets `503` (retry), nothing is
/// kept or half-kept — a notification it would refuse for its content is not refused for good
/// either, since it could not be kept for inspection — and once the journal writes again its
/// retry is journaled, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_notification_the_journal_cannot_take_gets_503_and_its_retry_is_kept() {
    let base = "http://127.0.0.1:9"; // never contacted: the notification carries its resource
    let env = start(SubscriptionsConfig {
        inbound: vec![partner("ehr", base, "/token")],
        ..config()
    });
    let dir = tempfile::tempdir().unwrap();
    let journal = Arc::new(tributary_testing::failing_journal::FailingJournal::new(
        FjallJournal::new(
            Db::open(dir.path(), DbOptions::default()).unwrap(),
            86_400_000,
        ),
        true,
    ));
    let app = router(ApiState {
        service: env.service.clone(),
        journal: journal.clone(),
        metrics: tributary_runtime::Metrics::default(),
    });
    let focus = format!("{base}/fhir/Encounter/enc-9");
    let event = json!([{"name": "notification-event", "part": [
        {"name": "event-number", "valueString": "1"},
        {"name": "focus", "valueReference": {"reference": focus}}]}]);
    let note = json!({"resourceType": "Bundle", "type": "history", "entry": [
        status_entry(base, "event-notification", event),
        {"fullUrl": focus, "resource": {"resourceType": "Encounter", "id": "enc-9", "status": "in-progress"},
         "request": {"method": "PUT", "url": "Encounter/enc-9"}, "response": {"status": "200"}}
    ]});
    let token = "partner-token-0123456789";
    let (status, why) = hook_answer(&app, hook_request(note.clone(), token)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{why}");
    assert_eq!(why, "journal unavailable");
    let (status, why) = hook_answer(
        &app,
        hook_request(json!({"resourceType": "Patient"}), token),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{why}");
    let all = ListFilter::default();
    assert!(journal.list(&all).unwrap().is_empty());

    journal.set_failing(false);
    for _ in 0..2 {
        let (status, why) = hook_answer(&app, hook_request(note.clone(), token)).await;
        assert_eq!(status, StatusCode::OK, "{why}");
    }
    assert_eq!(journal.list(&all).unwrap().len(), 1, "the retry, once");
    env.shutdown.cancel();
}
