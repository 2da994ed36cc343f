use crate::charset::Charset;
use crate::escape::unescape;
use std::borrow::Cow;
use std::fmt;

/// The encoding characters from MSH-1 and MSH-2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delimiters {
    pub field: char,
    pub component: char,
    pub repetition: char,
    pub escape: char,
    pub subcomponent: char,
    /// The fifth encoding character (v2.7+ truncation, usually `#`), when present.
    pub truncation: Option<char>,
}

impl Default for Delimiters {
    fn default() -> Self {
        Self {
            field: '|',
            component: '^',
            repetition: '~',
            escape: '\\',
            subcomponent: '&',
            truncation: None,
        }
    }
}

impl Delimiters {
    /// MSH-2 as written: `^~\&` or `^~\&#`.
    pub fn encoding_characters(&self) -> String {
        let mut s: String = [
            self.component,
            self.repetition,
            self.escape,
            self.subcomponent,
        ]
        .iter()
        .collect();
        s.extend(self.truncation);
        s
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParseErrorKind {
    Empty,
    /// The input starts with something other than `MSH` (`FHS`/`BHS` mean a batch: use
    /// [`crate::split_batch`]).
    MissingMsh {
        found: String,
    },
    BadDelimiters(&'static str),
    UnsupportedCharset(String),
    /// A byte is not valid in the declared charset.
    InvalidEncoding {
        charset: &'static str,
    },
    /// A line does not start with a three-character segment name.
    BadSegmentName,
    /// More segments than [`MAX_SEGMENTS`].
    TooManySegments,
}

/// Most segments one message may have: far beyond any real message (a large ORU has a few
/// thousand), and a bound on what parsing a hostile frame can cost.
pub const MAX_SEGMENTS: usize = 100_000;

/// Where and why parsing failed. Displays position and kind only, never message content.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ParseError {
    pub kind: ParseErrorKind,
    /// 1-based segment line, counting CR, LF and CRLF each as one break.
    pub line: usize,
    /// 1-based character column within that line.
    pub column: usize,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match &self.kind {
            ParseErrorKind::Empty => "empty message".to_string(),
            ParseErrorKind::MissingMsh { found } => {
                format!("message must start with an MSH segment, found {found:?}")
            }
            ParseErrorKind::BadDelimiters(why) => format!("invalid encoding characters: {why}"),
            ParseErrorKind::UnsupportedCharset(c) => {
                format!("unsupported character set in MSH-18: {c:?}")
            }
            ParseErrorKind::InvalidEncoding { charset } => {
                format!("byte sequence not valid in declared character set {charset}")
            }
            ParseErrorKind::BadSegmentName => {
                "segment does not start with a 3-character name (A-Z, 0-9)".to_string()
            }
            ParseErrorKind::TooManySegments => {
                format!("more than {MAX_SEGMENTS} segments in one message")
            }
        };
        write!(f, "line {} column {}: {what}", self.line, self.column)
    }
}

impl ParseError {
    fn at(kind: ParseErrorKind, line: usize, column: usize) -> Self {
        Self { kind, line, column }
    }
}

#[derive(Clone, Debug)]
struct SegmentData {
    line: u32,
    start: u32,
    end: u32,
    /// Byte ranges of the fields after the name (for MSH: MSH-2, MSH-3, …).
    fields: Vec<(u32, u32)>,
}

/// A parsed message: the decoded text plus the positions of its segments and fields.
#[derive(Clone, Debug)]
pub struct Message {
    text: String,
    delimiters: Delimiters,
    charset: Charset,
    segments: Vec<SegmentData>,
}

/// The MSH facts adapters need for routing and acknowledgements. Values are raw (still escaped)
/// so an ACK can mirror them exactly.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Header {
    pub sending_application: String,
    pub sending_facility: String,
    pub receiving_application: String,
    pub receiving_facility: String,
    pub datetime: String,
    /// MSH-9.1, e.g. `ADT`.
    pub message_type: String,
    /// MSH-9.2, e.g. `A01`.
    pub trigger_event: String,
    /// MSH-9.3, e.g. `ADT_A01`.
    pub structure: String,
    /// MSH-10.
    pub control_id: String,
    /// MSH-11.1 (`P`, `T`, `D`).
    pub processing_id: String,
    /// MSH-12.1, e.g. `2.5.1`.
    pub version: String,
    /// MSH-15 accept acknowledgment type (`AL`, `NE`, `ER`, `SU`); empty in original mode.
    pub accept_ack_type: String,
    /// MSH-16 application acknowledgment type.
    pub app_ack_type: String,
    /// MSH-18 as written.
    pub charset: String,
}

