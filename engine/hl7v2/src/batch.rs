use crate::message::{line_lead, trim_start, ParseError, ParseErrorKind};
use std::fmt;
use std::ops::Range;

/// A stream or file of messages: optional FHS/BHS envelope, then messages, each starting at MSH.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Batch {
    /// True when the input carried FHS, BHS, BTS or FTS segments.
    pub enveloped: bool,
    /// Byte ranges of the FHS and first BHS segments in the input.
    pub fhs: Option<Range<usize>>,
    pub bhs: Option<Range<usize>>,
    /// Byte ranges of each message in the input: from its MSH to the end of its last segment,
    /// that segment's terminator included (blank lines before the next MSH or batch segment are
    /// not part of the message), so each can be journaled exactly as the sender wrote it.
    pub messages: Vec<Range<usize>>,
    /// The batches in input order; together they hold every message, each in exactly one. A
    /// stream without BHS is one batch without a header.
    pub batches: Vec<BatchPart>,
    /// FTS-1 (batch count) as declared, when present and numeric.
    pub declared_batches: Option<usize>,
}

/// One batch of a [`Batch`]: a BHS (when written) up to its BTS (when written).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct BatchPart {
    pub bhs: Option<Range<usize>>,
    /// BTS-1 (message count) as declared, when present and numeric.
    pub declared_count: Option<usize>,
    /// Indexes into [`Batch::messages`].
    pub messages: Range<usize>,
}

/// A trailer count that disagrees with what the input holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CountMismatch {
    /// BTS-1 of the `batch`-th batch (1-based).
    Messages {
        batch: usize,
        declared: usize,
        received: usize,
    },
    /// FTS-1.
    Batches { declared: usize, received: usize },
}

impl fmt::Display for CountMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CountMismatch::Messages {
                batch,
                declared,
                received,
            } => write!(
                f,
                "batch {batch}: BTS-1 declares {declared} message(s), {received} received"
            ),
            CountMismatch::Batches { declared, received } => write!(
                f,
                "FTS-1 declares {declared} batch(es), {received} received"
            ),
        }
    }
}

impl Batch {
    /// Every BTS-1 and FTS-1 that disagrees with the messages and batches actually present.
    /// A count that is absent (or not a number) is not checked.
    pub fn count_mismatches(&self) -> Vec<CountMismatch> {
        let mut out: Vec<CountMismatch> = self
            .batches
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                let declared = b.declared_count?;
                let received = b.messages.len();
                (declared != received).then_some(CountMismatch::Messages {
                    batch: i + 1,
                    declared,
                    received,
                })
            })
            .collect();
        if let Some(declared) = self.declared_batches {
            if declared != self.batches.len() {
                out.push(CountMismatch::Batches {
                    declared,
                    received: self.batches.len(),
                });
            }
        }
        out
    }

    /// The batch (index into [`Batch::batches`]) holding message `i`.
    pub fn batch_of(&self, i: usize) -> Option<usize> {
        self.batches.iter().position(|b| b.messages.contains(&i))
    }
}

/// The segment name of a line, after any BOM/VT/NUL before it, and where that name starts.
fn name_of(line: &[u8]) -> (&[u8], usize) {
    let lead = line_lead(line);
    (line[lead..].get(..3).unwrap_or_default(), lead)
}

