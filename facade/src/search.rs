//! Type-level search over the built-in store: candidate ids from the best index (`_id`,
//! patient compartment, `identifier`, `_lastUpdated`), then every parameter is applied to the
//! resources themselves, then the caller's scopes and patient compartment. Paging is by offset
//! (`_count`, `_offset`) with `next`/`previous` links; `_include` follows references and applies
//! the same access rules to what it brings in.

use crate::audit::{AuditSlot, Disclosed};
use crate::error::{ApiError, ApiResult};
use crate::policy::{Access, FhirRequest};
use crate::rest::{base_url, bundle_response, check_type};
use crate::scopes::{matches_token, Perm};
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Extension;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use tributary_storage::StoredResource;

/// Most resources a search looks at before it must be narrowed by the client.
pub const MAX_SCAN: usize = 10_000;
pub const DEFAULT_COUNT: usize = 50;
pub const MAX_COUNT: usize = 500;

/// Parameters every type supports, and the ones that apply to any resource with that field.
pub const SEARCH_PARAMS: [(&str, &str); 20] = [
    ("_id", "token"),
    ("_lastUpdated", "date"),
    ("identifier", "token"),
    ("patient", "reference"),
    ("subject", "reference"),
    ("code", "token"),
    ("category", "token"),
    ("date", "date"),
    ("status", "token"),
    ("name", "string"),
    ("family", "string"),
    ("birthdate", "date"),
    ("gender", "token"),
    ("_tag", "token"),
    ("encounter", "reference"),
    ("performer", "reference"),
    ("requester", "reference"),
    ("based-on", "reference"),
    ("practitioner", "reference"),
    ("organization", "reference"),
];

/// The reference parameters beside `patient` and `subject`: the element each reads (a Reference,
/// a list of them, or backbone elements holding one: a Procedure's `performer.actor`) and the
/// type a bare id names (`encounter=e1` is `Encounter/e1`; `None`: any type with that id).
const REFERENCE_PARAMS: [(&str, &str, Option<&str>); 6] = [
    ("encounter", "encounter", Some("Encounter")),
    ("performer", "performer", None),
    ("requester", "requester", None),
    ("based-on", "basedOn", None),
    ("practitioner", "practitioner", Some("Practitioner")),
    ("organization", "organization", Some("Organization")),
];

fn reference_param(name: &str) -> Option<(&'static str, Option<&'static str>)> {
    REFERENCE_PARAMS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, element, ty)| (*element, *ty))
}

/// Whether reference parameter `name` (one of [`REFERENCE_PARAMS`]) of `r` names `wanted`:
/// `Type/id`, a bare id, or an absolute URL ending in `Type/id`; a type modifier
/// (`performer:Practitioner=p1`) says which type a bare id names.
fn reference_param_matches(r: &Value, name: &str, modifier: Option<&str>, wanted: &str) -> bool {
    let Some((element, default)) = reference_param(name) else {
        return false;
    };
    let Some(v) = r.get(element) else {
        return false;
    };
    let typed;
    let wanted = match (wanted.contains('/'), modifier.or(default)) {
        (false, Some(t)) => {
            typed = format!("{t}/{wanted}");
            typed.as_str()
        }
        (true, Some(t)) if modifier.is_some() && !wanted.starts_with(&format!("{t}/")) => {
            return false
        }
        _ => wanted,
    };
    references(v).into_iter().any(|s| {
        if wanted.contains('/') {
            s == wanted || s.ends_with(&format!("/{wanted}"))
        } else {
            s.rsplit('/').next() == Some(wanted) && s.contains('/')
        }
    })
}

pub(crate) const CONTROL_PARAMS: [&str; 11] = [
    "_count",
    "_total",
    "_elements",
    "_offset",
    "_include",
    "_include:iterate",
    "_include:recurse",
    "_revinclude",
    "_summary",
    "_sort",
    "_format",
];

/// `[lo, hi)` in epoch millis for a FHIR date/dateTime of any precision.
pub fn date_range(s: &str) -> Option<(i64, i64)> {
    let parse = tributary_core::parse_rfc3339_millis;
    match s.len() {
        4 => {
            let y: i32 = s.parse().ok()?;
            Some((
                parse(&format!("{y:04}-01-01"))?,
                parse(&format!("{:04}-01-01", y + 1))?,
            ))
        }
        7 => {
            let (y, m) = s.split_once('-')?;
            let (y, m): (i32, u32) = (y.parse().ok()?, m.parse().ok()?);
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            Some((
                parse(&format!("{y:04}-{m:02}-01"))?,
                parse(&format!("{ny:04}-{nm:02}-01"))?,
            ))
        }
        10 => {
            let lo = parse(s)?;
            Some((lo, lo + 86_400_000))
        }
        _ => {
            let t = parse(s)?;
            Some((t, t + 1))
        }
    }
}

/// Does a resource date (range `v`) satisfy `prefix` + param range `p`?
fn date_matches(prefix: &str, v: (i64, i64), p: (i64, i64)) -> bool {
    match prefix {
        "eq" => v.0 >= p.0 && v.1 <= p.1,
        "ne" => !(v.0 >= p.0 && v.1 <= p.1),
        "gt" | "sa" => v.1 > p.1,
        "lt" | "eb" => v.0 < p.0,
        "ge" => v.1 > p.0,
        "le" => v.0 < p.1,
        _ => false,
    }
}

/// The `[from, to)` range of `_lastUpdated` times a `_lastUpdated` value can match (a superset:
/// the filter itself still decides), or `None` for `ne` and values that are no date.
fn last_updated_bounds(v: &str) -> Option<(i64, i64)> {
    let (prefix, val) = split_prefix(v);
    let (lo, hi) = date_range(val)?;
    match prefix {
        "eq" => Some((lo, hi)),
        "gt" | "sa" => Some((hi, i64::MAX)),
        "ge" => Some((lo, i64::MAX)),
        "lt" | "eb" => Some((i64::MIN, lo)),
        "le" => Some((i64::MIN, hi)),
        _ => None,
    }
}

/// Which indexed `birthDate` strings a `birthdate` value can match (a superset: the filter
/// itself still decides).
#[derive(Debug, PartialEq)]
enum BirthdateBounds<'a> {
    /// `eq`: a date within the value's day, month or year starts with it.
    Prefix(&'a str),
    /// The ordering prefixes, by whole years: `[from, to)`, no upper bound without `to`.
    Range(String, Option<String>),
}

/// `None` for `ne`, `ap` and values with a time (a time zone can move them into another year).
fn birthdate_bounds(v: &str) -> Option<BirthdateBounds<'_>> {
    let (prefix, val) = split_prefix(v);
    if !(matches!(val.len(), 4 | 7 | 10) && date_range(val).is_some()) {
        return None;
    }
    let year: u32 = val.get(..4)?.parse().ok()?;
    match prefix {
        "eq" => Some(BirthdateBounds::Prefix(val)),
        "gt" | "sa" | "ge" => Some(BirthdateBounds::Range(format!("{year:04}"), None)),
        "lt" | "eb" | "le" => Some(BirthdateBounds::Range(
            String::new(),
            Some(format!("{:04}", year + 1)),
        )),
        _ => None,
    }
}

fn split_prefix(v: &str) -> (&str, &str) {
    for p in ["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"] {
        if let Some(rest) = v.strip_prefix(p) {
            if rest.starts_with(|c: char| c.is_ascii_digit()) {
                return (p, rest);
            }
        }
    }
    ("eq", v)
}

/// The elements `date` compares: date-times, then periods.
const DATE_ELEMENTS: [&str; 11] = [
    "effectiveDateTime",
    "issued",
    "authoredOn",
    "onsetDateTime",
    "recordedDate",
    "occurrenceDateTime",
    "performedDateTime",
    "date",
    "recorded",
    "created",
    "start",
];
const DATE_PERIODS: [&str; 4] = [
    "effectivePeriod",
    "period",
    "performedPeriod",
    "onsetPeriod",
];

/// What an `_include` follows: top-level elements (`None`: all), and the type it implies.
type IncludeElements = (Option<Vec<&'static str>>, Option<&'static str>);

