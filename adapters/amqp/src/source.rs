//! RabbitMQ queue → journal. Manual acknowledgements: a delivery is acked only after
//! `journal.append` returned (the message is durable), so `kill -9` at any instant either leaves
//! the message in the queue (redelivered) or in the journal (and a redelivery is recognised by
//! its de-duplication key and not stored twice).

use crate::config::{redact, AmqpConfig, AmqpSourceConfig, SourceProtocol};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tributary_core::{Envelope, MessageId, Protocol};
use tributary_runtime::{ComponentStatus, Metrics, Readiness};
use tributary_storage::{AuditLog, Journal};

/// The header facts of an HL7 v2 message that the journal keeps beside it, as the MLLP listener
/// records them: MSH-10 (message control id) and MSH-9's message code and trigger event.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Hl7Header {
    /// Where the MSH segment ends: the de-duplication key hashes what follows.
    pub msh_end: usize,
    pub control_id: Option<String>,
    pub message_type: Option<String>,
    pub trigger_event: Option<String>,
}

/// HL7 v2: one patient's messages from this queue's partner in order, as over MLLP
/// ([`tributary_core::hl7v2_ordering_key`]); anything else: the partner.
fn ordering_key(partner: &str, protocol: Protocol, payload: &[u8]) -> String {
    let delimiters = payload
        .strip_prefix(b"MSH")
        .filter(|_| protocol == Protocol::Hl7v2)
        .and_then(|rest| Some((*rest.first()?, *rest.get(1)?, *rest.get(2)?)));
    match delimiters {
        Some((field, component, repetition)) => {
            let segments = payload.split(|b| *b == b'\r' || *b == b'\n');
            tributary_core::hl7v2_ordering_key(partner, segments, field, component, repetition)
        }
        None => partner.to_string(),
    }
}

/// Reads [`Hl7Header`] off the MSH segment; all `None` without a readable one.
pub fn hl7_header(payload: &[u8]) -> Hl7Header {
    let seg_end = payload
        .iter()
        .position(|b| *b == b'\r' || *b == b'\n')
        .unwrap_or(payload.len());
    let msh = &payload[..seg_end];
    if !msh.starts_with(b"MSH") || msh.len() < 5 {
        return Hl7Header::default();
    }
    let (sep, component) = (msh[3], msh[4]);
    // MSH-1 is the separator itself, so MSH-n is the n-th element after splitting.
    let fields: Vec<&[u8]> = msh.split(|b| *b == sep).collect();
    let text = |bytes: &[u8], max: usize| {
        let s = std::str::from_utf8(bytes).ok()?.trim();
        (!s.is_empty() && s.len() <= max).then(|| s.to_string())
    };
    let mut msg_type = fields
        .get(8)
        .map_or(&[][..], |f| *f)
        .split(|b| *b == component);
    Hl7Header {
        msh_end: seg_end,
        control_id: fields.get(9).and_then(|f| text(f, 199)),
        message_type: msg_type.next().and_then(|c| text(c, 16)),
        trigger_event: msg_type.next().and_then(|c| text(c, 16)),
    }
}

pub struct AmqpSource {
    cfg: AmqpConfig,
    src: AmqpSourceConfig,
    default_tenant: String,
    journal: Arc<dyn Journal>,
    readiness: Readiness,
    shutdown: CancellationToken,
    component: String,
    metrics: Metrics,
    audit: Option<AuditLog>,
}

/// What the ingress audit record says about one queue message: ids and types, never content
/// (nor the sender's own labels, MSH-10 or the AMQP `message-id`, which a sender may build from
/// patient data).
struct Facts {
    tenant: String,
    protocol: Protocol,
    message_type: Option<String>,
}

