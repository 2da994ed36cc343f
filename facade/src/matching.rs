//! `Patient/$match` (FHIR R4 operation): the stored Patients that may be the person a client
//! describes, each with a score and a match grade, so that an HIE partner can find the record
//! its own patient corresponds to before it sends or asks for anything.
//!
//! Candidates come from the indexes only — the identifiers, and any two of family name, given
//! name and birth date agreeing — so a match never scans the Patient table. Each candidate is
//! then scored on its whole record:
//! - an identifier of the input (same system and value) makes it **certain** (score 1);
//! - otherwise the demographics add up to at most 0.99, by the weights of `[facade.match]`
//!   (defaults: family name 0.25 — or 0.15 when the names only sound alike —, given name 0.2
//!   (its initial 0.05), birth date 0.3, gender 0.1, address (postal code or first line)
//!   0.075, telecom 0.075). From `probable` (0.85) it is **probable**, from `possible` (0.6)
//!   **possible**; less is not returned;
//! - an identifier of the same system with another value (another MRN from the same
//!   authority) caps it at possible: within one system, two values are two people.

use crate::audit::AuditSlot;
use crate::config::MatchConfig;
use crate::error::{ApiError, ApiResult};
use crate::policy::Access;
use crate::rest::{base_url, bundle_response};
use crate::scopes::Perm;
use crate::search::{searchset, SearchResult, MAX_SCAN};
use crate::AppState;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Extension;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use tributary_core::fold_search_string as fold;

const MATCH_GRADE: &str = "http://hl7.org/fhir/StructureDefinition/match-grade";
/// Matches returned when the client does not say (`count`), and the most it may ask for.
const DEFAULT_COUNT: usize = 10;
const MAX_COUNT: usize = 100;

/// What the operation's `Parameters` ask.
struct MatchRequest {
    patient: Value,
    only_certain: bool,
    count: usize,
}

fn parse(body: &[u8]) -> ApiResult<MatchRequest> {
    let bad = |why: &str| ApiError::BadRequest(format!("$match: {why}"));
    let v: Value = serde_json::from_slice(body).map_err(|_| bad("the body is not JSON"))?;
    if v["resourceType"] != "Parameters" {
        return Err(bad("the body is a Parameters resource"));
    }
    let mut out = MatchRequest {
        patient: Value::Null,
        only_certain: false,
        count: DEFAULT_COUNT,
    };
    for p in v["parameter"].as_array().into_iter().flatten() {
        match p["name"].as_str() {
            Some("resource") => out.patient = p["resource"].clone(),
            Some("onlyCertainMatches") => {
                out.only_certain = p["valueBoolean"]
                    .as_bool()
                    .ok_or_else(|| bad("onlyCertainMatches is a valueBoolean"))?
            }
            Some("count") => {
                out.count = p["valueInteger"]
                    .as_u64()
                    .filter(|n| (1..=MAX_COUNT as u64).contains(n))
                    .ok_or_else(|| bad("count is a valueInteger from 1 to 100"))?
                    as usize
            }
            _ => {
                return Err(bad(
                    "the parameters are resource, onlyCertainMatches and count",
                ))
            }
        }
    }
    if out.patient["resourceType"] != "Patient" {
        return Err(bad("the resource parameter holds a Patient"));
    }
    crate::rest::check_resource(&out.patient, "Patient")?;
    Ok(out)
}

/// The folded values of one part of a Patient's names (`family`, or the first `given`).
fn names(p: &Value, part: &str) -> BTreeSet<String> {
    p["name"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| match part {
            "family" => n["family"].as_str(),
            _ => n["given"][0].as_str(),
        })
        .map(fold)
        .filter(|s| !s.is_empty())
        .collect()
}

fn identifiers(p: &Value) -> Vec<(&str, &str)> {
    p["identifier"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| Some((i["system"].as_str().unwrap_or(""), i["value"].as_str()?)))
        .collect()
}

