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
}