impl AmqpSource {
    pub fn new(
        cfg: AmqpConfig,
        default_tenant: &str,
        journal: Arc<dyn Journal>,
        readiness: Readiness,
        shutdown: CancellationToken,
    ) -> Option<Self> {
        let src = cfg.source.clone()?;
        Some(Self {
            cfg,
            src,
            default_tenant: default_tenant.to_string(),
            metrics: Metrics::default(),
            journal,
            readiness,
            shutdown,
            component: "amqp-source".into(),
            audit: None,
        })
    }

    /// Writes one PHI-free `ingress` audit record per queue message (journaled, duplicate,
    /// rejected, or not stored and given back to the queue), as the MLLP listener does.
    pub fn with_audit(mut self, audit: AuditLog) -> Self {
        self.audit = Some(audit);
        self
    }

    /// The record is durable before the broker is told to forget the message; a failure to
    /// write it is logged, and the message is acknowledged all the same (it is journaled).
    async fn audit(&self, facts: &Facts, outcome: &str, id: Option<MessageId>) {
        let Some(audit) = &self.audit else {
            return;
        };
        let body = serde_json::json!({
            "kind": "ingress",
            "protocol": match facts.protocol {
                Protocol::Fhir => "fhir-amqp",
                _ => "hl7v2-amqp",
            },
            "at": tributary_core::format_rfc3339_millis(tributary_core::now_millis()),
            "source": self.component,
            "queue": self.src.queue,
            "tenant": facts.tenant,
            "partner": self.src.partner,
            "outcome": outcome,
            "message_id": id.map(|i| i.to_string()),
            "message_type": facts.message_type,
        });
        if let Err(e) = audit.append(vec![body]).await {
            tracing::error!(component = %self.component, error = %e, "audit write failed");
        }
    }

