use crate::message::{trim_start, ParseError, ParseErrorKind};
use std::ops::Range;

/// A stream or file of messages: optional FHS/BHS envelope, then messages, each starting at MSH.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Batch {
    /// True when the input carried FHS or BHS segments.
    pub enveloped: bool,
    /// Byte ranges of the FHS and (first) BHS segments in the input, for building a batch ACK.
    pub fhs: Option<Range<usize>>,
    pub bhs: Option<Range<usize>>,
    /// BTS-1 (message count) as declared, when present and numeric.
    pub declared_count: Option<usize>,
    /// Byte ranges of each message in the input: from its MSH to the end of its last segment,
    /// that segment's terminator included (blank lines before the next MSH or batch segment are
    /// not part of the message), so each can be journaled exactly as the sender wrote it.
    pub messages: Vec<Range<usize>>,
}

/// Whether the input is a batch: FHS/BHS segments, or more than one MSH. Stops at the second MSH,
/// so it is cheap to ask of every incoming message.
pub fn is_batch(input: &[u8]) -> bool {
    let mut msh = 0;
    for line in trim_start(input).split(|c| *c == b'\r' || *c == b'\n') {
        match line.get(..3) {
            Some(b"FHS" | b"BHS") => return true,
            Some(b"MSH") => {
                msh += 1;
                if msh > 1 {
                    return true;
                }
            }
            _ => {}
        }
    }
    false
}

