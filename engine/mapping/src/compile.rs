//! Loading a mapping directory: YAML files → checked, compiled plan ([`MappingSet`]).
//!
//! Layout of a mapping set directory (see `mappings/hl7v2/README.md`):
//! - `mapping-set.yaml` — settings (`default_timezone`, `ignore`);
//! - `datatypes/*.yaml` — datatype maps (`datatype: CX`, `to: Identifier`, `rules:`);
//! - `segments/*.yaml` — resource maps (`resource: Patient`, `segment: PID`, `id:`, `rules:`);
//! - `messages/*.yaml` — message maps (`message: [ADT^A01]`, `resources:`), each with fixtures
//!   `NAME*.hl7` + `NAME*.expected.json` beside it.
//!
//! Every error names `file:line:col`, the bad path or element, and a suggestion where one exists.

use crate::cond::{self, Cond};
use crate::fhir;
use crate::path::{self, Rep, SourcePath};
use crate::segments;
use crate::tree::Constant;
use crate::yaml::{self, Kind as YKind, Node, Pos};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One problem in a mapping file, at a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

/// Every problem found while loading a mapping set (loading does not stop at the first).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{} error(s) in mapping set:\n{}", .0.len(), .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct LoadErrors(pub Vec<LoadError>);

/// Where a rule is written: shown in lineage and in failure reasons.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleLoc {
    pub file: Arc<str>,
    pub line: usize,
    pub col: usize,
}

impl fmt::Display for RuleLoc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Step {
    pub name: &'static str,
    pub ty: &'static str,
    pub many: bool,
}

/// How a primitive source value becomes a FHIR primitive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Prim {
    String,
    Code,
    Uri,
    /// A locator (`url`): only an absolute URL converts.
    Url,
    Decimal,
    Integer,
    Boolean,
    Date,
    DateTime,
    Instant,
    Time,
}

impl Prim {
    fn for_type(ty: &str) -> Option<Prim> {
        Some(match ty {
            "string" | "markdown" | "base64Binary" | "xhtml" => Prim::String,
            "code" | "id" | "oid" => Prim::Code,
            "uri" | "canonical" | "uuid" => Prim::Uri,
            "url" => Prim::Url,
            "decimal" => Prim::Decimal,
            "integer" | "positiveInt" | "unsignedInt" => Prim::Integer,
            "boolean" => Prim::Boolean,
            "date" => Prim::Date,
            "dateTime" => Prim::DateTime,
            "instant" => Prim::Instant,
            "time" => Prim::Time,
            _ => return None,
        })
    }
}

/// Small text transforms applied before conversion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Transform {
    Upper,
    Lower,
    Trim,
    /// `prefix: urn:oid:` — prepend text.
    Prefix(String),
    /// `uri` — make an identifier namespace a legal URI (`urn:oid:` for OIDs, `urn:id:` otherwise).
    Uri,
    /// `base64` — encode the text (for `Attachment.data`).
    Base64,
    /// `xhtml` — the text as a FHIR narrative `div` (escaped, in the XHTML namespace).
    Xhtml,
    /// `endpoint` — an R4 `url` for MessageHeader endpoints: kept when it has a scheme
    /// (`mllp://host:port`), else `mllp://` + the name with unsafe characters replaced.
    Endpoint,
    /// `comparator` — keep only a leading `<`, `<=`, `>`, `>=` (for `Quantity.comparator`).
    Comparator,
    /// `strip_comparator` — drop a leading `<`, `<=`, `>`, `>=` (for `Quantity.value`).
    StripComparator,
}

/// What to do when a source value cannot become its FHIR type (a date that is not a date).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// Fail the message (it is kept, with the reason, for a fix and a replay).
    Fail,
    /// Leave the element out and record a warning (file, rule, source path — no value).
    Warn,
}

#[derive(Clone, Debug)]
pub(crate) enum RuleKind {
    Prim(Prim),
    Const(Arc<Constant>),
    Var(String, Prim),
    Map(usize),
    Nested(Vec<Rule>),
    Translate {
        map: String,
        out: TransOut,
        default: Option<String>,
    },
    Ref(String),
    /// The map to create with, and the rule's place in its own map for the id of a resource
    /// without identifying values: `set` path from the map's root, the map created, and which
    /// such rule of the map it is. Not the line: a comment or rule added above must not give
    /// those resources new ids (a replay after the edit would leave the old ones behind).
    Create(usize, Arc<str>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TransOut {
    Code,
    Coding,
    CodeableConcept,
}

#[derive(Clone, Debug)]
pub(crate) struct Rule {
    pub loc: RuleLoc,
    /// The `set:` text, for messages.
    pub set: String,
    pub target: Vec<Step>,
    /// First non-empty of these; empty = the current value (or no source for constants).
    pub from: Vec<SourcePath>,
    pub when: Option<Cond>,
    pub kind: RuleKind,
    pub transforms: Vec<Transform>,
    /// The target holds many values, so every repetition is mapped.
    pub many: bool,
    /// `join: " "` — one value: the text of every selected source, joined (transforms then apply
    /// to the joined text).
    pub join: Option<String>,
    /// `on_error:`; `None` follows the mapping set's `on_invalid_value`.
    pub on_error: Option<OnError>,
    /// The rule fills a Period's `end`: checked against the Period's `start` once the resource
    /// is built (FHIR R4 invariant per-1).
    pub period_end: bool,
    /// The rule builds an object (`map:`, `rules:`) in which some rule fills a Period's `end`:
    /// the runner tracks where that object lies in the resource.
    pub holds_period_end: bool,
}

#[derive(Clone, Debug)]
pub(crate) enum IdPart {
    /// The first of these paths that holds a value: one path, or a list in `id:` (as a list in
    /// `from:`).
    FirstOf(Vec<SourcePath>),
    Const(String),
}

#[derive(Clone, Debug)]
pub(crate) enum MapKind {
    Datatype,
    Resource {
        resource: &'static str,
        segment: Option<String>,
        id: Vec<IdPart>,
        /// What a resource made by a `create:` rule does to the stored one (`write:` at the top
        /// of the map: `replace` or `merge`); a message map's entries say their own.
        created: Write,
    },
}

/// A compiled datatype or resource map.
#[derive(Clone, Debug)]
pub(crate) struct CompiledMap {
    pub name: String,
    pub file: Arc<str>,
    pub kind: MapKind,
    pub rules: Vec<Rule>,
}

/// What a mapped resource does to the stored resource of the same id (`write:` in a message map).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Write {
    /// A conditional `PUT`: the mapped resource is the new version.
    #[default]
    Replace,
    /// A `PATCH`: its elements go into the stored resource (lists gain the items they lack,
    /// other elements are replaced, the rest is kept).
    Merge,
    /// As `Merge`, but only into a stored resource: with none stored nothing is written (a
    /// replaced document's status, when the document itself never came).
    Amend,
    /// A `DELETE`: the mapped resource only names what is deleted (its id comes from the
    /// source identifiers like any other); the store keeps the deleted versions in history.
    Delete,
    /// Nothing is written: the resource only gives the id other resources reference (the
    /// patient of a message that must not change the stored Patient).
    None,
}

impl Write {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "replace" => Some(Self::Replace),
            "merge" => Some(Self::Merge),
            "amend" => Some(Self::Amend),
            "delete" => Some(Self::Delete),
            "none" => Some(Self::None),
            _ => None,
        }
    }

    /// The Bundle entry's `request.method` (`write: none` makes no entry).
    pub fn method(self) -> &'static str {
        match self {
            Self::Replace | Self::None => "PUT",
            Self::Merge | Self::Amend => "PATCH",
            Self::Delete => "DELETE",
        }
    }
}

#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // a handful per message map, built once
pub(crate) enum Entry {
    Resource {
        name: Option<String>,
        /// `None`: one instance for the whole scope.
        segment: Option<String>,
        map: usize,
        when: Option<Cond>,
        /// Only occurrences before the first `until` segment of the scope.
        until: Option<String>,
        write: Write,
    },
    Group {
        start: Vec<String>,
        /// `with:` — the segments a group holds after its start; the group ends at the first
        /// segment that is neither (the SPM after an order's OBX groups is the order's). Empty:
        /// a group runs to the next start.
        with: Vec<String>,
        entries: Vec<Entry>,
        until: Option<String>,
    },
}