    /// Counts each message's outcome in `/metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    fn count(&self, outcome: &str) {
        self.metrics.inc(
            "tributary_ingress_messages_total",
            &[("source", self.component.as_str()), ("outcome", outcome)],
        );
    }

    fn envelope(&self, d: &Delivery) -> Envelope {
        let content_type = d
            .properties
            .content_type()
            .as_ref()
            .map(|c| c.as_str().to_ascii_lowercase())
            .unwrap_or_default();
        let protocol = match self.src.protocol {
            SourceProtocol::Hl7v2 => Protocol::Hl7v2,
            SourceProtocol::Fhir => Protocol::Fhir,
            SourceProtocol::Auto if content_type.contains("fhir") => Protocol::Fhir,
            SourceProtocol::Auto => Protocol::Hl7v2,
        };
        let tenant = if self.src.tenant.is_empty() {
            &self.default_tenant
        } else {
            &self.src.tenant
        };
        let message_id = d
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_string());
        let header = match protocol {
            Protocol::Hl7v2 => hl7_header(&d.data),
            _ => Hl7Header::default(),
        };
        let control_id = header.control_id.clone();
        let mut b = Envelope::builder(protocol, d.data.clone())
            .tenant(tenant.as_str())
            .partner(self.src.partner.as_str())
            .ordering_key(ordering_key(&self.src.partner, protocol, &d.data))
            .meta("ingress", "amqp")
            .meta("amqp.queue", self.src.queue.as_str());
        b = b.dedup_key(dedup_key(
            &self.src.partner,
            &header,
            message_id.as_deref(),
            &d.data,
        ));
        if let Some(id) = &control_id {
            b = b.meta("hl7.control_id", id.as_str());
        }
        if let Some(id) = &message_id {
            b = b.meta("amqp.message_id", id.as_str());
        }
        for (key, value) in [
            ("message_type", header.message_type),
            ("trigger_event", header.trigger_event),
        ] {
            if let Some(v) = value {
                b = b.meta(key, v);
            }
        }
        b.build()
    }

    /// Runs until shutdown; reconnects with backoff.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut backoff = Duration::from_millis(self.cfg.retry_initial_ms);
        self.readiness
            .set(&self.component, ComponentStatus::Starting);
        while !self.shutdown.is_cancelled() {
            match self.consume(&mut backoff).await {
                Ok(()) => break,
                Err(reason) => {
                    tracing::warn!(component = %self.component, %reason, retry_in_ms = backoff.as_millis() as u64, "amqp source: consumption stopped");
                    let (r, c) = (&self.readiness, &self.component);
                    if !crate::wait_to_retry(&self.cfg, r, c, &self.shutdown, &mut backoff, reason)
                        .await
                    {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    async fn consume(&self, backoff: &mut Duration) -> Result<(), String> {
        let broker = redact(&self.cfg.url);
        let conn = Connection::connect(
            &self.cfg.url,
            ConnectionProperties::default().with_connection_name("tributary-ingest".into()),
        )
        .await
        .map_err(|e| format!("connecting to {broker}: {e}"))?;
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| format!("opening a channel: {e}"))?;
        ch.basic_qos(self.src.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| format!("setting prefetch: {e}"))?;
        if self.src.declare_queue {
            ch.queue_declare(
                self.src.queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("declaring queue {}: {e}", self.src.queue))?;
        }
        let mut consumer = ch
            .basic_consume(
                self.src.queue.as_str().into(),
                "tributary".into(),
                BasicConsumeOptions {
                    no_ack: false,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("consuming queue {}: {e}", self.src.queue))?;
        self.readiness.set(&self.component, ComponentStatus::Ready);
        tracing::info!(component = %self.component, %broker, queue = %self.src.queue, prefetch = self.src.prefetch, "amqp source consuming");
        loop {
            let next = tokio::select! {
                _ = self.shutdown.cancelled() => {
                    let _ = conn.close(200, "shutdown".into()).await;
                    return Ok(());
                }
                n = consumer.next() => n,
            };
            let delivery = match next {
                None => return Err("the broker cancelled the consumer".into()),
                Some(Err(e)) => return Err(format!("consumer: {e}")),
                Some(Ok(d)) => d,
            };
            let env = self.envelope(&delivery);
            let facts = Facts {
                tenant: env.tenant.to_string(),
                protocol: env.protocol,
                message_type: env.meta.get("message_type").map(|code| {
                    match env.meta.get("trigger_event") {
                        Some(t) => format!("{code}^{t}"),
                        None => code.clone(),
                    }
                }),
            };
            let stored = if delivery.data.len() > self.src.max_message_bytes {
                // Refused, but kept: journaled as rejected with the reason (for inspection and
                // replay once the limit is raised), then acknowledged — never silently dropped.
                let reason = format!(
                    "message of {} bytes exceeds [amqp.source] max_message_bytes ({})",
                    delivery.data.len(),
                    self.src.max_message_bytes
                );
                tracing::warn!(component = %self.component, queue = %self.src.queue, bytes = delivery.data.len(), limit = self.src.max_message_bytes, "message too large; journaled as rejected");
                self.journal
                    .append_rejected(env, reason)
                    .await
                    .map(|receipt| ("rejected", receipt.id))
            } else {
                let protocol = env.protocol;
                self.journal.append(env).await.map(|receipt| {
                    tracing::debug!(component = %self.component, message_id = %receipt.id, %protocol, duplicate = receipt.duplicate, "journaled from amqp");
                    let outcome = if receipt.duplicate {
                        "duplicate"
                    } else {
                        "accepted"
                    };
                    (outcome, receipt.id)
                })
            };
            match stored {
                Ok((outcome, id)) => {
                    self.audit(&facts, outcome, Some(id)).await;
                    // Durable now: only then tell the broker it may forget the message.
                    delivery
                        .acker
                        .ack(BasicAckOptions::default())
                        .await
                        .map_err(|e| format!("ack: {e}"))?;
                    self.count(outcome);
                    *backoff = Duration::from_millis(self.cfg.retry_initial_ms);
                }
                Err(e) => {
                    // Not stored: give it back to the queue and slow down.
                    self.audit(&facts, "storage_unavailable", None).await;
                    let _ = delivery
                        .acker
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..Default::default()
                        })
                        .await;
                    return Err(format!("journal append failed: {e}"));
                }
            }
        }
    }
}

/// What makes a queue message a redelivery of one already journaled: the same partner, label
/// (HL7 MSH-10, else the AMQP `message-id`, else none) and content. Without the content, a
/// different message under a reused label would be dropped; without a key at all, a message
/// redelivered after a crash between the journal append and the ack would be stored twice.
fn dedup_key(partner: &str, header: &Hl7Header, message_id: Option<&str>, data: &[u8]) -> String {
    match (&header.control_id, message_id) {
        (Some(id), _) => tributary_core::hl7v2_dedup_key(partner, id, &data[header.msh_end..]),
        (None, Some(id)) => tributary_core::content_dedup_key(partner, &format!("amqp:{id}"), data),
        (None, None) => tributary_core::content_dedup_key(partner, "-", data),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redelivery_has_the_key_of_the_first_delivery_and_another_message_another_key() {
        let fhir = br#"{"resourceType":"Patient","id":"1"}"#;
        let none = Hl7Header::default();
        let key = |id: Option<&str>, data: &[u8]| dedup_key("q", &none, id, data);
        assert_eq!(key(None, fhir), key(None, fhir));
        assert_ne!(
            key(None, fhir),
            key(None, br#"{"resourceType":"Patient","id":"2"}"#)
        );
        assert_eq!(key(Some("m-1"), fhir), key(Some("m-1"), fhir));
        // a publisher that reuses message ids: a different body is a different message
        assert_ne!(key(Some("m-1"), fhir), key(Some("m-1"), b"{}"));
        assert_ne!(key(Some("m-1"), fhir), key(None, fhir));
        let m = b"MSH|^~\\&|LAB|HOSP|EHR|HOSP|20240101120000||ORU^R01|CTRL-42|P|2.5\rPID|1||123";
        let h = hl7_header(m);
        // MSH-10 decides over the AMQP message id
        assert_eq!(
            dedup_key("q", &h, Some("a"), m),
            dedup_key("q", &h, Some("b"), m)
        );
    }

    #[test]
    fn control_id_and_message_type_from_msh() {
        let m = b"MSH|^~\\&|LAB|HOSP|EHR|HOSP|20240101120000||ORU^R01^ORU_R01|CTRL-42|P|2.5\rPID|1||123";
        assert_eq!(
            hl7_header(m),
            Hl7Header {
                msh_end: m.iter().position(|b| *b == b'\r').unwrap(),
                control_id: Some("CTRL-42".into()),
                message_type: Some("ORU".into()),
                trigger_event: Some("R01".into()),
            }
        );
        // other delimiters, as MSH-1 and MSH-2 declare them
        let h = hl7_header(b"MSH#$~\\&#A#B#C#D#2024##ADT$A08#X1#P#2.5");
        assert_eq!(
            (h.message_type.as_deref(), h.trigger_event.as_deref()),
            (Some("ADT"), Some("A08"))
        );
        assert_eq!(hl7_header(b"PID|1"), Hl7Header::default());
        // one patient's messages share a key with no identifier in clear; another patient's differ
        let key = ordering_key("lab", Protocol::Hl7v2, m);
        assert!(key.starts_with("lab/p:") && !key.contains("123"), "{key}");
        let other = b"MSH|^~\\&|LAB|HOSP|EHR|HOSP|20240101120000||ORU^R01|C-43|P|2.5\rPID|1||124";
        assert_ne!(ordering_key("lab", Protocol::Hl7v2, other), key);
        assert_eq!(ordering_key("lab", Protocol::Hl7v2, b"MSH|^~\\&|A"), "lab");
        let short = hl7_header(b"MSH|^~\\&|A");
        assert_eq!(
            (short.control_id, short.message_type, short.msh_end),
            (None, None, 10)
        );
    }
}