/// The top-level elements an `_include` of `rtype:name` follows, and the type it implies:
/// `name` itself when `rtype` has that element as a Reference or as a backbone element holding
/// one (`Encounter:location`), or the elements of the search parameter of that name (`patient`:
/// `subject`, `patient` or `beneficiary`; for an Appointment its participants that are
/// Patients); `None` for `*` (every top-level reference). Anything else is refused: an include
/// that could never match is a client's error.
fn include_elements(rtype: &str, name: &str) -> ApiResult<IncludeElements> {
    use tributary_core::fhir_r4::{element, static_element_name};
    if name == "*" {
        return Ok((None, None));
    }
    if rtype == "Appointment" && name == "patient" {
        return Ok((Some(vec!["participant"]), Some("Patient")));
    }
    // Backbone element classes are named after their owner (`EncounterLocation`).
    let reference = |e: &str| {
        element(rtype, e)
            .filter(|x| x.ty == "Reference" || x.ty.starts_with(rtype))
            .and(static_element_name(rtype, e))
    };
    if let Some(e) = reference(name) {
        return Ok((Some(vec![e]), None));
    }
    if name == "patient" {
        let found: Vec<&'static str> = ["subject", "patient", "beneficiary"]
            .into_iter()
            .filter_map(reference)
            .collect();
        if !found.is_empty() {
            return Ok((Some(found), None));
        }
    }
    Err(ApiError::BadRequest(format!(
        "_include {rtype}:{name}: {rtype} has no reference element or search parameter {name:?}"
    )))
}

/// The `reference` strings of one element's value: a Reference, a backbone element holding one
/// (`{"location": {"reference": …}}`, a participant's `actor`), or a list of either.
fn references(v: &Value) -> Vec<&str> {
    fn one(x: &Value) -> Option<&str> {
        match x.get("reference") {
            Some(r) => r.as_str(),
            None => x
                .as_object()?
                .values()
                .find_map(|c| c.get("reference").and_then(Value::as_str)),
        }
    }
    match v {
        Value::Array(a) => a.iter().filter_map(one).collect(),
        other => one(other).into_iter().collect(),
    }
}

/// Whether search parameter `name` means something for `rtype`: `_id`, `_lastUpdated` and
/// `_tag` for every type, the others only where the type has the R4 element they read. The
/// CapabilityStatement lists these per type, and a search with another is refused (400) rather
/// than answered with nothing (`Observation?gender=male`).
pub fn supports(rtype: &str, name: &str) -> bool {
    use tributary_core::fhir_r4::element;
    let has = |e: &str| element(rtype, e).is_some();
    let reference = |e: &str| element(rtype, e).is_some_and(|x| x.ty == "Reference");
    match name {
        "_id" | "_lastUpdated" | "_tag" => true,
        "identifier" | "subject" | "code" | "category" | "status" | "gender" | "name" => has(name),
        "patient" => {
            rtype == "Patient"
                || rtype == "Appointment"
                || ["subject", "patient", "beneficiary"]
                    .into_iter()
                    .any(reference)
        }
        "birthdate" => has("birthDate"),
        "family" => element(rtype, "name").is_some_and(|e| e.ty == "HumanName"),
        other if reference_param(other).is_some() => {
            reference_param(other).is_some_and(|(e, _)| {
                element(rtype, e).is_some_and(|x| x.ty == "Reference" || x.ty.starts_with(rtype))
            })
        }
        "date" => DATE_ELEMENTS.into_iter().chain(DATE_PERIODS).any(has),
        _ => false,
    }
}

/// The `_revinclude`s the CapabilityStatement names for `rtype` (of `types`): the Provenances
/// about it, and for a Patient the resources whose `patient` parameter points at it, for an
/// Encounter the ones whose `encounter` does. Any other `Type:<reference element>` and `Type:*`
/// work as well; these are the ones apps ask for.
pub fn rev_includes_of(rtype: &str, types: &[&str]) -> Vec<String> {
    use tributary_core::fhir_r4::element;
    let mut out = vec!["Provenance:target".to_string()];
    for s in types.iter().filter(|s| **s != rtype) {
        if rtype == "Patient" && supports(s, "patient") {
            out.push(format!("{s}:patient"));
        }
        if rtype == "Encounter" && element(s, "encounter").is_some_and(|e| e.ty == "Reference") {
            out.push(format!("{s}:encounter"));
        }
    }
    out
}

/// The clinically relevant dates of a resource as `[lo, hi)` epoch-millis ranges, for `date=`
/// and `$everything`'s care dates: its date-times, and its periods from start to end (an open
/// end runs on, an open start reaches back), so a search or a range compares with the whole
/// period (FHIR R4 search §3.1.1.4.2).
pub(crate) fn resource_dates(r: &Value) -> Vec<(i64, i64)> {
    let mut out: Vec<(i64, i64)> = DATE_ELEMENTS
        .iter()
        .filter_map(|f| r.get(*f).and_then(Value::as_str).and_then(date_range))
        .collect();
    for f in DATE_PERIODS {
        let Some(p) = r.get(f) else { continue };
        let bound = |k: &str| p.get(k).and_then(Value::as_str).and_then(date_range);
        match (bound("start"), bound("end")) {
            (None, None) => {}
            (s, e) => out.push((s.map_or(i64::MIN, |s| s.0), e.map_or(i64::MAX, |e| e.1))),
        }
    }
    out
}

/// One key of a search's order (`_sort=a,-b`: ascending unless `-`); ties, and a search
/// without `_sort`, go by id.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum SortKey {
    Id,
    LastUpdated,
    /// Ascending: a resource's earliest date; descending: its latest, so an ongoing stay comes
    /// first. Undated resources last, either way.
    Date,
    Birthdate,
}

/// The keys of one `_sort` value, with their direction (true: ascending).
pub(crate) fn parse_sort(rtype: &str, v: &str) -> ApiResult<Vec<(SortKey, bool)>> {
    let mut out = Vec::new();
    for part in v.split(',') {
        let (ascending, key) = match part.strip_prefix('-') {
            Some(key) => (false, key),
            None => (true, part),
        };
        let key = match key {
            "_id" => SortKey::Id,
            "_lastUpdated" => SortKey::LastUpdated,
            "date" if supports(rtype, "date") => SortKey::Date,
            "birthdate" if supports(rtype, "birthdate") => SortKey::Birthdate,
            _ => {
                let mut keys = vec!["_id", "_lastUpdated"];
                keys.extend(
                    ["date", "birthdate"]
                        .into_iter()
                        .filter(|k| supports(rtype, k)),
                );
                return Err(ApiError::BadRequest(format!(
                    "_sort on {rtype} takes {} (each with - for descending, comma-separated)",
                    keys.join(", ")
                )));
            }
        };
        out.push((key, ascending));
    }
    Ok(out)
}

/// Where a match goes for each of `keys` that reads its content (`None`: no value, or a key
/// compared by the stored resource's id or time).
pub(crate) fn sort_values(r: &Value, keys: &[(SortKey, bool)]) -> Vec<Option<i64>> {
    keys.iter()
        .map(|(key, ascending)| {
            let edge = |(lo, hi): (i64, i64)| if *ascending { lo } else { hi };
            match key {
                SortKey::Id | SortKey::LastUpdated => None,
                SortKey::Date => {
                    let dates = resource_dates(r).into_iter().map(edge);
                    if *ascending {
                        dates.min()
                    } else {
                        dates.max()
                    }
                }
                SortKey::Birthdate => r
                    .get("birthDate")
                    .and_then(Value::as_str)
                    .and_then(date_range)
                    .map(edge),
            }
        })
        .collect()
}

/// The order of two matches by `keys` (their [`sort_values`] beside them), then by id.
pub(crate) fn sort_order(
    keys: &[(SortKey, bool)],
    (a, x): (&StoredResource, &[Option<i64>]),
    (b, y): (&StoredResource, &[Option<i64>]),
) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    for (i, (key, ascending)) in keys.iter().enumerate() {
        let order = match (key, x[i], y[i]) {
            (SortKey::Id, _, _) => a.id.cmp(&b.id),
            // times to the millisecond tie: the id decides, in the key's direction
            (SortKey::LastUpdated, _, _) => (a.last_updated, &a.id).cmp(&(b.last_updated, &b.id)),
            (_, Some(p), Some(q)) => p.cmp(&q),
            (_, Some(_), None) if *ascending => Ordering::Less,
            (_, None, Some(_)) if *ascending => Ordering::Greater,
            // so that, reversed below, what has no value still comes last
            (_, Some(_), None) => Ordering::Greater,
            (_, None, Some(_)) => Ordering::Less,
            (_, None, None) => Ordering::Equal,
        };
        let order = if *ascending { order } else { order.reverse() };
        if order != Ordering::Equal {
            return order;
        }
    }
    a.id.cmp(&b.id)
}