/// Postal codes and first address lines (folded), and telecom values (digits only for phones).
fn contacts(p: &Value) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut addresses = BTreeSet::new();
    for a in p["address"].as_array().into_iter().flatten() {
        if let Some(z) = a["postalCode"].as_str() {
            addresses.insert(format!("zip:{}", fold(z)));
        }
        if let Some(l) = a["line"][0].as_str() {
            addresses.insert(format!("line:{}", fold(l)));
        }
    }
    let telecom = p["telecom"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["value"].as_str())
        .map(|v| {
            let digits: String = v.chars().filter(char::is_ascii_digit).collect();
            if digits.len() >= 7 {
                digits
            } else {
                fold(v)
            }
        })
        .collect();
    (addresses, telecom)
}

/// American Soundex of a folded name: its first letter and the codes of the next consonant
/// sounds, three digits (`smith` and `smyth` are both S530). Empty for a name without letters.
fn soundex(name: &str) -> String {
    let code = |c: char| match c {
        'b' | 'f' | 'p' | 'v' => Some('1'),
        'c' | 'g' | 'j' | 'k' | 'q' | 's' | 'x' | 'z' => Some('2'),
        'd' | 't' => Some('3'),
        'l' => Some('4'),
        'm' | 'n' => Some('5'),
        'r' => Some('6'),
        _ => None,
    };
    let mut letters = name.chars().filter(char::is_ascii_alphabetic);
    let Some(first) = letters.next() else {
        return String::new();
    };
    let mut out = first.to_ascii_uppercase().to_string();
    let mut last = code(first);
    for c in letters {
        let d = code(c);
        if d.is_some() && d != last {
            out.extend(d);
            if out.len() == 4 {
                break;
            }
        }
        // h and w do not separate two letters of one code; vowels do
        if !matches!(c, 'h' | 'w') {
            last = d;
        }
    }
    while out.len() < 4 {
        out.push('0');
    }
    out
}

/// The score and grade of `candidate` as the person `wanted` describes; `None` below possible.
fn score(wanted: &Value, candidate: &Value, w: &MatchConfig) -> Option<(f64, &'static str)> {
    let theirs = identifiers(candidate);
    let ours = identifiers(wanted);
    let same =
        |(s, v): &(&str, &str), (ts, tv): &(&str, &str)| v == tv && (s.is_empty() || s == ts);
    if ours.iter().any(|o| theirs.iter().any(|t| same(o, t))) {
        return Some((1.0, "certain"));
    }
    let conflict = ours
        .iter()
        .any(|(s, v)| !s.is_empty() && theirs.iter().any(|(ts, tv)| ts == s && tv != v));
    let overlap = |a: &BTreeSet<String>, b: &BTreeSet<String>| !a.is_disjoint(b);
    let mut total = 0.0;
    let (family, their_family) = (names(wanted, "family"), names(candidate, "family"));
    let sounds = |names: &BTreeSet<String>| -> BTreeSet<String> {
        names
            .iter()
            .map(|n| soundex(n))
            .filter(|s| !s.is_empty())
            .collect()
    };
    if overlap(&family, &their_family) {
        total += w.family;
    } else if overlap(&sounds(&family), &sounds(&their_family)) {
        total += w.family_sounds_alike;
    }
    let (given, their_given) = (names(wanted, "given"), names(candidate, "given"));
    if overlap(&given, &their_given) {
        total += w.given;
    } else if given.iter().any(|g| {
        their_given
            .iter()
            .any(|t| g.chars().next() == t.chars().next())
    }) {
        total += w.given_initial;
    }
    let field = |v: &Value, k: &str| v[k].as_str().map(str::to_string);
    if field(wanted, "birthDate").is_some()
        && field(wanted, "birthDate") == field(candidate, "birthDate")
    {
        total += w.birth_date;
    }
    if field(wanted, "gender").is_some() && field(wanted, "gender") == field(candidate, "gender") {
        total += w.gender;
    }
    let ((addr, tel), (their_addr, their_tel)) = (contacts(wanted), contacts(candidate));
    if overlap(&addr, &their_addr) {
        total += w.address;
    }
    if overlap(&tel, &their_tel) {
        total += w.telecom;
    }
    // only an identifier makes a match certain: 1 is for those
    let total: f64 = ((total * 1000.0_f64).round() / 1000.0).min(0.99);
    let grade = if total >= w.probable && !conflict {
        "probable"
    } else if total >= w.possible {
        "possible"
    } else {
        return None;
    };
    Some((
        if conflict {
            total.min(w.probable - 0.001)
        } else {
            total
        },
        grade,
    ))
}

