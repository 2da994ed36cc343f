//! Subscriptions in, end to end on the running binary: an upstream server's full-resource
//! notification posted to the hook is journaled, taken by the pipeline's FHIR pass-through
//! mapping, and readable through the facade under our ids with its references rewritten —
//! like any other feed. Sent again, it changes nothing; a later notification that the Encounter
//! was deleted deletes ours.

mod mllp_common;

use mllp_common::*;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

const PARTNER_TOKEN: &str = "partner-token-0123456789";

fn notification(event_number: u64) -> Value {
    json!({"resourceType": "Bundle", "type": "history", "entry": [
        {"fullUrl": "urn:uuid:status", "resource": {"resourceType": "Parameters", "parameter": [
            {"name": "subscription", "valueReference": {"reference": "https://ehr.example/fhir/Subscription/9"}},
            {"name": "topic", "valueCanonical": "http://example.org/topics/admission"},
            {"name": "status", "valueCode": "active"},
            {"name": "type", "valueCode": "event-notification"},
            {"name": "notification-event", "part": [
                {"name": "event-number", "valueString": event_number.to_string()},
                {"name": "focus", "valueReference": {"reference": "https://ehr.example/fhir/Encounter/enc-1"}}]}]}},
        {"fullUrl": "https://ehr.example/fhir/Patient/pat-1",
            "resource": {"resourceType": "Patient", "id": "pat-1", "gender": "female"}},
        {"fullUrl": "https://ehr.example/fhir/Encounter/enc-1",
            "resource": {"resourceType": "Encounter", "id": "enc-1", "status": "in-progress",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
                "subject": {"reference": "https://ehr.example/fhir/Patient/pat-1"}}}
    ]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_from_upstream_reaches_the_store_through_the_pipeline() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let config = data.with_extension("toml");
    let extra = format!(
        "[mapping]\ndir = {:?}\n[subscriptions]\n[[subscriptions.inbound]]\npartner = \"ehr\"\ntoken = \"{PARTNER_TOKEN}\"\n",
        tributary_e2e::repo_root().join("mappings").display().to_string()
    );
    let server = Server::start(&data, &tmp.path().join("serve.log"), &extra, &[]);
    let base = format!("http://{}", server.http);
    let http = reqwest::Client::new();
    for number in [1, 1] {
        let res = http
            .post(format!("{base}/fhir/subscription-hook/ehr"))
            .bearer_auth(PARTNER_TOKEN)
            .json(&notification(number))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    }

    let token = tributary_e2e::issued_token(
        Command::new(tributary_e2e::tributary_bin())
            .args([
                "token",
                "issue",
                "--client",
                "care-app",
                "--scope",
                "user/*.rs",
                "--config",
            ])
            .arg(&config)
            .output()
            .unwrap(),
    );
    let patient = tributary_core::deterministic_id(&["default", "ehr", "Patient", "pat-1"]);
    let encounter = tributary_core::deterministic_id(&["default", "ehr", "Encounter", "enc-1"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let enc: Value = loop {
        let res = http
            .get(format!("{base}/fhir/Encounter/{encounter}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        if res.status() == 200 {
            break res.json().await.unwrap();
        }
        assert!(Instant::now() < deadline, "never stored: {}", res.status());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(enc["subject"]["reference"], format!("Patient/{patient}"));
    assert_eq!(
        enc["meta"]["source"],
        "https://ehr.example/fhir/Encounter/enc-1"
    );
    assert_eq!(enc["meta"]["versionId"], "1");
    let p: Value = http
        .get(format!("{base}/fhir/Patient/{patient}"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(p["gender"], "female");

    // the upstream server deletes the Encounter: ours goes too (410 Gone), the Patient stays
    let mut deletion = notification(2);
    deletion["entry"].as_array_mut().unwrap().truncate(1);
    deletion["entry"].as_array_mut().unwrap().push(json!({
        "fullUrl": "https://ehr.example/fhir/Encounter/enc-1",
        "request": {"method": "DELETE", "url": "Encounter/enc-1"},
        "response": {"status": "204"}}));
    let res = http
        .post(format!("{base}/fhir/subscription-hook/ehr"))
        .bearer_auth(PARTNER_TOKEN)
        .json(&deletion)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = http
            .get(format!("{base}/fhir/Encounter/{encounter}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .status();
        if status == 410 {
            break;
        }
        assert!(Instant::now() < deadline, "never deleted: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = http
        .get(format!("{base}/fhir/Patient/{patient}"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    server.stop();

    // one journal entry per notification (the resend was recognised), each committed by the
    // pass-through mapping
    let records = journal_records(&data);
    assert_eq!(records.len(), 2);
    for r in &records {
        assert_eq!(r.state.state, tributary_core::MessageState::Committed);
        assert_eq!(
            r.state.mapping_version.as_deref(),
            Some(tributary_pipeline::fhir::VERSION)
        );
    }
}