fn date_param_ok(values: &[(i64, i64)], raw: &str) -> ApiResult<bool> {
    let (prefix, v) = split_prefix(raw);
    let p = date_range(v).ok_or_else(|| ApiError::BadRequest(format!("not a FHIR date: {v:?}")))?;
    Ok(values.iter().any(|r| date_matches(prefix, *r, p)))
}

/// FHIR string search over `name` (`param` "name": a plain string, or HumanNames' text, family
/// and given; "family": the HumanNames' family): starts-with, case- and accent-insensitive;
/// `:exact` is whole-string and case-sensitive, `:contains` matches anywhere.
fn string_matches(r: &Value, param: &str, modifier: Option<&str>, wanted: &str) -> bool {
    let folded = tributary_core::fold_search_string(wanted);
    let check = |s: &str| match modifier {
        Some("exact") => s == wanted,
        Some("contains") => tributary_core::fold_search_string(s).contains(&folded),
        _ => tributary_core::fold_search_string(s).starts_with(&folded),
    };
    match r.get("name") {
        Some(Value::String(s)) if param == "name" => check(s),
        Some(Value::Array(names)) => names.iter().any(|n| {
            let family = n.get("family").and_then(Value::as_str);
            if param == "family" {
                return family.is_some_and(check);
            }
            n.get("text").and_then(Value::as_str).is_some_and(check)
                || family.is_some_and(check)
                || n.get("given")
                    .and_then(Value::as_array)
                    .is_some_and(|g| g.iter().filter_map(Value::as_str).any(check))
        }),
        _ => false,
    }
}

fn reference_matches(r: &Value, fields: &[&str], wanted: &str) -> bool {
    let target = if wanted.contains('/') {
        wanted.to_string()
    } else {
        format!("Patient/{wanted}")
    };
    fields.iter().any(|f| {
        r.get(*f)
            .and_then(|v| v.get("reference"))
            .and_then(Value::as_str)
            .is_some_and(|s| s == target || s.ends_with(&format!("/{target}")))
    })
}

/// Whether one of `participant[].actor` is `wanted` (Appointment's `patient` parameter: the
/// patients among its participants).
fn participant_is(r: &Value, wanted: &str) -> bool {
    r.get("participant")
        .and_then(Value::as_array)
        .is_some_and(|ps| ps.iter().any(|p| reference_matches(p, &["actor"], wanted)))
}

fn identifier_matches(r: &Value, wanted: &str) -> bool {
    let (system, value) = match wanted.split_once('|') {
        Some((s, v)) => (Some(s), v),
        None => (None, wanted),
    };
    let list: Vec<&Value> = match r.get("identifier") {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(v @ Value::Object(_)) => vec![v],
        _ => Vec::new(),
    };
    list.into_iter().any(|i| {
        i.get("value").and_then(Value::as_str) == Some(value)
            && system.is_none_or(|s| tributary_core::system_is(i, s))
    })
}

/// Whether `r` has a value for search parameter `base` (`:missing`).
fn has_value(stored: &StoredResource, r: &Value, base: &str) -> bool {
    let present = |v: Option<&Value>| {
        v.is_some_and(|v| match v {
            Value::Null => false,
            Value::Array(a) => !a.is_empty(),
            _ => true,
        })
    };
    match base {
        "_id" | "_lastUpdated" => true,
        "patient" if stored.resource_type == "Patient" => true,
        "patient" | "subject" => {
            ["subject", "patient", "beneficiary"]
                .iter()
                .any(|f| present(r.get(*f)))
                || (base == "patient"
                    && stored.resource_type == "Appointment"
                    && r.get("participant")
                        .and_then(Value::as_array)
                        .is_some_and(|ps| {
                            ps.iter().any(|p| {
                                p.pointer("/actor/reference")
                                    .and_then(Value::as_str)
                                    .is_some_and(|x| x.starts_with("Patient/"))
                            })
                        }))
        }
        "_tag" => present(r.pointer("/meta/tag")),
        "date" => !resource_dates(r).is_empty(),
        "birthdate" => present(r.get("birthDate")),
        "family" => r
            .get("name")
            .and_then(Value::as_array)
            .is_some_and(|ns| ns.iter().any(|n| present(n.get("family")))),
        other => present(r.get(reference_param(other).map_or(other, |(e, _)| e))),
    }
}

/// `:text` on a token (`code:text=glucose`): the CodeableConcept's `text` or a coding's
/// `display` begins with the value, or has a word that does, case- and accent-insensitive.
fn token_text_matches(r: &Value, base: &str, wanted: &str) -> bool {
    let wanted = tributary_core::fold_search_string(wanted);
    let fits = |s: &str| {
        let s = tributary_core::fold_search_string(s);
        s.starts_with(&wanted) || s.contains(&format!(" {wanted}"))
    };
    let concepts: Vec<&Value> = match r.get(base) {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(v) => vec![v],
        None => Vec::new(),
    };
    concepts.into_iter().any(|c| {
        c.get("text").and_then(Value::as_str).is_some_and(fits)
            || c.get("coding").and_then(Value::as_array).is_some_and(|cs| {
                cs.iter()
                    .filter_map(|x| x.get("display").and_then(Value::as_str))
                    .any(fits)
            })
    })
}

/// Does one resource match one (name, value) parameter? Comma means OR.
pub(crate) fn param_matches(
    stored: &StoredResource,
    r: &Value,
    name: &str,
    value: &str,
) -> ApiResult<bool> {
    let (base, modifier) = match name.split_once(':') {
        Some((b, m)) => (b, Some(m)),
        None => (name, None),
    };
    match modifier {
        Some("missing") => return Ok(has_value(stored, r, base) == (value == "false")),
        // none of the values: a resource without the element matches too
        Some("not") => return param_matches(stored, r, base, value).map(|m| !m),
        Some("text") => return Ok(value.split(',').any(|v| token_text_matches(r, base, v))),
        _ => {}
    }
    let mut any = false;
    for v in value.split(',') {
        let ok = match base {
            "_id" => stored.id == v,
            "_lastUpdated" => {
                let (prefix, val) = split_prefix(v);
                let p = date_range(val)
                    .ok_or_else(|| ApiError::BadRequest(format!("not a FHIR date: {val:?}")))?;
                date_matches(prefix, (stored.last_updated, stored.last_updated + 1), p)
            }
            "identifier" => identifier_matches(r, v),
            "patient" | "subject" => {
                // `subject:Group=g1`: the id of a resource of that type
                let typed;
                let v = match modifier {
                    Some(t) if !v.contains('/') => {
                        typed = format!("{t}/{v}");
                        typed.as_str()
                    }
                    Some(t) if !v.strip_prefix(t).is_some_and(|x| x.starts_with('/')) => continue,
                    _ => v,
                };
                if stored.resource_type == "Patient" && base == "patient" {
                    stored.id == v.strip_prefix("Patient/").unwrap_or(v)
                } else {
                    reference_matches(r, &["subject", "patient", "beneficiary"], v)
                        || (base == "patient"
                            && stored.resource_type == "Appointment"
                            && participant_is(r, v))
                }
            }
            "code" | "category" | "status" | "gender" => matches_token(r, base, v),
            "_tag" => r.get("meta").is_some_and(|m| matches_token(m, "tag", v)),
            "date" => date_param_ok(&resource_dates(r), v)?,
            "birthdate" => date_param_ok(
                &r.get("birthDate")
                    .and_then(Value::as_str)
                    .and_then(date_range)
                    .into_iter()
                    .collect::<Vec<_>>(),
                v,
            )?,
            "name" | "family" => string_matches(r, base, modifier, v),
            other if reference_param(other).is_some() => {
                reference_param_matches(r, other, modifier, v)
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unsupported search parameter {other:?}"
                )))
            }
        };
        any |= ok;
    }
    Ok(any)
}

