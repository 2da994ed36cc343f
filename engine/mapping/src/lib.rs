//! The Tributary mapping language: declarative YAML mapping files, edited by interface analysts,
//! that turn HL7 v2 messages into FHIR R4 transaction Bundles.
//!
//! Lifecycle: [`MappingSet::load`] parses every file (with `file:line:col` positions), checks
//! source paths against HL7 v2 segment definitions and targets against FHIR R4 element names,
//! and compiles a plan. [`MappingSet::run`] walks one parsed message through the plan — pure, no
//! I/O — and returns a [`MappedBundle`] with lineage and the list of source fields nothing read.
//!
//! ```text
//! message map (messages/ADT_A01.yaml)  ─ lists resource maps per segment / segment group
//!   └─ resource map (segments/PID-Patient.yaml)  ─ `resource: Patient`, id parts, rules
//!        └─ datatype map (datatypes/XPN.yaml)  ─ `datatype: XPN`, `to: HumanName`, rules
//! ```

mod compile;
pub mod cond;
pub mod datetime;
pub mod fhir;
pub mod fixtures;
pub mod path;
mod run;
pub mod segments;
pub mod source;
mod yaml;

pub use compile::{Fixture, LoadError, LoadErrors, MappingSet, RuleLoc};
pub use run::{to_uri, Lineage, MappedBundle, MappingError, RunOptions};
pub use source::{SplitMessage, V2Source};

use std::borrow::Cow;
use tributary_hl7v2::{Message, Segment};
use tributary_terminology::Terminology;

/// A parsed HL7 v2 message, indexed for the mapping runner.
pub struct Parsed<'a> {
    segments: Vec<Segment<'a>>,
}

impl<'a> Parsed<'a> {
    pub fn new(msg: &'a Message) -> Self {
        Self {
            segments: msg.segments().collect(),
        }
    }
}

impl V2Source for Parsed<'_> {
    fn segment_count(&self) -> usize {
        self.segments.len()
    }
    fn segment_name(&self, seg: usize) -> &str {
        self.segments[seg].name()
    }
    fn field_count(&self, seg: usize) -> usize {
        self.segments[seg].field_count()
    }
    fn rep_count(&self, seg: usize, field: usize) -> usize {
        self.segments[seg]
            .field(field)
            .map_or(0, |f| if f.is_empty() { 0 } else { f.parts().count() })
    }
    fn comp_count(&self, seg: usize, field: usize, rep: usize) -> usize {
        self.segments[seg]
            .field(field)
            .and_then(|f| f.part(rep))
            .map_or(0, |r| r.parts().count())
    }
    fn sub_count(&self, seg: usize, field: usize, rep: usize, comp: usize) -> usize {
        self.segments[seg]
            .field(field)
            .and_then(|f| f.part(rep))
            .and_then(|r| r.part(comp))
            .map_or(0, |c| c.parts().count())
    }
    fn leaf(
        &self,
        seg: usize,
        field: usize,
        rep: usize,
        comp: usize,
        sub: usize,
    ) -> Option<Cow<'_, str>> {
        let v = self.segments[seg]
            .field(field)?
            .part(rep)?
            .part(comp)?
            .part(sub)?;
        Some(v.value())
    }
}

/// Maps one parsed message with the default options (tenant `default`, lineage on).
pub fn run(
    set: &MappingSet,
    parsed: &Parsed<'_>,
    term: &Terminology,
) -> Result<MappedBundle, MappingError> {
    set.run(parsed, term, &RunOptions::default())
}

/// Why a message (as bytes) could not be mapped: it did not parse, or mapping failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MapBytesError {
    #[error("HL7 v2 parse error: {0}")]
    Parse(#[from] tributary_hl7v2::ParseError),
    #[error(transparent)]
    Mapping(#[from] MappingError),
}

impl MappingSet {
    /// Parses `bytes` as an HL7 v2 message and maps it.
    pub fn map_bytes(
        &self,
        bytes: &[u8],
        term: &Terminology,
        opts: &RunOptions<'_>,
    ) -> Result<MappedBundle, MapBytesError> {
        let msg = Message::parse(bytes)?;
        let parsed = Parsed::new(&msg);
        Ok(self.run(&parsed, term, opts)?)
    }
}
