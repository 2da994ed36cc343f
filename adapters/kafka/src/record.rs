//! How one outbox event becomes one Kafka record: topic, key, CloudEvents headers, value.
//! Pure: no I/O, so the mapping is unit-tested without a broker.

use crate::config::{KafkaConfig, PayloadMode};
use tributary_storage::OutboxEvent;

/// A record ready to send. `headers` are the CloudEvents Kafka protocol binding (binary mode):
/// `ce_id`, `ce_type`, `ce_source`, `ce_specversion`, `ce_time`, `ce_subject`, plus the
/// extensions `ce_tenant` and `ce_mappingversion`, and `content-type`.
#[derive(Clone, Debug, PartialEq)]
pub struct KafkaRecord {
    pub seq: u64,
    pub event_id: String,
    pub topic: String,
    pub key: String,
    pub headers: Vec<(&'static str, String)>,
    pub value: Vec<u8>,
}

pub const FHIR_JSON: &str = "application/fhir+json";
pub const NOTIFICATION_JSON: &str = "application/json";

/// The topic an event goes to (prefix included), or `None` when that family is turned off.
pub fn topic_for<R>(cfg: &KafkaConfig, ev: &OutboxEvent<R>) -> Option<(String, String)> {
    let base = match (&ev.resource_type, ev.event_type.starts_with("fhir.")) {
        (Some(rt), true) => {
            if cfg.resource_topic.is_empty() {
                return None;
            }
            cfg.resource_topic.replace("{resource_type}", rt)
        }
        _ => {
            if cfg.source_event_topic.is_empty() {
                return None;
            }
            cfg.source_event_topic
                .replace("{event_type}", &sanitize(&ev.event_type))
        }
    };
    Some((format!("{}{base}", cfg.prefix_for(&ev.tenant)), base))
}

/// Kafka topic names allow `[A-Za-z0-9._-]`; anything else in an event type becomes `_`.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Id-only notification: see [`OutboxEvent::id_only_notification`].
pub fn notification<R>(ev: &OutboxEvent<R>) -> serde_json::Value {
    ev.id_only_notification()
}

/// Builds the record for `ev`, or `None` when its topic family is disabled. The relay passes
/// events read raw ([`tributary_storage::RawOutboxEvent`]): the resource's stored JSON becomes
/// the value as is.
pub fn build<R: serde::Serialize>(cfg: &KafkaConfig, ev: &OutboxEvent<R>) -> Option<KafkaRecord> {
    let (topic, base) = topic_for(cfg, ev)?;
    let mode = cfg.topic_payload.get(&base).copied().unwrap_or(cfg.payload);
    let full = match (mode, &ev.resource) {
        (PayloadMode::FullResource, Some(r)) => {
            Some(serde_json::to_vec(r).expect("stored JSON serializes"))
        }
        _ => None,
    };
    let too_large = full
        .as_ref()
        .is_some_and(|v| v.len() > cfg.max_record_bytes);
    let (value, content_type) = match full {
        Some(v) if !too_large => (v, FHIR_JSON),
        _ => (
            serde_json::to_vec(&notification(ev)).expect("a Value always serializes"),
            NOTIFICATION_JSON,
        ),
    };
    let key = match (&ev.patient_id, &ev.resource_type, &ev.resource_id) {
        (Some(p), _, _) => p.clone(),
        (None, Some(t), Some(id)) => format!("{t}/{id}"),
        _ => ev.event_id.clone(),
    };
    let mut headers = vec![
        ("ce_specversion", "1.0".to_string()),
        ("ce_id", ev.event_id.clone()),
        ("ce_type", ev.event_type.clone()),
        (
            "ce_source",
            cfg.event_source.replace("{tenant}", &ev.tenant),
        ),
        (
            "ce_time",
            tributary_core::format_rfc3339_millis(ev.occurred_at),
        ),
        ("ce_tenant", ev.tenant.clone()),
        ("content-type", content_type.to_string()),
    ];
    if let (Some(t), Some(id)) = (&ev.resource_type, &ev.resource_id) {
        let subject = match ev.version {
            Some(v) => format!("{t}/{id}/_history/{v}"),
            None => format!("{t}/{id}"),
        };
        headers.push(("ce_subject", subject));
    }
    if let Some(mv) = &ev.mapping_version {
        headers.push(("ce_mappingversion", mv.clone()));
    }
    if too_large {
        headers.push(("ce_payload", "id-only".to_string()));
    }
    Some(KafkaRecord {
        seq: ev.seq,
        event_id: ev.event_id.clone(),
        topic,
        key,
        headers,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event_type: &str, rt: Option<&str>) -> OutboxEvent {
        OutboxEvent {
            seq: 7,
            event_id: "e1".into(),
            tenant: "t1".into(),
            event_type: event_type.into(),
            resource_type: rt.map(str::to_string),
            resource_id: rt.map(|_| "r1".to_string()),
            version: rt.map(|_| 2),
            patient_id: Some("p1".into()),
            other_patients: Vec::new(),
            source_message: None,
            mapping_version: Some("sha256:ab".into()),
            occurred_at: 0,
            resource: rt.map(|t| serde_json::json!({"resourceType": t, "id": "r1"})),
        }
    }

    fn header<'a>(r: &'a KafkaRecord, k: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(h, _)| *h == k)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn default_topics_keys_and_headers() {
        let cfg = KafkaConfig::default();
        let r = build(&cfg, &ev("fhir.Observation.create", Some("Observation"))).unwrap();
        assert_eq!(r.topic, "fhir.r4.Observation");
        assert_eq!(r.key, "p1");
        assert_eq!(header(&r, "ce_id"), Some("e1"));
        assert_eq!(header(&r, "ce_type"), Some("fhir.Observation.create"));
        assert_eq!(header(&r, "ce_source"), Some("urn:tributary:t1"));
        assert_eq!(header(&r, "ce_specversion"), Some("1.0"));
        assert_eq!(header(&r, "ce_mappingversion"), Some("sha256:ab"));
        assert_eq!(header(&r, "content-type"), Some(FHIR_JSON));
        assert_eq!(header(&r, "ce_subject"), Some("Observation/r1/_history/2"));
        let v: serde_json::Value = serde_json::from_slice(&r.value).unwrap();
        assert_eq!(v["resourceType"], "Observation");

        let r = build(&cfg, &ev("hl7v2.adt.A01", None)).unwrap();
        assert_eq!(r.topic, "hl7v2.adt.A01");
        assert_eq!(header(&r, "content-type"), Some(NOTIFICATION_JSON));
    }

    /// A resource over `max_record_bytes` goes as the id-only notification, saying so, instead
    /// of a record the producer refuses on every attempt.
    #[test]
    fn a_resource_over_the_record_limit_goes_as_its_notification() {
        let cfg = KafkaConfig {
            max_record_bytes: 2048,
            ..KafkaConfig::default()
        };
        let mut big = ev("fhir.Binary.create", Some("Binary"));
        big.resource = Some(serde_json::json!({"resourceType": "Binary", "id": "r1",
            "data": "A".repeat(4096)}));
        let r = build(&cfg, &big).unwrap();
        assert!(r.value.len() < 2048, "{}", r.value.len());
        assert_eq!(header(&r, "content-type"), Some(NOTIFICATION_JSON));
        assert_eq!(header(&r, "ce_payload"), Some("id-only"));
        let v: serde_json::Value = serde_json::from_slice(&r.value).unwrap();
        assert_eq!(v, big.id_only_notification());
        // under the limit: the resource itself, no marker
        let r = build(&cfg, &ev("fhir.Binary.create", Some("Binary"))).unwrap();
        assert_eq!(header(&r, "content-type"), Some(FHIR_JSON));
        assert_eq!(header(&r, "ce_payload"), None);
    }

    #[test]
    fn a_raw_event_publishes_the_stored_json_as_is_with_the_same_topic_key_and_headers() {
        let resource = r#"{"resourceType":"Observation","id":"r1","valueQuantity":{"value":1.50,"unit":"m\u00e9"}}"#;
        let mut stored = serde_json::to_value(ev("fhir.Observation.create", None)).unwrap();
        stored["resource_type"] = "Observation".into();
        stored["resource"] = serde_json::from_str(resource).unwrap();
        let stored = serde_json::to_string(&stored).unwrap().replace(
            r#"{"id":"r1","resourceType":"Observation","valueQuantity":{"unit":"mé","value":1.50}}"#,
            resource,
        );
        assert!(stored.contains(resource), "{stored}");
        let raw: tributary_storage::RawOutboxEvent = serde_json::from_str(&stored).unwrap();
        let parsed: OutboxEvent = serde_json::from_str(&stored).unwrap();
        let cfg = KafkaConfig::default();
        let (r, p) = (build(&cfg, &raw).unwrap(), build(&cfg, &parsed).unwrap());
        assert_eq!(String::from_utf8(r.value.clone()).unwrap(), resource);
        assert_ne!(
            r.value, p.value,
            "parsing would have rewritten the escape and the key order"
        );
        assert_eq!(
            (&r.topic, &r.key, &r.headers),
            (&p.topic, &p.key, &p.headers)
        );
        let id_only = KafkaConfig {
            payload: PayloadMode::IdOnly,
            ..Default::default()
        };
        assert_eq!(build(&id_only, &raw), build(&id_only, &parsed));
    }

    #[test]
    fn prefixes_payload_overrides_and_disabled_families() {
        let mut cfg = KafkaConfig {
            topic_prefix: "{tenant}.".into(),
            ..Default::default()
        };
        cfg.topic_payload
            .insert("fhir.r4.Patient".into(), PayloadMode::IdOnly);
        let r = build(&cfg, &ev("fhir.Patient.update", Some("Patient"))).unwrap();
        assert_eq!(r.topic, "t1.fhir.r4.Patient");
        let v: serde_json::Value = serde_json::from_slice(&r.value).unwrap();
        assert_eq!(v["resourceId"], "r1");
        assert_eq!(v["versionId"], "2");
        assert!(v.get("name").is_none());
        cfg.source_event_topic.clear();
        assert!(build(&cfg, &ev("hl7v2.adt.A01", None)).is_none());
    }
}
