//! HL7 v2 acknowledgments: original mode (`AA`/`AE`/`AR`), enhanced-mode commit ACKs
//! (`CA`/`CE`/`CR`), `ERR` segments and batch ACKs.
//!
//! The ACK's MSH mirrors the message it answers: sending and receiving application/facility are
//! swapped, the processing id (MSH-11), version (MSH-12) and charset (MSH-18) are copied, and the
//! original delimiters are reused. MSA-2 is the original MSH-10. Header values are copied as raw
//! bytes, so a sender's charset is preserved. Every text we add is our own and PHI-free.

use crate::header::{Delims, Header};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// MSA-1 acknowledgment codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckCode {
    /// Original mode: accepted.
    AA,
    /// Original mode: application error (content), resending as-is will not help.
    AE,
    /// Original mode: rejected (unsupported header values, or the receiver could not take it).
    AR,
    /// Enhanced mode: commit accept (stored durably).
    CA,
    /// Enhanced mode: commit error (could not be stored now; retry).
    CE,
    /// Enhanced mode: commit reject (will never be accepted as sent).
    CR,
}

impl AckCode {
    pub fn as_str(&self) -> &'static str {
        match self {
            AckCode::AA => "AA",
            AckCode::AE => "AE",
            AckCode::AR => "AR",
            AckCode::CA => "CA",
            AckCode::CE => "CE",
            AckCode::CR => "CR",
        }
    }

    pub fn parse(s: &[u8]) -> Option<Self> {
        Some(match s {
            b"AA" => AckCode::AA,
            b"AE" => AckCode::AE,
            b"AR" => AckCode::AR,
            b"CA" => AckCode::CA,
            b"CE" => AckCode::CE,
            b"CR" => AckCode::CR,
            _ => return None,
        })
    }

    pub fn is_positive(&self) -> bool {
        matches!(self, AckCode::AA | AckCode::CA)
    }
}

/// Why a message was not accepted, in a form an ACK and an audit record can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    /// Accepted earlier (same partner and control id): acknowledged again, not stored twice.
    Duplicate,
    /// The message cannot be read or lacks what an ACK needs; its bytes are kept as rejected.
    Unparseable,
    /// Larger than the listener's frame limit.
    Oversized,
    /// The sender is not a configured partner of this listener.
    UnknownPartner,
    /// The partner exceeded its message rate.
    RateLimited,
    /// The journal could not store the message; the sender should retry.
    StorageUnavailable,
    /// `ack_after = "mapped"`: mapping failed.
    ApplicationError,
    /// The listeners' shared inbound buffer (`max_buffered_bytes`) is full; retry later.
    Busy,
    /// A batch with no message in it (HL7's "nothing to send"): acknowledged, nothing stored.
    EmptyBatch,
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Duplicate => "duplicate",
            Outcome::Unparseable => "rejected_unparseable",
            Outcome::Oversized => "rejected_oversized",
            Outcome::UnknownPartner => "refused_unknown_partner",
            Outcome::RateLimited => "rate_limited",
            Outcome::StorageUnavailable => "storage_unavailable",
            Outcome::ApplicationError => "application_error",
            Outcome::Busy => "busy_buffer_limit",
            Outcome::EmptyBatch => "accepted_empty_batch",
        }
    }

    /// The MSA-1 code for this outcome in the given mode.
    pub fn code(&self, enhanced: bool) -> AckCode {
        match (self, enhanced) {
            (Outcome::Accepted | Outcome::Duplicate | Outcome::EmptyBatch, false) => AckCode::AA,
            (Outcome::Accepted | Outcome::Duplicate | Outcome::EmptyBatch, true) => AckCode::CA,
            (Outcome::ApplicationError, false) => AckCode::AE,
            (Outcome::ApplicationError, true) => AckCode::CE,
            (Outcome::RateLimited | Outcome::StorageUnavailable | Outcome::Busy, false) => {
                AckCode::AR
            }
            (Outcome::RateLimited | Outcome::StorageUnavailable | Outcome::Busy, true) => {
                AckCode::CE
            }
            (_, false) => AckCode::AR,
            (_, true) => AckCode::CR,
        }
    }
}