/// A compiled message map.
#[derive(Clone, Debug)]
pub(crate) struct MessageMap {
    pub name: String,
    pub file: Arc<str>,
    pub matches: Vec<String>,
    /// The set's `vars:` with this map's own in place.
    pub vars: BTreeMap<String, String>,
    /// Per trigger event named under `event_vars:`, `vars` with that event's values in place.
    pub vars_by_event: BTreeMap<String, BTreeMap<String, String>>,
    /// Per trigger event, only the values `event_vars:` gives (they win over a feed's).
    pub event_vars: BTreeMap<String, BTreeMap<String, String>>,
    pub ignore: Vec<IgnorePattern>,
    pub entries: Vec<Entry>,
}

/// A field or component deliberately left unmapped: `EVN`, `PID-19`, `MSH-7.2`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct IgnorePattern {
    pub segment: String,
    pub field: Option<usize>,
    pub comp: Option<usize>,
}

impl IgnorePattern {
    fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.len() == 3 && s.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Ok(Self {
                segment: s.into(),
                field: None,
                comp: None,
            });
        }
        let p = path::parse(s)?;
        if p.rep != Rep::Default || p.steps.len() > 1 {
            return Err("an ignore entry is SEG, SEG-field or SEG-field.component".into());
        }
        Ok(Self {
            segment: p.segment.unwrap_or_default(),
            field: Some(p.field),
            comp: p.steps.first().copied(),
        })
    }

    /// Whether the pattern covers a field/component of a segment named `self.segment`.
    pub fn covers(&self, field: usize, comp: usize) -> bool {
        self.field.is_none_or(|f| f == field) && self.comp.is_none_or(|c| c == comp)
    }
}

/// A loaded, checked and compiled mapping set: what the pipeline runs. Immutable; reloading
/// builds a new one and swaps it in whole.
#[derive(Debug)]
pub struct MappingSet {
    /// Content hash of every file in the set (sha256 over sorted relative paths and contents).
    pub version: String,
    pub root: PathBuf,
    pub default_timezone: String,
    /// `on_invalid_value` from mapping-set.yaml: what a rule without `on_error:` does.
    pub on_invalid_value: OnError,
    pub(crate) maps: Vec<CompiledMap>,
    pub(crate) messages: Vec<MessageMap>,
    pub(crate) global_ignore: Vec<IgnorePattern>,
    /// `feeds:` of mapping-set.yaml: per feed (sending partner), the variables it sets.
    pub(crate) feed_vars: BTreeMap<String, BTreeMap<String, String>>,
    /// Message map files with their fixture inputs, for `tributary mapping test`.
    pub fixtures: Vec<Fixture>,
}

/// One fixture: an input message and the FHIR Bundle its message map must produce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fixture {
    pub message_map: PathBuf,
    pub input: PathBuf,
    pub expected: PathBuf,
    /// `ADT_A01.<feed>.hl7`, named after a feed of `feeds:`: mapped as that feed's messages.
    pub feed: Option<String>,
}

impl MappingSet {
    /// The message types the set maps (`ADT^A01`, …) with the file mapping each.
    pub fn message_types(&self) -> Vec<(String, String)> {
        self.messages
            .iter()
            .flat_map(|m| m.matches.iter().map(|t| (t.clone(), m.file.to_string())))
            .collect()
    }

    /// The feeds `feeds:` of mapping-set.yaml gives variables to.
    pub fn feeds(&self) -> impl Iterator<Item = &str> {
        self.feed_vars.keys().map(String::as_str)
    }

    pub fn has_feed(&self, feed: &str) -> bool {
        self.feed_vars.contains_key(feed)
    }

    /// Message map files that have no fixture beside them.
    pub fn message_maps_without_fixtures(&self) -> Vec<String> {
        self.messages
            .iter()
            .filter(|m| {
                !self
                    .fixtures
                    .iter()
                    .any(|f| f.message_map.as_os_str() == m.file.as_ref())
            })
            .map(|m| m.file.to_string())
            .collect()
    }

    /// Loads, checks and compiles the mapping set in `dir`.
    pub fn load(dir: &Path) -> Result<MappingSet, LoadErrors> {
        Self::load_texts(dir, &read_texts(dir)?)
    }

    /// [`load`](Self::load) from texts already read from `dir` (by [`texts`](Self::texts)).
    pub fn load_texts(dir: &Path, texts: &[(PathBuf, String)]) -> Result<MappingSet, LoadErrors> {
        let mut set = Self::from_texts(dir, texts)?;
        set.fixtures = find_fixtures(&set.messages, &set.feed_vars);
        Ok(set)
    }

    /// The mapping files of `dir` as `load` reads them: (path relative to `dir`, text), sorted.
    pub fn texts(dir: &Path) -> Result<Vec<(PathBuf, String)>, LoadErrors> {
        read_texts(dir)
    }

    /// The content hash `load` would give `dir`, without compiling (hot reload polls this).
    pub fn version_of(dir: &Path) -> Result<String, LoadErrors> {
        Ok(Self::version_of_texts(&read_texts(dir)?))
    }

    /// The content hash of texts read by [`texts`](Self::texts).
    pub fn version_of_texts(texts: &[(PathBuf, String)]) -> String {
        hash_texts(texts)
    }

    /// Compiles a set from (relative path, text) pairs; `root` is used for display and fixtures.
    pub fn from_texts(root: &Path, texts: &[(PathBuf, String)]) -> Result<MappingSet, LoadErrors> {
        let version = hash_texts(texts);
        let mut c = Compiler::default();
        let mut docs = Vec::new();
        for (rel, text) in texts {
            let display: Arc<str> = root.join(rel).display().to_string().into();
            match yaml::parse(text) {
                Ok(node) => docs.push((display, rel.clone(), node)),
                Err((pos, msg)) => c.err(&display, pos, format!("YAML syntax: {msg}")),
            }
        }
        // Pass 1: headers (names and produced types), so maps can refer to each other in any order.
        let mut settings: Option<(Arc<str>, Node)> = None;
        let mut message_docs = Vec::new();
        for (file, rel, node) in docs {
            let stem = rel
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default();
            if stem == "mapping-set" {
                settings = Some((file, node));
                continue;
            }
            if node.as_map().is_none() {
                c.err(
                    &file,
                    node.pos,
                    "a mapping file is a YAML map (key: value)".into(),
                );
                continue;
            }
            if node.get("message").is_some() {
                message_docs.push((file, stem, node));
            } else if node.get("datatype").is_some() || node.get("resource").is_some() {
                c.header(&file, stem, node);
            } else {
                c.err(
                    &file,
                    node.pos,
                    "unknown kind of mapping file: expected a `message:`, `resource:` or `datatype:` key".into(),
                );
            }
        }
        let mut default_timezone = "Z".to_string();
        let mut on_invalid_value = OnError::Fail;
        let mut global_ignore = Vec::new();
        if let Some((file, node)) = &settings {
            c.check_keys(
                file,
                node,
                &[
                    "name",
                    "description",
                    "default_timezone",
                    "on_invalid_value",
                    "ignore",
                    "vars",
                    "feeds",
                ],
            );
            c.set_vars = vars_of(node.get("vars"));
            c.declare_vars(file, node.get("vars"), "`vars:`");
            if let Some(n) = node.get("on_invalid_value") {
                match n.as_str() {
                    Some("fail") => on_invalid_value = OnError::Fail,
                    Some("warn") => on_invalid_value = OnError::Warn,
                    other => c.err(
                        file,
                        n.pos,
                        format!(
                            "on_invalid_value is `fail` or `warn`, found `{}`",
                            other.unwrap_or("")
                        ),
                    ),
                }
            }
            if let Some(tz) = node.get("default_timezone") {
                let t = tz.as_str().unwrap_or("");
                if valid_offset(t) {
                    default_timezone = t.to_string();
                } else {
                    c.err(
                        file,
                        tz.pos,
                        format!(
                            "default_timezone must be `Z` or `+HH:MM`/`-HH:MM` with HH at most 14 \
                             and MM at most 59, found `{t}`"
                        ),
                    );
                }
            }
            global_ignore = c.ignore_list(file, node.get("ignore"));
        }
        // Pass 2: bodies.
        for i in 0..c.maps.len() {
            c.compile_map(i);
        }
        check_cycles(&mut c);
        mark_period_rules(&mut c.maps);
        let mut messages = Vec::new();
        let mut seen: HashMap<String, Arc<str>> = HashMap::new();
        for (file, stem, node) in message_docs {
            if let Some(m) = c.message(&file, stem, &node) {
                for t in &m.matches {
                    if let Some(prev) = seen.insert(t.clone(), file.clone()) {
                        c.err(
                            &file,
                            node.get("message").map_or(node.pos, |n| n.pos),
                            format!("message type {t} is already mapped by {prev}"),
                        );
                    }
                }
                messages.push(m);
            }
        }
        let feed_vars = match &settings {
            Some((file, node)) => c.feeds(file, node.get("feeds"), &messages),
            None => BTreeMap::new(),
        };
        if !c.errors.is_empty() {
            return Err(LoadErrors(c.errors));
        }
        Ok(MappingSet {
            version,
            root: root.to_path_buf(),
            default_timezone,
            on_invalid_value,
            maps: c.maps.into_iter().map(|m| m.compiled).collect(),
            messages,
            global_ignore,
            feed_vars,
            fixtures: Vec::new(),
        })
    }
}

