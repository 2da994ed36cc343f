//! The output tree the runner builds: cheaper than `serde_json::Value` (element names are
//! `&'static str` from the FHIR tables, objects are small sorted vectors instead of B-trees,
//! constants are shared with the mapping set), serialized straight to JSON bytes. Objects keep
//! their keys sorted, so the JSON is byte for byte what `serde_json` writes for the same `Value`.

use serde_json::{Map, Number, Value};
use std::borrow::Cow;
use std::sync::Arc;
use tributary_core::covers;

/// A member name: borrowed ones are FHIR element names (plain identifiers, written without an
/// escape check); owned ones come from constants.
pub(crate) type Key = Cow<'static, str>;

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Node {
    Null,
    Bool(bool),
    Num(Number),
    Str(String),
    Arr(Vec<Node>),
    Obj(Obj),
    /// A constant of the mapping set, shared rather than copied.
    Const(Arc<Constant>),
}

/// A `value:` of a mapping rule, with its JSON written once when the mapping set is loaded.
#[derive(Debug, PartialEq)]
pub(crate) struct Constant {
    pub value: Value,
    json: Box<[u8]>,
}

impl Constant {
    pub fn new(value: Value) -> Self {
        let mut json = Vec::new();
        write_value(&mut json, &value);
        Self {
            value,
            json: json.into(),
        }
    }
}

/// What [`Obj::fill_from`] did with the other object's members.
#[derive(Debug, Default)]
pub(crate) struct Filled {
    /// Members this object lacked, moved in whole.
    pub added: Vec<Key>,
    /// Lists both held: for each item of the other's, its index in the merged list, or `None`
    /// where an item already there covers it.
    pub lists: Vec<(Key, Vec<Option<usize>>)>,
    /// Elements both held where the other's says something this one's does not: kept as this
    /// object has them.
    pub conflicting: Vec<Key>,
}

/// Object members sorted by key.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Obj(Vec<(Key, Node)>);

