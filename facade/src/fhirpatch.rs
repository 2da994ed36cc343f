//! FHIRPath Patch (FHIR R4 `fhirpatch.html`): a `Parameters` resource of `operation`s — `add`,
//! `insert`, `delete`, `replace`, `move` — whose paths are FHIRPath expressions. It is the body of
//! `PATCH /fhir/{type}/{id}` with `Content-Type: application/fhir+json`, and of a transaction's
//! `PATCH` entry; the mapping pipeline writes its `write: merge` entries in this form.
//!
//! Paths take the part of FHIRPath a patch needs: the resource type, element names, indexers
//! (`name[0]`), `where(…)`, `first()`, `last()`, `exists(…)`, `empty()`, `not()`, `$this`, and in
//! conditions `=`, `!=`, `contains`, `in`, `and`, `or` with string, number, boolean and `@date`
//! literals. Anything else is a malformed patch (400), never guessed at. Error texts name the
//! operation and its path, never a value from the resource.

use crate::patch::{PatchError, MAX_OPERATIONS};
use serde_json::{Map, Value};
use tributary_core::fhir_r4;

fn malformed(i: usize, what: &str) -> PatchError {
    PatchError::Malformed(format!("operation {i}: {what}"))
}

fn not_applicable(i: usize, path: &str, what: &str) -> PatchError {
    PatchError::NotApplicable(format!("operation {i} ({path}): {what}"))
}