/// A `vars:` map's names and values (text; a value's type is checked where a rule writes it,
/// and against `one_of:` where the declaration lists the values).
fn vars_of(node: Option<&Node>) -> BTreeMap<String, String> {
    node.and_then(Node::as_map)
        .unwrap_or(&[])
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().unwrap_or("").to_string(),
                var_value(v).as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// The node holding a variable's value: itself, or `value:` of the long form
/// `{value: "", one_of: [laboratory, imaging]}`.
fn var_value(v: &Node) -> &Node {
    match v.as_map() {
        Some(_) => v.get("value").unwrap_or(v),
        None => v,
    }
}

/// `Z` or a UTC offset `±HH:MM` (HH ≤ 14, MM ≤ 59), checked on bytes: any text, including
/// multi-byte characters (`±1:00`), gives an answer, never a panic.
fn valid_offset(t: &str) -> bool {
    if t == "Z" {
        return true;
    }
    let b = t.as_bytes();
    if b.len() != 6 || !matches!(b[0], b'+' | b'-') || b[3] != b':' {
        return false;
    }
    let two = |x: u8, y: u8| {
        (x.is_ascii_digit() && y.is_ascii_digit()).then(|| (x - b'0') * 10 + (y - b'0'))
    };
    matches!((two(b[1], b[2]), two(b[4], b[5])), (Some(hh), Some(mm)) if hh <= 14 && mm <= 59)
}

/// Every Period in a constant of FHIR type `ty` whose `start` is after its `end`, by path.
fn periods_out_of_order(ty: &str, v: &Value, path: &str, out: &mut Vec<String>) {
    match v {
        Value::Array(items) => {
            for item in items {
                periods_out_of_order(ty, item, path, out);
            }
        }
        Value::Object(o) if ty == "Period" => {
            let text = |k| o.get(k).and_then(Value::as_str);
            if let (Some(start), Some(end)) = (text("start"), text("end")) {
                if crate::datetime::period_start_after_end(start, end) == Some(true) {
                    out.push(path.to_string());
                }
            }
        }
        Value::Object(o) => {
            for (k, child) in o {
                if let Some(e) = fhir::element(ty, k) {
                    periods_out_of_order(e.ty, child, &format!("{path}.{k}"), out);
                }
            }
        }
        _ => {}
    }
}

/// A map that uses itself through `map:`/`create:` (directly or through others) would recurse
/// until the stack overflows at run time: every rule that closes such a cycle is a load error.
fn check_cycles(c: &mut Compiler) {
    fn uses(rules: &[Rule], out: &mut Vec<(usize, RuleLoc, &'static str)>) {
        for r in rules {
            match &r.kind {
                RuleKind::Map(j) => out.push((*j, r.loc.clone(), "map")),
                RuleKind::Create(j, _) => out.push((*j, r.loc.clone(), "create")),
                RuleKind::Nested(n) => uses(n, out),
                _ => {}
            }
        }
    }
    let edges: Vec<Vec<(usize, RuleLoc, &'static str)>> = c
        .maps
        .iter()
        .map(|m| {
            let mut out = Vec::new();
            uses(&m.compiled.rules, &mut out);
            out
        })
        .collect();
    // iterative depth-first search; 0 = unseen, 1 = on the current path, 2 = done
    let mut state = vec![0u8; edges.len()];
    let mut errors = Vec::new();
    for root in 0..edges.len() {
        if state[root] != 0 {
            continue;
        }
        let mut path: Vec<(usize, usize)> = vec![(root, 0)];
        state[root] = 1;
        while let Some(&mut (m, ref mut next)) = path.last_mut() {
            let Some((j, loc, kind)) = edges[m].get(*next) else {
                state[m] = 2;
                path.pop();
                continue;
            };
            *next += 1;
            match state[*j] {
                0 => {
                    state[*j] = 1;
                    path.push((*j, 0));
                }
                1 => {
                    let start = path.iter().position(|(p, _)| p == j).unwrap_or(0);
                    let names: Vec<&str> = path[start..]
                        .iter()
                        .map(|(p, _)| c.maps[*p].compiled.name.as_str())
                        .chain(std::iter::once(c.maps[*j].compiled.name.as_str()))
                        .collect();
                    errors.push(LoadError {
                        file: loc.file.to_string(),
                        line: loc.line,
                        col: loc.col,
                        message: format!(
                            "`{kind}: {}` makes a cycle ({}): a map may not use itself, \
                             directly or through other maps",
                            c.maps[*j].compiled.name,
                            names.join(" → ")
                        ),
                    });
                }
                _ => {}
            }
        }
    }
    c.errors.extend(errors);
}

/// Sets `holds_period_end` on every `map:`/`rules:` rule whose object has, at any depth, a rule
/// filling a Period's `end` (datatype maps may use each other: iterated to a fixed point).
fn mark_period_rules(maps: &mut [MapSlot]) {
    fn holds(rule: &Rule, maps: &[bool]) -> bool {
        rule.period_end
            || match &rule.kind {
                RuleKind::Map(i) => maps.get(*i).copied().unwrap_or(false),
                RuleKind::Nested(rules) => rules.iter().any(|r| holds(r, maps)),
                _ => false,
            }
    }
    fn mark(rules: &mut [Rule], maps: &[bool]) {
        for r in rules {
            if let RuleKind::Nested(inner) = &mut r.kind {
                mark(inner, maps);
            }
            r.holds_period_end = matches!(r.kind, RuleKind::Map(_) | RuleKind::Nested(_))
                && holds(r, maps)
                && !r.period_end;
        }
    }
    let mut flags = vec![false; maps.len()];
    loop {
        let mut changed = false;
        for (i, m) in maps.iter().enumerate() {
            if !flags[i] && m.compiled.rules.iter().any(|r| holds(r, &flags)) {
                flags[i] = true;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    for m in maps.iter_mut() {
        mark(&mut m.compiled.rules, &flags);
    }
}

fn hash_texts(texts: &[(PathBuf, String)]) -> String {
    let mut hasher = Sha256::new();
    for (rel, text) in texts {
        hasher.update(rel.to_string_lossy().as_bytes());
        hasher.update([0]);
        hasher.update(text.as_bytes());
        hasher.update([0]);
    }
    hex::encode(&hasher.finalize()[..8])
}

fn read_texts(dir: &Path) -> Result<Vec<(PathBuf, String)>, LoadErrors> {
    let mut files = Vec::new();
    collect_yaml(dir, dir, &mut files).map_err(|e| {
        LoadErrors(vec![LoadError {
            file: dir.display().to_string(),
            line: 0,
            col: 0,
            message: format!("cannot read mapping directory: {e}"),
        }])
    })?;
    files.sort();
    let mut texts = Vec::new();
    for rel in files {
        let full = dir.join(&rel);
        match std::fs::read_to_string(&full) {
            Ok(t) => texts.push((rel, t)),
            Err(e) => {
                return Err(LoadErrors(vec![LoadError {
                    file: full.display().to_string(),
                    line: 0,
                    col: 0,
                    message: format!("cannot read: {e}"),
                }]))
            }
        }
    }
    Ok(texts)
}

fn collect_yaml(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let p = entry.path();
        if entry.file_type()?.is_dir() {
            if p.file_name().is_some_and(|n| n == "schema") {
                continue;
            }
            collect_yaml(root, &p, out)?;
        } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(p.strip_prefix(root).unwrap_or(&p).to_path_buf());
        }
    }
    Ok(())
}

fn find_fixtures(
    messages: &[MessageMap],
    feeds: &BTreeMap<String, BTreeMap<String, String>>,
) -> Vec<Fixture> {
    let mut out = Vec::new();
    for m in messages {
        let file = PathBuf::from(m.file.as_ref());
        let Some(dir) = file.parent() else { continue };
        let Ok(rd) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut inputs: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().is_some_and(|e| e == "hl7")
                    && p.file_name().is_some_and(|n| {
                        let n = n.to_string_lossy();
                        n == format!("{}.hl7", m.name) || n.starts_with(&format!("{}.", m.name))
                    })
            })
            .collect();
        inputs.sort();
        for input in inputs {
            let stem = input
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            let feed = stem
                .strip_prefix(&format!("{}.", m.name))
                .filter(|variant| feeds.contains_key(*variant))
                .map(str::to_string);
            out.push(Fixture {
                message_map: file.clone(),
                expected: input.with_file_name(format!("{stem}.expected.json")),
                input,
                feed,
            });
        }
    }
    out
}

struct MapSlot {
    node: Node,
    compiled: CompiledMap,
    produces: &'static str,
    /// Resource names the map's rules refer to (`ref:`), checked against each message map.
    refs: Vec<(String, Pos)>,
}

#[derive(Default)]
struct Compiler {
    /// Nesting depth inside rules with a `when:` (their `ref:`s may name optional resources).
    conditional: usize,
    errors: Vec<LoadError>,
    maps: Vec<MapSlot>,
    by_name: HashMap<String, usize>,
    /// Variables the `when:` of the message map being compiled reads, with their positions.
    entry_vars: Vec<(String, Pos)>,
    /// `vars:` of mapping-set.yaml: every message map's defaults.
    set_vars: BTreeMap<String, String>,
    /// The values a variable may take, where its declaration lists them (`one_of:`).
    var_choices: BTreeMap<String, Vec<String>>,
    /// Variables declared `format: uri`: a value must be an absolute URI.
    uri_vars: std::collections::BTreeSet<String>,
    /// The `set:` paths of the nested rules being compiled, outermost first.
    set_path: Vec<String>,
    /// Per `set` path and created map, how many `create:` rules of the map being compiled
    /// have them so far.
    creates_seen: HashMap<String, u32>,
}

const RULE_KEYS: &[&str] = &[
    "set",
    "from",
    "value",
    "var",
    "map",
    "rules",
    "translate",
    "default",
    "ref",
    "create",
    "when",
    "transform",
    "prefix",
    "join",
    "on_error",
    "note",
];

impl Compiler {
    fn err(&mut self, file: &Arc<str>, pos: Pos, message: String) {
        self.errors.push(LoadError {
            file: file.to_string(),
            line: pos.line,
            col: pos.col,
            message,
        });
    }

    fn check_keys(&mut self, file: &Arc<str>, node: &Node, allowed: &[&str]) {
        let Some(entries) = node.as_map() else { return };
        for (k, _) in entries {
            let key = k.as_str().unwrap_or("");
            if !allowed.contains(&key) {
                let hint = fhir::closest(key, allowed.iter().copied())
                    .map(|s| format!(" — did you mean `{s}`?"))
                    .unwrap_or_default();
                self.err(
                    file,
                    k.pos,
                    format!(
                        "unknown key `{key}`{hint} (allowed: {})",
                        allowed.join(", ")
                    ),
                );
            }
        }
    }

    fn header(&mut self, file: &Arc<str>, name: String, node: Node) {
        let (produces, kind) = if let Some(dt) = node.get("datatype") {
            self.check_keys(file, &node, &["datatype", "to", "description", "rules"]);
            let _ = dt;
            let to = node.get("to");
            let ty = to.and_then(Node::as_str).unwrap_or("");
            let Some(static_ty) = intern_type(ty) else {
                let hint = fhir::suggest_type(ty)
                    .map(|s| format!(" — did you mean `{s}`?"))
                    .unwrap_or_default();
                self.err(
                    file,
                    to.map_or(node.pos, |n| n.pos),
                    format!("`to:` must name a FHIR R4 datatype, found `{ty}`{hint}"),
                );
                return;
            };
            (static_ty, MapKind::Datatype)
        } else {
            self.check_keys(
                file,
                &node,
                &["resource", "segment", "id", "write", "description", "rules"],
            );
            let r = node.get("resource");
            let ty = r.and_then(Node::as_str).unwrap_or("");
            let Some(static_ty) = intern_type(ty).filter(|t| fhir::is_resource(t)) else {
                let hint = fhir::suggest_type(ty)
                    .map(|s| format!(" — did you mean `{s}`?"))
                    .unwrap_or_default();
                self.err(
                    file,
                    r.map_or(node.pos, |n| n.pos),
                    format!("`resource:` must name a FHIR R4 resource type, found `{ty}`{hint}"),
                );
                return;
            };
            let segment = node
                .get("segment")
                .and_then(Node::as_str)
                .map(str::to_string);
            let created = match node.get("write") {
                None => Write::Replace,
                Some(w) => match w.as_str().and_then(Write::parse) {
                    Some(write @ (Write::Replace | Write::Merge)) => write,
                    _ => {
                        self.err(
                            file,
                            w.pos,
                            format!(
                                "a resource map's `write:` (for the resources `create:` makes from it) is `replace` (the default: each takes the stored one's place) or `merge` (its elements go into the stored one, lists gaining what they lack), found `{}`",
                                w.as_str().unwrap_or("")
                            ),
                        );
                        Write::Replace
                    }
                },
            };
            (
                static_ty,
                MapKind::Resource {
                    resource: static_ty,
                    segment,
                    id: Vec::new(),
                    created,
                },
            )
        };
        if let Some(&prev) = self.by_name.get(&name) {
            let prev_file = self.maps[prev].compiled.file.clone();
            self.err(
                file,
                node.pos,
                format!("a map named `{name}` is already defined in {prev_file}"),
            );
            return;
        }
        self.by_name.insert(name.clone(), self.maps.len());
        self.maps.push(MapSlot {
            compiled: CompiledMap {
                name,
                file: file.clone(),
                kind,
                rules: Vec::new(),
            },
            node,
            produces,
            refs: Vec::new(),
        });
    }

    fn compile_map(&mut self, i: usize) {
        self.creates_seen.clear();
        let node = self.maps[i].node.clone();
        let file = self.maps[i].compiled.file.clone();
        let owner = self.maps[i].produces;
        let context_seg = match &self.maps[i].compiled.kind {
            MapKind::Resource { segment, .. } => segment.clone(),
            MapKind::Datatype => None,
        };
        if let Some(seg) = &context_seg {
            if seg.len() != 3 || !seg.bytes().all(|b| b.is_ascii_alphanumeric()) {
                let pos = node.get("segment").map_or(node.pos, |n| n.pos);
                self.err(
                    &file,
                    pos,
                    format!("`segment:` must be a segment id like PID, found `{seg}`"),
                );
            }
        }
        if let MapKind::Resource { .. } = self.maps[i].compiled.kind {
            let mut parts = Vec::new();
            if let Some(idn) = node.get("id") {
                let items: Vec<&Node> = match idn.as_seq() {
                    Some(s) => s.iter().collect(),
                    None => vec![idn],
                };
                for it in items {
                    if let Some(alternatives) = it.as_seq() {
                        let mut paths = Vec::new();
                        for alt in alternatives {
                            let t = alt.as_str().unwrap_or("");
                            match path::parse(t) {
                                Ok(p) => {
                                    self.check_source(&file, alt.pos, &p, None);
                                    paths.push(p);
                                }
                                Err(e) => self.err(&file, alt.pos, format!("id part: {e}")),
                            }
                        }
                        parts.push(IdPart::FirstOf(paths));
                        continue;
                    }
                    let t = it.as_str().unwrap_or("");
                    if path::looks_like_path(t) {
                        match path::parse(t) {
                            Ok(p) => {
                                self.check_source(&file, it.pos, &p, None);
                                parts.push(IdPart::FirstOf(vec![p]))
                            }
                            Err(e) => self.err(&file, it.pos, format!("id part: {e}")),
                        }
                    } else {
                        parts.push(IdPart::Const(t.to_string()));
                    }
                }
            }
            if let MapKind::Resource { id, .. } = &mut self.maps[i].compiled.kind {
                *id = parts;
            }
        }
        let mut refs = Vec::new();
        let rules = match node.get("rules") {
            None => Vec::new(),
            Some(r) => self.rules(&file, r, owner, &mut refs),
        };
        self.maps[i].compiled.rules = rules;
        self.maps[i].refs = refs;
    }

    fn rules(
        &mut self,
        file: &Arc<str>,
        node: &Node,
        owner: &'static str,
        refs: &mut Vec<(String, Pos)>,
    ) -> Vec<Rule> {
        let Some(items) = node.as_seq() else {
            self.err(
                file,
                node.pos,
                "`rules:` is a list of rules (`- set: …`)".into(),
            );
            return Vec::new();
        };
        items
            .iter()
            .filter_map(|r| self.rule(file, r, owner, refs))
            .collect()
    }

    fn rule(
        &mut self,
        file: &Arc<str>,
        node: &Node,
        owner: &'static str,
        refs: &mut Vec<(String, Pos)>,
    ) -> Option<Rule> {
        if node.as_map().is_none() {
            self.err(
                file,
                node.pos,
                "a rule is a map with at least `set:`".into(),
            );
            return None;
        }
        self.check_keys(file, node, RULE_KEYS);
        let loc = RuleLoc {
            file: file.clone(),
            line: node.pos.line,
            col: node.pos.col,
        };
        let Some(set_node) = node.get("set") else {
            self.err(
                file,
                node.pos,
                "rule has no `set:` (the FHIR element it fills)".into(),
            );
            return None;
        };
        let set = set_node.as_str().unwrap_or("").to_string();
        let target = self.target(file, set_node.pos, owner, &set)?;
        let last = target.last()?.clone();
        let last_owner = match target.len() {
            1 => owner,
            n => target[n - 2].ty,
        };
        let period_end = last_owner == "Period" && last.name == "end";
        let mut from = Vec::new();
        if let Some(f) = node.get("from") {
            let items: Vec<&Node> = match f.as_seq() {
                Some(s) => s.iter().collect(),
                None => vec![f],
            };
            for it in items {
                match path::parse(it.as_str().unwrap_or("")) {
                    Ok(p) => {
                        self.check_source(file, it.pos, &p, None);
                        from.push(p)
                    }
                    Err(e) => self.err(file, it.pos, e),
                }
            }
        }
        let when = node.get("when").and_then(|w| {
            let text = w.as_str().unwrap_or("");
            match cond::parse(text) {
                Ok(c) => {
                    let mut ps = Vec::new();
                    c.paths(&mut ps);
                    for p in ps {
                        self.check_source(file, w.pos, &p, None);
                    }
                    Some(c)
                }
                Err((at, msg)) => {
                    let pos = Pos {
                        line: w.pos.line,
                        col: w.pos.col
                            + at
                            + usize::from(matches!(w.kind, YKind::Scalar { quoted: true, .. })),
                    };
                    self.err(file, pos, format!("condition: {msg}"));
                    None
                }
            }
        });
        let mut transforms = Vec::new();
        if let Some(t) = node.get("transform") {
            let items: Vec<&Node> = match t.as_seq() {
                Some(s) => s.iter().collect(),
                None => vec![t],
            };
            for it in items {
                match it.as_str().unwrap_or("") {
                    "upper" => transforms.push(Transform::Upper),
                    "lower" => transforms.push(Transform::Lower),
                    "trim" => transforms.push(Transform::Trim),
                    "uri" => transforms.push(Transform::Uri),
                    "base64" => transforms.push(Transform::Base64),
                    "xhtml" => transforms.push(Transform::Xhtml),
                    "comparator" => transforms.push(Transform::Comparator),
                    "endpoint" => transforms.push(Transform::Endpoint),
                    "strip_comparator" => transforms.push(Transform::StripComparator),
                    other => self.err(file, it.pos, format!(
                        "unknown transform `{other}` (allowed: upper, lower, trim, uri, endpoint, base64, xhtml, comparator, strip_comparator; use `prefix:` to prepend text)")),
                }
            }
        }
        if let Some(p) = node.get("prefix") {
            transforms.push(Transform::Prefix(p.as_str().unwrap_or("").to_string()));
        }
        let kinds: Vec<&str> = ["value", "var", "map", "rules", "translate", "ref", "create"]
            .into_iter()
            .filter(|k| node.get(k).is_some())
            .collect();
        if kinds.len() > 1 {
            self.err(
                file,
                node.pos,
                format!(
                    "a rule takes one of value/var/map/rules/translate/ref/create, this one has {}",
                    kinds.join(" and ")
                ),
            );
            return None;
        }
        let prim = Prim::for_type(last.ty);
        let kind = match kinds.first().copied() {
            Some("value") => {
                let v = node.get("value")?;
                let value = self.constant(file, v, last.ty)?;
                let mut bad = Vec::new();
                periods_out_of_order(last.ty, &value, &set, &mut bad);
                for at in bad {
                    self.err(
                        file,
                        v.pos,
                        format!("constant Period `{at}` starts after it ends (FHIR R4 per-1)"),
                    );
                }
                RuleKind::Const(Arc::new(Constant::new(value)))
            }
            Some("var") => {
                let Some(p) = prim else {
                    self.err(
                        file,
                        set_node.pos,
                        format!("`var:` fills a primitive element; `{set}` is a {}", last.ty),
                    );
                    return None;
                };
                RuleKind::Var(
                    node.get("var")?
                        .as_str()
                        .unwrap_or("")
                        .trim_start_matches('$')
                        .to_string(),
                    p,
                )
            }
            Some("map") => {
                let m = node.get("map")?;
                let name = m.as_str().unwrap_or("");
                let idx = self.lookup_map(file, m.pos, name)?;
                let produces = self.maps[idx].produces;
                if matches!(self.maps[idx].compiled.kind, MapKind::Resource { .. }) {
                    self.err(file, m.pos, format!("`{name}` is a resource map: use `create: {name}` to make a resource and reference it"));
                    return None;
                }
                if produces != last.ty {
                    self.err(
                        file,
                        m.pos,
                        format!(
                            "datatype map `{name}` produces {produces}, but `{set}` is a {}",
                            last.ty
                        ),
                    );
                    return None;
                }
                self.check_map_datatype(file, m.pos, &from, name);
                RuleKind::Map(idx)
            }
            Some("rules") => {
                if prim.is_some() {
                    self.err(
                        file,
                        set_node.pos,
                        format!(
                            "nested `rules:` build an object; `{set}` is a primitive {}",
                            last.ty
                        ),
                    );
                    return None;
                }
                let cond = usize::from(node.get("when").is_some());
                self.conditional += cond;
                self.set_path.push(set.clone());
                let nested = self.rules(file, node.get("rules")?, last.ty, refs);
                self.set_path.pop();
                self.conditional -= cond;
                RuleKind::Nested(nested)
            }
            Some("translate") => {
                let out = match last.ty {
                    "Coding" => TransOut::Coding,
                    "CodeableConcept" => TransOut::CodeableConcept,
                    t if Prim::for_type(t).is_some() => TransOut::Code,
                    t => {
                        self.err(file, set_node.pos, format!("`translate:` fills a code, Coding or CodeableConcept; `{set}` is a {t}"));
                        return None;
                    }
                };
                let map = node.get("translate")?.as_str().unwrap_or("").to_string();
                if tributary_terminology::builtin().map(&map).is_none() {
                    let names = tributary_terminology::builtin().names();
                    let hint = fhir::closest(&map, names.iter().map(String::as_str))
                        .map(|s| format!(" — did you mean `{s}`?"))
                        .unwrap_or_default();
                    self.err(
                        file,
                        node.get("translate")?.pos,
                        format!("unknown ConceptMap `{map}`{hint}"),
                    );
                }
                RuleKind::Translate {
                    map,
                    out,
                    default: node
                        .get("default")
                        .and_then(Node::as_str)
                        .map(str::to_string),
                }
            }
            Some("ref") => {
                if last.ty != "Reference" {
                    self.err(
                        file,
                        set_node.pos,
                        format!("`ref:` fills a Reference; `{set}` is a {}", last.ty),
                    );
                    return None;
                }
                let r = node.get("ref")?;
                let name = r.as_str().unwrap_or("").to_string();
                if node.get("when").is_none() && self.conditional == 0 {
                    refs.push((name.clone(), r.pos));
                }
                RuleKind::Ref(name)
            }
            Some("create") => {
                if last.ty != "Reference" {
                    self.err(
                        file,
                        set_node.pos,
                        format!(
                            "`create:` makes a resource and fills a Reference; `{set}` is a {}",
                            last.ty
                        ),
                    );
                    return None;
                }
                let m = node.get("create")?;
                let name = m.as_str().unwrap_or("");
                let idx = self.lookup_map(file, m.pos, name)?;
                if !matches!(self.maps[idx].compiled.kind, MapKind::Resource { .. }) {
                    self.err(
                        file,
                        m.pos,
                        format!("`{name}` is a datatype map: use `map: {name}`"),
                    );
                    return None;
                }
                let path: Vec<&str> = self
                    .set_path
                    .iter()
                    .map(String::as_str)
                    .chain([set.as_str()])
                    .collect();
                let place = format!("{}>{name}", path.join("."));
                let n = self.creates_seen.entry(place.clone()).or_insert(0);
                *n += 1;
                RuleKind::Create(idx, format!("{place}#{n}").into())
            }
            _ => match prim {
                Some(p) => {
                    if from.is_empty() && node.get("from").is_none() {
                        self.err(
                            file,
                            node.pos,
                            format!("rule for `{set}` needs `from:` (a source path) or `value:`"),
                        );
                        return None;
                    }
                    RuleKind::Prim(p)
                }
                None => {
                    let hint = default_map_hint(last.ty);
                    self.err(file, set_node.pos, format!(
                        "`{set}` is a {}; say how to build it with `map:` (a datatype map){hint}, `rules:` or `value:`", last.ty));
                    return None;
                }
            },
        };
        let many = target.iter().any(|s| s.many) || node.get("join").is_some();
        for p in &from {
            if p.rep == Rep::All && !many {
                self.err(file, node.get("from").map_or(node.pos, |n| n.pos), format!(
                    "`{}` selects every repetition but `{set}` holds one value: use `[1]` or no index", p.text));
            }
        }
        let join = node
            .get("join")
            .map(|j| j.as_str().unwrap_or("").to_string());
        if join.is_some() && !matches!(kind, RuleKind::Prim(_)) {
            self.err(file, node.get("join").map_or(node.pos, |n| n.pos),
                "`join:` combines text into one primitive value; it cannot be used with value/map/rules/translate/ref/create".into());
        }
        let on_error = node.get("on_error").and_then(|n| match n.as_str() {
            Some("fail") => Some(OnError::Fail),
            Some("warn") => Some(OnError::Warn),
            other => {
                self.err(
                    file,
                    n.pos,
                    format!(
                        "on_error is `fail` or `warn`, found `{}`",
                        other.unwrap_or("")
                    ),
                );
                None
            }
        });
        Some(Rule {
            loc,
            set,
            target,
            from,
            when,
            kind,
            transforms,
            many: last.many,
            join,
            on_error,
            period_end,
            holds_period_end: false,
        })
    }

    fn lookup_map(&mut self, file: &Arc<str>, pos: Pos, name: &str) -> Option<usize> {
        match self.by_name.get(name) {
            Some(&i) => Some(i),
            None => {
                let hint = fhir::closest(name, self.by_name.keys().map(String::as_str))
                    .map(|s| format!(" — did you mean `{s}`?"))
                    .unwrap_or_default();
                self.err(file, pos, format!("no map named `{name}`{hint}"));
                None
            }
        }
    }

    /// `map: XPN` on `PID-3` (a CX) is a mistake the segment table can catch.
    fn check_map_datatype(
        &mut self,
        file: &Arc<str>,
        pos: Pos,
        from: &[SourcePath],
        map_name: &str,
    ) {
        let Some(idx) = self.by_name.get(map_name).copied() else {
            return;
        };
        let Some(dt) = self.maps[idx]
            .node
            .get("datatype")
            .and_then(Node::as_str)
            .map(str::to_string)
        else {
            return;
        };
        for p in from {
            let (Some(seg), true) = (&p.segment, p.steps.is_empty()) else {
                continue;
            };
            if let Some(Some(ft)) = segments::field_type(seg, p.field) {
                if !segments::compatible(ft, &dt)
                    && !dt.split('|').any(|d| segments::compatible(ft, d))
                {
                    self.err(
                        file,
                        pos,
                        format!("{} is a {ft} field but map `{map_name}` reads {dt}", p.text),
                    );
                }
            }
        }
    }

    fn check_source(&mut self, file: &Arc<str>, pos: Pos, p: &SourcePath, _ctx: Option<&str>) {
        let Some(seg) = &p.segment else { return };
        if let Some(n) = segments::field_count(seg) {
            // later versions append fields; allow a margin but catch obvious typos
            if p.field > n + 10 {
                self.err(
                    file,
                    pos,
                    format!("{} does not exist: {seg} has {n} fields in v2.5.1", p.text),
                );
            }
        }
    }

    fn target(
        &mut self,
        file: &Arc<str>,
        pos: Pos,
        owner: &'static str,
        set: &str,
    ) -> Option<Vec<Step>> {
        let mut steps = Vec::new();
        let mut ty = owner;
        for name in set.split('.') {
            if let Some(why) = store_owned(ty, name) {
                self.err(file, pos, why);
                return None;
            }
            match fhir::element(ty, name) {
                Some(e) => {
                    let static_name = intern_element(ty, name)?;
                    steps.push(Step {
                        name: static_name,
                        ty: e.ty,
                        many: e.many,
                    });
                    ty = e.ty;
                }
                None => {
                    let hint = if name.contains("[x]") {
                        " — write the typed name, e.g. valueQuantity or valueString".to_string()
                    } else {
                        fhir::suggest_element(ty, name)
                            .map(|s| format!(" — did you mean `{s}`?"))
                            .unwrap_or_default()
                    };
                    self.err(
                        file,
                        pos,
                        format!("`{name}` is not an element of FHIR R4 {ty}{hint}"),
                    );
                    return None;
                }
            }
        }
        if steps.is_empty() {
            self.err(file, pos, "empty `set:`".into());
            return None;
        }
        Some(steps)
    }

    /// A constant, converted by the target's FHIR type (maps are checked element by element).
    fn constant(&mut self, file: &Arc<str>, node: &Node, ty: &'static str) -> Option<Value> {
        let value = self.constant_value(file, node, ty)?;
        if let (YKind::Scalar { text, .. }, Err(need)) = (
            &node.kind,
            tributary_core::fhir_primitive::check(ty, &value),
        ) {
            if Prim::for_type(ty).is_some() {
                self.err(
                    file,
                    node.pos,
                    format!("`{text}` is not a FHIR R4 {ty}: {need}"),
                );
                return None;
            }
        }
        Some(value)
    }

    fn constant_value(&mut self, file: &Arc<str>, node: &Node, ty: &'static str) -> Option<Value> {
        match &node.kind {
            YKind::Scalar { text, .. } => match Prim::for_type(ty) {
                Some(Prim::Boolean) => match text.as_str() {
                    "true" => Some(Value::Bool(true)),
                    "false" => Some(Value::Bool(false)),
                    _ => {
                        self.err(
                            file,
                            node.pos,
                            format!("a boolean is true or false, found `{text}`"),
                        );
                        None
                    }
                },
                Some(Prim::Decimal) | Some(Prim::Integer) => {
                    match text.parse::<serde_json::Number>() {
                        Ok(n) => Some(Value::Number(n)),
                        Err(_) => {
                            self.err(
                                file,
                                node.pos,
                                format!("expected a number for {ty}, found `{text}`"),
                            );
                            None
                        }
                    }
                }
                Some(_) => Some(Value::String(text.clone())),
                None => {
                    self.err(
                        file,
                        node.pos,
                        format!("a {ty} is an object: write its elements as a map"),
                    );
                    None
                }
            },
            YKind::Map(entries) => {
                if Prim::for_type(ty).is_some() {
                    self.err(
                        file,
                        node.pos,
                        format!("a {ty} is a single value, not a map"),
                    );
                    return None;
                }
                let mut obj = Map::new();
                for (k, v) in entries {
                    let key = k.as_str().unwrap_or("");
                    if let Some(why) = store_owned(ty, key) {
                        self.err(file, k.pos, why);
                        continue;
                    }
                    let Some(e) = fhir::element(ty, key) else {
                        let hint = fhir::suggest_element(ty, key)
                            .map(|s| format!(" — did you mean `{s}`?"))
                            .unwrap_or_default();
                        self.err(
                            file,
                            k.pos,
                            format!("`{key}` is not an element of FHIR R4 {ty}{hint}"),
                        );
                        continue;
                    };
                    let val = if e.many {
                        match v.as_seq() {
                            Some(items) => Value::Array(
                                items
                                    .iter()
                                    .filter_map(|i| self.constant(file, i, e.ty))
                                    .collect(),
                            ),
                            None => {
                                Value::Array(self.constant(file, v, e.ty).into_iter().collect())
                            }
                        }
                    } else {
                        match self.constant(file, v, e.ty) {
                            Some(v) => v,
                            None => continue,
                        }
                    };
                    obj.insert(key.to_string(), val);
                }
                Some(Value::Object(obj))
            }
            YKind::Seq(_) => {
                self.err(
                    file,
                    node.pos,
                    "a list constant goes in a rule per item".into(),
                );
                None
            }
        }
    }

    fn ignore_list(&mut self, file: &Arc<str>, node: Option<&Node>) -> Vec<IgnorePattern> {
        let Some(node) = node else { return Vec::new() };
        let Some(items) = node.as_seq() else {
            self.err(
                file,
                node.pos,
                "`ignore:` is a list like [EVN, PID-19, MSH-7.2]".into(),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for it in items {
            match IgnorePattern::parse(it.as_str().unwrap_or("")) {
                Ok(p) => out.push(p),
                Err(e) => self.err(file, it.pos, e),
            }
        }
        out
    }

    fn message(&mut self, file: &Arc<str>, name: String, node: &Node) -> Option<MessageMap> {
        self.check_keys(
            file,
            node,
            &[
                "message",
                "description",
                "vars",
                "event_vars",
                "ignore",
                "resources",
            ],
        );
        let m = node.get("message")?;
        let items: Vec<&Node> = match m.as_seq() {
            Some(s) => s.iter().collect(),
            None => vec![m],
        };
        let mut matches = Vec::new();
        for it in items {
            let t = it.as_str().unwrap_or("");
            let ok = t.len() >= 5
                && t.split_once('^').is_some_and(|(a, b)| {
                    a.len() == 3
                        && !b.is_empty()
                        && a.bytes()
                            .chain(b.bytes())
                            .all(|c| c.is_ascii_alphanumeric())
                });
            if ok {
                matches.push(t.to_string());
            } else {
                self.err(
                    file,
                    it.pos,
                    format!("`message:` entries are TYPE^EVENT like ADT^A01, found `{t}`"),
                );
            }
        }
        let mut vars = self.set_vars.clone();
        self.declare_vars(file, node.get("vars"), "`vars:`");
        vars.extend(vars_of(node.get("vars")));
        // `event_vars:` — per trigger event of `message:`, the vars whose values differ from
        // `vars:` (a cancellation's status); each must be a var `vars:` defines, so every
        // event of the map has a value for it
        let mut vars_by_event = BTreeMap::new();
        let mut event_vars = BTreeMap::new();
        if let Some(ev) = node.get("event_vars") {
            for (event, over) in ev.as_map().unwrap_or(&[]) {
                let name = event.as_str().unwrap_or("");
                if !matches.iter().any(|m| m == name) {
                    self.err(
                        file,
                        event.pos,
                        format!(
                            "`event_vars:` names `{name}`, which is not in this map's `message:` ({})",
                            matches.join(", ")
                        ),
                    );
                    continue;
                }
                self.check_var_values(file, Some(over), &format!("`event_vars:` of `{name}`"));
                let mut merged = vars.clone();
                let own: &mut BTreeMap<String, String> =
                    event_vars.entry(name.to_string()).or_default();
                for (k, val) in over.as_map().unwrap_or(&[]) {
                    let k = k.as_str().unwrap_or("").to_string();
                    if !vars.contains_key(&k) {
                        self.err(
                            file,
                            over.pos,
                            format!(
                                "`event_vars:` of `{name}` sets `{k}`, which `vars:` does not define (it gives the other events their value)"
                            ),
                        );
                    }
                    let val = val.as_str().unwrap_or("").to_string();
                    own.insert(k.clone(), val.clone());
                    merged.insert(k, val);
                }
                vars_by_event.insert(name.to_string(), merged);
            }
        }
        let ignore = self.ignore_list(file, node.get("ignore"));
        let mut names: Vec<String> = Vec::new();
        let entries = match node.get("resources") {
            Some(r) => self.entries(file, r, &mut names),
            None => {
                self.err(file, node.pos, "message map has no `resources:`".into());
                Vec::new()
            }
        };
        // every `ref:` in a used map must name a resource this message map names
        let mut used = Vec::new();
        collect_used(&entries, &mut used);
        let mut checked = std::collections::HashSet::new();
        while let Some(i) = used.pop() {
            if !checked.insert(i) {
                continue;
            }
            for (r, pos) in self.maps[i].refs.clone() {
                if !names.contains(&r) {
                    let f = self.maps[i].compiled.file.clone();
                    let hint = fhir::closest(&r, names.iter().map(String::as_str))
                        .map(|s| format!(" — did you mean `{s}`?"))
                        .unwrap_or_default();
                    self.err(&f, pos, format!(
                        "`ref: {r}` names no resource of message map {file} (it names: {}){hint}", names.join(", ")));
                }
            }
            collect_creates(&self.maps[i].compiled.rules, &mut used);
        }
        let mut uses = self.var_uses(&entries);
        uses.extend(
            std::mem::take(&mut self.entry_vars)
                .into_iter()
                .map(|(k, pos)| (k, file.clone(), pos)),
        );
        for (k, at, pos) in uses {
            if !vars.contains_key(&k) {
                self.err(
                    &at,
                    pos,
                    format!("`${k}` is not defined under `vars:` of message map {file}"),
                );
            }
        }
        Some(MessageMap {
            name,
            file: file.clone(),
            matches,
            vars,
            vars_by_event,
            event_vars,
            ignore,
            entries,
        })
    }

    /// Records the values of each variable a `vars:` map declares in the long form
    /// (`name: {value: …, one_of: […]}`), then checks every value it gives.
    fn declare_vars(&mut self, file: &Arc<str>, node: Option<&Node>, whose: &str) {
        for (key, v) in node.and_then(Node::as_map).unwrap_or(&[]) {
            if v.as_map().is_none() {
                continue;
            }
            self.check_keys(file, v, &["value", "one_of", "format", "description"]);
            let name = key.as_str().unwrap_or("").to_string();
            if let Some(f) = v.get("format") {
                if f.as_str() == Some("uri") {
                    self.uri_vars.insert(name.clone());
                } else {
                    self.err(
                        file,
                        f.pos,
                        format!(
                            "`format:` of `{name}` can only be `uri` (an absolute URI such as urn:oid:1.2.3 or https://…), found `{}`",
                            f.as_str().unwrap_or("")
                        ),
                    );
                }
            }
            let Some(list) = v.get("one_of") else {
                continue;
            };
            let values: Vec<String> = list
                .as_seq()
                .unwrap_or(&[])
                .iter()
                .filter_map(|n| n.as_str().map(str::to_string))
                .filter(|t| !t.is_empty())
                .collect();
            if values.is_empty() || list.as_seq().is_some_and(|l| l.len() != values.len()) {
                self.err(
                    file,
                    list.pos,
                    format!("`one_of:` of `{name}` is a list of the values it may take, e.g. [laboratory, imaging] (the empty value, none, is always allowed)"),
                );
                continue;
            }
            let known = self.var_choices.entry(name).or_default();
            for t in values {
                if !known.contains(&t) {
                    known.push(t);
                }
            }
        }
        self.check_var_values(file, node, whose);
    }

    /// Every value a `vars:`-like map gives must be one its variable's `one_of:` lists (or
    /// empty): a misspelt `labratory` would otherwise be written into every result of a feed.
    fn check_var_values(&mut self, file: &Arc<str>, node: Option<&Node>, whose: &str) {
        for (key, v) in node.and_then(Node::as_map).unwrap_or(&[]) {
            let name = key.as_str().unwrap_or("");
            let at = var_value(v);
            let value = at.as_str().unwrap_or("");
            if value.is_empty() {
                continue;
            }
            if self.uri_vars.contains(name) && !cond::is_absolute_uri(value) {
                self.err(
                    file,
                    at.pos,
                    format!("{whose} sets `{name}` to `{value}`, which is not an absolute URI (urn:oid:2.16.840.1.113883.3.9999, https://example.org/ids, …)"),
                );
                continue;
            }
            let Some(choices) = self.var_choices.get(name) else {
                continue;
            };
            if choices.iter().any(|c| c == value) {
                continue;
            }
            let hint = fhir::closest(value, choices.iter().map(String::as_str))
                .map(|s| format!(" — did you mean `{s}`?"))
                .unwrap_or_default();
            let list = choices.join(", ");
            self.err(
                file,
                at.pos,
                format!("{whose} sets `{name}` to `{value}`, which is not one of its values ({list}, or empty for none){hint}"),
            );
        }
    }

    /// `feeds:` of mapping-set.yaml: `<feed>: {vars: {name: value}}`, each name a variable the
    /// set's or a message map's `vars:` defines (a typo would otherwise never take effect).
    fn feeds(
        &mut self,
        file: &Arc<str>,
        node: Option<&Node>,
        messages: &[MessageMap],
    ) -> BTreeMap<String, BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        let Some(node) = node else {
            return out;
        };
        let Some(feeds) = node.as_map() else {
            self.err(file, node.pos, "`feeds:` maps a feed (the sending partner's id) to its settings, e.g. `lab-a: {vars: {result_category: laboratory}}`".into());
            return out;
        };
        for (feed, settings) in feeds {
            let name = feed.as_str().unwrap_or("").trim().to_string();
            if name.is_empty() {
                self.err(
                    file,
                    feed.pos,
                    "a feed name is the sending partner's id; found an empty one".into(),
                );
                continue;
            }
            self.check_keys(file, settings, &["vars"]);
            self.check_var_values(file, settings.get("vars"), &format!("feed `{name}`"));
            let vars = vars_of(settings.get("vars"));
            if let Some(v) = settings.get("vars") {
                for (key, _) in v.as_map().unwrap_or(&[]) {
                    let k = key.as_str().unwrap_or("");
                    let known = self.set_vars.contains_key(k)
                        || messages.iter().any(|m| m.vars.contains_key(k));
                    if !known {
                        let all = self
                            .set_vars
                            .keys()
                            .chain(messages.iter().flat_map(|m| m.vars.keys()))
                            .map(String::as_str);
                        let hint = fhir::closest(k, all)
                            .map(|s| format!(" — did you mean `{s}`?"))
                            .unwrap_or_default();
                        self.err(file, key.pos, format!(
                            "feed `{name}` sets `{k}`, which neither this file's `vars:` nor a message map's defines{hint}"));
                    }
                }
            }
            out.insert(name, vars);
        }
        out
    }

    /// Every variable the maps a message map uses read (`var:` and `$name` in `when:`), with
    /// the file and position of the rule that reads it.
    fn var_uses(&self, entries: &[Entry]) -> Vec<(String, Arc<str>, Pos)> {
        let mut used = Vec::new();
        collect_used(entries, &mut used);
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        while let Some(i) = used.pop() {
            if !seen.insert(i) {
                continue;
            }
            fn walk(rules: &[Rule], out: &mut Vec<(String, Arc<str>, Pos)>, used: &mut Vec<usize>) {
                for r in rules {
                    let at = Pos {
                        line: r.loc.line,
                        col: r.loc.col,
                    };
                    let mut names = Vec::new();
                    if let Some(c) = &r.when {
                        c.vars(&mut names);
                    }
                    match &r.kind {
                        RuleKind::Var(v, _) => names.push(v.clone()),
                        RuleKind::Nested(n) => walk(n, out, used),
                        RuleKind::Map(i) | RuleKind::Create(i, _) => used.push(*i),
                        _ => {}
                    }
                    out.extend(names.into_iter().map(|v| (v, r.loc.file.clone(), at)));
                }
            }
            walk(&self.maps[i].compiled.rules, &mut out, &mut used);
        }
        out
    }

    fn until(&mut self, file: &Arc<str>, it: &Node) -> Option<String> {
        let u = it.get("until")?;
        let s = u.as_str().unwrap_or("");
        if s.len() != 3 || !s.bytes().all(|b| b.is_ascii_alphanumeric()) {
            self.err(
                file,
                u.pos,
                format!("`until:` names a segment like ORC, found `{s}`"),
            );
            return None;
        }
        Some(s.to_string())
    }

    fn entries(&mut self, file: &Arc<str>, node: &Node, names: &mut Vec<String>) -> Vec<Entry> {
        let Some(items) = node.as_seq() else {
            self.err(file, node.pos, "`resources:` is a list".into());
            return Vec::new();
        };
        let mut out = Vec::new();
        for it in items {
            if let Some(g) = it.get("group") {
                self.check_keys(file, it, &["group", "with", "resources", "until", "note"]);
                let segment_list = |n: &Node| -> Vec<String> {
                    match n.as_seq() {
                        Some(s) => s
                            .iter()
                            .filter_map(|n| n.as_str().map(str::to_string))
                            .collect(),
                        None => n.as_str().map(|s| vec![s.to_string()]).unwrap_or_default(),
                    }
                };
                let start = segment_list(g);
                let with = it.get("with").map(segment_list).unwrap_or_default();
                for w in it.get("with").into_iter() {
                    let names = segment_list(w);
                    if names.is_empty()
                        || names
                            .iter()
                            .any(|n| n.len() != 3 || !n.bytes().all(|c| c.is_ascii_alphanumeric()))
                    {
                        self.err(
                            file,
                            w.pos,
                            "`with:` names the segments a group holds after its start, e.g. [NTE]"
                                .into(),
                        );
                    }
                }
                if start.is_empty() {
                    self.err(
                        file,
                        g.pos,
                        "`group:` names the segment(s) that start a group, e.g. [ORC, OBR]".into(),
                    );
                }
                let entries = match it.get("resources") {
                    Some(r) => self.entries(file, r, names),
                    None => Vec::new(),
                };
                let until = self.until(file, it);
                out.push(Entry::Group {
                    start,
                    with,
                    entries,
                    until,
                });
                continue;
            }
            self.check_keys(
                file,
                it,
                &["name", "segment", "map", "when", "until", "write", "note"],
            );
            let Some(mn) = it.get("map") else {
                self.err(
                    file,
                    it.pos,
                    "a resources entry needs `map:` (a resource map) or `group:`".into(),
                );
                continue;
            };
            let Some(map) = self.lookup_map(file, mn.pos, mn.as_str().unwrap_or("")) else {
                continue;
            };
            if !matches!(self.maps[map].compiled.kind, MapKind::Resource { .. }) {
                self.err(file, mn.pos, "message maps list resource maps; a datatype map is used from a rule with `map:`".into());
                continue;
            }
            let segment = it.get("segment").and_then(Node::as_str).map(str::to_string);
            if let (
                Some(s),
                MapKind::Resource {
                    segment: Some(ms), ..
                },
            ) = (&segment, &self.maps[map].compiled.kind)
            {
                if s != ms {
                    self.err(
                        file,
                        it.get("segment").map_or(it.pos, |n| n.pos),
                        format!(
                            "map `{}` is written for {ms} segments, not {s}",
                            self.maps[map].compiled.name
                        ),
                    );
                }
            }
            let when = it
                .get("when")
                .and_then(|w| match cond::parse(w.as_str().unwrap_or("")) {
                    Ok(c) => {
                        let mut names = Vec::new();
                        c.vars(&mut names);
                        self.entry_vars
                            .extend(names.into_iter().map(|v| (v, w.pos)));
                        Some(c)
                    }
                    Err((_, m)) => {
                        self.err(file, w.pos, format!("condition: {m}"));
                        None
                    }
                });
            let name = it.get("name").and_then(Node::as_str).map(str::to_string);
            if let Some(n) = &name {
                if !names.contains(n) {
                    names.push(n.clone());
                }
            }
            let until = self.until(file, it);
            let write = match it.get("write") {
                None => Write::Replace,
                Some(w) => match w.as_str().and_then(Write::parse) {
                    Some(write) => write,
                    None => {
                        self.err(
                            file,
                            w.pos,
                            format!(
                                "`write:` is `replace` (the default: the mapped resource takes the stored one's place), `merge` (its elements go into the stored one), `amend` (as merge, only when one is stored), `delete` (the stored one is deleted) or `none` (only referenced), found `{}`",
                                w.as_str().unwrap_or("")
                            ),
                        );
                        Write::Replace
                    }
                },
            };
            out.push(Entry::Resource {
                name,
                segment,
                map,
                when,
                until,
                write,
            });
        }
        out
    }
}

fn collect_used(entries: &[Entry], out: &mut Vec<usize>) {
    for e in entries {
        match e {
            Entry::Resource { map, .. } => out.push(*map),
            Entry::Group { entries, .. } => collect_used(entries, out),
        }
    }
}

fn collect_creates(rules: &[Rule], out: &mut Vec<usize>) {
    for r in rules {
        match &r.kind {
            RuleKind::Create(i, _) | RuleKind::Map(i) => out.push(*i),
            RuleKind::Nested(n) => collect_creates(n, out),
            _ => {}
        }
    }
}

fn default_map_hint(ty: &str) -> String {
    let m = match ty {
        "Identifier" => "CX or EI",
        "HumanName" => "XPN",
        "Address" => "XAD",
        "ContactPoint" => "XTN",
        "CodeableConcept" => "CWE",
        "Reference" => "use `ref:` or `create:`",
        _ => return String::new(),
    };
    format!(" (e.g. {m})")
}

fn intern_type(ty: &str) -> Option<&'static str> {
    if !fhir::is_type(ty) {
        return None;
    }
    fhir::static_type_name(ty)
}

fn intern_element(owner: &str, name: &str) -> Option<&'static str> {
    fhir::static_element_name(owner, name)
}

/// Elements a mapping may not set because the store stamps them on every version.
fn store_owned(ty: &str, name: &str) -> Option<String> {
    (ty == "Meta" && (name == "versionId" || name == "lastUpdated")).then(|| {
        format!("`meta.{name}` is set by the store on every version — leave it out of the mapping")
    })
}