impl Obj {
    pub fn new() -> Self {
        Self(Vec::new())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn find(&self, key: &str) -> Result<usize, usize> {
        self.0
            .binary_search_by(|(k, _)| key_cmp(k.as_bytes(), key.as_bytes()))
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Node> {
        self.find(key).ok().map(|i| &mut self.0[i].1)
    }

    /// Removes `key` (and its value) if present.
    pub fn remove(&mut self, key: &str) -> Option<Node> {
        self.find(key).ok().map(|i| self.0.remove(i).1)
    }

    /// The value at `key`, inserting `make()` first when absent.
    pub fn get_or_insert_with(
        &mut self,
        key: &'static str,
        make: impl FnOnce() -> Node,
    ) -> &mut Node {
        let i = match self.find(key) {
            Ok(i) => i,
            Err(i) => {
                self.0.insert(i, (Cow::Borrowed(key), make()));
                i
            }
        };
        &mut self.0[i].1
    }

    /// Sets `key` unless it is already set.
    pub fn insert_new(&mut self, key: &'static str, v: Node) {
        if let Err(i) = self.find(key) {
            self.0.insert(i, (Cow::Borrowed(key), v));
        }
    }

    /// Moves in every member of `other` whose key this object lacks, and into a list both hold
    /// the items of `other`'s that no item of this one covers (see [`covers`]) — a list gains
    /// items as the store's `write: merge` does. Other elements both hold where `other`'s value
    /// says something this object's does not are not merged; the caller reports them.
    pub fn fill_from(&mut self, other: Obj) -> Filled {
        let mut filled = Filled::default();
        for (k, v) in other.0 {
            match self.find(&k) {
                Err(i) => {
                    filled.added.push(k.clone());
                    self.0.insert(i, (k, v));
                }
                Ok(i) => {
                    if covers_view(View::Node(&self.0[i].1), View::Node(&v)) {
                        continue;
                    }
                    match (self.0[i].1.clone().into_value(), v.into_value()) {
                        (Value::Array(mut items), Value::Array(new)) => {
                            let mut places = Vec::with_capacity(new.len());
                            for item in new {
                                if items.iter().any(|have| covers(have, &item)) {
                                    places.push(None);
                                } else {
                                    places.push(Some(items.len()));
                                    items.push(item);
                                }
                            }
                            self.0[i].1 = Node::from_value(&Value::Array(items));
                            filled.lists.push((k, places));
                        }
                        _ => filled.conflicting.push(k),
                    }
                }
            }
        }
        filled
    }

    /// Sets `key` (replacing an existing value, as a map does).
    pub fn insert(&mut self, key: impl Into<Key>, v: Node) {
        let key = key.into();
        match self.find(&key) {
            Ok(i) => self.0[i].1 = v,
            Err(i) => self.0.insert(i, (key, v)),
        }
    }

    pub fn into_value(self) -> Value {
        Value::Object(
            self.0
                .into_iter()
                .map(|(k, v)| (k.into_owned(), v.into_value()))
                .collect::<Map<String, Value>>(),
        )
    }

    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        self.write_members(out, |_| true, false);
        out.push(b'}');
    }

    /// Members `keep` accepts, comma-separated (`leading_comma`: one before the first).
    fn write_members(&self, out: &mut Vec<u8>, keep: impl Fn(&str) -> bool, leading_comma: bool) {
        let mut first = !leading_comma;
        for (k, v) in self.0.iter().filter(|(k, _)| keep(k)) {
            if !first {
                out.push(b',');
            }
            first = false;
            write_key(out, k);
            v.write_json(out);
        }
    }

    /// A resource as the store keeps it: `resourceType`, `id` and `meta` first, `meta` starting
    /// with `versionId` and `lastUpdated` — the bytes the store writes for the equal `Value`.
    pub fn write_stamped(&self, out: &mut Vec<u8>, version: &str, last_updated: &str) {
        const LEADING: [&str; 3] = ["resourceType", "id", "meta"];
        out.push(b'{');
        for k in &LEADING[..2] {
            if let Some(v) = self.get(k) {
                write_key(out, &Cow::Borrowed(*k));
                v.write_json(out);
                out.push(b',');
            }
        }
        out.extend_from_slice(b"\"meta\":{\"versionId\":");
        write_str(out, version);
        out.extend_from_slice(b",\"lastUpdated\":");
        write_str(out, last_updated);
        match self.get("meta") {
            Some(Node::Obj(meta)) => {
                meta.write_members(out, |k| k != "versionId" && k != "lastUpdated", true)
            }
            Some(Node::Const(c)) => {
                if let Some(meta) = c.value.as_object() {
                    for (k, v) in meta {
                        if k != "versionId" && k != "lastUpdated" {
                            out.push(b',');
                            write_str(out, k);
                            out.push(b':');
                            write_value(out, v);
                        }
                    }
                }
            }
            _ => {}
        }
        out.push(b'}');
        self.write_members(out, |k| !LEADING.contains(&k), true);
        out.push(b'}');
    }
}

impl Node {
    pub fn str(s: impl Into<String>) -> Self {
        Node::Str(s.into())
    }

    /// An owned tree for a constant that a later rule adds to.
    pub fn from_value(v: &Value) -> Self {
        match v {
            Value::Null => Node::Null,
            Value::Bool(b) => Node::Bool(*b),
            Value::Number(n) => Node::Num(n.clone()),
            Value::String(s) => Node::Str(s.clone()),
            Value::Array(a) => Node::Arr(a.iter().map(Node::from_value).collect()),
            Value::Object(o) => Node::Obj(Obj(o
                .iter()
                .map(|(k, v)| (Cow::Owned(k.clone()), Node::from_value(v)))
                .collect())),
        }
    }

    pub fn into_value(self) -> Value {
        match self {
            Node::Null => Value::Null,
            Node::Bool(b) => Value::Bool(b),
            Node::Num(n) => Value::Number(n),
            Node::Str(s) => Value::String(s),
            Node::Arr(a) => Value::Array(a.into_iter().map(Node::into_value).collect()),
            Node::Obj(o) => o.into_value(),
            Node::Const(c) => c.value.clone(),
        }
    }

