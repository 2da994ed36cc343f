//! Source paths in the notation analysts already use: `PID-3`, `PID.5.1`, `PID-3[1].4.1`,
//! `OBX-5[*]`, and relative paths inside datatype maps: `.1`, `.4.2`, `.` (the value itself).

use std::fmt;

/// Which repetitions of a field a path selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rep {
    /// No index written: every repetition when the target holds many values, else the first
    /// non-empty one.
    Default,
    /// `[*]`: every repetition (the target must hold many values).
    All,
    /// `[n]`, 1-based.
    Index(usize),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourcePath {
    /// `Some` for an absolute path (`PID-3`), `None` for a relative one (`.4.1`).
    pub segment: Option<String>,
    pub field: usize,
    pub rep: Rep,
    /// Component, then subcomponent (absolute); or levels to descend (relative).
    pub steps: Vec<usize>,
    pub text: String,
}

impl fmt::Display for SourcePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// True when `s` looks like a source path rather than a literal.
pub fn looks_like_path(s: &str) -> bool {
    let b = s.as_bytes();
    if b.first() == Some(&b'.') {
        return b.len() == 1 || b[1].is_ascii_digit();
    }
    b.len() >= 5
        && b[0].is_ascii_uppercase()
        && b[1].is_ascii_alphanumeric()
        && b[2].is_ascii_alphanumeric()
        && (b[3] == b'-' || b[3] == b'.')
        && b[4].is_ascii_digit()
}

fn number(s: &str, what: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err(format!("{what} numbers start at 1 (HL7 numbering), got 0")),
        Ok(n) if n <= 999 => Ok(n),
        _ => Err(format!("expected a {what} number, found `{s}`")),
    }
}

pub fn parse(text: &str) -> Result<SourcePath, String> {
    let t = text.trim();
    if let Some(rest) = t.strip_prefix('.') {
        let steps = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('.')
                .map(|p| number(p, "component"))
                .collect::<Result<Vec<_>, _>>()?
        };
        if steps.len() > 2 {
            return Err(
                "a relative path descends at most two levels (component.subcomponent)".into(),
            );
        }
        return Ok(SourcePath {
            segment: None,
            field: 0,
            rep: Rep::Default,
            steps,
            text: t.to_string(),
        });
    }
    if !looks_like_path(t) {
        return Err(format!(
            "`{t}` is not a source path: write SEG-field[.component[.subcomponent]], e.g. PID-5.1 or PID-3[1].4"
        ));
    }
    let segment = t[..3].to_string();
    let rest = &t[4..];
    let (field_part, after) = match rest.find(['[', '.']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let field = number(field_part, "field")?;
    let (rep, after) = if let Some(r) = after.strip_prefix('[') {
        let end = r.find(']').ok_or("missing `]` after repetition")?;
        let inner = &r[..end];
        let rep = if inner == "*" {
            Rep::All
        } else {
            Rep::Index(number(inner, "repetition")?)
        };
        (rep, &r[end + 1..])
    } else {
        (Rep::Default, after)
    };
    let steps = if after.is_empty() {
        Vec::new()
    } else {
        let a = after
            .strip_prefix('.')
            .ok_or_else(|| format!("unexpected `{after}` after field"))?;
        a.split('.')
            .map(|p| number(p, "component"))
            .collect::<Result<Vec<_>, _>>()?
    };
    if steps.len() > 2 {
        return Err("a path has at most a component and a subcomponent after the field".into());
    }
    Ok(SourcePath {
        segment: Some(segment),
        field,
        rep,
        steps,
        text: t.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_analyst_notation() {
        let p = parse("PID-3[1].4.1").unwrap();
        assert_eq!(p.segment.as_deref(), Some("PID"));
        assert_eq!(
            (p.field, p.rep, p.steps.clone()),
            (3, Rep::Index(1), vec![4, 1])
        );
        let p = parse("PID.5.1").unwrap();
        assert_eq!((p.field, p.rep, p.steps), (5, Rep::Default, vec![1]));
        assert_eq!(parse("OBX-5[*]").unwrap().rep, Rep::All);
        assert_eq!(parse(".4.2").unwrap().steps, vec![4, 2]);
        assert!(parse(".").unwrap().steps.is_empty());
        assert!(parse("PID-0").is_err());
        assert!(parse("PID-3[x]").is_err());
        assert!(parse("PID-3.1.2.3").is_err());
        assert!(parse("gender").is_err());
    }
}
