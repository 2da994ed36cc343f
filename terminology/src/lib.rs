//! Terminology: named ConceptMaps that mapping files translate codes through.
//!
//! The built-in set is a small collection of HL7 v2 tables (administrative sex 0001, patient class
//! 0004, abnormal flags 0078, observation result status 0085, marital status 0002, …) kept as data
//! files in `terminology/conceptmaps/*.tsv` (one `source<TAB>target system<TAB>target code<TAB>
//! display` per line; `*` is the fallback for unmapped codes; `source<TAB>-` says the code has no
//! target on purpose, as a ConceptMap target with equivalence `unmatched`, so translating it
//! leaves the element out without the warning an unknown code gets; `*<TAB>-` says that of every
//! code the map does not list). The terminology issue grows this
//! into loadable CodeSystems, ValueSets and ConceptMaps with `$translate`, `$lookup` and
//! `$validate-code` on the facade.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

/// A source code mapped to a target system and code, as a ConceptMap `group.element.target`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub system: String,
    pub code: String,
    pub display: Option<String>,
}

/// A named map from source codes to targets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConceptMap {
    pub name: String,
    pub entries: BTreeMap<String, Target>,
    /// Target for codes the map does not list (ConceptMap `group.unmapped`, mode `fixed`).
    pub unmapped: Option<Target>,
    /// Codes the map lists as having no target (equivalence `unmatched`).
    pub no_target: BTreeSet<String>,
    /// `*<TAB>-`: codes the map does not list have no target, on purpose (a map that picks a
    /// few codes out of a large code system, such as the vital signs out of LOINC).
    pub others_no_target: bool,
}

/// A malformed line in a ConceptMap data file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("conceptmap {map} line {line}: {reason}")]
pub struct TerminologyError {
    pub map: String,
    pub line: usize,
    pub reason: String,
}

impl ConceptMap {
    /// Parses the TSV data format described in the crate docs.
    pub fn parse(name: &str, text: &str) -> Result<Self, TerminologyError> {
        let mut map = ConceptMap {
            name: name.to_string(),
            ..Default::default()
        };
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let cols: Vec<&str> = line.split('\t').collect();
            if cols.len() == 2 && cols[1] == "-" && cols[0] == "*" {
                if map.unmapped.is_some() || map.others_no_target {
                    return Err(duplicate(name, i, cols[0]));
                }
                map.others_no_target = true;
                continue;
            }
            if cols.len() == 2 && cols[1] == "-" && !cols[0].is_empty() {
                if map.entries.contains_key(cols[0]) || !map.no_target.insert(cols[0].into()) {
                    return Err(duplicate(name, i, cols[0]));
                }
                continue;
            }
            if cols.len() < 3 || cols[0].is_empty() || cols[2].is_empty() {
                return Err(TerminologyError {
                    map: name.to_string(),
                    line: i + 1,
                    reason:
                        "expected source, target system, target code[, display] separated by tabs, \
                         or source and - (no target)"
                            .into(),
                });
            }
            let target = Target {
                system: cols[1].to_string(),
                code: cols[2].to_string(),
                display: cols.get(3).filter(|d| !d.is_empty()).map(|d| d.to_string()),
            };
            if cols[0] == "*" {
                if map.unmapped.is_some() || map.others_no_target {
                    return Err(duplicate(name, i, cols[0]));
                }
                map.unmapped = Some(target);
            } else if map.no_target.contains(cols[0])
                || map.entries.insert(cols[0].to_string(), target).is_some()
            {
                return Err(duplicate(name, i, cols[0]));
            }
        }
        Ok(map)
    }

    /// The target for `code`: an exact match, then a case-insensitive one, then the fallback.
    pub fn translate(&self, code: &str) -> Option<&Target> {
        self.listed(code).or_else(|| {
            (!self.states_no_target(code))
                .then_some(self.unmapped.as_ref())
                .flatten()
        })
    }

    /// The target the map lists for `code`, exactly or ignoring case.
    fn listed(&self, code: &str) -> Option<&Target> {
        self.entries.get(code).or_else(|| {
            self.entries
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(code))
                .map(|(_, v)| v)
        })
    }

    /// Whether the map says `code` has no target: listed so (exactly or ignoring case), or not
    /// listed in a map whose `*` line says so.
    pub fn states_no_target(&self, code: &str) -> bool {
        self.no_target.contains(code)
            || self.no_target.iter().any(|k| k.eq_ignore_ascii_case(code))
            || (self.others_no_target && self.listed(code).is_none())
    }
}

fn duplicate(map: &str, index: usize, code: &str) -> TerminologyError {
    TerminologyError {
        map: map.to_string(),
        line: index + 1,
        reason: format!("source code {code} is listed twice"),
    }
}

/// All ConceptMaps known to the engine, by name.
#[derive(Clone, Debug, Default)]
pub struct Terminology {
    maps: BTreeMap<String, ConceptMap>,
}

