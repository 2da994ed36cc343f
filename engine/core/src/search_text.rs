use serde_json::Value;
use unicode_normalization::{char::is_combining_mark, UnicodeNormalization};

/// A string as FHIR string search compares it: case- and accent-insensitive, so "Müller",
/// "MULLER" and "muller" all become "muller". The store indexes names in this form and the
/// facade folds the searched value the same way, so the index and the matcher always agree.
/// NUL (the store's key separator) is dropped.
pub fn fold_search_string(s: &str) -> String {
    s.nfd()
        .filter(|c| !is_combining_mark(*c) && *c != '\0')
        .flat_map(char::to_lowercase)
        .collect()
}

/// A resource field matched as a FHIR token: `system|code` or `code` against a code, a Coding,
/// a CodeableConcept or a list of them. One rule for searches, SMART v2 scope narrowing
/// (`?category=laboratory`) and Subscription filters, so that what a token may read, what a
/// search finds and what a subscriber receives agree.
pub fn matches_token(resource: &Value, field: &str, wanted: &str) -> bool {
    let (system, code) = match wanted.split_once('|') {
        Some((s, c)) => (Some(s), c),
        None => (None, wanted),
    };
    let Some(v) = resource.get(field) else {
        return false;
    };
    let items: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        other => vec![other],
    };
    items.into_iter().any(|item| match item {
        Value::String(s) => s == code,
        Value::Object(_) => {
            let codings: Vec<&Value> = match item.get("coding") {
                Some(Value::Array(c)) => c.iter().collect(),
                _ => vec![item],
            };
            codings.into_iter().any(|c| {
                c.get("code").and_then(Value::as_str) == Some(code)
                    && system.is_none_or(|s| system_is(c, s))
            })
        }
        _ => false,
    })
}

/// Whether a Coding or Identifier has system `s`; `""` (a token written `|code`) means it has
/// none, as FHIR token search reads it.
pub fn system_is(coding: &Value, s: &str) -> bool {
    match coding.get("system").and_then(Value::as_str) {
        Some(x) => x == s,
        None => s.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_codes_with_or_without_their_system() {
        let r = serde_json::json!({"status": "final",
            "category": [{"coding": [{"system": "urn:s", "code": "lab"}]}, {"coding": [{"code": "x"}]}]});
        assert!(matches_token(&r, "category", "lab"));
        assert!(matches_token(&r, "category", "urn:s|lab"));
        assert!(!matches_token(&r, "category", "urn:t|lab"));
        assert!(
            !matches_token(&r, "category", "|lab"),
            "|code: a coding without a system"
        );
        assert!(matches_token(&r, "category", "|x"));
        assert!(matches_token(&r, "status", "final") && !matches_token(&r, "status", "fin"));
        assert!(!matches_token(&r, "code", "lab"));
    }

    #[test]
    fn case_and_accents_fold_away_and_other_letters_stay() {
        assert_eq!(fold_search_string("Müller"), "muller");
        assert_eq!(fold_search_string("MÜLLER"), "muller");
        assert_eq!(fold_search_string("Zoë Ñúñez-Ørsted"), "zoe nunez-ørsted");
        assert_eq!(fold_search_string("Ǆ\0x"), "ǆx");
        assert_eq!(fold_search_string("李"), "李");
    }
}
