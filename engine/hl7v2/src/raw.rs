//! Reading just enough of an HL7 v2 message to acknowledge and journal it: the MSH fields,
//! without decoding the body. A listener must answer even for a message in a charset it cannot
//! decode, so this works on raw bytes: header values are copied into the ACK byte-for-byte (an
//! ISO 8859-1 facility name comes back in ISO 8859-1). Full parsing and charset decoding happen
//! in the mapping pipeline.
//!
//! Tolerated: a UTF-8 BOM, a stray VT, leading CR/LF/whitespace, CR, LF or CRLF segment
//! separators, any field separator and 4- or 5-character encoding characters (`^~\&` or
//! `^~\&#`).

use std::ops::Range;

/// What went wrong reading the header; the text is PHI-free and goes into the NAK's ERR segment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("empty message")]
    Empty,
    #[error("message does not start with an MSH segment")]
    NoMsh,
    #[error("MSH-1/MSH-2 delimiters are invalid")]
    BadDelimiters,
    #[error("required field {0} is empty")]
    MissingField(&'static str),
}

impl HeaderError {
    /// The HL7 table 0357 error code for the ERR segment.
    pub fn hl7_code(&self) -> (&'static str, &'static str) {
        match self {
            HeaderError::Empty | HeaderError::NoMsh => ("100", "Segment sequence error"),
            HeaderError::BadDelimiters => ("102", "Data type error"),
            HeaderError::MissingField(_) => ("101", "Required field missing"),
        }
    }

    /// The location for ERR-2 (`MSH^1^10` style), when one field is at fault.
    pub fn location(&self) -> Option<(&'static str, u32)> {
        match self {
            HeaderError::MissingField(f) => f
                .strip_prefix("MSH-")
                .and_then(|n| n.parse().ok())
                .map(|n| ("MSH", n)),
            HeaderError::BadDelimiters => Some(("MSH", 2)),
            _ => None,
        }
    }
}

/// Encoding characters of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delims {
    pub field: u8,
    pub component: u8,
    pub repetition: u8,
    pub escape: u8,
    pub subcomponent: u8,
    /// The fifth (truncation) character introduced in v2.7, when present.
    pub truncation: Option<u8>,
}

impl Default for Delims {
    fn default() -> Self {
        Self {
            field: b'|',
            component: b'^',
            repetition: b'~',
            escape: b'\\',
            subcomponent: b'&',
            truncation: None,
        }
    }
}

impl Delims {
    /// MSH-2 as written.
    pub fn encoding_chars(&self) -> Vec<u8> {
        let mut v = vec![
            self.component,
            self.repetition,
            self.escape,
            self.subcomponent,
        ];
        v.extend(self.truncation);
        v
    }
}

/// The MSH of one message, as byte ranges into its payload.
#[derive(Debug, Clone)]
pub struct Header<'a> {
    payload: &'a [u8],
    pub delims: Delims,
    /// Byte range of the MSH segment (without its terminator).
    pub msh: Range<usize>,
    /// fields[i] = MSH-i; fields[0] is the segment id.
    fields: Vec<Range<usize>>,
}

fn is_seg_end(b: u8) -> bool {
    b == b'\r' || b == b'\n'
}

/// Skips UTF-8 BOMs, whitespace/line ends, NUL and VT (a stray MLLP start block), in any order;
/// returns the offset of the first segment.
pub fn body_start(payload: &[u8]) -> usize {
    let mut i = 0;
    while i < payload.len() {
        if payload[i..].starts_with(b"\xEF\xBB\xBF") {
            i += 3;
        } else if payload[i].is_ascii_whitespace() || matches!(payload[i], 0 | 0x0b) {
            i += 1;
        } else {
            break;
        }
    }
    i
}

/// Ranges of the segments of a payload (CR, LF or CRLF separated, empty lines skipped).
pub fn segments(payload: &[u8]) -> impl Iterator<Item = Range<usize>> + '_ {
    let start = body_start(payload);
    let mut pos = start;
    std::iter::from_fn(move || {
        while pos < payload.len() && is_seg_end(payload[pos]) {
            pos += 1;
        }
        if pos >= payload.len() {
            return None;
        }
        let s = pos;
        let len = memchr::memchr2(b'\r', b'\n', &payload[s..]).unwrap_or(payload.len() - s);
        pos = s + len;
        Some(s..s + len)
    })
}

