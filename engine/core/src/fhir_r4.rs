//! FHIR R4 (4.0.1) element names, types and cardinalities, generated from the `fhir.resources`
//! 6.4.0 models by `scripts/gen_fhir_elements.py`. Mapping targets are checked against this table
//! at load time, so `Patient.gendr` is a load error with a suggestion, not a silently empty field;
//! the facade offers a search parameter on the types that have the element it reads.

use std::collections::HashMap;
use std::sync::OnceLock;

const TABLE: &str = include_str!("../data/fhir_r4_elements.tsv");

/// One element of a FHIR type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Element {
    /// The element's type: a primitive (`string`, `dateTime`, …), a datatype (`HumanName`) or a
    /// backbone element class (`PatientContact`).
    pub ty: &'static str,
    pub many: bool,
}

struct Table {
    elements: HashMap<&'static str, HashMap<&'static str, Element>>,
    /// Per type, what R4 requires (min 1): an element name, or a choice group (`occurrence[x]`)
    /// of which one member must be present.
    required: HashMap<&'static str, Vec<Required>>,
}

/// One requirement of a type's R4 definition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Required {
    Element(&'static str),
    /// `occurrence[x]` and its members (`occurrenceDateTime`, `occurrenceString`).
    Choice(&'static str, Vec<&'static str>),
}

impl Required {
    /// Whether `has(name)` finds the element, or one member of the choice.
    pub fn met_by(&self, has: impl Fn(&str) -> bool) -> bool {
        match self {
            Required::Element(e) => has(e),
            Required::Choice(_, members) => members.iter().any(|m| has(m)),
        }
    }

    /// `status`, `occurrence[x]`.
    pub fn name(&self) -> &'static str {
        match self {
            Required::Element(e) | Required::Choice(e, _) => e,
        }
    }
}

fn table() -> &'static Table {
    static T: OnceLock<Table> = OnceLock::new();
    T.get_or_init(|| {
        let mut elements: HashMap<&'static str, HashMap<&'static str, Element>> = HashMap::new();
        let mut required: HashMap<&'static str, Vec<Required>> = HashMap::new();
        for line in TABLE.lines() {
            let mut it = line.split('\t');
            let (Some(owner), Some(name), Some(ty), Some(max)) =
                (it.next(), it.next(), it.next(), it.next())
            else {
                continue;
            };
            elements.entry(owner).or_default().insert(
                name,
                Element {
                    ty,
                    many: max == "*",
                },
            );
            let list = required.entry(owner).or_default();
            match it.next() {
                Some("1") => list.push(Required::Element(name)),
                Some(group) if group.ends_with("[x]") => {
                    match list
                        .iter_mut()
                        .find(|r| matches!(r, Required::Choice(g, _) if *g == group))
                    {
                        Some(Required::Choice(_, members)) => members.push(name),
                        _ => list.push(Required::Choice(group, vec![name])),
                    }
                }
                _ => {}
            }
        }
        Table { elements, required }
    })
}

/// What R4 requires of `ty` (min 1 elements and required choices), in table order.
pub fn required(ty: &str) -> &'static [Required] {
    table().required.get(ty).map_or(&[], Vec::as_slice)
}

/// True for a type the table knows (a resource, datatype or backbone element).
pub fn is_type(ty: &str) -> bool {
    table().elements.contains_key(ty)
}

/// Whether `ty` is a resource type (it has `id`, `meta` and `implicitRules`).
pub fn is_resource(ty: &str) -> bool {
    table()
        .elements
        .get(ty)
        .is_some_and(|m| m.contains_key("implicitRules"))
}

pub fn element(owner: &str, name: &str) -> Option<Element> {
    table().elements.get(owner)?.get(name).copied()
}

/// Whether `owner` has a choice element named `base` (`value` for `valueQuantity`,
/// `valueString`, …).
pub fn has_choice(owner: &str, base: &str) -> bool {
    table()
        .elements
        .get(owner)
        .is_some_and(|els| els.keys().any(|k| is_choice_member(k, base)))
}

/// Whether element name `name` is a member of choice `base` (`valueQuantity` of `value`).
pub fn is_choice_member(name: &str, base: &str) -> bool {
    name.strip_prefix(base)
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase()))
}

/// The table's own `'static` copy of a type name.
pub fn static_type_name(ty: &str) -> Option<&'static str> {
    table().elements.get_key_value(ty).map(|(k, _)| *k)
}

/// The table's own `'static` copy of an element name.
pub fn static_element_name(owner: &str, name: &str) -> Option<&'static str> {
    table()
        .elements
        .get(owner)?
        .get_key_value(name)
        .map(|(k, _)| *k)
}