    pub fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Node::Null => out.extend_from_slice(b"null"),
            Node::Bool(true) => out.extend_from_slice(b"true"),
            Node::Bool(false) => out.extend_from_slice(b"false"),
            Node::Num(n) => write_value(out, n),
            Node::Str(s) => write_str(out, s),
            Node::Arr(a) => {
                out.push(b'[');
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    v.write_json(out);
                }
                out.push(b']');
            }
            Node::Obj(o) => o.write_json(out),
            Node::Const(c) => out.extend_from_slice(&c.json),
        }
    }
}

fn write_key(out: &mut Vec<u8>, k: &Key) {
    match k {
        Cow::Borrowed(name) => {
            out.push(b'"');
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
        }
        Cow::Owned(k) => {
            write_str(out, k);
            out.push(b':');
        }
    }
}

/// [`covers`] over the tree as built, without copying it into `Value`s: most second readings
/// hold nothing new, and the check runs for every element both readings wrote.
fn covers_view(a: View, b: View) -> bool {
    match b {
        View::Node(Node::Const(c)) => covers_view(a, View::Value(&c.value)),
        View::Obj(o) | View::Node(Node::Obj(o)) => {
            a.is_object()
                && o.0
                    .iter()
                    .all(|(k, bv)| a.get(k).is_some_and(|av| covers_view(av, View::Node(bv))))
        }
        View::Value(Value::Object(m)) => {
            a.is_object()
                && m.iter()
                    .all(|(k, bv)| a.get(k).is_some_and(|av| covers_view(av, View::Value(bv))))
        }
        View::Node(Node::Arr(items)) => items_cover(a, items.len(), |j| View::Node(&items[j])),
        View::Value(Value::Array(items)) => items_cover(a, items.len(), |j| View::Value(&items[j])),
        _ => match (scalar(a), scalar(b)) {
            (Some(x), Some(y)) => x == y,
            _ => false,
        },
    }
}

/// Whether `a` is a list and each of `n` items (`item(j)`) is covered by one of its items.
fn items_cover<'b>(a: View, n: usize, item: impl Fn(usize) -> View<'b>) -> bool {
    let Some(len) = a.array_len() else {
        return false;
    };
    (0..n).all(|j| {
        let b = item(j);
        (0..len).any(|i| a.element(i).is_some_and(|av| covers_view(av, b)))
    })
}

#[derive(PartialEq)]
enum Scalar<'a> {
    Null,
    Bool(bool),
    Num(&'a Number),
    Str(&'a str),
}

fn scalar(v: View) -> Option<Scalar> {
    Some(match v {
        View::Node(Node::Null) | View::Value(Value::Null) => Scalar::Null,
        View::Node(Node::Bool(b)) | View::Value(Value::Bool(b)) => Scalar::Bool(*b),
        View::Node(Node::Num(n)) | View::Value(Value::Number(n)) => Scalar::Num(n),
        View::Node(Node::Str(s)) | View::Value(Value::String(s)) => Scalar::Str(s),
        View::Node(Node::Const(c)) => return scalar(View::Value(&c.value)),
        _ => return None,
    })
}

/// A read-only view of a place in the tree, which may lie inside a shared constant.
#[derive(Clone, Copy, Debug)]
pub(crate) enum View<'a> {
    Obj(&'a Obj),
    Node(&'a Node),
    Value(&'a Value),
}

impl<'a> View<'a> {
    pub fn get(self, key: &str) -> Option<View<'a>> {
        match self {
            View::Obj(o) | View::Node(Node::Obj(o)) => o.get(key).map(View::Node),
            View::Node(Node::Const(c)) => View::Value(&c.value).get(key),
            View::Value(Value::Object(o)) => o.get(key).map(View::Value),
            _ => None,
        }
    }

    pub fn array_len(self) -> Option<usize> {
        match self {
            View::Node(Node::Arr(a)) => Some(a.len()),
            View::Node(Node::Const(c)) => View::Value(&c.value).array_len(),
            View::Value(Value::Array(a)) => Some(a.len()),
            _ => None,
        }
    }

    pub fn first(self) -> Option<View<'a>> {
        self.element(0)
    }

    pub fn element(self, index: usize) -> Option<View<'a>> {
        match self {
            View::Node(Node::Arr(a)) => a.get(index).map(View::Node),
            View::Node(Node::Const(c)) => View::Value(&c.value).element(index),
            View::Value(Value::Array(a)) => a.get(index).map(View::Value),
            _ => None,
        }
    }

    pub fn as_str(self) -> Option<&'a str> {
        match self {
            View::Node(Node::Str(s)) => Some(s),
            View::Node(Node::Const(c)) => c.value.as_str(),
            View::Value(v) => v.as_str(),
            _ => None,
        }
    }

    pub fn is_object(self) -> bool {
        match self {
            View::Obj(_) | View::Node(Node::Obj(_)) => true,
            View::Node(Node::Const(c)) => c.value.is_object(),
            View::Value(v) => v.is_object(),
            View::Node(_) => false,
        }
    }
}