/// The ids of stored Patients worth scoring: those sharing an identifier, and those on which
/// two of family name, first given name and birth date agree.
fn candidates(st: &AppState, tenant: &str, wanted: &Value) -> ApiResult<BTreeSet<String>> {
    let store = &st.rt.store;
    let mut out = BTreeSet::new();
    for (system, value) in identifiers(wanted) {
        let system = Some(system).filter(|s| !s.is_empty());
        out.extend(store.ids_by_identifier(tenant, "Patient", system, value)?);
    }
    let by = |param: &str, values: BTreeSet<String>| -> ApiResult<BTreeSet<String>> {
        let mut ids = BTreeSet::new();
        for v in values {
            ids.extend(store.ids_by_string_prefix(tenant, "Patient", param, &v)?);
        }
        Ok(ids)
    };
    let family = by("family", names(wanted, "family"))?;
    let given = by("name", names(wanted, "given"))?;
    let born = match wanted["birthDate"].as_str() {
        Some(b) => store
            .ids_by_string_prefix(tenant, "Patient", "birthdate", b)?
            .into_iter()
            .collect(),
        None => BTreeSet::new(),
    };
    for (a, b) in [(&family, &born), (&given, &born), (&family, &given)] {
        out.extend(a.intersection(b).cloned());
    }
    if out.len() > MAX_SCAN {
        return Err(ApiError::BadRequest(format!(
            "$match: more than {MAX_SCAN} Patients share these details; add an identifier or a birth date"
        )));
    }
    Ok(out)
}

