//! HL7 v2 DTM/TS/DT/TM values to FHIR R4 `date`, `dateTime`, `instant` and `time`, keeping the
//! source's precision and its UTC offset. R4 demands an offset whenever a time is present and
//! seconds whenever minutes are; a value without an offset takes the mapping set's
//! `default_timezone` (a deliberate, configured assumption — never the server's clock).

/// Why a value is not a usable HL7 date/time. Carries no part of the value (no PHI in errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DtmError {
    #[error("not an HL7 DTM (expected YYYY[MM[DD[HH[MM[SS[.S…]]]]]][+/-ZZZZ])")]
    Syntax,
    #[error("date/time component out of range")]
    Range,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dtm<'a> {
    pub year: &'a str,
    pub month: Option<&'a str>,
    pub day: Option<&'a str>,
    pub hour: Option<&'a str>,
    pub minute: Option<&'a str>,
    pub second: Option<&'a str>,
    pub fraction: Option<&'a str>,
    /// `+HH:MM` / `-HH:MM`
    pub offset: Option<String>,
}

fn digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn in_range(s: Option<&str>, lo: u32, hi: u32) -> Result<(), DtmError> {
    match s {
        None => Ok(()),
        Some(s) => {
            let n: u32 = s.parse().map_err(|_| DtmError::Syntax)?;
            if (lo..=hi).contains(&n) {
                Ok(())
            } else {
                Err(DtmError::Range)
            }
        }
    }
}

pub fn parse_dtm(raw: &str) -> Result<Dtm<'_>, DtmError> {
    let s = raw.trim();
    let (main, offset) = match s.find(['+', '-']) {
        Some(i) => (&s[..i], Some(&s[i..])),
        None => (s, None),
    };
    let (main, fraction) = match main.split_once('.') {
        Some((m, f)) => (m, Some(f)),
        None => (main, None),
    };
    if !digits(main) || !matches!(main.len(), 4 | 6 | 8 | 10 | 12 | 14) {
        return Err(DtmError::Syntax);
    }
    if let Some(f) = fraction {
        if !digits(f) || main.len() != 14 {
            return Err(DtmError::Syntax);
        }
    }
    let part = |a: usize| main.get(a..a + 2);
    let d = Dtm {
        year: &main[..4],
        month: part(4),
        day: part(6),
        hour: part(8),
        minute: part(10),
        second: part(12),
        fraction,
        offset: match offset {
            None => None,
            Some(o) => {
                let (sign, rest) = o.split_at(1);
                if rest.len() != 4 || !digits(rest) {
                    return Err(DtmError::Syntax);
                }
                in_range(Some(&rest[..2]), 0, 14)?;
                in_range(Some(&rest[2..]), 0, 59)?;
                // R4 offsets run from -14:00 to +14:00
                if &rest[..2] == "14" && &rest[2..] != "00" {
                    return Err(DtmError::Range);
                }
                Some(format!("{sign}{}:{}", &rest[..2], &rest[2..]))
            }
        },
    };
    if d.year == "0000" {
        return Err(DtmError::Range);
    }
    in_range(d.month, 1, 12)?;
    in_range(d.day, 1, 31)?;
    in_range(d.hour, 0, 23)?;
    in_range(d.minute, 0, 59)?;
    in_range(d.second, 0, 60)?;
    // "Dates SHALL be valid dates" (R4): no 30 February, no 31 April.
    if let (Some(m), Some(day)) = (d.month, d.day) {
        let parse = |s: &str| s.parse::<u32>().map_err(|_| DtmError::Syntax);
        if parse(day)? > tributary_core::fhir_primitive::days_in_month(parse(d.year)?, parse(m)?) {
            return Err(DtmError::Range);
        }
    }
    Ok(d)
}

fn date_part(d: &Dtm<'_>) -> String {
    let mut out = d.year.to_string();
    if let Some(m) = d.month {
        out.push('-');
        out.push_str(m);
        if let Some(day) = d.day {
            out.push('-');
            out.push_str(day);
        }
    }
    out
}

/// FHIR `date`: the date part at the source's precision (year, year-month or full date).
pub fn to_date(raw: &str) -> Result<String, DtmError> {
    Ok(date_part(&parse_dtm(raw)?))
}

/// FHIR `dateTime`; `default_tz` (`Z`, `+01:00`, …) is used when the source has a time but no offset.
pub fn to_datetime(raw: &str, default_tz: &str) -> Result<String, DtmError> {
    let d = parse_dtm(raw)?;
    let mut out = date_part(&d);
    if let (Some(h), Some(_)) = (d.hour, d.day) {
        out.push('T');
        out.push_str(h);
        out.push(':');
        out.push_str(d.minute.unwrap_or("00"));
        out.push(':');
        out.push_str(d.second.unwrap_or("00"));
        if let Some(f) = d.fraction {
            out.push('.');
            out.push_str(f);
        }
        out.push_str(d.offset.as_deref().unwrap_or(default_tz));
    }
    Ok(out)
}