/// A read-only view into a mapped resource, for code outside this crate (the store's indexes).
#[derive(Clone, Copy, Debug)]
pub struct ResourceView<'a>(pub(crate) View<'a>);

impl<'a> ResourceView<'a> {
    pub fn get(self, key: &str) -> Option<Self> {
        self.0.get(key).map(Self)
    }
    pub fn as_str(self) -> Option<&'a str> {
        self.0.as_str()
    }
    pub fn array_len(self) -> Option<usize> {
        self.0.array_len()
    }
    pub fn element(self, index: usize) -> Option<Self> {
        self.0.element(index).map(Self)
    }
    pub fn is_object(self) -> bool {
        self.0.is_object()
    }
}

/// Byte order, as `str` orders; an inline loop beats a `memcmp` call for short element names.
fn key_cmp(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    for (x, y) in a.iter().zip(b) {
        if x != y {
            return x.cmp(y);
        }
    }
    a.len().cmp(&b.len())
}

fn write_value<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    // writing to a Vec fails only for values serde_json cannot represent, which a Value is not
    let _ = serde_json::to_writer(out, v);
}

/// A JSON string; text without quotes, backslashes or control characters (nearly all of it)
/// is copied as is, the rest is escaped by `serde_json`.
pub(crate) fn write_str(out: &mut Vec<u8>, s: &str) {
    // no early exit: short strings check faster without the branch
    let special = s.bytes().fold(false, |acc, b| {
        acc | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if special {
        write_value(out, s);
    } else {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn writes_what_serde_json_writes() {
        let mut o = Obj::new();
        o.insert("zeta", Node::str("a \"quoted\"\n\tline \\ é"));
        o.insert("alpha", Node::Num(Number::from(-3)));
        o.insert("mid", Node::Num(Number::from_f64(65.88).unwrap()));
        let mut inner = Obj::new();
        inner.insert("b", Node::Bool(false));
        inner.insert("a", Node::Null);
        o.insert(
            "arr",
            Node::Arr(vec![
                Node::Obj(inner),
                Node::Const(Arc::new(Constant::new(json!({"y": [1, "x"], "x": true})))),
            ]),
        );
        o.insert("alpha", Node::Num(Number::from(7)));
        let mut bytes = Vec::new();
        o.write_json(&mut bytes);
        let value = o.into_value();
        assert_eq!(bytes, serde_json::to_vec(&value).unwrap());
        assert_eq!(value["alpha"], 7);
        assert_eq!(value["arr"][1]["y"][1], "x");
    }

    #[test]
    fn the_tree_check_agrees_with_the_value_check() {
        let cases = [
            json!({"name": [{"family": "Doe", "given": ["Jane", "Q"]}], "n": 1, "b": true}),
            json!({"name": [{"family": "Doe"}]}),
            json!({"name": [{"family": "Dow"}]}),
            json!({"name": [{"given": ["Q"]}], "b": true}),
            json!({"n": 1.0}),
            json!({"n": 1, "x": null}),
            json!({"name": {"family": "Doe"}}),
            json!({}),
            json!([]),
            json!("Doe"),
        ];
        for a in &cases {
            for b in &cases {
                let built = Node::from_value(b);
                let shared = Node::Const(Arc::new(Constant::new(a.clone())));
                assert_eq!(
                    covers_view(View::Node(&shared), View::Node(&built)),
                    covers(a, b),
                    "{a} covers {b}"
                );
                assert_eq!(
                    covers_view(View::Node(&Node::from_value(a)), View::Value(b)),
                    covers(a, b),
                    "{a} covers {b}"
                );
            }
        }
    }

    #[test]
    fn fill_from_adds_what_is_missing_and_names_what_differs() {
        let mut first = Obj::new();
        first.insert("gender", Node::str("female"));
        first.insert(
            "name",
            Node::Const(Arc::new(Constant::new(
                json!([{"family": "Doe", "given": ["Jane"]}]),
            ))),
        );
        first.insert("identifier", Node::from_value(&json!([{"value": "1234"}])));
        first.insert("maritalStatus", Node::from_value(&json!({"text": "M"})));
        let mut second = Obj::new();
        second.insert("gender", Node::str("male"));
        second.insert("name", Node::from_value(&json!([{"family": "Doe"}])));
        second.insert("address", Node::from_value(&json!([{"city": "Ann Arbor"}])));
        second.insert(
            "identifier",
            Node::from_value(&json!([{"value": "1234"}, {"value": "ABC", "system": "urn:id:x"}])),
        );
        second.insert("maritalStatus", Node::from_value(&json!({"text": "S"})));
        let filled = first.fill_from(second);
        assert_eq!(filled.added, vec![Key::Borrowed("address")]);
        assert_eq!(
            filled.lists,
            vec![(Key::Borrowed("identifier"), vec![None, Some(1)])]
        );
        assert_eq!(
            filled.conflicting,
            vec![Key::Borrowed("gender"), Key::Borrowed("maritalStatus")]
        );
        let merged = first.clone().into_value();
        assert_eq!(merged["gender"], "female");
        assert_eq!(merged["maritalStatus"]["text"], "M");
        assert_eq!(merged["address"][0]["city"], "Ann Arbor");
        assert_eq!(
            merged["name"],
            json!([{"family": "Doe", "given": ["Jane"]}])
        );
        assert_eq!(
            merged["identifier"],
            json!([{"value": "1234"}, {"value": "ABC", "system": "urn:id:x"}])
        );
        // what the merged resource holds serializes as a built one would
        let mut bytes = Vec::new();
        first.write_json(&mut bytes);
        assert_eq!(bytes, serde_json::to_vec(&merged).unwrap());
    }

    #[test]
    fn stamps_lead_with_type_id_and_meta_whether_meta_is_built_or_constant() {
        let mut built = Obj::new();
        let mut meta = Obj::new();
        meta.insert("tag", Node::Arr(vec![Node::str("t")]));
        built.insert("meta", Node::Obj(meta));
        let mut constant = Obj::new();
        let c = json!({"tag": ["t"], "versionId": "9", "lastUpdated": "old"});
        constant.insert("meta", Node::Const(Arc::new(Constant::new(c))));
        for mut o in [built, constant] {
            o.insert("resourceType", Node::str("Patient"));
            o.insert("id", Node::str("p1"));
            o.insert("active", Node::Bool(true));
            o.insert("zzz", Node::Null);
            let mut out = Vec::new();
            o.write_stamped(&mut out, "2", "2026-12-03T08:00:00.000Z");
            assert_eq!(
                String::from_utf8(out).unwrap(),
                r#"{"resourceType":"Patient","id":"p1","meta":{"versionId":"2","lastUpdated":"2026-12-03T08:00:00.000Z","tag":["t"]},"active":true,"zzz":null}"#
            );
        }
    }
}