/// Whether the input is a batch: FHS/BHS segments, or more than one MSH. Stops at the second MSH,
/// so it is cheap to ask of every incoming message.
pub fn is_batch(input: &[u8]) -> bool {
    let mut msh = 0;
    for line in trim_start(input).split(|c| *c == b'\r' || *c == b'\n') {
        match name_of(line).0 {
            b"FHS" | b"BHS" => return true,
            b"MSH" => {
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

/// The numeric first field of a BTS or FTS segment.
fn count_field(seg: &[u8]) -> Option<usize> {
    let fs = seg.get(3).copied().unwrap_or(b'|');
    seg.split(|c| *c == fs)
        .nth(1)
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Splits FHS/BHS/BTS/FTS files and multi-MSH streams into messages without decoding them,
/// so each can be parsed (by its own MSH-18) and journaled byte-for-byte.
pub fn split_batch(input: &[u8]) -> Result<Batch, ParseError> {
    let offset = input.len() - trim_start(input).len();
    let mut batch = Batch::default();
    let mut current: Option<usize> = None;
    // the batch messages are being added to: opened by BHS, or by an MSH or BTS outside one
    let mut open: Option<BatchPart> = None;
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
        let (name, lead) = name_of(seg);
        let start = pos + lead;
        match name {
            b"MSH" => {
                if let Some(s) = current.take() {
                    batch.messages.push(s..msg_end);
                }
                current = Some(start);
                msg_end = next;
                let n = batch.messages.len();
                open.get_or_insert_with(|| BatchPart {
                    messages: n..n,
                    ..Default::default()
                });
            }
            b"FHS" | b"BHS" | b"BTS" | b"FTS" => {
                if let Some(s) = current.take() {
                    batch.messages.push(s..msg_end);
                }
                batch.enveloped = true;
                let n = batch.messages.len();
                if let Some(part) = open.as_mut() {
                    part.messages.end = n;
                }
                let range = start..end;
                match name {
                    b"FHS" if batch.fhs.is_none() => batch.fhs = Some(range),
                    b"BHS" => {
                        batch.batches.extend(open.take());
                        if batch.bhs.is_none() {
                            batch.bhs = Some(range.clone());
                        }
                        open = Some(BatchPart {
                            bhs: Some(range),
                            declared_count: None,
                            messages: n..n,
                        });
                    }
                    b"BTS" => {
                        let mut part = open.take().unwrap_or(BatchPart {
                            messages: n..n,
                            ..Default::default()
                        });
                        part.declared_count = count_field(&input[range]);
                        batch.batches.push(part);
                    }
                    b"FTS" => {
                        batch.batches.extend(open.take());
                        batch.declared_batches = count_field(&input[range]);
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
    if let Some(s) = current {
        batch.messages.push(s..msg_end);
    }
    if let Some(mut part) = open {
        part.messages.end = batch.messages.len();
        batch.batches.push(part);
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
        assert_eq!(b.messages.len(), 2);
        assert_eq!(b.batches.len(), 1);
        assert_eq!(b.batches[0].declared_count, Some(2));
        assert_eq!(b.batches[0].messages, 0..2);
        assert_eq!(b.declared_batches, Some(1));
        assert_eq!(b.count_mismatches(), []);
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
            b.batches,
            [BatchPart {
                bhs: None,
                declared_count: None,
                messages: 0..2
            }]
        );
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
        // two batches, each with its own messages; the trailers count as if there were one
        assert_eq!(b.batches.len(), 2);
        assert_eq!(b.batches[0].messages, 0..2);
        assert_eq!(b.batches[1].messages, 2..3);
        assert!(input[b.batches[1].bhs.clone().unwrap()].ends_with(b"|B2"));
        assert_eq!(
            b.count_mismatches(),
            [
                CountMismatch::Messages {
                    batch: 2,
                    declared: 3,
                    received: 1
                },
                CountMismatch::Batches {
                    declared: 1,
                    received: 2
                }
            ]
        );
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

    #[test]
    fn a_bom_or_vt_before_a_later_msh_still_starts_a_message() {
        // files concatenated with their BOMs, a stray VT from a saved MLLP frame
        let input = b"BHS|^~\\&|A|B|C|D|||||B1\rMSH|^~\\&|A|B|C|D|||ADT^A01|M1|P|2.5\rPID|1\r\xEF\xBB\xBFMSH|^~\\&|A|B|C|D|||ADT^A01|M2|P|2.5\rPID|2\r\x0bMSH|^~\\&|A|B|C|D|||ADT^A01|M3|P|2.5\rBTS|3\r";
        let b = split_batch(input).unwrap();
        let ids: Vec<String> = b
            .messages
            .iter()
            .map(|r| {
                Message::parse(&input[r.clone()])
                    .unwrap()
                    .header()
                    .control_id
            })
            .collect();
        assert_eq!(ids, ["M1", "M2", "M3"]);
        assert!(input[b.messages[1].clone()].starts_with(b"MSH|"));
        let bare = b"MSH|^~\\&|A|B|C|D|||ADT^A01|M1|P|2.5\rPID|1\r\xEF\xBB\xBFMSH|^~\\&|A|B|C|D|||ADT^A01|M2|P|2.5\r";
        assert!(is_batch(bare));
        assert_eq!(split_batch(bare).unwrap().messages.len(), 2);
        let first = b"\x0b\xEF\xBB\xBFBHS|^~\\&|A\rMSH|^~\\&|A|B|C|D|||ADT^A01|M1|P|2.5\rBTS|1";
        assert!(is_batch(first));
        assert_eq!(split_batch(first).unwrap().messages.len(), 1);
    }

    #[test]
    fn an_envelope_without_messages_is_an_empty_batch() {
        let input = b"FHS|^~\\&|A|B|C|D|||||F1\rBHS|^~\\&|A|B|C|D|||||B1\rBTS|0\rFTS|1\r";
        let b = split_batch(input).unwrap();
        assert!(b.enveloped && b.messages.is_empty());
        assert_eq!(b.batches.len(), 1);
        assert_eq!(b.batches[0].messages, 0..0);
        assert_eq!(b.count_mismatches(), []);
        // the same envelope claiming messages it does not hold
        let b = split_batch(b"BHS|^~\\&|A\rBTS|2\r").unwrap();
        assert_eq!(
            b.count_mismatches(),
            [CountMismatch::Messages {
                batch: 1,
                declared: 2,
                received: 0
            }]
        );
    }

    #[test]
    fn every_batch_of_a_file_keeps_its_messages_and_counts() {
        let m = |id: &str| format!("MSH|^~\\&|A|B|C|D|||ADT^A01|{id}|P|2.5\rPID|1\r");
        let input = format!(
            "FHS|^~\\&|A|B|C|D|||||F1\rBHS|^~\\&|A|B|C|D|||||B1\r{}{}BTS|2\rBHS|^~\\&|A|B|C|D|||||B2\r{}BTS|1\rFTS|2\r",
            m("M1"),
            m("M2"),
            m("M3")
        );
        let input = input.as_bytes();
        let b = split_batch(input).unwrap();
        assert_eq!(b.messages.len(), 3);
        assert_eq!(b.batches.len(), 2);
        assert_eq!(b.batches[0].messages, 0..2);
        assert_eq!(b.batches[1].messages, 2..3);
        assert!(input[b.batches[0].bhs.clone().unwrap()].ends_with(b"|B1"));
        assert!(input[b.batches[1].bhs.clone().unwrap()].ends_with(b"|B2"));
        assert_eq!(b.batches[1].declared_count, Some(1));
        assert_eq!(b.declared_batches, Some(2));
        assert_eq!(b.count_mismatches(), []);
        assert_eq!(
            (b.batch_of(0), b.batch_of(1), b.batch_of(2), b.batch_of(3)),
            (Some(0), Some(0), Some(1), None)
        );
        // a message lost from the second batch, and a batch lost from the file
        let short = String::from_utf8(input.to_vec())
            .unwrap()
            .replace(&m("M3"), "");
        let b = split_batch(short.as_bytes()).unwrap();
        assert_eq!(
            b.count_mismatches(),
            [CountMismatch::Messages {
                batch: 2,
                declared: 1,
                received: 0
            }]
        );
        let one = format!("FHS|^~\\&\rBHS|^~\\&\r{}BTS|1\rFTS|2\r", m("M1"));
        let e = split_batch(one.as_bytes()).unwrap().count_mismatches();
        assert_eq!(
            e,
            [CountMismatch::Batches {
                declared: 2,
                received: 1
            }]
        );
        assert_eq!(e[0].to_string(), "FTS-1 declares 2 batch(es), 1 received");
    }
}
