//! Terminology: named ConceptMaps that mapping files translate codes through.
//!
//! The mapping issue adds the built-in HL7 v2 tables it needs; the terminology issue grows this
//! into loadable CodeSystems, ValueSets and ConceptMaps with `$translate`, `$lookup` and
//! `$validate-code` on the facade.

use std::collections::BTreeMap;

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
}

impl ConceptMap {
    pub fn translate(&self, code: &str) -> Option<&Target> {
        self.entries.get(code)
    }
}

/// All ConceptMaps known to the engine, by name.
#[derive(Clone, Debug, Default)]
pub struct Terminology {
    maps: BTreeMap<String, ConceptMap>,
}

impl Terminology {
    pub fn insert(&mut self, map: ConceptMap) {
        self.maps.insert(map.name.clone(), map);
    }

    pub fn map(&self, name: &str) -> Option<&ConceptMap> {
        self.maps.get(name)
    }
}
