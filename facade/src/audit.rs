//! The audit record of every facade request (allowed or denied), and its FHIR `AuditEvent` view.
//!
//! A record holds ids, types, codes and numbers only — never a name, birth date, identifier
//! value, query string or body. It is appended to the hash-chained [`AuditLog`] and durable before
//! the response leaves (many concurrent requests share one fsync through the group committer).
//!
//! [`AuditLog`]: tributary_storage::AuditLog

use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tributary_storage::{AuditEntry, PreparedRecord};

/// Filled in by the policy layers and handlers as a request is processed.
#[derive(Clone, Debug, Default)]
pub struct AuditDraft {
    pub request_id: String,
    pub time_ms: i64,
    pub tenant: Option<String>,
    pub client: Option<String>,
    pub user: Option<String>,
    pub role: Option<String>,
    pub patient: Option<String>,
    /// The token's patient context, recorded when nothing more specific is known.
    pub context_patient: Option<String>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub interaction: &'static str,
    pub scopes: Option<String>,
    pub break_glass: Option<String>,
    /// Why a request was refused (an error kind such as `forbidden`, never a message with data).
    pub detail: Option<&'static str>,
    /// Number of resources returned (searches, history, `$everything`).
    pub returned: Option<usize>,
    /// Name of the backend FHIR server the request was routed to, if any.
    pub backend: Option<String>,
    /// A bundle entry's own status; unset, it has the request's (a failed transaction, a
    /// timeout). Unused on a request's own draft, whose status is its response's.
    pub status: Option<u16>,
    /// The entries of a transaction or batch Bundle, each recorded after the request's record
    /// (see [`AuditSlot::entry`]).
    pub entries: Vec<(usize, AuditSlot)>,
    /// The patients whose resources a search, history or `$everything` returned, with how many
    /// ([`Disclosed`]).
    pub disclosed: BTreeMap<String, usize>,
}

/// Counts the resources of a multi-resource response by the patient compartments they belong
/// to. Each patient other than the one the record names gets a `fhir-disclosure` record of its
/// own (same request, `returned` = its resources), so a search or history across patients is in
/// each of their reports.
#[derive(Default, Serialize, serde::Deserialize)]
pub struct Disclosed(BTreeMap<String, usize>);

impl Disclosed {
    pub fn add(&mut self, rtype: &str, id: &str, resource: &Value) {
        let mut links = crate::policy::patient_links(rtype, id, resource);
        links.sort_unstable();
        links.dedup();
        for p in links.into_iter().filter(|p| crate::policy::valid_id(p)) {
            *self.0.entry(p).or_default() += 1;
        }
    }
}

impl From<&tributary_runtime::PatientsDisclosed> for Disclosed {
    fn from(p: &tributary_runtime::PatientsDisclosed) -> Self {
        Disclosed(
            p.0.iter()
                .filter(|(id, n)| **n > 0 && crate::policy::valid_id(id))
                .map(|(id, n)| (id.clone(), *n))
                .collect(),
        )
    }
}

/// The request's draft, shared between the layers through request extensions.
#[derive(Clone, Debug, Default)]
pub struct AuditSlot(pub Arc<Mutex<AuditDraft>>);

impl AuditSlot {
    pub fn update(&self, f: impl FnOnce(&mut AuditDraft)) {
        if let Ok(mut d) = self.0.lock() {
            f(&mut d);
        }
    }

