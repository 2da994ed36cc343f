//! Topics, Subscription resources (R4 Backport IG profile) and how an event matches one.
//! Pure: no I/O (the previous version of a resource is passed in by the caller).

use serde_json::Value;
use tributary_storage::OutboxEvent;

pub const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition";
pub const TOPIC_BASE: &str = "http://tributary.dev/fhir/SubscriptionTopic";
/// Set by the facade from a patient-context SMART token when the Subscription is created:
/// the subscriber then only ever receives that patient's events, whatever its filters say.
pub const PATIENT_CONTEXT_EXT: &str =
    "http://tributary.dev/fhir/StructureDefinition/subscription-patient-context";
/// Set by the facade from the creating token's scopes (`patient/Observation.rs` …): a
/// comma-separated list of the resource types the subscriber may read; no other type is ever
/// delivered. `*` or absent = no restriction beyond the topic.
pub const ALLOWED_TYPES_EXT: &str =
    "http://tributary.dev/fhir/StructureDefinition/subscription-allowed-types";
/// The writing token's grant and token ids (stamped by the facade): revoking either stops
/// delivery.
pub const GRANT_EXT: &str = "http://tributary.dev/fhir/StructureDefinition/subscription-grant";
/// The writing token's client id (stamped by the facade), for the audit records of deliveries.
pub const CLIENT_EXT: &str = "http://tributary.dev/fhir/StructureDefinition/subscription-client";

/// What changed, as a topic trigger sees it.
pub struct Change<'a> {
    pub event: &'a OutboxEvent,
    /// The resource's previous version, when there is one.
    pub previous: Option<&'a Value>,
}

impl Change<'_> {
    fn kind(&self) -> &str {
        self.event.event_type.rsplit('.').next().unwrap_or("")
    }
    fn rtype(&self) -> &str {
        self.event.resource_type.as_deref().unwrap_or("")
    }
    fn status(&self) -> Option<&str> {
        self.event.resource.as_ref()?.get("status")?.as_str()
    }
    fn previous_status(&self) -> Option<&str> {
        self.previous?.get("status")?.as_str()
    }
    /// Status became `to` with this change (created with it, or changed into it).
    fn became(&self, to: &str) -> bool {
        self.status() == Some(to) && self.previous_status() != Some(to)
    }
}

/// One SubscriptionTopic we publish.
pub struct Topic {
    pub code: &'static str,
    pub title: &'static str,
    pub resource_types: &'static [&'static str],
    trigger: fn(&Change<'_>) -> bool,
}

impl Topic {
    pub fn url(&self) -> String {
        format!("{TOPIC_BASE}/{}", self.code)
    }
    /// Does this change trigger the topic (before any subscription filter)?
    pub fn triggers(&self, c: &Change<'_>) -> bool {
        c.event.resource_type.is_some()
            && (self.resource_types.is_empty() || self.resource_types.contains(&c.rtype()))
            && (self.trigger)(c)
    }
    /// Whether matching needs the previous version (so callers only read it when useful).
    pub fn needs_previous(&self) -> bool {
        matches!(
            self.code,
            "patient-admission"
                | "patient-discharge"
                | "patient-transfer"
                | "diagnosticreport-final"
        )
    }
}

