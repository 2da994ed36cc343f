//! `_elements` and `_summary=true|text|data`: a subset of each matched resource instead of all of it
//! (FHIR R4 search §3.1.1.5.9–10). What R4 requires of the type, `id` and `meta` always stay, and
//! the subset is tagged `SUBSETTED`, so that a client cannot mistake it for the whole resource
//! and write it back over the stored one.

use crate::error::{ApiError, ApiResult};
use serde_json::{json, Value};
use tributary_core::fhir_r4;

const SUBSETTED_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

/// Whether `r` carries the `SUBSETTED` tag: it is a part of a resource, not one to store.
pub(crate) fn is_subsetted(r: &Value) -> bool {
    r.pointer("/meta/tag")
        .and_then(Value::as_array)
        .is_some_and(|tags| {
            tags.iter()
                .any(|t| t["code"] == "SUBSETTED" && t["system"] == SUBSETTED_SYSTEM)
        })
}

pub(crate) enum Subset {
    /// Only these top-level elements (a choice name such as `value` keeps `valueQuantity`).
    Elements(Vec<String>),
    /// Everything but the narrative.
    Data,
    /// The narrative and what R4 requires.
    Text,
    /// The elements R4 marks `isSummary`, inside backbone elements too (`Observation.component`
    /// keeps its `code` and `value[x]`); a datatype's value comes whole.
    True,
}

impl Subset {
    /// The subset `params` ask for on `rtype`, if any; a name `rtype` does not have is a 400.
    pub fn from_params(rtype: &str, params: &[(String, String)]) -> ApiResult<Option<Subset>> {
        let mut out = None;
        for (k, v) in params {
            match (k.as_str(), v.as_str()) {
                ("_elements", list) => {
                    let mut names = Vec::new();
                    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                        if fhir_r4::element(rtype, name).is_none()
                            && !fhir_r4::has_choice(rtype, name)
                        {
                            return Err(ApiError::BadRequest(format!(
                                "_elements: {rtype} has no element {name:?}"
                            )));
                        }
                        names.push(name.to_string());
                    }
                    out = Some(Subset::Elements(names));
                }
                ("_summary", "data") => out = Some(Subset::Data),
                ("_summary", "text") => out = Some(Subset::Text),
                ("_summary", "true") => out = Some(Subset::True),
                _ => {}
            }
        }
        Ok(out)
    }

    /// Cuts `r` (of `rtype`) down to the subset and tags it.
    pub fn apply(&self, rtype: &str, r: &mut Value) {
        let Some(o) = r.as_object_mut() else { return };
        let required = fhir_r4::required(rtype);
        o.retain(|k, _| {
            let always = matches!(k.as_str(), "resourceType" | "id" | "meta")
                || required.iter().any(|q| q.met_by(|e| e == k));
            always
                || match self {
                    Subset::Elements(names) => names
                        .iter()
                        .any(|n| k == n || fhir_r4::is_choice_member(k, n)),
                    Subset::Data => k != "text",
                    Subset::Text => k == "text",
                    Subset::True => true,
                }
        });
        if let Subset::True = self {
            summary_of(rtype, "", o);
        }
        let meta = o.entry("meta").or_insert_with(|| json!({}));
        if let Some(m) = meta.as_object_mut() {
            let tags = m.entry("tag").or_insert_with(|| json!([]));
            if let Some(t) = tags.as_array_mut() {
                t.push(json!({
                    "system": SUBSETTED_SYSTEM,
                    "code": "SUBSETTED",
                    "display": "subsetted"
                }));
            }
        }
    }
}

