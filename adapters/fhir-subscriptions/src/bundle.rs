//! Notification Bundles and SubscriptionStatus (R4 Backport IG: `Parameters` profiled as
//! `backport-subscription-status-r4` inside a `history` Bundle profiled as
//! `backport-subscription-notification-r4`).

use crate::model::{Content, SubscriptionSpec, BACKPORT};
use serde_json::{json, Value};
use tributary_core::format_rfc3339_millis;
use tributary_storage::OutboxEvent;

/// `handshake`, `heartbeat`, `event-notification`, `query-status`, `query-event`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotificationType {
    Handshake,
    Heartbeat,
    EventNotification,
    QueryStatus,
    QueryEvent,
}

impl NotificationType {
    pub fn code(&self) -> &'static str {
        match self {
            NotificationType::Handshake => "handshake",
            NotificationType::Heartbeat => "heartbeat",
            NotificationType::EventNotification => "event-notification",
            NotificationType::QueryStatus => "query-status",
            NotificationType::QueryEvent => "query-event",
        }
    }
}

/// One event as numbered for one subscription.
pub struct NumberedEvent<'a> {
    pub number: u64,
    pub event: &'a OutboxEvent,
}

pub struct StatusInfo<'a> {
    pub base_url: &'a str,
    pub spec: &'a SubscriptionSpec,
    pub status: &'a str,
    pub events_since_start: u64,
    pub error: Option<&'a str>,
}

fn focus_url(base: &str, ev: &OutboxEvent) -> Option<String> {
    Some(format!(
        "{base}/{}/{}",
        ev.resource_type.as_deref()?,
        ev.resource_id.as_deref()?
    ))
}

/// The `SubscriptionStatus` Parameters resource.
pub fn status_parameters(
    info: &StatusInfo<'_>,
    kind: NotificationType,
    events: &[NumberedEvent<'_>],
    content: Content,
) -> Value {
    let id = uuid::Uuid::now_v7().to_string();
    let mut params = vec![
        json!({"name": "subscription", "valueReference": {"reference": format!("{}/Subscription/{}", info.base_url, info.spec.id)}}),
        json!({"name": "topic", "valueCanonical": info.spec.topic_url}),
        json!({"name": "status", "valueCode": info.status}),
        json!({"name": "type", "valueCode": kind.code()}),
        json!({"name": "events-since-subscription-start", "valueString": info.events_since_start.to_string()}),
    ];
    for ne in events {
        let mut parts = vec![
            json!({"name": "event-number", "valueString": ne.number.to_string()}),
            json!({"name": "timestamp", "valueInstant": format_rfc3339_millis(ne.event.occurred_at)}),
        ];
        if content != Content::Empty {
            if let Some(url) = focus_url(info.base_url, ne.event) {
                parts.push(json!({"name": "focus", "valueReference": {"reference": url}}));
            }
        }
        params.push(json!({"name": "notification-event", "part": parts}));
    }
    if let Some(e) = info.error {
        params.push(json!({"name": "error", "valueCodeableConcept": {"text": e}}));
    }
    json!({
        "resourceType": "Parameters",
        "id": id,
        "meta": {"profile": [format!("{BACKPORT}/backport-subscription-status-r4")]},
        "parameter": params,
    })
}

/// A notification Bundle (`history`): the status first, then one entry per event (none for
/// `empty`; `fullUrl` + request/response for `id-only`; the resource too for `full-resource`).
pub fn notification_bundle(
    info: &StatusInfo<'_>,
    kind: NotificationType,
    events: &[NumberedEvent<'_>],
    content: Content,
) -> Value {
    let status = status_parameters(info, kind, events, content);
    let status_id = status["id"].as_str().unwrap_or_default().to_string();
    let mut entries = vec![json!({
        "fullUrl": format!("urn:uuid:{status_id}"),
        "resource": status,
        "request": {"method": "GET", "url": format!("{}/Subscription/{}/$status", info.base_url, info.spec.id)},
        "response": {"status": "200"},
    })];
    if content != Content::Empty {
        for ne in events {
            let ev = ne.event;
            let Some(url) = focus_url(info.base_url, ev) else {
                continue;
            };
            let rtype = ev.resource_type.as_deref().unwrap_or_default();
            let rid = ev.resource_id.as_deref().unwrap_or_default();
            let (method, req_url, code) = match ev.event_type.rsplit('.').next() {
                Some("create") => ("POST", rtype.to_string(), "201"),
                Some("delete") => ("DELETE", format!("{rtype}/{rid}"), "204"),
                _ => ("PUT", format!("{rtype}/{rid}"), "200"),
            };
            let mut entry = json!({
                "fullUrl": url,
                "request": {"method": method, "url": req_url},
                "response": {"status": code},
            });
            if content == Content::FullResource {
                if let Some(r) = &ev.resource {
                    entry["resource"] = r.clone();
                }
            }
            entries.push(entry);
        }
    }
    json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::now_v7().to_string(),
        "meta": {"profile": [format!("{BACKPORT}/backport-subscription-notification-r4")]},
        "type": "history",
        "timestamp": format_rfc3339_millis(tributary_core::now_millis()),
        "entry": entries,
    })
}

/// `$status` answer: a `searchset` Bundle holding one status Parameters.
pub fn status_bundle(info: &StatusInfo<'_>) -> Value {
    let status = status_parameters(info, NotificationType::QueryStatus, &[], Content::Empty);
    let status_id = status["id"].as_str().unwrap_or_default().to_string();
    json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::now_v7().to_string(),
        "type": "searchset",
        "total": 1,
        "timestamp": format_rfc3339_millis(tributary_core::now_millis()),
        "entry": [{"fullUrl": format!("urn:uuid:{status_id}"), "resource": status, "search": {"mode": "match"}}],
    })
}

/// (event number, focus reference) of one notification event.
pub type EventRef = (u64, Option<String>);

/// Reads the status Parameters out of a notification Bundle (ours or an upstream server's):
/// the notification type and its events.
pub fn read_status(bundle: &Value) -> Option<(String, Vec<EventRef>)> {
    let entries = bundle.get("entry")?.as_array()?;
    let params = entries.iter().filter_map(|e| e.get("resource")).find(|r| {
        r.get("resourceType").and_then(Value::as_str) == Some("Parameters")
            || r.get("resourceType").and_then(Value::as_str) == Some("SubscriptionStatus")
    })?;
    let list = params.get("parameter")?.as_array()?;
    let kind = list
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some("type"))?
        .get("valueCode")?
        .as_str()?
        .to_string();
    let mut events = Vec::new();
    for p in list
        .iter()
        .filter(|p| p.get("name").and_then(Value::as_str) == Some("notification-event"))
    {
        let parts = p.get("part").and_then(Value::as_array);
        let part = |name: &str| {
            parts?
                .iter()
                .find(|x| x.get("name").and_then(Value::as_str) == Some(name))
                .cloned()
        };
        let number = part("event-number")
            .and_then(|x| {
                x.get("valueString")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let focus = part("focus").and_then(|x| {
            x.get("valueReference")?
                .get("reference")?
                .as_str()
                .map(str::to_string)
        });
        events.push((number, focus));
    }
    Some((kind, events))
}
