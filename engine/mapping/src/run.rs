//! Running a compiled mapping set over one message: pick the message map, plan resource instances
//! (with deterministic ids, so references resolve in any order), run the rules, assemble a FHIR R4
//! `transaction` Bundle of conditional upserts (`PUT Type/id`), and report lineage, every
//! non-empty source field no rule mapped, and every value left out because it contradicts the rest
//! (a Period `end` before its `start`). Pure: no I/O, no clock, no randomness.

use crate::compile::{
    Entry, IdPart, MapKind, MappingSet, OnError, Prim, Rule, RuleKind, RuleLoc, Step, TransOut,
    Transform, Write,
};
use crate::cond::{Cond, Operand};
use crate::datetime;
use crate::path::{Rep, SourcePath};
use crate::source::V2Source;
use crate::tree::{write_str, Node, Obj, ResourceView, View};
use rustc_hash::FxHashMap;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use tributary_terminology::Terminology;

/// Per-run settings.
#[derive(Clone, Debug)]
pub struct RunOptions<'a> {
    /// Tenant the message belongs to: part of every deterministic id.
    pub tenant: &'a str,
    /// Record which source path and rule produced each element (`tributary map --explain`).
    pub lineage: bool,
    /// The feed (sending partner) the message came from: its `feeds:` variables apply.
    pub feed: Option<&'a str>,
}

impl Default for RunOptions<'_> {
    fn default() -> Self {
        Self {
            tenant: "default",
            lineage: true,
            feed: None,
        }
    }
}

/// Which source path and which rule produced one element of the output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lineage {
    /// `Patient/abc.name[0].family`
    pub element: String,
    /// `PID-5[1].1`; empty for constants.
    pub source: String,
    /// `mappings/hl7v2/datatypes/XPN.yaml:4`
    pub rule: String,
}

/// A source field (or one of its components) named as analysts write it: `PID-11.7`,
/// `OBX[2]-8`. Kept as positions so that a long report costs nothing until it is shown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceField {
    pub segment: Arc<str>,
    /// Which of the segments with this name (1-based), when the message has several.
    pub occurrence: Option<usize>,
    pub field: usize,
    /// `None` when no repetition of the field has components.
    pub component: Option<usize>,
}

impl fmt::Display for SourceField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.segment)?;
        if let Some(o) = self.occurrence {
            write!(f, "[{o}]")?;
        }
        write!(f, "-{}", self.field)?;
        if let Some(c) = self.component {
            write!(f, ".{c}")?;
        }
        Ok(())
    }
}

/// Why a mapped value was left out of the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// A Period's `end` before its `start` (FHIR R4 invariant per-1): the `end` is left out,
    /// the `start` kept.
    EndBeforeStart,
    /// A segment whose resource id equals one already in the message (two OBX with the same
    /// code, sub-id and set id in one order): its resource is not built — a second PUT would
    /// replace the first — and its fields stay in the unconsumed report.
    DuplicateId,
    /// A value that cannot become its FHIR type (PID-7 = 19630231) under `on_error: warn`: the
    /// element is left out (the warning says why, without the value).
    InvalidValue,
    /// A resource the message creates twice (the same doctor as ordering provider and as
    /// attending) whose second creation holds, in an element the first already wrote, something
    /// the first does not (another family name, an identifier type): the first creation's
    /// element stands and the second's is left out.
    Conflict,
    /// A code the rule's ConceptMap (`translate:`) does not list, and no `default:`: the element
    /// is left empty. The rule's location names the map; adding the code to it (or `-` for "no
    /// target on purpose") maps it.
    UnknownCode,
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DropReason::EndBeforeStart => "end before start",
            DropReason::DuplicateId => "duplicate id",
            DropReason::InvalidValue => "invalid value",
            DropReason::Conflict => "differs from the same resource created earlier in the message",
            DropReason::UnknownCode => "code not in the rule's ConceptMap",
        })
    }
}

/// A source value a rule mapped but the output leaves out, because keeping it would make the
/// resource invalid FHIR R4 (a Period ending before it starts). Names paths, never the value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DroppedValue {
    /// The source path, e.g. `PV1-45`, `PID-5[2].10.2`, or the segment (`OBX[3]`) of a
    /// duplicate id; empty when a constant was left out.
    pub source: String,
    pub resource_type: &'static str,
    pub resource_id: String,
    /// The element within the resource, e.g. `period.end`, `name[1].period.end`.
    pub element: String,
    /// The rule that filled it: `mappings/hl7v2/segments/PV1-Encounter.yaml:75` (for a
    /// duplicate id, the resource map's file).
    pub rule: String,
    pub reason: DropReason,
}

impl fmt::Display for DroppedValue {
    /// `PV1-45 (Encounter.period.end: end before start)`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = if self.source.is_empty() {
            "(constant)"
        } else {
            &self.source
        };
        write!(
            f,
            "{source} ({}.{}: {})",
            self.resource_type, self.element, self.reason
        )
    }
}

/// The result of mapping one message.
#[derive(Clone, Debug)]
pub struct MappedBundle {
    /// The Bundle's entries, in order.
    entries: Vec<BundleEntry>,
    /// Resources the message names without writing them (`write: none`), as (type, id).
    named_only: Vec<(&'static str, String)>,
    /// `ADT^A01`
    pub message_type: String,
    /// The message map file that mapped it.
    pub message_map: String,
    /// Content hash of the mapping set.
    pub version: String,
    pub lineage: Vec<Lineage>,
    /// Non-empty source fields/components no rule mapped (wrote, or chose what was written),
    /// e.g. `PID-11.7`, `OBX[2]-8`.
    pub unconsumed: Vec<SourceField>,
    /// Source values a rule read but the output leaves out (a Period `end` before its `start`):
    /// reported like `unconsumed`, so nothing is dropped silently.
    pub dropped: Vec<DroppedValue>,
    /// Things a human should know that did not fail the message (no values: PHI-free).
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug)]
struct BundleEntry {
    rtype: &'static str,
    id: String,
    /// `Type/id`, the conditional upsert's url.
    url: String,
    resource: Obj,
    write: Write,
}

impl BundleEntry {
    /// The entry's `resource`; a delete has none.
    fn body(&self) -> Option<Value> {
        let resource = self.resource.clone().into_value();
        match self.write {
            Write::Replace => Some(resource),
            Write::Merge | Write::Amend => Some(crate::patch::merge_patch(self.rtype, &resource)),
            Write::Delete | Write::None => None,
        }
    }
}

impl MappedBundle {
    /// The FHIR R4 Bundle of type `transaction`: a conditional `PUT` per resource; for a
    /// `write: merge` or `amend` entry, a `PATCH` with the FHIRPath Patch that merges it; for a
    /// `write: delete` entry, a `DELETE` without a resource (`write: none` makes no entry).
    pub fn bundle(&self) -> Value {
        let entries = self
            .entries
            .iter()
            .map(|e| {
                let mut o = Map::new();
                let mut req = Map::new();
                req.insert("method".into(), e.write.method().into());
                req.insert("url".into(), e.url.as_str().into());
                o.insert("request".into(), Value::Object(req));
                if let Some(body) = e.body() {
                    o.insert("resource".into(), body);
                }
                Value::Object(o)
            })
            .collect();
        let mut bundle = Map::new();
        bundle.insert("entry".into(), Value::Array(entries));
        bundle.insert("resourceType".into(), "Bundle".into());
        bundle.insert("type".into(), "transaction".into());
        Value::Object(bundle)
    }

    /// The Bundle as compact JSON: the bytes `serde_json::to_vec(&self.bundle())` gives,
    /// written without building a `Value` (but for the rare merge entry). Keys are sorted, as
    /// serde_json writes them, so `request` comes before `resource`.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1024 * self.entries.len().max(1));
        out.extend_from_slice(b"{\"entry\":[");
        for (i, e) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"request\":{\"method\":\"");
            out.extend_from_slice(e.write.method().as_bytes());
            out.extend_from_slice(b"\",\"url\":");
            write_str(&mut out, &e.url);
            out.push(b'}');
            match e.write {
                Write::Replace => {
                    out.extend_from_slice(b",\"resource\":");
                    e.resource.write_json(&mut out);
                }
                Write::Merge | Write::Amend => {
                    out.extend_from_slice(b",\"resource\":");
                    serde_json::to_writer(&mut out, &e.body()).expect("a Value always serializes");
                }
                Write::Delete | Write::None => {}
            }
            out.push(b'}');
        }
        out.extend_from_slice(b"],\"resourceType\":\"Bundle\",\"type\":\"transaction\"}");
        out
    }

    /// (resource type, id) of every entry.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|e| (e.rtype, e.id.as_str()))
    }

    /// The id of the (first) Patient the message is about: written, deleted or only named
    /// (`write: none`, the patient of a BAR^P02). It keys the message's events, so they keep
    /// their order per patient and reach that patient's subscribers.
    pub fn patient_id(&self) -> Option<&str> {
        self.entries()
            .chain(self.named_only.iter().map(|(t, id)| (*t, id.as_str())))
            .find(|(t, _)| *t == "Patient")
            .map(|(_, id)| id)
    }

    /// What the entries lack of what FHIR R4 requires of their type at the top level (min 1
    /// elements, required choices such as `Immunization.occurrence[x]`), as `Type/id: element`.
    /// A source field the rule would have read was empty or failed to convert: the output
    /// would not be valid R4, so the pipeline does not commit it.
    pub fn missing_required(&self) -> Vec<String> {
        let mut out = Vec::new();
        // a delete writes no resource; an amendment goes into one that has the required elements
        for e in self
            .entries
            .iter()
            .filter(|e| !matches!(e.write, Write::Delete | Write::Amend))
        {
            for r in tributary_core::fhir_r4::required(e.rtype) {
                if !r.met_by(|name| e.resource.get(name).is_some()) {
                    out.push(format!("{}/{}: {}", e.rtype, e.id, r.name()));
                }
            }
        }
        out
    }

    /// (resource type, id, resource) for every entry.
    pub fn resources(&self) -> impl Iterator<Item = (&str, &str, Value)> + '_ {
        self.entries
            .iter()
            .map(|e| (e.rtype, e.id.as_str(), e.resource.clone().into_value()))
    }

    /// Every entry's resource, moved out in the runner's own tree (no `Value` is built); the
    /// bundle keeps its reports (unconsumed, dropped, lineage) but no longer has entries.
    pub fn take_resources(&mut self) -> Vec<MappedResource> {
        std::mem::take(&mut self.entries)
            .into_iter()
            .map(|e| MappedResource {
                resource_type: e.rtype,
                id: e.id,
                write: e.write,
                tree: e.resource,
            })
            .collect()
    }
}