pub struct SearchResult {
    pub matches: Vec<StoredResource>,
    pub included: Vec<StoredResource>,
    pub total: usize,
    pub offset: usize,
    pub count: usize,
    /// References `_include` found whose type a backend FHIR server serves, not yet read from
    /// it ([`include_from_backends`] does); any left are named in the Bundle as not included.
    pub remote: Vec<RemoteRef>,
    /// Included resources read from backends.
    pub remote_included: Vec<Value>,
    /// Why some `_include` targets are not in the answer (`Practitioner (lab): backend lab
    /// unavailable`): the Bundle says so.
    pub elsewhere: BTreeSet<String>,
}

impl SearchResult {
    /// An answer of these matches and nothing else: one page, nothing included.
    pub(crate) fn only(matches: Vec<StoredResource>) -> SearchResult {
        SearchResult {
            total: matches.len(),
            count: matches.len(),
            offset: 0,
            matches,
            included: Vec::new(),
            remote: Vec::new(),
            remote_included: Vec::new(),
            elsewhere: BTreeSet::new(),
        }
    }

    /// How many resources the answer holds (matches and includes), for the audit record.
    pub fn returned(&self) -> usize {
        self.matches.len() + self.included.len() + self.remote_included.len()
    }
}

/// A reference to a resource a backend serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteRef {
    pub rtype: String,
    pub id: String,
    pub backend: String,
}

/// Most references one search's `_include` reads from backends; past it, the rest are named as
/// not included.
pub const MAX_REMOTE_INCLUDES: usize = 100;

/// Reads `_include` targets that backends serve (16 at a time, at most [`MAX_REMOTE_INCLUDES`]),
/// keeping each that is the resource referenced and readable by the caller; a target that is
/// gone (404) is left out as a dangling reference is, any other failure is named.
pub(crate) async fn include_from_backends(
    st: &AppState,
    access: &Access,
    slot: &AuditSlot,
    params: &[(String, String)],
    res: &mut SearchResult,
) {
    let summary_count = params.iter().any(|(k, v)| k == "_summary" && v == "count");
    if res.remote.is_empty() || summary_count {
        return;
    }
    let tenant = access.principal.tenant.as_str();
    let refs = std::mem::take(&mut res.remote);
    let (asked, rest) = refs.split_at(refs.len().min(MAX_REMOTE_INCLUDES));
    for r in rest {
        res.elsewhere.insert(format!(
            "{} ({}): more than {MAX_REMOTE_INCLUDES} references to read from backends",
            r.rtype, r.backend
        ));
    }
    crate::backend::note_backends(slot, asked.iter().map(|r| r.backend.as_str()));
    let mut reads = Vec::new();
    for r in asked {
        if let Some(backend) = st.facade.backends.route(tenant, &r.rtype) {
            reads.push(async move {
                let answer = crate::backend::read(st, backend, access, slot, &r.rtype, &r.id).await;
                (r, answer)
            });
        }
    }
    // at most 16 reads in flight: a page of includes is no burst against one backend
    let answers: Vec<_> = futures_util::StreamExt::collect(futures_util::StreamExt::buffered(
        futures_util::stream::iter(reads),
        16,
    ))
    .await;
    for (r, answer) in answers {
        match answer {
            Ok(Some(v)) if access.permits(Perm::Read, &r.rtype, &r.id, &v) => {
                res.remote_included.push(v);
            }
            Ok(_) => {}
            Err(e) => {
                res.elsewhere.insert(format!(
                    "{} ({}): {}",
                    r.rtype,
                    r.backend,
                    e.public_message()
                ));
            }
        }
    }
}

fn intersect(acc: Option<Vec<String>>, next: Vec<String>) -> Option<Vec<String>> {
    Some(match acc {
        None => next,
        Some(prev) => {
            let set: BTreeSet<String> = next.into_iter().collect();
            prev.into_iter().filter(|i| set.contains(i)).collect()
        }
    })
}

/// Refuses (400) a search parameter `name` (with its modifier) that `rtype` does not support, and
/// a date parameter's value that is no FHIR date.
pub(crate) fn check_filter(rtype: &str, name: &str, value: &str) -> ApiResult<()> {
    let base = name.split(':').next().unwrap_or(name);
    let Some((_, kind)) = SEARCH_PARAMS.iter().find(|(n, _)| *n == base) else {
        return Err(ApiError::BadRequest(format!(
            "unsupported search parameter {name:?}"
        )));
    };
    if !supports(rtype, base) {
        return Err(ApiError::BadRequest(format!(
            "search parameter {base:?} does not apply to {rtype} (it has no such element)"
        )));
    }
    if let Some((_, m)) = name.split_once(':') {
        let fits = match (*kind, m) {
            (_, "missing") => {
                if value != "true" && value != "false" {
                    return Err(ApiError::BadRequest(format!(
                        "{name}: the value is true or false"
                    )));
                }
                return Ok(());
            }
            ("string", "exact" | "contains") => true,
            ("token", "not") => true,
            ("token", "text") => matches!(base, "code" | "category"),
            ("reference", t) => {
                crate::policy::valid_type(t)
                    && tributary_core::fhir_r4::is_resource(t)
                    && (base != "patient" || t == "Patient")
            }
            _ => false,
        };
        if !fits {
            return Err(ApiError::BadRequest(format!(
                "modifier :{m} is not supported on {base:?} (every parameter takes :missing; \
                 strings :exact and :contains; tokens :not, and code and category :text; \
                 references a resource type)"
            )));
        }
    }
    if *kind == "date" {
        for v in value.split(',') {
            let (_, val) = split_prefix(v);
            if date_range(val).is_none() {
                return Err(ApiError::BadRequest(format!(
                    "{base}: not a FHIR date: {val:?}"
                )));
            }
        }
    }
    Ok(())
}

/// Most resources a chained parameter (`patient.identifier=…`) may match.
pub const MAX_CHAINED: usize = 100;

/// A chained parameter, one link: through the patient reference — `patient.<param>`,
/// `subject.<param>` or `subject:Patient.<param>` — or through another reference parameter,
/// typed where it may point at several types (`encounter.identifier=…`,
/// `requester:PractitionerRole.practitioner=Practitioner/dr1`, `performer:Organization.name=…`),
/// with any search parameter the target type takes. Returns the reference parameter and the
/// resources the chain names (`Patient/a,Patient/b`; empty when none). They are found by a
/// search with the caller's own access (scopes, patient compartment, SMART v2 narrowing), so a
/// chain never reaches a resource the caller could not find.
fn chained_targets<'a>(
    st: &AppState,
    access: &Access,
    rtype: &str,
    name: &'a str,
    value: &str,
) -> ApiResult<(&'a str, String)> {
    let bad = |why: String| ApiError::BadRequest(format!("chained parameter {name:?}: {why}"));
    let (reference, inner) = name.split_once('.').unwrap_or((name, ""));
    let (base, modifier) = match reference.split_once(':') {
        Some((b, m)) => (b, Some(m)),
        None => (reference, None),
    };
    let target = match (base, modifier) {
        ("patient" | "subject", None | Some("Patient")) => "Patient",
        (b, m) if reference_param(b).is_some() => {
            match m.or(reference_param(b).and_then(|r| r.1)) {
                Some(t)
                    if crate::policy::valid_type(t) && tributary_core::fhir_r4::is_resource(t) =>
                {
                    t
                }
                Some(t) => return Err(bad(format!("{t:?} is not a FHIR R4 resource type"))),
                None => {
                    return Err(bad(format!(
                        "{b} may point at several types: name one ({b}:PractitionerRole.{})",
                        if inner.is_empty() {
                            "practitioner"
                        } else {
                            inner
                        }
                    )))
                }
            }
        }
        _ => return Err(bad(
            "chains go through patient, subject or a reference parameter (patient.identifier=…)"
                .into(),
        )),
    };
    if (target == "Patient" && rtype == "Patient") || !supports(rtype, base) {
        return Err(bad(format!("does not apply to {rtype}")));
    }
    if inner.contains('.') || (inner.starts_with('_') && inner != "_id") {
        return Err(bad(format!(
            "one link, ending in a {target} search parameter"
        )));
    }
    check_filter(target, inner, value).map_err(|e| bad(e.public_message()))?;
    if routed_elsewhere(st, access, target) {
        return Err(bad(format!(
            "{target} is served by a backend FHIR server; chains search the built-in store"
        )));
    }
    if !access.may(Perm::Search, target) {
        return Err(ApiError::Forbidden(format!(
            "chained parameter {name:?}: token scopes do not allow searching {target}"
        )));
    }
    let found = run_search(
        st,
        access,
        target,
        &[
            (inner.to_string(), value.to_string()),
            ("_count".into(), (MAX_CHAINED + 1).to_string()),
        ],
        Perm::Search,
    )?;
    if found.total > MAX_CHAINED {
        return Err(bad(format!(
            "matches more than {MAX_CHAINED} {target} resources; narrow it"
        )));
    }
    let named: Vec<String> = found
        .matches
        .iter()
        .map(|r| format!("{target}/{}", r.id))
        .collect();
    Ok((base, named.join(",")))
}