const BUILTIN: &[(&str, &str)] = &[
    (
        "v2-0001-gender",
        include_str!("../conceptmaps/v2-0001-gender.tsv"),
    ),
    (
        "v2-0002-marital-status",
        include_str!("../conceptmaps/v2-0002-marital-status.tsv"),
    ),
    (
        "v2-0004-encounter-class",
        include_str!("../conceptmaps/v2-0004-encounter-class.tsv"),
    ),
    (
        "v2-0038-order-status",
        include_str!("../conceptmaps/v2-0038-order-status.tsv"),
    ),
    (
        "v2-0038-medicationrequest-status",
        include_str!("../conceptmaps/v2-0038-medicationrequest-status.tsv"),
    ),
    (
        "v2-0074-observation-category",
        include_str!("../conceptmaps/v2-0074-observation-category.tsv"),
    ),
    (
        "v2-0074-lab-report",
        include_str!("../conceptmaps/v2-0074-lab-report.tsv"),
    ),
    (
        "loinc-vital-signs",
        include_str!("../conceptmaps/loinc-vital-signs.tsv"),
    ),
    (
        "v2-0078-interpretation",
        include_str!("../conceptmaps/v2-0078-interpretation.tsv"),
    ),
    (
        "v2-0085-observation-status",
        include_str!("../conceptmaps/v2-0085-observation-status.tsv"),
    ),
    (
        "v2-0119-order-control-status",
        include_str!("../conceptmaps/v2-0119-order-control-status.tsv"),
    ),
    (
        "v2-0119-medicationrequest-status",
        include_str!("../conceptmaps/v2-0119-medicationrequest-status.tsv"),
    ),
    (
        "v2-0123-report-status",
        include_str!("../conceptmaps/v2-0123-report-status.tsv"),
    ),
    (
        "v2-0127-allergy-category",
        include_str!("../conceptmaps/v2-0127-allergy-category.tsv"),
    ),
    (
        "v2-0128-allergy-criticality",
        include_str!("../conceptmaps/v2-0128-allergy-criticality.tsv"),
    ),
    (
        "v2-0128-allergy-severity",
        include_str!("../conceptmaps/v2-0128-allergy-severity.tsv"),
    ),
    (
        "v2-0190-address-type",
        include_str!("../conceptmaps/v2-0190-address-type.tsv"),
    ),
    (
        "v2-0190-address-use",
        include_str!("../conceptmaps/v2-0190-address-use.tsv"),
    ),
    (
        "v2-0200-name-use",
        include_str!("../conceptmaps/v2-0200-name-use.tsv"),
    ),
    (
        "v2-0136-protection-confidentiality",
        include_str!("../conceptmaps/v2-0136-protection-confidentiality.tsv"),
    ),
    (
        "v2-0201-telecom-use",
        include_str!("../conceptmaps/v2-0201-telecom-use.tsv"),
    ),
    (
        "v2-0202-telecom-system",
        include_str!("../conceptmaps/v2-0202-telecom-system.tsv"),
    ),
    (
        "v2-0271-document-status",
        include_str!("../conceptmaps/v2-0271-document-status.tsv"),
    ),
    (
        "v2-0278-appointment-status",
        include_str!("../conceptmaps/v2-0278-appointment-status.tsv"),
    ),
    (
        "v2-0283-referral-status",
        include_str!("../conceptmaps/v2-0283-referral-status.tsv"),
    ),
    (
        "v2-0322-immunization-status",
        include_str!("../conceptmaps/v2-0322-immunization-status.tsv"),
    ),
    (
        "v2-0396-system",
        include_str!("../conceptmaps/v2-0396-system.tsv"),
    ),
    (
        "v2-0436-allergy-type",
        include_str!("../conceptmaps/v2-0436-allergy-type.tsv"),
    ),
    (
        "v2-0438-allergy-verification",
        include_str!("../conceptmaps/v2-0438-allergy-verification.tsv"),
    ),
    (
        "v2-0485-priority",
        include_str!("../conceptmaps/v2-0485-priority.tsv"),
    ),
    (
        "problem-clinical-status",
        include_str!("../conceptmaps/problem-clinical-status.tsv"),
    ),
    (
        "problem-verification-status",
        include_str!("../conceptmaps/problem-verification-status.tsv"),
    ),
    (
        "v2-ed-mime-type",
        include_str!("../conceptmaps/v2-ed-mime-type.tsv"),
    ),
];

/// The built-in HL7 v2 tables, parsed once.
pub fn builtin() -> &'static Terminology {
    static T: OnceLock<Terminology> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = Terminology::default();
        for (name, text) in BUILTIN {
            // The data files ship with the crate; the `builtin_tables_parse` test keeps them valid.
            if let Ok(map) = ConceptMap::parse(name, text) {
                t.insert(map);
            }
        }
        t
    })
}

impl Terminology {
    pub fn insert(&mut self, map: ConceptMap) {
        self.maps.insert(map.name.clone(), map);
    }

    pub fn map(&self, name: &str) -> Option<&ConceptMap> {
        self.maps.get(name)
    }

    /// Whether the named map says `code` has no target on purpose (see the crate docs).
    pub fn states_no_target(&self, map: &str, code: &str) -> bool {
        self.maps.get(map).is_some_and(|m| m.states_no_target(code))
    }