fn locations(v: Option<&Value>) -> Vec<String> {
    v.and_then(|r| r.get("location"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|l| l.get("location")?.get("reference")?.as_str())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The topics Tributary publishes, at `http://tributary.dev/fhir/SubscriptionTopic/<code>`.
pub static TOPICS: [Topic; 6] = [
    Topic {
        code: "patient-admission",
        title: "Patient admitted (Encounter became in-progress)",
        resource_types: &["Encounter"],
        trigger: |c| c.kind() != "delete" && c.became("in-progress"),
    },
    Topic {
        code: "patient-discharge",
        title: "Patient discharged (Encounter became finished)",
        resource_types: &["Encounter"],
        trigger: |c| c.kind() != "delete" && c.became("finished"),
    },
    Topic {
        code: "patient-transfer",
        title: "Patient transferred (in-progress Encounter's location changed)",
        resource_types: &["Encounter"],
        trigger: |c| {
            c.kind() == "update"
                && c.status() == Some("in-progress")
                && c.previous.is_some()
                && locations(c.event.resource.as_ref()) != locations(c.previous)
        },
    },
    Topic {
        code: "observation",
        title: "New or updated Observation",
        resource_types: &["Observation"],
        trigger: |c| c.kind() == "create" || c.kind() == "update",
    },
    Topic {
        code: "diagnosticreport-final",
        title: "DiagnosticReport became final",
        resource_types: &["DiagnosticReport"],
        trigger: |c| c.kind() != "delete" && c.became("final"),
    },
    Topic {
        code: "resource-change",
        title: "Any change to a resource (filter by type: `Observation?…`)",
        resource_types: &[],
        trigger: |_| true,
    },
];

pub fn topic_by_url(url: &str) -> Option<&'static Topic> {
    TOPICS.iter().find(|t| t.url() == url)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    Empty,
    IdOnly,
    FullResource,
}

impl Content {
    pub fn code(&self) -> &'static str {
        match self {
            Content::Empty => "empty",
            Content::IdOnly => "id-only",
            Content::FullResource => "full-resource",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChannelType {
    RestHook,
    /// Notifications go to websocket clients bound with a `$get-ws-binding-token` token.
    Websocket,
}

impl ChannelType {
    /// `Subscription.channel.type`.
    pub fn code(&self) -> &'static str {
        match self {
            ChannelType::RestHook => "rest-hook",
            ChannelType::Websocket => "websocket",
        }
    }
}

/// One filter from `backport-filter-criteria`: `Encounter?patient=Patient/123&status=final`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub name: String,
    pub value: String,
}

/// A Subscription resource, read into what delivery needs.
#[derive(Clone, Debug, PartialEq)]
pub struct SubscriptionSpec {
    pub tenant: String,
    pub id: String,
    pub version: u64,
    /// The version that created this incarnation of the id: 1, or the first version after its
    /// latest deletion. Delivery state (start, cursor, numbers) belongs to one incarnation, so a
    /// Subscription re-created under a deleted one's id starts afresh. Set by the engine.
    pub incarnation: u64,
    pub status: String,
    pub topic_url: String,
    pub filter_type: Option<String>,
    pub filters: Vec<Filter>,
    pub channel: ChannelType,
    pub endpoint: String,
    pub headers: Vec<(String, String)>,
    pub content: Content,
    pub heartbeat_secs: Option<u64>,
    pub timeout_secs: Option<u64>,
    pub max_count: Option<usize>,
    pub end: Option<i64>,
    pub patient_context: Option<String>,
    /// Resource types the creating token could read (`None` = unrestricted).
    pub allowed_types: Option<Vec<String>>,
    /// The writing token's grant and token ids: delivery stops when one is revoked.
    pub grants: Vec<String>,
    /// The writing token's client id, if the facade stamped it.
    pub client: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("Subscription.criteria {0:?} is not a topic we publish")]
    UnknownTopic(String),
    #[error("Subscription.channel.endpoint is missing or not an absolute URL")]
    BadEndpoint,
    #[error("Subscription.channel.endpoint must be https")]
    InsecureEndpoint,
    #[error("Subscription.channel.type {0:?} is not supported (rest-hook and websocket are)")]
    UnsupportedChannel(String),
    #[error("unsupported filter {0:?}: supported are patient, subject, status, code, category")]
    UnsupportedFilter(String),
    #[error("Subscription.channel.header entries must be `Name: value`")]
    BadHeader,
    #[error("Subscription.channel.header may not set Host, Content-Length, Content-Type, Transfer-Encoding, Connection or Upgrade")]
    ReservedHeader,
}

impl SpecError {
    /// A fixed name for logs: the message quotes the client's own text (a criteria string can
    /// hold a name or an identifier), which belongs in its Subscription, not in our logs.
    pub fn kind(&self) -> &'static str {
        match self {
            SpecError::UnknownTopic(_) => "unknown-topic",
            SpecError::BadEndpoint => "bad-endpoint",
            SpecError::InsecureEndpoint => "insecure-endpoint",
            SpecError::UnsupportedChannel(_) => "unsupported-channel",
            SpecError::UnsupportedFilter(_) => "unsupported-filter",
            SpecError::BadHeader => "bad-header",
            SpecError::ReservedHeader => "reserved-header",
        }
    }
}