impl Header {
    /// Enhanced acknowledgment mode applies when MSH-15 or MSH-16 is valued.
    pub fn enhanced_mode(&self) -> bool {
        !self.accept_ack_type.is_empty() || !self.app_ack_type.is_empty()
    }
}

fn is_segment_name(bytes: &[u8]) -> bool {
    bytes.len() == 3
        && bytes[0].is_ascii_uppercase()
        && bytes[1..]
            .iter()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// Strips UTF-8 byte-order marks, whitespace, NUL and VT (an MLLP start block left in a saved
/// frame) from the start, in any order: a BOM after a VT or a line break is skipped too.
pub(crate) fn trim_start(bytes: &[u8]) -> &[u8] {
    let mut b = bytes;
    loop {
        if let Some(rest) = b.strip_prefix(b"\xEF\xBB\xBF") {
            b = rest;
            continue;
        }
        match b.first() {
            Some(c) if c.is_ascii_whitespace() || *c == 0 || *c == 0x0b => b = &b[1..],
            _ => return b,
        }
    }
}

/// How many bytes of BOM, VT or NUL precede a segment name on a line of a batch or stream.
pub(crate) fn line_lead(line: &[u8]) -> usize {
    let mut i = 0;
    loop {
        if line[i..].starts_with(b"\xEF\xBB\xBF") {
            i += 3;
        } else if matches!(line.get(i), Some(0 | 0x0b)) {
            i += 1;
        } else {
            return i;
        }
    }
}

fn parse_delimiters(b: &[u8]) -> Result<Delimiters, ParseError> {
    let bad = |why| ParseError::at(ParseErrorKind::BadDelimiters(why), 1, 4);
    let field = *b.get(3).ok_or_else(|| bad("MSH-1 is missing"))?;
    let mut enc: Vec<u8> = b[4..]
        .iter()
        .take_while(|c| **c != field && **c != b'\r' && **c != b'\n')
        .copied()
        .collect();
    // `^~\\&`: the escape character doubled by a sender that escaped its own string literal.
    // Seen in the wild (LinuxForHealth's samples); read as `^~\&` rather than refused.
    if enc.len() == 5 && enc[2] == enc[3] && enc[2] != enc[4] {
        enc.remove(3);
    }
    if !(4..=5).contains(&enc.len()) {
        return Err(bad("MSH-2 must have 4 or 5 characters"));
    }
    let mut all = vec![field];
    all.extend_from_slice(&enc);
    if all.iter().any(|c| !c.is_ascii_punctuation()) {
        return Err(bad("encoding characters must be ASCII punctuation"));
    }
    let mut sorted = all.clone();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != all.len() {
        return Err(bad("encoding characters must all differ"));
    }
    Ok(Delimiters {
        field: char::from(field),
        component: char::from(enc[0]),
        repetition: char::from(enc[1]),
        escape: char::from(enc[2]),
        subcomponent: char::from(enc[3]),
        truncation: enc.get(4).map(|c| char::from(*c)),
    })
}

/// MSH-18's repetitions (first component each) read from the raw bytes (delimiters are ASCII in
/// every supported charset); at least one, possibly empty.
fn raw_msh18(b: &[u8], d: &Delimiters) -> Vec<String> {
    let line_end = b
        .iter()
        .position(|c| *c == b'\r' || *c == b'\n')
        .unwrap_or(b.len());
    let field = b[..line_end]
        .split(|c| *c == d.field as u8)
        .nth(17)
        .unwrap_or_default();
    field
        .split(|c| *c == d.repetition as u8)
        .map(|rep| {
            let value = rep
                .split(|c| *c == d.component as u8)
                .next()
                .unwrap_or_default();
            String::from_utf8_lossy(value).into_owned()
        })
        .collect()
}

fn line_col(text: &[u8], offset: usize) -> (usize, usize) {
    let mut line = 1;
    let mut col = 1;
    let mut prev_cr = false;
    for &c in &text[..offset.min(text.len())] {
        match c {
            b'\r' => {
                line += 1;
                col = 1;
                prev_cr = true;
                continue;
            }
            b'\n' if prev_cr => {}
            b'\n' => {
                line += 1;
                col = 1;
            }
            _ => col += 1,
        }
        prev_cr = false;
    }
    (line, col)
}

impl Message {
    /// Parses one message from raw bytes, decoding by its MSH-18.
    pub fn parse(bytes: &[u8]) -> Result<Self, ParseError> {
        let b = trim_start(bytes);
        if b.is_empty() {
            return Err(ParseError::at(ParseErrorKind::Empty, 1, 1));
        }
        if !b.starts_with(b"MSH") {
            let found = String::from_utf8_lossy(&b[..b.len().min(3)]).into_owned();
            return Err(ParseError::at(ParseErrorKind::MissingMsh { found }, 1, 1));
        }
        let delimiters = parse_delimiters(b)?;
        let declared = raw_msh18(b, &delimiters);
        let charset = Charset::from_msh18_repetitions(&declared).ok_or_else(|| {
            ParseError::at(
                ParseErrorKind::UnsupportedCharset(declared[0].clone()),
                1,
                1,
            )
        })?;
        let text = charset.decode(b).map_err(|offset| {
            let (line, column) = line_col(b, offset);
            ParseError::at(
                ParseErrorKind::InvalidEncoding {
                    charset: charset.name(),
                },
                line,
                column,
            )
        })?;
        Self::index(text.into_owned(), delimiters, charset)
    }

    fn index(text: String, delimiters: Delimiters, charset: Charset) -> Result<Self, ParseError> {
        let bytes = text.as_bytes();
        let fs = delimiters.field as u8;
        let mut segments = Vec::with_capacity(16);
        let mut line_no = 0u32;
        let mut pos = 0usize;
        // The segment terminator is CR (CRLF tolerated). A message whose first line ends in a
        // bare LF was saved with LF line ends and is split on LF; otherwise a lone LF is data (a
        // line break inside a text field), not the start of a segment: splitting there made
        // "NEG" of "Lungs clear<LF>NEG" a segment of its own and lost it.
        let lf_only = memchr::memchr2(b'\r', b'\n', bytes).is_some_and(|i| bytes[i] == b'\n');
        while pos < bytes.len() {
            let next = if lf_only {
                memchr::memchr2(b'\r', b'\n', &bytes[pos..])
            } else {
                memchr::memchr(b'\r', &bytes[pos..])
            };
            let stop = next.map_or(bytes.len(), |i| pos + i);
            // LFs that end a CR-terminated line (or the message) break no text: not data.
            let mut end = stop;
            while !lf_only && end > pos && bytes[end - 1] == b'\n' {
                end -= 1;
            }
            line_no += 1;
            let line = &bytes[pos..end];
            let meaningful = line
                .iter()
                .any(|c| !c.is_ascii_whitespace() && !c.is_ascii_control());
            if meaningful {
                if line.len() < 3
                    || !is_segment_name(&line[..3])
                    || line.get(3).is_some_and(|c| *c != fs)
                {
                    return Err(ParseError::at(
                        ParseErrorKind::BadSegmentName,
                        line_no as usize,
                        1,
                    ));
                }
                // Sized to the segment: a fixed guess per segment made a message of many
                // empty segments cost ~80 times its size.
                let mut fields = Vec::new();
                if line.len() > 4 {
                    fields.reserve_exact(memchr::memchr_iter(fs, &bytes[pos + 4..end]).count() + 1);
                    let mut start = pos + 4;
                    for i in memchr::memchr_iter(fs, &bytes[pos + 4..end]) {
                        let i = pos + 4 + i;
                        fields.push((start as u32, i as u32));
                        start = i + 1;
                    }
                    fields.push((start as u32, end as u32));
                }
                if segments.len() == MAX_SEGMENTS {
                    return Err(ParseError::at(
                        ParseErrorKind::TooManySegments,
                        line_no as usize,
                        1,
                    ));
                }
                segments.push(SegmentData {
                    line: line_no,
                    start: pos as u32,
                    end: end as u32,
                    fields,
                });
            } else if line.is_empty()
                && pos > 0
                && bytes[pos - 1] == b'\r'
                && bytes.get(end) == Some(&b'\n')
            {
                // The LF of a CRLF pair: not a line of its own.
                line_no -= 1;
            }
            pos = stop + 1;
            if stop < bytes.len() && bytes[stop] == b'\r' && bytes.get(stop + 1) == Some(&b'\n') {
                pos = stop + 2;
            }
        }
        Ok(Self {
            text,
            delimiters,
            charset,
            segments,
        })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn delimiters(&self) -> &Delimiters {
        &self.delimiters
    }

    pub fn charset(&self) -> &Charset {
        &self.charset
    }

    pub fn segments(&self) -> impl ExactSizeIterator<Item = Segment<'_>> + '_ {
        self.segments
            .iter()
            .map(move |data| Segment { msg: self, data })
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// The first segment with this name.
    pub fn segment(&self, name: &str) -> Option<Segment<'_>> {
        self.segments().find(|s| s.name() == name)
    }

    pub fn segments_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = Segment<'a>> + 'a {
        self.segments().filter(move |s| s.name() == name)
    }

    pub fn header(&self) -> Header {
        let Some(msh) = self.segment("MSH") else {
            return Header::default();
        };
        let raw = |n: usize| {
            msh.field(n)
                .map(|f| f.raw().to_string())
                .unwrap_or_default()
        };
        let comp = |n: usize, c: usize| {
            msh.field(n)
                .and_then(|f| f.component(c))
                .map(|v| v.raw().to_string())
                .unwrap_or_default()
        };
        Header {
            sending_application: raw(3),
            sending_facility: raw(4),
            receiving_application: raw(5),
            receiving_facility: raw(6),
            datetime: raw(7),
            message_type: comp(9, 1),
            trigger_event: comp(9, 2),
            structure: comp(9, 3),
            control_id: raw(10),
            processing_id: comp(11, 1),
            version: comp(12, 1),
            accept_ack_type: raw(15),
            app_ack_type: raw(16),
            charset: raw(18),
        }
    }
}

/// One segment of a [`Message`].
#[derive(Clone, Copy)]
pub struct Segment<'a> {
    msg: &'a Message,
    data: &'a SegmentData,
}

impl<'a> Segment<'a> {
    pub fn name(&self) -> &'a str {
        &self.msg.text[self.data.start as usize..self.data.start as usize + 3]
    }

    /// 1-based line of this segment in the message (for error messages and lineage).
    pub fn line(&self) -> usize {
        self.data.line as usize
    }

    /// The segment as written (still escaped).
    pub fn raw(&self) -> &'a str {
        &self.msg.text[self.data.start as usize..self.data.end as usize]
    }

    /// Highest field number present (`PID|1|2` → 2; for MSH, counting MSH-1).
    pub fn field_count(&self) -> usize {
        let n = self.data.fields.len();
        if self.is_msh() {
            n + 1
        } else {
            n
        }
    }

    fn is_msh(&self) -> bool {
        self.name() == "MSH"
    }

    /// Field `n` in HL7 numbering (`PID-3` is `field(3)`; `MSH-1` is the field separator).
    pub fn field(&self, n: usize) -> Option<Value<'a>> {
        let d = &self.msg.delimiters;
        let (idx, literal) = match (self.is_msh(), n) {
            (_, 0) => return None,
            (true, 1) => {
                // A bare `MSH` line (no separator after the name) has no MSH-1.
                let s = self.data.start as usize + 3;
                let sep = self
                    .msg
                    .text
                    .get(s..s + 1)
                    .filter(|_| s < self.data.end as usize)?;
                return Some(Value::new(sep, d, Level::Field, true));
            }
            (true, 2) => (0, true),
            (true, n) => (n - 2, false),
            (false, n) => (n - 1, false),
        };
        let (s, e) = *self.data.fields.get(idx)?;
        Some(Value::new(
            &self.msg.text[s as usize..e as usize],
            d,
            Level::Field,
            literal,
        ))
    }

    /// Every field with its number, including empty ones.
    pub fn fields(&self) -> impl Iterator<Item = (usize, Value<'a>)> + '_ {
        let seg = *self;
        (1..=self.field_count()).filter_map(move |n| seg.field(n).map(|v| (n, v)))
    }
}