    pub fn snapshot(&self) -> AuditDraft {
        self.0.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// The draft, leaving an empty one behind (for the final record: no copy).
    pub fn take(&self) -> AuditDraft {
        self.0
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default()
    }

    /// Opens the draft of entry `index` of a transaction or batch Bundle (`method` and `url` are
    /// the entry's `request`), classified like a request of its own, and attaches it to this
    /// request's draft. The entry's record is written with the request's, whatever happens
    /// after this call, so the handler fills the draft in as it goes (patient, id, status).
    pub fn entry(&self, index: usize, method: &str, url: &str) -> AuditSlot {
        let method = axum::http::Method::from_bytes(method.as_bytes())
            .unwrap_or(axum::http::Method::OPTIONS);
        let url = url.trim_start_matches('/');
        let (path, query) = match url.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (url, None),
        };
        let f = crate::policy::classify(&method, &format!("/{path}"), query);
        let draft = AuditDraft {
            interaction: if path.is_empty() {
                "unknown"
            } else {
                f.interaction.name()
            },
            patient: f.target_patient().filter(|p| crate::policy::valid_id(p)),
            resource_type: f.resource_type.filter(|t| crate::policy::valid_type(t)),
            resource_id: f.id.filter(|i| crate::policy::valid_id(i)),
            ..Default::default()
        };
        let slot = AuditSlot(Arc::new(Mutex::new(draft)));
        self.update(|d| d.entries.push((index, slot.clone())));
        slot
    }

    /// Adds what a response returned to the draft's [`AuditDraft::disclosed`].
    pub fn disclose(&self, seen: Disclosed) {
        if seen.0.is_empty() {
            return;
        }
        self.update(|d| {
            for (p, n) in seen.0 {
                *d.disclosed.entry(p).or_default() += n;
            }
        });
    }

    /// Sets an entry's outcome (`detail`: the error kind, if any).
    pub fn finish(&self, status: u16, detail: Option<&'static str>) {
        self.update(|d| {
            d.status = Some(status);
            d.detail = detail;
        });
    }
}

/// `allowed` (2xx/3xx), `denied` (401/403/429), `failed` (other errors).
pub fn outcome_for(status: u16) -> &'static str {
    match status {
        200..=399 => "allowed",
        401 | 403 | 429 => "denied",
        _ => "failed",
    }
}

/// The stored shape of a facade request record (keys are part of the audit format: the
/// `AuditEvent` view, `audit export` and the indexes read them).
///
/// A bundle entry's record (`kind = "fhir-bundle-entry"`) has the same keys plus `entry` (its
/// position in the Bundle); a disclosure record (`kind = "fhir-disclosure"`) repeats the request's
/// (or the entry's) keys for one more patient, with `returned` = that patient's resources. Both
/// carry the whole request's `latency_us`; `review` (of a break-glass access) is asked on the
/// request's record only.
#[derive(Serialize)]
struct Record<'a> {
    kind: &'static str,
    time: i64,
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    entry: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patient: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource_id: Option<&'a str>,
    interaction: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    scopes: Option<&'a str>,
    outcome: &'static str,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    returned: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend: Option<&'a str>,
    latency_us: u64,
    policy_version: &'a str,
    break_glass: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    break_glass_reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    review: Option<&'static str>,
}

impl AuditDraft {
    /// The request's record, then one per patient it disclosed, then one per bundle entry (each
    /// followed by its own disclosures), in entry order.
    pub fn into_records(
        mut self,
        status: u16,
        latency_us: u64,
        policy_version: &str,
    ) -> Vec<PreparedRecord> {
        let entries: Vec<(usize, AuditDraft)> = std::mem::take(&mut self.entries)
            .into_iter()
            .map(|(index, slot)| {
                let e = slot.take();
                let entry = AuditDraft {
                    request_id: self.request_id.clone(),
                    time_ms: self.time_ms,
                    tenant: self.tenant.clone(),
                    client: self.client.clone(),
                    user: self.user.clone(),
                    role: self.role.clone(),
                    scopes: self.scopes.clone(),
                    break_glass: self.break_glass.clone(),
                    context_patient: self.context_patient.clone(),
                    detail: if e.status.is_some() {
                        e.detail
                    } else {
                        e.detail.or(self.detail)
                    },
                    status: Some(e.status.unwrap_or(status)),
                    ..e
                };
                (index, entry)
            })
            .collect();
        let mut out = Vec::with_capacity(1 + entries.len());
        self.status = Some(status);
        self.push_records(&mut out, None, latency_us, policy_version);
        for (index, entry) in entries {
            entry.push_records(&mut out, Some(index), latency_us, policy_version);
        }
        out
    }

