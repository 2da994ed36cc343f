//! Outbox retention with FHIR Subscriptions through the real binary: with `[subscriptions]`
//! and a one-second `outbox.max_age_secs`, events a subscription has been notified of are
//! pruned from the data directory; later events keep counting (also across a restart),
//! `$status` stays right and `$events` for the pruned numbers answers 410 Gone with an
//! OperationOutcome.

mod events_common;
#[path = "../../adapters/fhir-subscriptions/tests/common/hook.rs"]
mod hook;

use events_common::{
    get_json, issue_token, kind, observation_subscription, post_fhir, token_config, Server,
};
use hook::{notified, start_hook};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use tributary_storage::{Db, DbOptions, FjallStore, Store};
use tributary_subscriptions::bundle::read_status;

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..300 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

/// POSTs an Observation; returns its id.
async fn observe(http: &reqwest::Client, base: &str, token: &str) -> String {
    let obs = json!({"resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": "Patient/p1"}});
    let res = post_fhir(http, base, token, "Observation", &obs).await;
    let body: Value = res.json().await.unwrap();
    body["id"].as_str().unwrap().to_string()
}

fn ends_with(focus: &Option<String>, id: &str) -> bool {
    focus
        .as_deref()
        .is_some_and(|f| f.ends_with(&format!("/Observation/{id}")))
}

fn events_since_start(status: &Value) -> Option<String> {
    status["entry"][0]["resource"]["parameter"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == "events-since-subscription-start")
        .and_then(|p| p["valueString"].as_str().map(str::to_string))
}

/// Resource ids of the Observation events left in the stopped server's outbox.
fn observations_left(data: &Path) -> Vec<String> {
    let store = FjallStore::new(Db::open(data, DbOptions::default()).unwrap());
    store
        .outbox()
        .read_after(0, 100_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.resource_type.as_deref() == Some("Observation"))
        .filter_map(|e| e.resource_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_with_retention_prune_and_keep_counting() {
    let (got, hook) = start_hook().await;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = issue_token(&token_config(&data), "care-app", "system/*.cruds", None);
    let extra = "[outbox]\nmax_age_secs = 1\nprune_interval_secs = 1\n[subscriptions]\nallow_http_endpoints = true\nallow_private_endpoints = true\nmin_heartbeat_secs = 1\nrescan_secs = 1\n";
    let server = Server::start(&data, extra);
    let http = reqwest::Client::new();
    let base = format!("http://{}/fhir", server.http);
    let sub = observation_subscription("rest-hook", Some(&hook), "id-only");
    let created: Value = post_fhir(&http, &base, &token, "Subscription", &sub)
        .await
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    wait_for("the handshake", || {
        got.lock().unwrap().iter().any(|b| kind(b) == "handshake")
    })
    .await;

    let mut old = Vec::new();
    for _ in 0..3 {
        old.push(observe(&http, &base, &token).await);
    }
    wait_for("three events", || notified(&got).len() >= 3).await;
    let first = notified(&got);
    for (i, o) in old.iter().enumerate() {
        assert_eq!(first[i].0, i as u64 + 1);
        assert!(ends_with(&first[i].1, o), "{first:?}");
    }

    // Once pruned, `$events` for them says so.
    let events_url = format!("{base}/Subscription/{id}/$events");
    let mut gone = None;
    for _ in 0..200 {
        let res = http
            .get(&events_url)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        if res.status().as_u16() == 410 {
            gone = Some(res.json::<Value>().await.unwrap());
            break;
        }
        assert_eq!(res.status().as_u16(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let oo = gone.expect("the delivered events were pruned within 20 s");
    assert_eq!(oo["resourceType"], "OperationOutcome");
    let text = oo["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(text.contains("events 1 to 3"), "{text}");
    assert!(text.contains("retention"), "{text}");

    // New events: numbers 4 and 5, `$status` 5, `$events` from 4 has them.
    let mut new = Vec::new();
    for _ in 0..2 {
        new.push(observe(&http, &base, &token).await);
    }
    wait_for("two more events", || notified(&got).len() >= 5).await;
    let later = notified(&got);
    assert_eq!((later[3].0, later[4].0), (4, 5), "{later:?}");
    assert!(ends_with(&later[3].1, &new[0]) && ends_with(&later[4].1, &new[1]));
    let st = get_json(&http, &format!("{base}/Subscription/{id}/$status"), &token).await;
    assert_eq!(events_since_start(&st).as_deref(), Some("5"));
    let ev = get_json(&http, &format!("{events_url}?eventsSinceNumber=4"), &token).await;
    let listed = read_status(&ev).unwrap().1;
    assert_eq!(
        listed.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![4, 5],
        "{listed:?}"
    );
    server.stop();
    let left = observations_left(&data);
    assert!(
        old.iter().all(|o| !left.contains(o)),
        "the delivered old events are gone from the data directory: {left:?}"
    );

    // After a restart numbering goes on from the record.
    let server = Server::start(&data, extra);
    let base = format!("http://{}/fhir", server.http);
    let last = observe(&http, &base, &token).await;
    wait_for("the event after the restart", || notified(&got).len() >= 6).await;
    let after = notified(&got);
    assert_eq!(after[5].0, 6, "{after:?}");
    assert!(ends_with(&after[5].1, &last));
    let st = get_json(&http, &format!("{base}/Subscription/{id}/$status"), &token).await;
    assert_eq!(events_since_start(&st).as_deref(), Some("6"));
    server.stop();
}
