//! FHIR Subscriptions through the real binary: a client creates a Subscription through the
//! facade with a SMART token, receives the handshake and heartbeats, then HL7 messages sent over
//! MLLP are mapped and committed, and only matching changes (Observations) are notified.
//! Skips without the shared corpus.

mod events_common;
#[path = "../../adapters/fhir-subscriptions/tests/common/hook.rs"]
mod hook;

use events_common::{
    free_addr, get_json, issue_token, kind, observation_subscription, post_fhir, repo_root,
    token_config, Server,
};
use hook::start_hook;
use serde_json::{json, Value};
use tributary_mllp::sink::{MllpSender, MllpSenderConfig};

type Check = Box<dyn Fn(&[Value]) -> bool + Send>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smart_client_subscribes_and_gets_matching_notifications_only() {
    let corpus = repo_root().join("../shared/corpus/hl7v2");
    let oru = corpus.join("linuxforhealth/ORU-multiline-short.hl7");
    let adt = corpus.join("linuxforhealth/sample_unix.hl7");
    if !oru.is_file() || !adt.is_file() {
        eprintln!(
            "SKIP smart_client_subscribes_and_gets_matching_notifications_only: corpus absent"
        );
        return;
    }
    // The subscriber's endpoint.
    let (got, hook) = start_hook().await;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let extra =
        "[subscriptions]\nallow_http_endpoints = true\nallow_private_endpoints = true\nmin_heartbeat_secs = 1\nrescan_secs = 1\n";
    // A SMART token (system scope) signed by the data directory's local key.
    let token = issue_token(&token_config(&data), "care-app", "system/*.cruds", None);

    let mllp = free_addr();
    let server = Server::start_with_mllp(&data, extra, Some(mllp));
    let http = reqwest::Client::new();
    let base = format!("http://{}/fhir", server.http);
    let sub = observation_subscription("rest-hook", Some(&hook), "id-only");
    // Without a token: refused.
    let res = http
        .post(format!("{base}/Subscription"))
        .json(&sub)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 401);
    let res = post_fhir(&http, &base, &token, "Subscription", &sub).await;
    let created: Value = res.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_string();

    let wait = |what: &'static str, f: Check| {
        let got = got.clone();
        async move {
            tributary_e2e::wait(what)
                .until_async(|| async { f(&got.lock().unwrap()).then_some(()) })
                .await
        }
    };
    wait(
        "handshake",
        Box::new(|g| g.iter().any(|b| kind(b) == "handshake")),
    )
    .await;
    wait(
        "heartbeat",
        Box::new(|g| g.iter().any(|b| kind(b) == "heartbeat")),
    )
    .await;

    // An ADT (Patient/Encounter changes: not this topic) and an ORU (Observations: notified).
    let mut sender = MllpSender::new(MllpSenderConfig::new(mllp.to_string()));
    for f in [&adt, &oru] {
        sender.send_once(&std::fs::read(f).unwrap()).await.unwrap();
    }
    wait(
        "an event notification",
        Box::new(|g| g.iter().any(|b| kind(b) == "event-notification")),
    )
    .await;
    // Then a marker Observation, changed after both messages were committed: notifications
    // follow the outbox order, so once it is notified every change before it was looked at.
    let metrics = server.http.to_string();
    tributary_e2e::wait("the pipeline to finish both messages")
        .until_async(|| async { (tributary_e2e::pipeline_finished(&metrics) >= 2.0).then_some(()) })
        .await;
    let marker = json!({"resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": "Patient/marker"}});
    let res = post_fhir(&http, &base, &token, "Observation", &marker).await;
    let marker: Value = res.json().await.unwrap();
    let marker = format!("/Observation/{}", marker["id"].as_str().unwrap());
    let focus = |g: &[Value]| -> Vec<String> {
        g.iter()
            .filter(|b| kind(b) == "event-notification")
            .flat_map(|b| b["entry"].as_array().unwrap().iter().skip(1))
            .map(|e| e["fullUrl"].as_str().unwrap().to_string())
            .collect()
    };
    let m = marker.clone();
    wait(
        "the marker's notification",
        Box::new(move |g| focus(g).iter().any(|u| u.ends_with(&m))),
    )
    .await;
    let focus = focus(&got.lock().unwrap());
    assert!(
        focus.iter().any(|u| !u.ends_with(&marker)),
        "the ORU's Observations are notified: {focus:?}"
    );
    assert!(
        focus.iter().all(|u| u.contains("/Observation/")),
        "only Observations are notified: {focus:?}"
    );
    // $status and $events sit behind the facade's policy stack: no token, no answer — and a
    // client-supplied tenant header does not open a door either.
    for op in ["$status", "$events"] {
        let res = http
            .get(format!("{base}/Subscription/{id}/{op}"))
            .header("x-tributary-tenant", "default")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 401, "{op} without a token");
    }
    // $status through the facade's policy stack, with the token.
    let st = get_json(&http, &format!("{base}/Subscription/{id}/$status"), &token).await;
    let params = st["entry"][0]["resource"]["parameter"]
        .as_array()
        .unwrap()
        .clone();
    assert!(params
        .iter()
        .any(|p| p["name"] == "status" && p["valueCode"] == "active"));
    // The CapabilityStatement names the topics and the Subscription operations (Backport IG).
    let cap = get_json(&http, &format!("{base}/metadata"), &token).await;
    let sub_entry = cap["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Subscription")
        .unwrap()
        .clone();
    let topics: Vec<&str> = sub_entry["extension"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| {
            x["url"]
                .as_str()
                .unwrap()
                .ends_with("capabilitystatement-subscriptiontopic-canonical")
        })
        .map(|x| x["valueCanonical"].as_str().unwrap())
        .collect();
    let topic = sub["criteria"].as_str().unwrap().to_string();
    assert!(
        topics.contains(&topic.as_str()),
        "{topic} not in {topics:?}"
    );
    let ops: Vec<&str> = sub_entry["operation"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(ops, ["status", "events", "get-ws-binding-token"]);
    // $events hands out the same events again: each of their patients' audit reports lists it,
    // as it lists a delivered notification.
    let ev = get_json(&http, &format!("{base}/Subscription/{id}/$events"), &token).await;
    assert_eq!(ev["type"], "history", "{ev}");
    eprintln!(
        "{} Observation notifications after handshake and heartbeat",
        focus.len()
    );
    server.stop();
    let out = std::process::Command::new(tributary_e2e::tributary_bin())
        .args(["audit", "export", "--config"])
        .arg(token_config(&data))
        .output()
        .unwrap();
    let exported = tributary_e2e::succeeded(out);
    let catch_up: Vec<Value> = exported
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["body"].clone())
        .filter(|b| b["resource_type"] == "Subscription" && b["resource_id"] == id.as_str())
        .filter(|b| b["interaction"] != "notify" && b["kind"] == "fhir-disclosure")
        .collect();
    let mut patients: Vec<&str> = catch_up
        .iter()
        .map(|b| {
            assert_eq!(
                (&b["client"], &b["status"]),
                (&json!("care-app"), &json!(200))
            );
            b["patient"].as_str().unwrap()
        })
        .collect();
    patients.sort_unstable();
    assert!(
        patients.contains(&"marker") && patients.len() >= 2,
        "$events is in the marker's and the ORU patient's reports: {patients:?}"
    );
}
