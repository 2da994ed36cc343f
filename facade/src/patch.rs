//! JSON Patch (RFC 6902) over `serde_json::Value`, with JSON Pointers (RFC 6901): the body of
//! `PATCH /fhir/{type}/{id}` with `Content-Type: application/json-patch+json` (the FHIRPath
//! Patch form is [`crate::fhirpatch`]; both report errors as [`PatchError`]).
//!
//! A malformed patch document is a [`PatchError::Malformed`] (the client's request is wrong:
//! 400); a well-formed operation that cannot apply to this resource — a missing path, a failed
//! `test` — is [`PatchError::NotApplicable`] (422). Operations apply in order to a copy; the
//! caller gets the result only if every operation succeeded. Error texts name the operation index
//! and path, never a value from the resource.

use serde_json::Value;

/// Most operations accepted in one patch document.
pub const MAX_OPERATIONS: usize = 1000;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    #[error("invalid patch: {0}")]
    Malformed(String),
    #[error("the patch does not apply: {0}")]
    NotApplicable(String),
}

fn malformed(i: usize, what: &str) -> PatchError {
    PatchError::Malformed(format!("operation {i}: {what}"))
}

fn not_applicable(i: usize, path: &str, what: &str) -> PatchError {
    PatchError::NotApplicable(format!("operation {i} ({path}): {what}"))
}

/// Splits a JSON Pointer into unescaped tokens; `None` if it is not a valid pointer.
fn tokens(pointer: &str) -> Option<Vec<String>> {
    if pointer.is_empty() {
        return Some(Vec::new());
    }
    let rest = pointer.strip_prefix('/')?;
    rest.split('/')
        .map(|t| {
            // `~1` is `/`, `~0` is `~`; any other `~` escape is invalid.
            let mut out = String::with_capacity(t.len());
            let mut chars = t.chars();
            while let Some(c) = chars.next() {
                if c == '~' {
                    match chars.next() {
                        Some('0') => out.push('~'),
                        Some('1') => out.push('/'),
                        _ => return None,
                    }
                } else {
                    out.push(c);
                }
            }
            Some(out)
        })
        .collect()
}

fn array_index(token: &str, len: usize, allow_end: bool) -> Option<usize> {
    if token == "-" {
        return allow_end.then_some(len);
    }
    if token.is_empty() || (token.len() > 1 && token.starts_with('0')) {
        return None;
    }
    let i: usize = token.parse().ok()?;
    let max = if allow_end {
        len
    } else {
        len.saturating_sub(1)
    };
    (i <= max && (allow_end || len > 0)).then_some(i)
}

fn get<'a>(doc: &'a Value, toks: &[String]) -> Option<&'a Value> {
    toks.iter().try_fold(doc, |v, t| match v {
        Value::Object(m) => m.get(t),
        Value::Array(a) => array_index(t, a.len(), false).and_then(|i| a.get(i)),
        _ => None,
    })
}

fn get_mut<'a>(doc: &'a mut Value, toks: &[String]) -> Option<&'a mut Value> {
    toks.iter().try_fold(doc, |v, t| match v {
        Value::Object(m) => m.get_mut(t),
        Value::Array(a) => {
            let len = a.len();
            array_index(t, len, false).and_then(move |i| a.get_mut(i))
        }
        _ => None,
    })
}

fn add(doc: &mut Value, toks: &[String], value: Value) -> Result<(), &'static str> {
    let Some((last, parent)) = toks.split_last() else {
        *doc = value;
        return Ok(());
    };
    match get_mut(doc, parent).ok_or("parent path does not exist")? {
        Value::Object(m) => {
            m.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(a) => {
            let i = array_index(last, a.len(), true).ok_or("array index out of range")?;
            a.insert(i, value);
            Ok(())
        }
        _ => Err("parent is neither an object nor an array"),
    }
}

fn remove(doc: &mut Value, toks: &[String]) -> Result<Value, &'static str> {
    let (last, parent) = toks
        .split_last()
        .ok_or("cannot remove the whole resource")?;
    match get_mut(doc, parent).ok_or("path does not exist")? {
        Value::Object(m) => m.remove(last).ok_or("path does not exist"),
        Value::Array(a) => {
            let i = array_index(last, a.len(), false).ok_or("array index out of range")?;
            Ok(a.remove(i))
        }
        _ => Err("path does not exist"),
    }
}

