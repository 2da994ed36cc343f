use crate::committer::Txn;
use crate::db::{Db, Table};
use crate::keys::{self, join, prefix};
use crate::outbox::{Outbox, OutboxEvent};
use crate::{Result, StorageError};
use async_trait::async_trait;
use bytes::Bytes;
use fjall::Readable;
use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::Arc;
use tributary_core::{
    deterministic_id, format_rfc3339_millis, now_millis, MessageId, MessageState,
};

/// One version of a resource as stored. `json` is exactly what the API serves (with
/// `meta.versionId` and `meta.lastUpdated` set), kept as bytes so a read needs no re-serialization.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredResource {
    pub resource_type: String,
    pub id: String,
    pub version: u64,
    pub last_updated: i64,
    pub deleted: bool,
    pub json: Bytes,
}

impl StoredResource {
    pub fn resource(&self) -> Result<Value> {
        serde_json::from_slice(&self.json).map_err(|e| StorageError::corrupt("res_current", e))
    }

    /// `version u64 | lastUpdated i64 | flag | [content hash u128] | json`. Flag 0 = live,
    /// 1 = deleted, 2 = live with the hash of its content without meta stamps, so an identical
    /// re-write is recognised without parsing the stored JSON.
    fn encode(&self, content_hash: Option<u128>) -> Vec<u8> {
        let mut out = Vec::with_capacity(33 + self.json.len());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&keys::i64_be(self.last_updated));
        match (self.deleted, content_hash) {
            (true, _) => out.push(1),
            (false, None) => out.push(0),
            (false, Some(h)) => {
                out.push(2);
                out.extend_from_slice(&h.to_be_bytes());
            }
        }
        out.extend_from_slice(&self.json);
        out
    }

    fn decode(resource_type: &str, id: &str, bytes: &[u8]) -> Result<Self> {
        let short = || StorageError::corrupt("res_current", "short record");
        if bytes.len() < 17 {
            return Err(short());
        }
        let json_at = if bytes[16] == 2 { 33 } else { 17 };
        Ok(Self {
            resource_type: resource_type.to_string(),
            id: id.to_string(),
            version: keys::read_u64(&bytes[..8]).unwrap_or(0),
            last_updated: keys::read_i64(&bytes[8..16]).unwrap_or(0),
            deleted: bytes[16] == 1,
            json: Bytes::copy_from_slice(bytes.get(json_at..).ok_or_else(short)?),
        })
    }

    /// The content hash a live record was stored with, if any.
    fn stored_content_hash(bytes: &[u8]) -> Option<u128> {
        match bytes.get(16) {
            Some(2) => Some(u128::from_be_bytes(bytes.get(17..33)?.try_into().ok()?)),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub enum WriteOp {
    /// Create or update. An update whose content equals the current version (ignoring `meta`)
    /// creates no new version and raises no event, so replaying a message changes nothing.
    Upsert(Value),
    /// [`WriteOp::Upsert`] of a body its producer serializes itself: the mapping pipeline hands
    /// over its own tree rather than building a `Value` only for the store to serialize it.
    UpsertBody(Arc<dyn ResourceBody>),
    /// Merge these elements into the stored resource (see [`merge_into`]), or create it when
    /// none is stored. A merge that adds nothing new is unchanged, like an equal upsert.
    Merge(Value),
    Delete,
}

impl PartialEq for WriteOp {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Upsert(a), Self::Upsert(b)) => a == b,
            (Self::UpsertBody(a), Self::UpsertBody(b)) => a.to_json() == b.to_json(),
            (Self::Merge(a), Self::Merge(b)) => a == b,
            (Self::Delete, Self::Delete) => true,
            _ => false,
        }
    }
}

/// A resource body that writes its own JSON. Both forms must be byte for byte what the store
/// writes for the equal `serde_json::Value` (so content hashes compare across producers): a
/// mapped resource stored once through the API and once by the pipeline is one version.
pub trait ResourceBody: Send + Sync + std::fmt::Debug {
    /// Compact JSON with every object's keys in sorted order (what `serde_json` writes for a
    /// `Value`), including `resourceType` and `id`, without `meta.versionId`/`meta.lastUpdated`.
    fn write_json(&self, out: &mut Vec<u8>);
    /// The stored form: as [`ResourceBody::write_json`], except that `resourceType`, `id` and
    /// `meta` lead, and `meta` starts with `versionId` and `lastUpdated` (then its own members).
    fn write_stamped(&self, out: &mut Vec<u8>, version: &str, last_updated: &str);
    fn index_fields(&self, rtype: &str, id: &str) -> IndexFields;

    fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1024);
        self.write_json(&mut out);
        out
    }

    /// What "unchanged" compares: the hash of [`ResourceBody::write_json`]'s bytes.
    fn content_hash(&self) -> u128 {
        xxhash_rust::xxh3::xxh3_128(&self.to_json())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precondition {
    None,
    /// `If-Match: W/"n"`: refuse unless the current version is `n`.
    VersionMatch(u64),
    /// `If-None-Exist` / create: refuse if a live resource already has this id.
    MustNotExist,
    /// Only a live stored resource is changed; without one the write changes nothing (a message
    /// amending a record it does not carry never creates a partial one).
    IfStored,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ResourceWrite {
    pub resource_type: String,
    pub id: String,
    pub op: WriteOp,
    pub precondition: Precondition,
}

impl ResourceWrite {
    /// An unconditional create-or-update. Sets `resourceType` and `id` in the owned body, so the
    /// store can serialize it as it is instead of cloning it to set them.
    pub fn upsert(resource_type: &str, id: &str, mut resource: Value) -> Self {
        set_type_and_id(&mut resource, resource_type, id);
        Self {
            resource_type: resource_type.into(),
            id: id.into(),
            op: WriteOp::Upsert(resource),
            precondition: Precondition::None,
        }
    }

    /// An unconditional create-or-update of a body that already carries `resourceType` and `id`.
    pub fn upsert_body(resource_type: &str, id: &str, body: Arc<dyn ResourceBody>) -> Self {
        Self {
            resource_type: resource_type.into(),
            id: id.into(),
            op: WriteOp::UpsertBody(body),
            precondition: Precondition::None,
        }
    }

    /// A merge of `elements` into the stored resource ([`WriteOp::Merge`]).
    pub fn merge(resource_type: &str, id: &str, mut elements: Value) -> Self {
        set_type_and_id(&mut elements, resource_type, id);
        Self {
            resource_type: resource_type.into(),
            id: id.into(),
            op: WriteOp::Merge(elements),
            precondition: Precondition::None,
        }
    }

    /// An unconditional delete (a no-op when the resource is absent or already deleted).
    pub fn delete(resource_type: &str, id: &str) -> Self {
        Self {
            resource_type: resource_type.into(),
            id: id.into(),
            op: WriteOp::Delete,
            precondition: Precondition::None,
        }
    }
}

/// The journal state change that commits together with the resources a message produced.
#[derive(Clone, Debug, PartialEq)]
pub struct MessageUpdate {
    pub id: MessageId,
    pub state: MessageState,
    pub mapping_version: Option<String>,
    /// The queue entry this processing took. When the message was queued again meanwhile (a
    /// replay while it was being mapped), its state is left alone: the newer entry maps it
    /// again, and marking it done here would make that entry look stale and skip it.
    pub seq: Option<u64>,
}

/// Everything one message (or one API transaction) changes, applied in one atomic, durable write.
#[derive(Clone, Debug, Default)]
pub struct StoreTransaction {
    pub tenant: String,
    pub writes: Vec<ResourceWrite>,
    /// Extra events beyond the per-resource change events the store raises itself
    /// (for example one `hl7v2.adt.A01` event per message).
    pub events: Vec<OutboxEvent>,
    pub message: Option<MessageUpdate>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct WriteOutcome {
    pub resource_type: String,
    pub id: String,
    pub version: u64,
    pub created: bool,
    /// False when the write matched the current version and nothing was stored.
    pub changed: bool,
    pub last_updated: i64,
    pub json: Bytes,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct CommitOutcome {
    pub writes: Vec<WriteOutcome>,
    pub event_seqs: Vec<u64>,
}

/// The FHIR resource store: versioned resources, history and the indexes search needs.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn commit(&self, tx: StoreTransaction) -> Result<CommitOutcome>;
    /// The current version; a deleted resource comes back with `deleted = true` (HTTP 410).
    fn read(&self, tenant: &str, rtype: &str, id: &str) -> Result<Option<StoredResource>>;
    fn vread(
        &self,
        tenant: &str,
        rtype: &str,
        id: &str,
        version: u64,
    ) -> Result<Option<StoredResource>>;
    /// Every version, newest first.
    fn history(&self, tenant: &str, rtype: &str, id: &str) -> Result<Vec<StoredResource>>;
    /// Every version of every resource of a type changed at or after `since`, newest first
    /// (by time, then id, then version), starting after `after` (the last one of a previous
    /// page).
    fn history_type(
        &self,
        tenant: &str,
        rtype: &str,
        since: Option<i64>,
        after: Option<&HistoryPosition>,
        limit: usize,
    ) -> Result<Vec<StoredResource>>;
    /// Live resources of a type, in id order, starting after `after_id`.
    fn list(
        &self,
        tenant: &str,
        rtype: &str,
        after_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredResource>>;
    /// Ids of live resources of `rtype` in a patient's compartment (`rtype = None`: all types).
    fn ids_by_patient(
        &self,
        tenant: &str,
        patient_id: &str,
        rtype: Option<&str>,
    ) -> Result<Vec<(String, String)>>;
    /// Ids of live resources with an identifier of this value (and system, when given).
    fn ids_by_identifier(
        &self,
        tenant: &str,
        rtype: &str,
        system: Option<&str>,
        value: &str,
    ) -> Result<Vec<String>>;
    /// Ids of live resources last updated in `[from, to)`, oldest first.
    fn ids_by_last_updated(
        &self,
        tenant: &str,
        rtype: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<String>>;
    /// Ids of live resources with an indexed `param` value ([`IndexFields::strings`]) that
    /// starts with `prefix`, in id order.
    fn ids_by_string_prefix(
        &self,
        tenant: &str,
        rtype: &str,
        param: &str,
        prefix: &str,
    ) -> Result<Vec<String>>;
    /// Ids of live resources with an indexed `param` value in `from..to` (byte order; no upper
    /// bound without `to`), in id order.
    fn ids_by_string_range(
        &self,
        tenant: &str,
        rtype: &str,
        param: &str,
        from: &str,
        to: Option<&str>,
    ) -> Result<Vec<String>>;
    fn outbox(&self) -> &Outbox;
}

/// Where a page of type history ended: its last version's time, id and version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryPosition {
    pub last_updated: i64,
    pub id: String,
    pub version: u64,
}

impl HistoryPosition {
    pub fn of(r: &StoredResource) -> Self {
        Self {
            last_updated: r.last_updated,
            id: r.id.clone(),
            version: r.version,
        }
    }

    /// The order of type history: newest first, then by id, then newest version first.
    fn order_key(&self) -> (std::cmp::Reverse<i64>, &str, std::cmp::Reverse<u64>) {
        (
            std::cmp::Reverse(self.last_updated),
            &self.id,
            std::cmp::Reverse(self.version),
        )
    }
}

#[derive(Clone)]
pub struct FjallStore {
    db: Db,
    outbox: Outbox,
}

/// References that put a resource in a patient's compartment (the common R4 search params).
const PATIENT_REFERENCE_FIELDS: [&str; 5] =
    ["subject", "patient", "beneficiary", "individual", "child"];

/// The patients a resource other than a Patient belongs to: the ids its patient reference
/// fields, its participants' `actor`s and, for a Provenance, its `target`s name (R4's Patient
/// compartment puts a Provenance in the compartment of each Patient it is about). One piece of
/// code for the store's patient index and the facade's compartment checks, so that what a
/// patient-context search finds through the index is what a read of it allows.
pub fn patient_references<'a, V: JsonView<'a>>(rtype: &str, resource: V) -> BTreeSet<String> {
    let reference = |v: Option<V>| {
        v.and_then(|v| v.get("reference"))
            .and_then(V::as_str)
            .and_then(|r| r.strip_prefix("Patient/"))
            .map(str::to_string)
    };
    let mut patients: BTreeSet<String> = PATIENT_REFERENCE_FIELDS
        .into_iter()
        .filter_map(|field| reference(resource.get(field)))
        .collect();
    patients.extend(each(resource.get("participant")).filter_map(|p| reference(p.get("actor"))));
    if rtype == "Provenance" {
        patients.extend(each(resource.get("target")).filter_map(|t| reference(Some(t))));
    }
    patients
}

/// Read access to a JSON tree. The index entries of a resource are found by one piece of code
/// whether the resource is a `serde_json::Value` or a producer's own tree ([`ResourceBody`]).
pub trait JsonView<'a>: Copy {
    fn get(self, key: &str) -> Option<Self>;
    fn as_str(self) -> Option<&'a str>;
    /// The number of elements when this is an array.
    fn array_len(self) -> Option<usize>;
    fn element(self, index: usize) -> Option<Self>;
    fn is_object(self) -> bool;
}

impl<'a> JsonView<'a> for &'a Value {
    fn get(self, key: &str) -> Option<Self> {
        Value::get(self, key)
    }
    fn as_str(self) -> Option<&'a str> {
        Value::as_str(self)
    }
    fn array_len(self) -> Option<usize> {
        self.as_array().map(Vec::len)
    }
    fn element(self, index: usize) -> Option<Self> {
        self.as_array()?.get(index)
    }
    fn is_object(self) -> bool {
        Value::is_object(self)
    }
}

/// The elements of an array, or the value itself when it is an object (a lone repetition).
fn each<'a, V: JsonView<'a>>(v: Option<V>) -> impl Iterator<Item = V> {
    let (single, len) = match v {
        Some(v) => match v.array_len() {
            Some(n) => (None, n),
            None => (v.is_object().then_some(v), 0),
        },
        None => (None, 0),
    };
    single
        .into_iter()
        .chain((0..len).filter_map(move |i| v.and_then(|v| v.element(i))))
}

/// What the store indexes of one resource version besides its `lastUpdated`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexFields {
    /// Patient ids the resource belongs to: itself for a Patient, else its patient references.
    pub patients: BTreeSet<String>,
    /// `(system, value)` of each identifier with a value (`system` empty when absent).
    pub identifiers: Vec<(String, String)>,
    /// `(parameter, value)` for the string and date search parameters, sorted and distinct:
    /// `name` (a plain `name` string, or each HumanName's text, family and given) and `family`,
    /// folded by [`tributary_core::fold_search_string`]; `birthdate` as written.
    pub strings: Vec<(&'static str, String)>,
}

impl IndexFields {
    pub fn of<'a, V: JsonView<'a>>(rtype: &str, id: &str, resource: V) -> Self {
        let patients = if rtype == "Patient" {
            BTreeSet::from([id.to_string()])
        } else {
            patient_references(rtype, resource)
        };
        let identifiers = each(resource.get("identifier"))
            .filter_map(|i| {
                let value = i.get("value")?.as_str()?;
                let system = i.get("system").and_then(V::as_str).unwrap_or("");
                Some((system.to_string(), value.to_string()))
            })
            .collect();
        let mut strings = Vec::new();
        let mut add = |param: &'static str, v: Option<&str>| {
            if let Some(v) = v.map(tributary_core::fold_search_string) {
                if !v.is_empty() {
                    strings.push((param, v));
                }
            }
        };
        let name = resource.get("name");
        if let Some(s) = name.and_then(V::as_str) {
            add("name", Some(s));
        }
        for n in each(name) {
            add("name", n.get("text").and_then(V::as_str));
            let family = n.get("family").and_then(V::as_str);
            add("name", family);
            add("family", family);
            let given = n.get("given");
            for i in 0..given.and_then(V::array_len).unwrap_or(0) {
                add("name", given.and_then(|g| g.element(i)).and_then(V::as_str));
            }
        }
        if let Some(b) = resource.get("birthDate").and_then(V::as_str) {
            if !b.is_empty() && !b.contains('\0') {
                strings.push(("birthdate", b.to_string()));
            }
        }
        strings.sort();
        strings.dedup();
        Self {
            patients,
            identifiers,
            strings,
        }
    }
}

/// `given`'s elements merged into `stored` (a `write: merge` mapping, such as the merged-away
/// Patient of an ADT^A40): a list gains each of `given`'s items, which replaces every stored item
/// that holds the same values (it may hold more); any other element is replaced; elements
/// `given` lacks are kept. `tributary-mapping`'s FHIRPath Patch for a merge says the same, except
/// for the order: here an item takes the place of the first stored item it replaces (a new one
/// goes last), so two messages that each merge what the other already gave do not reorder the
/// list — and make no new version — every time they alternate.
pub fn merge_into(stored: Value, given: &Value) -> Value {
    let mut out = without_meta_stamps(&stored);
    if let (Some(o), Some(g)) = (out.as_object_mut(), given.as_object()) {
        for (k, gv) in g {
            if k == "resourceType" || k == "id" {
                continue;
            }
            match (o.get_mut(k), gv) {
                (Some(Value::Array(list)), Value::Array(items)) => {
                    for item in items {
                        let holders: Vec<usize> = (0..list.len())
                            .filter(|&i| tributary_core::covers(&list[i], item))
                            .collect();
                        match holders.split_first() {
                            Some((&at, rest)) => {
                                list[at] = item.clone();
                                for &i in rest.iter().rev() {
                                    list.remove(i);
                                }
                            }
                            None => list.push(item.clone()),
                        }
                    }
                }
                _ => {
                    o.insert(k.clone(), gv.clone());
                }
            }
        }
    }
    out
}

/// Index entries of one stored version (`fields` absent when it is a deletion).
fn index_keys(
    tenant: &str,
    rtype: &str,
    id: &str,
    last_updated: i64,
    fields: Option<&IndexFields>,
) -> Vec<(Table, Vec<u8>)> {
    let (t, ty, i) = (tenant.as_bytes(), rtype.as_bytes(), id.as_bytes());
    let mut out = vec![(
        Table::IdxUpdated,
        join(&[t, ty, &keys::i64_be(last_updated), i]),
    )];
    let Some(fields) = fields else {
        return out;
    };
    for pid in &fields.patients {
        out.push((Table::IdxPatient, join(&[t, pid.as_bytes(), ty, i])));
    }
    for (system, v) in &fields.identifiers {
        out.push((
            Table::IdxIdent,
            join(&[t, ty, v.as_bytes(), system.as_bytes(), i]),
        ));
    }
    for (param, v) in &fields.strings {
        out.push((
            Table::IdxString,
            join(&[t, ty, param.as_bytes(), v.as_bytes(), i]),
        ));
    }
    out
}

/// Hash of a resource's content as compared for "unchanged" ([`write_canonical`]).
fn content_hash(v: &Value) -> u128 {
    // Streamed into the hasher: the same digest as hashing the serialized bytes whole (stored
    // hashes stay comparable), without building those bytes.
    let mut h = HashWriter(xxhash_rust::xxh3::Xxh3::new());
    write_canonical(v, &mut h);
    h.0.digest128()
}

/// `v` as compared for "unchanged": without `meta.versionId`, `meta.lastUpdated` (and `meta`
/// when nothing else is left in it).
fn write_canonical(v: &Value, out: impl std::io::Write) {
    let meta = v.get("meta").and_then(Value::as_object);
    let normalise = meta.is_some_and(|m| {
        m.is_empty() || m.contains_key("versionId") || m.contains_key("lastUpdated")
    });
    let written = if normalise {
        serde_json::to_writer(out, &without_meta_stamps(v))
    } else {
        serde_json::to_writer(out, v)
    };
    written.expect("a Value always serializes");
}

