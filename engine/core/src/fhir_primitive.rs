//! The value formats of FHIR R4's primitive types (R4 §2.24.0.1 "Primitive Types"): what a
//! stored `birthDate`, `status` or `valueInteger` must look like. A value that passes here is
//! one that `fhir.resources` and the npm `fhir` validator also accept, so what the facade or a
//! FHIR feed stores is valid R4 for every reader.

use serde_json::Value;

/// Checks `v` as a value of the primitive type `ty`. The error says what the type requires,
/// never what the value was (values may be PHI).
pub fn check(ty: &str, v: &Value) -> Result<(), &'static str> {
    let ok = match ty {
        "boolean" => v.is_boolean(),
        "integer" => int_in(v, i64::from(i32::MIN)),
        "unsignedInt" => int_in(v, 0),
        "positiveInt" => int_in(v, 1),
        "decimal" => v.is_number(),
        _ => match v.as_str() {
            Some(s) => text(ty, s),
            None => false,
        },
    };
    match ok {
        true => Ok(()),
        false => Err(requirement(ty)),
    }
}

fn int_in(v: &Value, min: i64) -> bool {
    v.as_i64()
        .is_some_and(|n| (min..=i64::from(i32::MAX)).contains(&n))
}

fn text(ty: &str, s: &str) -> bool {
    match ty {
        "code" => code(s),
        "id" => crate::valid_fhir_id(s),
        "uri" | "url" | "canonical" => !s.is_empty() && !s.contains(char::is_whitespace),
        "oid" => s.strip_prefix("urn:oid:").is_some_and(oid_arcs),
        "uuid" => s.strip_prefix("urn:uuid:").is_some_and(uuid),
        "date" => date(s).is_some_and(str::is_empty),
        "dateTime" => date_time(s, false),
        "instant" => date_time(s, true),
        "time" => time(s).is_some_and(str::is_empty),
        "base64Binary" => base64(s),
        // string, markdown, xhtml: any text, but not none (R4: `[ \r\n\t\S]+`).
        _ => !s.is_empty(),
    }
}

/// What `ty` requires, for the error message.
fn requirement(ty: &str) -> &'static str {
    match ty {
        "boolean" => "true or false",
        "integer" => "a whole number from -2147483648 to 2147483647",
        "unsignedInt" => "a whole number from 0 to 2147483647",
        "positiveInt" => "a whole number from 1 to 2147483647",
        "decimal" => "a JSON number",
        "code" => "a non-empty string without leading, trailing or repeated whitespace",
        "id" => "1 to 64 of A-Z a-z 0-9 - .",
        "uri" | "url" | "canonical" => "a non-empty string without whitespace",
        "oid" => "urn:oid: and a dotted number",
        "uuid" => "urn:uuid: and a lowercase UUID",
        "date" => "YYYY, YYYY-MM or YYYY-MM-DD, a real calendar date",
        "dateTime" => {
            "YYYY, YYYY-MM, YYYY-MM-DD, or YYYY-MM-DDThh:mm:ss[.f] with Z or ±hh:mm, a real calendar date"
        }
        "instant" => "YYYY-MM-DDThh:mm:ss[.f] with Z or ±hh:mm, a real calendar date",
        "time" => "hh:mm:ss[.f]",
        "base64Binary" => "base64 text",
        _ => "a non-empty JSON string",
    }
}

/// `[^\s]+(\s[^\s]+)*`
fn code(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(char::is_whitespace)
        && !s.ends_with(char::is_whitespace)
        && !s
            .as_bytes()
            .windows(2)
            .any(|w| w[0].is_ascii_whitespace() && w[1].is_ascii_whitespace())
}

fn oid_arcs(s: &str) -> bool {
    let mut arcs = s.split('.');
    let first_ok = arcs.next().is_some_and(|a| matches!(a, "0" | "1" | "2"));
    let mut rest = 0;
    for a in arcs {
        let digits = !a.is_empty() && a.bytes().all(|b| b.is_ascii_digit());
        if !digits || (a.len() > 1 && a.starts_with('0')) {
            return false;
        }
        rest += 1;
    }
    first_ok && rest > 0
}

