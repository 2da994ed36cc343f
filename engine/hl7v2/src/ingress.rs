//! An HL7 v2 message as ingress journals it: its ordering and de-duplication keys and its header
//! meta. One implementation for the MLLP listener and for the pipeline when it splits a replayed
//! batch, so that a message split from a batch is keyed exactly as if it had arrived on its own,
//! and a copy of it that did arrive is found as a duplicate.

use crate::raw::{ascii_lossy, segments, Header};
use crate::{split_batch, Batch, CountMismatch, ParseError};
use tributary_core::{Envelope, EnvelopeBuilder, Protocol};

/// The meta keys [`header_meta`] sets, from the MSH.
pub const HEADER_META: [&str; 7] = [
    "message_type",
    "trigger_event",
    "message_structure",
    "version",
    "control_id",
    "processing_id",
    "charset",
];

/// [`tributary_core::hl7v2_ordering_key`] of a message whose MSH is `h`.
pub fn ordering_key(partner: &str, payload: &[u8], h: &Header<'_>) -> String {
    let d = h.delims;
    let segments = segments(payload).map(|r| &payload[r]);
    tributary_core::hl7v2_ordering_key(partner, segments, d.field, d.component, d.repetition)
}

/// [`tributary_core::hl7v2_dedup_key`] of a message whose MSH is `h`.
pub fn dedup_key(partner: &str, payload: &[u8], h: &Header<'_>) -> String {
    let body = &payload[h.msh.end.min(payload.len())..];
    tributary_core::hl7v2_dedup_key(partner, &ascii_lossy(h.control_id(), 64), body)
}

/// Adds the [`HEADER_META`] that the MSH values (ASCII, bounded: codes and ids, no content).
pub fn header_meta(mut env: EnvelopeBuilder, h: &Header<'_>) -> EnvelopeBuilder {
    let values = [
        h.message_code(),
        h.trigger_event(),
        h.message_structure(),
        h.version(),
        h.control_id(),
        h.processing_id(),
        h.charset(),
    ];
    for (k, v) in HEADER_META.into_iter().zip(values) {
        if !v.is_empty() {
            env = env.meta(k, ascii_lossy(v, 64));
        }
    }
    env
}

/// The envelope of a message accepted from `partner` of `tenant`: its keys and header meta.
pub fn message_envelope(
    payload: bytes::Bytes,
    tenant: &str,
    partner: &str,
    h: &Header<'_>,
) -> EnvelopeBuilder {
    let env = Envelope::builder(Protocol::Hl7v2, payload.clone())
        .tenant(tenant)
        .partner(partner)
        .ordering_key(ordering_key(partner, &payload, h))
        .dedup_key(dedup_key(partner, &payload, h));
    header_meta(env, h)
}

/// Per batch of `batch` (as in [`Batch::batches`]), the meta `batch_control_id` of its messages:
/// its BHS-11, else the file's FHS-11.
pub fn batch_control_ids(payload: &[u8], batch: &Batch) -> Vec<Option<String>> {
    let control_id = |r: Option<std::ops::Range<usize>>| {
        r.and_then(|r| Header::read_segment(payload, r).ok())
            .map(|h| ascii_lossy(h.control_id(), 64))
            .filter(|s| !s.is_empty())
    };
    batch
        .batches
        .iter()
        .map(|p| control_id(p.bhs.clone()).or_else(|| control_id(batch.fhs.clone())))
        .collect()
}

/// Whether a payload is a batch file: its first segment (after BOMs, a stray VT, blank lines)
/// is FHS or BHS. A single message never starts so.
pub fn starts_as_batch(payload: &[u8]) -> bool {
    segments(payload)
        .next()
        .is_some_and(|r| matches!(payload[r].get(..3), Some(b"FHS" | b"BHS")))
}

/// One message of a journaled batch, ready to be journaled on its own.
#[derive(Debug)]
pub enum SplitMessage {
    Accepted(Envelope),
    /// Its header cannot be read (or lacks MSH-9 or MSH-10), as a listener would refuse it.
    Rejected {
        envelope: Envelope,
        reason: String,
    },
}