/// FHIR primitive types: their values are JSON scalars.
pub fn is_primitive(ty: &str) -> bool {
    ty.chars().next().is_some_and(|c| c.is_ascii_lowercase())
}

/// The closest element name of `owner` to `name`, for "did you mean" suggestions.
pub fn suggest_element(owner: &str, name: &str) -> Option<&'static str> {
    let names = table().elements.get(owner)?;
    closest(name, names.keys().copied())
}

pub fn suggest_type(name: &str) -> Option<&'static str> {
    closest(name, table().elements.keys().copied())
}

/// The candidate with the smallest edit distance, if it is close enough to be a plausible typo.
pub fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let d = levenshtein(&word.to_ascii_lowercase(), &c.to_ascii_lowercase());
        if best.is_none_or(|(bd, bc)| d < bd || (d == bd && c < bc)) {
            best = Some((d, c));
        }
    }
    best.filter(|(d, c)| *d <= (c.len().max(word.len()) / 3).max(2))
        .map(|(_, c)| c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Checks a resource of type `rtype` against the table at every level: each member is an element
/// of its type (or `_element`, a primitive's id and extensions), a list where R4 repeats it and a
/// single value where it does not, an object for a complex type, and every element R4 requires
/// is present, every primitive value in its type's format ([`crate::fhir_primitive`]: a
/// `birthDate` is a calendar date, a `code` has no stray whitespace); contained and nested
/// resources (`Bundle.entry.resource`) are checked as their own type. The error names the path
/// and element (`Observation.code.coding[0] has no element \`sytem\``), never a value.
pub fn check_resource(rtype: &str, resource: &serde_json::Value) -> Result<(), String> {
    match resource.as_object() {
        Some(obj) => check_object(rtype, obj, rtype),
        None => Err(format!("{rtype} must be a JSON object")),
    }
}

fn check_object(
    ty: &str,
    obj: &serde_json::Map<String, serde_json::Value>,
    path: &str,
) -> Result<(), String> {
    use serde_json::Value;
    if !is_type(ty) {
        return Ok(());
    }
    let resource = is_resource(ty);
    for (key, v) in obj {
        if resource && key == "resourceType" {
            continue;
        }
        let (name, shadow) = match key.strip_prefix('_') {
            Some(n) => (n, true),
            None => (key.as_str(), false),
        };
        let Some(el) = element(ty, name) else {
            let hint = suggest_element(ty, name)
                .map(|s| format!(" — did you mean `{s}`?"))
                .unwrap_or_default();
            return Err(format!("{path} has no element `{name}` in FHIR R4{hint}"));
        };
        if shadow {
            continue;
        }
        let here = format!("{path}.{name}");
        match v {
            Value::Array(items) if el.many => {
                for (i, item) in items.iter().enumerate() {
                    check_value(el.ty, item, &format!("{here}[{i}]"))?;
                }
            }
            Value::Array(_) => {
                return Err(format!(
                    "{here} does not repeat in FHIR R4: one value, not a list"
                ))
            }
            Value::Null => {}
            _ if el.many => return Err(format!("{here} repeats in FHIR R4: a list")),
            other => check_value(el.ty, other, &here)?,
        }
    }
    let present =
        |e: &str| obj.get(e).is_some_and(|v| !v.is_null()) || obj.contains_key(&format!("_{e}"));
    let missing: Vec<&str> = required(ty)
        .iter()
        .filter(|r| !r.met_by(present))
        .map(Required::name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("{path} requires {} in FHIR R4", missing.join(", ")))
    }
}

fn article(ty: &str) -> &'static str {
    match ty.starts_with(['a', 'e', 'i', 'o', 'u', 'A', 'E', 'I', 'O', 'U']) {
        true => "an",
        false => "a",
    }
}