/// Whether the caller's tenant has `rtype` served by a backend FHIR server, not the store.
fn routed_elsewhere(st: &AppState, access: &Access, rtype: &str) -> bool {
    st.facade
        .backends
        .route(&access.principal.tenant, rtype)
        .is_some()
}

/// A reverse chain, `_has:Type:reference:param` (`Patient?_has:Observation:patient:code=1234-5`):
/// the ids, as an `_id` list, of the `rtype` resources that a `Type` resource matching
/// `param=value` points at through its `reference` element or search parameter. The `Type`
/// resources are found with the caller's own access (scopes, patient compartment, SMART v2
/// narrowing), so a reverse chain never tells what the caller could not search for; one level.
fn has_targets(
    st: &AppState,
    access: &Access,
    rtype: &str,
    name: &str,
    value: &str,
) -> ApiResult<String> {
    let bad = |why: String| ApiError::BadRequest(format!("{name}: {why}"));
    let mut parts = name.splitn(4, ':').skip(1);
    let (Some(src), Some(reference), Some(param)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(
            "a reverse chain is _has:<resource type>:<reference parameter>:<search parameter>"
                .into(),
        ));
    };
    if param.starts_with("_has") {
        return Err(bad("one level of _has is supported".into()));
    }
    if !crate::policy::valid_type(src) || !tributary_core::fhir_r4::is_resource(src) {
        return Err(bad(format!("{src:?} is not a FHIR R4 resource type")));
    }
    if routed_elsewhere(st, access, src) {
        return Err(bad(format!(
            "{src} is served by a backend FHIR server; _has searches the built-in store"
        )));
    }
    check_filter(src, param, value).map_err(|e| bad(e.public_message()))?;
    let fields = match include_elements(src, reference) {
        Ok((Some(fields), implied)) if implied.is_none_or(|t| t == rtype) => fields,
        _ => {
            return Err(bad(format!(
                "{src} has no reference {reference:?} that can point at {rtype}"
            )))
        }
    };
    if reference == "patient" && rtype != "Patient" {
        return Err(bad(format!(
            "{src}'s {reference} points at a Patient, not {rtype}"
        )));
    }
    if !access.may(Perm::Search, src) {
        return Err(ApiError::Forbidden(format!(
            "{name}: token scopes do not allow searching {src}"
        )));
    }
    let filters = [(param.to_string(), value.to_string())];
    let mut ids = BTreeSet::new();
    each_match(st, access, src, &filters, Perm::Search, |_, body| {
        for reference in fields
            .iter()
            .filter_map(|f| body.get(*f))
            .flat_map(references)
        {
            let id = reference
                .strip_prefix(rtype)
                .and_then(|r| r.strip_prefix('/'));
            if let Some(id) = id.filter(|id| crate::policy::valid_id(id)) {
                ids.insert(id.to_string());
            }
        }
    })?;
    Ok(ids.into_iter().collect::<Vec<_>>().join(","))
}

/// Calls `each` with every `rtype` resource that matches all `filters` and that the caller may
/// see, with its parsed body: candidates from the most selective index the filters allow, at
/// most [`MAX_SCAN`] of them (a 400 past that).
pub(crate) fn each_match(
    st: &AppState,
    access: &Access,
    rtype: &str,
    filters: &[(String, String)],
    perm: Perm,
    mut each: impl FnMut(StoredResource, &Value),
) -> ApiResult<()> {
    let tenant = access.principal.tenant.as_str();
    let store = &st.rt.store;
    // Candidates from the most selective index available.
    let mut ids: Option<Vec<String>> = None;
    if let Some(pid) = access.indexed_compartment(perm, rtype) {
        ids = intersect(
            ids,
            if rtype == "Patient" {
                vec![pid.to_string()]
            } else {
                patient_ids(st, tenant, pid, rtype)?
            },
        );
    }
    for (k, v) in filters {
        let (base, modifier) = k.split_once(':').unwrap_or((k, ""));
        // `:missing`, `:not` and `:text` ask something no index answers
        let indexed = match modifier {
            "" | "exact" => true,
            "Patient" => matches!(base, "patient" | "subject"),
            _ => false,
        };
        if !indexed {
            continue;
        }
        match base {
            "_id" => {
                let listed = v.split(',').filter(|x| !x.is_empty()).map(String::from);
                ids = intersect(ids, listed.collect())
            }
            "patient" | "subject" => {
                let pids: Vec<&str> = v
                    .split(',')
                    .map(|p| p.strip_prefix("Patient/").unwrap_or(p))
                    .collect();
                if pids.iter().all(|p| !p.contains('/')) {
                    let mut found = Vec::new();
                    for pid in pids.into_iter().filter(|p| !p.is_empty()) {
                        if rtype == "Patient" {
                            found.push(pid.to_string());
                        } else {
                            found.extend(patient_ids(st, tenant, pid, rtype)?);
                        }
                    }
                    found.sort_unstable();
                    found.dedup();
                    ids = intersect(ids, found);
                }
            }
            "identifier" if !v.contains(',') => {
                let (system, value) = match v.split_once('|') {
                    Some((s, val)) => (Some(s).filter(|s| !s.is_empty()), val),
                    None => (None, v.as_str()),
                };
                ids = intersect(ids, store.ids_by_identifier(tenant, rtype, system, value)?);
            }
            "_lastUpdated" if !v.contains(',') => {
                if let Some((from, to)) = last_updated_bounds(v) {
                    ids = intersect(ids, store.ids_by_last_updated(tenant, rtype, from, to)?);
                }
            }
            // a prefix of the folded value (`:exact` too: an exact match is a folded prefix
            // match; `:contains` cannot use a prefix index)
            "name" | "family" => {
                let values: Vec<String> = v
                    .split(',')
                    .map(tributary_core::fold_search_string)
                    .collect();
                // an empty prefix would name every resource with a name: no narrowing
                if values.iter().all(|x| !x.is_empty()) {
                    let mut any = Vec::new();
                    for value in &values {
                        any.extend(store.ids_by_string_prefix(tenant, rtype, base, value)?);
                    }
                    any.sort_unstable();
                    any.dedup();
                    ids = intersect(ids, any);
                }
            }
            "birthdate" if !v.contains(',') => {
                let found = match birthdate_bounds(v) {
                    Some(BirthdateBounds::Prefix(p)) => {
                        Some(store.ids_by_string_prefix(tenant, rtype, base, p)?)
                    }
                    Some(BirthdateBounds::Range(from, to)) => Some(store.ids_by_string_range(
                        tenant,
                        rtype,
                        base,
                        &from,
                        to.as_deref(),
                    )?),
                    None => None,
                };
                if let Some(found) = found {
                    ids = intersect(ids, found);
                }
            }
            _ => {}
        }
    }
    let candidates: Vec<StoredResource> = match ids {
        Some(ids) => {
            // Never a silently shortened answer: past the bound, the client narrows the search.
            if ids.len() > MAX_SCAN {
                return Err(ApiError::BadRequest(format!(
                    "search matches more than {MAX_SCAN} resources by its indexed parameters; narrow it (_lastUpdated, _id, identifier)"
                )));
            }
            let mut out = Vec::new();
            for id in &ids {
                if let Some(r) = store.read(tenant, rtype, id)? {
                    if !r.deleted {
                        out.push(r);
                    }
                }
            }
            out
        }
        None => {
            let all = store.list(tenant, rtype, None, MAX_SCAN + 1)?;
            if all.len() > MAX_SCAN {
                return Err(ApiError::BadRequest(format!(
                    "search would scan more than {MAX_SCAN} resources; add _id, identifier, patient, name, birthdate or _lastUpdated"
                )));
            }
            all
        }
    };
    for stored in candidates {
        let r = stored.resource()?;
        let mut ok = true;
        for (k, v) in filters {
            if !param_matches(&stored, &r, k, v)? {
                ok = false;
                break;
            }
        }
        if ok && access.permits(perm, rtype, &stored.id, &r) {
            each(stored, &r);
        }
    }
    Ok(())
}

