//! `Subscription` resources written through the facade carry what the writing token could read,
//! so that delivery (rest-hook or websocket, crate `tributary-subscriptions`) never sends a
//! subscriber more than its token could have read:
//! - a token with a patient context stamps `subscription-patient-context` (that patient only);
//! - the token's read scopes stamp `subscription-allowed-types` (`*` or `Observation,Encounter`);
//! - the token's consent/grant id and `jti` stamp `subscription-grant`: revoking either (consent
//!   revocation) stops the Subscription's delivery too.
//!
//! A client's own values for these extensions are replaced, never trusted. Types granted
//! only under SMART v2 narrowing (`patient/Observation.rs?category=laboratory`) are left out
//! (delivery cannot apply the narrowing), so such a token receives none of that type.

use crate::policy::Access;
use crate::scopes::{Perm, ScopeContext};
use serde_json::{json, Value};

/// Same URLs as `tributary_subscriptions::model` (kept here to spare the facade the dependency).
pub const PATIENT_CONTEXT_EXT: &str =
    "http://tributary.dev/fhir/StructureDefinition/subscription-patient-context";
pub const ALLOWED_TYPES_EXT: &str =
    "http://tributary.dev/fhir/StructureDefinition/subscription-allowed-types";
/// The writing token's consent/grant id and token id (`jti`), one extension each: revoking
/// either stops delivery, as it stops the token.
pub const GRANT_EXT: &str = "http://tributary.dev/fhir/StructureDefinition/subscription-grant";
/// The writing token's client id: the audit records of what is delivered name it.
pub const CLIENT_EXT: &str = "http://tributary.dev/fhir/StructureDefinition/subscription-client";

/// The patient a Subscription is confined to, if any (its compartment, for the policy checks).
pub fn patient_context(v: &Value) -> Option<String> {
    v.get("extension")?
        .as_array()?
        .iter()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(PATIENT_CONTEXT_EXT))?
        .pointer("/valueReference/reference")?
        .as_str()?
        .strip_prefix("Patient/")
        .map(str::to_string)
}

/// Whether the caller may receive everything `sub` (a stored Subscription) delivers: its
/// `$events` and websocket binding hand out resources under the Subscription's stamped bounds,
/// which were the *creator's* token's; another caller that may read the Subscription itself
/// must not get more than its own token could read.
pub fn covers(access: &Access, sub: &Value) -> bool {
    if let Some(pid) = &access.principal.patient {
        if patient_context(sub).as_deref() != Some(pid.as_str()) {
            return false;
        }
    }
    let mine = readable_types(access);
    if mine == "*" {
        return true;
    }
    let theirs = sub
        .get("extension")
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter()
                .find(|e| e.get("url").and_then(Value::as_str) == Some(ALLOWED_TYPES_EXT))
        })
        .and_then(|e| e.get("valueString"))
        .and_then(Value::as_str);
    match theirs {
        Some(t) if t.trim() != "*" => {
            let mine: Vec<&str> = mine.split(',').collect();
            t.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .all(|t| mine.contains(&t))
        }
        _ => false,
    }
}

/// The resource types the token may read without narrowing: `*` or a sorted list.
fn readable_types(access: &Access) -> String {
    let p = &access.principal;
    let mut types: Vec<String> = Vec::new();
    for s in &p.scopes.scopes {
        if s.context == ScopeContext::Patient && p.patient.is_none() {
            continue;
        }
        if !s.grants(Perm::Read, s.resource_type.as_deref().unwrap_or("Patient"))
            || !s.constraints.is_empty()
        {
            continue;
        }
        match &s.resource_type {
            None => return "*".into(),
            Some(t) => types.push(t.clone()),
        }
    }
    types.sort();
    types.dedup();
    types.join(",")
}

/// Every write of a resource of type `rtype` goes through here before its access check: a
/// Subscription gets the two extensions that bound what it may deliver (patient context,
/// readable types) from the writing token, whatever the body said — on create, update,
/// conditional update, PATCH and transaction entries alike, or a write could lift them.
pub fn stamp_if_subscription(access: &Access, rtype: &str, v: &mut Value) {
    if rtype == "Subscription" {
        stamp(access, v);
    }
}

