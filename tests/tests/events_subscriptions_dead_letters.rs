//! Dead letters of FHIR Subscriptions are kept in the data directory: a notification the
//! subscriber's endpoint keeps refusing is dead-lettered after `give_up_after_secs`, is listed by
//! `$dead-letters`, and is still listed after the real binary is stopped and started again.

mod events_common;

use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use events_common::{get_json, issue_token, post_fhir, token_config, Server};
use serde_json::{json, Value};
use std::time::Duration;

/// Accepts the handshake, refuses every other notification (HTTP 500).
async fn hook(Json(b): Json<Value>) -> StatusCode {
    let handshake = b["entry"][0]["resource"]["parameter"]
        .as_array()
        .is_some_and(|ps| {
            ps.iter()
                .any(|p| p["name"] == "type" && p["valueCode"] == "handshake")
        });
    if handshake {
        StatusCode::OK
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    }
}

async fn dead_letters(http: &reqwest::Client, base: &str, token: &str) -> Vec<Value> {
    let v = get_json(http, &format!("{base}/Subscription/$dead-letters"), token).await;
    v["deadLetters"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_survive_a_restart() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/hook", l.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(l, Router::new().route("/hook", post(hook)))
            .await
            .unwrap()
    });

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = issue_token(&token_config(&data), "ops", "system/*.cruds", None);

    let extra = "[subscriptions]\nallow_http_endpoints = true\nallow_private_endpoints = true\nrescan_secs = 1\ngive_up_after_secs = 2\nretry_initial_ms = 200\nretry_max_ms = 500\n";
    let server = Server::start(&data, extra);
    let base = format!("http://{}/fhir", server.http);
    let http = reqwest::Client::new();
    let post_json = |rtype: &'static str, body: Value| {
        let (http, base, token) = (&http, &base, &token);
        async move {
            let res = post_fhir(http, base, token, rtype, &body).await;
            res.json::<Value>().await.unwrap()
        }
    };
    let sub = post_json(
        "Subscription",
        json!({
            "resourceType": "Subscription", "status": "requested", "reason": "test",
            "criteria": "http://tributary.dev/fhir/SubscriptionTopic/observation",
            "channel": {"type": "rest-hook", "endpoint": endpoint, "payload": "application/fhir+json"}
        }),
    )
    .await;
    let id = sub["id"].as_str().unwrap().to_string();
    // Wait until the handshake made it active, then raise an event the endpoint refuses.
    for i in 0.. {
        let v: Value = http
            .get(format!("{base}/Subscription/{id}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["status"] == "active" {
            break;
        }
        assert!(i < 200, "subscription never became active: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(dead_letters(&http, &base, &token).await.is_empty());
    post_json(
        "Observation",
        json!({"resourceType": "Observation", "status": "final",
               "code": {"text": "x"}, "subject": {"reference": "Patient/p1"}}),
    )
    .await;
    let mut before = Vec::new();
    for _ in 0..300 {
        before = dead_letters(&http, &base, &token).await;
        if !before.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(before.len(), 1, "one dead letter: {before:?}");
    assert_eq!(before[0]["subscription"], id.as_str());
    assert!(before[0]["reason"].as_str().unwrap().contains("500"));
    server.stop();

    let server = Server::start(&data, extra);
    let base = format!("http://{}/fhir", server.http);
    let after = dead_letters(&http, &base, &token).await;
    assert_eq!(after, before, "dead letters survive the restart");
    server.stop();
}