/// A journaled batch split by [`split_journaled`].
#[derive(Debug)]
pub struct SplitBatch {
    /// In batch order.
    pub messages: Vec<SplitMessage>,
    /// The trailer counts that disagree with what the batch holds (not a reason to refuse here).
    pub mismatches: Vec<CountMismatch>,
}

/// Meta the batch's own envelope carries that its messages do not inherit: the first message's
/// header (each message gets its own), and ingress facts about the whole frame.
fn batch_only(key: &str) -> bool {
    HEADER_META.contains(&key) || key == "truncated"
}

/// Splits a journaled batch (one refused whole at the door and now replayed) into the envelopes
/// its messages get arriving one by one from the same sender: same tenant, partner and arrival
/// time, the keys and meta of [`message_envelope`], the batch's other meta (the listener),
/// `batch_control_id` as the listener sets it, and `split_from` = the batch's message id.
///
/// A message the listener would refuse for its header is returned as rejected, with a
/// de-duplication key of its place in this batch, so splitting the batch again finds it again.
pub fn split_journaled(batch_env: &Envelope) -> Result<SplitBatch, ParseError> {
    let payload = &batch_env.payload;
    let batch = split_batch(payload)?;
    let batch_ids = batch_control_ids(payload, &batch);
    let (tenant, partner) = (batch_env.tenant.as_str(), batch_env.partner.as_str());
    let split_from = batch_env.id.to_string();
    let messages = batch
        .messages
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let msg = payload.slice(r.clone());
            let header = Header::read(&msg);
            let ackable = header.clone().and_then(|h| h.require_ackable().map(|()| h));
            let mut env = match &ackable {
                Ok(h) => message_envelope(msg.clone(), tenant, partner, h),
                Err(_) => {
                    let label = format!("split:{split_from}:{i}");
                    let env = Envelope::builder(Protocol::Hl7v2, msg.clone())
                        .tenant(tenant)
                        .partner(partner)
                        .dedup_key(tributary_core::content_dedup_key(partner, &label, &msg));
                    match &header {
                        Ok(h) => header_meta(env, h),
                        Err(_) => env,
                    }
                }
            };
            for (k, v) in &batch_env.meta {
                if !batch_only(k) {
                    env = env.meta(k.clone(), v.clone());
                }
            }
            if let Some(b) = batch.batch_of(i).and_then(|b| batch_ids[b].clone()) {
                env = env.meta("batch_control_id", b);
            }
            let envelope = env
                .meta("split_from", split_from.clone())
                .received_at(batch_env.received_at)
                .build();
            match ackable {
                Ok(_) => SplitMessage::Accepted(envelope),
                Err(e) => SplitMessage::Rejected {
                    envelope,
                    reason: format!("message {} of batch {split_from}: {e}", i + 1),
                },
            }
        })
        .collect();
    Ok(SplitBatch {
        messages,
        mismatches: batch.count_mismatches(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_no_identifier_in_clear() {
        let m = b"MSH|^~\\&|A|B|C|D|||ADT^A01|C1|P|2.5\rPID|1||MRN123^^^HOSP||DOE^JANE\r";
        let h = Header::read(m).unwrap();
        let k = ordering_key("lab", m, &h);
        assert!(k.starts_with("lab/p:"), "{k}");
        assert!(!k.contains("MRN123"));
        let d = dedup_key("lab", m, &h);
        assert!(d.starts_with("lab/C1/"), "{d}");
        let m2 = b"MSH|^~\\&|A|B|C|D|2025||ADT^A01|C1|P|2.5\rPID|1||MRN123^^^HOSP||DOE^JANE\r";
        let h2 = Header::read(m2).unwrap();
        assert_eq!(
            dedup_key("lab", m2, &h2),
            d,
            "a resend with a new MSH-7 is a duplicate"
        );
        let m3 = b"MSH|^~\\&|A|B|C|D|||ADT^A01|C1|P|2.5\rPID|1||OTHER^^^HOSP\r";
        let h3 = Header::read(m3).unwrap();
        assert_ne!(dedup_key("lab", m3, &h3), d);
        assert_ne!(ordering_key("lab", m3, &h3), k);
        let no_pid = b"MSH|^~\\&|A|B|C|D|||ADT^A01|C1|P|2.5\r";
        assert_eq!(
            ordering_key("lab", no_pid, &Header::read(no_pid).unwrap()),
            "lab"
        );
    }

    #[test]
    fn only_a_payload_opening_with_fhs_or_bhs_is_a_batch_file() {
        assert!(starts_as_batch(b"\xEF\xBB\xBF\x0bFHS|^~\\&|A\rBHS|^~\\&\r"));
        assert!(starts_as_batch(b"\r\nBHS|^~\\&|A\rMSH|^~\\&|A\r"));
        assert!(!starts_as_batch(b"MSH|^~\\&|A\rPID|1\rMSH|^~\\&|B\r"));
        assert!(!starts_as_batch(b"PID|1\rBHS|^~\\&\r"));
        assert!(!starts_as_batch(b""));
    }

    #[test]
    fn a_split_message_is_keyed_as_if_it_had_arrived_alone() {
        let m1 = "MSH|^~\\&|A|B|C|D|||ADT^A01|S1|P|2.5\rPID|1||X1^^^H\r";
        let m2 = "MSH|^~\\&|A|B|C|D|||ADT^A08|S2|P|2.5|||||8859/1\rPID|1||X2^^^H\r";
        let bad = "MSH|^~\\&|A|B|C|D|||ADT^A01||P|2.5\rPID|1||X3\r";
        let file = format!(
            "FHS|^~\\&|A|B|C|D|||||F1\rBHS|^~\\&|A|B|C|D|||||B1\r{m1}{m2}{bad}BTS|4\rFTS|1\r"
        );
        let first = Header::read(m1.as_bytes()).unwrap();
        let batch_env = header_meta(
            Envelope::builder(Protocol::Hl7v2, file.into_bytes())
                .tenant("t1")
                .partner("lab")
                .received_at(1_234)
                .meta("listener", "main")
                .meta("truncated", "false"),
            &first,
        )
        .build();
        let split = split_journaled(&batch_env).unwrap();
        assert_eq!(split.mismatches.len(), 1);
        assert_eq!(split.messages.len(), 3);
        for (m, split) in [m1, m2].into_iter().zip(&split.messages) {
            let SplitMessage::Accepted(env) = split else {
                panic!("accepted: {split:?}");
            };
            let h = Header::read(m.as_bytes()).unwrap();
            let alone = message_envelope(bytes::Bytes::from(m), "t1", "lab", &h).build();
            assert_eq!(&env.payload[..], m.as_bytes());
            assert_eq!((&env.tenant, &env.partner), (&alone.tenant, &alone.partner));
            assert_eq!(env.ordering_key, alone.ordering_key);
            assert_eq!(env.dedup_key, alone.dedup_key);
            assert_eq!(env.received_at, 1_234);
            let mut meta = alone.meta.clone();
            meta.insert("listener".into(), "main".into());
            meta.insert("batch_control_id".into(), "B1".into());
            meta.insert("split_from".into(), batch_env.id.to_string());
            assert_eq!(env.meta, meta);
        }
        let SplitMessage::Rejected { envelope, reason } = &split.messages[2] else {
            panic!("rejected");
        };
        assert_eq!(
            reason,
            &format!(
                "message 3 of batch {}: required field MSH-10 is empty",
                batch_env.id
            )
        );
        assert!(envelope.dedup_key.is_some());
        // splitting again yields the same keys
        let again = split_journaled(&batch_env).unwrap();
        let keys = |s: &SplitBatch| -> Vec<Option<String>> {
            s.messages
                .iter()
                .map(|m| match m {
                    SplitMessage::Accepted(e) | SplitMessage::Rejected { envelope: e, .. } => {
                        e.dedup_key.clone()
                    }
                })
                .collect()
        };
        assert_eq!(keys(&again), keys(&split));
        assert!(split_journaled(
            &Envelope::builder(Protocol::Hl7v2, &b"BHS|^~\\&\rPID|1\rMSH|^~\\&|A\r"[..]).build()
        )
        .is_err());
    }
}
