//! Helpers shared by the tests of several crates: generated input that stays close to a valid
//! request, so a property test reaches the code behind the first validation step as well as the
//! step itself; and a journal that fails on demand ([`failing_journal`]).

pub mod failing_journal;

use proptest::prelude::*;
use serde_json::Value;

/// Every JSON pointer into `v`, the root (`""`) last.
pub fn pointers(v: &Value) -> Vec<String> {
    fn walk(v: &Value, at: String, out: &mut Vec<String>) {
        match v {
            Value::Object(o) => o
                .iter()
                .for_each(|(k, x)| walk(x, format!("{at}/{k}"), out)),
            Value::Array(a) => a
                .iter()
                .enumerate()
                .for_each(|(i, x)| walk(x, format!("{at}/{i}"), out)),
            _ => {}
        }
        out.push(at);
    }
    let mut out = Vec::new();
    walk(v, String::new(), &mut out);
    out
}

/// `base` with the value at one of its pointers (chosen by `pick`) replaced by `generated`;
/// `generated` alone when the pick is the root.
pub fn with_one_value_replaced(base: &Value, pick: usize, generated: Value) -> Value {
    let at = pointers(base);
    let ptr = &at[pick % at.len()];
    let mut out = base.clone();
    match out.pointer_mut(ptr) {
        Some(slot) if !ptr.is_empty() => *slot = generated,
        _ => out = generated,
    }
    out
}

/// JSON of any shape up to four levels deep: null, booleans, numbers, short printable strings
/// and the given `words` as leaves; arrays, and objects whose keys come from `keys`.
pub fn json(words: Vec<&'static str>, keys: Vec<&'static str>) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "[ -~]{0,12}".prop_map(Value::from),
        proptest::sample::select(words).prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        let key = proptest::sample::select(keys.clone()).prop_map(str::to_string);
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map(key, inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Mostly `base` with one value replaced by generated JSON, sometimes generated JSON alone.
pub fn near(base: Value, json: impl Strategy<Value = Value>) -> impl Strategy<Value = Value> {
    (proptest::option::weighted(0.75, any::<usize>()), json).prop_map(move |(pick, generated)| {
        match pick {
            Some(pick) => with_one_value_replaced(&base, pick, generated),
            None => generated,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn replaces_exactly_one_value() {
        let base = json!({"a": [1, {"b": 2}]});
        assert_eq!(pointers(&base), ["/a/0", "/a/1/b", "/a/1", "/a", ""]);
        assert_eq!(
            with_one_value_replaced(&base, 1, json!("x")),
            json!({"a": [1, {"b": "x"}]})
        );
        assert_eq!(with_one_value_replaced(&base, 4, json!(null)), json!(null));
    }
}