/// One resource of a mapped message, carrying its `resourceType` and `id`.
#[derive(Clone, Debug)]
pub struct MappedResource {
    pub resource_type: &'static str,
    pub id: String,
    /// What it does to the stored resource of its id: replace it (the default), merge into it
    /// (`amend`: only into a stored one) or delete it (then the tree only named it).
    pub write: Write,
    tree: Obj,
}

impl MappedResource {
    /// Compact JSON, keys sorted: the bytes `serde_json` writes for [`MappedResource::into_value`].
    pub fn write_json(&self, out: &mut Vec<u8>) {
        self.tree.write_json(out);
    }

    /// The JSON with `resourceType`, `id` and `meta` leading and `meta.versionId`/`lastUpdated`
    /// set, as the store keeps a resource version.
    pub fn write_stamped(&self, out: &mut Vec<u8>, version: &str, last_updated: &str) {
        self.tree.write_stamped(out, version, last_updated);
    }

    pub fn view(&self) -> ResourceView<'_> {
        ResourceView(View::Obj(&self.tree))
    }

    pub fn into_value(self) -> Value {
        self.tree.into_value()
    }
}

/// Why a message could not be mapped. Names files, rules and source paths — never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    #[error("message has no MSH segment")]
    NoHeader,
    #[error(
        "no message map for {message_type} in mapping set {version} (maps exist for: {known})"
    )]
    NoMapping {
        message_type: String,
        version: String,
        known: String,
    },
    #[error("{rule}: rule for `{set}` failed at {path}: {reason}")]
    Rule {
        /// `file:line`
        rule: String,
        set: String,
        /// The concrete source path, e.g. `PID-7` or `OBX[2]-5`.
        path: String,
        reason: String,
    },
}

/// A rule failure, boxed: results move through every rule, and the error is rare and large.
type Fallible<T> = Result<T, Box<MappingError>>;

/// Resolved source locations: usually one or a few, so kept inline.
type Ctxs = smallvec::SmallVec<[Ctx; 2]>;

#[derive(Clone, Copy, Debug)]
struct Ctx {
    seg: usize,
    field: usize,
    rep: usize,
    comp: usize,
    sub: usize,
    scope: usize,
}

struct Scope<'s> {
    parent: Option<usize>,
    start: usize,
    end: usize,
    names: FxHashMap<&'s str, Vec<usize>>,
    /// Every segment of each name in `start..end`, in order, built on the first lookup: a
    /// message of many segments would otherwise be scanned again for every lookup.
    first: std::cell::OnceCell<FxHashMap<String, Vec<usize>>>,
    /// The ranges of the segment groups planned inside this scope: their segments are theirs,
    /// so a lookup climbing into this scope from one group never reads a sibling group's.
    groups: Vec<(usize, usize)>,
    /// The segment names that start this scope's group (`group: [ORC, OBR]`); none at top level.
    starts: &'s [String],
    /// The groups inside this scope that name the segments they hold after their start
    /// (`with: [NTE, PRT]`): range and names. Those segments are their group's own (the NTEs
    /// after an OBX are that result's comments, not its order's).
    attached: Vec<(usize, usize, &'s [String])>,
}