struct HashWriter(xxhash_rust::xxh3::Xxh3);

impl std::io::Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn without_meta_stamps(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(meta) = v.get_mut("meta").and_then(Value::as_object_mut) {
        meta.remove("versionId");
        meta.remove("lastUpdated");
        if meta.is_empty() {
            v.as_object_mut().map(|o| o.remove("meta"));
        }
    }
    v
}

fn res_key(tenant: &str, rtype: &str, id: &str) -> Vec<u8> {
    join(&[tenant.as_bytes(), rtype.as_bytes(), id.as_bytes()])
}

fn hist_key(tenant: &str, rtype: &str, id: &str, version: u64) -> Vec<u8> {
    join(&[
        tenant.as_bytes(),
        rtype.as_bytes(),
        id.as_bytes(),
        &keys::u64_be(version),
    ])
}

fn label(rtype: &str, id: &str) -> String {
    format!("{rtype}/{id}")
}

/// Where a commit's change events come from (stamped on each event).
#[derive(Clone)]
struct EventSource {
    tenant: String,
    message: Option<String>,
    mapping_version: Option<String>,
}

/// Everything one resource write does to the tables, computed from the stored version it is
/// based on. Planning parses and serializes JSON; the committer thread (the one serial stage of
/// every durable write) only checks that the stored version is still the one planned against.
struct WritePlan {
    outcome: WriteOutcome,
    ops: Vec<(Table, Vec<u8>, Option<Vec<u8>>)>,
    /// The change event (JSON; its sequence number is the outbox key), when something changed.
    event: Option<Vec<u8>>,
}

fn plan_write(
    w: &ResourceWrite,
    current_raw: Option<&[u8]>,
    now: i64,
    src: &EventSource,
) -> Result<WritePlan> {
    let tenant = src.tenant.as_str();
    let current = match current_raw {
        Some(b) => Some(StoredResource::decode(&w.resource_type, &w.id, b)?),
        None => None,
    };
    let live = current.as_ref().filter(|c| !c.deleted);
    match w.precondition {
        Precondition::VersionMatch(expected) => {
            let cur = current.as_ref().map_or(0, |c| c.version);
            if cur != expected || live.is_none() {
                return Err(StorageError::VersionConflict {
                    resource: label(&w.resource_type, &w.id),
                    expected,
                    current: cur,
                });
            }
        }
        Precondition::MustNotExist if live.is_some() => {
            return Err(StorageError::AlreadyExists {
                resource: label(&w.resource_type, &w.id),
            });
        }
        _ => {}
    }
    let unchanged = |version, last_updated, json| WritePlan {
        outcome: WriteOutcome {
            resource_type: w.resource_type.clone(),
            id: w.id.clone(),
            version,
            created: false,
            changed: false,
            last_updated,
            json,
        },
        ops: Vec::new(),
        event: None,
    };
    // Deleting what is absent or already deleted is a no-op (FHIR: 200/204 either way); so is
    // a write that only changes a stored resource, with none stored.
    if live.is_none()
        && (matches!(w.op, WriteOp::Delete) || w.precondition == Precondition::IfStored)
    {
        return Ok(unchanged(
            current.as_ref().map_or(0, |c| c.version),
            current.as_ref().map_or(now, |c| c.last_updated),
            Bytes::new(),
        ));
    }
    let next_version = current.as_ref().map_or(1, |c| c.version + 1);
    let with_type_and_id;
    let body = match &w.op {
        WriteOp::Upsert(given) => {
            // Bodies from `ResourceWrite::upsert` carry their type and id already; only others
            // are copied to set them.
            let body: &dyn ResourceBody = if has_type_and_id(given, &w.resource_type, &w.id) {
                given
            } else {
                let mut b = given.clone();
                set_type_and_id(&mut b, &w.resource_type, &w.id);
                with_type_and_id = b;
                &with_type_and_id
            };
            Some(body)
        }
        WriteOp::UpsertBody(b) => Some(b.as_ref()),
        WriteOp::Merge(given) => {
            let mut merged = match live {
                Some(l) => merge_into(l.resource()?, given),
                None => given.clone(),
            };
            set_type_and_id(&mut merged, &w.resource_type, &w.id);
            with_type_and_id = merged;
            Some(&with_type_and_id as &dyn ResourceBody)
        }
        WriteOp::Delete => None,
    };
    let (rtype, id) = (&w.resource_type, &w.id);
    let (stored, new_fields, hash) = match body {
        Some(body) => {
            let hash = body.content_hash();
            if let Some(live) = live {
                let same = match current_raw.and_then(StoredResource::stored_content_hash) {
                    Some(stored) => stored == hash,
                    None => content_hash(&live.resource()?) == hash,
                };
                if same {
                    return Ok(unchanged(
                        live.version,
                        live.last_updated,
                        live.json.clone(),
                    ));
                }
            }
            let stored = StoredResource {
                resource_type: w.resource_type.clone(),
                id: w.id.clone(),
                version: next_version,
                last_updated: now,
                deleted: false,
                json: Bytes::from(stamped(body, next_version, now)),
            };
            (stored, Some(body.index_fields(rtype, id)), Some(hash))
        }
        None => {
            let stored = StoredResource {
                resource_type: w.resource_type.clone(),
                id: w.id.clone(),
                version: next_version,
                last_updated: now,
                deleted: true,
                json: Bytes::new(),
            };
            (stored, None, None)
        }
    };
    let current_fields = match live {
        Some(l) => Some(IndexFields::of(rtype, id, &l.resource()?)),
        None => None,
    };
    let old_keys = match &current {
        Some(c) => index_keys(tenant, rtype, id, c.last_updated, current_fields.as_ref()),
        None => Vec::new(),
    };
    let new_keys = index_keys(tenant, rtype, id, now, new_fields.as_ref());
    let mut ops = Vec::new();
    for k in old_keys.iter().filter(|k| !new_keys.contains(k)) {
        ops.push((k.0, k.1.clone(), None));
    }
    if stored.deleted {
        // Deleted resources leave the indexes: searches only see live resources.
        for k in &new_keys {
            ops.push((k.0, k.1.clone(), None));
        }
    } else {
        for k in new_keys.iter().filter(|k| !old_keys.contains(k)) {
            ops.push((k.0, k.1.clone(), Some(Vec::new())));
        }
    }
    // The current version lives in `Res` only; `ResHist` receives it once it is superseded.
    if let (Some(c), Some(raw)) = (&current, current_raw) {
        ops.push((
            Table::ResHist,
            hist_key(tenant, rtype, id, c.version),
            Some(raw.to_vec()),
        ));
    }
    ops.push((
        Table::Res,
        res_key(tenant, rtype, id),
        Some(stored.encode(hash)),
    ));
    let kind = if stored.deleted {
        "delete"
    } else if live.is_none() {
        "create"
    } else {
        "update"
    };
    // A delete names the patient of what it deleted: its event is keyed and routed like that
    // resource's earlier events (Kafka partition, order per patient, the patient's subscribers).
    // A change that drops the link names none: the new content is no longer that patient's.
    let fields = if stored.deleted {
        current_fields
    } else {
        new_fields
    };
    let mut patients = fields.map(|f| f.patients.into_iter()).into_iter().flatten();
    let patient = patients.next();
    let other_patients: Vec<String> = patients.collect();
    let event = OutboxEvent {
        seq: 0,
        event_id: deterministic_id(&[tenant, rtype, id, &next_version.to_string()]),
        tenant: tenant.to_string(),
        event_type: format!("fhir.{rtype}.{kind}"),
        resource_type: Some(rtype.clone()),
        resource_id: Some(id.clone()),
        version: Some(next_version),
        patient_id: patient,
        other_patients,
        source_message: src.message.clone(),
        mapping_version: src.mapping_version.clone(),
        occurred_at: now,
        resource: None,
    };
    let event = encode_change_event(&event, (!stored.deleted).then_some(&stored.json[..]));
    Ok(WritePlan {
        outcome: WriteOutcome {
            resource_type: w.resource_type.clone(),
            id: w.id.clone(),
            version: next_version,
            created: live.is_none(),
            changed: true,
            last_updated: now,
            json: stored.json,
        },
        ops,
        event: Some(event),
    })
}

/// A `serde_json::Value` body (the API's writes): canonical JSON is serde_json's own, without
/// any `meta` stamps the client sent; the hash streams into the hasher without building bytes.
impl ResourceBody for Value {
    fn write_json(&self, out: &mut Vec<u8>) {
        write_canonical(self, out);
    }

    fn write_stamped(&self, out: &mut Vec<u8>, version: &str, last_updated: &str) {
        let written = match self.as_object() {
            Some(obj) => serde_json::to_writer(
                out,
                &Stamped {
                    body: obj,
                    version,
                    last_updated,
                },
            ),
            None => serde_json::to_writer(out, self),
        };
        written.expect("a Value always serializes");
    }

    fn index_fields(&self, rtype: &str, id: &str) -> IndexFields {
        IndexFields::of(rtype, id, self)
    }

    fn content_hash(&self) -> u128 {
        content_hash(self)
    }
}

/// The stored JSON of a new version: `meta.versionId` and `meta.lastUpdated` stamped.
fn stamped(body: &dyn ResourceBody, version: u64, now: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    body.write_stamped(&mut out, &version.to_string(), &format_rfc3339_millis(now));
    out
}

/// An outbox value; the sequence number is its key (readers take it from there).
fn encode_event(ev: &OutboxEvent) -> Vec<u8> {
    serde_json::to_vec(ev).expect("events always serialize")
}