/// The content of an ERR segment. All texts must be PHI-free (they are ours, not the sender's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckError {
    /// HL7 table 0357 code and its text, e.g. `("207", "Application internal error")`.
    pub code: (&'static str, &'static str),
    /// Segment id and field number at fault, e.g. `("MSH", 10)`.
    pub location: Option<(String, u32)>,
    /// A human-readable reason, also put in MSA-3.
    pub message: String,
}

impl AckError {
    pub fn new(code: (&'static str, &'static str), message: impl Into<String>) -> Self {
        Self {
            code,
            location: None,
            message: message.into(),
        }
    }

    pub fn at(mut self, segment: &str, field: u32) -> Self {
        self.location = Some((segment.to_string(), field));
        self
    }
}

/// Whether an ACK is sent at all, per MSH-15 in enhanced mode (AL, NE, ER, SU).
pub fn should_send(header: Option<&Header<'_>>, code: AckCode) -> bool {
    let Some(h) = header else { return true };
    if !h.enhanced_mode() {
        return true;
    }
    match h.accept_ack_type() {
        b"NE" => false,
        b"ER" => !code.is_positive(),
        b"SU" => code.is_positive(),
        _ => true,
    }
}

/// A fresh control id for an ACK we send: unique within this process and across restarts.
pub fn next_control_id() -> String {
    static PREFIX: OnceLock<String> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        format!("T{}", base36(secs))
    });
    format!(
        "{prefix}{}",
        base36(COUNTER.fetch_add(1, Ordering::Relaxed))
    )
}