/// Headers a Subscription may not set on its notifications.
const RESERVED_HEADERS: [&str; 7] = [
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
];

/// The extension with exactly this URL. Never a suffix match: the facade replaces only the exact
/// URLs of the extensions it stamps, so a look-alike URL a client wrote must not be read as one.
fn ext<'a>(v: &'a Value, url: &str) -> Option<&'a Value> {
    v.get("extension")?
        .as_array()?
        .iter()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(url))
}

fn backport_ext<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    ext(v, &format!("{BACKPORT}/{name}"))
}

fn ext_u64(v: &Value, name: &str) -> Option<u64> {
    let e = backport_ext(v, name)?;
    e.get("valueUnsignedInt")
        .or_else(|| e.get("valuePositiveInt"))
        .or_else(|| e.get("valueInteger"))
        .and_then(Value::as_u64)
}

/// `Encounter?patient=Patient/123&status=in-progress` (also the dotted `Encounter.patient=…`
/// some examples use) → type and filters.
pub fn parse_criteria(s: &str) -> Result<(Option<String>, Vec<Filter>), SpecError> {
    let s = s.trim();
    let (rtype, query) = match s.split_once('?') {
        Some((t, q)) => (t, q),
        None => match s.split_once('.') {
            Some((t, q)) if t.chars().next().is_some_and(|c| c.is_ascii_uppercase()) => (t, q),
            _ => ("", s),
        },
    };
    let mut filters = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| SpecError::UnsupportedFilter(pair.to_string()))?;
        if !matches!(name, "patient" | "subject" | "status" | "code" | "category") {
            return Err(SpecError::UnsupportedFilter(name.to_string()));
        }
        filters.push(Filter {
            name: name.to_string(),
            value: value.to_string(),
        });
    }
    Ok(((!rtype.is_empty()).then(|| rtype.to_string()), filters))
}