impl<'a> Header<'a> {
    /// Reads the MSH at the start of `payload`.
    pub fn read(payload: &'a [u8]) -> Result<Self, HeaderError> {
        let start = body_start(payload);
        if start >= payload.len() {
            return Err(HeaderError::Empty);
        }
        let seg_len =
            memchr::memchr2(b'\r', b'\n', &payload[start..]).unwrap_or(payload.len() - start);
        let msh = start..start + seg_len;
        Self::read_segment(payload, msh)
    }

    /// Reads an MSH (or FHS/BHS, which share its layout) at `seg`.
    pub fn read_segment(payload: &'a [u8], seg: Range<usize>) -> Result<Self, HeaderError> {
        let s = &payload[seg.clone()];
        if s.len() < 3 || !matches!(&s[..3], b"MSH" | b"FHS" | b"BHS") {
            return Err(HeaderError::NoMsh);
        }
        let Some(&field) = s.get(3) else {
            return Err(HeaderError::BadDelimiters);
        };
        if field.is_ascii_alphanumeric() || field.is_ascii_whitespace() {
            return Err(HeaderError::BadDelimiters);
        }
        let enc_end = memchr::memchr(field, &s[4..]).map_or(s.len(), |p| p + 4);
        let enc = &s[4..enc_end];
        if enc.len() < 4
            || enc.len() > 5
            || enc.iter().any(|b| b.is_ascii_alphanumeric() || *b == field)
        {
            return Err(HeaderError::BadDelimiters);
        }
        let delims = Delims {
            field,
            component: enc[0],
            repetition: enc[1],
            escape: enc[2],
            subcomponent: enc[3],
            truncation: enc.get(4).copied(),
        };
        let base = seg.start;
        let mut fields = vec![base..base + 3, base + 3..base + 4, base + 4..base + enc_end];
        let mut p = enc_end;
        while p < s.len() {
            // s[p] is a field separator
            let f_start = p + 1;
            let f_end = memchr::memchr(field, &s[f_start..]).map_or(s.len(), |q| q + f_start);
            fields.push(base + f_start..base + f_end);
            p = f_end;
        }
        Ok(Header {
            payload,
            delims,
            msh: seg,
            fields,
        })
    }

    /// Raw bytes of MSH-n (n ≥ 3); empty when absent.
    pub fn field(&self, n: usize) -> &'a [u8] {
        self.fields
            .get(n)
            .filter(|_| n >= 3)
            .map_or(&[][..], |r| &self.payload[r.clone()])
    }

    /// Byte range of MSH-n in the payload, when present.
    pub fn field_range(&self, n: usize) -> Option<Range<usize>> {
        self.fields.get(n).cloned()
    }

    /// First component of MSH-n.
    pub fn component(&self, n: usize, c: usize) -> &'a [u8] {
        self.field(n)
            .split(|b| *b == self.delims.component)
            .nth(c.saturating_sub(1))
            .unwrap_or(&[])
    }

    pub fn segment_id(&self) -> &'a [u8] {
        &self.payload[self.msh.start..self.msh.start + 3]
    }

    pub fn sending_application(&self) -> &'a [u8] {
        self.field(3)
    }
    pub fn sending_facility(&self) -> &'a [u8] {
        self.field(4)
    }
    pub fn receiving_application(&self) -> &'a [u8] {
        self.field(5)
    }
    pub fn receiving_facility(&self) -> &'a [u8] {
        self.field(6)
    }
    /// MSH-9.1, e.g. `ADT`.
    pub fn message_code(&self) -> &'a [u8] {
        self.component(9, 1)
    }
    /// MSH-9.2, e.g. `A01`.
    pub fn trigger_event(&self) -> &'a [u8] {
        self.component(9, 2)
    }
    /// MSH-9.3, e.g. `ADT_A01`.
    pub fn message_structure(&self) -> &'a [u8] {
        self.component(9, 3)
    }
    /// MSH-10, the message control id (for BHS/FHS: BHS-11/FHS-11, the batch/file control id).
    pub fn control_id(&self) -> &'a [u8] {
        if self.segment_id() == b"MSH" {
            self.field(10)
        } else {
            self.field(11)
        }
    }
    pub fn processing_id(&self) -> &'a [u8] {
        self.field(11)
    }
    /// MSH-12.1, e.g. `2.5.1`.
    pub fn version(&self) -> &'a [u8] {
        self.component(12, 1)
    }
    pub fn accept_ack_type(&self) -> &'a [u8] {
        self.field(15)
    }
    pub fn application_ack_type(&self) -> &'a [u8] {
        self.field(16)
    }
    /// MSH-18 first repetition (the message's character set).
    pub fn charset(&self) -> &'a [u8] {
        self.field(18)
            .split(|b| *b == self.delims.repetition)
            .next()
            .unwrap_or(&[])
    }

    /// Enhanced acknowledgment mode is selected when MSH-15 or MSH-16 is valued.
    pub fn enhanced_mode(&self) -> bool {
        !self.accept_ack_type().is_empty() || !self.application_ack_type().is_empty()
    }

    /// Checks what an ACK needs: a message type and a control id.
    pub fn require_ackable(&self) -> Result<(), HeaderError> {
        if self.segment_id() != b"MSH" {
            return Err(HeaderError::NoMsh);
        }
        if self.message_code().is_empty() {
            return Err(HeaderError::MissingField("MSH-9"));
        }
        if self.control_id().is_empty() {
            return Err(HeaderError::MissingField("MSH-10"));
        }
        Ok(())
    }
}