    pub fn names(&self) -> Vec<String> {
        self.maps.keys().cloned().collect()
    }

    /// Translates `code` through the named map. `v2-0396-system` also turns `HL7nnnn` /
    /// `HL7-nnnn` coding-system names into `http://terminology.hl7.org/CodeSystem/v2-nnnn`.
    pub fn translate(&self, map: &str, code: &str) -> Option<Target> {
        let m = self.maps.get(map)?;
        if let Some(t) = m.entries.get(code) {
            return Some(t.clone());
        }
        if map == "v2-0396-system" {
            let digits = code
                .strip_prefix("HL7")
                .map(|d| d.trim_start_matches('-'))
                .filter(|d| d.len() == 4 && d.bytes().all(|b| b.is_ascii_digit()));
            if let Some(d) = digits {
                return Some(Target {
                    system: "uri".into(),
                    code: format!("http://terminology.hl7.org/CodeSystem/v2-{d}"),
                    display: None,
                });
            }
            // A local coding system (`L`, `99ABC`) or a URI already: keep its name as a URI so
            // the code stays interpretable, rather than dropping the system.
            let code = code.trim();
            if code.is_empty() {
                return None;
            }
            return Some(Target {
                system: "uri".into(),
                code: if code.contains(':') {
                    code.replace(char::is_whitespace, "%20")
                } else {
                    format!("urn:id:{}", code.replace(char::is_whitespace, "_"))
                },
                display: None,
            });
        }
        m.translate(code).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_tables_parse() {
        for (name, text) in BUILTIN {
            ConceptMap::parse(name, text).unwrap();
        }
        assert_eq!(builtin().names().len(), BUILTIN.len());
    }

    #[test]
    fn a_code_listed_without_target_is_not_translated_nor_given_the_fallback() {
        let m = ConceptMap::parse("m", "A\tsys\ta\nB\t-\n*\tsys\tother\n").unwrap();
        assert_eq!(m.translate("A").unwrap().code, "a");
        assert!(m.translate("B").is_none() && m.translate("b").is_none());
        assert!(m.states_no_target("b") && !m.states_no_target("C"));
        assert_eq!(m.translate("C").unwrap().code, "other");
        let t = builtin();
        assert!(t.translate("v2-0074-observation-category", "OTH").is_none());
        assert!(t.states_no_target("v2-0074-observation-category", "OTH"));
        assert!(!t.states_no_target("v2-0074-observation-category", "ZZZ"));
        assert_eq!(
            t.translate("v2-0074-observation-category", "HM")
                .unwrap()
                .code,
            "laboratory"
        );
    }

    #[test]
    fn a_star_without_target_makes_every_unlisted_code_quiet() {
        let m = ConceptMap::parse("m", "A\tsys\ta\n*\t-\n").unwrap();
        assert_eq!(m.translate("a").unwrap().code, "a");
        assert!(m.translate("B").is_none());
        assert!(m.states_no_target("B") && !m.states_no_target("A"));
        let t = builtin();
        assert_eq!(
            t.translate("loinc-vital-signs", "8302-2").unwrap().code,
            "vital-signs"
        );
        assert!(t.translate("loinc-vital-signs", "2345-7").is_none());
        assert!(t.states_no_target("loinc-vital-signs", "2345-7"));
    }

    #[test]
    fn a_code_listed_twice_is_an_error() {
        for text in [
            "A\tsys\ta\nA\t-\n",
            "A\t-\nA\tsys\ta\n",
            "A\tsys\ta\nA\tsys\tb\n",
            "*\tsys\ta\n*\t-\n",
            "*\t-\n*\tsys\ta\n",
        ] {
            let e = ConceptMap::parse("m", text).unwrap_err();
            assert_eq!(
                (e.line, e.reason.contains("listed twice")),
                (2, true),
                "{text:?}"
            );
        }
    }

    #[test]
    fn translates_v2_tables() {
        let t = builtin();
        assert_eq!(t.translate("v2-0001-gender", "F").unwrap().code, "female");
        assert_eq!(
            t.translate("v2-0004-encounter-class", "E").unwrap().code,
            "EMER"
        );
        assert_eq!(
            t.translate("v2-0004-encounter-class", "Q").unwrap().code,
            "UNK"
        );
        // IG table-hl70004-to-v3-actcode: R, B, C, N, U keep their v2-0004 code
        let r = t.translate("v2-0004-encounter-class", "R").unwrap();
        assert_eq!(
            (r.system.as_str(), r.code.as_str()),
            ("http://terminology.hl7.org/CodeSystem/v2-0004", "R")
        );
        assert!(t.translate("v2-0001-gender", "Q").is_none());
        assert_eq!(
            t.translate("v2-0396-system", "HL70078").unwrap().code,
            "http://terminology.hl7.org/CodeSystem/v2-0078"
        );
        assert_eq!(
            t.translate("v2-0396-system", "LN").unwrap().code,
            "http://loinc.org"
        );
    }
}