/// Replaces the stamped extensions on a Subscription being written with the token's values.
fn stamp(access: &Access, v: &mut Value) {
    let p = &access.principal;
    let mut ext: Vec<Value> = v
        .get("extension")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| {
            let url = e.get("url").and_then(Value::as_str);
            url != Some(PATIENT_CONTEXT_EXT)
                && url != Some(ALLOWED_TYPES_EXT)
                && url != Some(GRANT_EXT)
                && url != Some(CLIENT_EXT)
        })
        .collect();
    ext.push(json!({"url": CLIENT_EXT, "valueString": p.client_id}));
    for id in [&p.grant, &p.jti].into_iter().flatten() {
        ext.push(json!({"url": GRANT_EXT, "valueString": id}));
    }
    if let Some(pid) = &p.patient {
        ext.push(json!({"url": PATIENT_CONTEXT_EXT, "valueReference": {"reference": format!("Patient/{pid}")}}));
    }
    ext.push(json!({"url": ALLOWED_TYPES_EXT, "valueString": readable_types(access)}));
    v["extension"] = Value::Array(ext);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Principal;
    use crate::scopes::ScopeSet;
    use std::sync::Arc;

    fn access(scope: &str, patient: Option<&str>) -> Access {
        Access {
            principal: Arc::new(Principal {
                client_id: "app".into(),
                user: None,
                tenant: "t".into(),
                role: None,
                role_kind: None,
                scopes: ScopeSet::parse(scope),
                scope_text: scope.into(),
                patient: patient.map(String::from),
                grant: None,
                jti: None,
                exp: i64::MAX,
            }),
            break_glass: false,
        }
    }

    #[test]
    fn stamps_patient_and_types_and_replaces_client_values() {
        let mut v = json!({"resourceType": "Subscription", "extension": [
            {"url": PATIENT_CONTEXT_EXT, "valueReference": {"reference": "Patient/someone-else"}},
            {"url": ALLOWED_TYPES_EXT, "valueString": "*"},
            {"url": CLIENT_EXT, "valueString": "someone-else"},
            {"url": "http://example.org/other", "valueString": "kept"}
        ]});
        stamp(
            &access(
                "patient/Observation.rs patient/Encounter.read patient/Condition.rs?category=x",
                Some("p1"),
            ),
            &mut v,
        );
        assert_eq!(patient_context(&v).as_deref(), Some("p1"));
        let ext = v["extension"].as_array().unwrap();
        assert_eq!(ext.len(), 4);
        assert!(ext
            .iter()
            .any(|e| e["url"] == CLIENT_EXT && e["valueString"] == "app"));
        assert!(ext.iter().any(|e| e["valueString"] == "kept"));
        assert!(ext
            .iter()
            .any(|e| e["url"] == ALLOWED_TYPES_EXT && e["valueString"] == "Encounter,Observation"));
        let mut v = json!({"resourceType": "Subscription",
            "extension": [{"url": GRANT_EXT, "valueString": "not-mine"}]});
        stamp(&access("system/*.cruds", None), &mut v);
        assert_eq!(patient_context(&v), None);
        assert_eq!(
            v["extension"],
            json!([
                {"url": CLIENT_EXT, "valueString": "app"},
                {"url": ALLOWED_TYPES_EXT, "valueString": "*"}
            ])
        );
        let mut granted = access("user/*.rs", None);
        let mut p = (*granted.principal).clone();
        p.grant = Some("consent-7".into());
        p.jti = Some("t-1".into());
        granted.principal = Arc::new(p);
        stamp(&granted, &mut v);
        let grants: Vec<&Value> = v["extension"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["url"] == GRANT_EXT)
            .map(|e| &e["valueString"])
            .collect();
        assert_eq!(grants, [&json!("consent-7"), &json!("t-1")]);
    }

    #[test]
    fn only_a_caller_who_could_read_everything_delivered_is_covered() {
        let mut wide = json!({"resourceType": "Subscription"});
        stamp(&access("system/*.rs", None), &mut wide);
        let mut labs = json!({"resourceType": "Subscription"});
        stamp(&access("patient/Observation.rs", Some("p1")), &mut labs);
        let cases = [
            ("system/*.rs", None, &wide, true),
            ("user/Subscription.rs", None, &wide, false),
            (
                "user/Subscription.rs user/Observation.rs",
                None,
                &wide,
                false,
            ),
            (
                "user/Subscription.rs user/Observation.rs",
                None,
                &labs,
                true,
            ),
            ("patient/*.rs", Some("p1"), &labs, true),
            ("patient/*.rs", Some("p2"), &labs, false),
            ("patient/*.rs", Some("p1"), &wide, false),
            ("user/Encounter.rs", None, &labs, false),
        ];
        for (scope, patient, sub, want) in cases {
            assert_eq!(
                covers(&access(scope, patient), sub),
                want,
                "{scope} {patient:?} on {sub}"
            );
        }
    }
}
