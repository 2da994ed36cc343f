//! FHIR messages → the store: the pass-through, normalising mapping for feeds that already speak
//! FHIR R4 (notifications from upstream servers' Subscriptions, FHIR on an AMQP queue).
//!
//! Each resource keeps its content. Its id becomes a deterministic one from tenant, partner,
//! type and the sender's id, so two senders' `Patient/1` stay two patients and a notification
//! sent twice changes nothing. References between resources are rewritten to match, whether
//! they are relative (`Patient/1`) or under the entry's server (`https://ehr/fhir/Patient/1`);
//! the sender's address is kept in `meta.source`.

use serde_json::Value;
use tributary_core::{deterministic_id, valid_fhir_id, valid_fhir_type as valid_type};

/// The "mapping version" a FHIR message is committed with; bump when the rules below change.
pub const VERSION: &str = "fhir-passthrough-1";

/// One change a FHIR message carries, ready to store: `resource` is `None` for a deletion.
#[derive(Debug)]
pub struct Change {
    pub resource_type: String,
    pub id: String,
    pub resource: Option<Value>,
}

/// Most resources one FHIR message may carry.
const MAX_RESOURCES: usize = 10_000;

/// An entry of the message, before our ids: the sender's `Type/id`, and the resource unless the
/// entry deletes it.
struct Found {
    rtype: String,
    theirs: String,
    resource: Option<Value>,
    full_url: Option<String>,
}

pub fn normalise(tenant: &str, partner: &str, payload: &[u8]) -> Result<Vec<Change>, String> {
    let root: Value = serde_json::from_slice(payload).map_err(|e| format!("not FHIR JSON: {e}"))?;
    let mut found: Vec<Found> = Vec::new();
    match root.get("resourceType").and_then(Value::as_str) {
        Some("Bundle") => {
            let entries = root.get("entry").and_then(Value::as_array);
            for (i, e) in entries.into_iter().flatten().enumerate() {
                if found.len() == MAX_RESOURCES {
                    return Err(format!(
                        "more than {MAX_RESOURCES} resources in one message"
                    ));
                }
                if let Some(f) = entry(i, e)? {
                    found.push(f);
                }
            }
        }
        Some(_) => found.push(resource(0, root, None)?),
        None => return Err("no resourceType".into()),
    }
    // the sender's ids → ours, for the resources and the references to them
    let ids: std::collections::HashMap<String, String> = found
        .iter()
        .map(|f| {
            let (rtype, id) = f.theirs.split_once('/').expect("Type/id");
            (
                f.theirs.clone(),
                deterministic_id(&[tenant, partner, rtype, id]),
            )
        })
        .collect();
    let mut out = Vec::with_capacity(found.len());
    for f in found {
        let ours = ids[&f.theirs].clone();
        let resource = f.resource.map(|mut r| {
            rewrite_references(&mut r, &ids);
            stamp_source(&mut r, f.full_url.as_deref().unwrap_or(&f.theirs));
            r
        });
        out.push(Change {
            resource_type: f.rtype,
            id: ours,
            resource,
        });
    }
    Ok(out)
}

/// A Bundle entry: a resource to store, a deletion (`request.method` `DELETE`, whose
/// `request.url` names the resource), or nothing for the notification's status. An entry that
/// names a resource without carrying it (an `id-only` notification nobody fetched) is an error:
/// storing nothing for it would lose the change without a word.
fn entry(i: usize, e: &Value) -> Result<Option<Found>, String> {
    let full_url = e.get("fullUrl").and_then(Value::as_str).map(str::to_string);
    if e.pointer("/request/method").and_then(Value::as_str) == Some("DELETE") {
        let url = e
            .pointer("/request/url")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("entry {i}: DELETE without request.url"))?;
        let (rtype, id) = deleted_target(url)
            .ok_or_else(|| format!("entry {i}: a DELETE whose request.url is not Type/id: only those can be applied (a conditional delete does not name the sender's resource)"))?;
        return Ok(Some(Found {
            theirs: format!("{rtype}/{id}"),
            rtype: rtype.to_string(),
            resource: None,
            full_url,
        }));
    }
    match e.get("resource") {
        Some(r) if not_stored(r) => Ok(None),
        Some(r) => resource(i, r.clone(), full_url).map(Some),
        None => Err(format!(
            "entry {i}: no resource to store (an id-only notification whose resources were not read from the sender; with the partner's upstream_base_url set, they are read on arrival)"
        )),
    }
}