    /// The request's record, serialized once (no intermediate JSON tree: this runs for every
    /// request), with the tenant, time and patient the audit indexes need.
    pub fn into_record(self, status: u16, latency_us: u64, policy_version: &str) -> PreparedRecord {
        let d = AuditDraft {
            status: Some(status),
            ..self
        };
        d.serialize("fhir-request", None, latency_us, policy_version)
    }

    /// This draft's record and its disclosures'.
    fn push_records(
        mut self,
        out: &mut Vec<PreparedRecord>,
        entry: Option<usize>,
        latency_us: u64,
        policy_version: &str,
    ) {
        let kind = match entry {
            Some(_) => "fhir-bundle-entry",
            None => "fhir-request",
        };
        let disclosed = std::mem::take(&mut self.disclosed);
        if disclosed.is_empty() {
            out.push(self.serialize(kind, entry, latency_us, policy_version));
            return;
        }
        let own = self.patient.clone().or(self.context_patient.clone());
        let template = self.clone();
        out.push(self.serialize(kind, entry, latency_us, policy_version));
        for (patient, n) in disclosed {
            if own.as_deref() == Some(patient.as_str()) {
                continue;
            }
            let d = AuditDraft {
                patient: Some(patient),
                context_patient: None,
                returned: Some(n),
                ..template.clone()
            };
            out.push(d.serialize("fhir-disclosure", entry, latency_us, policy_version));
        }
    }

    fn serialize(
        self,
        kind: &'static str,
        entry: Option<usize>,
        latency_us: u64,
        policy_version: &str,
    ) -> PreparedRecord {
        let status = self.status.unwrap_or(0);
        let patient = self.patient.as_deref().or(self.context_patient.as_deref());
        let record = Record {
            kind,
            time: self.time_ms,
            request_id: &self.request_id,
            entry,
            tenant: self.tenant.as_deref(),
            client: self.client.as_deref(),
            user: self.user.as_deref(),
            role: self.role.as_deref(),
            patient,
            resource_type: self.resource_type.as_deref(),
            resource_id: self.resource_id.as_deref(),
            interaction: self.interaction,
            scopes: self.scopes.as_deref(),
            outcome: outcome_for(status),
            status,
            detail: self.detail,
            returned: self.returned,
            backend: self.backend.as_deref(),
            latency_us,
            policy_version,
            break_glass: self.break_glass.is_some(),
            break_glass_reason: self.break_glass.as_deref(),
            review: self
                .break_glass
                .as_ref()
                .filter(|_| kind == "fhir-request")
                .map(|_| "required"),
        };
        let json = serde_json::to_vec(&record).expect("audit records serialize");
        PreparedRecord::serialized(
            json,
            self.tenant.as_deref().unwrap_or(""),
            self.time_ms,
            patient,
        )
    }
}

fn action_code(interaction: &str) -> &'static str {
    match interaction {
        "create" => "C",
        "update" | "patch" => "U",
        "delete" => "D",
        "read" | "vread" | "history-instance" => "R",
        "transaction" | "operation-everything" | "admin" => "E",
        _ => "E",
    }
}

/// An audit entry as a FHIR R4 `AuditEvent` (id = the chain sequence number).
pub fn to_audit_event(e: &AuditEntry) -> Value {
    match e.body.get("kind").and_then(Value::as_str) {
        Some(kind @ ("ingress" | "egress")) => message_event(e, kind == "ingress"),
        _ => request_event(e),
    }
}

const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";