impl fmt::Debug for Segment<'_> {
    /// Name and line only: a segment's content is PHI.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Segment({} at line {})", self.name(), self.line())
    }
}

/// Nesting level of a [`Value`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Field,
    Repetition,
    Component,
    Subcomponent,
}

/// A field, repetition, component or subcomponent: a slice of the message text.
#[derive(Clone, Copy)]
pub struct Value<'a> {
    raw: &'a str,
    d: &'a Delimiters,
    level: Level,
    /// MSH-1 and MSH-2 hold the delimiters themselves: never split or unescaped.
    literal: bool,
}

impl<'a> Value<'a> {
    fn new(raw: &'a str, d: &'a Delimiters, level: Level, literal: bool) -> Self {
        Self {
            raw,
            d,
            level,
            literal,
        }
    }

    pub fn level(&self) -> Level {
        self.level
    }

    /// As written, escapes unresolved.
    pub fn raw(&self) -> &'a str {
        self.raw
    }

    /// With escape sequences resolved.
    pub fn value(&self) -> Cow<'a, str> {
        if self.literal {
            Cow::Borrowed(self.raw)
        } else {
            unescape(self.raw, self.d)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// `""`: the sender explicitly nulled the value (delete it downstream), unlike empty (unknown).
    pub fn is_null(&self) -> bool {
        self.raw == "\"\""
    }

    /// True when any leaf below holds data (not just delimiters).
    pub fn has_data(&self) -> bool {
        let d = self.d;
        self.raw
            .chars()
            .any(|c| c != d.component && c != d.repetition && c != d.subcomponent)
    }

    fn child(&self) -> Option<(char, Level)> {
        if self.literal {
            return None;
        }
        match self.level {
            Level::Field => Some((self.d.repetition, Level::Repetition)),
            Level::Repetition => Some((self.d.component, Level::Component)),
            Level::Component => Some((self.d.subcomponent, Level::Subcomponent)),
            Level::Subcomponent => None,
        }
    }

    /// The next level down: repetitions of a field, components of a repetition, subcomponents of
    /// a component. A subcomponent (or MSH-1/2) yields itself.
    pub fn parts(&self) -> impl Iterator<Item = Value<'a>> + 'a {
        let this = *self;
        let (sep, level) = match self.child() {
            Some(c) => c,
            None => ('\u{0}', self.level),
        };
        let split: Box<dyn Iterator<Item = &'a str>> = if sep == '\u{0}' {
            Box::new(std::iter::once(this.raw))
        } else {
            Box::new(this.raw.split(sep))
        };
        split.map(move |s| Value::new(s, this.d, level, this.literal))
    }

    /// The `n`-th part (1-based) one level down.
    pub fn part(&self, n: usize) -> Option<Value<'a>> {
        if n == 0 {
            return None;
        }
        self.parts().nth(n - 1)
    }

    /// Repetitions of a field (a lower level yields itself).
    pub fn repetitions(&self) -> impl Iterator<Item = Value<'a>> + 'a {
        let this = *self;
        let it: Box<dyn Iterator<Item = Value<'a>>> = if this.level == Level::Field {
            Box::new(this.parts())
        } else {
            Box::new(std::iter::once(this))
        };
        it
    }

    /// Component `n` (1-based) of the first repetition of a field, or of this repetition.
    pub fn component(&self, n: usize) -> Option<Value<'a>> {
        match self.level {
            Level::Field => self.part(1)?.part(n),
            Level::Repetition => self.part(n),
            _ => (n == 1).then_some(*self),
        }
    }

    /// Subcomponent `s` of component `c`.
    pub fn subcomponent(&self, c: usize, s: usize) -> Option<Value<'a>> {
        match self.level {
            Level::Component => self.part(s),
            Level::Subcomponent => (s == 1).then_some(*self),
            _ => self.component(c)?.part(s),
        }
    }
}

