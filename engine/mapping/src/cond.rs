//! Conditions (`when:`): `OBX-2 == NM`, `OBX-2 in [NM, SN]`, `PID-30 != Y`, `exists(PV1-45)`,
//! `is_url(OBX-5.1)` (an absolute URL such as `https://…`, which FHIR `url` elements take),
//! `is_uri(.2)` (a value that is a URI in some spelling: an OID, a UUID, a URL or URN — what
//! `transform: uri` turns into a URI without inventing a `urn:id:` for it),
//! `PV1-19` (true when non-empty), `from(ORC-12)` (the value being mapped was read from that
//! field: one map of an XCN serving ORC-12 and PV1-7 can add what only the orderer has),
//! combined with `and`, `or`, `not` and parentheses.
//! Words that are not paths are literal codes; quote a literal that looks like a path.

use crate::path::{self, SourcePath};

#[derive(Clone, Debug, PartialEq)]
pub enum Operand {
    Path(SourcePath),
    Literal(String),
    Var(String),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Cond {
    Exists(Operand),
    IsUrl(Operand),
    IsUri(Operand),
    /// The value being mapped is a repetition of this field (`from(ORC-12)`).
    From(Operand),
    Eq(Operand, Operand),
    Ne(Operand, Operand),
    In(Operand, Vec<Operand>),
    Not(Box<Cond>),
    And(Box<Cond>, Box<Cond>),
    Or(Box<Cond>, Box<Cond>),
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Word(String),
    Quoted(String),
    Op(&'static str),
}

fn lex(s: &str) -> Result<Vec<(usize, Tok)>, (usize, String)> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if s[i..].starts_with("==") {
            out.push((i, Tok::Op("==")));
            i += 2;
        } else if s[i..].starts_with("!=") {
            out.push((i, Tok::Op("!=")));
            i += 2;
        } else if let Some(op) = ["(", ")", "[", "]", ","]
            .iter()
            .find(|o| o.as_bytes()[0] == c)
        {
            out.push((i, Tok::Op(op)));
            i += 1;
        } else if c == b'\'' || c == b'"' {
            let end = s[i + 1..]
                .find(c as char)
                .ok_or((i, "unterminated quoted literal".to_string()))?;
            out.push((i, Tok::Quoted(s[i + 1..i + 1 + end].to_string())));
            i += end + 2;
        } else {
            let start = i;
            while i < b.len()
                && !b[i].is_ascii_whitespace()
                && !matches!(b[i], b'(' | b')' | b'[' | b']' | b',' | b'=' | b'!')
            {
                i += 1;
            }
            // keep `[n]`/`[*]` repetition selectors inside a path word
            while i < b.len() && b[i] == b'[' && path::looks_like_path(&s[start..i]) {
                match s[i..].find(']') {
                    Some(e) => {
                        i += e + 1;
                        while i < b.len()
                            && !b[i].is_ascii_whitespace()
                            && !matches!(b[i], b'(' | b')' | b',' | b'=' | b'!' | b'[' | b']')
                        {
                            i += 1;
                        }
                    }
                    None => break,
                }
            }
            if start == i {
                return Err((i, format!("unexpected character `{}`", c as char)));
            }
            out.push((start, Tok::Word(s[start..i].to_string())));
        }
    }
    Ok(out)
}

struct P {
    toks: Vec<(usize, Tok)>,
    i: usize,
    len: usize,
}

