//! FHIR messages → the store: the pass-through, normalising mapping for feeds that already speak
//! FHIR R4 (notifications from upstream servers' Subscriptions, FHIR on an AMQP queue).
//!
//! Each resource keeps its content. Its id becomes a deterministic one from tenant, partner,
//! type and the sender's id, so two senders' `Patient/1` stay two patients and a notification
//! sent twice changes nothing. References between resources are rewritten to match, whether
//! they are relative (`Patient/1`) or under the entry's server (`https://ehr/fhir/Patient/1`);
//! the sender's address is kept in `meta.source`.

use serde_json::Value;
use tributary_core::deterministic_id;

/// The "mapping version" a FHIR message is committed with; bump when the rules below change.
pub const VERSION: &str = "fhir-passthrough-1";

/// The resources of a FHIR message, ready to store: (type, id, resource).
pub type Resources = Vec<(String, String, Value)>;

/// Most resources one FHIR message may carry.
const MAX_RESOURCES: usize = 10_000;

pub fn normalise(tenant: &str, partner: &str, payload: &[u8]) -> Result<Resources, String> {
    let root: Value = serde_json::from_slice(payload).map_err(|e| format!("not FHIR JSON: {e}"))?;
    let mut found: Vec<(Value, Option<String>)> = Vec::new();
    match root.get("resourceType").and_then(Value::as_str) {
        Some("Bundle") => {
            let entries = root.get("entry").and_then(Value::as_array);
            for e in entries.into_iter().flatten() {
                let Some(r) = e.get("resource") else { continue };
                if not_stored(r) {
                    continue;
                }
                let full_url = e.get("fullUrl").and_then(Value::as_str).map(str::to_string);
                found.push((r.clone(), full_url));
            }
        }
        Some(_) => found.push((root, None)),
        None => return Err("no resourceType".into()),
    }
    if found.len() > MAX_RESOURCES {
        return Err(format!(
            "more than {MAX_RESOURCES} resources in one message"
        ));
    }
    // the sender's ids → ours, for the resources and the references to them
    let mut ids = std::collections::HashMap::new();
    for (i, (r, _)) in found.iter().enumerate() {
        let rtype = r.get("resourceType").and_then(Value::as_str).unwrap_or("");
        if !valid_type(rtype) {
            return Err(format!("entry {i}: {rtype:?} is not a resource type"));
        }
        let Some(id) = r
            .get("id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
        else {
            return Err(format!("entry {i}: {rtype} without an id"));
        };
        ids.insert(
            format!("{rtype}/{id}"),
            deterministic_id(&[tenant, partner, rtype, id]),
        );
    }
    let mut out = Vec::with_capacity(found.len());
    for (mut r, full_url) in found {
        let rtype = r["resourceType"].as_str().unwrap_or_default().to_string();
        let theirs = format!("{rtype}/{}", r["id"].as_str().unwrap_or_default());
        let ours = ids[&theirs].clone();
        rewrite_references(&mut r, &ids);
        let meta = r
            .as_object_mut()
            .expect("a resource is an object")
            .entry("meta")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(m) = meta.as_object_mut() {
            // the sender's versionId and lastUpdated are theirs; the store stamps ours
            m.remove("versionId");
            m.remove("lastUpdated");
            m.entry("source")
                .or_insert_with(|| Value::String(full_url.unwrap_or(theirs)));
        }
        out.push((rtype, ours, r));
    }
    Ok(out)
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

fn valid_type(t: &str) -> bool {
    t.len() <= 64
        && t.starts_with(|c: char| c.is_ascii_uppercase())
        && t.chars().all(|c| c.is_ascii_alphanumeric())
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
                "subject": {"reference": "https://ehr.example/fhir/Patient/7"},
                "participant": [{"individual": {"reference": "Practitioner/elsewhere"}}],
                "basedOn": [{"reference": "Patient/7/_history/3"}]}}
        ]});
        let out = normalise("t1", "ehr", bundle.to_string().as_bytes()).unwrap();
        assert_eq!(out.len(), 2);
        let patient_id = deterministic_id(&["t1", "ehr", "Patient", "7"]);
        assert_eq!(
            (out[0].0.as_str(), out[0].1.as_str()),
            ("Patient", patient_id.as_str())
        );
        assert_eq!(
            out[0].2["meta"],
            json!({"source": "https://ehr.example/fhir/Patient/7"})
        );
        let enc = &out[1].2;
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
        assert_ne!(other[0].1, patient_id);
    }

    #[test]
    fn what_cannot_be_stored_is_named() {
        let err = |v: Value| normalise("t", "p", v.to_string().as_bytes()).unwrap_err();
        assert!(err(json!({"resourceType": "Patient"})).contains("without an id"));
        assert!(err(json!({"id": "1"})).contains("no resourceType"));
        assert!(err(json!({"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "x y", "id": "1"}}]}))
            .contains("not a resource type"));
        assert!(normalise("t", "p", b"<xml/>")
            .unwrap_err()
            .contains("not FHIR JSON"));
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
        assert_eq!(out[0].0, "Encounter");
        assert!(out[0].2["meta"]["source"]
            .as_str()
            .unwrap()
            .ends_with("/Encounter/86009987-eabe-42bf-8c02-b112b18cb616"));
    }
}