/// [`encode_event`] for a change event whose `resource` is the JSON just serialized for storage:
/// spliced in as bytes rather than serialized a second time. `resource` is the last field of
/// [`OutboxEvent`], so an event encoded without one ends in `"resource":null}`.
fn encode_change_event(ev: &OutboxEvent, resource: Option<&[u8]>) -> Vec<u8> {
    debug_assert!(ev.resource.is_none());
    let mut out = encode_event(ev);
    if let Some(json) = resource {
        const NULL_END: &[u8] = b"null}";
        debug_assert!(out.ends_with(NULL_END));
        out.truncate(out.len() - NULL_END.len());
        out.extend_from_slice(json);
        out.push(b'}');
    }
    out
}

fn has_type_and_id(body: &Value, rtype: &str, id: &str) -> bool {
    body.get("resourceType").and_then(Value::as_str) == Some(rtype)
        && body.get("id").and_then(Value::as_str) == Some(id)
}

fn set_type_and_id(body: &mut Value, rtype: &str, id: &str) {
    if has_type_and_id(body, rtype, id) {
        return;
    }
    if let Some(obj) = body.as_object_mut() {
        obj.insert("resourceType".into(), Value::String(rtype.into()));
        obj.insert("id".into(), Value::String(id.into()));
    }
}

/// A resource as stored: its body with `meta.versionId` and `meta.lastUpdated` stamped,
/// serialized from the caller's value without copying it. `resourceType`, `id` and `meta` lead.
struct Stamped<'a> {
    body: &'a serde_json::Map<String, Value>,
    version: &'a str,
    last_updated: &'a str,
}

impl serde::Serialize for Stamped<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        const LEADING: [&str; 3] = ["resourceType", "id", "meta"];
        let mut map = s.serialize_map(None)?;
        for k in &LEADING[..2] {
            if let Some(v) = self.body.get(*k) {
                map.serialize_entry(k, v)?;
            }
        }
        map.serialize_entry("meta", &StampedMeta(self))?;
        for (k, v) in self.body {
            if !LEADING.contains(&k.as_str()) {
                map.serialize_entry(k, v)?;
            }
        }
        map.end()
    }
}

struct StampedMeta<'a>(&'a Stamped<'a>);

impl serde::Serialize for StampedMeta<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("versionId", self.0.version)?;
        map.serialize_entry("lastUpdated", self.0.last_updated)?;
        if let Some(meta) = self.0.body.get("meta").and_then(Value::as_object) {
            for (k, v) in meta {
                if k != "versionId" && k != "lastUpdated" {
                    map.serialize_entry(k, v)?;
                }
            }
        }
        map.end()
    }
}

fn push_event(txn: &mut Txn<'_>, bytes: Vec<u8>) -> u64 {
    txn.counters.outbox_seq += 1;
    let seq = txn.counters.outbox_seq;
    txn.put(Table::Outbox, keys::u64_be(seq).to_vec(), bytes);
    seq
}

impl FjallStore {
    pub fn new(db: Db) -> Self {
        let outbox = Outbox::new(db.clone());
        Self { db, outbox }
    }

    fn decode_res(&self, tenant: &str, key: &[u8], value: &[u8]) -> Result<StoredResource> {
        let rest = &key[tenant.len() + 1..];
        let mut parts = rest.splitn(2, |b| *b == keys::SEP);
        let rtype = std::str::from_utf8(parts.next().unwrap_or_default()).unwrap_or_default();
        let id_part = parts.next().unwrap_or_default();
        let id_end = id_part
            .iter()
            .position(|b| *b == keys::SEP)
            .unwrap_or(id_part.len());
        let id = std::str::from_utf8(&id_part[..id_end]).unwrap_or_default();
        StoredResource::decode(rtype, id, value)
    }
}

#[async_trait]
impl Store for FjallStore {
    async fn commit(&self, tx: StoreTransaction) -> Result<CommitOutcome> {
        let now = now_millis();
        let StoreTransaction {
            tenant,
            writes,
            events,
            message,
        } = tx;
        let src = EventSource {
            tenant,
            message: message.as_ref().map(|m| m.id.to_string()),
            mapping_version: message.as_ref().and_then(|m| m.mapping_version.clone()),
        };
        // Plan on the caller's task against the versions stored now; the job re-plans only a
        // write whose stored version changed in between (or whose plan failed).
        let res = self.db.tables().get(Table::Res);
        let read_at = self.db.committer().completed_groups();
        let planned: Vec<Option<(Option<Vec<u8>>, WritePlan)>> = writes
            .iter()
            .map(|w| {
                let key = res_key(&src.tenant, &w.resource_type, &w.id);
                let current = res.get(&key).ok()?.map(|v| v.to_vec());
                let plan = plan_write(w, current.as_deref(), now, &src).ok()?;
                Some((current, plan))
            })
            .collect();
        let extra_events: Vec<Vec<u8>> = events.iter().map(encode_event).collect();
        let (outcome, writes) = self
            .db
            .committer()
            .run(move |txn| {
                let mut outcome = CommitOutcome::default();
                let mut change_events = Vec::new();
                for (w, planned) in writes.iter().zip(planned) {
                    let key = res_key(&src.tenant, &w.resource_type, &w.id);
                    let still_current = match &planned {
                        Some((based_on, _)) => match txn.unwritten_since(Table::Res, &key, read_at)
                        {
                            Some(unwritten) => unwritten,
                            None => txn.get(Table::Res, &key)? == *based_on,
                        },
                        None => false,
                    };
                    let plan = match planned {
                        Some((_, plan)) if still_current => plan,
                        _ => plan_write(w, txn.get(Table::Res, &key)?.as_deref(), now, &src)?,
                    };
                    for (table, key, value) in plan.ops {
                        match value {
                            Some(v) => txn.put(table, key, v),
                            None => txn.delete(table, key),
                        }
                    }
                    change_events.extend(plan.event);
                    outcome.writes.push(plan.outcome);
                }
                for ev in change_events.into_iter().chain(extra_events) {
                    outcome.event_seqs.push(push_event(txn, ev));
                }
                if let Some(m) = message {
                    let key = m.id.as_bytes().to_vec();
                    let bytes = txn
                        .get(Table::State, &key)?
                        .ok_or(StorageError::UnknownMessage(m.id))?;
                    let mut record: crate::StateRecord = postcard::from_bytes(&bytes)
                        .map_err(|e| StorageError::corrupt("journal_state", e))?;
                    let requeued = m.seq.is_some_and(|s| record.seq != Some(s));
                    if !requeued {
                        record.state.check_transition(&m.state)?;
                        record.push(m.state, now);
                        if m.mapping_version.is_some() {
                            record.mapping_version = m.mapping_version;
                        }
                        txn.put(
                            Table::State,
                            key,
                            postcard::to_stdvec(&record).expect("serializes"),
                        );
                    }
                }
                // The bodies go back to be freed on the caller's thread, not the serial one.
                Ok((outcome, writes))
            })
            .await?;
        drop(writes);
        if let Some(last) = outcome.event_seqs.iter().max() {
            let last = *last;
            self.outbox.head.send_if_modified(|h| {
                let bigger = last > *h;
                if bigger {
                    *h = last;
                }
                bigger
            });
        }
        Ok(outcome)
    }

    fn read(&self, tenant: &str, rtype: &str, id: &str) -> Result<Option<StoredResource>> {
        match self
            .db
            .tables()
            .get(Table::Res)
            .get(res_key(tenant, rtype, id))?
        {
            Some(b) => Ok(Some(StoredResource::decode(rtype, id, &b)?)),
            None => Ok(None),
        }
    }

    fn vread(
        &self,
        tenant: &str,
        rtype: &str,
        id: &str,
        version: u64,
    ) -> Result<Option<StoredResource>> {
        let snap = self.db.snapshot();
        let tables = self.db.tables();
        if let Some(b) = snap.get(tables.get(Table::Res), res_key(tenant, rtype, id))? {
            let cur = StoredResource::decode(rtype, id, &b)?;
            if cur.version == version {
                return Ok(Some(cur));
            }
        }
        match snap.get(
            tables.get(Table::ResHist),
            hist_key(tenant, rtype, id, version),
        )? {
            Some(b) => Ok(Some(StoredResource::decode(rtype, id, &b)?)),
            None => Ok(None),
        }
    }

    fn history(&self, tenant: &str, rtype: &str, id: &str) -> Result<Vec<StoredResource>> {
        let snap = self.db.snapshot();
        let tables = self.db.tables();
        let Some(b) = snap.get(tables.get(Table::Res), res_key(tenant, rtype, id))? else {
            return Ok(Vec::new());
        };
        let current = StoredResource::decode(rtype, id, &b)?;
        let p = prefix(&[tenant.as_bytes(), rtype.as_bytes(), id.as_bytes()]);
        let mut out = vec![];
        for item in snap.prefix(tables.get(Table::ResHist), &p).rev() {
            let (_, v) = item.into_inner()?;
            let r = StoredResource::decode(rtype, id, &v)?;
            // Stores written before the current version stopped being copied here hold it twice.
            if r.version < current.version {
                out.push(r);
            }
        }
        out.insert(0, current);
        Ok(out)
    }

    fn history_type(
        &self,
        tenant: &str,
        rtype: &str,
        since: Option<i64>,
        after: Option<&HistoryPosition>,
        limit: usize,
    ) -> Result<Vec<StoredResource>> {
        let snap = self.db.snapshot();
        let tables = self.db.tables();
        let p = prefix(&[tenant.as_bytes(), rtype.as_bytes()]);
        let recent = |r: &StoredResource| {
            since.is_none_or(|s| r.last_updated >= s)
                && after.is_none_or(|a| {
                    HistoryPosition::of(r)
                        .order_key()
                        .cmp(&a.order_key())
                        .is_gt()
                })
        };
        let mut out = Vec::new();
        let mut current_versions = std::collections::HashMap::new();
        for item in snap.prefix(tables.get(Table::Res), &p) {
            let (k, v) = item.into_inner()?;
            let r = self.decode_res(tenant, &k, &v)?;
            current_versions.insert(r.id.clone(), r.version);
            if recent(&r) {
                out.push(r);
            }
        }
        for item in snap.prefix(tables.get(Table::ResHist), &p) {
            let (k, v) = item.into_inner()?;
            let r = self.decode_res(tenant, &k, &v)?;
            let superseded = current_versions.get(&r.id).is_some_and(|c| r.version < *c);
            if superseded && recent(&r) {
                out.push(r);
            }
        }
        out.sort_by(|a, b| {
            b.last_updated
                .cmp(&a.last_updated)
                .then_with(|| a.id.cmp(&b.id))
                .then(b.version.cmp(&a.version))
        });
        out.truncate(limit);
        Ok(out)
    }