impl P {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.i).map(|(_, t)| t)
    }
    fn at(&self) -> usize {
        self.toks.get(self.i).map_or(self.len, |(p, _)| *p)
    }
    fn word_is(&self, w: &str) -> bool {
        matches!(self.peek(), Some(Tok::Word(x)) if x == w)
    }
    fn expect(&mut self, op: &str) -> Result<(), (usize, String)> {
        if matches!(self.peek(), Some(Tok::Op(o)) if *o == op) {
            self.i += 1;
            Ok(())
        } else {
            Err((self.at(), format!("expected `{op}`")))
        }
    }
    fn or(&mut self) -> Result<Cond, (usize, String)> {
        let mut l = self.and()?;
        while self.word_is("or") {
            self.i += 1;
            l = Cond::Or(Box::new(l), Box::new(self.and()?));
        }
        Ok(l)
    }
    fn and(&mut self) -> Result<Cond, (usize, String)> {
        let mut l = self.not()?;
        while self.word_is("and") {
            self.i += 1;
            l = Cond::And(Box::new(l), Box::new(self.not()?));
        }
        Ok(l)
    }
    fn not(&mut self) -> Result<Cond, (usize, String)> {
        if self.word_is("not") {
            self.i += 1;
            return Ok(Cond::Not(Box::new(self.not()?)));
        }
        self.atom()
    }
    fn atom(&mut self) -> Result<Cond, (usize, String)> {
        if matches!(self.peek(), Some(Tok::Op("("))) {
            self.i += 1;
            let c = self.or()?;
            self.expect(")")?;
            return Ok(c);
        }
        if self.word_is("from") {
            self.i += 1;
            self.expect("(")?;
            let at = self.at();
            let o = self.operand()?;
            self.expect(")")?;
            return match o {
                Operand::Path(p) if p.segment.is_some() && p.steps.is_empty() => {
                    Ok(Cond::From(Operand::Path(p)))
                }
                _ => Err((at, "from() takes a field such as ORC-12".into())),
            };
        }
        for (name, make) in [
            ("exists", Cond::Exists as fn(Operand) -> Cond),
            ("is_url", Cond::IsUrl),
            ("is_uri", Cond::IsUri),
        ] {
            if self.word_is(name) {
                self.i += 1;
                self.expect("(")?;
                let o = self.operand()?;
                self.expect(")")?;
                return Ok(make(o));
            }
        }
        let l = self.operand()?;
        match self.peek() {
            Some(Tok::Op("==")) => {
                self.i += 1;
                Ok(Cond::Eq(l, self.operand()?))
            }
            Some(Tok::Op("!=")) => {
                self.i += 1;
                Ok(Cond::Ne(l, self.operand()?))
            }
            Some(Tok::Word(w)) if w == "in" => {
                self.i += 1;
                self.expect("[")?;
                let mut items = vec![self.operand()?];
                while matches!(self.peek(), Some(Tok::Op(","))) {
                    self.i += 1;
                    items.push(self.operand()?);
                }
                self.expect("]")?;
                Ok(Cond::In(l, items))
            }
            _ => Ok(Cond::Exists(l)),
        }
    }
    fn operand(&mut self) -> Result<Operand, (usize, String)> {
        let at = self.at();
        match self.toks.get(self.i).map(|(_, t)| t.clone()) {
            Some(Tok::Quoted(q)) => {
                self.i += 1;
                Ok(Operand::Literal(q))
            }
            Some(Tok::Word(w)) => {
                self.i += 1;
                if let Some(v) = w.strip_prefix('$') {
                    Ok(Operand::Var(v.to_string()))
                } else if path::looks_like_path(&w) {
                    path::parse(&w).map(Operand::Path).map_err(|e| (at, e))
                } else {
                    Ok(Operand::Literal(w))
                }
            }
            _ => Err((at, "expected a path, a code or a quoted literal".into())),
        }
    }
}

/// An absolute URI, `scheme:rest`: the scheme a letter then letters, digits, `+`, `-` or `.`,
/// something after the colon, and no whitespace (`urn:oid:1.2.3`, `https://…`).
pub fn is_absolute_uri(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once(':') else {
        return false;
    };
    scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        && !rest.is_empty()
        && !s.contains(char::is_whitespace)
}

/// An absolute URL: an absolute URI whose scheme is followed by `://` and something after it.
/// FHIR `url` elements (Attachment.url, endpoints) take only these; an identifier-like `urn:`
/// is a `uri`, not a locator.
pub fn is_url(s: &str) -> bool {
    is_absolute_uri(s)
        && s.split_once(':')
            .and_then(|(_, rest)| rest.strip_prefix("//"))
            .is_some_and(|after| !after.is_empty())
}

