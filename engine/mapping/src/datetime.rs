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
    if let Some(f) = frac.filter(|f| digits(f)) {
        out.push('.');
        out.push_str(f);
    }
    Ok(out)
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
}