    fn list(
        &self,
        tenant: &str,
        rtype: &str,
        after_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredResource>> {
        let p = prefix(&[tenant.as_bytes(), rtype.as_bytes()]);
        let start = match after_id {
            Some(a) => {
                let mut k = p.clone();
                k.extend_from_slice(a.as_bytes());
                k.push(1);
                k
            }
            None => p.clone(),
        };
        let mut out = Vec::new();
        for item in self.db.range(Table::Res, start..) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.into_inner()?;
            if !k.starts_with(&p) {
                break;
            }
            let r = self.decode_res(tenant, &k, &v)?;
            if !r.deleted {
                out.push(r);
            }
        }
        Ok(out)
    }

    fn ids_by_patient(
        &self,
        tenant: &str,
        patient_id: &str,
        rtype: Option<&str>,
    ) -> Result<Vec<(String, String)>> {
        let mut parts: Vec<&[u8]> = vec![tenant.as_bytes(), patient_id.as_bytes()];
        if let Some(t) = rtype {
            parts.push(t.as_bytes());
        }
        let p = prefix(&parts);
        let base = prefix(&[tenant.as_bytes(), patient_id.as_bytes()]).len();
        let mut out = Vec::new();
        for item in self.db.prefix(Table::IdxPatient, &p) {
            let k = item.key()?;
            let mut rest = k[base..].splitn(2, |b| *b == keys::SEP);
            let t = String::from_utf8_lossy(rest.next().unwrap_or_default()).into_owned();
            let id = String::from_utf8_lossy(rest.next().unwrap_or_default()).into_owned();
            out.push((t, id));
        }
        Ok(out)
    }

    fn ids_by_identifier(
        &self,
        tenant: &str,
        rtype: &str,
        system: Option<&str>,
        value: &str,
    ) -> Result<Vec<String>> {
        let mut parts: Vec<&[u8]> = vec![tenant.as_bytes(), rtype.as_bytes(), value.as_bytes()];
        if let Some(s) = system {
            parts.push(s.as_bytes());
        }
        let p = prefix(&parts);
        let base = prefix(&[tenant.as_bytes(), rtype.as_bytes(), value.as_bytes()]).len();
        let mut out = Vec::new();
        for item in self.db.prefix(Table::IdxIdent, &p) {
            let k = item.key()?;
            let rest = &k[base..];
            let id_start = rest
                .iter()
                .position(|b| *b == keys::SEP)
                .map_or(0, |i| i + 1);
            out.push(String::from_utf8_lossy(&rest[id_start..]).into_owned());
        }
        out.dedup();
        Ok(out)
    }