/// A message received from a partner (ingress: DICOM "Import") or sent on to one (egress:
/// "Export"): its time is the record's `at`, its outcome the adapter's word for it.
fn message_event(e: &AuditEntry, ingress: bool) -> Value {
    let b = &e.body;
    let s = |k: &str| b.get(k).and_then(Value::as_str);
    let outcome = s("outcome").unwrap_or("unknown");
    let code = match outcome {
        "accepted" | "duplicate" | "delivered" => "0",
        _ => "4",
    };
    let desc = match s("ack_code") {
        Some(ack) => format!("{outcome} (ACK {ack})"),
        None => outcome.to_string(),
    };
    let (event, display, action) = if ingress {
        ("110107", "Import", "C")
    } else {
        ("110106", "Export", "R")
    };
    let mut agent = json!({
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": if ingress { "AUT" } else { "IRCP" }}]},
        "who": {"identifier": {"system": "urn:tributary:partner", "value": s("partner").unwrap_or("anonymous")}},
        "requestor": ingress,
    });
    if let Some(addr) = s("remote_addr") {
        agent["network"] = json!({"address": addr, "type": "2"});
    }
    let mut ev = json!({
        "resourceType": "AuditEvent",
        "id": e.seq.to_string(),
        "type": {"system": DCM, "code": event, "display": display},
        "subtype": [{"system": "urn:tributary:protocol", "code": s("protocol").unwrap_or("unknown")}],
        "action": action,
        "recorded": tributary_core::format_rfc3339_millis(tributary_storage::record_time(b).unwrap_or(0)),
        "outcome": code,
        "outcomeDesc": desc,
        "agent": [agent],
        "source": {"site": s("tenant").unwrap_or(""), "observer": {"display": format!("tributary {}", s("listener").or(s("route")).unwrap_or("adapter"))}},
    });
    if let Some(id) = s("message_id") {
        let mut entity = json!({
            "what": {"identifier": {"system": "urn:tributary:message", "value": id}},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"},
        });
        if let Some(mt) = s("message_type") {
            entity["detail"] = json!([{"type": "message-type", "valueString": mt}]);
        }
        ev["entity"] = json!([entity]);
    }
    ev
}