/// Applies a FHIRPath Patch `Parameters` to a copy of `doc`, a resource of type `rtype`.
pub fn apply(doc: &Value, rtype: &str, params: &Value) -> Result<Value, PatchError> {
    if params.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(PatchError::Malformed(
            "a FHIRPath Patch is a Parameters resource".into(),
        ));
    }
    let ops = params
        .get("parameter")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    if ops.len() > MAX_OPERATIONS {
        return Err(PatchError::Malformed(format!(
            "at most {MAX_OPERATIONS} operations, found {}",
            ops.len()
        )));
    }
    let mut doc = doc.clone();
    for (i, op) in ops.iter().enumerate() {
        if op.get("name").and_then(Value::as_str) != Some("operation") {
            return Err(malformed(i, "every parameter is named `operation`"));
        }
        let part = |name: &str| {
            op.get("part").and_then(Value::as_array).and_then(|ps| {
                ps.iter()
                    .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
            })
        };
        let text = |name: &str| -> Option<&str> {
            let p = part(name)?;
            p.as_object()?
                .iter()
                .find(|(k, _)| k.starts_with("value"))
                .and_then(|(_, v)| v.as_str())
        };
        let index = |name: &str| -> Result<Option<usize>, PatchError> {
            match part(name) {
                None => Ok(None),
                Some(p) => p
                    .get("valueInteger")
                    .and_then(Value::as_u64)
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| {
                        malformed(i, &format!("`{name}` is a non-negative valueInteger"))
                    }),
            }
        };
        let kind = text("type").ok_or_else(|| malformed(i, "`type` is missing"))?;
        let path_text = text("path").ok_or_else(|| malformed(i, "`path` is missing"))?;
        let path = parse_path(path_text, rtype).map_err(|e| malformed(i, &e))?;
        let found = path.eval(&doc, rtype).map_err(|e| malformed(i, &e))?;
        match kind {
            "add" => {
                let name = text("name").ok_or_else(|| malformed(i, "add needs `name`"))?;
                let [target] = found.as_slice() else {
                    return Err(not_applicable(
                        i,
                        path_text,
                        "the path must name one element",
                    ));
                };
                let owner = target.ty.clone();
                let value = part("value")
                    .map(|p| part_value(p, owner.as_deref(), Some(name)))
                    .ok_or_else(|| malformed(i, "add needs `value`"))?;
                let many = owner
                    .as_deref()
                    .and_then(|o| fhir_r4::element(o, name))
                    .map(|e| e.many);
                let obj = at_mut(&mut doc, &target.at)
                    .and_then(Value::as_object_mut)
                    .ok_or_else(|| {
                        not_applicable(i, path_text, "the path does not name an object")
                    })?;
                match (obj.get_mut(name), many) {
                    (Some(Value::Array(list)), _) => list.push(value),
                    (Some(_), _) => {
                        return Err(not_applicable(
                            i,
                            path_text,
                            &format!("`{name}` is already there and does not repeat"),
                        ))
                    }
                    (None, Some(true)) => {
                        obj.insert(name.to_string(), Value::Array(vec![value]));
                    }
                    (None, _) => {
                        obj.insert(name.to_string(), value);
                    }
                }
            }
            "insert" | "move" => {
                let list_at = path
                    .list_location(&doc, rtype)
                    .map_err(|e| malformed(i, &e))?
                    .ok_or_else(|| not_applicable(i, path_text, "the path must name a list"))?;
                let ty = found.first().and_then(|f| f.ty.clone());
                let list = at_mut(&mut doc, &list_at)
                    .and_then(Value::as_array_mut)
                    .ok_or_else(|| not_applicable(i, path_text, "the path must name a list"))?;
                if kind == "insert" {
                    let at = index("index")?.ok_or_else(|| malformed(i, "insert needs `index`"))?;
                    let value = part("value")
                        .map(|p| part_value(p, ty.as_deref(), None))
                        .ok_or_else(|| malformed(i, "insert needs `value`"))?;
                    if at > list.len() {
                        return Err(not_applicable(
                            i,
                            path_text,
                            "index past the end of the list",
                        ));
                    }
                    list.insert(at, value);
                } else {
                    let from =
                        index("source")?.ok_or_else(|| malformed(i, "move needs `source`"))?;
                    let to = index("destination")?
                        .ok_or_else(|| malformed(i, "move needs `destination`"))?;
                    if from >= list.len() || to >= list.len() {
                        return Err(not_applicable(
                            i,
                            path_text,
                            "index past the end of the list",
                        ));
                    }
                    let v = list.remove(from);
                    list.insert(to, v);
                }
            }
            "delete" => match found.as_slice() {
                [] => {}
                [one] => remove(&mut doc, &one.at),
                _ => {
                    return Err(not_applicable(
                        i,
                        path_text,
                        "delete removes one element; the path names several",
                    ))
                }
            },
            "replace" => {
                let [one] = found.as_slice() else {
                    return Err(not_applicable(
                        i,
                        path_text,
                        "the path must name one element",
                    ));
                };
                let value = part("value")
                    .map(|p| part_value(p, one.ty.as_deref(), None))
                    .ok_or_else(|| malformed(i, "replace needs `value`"))?;
                *at_mut(&mut doc, &one.at)
                    .ok_or_else(|| not_applicable(i, path_text, "the element is gone"))? = value;
            }
            other => return Err(malformed(i, &format!("unknown operation type {other:?}"))),
        }
    }
    Ok(doc)
}

/// The JSON a `value` part carries: its `value[x]`, or, for a backbone element, an object built
/// from its parts (a child that repeats, by the R4 element table, becomes a list).
fn part_value(p: &Value, owner: Option<&str>, name: Option<&str>) -> Value {
    if let Some((_, v)) = p
        .as_object()
        .and_then(|o| o.iter().find(|(k, _)| k.starts_with("value")))
    {
        return v.clone();
    }
    let ty = match (owner, name) {
        (Some(o), Some(n)) => fhir_r4::element(o, n).map(|e| e.ty),
        (Some(o), None) => Some(o).and_then(fhir_r4::static_type_name),
        _ => None,
    };
    let mut obj = Map::new();
    for child in p
        .get("part")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(cname) = child.get("name").and_then(Value::as_str) else {
            continue;
        };
        let v = part_value(child, ty, Some(cname));
        let many = ty
            .and_then(|t| fhir_r4::element(t, cname))
            .is_some_and(|e| e.many);
        match obj.get_mut(cname) {
            Some(Value::Array(list)) => list.push(v),
            _ if many => {
                obj.insert(cname.to_string(), Value::Array(vec![v]));
            }
            _ => {
                obj.insert(cname.to_string(), v);
            }
        }
    }
    Value::Object(obj)
}