fn check_value(ty: &str, v: &serde_json::Value, path: &str) -> Result<(), String> {
    if is_primitive(ty) {
        return match v {
            serde_json::Value::Null => Ok(()),
            serde_json::Value::Object(_) | serde_json::Value::Array(_) => Err(format!(
                "{path} is {} {ty}: a single JSON value, not an object",
                article(ty)
            )),
            _ => crate::fhir_primitive::check(ty, v)
                .map_err(|need| format!("{path} is {} {ty}: {need}", article(ty))),
        };
    }
    let Some(obj) = v.as_object() else {
        return match v.is_null() {
            true => Ok(()),
            false => Err(format!("{path} is {} {ty}: a JSON object", article(ty))),
        };
    };
    if ty == "Resource" {
        let rt = obj
            .get("resourceType")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| format!("{path} needs a resourceType"))?;
        if !is_resource(rt) {
            return Err(format!("{path}: {rt:?} is not a FHIR R4 resource type"));
        }
        return check_object(rt, obj, path);
    }
    check_object(ty, obj, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_r4_elements_and_cardinality() {
        let e = element("Patient", "name").unwrap();
        assert_eq!(e.ty, "HumanName");
        assert!(e.many);
        let g = element("Patient", "gender").unwrap();
        assert_eq!((g.ty, g.many), ("code", false));
        assert_eq!(
            element("Observation", "valueQuantity").unwrap().ty,
            "Quantity"
        );
        assert!(element("Patient", "gendr").is_none());
        assert_eq!(suggest_element("Patient", "gendr"), Some("gender"));
        assert!(is_resource("Encounter"));
        assert!(!is_resource("HumanName"));
        let names: Vec<&str> = required("Immunization")
            .iter()
            .map(Required::name)
            .collect();
        assert_eq!(names, ["occurrence[x]", "patient", "status", "vaccineCode"]);
        assert!(required("Immunization")[0].met_by(|e| e == "occurrenceString"));
        assert!(!required("Immunization")[0].met_by(|e| e == "recorded"));
        assert!(required("Patient").is_empty());
    }

    #[test]
    fn every_level_of_a_resource_is_checked_and_the_error_names_the_path() {
        use serde_json::json;
        let ok = json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}], "text": "Hgb"},
            "_status": {"extension": [{"url": "urn:x", "valueString": "y"}]},
            "valueQuantity": {"value": 7.2, "unit": "g/dL"},
            "component": [{"code": {"text": "a"}, "valueString": "b"}],
            "contained": [{"resourceType": "Patient", "id": "p", "name": [{"given": ["A", null]}],
                           "_name": null}],
            "extension": [{"url": "urn:e", "valueReference": {"reference": "Patient/p"}}]});
        assert_eq!(check_resource("Observation", &ok), Ok(()));
        for (bad, error) in [
            (json!({"code": {"coding": [{"sytem": "x"}]}}),
             "Observation.code.coding[0] has no element `sytem` in FHIR R4 — did you mean `system`?"),
            (json!({"code": {"coding": {"code": "x"}}}),
             "Observation.code.coding repeats in FHIR R4: a list"),
            (json!({"code": [{"text": "x"}]}),
             "Observation.code does not repeat in FHIR R4: one value, not a list"),
            (json!({"code": "718-7"}), "Observation.code is a CodeableConcept: a JSON object"),
            (json!({"status": {"code": "final"}}),
             "Observation.status is a code: a single JSON value, not an object"),
            (json!({"component": [{"valueString": "b"}]}),
             "Observation.component[0] requires code in FHIR R4"),
            (json!({"contained": [{"resourceType": "Patient", "gendr": "x"}]}),
             "Observation.contained[0] has no element `gendr` in FHIR R4 — did you mean `gender`?"),
            (json!({"contained": [{"id": "x"}]}), "Observation.contained[0] needs a resourceType"),
            (json!({"extension": [{"valueString": "x"}]}),
             "Observation.extension[0] requires url in FHIR R4"),
            (json!({"effectiveDateTime": "2026-02-30"}),
             "Observation.effectiveDateTime is a dateTime: YYYY, YYYY-MM, YYYY-MM-DD, or \
              YYYY-MM-DDThh:mm:ss[.f] with Z or ±hh:mm, a real calendar date"),
            (json!({"status": "final "}),
             "Observation.status is a code: a non-empty string without leading, trailing or \
              repeated whitespace"),
            (json!({"valueQuantity": {"value": "7.2"}}),
             "Observation.valueQuantity.value is a decimal: a JSON number"),
            (json!({"component": [{"code": {"text": "a"}, "valueInteger": 2.5}]}),
             "Observation.component[0].valueInteger is an integer: a whole number from \
              -2147483648 to 2147483647"),
        ] {
            let mut v = ok.clone();
            for (k, x) in bad.as_object().unwrap() {
                v[k] = x.clone();
            }
            assert_eq!(check_resource("Observation", &v), Err(error.to_string()), "{bad}");
        }
        let mut no_code = ok.clone();
        no_code.as_object_mut().unwrap().remove("code");
        assert_eq!(
            check_resource("Observation", &no_code),
            Err("Observation requires code in FHIR R4".into())
        );
        // a primitive's extension alone stands for it
        let mut only_ext = ok;
        only_ext.as_object_mut().unwrap().remove("status");
        assert_eq!(check_resource("Observation", &only_ext), Ok(()));
    }
}