/// One step from a resource root to an object in it: element name, and the array index when
/// the element repeats.
type LocStep = (&'static str, Option<usize>);

/// A Period `end` a rule wrote, checked against the Period's `start` once the resource is built.
struct PeriodEnd {
    /// Where the Period lies in the resource.
    period: Vec<LocStep>,
    src: Option<Ctx>,
    rule: RuleLoc,
}

struct Instance {
    map: usize,
    ctx: Ctx,
    rtype: &'static str,
    id: String,
    write: Write,
}

/// Two source locations holding the same value, as (segment, field, component bits).
#[derive(Clone, Copy)]
struct SameValue {
    a: (usize, usize, u64),
    b: (usize, usize, u64),
}

struct Runner<'s, S: V2Source + ?Sized> {
    set: &'s MappingSet,
    src: &'s S,
    term: &'s Terminology,
    tenant: &'s str,
    vars: &'s BTreeMap<String, String>,
    /// Per field, the components read (bit masks); segment `s`'s fields start at `fields_at[s]`.
    consumed: Vec<u64>,
    /// Rules that wrote from one `from:` alternative while later ones remain: (where the rule
    /// ran, the rule, the alternative it took), looked at once every rule has run
    /// ([`Runner::share_same_values`]).
    alternatives: Vec<(Ctx, &'s Rule, usize)>,
    fields_at: Vec<usize>,
    scopes: Vec<Scope<'s>>,
    instances: Vec<Instance>,
    out: Vec<Option<BundleEntry>>,
    /// Keys are mapping-set names and ids that are SHA-256 digests: a fast hash is safe here.
    out_index: FxHashMap<(&'static str, String), usize>,
    lineage: Option<Vec<Lineage>>,
    warnings: Vec<String>,
    /// MSH-3.1, MSH-4.1, MSH-10 and MSH-7: the message, in ids that have no identifying value.
    msg_key: [String; 4],
    /// Where the object being built lies in its resource (tracked only inside objects that
    /// hold a Period `end`).
    loc: Vec<LocStep>,
    /// Period `end`s written in the resources being built (innermost resource last).
    period_ends: Vec<PeriodEnd>,
    dropped: Vec<DroppedValue>,
    /// Source values the conditions being evaluated compared (`OBX-2 == NM`): marked as mapped
    /// only when the rule they guard writes a value.
    cond_reads: Vec<Ctx>,
    /// How many `map:`/`create:` the rule being run is nested in (see `MAX_DEPTH`).
    depth: usize,
    /// The resources being built (innermost last) and, per nested object of the innermost,
    /// the `set:` that builds it: where a left-out value would have gone.
    building: Vec<(&'static str, String)>,
    sets: Vec<&'s str>,
}

/// Deeper `map:`/`create:` nesting fails the message instead of overflowing the stack. Loading
/// rejects cyclic maps, so only a pathological set gets near it (the library nests a few deep).
const MAX_DEPTH: usize = 32;

fn has_text(s: &str) -> bool {
    !s.is_empty() && s != "\"\""
}

impl MappingSet {
    /// Maps one message. `src` is usually a [`crate::Parsed`] over the `tributary-hl7v2` parser.
    pub fn run<S: V2Source + ?Sized>(
        &self,
        src: &S,
        term: &Terminology,
        opts: &RunOptions<'_>,
    ) -> Result<MappedBundle, MappingError> {
        if src.segment_count() == 0 || src.segment_name(0) != "MSH" {
            return Err(MappingError::NoHeader);
        }
        let leaf = |f, c| src.leaf(0, f, 1, c, 1).unwrap_or(Cow::Borrowed(""));
        let message_type = format!("{}^{}", leaf(9, 1), leaf(9, 2));
        let structure = leaf(9, 3).replace('_', "^");
        let mm = self
            .messages
            .iter()
            .find(|m| m.matches.contains(&message_type))
            .or_else(|| {
                self.messages
                    .iter()
                    .find(|m| !structure.is_empty() && m.matches.contains(&structure))
            })
            .ok_or_else(|| MappingError::NoMapping {
                message_type: message_type.clone(),
                version: self.version.clone(),
                known: self
                    .messages
                    .iter()
                    .flat_map(|m| m.matches.iter().cloned())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let event_vars = mm.vars_by_event.get(&message_type).unwrap_or(&mm.vars);
        // A feed's values replace the map's own, not those `event_vars:` gives one event (a
        // cancellation's status stays the cancellation's).
        let feed_vars = opts
            .feed
            .and_then(|f| self.feed_vars.get(f))
            .filter(|fv| fv.keys().any(|k| mm.vars.contains_key(k)))
            .map(|fv| {
                let mut merged = event_vars.clone();
                let own = mm.event_vars.get(&message_type);
                for (k, v) in fv {
                    if mm.vars.contains_key(k) && !own.is_some_and(|o| o.contains_key(k)) {
                        merged.insert(k.clone(), v.clone());
                    }
                }
                merged
            });
        let mut fields_at = Vec::with_capacity(src.segment_count() + 1);
        fields_at.push(0);
        for seg in 0..src.segment_count() {
            fields_at.push(fields_at[seg] + src.field_count(seg) + 1);
        }
        let mut r = Runner {
            set: self,
            src,
            term,
            tenant: opts.tenant,
            vars: feed_vars.as_ref().unwrap_or(event_vars),
            consumed: vec![0; fields_at.last().copied().unwrap_or(0)],
            alternatives: Vec::new(),
            fields_at,
            scopes: vec![Scope {
                parent: None,
                start: 0,
                end: src.segment_count(),
                names: FxHashMap::default(),
                first: Default::default(),
                groups: Vec::new(),
                starts: &[],
                attached: Vec::new(),
            }],
            instances: Vec::new(),
            out: Vec::new(),
            out_index: FxHashMap::default(),
            lineage: opts.lineage.then(Vec::new),
            warnings: Vec::new(),
            msg_key: [
                leaf(3, 1).into_owned(),
                leaf(4, 1).into_owned(),
                src.leaf(0, 10, 1, 1, 1).unwrap_or_default().into_owned(),
                leaf(7, 1).into_owned(),
            ],
            loc: Vec::new(),
            period_ends: Vec::new(),
            dropped: Vec::new(),
            cond_reads: Vec::new(),
            depth: 0,
            building: Vec::new(),
            sets: Vec::new(),
        };
        // MSH-9 picked the map; MSH-1/2 are the delimiters themselves.
        r.mark(0, 9, 1);
        r.mark(0, 9, 2);
        r.mark(0, 9, 3);
        r.plan(&mm.entries, 0);
        for i in 0..r.instances.len() {
            r.build_instance(i).map_err(|e| *e)?;
        }
        r.share_same_values();
        let unconsumed = r.unconsumed(&mm.ignore);
        let named_only = r
            .instances
            .iter()
            .filter(|i| i.write == Write::None)
            .map(|i| (i.rtype, i.id.clone()))
            .collect();
        Ok(MappedBundle {
            entries: r.out.into_iter().flatten().collect(),
            named_only,
            message_type,
            message_map: mm.file.to_string(),
            version: self.version.clone(),
            lineage: r.lineage.unwrap_or_default(),
            unconsumed,
            dropped: r.dropped,
            warnings: r.warnings,
        })
    }
}

impl<'s, S: V2Source + ?Sized> Runner<'s, S> {
    fn mark(&mut self, seg: usize, field: usize, comp: usize) {
        if let Some(i) = self.field_slot(seg, field) {
            self.consumed[i] |= comp_bit(comp);
        }
    }

    fn field_slot(&self, seg: usize, field: usize) -> Option<usize> {
        let start = *self.fields_at.get(seg)?;
        let end = *self.fields_at.get(seg + 1)?;
        (start + field < end).then_some(start + field)
    }

    fn consumed_mask(&self, seg: usize, field: usize) -> u64 {
        self.field_slot(seg, field).map_or(0, |i| self.consumed[i])
    }

    // ---- planning -------------------------------------------------------------------------

    fn plan(&mut self, entries: &'s [Entry], scope: usize) {
        // Every group's range first: a lookup made while planning (an id part, a `when:`) must
        // not read inside a sibling group that is planned after it (a patient's OBX taking
        // the filler number of an order further down).
        let ranges: Vec<Vec<(usize, usize)>> = entries
            .iter()
            .map(|e| match e {
                Entry::Group {
                    start, with, until, ..
                } => self.group_ranges(scope, start, with, until.as_deref()),
                Entry::Resource { .. } => Vec::new(),
            })
            .collect();
        for (e, r) in entries.iter().zip(&ranges) {
            self.scopes[scope].groups.extend(r.iter().copied());
            if let Entry::Group { with, .. } = e {
                if !with.is_empty() {
                    let held = r.iter().map(|&(gs, ge)| (gs, ge, with.as_slice()));
                    self.scopes[scope].attached.extend(held);
                }
            }
        }
        for (e, ranges) in entries.iter().zip(ranges) {
            match e {
                Entry::Resource {
                    name,
                    segment,
                    map,
                    when,
                    until,
                    write,
                } => {
                    let (start, end) = (self.scopes[scope].start, self.scopes[scope].end);
                    let end = self.until_end(start, end, until.as_deref());
                    let segs: Vec<usize> = match segment {
                        Some(s) => (start..end)
                            .filter(|&i| self.src.segment_name(i) == s)
                            .collect(),
                        None => vec![start],
                    };
                    for seg in segs {
                        let ctx = Ctx {
                            seg,
                            field: 0,
                            rep: 0,
                            comp: 0,
                            sub: 0,
                            scope,
                        };
                        if let Some(c) = when {
                            let reads_at = self.cond_reads.len();
                            let pass = self.eval(c, ctx);
                            for c in self.cond_reads.split_off(reads_at) {
                                if pass {
                                    self.mark(c.seg, c.field, c.comp.max(1));
                                }
                            }
                            if !pass {
                                continue;
                            }
                        }
                        let (rtype, id) = self.instance_id(*map, ctx, "0");
                        let idx = self.instances.len();
                        self.instances.push(Instance {
                            map: *map,
                            ctx,
                            rtype,
                            id,
                            write: *write,
                        });
                        if let Some(n) = name {
                            // visible in this scope and, for `ref:` to all of them, its ancestors
                            let mut s = Some(scope);
                            while let Some(i) = s {
                                self.scopes[i].names.entry(n).or_default().push(idx);
                                s = self.scopes[i].parent;
                            }
                        }
                    }
                }
                Entry::Group { entries, start, .. } => {
                    for (gs, ge) in ranges {
                        let id = self.scopes.len();
                        self.scopes.push(Scope {
                            parent: Some(scope),
                            start: gs,
                            end: ge,
                            names: FxHashMap::default(),
                            first: Default::default(),
                            groups: Vec::new(),
                            starts: start,
                            attached: Vec::new(),
                        });
                        self.plan(entries, id);
                    }
                }
            }
        }
    }

    /// The segment ranges of a group entry in `scope`: each starts at a `start` segment (a
    /// later name of the list only continues the group), ends at the next start, at the first
    /// segment neither `start` nor `with` holds (when `with` is given), or at `until`.
    fn group_ranges(
        &self,
        scope: usize,
        start: &[String],
        with: &[String],
        until: Option<&str>,
    ) -> Vec<(usize, usize)> {
        let (s0, s1) = (self.scopes[scope].start, self.scopes[scope].end);
        let s1 = self.until_end(s0, s1, until);
        let mut groups: Vec<(usize, usize)> = Vec::new();
        let mut seen_rank: Option<usize> = None;
        for i in s0..s1 {
            let name = self.src.segment_name(i);
            if let Some(rank) = start.iter().position(|s| s == name) {
                let new = match seen_rank {
                    None => true,
                    Some(r) => rank <= r,
                };
                if new {
                    if let Some(last) = groups.last_mut() {
                        last.1 = i;
                    }
                    groups.push((i, s1));
                }
                seen_rank = Some(rank);
            }
        }
        if !with.is_empty() {
            for g in &mut groups {
                let held = |i: &usize| {
                    let n = self.src.segment_name(*i);
                    start.iter().chain(with).any(|s| s == n)
                };
                g.1 = (g.0 + 1..g.1).find(|i| !held(i)).unwrap_or(g.1);
            }
        }
        groups
    }

    /// The end of a scope range cut at the first `until` segment.
    fn until_end(&self, start: usize, end: usize, until: Option<&str>) -> usize {
        match until {
            None => end,
            Some(u) => (start..end)
                .find(|&i| self.src.segment_name(i) == u)
                .unwrap_or(end),
        }
    }

    fn instance_id(&mut self, map: usize, ctx: Ctx, salt: &str) -> (&'static str, String) {
        let set = self.set;
        let m = &set.maps[map];
        let MapKind::Resource { resource, id, .. } = &m.kind else {
            return ("Basic", String::new());
        };
        let mut parts: smallvec::SmallVec<[Cow<'s, str>; 4]> = smallvec::SmallVec::new();
        let mut any = false;
        let mut key_empty = false;
        for (k, p) in id.iter().enumerate() {
            match p {
                IdPart::Const(c) => parts.push(Cow::Borrowed(c.as_str())),
                IdPart::FirstOf(paths) => {
                    let mut v = Cow::Borrowed("");
                    for sp in paths {
                        v = self.id_text(ctx, sp);
                        if !v.is_empty() {
                            break;
                        }
                    }
                    any |= !v.is_empty();
                    key_empty |= k == 0 && v.is_empty();
                    parts.push(v);
                }
            }
        }
        let seg_s;
        let salt_s;
        let patient;
        let mut all: smallvec::SmallVec<[&str; 16]> = smallvec::smallvec![self.tenant, *resource];
        if any && !key_empty {
            all.extend(parts.iter().map(|p| p.as_ref()));
        } else {
            // No identifying value: stable per message (replays give the same id), unique per
            // place. The patient (PID-3's id parts, when a PID is in scope) and the message time
            // are in it too: a sender that reuses control ids must not make one patient's
            // message overwrite another's resources.
            seg_s = ctx.seg.to_string();
            salt_s = format!("{}.{}.{}", ctx.field, ctx.rep, salt);
            patient = self.patient_key(ctx.scope);
            all.extend([
                "msg",
                self.msg_key[0].as_str(),
                self.msg_key[1].as_str(),
                self.msg_key[2].as_str(),
                self.msg_key[3].as_str(),
            ]);
            all.extend(patient.iter().map(|p| p.as_ref()));
            all.extend([m.name.as_str(), seg_s.as_str(), salt_s.as_str()]);
        }
        (resource, tributary_core::deterministic_id(&all))
    }

    /// The id parts of the patient in scope (PID-3[1].1, .4.1, .4.2; empty without a PID), read
    /// without counting them as mapped.
    fn patient_key(&self, scope: usize) -> [Cow<'s, str>; 3] {
        let src: &'s S = self.src;
        let Some(seg) = self.find_segment("PID", scope) else {
            return Default::default();
        };
        let part = |comp, sub| match src.leaf(seg, 3, 1, comp, sub) {
            Some(v) if has_text(&v) => match v {
                Cow::Borrowed(b) => Cow::Borrowed(b.trim()),
                Cow::Owned(o) => Cow::Owned(o.trim().to_string()),
            },
            _ => Cow::Borrowed(""),
        };
        [part(1, 1), part(4, 1), part(4, 2)]
    }

    /// The trimmed text of the first value at `sp` ("" when there is none): one id part.
    fn id_text(&mut self, ctx: Ctx, sp: &SourcePath) -> Cow<'s, str> {
        match self
            .resolve(ctx, sp, false)
            .first()
            .and_then(|c| self.peek_text(*c))
        {
            Some(Cow::Borrowed(b)) => Cow::Borrowed(b.trim()),
            Some(Cow::Owned(o)) => Cow::Owned(o.trim().to_string()),
            None => Cow::Borrowed(""),
        }
    }

    // ---- source access ---------------------------------------------------------------------

    /// The segment a single-valued path reads: the first of that name in the scope, else,
    /// climbing, the first in an enclosing scope that lies outside all of that scope's groups
    /// (the TQ1 of one order is not the timing of the next order, which has none).
    fn find_segment(&self, name: &str, scope: usize) -> Option<usize> {
        let mut s = Some(scope);
        while let Some(i) = s {
            let sc = &self.scopes[i];
            let first = sc.first.get_or_init(|| {
                let mut m: FxHashMap<String, Vec<usize>> = FxHashMap::default();
                for k in sc.start..sc.end {
                    m.entry(self.src.segment_name(k).to_string())
                        .or_default()
                        .push(k);
                }
                m
            });
            let found = first.get(name).and_then(|at| {
                at.iter().copied().find(|&k| {
                    i == scope || !sc.groups.iter().any(|&(gs, ge)| (gs..ge).contains(&k))
                })
            });
            if found.is_some() {
                return found;
            }
            s = sc.parent;
        }
        None
    }

    /// The `name` segment of the nearest enclosing group (not `scope` itself) that `name` starts.
    fn enclosing_start(&self, name: &str, scope: usize) -> Option<usize> {
        let mut s = self.scopes[scope].parent;
        while let Some(i) = s {
            let sc = &self.scopes[i];
            if sc.starts.iter().any(|n| n == name) {
                return self.find_segment(name, i);
            }
            s = sc.parent;
        }
        None
    }

    fn rep_has_data(&self, seg: usize, field: usize, rep: usize) -> bool {
        (1..=self.src.comp_count(seg, field, rep)).any(|c| self.comp_has_data(seg, field, rep, c))
    }

    /// Whether a component holds text in any subcomponent (`""`, HL7's explicit null, is none).
    fn comp_has_data(&self, seg: usize, field: usize, rep: usize, comp: usize) -> bool {
        let src = self.src;
        (1..=src.sub_count(seg, field, rep, comp)).any(|s| {
            src.leaf(seg, field, rep, comp, s)
                .is_some_and(|v| has_text(&v))
        })
    }

    fn ctx_has_data(&self, c: Ctx) -> bool {
        if c.rep == 0 {
            return true;
        }
        if c.comp == 0 {
            return self.rep_has_data(c.seg, c.field, c.rep);
        }
        if c.sub == 0 {
            return self.comp_has_data(c.seg, c.field, c.rep, c.comp);
        }
        self.src
            .leaf(c.seg, c.field, c.rep, c.comp, c.sub)
            .is_some_and(|v| has_text(&v))
    }

    /// Source locations a path selects from `ctx`, only those holding data.
    fn resolve(&self, ctx: Ctx, p: &SourcePath, many: bool) -> Ctxs {
        let mut out = Ctxs::new();
        match &p.segment {
            Some(segname) => {
                if self.src.segment_name(ctx.seg) == segname {
                    self.resolve_in(ctx.seg, ctx, p, many, &mut out);
                } else if many {
                    // every one in the current scope (a segment group's own segments: the NTEs
                    // after an OBX belong to that OBX, and are not its order's), or in the
                    // whole message at top level; with none there, the segment that starts an
                    // enclosing group (an OBX's order: its OBR), which a group holds once
                    let sc = &self.scopes[ctx.scope];
                    let mut found = false;
                    for seg in sc.start..sc.end {
                        let held_below = |&(gs, ge, with): &(usize, usize, &[String])| {
                            seg > gs && seg < ge && with.iter().any(|w| w == segname)
                        };
                        if self.src.segment_name(seg) == segname
                            && !sc.attached.iter().any(held_below)
                        {
                            found = true;
                            self.resolve_in(seg, ctx, p, many, &mut out);
                        }
                    }
                    if !found {
                        if let Some(seg) = self.enclosing_start(segname, ctx.scope) {
                            self.resolve_in(seg, ctx, p, many, &mut out);
                        }
                    }
                } else if let Some(seg) = self.find_segment(segname, ctx.scope) {
                    self.resolve_in(seg, ctx, p, many, &mut out);
                }
            }
            None => {
                if ctx.rep == 0 {
                    return out;
                }
                let mut c = ctx;
                for &s in &p.steps {
                    if c.comp == 0 {
                        c.comp = s;
                    } else if c.sub == 0 {
                        c.sub = s;
                    } else {
                        return out;
                    }
                }
                if self.ctx_has_data(c) {
                    out.push(c);
                }
            }
        }
        out
    }

    fn resolve_in(&self, seg: usize, ctx: Ctx, p: &SourcePath, many: bool, out: &mut Ctxs) {
        let n = self.src.rep_count(seg, p.field);
        let reps = match p.rep {
            Rep::Index(i) => i..=i,
            Rep::All => 1..=n,
            Rep::Default if many => 1..=n,
            Rep::Default => match (1..=n).find(|&r| self.rep_has_data(seg, p.field, r)) {
                Some(r) => r..=r,
                None => return,
            },
        };
        for rep in reps {
            let c = Ctx {
                seg,
                field: p.field,
                rep,
                comp: p.steps.first().copied().unwrap_or(0),
                sub: p.steps.get(1).copied().unwrap_or(0),
                scope: ctx.scope,
            };
            if self.ctx_has_data(c) {
                out.push(c);
            }
        }
    }

    fn concrete(&self, c: Ctx) -> String {
        let name = self.src.segment_name(c.seg);
        let count = (0..self.src.segment_count())
            .filter(|&i| self.src.segment_name(i) == name)
            .count();
        let mut s = name.to_string();
        if count > 1 {
            let occ = (0..=c.seg)
                .filter(|&i| self.src.segment_name(i) == name)
                .count();
            s.push_str(&format!("[{occ}]"));
        }
        if c.field > 0 {
            s.push_str(&format!("-{}", c.field));
            if self.src.rep_count(c.seg, c.field) > 1 {
                s.push_str(&format!("[{}]", c.rep));
            }
            if c.comp > 0 {
                s.push_str(&format!(".{}", c.comp));
                if c.sub > 0 {
                    s.push_str(&format!(".{}", c.sub));
                }
            }
        }
        s
    }

    /// An operand's text, borrowed where possible (conditions run for many rules).
    fn operand<'a>(&mut self, o: &'a Operand, ctx: Ctx) -> Option<Cow<'a, str>>
    where
        's: 'a,
    {
        match o {
            Operand::Literal(l) => Some(Cow::Borrowed(l.as_str())),
            Operand::Var(v) => {
                let vars: &'s BTreeMap<String, String> = self.vars;
                vars.get(v).map(|s| Cow::Borrowed(s.as_str()))
            }
            Operand::Path(p) => {
                let c = *self.resolve(ctx, p, false).first()?;
                match self.peek_text(c)? {
                    Cow::Borrowed(b) => Some(Cow::Borrowed(b.trim())),
                    Cow::Owned(o) => Some(Cow::Owned(o.trim().to_string())),
                }
            }
        }
    }

    /// The text at a location (first component/subcomponent when above a leaf); marks it used.
    fn leaf_text(&mut self, c: Ctx) -> Option<Cow<'s, str>> {
        if c.rep == 0 {
            return None;
        }
        self.mark(c.seg, c.field, c.comp.max(1));
        self.peek_text(c)
    }

    /// The text at a location, read without counting it as mapped: conditions and id parts only
    /// look at a value; it is consumed when a rule writes it (or writes something from it).
    fn peek_text(&self, c: Ctx) -> Option<Cow<'s, str>> {
        if c.rep == 0 {
            return None;
        }
        let src: &'s S = self.src;
        let v = src.leaf(c.seg, c.field, c.rep, c.comp.max(1), c.sub.max(1))?;
        has_text(&v).then_some(v)
    }

    /// A rule wrote a value from `c` without reading its text (a constant or an object of
    /// constants chosen by the source, like `from: PID-31` + `value:`): the source counts as
    /// mapped when it is one value — a component, or a field without components.
    fn mark_written_from(&mut self, c: Ctx) {
        if c.rep == 0 {
            return;
        }
        if c.comp > 0 || self.src.comp_count(c.seg, c.field, c.rep) <= 1 {
            self.mark(c.seg, c.field, c.comp.max(1));
        }
    }

    /// Remembers the source value a comparison looks at (an `exists()` test only looks at
    /// whether there is one, so it is not remembered).
    fn note_compared(&mut self, o: &Operand, ctx: Ctx) {
        if let Operand::Path(p) = o {
            if let Some(c) = self.resolve(ctx, p, false).first() {
                self.cond_reads.push(*c);
            }
        }
    }

    fn eval(&mut self, c: &Cond, ctx: Ctx) -> bool {
        match c {
            Cond::Exists(o) => self.operand(o, ctx).is_some_and(|v| !v.is_empty()),
            Cond::IsUrl(o) => {
                self.note_compared(o, ctx);
                self.operand(o, ctx)
                    .is_some_and(|v| crate::cond::is_url(v.trim()))
            }
            Cond::IsUri(o) => {
                self.note_compared(o, ctx);
                self.operand(o, ctx)
                    .is_some_and(|v| uri_prefix(v.trim()).is_some())
            }
            Cond::From(crate::cond::Operand::Path(p)) => {
                ctx.rep > 0
                    && ctx.field == p.field
                    && p.segment.as_deref() == Some(self.src.segment_name(ctx.seg))
            }
            Cond::From(_) => false,
            Cond::Eq(a, b) => {
                self.note_compared(a, ctx);
                self.note_compared(b, ctx);
                self.operand(a, ctx) == self.operand(b, ctx)
            }
            Cond::Ne(a, b) => {
                self.note_compared(a, ctx);
                self.note_compared(b, ctx);
                self.operand(a, ctx) != self.operand(b, ctx)
            }
            Cond::In(a, items) => {
                self.note_compared(a, ctx);
                let v = self.operand(a, ctx);
                v.is_some() && items.iter().any(|i| self.operand(i, ctx) == v)
            }
            Cond::Not(c) => !self.eval(c, ctx),
            Cond::And(a, b) => self.eval(a, ctx) && self.eval(b, ctx),
            Cond::Or(a, b) => self.eval(a, ctx) || self.eval(b, ctx),
        }
    }

    // ---- building ----------------------------------------------------------------------------

    fn build_instance(&mut self, i: usize) -> Fallible<()> {
        let (map, ctx, rtype, id, write) = {
            let inst = &self.instances[i];
            (inst.map, inst.ctx, inst.rtype, inst.id.clone(), inst.write)
        };
        if write == Write::None {
            // Only referenced: its fields stay unconsumed unless the message map ignores them.
            return Ok(());
        }
        if self.out_index.contains_key(&(rtype, id.clone())) {
            // Another segment already gave this id: building this one would lose one of the two
            // without a trace. Its fields stay unmapped (so they are reported) and the collision
            // is reported with the segment, never a value.
            let set = self.set;
            self.dropped.push(DroppedValue {
                source: self.concrete(ctx),
                resource_type: rtype,
                resource_id: id,
                element: "id".into(),
                rule: set.maps[map].file.to_string(),
                reason: DropReason::DuplicateId,
            });
            return Ok(());
        }
        self.build_resource(map, ctx, rtype, id, write, None)?;
        Ok(())
    }

    /// Builds one resource into the bundle (once per type/id); returns its `Type/id`.
    /// `creator` is the `create:` rule that asked for it, where there is one.
    fn build_resource(
        &mut self,
        map: usize,
        ctx: Ctx,
        rtype: &'static str,
        id: String,
        write: Write,
        creator: Option<&RuleLoc>,
    ) -> Fallible<String> {
        let url = format!("{rtype}/{id}");
        let set = self.set;
        let rules = &set.maps[map].rules;
        let key = (rtype, id.clone());
        let first_build = self.out_index.get(&key).copied();
        let duplicate = first_build.is_some();
        let slot = self.out.len();
        if !duplicate {
            self.out_index.insert(key, slot);
            self.out.push(None);
        }
        let mut obj = Obj::new();
        obj.insert("resourceType", Node::str(rtype));
        obj.insert("id", Node::str(id.as_str()));
        let lineage_mark = self.lineage.as_ref().map(Vec::len);
        // a resource created from inside another starts its own locations and Period checks
        let outer_loc = std::mem::take(&mut self.loc);
        let outer_sets = std::mem::take(&mut self.sets);
        let ends_mark = self.period_ends.len();
        self.building.push((rtype, id.clone()));
        let applied = self.apply(rules, ctx, &mut obj, &url);
        self.building.pop();
        self.sets = outer_sets;
        applied?;
        self.loc = outer_loc;
        if write == Write::Delete {
            // A deleted resource only names what goes: what its rules created (the assigning
            // authority of an identifier, a practitioner) is not written on its account. Taken
            // out of the index too, so a resource written later can still create them.
            let first_created = if duplicate { slot } else { slot + 1 };
            for i in first_created..self.out.len() {
                if let Some(e) = self.out[i].take() {
                    self.out_index.remove(&(e.rtype, e.id));
                }
            }
        }
        let mut ends = self.period_ends.split_off(ends_mark);
        if duplicate {
            // only the elements this build may add are checked (and reported) here
            if let Some(first) = first_build.and_then(|i| self.out[i].as_ref()) {
                ends.retain(|e| {
                    e.period.first().is_some_and(|(name, _)| {
                        // a list gains this build's items, so theirs are checked too
                        first
                            .resource
                            .get(name)
                            .is_none_or(|v| View::Node(v).array_len().is_some())
                    })
                });
            }
        }
        self.check_periods(rtype, &id, &mut obj, ends);
        if duplicate {
            // Same resource reached twice in one message (the same doctor as ordering provider
            // and as attending): the first build stands, and this one adds the elements it
            // lacks (the orderer's address, which only the ORC-12 build has) rather than lose
            // them; a list both wrote gains this build's items the first's do not cover, and any
            // other element both wrote is the first's, this build's reported where it differs.
            let filled = match first_build.and_then(|i| self.out[i].as_mut()) {
                Some(first) => first.resource.fill_from(obj),
                None => Default::default(),
            };
            if !filled.conflicting.is_empty() {
                let source = self.concrete(ctx);
                let rule =
                    creator.map_or_else(|| set.maps[map].file.to_string(), ToString::to_string);
                for element in &filled.conflicting {
                    self.dropped.push(DroppedValue {
                        source: source.clone(),
                        resource_type: rtype,
                        resource_id: id.clone(),
                        element: element.to_string(),
                        rule: rule.clone(),
                        reason: DropReason::Conflict,
                    });
                }
            }
            if let (Some(l), Some(m)) = (self.lineage.as_mut(), lineage_mark) {
                // this build's lineage, for what it added, at the places it landed
                let kept: Vec<Lineage> = l
                    .drain(m..)
                    .filter_map(|mut x| {
                        let rest = x.element.strip_prefix(url.as_str())?.strip_prefix('.')?;
                        let under = |k: &str| {
                            rest.strip_prefix(k).is_some_and(|after| {
                                after.is_empty() || after.starts_with(['.', '['])
                            })
                        };
                        if filled.added.iter().any(|k| under(k)) {
                            return Some(x);
                        }
                        let (k, places) = filled.lists.iter().find(|(k, _)| under(k))?;
                        let after = rest.strip_prefix(k.as_ref())?.strip_prefix('[')?;
                        let close = after.find(']')?;
                        let item: usize = after[..close].parse().ok()?;
                        let at = (*places.get(item)?)?;
                        x.element = format!("{url}.{k}[{at}]{}", &after[close + 1..]);
                        Some(x)
                    })
                    .collect();
                l.extend(kept);
            }
        } else {
            self.out[slot] = Some(BundleEntry {
                rtype,
                id,
                url: url.clone(),
                resource: obj,
                write,
            });
        }
        Ok(url)
    }

    /// FHIR R4 per-1 for every Period whose `end` a rule wrote: an `end` before the `start` is
    /// left out (the `start` stays) and reported with its source path, never its value.
    fn check_periods(
        &mut self,
        rtype: &'static str,
        id: &str,
        obj: &mut Obj,
        ends: Vec<PeriodEnd>,
    ) {
        for e in ends {
            let Some(period) = obj_at(obj, &e.period) else {
                continue;
            };
            let (Some(start), Some(end)) = (
                period.get("start").and_then(node_str),
                period.get("end").and_then(node_str),
            ) else {
                continue;
            };
            if datetime::period_start_after_end(start, end) != Some(true) {
                continue;
            }
            period.remove("end");
            let mut element = String::new();
            for (name, idx) in &e.period {
                element.push_str(name);
                if let Some(i) = idx {
                    element.push_str(&format!("[{i}]"));
                }
                element.push('.');
            }
            element.push_str("end");
            if let Some(l) = self.lineage.as_mut() {
                let full = format!("{rtype}/{id}.{element}");
                l.retain(|x| x.element != full);
            }
            let source = e.src.map(|c| self.concrete(c)).unwrap_or_default();
            self.dropped.push(DroppedValue {
                source,
                resource_type: rtype,
                resource_id: id.to_string(),
                element,
                rule: e.rule.to_string(),
                reason: DropReason::EndBeforeStart,
            });
        }
    }

    fn apply(&mut self, rules: &'s [Rule], ctx: Ctx, obj: &mut Obj, jpath: &str) -> Fallible<()> {
        for rule in rules {
            let reads_at = self.cond_reads.len();
            if let Some(c) = &rule.when {
                if !self.eval(c, ctx) {
                    self.cond_reads.truncate(reads_at);
                    continue;
                }
            }
            let reads = self.cond_reads.split_off(reads_at);
            if self.apply_rule(rule, ctx, obj, jpath)? {
                // the values the condition compared chose what was written: they are mapped
                for c in reads {
                    self.mark(c.seg, c.field, c.comp.max(1));
                }
            }
        }
        Ok(())
    }

    /// Runs one rule whose condition holds; whether it wrote anything.
    fn apply_rule(
        &mut self,
        rule: &'s Rule,
        ctx: Ctx,
        obj: &mut Obj,
        jpath: &str,
    ) -> Fallible<bool> {
        let mut wrote = false;
        {
            if let (Some(sep), RuleKind::Prim(p)) = (&rule.join, &rule.kind) {
                let mut parts = Vec::new();
                let mut first = None;
                for path in &rule.from {
                    for c in self.resolve(ctx, path, true) {
                        first.get_or_insert(c);
                        if let Some(t) = self.leaf_text(c) {
                            parts.push(t);
                        }
                    }
                }
                if let (Some(c), false) = (first, parts.is_empty()) {
                    // transforms apply to the joined text: one base64 value, not one per part
                    let joined = transform(rule, Cow::Owned(parts.join(sep)));
                    let v = match convert(*p, &joined, &self.set.default_timezone) {
                        Ok(v) => Some(v),
                        Err(e) => self.invalid(rule, c, e)?,
                    };
                    if let Some(v) = v {
                        self.put(obj, rule, v, jpath, Some(c));
                        wrote = true;
                    }
                }
                return Ok(wrote);
            }
            let mut chosen = 0;
            let sources: Ctxs = if rule.from.is_empty() {
                smallvec::smallvec![ctx]
            } else {
                let mut found = Ctxs::new();
                for (i, p) in rule.from.iter().enumerate() {
                    found = self.resolve(ctx, p, rule.many);
                    if !found.is_empty() {
                        chosen = i;
                        break;
                    }
                }
                found
            };
            if let RuleKind::Ref(name) = &rule.kind {
                let targets = self.lookup_name(name, ctx.scope);
                if !rule.many && targets.len() > 1 {
                    self.ambiguous_ref(rule, ctx, name, &targets)?;
                }
                let n = if rule.many { targets.len() } else { 1 };
                for t in targets.iter().take(n) {
                    let url = format!("{}/{}", self.instances[*t].rtype, self.instances[*t].id);
                    self.put(obj, rule, reference(url), jpath, None);
                    wrote = true;
                }
                return Ok(wrote);
            }
            for c in sources {
                let element = if self.lineage.is_some() {
                    Some(target_path(obj, &rule.target, jpath))
                } else {
                    None
                };
                let lmark = self.lineage.as_ref().map(Vec::len);
                let loc_mark = self.loc.len();
                if rule.holds_period_end {
                    target_loc(obj, &rule.target, &mut self.loc);
                }
                let v = self.value(rule, c, element.as_deref().unwrap_or(""));
                self.loc.truncate(loc_mark);
                let v = v?;
                match v {
                    Some(v) => {
                        let src = if rule.from.is_empty()
                            && !matches!(rule.kind, RuleKind::Prim(_) | RuleKind::Translate { .. })
                        {
                            None
                        } else {
                            Some(c)
                        };
                        if !rule.from.is_empty()
                            && matches!(rule.kind, RuleKind::Const(_) | RuleKind::Nested(_))
                        {
                            self.mark_written_from(c);
                        }
                        self.put(obj, rule, v, jpath, src);
                        wrote = true;
                        if !rule.many {
                            break;
                        }
                    }
                    None => {
                        if let (Some(l), Some(m)) = (self.lineage.as_mut(), lmark) {
                            l.truncate(m);
                        }
                    }
                }
            }
            if wrote && rule.from.len() > chosen + 1 {
                self.alternatives.push((ctx, rule, chosen));
            }
        }
        Ok(wrote)
    }

    /// `b`, a later alternative of a `from:` list, holds exactly what `a` (the one a rule
    /// mapped) holds — ORC-12 and OBR-16 naming the same orderer. What the rules map of either
    /// is then in the output for both, so neither is reported as unconsumed; a `b` that holds
    /// something else stays in the report. Whole fields and components are compared; a pair
    /// of subcomponents is not (consumption is tracked per component).
    fn same_value(&self, a: Ctx, b: Ctx) -> Option<SameValue> {
        let src = self.src;
        let same_comp = |a: Ctx, b: Ctx, ca: usize, cb: usize| {
            let n = src.sub_count(a.seg, a.field, a.rep, ca);
            n == src.sub_count(b.seg, b.field, b.rep, cb)
                && (1..=n).all(|s| {
                    src.leaf(a.seg, a.field, a.rep, ca, s) == src.leaf(b.seg, b.field, b.rep, cb, s)
                })
        };
        if a.rep == 0 || b.rep == 0 || a.sub != 0 || b.sub != 0 || (a.comp == 0) != (b.comp == 0) {
            return None;
        }
        let (a_bits, b_bits) = if a.comp == 0 {
            let reps = src.rep_count(a.seg, a.field);
            let same = reps == src.rep_count(b.seg, b.field)
                && (1..=reps).all(|rep| {
                    let (a, b) = (Ctx { rep, ..a }, Ctx { rep, ..b });
                    let n = src.comp_count(a.seg, a.field, rep);
                    n == src.comp_count(b.seg, b.field, rep)
                        && (1..=n).all(|c| same_comp(a, b, c, c))
                });
            if !same {
                return None;
            }
            (u64::MAX, u64::MAX)
        } else {
            if !same_comp(a, b, a.comp, b.comp) {
                return None;
            }
            (comp_bit(a.comp), comp_bit(b.comp))
        };
        Some(SameValue {
            a: (a.seg, a.field, a_bits),
            b: (b.seg, b.field, b_bits),
        })
    }

    /// Counts a later `from:` alternative as mapped where it holds what the mapped one holds
    /// ([`Runner::same_value`]), sharing what was consumed between the two. Run once every rule
    /// has run (a component of either may be mapped by a later rule), and only for alternatives
    /// whose field still has data no rule read: most have none, or are absent.
    fn share_same_values(&mut self) {
        let mut pairs = Vec::new();
        for &(ctx, rule, chosen) in &self.alternatives {
            let mapped = self.resolve(ctx, &rule.from[chosen], rule.many);
            for p in &rule.from[chosen + 1..] {
                if p.segment.is_none() && !self.has_unread(ctx.seg, ctx.field) {
                    continue;
                }
                let alts = self.resolve(ctx, p, rule.many);
                for (a, b) in mapped.iter().zip(alts.iter()) {
                    if self.has_unread(b.seg, b.field) {
                        pairs.extend(self.same_value(*a, *b));
                    }
                }
            }
        }
        // twice, so a value equal to two alternatives reaches both through the mapped one
        for _ in 0..2 {
            for &SameValue { a, b } in &pairs {
                let (ma, mb) = (
                    self.consumed_mask(a.0, a.1) & a.2,
                    self.consumed_mask(b.0, b.1) & b.2,
                );
                let (to_b, to_a) = if a.2 == u64::MAX {
                    (ma, mb)
                } else {
                    (if ma != 0 { b.2 } else { 0 }, if mb != 0 { a.2 } else { 0 })
                };
                if let Some(i) = self.field_slot(b.0, b.1) {
                    self.consumed[i] |= to_b;
                }
                if let Some(i) = self.field_slot(a.0, a.1) {
                    self.consumed[i] |= to_a;
                }
            }
        }
    }

    /// Whether a field holds data in a component no rule read.
    fn has_unread(&self, seg: usize, field: usize) -> bool {
        let src = self.src;
        let consumed = self.consumed_mask(seg, field);
        (1..=src.rep_count(seg, field)).any(|rep| {
            (1..=src.comp_count(seg, field, rep)).any(|comp| {
                consumed & comp_bit(comp) == 0 && self.comp_has_data(seg, field, rep, comp)
            })
        })
    }

    /// The instances `ref: name` reaches from `scope`: those of the scope itself and its groups;
    /// else, climbing, those planned directly in an enclosing scope. Never those of a sibling
    /// group: the patient group of one PID does not see another patient's encounter.
    fn lookup_name(&self, name: &str, scope: usize) -> Vec<usize> {
        if let Some(v) = self.scopes[scope].names.get(name) {
            if !v.is_empty() {
                return v.clone();
            }
        }
        let mut s = self.scopes[scope].parent;
        while let Some(i) = s {
            if let Some(v) = self.scopes[i].names.get(name) {
                let own: Vec<usize> = v
                    .iter()
                    .copied()
                    .filter(|&t| self.instances[t].ctx.scope == i)
                    .collect();
                if !own.is_empty() {
                    return own;
                }
            }
            s = self.scopes[i].parent;
        }
        Vec::new()
    }

    fn put(&mut self, obj: &mut Obj, rule: &Rule, v: Node, jpath: &str, src: Option<Ctx>) {
        if rule.period_end {
            // set_target goes into the first item of every repeating element on the way
            let mut period = self.loc.clone();
            let inner = &rule.target[..rule.target.len() - 1];
            period.extend(inner.iter().map(|s| (s.name, s.many.then_some(0))));
            self.period_ends.push(PeriodEnd {
                period,
                src,
                rule: rule.loc.clone(),
            });
        }
        if self.lineage.is_some() {
            let element = target_path(obj, &rule.target, jpath);
            let source = src.map(|c| self.concrete(c)).unwrap_or_default();
            if let Some(l) = self.lineage.as_mut() {
                l.push(Lineage {
                    element,
                    source,
                    rule: rule.loc.to_string(),
                });
            }
        }
        set_target(obj, &rule.target, v);
    }

    /// A single-valued `ref:` that names several resources. When they belong to different
    /// patients (the PID each one's segment follows), taking one would file data under the wrong
    /// patient: the message fails and the message map must scope them (`group: [PID]`). Several
    /// of one patient (two SPM of one order for `Observation.specimen`) keep the first, with a
    /// warning.
    fn ambiguous_ref(
        &mut self,
        rule: &Rule,
        ctx: Ctx,
        name: &str,
        targets: &[usize],
    ) -> Fallible<()> {
        let patient_of = |seg: usize| (0..=seg).rev().find(|&i| self.src.segment_name(i) == "PID");
        let first = patient_of(self.instances[targets[0]].ctx.seg);
        if targets
            .iter()
            .any(|&t| patient_of(self.instances[t].ctx.seg) != first)
        {
            return Err(self.fail(
                rule,
                ctx,
                format!(
                    "`ref: {name}` matches {} resources of different patients here but `{}` \
                     holds one; put each patient's resources in a group of the message map \
                     (`group: [PID]`)",
                    targets.len(),
                    rule.set
                ),
            ));
        }
        self.warnings.push(format!(
            "{}: `ref: {name}` at {} matches {} resources but `{}` holds one: the first is referenced",
            rule.loc,
            self.concrete(ctx),
            targets.len(),
            rule.set
        ));
        Ok(())
    }

    /// One level deeper into a `map:`/`create:`; fails past `MAX_DEPTH`.
    fn enter(&mut self, rule: &Rule, c: Ctx) -> Fallible<()> {
        if self.depth >= MAX_DEPTH {
            return Err(self.fail(
                rule,
                c,
                format!("maps nested more than {MAX_DEPTH} deep (a map that uses itself?)"),
            ));
        }
        self.depth += 1;
        Ok(())
    }

    fn fail(&self, rule: &Rule, c: Ctx, reason: String) -> Box<MappingError> {
        Box::new(MappingError::Rule {
            rule: rule.loc.to_string(),
            set: rule.set.clone(),
            path: self.concrete(c),
            reason,
        })
    }

    fn text(&mut self, rule: &Rule, c: Ctx) -> Option<Cow<'s, str>> {
        let s = transform(rule, self.leaf_text(c)?);
        (!s.trim().is_empty()).then_some(s)
    }

    /// A conversion failure: fail the message, or (on_error: warn) leave the element out.
    fn invalid(&mut self, rule: &Rule, c: Ctx, reason: String) -> Fallible<Option<Node>> {
        match rule.on_error.unwrap_or(self.set.on_invalid_value) {
            OnError::Fail => Err(self.fail(rule, c, reason)),
            OnError::Warn => {
                let source = self.concrete(c);
                self.warnings.push(format!(
                    "{}: value at {source} left out of `{}`: {reason}",
                    rule.loc, rule.set
                ));
                self.left_out(rule, c, DropReason::InvalidValue);
                Ok(None)
            }
        }
    }

    /// Records a value the rule read but leaves out of the output, reported like an unconsumed
    /// field so the feed's policy applies to it.
    fn left_out(&mut self, rule: &Rule, c: Ctx, reason: DropReason) {
        let (resource_type, resource_id) =
            self.building.last().cloned().unwrap_or(("", String::new()));
        let mut element = self.sets.join(".");
        if !element.is_empty() {
            element.push('.');
        }
        element.push_str(&rule.set);
        self.dropped.push(DroppedValue {
            source: self.concrete(c),
            resource_type,
            resource_id,
            element,
            rule: rule.loc.to_string(),
            reason,
        });
    }

    fn value(&mut self, rule: &'s Rule, c: Ctx, element: &str) -> Fallible<Option<Node>> {
        Ok(match &rule.kind {
            RuleKind::Const(v) => Some(Node::Const(v.clone())),
            RuleKind::Var(name, p) => match self.vars.get(name) {
                Some(v) => Some(
                    convert(*p, v, &self.set.default_timezone)
                        .map_err(|e| self.fail(rule, c, e))?,
                ),
                None => None,
            },
            RuleKind::Prim(p) => match self.text(rule, c) {
                None => None,
                Some(s) => match convert(*p, &s, &self.set.default_timezone) {
                    Ok(v) => Some(v),
                    Err(e) => return self.invalid(rule, c, e),
                },
            },
            RuleKind::Map(idx) => {
                let set = self.set;
                let mut o = Obj::new();
                self.enter(rule, c)?;
                self.sets.push(&rule.set);
                let r = self.apply(&set.maps[*idx].rules, c, &mut o, element);
                self.sets.pop();
                self.depth -= 1;
                r?;
                (!o.is_empty()).then_some(Node::Obj(o))
            }
            RuleKind::Nested(rules) => {
                let mut o = Obj::new();
                self.sets.push(&rule.set);
                let r = self.apply(rules, c, &mut o, element);
                self.sets.pop();
                r?;
                (!o.is_empty()).then_some(Node::Obj(o))
            }
            RuleKind::Translate { map, out, default } => {
                let Some(code) = self.text(rule, c) else {
                    return Ok(None);
                };
                match self.term.translate(map, code.trim()) {
                    Some(t) => Some(match out {
                        TransOut::Code => Node::Str(t.code),
                        TransOut::Coding => coding(&t),
                        TransOut::CodeableConcept => {
                            let mut cc = Obj::new();
                            cc.insert("coding", Node::Arr(vec![coding(&t)]));
                            Node::Obj(cc)
                        }
                    }),
                    None => match default {
                        _ if self.term.states_no_target(map, code.trim()) => None,
                        Some(d) if *out == TransOut::Code => Some(Node::str(d.as_str())),
                        _ => {
                            self.warnings.push(format!(
                                "{}: code at {} is not in ConceptMap {map}; `{}` left empty",
                                rule.loc,
                                self.concrete(c),
                                rule.set
                            ));
                            self.left_out(rule, c, DropReason::UnknownCode);
                            None
                        }
                    },
                }
            }
            RuleKind::Ref(_) => None,
            RuleKind::Create(idx, place) => {
                let (rtype, id) = self.instance_id(*idx, c, place);
                let write = match &self.set.maps[*idx].kind {
                    MapKind::Resource { created, .. } => *created,
                    MapKind::Datatype => Write::Replace,
                };
                self.enter(rule, c)?;
                let url = self.build_resource(*idx, c, rtype, id, write, Some(&rule.loc));
                self.depth -= 1;
                Some(reference(url?))
            }
        })
    }

    /// Works on positions and consumed bit masks; text is only formatted for what is reported.
    fn unconsumed(&self, ignore: &[crate::compile::IgnorePattern]) -> Vec<SourceField> {
        let src = self.src;
        let mut out = Vec::new();
        // (segment name, how many so far, how many in all, the name once reported)
        let mut names: Vec<(&str, usize, usize, Option<Arc<str>>)> = Vec::new();
        for seg in 0..src.segment_count() {
            let name = src.segment_name(seg);
            match names.iter_mut().find(|n| n.0 == name) {
                Some(n) => n.2 += 1,
                None => names.push((name, 0, 1, None)),
            }
        }
        let mut extra: Vec<usize> = Vec::new();
        for seg in 0..src.segment_count() {
            let name = src.segment_name(seg);
            let Some(entry) = names.iter_mut().find(|n| n.0 == name) else {
                continue;
            };
            entry.1 += 1;
            let occurrence = (entry.2 > 1).then_some(entry.1);
            // the ignore patterns for this segment
            let seg_ignores: smallvec::SmallVec<[&crate::compile::IgnorePattern; 8]> = ignore
                .iter()
                .chain(self.set.global_ignore.iter())
                .filter(|p| p.segment == name)
                .collect();
            if seg_ignores.iter().any(|p| p.field.is_none()) {
                continue;
            }
            for field in 1..=src.field_count(seg) {
                if name == "MSH" && field <= 2 {
                    continue;
                }
                let nreps = src.rep_count(seg, field);
                if nreps == 0 {
                    continue;
                }
                let consumed = self.consumed_mask(seg, field);
                // components 1..=64 with data and not consumed, as bits; higher ones in `extra`
                let mut unread = 0u64;
                extra.clear();
                let mut max_comp = 0;
                for rep in 1..=nreps {
                    let nc = src.comp_count(seg, field, rep);
                    max_comp = max_comp.max(nc);
                    for comp in 1..=nc {
                        let bit = comp_bit(comp);
                        if consumed & bit != 0
                            || (comp <= 64 && unread & bit != 0)
                            || extra.contains(&comp)
                        {
                            continue;
                        }
                        // `""` (HL7's explicit null) is no data: rules skip it and the
                        // upsert replaces the whole resource, so the element is absent anyway
                        if !self.comp_has_data(seg, field, rep, comp) {
                            continue;
                        }
                        if comp <= 64 {
                            unread |= bit;
                        } else {
                            extra.push(comp);
                        }
                    }
                }
                if unread == 0 && extra.is_empty() {
                    continue;
                }
                extra.sort_unstable();
                let bits = (1..=64).filter(|c| unread & comp_bit(*c) != 0);
                for comp in bits.chain(extra.iter().copied()) {
                    if seg_ignores.iter().any(|p| p.covers(field, comp)) {
                        continue;
                    }
                    out.push(SourceField {
                        segment: entry.3.get_or_insert_with(|| Arc::from(name)).clone(),
                        occurrence,
                        field,
                        component: (max_comp > 1).then_some(comp),
                    });
                }
            }
        }
        out
    }
}

/// The bit that marks component `comp` as read (components past 64 share the last bit).
fn comp_bit(comp: usize) -> u64 {
    1u64 << (comp.clamp(1, 64) - 1)
}

fn coding(t: &tributary_terminology::Target) -> Node {
    let mut c = Obj::new();
    c.insert("system", Node::str(t.system.as_str()));
    c.insert("code", Node::str(t.code.as_str()));
    if let Some(d) = &t.display {
        c.insert("display", Node::str(d.as_str()));
    }
    Node::Obj(c)
}

fn reference(url: String) -> Node {
    let mut r = Obj::new();
    r.insert("reference", Node::Str(url));
    Node::Obj(r)
}

/// An identifier namespace as a legal URI: OIDs become `urn:oid:`, UUIDs `urn:uuid:`, URLs and
/// URNs stay, anything else becomes `urn:id:` with spaces replaced (R4 `uri` has no whitespace).
pub fn to_uri(s: &str) -> String {
    uri_form(s).unwrap_or_else(|| format!("urn:id:{}", s.trim().replace(char::is_whitespace, "_")))
}

/// The URI a value already is, in another spelling: an OID (`urn:oid:`), a UUID (`urn:uuid:`),
/// a URL or URN (spaces escaped). `None` for a name or a local code, which has no URI of its own.
fn uri_form(s: &str) -> Option<String> {
    let s = s.trim();
    uri_prefix(s).map(|prefix| match prefix {
        "" => s.replace(' ', "%20"),
        p => format!("{p}{s}"),
    })
}

/// What makes `s` (trimmed) a URI: `urn:oid:` or `urn:uuid:` before it, or nothing (`""`) when
/// it is a URL or URN already; `None` when nothing does.
fn uri_prefix(s: &str) -> Option<&'static str> {
    let is_oid = s.contains('.')
        && s.split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if is_oid {
        return Some("urn:oid:");
    }
    let is_uuid = s.len() == 36 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    if is_uuid {
        return Some("urn:uuid:");
    }
    (s.contains("://") || s.starts_with("urn:")).then_some("")
}