/// A string for logs and meta: ASCII printable only, bounded, never message content beyond the
/// header code it is called on.
pub fn ascii_lossy(bytes: &[u8], max: usize) -> String {
    bytes
        .iter()
        .take(max)
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '?'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADT: &[u8] = b"MSH|^~\\&|SND|SFAC|RCV|RFAC|20240101120000||ADT^A01^ADT_A01|CTRL42|P|2.5.1|||AL|NE||8859/1\rPID|1||123^^^MRN||DOE^JANE\r";

    #[test]
    fn reads_header_fields() {
        let h = Header::read(ADT).unwrap();
        assert_eq!(h.sending_application(), b"SND");
        assert_eq!(h.receiving_facility(), b"RFAC");
        assert_eq!(h.message_code(), b"ADT");
        assert_eq!(h.trigger_event(), b"A01");
        assert_eq!(h.message_structure(), b"ADT_A01");
        assert_eq!(h.control_id(), b"CTRL42");
        assert_eq!(h.processing_id(), b"P");
        assert_eq!(h.version(), b"2.5.1");
        assert_eq!(h.accept_ack_type(), b"AL");
        assert_eq!(h.application_ack_type(), b"NE");
        assert_eq!(h.charset(), b"8859/1");
        assert!(h.enhanced_mode());
        h.require_ackable().unwrap();
    }

    #[test]
    fn tolerates_bom_lf_custom_and_five_char_delimiters() {
        let m = b"\xEF\xBB\xBF\r\nMSH#$%@*!#A#B#C#D#20240101##ORU$R01#X1#T#2.7\nOBX#1\n";
        let h = Header::read(m).unwrap();
        assert_eq!(h.delims.field, b'#');
        assert_eq!(h.delims.truncation, Some(b'!'));
        assert_eq!(h.message_code(), b"ORU");
        assert_eq!(h.trigger_event(), b"R01");
        assert_eq!(h.control_id(), b"X1");
        assert!(!h.enhanced_mode());
    }

    #[test]
    fn a_stray_vt_or_a_bom_after_a_line_break_is_skipped() {
        for m in [
            &b"\x0bMSH|^~\\&|A|B|C|D|||ADT^A01|V1|P|2.5\rPID|1\r"[..],
            &b"\r\n\xEF\xBB\xBFMSH|^~\\&|A|B|C|D|||ADT^A01|V1|P|2.5\r"[..],
            &b"\x0b\xEF\xBB\xBF\x0bMSH|^~\\&|A|B|C|D|||ADT^A01|V1|P|2.5\r"[..],
        ] {
            let h = Header::read(m).unwrap();
            assert_eq!(h.control_id(), b"V1");
            assert!(m[segments(m).next().unwrap()].starts_with(b"MSH|"));
        }
    }

    #[test]
    fn rejects_what_cannot_be_acknowledged() {
        assert_eq!(Header::read(b"").unwrap_err(), HeaderError::Empty);
        assert_eq!(Header::read(b"PID|1").unwrap_err(), HeaderError::NoMsh);
        assert_eq!(
            Header::read(b"MSHA^~\\&").unwrap_err(),
            HeaderError::BadDelimiters
        );
        assert_eq!(
            Header::read(b"MSH|^~|x").unwrap_err(),
            HeaderError::BadDelimiters
        );
        let h = Header::read(b"MSH|^~\\&|A|B|C|D|||ADT^A01||P|2.5").unwrap();
        assert_eq!(
            h.require_ackable().unwrap_err(),
            HeaderError::MissingField("MSH-10")
        );
        assert_eq!(
            h.require_ackable().unwrap_err().location(),
            Some(("MSH", 10))
        );
    }
}