impl SubscriptionSpec {
    pub fn parse(
        tenant: &str,
        id: &str,
        version: u64,
        r: &Value,
        allow_http: bool,
    ) -> Result<Self, SpecError> {
        let status = r
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("requested")
            .to_string();
        let topic_url = r
            .get("criteria")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if topic_by_url(&topic_url).is_none() {
            return Err(SpecError::UnknownTopic(topic_url));
        }
        let criteria = r
            .get("_criteria")
            .and_then(|c| backport_ext(c, "backport-filter-criteria"))
            .and_then(|e| e.get("valueString"))
            .and_then(Value::as_str);
        let (filter_type, filters) = match criteria {
            Some(c) => parse_criteria(c)?,
            None => (None, Vec::new()),
        };
        let channel = r.get("channel").cloned().unwrap_or(Value::Null);
        let ctype = channel.get("type").and_then(Value::as_str).unwrap_or("");
        let channel_type = match ctype {
            "rest-hook" => ChannelType::RestHook,
            "websocket" => ChannelType::Websocket,
            other => return Err(SpecError::UnsupportedChannel(other.to_string())),
        };
        let endpoint = channel
            .get("endpoint")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        // A websocket subscriber connects to us; any endpoint it names is not used.
        if channel_type == ChannelType::RestHook {
            if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
                return Err(SpecError::BadEndpoint);
            }
            if endpoint.starts_with("http://") && !allow_http {
                return Err(SpecError::InsecureEndpoint);
            }
        }
        let mut headers = Vec::new();
        for h in channel
            .get("header")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let (k, v) = h
                .as_str()
                .and_then(|h| h.split_once(':'))
                .ok_or(SpecError::BadHeader)?;
            let (k, v) = (k.trim(), v.trim());
            let valid = reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_ok()
                && reqwest::header::HeaderValue::from_str(v).is_ok();
            if !valid {
                return Err(SpecError::BadHeader);
            }
            // What frames the request is ours: a client's `Host` or length would redirect or
            // smuggle it.
            if RESERVED_HEADERS.iter().any(|r| k.eq_ignore_ascii_case(r)) {
                return Err(SpecError::ReservedHeader);
            }
            headers.push((k.to_string(), v.to_string()));
        }
        let content = match channel
            .get("_payload")
            .and_then(|p| backport_ext(p, "backport-payload-content"))
            .and_then(|e| e.get("valueCode"))
            .and_then(Value::as_str)
        {
            Some("full-resource") => Content::FullResource,
            Some("empty") => Content::Empty,
            _ => Content::IdOnly,
        };
        let patient_context = ext(r, PATIENT_CONTEXT_EXT)
            .and_then(|e| e.get("valueReference"))
            .and_then(|v| v.get("reference"))
            .and_then(Value::as_str)
            .map(|s| s.strip_prefix("Patient/").unwrap_or(s).to_string());
        let allowed_types = ext(r, ALLOWED_TYPES_EXT)
            .and_then(|e| e.get("valueString"))
            .and_then(Value::as_str)
            .filter(|s| s.trim() != "*")
            .map(|s| {
                s.split(',')
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
                    .collect()
            });
        let grants = r
            .get("extension")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|e| e.get("url").and_then(Value::as_str) == Some(GRANT_EXT))
            .filter_map(|e| e.get("valueString").and_then(Value::as_str))
            .map(str::to_string)
            .collect();
        let client = ext(r, CLIENT_EXT)
            .and_then(|e| e.get("valueString"))
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(Self {
            allowed_types,
            grants,
            client,
            tenant: tenant.to_string(),
            id: id.to_string(),
            version,
            incarnation: 1,
            status,
            topic_url,
            filter_type,
            filters,
            channel: channel_type,
            endpoint,
            headers,
            content,
            heartbeat_secs: ext_u64(&channel, "backport-heartbeat-period"),
            timeout_secs: ext_u64(&channel, "backport-timeout"),
            max_count: ext_u64(&channel, "backport-max-count").map(|n| n as usize),
            end: r
                .get("end")
                .and_then(Value::as_str)
                .and_then(tributary_core::parse_rfc3339_millis),
            patient_context,
        })
    }

    pub fn topic(&self) -> &'static Topic {
        topic_by_url(&self.topic_url).expect("checked at parse")
    }

    /// Does this change go to this subscriber? Topic trigger, then type filter, patient
    /// context and filters — all must hold.
    pub fn matches(&self, c: &Change<'_>) -> bool {
        let ev = c.event;
        if ev.tenant != self.tenant {
            return false;
        }
        // A subscriber never hears about its own Subscription resources.
        if ev.resource_type.as_deref() == Some("Subscription") {
            return false;
        }
        if !self.topic().triggers(c) {
            return false;
        }
        if let Some(t) = &self.filter_type {
            if ev.resource_type.as_deref() != Some(t.as_str()) {
                return false;
            }
        }
        if let Some(p) = &self.patient_context {
            if ev.patient_id.as_deref() != Some(p.as_str()) && !ev.other_patients.contains(p) {
                return false;
            }
        }
        if let Some(types) = &self.allowed_types {
            if !types
                .iter()
                .any(|t| Some(t.as_str()) == ev.resource_type.as_deref())
            {
                return false;
            }
        }
        self.filters.iter().all(|f| filter_holds(f, c))
    }
}

