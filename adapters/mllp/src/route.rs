//! Routing HL7 v2 → v2: a registered [`Sink`] that forwards journaled messages to a downstream
//! MLLP listener, byte for byte.
//!
//! Each route keeps its own journal cursor (`mllp.route.<name>`) and walks the journal in order:
//! a message is sent, the route waits for a positive ACK (`AA`/`CA`), then advances. Connection
//! failures, timeouts and "retry" NAKs are retried with exponential backoff for as long as it
//! takes — nothing is skipped while the downstream is away. A downstream `AE`/`AR`/`CR` is final:
//! it is recorded on the message (journal note `route.<name>`, with the downstream's MSA-3),
//! audited and logged (codes only), and the route moves on; `tributary replay` sends it again.
//!
//! Delivery is at-least-once: the "sent" note is written after each ACK, the cursor after each
//! batch of entries; a crash between an ACK and its note resends that one message. Receivers
//! de-duplicate by MSH-10. A message already noted as sent on this route (walked again after a
//! crash, or queued again by a replay) is not sent twice.

use crate::ack::AckCode;
use crate::config::MllpRouteConfig;
use crate::header::{ascii_lossy, segments, Header};
use crate::sink::{MllpSender, MllpSenderConfig, SendError};
use async_trait::async_trait;
use std::time::Duration;
use tributary_core::Protocol;
use tributary_runtime::{ComponentStatus, Runtime, Sink};
use tributary_storage::{JournalEntry, JournalRecord};

/// What became of one journal entry on a route.
#[derive(Debug, PartialEq, Eq)]
enum Forwarded {
    Sent,
    /// Refused by the downstream (recorded).
    Refused,
    /// Not for this route, pruned, superseded by a later queue entry, or sent before.
    Skipped,
    /// Shutdown came first; the cursor stays before this entry.
    Stopped,
}

/// A registered outbound MLLP route (`[[mllp.routes]]`).
pub struct MllpRoute {
    cfg: MllpRouteConfig,
}

impl MllpRoute {
    pub fn new(cfg: MllpRouteConfig) -> Self {
        Self { cfg }
    }

    /// The journal consumer name of this route.
    pub fn consumer(&self) -> String {
        format!("mllp.route.{}", self.cfg.name)
    }

    fn note(&self) -> String {
        format!("route.{}", self.cfg.name)
    }

    /// Does the route take this message (protocol, partner, message type)?
    pub fn wants(&self, rec: &JournalRecord) -> bool {
        let env = &rec.envelope;
        if env.protocol != Protocol::Hl7v2 {
            return false;
        }
        if !self.cfg.partners.is_empty()
            && !self.cfg.partners.iter().any(|p| p == env.partner.as_str())
        {
            return false;
        }
        if self.cfg.message_types.is_empty() {
            return true;
        }
        let code = env.meta.get("message_type").map_or("", String::as_str);
        let trigger = env.meta.get("trigger_event").map_or("", String::as_str);
        self.cfg
            .message_types
            .iter()
            .any(|t| match t.split_once('^') {
                Some((c, e)) => c == code && e == trigger,
                None => t == code,
            })
    }

    fn sender_config(&self) -> anyhow::Result<MllpSenderConfig> {
        let c = &self.cfg;
        let mut s = MllpSenderConfig::new(c.destination.clone());
        s.connect_timeout = Duration::from_secs(c.connect_timeout_secs);
        s.ack_timeout = Duration::from_secs(c.ack_timeout_secs);
        s.max_attempts = 1; // the route retries itself, without limit
        s.max_frame_bytes = c.max_frame_bytes;
        if let Some(t) = &c.tls {
            s.tls = Some(
                t.load(&c.destination)
                    .map_err(|e| anyhow::anyhow!("mllp route {}: {e}", c.name))?,
            );
        }
        Ok(s)
    }