impl fmt::Debug for Value<'_> {
    /// Never prints the content (PHI); only its level and length.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Value({:?}, {} bytes)", self.level, self.raw.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADT: &str = "MSH|^~\\&|ADT1|GOOD HEALTH HOSPITAL|LAB|LABFAC|198808181126|SECURITY|ADT^A01^ADT_A01|MSG00001|P|2.5.1|||AL|NE||8859/1\r\
EVN|A01|198808181123\r\
PID|1||PATID1234^^^GOOD HEALTH HOSPITAL^MR~123456789^^^USSSA^SS||EVERYMAN^ADAM^A^III||19610615|M||C|2222 HOME STREET^^GREENSBORO^NC^27401-1020|GL|(555) 555-2004|||S||\"\"|444333333\r\
NK1|1|JONES^BARBARA^K|SPO^Spouse^HL70063\r\
ZPD|custom&sub^x\r";

    /// Found by the `hl7_message` fuzz target: a second `MSH` line with nothing after the name.
    #[test]
    fn a_bare_msh_line_has_no_fields_and_does_not_panic() {
        let m = Message::parse(b"MSH|^~\\&|A|B|C|D|20250101||ADT^A01|1|P|2.5\rPID|1\rMSH").unwrap();
        let bare = m.segments().last().unwrap();
        assert_eq!(bare.name(), "MSH");
        assert!(bare.field(1).is_none());
        assert_eq!(bare.fields().count(), 0);
    }

    #[test]
    fn header_and_fields() {
        let m = Message::parse(ADT.as_bytes()).unwrap();
        let h = m.header();
        assert_eq!(h.message_type, "ADT");
        assert_eq!(h.trigger_event, "A01");
        assert_eq!(h.structure, "ADT_A01");
        assert_eq!(h.control_id, "MSG00001");
        assert_eq!(h.version, "2.5.1");
        assert_eq!(h.accept_ack_type, "AL");
        assert!(h.enhanced_mode());
        assert_eq!(m.charset(), &Charset::Latin1);
        let msh = m.segment("MSH").unwrap();
        assert_eq!(msh.field(1).unwrap().raw(), "|");
        assert_eq!(msh.field(2).unwrap().value(), "^~\\&");
        assert_eq!(
            msh.field(2).unwrap().parts().count(),
            1,
            "MSH-2 is never split"
        );
        assert_eq!(msh.field(3).unwrap().raw(), "ADT1");
        let pid = m.segment("PID").unwrap();
        assert_eq!(pid.line(), 3);
        let ids: Vec<_> = pid.field(3).unwrap().repetitions().collect();
        assert_eq!(ids.len(), 2);
        assert_eq!(ids[1].component(1).unwrap().raw(), "123456789");
        assert_eq!(ids[1].component(4).unwrap().raw(), "USSSA");
        assert_eq!(pid.field(5).unwrap().component(2).unwrap().value(), "ADAM");
        assert!(pid.field(18).unwrap().is_null());
        assert!(pid.field(17).unwrap().is_empty());
        assert!(pid.field(40).is_none());
        let z = m.segment("ZPD").unwrap();
        assert_eq!(z.field(1).unwrap().subcomponent(1, 2).unwrap().raw(), "sub");
        assert_eq!(m.segments_named("NK1").count(), 1);
    }

    #[test]
    fn a_message_of_too_many_segments_is_refused() {
        let mut m = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5\r".to_vec();
        for _ in 0..MAX_SEGMENTS {
            m.extend_from_slice(b"ZZZ\r");
        }
        let err = Message::parse(&m).unwrap_err();
        assert_eq!(err.kind, ParseErrorKind::TooManySegments);
        assert_eq!(err.line, MAX_SEGMENTS + 1);
    }

    #[test]
    fn a_line_break_inside_a_cr_terminated_segment_is_data() {
        let cr = "MSH|^~\\&|A|B|C|D|20240101||ORU^R01|1|P|2.5\rOBX|1|TX|CXR^Chest||Lungs clear\nNEG\nEND\rNTE|1||x\r\n";
        let m = Message::parse(cr.as_bytes()).unwrap();
        assert_eq!(m.segment_count(), 3);
        assert_eq!(
            m.segment("OBX").unwrap().field(5).unwrap().value(),
            "Lungs clear\nNEG\nEND"
        );
        assert_eq!(m.segment("NTE").unwrap().field(3).unwrap().value(), "x");
        // A file saved with LF line ends is split on LF.
        let lf = "MSH|^~\\&|A|B|C|D|20240101||ORU^R01|1|P|2.5\nOBX|1|TX|c||v\nNTE|1||x\n";
        assert_eq!(Message::parse(lf.as_bytes()).unwrap().segment_count(), 3);
    }

    #[test]
    fn line_endings_bom_and_five_encoding_characters() {
        let crlf = "\u{feff}MSH|^~\\&#|A|B|C|D|20240101||ORU^R01|1|P|2.7\r\nPID|1||X\r\n\r\nOBX|1|ST|c||v\\F\\w\n";
        let m = Message::parse(crlf.as_bytes()).unwrap();
        assert_eq!(m.delimiters().truncation, Some('#'));
        assert_eq!(m.segment_count(), 3);
        assert_eq!(m.segment("OBX").unwrap().field(5).unwrap().value(), "v|w");
        assert_eq!(m.segment("OBX").unwrap().line(), 4);
    }

    #[test]
    fn a_vt_or_line_break_before_the_bom_is_skipped_too() {
        for input in [
            &b"\x0b\xEF\xBB\xBFMSH|^~\\&|A|B|C|D|||ADT^A01|V1|P|2.5\rPID|1\r"[..],
            &b"\r\n\xEF\xBB\xBF\x0bMSH|^~\\&|A|B|C|D|||ADT^A01|V1|P|2.5\rPID|1\r"[..],
        ] {
            let m = Message::parse(input).unwrap();
            assert_eq!(m.header().control_id, "V1");
            assert_eq!(m.segment_count(), 2);
        }
    }

    #[test]
    fn doubled_escape_character_is_tolerated() {
        let m = Message::parse(b"MSH|^~\\\\&|A|B\rPID|1||a&b").unwrap();
        assert_eq!(m.delimiters(), &Delimiters::default());
        assert_eq!(
            m.segment("PID")
                .unwrap()
                .field(3)
                .unwrap()
                .subcomponent(1, 2)
                .unwrap()
                .raw(),
            "b"
        );
    }

    #[test]
    fn custom_delimiters() {
        let m = Message::parse(b"MSH#!@$%#A#B\rPID#1##ID1!F!x@ID2").unwrap();
        let f = m.segment("PID").unwrap().field(3).unwrap();
        assert_eq!(f.component(3).unwrap().raw(), "x");
        assert_eq!(f.part(2).unwrap().raw(), "ID2");
    }

    #[test]
    fn charset_is_honoured() {
        let mut latin =
            b"MSH|^~\\&|A|B|C|D|2024||ADT^A08|1|P|2.5||||||8859/1\rPID|1||1||M".to_vec();
        latin.push(0xdc);
        latin.extend_from_slice(b"LLER");
        let m = Message::parse(&latin).unwrap();
        assert_eq!(
            m.segment("PID").unwrap().field(5).unwrap().value(),
            "M\u{dc}LLER"
        );
        let mut bad_utf8 =
            b"MSH|^~\\&|A|B|C|D|2024||ADT^A08|1|P|2.5||||||UNICODE UTF-8\rPID|1||".to_vec();
        bad_utf8.push(0xff);
        let err = Message::parse(&bad_utf8).unwrap_err();
        assert!(matches!(err.kind, ParseErrorKind::InvalidEncoding { .. }));
        assert_eq!((err.line, err.column), (2, 8));
        let err =
            Message::parse(b"MSH|^~\\&|A|B|C|D|2024||ADT^A08|1|P|2.5||||||EBCDIC\r").unwrap_err();
        assert!(matches!(err.kind, ParseErrorKind::UnsupportedCharset(_)));
    }

    #[test]
    fn a_later_msh18_repetition_names_the_set_escapes_switch_to() {
        // ASCII by default, JIS X 0208 between ESC $ B and ESC ( B (ISO 2022, as Japanese
        // senders write it): 山田 for the family name.
        for default in ["ISO IR6", ""] {
            let mut jis = format!(
                "MSH|^~\\&|A|B|C|D|2024||ADT^A08|1|P|2.5||||||{default}~ISO IR87\rPID|1||1||"
            )
            .into_bytes();
            jis.extend_from_slice(b"\x1b$B;3ED\x1b(B^TARO");
            let m = Message::parse(&jis).unwrap();
            let name = m.segment("PID").unwrap().field(5).unwrap();
            assert_eq!(name.component(1).unwrap().value(), "\u{5c71}\u{7530}");
            assert_eq!(name.component(2).unwrap().value(), "TARO");
        }
        // a later repetition alone does not change an 8-bit default
        let mut latin =
            b"MSH|^~\\&|A|B|C|D|2024||ADT^A08|1|P|2.5||||||8859/1~ISO IR87\rPID|1||1||M".to_vec();
        latin.push(0xdc);
        let m = Message::parse(&latin).unwrap();
        assert_eq!(
            m.segment("PID").unwrap().field(5).unwrap().value(),
            "M\u{dc}"
        );
    }

    #[test]
    fn errors_have_positions_and_no_content() {
        let err = Message::parse(b"PID|1||SECRET").unwrap_err();
        assert!(matches!(err.kind, ParseErrorKind::MissingMsh { .. }));
        let err = Message::parse(b"MSH|^~\\&|A\rthis is not a segment SECRET").unwrap_err();
        assert_eq!(err.kind, ParseErrorKind::BadSegmentName);
        assert_eq!(err.line, 2);
        assert!(!err.to_string().contains("SECRET"));
        assert!(matches!(
            Message::parse(b"MSH|^^\\&|A").unwrap_err().kind,
            ParseErrorKind::BadDelimiters(_)
        ));
        assert_eq!(
            Message::parse(b"  \r\n").unwrap_err().kind,
            ParseErrorKind::Empty
        );
    }

    #[test]
    fn debug_output_has_no_content() {
        let m = Message::parse(ADT.as_bytes()).unwrap();
        let pid = m.segment("PID").unwrap();
        let shown = format!("{pid:?} {:?}", pid.field(5).unwrap());
        assert!(!shown.contains("EVERYMAN"), "{shown}");
    }
}