fn transform<'a>(rule: &Rule, mut s: Cow<'a, str>) -> Cow<'a, str> {
    for t in &rule.transforms {
        s = Cow::Owned(match t {
            Transform::Upper => s.to_uppercase(),
            Transform::Lower => s.to_lowercase(),
            Transform::Trim => s.trim().to_string(),
            Transform::Prefix(p) => format!("{p}{s}"),
            Transform::Uri => to_uri(&s),
            Transform::Base64 => base64(s.as_bytes()),
            Transform::Xhtml => narrative_div(&s),
            Transform::Endpoint => to_endpoint(&s),
            Transform::Comparator => split_comparator(&s).0.to_string(),
            Transform::StripComparator => split_comparator(&s).1.to_string(),
        });
    }
    s
}

/// Converts text to a FHIR primitive; the error never contains the value.
fn convert(p: Prim, s: &str, tz: &str) -> Result<Node, String> {
    let t = s.trim();
    Ok(match p {
        Prim::String => Node::Str(t.to_string()),
        Prim::Code => {
            let c = t.split_whitespace().collect::<Vec<_>>().join(" ");
            Node::Str(c)
        }
        Prim::Uri => Node::Str(t.replace(char::is_whitespace, "_")),
        Prim::Url if crate::cond::is_url(t) => Node::Str(t.to_string()),
        Prim::Url => return Err("not an absolute URL (scheme://…)".into()),
        Prim::Decimal => Node::Num(decimal(t).ok_or_else(|| "not a decimal number".to_string())?),
        Prim::Integer => Node::Num(
            t.parse::<i64>()
                .map_err(|_| "not an integer".to_string())?
                .into(),
        ),
        Prim::Boolean => Node::Bool(match t.to_ascii_uppercase().as_str() {
            "Y" | "YES" | "TRUE" | "1" | "T" => true,
            "N" | "NO" | "FALSE" | "0" | "F" => false,
            _ => return Err("not a boolean (Y/N)".into()),
        }),
        Prim::Date => Node::Str(datetime::to_date(t).map_err(|e| e.to_string())?),
        Prim::DateTime => Node::Str(datetime::to_datetime(t, tz).map_err(|e| e.to_string())?),
        Prim::Instant => Node::Str(datetime::to_instant(t, tz).map_err(|e| e.to_string())?),
        Prim::Time => Node::Str(datetime::to_time(t).map_err(|e| e.to_string())?),
    })
}