fn base36(mut n: u64) -> String {
    const D: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut out = Vec::new();
    loop {
        out.push(D[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// `YYYYMMDDHHMMSS+0000`, the current UTC time.
pub fn hl7_now() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}{:02}{:02}{:02}{:02}{:02}+0000",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    )
}

/// Escapes our own text for a field (delimiters become `\F\`, `\S\`, …).
pub fn escape_text(text: &str, d: &Delims) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for &b in text.as_bytes() {
        let esc = if b == d.field {
            Some(b'F')
        } else if b == d.component {
            Some(b'S')
        } else if b == d.repetition {
            Some(b'R')
        } else if b == d.escape {
            Some(b'E')
        } else if b == d.subcomponent {
            Some(b'T')
        } else if b == b'\r' || b == b'\n' {
            out.push(b' ');
            continue;
        } else {
            None
        };
        match esc {
            Some(c) => out.extend_from_slice(&[d.escape, c, d.escape]),
            None => out.push(b),
        }
    }
    out
}

/// (major, minor) of a version like `2.5.1`; unknown → (2, 5).
fn version_tuple(v: &[u8]) -> (u32, u32) {
    let s = std::str::from_utf8(v).unwrap_or("");
    let mut it = s.split('.').map(|p| p.trim().parse::<u32>().ok());
    match (it.next().flatten(), it.next().flatten()) {
        (Some(a), Some(b)) => (a, b),
        _ => (2, 5),
    }
}

/// Builds the ACK for one message. `header` is `None` when the MSH could not be read at all; the
/// ACK then uses default delimiters, version 2.5 and an empty MSA-2.
pub fn build_ack(header: Option<&Header<'_>>, code: AckCode, error: Option<&AckError>) -> Vec<u8> {
    let d = header.map(|h| h.delims).unwrap_or_default();
    let mut out = Vec::with_capacity(256);
    write_msh(&mut out, header, &d, None);
    write_msa_err(&mut out, header, code, error, &d);
    out
}

/// Builds an enhanced-mode application ACK (`AA`/`AE`/`AR`) for the message whose MSH is
/// `header`: a message of its own, with a fresh MSH-10, MSA-2 = the original MSH-10, and
/// MSH-15/MSH-16 set to `accept_ack`/`NE` (so the receiver answers with at most a commit ACK).
pub fn build_application_ack(
    header: &Header<'_>,
    code: AckCode,
    error: Option<&AckError>,
    accept_ack: &[u8],
) -> Vec<u8> {
    let d = header.delims;
    let mut out = Vec::with_capacity(256);
    write_msh(&mut out, Some(header), &d, Some((accept_ack, b"NE")));
    write_msa_err(&mut out, Some(header), code, error, &d);
    out
}

fn write_msh(
    out: &mut Vec<u8>,
    header: Option<&Header<'_>>,
    d: &Delims,
    ack_types: Option<(&[u8], &[u8])>,
) {
    let f = d.field;
    let (recv_app, recv_fac, send_app, send_fac, trigger, proc_id, version, charset) = match header
    {
        Some(h) => (
            h.sending_application(),
            h.sending_facility(),
            h.receiving_application(),
            h.receiving_facility(),
            h.trigger_event(),
            h.processing_id(),
            h.field(12),
            h.field(18),
        ),
        None => (
            &b""[..],
            &b""[..],
            &b""[..],
            &b""[..],
            &b""[..],
            &b""[..],
            &b""[..],
            &b""[..],
        ),
    };
    out.extend_from_slice(b"MSH");
    out.push(f);
    out.extend_from_slice(&d.encoding_chars());
    for v in [
        if send_app.is_empty() {
            &b"TRIBUTARY"[..]
        } else {
            send_app
        },
        send_fac,
        recv_app,
        recv_fac,
    ] {
        out.push(f);
        out.extend_from_slice(v);
    }
    out.push(f);
    out.extend_from_slice(hl7_now().as_bytes());
    out.push(f); // MSH-8 security
    out.push(f);
    out.extend_from_slice(b"ACK");
    let version_t = version_tuple(header.map_or(&b""[..], |h| h.version()));
    if !trigger.is_empty() {
        out.push(d.component);
        out.extend_from_slice(trigger);
        if version_t >= (2, 4) {
            out.push(d.component);
            out.extend_from_slice(b"ACK");
        }
    }
    out.push(f);
    out.extend_from_slice(next_control_id().as_bytes());
    out.push(f);
    out.extend_from_slice(if proc_id.is_empty() { b"P" } else { proc_id });
    out.push(f);
    out.extend_from_slice(if version.is_empty() { b"2.5" } else { version });
    if ack_types.is_some() || !charset.is_empty() {
        // MSH-13 and MSH-14 empty, MSH-15/16 as asked, MSH-17 empty, MSH-18 copied
        let (accept, app) = ack_types.unwrap_or((b"", b""));
        out.extend_from_slice(&[f; 3]);
        out.extend_from_slice(accept);
        out.push(f);
        out.extend_from_slice(app);
        if !charset.is_empty() {
            out.extend_from_slice(&[f; 2]);
            out.extend_from_slice(charset);
        }
    }
    out.push(b'\r');
}

fn write_msa_err(
    out: &mut Vec<u8>,
    header: Option<&Header<'_>>,
    code: AckCode,
    error: Option<&AckError>,
    d: &Delims,
) {
    let f = d.field;
    out.extend_from_slice(b"MSA");
    out.push(f);
    out.extend_from_slice(code.as_str().as_bytes());
    out.push(f);
    if let Some(h) = header {
        out.extend_from_slice(h.control_id());
    }
    if let Some(e) = error {
        out.push(f);
        out.extend_from_slice(&escape_text(&truncate(&e.message, 80), d));
    }
    out.push(b'\r');
    let Some(e) = error else { return };
    let version = version_tuple(header.map_or(&b""[..], |h| h.version()));
    let (seg, field) = e
        .location
        .as_ref()
        .map(|(s, n)| (s.as_str(), n.to_string()))
        .unwrap_or(("", String::new()));
    let c = d.component as char;
    let s = d.subcomponent as char;
    out.extend_from_slice(b"ERR");
    out.push(f);
    if version < (2, 5) {
        // ERR-1 (ELD): segment^sequence^field^code&text&HL70357
        let eld = if seg.is_empty() {
            format!("{c}{c}{c}{}{s}{}{s}HL70357", e.code.0, e.code.1)
        } else {
            format!(
                "{seg}{c}1{c}{field}{c}{}{s}{}{s}HL70357",
                e.code.0, e.code.1
            )
        };
        out.extend_from_slice(eld.as_bytes());
    } else {
        // ERR-2 location, ERR-3 code, ERR-4 severity, ERR-8 user message
        out.push(f);
        if !seg.is_empty() {
            out.extend_from_slice(format!("{seg}{c}1{c}{field}").as_bytes());
        }
        out.push(f);
        out.extend_from_slice(format!("{}{c}{}{c}HL70357", e.code.0, e.code.1).as_bytes());
        out.push(f);
        out.push(b'E');
        out.extend_from_slice(&[f; 4]);
        out.extend_from_slice(&escape_text(&e.message, d));
    }
    out.push(b'\r');
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Builds a batch ACK: `[FHS] {BHS <one ACK per message> BTS} [FTS]`, one BHS…BTS per batch of
/// the original, each mirroring its BHS and referencing its control id (BHS-12, FHS-12). `acks`
/// follow `batch.messages`; any beyond them (a NAK for a batch without messages) go into the last
/// batch. A batch ACK without negative ACKs tells the sender every message was accepted, so a
/// batch without messages gets `BTS|0` and nothing else. `note` (PHI-free) goes into BTS-2 and
/// FTS-2, the trailers' comment fields.
pub fn build_batch_ack(
    payload: &[u8],
    batch: &crate::header::Batch,
    acks: &[Vec<u8>],
    note: Option<&str>,
) -> Vec<u8> {
    batch_ack(payload, batch, acks, note)
}

/// The batch ACK for a batch refused whole: every message gets `AR` (`CR` in enhanced mode) with
/// `error`, each BTS-2 carries its text, and a batch without messages gets one general NAK —
/// an ACK of no NAKs would read as "all accepted".
pub fn build_batch_reject(
    payload: &[u8],
    batch: &crate::header::Batch,
    error: &AckError,
) -> Vec<u8> {
    let mut acks: Vec<Vec<u8>> = batch
        .messages
        .iter()
        .map(|r| {
            let h = Header::read(&payload[r.clone()]).ok();
            let code = if h.as_ref().is_some_and(|h| h.enhanced_mode()) {
                AckCode::CR
            } else {
                AckCode::AR
            };
            build_ack(h.as_ref(), code, Some(error))
        })
        .collect();
    if acks.is_empty() {
        acks.push(build_ack(None, AckCode::AR, Some(error)));
    }
    batch_ack(payload, batch, &acks, Some(&error.message))
}

fn batch_ack(
    payload: &[u8],
    batch: &crate::header::Batch,
    acks: &[Vec<u8>],
    comment: Option<&str>,
) -> Vec<u8> {
    let fhs = batch
        .fhs
        .clone()
        .and_then(|r| Header::read_segment(payload, r).ok());
    let bhs_of = |part: &crate::header::BatchPart| {
        part.bhs
            .clone()
            .and_then(|r| Header::read_segment(payload, r).ok())
    };
    let d = batch
        .batches
        .iter()
        .find_map(bhs_of)
        .or_else(|| fhs.clone())
        .map(|h| h.delims)
        .unwrap_or_else(|| {
            batch
                .messages
                .first()
                .and_then(|r| Header::read(&payload[r.clone()]).ok())
                .map(|h| h.delims)
                .unwrap_or_default()
        });
    let mut out = Vec::new();
    let header_seg = |out: &mut Vec<u8>, id: &[u8], h: Option<&Header<'_>>| {
        let f = d.field;
        out.extend_from_slice(id);
        out.push(f);
        out.extend_from_slice(&d.encoding_chars());
        let (a, b, c, e) = h.map_or((&b""[..], &b""[..], &b""[..], &b""[..]), |h| {
            (h.field(5), h.field(6), h.field(3), h.field(4))
        });
        for v in [if a.is_empty() { &b"TRIBUTARY"[..] } else { a }, b, c, e] {
            out.push(f);
            out.extend_from_slice(v);
        }
        out.push(f);
        out.extend_from_slice(hl7_now().as_bytes());
        out.extend_from_slice(&[f; 4]);
        out.extend_from_slice(next_control_id().as_bytes());
        out.push(f);
        if let Some(h) = h {
            out.extend_from_slice(h.control_id());
        }
        out.push(b'\r');
    };
    if batch.fhs.is_some() {
        header_seg(&mut out, b"FHS", fhs.as_ref());
    }
    // the ACK needs a batch to hold its ACKs even when the original had no BHS, BTS or MSH
    let whole = crate::header::BatchPart {
        messages: 0..batch.messages.len(),
        ..Default::default()
    };
    let parts = if batch.batches.is_empty() {
        std::slice::from_ref(&whole)
    } else {
        &batch.batches[..]
    };
    for (n, part) in parts.iter().enumerate() {
        header_seg(&mut out, b"BHS", bhs_of(part).as_ref());
        let mut range = part.messages.start.min(acks.len())..part.messages.end.min(acks.len());
        if n + 1 == parts.len() {
            range.end = acks.len();
        }
        for a in &acks[range.clone()] {
            out.extend_from_slice(a);
        }
        trailer(&mut out, b"BTS", range.len(), comment, &d);
    }
    if batch.fhs.is_some() {
        trailer(&mut out, b"FTS", parts.len(), comment, &d);
    }
    out
}

/// A batch or file trailer: `BTS|count[|comment]` or `FTS|count[|comment]`.
fn trailer(out: &mut Vec<u8>, name: &[u8], count: usize, comment: Option<&str>, d: &Delims) {
    out.extend_from_slice(name);
    out.push(d.field);
    out.extend_from_slice(count.to_string().as_bytes());
    if let Some(c) = comment {
        out.push(d.field);
        out.extend_from_slice(&escape_text(c, d));
    }
    out.push(b'\r');
}

/// MSA-1 and MSA-2 of an ACK (for clients and tests).
pub fn read_msa(ack: &[u8]) -> Option<(AckCode, Vec<u8>)> {
    read_all_msa(ack).into_iter().next()
}

/// Every MSA in a (batch) ACK, in order.
pub fn read_all_msa(ack: &[u8]) -> Vec<(AckCode, Vec<u8>)> {
    let field = crate::header::segments(ack)
        .find_map(|r| {
            let s = &ack[r];
            (s.len() > 3 && matches!(&s[..3], b"MSH" | b"BHS" | b"FHS")).then(|| s[3])
        })
        .unwrap_or(b'|');
    crate::header::segments(ack)
        .filter_map(|r| {
            let s = &ack[r];
            if !s.starts_with(b"MSA") {
                return None;
            }
            let mut parts = s.split(|b| *b == field).skip(1);
            let code = AckCode::parse(parts.next()?)?;
            Some((code, parts.next().unwrap_or(&[]).to_vec()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(b: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(b)
            .split('\r')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn original_mode_ack_mirrors_the_header() {
        let m = b"MSH|^~\\&|LAB|HOSP|TRIB|HIE|20240101||ORU^R01^ORU_R01|C123|T|2.5.1\rPID|1\r";
        let h = Header::read(m).unwrap();
        let ack = build_ack(Some(&h), AckCode::AA, None);
        let s = segs(&ack);
        let msh: Vec<&str> = s[0].split('|').collect();
        assert_eq!(&msh[..6], &["MSH", "^~\\&", "TRIB", "HIE", "LAB", "HOSP"]);
        assert_eq!(msh[8], "ACK^R01^ACK");
        assert_eq!(msh[10], "T");
        assert_eq!(msh[11], "2.5.1");
        assert_ne!(msh[9], "C123");
        assert_eq!(s[1], "MSA|AA|C123");
        assert_eq!(read_msa(&ack), Some((AckCode::AA, b"C123".to_vec())));
    }

    #[test]
    fn error_ack_has_err_segment_by_version() {
        let m = b"MSH|^~\\&|A|B|C|D|||ADT^A01|X9|P|2.3\r";
        let h = Header::read(m).unwrap();
        let e = AckError::new(("101", "Required field missing"), "MSH-9 is empty").at("MSH", 9);
        let s = segs(&build_ack(Some(&h), AckCode::AR, Some(&e)));
        assert_eq!(s[1], "MSA|AR|X9|MSH-9 is empty");
        assert_eq!(s[2], "ERR|MSH^1^9^101&Required field missing&HL70357");
        let m = b"MSH|^~\\&|A|B|C|D|||ADT^A01|X9|P|2.6|||AL|AL\r";
        let h = Header::read(m).unwrap();
        let s = segs(&build_ack(Some(&h), AckCode::CR, Some(&e)));
        assert_eq!(s[1], "MSA|CR|X9|MSH-9 is empty");
        assert_eq!(
            s[2],
            "ERR||MSH^1^9|101^Required field missing^HL70357|E||||MSH-9 is empty"
        );
    }

    #[test]
    fn ack_without_header_is_still_valid_hl7() {
        let e = AckError::new(("100", "Segment sequence error"), "no MSH | here");
        let ack = build_ack(None, AckCode::AR, Some(&e));
        let h = Header::read(&ack).unwrap();
        assert_eq!(h.message_code(), b"ACK");
        let s = segs(&ack);
        assert_eq!(s[1], "MSA|AR||no MSH \\F\\ here");
    }

    #[test]
    fn enhanced_mode_follows_msh15() {
        let ne = b"MSH|^~\\&|A|B|C|D|||ADT^A01|X|P|2.5|||NE|NE\r";
        let er = b"MSH|^~\\&|A|B|C|D|||ADT^A01|X|P|2.5|||ER|NE\r";
        let h = Header::read(ne).unwrap();
        assert!(!should_send(Some(&h), AckCode::CA));
        let h = Header::read(er).unwrap();
        assert!(!should_send(Some(&h), AckCode::CA));
        assert!(should_send(Some(&h), AckCode::CE));
        assert_eq!(Outcome::Accepted.code(true), AckCode::CA);
        assert_eq!(Outcome::Unparseable.code(true), AckCode::CR);
        assert_eq!(Outcome::RateLimited.code(false), AckCode::AR);
    }

    #[test]
    fn application_ack_is_a_message_of_its_own() {
        let m = b"MSH|^~\\&|LAB|HOSP|TRIB|HIE|20240101||ADT^A01|C77|P|2.5.1|||AL|AL||UNICODE UTF-8\rPID|1\r";
        let h = Header::read(m).unwrap();
        let e = AckError::new(("207", "Application internal error"), "mapping failed").at("PID", 7);
        let a = build_application_ack(&h, AckCode::AE, Some(&e), b"NE");
        let s = segs(&a);
        let msh: Vec<&str> = s[0].split('|').collect();
        assert_eq!(&msh[2..6], &["TRIB", "HIE", "LAB", "HOSP"]);
        assert_ne!(msh[9], "C77", "fresh control id");
        assert_eq!(&msh[14..], &["NE", "NE", "", "UNICODE UTF-8"]);
        assert_eq!(s[1], "MSA|AE|C77|mapping failed");
        assert!(s[2].starts_with("ERR||PID^1^7|207^"), "{}", s[2]);
        let b = build_application_ack(&h, AckCode::AA, None, b"AL");
        let sb = segs(&b);
        let msh2: Vec<&str> = sb[0].split('|').collect();
        assert_eq!(msh2[14], "AL");
        assert_ne!(msh2[9], msh[9]);
        // the commit ACK keeps MSH-18 in place
        let c = build_ack(Some(&h), AckCode::CA, None);
        let msh3: Vec<String> = segs(&c)[0].split('|').map(str::to_string).collect();
        assert_eq!(msh3[17], "UNICODE UTF-8");
        assert_eq!(msh3[14], "");
    }

    #[test]
    fn control_ids_are_unique_and_short() {
        let a = next_control_id();
        let b = next_control_id();
        assert_ne!(a, b);
        assert!(a.len() <= 20, "{a}");
    }
}
