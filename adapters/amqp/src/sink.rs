//! Outbox → RabbitMQ exchange, with publisher confirms.
//!
//! Same contract as the Kafka relay: the cursor advances only past events the broker confirmed,
//! contiguously; on a nack, a channel error or a lost connection the sink reconnects with
//! backoff and re-publishes from the cursor (duplicates carry the same `message-id`).

use crate::config::{redact, AmqpConfig, AmqpPayload, AmqpSinkConfig};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use lapin::{Confirmation, PublisherConfirm};
use std::collections::VecDeque;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tributary_runtime::{ComponentStatus, Readiness};
use tributary_storage::{AckRecorder, Outbox, OutboxEvent};

/// One AMQP message built from one outbox event.
#[derive(Clone, Debug, PartialEq)]
pub struct AmqpMessage {
    pub routing_key: String,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

/// `<tenant>.<ResourceType>.<create|update|delete>`; message-level events keep their type:
/// `<tenant>.hl7v2.adt.A01`.
pub fn routing_key<R>(ev: &OutboxEvent<R>) -> String {
    let rest = ev
        .event_type
        .strip_prefix("fhir.")
        .unwrap_or(&ev.event_type);
    format!("{}.{rest}", ev.tenant)
}

/// Id-only notification: see [`OutboxEvent::id_only_notification`].
pub fn notification<R>(ev: &OutboxEvent<R>) -> serde_json::Value {
    ev.id_only_notification()
}

/// The message for `ev`; the sink passes events read raw, so a resource is published as its
/// stored JSON.
pub fn build<R: serde::Serialize>(cfg: &AmqpSinkConfig, ev: &OutboxEvent<R>) -> AmqpMessage {
    let (body, content_type) = match (cfg.payload, &ev.resource) {
        (AmqpPayload::FullResource, Some(r)) => (
            serde_json::to_vec(r).expect("stored JSON serializes"),
            "application/fhir+json",
        ),
        _ => (
            serde_json::to_vec(&notification(ev)).expect("a Value always serializes"),
            "application/json",
        ),
    };
    let mut headers = vec![
        ("ce_specversion", "1.0".to_string()),
        ("ce_id", ev.event_id.clone()),
        ("ce_type", ev.event_type.clone()),
        ("ce_source", format!("urn:tributary:{}", ev.tenant)),
        ("ce_tenant", ev.tenant.clone()),
    ];
    if let Some(p) = &ev.patient_id {
        headers.push(("patient", p.clone()));
    }
    if let Some(mv) = &ev.mapping_version {
        headers.push(("ce_mappingversion", mv.clone()));
    }
    AmqpMessage {
        routing_key: routing_key(ev),
        content_type,
        body,
        headers,
    }
}

/// The running sink.
pub struct AmqpSink {
    cfg: AmqpConfig,
    sink: AmqpSinkConfig,
    outbox: Outbox,
    readiness: Readiness,
    shutdown: CancellationToken,
    component: String,
}

impl AmqpSink {
    pub fn new(
        cfg: AmqpConfig,
        outbox: Outbox,
        readiness: Readiness,
        shutdown: CancellationToken,
    ) -> Option<Self> {
        let sink = cfg.sink.clone()?;
        Some(Self {
            cfg,
            sink,
            outbox,
            readiness,
            shutdown,
            component: "amqp-sink".into(),
        })
    }

