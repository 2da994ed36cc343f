use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Milliseconds since the Unix epoch, UTC.
pub fn now_millis() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// `2026-11-23T16:43:45.123Z`: the FHIR `instant` form used for `meta.lastUpdated`.
pub fn format_rfc3339_millis(millis: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(millis as i128 * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// Parses an RFC 3339 timestamp (or a bare `YYYY-MM-DD`, taken as midnight UTC) to epoch millis.
pub fn parse_rfc3339_millis(s: &str) -> Option<i64> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Some((t.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    let date =
        time::Date::parse(s, time::macros::format_description!("[year]-[month]-[day]")).ok()?;
    Some(date.midnight().assume_utc().unix_timestamp() * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_millis() {
        let m = 1_795_000_000_123;
        let s = format_rfc3339_millis(m);
        assert!(s.ends_with(".123Z"), "{s}");
        assert_eq!(parse_rfc3339_millis(&s), Some(m));
        assert_eq!(parse_rfc3339_millis("1970-01-02"), Some(86_400_000));
        assert_eq!(parse_rfc3339_millis("not a date"), None);
    }
}