    async fn forward(
        &self,
        rt: &Runtime,
        sender: &mut MllpSender,
        entry: JournalEntry,
    ) -> anyhow::Result<Forwarded> {
        let Some(rec) = rt.journal.get(entry.id)? else {
            return Ok(Forwarded::Skipped); // pruned
        };
        if !self.wants(&rec) {
            return Ok(Forwarded::Skipped);
        }
        let note = self.note();
        if rt
            .journal
            .notes(entry.id)?
            .get(&note)
            .is_some_and(|n| n.starts_with("sent"))
        {
            return Ok(Forwarded::Skipped);
        }
        let name = self.cfg.name.as_str();
        let id = entry.id;
        let mt = format!(
            "{}^{}",
            rec.envelope
                .meta
                .get("message_type")
                .map_or("", String::as_str),
            rec.envelope
                .meta
                .get("trigger_event")
                .map_or("", String::as_str)
        );
        let initial = Duration::from_millis(self.cfg.backoff_initial_ms);
        let max = Duration::from_secs(self.cfg.backoff_max_secs);
        let mut delay = initial;
        let mut failures = 0u32;
        loop {
            let result = tokio::select! {
                _ = rt.shutdown.cancelled() => return Ok(Forwarded::Stopped),
                r = sender.send(&rec.envelope.payload) => r,
            };
            match result {
                Ok(a) => {
                    let text = format!(
                        "sent to {}; it answered {} ({})",
                        self.cfg.destination,
                        a.code.as_str(),
                        tributary_core::format_rfc3339_millis(tributary_core::now_millis())
                    );
                    if let Err(e) = rt.journal.set_note(id, &note, text).await {
                        // delivered all the same; without the note a replay would send it again
                        tracing::warn!(route = name, message_id = %id, error = %e, "could not record the delivery on the message");
                    }
                    tracing::debug!(route = name, message_id = %id, message_type = %mt, code = a.code.as_str(), "forwarded");
                    if failures > 0 {
                        tracing::info!(route = name, destination = %self.cfg.destination, after_failures = failures, "downstream reachable again");
                        rt.readiness.set(&self.consumer(), ComponentStatus::Ready);
                    }
                    return Ok(Forwarded::Sent);
                }
                Err(SendError::Negative { code, ack }) => {
                    self.refused(rt, &rec, code, &ack, &mt).await?;
                    return Ok(Forwarded::Refused);
                }
                Err(e) => {
                    failures += 1;
                    // Messages wait in the journal meanwhile; `/ready` tells the operator.
                    if failures == FAILURES_BEFORE_NOT_READY {
                        rt.readiness.set(
                            &self.consumer(),
                            ComponentStatus::Degraded {
                                reason: format!(
                                    "route {name}: downstream {} not answering; messages wait in the journal",
                                    self.cfg.destination
                                ),
                            },
                        );
                    }
                    // the first failure and then every 10th: an outage must not flood the log
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::warn!(route = name, destination = %self.cfg.destination, message_id = %id, failures, retry_in_ms = delay.as_millis() as u64, error = %e, "forwarding failed; retrying");
                    }
                    tokio::select! {
                        _ = rt.shutdown.cancelled() => return Ok(Forwarded::Stopped),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(max);
                }
            }
        }
    }

    /// Records a downstream refusal: note (with the downstream's MSA-3), audit and log (codes).
    async fn refused(
        &self,
        rt: &Runtime,
        rec: &JournalRecord,
        code: AckCode,
        ack: &[u8],
        mt: &str,
    ) -> anyhow::Result<()> {
        let (msa3, err3) = ack_texts(ack);
        let mut text = format!(
            "failed: {} answered {}",
            self.cfg.destination,
            code.as_str()
        );
        if !err3.is_empty() {
            text.push_str(&format!(" (error code {err3})"));
        }
        if !msa3.is_empty() {
            text.push_str(&format!(": {msa3}"));
        }
        let at = tributary_core::format_rfc3339_millis(tributary_core::now_millis());
        if let Err(e) = rt
            .journal
            .set_note(rec.envelope.id, &self.note(), format!("{text} ({at})"))
            .await
        {
            tracing::error!(route = %self.cfg.name, message_id = %rec.envelope.id, error = %e, "could not record the refusal on the message (the audit record has it)");
        }
        tracing::warn!(route = %self.cfg.name, destination = %self.cfg.destination, message_id = %rec.envelope.id, message_type = %mt, code = code.as_str(), error_code = %err3, "downstream refused the message; recorded on the message, route continues");
        let body = serde_json::json!({
            "kind": "egress",
            "protocol": "hl7v2-mllp",
            "at": at,
            "route": self.cfg.name,
            "destination": self.cfg.destination,
            "tenant": rec.envelope.tenant.as_str(),
            "partner": rec.envelope.partner.as_str(),
            "outcome": "refused_downstream",
            "ack_code": code.as_str(),
            "error_code": err3,
            "message_id": rec.envelope.id.to_string(),
            "message_type": mt,
        });
        if let Err(e) = rt.audit.append(vec![body]).await {
            tracing::error!(route = %self.cfg.name, error = %e, "audit write failed");
        }
        Ok(())
    }
}

/// The reason (ERR-8, else MSA-3; bounded) and the HL7 error code (ERR-3.1, else ERR-1.4.1) of
/// a NAK.
fn ack_texts(ack: &[u8]) -> (String, String) {
    let d = Header::read(ack).map(|h| h.delims).unwrap_or_default();
    let (mut msa3, mut code) = (String::new(), String::new());
    for r in segments(ack) {
        let s = &ack[r];
        let fields: Vec<&[u8]> = s.split(|b| *b == d.field).collect();
        match fields.first().copied() {
            Some(b"MSA") => {
                msa3 = ascii_lossy(fields.get(3).copied().unwrap_or(b""), 200);
            }
            Some(b"ERR") if code.is_empty() => {
                // ERR-8 (user message, v2.5+) is fuller than MSA-3, which senders often cut
                let f8 = fields.get(8).copied().unwrap_or(b"");
                if !f8.is_empty() {
                    msa3 = ascii_lossy(f8, 200);
                }
                let f3 = fields.get(3).copied().unwrap_or(b"");
                let c = f3.split(|b| *b == d.component).next().unwrap_or(b"");
                code = if c.is_empty() {
                    // v2.3/2.4: ERR-1 = seg^seq^field^code&text
                    let f1 = fields.get(1).copied().unwrap_or(b"");
                    let c4 = f1.split(|b| *b == d.component).nth(3).unwrap_or(b"");
                    ascii_lossy(c4.split(|b| *b == d.subcomponent).next().unwrap_or(b""), 8)
                } else {
                    ascii_lossy(c, 8)
                };
            }
            _ => {}
        }
    }
    (msa3, code)
}