/// A search's parameters, checked: the page, the order, what to include, and the filters (a
/// chain or `_has` already resolved to the ids it names).
pub(crate) struct Query {
    count: usize,
    offset: usize,
    sort: Vec<(SortKey, bool)>,
    includes: Vec<Include>,
    revincludes: Vec<RevInclude>,
    pub(crate) filters: Vec<(String, String)>,
}

pub(crate) fn parse_query(
    st: &AppState,
    access: &Access,
    rtype: &str,
    params: &[(String, String)],
) -> ApiResult<Query> {
    let mut count = DEFAULT_COUNT;
    let mut offset = 0usize;
    let mut sort = Vec::new();
    let mut includes = Vec::new();
    let mut revincludes = Vec::new();
    let mut filters = Vec::new();
    for (k, v) in params {
        match k.as_str() {
            "_count" => {
                count = v
                    .parse::<usize>()
                    .map_err(|_| ApiError::BadRequest("_count must be a number".into()))?
                    .min(MAX_COUNT)
            }
            "_offset" => {
                offset = v
                    .parse()
                    .map_err(|_| ApiError::BadRequest("_offset must be a number".into()))?
            }
            "_sort" => sort.extend(parse_sort(rtype, v)?),
            "_include" | "_include:iterate" | "_include:recurse" => includes.push(Include {
                spec: v.clone(),
                iterate: k != "_include",
            }),
            "_summary" => {
                if !["count", "true", "false", "data", "text"].contains(&v.as_str()) {
                    return Err(ApiError::BadRequest(
                        "_summary supports true, count, data, text and false".into(),
                    ));
                }
            }
            "_elements" => {
                crate::subset::Subset::from_params(
                    rtype,
                    std::slice::from_ref(&(k.clone(), v.clone())),
                )?;
            }
            "_revinclude" => revincludes.push(RevInclude::parse(v)?),
            // every total is exact (the matches are counted before a page is cut); `none`
            // leaves it out of the Bundle
            "_total" if ["none", "estimate", "accurate"].contains(&v.as_str()) => {}
            "_total" => {
                return Err(ApiError::BadRequest(
                    "_total is none, estimate or accurate".into(),
                ))
            }
            "_format" => {}
            name if name.starts_with("_has:") => {
                filters.push(("_id".into(), has_targets(st, access, rtype, name, v)?));
            }
            name if name.contains('.') => {
                let (reference, targets) = chained_targets(st, access, rtype, name, v)?;
                filters.push((reference.to_string(), targets));
            }
            name => {
                check_filter(rtype, name, v)?;
                filters.push((k.clone(), v.clone()));
            }
        }
    }
    debug_assert!(CONTROL_PARAMS.contains(&"_count"));
    Ok(Query {
        count,
        offset,
        sort,
        includes,
        revincludes,
        filters,
    })
}

/// Runs a search for the caller. Shared by GET/POST search, batch entries and conditional ops.
pub fn run_search(
    st: &AppState,
    access: &Access,
    rtype: &str,
    params: &[(String, String)],
    perm: Perm,
) -> ApiResult<SearchResult> {
    let Query {
        count,
        offset,
        sort,
        includes,
        revincludes,
        filters,
    } = parse_query(st, access, rtype, params)?;
    // Each match with its values for the sort keys.
    let mut matches: Vec<(StoredResource, Vec<Option<i64>>)> = Vec::new();
    each_match(st, access, rtype, &filters, perm, |stored, r| {
        let values = sort_values(r, &sort);
        matches.push((stored, values));
    })?;
    matches.sort_by(|(a, x), (b, y)| sort_order(&sort, (a, x), (b, y)));
    let matches: Vec<StoredResource> = matches.into_iter().map(|(m, _)| m).collect();
    let total = matches.len();
    let page: Vec<StoredResource> = matches.into_iter().skip(offset).take(count).collect();
    let mut included = Vec::new();
    let mut remote = Vec::new();
    let mut elsewhere = BTreeSet::new();
    let mut seen: BTreeSet<(String, String)> = page
        .iter()
        .map(|r| (r.resource_type.clone(), r.id.clone()))
        .collect();
    let mut found = Included {
        seen: &mut seen,
        included: &mut included,
        remote: &mut remote,
    };
    for inc in includes.iter().filter(|i| !i.iterate) {
        follow_include(st, access, rtype, inc, &page, &mut found)?;
    }
    // `:iterate` follows its references from the matches and from everything included so far,
    // then from what each round added, until a round adds nothing
    let iterating: Vec<&Include> = includes.iter().filter(|i| i.iterate).collect();
    if !iterating.is_empty() {
        let mut sources: Vec<StoredResource> =
            page.iter().chain(found.included.iter()).cloned().collect();
        for _ in 0..MAX_ITERATE_ROUNDS {
            let before = found.included.len();
            for inc in &iterating {
                follow_include(st, access, rtype, inc, &sources, &mut found)?;
            }
            if found.included.len() == before {
                break;
            }
            if found.included.len() > MAX_ITERATED {
                found.included.truncate(MAX_ITERATED);
                elsewhere.insert(format!(
                    "_include:iterate stopped at {MAX_ITERATED} included resources; narrow the search"
                ));
                break;
            }
            sources = found.included[before..].to_vec();
        }
    }
    let summary_count = params.iter().any(|(k, v)| k == "_summary" && v == "count");
    if !summary_count {
        let mut found = RevIncluded {
            seen: &mut seen,
            included: &mut included,
            notes: &mut elsewhere,
            budget: MAX_REVINCLUDES,
        };
        for rev in &revincludes {
            rev_include(st, access, rtype, &page, rev, &mut found)?;
        }
    }
    Ok(SearchResult {
        matches: page,
        included,
        remote,
        remote_included: Vec::new(),
        elsewhere,
        total,
        offset,
        count,
    })
}

/// Most resources one search's `_revinclude`s bring in; past it, the answer says so.
pub const MAX_REVINCLUDES: usize = 1_000;

/// Rounds of `_include:iterate` (each follows the references of what the round before added).
const MAX_ITERATE_ROUNDS: usize = 8;
/// Most resources the includes of one search bring in when one of them iterates.
pub const MAX_ITERATED: usize = 1_000;

/// One `_include=Source:field[:Target]`; `iterate` (`_include:iterate`, R4's name for STU3's
/// `:recurse`) also follows it from included resources, and its `Source` may be any type.
#[derive(Debug)]
pub(crate) struct Include {
    spec: String,
    iterate: bool,
}

/// What the includes of one search found so far.
struct Included<'a> {
    /// Every resource in the answer already (matches and includes), by type and id.
    seen: &'a mut BTreeSet<(String, String)>,
    included: &'a mut Vec<StoredResource>,
    /// References whose type a backend FHIR server serves (read later; not iterated from).
    remote: &'a mut Vec<RemoteRef>,
}

/// Adds what `inc` reaches from `sources` (those of its source type): each referenced resource
/// the caller may read, once.
fn follow_include(
    st: &AppState,
    access: &Access,
    rtype: &str,
    inc: &Include,
    sources: &[StoredResource],
    found: &mut Included,
) -> ApiResult<()> {
    let tenant = access.principal.tenant.as_str();
    let mut parts = inc.spec.split(':');
    let (src, field, target) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next(),
    );
    if field.is_empty() || (!inc.iterate && src != rtype) {
        return Err(ApiError::BadRequest(format!(
            "_include must be {rtype}:<reference field> (another type's references with _include:iterate)"
        )));
    }
    if !crate::policy::valid_type(src) {
        return Err(ApiError::BadRequest(format!(
            "_include:iterate {src}:{field}: {src} is not a resource type"
        )));
    }
    let (fields, implied) = include_elements(src, field)?;
    let target = target.or(implied);
    for r in sources.iter().filter(|r| r.resource_type == src) {
        let body = r.resource()?;
        let refs: Vec<&str> = match &fields {
            Some(names) => names
                .iter()
                .filter_map(|f| body.get(*f))
                .flat_map(references)
                .collect(),
            None => body
                .as_object()
                .into_iter()
                .flat_map(|o| o.values())
                .flat_map(references)
                .collect(),
        };
        for reference in refs {
            let Some((t, id)) = reference.split_once('/') else {
                continue;
            };
            if target.is_some_and(|want| want != t)
                || !crate::policy::valid_type(t)
                || !crate::policy::valid_id(id)
            {
                continue;
            }
            if !found.seen.insert((t.to_string(), id.to_string())) {
                continue;
            }
            if let Some(b) = st.facade.backends.route(tenant, t) {
                found.remote.push(RemoteRef {
                    rtype: t.to_string(),
                    id: id.to_string(),
                    backend: b.cfg.name.clone(),
                });
                continue;
            }
            if let Some(inc) = st.rt.store.read(tenant, t, id)? {
                if inc.deleted {
                    continue;
                }
                let v = inc.resource()?;
                if access.permits(Perm::Read, t, id, &v) {
                    found.included.push(inc);
                }
            }
        }
    }
    Ok(())
}

