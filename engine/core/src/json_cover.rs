//! One question two places ask of FHIR JSON: does one value already say everything another
//! does? The mapper asks it of a resource created twice in one message, the store of a list
//! item a `write: merge` brings.

use serde_json::Value;

/// Whether `b` says nothing `a` does not: every member of an object `b` is covered by `a`'s
/// member of that name, every element of an array `b` by some element of `a`, and anything else
/// is equal. A second reading of the same doctor with fewer name parts is covered; one with
/// another family name or an identifier type the first lacks is not.
pub fn covers(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => b
            .iter()
            .all(|(k, bv)| a.get(k).is_some_and(|av| covers(av, bv))),
        (Value::Array(a), Value::Array(b)) => b.iter().all(|bv| a.iter().any(|av| covers(av, bv))),
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_second_reading_with_less_is_covered_and_one_with_other_values_is_not() {
        let first = json!({"name": [{"family": "Doe", "given": ["Jane", "Q"], "prefix": ["Dr"]}],
                           "identifier": [{"value": "1234", "system": "urn:id:NPI"}]});
        assert!(covers(&first, &first));
        assert!(covers(
            &first,
            &json!({"name": [{"family": "Doe", "given": ["Jane"]}]})
        ));
        assert!(covers(&first, &json!({"name": [{"given": ["Q", "Jane"]}]})));
        assert!(covers(&first, &json!({"identifier": [{"value": "1234"}]})));
        assert!(!covers(&first, &json!({"name": [{"family": "Dow"}]})));
        assert!(!covers(
            &first,
            &json!({"name": [{"family": "Doe", "suffix": ["Jr"]}]})
        ));
        assert!(!covers(
            &first,
            &json!({"identifier": [{"value": "1234", "type": {"text": "NPI"}}]})
        ));
        assert!(!covers(&json!(["a"]), &json!("a")));
        assert!(!covers(&json!(1), &json!(1.0)));
    }
}