/// Consecutive failed attempts to reach the downstream before the route reports not ready
/// (one refused connection during a downstream restart should not flap `/ready`).
const FAILURES_BEFORE_NOT_READY: u32 = 3;

#[async_trait]
impl Sink for MllpRoute {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    async fn run(self: Box<Self>, rt: Runtime) -> anyhow::Result<()> {
        let component = self.consumer();
        let mut sender = MllpSender::new(self.sender_config()?);
        rt.readiness.set(&component, ComponentStatus::Ready);
        tracing::info!(route = %self.cfg.name, destination = %self.cfg.destination, tls = self.cfg.tls.is_some(), "mllp route started");
        let consumer = self.consumer();
        let mut head = rt.journal.subscribe();
        loop {
            let cursor = rt.journal.cursor(&consumer)?;
            let entries = rt.journal.entries_after(cursor, 256)?;
            if entries.is_empty() {
                tokio::select! {
                    _ = rt.shutdown.cancelled() => return Ok(()),
                    _ = head.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            // The cursor is written once per batch of entries (and on shutdown): after a crash the
            // route walks those entries again and skips the ones noted as sent.
            let mut done = cursor;
            let mut stopped = false;
            for e in entries {
                match self.forward(&rt, &mut sender, e).await {
                    Ok(Forwarded::Stopped) => {
                        stopped = true;
                        break;
                    }
                    Ok(Forwarded::Sent | Forwarded::Refused | Forwarded::Skipped) => done = e.seq,
                    Err(err) => {
                        // a storage error: keep the position, try this entry again shortly
                        tracing::warn!(route = %self.cfg.name, message_id = %e.id, error = %err, "journal read failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        break;
                    }
                }
            }
            if done > cursor {
                rt.journal.set_cursor(&consumer, done).await?;
            }
            if stopped {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(partner: &str, code: &str, trigger: &str) -> JournalRecord {
        let env = tributary_core::Envelope::builder(Protocol::Hl7v2, &b"MSH|"[..])
            .partner(partner)
            .meta("message_type", code.to_string())
            .meta("trigger_event", trigger.to_string())
            .build();
        JournalRecord {
            envelope: env,
            state: tributary_storage::StateRecord {
                state: tributary_core::MessageState::Received,
                seq: Some(1),
                updated_at: 0,
                attempts: 1,
                mapping_version: None,
                history: Vec::new(),
            },
        }
    }

    #[test]
    fn filters_by_message_type_event_and_partner() {
        let route = |types: &[&str], partners: &[&str]| {
            MllpRoute::new(MllpRouteConfig {
                name: "r".into(),
                destination: "127.0.0.1:1".into(),
                message_types: types.iter().map(|s| s.to_string()).collect(),
                partners: partners.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })
        };
        let adt = record("lab", "ADT", "A01");
        let oru = record("lab", "ORU", "R01");
        let other = record("clinic", "ADT", "A08");
        let all = route(&[], &[]);
        assert!(all.wants(&adt) && all.wants(&oru) && all.wants(&other));
        let adt_only = route(&["ADT"], &[]);
        assert!(adt_only.wants(&adt) && adt_only.wants(&other) && !adt_only.wants(&oru));
        let a01 = route(&["ADT^A01", "ORU"], &["lab"]);
        assert!(a01.wants(&adt) && a01.wants(&oru) && !a01.wants(&other));
        assert_eq!(a01.consumer(), "mllp.route.r");
    }

    #[test]
    fn nak_texts_are_read_for_both_err_layouts() {
        let v25 = b"MSH|^~\\&|B|B|A|A|20260101||ACK|X1|P|2.5.1\rMSA|AE|C1|mapping failed\rERR||PID^1^7|207^Application internal error^HL70357|E||||mapping failed at PID-7\r";
        assert_eq!(
            ack_texts(v25),
            ("mapping failed at PID-7".to_string(), "207".to_string())
        );
        let v23 = b"MSH|^~\\&|B|B|A|A|20260101||ACK|X1|P|2.3\rMSA|AR|C1\rERR|MSH^1^9^101&Required field missing&HL70357\r";
        assert_eq!(ack_texts(v23), (String::new(), "101".to_string()));
    }
}