fn uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

fn base64(s: &str) -> bool {
    let chars: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !chars.len().is_multiple_of(4) {
        return false;
    }
    let body = chars.iter().position(|&b| b == b'=').unwrap_or(chars.len());
    chars.len() - body <= 2
        && chars[body..].iter().all(|&b| b == b'=')
        && chars[..body]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/'))
}

/// `n` ASCII digits at the start of `s`, and what follows them.
fn digits(s: &str, n: usize) -> Option<(u32, &str)> {
    let head = s.get(..n)?;
    if !head.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((head.parse().ok()?, &s[n..]))
}

/// A date of year, year-month or full precision at the start of `s` (year 0001 or later, a
/// month that exists, a day that month has); the rest of `s`.
fn date(s: &str) -> Option<&str> {
    let (year, rest) = digits(s, 4)?;
    if year == 0 {
        return None;
    }
    let Some(rest) = rest.strip_prefix('-') else {
        return Some(rest);
    };
    let (month, rest) = digits(rest, 2)?;
    if !(1..=12).contains(&month) {
        return None;
    }
    let Some(rest) = rest.strip_prefix('-') else {
        return Some(rest);
    };
    let (day, rest) = digits(rest, 2)?;
    (1..=days_in_month(year, month))
        .contains(&day)
        .then_some(rest)
}

/// Days in `month` (1–12) of `year` in the proleptic Gregorian calendar.
pub fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// `hh:mm:ss` with optional fraction at the start of `s`; the rest.
fn time(s: &str) -> Option<&str> {
    let (h, rest) = digits(s, 2)?;
    let (m, rest) = digits(rest.strip_prefix(':')?, 2)?;
    let (sec, mut rest) = digits(rest.strip_prefix(':')?, 2)?;
    if h > 23 || m > 59 || sec > 60 {
        return None;
    }
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        rest = &frac[n..];
    }
    Some(rest)
}

