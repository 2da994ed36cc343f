//! The parameters of `Patient/{id}/$everything` beyond paging (R4 OperationDefinition
//! Patient-everything): `_type`, `_since`, and the care-date range `start`/`end`. One filter
//! decides for the store's resources and for what the backend FHIR servers answer alike.

use crate::error::{ApiError, ApiResult};
use crate::policy::FhirRequest;
use crate::search::{date_range, resource_dates};
use serde_json::Value;

/// The parameters `$everything` takes; any other is refused (400) rather than ignored.
const PARAMS: [&str; 7] = [
    "_count", "_offset", "_type", "_since", "start", "end", "_format",
];

/// A `_type` value (comma-separated resource types) added to `into`; 400 on an unknown type.
pub(crate) fn parse_types(v: &str, into: &mut Vec<String>) -> ApiResult<()> {
    for t in v.split(',').map(str::trim) {
        crate::rest::check_type(t).map_err(|_| {
            ApiError::BadRequest(format!("_type: {t:?} is not a FHIR R4 resource type"))
        })?;
        into.push(t.to_string());
    }
    Ok(())
}

/// A `_since` value: an instant (date, time and offset), as epoch millis; 400 otherwise.
pub(crate) fn parse_since(v: &str) -> ApiResult<i64> {
    tributary_core::fhir_primitive::check("instant", &Value::String(v.to_string()))
        .ok()
        .and_then(|()| tributary_core::parse_rfc3339_millis(v))
        .ok_or_else(|| {
            ApiError::BadRequest("_since must be an instant (date, time and offset)".into())
        })
}

#[derive(Default)]
pub(crate) struct Filter {
    /// Only these types (`_type`, repeated or comma-separated); `None`: every type.
    types: Option<Vec<String>>,
    /// Only resources last updated at or after this instant (epoch millis).
    since: Option<i64>,
    /// The `since` as given, for a backend's `_lastUpdated=ge…`.
    pub since_text: Option<String>,
    /// Care dates from the start of this day, month or year (`start`).
    start: Option<i64>,
    /// Care dates up to the end of this day, month or year (`end`).
    end: Option<i64>,
}

impl Filter {
    pub fn parse(req: &FhirRequest) -> ApiResult<Filter> {
        let mut f = Filter::default();
        for (k, v) in &req.params {
            match k.as_str() {
                "_type" => parse_types(v, f.types.get_or_insert_with(Vec::new))?,
                "_since" => {
                    f.since = Some(parse_since(v)?);
                    f.since_text = Some(v.clone());
                }
                "start" | "end" => {
                    let (lo, hi) = date_range(v)
                        .ok_or_else(|| ApiError::BadRequest(format!("{k} must be a FHIR date")))?;
                    if k == "start" {
                        f.start = Some(lo);
                    } else {
                        f.end = Some(hi);
                    }
                }
                other if PARAMS.contains(&other) => {}
                other => {
                    return Err(ApiError::BadRequest(format!(
                        "$everything does not take {other:?} (it takes {})",
                        PARAMS.join(", ")
                    )))
                }
            }
        }
        Ok(f)
    }

    /// Whether resources of `rtype` are asked for at all.
    pub fn wants(&self, rtype: &str) -> bool {
        self.types
            .as_ref()
            .is_none_or(|t| t.iter().any(|x| x == rtype))
    }

    /// Whether `r` (of `rtype`) belongs in the answer. A resource with no care date (no element
    /// `date=` reads, or none valued) is kept by `start`/`end`: an undated allergy or problem is
    /// part of the record, and leaving it out would be the silent kind of shorter answer. The
    /// Patient itself has no care date, so only `_type` and `_since` apply to it.
    pub fn admits(&self, rtype: &str, r: &Value) -> bool {
        if !self.wants(rtype) {
            return false;
        }
        if let Some(since) = self.since {
            let updated = r
                .pointer("/meta/lastUpdated")
                .and_then(Value::as_str)
                .and_then(tributary_core::parse_rfc3339_millis);
            // A backend's resource without `meta.lastUpdated` was matched by its own
            // `_lastUpdated=ge…`; the store's always have one.
            if updated.is_some_and(|u| u < since) {
                return false;
            }
        }
        if self.start.is_none() && self.end.is_none() {
            return true;
        }
        let dates = resource_dates(r);
        dates.is_empty()
            || dates.iter().any(|&(lo, hi)| {
                self.start.is_none_or(|s| hi > s) && self.end.is_none_or(|e| lo < e)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn filter(query: &[(&str, &str)]) -> ApiResult<Filter> {
        let req = FhirRequest {
            params: query
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            interaction: crate::policy::Interaction::Everything,
            resource_type: Some("Patient".into()),
            id: Some("p1".into()),
        };
        Filter::parse(&req)
    }

    #[test]
    fn care_dates_overlap_the_range_and_undated_resources_stay() {
        let f = filter(&[("start", "2024-03"), ("end", "2024-03-31")]).unwrap();
        let obs = |d: &str| json!({"resourceType": "Observation", "effectiveDateTime": d});
        assert!(f.admits("Observation", &obs("2024-03-01T00:00:00Z")));
        assert!(f.admits("Observation", &obs("2024-03-31T23:59:59Z")));
        assert!(!f.admits("Observation", &obs("2024-04-01T00:00:00Z")));
        assert!(!f.admits("Observation", &obs("2024-02-29")));
        // a stay that began before the range and ended in it
        let enc = |p: Value| json!({"resourceType": "Encounter", "period": p});
        assert!(f.admits(
            "Encounter",
            &enc(json!({"start": "2024-02-20", "end": "2024-03-02"}))
        ));
        assert!(f.admits("Encounter", &enc(json!({"start": "2024-01-01"}))));
        assert!(!f.admits(
            "Encounter",
            &enc(json!({"start": "2024-01-01", "end": "2024-02-01"}))
        ));
        assert!(f.admits(
            "AllergyIntolerance",
            &json!({"resourceType": "AllergyIntolerance"})
        ));
    }

    #[test]
    fn type_and_since_narrow_and_anything_else_is_refused() {
        let f = filter(&[("_type", "Observation,Condition"), ("_type", "Encounter")]).unwrap();
        assert!(f.wants("Encounter") && f.wants("Condition") && !f.wants("Patient"));
        let f = filter(&[("_since", "2024-05-01T00:00:00Z")]).unwrap();
        let at = |t: &str| json!({"meta": {"lastUpdated": t}});
        assert!(f.admits("Patient", &at("2024-05-01T00:00:00.000Z")));
        assert!(!f.admits("Patient", &at("2024-04-30T23:59:59.999Z")));
        assert!(f.admits("Patient", &json!({})), "not known to be older");
        for bad in [
            ("_type", "Observation,Nonsense"),
            ("_since", "2024-05-01"),
            ("start", "yesterday"),
            ("patient", "p1"),
        ] {
            assert!(
                matches!(filter(&[bad]), Err(ApiError::BadRequest(_))),
                "{bad:?}"
            );
        }
    }
}
