//! A subscriber's endpoint down for two minutes, against the real binary: a client subscribes
//! through the facade with a SMART token, its endpoint's port closes, HL7 results keep arriving
//! over MLLP, and halfway through the outage Tributary itself is killed with SIGKILL and
//! started again on the same data directory. When the endpoint returns it receives every event,
//! numbered without gaps, each once, one per Observation in the store.
//! `SUBS_OUTAGE_SECS` sets the outage (default 120 s: the issue's two minutes).

mod events_common;
#[path = "../../adapters/fhir-subscriptions/tests/common/receiver.rs"]
mod receiver;

use events_common::{
    free_addr, get_json, issue_token, observation_subscription, post_fhir, token_config, Server,
};
use receiver::{Receiver, RECEIVER_AUTH};
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use tributary_mllp::sink::{MllpSender, MllpSenderConfig};

/// Our own ORU^R01: three patients in turn, one order and one result per message.
fn result_message(n: usize) -> Vec<u8> {
    format!(
        "MSH|^~\\&|OUTAGE|LAB|TRIB|HIE|20240101120000||ORU^R01^ORU_R01|OUT-{n}|P|2.5.1\rPID|1||OUT{}^^^HOSP^MR||OUTAGE^PATIENT\rOBR|1||ORD{n}|GLU^Glucose\rOBX|1|NM|GLU^Glucose||{}|mg/dL\r",
        n % 3,
        90 + n % 50
    )
    .into_bytes()
}

fn parameter<'a>(status: &'a Value, name: &str) -> Option<&'a str> {
    status["entry"][0]["resource"]["parameter"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)?["valueString"]
        .as_str()
}

/// Every Observation id in the store, following `next` links.
async fn observation_ids(http: &reqwest::Client, base: &str, token: &str) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    let mut url = Some(format!("{base}/Observation?_count=100&_elements=status"));
    while let Some(u) = url {
        let page = get_json(http, &u, token).await;
        for e in page["entry"].as_array().into_iter().flatten() {
            ids.insert(e["resource"]["id"].as_str().unwrap().to_string());
        }
        url = page["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["relation"] == "next")
            .map(|l| l["url"].as_str().unwrap().to_string());
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_down_two_minutes_across_a_kill_9_receives_every_event_once() {
    let outage = std::env::var("SUBS_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120u64);
    let mut rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let extra = "[subscriptions]\nallow_http_endpoints = true\nallow_private_endpoints = true\nrescan_secs = 1\nretry_initial_ms = 200\nretry_max_ms = 5000\n";
    let token = issue_token(&token_config(&data), "care-app", "system/*.cruds", None);
    let mllp = free_addr();
    let mut server = Server::start_with_mllp(&data, extra, Some(mllp));
    let http = reqwest::Client::new();
    let base = |s: &Server| format!("http://{}/fhir", s.http);

    let mut sub = observation_subscription("rest-hook", Some(&rx.url()), "id-only");
    sub["channel"]["header"] = serde_json::json!([format!("Authorization: {RECEIVER_AUTH}")]);
    let res = post_fhir(&http, &base(&server), &token, "Subscription", &sub).await;
    let id = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    tributary_e2e::wait("the handshake")
        .until_async(|| async { (!rx.of_type("handshake").is_empty()).then_some(()) })
        .await;
    rx.down();

    let began = Instant::now();
    let mut sender = MllpSender::new(MllpSenderConfig::new(mllp.to_string()));
    let mut killed = false;
    let mut n = 0;
    while began.elapsed() < Duration::from_secs(outage) {
        if !killed && began.elapsed() >= Duration::from_secs(outage / 2) {
            server.kill9();
            server = Server::start_with_mllp(&data, extra, Some(mllp));
            sender = MllpSender::new(MllpSenderConfig::new(mllp.to_string()));
            killed = true;
        }
        let ack = sender.send_once(&result_message(n)).await.unwrap();
        assert!(
            String::from_utf8_lossy(&ack).contains("MSA|AA"),
            "message {n} accepted"
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(killed, "the outage spans the restart");

    // Every message mapped and committed: one Observation each.
    let token_ref = &token;
    let url = format!("{}/Observation?_summary=count", base(&server));
    tributary_e2e::wait("every result committed")
        .until_async(|| {
            let (http, url) = (&http, &url);
            async move {
                let c = get_json(http, url, token_ref).await;
                (c["total"].as_u64() == Some(n as u64)).then_some(())
            }
        })
        .await;
    assert!(rx.events().is_empty(), "nothing delivered while down");
    let status = get_json(
        &http,
        &format!("{}/Subscription/{id}/$status", base(&server)),
        &token,
    )
    .await;
    let happened: u64 = parameter(&status, "events-since-subscription-start")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(happened, n as u64, "one event per result: {status}");

    rx.up().await;
    tributary_e2e::wait("every event after the outage")
        .within(Duration::from_secs(120))
        .until_async(|| async { (rx.events().len() as u64 >= happened).then_some(()) })
        .await;
    // A moment more, for a duplicate to show if one were coming.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events = rx.events();
    let numbers: Vec<u64> = events.iter().map(|e| e.0).collect();
    assert_eq!(
        numbers,
        (1..=happened).collect::<Vec<_>>(),
        "no gaps, no duplicates, in order"
    );
    let notified: BTreeSet<String> = events
        .iter()
        .map(|(_, f)| {
            let f = f.as_deref().expect("id-only events name their focus");
            f.rsplit_once("/Observation/").unwrap().1.to_string()
        })
        .collect();
    let stored = observation_ids(&http, &base(&server), &token).await;
    assert_eq!(
        notified.len(),
        events.len(),
        "each Observation notified once"
    );
    assert_eq!(notified, stored, "every stored Observation notified");
    eprintln!(
        "{n} results over a {outage} s endpoint outage with a kill -9 halfway: {} events delivered once each, in order",
        events.len()
    );
    server.stop();
}