/// A constant that a later rule adds to becomes a tree of its own.
fn owned(n: &mut Node) -> &mut Node {
    if let Node::Const(c) = n {
        *n = Node::from_value(&c.value);
    }
    n
}

fn set_target(obj: &mut Obj, steps: &[Step], v: Node) {
    let (last, inner) = match steps.split_last() {
        Some(x) => x,
        None => return,
    };
    let mut cur = obj;
    for s in inner {
        let slot = cur.get_or_insert_with(s.name, || {
            if s.many {
                Node::Arr(Vec::new())
            } else {
                Node::Obj(Obj::new())
            }
        });
        let slot = owned(slot);
        let next = if let Node::Arr(a) = slot {
            if a.is_empty() {
                a.push(Node::Obj(Obj::new()));
            }
            owned(&mut a[0])
        } else {
            slot
        };
        cur = match next {
            Node::Obj(o) => o,
            _ => return,
        };
    }
    if last.many {
        if let Node::Arr(a) = owned(cur.get_or_insert_with(last.name, || Node::Arr(Vec::new()))) {
            a.push(v);
        }
    } else {
        cur.insert_new(last.name, v);
    }
}

/// Where a value for `steps` lands in `obj` (as `target_path`, structured), appended to `out`.
fn target_loc(obj: &Obj, steps: &[Step], out: &mut Vec<LocStep>) {
    let mut cur = Some(View::Obj(obj));
    for (i, st) in steps.iter().enumerate() {
        let existing = cur.and_then(|o| o.get(st.name));
        if st.many {
            let idx = if i + 1 == steps.len() {
                existing.and_then(View::array_len).unwrap_or(0)
            } else {
                0
            };
            out.push((st.name, Some(idx)));
            cur = existing.and_then(View::first).filter(|v| v.is_object());
        } else {
            out.push((st.name, None));
            cur = existing.filter(|v| v.is_object());
        }
    }
}