fn filter_holds(f: &Filter, c: &Change<'_>) -> bool {
    let ev = c.event;
    match f.name.as_str() {
        "patient" | "subject" => {
            let want = f.value.strip_prefix("Patient/").unwrap_or(&f.value);
            ev.patient_id.as_deref() == Some(want)
        }
        "status" => f.value.split(',').any(|s| c.status() == Some(s)),
        "code" | "category" => ev.resource.as_ref().is_some_and(|r| {
            f.value
                .split(',')
                .any(|want| tributary_core::matches_token(r, &f.name, want))
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub fn event(rtype: &str, kind: &str, patient: &str, resource: Value) -> OutboxEvent {
        OutboxEvent {
            seq: 1,
            event_id: "e".into(),
            tenant: "t1".into(),
            event_type: format!("fhir.{rtype}.{kind}"),
            resource_type: Some(rtype.into()),
            resource_id: Some("r1".into()),
            version: Some(1),
            patient_id: Some(patient.into()),
            other_patients: Vec::new(),
            source_message: None,
            mapping_version: None,
            occurred_at: 0,
            resource: Some(resource),
        }
    }

    fn sub(topic: &str, criteria: Option<&str>) -> Value {
        let mut s = json!({
            "resourceType": "Subscription", "status": "requested",
            "criteria": format!("{TOPIC_BASE}/{topic}"),
            "channel": {"type": "rest-hook", "endpoint": "https://h/x", "payload": "application/fhir+json",
                        "header": ["Authorization: Bearer abc"],
                        "_payload": {"extension": [{"url": format!("{BACKPORT}/backport-payload-content"), "valueCode": "full-resource"}]},
                        "extension": [{"url": format!("{BACKPORT}/backport-heartbeat-period"), "valueUnsignedInt": 60}]}
        });
        if let Some(c) = criteria {
            s["_criteria"] = json!({"extension": [{"url": format!("{BACKPORT}/backport-filter-criteria"), "valueString": c}]});
        }
        s
    }

    #[test]
    fn parses_backport_subscription() {
        let s = SubscriptionSpec::parse(
            "t1",
            "s1",
            1,
            &sub("patient-admission", Some("Encounter?patient=Patient/p1")),
            false,
        )
        .unwrap();
        assert_eq!(s.content, Content::FullResource);
        assert_eq!(s.heartbeat_secs, Some(60));
        assert_eq!(
            s.headers,
            vec![("Authorization".into(), "Bearer abc".into())]
        );
        assert_eq!(s.filter_type.as_deref(), Some("Encounter"));
        let mut bad = sub("nope", None);
        assert!(matches!(
            SubscriptionSpec::parse("t1", "s", 1, &bad, false),
            Err(SpecError::UnknownTopic(_))
        ));
        bad = sub("observation", None);
        bad["channel"]["endpoint"] = json!("http://h/x");
        assert_eq!(
            SubscriptionSpec::parse("t1", "s", 1, &bad, false),
            Err(SpecError::InsecureEndpoint)
        );
        assert!(parse_criteria("Observation?name=x").is_err());
        for (header, want) in [
            ("Host: internal.svc", SpecError::ReservedHeader),
            ("content-length: 0", SpecError::ReservedHeader),
            ("X-Key: a\r\nHost: internal.svc", SpecError::BadHeader),
            ("Bad Name: x", SpecError::BadHeader),
        ] {
            let mut h = sub("observation", None);
            h["channel"]["header"] = json!([header]);
            assert_eq!(
                SubscriptionSpec::parse("t1", "s", 1, &h, true),
                Err(want),
                "{header:?}"
            );
        }
        let mut ws = sub("observation", None);
        ws["channel"]["type"] = json!("websocket");
        ws["channel"].as_object_mut().unwrap().remove("endpoint");
        let spec = SubscriptionSpec::parse("t1", "s", 1, &ws, false).unwrap();
        assert_eq!(spec.channel, ChannelType::Websocket);
        ws["channel"]["type"] = json!("email");
        assert!(matches!(
            SubscriptionSpec::parse("t1", "s", 1, &ws, false),
            Err(SpecError::UnsupportedChannel(_))
        ));
        assert_eq!(
            parse_criteria("Encounter.patient=Patient/123").unwrap().1[0].value,
            "Patient/123"
        );
    }

    #[test]
    fn admission_discharge_and_filters() {
        let adm = SubscriptionSpec::parse(
            "t1",
            "s",
            1,
            &sub("patient-admission", Some("Encounter?patient=Patient/p1")),
            false,
        )
        .unwrap();
        let in_progress = json!({"status": "in-progress"});
        let planned = json!({"status": "planned"});
        let e = event("Encounter", "update", "p1", in_progress.clone());
        assert!(adm.matches(&Change {
            event: &e,
            previous: Some(&planned)
        }));
        assert!(!adm.matches(&Change {
            event: &e,
            previous: Some(&in_progress)
        }));
        let other = event("Encounter", "create", "p2", in_progress.clone());
        assert!(!adm.matches(&Change {
            event: &other,
            previous: None
        }));
        let dis =
            SubscriptionSpec::parse("t1", "s", 1, &sub("patient-discharge", None), false).unwrap();
        let fin = event("Encounter", "update", "p2", json!({"status": "finished"}));
        assert!(dis.matches(&Change {
            event: &fin,
            previous: Some(&in_progress)
        }));
        let obs = SubscriptionSpec::parse(
            "t1",
            "s",
            1,
            &sub(
                "observation",
                Some("Observation?code=http://loinc.org|8867-4"),
            ),
            false,
        )
        .unwrap();
        let hr = event(
            "Observation",
            "create",
            "p1",
            json!({"code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}}),
        );
        let bp = event(
            "Observation",
            "create",
            "p1",
            json!({"code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]}}),
        );
        assert!(obs.matches(&Change {
            event: &hr,
            previous: None
        }));
        assert!(!obs.matches(&Change {
            event: &bp,
            previous: None
        }));
        // new lab results only: the category, as a search and a scope read it
        let labs = SubscriptionSpec::parse(
            "t1",
            "s",
            1,
            &sub("observation", Some("Observation?category=laboratory")),
            false,
        )
        .unwrap();
        let lab = event(
            "Observation",
            "create",
            "p1",
            json!({"category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}]}),
        );
        let vital = event(
            "Observation",
            "create",
            "p1",
            json!({"category": [{"coding": [{"code": "vital-signs"}]}]}),
        );
        assert!(labs.matches(&Change {
            event: &lab,
            previous: None
        }));
        for other in [&vital, &hr] {
            assert!(!labs.matches(&Change {
                event: other,
                previous: None
            }));
        }
    }

    #[test]
    fn look_alike_extension_urls_are_not_read_as_the_stamped_bounds() {
        // The facade replaces the exact URLs only; a client's look-alikes placed first (one
        // without a patient, one allowing everything) must not lift the stamped bounds.
        let mut s = sub("resource-change", None);
        s["extension"] = json!([
            {"url": "urn:x:subscription-patient-context"},
            {"url": "urn:x:subscription-allowed-types", "valueString": "*"},
            {"url": PATIENT_CONTEXT_EXT, "valueReference": {"reference": "Patient/p1"}},
            {"url": ALLOWED_TYPES_EXT, "valueString": "Observation"},
            {"url": CLIENT_EXT, "valueString": "care-app"}
        ]);
        let spec = SubscriptionSpec::parse("t1", "s", 1, &s, false).unwrap();
        assert_eq!(spec.patient_context.as_deref(), Some("p1"));
        assert_eq!(spec.allowed_types, Some(vec!["Observation".to_string()]));
        assert_eq!(spec.client.as_deref(), Some("care-app"));
    }

    #[test]
    fn patient_context_overrides_filters() {
        let mut s = sub("resource-change", None);
        s["extension"] =
            json!([{"url": PATIENT_CONTEXT_EXT, "valueReference": {"reference": "Patient/p1"}}]);
        let spec = SubscriptionSpec::parse("t1", "s", 1, &s, false).unwrap();
        let mine = event("Observation", "create", "p1", json!({}));
        let theirs = event("Observation", "create", "p2", json!({}));
        assert!(spec.matches(&Change {
            event: &mine,
            previous: None
        }));
        assert!(!spec.matches(&Change {
            event: &theirs,
            previous: None
        }));
        // A resource in both compartments (keyed by p2, naming p1 too) is p1's as well.
        let mut shared = event("Appointment", "create", "p2", json!({}));
        shared.other_patients = vec!["p1".into()];
        assert!(spec.matches(&Change {
            event: &shared,
            previous: None
        }));
        // Scopes for Observations only: an Encounter of the same patient is not delivered.
        let mut s = sub("resource-change", None);
        s["extension"] = json!([{"url": ALLOWED_TYPES_EXT, "valueString": "Observation"}]);
        let spec = SubscriptionSpec::parse("t1", "s", 1, &s, false).unwrap();
        let enc = event("Encounter", "create", "p1", json!({}));
        assert!(spec.matches(&Change {
            event: &mine,
            previous: None
        }));
        assert!(!spec.matches(&Change {
            event: &enc,
            previous: None
        }));
    }
}