/// A dateTime; with `instant`, the time and offset are required.
fn date_time(s: &str, instant: bool) -> bool {
    let Some(rest) = date(s) else {
        return false;
    };
    let full_date = s.len() - rest.len() == 10;
    let Some(t) = rest.strip_prefix('T') else {
        return rest.is_empty() && !instant;
    };
    if !full_date {
        return false;
    }
    let Some(zone) = time(t) else {
        return false;
    };
    if zone == "Z" {
        return true;
    }
    let Some(offset) = zone.strip_prefix(['+', '-']) else {
        return false;
    };
    match (
        digits(offset, 2),
        offset.get(2..3),
        digits(offset.get(3..).unwrap_or(""), 2),
    ) {
        (Some((h, _)), Some(":"), Some((m, ""))) => (h <= 13 && m <= 59) || (h == 14 && m == 0),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(ty: &str, v: Value) -> bool {
        check(ty, &v).is_ok()
    }

    #[test]
    fn dates_keep_their_precision_and_must_exist() {
        for good in [
            "1987",
            "1987-02",
            "1987-02-28",
            "2024-02-29",
            "2000-02-29",
            "0001-01-01",
        ] {
            assert!(ok("date", json!(good)), "{good}");
            assert!(ok("dateTime", json!(good)), "{good}");
        }
        for bad in [
            "",
            "87",
            "0000",
            "1987-2",
            "1987-13",
            "1987-00",
            "1987-02-29",
            "1900-02-29",
            "2023-04-31",
            "1987-02-28T",
            "1987/02/28",
            "19870228",
            " 1987",
            "1987-02-28 ",
        ] {
            assert!(!ok("date", json!(bad)), "{bad}");
            assert!(!ok("dateTime", json!(bad)), "{bad}");
        }
        assert!(!ok("date", json!("1987-02-28T10:00:00Z")));
        assert!(!ok("date", json!(19870228)));
    }

    #[test]
    fn date_times_need_seconds_and_an_offset_once_they_have_a_time() {
        for good in [
            "2026-12-06T21:45:20Z",
            "2026-12-06T21:45:20.123+01:00",
            "2026-12-06T23:59:60-05:30",
            "2026-12-06T00:00:00+14:00",
            "2026-12-06T00:00:00-13:59",
        ] {
            assert!(ok("dateTime", json!(good)), "{good}");
            assert!(ok("instant", json!(good)), "{good}");
        }
        for bad in [
            "2026-12-06T21:45Z",
            "2026-12-06T21:45:20",
            "2026-12-06T24:00:00Z",
            "2026-12-06T21:60:00Z",
            "2026-12-06T21:45:20.Z",
            "2026-12-06T21:45:20+1:00",
            "2026-12-06T21:45:20+14:30",
            "2026-12-06T21:45:20+0100",
            "2026-12T21:45:20Z",
        ] {
            assert!(!ok("dateTime", json!(bad)), "{bad}");
            assert!(!ok("instant", json!(bad)), "{bad}");
        }
        assert!(!ok("instant", json!("2026-12-06")));
        assert!(ok("time", json!("21:45:20.5")));
        assert!(!ok("time", json!("21:45")));
    }

    #[test]
    fn numbers_booleans_and_their_ranges() {
        assert!(ok("boolean", json!(true)));
        assert!(!ok("boolean", json!("true")));
        assert!(ok("integer", json!(-2_147_483_648_i64)));
        assert!(!ok("integer", json!(2_147_483_648_i64)));
        assert!(!ok("integer", json!(1.5)));
        assert!(!ok("integer", json!("1")));
        assert!(ok("unsignedInt", json!(0)));
        assert!(!ok("unsignedInt", json!(-1)));
        assert!(!ok("positiveInt", json!(0)));
        assert!(ok("positiveInt", json!(1)));
        assert!(ok("decimal", json!(7.25)));
        assert!(ok("decimal", json!(-3)));
        assert!(!ok("decimal", json!("7.25")));
    }

    #[test]
    fn text_types() {
        assert!(ok("string", json!("a")));
        assert!(!ok("string", json!("")));
        assert!(!ok("string", json!(1)));
        assert!(ok("code", json!("final")));
        assert!(ok("code", json!("entered in error")));
        for bad in ["", " final", "final ", "a  b", "a\t\tb"] {
            assert!(!ok("code", json!(bad)), "{bad:?}");
        }
        assert!(ok("id", json!("a-1.B")));
        assert!(!ok("id", json!("a_1")));
        assert!(!ok("id", json!("x".repeat(65))));
        assert!(ok("uri", json!("http://loinc.org")));
        assert!(ok("uri", json!("urn:oid:2.16.840.1.113883.6.1")));
        assert!(!ok("uri", json!("http://example.org/a b")));
        assert!(!ok("uri", json!("")));
        assert!(ok("oid", json!("urn:oid:2.16.840.1.113883")));
        for bad in [
            "2.16.840",
            "urn:oid:3.1",
            "urn:oid:2",
            "urn:oid:2.016",
            "urn:oid:2..1",
        ] {
            assert!(!ok("oid", json!(bad)), "{bad}");
        }
        assert!(ok(
            "uuid",
            json!("urn:uuid:c757873d-ec9a-4326-a141-556f43239520")
        ));
        assert!(!ok(
            "uuid",
            json!("urn:uuid:C757873D-EC9A-4326-A141-556F43239520")
        ));
        assert!(!ok("uuid", json!("c757873d-ec9a-4326-a141-556f43239520")));
        assert!(ok("base64Binary", json!("SGVsbG8=")));
        assert!(ok("base64Binary", json!("SGVs\nbG8h")));
        assert!(!ok("base64Binary", json!("SGVsbG8")));
        assert!(!ok("base64Binary", json!("SG=sbG8=")));
    }

    #[test]
    fn the_error_says_what_the_type_needs_and_never_the_value() {
        let e = check("date", &json!("1962-02-30")).unwrap_err();
        assert!(e.starts_with("YYYY, YYYY-MM or YYYY-MM-DD"), "{e}");
        assert!(!e.contains("1962"), "{e}");
    }
}