fn resource(i: usize, r: Value, full_url: Option<String>) -> Result<Found, String> {
    let rtype = r.get("resourceType").and_then(Value::as_str).unwrap_or("");
    if !valid_type(rtype) {
        // not quoted: it is the sender's text, whatever it holds
        return Err(format!(
            "entry {i}: its resourceType is not a resource type name"
        ));
    }
    let Some(id) = r
        .get("id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    else {
        return Err(format!("entry {i}: {rtype} without an id"));
    };
    // What the facade would refuse is not stored from a feed either: the reason (paths and
    // element names, no values) stays with the message for a fix and a replay.
    if !tributary_core::fhir_r4::is_resource(rtype) {
        return Err(format!("entry {i}: {rtype} is not a FHIR R4 resource type"));
    }
    tributary_core::fhir_r4::check_resource(rtype, &r).map_err(|e| format!("entry {i}: {e}"))?;
    Ok(Found {
        theirs: format!("{rtype}/{id}"),
        rtype: rtype.to_string(),
        full_url,
        resource: Some(r),
    })
}

/// `Type/id`, optionally under a base URL, of a DELETE entry's `request.url`. (Errors never
/// quote that URL: a conditional one carries identifier values.)
fn deleted_target(url: &str) -> Option<(&str, &str)> {
    if url.contains('?') || url.contains('#') {
        return None;
    }
    let mut parts = url.trim_end_matches('/').rsplit('/');
    let id = parts.next()?;
    let rtype = parts.next()?;
    (valid_type(rtype) && valid_fhir_id(id)).then_some((rtype, id))
}

/// The sender's versionId and lastUpdated are theirs (the store stamps ours); where the resource
/// came from goes to `meta.source` unless the sender set one.
fn stamp_source(r: &mut Value, source: &str) {
    let Some(obj) = r.as_object_mut() else { return };
    let meta = obj
        .entry("meta")
        .or_insert_with(|| Value::Object(Default::default()));
    if let Some(m) = meta.as_object_mut() {
        m.remove("versionId");
        m.remove("lastUpdated");
        m.entry("source")
            .or_insert_with(|| Value::String(source.to_string()));
    }
}

/// Entries that are not data to store: the notification's status (R4 backport: a `Parameters`,
/// R5 style: a `SubscriptionStatus`). FHIR never persists `Parameters`: it carries operation
/// inputs and outputs.
fn not_stored(r: &Value) -> bool {
    matches!(
        r.get("resourceType").and_then(Value::as_str),
        Some("Parameters" | "SubscriptionStatus")
    )
}

/// Rewrites every `reference` that names a resource of this message, relative or absolute.
fn rewrite_references(v: &mut Value, ids: &std::collections::HashMap<String, String>) {
    match v {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get_mut("reference") {
                if let Some(new) = resolve(r, ids) {
                    *r = new;
                }
            }
            for (_, child) in map.iter_mut() {
                rewrite_references(child, ids);
            }
        }
        Value::Array(items) => {
            for child in items {
                rewrite_references(child, ids);
            }
        }
        _ => {}
    }
}

