use crate::message::Delimiters;
use std::borrow::Cow;

/// Resolves HL7 escape sequences: `\F\ \S\ \T\ \R\ \E\` to the delimiter characters, `\Xhh…\` to
/// the bytes it names (read as UTF-8, else ISO 8859-1; kept as written when they include a
/// control character other than tab, CR or LF), `\.br\` to a line break, and drops
/// formatting commands (`\H\ \N\ \.sp\ \.in\ \.ti\ \.sk\ \.ce\ \.fi\ \.nf\`). Unknown or
/// unterminated sequences are kept literally so nothing is silently lost.
pub fn unescape<'a>(raw: &'a str, d: &Delimiters) -> Cow<'a, str> {
    let esc = d.escape;
    if !raw.contains(esc) {
        return Cow::Borrowed(raw);
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(start) = rest.find(esc) {
        out.push_str(&rest[..start]);
        let after = &rest[start + esc.len_utf8()..];
        let Some(end) = after.find(esc) else {
            out.push_str(&rest[start..]);
            return Cow::Owned(out);
        };
        let seq = &after[..end];
        match seq {
            "F" => out.push(d.field),
            "S" => out.push(d.component),
            "T" => out.push(d.subcomponent),
            "R" => out.push(d.repetition),
            "E" => out.push(d.escape),
            "P" => out.extend(d.truncation),
            ".br" => out.push('\n'),
            "H" | "N" | ".fi" | ".nf" => {}
            s if s.starts_with(".sp")
                || s.starts_with(".in")
                || s.starts_with(".ti")
                || s.starts_with(".sk")
                || s.starts_with(".ce") =>
            {
                if s.starts_with(".sp") {
                    out.push('\n');
                }
            }
            s if s.starts_with('X') && s.len() > 1 && s.len() % 2 == 1 => {
                // Control characters other than tab and line breaks are kept as the escape they
                // came in: FHIR strings may not hold them, and dropping them would lose data.
                let text = hex_bytes(&s[1..]).map(|bytes| match String::from_utf8(bytes) {
                    Ok(t) => t,
                    Err(e) => e.into_bytes().into_iter().map(char::from).collect(),
                });
                match text.filter(|t| !t.chars().any(|c| c < ' ' && !"\t\n\r".contains(c))) {
                    Some(t) => out.push_str(&t),
                    None => {
                        out.push(esc);
                        out.push_str(s);
                        out.push(esc);
                    }
                }
            }
            other => {
                out.push(esc);
                out.push_str(other);
                out.push(esc);
            }
        }
        rest = &after[end + esc.len_utf8()..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

fn hex_bytes(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Escapes delimiter characters so `s` can be written into a field (ACKs, outbound messages).
pub fn escape(s: &str, d: &Delimiters) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let seq = if c == d.escape {
            Some('E')
        } else if c == d.field {
            Some('F')
        } else if c == d.component {
            Some('S')
        } else if c == d.subcomponent {
            Some('T')
        } else if c == d.repetition {
            Some('R')
        } else if Some(c) == d.truncation {
            Some('P')
        } else {
            None
        };
        match (seq, c) {
            (Some(code), _) => {
                out.push(d.escape);
                out.push(code);
                out.push(d.escape);
            }
            (None, '\r' | '\n') => {
                out.push(d.escape);
                out.push_str(".br");
                out.push(d.escape);
            }
            (None, c) => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_sequences() {
        let d = Delimiters::default();
        assert_eq!(unescape(r"A\F\B\S\C\T\D\R\E\E\", &d), r"A|B^C&D~E\");
        assert_eq!(unescape(r"line1\.br\line2", &d), "line1\nline2");
        assert_eq!(unescape(r"\H\bold\N\", &d), "bold");
        assert_eq!(unescape(r"caf\XC3A9\", &d), "caf\u{e9}");
        assert_eq!(unescape(r"x\XE9\", &d), "x\u{e9}");
        // control characters FHIR strings may not hold stay as written; tab and CR/LF resolve
        assert_eq!(unescape(r"a\X01\b\X411B\c", &d), r"a\X01\b\X411B\c");
        assert_eq!(unescape(r"a\X09\b\X0D0A\c", &d), "a\tb\r\nc");
        assert_eq!(
            unescape(r"keep \Zfoo\ and \unterminated", &d),
            r"keep \Zfoo\ and \unterminated"
        );
        assert!(matches!(unescape("plain", &d), Cow::Borrowed(_)));
    }

    #[test]
    fn escape_round_trips() {
        let d = Delimiters::default();
        for s in ["a|b^c&d~e\\f", "multi\nline", "plain"] {
            assert_eq!(unescape(&escape(s, &d), &d), s.replace("\r", "\n"));
        }
    }
}