/// Splits FHS/BHS/BTS/FTS files and multi-MSH streams into messages without decoding them,
/// so each can be parsed (by its own MSH-18) and journaled byte-for-byte.
pub fn split_batch(input: &[u8]) -> Result<Batch, ParseError> {
    let offset = input.len() - trim_start(input).len();
    let mut batch = Batch::default();
    let mut current: Option<usize> = None;
    // end of the current message's last non-empty segment, terminator included
    let mut msg_end = offset;
    let mut pos = offset;
    let mut line = 0usize;
    while pos < input.len() {
        let end = input[pos..]
            .iter()
            .position(|c| *c == b'\r' || *c == b'\n')
            .map_or(input.len(), |i| pos + i);
        let next = if end < input.len() && input[end] == b'\r' && input.get(end + 1) == Some(&b'\n')
        {
            end + 2
        } else {
            end + 1
        };
        let next = next.min(input.len());
        let seg = &input[pos..end];
        if !seg.is_empty() {
            line += 1;
        }
        let name = seg.get(..3).unwrap_or_default();
        match name {
            b"MSH" => {
                if let Some(start) = current.take() {
                    batch.messages.push(start..msg_end);
                }
                current = Some(pos);
                msg_end = next;
            }
            b"FHS" | b"BHS" | b"BTS" | b"FTS" => {
                if let Some(start) = current.take() {
                    batch.messages.push(start..msg_end);
                }
                batch.enveloped = true;
                let range = pos..end;
                match name {
                    b"FHS" => batch.fhs = Some(range),
                    b"BHS" if batch.bhs.is_none() => batch.bhs = Some(range),
                    b"BTS" => {
                        let fs = seg.get(3).copied().unwrap_or(b'|');
                        batch.declared_count = seg
                            .split(|c| *c == fs)
                            .nth(1)
                            .and_then(|v| std::str::from_utf8(v).ok())
                            .and_then(|v| v.trim().parse().ok());
                    }
                    _ => {}
                }
            }
            _ if current.is_none()
                && !seg
                    .iter()
                    .all(|c| c.is_ascii_whitespace() || c.is_ascii_control()) =>
            {
                let found = String::from_utf8_lossy(name).into_owned();
                return Err(ParseError {
                    kind: ParseErrorKind::MissingMsh { found },
                    line: line.max(1),
                    column: 1,
                });
            }
            _ if current.is_some() && !seg.is_empty() => msg_end = next,
            _ => {}
        }
        pos = next;
    }
    if let Some(start) = current {
        batch.messages.push(start..msg_end);
    }
    if batch.messages.is_empty() && !batch.enveloped {
        return Err(ParseError {
            kind: ParseErrorKind::Empty,
            line: 1,
            column: 1,
        });
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Message;

    #[test]
    fn splits_enveloped_batch() {
        let input = b"FHS|^~\\&|A\rBHS|^~\\&|A|||||||B1\rMSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5\rPID|1\rMSH|^~\\&|A|B|C|D|1||ADT^A08|2|P|2.5\rPID|2\rBTS|2\rFTS|1\r";
        let b = split_batch(input).unwrap();
        assert!(b.enveloped);
        assert_eq!(b.declared_count, Some(2));
        assert_eq!(b.messages.len(), 2);
        let second = Message::parse(&input[b.messages[1].clone()]).unwrap();
        assert_eq!(second.header().control_id, "2");
        assert_eq!(second.segment_count(), 2);
        assert_eq!(&input[b.bhs.clone().unwrap()], b"BHS|^~\\&|A|||||||B1");
    }

    #[test]
    fn splits_bare_stream_and_keeps_bytes() {
        let input = b"MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5\nPID|1\nMSH|^~\\&|A|B|C|D|1||ADT^A01|2|P|2.5\nPID|2\n";
        let b = split_batch(input).unwrap();
        assert!(!b.enveloped);
        assert_eq!(b.messages.len(), 2);
        assert_eq!(
            &input[b.messages[0].clone()],
            b"MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5\nPID|1\n"
        );
    }

    #[test]
    fn message_ranges_end_at_their_last_segment_terminator() {
        let input = b"\xEF\xBB\xBFFHS|^~\\&|A|B|C|D|||||F1\rBHS|^~\\&|A|B|C|D|||||B1\rMSH|^~\\&|A|B|C|D|||ADT^A01|M1|P|2.5\rPID|1\r\r\nMSH|^~\\&|A|B|C|D|||ADT^A08|M2|P|2.5\r\nEVN|x\r\n\nBHS|^~\\&|A|B|C|D|||||B2\rMSH|^~\\&|A|B|C|D|||ADT^A08|M3|P|2.5\rBTS|3\rFTS|1";
        assert!(is_batch(input));
        let b = split_batch(input).unwrap();
        let msgs: Vec<&[u8]> = b.messages.iter().map(|r| &input[r.clone()]).collect();
        assert_eq!(
            msgs,
            [
                &b"MSH|^~\\&|A|B|C|D|||ADT^A01|M1|P|2.5\rPID|1\r"[..],
                &b"MSH|^~\\&|A|B|C|D|||ADT^A08|M2|P|2.5\r\nEVN|x\r\n"[..],
                &b"MSH|^~\\&|A|B|C|D|||ADT^A08|M3|P|2.5\r"[..],
            ]
        );
        assert!(
            input[b.bhs.clone().unwrap()].ends_with(b"|B1"),
            "the first BHS"
        );
        assert_eq!(b.declared_count, Some(3));
        let last = b"MSH|^~\\&|A|B|C|D|||ADT^A01|M1|P|2.5\rPID|1\rMSH|^~\\&|A|B|C|D|||ADT^A01|M2|P|2.5\rPID|2";
        let b = split_batch(last).unwrap();
        assert_eq!(
            &last[b.messages[1].clone()],
            b"MSH|^~\\&|A|B|C|D|||ADT^A01|M2|P|2.5\rPID|2"
        );
        assert!(!is_batch(b"MSH|^~\\&|A|B|C|D|||ADT^A01|M1|P|2.5\rPID|1\r"));
        assert!(!is_batch(b""));
    }

    #[test]
    fn garbage_before_first_message_is_an_error() {
        let err = split_batch(b"hello\rMSH|^~\\&|A").unwrap_err();
        assert!(matches!(err.kind, ParseErrorKind::MissingMsh { .. }));
        assert_eq!(split_batch(b"").unwrap_err().kind, ParseErrorKind::Empty);
    }
}