/// One `_revinclude=Source:field[:Target]`: the `Source` resources whose `field` references a
/// match.
#[derive(Debug)]
struct RevInclude {
    source: String,
    field: String,
    /// The elements holding the references (`None`: every top-level reference, for `*`).
    elements: Option<Vec<&'static str>>,
    /// The only type of match the references may point at (given, or implied by the field).
    target: Option<String>,
}

impl RevInclude {
    fn parse(v: &str) -> ApiResult<Self> {
        let mut parts = v.split(':');
        let (source, field, target) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
            parts.next(),
        );
        if !crate::policy::valid_type(source) || field.is_empty() || parts.next().is_some() {
            return Err(ApiError::BadRequest(
                "_revinclude must be <resource type>:<reference field>[:<target type>]".into(),
            ));
        }
        if target.is_some_and(|t| !crate::policy::valid_type(t)) {
            return Err(ApiError::BadRequest(format!(
                "_revinclude {v}: the target is no resource type"
            )));
        }
        let (elements, implied) = include_elements(source, field)?;
        Ok(Self {
            source: source.to_string(),
            field: field.to_string(),
            elements,
            target: target.or(implied).map(String::from),
        })
    }

    fn name(&self) -> String {
        format!("{}:{}", self.source, self.field)
    }

    /// Whether `resource` (of the source type) references `target` (`Type/id`).
    fn references(&self, resource: &Value, target: &str) -> bool {
        let mut refs: Box<dyn Iterator<Item = &Value>> = match &self.elements {
            Some(names) => Box::new(names.iter().filter_map(|f| resource.get(*f))),
            None => Box::new(resource.as_object().into_iter().flat_map(|o| o.values())),
        };
        refs.any(|v| references(v).contains(&target))
    }
}

/// What a search's `_revinclude`s have brought in so far.
struct RevIncluded<'a> {
    /// Every resource in the answer already (matches and includes), by type and id.
    seen: &'a mut BTreeSet<(String, String)>,
    included: &'a mut Vec<StoredResource>,
    /// Why the answer leaves some out (named in the Bundle).
    notes: &'a mut BTreeSet<String>,
    /// How many more may come in.
    budget: usize,
}

/// Adds the resources of `rev.source` that reference one of `page`'s matches and that the
/// caller may read. Where to look, without an index of references: for a match that belongs to
/// patients (a Patient, an Encounter, an Observation), the resources of those patients'
/// compartments as the patient index holds them — for a Patient that is every resource whose
/// patient reference names it, for anything else the resources of the same patients; for a
/// match outside every compartment (a Practitioner, an Organization), the source type's
/// resources, at most [`MAX_SCAN`] of them. What cannot be looked through is named in the
/// answer, never silently left out.
fn rev_include(
    st: &AppState,
    access: &Access,
    rtype: &str,
    page: &[StoredResource],
    rev: &RevInclude,
    found: &mut RevIncluded<'_>,
) -> ApiResult<()> {
    let tenant = access.principal.tenant.as_str();
    if rev.target.as_deref().is_some_and(|t| t != rtype) || page.is_empty() {
        return Ok(());
    }
    if let Some(b) = st.facade.backends.route(tenant, &rev.source) {
        found.notes.insert(format!(
            "_revinclude {}: {} is served by the backend FHIR server {}; search it there",
            rev.name(),
            rev.source,
            b.cfg.name
        ));
        return Ok(());
    }
    // Where to look, each read and decoded once per search: a patient's compartment of the
    // source type (by patient id), or all of the source type (`None`).
    let mut pools: std::collections::BTreeMap<Option<String>, Vec<(StoredResource, Value)>> =
        Default::default();
    for m in page {
        let target = format!("{rtype}/{}", m.id);
        let patients = crate::policy::patient_links(rtype, &m.id, &m.resource()?);
        let keys: Vec<Option<String>> = if patients.is_empty() {
            vec![None]
        } else {
            patients.into_iter().map(Some).collect()
        };
        for key in keys {
            if !pools.contains_key(&key) {
                let pool = rev_include_pool(st, tenant, rtype, rev, key.as_deref(), found)?;
                pools.insert(key.clone(), pool);
            }
            for (r, v) in &pools[&key] {
                if found
                    .seen
                    .contains(&(r.resource_type.clone(), r.id.clone()))
                    || !rev.references(v, &target)
                    || !access.permits(Perm::Read, &rev.source, &r.id, v)
                {
                    continue;
                }
                if found.budget == 0 {
                    found.notes.insert(format!(
                        "_revinclude: more than {MAX_REVINCLUDES} resources; ask for fewer matches (_count) or search {} directly",
                        rev.source
                    ));
                    return Ok(());
                }
                found.budget -= 1;
                found.seen.insert((r.resource_type.clone(), r.id.clone()));
                found.included.push(r.clone());
            }
        }
    }
    Ok(())
}

/// The live resources of `rev.source` in `patient`'s compartment, or all of them (`None`); empty,
/// with a note, when there are more than [`MAX_SCAN`].
fn rev_include_pool(
    st: &AppState,
    tenant: &str,
    rtype: &str,
    rev: &RevInclude,
    patient: Option<&str>,
    found: &mut RevIncluded<'_>,
) -> ApiResult<Vec<(StoredResource, Value)>> {
    let store = &st.rt.store;
    let (stored, too_many) = match patient {
        Some(p) => {
            let ids = patient_ids(st, tenant, p, &rev.source)?;
            if ids.len() > MAX_SCAN {
                (
                    Vec::new(),
                    Some(format!("a patient has more than {MAX_SCAN} {}", rev.source)),
                )
            } else {
                let mut out = Vec::with_capacity(ids.len());
                for id in &ids {
                    out.extend(store.read(tenant, &rev.source, id)?);
                }
                (out, None)
            }
        }
        None => {
            let all = store.list(tenant, &rev.source, None, MAX_SCAN + 1)?;
            if all.len() > MAX_SCAN {
                let why = format!(
                    "more than {MAX_SCAN} {} to look through for references to a {rtype}",
                    rev.source
                );
                (Vec::new(), Some(why))
            } else {
                (all, None)
            }
        }
    };
    if let Some(why) = too_many {
        found.notes.insert(format!(
            "_revinclude {}: {why}; search {} directly",
            rev.name(),
            rev.source
        ));
        return Ok(Vec::new());
    }
    let mut out = Vec::with_capacity(stored.len());
    for r in stored.into_iter().filter(|r| !r.deleted) {
        let v = r.resource()?;
        out.push((r, v));
    }
    Ok(out)
}

fn patient_ids(st: &AppState, tenant: &str, pid: &str, rtype: &str) -> ApiResult<Vec<String>> {
    Ok(st
        .rt
        .store
        .ids_by_patient(tenant, pid, Some(rtype))?
        .into_iter()
        .map(|(_, id)| id)
        .collect())
}

pub(crate) fn link_query(params: &[(String, String)], offset: usize) -> String {
    link_query_with(params, "_offset", &offset.to_string())
}

/// The request's parameters with the paging parameter `key` set to `value`, as a query string.
pub(crate) fn link_query_with(params: &[(String, String)], key: &str, value: &str) -> String {
    link_query_set(params, &[(key, value)])
}