/// FHIR `instant`: needs a full date and time with an offset; a date-only source becomes midnight.
pub fn to_instant(raw: &str, default_tz: &str) -> Result<String, DtmError> {
    let d = parse_dtm(raw)?;
    if d.day.is_none() {
        return Err(DtmError::Syntax);
    }
    Ok(format!(
        "{}T{}:{}:{}{}{}",
        date_part(&d),
        d.hour.unwrap_or("00"),
        d.minute.unwrap_or("00"),
        d.second.unwrap_or("00"),
        d.fraction.map(|f| format!(".{f}")).unwrap_or_default(),
        d.offset.as_deref().unwrap_or(default_tz)
    ))
}

/// FHIR `time` from an HL7 TM (`HH[MM[SS[.S]]]`, offset dropped: R4 `time` has none).
pub fn to_time(raw: &str) -> Result<String, DtmError> {
    let s = raw.trim();
    let main = s.split(['+', '-']).next().unwrap_or("");
    let (hms, frac) = match main.split_once('.') {
        Some((a, b)) => (a, Some(b)),
        None => (main, None),
    };
    if !digits(hms) || !matches!(hms.len(), 2 | 4 | 6) {
        return Err(DtmError::Syntax);
    }
    in_range(hms.get(0..2), 0, 23)?;
    in_range(hms.get(2..4), 0, 59)?;
    in_range(hms.get(4..6), 0, 60)?;
    let mut out = format!(
        "{}:{}:{}",
        &hms[..2],
        hms.get(2..4).unwrap_or("00"),
        hms.get(4..6).unwrap_or("00")
    );
    // as in a DTM, a fraction follows whole seconds only
    if let Some(f) = frac {
        if !digits(f) || hms.len() != 6 {
            return Err(DtmError::Syntax);
        }
        out.push('.');
        out.push_str(f);
    }
    Ok(out)
}

/// A FHIR R4 `date`, `dateTime` or `instant` value, parsed for ordering (Period invariant per-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Point<'a> {
    year: i64,
    month: Option<u32>,
    day: Option<u32>,
    time: Option<Clock<'a>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Clock<'a> {
    hour: u32,
    minute: u32,
    second: Option<u32>,
    /// Digits after the decimal point of the seconds (may be empty).
    fraction: &'a str,
    /// Minutes east of UTC; `None` when the value has no offset (not valid R4 with a time).
    offset: Option<i32>,
}

fn num(s: &str, len: usize, lo: u32, hi: u32) -> Option<u32> {
    if s.len() != len || !digits(s) {
        return None;
    }
    let n: u32 = s.parse().ok()?;
    (lo..=hi).contains(&n).then_some(n)
}