/// Keeps the members of `o` (the resource, or the backbone element at `path`) that R4 marks
/// as summary elements, and cuts the kept backbone elements down the same way. A primitive's
/// extension (`_birthDate`) goes with its value. `resourceType` and what R4 requires of the
/// resource stay (`id` and `meta` are summary elements).
fn summary_of(rtype: &str, path: &str, o: &mut serde_json::Map<String, Value>) {
    o.retain(|k, v| {
        let name = k.strip_prefix('_').unwrap_or(k);
        let top = path.is_empty();
        if !fhir_r4::in_summary(rtype, path, name)
            && !(top
                && (k == "resourceType"
                    || fhir_r4::required(rtype)
                        .iter()
                        .any(|q| q.met_by(|e| e == name))))
        {
            return false;
        }
        let at = if top {
            name.to_string()
        } else {
            format!("{path}.{name}")
        };
        if fhir_r4::summary_has_parts(rtype, &at) {
            match v {
                Value::Object(m) => summary_of(rtype, &at, m),
                Value::Array(items) => items
                    .iter_mut()
                    .filter_map(Value::as_object_mut)
                    .for_each(|m| summary_of(rtype, &at, m)),
                _ => {}
            }
        }
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(k: &str, v: &str) -> Vec<(String, String)> {
        vec![(k.to_string(), v.to_string())]
    }

    /// `r` cut down as `param=value` asks, and its top-level element names, sorted.
    fn cut(r: &Value, param: &str, value: &str) -> (Value, Vec<String>) {
        let mut v = r.clone();
        let rtype = r["resourceType"].as_str().unwrap();
        Subset::from_params(rtype, &params(param, value))
            .unwrap()
            .unwrap()
            .apply(rtype, &mut v);
        let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        (v, keys)
    }

    #[test]
    fn elements_keep_what_is_asked_and_what_r4_requires_and_are_tagged() {
        let obs = json!({"resourceType": "Observation", "id": "o1", "meta": {"versionId": "2"},
            "text": {"status": "generated", "div": "<div/>"}, "status": "final",
            "code": {"text": "Hb"}, "valueQuantity": {"value": 13.2}, "note": [{"text": "n"}],
            "subject": {"reference": "Patient/p1"}});
        let (v, keys) = cut(&obs, "_elements", "value,subject");
        assert_eq!(
            keys,
            [
                "code",
                "id",
                "meta",
                "resourceType",
                "status",
                "subject",
                "valueQuantity"
            ]
        );
        assert_eq!(v["meta"]["versionId"], "2");
        assert_eq!(v["meta"]["tag"][0]["code"], "SUBSETTED");
        let (d, _) = cut(&obs, "_summary", "data");
        assert!(d.get("text").is_none() && d.get("note").is_some());
        let (t, _) = cut(&obs, "_summary", "text");
        assert!(t.get("text").is_some() && t.get("note").is_none() && t.get("code").is_some());
    }

    #[test]
    fn summary_true_keeps_the_summary_elements_at_every_level() {
        let obs = json!({"resourceType": "Observation", "id": "o1", "meta": {"versionId": "2"},
            "text": {"status": "generated", "div": "<div/>"}, "status": "final",
            "_status": {"extension": [{"url": "urn:x", "valueString": "y"}]},
            "category": [{"text": "laboratory"}], "code": {"text": "BP", "coding": [{"code": "85354-9"}]},
            "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2026-01-02",
            "valueQuantity": {"value": 13.2, "unit": "g/dL"}, "note": [{"text": "n"}],
            "interpretation": [{"text": "H"}], "referenceRange": [{"text": "10-15"}],
            "component": [{"code": {"text": "sys"}, "valueQuantity": {"value": 120},
                           "interpretation": [{"text": "N"}]}]});
        let (v, keys) = cut(&obs, "_summary", "true");
        assert_eq!(
            keys,
            [
                "_status",
                "code",
                "component",
                "effectiveDateTime",
                "id",
                "meta",
                "resourceType",
                "status",
                "subject",
                "valueQuantity"
            ]
        );
        // a datatype comes whole; a backbone element keeps its own summary parts
        assert_eq!(v["code"]["coding"][0]["code"], "85354-9");
        assert_eq!(
            v["component"],
            json!([{"code": {"text": "sys"}, "valueQuantity": {"value": 120}}])
        );
        assert_eq!(v["meta"]["tag"][0]["code"], "SUBSETTED");
        // what R4 requires stays even where it is not a summary element
        let a = json!({"resourceType": "Appointment", "id": "a", "status": "booked",
            "participant": [{"status": "accepted"}], "comment": "x"});
        let (a, _) = cut(&a, "_summary", "true");
        assert!(a.get("participant").is_some() && a.get("comment").is_none());
        assert!(!fhir_r4::in_summary("Appointment", "", "participant"));
    }

    #[test]
    fn an_element_the_type_does_not_have_is_refused() {
        for bad in ["valueQuantty", "birthDate", "value,"] {
            let r = Subset::from_params("Observation", &params("_elements", bad));
            if bad == "value," {
                assert!(r.is_ok(), "an empty name in the list is skipped");
            } else {
                assert!(matches!(r, Err(ApiError::BadRequest(_))), "{bad}");
            }
        }
        assert!(Subset::from_params("Patient", &params("_summary", "count"))
            .unwrap()
            .is_none());
    }
}