#[derive(Clone, Debug, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// One element a path found: where it is and its FHIR type (when the table knows it).
#[derive(Clone, Debug)]
struct Found {
    at: Vec<Seg>,
    ty: Option<String>,
}

fn at<'a>(doc: &'a Value, at: &[Seg]) -> Option<&'a Value> {
    at.iter().try_fold(doc, |v, s| match s {
        Seg::Key(k) => v.get(k),
        Seg::Index(i) => v.get(*i),
    })
}

fn at_mut<'a>(doc: &'a mut Value, at: &[Seg]) -> Option<&'a mut Value> {
    at.iter().try_fold(doc, |v, s| match s {
        Seg::Key(k) => v.get_mut(k),
        Seg::Index(i) => v.get_mut(*i),
    })
}

/// Removes the element at `at`; a list left empty goes too (FHIR has no empty lists).
fn remove(doc: &mut Value, loc: &[Seg]) {
    let Some((last, parent)) = loc.split_last() else {
        return;
    };
    match (at_mut(doc, parent), last) {
        (Some(Value::Object(o)), Seg::Key(k)) => {
            o.remove(k);
        }
        (Some(Value::Array(a)), Seg::Index(i)) if *i < a.len() => {
            a.remove(*i);
            if a.is_empty() {
                remove(doc, parent);
            }
        }
        _ => {}
    }
}

// ---- the FHIRPath subset ----------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(String),
    Date(String),
    Int(usize),
    Dot,
    Open,
    Close,
    LBracket,
    RBracket,
    Op(&'static str),
}

fn lex(s: &str) -> Result<Vec<Tok>, String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i] as char;
        match c {
            ' ' | '\t' => i += 1,
            '.' => {
                out.push(Tok::Dot);
                i += 1
            }
            '(' => {
                out.push(Tok::Open);
                i += 1
            }
            ')' => {
                out.push(Tok::Close);
                i += 1
            }
            '[' => {
                let end = s[i..].find(']').ok_or("unclosed `[`")? + i;
                let n = s[i + 1..end]
                    .trim()
                    .parse()
                    .map_err(|_| "an indexer takes a number")?;
                out.push(Tok::LBracket);
                out.push(Tok::Int(n));
                out.push(Tok::RBracket);
                i = end + 1;
            }
            '=' => {
                out.push(Tok::Op("="));
                i += 1
            }
            '!' if b.get(i + 1) == Some(&b'=') => {
                out.push(Tok::Op("!="));
                i += 2
            }
            '\'' => {
                let mut v = String::new();
                let mut j = i + 1;
                let chars: Vec<char> = s[j..].chars().collect();
                let mut k = 0;
                loop {
                    let ch = *chars.get(k).ok_or("unclosed string")?;
                    match ch {
                        '\\' => {
                            let e = *chars.get(k + 1).ok_or("unclosed string")?;
                            v.push(match e {
                                'n' => '\n',
                                't' => '\t',
                                'r' => '\r',
                                other => other,
                            });
                            k += 2;
                        }
                        '\'' => break,
                        other => {
                            v.push(other);
                            k += 1
                        }
                    }
                }
                j += chars[..=k].iter().map(|c| c.len_utf8()).sum::<usize>();
                out.push(Tok::Str(v));
                i = j;
            }
            '@' => {
                let end = s[i + 1..]
                    .find(|c: char| !(c.is_ascii_alphanumeric() || "-:.+T".contains(c)))
                    .map_or(s.len(), |e| e + i + 1);
                out.push(Tok::Date(s[i + 1..end].to_string()));
                i = end;
            }
            '0'..='9' | '-' => {
                let end = s[i + 1..]
                    .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                    .map_or(s.len(), |e| e + i + 1);
                out.push(Tok::Num(s[i..end].to_string()));
                i = end;
            }
            c if c.is_ascii_alphabetic() || c == '$' || c == '_' => {
                let end = s[i + 1..]
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .map_or(s.len(), |e| e + i + 1);
                let word = &s[i..end];
                out.push(match word {
                    "and" => Tok::Op("and"),
                    "or" => Tok::Op("or"),
                    "contains" => Tok::Op("contains"),
                    "in" => Tok::Op("in"),
                    _ => Tok::Ident(word.to_string()),
                });
                i = end;
            }
            other => return Err(format!("unexpected {other:?} in the path")),
        }
    }
    Ok(out)
}