/// The object at `path` in `obj`, if the path leads to one.
fn obj_at<'o>(obj: &'o mut Obj, path: &[LocStep]) -> Option<&'o mut Obj> {
    let mut cur = obj;
    for (name, idx) in path {
        let mut node = cur.get_mut(name)?;
        if let Some(i) = idx {
            node = match node {
                Node::Arr(a) => a.get_mut(*i)?,
                _ => return None,
            };
        }
        cur = match node {
            Node::Obj(o) => o,
            _ => return None,
        };
    }
    Some(cur)
}

fn node_str(n: &Node) -> Option<&str> {
    match n {
        Node::Str(s) => Some(s),
        Node::Const(c) => c.value.as_str(),
        _ => None,
    }
}

fn target_path(obj: &Obj, steps: &[Step], jpath: &str) -> String {
    let mut s = jpath.to_string();
    let mut cur = Some(View::Obj(obj));
    for (i, st) in steps.iter().enumerate() {
        s.push('.');
        s.push_str(st.name);
        let existing = cur.and_then(|o| o.get(st.name));
        if st.many {
            let idx = if i + 1 == steps.len() {
                existing.and_then(View::array_len).unwrap_or(0)
            } else {
                0
            };
            s.push_str(&format!("[{idx}]"));
            cur = existing.and_then(View::first).filter(|v| v.is_object());
        } else {
            cur = existing.filter(|v| v.is_object());
        }
    }
    s
}

