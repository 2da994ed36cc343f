//! `Observation/$lastn` (FHIR R4 Observation operation): per code, the most recent
//! Observations that match a search — a patient's latest vital signs or results in one request.

use crate::audit::AuditSlot;
use crate::error::{ApiError, ApiResult};
use crate::policy::{Access, FhirRequest};
use crate::rest::{base_url, bundle_response};
use crate::scopes::Perm;
use crate::search::{
    each_match, parse_query, parse_sort, searchset, sort_order, sort_values, SearchResult,
};
use crate::AppState;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Extension;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use tributary_storage::StoredResource;

/// Most Observations per code one answer may ask for (`max`).
pub const MAX_PER_CODE: usize = 100;

/// What groups Observations: the LOINC coding of `code` if there is one, else its first
/// coding, else its text (folded).
fn code_key(r: &Value) -> String {
    let codings = r["code"]["coding"].as_array();
    let coded = |c: &&Value| c["code"].is_string();
    let pick = codings
        .and_then(|cs| {
            cs.iter()
                .filter(coded)
                .find(|c| c["system"] == "http://loinc.org")
                .or_else(|| cs.iter().find(coded))
        })
        .map(|c| {
            format!(
                "{}|{}",
                c["system"].as_str().unwrap_or(""),
                c["code"].as_str().unwrap_or("")
            )
        });
    pick.unwrap_or_else(|| {
        tributary_core::fold_search_string(r["code"]["text"].as_str().unwrap_or(""))
    })
}

/// `GET /fhir/Observation/$lastn?patient=…[&category=…][&code=…][&max=N]`.
pub async fn lastn(
    State(st): State<AppState>,
    headers: HeaderMap,
    Extension(access): Extension<Access>,
    Extension(slot): Extension<AuditSlot>,
    Extension(req): Extension<FhirRequest>,
) -> ApiResult<Response> {
    let bad = |why: &str| ApiError::BadRequest(format!("$lastn: {why}"));
    let mut max = 1;
    let mut params = Vec::new();
    for (k, v) in req.params {
        match k.as_str() {
            "max" => {
                max = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_PER_CODE).contains(n))
                    .ok_or_else(|| bad("max is a whole number from 1 to 100"))?
            }
            "_count" | "_offset" | "_sort" | "_include" | "_revinclude" => {
                return Err(bad(
                    "it takes search parameters, max, _elements and _summary; the newest come first per code",
                ))
            }
            _ => params.push((k, v)),
        }
    }
    let names_patient = params
        .iter()
        .any(|(k, _)| matches!(k.split(['.', ':']).next(), Some("patient" | "subject")));
    if !names_patient
        && access
            .indexed_compartment(Perm::Search, "Observation")
            .is_none()
    {
        return Err(bad("name the patient (patient= or subject=)"));
    }
    let query = parse_query(&st, &access, "Observation", &params)?;
    let newest_first = parse_sort("Observation", "-date")?;
    // per code, each match with its newest date
    type Dated = (StoredResource, Vec<Option<i64>>);
    let mut groups: BTreeMap<String, Vec<Dated>> = BTreeMap::new();
    each_match(
        &st,
        &access,
        "Observation",
        &query.filters,
        Perm::Search,
        |stored, r| {
            let values = sort_values(r, &newest_first);
            groups
                .entry(code_key(r))
                .or_default()
                .push((stored, values));
        },
    )?;
    let mut matches = Vec::new();
    for (_, mut group) in groups {
        group.sort_by(|(a, x), (b, y)| sort_order(&newest_first, (a, x), (b, y)));
        matches.extend(group.into_iter().take(max).map(|(m, _)| m));
    }
    let result = SearchResult::only(matches);
    slot.update(|d| d.returned = Some(result.returned()));
    let base = base_url(&st, &headers);
    let mut bundle = searchset(&base, "Observation", &params, &result, &slot)?;
    bundle["link"] = json!([{"relation": "self", "url": format!("{base}/Observation/$lastn")}]);
    Ok(bundle_response(&bundle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_group_by_loinc_then_first_coding_then_text() {
        let both = json!({"code": {"coding": [{"system": "urn:local", "code": "HR"},
            {"system": "http://loinc.org", "code": "8867-4"}]}});
        assert_eq!(code_key(&both), "http://loinc.org|8867-4");
        let local = json!({"code": {"coding": [{"display": "no code"}, {"system": "urn:local", "code": "HR"}]}});
        assert_eq!(code_key(&local), "urn:local|HR");
        let text = json!({"code": {"text": "Heart Rate"}});
        assert_eq!(code_key(&text), "heart rate");
    }
}
