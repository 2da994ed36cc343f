//! The Subscriptions Backport IG examples in `../shared/corpus/fhir/subscriptions-backport/`
//! parse with our reader, and the notifications we build have the same shape. Skips when the
//! corpus is absent.

use serde_json::{json, Value};
use std::path::PathBuf;
use tributary_storage::OutboxEvent;
use tributary_subscriptions::bundle::{
    notification_bundle, read_status, status_bundle, NotificationType, NumberedEvent, StatusInfo,
};
use tributary_subscriptions::model::{Content, SubscriptionSpec, TOPIC_BASE};

fn corpus() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/corpus/fhir/subscriptions-backport");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("SKIP: {} not found", dir.display());
        None
    }
}

fn load(dir: &std::path::Path, name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join(name)).unwrap()).unwrap()
}

/// Structure without values: object keys (sorted) and, for arrays, the shape of each item.
fn shape(v: &Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
        Value::Array(a) => Value::Array(a.iter().map(shape).collect()),
        Value::String(_) => json!("string"),
        Value::Number(_) => json!("number"),
        Value::Bool(_) => json!("bool"),
        Value::Null => json!("null"),
    }
}

fn keys(v: &Value) -> Vec<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

fn param_names(bundle: &Value) -> Vec<String> {
    bundle["entry"][0]["resource"]["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

fn spec(content: Content) -> SubscriptionSpec {
    let mut r = json!({
        "resourceType": "Subscription", "status": "active",
        "criteria": format!("{TOPIC_BASE}/patient-admission"),
        "channel": {"type": "rest-hook", "endpoint": "https://client.example/hook", "payload": "application/fhir+json"}
    });
    r["channel"]["_payload"] = json!({"extension": [{"url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content", "valueCode": content.code()}]});
    SubscriptionSpec::parse("t1", "123", 1, &r, false).unwrap()
}

fn encounter_event() -> OutboxEvent {
    OutboxEvent {
        seq: 5,
        event_id: "ev".into(),
        tenant: "t1".into(),
        event_type: "fhir.Encounter.create".into(),
        resource_type: Some("Encounter".into()),
        resource_id: Some("86009987".into()),
        version: Some(1),
        patient_id: Some("p1".into()),
        other_patients: Vec::new(),
        source_message: None,
        mapping_version: None,
        occurred_at: 1_590_770_653_188,
        resource: Some(
            json!({"resourceType": "Encounter", "id": "86009987", "status": "in-progress"}),
        ),
    }
}

#[test]
fn corpus_subscriptions_parse() {
    let Some(dir) = corpus() else { return };
    for name in [
        "docs_Subscription_id-only.json",
        "docs_Subscription_full-resource.json",
        "docs_Subscription_empty.json",
        "subscription_resource_example.json",
    ] {
        let mut r = load(&dir, name);
        // Their topics are other servers'; ours are what we accept.
        r["criteria"] = json!(format!("{TOPIC_BASE}/patient-admission"));
        let s = SubscriptionSpec::parse("t1", "x", 1, &r, true)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected = match name {
            "docs_Subscription_empty.json" => Content::Empty,
            "docs_Subscription_id-only.json" => Content::IdOnly,
            _ => Content::FullResource,
        };
        assert_eq!(s.content, expected, "{name}");
    }
    let s = SubscriptionSpec::parse(
        "t1",
        "x",
        1,
        &{
            let mut r = load(&dir, "docs_Subscription_id-only.json");
            r["criteria"] = json!(format!("{TOPIC_BASE}/patient-admission"));
            r
        },
        true,
    )
    .unwrap();
    assert_eq!(s.content, Content::IdOnly);
    assert_eq!(s.timeout_secs, Some(60));
    assert_eq!(s.max_count, Some(20));
    assert_eq!(s.filters[0].value, "Patient/123");
}

#[test]
fn corpus_notifications_read_and_ours_have_the_same_shape() {
    let Some(dir) = corpus() else { return };
    let ev = encounter_event();
    let events = [NumberedEvent {
        number: 1,
        event: &ev,
    }];
    for (file, kind, content, n) in [
        (
            "handshake_bundle_example.json",
            NotificationType::Handshake,
            Content::IdOnly,
            0,
        ),
        (
            "heartbeat_bundle_example.json",
            NotificationType::Heartbeat,
            Content::IdOnly,
            0,
        ),
        (
            "id_only_notification_bundle_example.json",
            NotificationType::EventNotification,
            Content::IdOnly,
            1,
        ),
        (
            "full_resource_notification_bundle_example.json",
            NotificationType::EventNotification,
            Content::FullResource,
            1,
        ),
        (
            "empty_notification_bundle_example.json",
            NotificationType::EventNotification,
            Content::Empty,
            1,
        ),
    ] {
        let theirs = load(&dir, file);
        let (their_kind, their_events) = read_status(&theirs).unwrap_or_else(|| panic!("{file}"));
        assert_eq!(their_kind, kind.code(), "{file}");
        let spec = spec(content);
        let info = StatusInfo {
            base_url: "https://fhirserver.org/fhir",
            spec: &spec,
            status: "active",
            events_since_start: n,
            error: None,
        };
        let evs: &[NumberedEvent<'_>] = if n == 0 { &[] } else { &events };
        let ours = notification_bundle(&info, kind, evs, content);
        // Same top-level shape and same entries (count, keys) as the IG example.
        assert_eq!(keys(&ours), keys(&theirs), "{file}: Bundle keys");
        assert_eq!(ours["type"], theirs["type"], "{file}");
        assert_eq!(ours["meta"], theirs["meta"], "{file}: profile");
        let (oe, te) = (
            ours["entry"].as_array().unwrap(),
            theirs["entry"].as_array().unwrap(),
        );
        assert_eq!(oe.len(), te.len(), "{file}: entry count");
        for (o, t) in oe.iter().zip(te) {
            assert_eq!(keys(o), keys(t), "{file}: entry keys");
            assert_eq!(
                shape(&o["request"]),
                shape(&t["request"]),
                "{file}: request"
            );
            assert_eq!(
                shape(&o["response"]),
                shape(&t["response"]),
                "{file}: response"
            );
        }
        assert_eq!(
            oe[0]["resource"]["meta"], te[0]["resource"]["meta"],
            "{file}: status profile"
        );
        // Their parameters, in their order, are ours too (the IG's examples may add optional ones).
        let ours_p = param_names(&ours);
        let theirs_p: Vec<String> = param_names(&theirs);
        assert_eq!(ours_p, theirs_p, "{file}: SubscriptionStatus parameters");
        let (_, our_events) = read_status(&ours).unwrap();
        assert_eq!(our_events.len(), their_events.len(), "{file}");
        assert_eq!(
            our_events.iter().map(|e| e.1.is_some()).collect::<Vec<_>>(),
            their_events
                .iter()
                .map(|e| e.1.is_some())
                .collect::<Vec<_>>(),
            "{file}: focus present iff not empty"
        );
    }
}

#[test]
fn corpus_status_bundle_shape() {
    let Some(dir) = corpus() else { return };
    let theirs = load(&dir, "subscription_status_example.json");
    let spec = spec(Content::IdOnly);
    let ours = status_bundle(&StatusInfo {
        base_url: "https://example.org/fhir",
        spec: &spec,
        status: "active",
        events_since_start: 2,
        error: None,
    });
    assert_eq!(ours["type"], theirs["type"]);
    assert_eq!(ours["total"], theirs["total"]);
    assert_eq!(
        ours["entry"][0]["resource"]["meta"],
        theirs["entry"][0]["resource"]["meta"]
    );
}