/// `POST /fhir/Patient/$match`.
pub async fn patient_match(
    State(st): State<AppState>,
    headers: HeaderMap,
    Extension(access): Extension<Access>,
    Extension(slot): Extension<AuditSlot>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    // (a tenant whose Patients a backend serves never gets here: the backend stage answers 405)
    let tenant = access.principal.tenant.clone();
    let req = parse(&body)?;
    let mut ids = candidates(&st, &tenant, &req.patient)?;
    if let Some(pid) = access.indexed_compartment(Perm::Search, "Patient") {
        ids.retain(|id| id == pid);
    }
    // by score, highest first, then by id
    let mut found: BTreeMap<(std::cmp::Reverse<u64>, String), &'static str> = BTreeMap::new();
    let mut stored = BTreeMap::new();
    for id in ids {
        let Some(r) = st.rt.store.read(&tenant, "Patient", &id)? else {
            continue;
        };
        if r.deleted {
            continue;
        }
        let v = r.resource()?;
        if !access.permits(Perm::Search, "Patient", &id, &v) {
            continue;
        }
        if let Some((s, grade)) = score(&req.patient, &v, &st.facade.cfg.matching) {
            if req.only_certain && grade != "certain" {
                continue;
            }
            found.insert((std::cmp::Reverse((s * 1000.0) as u64), id.clone()), grade);
            stored.insert(id, r);
        }
    }
    let ranked: Vec<_> = found.into_iter().take(req.count).collect();
    let result = SearchResult::only(
        ranked
            .iter()
            .filter_map(|((_, id), _)| stored.remove(id))
            .collect(),
    );
    let base = base_url(&st, &headers);
    slot.update(|d| d.returned = Some(ranked.len()));
    let mut bundle = searchset(&base, "Patient", &[], &result, &slot)?;
    bundle["link"] = json!([{"relation": "self", "url": format!("{base}/Patient/$match")}]);
    for (entry, ((s, _), grade)) in bundle["entry"]
        .as_array_mut()
        .into_iter()
        .flatten()
        .zip(&ranked)
    {
        entry["search"] = json!({
            "mode": "match",
            "score": s.0 as f64 / 1000.0,
            "extension": [{"url": MATCH_GRADE, "valueCode": grade}],
        });
    }
    Ok(bundle_response(&bundle))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patient(extra: Value) -> Value {
        let mut p = json!({"resourceType": "Patient",
            "identifier": [{"system": "urn:mrn:a", "value": "1"}],
            "name": [{"family": "Okafor", "given": ["Ada"]}], "birthDate": "1980-02-03",
            "gender": "female", "address": [{"line": ["1 Main St"], "postalCode": "02139"}],
            "telecom": [{"system": "phone", "value": "(617) 555-0100"}]});
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
        p
    }

    fn score(wanted: &Value, candidate: &Value) -> Option<(f64, &'static str)> {
        super::score(wanted, candidate, &MatchConfig::default())
    }

    #[test]
    fn soundex_codes_names_by_their_sound() {
        for (name, code) in [
            ("robert", "R163"),
            ("rupert", "R163"),
            ("ashcraft", "A261"),
            ("tymczak", "T522"),
            ("pfister", "P236"),
            ("lee", "L000"),
            ("", ""),
        ] {
            assert_eq!(soundex(name), code, "{name}");
        }
        assert_eq!(soundex("smith"), soundex("smyth"));
        assert_ne!(soundex("smith"), soundex("jones"));
    }

    #[test]
    fn weights_and_grades_come_from_the_configuration() {
        let stored = patient(json!({}));
        // family name spelled another way, same sound; given name and birth date agree
        let sounds_alike = json!({"resourceType": "Patient",
            "name": [{"family": "Okafore", "given": ["Ada"]}], "birthDate": "1980-02-03"});
        assert_eq!(score(&sounds_alike, &stored), Some((0.65, "possible")));
        let strict = MatchConfig {
            family_sounds_alike: 0.0,
            ..MatchConfig::default()
        };
        assert_eq!(super::score(&sounds_alike, &stored, &strict), None);
        let lenient = MatchConfig {
            possible: 0.5,
            probable: 0.6,
            ..MatchConfig::default()
        };
        assert_eq!(
            super::score(&sounds_alike, &stored, &lenient),
            Some((0.65, "probable"))
        );
    }

    #[test]
    fn scores_follow_identifiers_then_demographics() {
        let stored = patient(json!({}));
        let certain = json!({"resourceType": "Patient", "identifier": [{"value": "1"}]});
        assert_eq!(score(&certain, &stored), Some((1.0, "certain")));
        // everything but the identifier, from another system
        let probable = patient(
            json!({"identifier": [{"system": "urn:mrn:b", "value": "9"}],
            "telecom": [{"value": "617.555.0100"}]}),
        );
        assert_eq!(score(&probable, &stored), Some((0.99, "probable")));
        // same authority, another value: not the same person in that system
        let conflict = patient(json!({"identifier": [{"system": "urn:mrn:a", "value": "2"}]}));
        assert_eq!(score(&conflict, &stored), Some((0.849, "possible")));
        // name and birth date only, the given name spelled with an accent
        let possible = json!({"resourceType": "Patient",
            "name": [{"family": "OKAFOR", "given": ["Adá"]}], "birthDate": "1980-02-03"});
        assert_eq!(score(&possible, &stored), Some((0.75, "possible")));
        // the family name alone is no match
        let weak =
            json!({"resourceType": "Patient", "name": [{"family": "Okafor", "given": ["Ben"]}]});
        assert_eq!(score(&weak, &stored), None);
    }

    #[test]
    fn parameters_are_checked() {
        let ok = json!({"resourceType": "Parameters", "parameter": [
            {"name": "resource", "resource": patient(json!({}))},
            {"name": "onlyCertainMatches", "valueBoolean": true},
            {"name": "count", "valueInteger": 3}]});
        let r = parse(&serde_json::to_vec(&ok).unwrap()).unwrap();
        assert!(r.only_certain && r.count == 3);
        for bad in [
            json!({"resourceType": "Patient"}),
            json!({"resourceType": "Parameters", "parameter": []}),
            json!({"resourceType": "Parameters", "parameter": [{"name": "resource",
                "resource": {"resourceType": "Observation"}}]}),
            json!({"resourceType": "Parameters", "parameter": [{"name": "resource",
                "resource": {"resourceType": "Patient", "gendr": "x"}}]}),
            json!({"resourceType": "Parameters", "parameter": [{"name": "count", "valueInteger": 0}]}),
            json!({"resourceType": "Parameters", "parameter": [{"name": "other"}]}),
        ] {
            let r = parse(&serde_json::to_vec(&bad).unwrap());
            assert!(
                matches!(
                    r,
                    Err(ApiError::BadRequest(_)) | Err(ApiError::Unprocessable(_))
                ),
                "{bad}"
            );
        }
    }
}