    fn ids_by_last_updated(
        &self,
        tenant: &str,
        rtype: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<String>> {
        let lo = join(&[tenant.as_bytes(), rtype.as_bytes(), &keys::i64_be(from)]);
        let hi = join(&[tenant.as_bytes(), rtype.as_bytes(), &keys::i64_be(to)]);
        let mut out = Vec::new();
        for item in self.db.range(Table::IdxUpdated, lo..hi) {
            let k = item.key()?;
            let id_start = k.iter().rposition(|b| *b == keys::SEP).map_or(0, |i| i + 1);
            out.push(String::from_utf8_lossy(&k[id_start..]).into_owned());
        }
        Ok(out)
    }

    fn ids_by_string_prefix(
        &self,
        tenant: &str,
        rtype: &str,
        param: &str,
        prefix: &str,
    ) -> Result<Vec<String>> {
        let mut p = keys::prefix(&[tenant.as_bytes(), rtype.as_bytes(), param.as_bytes()]);
        p.extend_from_slice(prefix.as_bytes());
        ids_after_last_sep(self.db.prefix(Table::IdxString, &p))
    }

    fn ids_by_string_range(
        &self,
        tenant: &str,
        rtype: &str,
        param: &str,
        from: &str,
        to: Option<&str>,
    ) -> Result<Vec<String>> {
        let parts = [tenant.as_bytes(), rtype.as_bytes(), param.as_bytes()];
        let lo = join(&[&parts[..], &[from.as_bytes()]].concat());
        let hi = match to {
            Some(to) => join(&[&parts[..], &[to.as_bytes()]].concat()),
            None => {
                let mut end = join(&parts);
                end.push(keys::SEP + 1);
                end
            }
        };
        ids_after_last_sep(self.db.range(Table::IdxString, lo..hi))
    }

    fn outbox(&self) -> &Outbox {
        &self.outbox
    }
}

const STRING_INDEX_BUILT: &[u8] = b"idx_string_built";
const PROVENANCE_PATIENTS_BUILT: &[u8] = b"idx_patient_provenance_built";

/// Index entries that later versions of the store added, written once for the resources stored
/// before them: when the database is opened and before anything writes, so a search never
/// misses an older resource. Later writes keep them up to date.
pub(crate) fn build_new_indexes(db: &fjall::Database, tables: &crate::db::Tables) -> Result<()> {
    // name, family and birth date searches
    backfill_index(db, tables, STRING_INDEX_BUILT, |_, table| {
        table == Table::IdxString
    })?;
    // a Provenance in the compartment of the Patients it targets
    backfill_index(db, tables, PROVENANCE_PATIENTS_BUILT, |rtype, table| {
        rtype == "Provenance" && table == Table::IdxPatient
    })
}

/// Writes, once (`marker` in `Meta` says it is done), the index entries `wanted` picks (by
/// resource type and index table) of every live resource.
fn backfill_index(
    db: &fjall::Database,
    tables: &crate::db::Tables,
    marker: &[u8],
    wanted: impl Fn(&str, Table) -> bool,
) -> Result<()> {
    let meta = tables.get(Table::Meta);
    if meta.get(marker)?.is_some() {
        return Ok(());
    }
    let mut batch = db.batch();
    let (mut pending, mut entries) = (0usize, 0usize);
    for item in tables.get(Table::Res).iter() {
        let (k, v) = item.into_inner()?;
        let mut parts = k.splitn(3, |b| *b == keys::SEP);
        let (Some(tenant), Some(rtype), Some(id)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (rtype, id) = (String::from_utf8_lossy(rtype), String::from_utf8_lossy(id));
        if !Table::ALL.iter().any(|t| wanted(&rtype, *t)) {
            continue;
        }
        let stored = StoredResource::decode(&rtype, &id, &v)?;
        if stored.deleted {
            continue;
        }
        let fields = IndexFields::of(&rtype, &id, &stored.resource()?);
        let tenant = String::from_utf8_lossy(tenant);
        for (table, key) in index_keys(&tenant, &rtype, &id, stored.last_updated, Some(&fields)) {
            if wanted(&rtype, table) {
                batch.insert(tables.get(table), key, []);
                pending += 1;
                entries += 1;
            }
        }
        if pending >= 10_000 {
            batch.commit()?;
            batch = db.batch();
            pending = 0;
        }
    }
    batch.insert(meta, marker, []);
    batch.commit()?;
    db.persist(fjall::PersistMode::SyncAll)?;
    if entries > 0 {
        tracing::info!(
            entries,
            index = %String::from_utf8_lossy(marker),
            "search index entries written for resources stored before them"
        );
    }
    Ok(())
}

/// The ids (the part after the last separator) of an index scan's keys, sorted and distinct: a
/// resource may have several values under the scanned range.
fn ids_after_last_sep(iter: fjall::Iter) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for item in iter {
        let k = item.key()?;
        let id_start = k.iter().rposition(|b| *b == keys::SEP).map_or(0, |i| i + 1);
        out.push(String::from_utf8_lossy(&k[id_start..]).into_owned());
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DbOptions, FjallJournal, Journal};
    use serde_json::json;
    use tributary_core::{Envelope, Protocol};

    fn store() -> (tempfile::TempDir, Db, FjallStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), DbOptions::default()).unwrap();
        (dir, db.clone(), FjallStore::new(db))
    }

    fn patient(id: &str, family: &str) -> ResourceWrite {
        ResourceWrite::upsert(
            "Patient",
            id,
            json!({"resourceType":"Patient","identifier":[{"system":"urn:mrn","value":"123"}],
                   "name":[{"family":family}]}),
        )
    }

    #[tokio::test]
    async fn stored_json_is_stamped_keeps_other_meta_and_the_event_carries_it() {
        let (_d, _db, store) = store();
        // A struct-literal write without `id` and with its own meta (not via `upsert`).
        let w = ResourceWrite {
            resource_type: "Patient".into(),
            id: "p9".into(),
            op: WriteOp::Upsert(json!({"resourceType":"Patient","gender":"female",
                "meta":{"versionId":"77","source":"urn:feed","profile":["urn:p"]}})),
            precondition: Precondition::None,
        };
        let o = store.commit(tx(vec![w])).await.unwrap();
        let text = std::str::from_utf8(&o.writes[0].json).unwrap();
        assert!(text.starts_with(r#"{"resourceType":"Patient","id":"p9","meta":{"versionId":"1","#));
        let v: Value = serde_json::from_str(text).unwrap();
        assert_eq!(v["meta"]["source"], "urn:feed");
        assert_eq!(v["meta"]["profile"], json!(["urn:p"]));
        assert_eq!(v["gender"], "female");
        assert!(v["meta"]["lastUpdated"].as_str().unwrap().ends_with('Z'));
        let ev = store.outbox().event(o.event_seqs[0]).unwrap().unwrap();
        assert_eq!(ev.resource, Some(v));
        assert_eq!(ev.event_type, "fhir.Patient.create");
    }

    #[tokio::test]
    async fn history_lists_each_version_once_also_in_stores_that_copied_the_current_one() {
        let (_d, db, store) = store();
        store.commit(tx(vec![patient("p1", "A")])).await.unwrap();
        store.commit(tx(vec![patient("p1", "B")])).await.unwrap();
        let versions = |h: Vec<StoredResource>| h.iter().map(|r| r.version).collect::<Vec<_>>();
        assert_eq!(
            versions(store.history("t1", "Patient", "p1").unwrap()),
            [2, 1]
        );
        // The layout before kept the current version in the history table as well.
        let current = db
            .tables()
            .get(Table::Res)
            .get(res_key("t1", "Patient", "p1"))
            .unwrap();
        let current = current.unwrap().to_vec();
        db.committer()
            .run(move |txn| {
                txn.put(Table::ResHist, hist_key("t1", "Patient", "p1", 2), current);
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(
            versions(store.history("t1", "Patient", "p1").unwrap()),
            [2, 1]
        );
        let typed = store.history_type("t1", "Patient", None, None, 10).unwrap();
        assert_eq!(versions(typed), [2, 1]);
        let v1 = store.vread("t1", "Patient", "p1", 1).unwrap().unwrap();
        assert_eq!(v1.resource().unwrap()["name"][0]["family"], "A");
        let v2 = store.vread("t1", "Patient", "p1", 2).unwrap().unwrap();
        assert_eq!(v2.resource().unwrap()["name"][0]["family"], "B");
        assert!(store.vread("t1", "Patient", "p1", 3).unwrap().is_none());
    }

    #[test]
    fn content_hash_is_the_hash_of_the_serialized_bytes() {
        // Stores keep this hash beside each resource: it must not change with how it is computed.
        let v = json!({"resourceType": "Patient", "id": "p", "name": [{"family": "Ünïcode \"q\""}],
                       "meta": {"versionId": "3", "lastUpdated": "2026-01-01T00:00:00Z"}});
        let mut plain = v.clone();
        plain.as_object_mut().unwrap().remove("meta");
        let whole = xxhash_rust::xxh3::xxh3_128(&serde_json::to_vec(&plain).unwrap());
        assert_eq!(content_hash(&v), whole);
        assert_eq!(content_hash(&plain), whole);
        let big = json!({"resourceType": "Binary", "data": "x".repeat(100_000)});
        assert_eq!(
            content_hash(&big),
            xxhash_rust::xxh3::xxh3_128(&serde_json::to_vec(&big).unwrap())
        );
    }

    #[test]
    fn a_spliced_change_event_decodes_like_one_serialized_whole() {
        let resource = json!({"resourceType":"Patient","id":"p1","meta":{"versionId":"2"}});
        let mut ev = OutboxEvent {
            seq: 0,
            event_id: "e1".into(),
            tenant: "t".into(),
            event_type: "fhir.Patient.update".into(),
            resource_type: Some("Patient".into()),
            resource_id: Some("p1".into()),
            version: Some(2),
            patient_id: Some("p1".into()),
            other_patients: Vec::new(),
            source_message: None,
            mapping_version: Some("v".into()),
            occurred_at: 5,
            resource: None,
        };
        let bytes = serde_json::to_vec(&resource).unwrap();
        let deleted = encode_change_event(&ev, None);
        assert_eq!(serde_json::from_slice::<OutboxEvent>(&deleted).unwrap(), ev);
        let spliced = encode_change_event(&ev, Some(&bytes));
        ev.resource = Some(resource);
        assert_eq!(serde_json::from_slice::<OutboxEvent>(&spliced).unwrap(), ev);
        assert_eq!(spliced, encode_event(&ev));
    }

    fn tx(writes: Vec<ResourceWrite>) -> StoreTransaction {
        StoreTransaction {
            tenant: "t1".into(),
            writes,
            ..Default::default()
        }
    }

    /// An ordered reader that races group commits must never see a later event before an
    /// earlier one (it would move its cursor past the earlier one for good).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outbox_reader_racing_commits_sees_no_gaps() {
        let (_d, _db, s) = store();
        let s = std::sync::Arc::new(s);
        const TASKS: u64 = 32;
        const COMMITS: u64 = 20;
        let mut writers = Vec::new();
        for t in 0..TASKS {
            let s = s.clone();
            writers.push(tokio::spawn(async move {
                for c in 0..COMMITS {
                    let writes = (0..4)
                        .map(|i| patient(&format!("p{t}-{c}-{i}"), "Doe"))
                        .collect();
                    s.commit(tx(writes)).await.unwrap();
                }
            }));
        }
        let total = TASKS * COMMITS * 4;
        let reader = {
            let s = s.clone();
            tokio::task::spawn_blocking(move || {
                let mut cursor = 0u64;
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
                while cursor < total {
                    assert!(std::time::Instant::now() < deadline, "stuck at {cursor}");
                    for ev in s.outbox().read_after(cursor, 512).unwrap() {
                        assert_eq!(ev.seq, cursor + 1, "gap in the outbox as read");
                        cursor = ev.seq;
                    }
                }
                cursor
            })
        };
        for w in writers {
            w.await.unwrap();
        }
        assert_eq!(reader.await.unwrap(), total);
    }

    #[test]
    fn records_round_trip_with_and_without_content_hash() {
        let r = StoredResource {
            resource_type: "Patient".into(),
            id: "p1".into(),
            version: 3,
            last_updated: 1_700_000_000_000,
            deleted: false,
            json: Bytes::from_static(br#"{"resourceType":"Patient","id":"p1"}"#),
        };
        for hash in [None, Some(0x0123_4567_89ab_cdef_u128 << 64 | 42)] {
            let raw = r.encode(hash);
            assert_eq!(StoredResource::decode("Patient", "p1", &raw).unwrap(), r);
            assert_eq!(StoredResource::stored_content_hash(&raw), hash);
        }
        let body: Value = serde_json::from_slice(&r.json).unwrap();
        let mut stamped = body.clone();
        stamped["meta"] =
            serde_json::json!({"versionId": "3", "lastUpdated": "2023-11-14T22:13:20.000Z"});
        assert_eq!(content_hash(&body), content_hash(&stamped));
        stamped["meta"]["profile"] = serde_json::json!(["http://example.org/p"]);
        assert_ne!(content_hash(&body), content_hash(&stamped));
    }

    /// Writes planned against the same stored version race into the committer: the first
    /// applies its plan, every later one sees the version moved and is planned again there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_updates_of_one_resource_lose_nothing() {
        let (_d, _db, s) = store();
        let s = std::sync::Arc::new(s);
        let mut tasks = Vec::new();
        for i in 0..24 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.commit(tx(vec![patient("p1", &format!("Name{i}"))]))
                    .await
                    .unwrap()
            }));
        }
        let mut versions = Vec::new();
        for t in tasks {
            let out = t.await.unwrap();
            assert!(out.writes[0].changed);
            versions.push(out.writes[0].version);
        }
        versions.sort_unstable();
        assert_eq!(versions, (1..=24).collect::<Vec<_>>());
        let hist = s.history("t1", "Patient", "p1").unwrap();
        assert_eq!(hist.len(), 24);
        let events = s.outbox().read_after(0, 100).unwrap();
        let mut event_versions: Vec<u64> = events.iter().filter_map(|e| e.version).collect();
        event_versions.sort_unstable();
        assert_eq!(event_versions, versions);
        assert_eq!(
            events
                .iter()
                .filter(|e| e.event_type == "fhir.Patient.create")
                .count(),
            1
        );
    }

    #[tokio::test]
    async fn versions_history_and_identical_replays() {
        let (_d, _db, s) = store();
        let first = s.commit(tx(vec![patient("p1", "Doe")])).await.unwrap();
        assert!(first.writes[0].created);
        assert_eq!(first.event_seqs.len(), 1);
        for _ in 0..3 {
            let again = s.commit(tx(vec![patient("p1", "Doe")])).await.unwrap();
            assert!(!again.writes[0].changed);
            assert!(again.event_seqs.is_empty());
        }
        s.commit(tx(vec![patient("p1", "Roe")])).await.unwrap();
        let cur = s.read("t1", "Patient", "p1").unwrap().unwrap();
        assert_eq!(cur.version, 2);
        let body = cur.resource().unwrap();
        assert_eq!(body["meta"]["versionId"], "2");
        assert_eq!(body["name"][0]["family"], "Roe");
        let hist = s.history("t1", "Patient", "p1").unwrap();
        assert_eq!(
            hist.iter().map(|h| h.version).collect::<Vec<_>>(),
            vec![2, 1]
        );
        assert_eq!(
            s.vread("t1", "Patient", "p1", 1)
                .unwrap()
                .unwrap()
                .resource()
                .unwrap()["name"][0]["family"],
            "Doe"
        );
        assert!(
            s.read("t2", "Patient", "p1").unwrap().is_none(),
            "tenants are isolated"
        );
    }

    #[tokio::test]
    async fn indexes_follow_updates_and_deletes() {
        let (_d, _db, s) = store();
        let obs = json!({"resourceType":"Observation","subject":{"reference":"Patient/p1"},
                         "identifier":[{"system":"urn:lab","value":"o-9"}]});
        s.commit(tx(vec![
            patient("p1", "Doe"),
            ResourceWrite::upsert("Observation", "o1", obs),
        ]))
        .await
        .unwrap();
        let mut comp = s.ids_by_patient("t1", "p1", None).unwrap();
        comp.sort();
        assert_eq!(
            comp,
            vec![
                ("Observation".into(), "o1".into()),
                ("Patient".into(), "p1".into())
            ]
        );
        assert_eq!(
            s.ids_by_identifier("t1", "Patient", Some("urn:mrn"), "123")
                .unwrap(),
            vec!["p1"]
        );
        assert_eq!(
            s.ids_by_identifier("t1", "Patient", None, "123").unwrap(),
            vec!["p1"]
        );
        assert!(s
            .ids_by_identifier("t1", "Patient", Some("urn:other"), "123")
            .unwrap()
            .is_empty());
        assert_eq!(
            s.ids_by_last_updated("t1", "Observation", 0, i64::MAX)
                .unwrap(),
            vec!["o1"]
        );
        let del = ResourceWrite {
            resource_type: "Observation".into(),
            id: "o1".into(),
            op: WriteOp::Delete,
            precondition: Precondition::None,
        };
        s.commit(tx(vec![del])).await.unwrap();
        assert!(s.read("t1", "Observation", "o1").unwrap().unwrap().deleted);
        assert_eq!(
            s.ids_by_patient("t1", "p1", Some("Observation")).unwrap(),
            vec![]
        );
        assert!(s
            .ids_by_last_updated("t1", "Observation", 0, i64::MAX)
            .unwrap()
            .is_empty());
        assert_eq!(s.list("t1", "Observation", None, 10).unwrap().len(), 0);
        assert_eq!(s.list("t1", "Patient", None, 10).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn preconditions_and_atomicity() {
        let (_d, _db, s) = store();
        s.commit(tx(vec![patient("p1", "Doe")])).await.unwrap();
        let mut stale = patient("p1", "X");
        stale.precondition = Precondition::VersionMatch(7);
        let mut fresh = patient("p2", "New");
        fresh.precondition = Precondition::MustNotExist;
        let err = s.commit(tx(vec![fresh, stale])).await.unwrap_err();
        assert!(
            matches!(
                err,
                StorageError::VersionConflict {
                    expected: 7,
                    current: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            s.read("t1", "Patient", "p2").unwrap().is_none(),
            "a failed transaction writes nothing"
        );
        let mut dup = patient("p1", "Y");
        dup.precondition = Precondition::MustNotExist;
        assert!(matches!(
            s.commit(tx(vec![dup])).await.unwrap_err(),
            StorageError::AlreadyExists { .. }
        ));
    }

    #[tokio::test]
    async fn an_if_stored_write_changes_only_a_live_resource() {
        let (_d, _db, s) = store();
        let amend = |id: &str| {
            let mut w = ResourceWrite::merge("Patient", id, json!({"active": false}));
            w.precondition = Precondition::IfStored;
            w
        };
        let out = s.commit(tx(vec![amend("p9")])).await.unwrap();
        assert!(!out.writes[0].changed);
        assert!(
            s.read("t1", "Patient", "p9").unwrap().is_none(),
            "nothing created"
        );
        s.commit(tx(vec![patient("p1", "Doe")])).await.unwrap();
        let out = s.commit(tx(vec![amend("p1")])).await.unwrap();
        assert!(out.writes[0].changed);
        let p1 = s.read("t1", "Patient", "p1").unwrap().unwrap();
        let p1 = p1.resource().unwrap();
        assert_eq!(
            (p1["active"].clone(), p1["name"][0]["family"].clone()),
            (json!(false), json!("Doe"))
        );
        s.commit(tx(vec![ResourceWrite::delete("Patient", "p1")]))
            .await
            .unwrap();
        let out = s.commit(tx(vec![amend("p1")])).await.unwrap();
        assert!(!out.writes[0].changed, "a deleted resource stays deleted");
        assert!(s.read("t1", "Patient", "p1").unwrap().unwrap().deleted);
    }

    #[tokio::test]
    async fn resources_outbox_and_message_state_commit_together() {
        let (_d, db, s) = store();
        let j = FjallJournal::new(db, 0);
        let r = j
            .append(Envelope::builder(Protocol::Hl7v2, &b"MSH"[..]).build())
            .await
            .unwrap();
        let mut t = tx(vec![patient("p1", "Doe")]);
        t.message = Some(MessageUpdate {
            id: r.id,
            state: MessageState::Committed,
            mapping_version: Some("sha256:abc".into()),
            seq: r.seq,
        });
        let out = s.commit(t).await.unwrap();
        let events = s.outbox().read_after(0, 10).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].seq, out.event_seqs[0]);
        assert_eq!(events[0].event_type, "fhir.Patient.create");
        assert_eq!(events[0].patient_id.as_deref(), Some("p1"));
        assert_eq!(
            events[0].source_message.as_deref(),
            Some(r.id.to_string().as_str())
        );
        let st = j.get(r.id).unwrap().unwrap().state;
        assert_eq!(st.state, MessageState::Committed);
        assert_eq!(st.mapping_version.as_deref(), Some("sha256:abc"));
        s.outbox().ack("kafka", events[0].seq).await.unwrap();
        assert_eq!(
            s.outbox()
                .prune_delivered(&["kafka"], i64::MAX)
                .await
                .unwrap(),
            1
        );
        assert!(s.outbox().read_after(0, 10).unwrap().is_empty());
    }

    /// A delete's event names the patient of the resource it deleted, as its create and update
    /// did (a change event without one would be keyed by resource, not by patient); an update
    /// that drops the link names none.
    #[tokio::test]
    async fn a_delete_event_keeps_the_patient_of_what_it_deleted() {
        let (_d, _db, s) = store();
        let obs = |subject: Option<&str>| {
            let mut v = json!({"resourceType": "Observation", "id": "o1", "status": "final",
                "code": {"text": "x"}});
            if let Some(p) = subject {
                v["subject"] = json!({"reference": format!("Patient/{p}")});
            }
            ResourceWrite::upsert("Observation", "o1", v)
        };
        s.commit(tx(vec![obs(Some("p1"))])).await.unwrap();
        s.commit(tx(vec![ResourceWrite::delete("Observation", "o1")]))
            .await
            .unwrap();
        s.commit(tx(vec![obs(Some("p2"))])).await.unwrap();
        s.commit(tx(vec![obs(None)])).await.unwrap();
        let events: Vec<(String, Option<String>)> = s
            .outbox()
            .read_after(0, 10)
            .unwrap()
            .into_iter()
            .map(|e| (e.event_type, e.patient_id))
            .collect();
        let p = |t: &str, p: &str| (t.to_string(), Some(p.to_string()));
        assert_eq!(
            events,
            [
                p("fhir.Observation.create", "p1"),
                p("fhir.Observation.delete", "p1"),
                p("fhir.Observation.create", "p2"),
                ("fhir.Observation.update".to_string(), None),
            ]
        );
    }

    /// A resource in two patients' compartments: its event is keyed by the first and names the
    /// other, so both patients' subscribers can hear of it.
    #[tokio::test]
    async fn an_event_names_every_patient_of_its_resource() {
        let (_d, _db, s) = store();
        let appt = json!({"resourceType": "Appointment", "id": "a1", "status": "booked",
            "participant": [{"actor": {"reference": "Patient/pB"}, "status": "accepted"},
                            {"actor": {"reference": "Patient/pA"}, "status": "accepted"}]});
        s.commit(tx(vec![ResourceWrite::upsert("Appointment", "a1", appt)]))
            .await
            .unwrap();
        let ev = &s.outbox().read_after(0, 10).unwrap()[0];
        assert_eq!(
            (ev.patient_id.as_deref(), ev.other_patients.as_slice()),
            (Some("pA"), &["pB".to_string()][..])
        );
    }

    #[tokio::test]
    async fn a_message_queued_again_while_it_was_mapped_stays_queued() {
        let (_d, db, s) = store();
        let j = FjallJournal::new(db, 0);
        let r = j
            .append(Envelope::builder(Protocol::Hl7v2, &b"MSH"[..]).build())
            .await
            .unwrap();
        // a replay lands between the worker's read of entry 1 and its commit
        let again = j.replay(&[r.id]).await.unwrap();
        let mut t = tx(vec![patient("p1", "Doe")]);
        t.message = Some(MessageUpdate {
            id: r.id,
            state: MessageState::Committed,
            mapping_version: Some("old".into()),
            seq: r.seq,
        });
        s.commit(t).await.unwrap();
        let st = j.get(r.id).unwrap().unwrap().state;
        assert_eq!((st.state, st.seq), (MessageState::Received, Some(again[0])));
        assert_eq!(st.mapping_version, None, "the newer entry will map it");
        assert!(
            s.read("t1", "Patient", "p1").unwrap().is_some(),
            "the writes commit"
        );
    }

    #[tokio::test]
    async fn prune_delivered_keeps_what_a_consumer_still_needs_and_what_is_recent() {
        let (_d, db, s) = store();
        for id in ["p1", "p2", "p3"] {
            s.commit(tx(vec![patient(id, "Doe")])).await.unwrap();
        }
        let ev = s.outbox().read_after(0, 10).unwrap();
        let seqs: Vec<u64> = ev.iter().map(|e| e.seq).collect();
        let later = tributary_core::now_millis() + 60_000;
        s.outbox().ack("kafka", seqs[1]).await.unwrap();
        s.outbox().ack("amqp", seqs[2]).await.unwrap();
        let ob = s.outbox().clone();
        assert_eq!(
            ob.prune_delivered(&[], later).await.unwrap(),
            0,
            "no consumer"
        );
        assert_eq!(
            ob.prune_delivered(&["kafka", "amqp"], 0).await.unwrap(),
            0,
            "nothing is old enough"
        );
        assert_eq!(
            ob.prune_delivered(&["kafka", "amqp"], later).await.unwrap(),
            2
        );
        let left: Vec<u64> = ob
            .read_after(0, 10)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(left, vec![seqs[2]], "kafka has not delivered the third yet");
        // Sequence numbers go on after the prune, also after a restart.
        drop((ob, s));
        drop(db);
        let db = Db::open(_d.path(), DbOptions::default()).unwrap();
        let s = FjallStore::new(db);
        s.commit(tx(vec![patient("p4", "Doe")])).await.unwrap();
        let last = s.outbox().read_after(0, 10).unwrap().last().unwrap().seq;
        assert_eq!(last, seqs[2] + 1);
    }

    fn person(id: &str, name: Value, birth: &str) -> ResourceWrite {
        ResourceWrite::upsert(
            "Patient",
            id,
            json!({"resourceType":"Patient","name":name,"birthDate":birth}),
        )
    }

    #[tokio::test]
    async fn names_and_birth_dates_are_found_by_prefix_and_range_and_leave_the_index_with_their_version(
    ) {
        let (_d, _db, s) = store();
        s.commit(tx(vec![
            person(
                "p1",
                json!([{"family":"Müller","given":["Anna","Lena"]}]),
                "1980-03-05",
            ),
            person("p2", json!([{"text":"Ann Smith","family":"Smith"}]), "1980"),
            person("p3", json!([{"family":"Annan"}]), "1991-12-31"),
            ResourceWrite::upsert(
                "Organization",
                "o1",
                json!({"resourceType":"Organization","name":"Annex Clinic"}),
            ),
        ]))
        .await
        .unwrap();
        let prefix =
            |param: &str, v: &str| s.ids_by_string_prefix("t1", "Patient", param, v).unwrap();
        assert_eq!(prefix("name", "ann"), vec!["p1", "p2", "p3"]);
        assert_eq!(prefix("name", "mul"), vec!["p1"]);
        assert_eq!(prefix("name", "len"), vec!["p1"]);
        assert_eq!(prefix("family", "ann"), vec!["p3"]);
        assert_eq!(prefix("family", "smith"), vec!["p2"]);
        assert!(prefix("name", "bob").is_empty());
        assert_eq!(
            s.ids_by_string_prefix("t1", "Organization", "name", "annex c")
                .unwrap(),
            vec!["o1"]
        );
        assert!(s
            .ids_by_string_prefix("t2", "Patient", "name", "ann")
            .unwrap()
            .is_empty());
        assert_eq!(prefix("birthdate", "1980"), vec!["p1", "p2"]);
        let range = |from: &str, to: Option<&str>| {
            s.ids_by_string_range("t1", "Patient", "birthdate", from, to)
                .unwrap()
        };
        assert_eq!(range("1981", None), vec!["p3"]);
        assert_eq!(range("", Some("1981")), vec!["p1", "p2"]);
        assert_eq!(range("1980-03-05", Some("1980-03-06")), vec!["p1"]);

        // A new version replaces its index entries; a deleted resource has none.
        s.commit(tx(vec![person(
            "p1",
            json!([{"family":"Berg"}]),
            "1975-01-01",
        )]))
        .await
        .unwrap();
        assert_eq!(prefix("name", "ann"), vec!["p2", "p3"]);
        assert_eq!(prefix("name", "berg"), vec!["p1"]);
        assert_eq!(prefix("birthdate", "1980"), vec!["p2"]);
        let del = ResourceWrite {
            resource_type: "Patient".into(),
            id: "p2".into(),
            op: WriteOp::Delete,
            precondition: Precondition::None,
        };
        s.commit(tx(vec![del])).await.unwrap();
        assert_eq!(prefix("name", "ann"), vec!["p3"]);
        assert!(prefix("birthdate", "1980").is_empty());
    }

    /// A store written before the string index, or before a Provenance was in the compartment
    /// of the Patients it targets, gets those index entries written when it is opened.
    #[tokio::test]
    async fn resources_stored_before_an_index_are_indexed_when_the_store_opens() {
        let dir = tempfile::tempdir().unwrap();
        let provenance = |id: &str, targets: &[&str]| {
            let target: Vec<Value> = targets.iter().map(|t| json!({"reference": t})).collect();
            ResourceWrite::upsert(
                "Provenance",
                id,
                json!({"resourceType": "Provenance", "target": target}),
            )
        };
        {
            let db = Db::open(dir.path(), DbOptions::default()).unwrap();
            let s = FjallStore::new(db.clone());
            s.commit(tx(vec![
                person("p1", json!([{"family":"Okafor"}]), "1990-07-01"),
                person("p2", json!([{"family":"Okoro"}]), "1990-08-01"),
                provenance("pv1", &["Patient/p1", "Observation/o1", "Patient/p2"]),
                provenance("pv2", &["Observation/o1"]),
            ]))
            .await
            .unwrap();
            assert_eq!(
                s.ids_by_patient("t1", "p2", Some("Provenance")).unwrap(),
                vec![("Provenance".to_string(), "pv1".to_string())]
            );
            let provenance_keys: Vec<Vec<u8>> = db
                .prefix(Table::IdxPatient, b"")
                .map(|i| i.key().unwrap().to_vec())
                .filter(|k| k.windows(10).any(|w| w == b"Provenance"))
                .collect();
            assert_eq!(
                provenance_keys.len(),
                2,
                "pv1 in p1's and p2's compartments"
            );
            db.committer()
                .run(move |txn| {
                    for k in provenance_keys {
                        txn.delete(Table::IdxPatient, k);
                    }
                    txn.delete(Table::Meta, PROVENANCE_PATIENTS_BUILT.to_vec());
                    Ok(())
                })
                .await
                .unwrap();
            let del = ResourceWrite {
                resource_type: "Patient".into(),
                id: "p2".into(),
                op: WriteOp::Delete,
                precondition: Precondition::None,
            };
            s.commit(tx(vec![del])).await.unwrap();
            // as an older store left it: no string index, no marker
            let keys: Vec<Vec<u8>> = db
                .prefix(Table::IdxString, b"")
                .map(|i| i.key().unwrap().to_vec())
                .collect();
            assert_eq!(keys.len(), 3, "p1's name, family and birth date");
            db.committer()
                .run(move |txn| {
                    for k in keys {
                        txn.delete(Table::IdxString, k);
                    }
                    txn.delete(Table::Meta, STRING_INDEX_BUILT.to_vec());
                    Ok(())
                })
                .await
                .unwrap();
            assert!(s
                .ids_by_string_prefix("t1", "Patient", "name", "ok")
                .unwrap()
                .is_empty());
        }
        let db = Db::open(dir.path(), DbOptions::default()).unwrap();
        let s = FjallStore::new(db);
        assert_eq!(
            s.ids_by_string_prefix("t1", "Patient", "name", "oka")
                .unwrap(),
            vec!["p1"]
        );
        assert!(s
            .ids_by_string_prefix("t1", "Patient", "name", "okoro")
            .unwrap()
            .is_empty());
        assert_eq!(
            s.ids_by_string_prefix("t1", "Patient", "birthdate", "1990")
                .unwrap(),
            vec!["p1"]
        );
        for p in ["p1", "p2"] {
            assert_eq!(
                s.ids_by_patient("t1", p, Some("Provenance")).unwrap(),
                vec![("Provenance".to_string(), "pv1".to_string())],
                "{p}"
            );
        }
    }

    #[test]
    fn a_merge_adds_list_items_replacing_those_with_the_same_values_and_keeps_the_rest() {
        let stored = json!({"resourceType":"Patient","id":"p1",
            "meta":{"versionId":"3","lastUpdated":"2026-01-01T00:00:00.000Z","source":"urn:feed"},
            "birthDate":"1980-02-14","active":true,
            "identifier":[{"system":"urn:mrn","value":"7","period":{"start":"2020"}},
                          {"system":"urn:ssn","value":"9"}],
            "name":[{"family":"Doe","given":["Ann","B"]}]});
        let given = json!({"resourceType":"Patient","id":"p1","active":false,
            "identifier":[{"system":"urn:mrn","value":"7"}],
            "name":[{"family":"Doe","given":["Ann"]},{"family":"Roe"}],
            "link":[{"other":{"reference":"Patient/p2"},"type":"replaced-by"}]});
        let merged = merge_into(stored, &given);
        assert_eq!(
            merged,
            json!({"resourceType":"Patient","id":"p1","meta":{"source":"urn:feed"},
                "birthDate":"1980-02-14","active":false,
                "identifier":[{"system":"urn:mrn","value":"7"},{"system":"urn:ssn","value":"9"}],
                "name":[{"family":"Doe","given":["Ann"]},{"family":"Roe"}],
                "link":[{"other":{"reference":"Patient/p2"},"type":"replaced-by"}]})
        );
        // merging the same elements again changes nothing
        assert_eq!(merge_into(merged.clone(), &given), merged);
        // two writers that each merge part of what the other gave: once both are in, merging
        // either again leaves the resource as it is (no reordering, so no new version)
        let a = json!({"identifier":[{"value":"NS-A"},{"system":"urn:oid","value":"1.2"}]});
        let b = json!({"identifier":[{"value":"NS-B"},{"system":"urn:oid","value":"1.2"}]});
        let both = merge_into(merge_into(json!({}), &a), &b);
        assert_eq!(both["identifier"].as_array().unwrap().len(), 3, "{both}");
        assert_eq!(merge_into(both.clone(), &a), both);
        assert_eq!(merge_into(both.clone(), &b), both);
    }

    #[tokio::test]
    async fn a_merge_creates_what_is_absent_and_an_equal_merge_is_no_new_version() {
        let (_d, _db, s) = store();
        let m = || ResourceWrite::merge("Patient", "p1", json!({"active": false}));
        let o = s.commit(tx(vec![m()])).await.unwrap();
        assert!(o.writes[0].created);
        s.commit(tx(vec![person("p1", json!([{"family":"Doe"}]), "1980")]))
            .await
            .unwrap();
        let o = s.commit(tx(vec![m()])).await.unwrap();
        assert!(o.writes[0].changed);
        let r = s
            .read("t1", "Patient", "p1")
            .unwrap()
            .unwrap()
            .resource()
            .unwrap();
        assert_eq!(
            (r["active"].clone(), r["birthDate"].clone()),
            (json!(false), json!("1980"))
        );
        let o = s.commit(tx(vec![m()])).await.unwrap();
        assert!(!o.writes[0].changed);
        assert_eq!(s.history("t1", "Patient", "p1").unwrap().len(), 3);
    }
}