/// Parses a condition; errors carry the byte offset in the expression.
pub fn parse(s: &str) -> Result<Cond, (usize, String)> {
    let mut p = P {
        toks: lex(s)?,
        i: 0,
        len: s.len(),
    };
    let c = p.or()?;
    if p.i != p.toks.len() {
        return Err((p.at(), "unexpected text after the condition".into()));
    }
    Ok(c)
}

impl Cond {
    /// Every operand of the condition, in order.
    fn each_operand<'a>(&'a self, f: &mut impl FnMut(&'a Operand)) {
        match self {
            Cond::Exists(a) | Cond::IsUrl(a) | Cond::IsUri(a) | Cond::From(a) => f(a),
            Cond::Eq(a, b) | Cond::Ne(a, b) => {
                f(a);
                f(b);
            }
            Cond::In(a, items) => {
                f(a);
                items.iter().for_each(&mut *f);
            }
            Cond::Not(c) => c.each_operand(f),
            Cond::And(a, b) | Cond::Or(a, b) => {
                a.each_operand(f);
                b.each_operand(f);
            }
        }
    }

    /// Every message-map variable the condition reads (`$encounter_status`).
    pub fn vars(&self, out: &mut Vec<String>) {
        self.each_operand(&mut |o| {
            if let Operand::Var(v) = o {
                out.push(v.clone())
            }
        });
    }

    /// Every source path the condition reads (for load-time checks).
    pub fn paths(&self, out: &mut Vec<SourcePath>) {
        self.each_operand(&mut |o| {
            if let Operand::Path(p) = o {
                out.push(p.clone())
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_conditions() {
        let c = parse("OBX-2 in [NM, SN] and not exists(OBX-5[2])").unwrap();
        assert!(matches!(c, Cond::And(_, _)));
        let c = parse("PID-8 == 'F'").unwrap();
        assert!(matches!(c, Cond::Eq(Operand::Path(_), Operand::Literal(_))));
        assert!(matches!(parse("PV1-45").unwrap(), Cond::Exists(_)));
        assert!(matches!(parse("is_url(OBX-5.1)").unwrap(), Cond::IsUrl(_)));
        assert!(matches!(parse("is_uri(.2)").unwrap(), Cond::IsUri(_)));
        assert!(matches!(parse("from(ORC-12)").unwrap(), Cond::From(_)));
        for bad in ["from(.1)", "from(ORC-12.1)", "from(NW)"] {
            let e = parse(bad).unwrap_err();
            assert!(e.1.contains("from() takes a field"), "{bad}: {e:?}");
        }
    }

    #[test]
    fn only_absolute_urls_are_urls() {
        for u in [
            "https://example.org/doc/1",
            "mllp://lab-1",
            "s3+https://b/k",
        ] {
            assert!(is_url(u), "{u}");
        }
        for u in [
            "60",
            "urn:oid:1.2.3",
            "://x",
            "1http://x",
            "http://",
            "http://a b",
            "cid:60",
        ] {
            assert!(!is_url(u), "{u}");
        }
        for u in [
            "urn:oid:1.2.3",
            "https://example.org/ids",
            "urn:id:RIVERSIDE",
        ] {
            assert!(is_absolute_uri(u), "{u}");
        }
        for u in ["MRN SYSTEM", "60", ":x", "urn:", "1a:b", "urn:oid:1 2"] {
            assert!(!is_absolute_uri(u), "{u}");
        }
        assert!(matches!(
            parse("$status != final").unwrap(),
            Cond::Ne(Operand::Var(_), _)
        ));
        let (at, _) = parse("OBX-2 == NM )").unwrap_err();
        assert_eq!(at, 12);
        assert!(parse("OBX-2 in [NM").is_err());
    }
}