/// Plain text as a FHIR narrative: one XHTML `div`, the text escaped so it stays text.
fn narrative_div(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 48);
    out.push_str("<div xmlns=\"http://www.w3.org/1999/xhtml\">");
    for c in text.trim().chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out.push_str("</div>");
    out
}

/// Standard base64 with padding (RFC 4648), for `Attachment.data`.
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(A[(n >> 18) as usize & 63] as char);
        out.push(A[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            A[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            A[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// HL7 NM text as a JSON number: optional sign, digits, optional fraction; leading zeros dropped
/// (`0065.88` → 65.88). Precision is kept as far as JSON numbers keep it.
fn decimal(t: &str) -> Option<serde_json::Number> {
    let (sign, rest) = match t.strip_prefix('-') {
        Some(r) => ("-", r),
        None => ("", t.strip_prefix('+').unwrap_or(t)),
    };
    let (int, frac) = match rest.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (rest, None),
    };
    if (int.is_empty() && frac.is_none_or(str::is_empty))
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.is_none_or(|f| f.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    let int = int.trim_start_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    let text = match frac {
        Some(f) if !f.is_empty() => format!("{sign}{int}.{f}"),
        _ => format!("{sign}{int}"),
    };
    text.parse().ok()
}

/// Splits a leading comparator (`<=`, `>=`, `<`, `>`) from a value.
fn split_comparator(s: &str) -> (&str, &str) {
    let t = s.trim();
    for c in ["<=", ">=", "<", ">"] {
        if let Some(rest) = t.strip_prefix(c) {
            return (c, rest.trim());
        }
    }
    ("", t)
}

/// A MessageHeader endpoint (R4 `url`, which validators require to have `scheme://`).
pub fn to_endpoint(s: &str) -> String {
    let s = s.trim();
    if s.contains("://") {
        return s.replace(char::is_whitespace, "%20");
    }
    let host: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("mllp://{host}")
}
