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
mod patch;
pub mod path;
mod run;
pub mod segments;
pub mod source;
mod tree;
mod yaml;

pub use compile::{Fixture, LoadError, LoadErrors, MappingSet, RuleLoc, Write};
pub use run::{
    to_uri, DropReason, DroppedValue, Lineage, MappedBundle, MappedResource, MappingError,
    RunOptions, SourceField,
};
pub use source::{SplitMessage, V2Source};
pub use tree::ResourceView;

use std::borrow::Cow;
use tributary_hl7v2::{Delimiters, Message};
use tributary_terminology::Terminology;

/// A parsed HL7 v2 message, indexed once (one pass over the text) so that every field,
/// repetition, component and subcomponent is an O(1) lookup for the mapping runner.
pub struct Parsed<'a> {
    delimiters: &'a Delimiters,
    names: Vec<&'a str>,
    /// Per segment: index of its first field in `fields`, and its field count.
    segs: Vec<(u32, u32)>,
    /// Per field: (first repetition in `reps`, repetition count); empty fields have 0.
    fields: Vec<(u32, u32)>,
    /// Per repetition: (first component in `comps`, component count).
    reps: Vec<(u32, u32)>,
    /// Per component: (first subcomponent in `leaves`, subcomponent count).
    comps: Vec<(u32, u32)>,
    /// Every subcomponent's raw text, and whether it is used as is: MSH-1/MSH-2, and text
    /// without escape sequences.
    leaves: Vec<(&'a str, bool)>,
}

impl<'a> Parsed<'a> {
    pub fn new(msg: &'a Message) -> Self {
        let d = msg.delimiters();
        let mut p = Parsed {
            delimiters: d,
            names: Vec::with_capacity(msg.segment_count()),
            segs: Vec::with_capacity(msg.segment_count()),
            fields: Vec::with_capacity(msg.segment_count() * 16),
            reps: Vec::with_capacity(msg.segment_count() * 16),
            comps: Vec::with_capacity(msg.segment_count() * 24),
            leaves: Vec::with_capacity(msg.segment_count() * 32),
        };
        for seg in msg.segments() {
            let name = seg.name();
            p.names.push(name);
            let n = seg.field_count();
            p.segs.push((p.fields.len() as u32, n as u32));
            for f in 1..=n {
                let raw = seg.field(f).map_or("", |v| v.raw());
                if raw.is_empty() {
                    p.fields.push((p.reps.len() as u32, 0));
                    continue;
                }
                if name == "MSH" && f <= 2 {
                    p.fields.push((p.reps.len() as u32, 1));
                    p.reps.push((p.comps.len() as u32, 1));
                    p.comps.push((p.leaves.len() as u32, 1));
                    p.leaves.push((raw, true));
                    continue;
                }
                let rep_start = p.reps.len() as u32;
                let nrep = p.split_field(raw);
                p.fields.push((rep_start, nrep));
            }
        }
        p
    }

    /// Indexes one field's repetitions, components and subcomponents in one pass over its text;
    /// returns the repetition count.
    fn split_field(&mut self, raw: &'a str) -> u32 {
        let d = self.delimiters;
        if [d.repetition, d.component, d.subcomponent, d.escape]
            .iter()
            .all(char::is_ascii)
        {
            // Bytes are enough: no byte of a multi-byte character equals an ASCII delimiter.
            let bytes = raw
                .bytes()
                .enumerate()
                .map(|(i, b)| (i, Some(char::from(b))));
            self.split_field_with(raw, bytes)
        } else {
            let chars = raw.char_indices().map(|(i, c)| (i, Some(c)));
            self.split_field_with(raw, chars)
        }
    }

    fn split_field_with(
        &mut self,
        raw: &'a str,
        chars: impl Iterator<Item = (usize, Option<char>)>,
    ) -> u32 {
        let d = self.delimiters;
        let (mut nrep, mut ncomp, mut nsub) = (0u32, 0u32, 0u32);
        let mut comp_start = self.comps.len() as u32;
        let mut leaf_start = self.leaves.len() as u32;
        let mut from = 0;
        let mut escaped = false;
        for (i, c) in chars.chain(std::iter::once((raw.len(), None))) {
            // 0: end of a repetition, 1: of a component, 2: of a subcomponent
            let level = match c {
                None => 0,
                Some(c) if c == d.repetition => 0,
                Some(c) if c == d.component => 1,
                Some(c) if c == d.subcomponent => 2,
                Some(c) => {
                    escaped |= c == d.escape;
                    continue;
                }
            };
            self.leaves.push((&raw[from..i], !escaped));
            escaped = false;
            nsub += 1;
            from = i + c.map_or(0, char::len_utf8);
            if level == 2 {
                continue;
            }
            self.comps.push((leaf_start, nsub));
            ncomp += 1;
            leaf_start = self.leaves.len() as u32;
            nsub = 0;
            if level == 1 {
                continue;
            }
            self.reps.push((comp_start, ncomp));
            nrep += 1;
            comp_start = self.comps.len() as u32;
            ncomp = 0;
        }
        nrep
    }

    fn field(&self, seg: usize, field: usize) -> Option<(u32, u32)> {
        let (start, n) = *self.segs.get(seg)?;
        if field == 0 || field > n as usize {
            return None;
        }
        self.fields.get(start as usize + field - 1).copied()
    }

    fn rep(&self, seg: usize, field: usize, rep: usize) -> Option<(u32, u32)> {
        let (start, n) = self.field(seg, field)?;
        if rep == 0 || rep > n as usize {
            return None;
        }
        self.reps.get(start as usize + rep - 1).copied()
    }

    fn comp(&self, seg: usize, field: usize, rep: usize, comp: usize) -> Option<(u32, u32)> {
        let (start, n) = self.rep(seg, field, rep)?;
        if comp == 0 || comp > n as usize {
            return None;
        }
        self.comps.get(start as usize + comp - 1).copied()
    }
}

impl V2Source for Parsed<'_> {
    fn segment_count(&self) -> usize {
        self.names.len()
    }
    fn segment_name(&self, seg: usize) -> &str {
        self.names[seg]
    }
    fn field_count(&self, seg: usize) -> usize {
        self.segs.get(seg).map_or(0, |s| s.1 as usize)
    }
    fn rep_count(&self, seg: usize, field: usize) -> usize {
        self.field(seg, field).map_or(0, |f| f.1 as usize)
    }
    fn comp_count(&self, seg: usize, field: usize, rep: usize) -> usize {
        self.rep(seg, field, rep).map_or(0, |r| r.1 as usize)
    }
    fn sub_count(&self, seg: usize, field: usize, rep: usize, comp: usize) -> usize {
        self.comp(seg, field, rep, comp).map_or(0, |c| c.1 as usize)
    }
    fn leaf(
        &self,
        seg: usize,
        field: usize,
        rep: usize,
        comp: usize,
        sub: usize,
    ) -> Option<Cow<'_, str>> {
        let (start, n) = self.comp(seg, field, rep, comp)?;
        if sub == 0 || sub > n as usize {
            return None;
        }
        let (raw, as_is) = *self.leaves.get(start as usize + sub - 1)?;
        if as_is {
            Some(Cow::Borrowed(raw))
        } else {
            Some(tributary_hl7v2::unescape(raw, self.delimiters))
        }
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