/// The request's parameters with each of `set` replacing any of the same name (appended in
/// that order), as a query string: the links of a paged answer.
pub(crate) fn link_query_set(params: &[(String, String)], set: &[(&str, &str)]) -> String {
    params
        .iter()
        .filter(|(k, _)| !set.iter().any(|(s, _)| s == k))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain(set.iter().copied())
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

pub(crate) fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A searchset entry saying the answer leaves something out, and why (`search.mode` `outcome`).
pub(crate) fn incomplete_entry(diagnostics: &str) -> Value {
    json!({"resource": {"resourceType": "OperationOutcome", "issue": [{
        "severity": "warning", "code": "incomplete", "diagnostics": diagnostics}]},
        "search": {"mode": "outcome"}})
}

pub(crate) fn searchset(
    base: &str,
    rtype: &str,
    params: &[(String, String)],
    res: &SearchResult,
    audit: &AuditSlot,
) -> ApiResult<Value> {
    let mut seen = Disclosed::default();
    let summary_count = params.iter().any(|(k, v)| k == "_summary" && v == "count");
    let mut links = vec![
        json!({"relation": "self", "url": format!("{base}/{rtype}?{}", link_query(params, res.offset))}),
    ];
    let mut entries = Vec::new();
    let subset = crate::subset::Subset::from_params(rtype, params)?;
    if !summary_count {
        if res.offset + res.count < res.total {
            links.push(json!({"relation": "next", "url": format!("{base}/{rtype}?{}", link_query(params, res.offset + res.count))}));
        }
        if res.offset > 0 {
            links.push(json!({"relation": "previous", "url": format!("{base}/{rtype}?{}", link_query(params, res.offset.saturating_sub(res.count)))}));
        }
        for (r, mode) in res
            .matches
            .iter()
            .map(|r| (r, "match"))
            .chain(res.included.iter().map(|r| (r, "include")))
        {
            let mut v = r.resource()?;
            seen.add(&r.resource_type, &r.id, &v);
            if let (Some(s), "match") = (&subset, mode) {
                s.apply(rtype, &mut v);
            }
            entries.push(json!({
                "fullUrl": format!("{base}/{}/{}", r.resource_type, r.id),
                "resource": v,
                "search": {"mode": mode},
            }));
        }
        for v in &res.remote_included {
            let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default();
            let (t, id) = (s("resourceType"), s("id"));
            seen.add(t, id, v);
            entries.push(json!({
                "fullUrl": format!("{base}/{t}/{id}"),
                "resource": v,
                "search": {"mode": "include"},
            }));
        }
    }
    let mut elsewhere = res.elsewhere.clone();
    for r in &res.remote {
        elsewhere.insert(format!(
            "{} ({}): served by a backend FHIR server; read them there",
            r.rtype, r.backend
        ));
    }
    if !summary_count && !elsewhere.is_empty() {
        entries.push(incomplete_entry(&format!(
            "not all included: {}",
            elsewhere.into_iter().collect::<Vec<_>>().join("; ")
        )));
    }
    audit.disclose(seen);
    let mut bundle = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": res.total,
        "link": links,
    });
    if !summary_count {
        bundle["entry"] = Value::Array(entries);
    }
    if params.iter().any(|(k, v)| k == "_total" && v == "none") && !summary_count {
        bundle.as_object_mut().map(|b| b.remove("total"));
    }
    Ok(bundle)
}

async fn do_search(
    st: AppState,
    headers: HeaderMap,
    rtype: String,
    access: Access,
    slot: AuditSlot,
    params: Vec<(String, String)>,
) -> ApiResult<Response> {
    check_type(&rtype)?;
    let mut res = run_search(&st, &access, &rtype, &params, Perm::Search)?;
    include_from_backends(&st, &access, &slot, &params, &mut res).await;
    slot.update(|d| d.returned = Some(res.returned()));
    let base = base_url(&st, &headers);
    Ok(bundle_response(&searchset(
        &base, &rtype, &params, &res, &slot,
    )?))
}

pub async fn search_get(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(rtype): Path<String>,
    Extension(access): Extension<Access>,
    Extension(slot): Extension<AuditSlot>,
    Extension(req): Extension<FhirRequest>,
) -> ApiResult<Response> {
    do_search(st, headers, rtype, access, slot, req.params).await
}

/// `POST /fhir/{type}/_search` with an `application/x-www-form-urlencoded` body.
pub async fn search_post(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(rtype): Path<String>,
    Extension(access): Extension<Access>,
    Extension(slot): Extension<AuditSlot>,
    Extension(req): Extension<FhirRequest>,
    body: String,
) -> ApiResult<Response> {
    let mut params = req.params;
    params.extend(crate::policy::decode_query(Some(&body)));
    do_search(st, headers, rtype, access, slot, params).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        let d = date_range("2024-03-05").unwrap();
        assert!(date_matches("ge", d, date_range("2024-03").unwrap()));
        assert!(date_matches("le", d, date_range("2024-03-05").unwrap()));
        assert!(!date_matches("gt", d, date_range("2024-03-05").unwrap()));
        assert!(date_matches(
            "eq",
            date_range("2024-03-05T10:00:00Z").unwrap(),
            d
        ));
        assert!(date_matches("lt", d, date_range("2025").unwrap()));
        assert_eq!(split_prefix("ge2024-01-01"), ("ge", "2024-01-01"));
        assert_eq!(split_prefix("2024"), ("eq", "2024"));
    }

    #[test]
    fn birthdate_index_bounds_cover_every_date_the_filter_accepts() {
        use BirthdateBounds::*;
        assert_eq!(birthdate_bounds("1980-03"), Some(Prefix("1980-03")));
        assert_eq!(
            birthdate_bounds("ge1980-03-05"),
            Some(Range("1980".into(), None))
        );
        assert_eq!(
            birthdate_bounds("lt1980-03-05"),
            Some(Range(String::new(), Some("1981".into())))
        );
        assert_eq!(birthdate_bounds("ne1980"), None);
        assert_eq!(birthdate_bounds("ge1980-03-05T10:00:00+14:00"), None);
        // Every stored date the filter accepts falls inside the bounds.
        let stored = [
            "1979",
            "1979-12-31",
            "1980",
            "1980-03",
            "1980-03-04",
            "1980-03-05",
            "1980-12-31",
            "1981-01-01",
        ];
        for q in [
            "1980",
            "1980-03",
            "1980-03-05",
            "ge1980-03-05",
            "gt1980-03",
            "le1980-03-05",
            "lt1980",
            "sa1980-03-04",
            "eb1981",
        ] {
            let (prefix, val) = split_prefix(q);
            let p = date_range(val).unwrap();
            for s in stored {
                if !date_matches(prefix, date_range(s).unwrap(), p) {
                    continue;
                }
                let inside = match birthdate_bounds(q).unwrap() {
                    Prefix(pre) => s.starts_with(pre),
                    Range(from, to) => s >= from.as_str() && to.is_none_or(|t| s < t.as_str()),
                };
                assert!(inside, "{q} accepts {s} but the index bounds miss it");
            }
        }
    }

    #[test]
    fn names_and_identifiers() {
        let p = json!({"name":[{"family":"Smith","given":["Ann"]}],"identifier":[{"system":"urn:mrn","value":"7"}]});
        assert!(string_matches(&p, "name", None, "smi"));
        assert!(string_matches(&p, "name", None, "ann"));
        assert!(!string_matches(&p, "name", None, "bob"));
        assert!(string_matches(&p, "family", None, "SMI"));
        assert!(!string_matches(&p, "family", None, "ann"));
        assert!(string_matches(&p, "name", Some("exact"), "Smith"));
        assert!(!string_matches(&p, "name", Some("exact"), "smith"));
        assert!(!string_matches(&p, "name", Some("exact"), "Smit"));
        assert!(string_matches(&p, "name", Some("contains"), "MIT"));
        assert!(!string_matches(&p, "name", None, "mit"));
        let accented = json!({"name":[{"family":"Müller","given":["Zoë"]}]});
        assert!(string_matches(&accented, "name", None, "muller"));
        assert!(string_matches(&accented, "family", None, "MÜL"));
        assert!(string_matches(&accented, "name", None, "zoe"));
        let org = json!({"name":"Good Health Clinic"});
        assert!(string_matches(&org, "name", None, "good"));
        assert!(!string_matches(&org, "family", None, "good"));
        assert!(identifier_matches(&p, "urn:mrn|7"));
        assert!(identifier_matches(&p, "7"));
        assert!(!identifier_matches(&p, "urn:other|7"));
    }
}