fn request_event(e: &AuditEntry) -> Value {
    let b = &e.body;
    let s = |k: &str| b.get(k).and_then(Value::as_str);
    let status = b.get("status").and_then(Value::as_u64).unwrap_or(0);
    let outcome = match outcome_for(status as u16) {
        "allowed" => "0",
        "denied" => "4",
        _ => "8",
    };
    let time = b.get("time").and_then(Value::as_i64).unwrap_or(0);
    let interaction = s("interaction").unwrap_or("unknown");
    let mut agent = json!({
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]},
        "who": {"identifier": {"system": "urn:tributary:client", "value": s("client").unwrap_or("anonymous")}},
        "requestor": true,
    });
    if let Some(u) = s("user") {
        agent["altId"] = json!(u);
    }
    if let Some(r) = s("role") {
        agent["role"] = json!([{"text": r}]);
    }
    if let Some(scopes) = s("scopes") {
        agent["policy"] = json!(scopes.split_whitespace().collect::<Vec<_>>());
    }
    let mut entity = Vec::new();
    if let Some(t) = s("resource_type") {
        let what = match s("resource_id") {
            Some(id) => format!("{t}/{id}"),
            None => t.to_string(),
        };
        entity.push(json!({"what": {"reference": what}, "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"}}));
    }
    if let Some(p) = s("patient") {
        entity.push(json!({"what": {"reference": format!("Patient/{p}")}, "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1"}, "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1"}}));
    }
    let mut ev = json!({
        "resourceType": "AuditEvent",
        "id": e.seq.to_string(),
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "RESTful Operation"},
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": interaction}],
        "action": action_code(interaction),
        "recorded": tributary_core::format_rfc3339_millis(time),
        "outcome": outcome,
        "outcomeDesc": format!("HTTP {status}"),
        "agent": [agent],
        "source": {"site": s("tenant").unwrap_or(""), "observer": {"display": "tributary facade"}},
        "extension": [
            {"url": "urn:tributary:audit:request-id", "valueString": s("request_id").unwrap_or("")},
            {"url": "urn:tributary:audit:policy-version", "valueString": s("policy_version").unwrap_or("")},
            {"url": "urn:tributary:audit:break-glass", "valueBoolean": b.get("break_glass").and_then(Value::as_bool).unwrap_or(false)},
        ],
    });
    if !entity.is_empty() {
        ev["entity"] = Value::Array(entity);
    }
    if let (Some(i), Some(ext)) = (
        b.get("entry").and_then(Value::as_u64),
        ev["extension"].as_array_mut(),
    ) {
        ext.push(json!({"url": "urn:tributary:audit:bundle-entry", "valueInteger": i}));
    }
    if let Some(reason) = s("break_glass_reason") {
        ev["purposeOfEvent"] = json!([{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "ETREAT"}], "text": reason}]);
    }
    ev
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingress_records_read_as_imports_with_their_own_time_and_outcome() {
        let entry = |outcome: &str| AuditEntry {
            seq: 7,
            prev: String::new(),
            body: json!({"kind": "ingress", "protocol": "hl7v2-mllp", "at": "2026-12-03T19:03:35.962Z",
                "listener": "mllp", "tenant": "t1", "partner": "lab", "remote_addr": "10.0.0.5",
                "outcome": outcome, "message_id": "m-1", "message_type": "ADT^A01"}),
        };
        let ev = to_audit_event(&entry("accepted"));
        assert_eq!(ev["type"]["code"], "110107");
        assert_eq!(ev["recorded"], "2026-12-03T19:03:35.962Z");
        assert_eq!(ev["outcome"], "0");
        assert_eq!(ev["agent"][0]["who"]["identifier"]["value"], "lab");
        assert_eq!(ev["entity"][0]["what"]["identifier"]["value"], "m-1");
        assert_eq!(ev["source"]["site"], "t1");
        let ev = to_audit_event(&entry("rejected_unparseable"));
        assert_eq!(ev["outcome"], "4");
        assert_eq!(ev["outcomeDesc"], "rejected_unparseable");
        let mut egress = entry("refused_downstream");
        egress.body["kind"] = json!("egress");
        assert_eq!(to_audit_event(&egress)["type"]["code"], "110106");
    }

    #[test]
    fn record_has_required_fields_and_no_unknown_ones() {
        let d = AuditDraft {
            request_id: "r1".into(),
            time_ms: 5,
            tenant: Some("t".into()),
            client: Some("app".into()),
            patient: Some("p1".into()),
            resource_type: Some("Observation".into()),
            resource_id: Some("o1".into()),
            interaction: "read",
            scopes: Some("patient/*.rs".into()),
            break_glass: Some("emergency".into()),
            ..Default::default()
        };
        let r: Value = serde_json::from_slice(d.into_record(200, 900, "pv1").json()).unwrap();
        for k in [
            "time",
            "tenant",
            "client",
            "patient",
            "resource_type",
            "resource_id",
            "interaction",
            "scopes",
            "outcome",
            "status",
            "latency_us",
            "policy_version",
            "break_glass",
            "request_id",
        ] {
            assert!(r.get(k).is_some(), "missing {k}");
        }
        assert_eq!(r["outcome"], "allowed");
        assert_eq!(r["review"], "required");
        let ev = to_audit_event(&AuditEntry {
            seq: 9,
            prev: String::new(),
            body: r,
        });
        assert_eq!(ev["id"], "9");
        assert_eq!(ev["entity"][1]["what"]["reference"], "Patient/p1");
    }

    #[test]
    fn bundle_entries_follow_the_request_record_with_its_identity() {
        let slot = AuditSlot::default();
        slot.update(|d| {
            d.request_id = "r3".into();
            d.time_ms = 9;
            d.tenant = Some("t".into());
            d.client = Some("app".into());
            d.interaction = "transaction";
            d.resource_type = Some("Bundle".into());
            d.break_glass = Some("emergency".into());
        });
        let read = slot.entry(0, "GET", "Observation/o1");
        read.update(|d| d.patient = Some("p1".into()));
        read.finish(200, None);
        // Never finished (the transaction failed at commit): the request's outcome.
        let search = slot.entry(1, "GET", "/Observation?patient=p2&code=x");
        slot.update(|d| d.detail = Some("conflict"));
        let records: Vec<Value> = slot
            .take()
            .into_records(409, 5, "pv")
            .iter()
            .map(|r| serde_json::from_slice(r.json()).unwrap())
            .collect();
        assert_eq!(records.len(), 3);
        assert_eq!(records[0]["kind"], "fhir-request");
        assert!(records[0].get("entry").is_none());
        assert_eq!(records[0]["review"], "required");
        for (i, r) in records[1..].iter().enumerate() {
            assert_eq!(r["kind"], "fhir-bundle-entry");
            assert_eq!(r["entry"], i);
            assert_eq!(
                (&r["request_id"], &r["client"]),
                (&json!("r3"), &json!("app"))
            );
            assert_eq!(r["break_glass_reason"], "emergency");
            assert!(r.get("review").is_none());
        }
        assert_eq!(
            (&records[1]["interaction"], &records[1]["resource_id"]),
            (&json!("read"), &json!("o1"))
        );
        assert_eq!(
            (&records[1]["status"], &records[1]["patient"]),
            (&json!(200), &json!("p1"))
        );
        assert_eq!(records[2]["interaction"], "search-type");
        assert_eq!(records[2]["patient"], "p2");
        assert_eq!(
            (&records[2]["status"], &records[2]["detail"]),
            (&json!(409), &json!("conflict"))
        );
        drop(search);
    }

    #[test]
    fn disclosures_count_resources_once_and_skip_the_recorded_patient() {
        let mut seen = Disclosed::default();
        let both =
            json!({"subject": {"reference": "Patient/p1"}, "patient": {"reference": "Patient/p1"}});
        seen.add("Observation", "o1", &both);
        seen.add(
            "Observation",
            "o2",
            &json!({"subject": {"reference": "Patient/p2"}}),
        );
        seen.add("Patient", "p2", &json!({}));
        seen.add("Practitioner", "d1", &json!({}));
        let slot = AuditSlot::default();
        slot.update(|d| {
            d.request_id = "r4".into();
            d.interaction = "search-type";
            d.context_patient = Some("p1".into());
        });
        slot.disclose(seen);
        let records: Vec<Value> = slot
            .take()
            .into_records(200, 1, "pv")
            .iter()
            .map(|r| serde_json::from_slice(r.json()).unwrap())
            .collect();
        let rows: Vec<_> = records
            .iter()
            .map(|r| {
                (
                    r["kind"].clone(),
                    r["patient"].clone(),
                    r["returned"].clone(),
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                (json!("fhir-request"), json!("p1"), Value::Null),
                (json!("fhir-disclosure"), json!("p2"), json!(2)),
            ]
        );
        assert_eq!(records[1]["request_id"], "r4");
    }

    #[test]
    fn absent_fields_are_left_out_and_the_token_patient_is_the_fallback() {
        let d = AuditDraft {
            request_id: "r2".into(),
            time_ms: 7,
            context_patient: Some("ctx".into()),
            interaction: "search-type",
            ..Default::default()
        };
        let r: Value = serde_json::from_slice(d.into_record(401, 12, "pv1").json()).unwrap();
        let keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "break_glass",
                "interaction",
                "kind",
                "latency_us",
                "outcome",
                "patient",
                "policy_version",
                "request_id",
                "status",
                "time"
            ]
        );
        assert_eq!(r["patient"], "ctx");
        assert_eq!(r["outcome"], "denied");
        assert_eq!(r["break_glass"], false);
    }
}