    async fn connect(&self) -> Result<(Connection, Channel), lapin::Error> {
        let conn = Connection::connect(
            &self.cfg.url,
            ConnectionProperties::default().with_connection_name("tributary-events".into()),
        )
        .await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        if self.sink.declare_exchange {
            ch.exchange_declare(
                self.sink.exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        }
        Ok((conn, ch))
    }

    /// Runs until shutdown; broker problems are reported in `/ready` and retried.
    pub async fn run(self) -> Result<(), tributary_storage::StorageError> {
        let acks = self.outbox.ack_recorder(&self.sink.cursor_name)?;
        let mut acked = acks.start();
        let mut backoff = Duration::from_millis(self.cfg.retry_initial_ms);
        self.readiness
            .set(&self.component, ComponentStatus::Starting);
        while !self.shutdown.is_cancelled() {
            let outcome = match self.connect().await {
                Ok((conn, ch)) => {
                    self.readiness.set(&self.component, ComponentStatus::Ready);
                    tracing::info!(component = %self.component, broker = %redact(&self.cfg.url), exchange = %self.sink.exchange, cursor = acked, "amqp sink connected");
                    let r = self.pump(&ch, &mut acked, &acks, &mut backoff).await;
                    let _ = conn.close(200, "bye".into()).await;
                    r
                }
                Err(e) => Err(format!("connecting to {}: {e}", redact(&self.cfg.url))),
            };
            match outcome {
                Ok(()) => break,
                Err(reason) => {
                    tracing::warn!(component = %self.component, %reason, retry_in_ms = backoff.as_millis() as u64, "amqp sink: publishing stopped; events wait in the outbox");
                    let (r, c) = (&self.readiness, &self.component);
                    if !crate::wait_to_retry(&self.cfg, r, c, &self.shutdown, &mut backoff, reason)
                        .await
                    {
                        break;
                    }
                }
            }
        }
        acks.finish(acked).await;
        Ok(())
    }

    /// Publishes from `acked` on until shutdown (`Ok`) or a broker problem (`Err(reason)`).
    async fn pump(
        &self,
        ch: &Channel,
        acked: &mut u64,
        acks: &AckRecorder,
        backoff: &mut Duration,
    ) -> Result<(), String> {
        let mut sent_upto = *acked;
        let mut pending: VecDeque<(u64, String, PublisherConfirm)> = VecDeque::new();
        // Routing keys already reported as bound to no queue (reported once each, bounded).
        let mut unroutable: std::collections::HashSet<String> = Default::default();
        let mut head_rx = self.outbox.subscribe();
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            if pending.len() < self.sink.max_in_flight && self.outbox.head() > sent_upto {
                let room = (self.sink.max_in_flight - pending.len()).min(256);
                let events = self
                    .outbox
                    .read_after_raw(sent_upto, room)
                    .map_err(|e| format!("reading the outbox: {e}"))?;
                for ev in events {
                    let msg = build(&self.sink, &ev);
                    let confirm = publish(ch, &self.sink.exchange, &ev, &msg)
                        .await
                        .map_err(|e| format!("publishing event {}: {e}", ev.event_id))?;
                    pending.push_back((ev.seq, ev.event_id, confirm));
                    sent_upto = ev.seq;
                }
                continue;
            }
            let Some((_, _, front)) = pending.front_mut() else {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return Ok(()),
                    r = head_rx.changed() => if r.is_err() { return Ok(()) },
                }
                continue;
            };
            let confirmation = tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                c = front => c,
            };
            let (seq, event_id, _) = pending.pop_front().expect("front exists");
            match confirmation {
                Ok(Confirmation::Ack(returned)) => {
                    if let Some(r) = returned {
                        // Confirmed but routed to no queue: RabbitMQ dropped it, as a topic
                        // exchange does for keys nobody binds. Said once per key so that a
                        // missing binding is seen; an alternate exchange keeps such messages.
                        let key = r.delivery.routing_key.to_string();
                        if unroutable.len() < 1024 && unroutable.insert(key.clone()) {
                            tracing::warn!(component = %self.component, routing_key = %key, "amqp sink: no queue is bound for this routing key; its events are dropped by the broker (bind a queue, or set an alternate exchange)");
                        }
                    }
                    *acked = seq;
                    if pending.is_empty() || seq.is_multiple_of(64) {
                        acks.record(seq);
                    }
                    *backoff = Duration::from_millis(self.cfg.retry_initial_ms);
                }
                Ok(other) => {
                    acks.record(*acked);
                    return Err(format!("event {event_id}: broker answered {other:?}"));
                }
                Err(e) => {
                    acks.record(*acked);
                    return Err(format!("event {event_id}: {e}"));
                }
            }
        }
    }
}

async fn publish<R>(
    ch: &Channel,
    exchange: &str,
    ev: &OutboxEvent<R>,
    msg: &AmqpMessage,
) -> Result<PublisherConfirm, lapin::Error> {
    let mut headers = FieldTable::default();
    for (k, v) in &msg.headers {
        headers.insert(
            ShortString::from(*k),
            AMQPValue::LongString(LongString::from(v.as_str())),
        );
    }
    let props = BasicProperties::default()
        .with_content_type(msg.content_type.into())
        .with_message_id(ev.event_id.as_str().into())
        .with_type(ev.event_type.as_str().into())
        .with_app_id("tributary".into())
        .with_delivery_mode(2)
        .with_timestamp((ev.occurred_at / 1000).max(0) as u64)
        .with_headers(headers);
    ch.basic_publish(
        exchange.into(),
        msg.routing_key.as_str().into(),
        // mandatory: an unroutable message comes back with its confirm, so it can be reported
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        &msg.body,
        props,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keys_and_bodies() {
        let mut ev = OutboxEvent {
            seq: 1,
            event_id: "e1".into(),
            tenant: "t1".into(),
            event_type: "fhir.Patient.create".into(),
            resource_type: Some("Patient".into()),
            resource_id: Some("p1".into()),
            version: Some(1),
            patient_id: Some("p1".into()),
            other_patients: Vec::new(),
            source_message: None,
            mapping_version: None,
            occurred_at: 0,
            resource: Some(serde_json::json!({"resourceType": "Patient", "id": "p1"})),
        };
        let cfg = AmqpSinkConfig::default();
        let m = build(&cfg, &ev);
        assert_eq!(m.routing_key, "t1.Patient.create");
        assert_eq!(m.content_type, "application/fhir+json");
        ev.event_type = "hl7v2.adt.A01".into();
        ev.resource = None;
        let m = build(&cfg, &ev);
        assert_eq!(m.routing_key, "t1.hl7v2.adt.A01");
        let v: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
        assert_eq!(v["resourceId"], "p1");
    }
}