/// Applies `patch` (a JSON array of operations) to a copy of `doc`.
pub fn apply(doc: &Value, patch: &Value) -> Result<Value, PatchError> {
    let ops = patch.as_array().ok_or_else(|| {
        PatchError::Malformed("the body must be a JSON array of operations".into())
    })?;
    if ops.len() > MAX_OPERATIONS {
        return Err(PatchError::Malformed(format!(
            "more than {MAX_OPERATIONS} operations"
        )));
    }
    let mut out = doc.clone();
    for (i, op) in ops.iter().enumerate() {
        let obj = op
            .as_object()
            .ok_or_else(|| malformed(i, "not a JSON object"))?;
        let name = obj
            .get("op")
            .and_then(Value::as_str)
            .ok_or_else(|| malformed(i, "`op` is missing"))?;
        let path = obj
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| malformed(i, "`path` is missing"))?;
        let toks = tokens(path).ok_or_else(|| malformed(i, "`path` is not a JSON Pointer"))?;
        let value = || {
            obj.get("value")
                .cloned()
                .ok_or_else(|| malformed(i, "`value` is missing"))
        };
        let from = || -> Result<Vec<String>, PatchError> {
            let f = obj
                .get("from")
                .and_then(Value::as_str)
                .ok_or_else(|| malformed(i, "`from` is missing"))?;
            tokens(f).ok_or_else(|| malformed(i, "`from` is not a JSON Pointer"))
        };
        let na = |what: &str| not_applicable(i, path, what);
        match name {
            "add" => add(&mut out, &toks, value()?).map_err(na)?,
            "remove" => {
                remove(&mut out, &toks).map_err(na)?;
            }
            "replace" => {
                let v = value()?;
                let slot = get_mut(&mut out, &toks).ok_or_else(|| na("path does not exist"))?;
                *slot = v;
            }
            "move" => {
                let f = from()?;
                if toks.len() > f.len() && toks[..f.len()] == f[..] {
                    return Err(na("cannot move a value into itself"));
                }
                let v = remove(&mut out, &f).map_err(na)?;
                add(&mut out, &toks, v).map_err(na)?;
            }
            "copy" => {
                let f = from()?;
                let v = get(&out, &f)
                    .cloned()
                    .ok_or_else(|| na("`from` does not exist"))?;
                add(&mut out, &toks, v).map_err(na)?;
            }
            "test" => {
                let v = value()?;
                if get(&out, &toks) != Some(&v) {
                    return Err(na("test failed"));
                }
            }
            _ => {
                return Err(malformed(
                    i,
                    "`op` must be add, remove, replace, move, copy or test",
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(doc: Value, patch: Value) -> Result<Value, PatchError> {
        apply(&doc, &patch)
    }

    #[test]
    fn rfc6902_operations() {
        let doc = json!({"a": {"b": [1, 2, 3]}, "c~d": 1, "e/f": 2});
        let out = run(
            doc,
            json!([
                {"op": "add", "path": "/a/b/1", "value": 9},
                {"op": "add", "path": "/a/b/-", "value": 4},
                {"op": "remove", "path": "/a/b/0"},
                {"op": "replace", "path": "/c~0d", "value": "x"},
                {"op": "move", "from": "/e~1f", "path": "/g"},
                {"op": "copy", "from": "/a/b", "path": "/h"},
                {"op": "test", "path": "/g", "value": 2},
            ]),
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"a": {"b": [9, 2, 3, 4]}, "c~d": "x", "g": 2, "h": [9, 2, 3, 4]})
        );
    }

    #[test]
    fn malformed_and_inapplicable_are_told_apart() {
        let doc = json!({"a": [1]});
        for bad in [
            json!({"op": "add"}),
            json!([{"op": "frobnicate", "path": "/a"}]),
            json!([{"op": "add", "path": "a", "value": 1}]),
            json!([{"op": "add", "path": "/b"}]),
            json!([{"op": "move", "path": "/b"}]),
            json!([{"path": "/a"}]),
        ] {
            assert!(
                matches!(run(doc.clone(), bad.clone()), Err(PatchError::Malformed(_))),
                "{bad}"
            );
        }
        for bad in [
            json!([{"op": "remove", "path": "/zz"}]),
            json!([{"op": "replace", "path": "/a/5", "value": 1}]),
            json!([{"op": "add", "path": "/a/01", "value": 1}]),
            json!([{"op": "add", "path": "/x/y", "value": 1}]),
            json!([{"op": "test", "path": "/a/0", "value": 2}]),
            json!([{"op": "move", "from": "/a", "path": "/a/0"}]),
        ] {
            assert!(
                matches!(
                    run(doc.clone(), bad.clone()),
                    Err(PatchError::NotApplicable(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_failing_operation_leaves_nothing_applied() {
        let doc = json!({"a": 1});
        let err = run(
            doc.clone(),
            json!([{"op": "replace", "path": "/a", "value": 2}, {"op": "test", "path": "/a", "value": 1}]),
        );
        assert!(err.is_err());
        assert_eq!(doc, json!({"a": 1}));
    }
}