#[derive(Clone, Debug)]
enum Step {
    Name(String),
    Index(usize),
    Where(Box<Expr>),
    Exists(Option<Box<Expr>>),
    Empty,
    Not,
    First,
    Last,
}

#[derive(Clone, Debug)]
enum Expr {
    /// A path from the focus (`$this` when it starts there).
    Path(Vec<Step>),
    Lit(Value),
    Bin(&'static str, Box<Expr>, Box<Expr>),
}

struct Parser {
    toks: Vec<Tok>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.at).cloned();
        self.at += 1;
        t
    }

    fn expect(&mut self, t: Tok) -> Result<(), String> {
        match self.next() {
            Some(x) if x == t => Ok(()),
            other => Err(format!("expected {t:?}, found {other:?}")),
        }
    }

    fn expr(&mut self) -> Result<Expr, String> {
        self.binary(0)
    }

    /// Precedence climbing: `or` < `and` < comparisons.
    fn binary(&mut self, level: usize) -> Result<Expr, String> {
        const LEVELS: [&[&str]; 3] = [&["or"], &["and"], &["=", "!=", "contains", "in"]];
        if level == LEVELS.len() {
            return self.term();
        }
        let mut left = self.binary(level + 1)?;
        while let Some(Tok::Op(op)) = self.peek() {
            let op = *op;
            if !LEVELS[level].contains(&op) {
                break;
            }
            self.at += 1;
            let right = self.binary(level + 1)?;
            left = Expr::Bin(op, Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn term(&mut self) -> Result<Expr, String> {
        match self.peek().cloned() {
            Some(Tok::Str(s)) => {
                self.at += 1;
                Ok(Expr::Lit(Value::String(s)))
            }
            Some(Tok::Date(d)) => {
                self.at += 1;
                Ok(Expr::Lit(Value::String(d)))
            }
            Some(Tok::Num(n)) => {
                self.at += 1;
                let v: Value = serde_json::from_str(&n).map_err(|_| format!("bad number {n}"))?;
                Ok(Expr::Lit(v))
            }
            Some(Tok::Ident(w)) if w == "true" || w == "false" => {
                self.at += 1;
                Ok(Expr::Lit(Value::Bool(w == "true")))
            }
            Some(Tok::Open) => {
                self.at += 1;
                let e = self.expr()?;
                self.expect(Tok::Close)?;
                Ok(e)
            }
            Some(Tok::Ident(_)) => Ok(Expr::Path(self.steps()?)),
            other => Err(format!("unexpected {other:?}")),
        }
    }

    fn steps(&mut self) -> Result<Vec<Step>, String> {
        let mut steps = Vec::new();
        loop {
            let Some(Tok::Ident(name)) = self.next() else {
                return Err("expected an element name or function".into());
            };
            if self.peek() == Some(&Tok::Open) {
                self.at += 1;
                let step = match name.as_str() {
                    "where" => Step::Where(Box::new(self.expr()?)),
                    "exists" if self.peek() == Some(&Tok::Close) => Step::Exists(None),
                    "exists" => Step::Exists(Some(Box::new(self.expr()?))),
                    "empty" => Step::Empty,
                    "not" => Step::Not,
                    "first" => Step::First,
                    "last" => Step::Last,
                    other => {
                        return Err(format!(
                            "the function {other}() is not supported in a patch path"
                        ))
                    }
                };
                self.expect(Tok::Close)?;
                steps.push(step);
            } else if name != "$this" {
                steps.push(Step::Name(name));
            }
            while self.peek() == Some(&Tok::LBracket) {
                self.at += 1;
                let Some(Tok::Int(n)) = self.next() else {
                    return Err("an indexer takes a number".into());
                };
                self.expect(Tok::RBracket)?;
                steps.push(Step::Index(n));
            }
            if self.peek() != Some(&Tok::Dot) {
                return Ok(steps);
            }
            self.at += 1;
        }
    }
}

/// A patch path: its steps after the leading resource type.
struct PatchPath(Vec<Step>);

fn parse_path(text: &str, rtype: &str) -> Result<PatchPath, String> {
    let mut p = Parser {
        toks: lex(text)?,
        at: 0,
    };
    let Expr::Path(mut steps) = p.expr()? else {
        return Err("the path must be a FHIRPath path".into());
    };
    if p.at != p.toks.len() {
        return Err("unexpected text after the path".into());
    }
    match steps.first() {
        Some(Step::Name(n)) if n == rtype => {
            steps.remove(0);
        }
        _ => return Err(format!("the path must start with {rtype}")),
    }
    Ok(PatchPath(steps))
}

impl PatchPath {
    fn eval(&self, doc: &Value, rtype: &str) -> Result<Vec<Found>, String> {
        let root = Found {
            at: Vec::new(),
            ty: Some(rtype.to_string()),
        };
        walk(doc, vec![root], &self.0)
    }

    /// Where the list the path's last element name names lives (for `insert` and `move`).
    fn list_location(&self, doc: &Value, rtype: &str) -> Result<Option<Vec<Seg>>, String> {
        let Some((Step::Name(name), prefix)) = self.0.split_last() else {
            return Ok(None);
        };
        let root = Found {
            at: Vec::new(),
            ty: Some(rtype.to_string()),
        };
        let owners = walk(doc, vec![root], prefix)?;
        let [owner] = owners.as_slice() else {
            return Ok(None);
        };
        let mut at = owner.at.clone();
        at.push(Seg::Key(name.clone()));
        Ok(self::at(doc, &at).filter(|v| v.is_array()).map(|_| at))
    }
}

fn walk(doc: &Value, mut focus: Vec<Found>, steps: &[Step]) -> Result<Vec<Found>, String> {
    for step in steps {
        focus =
            match step {
                Step::Name(name) => {
                    let mut next = Vec::new();
                    for f in &focus {
                        let ty =
                            f.ty.as_deref()
                                .and_then(|t| fhir_r4::element(t, name))
                                .map(|e| e.ty.to_string());
                        let mut loc = f.at.clone();
                        loc.push(Seg::Key(name.clone()));
                        match at(doc, &loc) {
                            Some(Value::Array(items)) => {
                                for i in 0..items.len() {
                                    let mut l = loc.clone();
                                    l.push(Seg::Index(i));
                                    next.push(Found {
                                        at: l,
                                        ty: ty.clone(),
                                    });
                                }
                            }
                            Some(_) => next.push(Found { at: loc, ty }),
                            None => {}
                        }
                    }
                    next
                }
                Step::Index(n) => focus.get(*n).cloned().into_iter().collect(),
                Step::First => focus.into_iter().take(1).collect(),
                Step::Last => focus.pop().into_iter().collect(),
                Step::Where(cond) => {
                    let mut keep = Vec::new();
                    for f in focus {
                        if truthy(&eval(doc, &f, cond)?) {
                            keep.push(f);
                        }
                    }
                    keep
                }
                Step::Exists(_) | Step::Empty | Step::Not => return Err(
                    "a patch path names elements; exists(), empty() and not() go inside where()"
                        .into(),
                ),
            };
    }
    Ok(focus)
}

/// A condition's value: a collection of JSON values.
fn eval(doc: &Value, focus: &Found, e: &Expr) -> Result<Vec<Value>, String> {
    Ok(match e {
        Expr::Lit(v) => vec![v.clone()],
        Expr::Path(steps) => {
            // split off a trailing boolean function, which turns the collection into a value
            let (body, tail) = match steps.last() {
                Some(Step::Exists(_) | Step::Empty | Step::Not) => steps.split_at(steps.len() - 1),
                _ => (steps.as_slice(), &[][..]),
            };
            let found = walk(doc, vec![focus.clone()], body)?;
            match tail.first() {
                None => found
                    .iter()
                    .filter_map(|f| at(doc, &f.at).cloned())
                    .collect(),
                Some(Step::Exists(None)) => vec![Value::Bool(!found.is_empty())],
                Some(Step::Exists(Some(cond))) => {
                    let mut any = false;
                    for f in &found {
                        any |= truthy(&eval(doc, f, cond)?);
                    }
                    vec![Value::Bool(any)]
                }
                Some(Step::Empty) => vec![Value::Bool(found.is_empty())],
                Some(Step::Not) => {
                    let v: Vec<Value> = found
                        .iter()
                        .filter_map(|f| at(doc, &f.at).cloned())
                        .collect();
                    vec![Value::Bool(!truthy(&v))]
                }
                Some(_) => unreachable!("only boolean functions are split off"),
            }
        }
        Expr::Bin(op, a, b) => {
            let (l, r) = (eval(doc, focus, a)?, eval(doc, focus, b)?);
            let v = match *op {
                "and" => truthy(&l) && truthy(&r),
                "or" => truthy(&l) || truthy(&r),
                "=" => {
                    l.len() == r.len() && !l.is_empty() && l.iter().zip(&r).all(|(x, y)| same(x, y))
                }
                "!=" => !(l.len() == r.len() && l.iter().zip(&r).all(|(x, y)| same(x, y))),
                "contains" => r.len() == 1 && l.iter().any(|x| same(x, &r[0])),
                "in" => l.len() == 1 && r.iter().any(|y| same(&l[0], y)),
                _ => unreachable!("the parser makes no other operator"),
            };
            vec![Value::Bool(v)]
        }
    })
}

fn truthy(v: &[Value]) -> bool {
    match v {
        [Value::Bool(b)] => *b,
        other => !other.is_empty(),
    }
}

/// FHIRPath equality of two JSON values: numbers by value (`1.0 = 1`), the rest as JSON.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x == y || x.as_f64().zip(y.as_f64()).is_some_and(|(x, y)| x == y)
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn op(kind: &str, path: &str, rest: Value) -> Value {
        let mut part = vec![
            json!({"name": "type", "valueCode": kind}),
            json!({"name": "path", "valueString": path}),
        ];
        part.extend(rest.as_array().cloned().unwrap_or_default());
        json!({"name": "operation", "part": part})
    }

    fn patch(ops: Vec<Value>) -> Value {
        json!({"resourceType": "Parameters", "parameter": ops})
    }

    fn patient() -> Value {
        json!({"resourceType": "Patient", "id": "p1", "active": true, "birthDate": "1980-02-14",
            "identifier": [{"system": "urn:mrn", "value": "7"}, {"system": "urn:ssn", "value": "9"}],
            "name": [{"family": "Doe", "given": ["Ann", "B"]}]})
    }

    #[test]
    fn add_delete_replace_insert_and_move_change_what_their_paths_name() {
        let p = patch(vec![
            op(
                "delete",
                "Patient.identifier.where(system = 'urn:ssn' and value = '9')",
                json!([]),
            ),
            op(
                "add",
                "Patient",
                json!([{"name": "name", "valueString": "link"},
                {"name": "value", "part": [
                    {"name": "other", "valueReference": {"reference": "Patient/p2"}},
                    {"name": "type", "valueCode": "replaced-by"}]}]),
            ),
            op(
                "replace",
                "Patient.active",
                json!([{"name": "value", "valueBoolean": false}]),
            ),
            op(
                "add",
                "Patient",
                json!([{"name": "name", "valueString": "gender"}, {"name": "value", "valueCode": "female"}]),
            ),
            op(
                "insert",
                "Patient.name",
                json!([{"name": "value", "valueHumanName": {"family": "Roe"}}, {"name": "index", "valueInteger": 0}]),
            ),
            op(
                "move",
                "Patient.name",
                json!([{"name": "source", "valueInteger": 1}, {"name": "destination", "valueInteger": 0}]),
            ),
            op(
                "delete",
                "Patient.name[0].given.where($this = 'B')",
                json!([]),
            ),
            op("delete", "Patient.deceasedBoolean", json!([])),
        ]);
        let out = apply(&patient(), "Patient", &p).unwrap();
        assert_eq!(
            out,
            json!({"resourceType": "Patient", "id": "p1", "active": false, "birthDate": "1980-02-14",
                "gender": "female",
                "identifier": [{"system": "urn:mrn", "value": "7"}],
                "name": [{"family": "Doe", "given": ["Ann"]}, {"family": "Roe"}],
                "link": [{"other": {"reference": "Patient/p2"}, "type": "replaced-by"}]})
        );
    }

    #[test]
    fn conditions_compare_nested_values_dates_and_lists() {
        let doc = json!({"resourceType": "Patient", "id": "p1", "birthDate": "1980-02-14",
            "identifier": [{"system": "urn:mrn", "value": "7", "type": {"coding": [{"code": "MR"}]}}],
            "name": [{"family": "O'Neil", "given": ["Ann", "B"]}, {"family": "Doe"}]});
        let deleted = |path: &str| {
            let out = apply(&doc, "Patient", &patch(vec![op("delete", path, json!([]))])).unwrap();
            out != doc
        };
        assert!(deleted("Patient.identifier.where(type.where(coding.where(code = 'MR').exists()).exists() and value = '7')"));
        assert!(!deleted(
            "Patient.identifier.where(type.where(coding.where(code = 'PI').exists()).exists())"
        ));
        assert!(deleted(
            "Patient.name.where(family = 'O\\'Neil' and given contains 'B')"
        ));
        assert!(!deleted("Patient.name.where(given contains 'C')"));
        assert!(deleted("Patient.name.where(given.empty())"));
        assert!(deleted("Patient.birthDate.where($this = @1980-02-14)"));
        assert!(deleted("Patient.name.where(family in 'Doe')"));
        assert!(deleted("Patient.name.last()"));
    }

    #[test]
    fn bad_patches_are_malformed_and_impossible_ones_do_not_apply() {
        let run = |ops: Vec<Value>| apply(&patient(), "Patient", &patch(ops));
        for bad in [
            op("delete", "Observation.status", json!([])),
            op("delete", "Patient.name.select(family)", json!([])),
            op("delete", "Patient.name.where(", json!([])),
            op("explode", "Patient.active", json!([])),
            op(
                "add",
                "Patient",
                json!([{"name": "value", "valueBoolean": true}]),
            ),
        ] {
            assert!(
                matches!(run(vec![bad.clone()]), Err(PatchError::Malformed(_))),
                "{bad}"
            );
        }
        for impossible in [
            op("delete", "Patient.identifier", json!([])),
            op(
                "replace",
                "Patient.gender",
                json!([{"name": "value", "valueCode": "male"}]),
            ),
            op(
                "add",
                "Patient",
                json!([{"name": "name", "valueString": "active"}, {"name": "value", "valueBoolean": false}]),
            ),
            op(
                "insert",
                "Patient.name",
                json!([{"name": "value", "valueHumanName": {}}, {"name": "index", "valueInteger": 5}]),
            ),
        ] {
            assert!(
                matches!(
                    run(vec![impossible.clone()]),
                    Err(PatchError::NotApplicable(_))
                ),
                "{impossible}"
            );
        }
        let e = run(vec![op(
            "replace",
            "Patient.gender",
            json!([{"name": "value", "valueCode": "male"}]),
        )])
        .unwrap_err();
        assert!(!e.to_string().contains("1980"), "{e}");
        assert!(matches!(
            apply(&patient(), "Patient", &json!({"resourceType": "Bundle"})),
            Err(PatchError::Malformed(_))
        ));
    }
}