/// `Type/id`, `Type/id/_history/v` or `<base>/Type/id[...]` of a resource in `ids` → `Type/ours`.
fn resolve(reference: &str, ids: &std::collections::HashMap<String, String>) -> Option<String> {
    let path = reference.split('/').collect::<Vec<_>>();
    let at = match path.iter().rposition(|p| *p == "_history") {
        Some(h) if h >= 2 => h - 2,
        Some(_) => return None,
        None => path.len().checked_sub(2)?,
    };
    let key = format!("{}/{}", path[at], path.get(at + 1)?);
    ids.get(&key).map(|ours| format!("{}/{ours}", path[at]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_are_ours_references_follow_and_the_status_entry_is_left_out() {
        let bundle = json!({"resourceType": "Bundle", "type": "history", "entry": [
            {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Parameters", "id": "s",
                "meta": {"profile": ["http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4"]}}},
            {"fullUrl": "https://ehr.example/fhir/Patient/7", "resource": {"resourceType": "Patient", "id": "7",
                "meta": {"versionId": "3", "lastUpdated": "2026-01-01T00:00:00Z"}}},
            {"fullUrl": "https://ehr.example/fhir/Encounter/e1", "resource": {"resourceType": "Encounter", "id": "e1",
                "status": "finished", "class": {"code": "AMB"},
                "subject": {"reference": "https://ehr.example/fhir/Patient/7"},
                "participant": [{"individual": {"reference": "Practitioner/elsewhere"}}],
                "basedOn": [{"reference": "Patient/7/_history/3"}]}}
        ]});
        let out = normalise("t1", "ehr", bundle.to_string().as_bytes()).unwrap();
        assert_eq!(out.len(), 2);
        let patient_id = deterministic_id(&["t1", "ehr", "Patient", "7"]);
        assert_eq!(
            (out[0].resource_type.as_str(), out[0].id.as_str()),
            ("Patient", patient_id.as_str())
        );
        assert_eq!(
            out[0].resource.as_ref().unwrap()["meta"],
            json!({"source": "https://ehr.example/fhir/Patient/7"})
        );
        let enc = out[1].resource.as_ref().unwrap();
        assert_eq!(enc["subject"]["reference"], format!("Patient/{patient_id}"));
        assert_eq!(
            enc["basedOn"][0]["reference"],
            format!("Patient/{patient_id}")
        );
        // a resource the message does not carry keeps the sender's reference
        assert_eq!(
            enc["participant"][0]["individual"]["reference"],
            "Practitioner/elsewhere"
        );
        // another sender's Patient/7 is another patient
        let other = normalise("t1", "lab", bundle.to_string().as_bytes()).unwrap();
        assert_ne!(other[0].id, patient_id);
    }

    #[test]
    fn what_cannot_be_stored_is_named() {
        let err = |v: Value| normalise("t", "p", v.to_string().as_bytes()).unwrap_err();
        assert!(err(json!({"resourceType": "Patient"})).contains("without an id"));
        assert!(err(json!({"id": "1"})).contains("no resourceType"));
        assert!(err(json!({"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "x y", "id": "1"}}]}))
            .contains("not a resource type"));
        assert_eq!(
            err(json!({"resourceType": "Bundle", "entry": [
                {"resource": {"resourceType": "Patient", "id": "p1"}},
                {"resource": {"resourceType": "Observation", "id": "o1", "status": "final",
                              "code": {"coding": [{"sytem": "http://loinc.org", "code": "1-8"}]}}}]})),
            "entry 1: Observation.code.coding[0] has no element `sytem` in FHIR R4 — did you mean `system`?"
        );
        assert_eq!(
            err(json!({"resourceType": "Requirements", "id": "r1"})),
            "entry 0: Requirements is not a FHIR R4 resource type"
        );
        assert!(normalise("t", "p", b"<xml/>")
            .unwrap_err()
            .contains("not FHIR JSON"));
    }

    #[test]
    fn a_deletion_names_our_id_and_an_unfetched_entry_is_an_error() {
        let bundle = json!({"resourceType": "Bundle", "type": "history", "entry": [
            {"fullUrl": "https://ehr.example/fhir/Observation/o1",
                "request": {"method": "DELETE", "url": "Observation/o1"},
                "response": {"status": "204"}},
            {"request": {"method": "DELETE", "url": "https://ehr.example/fhir/Observation/o2/"}},
            {"fullUrl": "https://ehr.example/fhir/DiagnosticReport/r1", "resource": {
                "resourceType": "DiagnosticReport", "id": "r1", "status": "final",
                "code": {"text": "CBC"}, "result": [{"reference": "Observation/o1"}]}}
        ]});
        let out = normalise("t1", "ehr", bundle.to_string().as_bytes()).unwrap();
        let o1 = deterministic_id(&["t1", "ehr", "Observation", "o1"]);
        let o2 = deterministic_id(&["t1", "ehr", "Observation", "o2"]);
        assert_eq!(
            (out[0].resource_type.as_str(), out[0].id.as_str()),
            ("Observation", o1.as_str())
        );
        assert!(out[0].resource.is_none());
        assert_eq!(out[1].id, o2);
        assert!(out[1].resource.is_none());
        // a reference to a deleted resource still names our id for it
        assert_eq!(
            out[2].resource.as_ref().unwrap()["result"][0]["reference"],
            format!("Observation/{o1}")
        );

        let err = |entry: Value| {
            let b = json!({"resourceType": "Bundle", "entry": [entry]});
            normalise("t", "p", b.to_string().as_bytes()).unwrap_err()
        };
        assert!(err(json!({"fullUrl": "https://ehr.example/fhir/Patient/7",
            "request": {"method": "PUT", "url": "Patient/7"}}))
        .contains("entry 0: no resource to store"));
        let conditional =
            err(json!({"request": {"method": "DELETE", "url": "Patient?identifier=x|MRN-4711"}}));
        assert!(conditional.contains("only those can be applied"));
        // reasons are logged and listed: never the sender's values
        assert!(!conditional.contains("MRN-4711"), "{conditional}");
        assert!(err(json!({"request": {"method": "DELETE"}})).contains("without request.url"));
    }

    /// The Subscriptions Backport IG's full-resource notification example, from the shared corpus.
    #[test]
    fn the_backport_full_resource_example_gives_its_encounter() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/corpus/fhir/subscriptions-backport/full_resource_notification_bundle_example.json");
        let Ok(bytes) = std::fs::read(&path) else {
            eprintln!(
                "skipped: {} not found (the shared corpus is absent)",
                path.display()
            );
            return;
        };
        let out = normalise("t1", "ehr", &bytes).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].resource_type, "Encounter");
        assert!(out[0].resource.as_ref().unwrap()["meta"]["source"]
            .as_str()
            .unwrap()
            .ends_with("/Encounter/86009987-eabe-42bf-8c02-b112b18cb616"));
    }
}