/// `YYYY[-MM[-DD[Thh:mm[:ss[.f…]][Z|±hh:mm]]]]`, as R4 writes dates and date-times.
fn parse_fhir(s: &str) -> Option<Point<'_>> {
    let s = s.trim();
    let (date, time) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    let mut parts = date.split('-');
    let year = i64::from(num(parts.next()?, 4, 1, 9999)?);
    let month = match parts.next() {
        Some(m) => Some(num(m, 2, 1, 12)?),
        None => None,
    };
    let day = match parts.next() {
        Some(d) => Some(num(d, 2, 1, 31)?),
        None => None,
    };
    if parts.next().is_some() {
        return None;
    }
    let time = match time {
        None => None,
        Some(t) => {
            day?;
            let (clock, offset) = if let Some(c) = t.strip_suffix('Z') {
                (c, Some(0))
            } else if let Some(i) = t.rfind(['+', '-']) {
                let (c, o) = t.split_at(i);
                let sign = if o.starts_with('-') { -1 } else { 1 };
                let (h, m) = o[1..].split_once(':')?;
                let minutes = num(h, 2, 0, 14)? * 60 + num(m, 2, 0, 59)?;
                (c, Some(sign * minutes as i32))
            } else {
                (t, None)
            };
            let mut hms = clock.split(':');
            let hour = num(hms.next()?, 2, 0, 23)?;
            let minute = num(hms.next()?, 2, 0, 59)?;
            let (second, fraction) = match hms.next() {
                None => (None, ""),
                Some(sec) => {
                    let (whole, frac) = sec.split_once('.').unwrap_or((sec, ""));
                    if !frac.is_empty() && !digits(frac) {
                        return None;
                    }
                    (Some(num(whole, 2, 0, 60)?), frac)
                }
            };
            if hms.next().is_some() {
                return None;
            }
            Some(Clock {
                hour,
                minute,
                second,
                fraction,
                offset,
            })
        }
    };
    Some(Point {
        year,
        month,
        day,
        time,
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Whether a Period's `start` is certainly after its `end` — FHIR R4 invariant per-1
/// (`start <= end`) violated. `None` when either value is not a FHIR date/dateTime (no verdict).
///
/// Values are compared at the precision both have, as FHIRPath compares them: `2019` is not
/// after `2019-05-01`, and equal values are in order. Two date-times with offsets are compared
/// as instants (`10:00+02:00` is before `09:30Z`); when either side is a date only (no time, so
/// no offset), the date-time's own calendar date is compared with it: admitted `2019-02-01T23:00`
/// and discharged `2019-02-01` is a stay within that day, discharged `2019-01-31` is not.
pub fn period_start_after_end(start: &str, end: &str) -> Option<bool> {
    let (s, e) = (parse_fhir(start)?, parse_fhir(end)?);
    if let (Some(ts), Some(te)) = (s.time, e.time) {
        if let (Some(os), Some(oe)) = (ts.offset, te.offset) {
            let instant = |p: &Point<'_>, c: &Clock<'_>, o: i32| {
                days_from_civil(p.year, p.month.unwrap_or(1), p.day.unwrap_or(1)) * 86_400
                    + i64::from(c.hour) * 3_600
                    + i64::from(c.minute) * 60
                    + i64::from(c.second.unwrap_or(0))
                    - i64::from(o) * 60
            };
            let (is, ie) = (instant(&s, &ts, os), instant(&e, &te, oe));
            if ts.second.is_none() || te.second.is_none() {
                // offsets are whole minutes: both sides fall on minute boundaries alike
                return Some(is.div_euclid(60) > ie.div_euclid(60));
            }
            if is != ie {
                return Some(is > ie);
            }
            let n = ts.fraction.len().min(te.fraction.len());
            return Some(ts.fraction[..n] > te.fraction[..n]);
        }
    }
    // Calendar fields at the precision both have; times only when neither has an offset.
    let date = |p: &Point<'_>| [Some(p.year as u32), p.month, p.day];
    for (a, b) in date(&s).into_iter().zip(date(&e)) {
        match (a, b) {
            (Some(a), Some(b)) if a != b => return Some(a > b),
            (Some(_), Some(_)) => {}
            _ => return Some(false),
        }
    }
    match (s.time, e.time) {
        (Some(ts), Some(te)) if ts.offset.is_none() && te.offset.is_none() => {
            let a = (ts.hour, ts.minute, ts.second);
            let b = (te.hour, te.minute, te.second);
            if (a.0, a.1) != (b.0, b.1) {
                return Some((a.0, a.1) > (b.0, b.1));
            }
            match (a.2, b.2) {
                (Some(x), Some(y)) if x != y => Some(x > y),
                (Some(_), Some(_)) => {
                    let n = ts.fraction.len().min(te.fraction.len());
                    Some(ts.fraction[..n] > te.fraction[..n])
                }
                _ => Some(false),
            }
        }
        _ => Some(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_precision_and_offset() {
        assert_eq!(to_datetime("2026", "Z").unwrap(), "2026");
        assert_eq!(to_datetime("202611", "Z").unwrap(), "2026-11");
        assert_eq!(to_datetime("20261123", "Z").unwrap(), "2026-11-23");
        assert_eq!(
            to_datetime("202611231415", "Z").unwrap(),
            "2026-11-23T14:15:00Z"
        );
        assert_eq!(
            to_datetime("20261123141530.123-0500", "Z").unwrap(),
            "2026-11-23T14:15:30.123-05:00"
        );
        assert_eq!(
            to_datetime("2026112314+0215", "Z").unwrap(),
            "2026-11-23T14:00:00+02:15"
        );
        assert_eq!(to_date("20261123141530").unwrap(), "2026-11-23");
        assert_eq!(
            to_instant("20261123", "+01:00").unwrap(),
            "2026-11-23T00:00:00+01:00"
        );
        assert_eq!(to_time("1415").unwrap(), "14:15:00");
    }

    #[test]
    fn rejects_garbage_without_echoing_it() {
        let e = to_datetime("2026-11-23", "Z").unwrap_err();
        assert!(!e.to_string().contains("2026"));
        assert_eq!(to_datetime("20261323", "Z"), Err(DtmError::Range));
        assert!(to_datetime("202611231", "Z").is_err());
    }

    #[test]
    fn dates_are_calendar_dates_and_offsets_stay_within_fourteen_hours() {
        assert_eq!(to_date("20230230"), Err(DtmError::Range));
        assert_eq!(to_date("20230431"), Err(DtmError::Range));
        assert_eq!(to_date("20230229"), Err(DtmError::Range));
        assert_eq!(to_date("19000229"), Err(DtmError::Range));
        assert_eq!(to_date("20000229").unwrap(), "2000-02-29");
        assert_eq!(to_date("20240229").unwrap(), "2024-02-29");
        assert_eq!(to_date("20231231").unwrap(), "2023-12-31");
        assert_eq!(
            to_datetime("202611231415+1400", "Z").unwrap(),
            "2026-11-23T14:15:00+14:00"
        );
        assert_eq!(to_datetime("202611231415+1430", "Z"), Err(DtmError::Range));
        assert_eq!(to_time("141530.25").unwrap(), "14:15:30.25");
        assert_eq!(to_time("1415.5"), Err(DtmError::Syntax));
        assert_eq!(to_time("141530.x"), Err(DtmError::Syntax));
    }

    #[test]
    fn period_order_at_the_precision_both_have() {
        let after = |s, e| period_start_after_end(s, e);
        // the corpus case: admitted 2019, discharged 2011
        assert_eq!(
            after("2019-02-01T11:00:00Z", "2011-05-01T10:00:00Z"),
            Some(true)
        );
        assert_eq!(after("2011-05-01", "2019-02-01"), Some(false));
        // equal values are in order (start <= end)
        assert_eq!(after("2019-02-01", "2019-02-01"), Some(false));
        assert_eq!(
            after("2019-02-01T11:00:00+01:00", "2019-02-01T11:00:00+01:00"),
            Some(false)
        );
        // dates at different precisions: compared as far as both go
        assert_eq!(after("2019", "2019-05-01"), Some(false));
        assert_eq!(after("2019-05-01", "2019"), Some(false));
        assert_eq!(after("2019-06", "2019-05-31"), Some(true));
        assert_eq!(after("2020", "2019-12-31"), Some(true));
        // a date-time against a date: its own calendar day against that date
        assert_eq!(
            after("2019-02-01T23:00:00-05:00", "2019-02-01"),
            Some(false)
        );
        assert_eq!(
            after("2019-02-01", "2019-02-01T00:10:00+14:00"),
            Some(false)
        );
        assert_eq!(after("2019-02-01T00:30:00+01:00", "2019-01-31"), Some(true));
        assert_eq!(after("2019-02-01", "2019-01-31T23:59:59Z"), Some(true));
        // offsets: instants are compared, not wall clocks
        assert_eq!(
            after("2019-02-01T10:00:00+02:00", "2019-02-01T09:30:00Z"),
            Some(false),
            "08:00Z is before 09:30Z"
        );
        assert_eq!(
            after("2019-02-01T10:00:00Z", "2019-02-01T11:30:00+02:00"),
            Some(true),
            "10:00Z is after 09:30Z"
        );
        assert_eq!(
            after("2019-02-02T01:00:00+05:00", "2019-02-01T21:00:00-00:00"),
            Some(false),
            "a later calendar date can be an earlier instant"
        );
        assert_eq!(
            after("2019-01-01T00:00:00-05:00", "2018-12-31T23:00:00+01:00"),
            Some(true)
        );
        // seconds and fractions: only as precise as the less precise side
        assert_eq!(
            after("2019-02-01T10:00:00.500Z", "2019-02-01T10:00:00Z"),
            Some(false)
        );
        assert_eq!(
            after("2019-02-01T10:00:00.5Z", "2019-02-01T10:00:00.25Z"),
            Some(true)
        );
        assert_eq!(
            after("2019-02-01T10:00:01Z", "2019-02-01T10:00:00.999Z"),
            Some(true)
        );
        assert_eq!(
            after("2019-02-01T10:00:59Z", "2019-02-01T10:00Z"),
            Some(false)
        );
        // leap years and year boundaries
        assert_eq!(
            after("2020-02-29T12:00:00Z", "2020-03-01T00:00:00+14:00"),
            Some(true)
        );
        // not a FHIR date: no verdict (the value is left alone)
        assert_eq!(after("20190201", "2011-01-01"), None);
        assert_eq!(after("2019-13-01", "2011-01-01"), None);
        assert_eq!(after("2019-02-01", "soon"), None);
        assert_eq!(after("2019-02-01T25:00:00Z", "2011-01-01"), None);
    }
}
